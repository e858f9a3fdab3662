//! Consumer groups: finding a group's coordinator (creating the offsets
//! topic on first use), members' heartbeats, offset commits and fetches,
//! and listing, describing and deleting groups. The rules are
//! `quiver-groups`'; where a group lives and how it is stored,
//! `coordinator.rs`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use quiver_controller::NodeId;
use quiver_groups::share::ShareReset;
use quiver_groups::{Committed, Group, Heartbeat, HeartbeatAnswer, MemberState, Record, TopicPartition};
use quiver_protocol::batch::{BatchBuilder, Compression};
use quiver_protocol::messages::OFFSETS_TOPIC;

use crate::api::NewTopic;
use crate::api::{Acks, Write};
use crate::broker::{Broker, now_ms};
use crate::errors::{GroupOpError, PartitionError, ProduceError};
use crate::group_shards::{Shard, StoredKey, group_partition, validate_group_name};

/// Where a group is coordinated.
#[derive(Debug, Clone)]
pub(crate) struct Coordinates {
    /// Its partition of the offsets topic.
    pub(crate) partition: u32,
    /// That partition's leader and its address; `None` while offline.
    pub(crate) leader: Option<(NodeId, String)>,
}

/// One offset to commit.
#[derive(Debug, Clone)]
pub(crate) struct OffsetToCommit {
    pub(crate) topic: String,
    pub(crate) partition: u32,
    pub(crate) offset: i64,
    pub(crate) metadata: String,
}

/// A group as `ListGroups` shows it.
#[derive(Debug, Clone)]
pub(crate) struct GroupSummary {
    pub(crate) name: String,
    pub(crate) kind: &'static str,
    pub(crate) state: &'static str,
    pub(crate) members: usize,
}

pub(crate) const SESSION_TIMEOUT: &str = "session.timeout.ms";
pub(crate) const HEARTBEAT_INTERVAL: &str = "heartbeat.interval.ms";
const REBALANCE_TIMEOUT: &str = "rebalance.timeout.ms";
pub(crate) const SHARE_LOCK: &str = "share.record.lock.duration.ms";
pub(crate) const SHARE_ATTEMPTS: &str = "share.delivery.count.limit";
pub(crate) const SHARE_RESET: &str = "share.auto.offset.reset";

/// A group's effective timings (and a share group's limits), as configs.
pub(crate) fn group_configs(g: &Group) -> Vec<(String, String)> {
    let c = g.config();
    let mut configs = vec![
        (SESSION_TIMEOUT.to_owned(), c.session_timeout_ms.to_string()),
        (HEARTBEAT_INTERVAL.to_owned(), c.heartbeat_interval_ms.to_string()),
        (REBALANCE_TIMEOUT.to_owned(), c.rebalance_timeout_ms.to_string()),
    ];
    let o = g.overrides();
    let share_set = o.share_lock_timeout_ms.is_some() || o.share_delivery_attempts.is_some() || o.share_reset.is_some();
    if g.is_share() || share_set {
        configs.extend([
            (SHARE_LOCK.to_owned(), c.share.lock_timeout_ms.to_string()),
            (SHARE_ATTEMPTS.to_owned(), c.share.max_delivery_attempts.to_string()),
            (SHARE_RESET.to_owned(), reset_name(c.share_reset).to_owned()),
        ]);
    }
    configs
}

fn reset_name(reset: ShareReset) -> &'static str {
    match reset {
        ShareReset::Earliest => "earliest",
        ShareReset::Latest => "latest",
    }
}

/// The keys of [`group_configs`] the group set itself.
pub(crate) fn overridden(g: &Group) -> Vec<String> {
    let o = g.overrides();
    let mut keys = Vec::new();
    if o.session_timeout_ms.is_some() {
        keys.push(SESSION_TIMEOUT.to_owned());
    }
    if o.heartbeat_interval_ms.is_some() {
        keys.push(HEARTBEAT_INTERVAL.to_owned());
    }
    if o.share_lock_timeout_ms.is_some() {
        keys.push(SHARE_LOCK.to_owned());
    }
    if o.share_delivery_attempts.is_some() {
        keys.push(SHARE_ATTEMPTS.to_owned());
    }
    if o.share_reset.is_some() {
        keys.push(SHARE_RESET.to_owned());
    }
    keys
}

/// Longest commit metadata kept (Kafka's `offset.metadata.max.bytes`).
const COMMIT_METADATA_BYTES_MAX: usize = 4096;

/// `consumer` or `share`.
pub(crate) fn group_kind(g: &Group) -> &'static str {
    if g.is_share() { "share" } else { "consumer" }
}

/// `empty` (no members), `stable` (every member owns its target at the
/// group's epoch; a share group's members share every partition) or
/// `reconciling`.
pub(crate) fn group_state(g: &Group) -> &'static str {
    if g.is_empty() {
        "empty"
    } else if g.is_share() || g.members().all(|m| m.state == MemberState::Stable && m.epoch == g.epoch() && !m.away) {
        "stable"
    } else {
        "reconciling"
    }
}

impl Broker {
    /// Where `group` is coordinated; creates the offsets topic if this is
    /// the cluster's first group request.
    pub(crate) async fn find_coordinator(&self, group: &str) -> Result<Coordinates, GroupOpError> {
        validate_group_name(group)?;
        let exists = self.controller.image().borrow().topics.contains_key(OFFSETS_TOPIC);
        if !exists {
            self.create_offsets_topic().await?;
        }
        // Created by another request and not in this broker's image yet
        // (past the wait): the client asks again.
        self.coordinates_in(OFFSETS_TOPIC, |count| group_partition(group, count)).ok_or(GroupOpError::NotCoordinator {
            me: self.config.node_id,
            group: group.to_owned(),
            partition: 0,
        })
    }

    /// The leader of partition `partition_of(partition count)` of the
    /// internal `topic` as this broker's image has it (`None` while the
    /// topic is not in the image).
    pub(crate) fn coordinates_in(&self, topic: &str, partition_of: impl FnOnce(u32) -> u32) -> Option<Coordinates> {
        let image = self.controller.image();
        let image = image.borrow();
        let topic = image.topics.get(topic)?;
        let partition = partition_of(topic.partitions.len() as u32);
        let leader = topic
            .partitions
            .get(partition as usize)
            .and_then(|p| p.leader)
            .and_then(|leader| image.brokers.get(&leader).map(|b| (leader, b.address.clone())));
        Some(Coordinates { partition, leader })
    }

    async fn create_offsets_topic(&self) -> Result<(), GroupOpError> {
        let replication_factor = match self.config.offsets_topic_replication_factor {
            0 => self.internal_replication_factor(),
            n => n,
        };
        let new = NewTopic {
            name: OFFSETS_TOPIC.to_owned(),
            partitions: self.config.offsets_topic_partitions,
            replication_factor,
            // Compacted, never deleted by age: retention would drop the
            // records of groups that did not change lately; compaction
            // keeps each key's latest (Kafka's offsets.topic.segment.bytes).
            configs: vec![
                ("cleanup.policy".into(), "compact".into()),
                ("segment.bytes".into(), (100 * 1024 * 1024).to_string()),
            ],
        };
        tracing::info!(partitions = new.partitions, replication_factor, "creating the offsets topic");
        // Another group request may have created it meanwhile.
        self.create_topic_unless_exists(&new).await.map_err(GroupOpError::OffsetsTopic)
    }

    /// A member's heartbeat (join, stay, leave).
    pub(crate) async fn group_heartbeat(
        self: &Arc<Self>,
        group: &str,
        hb: Heartbeat,
    ) -> Result<HeartbeatAnswer, GroupOpError> {
        let topics = self.subscribable_topics();
        let defaults = self.config.group_defaults;
        self.with_group(group, |current, now| {
            let mut g = match current {
                Some(g) => g,
                // Only a join creates a group.
                None if hb.member_epoch == quiver_groups::JOIN_EPOCH => Group::new(group, defaults),
                None => {
                    let source = quiver_groups::GroupError::UnknownMember(hb.member_id.clone());
                    return Err(GroupOpError::Member { group: group.to_owned(), source });
                }
            };
            let answer = g.heartbeat(now, hb, &topics).map_err(|source| member_error(group, source))?;
            Ok((Some(g), answer))
        })
        .await
    }

    /// Commits offsets for `group`, all or none: as member `member_id` at
    /// `member_epoch` for partitions it owns, or (empty id, epoch -1) into
    /// a group without members. With `producer_id`, in that producer's
    /// transaction: checked the same, held apart until the transaction
    /// ends.
    pub(crate) async fn commit_offsets(
        self: &Arc<Self>,
        group: &str,
        member_id: &str,
        member_epoch: i32,
        producer_id: Option<i64>,
        offsets: Vec<OffsetToCommit>,
    ) -> Result<(), GroupOpError> {
        let committed = self.checked_commits(offsets)?;
        let defaults = self.config.group_defaults;
        self.with_group(group, |current, _| {
            let mut g = current.unwrap_or_else(|| Group::new(group, defaults));
            let members = g.members().count();
            match producer_id {
                None => g.commit(member_id, member_epoch, committed),
                Some(producer_id) => g.commit_transactional(member_id, member_epoch, producer_id, committed),
            }
            .map_err(|e| commit_error(group, members, e))?;
            Ok((Some(g), ()))
        })
        .await
    }

    /// A transaction that committed offsets of `group` ended (its
    /// coordinator's marker): they become the group's, or are dropped.
    pub(crate) async fn end_group_transaction(
        self: &Arc<Self>,
        group: &str,
        producer_id: i64,
        commit: bool,
    ) -> Result<(), GroupOpError> {
        self.with_group(group, |current, _| {
            let Some(mut g) = current else { return Ok((None, ())) };
            g.end_transaction(producer_id, commit);
            Ok((Some(g), ()))
        })
        .await
    }

    fn checked_commits(&self, offsets: Vec<OffsetToCommit>) -> Result<Vec<(TopicPartition, Committed)>, GroupOpError> {
        let image = self.controller.image();
        let image = image.borrow();
        let at_ms = now_ms();
        offsets
            .into_iter()
            .map(|o| {
                let count = image
                    .topics
                    .get(&o.topic)
                    .map(|t| t.partitions.len() as u32)
                    .ok_or_else(|| PartitionError::UnknownTopic { topic: o.topic.clone() })?;
                if o.partition >= count {
                    return Err(
                        PartitionError::UnknownPartition { topic: o.topic, partition: o.partition, count }.into()
                    );
                }
                if o.offset < 0 {
                    return Err(GroupOpError::Invalid(format!(
                        "{}-{}: offset {} is negative",
                        o.topic, o.partition, o.offset
                    )));
                }
                if o.metadata.len() > COMMIT_METADATA_BYTES_MAX {
                    return Err(GroupOpError::Invalid(format!(
                        "{}-{}: commit metadata is longer than {COMMIT_METADATA_BYTES_MAX} bytes",
                        o.topic, o.partition
                    )));
                }
                Ok(((o.topic, o.partition), Committed { offset: o.offset, metadata: o.metadata, at_ms }))
            })
            .collect()
    }

    /// Committed offsets of `group` (of `partitions`, or all); a group
    /// that does not exist has none.
    pub(crate) async fn fetch_offsets(
        &self,
        group: &str,
        partitions: Option<Vec<TopicPartition>>,
    ) -> Result<Vec<(TopicPartition, Committed)>, GroupOpError> {
        self.read_group(group, |g| {
            let Some(g) = g else { return Ok(Vec::new()) };
            match partitions {
                None => Ok(g.offsets().iter().map(|(tp, c)| (tp.clone(), c.clone())).collect()),
                Some(wanted) => {
                    // A member starting from an offset an open transaction
                    // is about to move would read its records again.
                    if let Some((topic, partition)) = wanted.iter().find(|(t, p)| g.has_pending(t, *p)) {
                        return Err(GroupOpError::Unstable {
                            group: group.to_owned(),
                            topic: topic.clone(),
                            partition: *partition,
                        });
                    }
                    Ok(wanted
                        .into_iter()
                        .filter_map(|(topic, partition)| {
                            let c = g.committed(&topic, partition)?.clone();
                            Some(((topic, partition), c))
                        })
                        .collect())
                }
            }
        })
        .await?
    }

    /// The groups this broker coordinates.
    pub(crate) async fn list_groups(&self) -> Vec<GroupSummary> {
        self.all_groups(|g| GroupSummary {
            name: g.name().to_owned(),
            kind: group_kind(g),
            state: group_state(g),
            members: g.members().count() + g.share().map_or(0, |s| s.members().count()),
        })
        .await
    }

    pub(crate) async fn describe_group(&self, group: &str) -> Result<Group, GroupOpError> {
        self.read_group(group, |g| g.cloned()).await?.ok_or_else(|| GroupOpError::UnknownGroup(group.to_owned()))
    }

    /// Deletes a group without members, and its committed offsets.
    pub(crate) async fn delete_group(self: &Arc<Self>, group: &str) -> Result<(), GroupOpError> {
        self.with_group(group, |current, _| match current {
            None => Err(GroupOpError::UnknownGroup(group.to_owned())),
            Some(g) if !g.is_empty() => {
                Err(GroupOpError::NotEmpty { group: group.to_owned(), members: g.members().count() })
            }
            Some(_) => Ok((None, ())),
        })
        .await
    }

    /// Sets a group's own timings (`session.timeout.ms`,
    /// `heartbeat.interval.ms`; an empty value returns a key to the
    /// broker's default), creating the group if needed; returns its
    /// effective timings.
    pub(crate) async fn alter_group_config(
        self: &Arc<Self>,
        group: &str,
        configs: Vec<(String, String)>,
    ) -> Result<Vec<(String, String)>, GroupOpError> {
        let defaults = self.config.group_defaults;
        self.with_group(group, |current, _| {
            let mut g = current.unwrap_or_else(|| Group::new(group, defaults));
            let mut overrides = g.overrides();
            for (key, value) in &configs {
                let number = || -> Result<Option<u64>, GroupOpError> {
                    match value.as_str() {
                        "" => Ok(None),
                        v => v.parse::<u64>().map(Some).map_err(|_| {
                            GroupOpError::Invalid(format!("group config {key}: '{v}' is not a non-negative integer"))
                        }),
                    }
                };
                match key.as_str() {
                    SESSION_TIMEOUT => overrides.session_timeout_ms = number()?,
                    HEARTBEAT_INTERVAL => overrides.heartbeat_interval_ms = number()?,
                    SHARE_LOCK => overrides.share_lock_timeout_ms = number()?,
                    SHARE_ATTEMPTS => {
                        overrides.share_delivery_attempts = number()?.map(|n| n.min(u64::from(u32::MAX)) as u32)
                    }
                    SHARE_RESET => {
                        overrides.share_reset = match value.as_str() {
                            "" => None,
                            "earliest" => Some(ShareReset::Earliest),
                            "latest" => Some(ShareReset::Latest),
                            v => {
                                return Err(GroupOpError::Invalid(format!(
                                    "group config {key}: '{v}' is neither earliest nor latest"
                                )));
                            }
                        }
                    }
                    other => {
                        return Err(GroupOpError::Invalid(format!(
                            "unknown group config '{other}': {SESSION_TIMEOUT}, {HEARTBEAT_INTERVAL}, {SHARE_LOCK}, \
                             {SHARE_ATTEMPTS} and {SHARE_RESET} can be set"
                        )));
                    }
                }
            }
            g.set_overrides(overrides).map_err(|source| member_error(group, source))?;
            let effective = group_configs(&g);
            Ok((Some(g), effective))
        })
        .await
    }

    /// Appends a group's changes to its partition, acks=all. On failure
    /// the shard is marked stale (reloaded from the log).
    pub(crate) async fn store(
        self: &Arc<Self>,
        shard: &Shard,
        group: &str,
        records: Vec<Record>,
    ) -> Result<(), GroupOpError> {
        let batch = encode_records(group, &records);
        let write = Write::new(OFFSETS_TOPIC, shard.partition.id, batch);
        let written = match self.write(vec![write], Acks::All, None).await {
            Ok(mut results) => results.pop().unwrap_or_else(|| Err(ProduceError::Internal("no write result".into()))),
            Err(e) => Err(e),
        };
        written.map(drop).map_err(|source| {
            shard.stale.store(true, Ordering::Release);
            tracing::warn!(group, partition = shard.partition.id, error = %source, "storing a group change failed");
            GroupOpError::Store { group: group.to_owned(), source }
        })
    }

    /// Every topic a group may subscribe to (internal ones are not), with
    /// its partition count.
    fn subscribable_topics(&self) -> BTreeMap<String, u32> {
        self.controller
            .image()
            .borrow()
            .topics
            .iter()
            .filter(|(name, _)| !name.starts_with("__"))
            .map(|(name, t)| (name.clone(), t.partitions.len() as u32))
            .collect()
    }
}

/// Why a commit (plain or transactional) of `group`, which has `members`,
/// was refused.
fn commit_error(group: &str, members: usize, e: quiver_groups::CommitError) -> GroupOpError {
    match e {
        quiver_groups::CommitError::GroupActive(_) => GroupOpError::NotEmpty { group: group.to_owned(), members },
        quiver_groups::CommitError::Member(source) => member_error(group, source),
        source => GroupOpError::Commit { group: group.to_owned(), source },
    }
}

/// A group's changes as one record batch: key `{"group", "key"}` (JSON),
/// value the new value (JSON), or none for a removed key (a tombstone).
fn encode_records(group: &str, records: &[Record]) -> Bytes {
    let mut batch = BatchBuilder::new(Compression::None);
    let now = now_ms();
    for r in records {
        let key = serde_json::to_vec(&StoredKey { group: group.to_owned(), key: r.key.clone() })
            .expect("group records serialize");
        let value = r.value.as_ref().map(|v| serde_json::to_vec(v).expect("group records serialize"));
        batch.append(now, Some(&key), value.as_deref(), &[]);
    }
    batch.build()
}

pub(crate) fn member_error(group: &str, source: quiver_groups::GroupError) -> GroupOpError {
    match source {
        quiver_groups::GroupError::Invalid(reason) => GroupOpError::Invalid(format!("group '{group}': {reason}")),
        source => GroupOpError::Member { group: group.to_owned(), source },
    }
}
