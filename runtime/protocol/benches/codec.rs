//! Codec micro-benchmarks: building, validating and decoding 1 KiB-record
//! batches with each codec.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use quiver_protocol::batch::{BatchBuilder, Compression, ValidationLimits, decode_records, validate};

fn build(compression: Compression) -> bytes::Bytes {
    let mut b = BatchBuilder::new(compression);
    let value: Vec<u8> = (0..1024u32).map(|i| (i % 251) as u8).collect();
    for i in 0..100u32 {
        b.append(1_700_000_000_000 + i64::from(i), Some(&i.to_be_bytes()), Some(&value), &[]);
    }
    b.build()
}

fn codec(c: &mut Criterion) {
    for compression in [Compression::None, Compression::Lz4, Compression::Zstd] {
        let mut g = c.benchmark_group(format!("batch_{compression}"));
        g.throughput(Throughput::Bytes(100 * 1024));
        g.bench_function("build_100x1KiB", |b| b.iter(|| build(compression)));
        let batch = build(compression);
        let limits = ValidationLimits::default();
        g.bench_function("validate_100x1KiB", |b| b.iter(|| validate(&batch, &limits).unwrap()));
        g.bench_function("decode_100x1KiB", |b| b.iter(|| decode_records(&batch).unwrap()));
        g.finish();
    }
}

criterion_group!(benches, codec);
criterion_main!(benches);
