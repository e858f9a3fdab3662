//! Request handling: decode a frame, run the request, encode the answer.
//! Every failure becomes a typed wire error with a message; no input makes
//! the broker panic.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Buf;
use bytes::Bytes;
use quiver_protocol::batch::{self, BatchError, ValidationLimits};
use quiver_protocol::codec::{Wire, decode_exact};
use quiver_protocol::frame::{RequestHeader, encode_error_response, encode_response};
use quiver_protocol::messages::*;
use quiver_protocol::{ErrorCode, WireError};

use crate::access::{self, RequestContext};
use crate::broker::Broker;
use crate::errors::{blocking, corrupt, read_error};
use crate::order::AppendTurn;
use crate::partition::{Partition, RemoteLeader};
use crate::placement::{Destination, Placed};
use crate::plugins::{BatchMode, serializers};
use crate::topic::TopicCompression;

/// How long an `acks=all` write waits for the in-sync replicas.
const REPLICATION_TIMEOUT: Duration = Duration::from_secs(10);

const BROKER_SOFTWARE: &str = concat!("quiver ", env!("CARGO_PKG_VERSION"));

impl Broker {
    /// Answers one request frame (without its length prefix) with one
    /// response frame (with its length prefix). A produce request appends
    /// only when `turn` (its place in the connection's order) has come.
    /// The request runs as the broker itself ([`RequestContext::internal`]).
    pub async fn handle(self: &Arc<Self>, mut frame: Bytes, turn: Option<AppendTurn>) -> Vec<Bytes> {
        if frame.len() < 2 {
            return self.respond(Err(corrupt("request frame ends inside its header")));
        }
        let api_key = frame.get_u16();
        self.handle_after_key(&RequestContext::internal(), api_key, frame, turn).await
    }

    /// Like [`Broker::handle`], for a transport that already read the API
    /// key (to order produce requests): `rest` is the frame after it, sent
    /// by `context`'s principal.
    pub async fn handle_after_key(
        self: &Arc<Self>,
        context: &RequestContext,
        api_key: u16,
        mut rest: Bytes,
        turn: Option<AppendTurn>,
    ) -> Vec<Bytes> {
        if rest.len() < 2 {
            return self.respond(Err(corrupt("request frame ends inside its header")));
        }
        let api_version = rest.get_u16();
        self.respond(self.dispatch_request(context, RequestHeader { api_key, api_version }, rest, turn).await)
    }

    fn respond(&self, result: Result<Vec<Bytes>, WireError>) -> Vec<Bytes> {
        result.unwrap_or_else(|error| {
            tracing::debug!(code = %error.code, message = %error.message, "request failed");
            encode_error_response(&error)
        })
    }

    async fn dispatch_request(
        self: &Arc<Self>,
        context: &RequestContext,
        header: RequestHeader,
        body: Bytes,
        turn: Option<AppendTurn>,
    ) -> Result<Vec<Bytes>, WireError> {
        let api = ApiKey::from_u16(header.api_key)
            .ok_or_else(|| WireError::new(ErrorCode::UnknownApi, format!("unknown API key {}", header.api_key)))?;
        let (min, max) = api.supported_versions();
        if header.api_version < min || header.api_version > max {
            return Err(WireError::new(
                ErrorCode::UnsupportedVersion,
                format!(
                    "{api:?} version {} is not supported; this broker supports versions {min} to {max}",
                    header.api_version
                ),
            ));
        }
        let (operation, resource) = access::operation_of(api);
        let policy = access::Policy { allow_anonymous_admin: self.config.allow_anonymous_admin };
        if let Err(denied) = access::authorize(policy, &context.principal, operation, resource) {
            tracing::warn!(
                principal = %context.principal,
                peer = ?context.peer,
                connection = context.connection,
                ?api,
                "request denied"
            );
            return Err(denied);
        }
        // What a restarting node may answer before it caught up: the
        // handshake, the quorum's own traffic, followers' fetches (checked
        // by leader epoch) and its own view of the cluster.
        if !matches!(api, ApiKey::ApiVersions | ApiKey::Controller | ApiKey::ReplicaFetch | ApiKey::ClusterInfo) {
            self.ready()?;
        }
        match api {
            ApiKey::ApiVersions => self.run(body, |_: ApiVersionsRequest| async { Ok(self.api_versions()) }).await,
            ApiKey::Metadata => self.run(body, |r| async move { Ok(self.metadata(r)) }).await,
            ApiKey::CreateTopic => self.run(body, |r| self.create_topic(r)).await,
            ApiKey::DeleteTopic => self.run(body, |r| self.delete_topic_request(r)).await,
            ApiKey::DescribeTopics => {
                self.run(body, |r: DescribeTopicsRequest| async move { self.describe(r.names) }).await
            }
            ApiKey::Produce => self.run(body, |r| self.produce(r, turn)).await,
            ApiKey::Fetch => self.run(body, |r| self.fetch(r)).await,
            ApiKey::ListOffsets => self.run(body, |r| async move { Ok(self.list_offsets(r)) }).await,
            ApiKey::PluginDeploy => {
                self.run(body, |r| async move {
                    let (version, sha256, abi_version) = self.deploy_plugin(r).await?;
                    Ok(PluginDeployResponse { version, sha256, abi_version })
                })
                .await
            }
            ApiKey::PluginList => {
                self.run(body, |r: PluginListRequest| async move { self.list_plugins(r.names) }).await
            }
            ApiKey::PluginControl => {
                self.run(body, |r: PluginControlRequest| async move {
                    self.control_plugin(&r.name, r.action).await?;
                    Ok(PluginControlResponse {})
                })
                .await
            }
            ApiKey::PluginFetch => {
                self.run(body, |r: PluginFetchRequest| async move { self.fetch_plugin(&r.name) }).await
            }
            ApiKey::Controller => self.run(body, |r| self.controller_call(r)).await,
            ApiKey::ClusterInfo => self.run(body, |_: ClusterInfoRequest| async { Ok(self.cluster_info()) }).await,
            ApiKey::ReplicaFetch => self.run(body, |r| self.replica_fetch(r)).await,
            ApiKey::ElectLeaders => self.run(body, |_: ElectLeadersRequest| self.elect_leaders()).await,
            ApiKey::AlterVoters => self.run(body, |r| self.alter_voters(r)).await,
            ApiKey::ReassignPartition => self.run(body, |r| self.reassign_partition(r)).await,
            ApiKey::InitProducerId => self.run(body, |r| self.init_producer_id(r)).await,
            ApiKey::PluginLogs => {
                self.run(body, |r: PluginLogsRequest| async move {
                    Ok(PluginLogsResponse { lines: self.plugin_logs(&r.name, r.since)? })
                })
                .await
            }
        }
    }

    async fn run<Req, Resp, F, Fut>(&self, body: Bytes, f: F) -> Result<Vec<Bytes>, WireError>
    where
        Req: Wire,
        Resp: Wire,
        F: FnOnce(Req) -> Fut,
        Fut: Future<Output = Result<Resp, WireError>>,
    {
        let request = decode_exact::<Req>(body).map_err(corrupt)?;
        Ok(encode_response(&f(request).await?))
    }

    fn api_versions(&self) -> ApiVersionsResponse {
        ApiVersionsResponse {
            broker_software: BROKER_SOFTWARE.into(),
            node_id: self.config.node_id,
            apis: ApiKey::ALL
                .iter()
                .map(|api| {
                    let (min, max) = api.supported_versions();
                    ApiVersionRange { api_key: *api as u16, min_version: min, max_version: max }
                })
                .collect(),
        }
    }

    /// The deployed version of plugin `name` (0 for none).
    pub(crate) fn plugin_version(&self, name: &str) -> u32 {
        self.plugins.get(name).map_or(0, |d| d.deployment.read().expect("deployment lock").version)
    }

    async fn delete_topic_request(&self, r: DeleteTopicRequest) -> Result<DeleteTopicResponse, WireError> {
        self.delete_topic_in_metadata(&r.name).await?;
        Ok(DeleteTopicResponse {})
    }

    pub(crate) async fn produce(
        self: &Arc<Self>,
        r: ProduceRequest,
        turn: Option<AppendTurn>,
    ) -> Result<ProduceResponse, WireError> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(WireError::new(ErrorCode::BrokerShuttingDown, "broker is shutting down"));
        }
        // Validate, run serializers and partitioners, and re-encode before
        // taking the turn: the CPU work of concurrent requests overlaps; only
        // the appends are ordered. A refused record rejects its whole batch
        // and nothing of it is appended.
        let mut prepared = Vec::with_capacity(r.partitions.len());
        for p in &r.partitions {
            prepared.push(self.prepare(p).await);
        }
        if let Some(turn) = &turn {
            turn.wait().await;
        }
        let mut results = Vec::with_capacity(r.partitions.len());
        let mut to_sync = Vec::new();
        for (p, prepared) in r.partitions.iter().zip(prepared) {
            let mut result = ProducePartitionResult {
                topic: p.topic.clone(),
                partition: p.partition,
                error: ErrorCode::None,
                message: String::new(),
                base_offset: -1,
                log_start_offset: -1,
                placements: Vec::new(),
            };
            // Shares led elsewhere are forwarded under the turn, so that
            // the leader receives them in this connection's order too.
            let appended = async {
                let targets = prepared?;
                let any = p.partition == PARTITION_ANY;
                if any {
                    let count = targets.iter().map(|t| t.indices.len()).sum();
                    result.placements = vec![RecordPlacement { partition: PARTITION_ANY, offset: -1 }; count];
                }
                for (i, target) in targets.into_iter().enumerate() {
                    let appended = match target.to {
                        Destination::Here(partition) => partition
                            .append_as_leader(&p.topic, &target.batch, r.acks == Acks::All)
                            .map(|(info, epoch)| {
                                result.log_start_offset = partition.log.log_start_offset();
                                to_sync.push((results.len(), partition, info.last_offset + 1, epoch));
                                info.base_offset
                            }),
                        Destination::Leader(leader) => {
                            self.forward(&r, &p.topic, target.partition, target.batch, leader).await
                        }
                    };
                    // Once a share is written, retrying the batch would
                    // write it twice: a later failure is not retriable.
                    let base_offset = appended.map_err(|e| match i {
                        0 => e,
                        _ => WireError::new(
                            if e.code.is_retriable() { ErrorCode::NotReplicated } else { e.code },
                            format!("{} (the records placed in other partitions were appended)", e.message),
                        ),
                    })?;
                    if any {
                        place(&mut result.placements, target.partition, base_offset, &target.indices);
                    } else {
                        result.base_offset = base_offset;
                    }
                }
                Ok::<(), WireError>(())
            }
            .await;
            if let Err(e) = appended {
                (result.error, result.message, result.base_offset) = (e.code, e.message, -1);
            }
            results.push(result);
        }
        if let Some(turn) = turn {
            turn.release();
        }
        if r.acks == Acks::All {
            // Group commit: concurrent requests on the same partition share
            // the fsync inside `Log::sync_to`.
            for (index, partition, end, epoch) in to_sync {
                let synced = {
                    let partition = partition.clone();
                    tokio::task::spawn_blocking(move || partition.log.sync_to(end)).await
                };
                let failure = match synced {
                    Ok(Ok(())) => self.replicated(&partition, end, epoch).await.err(),
                    Ok(Err(e)) => Some(WireError::new(ErrorCode::StorageError, format!("fsync failed: {e}"))),
                    Err(e) => Some(WireError::new(ErrorCode::StorageError, format!("fsync failed: {e}"))),
                };
                if let Some(e) = failure {
                    let result = &mut results[index];
                    (result.error, result.message) = (e.code, e.message);
                }
            }
        }
        Ok(ProduceResponse { partitions: results })
    }

    /// Forwards one share of a `PARTITION_ANY` batch to the broker that
    /// leads its partition, with the request's acks: the base offset it got
    /// there.
    async fn forward(
        &self,
        r: &ProduceRequest,
        topic: &str,
        partition: u32,
        records: Bytes,
        leader: RemoteLeader,
    ) -> Result<i64, WireError> {
        let at = leader.0;
        let request = ProduceRequest {
            acks: r.acks,
            timeout_ms: r.timeout_ms,
            partitions: vec![ProducePartition { topic: topic.to_owned(), partition, records }],
        };
        let answer = self.produce_at(leader, request).await.map_err(|e| match e.code {
            // The request may have reached the leader: a retry could write
            // its records twice.
            ErrorCode::RequestTimedOut => WireError::new(
                ErrorCode::NotReplicated,
                format!(
                    "{topic}-{partition} forwarded to its leader, broker {at}: {}: it may or may not be kept",
                    e.message
                ),
            ),
            _ => e,
        })?;
        let result =
            answer.partitions.into_iter().next().ok_or_else(|| {
                WireError::new(ErrorCode::Internal, format!("broker {at} gave an empty produce answer"))
            })?;
        match result.error {
            ErrorCode::None => Ok(result.base_offset),
            code => {
                Err(WireError::new(code, format!("{topic}-{partition} at its leader, broker {at}: {}", result.message)))
            }
        }
    }

    /// Waits until every in-sync replica holds the records below `end`
    /// (immediate on a single node): the high watermark passed them.
    async fn replicated(&self, partition: &Partition, end: i64, epoch: i32) -> Result<(), WireError> {
        self.poll_appends(REPLICATION_TIMEOUT, &[partition], |last| {
            if partition.high_watermark() >= end {
                return Some(Ok(()));
            }
            if !partition.leads_in(epoch) {
                return Some(Err(WireError::new(
                    ErrorCode::NotReplicated,
                    "leadership moved before the in-sync replicas confirmed the write: it may or may not be kept",
                )));
            }
            last.then(|| {
                Err(WireError::new(
                    ErrorCode::NotReplicated,
                    format!(
                        "the in-sync replicas did not confirm the write within {REPLICATION_TIMEOUT:?}: it may or may \
                         not be kept"
                    ),
                ))
            })
        })
        .await
    }

    /// Everything a batch needs before it may be appended: full validation,
    /// the topic's value serializer, its partition(s) (split by the topic's
    /// partitioner for `PARTITION_ANY`), and re-encoding if the topic fixes
    /// a codec.
    async fn prepare(self: &Arc<Self>, p: &ProducePartition) -> Result<Vec<Placed>, WireError> {
        let any = p.partition == PARTITION_ANY;
        let (topic, partition) = if any {
            (self.current_topic(&p.topic)?, None)
        } else {
            let (topic, partition) = self.partition(&p.topic, p.partition)?;
            (topic, Some(partition))
        };
        let limits = ValidationLimits { record_bytes_max: topic.config.record_bytes_max };
        let header = batch::validate(&p.records, &limits).map_err(|e| match e {
            BatchError::RecordTooLarge { .. } => {
                WireError::new(ErrorCode::RecordTooLarge, format!("{e} (topic '{}' max.message.bytes)", p.topic))
            }
            other => WireError::new(ErrorCode::CorruptMessage, format!("invalid record batch: {other}")),
        })?;
        if any && header.producer_id != batch::NO_PRODUCER_ID {
            return Err(WireError::new(
                ErrorCode::InvalidRequest,
                "a batch of an idempotent producer must name its partition: sequence numbers are per partition",
            ));
        }
        let stored = match topic.config.compression {
            TopicCompression::Codec(codec) if !any && header.compression().ok() != Some(codec) => {
                batch::recompress(&p.records, codec).map_err(corrupt)?
            }
            _ => p.records.clone(),
        };
        let broker = self.clone();
        match partition {
            None => blocking(move || broker.place(&topic, &stored)).await,
            // Without serializers, nothing here needs a blocking thread.
            Some(partition) if serializers(&topic.config, true).is_empty() => Ok(vec![Placed::here(partition, stored)]),
            Some(partition) => {
                let stored = blocking(move || Ok(broker.encode_for_topic(&topic, &stored)?.unwrap_or(stored))).await?;
                Ok(vec![Placed::here(partition, stored)])
            }
        }
    }

    async fn fetch(self: &Arc<Self>, r: FetchRequest) -> Result<FetchResponse, WireError> {
        let held = self.held_partitions(r.partitions.iter().map(|p| (p.topic.as_str(), p.partition)));
        let results = self
            .poll_appends(self.fetch_wait(r.max_wait_ms), &held, |last| {
                let (results, bytes, failed) = self.read_partitions(&r);
                let done = last
                    || failed
                    || bytes >= r.min_bytes.max(1) as usize
                    || self.shutting_down.load(Ordering::Relaxed);
                done.then_some(results)
            })
            .await;
        self.fetch_plugins(&r, results).await
    }

    /// A long poll's wait: what the request asks, within the broker's cap.
    pub(crate) fn fetch_wait(&self, max_wait_ms: u32) -> Duration {
        Duration::from_millis(u64::from(max_wait_ms.min(self.config.fetch_wait_ms_max)))
    }

    /// The replicas held here of these partitions (for a long poll to wait
    /// on; the request's answer reports the others).
    pub(crate) fn held_partitions<'a>(&self, wanted: impl Iterator<Item = (&'a str, u32)>) -> Vec<Arc<Partition>> {
        let mut held: Vec<Arc<Partition>> = Vec::new();
        for (topic, partition) in wanted {
            if let Some(p) = self.topic(topic).and_then(|t| t.held(partition))
                && !held.iter().any(|h| Arc::ptr_eq(h, &p))
            {
                held.push(p);
            }
        }
        held
    }

    /// Runs `poll` now and again after every change (append, high-watermark
    /// move, role change) of `partitions` and every `wake_all`, until it
    /// answers, and a last time (`last = true`, where it must answer) once
    /// `wait` has passed.
    pub(crate) async fn poll_appends<T, P: std::ops::Deref<Target = Partition>>(
        &self,
        wait: Duration,
        partitions: &[P],
        mut poll: impl FnMut(bool) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + wait;
        let mut wake_all = self.wake_all.subscribe();
        let waiter = Arc::new(tokio::sync::Notify::new());
        loop {
            wake_all.borrow_and_update();
            for p in partitions {
                p.waiters.register(&waiter);
            }
            let last = tokio::time::Instant::now() >= deadline;
            if let Some(answer) = poll(last) {
                return answer;
            }
            if last {
                break;
            }
            tokio::select! {
                () = waiter.notified() => {}
                _ = wake_all.changed() => {}
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        poll(true).expect("a long poll answers at its deadline")
    }

    /// Runs the fetch's filter and the topics' value decoders over what was
    /// read, batch by batch, off the async runtime.
    async fn fetch_plugins(
        self: &Arc<Self>,
        r: &FetchRequest,
        mut results: Vec<FetchPartitionResult>,
    ) -> Result<FetchResponse, WireError> {
        if r.filter.is_empty() && !r.decode_values {
            return Ok(FetchResponse { partitions: results });
        }
        let (filter, params, decode) = (r.filter.clone(), r.filter_params.clone(), r.decode_values);
        let broker = self.clone();
        tokio::task::spawn_blocking(move || {
            for result in results.iter_mut().filter(|p| !p.records.is_empty()) {
                let topic = broker.topic(&result.topic).filter(|_| decode);
                let decoders = topic.as_ref().map(|t| serializers(&t.config, false)).unwrap_or_default();
                let mut out = Vec::new();
                for item in batch::Batches::new(result.records.clone()) {
                    let (_, mut stored) = item.map_err(corrupt)?;
                    for (name, mode) in &decoders {
                        stored = broker.apply_plugin(name, None, *mode, &stored)?;
                    }
                    if !filter.is_empty() {
                        stored = broker.apply_plugin(&filter, Some(&params), BatchMode::Filter, &stored)?;
                    }
                    out.push(stored);
                }
                result.records = quiver_protocol::codec::concat(&out);
            }
            Ok(FetchResponse { partitions: results })
        })
        .await
        .map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))?
    }

    /// Reads every requested partition once; returns the results, the bytes
    /// read, and whether any partition failed.
    fn read_partitions(&self, r: &FetchRequest) -> (Vec<FetchPartitionResult>, usize, bool) {
        let mut remaining = r.max_bytes as usize;
        let mut total = 0usize;
        let mut failed = false;
        let results = r
            .partitions
            .iter()
            .map(|fp| {
                let mut result = FetchPartitionResult {
                    topic: fp.topic.clone(),
                    partition: fp.partition,
                    error: ErrorCode::None,
                    message: String::new(),
                    high_watermark: -1,
                    log_start_offset: -1,
                    records: Bytes::new(),
                };
                let read = self.partition(&fp.topic, fp.partition).and_then(|(_, p)| {
                    let hw = p.high_watermark();
                    result.high_watermark = hw;
                    result.log_start_offset = p.log.log_start_offset();
                    if fp.offset == hw || remaining == 0 {
                        return Ok(Bytes::new());
                    }
                    // Always allow one whole batch, so a batch larger than the
                    // limit cannot stall a consumer.
                    let limit = (fp.max_bytes as usize).min(remaining).max(1);
                    p.log.read(fp.offset, limit, hw).map_err(read_error)
                });
                match read {
                    Ok(records) => {
                        remaining = remaining.saturating_sub(records.len());
                        total += records.len();
                        result.records = records;
                    }
                    Err(e) => {
                        failed = true;
                        result.error = e.code;
                        result.message = e.message;
                    }
                }
                result
            })
            .collect();
        (results, total, failed)
    }

    fn list_offsets(&self, r: ListOffsetsRequest) -> ListOffsetsResponse {
        let partitions = r
            .partitions
            .into_iter()
            .map(|lp| {
                let found = self.partition(&lp.topic, lp.partition).and_then(|(_, p)| match lp.timestamp {
                    OFFSET_EARLIEST => Ok((p.log.log_start_offset(), -1)),
                    _ if !p.high_watermark_known() => Err(WireError::new(
                        ErrorCode::OffsetNotAvailable,
                        format!(
                            "{}-{}: its new leader's high watermark has not yet reached its predecessor's; retry shortly",
                            lp.topic, lp.partition
                        ),
                    )),
                    OFFSET_LATEST => Ok((p.high_watermark(), -1)),
                    ts if ts >= 0 => match p.log.offset_for_timestamp(ts).map_err(read_error)? {
                        Some((offset, _)) if offset >= p.high_watermark() => Ok((p.high_watermark(), -1)),
                        Some(found) => Ok(found),
                        None => Ok((p.high_watermark(), -1)),
                    },
                    ts => Err(WireError::new(ErrorCode::InvalidRequest, format!("invalid timestamp {ts}"))),
                });
                let (error, message, offset, timestamp) = match found {
                    Ok((offset, ts)) => (ErrorCode::None, String::new(), offset, ts),
                    Err(e) => (e.code, e.message, -1, -1),
                };
                ListOffsetsPartitionResult {
                    topic: lp.topic,
                    partition: lp.partition,
                    error,
                    message,
                    offset,
                    timestamp,
                }
            })
            .collect();
        ListOffsetsResponse { partitions }
    }
}

/// Records where the records at `indices` of a `PARTITION_ANY` batch went.
fn place(placements: &mut [RecordPlacement], partition: u32, base_offset: i64, indices: &[u32]) {
    for (n, &i) in indices.iter().enumerate() {
        placements[i as usize] = RecordPlacement { partition, offset: base_offset + n as i64 };
    }
}
