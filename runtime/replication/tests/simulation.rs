//! A deterministic simulation of one partition replicated on three nodes,
//! driven only through the crate's plain types. A seeded scheduler loses,
//! delays and reorders messages, cuts links, crashes nodes (losing their
//! unflushed tail), pauses them, and lets metadata reach nodes late. A
//! producer writes unique values with acks=all. Afterwards every fault is
//! healed and the checker proves: every acknowledged value is in the log
//! exactly once at the offset it was acknowledged with, acknowledgements
//! came in offset order, and all replicas hold identical logs.
//!
//! A failing seed is printed; rerun one with `QUIVER_SIM_SEED=N`.

use std::collections::{BTreeMap, BTreeSet};

use quiver_replication::{
    Election, Epoch, EpochHistory, LeaderConfig, NodeId, Offset, PartitionLeader, TruncationStep, elect_leader,
    truncation_step,
};

const NODES: [NodeId; 3] = [1, 2, 3];
const MIN_ISR: usize = 2;

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rec {
    epoch: Epoch,
    value: u64,
}

#[derive(Debug, Clone)]
enum Msg {
    Fetch {
        epoch: Epoch,
        offset: Offset,
    },
    FetchReply {
        epoch: Epoch,
        offset: Offset,
        records: Vec<Rec>,
        high_watermark: Offset,
    },
    AskEpoch {
        epoch: Epoch,
        asked: Epoch,
    },
    EpochReply {
        epoch: Epoch,
        answer: Option<(Epoch, Offset)>,
    },
    /// Leader to controller: commit this ISR.
    ProposeIsr {
        epoch: Epoch,
        isr: BTreeSet<NodeId>,
    },
}

enum Role {
    Leader(PartitionLeader),
    /// Following `leader` in `epoch`; `asked` while reconciling the log.
    Follower {
        leader: NodeId,
        epoch: Epoch,
        asked: Option<Epoch>,
        waiting_since: Option<u64>,
    },
    /// Knows no leader (offline partition, or metadata not seen yet).
    Idle,
}

struct Node {
    log: Vec<Rec>,
    /// Offsets below this survive a crash.
    flushed: Offset,
    history: EpochHistory,
    high_watermark: Offset,
    role: Role,
    /// The metadata epoch this node has applied.
    known_epoch: Epoch,
    up: bool,
    paused_until: u64,
}

impl Node {
    fn log_end(&self) -> Offset {
        self.log.len() as Offset
    }

    fn truncate(&mut self, to: Offset) {
        self.log.truncate(to.max(0) as usize);
        self.history.truncate(to);
        self.flushed = self.flushed.min(to);
        self.high_watermark = self.high_watermark.min(to);
    }
}

/// The controller's metadata (a Raft quorum in the real system; here one
/// always-available state, seen by nodes with a lag).
struct Controller {
    epoch: Epoch,
    leader: Option<NodeId>,
    isr: BTreeSet<NodeId>,
    /// Nodes the controller considers alive (not fenced).
    live: BTreeSet<NodeId>,
}

struct Sim {
    rng: Rng,
    now: u64,
    nodes: BTreeMap<NodeId, Node>,
    controller: Controller,
    /// (deliver at, from, to, message); `to == 0` is the controller.
    network: Vec<(u64, NodeId, NodeId, Msg)>,
    cut: BTreeSet<(NodeId, NodeId)>,
    next_value: u64,
    /// Written, not yet acknowledged: (leader, offset, value, epoch).
    pending: Vec<(NodeId, Offset, u64, Epoch)>,
    /// Acknowledged: (offset, value, epoch of the leader that answered).
    acked: Vec<(Offset, u64, Epoch)>,
    faults: bool,
    /// Elect from outside the ISR when no ISR member is alive.
    unclean: bool,
    log: Vec<String>,
}

impl Sim {
    fn new(seed: u64, unclean: bool) -> Sim {
        let nodes = NODES
            .iter()
            .map(|n| {
                let node = Node {
                    log: Vec::new(),
                    flushed: 0,
                    history: EpochHistory::default(),
                    high_watermark: 0,
                    role: Role::Idle,
                    known_epoch: 0,
                    up: true,
                    paused_until: 0,
                };
                (*n, node)
            })
            .collect();
        let controller = Controller { epoch: 0, leader: None, isr: NODES.into(), live: NODES.into() };
        let mut sim = Sim {
            rng: Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1),
            now: 0,
            nodes,
            controller,
            network: Vec::new(),
            cut: BTreeSet::new(),
            next_value: 1,
            pending: Vec::new(),
            acked: Vec::new(),
            faults: true,
            unclean,
            log: Vec::new(),
        };
        sim.elect();
        sim
    }

    fn config() -> LeaderConfig {
        LeaderConfig { lag_time_max_ms: 200, min_insync_replicas: MIN_ISR }
    }

    fn send(&mut self, from: NodeId, to: NodeId, msg: Msg) {
        let lossy = self.faults && self.rng.chance(5);
        if lossy || self.cut.contains(&(from, to)) || self.cut.contains(&(to, from)) {
            return;
        }
        let delay = 1 + self.rng.below(if self.faults { 30 } else { 3 });
        self.network.push((self.now + delay, from, to, msg));
    }

    /// The controller elects a leader from the ISR among live nodes.
    fn elect(&mut self) {
        let c = &mut self.controller;
        let isr: Vec<NodeId> = c.isr.iter().copied().collect();
        let live = c.live.clone();
        c.epoch += 1;
        c.leader = match elect_leader(&NODES, &isr, |n| live.contains(&n), self.unclean) {
            Election::Clean(n) => Some(n),
            Election::Unclean(n) => {
                assert!(self.unclean, "unclean election is off");
                c.isr = BTreeSet::from([n]);
                Some(n)
            }
            Election::Offline => None,
        };
        self.log.push(format!("t={} epoch {} leader {:?} isr {:?}", self.now, c.epoch, c.leader, c.isr));
    }

    /// The controller stops trusting `n` (it crashed or stopped answering).
    fn fence(&mut self, n: NodeId) {
        if !self.controller.live.remove(&n) {
            return;
        }
        if self.controller.isr.len() > 1 {
            self.controller.isr.remove(&n);
        }
        if self.controller.leader == Some(n) || self.controller.leader.is_none() {
            self.elect();
        }
    }

    fn unfence(&mut self, n: NodeId) {
        self.controller.live.insert(n);
        if self.controller.leader.is_none() {
            self.elect();
        }
    }

    /// A node reads the controller's metadata (it follows the metadata log
    /// with some lag).
    fn sync_metadata(&mut self, id: NodeId) {
        let (epoch, leader, isr) = (self.controller.epoch, self.controller.leader, self.controller.isr.clone());
        let now = self.now;
        let node = self.nodes.get_mut(&id).unwrap();
        if node.known_epoch == epoch {
            if let Role::Leader(l) = &mut node.role {
                // Committed ISR changes (controller fencing, or our proposal).
                if l.isr() != &isr && self.controller.leader == Some(id) {
                    l.apply_isr(isr);
                }
            }
            return;
        }
        node.known_epoch = epoch;
        node.role = match leader {
            Some(l) if l == id => {
                node.history.assign(epoch, node.log_end());
                // The flushed end is what counts for acks=all.
                let leader = PartitionLeader::new(id, epoch, &NODES, isr, Self::config(), now)
                    .with_log(node.flushed, node.high_watermark);
                Role::Leader(leader)
            }
            // A new follower first reconciles its log with the leader.
            Some(l) => Role::Follower { leader: l, epoch, asked: node.history.latest_epoch(), waiting_since: None },
            None => Role::Idle,
        };
    }

    fn step(&mut self) {
        self.now += 1;
        // Faults.
        if self.faults {
            let n = NODES[self.rng.below(3) as usize];
            match self.rng.below(1000) {
                0..=2 if self.nodes[&n].up => self.crash(n),
                3..=40 if !self.nodes[&n].up => self.restart(n),
                41..=43 => {
                    let until = self.now + 20 + self.rng.below(400);
                    self.nodes.get_mut(&n).unwrap().paused_until = until;
                    self.log.push(format!("t={} pause {n} until {until}", self.now));
                }
                44..=46 => {
                    let m = NODES[self.rng.below(3) as usize];
                    if m != n {
                        self.cut.insert((n, m));
                        self.log.push(format!("t={} cut {n}-{m}", self.now));
                    }
                }
                47..=70 => self.cut.clear(),
                _ => {}
            }
        }
        // The controller fences nodes that stopped answering for long.
        for n in NODES {
            let node = &self.nodes[&n];
            let silent = !node.up || node.paused_until > self.now + 150;
            if silent && self.controller.live.contains(&n) {
                self.fence(n);
            } else if !silent && !self.controller.live.contains(&n) {
                self.unfence(n);
            }
        }
        // Deliveries.
        let now = self.now;
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.network).into_iter().partition(|m| m.0 <= now);
        self.network = later;
        for (at, from, to, msg) in due {
            if to == 0 {
                self.controller_receive(from, msg);
                continue;
            }
            let node = &self.nodes[&to];
            if !node.up {
                continue;
            }
            if node.paused_until > now {
                self.network.push((node.paused_until.max(at), from, to, msg));
                continue;
            }
            self.receive(to, from, msg);
        }
        // Each live, running node acts.
        for n in NODES {
            let node = &self.nodes[&n];
            if !node.up || node.paused_until > self.now {
                continue;
            }
            if self.rng.chance(if self.faults { 20 } else { 100 }) {
                self.sync_metadata(n);
            }
            self.act(n);
        }
        // The producer writes to the leader it believes in (the controller's).
        if self.faults
            && self.rng.chance(60)
            && let Some(l) = self.controller.leader
        {
            self.produce(l);
        }
    }

    fn crash(&mut self, n: NodeId) {
        let node = self.nodes.get_mut(&n).unwrap();
        node.up = false;
        let flushed = node.flushed;
        node.truncate(flushed);
        node.role = Role::Idle;
        node.known_epoch = 0;
        self.log.push(format!("t={} crash {n} (log kept to {flushed})", self.now));
    }

    fn restart(&mut self, n: NodeId) {
        let node = self.nodes.get_mut(&n).unwrap();
        node.up = true;
        node.paused_until = 0;
        // Recovery rebuilds the epoch history from the batches' epochs.
        node.history = EpochHistory::default();
        for (i, r) in node.log.iter().enumerate() {
            node.history.assign(r.epoch, i as Offset);
        }
        self.log.push(format!("t={} restart {n}", self.now));
    }

    fn produce(&mut self, leader: NodeId) {
        let now = self.now;
        let node = self.nodes.get_mut(&leader).unwrap();
        if !node.up || node.paused_until > now {
            return;
        }
        let Role::Leader(l) = &mut node.role else { return };
        if l.check_acks_all().is_err() {
            return;
        }
        let value = self.next_value;
        self.next_value += 1;
        let epoch = l.epoch();
        node.log.push(Rec { epoch, value });
        self.pending.push((leader, node.log_end() - 1, value, epoch));
    }

    fn act(&mut self, id: NodeId) {
        let now = self.now;
        let flush = self.rng.chance(if self.faults { 30 } else { 100 });
        let node = self.nodes.get_mut(&id).unwrap();
        let mut outbox = Vec::new();
        match &mut node.role {
            Role::Leader(l) => {
                if flush {
                    node.flushed = node.log.len() as Offset;
                }
                l.on_append(node.flushed);
                if let Some(isr) = l.tick(now) {
                    outbox.push((0, Msg::ProposeIsr { epoch: l.epoch(), isr }));
                }
                node.high_watermark = l.high_watermark();
            }
            Role::Follower { leader, epoch, asked, waiting_since } => {
                let stale = waiting_since.is_none_or(|t| now - t > 60);
                if stale {
                    *waiting_since = Some(now);
                    match asked {
                        // Reconcile the log first (a fresh follower asks
                        // about its latest epoch).
                        Some(e) => outbox.push((*leader, Msg::AskEpoch { epoch: *epoch, asked: *e })),
                        None => outbox.push((*leader, Msg::Fetch { epoch: *epoch, offset: node.log.len() as Offset })),
                    }
                }
            }
            Role::Idle => {}
        }
        for (to, msg) in outbox {
            self.send(id, to, msg);
        }
        self.settle_acks();
    }

    /// Acknowledges a pending write once the node that took it, still
    /// leading in the epoch it was written in (as far as it knows: a deposed
    /// leader that has not noticed yet counts too), has its high watermark
    /// past it. A write whose leader moved on is never acknowledged.
    fn settle_acks(&mut self) {
        let mut still = Vec::new();
        for (n, offset, value, e) in std::mem::take(&mut self.pending) {
            let node = &self.nodes[&n];
            match &node.role {
                Role::Leader(l) if l.epoch() == e && node.up => {
                    if offset < l.high_watermark() {
                        assert_eq!(node.log[offset as usize].value, value, "acked value is where it was written");
                        self.acked.push((offset, value, e));
                    } else {
                        still.push((n, offset, value, e));
                    }
                }
                _ => {}
            }
        }
        self.pending = still;
    }

    fn controller_receive(&mut self, from: NodeId, msg: Msg) {
        if let Msg::ProposeIsr { epoch, isr } = msg
            && epoch == self.controller.epoch
            && self.controller.leader == Some(from)
        {
            // Only live nodes may be added.
            if isr.iter().all(|n| self.controller.live.contains(n)) {
                self.controller.isr = isr;
            }
        }
    }

    fn receive(&mut self, id: NodeId, from: NodeId, msg: Msg) {
        let now = self.now;
        let node = self.nodes.get_mut(&id).unwrap();
        let mut reply = None;
        match (msg, &mut node.role) {
            (Msg::Fetch { epoch, offset }, Role::Leader(l))
                if epoch == l.epoch() && offset <= node.log.len() as Offset =>
            {
                let outcome = l.on_fetch(from, offset, now);
                if let Some(isr) = outcome.propose_isr {
                    let e = l.epoch();
                    self.network.push((now + 1, id, 0, Msg::ProposeIsr { epoch: e, isr }));
                }
                node.high_watermark = l.high_watermark();
                let end = (offset as usize + 5).min(node.log.len());
                let records = node.log[offset as usize..end].to_vec();
                reply = Some(Msg::FetchReply { epoch, offset, records, high_watermark: l.high_watermark() });
            }
            (Msg::AskEpoch { epoch, asked }, Role::Leader(l)) if epoch == l.epoch() => {
                let answer = node.history.end_offset_for(asked, node.log.len() as Offset);
                reply = Some(Msg::EpochReply { epoch, answer });
            }
            (Msg::EpochReply { epoch: e, answer }, Role::Follower { epoch, asked, waiting_since, .. })
                if e == *epoch && asked.is_some() =>
            {
                let step = truncation_step(&node.history, node.log.len() as Offset, answer);
                *waiting_since = None;
                match step {
                    TruncationStep::Ask(older) => *asked = Some(older),
                    TruncationStep::TruncateTo(to) => {
                        *asked = None;
                        node.truncate(to);
                        node.flushed = node.log_end();
                        self.log.push(format!("t={now} {id} truncated to {to}"));
                    }
                }
            }
            (
                Msg::FetchReply { epoch: e, offset, records, high_watermark },
                Role::Follower { epoch, waiting_since, asked: None, .. },
            ) if e == *epoch && offset == node.log.len() as Offset => {
                for r in records {
                    node.history.assign(r.epoch, node.log.len() as Offset);
                    node.log.push(r);
                }
                // Followers flush before they report the new end.
                node.flushed = node.log.len() as Offset;
                node.high_watermark = high_watermark.min(node.log.len() as Offset);
                *waiting_since = None;
            }
            _ => {}
        }
        if let Some(r) = reply {
            self.send(id, from, r);
        }
    }
}

/// Runs one seeded history and checks it. With `unclean`, acknowledged
/// records may be lost by design; replicas must still never diverge.
fn run(seed: u64, unclean: bool) -> Result<(usize, usize), String> {
    let mut sim = Sim::new(seed, unclean);
    for _ in 0..20_000 {
        sim.step();
    }
    // Heal: everything up and connected, no more faults, until converged.
    sim.faults = false;
    sim.cut.clear();
    for n in NODES {
        if !sim.nodes[&n].up {
            sim.restart(n);
        }
        sim.nodes.get_mut(&n).unwrap().paused_until = 0;
    }
    for _ in 0..5_000 {
        sim.step();
    }
    let leader = sim.controller.leader.ok_or("no leader after healing")?;
    let reference = &sim.nodes[&leader].log;
    for n in NODES {
        let log = &sim.nodes[&n].log;
        if log != reference {
            return Err(format!(
                "replica {n} differs from leader {leader}: {} vs {} records, first difference at {:?}",
                log.len(),
                reference.len(),
                log.iter().zip(reference.iter()).position(|(a, b)| a != b)
            ));
        }
    }
    let mut seen = BTreeSet::new();
    for r in reference {
        if !seen.insert(r.value) {
            return Err(format!("value {} is in the log twice", r.value));
        }
    }
    if unclean {
        return Ok((sim.acked.len(), sim.log.len()));
    }
    for (offset, value, _) in &sim.acked {
        if reference.get(*offset as usize).map(|r| r.value) != Some(*value) {
            return Err(format!("acknowledged value {value} at offset {offset} is lost"));
        }
    }
    // The log keeps the order the producer sent in (values increase).
    let mut by_value = sim.acked.clone();
    by_value.sort_by_key(|a| a.1);
    if let Some(w) = by_value.windows(2).find(|w| w[0].0 >= w[1].0) {
        return Err(format!("values {} and {} are in the log out of send order", w[0].1, w[1].1));
    }
    // One leader acknowledges in offset order. (A deposed leader that has
    // not noticed yet may still acknowledge a write it holds after the new
    // leader acknowledged later ones: those records are in the new leader's
    // log too, which the check above proves.)
    let mut last: BTreeMap<Epoch, Offset> = BTreeMap::new();
    for (offset, _, epoch) in &sim.acked {
        if last.insert(*epoch, *offset).is_some_and(|l| l >= *offset) {
            return Err(format!("epoch {epoch}: acknowledgement of offset {offset} after a later one"));
        }
    }
    Ok((sim.acked.len(), sim.log.len()))
}

fn seeds() -> Vec<u64> {
    match std::env::var("QUIVER_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("QUIVER_SIM_SEED is a number")],
        Err(_) => (1..=40).collect(),
    }
}

#[test]
fn no_acknowledged_record_is_lost_and_replicas_never_diverge() {
    for seed in seeds() {
        match run(seed, false) {
            Ok((acked, events)) => assert!(acked > 0, "seed {seed}: nothing was acknowledged ({events} events)"),
            Err(e) => panic!("seed {seed}: {e} (rerun with QUIVER_SIM_SEED={seed})"),
        }
    }
}

/// Unclean elections lose acknowledged records (that is why they are off by
/// default), but epoch-based truncation still keeps replicas identical.
#[test]
fn with_unclean_elections_replicas_still_never_diverge() {
    for seed in seeds() {
        if let Err(e) = run(seed, true) {
            panic!("seed {seed}: {e} (rerun with QUIVER_SIM_SEED={seed})");
        }
    }
}
