//! A broker and its metadata image (quiver-controller), on a single node
//! (the only voter of its own log) as in a cluster: topic admin goes through
//! the metadata log, metadata answers come from the image, and a reconcile
//! loop opens and removes local logs so that this broker holds exactly the
//! replicas the image assigns it. Produce and fetch are served only by a
//! partition's leader; any other broker answers `NotLeader` naming it.
//! Replication itself is in `replica.rs`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use quiver_controller::{ClusterImage, Controller, TopicImage};
use quiver_protocol::messages::*;
use quiver_protocol::{ErrorCode, WireError};

use crate::broker::{Broker, now_ms};
use crate::errors::{AdminError, NotReady, PartitionError, check_leader, unknown_topic_metadata};
use crate::partition::RemoteLeader;
use crate::reconcile::{Local, Step, plan};
use crate::topic::{TopicConfig, TopicRecord};

/// How long topic admin waits for this broker to apply its own change.
const APPLY_WAIT: Duration = Duration::from_secs(10);

impl Broker {
    /// Where `topic`-`partition` is led: `None` here (or not in a cluster),
    /// else the leader's id and address. An offline partition, or a leader
    /// whose address is unknown, is a `NotLeader` error.
    pub(crate) fn remote_leader(&self, topic: &str, partition: u32) -> Result<Option<RemoteLeader>, PartitionError> {
        let image = self.controller.image().borrow().clone();
        match check_leader(self.config.node_id, &image, topic, partition) {
            Ok(()) => Ok(None),
            Err(PartitionError::LedElsewhere { leader, .. }) if image.brokers.contains_key(&leader) => {
                Ok(Some((leader, image.brokers[&leader].address.clone())))
            }
            Err(e) => Err(e),
        }
    }

    /// Sends a produce request to another broker that leads its partitions.
    pub(crate) async fn produce_at(
        &self,
        (leader, address): RemoteLeader,
        request: ProduceRequest,
    ) -> Result<ProduceResponse, WireError> {
        self.replica_link.produce(leader, address, request).await
    }

    /// From now on this broker's topics are the image's, and its replicas
    /// copy from their leaders. Called once, right after opening.
    pub(crate) fn follow_image(self: &Arc<Self>) {
        let mut image = self.controller.image();
        let mut caught_up = self.controller.caught_up();
        tokio::spawn(self.clone().isr_ticks());
        let broker = self.clone();
        tokio::spawn(async move {
            loop {
                let current = image.borrow_and_update().clone();
                let complete = *caught_up.borrow_and_update();
                broker.reconcile(&current, complete).await;
                tokio::select! {
                    changed = image.changed() => if changed.is_err() { break },
                    changed = caught_up.changed() => if changed.is_err() { break },
                }
                if broker.shutting_down.load(Ordering::Relaxed) {
                    break;
                }
            }
        });
    }

    /// This node's member of the metadata quorum.
    pub fn controller(&self) -> &Arc<Controller> {
        &self.controller
    }

    /// A restarted node answers clients only once it has caught up with the
    /// metadata log: until then its image may be stale (a topic created
    /// meanwhile missing, a leadership it lost still there).
    pub(crate) fn ready(&self) -> Result<(), NotReady> {
        if self.controller.is_caught_up() {
            return Ok(());
        }
        Err(NotReady { node: self.config.node_id })
    }

    /// Opens the replicas the image assigns this broker and, once the image
    /// is `complete` (caught up with the leader), removes topics it no
    /// longer has. A stale image (a restart replaying the log) never
    /// removes anything.
    async fn reconcile(self: &Arc<Self>, image: &ClusterImage, complete: bool) {
        for step in plan(self.config.node_id, &self.local_topics(), image, complete) {
            let (name, result) = match step {
                Step::Remove { name } => {
                    let result = self.remove_local_topic(&name).await;
                    (name, result.map_err(|e| format!("cannot remove a deleted topic: {e}")))
                }
                Step::ChangeHeld { name, held } => {
                    let result = self.change_held(&name, held).await;
                    (name, result.map_err(|e| format!("cannot take or drop moved replicas: {e}")))
                }
                Step::Open { name, id, partitions, configs, held } => {
                    let result = self.open_from_image(&name, id, partitions, configs, held).await;
                    (name, result)
                }
            };
            if let Err(e) = result {
                tracing::error!(topic = %name, error = %e, "cannot bring a topic in line with the metadata");
            }
        }
        // A stale image (a restart replaying the log) must not make this
        // node lead again in an epoch the cluster has moved past.
        if complete {
            self.apply_roles(image);
        }
        self.reconcile_plugins(image, complete).await;
    }

    /// A topic's effective config: this broker's topic defaults with the
    /// overrides the metadata image holds for it.
    pub(crate) fn image_topic_config(&self, configs: &[(String, String)]) -> Result<TopicConfig, String> {
        self.config.topic_defaults.clone().with_overrides(configs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }

    /// Opens the replicas `held` of the image's topic `id`.
    async fn open_from_image(
        &self,
        name: &str,
        id: u64,
        partitions: u32,
        configs: Vec<(String, String)>,
        held: Vec<u32>,
    ) -> Result<(), String> {
        let config = self
            .image_topic_config(&configs)
            .map_err(|e| format!("its configs in the metadata are invalid here: {e}"))?;
        let record = TopicRecord {
            name: name.to_owned(),
            partitions,
            overrides: configs.into_iter().collect(),
            created_ms: now_ms(),
            cluster_id: Some(id),
            held: Some(held),
        };
        self.create_local_topic(record, config)
            .await
            .map(|_| ())
            .map_err(|e| format!("cannot open the replicas of a new topic: {e}"))
    }

    /// Waits (bounded) until this broker's image satisfies `done`, so that a
    /// client's next request here sees its own change.
    pub(crate) async fn wait_applied(&self, controller: &Controller, done: impl Fn(&ClusterImage) -> bool) {
        let mut image = controller.image();
        let _ = tokio::time::timeout(APPLY_WAIT, image.wait_for(|i| done(i))).await;
        // The reconcile loop runs after the image changes; give it a moment
        // to open the logs.
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline && !self.reconciled(&image.borrow()) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Whether this broker holds what `image` assigns it (nothing left to
    /// open, move or remove) and leads where it says so.
    fn reconciled(&self, image: &ClusterImage) -> bool {
        let me = self.config.node_id;
        if !plan(me, &self.local_topics(), image, true).is_empty() {
            return false;
        }
        image.topics.iter().all(|(name, t)| {
            t.partitions.iter().enumerate().all(|(i, p)| {
                p.leader != Some(me)
                    || self.topic(name).and_then(|l| l.held(i as u32)).is_some_and(|q| q.leads_in(p.leader_epoch))
            })
        })
    }

    /// What is open here, as the reconcile plan sees it.
    fn local_topics(&self) -> std::collections::BTreeMap<String, Local> {
        self.sorted_topics()
            .iter()
            .map(|t| (t.record.name.clone(), Local { id: t.record.cluster_id, held: t.record.held.clone() }))
            .collect()
    }

    pub(crate) fn metadata(&self, request: MetadataRequest) -> MetadataResponse {
        let image = self.controller.image().borrow().clone();
        let describe = |name: &str, t: &TopicImage| {
            let partitioner = t.config("partitioner").unwrap_or_default().to_string();
            TopicMetadata {
                name: name.to_string(),
                error: ErrorCode::None,
                partitions: t
                    .partitions
                    .iter()
                    .enumerate()
                    .map(|(i, p)| PartitionMetadata {
                        partition: i as u32,
                        leader: p.leader.unwrap_or(NO_LEADER),
                        leader_epoch: p.leader_epoch,
                    })
                    .collect(),
                partitioner_version: self.plugin_version(&partitioner),
                partitioner,
            }
        };
        let topics = match request.topics {
            None => image.topics.iter().map(|(n, t)| describe(n, t)).collect(),
            Some(names) => names
                .into_iter()
                .map(|name| match image.topics.get(&name) {
                    Some(t) => describe(&name, t),
                    None => unknown_topic_metadata(name),
                })
                .collect(),
        };
        let brokers = image
            .brokers
            .values()
            .filter(|b| !b.fenced)
            .map(|b| BrokerInfo { node_id: b.node_id, address: b.address.clone() })
            .collect();
        MetadataResponse { brokers, topics }
    }

    pub(crate) fn describe(&self, names: Option<Vec<String>>) -> Result<DescribeTopicsResponse, AdminError> {
        let image = self.controller.image().borrow().clone();
        let names: Vec<String> = match names {
            None => image.topics.keys().cloned().collect(),
            Some(names) => names,
        };
        let mut topics = Vec::with_capacity(names.len());
        for name in names {
            let t = image.topics.get(&name).ok_or_else(|| AdminError::UnknownTopic(name.clone()))?;
            let local = self.topic(&name);
            let configs = match &local {
                Some(l) => l.config.to_pairs(),
                None => t.configs.clone(),
            };
            let partitions = t
                .partitions
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let held = local.as_ref().and_then(|l| l.held(i as u32));
                    PartitionDescription {
                        partition: i as u32,
                        leader: p.leader.unwrap_or(NO_LEADER),
                        leader_epoch: p.leader_epoch,
                        replicas: p.replicas.clone(),
                        isr: p.isr.clone(),
                        log_start_offset: held.as_ref().map_or(-1, |h| h.log.log_start_offset()),
                        high_watermark: held.as_ref().map_or(-1, |h| h.high_watermark()),
                        size_bytes: held.as_ref().map_or(0, |h| h.log.size_bytes()),
                        segments: held.as_ref().map_or(0, |h| h.log.segment_count() as u32),
                        compaction: held.as_ref().and_then(|h| {
                            let cleanable = h.log.cleanable(crate::broker::now_ms(), h.high_watermark())?;
                            Some(CompactionStatus {
                                dirty_ratio_permille: (cleanable.dirty_ratio * 1000.0).round() as u32,
                                first_dirty_offset: cleanable.first_dirty_offset,
                                last_clean_ms: h.log.last_clean_ms().unwrap_or(-1),
                            })
                        }),
                    }
                })
                .collect();
            topics.push(TopicDescription { name, configs, partitions });
        }
        Ok(DescribeTopicsResponse { topics })
    }

    pub(crate) fn cluster_info(&self) -> ClusterInfoResponse {
        let me = self.config.node_id;
        let controller = &self.controller;
        let image = controller.image().borrow().clone();
        let (voters, _) = controller.members();
        let (term, _, applied) = controller.raft_progress();
        let refs = |list: Vec<(String, u32)>| {
            list.into_iter().map(|(topic, partition)| PartitionRef { topic, partition }).collect()
        };
        ClusterInfoResponse {
            clustered: true,
            node_id: me,
            controller_leader: controller.leader().unwrap_or(NO_LEADER),
            raft_term: term,
            metadata_applied: applied.unwrap_or(0),
            nodes: image
                .brokers
                .values()
                .map(|b| ClusterNode {
                    node_id: b.node_id,
                    address: b.address.clone(),
                    rack: b.rack.clone().unwrap_or_default(),
                    fenced: b.fenced,
                    voter: voters.contains(&b.node_id),
                })
                .collect(),
            topics: image.topics.len() as u32,
            partitions: image.topics.values().map(|t| t.partitions.len() as u32).sum(),
            under_replicated: refs(image.under_replicated()),
            offline: refs(image.offline()),
            unclean_elections: image
                .unclean_elections
                .iter()
                .map(|u| PartitionRef { topic: u.topic.clone(), partition: u.partition })
                .collect(),
        }
    }

    /// Serves a controller message from another broker.
    pub(crate) async fn controller_call(&self, call: ControllerCall) -> Result<ControllerAnswer, AdminError> {
        let request = serde_json::from_slice(&call.body).map_err(AdminError::BadControllerMessage)?;
        let answer = self.controller.handle(request).await;
        Ok(ControllerAnswer { body: serde_json::to_vec(&answer).expect("answer serialises").into() })
    }
}
