//! Quiver's storage engine: the log of one partition, on disk.
//!
//! A [`Log`] owns one directory of segments. Each segment is a file of
//! record batches (Kafka record batch v2, stored byte for byte as produced
//! except for the base offset and leader epoch) plus two sparse indexes kept
//! in memory and written to disk when the segment is sealed. See
//! spec/log-format.md for the byte layout, recovery, retention and the
//! durability contract.
//!
//! - [`log`]: the [`Log`] itself: append, read, sync, retention, recovery.
//! - `segment`: one segment's file, bookkeeping and recovery scan.
//! - `index`: the sparse offset and time indexes.
//! - [`producers`]: idempotent producers' sequences, for deduplication.
//! - [`compaction`]: what the cleaner of a compacted log decides (sans-IO);
//!   `clean`: the cleaning pass itself (read, rewrite, swap).
//!
//! The crate does no networking and keeps no clock: time-dependent calls
//! ([`Log::enforce_retention`], [`Log::clean`]) take `now_ms`.

mod clean;
pub mod compaction;
mod index;
pub mod log;
pub mod producers;
mod segment;

use std::path::PathBuf;

use quiver_protocol::batch::BatchError;

pub use crate::clean::{CleanOptions, CleanReport, CleanStep, lower_thread_priority};
pub use crate::compaction::{Cleanable, CompactionConfig};
pub use crate::log::{Appended, Log};
pub use crate::producers::SequenceError;

/// Tuning of one log; can be changed at run time with [`Log::set_config`].
#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    /// Roll the active segment when the next batch would make it larger than
    /// this. A single batch larger than this still goes into a fresh segment.
    pub segment_bytes_max: u64,
    /// Roll the active segment (in [`Log::enforce_retention`]) when its first
    /// batch's max timestamp is older than this, so that time retention can
    /// delete old data even on a partition that receives little traffic.
    pub segment_ms_max: Option<u64>,
    /// Delete sealed segments whose largest timestamp is older than
    /// `now - retention_ms`. `None` keeps data forever.
    pub retention_ms: Option<u64>,
    /// Delete the oldest sealed segments while the log's total size exceeds
    /// this. `None` means no size limit.
    pub retention_bytes: Option<u64>,
    /// Write a sparse index entry every this many bytes of batches: smaller
    /// means less scanning per read and more memory.
    pub index_interval_bytes: u32,
    /// `Some`: the log is compacted (`cleanup.policy` has `compact`):
    /// [`Log::clean`] keeps each key's latest record. Retention applies as
    /// well, unless both limits above are `None`.
    pub compaction: Option<CompactionConfig>,
}

const DAY_MS: u64 = 24 * 60 * 60 * 1000;

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes_max: 1024 * 1024 * 1024,
            segment_ms_max: Some(7 * DAY_MS),
            retention_ms: Some(7 * DAY_MS),
            retention_bytes: None,
            index_interval_bytes: 4096,
            compaction: None,
        }
    }
}

/// Where an appended batch landed, so the caller can answer the producer and
/// update its own state (high watermark, producer sequences).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendInfo {
    /// Offset assigned to the first record of the batch.
    pub base_offset: i64,
    /// Offset of the last record of the batch.
    pub last_offset: i64,
    /// The batch header's max timestamp.
    pub max_timestamp: i64,
}

/// What one [`Log::enforce_retention`] pass did, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetentionReport {
    /// Sealed segments removed.
    pub segments_deleted: usize,
    /// Bytes of batches removed.
    pub bytes_deleted: u64,
    /// The log start offset after the pass.
    pub log_start_offset: i64,
}

/// Why [`Log::open`] failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// A file or directory could not be read, written or created.
    #[error("I/O error on {path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    /// Another [`Log`] (in this or another process) has the directory open;
    /// two writers would corrupt it.
    #[error("log directory {0} is already open")]
    Locked(PathBuf),
}

/// Why [`Log::append`] failed. Nothing was appended in either case.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// Writing to the segment or rolling a new one failed.
    #[error("I/O error while appending: {0}")]
    Io(std::io::Error),
    /// The batch header cannot be parsed or does not match the buffer length;
    /// the caller should have run `quiver_protocol::batch::validate`.
    #[error("invalid batch: {0}")]
    Invalid(BatchError),
    /// An idempotent producer's batch out of sequence or from a fenced
    /// epoch ([`Log::append_checked`] only).
    #[error("{0}")]
    Sequence(SequenceError),
    /// A copied batch starts before the log end ([`Log::append_copy`]).
    #[error("a batch at offset {base_offset} cannot follow the log end {log_end}")]
    Behind { base_offset: i64, log_end: i64 },
}

/// Why [`Log::read`] or [`Log::offset_for_timestamp`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The offset is below the log start (deleted by retention) or beyond
    /// the log end; the consumer should reset its position.
    #[error("offset {offset} is out of range [{log_start}, {log_end}]")]
    OffsetOutOfRange { offset: i64, log_start: i64, log_end: i64 },
    /// The first batch at `offset` failed its CRC or framing check on disk.
    #[error("stored batch at offset {offset} is corrupt: {reason}")]
    Corrupt { offset: i64, reason: String },
    /// Reading the segment file failed.
    #[error("I/O error while reading: {0}")]
    Io(std::io::Error),
}

/// `From` for error variants whose message already includes the inner
/// error's. They are deliberately not `#[from]`/`#[source]`: thiserror would
/// make the inner error the source too, and an error chain printed with
/// `{:#}` (anyhow) would then say the same reason twice.
macro_rules! from_inner {
    ($($outer:ident :: $variant:ident ( $inner:ty );)*) => {$(
        impl From<$inner> for $outer {
            fn from(e: $inner) -> Self {
                $outer::$variant(e)
            }
        }
    )*};
}

from_inner! {
    AppendError::Io(std::io::Error);
    AppendError::Invalid(BatchError);
    AppendError::Sequence(SequenceError);
    ReadError::Io(std::io::Error);
}
