//! Behaviour of one log: rolling, reading, retention, timestamps, reopen,
//! durability bookkeeping.

mod common;

use std::sync::Arc;

use common::{batch, config, read_all, same_batch};
use quiver_log::{AppendError, Log, LogConfig, OpenError, ReadError};
use quiver_protocol::batch::{BatchHeader, Batches, verify_crc};

fn log_files(dir: &std::path::Path, ext: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(ext))
        .collect();
    names.sort();
    names
}

#[test]
fn roll_by_size() {
    let dir = tempfile::tempdir().unwrap();
    let one = batch(0, 2, 0, 100);
    let log = Log::open(dir.path(), config(3 * one.len() as u64)).unwrap();
    let mut originals = Vec::new();
    for i in 0..10 {
        let b = batch(i, 2, 0, 100);
        let info = log.append(&b, 3).unwrap();
        assert_eq!((info.base_offset, info.last_offset), (2 * i as i64, 2 * i as i64 + 1));
        originals.push(b);
    }
    assert_eq!(log.segment_count(), 4, "3 + 3 + 3 + 1 batches");
    assert_eq!(log.size_bytes(), 10 * one.len() as u64);
    assert_eq!(
        log_files(dir.path(), ".log"),
        [
            "00000000000000000000.log",
            "00000000000000000006.log",
            "00000000000000000012.log",
            "00000000000000000018.log"
        ]
    );
    let stored = read_all(&log);
    assert_eq!(stored.len(), 10);
    for ((header, bytes), original) in stored.iter().zip(&originals) {
        assert!(same_batch(bytes, original));
        assert_eq!(header.leader_epoch, 3);
    }
}

#[test]
fn batch_larger_than_segment_goes_into_a_fresh_segment() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), config(100)).unwrap();
    for i in 0..3 {
        log.append(&batch(i, 3, 0, 200), 0).unwrap();
    }
    assert_eq!(log.segment_count(), 3);
    assert_eq!(read_all(&log).len(), 3);
}

#[test]
fn roll_by_age_then_retention_by_time() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LogConfig { segment_ms_max: Some(1_000), ..config(1 << 20) };
    let log = Log::open(dir.path(), cfg.clone()).unwrap();
    log.append(&batch(0, 2, 1_000, 10), 0).unwrap(); // max timestamp 1_001
    let report = log.enforce_retention(1_900).unwrap();
    assert_eq!((report.segments_deleted, log.segment_count()), (0, 1), "not old enough to roll");
    log.enforce_retention(2_002).unwrap();
    assert_eq!(log.segment_count(), 2, "rolled by age");
    // An empty active segment is never rolled again.
    log.enforce_retention(9_000).unwrap();
    assert_eq!(log.segment_count(), 2);

    log.set_config(LogConfig { retention_ms: Some(500), ..cfg });
    let report = log.enforce_retention(1_501).unwrap();
    assert_eq!(report.segments_deleted, 0, "max timestamp 1_001 is not older than 1_001");
    let report = log.enforce_retention(1_502).unwrap();
    assert_eq!(report.segments_deleted, 1);
    assert_eq!(report.log_start_offset, 2);
    assert_eq!((log.log_start_offset(), log.log_end_offset()), (2, 2));
    assert!(matches!(log.read(0, 100, 2), Err(ReadError::OffsetOutOfRange { offset: 0, log_start: 2, log_end: 2 })));
    assert_eq!(log.append(&batch(1, 1, 5_000, 10), 0).unwrap().base_offset, 2);
}

#[test]
fn read_from_the_middle_of_a_batch_returns_the_whole_batch() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), config(1 << 20)).unwrap();
    for i in 0..5 {
        log.append(&batch(i, 10, 0, 20), 0).unwrap();
    }
    let bytes = log.read(15, 1, 50).unwrap();
    let batches: Vec<_> = Batches::new(bytes).map(Result::unwrap).collect();
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].0.base_offset, 10);
    assert!(same_batch(&batches[0].1, &batch(1, 10, 0, 20)));
}

#[test]
fn read_stops_before_up_to() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), config(1 << 20)).unwrap();
    for i in 0..5 {
        log.append(&batch(i, 10, 0, 20), 0).unwrap();
    }
    let bases = |bytes| Batches::new(bytes).map(|b| b.unwrap().0.base_offset).collect::<Vec<_>>();
    assert_eq!(bases(log.read(0, 1 << 20, 25).unwrap()), [0, 10]);
    assert_eq!(bases(log.read(0, 1 << 20, 30).unwrap()), [0, 10, 20]);
    assert!(log.read(22, 1 << 20, 25).unwrap().is_empty(), "batch 20..=29 is not below 25");
    assert!(log.read(0, 1 << 20, 0).unwrap().is_empty());
    assert_eq!(bases(log.read(3, 1 << 20, 50).unwrap()), [0, 10, 20, 30, 40]);
}

#[test]
fn read_returns_at_least_one_batch_and_respects_max_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), config(1 << 20)).unwrap();
    let len = batch(0, 4, 0, 100).len();
    for i in 0..6 {
        log.append(&batch(i, 4, 0, 100), 0).unwrap();
    }
    let count = |bytes| Batches::new(bytes).count();
    assert_eq!(count(log.read(0, 0, 24).unwrap()), 1);
    assert_eq!(count(log.read(0, 1, 24).unwrap()), 1);
    let two = log.read(4, 2 * len + len / 2, 24).unwrap();
    assert_eq!(two.len(), 2 * len, "only whole batches");
    assert_eq!(count(log.read(4, 100 * len, 24).unwrap()), 5);
    assert!(log.read(24, 100, 24).unwrap().is_empty(), "log end: empty");
    assert!(matches!(log.read(25, 100, 30), Err(ReadError::OffsetOutOfRange { offset: 25, .. })));
    assert!(matches!(log.read(-1, 100, 30), Err(ReadError::OffsetOutOfRange { offset: -1, .. })));
}

#[test]
fn sparse_index_finds_every_offset() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), config(64 * 1024)).unwrap();
    let mut bases = Vec::new();
    for i in 0..400u64 {
        let info = log.append(&batch(i, 1 + (i % 5) as usize, 0, (i * 13 % 90) as usize), 0).unwrap();
        bases.push((info.base_offset, info.last_offset));
    }
    assert!(log.segment_count() > 1);
    let end = log.log_end_offset();
    for &(base, last) in &bases {
        for offset in base..=last {
            let bytes = log.read(offset, 1, end).unwrap();
            let header = BatchHeader::parse(&bytes).unwrap();
            assert_eq!(header.base_offset, base, "read at {offset}");
        }
    }
}

#[test]
fn retention_by_time_keeps_bytes_held_by_readers_valid() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(1);
    let log = Log::open(dir.path(), cfg.clone()).unwrap();
    for i in 0..6 {
        log.append(&batch(i, 2, 1_000 * i as i64, 50), 0).unwrap(); // one batch per segment
    }
    let held = log.read(0, 1 << 20, 12).unwrap();
    assert_eq!(Batches::new(held.clone()).count(), 1);
    log.set_config(LogConfig { retention_ms: Some(2_500), ..cfg });
    let report = log.enforce_retention(5_000).unwrap();
    // Max timestamps 1, 1_001, 2_001 are older than 2_500; 3_001 is not.
    assert_eq!(report.segments_deleted, 3);
    assert_eq!(report.log_start_offset, 6);
    assert_eq!(log.log_start_offset(), 6);
    assert_eq!(log_files(dir.path(), ".log").len(), 3);
    assert_eq!(log_files(dir.path(), "index").len(), 2 * 3, "only sealed segments have index files");
    verify_crc(&held).unwrap();
    assert!(same_batch(&held, &batch(0, 2, 0, 50)));
    assert!(matches!(log.read(4, 100, 12), Err(ReadError::OffsetOutOfRange { log_start: 6, .. })));
    assert_eq!(read_all(&log).len(), 3);
    // The active segment is never deleted, however old.
    let report = log.enforce_retention(1_000_000).unwrap();
    assert_eq!((report.segments_deleted, log.segment_count()), (2, 1));
    assert_eq!(log.log_start_offset(), 10);
}

#[test]
fn retention_by_bytes_deletes_oldest_sealed_segments() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(1);
    let log = Log::open(dir.path(), cfg.clone()).unwrap();
    let len = batch(0, 2, 0, 50).len() as u64;
    for i in 0..10 {
        log.append(&batch(i, 2, 0, 50), 0).unwrap();
    }
    let held = log.read(0, 1 << 20, 20).unwrap();
    log.set_config(LogConfig { retention_bytes: Some(3 * len + len / 2), ..cfg });
    let report = log.enforce_retention(0).unwrap();
    assert_eq!(report.segments_deleted, 7);
    assert_eq!(report.bytes_deleted, 7 * len);
    assert_eq!(log.size_bytes(), 3 * len);
    assert_eq!(log.log_start_offset(), 14);
    assert_eq!(log_files(dir.path(), ".log").len(), 3);
    verify_crc(&held).unwrap();
    drop(log);
    let log = Log::open(dir.path(), config(1)).unwrap();
    assert_eq!((log.log_start_offset(), log.log_end_offset()), (14, 20));
}

#[test]
fn offset_for_timestamp_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), config(2_000)).unwrap();
    // Record n has timestamp 10 * n; batches of 7 records.
    for i in 0..30 {
        let b = {
            let mut builder = quiver_protocol::batch::BatchBuilder::new(quiver_protocol::batch::Compression::None);
            for r in 0..7 {
                builder.append(10 * (7 * i + r), None, Some(&[i as u8; 40]), &[]);
            }
            builder.build()
        };
        log.append(&b, 0).unwrap();
    }
    assert!(log.segment_count() >= 3);
    let check = |log: &Log| {
        for t in [-5i64, 0, 1, 9, 10, 11, 69, 70, 71, 500, 1_234, 2_090] {
            let n = (t + 9).div_euclid(10).max(0);
            assert_eq!(log.offset_for_timestamp(t).unwrap(), Some((n, 10 * n)), "timestamp {t}");
        }
        assert_eq!(log.offset_for_timestamp(2_091).unwrap(), None);
    };
    check(&log);
    log.close().unwrap();
    drop(log);
    check(&Log::open(dir.path(), config(2_000)).unwrap());
    // Without index files, the sealed segments are scanned and answer the same.
    for name in log_files(dir.path(), "index") {
        std::fs::remove_file(dir.path().join(name)).unwrap();
    }
    check(&Log::open(dir.path(), config(2_000)).unwrap());
}

#[test]
fn close_and_reopen_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let mut originals = Vec::new();
    {
        let log = Log::open(dir.path(), config(1_500)).unwrap();
        for i in 0..20 {
            let b = batch(i, 1 + i as usize % 3, 100 * i as i64, 60);
            log.append(&b, i as i32).unwrap();
            originals.push(b);
        }
        log.close().unwrap();
        assert_eq!(log.durable_end_offset(), log.log_end_offset());
    }
    let log = Log::open(dir.path(), config(1_500)).unwrap();
    assert!(log.segment_count() > 2);
    let stored = read_all(&log);
    assert_eq!(stored.len(), originals.len());
    for (i, ((header, bytes), original)) in stored.iter().zip(&originals).enumerate() {
        assert!(same_batch(bytes, original));
        assert_eq!(header.leader_epoch, i as i32);
    }
    let end = log.log_end_offset();
    assert_eq!(log.durable_end_offset(), end);
    assert_eq!(log.append(&batch(99, 1, 0, 5), 0).unwrap().base_offset, end);
}

#[test]
fn sync_to_makes_records_durable_and_shares_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(dir.path(), config(4_000)).unwrap());
    assert_eq!(log.durable_end_offset(), 0);
    log.append(&batch(0, 3, 0, 10), 0).unwrap();
    assert_eq!(log.durable_end_offset(), 0, "append alone is not durable");
    log.sync_to(3).unwrap();
    assert_eq!(log.durable_end_offset(), 3);
    log.sync_to(1_000).unwrap(); // beyond the end: syncs what exists, returns
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                for i in 0..50 {
                    let info = log.append(&batch(t * 100 + i, 2, 0, 30), 0).unwrap();
                    log.sync_to(info.last_offset + 1).unwrap();
                    assert!(log.durable_end_offset() > info.last_offset);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(log.log_end_offset(), 3 + 4 * 50 * 2);
    assert_eq!(log.durable_end_offset(), log.log_end_offset());
    assert!(log.segment_count() > 1);
    assert_eq!(read_all(&log).len(), 1 + 200);
}

#[test]
fn concurrent_reads_never_see_partial_batches() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(dir.path(), config(8_000)).unwrap());
    let writer = {
        let log = log.clone();
        std::thread::spawn(move || {
            for i in 0..500 {
                log.append(&batch(i, 1 + i as usize % 4, 0, 40), 0).unwrap();
            }
        })
    };
    let mut next = 0;
    while !(writer.is_finished() && next == log.log_end_offset()) {
        let end = log.log_end_offset();
        for item in Batches::new(log.read(next, 1_000, end).unwrap()) {
            let (header, bytes) = item.unwrap();
            verify_crc(&bytes).unwrap();
            assert_eq!(header.base_offset, next);
            next = header.next_offset();
        }
    }
    writer.join().unwrap();
    assert_eq!(next, 1_250);
}

/// Appends `batches` batches of two records, `per_segment` batches to a
/// segment, and closes the log. Returns the length of one batch.
fn write_and_close(dir: &std::path::Path, batches: u64, per_segment: u64) -> usize {
    let len = batch(0, 2, 0, 50).len();
    let log = Log::open(dir, config(per_segment * len as u64)).unwrap();
    for i in 0..batches {
        log.append(&batch(i, 2, 0, 50), 0).unwrap();
    }
    log.close().unwrap();
    len
}

#[test]
fn reads_past_the_checked_prefix_of_a_sealed_segment_still_check() {
    let dir = tempfile::tempdir().unwrap();
    let len = write_and_close(dir.path(), 6, 4);
    let log = Log::open(dir.path(), config(4 * len as u64)).unwrap();
    // A read of the first batch only checks that far into the sealed segment.
    assert_eq!(log.read(0, 1, 12).unwrap().len(), len);
    // Damage the third batch while the log is open: the next read, which
    // starts inside the checked prefix, still checks the rest.
    let path = dir.path().join("00000000000000000000.log");
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[0xff], (2 * len + len / 2) as u64).unwrap();
    let read = log.read(0, 1 << 20, 12).unwrap();
    assert_eq!(read.len(), 2 * len, "stops before the damaged batch");
    assert!(matches!(log.read(4, 1 << 20, 12), Err(ReadError::Corrupt { offset: 4, .. })));
}

#[test]
fn corrupt_sealed_batch_is_reported_at_read_time() {
    let dir = tempfile::tempdir().unwrap();
    let len = write_and_close(dir.path(), 5, 3);
    // Flip a bit in the value of the second batch of the sealed segment.
    let path = dir.path().join("00000000000000000000.log");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[len + len / 2] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();

    let log = Log::open(dir.path(), config(3 * len as u64)).unwrap();
    assert_eq!(log.log_end_offset(), 10, "sealed segments are not scanned at open");
    let first = log.read(0, 1 << 20, 10).unwrap();
    assert_eq!(first.len(), len, "stops before the corrupt batch");
    assert!(matches!(log.read(2, 1 << 20, 10), Err(ReadError::Corrupt { offset: 2, .. })));
    assert!(matches!(log.read(3, 1 << 20, 10), Err(ReadError::Corrupt { offset: 3, .. })));
    assert_eq!(Batches::new(log.read(6, 1 << 20, 10).unwrap()).count(), 2);
}

#[test]
fn a_directory_is_opened_by_one_log_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), LogConfig::default()).unwrap();
    assert!(matches!(Log::open(dir.path(), LogConfig::default()), Err(OpenError::Locked(_))));
    drop(log);
    Log::open(dir.path(), LogConfig::default()).unwrap();
}

#[test]
fn append_rejects_unparseable_batches() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), LogConfig::default()).unwrap();
    assert!(matches!(log.append(&[1, 2, 3], 0), Err(AppendError::Invalid(_))));
    let b = batch(0, 2, 0, 10);
    assert!(matches!(log.append(&b[..b.len() - 1], 0), Err(AppendError::Invalid(_))));
    assert_eq!(log.log_end_offset(), 0);
    assert_eq!(log.size_bytes(), 0);
}

#[test]
fn stray_files_are_removed_or_ignored() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = Log::open(dir.path(), config(1)).unwrap();
        log.append(&batch(0, 1, 0, 10), 0).unwrap();
        log.append(&batch(1, 1, 0, 10), 0).unwrap();
        log.close().unwrap();
    }
    let write = |name: &str| std::fs::write(dir.path().join(name), b"junk").unwrap();
    write("00000000000000000000.log.deleted");
    write("00000000000000000000.index.tmp");
    write("00000000000000000500.index");
    write("00000000000000000500.timeindex");
    write("00000000000000000500.producers");
    write("00000000000000000500.txnindex");
    write("notes.txt");
    let log = Log::open(dir.path(), config(1)).unwrap();
    assert_eq!(read_all(&log).len(), 2);
    let mut names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            ".lock",
            "00000000000000000000.index",
            "00000000000000000000.log",
            "00000000000000000000.timeindex",
            "00000000000000000000.txnindex",
            "00000000000000000001.index",
            "00000000000000000001.log",
            "00000000000000000001.producers",
            "00000000000000000001.timeindex",
            "00000000000000000001.txnindex",
            "notes.txt",
            "recovery-point"
        ]
    );
}

#[test]
fn empty_active_segment_after_a_crash_during_roll() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = Log::open(dir.path(), config(1 << 20)).unwrap();
        log.append(&batch(0, 4, 0, 10), 0).unwrap();
        log.close().unwrap();
    }
    // The crash left the old segment's index files and an empty new segment.
    std::fs::File::create(dir.path().join("00000000000000000004.log")).unwrap();
    let log = Log::open(dir.path(), config(1 << 20)).unwrap();
    assert_eq!(log.segment_count(), 2);
    assert_eq!(log.log_end_offset(), 4);
    assert_eq!(log.append(&batch(1, 1, 0, 10), 0).unwrap().base_offset, 4);
    assert_eq!(read_all(&log).len(), 2);
}

#[test]
fn log_is_send_and_sync() {
    fn shareable<T: Send + Sync>() {}
    shareable::<Log>();
}

/// Truncation for a follower: batches from the cut on disappear (a batch
/// holding the cut goes whole), later segments are deleted, appends continue
/// at the new end with the leader epoch given, and a reopen sees the same.
#[test]
fn truncate_to_cuts_whole_batches_and_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), config(2_000)).unwrap();
    for i in 0..30u64 {
        log.append(&batch(i, 4, i as i64 * 10, 100), 1).unwrap();
    }
    assert!(log.segment_count() > 3, "several segments");
    assert_eq!(log.log_end_offset(), 120);
    // Offset 50 is inside the batch 48..=51: that batch goes too.
    assert_eq!(log.truncate_to(50).unwrap(), 48);
    assert_eq!(log.log_end_offset(), 48);
    assert!(log.durable_end_offset() <= 48);
    let segments = log.segment_count();
    assert!(log_files(dir.path(), "log").len() == segments, "later segment files are gone");
    let info = log.append(&batch(99, 2, 5_000, 10), 2).unwrap();
    assert_eq!(info.base_offset, 48);
    let all = read_all(&log);
    assert_eq!(all.len(), 13);
    assert_eq!((all[12].0.base_offset, all[12].0.leader_epoch), (48, 2));
    assert!(all[..12].iter().all(|(h, _)| h.leader_epoch == 1));
    // Past the end: nothing changes.
    assert_eq!(log.truncate_to(1_000).unwrap(), 50);
    drop(log);
    let log = Log::open(dir.path(), config(2_000)).unwrap();
    assert_eq!(log.log_end_offset(), 50);
    assert_eq!(read_all(&log).len(), 13);
    // To the start: empty, same start.
    assert_eq!(log.truncate_to(0).unwrap(), 0);
    assert_eq!((log.log_start_offset(), log.log_end_offset(), log.segment_count()), (0, 0, 1));
    assert_eq!(log.append(&batch(7, 1, 0, 10), 3).unwrap().base_offset, 0);
}

#[test]
fn reset_starts_an_empty_log_past_its_end_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), config(1024 * 1024)).unwrap();
    for i in 0..5 {
        log.append(&batch(i, 2, 0, 50), 1).unwrap();
    }
    assert_eq!(log.log_end_offset(), 10);
    assert!(log.reset_to(10).is_err(), "not past the end");
    log.reset_to(40).unwrap();
    assert_eq!((log.log_start_offset(), log.log_end_offset(), log.durable_end_offset()), (40, 40, 40));
    assert!(matches!(log.read(10, 1 << 20, i64::MAX), Err(ReadError::OffsetOutOfRange { .. })));
    assert_eq!(log.append(&batch(0, 3, 0, 50), 2).unwrap().base_offset, 40);
    assert_eq!(log_files(dir.path(), ".log"), ["00000000000000000040.log"]);
    log.flush().unwrap();
    drop(log);
    let log = Log::open(dir.path(), config(1024 * 1024)).unwrap();
    assert_eq!((log.log_start_offset(), log.log_end_offset()), (40, 43));
    let read = read_all(&log);
    assert_eq!(read.len(), 1);
}
