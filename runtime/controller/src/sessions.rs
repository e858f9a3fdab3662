//! Broker liveness as the controller leader judges it, without I/O or
//! clocks: heartbeats and ticks come in with the time they happened, the
//! brokers to fence come out. [`Controller`](crate::Controller) feeds it from
//! its heartbeat handler and liveness loop and writes the fencing commands.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::NodeId;

/// One incarnation of a broker, as last heard.
#[derive(Debug, Clone, Copy)]
struct Session {
    incarnation: u64,
    /// When this incarnation was last heard from, or (for a broker a new
    /// leader has not heard yet) when the leader took over: every live
    /// session holds its node id until it expires.
    last: Instant,
}

#[derive(Debug)]
pub(crate) struct SessionTracker {
    session_timeout: Duration,
    /// Leader only: node → its session.
    seen: HashMap<NodeId, Session>,
    was_leader: bool,
    /// The Raft leader whose appends this node received last, and when: a
    /// leader's appends show its process alive as well as its heartbeats
    /// do. A new leader starts its predecessor's session from there, so a
    /// dead controller leader is fenced one session after it went silent,
    /// not one session after the election.
    heard_leader: Option<(NodeId, Instant)>,
}

impl SessionTracker {
    pub(crate) fn new(session_timeout: Duration) -> SessionTracker {
        SessionTracker { session_timeout, seen: HashMap::new(), was_leader: false, heard_leader: None }
    }

    /// The Raft leader `leader`'s appends reached this node at `now`.
    pub(crate) fn heard_leader(&mut self, leader: NodeId, now: Instant) {
        self.heard_leader = Some((leader, now));
    }

    /// Whether a registration of `node` as `incarnation` at `now` must be
    /// refused: another incarnation's session still holds the id.
    pub(crate) fn id_taken(&self, node: NodeId, incarnation: u64, now: Instant) -> bool {
        self.seen.get(&node).is_some_and(|other| {
            other.incarnation != incarnation && now.duration_since(other.last) < self.session_timeout
        })
    }

    /// The leader accepted a registration or heartbeat of `node`'s
    /// `incarnation` at `now`.
    pub(crate) fn alive(&mut self, node: NodeId, incarnation: u64, now: Instant) {
        self.seen.insert(node, Session { incarnation, last: now });
    }

    /// One tick of the liveness check at `now` on node `me`, `leading` or
    /// not, with the image's unfenced brokers (node, incarnation): the
    /// brokers whose session expired, to fence. A node that is not leading
    /// judges nobody; one that just became leader first gives every broker
    /// a full session, counted from when it last heard of it if it knows
    /// (its predecessor, whose appends stopped at least an election ago if
    /// it died — unless this node lost touch with it long before, which
    /// says nothing of it now).
    pub(crate) fn expired(
        &mut self,
        now: Instant,
        me: NodeId,
        leading: bool,
        unfenced: impl Iterator<Item = (NodeId, u64)> + Clone,
    ) -> Vec<NodeId> {
        if !leading {
            self.was_leader = false;
            return Vec::new();
        }
        if !self.was_leader {
            self.was_leader = true;
            let heard = self
                .heard_leader
                .filter(|(node, at)| *node != me && now.duration_since(*at) < self.session_timeout * 3);
            self.seen = unfenced
                .clone()
                .map(|(node, incarnation)| {
                    let last = match heard {
                        Some((leader, at)) if leader == node => at,
                        _ => now,
                    };
                    (node, Session { incarnation, last })
                })
                .collect();
        }
        let mut expired = Vec::new();
        for (node, incarnation) in unfenced {
            match self.seen.get(&node) {
                Some(session) if now.duration_since(session.last) > self.session_timeout => expired.push(node),
                Some(_) => {}
                None => self.alive(node, incarnation, now),
            }
        }
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SESSION: Duration = Duration::from_millis(1500);

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn a_silent_broker_is_fenced_one_session_after_it_was_last_heard() {
        let t0 = Instant::now();
        let mut tracker = SessionTracker::new(SESSION);
        let brokers = [(1, 10), (2, 20), (3, 30)];
        assert!(tracker.expired(t0, 1, true, brokers.iter().copied()).is_empty(), "a new leader judges nobody yet");
        for t in (200..=1400).step_by(200) {
            tracker.alive(2, 20, ms(t0, t));
            tracker.alive(3, 30, ms(t0, t));
            assert!(tracker.expired(ms(t0, t), 1, true, brokers.iter().copied()).is_empty());
        }
        // Node 1 (the leader itself) sends no heartbeat in this test; 3
        // stops at 1.4 s.
        tracker.alive(2, 20, ms(t0, 1600));
        assert_eq!(tracker.expired(ms(t0, 1600), 1, true, brokers.iter().copied()), vec![1]);
        tracker.alive(1, 10, ms(t0, 1600));
        tracker.alive(2, 20, ms(t0, 2900));
        assert_eq!(tracker.expired(ms(t0, 2901), 1, true, brokers.iter().copied()), vec![3]);
    }

    #[test]
    fn a_new_leader_counts_its_dead_predecessor_from_its_last_append() {
        let t0 = Instant::now();
        let mut tracker = SessionTracker::new(SESSION);
        tracker.heard_leader(1, t0);
        let brokers = [(1, 10), (2, 20)];
        // Node 2 wins the election 1.2 s after node 1 went silent.
        assert!(tracker.expired(ms(t0, 1200), 2, true, brokers.iter().copied()).is_empty());
        tracker.alive(2, 20, ms(t0, 1500));
        assert_eq!(tracker.expired(ms(t0, 1501), 2, true, brokers.iter().copied()), vec![1]);
        // Heard long ago (lost touch): a full session from the election.
        let mut tracker = SessionTracker::new(SESSION);
        tracker.heard_leader(1, t0);
        assert!(tracker.expired(ms(t0, 5000), 2, true, brokers.iter().copied()).is_empty());
        assert!(tracker.expired(ms(t0, 6400), 2, true, [(1, 10)].into_iter()).is_empty());
        assert_eq!(tracker.expired(ms(t0, 6501), 2, true, [(1, 10)].into_iter()), vec![1]);
    }

    #[test]
    fn a_live_session_holds_its_id_and_followers_judge_nobody() {
        let t0 = Instant::now();
        let mut tracker = SessionTracker::new(SESSION);
        tracker.alive(4, 1, t0);
        assert!(tracker.id_taken(4, 2, ms(t0, 1000)), "another incarnation while the session lives");
        assert!(!tracker.id_taken(4, 1, ms(t0, 1000)), "the same incarnation again");
        assert!(!tracker.id_taken(4, 2, ms(t0, 1500)), "once the session expired");
        assert!(tracker.expired(ms(t0, 9000), 1, false, [(4, 1)].into_iter()).is_empty());
        // Leading again later starts everyone afresh.
        assert!(tracker.expired(ms(t0, 9000), 1, true, [(4, 1)].into_iter()).is_empty());
        assert_eq!(tracker.expired(ms(t0, 10_501), 1, true, [(4, 1)].into_iter()), vec![4]);
    }
}
