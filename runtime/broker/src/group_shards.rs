//! The state of the groups a broker coordinates (one `Shard` per partition
//! of `__consumer_offsets` it leads), how a group's records are keyed in
//! that topic, and reading them back from a partition's log. The shell that
//! loads, serves and expires them is `coordinator.rs`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use quiver_groups::{Group, Record, RecordKey, RecordValue};
use quiver_protocol::batch::{Batches, decode_records};
use quiver_protocol::partitioner::murmur2;
use serde::{Deserialize, Serialize};

use crate::errors::GroupOpError;
use crate::partition::Partition;

/// Bound on one read while loading a partition.
const LOAD_READ_BYTES: usize = 4 * 1024 * 1024;
/// Longest group name accepted.
const GROUP_NAME_BYTES_MAX: usize = 249;

/// The shards of the offsets topic's partitions this broker leads.
#[derive(Default)]
pub(crate) struct Coordinator {
    shards: std::sync::Mutex<HashMap<u32, Arc<Shard>>>,
}

/// The groups of one partition of the offsets topic, led here in `epoch`.
pub(crate) struct Shard {
    pub(crate) partition: Arc<Partition>,
    pub(crate) epoch: i32,
    /// `None` while loading.
    pub(crate) groups: tokio::sync::Mutex<Option<BTreeMap<String, Group>>>,
    /// A write failed or the load did: memory may not match the log.
    pub(crate) stale: AtomicBool,
}

/// A record's key in the offsets topic.
#[derive(Serialize, Deserialize)]
pub(crate) struct StoredKey {
    pub(crate) group: String,
    pub(crate) key: RecordKey,
}

impl Coordinator {
    pub(crate) fn shards(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<Shard>>> {
        self.shards.lock().expect("coordinator lock")
    }
}

/// The partition of the offsets topic a group belongs to.
pub(crate) fn group_partition(group: &str, partitions: u32) -> u32 {
    (murmur2(group.as_bytes()) & 0x7fff_ffff) as u32 % partitions.max(1)
}

pub(crate) fn validate_group_name(group: &str) -> Result<(), GroupOpError> {
    check_name("group name", group).map_err(GroupOpError::Invalid)
}

/// A group name or transactional id: not empty, at most 249 bytes (as
/// Kafka's), no control character.
pub(crate) fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if name.len() > GROUP_NAME_BYTES_MAX {
        return Err(format!("{what} is longer than {GROUP_NAME_BYTES_MAX} bytes"));
    }
    if name.chars().any(char::is_control) {
        return Err(format!("{what} contains a control character"));
    }
    Ok(())
}

/// Every group's records in a partition's log, in log order. Records that
/// do not decode (not written by a coordinator) are skipped.
pub(crate) fn read_group_records(
    partition: &Partition,
) -> Result<BTreeMap<String, Vec<Record>>, quiver_log::ReadError> {
    let mut groups: BTreeMap<String, Vec<Record>> = BTreeMap::new();
    for_each_record(partition, |record| {
        let Some(key) = record.key.as_deref().and_then(|k| serde_json::from_slice::<StoredKey>(k).ok()) else {
            tracing::warn!(partition = partition.id, offset = record.offset, "skipping a record with an unknown key");
            return;
        };
        let value = match record.value.as_deref() {
            None => None,
            Some(v) => match serde_json::from_slice::<RecordValue>(v) {
                Ok(v) => Some(v),
                Err(e) => {
                    tracing::warn!(partition = partition.id, offset = record.offset, error = %e, "skipping a record with an unknown value");
                    return;
                }
            },
        };
        groups.entry(key.group).or_default().push(Record { key: key.key, value });
    })?;
    Ok(groups)
}

/// Every record of a coordinator's partition, from the log start, in log
/// order: what loading its state replays. Control batches and batches that
/// do not decode (logged) are skipped.
pub(crate) fn for_each_record(
    partition: &Partition,
    mut f: impl FnMut(quiver_protocol::batch::Record),
) -> Result<(), quiver_log::ReadError> {
    let log = &partition.log;
    let end = log.log_end_offset();
    let mut offset = log.log_start_offset();
    while offset < end {
        let bytes = log.read(offset, LOAD_READ_BYTES, end)?;
        if bytes.is_empty() {
            break;
        }
        for batch in Batches::new(bytes) {
            let Ok((header, batch)) = batch else { break };
            offset = offset.max(header.next_offset());
            if header.is_control() {
                continue;
            }
            let Ok(records) = decode_records(&batch) else {
                tracing::warn!(
                    partition = partition.id,
                    offset = header.base_offset,
                    "skipping a batch that does not decode"
                );
                continue;
            };
            records.into_iter().for_each(&mut f);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_spread_over_partitions_stably() {
        // The partition of a group must never change between versions: it
        // is where its state lives.
        assert_eq!(group_partition("orders-service", 50), group_partition("orders-service", 50));
        let used: std::collections::BTreeSet<u32> = (0..500).map(|i| group_partition(&format!("g{i}"), 50)).collect();
        assert!(used.len() > 40, "{used:?}");
        assert!(used.iter().all(|p| *p < 50));
        assert_eq!(group_partition("x", 1), 0);
    }

    #[test]
    fn group_names_are_checked() {
        assert!(validate_group_name("").is_err());
        assert!(validate_group_name("a\nb").is_err());
        assert!(validate_group_name(&"g".repeat(250)).is_err());
        validate_group_name("payments.v2_workers-1").unwrap();
    }
}
