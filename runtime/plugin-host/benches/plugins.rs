//! Plugin call overhead. One batch call through a Wasm identity transform,
//! the built-in native identity (same `Instance` API, no Wasm: the
//! baseline), and a JSON read-side filter (`json-match`), at 1, 100, 1000
//! and 10000 records of about 100 bytes; plus loading a component from the
//! disk cache and starting an instance. Per-record cost is the reported
//! time divided by the batch size (criterion also prints elements/s).
//!
//! `cargo bench -p quiver-plugin-host --bench plugins` (builds the plugins
//! for wasm32-wasip2 first).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use quiver_plugin_host::builder::first_party;
use quiver_plugin_host::{HostConfig, Input, Monitor, PluginHost};
use quiver_protocol::batch::{self, BatchBuilder, Compression};

const SIZES: [usize; 4] = [1, 100, 1000, 10_000];

/// The records section of a batch of `n` small JSON records, half of which
/// match `country == "de"`.
fn section(n: usize) -> (bytes::Bytes, u32) {
    let mut b = BatchBuilder::new(Compression::None);
    for i in 0..n {
        let country = if i % 2 == 0 { "de" } else { "fr" };
        let value = format!(
            r#"{{"id":{i},"country":"{country}","amount":{},"note":"abcdefghijklmnopqrstuvwxyz0123456789"}}"#,
            i % 997
        );
        b.append(1_700_000_000_000 + i as i64, Some(format!("k{i}").as_bytes()), Some(value.as_bytes()), &[]);
    }
    let (_, body) = batch::records_section(&b.build()).unwrap();
    (body, n as u32)
}

fn calls(c: &mut Criterion) {
    let host = PluginHost::new(HostConfig::default()).unwrap();
    let identity = host.load(&std::fs::read(first_party("identity").unwrap()).unwrap()).unwrap();
    let native = host.builtin("identity").unwrap();
    let filter = host.load(&std::fs::read(first_party("json-match").unwrap()).unwrap()).unwrap();
    let outputs = ["out".to_string()];
    let params = [("field".to_string(), "country".to_string()), ("value".to_string(), "de".to_string())];
    let monitor = Arc::new(Monitor::default());
    let mut wasm_identity = identity.instantiate(&[], &outputs, monitor.clone()).unwrap();
    let mut native_identity = native.instantiate(&[], &outputs, monitor.clone()).unwrap();
    let mut json_match = filter.instantiate(&params, &[], monitor).unwrap();

    for n in SIZES {
        let (body, count) = section(n);
        let input = Input { base_offset: 0, base_timestamp: 1_700_000_000_000, count, records: &body };
        let mut g = c.benchmark_group(format!("batch_{n}"));
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function("native_identity", |b| b.iter(|| native_identity.transform(black_box(&input)).unwrap()));
        g.bench_function("wasm_identity", |b| b.iter(|| wasm_identity.transform(black_box(&input)).unwrap()));
        g.bench_function("wasm_json_match_filter", |b| b.iter(|| json_match.filter(black_box(&input)).unwrap()));
        g.finish();
    }
}

fn startup(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let host =
        PluginHost::new(HostConfig { cache_dir: Some(dir.path().to_path_buf()), ..HostConfig::default() }).unwrap();
    let wasm = std::fs::read(first_party("identity").unwrap()).unwrap();
    assert!(!host.load(&wasm).unwrap().from_cache(), "first load compiles");
    let mut g = c.benchmark_group("startup");
    g.bench_function("load_from_cache", |b| {
        b.iter(|| {
            let p = host.load(black_box(&wasm)).unwrap();
            assert!(p.from_cache());
            p
        })
    });
    let plugin = host.load(&wasm).unwrap();
    let outputs = ["out".to_string()];
    g.bench_function("instantiate", |b| {
        b.iter(|| plugin.instantiate(&[], &outputs, Arc::new(Monitor::default())).unwrap())
    });
    g.finish();
}

criterion_group!(benches, calls, startup);
criterion_main!(benches);
