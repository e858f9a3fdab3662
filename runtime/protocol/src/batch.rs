//! Record batches: the unit that is produced, stored, replicated and fetched.
//!
//! The byte layout is Kafka's record batch v2 (see spec/log-format.md), so
//! idempotence, transactions, compaction and Kafka wire compatibility need no
//! format change. A batch is built once by the producer, validated by the
//! broker, stored unchanged on disk (only base offset and leader epoch are
//! rewritten; the CRC does not cover them) and sent unchanged to consumers.

use std::io::{Read, Write};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::varint::{get_varint, get_varlong, put_varint, put_varlong, varint_len, varlong_len};

pub const MAGIC: i8 = 2;
/// Bytes before the first record: base offset (8) + length (4) + the 49 bytes
/// that `batch_length` counts before the records.
pub const BATCH_HEADER_LEN: usize = 61;
/// Bytes not counted by `batch_length`: base offset and the length itself.
pub const LOG_OVERHEAD: usize = 12;
pub const NO_PRODUCER_ID: i64 = -1;
pub const NO_PRODUCER_EPOCH: i16 = -1;
pub const NO_SEQUENCE: i32 = -1;

// Field positions inside the batch header.
const BATCH_LENGTH_AT: usize = 8;
const LEADER_EPOCH_AT: usize = 12;
const CRC_AT: usize = 17;
/// The CRC-32C covers everything from the attributes to the end of the batch.
const CRC_FROM: usize = 21;

const ATTR_CODEC_MASK: i16 = 0x07;
const ATTR_LOG_APPEND_TIME: i16 = 0x08;
const ATTR_TRANSACTIONAL: i16 = 0x10;
const ATTR_CONTROL: i16 = 0x20;
/// Kafka's KIP-534 flag: the batch was compacted while holding tombstones,
/// and its base timestamp is the time after which they may be dropped.
const ATTR_DELETE_HORIZON: i16 = 0x40;
/// Attributes a rebuilt batch keeps from the original (the codec is chosen
/// again, the horizon set anew).
const ATTR_KEPT_BY_REBUILD: i16 = ATTR_LOG_APPEND_TIME | ATTR_TRANSACTIONAL | ATTR_CONTROL;

/// Upper bound on a decompressed batch, so a small "zip bomb" cannot make the
/// broker or a client allocate without limit.
pub const DECOMPRESSED_BYTES_MAX: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BatchError {
    #[error("batch is truncated")]
    Truncated,
    #[error("batch length {0} is invalid")]
    BadLength(i64),
    #[error("unsupported batch magic {0} (only 2 is supported)")]
    BadMagic(i8),
    #[error("CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadCrc { stored: u32, computed: u32 },
    #[error("unsupported compression codec id {0} (supported: none, lz4, zstd)")]
    UnsupportedCodec(i16),
    #[error("malformed varint")]
    BadVarint,
    #[error("record {index}: {reason}")]
    BadRecord { index: usize, reason: String },
    #[error("record count {declared} does not match the {found} records present")]
    CountMismatch { declared: i32, found: usize },
    #[error("record {index} is {size} bytes, over the limit of {limit} bytes")]
    RecordTooLarge { index: usize, size: usize, limit: usize },
    #[error("decompression failed: {0}")]
    Decompress(String),
    #[error("batch holds no records")]
    Empty,
    #[error("record {index} has no key, which a compacted topic needs: it keeps the latest record of each key")]
    MissingKey { index: usize },
}

/// Per-batch compression codec. The ids are Kafka's (gzip=1 and snappy=2 are
/// not supported).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Compression {
    #[default]
    None,
    Lz4,
    Zstd,
}

impl Compression {
    pub fn id(self) -> i16 {
        match self {
            Compression::None => 0,
            Compression::Lz4 => 3,
            Compression::Zstd => 4,
        }
    }

    pub fn from_id(id: i16) -> Result<Self, BatchError> {
        match id {
            0 => Ok(Compression::None),
            3 => Ok(Compression::Lz4),
            4 => Ok(Compression::Zstd),
            other => Err(BatchError::UnsupportedCodec(other)),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Compression::None),
            "lz4" => Ok(Compression::Lz4),
            "zstd" => Ok(Compression::Zstd),
            other => Err(format!("unknown compression '{other}' (expected none, lz4 or zstd)")),
        }
    }
}

/// The fixed 61-byte header of a batch, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: i64,
    pub batch_length: i32,
    pub leader_epoch: i32,
    pub magic: i8,
    pub crc: u32,
    pub attributes: i16,
    pub last_offset_delta: i32,
    pub base_timestamp: i64,
    pub max_timestamp: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub record_count: i32,
}

impl BatchHeader {
    /// Decodes the header at the start of `buf`; checks the magic and that the
    /// declared length is sane, not that `buf` holds the whole batch.
    pub fn parse(buf: &[u8]) -> Result<Self, BatchError> {
        if buf.len() < BATCH_HEADER_LEN {
            return Err(BatchError::Truncated);
        }
        let mut b = &buf[..BATCH_HEADER_LEN];
        let header = BatchHeader {
            base_offset: b.get_i64(),
            batch_length: b.get_i32(),
            leader_epoch: b.get_i32(),
            magic: b.get_i8(),
            crc: b.get_u32(),
            attributes: b.get_i16(),
            last_offset_delta: b.get_i32(),
            base_timestamp: b.get_i64(),
            max_timestamp: b.get_i64(),
            producer_id: b.get_i64(),
            producer_epoch: b.get_i16(),
            base_sequence: b.get_i32(),
            record_count: b.get_i32(),
        };
        if header.magic != MAGIC {
            return Err(BatchError::BadMagic(header.magic));
        }
        if (header.batch_length as i64) < (BATCH_HEADER_LEN - LOG_OVERHEAD) as i64 {
            return Err(BatchError::BadLength(header.batch_length as i64));
        }
        Ok(header)
    }

    /// Size of the whole batch in bytes, header included.
    pub fn total_len(&self) -> usize {
        LOG_OVERHEAD + self.batch_length as usize
    }

    pub fn last_offset(&self) -> i64 {
        // Saturating: the base offset is not CRC-protected, so a hostile
        // peer can put anything there; it must not make us panic.
        self.base_offset.saturating_add(i64::from(self.last_offset_delta))
    }

    pub fn next_offset(&self) -> i64 {
        self.last_offset().saturating_add(1)
    }

    pub fn compression(&self) -> Result<Compression, BatchError> {
        Compression::from_id(self.attributes & ATTR_CODEC_MASK)
    }

    pub fn is_transactional(&self) -> bool {
        self.attributes & ATTR_TRANSACTIONAL != 0
    }

    pub fn is_control(&self) -> bool {
        self.attributes & ATTR_CONTROL != 0
    }

    /// When the compacted batch's tombstones may be dropped (Kafka's delete
    /// horizon: its base timestamp, when the flag is set).
    pub fn delete_horizon(&self) -> Option<i64> {
        (self.attributes & ATTR_DELETE_HORIZON != 0).then_some(self.base_timestamp)
    }

    pub fn is_log_append_time(&self) -> bool {
        self.attributes & ATTR_LOG_APPEND_TIME != 0
    }
}

/// CRC-32C of a whole batch as it should be stored in its header.
pub fn compute_crc(batch: &[u8]) -> u32 {
    crc32c::crc32c(&batch[CRC_FROM..])
}

/// Checks the stored CRC of a complete batch against its bytes.
pub fn verify_crc(batch: &[u8]) -> Result<(), BatchError> {
    if batch.len() < BATCH_HEADER_LEN {
        return Err(BatchError::Truncated);
    }
    let stored = (&batch[CRC_AT..CRC_AT + 4]).get_u32();
    let computed = compute_crc(batch);
    if stored != computed {
        return Err(BatchError::BadCrc { stored, computed });
    }
    Ok(())
}

/// The 12-byte prefix that the broker rewrites on append (base offset, length
/// unchanged) plus the leader epoch: none of it is covered by the CRC.
pub fn patched_prefix(batch: &[u8], base_offset: i64, leader_epoch: i32) -> [u8; 16] {
    let mut prefix = [0u8; 16];
    prefix[..8].copy_from_slice(&base_offset.to_be_bytes());
    prefix[8..12].copy_from_slice(&batch[BATCH_LENGTH_AT..LEADER_EPOCH_AT]);
    prefix[12..16].copy_from_slice(&leader_epoch.to_be_bytes());
    prefix
}

/// The length of the batch that starts at `buf`, read from its header, if the
/// header is present.
pub fn peek_total_len(buf: &[u8]) -> Option<usize> {
    if buf.len() < LOG_OVERHEAD {
        return None;
    }
    let len = (&buf[BATCH_LENGTH_AT..LOG_OVERHEAD]).get_i32();
    (len >= 0).then_some(LOG_OVERHEAD + len as usize)
}

/// Limits a broker applies to incoming batches.
#[derive(Debug, Clone, Copy)]
pub struct ValidationLimits {
    /// Largest single record (key + value + headers), in bytes.
    pub record_bytes_max: usize,
    /// Refuse records without a key (compacted topics).
    pub keys_required: bool,
}

impl Default for ValidationLimits {
    fn default() -> Self {
        ValidationLimits { record_bytes_max: 1024 * 1024, keys_required: false }
    }
}

/// Checks everything about one complete batch that a broker must trust before
/// appending it: framing, magic, CRC, codec, and that every record decodes
/// with consecutive offset deltas, as many as declared, each under the size
/// limit. Returns the header.
pub fn validate(batch: &[u8], limits: &ValidationLimits) -> Result<BatchHeader, BatchError> {
    let header = BatchHeader::parse(batch)?;
    if header.total_len() != batch.len() {
        return Err(BatchError::BadLength(header.batch_length as i64));
    }
    verify_crc(batch)?;
    if header.record_count <= 0 {
        return Err(BatchError::Empty);
    }
    if header.last_offset_delta != header.record_count - 1 {
        return Err(BatchError::CountMismatch {
            declared: header.record_count,
            found: (i64::from(header.last_offset_delta) + 1).max(0) as usize,
        });
    }
    let compressed;
    let mut rest: &[u8] = match header.compression()? {
        // Uncompressed records are walked where they are: no copy.
        Compression::None => &batch[BATCH_HEADER_LEN..],
        _ => {
            compressed = decompressed_body(&header, &batch[BATCH_HEADER_LEN..])?;
            &compressed
        }
    };
    let mut index = 0usize;
    while !rest.is_empty() {
        let view = RecordView::decode(&mut rest, index)?;
        if view.offset_delta as usize != index {
            return Err(bad_record(index, format!("offset delta {} out of sequence", view.offset_delta)));
        }
        if limits.keys_required && view.key.is_none() {
            return Err(BatchError::MissingKey { index });
        }
        if view.size > limits.record_bytes_max {
            return Err(BatchError::RecordTooLarge { index, size: view.size, limit: limits.record_bytes_max });
        }
        index += 1;
    }
    if index != header.record_count as usize {
        return Err(BatchError::CountMismatch { declared: header.record_count, found: index });
    }
    Ok(header)
}

fn bad_record(index: usize, reason: impl Into<String>) -> BatchError {
    BatchError::BadRecord { index, reason: reason.into() }
}

fn decompressed_body(header: &BatchHeader, body: &[u8]) -> Result<Bytes, BatchError> {
    match header.compression()? {
        Compression::None => Ok(Bytes::copy_from_slice(body)),
        Compression::Zstd => {
            let decoder = zstd::stream::read::Decoder::new(body).map_err(|e| BatchError::Decompress(e.to_string()))?;
            read_bounded(decoder)
        }
        Compression::Lz4 => read_bounded(lz4_flex::frame::FrameDecoder::new(body)),
    }
}

fn read_bounded(reader: impl Read) -> Result<Bytes, BatchError> {
    let mut out = Vec::new();
    reader
        .take(DECOMPRESSED_BYTES_MAX as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| BatchError::Decompress(e.to_string()))?;
    if out.len() > DECOMPRESSED_BYTES_MAX {
        return Err(BatchError::Decompress(format!("decompressed size exceeds {DECOMPRESSED_BYTES_MAX} bytes")));
    }
    Ok(Bytes::from(out))
}

/// A record header (Kafka's: string key, nullable bytes value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub key: String,
    pub value: Option<Bytes>,
}

/// A decoded record with its absolute offset and timestamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub offset: i64,
    pub timestamp: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<Header>,
}

/// Positions of one record's fields inside a decoded batch body.
struct RecordView<'a> {
    /// Bytes of key, value and headers: what the size limit counts.
    size: usize,
    timestamp_delta: i64,
    offset_delta: i32,
    key: Option<&'a [u8]>,
    value: Option<&'a [u8]>,
    headers: Vec<(&'a [u8], Option<&'a [u8]>)>,
}

impl<'a> RecordView<'a> {
    fn decode(buf: &mut &'a [u8], index: usize) -> Result<Self, BatchError> {
        let length = get_varint(buf).map_err(|e| bad_record(index, e.to_string()))?;
        if length < 0 || length as usize > buf.len() {
            return Err(bad_record(index, format!("length {length} exceeds the batch")));
        }
        let (mut rec, rest) = buf.split_at(length as usize);
        *buf = rest;
        let err = |e: BatchError| bad_record(index, e.to_string());
        if rec.is_empty() {
            return Err(bad_record(index, "empty record"));
        }
        rec.advance(1); // attributes: unused in v2
        let timestamp_delta = get_varlong(&mut rec).map_err(err)?;
        let offset_delta = get_varint(&mut rec).map_err(err)?;
        let key = take_nullable(&mut rec, index, "key")?;
        let value = take_nullable(&mut rec, index, "value")?;
        let header_count = get_varint(&mut rec).map_err(err)?;
        if header_count < 0 || header_count as usize > rec.len() {
            return Err(bad_record(index, format!("header count {header_count} is invalid")));
        }
        let mut headers = Vec::with_capacity(header_count as usize);
        let mut size = key.map_or(0, <[u8]>::len) + value.map_or(0, <[u8]>::len);
        for _ in 0..header_count {
            let hkey =
                take_nullable(&mut rec, index, "header key")?.ok_or_else(|| bad_record(index, "header key is null"))?;
            if std::str::from_utf8(hkey).is_err() {
                return Err(bad_record(index, "header key is not UTF-8"));
            }
            let hvalue = take_nullable(&mut rec, index, "header value")?;
            size += hkey.len() + hvalue.map_or(0, <[u8]>::len);
            headers.push((hkey, hvalue));
        }
        if !rec.is_empty() {
            return Err(bad_record(index, format!("{} trailing bytes", rec.len())));
        }
        Ok(RecordView { size, timestamp_delta, offset_delta, key, value, headers })
    }
}

fn take_nullable<'a>(buf: &mut &'a [u8], index: usize, what: &str) -> Result<Option<&'a [u8]>, BatchError> {
    let len = get_varint(buf).map_err(|e| bad_record(index, format!("{what}: {e}")))?;
    if len == -1 {
        return Ok(None);
    }
    if len < 0 || len as usize > buf.len() {
        return Err(bad_record(index, format!("{what} length {len} is invalid")));
    }
    let (field, rest) = buf.split_at(len as usize);
    *buf = rest;
    Ok(Some(field))
}

/// Decodes every record of one complete batch. Checks the CRC first. Keys and
/// values are slices of `batch` (uncompressed) or of one decompressed buffer:
/// no copy per record.
pub fn decode_records(batch: &Bytes) -> Result<Vec<Record>, BatchError> {
    let (header, body) = records_section(batch)?;
    decode_section(&header, &body)
}

/// Decodes the records of a section returned by [`records_section`] (for
/// callers that need both, without decompressing twice).
pub fn decode_section(header: &BatchHeader, body: &Bytes) -> Result<Vec<Record>, BatchError> {
    let mut records = Vec::with_capacity(header.record_count.clamp(0, 1 << 16) as usize);
    let mut rest: &[u8] = body;
    let slice_of = |part: &[u8]| body.slice_ref(part);
    while !rest.is_empty() {
        let view = RecordView::decode(&mut rest, records.len())?;
        let headers = view
            .headers
            .iter()
            .map(|(k, v)| Header {
                // validated as UTF-8 by RecordView::decode
                key: String::from_utf8_lossy(k).into_owned(),
                value: v.map(slice_of),
            })
            .collect();
        records.push(Record {
            offset: header
                .base_offset
                .checked_add(i64::from(view.offset_delta))
                .ok_or_else(|| bad_record(records.len(), "offset overflows"))?,
            timestamp: if header.is_log_append_time() {
                header.max_timestamp
            } else {
                // Wrapping, like the builder's delta: the pair round-trips
                // every i64 timestamp exactly and never panics.
                header.base_timestamp.wrapping_add(view.timestamp_delta)
            },
            key: view.key.map(slice_of),
            value: view.value.map(slice_of),
            headers,
        });
    }
    if records.len() != header.record_count.max(0) as usize {
        return Err(BatchError::CountMismatch { declared: header.record_count, found: records.len() });
    }
    Ok(records)
}

/// A complete batch's header and its records section, uncompressed (what
/// plugins receive). Checks the CRC first.
pub fn records_section(batch: &Bytes) -> Result<(BatchHeader, Bytes), BatchError> {
    let header = BatchHeader::parse(batch)?;
    if header.total_len() > batch.len() {
        return Err(BatchError::Truncated);
    }
    let batch = batch.slice(..header.total_len());
    verify_crc(&batch)?;
    let body = match header.compression()? {
        Compression::None => batch.slice(BATCH_HEADER_LEN..),
        _ => decompressed_body(&header, &batch[BATCH_HEADER_LEN..])?,
    };
    Ok((header, body))
}

/// Walks the records of a records section without copying them: calls
/// `on_record` with each record's offset delta, key, and whether it has no
/// value (a tombstone). What the log cleaner needs of every record.
pub fn for_each_key(body: &[u8], mut on_record: impl FnMut(i32, Option<&[u8]>, bool)) -> Result<(), BatchError> {
    let mut rest = body;
    let mut index = 0;
    while !rest.is_empty() {
        let view = RecordView::decode(&mut rest, index)?;
        on_record(view.offset_delta, view.key, view.value.is_none());
        index += 1;
    }
    Ok(())
}

/// Byte ranges of each record within a records section, in order.
pub fn record_spans(body: &[u8]) -> Result<Vec<std::ops::Range<usize>>, BatchError> {
    let mut spans = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let start = body.len() - rest.len();
        RecordView::decode(&mut rest, spans.len())?;
        spans.push(start..body.len() - rest.len());
    }
    Ok(spans)
}

/// Splits a buffer of concatenated batches (a fetch response, a segment
/// slice) into whole batches. Stops with an error at the first batch whose
/// framing is invalid; a partial batch at the very end is dropped silently,
/// as fetch responses may cut the last one.
pub struct Batches {
    buf: Bytes,
}

impl Batches {
    pub fn new(buf: Bytes) -> Self {
        Batches { buf }
    }
}

impl Iterator for Batches {
    type Item = Result<(BatchHeader, Bytes), BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.len() < BATCH_HEADER_LEN {
            return None;
        }
        let header = match BatchHeader::parse(&self.buf) {
            Ok(h) => h,
            Err(e) => {
                self.buf.clear();
                return Some(Err(e));
            }
        };
        if header.total_len() > self.buf.len() {
            return None;
        }
        let batch = self.buf.split_to(header.total_len());
        Some(Ok((header, batch)))
    }
}

/// Builds one batch from records appended in order. Offsets start at 0; the
/// broker assigns real ones.
#[derive(Debug)]
pub struct BatchBuilder {
    compression: Compression,
    body: BytesMut,
    count: i32,
    base_timestamp: i64,
    max_timestamp: i64,
    producer_id: i64,
    producer_epoch: i16,
    base_sequence: i32,
    /// Offset delta of the next record (count, unless records were skipped).
    next_delta: i32,
    /// Set when rebuilding a stored batch: its own last offset delta, so a
    /// filtered batch still covers the same offsets.
    last_offset_delta: Option<i32>,
    /// Attribute bits besides the codec (rebuilt batches keep the original's).
    attributes: i16,
}

impl BatchBuilder {
    pub fn new(compression: Compression) -> Self {
        Self::with_capacity(compression, 0)
    }

    /// A builder whose buffer holds `bytes` without growing (producers pass
    /// their batch size, so records are copied once).
    pub fn with_capacity(compression: Compression, bytes: usize) -> Self {
        Self::with_buffer(compression, BytesMut::with_capacity(bytes.max(BATCH_HEADER_LEN)))
    }

    /// A builder that writes into `body` (cleared first), so that a
    /// producer can reuse the buffers of batches already sent.
    pub fn with_buffer(compression: Compression, mut body: BytesMut) -> Self {
        // The header's space is reserved up front: an uncompressed batch is
        // finished in place, without copying its records again.
        body.clear();
        body.resize(BATCH_HEADER_LEN, 0);
        BatchBuilder {
            compression,
            body,
            count: 0,
            base_timestamp: 0,
            max_timestamp: i64::MIN,
            producer_id: NO_PRODUCER_ID,
            producer_epoch: NO_PRODUCER_EPOCH,
            base_sequence: NO_SEQUENCE,
            next_delta: 0,
            last_offset_delta: None,
            attributes: 0,
        }
    }

    /// A builder that rewrites a stored batch keeping its offsets: records
    /// are appended with [`BatchBuilder::append_at`], gaps are allowed, and
    /// the result may hold no record at all (it still covers its offsets, so
    /// a consumer moves past them).
    pub fn rebuild_of(header: &BatchHeader, compression: Compression) -> Self {
        let mut b =
            Self::new(compression).with_producer(header.producer_id, header.producer_epoch, header.base_sequence);
        b.base_timestamp = header.base_timestamp;
        b.max_timestamp = header.max_timestamp;
        b.last_offset_delta = Some(header.last_offset_delta);
        b.attributes = header.attributes & ATTR_KEPT_BY_REBUILD;
        b
    }

    /// Marks a rebuilt batch (before any record is appended) as compacted
    /// with tombstones that may be dropped from `horizon_ms` on: the base
    /// timestamp becomes the horizon and record timestamps are encoded
    /// relative to it, so they read back unchanged (Kafka's KIP-534).
    pub fn with_delete_horizon(mut self, horizon_ms: i64) -> Self {
        debug_assert!(self.count == 0 && self.last_offset_delta.is_some(), "a rebuilt batch, before its records");
        self.base_timestamp = horizon_ms;
        self.attributes |= ATTR_DELETE_HORIZON;
        self
    }

    /// Appends a record at this offset delta (rebuilt batches only; deltas
    /// must increase).
    pub fn append_at(
        &mut self,
        offset_delta: i32,
        timestamp_ms: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[Header],
    ) {
        debug_assert!(offset_delta >= self.next_delta, "offset deltas must increase");
        self.next_delta = offset_delta;
        let keep_base = self.base_timestamp;
        self.append(timestamp_ms, key, value, headers);
        if self.last_offset_delta.is_some() {
            self.base_timestamp = keep_base;
        }
    }

    /// Marks the batch as a control batch of a transaction (attribute bits 4
    /// and 5): its one record is a commit or abort marker
    /// (`crate::control`), never given to applications.
    pub fn control(mut self) -> Self {
        self.attributes |= ATTR_TRANSACTIONAL | ATTR_CONTROL;
        self
    }

    /// Marks the batch as written inside a transaction (attribute bit 4):
    /// read_committed consumers see it only once its transaction committed.
    pub fn transactional(mut self) -> Self {
        self.attributes |= ATTR_TRANSACTIONAL;
        self
    }

    pub fn with_producer(mut self, producer_id: i64, producer_epoch: i16, base_sequence: i32) -> Self {
        self.producer_id = producer_id;
        self.producer_epoch = producer_epoch;
        self.base_sequence = base_sequence;
        self
    }

    pub fn record_count(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Uncompressed size of the batch so far, header included.
    pub fn size_bytes(&self) -> usize {
        self.body.len()
    }

    pub fn append(&mut self, timestamp_ms: i64, key: Option<&[u8]>, value: Option<&[u8]>, headers: &[Header]) {
        if self.count == 0 && self.last_offset_delta.is_none() {
            self.base_timestamp = timestamp_ms;
        }
        self.max_timestamp = self.max_timestamp.max(timestamp_ms);
        let timestamp_delta = timestamp_ms.wrapping_sub(self.base_timestamp);
        let offset_delta = self.next_delta;
        let nullable_len = |f: Option<&[u8]>| match f {
            None => varint_len(-1),
            Some(b) => varint_len(b.len() as i32) + b.len(),
        };
        let mut inner = 1 + varlong_len(timestamp_delta) + varint_len(offset_delta);
        inner += nullable_len(key) + nullable_len(value) + varint_len(headers.len() as i32);
        for h in headers {
            inner += nullable_len(Some(h.key.as_bytes())) + nullable_len(h.value.as_deref());
        }
        let body = &mut self.body;
        body.reserve(inner + 5);
        put_varint(body, inner as i32);
        body.put_i8(0);
        put_varlong(body, timestamp_delta);
        put_varint(body, offset_delta);
        put_nullable(body, key);
        put_nullable(body, value);
        put_varint(body, headers.len() as i32);
        for h in headers {
            put_nullable(body, Some(h.key.as_bytes()));
            put_nullable(body, h.value.as_deref());
        }
        self.count += 1;
        self.next_delta += 1;
    }

    /// Finishes the batch: compresses the records and writes the header and CRC.
    pub fn build(self) -> Bytes {
        assert!(self.count > 0 || self.last_offset_delta.is_some(), "a batch needs at least one record");
        let records = &self.body[BATCH_HEADER_LEN..];
        let compressed = match self.compression {
            Compression::None => None,
            Compression::Zstd => {
                Some(zstd::bulk::compress(records, 3).expect("zstd compression into memory cannot fail"))
            }
            Compression::Lz4 => {
                let mut enc = lz4_flex::frame::FrameEncoder::new(Vec::with_capacity(records.len() / 2));
                enc.write_all(records).expect("writing into memory cannot fail");
                Some(enc.finish().expect("lz4 frame into memory cannot fail"))
            }
        };
        let mut out = match compressed {
            None => self.body,
            Some(c) => {
                let mut out = BytesMut::with_capacity(BATCH_HEADER_LEN + c.len());
                out.resize(BATCH_HEADER_LEN, 0);
                out.put_slice(&c);
                out
            }
        };
        let total = out.len();
        let mut header = &mut out[..BATCH_HEADER_LEN];
        header.put_i64(0);
        header.put_i32((total - LOG_OVERHEAD) as i32);
        header.put_i32(-1); // leader epoch: set by the broker
        header.put_i8(MAGIC);
        header.put_u32(0); // CRC, filled below
        header.put_i16(self.compression.id() | self.attributes);
        header.put_i32(self.last_offset_delta.unwrap_or(self.count - 1));
        header.put_i64(self.base_timestamp);
        header.put_i64(self.max_timestamp);
        header.put_i64(self.producer_id);
        header.put_i16(self.producer_epoch);
        header.put_i32(self.base_sequence);
        header.put_i32(self.count);
        debug_assert!(header.is_empty());
        let crc = compute_crc(&out);
        out[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
        out.freeze()
    }
}

/// Re-encodes a complete batch with another codec, keeping every record,
/// timestamp and the producer fields (brokers do this for topics whose
/// `compression` is not `producer`).
pub fn recompress(batch: &Bytes, compression: Compression) -> Result<Bytes, BatchError> {
    let header = BatchHeader::parse(batch)?;
    let records = decode_records(batch)?;
    let mut builder =
        BatchBuilder::new(compression).with_producer(header.producer_id, header.producer_epoch, header.base_sequence);
    for r in &records {
        builder.append(r.timestamp, r.key.as_deref(), r.value.as_deref(), &r.headers);
    }
    Ok(builder.build())
}

fn put_nullable(buf: &mut BytesMut, field: Option<&[u8]>) {
    match field {
        None => put_varint(buf, -1),
        Some(b) => {
            put_varint(buf, b.len() as i32);
            buf.put_slice(b);
        }
    }
}

/// Bytes one record adds to an uncompressed batch, at most (for size checks
/// before appending).
pub fn record_size_upper_bound(key: Option<&[u8]>, value: Option<&[u8]>, headers: &[Header]) -> usize {
    let mut size = 5 + 1 + 10 + 5 + 5 + 5 + 5;
    size += key.map_or(0, <[u8]>::len) + value.map_or(0, <[u8]>::len);
    for h in headers {
        size += 10 + h.key.len() + h.value.as_ref().map_or(0, Bytes::len);
    }
    size
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(compression: Compression, n: usize) -> Bytes {
        let mut b = BatchBuilder::new(compression);
        for i in 0..n {
            let headers = [Header { key: "h".into(), value: Some(Bytes::from(format!("v{i}"))) }];
            b.append(1_000 + i as i64, Some(format!("k{i}").as_bytes()), Some(&[i as u8; 100]), &headers);
        }
        b.build()
    }

    #[test]
    fn roundtrip_every_codec() {
        for c in [Compression::None, Compression::Lz4, Compression::Zstd] {
            let batch = sample(c, 50);
            let header = validate(&batch, &ValidationLimits::default()).unwrap();
            assert_eq!(header.record_count, 50);
            assert_eq!(header.compression().unwrap(), c);
            assert_eq!(header.max_timestamp, 1_049);
            let records = decode_records(&batch).unwrap();
            assert_eq!(records.len(), 50);
            assert_eq!(records[7].key.as_deref(), Some(&b"k7"[..]));
            assert_eq!(records[7].timestamp, 1_007);
            assert_eq!(records[7].headers[0].value.as_deref(), Some(&b"v7"[..]));
        }
    }

    #[test]
    fn a_rebuilt_batch_with_a_delete_horizon_keeps_offsets_and_timestamps() {
        for c in [Compression::None, Compression::Zstd] {
            let original = sample(c, 10);
            let header = BatchHeader::parse(&original).unwrap();
            assert_eq!(header.delete_horizon(), None);
            let records = decode_records(&original).unwrap();
            let mut b = BatchBuilder::rebuild_of(&header, c).with_delete_horizon(9_999_999);
            for r in records.iter().filter(|r| r.offset % 3 == 1) {
                b.append_at(r.offset as i32, r.timestamp, r.key.as_deref(), None, &r.headers);
            }
            let rebuilt = b.build();
            let h = BatchHeader::parse(&rebuilt).unwrap();
            assert_eq!(h.delete_horizon(), Some(9_999_999));
            assert_eq!((h.last_offset_delta, h.max_timestamp, h.record_count), (9, header.max_timestamp, 3));
            assert_eq!(h.compression().unwrap(), c);
            let kept = decode_records(&rebuilt).unwrap();
            let offsets: Vec<_> = kept.iter().map(|r| (r.offset, r.timestamp, r.value.is_none())).collect();
            assert_eq!(offsets, [(1, 1_001, true), (4, 1_004, true), (7, 1_007, true)]);
        }
    }

    #[test]
    fn recompress_keeps_records() {
        let plain = sample(Compression::None, 20);
        let packed = recompress(&plain, Compression::Zstd).unwrap();
        assert_eq!(BatchHeader::parse(&packed).unwrap().compression().unwrap(), Compression::Zstd);
        assert_eq!(decode_records(&packed).unwrap(), decode_records(&plain).unwrap());
    }

    #[test]
    fn compression_shrinks_repetitive_data() {
        let plain = sample(Compression::None, 200);
        assert!(sample(Compression::Zstd, 200).len() < plain.len() / 2);
        assert!(sample(Compression::Lz4, 200).len() < plain.len() / 2);
    }

    #[test]
    fn prefix_patch_keeps_crc_valid() {
        let batch = sample(Compression::None, 3);
        let mut stored = batch.to_vec();
        stored[..16].copy_from_slice(&patched_prefix(&batch, 4242, 7));
        let header = validate(&stored, &ValidationLimits::default()).unwrap();
        assert_eq!(header.base_offset, 4242);
        assert_eq!(header.leader_epoch, 7);
        assert_eq!(decode_records(&Bytes::from(stored)).unwrap()[2].offset, 4244);
    }

    #[test]
    fn rejects_flipped_bit_and_oversized_record() {
        let batch = sample(Compression::None, 3);
        let mut bad = batch.to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(validate(&bad, &ValidationLimits::default()), Err(BatchError::BadCrc { .. })));
        let limits = ValidationLimits { record_bytes_max: 50, ..ValidationLimits::default() };
        assert!(matches!(validate(&batch, &limits), Err(BatchError::RecordTooLarge { index: 0, .. })));
    }

    #[test]
    fn batches_iterator_splits_and_stops_at_partial() {
        let a = sample(Compression::None, 2);
        let b = sample(Compression::Zstd, 3);
        let mut buf = BytesMut::new();
        buf.put_slice(&a);
        buf.put_slice(&b);
        buf.put_slice(&a[..30]);
        let batches: Vec<_> = Batches::new(buf.freeze()).collect::<Result<_, _>>().unwrap();
        assert_eq!(batches.len(), 2);
        assert_eq!(batches[1].0.record_count, 3);
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// Inputs the `batch_validate` fuzz target found (integer overflows).
    #[test]
    fn fuzz_regressions_do_not_panic() {
        let limits = ValidationLimits::default();
        for input in [
            "000000000000000000000038ffffffff02853700e30000ffffffff00000000000000000000000000000000ffffffffffffffffffffffffffff000000010c000000010100",
            "000000000000000000000038ffffffff02f63f39730000000000007fffffffffffffff0000000000000000ffffffffffffffffffffffffffff000000010c000200010100",
            "7fffffffffffffff0000003fffffffff026047c08c00000000000100000000000000000000000000000000ffffffffffffffffffffffffffff000000020c0000000101000c000002010100",
            "000000000000000000000051ffffffff02dc67ad0d00000000000100000000000000000000000000000000ffffffffffffffffffffffffffff000000021e00feffffffffffffffff01000101001e00ffffffffffffffffff0102010100",
        ] {
            let bytes = Bytes::from(hex(input));
            let _ = validate(&bytes, &limits);
            if let Ok(records) = decode_records(&bytes) {
                let again = recompress(&bytes, Compression::Zstd).unwrap();
                let mut expected = records.clone();
                for (i, r) in expected.iter_mut().enumerate() {
                    r.offset = i as i64;
                }
                assert_eq!(decode_records(&again).unwrap(), expected);
            }
        }
    }

    #[test]
    fn extreme_timestamps_roundtrip() {
        let mut b = BatchBuilder::new(Compression::None);
        b.append(i64::MAX, None, Some(b"a"), &[]);
        b.append(i64::MIN, None, Some(b"b"), &[]);
        let records = decode_records(&b.build()).unwrap();
        assert_eq!(records[0].timestamp, i64::MAX);
        assert_eq!(records[1].timestamp, i64::MIN);
    }

    proptest! {
        #[test]
        fn validate_and_decode_never_panic(bytes: Vec<u8>) {
            let _ = validate(&bytes, &ValidationLimits::default());
            let _ = decode_records(&Bytes::from(bytes));
        }

        #[test]
        fn corrupted_batches_never_validate(pos in 17usize..400, bit in 0u8..8) {
            let batch = sample(Compression::None, 3);
            let mut bad = batch.to_vec();
            let pos = pos % bad.len();
            prop_assume!(pos >= 16); // prefix bytes are not CRC-protected by design
            bad[pos] ^= 1 << bit;
            prop_assert!(validate(&bad, &ValidationLimits::default()).is_err());
        }

        #[test]
        fn roundtrip_arbitrary(records in proptest::collection::vec(
            (any::<i64>().prop_map(|t| t >> 2), proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
             proptest::option::of(proptest::collection::vec(any::<u8>(), 0..256))), 1..40),
            codec in prop_oneof![Just(Compression::None), Just(Compression::Lz4), Just(Compression::Zstd)]) {
            let mut b = BatchBuilder::new(codec);
            for (ts, k, v) in &records {
                b.append(*ts, k.as_deref(), v.as_deref(), &[]);
            }
            let batch = b.build();
            validate(&batch, &ValidationLimits::default()).unwrap();
            let decoded = decode_records(&batch).unwrap();
            prop_assert_eq!(decoded.len(), records.len());
            for (i, (r, (ts, k, v))) in decoded.iter().zip(&records).enumerate() {
                prop_assert_eq!(r.offset, i as i64);
                prop_assert_eq!(r.timestamp, *ts);
                prop_assert_eq!(r.key.as_deref(), k.as_deref());
                prop_assert_eq!(r.value.as_deref(), v.as_deref());
            }
        }
    }
}
