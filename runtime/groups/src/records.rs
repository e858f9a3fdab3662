//! A group as keyed records, the way the offsets topic keeps it (Kafka's
//! `__consumer_offsets` records of KIP-848 groups): the group's epochs, each
//! member's subscription, target and current assignment, and each committed
//! offset, one key each. The coordinator writes [`changes`] after every
//! change (a removed key as a tombstone, so compaction can drop it); a new
//! coordinator rebuilds the group with [`Group::replay`] before it answers.
//!
//! Timers are not records: members replayed get a fresh session from the
//! replay, as after a Kafka coordinator failover.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::group::{Committed, Group, Member, MemberState};
use crate::share::{ShareMember, SharePartition};
use crate::{Assignment, GroupConfig, GroupOverrides, MemberId, Subscription};

/// What a record is about, within one group.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RecordKey {
    Group,
    /// The group's own timings, when it has any.
    Config,
    Member(MemberId),
    Target(MemberId),
    Current(MemberId),
    Offset(String, u32),
    /// A share group's member.
    ShareMember(MemberId),
    /// A share group's state of one partition.
    SharePartition(String, u32),
    /// An offset committed in a producer's open transaction.
    PendingOffset(i64, String, u32),
}

/// A key's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordValue {
    Group {
        epoch: i32,
        target_epoch: i32,
        joined: u64,
        topics: BTreeMap<String, u32>,
        /// A share group (absent in records of consumer groups).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        share: bool,
    },
    Member {
        instance_id: Option<String>,
        subscription: Subscription,
        away: bool,
    },
    Target(Assignment),
    Current {
        epoch: i32,
        previous_epoch: i32,
        assigned: Assignment,
        revoking: Assignment,
        state: MemberState,
    },
    Offset(Committed),
    Config(GroupOverrides),
    ShareMember {
        topics: Vec<String>,
    },
    SharePartition(SharePartition),
}

/// One change: a key's new value, or `None` when the key is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub key: RecordKey,
    pub value: Option<RecordValue>,
}

/// The records that turn `before` into `after` (both from
/// [`Group::records`]), in key order.
pub fn changes(before: &BTreeMap<RecordKey, RecordValue>, after: &BTreeMap<RecordKey, RecordValue>) -> Vec<Record> {
    let gone = before.keys().filter(|k| !after.contains_key(k)).map(|k| Record { key: k.clone(), value: None });
    let set = after
        .iter()
        .filter(|(k, v)| before.get(k) != Some(v))
        .map(|(k, v)| Record { key: k.clone(), value: Some(v.clone()) });
    let mut all: Vec<Record> = gone.chain(set).collect();
    all.sort_by(|a, b| a.key.cmp(&b.key));
    all
}

impl Group {
    /// The group's state as records.
    pub fn records(&self) -> BTreeMap<RecordKey, RecordValue> {
        let mut out = BTreeMap::new();
        out.insert(
            RecordKey::Group,
            RecordValue::Group {
                epoch: self.epoch,
                target_epoch: self.target_epoch,
                joined: self.joined,
                topics: self.topics.clone(),
                share: self.share.is_some(),
            },
        );
        if let Some(share) = &self.share {
            for (id, m) in &share.members {
                out.insert(RecordKey::ShareMember(id.clone()), RecordValue::ShareMember { topics: m.topics.clone() });
            }
            for ((topic, partition), p) in &share.partitions {
                out.insert(
                    RecordKey::SharePartition(topic.clone(), *partition),
                    RecordValue::SharePartition(p.clone()),
                );
            }
        }
        if !self.overrides.is_empty() {
            out.insert(RecordKey::Config, RecordValue::Config(self.overrides));
        }
        for (id, m) in &self.members {
            out.insert(
                RecordKey::Member(id.clone()),
                RecordValue::Member {
                    instance_id: m.instance_id.clone(),
                    subscription: m.subscription.clone(),
                    away: m.away,
                },
            );
            out.insert(
                RecordKey::Current(id.clone()),
                RecordValue::Current {
                    epoch: m.epoch,
                    previous_epoch: m.previous_epoch,
                    assigned: m.assigned.clone(),
                    revoking: m.revoking.clone(),
                    state: m.state,
                },
            );
        }
        for (id, target) in &self.target {
            out.insert(RecordKey::Target(id.clone()), RecordValue::Target(target.clone()));
        }
        for ((topic, partition), committed) in &self.offsets {
            out.insert(RecordKey::Offset(topic.clone(), *partition), RecordValue::Offset(committed.clone()));
        }
        for (producer_id, offsets) in &self.pending {
            for ((topic, partition), committed) in offsets {
                out.insert(
                    RecordKey::PendingOffset(*producer_id, topic.clone(), *partition),
                    RecordValue::Offset(committed.clone()),
                );
            }
        }
        out
    }

    /// Rebuilds group `name` from its records in log order (later records
    /// of a key replace earlier ones; `None` removes it), at `now_ms`.
    pub fn replay(name: &str, config: GroupConfig, now_ms: u64, log: impl IntoIterator<Item = Record>) -> Group {
        let mut state: BTreeMap<RecordKey, RecordValue> = BTreeMap::new();
        for record in log {
            match record.value {
                Some(value) => state.insert(record.key, value),
                None => state.remove(&record.key),
            };
        }
        let mut group = Group::new(name, config);
        let mut currents = BTreeMap::new();
        for (key, value) in state {
            match (key, value) {
                (RecordKey::Group, RecordValue::Group { epoch, target_epoch, joined, topics, share }) => {
                    (group.epoch, group.target_epoch, group.joined, group.topics) =
                        (epoch, target_epoch, joined, topics);
                    if share && group.share.is_none() {
                        group.share = Some(Default::default());
                    }
                }
                (RecordKey::ShareMember(id), RecordValue::ShareMember { topics }) => {
                    let share = group.share.get_or_insert_with(Default::default);
                    share.members.insert(id.clone(), ShareMember { id, topics, last_seen_ms: now_ms });
                }
                (RecordKey::SharePartition(topic, partition), RecordValue::SharePartition(p)) => {
                    group.share.get_or_insert_with(Default::default).partitions.insert((topic, partition), p);
                }
                (RecordKey::Member(id), RecordValue::Member { instance_id, subscription, away }) => {
                    let mut member = Member::new(id.clone(), instance_id, subscription, now_ms);
                    member.away = away;
                    group.members.insert(id, member);
                }
                (RecordKey::Current(id), current @ RecordValue::Current { .. }) => {
                    currents.insert(id, current);
                }
                (RecordKey::Target(id), RecordValue::Target(target)) => {
                    group.target.insert(id, target);
                }
                (RecordKey::Offset(topic, partition), RecordValue::Offset(committed)) => {
                    group.offsets.insert((topic, partition), committed);
                }
                (RecordKey::PendingOffset(producer_id, topic, partition), RecordValue::Offset(committed)) => {
                    group.pending.entry(producer_id).or_default().insert((topic, partition), committed);
                }
                // Stored overrides were checked against the defaults of
                // their day; with today's they may not fit: defaults then.
                (RecordKey::Config, RecordValue::Config(overrides)) if group.set_overrides(overrides).is_err() => {
                    group.overrides = overrides;
                }
                // A key with another kind of value is not ours to read.
                _ => {}
            }
        }
        for (id, current) in currents {
            let (Some(m), RecordValue::Current { epoch, previous_epoch, assigned, revoking, state }) =
                (group.members.get_mut(&id), current)
            else {
                continue;
            };
            (m.epoch, m.previous_epoch, m.assigned, m.revoking, m.state) =
                (epoch, previous_epoch, assigned, revoking, state);
            // A revocation in progress gets a whole rebalance timeout again.
            m.revoke_deadline_ms = now_ms + config.rebalance_timeout_ms;
        }
        group
    }
}
