//! Quiver's metadata quorum.
//!
//! The controllers (by default every node of a small cluster, as in KRaft's
//! combined mode) run Raft (openraft) over a log of [`Command`]s; every node
//! applies the committed log to a [`ClusterImage`] (brokers, topics,
//! partition replicas, leaders, ISRs and leader epochs). Brokers that are
//! not voters follow the same log as Raft learners.
//!
//! The controller leader also tracks broker liveness in memory: brokers
//! heartbeat to it, and one that stays silent longer than the session
//! timeout is fenced by a log command, whose application moves its
//! leaderships to live in-sync replicas.
//!
//! No sockets here: messages travel through a [`Transport`] the server
//! crate implements over QUIC with mutual TLS.

#![forbid(unsafe_code)]

mod image;
mod rpc;
mod sessions;
mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, Config, Raft, ServerState, SnapshotPolicy};
use tokio::sync::watch;

use crate::sessions::SessionTracker;

pub use image::{
    BUILTIN_PREFIX, Blob, BrokerRegistration, ClusterImage, Command, ImportedTopic, Outcome, PartitionImage,
    PluginImage, Refusal, RefusalKind, TopicImage, UNCLEAN_CONFIG, UncleanElection,
};
pub use rpc::{ControllerRequest, ControllerResponse, NoPeers, SendError, Transport, TransportFuture};

pub type NodeId = u32;

openraft::declare_raft_types!(
    /// openraft's type configuration for the metadata log.
    pub TypeConfig:
        D = Command,
        R = Outcome,
        NodeId = NodeId,
        Node = BasicNode,
        SnapshotData = std::io::Cursor<Vec<u8>>,
);

/// How a controller is set up.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    pub node_id: NodeId,
    /// This node's `host:port` (what other nodes and clients dial).
    pub address: String,
    pub rack: Option<String>,
    /// The metadata log lives in `data_dir/controller/`.
    pub data_dir: PathBuf,
    /// The Raft voters and their addresses. A node not listed joins as a
    /// learner (it follows the log but does not vote).
    pub voters: BTreeMap<NodeId, String>,
    /// A broker silent for this long is fenced.
    pub session_timeout: Duration,
    /// How often brokers heartbeat.
    pub heartbeat_interval: Duration,
    /// How long a write waits for a leader before failing with "no quorum".
    pub write_timeout: Duration,
    /// A snapshot of the image is taken every this many log entries; older
    /// entries are then dropped.
    pub snapshot_every: u64,
    /// How often the leader moves leaderships back to preferred replicas
    /// that are live and in sync (`None`: only on request).
    pub leader_rebalance_interval: Option<Duration>,
}

impl ControllerConfig {
    pub fn new(node_id: NodeId, address: String, data_dir: PathBuf, voters: BTreeMap<NodeId, String>) -> Self {
        ControllerConfig {
            node_id,
            address,
            rack: None,
            data_dir,
            voters,
            session_timeout: Duration::from_millis(1500),
            heartbeat_interval: Duration::from_millis(200),
            write_timeout: Duration::from_secs(10),
            snapshot_every: 1000,
            leader_rebalance_interval: Some(Duration::from_secs(30)),
        }
    }

    /// A single node: the only voter of its own metadata log. Its session
    /// is long, since there is nobody to fail over to: a node that stalls
    /// (a long GC-like pause, a saturated machine) must not fence itself.
    pub fn single(node_id: NodeId, address: String, data_dir: PathBuf) -> Self {
        let voters = BTreeMap::from([(node_id, address.clone())]);
        ControllerConfig {
            session_timeout: Duration::from_secs(3600),
            leader_rebalance_interval: None,
            ..ControllerConfig::new(node_id, address, data_dir, voters)
        }
    }

    /// Whether this node is the only voter.
    pub fn is_single(&self) -> bool {
        self.voters.len() == 1 && self.voters.contains_key(&self.node_id)
    }
}

/// Why a metadata write did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum WriteError {
    #[error("{0}")]
    Refused(Refusal),
    #[error("no controller quorum: {0}")]
    NoQuorum(String),
    /// Sent to a node that is not the leader (the caller retries there).
    #[error("controller {node} is not the leader (leader: {leader:?})")]
    NotLeader { node: NodeId, leader: Option<NodeId> },
    /// The node could not be reached: nothing was applied.
    #[error("{0}")]
    Unreachable(String),
    /// The request reached the leader but its fate is unknown.
    #[error("the controller leader did not answer: {0}")]
    Unknown(String),
}

/// What the leader said to a broker's registration or heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Liveness {
    /// With the index the leader has applied the metadata log to.
    Alive { applied: u64 },
    /// The leader does not know this incarnation: register again.
    Unknown,
    /// Another live process holds this node id.
    IdTaken(String),
}

/// Where a heartbeat came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// This process, leading.
    Itself,
    /// Another process (a different node, or one claiming this node's id).
    Wire,
}

/// State of this node's own broker registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registration {
    Pending,
    Registered,
    /// Fatal: the process should stop with this message.
    Refused(String),
}

/// One node's controller: a Raft member (voter or learner) and, on the
/// leader, the broker-liveness tracker.
pub struct Controller {
    config: ControllerConfig,
    raft: Raft<TypeConfig>,
    transport: Arc<dyn Transport>,
    image: watch::Receiver<Arc<ClusterImage>>,
    sessions: Mutex<SessionTracker>,
    incarnation: u64,
    registration: watch::Sender<Registration>,
    stopped: std::sync::atomic::AtomicBool,
    caught_up: watch::Sender<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the metadata log in {dir}: {source}")]
    Storage { dir: PathBuf, source: std::io::Error },
    #[error("cannot start Raft: {0}")]
    Raft(String),
}

impl Controller {
    /// Opens the metadata log, starts Raft, and (on a voter of a new
    /// cluster) proposes the initial membership. Spawns the liveness loop
    /// and this node's own registration and heartbeats.
    pub async fn start(config: ControllerConfig, transport: Arc<dyn Transport>) -> Result<Arc<Controller>, StartError> {
        let dir = config.data_dir.join("controller");
        let storage = |source| StartError::Storage { dir: dir.clone(), source };
        let log = store::LogStore::open(&dir).map_err(storage)?;
        let machine = store::StateMachine::open(&dir).map_err(storage)?;
        let image = machine.subscribe();
        let raft_config = Config {
            cluster_name: "quiver".into(),
            heartbeat_interval: 100,
            election_timeout_min: 400,
            election_timeout_max: 800,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every),
            max_in_snapshot_log_to_keep: config.snapshot_every / 10,
            ..Default::default()
        }
        .validate()
        .map_err(|e| StartError::Raft(e.to_string()))?;
        let network = rpc::Network { transport: transport.clone() };
        let raft = Raft::new(config.node_id, Arc::new(raft_config), network, log, machine)
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        if config.voters.contains_key(&config.node_id)
            && !raft.is_initialized().await.map_err(|e| StartError::Raft(e.to_string()))?
        {
            let members: BTreeMap<NodeId, BasicNode> =
                config.voters.iter().map(|(id, addr)| (*id, BasicNode { addr: addr.clone() })).collect();
            // Every voter proposes the same membership; all but one are
            // refused, which is expected.
            if let Err(e) = raft.initialize(members).await {
                tracing::debug!(error = %e, "metadata log already initialised");
            }
        }
        let incarnation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            ^ (std::process::id() as u64) << 32;
        let controller = Arc::new(Controller {
            sessions: Mutex::new(SessionTracker::new(config.session_timeout)),
            config,
            raft,
            transport,
            image,
            incarnation,
            registration: watch::channel(Registration::Pending).0,
            stopped: false.into(),
            caught_up: watch::channel(false).0,
        });
        tokio::spawn(controller.clone().liveness_loop());
        tokio::spawn(controller.clone().heartbeat_loop());
        Ok(controller)
    }

    pub fn node_id(&self) -> NodeId {
        self.config.node_id
    }

    pub fn config(&self) -> &ControllerConfig {
        &self.config
    }

    /// The latest applied metadata; changes are signalled on the receiver.
    pub fn image(&self) -> watch::Receiver<Arc<ClusterImage>> {
        self.image.clone()
    }

    /// This node's broker registration state.
    pub fn registration(&self) -> watch::Receiver<Registration> {
        self.registration.subscribe()
    }

    /// True once this node has applied the metadata log as far as the
    /// leader had when it accepted this node's heartbeat: before that, the
    /// image may be stale (e.g. right after a restart, before the log is
    /// replayed), and nothing absent from it may be taken as deleted.
    pub fn caught_up(&self) -> watch::Receiver<bool> {
        self.caught_up.subscribe()
    }

    /// Whether [`Controller::caught_up`] has turned true (it never turns
    /// back).
    pub fn is_caught_up(&self) -> bool {
        *self.caught_up.borrow()
    }

    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The current Raft leader as this node knows it.
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// Voters, learners and their addresses.
    pub fn members(&self) -> (BTreeSet<NodeId>, BTreeMap<NodeId, String>) {
        let m = self.raft.metrics().borrow().membership_config.clone();
        let voters = m.membership().voter_ids().collect();
        let nodes = m.membership().nodes().map(|(id, n)| (*id, n.addr.clone())).collect();
        (voters, nodes)
    }

    /// Raft term, last log index and last applied index, for `cluster info`.
    pub fn raft_progress(&self) -> (u64, Option<u64>, Option<u64>) {
        let m = self.raft.metrics().borrow().clone();
        (m.current_term, m.last_log_index, m.last_applied.map(|l| l.index))
    }

    /// Stops Raft, heartbeats and the liveness loop.
    pub async fn shutdown(&self) {
        self.stopped.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.raft.shutdown().await;
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Answers a request from another node (the server calls this for the
    /// controller API).
    pub async fn handle(&self, request: ControllerRequest) -> ControllerResponse {
        self.answer(request, Origin::Wire).await
    }

    /// Answers `request`, which came from `origin`.
    async fn answer(&self, request: ControllerRequest, origin: Origin) -> ControllerResponse {
        match request {
            ControllerRequest::Vote(r) => ControllerResponse::Vote(self.raft.vote(r).await),
            ControllerRequest::Append(r) => {
                if let Some(leader) = r.vote.leader_id().voted_for() {
                    self.sessions.lock().expect("sessions lock").heard_leader(leader, Instant::now());
                }
                ControllerResponse::Append(self.raft.append_entries(r).await)
            }
            ControllerRequest::Snapshot(r) => ControllerResponse::Snapshot(self.raft.install_snapshot(r).await),
            ControllerRequest::Write(cmd) => ControllerResponse::Write(self.write_local(cmd).await),
            ControllerRequest::AlterVoters { add, remove } => {
                ControllerResponse::Voters(self.alter_voters_local(add, remove).await)
            }
            ControllerRequest::Heartbeat { node_id, incarnation, address, rack, register } => {
                ControllerResponse::Heartbeat(
                    self.on_heartbeat(node_id, incarnation, address, rack, register, origin).await,
                )
            }
        }
    }

    /// Appends a command to the metadata log and returns its outcome once
    /// applied, forwarding to the leader when this node is not it. Waits up
    /// to the write timeout for a leader.
    pub async fn write(&self, command: Command) -> Result<Outcome, WriteError> {
        self.on_leader(
            || self.write_local(command.clone()),
            || ControllerRequest::Write(command.clone()),
            |answer| match answer {
                ControllerResponse::Write(w) => Some(w),
                _ => None,
            },
        )
        .await
    }

    /// Changes the Raft voters: `add` (members already following the log as
    /// learners: started brokers) become voters, `remove` go back to
    /// learners. Returns the voters after the change.
    pub async fn alter_voters(&self, add: Vec<NodeId>, remove: Vec<NodeId>) -> Result<Vec<NodeId>, WriteError> {
        self.on_leader(
            || self.alter_voters_local(add.clone(), remove.clone()),
            || ControllerRequest::AlterVoters { add: add.clone(), remove: remove.clone() },
            |answer| match answer {
                ControllerResponse::Voters(v) => Some(v),
                _ => None,
            },
        )
        .await
    }

    async fn alter_voters_local(&self, add: Vec<NodeId>, remove: Vec<NodeId>) -> Result<Vec<NodeId>, WriteError> {
        let refuse = |kind, message: String| Err(WriteError::Refused(Refusal { kind, message }));
        let (voters, nodes) = self.members();
        if let Some(n) = add.iter().find(|n| !nodes.contains_key(n)) {
            return refuse(
                RefusalKind::UnknownBroker,
                format!("node {n} does not follow the metadata log yet: start it first (it joins as a learner)"),
            );
        }
        let mut next = voters.clone();
        next.extend(add);
        for n in &remove {
            next.remove(n);
        }
        if next.is_empty() {
            return refuse(RefusalKind::Invalid, "the metadata quorum needs at least one voter".into());
        }
        if next == voters {
            return Ok(voters.into_iter().collect());
        }
        match self.raft.change_membership(next.clone(), true).await {
            Ok(_) => Ok(next.into_iter().collect()),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(WriteError::NotLeader { node: self.config.node_id, leader: f.leader_id })
            }
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                refuse(RefusalKind::Invalid, e.to_string())
            }
            Err(e) => Err(WriteError::Unknown(e.to_string())),
        }
    }

    /// Runs `local` on the leader: here when this node leads, else sent
    /// there as `remote()` and its answer taken out with `answer`. Waits up
    /// to the write timeout for a leader.
    async fn on_leader<T, Local, Fut>(
        &self,
        local: Local,
        remote: impl Fn() -> ControllerRequest,
        answer: impl Fn(ControllerResponse) -> Option<Result<T, WriteError>>,
    ) -> Result<T, WriteError>
    where
        Local: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, WriteError>>,
    {
        let deadline = Instant::now() + self.config.write_timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let attempt = async {
                match self.leader() {
                    Some(l) if l == self.config.node_id => local().await,
                    Some(l) => self.send_to(l, remote()).await.and_then(|r| {
                        let unexpected = format!("unexpected answer {r:?}");
                        answer(r).unwrap_or(Err(WriteError::Unknown(unexpected)))
                    }),
                    None => Err(WriteError::NotLeader { node: self.config.node_id, leader: None }),
                }
            };
            let Ok(attempt) = tokio::time::timeout(remaining, attempt).await else {
                // A leader that lost its majority cannot commit; the entry
                // may still commit if the majority returns.
                return Err(WriteError::NoQuorum(format!(
                    "the change was not committed within {:?}: a majority of the voters must be up and \
                     reachable (it may still be applied when they are back)",
                    self.config.write_timeout
                )));
            };
            match attempt {
                Err(WriteError::NotLeader { .. } | WriteError::NoQuorum(_) | WriteError::Unreachable(_))
                    if Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(WriteError::NotLeader { .. } | WriteError::Unreachable(_)) => return Err(self.no_quorum()),
                other => return other,
            }
        }
    }

    fn no_quorum(&self) -> WriteError {
        let voters: Vec<String> = self.config.voters.iter().map(|(id, a)| format!("{id}@{a}")).collect();
        WriteError::NoQuorum(format!(
            "the metadata log has had no leader for {:?} (voters {}); a majority of the voters must be up \
             and reachable",
            self.config.write_timeout,
            voters.join(",")
        ))
    }

    async fn write_local(&self, command: Command) -> Result<Outcome, WriteError> {
        match self.raft.client_write(command).await {
            Ok(r) => match r.data {
                Outcome::Refused(refusal) => Err(WriteError::Refused(refusal)),
                outcome => Ok(outcome),
            },
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(WriteError::NotLeader { node: self.config.node_id, leader: f.leader_id })
            }
            Err(e) => Err(WriteError::Unknown(e.to_string())),
        }
    }

    /// Sends a request to a member, found in the Raft membership or, before
    /// this node has any, in the configured voters.
    async fn send_to(&self, node: NodeId, request: ControllerRequest) -> Result<ControllerResponse, WriteError> {
        let (_, nodes) = self.members();
        let Some(address) = nodes.get(&node).or(self.config.voters.get(&node)).cloned() else {
            return Err(WriteError::NotLeader { node: self.config.node_id, leader: Some(node) });
        };
        let body = serde_json::to_vec(&request).expect("request serialises");
        match self.transport.send(node, address, body).await {
            Ok(raw) => serde_json::from_slice(&raw).map_err(|e| WriteError::Unknown(e.to_string())),
            // Nothing was applied if the node could not be reached; a
            // timeout after sending is reported as unknown by the transport.
            Err(rpc::SendError::Unreachable(e)) => Err(WriteError::Unreachable(e)),
            Err(rpc::SendError::Unknown(e)) => Err(WriteError::Unknown(e)),
        }
    }

    /// On the leader: a broker's heartbeat (or registration).
    async fn on_heartbeat(
        &self,
        node_id: NodeId,
        incarnation: u64,
        address: String,
        rack: Option<String>,
        register: bool,
        origin: Origin,
    ) -> Result<Liveness, WriteError> {
        if self.leader() != Some(self.config.node_id) {
            return Err(WriteError::NotLeader { node: self.config.node_id, leader: self.leader() });
        }
        let now = Instant::now();
        {
            // The leader's own process holds its id: it is a restart of the
            // node the image knows (on a single node, the only way back),
            // not a second process.
            if register
                && origin == Origin::Wire
                && self.sessions.lock().expect("sessions lock").id_taken(node_id, incarnation, now)
            {
                let holder = self.image.borrow().brokers.get(&node_id).map(|b| b.address.clone()).unwrap_or_default();
                return Ok(Liveness::IdTaken(format!(
                    "node id {node_id} is already taken by a live broker at {holder}; stop it or choose another id"
                )));
            }
        }
        let known = self.image.borrow().brokers.get(&node_id).cloned();
        if register {
            // Learners follow the metadata log without voting.
            let (voters, nodes) = self.members();
            if !voters.contains(&node_id) && !nodes.contains_key(&node_id) {
                let _ = self.raft.add_learner(node_id, BasicNode { addr: address.clone() }, false).await;
            }
            let same = known
                .as_ref()
                .is_some_and(|b| b.incarnation == incarnation && b.address == address && b.rack == rack && !b.fenced);
            if !same {
                self.write_local(Command::RegisterBroker { node_id, address, rack, incarnation }).await?;
            }
        } else {
            match known {
                Some(b) if b.incarnation == incarnation => {
                    if b.fenced {
                        self.write_local(Command::UnfenceBroker { node_id, incarnation }).await?;
                    }
                }
                _ => return Ok(Liveness::Unknown),
            }
        }
        self.sessions.lock().expect("sessions lock").alive(node_id, incarnation, now);
        Ok(Liveness::Alive { applied: self.raft_progress().2.unwrap_or(0) })
    }

    /// Sends this node's registration, then heartbeats, to the leader.
    async fn heartbeat_loop(self: Arc<Self>) {
        let mut register = true;
        let mut hint = None;
        let mut probe = 0usize;
        let mut failures = 0u64;
        let mut refused_since: Option<Instant> = None;
        let mut tick = tokio::time::interval(self.config.heartbeat_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !self.is_stopped() {
            tick.tick().await;
            let request = ControllerRequest::Heartbeat {
                node_id: self.config.node_id,
                incarnation: self.incarnation,
                address: self.config.address.clone(),
                rack: self.config.rack.clone(),
                register,
            };
            // A node that does not know the leader yet (a new node, or a
            // second process under a taken id) asks the voters in turn;
            // they answer with the leader's id.
            let target = self.leader().or(hint.take()).unwrap_or_else(|| {
                let voters: Vec<NodeId> = self.config.voters.keys().copied().collect();
                probe += 1;
                voters[probe % voters.len()]
            });
            // Bounded well inside the session: a dead leader must not hold
            // this loop until the new leader fences us.
            let patience = self.config.session_timeout / 3;
            // Only a node that leads handles its own heartbeat; otherwise
            // the id goes over the wire (to another process, should one
            // hold the same id).
            let local = target == self.config.node_id && self.leader() == Some(target);
            if !local && self.config.is_single() {
                // Alone, before it elected itself: nobody else to ask.
                continue;
            }
            let exchange = async {
                if local { Ok(self.answer(request, Origin::Itself).await) } else { self.send_to(target, request).await }
            };
            let answer = tokio::time::timeout(patience, exchange).await.unwrap_or_else(|_| {
                Err(WriteError::Unreachable(format!("controller {target} did not answer within {patience:?}")))
            });
            if let Ok(ControllerResponse::Heartbeat(Err(WriteError::NotLeader { leader: Some(l), .. }))) = &answer {
                hint = Some(*l);
                continue;
            }
            match answer {
                Ok(ControllerResponse::Heartbeat(Ok(Liveness::Alive { applied }))) => {
                    refused_since = None;
                    if !*self.caught_up.borrow() && self.raft_progress().2.unwrap_or(0) >= applied {
                        self.caught_up.send_replace(true);
                    }
                    if register {
                        tracing::info!(node = self.config.node_id, "broker registered with the controller");
                        self.registration.send_replace(Registration::Registered);
                    }
                    register = false;
                }
                Ok(ControllerResponse::Heartbeat(Ok(Liveness::Unknown))) => register = true,
                Ok(ControllerResponse::Heartbeat(Ok(Liveness::IdTaken(message)))) => {
                    // A restarted process waits out its previous
                    // incarnation's session; a second process under a live
                    // id is still refused after several sessions and stops.
                    let since = *refused_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= self.config.session_timeout * 3 {
                        tracing::error!("{message}");
                        self.registration.send_replace(Registration::Refused(message));
                        return;
                    }
                    if failures.is_multiple_of(10) {
                        tracing::warn!("{message}; retrying until its session expires");
                    }
                    failures += 1;
                }
                Ok(other) => tracing::debug!(answer = ?other, "heartbeat not accepted"),
                Err(e) => {
                    // Said loudly now and then: a node that cannot reach any
                    // controller (wrong certificate, wrong addresses) must
                    // tell its operator why.
                    failures += 1;
                    if failures % 25 == 1 {
                        tracing::warn!(error = %e, "cannot reach the controller quorum");
                    }
                }
            }
        }
    }

    /// On the leader: fences brokers whose heartbeats stopped, and now and
    /// then gives leaderships back to preferred replicas.
    async fn liveness_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut last_rebalance = Instant::now();
        while !self.is_stopped() {
            tick.tick().await;
            if let Some(every) = self.config.leader_rebalance_interval
                && last_rebalance.elapsed() >= every
                && self.leader() == Some(self.config.node_id)
            {
                last_rebalance = Instant::now();
                let due = self.image.borrow().preferred_elections_due();
                if !due.is_empty() {
                    tracing::info!(partitions = due.len(), "moving leaderships back to preferred replicas");
                    if let Err(e) = self.write_local(Command::PreferredElection).await {
                        tracing::warn!(error = %e, "preferred leader election failed");
                    }
                }
            }
            let leading = {
                let m = self.raft.metrics().borrow().clone();
                m.state == ServerState::Leader
            };
            let now = Instant::now();
            let expired = {
                let image = self.image.borrow().clone();
                let unfenced = image.brokers.values().filter(|b| !b.fenced).map(|b| (b.node_id, b.incarnation));
                self.sessions.lock().expect("sessions lock").expired(now, self.config.node_id, leading, unfenced)
            };
            for node_id in expired {
                tracing::warn!(node = node_id, timeout = ?self.config.session_timeout, "broker missed its heartbeats: fencing it");
                if let Err(e) = self.write_local(Command::FenceBroker { node_id }).await {
                    tracing::warn!(node = node_id, error = %e, "cannot fence broker");
                }
            }
        }
    }
}
