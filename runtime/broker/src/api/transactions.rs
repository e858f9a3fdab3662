//! Transactions: a transactional producer's init, its partitions joining
//! (on their first write, checked by the partition's leader with the
//! coordinator), commit and abort; markers arriving at a partition's
//! leader; listing, describing and an operator's abort. The coordinator's
//! shell (shards, storing, markers, timeouts) is `txn_coordinator.rs`.

use std::collections::BTreeMap;
use std::sync::Arc;

use quiver_protocol::batch::BatchHeader;
use quiver_protocol::messages::{
    AddPartitionsToTxnRequest, EndTxnRequest, InitProducerIdRequest, PartitionRef, TRANSACTION_STATE_TOPIC, TxnMarker,
};
use quiver_transactions::{End, Init, Transaction, TxnError, state_partition};

use crate::api::NewTopic;
use crate::api::Write;
use crate::api::groups::Coordinates;
use crate::broker::Broker;
use crate::errors::{ProduceError, TxnOpError};
use crate::txn_coordinator::{Decided, at_coordinator};
use crate::txn_shards::validate_transactional_id;

/// How many times an init waits for an earlier instance's transaction to
/// be aborted before it answers "retry".
const INIT_ROUNDS: usize = 3;

impl Broker {
    /// Where `id`'s coordinator is: the leader of its state partition
    /// (creating the state topic on first use).
    pub(crate) async fn find_txn_coordinator(&self, id: &str) -> Result<Coordinates, TxnOpError> {
        validate_transactional_id(id)?;
        if !self.controller.image().borrow().topics.contains_key(TRANSACTION_STATE_TOPIC) {
            self.create_state_topic().await?;
        }
        self.coordinates_in(TRANSACTION_STATE_TOPIC, |count| state_partition(id, count))
            .ok_or(TxnOpError::NotCoordinator { me: self.config.node_id, id: id.to_owned(), partition: 0 })
    }

    async fn create_state_topic(&self) -> Result<(), TxnOpError> {
        let settings = &self.config.transactions;
        let replication_factor = match settings.state_topic_replication_factor {
            0 => self.internal_replication_factor(),
            n => n,
        };
        let new = NewTopic {
            name: TRANSACTION_STATE_TOPIC.to_owned(),
            partitions: settings.state_topic_partitions,
            replication_factor,
            // Each id's latest record is its state: compacted, never
            // deleted by age.
            // A decision is stored on two replicas at least before it is
            // acted on (Kafka's transaction.state.log.min.isr).
            configs: vec![
                ("cleanup.policy".into(), "compact".into()),
                ("segment.bytes".into(), (100 * 1024 * 1024).to_string()),
                ("min.insync.replicas".into(), replication_factor.min(2).to_string()),
            ],
        };
        tracing::info!(partitions = new.partitions, replication_factor, "creating the transaction state topic");
        self.create_topic_unless_exists(&new).await.map_err(TxnOpError::StateTopic)
    }

    /// `init_transactions`: the id's producer id and a new epoch, fencing
    /// every older instance; an older instance's open transaction is
    /// aborted first.
    pub(crate) async fn init_transactional(
        self: &Arc<Self>,
        id: &str,
        timeout_ms: u64,
    ) -> Result<(i64, i16), TxnOpError> {
        self.await_finishing(id).await;
        for _ in 0..INIT_ROUNDS {
            let (decided, epoch) = self
                .with_txn(id, |c, now, fresh| {
                    Ok(match c.init(id, timeout_ms, now, fresh)? {
                        Init::Ready(t) => Decided::store(vec![t.clone()], Ok(t)),
                        Init::AbortFirst(t, markers) => Decided::store(vec![t], Err(markers)),
                    })
                })
                .await?;
            match decided {
                Ok(t) => {
                    tracing::info!(
                        id,
                        producer_id = t.producer_id,
                        epoch = t.producer_epoch,
                        "transactional producer initialised"
                    );
                    return Ok((t.producer_id, t.producer_epoch));
                }
                Err(markers) => {
                    tracing::info!(id, "a new instance: aborting the open transaction of the previous one");
                    self.finish_transaction(&markers, epoch).await?;
                }
            }
        }
        Err(TxnOpError::Txn { id: id.to_owned(), source: TxnError::Concurrent(id.to_owned()) })
    }

    /// Partitions (and groups) join the producer's transaction.
    pub(crate) async fn add_to_txn(
        self: &Arc<Self>,
        id: &str,
        producer_id: i64,
        epoch: i16,
        partitions: Vec<(String, u32)>,
        groups: Vec<String>,
    ) -> Result<(), TxnOpError> {
        // The previous transaction's markers go first.
        self.await_finishing(id).await;
        self.with_txn(id, |c, now, _| {
            let added = c.add(id, producer_id, epoch, &partitions, &groups, now)?;
            Ok(Decided::store(added.into_iter().collect(), ()))
        })
        .await
        .map(drop)
    }

    /// Commits or aborts: answered once the decision (`Prepare*`) is
    /// stored, with the producer id and epoch for the next transaction; the
    /// markers are written meanwhile, before anything of the id's next
    /// transaction (see [`Broker::finish_in_background`]).
    pub(crate) async fn end_txn(
        self: &Arc<Self>,
        id: &str,
        producer_id: i64,
        epoch: i16,
        commit: bool,
    ) -> Result<(i64, i16), TxnOpError> {
        self.await_finishing(id).await;
        let (end, shard_epoch) = self
            .with_txn(id, |c, now, fresh| {
                Ok(match c.end(id, producer_id, epoch, commit, now, fresh)? {
                    End::Prepare(t, markers) => Decided::store(vec![t.clone()], End::Prepare(t, markers)),
                    End::Empty(t) => Decided::store(vec![t.clone()], End::Empty(t)),
                    done @ End::AlreadyDone { .. } => Decided::store(Vec::new(), done),
                })
            })
            .await?;
        match end {
            End::Prepare(t, markers) => {
                self.finish_in_background(markers, shard_epoch);
                Ok((t.producer_id, t.producer_epoch))
            }
            End::Empty(t) => Ok((t.producer_id, t.producer_epoch)),
            End::AlreadyDone { producer_id, producer_epoch } => Ok((producer_id, producer_epoch)),
        }
    }

    /// An operator aborts `id`'s open transaction (its producer is fenced).
    pub(crate) async fn abort_transaction(self: &Arc<Self>, id: &str) -> Result<Transaction, TxnOpError> {
        let (markers, epoch) = self
            .with_txn(id, |c, now, fresh| {
                let (t, markers) = c.force_abort(id, now, fresh)?;
                Ok(Decided::store(t.into_iter().collect(), markers))
            })
            .await?;
        tracing::warn!(id, "transaction aborted by an operator");
        self.finish_transaction(&markers, epoch).await
    }

    pub(crate) async fn describe_transaction(&self, id: &str) -> Result<Transaction, TxnOpError> {
        self.read_txn(id, |c| c.get(id).cloned())
            .await?
            .ok_or_else(|| TxnOpError::Txn { id: id.to_owned(), source: TxnError::Unknown(id.to_owned()) })
    }

    /// The transactional batches of a request join their producer's
    /// transaction: each partition that does not hold an open transaction of
    /// the producer in the batch's epoch (its end would have written a
    /// marker there, closing it) is added at the coordinator — here, or at
    /// its broker — all in one call, which checks the producer's epoch. One
    /// answer per write: a write that is not transactional, or whose
    /// partition is not led here, is left to `prepare` (Ok).
    pub(crate) async fn join_transactions(self: &Arc<Self>, writes: &[Write]) -> Vec<Result<(), ProduceError>> {
        let mut results: Vec<Result<(), ProduceError>> = writes.iter().map(|_| Ok(())).collect();
        // The writes to join, by producer: (transactional id, producer id,
        // epoch) → their indices.
        let mut joining: BTreeMap<(&str, i64, i16), Vec<usize>> = BTreeMap::new();
        for (i, w) in writes.iter().enumerate() {
            let Some(id) = &w.transactional_id else { continue };
            let Ok(header) = BatchHeader::parse(&w.records) else { continue };
            if !header.is_transactional() || header.is_control() {
                continue;
            }
            let Ok((_, partition)) = self.partition(&w.topic, w.partition) else { continue };
            let (producer, epoch) = (header.producer_id, header.producer_epoch);
            let joined = partition.log.open_transaction(producer).is_some()
                && partition.log.producer_epoch(producer) == Some(epoch);
            if !joined {
                joining.entry((id.as_str(), producer, epoch)).or_default().push(i);
            }
        }
        for ((id, producer, epoch), indices) in joining {
            let partitions = indices.iter().map(|&i| (writes[i].topic.clone(), writes[i].partition)).collect();
            if let Err(source) = self.join_anywhere(id, producer, epoch, partitions).await {
                let source = Arc::new(source);
                for i in indices {
                    let (topic, partition) = (writes[i].topic.clone(), writes[i].partition);
                    results[i] = Err(ProduceError::Transaction { topic, partition, source: source.clone() });
                }
            }
        }
        results
    }

    /// `add` at `id`'s coordinator, here or at its broker.
    async fn join_anywhere(
        self: &Arc<Self>,
        id: &str,
        producer_id: i64,
        epoch: i16,
        partitions: Vec<(String, u32)>,
    ) -> Result<(), TxnOpError> {
        let refs =
            partitions.iter().map(|(topic, partition)| PartitionRef { topic: topic.clone(), partition: *partition });
        let request = AddPartitionsToTxnRequest {
            transactional_id: id.to_owned(),
            producer_id,
            producer_epoch: epoch,
            partitions: refs.collect(),
            groups: Vec::new(),
        };
        self.at_txn_coordinator(
            id,
            || self.add_to_txn(id, producer_id, epoch, partitions, vec![]),
            |node, address| async move { self.replica_link.add_partitions_to_txn(node, address, request).await.map(drop) },
        )
        .await
    }

    /// `init_transactions` for a producer inside the broker (a transform):
    /// at the id's coordinator, here or on another broker.
    pub(crate) async fn init_anywhere(self: &Arc<Self>, id: &str, timeout_ms: u64) -> Result<(i64, i16), TxnOpError> {
        let request = InitProducerIdRequest {
            transactional_id: Some(id.to_owned()),
            transaction_timeout_ms: timeout_ms.min(u64::from(u32::MAX)) as u32,
        };
        self.at_txn_coordinator(
            id,
            || self.init_transactional(id, timeout_ms),
            |node, address| async move {
                let answer = self.replica_link.init_producer_id(node, address, request).await?;
                Ok((answer.producer_id, answer.producer_epoch))
            },
        )
        .await
    }

    /// Ends a transaction of a producer inside the broker, at its
    /// coordinator here or on another broker.
    pub(crate) async fn end_anywhere(
        self: &Arc<Self>,
        id: &str,
        producer_id: i64,
        epoch: i16,
        commit: bool,
    ) -> Result<(i64, i16), TxnOpError> {
        let request = EndTxnRequest { transactional_id: id.to_owned(), producer_id, producer_epoch: epoch, commit };
        self.at_txn_coordinator(
            id,
            || self.end_txn(id, producer_id, epoch, commit),
            |node, address| async move {
                let answer = self.replica_link.end_txn(node, address, request).await?;
                Ok((answer.producer_id, answer.producer_epoch))
            },
        )
        .await
    }

    /// Runs a coordinator operation for `id`: `here` when this broker
    /// coordinates it, else `there` with the coordinator's node and address.
    async fn at_txn_coordinator<T, H, HF, R, RF>(self: &Arc<Self>, id: &str, here: H, there: R) -> Result<T, TxnOpError>
    where
        H: FnOnce() -> HF,
        HF: std::future::Future<Output = Result<T, TxnOpError>>,
        R: FnOnce(u32, String) -> RF,
        RF: std::future::Future<Output = Result<T, quiver_protocol::WireError>>,
    {
        // (`find_txn_coordinator` checks the id.)
        let coordinates = self.find_txn_coordinator(id).await?;
        let me = self.config.node_id;
        match coordinates.leader {
            Some((node, _)) if node == me => here().await,
            Some((node, address)) => there(node, address).await.map_err(|e| at_coordinator(id, node, e)),
            None => Err(TxnOpError::NotCoordinator { me, id: id.to_owned(), partition: coordinates.partition }),
        }
    }

    /// A coordinator's markers for partitions led here: each written (or
    /// found written) and on the in-sync replicas, or why not.
    pub(crate) async fn write_txn_markers(
        self: &Arc<Self>,
        markers: Vec<TxnMarker>,
        coordinator_epoch: i32,
    ) -> Vec<Result<(), ProduceError>> {
        let mut results = Vec::with_capacity(markers.len());
        for marker in &markers {
            results.push(self.write_marker_here(marker, coordinator_epoch).await);
        }
        results
    }
}
