//! Idempotent producers through a real log: retries are answered with their
//! first offsets, gaps and fenced epochs are refused, and the state
//! survives rolls, reopening, truncation and retention.

mod common;

use bytes::Bytes;
use common::{config, read_all};
use quiver_log::{AppendError, Appended, Log, SequenceError};
use quiver_protocol::batch::{BatchBuilder, Compression};

/// A batch of `records` records from producer `id` starting at `sequence`.
fn idempotent(id: i64, epoch: i16, sequence: i32, records: usize) -> Bytes {
    let mut b = BatchBuilder::new(Compression::None).with_producer(id, epoch, sequence);
    for i in 0..records {
        let value = format!("p{id}-e{epoch}-s{}", sequence as usize + i);
        b.append(1_000 + i as i64, None, Some(value.as_bytes()), &[]);
    }
    b.build()
}

fn new_at(appended: Appended) -> (i64, i64) {
    match appended {
        Appended::New(info) => (info.base_offset, info.last_offset),
        Appended::Duplicate(info) => panic!("expected a new append, got a duplicate of {info:?}"),
    }
}

fn duplicate_of(appended: Appended) -> (i64, i64) {
    match appended {
        Appended::Duplicate(info) => (info.base_offset, info.last_offset),
        Appended::New(info) => panic!("expected a duplicate, got a new append at {info:?}"),
    }
}

#[test]
fn retries_are_answered_with_their_first_offsets_and_gaps_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), config(1 << 20)).unwrap();
    assert_eq!(new_at(log.append_checked(&idempotent(7, 0, 0, 3), 0).unwrap()), (0, 2));
    assert_eq!(new_at(log.append_checked(&idempotent(8, 0, 0, 1), 0).unwrap()), (3, 3));
    assert_eq!(new_at(log.append_checked(&idempotent(7, 0, 3, 2), 0).unwrap()), (4, 5));
    assert_eq!(duplicate_of(log.append_checked(&idempotent(7, 0, 0, 3), 0).unwrap()), (0, 2));
    assert_eq!(duplicate_of(log.append_checked(&idempotent(7, 0, 3, 2), 0).unwrap()), (4, 5));
    assert_eq!(log.log_end_offset(), 6, "duplicates write nothing");

    match log.append_checked(&idempotent(7, 0, 6, 1), 0) {
        Err(AppendError::Sequence(SequenceError::OutOfOrder { expected: 5, got: 6, .. })) => {}
        other => panic!("a skipped sequence must be refused, got {other:?}"),
    }
    assert_eq!(new_at(log.append_checked(&idempotent(7, 1, 0, 1), 0).unwrap()), (6, 6), "a new epoch starts at 0");
    match log.append_checked(&idempotent(7, 0, 5, 1), 0) {
        Err(AppendError::Sequence(SequenceError::Fenced { current: 1, .. })) => {}
        other => panic!("an older epoch must be fenced, got {other:?}"),
    }
    // A retry older than the remembered batches cannot be answered.
    for sequence in 0..20 {
        new_at(log.append_checked(&idempotent(9, 0, sequence, 1), 0).unwrap());
    }
    match log.append_checked(&idempotent(9, 0, 0, 1), 0) {
        Err(AppendError::Sequence(SequenceError::Stale { expected: 20, got: 0, .. })) => {}
        other => panic!("a retry behind the remembered batches must be stale, got {other:?}"),
    }
    assert!(matches!(log.append_checked(&idempotent(9, 0, 19, 1), 0), Ok(Appended::Duplicate(_))));
    let end = log.log_end_offset();
    // Batches without a producer id are never checked.
    let plain = common::batch(1, 2, 0, 10);
    assert_eq!(new_at(log.append_checked(&plain, 0).unwrap()), (end, end + 1));
    assert_eq!(new_at(log.append_checked(&plain, 0).unwrap()), (end + 2, end + 3));
    assert_eq!(read_all(&log).len(), 26);
}

#[test]
fn producer_state_survives_rolls_reopening_and_retention() {
    let dir = tempfile::tempdir().unwrap();
    let one = idempotent(1, 0, 0, 4).len() as u64;
    let log = Log::open(dir.path(), config(3 * one)).unwrap();
    let mut sequences = [0i32; 3];
    let mut offsets = Vec::new();
    for round in 0..20 {
        let id = round % 3;
        let batch = idempotent(id as i64, 0, sequences[id], 4);
        offsets.push((id, sequences[id], new_at(log.append_checked(&batch, 0).unwrap())));
        sequences[id] += 4;
    }
    assert!(log.segment_count() >= 6, "rolled {} times", log.segment_count() - 1);
    let snapshots = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".producers"))
        .count();
    assert_eq!(snapshots, log.segment_count() - 1, "one snapshot per rolled-to segment");
    drop(log);

    let log = Log::open(dir.path(), config(3 * one)).unwrap();
    // The last five batches of each producer are still recognised, whichever
    // segment they are in (the snapshot covers sealed ones, the scan the
    // active one).
    for &(id, sequence, at) in offsets.iter().rev().take(12) {
        let retry = idempotent(id as i64, 0, sequence, 4);
        assert_eq!(duplicate_of(log.append_checked(&retry, 0).unwrap()), at, "producer {id} sequence {sequence}");
    }
    for (id, &next) in sequences.iter().enumerate() {
        assert_eq!(log.producer_sequence(id as i64), Some((0, next - 1)));
        match log.append_checked(&idempotent(id as i64, 0, next + 4, 1), 0) {
            Err(AppendError::Sequence(SequenceError::OutOfOrder { .. })) => {}
            other => panic!("a gap after reopening must be refused, got {other:?}"),
        }
    }
    let end = log.log_end_offset();
    assert_eq!(new_at(log.append_checked(&idempotent(0, 0, sequences[0], 1), 0).unwrap()), (end, end));

    // Retention removes the snapshots with their segments.
    let mut retention = config(3 * one);
    retention.retention_bytes = Some(2 * 3 * one);
    log.set_config(retention);
    log.enforce_retention(0).unwrap();
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".producers"))
        .collect();
    assert!(left.len() < snapshots, "{left:?}");
    for name in left {
        let log_file = name.replace(".producers", ".log");
        assert!(dir.path().join(&log_file).exists(), "{name} outlived {log_file}");
    }
}

#[test]
fn truncation_rewinds_producer_state() {
    let dir = tempfile::tempdir().unwrap();
    let one = idempotent(1, 0, 0, 2).len() as u64;
    let log = Log::open(dir.path(), config(2 * one)).unwrap();
    for i in 0..8 {
        new_at(log.append_checked(&idempotent(1, 0, i * 2, 2), 0).unwrap());
    }
    // Offsets 0..16; keep the first five batches (offsets below 10).
    assert_eq!(log.truncate_to(10).unwrap(), 10);
    assert_eq!(log.producer_sequence(1), Some((0, 9)));
    // The batch at sequence 10 was cut: its retry is appended again, at the
    // new end, and the earlier ones are still duplicates.
    assert_eq!(new_at(log.append_checked(&idempotent(1, 0, 10, 2), 0).unwrap()), (10, 11));
    assert_eq!(duplicate_of(log.append_checked(&idempotent(1, 0, 8, 2), 0).unwrap()), (8, 9));
    drop(log);
    let log = Log::open(dir.path(), config(2 * one)).unwrap();
    assert_eq!(log.producer_sequence(1), Some((0, 11)));
    log.reset_to(100).unwrap();
    assert_eq!(log.producer_sequence(1), None, "a reset log knows no producer");
}
