//! Broker state: how a node starts (controller, migration, broker), the
//! topics and their partitions' logs, the local record of opened replicas
//! (`topics.json`), and the background flush and retention loops.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use quiver_controller::{Controller, ControllerConfig, Transport};

use crate::config::{BrokerConfig, OpenError};
use crate::errors::{AdminError, PartitionError};
use crate::files::{LOGS_DIR, METADATA_FILE, partition_dir, read_records, write_records};
use crate::partition::{Partition, ReplicaLink, Topic, open_partition, open_topic};
use crate::topic::{PARTITIONS_MAX, TopicConfig, TopicRecord, validate_topic_name};

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

const DELETED_SUFFIX: &str = ".deleted";

/// One node's broker. Cheap to share (`Arc`); every method is safe to call
/// concurrently.
pub struct Broker {
    pub(crate) config: BrokerConfig,
    pub(crate) topics: RwLock<HashMap<String, Arc<Topic>>>,
    /// Serialises topic creation and deletion with the metadata file write.
    admin_lock: tokio::sync::Mutex<()>,
    /// Bumped when every long poll must look again (topics moved away,
    /// shutdown); appends wake the waiters of their partition only.
    pub(crate) wake_all: watch::Sender<u64>,
    pub(crate) shutting_down: AtomicBool,
    pub(crate) plugins: crate::registry::Plugins,
    /// This node's member of the metadata quorum: the image is the truth
    /// about topics, plugins and producer ids, on a single node too.
    pub(crate) controller: Arc<Controller>,
    /// How followers reach leaders (and a transform another broker).
    pub(crate) replica_link: Arc<dyn ReplicaLink>,
    /// When this broker opened: the origin of its monotonic clock.
    pub(crate) started: std::time::Instant,
    /// The block of producer ids this broker hands out.
    pub(crate) producer_ids: ProducerIds,
    /// The consumer groups this broker coordinates.
    pub(crate) coordinator: crate::group_shards::Coordinator,
    /// Which replicas the log cleaner is cleaning.
    pub(crate) cleaners: crate::cleaner::Cleaners,
    /// The transactions this broker coordinates.
    pub(crate) txn_shards: crate::txn_shards::TxnShards,
}

/// The ids this broker may still hand out: `next..end`.
#[derive(Default)]
pub(crate) struct ProducerIds {
    pub(crate) block: tokio::sync::Mutex<(i64, i64)>,
}

/// How a node takes part in a cluster: its controller's configuration, the
/// transport between controllers, and how its followers reach leaders.
pub struct Membership {
    pub controller: ControllerConfig,
    pub transport: Arc<dyn Transport>,
    pub link: Arc<dyn ReplicaLink>,
}

impl Membership {
    /// A single node: the only voter of its own metadata log, with nobody
    /// to talk to (KRaft's combined mode with one voter).
    pub fn single(config: &BrokerConfig) -> Membership {
        Membership {
            controller: ControllerConfig::single(
                config.node_id,
                config.advertised_address.clone(),
                config.data_dir.clone(),
            ),
            transport: Arc::new(quiver_controller::NoPeers),
            link: Arc::new(crate::partition::NoPeers),
        }
    }
}

/// How long a single node waits for its own metadata log at start.
const SINGLE_READY_WAIT: Duration = Duration::from_secs(60);

impl Broker {
    /// Starts a node: its controller (the only voter of its own metadata
    /// log when `membership` is `None`), then, once, the migration of a
    /// data directory written before metadata lived in the log
    /// (`migrate.rs`), then the broker over its data directory, following
    /// the image from then on. A single node returns once it has caught up
    /// with its log, so that it answers at once.
    pub async fn start(config: BrokerConfig, membership: Option<Membership>) -> Result<Arc<Broker>, OpenError> {
        let Membership { controller, transport, link } = membership.unwrap_or_else(|| Membership::single(&config));
        let single = controller.is_single();
        let pending = crate::migrate::pending(&config.data_dir)?;
        let controller = Controller::start(controller, transport).await.map_err(OpenError::Controller)?;
        if pending {
            crate::migrate::run(&config, &controller).await?;
        }
        let broker = {
            let controller = controller.clone();
            tokio::task::spawn_blocking(move || Broker::open(config, controller, link))
                .await
                .map_err(|e| OpenError::Aborted(e.to_string()))??
        };
        broker.follow_image();
        if single {
            let mut caught_up = controller.caught_up();
            if tokio::time::timeout(SINGLE_READY_WAIT, caught_up.wait_for(|c| *c)).await.is_err() {
                tracing::warn!(wait = ?SINGLE_READY_WAIT, "the metadata log has not caught up; clients are told to retry");
            }
        }
        Ok(broker)
    }

    /// Opens the data directory: loads the local topic records, recovers
    /// every partition's log, and removes leftovers of deleted topics.
    fn open(
        config: BrokerConfig,
        controller: Arc<Controller>,
        link: Arc<dyn ReplicaLink>,
    ) -> Result<Arc<Broker>, OpenError> {
        let logs_dir = config.data_dir.join(LOGS_DIR);
        std::fs::create_dir_all(&logs_dir).map_err(|source| OpenError::DataDir { path: logs_dir.clone(), source })?;
        remove_deleted_dirs(&logs_dir);
        let meta_path = config.data_dir.join(METADATA_FILE);
        let meta = read_records(&meta_path)?;
        let mut topics = HashMap::new();
        for record in meta {
            if record.cluster_id.is_none() {
                return Err(OpenError::Metadata {
                    path: meta_path.clone(),
                    reason: format!(
                        "topic '{}' is not in the metadata log (its migration did not finish)",
                        record.name
                    ),
                });
            }
            let config_t = config
                .topic_defaults
                .clone()
                .with_overrides(record.overrides.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .map_err(|reason| OpenError::Metadata { path: meta_path.clone(), reason })?;
            let topic = open_topic(&logs_dir, record, config_t)?;
            topics.insert(topic.record.name.clone(), Arc::new(topic));
        }
        let plugins =
            crate::registry::Plugins::open(&config.data_dir, config.plugins.clone()).map_err(OpenError::Plugins)?;
        tracing::info!(topics = topics.len(), dir = %config.data_dir.display(), "broker opened");
        Ok(Arc::new(Broker {
            config,
            topics: RwLock::new(topics),
            admin_lock: tokio::sync::Mutex::new(()),
            wake_all: watch::channel(0).0,
            shutting_down: AtomicBool::new(false),
            plugins,
            controller,
            replica_link: link,
            started: std::time::Instant::now(),
            producer_ids: Default::default(),
            coordinator: Default::default(),
            cleaners: Default::default(),
            txn_shards: Default::default(),
        }))
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    pub(crate) fn topic(&self, name: &str) -> Option<Arc<Topic>> {
        self.topics.read().expect("topics lock").get(name).cloned()
    }

    /// A partition this broker leads (on a single node: any partition).
    pub(crate) fn partition(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<(Arc<Topic>, Arc<Partition>), PartitionError> {
        let me = self.config.node_id;
        let id = {
            let image = self.controller.image();
            let image = image.borrow();
            crate::errors::check_leader(me, &image, topic, partition)?;
            image.topics.get(topic).map(|t| t.id)
        };
        // Not open here yet, or still the topic of that name deleted before
        // (the reconcile loop is about to replace it): never the wrong log.
        let t = self.topic(topic).filter(|t| t.record.cluster_id == id).ok_or_else(|| PartitionError::Opening {
            me,
            topic: topic.to_owned(),
            partition,
        })?;
        let p = self.held_partition(&t, partition)?;
        if !p.leads() {
            return Err(PartitionError::Becoming { me, topic: topic.to_owned(), partition });
        }
        Ok((t, p))
    }

    /// The open topic `name` is, if it is the image's topic of that name
    /// (not one deleted meanwhile, about to be replaced).
    pub(crate) fn current_topic(&self, name: &str) -> Result<Arc<Topic>, PartitionError> {
        let id = self.controller.image().borrow().topics.get(name).map(|t| t.id);
        let Some(id) = id else {
            return Err(PartitionError::UnknownTopic { topic: name.to_owned() });
        };
        self.topic(name)
            .filter(|t| t.record.cluster_id == Some(id))
            .ok_or_else(|| PartitionError::OpeningTopic { me: self.config.node_id, topic: name.to_owned() })
    }

    /// Partition `partition` of a topic, if this broker holds a replica of
    /// it (in whatever role).
    pub(crate) fn held_partition(&self, t: &Topic, partition: u32) -> Result<Arc<Partition>, PartitionError> {
        let topic = t.record.name.clone();
        if partition >= t.count() {
            return Err(PartitionError::UnknownPartition { topic, partition, count: t.count() });
        }
        t.held(partition).ok_or(PartitionError::NotHeld { me: self.config.node_id, topic, partition })
    }

    pub(crate) fn sorted_topics(&self) -> Vec<Arc<Topic>> {
        let mut all: Vec<_> = self.topics.read().expect("topics lock").values().cloned().collect();
        all.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        all
    }

    /// Checks a new topic's name, partition count and configs; returns the
    /// overrides and the effective config.
    pub(crate) fn validate_new_topic(
        &self,
        name: &str,
        partitions: u32,
        overrides: &[(String, String)],
    ) -> Result<(BTreeMap<String, String>, TopicConfig), AdminError> {
        validate_topic_name(name).map_err(AdminError::InvalidTopicName)?;
        if partitions == 0 || partitions > PARTITIONS_MAX {
            return Err(AdminError::InvalidPartitions(format!(
                "partition count must be between 1 and {PARTITIONS_MAX}, not {partitions}"
            )));
        }
        let mut seen = BTreeMap::new();
        for (k, v) in overrides {
            if seen.insert(k.clone(), v.clone()).is_some() {
                return Err(AdminError::InvalidConfig(format!("config '{k}' given twice")));
            }
        }
        let config = self
            .config
            .topic_defaults
            .clone()
            .with_overrides(seen.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .map_err(AdminError::InvalidConfig)?;
        self.check_topic_plugins(&config)?;
        Ok((seen, config))
    }

    /// Opens a new topic's logs and records it in the metadata file.
    pub(crate) async fn create_local_topic(
        &self,
        record: TopicRecord,
        config: TopicConfig,
    ) -> Result<Arc<Topic>, AdminError> {
        let name = record.name.clone();
        let partitions = record.partitions;
        let _guard = self.admin_lock.lock().await;
        if self.topic(&name).is_some() {
            return Err(AdminError::TopicExists(name));
        }
        let logs_dir = self.config.data_dir.join(LOGS_DIR);
        let topic = Arc::new(open_topic(&logs_dir, record, config).map_err(storage)?);
        let mut records: Vec<TopicRecord> = self.sorted_topics().iter().map(|t| t.record.clone()).collect();
        records.push(topic.record.clone());
        self.write_metadata(records).map_err(storage)?;
        self.topics.write().expect("topics lock").insert(name.clone(), topic.clone());
        tracing::info!(topic = name, partitions, "topic created");
        Ok(topic)
    }

    /// Deletes a topic: it disappears from the metadata file first, then its
    /// directories are renamed away and removed in the background. Readers
    /// holding a partition finish from their open files.
    pub(crate) async fn remove_local_topic(&self, name: &str) -> Result<(), AdminError> {
        let _guard = self.admin_lock.lock().await;
        let topic = self.topic(name).ok_or_else(|| AdminError::UnknownTopic(name.to_owned()))?;
        let records: Vec<TopicRecord> =
            self.sorted_topics().iter().filter(|t| t.record.name != name).map(|t| t.record.clone()).collect();
        self.write_metadata(records).map_err(storage)?;
        self.topics.write().expect("topics lock").remove(name);
        let logs_dir = self.config.data_dir.join(LOGS_DIR);
        let stamp = now_ms();
        for p in topic.local() {
            // Its long polls answer "unknown topic" now.
            p.waiters.wake();
            remove_partition_dir(&logs_dir, name, p.id, stamp);
        }
        tracing::info!(topic = name, "topic deleted");
        Ok(())
    }

    /// The image moved replicas of an existing topic to or away from this
    /// broker (a reassignment): opens the new ones, retires and removes the
    /// dropped ones. Other partitions keep their open logs.
    pub(crate) async fn change_held(&self, name: &str, held: Vec<u32>) -> Result<(), AdminError> {
        let _guard = self.admin_lock.lock().await;
        let Some(old) = self.topic(name) else { return Ok(()) };
        let logs_dir = self.config.data_dir.join(LOGS_DIR);
        let mut record = old.record.clone();
        record.held = Some(held.clone());
        let mut partitions = Vec::with_capacity(old.partitions.len());
        let mut dropped = Vec::new();
        for (id, slot) in old.partitions.iter().enumerate() {
            let id = id as u32;
            partitions.push(match (slot, held.contains(&id)) {
                (Some(p), true) => Some(p.clone()),
                (Some(p), false) => {
                    dropped.push(p.clone());
                    None
                }
                (None, true) => Some(Arc::new(open_partition(&logs_dir, &record, &old.config, id).map_err(storage)?)),
                (None, false) => None,
            });
        }
        let topic =
            Arc::new(Topic { record, config: old.config.clone(), partitions, keyless_next: Default::default() });
        let records: Vec<TopicRecord> = self
            .sorted_topics()
            .iter()
            .map(|t| if t.record.name == name { topic.record.clone() } else { t.record.clone() })
            .collect();
        self.write_metadata(records).map_err(storage)?;
        self.topics.write().expect("topics lock").insert(name.to_string(), topic);
        let stamp = now_ms();
        for p in dropped {
            p.retire();
            remove_partition_dir(&logs_dir, name, p.id, stamp);
            tracing::info!(topic = name, partition = p.id, "replica moved away");
        }
        self.wake_all.send_modify(|n| *n += 1);
        Ok(())
    }

    fn write_metadata(&self, topics: Vec<TopicRecord>) -> std::io::Result<()> {
        write_records(&self.config.data_dir.join(METADATA_FILE), topics)
    }

    /// Starts the background flush, retention and cleaner loops; they stop when
    /// [`Broker::shutdown`] is called.
    pub fn spawn_background(self: &Arc<Self>) {
        self.start_plugins();
        tokio::spawn(self.clone().coordinate_groups());
        tokio::spawn(self.clone().coordinate_transactions());
        if let Some(interval_ms) = self.config.flush_interval_ms {
            let broker = self.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(interval_ms.max(1)));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                while !broker.shutting_down.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let b = broker.clone();
                    let _ = tokio::task::spawn_blocking(move || b.flush_all()).await;
                }
            });
        }
        self.start_cleaners(Arc::new(crate::cleaner::Throttle::new(self.config.cleaner.io_bytes_per_second)));
        let broker = self.clone();
        tokio::spawn(async move {
            let mut tick =
                tokio::time::interval(Duration::from_millis(broker.config.retention_check_interval_ms.max(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !broker.shutting_down.load(Ordering::Relaxed) {
                tick.tick().await;
                let b = broker.clone();
                let _ = tokio::task::spawn_blocking(move || b.enforce_retention()).await;
            }
        });
    }

    fn flush_all(&self) {
        for topic in self.sorted_topics() {
            for p in topic.local() {
                // Also syncs a segment rolled after its records were durable
                // (acks=all): the recovery point, and what the cleaner may
                // touch, move past it.
                if let Err(e) = p.log.flush() {
                    tracing::error!(topic = %topic.record.name, partition = p.id, error = %e, "background flush failed");
                }
            }
        }
    }

    /// Applies retention to every partition now.
    pub fn enforce_retention(&self) {
        let now = now_ms();
        for topic in self.sorted_topics() {
            for p in topic.local() {
                match p.log.enforce_retention(now) {
                    Ok(report) if report.segments_deleted > 0 => tracing::info!(
                        topic = %topic.record.name,
                        partition = p.id,
                        segments = report.segments_deleted,
                        bytes = report.bytes_deleted,
                        log_start_offset = report.log_start_offset,
                        "retention deleted segments"
                    ),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(topic = %topic.record.name, partition = p.id, error = %e, "retention failed")
                    }
                }
            }
        }
    }

    /// Stops accepting produce requests, fsyncs and closes every log. Safe to
    /// call more than once.
    pub fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.wake_all.send_modify(|n| *n += 1); // wake long polls so they return
        for topic in self.sorted_topics() {
            for p in topic.local() {
                if let Err(e) = p.log.close() {
                    tracing::error!(topic = %topic.record.name, partition = p.id, error = %e, "close failed");
                }
            }
        }
        tracing::info!("broker shut down cleanly");
    }
}

/// Renames a partition's directory away (readers holding its files finish
/// from them) and removes it in the background; `remove_deleted_dirs`
/// finishes the job after a crash.
fn remove_partition_dir(logs_dir: &Path, topic: &str, partition: u32, stamp: i64) {
    let dir = partition_dir(logs_dir, topic, partition);
    let gone = logs_dir.join(format!("{topic}-{partition}.{stamp}{DELETED_SUFFIX}"));
    if let Err(e) = std::fs::rename(&dir, &gone) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot rename a removed partition");
        return;
    }
    tokio::task::spawn_blocking(move || {
        if let Err(e) = std::fs::remove_dir_all(&gone) {
            tracing::warn!(dir = %gone.display(), error = %e, "cannot remove a removed partition");
        }
    });
}

fn remove_deleted_dirs(logs_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(logs_dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().ends_with(DELETED_SUFFIX) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A storage failure of a topic administration step.
fn storage(e: impl std::error::Error + Send + Sync + 'static) -> AdminError {
    AdminError::Storage(Box::new(e))
}
