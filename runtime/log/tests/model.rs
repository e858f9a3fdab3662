//! The log against a simple in-memory model (a Vec of batches): random
//! sequences of append, read, reopen, retention by bytes and truncation
//! must agree.

mod common;

use bytes::Bytes;
use common::{batch, config, same_batch};
use proptest::prelude::*;
use quiver_log::{Log, LogConfig, ReadError};
use quiver_protocol::batch::Batches;

#[derive(Debug, Clone)]
enum Op {
    Append {
        records: usize,
        value_len: usize,
    },
    Read {
        at: u16,
        max_bytes: usize,
        up_to_extra: Option<u8>,
    },
    Reopen,
    RetainBytes(u64),
    /// Truncate to `start + at % (end - start + 1)`.
    TruncateTo(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1usize..6, 0usize..400).prop_map(|(records, value_len)| Op::Append { records, value_len }),
        4 => (any::<u16>(), 0usize..3_000, proptest::option::of(any::<u8>()))
            .prop_map(|(at, max_bytes, up_to_extra)| Op::Read { at, max_bytes, up_to_extra }),
        1 => Just(Op::Reopen),
        1 => (0u64..8_000).prop_map(Op::RetainBytes),
        1 => any::<u16>().prop_map(Op::TruncateTo),
    ]
}

/// Batches still in the log, with their base offsets.
struct Model {
    batches: Vec<(i64, Bytes)>,
    start: i64,
    end: i64,
}

fn log_config() -> LogConfig {
    LogConfig { index_interval_bytes: 128, ..config(1_500) }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn log_matches_model(ops in proptest::collection::vec(op(), 1..80)) {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), log_config()).unwrap();
        let mut model = Model { batches: Vec::new(), start: 0, end: 0 };
        for (step, op) in ops.into_iter().enumerate() {
            match op {
                Op::Append { records, value_len } => {
                    let b = batch(step as u64, records, step as i64, value_len);
                    let info = log.append(&b, 0).unwrap();
                    prop_assert_eq!(info.base_offset, model.end);
                    prop_assert_eq!(info.last_offset, model.end + records as i64 - 1);
                    model.batches.push((model.end, b));
                    model.end += records as i64;
                }
                Op::Read { at, max_bytes, up_to_extra } => {
                    let offset = model.start + i64::from(at) % (model.end - model.start + 1);
                    let up_to = up_to_extra.map_or(model.end, |x| offset + i64::from(x));
                    let bytes = log.read(offset, max_bytes, up_to).unwrap();
                    let first = model.batches.iter().position(|(base, b)| {
                        let last = base + quiver_protocol::batch::BatchHeader::parse(b).unwrap().last_offset_delta as i64;
                        last >= offset
                    });
                    let expected: Vec<_> = first
                        .map(|i| &model.batches[i..])
                        .unwrap_or_default()
                        .iter()
                        .take_while(|(base, b)| {
                            let delta = i64::from(quiver_protocol::batch::BatchHeader::parse(b).unwrap().last_offset_delta);
                            base + delta < up_to
                        })
                        .collect();
                    let got: Vec<_> = Batches::new(bytes.clone()).map(Result::unwrap).collect();
                    prop_assert!(got.len() <= expected.len());
                    if !expected.is_empty() {
                        prop_assert!(!got.is_empty(), "at least one batch at {}", offset);
                        prop_assert!(bytes.len() <= max_bytes.max(expected[0].1.len()));
                    }
                    for ((header, stored), (base, original)) in got.iter().zip(&expected) {
                        prop_assert_eq!(header.base_offset, *base);
                        prop_assert!(same_batch(stored, original));
                    }
                    let past_end = log.read(model.end + 1, max_bytes, model.end + 2);
                    let out_of_range = matches!(past_end, Err(ReadError::OffsetOutOfRange { .. }));
                    prop_assert!(out_of_range);
                }
                Op::Reopen => {
                    drop(log);
                    log = Log::open(dir.path(), log_config()).unwrap();
                }
                Op::RetainBytes(bytes_max) => {
                    log.set_config(LogConfig { retention_bytes: Some(bytes_max), ..log_config() });
                    let report = log.enforce_retention(0).unwrap();
                    log.set_config(log_config());
                    let new_start = log.log_start_offset();
                    prop_assert_eq!(report.log_start_offset, new_start);
                    let removed = model.batches.iter().take_while(|(base, _)| *base < new_start).count();
                    if removed < model.batches.len() {
                        prop_assert_eq!(model.batches[removed].0, new_start, "deletes whole batches");
                    } else {
                        prop_assert_eq!(new_start, model.end);
                    }
                    let removed_bytes: u64 = model.batches[..removed].iter().map(|(_, b)| b.len() as u64).sum();
                    prop_assert_eq!(report.bytes_deleted, removed_bytes);
                    model.batches.drain(..removed);
                    model.start = new_start;
                    prop_assert!(log.size_bytes() <= bytes_max || log.segment_count() == 1);
                }
                Op::TruncateTo(at) => {
                    let end = model.start + i64::from(at) % (model.end - model.start + 1);
                    let new_end = log.truncate_to(end).unwrap();
                    // Whole batches: everything whose last offset is below `end` stays.
                    let keep = model.batches.iter().take_while(|(base, b)| {
                        base + i64::from(quiver_protocol::batch::BatchHeader::parse(b).unwrap().last_offset_delta) < end
                    }).count();
                    model.batches.truncate(keep);
                    model.end = model.batches.last().map_or(model.start, |(base, b)| {
                        base + i64::from(quiver_protocol::batch::BatchHeader::parse(b).unwrap().last_offset_delta) + 1
                    });
                    prop_assert_eq!(new_end, model.end);
                    prop_assert!(log.durable_end_offset() <= model.end);
                }
            }
            prop_assert_eq!(log.log_start_offset(), model.start);
            prop_assert_eq!(log.log_end_offset(), model.end);
            let model_size: u64 = model.batches.iter().map(|(_, b)| b.len() as u64).sum();
            prop_assert_eq!(log.size_bytes(), model_size);
        }
    }
}
