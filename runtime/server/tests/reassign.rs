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

/// A move whose new replica cannot catch up (its process is paused) is
/// cancelled: the partition goes back to the replicas it started from with
/// every record, and the would-be replica leaves nothing behind.
#[test]
fn a_move_that_cannot_finish_is_cancelled() {
    let env = [("QUIVER_CLUSTER__LEADER_REBALANCE_INTERVAL_MS", "0")];
    let cluster = Cluster::start(3, &env);
    cluster.wait_formed();
    cluster.ok(1, &["topic", "create", "stuck", "-p", "1", "-r", "2"]);
    let before = cluster.partitions(1, "stuck")[0].clone();
    let leader = before["leader"].as_u64().unwrap() as u32;
    let original = replicas_of(&before, "replicas");
    let new = (1..=3).find(|n| !original.contains(n)).unwrap();
    let values: Vec<String> = (0..50).map(|i| format!("s{i}")).collect();
    let out = cluster.produce(leader, "stuck", 0, "all", 20_000, &values);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let err = cluster.fails(leader, &["topic", "reassign", "stuck", "-p", "0", "--cancel"]);
    assert!(err.contains("stuck-0 is not being reassigned"), "{err}");
    // Paused, it still counts as live until its session expires: the move
    // is accepted but can never complete.
    cluster.pause(new, true);
    let target = format!("{new}");
    let moving = cluster.ok(leader, &["topic", "reassign", "stuck", "-p", "0", "--replicas", &target]);
    assert!(moving.contains("reassigning stuck-0"), "{moving}");
    let during = cluster.partitions(leader, "stuck")[0].clone();
    assert_eq!(replicas_of(&during, "replicas").len(), 3, "old and new replicas meanwhile: {during}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(replicas_of(&cluster.partitions(leader, "stuck")[0], "replicas").len(), 3, "still moving");

    let cancelled = cluster.ok(leader, &["topic", "reassign", "stuck", "-p", "0", "--cancel"]);
    assert!(cancelled.contains("cancelled the move of stuck-0"), "{cancelled}");
    let after = cluster.partitions(leader, "stuck")[0].clone();
    assert_eq!(replicas_of(&after, "replicas"), original, "{after}");
    assert_eq!(after["leader"].as_u64().unwrap() as u32, leader);
    assert_eq!(cluster.values(leader, "stuck", 0).unwrap(), values);
    // Nothing is left to cancel.
    let err = cluster.fails(leader, &["topic", "reassign", "stuck", "-p", "0", "--cancel"]);
    assert!(err.contains("not being reassigned"), "{err}");

    cluster.pause(new, false);
    cluster.wait_for("the would-be replica's files gone", Duration::from_secs(20), || {
        !cluster.dir.path().join(format!("node-{new}/logs/stuck-0")).exists()
    });
    cluster.wait_for("the ISR back to the original replicas", Duration::from_secs(20), || {
        let p = cluster.partitions(new, "stuck");
        p.first().is_some_and(|p| {
            let mut isr = replicas_of(p, "isr");
            isr.sort();
            let mut want = original.clone();
            want.sort();
            isr == want
        })
    });
}
