//! Three brokers in one process (`harness`): a partition replicated on all
//! three keeps every acknowledged record across its leader being cut off
//! (taking a write nobody else sees), a new leader taking over, and the old
//! one coming back as a follower: it cuts its diverging tail, every replica
//! reaches the same high watermark, and led again by the old leader the
//! partition holds the same records. A stateful transform whose step fails
//! halfway redoes it from its changelog, counting each input once.

mod harness;
/// The server tests' checker of the aggregate transform, shared.
#[allow(dead_code)]
#[path = "../../server/tests/common/totals.rs"]
mod totals;

use std::time::Duration;

use bytes::Bytes;
use harness::Cluster;
use quiver_protocol::ErrorCode;
use quiver_protocol::batch::{BatchBuilder, Batches, Compression, decode_records};
use quiver_protocol::messages::*;

fn batch(value: &str) -> Bytes {
    let mut b = BatchBuilder::new(Compression::None);
    b.append(1_000, None, Some(value.as_bytes()), &[]);
    b.build()
}

/// Writes `value` with acks=all through whichever broker leads t-0 now;
/// returns its offset once acknowledged.
async fn produce(cluster: &Cluster, via: u32, value: &str) -> i64 {
    for _ in 0..500 {
        let Some((leader, _)) = cluster.leader(via, "t", 0) else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let request = ProduceRequest {
            transactional_id: None,
            acks: Acks::All,
            timeout_ms: 5_000,
            partitions: vec![ProducePartition { topic: "t".into(), partition: 0, records: batch(value) }],
        };
        match cluster.call(leader, &request).await {
            Ok(r) if r.partitions[0].error == ErrorCode::None => return r.partitions[0].base_offset,
            // Not acknowledged: this value may or may not be there; the
            // checker allows an unacknowledged value to appear (at most
            // once) and this test never sends it again.
            Ok(r) if r.partitions[0].error == ErrorCode::NotReplicated => return -1,
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    panic!("{value} was never acknowledged");
}

fn fetch_all() -> FetchRequest {
    FetchRequest {
        isolation: Isolation::ReadUncommitted,
        max_wait_ms: 0,
        min_bytes: 1,
        max_bytes: 1 << 20,
        partitions: vec![FetchPartition { topic: "t".into(), partition: 0, offset: 0, max_bytes: 1 << 20 }],
        filter: String::new(),
        filter_params: vec![],
        decode_values: false,
    }
}

fn decode(f: &FetchResponse) -> Vec<(i64, String)> {
    Batches::new(f.partitions[0].records.clone())
        .flat_map(|b| decode_records(&b.unwrap().1).unwrap())
        .map(|r| (r.offset, String::from_utf8(r.value.unwrap().to_vec()).unwrap()))
        .collect()
}

async fn records(cluster: &Cluster, node: u32) -> Vec<(i64, String)> {
    let f = cluster.call(node, &fetch_all()).await.unwrap();
    assert_eq!(f.partitions[0].error, ErrorCode::None, "{}", f.partitions[0].message);
    decode(&f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_fails_over_and_every_acknowledged_record_stays() {
    let cluster = Cluster::start(3).await;
    let create = CreateTopicRequest { name: "t".into(), partitions: 1, replication_factor: 3, configs: vec![] };
    cluster.call(1, &create).await.unwrap();
    cluster
        .wait_for("t-0 led with a full ISR", Duration::from_secs(20), |c| {
            let image = c.broker(1).controller().image().borrow().clone();
            image.topics.get("t").is_some_and(|t| t.partitions[0].leader.is_some() && t.partitions[0].isr.len() == 3)
        })
        .await;
    let mut acked = Vec::new();
    for i in 0..20 {
        let value = format!("before-{i}");
        acked.push((produce(&cluster, 1, &value).await, value));
    }
    let (old, old_epoch) = cluster.leader(1, "t", 0).unwrap();
    cluster.cut(old, true);
    // The cut-off leader still takes a write it cannot replicate: a tail
    // the others never see, which it must cut when it comes back.
    let diverging = ProduceRequest {
        transactional_id: None,
        acks: Acks::All,
        timeout_ms: 1_000,
        partitions: vec![ProducePartition { topic: "t".into(), partition: 0, records: batch("diverged") }],
    };
    let answer = cluster.call(old, &diverging).await.unwrap();
    assert_ne!(answer.partitions[0].error, ErrorCode::None, "a write no follower has was acknowledged");
    let other = if old == 1 { 2 } else { 1 };
    cluster
        .wait_for("a new leader", Duration::from_secs(20), |c| {
            c.leader(other, "t", 0).is_some_and(|(l, e)| l != old && e > old_epoch)
        })
        .await;
    for i in 0..20 {
        let value = format!("after-{i}");
        acked.push((produce(&cluster, other, &value).await, value));
    }
    cluster.cut(old, false);
    let (new, _) = cluster.leader(other, "t", 0).unwrap();
    let end = records(&cluster, new).await.last().unwrap().0 + 1;
    // Every replica comes back into the ISR and reaches the leader's end.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut at = Vec::new();
        for node in 1..=3 {
            let describe = DescribeTopicsRequest { names: Some(vec!["t".into()]) };
            let p = cluster.call(node, &describe).await.unwrap().topics.remove(0).partitions.remove(0);
            at.push((p.isr.len(), p.high_watermark));
        }
        if at.iter().all(|a| *a == (3, end)) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "replicas (ISR size, high watermark) {at:?}, leader's end {end}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The checker: each acknowledged value once, at its offset, in order.
    let stored = records(&cluster, new).await;
    for (offset, value) in acked.iter().filter(|(o, _)| *o >= 0) {
        let at: Vec<_> = stored.iter().filter(|(_, v)| v == value).collect();
        assert_eq!(at, [&(*offset, value.clone())], "{value} acknowledged at {offset}");
    }
    let offsets: Vec<i64> = stored.iter().map(|(o, _)| *o).collect();
    assert_eq!(offsets, (0..end).collect::<Vec<_>>(), "offsets are dense and in order");
    let mut seen = std::collections::HashSet::new();
    assert!(stored.iter().all(|(_, v)| seen.insert(v.clone())), "no value twice: {stored:?}");
    assert!(!seen.contains("diverged"), "the unreplicated write is gone");
    // Leadership back to the preferred replica (the old leader, if it is
    // first in the assignment): its log is the same, the diverging tail cut.
    cluster.call(new, &ElectLeadersRequest {}).await.unwrap();
    let preferred = cluster.broker(new).controller().image().borrow().topics["t"].partitions[0].replicas[0];
    cluster
        .wait_for("the preferred replica leading", Duration::from_secs(20), |c| {
            c.leader(preferred, "t", 0).is_some_and(|(l, _)| l == preferred)
        })
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let from_preferred = loop {
        match cluster.call(preferred, &fetch_all()).await {
            Ok(f) if f.partitions[0].error == ErrorCode::None && f.partitions[0].high_watermark >= end => {
                break decode(&f);
            }
            _ => assert!(std::time::Instant::now() < deadline, "the preferred replica does not serve t-0"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(from_preferred, stored, "replica {preferred} holds the same records as {new} held");
    cluster.stop().await;
}

/// A leader that is shutting down refuses its followers' fetches, so they
/// back off. Answering them at once with nothing had each follower ask
/// again at once, forever, without ever waiting (in process: starving the
/// runtime, so the cluster never stopped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_shutting_down_refuses_replica_fetches() {
    let cluster = Cluster::start(1).await;
    let create = CreateTopicRequest { name: "t".into(), partitions: 1, replication_factor: 1, configs: vec![] };
    cluster.call(1, &create).await.unwrap();
    cluster.wait_for("t-0 led", Duration::from_secs(20), |c| c.leader(1, "t", 0).is_some()).await;
    let (_, epoch) = cluster.leader(1, "t", 0).unwrap();
    let fetch = ReplicaFetchRequest {
        replica_id: 2,
        max_wait_ms: 10_000,
        max_bytes: 1 << 20,
        partitions: vec![ReplicaFetchPartition {
            topic: "t".into(),
            partition: 0,
            leader_epoch: epoch,
            fetch_offset: 0,
            ask_epoch: -1,
        }],
    };
    cluster.broker(1).shutdown();
    let answer = cluster.call(1, &fetch).await;
    assert_eq!(answer.map(|_| ()).map_err(|e| e.code), Err(ErrorCode::BrokerShuttingDown));
    cluster.stop().await;
}

/// Every record of `topic`-`partition`, read through its leader, as `topic
/// consume --format json` shows it (`key` and `value` as text): what the
/// checker of the server tests reads.
async fn keyed_records(cluster: &Cluster, topic: &str, partition: u32) -> Vec<serde_json::Value> {
    read_keyed(cluster, topic, partition, Isolation::ReadUncommitted).await
}

/// [`keyed_records`] as a reader with `isolation` sees them (markers
/// dropped, and aborted transactions' records when reading committed).
async fn read_keyed(cluster: &Cluster, topic: &str, partition: u32, isolation: Isolation) -> Vec<serde_json::Value> {
    let Some((leader, _)) = cluster.leader(1, topic, partition) else { return Vec::new() };
    let request = FetchRequest {
        isolation,
        partitions: vec![FetchPartition { topic: topic.into(), partition, offset: 0, max_bytes: 1 << 20 }],
        ..fetch_all()
    };
    let Ok(f) = cluster.call(leader, &request).await else { return Vec::new() };
    let p = &f.partitions[0];
    let mut filter = quiver_protocol::control::ReadCommitted::new(
        p.aborted.iter().map(|a| (a.producer_id, a.first_offset)).collect(),
    );
    Batches::new(p.records.clone())
        .map(|b| b.unwrap())
        .filter(|(header, batch)| {
            filter.keep_batch(header, batch) || (isolation == Isolation::ReadUncommitted && !header.is_control())
        })
        .flat_map(|(_, b)| decode_records(&b).unwrap())
        .map(|r| {
            let text = |b: Option<Bytes>| b.map(|b| String::from_utf8(b.to_vec()).unwrap());
            serde_json::json!({"key": text(r.key), "value": text(r.value)})
        })
        .collect()
}

/// The stateful `aggregate` transform across brokers: the answer of one of
/// its output writes to another broker is lost after the write happened, so
/// the step fails with some of its outputs written. The transform rebuilds
/// its store from `totals-state` and redoes the step from the progress
/// stored there: those outputs repeat (at-least-once), and no input is
/// counted twice, in the outputs or in the changelog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stateful_transform_redoes_a_failed_step_from_its_changelog() {
    let (cluster, inputs) = totals_with_a_lost_answer("at-least-once").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let repeated = loop {
        let mut outputs = Vec::new();
        for p in 0..3 {
            outputs.extend(keyed_records(&cluster, "spend", p).await);
        }
        let changelog = keyed_records(&cluster, "totals-state", 0).await;
        match inputs.check_outputs(&outputs).and_then(|repeated| inputs.check_state(&changelog).map(|()| repeated)) {
            Ok(repeated) => break repeated,
            Err(e) => assert!(std::time::Instant::now() < deadline, "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(repeated > 0, "the failed step was redone, so some of its outputs repeat");
    eprintln!("{repeated} outputs of 300 inputs repeated after one lost answer");
    cluster.stop().await;
}

/// The `totals` aggregate (guarantee `guarantee`) over 300 payments on
/// three brokers, with the answer of its first output write to another
/// broker lost after the write happened.
async fn totals_with_a_lost_answer(guarantee: &str) -> (Cluster, totals::Inputs) {
    let wasm = tokio::task::spawn_blocking(|| quiver_plugin_host::builder::first_party("aggregate"))
        .await
        .unwrap()
        .expect("build the aggregate plugin");
    let cluster = Cluster::start_with(3, |c| c.transactions.state_topic_partitions = 3).await;
    for (name, partitions, replication_factor) in [("payments", 1, 3), ("spend", 3, 1)] {
        let create = CreateTopicRequest { name: name.into(), partitions, replication_factor, configs: vec![] };
        cluster.call(1, &create).await.unwrap();
    }
    let deploy = PluginDeployRequest {
        name: "totals".into(),
        kind: "transform".into(),
        wasm: std::fs::read(wasm).unwrap().into(),
        builtin: String::new(),
        params: vec![("field".into(), "amount".into())],
        input: "payments".into(),
        outputs: vec!["spend".into()],
        on_error: "fail".into(),
        start: "start".into(),
        guarantee: guarantee.into(),
    };
    cluster.call(2, &deploy).await.expect("deploy");
    // Outputs go to every broker (one partition of `spend` each): the first
    // write to another broker happens, its answer is lost.
    cluster.lose_produce_answers("spend", 1);

    let mut inputs = totals::Inputs::default();
    let mut b = BatchBuilder::new(Compression::None);
    for i in 0..300i64 {
        let (key, amount) = (format!("k{}", i % 12), i % 7 + 1);
        b.append(1_000, Some(key.as_bytes()), Some(format!("{{\"amount\":{amount}}}").as_bytes()), &[]);
        inputs.push(&key, amount);
    }
    let records = b.build();
    let (leader, _) = cluster.leader(1, "payments", 0).expect("a leader");
    let request = ProduceRequest {
        transactional_id: None,
        acks: Acks::All,
        timeout_ms: 5_000,
        partitions: vec![ProducePartition { topic: "payments".into(), partition: 0, records }],
    };
    let answer = cluster.call(leader, &request).await.unwrap();
    assert_eq!(answer.partitions[0].error, ErrorCode::None, "{}", answer.partitions[0].message);
    (cluster, inputs)
}

/// The same with `--guarantee exactly-once`: the failed step's transaction
/// is aborted, so a read_committed reader of the outputs and of the
/// changelog sees each input's outputs once, the totals exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exactly_once_transform_commits_each_step_once_despite_a_lost_answer() {
    let (cluster, inputs) = totals_with_a_lost_answer("exactly-once").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut outputs = Vec::new();
        for p in 0..3 {
            outputs.extend(read_keyed(&cluster, "spend", p, Isolation::ReadCommitted).await);
        }
        let changelog = read_keyed(&cluster, "totals-state", 0, Isolation::ReadCommitted).await;
        match inputs.check_outputs(&outputs).and_then(|repeated| inputs.check_state(&changelog).map(|()| repeated)) {
            Ok(repeated) => {
                assert_eq!(repeated, 0, "read committed, no output repeats");
                break;
            }
            Err(e) => assert!(std::time::Instant::now() < deadline, "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The lost answer did abort a step: its outputs are in the log, aborted.
    let mut uncommitted = 0;
    for p in 0..3 {
        uncommitted += keyed_records(&cluster, "spend", p).await.len();
    }
    assert!(uncommitted > 300, "the aborted step's outputs are in the log ({uncommitted} records)");
    cluster.stop().await;
}
