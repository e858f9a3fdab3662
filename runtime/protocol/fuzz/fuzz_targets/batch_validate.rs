//! Record batches from the network: what the broker checks before appending
//! (`validate`, then `recompress` for topics with a fixed codec) and what a
//! consumer does with fetched bytes (`Batches`, `decode_records`). None of it
//! may panic, and a batch that validates must also decode.
//!
//! Every input is checked twice: as given, and with its CRC-32C recomputed,
//! because a fuzzer rarely guesses a valid CRC and everything after the CRC
//! check (record decoding, decompression) would otherwise go unexplored.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use quiver_protocol::batch::{
    BATCH_HEADER_LEN, Batches, Compression, ValidationLimits, compute_crc, decode_records,
    recompress, validate,
};

/// Position of the CRC in the batch header (spec/log-format.md).
const CRC_AT: usize = 17;

fn check(data: &[u8]) {
    let bytes = Bytes::copy_from_slice(data);
    if let Ok(header) = validate(data, &ValidationLimits::default()) {
        let records = decode_records(&bytes).expect("a validated batch decodes");
        assert_eq!(records.len(), header.record_count as usize);
        let codec = [Compression::None, Compression::Lz4, Compression::Zstd][data.len() % 3];
        let _ = recompress(&bytes, codec);
    }
    let _ = decode_records(&bytes);
    for batch in Batches::new(bytes) {
        match batch {
            Ok((_, batch)) => {
                let _ = decode_records(&batch);
            }
            Err(_) => break,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() >= BATCH_HEADER_LEN {
        let mut fixed = data.to_vec();
        let crc = compute_crc(&fixed);
        fixed[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
        check(&fixed);
    }
});
