//! Why broker operations fail: one `thiserror` enum per operation —
//! [`ProduceError`], [`FetchError`], [`ListOffsetsError`] on the data path,
//! [`ReplicaError`] between replicas, [`AdminError`] and
//! [`PluginAdminError`] for administration — and the reasons they share
//! ([`PartitionError`], [`PluginCallError`], [`MetadataError`]). Each
//! variant is a reason a caller can act on; only the wire adapter
//! (`wire.rs`) turns them into protocol error codes.
//!
//! Also running blocking work off the runtime for an operation, whose
//! error type says when the blocking task died.

use std::time::Duration;

use quiver_controller::{ClusterImage, NodeId, Refusal, WriteError};
use quiver_log::{AppendError, ReadError, SequenceError};
use quiver_protocol::batch::BatchError;
use quiver_protocol::messages::*;
use quiver_protocol::{ErrorCode, WireError};
use quiver_replication::NotEnoughReplicas;

/// A partition cannot be used here for what was asked: it does not exist,
/// or this broker does not (yet) lead or hold it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PartitionError {
    #[error("topic '{topic}' does not exist")]
    UnknownTopic { topic: String },
    #[error("topic '{topic}' has {count} partitions; there is no partition {partition}")]
    UnknownPartition { topic: String, partition: u32, count: u32 },
    /// Another broker leads it; `address` is where.
    #[error("broker {me} is not the leader of {topic}-{partition}; broker {leader} at {address} is")]
    LedElsewhere { me: NodeId, topic: String, partition: u32, leader: NodeId, address: String },
    /// No in-sync replica is live.
    #[error("{topic}-{partition} is offline: none of its in-sync replicas {isr:?} is live (replicas {replicas:?})")]
    Offline { topic: String, partition: u32, isr: Vec<NodeId>, replicas: Vec<NodeId> },
    /// The image names this broker, but the topic is not open here yet (or
    /// is still the one deleted before under that name).
    #[error("broker {me} is opening {topic}-{partition}; retry shortly")]
    Opening { me: NodeId, topic: String, partition: u32 },
    #[error("broker {me} is opening topic '{topic}'; retry shortly")]
    OpeningTopic { me: NodeId, topic: String },
    #[error("broker {me} is becoming the leader of {topic}-{partition}; retry shortly")]
    Becoming { me: NodeId, topic: String, partition: u32 },
    #[error("broker {me} holds no replica of {topic}-{partition} yet")]
    NotHeld { me: NodeId, topic: String, partition: u32 },
    #[error("{topic}-{partition} is changing leader here; retry shortly")]
    ChangingLeader { topic: String, partition: u32 },
}

/// A request-path plugin (serializer, partitioner, filter, decoder) could
/// not do its work on a batch.
#[derive(Debug, thiserror::Error)]
pub enum PluginCallError {
    #[error("plugin '{name}' is not deployed")]
    NotDeployed { name: String },
    /// A deployed plugin of another kind than the call needs.
    #[error("{0}")]
    WrongKind(String),
    /// The plugin trapped, ran out of fuel or memory, or answered nonsense;
    /// `plugin` names it ("plugin 'x'", "partitioner 'x'").
    #[error("{plugin}: {detail}")]
    Failed { plugin: String, detail: String },
    /// The call was stopped (deadline, memory cap, trap) or its output was
    /// malformed.
    #[error("{plugin} {source}")]
    Stopped { plugin: String, source: quiver_plugin_host::CallError },
    /// The plugin refused a record (schema, validation).
    #[error("record {index} rejected by {what} '{name}': {message}")]
    Rejected { index: u32, what: &'static str, name: String, message: String },
    /// The batch given to it, or its output, does not decode.
    #[error("{0}")]
    Corrupt(BatchError),
    #[error("{0}")]
    Internal(String),
}

/// Why a write failed (or was not confirmed).
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    #[error(transparent)]
    Partition(#[from] PartitionError),
    #[error("broker is shutting down")]
    ShuttingDown,
    #[error("invalid record batch: {0}")]
    InvalidBatch(BatchError),
    #[error("{source} (topic '{topic}' max.message.bytes)")]
    RecordTooLarge { topic: String, source: BatchError },
    #[error("a batch of an idempotent producer must name its partition: sequence numbers are per partition")]
    UnplacedIdempotent,
    #[error(transparent)]
    Plugin(#[from] PluginCallError),
    /// An idempotent producer's batch out of order, stale or fenced.
    #[error("{topic}-{partition}: {source}")]
    Sequence { topic: String, partition: u32, source: SequenceError },
    #[error("{topic}-{partition}: {source}; acks=all writes are refused until replicas catch up")]
    NotEnoughReplicas { topic: String, partition: u32, source: NotEnoughReplicas },
    #[error("{0}")]
    Append(AppendError),
    #[error("fsync failed: {0}")]
    Sync(String),
    /// Appended, but the in-sync replicas did not confirm it: it may or may
    /// not be kept.
    #[error("leadership moved before the in-sync replicas confirmed the write: it may or may not be kept")]
    LeadershipMoved,
    #[error("the in-sync replicas did not confirm the write within {0:?}: it may or may not be kept")]
    NotConfirmed(Duration),
    /// A share of a `PARTITION_ANY` batch failed after others were
    /// appended: retrying the whole batch would write those twice.
    #[error("{0} (the records placed in other partitions were appended)")]
    AfterOtherShares(Box<ProduceError>),
    /// Forwarding to the leader failed before it answered.
    #[error("{}", .0.message)]
    Forward(WireError),
    #[error("{0}")]
    Internal(String),
    /// Forwarded to the partition's leader, which answered with an error
    /// (or did not answer: `may_be_kept`).
    #[error("{topic}-{partition} at its leader, broker {leader}: {}", .error.message)]
    AtLeader { topic: String, partition: u32, leader: NodeId, error: WireError },
    #[error("{topic}-{partition} forwarded to its leader, broker {leader}: {message}: it may or may not be kept")]
    ForwardUnknown { topic: String, partition: u32, leader: NodeId, message: String },
    /// A transactional batch without the request's transactional id, or
    /// a transactional id with batches that are not transactional.
    #[error("{0}")]
    TransactionalMismatch(&'static str),
    /// The partition could not join the producer's transaction.
    #[error("{topic}-{partition}: {source}")]
    Transaction { topic: String, partition: u32, source: std::sync::Arc<TxnOpError> },
}

/// Why a read from a partition failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Partition(#[from] PartitionError),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Plugin(#[from] PluginCallError),
    /// Read from another broker, which refused or could not be reached.
    #[error("broker {leader}: {error}")]
    AtLeader { leader: NodeId, error: WireError },
    #[error("{0}")]
    Internal(String),
}

/// Why an offset lookup failed.
#[derive(Debug, thiserror::Error)]
pub enum ListOffsetsError {
    #[error(transparent)]
    Partition(#[from] PartitionError),
    #[error(
        "{topic}-{partition}: its new leader's high watermark has not yet reached its predecessor's; retry shortly"
    )]
    NotAvailable { topic: String, partition: u32 },
    #[error("invalid timestamp {0}")]
    InvalidTimestamp(i64),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("{0}")]
    Internal(String),
}

/// `Ok` when `me` leads `topic`-`partition` in `image`; otherwise the error
/// a client needs to find the leader.
pub(crate) fn check_leader(me: u32, image: &ClusterImage, topic: &str, partition: u32) -> Result<(), PartitionError> {
    let t = image.topics.get(topic).ok_or_else(|| PartitionError::UnknownTopic { topic: topic.to_owned() })?;
    let p = t.partitions.get(partition as usize).ok_or_else(|| PartitionError::UnknownPartition {
        topic: topic.to_owned(),
        partition,
        count: t.partitions.len() as u32,
    })?;
    match p.leader {
        Some(l) if l == me => Ok(()),
        Some(leader) => Err(PartitionError::LedElsewhere {
            me,
            topic: topic.to_owned(),
            partition,
            leader,
            address: image.brokers.get(&leader).map_or_else(|| "?".to_owned(), |b| b.address.clone()),
        }),
        None => Err(PartitionError::Offline {
            topic: topic.to_owned(),
            partition,
            isr: p.isr.clone(),
            replicas: p.replicas.clone(),
        }),
    }
}

/// The Metadata entry of a topic that does not exist.
pub(crate) fn unknown_topic_metadata(name: String) -> TopicMetadata {
    TopicMetadata {
        name,
        error: ErrorCode::UnknownTopic,
        partitions: vec![],
        partitioner: String::new(),
        partitioner_version: 0,
    }
}

/// A restarted node that has not caught up with the metadata log yet.
#[derive(Debug, thiserror::Error)]
#[error("node {node} has not caught up with the metadata log since it started; retry shortly")]
pub struct NotReady {
    pub node: NodeId,
}

/// Why copying a partition between replicas failed: serving a follower's
/// fetch (on the leader) or carrying out a follower's step.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error(transparent)]
    Partition(#[from] PartitionError),
    #[error("broker {me} does not lead {topic}-{partition}")]
    NotLeading { me: NodeId, topic: String, partition: u32 },
    #[error("{topic}-{partition}: the follower is in leader epoch {theirs}, broker {me} leads epoch {mine}")]
    EpochMismatch { me: NodeId, topic: String, partition: u32, theirs: i32, mine: i32 },
    #[error("{topic}-{partition}: fetch offset {offset} is past the leader's log end {log_end}")]
    PastLogEnd { topic: String, partition: u32, offset: i64, log_end: i64 },
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("the leader is shutting down")]
    ShuttingDown,
    /// The leader (or the way to it) answered with an error.
    #[error("{}", .0.message)]
    Leader(WireError),
    #[error("{topic}-{partition}: the leader changed during the fetch")]
    LeaderMoved { topic: String, partition: u32 },
    #[error("replica fetch answered no partition")]
    EmptyAnswer,
    #[error("{0}")]
    CorruptCopy(BatchError),
    #[error("this replica's role changed while copying")]
    RoleChanged,
    #[error("the leader sent a batch at offset {base_offset} for a log ending at {log_end}")]
    OutOfPlace { base_offset: i64, log_end: i64 },
    #[error("{0}")]
    Storage(std::io::Error),
    #[error("{0}")]
    Append(AppendError),
    #[error("{0}")]
    Internal(String),
}

/// A change to the metadata log that was refused, could not be made, or
/// may or may not have been made.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("{}", .0.message)]
    Refused(Refusal),
    /// No leader, or it lost its majority: nothing was applied.
    #[error("{0}")]
    Unavailable(WriteError),
    #[error("{0}; the change may or may not have been made: check before retrying")]
    Unknown(WriteError),
    #[error("the metadata log answered {0}")]
    Unexpected(String),
}

impl From<WriteError> for MetadataError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Refused(r) => MetadataError::Refused(r),
            e @ (WriteError::NoQuorum(_) | WriteError::NotLeader { .. } | WriteError::Unreachable(_)) => {
                MetadataError::Unavailable(e)
            }
            e @ WriteError::Unknown(_) => MetadataError::Unknown(e),
        }
    }
}

/// Why a topic or cluster administration request failed: topics (create,
/// delete, describe), elections, reassignments, voters, producer ids.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    InvalidTopicName(String),
    #[error("{0}")]
    InvalidPartitions(String),
    #[error("{0}")]
    InvalidConfig(String),
    #[error("topic '{0}' already exists")]
    TopicExists(String),
    #[error("topic '{0}' does not exist")]
    UnknownTopic(String),
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error("{0}")]
    Storage(Box<dyn std::error::Error + Send + Sync>),
    #[error("controller message: {0}")]
    BadControllerMessage(serde_json::Error),
}

impl From<WriteError> for AdminError {
    fn from(e: WriteError) -> Self {
        AdminError::Metadata(e.into())
    }
}

/// Why a plugin administration request (deploy, control, list, fetch,
/// logs) failed.
#[derive(Debug, thiserror::Error)]
pub enum PluginAdminError {
    /// The request or the component is not a valid plugin deployment.
    #[error("{0}")]
    Invalid(String),
    #[error("plugin '{name}' is not deployed")]
    NotDeployed { name: String },
    #[error("topic '{0}' does not exist")]
    UnknownTopic(String),
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    /// In the metadata log, but not yet running where it must be.
    #[error("{0}")]
    NotApplied(String),
    #[error("{0}")]
    Storage(std::io::Error),
    #[error("{0}")]
    Internal(String),
}

impl From<WriteError> for PluginAdminError {
    fn from(e: WriteError) -> Self {
        PluginAdminError::Metadata(e.into())
    }
}

/// Why a consumer-group request (find coordinator, heartbeat, offsets,
/// list, describe, delete) failed.
#[derive(Debug, thiserror::Error)]
pub enum GroupOpError {
    /// The group's partition of the offsets topic is not led here (any
    /// more): the member finds the coordinator again.
    #[error(
        "broker {me} does not coordinate group '{group}' (partition {partition} of {OFFSETS_TOPIC} is not led here): \
         find the coordinator again"
    )]
    NotCoordinator { me: NodeId, group: String, partition: u32 },
    /// Just became coordinator: rebuilding its groups from the log.
    #[error("broker {me} is loading the groups of partition {partition} of {OFFSETS_TOPIC}; retry shortly")]
    Loading { me: NodeId, partition: u32 },
    #[error("group '{0}' does not exist")]
    UnknownGroup(String),
    #[error("group '{group}' has {members} active member(s): stop its consumers first")]
    NotEmpty { group: String, members: usize },
    #[error("{0}")]
    Invalid(String),
    /// A commit names a topic or partition that does not exist.
    #[error(transparent)]
    Partition(#[from] PartitionError),
    #[error("group '{group}': {source}")]
    Member { group: String, source: quiver_groups::GroupError },
    #[error("group '{group}': {source}")]
    Commit { group: String, source: quiver_groups::CommitError },
    /// Writing the group's change to the offsets topic failed: nothing
    /// changed (the coordinator reloads its groups from the log).
    #[error("group '{group}': storing the change in {OFFSETS_TOPIC} failed: {source}")]
    Store { group: String, source: ProduceError },
    /// Creating the offsets topic failed.
    #[error("creating {OFFSETS_TOPIC}: {0}")]
    OffsetsTopic(AdminError),
    #[error("group '{group}': an open transaction holds an offset of {topic}-{partition}; retry once it ends")]
    Unstable { group: String, topic: String, partition: u32 },
}

/// Why a transaction request (init, add, end, markers, list, describe,
/// abort) failed.
#[derive(Debug, thiserror::Error)]
pub enum TxnOpError {
    /// The id's partition of the state topic is not led here (any more):
    /// the producer finds the coordinator again.
    #[error(
        "broker {me} does not coordinate transactional id '{id}' (partition {partition} of {TRANSACTION_STATE_TOPIC} \
         is not led here): find the coordinator again"
    )]
    NotCoordinator { me: NodeId, id: String, partition: u32 },
    #[error(
        "broker {me} is loading the transactions of partition {partition} of {TRANSACTION_STATE_TOPIC}; retry shortly"
    )]
    Loading { me: NodeId, partition: u32 },
    #[error("transactional id '{id}': {source}")]
    Txn { id: String, source: quiver_transactions::TxnError },
    #[error("{0}")]
    Invalid(String),
    /// Writing the decision to the state topic failed: nothing changed
    /// (the coordinator reloads its transactions from the log).
    #[error("transactional id '{id}': storing the change in {TRANSACTION_STATE_TOPIC} failed: {source}")]
    Store { id: String, source: Box<ProduceError> },
    #[error("creating {TRANSACTION_STATE_TOPIC}: {0}")]
    StateTopic(AdminError),
    #[error("transactional id '{id}': a new producer id: {source}")]
    ProducerIds { id: String, source: AdminError },
    /// The end is decided and stored, but not every partition has its
    /// marker yet: the coordinator keeps writing them; the producer retries
    /// its end, which is answered once they are written.
    #[error("transactional id '{id}': {detail}; the coordinator keeps writing the markers: retry")]
    MarkersPending { id: String, detail: String },
    /// The coordinator, reached from a partition's leader, refused.
    #[error("transactional id '{id}' at its coordinator, broker {coordinator}: {}", .error.message)]
    AtCoordinator { id: String, coordinator: NodeId, error: WireError },
    /// A marker for a partition this broker cannot write.
    #[error(transparent)]
    Marker(Box<ProduceError>),
}

/// A blocking task that died (panicked) is an internal error of the
/// operation that ran it.
macro_rules! joined_as_internal {
    ($($error:ty),*) => {$(
        impl From<tokio::task::JoinError> for $error {
            fn from(e: tokio::task::JoinError) -> Self {
                <$error>::Internal(e.to_string())
            }
        }
    )*};
}
joined_as_internal!(PluginCallError, ProduceError, FetchError, ListOffsetsError, PluginAdminError, ReplicaError);

/// Runs blocking work off the runtime, for an operation whose error type
/// can say that the blocking task died.
pub(crate) async fn blocking_as<T: Send + 'static, E: From<tokio::task::JoinError> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, E> {
    tokio::task::spawn_blocking(f).await?
}
