//! Batches produced with `PARTITION_ANY`: the broker chooses each record's
//! partition, with the topic's partitioner plugin when it names one (the
//! same module a client runs locally, so both give the same answer), or
//! murmur2 of the key as Kafka does. Keyless records of one batch without a
//! partitioner stay together on one partition, chosen round robin.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use quiver_plugin_host::{Input, Kind};
use quiver_protocol::batch::{self, Compression};
use quiver_protocol::partitioner::{partition_for_key, split_by_partition};
use quiver_protocol::{ErrorCode, WireError};

use crate::broker::{Broker, Partition, Topic, corrupt};
use crate::topic::TopicCompression;

/// One partition's share of a `PARTITION_ANY` batch.
pub(crate) struct Placed {
    pub(crate) partition: Arc<Partition>,
    pub(crate) batch: Bytes,
    /// Index in the produced batch of each record, in order.
    pub(crate) indices: Vec<u32>,
}

impl Broker {
    /// Places the records of a validated batch produced with
    /// `PARTITION_ANY`: chooses each record's partition from the records as
    /// produced (before any serializer, as a client partitioning locally sees
    /// them), runs the topic's serializers on the whole batch, and splits the
    /// result by partition. Blocking: call off the runtime.
    pub(crate) fn place(&self, topic: &Topic, produced: &Bytes) -> Result<Vec<Placed>, WireError> {
        let (header, body) = batch::records_section(produced).map_err(corrupt)?;
        let mut records = batch::decode_section(&header, &body).map_err(corrupt)?;
        let count = topic.count();
        let chosen = match &topic.config.partitioner {
            Some(name) => self.run_partitioner(name, &header, &body, records.len() as u32, count)?,
            None => {
                let keyless = topic.keyless_next.fetch_add(1, Ordering::Relaxed) % count;
                records.iter().map(|r| r.key.as_deref().map_or(keyless, |k| partition_for_key(k, count))).collect()
            }
        };
        if let Some(encoded) = self.encode_for_topic(topic, produced)? {
            records = batch::decode_records(&encoded).map_err(corrupt)?;
            if records.len() != chosen.len() {
                return Err(WireError::new(ErrorCode::Internal, "the serializer changed the record count"));
            }
        }
        let codec = match topic.config.compression {
            TopicCompression::Codec(codec) => codec,
            TopicCompression::Producer => header.compression().unwrap_or(Compression::None),
        };
        split_by_partition(&records, &chosen, codec)
            .into_iter()
            .map(|s| {
                Ok(Placed {
                    partition: self.leader_partition(topic, s.partition)?,
                    batch: s.builder.build(),
                    indices: s.indices,
                })
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
    ) -> Result<Vec<u32>, WireError> {
        let failed =
            |e: &dyn std::fmt::Display| WireError::new(ErrorCode::PluginFailed, format!("partitioner '{name}': {e}"));
        let d = self.plugins.get(name).ok_or_else(|| failed(&"not deployed"))?;
        d.plugin.expect_kind(Kind::Partitioner).map_err(|e| failed(&e))?;
        let input =
            Input { base_offset: header.base_offset, base_timestamp: header.base_timestamp, count, records: body };
        let params = d.deployment.read().expect("deployment lock").params.clone();
        let chosen = d.with_instance(&params, |i| i.partition(&input, partitions)).map_err(|e| failed(&e))?;
        match chosen.map_err(|e| failed(&e))? {
            Ok(chosen) => Ok(chosen),
            Err(refusal) => Err(WireError::new(
                ErrorCode::RecordRejected,
                format!("record {} rejected by partitioner '{name}': {}", refusal.index, refusal.message),
            )),
        }
    }
}
