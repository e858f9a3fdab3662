//! A partition this broker holds: its log, its replica state (role, epoch
//! history, high watermark) and its long polls; the topics that group them;
//! and how replicas reach other brokers ([`ReplicaLink`]). The decisions
//! about roles and copying are `replica.rs`'s, over these types.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use quiver_log::{AppendError, Appended, Log, OpenError as LogOpenError};
use quiver_protocol::messages::*;
use quiver_protocol::{ErrorCode, WireError};
use quiver_replication::{EpochHistory, NodeId, PartitionLeader};

use crate::config::OpenError;
use crate::errors::{PartitionError, ProduceError, ReplicaError};
use crate::files::{partition_dir, write_atomic};
use crate::topic::{TopicConfig, TopicRecord};

pub(crate) struct Partition {
    pub(crate) id: u32,
    pub(crate) log: Log,
    /// Role, epoch history and high watermark.
    pub(crate) replica: Replica,
    /// Long polls waiting for this partition to change.
    pub(crate) waiters: crate::waiters::Waiters,
}

pub(crate) struct Topic {
    pub(crate) record: TopicRecord,
    pub(crate) config: TopicConfig,
    /// By partition id; `None` where this broker holds no replica.
    pub(crate) partitions: Vec<Option<Arc<Partition>>>,
    /// Where the keyless records of the next `PARTITION_ANY` batch go
    /// (round robin, one partition per batch).
    pub(crate) keyless_next: std::sync::atomic::AtomicU32,
}

impl Topic {
    pub(crate) fn count(&self) -> u32 {
        self.record.partitions
    }

    /// The partitions this broker holds a replica of.
    pub(crate) fn local(&self) -> impl Iterator<Item = &Arc<Partition>> {
        self.partitions.iter().flatten()
    }

    pub(crate) fn held(&self, partition: u32) -> Option<Arc<Partition>> {
        self.partitions.get(partition as usize).cloned().flatten()
    }
}

pub(crate) fn open_topic(logs_dir: &Path, record: TopicRecord, config: TopicConfig) -> Result<Topic, OpenError> {
    let partitions = (0..record.partitions)
        .map(|id| {
            if record.held.as_ref().is_some_and(|held| !held.contains(&id)) {
                return Ok(None);
            }
            Ok(Some(Arc::new(open_partition(logs_dir, &record, &config, id)?)))
        })
        .collect::<Result<_, OpenError>>()?;
    Ok(Topic { record, config, partitions, keyless_next: Default::default() })
}

pub(crate) fn open_partition(
    logs_dir: &Path,
    record: &TopicRecord,
    config: &TopicConfig,
    id: u32,
) -> Result<Partition, OpenError> {
    let dir = partition_dir(logs_dir, &record.name, id);
    let failed = |source| OpenError::Log { topic: record.name.clone(), partition: id, source };
    let log = Log::open(&dir, config.log_config()).map_err(failed)?;
    let replica = Replica::open(&dir, log.log_end_offset())
        .map_err(|error| failed(LogOpenError::Io { path: dir.join("leader-epochs"), error }))?;
    Ok(Partition { id, log, replica, waiters: Default::default() })
}

/// Carries replica fetches to other brokers (the server implements it over
/// QUIC with this node's certificate).
pub trait ReplicaLink: Send + Sync {
    fn fetch(
        &self,
        leader: NodeId,
        address: String,
        request: ReplicaFetchRequest,
    ) -> Pin<Box<dyn Future<Output = Result<ReplicaFetchResponse, WireError>> + Send>>;

    /// Sends a produce request to the broker `leader` at `address` (a
    /// transform writing to a partition another broker leads).
    fn produce(
        &self,
        leader: NodeId,
        address: String,
        request: ProduceRequest,
    ) -> Pin<Box<dyn Future<Output = Result<ProduceResponse, WireError>> + Send>>;

    /// Reads from the broker `leader` at `address` as a consumer would (a
    /// share group's coordinator reading partitions another broker leads).
    fn read(
        &self,
        leader: NodeId,
        address: String,
        request: FetchRequest,
    ) -> Pin<Box<dyn Future<Output = Result<FetchResponse, WireError>> + Send>>;

    /// Asks the broker `node` at `address` which plugins it runs (a deploy
    /// waits until every live broker loaded the new version).
    fn list_plugins(
        &self,
        node: NodeId,
        address: String,
        request: PluginListRequest,
    ) -> Pin<Box<dyn Future<Output = Result<PluginListResponse, WireError>> + Send>>;

    /// Asks the coordinator `node` at `address` to add partitions to a
    /// transaction (a partition's leader, on a transaction's first write
    /// there).
    fn add_partitions_to_txn(
        &self,
        node: NodeId,
        address: String,
        request: AddPartitionsToTxnRequest,
    ) -> Pin<Box<dyn Future<Output = Result<AddPartitionsToTxnResponse, WireError>> + Send>>;

    /// Initialises a transactional id at its coordinator `node` (a
    /// transform's exactly-once producer).
    fn init_producer_id(
        &self,
        node: NodeId,
        address: String,
        request: InitProducerIdRequest,
    ) -> Pin<Box<dyn Future<Output = Result<InitProducerIdResponse, WireError>> + Send>>;

    /// Ends a transaction at its coordinator `node`.
    fn end_txn(
        &self,
        node: NodeId,
        address: String,
        request: EndTxnRequest,
    ) -> Pin<Box<dyn Future<Output = Result<EndTxnResponse, WireError>> + Send>>;

    /// Sends a coordinator's transaction markers to the broker `leader`
    /// at `address`, which leads their partitions.
    fn write_txn_markers(
        &self,
        leader: NodeId,
        address: String,
        request: WriteTxnMarkersRequest,
    ) -> Pin<Box<dyn Future<Output = Result<WriteTxnMarkersResponse, WireError>> + Send>>;
}

/// The link of a single node: there is no other broker to reach.
pub(crate) struct NoPeers;

impl NoPeers {
    fn refuse<T: Send + 'static>(node: NodeId) -> Pin<Box<dyn Future<Output = Result<T, WireError>> + Send>> {
        Box::pin(async move {
            Err(WireError::new(ErrorCode::NotLeader, format!("broker {node} is not reachable: this node runs alone")))
        })
    }
}

impl ReplicaLink for NoPeers {
    fn fetch(
        &self,
        leader: NodeId,
        _: String,
        _: ReplicaFetchRequest,
    ) -> Pin<Box<dyn Future<Output = Result<ReplicaFetchResponse, WireError>> + Send>> {
        Self::refuse(leader)
    }

    fn produce(
        &self,
        leader: NodeId,
        _: String,
        _: ProduceRequest,
    ) -> Pin<Box<dyn Future<Output = Result<ProduceResponse, WireError>> + Send>> {
        Self::refuse(leader)
    }

    fn read(
        &self,
        leader: NodeId,
        _: String,
        _: FetchRequest,
    ) -> Pin<Box<dyn Future<Output = Result<FetchResponse, WireError>> + Send>> {
        Self::refuse(leader)
    }

    fn list_plugins(
        &self,
        node: NodeId,
        _: String,
        _: PluginListRequest,
    ) -> Pin<Box<dyn Future<Output = Result<PluginListResponse, WireError>> + Send>> {
        Self::refuse(node)
    }

    fn add_partitions_to_txn(
        &self,
        node: NodeId,
        _: String,
        _: AddPartitionsToTxnRequest,
    ) -> Pin<Box<dyn Future<Output = Result<AddPartitionsToTxnResponse, WireError>> + Send>> {
        Self::refuse(node)
    }

    fn write_txn_markers(
        &self,
        leader: NodeId,
        _: String,
        _: WriteTxnMarkersRequest,
    ) -> Pin<Box<dyn Future<Output = Result<WriteTxnMarkersResponse, WireError>> + Send>> {
        Self::refuse(leader)
    }

    fn init_producer_id(
        &self,
        node: NodeId,
        _: String,
        _: InitProducerIdRequest,
    ) -> Pin<Box<dyn Future<Output = Result<InitProducerIdResponse, WireError>> + Send>> {
        Self::refuse(node)
    }

    fn end_txn(
        &self,
        node: NodeId,
        _: String,
        _: EndTxnRequest,
    ) -> Pin<Box<dyn Future<Output = Result<EndTxnResponse, WireError>> + Send>> {
        Self::refuse(node)
    }
}

pub(crate) const EPOCHS_FILE: &str = "leader-epochs";

pub(crate) enum Role {
    /// Waiting for the metadata image.
    Unassigned,
    Leader {
        leader: PartitionLeader,
        /// The partition epoch of the image the ISR came from (an ISR change
        /// is proposed against it).
        partition_epoch: i32,
        /// The log end when it began leading in this epoch.
        leading_from: i64,
    },
    Follower {
        leader: NodeId,
        epoch: i32,
    },
    /// The image has no leader for it.
    Offline,
}

pub(crate) struct State {
    pub(crate) role: Role,
    pub(crate) history: EpochHistory,
}

/// A partition's replication state.
pub(crate) struct Replica {
    pub(crate) state: Mutex<State>,
    pub(crate) high_watermark: AtomicI64,
    pub(crate) epochs_file: PathBuf,
}

impl Replica {
    /// The replica of a partition whose log lives in `dir` and ends at
    /// `log_end`: loads its epoch history (dropping epochs that start past
    /// the log end, written just before a crash lost the batches).
    pub(crate) fn open(dir: &std::path::Path, log_end: i64) -> std::io::Result<Replica> {
        let epochs_file = dir.join(EPOCHS_FILE);
        let mut history = EpochHistory::default();
        match std::fs::read_to_string(&epochs_file) {
            Ok(text) => {
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    let parsed = line
                        .split_once(' ')
                        .and_then(|(e, o)| Some((e.trim().parse::<i32>().ok()?, o.trim().parse::<i64>().ok()?)));
                    let Some((epoch, start)) = parsed else {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("{}: bad line '{line}'", epochs_file.display()),
                        ));
                    };
                    history.assign(epoch, start);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        history.truncate(log_end);
        Ok(Replica {
            state: Mutex::new(State { role: Role::Unassigned, history }),
            high_watermark: AtomicI64::new(0),
            epochs_file,
        })
    }

    pub(crate) fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("replica lock")
    }

    /// Whether this replica follows `leader` in `epoch`.
    pub(crate) fn follows(&self, leader: NodeId, epoch: i32) -> bool {
        self.state().ensure_follows(leader, epoch).is_ok()
    }

    pub(crate) fn persist(&self, history: &EpochHistory) -> std::io::Result<()> {
        let body: String = history.entries().iter().map(|(e, o)| format!("{e} {o}\n")).collect();
        write_atomic(&self.epochs_file, body.as_bytes())
    }
}

impl Partition {
    /// Consumers read below this offset.
    pub(crate) fn high_watermark(&self) -> i64 {
        self.replica.high_watermark.load(Ordering::Acquire)
    }

    /// Appends a client's batch if this replica leads, in its epoch, and
    /// tells the leader state; with `acks_all`, refused while the ISR is
    /// below `min.insync.replicas`. Returns the append and its epoch. The
    /// role cannot change during the append (it holds the replica lock), so
    /// a deposed leader never writes behind its follower's back.
    pub(crate) fn append_as_leader(
        &self,
        topic: &str,
        batch: &[u8],
        acks_all: bool,
    ) -> Result<(quiver_log::AppendInfo, i32), ProduceError> {
        let mut state = self.replica.state();
        // A retried batch of an idempotent producer is answered with the
        // offsets it got; like a new one, it is acknowledged only once the
        // high watermark passes it.
        let append = |epoch| match self.log.append_checked(batch, epoch) {
            Ok(Appended::New(info) | Appended::Duplicate(info)) => Ok(info),
            Err(AppendError::Sequence(source)) => {
                Err(ProduceError::Sequence { topic: topic.to_owned(), partition: self.id, source })
            }
            Err(e) => Err(ProduceError::Append(e)),
        };
        match &mut state.role {
            Role::Leader { leader, .. } => {
                if acks_all && let Err(source) = leader.check_acks_all() {
                    return Err(ProduceError::NotEnoughReplicas {
                        topic: topic.to_owned(),
                        partition: self.id,
                        source,
                    });
                }
                let epoch = leader.epoch();
                let info = append(epoch)?;
                let high_watermark = leader.on_append(info.last_offset + 1);
                drop(state);
                // Followers' long polls wait for appends, not for the high
                // watermark.
                if !self.publish(high_watermark) {
                    self.waiters.wake();
                }
                Ok((info, epoch))
            }
            _ => Err(PartitionError::ChangingLeader { topic: topic.to_owned(), partition: self.id }.into()),
        }
    }

    /// Whether the high watermark can be served as "latest": not while a
    /// new leader's is below the log end it started leading at, where its
    /// predecessor's may have been (until the followers confirm the log, a
    /// "latest" from here could go backwards).
    pub(crate) fn high_watermark_known(&self) -> bool {
        match &self.replica.state().role {
            Role::Leader { leading_from, .. } => self.high_watermark() >= *leading_from,
            _ => true,
        }
    }

    /// Whether this replica serves clients: a leader's (not one still
    /// waiting for its role after a restart).
    pub(crate) fn leads(&self) -> bool {
        matches!(self.replica.state().role, Role::Leader { .. })
    }

    /// This broker no longer holds the replica: it leads nothing (waiting
    /// acks=all writes end as not replicated).
    pub(crate) fn retire(&self) {
        self.replica.state().role = Role::Offline;
        self.waiters.wake();
    }

    /// The leader epoch this replica leads in, if it leads.
    pub(crate) fn leader_epoch(&self) -> Option<i32> {
        match &self.replica.state().role {
            Role::Leader { leader, .. } => Some(leader.epoch()),
            _ => None,
        }
    }

    /// Whether this replica still leads in `epoch`.
    pub(crate) fn leads_in(&self, epoch: i32) -> bool {
        match &self.replica.state().role {
            Role::Leader { leader, .. } => leader.epoch() == epoch,
            _ => false,
        }
    }

    pub(crate) fn publish(&self, high_watermark: Option<i64>) -> bool {
        match high_watermark {
            Some(hw) => {
                self.replica.high_watermark.fetch_max(hw, Ordering::AcqRel);
                self.waiters.wake();
                true
            }
            None => false,
        }
    }
}

impl State {
    /// `Ok` while this replica follows `leader` in `epoch`.
    pub(crate) fn ensure_follows(&self, leader: NodeId, epoch: i32) -> Result<(), ReplicaError> {
        match self.role {
            Role::Follower { leader: l, epoch: e } if l == leader && e == epoch => Ok(()),
            _ => Err(ReplicaError::RoleChanged),
        }
    }
}

/// Another broker that leads a partition: its node id and address.
pub(crate) type RemoteLeader = (quiver_controller::NodeId, String);
