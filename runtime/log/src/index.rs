//! The sparse offset and time indexes of one segment: kept in memory for
//! lookups, encoded to `.index` / `.timeindex` files when a segment is sealed
//! (and for the active segment on close), validated when loaded.
//!
//! Offsets in both indexes are relative to the segment's base offset (u32),
//! positions are byte positions in the segment's `.log` file (u32), all
//! big-endian, so an entry is 8 (offset index) or 12 (time index) bytes.
//!
//! A third, `.txnindex`, lists the transactions aborted by a marker in the
//! segment, in marker order (Kafka's aborted-transaction index): producer
//! id, first offset, marker offset, the LSO after the marker — four i64,
//! 32 bytes an entry.

use quiver_transactions::partition::AbortedTxn;

/// Bytes per `.index` entry: u32 relative offset + u32 file position.
pub(crate) const OFFSET_ENTRY_LEN: usize = 8;
/// Bytes per `.timeindex` entry: i64 timestamp + u32 relative offset.
pub(crate) const TIME_ENTRY_LEN: usize = 12;
/// Bytes per `.txnindex` entry.
pub(crate) const TXN_ENTRY_LEN: usize = 32;

/// A segment's aborted transactions as a `.txnindex` file.
pub(crate) fn encode_aborts(aborts: &[AbortedTxn]) -> Vec<u8> {
    let mut out = Vec::with_capacity(aborts.len() * TXN_ENTRY_LEN);
    for a in aborts {
        for field in [a.producer_id, a.first_offset, a.last_offset, a.last_stable_offset] {
            out.extend_from_slice(&field.to_be_bytes());
        }
    }
    out
}

/// Decodes the `.txnindex` of the segment holding offsets `base..next`: any
/// inconsistency (a marker outside the segment or out of order, a first
/// offset after its marker) is an error, so a torn or stale file is rebuilt.
pub(crate) fn decode_aborts(bytes: &[u8], base: i64, next: i64) -> Result<Vec<AbortedTxn>, String> {
    if !bytes.len().is_multiple_of(TXN_ENTRY_LEN) {
        return Err(format!("size {} is not a multiple of {TXN_ENTRY_LEN}", bytes.len()));
    }
    let mut aborts: Vec<AbortedTxn> = Vec::with_capacity(bytes.len() / TXN_ENTRY_LEN);
    for chunk in bytes.chunks_exact(TXN_ENTRY_LEN) {
        let field = |i: usize| i64::from_be_bytes(chunk[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let a = AbortedTxn {
            producer_id: field(0),
            first_offset: field(1),
            last_offset: field(2),
            last_stable_offset: field(3),
        };
        if !(base..next).contains(&a.last_offset) {
            return Err(format!("marker offset {} outside the segment's {base}..{next}", a.last_offset));
        }
        if a.first_offset > a.last_offset || a.last_stable_offset > a.last_offset + 1 {
            return Err(format!("entry {a:?} is not an abort"));
        }
        if aborts.last().is_some_and(|last| last.last_offset >= a.last_offset) {
            return Err(format!("marker offset {} does not follow the previous one", a.last_offset));
        }
        aborts.push(a);
    }
    Ok(aborts)
}

/// Maps the relative base offset of some batches to their file position.
/// Every entry points at the start of a batch; positions and offsets both
/// strictly increase.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct OffsetIndex {
    entries: Vec<(u32, u32)>,
}

impl OffsetIndex {
    pub(crate) fn push(&mut self, relative_offset: u32, position: u32) {
        if let Some(&(last_rel, last_pos)) = self.entries.last() {
            assert!(
                relative_offset > last_rel && position > last_pos,
                "offset index must grow strictly: ({last_rel}, {last_pos}) then ({relative_offset}, {position})"
            );
        }
        self.entries.push((relative_offset, position));
    }

    /// Position of the last indexed batch whose base offset is <= the target:
    /// the batch containing the target starts there or later. 0 when no
    /// entry qualifies (the first batch of a segment is at position 0).
    pub(crate) fn lookup(&self, relative_offset: u32) -> u64 {
        let n = self.entries.partition_point(|&(rel, _)| rel <= relative_offset);
        if n == 0 { 0 } else { u64::from(self.entries[n - 1].1) }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.entries.len() * OFFSET_ENTRY_LEN);
        for &(rel, pos) in &self.entries {
            out.extend_from_slice(&rel.to_be_bytes());
            out.extend_from_slice(&pos.to_be_bytes());
        }
        out
    }

    /// Decodes an `.index` file of a segment holding `offset_span` offsets in
    /// `file_len` bytes; any inconsistency is an error, so a torn or stale
    /// file leads to a rebuild instead of wrong lookups.
    pub(crate) fn decode(bytes: &[u8], offset_span: u64, file_len: u64) -> Result<Self, String> {
        if !bytes.len().is_multiple_of(OFFSET_ENTRY_LEN) {
            return Err(format!("size {} is not a multiple of {OFFSET_ENTRY_LEN}", bytes.len()));
        }
        let mut index = OffsetIndex::default();
        for chunk in bytes.chunks_exact(OFFSET_ENTRY_LEN) {
            let rel = u32::from_be_bytes(chunk[..4].try_into().expect("4 bytes"));
            let pos = u32::from_be_bytes(chunk[4..].try_into().expect("4 bytes"));
            if u64::from(rel) >= offset_span {
                return Err(format!("relative offset {rel} beyond the segment's {offset_span} offsets"));
            }
            if u64::from(pos) >= file_len {
                return Err(format!("position {pos} beyond the file's {file_len} bytes"));
            }
            if let Some(&(last_rel, last_pos)) = index.entries.last()
                && (rel <= last_rel || pos <= last_pos)
            {
                return Err(format!("entry ({rel}, {pos}) does not follow ({last_rel}, {last_pos})"));
            }
            index.entries.push((rel, pos));
        }
        Ok(index)
    }
}

/// Maps the running max timestamp of a segment to the relative base offset
/// of the batch at which it was reached. Timestamps strictly increase, so
/// every batch before an entry's batch (and that batch) has a max timestamp
/// no larger than the entry's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TimeIndex {
    entries: Vec<(i64, u32)>,
}

impl TimeIndex {
    /// Adds an entry if `timestamp` is larger than the last one; otherwise it
    /// would carry no information.
    pub(crate) fn push(&mut self, timestamp: i64, relative_offset: u32) {
        if let Some(&(last_ts, last_rel)) = self.entries.last() {
            if timestamp <= last_ts {
                return;
            }
            assert!(relative_offset >= last_rel, "time index offsets must not decrease");
        }
        self.entries.push((timestamp, relative_offset));
    }

    /// Relative offset of a batch from which a scan for the first batch with
    /// max timestamp >= `timestamp` may start: all batches up to and
    /// including it are older. `None` means scan from the segment start.
    pub(crate) fn lookup(&self, timestamp: i64) -> Option<u32> {
        let n = self.entries.partition_point(|&(ts, _)| ts < timestamp);
        (n > 0).then(|| self.entries[n - 1].1)
    }

    /// The largest timestamp in the segment, if the index is complete (sealed
    /// segments get a final entry for it).
    pub(crate) fn max_timestamp(&self) -> Option<i64> {
        self.entries.last().map(|&(ts, _)| ts)
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.entries.len() * TIME_ENTRY_LEN);
        for &(ts, rel) in &self.entries {
            out.extend_from_slice(&ts.to_be_bytes());
            out.extend_from_slice(&rel.to_be_bytes());
        }
        out
    }

    /// Decodes a `.timeindex` file; a non-empty segment must have at least
    /// one entry (its max timestamp), or retention could not judge it.
    pub(crate) fn decode(bytes: &[u8], offset_span: u64, file_len: u64) -> Result<Self, String> {
        if !bytes.len().is_multiple_of(TIME_ENTRY_LEN) {
            return Err(format!("size {} is not a multiple of {TIME_ENTRY_LEN}", bytes.len()));
        }
        if bytes.is_empty() && file_len > 0 {
            return Err("empty time index for a non-empty segment".into());
        }
        let mut index = TimeIndex::default();
        for chunk in bytes.chunks_exact(TIME_ENTRY_LEN) {
            let ts = i64::from_be_bytes(chunk[..8].try_into().expect("8 bytes"));
            let rel = u32::from_be_bytes(chunk[8..].try_into().expect("4 bytes"));
            if u64::from(rel) >= offset_span {
                return Err(format!("relative offset {rel} beyond the segment's {offset_span} offsets"));
            }
            if let Some(&(last_ts, last_rel)) = index.entries.last()
                && (ts <= last_ts || rel < last_rel)
            {
                return Err(format!("entry ({ts}, {rel}) does not follow ({last_ts}, {last_rel})"));
            }
            index.entries.push((ts, rel));
        }
        Ok(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn damaged_txn_indexes_are_refused() {
        let a = AbortedTxn { producer_id: 7, first_offset: 2, last_offset: 12, last_stable_offset: 5 };
        let bytes = encode_aborts(&[a]);
        assert!(decode_aborts(&bytes[..31], 10, 20).is_err(), "torn");
        assert!(decode_aborts(&bytes, 13, 20).is_err(), "the marker before the segment");
        assert!(decode_aborts(&bytes, 0, 12).is_err(), "the marker after the segment");
        assert!(decode_aborts(&encode_aborts(&[a, a]), 10, 20).is_err(), "not in marker order");
        let inverted = AbortedTxn { first_offset: 13, ..a };
        assert!(decode_aborts(&encode_aborts(&[inverted]), 10, 20).is_err(), "data after its marker");
    }

    #[test]
    fn offset_lookup_finds_floor_entry() {
        let mut index = OffsetIndex::default();
        assert_eq!(index.lookup(5), 0);
        index.push(10, 4096);
        index.push(20, 8200);
        index.push(35, 12_300);
        assert_eq!(index.lookup(0), 0);
        assert_eq!(index.lookup(9), 0);
        assert_eq!(index.lookup(10), 4096);
        assert_eq!(index.lookup(19), 4096);
        assert_eq!(index.lookup(20), 8200);
        assert_eq!(index.lookup(1_000), 12_300);
    }

    #[test]
    fn time_lookup_returns_last_older_entry() {
        let mut index = TimeIndex::default();
        index.push(100, 0);
        index.push(90, 3); // not larger: ignored
        index.push(200, 7);
        index.push(300, 12);
        assert_eq!(index.lookup(50), None);
        assert_eq!(index.lookup(100), None);
        assert_eq!(index.lookup(101), Some(0));
        assert_eq!(index.lookup(300), Some(7));
        assert_eq!(index.lookup(301), Some(12));
        assert_eq!(index.max_timestamp(), Some(300));
    }

    #[test]
    fn encode_decode_roundtrip() {
        let mut offsets = OffsetIndex::default();
        offsets.push(3, 100);
        offsets.push(9, 5000);
        let decoded = OffsetIndex::decode(&offsets.encode(), 10, 6000).unwrap();
        assert_eq!(decoded, offsets);
        let mut times = TimeIndex::default();
        times.push(-5, 0);
        times.push(1_700_000_000_000, 9);
        assert_eq!(TimeIndex::decode(&times.encode(), 10, 6000).unwrap(), times);
        let aborts = [
            AbortedTxn { producer_id: 7, first_offset: 2, last_offset: 12, last_stable_offset: 5 },
            AbortedTxn { producer_id: 8, first_offset: 14, last_offset: 15, last_stable_offset: 16 },
        ];
        assert_eq!(decode_aborts(&encode_aborts(&aborts), 10, 20).unwrap(), aborts);
        assert_eq!(decode_aborts(&[], 10, 20).unwrap(), []);
    }

    #[test]
    fn decode_rejects_invalid_files() {
        let mut offsets = OffsetIndex::default();
        offsets.push(3, 100);
        offsets.push(9, 5000);
        let bytes = offsets.encode();
        assert!(OffsetIndex::decode(&bytes[..12], 10, 6000).is_err(), "partial entry");
        assert!(OffsetIndex::decode(&bytes, 10, 5000).is_err(), "position beyond file");
        assert!(OffsetIndex::decode(&bytes, 9, 6000).is_err(), "offset beyond segment");
        let mut swapped = bytes[8..].to_vec();
        swapped.extend_from_slice(&bytes[..8]);
        assert!(OffsetIndex::decode(&swapped, 10, 6000).is_err(), "not monotonic");
        assert!(OffsetIndex::decode(&[0; 16], 10, 6000).is_err(), "zeroed file");
        assert!(TimeIndex::decode(&[], 10, 6000).is_err(), "empty time index");
        assert!(TimeIndex::decode(&[0; 24], 10, 6000).is_err(), "zeroed time index");
        assert!(TimeIndex::decode(&[0; 13], 10, 6000).is_err(), "partial entry");
    }
}
