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
    // Three partitions of two replicas: one of them leaves out a node that
    // does not lead the metadata quorum (pausing that one would stall
    // every metadata write until an election).
    cluster.ok(1, &["topic", "create", "stuck", "-p", "3", "-r", "2"]);
    let controller = cluster.info(1).unwrap()["controller_leader"].as_u64().unwrap() as u32;
    let (p, before, new) = cluster
        .partitions(1, "stuck")
        .into_iter()
        .enumerate()
        .find_map(|(i, p)| {
            let new = (1..=3).find(|n| !replicas_of(&p, "replicas").contains(n))?;
            (new != controller).then_some((i, p, new))
        })
        .expect("a partition that leaves out a node other than the controller leader");
    let leader = before["leader"].as_u64().unwrap() as u32;
    let original = replicas_of(&before, "replicas");
    let values: Vec<String> = (0..50).map(|i| format!("s{i}")).collect();
    let out = cluster.produce(leader, "stuck", p as u32, "all", 20_000, &values);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let partition = p.to_string();
    let reassign = |extra: &[&str]| {
        let mut args = vec!["topic", "reassign", "stuck", "-p", &partition];
        args.extend_from_slice(extra);
        let out = cluster.quiver(leader, &args);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let run_ok = |extra: &[&str]| {
        let (ok, output) = reassign(extra);
        assert!(ok, "{output}");
        output
    };
    let run_fails = |extra: &[&str]| {
        let (ok, output) = reassign(extra);
        assert!(!ok, "{output}");
        output
    };

    let err = run_fails(&["--cancel"]);
    assert!(err.contains(&format!("stuck-{p} is not being reassigned")), "{err}");
    // Paused, it still counts as live until its session expires: the move
    // is accepted but can never complete.
    cluster.pause(new, true);
    let target = new.to_string();
    let moving = run_ok(&["--replicas", &target]);
    assert!(moving.contains(&format!("reassigning stuck-{p}")), "{moving}");
    cluster.wait_for("old and new replicas meanwhile", Duration::from_secs(10), || {
        replicas_of(&cluster.partitions(leader, "stuck")[p], "replicas").len() == 3
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(replicas_of(&cluster.partitions(leader, "stuck")[p], "replicas").len(), 3, "still moving");

    let cancelled = run_ok(&["--cancel"]);
    assert!(cancelled.contains(&format!("cancelled the move of stuck-{p}")), "{cancelled}");
    cluster.wait_for("the original replicas back", Duration::from_secs(10), || {
        replicas_of(&cluster.partitions(leader, "stuck")[p], "replicas") == original
    });
    let after = cluster.partitions(leader, "stuck")[p].clone();
    assert_eq!(after["leader"].as_u64().unwrap() as u32, leader);
    assert_eq!(cluster.values(leader, "stuck", p as u32).unwrap(), values);
    // Nothing is left to cancel.
    let err = run_fails(&["--cancel"]);
    assert!(err.contains("not being reassigned"), "{err}");

    cluster.pause(new, false);
    cluster.wait_for("the would-be replica's files gone", Duration::from_secs(20), || {
        !cluster.dir.path().join(format!("node-{new}/logs/stuck-{p}")).exists()
    });
    cluster.wait_for("the ISR back to the original replicas", Duration::from_secs(20), || {
        let now = cluster.partitions(new, "stuck");
        now.get(p).is_some_and(|now| {
            let mut isr = replicas_of(now, "isr");
            isr.sort();
            let mut want = original.clone();
            want.sort();
            isr == want
        })
    });
}
