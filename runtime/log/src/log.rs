//! The log of one partition: [`Log`] ties the segments of a directory
//! together, assigns offsets, serves reads, rolls and deletes segments, and
//! tracks what is durable.
//!
//! Locks, always taken in this order, none but `clean_lock` and
//! `swap_lock` ever held across an fsync:
//! - `clean_lock`: one cleaning pass at a time (see `clean`).
//! - `swap_lock` serialises changes to the sealed segments (retention,
//!   truncation, reset, the cleaner's swaps); appends never wait for it.
//! - `append_lock` serialises writers (append, roll). The batch is written to
//!   the file under it but outside `state`, so readers never wait for I/O.
//! - `state` guards the segment list and what is published. Readers hold it
//!   only to snapshot a file handle and a byte range, then read without it,
//!   so a reader never sees a partly written batch.
//! - `sync_lock` serialises fsyncs so that concurrent [`Log::sync_to`]
//!   callers share them (group commit).

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;
use quiver_protocol::batch::{self, BATCH_HEADER_LEN, BatchError, BatchHeader};
use tracing::{debug, info, warn};

use crate::clean::CleanerCheckpoint;
use crate::producers::{Check, Producers};
use crate::segment::{
    self, DELETED_SUFFIX, INDEX_EXT, LOG_EXT, PRODUCERS_EXT, ScanOutcome, Segment, SegmentFile, TIME_INDEX_EXT,
    TMP_SUFFIX, TXN_INDEX_EXT, read_header_at,
};
use crate::{AppendError, AppendInfo, LogConfig, OpenError, ReadError, RetentionReport};
pub use quiver_transactions::partition::AbortedTxn;

/// Held with an exclusive `flock` while a [`Log`] has the directory open.
pub const LOCK_FILE_NAME: &str = ".lock";
/// Holds the recovery point: every segment with a lower base offset is
/// durable and whole; those from it on are checked at open.
pub const RECOVERY_POINT_FILE: &str = "recovery-point";

/// What [`Log::append_checked`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    New(AppendInfo),
    /// A retried batch of an idempotent producer, already in the log: the
    /// offsets it got then. Nothing was written.
    Duplicate(AppendInfo),
}

/// One partition's log. `Send + Sync`: share it behind an `Arc`; all
/// methods take `&self` and lock internally.
#[derive(Debug)]
pub struct Log {
    pub(crate) dir: PathBuf,
    config: RwLock<LogConfig>,
    append_lock: Mutex<()>,
    /// Idempotent producers' sequences; changed only under `append_lock`.
    producers: Mutex<Producers>,
    state: RwLock<State>,
    sync_lock: Mutex<()>,
    durable_end_offset: AtomicI64,
    /// Held for a whole cleaning pass: one cleaner per log at a time.
    pub(crate) clean_lock: Mutex<()>,
    /// Held by whatever removes or replaces sealed segments (retention,
    /// truncation, reset, the cleaner's swap), before `append_lock`.
    pub(crate) swap_lock: Mutex<()>,
    /// What the cleaner has done (see [`crate::clean`]); changed under
    /// `clean_lock`, or `append_lock` when a truncation moves it back.
    pub(crate) cleaner: Mutex<CleanerCheckpoint>,
    /// Keeps the directory's flock for the lifetime of the `Log`.
    _dir_lock: File,
}

#[derive(Debug)]
pub(crate) struct State {
    /// Ordered by base offset, contiguous (a segment covers the offsets up
    /// to the next one's base, holes included), never empty; the last is
    /// active.
    pub(crate) segments: Vec<Segment>,
    /// Sealed segments whose files (and index files) have not been fsynced.
    unsynced_sealed: Vec<Arc<SegmentFile>>,
    /// A segment file was created or deleted since the directory was fsynced.
    dir_dirty: bool,
    /// The recovery point on disk (see [`RECOVERY_POINT_FILE`]).
    pub(crate) recovery_point: i64,
}

impl State {
    fn active(&self) -> &Segment {
        self.segments.last().expect("a log always has an active segment")
    }

    fn log_start(&self) -> i64 {
        self.segments[0].base_offset()
    }

    fn log_end(&self) -> i64 {
        self.active().next_offset
    }

    /// Where a segment's offsets end: the next segment's base, or the log
    /// end for the active one.
    pub(crate) fn segment_end(&self, i: usize) -> i64 {
        self.segments.get(i + 1).map_or(self.log_end(), Segment::base_offset)
    }

    /// The base offset of the first segment after the one based at `base`
    /// (the log end if there is none).
    fn next_segment_base(&self, base: i64) -> i64 {
        let n = self.segments.partition_point(|s| s.base_offset() <= base);
        self.segments.get(n).map_or(self.log_end(), Segment::base_offset)
    }

    /// The segment holding `offset`, which must be in `[log_start, log_end)`.
    fn segment_for(&self, offset: i64) -> &Segment {
        let n = self.segments.partition_point(|s| s.base_offset() <= offset);
        &self.segments[n - 1]
    }
}

impl Log {
    /// Opens the log in `dir` (created if missing) and recovers it: the
    /// active segment is scanned and truncated at the first torn or corrupt
    /// batch, sealed segments are trusted with their index files (rebuilt if
    /// missing or inconsistent). Leftover `*.deleted` and `*.tmp` files and
    /// index files without a `.log` are removed; other unknown files are
    /// ignored.
    pub fn open(dir: &Path, config: LogConfig) -> Result<Log, OpenError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |error| OpenError::Io { path, error }
        };
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let lock_path = dir.join(LOCK_FILE_NAME);
        let dir_lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        match dir_lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(OpenError::Locked(dir.to_path_buf())),
            Err(TryLockError::Error(e)) => return Err(io_err(&lock_path)(e)),
        }

        crate::clean::recover_swaps(dir).map_err(io_err(dir))?;
        let mut bases = list_segments(dir).map_err(io_err(dir))?;
        if bases.is_empty() {
            SegmentFile::open(dir, 0, true).map_err(io_err(dir))?;
            bases.push(0);
        }
        // Sealed segments rolled after the last recovery point may have
        // been cut by a power loss before their fsync: the log ends at the
        // first torn batch or gap among them.
        let recovery_point = read_recovery_point(dir);
        if let Some(i) = first_damaged_sealed(dir, &bases, recovery_point).map_err(io_err(dir))? {
            for &later in &bases[i + 1..] {
                let path = dir.join(segment::file_name(later, LOG_EXT));
                let file = SegmentFile::open(dir, later, false).map_err(io_err(&path))?;
                delete_segment_files(&file).map_err(io_err(&path))?;
            }
            bases.truncate(i + 1);
            // It becomes the active segment: scanned and cut below.
            let path = dir.join(segment::file_name(bases[i], LOG_EXT));
            let file = SegmentFile::open(dir, bases[i], false).map_err(io_err(&path))?;
            remove_index_files(&file).map_err(io_err(&path))?;
        }
        let mut producers =
            Producers::load(&dir.join(segment::file_name(*bases.last().expect("a segment"), PRODUCERS_EXT)));
        let mut segments = Vec::with_capacity(bases.len());
        for (i, &base) in bases.iter().enumerate() {
            let path = dir.join(segment::file_name(base, LOG_EXT));
            let file = SegmentFile::open(dir, base, false).map_err(io_err(&path))?;
            let segment = match bases.get(i + 1) {
                Some(&next) => Segment::load_sealed(file.clone(), next).and_then(|loaded| match loaded {
                    Ok(segment) => Ok(segment),
                    Err(reason) => rebuild_sealed(file, next, &reason, config.index_interval_bytes),
                }),
                None => recover_active(file, config.index_interval_bytes, &mut producers),
            }
            .map_err(io_err(&path))?;
            segments.push(segment);
        }
        // Whatever the previous process left in the page cache becomes
        // durable now, so durable_end_offset can start at the log end.
        for segment in &segments {
            segment.file.file.sync_data().map_err(io_err(&segment.file.path(LOG_EXT)))?;
        }
        sync_dir(dir).map_err(io_err(dir))?;
        let active_base = segments.last().expect("at least one segment").base_offset();
        if recovery_point != Some(active_base) {
            write_recovery_point(dir, active_base).map_err(io_err(&dir.join(RECOVERY_POINT_FILE)))?;
        }

        let state = State { segments, unsynced_sealed: Vec::new(), dir_dirty: false, recovery_point: active_base };
        info!(
            dir = %dir.display(),
            log_start_offset = state.log_start(),
            log_end_offset = state.log_end(),
            segments = state.segments.len(),
            "opened log"
        );
        let cleaner = CleanerCheckpoint::load(dir);
        Ok(Log {
            dir: dir.to_path_buf(),
            clean_lock: Mutex::new(()),
            swap_lock: Mutex::new(()),
            cleaner: Mutex::new(cleaner),
            durable_end_offset: AtomicI64::new(state.log_end()),
            config: RwLock::new(config),
            append_lock: Mutex::new(()),
            producers: Mutex::new(producers),
            state: RwLock::new(state),
            sync_lock: Mutex::new(()),
            _dir_lock: dir_lock,
        })
    }

    /// Replaces the configuration; takes effect from the next append or
    /// retention pass (existing index entries are kept).
    pub fn set_config(&self, config: LogConfig) {
        *self.config.write().expect("config lock poisoned") = config;
    }

    /// The configuration in force.
    pub fn config(&self) -> LogConfig {
        self.config.read().expect("config lock poisoned").clone()
    }

    /// The partition directory this log owns.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends one batch that the caller has already validated
    /// (`quiver_protocol::batch::validate`): assigns offsets starting at the
    /// log end offset by writing a patched 16-byte prefix (base offset,
    /// length, leader epoch) followed by the rest of the batch, with no copy
    /// of the whole batch. The CRC does not cover the patched fields, so it
    /// stays valid. The data reaches the page cache only; see
    /// [`Log::sync_to`] for durability. Reads serve the batch without
    /// checking its CRC again: the validation is the caller's.
    ///
    /// Idempotent producers' batches update the producer state unchecked:
    /// this is how followers copy their leader's log.
    pub fn append(&self, batch: &[u8], leader_epoch: i32) -> Result<AppendInfo, AppendError> {
        match self.append_inner(batch, leader_epoch, false, None)? {
            Appended::New(info) | Appended::Duplicate(info) => Ok(info),
        }
    }

    /// [`Log::append`] for a leader: a batch of an idempotent producer is
    /// appended only if it continues that producer's sequence; a retry of
    /// one of its last few batches is not appended again but answered with
    /// the offsets it got; a gap or an older epoch is refused with
    /// [`AppendError::Sequence`].
    pub fn append_checked(&self, batch: &[u8], leader_epoch: i32) -> Result<Appended, AppendError> {
        self.append_inner(batch, leader_epoch, true, None)
    }

    /// [`Log::append`] for a replica copying its leader's log: the batch
    /// keeps its own base offset, which may be past the log end (the
    /// leader's log is compacted and has a hole there) but not before it.
    pub fn append_copy(&self, batch: &[u8], leader_epoch: i32) -> Result<AppendInfo, AppendError> {
        let base_offset = BatchHeader::parse(batch)?.base_offset;
        match self.append_inner(batch, leader_epoch, false, Some(base_offset))? {
            Appended::New(info) | Appended::Duplicate(info) => Ok(info),
        }
    }

    fn append_inner(
        &self,
        batch: &[u8],
        leader_epoch: i32,
        check: bool,
        at: Option<i64>,
    ) -> Result<Appended, AppendError> {
        let header = BatchHeader::parse(batch)?;
        if header.total_len() != batch.len() {
            return Err(BatchError::BadLength(batch.len() as i64).into());
        }
        if header.last_offset_delta < 0 {
            return Err(BatchError::Empty.into());
        }
        let len = batch.len() as u64;
        let config = self.config();
        let _append = self.append_lock.lock().expect("append lock poisoned");
        if check && let Check::Duplicate(info) = self.producers().check(&header)? {
            return Ok(Appended::Duplicate(info));
        }

        let (mut file, mut position, log_end) = self.active_end();
        let base_offset = match at {
            Some(at) if at < log_end => return Err(AppendError::Behind { base_offset: at, log_end }),
            Some(at) => at,
            None => log_end,
        };
        // A roll does not change the log end offset, only the file.
        let roll = {
            let state = self.read_state();
            let active = state.active();
            let bytes_max = config.segment_bytes_max.min(u64::from(u32::MAX));
            let last_relative = base_offset + i64::from(header.last_offset_delta) - active.base_offset();
            active.size > 0 && (active.size + len > bytes_max || last_relative > i64::from(i32::MAX))
        };
        if roll {
            self.roll_locked()?;
            (file, position, _) = self.active_end();
        }

        let prefix = batch::patched_prefix(batch, base_offset, leader_epoch);
        let written = file
            .file
            .write_all_at(&prefix, position)
            .and_then(|()| file.file.write_all_at(&batch[prefix.len()..], position + prefix.len() as u64));
        if let Err(e) = written {
            // Nothing was published; drop the partial bytes so the next
            // append (which writes at the same position) and recovery see a
            // clean end.
            let _ = file.file.set_len(position);
            return Err(e.into());
        }

        let mut stored = header;
        stored.base_offset = base_offset;
        stored.leader_epoch = leader_epoch;
        let marker = control_marker(&stored, batch);
        let aborted = self.producers().record(&stored, marker);
        let mut state = self.write_state();
        let active = state.segments.last_mut().expect("active segment");
        assert!(Arc::ptr_eq(&active.file, &file), "only appends change the active segment");
        active.record_batch(&stored, position, config.index_interval_bytes);
        active.aborted.extend(aborted);
        Ok(Appended::New(AppendInfo {
            base_offset,
            last_offset: stored.last_offset(),
            max_timestamp: stored.max_timestamp,
        }))
    }

    /// A producer's epoch and last sequence in this log, if known.
    pub fn producer_sequence(&self, producer_id: i64) -> Option<(i16, i32)> {
        self.producers().last_sequence_of(producer_id)
    }

    /// The first offset a read_committed reader may not read yet: the
    /// oldest open transaction's first offset, never above `high_watermark`.
    pub fn last_stable_offset(&self, high_watermark: i64) -> i64 {
        self.producers().txns().last_stable_offset(high_watermark)
    }

    /// The aborted transactions with data in `from..to`, for a
    /// read_committed read of that range: from the segments' aborted
    /// transaction indexes, starting with the segment that holds `from` (an
    /// abort's marker is never before its data).
    pub fn aborted_transactions(&self, from: i64, to: i64) -> Vec<AbortedTxn> {
        let state = self.read_state();
        let segments = state.segments.iter().filter(|s| s.next_offset > from);
        quiver_transactions::partition::aborted_overlapping(segments.flat_map(|s| &s.aborted), from, to)
    }

    /// The newest epoch of a producer this log has seen (its batches or a
    /// transaction marker), if known.
    pub fn producer_epoch(&self, producer_id: i64) -> Option<i16> {
        self.producers().epoch_of(producer_id)
    }

    /// The first offset of `producer_id`'s open transaction here, if any.
    pub fn open_transaction(&self, producer_id: i64) -> Option<i64> {
        self.producers().txns().open_of(producer_id)
    }

    /// Open transactions: (producer id, first offset), oldest first.
    pub fn open_transactions(&self) -> Vec<(i64, i64)> {
        self.producers().txns().open()
    }

    pub(crate) fn producers(&self) -> std::sync::MutexGuard<'_, Producers> {
        self.producers.lock().expect("producer state lock poisoned")
    }

    /// Whole batches starting with the one that contains `offset`, up to
    /// about `max_bytes` (at least one batch if any exists at or after
    /// `offset`, even a larger one), excluding batches whose last offset is
    /// `>= up_to` (e.g. the high watermark). A read never crosses a segment
    /// boundary, so it may return less than `max_bytes` before the log end.
    ///
    /// Every returned batch has a valid CRC: at the first corrupt batch the
    /// read returns the batches before it, or [`ReadError::Corrupt`] if it is
    /// the first. The result is one buffer filled by one positional read;
    /// batches are slices of it.
    pub fn read(&self, offset: i64, max_bytes: usize, up_to: i64) -> Result<Bytes, ReadError> {
        let corrupt = |reason: String| ReadError::Corrupt { offset, reason };
        // The segment to look in; a compacted log may hold nothing more in
        // it (a hole up to the next segment), then the next one is tried.
        let mut target = offset;
        let (file, position, end, first_len) = 'segments: loop {
            let (file, mut position, end) = {
                let state = self.read_state();
                let (log_start, log_end) = (state.log_start(), state.log_end());
                if target == offset && (offset < log_start || offset > log_end) {
                    return Err(ReadError::OffsetOutOfRange { offset, log_start, log_end });
                }
                if target >= log_end || target >= up_to {
                    return Ok(Bytes::new());
                }
                let target = target.max(state.log_start());
                let segment = state.segment_for(target);
                let position = segment.offset_index.lookup(segment.relative(target));
                (segment.file.clone(), position, segment.size)
            };
            // Find the first batch ending at or after `offset`, reading
            // headers only.
            loop {
                if position + BATCH_HEADER_LEN as u64 > end {
                    if position == end {
                        let next = self.read_state().next_segment_base(file.base_offset);
                        target = next.max(target + 1);
                        continue 'segments;
                    }
                    return Err(corrupt(format!(
                        "a partial batch header at position {position} of {}",
                        file.path(LOG_EXT).display()
                    )));
                }
                let raw = read_header_at(&file.file, position)?;
                let header = BatchHeader::parse(&raw)
                    .map_err(|e| corrupt(format!("bad batch header at position {position}: {e}")))?;
                let len = header.total_len() as u64;
                if position + len > end {
                    return Err(corrupt(format!("batch at position {position} extends past the segment end")));
                }
                if header.last_offset() >= offset {
                    if header.last_offset() >= up_to {
                        return Ok(Bytes::new());
                    }
                    break 'segments (file, position, end, len);
                }
                position += len;
            }
        };

        let want = (max_bytes as u64).max(first_len).min(end - position) as usize;
        let mut buf = segment::read_vec_at(&file.file, want, position)?;

        // Keep the whole, valid batches below `up_to`. Batches this process
        // checked already (appended, recovered, or read before) are not
        // checked again: a catch-up read of a fresh log costs no CRC.
        let checked = file.checked();
        let mut kept = 0usize;
        let mut expected_base: Option<i64> = None;
        while buf.len() - kept >= BATCH_HEADER_LEN {
            let rest = &buf[kept..];
            let problem = match BatchHeader::parse(rest) {
                Err(e) => Some(format!("bad batch header: {e}")),
                Ok(header) if header.total_len() > rest.len() => break, // cut by max_bytes
                Ok(header) if header.last_offset() >= up_to => break,
                Ok(header) if expected_base.is_some_and(|b| header.base_offset < b) => Some(format!(
                    "base offset {} where at least {} was expected",
                    header.base_offset,
                    expected_base.unwrap_or_default()
                )),
                Ok(header) if position + (kept + header.total_len()) as u64 <= checked => {
                    kept += header.total_len();
                    expected_base = Some(header.next_offset());
                    None
                }
                Ok(header) => match batch::verify_crc(&rest[..header.total_len()]) {
                    Err(e) => Some(e.to_string()),
                    Ok(()) => {
                        kept += header.total_len();
                        expected_base = Some(header.next_offset());
                        None
                    }
                },
            };
            if let Some(reason) = problem {
                if kept == 0 {
                    return Err(corrupt(reason));
                }
                warn!(
                    file = %file.path(LOG_EXT).display(),
                    position = position + kept as u64,
                    %reason,
                    "corrupt batch in segment; returning the batches before it"
                );
                break;
            }
        }
        if position <= checked {
            file.mark_checked(position + kept as u64);
        }
        buf.truncate(kept);
        Ok(Bytes::from(buf))
    }

    /// The first offset whose record timestamp is `>= timestamp_ms`, with
    /// that record's timestamp; `None` if there is none. Uses segment max
    /// timestamps and the time index to skip, then decodes the one batch
    /// that holds the answer.
    pub fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<Option<(i64, i64)>, ReadError> {
        let candidates: Vec<(Arc<SegmentFile>, u64, u64)> = {
            let state = self.read_state();
            state
                .segments
                .iter()
                .filter(|s| s.max_timestamp >= timestamp_ms)
                .map(|s| {
                    let position = s.time_index.lookup(timestamp_ms).map_or(0, |rel| s.offset_index.lookup(rel));
                    (s.file.clone(), position, s.size)
                })
                .collect()
        };
        for (file, mut position, end) in candidates {
            while position + BATCH_HEADER_LEN as u64 <= end {
                let raw = read_header_at(&file.file, position)?;
                let header = BatchHeader::parse(&raw).map_err(|e| ReadError::Corrupt {
                    offset: file.base_offset,
                    reason: format!("bad batch header at position {position}: {e}"),
                })?;
                let len = header.total_len() as u64;
                if header.max_timestamp >= timestamp_ms && position + len <= end {
                    let mut buf = vec![0u8; len as usize];
                    file.file.read_exact_at(&mut buf, position)?;
                    let records = batch::decode_records(&Bytes::from(buf))
                        .map_err(|e| ReadError::Corrupt { offset: header.base_offset, reason: e.to_string() })?;
                    if let Some(r) = records.iter().find(|r| r.timestamp >= timestamp_ms) {
                        return Ok(Some((r.offset, r.timestamp)));
                    }
                }
                position += len;
            }
        }
        Ok(None)
    }

    /// The first offset still stored; retention moves it forward.
    pub fn log_start_offset(&self) -> i64 {
        self.read_state().log_start()
    }

    /// The offset the next appended record gets.
    pub fn log_end_offset(&self) -> i64 {
        self.read_state().log_end()
    }

    /// Every record below this offset has been fsynced.
    pub fn durable_end_offset(&self) -> i64 {
        self.durable_end_offset.load(Ordering::Acquire)
    }

    /// Group commit: returns once every record below `end_offset` (at most
    /// the log end offset at the time of the call) is fsynced. Concurrent
    /// callers share fsyncs: whoever gets the sync lock fsyncs everything
    /// appended so far, and the others find their records already durable.
    /// Appends continue during the fsync.
    pub fn sync_to(&self, end_offset: i64) -> io::Result<()> {
        self.sync_inner(end_offset, false)
    }

    /// `sealed`: also when the records are durable already but a roll since
    /// left a sealed segment unsynced (the recovery point then moves past
    /// it: what the cleaner may touch).
    fn sync_inner(&self, end_offset: i64, sealed: bool) -> io::Result<()> {
        let pending_roll = || sealed && !self.read_state().unsynced_sealed.is_empty();
        if self.durable_end_offset() >= end_offset && !pending_roll() {
            return Ok(());
        }
        let _sync = self.sync_lock.lock().expect("sync lock poisoned");
        if self.durable_end_offset() >= end_offset && !pending_roll() {
            return Ok(());
        }
        let (snapshot_end, active, sealed, dir_dirty) = {
            let mut state = self.write_state();
            let dir_dirty = std::mem::replace(&mut state.dir_dirty, false);
            (state.log_end(), state.active().file.clone(), state.unsynced_sealed.clone(), dir_dirty)
        };
        let result = (|| {
            for file in &sealed {
                file.file.sync_data()?;
                // Index files after their log file: a durable index never
                // points at data that is not.
                for ext in [INDEX_EXT, TIME_INDEX_EXT] {
                    match File::open(file.path(ext)) {
                        Ok(f) => f.sync_all()?,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {} // deleted by retention
                        Err(e) => return Err(e),
                    }
                }
            }
            if dir_dirty {
                sync_dir(&self.dir)?;
            }
            active.file.sync_data()?;
            // Every segment before the snapshot's active one is durable
            // now (unless a truncation removed that one meanwhile). Once
            // per roll; under the state lock, so a truncation's lower
            // recovery point is never overwritten.
            if !sealed.is_empty() {
                let mut state = self.write_state();
                if state.recovery_point < active.base_offset
                    && state.segments.iter().any(|s| Arc::ptr_eq(&s.file, &active))
                {
                    write_recovery_point(&self.dir, active.base_offset)?;
                    state.recovery_point = active.base_offset;
                }
            }
            Ok(())
        })();
        let mut state = self.write_state();
        if let Err(e) = result {
            state.dir_dirty |= dir_dirty;
            return Err(e);
        }
        state.unsynced_sealed.retain(|f| !sealed.iter().any(|s| Arc::ptr_eq(s, f)));
        drop(state);
        self.durable_end_offset.fetch_max(snapshot_end, Ordering::AcqRel);
        Ok(())
    }

    /// Fsyncs everything appended so far, and the segments rolled since
    /// the last fsync (moving the recovery point).
    pub fn flush(&self) -> io::Result<()> {
        self.sync_inner(self.log_end_offset(), true)
    }

    /// Rolls the active segment if it is older than `segment_ms_max`, then
    /// deletes the oldest sealed segments per `retention_ms` (largest
    /// timestamp older than `now_ms - retention_ms`) and `retention_bytes`
    /// (while the log is larger). Only a prefix of the log is deleted, never
    /// the active segment. Readers holding a deleted segment keep reading
    /// from their open file handle.
    pub fn enforce_retention(&self, now_ms: i64) -> io::Result<RetentionReport> {
        let config = self.config();
        {
            let _append = self.append_lock.lock().expect("append lock poisoned");
            let (first, overdue) = {
                let state = self.read_state();
                let active = state.active();
                let overdue = config
                    .compaction
                    .as_ref()
                    .is_some_and(|c| crate::compaction::active_overdue(&active.span(active.next_offset), c, now_ms));
                (active.first_batch_timestamp, overdue)
            };
            let too_old = config.segment_ms_max.is_some_and(|age_max| {
                first.is_some_and(|ts| now_ms.saturating_sub(ts) > i64::try_from(age_max).unwrap_or(i64::MAX))
            });
            // A compacted log's record may wait in the active segment no
            // longer than `max_compaction_lag_ms`.
            if too_old || overdue {
                self.roll_locked()?;
            }
        }

        let _swap = self.swap_lock.lock().expect("swap lock poisoned");
        let (removed, log_start_offset) = {
            let mut state = self.write_state();
            let sealed = state.segments.len() - 1;
            let mut n = 0;
            if let Some(retention_ms) = config.retention_ms {
                let cutoff = now_ms.saturating_sub(i64::try_from(retention_ms).unwrap_or(i64::MAX));
                while n < sealed && state.segments[n].max_timestamp < cutoff {
                    n += 1;
                }
            }
            if let Some(bytes_max) = config.retention_bytes {
                let mut total: u64 = state.segments[n..].iter().map(|s| s.size).sum();
                while n < sealed && total > bytes_max {
                    total -= state.segments[n].size;
                    n += 1;
                }
            }
            let removed: Vec<Segment> = state.segments.drain(..n).collect();
            if !removed.is_empty() {
                state.dir_dirty = true;
                state.unsynced_sealed.retain(|f| !removed.iter().any(|s| Arc::ptr_eq(&s.file, f)));
            }
            (removed, state.log_start())
        };

        let mut first_error = None;
        for segment in &removed {
            info!(
                file = %segment.file.path(LOG_EXT).display(),
                bytes = segment.size,
                max_timestamp = segment.max_timestamp,
                "deleting segment by retention"
            );
            if let Err(e) = delete_segment_files(&segment.file) {
                warn!(file = %segment.file.path(LOG_EXT).display(), error = %e, "could not delete segment files");
                first_error.get_or_insert(e);
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        Ok(RetentionReport {
            segments_deleted: removed.len(),
            bytes_deleted: removed.iter().map(|s| s.size).sum(),
            log_start_offset,
        })
    }

    /// Seals the active segment now (if it holds anything) and starts a new
    /// one: for an operator's forced clean, which never touches the active
    /// segment.
    pub fn roll(&self) -> io::Result<()> {
        let _append = self.append_lock.lock().expect("append lock poisoned");
        self.roll_locked()
    }

    /// Bytes of batches stored in all segments.
    pub fn size_bytes(&self) -> u64 {
        self.read_state().segments.iter().map(|s| s.size).sum()
    }

    /// Number of segments, the active one included.
    pub fn segment_count(&self) -> usize {
        self.read_state().segments.len()
    }

    /// Closes cleanly: fsyncs everything and writes the active segment's
    /// index files. The log stays usable (a later append simply makes those
    /// index files stale, which is harmless: the active segment is always
    /// rebuilt by the recovery scan).
    pub fn close(&self) -> io::Result<()> {
        self.flush()?;
        let _append = self.append_lock.lock().expect("append lock poisoned");
        self.read_state().active().write_index_files(true)?;
        sync_dir(&self.dir)
    }

    /// Removes every batch whose last offset is at or after `end`, for a
    /// follower reconciling its log with a new leader (a batch that holds
    /// `end` goes whole, so the new log end may be below `end`). Later
    /// segments are deleted; the segment that holds the cut becomes the
    /// active one (its index files are dropped and rebuilt by a scan). The
    /// cut is durable when this returns. `end` at or past the log end
    /// changes nothing; `end` at or before the log start empties the log and
    /// keeps its start. Returns the new log end offset.
    ///
    /// Readers that took a byte range before the cut may still read it;
    /// replication truncates only above the high watermark, which consumers
    /// never read past.
    pub fn truncate_to(&self, end: i64) -> io::Result<i64> {
        let config = self.config();
        let _swap = self.swap_lock.lock().expect("swap lock poisoned");
        let _append = self.append_lock.lock().expect("append lock poisoned");
        let (keep, file, cut) = {
            let state = self.read_state();
            if end >= state.log_end() {
                return Ok(state.log_end());
            }
            let end = end.max(state.log_start());
            // The last segment starting below `end` (or the first one).
            let keep = state.segments.partition_point(|s| s.base_offset() < end).max(1) - 1;
            let segment = &state.segments[keep];
            let mut position = segment.offset_index.lookup(segment.relative(end));
            while position < segment.size {
                let header = BatchHeader::parse(&read_header_at(&segment.file.file, position)?)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                if header.last_offset() >= end {
                    break;
                }
                position += header.total_len() as u64;
            }
            (keep, segment.file.clone(), position)
        };
        let mut state = self.write_state();
        for removed in state.segments.drain(keep + 1..) {
            delete_segment_files(&removed.file)?;
        }
        remove_index_files(&file)?;
        file.file.set_len(cut)?;
        file.file.sync_all()?;
        let mut producers = Producers::load(&file.path(PRODUCERS_EXT));
        let rebuilt = recover_active(file.clone(), config.index_interval_bytes, &mut producers)?;
        *self.producers() = producers;
        // Segments rolled from here on must be checked at open.
        let base = rebuilt.base_offset();
        if state.recovery_point > base {
            write_recovery_point(&self.dir, base)?;
            state.recovery_point = base;
        }
        state.segments[keep] = rebuilt;
        let kept: Vec<_> = state.segments.iter().map(|s| s.file.clone()).collect();
        state.unsynced_sealed.retain(|f| kept[..keep].iter().any(|k| Arc::ptr_eq(k, f)));
        sync_dir(&self.dir)?;
        let new_end = state.log_end();
        self.durable_end_offset.fetch_min(new_end, Ordering::SeqCst);
        self.cleaner.lock().expect("cleaner lock poisoned").truncated_to(new_end);
        info!(dir = %self.dir.display(), requested = end, log_end_offset = new_end, "truncated log");
        Ok(new_end)
    }

    /// Empties the log and starts it again at `offset`, which must be past
    /// the log end: a follower whose leader's log now starts beyond the
    /// follower's end (retention removed what it would have fetched). The
    /// old segments are deleted before the new one is created, so a crash
    /// part way leaves an empty log, never one with a gap. Durable on return.
    pub fn reset_to(&self, offset: i64) -> io::Result<()> {
        let _swap = self.swap_lock.lock().expect("swap lock poisoned");
        let _append = self.append_lock.lock().expect("append lock poisoned");
        let mut state = self.write_state();
        if offset <= state.log_end() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("reset to {offset} is not past the log end {}", state.log_end()),
            ));
        }
        for removed in state.segments.drain(..) {
            delete_segment_files(&removed.file)?;
        }
        *self.producers() = Producers::default();
        state.unsynced_sealed.clear();
        sync_dir(&self.dir)?;
        let file = SegmentFile::open(&self.dir, offset, true)?;
        state.segments.push(Segment::empty(file));
        sync_dir(&self.dir)?;
        self.durable_end_offset.store(offset, Ordering::SeqCst);
        info!(dir = %self.dir.display(), log_start_offset = offset, "log reset");
        Ok(())
    }

    /// File handle, end position and next offset of the active segment.
    fn active_end(&self) -> (Arc<SegmentFile>, u64, i64) {
        let state = self.read_state();
        let active = state.active();
        (active.file.clone(), active.size, active.next_offset)
    }

    /// Seals the active segment (writing its index files) and starts a new
    /// one at the log end offset. The caller holds `append_lock`. The sealed
    /// files are fsynced by the next [`Log::sync_to`], not here, so a roll
    /// never stalls appends on the disk.
    fn roll_locked(&self) -> io::Result<()> {
        let next_offset = {
            let state = self.read_state();
            let active = state.active();
            if active.size == 0 {
                return Ok(());
            }
            // Index files first: once the new segment exists, the old one is
            // sealed and its index files are trusted at the next open.
            active.write_index_files(false)?;
            active.next_offset
        };
        let file = SegmentFile::open(&self.dir, next_offset, true)?;
        // The state as of the new segment's base: open and truncation start
        // from it and replay only the active segment. Its contents are
        // fsynced before the rename and the name with the directory's next
        // fsync, which precedes the first flush of anything appended to
        // the new segment: no acknowledged batch outlives the state that
        // deduplicates retries of the batches before it. (A lost one would
        // mean an empty state, where producers are accepted at any
        // sequence.)
        let snapshot = {
            let mut producers = self.producers();
            producers.expire();
            producers.encode()
        };
        segment::write_file_atomically(&file.path(PRODUCERS_EXT), &snapshot, true)?;
        let mut state = self.write_state();
        let sealed = state.segments.last_mut().expect("active segment");
        sealed.time_index = sealed.sealed_time_index();
        let sealed_file = sealed.file.clone();
        debug!(
            dir = %self.dir.display(),
            sealed_base_offset = sealed_file.base_offset,
            sealed_bytes = sealed.size,
            new_base_offset = next_offset,
            "rolled segment"
        );
        state.unsynced_sealed.push(sealed_file);
        state.segments.push(Segment::empty(file));
        state.dir_dirty = true;
        Ok(())
    }

    pub(crate) fn read_state(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().expect("log state lock poisoned")
    }

    pub(crate) fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().expect("log state lock poisoned")
    }
}

/// The recovery point on disk; `None` when missing or unreadable (then
/// every sealed segment is checked).
fn read_recovery_point(dir: &Path) -> Option<i64> {
    fs::read_to_string(dir.join(RECOVERY_POINT_FILE)).ok()?.trim().parse().ok()
}

/// Persists the recovery point (atomically; durable on return).
fn write_recovery_point(dir: &Path, offset: i64) -> io::Result<()> {
    segment::write_file_atomically(&dir.join(RECOVERY_POINT_FILE), offset.to_string().as_bytes(), true)?;
    sync_dir(dir)
}

/// The index in `bases` of the first sealed segment at or after the
/// recovery point that holds a torn or corrupt batch, or ends before the
/// next segment begins.
fn first_damaged_sealed(dir: &Path, bases: &[i64], recovery_point: Option<i64>) -> io::Result<Option<usize>> {
    for (i, pair) in bases.windows(2).enumerate() {
        let (base, next) = (pair[0], pair[1]);
        if recovery_point.is_some_and(|r| base < r) {
            continue;
        }
        let file = SegmentFile::open(dir, base, false)?;
        let len = file.file.metadata()?.len();
        let outcome = segment::scan(&file.file, len, base, |_, _| {})?;
        let problem = match outcome.problem {
            Some(reason) => Some(reason),
            None if outcome.next_offset != next => {
                Some(format!("it ends at offset {} but the next segment starts at {next}", outcome.next_offset))
            }
            None => None,
        };
        if let Some(reason) = problem {
            warn!(
                file = %file.path(LOG_EXT).display(),
                position = outcome.valid_len,
                %reason,
                "a segment sealed after the last recovery point is damaged; the log ends there"
            );
            return Ok(Some(i));
        }
    }
    Ok(None)
}

/// Scans the active segment and truncates it at the first torn or corrupt
/// batch: such a tail was never acknowledged as durable.
/// Replays its batches into `producers` (the state as of its base offset).
fn recover_active(file: Arc<SegmentFile>, index_interval_bytes: u32, producers: &mut Producers) -> io::Result<Segment> {
    let len = file.file.metadata()?.len();
    let (segment, outcome) = replay(&file, len, index_interval_bytes, producers)?;
    if let Some(reason) = outcome.problem {
        warn!(
            file = %file.path(LOG_EXT).display(),
            position = outcome.valid_len,
            truncated_bytes = len - outcome.valid_len,
            %reason,
            "truncating the torn or corrupt tail of the active segment"
        );
        file.file.set_len(outcome.valid_len)?;
        file.file.sync_all()?;
    }
    // Every batch in it was checked, and appends only add checked ones.
    file.mark_checked(u64::MAX);
    Ok(segment)
}

/// Rebuilds a sealed segment's bookkeeping and index files (its
/// `.index`/`.timeindex`/`.txnindex` missing or inconsistent, `reason`) by
/// replaying it from its own producer snapshot: the aborts it holds get
/// their first offsets right. `next_offset` is the next segment's base.
fn rebuild_sealed(
    file: Arc<SegmentFile>,
    next_offset: i64,
    reason: &str,
    index_interval_bytes: u32,
) -> io::Result<Segment> {
    warn!(file = %file.path(LOG_EXT).display(), %reason, "rebuilding the indexes of a sealed segment");
    let size = file.file.metadata()?.len();
    let mut producers = Producers::load(&file.path(PRODUCERS_EXT));
    let (mut segment, outcome) = replay(&file, size, index_interval_bytes, &mut producers)?;
    if let Some(reason) = &outcome.problem {
        // Not truncated: later segments exist. Reads of the bad part fail
        // their checks and return Corrupt.
        warn!(
            file = %file.path(LOG_EXT).display(),
            position = outcome.valid_len,
            %reason,
            "sealed segment is damaged; reads past this position will report corruption"
        );
    }
    // Less is a compacted segment's hole at its end.
    if outcome.next_offset > next_offset {
        warn!(
            file = %file.path(LOG_EXT).display(),
            scanned_next_offset = outcome.next_offset,
            next_segment_base_offset = next_offset,
            "sealed segment does not end where the next segment starts"
        );
    }
    segment.time_index = segment.sealed_time_index();
    segment.size = size;
    segment.next_offset = next_offset;
    segment.write_index_files(true)?;
    Ok(segment)
}

/// Scans the first `len` bytes of a segment up to its first torn or corrupt
/// batch, recording each batch (its bookkeeping, and in `producers` its
/// producer's state and the transaction it opens or ends).
fn replay(
    file: &Arc<SegmentFile>,
    len: u64,
    index_interval_bytes: u32,
    producers: &mut Producers,
) -> io::Result<(Segment, ScanOutcome)> {
    let mut segment = Segment::empty(file.clone());
    let mut control_unread = None;
    let outcome = segment::scan(&file.file, len, file.base_offset, |header, position| {
        // A marker's type is in its record: read it back (control batches
        // are one small record).
        let marker = match header.is_control() {
            false => None,
            true => {
                let mut batch = vec![0; header.total_len()];
                match file.file.read_exact_at(&mut batch, position) {
                    Ok(()) => control_marker(header, &batch),
                    Err(e) => {
                        control_unread.get_or_insert(e);
                        None
                    }
                }
            }
        };
        segment.aborted.extend(producers.record(header, marker));
        segment.record_batch(header, position, index_interval_bytes)
    })?;
    match control_unread {
        Some(e) => Err(e),
        None => Ok((segment, outcome)),
    }
}

/// What the marker of a control batch says: `Some(true)` commit,
/// `Some(false)` abort, `None` for another batch or a marker this build
/// does not know (copied only for a control batch: they are one small
/// record).
fn control_marker(header: &BatchHeader, batch: &[u8]) -> Option<bool> {
    if !header.is_control() {
        return None;
    }
    let marker = quiver_protocol::control::batch_marker(header, &Bytes::copy_from_slice(batch))?;
    Some(marker == quiver_protocol::control::Marker::Commit)
}

/// Base offsets of the `.log` files in `dir`, sorted; removes leftovers of
/// interrupted deletions and index writes.
fn list_segments(dir: &Path) -> io::Result<Vec<i64>> {
    let mut bases = Vec::new();
    let mut index_files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            debug!(file = %path.display(), "ignoring file with a non-UTF-8 name");
            continue;
        };
        if name == LOCK_FILE_NAME {
            continue;
        }
        if name.ends_with(DELETED_SUFFIX) || name.ends_with(TMP_SUFFIX) {
            info!(file = %path.display(), "removing leftover file");
            fs::remove_file(&path)?;
            continue;
        }
        let parsed = name
            .split_once('.')
            .filter(|(stem, _)| stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|(stem, ext)| Some((stem.parse::<i64>().ok()?, ext)));
        match parsed {
            Some((base, LOG_EXT)) => bases.push(base),
            Some((base, INDEX_EXT | TIME_INDEX_EXT | TXN_INDEX_EXT | PRODUCERS_EXT)) => index_files.push((base, path)),
            _ => debug!(file = %path.display(), "ignoring unknown file in log directory"),
        }
    }
    for (base, path) in index_files {
        if !bases.contains(&base) {
            info!(file = %path.display(), "removing index file of a deleted segment");
            fs::remove_file(&path)?;
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

/// Renames the `.log` away first, so a crash part way leaves no live-looking
/// half segment; open() removes what is left.
pub(crate) fn delete_segment_files(file: &SegmentFile) -> io::Result<()> {
    let log_path = file.path(LOG_EXT);
    let mut deleted = log_path.as_os_str().to_owned();
    deleted.push(DELETED_SUFFIX);
    fs::rename(&log_path, &deleted)?;
    remove_files(file, &[INDEX_EXT, TIME_INDEX_EXT, TXN_INDEX_EXT, PRODUCERS_EXT])?;
    fs::remove_file(deleted)
}

/// Removes a segment's index files, if it has any.
fn remove_index_files(file: &SegmentFile) -> io::Result<()> {
    remove_files(file, &[INDEX_EXT, TIME_INDEX_EXT, TXN_INDEX_EXT])
}

fn remove_files(file: &SegmentFile, extensions: &[&str]) -> io::Result<()> {
    for &ext in extensions {
        match fs::remove_file(file.path(ext)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Makes file creations, renames and deletions in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
