//! Plugins in a three-node cluster of real `quiver broker` processes: a
//! deployment through one node reaches every node through the metadata log
//! (component included), a transform runs on each input partition's leader
//! and writes its outputs to their leaders with acks=all, a new leader goes
//! on from the committed progress after kill -9, a node that was down while
//! a new version was deployed has it when it returns, serializers apply on
//! every leader, and pause / resume / remove are cluster-wide. A producer
//! that leaves partitioning to the broker reaches every leader through the
//! broker it sent to.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::cluster::Cluster;
use common::json_lines;
use quiver_plugin_host::builder::first_party;

fn plugin(name: &str) -> String {
    first_party(name).expect("build plugin").display().to_string()
}

fn leader_of(p: &serde_json::Value) -> u32 {
    p["leader"].as_u64().map_or(u32::MAX, |l| l as u32)
}

/// `plugin describe NAME` through node `via`, if it has the plugin.
fn describe(cluster: &Cluster, via: u32, name: &str) -> Option<serde_json::Value> {
    let out = cluster.quiver(via, &["plugin", "describe", name, "--format", "json"]);
    out.status.success().then(|| json_lines(&String::from_utf8_lossy(&out.stdout)).remove(0))
}

/// How many times each `id` is in every partition of `topic`, read through
/// node `via` (the client routes to each leader).
fn id_counts(cluster: &Cluster, via: u32, topic: &str) -> BTreeMap<i64, usize> {
    let out = cluster.quiver(via, &["topic", "consume", topic, "-o", "start:end", "--format", "json"]);
    let mut counts = BTreeMap::new();
    if !out.status.success() {
        return counts;
    }
    for r in json_lines(&String::from_utf8_lossy(&out.stdout)) {
        let value: serde_json::Value = serde_json::from_str(r["value"].as_str().unwrap()).unwrap();
        *counts.entry(value["id"].as_i64().unwrap()).or_default() += 1;
    }
    counts
}

fn orders(ids: impl Iterator<Item = i64>) -> Vec<String> {
    ids.map(|id| format!("{{\"id\":{id},\"amount\":{}}}", id % 200)).collect()
}

#[test]
fn plugins_live_in_the_metadata_log_and_transforms_follow_their_leaders() {
    let filter = plugin("json-filter");
    let schema = plugin("json-schema");
    let mut cluster = Cluster::start(
        3,
        &[("QUIVER_CLUSTER__REPLICA_LAG_TIME_MAX_MS", "2000"), ("QUIVER_CLUSTER__LEADER_REBALANCE_INTERVAL_MS", "0")],
    );
    cluster.wait_formed();
    cluster.ok(1, &["topic", "create", "orders", "-p", "3", "-r", "3", "-c", "min.insync.replicas=2"]);
    cluster.ok(1, &["topic", "create", "big", "-p", "2", "-r", "3", "-c", "min.insync.replicas=2"]);
    // One replica: two of the three input leaders write their dead letters
    // to another broker.
    cluster.ok(1, &["topic", "create", "dlq", "-p", "1", "-r", "1"]);

    // Deployed through node 1; every node has it, with the same component.
    let deploy = |cluster: &Cluster, via: u32, threshold: &str| {
        cluster.ok(
            via,
            &[
                "plugin",
                "deploy",
                "big-orders",
                &filter,
                "--kind",
                "transform",
                "--input",
                "orders",
                "--output",
                "big",
                "--param",
                "field=amount",
                "--param",
                "op=gt",
                "--param",
                &format!("value={threshold}"),
                "--on-error",
                "dead-letter=dlq",
            ],
        )
    };
    let out = deploy(&cluster, 1, "100");
    assert!(out.contains("version 1"), "{out}");
    let sha = describe(&cluster, 1, "big-orders").unwrap()["sha256"].clone();
    for n in 1..=3 {
        cluster.wait_for("the deployment on every node", Duration::from_secs(20), || {
            describe(&cluster, n, "big-orders").is_some_and(|d| d["version"] == 1 && d["sha256"] == sha)
        });
    }

    // Input through each partition's leader (acks=all), one bad record per
    // partition.
    let partitions = cluster.partitions(1, "orders");
    let mut sent: Vec<i64> = Vec::new();
    for (p, part) in partitions.iter().enumerate() {
        let ids = (p as i64 * 1000)..(p as i64 * 1000 + 200);
        let mut values = orders(ids.clone());
        values.push("not json".into());
        let out = cluster.produce(leader_of(part), "orders", p as u32, "all", 30_000, &values);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        sent.extend(ids);
    }
    let wanted = |sent: &[i64]| {
        let mut ids: Vec<i64> = sent.iter().copied().filter(|id| id % 200 > 100).collect();
        ids.sort();
        ids
    };
    cluster.wait_for("every input transformed", Duration::from_secs(30), || {
        id_counts(&cluster, 2, "big").keys().copied().collect::<Vec<_>>() == wanted(&sent)
    });
    cluster.wait_for("three dead letters", Duration::from_secs(30), || {
        cluster.values(leader_of(&cluster.partitions(1, "dlq")[0]), "dlq", 0).is_some_and(|v| v.len() == 3)
    });
    assert!(id_counts(&cluster, 3, "big").values().all(|n| *n == 1), "no duplicates without failures");
    // Through any node, describe shows every input partition's lag (the
    // CLI asks the partitions' leaders for their high watermarks).
    for n in 1..=3 {
        cluster.wait_for("every partition's lag at 0", Duration::from_secs(20), || {
            let progress = describe(&cluster, n, "big-orders").unwrap()["progress"].as_array().unwrap().clone();
            progress.len() == 3 && progress.iter().all(|p| p["lag"] == 0 && p["high_watermark"] == 201)
        });
    }

    // The leader of orders-0 dies; the new leader goes on from the progress
    // committed to the metadata log.
    let victim = leader_of(&partitions[0]);
    let survivor = victim % 3 + 1;
    cluster.kill9(victim);
    let mut new_leader = u32::MAX;
    cluster.wait_for("a new leader for orders-0", Duration::from_secs(20), || {
        new_leader = cluster.partitions(survivor, "orders").first().map_or(u32::MAX, leader_of);
        new_leader != victim && new_leader != u32::MAX
    });
    let more: Vec<i64> = (500..700).collect();
    let out = cluster.produce(new_leader, "orders", 0, "all", 30_000, &orders(more.iter().copied()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    sent.extend(&more);
    let mut counts = BTreeMap::new();
    cluster.wait_for("the new leader transforming", Duration::from_secs(30), || {
        counts = id_counts(&cluster, survivor, "big");
        counts.keys().copied().collect::<Vec<_>>() == wanted(&sent)
    });
    // At-least-once: what the dead leader did after its last commit (at
    // most a second) may be done twice; nothing is skipped.
    let repeated = counts.values().filter(|n| **n > 1).count();
    eprintln!("after the failover: {repeated} of {} outputs written twice", counts.len());
    assert!(repeated <= 100, "{repeated} outputs repeated");

    // A new version while the victim is down: it gets it on return, from
    // the metadata log alone.
    let out = deploy(&cluster, survivor, "150");
    assert!(out.contains("version 2"), "{out}");
    cluster.start_node(victim);
    cluster.wait_for("the returning node on version 2", Duration::from_secs(30), || {
        describe(&cluster, victim, "big-orders").is_some_and(|d| d["version"] == 2 && d["state"] == "running")
    });
    let log = cluster.node_log(victim);
    assert!(log.contains("plugin loaded from the metadata log"), "{log}");

    // A serializer deployed through one node applies on every leader.
    let rule = r#"schema={"type":"object","required":["id"],"properties":{"id":{"type":"integer","minimum":1}}}"#;
    cluster.ok(2, &["plugin", "deploy", "ids", &schema, "--kind", "serializer", "--param", rule]);
    cluster.ok(3, &["topic", "create", "users", "-p", "3", "-r", "3", "-c", "value.serializer=ids"]);
    for (p, part) in cluster.partitions(1, "users").iter().enumerate() {
        let leader = leader_of(part);
        let bad = cluster.produce(leader, "users", p as u32, "all", 30_000, &["{\"id\":0}".to_string()]);
        let stderr = String::from_utf8_lossy(&bad.stderr);
        assert!(!bad.status.success() && stderr.contains("rejected by serializer 'ids'"), "node {leader}: {stderr}");
        let good = cluster.produce(leader, "users", p as u32, "all", 30_000, &["{\"id\":7}".to_string()]);
        assert!(good.status.success(), "{}", String::from_utf8_lossy(&good.stderr));
        assert_eq!(cluster.values(leader, "users", p as u32).unwrap(), ["{\"id\":7}"]);
    }

    // Pause, resume and remove are cluster-wide.
    cluster.ok(3, &["plugin", "pause", "big-orders"]);
    for n in 1..=3 {
        cluster.wait_for("paused everywhere", Duration::from_secs(10), || {
            describe(&cluster, n, "big-orders").is_some_and(|d| d["state"] == "paused")
        });
    }
    cluster.ok(1, &["plugin", "resume", "big-orders"]);
    assert_eq!(describe(&cluster, 1, "big-orders").unwrap()["state"], "running");
    let err = cluster.fails(1, &["plugin", "remove", "ids"]);
    assert!(err.contains("named by the config of topic(s) users"), "{err}");
    cluster.ok(2, &["plugin", "remove", "big-orders"]);
    for n in 1..=3 {
        cluster
            .wait_for("removed everywhere", Duration::from_secs(10), || describe(&cluster, n, "big-orders").is_none());
    }
    let err = cluster.fails(3, &["plugin", "describe", "big-orders"]);
    assert!(err.contains("not deployed"), "{err}");
}

/// `--broker-partitioning` sends every record to one broker, which runs the
/// topic's partitioner and forwards the shares of partitions it does not
/// lead to their leaders: the records land exactly where client-side
/// partitioning puts them, each once. A record the partitioner refuses
/// fails its batch and nothing of it is stored anywhere.
#[test]
fn broker_side_partitioning_forwards_shares_to_their_leaders() {
    let partitioner = plugin("json-field-partitioner");
    let cluster = Cluster::start(3, &[("QUIVER_CLUSTER__LEADER_REBALANCE_INTERVAL_MS", "0")]);
    cluster.wait_formed();
    let deploy =
        ["plugin", "deploy", "by-customer", &partitioner, "--kind", "partitioner", "--param", "field=customer"];
    cluster.ok(1, &deploy);
    for topic in ["client-side", "broker-side"] {
        cluster.ok(1, &["topic", "create", topic, "-p", "6", "-r", "2", "-c", "partitioner=by-customer"]);
    }
    let leaders: std::collections::BTreeSet<u32> = cluster.partitions(1, "broker-side").iter().map(leader_of).collect();
    assert_eq!(leaders.len(), 3, "every node leads a partition: {leaders:?}");

    let values: Vec<String> = (0..600).map(|n| format!("{{\"customer\":\"c{}\",\"n\":{n}}}", n % 37)).collect();
    for (topic, flag) in [("client-side", None), ("broker-side", Some("--broker-partitioning"))] {
        let mut args = vec!["--acks", "all"];
        args.extend(flag);
        let out = cluster.produce_args(1, topic, &args, &values);
        assert!(out.status.success(), "{topic}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let stored = |topic: &str| -> Vec<Vec<String>> {
        (0..6).map(|p| cluster.values(2, topic, p).unwrap_or_else(|| panic!("read {topic}-{p}"))).collect()
    };
    let broker_side = stored("broker-side");
    assert_eq!(broker_side, stored("client-side"), "the same records in the same partitions, in the same order");
    assert_eq!(broker_side.iter().map(Vec::len).sum::<usize>(), 600, "every record once");
    for (p, values) in broker_side.iter().enumerate() {
        for v in values {
            let v: serde_json::Value = serde_json::from_str(v).unwrap();
            let customer = v["customer"].as_str().unwrap();
            assert_eq!(quiver_client::partitioner::partition_for_key(customer.as_bytes(), 6), p as u32, "{v}");
        }
    }

    // One record without the field: the whole batch is refused, on every leader.
    let mut bad = values[..50].to_vec();
    bad.push("{\"customer\":{}}".into());
    let out = cluster.produce_args(
        1,
        "broker-side",
        &["--acks", "all", "--broker-partitioning", "--linger-ms", "1000"],
        &bad,
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("rejected by partitioner 'by-customer'"), "{stderr}");
    assert_eq!(stored("broker-side"), broker_side, "nothing of the refused batch was stored");
}

/// A stateful transform (the aggregate plugin) in a three-node cluster: the
/// leader of an input partition is killed while it works; the new leader
/// rebuilds the store from `totals-state` (led by whichever broker) and goes
/// on. No input is lost or counted twice, on the outputs or in the
/// changelog; the returning node takes its share back just as exactly.
#[test]
fn a_stateful_transform_survives_a_leader_failover_with_exact_totals() {
    use common::totals::Inputs;
    let aggregate = plugin("aggregate");
    let mut cluster = Cluster::start(
        3,
        &[("QUIVER_CLUSTER__REPLICA_LAG_TIME_MAX_MS", "2000"), ("QUIVER_CLUSTER__LEADER_REBALANCE_INTERVAL_MS", "0")],
    );
    cluster.wait_formed();
    for topic in ["payments", "spend"] {
        cluster.ok(1, &["topic", "create", topic, "-p", "2", "-r", "3", "-c", "min.insync.replicas=2"]);
    }
    let args = ["--input", "payments", "--output", "spend", "--param", "field=amount"];
    cluster.ok(2, &[&["plugin", "deploy", "totals", &aggregate, "--kind", "transform"][..], &args].concat());
    let state = cluster.partitions(3, "totals-state");
    assert_eq!(state.len(), 2, "{state:?}");
    assert!(state.iter().all(|p| p["replicas"].as_array().unwrap().len() == 3), "{state:?}");

    let mut inputs = Inputs::default();
    let send = |cluster: &Cluster, inputs: &mut Inputs, via: u32, partition: u32, round: u32| {
        let values: Vec<String> = (0..2000u32)
            .map(|i| {
                let key = format!("p{partition}-k{}", (i + round) % 40);
                let amount = i64::from(i % 11) - 2;
                inputs.push(&key, amount);
                format!("{key}\t{{\"amount\":{amount}}}")
            })
            .collect();
        let p = partition.to_string();
        let args = ["-p", &p, "--acks", "all", "--timeout-ms", "30000", "--key-sep", "\\t"];
        let out = cluster.produce_args(via, "payments", &args, &values);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    let exact = |cluster: &Cluster, via: u32, inputs: &Inputs| -> Result<usize, String> {
        let read = |topic: &str| {
            let out = cluster.quiver(via, &["topic", "consume", topic, "-o", "start:end", "--format", "json"]);
            json_lines(&String::from_utf8_lossy(&out.stdout))
        };
        let repeated = inputs.check_outputs(&read("spend"))?;
        inputs.check_state(&read("totals-state"))?;
        Ok(repeated)
    };
    let partitions = cluster.partitions(1, "payments");
    for (p, part) in partitions.iter().enumerate() {
        send(&cluster, &mut inputs, leader_of(part), p as u32, 0);
    }
    cluster.wait_for("exact totals", Duration::from_secs(60), || exact(&cluster, 1, &inputs).is_ok());

    // More input, and the leader of payments-0 dies while it works on it.
    let victim = leader_of(&partitions[0]);
    let survivor = victim % 3 + 1;
    send(&cluster, &mut inputs, victim, 0, 1);
    cluster.kill9(victim);
    let mut new_leader = u32::MAX;
    cluster.wait_for("a new leader for payments-0", Duration::from_secs(20), || {
        new_leader = cluster.partitions(survivor, "payments").first().map_or(u32::MAX, leader_of);
        new_leader != victim && new_leader != u32::MAX
    });
    send(&cluster, &mut inputs, new_leader, 0, 2);
    let p1 = cluster.partitions(survivor, "payments").get(1).map_or(u32::MAX, leader_of);
    send(&cluster, &mut inputs, p1, 1, 2);
    let mut result = Err(String::new());
    cluster.wait_for("exact totals after the failover", Duration::from_secs(60), || {
        result = exact(&cluster, survivor, &inputs);
        result.is_ok()
    });
    let repeated = result.unwrap();
    eprintln!("after the failover: {repeated} of the outputs repeated");
    let log = cluster.node_log(new_leader);
    assert!(!log.is_empty());

    // The victim returns; once it leads its partitions again (a preferred
    // election), it rebuilds from the changelog and goes on exactly.
    cluster.start_node(victim);
    cluster.wait_for("the victim back in every ISR", Duration::from_secs(30), || {
        cluster
            .partitions(survivor, "totals-state")
            .iter()
            .chain(&cluster.partitions(survivor, "payments"))
            .all(|p| p["isr"].as_array().is_some_and(|isr| isr.len() == 3))
    });
    cluster.ok(survivor, &["cluster", "rebalance"]);
    let partitions = cluster.partitions(survivor, "payments");
    for (p, part) in partitions.iter().enumerate() {
        send(&cluster, &mut inputs, leader_of(part), p as u32, 3);
    }
    let mut result = Err(String::new());
    cluster.wait_for("exact totals after the return", Duration::from_secs(60), || {
        result = exact(&cluster, victim, &inputs);
        result.is_ok()
    });
    eprintln!("in all: {} outputs repeated", result.unwrap());
}
