//! Transactions on three brokers in one process (`harness`): a
//! transactional producer's records in partitions led by different brokers
//! become visible to read_committed readers together at the commit, never
//! after an abort; a new instance fences the old one (its writes and its
//! commit are refused, its open transaction aborted); an abandoned
//! transaction is aborted at its timeout and the last stable offset moves;
//! a coordinator cut off in the middle of ending a transaction hands it
//! over, and the new coordinator finishes it.

mod harness;

use std::time::Duration;

use bytes::Bytes;
use harness::Cluster;
use quiver_protocol::batch::{BatchBuilder, Batches, Compression, decode_records};
use quiver_protocol::control::ReadCommitted;
use quiver_protocol::messages::*;
use quiver_protocol::{ErrorCode, WireError};

const TOPIC: &str = "t";
const PARTITIONS: u32 = 3;

async fn start() -> Cluster {
    let cluster = Cluster::start_with(3, |c| {
        c.transactions.state_topic_partitions = 3;
    })
    .await;
    let create =
        CreateTopicRequest { name: TOPIC.into(), partitions: PARTITIONS, replication_factor: 3, configs: vec![] };
    cluster.call(1, &create).await.unwrap();
    cluster
        .wait_for("every partition led", Duration::from_secs(30), |c| {
            (0..PARTITIONS).all(|p| c.leader(1, TOPIC, p).is_some())
        })
        .await;
    cluster
}

/// The coordinator's partition of `id`, once the state topic exists and
/// that partition is led with a full ISR.
async fn coordinator_partition(cluster: &Cluster, id: &str) -> u32 {
    let find = FindCoordinatorRequest { group: id.into(), kind: CoordinatorKind::Transaction };
    let found = retry(|| cluster.call(1, &find)).await.unwrap();
    let p = found.partition;
    cluster
        .wait_for("the state partition led with a full ISR", Duration::from_secs(30), |c| {
            c.leader(1, TRANSACTION_STATE_TOPIC, p).is_some()
                && c.broker(1).controller().image().borrow().topics[TRANSACTION_STATE_TOPIC].partitions[p as usize]
                    .isr
                    .len()
                    == 3
        })
        .await;
    p
}

/// Retries `call` while the answer is "not here yet" (coordinator moving or
/// loading, a transaction ending, a leader changing).
async fn retry<T, F: std::future::Future<Output = Result<T, WireError>>>(
    mut call: impl FnMut() -> F,
) -> Result<T, WireError> {
    for _ in 0..500 {
        match call().await {
            Err(e)
                if matches!(
                    e.code,
                    ErrorCode::NotCoordinator
                        | ErrorCode::CoordinatorLoading
                        | ErrorCode::NotLeader
                        | ErrorCode::ConcurrentTransactions
                        | ErrorCode::BrokerNotReady
                ) =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            other => return other,
        }
    }
    panic!("never answered");
}

/// Sends `request` to the leader of `topic`-`partition` (as `via` sees it).
async fn at_leader<R: Request>(
    cluster: &Cluster,
    topic: &str,
    partition: u32,
    request: &R,
) -> Result<R::Response, WireError> {
    retry(|| async {
        let Some((node, _)) = cluster.leader(1, topic, partition).or_else(|| cluster.leader(2, topic, partition))
        else {
            return Err(WireError::new(ErrorCode::NotLeader, "no leader yet"));
        };
        cluster.call(node, request).await
    })
    .await
}

async fn init(cluster: &Cluster, id: &str, timeout_ms: u32) -> Result<(i64, i16), WireError> {
    let p = coordinator_partition(cluster, id).await;
    let request = InitProducerIdRequest { transactional_id: Some(id.into()), transaction_timeout_ms: timeout_ms };
    at_leader(cluster, TRANSACTION_STATE_TOPIC, p, &request).await.map(|r| (r.producer_id, r.producer_epoch))
}

async fn end(
    cluster: &Cluster,
    id: &str,
    (producer_id, producer_epoch): (i64, i16),
    commit: bool,
) -> Result<(i64, i16), WireError> {
    let p = coordinator_partition(cluster, id).await;
    let request = EndTxnRequest { transactional_id: id.into(), producer_id, producer_epoch, commit };
    at_leader(cluster, TRANSACTION_STATE_TOPIC, p, &request).await.map(|r| (r.producer_id, r.producer_epoch))
}

/// Waits until `id`'s last end is complete: `EndTxn` is answered once the
/// decision is stored, the markers follow.
async fn settled(cluster: &Cluster, id: &str) -> String {
    let p = coordinator_partition(cluster, id).await;
    let request = DescribeTransactionRequest { transactional_id: id.into() };
    for _ in 0..400 {
        let state = at_leader(cluster, TRANSACTION_STATE_TOPIC, p, &request).await.unwrap().transaction.state;
        if !state.starts_with("prepare") {
            return state;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("'{id}' never completed");
}

/// Writes `values` to `partition` in the producer's transaction (sequence
/// `sequence`), at the partition's leader: the partition's error, if any.
async fn write(
    cluster: &Cluster,
    id: &str,
    (producer_id, epoch): (i64, i16),
    partition: u32,
    sequence: i32,
    values: &[&str],
) -> Result<i64, WireError> {
    let mut b = BatchBuilder::new(Compression::None).with_producer(producer_id, epoch, sequence).transactional();
    for v in values {
        b.append(1_000, None, Some(v.as_bytes()), &[]);
    }
    let records = b.build();
    let request = ProduceRequest {
        transactional_id: Some(id.into()),
        acks: Acks::All,
        timeout_ms: 10_000,
        partitions: vec![ProducePartition { topic: TOPIC.into(), partition, records }],
    };
    let answer = at_leader(cluster, TOPIC, partition, &request).await?;
    let r = &answer.partitions[0];
    match r.error {
        ErrorCode::None => Ok(r.base_offset),
        code => Err(WireError::new(code, r.message.clone())),
    }
}

/// Every value a reader with `isolation` sees in `partition`, filtering as
/// the client does, and the partition's last stable offset.
async fn read(cluster: &Cluster, partition: u32, isolation: Isolation) -> (Vec<String>, i64) {
    let request = FetchRequest {
        max_wait_ms: 0,
        min_bytes: 0,
        max_bytes: 1 << 20,
        partitions: vec![FetchPartition { topic: TOPIC.into(), partition, offset: 0, max_bytes: 1 << 20 }],
        filter: String::new(),
        filter_params: Vec::new(),
        decode_values: false,
        isolation,
    };
    let answer = at_leader(cluster, TOPIC, partition, &request).await.unwrap();
    let p = &answer.partitions[0];
    assert_eq!(p.error, ErrorCode::None, "{}", p.message);
    let mut filter = ReadCommitted::new(p.aborted.iter().map(|a| (a.producer_id, a.first_offset)).collect());
    let mut values = Vec::new();
    for batch in Batches::new(p.records.clone()) {
        let (header, bytes) = batch.unwrap();
        let records = decode_records(&bytes).unwrap();
        let keep = filter.keep_batch(&header, &bytes);
        if header.is_control() || (isolation == Isolation::ReadCommitted && !keep) {
            continue;
        }
        values.extend(records.into_iter().map(|r| String::from_utf8(r.value.unwrap().to_vec()).unwrap()));
    }
    (values, p.last_stable_offset)
}

fn strings(values: &[&str]) -> Vec<String> {
    values.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_are_seen_whole_aborts_never_and_new_instances_fence_old_ones() {
    let cluster = start().await;
    let id = "payments-writer";
    let first = init(&cluster, id, 60_000).await.unwrap();
    assert_eq!(first.1, 0, "a new id starts at epoch 0");

    // A transaction over every partition (led by different brokers).
    for p in 0..PARTITIONS {
        write(&cluster, id, first, p, 0, &[&format!("c{p}a"), &format!("c{p}b")]).await.unwrap();
    }
    let (seen, lso) = read(&cluster, 0, Isolation::ReadCommitted).await;
    assert!(seen.is_empty(), "nothing before the commit: {seen:?}");
    assert_eq!(lso, 0, "the open transaction holds the last stable offset");
    assert_eq!(read(&cluster, 0, Isolation::ReadUncommitted).await.0, strings(&["c0a", "c0b"]));
    // A partition outside the transaction's producer cannot be written
    // with another producer id.
    assert_eq!(
        write(&cluster, id, (first.0 + 1_000_000, 0), 0, 0, &["intruder"]).await.unwrap_err().code,
        ErrorCode::InvalidProducerIdMapping
    );

    let second = end(&cluster, id, first, true).await.unwrap();
    assert_eq!(second, (first.0, 1), "the end bumps the epoch");
    assert_eq!(settled(&cluster, id).await, "complete-commit");
    for p in 0..PARTITIONS {
        let (seen, lso) = read(&cluster, p, Isolation::ReadCommitted).await;
        assert_eq!(seen, strings(&[&format!("c{p}a"), &format!("c{p}b")]));
        assert_eq!(lso, 3, "two records and the commit marker");
    }
    // A retried commit (its answer lost) is answered again, and changes
    // nothing.
    assert_eq!(end(&cluster, id, first, true).await.unwrap(), second);
    // A late write of the ended transaction's epoch is refused.
    assert_eq!(write(&cluster, id, first, 0, 2, &["late"]).await.unwrap_err().code, ErrorCode::ProducerFenced);

    // An aborted transaction is never seen by read_committed readers.
    write(&cluster, id, second, 1, 0, &["aborted"]).await.unwrap();
    let third = end(&cluster, id, second, false).await.unwrap();
    assert_eq!(third, (first.0, 2));
    settled(&cluster, id).await;
    assert_eq!(read(&cluster, 1, Isolation::ReadCommitted).await.0, strings(&["c1a", "c1b"]));
    assert_eq!(read(&cluster, 1, Isolation::ReadUncommitted).await.0, strings(&["c1a", "c1b", "aborted"]));

    // A new instance fences this one: its open transaction is aborted, its
    // writes and its commit are refused.
    write(&cluster, id, third, 2, 0, &["zombie"]).await.unwrap();
    let newer = init(&cluster, id, 60_000).await.unwrap();
    assert!(newer.1 > third.1, "{newer:?} after {third:?}");
    assert_eq!(write(&cluster, id, third, 2, 1, &["zombie-2"]).await.unwrap_err().code, ErrorCode::ProducerFenced);
    assert_eq!(end(&cluster, id, third, true).await.unwrap_err().code, ErrorCode::ProducerFenced);
    assert_eq!(read(&cluster, 2, Isolation::ReadCommitted).await.0, strings(&["c2a", "c2b"]));
    write(&cluster, id, newer, 2, 0, &["new"]).await.unwrap();
    let next = end(&cluster, id, newer, true).await.unwrap();
    // The next transaction's first write waits for the markers of this one:
    // in the log, the commit marker comes first.
    write(&cluster, id, next, 2, 0, &["next"]).await.unwrap();
    let (uncommitted, lso) = read(&cluster, 2, Isolation::ReadUncommitted).await;
    assert_eq!(uncommitted, strings(&["c2a", "c2b", "zombie", "new", "next"]));
    assert_eq!(lso, 7, "c2a c2b, commit, zombie, abort, new, commit | next (open)");
    // The last commit's marker again (a request delayed in the network): the
    // partition saw its epoch, so it is not written and cannot end `next`.
    let late = WriteTxnMarkersRequest {
        coordinator_epoch: i32::MAX,
        markers: vec![TxnMarker {
            producer_id: next.0,
            producer_epoch: next.1,
            commit: true,
            topic: TOPIC.into(),
            partition: 2,
        }],
        groups: Vec::new(),
    };
    let answer = at_leader(&cluster, TOPIC, 2, &late).await.unwrap();
    assert_eq!(answer.results[0].error, ErrorCode::None, "{}", answer.results[0].message);
    assert_eq!(read(&cluster, 2, Isolation::ReadCommitted).await, (strings(&["c2a", "c2b", "new"]), 7));
    end(&cluster, id, next, false).await.unwrap();
    settled(&cluster, id).await;
    assert_eq!(read(&cluster, 2, Isolation::ReadCommitted).await.0, strings(&["c2a", "c2b", "new"]));

    // Describe and list at the coordinator.
    let p = coordinator_partition(&cluster, id).await;
    let described =
        at_leader(&cluster, TRANSACTION_STATE_TOPIC, p, &DescribeTransactionRequest { transactional_id: id.into() })
            .await
            .unwrap()
            .transaction;
    assert_eq!(described.state, "complete-abort");
    assert_eq!(described.producer_id, first.0);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_transaction_is_aborted_at_its_timeout() {
    let cluster = start().await;
    let id = "abandoned";
    let producer = init(&cluster, id, 1_000).await.unwrap();
    write(&cluster, id, producer, 0, 0, &["never"]).await.unwrap();
    assert_eq!(read(&cluster, 0, Isolation::ReadCommitted).await.1, 0);
    // The coordinator's once-a-second look aborts it past 1 s.
    for _ in 0..200 {
        if read(&cluster, 0, Isolation::ReadCommitted).await.1 > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (seen, lso) = read(&cluster, 0, Isolation::ReadCommitted).await;
    assert_eq!((seen, lso), (Vec::<String>::new(), 2), "aborted: the record and the marker are below the LSO");
    // Its producer is fenced.
    assert_eq!(end(&cluster, id, producer, true).await.unwrap_err().code, ErrorCode::ProducerFenced);
    assert_eq!(write(&cluster, id, producer, 0, 1, &["late"]).await.unwrap_err().code, ErrorCode::ProducerFenced);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_coordinator_finishes_what_a_cut_off_one_began() {
    let cluster = start().await;
    let id = "handover";
    let producer = init(&cluster, id, 60_000).await.unwrap();
    for p in 0..PARTITIONS {
        write(&cluster, id, producer, p, 0, &[&format!("h{p}")]).await.unwrap();
    }
    let p = coordinator_partition(&cluster, id).await;
    let (old, _) = cluster.leader(1, TRANSACTION_STATE_TOPIC, p).unwrap();
    // Cut the coordinator off: its commit cannot be stored (no ISR), and
    // another broker takes the state partition over.
    cluster.cut(old, true);
    let request = EndTxnRequest {
        transactional_id: id.into(),
        producer_id: producer.0,
        producer_epoch: producer.1,
        commit: true,
    };
    let cut_off = cluster.broker(old);
    let attempt = tokio::time::timeout(Duration::from_secs(15), async {
        let frame = quiver_protocol::codec::concat(&quiver_protocol::frame::encode_request(&request)).slice(4..);
        cut_off.handle(frame, None).await
    })
    .await;
    drop(attempt);
    let via = if old == 1 { 2 } else { 1 };
    cluster
        .wait_for("another coordinator", Duration::from_secs(30), |c| {
            c.leader(via, TRANSACTION_STATE_TOPIC, p).is_some_and(|(l, _)| l != old)
        })
        .await;
    // The producer retries its commit at the new coordinator.
    let new = cluster.leader(via, TRANSACTION_STATE_TOPIC, p).unwrap().0;
    let ended = retry(|| cluster.call(new, &request)).await.unwrap();
    assert_eq!((ended.producer_id, ended.producer_epoch), (producer.0, producer.1 + 1));
    cluster.cut(old, false);
    settled(&cluster, id).await;
    for q in 0..PARTITIONS {
        let seen = retry(|| async {
            let (node, _) = cluster.leader(via, TOPIC, q).ok_or(WireError::new(ErrorCode::NotLeader, ""))?;
            let fetch = FetchRequest {
                max_wait_ms: 0,
                min_bytes: 0,
                max_bytes: 1 << 20,
                partitions: vec![FetchPartition { topic: TOPIC.into(), partition: q, offset: 0, max_bytes: 1 << 20 }],
                filter: String::new(),
                filter_params: Vec::new(),
                decode_values: false,
                isolation: Isolation::ReadCommitted,
            };
            let answer = cluster.call(node, &fetch).await?;
            match answer.partitions[0].error {
                ErrorCode::None => Ok(answer.partitions[0].records.clone()),
                code => Err(WireError::new(code, answer.partitions[0].message.clone())),
            }
        })
        .await
        .unwrap();
        let values: Vec<Bytes> = Batches::new(seen)
            .map(|b| b.unwrap())
            .filter(|(h, _)| !h.is_control())
            .flat_map(|(_, b)| decode_records(&b).unwrap())
            .map(|r| r.value.unwrap())
            .collect();
        assert_eq!(values, vec![Bytes::from(format!("h{q}"))], "partition {q}");
    }
    cluster.stop().await;
}
