//! Log compaction's decisions, without I/O: what a compacted log's config
//! is, which part of a log may be cleaned now, how segments are grouped into
//! cleaned ones, the bounded map of each key's latest offset, and which
//! records survive. [`crate::Log::clean`] does the reading, writing and
//! swapping around these.
//!
//! The rules (Kafka's): the cleaner keeps the latest record of every key;
//! it never touches the active segment, segments not yet durable, records
//! above the caller's bound (the high watermark) or newer than
//! `min_compaction_lag_ms`; a tombstone (null value) that is its key's latest
//! record is kept until its batch's delete horizon (set the first time the
//! batch is cleaned: that time plus `delete_retention_ms`) and dropped by the
//! first clean after it; control batches are never deduplicated by key; an
//! idempotent producer's last batch is kept (empty if need be) so a replica
//! copying the log still knows its sequence, and so is the last batch of
//! each cleaned segment, so that segments still end where the next begins.
//! Offsets never change: a compacted log has holes, but only between
//! batches of a segment.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::ops::Range;

/// How a compacted topic's log is cleaned (`cleanup.policy` containing
/// `compact`).
#[derive(Debug, Clone, PartialEq)]
pub struct CompactionConfig {
    /// Clean a log once this share of it (bytes since the last clean over
    /// all bytes, active segment excluded) is dirty.
    pub min_cleanable_dirty_ratio: f64,
    /// A record stays uncompacted at least this long (whole segments:
    /// a segment with a newer record is not cleaned yet).
    pub min_compaction_lag_ms: u64,
    /// A record becomes compactable at the latest this long after it was
    /// written, whatever the dirty ratio (the active segment is rolled for
    /// it). `None`: no bound.
    pub max_compaction_lag_ms: Option<u64>,
    /// How long a tombstone stays readable after the clean that first kept
    /// it, so that consumers reading from the start see the deletion.
    pub delete_retention_ms: u64,
}

impl Default for CompactionConfig {
    fn default() -> Self {
        CompactionConfig {
            min_cleanable_dirty_ratio: 0.5,
            min_compaction_lag_ms: 0,
            max_compaction_lag_ms: None,
            delete_retention_ms: 24 * 60 * 60 * 1000,
        }
    }
}

/// One segment as the planner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SegmentSpan {
    pub(crate) base_offset: i64,
    /// The next segment's base offset (the log end for the active one).
    pub(crate) next_offset: i64,
    pub(crate) size: u64,
    /// Largest batch max timestamp; `i64::MIN` when empty.
    pub(crate) max_timestamp: i64,
    /// The first batch's max timestamp, when known (segments written by
    /// this process).
    pub(crate) first_timestamp: Option<i64>,
}

/// What a log offers the cleaner now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cleanable {
    /// Offsets below this were cleaned already.
    pub first_dirty_offset: i64,
    /// The cleaner may read up to here (exclusive): a segment boundary.
    pub end_offset: i64,
    /// Bytes in `[first_dirty_offset, end_offset)` over bytes in
    /// `[log start, end_offset)`.
    pub dirty_ratio: f64,
    /// A dirty record is older than `max_compaction_lag_ms`: clean whatever
    /// the ratio.
    pub overdue: bool,
}

impl Cleanable {
    /// Whether the cleaner should pick this log on its own, given its
    /// topic's `min.cleanable.dirty.ratio`.
    pub fn is_due(&self, min_cleanable_dirty_ratio: f64) -> bool {
        self.first_dirty_offset < self.end_offset && (self.overdue || self.dirty_ratio >= min_cleanable_dirty_ratio)
    }
}

/// The cleanable part of a log whose segments (active last) are `segments`,
/// cleaned up to `first_dirty`, with everything at or above `bound` off
/// limits (the recovery point and the high watermark: only durable,
/// replicated data is cleaned).
pub(crate) fn cleanable(
    segments: &[SegmentSpan],
    first_dirty: i64,
    bound: i64,
    config: &CompactionConfig,
    now_ms: i64,
) -> Cleanable {
    let log_start = segments.first().map_or(0, |s| s.base_offset);
    let first_dirty = first_dirty.max(log_start);
    let lag_cutoff = now_ms.saturating_sub(ms(config.min_compaction_lag_ms));
    let overdue_cutoff = config.max_compaction_lag_ms.map(|max| now_ms.saturating_sub(ms(max)));
    let sealed = &segments[..segments.len().saturating_sub(1)];
    let mut end_offset = log_start;
    let (mut clean, mut dirty) = (0u64, 0u64);
    let mut overdue = false;
    for s in sealed {
        if s.next_offset > bound || s.max_timestamp > lag_cutoff {
            break;
        }
        end_offset = s.next_offset;
        if s.next_offset <= first_dirty {
            clean += s.size;
        } else {
            dirty += s.size;
            let oldest = s.first_timestamp.unwrap_or(s.max_timestamp);
            overdue |= s.size > 0 && overdue_cutoff.is_some_and(|cutoff| oldest < cutoff);
        }
    }
    let total = clean + dirty;
    Cleanable {
        first_dirty_offset: first_dirty,
        end_offset: end_offset.max(first_dirty),
        dirty_ratio: if total == 0 { 0.0 } else { dirty as f64 / total as f64 },
        overdue,
    }
}

/// Whether the active segment holds a record older than
/// `max_compaction_lag_ms` and must be rolled so that it can be cleaned.
pub(crate) fn active_overdue(active: &SegmentSpan, config: &CompactionConfig, now_ms: i64) -> bool {
    match (config.max_compaction_lag_ms, active.first_timestamp) {
        (Some(max), Some(first)) => active.size > 0 && first < now_ms.saturating_sub(ms(max)),
        _ => false,
    }
}

fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Splits the segments to rewrite into groups, each written as one cleaned
/// segment: consecutive segments while their input bytes fit in
/// `segment_bytes_max` (the output is never larger than the input) and
/// their offsets in a segment's relative-offset range. Small cleaned
/// segments merge this way.
pub(crate) fn group_segments(segments: &[SegmentSpan], segment_bytes_max: u64) -> Vec<Range<usize>> {
    let mut groups = Vec::new();
    let mut start = 0;
    let mut bytes = 0u64;
    for (i, s) in segments.iter().enumerate() {
        let span = s.next_offset - segments[start].base_offset;
        if i > start && (bytes + s.size > segment_bytes_max || span > i64::from(i32::MAX)) {
            groups.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += s.size;
    }
    if start < segments.len() {
        groups.push(start..segments.len());
    }
    groups
}

/// Bytes one entry of the [`OffsetMap`] takes: a 128-bit key hash and an
/// offset.
pub const OFFSET_MAP_ENTRY_BYTES: usize = 24;
/// Share of the map's slots in use before it grows (or reports full).
const LOAD_FACTOR: f64 = 0.9;
const FIRST_SLOTS: usize = 1 << 12;
/// The smallest table (a tiny budget is for tests of passes that spill).
const MIN_SLOTS: usize = 16;

/// Each key's latest offset in the dirty part of a log, in at most a fixed
/// number of bytes: an open-addressing table of 128-bit key hashes (XXH3-128
/// with a per-map random seed; a collision would drop a live record, at
/// odds of about n²/2¹²⁹) that doubles until its budget and then refuses
/// new keys, so a clean covers what fits and the rest waits for the next
/// pass.
#[derive(Debug)]
pub struct OffsetMap {
    slots: Vec<Slot>,
    used: usize,
    max_slots: usize,
    seed: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// `[0, 0]`: empty (real hashes have their lowest bit set).
    hash: [u64; 2],
    offset: i64,
}

/// The map holds as many keys as its budget allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapFull;

impl OffsetMap {
    /// A map of at most `budget_bytes` (and at least [`MIN_SLOTS`] entries).
    pub fn new(budget_bytes: usize) -> OffsetMap {
        let budget_slots = (budget_bytes / OFFSET_MAP_ENTRY_BYTES).max(MIN_SLOTS);
        // Tables double from the first size: the largest that fits.
        let first = FIRST_SLOTS.min(budget_slots.next_power_of_two() / 2).max(MIN_SLOTS);
        let mut max_slots = first;
        while max_slots * 2 <= budget_slots {
            max_slots *= 2;
        }
        OffsetMap { slots: vec![Slot::default(); first], used: 0, max_slots, seed: RandomState::new().hash_one(0u8) }
    }

    fn hash(&self, key: &[u8]) -> [u64; 2] {
        let h = twox_hash::XxHash3_128::oneshot_with_seed(self.seed, key);
        [(h as u64) | 1, (h >> 64) as u64]
    }

    /// Bytes the table holds now (what the cleaner's memory bound counts).
    pub fn memory_bytes(&self) -> usize {
        self.slots.len() * OFFSET_MAP_ENTRY_BYTES
    }

    /// Distinct keys held.
    pub fn len(&self) -> usize {
        self.used
    }

    pub fn is_empty(&self) -> bool {
        self.used == 0
    }

    /// How many more new keys certainly fit.
    pub fn room(&self) -> usize {
        let limit = (self.max_slots as f64 * LOAD_FACTOR) as usize;
        limit.saturating_sub(self.used)
    }

    fn position(&self, hash: [u64; 2]) -> usize {
        let mask = self.slots.len() - 1;
        let mut i = (hash[1] as usize) & mask;
        loop {
            let slot = &self.slots[i];
            if slot.hash == hash || slot.hash == [0, 0] {
                return i;
            }
            i = (i + 1) & mask;
        }
    }

    /// Records `offset` as `key`'s latest (offsets come in increasing order).
    pub fn put(&mut self, key: &[u8], offset: i64) -> Result<(), MapFull> {
        let hash = self.hash(key);
        let i = self.position(hash);
        if self.slots[i].hash == hash {
            self.slots[i].offset = offset;
            return Ok(());
        }
        if self.used + 1 > (self.slots.len() as f64 * LOAD_FACTOR) as usize {
            if self.slots.len() * 2 > self.max_slots {
                return Err(MapFull);
            }
            self.grow();
            return self.put(key, offset);
        }
        self.slots[i] = Slot { hash, offset };
        self.used += 1;
        Ok(())
    }

    fn grow(&mut self) {
        let doubled = vec![Slot::default(); self.slots.len() * 2];
        let old = std::mem::replace(&mut self.slots, doubled);
        for slot in old.into_iter().filter(|s| s.hash != [0, 0]) {
            let i = self.position(slot.hash);
            self.slots[i] = slot;
        }
    }

    /// `key`'s latest offset, if the map holds the key.
    pub fn get(&self, key: &[u8]) -> Option<i64> {
        let slot = &self.slots[self.position(self.hash(key))];
        (slot.hash != [0, 0]).then_some(slot.offset)
    }
}

/// Whether a record of a batch being cleaned survives. `map_end`: the map
/// holds every key of the records below it (records from it on are newer
/// than anything it decided and stay). `horizon_passed`: the batch's delete
/// horizon is set and due, so its tombstones go.
pub(crate) fn keep_record(
    offset: i64,
    key: Option<&[u8]>,
    is_tombstone: bool,
    map: &OffsetMap,
    map_end: i64,
    horizon_passed: bool,
) -> bool {
    if offset >= map_end {
        return true;
    }
    let Some(key) = key else {
        // Compacted topics refuse keyless records; any older one stays.
        return true;
    };
    match map.get(key) {
        Some(latest) if latest > offset => false,
        _ => !(is_tombstone && horizon_passed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(base_offset: i64, next_offset: i64, size: u64, max_timestamp: i64) -> SegmentSpan {
        SegmentSpan { base_offset, next_offset, size, max_timestamp, first_timestamp: None }
    }

    #[test]
    fn the_map_keeps_the_latest_offset_and_stays_within_its_budget() {
        let mut map = OffsetMap::new(OFFSET_MAP_ENTRY_BYTES * 8192);
        for i in 0..5000i64 {
            map.put(format!("k{}", i % 1000).as_bytes(), i).unwrap();
        }
        assert_eq!(map.len(), 1000);
        assert_eq!(map.get(b"k7"), Some(4007));
        assert_eq!(map.get(b"missing"), None);
        let mut added = 1000;
        while map.put(format!("new{added}").as_bytes(), 1).is_ok() {
            added += 1;
        }
        assert!(map.memory_bytes() <= OFFSET_MAP_ENTRY_BYTES * 8192, "{}", map.memory_bytes());
        assert_eq!(added, (8192.0 * LOAD_FACTOR) as usize);
        // A full map still updates keys it holds.
        map.put(b"k7", 9999).unwrap();
        assert_eq!(map.get(b"k7"), Some(9999));
    }

    #[test]
    fn cleanable_range_stops_at_the_bound_and_the_lag() {
        let config = CompactionConfig { min_compaction_lag_ms: 100, ..CompactionConfig::default() };
        let segments = [span(0, 10, 100, 50), span(10, 20, 100, 60), span(20, 30, 100, 950), span(30, 35, 50, 990)];
        // Nothing cleaned yet: the third segment is too young at now=1000.
        let c = cleanable(&segments, 0, i64::MAX, &config, 1000);
        assert_eq!((c.first_dirty_offset, c.end_offset, c.dirty_ratio), (0, 20, 1.0));
        assert!(c.is_due(config.min_cleanable_dirty_ratio));
        // The bound (recovery point / high watermark) cuts too.
        assert_eq!(cleanable(&segments, 0, 15, &config, 1000).end_offset, 10);
        // After a clean up to 20 only the third segment is dirty, once old enough.
        let c = cleanable(&segments, 20, i64::MAX, &config, 2000);
        assert_eq!((c.end_offset, c.dirty_ratio), (30, 1.0 / 3.0));
        assert!(!c.is_due(config.min_cleanable_dirty_ratio));
        let overdue = CompactionConfig { max_compaction_lag_ms: Some(500), ..config.clone() };
        assert!(cleanable(&segments, 20, i64::MAX, &overdue, 2000).is_due(overdue.min_cleanable_dirty_ratio));
        // The active segment is never cleanable.
        assert_eq!(cleanable(&segments[..1], 0, i64::MAX, &config, 5000).end_offset, 0);
    }

    #[test]
    fn groups_respect_size_and_offset_span() {
        let segments = [span(0, 10, 40, 0), span(10, 20, 40, 0), span(20, 30, 40, 0), span(30, 40, 10, 0)];
        assert_eq!(group_segments(&segments, 100), [0..2, 2..4]);
        assert_eq!(group_segments(&segments, 1000), vec![0..4]);
        assert_eq!(group_segments(&segments, 10), [0..1, 1..2, 2..3, 3..4]);
        let wide = [span(0, 10, 1, 0), span(10, i64::from(i32::MAX) + 5, 1, 0)];
        assert_eq!(group_segments(&wide, 1000), [0..1, 1..2]);
    }

    #[test]
    fn records_survive_when_latest_or_beyond_the_map() {
        let mut map = OffsetMap::new(0);
        map.put(b"a", 5).unwrap();
        map.put(b"b", 7).unwrap();
        assert!(!keep_record(3, Some(b"a"), false, &map, 10, false), "superseded");
        assert!(keep_record(5, Some(b"a"), false, &map, 10, false), "latest");
        assert!(keep_record(7, Some(b"b"), true, &map, 10, false), "tombstone before its horizon");
        assert!(!keep_record(7, Some(b"b"), true, &map, 10, true), "tombstone after its horizon");
        assert!(keep_record(12, Some(b"a"), false, &map, 10, true), "beyond what the map covers");
        assert!(keep_record(1, None, false, &map, 10, true), "keyless");
    }
}
