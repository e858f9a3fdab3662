//! `quiver demo`: the embedded default. Starts a single node in a temporary
//! directory, creates a topic, produces keyed records, consumes them back as
//! a consumer group and checks that every record arrived in order and that
//! the group committed every position, runs a WebAssembly transform
//! over the topic (built from `plugins/json-filter`), checks its output, then
//! shuts down.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::ensure;
use quiver_client::{ConsumerConfig, Isolation, OffsetReset, OffsetSpec, ProducerConfig, ProducerRecord};

use crate::cli::connect_local;
use crate::node::{Node, dev_config};
use quiver_client::Client;
use quiver_protocol::messages::PluginDeployRequest;

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

    // A member of a consumer group: the group's coordinator assigns the
    // partitions and keeps the committed positions.
    let mut consumer =
        client.consumer(ConsumerConfig { auto_offset_reset: OffsetReset::Earliest, ..ConsumerConfig::default() });
    consumer.subscribe("demo-billing", &["demo-orders"]).await?;
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
    consumer.close().await?;
    let committed: i64 = client.admin().group_offsets("demo-billing", None).await?.iter().map(|o| o.offset).sum();
    ensure!(committed == records as i64, "the group committed {committed} positions, not {records}");
    println!(
        "4. consumed all {seen} records in {:.0} ms as group 'demo-billing' (its {records} positions committed); each customer's orders arrived in order ({} customers, same key -> same partition)",
        started.elapsed().as_secs_f64() * 1000.0,
        last_order_per_customer.len()
    );
    transform(&client, records).await?;
    client.close();
    node.shutdown().await;
    println!("7. broker shut down cleanly. Next: `quiver dev` runs a node you can keep; see README.md");
    Ok(())
}

/// Deploys the `json-filter` transform (orders with an amount above 400 go to
/// `demo-big-orders`) and checks its output against the input.
async fn transform(client: &Client, records: u64) -> anyhow::Result<()> {
    let started = Instant::now();
    let wasm = tokio::task::spawn_blocking(|| {
        // Idempotent, and quick when the target is there already.
        let _ = std::process::Command::new("rustup")
            .args(["target", "add", quiver_plugin_host::builder::TARGET])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        quiver_plugin_host::builder::first_party("json-filter")
    })
    .await?
    .map_err(|e| anyhow::anyhow!("building the demo transform: {e}"))?;
    println!(
        "5. built the transform plugin {} ({:.1}s, cached after the first run)",
        wasm.display(),
        started.elapsed().as_secs_f64()
    );
    client.admin().create_topic("demo-big-orders", 3, &[]).await?;
    let deployed = Instant::now();
    let param = |k: &str, v: &str| (k.to_string(), v.to_string());
    client
        .admin()
        .deploy_plugin(PluginDeployRequest {
            name: "big-orders".into(),
            kind: "transform".into(),
            wasm: std::fs::read(&wasm)?.into(),
            builtin: String::new(),
            params: vec![param("field", "amount"), param("op", "gt"), param("value", "400")],
            input: "demo-orders".into(),
            outputs: vec!["demo-big-orders".into()],
            on_error: "fail".into(),
            start: "start".into(),
            guarantee: String::new(),
        })
        .await?;
    let expected = (0..records).filter(|i| (i * 37) % 500 > 400).count();
    // The transform is exactly-once (the default): its outputs are read
    // committed.
    let mut consumer =
        client.consumer(ConsumerConfig { isolation: Isolation::ReadCommitted, ..ConsumerConfig::default() });
    consumer.assign("demo-big-orders", None, OffsetSpec::Earliest).await?;
    let mut seen = 0usize;
    while seen < expected {
        let batch = consumer.poll().await?;
        ensure!(deployed.elapsed().as_secs() < 60, "transform output stalled at {seen} of {expected} records");
        for r in batch {
            let value = String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned();
            let amount: u64 =
                value.split("\"amount\":").nth(1).and_then(|s| s.trim_end_matches('}').parse().ok()).unwrap_or(0);
            ensure!(amount > 400, "the transform let through {value}");
            seen += 1;
        }
    }
    println!(
        "6. deployed exactly-once Wasm transform 'big-orders' (json-filter: amount > 400) from demo-orders to demo-big-orders: \
         {seen} of {records} orders came out in {:.0} ms after the deploy, each with amount > 400",
        deployed.elapsed().as_secs_f64() * 1000.0
    );
    Ok(())
}
