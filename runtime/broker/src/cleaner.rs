//! The log cleaner of compacted topics: `threads` background loops, each
//! picking the local replica whose log is most in need ([`pick`]: overdue
//! first, then the highest dirty ratio over its topic's
//! `min.cleanable.dirty.ratio`), and cleaning it with its share of the
//! dedupe buffer, all throttled together to `io_bytes_per_second`. Replicas
//! clean independently; each cleans only below its high watermark, so
//! nothing a truncation could remove is ever cleaned.
//!
//! The loops and `topic compact` (which rolls and cleans every local replica
//! of a topic now, whatever its dirty ratio) are `api/compaction.rs`.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use quiver_log::Cleanable;

/// A replica the cleaner may look at: topic, partition, what it offers.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Candidate {
    pub(crate) topic: String,
    pub(crate) partition: u32,
    pub(crate) cleanable: Cleanable,
    pub(crate) min_dirty_ratio: f64,
}

/// The index of the candidate to clean next, if any is due and not being
/// cleaned by another thread: overdue logs first (a record waited past
/// `max.compaction.lag.ms`), then the highest dirty ratio.
pub(crate) fn pick(candidates: &[Candidate], busy: &HashSet<(String, u32)>) -> Option<usize> {
    candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| !busy.contains(&(c.topic.clone(), c.partition)))
        .filter(|(_, c)| c.cleanable.is_due(c.min_dirty_ratio))
        .max_by(|(_, a), (_, b)| {
            (a.cleanable.overdue, a.cleanable.dirty_ratio)
                .partial_cmp(&(b.cleanable.overdue, b.cleanable.dirty_ratio))
                .unwrap_or(std::cmp::Ordering::Equal)
        })
        .map(|(i, _)| i)
}

/// Shared by every cleaner thread: bytes read per second, together.
#[derive(Debug)]
pub(crate) struct Throttle {
    rate: Option<u64>,
    /// When the current accounting window started and the bytes read in it.
    window: Mutex<(Instant, u64)>,
}

impl Throttle {
    pub(crate) fn new(rate: Option<u64>) -> Throttle {
        Throttle { rate, window: Mutex::new((Instant::now(), 0)) }
    }

    /// Accounts `bytes` read and sleeps as long as the cleaners are ahead
    /// of the rate.
    pub(crate) fn consume(&self, bytes: u64) {
        let Some(rate) = self.rate.filter(|r| *r > 0) else { return };
        let wait = {
            let mut window = self.window.lock().expect("throttle lock poisoned");
            let elapsed = window.0.elapsed();
            if elapsed > Duration::from_secs(1) {
                *window = (Instant::now(), 0);
            }
            window.1 += bytes;
            let due = Duration::from_secs_f64(window.1 as f64 / rate as f64);
            due.saturating_sub(window.0.elapsed())
        };
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

/// The cleaner's state in the broker: which replicas are being cleaned.
#[derive(Debug, Default)]
pub(crate) struct Cleaners {
    pub(crate) busy: Mutex<HashSet<(String, u32)>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(partition: u32, dirty_ratio: f64, overdue: bool) -> Candidate {
        Candidate {
            topic: "t".into(),
            partition,
            cleanable: Cleanable { first_dirty_offset: 0, end_offset: 10, dirty_ratio, overdue },
            min_dirty_ratio: 0.5,
        }
    }

    #[test]
    fn the_dirtiest_due_log_goes_first_and_overdue_before_all() {
        let none = HashSet::new();
        let list = [candidate(0, 0.6, false), candidate(1, 0.9, false), candidate(2, 0.4, false)];
        assert_eq!(pick(&list, &none).map(|i| list[i].partition), Some(1));
        let busy: HashSet<_> = [("t".to_string(), 1)].into();
        assert_eq!(pick(&list, &busy).map(|i| list[i].partition), Some(0));
        assert_eq!(pick(&list[2..], &none), None, "below the ratio");
        let list = [candidate(0, 0.9, false), candidate(1, 0.1, true)];
        assert_eq!(pick(&list, &none).map(|i| list[i].partition), Some(1), "overdue first");
        let mut clean = candidate(3, 1.0, true);
        clean.cleanable.first_dirty_offset = 10;
        assert_eq!(pick(&[clean], &none), None, "nothing dirty");
    }

    #[test]
    fn the_throttle_holds_the_rate() {
        let throttle = Throttle::new(Some(1_000_000));
        let started = Instant::now();
        for _ in 0..5 {
            throttle.consume(40_000);
        }
        // 200 kB at 1 MB/s: at least 0.2 s (never less; more on a slow machine).
        assert!(started.elapsed() >= Duration::from_millis(190), "{:?}", started.elapsed());
    }
}
