//! A partition's side of transactions, as the log keeps it: open
//! transactions and the last stable offset, aborted ranges, through
//! reopen (the active segment's scan), rolls (the producer snapshot and the
//! sealed segment's `.txnindex`), a lost index (rebuilt from the segment's
//! own snapshot), truncation, retention and compaction (aborted data
//! dropped, markers and committed data kept).

mod common;

use bytes::Bytes;
use common::config;
use quiver_log::log::AbortedTxn;
use quiver_log::{CleanOptions, CompactionConfig, Log, LogConfig};
use quiver_protocol::batch::{BatchBuilder, Batches, Compression};
use quiver_protocol::control::{Marker, marker_batch};

/// A transactional batch of `producer_id` with keys `keys`.
fn txn_batch(producer_id: i64, epoch: i16, sequence: i32, keys: &[&str], value: &str) -> Bytes {
    let mut b = BatchBuilder::new(Compression::None).with_producer(producer_id, epoch, sequence).transactional();
    for k in keys {
        b.append(1_000, Some(k.as_bytes()), Some(value.as_bytes()), &[]);
    }
    b.build()
}

fn plain(keys: &[&str], value: &str) -> Bytes {
    let mut b = BatchBuilder::new(Compression::None);
    for k in keys {
        b.append(1_000, Some(k.as_bytes()), Some(value.as_bytes()), &[]);
    }
    b.build()
}

fn marker(producer_id: i64, epoch: i16, commit: bool) -> Bytes {
    marker_batch(producer_id, epoch, if commit { Marker::Commit } else { Marker::Abort }, 0, 1_000)
}

/// What [`mixed`] aborts.
const ABORTED_8: AbortedTxn = AbortedTxn { producer_id: 8, first_offset: 3, last_offset: 5, last_stable_offset: 6 };

/// Writes: plain (0), txn 7 (1..=2), txn 8 (3), commit 7 (4), abort 8 (5).
fn mixed(log: &Log) {
    log.append_checked(&plain(&["a"], "p0"), 0).unwrap();
    log.append_checked(&txn_batch(7, 0, 0, &["a", "b"], "t7"), 0).unwrap();
    log.append_checked(&txn_batch(8, 0, 0, &["a"], "t8"), 0).unwrap();
    assert_eq!(log.last_stable_offset(4), 1, "the oldest open transaction holds the LSO");
    assert_eq!(log.open_transactions(), vec![(7, 1), (8, 3)]);
    log.append(&marker(7, 1, true), 0).unwrap();
    assert_eq!(log.last_stable_offset(5), 3);
    log.append(&marker(8, 1, false), 0).unwrap();
    assert_eq!(log.last_stable_offset(6), 6);
}

#[test]
fn the_lso_and_aborted_ranges_survive_reopen_roll_and_truncation() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = Log::open(dir.path(), config(1 << 20)).unwrap();
        mixed(&log);
        assert_eq!(log.aborted_transactions(0, 6), vec![ABORTED_8]);
        assert_eq!(log.aborted_transactions(0, 3), vec![], "the range read ends before it");
        // A new transaction of 7, still open at the crash.
        log.append_checked(&txn_batch(7, 1, 0, &["c"], "t7b"), 0).unwrap();
        assert_eq!(log.last_stable_offset(7), 6);
    }
    // Reopen: the active segment's scan rebuilds it.
    let log = Log::open(dir.path(), config(1 << 20)).unwrap();
    assert_eq!(log.open_transactions(), vec![(7, 6)]);
    assert_eq!(log.aborted_transactions(0, 7).len(), 1);
    // A roll snapshots it; reopening starts from the snapshot.
    log.roll().unwrap();
    drop(log);
    let log = Log::open(dir.path(), config(1 << 20)).unwrap();
    assert_eq!(log.open_transactions(), vec![(7, 6)]);
    assert_eq!(log.aborted_transactions(0, 7), vec![ABORTED_8]);
    // A late write of the epoch the commit marker fenced is refused.
    assert!(log.append_checked(&txn_batch(7, 0, 1, &["z"], "late"), 0).is_err());
    // Truncating the open transaction away closes it.
    log.append(&marker(7, 2, false), 0).unwrap();
    assert_eq!(log.aborted_transactions(0, 8).len(), 2);
    log.truncate_to(7).unwrap();
    assert_eq!(log.open_transactions(), vec![(7, 6)], "the abort marker was cut: open again");
    assert_eq!(log.aborted_transactions(0, 8).len(), 1);
}

#[test]
fn compaction_drops_aborted_data_and_keeps_markers_and_committed_values() {
    let dir = tempfile::tempdir().unwrap();
    let log_config = LogConfig {
        compaction: Some(CompactionConfig {
            min_cleanable_dirty_ratio: 0.0,
            min_compaction_lag_ms: 0,
            max_compaction_lag_ms: None,
            delete_retention_ms: 0,
        }),
        ..config(1 << 20)
    };
    let log = Log::open(dir.path(), log_config).unwrap();
    mixed(&log);
    // Roll so the cleaner may touch everything.
    log.append(&plain(&["tail"], "x"), 0).unwrap();
    log.roll().unwrap();
    let options = CleanOptions { dedupe_buffer_bytes: 1 << 20, force: true };
    log.clean(2_000, i64::MAX, &options, &mut |_| {}).unwrap().expect("a pass");
    let end = log.log_end_offset();
    let bytes = log.read(0, 1 << 20, end).unwrap();
    let mut values = Vec::new();
    let mut controls = 0;
    for item in Batches::new(bytes) {
        let (header, batch) = item.unwrap();
        if header.is_control() {
            controls += 1;
            continue;
        }
        for r in quiver_protocol::batch::decode_records(&batch).unwrap() {
            values.push((
                String::from_utf8(r.key.unwrap().to_vec()).unwrap(),
                String::from_utf8(r.value.unwrap().to_vec()).unwrap(),
            ));
        }
    }
    assert_eq!(controls, 2, "both markers stay");
    // "a": the aborted t8 never replaced the committed t7.
    assert!(values.contains(&("a".into(), "t7".into())), "{values:?}");
    assert!(!values.iter().any(|(_, v)| v == "t8"), "aborted data dropped: {values:?}");
    assert!(!values.contains(&("a".into(), "p0".into())), "superseded by the committed t7: {values:?}");
    assert!(values.contains(&("b".into(), "t7".into())));
    // The cleaned segment indexes the abort its marker still ends, also
    // after a reopen (from its `.txnindex`).
    assert_eq!(log.aborted_transactions(0, end), vec![ABORTED_8]);
    drop(log);
    let log = Log::open(dir.path(), config(1 << 20)).unwrap();
    assert_eq!(log.aborted_transactions(0, end), vec![ABORTED_8]);
}

fn txn_index(dir: &std::path::Path, base: i64) -> std::path::PathBuf {
    dir.join(format!("{base:020}.txnindex"))
}

#[test]
fn each_segment_indexes_its_aborts_and_a_lost_index_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), config(1 << 20)).unwrap();
    // Segment 0: txn 9 opens (0..=1) and stays open across the roll.
    log.append_checked(&txn_batch(9, 0, 0, &["a", "b"], "t9"), 0).unwrap();
    log.roll().unwrap();
    // Segment 2: txn 10 (2), abort 9 (3), abort 10 (4).
    log.append_checked(&txn_batch(10, 0, 0, &["c"], "t10"), 0).unwrap();
    log.append(&marker(9, 1, false), 0).unwrap();
    log.append(&marker(10, 1, false), 0).unwrap();
    log.roll().unwrap();
    // Segment 5: plain data.
    log.append(&plain(&["d"], "p"), 0).unwrap();
    let nine = AbortedTxn { producer_id: 9, first_offset: 0, last_offset: 3, last_stable_offset: 2 };
    let ten = AbortedTxn { producer_id: 10, first_offset: 2, last_offset: 4, last_stable_offset: 5 };
    assert_eq!(log.aborted_transactions(0, 6), vec![nine, ten]);
    assert_eq!(log.aborted_transactions(1, 2), vec![nine], "10's data starts at 2");
    assert_eq!(log.aborted_transactions(5, 6), vec![], "both markers are before the range");
    drop(log);
    assert_eq!(std::fs::read(txn_index(dir.path(), 0)).unwrap(), b"", "segment 0 holds no marker");
    assert_eq!(std::fs::read(txn_index(dir.path(), 2)).unwrap().len(), 64, "two aborts of 32 bytes");

    // Lost (a crash before the index files of a roll were synced, or a log
    // from before the index): rebuilt by a scan from the segment's own
    // snapshot, which knows 9 opened in the segment before.
    std::fs::remove_file(txn_index(dir.path(), 2)).unwrap();
    let log = Log::open(dir.path(), config(1 << 20)).unwrap();
    assert_eq!(log.aborted_transactions(0, 6), vec![nine, ten]);
    assert_eq!(std::fs::read(txn_index(dir.path(), 2)).unwrap().len(), 64, "written again");
    drop(log);
    // Damaged: the same.
    std::fs::write(txn_index(dir.path(), 2), [0u8; 40]).unwrap();
    let log = Log::open(dir.path(), config(1 << 20)).unwrap();
    assert_eq!(log.aborted_transactions(0, 6), vec![nine, ten]);

    // Retention takes a segment's index with it.
    log.roll().unwrap();
    log.set_config(LogConfig { retention_bytes: Some(1), ..config(1 << 20) });
    assert_eq!(log.enforce_retention(0).unwrap().segments_deleted, 3);
    assert_eq!(log.aborted_transactions(0, 10), vec![]);
    assert!(!txn_index(dir.path(), 2).exists());
}
