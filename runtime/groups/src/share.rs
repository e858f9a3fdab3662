//! Share groups (queue semantics, Kafka's KIP-932): the members of a share
//! group read the same partitions together, each record handed to one
//! member at a time under an acquisition lock, and each acknowledged by
//! itself — accepted, released (to be delivered again) or rejected. A
//! record delivered `max_delivery_attempts` times without being accepted,
//! or rejected, is a dead letter: it waits (still in flight) until the
//! coordinator copied it to the dead-letter topic, then it is done (the
//! step Kafka's users still ask for). Plain types, time passed in.
//!
//! Offsets below a partition's *share start* are done (accepted or
//! archived); from the start to the *share end* each record has a state;
//! past the end nothing was handed out yet. At most `max_in_flight` records
//! lie between start and end, so a stuck record bounds how far the group
//! runs ahead.

use std::collections::BTreeMap;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::{GroupError, MemberId, TopicPartition};

/// A share group's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShareConfig {
    /// How long a member may hold a record before it is offered again
    /// (Kafka's `group.share.record.lock.duration.ms`, 30 s).
    pub lock_timeout_ms: u64,
    /// Deliveries before a record is a dead letter (Kafka's
    /// `group.share.delivery.count.limit`, 5).
    pub max_delivery_attempts: u32,
    /// Records between the share start and end of a partition (Kafka's
    /// `group.share.partition.max.record.locks`, 200).
    pub max_in_flight: u64,
}

impl Default for ShareConfig {
    fn default() -> Self {
        ShareConfig { lock_timeout_ms: 30_000, max_delivery_attempts: 5, max_in_flight: 200 }
    }
}

/// Where one record is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordState {
    /// To be handed out (again).
    Available,
    /// Held by a member until `until_ms` (wall clock).
    Acquired { member: MemberId, until_ms: u64 },
    /// Done: a member accepted it.
    Accepted,
    /// To be copied to the dead-letter topic (rejected, or out of
    /// deliveries); done once [`SharePartition::archive`] says it was.
    Dead { rejected: bool },
    /// Done without success: in the dead-letter topic.
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
    /// It cannot be processed: a dead letter, not delivered again.
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharePartition {
    start: i64,
    end: i64,
    /// State and deliveries of each offset in `start..end` not done yet.
    records: BTreeMap<i64, (RecordState, u32)>,
}

impl SharePartition {
    /// Starts at `start` (the partition's log start, or its end, as the
    /// group's reset policy says).
    pub fn new(start: i64) -> SharePartition {
        SharePartition { start, end: start, records: BTreeMap::new() }
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

    /// Records held by members now.
    pub fn in_flight(&self) -> usize {
        self.records.values().filter(|(s, _)| matches!(s, RecordState::Acquired { .. })).count()
    }

    /// Where a read for the next [`SharePartition::acquire`] starts: the
    /// first record available again, else the end.
    pub fn next_to_read(&self) -> i64 {
        self.records.iter().find(|(_, (s, _))| *s == RecordState::Available).map_or(self.end, |(offset, _)| *offset)
    }

    /// The log lost everything below `log_start` (retention): those
    /// records are done, whatever their state.
    pub fn skip_to(&mut self, log_start: i64) {
        if log_start <= self.start {
            return;
        }
        self.records.retain(|offset, _| *offset >= log_start);
        self.start = log_start;
        self.end = self.end.max(log_start);
        self.advance();
    }

    /// Hands `member` up to `max` records at `now_ms` among the offsets in
    /// `readable` (what a read just returned, below the high watermark):
    /// first those available again (in offset order), then new ones, within
    /// the in-flight bound.
    pub fn acquire(
        &mut self,
        config: &ShareConfig,
        member: &str,
        now_ms: u64,
        readable: Range<i64>,
        max: usize,
    ) -> Vec<Acquired> {
        let until_ms = now_ms + config.lock_timeout_ms;
        let mut out = Vec::new();
        for (offset, (state, count)) in self.records.range_mut(readable.clone()) {
            if out.len() == max {
                return out;
            }
            if *state == RecordState::Available {
                *count += 1;
                *state = RecordState::Acquired { member: member.to_owned(), until_ms };
                out.push(Acquired { offset: *offset, delivery_count: *count });
            }
        }
        if self.end < readable.start {
            return out;
        }
        let limit = readable.end.min(self.start + config.max_in_flight as i64);
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
        config: &ShareConfig,
        member: &str,
        offset: i64,
        ack: Ack,
        now_ms: u64,
    ) -> Result<Option<DeadLetter>, ShareError> {
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
            Ack::Release if *count < config.max_delivery_attempts => {
                *state = RecordState::Available;
                None
            }
            Ack::Release | Ack::Reject => {
                let rejected = ack == Ack::Reject;
                *state = RecordState::Dead { rejected };
                Some(DeadLetter { offset, delivery_count: *count, rejected })
            }
        };
        self.advance();
        Ok(dead)
    }

    /// Ends expired locks at `now_ms`: those records are offered again, or
    /// are dead letters after their last delivery.
    pub fn tick(&mut self, config: &ShareConfig, now_ms: u64) -> Vec<DeadLetter> {
        self.give_back(config, |_, until_ms| until_ms <= now_ms)
    }

    /// A member left (or was fenced): what it held is offered again.
    pub fn member_gone(&mut self, config: &ShareConfig, member: &str) -> Vec<DeadLetter> {
        self.give_back(config, |m, _| m == member)
    }

    /// The dead letters not copied yet.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.records
            .iter()
            .filter_map(|(offset, (state, count))| match state {
                RecordState::Dead { rejected } => {
                    Some(DeadLetter { offset: *offset, delivery_count: *count, rejected: *rejected })
                }
                _ => None,
            })
            .collect()
    }

    /// The dead letter at `offset` is in the dead-letter topic: done.
    pub fn archive(&mut self, offset: i64) {
        if let Some((state @ RecordState::Dead { .. }, _)) = self.records.get_mut(&offset) {
            *state = RecordState::Archived;
            self.advance();
        }
    }

    fn give_back(&mut self, config: &ShareConfig, ends: impl Fn(&str, u64) -> bool) -> Vec<DeadLetter> {
        let mut dead = Vec::new();
        for (offset, (state, count)) in self.records.iter_mut() {
            if let RecordState::Acquired { member, until_ms } = state
                && ends(member, *until_ms)
            {
                if *count >= config.max_delivery_attempts {
                    *state = RecordState::Dead { rejected: false };
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

/// A member of a share group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareMember {
    pub id: MemberId,
    /// The topics it reads (by name).
    pub topics: Vec<String>,
    pub last_seen_ms: u64,
}

/// Where each new share partition starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShareReset {
    /// At the partition's end when the group first reads it (Kafka's
    /// default).
    #[default]
    Latest,
    Earliest,
}

/// The share half of a group: its members and its partitions' states.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShareGroup {
    pub(crate) members: BTreeMap<MemberId, ShareMember>,
    pub(crate) partitions: BTreeMap<TopicPartition, SharePartition>,
}

impl ShareGroup {
    pub fn members(&self) -> impl Iterator<Item = &ShareMember> {
        self.members.values()
    }

    pub fn partitions(&self) -> &BTreeMap<TopicPartition, SharePartition> {
        &self.partitions
    }

    pub fn partition_mut(&mut self, tp: &TopicPartition) -> Option<&mut SharePartition> {
        self.partitions.get_mut(tp)
    }

    /// Starts `tp` at `start` unless the group has it already.
    pub fn add_partition(&mut self, tp: TopicPartition, start: i64) -> &mut SharePartition {
        self.partitions.entry(tp).or_insert_with(|| SharePartition::new(start))
    }

    /// A member's fetch at `now_ms`: an empty id joins (as `fresh()`), a
    /// known one renews its session and may change its topics. A member
    /// fenced meanwhile is unknown: it joins again.
    pub fn visit(
        &mut self,
        member_id: &str,
        fresh: impl FnOnce() -> MemberId,
        topics: Vec<String>,
        now_ms: u64,
    ) -> Result<MemberId, GroupError> {
        let id = if member_id.is_empty() {
            fresh()
        } else if self.members.contains_key(member_id) {
            member_id.to_owned()
        } else {
            return Err(GroupError::UnknownMember(member_id.to_owned()));
        };
        let member = self.members.entry(id.clone()).or_insert_with(|| ShareMember {
            id: id.clone(),
            topics: Vec::new(),
            last_seen_ms: now_ms,
        });
        member.topics = topics;
        member.last_seen_ms = now_ms;
        Ok(id)
    }

    /// `member` leaves: what it held is offered again (or is a dead
    /// letter after its last delivery: see
    /// [`SharePartition::dead_letters`]).
    pub fn leave(&mut self, config: &ShareConfig, member: &str) {
        if self.members.remove(member).is_some() {
            for p in self.partitions.values_mut() {
                p.member_gone(config, member);
            }
        }
    }

    /// At `now_ms`: members silent for longer than `session_ms` are gone
    /// (their records offered again) and expired locks end. Returns the
    /// fenced members; new dead letters are in their partitions'
    /// [`SharePartition::dead_letters`].
    pub fn tick(&mut self, config: &ShareConfig, session_ms: u64, now_ms: u64) -> Vec<MemberId> {
        let gone: Vec<MemberId> = self
            .members
            .values()
            .filter(|m| now_ms.saturating_sub(m.last_seen_ms) > session_ms)
            .map(|m| m.id.clone())
            .collect();
        for id in &gone {
            self.leave(config, id);
        }
        for p in self.partitions.values_mut() {
            p.tick(config, now_ms);
        }
        gone
    }

    /// Forgets the partitions of `topic` (a deleted topic).
    pub fn forget_topic(&mut self, topic: &str) {
        self.partitions.retain(|(t, _), _| t != topic);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCK: u64 = 30_000;

    const CONFIG: ShareConfig = ShareConfig { lock_timeout_ms: LOCK, max_delivery_attempts: 3, max_in_flight: 10 };

    fn partition() -> SharePartition {
        SharePartition::new(100)
    }

    fn offsets(a: &[Acquired]) -> Vec<i64> {
        a.iter().map(|a| a.offset).collect()
    }

    #[test]
    fn members_get_disjoint_records_and_the_start_moves_over_accepted_ones() {
        let mut p = partition();
        let a = p.acquire(&CONFIG, "a", 0, 0..106, 3);
        let b = p.acquire(&CONFIG, "b", 0, 0..106, 10);
        assert_eq!((offsets(&a), offsets(&b)), (vec![100, 101, 102], vec![103, 104, 105]));
        assert_eq!(p.acquire(&CONFIG, "c", 0, 0..106, 10), vec![], "nothing more below the high watermark");
        p.acknowledge(&CONFIG, "a", 101, Ack::Accept, 1).unwrap();
        assert_eq!(p.start(), 100, "100 is still held");
        p.acknowledge(&CONFIG, "a", 100, Ack::Accept, 1).unwrap();
        assert_eq!(p.start(), 102);
        assert_eq!(
            p.acknowledge(&CONFIG, "b", 102, Ack::Accept, 1),
            Err(ShareError::NotHeld { member: "b".into(), offset: 102 }),
            "only the holder acknowledges"
        );
    }

    #[test]
    fn an_expired_lock_offers_the_record_again_until_it_is_a_dead_letter() {
        let mut p = partition();
        assert_eq!(p.acquire(&CONFIG, "a", 0, 0..101, 1), vec![Acquired { offset: 100, delivery_count: 1 }]);
        assert!(p.tick(&CONFIG, LOCK - 1).is_empty());
        assert!(p.tick(&CONFIG, LOCK).is_empty(), "lock over: offered again, not dead");
        assert_eq!(
            p.acknowledge(&CONFIG, "a", 100, Ack::Accept, LOCK),
            Err(ShareError::NotHeld { member: "a".into(), offset: 100 })
        );
        assert_eq!(p.acquire(&CONFIG, "b", LOCK, 0..101, 5), vec![Acquired { offset: 100, delivery_count: 2 }]);
        assert_eq!(p.acknowledge(&CONFIG, "b", 100, Ack::Release, LOCK + 1), Ok(None));
        assert_eq!(p.acquire(&CONFIG, "a", LOCK + 2, 0..101, 5), vec![Acquired { offset: 100, delivery_count: 3 }]);
        let dead = p.tick(&CONFIG, 2 * LOCK + 2);
        assert_eq!(dead, vec![DeadLetter { offset: 100, delivery_count: 3, rejected: false }]);
        assert_eq!(p.state(100), Some(&RecordState::Dead { rejected: false }));
        assert_eq!(p.dead_letters(), dead, "until it is copied");
        assert_eq!(p.start(), 100, "a dead letter not copied yet is not done");
        assert!(p.acquire(&CONFIG, "a", 2 * LOCK + 3, 0..101, 5).is_empty(), "nor delivered again");
        p.archive(100);
        assert_eq!((p.state(100), p.start()), (None, 101), "copied: done");
        assert!(p.dead_letters().is_empty());
    }

    #[test]
    fn a_rejected_record_is_a_dead_letter_at_once() {
        let mut p = partition();
        p.acquire(&CONFIG, "a", 0, 0..102, 2);
        assert_eq!(
            p.acknowledge(&CONFIG, "a", 101, Ack::Reject, 1),
            Ok(Some(DeadLetter { offset: 101, delivery_count: 1, rejected: true }))
        );
        assert_eq!(p.start(), 100);
        p.acknowledge(&CONFIG, "a", 100, Ack::Accept, 1).unwrap();
        assert_eq!(p.start(), 101, "101 waits for its copy");
        p.archive(101);
        assert_eq!(p.start(), 102);
    }

    #[test]
    fn only_records_a_read_returned_are_handed_out() {
        let mut p = partition();
        p.acquire(&CONFIG, "a", 0, 100..104, 4);
        p.acknowledge(&CONFIG, "a", 101, Ack::Release, 1).unwrap();
        p.acknowledge(&CONFIG, "a", 103, Ack::Release, 1).unwrap();
        assert_eq!(p.next_to_read(), 101);
        let got = p.acquire(&CONFIG, "b", 2, 102..106, 10);
        assert_eq!(offsets(&got), vec![103, 104, 105], "101 lies before what was read");
        assert_eq!(offsets(&p.acquire(&CONFIG, "c", 2, 101..102, 10)), vec![101]);
    }

    #[test]
    fn records_the_log_lost_are_done() {
        let mut p = partition();
        p.acquire(&CONFIG, "a", 0, 100..105, 5);
        p.skip_to(103);
        assert_eq!((p.start(), p.end()), (103, 105));
        assert_eq!(p.state(102), None);
        p.skip_to(200);
        assert_eq!((p.start(), p.end(), p.next_to_read()), (200, 200, 200));
    }

    #[test]
    fn a_silent_member_is_fenced_and_its_records_go_to_the_others() {
        let mut g = ShareGroup::default();
        let a = g.visit("", || "a".into(), vec!["t".into()], 0).unwrap();
        let b = g.visit("", || "b".into(), vec!["t".into()], 0).unwrap();
        let tp = ("t".to_string(), 0);
        g.add_partition(tp.clone(), 0).acquire(&CONFIG, &a, 0, 0..3, 3);
        g.visit(&b, || unreachable!(), vec!["t".into()], 9_000).unwrap();
        let gone = g.tick(&CONFIG, 10_000, 10_001);
        assert_eq!(gone, vec![a.clone()]);
        assert_eq!(g.partition_mut(&tp).unwrap().dead_letters(), vec![], "nothing dead: offered again");
        assert_eq!(
            g.visit(&a, || unreachable!(), vec![], 10_002),
            Err(GroupError::UnknownMember(a.clone())),
            "joins again"
        );
        let again = g.partition_mut(&tp).unwrap().acquire(&CONFIG, &b, 10_002, 0..3, 10);
        assert_eq!(again.iter().map(|r| r.delivery_count).collect::<Vec<_>>(), vec![2, 2, 2]);
    }

    #[test]
    fn a_stuck_record_bounds_how_far_the_group_runs_ahead() {
        let mut p = partition();
        p.acquire(&CONFIG, "slow", 0, 0..1_000, 1);
        let mut handed = 1;
        for _ in 0..20 {
            let got = p.acquire(&CONFIG, "fast", 0, 0..1_000, 5);
            handed += got.len();
            for a in got {
                p.acknowledge(&CONFIG, "fast", a.offset, Ack::Accept, 1).unwrap();
            }
        }
        assert_eq!(handed, 10, "max_in_flight from the stuck start");
        assert_eq!((p.start(), p.end()), (100, 110));
    }

    #[test]
    fn what_a_departed_member_held_is_offered_again() {
        let mut p = partition();
        p.acquire(&CONFIG, "a", 0, 0..103, 3);
        assert!(p.member_gone(&CONFIG, "a").is_empty());
        assert_eq!(offsets(&p.acquire(&CONFIG, "b", 1, 0..103, 10)), vec![100, 101, 102]);
    }

    #[test]
    fn a_share_group_is_rebuilt_from_its_records_through_json() {
        let mut g = crate::Group::new_share("g", crate::GroupConfig::default());
        let a = g.share_visit("", vec!["t".into()], 5).unwrap();
        let p = g.share_mut().unwrap().add_partition(("t".into(), 1), 40);
        p.acquire(&CONFIG, &a, 5, 40..45, 5);
        p.acknowledge(&CONFIG, &a, 40, Ack::Accept, 6).unwrap();
        p.acknowledge(&CONFIG, &a, 42, Ack::Reject, 6).unwrap();
        let log: Vec<crate::Record> = crate::changes(&Default::default(), &g.records())
            .into_iter()
            .map(|r| serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap())
            .collect();
        let replayed = crate::Group::replay("g", crate::GroupConfig::default(), 5, log);
        assert!(replayed.is_share() && !replayed.is_empty());
        assert_eq!(replayed.share(), g.share());
        let mut consumer = replayed.clone();
        let refused = consumer.heartbeat(7, crate::Heartbeat::default(), &Default::default());
        assert!(matches!(refused, Err(GroupError::Invalid(_))), "{refused:?}");
    }
}
