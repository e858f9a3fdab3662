//! A compacted topic on a 3-node cluster: every replica compacts on its own
//! (`topic compact` and the background cleaner), the leader is killed with
//! kill -9, a compacted follower becomes leader and the old leader catches
//! up from a compacted log with holes. In the end every replica, read from
//! its own files, holds the same key→value view: the latest value of each
//! key, deletions as tombstones.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::cluster::Cluster;
use quiver_protocol::batch::{self, Batches};

const TOPIC: &str = "profiles";

type Table = BTreeMap<String, Option<String>>;

/// Produces `rounds` updates of `keys` keys through node `via`, then
/// deletes `deleted` of them (as tombstones), acks=all.
fn produce(
    cluster: &Cluster,
    via: u32,
    rounds: std::ops::Range<usize>,
    keys: usize,
    deleted: usize,
    model: &mut Table,
) {
    let mut lines = Vec::new();
    for round in rounds {
        for k in 0..keys {
            let (key, value) = (format!("user-{k:04}"), format!("r{round}"));
            lines.push(format!("{key}:{value}"));
            model.insert(key, Some(value));
        }
    }
    for k in 0..deleted {
        let key = format!("user-{k:04}");
        lines.push(format!("{key}:NULL"));
        model.insert(key, None);
    }
    let out = cluster.produce_args(via, TOPIC, &["--key-sep", ":", "--null-marker", "NULL", "--acks", "all"], &lines);
    assert!(out.status.success(), "produce via {via}: {}", String::from_utf8_lossy(&out.stderr));
}

fn leader(cluster: &Cluster, via: u32) -> Option<u32> {
    cluster.partitions(via, TOPIC).first().and_then(|p| p["leader"].as_u64()).map(|l| l as u32)
}

fn compact(cluster: &Cluster, via: u32) -> Vec<serde_json::Value> {
    let out = cluster.ok(via, &["topic", "compact", TOPIC, "--format", "json"]);
    serde_json::from_str(&out).unwrap()
}

/// The table node `node`'s replica holds, read from its own segment files
/// (the node must be stopped).
fn replica_table(cluster: &Cluster, node: u32) -> (Table, usize) {
    let dir = cluster.dir.path().join(format!("node-{node}/logs/{TOPIC}-0"));
    let log = quiver_log::Log::open(&dir, quiver_log::LogConfig::default()).unwrap();
    let (mut next, end) = (log.log_start_offset(), log.log_end_offset());
    let (mut table, mut records) = (Table::new(), 0);
    while next < end {
        let bytes = log.read(next, 1 << 20, end).unwrap();
        assert!(!bytes.is_empty(), "node {node}: nothing to read at {next} below its end {end}");
        for item in Batches::new(bytes) {
            let (header, batch) = item.unwrap();
            next = header.next_offset();
            for r in batch::decode_records(&batch).unwrap() {
                let text = |b: Option<&[u8]>| b.map(|b| String::from_utf8(b.to_vec()).unwrap());
                table.insert(text(r.key.as_deref()).unwrap(), text(r.value.as_deref()));
                records += 1;
            }
        }
    }
    (table, records)
}

#[test]
fn replicas_compact_independently_and_converge_across_a_leader_kill() {
    let mut cluster = Cluster::start(3, &[("QUIVER_STORAGE__CLEANER_BACKOFF_MS", "200")]);
    cluster.wait_formed();
    cluster.ok(
        1,
        &[
            "topic",
            "create",
            TOPIC,
            "-r",
            "3",
            "-c",
            "cleanup.policy=compact",
            "-c",
            "segment.bytes=65536",
            "-c",
            "min.cleanable.dirty.ratio=0.2",
        ],
    );
    let mut model = Table::new();
    produce(&cluster, 1, 0..40, 500, 50, &mut model);
    let rows = compact(&cluster, 1);
    assert_eq!(rows.len(), 3, "one answer per replica: {rows:?}");
    for r in &rows {
        // A follower cleans below the high watermark it knows, which may
        // trail the leader's by a fetch.
        assert_eq!(r["cleaned"], true, "{r}");
        let after = r["records_after"].as_u64().unwrap();
        assert!((500..2_000).contains(&after), "each replica keeps about one record per key: {r}");
    }

    // kill -9 of the leader; a compacted follower takes over.
    let old = leader(&cluster, 1).expect("a leader");
    cluster.kill9(old);
    let via = if old == 1 { 2 } else { 1 };
    cluster.wait_for("a new leader", Duration::from_secs(30), || leader(&cluster, via).is_some_and(|l| l != old));
    produce(&cluster, via, 40..60, 500, 100, &mut model);
    // The background cleaner compacts the survivors on its own.
    cluster.wait_for("a background clean on the survivors", Duration::from_secs(60), || {
        cluster.partitions(via, TOPIC).first().is_some_and(|p| p["size_bytes"].as_u64().unwrap_or(u64::MAX) < 200_000)
    });

    // The old leader comes back, truncates if it must, and copies the
    // compacted log (holes and all) until it is in sync again.
    cluster.start_node(old);
    cluster.wait_for("the old leader back in sync", Duration::from_secs(60), || {
        cluster.partitions(via, TOPIC).first().is_some_and(|p| p["isr"].as_array().is_some_and(|isr| isr.len() == 3))
    });
    produce(&cluster, via, 60..61, 500, 0, &mut model);
    // A replica cleans only below the high watermark it knows: a follower
    // learns it with its next fetch.
    let hw = |id: u32| cluster.partitions(id, TOPIC).first().and_then(|p| p["high_watermark"].as_i64());
    cluster.wait_for("every replica to know the high watermark", Duration::from_secs(30), || {
        (1..=3).all(|id| hw(id) == hw(via))
    });
    let last = compact(&cluster, via);
    let values = cluster.ok(via, &["topic", "consume", TOPIC, "-o", "start:end", "--format", "json"]);
    let mut consumed = Table::new();
    for r in common::json_lines(&values) {
        consumed.insert(r["key"].as_str().unwrap().to_string(), r["value"].as_str().map(str::to_string));
    }
    assert_eq!(consumed, model, "a consumer from the start sees every key's latest value");

    let described: Vec<String> = (1..=3).map(|id| format!("{:?}", cluster.partitions(id, TOPIC))).collect();
    for id in 1..=3 {
        cluster.kill9(id);
    }
    let listing = |id: u32| {
        let dir = cluster.dir.path().join(format!("node-{id}/logs/{TOPIC}-0"));
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                format!("{} {}", e.file_name().to_string_lossy(), e.metadata().unwrap().len())
            })
            .collect();
        files.sort();
        let rp = std::fs::read_to_string(dir.join("recovery-point")).unwrap_or_default();
        let cp = std::fs::read_to_string(dir.join("cleaner-checkpoint")).unwrap_or_default();
        format!("{files:?} recovery-point {rp} checkpoint {cp}")
    };
    let views: Vec<(Table, usize)> = (1..=3).map(|id| replica_table(&cluster, id)).collect();
    for (id, (table, records)) in views.iter().enumerate() {
        assert_eq!(table, &model, "node {}: its replica's key→value view", id + 1);
        assert!(
            *records < 2_000,
            "node {}: {records} records left: compacted; last compact: {last:?}; {}; {described:?}",
            id + 1,
            listing(id as u32 + 1)
        );
    }
}
