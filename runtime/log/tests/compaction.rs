//! Compaction against a model: random puts, deletes, rolls, cleans (with a
//! key map small enough to need several passes), crashes in the middle of a
//! clean and reopens must leave, for every key, its latest value (or
//! nothing, or its tombstone), offsets strictly increasing, and reads by
//! offset landing on the next surviving record. Then directed tests of
//! tombstone expiry, producer state, replicas copying a compacted log and
//! the cleaned segments' recovery.

mod common;

use std::collections::BTreeMap;

use bytes::Bytes;
use common::config;
use proptest::prelude::*;
use quiver_log::{CleanOptions, CleanStep, CompactionConfig, Log, LogConfig};
use quiver_protocol::batch::{self, BatchBuilder, BatchHeader, Batches, Compression};

const DAY: i64 = 24 * 3600 * 1000;

fn compacted(segment_bytes_max: u64, delete_retention_ms: u64) -> LogConfig {
    LogConfig {
        compaction: Some(CompactionConfig {
            min_cleanable_dirty_ratio: 0.5,
            min_compaction_lag_ms: 0,
            max_compaction_lag_ms: None,
            delete_retention_ms,
        }),
        index_interval_bytes: 64,
        ..config(segment_bytes_max)
    }
}

/// A batch of `(key, value)` records (`None`: a tombstone) at time `ts`.
fn updates(records: &[(String, Option<String>)], ts: i64, codec: Compression) -> Bytes {
    let mut b = BatchBuilder::new(codec);
    for (k, v) in records {
        b.append(ts, Some(k.as_bytes()), v.as_deref().map(str::as_bytes), &[]);
    }
    b.build()
}

/// A stored record: offset, key, value.
type Stored = (i64, String, Option<String>);

/// Every record from the log start, checking batches and offsets increase.
fn read_records(log: &Log) -> Vec<Stored> {
    read_from(log, log.log_start_offset())
}

fn read_from(log: &Log, from: i64) -> Vec<Stored> {
    let end = log.log_end_offset();
    let mut next = from;
    let mut out: Vec<Stored> = Vec::new();
    while next < end {
        let bytes = log.read(next, 4096, end).expect("read");
        if bytes.is_empty() {
            break;
        }
        for item in Batches::new(bytes) {
            let (header, batch) = item.expect("framing");
            assert!(header.next_offset() > next, "batch at {} does not move past {next}", header.base_offset);
            next = header.next_offset();
            for r in batch::decode_records(&batch).expect("records") {
                if let Some(last) = out.last() {
                    assert!(r.offset > last.0, "offset {} after {}", r.offset, last.0);
                }
                let text = |b: Option<Bytes>| b.map(|b| String::from_utf8(b.to_vec()).unwrap());
                out.push((r.offset, text(r.key).unwrap(), text(r.value)));
            }
        }
    }
    out
}

#[derive(Debug, Clone)]
enum Op {
    /// Keys `k{key % keys}`, one record per entry; `None`: a tombstone.
    Write(Vec<(u8, Option<u16>)>),
    Roll,
    /// A forced clean after `advance` ms, with a key map of `map_entries`.
    Clean {
        advance: i64,
        map_entries: usize,
    },
    Crash(CleanStep),
    Reopen,
    ReadAt(u16),
}

fn op() -> impl Strategy<Value = Op> {
    let record = (0u8..24, prop_oneof![4 => any::<u16>().prop_map(Some), 1 => Just(None)]);
    prop_oneof![
        8 => proptest::collection::vec(record, 1..5).prop_map(Op::Write),
        2 => Just(Op::Roll),
        3 => (0i64..80, prop_oneof![Just(16usize), Just(64), Just(4096)])
            .prop_map(|(advance, map_entries)| Op::Clean { advance, map_entries }),
        1 => prop_oneof![Just(CleanStep::Cleaned), Just(CleanStep::Committed), Just(CleanStep::OldDeleted)]
            .prop_map(Op::Crash),
        1 => Just(Op::Reopen),
        2 => any::<u16>().prop_map(Op::ReadAt),
    ]
}

/// Everything ever written, in offset order.
#[derive(Default)]
struct Model {
    written: Vec<Stored>,
}

impl Model {
    fn latest(&self) -> BTreeMap<&str, (i64, Option<&str>)> {
        let mut latest = BTreeMap::new();
        for (offset, key, value) in &self.written {
            latest.insert(key.as_str(), (*offset, value.as_deref()));
        }
        latest
    }
}

/// The invariants every state must hold.
fn check(log: &Log, model: &Model) {
    let stored = read_records(log);
    let latest = model.latest();
    let written: BTreeMap<i64, &Stored> = model.written.iter().map(|s| (s.0, s)).collect();
    for s in &stored {
        assert_eq!(written.get(&s.0), Some(&s), "a stored record must be one that was written");
    }
    // Replaying the log from the start gives every key its latest value.
    let mut replayed: BTreeMap<&str, Option<&str>> = BTreeMap::new();
    for (_, key, value) in &stored {
        replayed.insert(key, value.as_deref());
    }
    for (key, (_, value)) in &latest {
        match value {
            Some(v) => assert_eq!(replayed.get(key), Some(&Some(*v)), "key {key}"),
            None => assert!(matches!(replayed.get(key), None | Some(None)), "deleted key {key}: {replayed:?}"),
        }
    }
    // A key's latest record is never removed, unless it is a tombstone.
    for (key, (offset, value)) in &latest {
        if value.is_some() {
            assert!(stored.iter().any(|s| s.0 == *offset), "latest record of {key} at {offset} lost");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn compaction_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = compacted(700, 100);
        let mut log = Log::open(dir.path(), cfg.clone()).unwrap();
        let mut model = Model::default();
        let mut now = 1_000i64;
        for op in ops {
            now += 1;
            match op {
                Op::Write(records) => {
                    let records: Vec<(String, Option<String>)> = records
                        .into_iter()
                        .map(|(k, v)| (format!("k{k}"), v.map(|v| format!("v{v}"))))
                        .collect();
                    let info = log.append(&updates(&records, now, Compression::None), 1).unwrap();
                    for (i, (k, v)) in records.into_iter().enumerate() {
                        model.written.push((info.base_offset + i as i64, k, v));
                    }
                }
                Op::Roll => log.roll().unwrap(),
                Op::Clean { advance, map_entries } => {
                    now += advance;
                    let options = CleanOptions { dedupe_buffer_bytes: map_entries * 24, force: true };
                    if let Some(report) = log.clean(now, i64::MAX, &options, &mut |_| {}).unwrap() {
                        // Below the pass's end only each key's latest record stays.
                        let latest = model.latest();
                        for (offset, key, _) in read_records(&log).iter().filter(|s| s.0 < report.cleaned_to) {
                            let newest_below = model
                                .written
                                .iter()
                                .filter(|w| w.1 == *key && w.0 < report.cleaned_to)
                                .map(|w| w.0)
                                .max();
                            prop_assert!(
                                newest_below == Some(*offset) || latest[key.as_str()].0 == *offset,
                                "superseded record of {key} at {offset} below {}", report.cleaned_to
                            );
                        }
                    }
                }
                Op::Crash(step) => {
                    let options = CleanOptions { dedupe_buffer_bytes: 64 * 24, force: true };
                    log.clean_until(now, i64::MAX, &options, step).unwrap();
                    drop(log);
                    log = Log::open(dir.path(), cfg.clone()).unwrap();
                }
                Op::Reopen => {
                    drop(log);
                    log = Log::open(dir.path(), cfg.clone()).unwrap();
                }
                Op::ReadAt(at) => {
                    let (start, end) = (log.log_start_offset(), log.log_end_offset());
                    let at = start + i64::from(at) % (end - start + 1);
                    let all = read_records(&log);
                    let expected = all.iter().find(|s| s.0 >= at).map(|s| s.0);
                    let got = read_from(&log, at).into_iter().find(|s| s.0 >= at).map(|s| s.0);
                    prop_assert_eq!(got, expected, "read at {}", at);
                    // Holes are never at a segment's end: below the log end
                    // a read always finds a batch (maybe an emptied one).
                    prop_assert!(at >= end || !log.read(at, 4096, end).unwrap().is_empty(), "empty read at {}", at);
                }
            }
            check(&log, &model);
        }
    }
}

fn kv(k: &str, v: Option<&str>) -> (String, Option<String>) {
    (k.to_owned(), v.map(str::to_owned))
}

fn force() -> CleanOptions {
    CleanOptions { force: true, ..CleanOptions::default() }
}

#[test]
fn tombstones_stay_for_the_delete_retention_then_go() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), compacted(1 << 20, DAY as u64)).unwrap();
    let t0 = 1_700_000_000_000;
    log.append(&updates(&[kv("a", Some("1")), kv("b", Some("1"))], t0, Compression::Zstd), 0).unwrap();
    log.append(&updates(&[kv("a", None), kv("b", Some("2"))], t0 + 1, Compression::Zstd), 0).unwrap();
    log.roll().unwrap();
    let report = log.clean(t0 + 10, i64::MAX, &force(), &mut |_| {}).unwrap().expect("a pass");
    assert_eq!((report.records_before, report.records_after), (4, 2));
    let stored = read_records(&log);
    assert_eq!(stored, [(2, "a".into(), None), (3, "b".into(), Some("2".into()))]);
    // The tombstone's batch got its horizon; record timestamps are unchanged.
    let batch = log.read(2, 1 << 20, i64::MAX).unwrap();
    let header = BatchHeader::parse(&batch).unwrap();
    assert_eq!(header.delete_horizon(), Some(t0 + 10 + DAY));
    assert_eq!(batch::decode_records(&batch).unwrap()[0].timestamp, t0 + 1);
    assert_eq!(header.compression().unwrap(), Compression::Zstd);

    // Before the horizon a new pass keeps it; after, it goes.
    log.append(&updates(&[kv("c", Some("1"))], t0 + 20, Compression::None), 0).unwrap();
    log.roll().unwrap();
    log.clean(t0 + DAY, i64::MAX, &force(), &mut |_| {}).unwrap().expect("a pass");
    assert!(read_records(&log).iter().any(|s| s.1 == "a"), "tombstone kept before its horizon");
    // A forced pass with nothing dirty still drops expired tombstones.
    let report = log.clean(t0 + 10 + DAY, i64::MAX, &force(), &mut |_| {}).unwrap().expect("a pass");
    assert_eq!(report.tombstones_dropped, 1);
    log.append(&updates(&[kv("d", Some("1"))], t0 + 30, Compression::None), 0).unwrap();
    log.roll().unwrap();
    let report = log.clean(t0 + 10 + DAY, i64::MAX, &force(), &mut |_| {}).unwrap().expect("a pass");
    assert_eq!(report.tombstones_dropped, 0);
    let keys: Vec<String> = read_records(&log).into_iter().map(|s| s.1).collect();
    assert_eq!(keys, ["b", "c", "d"]);
    // The offsets stay: the log still starts and ends where it did.
    assert_eq!((log.log_start_offset(), log.log_end_offset()), (0, 6));
    assert_eq!(log.segment_count(), 2, "cleaned segments merge");
}

#[test]
fn a_small_key_map_cleans_over_several_passes() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), compacted(4096, 0)).unwrap();
    for round in 0..10 {
        for chunk in 0..10 {
            let records: Vec<_> =
                (0..10).map(|i| kv(&format!("key{}", chunk * 10 + i), Some(&format!("r{round}")))).collect();
            log.append(&updates(&records, 1, Compression::None), 0).unwrap();
        }
    }
    log.roll().unwrap();
    let options = CleanOptions { dedupe_buffer_bytes: 64 * 24, force: true };
    let mut passes = 0;
    loop {
        let report = log.clean(10, i64::MAX, &options, &mut |_| {}).unwrap().expect("a pass");
        assert!(report.map_bytes <= 64 * 24, "the map stays within its budget: {}", report.map_bytes);
        passes += 1;
        assert!(passes < 100, "cleaning does not converge");
        if report.cleaned_to == log.log_end_offset() {
            break;
        }
    }
    assert!(passes > 1, "a 64-entry map cannot clean 100 keys at once");
    let stored = read_records(&log);
    assert_eq!(stored.len(), 100, "one record per key");
    assert!(stored.iter().all(|s| s.2.as_deref() == Some("r9")));
}

#[test]
fn an_idempotent_producers_last_batch_stays_even_when_emptied() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), compacted(1 << 20, 0)).unwrap();
    let produce = |seq: i32, key: &str| {
        let mut b = BatchBuilder::new(Compression::None).with_producer(7, 0, seq);
        b.append(1, Some(key.as_bytes()), Some(b"v"), &[]);
        log.append_checked(&b.build(), 0).unwrap();
    };
    produce(0, "a");
    produce(1, "b");
    // Another writer overwrites both keys.
    log.append(&updates(&[kv("a", Some("x")), kv("b", Some("x"))], 2, Compression::None), 0).unwrap();
    log.roll().unwrap();
    log.clean(10, i64::MAX, &force(), &mut |_| {}).unwrap().expect("a pass");
    let batches: Vec<BatchHeader> =
        Batches::new(log.read(0, 1 << 20, i64::MAX).unwrap()).map(|b| b.unwrap().0).collect();
    let summary: Vec<_> = batches.iter().map(|h| (h.base_offset, h.producer_id, h.record_count)).collect();
    assert_eq!(summary, [(1, 7, 0), (2, -1, 2)], "the producer's last batch stays, empty");
    // A replica copying this log learns the producer's sequence.
    let copy_dir = tempfile::tempdir().unwrap();
    let copy = Log::open(copy_dir.path(), compacted(1 << 20, 0)).unwrap();
    for item in Batches::new(log.read(0, 1 << 20, i64::MAX).unwrap()) {
        let (header, bytes) = item.unwrap();
        copy.append_copy(&bytes, header.leader_epoch).unwrap();
    }
    assert_eq!(copy.producer_sequence(7), Some((0, 1)));
    assert_eq!(copy.log_end_offset(), 4);
}

#[test]
fn a_replica_copies_a_compacted_log_with_its_holes_and_recovers_it() {
    let dir = tempfile::tempdir().unwrap();
    let leader = Log::open(dir.path(), compacted(300, 0)).unwrap();
    for i in 0..40 {
        leader.append(&updates(&[kv(&format!("k{}", i % 4), Some(&format!("{i}")))], i, Compression::None), 3).unwrap();
    }
    leader.roll().unwrap();
    leader.clean(100, i64::MAX, &force(), &mut |_| {}).unwrap().expect("a pass");
    let expected = read_records(&leader);
    assert_eq!(expected.iter().map(|s| s.0).collect::<Vec<_>>(), [36, 37, 38, 39]);

    let copy_dir = tempfile::tempdir().unwrap();
    let copy = Log::open(copy_dir.path(), compacted(300, 0)).unwrap();
    let mut next = 0;
    while next < leader.log_end_offset() {
        let bytes = leader.read(next, 200, i64::MAX).unwrap();
        for item in Batches::new(bytes) {
            let (header, batch) = item.unwrap();
            copy.append_copy(&batch, header.leader_epoch).unwrap();
            next = header.next_offset();
        }
    }
    // A copy behind the end is refused.
    let behind = updates(&[kv("k0", Some("old"))], 0, Compression::None);
    assert!(copy.append_copy(&behind, 3).is_err());
    assert_eq!(read_records(&copy), expected);
    drop(copy);
    // Reopened: the active segment with holes scans clean.
    let copy = Log::open(copy_dir.path(), compacted(300, 0)).unwrap();
    assert_eq!(read_records(&copy), expected);
    assert_eq!(copy.log_end_offset(), 40);
}

#[test]
fn a_kill_at_any_step_of_a_clean_leaves_old_or_new_segments() {
    for step in [CleanStep::Cleaned, CleanStep::Committed, CleanStep::OldDeleted] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = compacted(400, 0);
        let log = Log::open(dir.path(), cfg.clone()).unwrap();
        for i in 0..60 {
            log.append(&updates(&[kv(&format!("k{}", i % 5), Some(&format!("{i}")))], i, Compression::None), 0)
                .unwrap();
        }
        log.roll().unwrap();
        let before = read_records(&log);
        log.clean_until(100, i64::MAX, &force(), step).unwrap();
        drop(log);
        let log = Log::open(dir.path(), cfg).unwrap();
        let after = read_records(&log);
        let latest: Vec<_> = before.iter().filter(|s| s.0 >= 55).cloned().collect();
        assert!(after.ends_with(&latest), "{step:?}: latest values lost: {after:?}");
        if step == CleanStep::Cleaned {
            assert_eq!(after, before, "an uncommitted clean leaves the old segments");
        } else {
            assert!(after.len() < before.len(), "{step:?}: a committed swap completes at open");
        }
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".swap") || n.ends_with(".cleaned") || n.ends_with(".deleted"))
            .collect();
        assert!(leftovers.is_empty(), "{step:?}: {leftovers:?}");
        // A later clean completes the job.
        log.clean(200, i64::MAX, &force(), &mut |_| {}).unwrap();
        assert_eq!(read_records(&log), latest);
    }
}
