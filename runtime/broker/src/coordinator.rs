//! Consumer-group coordination on the broker: the IO shell around the plain
//! rules of `quiver-groups`.
//!
//! Groups live in the internal topic `__consumer_offsets`; a group belongs
//! to partition `murmur2(name) % partitions` and its coordinator is that
//! partition's leader. For each partition it leads, a broker keeps a
//! [`Shard`]: the groups of that partition, rebuilt from the partition's log
//! (`Group::replay`) when it became leader, before it answers any request.
//!
//! Every change is written before it is answered: an operation runs on a
//! copy of its group, the difference (`quiver_groups::changes`) is appended
//! to the partition with acks=all, and only then does the copy replace the
//! group in memory. A failed write leaves memory unchanged and marks the
//! shard stale, so it is loaded again from the log (which may hold the write
//! after all); what members were told is always in the log.
//!
//! (The write itself, `store`, is in `api/groups.rs`: it goes through the
//! produce path.)
//!
//! A loop (`coordinate_groups`) follows the leadership of the offsets
//! topic's partitions (loading new shards, dropping lost ones) and, once a
//! second, fences members whose session or rebalance timeout ran out and
//! forgets the offsets of deleted topics.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use quiver_groups::{Group, changes};
use quiver_protocol::messages::OFFSETS_TOPIC;

use crate::broker::Broker;
use crate::errors::GroupOpError;
use crate::group_shards::{Shard, group_partition, read_group_records, validate_group_name};
use crate::partition::Partition;

/// How often the coordinator looks at the offsets topic's leaderships.
const LEADERSHIP_TICK: Duration = Duration::from_millis(200);
/// How often members' sessions and rebalance timeouts are checked.
const EXPIRY_TICK_MS: u64 = 1_000;
impl Broker {
    /// Follows the offsets topic's leaderships and expires members, until
    /// shutdown.
    pub(crate) async fn coordinate_groups(self: Arc<Self>) {
        let mut tick = tokio::time::interval(LEADERSHIP_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut expired_at = 0;
        while !self.shutting_down.load(Ordering::Relaxed) {
            tick.tick().await;
            self.follow_offsets_leadership();
            let now = self.clock_ms();
            if now.saturating_sub(expired_at) >= EXPIRY_TICK_MS {
                expired_at = now;
                self.expire_members().await;
            }
        }
    }

    /// Loads a shard for each offsets partition newly led here; drops those
    /// no longer led (or led in another epoch, or stale).
    fn follow_offsets_leadership(self: &Arc<Self>) {
        let led: HashMap<u32, (Arc<Partition>, i32)> = match self.current_topic(OFFSETS_TOPIC) {
            Ok(topic) => topic.local().filter_map(|p| Some((p.id, (p.clone(), p.leader_epoch()?)))).collect(),
            Err(_) => HashMap::new(),
        };
        let mut shards = self.coordinator.shards();
        shards.retain(|id, shard| {
            let keep =
                led.get(id).is_some_and(|(_, epoch)| *epoch == shard.epoch) && !shard.stale.load(Ordering::Acquire);
            if !keep {
                tracing::info!(
                    partition = id,
                    epoch = shard.epoch,
                    "no longer coordinating the groups of this partition"
                );
            }
            keep
        });
        for (id, (partition, epoch)) in led {
            if shards.contains_key(&id) {
                continue;
            }
            let shard = Arc::new(Shard {
                partition,
                epoch,
                groups: tokio::sync::Mutex::new(None),
                stale: AtomicBool::new(false),
            });
            shards.insert(id, shard.clone());
            tokio::spawn(self.clone().load_shard(shard));
        }
    }

    /// Rebuilds a shard's groups from its partition's log.
    async fn load_shard(self: Arc<Self>, shard: Arc<Shard>) {
        let partition = shard.partition.clone();
        let loaded = tokio::task::spawn_blocking(move || read_group_records(&partition)).await;
        let records = match loaded {
            Ok(Ok(records)) => records,
            Ok(Err(e)) => {
                tracing::error!(partition = shard.partition.id, error = %e, "cannot load the groups of this partition; trying again");
                shard.stale.store(true, Ordering::Release);
                return;
            }
            Err(e) => {
                tracing::error!(partition = shard.partition.id, error = %e, "loading groups panicked");
                shard.stale.store(true, Ordering::Release);
                return;
            }
        };
        let now = self.clock_ms();
        let groups: BTreeMap<String, Group> = records
            .into_iter()
            .map(|(name, log)| {
                let group = Group::replay(&name, self.config.group_defaults, now, log);
                (name, group)
            })
            // A deleted group replays to nothing.
            .filter(|(_, g)| {
                !(g.epoch() == 0
                    && g.is_empty()
                    && g.offsets().is_empty()
                    && g.overrides().is_empty()
                    && g.pending_transactions() == 0)
            })
            .collect();
        tracing::info!(
            partition = shard.partition.id,
            epoch = shard.epoch,
            groups = groups.len(),
            "coordinating groups"
        );
        *shard.groups.lock().await = Some(groups);
    }

    /// The shard coordinating `group`, and the group's partition.
    fn shard_of(&self, group: &str) -> Result<Arc<Shard>, GroupOpError> {
        validate_group_name(group)?;
        let me = self.config.node_id;
        let count = self.controller.image().borrow().topics.get(OFFSETS_TOPIC).map(|t| t.partitions.len() as u32);
        let Some(count) = count else {
            return Err(GroupOpError::NotCoordinator { me, group: group.to_owned(), partition: 0 });
        };
        let partition = group_partition(group, count);
        self.coordinator.shards().get(&partition).cloned().ok_or_else(|| GroupOpError::NotCoordinator {
            me,
            group: group.to_owned(),
            partition,
        })
    }

    /// Runs `f` on `group` (`None` if it does not exist) at the
    /// coordinator's clock; stores what it changed, then keeps the group it
    /// returns (`None`: deleted).
    pub(crate) async fn with_group<T>(
        self: &Arc<Self>,
        group: &str,
        f: impl FnOnce(Option<Group>, u64) -> Result<(Option<Group>, T), GroupOpError>,
    ) -> Result<T, GroupOpError> {
        let shard = self.shard_of(group)?;
        let mut guard = shard.groups.lock().await;
        let groups = self.loaded(&shard, group, &mut guard)?;
        let current = groups.get(group).cloned();
        let before = current.as_ref().map(Group::records).unwrap_or_default();
        let (next, answer) = f(current, self.clock_ms())?;
        let after = next.as_ref().map(Group::records).unwrap_or_default();
        let records = changes(&before, &after);
        if !records.is_empty() {
            self.store(&shard, group, records).await?;
        }
        match next {
            Some(next) => groups.insert(group.to_owned(), next),
            None => groups.remove(group),
        };
        Ok(answer)
    }

    /// Reads `group` (`None` if it does not exist) at its coordinator.
    pub(crate) async fn read_group<T>(
        &self,
        group: &str,
        f: impl FnOnce(Option<&Group>) -> T,
    ) -> Result<T, GroupOpError> {
        let shard = self.shard_of(group)?;
        let mut guard = shard.groups.lock().await;
        let groups = self.loaded(&shard, group, &mut guard)?;
        Ok(f(groups.get(group)))
    }

    /// Every group this broker coordinates.
    pub(crate) async fn all_groups<T>(&self, f: impl Fn(&Group) -> T) -> Vec<T> {
        let shards: Vec<Arc<Shard>> = self.coordinator.shards().values().cloned().collect();
        let mut out = Vec::new();
        for shard in shards {
            if let Some(groups) = shard.groups.lock().await.as_ref() {
                out.extend(groups.values().map(&f));
            }
        }
        out
    }

    /// A shard's groups, if it is loaded and still led in its epoch.
    fn loaded<'a>(
        &self,
        shard: &Shard,
        group: &str,
        guard: &'a mut Option<BTreeMap<String, Group>>,
    ) -> Result<&'a mut BTreeMap<String, Group>, GroupOpError> {
        let me = self.config.node_id;
        let partition = shard.partition.id;
        if shard.stale.load(Ordering::Acquire) || !shard.partition.leads_in(shard.epoch) {
            return Err(GroupOpError::NotCoordinator { me, group: group.to_owned(), partition });
        }
        guard.as_mut().ok_or(GroupOpError::Loading { me, partition })
    }

    /// Fences members past their session or rebalance timeout, and forgets
    /// the committed offsets of deleted topics, in every loaded group.
    async fn expire_members(self: &Arc<Self>) {
        let shards: Vec<Arc<Shard>> = self.coordinator.shards().values().cloned().collect();
        let existing: std::collections::BTreeSet<String> =
            self.controller.image().borrow().topics.keys().cloned().collect();
        for shard in shards {
            let names: Vec<String> = match shard.groups.lock().await.as_ref() {
                Some(groups) => groups.keys().cloned().collect(),
                None => continue,
            };
            for name in names {
                let expired = self
                    .with_group(&name, |group, now| {
                        let Some(mut group) = group else { return Ok((None, (Vec::new(), false))) };
                        let fenced = group.tick(now);
                        let deleted: Vec<String> = group
                            .offsets()
                            .keys()
                            .map(|(topic, _)| topic.clone())
                            .filter(|topic| !existing.contains(topic))
                            .collect();
                        for topic in &deleted {
                            group.forget_topic(topic);
                        }
                        let dead_letters = group
                            .share()
                            .is_some_and(|s| s.partitions().values().any(|p| !p.dead_letters().is_empty()));
                        Ok((Some(group), (fenced, dead_letters)))
                    })
                    .await;
                match expired {
                    Ok((fenced, dead_letters)) => {
                        for f in fenced {
                            tracing::info!(group = %name, member = %f.member_id, instance = ?f.instance_id, reason = f.reason, "member fenced");
                        }
                        if dead_letters && let Err(e) = self.copy_dead_letters(&name).await {
                            tracing::warn!(group = %name, error = %e, "copying dead letters failed; will retry");
                        }
                    }
                    Err(e) => {
                        tracing::debug!(group = %name, error = %e, "expiring members stopped");
                        break;
                    }
                }
            }
        }
    }
}
