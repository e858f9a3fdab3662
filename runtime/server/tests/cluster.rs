//! A three-node cluster of real `quiver broker` processes on loopback, with
//! mutual TLS between them: the metadata quorum elects a leader, topics
//! created through any node spread their leaders over the nodes, produce and
//! fetch are served by leaders (clients find them from the metadata), a node killed
//! with SIGKILL is fenced and reported, comes back with its data, and bad
//! situations get clear errors: a node id already taken, a node with another
//! cluster's certificate, no quorum. A node outside --controllers joins as a
//! learner and is made a voter (and back) by command.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{Cluster, fenced};
use common::{BIN, free_port, json_lines};

#[test]
fn three_processes_form_a_cluster_fence_a_killed_node_and_refuse_bad_members() {
    let mut cluster = Cluster::start(3, &[]);
    let certs = cluster.certs();

    // A leader is elected and every broker registers.
    cluster.wait_formed();
    let text = cluster.ok(1, &["cluster", "info"]);
    assert!(text.contains("cluster: 3 nodes, controller leader"), "{text}");
    // Node 2 sees the same once its image has caught up with node 1's
    // (a heartbeat or so after formation): health is judged on it.
    cluster.wait_for("node 2 to report the cluster healthy", Duration::from_secs(30), || {
        cluster.quiver(2, &["cluster", "health"]).status.success()
    });
    assert!(cluster.ok(2, &["cluster", "health"]).starts_with("healthy"));

    // A topic created through one node exists on all; leaders spread.
    cluster.ok(2, &["topic", "create", "orders", "-p", "6"]);
    let described = cluster.ok(3, &["topic", "describe", "orders", "--format", "json"]);
    let described: serde_json::Value = serde_json::from_str(&described).unwrap();
    let partitions = described["partitions"].as_array().unwrap().clone();
    let mut per_node = [0; 3];
    for p in &partitions {
        per_node[p["leader"].as_u64().unwrap() as usize - 1] += 1;
    }
    assert_eq!(per_node, [2, 2, 2], "{described}");
    let err = cluster.fails(1, &["topic", "create", "orders", "-p", "1"]);
    assert!(err.contains("already exists"), "{err}");
    let err = cluster.fails(1, &["topic", "create", "wide", "-p", "1", "-r", "4"]);
    assert!(err.contains("replication factor 4"), "{err}");

    // Produce to each partition through its leader; reading through any
    // other node finds the leader from the metadata.
    for p in &partitions {
        let (partition, leader) = (p["partition"].as_u64().unwrap() as u32, p["leader"].as_u64().unwrap() as u32);
        let values: Vec<String> = (0..100).map(|i| format!("p{partition}-{i}")).collect();
        let out = cluster.produce(leader, "orders", partition, "all", 30_000, &values);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let other = leader % 3 + 1;
        assert_eq!(cluster.values(other, "orders", partition).unwrap(), values);
    }

    // Node 3 is killed: it is fenced, its partitions are offline (one
    // replica each), and health says so.
    let victim = 3u32;
    let victim_partitions: Vec<u64> =
        partitions.iter().filter(|p| p["leader"] == victim as u64).map(|p| p["partition"].as_u64().unwrap()).collect();
    cluster.kill9(victim);
    cluster.wait_for("node 3 fenced", Duration::from_secs(20), || cluster.info(1).is_some_and(|i| fenced(&i, 3)));
    let health = cluster.quiver(1, &["cluster", "health"]);
    assert!(!health.status.success());
    let health = String::from_utf8_lossy(&health.stdout).into_owned();
    assert!(health.contains("node 3") && health.contains("fenced"), "{health}");
    for p in &victim_partitions {
        assert!(health.contains(&format!("orders-{p} is offline")), "{health}");
        let err = cluster.fails(1, &["topic", "consume", "orders", "-p", &p.to_string(), "-o", "start:end"]);
        assert!(err.contains("offline"), "{err}");
    }
    // Metadata still works without it: a new topic lands on the live nodes.
    cluster.ok(1, &["topic", "create", "after", "-p", "4"]);

    // It comes back with its data: registered again, unfenced, leading its
    // partitions, every acknowledged record there.
    cluster.start_node(victim);
    cluster.wait_for("node 3 back", Duration::from_secs(30), || {
        cluster.quiver(1, &["cluster", "health"]).status.success()
    });
    for p in &victim_partitions {
        let mut records = Vec::new();
        cluster.wait_for("node 3 serving its partition", Duration::from_secs(10), || {
            let out = cluster.quiver(
                victim,
                &["topic", "consume", "orders", "-p", &p.to_string(), "-o", "start:end", "--format", "json"],
            );
            if out.status.success() {
                records = json_lines(&String::from_utf8_lossy(&out.stdout));
            }
            out.status.success()
        });
        let values: Vec<String> = records.iter().map(|r| r["value"].as_str().unwrap().to_string()).collect();
        let expected: Vec<String> = (0..100).map(|i| format!("p{p}-{i}")).collect();
        assert_eq!(values, expected);
    }

    // A second process under a live node's id is refused and exits.
    let imposter_data = cluster.dir.path().join("imposter");
    let mut imposter = cluster.broker(2, free_port(), &imposter_data, &certs.join("node-2"), &certs.join("ca.pem"));
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = imposter.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the imposter should have exited");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    let log = std::fs::read_to_string(imposter_data.join("broker.log")).unwrap();
    assert!(log.contains("node id 2 is already taken by a live broker"), "{log}");

    // A node whose certificate comes from another CA cannot join: it says
    // why, and the cluster never lists it.
    let foreign = cluster.dir.path().join("foreign");
    let init = Command::new(BIN).args(["certs", "init", "--dir"]).arg(&foreign).args(["--nodes", "4"]).output();
    assert!(init.unwrap().status.success());
    let foreign_data = cluster.dir.path().join("node-4");
    let mut stranger = cluster.broker(4, free_port(), &foreign_data, &foreign.join("node-4"), &foreign.join("ca.pem"));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = std::fs::read_to_string(foreign_data.join("broker.log")).unwrap_or_default();
        if log.contains("cannot reach the controller quorum") && log.contains("TLS") {
            break;
        }
        assert!(Instant::now() < deadline, "the stranger should say why it cannot join:\n{log}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let info = cluster.info(1).unwrap();
    assert_eq!(info["nodes"].as_array().unwrap().len(), 3, "{info}");
    stranger.kill().unwrap();
    stranger.wait().unwrap();

    // A node of this cluster's CA that is not in --controllers joins as a
    // learner; one command makes it a voter, another a learner again.
    let init = Command::new(BIN).args(["certs", "init", "--dir"]).arg(&certs).args(["--nodes", "4"]).output();
    assert!(init.unwrap().status.success());
    let learner_data = cluster.dir.path().join("node-4b");
    let mut learner = cluster.broker(4, free_port(), &learner_data, &certs.join("node-4"), &certs.join("ca.pem"));
    let voter = |info: &serde_json::Value| {
        info["nodes"].as_array().unwrap().iter().find(|n| n["node_id"] == 4).map(|n| n["voter"] == true)
    };
    cluster.wait_for("node 4 registered as a learner", Duration::from_secs(30), || {
        cluster.info(1).is_some_and(|i| voter(&i) == Some(false))
    });
    let err = cluster.fails(2, &["cluster", "add-voter", "9"]);
    assert!(err.contains("node 9 does not follow the metadata log"), "{err}");
    assert_eq!(cluster.ok(2, &["cluster", "add-voter", "4"]).trim(), "voters: 1, 2, 3, 4");
    cluster.wait_for("node 4 a voter", Duration::from_secs(10), || {
        cluster.info(1).is_some_and(|i| voter(&i) == Some(true))
    });
    assert_eq!(cluster.ok(3, &["cluster", "remove-voter", "4"]).trim(), "voters: 1, 2, 3");
    cluster.wait_for("node 4 a learner again", Duration::from_secs(10), || {
        cluster.info(1).is_some_and(|i| voter(&i) == Some(false))
    });
    learner.kill().unwrap();
    learner.wait().unwrap();

    // Two of three voters down: metadata changes fail with "no quorum".
    cluster.kill9(2);
    cluster.kill9(3);
    // (The first attempt may instead report that the leader it was sent to
    // vanished mid-request, which leaves its fate unknown; by the second the
    // node knows there is no leader.)
    let mut err = cluster.fails(1, &["topic", "create", "lonely", "-p", "1"]);
    if err.contains("may or may not have been made") {
        err = cluster.fails(1, &["topic", "create", "lonely", "-p", "1"]);
    }
    assert!(err.contains("no controller quorum"), "{err}");
}

/// A restarted node answers clients only once it has caught up with the
/// metadata log (until then `broker_not_ready`, which clients retry): a new
/// producer process that bootstraps through it right after the restart
/// finds a topic created while it was down, instead of being told that the
/// topic does not exist.
#[test]
fn a_producer_bootstrapping_through_a_restarted_node_finds_new_topics() {
    let mut cluster = Cluster::start(3, &[]);
    cluster.wait_formed();
    cluster.kill9(2);
    cluster.wait_for("node 2 fenced", Duration::from_secs(30), || cluster.info(1).is_some_and(|i| fenced(&i, 2)));
    cluster.ok(1, &["topic", "create", "fresh", "-p", "2", "-r", "2"]);
    cluster.start_node(2);
    // Up and answering (its own view of the cluster), not yet caught up.
    cluster.wait_for("node 2 answering", Duration::from_secs(30), || cluster.info(2).is_some());
    let values: Vec<String> = (0..50).map(|i| format!("v{i}")).collect();
    let out = cluster.produce_args(2, "fresh", &["-p", "0", "--acks", "all", "--max-block-ms", "1000"], &values);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(cluster.values(2, "fresh", 0).unwrap(), values);
}

/// Admin operations (leader elections, voters, reassignment, plugin deploy
/// and control) need an authenticated principal outside development nodes:
/// a client without a certificate is refused with the reason and what to
/// do; one presenting a client certificate of the cluster CA (`quiver certs
/// init --client admin`) is served; everyone may still produce.
#[test]
fn admin_operations_need_a_client_certificate() {
    let cluster = Cluster::start(3, &[]);
    cluster.wait_formed();
    cluster.ok(1, &["topic", "create", "open", "-p", "1"]);
    for args in [
        &["cluster", "rebalance"][..],
        &["topic", "reassign", "open", "-p", "0", "--replicas", "2"],
        &["plugin", "deploy", "mirror", "--builtin", "identity", "--kind", "transform", "--input", "open"],
    ] {
        let out = cluster.anonymous(1, args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded anonymously");
        assert!(err.contains("not_authorized: anonymous may not change the cluster or its plugins"), "{err}");
        assert!(err.contains("--client-cert"), "{err}");
    }
    cluster.ok(1, &["cluster", "rebalance"]);
    let out = cluster.produce(1, "open", 0, "all", 30_000, &["anyone".to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
