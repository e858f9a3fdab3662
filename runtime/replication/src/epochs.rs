//! Leader epochs and follower truncation.

use crate::{Epoch, Offset};

/// Which leader epoch each part of a log was written in: `(epoch, first
/// offset)` entries with increasing epochs and non-decreasing offsets (Kafka's
/// leader-epoch checkpoint). Rebuilt from the batches' epochs on recovery.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EpochHistory {
    entries: Vec<(Epoch, Offset)>,
}

impl EpochHistory {
    /// Records that `epoch` starts at `start` (a leader's first append in
    /// it, or a follower copying the first batch of it). Older or equal
    /// epochs are ignored: the history only moves forward.
    pub fn assign(&mut self, epoch: Epoch, start: Offset) {
        match self.entries.last() {
            Some(&(e, _)) if e >= epoch => {}
            _ => self.entries.push((epoch, start)),
        }
    }

    pub fn latest_epoch(&self) -> Option<Epoch> {
        self.entries.last().map(|(e, _)| *e)
    }

    pub fn entries(&self) -> &[(Epoch, Offset)] {
        &self.entries
    }

    /// The leader's answer to "where does epoch `epoch` end?" (Kafka's
    /// OffsetsForLeaderEpoch): the largest epoch known that is at most
    /// `epoch`, and the offset where the log moves past it (the start of the
    /// next epoch, or `log_end` for the latest). `None` when every known
    /// epoch is larger: then the asker keeps nothing of its log.
    pub fn end_offset_for(&self, epoch: Epoch, log_end: Offset) -> Option<(Epoch, Offset)> {
        let i = self.entries.iter().rposition(|(e, _)| *e <= epoch)?;
        let end = self.entries.get(i + 1).map_or(log_end, |(_, start)| *start);
        Some((self.entries[i].0, end.min(log_end)))
    }

    /// Forgets epochs that start at or after `end` (the log was truncated
    /// there).
    pub fn truncate(&mut self, end: Offset) {
        self.entries.retain(|(_, start)| *start < end);
    }
}

/// What a follower does next while reconciling its log with a new leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TruncationStep {
    /// Ask the leader where this epoch ends.
    Ask(Epoch),
    /// Cut the log here (keep offsets below it), then fetch from it.
    TruncateTo(Offset),
}

/// One step of a follower's truncation (KIP-279). Start with
/// `Ask(follower.latest_epoch())`; feed each leader answer back with the
/// epoch that was asked. Every `Ask` names a smaller epoch than the last, so
/// this ends. A follower with no epochs has nothing to reconcile.
pub fn truncation_step(
    follower: &EpochHistory,
    follower_log_end: Offset,
    answer: Option<(Epoch, Offset)>,
) -> TruncationStep {
    let Some((leader_epoch, leader_end)) = answer else {
        // The leader knows no epoch this old: nothing here can be trusted.
        return TruncationStep::TruncateTo(0);
    };
    match follower.end_offset_for(leader_epoch, follower_log_end) {
        // Same epoch on both sides: they agree up to where either moved on.
        Some((e, end)) if e == leader_epoch => TruncationStep::TruncateTo(end.min(leader_end)),
        // The follower never saw the leader's epoch: its older epoch must be
        // checked with the leader in turn.
        Some((e, _)) => TruncationStep::Ask(e),
        None => TruncationStep::TruncateTo(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(entries: &[(Epoch, Offset)]) -> EpochHistory {
        let mut h = EpochHistory::default();
        for (e, o) in entries {
            h.assign(*e, *o);
        }
        h
    }

    #[test]
    fn end_offsets_per_epoch() {
        let h = history(&[(1, 0), (3, 10), (4, 25)]);
        assert_eq!(h.end_offset_for(0, 40), None);
        assert_eq!(h.end_offset_for(1, 40), Some((1, 10)));
        assert_eq!(h.end_offset_for(2, 40), Some((1, 10)));
        assert_eq!(h.end_offset_for(3, 40), Some((3, 25)));
        assert_eq!(h.end_offset_for(9, 40), Some((4, 40)));
        let mut t = h.clone();
        t.truncate(25);
        assert_eq!(t.entries(), &[(1, 0), (3, 10)]);
    }

    /// The classic divergence: the old leader wrote offsets 10..15 in epoch
    /// 2 that never reached the follower which became leader in epoch 3.
    #[test]
    fn a_deposed_leader_truncates_its_unreplicated_tail() {
        let new_leader = history(&[(1, 0), (3, 10)]);
        let old_leader = history(&[(1, 0), (2, 10)]);
        let asked = old_leader.latest_epoch().unwrap();
        let answer = new_leader.end_offset_for(asked, 30);
        assert_eq!(answer, Some((1, 10)));
        assert_eq!(truncation_step(&old_leader, 15, answer), TruncationStep::TruncateTo(10));
    }

    /// The follower's latest epoch is unknown to the leader and the epoch the
    /// leader answers with is unknown to the follower: it asks again with an
    /// older one, and they meet where the logs diverge.
    #[test]
    fn epochs_unknown_to_each_other_take_another_round() {
        let leader = history(&[(1, 0), (3, 10)]);
        let follower = history(&[(1, 0), (4, 12)]);
        let answer = leader.end_offset_for(follower.latest_epoch().unwrap(), 30);
        assert_eq!(answer, Some((3, 30)));
        assert_eq!(truncation_step(&follower, 20, answer), TruncationStep::Ask(1));
        let answer = leader.end_offset_for(1, 30);
        assert_eq!(truncation_step(&follower, 20, answer), TruncationStep::TruncateTo(10));
    }

    /// A follower that is merely behind keeps everything it has.
    #[test]
    fn a_lagging_follower_keeps_its_log() {
        let leader = history(&[(1, 0), (2, 10)]);
        let follower = history(&[(1, 0), (2, 10)]);
        let answer = leader.end_offset_for(2, 50);
        assert_eq!(truncation_step(&follower, 12, answer), TruncationStep::TruncateTo(12));
    }
}
