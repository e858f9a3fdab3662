//! One segment: its open `.log` file, the bookkeeping of what it holds
//! (size, offsets, max timestamp, in-memory indexes), its index files, and
//! the batch-by-batch scan that recovery uses.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use quiver_protocol::batch::{self, BATCH_HEADER_LEN, BatchHeader};

use quiver_transactions::partition::AbortedTxn;

use crate::index::{self, OffsetIndex, TimeIndex};

pub(crate) const LOG_EXT: &str = "log";
pub(crate) const INDEX_EXT: &str = "index";
pub(crate) const TIME_INDEX_EXT: &str = "timeindex";
/// The transactions aborted by a marker in the segment (see `index`).
pub(crate) const TXN_INDEX_EXT: &str = "txnindex";
/// The producer state as of the segment's base offset (see `producers`).
pub(crate) const PRODUCERS_EXT: &str = "producers";
/// Suffix of a segment being deleted: renamed first, so a crash in the
/// middle of a deletion never leaves a half-deleted segment that looks live.
pub(crate) const DELETED_SUFFIX: &str = ".deleted";
/// Suffix of an index file being written, renamed into place when complete.
pub(crate) const TMP_SUFFIX: &str = ".tmp";

/// Bytes read per call when scanning a whole segment.
const SCAN_CHUNK_BYTES: usize = 1 << 20;

/// `00000000000000000042.log`: names sort like offsets, as in Kafka.
pub(crate) fn file_name(base_offset: i64, ext: &str) -> String {
    format!("{base_offset:020}.{ext}")
}

/// The open file of a segment. Readers clone the `Arc` so that a segment
/// deleted by retention stays readable through handles already taken
/// (unlinking an open file is safe on Linux).
#[derive(Debug)]
pub(crate) struct SegmentFile {
    pub(crate) base_offset: i64,
    pub(crate) dir: PathBuf,
    pub(crate) file: File,
    /// Bytes from the start of the file whose batches this process has
    /// checked (CRC included): all of a segment it created or recovered,
    /// since every appended batch was checked by the caller of
    /// [`crate::Log::append`]; of a sealed segment it found at open, the
    /// prefix reads have checked so far. Reads check batches only beyond it.
    checked: AtomicU64,
}

impl SegmentFile {
    /// Opens (`create`: creates, truncating any leftover) the `.log` file of
    /// the segment starting at `base_offset`.
    pub(crate) fn open(dir: &Path, base_offset: i64, create: bool) -> io::Result<Arc<SegmentFile>> {
        let path = dir.join(file_name(base_offset, LOG_EXT));
        let file = OpenOptions::new().read(true).write(true).create(create).truncate(create).open(path)?;
        let checked = AtomicU64::new(if create { u64::MAX } else { 0 });
        Ok(Arc::new(SegmentFile { base_offset, dir: dir.to_path_buf(), file, checked }))
    }

    /// A segment file this process wrote whole and just renamed into place
    /// (a cleaned segment): every batch in it is checked.
    pub(crate) fn adopt(dir: &Path, base_offset: i64, file: File) -> Arc<SegmentFile> {
        Arc::new(SegmentFile { base_offset, dir: dir.to_path_buf(), file, checked: AtomicU64::new(u64::MAX) })
    }

    /// See [`SegmentFile::checked`].
    pub(crate) fn checked(&self) -> u64 {
        self.checked.load(Ordering::Acquire)
    }

    /// Every batch below `end` has been checked: after a read that checked
    /// all its batches from at most [`SegmentFile::checked`] on, or after
    /// recovery scanned the whole file (`u64::MAX`).
    pub(crate) fn mark_checked(&self, end: u64) {
        self.checked.fetch_max(end, Ordering::AcqRel);
    }

    pub(crate) fn path(&self, ext: &str) -> PathBuf {
        self.dir.join(file_name(self.base_offset, ext))
    }
}

/// What the log knows about one segment. Changed only under the log's state
/// lock; `size` and `next_offset` are what readers may see (bytes written
/// but not yet published are invisible).
#[derive(Debug)]
pub(crate) struct Segment {
    pub(crate) file: Arc<SegmentFile>,
    /// Bytes of complete batches.
    pub(crate) size: u64,
    /// Offset the next batch in this segment would get.
    pub(crate) next_offset: i64,
    pub(crate) offset_index: OffsetIndex,
    pub(crate) time_index: TimeIndex,
    /// Largest batch max timestamp; `i64::MIN` for an empty segment.
    pub(crate) max_timestamp: i64,
    /// The first batch's max timestamp, for rolling by age.
    pub(crate) first_batch_timestamp: Option<i64>,
    /// The transactions aborted by a marker in this segment, in marker
    /// order (`.txnindex`).
    pub(crate) aborted: Vec<AbortedTxn>,
    last_batch_base_offset: i64,
    bytes_since_index: u64,
}

impl Segment {
    pub(crate) fn empty(file: Arc<SegmentFile>) -> Segment {
        let base_offset = file.base_offset;
        Segment {
            file,
            size: 0,
            next_offset: base_offset,
            offset_index: OffsetIndex::default(),
            time_index: TimeIndex::default(),
            max_timestamp: i64::MIN,
            first_batch_timestamp: None,
            aborted: Vec::new(),
            last_batch_base_offset: base_offset,
            bytes_since_index: 0,
        }
    }

    pub(crate) fn base_offset(&self) -> i64 {
        self.file.base_offset
    }

    /// This segment as the compaction planner sees it, ending at `next_offset`.
    pub(crate) fn span(&self, next_offset: i64) -> crate::compaction::SegmentSpan {
        crate::compaction::SegmentSpan {
            base_offset: self.base_offset(),
            next_offset,
            size: self.size,
            max_timestamp: self.max_timestamp,
            first_timestamp: self.first_batch_timestamp,
        }
    }

    pub(crate) fn relative(&self, offset: i64) -> u32 {
        let rel = offset - self.base_offset();
        assert!((0..=i64::from(u32::MAX)).contains(&rel), "offset {offset} outside segment {}", self.base_offset());
        rel as u32
    }

    /// Accounts for a batch (header as stored) written at `position`, the
    /// current end of the segment: sizes, offsets, timestamps, and an index
    /// entry every `index_interval_bytes`.
    pub(crate) fn record_batch(&mut self, header: &BatchHeader, position: u64, index_interval_bytes: u32) {
        assert_eq!(position, self.size, "batches are recorded in file order");
        // Offsets increase; a compacted log has holes between batches.
        assert!(header.base_offset >= self.next_offset, "offsets increase");
        let rel = self.relative(header.base_offset);
        self.max_timestamp = self.max_timestamp.max(header.max_timestamp);
        if position > 0 && self.bytes_since_index >= u64::from(index_interval_bytes) {
            let position = u32::try_from(position).expect("segments stay below 4 GiB");
            self.offset_index.push(rel, position);
            self.time_index.push(self.max_timestamp, rel);
            self.bytes_since_index = 0;
        }
        let len = header.total_len() as u64;
        self.bytes_since_index += len;
        self.first_batch_timestamp.get_or_insert(header.max_timestamp);
        self.last_batch_base_offset = header.base_offset;
        self.size += len;
        self.next_offset = header.next_offset();
    }

    /// The time index as written to disk: with a final entry carrying the
    /// segment's max timestamp, which retention of a sealed segment needs.
    pub(crate) fn sealed_time_index(&self) -> TimeIndex {
        let mut index = self.time_index.clone();
        if self.size > 0 {
            index.push(self.max_timestamp, self.relative(self.last_batch_base_offset));
        }
        index
    }

    /// Writes `.index`, `.timeindex` and `.txnindex`, each to a temporary
    /// file renamed into place, so that a crash leaves no file or a
    /// complete one. With `sync`, each is fsynced before its rename.
    pub(crate) fn write_index_files(&self, sync: bool) -> io::Result<()> {
        write_file_atomically(&self.file.path(INDEX_EXT), &self.offset_index.encode(), sync)?;
        write_file_atomically(&self.file.path(TIME_INDEX_EXT), &self.sealed_time_index().encode(), sync)?;
        write_file_atomically(&self.file.path(TXN_INDEX_EXT), &index::encode_aborts(&self.aborted), sync)
    }

    /// A sealed segment as found on disk, `Err` with the reason when its
    /// index files are missing or inconsistent (the caller then rebuilds
    /// them by a replay: `log.rs`, `rebuild_sealed`). `next_offset` is the next
    /// segment's base offset. The data itself is checked only when read.
    pub(crate) fn load_sealed(file: Arc<SegmentFile>, next_offset: i64) -> io::Result<Result<Segment, String>> {
        let size = file.file.metadata()?.len();
        let span = u64::try_from(next_offset - file.base_offset).unwrap_or(0);
        let loaded = read_index_file(&file.path(INDEX_EXT))
            .and_then(|bytes| OffsetIndex::decode(&bytes, span, size))
            .and_then(|offsets| {
                let times = read_index_file(&file.path(TIME_INDEX_EXT))
                    .and_then(|bytes| TimeIndex::decode(&bytes, span, size))?;
                let aborted = read_index_file(&file.path(TXN_INDEX_EXT))
                    .and_then(|bytes| index::decode_aborts(&bytes, file.base_offset, next_offset))?;
                Ok((offsets, times, aborted))
            });
        Ok(loaded.map(|(offset_index, time_index, aborted)| Segment {
            max_timestamp: time_index.max_timestamp().unwrap_or(i64::MIN),
            file,
            size,
            next_offset,
            offset_index,
            time_index,
            first_batch_timestamp: None,
            aborted,
            last_batch_base_offset: next_offset - 1,
            bytes_since_index: 0,
        }))
    }
}

fn read_index_file(path: &Path) -> Result<Vec<u8>, String> {
    fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

pub(crate) fn write_file_atomically(path: &Path, bytes: &[u8], sync: bool) -> io::Result<()> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(TMP_SUFFIX);
    let tmp = PathBuf::from(tmp_name);
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    if sync {
        file.sync_all()?;
    }
    drop(file);
    fs::rename(&tmp, path)
}

/// Where a scan stopped.
#[derive(Debug)]
pub(crate) struct ScanOutcome {
    /// Bytes of valid batches from the start of the file.
    pub(crate) valid_len: u64,
    /// Offset after the last valid batch.
    pub(crate) next_offset: i64,
    /// Why the scan stopped before the end of the file, if it did.
    pub(crate) problem: Option<String>,
}

/// Walks the batches of a segment file from its start, checking that each
/// header parses, the batch fits in the file, its CRC-32C is valid and its
/// base offset is at or past the previous batch's end (compacted logs, and
/// replicas copying them, have holes); calls `on_batch` for each valid one
/// and stops at the first that is not.
pub(crate) fn scan(
    file: &File,
    file_len: u64,
    base_offset: i64,
    mut on_batch: impl FnMut(&BatchHeader, u64),
) -> io::Result<ScanOutcome> {
    let mut buf = Bytes::new();
    let mut buf_at = 0u64;
    let mut position = 0u64;
    let mut expected = base_offset;
    let stop = |position: u64, next_offset: i64, problem: Option<String>| {
        Ok(ScanOutcome { valid_len: position, next_offset, problem })
    };
    loop {
        let remaining = file_len - position;
        if remaining == 0 {
            return stop(position, expected, None);
        }
        if remaining < BATCH_HEADER_LEN as u64 {
            return stop(position, expected, Some(format!("{remaining} trailing bytes, less than a batch header")));
        }
        fill_window(file, &mut buf, &mut buf_at, position, BATCH_HEADER_LEN as u64, file_len)?;
        let at = (position - buf_at) as usize;
        let header = match BatchHeader::parse(&buf[at..]) {
            Ok(header) => header,
            Err(e) => return stop(position, expected, Some(format!("bad batch header: {e}"))),
        };
        let len = header.total_len() as u64;
        if len > remaining {
            return stop(position, expected, Some(format!("batch of {len} bytes extends past the end of the file")));
        }
        if header.base_offset < expected {
            return stop(
                position,
                expected,
                Some(format!("base offset {} where at least {expected} was expected", header.base_offset)),
            );
        }
        if header.last_offset_delta < 0 {
            return stop(position, expected, Some(format!("negative last offset delta {}", header.last_offset_delta)));
        }
        fill_window(file, &mut buf, &mut buf_at, position, len, file_len)?;
        let at = (position - buf_at) as usize;
        if let Err(e) = batch::verify_crc(&buf[at..at + len as usize]) {
            return stop(position, expected, Some(e.to_string()));
        }
        on_batch(&header, position);
        expected = header.next_offset();
        position += len;
    }
}

/// Calls `on_batch` with the header, position and bytes of each batch of a
/// segment file of `file_len` bytes, in order, until it returns `false`.
/// Reads in windows of about [`SCAN_CHUNK_BYTES`]; each batch is a slice of
/// its window (no copy). Framing is checked (a header that does not parse,
/// or a batch past the end, is `InvalidData`), CRCs are the caller's.
pub(crate) fn for_each_batch(
    file: &File,
    file_len: u64,
    mut on_batch: impl FnMut(&BatchHeader, u64, Bytes) -> io::Result<bool>,
) -> io::Result<()> {
    let mut window = Bytes::new();
    let mut window_at = 0u64;
    let mut position = 0u64;
    let invalid =
        |position: u64, what: String| io::Error::new(io::ErrorKind::InvalidData, format!("{what} at {position}"));
    while position < file_len {
        if position + BATCH_HEADER_LEN as u64 > file_len {
            return Err(invalid(position, "a partial batch header".into()));
        }
        fill_window(file, &mut window, &mut window_at, position, BATCH_HEADER_LEN as u64, file_len)?;
        let header = BatchHeader::parse(&window[(position - window_at) as usize..])
            .map_err(|e| invalid(position, format!("bad batch header: {e}")))?;
        let len = header.total_len() as u64;
        if position + len > file_len {
            return Err(invalid(position, format!("a batch of {len} bytes past the end of the file")));
        }
        fill_window(file, &mut window, &mut window_at, position, len, file_len)?;
        let at = (position - window_at) as usize;
        if !on_batch(&header, position, window.slice(at..at + len as usize))? {
            return Ok(());
        }
        position += len;
    }
    Ok(())
}

/// Makes `window` (holding the file from `window_at`) cover `[position,
/// position + len)`, reading at least [`SCAN_CHUNK_BYTES`] into a fresh
/// buffer when it does not (batches handed out keep the old one alive).
fn fill_window(
    file: &File,
    window: &mut Bytes,
    window_at: &mut u64,
    position: u64,
    len: u64,
    file_len: u64,
) -> io::Result<()> {
    if position >= *window_at && position + len <= *window_at + window.len() as u64 {
        return Ok(());
    }
    let want = len.max(SCAN_CHUNK_BYTES as u64).min(file_len - position) as usize;
    *window = Bytes::from(read_vec_at(file, want, position)?);
    *window_at = position;
    Ok(())
}

/// Reads `len` bytes at `position` into a new buffer. The buffer is not
/// zeroed first, since the read overwrites it: zeroing cost about half as
/// much as the read's own copy out of the page cache.
pub(crate) fn read_vec_at(file: &File, len: usize, position: u64) -> io::Result<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let mut buf = Vec::<u8>::with_capacity(len);
    while buf.len() < len {
        let filled = buf.len();
        let spare = &mut buf.spare_capacity_mut()[..len - filled];
        let at = libc::off_t::try_from(position + filled as u64)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "read position beyond the largest file offset"))?;
        // SAFETY: `spare` is writable memory of `spare.len()` bytes owned by
        // `buf`; pread writes at most that many and returns how many.
        let n = unsafe { libc::pread(file.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len(), at) };
        match n {
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("file ends {filled} bytes into a read of {len} at position {position}"),
                ));
            }
            // SAFETY: pread initialized the first `n` bytes of the spare
            // capacity, right after the `filled` initialized ones.
            n => unsafe { buf.set_len(filled + n as usize) },
        }
    }
    Ok(buf)
}

/// Reads the fixed header of the batch at `position`.
pub(crate) fn read_header_at(file: &File, position: u64) -> io::Result<[u8; BATCH_HEADER_LEN]> {
    let mut raw = [0u8; BATCH_HEADER_LEN];
    file.read_exact_at(&mut raw, position)?;
    Ok(raw)
}
