//! The producer's rules, without I/O: how an idempotent producer numbers a
//! partition's batches ([`PartitionSequence`]) and what it does with a batch
//! once an answer (or no answer) comes back ([`on_error`], [`on_lost`]). The
//! dispatcher and the send tasks only carry batches and answers to them.

use std::collections::VecDeque;

use quiver_protocol::{ErrorCode, WireError};

use crate::connection::CallError;

/// An idempotent producer's numbering of one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub(crate) epoch: i16,
    pub(crate) sequence: i32,
}

/// An idempotent producer's numbering of one partition.
#[derive(Debug, Default)]
pub(crate) struct PartitionSequence {
    epoch: i16,
    /// The sequence the next batch starts at.
    next: i32,
    /// The batches numbered since the oldest one not yet completed, in
    /// order: their stamps, and whether each is completed.
    window: VecDeque<(Stamp, bool)>,
    /// Whether a batch of this producer was written to the partition. Until
    /// one is, the leader may not know the producer and would take any
    /// sequence as its first: a later batch arriving before the first (a
    /// retry racing a leader change or a restart) would make the first one
    /// stale. So until then one batch is out at a time.
    written: bool,
}

impl PartitionSequence {
    /// Numbers a batch of `count` records: the partition's next sequence in
    /// its current epoch. `None` (nothing numbered) while `window_max`
    /// batches are numbered since the oldest one not yet completed: brokers
    /// remember that many, so a retry is always recognised (one, until a
    /// batch of the producer was written to the partition).
    pub(crate) fn stamp(&mut self, count: usize, window_max: usize) -> Option<Stamp> {
        let window_max = if self.written { window_max } else { 1 };
        if self.window.len() >= window_max {
            return None;
        }
        let stamp = Stamp { epoch: self.epoch, sequence: self.next };
        // Sequences wrap at i32::MAX, as Kafka's do.
        self.next = ((i64::from(self.next) + count as i64) % (i64::from(i32::MAX) + 1)) as i32;
        self.window.push_back((stamp, false));
        Some(stamp)
    }

    /// The batch `stamp` is answered (`written`, or failed): the window
    /// moves past every completed batch at its front.
    pub(crate) fn completed(&mut self, stamp: Stamp, written: bool) {
        self.written |= written;
        if let Some(entry) = self.window.iter_mut().find(|(s, _)| *s == stamp) {
            entry.1 = true;
        }
        while self.window.front().is_some_and(|(_, done)| *done) {
            self.window.pop_front();
        }
    }

    /// Whether `stamp` belongs to the partition's current epoch.
    pub(crate) fn is_current(&self, stamp: Stamp) -> bool {
        self.epoch == stamp.epoch
    }

    /// A transaction ended: the next batches start again at 0 (the
    /// coordinator's new epoch numbers them). The partition's leader still
    /// knows the producer if it wrote here.
    pub(crate) fn restart(&mut self) {
        self.next = 0;
        self.window.clear();
    }

    /// The batch `stamp` failed for good: its sequences will never be
    /// filled, so the next batches start a new epoch at 0 (once per epoch:
    /// later failures of the same epoch change nothing). True when a new
    /// epoch started. After `i16::MAX` epochs the last one stays: later
    /// batches then fail with `out_of_order_sequence`.
    pub(crate) fn failed(&mut self, stamp: Stamp) -> bool {
        if stamp.epoch != self.epoch || self.epoch == i16::MAX {
            return false;
        }
        self.epoch += 1;
        self.next = 0;
        true
    }
}

/// What the producer knows of a batch when its partition's answer comes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attempt {
    /// It carries an idempotent producer's numbering.
    pub(crate) numbered: bool,
    /// Its numbering belongs to its partition's current epoch.
    pub(crate) current_epoch: bool,
    /// An earlier attempt ended without knowing whether it was appended.
    pub(crate) ambiguous: bool,
}

/// What to do with a batch after its attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Send it again: it certainly was not appended, or it is numbered and
    /// its leader recognises a repeat. `forget_routes` when its leader may
    /// have moved; `ambiguous` when this attempt may have appended it.
    Retry { forget_routes: bool, ambiguous: bool },
    /// Its fate is unknown: it fails as such and is never sent again.
    Unknown(String),
    /// Refused for good.
    Rejected(WireError),
}

/// The verdict on a batch whose partition answered `code` (not `none`).
pub(crate) fn on_error(code: ErrorCode, message: &str, attempt: Attempt) -> Verdict {
    let described = || format!("{code}: {message}");
    match code {
        // Appended but unconfirmed: without a number a retry could write it
        // twice.
        ErrorCode::NotReplicated if !attempt.numbered => Verdict::Unknown(described()),
        // The gap before it is a batch that failed for good.
        ErrorCode::OutOfOrderSequence if !attempt.current_epoch => Verdict::Rejected(WireError::new(
            code,
            format!("{message}; an earlier batch of this partition failed, so it was not written"),
        )),
        // The leader is past it: written long ago, or never (a leader that
        // learned of this producer from a later batch).
        ErrorCode::StaleSequence => Verdict::Unknown(described()),
        ErrorCode::ProducerFenced if attempt.ambiguous => {
            Verdict::Unknown(format!("{code}: {message} (an earlier attempt may have been written)"))
        }
        // A numbered batch appended but unconfirmed is sent again: the
        // leader recognises it if it kept it.
        _ if code.is_retriable() || code == ErrorCode::NotReplicated => Verdict::Retry {
            forget_routes: matches!(code, ErrorCode::NotLeader | ErrorCode::UnknownTopic | ErrorCode::NotReplicated),
            ambiguous: attempt.ambiguous || code == ErrorCode::NotReplicated,
        },
        _ => Verdict::Rejected(WireError::new(code, message)),
    }
}

/// Whether a request that got no answer (`error`) makes the next requests
/// ask for leaders anew: the broker may be gone, unless the error says where
/// the leader went (the cache already names it).
pub(crate) fn forgets_routes(error: &CallError) -> bool {
    !matches!(error, CallError::LeaderMoved(_))
}

/// The verdict on a batch whose request got no answer (`error`).
pub(crate) fn on_lost(error: &CallError, attempt: Attempt) -> Verdict {
    let forget_routes = forgets_routes(error);
    if error.is_safe_to_retry() {
        Verdict::Retry { forget_routes, ambiguous: attempt.ambiguous }
    } else if attempt.numbered {
        // The broker may be gone: a numbered batch is sent again (written
        // once) to whoever leads next.
        Verdict::Retry { forget_routes, ambiguous: true }
    } else {
        Verdict::Unknown(error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRESH: Attempt = Attempt { numbered: true, current_epoch: true, ambiguous: false };

    #[test]
    fn batches_are_numbered_in_order_within_a_window() {
        let mut seq = PartitionSequence { written: true, ..PartitionSequence::default() };
        let stamps: Vec<Stamp> = (0..3).map(|_| seq.stamp(10, 3).unwrap()).collect();
        assert_eq!(stamps.iter().map(|s| s.sequence).collect::<Vec<_>>(), [0, 10, 20]);
        assert_eq!(seq.stamp(10, 3), None, "the window is full");
        // The window moves only from its front: completing the second batch
        // frees nothing while the first is out.
        seq.completed(stamps[1], true);
        assert_eq!(seq.stamp(10, 3), None);
        seq.completed(stamps[0], true);
        assert_eq!(seq.stamp(10, 3), Some(Stamp { epoch: 0, sequence: 30 }));
    }

    #[test]
    fn the_first_batch_goes_alone_until_one_is_written() {
        let mut seq = PartitionSequence::default();
        let first = seq.stamp(10, 16).unwrap();
        assert_eq!(seq.stamp(10, 16), None, "the leader may not know the producer yet");
        seq.completed(first, false);
        assert!(seq.failed(first));
        let again = seq.stamp(10, 16).unwrap();
        assert_eq!(again, Stamp { epoch: 1, sequence: 0 });
        assert_eq!(seq.stamp(10, 16), None, "a failed batch taught the leader nothing");
        seq.completed(again, true);
        let more: Vec<Stamp> = (0..16).map(|_| seq.stamp(10, 16).unwrap()).collect();
        assert_eq!(more[15].sequence, 160);
        assert_eq!(seq.stamp(10, 16), None, "the whole window once written");
        seq.restart();
        assert_eq!(seq.stamp(10, 16).unwrap().sequence, 0);
        assert!(seq.stamp(10, 16).is_some(), "a transaction's end does not make the producer unknown");
    }

    #[test]
    fn sequences_wrap_at_i32_max() {
        let mut seq = PartitionSequence { next: i32::MAX - 1, written: true, ..PartitionSequence::default() };
        assert_eq!(seq.stamp(5, 16).unwrap().sequence, i32::MAX - 1);
        assert_eq!(seq.stamp(1, 16).unwrap().sequence, 3);
    }

    #[test]
    fn a_failure_starts_one_new_epoch() {
        let mut seq = PartitionSequence { written: true, ..PartitionSequence::default() };
        let (a, b) = (seq.stamp(1, 16).unwrap(), seq.stamp(1, 16).unwrap());
        assert!(seq.failed(a));
        assert!(!seq.is_current(b), "in flight from the old epoch");
        assert!(!seq.failed(b), "the old epoch's later failures change nothing");
        assert_eq!(seq.stamp(1, 16), Some(Stamp { epoch: 1, sequence: 0 }));
        let mut last = PartitionSequence { epoch: i16::MAX, ..PartitionSequence::default() };
        let s = last.stamp(1, 16).unwrap();
        assert!(!last.failed(s), "the last epoch stays");
    }

    #[test]
    fn answers_are_read_by_what_is_known_of_the_batch() {
        let unnumbered = Attempt { numbered: false, ..FRESH };
        assert!(matches!(on_error(ErrorCode::NotReplicated, "m", unnumbered), Verdict::Unknown(_)));
        assert_eq!(
            on_error(ErrorCode::NotReplicated, "m", FRESH),
            Verdict::Retry { forget_routes: true, ambiguous: true }
        );
        assert_eq!(
            on_error(ErrorCode::OutOfOrderSequence, "m", FRESH),
            Verdict::Retry { forget_routes: false, ambiguous: false }
        );
        let old_epoch = Attempt { current_epoch: false, ..FRESH };
        match on_error(ErrorCode::OutOfOrderSequence, "expected 7", old_epoch) {
            Verdict::Rejected(e) => assert!(e.message.starts_with("expected 7; an earlier batch"), "{}", e.message),
            other => panic!("{other:?}"),
        }
        assert!(matches!(on_error(ErrorCode::StaleSequence, "m", FRESH), Verdict::Unknown(_)));
        assert!(matches!(on_error(ErrorCode::ProducerFenced, "m", FRESH), Verdict::Rejected(_)));
        let ambiguous = Attempt { ambiguous: true, ..FRESH };
        assert!(
            matches!(on_error(ErrorCode::ProducerFenced, "m", ambiguous), Verdict::Unknown(m) if m.contains("may have been"))
        );
        assert_eq!(
            on_error(ErrorCode::NotLeader, "m", ambiguous),
            Verdict::Retry { forget_routes: true, ambiguous: true },
            "a retry keeps what earlier attempts left unknown"
        );
        assert_eq!(
            on_error(ErrorCode::BrokerBusy, "m", FRESH),
            Verdict::Retry { forget_routes: false, ambiguous: false }
        );
        assert!(matches!(on_error(ErrorCode::RecordTooLarge, "m", FRESH), Verdict::Rejected(e) if e.message == "m"));
    }

    #[test]
    fn lost_answers_are_retried_only_when_nothing_can_double() {
        let unnumbered = Attempt { numbered: false, ..FRESH };
        let lost = CallError::ConnectionLost("gone".into());
        assert!(matches!(on_lost(&lost, unnumbered), Verdict::Unknown(_)));
        assert_eq!(on_lost(&lost, FRESH), Verdict::Retry { forget_routes: true, ambiguous: true });
        let moved = CallError::LeaderMoved("to 2".into());
        assert_eq!(on_lost(&moved, FRESH), Verdict::Retry { forget_routes: false, ambiguous: true });
        let refused = CallError::Broker(WireError::new(ErrorCode::BrokerNotReady, "catching up"));
        assert_eq!(on_lost(&refused, unnumbered), Verdict::Retry { forget_routes: true, ambiguous: false });
    }
}
