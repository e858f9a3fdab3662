//! A data directory written by a single node of the releases before the
//! metadata log (topics in `topics.json` without a log id, plugins in
//! `plugins/registry.json`, producer ids in `producer-ids`) opens with
//! nothing lost: its topics, records, transform (and where it got to) and
//! producer ids move into the node's metadata log once, and a second
//! restart finds them there.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::DevNode;
use quiver_client::{Client, ClientConfig};
use quiver_protocol::batch::{BatchBuilder, Compression};

/// Writes what a single node of the previous release left on disk:
/// `orders` (2 partitions, 3 records each, with a retention override),
/// `orders-copy` (empty), a built-in identity transform `copy` from
/// `orders` to `orders-copy` that had processed partition 0 and not
/// partition 1, and producer ids handed out up to 7000.
fn previous_release_layout(data: &Path) {
    let logs = data.join("logs");
    // Recent: the topic keeps a day of records.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    for (topic, partitions, records) in [("orders", 2u32, 3usize), ("orders-copy", 1, 0)] {
        for p in 0..partitions {
            let log = quiver_log::Log::open(&logs.join(format!("{topic}-{p}")), Default::default()).unwrap();
            for i in 0..records {
                let mut b = BatchBuilder::new(Compression::None);
                let value = format!("{topic}-{p}-{i}");
                b.append(now, None, Some(value.as_bytes()), &[]);
                // The single node wrote every batch in leader epoch 0.
                log.append(&b.build(), 0).unwrap();
            }
            log.close().unwrap();
        }
    }
    std::fs::write(
        data.join("topics.json"),
        r#"{
  "topics": [
    { "name": "orders", "partitions": 2, "overrides": { "retention.ms": "86400000" }, "created_ms": 1700000000000 },
    { "name": "orders-copy", "partitions": 1, "overrides": {}, "created_ms": 1700000000001 }
  ]
}"#,
    )
    .unwrap();
    std::fs::write(data.join("producer-ids"), "7000").unwrap();
    let plugins = data.join("plugins");
    for sub in ["blobs", "cache", "progress"] {
        std::fs::create_dir_all(plugins.join(sub)).unwrap();
    }
    std::fs::write(
        plugins.join("registry.json"),
        r#"{
  "plugins": [
    {
      "name": "copy", "version": 3, "kind": "transform", "sha256": "builtin:identity", "abi_version": "0.1.0",
      "size_bytes": 0, "deployed_ms": 1700000000002, "params": [], "input": "orders", "outputs": ["orders-copy"],
      "on_error": "fail", "start": "start", "paused": null
    }
  ]
}"#,
    )
    .unwrap();
    std::fs::write(plugins.join("progress").join("copy.json"), r#"{"0":3}"#).unwrap();
}

fn values(node: &DevNode, topic: &str, partition: &str) -> Vec<String> {
    let out = node.ok(&["topic", "consume", topic, "--partition", partition, "-o", "start:end"]);
    out.lines().map(str::to_owned).collect()
}

#[test]
fn a_single_node_directory_from_before_the_metadata_log_opens_with_everything() {
    let mut node = DevNode::start_prepared(previous_release_layout);
    let data = node.data_dir();
    for check in ["first start", "second start"] {
        assert_eq!(values(&node, "orders", "0"), ["orders-0-0", "orders-0-1", "orders-0-2"], "{check}");
        assert_eq!(values(&node, "orders", "1"), ["orders-1-0", "orders-1-1", "orders-1-2"], "{check}");
        let described: serde_json::Value =
            serde_json::from_str(&node.ok(&["topic", "describe", "orders", "--format", "json"])).unwrap();
        let text = described.to_string();
        assert!(text.contains("86400000"), "{check}: the retention override is kept: {text}");
        // The transform resumes where it was: partition 1's records are
        // copied, partition 0's (processed before) are not copied again.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let copied = values(&node, "orders-copy", "0");
            if copied.len() >= 3 {
                assert_eq!(copied, ["orders-1-0", "orders-1-1", "orders-1-2"], "{check}");
                break;
            }
            assert!(Instant::now() < deadline, "{check}: the transform did not resume: {copied:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
        // Producer ids go on past the ones handed out before.
        let ca = std::fs::read(node.ca()).unwrap();
        let address = node.address();
        let id = tokio::runtime::Runtime::new().unwrap().block_on(async move {
            let client = Client::connect(ClientConfig::new(address, ca)).await.unwrap();
            client.admin().init_producer_id().await.unwrap().producer_id
        });
        assert!(id >= 7000, "{check}: producer id {id} may repeat one handed out before");
        // The files' metadata is in the log now, and the migration is done.
        assert!(!data.join("producer-ids").exists(), "{check}");
        assert!(!data.join("metadata-migration").exists(), "{check}");
        assert!(data.join("logs/orders-1/leader-epochs").exists(), "{check}");
        node.terminate();
        node.spawn();
    }
    // New topics and writes work as on any node.
    node.ok(&["topic", "create", "fresh", "--partitions", "1"]);
    let out = node.produce(&["topic", "produce", "orders", "--partition", "1"], b"after\n");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(values(&node, "orders", "1").last().map(String::as_str), Some("after"));
}
