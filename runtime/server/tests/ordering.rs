//! Per-partition order under concurrency: several tasks share one producer
//! with tiny batches, zstd (so sealing and compressing overlap) and many
//! requests in flight; every key's records must come back in send order.

use std::collections::HashMap;
use std::time::Duration;

use quiver_client::{Client, ClientConfig, Compression, ConsumerConfig, OffsetSpec, ProducerConfig, ProducerRecord};
use quiver_server::node::{Node, dev_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_keep_per_key_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = dev_config(dir.path(), "127.0.0.1:0".parse().unwrap());
    config.broker.flush_interval_ms = None;
    let node = Node::start(config).await.unwrap();
    let ca = std::fs::read(node.ca_cert.clone().unwrap()).unwrap();
    let client = Client::connect(ClientConfig::new(node.address.to_string(), ca)).await.unwrap();
    client.admin().create_topic("ordered", 4, &[]).await.unwrap();
    for codec in [Compression::Zstd, Compression::None] {
        let producer = client.producer(ProducerConfig {
            compression: codec,
            batch_bytes_max: 128 * 1024,
            linger: Duration::ZERO,
            in_flight_max: 16,
            ..ProducerConfig::default()
        });
        let tasks: Vec<_> = (0..4)
            .map(|task| {
                let producer = producer.clone();
                tokio::spawn(async move {
                    let mut deliveries = Vec::new();
                    for i in 0..10_000u32 {
                        let key = format!("{codec}-t{task}-k{}", i % 8);
                        // ~1 KiB values: a full batch takes a while to compress,
                        // while a linger-sealed one-record batch is quick.
                        let value = format!("{i} {}", "payload ".repeat(128));
                        let record = ProducerRecord::new("ordered", value).key(key);
                        deliveries.push(producer.send(record).await.unwrap());
                    }
                    for d in deliveries {
                        d.await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    }
    let mut consumer = client.consumer(ConsumerConfig::default());
    consumer.assign("ordered", None, OffsetSpec::Earliest).await.unwrap();
    let mut last: HashMap<String, u32> = HashMap::new();
    let mut seen = 0;
    while seen < 80_000 {
        for r in consumer.poll().await.unwrap() {
            let key = String::from_utf8(r.key.unwrap().to_vec()).unwrap();
            let value = r.value.unwrap();
            let i: u32 = std::str::from_utf8(&value).unwrap().split(' ').next().unwrap().parse().unwrap();
            if let Some(prev) = last.insert(key.clone(), i) {
                assert!(i > prev, "{key}: {prev} then {i}");
            }
            seen += 1;
        }
    }
    assert_eq!(last.len(), 2 * 4 * 8);
    client.close();
    node.shutdown().await;
}
