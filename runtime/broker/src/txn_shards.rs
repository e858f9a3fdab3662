//! The transactions a broker coordinates (one [`TxnShard`] per partition
//! of `__transaction_state` it leads), how they are stored in that topic,
//! and reading them back from a partition's log. The shell that loads,
//! serves, times out and completes them is `txn_coordinator.rs`.
//!
//! A record's key is the transactional id (UTF-8), its value the
//! [`Transaction`] as JSON; a tombstone forgets an expired id. The topic
//! is compacted, so each id's latest record is what survives.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use bytes::Bytes;
use quiver_protocol::batch::{BatchBuilder, Compression};
use quiver_transactions::{Coordinator, Transaction};

use crate::errors::TxnOpError;
use crate::partition::Partition;

/// The shards of the state topic's partitions this broker leads.
#[derive(Default)]
pub(crate) struct TxnShards {
    shards: std::sync::Mutex<HashMap<u32, Arc<TxnShard>>>,
}

impl TxnShards {
    pub(crate) fn shards(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<TxnShard>>> {
        self.shards.lock().expect("transaction shards lock")
    }
}

/// The transactions of one partition of the state topic, led here in
/// `epoch` (which the markers carry as their coordinator epoch).
pub(crate) struct TxnShard {
    pub(crate) partition: Arc<Partition>,
    pub(crate) epoch: i32,
    /// `None` while loading.
    pub(crate) coordinator: tokio::sync::Mutex<Option<Coordinator>>,
    /// A write failed or the load did: memory may not match the log.
    pub(crate) stale: AtomicBool,
    /// Ends answered once `Prepare*` was stored whose markers are still
    /// being written, by id: set to true when done (or given up on).
    pub(crate) finishing: std::sync::Mutex<HashMap<String, tokio::sync::watch::Receiver<bool>>>,
}

impl TxnShard {
    /// Until `id`'s end being finished, if any, is done.
    pub(crate) fn finishing(&self, id: &str) -> Option<tokio::sync::watch::Receiver<bool>> {
        self.finishing.lock().expect("finishing ends").get(id).cloned()
    }
}

pub(crate) fn validate_transactional_id(id: &str) -> Result<(), TxnOpError> {
    crate::group_shards::check_name("transactional id", id).map_err(TxnOpError::Invalid)
}

/// Records for `changes`: each transaction's new state, or (`Err(id)`) a
/// tombstone for an expired id.
pub(crate) fn encode_changes(changes: &[Result<Transaction, String>], timestamp_ms: i64) -> Bytes {
    let mut batch = BatchBuilder::new(Compression::None);
    for change in changes {
        match change {
            Ok(t) => batch.append(timestamp_ms, Some(t.transactional_id.as_bytes()), Some(&t.encode()), &[]),
            Err(id) => batch.append(timestamp_ms, Some(id.as_bytes()), None, &[]),
        }
    }
    batch.build()
}

/// The transactions stored in a partition's log (each id's latest record).
/// Records that do not decode are skipped.
pub(crate) fn read_transactions(
    partition: &Partition,
    coordinator: &mut Coordinator,
) -> Result<(), quiver_log::ReadError> {
    crate::group_shards::for_each_record(partition, |record| {
        let Some(id) = record.key.as_deref().and_then(|k| std::str::from_utf8(k).ok()) else {
            tracing::warn!(partition = partition.id, offset = record.offset, "skipping a record without an id");
            return;
        };
        match record.value.as_deref().map(Transaction::decode) {
            None => coordinator.remove(id),
            Some(Ok(t)) => coordinator.apply(t),
            Some(Err(e)) => {
                tracing::warn!(partition = partition.id, offset = record.offset, error = %e, "skipping a record")
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transactional_ids_are_checked() {
        assert!(validate_transactional_id("").is_err());
        assert!(validate_transactional_id("a\tb").is_err());
        assert!(validate_transactional_id(&"t".repeat(250)).is_err());
        validate_transactional_id("payments-writer-0").unwrap();
    }
}
