//! Batches produced with `PARTITION_ANY`: the broker chooses each record's
//! partition, with the topic's partitioner plugin when it names one (the
//! same module a client runs locally, so both give the same answer), or
//! murmur2 of the key as Kafka does. Keyless records of one batch without a
//! partitioner stay together on one partition, chosen round robin.
//!
//! In a cluster the shares of partitions led by other brokers are forwarded
//! to their leaders as ordinary produce requests, with the records as
//! produced (the leader runs the topic's serializers itself).

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use quiver_plugin_host::{Input, Kind};
use quiver_protocol::batch::{self, Compression};
use quiver_protocol::partitioner::{partition_for_key, split_by_partition};

use crate::broker::Broker;
use crate::errors::{PluginCallError, ProduceError};
use crate::partition::{Partition, RemoteLeader, Topic};
use crate::topic::TopicCompression;

/// One partition's share of a `PARTITION_ANY` batch (or a whole batch
/// produced to a partition).
pub(crate) struct Placed {
    pub(crate) partition: u32,
    pub(crate) to: Destination,
    pub(crate) batch: Bytes,
    /// Index in the produced batch of each record, in order.
    pub(crate) indices: Vec<u32>,
}

impl Placed {
    /// A whole batch for a partition this broker leads.
    pub(crate) fn here(partition: Arc<Partition>, batch: Bytes) -> Placed {
        Placed { partition: partition.id, to: Destination::Here(partition), batch, indices: Vec::new() }
    }
}

/// Where a share is appended.
pub(crate) enum Destination {
    /// A partition this broker leads: serialized and encoded for the topic.
    Here(Arc<Partition>),
    /// Led by another broker: the records as produced, forwarded there.
    Leader(RemoteLeader),
}

impl Broker {
    /// Places the records of a validated batch produced with
    /// `PARTITION_ANY`: chooses each record's partition from the records as
    /// produced (before any serializer, as a client partitioning locally sees
    /// them), runs the topic's serializers on the whole batch, and splits the
    /// result by partition. Blocking: call off the runtime.
    pub(crate) fn place(&self, topic: &Topic, produced: &Bytes) -> Result<Vec<Placed>, ProduceError> {
        let (header, body) = batch::records_section(produced).map_err(ProduceError::InvalidBatch)?;
        let records = batch::decode_section(&header, &body).map_err(ProduceError::InvalidBatch)?;
        let count = topic.count();
        let chosen = match &topic.config.partitioner {
            Some(name) => self.run_partitioner(name, &header, &body, records.len() as u32, count)?,
            None => {
                let keyless = topic.keyless_next.fetch_add(1, Ordering::Relaxed) % count;
                records.iter().map(|r| r.key.as_deref().map_or(keyless, |k| partition_for_key(k, count))).collect()
            }
        };
        let codec = match topic.config.compression {
            TopicCompression::Codec(codec) => codec,
            TopicCompression::Producer => header.compression().unwrap_or(Compression::None),
        };
        let name = &topic.record.name;
        let mut leaders = BTreeMap::new();
        for &p in &chosen {
            if let Entry::Vacant(e) = leaders.entry(p) {
                e.insert(self.remote_leader(name, p)?);
            }
        }
        // Serializers check every record before anything is appended; the
        // shares appended here are serialized, those forwarded to other
        // leaders keep the records as produced (their leader serializes).
        let serialized = match self.encode_for_topic(topic, produced)? {
            Some(encoded) => {
                let serialized = batch::decode_records(&encoded).map_err(PluginCallError::Corrupt)?;
                if serialized.len() != chosen.len() {
                    return Err(ProduceError::Internal("the serializer changed the record count".into()));
                }
                Some(serialized)
            }
            None => None,
        };
        // Without a serializer both kinds of share come from one split.
        let (local, remote) = (leaders.values().any(Option::is_none), leaders.values().any(Option::is_some));
        let split = |records: &[batch::Record], wanted: bool| -> BTreeMap<u32, _> {
            let splits = if wanted { split_by_partition(records, &chosen, codec) } else { Vec::new() };
            splits.into_iter().map(|s| (s.partition, s)).collect()
        };
        let mut as_produced = split(&records, remote || (local && serialized.is_none()));
        let mut serialized = serialized.map(|s| split(&s, local));
        leaders
            .into_iter()
            .map(|(partition, leader)| {
                let share = match (&leader, &mut serialized) {
                    (None, Some(serialized)) => serialized.remove(&partition),
                    _ => as_produced.remove(&partition),
                };
                let share = share
                    .ok_or_else(|| ProduceError::Internal(format!("no records split for partition {partition}")))?;
                let to = match leader {
                    None => Destination::Here(self.held_partition(topic, partition)?),
                    Some(remote) => Destination::Leader(remote),
                };
                Ok(Placed { partition, to, batch: share.builder.build(), indices: share.indices })
            })
            .collect()
    }

    fn run_partitioner(
        &self,
        name: &str,
        header: &batch::BatchHeader,
        body: &Bytes,
        count: u32,
        partitions: u32,
    ) -> Result<Vec<u32>, PluginCallError> {
        let plugin = format!("partitioner '{name}'");
        let failed =
            |e: &dyn std::fmt::Display| PluginCallError::Failed { plugin: plugin.clone(), detail: e.to_string() };
        let d = self.plugins.get(name).ok_or_else(|| failed(&"not deployed"))?;
        d.plugin.expect_kind(Kind::Partitioner).map_err(|e| failed(&e))?;
        let input =
            Input { base_offset: header.base_offset, base_timestamp: header.base_timestamp, count, records: body };
        let params = d.deployment.read().expect("deployment lock").params.clone();
        let chosen = d.with_instance(&params, |i| i.partition(&input, partitions)).map_err(|e| failed(&e))?;
        match chosen.map_err(|e| failed(&e))? {
            Ok(chosen) => Ok(chosen),
            Err(refusal) => Err(PluginCallError::Rejected {
                index: refusal.index,
                what: "partitioner",
                name: name.to_owned(),
                message: refusal.message,
            }),
        }
    }
}
