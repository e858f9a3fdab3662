//! Crash tests through the real binary: kill -9 during an acks=all produce,
//! and segment files cut or corrupted while the broker is down. A checker
//! proves that every acknowledged record survives exactly once, in order,
//! and that no corrupt batch is ever served.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{DevNode, json_lines};
use quiver_client::{Acks, Client, ConsumerConfig, OffsetSpec, ProducerConfig, ProducerRecord};

/// Reads a whole topic from the start to its end offsets as of now.
async fn read_all(client: &Client, topic: &str) -> Vec<quiver_client::ConsumerRecord> {
    let mut consumer = client.consumer(ConsumerConfig::default());
    consumer.assign(topic, None, OffsetSpec::Earliest).await.unwrap();
    let described = client.admin().describe_topics(Some(vec![topic.into()])).await.unwrap();
    let ends: HashMap<u32, i64> = described[0].partitions.iter().map(|p| (p.partition, p.high_watermark)).collect();
    let total: i64 = described[0].partitions.iter().map(|p| p.high_watermark - p.log_start_offset).sum();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while (out.len() as i64) < total {
        assert!(Instant::now() < deadline, "read_all stalled at {} of {total}", out.len());
        for r in consumer.poll().await.unwrap() {
            if r.offset < ends[&r.partition] {
                out.push(r);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_acks_all_produce_loses_no_acknowledged_record() {
    for round in 0..3u64 {
        let mut node = DevNode::start();
        let client = Client::connect(node.client_config()).await.unwrap();
        client.admin().create_topic("crash", 3, &[]).await.unwrap();
        let producer = client.producer(ProducerConfig {
            acks: Acks::All,
            linger: Duration::from_millis(1),
            batch_bytes_max: 16 * 1024,
            delivery_timeout: Duration::from_secs(3),
            retry_backoff: Duration::from_millis(50),
            ..ProducerConfig::default()
        });
        let acked_count = Arc::new(AtomicU64::new(0));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let counter = acked_count.clone();
        // Resolve deliveries in send order; remember what was acknowledged where.
        let collector = tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut failed = 0u64;
            let mut first_error = None;
            while let Some((i, delivery)) = rx.recv().await {
                let delivery: quiver_client::DeliveryFuture = delivery;
                match delivery.await {
                    Ok(meta) => {
                        acked.push((i, meta.partition, meta.offset));
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        failed += 1;
                        first_error.get_or_insert(e.to_string());
                    }
                }
            }
            (acked, failed, first_error)
        });
        let kill_after = 5_000 + round * 7_919;
        let mut sent = 0u64;
        let mut killed = false;
        while sent < 400_000 {
            if !killed && acked_count.load(Ordering::Relaxed) >= kill_after {
                node.kill9();
                killed = true;
            }
            // Keep the kill in the middle of the traffic: the producer may
            // queue records much faster than a busy machine acknowledges
            // them, and must not finish sending before the kill is due.
            let waiting = Instant::now();
            while !killed && sent.saturating_sub(acked_count.load(Ordering::Relaxed)) > 20_000 {
                assert!(waiting.elapsed() < Duration::from_secs(60), "round {round}: acknowledgements stopped");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let value = format!("v-{sent}");
            let key = format!("k{}", sent % 7);
            match producer.send(ProducerRecord::new("crash", value).key(key)).await {
                Ok(d) => tx.send((sent, d)).unwrap(),
                Err(e) => panic!("send refused before any failure: {e}"),
            }
            sent += 1;
            if killed && sent.is_multiple_of(1000) {
                break;
            }
            if sent.is_multiple_of(256) {
                tokio::task::yield_now().await;
            }
        }
        producer.flush().await;
        drop(tx);
        let (acked, failed, first_error) = collector.await.unwrap();
        assert!(killed, "round {round}: the broker was never killed (first delivery error: {first_error:?})");
        assert!(failed > 0, "round {round}: records sent after kill -9 must fail, not hang");
        drop(producer);
        client.close();

        node.spawn();
        let client = Client::connect(node.client_config()).await.unwrap();
        let stored = read_all(&client, "crash").await;
        // Check: every value at most once; per partition, send order; every
        // acknowledged record present at the acknowledged offset.
        let mut seen = HashSet::new();
        let mut by_position = HashMap::new();
        let mut last_per_partition: BTreeMap<u32, u64> = BTreeMap::new();
        for r in &stored {
            let v = std::str::from_utf8(r.value.as_deref().unwrap()).unwrap();
            let i: u64 = v.strip_prefix("v-").unwrap().parse().unwrap();
            assert!(seen.insert(i), "round {round}: value {i} stored twice");
            if let Some(prev) = last_per_partition.insert(r.partition, i) {
                assert!(i > prev, "round {round}: partition {} has {prev} before {i}", r.partition);
            }
            by_position.insert((r.partition, r.offset), i);
        }
        for (i, partition, offset) in &acked {
            assert_eq!(
                by_position.get(&(*partition, *offset)),
                Some(i),
                "round {round}: acknowledged record {i} at {partition}/{offset} is missing"
            );
        }
        eprintln!("round {round}: sent {sent}, acknowledged {}, failed {failed}, stored {}", acked.len(), stored.len());
        client.close();
    }
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Records (count) of the whole batches that lie entirely before `position`.
fn records_before(segment: &[u8], position: usize) -> usize {
    let mut at = 0;
    let mut records = 0;
    while let Ok(h) = quiver_protocol::batch::BatchHeader::parse(&segment[at..]) {
        if at + h.total_len() > position {
            break;
        }
        records += h.record_count as usize;
        at += h.total_len();
    }
    records
}

#[test]
fn damaged_segment_tail_is_cut_and_never_served() {
    for seed in 1..=6u64 {
        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut node = DevNode::start();
        node.ok(&["topic", "create", "torn", "-p", "1"]);
        let input: String = (0..3000).map(|i| format!("record-{i:05}\n")).collect();
        let out = node.produce(&["topic", "produce", "torn", "--batch-bytes", "2048"], input.as_bytes());
        assert!(out.status.success());
        node.kill9();

        let segment = node.segments("torn", 0).pop().unwrap();
        let original = std::fs::read(&segment).unwrap();
        let len = original.len();
        let damage_at = len / 2 + (xorshift(&mut rng) as usize % (len / 2));
        let intact_records = records_before(&original, damage_at);
        if seed % 2 == 0 {
            // A torn write: the file ends mid-batch.
            std::fs::OpenOptions::new().write(true).open(&segment).unwrap().set_len(damage_at as u64).unwrap();
        } else {
            // Bit rot in the tail.
            let mut bytes = original.clone();
            bytes[damage_at] ^= 1 << (xorshift(&mut rng) % 8);
            for _ in 0..4 {
                let p = damage_at + xorshift(&mut rng) as usize % (len - damage_at);
                bytes[p] ^= 0xff;
            }
            std::fs::write(&segment, bytes).unwrap();
        }

        node.spawn();
        let stdout = node.ok(&["topic", "consume", "torn", "-o", "start:end", "--format", "json"]);
        let records = json_lines(&stdout);
        assert!(
            records.len() >= intact_records,
            "seed {seed}: {} records served, {intact_records} were before the damage",
            records.len()
        );
        assert!(records.len() < 3000, "seed {seed}: damaged data was served");
        for (i, r) in records.iter().enumerate() {
            assert_eq!(r["offset"].as_i64().unwrap(), i as i64, "seed {seed}");
            assert_eq!(r["value"], format!("record-{i:05}"), "seed {seed}: served a wrong record");
        }
        // The log continues right after what survived.
        let out = node.produce(&["topic", "produce", "torn"], b"after-recovery\n");
        assert!(out.status.success(), "seed {seed}");
        let last =
            node.ok(&["topic", "consume", "torn", "-o", &records.len().to_string(), "-n", "1", "--format", "json"]);
        let last = json_lines(&last);
        assert_eq!(last[0]["value"], "after-recovery", "seed {seed}");
        assert_eq!(last[0]["offset"].as_i64().unwrap(), records.len() as i64, "seed {seed}");
    }
}
