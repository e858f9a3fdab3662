//! Requests and responses. Each request type names its API key, its version
//! and its response type; spec/protocol.md documents every field.

use bytes::Bytes;

use crate::codec::Wire;
use crate::error::ErrorCode;
use crate::{wire_enum, wire_struct};

/// API keys as they appear in request frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ApiKey {
    ApiVersions = 1,
    Metadata = 2,
    CreateTopic = 3,
    DeleteTopic = 4,
    DescribeTopics = 5,
    Produce = 6,
    Fetch = 7,
    ListOffsets = 8,
    PluginDeploy = 9,
    PluginList = 10,
    PluginControl = 11,
    PluginLogs = 12,
    PluginFetch = 13,
    /// Between brokers only (mutual TLS): the metadata quorum's messages.
    Controller = 14,
    ClusterInfo = 15,
    /// Between brokers only (mutual TLS): a follower copying a leader's log.
    ReplicaFetch = 16,
    /// Moves leaderships back to preferred replicas that are live and in sync.
    ElectLeaders = 17,
    /// Adds or removes voters of the metadata quorum.
    AlterVoters = 18,
    /// Moves a partition's replicas to other brokers.
    ReassignPartition = 19,
    /// Gives an idempotent producer its producer id.
    InitProducerId = 20,
    /// Which broker coordinates a consumer group.
    FindCoordinator = 21,
    /// A group member's heartbeat: join, stay, leave; its assignment.
    GroupHeartbeat = 22,
    OffsetCommit = 23,
    OffsetFetch = 24,
    ListGroups = 25,
    DescribeGroup = 26,
    DeleteGroup = 27,
    /// Sets a group's own timings over the broker's defaults.
    AlterGroupConfig = 28,
    /// A share group member's fetch: acknowledges what it processed,
    /// receives records under acquisition locks (queue semantics).
    ShareFetch = 29,
    /// Cleans a compacted topic's partitions on the answering broker now.
    CompactTopic = 30,
    /// Commits or aborts a producer's transaction (at its coordinator).
    EndTxn = 31,
    /// Partitions or groups' offsets join a transaction (at its
    /// coordinator): sent by a partition's leader on a transaction's first
    /// write there, and by a producer sending offsets.
    AddPartitionsToTxn = 32,
    /// Between brokers only: a coordinator's commit or abort markers, to
    /// the partitions' leaders.
    WriteTxnMarkers = 33,
    /// The transactions the answering broker coordinates.
    ListTransactions = 34,
    DescribeTransaction = 35,
    /// An operator aborts a hanging transaction (at its coordinator).
    AbortTransaction = 36,
    /// A transactional producer commits a group's offsets in its
    /// transaction (at the group's coordinator).
    TxnOffsetCommit = 37,
}

impl ApiKey {
    pub const ALL: [ApiKey; 37] = [
        ApiKey::ApiVersions,
        ApiKey::Metadata,
        ApiKey::CreateTopic,
        ApiKey::DeleteTopic,
        ApiKey::DescribeTopics,
        ApiKey::Produce,
        ApiKey::Fetch,
        ApiKey::ListOffsets,
        ApiKey::PluginDeploy,
        ApiKey::PluginList,
        ApiKey::PluginControl,
        ApiKey::PluginLogs,
        ApiKey::PluginFetch,
        ApiKey::Controller,
        ApiKey::ClusterInfo,
        ApiKey::ReplicaFetch,
        ApiKey::ElectLeaders,
        ApiKey::AlterVoters,
        ApiKey::ReassignPartition,
        ApiKey::InitProducerId,
        ApiKey::FindCoordinator,
        ApiKey::GroupHeartbeat,
        ApiKey::OffsetCommit,
        ApiKey::OffsetFetch,
        ApiKey::ListGroups,
        ApiKey::DescribeGroup,
        ApiKey::DeleteGroup,
        ApiKey::AlterGroupConfig,
        ApiKey::ShareFetch,
        ApiKey::CompactTopic,
        ApiKey::EndTxn,
        ApiKey::AddPartitionsToTxn,
        ApiKey::WriteTxnMarkers,
        ApiKey::ListTransactions,
        ApiKey::DescribeTransaction,
        ApiKey::AbortTransaction,
        ApiKey::TxnOffsetCommit,
    ];

    pub fn from_u16(key: u16) -> Option<ApiKey> {
        ApiKey::ALL.into_iter().find(|k| *k as u16 == key)
    }

    /// The versions of this API this build understands (inclusive).
    pub const fn supported_versions(self) -> (u16, u16) {
        match self {
            // v1 added the read-side filter and value decoding, v2 the
            // isolation level.
            ApiKey::Fetch => (2, 2),
            // v1 added each topic's partitioner.
            ApiKey::Metadata => (1, 1),
            // v1 added per-record placements for `PARTITION_ANY`, v2 the
            // transactional id.
            ApiKey::Produce => (2, 2),
            // v1 added transactional ids.
            ApiKey::InitProducerId => (1, 1),
            // v1 added coordinators of transactions.
            ApiKey::FindCoordinator => (1, 1),
            // v1 added built-in plugins, v2 the delivery guarantee.
            ApiKey::PluginDeploy => (2, 2),
            // v1 added replicas and in-sync replicas, v2 compaction.
            ApiKey::DescribeTopics => (2, 2),
            // v1 added cancellation.
            ApiKey::ReassignPartition => (1, 1),
            // v1 added the state store's topic, keys and bytes, v2 the
            // guarantee.
            ApiKey::PluginList => (2, 2),
            _ => (0, 0),
        }
    }
}

/// A request body with its API key, version and response type.
pub trait Request: Wire + Send + Sync {
    const API: ApiKey;
    const VERSION: u16 = 0;
    type Response: Wire + Send;
}

macro_rules! request {
    ($req:ident => $api:ident, $resp:ident) => {
        request!($req => $api version 0, $resp);
    };
    ($req:ident => $api:ident version $version:literal, $resp:ident) => {
        impl Request for $req {
            const API: ApiKey = ApiKey::$api;
            const VERSION: u16 = $version;
            type Response = $resp;
        }
        // The version a request is sent with is one this build serves: a
        // bump here without one in `supported_versions` (or the other way
        // round) does not compile.
        const _: () = {
            let (min, max) = ApiKey::$api.supported_versions();
            let version: u16 = $version;
            assert!(min <= version && version <= max, "a request version outside supported_versions");
        };
    };
}

wire_enum! {
    /// How many replicas must have a batch before the producer is answered.
    pub enum Acks {
        /// The producer does not wait for an answer.
        None = 0,
        /// The leader appended the batch (not yet fsynced unless the flush
        /// policy says so).
        Leader = 1,
        /// Every in-sync replica has the batch on disk (fsync).
        All = 2,
    }
}

/// `Produce` partition meaning "the broker chooses, with the topic's
/// partitioner plugin".
pub const PARTITION_ANY: u32 = u32::MAX;

/// `PartitionMetadata::leader` of a partition without a leader (offline).
pub const NO_LEADER: u32 = u32::MAX;

/// `ListOffsets` timestamp meaning "the first offset still in the log".
pub const OFFSET_EARLIEST: i64 = -2;
/// `ListOffsets` timestamp meaning "the offset the next record will get".
pub const OFFSET_LATEST: i64 = -1;
/// `ListOffsets` timestamp meaning "the last stable offset": where a
/// read_committed reader's log ends for now (Kafka's LATEST with
/// isolation read_committed).
pub const OFFSET_LAST_STABLE: i64 = -3;

wire_struct! {
    pub struct ApiVersionsRequest {
        pub client_software: String,
    }
}

wire_struct! {
    pub struct ApiVersionRange {
        pub api_key: u16,
        pub min_version: u16,
        pub max_version: u16,
    }
}

wire_struct! {
    pub struct ApiVersionsResponse {
        pub broker_software: String,
        pub node_id: u32,
        pub apis: Vec<ApiVersionRange>,
    }
}
request!(ApiVersionsRequest => ApiVersions, ApiVersionsResponse);

wire_struct! {
    pub struct MetadataRequest {
        /// `None` asks for every topic.
        pub topics: Option<Vec<String>>,
    }
}

wire_struct! {
    pub struct BrokerInfo {
        pub node_id: u32,
        pub address: String,
    }
}

wire_struct! {
    pub struct PartitionMetadata {
        pub partition: u32,
        pub leader: u32,
        pub leader_epoch: i32,
    }
}

wire_struct! {
    pub struct TopicMetadata {
        pub name: String,
        pub error: ErrorCode,
        pub partitions: Vec<PartitionMetadata>,
        /// The topic's partitioner plugin (empty: murmur2 of the key, as
        /// Kafka) and its deployed version, so that a client can run the
        /// same module locally (`PluginFetch`).
        pub partitioner: String,
        pub partitioner_version: u32,
    }
}

wire_struct! {
    pub struct MetadataResponse {
        pub brokers: Vec<BrokerInfo>,
        pub topics: Vec<TopicMetadata>,
    }
}
request!(MetadataRequest => Metadata version 1, MetadataResponse);

wire_struct! {
    pub struct CreateTopicRequest {
        pub name: String,
        pub partitions: u32,
        pub replication_factor: u16,
        /// Topic configs, e.g. ("retention.ms", "86400000").
        pub configs: Vec<(String, String)>,
    }
}

wire_struct! {
    pub struct CreateTopicResponse {
        /// The topic's effective configs, defaults filled in.
        pub configs: Vec<(String, String)>,
    }
}
request!(CreateTopicRequest => CreateTopic, CreateTopicResponse);

wire_struct! {
    pub struct DeleteTopicRequest {
        pub name: String,
    }
}

wire_struct! {
    pub struct DeleteTopicResponse {}
}
request!(DeleteTopicRequest => DeleteTopic, DeleteTopicResponse);

wire_struct! {
    pub struct DescribeTopicsRequest {
        /// `None` describes every topic; a named topic that does not exist
        /// fails the request with `UnknownTopic`.
        pub names: Option<Vec<String>>,
    }
}

wire_struct! {
    pub struct PartitionDescription {
        pub partition: u32,
        /// `NO_LEADER` when offline.
        pub leader: u32,
        pub leader_epoch: i32,
        /// Assignment order; the first is the preferred leader.
        pub replicas: Vec<u32>,
        pub isr: Vec<u32>,
        /// Log figures as the answering broker holds them; -1 and 0 when it
        /// holds no replica of the partition.
        pub log_start_offset: i64,
        pub high_watermark: i64,
        pub size_bytes: u64,
        pub segments: u32,
        /// For a compacted topic's replica on the answering broker.
        pub compaction: Option<CompactionStatus>,
    }
}

wire_struct! {
    /// Where the cleaner of one replica stands.
    pub struct CompactionStatus {
        /// Dirty bytes over all bytes the cleaner may touch, in thousandths.
        pub dirty_ratio_permille: u32,
        /// Offsets below this are cleaned.
        pub first_dirty_offset: i64,
        /// -1 when never cleaned.
        pub last_clean_ms: i64,
    }
}

wire_struct! {
    pub struct TopicDescription {
        pub name: String,
        pub configs: Vec<(String, String)>,
        pub partitions: Vec<PartitionDescription>,
    }
}

wire_struct! {
    pub struct DescribeTopicsResponse {
        pub topics: Vec<TopicDescription>,
    }
}
request!(DescribeTopicsRequest => DescribeTopics version 2, DescribeTopicsResponse);

wire_struct! {
    pub struct ProducePartition {
        pub topic: String,
        /// `PARTITION_ANY`: the broker picks each record's partition with the
        /// topic's partitioner plugin.
        pub partition: u32,
        /// One complete record batch (spec/log-format.md).
        pub records: Bytes,
    }
}

wire_struct! {
    pub struct ProduceRequest {
        /// The transactional producer's id, when its batches are
        /// transactional: the leader checks with its coordinator.
        pub transactional_id: Option<String>,
        pub acks: Acks,
        pub timeout_ms: u32,
        pub partitions: Vec<ProducePartition>,
    }
}

wire_struct! {
    pub struct ProducePartitionResult {
        pub topic: String,
        pub partition: u32,
        pub error: ErrorCode,
        pub message: String,
        /// Offset given to the first record of the batch (-1 on error, and
        /// for `PARTITION_ANY`, whose records land in several partitions).
        pub base_offset: i64,
        pub log_start_offset: i64,
        /// `PARTITION_ANY` only: where each record of the batch went, in
        /// batch order.
        pub placements: Vec<RecordPlacement>,
    }
}

wire_struct! {
    pub struct RecordPlacement {
        pub partition: u32,
        pub offset: i64,
    }
}

wire_struct! {
    pub struct ProduceResponse {
        pub partitions: Vec<ProducePartitionResult>,
    }
}
request!(ProduceRequest => Produce version 2, ProduceResponse);

wire_struct! {
    pub struct FetchPartition {
        pub topic: String,
        pub partition: u32,
        pub offset: i64,
        pub max_bytes: u32,
    }
}

wire_struct! {
    pub struct FetchRequest {
        /// How long the broker may hold the request waiting for `min_bytes`.
        pub max_wait_ms: u32,
        pub min_bytes: u32,
        /// Bound on the whole response's records (at least one batch is
        /// always returned when one is available, even if larger).
        pub max_bytes: u32,
        pub partitions: Vec<FetchPartition>,
        /// A deployed filter plugin to run on every batch before it is sent
        /// (empty: none), with its parameters.
        pub filter: String,
        pub filter_params: Vec<(String, String)>,
        /// Run each topic's key and value serializers' decode on the records.
        pub decode_values: bool,
        pub isolation: Isolation,
    }
}

wire_enum! {
    /// What a fetch may return of transactional data.
    pub enum Isolation {
        /// Everything up to the high watermark, aborted and open
        /// transactions' records included (Kafka's default).
        ReadUncommitted = 0,
        /// Only up to the last stable offset, with the aborted transactions
        /// in the range named so the reader drops their records.
        ReadCommitted = 1,
    }
}

wire_struct! {
    /// An aborted transaction with data in a read_committed fetch: its
    /// producer's transactional batches from `first_offset` up to the
    /// producer's abort marker are to be dropped.
    pub struct AbortedTransaction {
        pub producer_id: i64,
        pub first_offset: i64,
    }
}

wire_struct! {
    pub struct FetchPartitionResult {
        pub topic: String,
        pub partition: u32,
        pub error: ErrorCode,
        pub message: String,
        pub high_watermark: i64,
        pub log_start_offset: i64,
        /// Below it every transaction is decided (read_committed reads end
        /// there); `-1` when unknown.
        pub last_stable_offset: i64,
        /// read_committed only: the aborted transactions with data among
        /// `records`.
        pub aborted: Vec<AbortedTransaction>,
        /// Whole batches, concatenated. The first may start before the
        /// requested offset: clients skip records below it. Control
        /// batches (transaction markers) are never an application's.
        pub records: Bytes,
    }
}

wire_struct! {
    pub struct FetchResponse {
        pub partitions: Vec<FetchPartitionResult>,
    }
}
request!(FetchRequest => Fetch version 2, FetchResponse);

wire_struct! {
    pub struct ListOffsetsPartition {
        pub topic: String,
        pub partition: u32,
        /// `OFFSET_EARLIEST`, `OFFSET_LATEST`, or a timestamp in ms: the
        /// first offset whose record timestamp is at least this.
        pub timestamp: i64,
    }
}

wire_struct! {
    pub struct ListOffsetsRequest {
        pub partitions: Vec<ListOffsetsPartition>,
    }
}

wire_struct! {
    pub struct ListOffsetsPartitionResult {
        pub topic: String,
        pub partition: u32,
        pub error: ErrorCode,
        pub message: String,
        /// For a timestamp past every record, the high watermark.
        pub offset: i64,
        /// Timestamp of the record found, -1 when none or not a time query.
        pub timestamp: i64,
    }
}

wire_struct! {
    pub struct ListOffsetsResponse {
        pub partitions: Vec<ListOffsetsPartitionResult>,
    }
}
request!(ListOffsetsRequest => ListOffsets, ListOffsetsResponse);

wire_struct! {
    /// Deploys a plugin, or a new version of one (same name: replaced
    /// atomically; a transform resumes from its stored progress).
    pub struct PluginDeployRequest {
        pub name: String,
        /// transform | filter | serializer | partitioner: must match the
        /// component's own declaration.
        pub kind: String,
        /// The component (wasm32-wasip2); empty with `builtin`.
        pub wasm: Bytes,
        /// A plugin built into the broker instead of a component: `identity`
        /// (a native pass-through transform, the baseline of benchmarks).
        pub builtin: String,
        pub params: Vec<(String, String)>,
        /// Transforms: the input topic, the output topics, the poison-record
        /// policy (fail | skip | dead-letter=TOPIC) and where a first deploy
        /// starts (start | end | offset:N | @unix-ms).
        pub input: String,
        pub outputs: Vec<String>,
        pub on_error: String,
        pub start: String,
        /// Transforms: `exactly-once` (empty: the default; each step's
        /// outputs, state and progress in one transaction) or
        /// `at-least-once`.
        pub guarantee: String,
    }
}

wire_struct! {
    pub struct PluginDeployResponse {
        pub version: u32,
        pub sha256: String,
        pub abi_version: String,
    }
}
request!(PluginDeployRequest => PluginDeploy version 2, PluginDeployResponse);

wire_struct! {
    pub struct PluginListRequest {
        /// None: every plugin.
        pub names: Option<Vec<String>>,
    }
}

wire_struct! {
    pub struct PluginPartitionProgress {
        pub partition: u32,
        /// Next input offset the transform will process.
        pub next_offset: i64,
        pub high_watermark: i64,
    }
}

wire_struct! {
    pub struct PluginInfo {
        pub name: String,
        pub version: u32,
        pub kind: String,
        pub sha256: String,
        pub abi_version: String,
        pub size_bytes: u64,
        pub deployed_ms: i64,
        pub params: Vec<(String, String)>,
        pub input: String,
        pub outputs: Vec<String>,
        pub on_error: String,
        /// running | paused | failed
        pub state: String,
        /// Why it is paused or failed (empty otherwise).
        pub reason: String,
        pub progress: Vec<PluginPartitionProgress>,
        pub calls: u64,
        pub records_in: u64,
        pub records_out: u64,
        pub errors: u64,
        pub busy_ns: u64,
        /// A stateful transform's changelog topic (empty for any other
        /// plugin), and the keys and bytes of its stores for the input
        /// partitions the answering broker leads.
        pub state_topic: String,
        pub state_keys: u64,
        pub state_bytes: u64,
        /// Transforms: at-least-once | exactly-once.
        pub guarantee: String,
    }
}

wire_struct! {
    pub struct PluginListResponse {
        pub plugins: Vec<PluginInfo>,
    }
}
request!(PluginListRequest => PluginList version 2, PluginListResponse);

wire_enum! {
    pub enum PluginAction {
        Pause = 0,
        Resume = 1,
        Remove = 2,
    }
}

wire_struct! {
    pub struct PluginControlRequest {
        pub name: String,
        pub action: PluginAction,
    }
}

wire_struct! {
    pub struct PluginControlResponse {}
}
request!(PluginControlRequest => PluginControl, PluginControlResponse);

wire_struct! {
    pub struct PluginLogsRequest {
        pub name: String,
        /// Lines with a sequence number at least this.
        pub since: u64,
    }
}

wire_struct! {
    pub struct PluginLogLine {
        pub seq: u64,
        pub timestamp_ms: i64,
        pub level: String,
        pub message: String,
    }
}

wire_struct! {
    pub struct PluginLogsResponse {
        pub lines: Vec<PluginLogLine>,
    }
}
request!(PluginLogsRequest => PluginLogs, PluginLogsResponse);

wire_struct! {
    /// Downloads a deployed plugin's component, e.g. a topic's partitioner
    /// for a client to run locally.
    pub struct PluginFetchRequest {
        pub name: String,
    }
}

wire_struct! {
    pub struct PluginFetchResponse {
        pub name: String,
        pub version: u32,
        pub kind: String,
        pub sha256: String,
        pub params: Vec<(String, String)>,
        pub wasm: Bytes,
    }
}
request!(PluginFetchRequest => PluginFetch, PluginFetchResponse);

wire_struct! {
    /// A controller message between brokers: JSON defined by the
    /// quiver-controller crate. Served only on connections that presented a
    /// node certificate of the cluster's CA.
    pub struct ControllerCall {
        pub body: Bytes,
    }
}

wire_struct! {
    pub struct ControllerAnswer {
        pub body: Bytes,
    }
}
request!(ControllerCall => Controller, ControllerAnswer);

wire_struct! {
    pub struct ClusterInfoRequest {}
}

wire_struct! {
    pub struct ClusterNode {
        pub node_id: u32,
        pub address: String,
        /// Empty when none was given.
        pub rack: String,
        /// Missed its heartbeats: leads nothing, in no ISR.
        pub fenced: bool,
        /// A Raft voter of the metadata quorum (else a learner).
        pub voter: bool,
    }
}

wire_struct! {
    pub struct PartitionRef {
        pub topic: String,
        pub partition: u32,
    }
}

wire_struct! {
    pub struct ClusterInfoResponse {
        /// True: every node runs a metadata log (a single node's has one
        /// voter); false only from brokers of earlier releases.
        pub clustered: bool,
        /// The node that answered.
        pub node_id: u32,
        /// The metadata quorum's leader as the answering node knows it
        /// (`NO_LEADER` when there is none).
        pub controller_leader: u32,
        pub raft_term: u64,
        /// Index of the last metadata log entry applied by the answering node.
        pub metadata_applied: u64,
        pub nodes: Vec<ClusterNode>,
        pub topics: u32,
        pub partitions: u32,
        pub under_replicated: Vec<PartitionRef>,
        pub offline: Vec<PartitionRef>,
        /// Unclean leader elections recorded in the metadata (newest last).
        pub unclean_elections: Vec<PartitionRef>,
    }
}
request!(ClusterInfoRequest => ClusterInfo, ClusterInfoResponse);

wire_struct! {
    pub struct ReplicaFetchPartition {
        pub topic: String,
        pub partition: u32,
        /// The leader epoch the follower follows: a leader in another epoch
        /// refuses the fetch (`FencedLeaderEpoch` or `NotLeader`).
        pub leader_epoch: i32,
        /// The follower's log end: it holds (durably) every record below it.
        pub fetch_offset: i64,
        /// `>= 0`: no records, only "where does this epoch end in your log?"
        /// (answered in `epoch_end`), while the follower reconciles its log
        /// with a new leader.
        pub ask_epoch: i32,
    }
}

wire_struct! {
    pub struct ReplicaFetchRequest {
        /// The follower's node id (a replica of every partition asked for).
        pub replica_id: u32,
        pub max_wait_ms: u32,
        pub max_bytes: u32,
        pub partitions: Vec<ReplicaFetchPartition>,
    }
}

wire_struct! {
    pub struct ReplicaFetchResult {
        pub topic: String,
        pub partition: u32,
        pub error: ErrorCode,
        pub message: String,
        pub high_watermark: i64,
        pub log_start_offset: i64,
        /// The answer to `ask_epoch`: the largest epoch the leader knows that
        /// is at most the one asked and the offset where it ends; `-1, -1`
        /// when the leader knows no epoch that old.
        pub epoch_end_epoch: i32,
        pub epoch_end_offset: i64,
        /// Whole batches from `fetch_offset`, with the offsets and leader
        /// epochs the leader gave them.
        pub records: Bytes,
    }
}

wire_struct! {
    pub struct ReplicaFetchResponse {
        pub partitions: Vec<ReplicaFetchResult>,
    }
}
request!(ReplicaFetchRequest => ReplicaFetch, ReplicaFetchResponse);

wire_struct! {
    pub struct ElectLeadersRequest {}
}

wire_struct! {
    pub struct ElectLeadersResponse {
        /// The partitions whose leadership went back to their preferred
        /// (first) replica.
        pub elected: Vec<PartitionRef>,
    }
}
request!(ElectLeadersRequest => ElectLeaders, ElectLeadersResponse);

wire_struct! {
    pub struct AlterVotersRequest {
        /// Nodes that follow the metadata log (started brokers) to make voters.
        pub add: Vec<u32>,
        /// Voters to turn back into learners.
        pub remove: Vec<u32>,
    }
}

wire_struct! {
    pub struct AlterVotersResponse {
        /// The voters after the change.
        pub voters: Vec<u32>,
    }
}
request!(AlterVotersRequest => AlterVoters, AlterVotersResponse);

wire_struct! {
    pub struct ReassignPartitionRequest {
        pub topic: String,
        pub partition: u32,
        /// The new replicas, the first being the preferred leader.
        pub replicas: Vec<u32>,
        /// Stop the move in progress instead: back to the replicas it
        /// started from (`replicas` is then ignored).
        pub cancel: bool,
    }
}

wire_struct! {
    pub struct ReassignPartitionResponse {}
}
request!(ReassignPartitionRequest => ReassignPartition version 1, ReassignPartitionResponse);

wire_struct! {
    pub struct InitProducerIdRequest {
        /// `None`: an idempotent producer (any broker answers). `Some`: a
        /// transactional one, sent to the id's coordinator, which bumps the
        /// id's epoch and so fences every older instance.
        pub transactional_id: Option<String>,
        pub transaction_timeout_ms: u32,
    }
}

wire_struct! {
    pub struct InitProducerIdResponse {
        /// Unique in the cluster, never handed out twice.
        pub producer_id: i64,
        /// The epoch to start at.
        pub producer_epoch: i16,
    }
}
request!(InitProducerIdRequest => InitProducerId version 1, InitProducerIdResponse);

/// The internal topic transactions' state lives in.
pub const TRANSACTION_STATE_TOPIC: &str = "__transaction_state";

wire_struct! {
    pub struct EndTxnRequest {
        pub transactional_id: String,
        pub producer_id: i64,
        pub producer_epoch: i16,
        /// Commit, else abort.
        pub commit: bool,
    }
}

wire_struct! {
    /// The transaction is ended (its markers written): the producer id and
    /// epoch for the next one.
    pub struct EndTxnResponse {
        pub producer_id: i64,
        pub producer_epoch: i16,
    }
}
request!(EndTxnRequest => EndTxn, EndTxnResponse);

wire_struct! {
    pub struct AddPartitionsToTxnRequest {
        pub transactional_id: String,
        pub producer_id: i64,
        pub producer_epoch: i16,
        pub partitions: Vec<PartitionRef>,
        /// Consumer groups whose offsets the transaction commits.
        pub groups: Vec<String>,
    }
}

wire_struct! {
    pub struct AddPartitionsToTxnResponse {}
}
request!(AddPartitionsToTxnRequest => AddPartitionsToTxn, AddPartitionsToTxnResponse);

wire_struct! {
    pub struct TxnMarker {
        pub producer_id: i64,
        /// The epoch the transaction's end bumped to.
        pub producer_epoch: i16,
        pub commit: bool,
        pub topic: String,
        pub partition: u32,
    }
}

wire_struct! {
    pub struct WriteTxnMarkersRequest {
        /// The coordinator's leader epoch of the id's state partition
        /// (kept in each marker's value).
        pub coordinator_epoch: i32,
        pub markers: Vec<TxnMarker>,
        /// Groups coordinated by the receiver whose offsets the
        /// transactions committed: made the groups' (or dropped).
        pub groups: Vec<GroupTxnMarker>,
    }
}

wire_struct! {
    pub struct GroupTxnMarker {
        pub group: String,
        pub producer_id: i64,
        pub commit: bool,
    }
}

wire_struct! {
    pub struct TxnMarkerResult {
        pub topic: String,
        pub partition: u32,
        pub error: ErrorCode,
        pub message: String,
    }
}

wire_struct! {
    pub struct WriteTxnMarkersResponse {
        pub results: Vec<TxnMarkerResult>,
        /// Per group marker: (group, error, message).
        pub group_results: Vec<GroupTxnMarkerResult>,
    }
}

wire_struct! {
    pub struct GroupTxnMarkerResult {
        pub group: String,
        pub error: ErrorCode,
        pub message: String,
    }
}
request!(WriteTxnMarkersRequest => WriteTxnMarkers, WriteTxnMarkersResponse);

wire_struct! {
    /// Offsets committed inside a transaction: the group's once the
    /// transaction commits, dropped if it aborts. The member must be the
    /// group's current owner of the partitions (as for `OffsetCommit`).
    pub struct TxnOffsetCommitRequest {
        pub transactional_id: String,
        pub producer_id: i64,
        pub producer_epoch: i16,
        pub group: String,
        pub member_id: String,
        pub member_epoch: i32,
        pub offsets: Vec<CommittedOffset>,
    }
}

wire_struct! {
    pub struct TxnOffsetCommitResponse {}
}
request!(TxnOffsetCommitRequest => TxnOffsetCommit, TxnOffsetCommitResponse);

wire_struct! {
    pub struct TransactionInfo {
        pub transactional_id: String,
        /// empty | ongoing | prepare-commit | prepare-abort |
        /// complete-commit | complete-abort
        pub state: String,
        pub producer_id: i64,
        pub producer_epoch: i16,
        pub timeout_ms: u64,
        pub partitions: Vec<PartitionRef>,
        pub groups: Vec<String>,
        /// When the current (or last) transaction began (ms since the epoch).
        pub started_ms: u64,
        pub updated_ms: u64,
        /// The broker that coordinates it.
        pub coordinator: u32,
    }
}

wire_struct! {
    pub struct ListTransactionsRequest {}
}

wire_struct! {
    /// The transactions this broker coordinates (a client asks every broker).
    pub struct ListTransactionsResponse {
        pub transactions: Vec<TransactionInfo>,
    }
}
request!(ListTransactionsRequest => ListTransactions, ListTransactionsResponse);

wire_struct! {
    pub struct DescribeTransactionRequest {
        pub transactional_id: String,
    }
}

wire_struct! {
    pub struct DescribeTransactionResponse {
        pub transaction: TransactionInfo,
    }
}
request!(DescribeTransactionRequest => DescribeTransaction, DescribeTransactionResponse);

wire_struct! {
    pub struct AbortTransactionRequest {
        pub transactional_id: String,
    }
}

wire_struct! {
    /// The open transaction was aborted (markers written); its producer is
    /// fenced.
    pub struct AbortTransactionResponse {
        pub transaction: TransactionInfo,
    }
}
request!(AbortTransactionRequest => AbortTransaction, AbortTransactionResponse);

/// The internal topic consumer groups live in.
pub const OFFSETS_TOPIC: &str = "__consumer_offsets";

wire_struct! {
    pub struct FindCoordinatorRequest {
        /// The group's name, or the transactional id.
        pub group: String,
        pub kind: CoordinatorKind,
    }
}

wire_enum! {
    pub enum CoordinatorKind {
        /// A consumer or share group's (`OFFSETS_TOPIC`).
        Group = 0,
        /// A transactional id's (`TRANSACTION_STATE_TOPIC`).
        Transaction = 1,
    }
}

wire_struct! {
    pub struct FindCoordinatorResponse {
        /// The group's partition of `OFFSETS_TOPIC`: its leader coordinates
        /// the group.
        pub partition: u32,
        /// That leader now (`NO_LEADER` when the partition is offline).
        pub node_id: u32,
        pub address: String,
    }
}
request!(FindCoordinatorRequest => FindCoordinator version 1, FindCoordinatorResponse);

wire_struct! {
    pub struct TopicPartitions {
        pub topic: String,
        pub partitions: Vec<u32>,
    }
}

wire_struct! {
    pub struct GroupSubscription {
        /// Topics by name.
        pub topics: Vec<String>,
        /// And (or) every topic whose whole name matches this regular
        /// expression (empty: none), topics created later included.
        pub pattern: String,
    }
}

wire_struct! {
    pub struct GroupHeartbeatRequest {
        pub group: String,
        /// Empty when joining.
        pub member_id: String,
        /// A static member's `group.instance.id` (empty: none).
        pub instance_id: String,
        /// 0 joins, -1 leaves, -2 leaves for a moment (a static member's
        /// restart), else the epoch the member is at.
        pub member_epoch: i32,
        /// `None`: unchanged since the last heartbeat (required to join).
        pub subscription: Option<GroupSubscription>,
        /// The partitions the member owns now; `None`: unchanged.
        pub owned: Option<Vec<TopicPartitions>>,
    }
}

wire_struct! {
    pub struct GroupHeartbeatResponse {
        pub member_id: String,
        pub member_epoch: i32,
        pub heartbeat_interval_ms: u32,
        /// What the member owns from now on: partitions missing from it are
        /// to be revoked at once; new ones are its own.
        pub assignment: Vec<TopicPartitions>,
    }
}
request!(GroupHeartbeatRequest => GroupHeartbeat, GroupHeartbeatResponse);

wire_struct! {
    pub struct CommittedOffset {
        pub topic: String,
        pub partition: u32,
        /// The next offset to read.
        pub offset: i64,
        pub metadata: String,
        /// When the coordinator stored it (ms since the epoch; ignored in a
        /// commit).
        pub committed_at_ms: i64,
    }
}

wire_struct! {
    /// Commits offsets, all or none. A member commits with its id and
    /// epoch, for partitions it owns; with an empty member id and epoch -1
    /// (a consumer that assigns its own partitions, or an operator's
    /// reset) only while the group has no members.
    pub struct OffsetCommitRequest {
        pub group: String,
        pub member_id: String,
        pub member_epoch: i32,
        pub offsets: Vec<CommittedOffset>,
    }
}

wire_struct! {
    pub struct OffsetCommitResponse {}
}
request!(OffsetCommitRequest => OffsetCommit, OffsetCommitResponse);

wire_struct! {
    pub struct OffsetFetchRequest {
        pub group: String,
        /// `None`: every committed offset of the group.
        pub partitions: Option<Vec<TopicPartitions>>,
    }
}

wire_struct! {
    pub struct OffsetFetchResponse {
        /// The partitions with a committed offset (others are left out).
        pub offsets: Vec<CommittedOffset>,
    }
}
request!(OffsetFetchRequest => OffsetFetch, OffsetFetchResponse);

wire_struct! {
    pub struct ListGroupsRequest {}
}

wire_struct! {
    pub struct GroupListing {
        pub group: String,
        /// consumer | share
        pub kind: String,
        /// empty | reconciling | stable
        pub state: String,
        pub members: u32,
    }
}

wire_struct! {
    /// The groups this broker coordinates (a client asks every broker).
    pub struct ListGroupsResponse {
        pub groups: Vec<GroupListing>,
    }
}
request!(ListGroupsRequest => ListGroups, ListGroupsResponse);

wire_struct! {
    pub struct DescribeGroupRequest {
        pub group: String,
    }
}

wire_struct! {
    pub struct GroupMemberDescription {
        pub member_id: String,
        pub instance_id: String,
        pub member_epoch: i32,
        /// stable | revoking | awaiting | away (a static member restarting)
        pub state: String,
        pub subscription: GroupSubscription,
        pub assignment: Vec<TopicPartitions>,
        /// Partitions it was asked to give up and still holds.
        pub revoking: Vec<TopicPartitions>,
        /// Where the coordinator is moving it.
        pub target: Vec<TopicPartitions>,
    }
}

wire_struct! {
    pub struct DescribeGroupResponse {
        pub group: String,
        /// consumer | share
        pub kind: String,
        pub state: String,
        pub group_epoch: i32,
        pub assignor: String,
        pub coordinator: u32,
        /// Effective timings (`session.timeout.ms`, `heartbeat.interval.ms`,
        /// `rebalance.timeout.ms`), the group's own where it set them.
        pub configs: Vec<(String, String)>,
        /// The keys of `configs` the group set itself.
        pub overridden: Vec<String>,
        pub members: Vec<GroupMemberDescription>,
        pub offsets: Vec<CommittedOffset>,
        /// A share group's members.
        pub share_members: Vec<ShareMemberDescription>,
        /// A share group's partitions.
        pub share_partitions: Vec<SharePartitionDescription>,
    }
}

wire_struct! {
    pub struct ShareMemberDescription {
        pub member_id: String,
        pub topics: Vec<String>,
    }
}

wire_struct! {
    pub struct SharePartitionDescription {
        pub topic: String,
        pub partition: u32,
        /// Every record below is done (accepted or dead-lettered).
        pub start_offset: i64,
        /// Nothing at or past was handed out yet.
        pub end_offset: i64,
        /// Records held by members now.
        pub acquired: u32,
        /// Records waiting for their copy to the dead-letter topic.
        pub dead_letters: u32,
    }
}
request!(DescribeGroupRequest => DescribeGroup, DescribeGroupResponse);

wire_struct! {
    /// Deletes a group and its committed offsets; refused while it has
    /// members.
    pub struct DeleteGroupRequest {
        pub group: String,
    }
}

wire_struct! {
    pub struct DeleteGroupResponse {}
}
request!(DeleteGroupRequest => DeleteGroup, DeleteGroupResponse);

wire_struct! {
    /// Sets a group's own `session.timeout.ms` and `heartbeat.interval.ms`
    /// (an empty value: back to the broker's default); creates the group
    /// if it does not exist.
    pub struct AlterGroupConfigRequest {
        pub group: String,
        pub configs: Vec<(String, String)>,
    }
}

wire_struct! {
    pub struct AlterGroupConfigResponse {
        /// The group's effective timings after the change.
        pub configs: Vec<(String, String)>,
    }
}
request!(AlterGroupConfigRequest => AlterGroupConfig, AlterGroupConfigResponse);

wire_struct! {
    /// Records `first_offset..=last_offset` of a partition, acknowledged.
    pub struct ShareAcknowledgement {
        pub topic: String,
        pub partition: u32,
        pub first_offset: i64,
        pub last_offset: i64,
        /// `SHARE_ACCEPT`, `SHARE_RELEASE` or `SHARE_REJECT`.
        pub kind: u8,
    }
}

/// Processed: done.
pub const SHARE_ACCEPT: u8 = 1;
/// Not processed: deliver it again (to any member), unless that was its
/// last delivery.
pub const SHARE_RELEASE: u8 = 2;
/// Cannot be processed: to the dead-letter topic, never delivered again.
pub const SHARE_REJECT: u8 = 3;

wire_struct! {
    /// A share group member's fetch, to the group's coordinator: first its
    /// acknowledgements, then (unless `max_records` is 0) records of its
    /// topics, each acquired for it until the group's lock timeout. An
    /// empty `member_id` joins the group (creating it as a share group).
    pub struct ShareFetchRequest {
        pub group: String,
        pub member_id: String,
        /// The topics the member reads.
        pub topics: Vec<String>,
        pub acknowledgements: Vec<ShareAcknowledgement>,
        pub max_records: u32,
        /// How long to wait for records when there are none.
        pub max_wait_ms: u32,
        /// Bound on the response's records (at least one batch).
        pub max_bytes: u32,
        /// The member leaves after its acknowledgements: what it still holds
        /// is offered to the others.
        pub leave: bool,
    }
}

wire_struct! {
    /// Records `first_offset..=last_offset` acquired for the member, each
    /// delivered for the `delivery_count`-th time.
    pub struct AcquiredRecords {
        pub first_offset: i64,
        pub last_offset: i64,
        pub delivery_count: u32,
    }
}

wire_struct! {
    pub struct ShareFetchPartition {
        pub topic: String,
        pub partition: u32,
        pub error: ErrorCode,
        pub message: String,
        /// Whole batches: they may hold records outside `acquired`, which
        /// are not the member's.
        pub records: Bytes,
        pub acquired: Vec<AcquiredRecords>,
    }
}

wire_struct! {
    /// An acknowledgement that was refused.
    pub struct ShareAcknowledgementError {
        pub topic: String,
        pub partition: u32,
        pub offset: i64,
        pub error: ErrorCode,
        pub message: String,
    }
}

wire_struct! {
    pub struct ShareFetchResponse {
        pub member_id: String,
        /// Send a fetch at least this often, or the member's session ends.
        pub heartbeat_interval_ms: u32,
        pub partitions: Vec<ShareFetchPartition>,
        pub acknowledgement_errors: Vec<ShareAcknowledgementError>,
    }
}
request!(ShareFetchRequest => ShareFetch, ShareFetchResponse);

wire_struct! {
    pub struct CompactTopicRequest {
        pub topic: String,
    }
}

wire_struct! {
    /// One replica's cleaning pass.
    pub struct CompactedPartition {
        pub partition: u32,
        /// False when there was nothing to clean.
        pub cleaned: bool,
        pub first_dirty_offset: i64,
        pub cleaned_to: i64,
        pub bytes_before: u64,
        pub bytes_after: u64,
        pub records_before: u64,
        pub records_after: u64,
    }
}

wire_struct! {
    pub struct CompactTopicResponse {
        /// The answering broker.
        pub node_id: u32,
        /// The partitions it holds a replica of.
        pub partitions: Vec<CompactedPartition>,
    }
}
request!(CompactTopicRequest => CompactTopic, CompactTopicResponse);
