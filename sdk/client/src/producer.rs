//! The producer: records are appended to per-partition batches, which are
//! sealed when full or when their linger time passes, then sent by one
//! dispatcher that packs every ready batch into as few requests as possible
//! while at most `in_flight_max` requests are outstanding.
//!
//! Delivery semantics. By default the producer is idempotent (as Kafka's is
//! since 3.0): it takes a producer id from the cluster and numbers the
//! records of each partition; each batch carries the sequence of its first
//! record, and the partition's leader appends a batch only if it continues
//! the sequence, answering a retry of one of the last sixteen with the offsets
//! it got the first time. So a batch whose fate is unknown (connection lost
//! after it was sent, or `not_replicated`) is simply sent again: it is
//! written once. A partition has at most sixteen batches in flight, counted
//! from its oldest unanswered one (the window the brokers remember).
//!
//! When a batch fails for good (refused, or out of time), the sequence of
//! its partition can never continue: the producer starts a new epoch for
//! that partition (sequence 0 again). Batches of the old epoch still in
//! flight then fail too (`out_of_order_sequence` or `producer_fenced`),
//! never written twice and never reordered.
//!
//! Without idempotence (`idempotent: false`, acks=none, `PARTITION_ANY`
//! batches the broker places, or a broker without the API), a batch is
//! retried only when the broker certainly did not apply it (connection
//! could not be opened, or a retriable error code), and a batch whose fate
//! is unknown fails with [`ProduceError::Unknown`], so that retries never
//! write a record twice.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quiver_protocol::batch::{BATCH_HEADER_LEN, BatchBuilder, Compression, Header, record_size_upper_bound};
use quiver_protocol::messages::{Acks, PARTITION_ANY, ProducePartition, ProduceRequest};
use quiver_protocol::{ErrorCode, WireError};
use rustc_hash::FxHashMap as HashMap;
use tokio::sync::{Notify, Semaphore, TryAcquireError, mpsc};

use crate::connection::{CallError, Client, RequestStream};
use crate::delivery::{Acked, Completer, DeliveryFuture};
#[cfg(feature = "plugins")]
use crate::partitioning::LocalPartitioner;
use crate::partitioning::Placement;
use crate::routing::group_by_connection;
use crate::sequencer::{self, Attempt, PartitionSequence, Stamp, Verdict};
use quiver_protocol::partitioner::partition_for_key;
#[cfg(feature = "plugins")]
use quiver_protocol::partitioner::split_by_partition;

/// Producer settings. Defaults favour throughput with small latency.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    pub acks: Acks,
    /// A batch is sent once it holds this many (uncompressed) bytes.
    pub batch_bytes_max: usize,
    /// A batch is sent at the latest this long after its first record.
    pub linger: Duration,
    pub compression: Compression,
    /// Produce requests outstanding at once; 1 keeps strict order even when
    /// a retry happens.
    pub in_flight_max: usize,
    /// Bytes of records buffered but not yet acknowledged; `send` waits
    /// when it is reached. 32 MiB by default, as Kafka's `buffer.memory`:
    /// in a flat-out run twice that gave the same throughput with twice
    /// the queueing latency (p50 ≈ 100 ms against ≈ 58 ms) and memory.
    pub buffer_bytes_max: usize,
    /// Batches are packed into requests of at most this many bytes.
    pub request_bytes_max: usize,
    /// Give up on a record this long after it was sent.
    pub delivery_timeout: Duration,
    pub retry_backoff: Duration,
    /// For topics that name a partitioner plugin: run it in this process
    /// (cargo feature `plugins`). When false, without the feature, or when
    /// the plugin cannot be loaded here, records are sent with
    /// `PARTITION_ANY` and the broker runs the same module.
    pub partition_locally: bool,
    /// A topic's metadata is asked again (in the background, on the next
    /// send) once it is this old, so that a redeployed or newly named
    /// partitioner plugin is picked up (Kafka's `metadata.max.age.ms`).
    pub metadata_max_age: Duration,
    /// Number each partition's records so that retries are written once
    /// (see the module documentation). Needs acks other than none; a
    /// partition then has at most [`IDEMPOTENT_IN_FLIGHT_MAX`] batches in
    /// flight.
    pub idempotent: bool,
    /// How long `send` asks for the metadata of a topic used for the first
    /// time while the cluster does not know it (just created elsewhere, or
    /// a restarted node catching up) or cannot be reached, before it fails
    /// (Kafka's `max.block.ms`).
    pub max_block: Duration,
    /// Makes it a transactional producer's (see
    /// [`crate::TransactionalProducer`]): its batches are transactional,
    /// numbered with the producer id and epoch the id's coordinator gave.
    pub transactional_id: Option<String>,
    /// A transaction open longer is aborted by its coordinator (Kafka's
    /// `transaction.timeout.ms`, 60 s).
    pub transaction_timeout: Duration,
}

/// Batches of one partition an idempotent producer has in flight at most,
/// counted from the oldest one not yet answered: brokers remember this many
/// batches per producer and partition, so a retry is always recognised.
pub const IDEMPOTENT_IN_FLIGHT_MAX: usize = 16;

/// A new batch reserves room for this many bytes at most (it grows beyond).
const BATCH_RESERVE_MAX: usize = 1024 * 1024;

/// Buffers of sent batches kept for new batches, in bytes at most: fresh
/// memory costs a page fault (and the kernel zeroing the page) per page
/// written, more than copying the records in.
const SPARE_BYTES_MAX: usize = 16 * 1024 * 1024;

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            acks: Acks::All,
            batch_bytes_max: 128 * 1024,
            linger: Duration::from_millis(5),
            compression: Compression::None,
            in_flight_max: 5,
            buffer_bytes_max: 32 * 1024 * 1024,
            request_bytes_max: 4 * 1024 * 1024,
            delivery_timeout: Duration::from_secs(120),
            retry_backoff: Duration::from_millis(100),
            partition_locally: true,
            metadata_max_age: Duration::from_secs(300),
            idempotent: true,
            max_block: Duration::from_secs(60),
            transactional_id: None,
            transaction_timeout: Duration::from_secs(60),
        }
    }
}

/// A record to send.
#[derive(Debug, Clone)]
pub struct ProducerRecord {
    pub topic: Arc<str>,
    /// `None`: chosen by the topic's partitioner plugin if it names one,
    /// else from the key (murmur2), or sticky for keyless records.
    pub partition: Option<u32>,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<Header>,
    /// Milliseconds since the Unix epoch; `None` is "now".
    pub timestamp_ms: Option<i64>,
}

impl ProducerRecord {
    /// A record of `topic` (an `Arc<str>` is shared, not copied: senders of
    /// many records keep one).
    pub fn new(topic: impl Into<Arc<str>>, value: impl Into<Bytes>) -> Self {
        ProducerRecord {
            topic: topic.into(),
            partition: None,
            key: None,
            value: Some(value.into()),
            headers: Vec::new(),
            timestamp_ms: None,
        }
    }

    /// A tombstone: `key` with no value. In a compacted topic it deletes
    /// the key (its older records go at the next clean, the tombstone
    /// itself after the topic's `delete.retention.ms`).
    pub fn tombstone(topic: impl Into<Arc<str>>, key: impl Into<Bytes>) -> Self {
        ProducerRecord { value: None, ..ProducerRecord::new(topic, Bytes::new()).key(key) }
    }

    pub fn key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    pub fn partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }

    pub fn header(mut self, key: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push(Header { key: key.into(), value: Some(value.into()) });
        self
    }

    pub fn timestamp(mut self, timestamp_ms: i64) -> Self {
        self.timestamp_ms = Some(timestamp_ms);
        self
    }
}

/// Where a record was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordMetadata {
    pub topic: Arc<str>,
    /// `PARTITION_ANY` with acks=none for a record the broker placed.
    pub partition: u32,
    /// -1 with acks=none: the broker does not answer.
    pub offset: i64,
    pub timestamp_ms: i64,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ProduceError {
    #[error("topic '{topic}' does not exist (asked for {waited:.1?})")]
    UnknownTopic { topic: String, waited: Duration },
    #[error("topic '{topic}' has {partitions} partitions; there is no partition {partition}")]
    UnknownPartition { topic: String, partition: u32, partitions: u32 },
    #[error("record of {size} bytes does not fit in a request of at most {limit} bytes")]
    RecordTooLarge { size: usize, limit: usize },
    #[error("broker rejected the batch: {0}")]
    Rejected(WireError),
    #[error("delivery unknown, the record may or may not be written: {0}")]
    Unknown(String),
    #[error("not delivered within {timeout:?}; last error: {last_error}")]
    Timeout { timeout: Duration, last_error: String },
    #[error("cannot reach the broker: {0}")]
    Connect(String),
    #[error("{0}")]
    Partitioner(String),
    #[error("the producer was closed before the record was sent")]
    Closed,
}

struct OpenBatch {
    id: u64,
    builder: BatchBuilder,
    completer: Completer,
    /// Buffer bytes its records hold (given back when it completes).
    buffered: usize,
}

/// Buffer bytes taken by a batch's records, given back when the last part
/// of the batch is dropped.
struct Buffered {
    buffer: Arc<Semaphore>,
    bytes: usize,
}

impl Drop for Buffered {
    fn drop(&mut self) {
        self.buffer.add_permits(self.bytes);
    }
}

/// A sealed batch. It is queued while the state lock is held, so the queue
/// order is the seal order; it is compressed later, by the task that sends
/// it, after its request stream was opened in queue order.
struct ReadyBatch {
    topic: Arc<str>,
    partition: u32,
    builder: Option<BatchBuilder>,
    records: Bytes,
    /// Uncompressed size, for packing requests before compression.
    size_bytes: usize,
    /// Records in the batch.
    count: usize,
    completer: Completer,
    created: Instant,
    /// Shared by the batches a locally partitioned batch was split into.
    _buffered: Arc<Buffered>,
    /// `PARTITION_ANY` batches to split here before sending.
    #[cfg(feature = "plugins")]
    split: Option<(Arc<LocalPartitioner>, u32)>,
    /// An idempotent producer's numbering, given when first sent.
    stamp: Option<Stamp>,
    /// An attempt ended without knowing whether it was appended.
    ambiguous: bool,
}

type Sequences = HashMap<(Arc<str>, u32), PartitionSequence>;

/// What the producer keeps per topic: looked up by `&str`, so the hot path
/// allocates nothing per record.
struct TopicState {
    name: Arc<str>,
    partitions: u32,
    placement: Placement,
    /// Where keyless records go until that partition's batch is sealed.
    sticky: Option<u32>,
    open: HashMap<u32, OpenBatch>,
    /// The partitioner plugin `placement` came from: name and version.
    partitioner: (String, u32),
    /// When the metadata was last asked for, and whether it is being asked.
    checked: Instant,
    refreshing: bool,
}

/// A sealed batch with its topic, partition, and how the topic places
/// records (with its partition count).
type SealedBatch = (Arc<str>, u32, OpenBatch, (Placement, u32));

impl TopicState {
    fn sticky_partition(&mut self, rng: &mut u64) -> u32 {
        match self.sticky {
            Some(p) if p < self.partitions => p,
            _ => {
                let p = random(rng, self.partitions);
                self.sticky = Some(p);
                p
            }
        }
    }

    /// Removes an open batch (only if its id matches, when given). Keyless
    /// records move to another partition once their sticky batch is sealed.
    fn seal(&mut self, partition: u32, id: Option<u64>, rng: &mut u64) -> Option<SealedBatch> {
        if id.is_some_and(|id| self.open.get(&partition).is_none_or(|b| b.id != id)) {
            return None;
        }
        let batch = self.open.remove(&partition)?;
        if self.sticky == Some(partition) && self.partitions > 1 {
            let mut next = random(rng, self.partitions - 1);
            if next >= partition {
                next += 1;
            }
            self.sticky = Some(next);
        }
        Some((self.name.clone(), partition, batch, (self.placement.clone(), self.partitions)))
    }
}

struct State {
    topics: HashMap<String, TopicState>,
    next_batch_id: u64,
    rng: u64,
}

/// xorshift64: enough to spread keyless records, no dependency.
fn random(rng: &mut u64, below: u32) -> u32 {
    let mut x = *rng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *rng = x;
    (x % u64::from(below)) as u32
}

pub(crate) struct Shared {
    client: Client,
    config: ProducerConfig,
    state: Mutex<State>,
    ready_tx: mpsc::UnboundedSender<ReadyBatch>,
    /// With no linger: batches opened, to seal when a request can take them.
    open_tx: mpsc::UnboundedSender<(Arc<str>, u32, u64)>,
    buffer: Arc<Semaphore>,
    /// Records sent but not yet completed; `flush` waits for zero.
    outstanding: AtomicUsize,
    /// Woken when `outstanding` drops to zero.
    drained: Notify,
    sequences: Mutex<Sequences>,
    /// Woken when a numbered batch completes: its partition's window may
    /// let the next one go.
    window_moved: Notify,
    /// Buffers of completed batches, and their capacity in all.
    spare: Mutex<(Vec<BytesMut>, usize)>,
    /// A transactional producer's identity and the fate of its current
    /// transaction.
    pub(crate) txn: Option<TxnIdentity>,
}

/// What a transactional producer's batches are numbered with.
pub(crate) struct TxnIdentity {
    pub(crate) id: String,
    /// The producer id and epoch the coordinator gave (`None` before
    /// `init`).
    pub(crate) current: Mutex<Option<(i64, i16)>>,
    /// A batch of the current transaction failed for good: it can only be
    /// aborted.
    pub(crate) failed: Mutex<Option<String>>,
}

/// Sends records to a Quiver cluster. Cheap to clone.
#[derive(Clone)]
pub struct Producer {
    shared: Arc<Shared>,
}

impl Client {
    pub fn producer(&self, config: ProducerConfig) -> Producer {
        Producer::new(self.clone(), config)
    }
}

impl Producer {
    pub fn new(client: Client, config: ProducerConfig) -> Producer {
        let (ready_tx, ready_rx) = mpsc::unbounded_channel();
        let (open_tx, open_rx) = mpsc::unbounded_channel();
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9e37_79b9, |d| d.as_nanos() as u64)
            | 1;
        let txn = config.transactional_id.clone().map(|id| TxnIdentity {
            id,
            current: Mutex::new(None),
            failed: Mutex::new(None),
        });
        let shared = Arc::new(Shared {
            txn,
            client,
            buffer: Arc::new(Semaphore::new(config.buffer_bytes_max)),
            config,
            state: Mutex::new(State { topics: HashMap::default(), next_batch_id: 0, rng: seed }),
            ready_tx,
            open_tx,
            outstanding: AtomicUsize::new(0),
            drained: Notify::new(),
            sequences: Mutex::new(HashMap::default()),
            window_moved: Notify::new(),
            spare: Mutex::new((Vec::new(), 0)),
        });
        tokio::spawn(dispatch(Arc::downgrade(&shared), ready_rx, open_rx));
        Producer { shared }
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Queues a record. Waits only for buffer space and, the first time a
    /// topic is used, for its metadata. The returned future resolves when
    /// the broker answers.
    pub async fn send(&self, record: ProducerRecord) -> Result<DeliveryFuture, ProduceError> {
        let shared = &self.shared;
        let size = record_size_upper_bound(record.key.as_deref(), record.value.as_deref(), &record.headers);
        let limit = shared.config.request_bytes_max.min(shared.config.buffer_bytes_max);
        if size + BATCH_HEADER_LEN > limit {
            return Err(ProduceError::RecordTooLarge { size, limit });
        }
        // Buffer space is counted in bytes and given back per batch (see
        // `Buffered`); taken without waiting while there is some.
        match shared.buffer.try_acquire_many(size as u32) {
            Ok(permit) => permit.forget(),
            Err(TryAcquireError::NoPermits) => {
                shared.buffer.acquire_many(size as u32).await.map_err(|_| ProduceError::Closed)?.forget()
            }
            Err(TryAcquireError::Closed) => return Err(ProduceError::Closed),
        }
        let appended = loop {
            match self.append(&record, size) {
                Some(appended) => break appended,
                // The topic is used for the first time: learn its metadata.
                None => {
                    if let Err(e) = self.learn_topic(&record.topic).await {
                        break Err(e);
                    }
                }
            }
        };
        if appended.is_err() {
            shared.buffer.add_permits(size);
        }
        appended
    }

    /// Adds a record to its partition's open batch, under one lock: `None`
    /// when its topic is not known yet.
    fn append(&self, record: &ProducerRecord, size: usize) -> Option<Result<DeliveryFuture, ProduceError>> {
        let shared = &self.shared;
        let timestamp_ms = record.timestamp_ms.unwrap_or_else(now_ms);
        let mut guard = shared.state.lock().expect("producer state");
        let State { topics, next_batch_id, rng } = &mut *guard;
        let topic = topics.get_mut(&*record.topic)?;
        let partitions = topic.partitions;
        if let Some(p) = record.partition
            && p >= partitions
        {
            let topic = record.topic.to_string();
            return Some(Err(ProduceError::UnknownPartition { topic, partition: p, partitions }));
        }
        let partition = match (record.partition, &topic.placement, &record.key) {
            (Some(p), _, _) => p,
            (None, Placement::Murmur2, Some(key)) => partition_for_key(key, partitions),
            (None, Placement::Murmur2, None) => topic.sticky_partition(rng),
            (None, _, _) => PARTITION_ANY,
        };
        let full =
            topic.open.get(&partition).is_some_and(|b| b.builder.size_bytes() + size > shared.config.batch_bytes_max);
        if full && let Some(batch) = topic.seal(partition, None, rng) {
            shared.send_ready(batch);
        }
        // Counted before the record becomes visible to other threads: once it
        // is in a batch, a linger timer or another sender may seal, send and
        // complete it before this thread runs again.
        shared.outstanding.fetch_add(1, Ordering::SeqCst);
        let batch = topic.open.entry(partition).or_insert_with(|| {
            *next_batch_id += 1;
            let id = *next_batch_id;
            let (linger, name) = (shared.config.linger, topic.name.clone());
            if linger.is_zero() {
                // Sealed by the dispatcher once a request can carry it; until
                // then it takes records (see `dispatch`).
                let _ = shared.open_tx.send((name, partition, id));
            } else {
                let weak = Arc::downgrade(shared);
                tokio::spawn(async move {
                    tokio::time::sleep(linger).await;
                    if let Some(shared) = weak.upgrade() {
                        shared.seal_and_send(&name, partition, Some(id));
                    }
                });
            }
            // Checked once per batch, not per record: a clock read.
            if !topic.refreshing && topic.checked.elapsed() >= shared.config.metadata_max_age {
                topic.refreshing = true;
                tokio::spawn(self.clone().refresh_topic(topic.name.to_string()));
            }
            // A batch split here is re-encoded per partition: keep the
            // collected one uncompressed.
            #[cfg(feature = "plugins")]
            let compression = match (&topic.placement, partition) {
                (Placement::Local(_), PARTITION_ANY) => Compression::None,
                _ => shared.config.compression,
            };
            #[cfg(not(feature = "plugins"))]
            let compression = shared.config.compression;
            // A whole batch, so that records are copied once; bounded so
            // that a huge batch size does not map a buffer per batch.
            let capacity = shared.config.batch_bytes_max.min(BATCH_RESERVE_MAX).max(size) + BATCH_HEADER_LEN;
            OpenBatch {
                id,
                builder: match shared.spare_buffer(capacity) {
                    Some(buffer) => BatchBuilder::with_buffer(compression, buffer),
                    None => BatchBuilder::with_capacity(compression, capacity),
                },
                completer: Completer::new(topic.name.clone(), partition),
                buffered: 0,
            }
        });
        let index = batch.builder.record_count() as u32;
        batch.builder.append(timestamp_ms, record.key.as_deref(), record.value.as_deref(), &record.headers);
        batch.buffered += size;
        let delivery = batch.completer.future(index, timestamp_ms);
        if batch.builder.size_bytes() >= shared.config.batch_bytes_max
            && let Some(batch) = topic.seal(partition, None, rng)
        {
            shared.send_ready(batch);
        }
        Some(Ok(delivery))
    }

    /// Sends every buffered record now and waits until each is acknowledged
    /// or failed.
    pub async fn flush(&self) {
        let open: Vec<(Arc<str>, u32)> = {
            let state = self.shared.state.lock().expect("producer state");
            state.topics.values().flat_map(|t| t.open.keys().map(|p| (t.name.clone(), *p))).collect()
        };
        for (topic, partition) in open {
            self.shared.seal_and_send(&topic, partition, None);
        }
        loop {
            let drained = self.shared.drained.notified();
            if self.shared.outstanding.load(Ordering::SeqCst) == 0 {
                return;
            }
            drained.await;
        }
    }

    /// Asks for the metadata of a topic used for the first time.
    async fn learn_topic(&self, topic: &str) -> Result<(), ProduceError> {
        if self.shared.state.lock().expect("producer state").topics.contains_key(topic) {
            return Ok(());
        }
        let started = Instant::now();
        let t = loop {
            let error = match self.shared.client.admin().metadata(Some(vec![topic.to_string()])).await {
                Ok(metadata) => match metadata.topics.into_iter().find(|t| t.name == topic) {
                    Some(t) if t.error == ErrorCode::None => break t,
                    Some(t) if !t.error.is_retriable() => {
                        return Err(ProduceError::Rejected(WireError::new(t.error, format!("topic '{topic}'"))));
                    }
                    _ => ProduceError::UnknownTopic { topic: topic.to_string(), waited: started.elapsed() },
                },
                Err(e) if e.is_safe_to_retry() => ProduceError::Connect(e.to_string()),
                Err(e) => return Err(ProduceError::Connect(e.to_string())),
            };
            if started.elapsed() + self.shared.config.retry_backoff >= self.shared.config.max_block {
                return Err(error);
            }
            tracing::debug!(topic, %error, "no metadata for the topic yet; asking again");
            tokio::time::sleep(self.shared.config.retry_backoff).await;
        };
        let partitions = t.partitions.len() as u32;
        let placement = self.placement(&t.partitioner).await;
        let mut state = self.shared.state.lock().expect("producer state");
        state.topics.entry(topic.to_string()).or_insert_with(|| TopicState {
            name: Arc::from(topic),
            partitions,
            placement,
            sticky: None,
            open: HashMap::default(),
            partitioner: (t.partitioner, t.partitioner_version),
            checked: Instant::now(),
            refreshing: false,
        });
        Ok(())
    }

    /// Asks for a topic's metadata again; a changed partitioner plugin (a
    /// new version, or another plugin) replaces how records are placed from
    /// the next sealed batch on. Failures keep the current placement.
    async fn refresh_topic(self, topic: String) {
        let metadata = self.shared.client.admin().metadata(Some(vec![topic.clone()])).await;
        let found =
            metadata.ok().and_then(|m| m.topics.into_iter().find(|t| t.name == topic && t.error == ErrorCode::None));
        let changed = found.and_then(|t| {
            let current = (t.partitioner, t.partitioner_version);
            let state = self.shared.state.lock().expect("producer state");
            state.topics.get(&topic).is_some_and(|ts| ts.partitioner != current).then_some(current)
        });
        let placement = match &changed {
            Some((name, _)) => Some(self.placement(name).await),
            None => None,
        };
        let mut state = self.shared.state.lock().expect("producer state");
        if let Some(ts) = state.topics.get_mut(&topic) {
            ts.checked = Instant::now();
            ts.refreshing = false;
            if let (Some(current), Some(placement)) = (changed, placement) {
                tracing::info!(topic, partitioner = current.0, version = current.1, "the topic's partitioner changed");
                ts.partitioner = current;
                ts.placement = placement;
            }
        }
    }
}

impl Producer {
    /// How records without a partition are placed for a topic whose
    /// partitioner is `partitioner` (empty: none).
    async fn placement(&self, partitioner: &str) -> Placement {
        if partitioner.is_empty() {
            return Placement::Murmur2;
        }
        #[cfg(feature = "plugins")]
        if self.shared.config.partition_locally {
            match LocalPartitioner::fetch(&self.shared.client, partitioner).await {
                Ok(local) => return Placement::Local(Arc::new(local)),
                Err(e) => {
                    tracing::warn!(partitioner, error = %e, "cannot run the partitioner here; the broker will")
                }
            }
        }
        Placement::Broker
    }
}

impl ReadyBatch {
    /// The finished batch, compressed on first use.
    fn records(&mut self) -> Bytes {
        if let Some(builder) = self.builder.take() {
            self.records = builder.build();
        }
        self.records.clone()
    }
}

impl Shared {
    /// A buffer of a completed batch that holds `capacity` bytes, if one is
    /// kept.
    fn spare_buffer(&self, capacity: usize) -> Option<BytesMut> {
        let mut spare = self.spare.lock().expect("producer spare buffers");
        let buffer = spare.0.pop()?;
        spare.1 -= buffer.capacity();
        (buffer.capacity() >= capacity).then_some(buffer)
    }

    /// Keeps the buffer of a completed batch for a new one, once nothing
    /// else refers to it (the transport may still, until its data is acked).
    fn recycle(&self, records: Bytes) {
        let Ok(buffer) = records.try_into_mut() else {
            return;
        };
        let mut spare = self.spare.lock().expect("producer spare buffers");
        let capacity = buffer.capacity();
        if capacity > BATCH_HEADER_LEN && spare.1 + capacity <= SPARE_BYTES_MAX.min(self.config.buffer_bytes_max / 4) {
            spare.1 += capacity;
            spare.0.push(buffer);
        }
    }

    fn seal_and_send(&self, topic: &str, partition: u32, id: Option<u64>) {
        let mut guard = self.state.lock().expect("producer state");
        let State { topics, rng, .. } = &mut *guard;
        if let Some(batch) = topics.get_mut(topic).and_then(|t| t.seal(partition, id, rng)) {
            self.send_ready(batch);
        }
    }

    /// Queues a sealed batch. Called with the state lock held: batches of a
    /// partition must enter the queue in the order they were sealed.
    fn send_ready(&self, (topic, partition, batch, placement): SealedBatch) {
        let ready = ReadyBatch {
            topic,
            partition,
            size_bytes: batch.builder.size_bytes(),
            count: batch.builder.record_count(),
            builder: Some(batch.builder),
            records: Bytes::new(),
            completer: batch.completer,
            created: Instant::now(),
            _buffered: Arc::new(Buffered { buffer: self.buffer.clone(), bytes: batch.buffered }),
            #[cfg(feature = "plugins")]
            split: match placement {
                (Placement::Local(p), partitions) if partition == PARTITION_ANY => Some((p, partitions)),
                _ => None,
            },
            stamp: None,
            ambiguous: false,
        };
        #[cfg(not(feature = "plugins"))]
        let _ = placement;
        if let Err(mpsc::error::SendError(ready)) = self.ready_tx.send(ready) {
            self.complete(ready, Err(ProduceError::Closed));
        }
    }

    /// A `PARTITION_ANY` batch of a topic whose partitioner runs here becomes
    /// one batch per partition (one plugin call for the whole batch); other
    /// batches pass through. A partitioner failure fails the batch's records.
    fn split(&self, batch: ReadyBatch) -> Vec<ReadyBatch> {
        #[cfg(feature = "plugins")]
        {
            let mut batch = batch;
            let Some((partitioner, partitions)) = batch.split.take() else {
                return vec![batch];
            };
            let (records, chosen) = match partitioner.partition(&batch.records(), partitions) {
                Ok(placed) => placed,
                Err(e) => {
                    self.complete(batch, Err(ProduceError::Partitioner(e)));
                    return Vec::new();
                }
            };
            let splits = split_by_partition(&records, &chosen, self.config.compression);
            let completers = batch.completer.split(batch.count, splits.iter().map(|s| s.indices.clone()).collect());
            splits
                .into_iter()
                .zip(completers)
                .map(|(s, completer)| ReadyBatch {
                    topic: batch.topic.clone(),
                    partition: s.partition,
                    size_bytes: s.builder.size_bytes(),
                    count: s.indices.len(),
                    builder: Some(s.builder),
                    records: Bytes::new(),
                    completer,
                    created: batch.created,
                    _buffered: batch._buffered.clone(),
                    split: None,
                    stamp: None,
                    ambiguous: false,
                })
                .collect()
        }
        #[cfg(not(feature = "plugins"))]
        vec![batch]
    }

    /// The connection for a batch: its partition's leader (the bootstrap
    /// connection for `PARTITION_ANY`, placed by the broker).
    async fn route(&self, batch: &ReadyBatch) -> Client {
        if batch.partition == PARTITION_ANY {
            return self.client.bootstrap();
        }
        match self.client.for_partition(&batch.topic, batch.partition).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "cannot learn the partition leader; trying the bootstrap broker");
                self.client.bootstrap()
            }
        }
    }

    fn complete(&self, batch: ReadyBatch, result: Result<Acked, ProduceError>) {
        if let Some(stamp) = batch.stamp {
            let mut sequences = self.sequences.lock().expect("producer sequences");
            if let Some(seq) = sequences.get_mut(&(batch.topic.clone(), batch.partition)) {
                seq.completed(stamp, result.is_ok());
            }
            drop(sequences);
            self.window_moved.notify_one();
        }
        let count = batch.count;
        batch.completer.finish(batch.partition, result);
        self.recycle(batch.records);
        let before = self.outstanding.fetch_sub(count, Ordering::SeqCst);
        debug_assert!(before >= count, "completed more records than were sent");
        if before == count {
            self.drained.notify_waiters();
        }
    }
}

impl Shared {
    /// Numbers a batch about to be sent for the first time: the next
    /// sequence of its partition, in the partition's current epoch. False
    /// (and not numbered) while the partition has
    /// [`IDEMPOTENT_IN_FLIGHT_MAX`] batches numbered since its oldest one
    /// not yet completed.
    fn stamp(&self, batch: &mut ReadyBatch, producer_id: i64) -> bool {
        let mut sequences = self.sequences.lock().expect("producer sequences");
        let seq = sequences.entry((batch.topic.clone(), batch.partition)).or_default();
        let Some(stamp) = seq.stamp(batch.count, IDEMPOTENT_IN_FLIGHT_MAX) else {
            return false;
        };
        batch.builder = batch.builder.take().map(|b| match &self.txn {
            // The coordinator's producer id and epoch: the sequences start
            // at 0 in each transaction (its end bumps the epoch).
            Some(txn) => {
                let (id, epoch) = txn.current.lock().expect("transactional identity").unwrap_or((-1, -1));
                b.with_producer(id, epoch, stamp.sequence).transactional()
            }
            None => b.with_producer(producer_id, stamp.epoch, stamp.sequence),
        });
        batch.stamp = Some(stamp);
        true
    }

    /// A transaction ended (or began with a new epoch): every partition's
    /// numbering starts again at 0, under the same producer id (`same_id`:
    /// leaders it wrote to know it) or a new one. Called with nothing in
    /// flight.
    pub(crate) fn reset_sequences(&self, same_id: bool) {
        let mut sequences = self.sequences.lock().expect("producer sequences");
        if same_id {
            sequences.values_mut().for_each(PartitionSequence::restart);
        } else {
            sequences.clear();
        }
    }

    /// What is known of a batch whose attempt just ended.
    fn attempt(&self, batch: &ReadyBatch) -> Attempt {
        let current_epoch = batch.stamp.is_none_or(|stamp| {
            let sequences = self.sequences.lock().expect("producer sequences");
            sequences.get(&(batch.topic.clone(), batch.partition)).is_none_or(|seq| seq.is_current(stamp))
        });
        Attempt { numbered: batch.stamp.is_some(), current_epoch, ambiguous: batch.ambiguous }
    }

    /// Fails a batch for good. Its sequence numbers will never be filled,
    /// so the next batches of its partition start a new epoch at 0.
    fn fail(&self, batch: ReadyBatch, error: ProduceError) {
        if let Some(txn) = &self.txn {
            // In a transaction the epoch is the coordinator's: the
            // transaction can only be aborted.
            txn.failed.lock().expect("transaction failure").get_or_insert_with(|| error.to_string());
        } else if let Some(stamp) = batch.stamp {
            let mut sequences = self.sequences.lock().expect("producer sequences");
            if let Some(seq) = sequences.get_mut(&(batch.topic.clone(), batch.partition))
                && seq.failed(stamp)
            {
                tracing::debug!(topic = %batch.topic, partition = batch.partition, "new producer epoch");
            }
        }
        self.complete(batch, Err(error));
    }
}

/// Asks the cluster for a producer id until it gets one; `None` when the
/// broker does not offer idempotence (the producer then works without it).
/// Meanwhile, queued batches that ran out of time fail.
async fn obtain_producer_id(
    shared: &Shared,
    ready_rx: &mut mpsc::UnboundedReceiver<ReadyBatch>,
    queued: &mut VecDeque<ReadyBatch>,
) -> Option<i64> {
    loop {
        match shared.client.admin().init_producer_id().await {
            Ok(r) => return Some(r.producer_id),
            Err(CallError::Broker(e)) if !e.code.is_retriable() => {
                tracing::warn!(error = %e, "the broker gives no producer id: producing without idempotence");
                return None;
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot get a producer id yet");
                while let Ok(b) = ready_rx.try_recv() {
                    queued.extend(shared.split(b));
                }
                let timeout = shared.config.delivery_timeout;
                for b in std::mem::take(queued) {
                    if b.created.elapsed() >= timeout {
                        let last_error = format!("no producer id: {e}");
                        shared.complete(b, Err(ProduceError::Timeout { timeout, last_error }));
                    } else {
                        queued.push_back(b);
                    }
                }
                tokio::time::sleep(shared.config.retry_backoff).await;
            }
        }
    }
}

/// Packs ready batches into requests, keeping at most `in_flight_max`
/// requests outstanding. Ends when the producer is dropped.
///
/// Without linger, a batch is sealed when the dispatcher has nothing else
/// queued and a request slot is free, as Kafka's `linger.ms=0`: at light
/// load each record goes out at once, and while requests are in flight the
/// open batches keep taking records instead of leaving one by one.
async fn dispatch(
    weak: std::sync::Weak<Shared>,
    mut ready_rx: mpsc::UnboundedReceiver<ReadyBatch>,
    mut open_rx: mpsc::UnboundedReceiver<(Arc<str>, u32, u64)>,
) {
    let (in_flight, mut idempotent) = match weak.upgrade() {
        Some(s) => (
            Arc::new(Semaphore::new(s.config.in_flight_max.max(1))),
            s.config.idempotent && s.config.acks != Acks::None,
        ),
        None => return,
    };
    let mut producer_id = None;
    // Sealed batches, split per partition where the partitioner runs here.
    let mut queued: VecDeque<ReadyBatch> = VecDeque::new();
    loop {
        if queued.is_empty() {
            let first = tokio::select! {
                biased;
                first = ready_rx.recv() => first,
                open = open_rx.recv() => {
                    let Some((topic, partition, id)) = open else {
                        return;
                    };
                    // Only this task takes permits: one free now is free
                    // for the request that will carry the batch.
                    let Ok(permit) = in_flight.clone().acquire_owned().await else {
                        return;
                    };
                    drop(permit);
                    let Some(shared) = weak.upgrade() else {
                        return;
                    };
                    shared.seal_and_send(&topic, partition, Some(id));
                    continue;
                }
            };
            let Some(first) = first else {
                return;
            };
            let Some(shared) = weak.upgrade() else {
                return;
            };
            queued.extend(shared.split(first));
            continue;
        }
        if idempotent && producer_id.is_none() {
            let Some(shared) = weak.upgrade() else {
                return;
            };
            if shared.txn.is_some() {
                // Numbered with the coordinator's id and epoch (`stamp`).
                producer_id = Some(-1);
                continue;
            }
            producer_id = obtain_producer_id(&shared, &mut ready_rx, &mut queued).await;
            idempotent = producer_id.is_some();
            continue;
        }
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let Some(shared) = weak.upgrade() else {
            return;
        };
        // One request goes to one broker: the leader of the first queued
        // batch takes every queued batch it also leads (order per partition
        // is kept; the others wait for the next request).
        let mut size = 0;
        let mut batches = Vec::new();
        let mut target: Option<Client> = None;
        let mut others = VecDeque::new();
        // Partitions with a batch left for a later request: their later
        // batches wait too, so a partition's batches go out in order.
        let mut skipped: Vec<(Arc<str>, u32)> = Vec::new();
        while size < shared.config.request_bytes_max {
            match queued.pop_front() {
                Some(mut b) => {
                    if skipped.iter().any(|(t, p)| *p == b.partition && *t == b.topic) {
                        others.push_back(b);
                        continue;
                    }
                    let route = shared.route(&b).await;
                    match &target {
                        Some(t) if !t.same_connection(&route) => {
                            skipped.push((b.topic.clone(), b.partition));
                            others.push_back(b);
                            continue;
                        }
                        Some(_) => {}
                        None => target = Some(route),
                    }
                    // A partition's window is full: its batches wait until
                    // the oldest in flight completes.
                    if let Some(id) = producer_id
                        && b.partition != PARTITION_ANY
                        && b.stamp.is_none()
                        && !shared.stamp(&mut b, id)
                    {
                        skipped.push((b.topic.clone(), b.partition));
                        others.push_back(b);
                        continue;
                    }
                    size += b.size_bytes;
                    batches.push(b);
                }
                None => match ready_rx.try_recv() {
                    Ok(b) => queued.extend(shared.split(b)),
                    Err(_) => break,
                },
            }
        }
        while let Some(b) = others.pop_back() {
            queued.push_front(b);
        }
        let Some(target) = target else {
            // Every queued batch waits for its partition's window (or has no
            // route yet): wait for a completion, or look again shortly.
            drop(permit);
            let _ = tokio::time::timeout(Duration::from_millis(50), shared.window_moved.notified()).await;
            continue;
        };
        // Open the stream here, in dispatch order: the broker appends a
        // connection's produce requests in stream order.
        let stream = target.open_stream().await;
        tokio::spawn(async move {
            send_request(&shared, target, batches, stream.ok()).await;
            drop(permit);
        });
    }
}

/// Sends batches until each is acknowledged, refused, unknown or timed out.
/// The first attempt goes to `target` on the stream the dispatcher opened in
/// order; retries go to each batch's leader as the cluster then says.
async fn send_request(shared: &Shared, target: Client, pending: Vec<ReadyBatch>, stream: Option<RequestStream>) {
    let config = &shared.config;
    let mut attempts = vec![(target, pending, stream)];
    loop {
        let mut retry = Vec::new();
        let mut last_error = String::new();
        for (target, batches, stream) in attempts {
            let (again, error) = send_once(shared, &target, batches, stream).await;
            retry.extend(again);
            if !error.is_empty() {
                last_error = error;
            }
        }
        let mut pending = Vec::new();
        for b in retry {
            if b.created.elapsed() >= config.delivery_timeout {
                let error = ProduceError::Timeout { timeout: config.delivery_timeout, last_error: last_error.clone() };
                shared.fail(b, error);
            } else {
                pending.push(b);
            }
        }
        if pending.is_empty() {
            return;
        }
        tracing::debug!(batches = pending.len(), error = %last_error, "retrying produce");
        tokio::time::sleep(config.retry_backoff).await;
        // Group by leader again: leadership may have moved.
        let mut routed = Vec::with_capacity(pending.len());
        for b in pending {
            routed.push((shared.route(&b).await, b));
        }
        attempts = group_by_connection(routed).into_iter().map(|(route, group)| (route, group, None)).collect();
    }
}

/// One produce request. Returns the batches to retry and the last retriable
/// error; completes every other batch.
async fn send_once(
    shared: &Shared,
    target: &Client,
    mut pending: Vec<ReadyBatch>,
    stream: Option<RequestStream>,
) -> (Vec<ReadyBatch>, String) {
    let config = &shared.config;
    let request = ProduceRequest {
        transactional_id: shared.txn.as_ref().map(|t| t.id.clone()),
        acks: config.acks,
        timeout_ms: config.delivery_timeout.as_millis() as u32,
        partitions: pending
            .iter_mut()
            .map(|b| ProducePartition { topic: b.topic.to_string(), partition: b.partition, records: b.records() })
            .collect(),
    };
    let opened = match stream {
        Some(s) => Ok(s),
        None => target.open_stream().await,
    };
    let now = Instant::now();
    for b in &pending {
        b.completer.sent(now);
    }
    let outcome = match opened {
        Err(e) => Err(e),
        Ok(s) if config.acks == Acks::None => s.send_only(&request).await.map(|()| None),
        Ok(s) => {
            let partitions = pending.iter().map(|b| (&*b.topic, b.partition));
            shared.client.unless_leadership_moves(partitions, Duration::ZERO, s.call(&request)).await.map(Some)
        }
    };
    // Its records are the batches' own: dropped here, a completed batch's
    // buffer can be reused.
    drop(request);
    match outcome {
        Ok(None) => {
            for b in pending {
                shared.complete(b, Ok(Acked::Base(-1)));
            }
            (Vec::new(), String::new())
        }
        Ok(Some(response)) if response.partitions.len() == pending.len() => {
            let mut retry = Vec::new();
            let mut last_error = String::new();
            for (mut b, r) in pending.into_iter().zip(response.partitions) {
                if r.error == ErrorCode::None && b.partition == PARTITION_ANY {
                    let acked = if r.placements.len() == b.count {
                        Ok(Acked::Placed(r.placements))
                    } else {
                        let e = format!("broker placed {} records of {}", r.placements.len(), b.count);
                        Err(ProduceError::Unknown(e))
                    };
                    shared.complete(b, acked);
                } else if r.error == ErrorCode::None {
                    shared.complete(b, Ok(Acked::Base(r.base_offset)));
                } else {
                    match sequencer::on_error(r.error, &r.message, shared.attempt(&b)) {
                        Verdict::Retry { forget_routes, ambiguous } => {
                            if forget_routes {
                                shared.client.forget_routes();
                            }
                            b.ambiguous = ambiguous;
                            last_error = format!("{}: {}", r.error, r.message);
                            retry.push(b);
                        }
                        Verdict::Unknown(message) => shared.fail(b, ProduceError::Unknown(message)),
                        Verdict::Rejected(e) => shared.fail(b, ProduceError::Rejected(e)),
                    }
                }
            }
            (retry, last_error)
        }
        Ok(Some(_)) => {
            for b in pending {
                let e = "broker answered with a different number of partitions";
                shared.fail(b, ProduceError::Unknown(e.into()));
            }
            (Vec::new(), String::new())
        }
        Err(e) => {
            if sequencer::forgets_routes(&e) {
                shared.client.forget_routes();
            }
            let mut retry = Vec::new();
            for mut b in pending {
                match sequencer::on_lost(&e, shared.attempt(&b)) {
                    Verdict::Retry { ambiguous, .. } => {
                        b.ambiguous = ambiguous;
                        retry.push(b);
                    }
                    Verdict::Unknown(message) => shared.fail(b, ProduceError::Unknown(message)),
                    Verdict::Rejected(error) => shared.fail(b, ProduceError::Rejected(error)),
                }
            }
            (retry, e.to_string())
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
