//! Consumer groups from the client's side: reaching a group's coordinator
//! (the leader of the group's partition of `__consumer_offsets`), and the
//! group administration calls ([`Admin::list_groups`], describe, delete,
//! offsets). A consumer's membership is `membership.rs`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use quiver_protocol::messages::*;
use quiver_protocol::{ErrorCode, WireError};

use crate::admin::Admin;
use crate::connection::{CallError, Client};

/// Pause before asking again after the coordinator moved or is loading.
const COORDINATOR_BACKOFF: Duration = Duration::from_millis(100);
/// How long a coordinator request may stay unanswered before the client
/// checks whether the coordinator's leadership moved (a killed broker).
const COORDINATOR_PATIENCE: Duration = Duration::from_millis(500);

/// One committed offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupOffset {
    pub topic: String,
    pub partition: u32,
    /// The next offset the group reads.
    pub offset: i64,
    pub metadata: String,
    pub committed_at_ms: i64,
}

impl From<CommittedOffset> for GroupOffset {
    fn from(c: CommittedOffset) -> Self {
        GroupOffset {
            topic: c.topic,
            partition: c.partition,
            offset: c.offset,
            metadata: c.metadata,
            committed_at_ms: c.committed_at_ms,
        }
    }
}

fn is_coordinator_moved(e: &CallError) -> bool {
    match e {
        CallError::Broker(e) => matches!(
            e.code,
            ErrorCode::NotCoordinator
                | ErrorCode::CoordinatorLoading
                | ErrorCode::NotLeader
                | ErrorCode::BrokerShuttingDown
                | ErrorCode::BrokerNotReady
                | ErrorCode::NoQuorum
                | ErrorCode::NotEnoughReplicas
                | ErrorCode::RequestTimedOut
                // An open transaction holds the offsets asked for.
                | ErrorCode::UnstableOffsetCommit
        ),
        CallError::Connect(_) | CallError::ConnectionLost(_) | CallError::Timeout(_) | CallError::LeaderMoved(_) => {
            true
        }
        CallError::ResponseTooLarge { .. } | CallError::Decode(_) => false,
    }
}

impl Client {
    /// Sends `request` to `group`'s coordinator, finding it first, and
    /// again (for up to the request timeout) while it moves, loads, or its
    /// broker is gone. Group requests are safe to repeat: a heartbeat
    /// answers with the member's state, a commit stores the same offsets.
    pub(crate) async fn group_call<R: Request>(&self, group: &str, request: &R) -> Result<R::Response, CallError> {
        self.coordinated_call(CoordinatorKind::Group, group, request).await
    }

    /// Sends `request` to the coordinator of `key` (a group, or a
    /// transactional id), as [`Client::group_call`] does.
    pub(crate) async fn coordinated_call<R: Request>(
        &self,
        kind: CoordinatorKind,
        key: &str,
        request: &R,
    ) -> Result<R::Response, CallError> {
        let deadline = Instant::now() + self.config().request_timeout;
        loop {
            match self.coordinator_call(kind, key, request).await {
                Err(e) if is_coordinator_moved(&e) && Instant::now() + COORDINATOR_BACKOFF < deadline => {
                    tracing::debug!(key, error = %e, "asking the coordinator again");
                    // A broker that did not answer: ask the cluster again
                    // (one that answered "not the coordinator" told us,
                    // and a moved leadership is in the cache already).
                    if matches!(e, CallError::Connect(_) | CallError::ConnectionLost(_) | CallError::Timeout(_)) {
                        self.forget_routes();
                    }
                    tokio::time::sleep(COORDINATOR_BACKOFF).await;
                }
                other => return other,
            }
        }
    }

    /// One attempt at `request` on the leader of the key's partition.
    async fn coordinator_call<R: Request>(
        &self,
        kind: CoordinatorKind,
        key: &str,
        request: &R,
    ) -> Result<R::Response, CallError> {
        let topic = coordinator_topic(kind);
        let partition = self.coordinator_partition(kind, key).await?;
        let route = self.for_partition(topic, partition).await?;
        let partitions = [(topic, partition)];
        let answer = self.unless_leadership_moves(partitions, COORDINATOR_PATIENCE, route.call(request)).await;
        if let Err(CallError::Broker(e)) = &answer
            && matches!(e.code, ErrorCode::NotCoordinator | ErrorCode::NotLeader)
        {
            // That broker is alive: learn the partition's leader from it
            // rather than from a bootstrap broker that may be gone.
            let metadata = MetadataRequest { topics: Some(vec![topic.to_owned()]) };
            if let Ok(found) = route.call(&metadata).await {
                self.remember(found);
            }
        }
        answer
    }

    /// The key's partition of its coordinators' topic: asked once (which
    /// creates the topic on the cluster's first request), then known.
    pub(crate) async fn coordinator_partition(&self, kind: CoordinatorKind, key: &str) -> Result<u32, CallError> {
        let cache_key = (kind as u8, key.to_owned());
        let known = self.routing().group_partitions.lock().expect("group partitions lock").get(&cache_key).copied();
        if let Some(p) = known {
            return Ok(p);
        }
        let group = key;
        let request = FindCoordinatorRequest { group: key.to_owned(), kind };
        let deadline = Instant::now() + self.config().request_timeout;
        let found = loop {
            // The first group request creates the offsets topic: a quorum
            // busy or changing leader then is worth waiting for.
            match self.bootstrap().call(&request).await {
                Err(e) if is_coordinator_moved(&e) && Instant::now() + COORDINATOR_BACKOFF < deadline => {
                    tracing::debug!(group, error = %e, "finding the group's coordinator again");
                    tokio::time::sleep(COORDINATOR_BACKOFF).await;
                }
                found => break found?,
            }
        };
        self.routing().group_partitions.lock().expect("group partitions lock").insert(cache_key, found.partition);
        Ok(found.partition)
    }
}

/// The internal topic whose partitions' leaders coordinate `kind`.
pub(crate) fn coordinator_topic(kind: CoordinatorKind) -> &'static str {
    match kind {
        CoordinatorKind::Group => OFFSETS_TOPIC,
        CoordinatorKind::Transaction => TRANSACTION_STATE_TOPIC,
    }
}

impl Admin {
    /// Every group of the cluster: each broker lists the groups it
    /// coordinates. Sorted by name.
    pub async fn list_groups(&self) -> Result<Vec<GroupListing>, CallError> {
        let client = self.client();
        let brokers = self.metadata(Some(Vec::new())).await?.brokers;
        let mut all = BTreeMap::new();
        let ask: Vec<Client> = match brokers.len() {
            0 | 1 => vec![client.bootstrap()],
            _ => brokers.iter().map(|b| client.peer(&b.address)).collect(),
        };
        for broker in ask {
            for g in broker.call(&ListGroupsRequest {}).await?.groups {
                all.insert(g.group.clone(), g);
            }
        }
        Ok(all.into_values().collect())
    }

    /// A group's members, their assignments and its committed offsets
    /// (`unknown_group` if it does not exist).
    pub async fn describe_group(&self, group: &str) -> Result<DescribeGroupResponse, CallError> {
        self.client().group_call(group, &DescribeGroupRequest { group: group.to_owned() }).await
    }

    /// Sets a group's own `session.timeout.ms` and `heartbeat.interval.ms`
    /// (an empty value: the broker's default again); returns its effective
    /// timings.
    pub async fn alter_group_config(
        &self,
        group: &str,
        configs: &[(String, String)],
    ) -> Result<Vec<(String, String)>, CallError> {
        let request = AlterGroupConfigRequest { group: group.to_owned(), configs: configs.to_vec() };
        Ok(self.client().group_call(group, &request).await?.configs)
    }

    /// Deletes a group and its offsets; refused while it has members.
    pub async fn delete_group(&self, group: &str) -> Result<(), CallError> {
        self.client().group_call(group, &DeleteGroupRequest { group: group.to_owned() }).await?;
        Ok(())
    }

    /// The committed offsets of a group (of `partitions`, or all).
    pub async fn group_offsets(
        &self,
        group: &str,
        partitions: Option<Vec<(String, u32)>>,
    ) -> Result<Vec<GroupOffset>, CallError> {
        let request = OffsetFetchRequest { group: group.to_owned(), partitions: partitions.map(to_wire) };
        let answer = self.client().group_call(group, &request).await?;
        Ok(answer.offsets.into_iter().map(GroupOffset::from).collect())
    }

    /// Sets a group's offsets by hand (all or none): only while the group
    /// has no members (`group_not_empty` otherwise).
    pub async fn set_group_offsets(&self, group: &str, offsets: Vec<(String, u32, i64)>) -> Result<(), CallError> {
        commit(self.client(), group, "", -1, offsets).await
    }
}

/// Commits `offsets` for `group` as `member_id` at `member_epoch`.
pub(crate) async fn commit(
    client: &Client,
    group: &str,
    member_id: &str,
    member_epoch: i32,
    offsets: Vec<(String, u32, i64)>,
) -> Result<(), CallError> {
    let request = OffsetCommitRequest {
        group: group.to_owned(),
        member_id: member_id.to_owned(),
        member_epoch,
        offsets: to_commit(offsets),
    };
    client.group_call(group, &request).await?;
    Ok(())
}

/// (topic, partition, next offset to read) as offsets to commit.
pub(crate) fn to_commit(offsets: impl IntoIterator<Item = (String, u32, i64)>) -> Vec<CommittedOffset> {
    offsets
        .into_iter()
        .map(|(topic, partition, offset)| CommittedOffset {
            topic,
            partition,
            offset,
            metadata: String::new(),
            committed_at_ms: 0,
        })
        .collect()
}

/// Partitions grouped by topic, as group requests carry them.
pub(crate) fn to_wire(partitions: impl IntoIterator<Item = (String, u32)>) -> Vec<TopicPartitions> {
    let mut by_topic: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for (topic, p) in partitions {
        by_topic.entry(topic).or_default().push(p);
    }
    by_topic.into_iter().map(|(topic, partitions)| TopicPartitions { topic, partitions }).collect()
}

/// The error a group call failed with, if the broker refused it.
pub(crate) fn broker_error(e: &CallError) -> Option<&WireError> {
    match e {
        CallError::Broker(e) => Some(e),
        _ => None,
    }
}
