//! Unclean leader election across real processes: a topic that allows it
//! gets a leader from outside the ISR when no ISR member is live, `cluster
//! health` reports it, the records only the dead leader had are gone from
//! the new leader, and when the old leader comes back it truncates its
//! diverging tail so both replicas hold the same bytes. (Topics that do not
//! allow it stay offline: `cluster.rs` and the controller's unit tests.)

mod common;

use std::time::Duration;

use common::cluster::Cluster;

fn values(prefix: &str, range: std::ops::Range<u32>) -> Vec<String> {
    range.map(|i| format!("{prefix}-{i}")).collect()
}

fn replicas_of(p: &serde_json::Value) -> Vec<u32> {
    p["replicas"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap() as u32).collect()
}

#[test]
fn an_unclean_election_is_reported_and_the_old_leader_truncates_its_tail() {
    let env =
        [("QUIVER_CLUSTER__REPLICA_LAG_TIME_MAX_MS", "2000"), ("QUIVER_CLUSTER__LEADER_REBALANCE_INTERVAL_MS", "0")];
    let mut cluster = Cluster::start(3, &env);
    cluster.wait_formed();
    cluster.ok(1, &["topic", "create", "loose", "-p", "1", "-r", "2", "-c", "unclean.leader.election.enable=true"]);
    let loose = cluster.partitions(1, "loose")[0].clone();
    let (old_leader, follower) = (loose["leader"].as_u64().unwrap() as u32, replicas_of(&loose)[1]);
    let out = cluster.produce(old_leader, "loose", 0, "all", 30_000, &values("a", 0..50));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The follower dies; the ISR shrinks to the leader, which takes more
    // writes the follower never sees.
    cluster.kill9(follower);
    cluster.wait_for("the ISR to shrink", Duration::from_secs(20), || {
        cluster.partitions(old_leader, "loose").first().is_some_and(|p| p["isr"].as_array().unwrap().len() == 1)
    });
    let out = cluster.produce(old_leader, "loose", 0, "all", 30_000, &values("b", 0..20));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The leader dies and the stale follower comes back: the only live
    // replica is outside the ISR, and this topic allows it to lead.
    cluster.kill9(old_leader);
    cluster.start_node(follower);
    let survivor = (1..=3).find(|n| *n != old_leader && *n != follower).unwrap();
    cluster.wait_for("an unclean leader", Duration::from_secs(30), || {
        cluster.partitions(survivor, "loose").first().is_some_and(|p| p["leader"] == follower)
    });
    let health = cluster.quiver(survivor, &["cluster", "health"]);
    assert!(!health.status.success());
    let text = String::from_utf8_lossy(&health.stdout).into_owned();
    assert!(text.contains("loose-0") && text.contains("unclean"), "{text}");
    let mut read = None;
    cluster.wait_for("the unclean leader serving", Duration::from_secs(20), || {
        read = cluster.values(follower, "loose", 0);
        read.as_ref().is_some_and(|r| r.len() >= 50)
    });
    assert_eq!(read.unwrap(), values("a", 0..50), "the records only the old leader had are lost");
    let out = cluster.produce(follower, "loose", 0, "leader", 30_000, &values("c", 0..10));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The old leader returns, truncates what the new leader does not have,
    // and copies the rest: identical replicas.
    cluster.start_node(old_leader);
    cluster.wait_for("identical replicas after truncation", Duration::from_secs(40), || {
        let a = cluster.replica_bytes(old_leader, "loose", 0);
        !a.is_empty() && a == cluster.replica_bytes(follower, "loose", 0)
    });
    let mut expected = values("a", 0..50);
    expected.extend(values("c", 0..10));
    assert_eq!(cluster.values(follower, "loose", 0).unwrap(), expected);
    assert!(cluster.node_log(old_leader).contains("truncated a diverging tail"));
}
