//! `quiver demo`: the embedded default. Starts a single node in a temporary
//! directory, creates a topic, produces keyed records, consumes them back and
//! checks that every record arrived in order, then shuts down.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::ensure;
use quiver_client::{ConsumerConfig, OffsetSpec, ProducerConfig, ProducerRecord};

use crate::cli::connect_local;
use crate::node::{Node, dev_config};

pub async fn run(records: u64) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::start(dev_config(dir.path(), "127.0.0.1:0".parse()?)).await?;
    let ca = node.ca_cert.clone().expect("dev certificates");
    println!("1. started a single-node broker on {} (QUIC + TLS 1.3, self-signed dev CA)", node.address);
    let client = connect_local(node.address, &ca).await?;

    client.admin().create_topic("demo-orders", 3, &[]).await?;
    println!("2. created topic 'demo-orders' with 3 partitions");

    let producer = client.producer(ProducerConfig::default());
    let started = Instant::now();
    let mut deliveries = Vec::with_capacity(records as usize);
    for i in 0..records {
        let customer = format!("customer-{}", i % 17);
        let value = format!("{{\"order\":{i},\"customer\":\"{customer}\",\"amount\":{}}}", (i * 37) % 500);
        deliveries.push(producer.send(ProducerRecord::new("demo-orders", value).key(customer)).await?);
    }
    producer.flush().await;
    let mut per_partition = BTreeMap::new();
    for d in deliveries {
        *per_partition.entry(d.await?.partition).or_insert(0u64) += 1;
    }
    println!(
        "3. produced {records} keyed records with acks=all in {:.0} ms; per partition: {per_partition:?}",
        started.elapsed().as_secs_f64() * 1000.0
    );

    let mut consumer = client.consumer(ConsumerConfig::default());
    consumer.assign("demo-orders", None, OffsetSpec::Earliest).await?;
    let started = Instant::now();
    let mut seen = 0u64;
    let mut last_order_per_customer: BTreeMap<String, i64> = BTreeMap::new();
    while seen < records {
        let batch = consumer.poll().await?;
        ensure!(!batch.is_empty() || started.elapsed().as_secs() < 30, "consumer stalled at {seen} records");
        for r in batch {
            let key = String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned();
            let value = String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned();
            let order: i64 = value
                .split("\"order\":")
                .nth(1)
                .and_then(|s| s.split(',').next())
                .and_then(|s| s.parse().ok())
                .unwrap_or(-1);
            let last = last_order_per_customer.insert(key.clone(), order);
            ensure!(last.is_none_or(|l| l < order), "order of {key} went backwards");
            seen += 1;
        }
    }
    println!(
        "4. consumed all {seen} records in {:.0} ms; each customer's orders arrived in order ({} customers, same key -> same partition)",
        started.elapsed().as_secs_f64() * 1000.0,
        last_order_per_customer.len()
    );
    client.close();
    node.shutdown().await;
    println!("5. broker shut down cleanly. Next: `quiver dev` runs a node you can keep; see README.md");
    Ok(())
}
