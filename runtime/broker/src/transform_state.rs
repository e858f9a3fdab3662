//! A stateful transform's changelog, `<plugin>-state` (compacted, one
//! partition per input partition): what one step writes to it and how a
//! store is rebuilt from it. No I/O here; `plugins.rs` writes and reads.
//!
//! Each step that moved writes one batch: every key the plugin changed, with
//! its value now (a tombstone for a delete), then the progress record — the
//! next input offset — under the reserved key [`PROGRESS_KEY`]. One batch is
//! one append, so the changelog never holds a step's state without its
//! progress or the other way round: replaying it gives a store and the input
//! offset that store stands for. A rebuild starts with a barrier record
//! ([`BARRIER_KEY`]) written with acks=all: once it is acknowledged, every
//! step acknowledged before it is below the partition's high watermark, so
//! a rebuild that reads up to the barrier misses none of them (a newly
//! elected leader's high watermark may otherwise lag its log).

use bytes::Bytes;
use quiver_plugin_host::StateStore;
use quiver_protocol::batch::{self, BatchBuilder, Batches, Compression};

/// The key of the progress record (reserved: plugins cannot write keys
/// starting with 0x00).
pub(crate) const PROGRESS_KEY: &[u8] = b"\0quiver.progress";
/// The key of a rebuild's barrier record.
pub(crate) const BARRIER_KEY: &[u8] = b"\0quiver.barrier";

/// The changelog topic of transform `plugin`.
pub(crate) fn state_topic(plugin: &str) -> String {
    format!("{plugin}-state")
}

/// The configs `<plugin>-state` is created with: compacted, never expired
/// by time or size, tombstones kept a day (a rebuild reads from offset 0).
pub(crate) fn state_topic_configs() -> Vec<(String, String)> {
    vec![("cleanup.policy".into(), "compact".into()), ("delete.retention.ms".into(), "86400000".into())]
}

/// One step's batch: the changes, then the progress (`next`, the next input
/// offset). With `producer` (an exactly-once transform's id and epoch) it
/// is the transaction's batch for the changelog partition (sequence 0: the
/// epoch is new in every transaction).
pub(crate) fn step_batch(
    changes: &[(Vec<u8>, Option<Vec<u8>>)],
    next: i64,
    now_ms: i64,
    producer: Option<(i64, i16)>,
) -> Bytes {
    let mut b = match producer {
        None => BatchBuilder::new(Compression::None),
        Some((id, epoch)) => BatchBuilder::new(Compression::None).with_producer(id, epoch, 0).transactional(),
    };
    for (key, value) in changes {
        b.append(now_ms, Some(key), value.as_deref(), &[]);
    }
    b.append(now_ms, Some(PROGRESS_KEY), Some(next.to_string().as_bytes()), &[]);
    b.build()
}

/// A rebuild's barrier, naming the node that rebuilds.
pub(crate) fn barrier_batch(node: u32, now_ms: i64) -> Bytes {
    let mut b = BatchBuilder::new(Compression::None);
    b.append(now_ms, Some(BARRIER_KEY), Some(format!("node {node}").as_bytes()), &[]);
    b.build()
}

/// A rebuild in progress: where to read next and the progress seen so far.
#[derive(Debug, Default)]
pub(crate) struct Rebuild {
    /// The next changelog offset to read.
    pub(crate) next: i64,
    /// The last progress record read: the input offset the store stands for.
    pub(crate) progress: Option<i64>,
}

impl Rebuild {
    /// Applies fetched changelog batches to `store` (records below `next`
    /// skipped, so a fetch may start inside a batch), without the records
    /// of the `aborted` transactions the fetch named (producer id, first
    /// offset): an exactly-once step that did not commit.
    pub(crate) fn apply(
        &mut self,
        store: &mut StateStore,
        data: Bytes,
        aborted: Vec<(i64, i64)>,
    ) -> Result<(), String> {
        let mut committed = quiver_protocol::control::ReadCommitted::new(aborted);
        for item in Batches::new(data) {
            let (header, stored) = item.map_err(|e| format!("the state changelog is damaged: {e}"))?;
            if header.next_offset() <= self.next {
                continue;
            }
            if committed.keep_batch(&header, &stored) {
                let (h, body) = batch::records_section(&stored).map_err(|e| e.to_string())?;
                for r in batch::decode_section(&h, &body).map_err(|e| e.to_string())? {
                    if r.offset < self.next {
                        continue;
                    }
                    match r.key.as_deref() {
                        Some(PROGRESS_KEY) => {
                            let text = r.value.as_deref().and_then(|v| std::str::from_utf8(v).ok()).unwrap_or("");
                            let progress = text
                                .parse()
                                .map_err(|_| format!("a progress record at offset {} is not a number", r.offset))?;
                            self.progress = Some(progress);
                        }
                        Some(BARRIER_KEY) => {}
                        Some(key) => store.restore(key, r.value.as_deref()),
                        None => return Err(format!("a record without a key at offset {}", r.offset)),
                    }
                }
            }
            self.next = header.next_offset();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A changelog as the log would hold it: the batches at their offsets.
    fn log(batches: &[Bytes]) -> Bytes {
        let mut out = Vec::new();
        let mut offset = 0;
        for b in batches {
            let count = i64::from(batch::BatchHeader::parse(b).unwrap().record_count);
            let mut with_offset = b.to_vec();
            with_offset[..16].copy_from_slice(&batch::patched_prefix(b, offset, 0));
            out.extend_from_slice(&with_offset);
            offset += count;
        }
        Bytes::from(out)
    }

    fn change(k: &str, v: Option<&str>) -> (Vec<u8>, Option<Vec<u8>>) {
        (k.as_bytes().to_vec(), v.map(|v| v.as_bytes().to_vec()))
    }

    #[test]
    fn a_rebuild_replays_steps_and_stands_for_the_last_progress() {
        let data = log(&[
            step_batch(&[change("a", Some("1")), change("b", Some("2"))], 10, 0, None),
            barrier_batch(2, 0),
            step_batch(&[change("a", Some("3")), change("b", None)], 25, 0, None),
        ]);
        let mut store = StateStore::new(1 << 20);
        let mut rebuild = Rebuild::default();
        rebuild.apply(&mut store, data.clone(), Vec::new()).unwrap();
        assert_eq!((rebuild.progress, rebuild.next), (Some(25), 7));
        assert_eq!((store.get(b"a"), store.get(b"b"), store.len()), (Some(&b"3"[..]), None, 1));
        // Nothing it restored is a change to write back.
        assert!(store.take_changes().is_empty());
        // Reading the same bytes again (a fetch starting inside what was
        // read) applies nothing twice.
        rebuild.apply(&mut store, data, Vec::new()).unwrap();
        assert_eq!((rebuild.progress, rebuild.next, store.len()), (Some(25), 7, 1));
    }

    #[test]
    fn a_damaged_progress_record_is_an_error() {
        let mut b = BatchBuilder::new(Compression::None);
        b.append(0, Some(PROGRESS_KEY), Some(b"ten"), &[]);
        let err = Rebuild::default().apply(&mut StateStore::new(1024), log(&[b.build()]), Vec::new()).unwrap_err();
        assert!(err.contains("not a number"), "{err}");
    }
}
