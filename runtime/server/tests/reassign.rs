//! Partition reassignment across real processes: a partition moves to other
//! brokers (its leader included) while a producer keeps writing with
//! acks=all; afterwards the new replicas hold every acknowledged record,
//! byte for byte alike, and the old replica's files are gone.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::cluster::Cluster;

fn replicas_of(p: &serde_json::Value, key: &str) -> Vec<u32> {
    p[key].as_array().unwrap().iter().map(|n| n.as_u64().unwrap() as u32).collect()
}

#[test]
fn a_partition_moves_to_other_brokers_while_producing_continues() {
    let env =
        [("QUIVER_CLUSTER__REPLICA_LAG_TIME_MAX_MS", "2000"), ("QUIVER_CLUSTER__LEADER_REBALANCE_INTERVAL_MS", "0")];
    let cluster = Cluster::start(3, &env);
    cluster.wait_formed();
    cluster.ok(1, &["topic", "create", "moving", "-p", "1", "-r", "2"]);
    let before = cluster.partitions(1, "moving")[0].clone();
    let leader = before["leader"].as_u64().unwrap() as u32;
    let stay = replicas_of(&before, "replicas").into_iter().find(|n| *n != leader).unwrap();
    let new = (1..=3).find(|n| !replicas_of(&before, "replicas").contains(n)).unwrap();

    let stop = AtomicBool::new(false);
    let acknowledged = std::thread::scope(|s| {
        let producer = s.spawn(|| {
            let mut acknowledged = Vec::new();
            let mut batch = 0;
            while !stop.load(Ordering::Relaxed) {
                let values: Vec<String> = (0..20).map(|i| format!("m{batch}-{i}")).collect();
                if cluster.produce(stay, "moving", 0, "all", 20_000, &values).status.success() {
                    acknowledged.extend(values);
                }
                batch += 1;
            }
            acknowledged
        });
        std::thread::sleep(Duration::from_millis(500));
        let target = format!("{new},{stay}");
        let moved = cluster.ok(stay, &["topic", "reassign", "moving", "-p", "0", "--replicas", &target]);
        assert!(moved.contains("reassigning moving-0"), "{moved}");
        cluster.wait_for("the move to complete", Duration::from_secs(40), || {
            cluster.partitions(stay, "moving").first().is_some_and(|p| {
                let mut isr = replicas_of(p, "isr");
                isr.sort();
                let mut want = vec![new, stay];
                want.sort();
                replicas_of(p, "replicas") == [new, stay] && isr == want && p["leader"] == new
            })
        });
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        producer.join().unwrap()
    });
    assert!(acknowledged.len() >= 40, "writes went on: {}", acknowledged.len());

    // Every acknowledged record, once, on the new leader; the replicas
    // alike; the old replica gone from the old leader's disk.
    let mut read = None;
    cluster.wait_for("the new leader serving", Duration::from_secs(20), || {
        read = cluster.values(new, "moving", 0);
        read.as_ref().is_some_and(|r| r.len() >= acknowledged.len())
    });
    let read = read.unwrap();
    eprintln!("{} acknowledged, {} stored", acknowledged.len(), read.len());
    for v in &acknowledged {
        assert_eq!(read.iter().filter(|r| *r == v).count(), 1, "{v}");
    }
    cluster.wait_for("identical new replicas", Duration::from_secs(20), || {
        let a = cluster.replica_bytes(new, "moving", 0);
        !a.is_empty() && a == cluster.replica_bytes(stay, "moving", 0)
    });
    cluster.wait_for("the old replica removed", Duration::from_secs(20), || {
        !cluster.dir.path().join(format!("node-{leader}/logs/moving-0")).exists()
    });
    let err = cluster.fails(1, &["topic", "reassign", "moving", "-p", "0", "--replicas", "9"]);
    assert!(err.contains("broker 9 is not a live, registered broker"), "{err}");
}
