//! End-to-end tests through the real `quiver` binary: topics, produce and
//! consume with keys, headers and compression, reads by timestamp, and
//! retention while reading.

mod common;

use std::collections::HashMap;

use common::{DevNode, json_lines};
use quiver_client::partitioner::partition_for_key;

fn keyed_input(n: usize) -> Vec<u8> {
    let mut s = String::with_capacity(n * 24);
    for i in 0..n {
        s.push_str(&format!("key-{}\tvalue-{i}\n", i % 1000));
    }
    s.into_bytes()
}

/// Produces `n` keyed records and checks that consuming from the start gives
/// every one, in order per key, in the partition Kafka's partitioner picks,
/// with the header intact.
fn roundtrip(node: &DevNode, topic: &str, n: usize, produce_extra: &[&str]) {
    let mut args = vec!["topic", "produce", topic, "--key-sep", "\\t", "--header", "source=test"];
    args.extend_from_slice(produce_extra);
    let out = node.produce(&args, &keyed_input(n));
    assert!(out.status.success(), "produce failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = node.ok(&["topic", "consume", topic, "-o", "start:end", "--format", "json"]);
    let records = json_lines(&stdout);
    assert_eq!(records.len(), n, "every record comes back exactly once");
    let mut last_index_per_key: HashMap<String, i64> = HashMap::new();
    let mut last_offset_per_partition: HashMap<u64, i64> = HashMap::new();
    for r in &records {
        let key = r["key"].as_str().unwrap().to_string();
        let value = r["value"].as_str().unwrap();
        let index: i64 = value.strip_prefix("value-").unwrap().parse().unwrap();
        let partition = r["partition"].as_u64().unwrap();
        let offset = r["offset"].as_i64().unwrap();
        assert_eq!(partition as u32, partition_for_key(key.as_bytes(), 6), "murmur2 placement for {key}");
        assert_eq!(r["headers"][0]["key"], "source");
        assert_eq!(r["headers"][0]["value"], "test");
        if let Some(prev) = last_offset_per_partition.insert(partition, offset) {
            assert!(offset > prev, "offsets increase within a partition");
        }
        if let Some(prev) = last_index_per_key.insert(key.clone(), index) {
            assert!(index > prev, "records of {key} out of order: {prev} then {index}");
        }
    }
    assert_eq!(last_index_per_key.len(), 1000.min(n));
}

#[test]
fn produce_and_consume_100k_keyed_records() {
    let node = DevNode::start();
    node.ok(&["topic", "create", "orders", "-p", "6"]);
    roundtrip(&node, "orders", 100_000, &[]);
    let described = node.ok(&["topic", "describe", "orders", "--format", "json"]);
    let d: serde_json::Value = serde_json::from_str(&described).unwrap();
    let total: i64 = d["partitions"].as_array().unwrap().iter().map(|p| p["high_watermark"].as_i64().unwrap()).sum();
    assert_eq!(total, 100_000);
}

#[test]
fn compressed_topics_roundtrip() {
    let node = DevNode::start();
    // Producer-side codecs, stored as sent.
    for codec in ["zstd", "lz4"] {
        let topic = format!("by-producer-{codec}");
        node.ok(&["topic", "create", &topic, "-p", "6"]);
        roundtrip(&node, &topic, 20_000, &["--compression", codec]);
    }
    // Topic-side codec: the broker re-encodes uncompressed batches.
    node.ok(&["topic", "create", "by-topic", "-p", "6", "-c", "compression=zstd"]);
    roundtrip(&node, "by-topic", 20_000, &[]);
    let plain_size = size_of(&node, "by-producer-zstd");
    let d: serde_json::Value =
        serde_json::from_str(&node.ok(&["topic", "describe", "by-topic", "--format", "json"])).unwrap();
    assert_eq!(d["configs"]["compression"], "zstd");
    let topic_size: u64 = d["partitions"].as_array().unwrap().iter().map(|p| p["size_bytes"].as_u64().unwrap()).sum();
    assert!(topic_size < plain_size * 2, "broker-side zstd stores compressed batches ({topic_size} vs {plain_size})");
}

fn size_of(node: &DevNode, topic: &str) -> u64 {
    let d: serde_json::Value =
        serde_json::from_str(&node.ok(&["topic", "describe", topic, "--format", "json"])).unwrap();
    d["partitions"].as_array().unwrap().iter().map(|p| p["size_bytes"].as_u64().unwrap()).sum()
}

/// A refused request prints its reason once: the CLI's error chain does not
/// repeat the broker's code and message.
#[test]
fn refusals_say_their_reason_once() {
    let node = DevNode::start();
    node.ok(&["topic", "create", "a"]);
    let refused = |args: &[&str]| node.fails(args);
    assert_eq!(
        refused(&["topic", "create", "t", "-p", "0"]),
        "error: broker refused the request: invalid_partitions: partition count must be between 1 and 10000, not 0\n"
    );
    assert_eq!(
        refused(&["topic", "create", "a"]),
        "error: broker refused the request: topic_already_exists: topic 'a' already exists\n"
    );
    assert_eq!(
        refused(&["topic", "create", "bad/name"]),
        "error: broker refused the request: invalid_topic_name: topic name 'bad/name' contains '/': only ASCII \
         letters, digits, '.', '_' and '-' are allowed\n"
    );
    let err = refused(&["topic", "create", "c", "-c", "retention.hours=1"]);
    assert!(
        err.starts_with(
            "error: broker refused the request: invalid_config: unknown topic config 'retention.hours' (known: "
        ),
        "{err}"
    );
    assert_eq!(err.matches("invalid_config").count(), 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn topic_admin_and_errors() {
    let node = DevNode::start();
    node.ok(&["topic", "create", "a", "-p", "2", "-c", "retention.ms=60000"]);
    node.ok(&["topic", "create", "b"]);
    let list: serde_json::Value = serde_json::from_str(&node.ok(&["topic", "list", "--format", "json"])).unwrap();
    assert_eq!(list, serde_json::json!([{"name": "a", "partitions": 2}, {"name": "b", "partitions": 1}]));
    let err = node.fails(&["topic", "create", "a"]);
    assert!(err.contains("already exists"), "{err}");
    let err = node.fails(&["topic", "create", "bad/name"]);
    assert!(err.contains("'/'"), "{err}");
    let err = node.fails(&["topic", "create", "c", "-c", "retention.hours=1"]);
    assert!(err.contains("unknown topic config 'retention.hours'"), "{err}");
    let err = node.fails(&["topic", "create", "c", "-p", "0"]);
    assert!(err.contains("partition count"), "{err}");
    let err = node.fails(&["topic", "describe", "nope"]);
    assert!(err.contains("'nope' does not exist"), "{err}");
    let out = node.produce(&["topic", "produce", "nope", "--max-block-ms", "500"], b"x\n");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    let out = node.produce(&["topic", "produce", "a", "-p", "5"], b"x\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no partition 5"));
    node.ok(&["topic", "delete", "a"]);
    let list = node.ok(&["topic", "list"]);
    assert!(!list.contains("a\t"), "{list}");
    // Deleted topics stay deleted across a restart.
    let mut node = node;
    assert!(node.terminate().success(), "SIGTERM exits cleanly");
    node.spawn();
    assert_eq!(node.ok(&["topic", "list"]).trim(), "b\t1 partition(s)");
}

#[test]
fn consume_by_timestamp_and_offset() {
    let node = DevNode::start();
    node.ok(&["topic", "create", "t", "-p", "1"]);
    let out = node.produce(&["topic", "produce", "t"], b"first\nsecond\n");
    assert!(out.status.success());
    std::thread::sleep(std::time::Duration::from_millis(50));
    let middle = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let out = node.produce(&["topic", "produce", "t"], b"third\nfourth\n");
    assert!(out.status.success());
    let from_ts = node.ok(&["topic", "consume", "t", "-o", &format!("@{middle}:end")]);
    assert_eq!(from_ts, "third\nfourth\n");
    let from_offset = node.ok(&["topic", "consume", "t", "-o", "1", "-n", "2"]);
    assert_eq!(from_offset, "second\nthird\n");
    let err = node.fails(&["topic", "consume", "t", "-o", "soon"]);
    assert!(err.contains("'soon' is not start"), "{err}");
    let err = node.fails(&["topic", "consume", "t", "-o", "99", "-n", "1"]);
    assert!(err.contains("offset_out_of_range"), "{err}");
}

#[test]
fn retention_deletes_old_segments_while_reading() {
    let node = DevNode::start();
    // Small segments and a byte limit: most segments must go.
    node.ok(&["topic", "create", "r", "-p", "1", "-c", "segment.bytes=4096", "-c", "retention.bytes=16384"]);
    let mut consumer_start = None;
    for round in 0..5 {
        let input: String = (0..500).map(|i| format!("round-{round}-record-{i:05}-padding-padding\n")).collect();
        let out = node.produce(&["topic", "produce", "r", "--batch-bytes", "1024"], input.as_bytes());
        assert!(out.status.success());
        if round == 0 {
            // A reader holds the oldest data while retention runs.
            consumer_start = Some(node.ok(&["topic", "consume", "r", "-o", "start", "-n", "1"]));
        }
    }
    assert_eq!(consumer_start.unwrap(), "round-0-record-00000-padding-padding\n");
    let segments_before = node.segments("r", 0).len();
    assert!(segments_before > 10, "small segments rolled: {segments_before}");
    // The dev node checks retention every minute; restart it with a short
    // interval through the environment override.
    let mut node = node;
    node.terminate();
    let child_env = "QUIVER_STORAGE__RETENTION_CHECK_INTERVAL_MS";
    // dev mode ignores the config file, so exercise retention via `broker`:
    let config = node.dir.path().join("quiver.toml");
    std::fs::write(
        &config,
        format!(
            "[broker]\ndata_dir = \"{}\"\nlisten = \"{}\"\n[storage]\nretention_check_interval_ms = 100\n",
            node.data_dir().display(),
            node.address()
        ),
    )
    .unwrap();
    let mut broker = std::process::Command::new(common::BIN)
        .args(["broker", "--config"])
        .arg(&config)
        .env(child_env, "100")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut described;
    loop {
        described = node.quiver(&["topic", "describe", "r", "--format", "json"]);
        if described.status.success() {
            let d: serde_json::Value = serde_json::from_slice(&described.stdout).unwrap();
            let p = &d["partitions"][0];
            if p["log_start_offset"].as_i64().unwrap() > 0 && p["size_bytes"].as_u64().unwrap() <= 16384 + 8192 {
                assert_eq!(p["high_watermark"].as_i64().unwrap(), 2500);
                break;
            }
        }
        assert!(std::time::Instant::now() < deadline, "retention did not delete segments");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // Reading from the start now begins at the new log start, and the tail
    // is intact.
    let tail = node.ok(&["topic", "consume", "r", "-o", "start:end"]);
    let lines: Vec<_> = tail.lines().collect();
    assert!(lines.len() < 2500 && !lines.is_empty());
    assert_eq!(*lines.last().unwrap(), "round-4-record-00499-padding-padding");
    let err = node.fails(&["topic", "consume", "r", "-o", "0", "-n", "1"]);
    assert!(err.contains("offset_out_of_range"), "{err}");
    broker.kill().unwrap();
    broker.wait().unwrap();
}

/// `quiver certs init` makes a cluster CA and node certificates; running it
/// again with a new node keeps the CA, so the new node's certificate chains
/// to it; a broker serves with a node certificate and clients trust it with
/// the CA; another CA is refused with a clear error.
#[test]
fn certs_init_issues_node_certificates_that_brokers_serve_with() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(common::BIN).args(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let certs_arg = certs.to_str().unwrap();
    let (ok, out, err) = run(&["certs", "init", "--dir", certs_arg, "--nodes", "1,2"]);
    assert!(ok, "{err}");
    assert!(out.contains("created CA") && out.contains("node 1: issued") && out.contains("node 2: issued"), "{out}");
    let ca_before = std::fs::read(certs.join("ca.pem")).unwrap();
    for key in [certs.join("ca.key"), certs.join("node-1/broker.key")] {
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600, "{}", key.display());
    }
    let (ok, out, err) = run(&["certs", "init", "--dir", certs_arg, "--nodes", "1,2,3", "--host", "3=broker3.test"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("kept the existing CA") && out.contains("node 1: kept") && out.contains("node 3: issued"),
        "{out}"
    );
    assert_eq!(std::fs::read(certs.join("ca.pem")).unwrap(), ca_before, "the CA is reused");
    let (ok, _, err) = run(&["certs", "init", "--dir", certs_arg, "--nodes", "1", "--host", "9=x.test"]);
    assert!(!ok && err.contains("node 9 is not in --nodes"), "{err}");

    // Node 3 (added later) serves with its certificate.
    let address = format!("127.0.0.1:{}", common::free_port());
    let config = dir.path().join("node-3.toml");
    std::fs::write(
        &config,
        format!(
            "[broker]\nnode_id = 3\ndata_dir = \"{}\"\nlisten = \"{address}\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            dir.path().join("data-3").display(),
            certs.join("node-3/broker.pem").display(),
            certs.join("node-3/broker.key").display(),
        ),
    )
    .unwrap();
    let mut broker = std::process::Command::new(common::BIN)
        .args(["broker", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ca = certs.join("ca.pem");
    let ca_arg = ca.to_str().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (ok, _, err) = run(&["topic", "create", "t", "--brokers", &address, "--ca", ca_arg]);
        if ok {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the broker never served: {err}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (ok, out, err) = run(&["topic", "list", "--brokers", &address, "--ca", ca_arg]);
    assert!(ok && out.contains('t'), "{out}{err}");
    // A client trusting another cluster's CA is refused.
    let other = dir.path().join("other");
    assert!(run(&["certs", "init", "--dir", other.to_str().unwrap(), "--nodes", "1"]).0);
    let other_ca = other.join("ca.pem");
    let (ok, _, err) = run(&["topic", "list", "--brokers", &address, "--ca", other_ca.to_str().unwrap()]);
    assert!(!ok && err.contains("TLS handshake") && err.contains("CA"), "{err}");
    broker.kill().unwrap();
    broker.wait().unwrap();
}

/// A development node is a cluster of one: the only voter of its own
/// metadata log, healthy, and its cluster commands work.
#[test]
fn a_single_node_is_a_cluster_of_one() {
    let node = DevNode::start();
    node.ok(&["topic", "create", "t", "-p", "2"]);
    let info = node.ok(&["cluster", "info"]);
    assert!(info.contains("cluster: 1 node, controller leader 1"), "{info}");
    assert!(info.contains("voter, controller leader"), "{info}");
    let health = node.ok(&["cluster", "health"]);
    assert!(health.starts_with("healthy: 1 node, 2 partitions"), "{health}");
    node.ok(&["cluster", "rebalance"]);
    // Adding a voter nobody started is refused with the reason.
    let refused = node.fails(&["cluster", "add-voter", "2"]);
    assert!(refused.contains("node 2 does not follow the metadata log yet"), "{refused}");
}
