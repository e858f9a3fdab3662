//! Consumer groups on three brokers in one process (`harness`): a member
//! keeps its identity, epoch, assignment and commits when its coordinator
//! is cut off and another broker takes the group's partition over; the
//! cut-off coordinator acknowledges nothing meanwhile (its writes cannot
//! reach the in-sync replicas), and once back it answers `not_coordinator`.

mod harness;

use std::time::Duration;

use harness::Cluster;
use quiver_protocol::messages::*;
use quiver_protocol::{ErrorCode, WireError};

const GROUP: &str = "payments";

fn heartbeat(member_id: &str, member_epoch: i32, owned: Vec<TopicPartitions>) -> GroupHeartbeatRequest {
    GroupHeartbeatRequest {
        group: GROUP.into(),
        member_id: member_id.into(),
        instance_id: String::new(),
        member_epoch,
        subscription: (member_epoch == 0)
            .then(|| GroupSubscription { topics: vec!["t".into()], pattern: String::new() }),
        owned: Some(owned),
    }
}

fn commit(member_id: &str, member_epoch: i32, partition: u32, offset: i64) -> OffsetCommitRequest {
    OffsetCommitRequest {
        group: GROUP.into(),
        member_id: member_id.into(),
        member_epoch,
        offsets: vec![CommittedOffset {
            topic: "t".into(),
            partition,
            offset,
            metadata: String::new(),
            committed_at_ms: 0,
        }],
    }
}

fn fetch_offsets() -> OffsetFetchRequest {
    OffsetFetchRequest { group: GROUP.into(), partitions: None }
}

/// The broker leading the group's partition in `via`'s image.
fn coordinator(cluster: &Cluster, via: u32, partition: u32) -> Option<u32> {
    cluster.leader(via, OFFSETS_TOPIC, partition).map(|(l, _)| l)
}

/// Sends `request` to the group's coordinator until it answers with
/// something other than "not here yet".
async fn at_coordinator<R: Request>(
    cluster: &Cluster,
    via: u32,
    partition: u32,
    request: &R,
) -> Result<R::Response, WireError> {
    for _ in 0..500 {
        let Some(node) = coordinator(cluster, via, partition) else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        match cluster.call(node, request).await {
            Err(e)
                if matches!(
                    e.code,
                    ErrorCode::NotCoordinator | ErrorCode::CoordinatorLoading | ErrorCode::NotLeader
                ) =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
    panic!("the group's coordinator never answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_coordinator_hands_the_group_over_with_its_members_and_commits() {
    let cluster = Cluster::start_with(3, |c| {
        c.offsets_topic_partitions = 3;
        c.group_defaults.session_timeout_ms = 60_000;
    })
    .await;
    let create = CreateTopicRequest { name: "t".into(), partitions: 4, replication_factor: 3, configs: vec![] };
    cluster.call(1, &create).await.unwrap();
    let found =
        cluster.call(1, &FindCoordinatorRequest { group: GROUP.into(), kind: CoordinatorKind::Group }).await.unwrap();
    let p = found.partition;
    cluster
        .wait_for("the offsets partition led with a full ISR", Duration::from_secs(30), |c| {
            coordinator(c, 1, p).is_some()
                && c.broker(1).controller().image().borrow().topics[OFFSETS_TOPIC].partitions[p as usize].isr.len() == 3
        })
        .await;

    // A member joins, takes every partition, commits.
    let joined = at_coordinator(&cluster, 1, p, &heartbeat("", 0, vec![])).await.unwrap();
    let all = vec![TopicPartitions { topic: "t".into(), partitions: vec![0, 1, 2, 3] }];
    assert_eq!(joined.assignment, all);
    let (id, epoch) = (joined.member_id.clone(), joined.member_epoch);
    at_coordinator(&cluster, 1, p, &commit(&id, epoch, 2, 41)).await.unwrap();
    let old = coordinator(&cluster, 1, p).unwrap();

    // The coordinator is cut off: a commit it receives is never
    // acknowledged, and another broker takes the partition over.
    cluster.cut(old, true);
    let lost = cluster.call(old, &commit(&id, epoch, 2, 99)).await.unwrap_err();
    assert_eq!(lost.code, ErrorCode::NotCoordinator, "{lost}");
    let other = (1..=3).find(|n| *n != old).unwrap();
    cluster
        .wait_for("a new coordinator", Duration::from_secs(30), |c| coordinator(c, other, p).is_some_and(|n| n != old))
        .await;

    // The member goes on at the new coordinator as it was: same id, same
    // epoch, same partitions, its acknowledged commit and nothing else.
    let again = at_coordinator(&cluster, other, p, &heartbeat(&id, epoch, all.clone())).await.unwrap();
    assert_eq!((again.member_id.as_str(), again.member_epoch, &again.assignment), (id.as_str(), epoch, &all));
    let offsets = at_coordinator(&cluster, other, p, &fetch_offsets()).await.unwrap().offsets;
    assert_eq!(offsets.iter().map(|o| (o.partition, o.offset)).collect::<Vec<_>>(), vec![(2, 41)]);
    at_coordinator(&cluster, other, p, &commit(&id, epoch, 2, 50)).await.unwrap();

    // Back, the old coordinator follows: it does not answer for the group.
    cluster.cut(old, false);
    cluster
        .wait_for("the old coordinator to follow", Duration::from_secs(30), |c| {
            coordinator(c, old, p).is_some_and(|n| n != old)
        })
        .await;
    let refused = cluster.call(old, &fetch_offsets()).await.unwrap_err();
    assert_eq!(refused.code, ErrorCode::NotCoordinator, "{refused}");
    let offsets = at_coordinator(&cluster, old, p, &fetch_offsets()).await.unwrap().offsets;
    assert_eq!(offsets.iter().map(|o| (o.partition, o.offset)).collect::<Vec<_>>(), vec![(2, 50)]);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_group_requests_on_every_broker_at_once_all_find_their_coordinator() {
    let cluster = Cluster::start_with(3, |c| c.offsets_topic_partitions = 3).await;
    // Each broker creates the offsets topic; two are refused (it exists)
    // before their own image has it.
    let requests: Vec<FindCoordinatorRequest> =
        (1..=3).map(|n| FindCoordinatorRequest { group: format!("g{n}"), kind: CoordinatorKind::Group }).collect();
    let (a, b, c) =
        tokio::join!(cluster.call(1, &requests[0]), cluster.call(2, &requests[1]), cluster.call(3, &requests[2]));
    for answer in [a, b, c] {
        let found = answer.unwrap();
        assert!(found.partition < 3);
    }
    cluster.stop().await;
}
