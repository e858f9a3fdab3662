//! Zero-copy views of the records in one input batch.
//!
//! The input buffer is the records section of a Kafka v2 record batch: each
//! record is `length attributes timestampDelta offsetDelta key value headers`
//! with zig-zag varints and `-1` for a null key or value (spec/log-format.md).

use crate::Error;

/// One input record. Key, value and header values borrow the batch buffer.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    index: u32,
    offset: i64,
    timestamp: i64,
    key: Option<&'a [u8]>,
    value: Option<&'a [u8]>,
    header_count: u32,
    headers: &'a [u8],
}

impl<'a> Record<'a> {
    /// Position of the record within its batch, from 0.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Offset of the record in its partition.
    pub fn offset(&self) -> i64 {
        self.offset
    }

    /// Timestamp, milliseconds since the Unix epoch.
    pub fn timestamp(&self) -> i64 {
        self.timestamp
    }

    pub fn key(&self) -> Option<&'a [u8]> {
        self.key
    }

    pub fn value(&self) -> Option<&'a [u8]> {
        self.value
    }

    /// The value as UTF-8 text; an error naming the problem otherwise.
    pub fn value_str(&self) -> Result<&'a str, Error> {
        let value = self.value.ok_or_else(|| Error::new("value is null"))?;
        std::str::from_utf8(value).map_err(|e| Error::new(format!("value is not UTF-8: {e}")))
    }

    /// The headers in order: (name, value).
    pub fn headers(&self) -> Headers<'a> {
        Headers { buf: self.headers, left: self.header_count }
    }

    /// The value of the first header named `name`.
    pub fn header(&self, name: &str) -> Option<Option<&'a [u8]>> {
        self.headers().find(|(k, _)| *k == name).map(|(_, v)| v)
    }
}

/// Iterator over a record's headers.
#[derive(Debug, Clone)]
pub struct Headers<'a> {
    buf: &'a [u8],
    left: u32,
}

impl<'a> Iterator for Headers<'a> {
    type Item = (&'a str, Option<&'a [u8]>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // The batch was validated when the records were decoded.
        let key = take_nullable(&mut self.buf).ok()?.unwrap_or_default();
        let value = take_nullable(&mut self.buf).ok()?;
        Some((std::str::from_utf8(key).unwrap_or_default(), value))
    }
}

/// The records of one batch, decoded one by one on demand.
#[derive(Debug, Clone)]
pub struct Records<'a> {
    buf: &'a [u8],
    base_offset: i64,
    base_timestamp: i64,
    next_index: u32,
}

impl<'a> Records<'a> {
    pub fn new(buf: &'a [u8], base_offset: i64, base_timestamp: i64) -> Self {
        Records { buf, base_offset, base_timestamp, next_index: 0 }
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<Record<'a>, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        let index = self.next_index;
        self.next_index += 1;
        let record = decode(&mut self.buf, index, self.base_offset, self.base_timestamp);
        if record.is_err() {
            self.buf = &[];
        }
        Some(record)
    }
}

fn decode<'a>(buf: &mut &'a [u8], index: u32, base_offset: i64, base_timestamp: i64) -> Result<Record<'a>, Error> {
    let bad = |what: &str| Error::new(format!("malformed record {index}: {what}"));
    let len = get_varint(buf).ok_or_else(|| bad("length"))?;
    if len < 1 || len as usize > buf.len() {
        return Err(bad("length"));
    }
    let (mut rec, rest) = buf.split_at(len as usize);
    *buf = rest;
    rec = &rec[1..]; // attributes
    let timestamp_delta = get_varint(&mut rec).ok_or_else(|| bad("timestamp"))?;
    let offset_delta = get_varint(&mut rec).ok_or_else(|| bad("offset"))?;
    let key = take_nullable(&mut rec).map_err(|_| bad("key"))?;
    let value = take_nullable(&mut rec).map_err(|_| bad("value"))?;
    let header_count = get_varint(&mut rec).ok_or_else(|| bad("header count"))?;
    if header_count < 0 {
        return Err(bad("header count"));
    }
    Ok(Record {
        index,
        offset: base_offset.wrapping_add(offset_delta),
        timestamp: base_timestamp.wrapping_add(timestamp_delta),
        key,
        value,
        header_count: header_count as u32,
        headers: rec,
    })
}

fn take_nullable<'a>(buf: &mut &'a [u8]) -> Result<Option<&'a [u8]>, ()> {
    let len = get_varint(buf).ok_or(())?;
    if len == -1 {
        return Ok(None);
    }
    if len < 0 || len as usize > buf.len() {
        return Err(());
    }
    let (field, rest) = buf.split_at(len as usize);
    *buf = rest;
    Ok(Some(field))
}

/// Reads one zig-zag varint (up to 64 bits).
pub(crate) fn get_varint(buf: &mut &[u8]) -> Option<i64> {
    let mut raw: u64 = 0;
    for (i, &b) in buf.iter().enumerate().take(10) {
        raw |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            *buf = &buf[i + 1..];
            return Some((raw >> 1) as i64 ^ -((raw & 1) as i64));
        }
    }
    None
}

/// Appends one zig-zag varint.
pub(crate) fn put_varint(out: &mut Vec<u8>, value: i64) {
    let mut raw = ((value << 1) ^ (value >> 63)) as u64;
    while raw >= 0x80 {
        out.push(raw as u8 | 0x80);
        raw >>= 7;
    }
    out.push(raw as u8);
}

pub(crate) fn put_nullable(out: &mut Vec<u8>, field: Option<&[u8]>) {
    match field {
        None => put_varint(out, -1),
        Some(b) => {
            put_varint(out, b.len() as i64);
            out.extend_from_slice(b);
        }
    }
}

/// Encodes records the way a batch stores them (for tests and tools that feed
/// a plugin without a broker).
pub fn encode_record(
    out: &mut Vec<u8>,
    timestamp_delta: i64,
    offset_delta: i64,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: &[(&str, Option<&[u8]>)],
) {
    let mut inner = vec![0u8];
    put_varint(&mut inner, timestamp_delta);
    put_varint(&mut inner, offset_delta);
    put_nullable(&mut inner, key);
    put_nullable(&mut inner, value);
    put_varint(&mut inner, headers.len() as i64);
    for (k, v) in headers {
        put_nullable(&mut inner, Some(k.as_bytes()));
        put_nullable(&mut inner, *v);
    }
    put_varint(out, inner.len() as i64);
    out.extend_from_slice(&inner);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_the_batch_layout() {
        let mut buf = Vec::new();
        encode_record(&mut buf, 0, 0, Some(b"k1"), Some(b"v1"), &[("h", Some(b"x"))]);
        encode_record(&mut buf, -5, 1, None, None, &[]);
        let records: Vec<_> = Records::new(&buf, 100, 1_000).collect::<Result<_, _>>().unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!((records[0].offset(), records[0].timestamp()), (100, 1_000));
        assert_eq!(records[0].key(), Some(&b"k1"[..]));
        assert_eq!(records[0].header("h"), Some(Some(&b"x"[..])));
        assert_eq!((records[1].offset(), records[1].timestamp()), (101, 995));
        assert_eq!((records[1].key(), records[1].value()), (None, None));
    }

    #[test]
    fn a_truncated_buffer_is_an_error_not_a_panic() {
        let mut buf = Vec::new();
        encode_record(&mut buf, 0, 0, Some(b"key"), Some(b"value"), &[]);
        for cut in 0..buf.len() {
            let _ = Records::new(&buf[..cut], 0, 0).collect::<Vec<_>>();
        }
        assert!(Records::new(&buf[..buf.len() - 1], 0, 0).next().unwrap().is_err());
    }

    #[test]
    fn varints_round_trip() {
        for v in [0i64, 1, -1, 63, -64, 64, 300, i32::MAX as i64, i64::MIN, i64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(get_varint(&mut &out[..]), Some(v));
        }
    }
}
