//! A partition's leader: followers' progress, the ISR and the high
//! watermark.

use std::collections::{BTreeMap, BTreeSet};

use crate::{Epoch, NodeId, Offset};

/// Replication settings of a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaderConfig {
    /// A follower that has not been caught up for this long leaves the ISR
    /// (`replica.lag.time.max.ms`).
    pub lag_time_max_ms: u64,
    /// `acks=all` writes are refused while the ISR is smaller
    /// (`min.insync.replicas`).
    pub min_insync_replicas: usize,
}

impl Default for LeaderConfig {
    fn default() -> Self {
        LeaderConfig { lag_time_max_ms: 30_000, min_insync_replicas: 1 }
    }
}

/// An `acks=all` write refused because too few replicas are in sync.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not enough in-sync replicas: {isr} in sync, min.insync.replicas is {min}")]
pub struct NotEnoughReplicas {
    pub isr: usize,
    pub min: usize,
}

#[derive(Debug, Clone, Copy)]
struct Follower {
    /// The follower's log end, as its last fetch said.
    log_end: Offset,
    /// When it last held everything the leader had (Kafka's
    /// `lastCaughtUpTimeMs`).
    caught_up_ms: u64,
    /// The leader's log end and the time at the follower's last fetch.
    last_fetch: Option<(Offset, u64)>,
}

/// What a follower's fetch changed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FetchOutcome {
    /// The high watermark moved here.
    pub high_watermark: Option<Offset>,
    /// The follower caught up: propose this ISR (with it) to the controller.
    pub propose_isr: Option<BTreeSet<NodeId>>,
}

/// The leader's view of one partition. Its owner appends to the log, tells
/// it about appends and fetches, and commits the ISR changes it proposes
/// through the controller before calling [`PartitionLeader::apply_isr`].
#[derive(Debug, Clone)]
pub struct PartitionLeader {
    id: NodeId,
    epoch: Epoch,
    config: LeaderConfig,
    /// The ISR the controller committed.
    isr: BTreeSet<NodeId>,
    /// An ISR proposed and not yet committed.
    pending_isr: Option<BTreeSet<NodeId>>,
    followers: BTreeMap<NodeId, Follower>,
    log_end: Offset,
    high_watermark: Offset,
}

impl PartitionLeader {
    /// Becomes leader `id` in `epoch` of a partition assigned to `replicas`,
    /// with the committed `isr` and an empty log (see
    /// [`PartitionLeader::with_log`]).
    pub fn new(
        id: NodeId,
        epoch: Epoch,
        replicas: &[NodeId],
        isr: impl IntoIterator<Item = NodeId>,
        config: LeaderConfig,
        now_ms: u64,
    ) -> Self {
        let followers = replicas
            .iter()
            .filter(|n| **n != id)
            .map(|n| (*n, Follower { log_end: 0, caught_up_ms: now_ms, last_fetch: None }))
            .collect();
        let mut isr: BTreeSet<NodeId> = isr.into_iter().collect();
        isr.insert(id);
        PartitionLeader { id, epoch, config, isr, pending_isr: None, followers, log_end: 0, high_watermark: 0 }
    }

    /// The leader's own (flushed) log end and the high watermark it knew:
    /// it only moves forward from there.
    pub fn with_log(mut self, log_end: Offset, high_watermark: Offset) -> Self {
        self.log_end = log_end;
        self.high_watermark = high_watermark.min(log_end);
        self
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    pub fn high_watermark(&self) -> Offset {
        self.high_watermark
    }

    pub fn log_end(&self) -> Offset {
        self.log_end
    }

    /// The committed ISR.
    pub fn isr(&self) -> &BTreeSet<NodeId> {
        &self.isr
    }

    /// Whether an `acks=all` write may be appended now.
    pub fn check_acks_all(&self) -> Result<(), NotEnoughReplicas> {
        let isr = self.isr.len().min(self.pending_isr.as_ref().map_or(usize::MAX, BTreeSet::len));
        if isr < self.config.min_insync_replicas {
            return Err(NotEnoughReplicas { isr, min: self.config.min_insync_replicas });
        }
        Ok(())
    }

    /// The leader appended up to `log_end` (exclusive). Returns the new high
    /// watermark if it moved (an ISR of one).
    pub fn on_append(&mut self, log_end: Offset) -> Option<Offset> {
        self.log_end = self.log_end.max(log_end);
        self.advance_high_watermark()
    }

    /// A follower fetched from `fetch_offset`: it holds everything below it.
    /// Fetches from unknown replicas or past the log end are ignored (the
    /// caller answers them with an error).
    pub fn on_fetch(&mut self, follower: NodeId, fetch_offset: Offset, now_ms: u64) -> FetchOutcome {
        let log_end = self.log_end;
        let Some(f) = self.followers.get_mut(&follower) else { return FetchOutcome::default() };
        if fetch_offset > log_end {
            return FetchOutcome::default();
        }
        f.log_end = fetch_offset;
        if fetch_offset >= log_end {
            f.caught_up_ms = now_ms;
        } else if let Some((leader_end, at)) = f.last_fetch
            && fetch_offset >= leader_end
        {
            f.caught_up_ms = f.caught_up_ms.max(at);
        }
        f.last_fetch = Some((log_end, now_ms));
        let mut outcome = FetchOutcome { high_watermark: None, propose_isr: None };
        // A follower rejoins once it holds everything acknowledged.
        let current = self.pending_isr.as_ref().unwrap_or(&self.isr);
        if !current.contains(&follower) && fetch_offset >= self.high_watermark {
            let mut isr = current.clone();
            isr.insert(follower);
            self.pending_isr = Some(isr.clone());
            outcome.propose_isr = Some(isr);
        }
        outcome.high_watermark = self.advance_high_watermark();
        outcome
    }

    /// Followers of the ISR that have not caught up for `lag_time_max_ms`:
    /// returns the smaller ISR to propose, if any.
    pub fn tick(&mut self, now_ms: u64) -> Option<BTreeSet<NodeId>> {
        let current = self.pending_isr.as_ref().unwrap_or(&self.isr);
        let lagging: Vec<NodeId> = current
            .iter()
            .filter(|n| **n != self.id)
            .filter(|n| {
                self.followers
                    .get(n)
                    .is_some_and(|f| now_ms.saturating_sub(f.caught_up_ms) > self.config.lag_time_max_ms)
            })
            .copied()
            .collect();
        if lagging.is_empty() {
            return None;
        }
        let isr: BTreeSet<NodeId> = current.iter().filter(|n| !lagging.contains(n)).copied().collect();
        self.pending_isr = Some(isr.clone());
        Some(isr)
    }

    /// The partition's replicas changed (a reassignment): new followers are
    /// tracked from `now_ms` with nothing fetched yet, removed ones are
    /// forgotten.
    pub fn set_replicas(&mut self, replicas: &[NodeId], now_ms: u64) {
        self.followers.retain(|n, _| replicas.contains(n));
        for n in replicas.iter().filter(|n| **n != self.id) {
            self.followers.entry(*n).or_insert(Follower { log_end: 0, caught_up_ms: now_ms, last_fetch: None });
        }
    }

    /// Whether `replicas` are exactly the replicas this leader tracks.
    pub fn has_replicas(&self, replicas: &[NodeId]) -> bool {
        let mine = self.followers.len() + 1;
        mine == replicas.len() && replicas.iter().all(|n| *n == self.id || self.followers.contains_key(n))
    }

    /// The ISR proposed and not yet committed, if any.
    pub fn pending_isr(&self) -> Option<&BTreeSet<NodeId>> {
        self.pending_isr.as_ref()
    }

    /// The controller refused the pending proposal (or it was lost): forget
    /// it, so the next fetch or tick proposes again from the committed ISR.
    pub fn abandon_proposal(&mut self) {
        self.pending_isr = None;
    }

    /// The controller committed `isr` (the proposal, or its own change such
    /// as fencing a dead broker). Returns the new high watermark if it moved.
    pub fn apply_isr(&mut self, isr: BTreeSet<NodeId>) -> Option<Offset> {
        if self.pending_isr.as_ref() == Some(&isr) {
            self.pending_isr = None;
        }
        self.isr = isr;
        self.isr.insert(self.id);
        self.advance_high_watermark()
    }

    /// The high watermark is the smallest log end over the ISR, taking the
    /// larger of the committed and proposed sets (so an uncommitted shrink
    /// never lets it pass a replica the controller may still elect).
    fn advance_high_watermark(&mut self) -> Option<Offset> {
        let mut members: BTreeSet<NodeId> = self.isr.clone();
        if let Some(p) = &self.pending_isr {
            members.extend(p);
        }
        let min = members
            .iter()
            .map(|n| if *n == self.id { self.log_end } else { self.followers.get(n).map_or(0, |f| f.log_end) })
            .min()
            .unwrap_or(self.log_end);
        if min > self.high_watermark {
            self.high_watermark = min;
            Some(min)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leader(isr: &[NodeId], min_isr: usize) -> PartitionLeader {
        let config = LeaderConfig { lag_time_max_ms: 100, min_insync_replicas: min_isr };
        PartitionLeader::new(1, 5, &[1, 2, 3], isr.iter().copied(), config, 0)
    }

    #[test]
    fn high_watermark_waits_for_the_whole_isr() {
        let mut l = leader(&[1, 2, 3], 2);
        assert_eq!(l.on_append(10), None);
        assert_eq!(l.on_fetch(2, 10, 1).high_watermark, None);
        assert_eq!(l.on_fetch(3, 7, 1).high_watermark, Some(7));
        assert_eq!(l.on_fetch(3, 10, 2).high_watermark, Some(10));
        // Never backwards.
        assert_eq!(l.on_fetch(3, 4, 3).high_watermark, None);
        assert_eq!(l.high_watermark(), 10);
    }

    #[test]
    fn a_lagging_follower_leaves_only_once_the_shrink_is_committed() {
        let mut l = leader(&[1, 2, 3], 2);
        l.on_append(10);
        l.on_fetch(2, 10, 50);
        l.on_fetch(3, 3, 50);
        assert_eq!(l.high_watermark(), 3);
        let proposed = l.tick(140).expect("follower 3 lags");
        assert_eq!(proposed, BTreeSet::from([1, 2]));
        assert_eq!(l.on_fetch(2, 10, 141).high_watermark, None, "not before the controller commits");
        assert_eq!(l.apply_isr(proposed), Some(10));
        assert_eq!(l.check_acks_all(), Ok(()));
        // Follower 2 stops too: one in sync is below min.insync.replicas.
        let proposed = l.tick(400).unwrap();
        l.apply_isr(proposed);
        assert_eq!(l.check_acks_all(), Err(NotEnoughReplicas { isr: 1, min: 2 }));
        assert_eq!(l.on_append(12), Some(12));
    }

    #[test]
    fn a_follower_rejoins_when_it_holds_the_high_watermark() {
        let mut l = leader(&[1], 1);
        l.on_append(10);
        assert_eq!(l.high_watermark(), 10);
        assert_eq!(l.on_fetch(2, 5, 1).propose_isr, None);
        let proposed = l.on_fetch(2, 10, 2).propose_isr.expect("caught up");
        assert_eq!(proposed, BTreeSet::from([1, 2]));
        // Pending expansion counts for the high watermark at once.
        l.on_append(20);
        assert_eq!(l.high_watermark(), 10);
        l.apply_isr(proposed);
        assert_eq!(l.on_fetch(2, 20, 3).high_watermark, Some(20));
    }

    #[test]
    fn a_follower_that_fetches_steadily_behind_an_active_leader_stays_in_sync() {
        let mut l = leader(&[1, 2], 1);
        let mut end = 0;
        for t in 0..100u64 {
            // The leader appends before every fetch, so the follower is
            // never at the end, but always holds what the leader had at its
            // previous fetch.
            end += 5;
            l.on_append(end);
            l.on_fetch(2, end - 5, t * 10);
            assert_eq!(l.tick(t * 10 + 5), None, "at {t}");
        }
        // Once it stops fetching, it lags.
        assert_eq!(l.tick(2000), Some(BTreeSet::from([1])));
    }
}
