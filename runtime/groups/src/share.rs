//! Share groups (queue semantics, Kafka's KIP-932) for one partition: the
//! members of a share group read the same partition together, each record
//! handed to one member at a time under an acquisition lock, and each
//! acknowledged by itself — accepted, released (to be delivered again) or
//! rejected. A record delivered `max_delivery_attempts` times without being
//! accepted, or rejected, goes to the dead-letter topic (the step Kafka's
//! users still ask for). Plain types, time passed in.
//!
//! Offsets below the *share start* are done (accepted or archived); from
//! the start to the *share end* each record has a state; past the end
//! nothing was handed out yet. At most `max_in_flight` records lie between
//! start and end, so a stuck record bounds how far the group runs ahead.

use std::collections::BTreeMap;

use crate::MemberId;

/// A share partition's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShareConfig {
    /// How long a member may hold a record before it is offered again
    /// (Kafka's `group.share.record.lock.duration.ms`, 30 s).
    pub lock_timeout_ms: u64,
    /// Deliveries before a record goes to the dead-letter topic (5).
    pub max_delivery_attempts: u32,
    /// Records between the share start and end (Kafka's
    /// `group.share.partition.max.record.locks`, 200).
    pub max_in_flight: u64,
}

impl Default for ShareConfig {
    fn default() -> Self {
        ShareConfig { lock_timeout_ms: 30_000, max_delivery_attempts: 5, max_in_flight: 200 }
    }
}

/// Where one record is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordState {
    /// To be handed out (again).
    Available,
    /// Held by a member until `until_ms`.
    Acquired { member: MemberId, until_ms: u64 },
    /// Done: a member accepted it.
    Accepted,
    /// Done without success: rejected, or delivered too often.
    Archived,
}

/// A record handed to a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acquired {
    pub offset: i64,
    /// 1 on the first delivery.
    pub delivery_count: u32,
}

/// How a member acknowledges a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    Accept,
    /// Give it back: another delivery (unless it had its last).
    Release,
    /// It cannot be processed: to the dead-letter topic, not delivered again.
    Reject,
}

/// A record to copy to the dead-letter topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadLetter {
    pub offset: i64,
    pub delivery_count: u32,
    pub rejected: bool,
}

/// Why an acknowledgement was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShareError {
    #[error("offset {offset} is not held by member '{member}' (never acquired, acknowledged, or its lock expired)")]
    NotHeld { member: MemberId, offset: i64 },
}

/// One partition of one share group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharePartition {
    config: ShareConfig,
    start: i64,
    end: i64,
    /// State and deliveries of each offset in `start..end`.
    records: BTreeMap<i64, (RecordState, u32)>,
}

impl SharePartition {
    /// Starts at `start` (the partition's log start, or latest, as the
    /// group's reset policy says).
    pub fn new(config: ShareConfig, start: i64) -> SharePartition {
        SharePartition { config, start, end: start, records: BTreeMap::new() }
    }

    /// Every offset below this is done.
    pub fn start(&self) -> i64 {
        self.start
    }

    /// Nothing at or past this offset was handed out yet.
    pub fn end(&self) -> i64 {
        self.end
    }

    pub fn state(&self, offset: i64) -> Option<&RecordState> {
        self.records.get(&offset).map(|(s, _)| s)
    }

    /// Hands `member` up to `max` records at `now_ms`: first those
    /// available again (in offset order), then new ones below `log_end`
    /// (the high watermark), within the in-flight bound.
    pub fn acquire(&mut self, member: &str, now_ms: u64, log_end: i64, max: usize) -> Vec<Acquired> {
        let until_ms = now_ms + self.config.lock_timeout_ms;
        let mut out = Vec::new();
        for (offset, (state, count)) in self.records.iter_mut() {
            if out.len() == max {
                return out;
            }
            if *state == RecordState::Available {
                *count += 1;
                *state = RecordState::Acquired { member: member.to_owned(), until_ms };
                out.push(Acquired { offset: *offset, delivery_count: *count });
            }
        }
        let limit = log_end.min(self.start + self.config.max_in_flight as i64);
        while out.len() < max && self.end < limit {
            self.records.insert(self.end, (RecordState::Acquired { member: member.to_owned(), until_ms }, 1));
            out.push(Acquired { offset: self.end, delivery_count: 1 });
            self.end += 1;
        }
        out
    }

    /// `member` acknowledges `offset` at `now_ms`. A record released or
    /// rejected on its last delivery is a dead letter.
    pub fn acknowledge(
        &mut self,
        member: &str,
        offset: i64,
        ack: Ack,
        now_ms: u64,
    ) -> Result<Option<DeadLetter>, ShareError> {
        let max = self.config.max_delivery_attempts;
        let held = matches!(
            self.records.get(&offset),
            Some((RecordState::Acquired { member: m, until_ms }, _)) if m == member && *until_ms > now_ms
        );
        if !held {
            return Err(ShareError::NotHeld { member: member.to_owned(), offset });
        }
        let (state, count) = self.records.get_mut(&offset).expect("held");
        let dead = match ack {
            Ack::Accept => {
                *state = RecordState::Accepted;
                None
            }
            Ack::Release if *count < max => {
                *state = RecordState::Available;
                None
            }
            Ack::Release | Ack::Reject => {
                *state = RecordState::Archived;
                Some(DeadLetter { offset, delivery_count: *count, rejected: ack == Ack::Reject })
            }
        };
        self.advance();
        Ok(dead)
    }

    /// Ends expired locks at `now_ms`: those records are offered again, or
    /// are dead letters after their last delivery.
    pub fn tick(&mut self, now_ms: u64) -> Vec<DeadLetter> {
        self.give_back(|_, until_ms| until_ms <= now_ms)
    }

    /// A member left (or was fenced): what it held is offered again.
    pub fn member_gone(&mut self, member: &str) -> Vec<DeadLetter> {
        self.give_back(|m, _| m == member)
    }

    fn give_back(&mut self, ends: impl Fn(&str, u64) -> bool) -> Vec<DeadLetter> {
        let max = self.config.max_delivery_attempts;
        let mut dead = Vec::new();
        for (offset, (state, count)) in self.records.iter_mut() {
            if let RecordState::Acquired { member, until_ms } = state
                && ends(member, *until_ms)
            {
                if *count >= max {
                    *state = RecordState::Archived;
                    dead.push(DeadLetter { offset: *offset, delivery_count: *count, rejected: false });
                } else {
                    *state = RecordState::Available;
                }
            }
        }
        self.advance();
        dead
    }

    /// Moves the start past records that are done.
    fn advance(&mut self) {
        while let Some((offset, (state, _))) = self.records.first_key_value() {
            if !matches!(state, RecordState::Accepted | RecordState::Archived) {
                break;
            }
            self.start = *offset + 1;
            self.records.pop_first();
        }
        if self.records.is_empty() {
            self.start = self.end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCK: u64 = 30_000;

    fn partition() -> SharePartition {
        SharePartition::new(ShareConfig { lock_timeout_ms: LOCK, max_delivery_attempts: 3, max_in_flight: 10 }, 100)
    }

    fn offsets(a: &[Acquired]) -> Vec<i64> {
        a.iter().map(|a| a.offset).collect()
    }

    #[test]
    fn members_get_disjoint_records_and_the_start_moves_over_accepted_ones() {
        let mut p = partition();
        let a = p.acquire("a", 0, 106, 3);
        let b = p.acquire("b", 0, 106, 10);
        assert_eq!((offsets(&a), offsets(&b)), (vec![100, 101, 102], vec![103, 104, 105]));
        assert_eq!(p.acquire("c", 0, 106, 10), vec![], "nothing more below the high watermark");
        p.acknowledge("a", 101, Ack::Accept, 1).unwrap();
        assert_eq!(p.start(), 100, "100 is still held");
        p.acknowledge("a", 100, Ack::Accept, 1).unwrap();
        assert_eq!(p.start(), 102);
        assert_eq!(
            p.acknowledge("b", 102, Ack::Accept, 1),
            Err(ShareError::NotHeld { member: "b".into(), offset: 102 }),
            "only the holder acknowledges"
        );
    }

    #[test]
    fn an_expired_lock_offers_the_record_again_until_it_is_a_dead_letter() {
        let mut p = partition();
        assert_eq!(p.acquire("a", 0, 101, 1), vec![Acquired { offset: 100, delivery_count: 1 }]);
        assert!(p.tick(LOCK - 1).is_empty());
        assert!(p.tick(LOCK).is_empty(), "lock over: offered again, not dead");
        assert_eq!(
            p.acknowledge("a", 100, Ack::Accept, LOCK),
            Err(ShareError::NotHeld { member: "a".into(), offset: 100 })
        );
        assert_eq!(p.acquire("b", LOCK, 101, 5), vec![Acquired { offset: 100, delivery_count: 2 }]);
        assert_eq!(p.acknowledge("b", 100, Ack::Release, LOCK + 1), Ok(None));
        assert_eq!(p.acquire("a", LOCK + 2, 101, 5), vec![Acquired { offset: 100, delivery_count: 3 }]);
        let dead = p.tick(2 * LOCK + 2);
        assert_eq!(dead, vec![DeadLetter { offset: 100, delivery_count: 3, rejected: false }]);
        assert_eq!(p.state(100), None);
        assert_eq!(p.start(), 101, "a dead letter is done");
        assert!(p.acquire("a", 2 * LOCK + 3, 101, 5).is_empty());
    }

    #[test]
    fn a_rejected_record_is_a_dead_letter_at_once() {
        let mut p = partition();
        p.acquire("a", 0, 102, 2);
        assert_eq!(
            p.acknowledge("a", 101, Ack::Reject, 1),
            Ok(Some(DeadLetter { offset: 101, delivery_count: 1, rejected: true }))
        );
        assert_eq!(p.start(), 100);
        p.acknowledge("a", 100, Ack::Accept, 1).unwrap();
        assert_eq!(p.start(), 102);
    }

    #[test]
    fn a_stuck_record_bounds_how_far_the_group_runs_ahead() {
        let mut p = partition();
        p.acquire("slow", 0, 1_000, 1);
        let mut handed = 1;
        for _ in 0..20 {
            let got = p.acquire("fast", 0, 1_000, 5);
            handed += got.len();
            for a in got {
                p.acknowledge("fast", a.offset, Ack::Accept, 1).unwrap();
            }
        }
        assert_eq!(handed, 10, "max_in_flight from the stuck start");
        assert_eq!((p.start(), p.end()), (100, 110));
    }

    #[test]
    fn what_a_departed_member_held_is_offered_again() {
        let mut p = partition();
        p.acquire("a", 0, 103, 3);
        assert!(p.member_gone("a").is_empty());
        assert_eq!(offsets(&p.acquire("b", 1, 103, 10)), vec![100, 101, 102]);
    }
}
