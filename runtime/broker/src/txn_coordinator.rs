//! Transaction coordination on the broker: the IO shell around the plain
//! rules of `quiver-transactions`.
//!
//! Transactions live in the internal topic `__transaction_state`; a
//! transactional id belongs to partition `state_partition(id)` (Java's
//! `String.hashCode`, as Kafka) and its coordinator is that partition's
//! leader. For each partition it leads, a broker keeps a [`TxnShard`]:
//! the partition's transactions, rebuilt from its log before it answers.
//!
//! Every decision is stored before it is answered or acted on: the
//! coordinator decides from its state, the new [`Transaction`] records are
//! appended with acks=all, and only then applied in memory. A failed write
//! changes nothing and marks the shard stale (it is loaded again).
//!
//! Ending a transaction is two stored steps with the markers between:
//! `Prepare*` (stored), the markers written to every partition in the
//! transaction (here, or at their leaders over the replica link), then
//! `Complete*` (stored). A coordinator that takes over finds `Prepare*`
//! records and writes their markers again (a partition that has one
//! already skips it). A loop (`coordinate_transactions`) follows the
//! state topic's leaderships and, once a second, aborts timed-out
//! transactions, finishes half-done ends and forgets expired ids.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use quiver_protocol::control::{Marker, marker_batch};
use quiver_protocol::messages::{GroupTxnMarker, TRANSACTION_STATE_TOPIC, TxnMarker, WriteTxnMarkersRequest};
use quiver_protocol::{ErrorCode, WireError};
use quiver_transactions::{Coordinator, Markers, Transaction, TxnError, state_partition};

use crate::broker::{Broker, now_ms};
use crate::errors::{PartitionError, ProduceError, TxnOpError};
use crate::partition::{Partition, RemoteLeader};
use crate::txn_shards::{TxnShard, encode_changes, read_transactions, validate_transactional_id};

/// How often the coordinator looks at the state topic's leaderships.
const LEADERSHIP_TICK: Duration = Duration::from_millis(200);
/// How often timeouts, half-done ends and expired ids are looked at.
const EXPIRY_TICK_MS: u64 = 1_000;
/// How long an id's next request waits for its previous end's markers
/// before going on (and meeting `concurrent_transactions`, retriable).
const FINISH_WAIT: Duration = Duration::from_secs(10);
/// How long a transaction stays `Prepare*` before the expiry loop writes its
/// markers (an end's own finisher failed, or a predecessor left it).
const FINISH_TAKEOVER_MS: u64 = 3_000;

/// What a decision stores and answers.
pub(crate) struct Decided<T> {
    /// New records (`Err(id)`: a tombstone).
    pub(crate) changes: Vec<Result<Transaction, String>>,
    pub(crate) answer: T,
    /// Answer only once the in-sync replicas hold the records (else once
    /// this broker appended them: for what a new coordinator can redo).
    pub(crate) durable: bool,
}

impl<T> Decided<T> {
    pub(crate) fn store(changes: Vec<Transaction>, answer: T) -> Decided<T> {
        Decided { changes: changes.into_iter().map(Ok).collect(), answer, durable: true }
    }
}

impl Broker {
    /// Follows the state topic's leaderships; times out, completes and
    /// expires transactions, until shutdown.
    pub(crate) async fn coordinate_transactions(self: Arc<Self>) {
        let mut tick = tokio::time::interval(LEADERSHIP_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut expired_at = 0;
        while !self.shutting_down.load(Ordering::Relaxed) {
            tick.tick().await;
            self.follow_state_leadership();
            let now = self.clock_ms();
            if now.saturating_sub(expired_at) >= EXPIRY_TICK_MS {
                expired_at = now;
                self.expire_transactions().await;
            }
        }
    }

    /// Loads a shard for each state partition newly led here; drops those
    /// no longer led (or led in another epoch, or stale).
    fn follow_state_leadership(self: &Arc<Self>) {
        let led: HashMap<u32, (Arc<Partition>, i32)> = match self.current_topic(TRANSACTION_STATE_TOPIC) {
            Ok(topic) => topic.local().filter_map(|p| Some((p.id, (p.clone(), p.leader_epoch()?)))).collect(),
            Err(_) => HashMap::new(),
        };
        let mut shards = self.txn_shards.shards();
        shards.retain(|id, shard| {
            let keep =
                led.get(id).is_some_and(|(_, epoch)| *epoch == shard.epoch) && !shard.stale.load(Ordering::Acquire);
            if !keep {
                tracing::info!(partition = id, epoch = shard.epoch, "no longer coordinating these transactions");
            }
            keep
        });
        for (id, (partition, epoch)) in led {
            if shards.contains_key(&id) {
                continue;
            }
            let shard = Arc::new(TxnShard {
                partition,
                epoch,
                coordinator: tokio::sync::Mutex::new(None),
                stale: AtomicBool::new(false),
                finishing: std::sync::Mutex::default(),
            });
            shards.insert(id, shard.clone());
            tokio::spawn(self.clone().load_txn_shard(shard));
        }
    }

    /// Rebuilds a shard's transactions from its partition's log.
    async fn load_txn_shard(self: Arc<Self>, shard: Arc<TxnShard>) {
        let partition = shard.partition.clone();
        let limits = self.config.transactions.limits;
        let loaded = tokio::task::spawn_blocking(move || {
            let mut coordinator = Coordinator::new(limits);
            read_transactions(&partition, &mut coordinator).map(|()| coordinator)
        })
        .await;
        let coordinator = match loaded {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::error!(partition = shard.partition.id, error = %e, "cannot load these transactions; trying again");
                shard.stale.store(true, Ordering::Release);
                return;
            }
            Err(e) => {
                tracing::error!(partition = shard.partition.id, error = %e, "loading transactions panicked");
                shard.stale.store(true, Ordering::Release);
                return;
            }
        };
        tracing::info!(
            partition = shard.partition.id,
            epoch = shard.epoch,
            transactions = coordinator.transactions().count(),
            pending = coordinator.pending(0, 0).len(),
            "coordinating transactions"
        );
        *shard.coordinator.lock().await = Some(coordinator);
    }

    /// The shard coordinating `id`.
    pub(crate) fn txn_shard_of(&self, id: &str) -> Result<Arc<TxnShard>, TxnOpError> {
        validate_transactional_id(id)?;
        let me = self.config.node_id;
        let count =
            self.controller.image().borrow().topics.get(TRANSACTION_STATE_TOPIC).map(|t| t.partitions.len() as u32);
        let Some(count) = count else {
            return Err(TxnOpError::NotCoordinator { me, id: id.to_owned(), partition: 0 });
        };
        let partition = state_partition(id, count);
        self.txn_shards.shards().get(&partition).cloned().ok_or_else(|| TxnOpError::NotCoordinator {
            me,
            id: id.to_owned(),
            partition,
        })
    }

    /// Decides on `id`'s coordinator (at the wall clock, which a new
    /// coordinator shares), stores what was decided, then applies it.
    /// `decide` gets a source of fresh producer ids; it may be run twice
    /// (a first time to learn whether it needs one, which takes a metadata
    /// write to get).
    pub(crate) async fn with_txn<T>(
        self: &Arc<Self>,
        id: &str,
        decide: impl Fn(&Coordinator, u64, &mut dyn FnMut() -> i64) -> Result<Decided<T>, TxnError>,
    ) -> Result<(T, i32), TxnOpError> {
        let shard = self.txn_shard_of(id)?;
        let mut guard = shard.coordinator.lock().await;
        let me = self.config.node_id;
        if shard.stale.load(Ordering::Acquire) || !shard.partition.leads_in(shard.epoch) {
            return Err(TxnOpError::NotCoordinator { me, id: id.to_owned(), partition: shard.partition.id });
        }
        let coordinator = guard.as_mut().ok_or(TxnOpError::Loading { me, partition: shard.partition.id })?;
        let now = now_ms().max(0) as u64;
        let txn = |source| TxnOpError::Txn { id: id.to_owned(), source };
        let mut wanted = false;
        let mut decided = decide(coordinator, now, &mut || {
            wanted = true;
            -1
        })
        .map_err(txn)?;
        if wanted {
            let fresh = self
                .init_producer_id()
                .await
                .map_err(|source| TxnOpError::ProducerIds { id: id.to_owned(), source })?;
            decided = decide(coordinator, now, &mut || fresh).map_err(txn)?;
        }
        if !decided.changes.is_empty() {
            self.store_txns(&shard, id, &decided.changes, decided.durable).await?;
            for change in decided.changes {
                match change {
                    Ok(t) => coordinator.apply(t),
                    Err(gone) => coordinator.remove(&gone),
                }
            }
        }
        Ok((decided.answer, shard.epoch))
    }

    /// Reads the transactions of the shard of `id`.
    pub(crate) async fn read_txn<T>(&self, id: &str, f: impl FnOnce(&Coordinator) -> T) -> Result<T, TxnOpError> {
        let shard = self.txn_shard_of(id)?;
        let guard = shard.coordinator.lock().await;
        let me = self.config.node_id;
        if shard.stale.load(Ordering::Acquire) || !shard.partition.leads_in(shard.epoch) {
            return Err(TxnOpError::NotCoordinator { me, id: id.to_owned(), partition: shard.partition.id });
        }
        Ok(f(guard.as_ref().ok_or(TxnOpError::Loading { me, partition: shard.partition.id })?))
    }

    /// Every transaction this broker coordinates.
    pub(crate) async fn all_transactions(&self) -> Vec<Transaction> {
        let shards: Vec<Arc<TxnShard>> = self.txn_shards.shards().values().cloned().collect();
        let mut out = Vec::new();
        for shard in shards {
            if let Some(c) = shard.coordinator.lock().await.as_ref() {
                out.extend(c.transactions().cloned());
            }
        }
        out
    }

    async fn store_txns(
        self: &Arc<Self>,
        shard: &TxnShard,
        id: &str,
        changes: &[Result<Transaction, String>],
        durable: bool,
    ) -> Result<(), TxnOpError> {
        // Appended directly (not through `write`, which may itself join a
        // transaction and so come back here).
        let batch = encode_changes(changes, now_ms());
        let partition = &shard.partition;
        let written = match partition.append_as_leader(TRANSACTION_STATE_TOPIC, &batch, true) {
            Ok((info, epoch)) if epoch == shard.epoch && durable => {
                self.confirm(partition, info.last_offset + 1, epoch).await
            }
            Ok((_, epoch)) if epoch == shard.epoch => Ok(()),
            // Led again, in a new epoch: this shard's memory is not the truth.
            Ok(_) => Err(ProduceError::LeadershipMoved),
            Err(e) => Err(e),
        };
        written.map(drop).map_err(|source| {
            shard.stale.store(true, Ordering::Release);
            tracing::warn!(id, partition = shard.partition.id, error = %source, "storing a transaction change failed");
            TxnOpError::Store { id: id.to_owned(), source: Box::new(source) }
        })
    }

    /// Writes a decided transaction's markers, then stores it complete.
    /// An error leaves it `Prepare*`: the expiry loop tries again.
    pub(crate) async fn finish_transaction(
        self: &Arc<Self>,
        markers: &Markers,
        coordinator_epoch: i32,
    ) -> Result<Transaction, TxnOpError> {
        let id = markers.transactional_id.as_str();
        // Markers listed earlier (the expiry loop's) may be stale: once the
        // transaction completed, the producer's next one (same epoch) may
        // have data in these partitions, which a late marker would end.
        if !self.read_txn(id, |c| c.awaits_markers(markers)).await? {
            return self.describe_transaction(id).await;
        }
        if let Err(detail) = self.write_markers(markers, coordinator_epoch).await {
            tracing::info!(id, commit = markers.commit, %detail, "markers not all written yet");
            return Err(TxnOpError::MarkersPending { id: id.to_owned(), detail });
        }
        // Not waited for on the replicas: lost, it leaves `Prepare*`, whose
        // markers a new coordinator finds written and completes again.
        let (done, _) = self
            .with_txn(id, |c, now, _| {
                let done = c.complete(id, now);
                Ok(Decided { durable: false, ..Decided::store(done.iter().cloned().collect(), done.clone()) })
            })
            .await?;
        match done {
            Some(t) => {
                tracing::debug!(id, state = t.state.name(), "transaction ended");
                Ok(t)
            }
            // Completed meanwhile (by the expiry loop, or a retried end).
            None => self.describe_transaction(id).await,
        }
    }

    /// Finishes a decided end in the background (its producer was answered
    /// once `Prepare*` was stored, as Kafka's coordinator answers): the
    /// id's next add, end or init waits for it ([`Broker::await_finishing`]),
    /// so the next transaction's data never precedes a marker of this one.
    pub(crate) fn finish_in_background(self: &Arc<Self>, markers: Markers, coordinator_epoch: i32) {
        let Ok(shard) = self.txn_shard_of(&markers.transactional_id) else { return };
        let (done, waiting) = tokio::sync::watch::channel(false);
        let id = markers.transactional_id.clone();
        shard.finishing.lock().expect("finishing ends").insert(id.clone(), waiting.clone());
        let broker = self.clone();
        tokio::spawn(async move {
            if let Err(e) = broker.finish_transaction(&markers, coordinator_epoch).await {
                // Left `Prepare*`: the expiry loop tries again.
                tracing::info!(id, error = %e, "finishing a transaction: will retry");
            }
            let mut finishing = shard.finishing.lock().expect("finishing ends");
            if finishing.get(&id).is_some_and(|w| w.same_channel(&waiting)) {
                finishing.remove(&id);
            }
            drop(finishing);
            let _ = done.send(true);
        });
    }

    /// Waits (at most `FINISH_WAIT`) for the end of `id` being finished in
    /// the background, if there is one.
    pub(crate) async fn await_finishing(&self, id: &str) {
        let Some(mut finishing) = self.txn_shard_of(id).ok().and_then(|shard| shard.finishing(id)) else { return };
        // Gone (the task ended) counts as done.
        let _ = tokio::time::timeout(FINISH_WAIT, finishing.wait_for(|done| *done)).await;
    }

    /// Writes `markers` to every partition in them, and ends the
    /// transaction in every group whose offsets it committed: here, or at
    /// the partitions' leaders and the groups' coordinators. A partition
    /// whose topic was deleted needs none.
    async fn write_markers(self: &Arc<Self>, markers: &Markers, coordinator_epoch: i32) -> Result<(), String> {
        let mut remote: BTreeMap<RemoteLeader, WriteTxnMarkersRequest> = BTreeMap::new();
        let empty = || WriteTxnMarkersRequest { coordinator_epoch, markers: Vec::new(), groups: Vec::new() };
        let mut failures = Vec::new();
        // Every partition's marker at once: each waits for its own fsync
        // and in-sync replicas.
        let mut writing = tokio::task::JoinSet::new();
        for (topic, partition) in &markers.partitions {
            let marker = TxnMarker {
                producer_id: markers.producer_id,
                producer_epoch: markers.producer_epoch,
                commit: markers.commit,
                topic: topic.clone(),
                partition: *partition,
            };
            match self.remote_leader(topic, *partition) {
                Ok(None) => {
                    let broker = self.clone();
                    writing.spawn(async move {
                        let written = broker.write_marker_here(&marker, coordinator_epoch).await;
                        written.map_err(|e| format!("{}-{}: {e}", marker.topic, marker.partition))
                    });
                }
                Ok(Some(leader)) => remote.entry(leader).or_insert_with(empty).markers.push(marker),
                Err(PartitionError::UnknownTopic { .. } | PartitionError::UnknownPartition { .. }) => {}
                Err(e) => failures.push(e.to_string()),
            }
        }
        for group in &markers.groups {
            let marker =
                GroupTxnMarker { group: group.clone(), producer_id: markers.producer_id, commit: markers.commit };
            match self.find_coordinator(group).await.map(|c| c.leader) {
                Ok(Some((node, _))) if node == self.config.node_id => {
                    let broker = self.clone();
                    writing.spawn(async move {
                        let ended =
                            broker.end_group_transaction(&marker.group, marker.producer_id, marker.commit).await;
                        ended.map_err(|e| format!("group '{}': {e}", marker.group))
                    });
                }
                Ok(Some(leader)) => remote.entry(leader).or_insert_with(empty).groups.push(marker),
                Ok(None) => failures.push(format!("group '{group}': its coordinator is offline")),
                Err(e) => failures.push(format!("group '{group}': {e}")),
            }
        }
        for ((node, address), request) in remote {
            let broker = self.clone();
            writing.spawn(async move {
                let answer = broker.replica_link.write_txn_markers(node, address, request).await;
                let answer = answer.map_err(|e| format!("broker {node}: {e}"))?;
                let refused: Vec<String> = answer
                    .results
                    .into_iter()
                    .filter(|r| !matches!(r.error, ErrorCode::None | ErrorCode::UnknownTopic))
                    .map(|r| format!("{}-{} at broker {node}: {}: {}", r.topic, r.partition, r.error, r.message))
                    .chain(
                        answer
                            .group_results
                            .into_iter()
                            .filter(|r| r.error != ErrorCode::None)
                            .map(|r| format!("group '{}' at broker {node}: {}: {}", r.group, r.error, r.message)),
                    )
                    .collect();
                match refused.is_empty() {
                    true => Ok(()),
                    false => Err(refused.join("; ")),
                }
            });
        }
        while let Some(done) = writing.join_next().await {
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failures.push(e),
                Err(e) => failures.push(format!("writing a marker failed: {e}")),
            }
        }
        match failures.is_empty() {
            true => Ok(()),
            false => Err(failures.join("; ")),
        }
    }

    /// Appends one marker to a partition led here and waits for the
    /// in-sync replicas. A marker already there (a coordinator writing a
    /// half-done end again) is not written twice: the partition has no
    /// open transaction of the producer and knows its epoch.
    pub(crate) async fn write_marker_here(
        self: &Arc<Self>,
        marker: &TxnMarker,
        coordinator_epoch: i32,
    ) -> Result<(), ProduceError> {
        let (_, partition) = self.partition(&marker.topic, marker.partition)?;
        let producer = marker.producer_id;
        // Written once: a partition that saw the marker's epoch has it
        // already, or holds the producer's next transaction (whose data is
        // of that epoch, and which a repeated marker — a request delayed in
        // the network, a stale retry — must not end).
        if partition.log.producer_epoch(producer).is_some_and(|e| e >= marker.producer_epoch) {
            return Ok(());
        }
        let kind = if marker.commit { Marker::Commit } else { Marker::Abort };
        let batch = marker_batch(producer, marker.producer_epoch, kind, coordinator_epoch, now_ms());
        let (info, epoch) = partition.append_as_leader(&marker.topic, &batch, true)?;
        self.confirm(&partition, info.last_offset + 1, epoch).await
    }

    /// Once a second: aborts timed-out transactions, finishes ends left
    /// half done (a previous coordinator's, or one whose markers failed),
    /// forgets ids idle past their expiration.
    async fn expire_transactions(self: &Arc<Self>) {
        let shards: Vec<Arc<TxnShard>> = self.txn_shards.shards().values().cloned().collect();
        for shard in shards {
            let (timed_out, pending, expired) = {
                let guard = shard.coordinator.lock().await;
                let Some(c) = guard.as_ref() else { continue };
                let now = now_ms().max(0) as u64;
                let timed_out: Vec<String> =
                    c.timed_out(now, &mut || -1).into_iter().map(|(t, _)| t.transactional_id).collect();
                // A fresh `Prepare*` is its end's to finish (in the
                // background); the loop takes over ends left half done.
                (timed_out, c.pending(now, FINISH_TAKEOVER_MS), c.expired_ids(now))
            };
            for id in timed_out {
                let aborted = self
                    .with_txn(&id, |c, now, fresh| {
                        let found = c.timed_out(now, fresh).into_iter().find(|(t, _)| t.transactional_id == id);
                        Ok(match found {
                            Some((t, m)) => Decided::store(vec![t], Some(m)),
                            None => Decided::store(Vec::new(), None),
                        })
                    })
                    .await;
                match aborted {
                    Ok((Some(markers), epoch)) => {
                        tracing::info!(id, "transaction timed out: aborting it");
                        if let Err(e) = self.finish_transaction(&markers, epoch).await {
                            tracing::info!(id, error = %e, "aborting a timed-out transaction: will retry");
                        }
                    }
                    Ok((None, _)) => {}
                    Err(e) => tracing::debug!(id, error = %e, "timing out a transaction failed"),
                }
            }
            for markers in pending {
                if shard.finishing(&markers.transactional_id).is_some() {
                    continue;
                }
                if let Err(e) = self.finish_transaction(&markers, shard.epoch).await {
                    tracing::debug!(id = markers.transactional_id, error = %e, "finishing a transaction: will retry");
                }
            }
            for id in expired {
                let forgotten = self
                    .with_txn(&id, |c, now, _| {
                        let still = c.expired_ids(now).contains(&id);
                        let changes = if still { vec![Err(id.clone())] } else { Vec::new() };
                        Ok(Decided { changes, answer: still, durable: true })
                    })
                    .await;
                if let Ok((true, _)) = forgotten {
                    tracing::info!(id, "transactional id expired");
                }
            }
        }
    }
}

/// A wire error from a coordinator reached by a partition's leader.
pub(crate) fn at_coordinator(id: &str, coordinator: u32, error: WireError) -> TxnOpError {
    TxnOpError::AtCoordinator { id: id.to_owned(), coordinator, error }
}
