//! The consumer: the caller assigns partitions and positions; `poll` returns
//! the next records. While the caller works on one response the next fetch
//! is already on its way (pipelining), so a consumer that keeps up is never
//! waiting for a round trip.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use quiver_protocol::batch::{Batches, Header, decode_records};
use quiver_protocol::control::{ReadCommitted, parse_marker};
use quiver_protocol::messages::{
    FetchPartition, FetchRequest, FetchResponse, Isolation, ListOffsetsPartition, OFFSET_EARLIEST, OFFSET_LAST_STABLE,
    OFFSET_LATEST,
};
use quiver_protocol::{ErrorCode, WireError};
use tokio::task::JoinHandle;

use crate::connection::{CallError, Client};

/// How long [`Consumer::lookup`] waits for a partition's leader to be
/// ready: a new topic's or a failed-over partition's leader takes its role
/// within moments, and establishes its high watermark once its followers
/// confirm its log within a fetch or two, or a lagging one leaves the ISR
/// after `replica_lag_time_max_ms` (10 s default).
const LEADER_READY_WITHIN: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// How long the broker may hold a fetch when there is nothing new.
    pub fetch_max_wait: Duration,
    pub fetch_min_bytes: u32,
    /// Bound on one fetch response (whole batches; at least one). 4 MiB by
    /// default: against 16 MiB, catch-up reads took ≈ 6 % less CPU per byte
    /// at the same throughput (page faults were the same; a smaller response
    /// probably stays in the CPU caches between its copies), with one fetch
    /// in flight while the last is decoded.
    pub fetch_bytes_max: u32,
    /// Bound per partition within one fetch; 1 MiB by default, as Kafka's
    /// `max.partition.fetch.bytes`.
    pub partition_fetch_bytes_max: u32,
    /// A deployed read-side filter plugin the broker runs before sending
    /// (only matching records leave it), with its parameters.
    pub filter: Option<String>,
    pub filter_params: Vec<(String, String)>,
    /// Ask the broker to decode values with each topic's value serializer.
    pub decode_values: bool,
    /// In a group: where to start a partition the group committed nothing
    /// for (Kafka's `auto.offset.reset`, `latest` by default).
    pub auto_offset_reset: OffsetReset,
    /// In a group: commit the positions of the records `poll` returned,
    /// every `auto_commit_interval` (at the next `poll`), before giving up
    /// a partition, and at `close`.
    pub enable_auto_commit: bool,
    pub auto_commit_interval: Duration,
    /// In a group: a static member's id (Kafka's `group.instance.id`). A
    /// static member that closes and comes back within its session gets
    /// its partitions back without a rebalance.
    pub instance_id: Option<String>,
    /// `ReadCommitted`: only committed transactions' records (and those
    /// written outside transactions), read up to each partition's last
    /// stable offset; `ReadUncommitted` (the default, as Kafka's): every
    /// record, aborted and open transactions' included. Transaction
    /// markers are never returned.
    pub isolation: Isolation,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            fetch_max_wait: Duration::from_millis(500),
            fetch_min_bytes: 1,
            fetch_bytes_max: 4 * 1024 * 1024,
            partition_fetch_bytes_max: 1024 * 1024,
            filter: None,
            filter_params: Vec::new(),
            decode_values: false,
            auto_offset_reset: OffsetReset::Latest,
            enable_auto_commit: true,
            auto_commit_interval: Duration::from_secs(5),
            instance_id: None,
            isolation: Isolation::ReadUncommitted,
        }
    }
}

/// Where a group member starts a partition its group has no committed
/// offset for (or one outside the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetReset {
    Earliest,
    Latest,
    /// Fail with [`ConsumeError::NoOffset`].
    None,
}

impl std::str::FromStr for OffsetReset {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "earliest" => Ok(OffsetReset::Earliest),
            "latest" => Ok(OffsetReset::Latest),
            "none" => Ok(OffsetReset::None),
            other => Err(format!("offset reset '{other}' is not one of earliest, latest, none")),
        }
    }
}

/// Where to start reading a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetSpec {
    Earliest,
    Latest,
    Offset(i64),
    /// The first record whose timestamp is at least this (ms since epoch).
    Timestamp(i64),
}

/// A record as the consumer returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerRecord {
    /// Shared by every record of the topic: no allocation per record.
    pub topic: std::sync::Arc<str>,
    pub partition: u32,
    pub offset: i64,
    pub timestamp_ms: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<Header>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error(transparent)]
    Call(#[from] CallError),
    #[error("{topic}-{partition}: {error}")]
    Partition { topic: String, partition: u32, error: WireError },
    #[error("{topic}-{partition} at offset {offset}: corrupt batch: {reason}")]
    Corrupt { topic: String, partition: u32, offset: i64, reason: String },
    #[error("topic '{0}' does not exist")]
    UnknownTopic(String),
    /// The group refused the member or its request (the message says
    /// why: an invalid subscription, an instance id in use, ...).
    #[error("group '{group}': {error}")]
    Group { group: String, error: WireError },
    /// `auto_offset_reset` is `none` and the group has no offset here.
    #[error("group '{group}' has no committed offset for {topic}-{partition} and the reset policy is 'none'")]
    NoOffset { group: String, topic: String, partition: u32 },
    /// Mixing a group subscription with hand-assigned partitions, or a
    /// group call on a consumer in no group.
    #[error("{0}")]
    Usage(String),
}

impl ConsumeError {
    /// Whether reading the same positions again may succeed: the cluster
    /// moves a leadership, a broker restarts, a connection is lost.
    pub fn is_transient(&self) -> bool {
        match self {
            ConsumeError::Call(e) => {
                e.is_safe_to_retry()
                    || matches!(e, CallError::ConnectionLost(_) | CallError::Timeout(_) | CallError::LeaderMoved(_))
            }
            ConsumeError::Partition { error, .. } | ConsumeError::Group { error, .. } => error.code.is_retriable(),
            _ => false,
        }
    }
}

/// Pause of a group member's `poll` after a transient fetch failure.
const TRANSIENT_RETRY: Duration = Duration::from_millis(100);

type Tp = (String, u32);

/// A fetch on its way: the positions it asked for, and its answer.
type InFlight = (Vec<(Tp, i64)>, JoinHandle<Result<FetchResponse, CallError>>);

/// Reads assigned partitions in offset order. Not `Clone`: positions are
/// the consumer's own state.
pub struct Consumer {
    pub(crate) client: Client,
    pub(crate) config: ConsumerConfig,
    pub(crate) positions: BTreeMap<Tp, i64>,
    high_watermarks: BTreeMap<Tp, i64>,
    in_flight: Option<InFlight>,
    /// Rotates which partition is read first so none starves.
    rotation: usize,
    /// Partitions not fetched for now (their positions are kept).
    pub(crate) paused: std::collections::BTreeSet<Tp>,
    /// Its group membership, once subscribed.
    pub(crate) membership: Option<crate::membership::Membership>,
    /// A listener set before `subscribe`.
    pub(crate) pending_listener: Option<Box<dyn crate::membership::RebalanceListener>>,
}

// A consumer, and so each future of its methods, goes to any task.
const _: fn() = || {
    fn send_and_sync<T: Send + Sync>() {}
    send_and_sync::<Consumer>();
};

impl Client {
    pub fn consumer(&self, config: ConsumerConfig) -> Consumer {
        Consumer {
            client: self.clone(),
            config,
            positions: BTreeMap::new(),
            high_watermarks: BTreeMap::new(),
            in_flight: None,
            rotation: 0,
            paused: Default::default(),
            membership: None,
            pending_listener: None,
        }
    }
}

impl Consumer {
    /// Adds partitions of a topic (all of them with `None`) at a start position.
    pub async fn assign(
        &mut self,
        topic: &str,
        partitions: Option<Vec<u32>>,
        start: OffsetSpec,
    ) -> Result<(), ConsumeError> {
        if self.membership.is_some() {
            return Err(ConsumeError::Usage(
                "this consumer is subscribed to a group: the group assigns its partitions".into(),
            ));
        }
        let partitions = match partitions {
            Some(p) => p,
            None => {
                let meta = self.client.admin().metadata(Some(vec![topic.to_string()])).await?;
                let t = meta
                    .topics
                    .into_iter()
                    .find(|t| t.name == topic && t.error == ErrorCode::None)
                    .ok_or_else(|| ConsumeError::UnknownTopic(topic.to_string()))?;
                t.partitions.iter().map(|p| p.partition).collect()
            }
        };
        for p in partitions {
            self.seek(topic, p, start).await?;
        }
        Ok(())
    }

    /// Moves a partition's position (assigning it if needed; in a group,
    /// only a partition the group gave this consumer).
    pub async fn seek(&mut self, topic: &str, partition: u32, spec: OffsetSpec) -> Result<(), ConsumeError> {
        if let Some(m) = &self.membership
            && !m.owned.contains(&(topic.to_string(), partition))
        {
            return Err(ConsumeError::Usage(format!("{topic}-{partition} is not assigned to this group member")));
        }
        let offset = match spec {
            OffsetSpec::Offset(o) => o,
            OffsetSpec::Earliest => self.lookup(topic, partition, OFFSET_EARLIEST).await?,
            OffsetSpec::Latest => self.lookup(topic, partition, OFFSET_LATEST).await?,
            OffsetSpec::Timestamp(ts) => self.lookup(topic, partition, ts.max(0)).await?,
        };
        self.positions.insert((topic.to_string(), partition), offset);
        Ok(())
    }

    /// Resolves an offset spec without moving any position (asking the
    /// partition's leader; once more after a `not_leader` answer, and again
    /// for a while when a new leader's offsets are not available yet).
    pub async fn lookup(&self, topic: &str, partition: u32, timestamp: i64) -> Result<i64, ConsumeError> {
        // A read_committed reader's end is the last stable offset.
        let timestamp = match (timestamp, self.config.isolation) {
            (OFFSET_LATEST, Isolation::ReadCommitted) => OFFSET_LAST_STABLE,
            _ => timestamp,
        };
        let mut results;
        let mut asked_again = false;
        let deadline = tokio::time::Instant::now() + LEADER_READY_WITHIN;
        loop {
            let leader = self.client.for_partition(topic, partition).await?;
            results = leader
                .admin()
                .list_offsets(vec![ListOffsetsPartition { topic: topic.to_string(), partition, timestamp }])
                .await?;
            match results.first().map(|r| r.error) {
                // Moved (ask for the leader again at once), or still
                // becoming the leader (then also wait a little); an offline
                // partition is the answer.
                Some(ErrorCode::NotLeader)
                    if tokio::time::Instant::now() < deadline && !self.client.known_offline(topic, partition) =>
                {
                    if asked_again {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    asked_again = true;
                    self.client.forget_routes();
                }
                Some(ErrorCode::OffsetNotAvailable) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                _ => break,
            }
        }
        let r = results.into_iter().next().ok_or_else(|| ConsumeError::Partition {
            topic: topic.to_string(),
            partition,
            error: WireError::new(ErrorCode::Internal, "empty list-offsets answer"),
        })?;
        if r.error != ErrorCode::None {
            return Err(ConsumeError::Partition {
                topic: topic.to_string(),
                partition,
                error: WireError::new(r.error, r.message),
            });
        }
        Ok(r.offset)
    }

    pub fn position(&self, topic: &str, partition: u32) -> Option<i64> {
        self.positions.get(&(topic.to_string(), partition)).copied()
    }

    /// High watermarks as of the last fetch (the offset after the last
    /// readable record), per partition.
    pub fn high_watermark(&self, topic: &str, partition: u32) -> Option<i64> {
        self.high_watermarks.get(&(topic.to_string(), partition)).copied()
    }

    pub fn assignment(&self) -> Vec<(String, u32)> {
        self.positions.keys().cloned().collect()
    }

    /// Stops reading a partition.
    pub fn unassign(&mut self, topic: &str, partition: u32) {
        self.positions.remove(&(topic.to_string(), partition));
    }

    /// Stops fetching a partition, keeping its position (and, in a group,
    /// its ownership) until [`Consumer::resume`].
    pub fn pause(&mut self, topic: &str, partition: u32) {
        self.paused.insert((topic.to_string(), partition));
    }

    pub fn resume(&mut self, topic: &str, partition: u32) {
        self.paused.remove(&(topic.to_string(), partition));
    }

    pub fn paused(&self) -> Vec<(String, u32)> {
        self.paused.iter().cloned().collect()
    }

    fn start_fetch(&mut self) {
        let mut wanted: Vec<(Tp, i64)> =
            self.positions.iter().filter(|(k, _)| !self.paused.contains(*k)).map(|(k, v)| (k.clone(), *v)).collect();
        if wanted.is_empty() {
            return;
        }
        let n = wanted.len();
        wanted.rotate_left(self.rotation % n);
        self.rotation = self.rotation.wrapping_add(1);
        let request = FetchRequest {
            filter: self.config.filter.clone().unwrap_or_default(),
            filter_params: self.config.filter_params.clone(),
            decode_values: self.config.decode_values,
            isolation: self.config.isolation,
            max_wait_ms: self.config.fetch_max_wait.as_millis() as u32,
            min_bytes: self.config.fetch_min_bytes,
            max_bytes: self.config.fetch_bytes_max,
            partitions: wanted
                .iter()
                .map(|((topic, partition), offset)| FetchPartition {
                    topic: topic.clone(),
                    partition: *partition,
                    offset: *offset,
                    max_bytes: self.config.partition_fetch_bytes_max,
                })
                .collect(),
        };
        let client = self.client.clone();
        let handle = tokio::spawn(routed_fetch(client, request));
        self.in_flight = Some((wanted, handle));
    }

    /// The next records of the assigned partitions, in offset order per
    /// partition; empty when nothing arrived within `fetch_max_wait`.
    ///
    /// A group member's `poll` rides out what passes by itself (a leader
    /// moving, a broker restarting, a lost connection): it answers with no
    /// records and reads the same positions again, as Kafka's consumer
    /// does; other consumers get those errors.
    pub async fn poll(&mut self) -> Result<Vec<ConsumerRecord>, ConsumeError> {
        if self.membership.is_none() {
            return self.fetch_next().await;
        }
        self.auto_commit_if_due();
        let polled = match self.reconcile().await {
            Ok(()) => self.fetch_next().await,
            Err(e) => Err(e),
        };
        match polled {
            Err(e) if e.is_transient() => {
                tracing::debug!(error = %e, "poll failed; trying again");
                tokio::time::sleep(TRANSIENT_RETRY).await;
                Ok(Vec::new())
            }
            // A position outside the log (retention passed a lagging
            // group's commit, or a topic was created again): where
            // `auto_offset_reset` says, as Kafka's consumer does.
            Err(ConsumeError::Partition { topic, partition, error })
                if error.code == ErrorCode::OffsetOutOfRange && self.config.auto_offset_reset != OffsetReset::None =>
            {
                let at = match self.config.auto_offset_reset {
                    OffsetReset::Earliest => OFFSET_EARLIEST,
                    _ => OFFSET_LATEST,
                };
                let offset = self.lookup(&topic, partition, at).await?;
                tracing::warn!(%topic, partition, offset, reason = %error.message, "position out of range; reset");
                self.positions.insert((topic, partition), offset);
                Ok(Vec::new())
            }
            other => other,
        }
    }

    async fn fetch_next(&mut self) -> Result<Vec<ConsumerRecord>, ConsumeError> {
        if self.in_flight.is_none() {
            self.start_fetch();
        }
        let Some((asked, handle)) = self.in_flight.take() else {
            // Nothing to fetch (no partition yet, or all paused): wait as a
            // fetch would, for a new assignment in a group.
            self.wait_for_assignment(self.config.fetch_max_wait).await;
            return Ok(Vec::new());
        };
        let response = match handle.await {
            Ok(r) => r?,
            Err(e) => return Err(CallError::ConnectionLost(e.to_string()).into()),
        };
        // Advance positions from the batch headers alone, then pipeline the
        // next fetch before decoding the records.
        let mut chunks = Vec::new();
        let mut first_error = None;
        let mut records_hint = 0usize;
        for (r, ((topic, partition), asked_offset)) in response.partitions.into_iter().zip(asked) {
            let tp = (topic, partition);
            // Seeked, unassigned or paused while the fetch was in flight:
            // its records are not returned, the position stays.
            if self.positions.get(&tp) != Some(&asked_offset) || self.paused.contains(&tp) {
                continue;
            }
            if r.error != ErrorCode::None {
                first_error.get_or_insert(ConsumeError::Partition {
                    topic: tp.0.clone(),
                    partition,
                    error: WireError::new(r.error, r.message),
                });
                continue;
            }
            self.high_watermarks.insert(tp.clone(), r.high_watermark);
            let mut next = asked_offset;
            for batch in Batches::new(r.records.clone()) {
                match batch {
                    Ok((header, _)) => {
                        next = next.max(header.next_offset());
                        records_hint += header.record_count.clamp(0, 1 << 16) as usize;
                    }
                    Err(e) => {
                        first_error.get_or_insert(ConsumeError::Corrupt {
                            topic: tp.0.clone(),
                            partition,
                            offset: next,
                            reason: e.to_string(),
                        });
                        break;
                    }
                }
            }
            let aborted = r.aborted.iter().map(|a| (a.producer_id, a.first_offset)).collect();
            chunks.push((tp, asked_offset, next, r.records, aborted));
        }
        // On an error no position moves: the records of the partitions
        // that answered are not returned, so they are fetched again.
        if let Some(e) = first_error {
            return Err(e);
        }
        for (tp, _, next, _, _) in &chunks {
            self.positions.insert(tp.clone(), *next);
        }
        self.start_fetch();
        let mut out = Vec::with_capacity(records_hint);
        let committed = self.config.isolation == Isolation::ReadCommitted;
        for ((topic, partition), asked_offset, _, records, aborted) in chunks {
            let shared_topic: std::sync::Arc<str> = topic.as_str().into();
            let mut filter = ReadCommitted::new(aborted);
            for batch in Batches::new(records) {
                let (header, bytes) = batch.map_err(|e| corrupt(&topic, partition, asked_offset, e))?;
                let decoded = decode_records(&bytes).map_err(|e| corrupt(&topic, partition, header.base_offset, e))?;
                // Markers are the reader's bookkeeping, never records; an
                // aborted transaction's data is dropped when reading
                // committed.
                let marker = match header.is_control() {
                    true => decoded.first().and_then(|r| r.key.as_deref()).and_then(parse_marker),
                    false => None,
                };
                if !filter.keep(&header, marker) && (committed || header.is_control()) {
                    continue;
                }
                for r in decoded.into_iter().filter(|r| r.offset >= asked_offset) {
                    out.push(ConsumerRecord {
                        topic: shared_topic.clone(),
                        partition,
                        offset: r.offset,
                        timestamp_ms: r.timestamp,
                        key: r.key,
                        value: r.value,
                        headers: r.headers,
                    });
                }
            }
        }
        Ok(out)
    }
}

/// Sends a fetch to the leaders of its partitions (one request per leader,
/// concurrently) and merges the answers in request order. Partitions that
/// answer `not_leader` are asked once more after the leaders are looked up
/// again; a second `not_leader` (e.g. an offline partition) is the answer.
async fn routed_fetch(client: Client, request: FetchRequest) -> Result<FetchResponse, CallError> {
    let n = request.partitions.len();
    let mut results: Vec<Option<quiver_protocol::messages::FetchPartitionResult>> = (0..n).map(|_| None).collect();
    for round in 0..2 {
        let todo: Vec<usize> = (0..n)
            .filter(|i| match &results[*i] {
                None => true,
                Some(r) => round > 0 && r.error == ErrorCode::NotLeader,
            })
            .collect();
        if todo.is_empty() {
            break;
        }
        // Leaders are looked up again after `not_leader` (not after a
        // moved leadership: the cache already names the new one).
        if round > 0 && todo.iter().any(|i| results[*i].is_some()) {
            client.forget_routes();
        }
        let mut routed = Vec::with_capacity(todo.len());
        for i in todo {
            let p = &request.partitions[i];
            routed.push((client.for_partition(&p.topic, p.partition).await?, i));
        }
        let groups = crate::routing::group_by_connection(routed);
        let calls: Vec<_> = groups
            .into_iter()
            .map(|(route, members)| {
                let mut sub = request.clone();
                sub.partitions = members.iter().map(|i| request.partitions[*i].clone()).collect();
                let watcher = client.clone();
                tokio::spawn(async move {
                    // A leader that died with the fetch: ask the new one.
                    let partitions = sub.partitions.iter().map(|p| (p.topic.as_str(), p.partition));
                    let patience = Duration::from_millis(u64::from(sub.max_wait_ms));
                    let answer = watcher.unless_leadership_moves(partitions, patience, route.call(&sub)).await;
                    (members, answer)
                })
            })
            .collect();
        for call in calls {
            let (members, answer) = call.await.map_err(|e| CallError::ConnectionLost(e.to_string()))?;
            let answer = match answer {
                Ok(a) => a,
                Err(CallError::LeaderMoved(e)) if round == 0 => {
                    tracing::debug!(error = %e, "fetching again from the new leader");
                    continue;
                }
                Err(e) => {
                    if e.is_safe_to_retry() || matches!(e, CallError::ConnectionLost(_) | CallError::Timeout(_)) {
                        client.forget_routes();
                    }
                    return Err(e);
                }
            };
            for (i, r) in members.into_iter().zip(answer.partitions) {
                results[i] = Some(r);
            }
        }
    }
    let partitions = results
        .into_iter()
        .map(|r| r.ok_or_else(|| CallError::ConnectionLost("a broker answered fewer partitions".into())))
        .collect::<Result<_, _>>()?;
    Ok(FetchResponse { partitions })
}

pub(crate) fn corrupt(topic: &str, partition: u32, offset: i64, e: impl std::fmt::Display) -> ConsumeError {
    ConsumeError::Corrupt { topic: topic.to_string(), partition, offset, reason: e.to_string() }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        if let Some((_, handle)) = self.in_flight.take() {
            handle.abort();
        }
    }
}

pub(crate) type TopicPartition = Tp;
