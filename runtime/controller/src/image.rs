//! The cluster metadata image: what the metadata log says after applying
//! every committed command. Applying is deterministic (no clock, no
//! randomness), so every node that applies the same log holds the same image;
//! leader elections after a fence and replica assignment at topic creation
//! are decided here, inside `apply`, for that reason.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use quiver_replication::{Election, NodeId, elect_leader};
use serde::{Deserialize, Serialize};

/// A registered broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerRegistration {
    pub node_id: NodeId,
    /// `host:port` clients and other brokers connect to.
    pub address: String,
    pub rack: Option<String>,
    /// Changes every time the broker process starts: a second process with
    /// the same node id is told apart from a restart of the first.
    pub incarnation: u64,
    /// Fenced brokers missed their heartbeats: they lead nothing and are out
    /// of every ISR until they heartbeat again.
    pub fenced: bool,
}

/// One partition's replicas, leader and in-sync set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionImage {
    /// In assignment order: the first is the preferred leader.
    pub replicas: Vec<NodeId>,
    pub isr: Vec<NodeId>,
    /// `None`: offline (no eligible replica).
    pub leader: Option<NodeId>,
    /// Bumped on every leader change; every batch carries the epoch of the
    /// leader that appended it.
    pub leader_epoch: i32,
    /// Bumped on every change of leader or ISR; an ISR change proposed from
    /// an older partition epoch is refused.
    pub partition_epoch: i32,
    /// A reassignment in progress: the replicas the partition moves to.
    /// Meanwhile `replicas` holds the old and new ones; once every target
    /// replica is in the ISR, `replicas` becomes the target (the leader
    /// moves if it is not part of it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Vec<NodeId>>,
    /// During a reassignment: the replicas it started from (what a
    /// cancellation goes back to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moving_from: Option<Vec<NodeId>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicImage {
    /// The log index of the command that created it: a topic deleted and
    /// created again under the same name is a different topic.
    pub id: u64,
    pub configs: Vec<(String, String)>,
    pub partitions: Vec<PartitionImage>,
}

impl TopicImage {
    pub fn config(&self, key: &str) -> Option<&str> {
        self.configs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    pub fn unclean_election(&self) -> bool {
        self.config(UNCLEAN_CONFIG) == Some("true")
    }
}

/// Topic config allowing a replica outside the ISR to become leader.
pub const UNCLEAN_CONFIG: &str = "unclean.leader.election.enable";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterImage {
    pub brokers: BTreeMap<NodeId, BrokerRegistration>,
    pub topics: BTreeMap<String, TopicImage>,
    /// Unclean elections that happened, newest last (bounded), so that
    /// `cluster health` can report them.
    pub unclean_elections: Vec<UncleanElection>,
    /// Deployed plugins by name.
    #[serde(default)]
    pub plugins: BTreeMap<String, PluginImage>,
    /// The components of deployed plugins, content-addressed by SHA-256,
    /// each stored once however many deployments use it.
    #[serde(default)]
    pub blobs: BTreeMap<String, Blob>,
    /// The first producer id not handed out yet: brokers take blocks of
    /// ids from here and give them to idempotent producers.
    #[serde(default)]
    pub next_producer_id: i64,
}

/// A deployed plugin. The deployment's details (kind, parameters, topics,
/// policies) are the brokers' business and opaque here; the quorum decides
/// the version, the component, paused or not, and where a transform got to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginImage {
    /// 1 for the first deployment under a name, then one more per deploy.
    pub version: u32,
    /// The component's SHA-256 (a key of `ClusterImage::blobs`), or a
    /// built-in plugin's name after [`BUILTIN_PREFIX`].
    pub sha256: String,
    /// The broker's deployment record (JSON).
    pub spec: String,
    /// Why it is paused (by a user or by its error policy); none = running.
    pub paused: Option<String>,
    /// Transforms: the next input offset per input partition, as last
    /// committed by that partition's leader (a new leader resumes there).
    #[serde(default)]
    pub progress: BTreeMap<u32, i64>,
}

/// Hashes naming a component built into every broker, not stored here.
pub const BUILTIN_PREFIX: &str = "builtin:";

/// A plugin's component as the brokers store it (zstd-compressed). Written
/// to the log and snapshots as base64; cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blob(#[serde(with = "base64_bytes")] pub Bytes);

mod base64_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text).map(Bytes::from).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UncleanElection {
    pub topic: String,
    pub partition: u32,
    pub leader: NodeId,
    pub leader_epoch: i32,
}

const UNCLEAN_HISTORY: usize = 100;

/// A change to the metadata, as written to the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    RegisterBroker {
        node_id: NodeId,
        address: String,
        rack: Option<String>,
        incarnation: u64,
    },
    FenceBroker {
        node_id: NodeId,
    },
    UnfenceBroker {
        node_id: NodeId,
        incarnation: u64,
    },
    /// Configs are validated by the broker that received the request.
    CreateTopic {
        name: String,
        partitions: u32,
        replication_factor: u16,
        configs: Vec<(String, String)>,
    },
    DeleteTopic {
        name: String,
    },
    /// From a partition leader: its ISR changed. Refused unless it comes from
    /// the current leader at the current partition epoch.
    AlterIsr {
        topic: String,
        partition: u32,
        leader: NodeId,
        partition_epoch: i32,
        isr: Vec<NodeId>,
    },
    /// Moves leadership back to each partition's first replica where it is
    /// in sync and live.
    PreferredElection,
    /// Moves a partition to other brokers: the new replicas copy from the
    /// leader, and the old ones leave once the new ones are in sync.
    ReassignPartition {
        topic: String,
        partition: u32,
        replicas: Vec<NodeId>,
    },
    /// Stops a reassignment in progress: the partition goes back to the
    /// replicas it started from (the ones added leave), and leadership to
    /// one of them.
    CancelReassignment {
        topic: String,
        partition: u32,
    },
    /// Deploys a plugin (a new version if the name exists). `blob` carries
    /// the component unless the image already has its hash or it is built
    /// in; `keep_progress` carries a transform's progress over to the new
    /// version (same input topic).
    DeployPlugin {
        name: String,
        sha256: String,
        spec: String,
        blob: Option<Blob>,
        keep_progress: bool,
    },
    /// Pauses (`paused` = why) or resumes a plugin. `version` 0 means any;
    /// otherwise a change meant for an older version is refused (a failure
    /// of version 1 does not pause version 2).
    SetPluginPaused {
        name: String,
        version: u32,
        paused: Option<String>,
    },
    RemovePlugin {
        name: String,
    },
    /// A transform's progress on input partitions this broker leads; offsets
    /// only move forward.
    PluginProgress {
        name: String,
        version: u32,
        progress: Vec<(u32, i64)>,
    },
    /// A broker takes the next `count` producer ids (at most
    /// [`PRODUCER_ID_BLOCK_MAX`]).
    AllocateProducerIds {
        node_id: NodeId,
        count: u32,
    },
    /// The metadata a node kept in files before it ran a metadata log
    /// (releases before the one-voter controller): its topics, each wholly
    /// on `node_id` and led there, and the producer ids it handed out.
    /// Written once, by that node, when it first starts with a log; a topic
    /// already in the image with the same shape on that node is taken as
    /// imported before (a restart during the migration).
    ImportNode {
        node_id: NodeId,
        topics: Vec<ImportedTopic>,
        next_producer_id: i64,
    },
}

/// A topic of a node's files, for [`Command::ImportNode`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportedTopic {
    pub name: String,
    pub partitions: u32,
    pub configs: Vec<(String, String)>,
}

/// The largest block of producer ids one command takes.
pub const PRODUCER_ID_BLOCK_MAX: u32 = 1_000_000;

/// The answer to one command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Done,
    /// The partition's state after an accepted ISR change.
    Partition(PartitionImage),
    /// The version a plugin deployment got.
    PluginVersion(u32),
    /// The first of the producer ids allocated.
    ProducerIds(i64),
    Refused(Refusal),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub kind: RefusalKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalKind {
    TopicExists,
    UnknownTopic,
    UnknownPartition,
    NotEnoughBrokers,
    UnknownBroker,
    UnknownPlugin,
    /// An ISR change from a leader that is no longer leader, or from an
    /// older partition epoch.
    Stale,
    Invalid,
}

fn refuse(kind: RefusalKind, message: impl Into<String>) -> Outcome {
    Outcome::Refused(Refusal { kind, message: message.into() })
}

impl ClusterImage {
    /// Applies one committed command at log index `index`.
    pub fn apply(&mut self, index: u64, command: &Command) -> Outcome {
        match command {
            Command::RegisterBroker { node_id, address, rack, incarnation } => {
                // A new process under a known id may have lost its unflushed
                // tail: it leaves every ISR and leadership, and rejoins the
                // ISRs by catching up like any follower.
                if self.brokers.get(node_id).is_some_and(|b| b.incarnation != *incarnation) {
                    self.fence(*node_id);
                }
                self.brokers.insert(
                    *node_id,
                    BrokerRegistration {
                        node_id: *node_id,
                        address: address.clone(),
                        rack: rack.clone(),
                        incarnation: *incarnation,
                        fenced: false,
                    },
                );
                self.elect_offline();
                Outcome::Done
            }
            Command::FenceBroker { node_id } => {
                let Some(b) = self.brokers.get_mut(node_id) else {
                    return refuse(RefusalKind::UnknownBroker, format!("broker {node_id} is not registered"));
                };
                b.fenced = true;
                self.fence(*node_id);
                Outcome::Done
            }
            Command::UnfenceBroker { node_id, incarnation } => {
                match self.brokers.get_mut(node_id) {
                    Some(b) if b.incarnation == *incarnation => b.fenced = false,
                    _ => return refuse(RefusalKind::Stale, format!("broker {node_id} registered again since")),
                }
                self.elect_offline();
                Outcome::Done
            }
            Command::CreateTopic { name, partitions, replication_factor, configs } => {
                if self.topics.contains_key(name) {
                    return refuse(RefusalKind::TopicExists, format!("topic '{name}' already exists"));
                }
                let assignment = match self.assign(*partitions, *replication_factor) {
                    Ok(a) => a,
                    Err(refusal) => return Outcome::Refused(refusal),
                };
                let partitions = assignment
                    .into_iter()
                    .map(|replicas| PartitionImage {
                        leader: Some(replicas[0]),
                        isr: replicas.clone(),
                        replicas,
                        leader_epoch: 0,
                        partition_epoch: 0,
                        target: None,
                        moving_from: None,
                    })
                    .collect();
                self.topics.insert(name.clone(), TopicImage { id: index, configs: configs.clone(), partitions });
                Outcome::Done
            }
            Command::DeleteTopic { name } => match self.topics.remove(name) {
                Some(_) => Outcome::Done,
                None => refuse(RefusalKind::UnknownTopic, format!("topic '{name}' does not exist")),
            },
            Command::AlterIsr { topic, partition, leader, partition_epoch, isr } => {
                let Some(t) = self.topics.get_mut(topic) else {
                    return refuse(RefusalKind::UnknownTopic, format!("topic '{topic}' does not exist"));
                };
                let Some(p) = t.partitions.get_mut(*partition as usize) else {
                    return refuse(RefusalKind::UnknownPartition, format!("{topic} has no partition {partition}"));
                };
                if p.leader != Some(*leader) || p.partition_epoch != *partition_epoch {
                    return refuse(
                        RefusalKind::Stale,
                        format!(
                            "ISR change for {topic}-{partition} from broker {leader} at partition epoch \
                             {partition_epoch}, but the leader is {:?} at epoch {}",
                            p.leader, p.partition_epoch
                        ),
                    );
                }
                if !isr.contains(leader) || isr.iter().any(|n| !p.replicas.contains(n)) {
                    return refuse(RefusalKind::Invalid, format!("ISR {isr:?} is not a subset of {:?}", p.replicas));
                }
                // A fenced broker cannot come back into the ISR until it
                // heartbeats again.
                let brokers = &self.brokers;
                p.isr =
                    isr.iter().copied().filter(|n| n == leader || brokers.get(n).is_some_and(|b| !b.fenced)).collect();
                p.partition_epoch += 1;
                let outcome = Outcome::Partition(p.clone());
                self.finish_reassignment(topic, *partition);
                outcome
            }
            Command::ReassignPartition { topic, partition, replicas } => {
                let Some(p) = self.topics.get(topic).and_then(|t| t.partitions.get(*partition as usize)) else {
                    return refuse(RefusalKind::UnknownPartition, format!("{topic} has no partition {partition}"));
                };
                let distinct: BTreeSet<NodeId> = replicas.iter().copied().collect();
                if replicas.is_empty() || distinct.len() != replicas.len() {
                    return refuse(
                        RefusalKind::Invalid,
                        format!("replicas {replicas:?} must be distinct and not empty"),
                    );
                }
                let unknown = {
                    let live = live_set(&self.brokers);
                    replicas.iter().copied().find(|n| !p.replicas.contains(n) && !live(*n))
                };
                if let Some(n) = unknown {
                    return refuse(RefusalKind::UnknownBroker, format!("broker {n} is not a live, registered broker"));
                }
                if p.target.is_some() {
                    return refuse(RefusalKind::Invalid, format!("{topic}-{partition} is already being reassigned"));
                }
                if *replicas == p.replicas {
                    return Outcome::Done;
                }
                let p = &mut self.topics.get_mut(topic).expect("checked").partitions[*partition as usize];
                p.moving_from = Some(p.replicas.clone());
                for n in replicas {
                    if !p.replicas.contains(n) {
                        p.replicas.push(*n);
                    }
                }
                p.target = Some(replicas.clone());
                p.partition_epoch += 1;
                self.finish_reassignment(topic, *partition);
                Outcome::Done
            }
            Command::CancelReassignment { topic, partition } => {
                let Some(p) = self.topics.get(topic).and_then(|t| t.partitions.get(*partition as usize)) else {
                    return refuse(RefusalKind::UnknownPartition, format!("{topic} has no partition {partition}"));
                };
                let (Some(_), Some(original)) = (&p.target, p.moving_from.clone()) else {
                    return refuse(RefusalKind::Invalid, format!("{topic}-{partition} is not being reassigned"));
                };
                // Only the replicas it started from stay: one of them must
                // hold everything acknowledged.
                if !p.isr.iter().any(|n| original.contains(n)) {
                    return refuse(
                        RefusalKind::Invalid,
                        format!(
                            "none of the replicas {original:?} that {topic}-{partition} started from is in sync \
                             (in sync: {:?}); let the move finish",
                            p.isr
                        ),
                    );
                }
                self.end_reassignment(topic, *partition, original);
                Outcome::Done
            }
            Command::DeployPlugin { name, sha256, spec, blob, keep_progress } => {
                match blob {
                    Some(blob) => {
                        self.blobs.entry(sha256.clone()).or_insert_with(|| blob.clone());
                    }
                    None if sha256.starts_with(BUILTIN_PREFIX) || self.blobs.contains_key(sha256) => {}
                    None => {
                        return refuse(
                            RefusalKind::Invalid,
                            format!("plugin '{name}': component {sha256} is not stored; send it with the deployment"),
                        );
                    }
                }
                let previous = self.plugins.get(name);
                let version = previous.map_or(1, |p| p.version + 1);
                let progress = match previous {
                    Some(p) if *keep_progress => p.progress.clone(),
                    _ => BTreeMap::new(),
                };
                let plugin =
                    PluginImage { version, sha256: sha256.clone(), spec: spec.clone(), paused: None, progress };
                self.plugins.insert(name.clone(), plugin);
                self.collect_blobs();
                Outcome::PluginVersion(version)
            }
            Command::SetPluginPaused { name, version, paused } => {
                let Some(p) = self.plugins.get_mut(name) else {
                    return refuse(RefusalKind::UnknownPlugin, format!("plugin '{name}' is not deployed"));
                };
                if *version != 0 && *version != p.version {
                    return refuse(
                        RefusalKind::Stale,
                        format!("plugin '{name}' is at version {}, not {version}", p.version),
                    );
                }
                p.paused = paused.clone();
                Outcome::Done
            }
            Command::RemovePlugin { name } => {
                if self.plugins.remove(name).is_none() {
                    return refuse(RefusalKind::UnknownPlugin, format!("plugin '{name}' is not deployed"));
                }
                self.collect_blobs();
                Outcome::Done
            }
            Command::PluginProgress { name, version, progress } => {
                let Some(p) = self.plugins.get_mut(name).filter(|p| p.version == *version) else {
                    return refuse(RefusalKind::Stale, format!("plugin '{name}' version {version} is not deployed"));
                };
                for (partition, next) in progress {
                    let at = p.progress.entry(*partition).or_insert(*next);
                    *at = (*at).max(*next);
                }
                Outcome::Done
            }
            Command::AllocateProducerIds { node_id, count } => {
                if !self.brokers.contains_key(node_id) {
                    return refuse(RefusalKind::UnknownBroker, format!("broker {node_id} is not registered"));
                }
                if *count == 0 || *count > PRODUCER_ID_BLOCK_MAX {
                    return refuse(
                        RefusalKind::Invalid,
                        format!("a block of {count} producer ids; 1 to {PRODUCER_ID_BLOCK_MAX} may be taken at once"),
                    );
                }
                let first = self.next_producer_id;
                self.next_producer_id += i64::from(*count);
                Outcome::ProducerIds(first)
            }
            Command::ImportNode { node_id, topics, next_producer_id } => {
                if !self.brokers.contains_key(node_id) {
                    return refuse(RefusalKind::UnknownBroker, format!("broker {node_id} is not registered"));
                }
                let only_here = |t: &TopicImage, n: u32| {
                    t.partitions.len() == n as usize && t.partitions.iter().all(|p| p.replicas == [*node_id])
                };
                if let Some(clash) =
                    topics.iter().find(|t| self.topics.get(&t.name).is_some_and(|have| !only_here(have, t.partitions)))
                {
                    return refuse(
                        RefusalKind::TopicExists,
                        format!(
                            "topic '{}' of node {node_id}'s files exists in the cluster with other replicas",
                            clash.name
                        ),
                    );
                }
                for t in topics {
                    if self.topics.contains_key(&t.name) {
                        continue;
                    }
                    let partitions = (0..t.partitions)
                        .map(|_| PartitionImage {
                            replicas: vec![*node_id],
                            isr: vec![*node_id],
                            leader: Some(*node_id),
                            leader_epoch: 0,
                            partition_epoch: 0,
                            target: None,
                            moving_from: None,
                        })
                        .collect();
                    self.topics
                        .insert(t.name.clone(), TopicImage { id: index, configs: t.configs.clone(), partitions });
                }
                self.next_producer_id = self.next_producer_id.max(*next_producer_id);
                Outcome::Done
            }
            Command::PreferredElection => {
                for (topic, partition) in self.preferred_elections_due() {
                    let p = &mut self.topics.get_mut(&topic).expect("listed topic").partitions[partition as usize];
                    p.leader = Some(p.replicas[0]);
                    p.leader_epoch += 1;
                    p.partition_epoch += 1;
                }
                Outcome::Done
            }
        }
    }

    /// Drops the components no deployment uses any more.
    fn collect_blobs(&mut self) {
        let used: BTreeSet<&String> = self.plugins.values().map(|p| &p.sha256).collect();
        self.blobs.retain(|sha, _| used.contains(sha));
    }

    /// Completes a reassignment once every target replica is in sync.
    fn finish_reassignment(&mut self, topic: &str, partition: u32) {
        let Some(p) = self.topics.get(topic).and_then(|t| t.partitions.get(partition as usize)) else { return };
        let Some(target) = p.target.clone() else { return };
        if target.iter().all(|n| p.isr.contains(n)) {
            self.end_reassignment(topic, partition, target);
        }
    }

    /// Ends a reassignment with `replicas` (its target, or the replicas it
    /// started from when cancelled): the others leave the replicas and the
    /// ISR, and the leader moves into `replicas` if needed.
    fn end_reassignment(&mut self, topic: &str, partition: u32, replicas: Vec<NodeId>) {
        let live = live_set(&self.brokers);
        let Some(t) = self.topics.get_mut(topic) else { return };
        let unclean = t.unclean_election();
        let p = &mut t.partitions[partition as usize];
        p.isr.retain(|n| replicas.contains(n));
        p.target = None;
        p.moving_from = None;
        p.partition_epoch += 1;
        let stays = p.leader.is_some_and(|l| replicas.contains(&l));
        p.replicas = replicas;
        if !stays {
            elect(topic, partition, p, &live, unclean, &mut self.unclean_elections);
        }
    }

    /// Takes a fenced broker out of every ISR (unless it is the last member,
    /// which keeps the record of who holds the data) and moves its
    /// leaderships to live ISR members.
    fn fence(&mut self, node: NodeId) {
        let live = live_set(&self.brokers);
        for (name, t) in &mut self.topics {
            let unclean = t.unclean_election();
            for (i, p) in t.partitions.iter_mut().enumerate() {
                let mut changed = false;
                if p.isr.len() > 1 && p.isr.contains(&node) {
                    p.isr.retain(|n| *n != node);
                    changed = true;
                }
                if p.leader == Some(node) {
                    elect(name, i as u32, p, &live, unclean, &mut self.unclean_elections);
                    changed = true;
                }
                if changed {
                    p.partition_epoch += 1;
                }
            }
        }
    }

    /// Gives a leader to every offline partition that now has an eligible
    /// replica.
    fn elect_offline(&mut self) {
        let live = live_set(&self.brokers);
        for (name, t) in &mut self.topics {
            let unclean = t.unclean_election();
            for (i, p) in t.partitions.iter_mut().enumerate() {
                if p.leader.is_none() && elect(name, i as u32, p, &live, unclean, &mut self.unclean_elections) {
                    p.partition_epoch += 1;
                }
            }
        }
    }

    /// Replica lists for a new topic: Kafka's round robin over live brokers
    /// (rack-interleaved when racks are given), the first replica rotating so
    /// that leaders spread evenly.
    fn assign(&self, partitions: u32, replication_factor: u16) -> Result<Vec<Vec<NodeId>>, Refusal> {
        let live = rack_interleaved(&self.brokers);
        let rf = replication_factor as usize;
        if rf == 0 {
            return Err(Refusal {
                kind: RefusalKind::Invalid,
                message: "replication factor must be at least 1".into(),
            });
        }
        if rf > live.len() {
            return Err(Refusal {
                kind: RefusalKind::NotEnoughBrokers,
                message: format!(
                    "replication factor {rf} needs {rf} live brokers; the cluster has {} ({})",
                    live.len(),
                    self.broker_summary()
                ),
            });
        }
        let n = live.len();
        let rack_of = |node: NodeId| self.brokers.get(&node).and_then(|b| b.rack.as_deref());
        let racks: BTreeSet<_> = live.iter().map(|b| rack_of(*b)).collect();
        // Where the first partition's leader goes depends on how many topics
        // exist, so that many small topics do not all lead on one broker.
        let start = self.topics.len();
        Ok((0..partitions as usize)
            .map(|p| {
                // The step between replicas varies every `n` partitions, as
                // in Kafka, so that followers spread too.
                let step = 1 + (p / n) % (n.max(2) - 1);
                let mut chosen: Vec<NodeId> = vec![live[(start + p) % n]];
                let mut at = (start + p) % n;
                while chosen.len() < rf {
                    let racks_left = racks.len() > chosen.iter().map(|c| rack_of(*c)).collect::<BTreeSet<_>>().len();
                    at = (at + step) % n;
                    // Walk from there to the first broker not chosen yet, on
                    // an unused rack while one is left.
                    let pick = (0..n)
                        .map(|k| live[(at + k) % n])
                        .find(|b| {
                            !chosen.contains(b) && (!racks_left || !chosen.iter().any(|c| rack_of(*c) == rack_of(*b)))
                        })
                        .expect("rf <= live brokers");
                    chosen.push(pick);
                }
                chosen
            })
            .collect())
    }

    fn broker_summary(&self) -> String {
        let parts: Vec<String> =
            self.brokers.values().map(|b| format!("{}{}", b.node_id, if b.fenced { " fenced" } else { "" })).collect();
        if parts.is_empty() { "none registered".into() } else { parts.join(", ") }
    }

    /// Partitions whose ISR is smaller than their replica list.
    pub fn under_replicated(&self) -> Vec<(String, u32)> {
        self.partitions_where(|p| p.leader.is_some() && p.isr.len() < p.replicas.len())
    }

    /// Partitions led by another replica than their preferred (first) one
    /// while the preferred one is live and in sync: what a preferred-leader
    /// election would move back.
    pub fn preferred_elections_due(&self) -> Vec<(String, u32)> {
        let live = live_set(&self.brokers);
        self.partitions_where(|p| {
            let preferred = p.replicas[0];
            p.leader != Some(preferred) && p.isr.contains(&preferred) && live(preferred)
        })
    }

    /// Partitions without a leader.
    pub fn offline(&self) -> Vec<(String, u32)> {
        self.partitions_where(|p| p.leader.is_none())
    }

    fn partitions_where(&self, f: impl Fn(&PartitionImage) -> bool) -> Vec<(String, u32)> {
        let mut out = Vec::new();
        for (name, t) in &self.topics {
            for (i, p) in t.partitions.iter().enumerate() {
                if f(p) {
                    out.push((name.clone(), i as u32));
                }
            }
        }
        out
    }
}

fn live_set(brokers: &BTreeMap<NodeId, BrokerRegistration>) -> impl Fn(NodeId) -> bool + '_ {
    move |n| brokers.get(&n).is_some_and(|b| !b.fenced)
}

/// Moves `p`'s leadership; returns whether the leader changed.
fn elect(
    topic: &str,
    partition: u32,
    p: &mut PartitionImage,
    live: &impl Fn(NodeId) -> bool,
    unclean_allowed: bool,
    unclean_log: &mut Vec<UncleanElection>,
) -> bool {
    let was = p.leader;
    match elect_leader(&p.replicas, &p.isr, live, unclean_allowed) {
        Election::Clean(n) => p.leader = Some(n),
        Election::Unclean(n) => {
            p.leader = Some(n);
            // The new leader's log is the truth now: it is the whole ISR.
            p.isr = vec![n];
            unclean_log.push(UncleanElection {
                topic: topic.to_string(),
                partition,
                leader: n,
                leader_epoch: p.leader_epoch + 1,
            });
            if unclean_log.len() > UNCLEAN_HISTORY {
                unclean_log.remove(0);
            }
            tracing::warn!(topic, partition, leader = n, "unclean leader election: acknowledged records may be lost");
        }
        Election::Offline => p.leader = None,
    }
    if p.leader != was {
        if p.leader.is_some() {
            p.leader_epoch += 1;
        }
        return true;
    }
    false
}

/// Live brokers ordered so that consecutive entries alternate racks (brokers
/// without a rack form one rack of their own).
fn rack_interleaved(brokers: &BTreeMap<NodeId, BrokerRegistration>) -> Vec<NodeId> {
    let mut racks: BTreeMap<Option<&str>, Vec<NodeId>> = BTreeMap::new();
    for b in brokers.values().filter(|b| !b.fenced) {
        racks.entry(b.rack.as_deref()).or_default().push(b.node_id);
    }
    let mut out = Vec::new();
    let longest = racks.values().map(Vec::len).max().unwrap_or(0);
    for i in 0..longest {
        for nodes in racks.values() {
            if let Some(n) = nodes.get(i) {
                out.push(*n);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(nodes: &[(NodeId, Option<&str>)]) -> ClusterImage {
        let mut image = ClusterImage::default();
        for (i, (n, rack)) in nodes.iter().enumerate() {
            let cmd = Command::RegisterBroker {
                node_id: *n,
                address: format!("127.0.0.1:{}", 7000 + n),
                rack: rack.map(str::to_string),
                incarnation: 1,
            };
            assert_eq!(image.apply(i as u64, &cmd), Outcome::Done);
        }
        image
    }

    fn create(image: &mut ClusterImage, name: &str, partitions: u32, rf: u16) -> Outcome {
        let cmd = Command::CreateTopic { name: name.into(), partitions, replication_factor: rf, configs: vec![] };
        image.apply(100, &cmd)
    }

    #[test]
    fn a_reassignment_completes_when_the_new_replicas_are_in_sync() {
        let mut image = cluster(&[(1, None), (2, None), (3, None)]);
        create(&mut image, "t", 1, 2);
        let before = image.topics["t"].partitions[0].clone();
        let leader = before.leader.unwrap();
        let stay = before.replicas.iter().copied().find(|n| *n != leader).unwrap();
        let new = (1..=3).find(|n| !before.replicas.contains(n)).unwrap();
        let reassign = Command::ReassignPartition { topic: "t".into(), partition: 0, replicas: vec![new, stay] };
        assert_eq!(image.apply(101, &reassign), Outcome::Done);
        let p = image.topics["t"].partitions[0].clone();
        assert_eq!(p.replicas.len(), 3, "old and new replicas meanwhile");
        assert_eq!(p.target, Some(vec![new, stay]));
        assert_eq!(p.leader, Some(leader));
        assert!(matches!(image.apply(102, &reassign), Outcome::Refused(_)), "one at a time");
        // The new replica caught up: the leader adds it to the ISR, which
        // completes the move and hands leadership to the target.
        let mut isr = p.isr.clone();
        isr.push(new);
        let alter =
            Command::AlterIsr { topic: "t".into(), partition: 0, leader, partition_epoch: p.partition_epoch, isr };
        assert!(matches!(image.apply(103, &alter), Outcome::Partition(_)));
        let p = &image.topics["t"].partitions[0];
        assert_eq!(p.replicas, vec![new, stay]);
        assert_eq!(p.target, None);
        assert!(!p.isr.contains(&leader));
        assert_eq!(p.leader, Some(new));
        assert_eq!(p.leader_epoch, before.leader_epoch + 1);
        let unknown = Command::ReassignPartition { topic: "t".into(), partition: 0, replicas: vec![9] };
        assert!(matches!(
            image.apply(104, &unknown),
            Outcome::Refused(Refusal { kind: RefusalKind::UnknownBroker, .. })
        ));
    }

    #[test]
    fn a_cancelled_reassignment_goes_back_to_the_replicas_it_started_from() {
        let mut image = cluster(&[(1, None), (2, None), (3, None)]);
        create(&mut image, "t", 1, 2);
        let before = image.topics["t"].partitions[0].clone();
        let leader = before.leader.unwrap();
        let new = (1..=3).find(|n| !before.replicas.contains(n)).unwrap();
        let cancel = Command::CancelReassignment { topic: "t".into(), partition: 0 };
        assert!(matches!(image.apply(101, &cancel), Outcome::Refused(_)), "nothing to cancel");
        // A move off the leader: it is not in the target.
        let reassign = Command::ReassignPartition { topic: "t".into(), partition: 0, replicas: vec![new] };
        assert_eq!(image.apply(102, &reassign), Outcome::Done);
        assert_eq!(image.topics["t"].partitions[0].moving_from, Some(before.replicas.clone()));
        assert_eq!(image.apply(103, &cancel), Outcome::Done);
        let p = &image.topics["t"].partitions[0];
        assert_eq!(p.replicas, before.replicas);
        assert_eq!((p.target.clone(), p.moving_from.clone()), (None, None));
        assert_eq!(p.leader, Some(leader), "the leader was one of them: it stays");
        assert_eq!(p.isr, before.isr);
        assert!(p.partition_epoch > before.partition_epoch);
        // A move may start again afterwards.
        assert_eq!(image.apply(104, &reassign), Outcome::Done);
    }

    #[test]
    fn replicas_and_leaders_spread_evenly() {
        let mut image = cluster(&[(1, None), (2, None), (3, None)]);
        assert_eq!(create(&mut image, "t", 6, 3), Outcome::Done);
        let t = &image.topics["t"];
        let mut leaders = BTreeMap::new();
        for p in &t.partitions {
            let mut r = p.replicas.clone();
            r.sort();
            r.dedup();
            assert_eq!(r.len(), 3, "distinct replicas: {:?}", p.replicas);
            *leaders.entry(p.leader.unwrap()).or_insert(0) += 1;
        }
        assert_eq!(leaders.values().copied().collect::<Vec<_>>(), vec![2, 2, 2]);
    }

    #[test]
    fn replicas_of_a_partition_span_racks() {
        let mut image = cluster(&[(1, Some("a")), (2, Some("a")), (3, Some("b")), (4, Some("b"))]);
        assert_eq!(create(&mut image, "t", 8, 2), Outcome::Done);
        for p in &image.topics["t"].partitions {
            let racks: Vec<_> = p.replicas.iter().map(|n| image.brokers[n].rack.clone()).collect();
            assert_ne!(racks[0], racks[1], "replicas {:?}", p.replicas);
        }
    }

    #[test]
    fn too_few_brokers_is_refused_with_the_count() {
        let mut image = cluster(&[(1, None), (2, None)]);
        match create(&mut image, "t", 1, 3) {
            Outcome::Refused(r) => {
                assert_eq!(r.kind, RefusalKind::NotEnoughBrokers);
                assert!(r.message.contains("the cluster has 2"), "{}", r.message);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn fencing_moves_leadership_within_the_isr_and_back() {
        let mut image = cluster(&[(1, None), (2, None), (3, None)]);
        create(&mut image, "t", 3, 3);
        let before = image.topics["t"].clone();
        let fenced = before.partitions[0].leader.unwrap();
        image.apply(200, &Command::FenceBroker { node_id: fenced });
        for (old, new) in before.partitions.iter().zip(&image.topics["t"].partitions) {
            assert!(!new.isr.contains(&fenced));
            assert_ne!(new.leader, Some(fenced));
            if old.leader == Some(fenced) {
                assert_eq!(new.leader_epoch, old.leader_epoch + 1);
            } else {
                assert_eq!(new.leader, old.leader);
            }
        }
        // Back, and preferred election returns leadership once it is in sync.
        image.apply(201, &Command::UnfenceBroker { node_id: fenced, incarnation: 1 });
        let p0 = image.topics["t"].partitions[0].clone();
        let mut isr = p0.isr.clone();
        isr.push(fenced);
        let alter = Command::AlterIsr {
            topic: "t".into(),
            partition: 0,
            leader: p0.leader.unwrap(),
            partition_epoch: p0.partition_epoch,
            isr,
        };
        assert!(matches!(image.apply(202, &alter), Outcome::Partition(_)));
        // The same change again is stale: the partition epoch moved.
        assert!(matches!(image.apply(203, &alter), Outcome::Refused(Refusal { kind: RefusalKind::Stale, .. })));
        image.apply(204, &Command::PreferredElection);
        assert_eq!(image.topics["t"].partitions[0].leader, Some(fenced));
    }

    #[test]
    fn last_isr_member_fenced_leaves_the_partition_offline_unless_unclean() {
        for unclean in [false, true] {
            let mut image = cluster(&[(1, None), (2, None)]);
            let configs = if unclean { vec![(UNCLEAN_CONFIG.to_string(), "true".to_string())] } else { vec![] };
            let cmd = Command::CreateTopic { name: "t".into(), partitions: 1, replication_factor: 2, configs };
            image.apply(10, &cmd);
            let p = image.topics["t"].partitions[0].clone();
            let leader = p.leader.unwrap();
            let follower = p.replicas.iter().copied().find(|n| *n != leader).unwrap();
            // The follower fell behind: the ISR is the leader alone.
            let alter = Command::AlterIsr {
                topic: "t".into(),
                partition: 0,
                leader,
                partition_epoch: p.partition_epoch,
                isr: vec![leader],
            };
            image.apply(11, &alter);
            image.apply(12, &Command::FenceBroker { node_id: leader });
            let p = &image.topics["t"].partitions[0];
            if unclean {
                assert_eq!(p.leader, Some(follower));
                assert_eq!(image.unclean_elections.len(), 1);
            } else {
                assert_eq!(p.leader, None);
                assert_eq!(p.isr, vec![leader], "the last ISR member stays, it holds the data");
                assert_eq!(image.offline(), vec![("t".to_string(), 0)]);
                // It comes back: it leads again.
                image.apply(13, &Command::UnfenceBroker { node_id: leader, incarnation: 1 });
                assert_eq!(image.topics["t"].partitions[0].leader, Some(leader));
            }
        }
    }

    #[test]
    fn producer_id_blocks_never_overlap_and_survive_a_snapshot() {
        let mut image = cluster(&[(1, None), (2, None)]);
        let take = |image: &mut ClusterImage, node_id, count| {
            image.apply(50, &Command::AllocateProducerIds { node_id, count })
        };
        assert_eq!(take(&mut image, 1, 1000), Outcome::ProducerIds(0));
        assert_eq!(take(&mut image, 2, 1000), Outcome::ProducerIds(1000));
        assert!(matches!(
            take(&mut image, 9, 1000),
            Outcome::Refused(Refusal { kind: RefusalKind::UnknownBroker, .. })
        ));
        assert!(matches!(take(&mut image, 1, 0), Outcome::Refused(Refusal { kind: RefusalKind::Invalid, .. })));
        let json = serde_json::to_string(&image).unwrap();
        let mut restored: ClusterImage = serde_json::from_str(&json).unwrap();
        assert_eq!(take(&mut restored, 1, 10), Outcome::ProducerIds(2000));
    }

    #[test]
    fn a_nodes_files_are_imported_once_and_clashes_refused() {
        let mut image = cluster(&[(1, None), (2, None)]);
        let import = |topics: &[(&str, u32)], next_producer_id| Command::ImportNode {
            node_id: 1,
            topics: topics
                .iter()
                .map(|(name, partitions)| ImportedTopic {
                    name: (*name).into(),
                    partitions: *partitions,
                    configs: vec![("retention.ms".into(), "1000".into())],
                })
                .collect(),
            next_producer_id,
        };
        assert_eq!(image.apply(10, &import(&[("a", 2), ("b", 1)], 7000)), Outcome::Done);
        let a = &image.topics["a"];
        assert_eq!((a.id, a.configs.len(), a.partitions.len()), (10, 1, 2));
        assert!(a.partitions.iter().all(|p| p.replicas == [1] && p.isr == [1] && p.leader == Some(1)));
        // Again (a restart during the migration): the same image.
        let before = image.clone();
        assert_eq!(image.apply(11, &import(&[("a", 2), ("b", 1)], 5000)), Outcome::Done);
        assert_eq!(image, before, "an import repeated changes nothing, not even the producer ids");
        assert_eq!(
            image.apply(12, &Command::AllocateProducerIds { node_id: 2, count: 10 }),
            Outcome::ProducerIds(7000)
        );
        // A topic of the cluster with other replicas is not taken over.
        image.apply(
            13,
            &Command::CreateTopic { name: "c".into(), partitions: 2, replication_factor: 2, configs: vec![] },
        );
        assert!(matches!(
            image.apply(14, &import(&[("c", 2)], 0)),
            Outcome::Refused(Refusal { kind: RefusalKind::TopicExists, .. })
        ));
        let unregistered = Command::ImportNode { node_id: 9, topics: vec![], next_producer_id: 0 };
        assert!(matches!(
            image.apply(15, &unregistered),
            Outcome::Refused(Refusal { kind: RefusalKind::UnknownBroker, .. })
        ));
    }

    #[test]
    fn plugin_versions_components_and_progress() {
        let mut image = cluster(&[(1, None)]);
        let deploy = |sha: &str, blob: Option<&'static [u8]>, keep_progress| Command::DeployPlugin {
            name: "p".into(),
            sha256: sha.into(),
            spec: "{}".into(),
            blob: blob.map(|b| Blob(Bytes::from_static(b))),
            keep_progress,
        };
        // A hash the image does not hold needs its component.
        assert!(matches!(image.apply(1, &deploy("a", None, false)), Outcome::Refused(_)));
        assert_eq!(image.apply(2, &deploy("a", Some(b"wasm-a"), false)), Outcome::PluginVersion(1));
        let progress = |v| Command::PluginProgress { name: "p".into(), version: v, progress: vec![(0, 10), (1, 5)] };
        assert_eq!(image.apply(3, &progress(1)), Outcome::Done);
        // Offsets only move forward; a report for another version is stale.
        let back = Command::PluginProgress { name: "p".into(), version: 1, progress: vec![(0, 3)] };
        assert_eq!(image.apply(4, &back), Outcome::Done);
        assert_eq!(image.plugins["p"].progress, BTreeMap::from([(0, 10), (1, 5)]));
        assert!(matches!(image.apply(5, &progress(7)), Outcome::Refused(_)));
        // A new version with the stored hash needs no component, and keeps
        // the progress when asked to.
        assert_eq!(image.apply(6, &deploy("a", None, true)), Outcome::PluginVersion(2));
        assert_eq!(image.plugins["p"].progress.len(), 2);
        let pause_v1 = Command::SetPluginPaused { name: "p".into(), version: 1, paused: Some("failed".into()) };
        assert!(matches!(image.apply(7, &pause_v1), Outcome::Refused(Refusal { kind: RefusalKind::Stale, .. })));
        assert_eq!(image.plugins["p"].paused, None);
        // Another component replaces the first, which is dropped.
        assert_eq!(image.apply(8, &deploy("b", Some(b"wasm-b"), false)), Outcome::PluginVersion(3));
        assert!(image.plugins["p"].progress.is_empty());
        assert_eq!(image.blobs.keys().collect::<Vec<_>>(), ["b"]);
        // Built-in components are never stored.
        assert_eq!(image.apply(9, &deploy("builtin:identity", None, false)), Outcome::PluginVersion(4));
        assert!(image.blobs.is_empty());
        assert_eq!(image.apply(10, &Command::RemovePlugin { name: "p".into() }), Outcome::Done);
        assert!(matches!(
            image.apply(11, &Command::RemovePlugin { name: "p".into() }),
            Outcome::Refused(Refusal { kind: RefusalKind::UnknownPlugin, .. })
        ));
        // The image survives the log's JSON encoding, components included.
        image.apply(12, &deploy("c", Some(b"\x00\xffbytes"), false));
        let back: ClusterImage = serde_json::from_str(&serde_json::to_string(&image).unwrap()).unwrap();
        assert_eq!(back, image);
    }
}
