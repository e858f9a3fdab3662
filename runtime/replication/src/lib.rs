//! The decision logic of partition replication, in plain types: no sockets,
//! clocks or threads. The async layer feeds in what happened (an append, a
//! follower's fetch, a leader's answer, the time, a committed ISR) and acts
//! on what comes out (a new high watermark, an ISR change to commit, a
//! request to send, where to truncate, what to append, whom to elect). That
//! keeps every rule testable deterministically (`tests/simulation.rs` drives
//! the same types as the broker through seeded message loss, delay,
//! reordering and crashes, with a checker).
//!
//! - [`PartitionLeader`]: a leader's view of its followers, the ISR and the
//!   high watermark.
//! - [`PartitionFollower`]: a follower of one leader in one epoch. Its owner
//!   loops: [`PartitionFollower::poll`] says what to do next ([`Action`]: a
//!   [`Request`] to send, a truncation, a fresh start, batches to append, a
//!   high watermark to take, a backoff), the owner does it and reports the
//!   outcome (`on_epoch_answer`, `on_fetch_answer`, `on_applied`,
//!   `on_error`). Time comes in as `now_ms`, milliseconds on the owner's
//!   monotonic clock.
//!
//! The model is Kafka's, with the lessons of its bug history built in:
//! - The high watermark is the offset the whole ISR holds; consumers never
//!   read past it, and `acks=all` is answered when it passes the batch.
//! - Every batch carries the leader epoch it was written in. A follower
//!   truncates by asking the leader for the end offset of its latest epoch
//!   ([`truncation_step`]), never to its own high watermark (KIP-101/279).
//! - An ISR shrink takes effect only once the controller committed it
//!   (KIP-497): until then the leader computes the high watermark with the
//!   larger set, so a replica the controller may still elect never misses an
//!   acknowledged record.
//! - Leaders are elected from the ISR; unclean election (from outside it)
//!   only when the topic allows it, and it is reported as such.

#![forbid(unsafe_code)]

mod epochs;
mod follower;
mod leader;

pub use epochs::{EpochHistory, TruncationStep, truncation_step};
pub use follower::{
    Action, AppendBatch, Batch, FAILURES_PER_WARNING, Failure, FetchAnswer, PartitionFollower, Request, Retry,
};
pub use leader::{FetchOutcome, LeaderConfig, NotEnoughReplicas, PartitionLeader};

/// A broker's node id.
pub type NodeId = u32;
/// A record offset in a partition.
pub type Offset = i64;
/// A leader epoch: bumped by the controller on every leader change.
pub type Epoch = i32;

/// What [`elect_leader`] chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Election {
    /// A live member of the ISR (the first in replica order: the preferred
    /// replica when it is eligible).
    Clean(NodeId),
    /// No live ISR member: a live replica outside the ISR, allowed by the
    /// topic's `unclean.leader.election`. Acknowledged records may be lost.
    Unclean(NodeId),
    /// No eligible replica: the partition is offline.
    Offline,
}

/// Chooses a partition leader among `replicas` (in assignment order, the
/// first being the preferred leader).
pub fn elect_leader(
    replicas: &[NodeId],
    isr: &[NodeId],
    is_live: impl Fn(NodeId) -> bool,
    unclean_allowed: bool,
) -> Election {
    if let Some(&n) = replicas.iter().find(|n| isr.contains(n) && is_live(**n)) {
        return Election::Clean(n);
    }
    if unclean_allowed && let Some(&n) = replicas.iter().find(|n| is_live(**n)) {
        return Election::Unclean(n);
    }
    Election::Offline
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn election_prefers_the_first_live_isr_member() {
        let live = |n: NodeId| n != 1;
        assert_eq!(elect_leader(&[1, 2, 3], &[1, 2, 3], live, false), Election::Clean(2));
        assert_eq!(elect_leader(&[1, 2, 3], &[3, 1], live, false), Election::Clean(3));
        assert_eq!(elect_leader(&[1, 2, 3], &[1], live, false), Election::Offline);
        assert_eq!(elect_leader(&[1, 2, 3], &[1], live, true), Election::Unclean(2));
        assert_eq!(elect_leader(&[1, 2, 3], &[1, 2, 3], |_| true, false), Election::Clean(1));
    }
}
