//! How a broker is configured, and why it may fail to open.

use std::path::PathBuf;

use quiver_log::OpenError as LogOpenError;

use crate::topic::TopicConfig;

/// A validated broker configuration (the server crate builds it from TOML,
/// environment and flags).
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub node_id: u32,
    pub data_dir: PathBuf,
    /// `host:port` clients are told to connect to.
    pub advertised_address: String,
    /// Largest request frame accepted.
    pub frame_bytes_max: usize,
    /// Request bytes read and not yet answered, broker-wide: requests wait
    /// for room (at least `frame_bytes_max`).
    pub request_bytes_in_flight_max: usize,
    /// From a request stream's first byte to its body's last.
    pub request_read_timeout_ms: u64,
    /// Admin operations (voters, reassignment, plugin deploy and control)
    /// for clients without a certificate: development nodes only.
    pub allow_anonymous_admin: bool,
    /// Upper bound on the long-poll wait a fetch may ask for.
    pub fetch_wait_ms_max: u32,
    /// Background fsync of every partition at this interval; `None` leaves
    /// it to the OS (acks=all still fsyncs before answering).
    pub flush_interval_ms: Option<u64>,
    pub retention_check_interval_ms: u64,
    /// Defaults for topics created without overrides.
    pub topic_defaults: TopicConfig,
    /// Limits of plugin instances (memory, deadline, count).
    pub plugins: quiver_plugin_host::HostConfig,
    /// In a cluster: a follower that has not caught up with its leader for
    /// this long leaves the ISR (`replica.lag.time.max.ms`).
    pub replica_lag_time_max_ms: u64,
    /// Consumer groups: session, heartbeat and rebalance timeouts and the
    /// assignor of every group this broker coordinates.
    pub group_defaults: quiver_groups::GroupConfig,
    /// Partitions of `__consumer_offsets` when a first group request
    /// creates it (Kafka's `offsets.topic.num.partitions`, 50).
    pub offsets_topic_partitions: u32,
    /// Its replication factor; 0: three, or every broker when fewer.
    pub offsets_topic_replication_factor: u16,
    /// The log cleaner of compacted topics.
    pub cleaner: CleanerConfig,
    /// Transaction coordination.
    pub transactions: TransactionsConfig,
}

/// Transaction coordination (Kafka's `transaction.*` broker settings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionsConfig {
    /// Partitions of `__transaction_state` when a first transactional
    /// producer creates it (`transaction.state.log.num.partitions`, 50).
    pub state_topic_partitions: u32,
    /// Its replication factor; 0: three, or every broker when fewer.
    pub state_topic_replication_factor: u16,
    /// The largest transaction timeout a producer may ask, and how long an
    /// idle transactional id is remembered.
    pub limits: quiver_transactions::TxnConfig,
}

impl Default for TransactionsConfig {
    fn default() -> Self {
        TransactionsConfig {
            state_topic_partitions: quiver_transactions::STATE_PARTITIONS,
            state_topic_replication_factor: 0,
            limits: quiver_transactions::TxnConfig::default(),
        }
    }
}

/// The log cleaner's resources (Kafka's `log.cleaner.*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CleanerConfig {
    /// Logs cleaned at once, each on its own blocking thread; 0 disables
    /// the background cleaner (`topic compact` still cleans).
    pub threads: usize,
    /// Memory for the key maps of all threads together
    /// (`log.cleaner.dedupe.buffer.size`).
    pub dedupe_buffer_bytes: usize,
    /// Bytes per second all threads read together; `None`: unthrottled.
    pub io_bytes_per_second: Option<u64>,
    /// How often a thread with nothing to clean looks again.
    pub backoff_ms: u64,
}

impl Default for CleanerConfig {
    fn default() -> Self {
        CleanerConfig {
            threads: 1,
            dedupe_buffer_bytes: 128 * 1024 * 1024,
            io_bytes_per_second: None,
            backoff_ms: 15_000,
        }
    }
}

/// Default budget of request bytes in flight: four largest frames.
pub const REQUEST_BYTES_IN_FLIGHT_MAX_DEFAULT: usize = 4 * quiver_protocol::frame::FRAME_BYTES_MAX_DEFAULT;

impl BrokerConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        BrokerConfig {
            node_id: 1,
            data_dir: data_dir.into(),
            advertised_address: "127.0.0.1:7878".into(),
            frame_bytes_max: quiver_protocol::frame::FRAME_BYTES_MAX_DEFAULT,
            request_bytes_in_flight_max: REQUEST_BYTES_IN_FLIGHT_MAX_DEFAULT,
            request_read_timeout_ms: 30_000,
            allow_anonymous_admin: false,
            fetch_wait_ms_max: 30_000,
            flush_interval_ms: Some(1_000),
            retention_check_interval_ms: 60_000,
            topic_defaults: TopicConfig::default(),
            plugins: quiver_plugin_host::HostConfig::default(),
            replica_lag_time_max_ms: 10_000,
            group_defaults: quiver_groups::GroupConfig::default(),
            offsets_topic_partitions: 50,
            offsets_topic_replication_factor: 0,
            cleaner: CleanerConfig::default(),
            transactions: TransactionsConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot use data directory {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("topic metadata file {path} is unreadable: {reason}")]
    Metadata { path: PathBuf, reason: String },
    #[error("cannot open the plugin registry: {0}")]
    Plugins(String),
    #[error("cannot open partition {topic}-{partition}: {source}")]
    Log { topic: String, partition: u32, source: LogOpenError },
    #[error("cannot start the controller: {0}")]
    Controller(quiver_controller::StartError),
    #[error("cannot move this node's metadata into the metadata log: {0}")]
    Migration(String),
    /// Opening ran on a blocking thread that did not finish (it panicked).
    #[error("opening the data directory failed: {0}")]
    Aborted(String),
}
