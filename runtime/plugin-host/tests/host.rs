//! The host against real components built from plugins/: kinds, limits,
//! isolation, the sandbox and the cache.

use std::sync::Arc;
use std::time::{Duration, Instant};

use quiver_plugin_host::{
    CallError, Entry, HostConfig, Input, Kind, Monitor, PluginError, PluginHost, builder::first_party,
};

fn wasm(name: &str) -> Vec<u8> {
    std::fs::read(first_party(name).expect("build plugin")).unwrap()
}

/// Encodes (key, value) records as a batch's records section.
fn records(values: &[(&str, &str)]) -> Vec<u8> {
    use bytes::BytesMut;
    use quiver_protocol::varint::put_varint;
    let mut out = BytesMut::new();
    for (i, (k, v)) in values.iter().enumerate() {
        let mut rec = BytesMut::new();
        rec.extend_from_slice(&[0]);
        put_varint(&mut rec, 0);
        put_varint(&mut rec, i as i32);
        put_varint(&mut rec, k.len() as i32);
        rec.extend_from_slice(k.as_bytes());
        put_varint(&mut rec, v.len() as i32);
        rec.extend_from_slice(v.as_bytes());
        put_varint(&mut rec, 0);
        put_varint(&mut out, rec.len() as i32);
        out.extend_from_slice(&rec);
    }
    out.to_vec()
}

fn input(buf: &[u8], count: usize) -> Input<'_> {
    Input { base_offset: 0, base_timestamp: 0, count: count as u32, records: buf }
}

fn host(deadline_ms: u64) -> PluginHost {
    PluginHost::new(HostConfig {
        call_deadline: Duration::from_millis(deadline_ms),
        memory_max_bytes: 32 << 20,
        ..HostConfig::default()
    })
    .unwrap()
}

#[test]
fn identity_forwards_every_record_without_copying_it_back() {
    let host = host(1000);
    let plugin = host.load(&wasm("identity")).unwrap();
    assert_eq!((plugin.kind(), plugin.abi_version()), (Kind::Transform, "0.1.0"));
    let mut inst = plugin.instantiate(&[], &["out".into()], Arc::new(Monitor::default())).unwrap();
    let buf = records(&[("a", "1"), ("b", "2")]);
    let out = inst.transform(&input(&buf, 2)).unwrap();
    assert_eq!(out.refusal, None);
    let entries = out.decode(2, 1).unwrap();
    assert_eq!(entries, [Entry::Forward { input: 0, topic: 0 }, Entry::Forward { input: 1, topic: 0 }]);
}

#[test]
fn misbehaving_plugins_are_stopped_and_isolated() {
    let host = host(200);
    let plugin = host.load(&wasm("misbehave")).unwrap();
    let monitor = Arc::new(Monitor::default());
    let fresh = || plugin.instantiate(&[], &["out".into()], monitor.clone()).unwrap();

    let buf = records(&[("k", "loop")]);
    let mut inst = fresh();
    let started = Instant::now();
    assert_eq!(inst.transform(&input(&buf, 1)).unwrap_err(), CallError::Deadline(Duration::from_millis(200)));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!inst.is_usable());
    assert!(inst.transform(&input(&buf, 1)).is_err(), "a poisoned instance is never called again");

    let buf = records(&[("k", "alloc")]);
    assert_eq!(fresh().transform(&input(&buf, 1)).unwrap_err(), CallError::MemoryCap(32 << 20));

    let buf = records(&[("k", "trap")]);
    assert!(matches!(fresh().transform(&input(&buf, 1)).unwrap_err(), CallError::Trap(_)));

    let buf = records(&[("k", "panic")]);
    assert!(matches!(fresh().transform(&input(&buf, 1)).unwrap_err(), CallError::Trap(_)));
    let logs = monitor.lines_since(0);
    assert!(logs.iter().any(|l| l.message.contains("misbehave was asked to panic")), "{logs:?}");

    // After all that, a new instance of the same plugin works.
    let buf = records(&[("k", "fine"), ("k", "log")]);
    let out = fresh().transform(&input(&buf, 2)).unwrap();
    assert_eq!(out.decode(2, 1).unwrap().len(), 2);
    assert!(monitor.lines_since(0).iter().any(|l| l.message == "hello from misbehave" && l.level == "info"));
    assert!(monitor.stats().errors >= 4);
}

#[test]
fn plugins_cannot_open_files_or_sockets() {
    let host = host(2000);
    let plugin = host.load(&wasm("misbehave")).unwrap();
    let mut inst = plugin.instantiate(&[], &["out".into()], Arc::new(Monitor::default())).unwrap();
    for (what, value) in [("file", "file"), ("socket", "socket")] {
        let buf = records(&[("k", value)]);
        let out = inst.transform(&input(&buf, 1)).unwrap();
        let refusal = out.refusal.expect("the attempt fails inside the plugin");
        assert!(refusal.message.starts_with(&format!("{what}: refused")), "{}", refusal.message);
    }
}

#[test]
fn bad_components_get_clear_errors() {
    let host = host(1000);
    let err = host.load(b"not wasm at all").err().unwrap();
    assert!(err.to_string().contains("WebAssembly magic"), "{err}");
    let core_module = b"\0asm\x01\0\0\0";
    let err = host.load(core_module).err().unwrap();
    assert!(err.to_string().contains("core module"), "{err}");
    let plugin = host.load(&wasm("json-filter")).unwrap();
    let err = plugin.expect_kind(Kind::Serializer).unwrap_err();
    assert_eq!(err.to_string(), "the plugin is a transform, not a serializer");
    let err = plugin.instantiate(&[], &["out".into()], Arc::new(Monitor::default())).err().unwrap();
    assert_eq!(err.to_string(), "the plugin refused its parameters: missing parameter 'field'");
}

#[test]
fn a_plugin_for_another_abi_version_is_refused_with_the_supported_versions() {
    // Rewrite the version inside the component's export name: the same
    // plugin claiming ABI 9.9.9.
    let mut bytes = wasm("identity");
    let needle = b"quiver:plugin/transform@0.1.0";
    let mut replaced = 0;
    let mut i = 0;
    while i + needle.len() <= bytes.len() {
        if &bytes[i..i + needle.len()] == needle {
            bytes[i + needle.len() - 5..i + needle.len()].copy_from_slice(b"9.9.9");
            replaced += 1;
        }
        i += 1;
    }
    assert!(replaced > 0);
    match host(1000).load(&bytes) {
        Err(PluginError::AbiMismatch { found }) => assert_eq!(found, "9.9.9"),
        Err(e) => panic!("expected an ABI mismatch, got: {e}"),
        Ok(_) => panic!("expected an ABI mismatch"),
    }
}

#[test]
fn compiled_components_are_cached_by_content() {
    let dir = tempfile::tempdir().unwrap();
    let config = HostConfig { cache_dir: Some(dir.path().to_owned()), ..HostConfig::default() };
    let bytes = wasm("identity");
    let first = PluginHost::new(config.clone()).unwrap().load(&bytes).unwrap();
    assert!(!first.from_cache());
    let second = PluginHost::new(config).unwrap().load(&bytes).unwrap();
    assert!(second.from_cache());
    assert_eq!(first.sha256(), second.sha256());
}

/// A cache entry torn or damaged on disk (a crash mid-write, a bad block) is
/// never deserialized: its checksum fails, the component is compiled again
/// and the entry replaced; no temporary file is left behind.
#[test]
fn a_damaged_cache_entry_is_recompiled() {
    let dir = tempfile::tempdir().unwrap();
    let config = HostConfig { cache_dir: Some(dir.path().to_owned()), ..HostConfig::default() };
    let bytes = wasm("identity");
    PluginHost::new(config.clone()).unwrap().load(&bytes).unwrap();
    let entries = || -> Vec<std::path::PathBuf> {
        let mut files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        files
    };
    let [entry] = entries().try_into().expect("one cache entry, no temporary file");
    let good = std::fs::read(&entry).unwrap();
    for damage in ["flip", "tear"] {
        let mut bad = good.clone();
        match damage {
            "flip" => bad[good.len() / 2] ^= 0x40,
            _ => bad.truncate(good.len() / 3),
        }
        std::fs::write(&entry, &bad).unwrap();
        let plugin = PluginHost::new(config.clone()).unwrap().load(&bytes).unwrap();
        assert!(!plugin.from_cache(), "{damage}: a damaged entry must not be loaded");
        assert_eq!(entries(), vec![entry.clone()]);
        assert!(PluginHost::new(config.clone()).unwrap().load(&bytes).unwrap().from_cache());
    }
}

/// A transform that imports `state` has a store: its writes are visible to
/// later reads, survive the instance (a new one on the same store goes
/// on), and are the store's changes for the broker to changelog. A plugin
/// that does not import it has none, and a stateful plugin given no store
/// refuses the record that writes.
#[test]
fn a_stateful_transform_keeps_its_store_across_instances() {
    use quiver_plugin_host::StateStore;
    let host = host(1000);
    let aggregate = host.load(&wasm("aggregate")).unwrap();
    assert!(aggregate.uses_state());
    assert!(!host.load(&wasm("identity")).unwrap().uses_state());
    let params = [("field".to_owned(), "amount".to_owned())];
    let outputs = ["totals".to_owned()];
    let store = StateStore::shared(1 << 20);
    let totals = |out: &quiver_plugin_host::Output, n: u32| -> Vec<String> {
        out.decode(n, 1)
            .unwrap()
            .iter()
            .map(|e| match e {
                Entry::New { value, .. } => String::from_utf8(value.unwrap().to_vec()).unwrap(),
                other => panic!("{other:?}"),
            })
            .collect()
    };
    let buf = records(&[("a", r#"{"amount":2}"#), ("b", r#"{"amount":5}"#), ("a", r#"{"amount":3}"#)]);
    let mut inst =
        aggregate.instantiate_with_state(&params, &outputs, Arc::new(Monitor::default()), Some(store.clone())).unwrap();
    let out = inst.transform(&input(&buf, 3)).unwrap();
    assert_eq!(totals(&out, 3), [r#"{"count":1,"sum":2}"#, r#"{"count":1,"sum":5}"#, r#"{"count":2,"sum":5}"#]);
    drop(inst);
    let mut inst =
        aggregate.instantiate_with_state(&params, &outputs, Arc::new(Monitor::default()), Some(store.clone())).unwrap();
    let buf = records(&[("a", r#"{"amount":10}"#)]);
    assert_eq!(totals(&inst.transform(&input(&buf, 1)).unwrap(), 1), [r#"{"count":3,"sum":15}"#]);
    let changes = store.lock().unwrap().take_changes();
    let keys: Vec<&[u8]> = changes.iter().map(|(k, _)| k.as_slice()).collect();
    assert_eq!(keys, [&b"a"[..], b"b"]);
    assert_eq!(changes[0].1.as_deref(), Some(&br#"{"count":3,"sum":15}"#[..]));

    let mut stateless = aggregate.instantiate(&params, &outputs, Arc::new(Monitor::default())).unwrap();
    let out = stateless.transform(&input(&buf, 1)).unwrap();
    assert!(out.refusal.unwrap().message.contains("no state store"));
}
