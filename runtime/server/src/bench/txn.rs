//! `quiver bench txn`: what transactions cost the producer.
//!
//! Per round: `--records` records produced by an idempotent producer
//! (acks=all, the baseline), then by a transactional one committing every
//! 100, 1,000 and 10,000 records, each into a fresh topic. Each
//! transactional result carries its commit latency (p50/p99/p99.9: from
//! `commit` called to its answer, the flush of the transaction's last
//! records included). The ratios against the idempotent producer of the
//! same round are printed as medians over `--rounds`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use quiver_client::{Acks, ErrorCode, ProducerRecord};

use super::{BenchOpts, BenchResult, Target, payload, process_cpu, producer_config, progress, unless};

/// Records per transaction measured.
pub(super) const SIZES: [u64; 3] = [100, 1_000, 10_000];

pub(super) async fn txn(target: &Target, opts: &BenchOpts) -> anyhow::Result<Vec<BenchResult>> {
    let mut results = Vec::new();
    for round in 0..opts.rounds.max(1) {
        let topic = fresh_topic(target, opts, &format!("idempotent-{round}")).await?;
        results.push(idempotent(target, opts, &topic).await?);
        for size in SIZES {
            let topic = fresh_topic(target, opts, &format!("txn-{size}-{round}")).await?;
            results.push(transactional(target, opts, &topic, size, round).await?);
        }
    }
    Ok(results)
}

/// The mode name of transactions of `size` records.
pub(super) fn mode(size: u64) -> String {
    format!("produce-txn-{size}")
}

async fn fresh_topic(target: &Target, opts: &BenchOpts, suffix: &str) -> anyhow::Result<String> {
    let topic = format!("{}-{suffix}", opts.topic);
    let admin = target.client.admin();
    unless(ErrorCode::UnknownTopic, admin.delete_topic(&topic).await)?;
    admin.create_topic(&topic, opts.partitions, &[]).await?;
    Ok(topic)
}

/// The baseline: an idempotent producer, acks=all, keyless records.
async fn idempotent(target: &Target, opts: &BenchOpts, topic: &str) -> anyhow::Result<BenchResult> {
    let producer = target.client.producer(quiver_client::ProducerConfig { acks: Acks::All, ..producer_config(opts) });
    let base = Bytes::from(payload(opts.record_bytes, 42));
    let bar = progress(opts.records, "produce-idempotent");
    let topic: std::sync::Arc<str> = topic.into();
    let cpu = process_cpu();
    let started = Instant::now();
    let mut deliveries = Vec::with_capacity(4096);
    for n in 0..opts.records {
        deliveries.push(producer.send(ProducerRecord::new(topic.clone(), base.clone())).await?);
        if deliveries.len() == 4096 {
            for d in deliveries.drain(..) {
                d.await?;
            }
            bar.inc(4096.min(opts.records - n));
        }
    }
    producer.flush().await;
    for d in deliveries {
        d.await?;
    }
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    let bytes = opts.records * opts.record_bytes as u64;
    Ok(BenchResult::new("produce-idempotent", opts.records, bytes, elapsed, None).with_cpu(cpu))
}

/// A transactional producer committing every `size` records.
async fn transactional(
    target: &Target,
    opts: &BenchOpts,
    topic: &str,
    size: u64,
    round: u32,
) -> anyhow::Result<BenchResult> {
    let id = format!("bench-txn-{}-{size}-{round}", std::process::id());
    let producer = target.client.transactional_producer(&id, producer_config(opts));
    producer.init().await?;
    let base = Bytes::from(payload(opts.record_bytes, 42));
    let name = mode(size);
    let bar = progress(opts.records, &name);
    let topic: std::sync::Arc<str> = topic.into();
    let mut commits = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let cpu = process_cpu();
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < opts.records {
        let n = size.min(opts.records - sent);
        producer.begin()?;
        let mut deliveries = Vec::with_capacity(n as usize);
        for _ in 0..n {
            deliveries.push(producer.send(ProducerRecord::new(topic.clone(), base.clone())).await?);
        }
        let committing = Instant::now();
        producer.commit().await?;
        let _ = commits.record(committing.elapsed().as_micros().max(1) as u64);
        for d in deliveries {
            d.await?;
        }
        sent += n;
        bar.inc(n);
    }
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    let bytes = sent * opts.record_bytes as u64;
    anyhow::ensure!(elapsed > Duration::ZERO, "nothing measured");
    Ok(BenchResult::new(&name, sent, bytes, elapsed, Some(&commits)).with_cpu(cpu))
}
