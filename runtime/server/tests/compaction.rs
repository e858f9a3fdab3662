//! Compacted topics through the real binary: a changelog of 1,000,000
//! updates over 10,000 keys compacts to one record per key, a consumer from
//! the start sees each key's latest value, tombstoned keys disappear after
//! `delete.retention.ms`; kill -9 during a clean loses no latest value; bad
//! input (keyless records, bad configs, compacting a plain topic) gets a
//! clear error and changes nothing.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{DevNode, json_lines};
use quiver_client::{Client, ConsumerConfig, OffsetSpec, ProducerConfig, ProducerRecord};

const KEYS: usize = 10_000;

/// Every key's latest value (`None`: a tombstone, still readable).
type Table = BTreeMap<String, Option<String>>;

/// Produces `rounds` updates of every key, the value naming the round.
async fn produce_rounds(client: &Client, topic: &str, rounds: std::ops::Range<usize>, model: &mut Table) {
    let producer = client.producer(ProducerConfig { linger: Duration::from_millis(5), ..ProducerConfig::default() });
    let topic: std::sync::Arc<str> = topic.into();
    let mut deliveries = Vec::new();
    for round in rounds {
        for k in 0..KEYS {
            let (key, value) = (format!("customer-{k:05}"), format!("{{\"id\":{k},\"round\":{round}}}"));
            let record = ProducerRecord::new(topic.clone(), value.clone()).key(key.clone());
            deliveries.push(producer.send(record).await.unwrap());
            model.insert(key, Some(value));
        }
        if deliveries.len() > 200_000 {
            for d in deliveries.drain(..) {
                d.await.unwrap();
            }
        }
    }
    for d in deliveries {
        d.await.unwrap();
    }
}

async fn delete_keys(client: &Client, topic: &str, keys: std::ops::Range<usize>, model: &mut Table) {
    let producer = client.producer(ProducerConfig::default());
    let mut deliveries = Vec::new();
    for k in keys {
        let key = format!("customer-{k:05}");
        deliveries.push(producer.send(ProducerRecord::tombstone(topic.to_string(), key.clone())).await.unwrap());
        model.insert(key, None);
    }
    for d in deliveries {
        d.await.unwrap();
    }
}

/// Reads the topic from the start up to its high watermarks as of now and
/// replays it into a table; also returns how many records it read.
async fn read_table(client: &Client, topic: &str) -> (Table, usize) {
    let ends = high_watermarks(client, topic).await;
    let mut consumer = client.consumer(ConsumerConfig::default());
    consumer.assign(topic, None, OffsetSpec::Earliest).await.unwrap();
    let mut table = Table::new();
    let mut read = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while ends.iter().any(|(p, end)| consumer.position(topic, *p).unwrap_or(0) < *end) {
        assert!(Instant::now() < deadline, "reading {topic} stalled");
        for r in consumer.poll().await.unwrap() {
            if r.offset >= ends[&r.partition] {
                continue;
            }
            let text = |b: Option<&[u8]>| b.map(|b| String::from_utf8(b.to_vec()).unwrap());
            table.insert(text(r.key.as_deref()).expect("every record has a key"), text(r.value.as_deref()));
            read += 1;
        }
    }
    (table, read)
}

/// Each partition's high watermark.
async fn high_watermarks(client: &Client, topic: &str) -> HashMap<u32, i64> {
    let described = client.admin().describe_topics(Some(vec![topic.into()])).await.unwrap();
    described[0].partitions.iter().map(|p| (p.partition, p.high_watermark)).collect()
}

/// Connects to a restarted node once every partition's high watermark is
/// back to `before` (it starts at 0 until the node leads the partition
/// again; a table read before that would be empty).
async fn reconnect(node: &DevNode, topic: &str, before: &HashMap<u32, i64>) -> Client {
    let client = Client::connect(node.client_config()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while high_watermarks(&client, topic).await != *before {
        assert!(Instant::now() < deadline, "{topic}'s high watermarks did not come back to {before:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client
}

fn compact(node: &DevNode, topic: &str) -> Vec<serde_json::Value> {
    let out = node.ok(&["topic", "compact", topic, "--format", "json"]);
    serde_json::from_str::<Vec<serde_json::Value>>(&out).unwrap()
}

fn describe(node: &DevNode, topic: &str) -> serde_json::Value {
    json_lines(&node.ok(&["topic", "describe", topic, "--format", "json"])).remove(0)
}

fn sum(rows: &[serde_json::Value], field: &str) -> u64 {
    rows.iter().map(|r| r[field].as_u64().unwrap()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changelog_compacts_to_one_record_per_key_and_tombstones_expire() {
    // The background cleaner is off: this test decides when cleans happen.
    let mut node = DevNode::start_with_env(&[("QUIVER_STORAGE__CLEANER_THREADS", "0")]);
    node.ok(&[
        "topic",
        "create",
        "profiles",
        "-p",
        "3",
        "-c",
        "cleanup.policy=compact",
        "-c",
        "segment.bytes=1048576",
        "-c",
        "delete.retention.ms=3000",
    ]);
    node.ok(&["topic", "create", "plain", "-p", "1"]);

    // Bad input first: clear errors, nothing stored.
    let err = node.fails(&["topic", "create", "bad", "-c", "cleanup.policy=shred"]);
    assert!(err.contains("is not compact, delete or compact,delete"), "{err}");
    let err = node.fails(&["topic", "create", "bad", "-c", "min.cleanable.dirty.ratio=2"]);
    assert!(err.contains("between 0 and 1"), "{err}");
    let out = node.produce(&["topic", "produce", "profiles", "--timeout-ms", "5000"], b"no key here\n");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid_record") && err.contains("has no key"), "{err}");
    let err = node.fails(&["topic", "compact", "plain"]);
    assert!(err.contains("is not compacted") && err.contains("cleanup.policy=compact"), "{err}");
    let err = node.fails(&["topic", "compact", "nope"]);
    assert!(err.contains("does not exist"), "{err}");
    let described = describe(&node, "profiles");
    assert!(described["partitions"].as_array().unwrap().iter().all(|p| p["high_watermark"] == 0), "{described}");

    // 1,000,000 updates over 10,000 keys, then 100 deletions.
    let client = Client::connect(node.client_config()).await.unwrap();
    let mut model = Table::new();
    produce_rounds(&client, "profiles", 0..100, &mut model).await;
    delete_keys(&client, "profiles", 0..100, &mut model).await;
    let described = describe(&node, "profiles");
    for p in described["partitions"].as_array().unwrap() {
        let c = &p["compaction"];
        assert!(c["dirty_ratio"].as_f64().unwrap() > 0.9, "nothing cleaned yet: {p}");
        assert!(c["last_clean_ms"].is_null(), "{p}");
    }

    let rows = compact(&node, "profiles");
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(rows.iter().all(|r| r["cleaned"] == true), "{rows:?}");
    assert_eq!(sum(&rows, "records_before"), 1_000_100);
    assert_eq!(sum(&rows, "records_after"), KEYS as u64, "one record per key (100 of them tombstones)");
    let (before, after) = (sum(&rows, "bytes_before"), sum(&rows, "bytes_after"));
    assert!(after * 50 < before, "{before} bytes cleaned to {after}");

    let (table, read) = read_table(&client, "profiles").await;
    assert_eq!(read, KEYS, "a consumer from the start reads one record per key");
    assert_eq!(table, model, "each key's latest value, deletions as tombstones");
    // Groups are formed by input size: the next pass merges the small
    // cleaned segments.
    compact(&node, "profiles");
    let described = describe(&node, "profiles");
    for p in described["partitions"].as_array().unwrap() {
        assert_eq!(p["compaction"]["dirty_ratio"], 0.0, "{p}");
        assert!(p["compaction"]["last_clean_ms"].as_i64().unwrap() > 0, "{p}");
        assert!(p["segments"].as_u64().unwrap() <= 2, "cleaned segments merge: {p}");
    }
    let text = node.ok(&["topic", "describe", "profiles"]);
    assert!(text.contains("dirty_ratio\tlast_clean") && text.contains("s ago"), "{text}");

    // After delete.retention.ms the tombstones go at the next clean.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    produce_rounds(&client, "profiles", 100..101, &mut model).await;
    let rows = compact(&node, "profiles");
    assert_eq!(sum(&rows, "records_after"), KEYS as u64, "{rows:?}");
    let (table, _) = read_table(&client, "profiles").await;
    assert_eq!(table, model, "deleted keys were written again by round 100");
    delete_keys(&client, "profiles", 0..100, &mut model).await;
    compact(&node, "profiles");
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let rows = compact(&node, "profiles");
    assert_eq!(sum(&rows, "records_after"), (KEYS - 100) as u64, "expired tombstones dropped: {rows:?}");
    model.retain(|_, v| v.is_some());
    let (table, read) = read_table(&client, "profiles").await;
    assert_eq!((table.len(), read), (KEYS - 100, KEYS - 100));
    assert_eq!(table, model);

    // The compacted log survives a kill -9 as it is.
    let before = high_watermarks(&client, "profiles").await;
    node.kill9();
    node.spawn();
    let client = reconnect(&node, "profiles", &before).await;
    let (table, _) = read_table(&client, "profiles").await;
    assert_eq!(table, model);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_clean_loses_no_latest_value() {
    // The cleaner's reads throttled to 10 MB/s: a clean of the ~15 MB each
    // round writes takes seconds, so the kills land in its middle.
    let mut node = DevNode::start_with_env(&[
        ("QUIVER_STORAGE__CLEANER_THREADS", "0"),
        ("QUIVER_STORAGE__CLEANER_IO_BYTES_PER_SECOND", "10000000"),
    ]);
    node.ok(&["topic", "create", "ledger", "-c", "cleanup.policy=compact", "-c", "segment.bytes=1048576"]);
    let mut model = Table::new();
    // Each round's clean reads its input twice (key map, then copy) at
    // 10 MB/s: 2.2 s and 6 s land in the copy of rounds 0 and 2 (round 1's
    // clean has round 0's uncleaned data to map too), 0.9 s in a key map.
    let delays_ms = [2_200u64, 900, 6_000];
    let (mut cut_mid_clean, mut cut_while_writing) = (0, 0);
    for (round, delay) in delays_ms.into_iter().enumerate() {
        let client = Client::connect(node.client_config()).await.unwrap();
        produce_rounds(&client, "ledger", round * 30..round * 30 + 30, &mut model).await;
        let before = high_watermarks(&client, "ledger").await;
        drop(client);
        // A clean of ~300,000 records (plus what earlier rounds left), cut
        // by kill -9 part way.
        let mut compact =
            node.command(&["topic", "compact", "ledger"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(delay));
        let finished = compact.try_wait().unwrap().is_some();
        node.kill9();
        let _ = compact.wait();
        let leftovers = std::fs::read_dir(node.data_dir().join("logs/ledger-0"))
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name().into_string().unwrap();
                name.ends_with(".cleaned") || name.ends_with(".swap")
            })
            .count();
        // The command returns once the clean is done: still running, the
        // broker was killed in the middle of it (a `.cleaned` or `.swap`
        // file left behind says it was writing or swapping segments).
        if !finished {
            cut_mid_clean += 1;
            cut_while_writing += usize::from(leftovers > 0);
        }
        eprintln!(
            "round {round}: killed {delay} ms into `topic compact`, finished: {finished}, files left: {leftovers}"
        );
        node.spawn();
        let client = reconnect(&node, "ledger", &before).await;
        let (table, _) = read_table(&client, "ledger").await;
        assert_eq!(table, model, "round {round}: every key's latest value survives");
    }
    assert!(cut_mid_clean > 0, "no kill landed during a clean (delays {delays_ms:?}); the test proves nothing");
    assert!(cut_while_writing > 0, "no kill landed while cleaned segments were written or swapped");
    // A clean after the restarts finishes the job.
    let rows = compact(&node, "ledger");
    assert_eq!(sum(&rows, "records_after"), KEYS as u64, "{rows:?}");
    let client = Client::connect(node.client_config()).await.unwrap();
    let (table, read) = read_table(&client, "ledger").await;
    assert_eq!((table, read), (model, KEYS));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_cleaner_compacts_a_dirty_log_and_the_offsets_topic() {
    let node = DevNode::start_with_env(&[
        ("QUIVER_STORAGE__CLEANER_BACKOFF_MS", "100"),
        ("QUIVER_GROUPS__OFFSETS_TOPIC_PARTITIONS", "1"),
    ]);
    node.ok(&["topic", "create", "state", "-c", "cleanup.policy=compact", "-c", "segment.bytes=65536"]);
    let client = Client::connect(node.client_config()).await.unwrap();
    let mut model = Table::new();
    let producer = client.producer(ProducerConfig::default());
    for round in 0..200 {
        for k in 0..100 {
            let (key, value) = (format!("k{k}"), format!("{round}"));
            producer.send(ProducerRecord::new("state", value.clone()).key(key.clone())).await.unwrap();
            model.insert(key, Some(value));
        }
    }
    producer.flush().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let described = describe(&node, "state");
        let p = &described["partitions"][0];
        if !p["compaction"]["last_clean_ms"].is_null() && p["size_bytes"].as_u64().unwrap() < 200_000 {
            break;
        }
        assert!(Instant::now() < deadline, "the background cleaner did not clean: {p}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (table, read) = read_table(&client, "state").await;
    assert_eq!(table, model);
    assert!(read < 20_000, "compacted: {read} records read");

    // The offsets topic is compacted too: it keeps the latest commit.
    node.ok(&["topic", "consume", "state", "--group", "g", "-o", "start", "-n", "1", "--format", "json"]);
    let described = describe(&node, "__consumer_offsets");
    let configs = &described["configs"];
    assert_eq!(configs["cleanup.policy"], "compact", "{described}");
}
