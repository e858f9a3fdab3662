//! Writes: a batch per partition (or `PARTITION_ANY`, placed by the
//! broker), appended by this broker as leader or forwarded to the
//! partition's leader, and with `Acks::All` confirmed by the in-sync
//! replicas.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use quiver_protocol::batch::{self, BatchError, ValidationLimits};
use quiver_protocol::messages::{self as wire, PARTITION_ANY, ProducePartition, ProduceRequest};
use quiver_protocol::{ErrorCode, WireError};

use crate::broker::Broker;
use crate::errors::{ProduceError, blocking_as};
use crate::order::AppendTurn;
use crate::partition::{Partition, RemoteLeader};
use crate::placement::{Destination, Placed};
use crate::registry::serializers;
use crate::topic::TopicCompression;

/// How long an `acks=all` write waits for the in-sync replicas.
const REPLICATION_TIMEOUT: Duration = Duration::from_secs(10);

/// What a write waits for before it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Acks {
    /// The leader appended it (to its page cache).
    Leader,
    /// Every in-sync replica holds it on disk: the high watermark passed it.
    All,
}

/// One batch for one partition, or for [`PARTITION_ANY`].
pub(crate) struct Write {
    pub(crate) topic: String,
    pub(crate) partition: u32,
    pub(crate) records: Bytes,
    /// The transactional producer's id: its batches must be transactional,
    /// and a partition joins the producer's transaction (checked with the
    /// coordinator) on its first write there.
    pub(crate) transactional_id: Option<String>,
}

impl Write {
    pub(crate) fn new(topic: impl Into<String>, partition: u32, records: Bytes) -> Write {
        Write { topic: topic.into(), partition, records, transactional_id: None }
    }
}

/// Where a written batch went.
#[derive(Debug, Default)]
pub(crate) struct Written {
    /// The offset of its first record (`-1` for `PARTITION_ANY`).
    pub(crate) base_offset: i64,
    /// The partition's log start after the append (`-1` if forwarded).
    pub(crate) log_start_offset: i64,
    /// For `PARTITION_ANY`: each record's (partition, offset), in order.
    pub(crate) placements: Vec<(u32, i64)>,
}

impl Broker {
    /// Writes `writes` in order, each all or nothing. Appends happen only
    /// once `turn` (the writer's place in its connection's order) has come;
    /// the CPU work before them (validation, serializers, partitioners,
    /// re-encoding) overlaps with other writers'.
    pub(crate) async fn write(
        self: &Arc<Self>,
        writes: Vec<Write>,
        acks: Acks,
        turn: Option<AppendTurn>,
    ) -> Result<Vec<Result<Written, ProduceError>>, ProduceError> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(ProduceError::ShuttingDown);
        }
        // A transactional request's partitions new to its transaction join
        // it together: one coordinator decision (one stored record) for all.
        let joined = self.join_transactions(&writes).await;
        // A refused record rejects its whole batch and nothing of it is
        // appended.
        let mut prepared = Vec::with_capacity(writes.len());
        for (w, joined) in writes.iter().zip(joined) {
            prepared.push(match joined {
                Ok(()) => self.prepare(w).await,
                Err(e) => Err(e),
            });
        }
        if let Some(turn) = &turn {
            turn.wait().await;
        }
        let mut results = Vec::with_capacity(writes.len());
        let mut to_sync = Vec::new();
        for (w, prepared) in writes.iter().zip(prepared) {
            // Shares led elsewhere are forwarded under the turn, so that
            // the leader receives them in this connection's order too.
            let written = async {
                let targets = prepared?;
                let mut written = Written { base_offset: -1, log_start_offset: -1, placements: Vec::new() };
                let any = w.partition == PARTITION_ANY;
                if any {
                    let count = targets.iter().map(|t| t.indices.len()).sum();
                    written.placements = vec![(PARTITION_ANY, -1); count];
                }
                for (i, target) in targets.into_iter().enumerate() {
                    let appended = match target.to {
                        Destination::Here(partition) => partition
                            .append_as_leader(&w.topic, &target.batch, acks == Acks::All)
                            .map(|(info, epoch)| {
                                written.log_start_offset = partition.log.log_start_offset();
                                to_sync.push((results.len(), partition, info.last_offset + 1, epoch));
                                info.base_offset
                            }),
                        Destination::Leader(leader) => {
                            self.forward(acks, &w.topic, target.partition, target.batch, leader).await
                        }
                    };
                    // Once a share is written, retrying the batch would
                    // write it twice.
                    let base_offset = appended.map_err(|e| match i {
                        0 => e,
                        _ => ProduceError::AfterOtherShares(Box::new(e)),
                    })?;
                    if any {
                        for (n, &at) in target.indices.iter().enumerate() {
                            written.placements[at as usize] = (target.partition, base_offset + n as i64);
                        }
                    } else {
                        written.base_offset = base_offset;
                    }
                }
                Ok::<Written, ProduceError>(written)
            }
            .await;
            results.push(written);
        }
        if let Some(turn) = turn {
            turn.release();
        }
        if acks == Acks::All {
            // Group commit: concurrent writes to the same partition share
            // the fsync inside `Log::sync_to`.
            for (index, partition, end, epoch) in to_sync {
                if let Err(e) = self.confirm(&partition, end, epoch).await {
                    results[index] = Err(e);
                }
            }
        }
        Ok(results)
    }

    /// Forwards one share of a `PARTITION_ANY` batch to the broker that
    /// leads its partition, with the write's acks: the base offset it got
    /// there.
    async fn forward(
        &self,
        acks: Acks,
        topic: &str,
        partition: u32,
        records: Bytes,
        leader: RemoteLeader,
    ) -> Result<i64, ProduceError> {
        let at = leader.0;
        let request = ProduceRequest {
            transactional_id: None,
            acks: match acks {
                Acks::Leader => wire::Acks::Leader,
                Acks::All => wire::Acks::All,
            },
            timeout_ms: REPLICATION_TIMEOUT.as_millis() as u32,
            partitions: vec![ProducePartition { topic: topic.to_owned(), partition, records }],
        };
        let answer = self.produce_at(leader, request).await.map_err(|e| match e.code {
            // The request may have reached the leader: a retry could write
            // its records twice.
            ErrorCode::RequestTimedOut => {
                ProduceError::ForwardUnknown { topic: topic.to_owned(), partition, leader: at, message: e.message }
            }
            _ => ProduceError::Forward(e),
        })?;
        let result = answer
            .partitions
            .into_iter()
            .next()
            .ok_or_else(|| ProduceError::Internal(format!("broker {at} gave an empty produce answer")))?;
        match result.error {
            ErrorCode::None => Ok(result.base_offset),
            code => Err(ProduceError::AtLeader {
                topic: topic.to_owned(),
                partition,
                leader: at,
                error: WireError::new(code, result.message),
            }),
        }
    }

    /// An `acks=all` append's confirmation: the records below `end` are on
    /// this broker's disk, then on every in-sync replica's.
    pub(crate) async fn confirm(&self, partition: &Arc<Partition>, end: i64, epoch: i32) -> Result<(), ProduceError> {
        let synced = {
            let partition = partition.clone();
            tokio::task::spawn_blocking(move || partition.log.sync_to(end)).await
        };
        match synced {
            Ok(Ok(())) => self.replicated(partition, end, epoch).await,
            Ok(Err(e)) => Err(ProduceError::Sync(e.to_string())),
            Err(e) => Err(ProduceError::Sync(e.to_string())),
        }
    }

    /// Waits until every in-sync replica holds the records below `end`
    /// (immediate on a single node): the high watermark passed them.
    async fn replicated(&self, partition: &Partition, end: i64, epoch: i32) -> Result<(), ProduceError> {
        self.poll_appends(REPLICATION_TIMEOUT, &[partition], |last| {
            if partition.high_watermark() >= end {
                return Some(Ok(()));
            }
            if !partition.leads_in(epoch) {
                return Some(Err(ProduceError::LeadershipMoved));
            }
            last.then_some(Err(ProduceError::NotConfirmed(REPLICATION_TIMEOUT)))
        })
        .await
    }

    /// Everything a batch needs before it may be appended: full validation,
    /// the topic's value serializer, its partition(s) (split by the topic's
    /// partitioner for `PARTITION_ANY`), and re-encoding if the topic fixes
    /// a codec.
    async fn prepare(self: &Arc<Self>, w: &Write) -> Result<Vec<Placed>, ProduceError> {
        let any = w.partition == PARTITION_ANY;
        let (topic, partition) = if any {
            (self.current_topic(&w.topic)?, None)
        } else {
            let (topic, partition) = self.partition(&w.topic, w.partition)?;
            (topic, Some(partition))
        };
        let limits = ValidationLimits {
            record_bytes_max: topic.config.record_bytes_max,
            keys_required: topic.config.is_compacted(),
        };
        let header = batch::validate(&w.records, &limits).map_err(|e| match e {
            BatchError::RecordTooLarge { .. } => ProduceError::RecordTooLarge { topic: w.topic.clone(), source: e },
            other => ProduceError::InvalidBatch(other),
        })?;
        if any && header.producer_id != batch::NO_PRODUCER_ID {
            return Err(ProduceError::UnplacedIdempotent);
        }
        if header.is_control() {
            return Err(ProduceError::TransactionalMismatch(
                "control batches (transaction markers) are written by transaction coordinators only",
            ));
        }
        match (w.transactional_id.is_some(), header.is_transactional()) {
            (false, true) => {
                return Err(ProduceError::TransactionalMismatch(
                    "a transactional batch needs the request's transactional id",
                ));
            }
            (true, false) => {
                return Err(ProduceError::TransactionalMismatch(
                    "a request with a transactional id carries transactional batches only",
                ));
            }
            _ => {}
        }
        let stored = match topic.config.compression {
            TopicCompression::Codec(codec) if !any && header.compression().ok() != Some(codec) => {
                batch::recompress(&w.records, codec).map_err(ProduceError::InvalidBatch)?
            }
            _ => w.records.clone(),
        };
        let broker = self.clone();
        match partition {
            None => blocking_as(move || broker.place(&topic, &stored)).await,
            // Without serializers, nothing here needs a blocking thread.
            Some(partition) if serializers(&topic.config, true).is_empty() => Ok(vec![Placed::here(partition, stored)]),
            Some(partition) => {
                let stored = blocking_as(move || {
                    Ok::<_, ProduceError>(broker.encode_for_topic(&topic, &stored)?.unwrap_or(stored))
                })
                .await?;
                Ok(vec![Placed::here(partition, stored)])
            }
        }
    }
}
