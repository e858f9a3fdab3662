//! A follower that was down while retention removed the part of the
//! leader's log it would have fetched next: it empties its log, starts over
//! at the leader's log start, catches up and rejoins the ISR.

mod common;

use std::time::Duration;

use common::cluster::Cluster;

#[test]
fn a_follower_behind_the_leaders_log_start_starts_over_there() {
    let env = [
        ("QUIVER_CLUSTER__REPLICA_LAG_TIME_MAX_MS", "2000"),
        ("QUIVER_CLUSTER__LEADER_REBALANCE_INTERVAL_MS", "0"),
        ("QUIVER_STORAGE__RETENTION_CHECK_INTERVAL_MS", "200"),
    ];
    let mut cluster = Cluster::start(3, &env);
    cluster.wait_formed();
    let configs = ["-c", "segment.bytes=1024", "-c", "retention.bytes=4096", "-c", "min.insync.replicas=2"];
    let mut args = vec!["topic", "create", "short", "-p", "1", "-r", "2"];
    args.extend(configs);
    cluster.ok(1, &args);
    let p = cluster.partitions(1, "short")[0].clone();
    let leader = p["leader"].as_u64().unwrap() as u32;
    let follower =
        p["replicas"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap() as u32).find(|n| *n != leader).unwrap();
    let values = |from: u32, to: u32| (from..to).map(|i| format!("record-{i:05}")).collect::<Vec<_>>();
    let out = cluster.produce(leader, "short", 0, "all", 30_000, &values(0, 20));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // While the follower is down, the leader writes on and retention drops
    // its old segments, past everything the follower has.
    cluster.kill9(follower);
    cluster.wait_for("the ISR to shrink", Duration::from_secs(20), || {
        cluster.partitions(leader, "short").first().is_some_and(|p| p["isr"].as_array().unwrap().len() == 1)
    });
    for chunk in 0..10 {
        let out = cluster.produce(leader, "short", 0, "leader", 30_000, &values(20 + chunk * 30, 50 + chunk * 30));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    cluster.wait_for("retention past the follower's end", Duration::from_secs(20), || {
        cluster.partitions(leader, "short").first().is_some_and(|p| p["log_start_offset"].as_i64().unwrap() > 20)
    });

    // It comes back, starts over at the leader's log start, and rejoins.
    cluster.start_node(follower);
    cluster.wait_for("the ISR complete again", Duration::from_secs(40), || {
        cluster.partitions(leader, "short").first().is_some_and(|p| p["isr"].as_array().unwrap().len() == 2)
    });
    assert!(cluster.node_log(follower).contains("starting over there"), "{}", cluster.node_log(follower));
    let out = cluster.produce(leader, "short", 0, "all", 30_000, &values(320, 330));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
