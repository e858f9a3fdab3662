//! Helpers shared by the integration tests: test batches, a small config,
//! reading a whole log back, and a seeded RNG.
#![allow(dead_code)]

use bytes::Bytes;
use quiver_log::{Log, LogConfig};
use quiver_protocol::batch::{BatchBuilder, BatchHeader, Batches, Compression, verify_crc};

/// A batch of `records` records with timestamps `ts, ts + 1, ...`, values
/// of `value_len` bytes derived from `tag` so that batches differ.
pub fn batch(tag: u64, records: usize, ts: i64, value_len: usize) -> Bytes {
    let mut b = BatchBuilder::new(Compression::None);
    for i in 0..records {
        let mut value = tag.to_be_bytes().to_vec();
        value.extend((0..value_len).map(|j| (tag as usize + i * 7 + j) as u8));
        b.append(ts + i as i64, Some(&(i as u32).to_be_bytes()), Some(&value), &[]);
    }
    b.build()
}

/// Small segments and a dense index, no time-based behaviour.
pub fn config(segment_bytes_max: u64) -> LogConfig {
    LogConfig {
        segment_bytes_max,
        segment_ms_max: None,
        retention_ms: None,
        retention_bytes: None,
        index_interval_bytes: 256,
        compaction: None,
    }
}

/// Every batch from the log start to the log end, each CRC-checked.
pub fn read_all(log: &Log) -> Vec<(BatchHeader, Bytes)> {
    let end = log.log_end_offset();
    let mut next = log.log_start_offset();
    let mut out = Vec::new();
    while next < end {
        let bytes = log.read(next, 64 * 1024, end).expect("read");
        assert!(!bytes.is_empty(), "empty read at {next} below end {end}");
        for item in Batches::new(bytes) {
            let (header, batch) = item.expect("framing");
            verify_crc(&batch).expect("crc");
            assert_eq!(header.base_offset, next, "offsets continue");
            next = header.next_offset();
            out.push((header, batch));
        }
    }
    out
}

/// Stored batches equal the appended ones except for the patched prefix.
pub fn same_batch(stored: &[u8], original: &[u8]) -> bool {
    stored.len() == original.len() && stored[16..] == original[16..]
}

/// xorshift64*: tiny, deterministic, good enough to pick damage positions.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Runs `f` for each seed, printing the seed of a failure before
/// re-raising it, so any failure can be replayed.
pub fn for_seeds(seeds: std::ops::Range<u64>, f: impl Fn(u64)) {
    for seed in seeds {
        if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(seed))) {
            eprintln!("failed with seed {seed}");
            std::panic::resume_unwind(panic);
        }
    }
}
