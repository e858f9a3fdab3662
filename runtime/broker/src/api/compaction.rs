//! Compacted topics on this broker: the background cleaner loops (the
//! choice of a log and the throttle are `crate::cleaner`'s) and an
//! operator's `topic compact`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use quiver_log::{CleanOptions, CleanReport};

use crate::broker::Broker;
use crate::cleaner::{Candidate, Throttle, pick};
use crate::errors::AdminError;
use crate::partition::Partition;

impl Broker {
    /// Starts the background cleaner threads (`cleaner.threads`): OS
    /// threads at a lower CPU priority, so that on a busy machine the data
    /// path goes first. Each holds the broker only while it cleans, and
    /// ends after shutdown.
    pub(crate) fn start_cleaners(self: &Arc<Self>, throttle: Arc<Throttle>) {
        for n in 0..self.config.cleaner.threads {
            let (broker, throttle) = (Arc::downgrade(self), throttle.clone());
            let started = std::thread::Builder::new()
                .name(format!("quiver-cleaner-{n}"))
                .spawn(move || run_cleaner(&broker, &throttle));
            if let Err(e) = started {
                tracing::error!(error = %e, "cannot start a log cleaner thread");
            }
        }
    }

    /// Cleans the local replica most in need, if one is due. Whether it did.
    fn clean_one(&self, throttle: &Throttle) -> bool {
        let now = crate::broker::now_ms();
        let mut candidates = Vec::new();
        let mut partitions = Vec::new();
        for topic in self.sorted_topics() {
            if !topic.config.is_compacted() {
                continue;
            }
            for p in topic.local() {
                if let Some(cleanable) = p.log.cleanable(now, clean_bound(p)) {
                    candidates.push(Candidate {
                        topic: topic.record.name.clone(),
                        partition: p.id,
                        cleanable,
                        min_dirty_ratio: topic.config.compaction.min_cleanable_dirty_ratio,
                    });
                    partitions.push(p.clone());
                }
            }
        }
        let (chosen, p) = {
            let mut busy = self.cleaners.busy.lock().expect("cleaner lock poisoned");
            let Some(i) = pick(&candidates, &busy) else { return false };
            let chosen = (candidates[i].topic.clone(), candidates[i].partition);
            busy.insert(chosen.clone());
            (chosen, &partitions[i])
        };
        let result = self.clean_partition(&chosen.0, p, now, false, throttle);
        self.cleaners.busy.lock().expect("cleaner lock poisoned").remove(&chosen);
        match result {
            Ok(report) => report.is_some(),
            Err(e) => {
                // Every segment is the old one or a cleaned one (see
                // `quiver_log::clean`); the next pass starts over.
                tracing::error!(topic = %chosen.0, partition = chosen.1, error = %e, "cleaning failed");
                false
            }
        }
    }

    /// One pass over one replica, logged when it cleaned something.
    fn clean_partition(
        &self,
        topic: &str,
        p: &Partition,
        now: i64,
        force: bool,
        throttle: &Throttle,
    ) -> std::io::Result<Option<CleanReport>> {
        let threads = self.config.cleaner.threads.max(1);
        let options = CleanOptions { dedupe_buffer_bytes: self.config.cleaner.dedupe_buffer_bytes / threads, force };
        let started = Instant::now();
        let report = p.log.clean(now, clean_bound(p), &options, &mut |bytes| throttle.consume(bytes))?;
        if let Some(report) = &report {
            tracing::info!(
                topic,
                partition = p.id,
                cleaned_to = report.cleaned_to,
                bytes_before = report.bytes_before,
                bytes_after = report.bytes_after,
                records_before = report.records_before,
                records_after = report.records_after,
                keys = report.map_keys,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "cleaned a compacted partition"
            );
        }
        Ok(report)
    }

    /// Rolls and cleans every local replica of compacted `topic` now
    /// (an operator's `topic compact`), whatever their dirty ratio, on a
    /// thread of its own at the cleaners' priority.
    pub(crate) fn compact_topic(&self, name: &str) -> Result<Vec<(u32, Option<CleanReport>)>, AdminError> {
        let topic = self.current_topic(name).map_err(|_| AdminError::UnknownTopic(name.to_owned()))?;
        if !topic.config.is_compacted() {
            return Err(AdminError::InvalidConfig(format!(
                "topic '{name}' is not compacted (cleanup.policy={}): set cleanup.policy=compact to compact it",
                topic.config.cleanup_policy
            )));
        }
        let throttle = Throttle::new(self.config.cleaner.io_bytes_per_second);
        std::thread::scope(|scope| {
            let pass = scope.spawn(|| {
                background();
                let mut out = Vec::new();
                for p in topic.local() {
                    // What the active segment holds becomes cleanable once
                    // sealed, durable and below the high watermark.
                    p.log.roll().map_err(|e| AdminError::Storage(Box::new(e)))?;
                    p.log.flush().map_err(|e| AdminError::Storage(Box::new(e)))?;
                    let report = self
                        .clean_partition(name, p, crate::broker::now_ms(), true, &throttle)
                        .map_err(|e| AdminError::Storage(format!("cleaning {name}-{}: {e}", p.id).into()))?;
                    out.push((p.id, report));
                }
                Ok(out)
            });
            pass.join().unwrap_or_else(|_| Err(AdminError::Storage("the cleaning pass panicked".into())))
        })
    }
}

/// Where cleaning stops: the last stable offset (the high watermark, or
/// the first offset of the oldest open transaction, whose fate is not
/// known yet: its records may still be aborted).
fn clean_bound(p: &Partition) -> i64 {
    p.log.last_stable_offset(p.high_watermark())
}

/// A cleaner thread's loop: clean the replica most in need, or wait
/// `backoff` (checking for shutdown every 100 ms) when none is due.
fn run_cleaner(broker: &Weak<Broker>, throttle: &Throttle) {
    background();
    loop {
        let backoff = {
            let Some(b) = broker.upgrade() else { return };
            if b.shutting_down.load(Ordering::Relaxed) {
                return;
            }
            if b.clean_one(throttle) {
                continue;
            }
            Duration::from_millis(b.config.cleaner.backoff_ms.max(10))
        };
        let until = Instant::now() + backoff;
        while Instant::now() < until {
            std::thread::sleep(Duration::from_millis(100).min(backoff));
            if broker.upgrade().is_none_or(|b| b.shutting_down.load(Ordering::Relaxed)) {
                return;
            }
        }
    }
}

/// This thread cleans only: it yields the CPU to the data path.
fn background() {
    if let Err(e) = quiver_log::lower_thread_priority() {
        tracing::debug!(error = %e, "cannot lower the cleaner thread's priority");
    }
}
