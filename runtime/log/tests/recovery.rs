//! Crash recovery: damage the files of a log the way a crash or a bad disk
//! would, reopen it, and check that exactly the batches before the damage
//! survive and that appends continue with consecutive offsets. Every case
//! runs for many seeds; a failure prints its seed.

mod common;

use std::fs::OpenOptions;
use std::path::Path;

use bytes::Bytes;
use common::{Rng, batch, config, for_seeds, read_all, same_batch};
use quiver_log::Log;

const SEEDS: std::ops::Range<u64> = 0..40;

/// What was appended, and where the active segment's batches lie.
struct Written {
    originals: Vec<Bytes>,
    bases: Vec<i64>,
    end: i64,
    /// Index in `originals` of the active segment's first batch.
    first_active: usize,
    active_path: std::path::PathBuf,
    /// (start, end) byte range of each active batch in its file.
    active_ranges: Vec<(u64, u64)>,
}

fn segment_bases(dir: &Path) -> Vec<i64> {
    let mut bases: Vec<i64> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".log").map(|stem| stem.parse().unwrap())
        })
        .collect();
    bases.sort();
    bases
}

/// Appends a random number of random batches over several segments and
/// drops the log without close(), as a crash would (the page cache stays).
fn write_log(dir: &Path, rng: &mut Rng) -> Written {
    let log = Log::open(dir, config(6_000)).unwrap();
    let mut originals = Vec::new();
    let mut bases = Vec::new();
    for i in 0..20 + rng.below(30) {
        let b = batch(rng.next(), 1 + rng.below(5) as usize, 100 * i as i64, rng.below(300) as usize);
        bases.push(log.append(&b, 1).unwrap().base_offset);
        originals.push(b);
    }
    let end = log.log_end_offset();
    drop(log);
    let active_base = *segment_bases(dir).last().unwrap();
    let first_active = bases.iter().position(|&b| b >= active_base).unwrap_or(bases.len());
    let mut position = 0;
    let active_ranges = originals[first_active..]
        .iter()
        .map(|b| {
            position += b.len() as u64;
            (position - b.len() as u64, position)
        })
        .collect();
    Written {
        originals,
        bases,
        end,
        first_active,
        active_path: dir.join(format!("{active_base:020}.log")),
        active_ranges,
    }
}

/// Runs `case` for every seed on a freshly written log that was never
/// synced (as a crash would leave it), with the seed's random source.
fn with_written_logs(case: impl Fn(&Path, &mut Rng, &Written)) {
    for_seeds(SEEDS, |seed| {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Rng::new(seed);
        let written = write_log(dir.path(), &mut rng);
        case(dir.path(), &mut rng, &written);
    });
}

/// Reopens and checks that exactly the first `surviving` batches are there,
/// intact, and that appending continues right after them (also across
/// another reopen).
fn check(dir: &Path, written: &Written, surviving: usize) {
    let expected_end = written.bases.get(surviving).copied().unwrap_or(written.end);
    let log = Log::open(dir, config(6_000)).unwrap();
    assert_eq!(log.log_end_offset(), expected_end);
    assert_eq!(log.durable_end_offset(), expected_end);
    let stored = read_all(&log);
    assert_eq!(stored.len(), surviving);
    for (i, (header, bytes)) in stored.iter().enumerate() {
        assert_eq!(header.base_offset, written.bases[i]);
        assert!(same_batch(bytes, &written.originals[i]), "batch {i} differs");
    }
    let extra = batch(7, 3, 0, 20);
    assert_eq!(log.append(&extra, 2).unwrap().base_offset, expected_end);
    drop(log);
    let log = Log::open(dir, config(6_000)).unwrap();
    assert_eq!(log.log_end_offset(), expected_end + 3);
    let stored = read_all(&log);
    assert_eq!(stored.len(), surviving + 1);
    assert!(same_batch(&stored[surviving].1, &extra));
}

/// The batch of the active segment containing byte `position`.
fn active_batch_at(written: &Written, position: u64) -> (usize, u64) {
    let k = written.active_ranges.iter().position(|&(s, e)| s <= position && position < e).unwrap();
    (k, position - written.active_ranges[k].0)
}

#[test]
fn cut_active_segment_at_random_positions() {
    with_written_logs(|dir, rng, written| {
        let active_len = std::fs::metadata(&written.active_path).unwrap().len();
        let cut = rng.below(active_len + 1);
        OpenOptions::new().write(true).open(&written.active_path).unwrap().set_len(cut).unwrap();
        let whole = written.active_ranges.iter().filter(|&&(_, e)| e <= cut).count();
        check(dir, written, written.first_active + whole);
    });
}

#[test]
fn flip_random_bits_in_the_active_segment() {
    with_written_logs(|dir, rng, written| {
        let mut bytes = std::fs::read(&written.active_path).unwrap();
        if bytes.is_empty() {
            return;
        }
        let mut surviving = written.originals.len();
        for _ in 0..1 + rng.below(3) {
            // Mostly the tail, sometimes anywhere.
            let tail = if rng.below(2) == 0 { 2_000 } else { bytes.len() as u64 };
            let position = bytes.len() as u64 - 1 - rng.below(tail.min(bytes.len() as u64));
            bytes[position as usize] ^= 1 << rng.below(8);
            let (k, within) = active_batch_at(written, position);
            // The leader epoch (bytes 12..16) is rewritten by the broker and
            // covered by no check, by design: a flip there goes unnoticed.
            if !(12..16).contains(&within) {
                surviving = surviving.min(written.first_active + k);
            }
        }
        std::fs::write(&written.active_path, &bytes).unwrap();
        check(dir, written, surviving);
    });
}

#[test]
fn garbage_after_the_last_batch_is_truncated() {
    with_written_logs(|dir, rng, written| {
        let mut bytes = std::fs::read(&written.active_path).unwrap();
        let len = 1 + rng.below(600) as usize;
        match rng.below(3) {
            0 => bytes.extend(std::iter::repeat_n(0u8, len)),
            1 => bytes.extend((0..len).map(|_| rng.next() as u8)),
            // A plausible header of a batch that never finished writing.
            _ => bytes.extend_from_slice(&batch(1, 3, 0, 100)[..len.min(150)]),
        }
        std::fs::write(&written.active_path, &bytes).unwrap();
        drop(Log::open(dir, config(6_000)).unwrap());
        assert_eq!(
            std::fs::metadata(&written.active_path).unwrap().len(),
            written.active_ranges.last().map_or(0, |r| r.1),
            "garbage truncated"
        );
        check(dir, written, written.originals.len());
    });
}

#[test]
fn missing_or_damaged_index_files_of_sealed_segments_are_rebuilt() {
    with_written_logs(|dir, rng, written| {
        let bases = segment_bases(dir);
        assert!(bases.len() > 1, "the test needs sealed segments");
        let mut damaged = Vec::new();
        for &base in &bases[..bases.len() - 1] {
            for ext in ["index", "timeindex"] {
                let path = dir.join(format!("{base:020}.{ext}"));
                match rng.below(4) {
                    0 => std::fs::remove_file(&path).unwrap(),
                    1 => {
                        let len = std::fs::metadata(&path).unwrap().len();
                        let f = OpenOptions::new().write(true).open(&path).unwrap();
                        f.set_len(len.saturating_sub(1 + rng.below(5))).unwrap();
                    }
                    2 => {
                        let junk: Vec<u8> = (0..8 + rng.below(40)).map(|_| rng.next() as u8).collect();
                        std::fs::write(&path, junk).unwrap();
                    }
                    _ => continue,
                }
                damaged.push(path);
            }
        }
        check(dir, written, written.originals.len());
        for path in damaged {
            assert!(path.exists(), "{} rebuilt", path.display());
        }
        // Timestamp lookups agree with what was written: batch i starts at 100 * i.
        let log = Log::open(dir, config(6_000)).unwrap();
        for i in (0..written.originals.len()).step_by(3) {
            let ts = 100 * i as i64;
            assert_eq!(log.offset_for_timestamp(ts).unwrap(), Some((written.bases[i], ts)));
        }
    });
}

/// A power loss between a roll and the next fsync can cut a segment that
/// was sealed after the last recovery point (none was written here: the log
/// was never synced). Opening checks those segments: the log ends at the
/// first torn batch, later segments are dropped, appends continue.
#[test]
fn a_sealed_segment_cut_after_the_recovery_point_ends_the_log() {
    with_written_logs(|dir, rng, written| {
        let bases = segment_bases(dir);
        assert!(bases.len() > 1, "the test needs sealed segments");
        let k = rng.below(bases.len() as u64 - 1) as usize;
        let (first, next) = (bases[k], bases[k + 1]);
        // The batches of segment k and their byte ranges in its file.
        let mut position = 0u64;
        let ranges: Vec<(usize, u64, u64)> = (0..written.originals.len())
            .filter(|&i| written.bases[i] >= first && written.bases[i] < next)
            .map(|i| {
                let len = written.originals[i].len() as u64;
                position += len;
                (i, position - len, position)
            })
            .collect();
        let path = dir.join(format!("{first:020}.log"));
        let cut = rng.below(position);
        OpenOptions::new().write(true).open(&path).unwrap().set_len(cut).unwrap();
        // Whole batches before the cut survive, even one ending exactly at it.
        let surviving = ranges.iter().find(|&&(_, _, end)| end > cut).map_or(ranges[0].0, |&(i, _, _)| i);
        check(dir, written, surviving);
        let left = segment_bases(dir);
        assert_eq!(left.first(), Some(&bases[0]));
        assert!(left.iter().all(|&b| b <= first), "segments after the cut are gone: {left:?}");
    });
}

/// Once a roll is fsynced, the recovery point moves to the active segment,
/// so opening does not read the sealed segments again.
#[test]
fn a_synced_roll_moves_the_recovery_point() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(1);
    let log = Log::open(dir.path(), config(6_000)).unwrap();
    let point = || std::fs::read_to_string(dir.path().join(quiver_log::log::RECOVERY_POINT_FILE)).unwrap();
    assert_eq!(point(), "0");
    for i in 0..40 {
        log.append(&batch(rng.next(), 3, 100 * i, 200), 1).unwrap();
    }
    log.flush().unwrap();
    let bases = segment_bases(dir.path());
    assert!(bases.len() > 1);
    assert_eq!(point(), bases.last().unwrap().to_string());
    // A truncation into a sealed segment moves it back.
    let end = log.truncate_to(bases[1]).unwrap();
    assert_eq!(end, bases[1]);
    let kept = segment_bases(dir.path());
    assert_eq!(point(), kept.last().unwrap().to_string());
}
