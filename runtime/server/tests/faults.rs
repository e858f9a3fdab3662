//! Fault injection across three real `quiver broker` processes, each behind
//! a UDP proxy. A producer (the client library, `acks=all`, one request in
//! flight) writes unique values to a replicated topic while a seeded fault
//! injector kills nodes with SIGKILL and restarts them, pauses them with
//! SIGSTOP, cuts their inbound network, cuts a node off from the other nodes
//! both ways (clients still reach it: a partition between brokers), and
//! drops a share of their packets.
//! After healing, a checker reads every partition back and proves: every
//! acknowledged value is present exactly once, at the offset it was
//! acknowledged with; no value appears twice or was never sent; a value
//! whose write was refused for good is nowhere; per partition,
//! acknowledged values are in the order they were sent; and every replica
//! holds the same bytes. The producer is idempotent (the default): writes
//! whose answers were lost are retried, so the retries themselves are
//! checked for duplicates.
//!
//! Seeds: `QUIVER_FAULT_SEEDS=1,2,3` (default `1,2`); a failure names its
//! seed, and the faults of each round are printed as they happen.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::cluster::Cluster;
use common::faults::{self, Rng};
use quiver_client::{Acks, ClientConfig, ProduceError, ProducerConfig, ProducerRecord};

const TOPIC: &str = "chk";
const PARTITIONS: u32 = 3;

/// What the producer was told.
#[derive(Default)]
struct Produced {
    /// Sequence number → (partition, offset) for acknowledged values.
    acked: BTreeMap<u64, (u32, i64)>,
    /// Values whose write failed or whose fate is unknown.
    unsure: Vec<u64>,
    /// Values the brokers refused for good: never written.
    refused: Vec<u64>,
    /// Failures that said the write may or may not have happened.
    unknown: usize,
    sent: u64,
}

fn value(seq: u64) -> String {
    format!("v{seq}")
}

/// Writes values `v0, v1, ...` round robin over the partitions until told
/// to stop.
fn produce_until(addresses: Vec<String>, ca: Vec<u8>, stop: Arc<AtomicBool>) -> Produced {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    runtime.block_on(async move {
        let mut config = ClientConfig::new(addresses[0].clone(), ca);
        config.brokers = addresses;
        config.connect_timeout = Duration::from_secs(2);
        config.request_timeout = Duration::from_secs(2);
        let client = faults::connect_until_up(config).await;
        let producer = client.producer(ProducerConfig {
            acks: Acks::All,
            in_flight_max: 1,
            linger: Duration::from_millis(2),
            delivery_timeout: Duration::from_secs(15),
            ..ProducerConfig::default()
        });
        let mut produced = Produced::default();
        let mut waiting = std::collections::VecDeque::new();
        while !stop.load(Ordering::Relaxed) || !waiting.is_empty() {
            if !stop.load(Ordering::Relaxed) {
                for _ in 0..10 {
                    let seq = produced.sent;
                    produced.sent += 1;
                    let partition = (seq % u64::from(PARTITIONS)) as u32;
                    let sent = producer.send(ProducerRecord::new(TOPIC, value(seq)).partition(partition)).await;
                    waiting.push_back((seq, partition, sent));
                }
            }
            while waiting.len() > 30 || (stop.load(Ordering::Relaxed) && !waiting.is_empty()) {
                let (seq, partition, sent) = waiting.pop_front().unwrap();
                let outcome = match sent {
                    Ok(delivery) => delivery.await,
                    Err(e) => Err(e),
                };
                match outcome {
                    Ok(meta) => {
                        assert_eq!(meta.partition, partition);
                        produced.acked.insert(seq, (partition, meta.offset));
                    }
                    Err(e) => {
                        match e {
                            ProduceError::Rejected(_) => produced.refused.push(seq),
                            ProduceError::Unknown(_) => produced.unknown += 1,
                            _ => {}
                        }
                        produced.unsure.push(seq);
                    }
                }
            }
        }
        produced
    })
}

/// Every record of `partition` up to the high watermark: offset → value.
fn read_back(cluster: &Cluster, partition: u32) -> Option<BTreeMap<i64, String>> {
    faults::read_partition(cluster, TOPIC, partition, &[]).map(|records| records.into_iter().collect())
}

fn round(seed: u64) {
    if let Ok(filter) = std::env::var("QUIVER_TEST_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    }
    let mut rng = Rng::seeded(seed);
    // Leaderships also move back to preferred replicas every 3 s: more
    // leader changes under load.
    let env =
        [("QUIVER_CLUSTER__REPLICA_LAG_TIME_MAX_MS", "2000"), ("QUIVER_CLUSTER__LEADER_REBALANCE_INTERVAL_MS", "3000")];
    let mut cluster = Cluster::start_proxied(3, &env, seed);
    cluster.wait_formed();
    let partitions = PARTITIONS.to_string();
    cluster.ok(1, &["topic", "create", TOPIC, "-p", &partitions, "-r", "3", "-c", "min.insync.replicas=2"]);

    let stop = Arc::new(AtomicBool::new(false));
    let addresses: Vec<String> = (1..=3).map(|n| cluster.address(n)).collect();
    let ca = std::fs::read(cluster.certs().join("ca.pem")).unwrap();
    let producer = {
        let stop = stop.clone();
        std::thread::spawn(move || produce_until(addresses, ca, stop))
    };

    faults::inject(&mut cluster, &mut rng, seed, Duration::from_secs(20));
    stop.store(true, Ordering::Relaxed);
    let produced = producer.join().expect("the producer thread");
    eprintln!(
        "seed {seed}: {} sent, {} acknowledged, {} failed ({} refused, {} of unknown fate)",
        produced.sent,
        produced.acked.len(),
        produced.unsure.len(),
        produced.refused.len(),
        produced.unknown
    );
    assert!(produced.acked.len() > 100, "too few writes were acknowledged to prove anything");

    // Healed: every replica back in sync.
    cluster.wait_for("a healthy cluster with complete ISRs", Duration::from_secs(90), || {
        let parts = cluster.partitions(1, TOPIC);
        parts.len() == PARTITIONS as usize
            && parts.iter().all(|p| p["isr"].as_array().unwrap().len() == 3)
            && cluster.quiver(1, &["cluster", "health"]).status.success()
    });

    // Every acknowledged value exactly where it was acknowledged; nothing
    // twice; nothing never sent.
    let mut seen: HashMap<String, (u32, i64)> = HashMap::new();
    for partition in 0..PARTITIONS {
        let mut records = None;
        cluster.wait_for("reading back", Duration::from_secs(20), || {
            records = read_back(&cluster, partition);
            records.is_some()
        });
        for (offset, v) in records.unwrap() {
            let seq: u64 = v.strip_prefix('v').and_then(|s| s.parse().ok()).expect("a value this test wrote");
            assert!(seq < produced.sent, "seed {seed}: {v} at {partition}/{offset} was never sent");
            if let Some(first) = seen.insert(v.clone(), (partition, offset)) {
                panic!("seed {seed}: {v} is stored twice: at {first:?} and at {:?}", (partition, offset));
            }
        }
    }
    for seq in &produced.refused {
        assert!(
            !seen.contains_key(&value(*seq)),
            "seed {seed}: v{seq} was refused but is stored at {:?}",
            seen[&value(*seq)]
        );
    }
    for (seq, (partition, offset)) in &produced.acked {
        match seen.get(&value(*seq)) {
            Some(at) if at == &(*partition, *offset) => {}
            Some(at) => panic!("seed {seed}: v{seq} acknowledged at {partition}/{offset} is at {at:?}"),
            None => panic!("seed {seed}: v{seq} acknowledged at {partition}/{offset} is lost"),
        }
    }
    // Per partition, acknowledged values in send order.
    for partition in 0..PARTITIONS {
        let offsets: Vec<i64> = produced.acked.values().filter(|(p, _)| *p == partition).map(|(_, o)| *o).collect();
        assert!(offsets.windows(2).all(|w| w[0] < w[1]), "seed {seed}: partition {partition} reordered");
    }
    // Every replica holds the same bytes.
    for partition in 0..PARTITIONS {
        cluster.wait_for("identical replicas", Duration::from_secs(20), || {
            let first = cluster.replica_bytes(1, TOPIC, partition);
            (2..=3).all(|n| cluster.replica_bytes(n, TOPIC, partition) == first)
        });
    }
}

#[test]
fn acknowledged_records_survive_kills_pauses_and_partitions() {
    faults::for_each_seed(&[1, 2], round);
}

/// A partition leader cut off from the other nodes (clients still reach it)
/// cannot complete an acks=all write and says so; the other two elect a new
/// leader that takes writes, also from an idempotent producer that started
/// on the cut-off one; once healed, the old leader drops what only it had,
/// and every replica holds exactly the acknowledged records.
#[test]
fn a_leader_partitioned_from_the_other_nodes_is_replaced_and_loses_nothing_acknowledged() {
    let env =
        [("QUIVER_CLUSTER__REPLICA_LAG_TIME_MAX_MS", "2000"), ("QUIVER_CLUSTER__LEADER_REBALANCE_INTERVAL_MS", "0")];
    let cluster = Cluster::start_proxied(3, &env, 7);
    cluster.wait_formed();
    cluster.ok(1, &["topic", "create", "iso", "-p", "1", "-r", "3", "-c", "min.insync.replicas=2"]);
    let leader_via =
        |via: u32| cluster.partitions(via, "iso").first().and_then(|p| p["leader"].as_u64()).map(|l| l as u32);
    let leader = leader_via(1).expect("a leader");
    let other = leader % 3 + 1;
    let before: Vec<String> = (0..20).map(|i| format!("before-{i}")).collect();
    let out = cluster.produce(leader, "iso", 0, "all", 30_000, &before);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    cluster.isolate(leader, true);
    // Without sequence numbers a write cannot be sent again safely: the one
    // to the cut-off leader fails with a clear error.
    let args = ["-p", "0", "--acks", "all", "--timeout-ms", "5000", "--no-idempotence"];
    let out = cluster.produce_args(leader, "iso", &args, &["unreplicated".to_string()]);
    assert!(!out.status.success(), "an acks=all write without followers must not be acknowledged");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.trim().is_empty(), "a clear error");
    cluster.wait_for("a new leader on the majority side", Duration::from_secs(30), || {
        leader_via(other).is_some_and(|l| l != leader)
    });
    // An idempotent producer that starts on the cut-off leader (its stale
    // metadata still names itself) learns the new leader from the other
    // nodes and is acknowledged there, once.
    let out = cluster.produce(leader, "iso", 0, "all", 30_000, &["moved".to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let after: Vec<String> = (0..20).map(|i| format!("after-{i}")).collect();
    let new_leader = leader_via(other).unwrap();
    let out = cluster.produce(new_leader, "iso", 0, "all", 30_000, &after);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    cluster.isolate(leader, false);
    cluster.wait_for("the old leader back in sync", Duration::from_secs(60), || {
        cluster.partitions(other, "iso").first().is_some_and(|p| p["isr"].as_array().unwrap().len() == 3)
    });
    let expected: Vec<String> = before.iter().chain(&["moved".to_string()]).chain(&after).cloned().collect();
    assert_eq!(cluster.values(other, "iso", 0).unwrap(), expected, "acknowledged records, once, in order");
    cluster.wait_for("identical replicas", Duration::from_secs(20), || {
        let first = cluster.replica_bytes(1, "iso", 0);
        (2..=3).all(|n| cluster.replica_bytes(n, "iso", 0) == first)
    });
}
