//! A partition's follower: it reconciles its log with a new leader, then
//! copies the leader's batches. A state machine without I/O: the owner asks
//! it what to do ([`PartitionFollower::poll`]), does it (a request to the
//! leader, a cut or an append to the log), and reports how that went
//! (`on_*`). The broker drives it from one async task per partition; the
//! simulation drives it with messages on a virtual clock.

use crate::{Epoch, EpochHistory, NodeId, Offset, TruncationStep, truncation_step};

/// A warning is due at the first failure in a row and every this many after
/// it: a leader that stays unreachable is reported, not repeated every
/// retry.
pub const FAILURES_PER_WARNING: u32 = 50;

/// A request to the leader. Exactly one is outstanding at a time; its answer
/// (or its failure) is reported before anything else happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Where does `epoch` end in the leader's log (Kafka's
    /// OffsetsForLeaderEpoch)? Answer with [`PartitionFollower::on_epoch_answer`].
    AskEpoch { epoch: Epoch },
    /// The leader's batches from `offset`, and its high watermark. Answer
    /// with [`PartitionFollower::on_fetch_answer`].
    Fetch { offset: Offset },
}

/// One batch of the leader's log, as a fetch returned it. `data` is whatever
/// the owner appends (the batch's bytes in the broker).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch<B> {
    pub base_offset: Offset,
    /// One past the batch's last offset.
    pub end_offset: Offset,
    /// The leader epoch the batch was written in.
    pub epoch: Epoch,
    pub data: B,
}

/// A batch to append, as [`Action::Append`] hands it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendBatch<B> {
    pub batch: Batch<B>,
    /// The batch carries an epoch newer than any this replica holds: record
    /// `(batch.epoch, batch.base_offset)` in the [`EpochHistory`] (durably)
    /// before appending it.
    pub starts_epoch: bool,
}

/// The leader's answer to [`Request::Fetch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchAnswer<B> {
    /// Batches from the fetch offset (possibly none), in offset order.
    Batches { batches: Vec<Batch<B>>, high_watermark: Offset },
    /// The fetch offset is outside the leader's log, which starts at
    /// `leader_log_start`.
    OffsetOutOfRange { leader_log_start: Offset },
}

/// Why a request, or an action, failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The leader's log does not hold the fetch offset: this replica's log
    /// no longer matches it.
    #[error("the fetch offset is outside the leader's log")]
    OffsetOutOfRange,
    /// The leader is in a newer epoch than this follower.
    #[error("the leader is in a newer leader epoch")]
    FencedLeaderEpoch,
    /// The leader sent a batch that does not continue this replica's log.
    #[error("the leader sent a batch at offset {base_offset} for a log ending at {log_end}")]
    BatchOutOfPlace { base_offset: Offset, log_end: Offset },
    /// Anything else: the leader unreachable or not leading, a timeout, a
    /// storage error, a corrupt answer.
    #[error("the request or the write failed")]
    Other,
}

impl Failure {
    /// Whether this replica's log must be reconciled with the leader again
    /// before it fetches.
    fn reconciles(&self) -> bool {
        !matches!(self, Failure::Other)
    }
}

/// What a failure led to: nothing happens before `at_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    pub at_ms: u64,
    /// Failures in a row, this one included.
    pub failures: u32,
    /// Log this failure as a warning (the first in a row, then every
    /// [`FAILURES_PER_WARNING`]th).
    pub warn: bool,
    pub cause: Failure,
}

/// What the owner does next. Each action but the last three is reported
/// back when done: a [`Action::Send`] by its answer or
/// [`PartitionFollower::on_error`], a change to the log by
/// [`PartitionFollower::on_applied`] or [`PartitionFollower::on_error`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action<B> {
    /// Send this request to the leader.
    Send(Request),
    /// Cut the log at `offset` (keep what is below it; nothing if it ends
    /// there already), forget the epochs that start at or past the new end
    /// and lower the high watermark to it.
    TruncateTo { offset: Offset },
    /// The leader's log starts past this replica's end (retention removed
    /// what it would fetch): empty the log so that it starts at `offset`
    /// and clear the epoch history.
    StartOver { offset: Offset },
    /// Append these batches as they are (offsets and epochs kept), in
    /// order, then flush them: the next fetch offset is a durable promise.
    Append { batches: Vec<AppendBatch<B>> },
    /// The high watermark is now `offset`. Nothing to report back.
    SetHighWatermark { offset: Offset },
    /// Back off after a failure: poll again at `at_ms`.
    WaitUntil { at_ms: u64 },
    /// The last action's outcome is not reported yet: nothing to do.
    AwaitOutcome,
}

#[derive(Debug, Clone)]
enum Phase<B> {
    /// Reconciling: ask about this epoch next; `None` starts over from the
    /// latest epoch of the history (none at all: nothing to reconcile).
    Reconcile(Option<Epoch>),
    Asking(Epoch),
    Truncate(Offset),
    Truncating,
    /// Reconciled: fetch from the log end.
    Copy,
    Fetching(Offset),
    StartOver(Offset),
    StartingOver,
    /// Batches to append, then the leader's high watermark to take.
    Append(Vec<AppendBatch<B>>, Offset),
    Appending(Offset),
    Publish(Offset),
}

/// The follower of one partition, for one leader in one leader epoch: a new
/// leader or epoch is a new `PartitionFollower`.
///
/// It first reconciles the log (KIP-101/279): it asks the leader where its
/// latest epoch ends and follows [`truncation_step`] until it knows where
/// the logs stop agreeing, and has the log cut there. Then it copies: it
/// fetches from the log end, has the batches appended only when they
/// continue the log, and takes the leader's high watermark bounded by the
/// log end. A fetch offset outside the leader's log or a newer leader epoch
/// sends it back to reconciling; a leader whose log starts past this
/// replica's end makes it start over there; any failure pauses it for the
/// retry backoff.
///
/// Time is milliseconds on any monotonic clock (`now_ms`), the owner's.
#[derive(Debug, Clone)]
pub struct PartitionFollower<B> {
    leader: NodeId,
    epoch: Epoch,
    retry_backoff_ms: u64,
    phase: Phase<B>,
    /// Failures since the last step that went through.
    failures: u32,
    retry_at_ms: Option<u64>,
}

impl<B> PartitionFollower<B> {
    /// Follows `leader` in `epoch`, pausing `retry_backoff_ms` after each
    /// failure. It starts by reconciling the log.
    pub fn new(leader: NodeId, epoch: Epoch, retry_backoff_ms: u64) -> Self {
        PartitionFollower {
            leader,
            epoch,
            retry_backoff_ms,
            phase: Phase::Reconcile(None),
            failures: 0,
            retry_at_ms: None,
        }
    }

    pub fn leader(&self) -> NodeId {
        self.leader
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Whether the log is reconciled with the leader (copying).
    pub fn is_reconciled(&self) -> bool {
        !matches!(self.phase, Phase::Reconcile(_) | Phase::Asking(_) | Phase::Truncate(_) | Phase::Truncating)
    }

    /// The request whose answer is awaited, if any.
    pub fn outstanding(&self) -> Option<Request> {
        match self.phase {
            Phase::Asking(epoch) => Some(Request::AskEpoch { epoch }),
            Phase::Fetching(offset) => Some(Request::Fetch { offset }),
            _ => None,
        }
    }

    /// What to do at `now_ms`, for a log ending at `log_end` (the next
    /// offset it would append) with epoch history `history`.
    pub fn poll(&mut self, now_ms: u64, log_end: Offset, history: &EpochHistory) -> Action<B> {
        if let Some(at_ms) = self.retry_at_ms {
            if now_ms < at_ms {
                return Action::WaitUntil { at_ms };
            }
            self.retry_at_ms = None;
        }
        match std::mem::replace(&mut self.phase, Phase::Copy) {
            Phase::Reconcile(ask) => match ask.or_else(|| history.latest_epoch()) {
                Some(epoch) => {
                    self.phase = Phase::Asking(epoch);
                    Action::Send(Request::AskEpoch { epoch })
                }
                // No epochs: nothing written here can disagree with the
                // leader.
                None => self.fetch(log_end),
            },
            Phase::Truncate(offset) => {
                self.phase = Phase::Truncating;
                Action::TruncateTo { offset }
            }
            Phase::Copy => self.fetch(log_end),
            Phase::StartOver(offset) => {
                self.phase = Phase::StartingOver;
                Action::StartOver { offset }
            }
            Phase::Append(batches, high_watermark) => {
                self.phase = Phase::Appending(high_watermark);
                Action::Append { batches }
            }
            Phase::Publish(high_watermark) => {
                // Consumers here never read past what this replica holds.
                self.phase = Phase::Copy;
                self.failures = 0;
                Action::SetHighWatermark { offset: high_watermark.min(log_end) }
            }
            waiting @ (Phase::Asking(_)
            | Phase::Truncating
            | Phase::Fetching(_)
            | Phase::StartingOver
            | Phase::Appending(_)) => {
                self.phase = waiting;
                Action::AwaitOutcome
            }
        }
    }

    fn fetch(&mut self, log_end: Offset) -> Action<B> {
        self.phase = Phase::Fetching(log_end);
        Action::Send(Request::Fetch { offset: log_end })
    }

    /// The leader answered [`Request::AskEpoch`] for `asked`: the largest
    /// epoch it knows that is at most `asked`, and where that epoch ends in
    /// its log (`None`: it knows no epoch that old). An answer to anything
    /// but the outstanding request is ignored.
    pub fn on_epoch_answer(
        &mut self,
        asked: Epoch,
        answer: Option<(Epoch, Offset)>,
        log_end: Offset,
        history: &EpochHistory,
    ) {
        if !matches!(self.phase, Phase::Asking(a) if a == asked) {
            return;
        }
        self.phase = match truncation_step(history, log_end, answer) {
            TruncationStep::Ask(older) => Phase::Reconcile(Some(older)),
            TruncationStep::TruncateTo(offset) => Phase::Truncate(offset),
        };
    }

    /// The leader answered [`Request::Fetch`] from `offset`, at `now_ms`, to
    /// a log ending at `log_end` with epoch history `history`. An answer to
    /// anything but the outstanding request is ignored. Batches that do not
    /// continue the log are refused, all of them: that is a failure
    /// (`Err`), and the log is reconciled again.
    pub fn on_fetch_answer(
        &mut self,
        now_ms: u64,
        offset: Offset,
        answer: FetchAnswer<B>,
        log_end: Offset,
        history: &EpochHistory,
    ) -> Result<(), Retry> {
        if !matches!(self.phase, Phase::Fetching(o) if o == offset) {
            return Ok(());
        }
        let (batches, high_watermark) = match answer {
            FetchAnswer::OffsetOutOfRange { leader_log_start } if leader_log_start > log_end => {
                self.phase = Phase::StartOver(leader_log_start);
                return Ok(());
            }
            FetchAnswer::OffsetOutOfRange { .. } => return Err(self.on_error(now_ms, Failure::OffsetOutOfRange)),
            FetchAnswer::Batches { batches, high_watermark } => (batches, high_watermark),
        };
        let mut end = log_end;
        let mut latest = history.latest_epoch();
        let mut appends = Vec::with_capacity(batches.len());
        for batch in batches {
            // A batch may start past the end: the leader's log is compacted
            // and the batches between were removed. Never before it.
            if batch.base_offset < end || batch.end_offset <= batch.base_offset {
                let cause = Failure::BatchOutOfPlace { base_offset: batch.base_offset, log_end: end };
                return Err(self.on_error(now_ms, cause));
            }
            end = batch.end_offset;
            let starts_epoch = latest.is_none_or(|e| e < batch.epoch);
            if starts_epoch {
                latest = Some(batch.epoch);
            }
            appends.push(AppendBatch { batch, starts_epoch });
        }
        self.phase =
            if appends.is_empty() { Phase::Publish(high_watermark) } else { Phase::Append(appends, high_watermark) };
        Ok(())
    }

    /// The log change last handed out ([`Action::TruncateTo`],
    /// [`Action::StartOver`], [`Action::Append`]) is done.
    pub fn on_applied(&mut self) {
        match self.phase {
            // Reconciled, or started over: copy from the log end.
            Phase::Truncating | Phase::StartingOver => {
                self.phase = Phase::Copy;
                self.failures = 0;
            }
            Phase::Appending(high_watermark) => self.phase = Phase::Publish(high_watermark),
            _ => {}
        }
    }

    /// The outstanding request or log change failed at `now_ms`. After a
    /// backoff the follower tries again: from reconciling if it was
    /// reconciling or if `failure` says the logs may disagree, else from a
    /// fetch at the log end.
    pub fn on_error(&mut self, now_ms: u64, failure: Failure) -> Retry {
        self.failures = self.failures.saturating_add(1);
        let at_ms = now_ms.saturating_add(self.retry_backoff_ms);
        self.retry_at_ms = Some(at_ms);
        self.phase = if failure.reconciles() || !self.is_reconciled() { Phase::Reconcile(None) } else { Phase::Copy };
        Retry { at_ms, failures: self.failures, warn: self.failures % FAILURES_PER_WARNING == 1, cause: failure }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BACKOFF_MS: u64 = 100;

    fn history(entries: &[(Epoch, Offset)]) -> EpochHistory {
        let mut h = EpochHistory::default();
        for (e, o) in entries {
            h.assign(*e, *o);
        }
        h
    }

    fn batch(base_offset: Offset, end_offset: Offset, epoch: Epoch) -> Batch<&'static str> {
        Batch { base_offset, end_offset, epoch, data: "records" }
    }

    fn records(batches: Vec<Batch<&'static str>>, high_watermark: Offset) -> FetchAnswer<&'static str> {
        FetchAnswer::Batches { batches, high_watermark }
    }

    fn follower() -> PartitionFollower<&'static str> {
        PartitionFollower::new(2, 7, BACKOFF_MS)
    }

    /// A follower in copy mode, fetching from `log_end`.
    fn copying(log_end: Offset, h: &EpochHistory) -> PartitionFollower<&'static str> {
        let mut f = follower();
        let latest = h.latest_epoch().unwrap();
        assert_eq!(f.poll(0, log_end, h), Action::Send(Request::AskEpoch { epoch: latest }));
        f.on_epoch_answer(latest, Some((latest, log_end)), log_end, h);
        assert_eq!(f.poll(0, log_end, h), Action::TruncateTo { offset: log_end });
        f.on_applied();
        assert_eq!(f.poll(0, log_end, h), Action::Send(Request::Fetch { offset: log_end }));
        f
    }

    #[test]
    fn reconciles_then_copies() {
        let mut h = history(&[(1, 0)]);
        let mut f = follower();
        assert!(!f.is_reconciled());
        assert_eq!(f.poll(0, 5, &h), Action::Send(Request::AskEpoch { epoch: 1 }));
        assert_eq!(f.poll(1, 5, &h), Action::AwaitOutcome);
        // The leader holds epoch 1 to offset 8: everything here agrees.
        f.on_epoch_answer(1, Some((1, 8)), 5, &h);
        assert_eq!(f.poll(2, 5, &h), Action::TruncateTo { offset: 5 });
        assert_eq!(f.poll(2, 5, &h), Action::AwaitOutcome);
        f.on_applied();
        assert!(f.is_reconciled());
        assert_eq!(f.poll(3, 5, &h), Action::Send(Request::Fetch { offset: 5 }));
        let answer = records(vec![batch(5, 7, 1), batch(7, 8, 7), batch(8, 9, 7)], 8);
        assert_eq!(f.on_fetch_answer(4, 5, answer, 5, &h), Ok(()));
        let Action::Append { batches } = f.poll(4, 5, &h) else { panic!("expected an append") };
        let starts: Vec<_> = batches.iter().map(|a| (a.batch.base_offset, a.starts_epoch)).collect();
        assert_eq!(starts, [(5, false), (7, true), (8, false)]);
        h.assign(7, 7);
        assert_eq!(f.poll(5, 9, &h), Action::AwaitOutcome);
        f.on_applied();
        assert_eq!(f.poll(5, 9, &h), Action::SetHighWatermark { offset: 8 });
        assert_eq!(f.poll(5, 9, &h), Action::Send(Request::Fetch { offset: 9 }));
        // Nothing new; the high watermark never passes this log's end.
        assert_eq!(f.on_fetch_answer(6, 9, records(vec![], 12), 9, &h), Ok(()));
        assert_eq!(f.poll(6, 9, &h), Action::SetHighWatermark { offset: 9 });
        assert_eq!(f.poll(6, 9, &h), Action::Send(Request::Fetch { offset: 9 }));
        assert_eq!(f.failures(), 0);
    }

    #[test]
    fn a_follower_without_epochs_fetches_at_once() {
        let mut f = follower();
        assert_eq!(f.poll(0, 0, &EpochHistory::default()), Action::Send(Request::Fetch { offset: 0 }));
        assert!(f.is_reconciled());
    }

    /// The follower led epoch 2 and wrote 10..15 that nobody copied; the new
    /// leader's epoch 1 ends at 10. Then a second round: epochs unknown to
    /// each other.
    #[test]
    fn truncates_a_diverging_tail() {
        let h = history(&[(1, 0), (2, 10)]);
        let mut f = follower();
        assert_eq!(f.poll(0, 15, &h), Action::Send(Request::AskEpoch { epoch: 2 }));
        f.on_epoch_answer(2, Some((1, 10)), 15, &h);
        assert_eq!(f.poll(1, 15, &h), Action::TruncateTo { offset: 10 });

        let h = history(&[(1, 0), (4, 12)]);
        let mut f = follower();
        assert_eq!(f.poll(0, 20, &h), Action::Send(Request::AskEpoch { epoch: 4 }));
        // The leader's largest epoch at most 4 is 3, unknown here.
        f.on_epoch_answer(4, Some((3, 30)), 20, &h);
        assert_eq!(f.poll(1, 20, &h), Action::Send(Request::AskEpoch { epoch: 1 }));
        // A late answer to the first question changes nothing.
        f.on_epoch_answer(4, Some((3, 30)), 20, &h);
        assert_eq!(f.outstanding(), Some(Request::AskEpoch { epoch: 1 }));
        f.on_epoch_answer(1, Some((1, 10)), 20, &h);
        assert_eq!(f.poll(2, 20, &h), Action::TruncateTo { offset: 10 });

        // A leader that knows no epoch this old: nothing here is kept.
        let h = history(&[(3, 0)]);
        let mut f = follower();
        assert_eq!(f.poll(0, 4, &h), Action::Send(Request::AskEpoch { epoch: 3 }));
        f.on_epoch_answer(3, None, 4, &h);
        assert_eq!(f.poll(1, 4, &h), Action::TruncateTo { offset: 0 });
    }

    #[test]
    fn starts_over_at_a_leader_log_start_past_its_end() {
        let h = history(&[(1, 0)]);
        let mut f = copying(20, &h);
        let answer = FetchAnswer::OffsetOutOfRange { leader_log_start: 100 };
        assert_eq!(f.on_fetch_answer(1, 20, answer, 20, &h), Ok(()));
        assert_eq!(f.poll(1, 20, &h), Action::StartOver { offset: 100 });
        f.on_applied();
        // Still reconciled: the history is empty, the log starts afresh.
        assert_eq!(f.poll(2, 100, &EpochHistory::default()), Action::Send(Request::Fetch { offset: 100 }));
        assert_eq!(f.failures(), 0);

        // Out of range while the leader's log starts below this end: the
        // logs disagree, reconcile again.
        let mut f = copying(20, &h);
        let answer = FetchAnswer::OffsetOutOfRange { leader_log_start: 0 };
        let retry = f.on_fetch_answer(1, 20, answer, 20, &h).unwrap_err();
        assert_eq!(retry.cause, Failure::OffsetOutOfRange);
        assert_eq!(f.poll(1 + BACKOFF_MS, 20, &h), Action::Send(Request::AskEpoch { epoch: 1 }));
    }

    #[test]
    fn backs_off_after_a_failure_and_warns_every_fiftieth() {
        let h = history(&[(1, 0)]);
        let mut f = copying(3, &h);
        let mut now = 10;
        let mut warned = Vec::new();
        for n in 1..=120u32 {
            let retry = f.on_error(now, Failure::Other);
            assert_eq!((retry.failures, retry.at_ms), (n, now + BACKOFF_MS));
            if retry.warn {
                warned.push(n);
            }
            assert_eq!(f.poll(now + BACKOFF_MS - 1, 3, &h), Action::WaitUntil { at_ms: now + BACKOFF_MS });
            now += BACKOFF_MS;
            // Still reconciled: it fetches again from the log end.
            assert_eq!(f.poll(now, 3, &h), Action::Send(Request::Fetch { offset: 3 }));
        }
        assert_eq!(warned, [1, 51, 101]);
        // A fetch that goes through ends the series.
        f.on_fetch_answer(now, 3, records(vec![], 3), 3, &h).unwrap();
        assert_eq!(f.poll(now, 3, &h), Action::SetHighWatermark { offset: 3 });
        assert_eq!(f.failures(), 0);
        assert_eq!(f.poll(now, 3, &h), Action::Send(Request::Fetch { offset: 3 }));
        assert!(f.on_error(now, Failure::Other).warn);

        // A failure while reconciling starts the reconciliation over.
        let mut f = follower();
        assert_eq!(f.poll(0, 3, &h), Action::Send(Request::AskEpoch { epoch: 1 }));
        f.on_epoch_answer(1, Some((1, 3)), 3, &h);
        assert_eq!(f.poll(0, 3, &h), Action::TruncateTo { offset: 3 });
        f.on_error(0, Failure::Other);
        assert_eq!(f.poll(BACKOFF_MS, 3, &h), Action::Send(Request::AskEpoch { epoch: 1 }));
    }

    #[test]
    fn a_fenced_epoch_reconciles_again() {
        let h = history(&[(1, 0), (4, 6)]);
        let mut f = copying(9, &h);
        let retry = f.on_error(50, Failure::FencedLeaderEpoch);
        assert!(retry.warn);
        assert!(!f.is_reconciled());
        assert_eq!(f.poll(50, 9, &h), Action::WaitUntil { at_ms: 150 });
        assert_eq!(f.poll(150, 9, &h), Action::Send(Request::AskEpoch { epoch: 4 }));
    }

    #[test]
    fn refuses_batches_that_do_not_continue_the_log() {
        let h = history(&[(1, 0)]);
        // A batch before the log end.
        let mut f = copying(5, &h);
        let retry = f.on_fetch_answer(1, 5, records(vec![batch(4, 8, 1)], 8), 5, &h).unwrap_err();
        assert_eq!(retry.cause, Failure::BatchOutOfPlace { base_offset: 4, log_end: 5 });
        assert!(!f.is_reconciled());
        assert_eq!(f.poll(1 + BACKOFF_MS, 5, &h), Action::Send(Request::AskEpoch { epoch: 1 }));

        // An overlap after a good batch: nothing of the answer is appended.
        let mut f = copying(5, &h);
        let answer = records(vec![batch(5, 7, 1), batch(6, 9, 1)], 9);
        let retry = f.on_fetch_answer(1, 5, answer, 5, &h).unwrap_err();
        assert_eq!(retry.cause, Failure::BatchOutOfPlace { base_offset: 6, log_end: 7 });
        assert_eq!(f.poll(1, 5, &h), Action::WaitUntil { at_ms: 1 + BACKOFF_MS });

        // Holes (a compacted leader's) are fine.
        let mut f = copying(5, &h);
        let answer = records(vec![batch(6, 7, 1), batch(9, 12, 1)], 12);
        f.on_fetch_answer(1, 5, answer, 5, &h).unwrap();

        // An answer to an older fetch is ignored.
        let mut f = copying(5, &h);
        assert_eq!(f.on_fetch_answer(1, 4, records(vec![batch(4, 5, 1)], 5), 5, &h), Ok(()));
        assert_eq!(f.outstanding(), Some(Request::Fetch { offset: 5 }));
        assert_eq!(f.poll(1, 5, &h), Action::AwaitOutcome);
    }
}
