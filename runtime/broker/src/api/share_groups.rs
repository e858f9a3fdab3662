//! Share groups (queue semantics) on the broker: a member's fetch — its
//! acknowledgements, then records acquired for it — and copying dead
//! letters to the dead-letter topic `<topic>-dlq`. The rules are
//! `quiver_groups::share`; a share group lives where consumer groups do
//! (`coordinator.rs`: its coordinator, its records in `__consumer_offsets`,
//! written with acks=all before the member gets its answer). The
//! coordinator reads the member's partitions wherever they are led
//! (`Broker::read_anywhere`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quiver_groups::share::{Ack, Acquired, DeadLetter, ShareError, ShareReset};
use quiver_groups::{Group, MemberId, TopicPartition};
use quiver_protocol::batch::{BatchBuilder, Batches, Compression, decode_records};
use quiver_protocol::messages::PARTITION_ANY;

use crate::api::groups::member_error;
use crate::api::{Acks, NewTopic, Read, Write};
use crate::broker::Broker;
use crate::errors::{FetchError, GroupOpError, PartitionError};
use crate::group_shards::validate_group_name;

/// The dead-letter topic of `topic`.
fn dead_letter_topic(topic: &str) -> String {
    format!("{topic}-dlq")
}

/// Headers a dead letter carries besides the record's own.
const DLQ_HEADERS: [&str; 6] = [
    "quiver.dlq.group",
    "quiver.dlq.topic",
    "quiver.dlq.partition",
    "quiver.dlq.offset",
    "quiver.dlq.delivery.count",
    "quiver.dlq.reason",
];

/// Most offsets one acknowledgement range may name.
const ACK_RANGE_MAX: i64 = 100_000;

/// A member's acknowledgement of records `first..=last` of a partition.
#[derive(Debug, Clone)]
pub(crate) struct ShareAck {
    pub(crate) topic: String,
    pub(crate) partition: u32,
    pub(crate) first: i64,
    pub(crate) last: i64,
    pub(crate) ack: Ack,
}

/// A share member's fetch.
#[derive(Debug, Clone)]
pub(crate) struct ShareFetch {
    pub(crate) member_id: MemberId,
    pub(crate) topics: Vec<String>,
    pub(crate) acks: Vec<ShareAck>,
    pub(crate) max_records: u32,
    pub(crate) max_wait: Duration,
    pub(crate) max_bytes: u32,
    pub(crate) leave: bool,
}

/// What a member got from one partition.
#[derive(Debug)]
pub(crate) struct ShareRead {
    pub(crate) topic: String,
    pub(crate) partition: u32,
    /// Whole batches holding the acquired records (and maybe others).
    pub(crate) records: Result<Bytes, FetchError>,
    pub(crate) acquired: Vec<Acquired>,
}

/// The answer to a share fetch.
#[derive(Debug)]
pub(crate) struct ShareFetched {
    pub(crate) member_id: MemberId,
    pub(crate) heartbeat_interval_ms: u64,
    pub(crate) reads: Vec<ShareRead>,
    pub(crate) ack_errors: Vec<(TopicPartition, ShareError)>,
}

/// One partition to read for a member: where from, or `None` for a
/// partition the group has not read yet (it starts as its reset says).
struct Planned {
    tp: TopicPartition,
    from: Option<i64>,
}

impl Broker {
    /// A share member's fetch: its acknowledgements are stored first
    /// (acks=all), then records of its topics are read and acquired for it
    /// (stored again before the answer), at most `max_records`.
    pub(crate) async fn share_fetch(
        self: &Arc<Self>,
        group: &str,
        f: ShareFetch,
    ) -> Result<ShareFetched, GroupOpError> {
        validate_group_name(group)?;
        if let Some(a) = f.acks.iter().find(|a| a.last - a.first >= ACK_RANGE_MAX) {
            return Err(GroupOpError::Invalid(format!(
                "{}-{}: an acknowledgement names more than {ACK_RANGE_MAX} offsets",
                a.topic, a.partition
            )));
        }
        let counts = self.share_topics(&f)?;
        let defaults = self.config.group_defaults;
        // Acknowledge, join or renew the session, and plan the reads.
        let (member_id, heartbeat_interval_ms, reset, plan, ack_errors) = self
            .with_group(group, |current, now| {
                let mut g = match current {
                    Some(g) if g.is_share() => g,
                    // A group only configured so far becomes a share group.
                    Some(g) if g.is_empty() && g.offsets().is_empty() => {
                        let mut share = Group::new_share(group, defaults);
                        share.set_overrides(g.overrides()).map_err(|source| member_error(group, source))?;
                        share
                    }
                    Some(g) => {
                        return Err(GroupOpError::Invalid(format!(
                            "group '{}' is a consumer group: its members heartbeat, they do not share fetches",
                            g.name()
                        )));
                    }
                    None if f.member_id.is_empty() => Group::new_share(group, defaults),
                    None => return Err(GroupOpError::UnknownGroup(group.to_owned())),
                };
                let id =
                    g.share_visit(&f.member_id, f.topics.clone(), now).map_err(|source| member_error(group, source))?;
                let config = g.config().share;
                let share = g.share_mut().expect("a share group");
                let mut ack_errors = Vec::new();
                for a in &f.acks {
                    let tp = (a.topic.clone(), a.partition);
                    for offset in a.first..=a.last {
                        let done = match share.partition_mut(&tp) {
                            Some(p) => p.acknowledge(&config, &id, offset, a.ack, now).map(drop),
                            None => Err(ShareError::NotHeld { member: id.clone(), offset }),
                        };
                        if let Err(e) = done {
                            ack_errors.push((tp.clone(), e));
                        }
                    }
                }
                let mut plan = Vec::new();
                if f.leave {
                    share.leave(&config, &id);
                } else if f.max_records > 0 {
                    for (topic, count) in &counts {
                        for partition in 0..*count {
                            let tp = (topic.clone(), partition);
                            match share.partitions().get(&tp) {
                                None => plan.push(Planned { tp, from: None }),
                                Some(p) => {
                                    // Nothing to hand out until a record is
                                    // acknowledged or its lock expires.
                                    let bound = p.start() + config.max_in_flight as i64;
                                    let from = p.next_to_read();
                                    if from < p.end() || p.end() < bound {
                                        plan.push(Planned { tp, from: Some(from) });
                                    }
                                }
                            }
                        }
                    }
                }
                let (interval, reset) = (g.config().heartbeat_interval_ms, g.config().share_reset);
                Ok((Some(g), (id, interval, reset, plan, ack_errors)))
            })
            .await?;
        let mut fetched = ShareFetched { member_id, heartbeat_interval_ms, reads: Vec::new(), ack_errors };
        if plan.is_empty() {
            return Ok(fetched);
        }
        // Partitions the group never read start at their log start or end.
        let new: Vec<Read> = plan
            .iter()
            .filter(|p| p.from.is_none())
            .map(|p| Read { topic: p.tp.0.clone(), partition: p.tp.1, offset: 0, max_bytes: 0 })
            .collect();
        let mut bounds = BTreeMap::new();
        if !new.is_empty() {
            for (read, got) in new.iter().zip(self.read_anywhere(new.clone(), 0, Duration::ZERO, false).await) {
                if got.records.is_ok() && got.high_watermark >= 0 {
                    bounds.insert((read.topic.clone(), read.partition), (got.log_start_offset, got.high_watermark));
                }
            }
        }
        let starts: Vec<(TopicPartition, i64)> = plan
            .iter()
            .filter_map(|p| match p.from {
                Some(from) => Some((p.tp.clone(), from)),
                None => {
                    let (log_start, end) = bounds.get(&p.tp)?;
                    Some((p.tp.clone(), if reset == ShareReset::Earliest { *log_start } else { *end }))
                }
            })
            .collect();
        let per_partition = f.max_bytes.max(1);
        let reads: Vec<Read> = starts
            .iter()
            .map(|((topic, partition), from)| Read {
                topic: topic.clone(),
                partition: *partition,
                offset: *from,
                max_bytes: per_partition,
            })
            .collect();
        let got = self.read_anywhere(reads, f.max_bytes, f.max_wait, false).await;
        // Acquire what was read, for this member, and store it.
        let mut readable = Vec::new();
        for ((tp, from), read) in starts.into_iter().zip(got) {
            match read.records {
                Ok(bytes) => {
                    let range = from..readable_end(&bytes, read.high_watermark);
                    readable.push((tp, from, read.log_start_offset, range, bytes));
                }
                Err(e) => fetched.reads.push(ShareRead {
                    topic: tp.0,
                    partition: tp.1,
                    records: Err(e),
                    acquired: Vec::new(),
                }),
            }
        }
        let member_id = fetched.member_id.clone();
        let acquired = self
            .with_group(group, |current, now| {
                let Some(mut g) = current.filter(Group::is_share) else {
                    return Err(GroupOpError::UnknownGroup(group.to_owned()));
                };
                let config = g.config().share;
                let share = g.share_mut().expect("a share group");
                if !share.members().any(|m| m.id == member_id) {
                    let source = quiver_groups::GroupError::UnknownMember(member_id.clone());
                    return Err(GroupOpError::Member { group: group.to_owned(), source });
                }
                let mut left = f.max_records as usize;
                let mut out = Vec::new();
                for (tp, from, log_start, range, bytes) in readable {
                    let p = share.add_partition(tp.clone(), from);
                    if log_start >= 0 {
                        p.skip_to(log_start);
                    }
                    let acquired = if left > 0 { p.acquire(&config, &member_id, now, range, left) } else { Vec::new() };
                    left -= acquired.len();
                    if !acquired.is_empty() {
                        out.push(ShareRead { topic: tp.0, partition: tp.1, records: Ok(bytes), acquired });
                    }
                }
                Ok((Some(g), out))
            })
            .await?;
        fetched.reads.extend(acquired);
        Ok(fetched)
    }

    /// The partition counts of a fetch's topics: each must exist, and not
    /// be internal.
    fn share_topics(&self, f: &ShareFetch) -> Result<BTreeMap<String, u32>, GroupOpError> {
        if f.topics.is_empty() && !f.leave && f.max_records > 0 {
            return Err(GroupOpError::Invalid("a share member reads at least one topic".into()));
        }
        let image = self.controller.image();
        let image = image.borrow();
        f.topics
            .iter()
            .map(|t| {
                if t.starts_with("__") {
                    return Err(GroupOpError::Invalid(format!("{t} is internal: share groups cannot read it")));
                }
                let topic = image.topics.get(t).ok_or_else(|| PartitionError::UnknownTopic { topic: t.clone() })?;
                Ok((t.clone(), topic.partitions.len() as u32))
            })
            .collect()
    }

    /// Copies the dead letters of `group` to their dead-letter topics
    /// (acks=all), then marks them done. A copy that fails is tried again
    /// on the next round; one that succeeded before a crash is copied again
    /// (at-least-once).
    pub(crate) async fn copy_dead_letters(self: &Arc<Self>, group: &str) -> Result<usize, GroupOpError> {
        let pending: Vec<(TopicPartition, DeadLetter)> = self
            .read_group(group, |g| {
                let Some(share) = g.and_then(Group::share) else { return Vec::new() };
                share
                    .partitions()
                    .iter()
                    .flat_map(|(tp, p)| p.dead_letters().into_iter().map(move |d| (tp.clone(), d)))
                    .collect()
            })
            .await?;
        let mut copied = Vec::new();
        for (tp, dead) in pending {
            match self.copy_dead_letter(group, &tp, dead).await {
                Ok(()) => copied.push((tp, dead.offset)),
                Err(e) => {
                    tracing::warn!(group, topic = %tp.0, partition = tp.1, offset = dead.offset, error = %e, "copying a dead letter failed; will retry");
                    break;
                }
            }
        }
        if copied.is_empty() {
            return Ok(0);
        }
        self.with_group(group, |current, _| {
            let Some(mut g) = current else { return Ok((None, 0)) };
            let mut n = 0;
            if let Some(share) = g.share_mut() {
                for (tp, offset) in &copied {
                    if let Some(p) = share.partition_mut(tp) {
                        p.archive(*offset);
                        n += 1;
                    }
                }
            }
            Ok((Some(g), n))
        })
        .await
    }

    async fn copy_dead_letter(
        self: &Arc<Self>,
        group: &str,
        (topic, partition): &TopicPartition,
        dead: DeadLetter,
    ) -> Result<(), GroupOpError> {
        let read = Read { topic: topic.clone(), partition: *partition, offset: dead.offset, max_bytes: 1 };
        let got = self.read_anywhere(vec![read], 1, Duration::ZERO, false).await.pop().expect("one read");
        let bytes = match got.records {
            Ok(bytes) => bytes,
            // Gone from the log (retention): nothing left to copy.
            Err(FetchError::Read(quiver_log::ReadError::OffsetOutOfRange { .. })) => return Ok(()),
            Err(FetchError::AtLeader { error, .. }) if error.code == quiver_protocol::ErrorCode::OffsetOutOfRange => {
                return Ok(());
            }
            Err(e) => {
                return Err(GroupOpError::Invalid(format!(
                    "reading dead letter {topic}-{partition}@{}: {e}",
                    dead.offset
                )));
            }
        };
        let record = Batches::new(bytes)
            .filter_map(Result::ok)
            .filter_map(|(_, batch)| decode_records(&batch).ok())
            .flatten()
            .find(|r| r.offset == dead.offset);
        let Some(record) = record else {
            if got.log_start_offset > dead.offset {
                return Ok(());
            }
            return Err(GroupOpError::Invalid(format!("dead letter {topic}-{partition}@{} not found", dead.offset)));
        };
        let dlq = dead_letter_topic(topic);
        self.ensure_dead_letter_topic(&dlq).await?;
        let reason = if dead.rejected { "rejected" } else { "delivery limit" };
        let extra = [
            group.to_owned(),
            topic.clone(),
            partition.to_string(),
            dead.offset.to_string(),
            dead.delivery_count.to_string(),
            reason.to_owned(),
        ];
        let mut headers = record.headers.clone();
        headers.extend(
            DLQ_HEADERS
                .iter()
                .zip(extra)
                .map(|(k, v)| quiver_protocol::batch::Header { key: (*k).to_owned(), value: Some(Bytes::from(v)) }),
        );
        let mut batch = BatchBuilder::new(Compression::None);
        batch.append(record.timestamp, record.key.as_deref(), record.value.as_deref(), &headers);
        let write = Write::new(dlq.clone(), PARTITION_ANY, batch.build());
        let written = self.write(vec![write], Acks::All, None).await;
        match written.map(|mut all| all.pop()) {
            Ok(Some(Ok(_))) => Ok(()),
            Ok(Some(Err(source))) | Err(source) => Err(GroupOpError::Store { group: group.to_owned(), source }),
            Ok(None) => Err(GroupOpError::Invalid("no write result".into())),
        }
    }

    /// Creates a dead-letter topic (one partition, the cluster's usual
    /// replication) unless it exists.
    async fn ensure_dead_letter_topic(&self, dlq: &str) -> Result<(), GroupOpError> {
        if self.controller.image().borrow().topics.contains_key(dlq) {
            return Ok(());
        }
        let new = NewTopic {
            name: dlq.to_owned(),
            partitions: 1,
            replication_factor: self.internal_replication_factor(),
            configs: Vec::new(),
        };
        tracing::info!(topic = dlq, "creating a dead-letter topic");
        self.create_topic_unless_exists(&new)
            .await
            .map_err(|e| GroupOpError::Invalid(format!("creating dead-letter topic {dlq}: {e}")))
    }
}

/// The offsets a read made available: up to the end of its last whole
/// batch, never past the high watermark.
fn readable_end(bytes: &Bytes, high_watermark: i64) -> i64 {
    let mut end = i64::MIN;
    for (header, _) in Batches::new(bytes.clone()).filter_map(Result::ok) {
        end = end.max(header.next_offset());
    }
    end.min(high_watermark)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_makes_its_whole_batches_available_below_the_high_watermark() {
        let mut batch = BatchBuilder::new(Compression::None);
        for v in [b"a", b"b", b"c"] {
            batch.append(0, None, Some(v), &[]);
        }
        let bytes = batch.build();
        assert_eq!(readable_end(&bytes, 10), 3);
        assert_eq!(readable_end(&bytes, 2), 2);
        let empty = readable_end(&Bytes::new(), 10);
        assert!((5..empty).is_empty(), "nothing read: nothing to hand out");
    }
}
