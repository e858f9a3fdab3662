//! A partition's transactions end to end, without I/O: producers write
//! transactional batches in any interleaving and end them with commit or
//! abort markers (`quiver_protocol::control`); the partition's tracker
//! gives the last stable offset and the aborted ranges, and a
//! read_committed reader of everything below the LSO gets exactly the
//! committed and non-transactional records, in offset order.

use bytes::Bytes;
use proptest::prelude::*;
use quiver_protocol::batch::{self, BatchBuilder, BatchHeader, Compression, decode_records};
use quiver_protocol::control::{Marker, ReadCommitted, marker_batch, parse_marker};
use quiver_transactions::partition::{Ended, PartitionTxns, aborted_overlapping};

#[derive(Debug, Clone)]
enum Op {
    /// A transactional batch of `records` records by producer `p`.
    Write(usize, u8),
    /// Producer `p` ends its transaction.
    End(usize, bool),
    /// A non-transactional batch.
    Plain(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..3usize, 1..4u8).prop_map(|(p, n)| Op::Write(p, n)),
        2 => (0..3usize, any::<bool>()).prop_map(|(p, c)| Op::End(p, c)),
        1 => (1..3u8).prop_map(Op::Plain),
    ]
}

/// The batch at `offset` (its base offset patched in, as the log does).
fn at(b: Bytes, offset: i64) -> Bytes {
    let mut v = b.to_vec();
    v[..16].copy_from_slice(&batch::patched_prefix(&b, offset, 0));
    Bytes::from(v)
}

proptest! {
    #[test]
    fn a_read_committed_reader_gets_exactly_the_committed_records(ops in proptest::collection::vec(op(), 1..50)) {
        let mut txns = PartitionTxns::default();
        let mut aborts = Vec::new();
        let mut log: Vec<Bytes> = Vec::new();
        let mut offset = 0i64;
        // The model: each record's value, and whether it is visible
        // (committed or plain); open transactions' records by producer.
        let mut records: Vec<(i64, String, Option<bool>)> = Vec::new();
        let mut open: Vec<Vec<usize>> = vec![Vec::new(); 3];
        for (n, op) in ops.into_iter().enumerate() {
            let (b, count) = match op {
                Op::Write(p, k) => {
                    let mut b = BatchBuilder::new(Compression::None).with_producer(p as i64, 0, 0).transactional();
                    for i in 0..k {
                        let value = format!("{n}-{i}");
                        b.append(0, None, Some(value.as_bytes()), &[]);
                        open[p].push(records.len());
                        records.push((offset + i64::from(i), value, None));
                    }
                    (b.build(), i64::from(k))
                }
                Op::End(p, commit) => {
                    for i in open[p].drain(..) {
                        records[i].2 = Some(commit);
                    }
                    let marker = if commit { Marker::Commit } else { Marker::Abort };
                    (marker_batch(p as i64, 1, marker, 0, 0), 1)
                }
                Op::Plain(k) => {
                    let mut b = BatchBuilder::new(Compression::None);
                    for i in 0..k {
                        let value = format!("{n}-{i}");
                        b.append(0, None, Some(value.as_bytes()), &[]);
                        records.push((offset + i64::from(i), value, Some(true)));
                    }
                    (b.build(), i64::from(k))
                }
            };
            let b = at(b, offset);
            let h = BatchHeader::parse(&b).unwrap();
            let marker = if h.is_control() {
                parse_marker(decode_records(&b).unwrap()[0].key.as_deref().unwrap())
            } else {
                None
            };
            let ended = txns.on_batch(
                h.producer_id,
                h.base_offset,
                h.last_offset(),
                h.is_transactional(),
                marker.map(|m| m == Marker::Commit),
            );
            if let Some(Ended::Aborted(a)) = ended {
                aborts.push(a);
            }
            log.push(b);
            offset += count;
        }
        let high_watermark = offset;
        let lso = txns.last_stable_offset(high_watermark);
        // Every record below the LSO is decided.
        for (o, _, decided) in &records {
            prop_assert!(*o >= lso || decided.is_some(), "offset {} below the LSO {} is undecided", o, lso);
        }
        // A read_committed read of everything below the LSO.
        let aborted = aborted_overlapping(&aborts, 0, lso).iter().map(|a| (a.producer_id, a.first_offset)).collect();
        let mut reader = ReadCommitted::new(aborted);
        let mut seen = Vec::new();
        for b in &log {
            let h = BatchHeader::parse(b).unwrap();
            if h.base_offset >= lso {
                break;
            }
            let rs = decode_records(b).unwrap();
            let marker = if h.is_control() { parse_marker(rs[0].key.as_deref().unwrap()) } else { None };
            if reader.keep(&h, marker) {
                seen.extend(rs.iter().map(|r| String::from_utf8(r.value.as_deref().unwrap().to_vec()).unwrap()));
            }
        }
        let expected: Vec<String> =
            records.iter().filter(|(o, _, d)| *o < lso && *d == Some(true)).map(|(_, v, _)| v.clone()).collect();
        prop_assert_eq!(seen, expected);
    }
}
