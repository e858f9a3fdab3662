//! Idempotent producers against the real binary: producer ids are unique
//! across restarts; a retried batch is answered with its first offsets and
//! stored once, also after kill -9; gaps, fenced epochs and unplaceable
//! batches get clear errors; and the client library, whose answers are
//! lost in the network, retries until every record is written exactly once.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use common::proxy::{Mode, UdpProxy};
use common::{DevNode, json_lines};
use quiver_client::{
    Acks, Client, ClientConfig, ErrorCode, PARTITION_ANY, ProduceError, ProducerConfig, ProducerRecord,
};
use quiver_protocol::batch::{BatchBuilder, Compression};
use quiver_protocol::messages::{ProducePartition, ProducePartitionResult, ProduceRequest};

fn stamped(producer_id: i64, epoch: i16, sequence: i32, values: &[&str]) -> Bytes {
    let mut b = BatchBuilder::new(Compression::None).with_producer(producer_id, epoch, sequence);
    for v in values {
        b.append(quiver_broker::now_ms(), None, Some(v.as_bytes()), &[]);
    }
    b.build()
}

async fn produce_raw(client: &Client, partition: u32, records: Bytes) -> ProducePartitionResult {
    let request = ProduceRequest {
        transactional_id: None,
        acks: Acks::All,
        timeout_ms: 10_000,
        partitions: vec![ProducePartition { topic: "idem".into(), partition, records }],
    };
    client.call(&request).await.expect("produce answered").partitions.remove(0)
}

fn values(node: &DevNode, topic: &str, partition: u32) -> Vec<(i64, String)> {
    let p = partition.to_string();
    json_lines(&node.ok(&["topic", "consume", topic, "-p", &p, "-o", "start:end", "--format", "json"]))
        .iter()
        .map(|r| (r["offset"].as_i64().unwrap(), r["value"].as_str().unwrap().to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_batches_are_stored_once_and_sequence_errors_are_clear() {
    let mut node = DevNode::start();
    // Small segments: the producer state must come back from the roll
    // snapshots and the active segment's scan.
    node.ok(&["topic", "create", "idem", "-p", "1", "-c", "segment.bytes=1024"]);
    let client = Client::connect(node.client_config()).await.unwrap();
    let admin = client.admin();
    let first = admin.init_producer_id().await.unwrap();
    let second = admin.init_producer_id().await.unwrap();
    assert_ne!(first.producer_id, second.producer_id);
    let pid = first.producer_id;

    let mut sequence = 0;
    let mut batches = Vec::new();
    for i in 0..12 {
        let values: Vec<String> = (0..4).map(|j| format!("b{i}-r{j}-{}", "x".repeat(60))).collect();
        let refs: Vec<&str> = values.iter().map(String::as_str).collect();
        let batch = stamped(pid, 0, sequence, &refs);
        let r = produce_raw(&client, 0, batch.clone()).await;
        assert_eq!((r.error, r.base_offset), (ErrorCode::None, i * 4), "{}", r.message);
        batches.push(batch);
        sequence += 4;
    }
    let retry = produce_raw(&client, 0, batches[11].clone()).await;
    assert_eq!((retry.error, retry.base_offset), (ErrorCode::None, 44), "a retry gets its first offsets");
    drop(client);

    node.kill9();
    node.spawn();
    let segments = node.segments("idem", 0);
    assert!(segments.len() > 3, "the batches span several segments: {segments:?}");
    let client = Client::connect(node.client_config()).await.unwrap();
    let after_restart = client.admin().init_producer_id().await.unwrap();
    assert!(after_restart.producer_id > second.producer_id, "ids are never handed out twice");
    for (i, batch) in batches.iter().enumerate().skip(7) {
        let r = produce_raw(&client, 0, batch.clone()).await;
        assert_eq!((r.error, r.base_offset), (ErrorCode::None, i as i64 * 4), "retry of batch {i} after kill -9");
    }

    let gap = produce_raw(&client, 0, stamped(pid, 0, sequence + 1, &["gap"])).await;
    assert_eq!(gap.error, ErrorCode::OutOfOrderSequence, "{}", gap.message);
    assert!(gap.message.contains(&format!("where {sequence} was expected")), "{}", gap.message);
    let next_epoch = produce_raw(&client, 0, stamped(pid, 1, 0, &["epoch-1"])).await;
    assert_eq!((next_epoch.error, next_epoch.base_offset), (ErrorCode::None, 48), "{}", next_epoch.message);
    let fenced = produce_raw(&client, 0, stamped(pid, 0, sequence, &["old-epoch"])).await;
    assert_eq!(fenced.error, ErrorCode::ProducerFenced, "{}", fenced.message);
    let anywhere = produce_raw(&client, PARTITION_ANY, stamped(pid, 1, 1, &["anywhere"])).await;
    assert_eq!(anywhere.error, ErrorCode::InvalidRequest, "{}", anywhere.message);
    assert!(anywhere.message.contains("must name its partition"), "{}", anywhere.message);

    let stored = values(&node, "idem", 0);
    assert_eq!(stored.len(), 49, "12 batches of 4 and one more, each once");
    assert_eq!(stored.last().unwrap().1, "epoch-1");
}

/// Produces `count` records round robin over three partitions through
/// `client` while the node's answers are dropped twice for 2.5 s; returns
/// each record's outcome.
async fn produce_through_lost_answers(
    client: &Client,
    proxy: &UdpProxy,
    topic: &str,
    count: usize,
    idempotent: bool,
) -> Vec<Result<(u32, i64), ProduceError>> {
    let producer = client.producer(ProducerConfig {
        acks: Acks::All,
        linger: Duration::from_millis(2),
        delivery_timeout: Duration::from_secs(60),
        retry_backoff: Duration::from_millis(50),
        idempotent,
        ..ProducerConfig::default()
    });
    let mut deliveries = Vec::with_capacity(count);
    for i in 0..count {
        let record = ProducerRecord::new(topic, format!("v{i}")).partition((i % 3) as u32);
        deliveries.push(producer.send(record).await.unwrap());
        if i % 1000 == 500 {
            proxy.set(Mode::DropReplies);
            tokio::time::sleep(Duration::from_millis(2500)).await;
            proxy.set(Mode::Pass);
        } else if i % 20 == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let mut outcomes = Vec::with_capacity(count);
    for d in deliveries {
        outcomes.push(d.await.map(|m| (m.partition, m.offset)));
    }
    outcomes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_answers_are_retried_and_every_record_is_written_once() {
    let node = DevNode::start();
    node.ok(&["topic", "create", "lossy", "-p", "3"]);
    node.ok(&["topic", "create", "plain", "-p", "3"]);
    let proxy = UdpProxy::start(node.address().parse().unwrap(), 11);
    let mut config = ClientConfig::new(format!("127.0.0.1:{}", proxy.port), std::fs::read(node.ca()).unwrap());
    config.request_timeout = Duration::from_secs(1);
    config.connect_timeout = Duration::from_secs(1);
    let client = Client::connect(config).await.unwrap();

    const COUNT: usize = 2000;
    let outcomes = produce_through_lost_answers(&client, &proxy, "lossy", COUNT, true).await;
    let mut acked = HashMap::new();
    for (i, outcome) in outcomes.iter().enumerate() {
        match outcome {
            Ok(at) => {
                acked.insert(format!("v{i}"), *at);
            }
            Err(e) => panic!("v{i} failed although every answer loss was retried: {e}"),
        }
    }
    for partition in 0..3 {
        let stored = values(&node, "lossy", partition);
        let expected: Vec<String> =
            (0..COUNT).filter(|i| i % 3 == partition as usize).map(|i| format!("v{i}")).collect();
        let got: Vec<String> = stored.iter().map(|(_, v)| v.clone()).collect();
        assert_eq!(got, expected, "partition {partition}: every record once, in the order sent");
        for (offset, v) in stored {
            assert_eq!(acked[&v], (partition, offset), "{v} is where it was acknowledged");
        }
    }

    // The same faults without idempotence: the producer cannot tell
    // whether the lost requests were written, so it says so. (This is
    // what makes the check above meaningful.)
    let outcomes = produce_through_lost_answers(&client, &proxy, "plain", COUNT, false).await;
    let unknown = outcomes.iter().filter(|o| matches!(o, Err(ProduceError::Unknown(_)))).count();
    assert!(unknown > 0, "dropping answers must leave some writes of unknown fate without idempotence");
}

/// `topic produce` numbers its batches unless told not to.
#[test]
fn the_cli_produces_idempotently_unless_told_not_to() {
    let node = DevNode::start();
    node.ok(&["topic", "create", "cli", "-p", "1"]);
    let out = node.produce(&["topic", "produce", "cli"], b"a\nb\n");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = node.produce(&["topic", "produce", "cli", "--no-idempotence"], b"c\n");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(node.ok(&["topic", "consume", "cli", "-o", "start:end"]), "a\nb\nc\n");

    let stored = std::fs::read(&node.segments("cli", 0)[0]).unwrap();
    let first = quiver_protocol::batch::BatchHeader::parse(&stored).unwrap();
    assert!(first.producer_id >= 0, "the default producer is idempotent: {first:?}");
    assert_eq!((first.producer_epoch, first.base_sequence), (0, 0));
    let second = quiver_protocol::batch::BatchHeader::parse(&stored[first.total_len()..]).unwrap();
    assert_eq!(second.producer_id, quiver_protocol::batch::NO_PRODUCER_ID, "--no-idempotence: {second:?}");
}
