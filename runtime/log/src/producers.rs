//! Idempotent producers' state in one partition: for each producer id, its
//! epoch and the sequence numbers and offsets of its last few batches, so
//! that a leader recognises a retried batch (answering with the offsets it
//! got the first time) and a batch that skips a sequence.
//!
//! Every replica keeps it from the batches it appends, as a leader or a
//! follower, so a new leader deduplicates retries of batches its
//! predecessor appended. It survives restarts through a snapshot written at
//! each segment roll (`<base offset>.producers`: the state after every
//! batch below that offset) plus the scan of the active segment that
//! recovery does anyway.
//!
//! The same replay keeps the partition's side of transactions
//! ([`PartitionTxns`]: each producer's open transaction and the last stable
//! offset), snapshotted with the sequences; [`Producers::record`] hands the
//! aborts it sees to the log, which indexes them per segment.

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::io;
use std::path::Path;

use quiver_protocol::batch::{BatchHeader, NO_PRODUCER_ID};
use quiver_transactions::partition::{AbortedTxn, Ended, PartitionTxns};

use crate::AppendInfo;

/// Batches remembered per producer: a producer keeps at most this many in
/// flight per partition, so a retry always finds its original here.
pub const BATCHES_KEPT: usize = 16;

/// Producers silent this long (by their batches' timestamps, against the
/// newest producer's) are forgotten at the next roll, like Kafka's
/// `transactional.id.expiration.ms` default.
pub const PRODUCER_EXPIRY_MS: i64 = 7 * 24 * 3600 * 1000;

/// Snapshots with open transactions. Older ones are still read: `QPS1`
/// (sequences only, from before transactions) and `QPS2` (which also listed
/// the aborted transactions, now in each segment's `.txnindex`: read and
/// dropped).
const SNAPSHOT_MAGIC: &[u8; 4] = b"QPS3";
const SNAPSHOT_MAGIC_V2: &[u8; 4] = b"QPS2";
const SNAPSHOT_MAGIC_V1: &[u8; 4] = b"QPS1";

/// One remembered batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BatchMeta {
    first_sequence: i32,
    last_sequence: i32,
    base_offset: i64,
    last_offset: i64,
    max_timestamp: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ProducerEntry {
    epoch: i16,
    /// Oldest first, at most [`BATCHES_KEPT`].
    batches: VecDeque<BatchMeta>,
}

impl ProducerEntry {
    fn last_timestamp(&self) -> i64 {
        self.batches.back().map_or(i64::MIN, |b| b.max_timestamp)
    }
}

/// What [`Producers::check`] decided about a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Not idempotent, or the next batch of its producer: append it.
    Append,
    /// Already appended: these are the offsets it got.
    Duplicate(AppendInfo),
}

/// Why an idempotent batch is refused. Nothing was appended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SequenceError {
    /// The producer has moved to a newer epoch on this partition: this
    /// batch belongs to a generation that gave up.
    #[error("producer {producer_id} epoch {epoch} is fenced: this partition has seen its epoch {current}")]
    Fenced { producer_id: i64, epoch: i16, current: i16 },
    /// A sequence is missing before this batch (an earlier batch is still in
    /// flight, or was lost).
    #[error("producer {producer_id} epoch {epoch}: sequence {got} where {expected} was expected")]
    OutOfOrder { producer_id: i64, epoch: i16, expected: i32, got: i32 },
    /// The batch's sequence is below what the partition expects and not
    /// among the producer's remembered batches: written long ago, or never
    /// (the leader learned of the producer only from a later batch). It can
    /// never be appended in this epoch.
    #[error(
        "producer {producer_id} epoch {epoch}: sequence {got} is behind the {expected} expected and not among the \
         last {BATCHES_KEPT} batches: it may or may not have been written"
    )]
    Stale { producer_id: i64, epoch: i16, expected: i32, got: i32 },
}

/// The sequence of a batch's last record: sequences wrap from `i32::MAX`
/// to 0, as in Kafka.
pub fn last_sequence(base_sequence: i32, last_offset_delta: i32) -> i32 {
    ((i64::from(base_sequence) + i64::from(last_offset_delta)) % (i64::from(i32::MAX) + 1)) as i32
}

fn next_sequence(last: i32) -> i32 {
    if last == i32::MAX { 0 } else { last + 1 }
}

/// The producer state of one partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Producers {
    map: HashMap<i64, ProducerEntry>,
    txns: PartitionTxns,
}

impl Producers {
    /// Whether `header` (of a batch about to be appended by a leader) may be
    /// appended. A producer this partition does not know starts at any
    /// sequence (its state may have expired, or gone with deleted segments);
    /// a known one continues its sequence, or starts again at 0 in a higher
    /// epoch.
    pub fn check(&self, header: &BatchHeader) -> Result<Check, SequenceError> {
        if header.producer_id == NO_PRODUCER_ID {
            return Ok(Check::Append);
        }
        let Some(entry) = self.map.get(&header.producer_id) else {
            return Ok(Check::Append);
        };
        let (producer_id, epoch, got) = (header.producer_id, header.producer_epoch, header.base_sequence);
        if epoch < entry.epoch {
            return Err(SequenceError::Fenced { producer_id, epoch, current: entry.epoch });
        }
        // A transaction marker has no sequence: only its epoch counts.
        if header.is_control() {
            return Ok(Check::Append);
        }
        if epoch > entry.epoch {
            return match got {
                0 => Ok(Check::Append),
                _ => Err(SequenceError::OutOfOrder { producer_id, epoch, expected: 0, got }),
            };
        }
        let last = last_sequence(got, header.last_offset_delta);
        if let Some(b) = entry.batches.iter().find(|b| b.first_sequence == got && b.last_sequence == last) {
            return Ok(Check::Duplicate(AppendInfo {
                base_offset: b.base_offset,
                last_offset: b.last_offset,
                max_timestamp: b.max_timestamp,
            }));
        }
        let expected = entry.batches.back().map_or(0, |b| next_sequence(b.last_sequence));
        // How far behind the expected sequence it is, modulo the wrap.
        let behind = (i64::from(expected) - i64::from(got)).rem_euclid(i64::from(i32::MAX) + 1);
        if got == expected || entry.batches.is_empty() {
            Ok(Check::Append)
        } else if behind < 1 << 30 {
            Err(SequenceError::Stale { producer_id, epoch, expected, got })
        } else {
            Err(SequenceError::OutOfOrder { producer_id, epoch, expected, got })
        }
    }

    /// Remembers a batch as stored (real offsets), leader or follower alike.
    /// `marker` is what a control batch holds: `Some(true)` a commit,
    /// `Some(false)` an abort. Returns the transaction the batch aborted, if
    /// it did: the log indexes it with the segment.
    pub fn record(&mut self, stored: &BatchHeader, marker: Option<bool>) -> Option<AbortedTxn> {
        if stored.producer_id == NO_PRODUCER_ID {
            return None;
        }
        let ended = self.txns.on_batch(
            stored.producer_id,
            stored.base_offset,
            stored.last_offset(),
            stored.is_transactional(),
            marker,
        );
        let aborted = match ended {
            Some(Ended::Aborted(a)) => Some(a),
            _ => None,
        };
        let entry = self
            .map
            .entry(stored.producer_id)
            .or_insert_with(|| ProducerEntry { epoch: stored.producer_epoch, batches: VecDeque::new() });
        if stored.producer_epoch > entry.epoch {
            entry.epoch = stored.producer_epoch;
            entry.batches.clear();
        }
        // A marker fences the epochs below its own (its transaction's
        // producer moves on to it) but is no sequence of the producer's.
        if stored.is_control() {
            return aborted;
        }
        if entry.batches.len() == BATCHES_KEPT {
            entry.batches.pop_front();
        }
        entry.batches.push_back(BatchMeta {
            first_sequence: stored.base_sequence,
            last_sequence: last_sequence(stored.base_sequence, stored.last_offset_delta),
            base_offset: stored.base_offset,
            last_offset: stored.last_offset(),
            max_timestamp: stored.max_timestamp,
        });
        aborted
    }

    /// Forgets producers whose last batch is more than [`PRODUCER_EXPIRY_MS`]
    /// older than the newest producer's.
    pub fn expire(&mut self) {
        let newest = self.map.values().map(ProducerEntry::last_timestamp).max().unwrap_or(i64::MIN);
        let cutoff = newest.saturating_sub(PRODUCER_EXPIRY_MS);
        self.map.retain(|_, e| e.last_timestamp() >= cutoff);
    }

    /// The partition's transactions.
    pub fn txns(&self) -> &PartitionTxns {
        &self.txns
    }

    /// How many producers are known.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The last offset of a producer's last batch, if known: the batch the
    /// cleaner keeps (even emptied) so that replicas learn its sequence.
    pub fn last_batch_end(&self, producer_id: i64) -> Option<i64> {
        Some(self.map.get(&producer_id)?.batches.back()?.last_offset)
    }

    /// The newest epoch of a producer this partition has seen, if known.
    pub fn epoch_of(&self, producer_id: i64) -> Option<i16> {
        Some(self.map.get(&producer_id)?.epoch)
    }

    /// A producer's epoch and last sequence, if known.
    pub fn last_sequence_of(&self, producer_id: i64) -> Option<(i16, i32)> {
        let entry = self.map.get(&producer_id)?;
        Some((entry.epoch, entry.batches.back()?.last_sequence))
    }

    /// The snapshot file's bytes: magic, count, entries sorted by producer
    /// id, then a CRC-32C of everything before it.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.map.len() * 64);
        out.extend_from_slice(SNAPSHOT_MAGIC);
        out.extend_from_slice(&(self.map.len() as u32).to_be_bytes());
        let mut ids: Vec<_> = self.map.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let entry = &self.map[&id];
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(&entry.epoch.to_be_bytes());
            out.push(entry.batches.len() as u8);
            for b in &entry.batches {
                out.extend_from_slice(&b.first_sequence.to_be_bytes());
                out.extend_from_slice(&b.last_sequence.to_be_bytes());
                out.extend_from_slice(&b.base_offset.to_be_bytes());
                out.extend_from_slice(&b.last_offset.to_be_bytes());
                out.extend_from_slice(&b.max_timestamp.to_be_bytes());
            }
        }
        let open = self.txns.open();
        out.extend_from_slice(&(open.len() as u32).to_be_bytes());
        for (producer_id, first_offset) in open {
            out.extend_from_slice(&producer_id.to_be_bytes());
            out.extend_from_slice(&first_offset.to_be_bytes());
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    /// Decodes [`Producers::encode`]'s bytes; `None` if they are torn or
    /// not a snapshot.
    pub fn decode(bytes: &[u8]) -> Option<Producers> {
        let (body, crc) = bytes.split_at_checked(bytes.len().checked_sub(4)?)?;
        let (v1, v2) = (body.starts_with(SNAPSHOT_MAGIC_V1), body.starts_with(SNAPSHOT_MAGIC_V2));
        if crc32c::crc32c(body).to_be_bytes() != crc || !(v1 || v2 || body.starts_with(SNAPSHOT_MAGIC)) {
            return None;
        }
        let mut r = Reader(&body[SNAPSHOT_MAGIC.len()..]);
        let count = r.u32()?;
        let mut map = HashMap::with_capacity((count as usize).min(1 << 16));
        for _ in 0..count {
            let id = r.i64()?;
            let epoch = r.i16()?;
            let n = r.u8()?;
            let mut batches = VecDeque::with_capacity(usize::from(n));
            for _ in 0..n {
                batches.push_back(BatchMeta {
                    first_sequence: r.i32()?,
                    last_sequence: r.i32()?,
                    base_offset: r.i64()?,
                    last_offset: r.i64()?,
                    max_timestamp: r.i64()?,
                });
            }
            map.insert(id, ProducerEntry { epoch, batches });
        }
        let mut txns = PartitionTxns::default();
        if !v1 {
            let open = r.u32()?;
            for _ in 0..open {
                let (producer_id, first_offset) = (r.i64()?, r.i64()?);
                txns.on_batch(producer_id, first_offset, first_offset, true, None);
            }
        }
        if v2 {
            // The aborted transactions, indexed by the segments now (a
            // sealed segment without a `.txnindex` rebuilds it from its
            // own snapshot).
            // Three i64 each: producer id, first and last offset.
            for _ in 0..3 * u64::from(r.u32()?) {
                r.i64()?;
            }
        }
        r.0.is_empty().then_some(Producers { map, txns })
    }

    /// The snapshot in `path`, or an empty state when there is none or it
    /// is damaged (a log written before producer state existed, or a crash
    /// while writing it).
    pub fn load(path: &Path) -> Producers {
        match fs::read(path) {
            Ok(bytes) => Producers::decode(&bytes).unwrap_or_else(|| {
                tracing::warn!(file = %path.display(), "damaged producer snapshot; producer state starts empty");
                Producers::default()
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Producers::default(),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot read producer snapshot; state starts empty");
                Producers::default()
            }
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|b| b[0])
    }
    fn i16(&mut self) -> Option<i16> {
        self.take().map(i16::from_be_bytes)
    }
    fn i32(&mut self) -> Option<i32> {
        self.take().map(i32::from_be_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_be_bytes)
    }
    fn i64(&mut self) -> Option<i64> {
        self.take().map(i64::from_be_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(producer_id: i64, epoch: i16, seq: i32, count: i32, base_offset: i64) -> BatchHeader {
        BatchHeader {
            base_offset,
            batch_length: 0,
            leader_epoch: 0,
            magic: 2,
            crc: 0,
            attributes: 0,
            last_offset_delta: count - 1,
            base_timestamp: 1000,
            max_timestamp: 1000 + base_offset,
            producer_id,
            producer_epoch: epoch,
            base_sequence: seq,
            record_count: count,
        }
    }

    #[test]
    fn sequences_continue_repeat_or_fail() {
        let mut p = Producers::default();
        assert_eq!(p.check(&header(7, 0, 40, 3, 0)), Ok(Check::Append), "an unknown producer starts anywhere");
        p.record(&header(7, 0, 40, 3, 100), None);
        assert_eq!(p.check(&header(7, 0, 43, 2, 0)), Ok(Check::Append));
        p.record(&header(7, 0, 43, 2, 103), None);
        let Ok(Check::Duplicate(info)) = p.check(&header(7, 0, 40, 3, 0)) else { panic!("a retry is a duplicate") };
        assert_eq!((info.base_offset, info.last_offset), (100, 102));
        assert_eq!(
            p.check(&header(7, 0, 46, 1, 0)),
            Err(SequenceError::OutOfOrder { producer_id: 7, epoch: 0, expected: 45, got: 46 })
        );
        assert!(matches!(p.check(&header(7, 1, 3, 1, 0)), Err(SequenceError::OutOfOrder { expected: 0, .. })));
        assert_eq!(p.check(&header(7, 1, 0, 1, 0)), Ok(Check::Append), "a new epoch starts at 0");
        p.record(&header(7, 1, 0, 1, 105), None);
        assert!(matches!(p.check(&header(7, 0, 45, 1, 0)), Err(SequenceError::Fenced { current: 1, .. })));
        assert_eq!(p.check(&header(NO_PRODUCER_ID, -1, -1, 4, 0)), Ok(Check::Append));
    }

    #[test]
    fn only_the_last_batches_are_remembered_and_sequences_wrap() {
        let mut p = Producers::default();
        let mut seq = i32::MAX - 3;
        let batches = BATCHES_KEPT as i64 + 3;
        for i in 0..batches {
            p.record(&header(1, 0, seq, 2, i * 2), None);
            seq = next_sequence(last_sequence(seq, 1));
        }
        let end = (2 * batches - 4) as i32;
        assert_eq!(seq, end, "sequences wrap past i32::MAX to 0");
        assert_eq!(p.check(&header(1, 0, end, 1, 0)), Ok(Check::Append));
        assert!(matches!(p.check(&header(1, 0, end - 2, 2, 0)), Ok(Check::Duplicate(_))));
        assert!(matches!(p.check(&header(1, 0, i32::MAX - 3, 2, 0)), Err(SequenceError::Stale { .. })));
        assert!(matches!(p.check(&header(1, 0, end + 2, 2, 0)), Err(SequenceError::OutOfOrder { .. })));
    }

    #[test]
    fn snapshots_round_trip_and_reject_damage() {
        let mut p = Producers::default();
        for id in 0..20 {
            for b in 0..(id % 7) {
                p.record(&header(id, (id % 3) as i16, b as i32 * 10, 10, id * 1000 + b * 10), None);
            }
        }
        let bytes = p.encode();
        assert_eq!(Producers::decode(&bytes), Some(p.clone()));
        for cut in [0, 3, 8, bytes.len() / 2, bytes.len() - 1] {
            assert_eq!(Producers::decode(&bytes[..cut]), None, "cut at {cut}");
        }
        let mut flipped = bytes.clone();
        flipped[10] ^= 0x40;
        assert_eq!(Producers::decode(&flipped), None);
    }

    #[test]
    fn expiry_forgets_silent_producers() {
        let mut p = Producers::default();
        let mut old = header(1, 0, 0, 1, 0);
        old.max_timestamp = 0;
        let mut new = header(2, 0, 0, 1, 1);
        new.max_timestamp = PRODUCER_EXPIRY_MS + 1;
        p.record(&old, None);
        p.record(&new, None);
        p.expire();
        assert_eq!((p.last_sequence_of(1), p.last_sequence_of(2)), (None, Some((0, 0))));
    }
}
