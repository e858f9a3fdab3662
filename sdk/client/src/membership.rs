//! A consumer's group membership (KIP-848 from the member's side).
//!
//! A background task heartbeats to the group's coordinator: it joins with
//! the subscription, reports the partitions the consumer owns, and keeps
//! the assignment the coordinator answers. The consumer applies that
//! assignment in `poll` ([`Consumer::reconcile`]), on its own task, so the
//! application's records and its rebalance listener never race:
//!
//! - partitions taken away are revoked first: their positions committed
//!   (with auto-commit), the listener told, fetching stopped, and only then
//!   reported as given up — so the coordinator hands them to another member
//!   only once this one stopped reading them;
//! - partitions added start at the group's committed offset, or where
//!   `auto_offset_reset` says;
//! - a fenced member (its session ended, or its epoch is stale) drops every
//!   partition without committing (`on_lost`) before it joins again.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quiver_protocol::ErrorCode;
use quiver_protocol::messages::{CoordinatorKind, GroupHeartbeatRequest, GroupSubscription};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::connection::{CallError, Client};
use crate::consumer::{ConsumeError, Consumer, OffsetReset, OffsetSpec, TopicPartition};
use crate::groups::{broker_error, to_wire};

/// Pause after a heartbeat failed for a reason that may pass.
const HEARTBEAT_RETRY: Duration = Duration::from_millis(200);
/// How long `close` waits for the leave heartbeat.
const LEAVE_WITHIN: Duration = Duration::from_secs(10);
/// How many times a commit is sent again after the member's epoch moved
/// under it (the coordinator advanced it while the commit was on its way).
const COMMIT_ATTEMPTS: usize = 5;

/// What a consumer learns of its group's decisions, on the consumer's own
/// task, inside `poll` (and `close`). `Send + Sync`, so that a consumer
/// (and the futures of its methods) can go to any task.
pub trait RebalanceListener: Send + Sync {
    /// Partitions given to this consumer; their positions are set.
    fn on_assigned(&mut self, _partitions: &[(String, u32)]) {}
    /// Partitions taken away in a rebalance; with auto-commit their
    /// positions were committed just before.
    fn on_revoked(&mut self, _partitions: &[(String, u32)]) {}
    /// Partitions lost: the member was fenced, another member may read them
    /// already, and nothing was committed. By default the same as revoked.
    fn on_lost(&mut self, partitions: &[(String, u32)]) {
        self.on_revoked(partitions)
    }
}

/// The state the heartbeat task and the consumer share.
#[derive(Default)]
struct Shared {
    member_id: String,
    epoch: i32,
    /// The coordinator's last answer (`None` before the first).
    assignment: Option<BTreeSet<TopicPartition>>,
    /// What the consumer owns, reported by every heartbeat.
    owned: BTreeSet<TopicPartition>,
    /// Fenced: the consumer drops everything, then the task joins again.
    lost: Option<String>,
    /// A refusal the member cannot get past (bad subscription, instance
    /// id in use): `poll` returns it.
    fatal: Option<quiver_protocol::WireError>,
    /// `close` asked to leave with this epoch (-1, or -2 for a static
    /// member).
    leave: Option<i32>,
}

/// A consumer's membership of one group.
pub(crate) struct Membership {
    pub(crate) group: String,
    shared: Arc<Mutex<Shared>>,
    /// Wakes the heartbeat task: something to report.
    report: Arc<Notify>,
    /// Wakes the consumer: the assignment changed.
    changed: Arc<Notify>,
    task: JoinHandle<()>,
    /// The partitions the consumer owns (it has positions for these).
    pub(crate) owned: BTreeSet<TopicPartition>,
    listener: Option<Box<dyn RebalanceListener>>,
    last_commit: Instant,
    auto_commit: Option<JoinHandle<Result<(), ConsumeError>>>,
}

impl Membership {
    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().expect("membership lock")
    }

    /// Tells the heartbeat task what the consumer owns now.
    fn report_owned(&self) {
        self.shared().owned = self.owned.clone();
        self.report.notify_one();
    }

    /// The member's id and epoch, for a commit.
    fn identity(&self) -> (String, i32) {
        let s = self.shared();
        (s.member_id.clone(), s.epoch)
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        // Without `close` the member does not leave: its session ends at
        // the coordinator, as after a crash.
        self.task.abort();
    }
}

impl Consumer {
    /// Joins `group` and consumes the named topics with it: the group's
    /// coordinator assigns partitions among its members.
    pub async fn subscribe(&mut self, group: &str, topics: &[&str]) -> Result<(), ConsumeError> {
        let subscription =
            GroupSubscription { topics: topics.iter().map(|t| t.to_string()).collect(), pattern: String::new() };
        self.join(group, subscription).await
    }

    /// Joins `group` and consumes every topic whose whole name matches
    /// `pattern` (a regular expression), topics created later included.
    pub async fn subscribe_pattern(&mut self, group: &str, pattern: &str) -> Result<(), ConsumeError> {
        self.join(group, GroupSubscription { topics: Vec::new(), pattern: pattern.to_owned() }).await
    }

    /// Called on this consumer's task inside `poll` when partitions are
    /// assigned, revoked or lost.
    pub fn set_rebalance_listener(&mut self, listener: impl RebalanceListener + 'static) {
        if let Some(m) = &mut self.membership {
            m.listener = Some(Box::new(listener));
        } else {
            self.pending_listener = Some(Box::new(listener));
        }
    }

    async fn join(&mut self, group: &str, subscription: GroupSubscription) -> Result<(), ConsumeError> {
        if self.membership.is_some() {
            return Err(ConsumeError::Usage("this consumer is subscribed to a group already".into()));
        }
        if !self.positions.is_empty() {
            return Err(ConsumeError::Usage(
                "this consumer has partitions assigned by hand: a group consumer gets its partitions from the group"
                    .into(),
            ));
        }
        // Checks the group name, and creates the offsets topic on the
        // cluster's first group request.
        self.client.coordinator_partition(CoordinatorKind::Group, group).await.map_err(|e| group_error(group, e))?;
        let shared = Arc::new(Mutex::new(Shared::default()));
        let report = Arc::new(Notify::new());
        let changed = Arc::new(Notify::new());
        let task = tokio::spawn(heartbeats(
            self.client.clone(),
            group.to_owned(),
            self.config.instance_id.clone().unwrap_or_default(),
            subscription,
            shared.clone(),
            report.clone(),
            changed.clone(),
        ));
        self.membership = Some(Membership {
            group: group.to_owned(),
            shared,
            report,
            changed,
            task,
            owned: BTreeSet::new(),
            listener: self.pending_listener.take(),
            last_commit: Instant::now(),
            auto_commit: None,
        });
        Ok(())
    }

    /// The group this consumer is subscribed with, its member id and
    /// member epoch.
    pub fn group_metadata(&self) -> Option<(String, String, i32)> {
        let m = self.membership.as_ref()?;
        let (id, epoch) = m.identity();
        Some((m.group.clone(), id, epoch))
    }

    /// Waits (up to `wait`) for the group to change this consumer's
    /// assignment; a consumer in no group with everything paused just
    /// waits.
    pub(crate) async fn wait_for_assignment(&self, wait: Duration) {
        match &self.membership {
            Some(m) => {
                let _ = tokio::time::timeout(wait, m.changed.notified()).await;
            }
            None if !self.paused.is_empty() => tokio::time::sleep(wait).await,
            None => {}
        }
    }

    /// Applies the coordinator's latest answer: revocations, a lost
    /// membership, new partitions (see the module docs).
    pub(crate) async fn reconcile(&mut self) -> Result<(), ConsumeError> {
        let Some(m) = &mut self.membership else { return Ok(()) };
        let (lost, fatal, target) = {
            let s = m.shared();
            (s.lost.clone(), s.fatal.clone(), s.assignment.clone())
        };
        if let Some(error) = fatal {
            return Err(ConsumeError::Group { group: m.group.clone(), error });
        }
        if let Some(reason) = lost {
            let dropped: Vec<TopicPartition> = std::mem::take(&mut m.owned).into_iter().collect();
            tracing::warn!(group = %m.group, %reason, partitions = dropped.len(), "lost the group's partitions; joining again");
            for tp in &dropped {
                self.positions.remove(tp);
                self.paused.remove(tp);
            }
            if let Some(l) = &mut m.listener {
                l.on_lost(&dropped);
            }
            m.shared().lost = None;
            m.report_owned();
            return Ok(());
        }
        let Some(target) = target else { return Ok(()) };
        let revoked: Vec<TopicPartition> = m.owned.difference(&target).cloned().collect();
        if !revoked.is_empty() {
            if self.config.enable_auto_commit {
                self.settle_auto_commit().await;
                let offsets = self.offsets_of(&revoked);
                if let Err(e) = self.commit_offsets(offsets).await {
                    tracing::warn!(error = %e, "committing revoked partitions failed");
                }
            }
            let m = self.membership.as_mut().expect("membership");
            if let Some(l) = &mut m.listener {
                l.on_revoked(&revoked);
            }
            for tp in &revoked {
                m.owned.remove(tp);
                self.positions.remove(tp);
                self.paused.remove(tp);
            }
            m.report_owned();
        }
        let m = self.membership.as_ref().expect("membership");
        let added: Vec<TopicPartition> = target.difference(&m.owned).cloned().collect();
        if added.is_empty() {
            return Ok(());
        }
        let group = m.group.clone();
        let committed =
            self.client.admin().group_offsets(&group, Some(added.clone())).await.map_err(|e| group_error(&group, e))?;
        for tp in &added {
            let found = committed.iter().find(|c| c.topic == tp.0 && c.partition == tp.1).map(|c| c.offset);
            let start = match (found, self.config.auto_offset_reset) {
                (Some(offset), _) => OffsetSpec::Offset(offset),
                (None, OffsetReset::Earliest) => OffsetSpec::Earliest,
                (None, OffsetReset::Latest) => OffsetSpec::Latest,
                (None, OffsetReset::None) => {
                    return Err(ConsumeError::NoOffset { group, topic: tp.0.clone(), partition: tp.1 });
                }
            };
            let offset = match start {
                OffsetSpec::Offset(o) => o,
                OffsetSpec::Earliest => self.lookup(&tp.0, tp.1, quiver_protocol::messages::OFFSET_EARLIEST).await?,
                _ => self.lookup(&tp.0, tp.1, quiver_protocol::messages::OFFSET_LATEST).await?,
            };
            self.positions.insert(tp.clone(), offset);
        }
        let m = self.membership.as_mut().expect("membership");
        m.owned.extend(added.iter().cloned());
        if let Some(l) = &mut m.listener {
            l.on_assigned(&added);
        }
        m.report_owned();
        Ok(())
    }

    /// Positions of `partitions` (those that have one).
    fn offsets_of(&self, partitions: &[TopicPartition]) -> Vec<(String, u32, i64)> {
        partitions.iter().filter_map(|tp| Some((tp.0.clone(), tp.1, *self.positions.get(tp)?))).collect()
    }

    /// Every owned partition's position: what the records `poll` returned
    /// so far reach.
    fn owned_offsets(&self) -> Vec<(String, u32, i64)> {
        match &self.membership {
            Some(m) => self.offsets_of(&m.owned.iter().cloned().collect::<Vec<_>>()),
            None => Vec::new(),
        }
    }

    /// Commits the positions of every record `poll` returned, and waits
    /// for the coordinator to store them.
    pub async fn commit(&mut self) -> Result<(), ConsumeError> {
        let offsets = self.owned_offsets();
        self.commit_offsets(offsets).await
    }

    /// Like [`Consumer::commit`], without waiting: the returned handle
    /// says how it went.
    pub fn commit_async(&mut self) -> Result<JoinHandle<Result<(), ConsumeError>>, ConsumeError> {
        let offsets = self.owned_offsets();
        let m = self.membership.as_ref().ok_or_else(not_in_group)?;
        let (client, group, shared) = (self.client.clone(), m.group.clone(), m.shared.clone());
        Ok(tokio::spawn(async move { commit_as_member(&client, &group, &shared, offsets).await }))
    }

    async fn commit_offsets(&self, offsets: Vec<(String, u32, i64)>) -> Result<(), ConsumeError> {
        let m = self.membership.as_ref().ok_or_else(not_in_group)?;
        commit_as_member(&self.client, &m.group, &m.shared, offsets).await
    }

    /// The group's committed offset for a partition.
    pub async fn committed(&self, topic: &str, partition: u32) -> Result<Option<i64>, ConsumeError> {
        let m = self.membership.as_ref().ok_or_else(not_in_group)?;
        let found = self
            .client
            .admin()
            .group_offsets(&m.group, Some(vec![(topic.to_owned(), partition)]))
            .await
            .map_err(|e| group_error(&m.group, e))?;
        Ok(found.first().map(|c| c.offset))
    }

    /// With auto-commit, starts a commit of the returned records' positions
    /// once the interval passed (one at a time).
    pub(crate) fn auto_commit_if_due(&mut self) {
        if !self.config.enable_auto_commit {
            return;
        }
        let interval = self.config.auto_commit_interval;
        let Some(m) = &self.membership else { return };
        if m.last_commit.elapsed() < interval || m.auto_commit.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let offsets = self.owned_offsets();
        let m = self.membership.as_mut().expect("membership");
        m.last_commit = Instant::now();
        if offsets.is_empty() {
            return;
        }
        let (client, group, shared) = (self.client.clone(), m.group.clone(), m.shared.clone());
        m.auto_commit = Some(tokio::spawn(async move {
            let done = commit_as_member(&client, &group, &shared, offsets).await;
            if let Err(e) = &done {
                tracing::warn!(error = %e, "auto-commit failed");
            }
            done
        }));
    }

    /// Waits for an auto-commit on its way: a later commit must not be
    /// overtaken by it (older positions stored last).
    async fn settle_auto_commit(&mut self) {
        let pending = self.membership.as_mut().and_then(|m| m.auto_commit.take());
        if let Some(pending) = pending {
            let _ = pending.await;
        }
    }

    /// Leaves the group: with auto-commit, commits the positions first; a
    /// static member leaves for a moment (its partitions wait for it for
    /// its session). Without `close` (a crash, a drop) the coordinator
    /// notices at the end of the session.
    pub async fn close(&mut self) -> Result<(), ConsumeError> {
        if self.membership.is_none() {
            return Ok(());
        }
        self.settle_auto_commit().await;
        let committed = match self.config.enable_auto_commit {
            true => self.commit().await,
            false => Ok(()),
        };
        let mut m = self.membership.take().expect("membership");
        let owned: Vec<TopicPartition> = m.owned.iter().cloned().collect();
        if let Some(l) = &mut m.listener {
            l.on_revoked(&owned);
        }
        for tp in &owned {
            self.positions.remove(tp);
        }
        let leave = if self.config.instance_id.is_some() { -2 } else { -1 };
        m.shared().leave = Some(leave);
        m.report.notify_one();
        let task = std::mem::replace(&mut m.task, tokio::spawn(async {}));
        let _ = tokio::time::timeout(LEAVE_WITHIN, task).await;
        committed
    }
}

fn not_in_group() -> ConsumeError {
    ConsumeError::Usage("this consumer is not subscribed to a group".into())
}

fn group_error(group: &str, e: CallError) -> ConsumeError {
    match e {
        CallError::Broker(error) => ConsumeError::Group { group: group.to_owned(), error },
        e => ConsumeError::Call(e),
    }
}

/// Commits as the member, at its current epoch; again when the epoch moved
/// meanwhile.
async fn commit_as_member(
    client: &Client,
    group: &str,
    shared: &Arc<Mutex<Shared>>,
    offsets: Vec<(String, u32, i64)>,
) -> Result<(), ConsumeError> {
    if offsets.is_empty() {
        return Ok(());
    }
    let mut attempt = 0;
    loop {
        let (member_id, epoch) = {
            let s = shared.lock().expect("membership lock");
            (s.member_id.clone(), s.epoch)
        };
        match crate::groups::commit(client, group, &member_id, epoch, offsets.clone()).await {
            Err(e)
                if attempt + 1 < COMMIT_ATTEMPTS
                    && broker_error(&e).is_some_and(|e| e.code == ErrorCode::FencedMemberEpoch) =>
            {
                attempt += 1;
                tokio::time::sleep(HEARTBEAT_RETRY).await;
            }
            done => return done.map_err(|e| group_error(group, e)),
        }
    }
}

/// The heartbeat task (see the module docs).
async fn heartbeats(
    client: Client,
    group: String,
    instance_id: String,
    subscription: GroupSubscription,
    shared: Arc<Mutex<Shared>>,
    report: Arc<Notify>,
    changed: Arc<Notify>,
) {
    loop {
        let request = {
            let s = shared.lock().expect("membership lock");
            if s.lost.is_some() {
                None
            } else {
                let epoch = s.leave.unwrap_or(s.epoch);
                Some((
                    GroupHeartbeatRequest {
                        group: group.clone(),
                        member_id: s.member_id.clone(),
                        instance_id: instance_id.clone(),
                        member_epoch: epoch,
                        subscription: (epoch == 0).then(|| subscription.clone()),
                        owned: Some(to_wire(s.owned.iter().cloned())),
                    },
                    s.leave.is_some(),
                ))
            }
        };
        // Lost: wait for the consumer to drop its partitions.
        let Some((request, leaving)) = request else {
            report.notified().await;
            continue;
        };
        let answer = client.group_call(&group, &request).await;
        if leaving {
            if let Err(e) = answer {
                tracing::debug!(group, error = %e, "leaving the group failed; the session will end it");
            }
            return;
        }
        match answer {
            Ok(a) => {
                let assignment: BTreeSet<TopicPartition> = a
                    .assignment
                    .into_iter()
                    .flat_map(|tp| tp.partitions.into_iter().map(move |p| (tp.topic.clone(), p)))
                    .collect();
                let moved = {
                    let mut s = shared.lock().expect("membership lock");
                    let moved = s.assignment.as_ref() != Some(&assignment);
                    s.member_id = a.member_id;
                    s.epoch = a.member_epoch;
                    s.assignment = Some(assignment);
                    moved
                };
                if moved {
                    changed.notify_one();
                }
                // Until the next heartbeat is due, or there is something to
                // report.
                let interval = Duration::from_millis(u64::from(a.heartbeat_interval_ms.max(50)));
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = report.notified() => {}
                }
            }
            Err(e) => match broker_error(&e).map(|e| e.code) {
                Some(ErrorCode::UnknownMember | ErrorCode::FencedMemberEpoch) => {
                    tracing::warn!(group, error = %e, "fenced by the group");
                    {
                        let mut s = shared.lock().expect("membership lock");
                        s.lost = Some(e.to_string());
                        s.epoch = 0;
                        s.assignment = Some(BTreeSet::new());
                    }
                    changed.notify_one();
                    continue;
                }
                Some(code) if !code.is_retriable() => {
                    let error = broker_error(&e).cloned().expect("broker error");
                    tracing::error!(group, %error, "the group refused this member");
                    shared.lock().expect("membership lock").fatal = Some(error);
                    changed.notify_one();
                    return;
                }
                _ => {
                    tracing::debug!(group, error = %e, "heartbeat failed; trying again");
                    tokio::time::sleep(HEARTBEAT_RETRY).await;
                    continue;
                }
            },
        }
    }
}
