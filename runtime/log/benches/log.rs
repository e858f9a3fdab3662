//! Log benchmarks: appending 100 x 1 KiB batches, reading the log back
//! sequentially (alone, and with the bytes copied out as a fetch does), and
//! recovery (open) of a log whose active segment holds about 64 MiB.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use quiver_log::{Log, LogConfig};
use quiver_protocol::batch::{BatchBuilder, Compression};

const RECORDS_PER_BATCH: usize = 100;
const RECORD_BYTES: usize = 1024;

fn batch() -> Bytes {
    let value: Vec<u8> = (0..RECORD_BYTES as u32).map(|i| (i % 251) as u8).collect();
    let mut b = BatchBuilder::new(Compression::None);
    for i in 0..RECORDS_PER_BATCH as u32 {
        b.append(1_700_000_000_000 + i64::from(i), Some(&i.to_be_bytes()), Some(&value), &[]);
    }
    b.build()
}

fn config() -> LogConfig {
    LogConfig { segment_bytes_max: 256 * 1024 * 1024, retention_ms: None, segment_ms_max: None, ..LogConfig::default() }
}

fn log_benches(c: &mut Criterion) {
    let batch = batch();
    let mut g = c.benchmark_group("log");
    g.throughput(Throughput::Bytes(batch.len() as u64));

    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), config()).unwrap();
    g.bench_function("append_100x1KiB", |b| b.iter(|| log.append(black_box(&batch), 0).unwrap()));
    drop(log);

    // Sequential read: 1 MiB fetches over a 64 MiB log, wrapping around.
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), config()).unwrap();
    let batches = 64 * 1024 * 1024 / batch.len();
    for _ in 0..batches {
        log.append(&batch, 0).unwrap();
    }
    let end = log.log_end_offset();
    // The next 1 MiB read, from where the last one ended.
    let mut next = 0i64;
    let mut read_next = || {
        let bytes = log.read(next, 1024 * 1024, end).unwrap();
        let last = quiver_protocol::batch::Batches::new(bytes.clone()).last().unwrap().unwrap();
        next = last.0.next_offset();
        if next >= end {
            next = 0;
        }
        bytes
    };
    g.throughput(Throughput::Bytes(1024 * 1024));
    g.bench_function("read_sequential_1MiB", |b| b.iter(&mut read_next));
    // The same reads as a fetch serves them: every byte copied out once
    // more (the transport's copy into its packets), then the read dropped.
    let mut scratch = vec![0u8; 2 * 1024 * 1024];
    g.bench_function("read_sequential_1MiB_and_copy_out", |b| {
        b.iter(|| {
            let bytes = read_next();
            scratch[..bytes.len()].copy_from_slice(&bytes);
            black_box(&scratch);
        })
    });
    log.close().unwrap();
    drop(log);

    // Recovery: the whole 64 MiB active segment is scanned with CRC checks.
    g.throughput(Throughput::Bytes((batches * batch.len()) as u64));
    g.sample_size(10);
    g.bench_function("open_recover_64MiB_active_segment", |b| {
        b.iter_batched(
            || (),
            |()| {
                let log = Log::open(dir.path(), config()).unwrap();
                assert_eq!(log.log_end_offset(), end);
                log
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, log_benches);
criterion_main!(benches);
