//! `quiver bench compact`: what the log cleaner of compacted topics costs.
//!
//! - Cleaner throughput: a log of `--records` updates over `--keys` keys
//!   (values of `--record-bytes`) is written in a temporary directory,
//!   untimed; then its segment files are copied sequentially (read, write,
//!   fsync: the baseline) and the log is cleaned (`quiver_log::Log::clean`,
//!   the broker's code), each timed, for `--rounds` rounds with a fresh log
//!   each. Both are reported in MiB/s of input; the ratio is the cleaner's
//!   share of a plain copy. The key map's peak size is reported against the
//!   configured dedupe buffer.
//! - Produce while cleaning: `--records` produced to the bench topic alone,
//!   then again while another topic (compacted, full of updates) is being
//!   cleaned over and over (`topic compact` in a loop), alternating for
//!   `--rounds`.

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quiver_client::{ErrorCode, ProducerRecord};
use quiver_log::{CleanOptions, CompactionConfig, Log, LogConfig};
use quiver_protocol::batch::{BatchBuilder, Compression};

use super::{BenchOpts, BenchResult, Target, payload, produce, progress, unless};

/// The broker's default dedupe buffer (one cleaner thread).
const DEDUPE_BUFFER_BYTES: usize = 128 * 1024 * 1024;
const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
const MIB: f64 = 1024.0 * 1024.0;

pub(super) async fn compact(target: &Target, opts: &BenchOpts) -> anyhow::Result<Vec<BenchResult>> {
    let mut results = Vec::new();
    for _ in 0..opts.rounds.max(1) {
        let opts = opts.clone();
        results.extend(tokio::task::spawn_blocking(move || clean_vs_copy(&opts)).await??);
    }
    results.extend(produce_while_cleaning(target, opts).await?);
    Ok(results)
}

/// Writes the changelog into a fresh log: `records` updates cycling over
/// `keys` keys, 100 records per batch, the active segment rolled.
fn changelog(dir: &std::path::Path, opts: &BenchOpts) -> anyhow::Result<Log> {
    let config = LogConfig {
        segment_bytes_max: SEGMENT_BYTES,
        segment_ms_max: None,
        retention_ms: None,
        retention_bytes: None,
        compaction: Some(CompactionConfig::default()),
        ..LogConfig::default()
    };
    let log = Log::open(dir, config)?;
    let value = payload(opts.record_bytes, 7);
    let keys = opts.keys.max(1);
    let mut batch = BatchBuilder::new(Compression::None);
    for i in 0..opts.records {
        let key = format!("key-{:08}", i % keys);
        batch.append(1_700_000_000_000 + i as i64, Some(key.as_bytes()), Some(&value), &[]);
        if batch.record_count() == 100 {
            log.append(&std::mem::replace(&mut batch, BatchBuilder::new(Compression::None)).build(), 0)?;
        }
    }
    if !batch.is_empty() {
        log.append(&batch.build(), 0)?;
    }
    log.roll()?;
    log.flush()?;
    Ok(log)
}

/// One round: the copy baseline, then the clean, over the same bytes.
fn clean_vs_copy(opts: &BenchOpts) -> anyhow::Result<Vec<BenchResult>> {
    let dir = tempfile::tempdir()?;
    let log_dir = dir.path().join("log");
    let log = changelog(&log_dir, opts)?;
    let input = log.size_bytes();

    // The baseline: every segment file read and written once, fsynced.
    let mut segments: Vec<_> = std::fs::read_dir(&log_dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    segments.sort();
    let started = Instant::now();
    let mut out = std::fs::File::create(dir.path().join("copy"))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = 0u64;
    for path in &segments {
        let mut file = std::fs::File::open(path)?;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n])?;
            copied += n as u64;
        }
    }
    out.sync_all()?;
    let copy = BenchResult::new("sequential-copy", opts.records, copied, started.elapsed(), None);
    drop(out);
    std::fs::remove_file(dir.path().join("copy"))?;

    let options = CleanOptions { dedupe_buffer_bytes: DEDUPE_BUFFER_BYTES, force: true };
    let started = Instant::now();
    let report = log
        .clean(quiver_broker::now_ms(), i64::MAX, &options, &mut |_| {})?
        .ok_or_else(|| anyhow::anyhow!("the cleaner found nothing to clean"))?;
    let mut clean = BenchResult::new("clean", report.records_before, input, started.elapsed(), None);
    clean.cleaner_map_mib = Some(report.map_bytes as f64 / MIB);
    clean.cleaner_buffer_mib = Some(DEDUPE_BUFFER_BYTES as f64 / MIB);
    clean.records_after_clean = Some(report.records_after);
    Ok(vec![copy, clean])
}

/// Writes `--records` records of `--record-bytes` over `--keys` keys to
/// `topic`, untimed.
pub(super) async fn fill_keyed(target: &Target, opts: &BenchOpts, topic: &str, label: &str) -> anyhow::Result<()> {
    let producer = target.client.producer(super::producer_config(opts));
    let bar = progress(opts.records, label);
    let topic: Arc<str> = topic.into();
    let value = Bytes::from(payload(opts.record_bytes, 9));
    let keys = opts.keys.max(1);
    let mut deliveries = Vec::new();
    for i in 0..opts.records {
        let record = ProducerRecord::new(topic.clone(), value.clone()).key(format!("key-{:08}", i % keys));
        deliveries.push(producer.send(record).await?);
        if deliveries.len() >= 100_000 {
            for d in deliveries.drain(..) {
                d.await?;
            }
        }
        bar.inc(1);
    }
    for d in deliveries {
        d.await?;
    }
    bar.finish_and_clear();
    Ok(())
}

/// Produce throughput alone and while another topic is cleaned in a loop.
async fn produce_while_cleaning(target: &Target, opts: &BenchOpts) -> anyhow::Result<Vec<BenchResult>> {
    let compacted = format!("{}-compacted", opts.topic);
    let configs = [("cleanup.policy".to_string(), "compact".to_string()), ("segment.bytes".into(), "8388608".into())];
    let admin = target.client.admin();
    unless(ErrorCode::TopicAlreadyExists, admin.create_topic(&compacted, 1, &configs).await.map(drop))?;
    // Its dirty changelog, written untimed.
    fill_keyed(target, opts, &compacted, "fill the compacted topic").await?;

    let mut results = Vec::new();
    for round in 0..opts.rounds.max(1) {
        let topic = format!("{}-{round}", opts.topic);
        let alone = format!("{topic}-alone");
        unless(ErrorCode::TopicAlreadyExists, admin.create_topic(&alone, opts.partitions, &[]).await.map(drop))?;
        let mut result = produce(target, opts, &alone).await?;
        result.mode = "produce-alone".into();
        results.push(result);

        let busy = format!("{topic}-cleaning");
        unless(ErrorCode::TopicAlreadyExists, admin.create_topic(&busy, opts.partitions, &[]).await.map(drop))?;
        let stop = Arc::new(AtomicBool::new(false));
        let cleaned = Arc::new(AtomicU64::new(0));
        let cleaner = {
            let (admin, stop, cleaned, compacted) = (admin.clone(), stop.clone(), cleaned.clone(), compacted.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let answers = admin.compact_topic(&compacted).await?;
                    let bytes: u64 = answers.iter().flat_map(|a| &a.partitions).map(|p| p.bytes_before).sum();
                    cleaned.fetch_add(bytes, Ordering::Relaxed);
                }
                anyhow::Ok(())
            })
        };
        // The cleaner is busy before the clock starts.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut result = produce(target, opts, &busy).await?;
        stop.store(true, Ordering::Relaxed);
        cleaner.await??;
        result.mode = "produce-cleaning".into();
        result.cleaned_mib = Some(cleaned.load(Ordering::Relaxed) as f64 / MIB);
        results.push(result);
        for t in [alone, busy] {
            unless(ErrorCode::UnknownTopic, admin.delete_topic(&t).await)?;
        }
    }
    Ok(results)
}
