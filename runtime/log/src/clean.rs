//! The cleaning pass of a compacted log: [`Log::clean`] reads the dirty
//! part into an [`OffsetMap`], then rewrites every segment up to where the
//! map reaches, keeping what [`compaction::keep_record`] keeps, and swaps the
//! new segments in. The decisions are in [`crate::compaction`]; this module
//! is the I/O around them.
//!
//! Crash safety (Kafka's discipline): a group of segments `[B, E)` is
//! written to `B.E.cleaned` and fsynced; renaming it to `B.E.swap` (and
//! fsyncing the directory) commits the swap; the old segments are then
//! deleted and the swap file renamed to `B.log`. [`Log::open`] deletes
//! `.cleaned` files and completes any `.swap`: the old segments of `[B, E)`
//! go, the swap file becomes `B.log`. A kill at any point leaves either the
//! old segments or the new one, each whole. Segment-list surgery (retention,
//! truncation, reset) waits on `swap_lock` while a group is swapped, so it
//! never runs between the check that a group is still there and its swap.

use std::fs::{self, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use quiver_protocol::batch::{self, BatchBuilder, BatchHeader};
use quiver_transactions::partition::AbortedTxn;
use tracing::{info, warn};

use crate::Log;
use crate::compaction::{self, Cleanable, CompactionConfig, OffsetMap, SegmentSpan};
use crate::log::{delete_segment_files, sync_dir};
use crate::producers::Producers;
use crate::segment::{self, LOG_EXT, Segment, SegmentFile};

/// Where the cleaner's progress survives restarts: the first dirty offset
/// and the time of the last clean.
pub const CHECKPOINT_FILE: &str = "cleaner-checkpoint";
const CLEANED_EXT: &str = "cleaned";
const SWAP_EXT: &str = "swap";

/// What the caller of [`Log::clean`] decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CleanOptions {
    /// Memory for the map of keys to their latest offsets; a dirty part
    /// with more keys than fit is cleaned over several passes.
    pub dedupe_buffer_bytes: usize,
    /// Clean whatever the dirty ratio (an operator asked).
    pub force: bool,
}

impl Default for CleanOptions {
    fn default() -> Self {
        CleanOptions { dedupe_buffer_bytes: 128 * 1024 * 1024, force: false }
    }
}

/// What one cleaning pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CleanReport {
    /// The pass's clock.
    pub now_ms: i64,
    /// Offsets below this were clean before the pass...
    pub first_dirty_offset: i64,
    /// ...and below this after it (the next pass starts here).
    pub cleaned_to: i64,
    pub segments_read: usize,
    pub segments_written: usize,
    /// Bytes of batches read: the map pass and the copy.
    pub bytes_read: u64,
    /// Bytes of the segments rewritten, before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub records_before: u64,
    pub records_after: u64,
    /// Tombstones dropped because their delete horizon had passed.
    pub tombstones_dropped: u64,
    /// Distinct keys in the dirty part the map covered, and its size.
    pub map_keys: usize,
    pub map_bytes: usize,
}

/// Where a [`Log::clean_until`] stops, as if the process was killed there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CleanStep {
    /// The first group's `.cleaned` file is written and fsynced.
    Cleaned,
    /// ...and renamed to `.swap`: the swap is committed.
    Committed,
    /// ...and the old segments are deleted; the swap file is not renamed.
    OldDeleted,
}

/// The cleaner's progress: in memory and in [`CHECKPOINT_FILE`].
#[derive(Debug, Clone, Default)]
pub(crate) struct CleanerCheckpoint {
    pub(crate) first_dirty: i64,
    pub(crate) last_clean_ms: Option<i64>,
}

impl CleanerCheckpoint {
    /// The checkpoint in `dir`; nothing cleaned when missing or unreadable.
    pub(crate) fn load(dir: &Path) -> CleanerCheckpoint {
        let text = fs::read_to_string(dir.join(CHECKPOINT_FILE)).unwrap_or_default();
        let mut fields = text.split_whitespace().map(str::parse::<i64>);
        match (fields.next(), fields.next()) {
            (Some(Ok(first_dirty)), Some(Ok(last))) => CleanerCheckpoint { first_dirty, last_clean_ms: Some(last) },
            _ => CleanerCheckpoint::default(),
        }
    }

    fn store(&self, dir: &Path) -> io::Result<()> {
        let text = format!("{} {}\n", self.first_dirty, self.last_clean_ms.unwrap_or(0));
        segment::write_file_atomically(&dir.join(CHECKPOINT_FILE), text.as_bytes(), true)
    }

    /// A truncation below the cleaned part (never above the high
    /// watermark in practice): the data after `end` is new.
    pub(crate) fn truncated_to(&mut self, end: i64) {
        self.first_dirty = self.first_dirty.min(end);
    }
}

/// `B.E.ext` for a group `[B, E)`.
fn group_file(dir: &Path, base: i64, end: i64, ext: &str) -> std::path::PathBuf {
    dir.join(format!("{base:020}.{end:020}.{ext}"))
}

/// At open, before the segments are listed: removes unfinished `.cleaned`
/// files and completes committed swaps.
pub(crate) fn recover_swaps(dir: &Path) -> io::Result<()> {
    let mut swaps = Vec::new();
    let mut logs = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        let parts: Vec<&str> = name.split('.').collect();
        let number = |s: &str| (s.len() == 20).then(|| s.parse::<i64>().ok()).flatten();
        match parts[..] {
            [base, end, CLEANED_EXT] if number(base).is_some() && number(end).is_some() => {
                info!(file = %path.display(), "removing an unfinished cleaned segment");
                fs::remove_file(&path)?;
            }
            [base, end, SWAP_EXT] => {
                if let (Some(base), Some(end)) = (number(base), number(end)) {
                    swaps.push((base, end, path.clone()));
                }
            }
            [base, LOG_EXT] => logs.extend(number(base)),
            _ => {}
        }
    }
    for (base, end, swap) in swaps {
        for &old in logs.iter().filter(|&&b| (base..end).contains(&b)) {
            let file = SegmentFile::open(dir, old, false)?;
            delete_segment_files(&file)?;
        }
        info!(file = %swap.display(), "completing the swap of a cleaned segment");
        fs::rename(&swap, dir.join(segment::file_name(base, LOG_EXT)))?;
        sync_dir(dir)?;
    }
    Ok(())
}

/// Lowers the calling thread's CPU priority (nice 10; on Linux the nice
/// value is per thread) for cleaning passes: on a busy machine the appends
/// and reads of the data path go first, and the cleaner takes what is left
/// (Redpanda runs its compaction in a scheduling group with fewer shares for
/// the same reason). Call it on a thread that runs only cleaning: an
/// unprivileged process cannot raise a thread's priority back.
pub fn lower_thread_priority() -> io::Result<()> {
    // SAFETY: gettid has no preconditions; setpriority only reads its
    // arguments (a thread id of this process and a nice value).
    let done = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10)
    };
    if done == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

fn invalid(offset: i64, e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("batch at offset {offset}: {e}"))
}

/// Whether a batch is data of an aborted transaction: the cleaner drops it
/// (its abort marker stays, so replicas and readers still see the
/// transaction end).
fn in_aborted(aborted: &[AbortedTxn], header: &BatchHeader) -> bool {
    header.is_transactional()
        && !header.is_control()
        && aborted.iter().any(|a| {
            a.producer_id == header.producer_id
                && a.first_offset <= header.base_offset
                && header.last_offset() < a.last_offset
        })
}

/// What the copy keeps of the batches of a cleaned group.
struct Copier<'a> {
    map: &'a OffsetMap,
    map_end: i64,
    now_ms: i64,
    delete_retention_ms: i64,
    producers: &'a Producers,
    /// Every abort the log's segments index.
    aborted: &'a [AbortedTxn],
}

impl Copier<'_> {
    /// The batch as it goes into the cleaned segment (the same bytes when
    /// nothing changes), or `None` when nothing of it stays. The batch
    /// ending at `group_end` stays, emptied if need be, so that a cleaned
    /// segment still ends where the next begins: a read below the log end
    /// always finds a batch, and a replica copying the log reaches its end.
    fn batch(
        &self,
        header: &BatchHeader,
        bytes: Bytes,
        group_end: i64,
        report: &mut CleanReport,
    ) -> io::Result<Option<Bytes>> {
        if header.is_control() {
            batch::verify_crc(&bytes).map_err(|e| invalid(header.base_offset, e))?;
            return Ok(Some(bytes));
        }
        // Each record's fate from its key alone, without decoding values
        // or headers: most batches of a changelog stay whole or go whole.
        let (_, body) = batch::records_section(&bytes).map_err(|e| invalid(header.base_offset, e))?;
        let horizon_passed = header.delete_horizon().is_some_and(|h| self.now_ms >= h);
        let aborted = in_aborted(self.aborted, header);
        let mut keep = Vec::with_capacity(header.record_count.clamp(0, 1 << 16) as usize);
        let (mut tombstone_kept, mut tombstones_dropped) = (false, 0u64);
        batch::for_each_key(&body, |delta, key, tombstone| {
            let offset = header.base_offset + i64::from(delta);
            let kept =
                !aborted && compaction::keep_record(offset, key, tombstone, self.map, self.map_end, horizon_passed);
            tombstone_kept |= kept && tombstone;
            // Dropped for its horizon, not because a newer record replaced it.
            tombstones_dropped += u64::from(
                !kept && tombstone && key.and_then(|k| self.map.get(k)).is_none_or(|latest| latest <= offset),
            );
            keep.push(kept);
        })
        .map_err(|e| invalid(header.base_offset, e))?;
        let kept = keep.iter().filter(|&&k| k).count();
        report.records_before += keep.len() as u64;
        report.records_after += kept as u64;
        report.tombstones_dropped += tombstones_dropped;
        // A batch's tombstones get their horizon the first time it is cleaned.
        let horizon = header.delete_horizon().or_else(|| {
            (tombstone_kept && header.last_offset() < self.map_end)
                .then(|| self.now_ms.saturating_add(self.delete_retention_ms))
        });
        let horizon_changes = tombstone_kept && horizon != header.delete_horizon();
        if kept == keep.len() && !horizon_changes {
            return Ok(Some(bytes));
        }
        let producers_last = header.producer_id != batch::NO_PRODUCER_ID
            && self.producers.last_batch_end(header.producer_id) == Some(header.last_offset());
        if kept == 0 && !producers_last && header.next_offset() != group_end {
            return Ok(None);
        }
        let records = batch::decode_section(header, &body).map_err(|e| invalid(header.base_offset, e))?;
        let codec = header.compression().map_err(|e| invalid(header.base_offset, e))?;
        let mut builder = BatchBuilder::rebuild_of(header, codec);
        if let (true, Some(h)) = (tombstone_kept, horizon) {
            builder = builder.with_delete_horizon(h);
        }
        for (r, _) in records.iter().zip(&keep).filter(|(_, k)| **k) {
            let delta = i32::try_from(r.offset - header.base_offset).map_err(|e| invalid(header.base_offset, e))?;
            builder.append_at(delta, r.timestamp, r.key.as_deref(), r.value.as_deref(), &r.headers);
        }
        let built = builder.build();
        let mut out = BytesMut::from(&built[..]);
        out[..16].copy_from_slice(&batch::patched_prefix(&built, header.base_offset, header.leader_epoch));
        Ok(Some(out.freeze()))
    }
}

impl Log {
    /// What the cleaner could do with this log now, `None` unless it is
    /// compacted. `bound`: offsets at or above it are off limits (the high
    /// watermark); the recovery point bounds it too.
    pub fn cleanable(&self, now_ms: i64, bound: i64) -> Option<Cleanable> {
        let config = self.config().compaction?;
        Some(self.plan(now_ms, bound, &config).0)
    }

    /// When the last clean ran (wall clock, ms), if ever.
    pub fn last_clean_ms(&self) -> Option<i64> {
        self.cleaner().last_clean_ms
    }

    /// One cleaning pass, if the log is compacted and due (or `force`):
    /// keeps the latest record of every key in `[log start, cleaned_to)`
    /// (see the module docs of [`crate::compaction`] for the rules).
    /// `throttle` is called with the bytes read, as they are read (it may
    /// sleep). Flushes the log first, so that what the pass may clean is
    /// durable. `Ok(None)`: nothing to do (or, unless `force`, another pass
    /// is running; a forced pass waits for it).
    pub fn clean(
        &self,
        now_ms: i64,
        bound: i64,
        options: &CleanOptions,
        throttle: &mut dyn FnMut(u64),
    ) -> io::Result<Option<CleanReport>> {
        self.clean_inner(now_ms, bound, options, throttle, None)
    }

    /// [`Log::clean`], stopping at `stop` as if the process died there:
    /// for crash tests. The log must be dropped and opened again after.
    #[doc(hidden)]
    pub fn clean_until(
        &self,
        now_ms: i64,
        bound: i64,
        options: &CleanOptions,
        stop: CleanStep,
    ) -> io::Result<Option<CleanReport>> {
        self.clean_inner(now_ms, bound, options, &mut |_| {}, Some(stop))
    }

    fn cleaner(&self) -> std::sync::MutexGuard<'_, CleanerCheckpoint> {
        self.cleaner.lock().expect("cleaner lock poisoned")
    }

    /// What the cleaner may do now ([`compaction::cleanable`], bounded by
    /// `bound` and the recovery point), with the segments as the planner
    /// saw them and their files.
    fn plan(
        &self,
        now_ms: i64,
        bound: i64,
        config: &CompactionConfig,
    ) -> (Cleanable, Vec<SegmentSpan>, Vec<Arc<SegmentFile>>) {
        let first_dirty = self.cleaner().first_dirty;
        let state = self.read_state();
        let spans: Vec<SegmentSpan> =
            state.segments.iter().enumerate().map(|(i, s)| s.span(state.segment_end(i))).collect();
        let files = state.segments.iter().map(|s| s.file.clone()).collect();
        let bound = bound.min(state.recovery_point);
        (compaction::cleanable(&spans, first_dirty, bound, config, now_ms), spans, files)
    }

    fn clean_inner(
        &self,
        now_ms: i64,
        bound: i64,
        options: &CleanOptions,
        throttle: &mut dyn FnMut(u64),
        stop: Option<CleanStep>,
    ) -> io::Result<Option<CleanReport>> {
        let config = self.config();
        let Some(compaction_config) = config.compaction.clone() else { return Ok(None) };
        // An operator's pass waits for a background one to finish.
        let _pass = match self.clean_lock.try_lock() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::WouldBlock) if options.force => {
                self.clean_lock.lock().expect("clean lock poisoned")
            }
            Err(_) => return Ok(None),
        };
        self.flush()?;
        let (plan, spans, files) = self.plan(now_ms, bound, &compaction_config);
        // Forced, a pass runs even with nothing dirty: it drops the
        // tombstones whose horizon has passed.
        let sealed_clean = plan.first_dirty_offset > spans[0].base_offset;
        let wanted = if options.force {
            plan.first_dirty_offset < plan.end_offset || sealed_clean
        } else {
            plan.is_due(compaction_config.min_cleanable_dirty_ratio)
        };
        if !wanted {
            return Ok(None);
        }
        let mut report = CleanReport { now_ms, first_dirty_offset: plan.first_dirty_offset, ..CleanReport::default() };

        // 1. Each key's latest offset in the dirty part, as far as the map holds.
        let mut map = OffsetMap::new(options.dedupe_buffer_bytes);
        let mut map_end = plan.first_dirty_offset;
        let mut full = false;
        // Below the bound (the last stable offset) every transaction is
        // decided.
        let aborted: Vec<AbortedTxn> =
            self.read_state().segments.iter().flat_map(|s| s.aborted.iter().copied()).collect();
        for (span, file) in spans.iter().zip(&files) {
            if span.next_offset <= plan.first_dirty_offset {
                continue;
            }
            if span.base_offset >= plan.end_offset || full {
                break;
            }
            segment::for_each_batch(&file.file, span.size, |header, _, bytes| {
                if header.last_offset() < plan.first_dirty_offset {
                    return Ok(true);
                }
                // An aborted transaction's records never replace a key's
                // value: they are dropped below.
                if !header.is_control() && !in_aborted(&aborted, header) {
                    if usize::try_from(header.record_count).unwrap_or(usize::MAX) > map.room() {
                        full = true;
                        return Ok(false);
                    }
                    report.bytes_read += bytes.len() as u64;
                    throttle(bytes.len() as u64);
                    let (_, body) = batch::records_section(&bytes).map_err(|e| invalid(header.base_offset, e))?;
                    batch::for_each_key(&body, |delta, key, _| {
                        if let Some(key) = key {
                            let offset = header.base_offset + i64::from(delta);
                            map.put(key, offset).expect("the map's room was checked");
                        }
                    })
                    .map_err(|e| invalid(header.base_offset, e))?;
                }
                map_end = header.next_offset();
                Ok(true)
            })?;
            if !full {
                map_end = span.next_offset;
            }
        }
        if full && map_end == plan.first_dirty_offset {
            return Err(io::Error::other(format!(
                "the cleaner's dedupe buffer of {} bytes cannot hold the keys of one batch at offset {}",
                options.dedupe_buffer_bytes, plan.first_dirty_offset
            )));
        }
        report.cleaned_to = map_end;
        report.map_keys = map.len();
        report.map_bytes = map.memory_bytes();

        // 2. Rewrite every segment below the map's end, group by group.
        let rewrite = spans.partition_point(|s| s.base_offset < map_end);
        let producers = self.producers().clone();
        let copier = Copier {
            map: &map,
            map_end,
            now_ms,
            delete_retention_ms: i64::try_from(compaction_config.delete_retention_ms).unwrap_or(i64::MAX),
            producers: &producers,
            aborted: &aborted,
        };
        // Positions in a segment are u32, as for appends.
        let group_bytes_max = config.segment_bytes_max.min(u64::from(u32::MAX));
        for group in compaction::group_segments(&spans[..rewrite], group_bytes_max) {
            let (base, end) = (spans[group.start].base_offset, spans[group.end - 1].next_offset);
            let cleaned_path = group_file(&self.dir, base, end, CLEANED_EXT);
            let inputs = spans[group.clone()].iter().zip(&files[group.clone()]);
            let segment = match self.write_cleaned(&cleaned_path, (base, end), inputs, &copier, throttle, &mut report) {
                Ok(segment) => segment,
                Err(e) => {
                    let _ = fs::remove_file(&cleaned_path);
                    return Err(e);
                }
            };
            if stop == Some(CleanStep::Cleaned) {
                return Ok(None);
            }
            if !self.swap_in(&cleaned_path, segment, &files[group], stop)? {
                return Ok(None);
            }
        }

        // 3. The next pass starts where this one's map ended.
        {
            let mut cleaner = self.cleaner();
            cleaner.first_dirty = map_end;
            cleaner.last_clean_ms = Some(now_ms);
            cleaner.store(&self.dir)?;
        }
        Ok(Some(report))
    }

    /// Writes the cleaned segment of the group `[base, end)` (its segments
    /// `inputs`) to `path` and fsyncs it.
    fn write_cleaned<'a>(
        &self,
        path: &Path,
        (base, end): (i64, i64),
        inputs: impl Iterator<Item = (&'a SegmentSpan, &'a Arc<SegmentFile>)>,
        copier: &Copier<'_>,
        throttle: &mut dyn FnMut(u64),
        report: &mut CleanReport,
    ) -> io::Result<Segment> {
        let index_interval_bytes = self.config().index_interval_bytes;
        let out = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?;
        let file = SegmentFile::adopt(&self.dir, base, out);
        let mut segment = Segment::empty(file.clone());
        let mut writer = BufWriter::with_capacity(1 << 20, &file.file);
        for (span, old) in inputs {
            report.segments_read += 1;
            report.bytes_before += span.size;
            segment::for_each_batch(&old.file, span.size, |header, _, bytes| {
                report.bytes_read += bytes.len() as u64;
                throttle(bytes.len() as u64);
                if let Some(kept) = copier.batch(header, bytes, end, report)? {
                    let mut stored = BatchHeader::parse(&kept).map_err(|e| invalid(header.base_offset, e))?;
                    stored.base_offset = header.base_offset;
                    writer.write_all(&kept)?;
                    let position = segment.size;
                    segment.record_batch(&stored, position, index_interval_bytes);
                }
                Ok(true)
            })?;
        }
        writer.flush()?;
        drop(writer);
        file.file.sync_all()?;
        // The aborts indexed by the group's segments, markers being kept.
        // (An abort whose data is gone now is harmless to list.)
        segment.aborted = {
            let state = self.read_state();
            let inputs = state.segments.iter().filter(|s| (base..end).contains(&s.base_offset()));
            inputs.flat_map(|s| s.aborted.iter().copied()).collect()
        };
        segment.next_offset = end;
        segment.time_index = segment.sealed_time_index();
        report.segments_written += 1;
        report.bytes_after += segment.size;
        Ok(segment)
    }

    /// Replaces the segments `old` (consecutive, still in the log) with the
    /// cleaned `segment` written at `cleaned`. `Ok(false)`: the pass must
    /// stop (a crash test's stop, or the log changed under it: the cleaned
    /// file is removed and the old segments stay).
    fn swap_in(
        &self,
        cleaned: &Path,
        segment: Segment,
        old: &[Arc<SegmentFile>],
        stop: Option<CleanStep>,
    ) -> io::Result<bool> {
        let _swap = self.swap_lock.lock().expect("swap lock poisoned");
        let start = {
            let state = self.read_state();
            let start = state.segments.iter().position(|s| Arc::ptr_eq(&s.file, &old[0]));
            let still_there = start.is_some_and(|start| {
                state.segments.len() > start + old.len()
                    && state.segments[start..start + old.len()].iter().zip(old).all(|(s, o)| Arc::ptr_eq(&s.file, o))
            });
            match (start, still_there) {
                (Some(start), true) => start,
                _ => {
                    warn!(file = %cleaned.display(), "the log changed during the clean; discarding the cleaned segment");
                    fs::remove_file(cleaned)?;
                    return Ok(false);
                }
            }
        };
        let base = segment.base_offset();
        let swap = cleaned.with_extension(SWAP_EXT);
        fs::rename(cleaned, &swap)?;
        sync_dir(&self.dir)?;
        if stop == Some(CleanStep::Committed) {
            return Ok(false);
        }
        for file in old {
            delete_segment_files(file)?;
        }
        if stop == Some(CleanStep::OldDeleted) {
            return Ok(false);
        }
        fs::rename(&swap, segment.file.path(LOG_EXT))?;
        segment.write_index_files(true)?;
        sync_dir(&self.dir)?;
        let mut state = self.write_state();
        state.segments.splice(start..start + old.len(), [segment]);
        debug_assert_eq!(state.segments[start].base_offset(), base);
        Ok(true)
    }
}
