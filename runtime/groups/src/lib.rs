//! Consumer-group coordination in the manner of Kafka's KIP-848, as plain
//! types: no I/O, no clock — time is passed in (`now_ms`), so every rule is
//! tested on a virtual clock. The broker that leads a group's partition of
//! the offsets topic feeds it heartbeats and ticks and carries out what it
//! answers.
//!
//! The protocol, from a member's side: it heartbeats with its member epoch
//! (0 to join, -1 to leave, -2 to leave for a moment as a static member),
//! its subscription and the partitions it owns. The coordinator keeps a
//! *group epoch* that moves whenever the membership, a subscription or a
//! subscribed topic's partition count changes, computes a *target
//! assignment* for it with a server-side [`Assignor`], and moves each
//! member toward its target one safe step at a time:
//!
//! - partitions the member must give up are revoked first (it keeps the
//!   rest and confirms by heartbeating without them);
//! - partitions it gains are handed over only once no other member still
//!   owns them, so no partition ever has two owners;
//! - once its assignment matches the target, the member moves to the
//!   target's epoch.
//!
//! A member that stops heartbeating for its session timeout is fenced (its
//! partitions go back to the pool); one that holds partitions it was asked
//! to revoke past the rebalance timeout is fenced too. A static member
//! (`instance_id`) that leaves with epoch -2 keeps its assignment for its
//! session: back in time, under a new member id, it gets the same
//! partitions with no rebalance.

#![forbid(unsafe_code)]

pub mod assignor;
mod group;
mod records;
pub mod share;

use std::collections::{BTreeMap, BTreeSet};

pub use assignor::Assignor;
pub use group::{Committed, Group, Member, MemberState};

pub use records::{Record, RecordKey, RecordValue, changes};

/// A member's id in its group, chosen by the coordinator at join.
pub type MemberId = String;
/// (topic, partition)
pub type TopicPartition = (String, u32);
/// Partitions per topic.
pub type Assignment = BTreeMap<String, BTreeSet<u32>>;

/// Member epoch a member joins with.
pub const JOIN_EPOCH: i32 = 0;
/// Member epoch a member leaves with.
pub const LEAVE_EPOCH: i32 = -1;
/// Member epoch a static member leaves with for a moment (a restart).
pub const STATIC_LEAVE_EPOCH: i32 = -2;

/// A group's timing and assignor (broker defaults, overridable per group).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupConfig {
    /// A member not heard from for this long is fenced (Kafka's
    /// `group.consumer.session.timeout.ms`, 45 s).
    pub session_timeout_ms: u64,
    /// How often members heartbeat (5 s).
    pub heartbeat_interval_ms: u64,
    /// How long a member may hold partitions it was asked to revoke.
    pub rebalance_timeout_ms: u64,
    pub assignor: Assignor,
    /// Share groups: locks, deliveries, records in flight.
    pub share: share::ShareConfig,
    /// Share groups: where a partition the group never read starts.
    pub share_reset: share::ShareReset,
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig {
            session_timeout_ms: 45_000,
            heartbeat_interval_ms: 5_000,
            rebalance_timeout_ms: 300_000,
            assignor: Assignor::Uniform,
            share: share::ShareConfig::default(),
            share_reset: share::ShareReset::Latest,
        }
    }
}

/// A group's own timings over the broker's defaults (Kafka 4's group
/// configs `consumer.session.timeout.ms`, `consumer.heartbeat.interval.ms`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GroupOverrides {
    pub session_timeout_ms: Option<u64>,
    pub heartbeat_interval_ms: Option<u64>,
    /// Share groups (Kafka's `share.record.lock.duration.ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_lock_timeout_ms: Option<u64>,
    /// Share groups (Kafka's `share.delivery.count.limit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_delivery_attempts: Option<u32>,
    /// Share groups (Kafka's `share.auto.offset.reset`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_reset: Option<share::ShareReset>,
}

/// Shortest heartbeat interval a group may ask for.
pub const HEARTBEAT_INTERVAL_MS_MIN: u64 = 50;

impl GroupOverrides {
    pub fn is_empty(&self) -> bool {
        *self == GroupOverrides::default()
    }

    /// `defaults` with these overrides, if the result makes sense: a
    /// heartbeat interval of at least [`HEARTBEAT_INTERVAL_MS_MIN`] and a
    /// session longer than it.
    pub fn apply(&self, defaults: GroupConfig) -> Result<GroupConfig, GroupError> {
        let config = GroupConfig {
            session_timeout_ms: self.session_timeout_ms.unwrap_or(defaults.session_timeout_ms),
            heartbeat_interval_ms: self.heartbeat_interval_ms.unwrap_or(defaults.heartbeat_interval_ms),
            share: share::ShareConfig {
                lock_timeout_ms: self.share_lock_timeout_ms.unwrap_or(defaults.share.lock_timeout_ms),
                max_delivery_attempts: self.share_delivery_attempts.unwrap_or(defaults.share.max_delivery_attempts),
                ..defaults.share
            },
            share_reset: self.share_reset.unwrap_or(defaults.share_reset),
            ..defaults
        };
        if config.share.lock_timeout_ms == 0 || config.share.max_delivery_attempts == 0 {
            return Err(GroupError::Invalid("share lock timeout and delivery attempts must be at least 1".to_string()));
        }
        if config.heartbeat_interval_ms < HEARTBEAT_INTERVAL_MS_MIN {
            return Err(GroupError::Invalid(format!(
                "heartbeat interval {} ms is below the minimum of {HEARTBEAT_INTERVAL_MS_MIN} ms",
                config.heartbeat_interval_ms
            )));
        }
        if config.session_timeout_ms <= config.heartbeat_interval_ms {
            return Err(GroupError::Invalid(format!(
                "session timeout {} ms must be longer than the heartbeat interval {} ms",
                config.session_timeout_ms, config.heartbeat_interval_ms
            )));
        }
        Ok(config)
    }
}

/// What a member consumes: topics by name, and (or) every topic whose
/// whole name matches a regular expression (Rust `regex` syntax, as
/// Kafka's RE2/J: no look-around), including topics created later.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Subscription {
    topics: BTreeSet<String>,
    pattern: Option<String>,
    /// The pattern compiled once: every heartbeat resolves it against
    /// every topic.
    #[serde(skip)]
    compiled: std::sync::OnceLock<Option<regex::Regex>>,
}

impl PartialEq for Subscription {
    fn eq(&self, other: &Self) -> bool {
        self.topics == other.topics && self.pattern == other.pattern
    }
}

impl Eq for Subscription {}

impl Subscription {
    /// Topics by name and (or) a pattern.
    pub fn new(names: impl IntoIterator<Item = impl Into<String>>, pattern: Option<&str>) -> Subscription {
        Subscription {
            topics: names.into_iter().map(Into::into).collect(),
            pattern: pattern.map(str::to_owned),
            compiled: std::sync::OnceLock::new(),
        }
    }

    pub fn topics(names: impl IntoIterator<Item = impl Into<String>>) -> Subscription {
        Subscription::new(names, None)
    }

    pub fn pattern(pattern: &str) -> Subscription {
        Subscription::new(Vec::<String>::new(), Some(pattern))
    }

    /// The topics it names.
    pub fn names(&self) -> &BTreeSet<String> {
        &self.topics
    }

    /// Its pattern, if it has one.
    pub fn regex(&self) -> Option<&str> {
        self.pattern.as_deref()
    }

    /// Checks the pattern; the matcher for [`Subscription::resolve`].
    pub(crate) fn matcher(&self) -> Result<Option<regex::Regex>, GroupError> {
        let Some(pattern) = &self.pattern else { return Ok(None) };
        regex::Regex::new(&format!("^(?:{pattern})$"))
            .map(Some)
            .map_err(|e| GroupError::Invalid(format!("subscription pattern '{pattern}': {e}")))
    }

    /// The topics of `existing` this subscription takes.
    pub fn resolve<'a>(&self, existing: impl IntoIterator<Item = &'a String>) -> BTreeSet<String> {
        let matcher = self.compiled.get_or_init(|| self.matcher().ok().flatten());
        existing
            .into_iter()
            .filter(|t| self.topics.contains(*t) || matcher.as_ref().is_some_and(|m| m.is_match(t)))
            .cloned()
            .collect()
    }
}

/// One heartbeat of a member.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Heartbeat {
    /// Empty when joining.
    pub member_id: MemberId,
    /// Set for a static member (`group.instance.id`).
    pub instance_id: Option<String>,
    pub member_epoch: i32,
    /// `None`: unchanged since the last heartbeat (required when joining).
    pub subscription: Option<Subscription>,
    /// The partitions the member owns now; `None`: unchanged.
    pub owned: Option<Assignment>,
}

/// What a member is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatAnswer {
    pub member_id: MemberId,
    pub member_epoch: i32,
    pub heartbeat_interval_ms: u64,
    /// The partitions the member should own from now on: revocations are
    /// applied at once, additions only once the member's epoch moved.
    pub assignment: Assignment,
}

/// Why a heartbeat was refused. The member must act as the variant says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    /// The member was fenced (or never joined): drop every partition
    /// without committing, and join again with epoch 0.
    #[error("member '{0}' is not a member of the group (fenced or never joined): join again")]
    UnknownMember(MemberId),
    /// The member's epoch is behind (a lost answer it cannot recover from,
    /// or a zombie): drop every partition and join again.
    #[error("member '{member}' is at epoch {got}, the group has it at {current}: join again")]
    FencedEpoch { member: MemberId, got: i32, current: i32 },
    /// Another member with this instance id is active.
    #[error("instance id '{0}' is in use by an active member")]
    InstanceInUse(String),
    #[error("{0}")]
    Invalid(String),
}

/// Why an offset commit was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    #[error(transparent)]
    Member(#[from] GroupError),
    /// The member commits for a partition it does not own.
    #[error("member '{member}' does not own {topic}-{partition}")]
    NotOwned { member: MemberId, topic: String, partition: u32 },
    /// A commit without a member (a consumer with hand-picked partitions)
    /// into a group whose members own its partitions.
    #[error("group '{0}' has active members: commit as one of them")]
    GroupActive(String),
}

/// A member fenced by a tick, and why (for the logs and metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fenced {
    pub member_id: MemberId,
    pub instance_id: Option<String>,
    pub reason: &'static str,
}
