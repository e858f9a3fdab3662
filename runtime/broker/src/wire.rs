//! The Quiver wire adapter: decodes a request frame, checks it is allowed
//! (the one authorization point), runs it — the data path through the
//! typed operations in `api` — and encodes the answer. The broker's error
//! types become wire error codes here and nowhere else; no input makes the
//! broker panic.

use std::sync::Arc;
use std::time::Duration;

use bytes::Buf;
use bytes::Bytes;
use quiver_controller::RefusalKind;
use quiver_groups::share::{Ack, Acquired, ShareError};
use quiver_groups::{Assignment, Committed, Group, Heartbeat, MemberState, Subscription};
use quiver_log::{AppendError, ReadError, SequenceError};
use quiver_protocol::codec::{Wire, decode_exact};
use quiver_protocol::frame::{RequestHeader, encode_error_response, encode_response};
use quiver_protocol::messages::*;
use quiver_protocol::{ErrorCode, WireError};

use crate::access::{self, RequestContext};
use crate::api::groups::{OffsetToCommit, group_configs, group_kind, group_state, overridden};
use crate::api::share_groups::{ShareAck, ShareFetch};
use crate::api::{self, NewTopic, OffsetQuery, Read, ReadOptions, Write};
use crate::broker::Broker;
use crate::errors::{
    AdminError, FetchError, GroupOpError, ListOffsetsError, MetadataError, PartitionError, PluginAdminError,
    PluginCallError, ProduceError, ReplicaError, TxnOpError,
};
use crate::order::AppendTurn;

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
            return Err(WireError::new(ErrorCode::NotAuthorized, denied.to_string()));
        }
        // What a restarting node may answer before it caught up: the
        // handshake, the quorum's own traffic, followers' fetches (checked
        // by leader epoch) and its own view of the cluster.
        if !matches!(api, ApiKey::ApiVersions | ApiKey::Controller | ApiKey::ReplicaFetch | ApiKey::ClusterInfo) {
            self.ready().map_err(|e| wire_error(ErrorCode::BrokerNotReady, e))?;
        }
        match api {
            ApiKey::ApiVersions => {
                self.run(body, |_: ApiVersionsRequest| async { Ok::<_, WireError>(self.api_versions()) }).await
            }
            ApiKey::Metadata => self.run(body, |r| async move { Ok::<_, WireError>(self.metadata(r)) }).await,
            ApiKey::CreateTopic => {
                self.run(body, |r: CreateTopicRequest| async move {
                    refuse_internal(&r.name)?;
                    let new = NewTopic {
                        name: r.name,
                        partitions: r.partitions,
                        replication_factor: r.replication_factor,
                        configs: r.configs,
                    };
                    Ok::<_, WireError>(CreateTopicResponse { configs: self.create_topic(&new).await? })
                })
                .await
            }
            ApiKey::DeleteTopic => {
                self.run(body, |r: DeleteTopicRequest| async move {
                    refuse_internal(&r.name)?;
                    self.delete_topic_in_metadata(&r.name).await?;
                    Ok::<_, WireError>(DeleteTopicResponse {})
                })
                .await
            }
            ApiKey::DescribeTopics => {
                self.run(body, |r: DescribeTopicsRequest| async move { self.describe(r.names) }).await
            }
            ApiKey::CompactTopic => {
                self.run(body, |r: CompactTopicRequest| async move {
                    let broker = self.clone();
                    let cleaned = tokio::task::spawn_blocking(move || broker.compact_topic(&r.topic))
                        .await
                        .map_err(|e| AdminError::Storage(Box::new(e)))??;
                    let partitions = cleaned.into_iter().map(|(partition, report)| {
                        let r = report.unwrap_or_default();
                        CompactedPartition {
                            partition,
                            cleaned: r.segments_written > 0,
                            first_dirty_offset: r.first_dirty_offset,
                            cleaned_to: r.cleaned_to,
                            bytes_before: r.bytes_before,
                            bytes_after: r.bytes_after,
                            records_before: r.records_before,
                            records_after: r.records_after,
                        }
                    });
                    Ok::<_, AdminError>(CompactTopicResponse {
                        node_id: self.config.node_id,
                        partitions: partitions.collect(),
                    })
                })
                .await
            }
            ApiKey::Produce => self.run(body, |r| self.produce(r, turn)).await,
            ApiKey::Fetch => self.run(body, |r| self.fetch(r)).await,
            ApiKey::ListOffsets => self.run(body, |r| self.list_offsets(r)).await,
            ApiKey::PluginDeploy => {
                self.run(body, |r| async move {
                    let (version, sha256, abi_version) = self.deploy_plugin(r).await?;
                    Ok::<_, PluginAdminError>(PluginDeployResponse { version, sha256, abi_version })
                })
                .await
            }
            ApiKey::PluginList => {
                self.run(body, |r: PluginListRequest| async move { self.list_plugins(r.names) }).await
            }
            ApiKey::PluginControl => {
                self.run(body, |r: PluginControlRequest| async move {
                    self.control_plugin(&r.name, r.action).await?;
                    Ok::<_, PluginAdminError>(PluginControlResponse {})
                })
                .await
            }
            ApiKey::PluginFetch => {
                self.run(body, |r: PluginFetchRequest| async move { self.fetch_plugin(&r.name) }).await
            }
            ApiKey::Controller => self.run(body, |r| self.controller_call(r)).await,
            ApiKey::ClusterInfo => {
                self.run(body, |_: ClusterInfoRequest| async { Ok::<_, WireError>(self.cluster_info()) }).await
            }
            ApiKey::ReplicaFetch => self.run(body, |r| self.replica_fetch(r)).await,
            ApiKey::ElectLeaders => {
                self.run(body, |_: ElectLeadersRequest| async {
                    let elected = self.elect_leaders().await?;
                    let elected = elected.into_iter().map(|(topic, partition)| PartitionRef { topic, partition });
                    Ok::<_, AdminError>(ElectLeadersResponse { elected: elected.collect() })
                })
                .await
            }
            ApiKey::AlterVoters => {
                self.run(body, |r: AlterVotersRequest| async move {
                    Ok::<_, AdminError>(AlterVotersResponse { voters: self.alter_voters(r.add, r.remove).await? })
                })
                .await
            }
            ApiKey::ReassignPartition => {
                self.run(body, |r: ReassignPartitionRequest| async move {
                    let replicas = (!r.cancel).then_some(r.replicas);
                    self.reassign_partition(r.topic, r.partition, replicas).await?;
                    Ok::<_, AdminError>(ReassignPartitionResponse {})
                })
                .await
            }
            ApiKey::InitProducerId => {
                self.run(body, |r: InitProducerIdRequest| async move {
                    let (producer_id, producer_epoch) = match r.transactional_id {
                        None => (self.init_producer_id().await?, 0),
                        Some(id) => self.init_transactional(&id, u64::from(r.transaction_timeout_ms)).await?,
                    };
                    Ok::<_, WireError>(InitProducerIdResponse { producer_id, producer_epoch })
                })
                .await
            }
            ApiKey::FindCoordinator => {
                self.run(body, |r: FindCoordinatorRequest| async move {
                    let found = match r.kind {
                        CoordinatorKind::Group => self.find_coordinator(&r.group).await?,
                        CoordinatorKind::Transaction => self.find_txn_coordinator(&r.group).await?,
                    };
                    let (node_id, address) = found.leader.unwrap_or((NO_LEADER, String::new()));
                    Ok::<_, WireError>(FindCoordinatorResponse { partition: found.partition, node_id, address })
                })
                .await
            }
            ApiKey::EndTxn => {
                self.run(body, |r: EndTxnRequest| async move {
                    let (producer_id, producer_epoch) =
                        self.end_txn(&r.transactional_id, r.producer_id, r.producer_epoch, r.commit).await?;
                    Ok::<_, TxnOpError>(EndTxnResponse { producer_id, producer_epoch })
                })
                .await
            }
            ApiKey::AddPartitionsToTxn => {
                self.run(body, |r: AddPartitionsToTxnRequest| async move {
                    let partitions = r.partitions.into_iter().map(|p| (p.topic, p.partition)).collect();
                    self.add_to_txn(&r.transactional_id, r.producer_id, r.producer_epoch, partitions, r.groups).await?;
                    Ok::<_, TxnOpError>(AddPartitionsToTxnResponse {})
                })
                .await
            }
            ApiKey::WriteTxnMarkers => {
                self.run(body, |r: WriteTxnMarkersRequest| async move {
                    let asked: Vec<(String, u32)> = r.markers.iter().map(|m| (m.topic.clone(), m.partition)).collect();
                    let written = self.write_txn_markers(r.markers, r.coordinator_epoch).await;
                    let results = asked.into_iter().zip(written).map(|((topic, partition), result)| {
                        let (error, message) = match result {
                            Ok(()) => (ErrorCode::None, String::new()),
                            Err(e) => (code_of_produce(&e), e.to_string()),
                        };
                        TxnMarkerResult { topic, partition, error, message }
                    });
                    let mut group_results = Vec::with_capacity(r.groups.len());
                    for m in r.groups {
                        let (error, message) = match self.end_group_transaction(&m.group, m.producer_id, m.commit).await
                        {
                            Ok(()) => (ErrorCode::None, String::new()),
                            Err(e) => (code_of_group(&e), e.to_string()),
                        };
                        group_results.push(GroupTxnMarkerResult { group: m.group, error, message });
                    }
                    Ok::<_, WireError>(WriteTxnMarkersResponse { results: results.collect(), group_results })
                })
                .await
            }
            ApiKey::TxnOffsetCommit => {
                self.run(body, |r: TxnOffsetCommitRequest| async move {
                    let offsets = to_commit(r.offsets);
                    self.commit_offsets(&r.group, &r.member_id, r.member_epoch, Some(r.producer_id), offsets).await?;
                    Ok::<_, GroupOpError>(TxnOffsetCommitResponse {})
                })
                .await
            }
            ApiKey::ListTransactions => {
                self.run(body, |_: ListTransactionsRequest| async {
                    let all = self.all_transactions().await;
                    let transactions = all.iter().map(|t| self.transaction_info(t)).collect();
                    Ok::<_, WireError>(ListTransactionsResponse { transactions })
                })
                .await
            }
            ApiKey::DescribeTransaction => {
                self.run(body, |r: DescribeTransactionRequest| async move {
                    let t = self.describe_transaction(&r.transactional_id).await?;
                    Ok::<_, TxnOpError>(DescribeTransactionResponse { transaction: self.transaction_info(&t) })
                })
                .await
            }
            ApiKey::AbortTransaction => {
                self.run(body, |r: AbortTransactionRequest| async move {
                    let t = self.abort_transaction(&r.transactional_id).await?;
                    Ok::<_, TxnOpError>(AbortTransactionResponse { transaction: self.transaction_info(&t) })
                })
                .await
            }
            ApiKey::GroupHeartbeat => self.run(body, |r| self.wire_group_heartbeat(r)).await,
            ApiKey::OffsetCommit => {
                self.run(body, |r: OffsetCommitRequest| async move {
                    let offsets = to_commit(r.offsets);
                    self.commit_offsets(&r.group, &r.member_id, r.member_epoch, None, offsets).await?;
                    Ok::<_, GroupOpError>(OffsetCommitResponse {})
                })
                .await
            }
            ApiKey::OffsetFetch => {
                self.run(body, |r: OffsetFetchRequest| async move {
                    let wanted = r.partitions.map(|ps| from_wire_partitions(ps).collect());
                    let offsets = self.fetch_offsets(&r.group, wanted).await?;
                    Ok::<_, GroupOpError>(OffsetFetchResponse {
                        offsets: offsets.into_iter().map(committed_offset).collect(),
                    })
                })
                .await
            }
            ApiKey::ListGroups => {
                self.run(body, |_: ListGroupsRequest| async {
                    let groups = self.list_groups().await.into_iter().map(|g| GroupListing {
                        group: g.name,
                        kind: g.kind.to_owned(),
                        state: g.state.to_owned(),
                        members: g.members as u32,
                    });
                    Ok::<_, WireError>(ListGroupsResponse { groups: groups.collect() })
                })
                .await
            }
            ApiKey::DescribeGroup => {
                self.run(body, |r: DescribeGroupRequest| async move {
                    let g = self.describe_group(&r.group).await?;
                    Ok::<_, GroupOpError>(self.group_description(&g))
                })
                .await
            }
            ApiKey::DeleteGroup => {
                self.run(body, |r: DeleteGroupRequest| async move {
                    self.delete_group(&r.group).await?;
                    Ok::<_, GroupOpError>(DeleteGroupResponse {})
                })
                .await
            }
            ApiKey::ShareFetch => self.run(body, |r| self.wire_share_fetch(r)).await,
            ApiKey::AlterGroupConfig => {
                self.run(body, |r: AlterGroupConfigRequest| async move {
                    let configs = self.alter_group_config(&r.group, r.configs).await?;
                    Ok::<_, GroupOpError>(AlterGroupConfigResponse { configs })
                })
                .await
            }
            ApiKey::PluginLogs => {
                self.run(body, |r: PluginLogsRequest| async move {
                    Ok::<_, PluginAdminError>(PluginLogsResponse { lines: self.plugin_logs(&r.name, r.since)? })
                })
                .await
            }
        }
    }

    /// Decodes the request, runs `f`, encodes its answer; an operation's
    /// error becomes a wire error here.
    async fn run<Req, Resp, E, F, Fut>(&self, body: Bytes, f: F) -> Result<Vec<Bytes>, WireError>
    where
        Req: Wire,
        Resp: Wire,
        E: Into<WireError>,
        F: FnOnce(Req) -> Fut,
        Fut: Future<Output = Result<Resp, E>>,
    {
        let request = decode_exact::<Req>(body).map_err(corrupt)?;
        Ok(encode_response(&f(request).await.map_err(Into::into)?))
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

    async fn produce(
        self: &Arc<Self>,
        r: ProduceRequest,
        turn: Option<AppendTurn>,
    ) -> Result<ProduceResponse, WireError> {
        let acks = match r.acks {
            Acks::All => api::Acks::All,
            Acks::None | Acks::Leader => api::Acks::Leader,
        };
        // Every partition refused, in the answer's per-partition form, so
        // that producers take it as final.
        if let Some(Err(refused)) = r.partitions.iter().map(|p| refuse_internal(&p.topic)).find(Result::is_err) {
            let partitions = r
                .partitions
                .into_iter()
                .map(|p| ProducePartitionResult {
                    topic: p.topic,
                    partition: p.partition,
                    error: refused.code,
                    message: refused.message.clone(),
                    base_offset: -1,
                    log_start_offset: -1,
                    placements: Vec::new(),
                })
                .collect();
            return Ok(ProduceResponse { partitions });
        }
        let asked: Vec<(String, u32)> = r.partitions.iter().map(|p| (p.topic.clone(), p.partition)).collect();
        let writes = r
            .partitions
            .into_iter()
            .map(|p| Write {
                topic: p.topic,
                partition: p.partition,
                records: p.records,
                transactional_id: r.transactional_id.clone(),
            })
            .collect();
        let results = self.write(writes, acks, turn).await?;
        let partitions = asked
            .into_iter()
            .zip(results)
            .map(|((topic, partition), result)| {
                let mut answer = ProducePartitionResult {
                    topic,
                    partition,
                    error: ErrorCode::None,
                    message: String::new(),
                    base_offset: -1,
                    log_start_offset: -1,
                    placements: Vec::new(),
                };
                match result {
                    Ok(written) => {
                        answer.base_offset = written.base_offset;
                        answer.log_start_offset = written.log_start_offset;
                        answer.placements = written
                            .placements
                            .into_iter()
                            .map(|(partition, offset)| RecordPlacement { partition, offset })
                            .collect();
                    }
                    Err(e) => (answer.error, answer.message) = (code_of_produce(&e), e.to_string()),
                }
                answer
            })
            .collect();
        Ok(ProduceResponse { partitions })
    }

    async fn fetch(self: &Arc<Self>, r: FetchRequest) -> Result<FetchResponse, WireError> {
        let asked: Vec<(String, u32)> = r.partitions.iter().map(|p| (p.topic.clone(), p.partition)).collect();
        let reads = r
            .partitions
            .into_iter()
            .map(|p| Read { topic: p.topic, partition: p.partition, offset: p.offset, max_bytes: p.max_bytes })
            .collect();
        let options = ReadOptions {
            max_wait: Duration::from_millis(u64::from(r.max_wait_ms)),
            min_bytes: r.min_bytes,
            max_bytes: r.max_bytes,
            filter: (!r.filter.is_empty()).then_some((r.filter, r.filter_params)),
            decode_values: r.decode_values,
            read_committed: r.isolation == Isolation::ReadCommitted,
        };
        let results = self.read(reads, options).await?;
        let partitions = asked
            .into_iter()
            .zip(results)
            .map(|((topic, partition), read)| {
                let (error, message, records) = match read.records {
                    Ok(records) => (ErrorCode::None, String::new(), records),
                    Err(e) => (code_of_fetch(&e), e.to_string(), Bytes::new()),
                };
                FetchPartitionResult {
                    topic,
                    partition,
                    error,
                    message,
                    high_watermark: read.high_watermark,
                    log_start_offset: read.log_start_offset,
                    last_stable_offset: read.last_stable_offset,
                    aborted: read
                        .aborted
                        .into_iter()
                        .map(|(producer_id, first_offset)| AbortedTransaction { producer_id, first_offset })
                        .collect(),
                    records,
                }
            })
            .collect();
        Ok(FetchResponse { partitions })
    }

    async fn wire_group_heartbeat(
        self: &Arc<Self>,
        r: GroupHeartbeatRequest,
    ) -> Result<GroupHeartbeatResponse, GroupOpError> {
        let hb = Heartbeat {
            member_id: r.member_id,
            instance_id: (!r.instance_id.is_empty()).then_some(r.instance_id),
            member_epoch: r.member_epoch,
            subscription: r
                .subscription
                .map(|s| Subscription::new(s.topics, (!s.pattern.is_empty()).then_some(s.pattern.as_str()))),
            owned: r.owned.map(|owned| {
                let mut a = Assignment::new();
                for (topic, partition) in from_wire_partitions(owned) {
                    a.entry(topic).or_default().insert(partition);
                }
                a
            }),
        };
        let answer = self.group_heartbeat(&r.group, hb).await?;
        Ok(GroupHeartbeatResponse {
            member_id: answer.member_id,
            member_epoch: answer.member_epoch,
            heartbeat_interval_ms: answer.heartbeat_interval_ms.min(u64::from(u32::MAX)) as u32,
            assignment: to_wire_partitions(&answer.assignment),
        })
    }

    async fn wire_share_fetch(self: &Arc<Self>, r: ShareFetchRequest) -> Result<ShareFetchResponse, GroupOpError> {
        let acks = r
            .acknowledgements
            .into_iter()
            .map(|a| {
                let ack = match a.kind {
                    SHARE_ACCEPT => Ack::Accept,
                    SHARE_RELEASE => Ack::Release,
                    SHARE_REJECT => Ack::Reject,
                    other => return Err(GroupOpError::Invalid(format!("unknown acknowledgement kind {other}"))),
                };
                if a.first_offset < 0 || a.last_offset < a.first_offset {
                    return Err(GroupOpError::Invalid(format!(
                        "{}-{}: acknowledged range {}..={} is not valid",
                        a.topic, a.partition, a.first_offset, a.last_offset
                    )));
                }
                Ok(ShareAck { topic: a.topic, partition: a.partition, first: a.first_offset, last: a.last_offset, ack })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let fetch = ShareFetch {
            member_id: r.member_id,
            topics: r.topics,
            acks,
            max_records: r.max_records,
            max_wait: Duration::from_millis(u64::from(r.max_wait_ms)),
            max_bytes: r.max_bytes,
            leave: r.leave,
        };
        let fetched = self.share_fetch(&r.group, fetch).await?;
        let partitions = fetched
            .reads
            .into_iter()
            .map(|read| {
                let (error, message, records) = match read.records {
                    Ok(records) => (ErrorCode::None, String::new(), records),
                    Err(e) => (code_of_fetch(&e), e.to_string(), Bytes::new()),
                };
                ShareFetchPartition {
                    topic: read.topic,
                    partition: read.partition,
                    error,
                    message,
                    records,
                    acquired: acquired_ranges(&read.acquired),
                }
            })
            .collect();
        let acknowledgement_errors = fetched
            .ack_errors
            .into_iter()
            .map(|((topic, partition), e)| {
                let ShareError::NotHeld { offset, .. } = &e;
                ShareAcknowledgementError {
                    topic,
                    partition,
                    offset: *offset,
                    error: ErrorCode::InvalidRecordState,
                    message: e.to_string(),
                }
            })
            .collect();
        Ok(ShareFetchResponse {
            member_id: fetched.member_id,
            heartbeat_interval_ms: fetched.heartbeat_interval_ms.min(u64::from(u32::MAX)) as u32,
            partitions,
            acknowledgement_errors,
        })
    }

    fn transaction_info(&self, t: &quiver_transactions::Transaction) -> TransactionInfo {
        TransactionInfo {
            transactional_id: t.transactional_id.clone(),
            state: t.state.name().to_owned(),
            producer_id: t.producer_id,
            producer_epoch: t.producer_epoch,
            timeout_ms: t.timeout_ms,
            partitions: t
                .partitions
                .iter()
                .map(|(topic, partition)| PartitionRef { topic: topic.clone(), partition: *partition })
                .collect(),
            groups: t.groups.iter().cloned().collect(),
            started_ms: t.started_ms,
            updated_ms: t.updated_ms,
            coordinator: self.config.node_id,
        }
    }

    fn group_description(&self, g: &Group) -> DescribeGroupResponse {
        let members = g
            .members()
            .map(|m| GroupMemberDescription {
                member_id: m.id.clone(),
                instance_id: m.instance_id.clone().unwrap_or_default(),
                member_epoch: m.epoch,
                state: match (m.away, m.state) {
                    (true, _) => "away",
                    (false, MemberState::Stable) => "stable",
                    (false, MemberState::Revoking) => "revoking",
                    (false, MemberState::Awaiting) => "awaiting",
                }
                .to_owned(),
                subscription: GroupSubscription {
                    topics: m.subscription.names().iter().cloned().collect(),
                    pattern: m.subscription.regex().unwrap_or_default().to_owned(),
                },
                assignment: to_wire_partitions(&m.assigned),
                revoking: to_wire_partitions(&m.revoking),
                target: g.target(&m.id).map(to_wire_partitions).unwrap_or_default(),
            })
            .collect();
        let share = g.share();
        DescribeGroupResponse {
            group: g.name().to_owned(),
            kind: group_kind(g).to_owned(),
            share_members: share
                .into_iter()
                .flat_map(|s| s.members())
                .map(|m| ShareMemberDescription { member_id: m.id.clone(), topics: m.topics.clone() })
                .collect(),
            share_partitions: share
                .into_iter()
                .flat_map(|s| s.partitions())
                .map(|((topic, partition), p)| SharePartitionDescription {
                    topic: topic.clone(),
                    partition: *partition,
                    start_offset: p.start(),
                    end_offset: p.end(),
                    acquired: p.in_flight() as u32,
                    dead_letters: p.dead_letters().len() as u32,
                })
                .collect(),
            state: group_state(g).to_owned(),
            group_epoch: g.epoch(),
            assignor: g.config().assignor.name().to_owned(),
            coordinator: self.config.node_id,
            configs: group_configs(g),
            overridden: overridden(g),
            members,
            offsets: g.offsets().iter().map(|(tp, c)| committed_offset((tp.clone(), c.clone()))).collect(),
        }
    }

    async fn list_offsets(self: &Arc<Self>, r: ListOffsetsRequest) -> Result<ListOffsetsResponse, WireError> {
        let queries: Vec<OffsetQuery> = r
            .partitions
            .into_iter()
            .map(|p| OffsetQuery { topic: p.topic, partition: p.partition, timestamp: p.timestamp })
            .collect();
        let found = self.find_offsets(queries.clone()).await;
        let partitions = queries
            .into_iter()
            .zip(found)
            .map(|(q, found)| {
                let (error, message, offset, timestamp) = match found {
                    Ok((offset, ts)) => (ErrorCode::None, String::new(), offset, ts),
                    Err(e) => (code_of_list_offsets(&e), e.to_string(), -1, -1),
                };
                ListOffsetsPartitionResult { topic: q.topic, partition: q.partition, error, message, offset, timestamp }
            })
            .collect();
        Ok(ListOffsetsResponse { partitions })
    }
}

/// Offsets to commit, from the wire.
fn to_commit(offsets: Vec<CommittedOffset>) -> Vec<OffsetToCommit> {
    offsets
        .into_iter()
        .map(|o| OffsetToCommit { topic: o.topic, partition: o.partition, offset: o.offset, metadata: o.metadata })
        .collect()
}

fn from_wire_partitions(list: Vec<TopicPartitions>) -> impl Iterator<Item = (String, u32)> {
    list.into_iter().flat_map(|tp| tp.partitions.into_iter().map(move |p| (tp.topic.clone(), p)))
}

fn to_wire_partitions(a: &Assignment) -> Vec<TopicPartitions> {
    a.iter()
        .map(|(topic, ps)| TopicPartitions { topic: topic.clone(), partitions: ps.iter().copied().collect() })
        .collect()
}

fn committed_offset(((topic, partition), c): ((String, u32), Committed)) -> CommittedOffset {
    CommittedOffset { topic, partition, offset: c.offset, metadata: c.metadata, committed_at_ms: c.at_ms }
}

/// Clients read the offsets topic but never create, delete or write it:
/// only coordinators do.
fn refuse_internal(topic: &str) -> Result<(), WireError> {
    let owner = match topic {
        OFFSETS_TOPIC => "group coordinators",
        TRANSACTION_STATE_TOPIC => "transaction coordinators",
        _ => return Ok(()),
    };
    Err(WireError::new(
        ErrorCode::InvalidRequest,
        format!("'{topic}' is an internal topic: only {owner} create and write it"),
    ))
}

/// A request frame that does not decode.
fn corrupt(e: impl std::fmt::Display) -> WireError {
    WireError::new(ErrorCode::CorruptMessage, e.to_string())
}

fn wire_error(code: ErrorCode, e: impl std::fmt::Display) -> WireError {
    WireError::new(code, e.to_string())
}

fn code_of_partition(e: &PartitionError) -> ErrorCode {
    match e {
        PartitionError::UnknownTopic { .. } => ErrorCode::UnknownTopic,
        PartitionError::UnknownPartition { .. } => ErrorCode::UnknownPartition,
        PartitionError::LedElsewhere { .. }
        | PartitionError::Offline { .. }
        | PartitionError::Opening { .. }
        | PartitionError::OpeningTopic { .. }
        | PartitionError::Becoming { .. }
        | PartitionError::NotHeld { .. }
        | PartitionError::ChangingLeader { .. } => ErrorCode::NotLeader,
    }
}

fn code_of_plugin_call(e: &PluginCallError) -> ErrorCode {
    match e {
        PluginCallError::NotDeployed { .. } => ErrorCode::UnknownPlugin,
        PluginCallError::WrongKind(_) => ErrorCode::InvalidPlugin,
        PluginCallError::Failed { .. } | PluginCallError::Stopped { .. } => ErrorCode::PluginFailed,
        PluginCallError::Rejected { .. } => ErrorCode::RecordRejected,
        PluginCallError::Corrupt(_) => ErrorCode::CorruptMessage,
        PluginCallError::Internal(_) => ErrorCode::Internal,
    }
}

pub(crate) fn code_of_produce(e: &ProduceError) -> ErrorCode {
    match e {
        ProduceError::Partition(e) => code_of_partition(e),
        ProduceError::ShuttingDown => ErrorCode::BrokerShuttingDown,
        ProduceError::InvalidBatch(quiver_protocol::batch::BatchError::MissingKey { .. }) => ErrorCode::InvalidRecord,
        ProduceError::InvalidBatch(_) => ErrorCode::CorruptMessage,
        ProduceError::RecordTooLarge { .. } => ErrorCode::RecordTooLarge,
        ProduceError::UnplacedIdempotent => ErrorCode::InvalidRequest,
        ProduceError::Plugin(e) => code_of_plugin_call(e),
        ProduceError::Sequence { source, .. } => match source {
            SequenceError::OutOfOrder { .. } => ErrorCode::OutOfOrderSequence,
            SequenceError::Fenced { .. } => ErrorCode::ProducerFenced,
            SequenceError::Stale { .. } => ErrorCode::StaleSequence,
        },
        ProduceError::NotEnoughReplicas { .. } => ErrorCode::NotEnoughReplicas,
        ProduceError::Append(AppendError::Invalid(_)) => ErrorCode::CorruptMessage,
        ProduceError::Append(_) | ProduceError::Sync(_) => ErrorCode::StorageError,
        ProduceError::LeadershipMoved | ProduceError::NotConfirmed(_) | ProduceError::ForwardUnknown { .. } => {
            ErrorCode::NotReplicated
        }
        ProduceError::AfterOtherShares(e) => match code_of_produce(e) {
            code if code.is_retriable() => ErrorCode::NotReplicated,
            code => code,
        },
        ProduceError::Forward(e) => e.code,
        ProduceError::AtLeader { error, .. } => error.code,
        ProduceError::Internal(_) => ErrorCode::Internal,
        ProduceError::TransactionalMismatch(_) => ErrorCode::InvalidRequest,
        // A partition leader that cannot reach the coordinator: the
        // producer retries its write.
        ProduceError::Transaction { source, .. } => match code_of_txn(source) {
            ErrorCode::CoordinatorLoading => ErrorCode::NotCoordinator,
            code => code,
        },
    }
}

fn code_of_txn(e: &TxnOpError) -> ErrorCode {
    use quiver_transactions::TxnError;
    match e {
        TxnOpError::NotCoordinator { .. } => ErrorCode::NotCoordinator,
        TxnOpError::Loading { .. } => ErrorCode::CoordinatorLoading,
        TxnOpError::Txn { source, .. } => match source {
            TxnError::ProducerFenced { .. } => ErrorCode::ProducerFenced,
            TxnError::Unknown(_) => ErrorCode::UnknownTransactionalId,
            TxnError::WrongProducer { .. } => ErrorCode::InvalidProducerIdMapping,
            TxnError::Concurrent(_) => ErrorCode::ConcurrentTransactions,
            TxnError::InvalidState { .. } => ErrorCode::InvalidTxnState,
            TxnError::InvalidTimeout { .. } => ErrorCode::InvalidTransactionTimeout,
        },
        TxnOpError::Invalid(_) => ErrorCode::InvalidRequest,
        // The coordinator reloads from the log: the producer asks again.
        TxnOpError::Store { source, .. } => match code_of_produce(source) {
            ErrorCode::NotLeader | ErrorCode::NotReplicated | ErrorCode::BrokerShuttingDown => {
                ErrorCode::NotCoordinator
            }
            code => code,
        },
        TxnOpError::StateTopic(e) | TxnOpError::ProducerIds { source: e, .. } => code_of_admin(e),
        TxnOpError::MarkersPending { .. } => ErrorCode::ConcurrentTransactions,
        TxnOpError::AtCoordinator { error, .. } => error.code,
        TxnOpError::Marker(e) => code_of_produce(e),
    }
}

fn code_of_metadata(e: &MetadataError) -> ErrorCode {
    match e {
        MetadataError::Refused(r) => match r.kind {
            RefusalKind::TopicExists => ErrorCode::TopicAlreadyExists,
            RefusalKind::UnknownTopic => ErrorCode::UnknownTopic,
            RefusalKind::UnknownPartition => ErrorCode::UnknownPartition,
            RefusalKind::NotEnoughBrokers => ErrorCode::NotEnoughReplicas,
            RefusalKind::UnknownPlugin => ErrorCode::UnknownPlugin,
            RefusalKind::Stale | RefusalKind::UnknownBroker | RefusalKind::Invalid => ErrorCode::InvalidRequest,
        },
        MetadataError::Unavailable(_) => ErrorCode::NoQuorum,
        MetadataError::Unknown(_) => ErrorCode::RequestTimedOut,
        MetadataError::Unexpected(_) => ErrorCode::Internal,
    }
}

fn code_of_admin(e: &AdminError) -> ErrorCode {
    match e {
        AdminError::InvalidTopicName(_) => ErrorCode::InvalidTopicName,
        AdminError::InvalidPartitions(_) => ErrorCode::InvalidPartitions,
        AdminError::InvalidConfig(_) => ErrorCode::InvalidConfig,
        AdminError::TopicExists(_) => ErrorCode::TopicAlreadyExists,
        AdminError::UnknownTopic(_) => ErrorCode::UnknownTopic,
        AdminError::Metadata(e) => code_of_metadata(e),
        AdminError::Storage(_) => ErrorCode::StorageError,
        AdminError::BadControllerMessage(_) => ErrorCode::CorruptMessage,
    }
}

fn code_of_plugin_admin(e: &PluginAdminError) -> ErrorCode {
    match e {
        PluginAdminError::Invalid(_) => ErrorCode::InvalidPlugin,
        PluginAdminError::NotDeployed { .. } => ErrorCode::UnknownPlugin,
        PluginAdminError::UnknownTopic(_) => ErrorCode::UnknownTopic,
        PluginAdminError::Metadata(e) => code_of_metadata(e),
        PluginAdminError::NotApplied(_) => ErrorCode::RequestTimedOut,
        PluginAdminError::Storage(_) => ErrorCode::StorageError,
        PluginAdminError::Internal(_) => ErrorCode::Internal,
    }
}

/// The code a follower's fetch answer carries (the leader serving it maps
/// its partitions' failures with this).
pub(crate) fn code_of_replica(e: &ReplicaError) -> ErrorCode {
    match e {
        ReplicaError::Partition(e) => code_of_partition(e),
        ReplicaError::NotLeading { .. } | ReplicaError::LeaderMoved { .. } | ReplicaError::RoleChanged => {
            ErrorCode::NotLeader
        }
        ReplicaError::EpochMismatch { theirs, mine, .. } if theirs < mine => ErrorCode::FencedLeaderEpoch,
        ReplicaError::EpochMismatch { .. } => ErrorCode::NotLeader,
        ReplicaError::PastLogEnd { .. } | ReplicaError::OutOfPlace { .. } => ErrorCode::OffsetOutOfRange,
        ReplicaError::Read(e) => code_of_read(e),
        ReplicaError::ShuttingDown => ErrorCode::BrokerShuttingDown,
        ReplicaError::Leader(e) => e.code,
        ReplicaError::EmptyAnswer | ReplicaError::CorruptCopy(_) => ErrorCode::CorruptMessage,
        ReplicaError::Storage(_) | ReplicaError::Append(_) => ErrorCode::StorageError,
        ReplicaError::Internal(_) => ErrorCode::Internal,
    }
}

fn code_of_read(e: &ReadError) -> ErrorCode {
    match e {
        ReadError::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
        ReadError::Corrupt { .. } => {
            tracing::error!(error = %e, "corrupt batch on disk; not served");
            ErrorCode::CorruptStoredBatch
        }
        ReadError::Io(_) => ErrorCode::StorageError,
    }
}

fn code_of_fetch(e: &FetchError) -> ErrorCode {
    match e {
        FetchError::Partition(e) => code_of_partition(e),
        FetchError::Read(e) => code_of_read(e),
        FetchError::Plugin(e) => code_of_plugin_call(e),
        FetchError::AtLeader { error, .. } => error.code,
        FetchError::Internal(_) => ErrorCode::Internal,
    }
}

fn code_of_list_offsets(e: &ListOffsetsError) -> ErrorCode {
    match e {
        ListOffsetsError::Partition(e) => code_of_partition(e),
        ListOffsetsError::NotAvailable { .. } => ErrorCode::OffsetNotAvailable,
        ListOffsetsError::InvalidTimestamp(_) => ErrorCode::InvalidRequest,
        ListOffsetsError::Read(e) => code_of_read(e),
        ListOffsetsError::Internal(_) => ErrorCode::Internal,
    }
}

fn code_of_group(e: &GroupOpError) -> ErrorCode {
    use quiver_groups::{CommitError, GroupError};
    match e {
        GroupOpError::NotCoordinator { .. } => ErrorCode::NotCoordinator,
        GroupOpError::Loading { .. } => ErrorCode::CoordinatorLoading,
        GroupOpError::UnknownGroup(_) => ErrorCode::UnknownGroup,
        GroupOpError::NotEmpty { .. } => ErrorCode::GroupNotEmpty,
        GroupOpError::Invalid(_) => ErrorCode::InvalidRequest,
        GroupOpError::Partition(e) => code_of_partition(e),
        GroupOpError::Member { source, .. } | GroupOpError::Commit { source: CommitError::Member(source), .. } => {
            match source {
                GroupError::UnknownMember(_) => ErrorCode::UnknownMember,
                GroupError::FencedEpoch { .. } => ErrorCode::FencedMemberEpoch,
                GroupError::InstanceInUse(_) => ErrorCode::InstanceInUse,
                GroupError::Invalid(_) => ErrorCode::InvalidRequest,
            }
        }
        GroupOpError::Commit { source: CommitError::NotOwned { .. }, .. } => ErrorCode::PartitionNotOwned,
        GroupOpError::Commit { source: CommitError::GroupActive(_), .. } => ErrorCode::GroupNotEmpty,
        // The coordinator reloads from the log: the member asks again.
        GroupOpError::Store { source, .. } => match code_of_produce(source) {
            ErrorCode::NotLeader | ErrorCode::NotReplicated | ErrorCode::BrokerShuttingDown => {
                ErrorCode::NotCoordinator
            }
            code => code,
        },
        GroupOpError::OffsetsTopic(e) => code_of_admin(e),
        GroupOpError::Unstable { .. } => ErrorCode::UnstableOffsetCommit,
    }
}

/// The operations' errors as wire errors (for `run` and `?`): each with the code
/// its `code_of_*` chooses and its message.
macro_rules! as_wire_error {
    ($($error:ty => $code:ident),*) => {$(
        impl From<$error> for WireError {
            fn from(e: $error) -> Self {
                wire_error($code(&e), e)
            }
        }
    )*};
}
as_wire_error!(
    AdminError => code_of_admin,
    PluginAdminError => code_of_plugin_admin,
    ReplicaError => code_of_replica,
    ProduceError => code_of_produce,
    FetchError => code_of_fetch,
    GroupOpError => code_of_group,
    TxnOpError => code_of_txn
);

/// Acquired records as ranges of consecutive offsets with one delivery
/// count each.
fn acquired_ranges(acquired: &[Acquired]) -> Vec<AcquiredRecords> {
    let mut out: Vec<AcquiredRecords> = Vec::new();
    for a in acquired {
        match out.last_mut() {
            Some(r) if r.last_offset + 1 == a.offset && r.delivery_count == a.delivery_count => {
                r.last_offset = a.offset
            }
            _ => out.push(AcquiredRecords {
                first_offset: a.offset,
                last_offset: a.offset,
                delivery_count: a.delivery_count,
            }),
        }
    }
    out
}
