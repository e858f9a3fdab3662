//! One consumer group's state and its rules (see the crate docs).

use std::collections::{BTreeMap, BTreeSet};

use crate::assignor::assignment_partitions;
use crate::share::ShareGroup;
use crate::{
    Assignment, CommitError, Fenced, GroupConfig, GroupError, GroupOverrides, Heartbeat, HeartbeatAnswer, JOIN_EPOCH,
    LEAVE_EPOCH, MemberId, STATIC_LEAVE_EPOCH, Subscription, TopicPartition,
};

/// Where a member is on its way to its target assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MemberState {
    /// Owns its target.
    Stable,
    /// Asked to give up partitions; waits for the member to confirm.
    Revoking,
    /// At the target epoch, waiting for partitions other members still own.
    Awaiting,
}

/// A member as the coordinator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: MemberId,
    pub instance_id: Option<String>,
    pub epoch: i32,
    pub previous_epoch: i32,
    pub subscription: Subscription,
    /// What it may own now.
    pub assigned: Assignment,
    /// What it was asked to give up and has not confirmed yet (it still
    /// owns these: nobody else gets them meanwhile).
    pub revoking: Assignment,
    pub state: MemberState,
    pub last_heartbeat_ms: u64,
    pub(crate) revoke_deadline_ms: u64,
    /// A static member that left with epoch -2: it keeps its assignment
    /// until its session ends.
    pub away: bool,
}

/// A committed offset.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Committed {
    /// The next offset to read.
    pub offset: i64,
    /// What the consumer attached (Kafka's commit metadata).
    pub metadata: String,
    /// When it was committed (the coordinator's wall clock, ms).
    pub at_ms: i64,
}

impl Member {
    /// A member that just joined (or was just replayed), owning nothing,
    /// its session starting at `now_ms`.
    pub(crate) fn new(id: MemberId, instance_id: Option<String>, subscription: Subscription, now_ms: u64) -> Member {
        Member {
            id,
            instance_id,
            epoch: 0,
            previous_epoch: -1,
            subscription,
            assigned: Assignment::new(),
            revoking: Assignment::new(),
            state: MemberState::Stable,
            last_heartbeat_ms: now_ms,
            revoke_deadline_ms: 0,
            away: false,
        }
    }
}

/// One group.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub(crate) name: String,
    /// The broker's defaults with the group's overrides.
    pub(crate) config: GroupConfig,
    pub(crate) defaults: GroupConfig,
    pub(crate) overrides: GroupOverrides,
    pub(crate) epoch: i32,
    pub(crate) target_epoch: i32,
    pub(crate) target: BTreeMap<MemberId, Assignment>,
    pub(crate) members: BTreeMap<MemberId, Member>,
    /// Partition counts of the topics the members subscribe to, as last
    /// seen.
    pub(crate) topics: BTreeMap<String, u32>,
    pub(crate) joined: u64,
    pub(crate) offsets: BTreeMap<TopicPartition, Committed>,
    /// Offsets committed inside open transactions, by producer id: they
    /// become the group's offsets when the transaction commits, and are
    /// dropped when it aborts.
    pub(crate) pending: BTreeMap<i64, BTreeMap<TopicPartition, Committed>>,
    /// A share group's members and partitions (queue semantics); `None`
    /// for a consumer group. A group is one kind for its whole life.
    pub(crate) share: Option<ShareGroup>,
}

impl Group {
    pub fn new(name: &str, config: GroupConfig) -> Group {
        Group {
            name: name.to_owned(),
            config,
            defaults: config,
            overrides: GroupOverrides::default(),
            epoch: 0,
            target_epoch: 0,
            target: BTreeMap::new(),
            members: BTreeMap::new(),
            topics: BTreeMap::new(),
            joined: 0,
            offsets: BTreeMap::new(),
            pending: BTreeMap::new(),
            share: None,
        }
    }

    /// A new share group.
    pub fn new_share(name: &str, config: GroupConfig) -> Group {
        Group { share: Some(ShareGroup::default()), ..Group::new(name, config) }
    }

    pub fn is_share(&self) -> bool {
        self.share.is_some()
    }

    pub fn share(&self) -> Option<&ShareGroup> {
        self.share.as_ref()
    }

    pub fn share_mut(&mut self) -> Option<&mut ShareGroup> {
        self.share.as_mut()
    }

    /// A share member's fetch at `now_ms` ([`ShareGroup::visit`]); a new
    /// member gets an id unique in the group's life.
    pub fn share_visit(&mut self, member_id: &str, topics: Vec<String>, now_ms: u64) -> Result<MemberId, GroupError> {
        let Some(share) = self.share.as_mut() else {
            return Err(GroupError::Invalid(format!(
                "group '{}' is a consumer group: its members heartbeat, they do not share fetches",
                self.name
            )));
        };
        let (name, joined) = (&self.name, &mut self.joined);
        share.visit(
            member_id,
            || {
                *joined += 1;
                format!("{name}-share-{joined}")
            },
            topics,
            now_ms,
        )
    }

    /// The committed offset of a partition.
    pub fn committed(&self, topic: &str, partition: u32) -> Option<&Committed> {
        self.offsets.get(&(topic.to_owned(), partition))
    }

    /// Every committed offset.
    pub fn offsets(&self) -> &BTreeMap<TopicPartition, Committed> {
        &self.offsets
    }

    /// Stores `offsets` committed by `member_id` at `member_epoch` (see
    /// [`Group::check_commit`]), all or none.
    pub fn commit(
        &mut self,
        member_id: &str,
        member_epoch: i32,
        offsets: Vec<(TopicPartition, Committed)>,
    ) -> Result<(), CommitError> {
        self.check_offsets(member_id, member_epoch, &offsets)?;
        self.offsets.extend(offsets);
        Ok(())
    }

    /// A consumer group's member may commit `offsets` now.
    fn check_offsets(
        &self,
        member_id: &str,
        member_epoch: i32,
        offsets: &[(TopicPartition, Committed)],
    ) -> Result<(), CommitError> {
        if self.is_share() {
            return Err(GroupError::Invalid(format!(
                "group '{}' is a share group: its members acknowledge records, they commit no offsets",
                self.name
            ))
            .into());
        }
        let partitions: Vec<TopicPartition> = offsets.iter().map(|(tp, _)| tp.clone()).collect();
        self.check_commit(member_id, member_epoch, &partitions)
    }

    /// Offsets committed in producer `producer_id`'s open transaction
    /// (Kafka's TxnOffsetCommit): checked as [`Group::commit`] checks them
    /// (a fenced or rebalanced member cannot commit), kept apart until the
    /// transaction ends ([`Group::end_transaction`]).
    pub fn commit_transactional(
        &mut self,
        member_id: &str,
        member_epoch: i32,
        producer_id: i64,
        offsets: Vec<(TopicPartition, Committed)>,
    ) -> Result<(), CommitError> {
        self.check_offsets(member_id, member_epoch, &offsets)?;
        self.pending.entry(producer_id).or_default().extend(offsets);
        Ok(())
    }

    /// Producer `producer_id`'s transaction ended: its offsets become the
    /// group's (`commit`) or are dropped. Nothing pending: nothing changes
    /// (a marker written again by a new transaction coordinator).
    pub fn end_transaction(&mut self, producer_id: i64, commit: bool) {
        if let Some(offsets) = self.pending.remove(&producer_id)
            && commit
        {
            self.offsets.extend(offsets);
        }
    }

    /// Producers with offsets pending in an open transaction.
    pub fn pending_transactions(&self) -> usize {
        self.pending.len()
    }

    /// Whether an open transaction holds an offset of this partition: a
    /// member fetching its offsets waits until it ends.
    pub fn has_pending(&self, topic: &str, partition: u32) -> bool {
        let tp = (topic.to_owned(), partition);
        self.pending.values().any(|offsets| offsets.contains_key(&tp))
    }

    /// Sets offsets by hand (an operator's reset): only while the group
    /// has no members, so nobody consumes from the old positions meanwhile.
    pub fn reset_offsets(&mut self, offsets: Vec<(TopicPartition, Committed)>) -> Result<(), CommitError> {
        if !self.members.is_empty() {
            return Err(CommitError::GroupActive(self.name.clone()));
        }
        self.offsets.extend(offsets);
        Ok(())
    }

    /// Forgets the committed offsets of `topic` (a deleted topic).
    pub fn forget_topic(&mut self, topic: &str) {
        self.offsets.retain(|(t, _), _| t != topic);
        for offsets in self.pending.values_mut() {
            offsets.retain(|(t, _), _| t != topic);
        }
        if let Some(share) = &mut self.share {
            share.forget_topic(topic);
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its timings and assignor: the broker's defaults with its overrides.
    pub fn config(&self) -> &GroupConfig {
        &self.config
    }

    pub fn overrides(&self) -> GroupOverrides {
        self.overrides
    }

    /// Sets the group's own timings (empty: the broker's defaults again).
    /// Members learn the heartbeat interval at their next heartbeat; the
    /// session applies from the next check.
    pub fn set_overrides(&mut self, overrides: GroupOverrides) -> Result<(), GroupError> {
        self.config = overrides.apply(self.defaults)?;
        self.overrides = overrides;
        Ok(())
    }

    /// The group epoch: it moves with every change of membership,
    /// subscriptions or subscribed topics' partition counts.
    pub fn epoch(&self) -> i32 {
        self.epoch
    }

    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    pub fn member(&self, id: &str) -> Option<&Member> {
        self.members.get(id)
    }

    /// The target assignment of each member, at [`Group::epoch`] once a
    /// heartbeat computed it.
    pub fn target(&self, id: &str) -> Option<&Assignment> {
        self.target.get(id)
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty() && self.share.as_ref().is_none_or(|s| s.members.is_empty())
    }

    /// Answers a member's heartbeat at `now_ms`; `topics` is every
    /// existing topic's partition count.
    pub fn heartbeat(
        &mut self,
        now_ms: u64,
        hb: Heartbeat,
        topics: &BTreeMap<String, u32>,
    ) -> Result<HeartbeatAnswer, GroupError> {
        if self.is_share() {
            return Err(GroupError::Invalid(format!(
                "group '{}' is a share group: its members read with share fetches",
                self.name
            )));
        }
        if let Some(s) = &hb.subscription {
            s.matcher()?;
        }
        let id = match hb.member_epoch {
            LEAVE_EPOCH => return Ok(self.leave(&hb.member_id)),
            STATIC_LEAVE_EPOCH => return self.step_away(&hb),
            JOIN_EPOCH => self.join(now_ms, &hb)?,
            epoch if epoch > 0 => self.known(&hb, epoch)?,
            epoch => return Err(GroupError::Invalid(format!("member epoch {epoch} is not valid"))),
        };
        let member = self.members.get_mut(&id).expect("known member");
        member.last_heartbeat_ms = now_ms;
        if let Some(subscription) = hb.subscription
            && subscription != member.subscription
        {
            member.subscription = subscription;
            self.epoch += 1;
        }
        self.see_topics(topics);
        if self.epoch > self.target_epoch {
            self.compute_target();
        }
        self.reconcile(now_ms, &id, hb.owned.as_ref());
        let member = &self.members[&id];
        Ok(HeartbeatAnswer {
            member_id: id,
            member_epoch: member.epoch,
            heartbeat_interval_ms: self.config.heartbeat_interval_ms,
            assignment: member.assigned.clone(),
        })
    }

    /// Fences members whose session ended, or who hold partitions they
    /// were asked to revoke past the rebalance timeout. In a share group:
    /// members silent past their session, and expired acquisition locks
    /// (the records offered again, or dead letters).
    pub fn tick(&mut self, now_ms: u64) -> Vec<Fenced> {
        let session = self.config.session_timeout_ms;
        if let Some(share) = &mut self.share {
            return share
                .tick(&self.config.share, session, now_ms)
                .into_iter()
                .map(|member_id| Fenced { member_id, instance_id: None, reason: "session ended" })
                .collect();
        }
        let fenced: Vec<(MemberId, &'static str)> = self
            .members
            .values()
            .filter_map(|m| {
                if now_ms.saturating_sub(m.last_heartbeat_ms) > session {
                    Some((m.id.clone(), if m.away { "did not come back within its session" } else { "session ended" }))
                } else if m.state == MemberState::Revoking && now_ms > m.revoke_deadline_ms {
                    Some((m.id.clone(), "did not revoke its partitions within the rebalance timeout"))
                } else {
                    None
                }
            })
            .collect();
        fenced
            .into_iter()
            .map(|(id, reason)| {
                let m = self.remove(&id).expect("member");
                Fenced { member_id: id, instance_id: m.instance_id, reason }
            })
            .collect()
    }

    /// Checks that `member_id` at `member_epoch` may commit offsets for
    /// `partitions`. A commit without a member (`""`, epoch -1: a consumer
    /// that picks its partitions) is allowed only into a group with no
    /// members.
    pub fn check_commit(
        &self,
        member_id: &str,
        member_epoch: i32,
        partitions: &[TopicPartition],
    ) -> Result<(), CommitError> {
        if member_id.is_empty() && member_epoch < 0 {
            return match self.members.is_empty() {
                true => Ok(()),
                false => Err(CommitError::GroupActive(self.name.clone())),
            };
        }
        let m = self.members.get(member_id).ok_or_else(|| GroupError::UnknownMember(member_id.to_owned()))?;
        if member_epoch != m.epoch {
            return Err(GroupError::FencedEpoch { member: m.id.clone(), got: member_epoch, current: m.epoch }.into());
        }
        for (topic, partition) in partitions {
            let owns = |a: &Assignment| a.get(topic).is_some_and(|ps| ps.contains(partition));
            if !owns(&m.assigned) && !owns(&m.revoking) {
                return Err(CommitError::NotOwned {
                    member: m.id.clone(),
                    topic: topic.clone(),
                    partition: *partition,
                });
            }
        }
        Ok(())
    }

    fn join(&mut self, now_ms: u64, hb: &Heartbeat) -> Result<MemberId, GroupError> {
        if let Some(instance) = &hb.instance_id
            && let Some(existing) = self.members.values().find(|m| m.instance_id.as_ref() == Some(instance))
        {
            if !existing.away {
                return Err(GroupError::InstanceInUse(instance.clone()));
            }
            // A static member back from a restart: same partitions, same
            // epoch, under a new member id; nothing moves.
            let old = existing.id.clone();
            let mut member = self.members.remove(&old).expect("member");
            let id = self.new_member_id();
            member.id = id.clone();
            member.away = false;
            member.last_heartbeat_ms = now_ms;
            if let Some(target) = self.target.remove(&old) {
                self.target.insert(id.clone(), target);
            }
            self.members.insert(id.clone(), member);
            return Ok(id);
        }
        let Some(subscription) = hb.subscription.clone() else {
            return Err(GroupError::Invalid("a joining member must give its subscription".into()));
        };
        // Joining again under its old id (after being fenced, say): it
        // starts over with nothing.
        if !hb.member_id.is_empty() {
            self.remove(&hb.member_id);
        }
        let id = if hb.member_id.is_empty() { self.new_member_id() } else { hb.member_id.clone() };
        self.members.insert(id.clone(), Member::new(id.clone(), hb.instance_id.clone(), subscription, now_ms));
        self.epoch += 1;
        Ok(id)
    }

    /// A member heartbeating at `epoch`: its current epoch, or the one
    /// before if it lost the answer that moved it (it owns nothing it was
    /// not given).
    fn known(&mut self, hb: &Heartbeat, epoch: i32) -> Result<MemberId, GroupError> {
        let m = self.members.get(&hb.member_id).ok_or_else(|| GroupError::UnknownMember(hb.member_id.clone()))?;
        let lost_answer = epoch == m.previous_epoch
            && hb.owned.as_ref().is_some_and(|owned| {
                assignment_partitions(owned).all(|tp| contains(&m.assigned, &tp) || contains(&m.revoking, &tp))
            });
        if epoch != m.epoch && !lost_answer {
            return Err(GroupError::FencedEpoch { member: m.id.clone(), got: epoch, current: m.epoch });
        }
        if m.away {
            return Err(GroupError::UnknownMember(hb.member_id.clone()));
        }
        Ok(m.id.clone())
    }

    fn leave(&mut self, id: &str) -> HeartbeatAnswer {
        self.remove(id);
        HeartbeatAnswer {
            member_id: id.to_owned(),
            member_epoch: LEAVE_EPOCH,
            heartbeat_interval_ms: 0,
            assignment: Assignment::new(),
        }
    }

    fn step_away(&mut self, hb: &Heartbeat) -> Result<HeartbeatAnswer, GroupError> {
        let m = self.members.get_mut(&hb.member_id).ok_or_else(|| GroupError::UnknownMember(hb.member_id.clone()))?;
        if m.instance_id.is_none() {
            return Err(GroupError::Invalid(
                "only a static member (with an instance id) can leave with epoch -2".into(),
            ));
        }
        m.away = true;
        Ok(HeartbeatAnswer {
            member_id: m.id.clone(),
            member_epoch: STATIC_LEAVE_EPOCH,
            heartbeat_interval_ms: 0,
            assignment: Assignment::new(),
        })
    }

    fn remove(&mut self, id: &str) -> Option<Member> {
        let m = self.members.remove(id)?;
        self.target.remove(id);
        self.epoch += 1;
        Some(m)
    }

    fn new_member_id(&mut self) -> MemberId {
        self.joined += 1;
        format!("{}-{}-{}", self.name, self.epoch, self.joined)
    }

    /// Moves the group epoch if a subscribed topic (by name or pattern)
    /// appeared, went or changed its partition count.
    fn see_topics(&mut self, all: &BTreeMap<String, u32>) {
        let subscribed: BTreeSet<String> =
            self.members.values().flat_map(|m| m.subscription.resolve(all.keys())).collect();
        let now: BTreeMap<String, u32> =
            all.iter().filter(|(t, _)| subscribed.contains(*t)).map(|(t, c)| (t.clone(), *c)).collect();
        if now != self.topics {
            self.topics = now;
            self.epoch += 1;
        }
    }

    fn compute_target(&mut self) {
        let subscriptions =
            self.members.iter().map(|(id, m)| (id.clone(), m.subscription.resolve(self.topics.keys()))).collect();
        self.target = self.config.assignor.assign(&subscriptions, &self.topics, &self.target);
        self.target_epoch = self.epoch;
    }

    /// One step of member `id` toward its target (see the crate docs).
    fn reconcile(&mut self, now_ms: u64, id: &str, owned: Option<&Assignment>) {
        let target = self.target.get(id).cloned().unwrap_or_default();
        // Partitions others own, or were asked to give up and still hold.
        let taken: BTreeSet<TopicPartition> = self
            .members
            .values()
            .filter(|m| m.id != id)
            .flat_map(|m| assignment_partitions(&m.assigned).chain(assignment_partitions(&m.revoking)))
            .collect();
        let target_epoch = self.target_epoch;
        let deadline = now_ms + self.config.rebalance_timeout_ms;
        let m = self.members.get_mut(id).expect("member");
        if m.state == MemberState::Revoking {
            let released = owned.is_some_and(|o| !assignment_partitions(&m.revoking).any(|tp| contains(o, &tp)));
            if !released {
                return;
            }
            m.revoking.clear();
        }
        let revoke: Vec<TopicPartition> =
            assignment_partitions(&m.assigned).filter(|tp| !contains(&target, tp)).collect();
        if !revoke.is_empty() {
            for (topic, p) in revoke {
                remove(&mut m.assigned, &topic, p);
                m.revoking.entry(topic).or_default().insert(p);
            }
            m.state = MemberState::Revoking;
            m.revoke_deadline_ms = deadline;
            return;
        }
        let mut waiting = false;
        for tp in assignment_partitions(&target) {
            if contains(&m.assigned, &tp) {
                continue;
            }
            if taken.contains(&tp) {
                waiting = true;
            } else {
                m.assigned.entry(tp.0).or_default().insert(tp.1);
            }
        }
        if m.epoch != target_epoch {
            m.previous_epoch = m.epoch;
            m.epoch = target_epoch;
        }
        m.state = if waiting { MemberState::Awaiting } else { MemberState::Stable };
    }
}

fn contains(a: &Assignment, (topic, p): &TopicPartition) -> bool {
    a.get(topic).is_some_and(|ps| ps.contains(p))
}

fn remove(a: &mut Assignment, topic: &str, p: u32) {
    if let Some(ps) = a.get_mut(topic) {
        ps.remove(&p);
        if ps.is_empty() {
            a.remove(topic);
        }
    }
}
