//! Control records: the markers that end a transaction in each partition it
//! wrote to, as Kafka lays them out. A marker is the one record of a control
//! batch (attributes transactional and control) carrying the transaction's
//! producer id and the epoch its end bumped to; its key is a version (i16,
//! 0) and a type (i16: 0 abort, 1 commit), its value a version (i16, 0) and
//! the coordinator's epoch (i32).

use bytes::{Buf, BufMut, Bytes};

use crate::batch::{BatchBuilder, Compression, NO_SEQUENCE};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    Abort,
    Commit,
}

/// A control batch holding `marker` for producer `producer_id` at
/// `producer_epoch` (offsets are assigned by the log).
pub fn marker_batch(
    producer_id: i64,
    producer_epoch: i16,
    marker: Marker,
    coordinator_epoch: i32,
    timestamp_ms: i64,
) -> Bytes {
    let mut key = Vec::with_capacity(4);
    key.put_i16(0);
    key.put_i16(match marker {
        Marker::Abort => 0,
        Marker::Commit => 1,
    });
    let mut value = Vec::with_capacity(6);
    value.put_i16(0);
    value.put_i32(coordinator_epoch);
    let mut b = BatchBuilder::new(Compression::None).with_producer(producer_id, producer_epoch, NO_SEQUENCE).control();
    b.append(timestamp_ms, Some(&key), Some(&value), &[]);
    b.build()
}

/// The marker a control record's key holds; `None` for a key that is not
/// one (an unknown version or type: Kafka skips those too).
pub fn parse_marker(mut key: &[u8]) -> Option<Marker> {
    if key.len() < 4 || key.get_i16() != 0 {
        return None;
    }
    match key.get_i16() {
        0 => Some(Marker::Abort),
        1 => Some(Marker::Commit),
        _ => None,
    }
}

/// The marker a control batch holds; `None` for any other batch, or a
/// control batch without a marker this build knows.
pub fn batch_marker(header: &crate::batch::BatchHeader, batch: &Bytes) -> Option<Marker> {
    if !header.is_control() {
        return None;
    }
    let records = crate::batch::decode_records(batch).ok()?;
    parse_marker(records.first()?.key.as_deref()?)
}

/// What a read_committed reader does with the batches it reads, in offset
/// order (Kafka's consumer algorithm): the data of aborted transactions
/// and every control batch are dropped. `aborted` lists the (producer id,
/// first offset) of each aborted transaction the broker named for the read.
#[derive(Debug, Default)]
pub struct ReadCommitted {
    /// Aborted transactions not reached yet, by first offset.
    pending: std::collections::VecDeque<(i64, i64)>,
    /// Producers whose aborted transaction the reader is inside.
    inside: std::collections::HashSet<i64>,
}

impl ReadCommitted {
    pub fn new(mut aborted: Vec<(i64, i64)>) -> Self {
        aborted.sort_by_key(|&(_, first)| first);
        ReadCommitted { pending: aborted.into(), inside: Default::default() }
    }

    /// Whether the records of the batch with `header` go to the
    /// application; `marker` is the marker a control batch holds.
    pub fn keep(&mut self, header: &crate::batch::BatchHeader, marker: Option<Marker>) -> bool {
        while let Some(&(producer_id, first)) = self.pending.front() {
            if first > header.last_offset() {
                break;
            }
            self.inside.insert(producer_id);
            self.pending.pop_front();
        }
        if header.is_control() {
            if marker == Some(Marker::Abort) {
                self.inside.remove(&header.producer_id);
            }
            return false;
        }
        !(header.is_transactional() && self.inside.contains(&header.producer_id))
    }

    /// [`ReadCommitted::keep`] for a whole stored batch (its marker read
    /// from it when it is a control batch).
    pub fn keep_batch(&mut self, header: &crate::batch::BatchHeader, batch: &Bytes) -> bool {
        self.keep(header, batch_marker(header, batch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{BatchHeader, decode_records};

    #[test]
    fn a_marker_batch_is_a_transactional_control_batch_with_one_marker() {
        let b = marker_batch(42, 7, Marker::Commit, 3, 1_000);
        let h = BatchHeader::parse(&b).unwrap();
        assert!(h.is_control() && h.is_transactional());
        assert_eq!((h.producer_id, h.producer_epoch, h.record_count), (42, 7, 1));
        let records = decode_records(&b).unwrap();
        assert_eq!(parse_marker(records[0].key.as_deref().unwrap()), Some(Marker::Commit));
        assert_eq!(&records[0].value.as_deref().unwrap()[2..], &3i32.to_be_bytes());
        let abort = decode_records(&marker_batch(1, 0, Marker::Abort, 0, 0)).unwrap();
        assert_eq!(parse_marker(abort[0].key.as_deref().unwrap()), Some(Marker::Abort));
        assert_eq!(parse_marker(&[0, 1, 0, 1]), None, "an unknown version");
        assert_eq!(parse_marker(&[0, 0, 0, 9]), None, "an unknown type");
        assert_eq!(parse_marker(&[0]), None);
    }
}
