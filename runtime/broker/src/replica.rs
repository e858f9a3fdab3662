//! Partition replication: the async shell around the plain rules of
//! `quiver-replication`. A single node's partitions are replicas too: each
//! leads with an ISR of one, so its high watermark is its log end.
//!
//! Each partition this broker holds has a [`Replica`]: its role (leader,
//! follower of a given leader and epoch, offline), its leader-epoch history
//! (persisted next to the log, so truncation survives restarts), and its
//! high watermark. The metadata image decides roles (`Broker::apply_roles`).
//!
//! - A **leader** appends in its epoch, feeds appends and followers' fetches
//!   to a [`PartitionLeader`], and moves the high watermark to what the whole
//!   ISR holds; ISR changes it proposes are written to the metadata log
//!   (`AlterIsr`) and take effect when the image comes back with them.
//! - A **follower** runs one task per partition around a
//!   [`PartitionFollower`], which decides: it first reconciles its log with
//!   the leader (asking where its epochs end, then cutting the log), then
//!   copies the leader's batches as they are (offsets and epochs kept),
//!   fsyncs, and fetches again from its new end: a fetch offset is a durable
//!   promise, so an `acks=all` write answered at the high watermark is on
//!   disk on every ISR member.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use quiver_controller::{Command, Outcome, PartitionImage, WriteError};
use quiver_protocol::batch::{self, BatchHeader};
use quiver_protocol::messages::*;
use quiver_protocol::{ErrorCode, WireError};
use quiver_replication::{
    Action, AppendBatch, Batch, EpochHistory, Failure, FetchAnswer, LeaderConfig, NodeId, PartitionFollower,
    PartitionLeader, Request,
};

use crate::broker::Broker;
use crate::errors::{PartitionError, ReplicaError, blocking_as};
use crate::partition::{Partition, ReplicaLink, Role, State, Topic};
use crate::wire::code_of_replica;

/// How long a leader holds a follower's fetch when it has nothing new.
const FOLLOWER_WAIT_MS: u32 = 500;
/// Bound on one follower fetch's records.
const FOLLOWER_FETCH_BYTES: u32 = 4 * 1024 * 1024;
/// How often leaders look for followers that fell out of sync.
const ISR_TICK: Duration = Duration::from_millis(200);
/// Pause after a failed follower fetch.
const RETRY: Duration = Duration::from_millis(100);

/// What [`Broker::apply_role`] decided for a partition.
enum RoleChange {
    None,
    /// Start copying from this leader in this epoch.
    Follow(NodeId, i32),
    /// The high watermark moved (an ISR shrank): wake waiters.
    HighWatermark,
}

impl Broker {
    /// The replication rules' clock: milliseconds since this broker
    /// started, monotonic (a wall-clock step must not make a follower look
    /// lagging, or hide one that is).
    pub(crate) fn clock_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Brings every local replica's role in line with the image.
    pub(crate) fn apply_roles(self: &Arc<Self>, image: &quiver_controller::ClusterImage) {
        for topic in self.sorted_topics() {
            let Some(t) = image.topics.get(&topic.record.name) else { continue };
            if topic.record.cluster_id != Some(t.id) {
                continue;
            }
            let min_isr = topic.config.min_insync_replicas;
            for p in topic.local() {
                let Some(pi) = t.partitions.get(p.id as usize) else { continue };
                match self.apply_role(p, pi, min_isr) {
                    // `publish` woke the partition's waiters.
                    RoleChange::None | RoleChange::HighWatermark => {}
                    RoleChange::Follow(leader, epoch) => {
                        // Its long polls answer "not the leader" now.
                        p.waiters.wake();
                        tokio::spawn(self.clone().follow(topic.clone(), p.clone(), leader, epoch));
                    }
                }
            }
        }
    }

    fn apply_role(&self, p: &Partition, pi: &PartitionImage, min_isr: usize) -> RoleChange {
        let me = self.config.node_id;
        let mut state = p.replica.state();
        match pi.leader {
            Some(l) if l == me => {
                if let Role::Leader { leader, partition_epoch, .. } = &mut state.role
                    && leader.epoch() == pi.leader_epoch
                {
                    *partition_epoch = pi.partition_epoch;
                    if !leader.has_replicas(&pi.replicas) {
                        leader.set_replicas(&pi.replicas, self.clock_ms());
                    }
                    let isr: BTreeSet<NodeId> = pi.isr.iter().copied().collect();
                    if *leader.isr() != isr && p.publish(leader.apply_isr(isr)) {
                        return RoleChange::HighWatermark;
                    }
                    return RoleChange::None;
                }
                // Leader in a new epoch: everything from the log end on is
                // written in it.
                let log_end = p.log.log_end_offset();
                state.history.assign(pi.leader_epoch, log_end);
                if let Err(e) = p.replica.persist(&state.history) {
                    tracing::error!(partition = p.id, error = %e, "cannot record the leader epoch; not leading");
                    state.role = Role::Unassigned;
                    return RoleChange::None;
                }
                let config =
                    LeaderConfig { lag_time_max_ms: self.config.replica_lag_time_max_ms, min_insync_replicas: min_isr };
                let hw = p.replica.high_watermark.load(Ordering::Acquire);
                let mut leader = PartitionLeader::new(
                    me,
                    pi.leader_epoch,
                    &pi.replicas,
                    pi.isr.iter().copied(),
                    config,
                    self.clock_ms(),
                )
                .with_log(log_end, hw);
                let moved = leader.on_append(log_end);
                tracing::info!(partition = p.id, epoch = pi.leader_epoch, log_end, "leading");
                state.role = Role::Leader { leader, partition_epoch: pi.partition_epoch, leading_from: log_end };
                drop(state);
                let moved = p.publish(moved);
                // Writes waiting in an earlier epoch answer now (`publish`
                // woke them if the high watermark moved).
                if !moved {
                    p.waiters.wake();
                }
                if moved { RoleChange::HighWatermark } else { RoleChange::None }
            }
            Some(l) => {
                if state.ensure_follows(l, pi.leader_epoch).is_ok() {
                    return RoleChange::None;
                }
                state.role = Role::Follower { leader: l, epoch: pi.leader_epoch };
                RoleChange::Follow(l, pi.leader_epoch)
            }
            None => {
                state.role = Role::Offline;
                drop(state);
                p.waiters.wake();
                RoleChange::None
            }
        }
    }

    /// Leaders' periodic check for followers that stopped keeping up.
    pub(crate) async fn isr_ticks(self: Arc<Self>) {
        let mut tick = tokio::time::interval(ISR_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !self.shutting_down.load(Ordering::Relaxed) {
            tick.tick().await;
            let now = self.clock_ms();
            for topic in self.sorted_topics() {
                for p in topic.local() {
                    let proposal = {
                        let mut state = p.replica.state();
                        match &mut state.role {
                            Role::Leader { leader, partition_epoch, .. } => {
                                leader.tick(now).map(|isr| (leader.epoch(), *partition_epoch, isr))
                            }
                            _ => None,
                        }
                    };
                    if let Some((epoch, partition_epoch, isr)) = proposal {
                        tracing::info!(topic = %topic.record.name, partition = p.id, ?isr, "a follower fell behind: shrinking the ISR");
                        self.propose_isr(&topic, p, epoch, partition_epoch, isr);
                    }
                }
            }
        }
    }

    /// Writes an ISR change to the metadata log in the background; a refusal
    /// drops the proposal so that it is made again from the committed ISR.
    fn propose_isr(&self, topic: &Topic, p: &Arc<Partition>, epoch: i32, partition_epoch: i32, isr: BTreeSet<NodeId>) {
        let controller = self.controller.clone();
        let command = Command::AlterIsr {
            topic: topic.record.name.clone(),
            partition: p.id,
            leader: self.config.node_id,
            partition_epoch,
            isr: isr.iter().copied().collect(),
        };
        let p = p.clone();
        tokio::spawn(async move {
            match controller.write(command).await {
                // Committed as proposed: the image brings it back.
                Ok(Outcome::Partition(committed)) if committed.isr.iter().copied().collect::<BTreeSet<_>>() == isr => {}
                outcome => {
                    // Refused, lost, or committed without a member the
                    // controller still holds fenced (it registers again
                    // shortly): propose again later.
                    let reason = match outcome {
                        Err(WriteError::Refused(r)) => r.message,
                        Err(e) => e.to_string(),
                        Ok(Outcome::Partition(committed)) => {
                            format!("the controller kept ISR {:?} (a proposed member is fenced)", committed.isr)
                        }
                        Ok(other) => format!("{other:?}"),
                    };
                    tracing::info!(partition = p.id, %reason, "ISR change not committed as proposed");
                    if let Role::Leader { leader, .. } = &mut p.replica.state().role
                        && leader.epoch() == epoch
                        && leader.pending_isr() == Some(&isr)
                    {
                        leader.abandon_proposal();
                    }
                }
            }
        });
    }

    /// On a leader: serves a follower's fetch, holding it up to its wait
    /// when there is nothing new. The wait looks at log ends only; the read
    /// runs on a blocking thread once there is something to send.
    pub(crate) async fn replica_fetch(
        self: &Arc<Self>,
        r: ReplicaFetchRequest,
    ) -> Result<ReplicaFetchResponse, ReplicaError> {
        let mut first = true;
        let held = self.held_partitions(r.partitions.iter().map(|p| (p.topic.as_str(), p.partition)));
        self.poll_appends(self.fetch_wait(Duration::from_millis(r.max_wait_ms.into())), &held, |last| {
            if self.shutting_down.load(Ordering::Relaxed) {
                // A leader that is shutting down refuses fetches: an empty
                // answer at once would have its followers ask again at
                // once, in a loop that never waits.
                return Some(Err(ReplicaError::ShuttingDown));
            }
            let (_, ready) = self.read_replica_partitions(&r, std::mem::take(&mut first), false);
            (ready || last).then_some(Ok(()))
        })
        .await?;
        let broker = self.clone();
        let partitions =
            blocking_as(move || Ok::<_, ReplicaError>(broker.read_replica_partitions(&r, false, true).0)).await?;
        Ok(ReplicaFetchResponse { partitions })
    }

    /// Reads every partition of a follower fetch (only if `read`: else it
    /// just looks whether there is anything to read); `register` feeds the
    /// follower's position to the leader state (once per request). Returns
    /// the results and whether any has records, an answer or an error.
    fn read_replica_partitions(
        self: &Arc<Self>,
        r: &ReplicaFetchRequest,
        register: bool,
        read: bool,
    ) -> (Vec<ReplicaFetchResult>, bool) {
        let mut remaining = r.max_bytes as usize;
        let mut ready = false;
        let results = r
            .partitions
            .iter()
            .map(|fp| {
                let mut result = ReplicaFetchResult {
                    topic: fp.topic.clone(),
                    partition: fp.partition,
                    error: ErrorCode::None,
                    message: String::new(),
                    high_watermark: -1,
                    log_start_offset: -1,
                    epoch_end_epoch: -1,
                    epoch_end_offset: -1,
                    records: Bytes::new(),
                };
                let found = self.read_replica_partition(r.replica_id, fp, register, read, remaining, &mut result);
                match found {
                    // Records there, not read (a look only).
                    Ok(None) => ready = true,
                    Ok(Some(records)) => {
                        remaining = remaining.saturating_sub(records.len());
                        ready |= !records.is_empty() || fp.ask_epoch >= 0;
                        result.records = records;
                    }
                    Err(e) => {
                        ready = true;
                        (result.error, result.message) = (code_of_replica(&e), e.to_string());
                    }
                }
                result
            })
            .collect();
        (results, ready)
    }

    fn read_replica_partition(
        self: &Arc<Self>,
        replica: NodeId,
        fp: &ReplicaFetchPartition,
        register: bool,
        read: bool,
        remaining: usize,
        result: &mut ReplicaFetchResult,
    ) -> Result<Option<Bytes>, ReplicaError> {
        let me = self.config.node_id;
        let name = &fp.topic;
        let topic = self.topic(name).ok_or_else(|| PartitionError::UnknownTopic { topic: name.clone() })?;
        let p = self.held_partition(&topic, fp.partition)?;
        let log_end = p.log.log_end_offset();
        let proposal = {
            let mut state = p.replica.state();
            let State { role, history } = &mut *state;
            let Role::Leader { leader, partition_epoch, .. } = role else {
                return Err(ReplicaError::NotLeading { me, topic: name.clone(), partition: fp.partition });
            };
            if fp.leader_epoch != leader.epoch() {
                return Err(ReplicaError::EpochMismatch {
                    me,
                    topic: name.clone(),
                    partition: fp.partition,
                    theirs: fp.leader_epoch,
                    mine: leader.epoch(),
                });
            }
            result.high_watermark = leader.high_watermark();
            result.log_start_offset = p.log.log_start_offset();
            if fp.ask_epoch >= 0 {
                let (epoch, end) = history.end_offset_for(fp.ask_epoch, log_end).unwrap_or((-1, -1));
                (result.epoch_end_epoch, result.epoch_end_offset) = (epoch, end);
                return Ok(Some(Bytes::new()));
            }
            if fp.fetch_offset > log_end {
                return Err(ReplicaError::PastLogEnd {
                    topic: name.clone(),
                    partition: fp.partition,
                    offset: fp.fetch_offset,
                    log_end,
                });
            }
            if register {
                let outcome = leader.on_fetch(replica, fp.fetch_offset, self.clock_ms());
                if let Some(hw) = outcome.high_watermark {
                    p.publish(Some(hw));
                    result.high_watermark = hw;
                }
                outcome.propose_isr.map(|isr| (leader.epoch(), *partition_epoch, isr))
            } else {
                None
            }
        };
        if let Some((epoch, partition_epoch, isr)) = proposal {
            tracing::info!(topic = %name, partition = fp.partition, replica, "a follower caught up: growing the ISR");
            self.propose_isr(&topic, &p, epoch, partition_epoch, isr);
        }
        if fp.fetch_offset == log_end || remaining == 0 {
            return Ok(Some(Bytes::new()));
        }
        if !read {
            return Ok(None);
        }
        let limit = remaining.max(1);
        Ok(Some(p.log.read(fp.fetch_offset, limit, log_end)?))
    }

    /// On a follower: copies `p` from `leader` for as long as the image says
    /// so (until the role changes or the topic is gone). The decisions are
    /// the [`PartitionFollower`]'s; this loop carries them out (requests over
    /// the `ReplicaLink`, log changes under the replica lock on a blocking
    /// thread) and reports back how each went.
    async fn follow(self: Arc<Self>, topic: Arc<Topic>, p: Arc<Partition>, leader: NodeId, epoch: i32) {
        let name = topic.record.name.clone();
        let link = self.replica_link.clone();
        tracing::info!(topic = %name, partition = p.id, leader, epoch, "following");
        let mut follower = PartitionFollower::<Bytes>::new(leader, epoch, RETRY.as_millis() as u64);
        // The follower's clock: milliseconds since this task started.
        let origin = tokio::time::Instant::now();
        let clock_ms = move || origin.elapsed().as_millis() as u64;
        // Until the topic is gone or this replica moved away.
        let current = |b: &Broker| b.topic(&name).and_then(|t| t.held(p.id)).is_some_and(|q| Arc::ptr_eq(&q, &p));
        while p.replica.follows(leader, epoch) && current(&self) && !self.shutting_down.load(Ordering::Relaxed) {
            let address = self.controller.image().borrow().brokers.get(&leader).map(|b| b.address.clone());
            let Some(address) = address else {
                tokio::time::sleep(RETRY).await;
                continue;
            };
            let action = {
                let state = p.replica.state();
                follower.poll(clock_ms(), p.log.log_end_offset(), &state.history)
            };
            let upstream = Upstream { link: &*link, name: &name, p: &p, leader, address, epoch };
            let done: Result<(), ReplicaError> = match action {
                Action::Send(Request::AskEpoch { epoch: asked }) => {
                    match self.fetch_answer(&upstream, asked, p.log.log_end_offset(), 0).await {
                        Ok(r) if r.error == ErrorCode::None => {
                            let answer = (r.epoch_end_epoch >= 0).then_some((r.epoch_end_epoch, r.epoch_end_offset));
                            let state = p.replica.state();
                            follower.on_epoch_answer(asked, answer, p.log.log_end_offset(), &state.history);
                            Ok(())
                        }
                        Ok(r) => Err(ReplicaError::Leader(WireError::new(r.error, r.message))),
                        Err(e) => Err(e),
                    }
                }
                Action::Send(Request::Fetch { offset }) => {
                    match self.fetch_answer(&upstream, -1, offset, FOLLOWER_WAIT_MS).await.and_then(fetched) {
                        Ok(answer) => {
                            let refused = {
                                let state = p.replica.state();
                                let log_end = p.log.log_end_offset();
                                follower.on_fetch_answer(clock_ms(), offset, answer, log_end, &state.history)
                            };
                            if let Err(retry) = refused
                                && retry.warn
                            {
                                tracing::warn!(
                                    topic = %name, partition = p.id, leader, failures = retry.failures,
                                    error = %retry.cause, "cannot copy from the leader"
                                );
                            }
                            Ok(())
                        }
                        Err(e) => Err(e),
                    }
                }
                Action::TruncateTo { offset } => {
                    let (p, name) = (p.clone(), name.clone());
                    let truncated =
                        blocking_as(move || truncate_diverging_tail(&p, &name, offset, leader, epoch)).await;
                    truncated.map(|()| follower.on_applied())
                }
                Action::StartOver { offset } => {
                    let (p, name) = (p.clone(), name.clone());
                    let reset = blocking_as(move || start_over_at(&p, &name, offset, leader, epoch)).await;
                    reset.map(|()| follower.on_applied())
                }
                Action::Append { batches } => {
                    let p = p.clone();
                    let appended = blocking_as(move || append_copies(&p, batches, leader, epoch)).await;
                    appended.map(|()| follower.on_applied())
                }
                Action::SetHighWatermark { offset } => {
                    p.publish(Some(offset));
                    Ok(())
                }
                Action::WaitUntil { at_ms } => {
                    tokio::time::sleep_until(origin + Duration::from_millis(at_ms)).await;
                    Ok(())
                }
                // Every branch above reports its outcome before the next
                // poll; should one ever not, this task must not spin or
                // die: give the follower a fresh start.
                Action::AwaitOutcome => {
                    tracing::error!(topic = %name, partition = p.id, "follower polled before its last outcome");
                    follower = PartitionFollower::new(leader, epoch, RETRY.as_millis() as u64);
                    tokio::time::sleep(RETRY).await;
                    Ok(())
                }
            };
            if let Err(e) = done {
                let retry = follower.on_error(clock_ms(), failure(&e));
                if retry.warn {
                    tracing::warn!(
                        topic = %name, partition = p.id, leader, failures = retry.failures,
                        error = %e, "cannot copy from the leader"
                    );
                }
            }
        }
        tracing::debug!(topic = %name, partition = p.id, leader, epoch, "no longer following");
    }

    /// One ReplicaFetch of `up`'s partition from `fetch_offset` (with
    /// `ask_epoch >= 0`: only where that epoch ends), with a partition error
    /// left in the answer.
    async fn fetch_answer(
        &self,
        up: &Upstream<'_>,
        ask_epoch: i32,
        fetch_offset: i64,
        wait_ms: u32,
    ) -> Result<ReplicaFetchResult, ReplicaError> {
        let request = ReplicaFetchRequest {
            replica_id: self.config.node_id,
            max_wait_ms: wait_ms,
            max_bytes: FOLLOWER_FETCH_BYTES,
            partitions: vec![ReplicaFetchPartition {
                topic: up.name.to_string(),
                partition: up.p.id,
                leader_epoch: up.epoch,
                fetch_offset,
                ask_epoch,
            }],
        };
        let fetch = up.link.fetch(up.leader, up.address.clone(), request);
        // A fetch from a leader that died waits out the request timeout;
        // give up as soon as the image names another leader, so the new
        // leader's followers start copying (and acks=all writes complete)
        // right after a failover.
        let mut image = self.controller.image();
        tokio::pin!(fetch);
        let response = loop {
            let moved = {
                let image = image.borrow_and_update();
                image
                    .topics
                    .get(up.name)
                    .and_then(|t| t.partitions.get(up.p.id as usize))
                    .is_none_or(|pi| pi.leader != Some(up.leader) || pi.leader_epoch != up.epoch)
            };
            if moved {
                return Err(ReplicaError::LeaderMoved { topic: up.name.to_owned(), partition: up.p.id });
            }
            tokio::select! {
                r = &mut fetch => break r.map_err(ReplicaError::Leader)?,
                changed = image.changed() => if changed.is_err() { break fetch.await.map_err(ReplicaError::Leader)? },
            }
        };
        response.partitions.into_iter().next().ok_or(ReplicaError::EmptyAnswer)
    }
}

/// A follower's partition and the leader it copies from.
struct Upstream<'a> {
    link: &'a dyn ReplicaLink,
    name: &'a str,
    p: &'a Arc<Partition>,
    leader: NodeId,
    address: String,
    epoch: i32,
}

/// What the follower makes of a fetch result: the leader's batches (headers
/// read; CRCs are checked right before the append) or "out of range" with
/// the leader's log start; any other partition error is an `Err`.
fn fetched(result: ReplicaFetchResult) -> Result<FetchAnswer<Bytes>, ReplicaError> {
    match result.error {
        ErrorCode::None => {}
        ErrorCode::OffsetOutOfRange => {
            return Ok(FetchAnswer::OffsetOutOfRange { leader_log_start: result.log_start_offset });
        }
        code => return Err(ReplicaError::Leader(WireError::new(code, result.message))),
    }
    let mut batches = Vec::new();
    for item in batch::Batches::new(result.records) {
        let (header, bytes): (BatchHeader, Bytes) = item.map_err(ReplicaError::CorruptCopy)?;
        let end_offset = header.base_offset + i64::from(header.last_offset_delta) + 1;
        batches.push(Batch { base_offset: header.base_offset, end_offset, epoch: header.leader_epoch, data: bytes });
    }
    Ok(FetchAnswer::Batches { batches, high_watermark: result.high_watermark })
}

/// The failures the follower tells apart.
fn failure(e: &ReplicaError) -> Failure {
    match e {
        ReplicaError::OutOfPlace { .. } => Failure::OffsetOutOfRange,
        ReplicaError::Leader(e) => match e.code {
            ErrorCode::OffsetOutOfRange => Failure::OffsetOutOfRange,
            ErrorCode::FencedLeaderEpoch => Failure::FencedLeaderEpoch,
            _ => Failure::Other,
        },
        _ => Failure::Other,
    }
}

/// Cuts this follower's log at `end`, where it stops agreeing with the
/// leader's, while it still follows `leader` in `epoch`.
fn truncate_diverging_tail(
    p: &Partition,
    name: &str,
    end: i64,
    leader: NodeId,
    epoch: i32,
) -> Result<(), ReplicaError> {
    let mut state = p.replica.state();
    state.ensure_follows(leader, epoch)?;
    let before = p.log.log_end_offset();
    let after = p.log.truncate_to(end).map_err(ReplicaError::Storage)?;
    state.history.truncate(after);
    p.replica.high_watermark.fetch_min(after, Ordering::AcqRel);
    p.replica.persist(&state.history).map_err(ReplicaError::Storage)?;
    if after < before {
        tracing::warn!(topic = %name, partition = p.id, before, after, "truncated a diverging tail");
    }
    Ok(())
}

/// The leader's log now starts past this replica's end (retention removed
/// what it would have fetched): empties the log and goes on from the
/// leader's start.
fn start_over_at(p: &Partition, name: &str, start: i64, leader: NodeId, epoch: i32) -> Result<(), ReplicaError> {
    let mut state = p.replica.state();
    state.ensure_follows(leader, epoch)?;
    let end = p.log.log_end_offset();
    p.log.reset_to(start).map_err(ReplicaError::Storage)?;
    state.history = EpochHistory::default();
    p.replica.persist(&state.history).map_err(ReplicaError::Storage)?;
    tracing::warn!(
        topic = %name, partition = p.id, end, start,
        "the leader's log starts past this replica's end: starting over there"
    );
    Ok(())
}

/// Appends a leader's batches as they are (offsets and epochs kept), then
/// fsyncs them. Every CRC is checked before anything is appended (a corrupt
/// batch must not leave the ones before it appended and unflushed: the next
/// fetch offset would promise them). Each batch is appended under the
/// replica lock, only while this replica still follows `leader` in `epoch`
/// and only at or past the log end (a compacted leader's log has holes; the
/// follower checked the offsets against the end
/// it was told; this is the check right before the write). A batch that
/// starts an epoch has the epoch history written first.
fn append_copies(
    p: &Partition,
    copies: Vec<AppendBatch<Bytes>>,
    leader: NodeId,
    epoch: i32,
) -> Result<(), ReplicaError> {
    for copy in &copies {
        batch::verify_crc(&copy.batch.data).map_err(ReplicaError::CorruptCopy)?;
    }
    let mut end = p.log.log_end_offset();
    for AppendBatch { batch: copied, starts_epoch } in copies {
        let mut state = p.replica.state();
        state.ensure_follows(leader, epoch)?;
        end = p.log.log_end_offset();
        if copied.base_offset < end {
            return Err(ReplicaError::OutOfPlace { base_offset: copied.base_offset, log_end: end });
        }
        if starts_epoch {
            state.history.assign(copied.epoch, copied.base_offset);
            p.replica.persist(&state.history).map_err(ReplicaError::Storage)?;
        }
        let info = p.log.append_copy(&copied.data, copied.epoch).map_err(ReplicaError::Append)?;
        end = info.last_offset + 1;
    }
    p.log.sync_to(end).map_err(ReplicaError::Storage)
}
