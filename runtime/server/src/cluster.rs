//! Cluster plumbing of a node: the controller transport over QUIC with
//! mutual TLS (each node presents its own certificate; the controller API
//! is served only to connections that did), `--controllers` parsing, and
//! `quiver cluster info | health | up`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use quiver_client::{CallError, Client, ClientConfig};
use quiver_controller::{NodeId, SendError, Transport, TransportFuture};
use quiver_protocol::messages::{
    AddPartitionsToTxnRequest, AddPartitionsToTxnResponse, AlterVotersRequest, ClusterInfoRequest, ClusterInfoResponse,
    ControllerCall, ElectLeadersRequest, EndTxnRequest, EndTxnResponse, FetchRequest, FetchResponse,
    InitProducerIdRequest, InitProducerIdResponse, NO_LEADER, PluginListRequest, PluginListResponse, ProduceRequest,
    ProduceResponse, ReplicaFetchRequest, ReplicaFetchResponse, WriteTxnMarkersRequest, WriteTxnMarkersResponse,
};
use quiver_protocol::{ErrorCode, WireError};

/// Parses `1@host:port,2@host:port,...`.
pub fn parse_controllers(spec: &str) -> anyhow::Result<BTreeMap<NodeId, String>> {
    let mut voters = BTreeMap::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, address) = part
            .split_once('@')
            .with_context(|| format!("controller '{part}' is not ID@HOST:PORT (e.g. 1@10.0.0.1:7878)"))?;
        let id: NodeId = id.parse().with_context(|| format!("controller '{part}': '{id}' is not a node id"))?;
        if !address.contains(':') {
            bail!("controller '{part}': '{address}' has no port");
        }
        if voters.insert(id, address.to_string()).is_some() {
            bail!("controller {id} is listed twice");
        }
    }
    if voters.is_empty() {
        bail!("--controllers names no controller");
    }
    Ok(voters)
}

/// Carries controller messages and replica fetches to other nodes, one
/// cached connection per address, presenting this node's certificate.
pub struct QuicTransport {
    ca_pem: Vec<u8>,
    identity: (Vec<u8>, Vec<u8>),
    clients: Arc<Mutex<HashMap<String, Client>>>,
    /// Connections for produce requests (transform outputs), apart from the
    /// controller's and replication's: an acks=all produce may wait longer
    /// than their request timeout.
    producers: Arc<Mutex<HashMap<String, Client>>>,
    /// The address this node's connections to other nodes leave from.
    bind: Option<std::net::SocketAddr>,
}

type ClientCache = Arc<Mutex<HashMap<String, Client>>>;

/// Bound on a transform's produce to another broker (the leader waits up to
/// 10 s for its in-sync replicas).
const PRODUCE_TIMEOUT: Duration = Duration::from_secs(15);

impl QuicTransport {
    /// `listen`: the node's own address; when it names one IP (not
    /// "any"), connections to other nodes leave from that IP too, so that
    /// peers and firewalls see the node at the address it listens on.
    pub fn new(ca: &Path, cert: &Path, key: &Path, listen: std::net::SocketAddr) -> anyhow::Result<QuicTransport> {
        let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        Ok(QuicTransport {
            ca_pem: read(ca)?,
            identity: (read(cert)?, read(key)?),
            clients: Arc::default(),
            producers: Arc::default(),
            bind: (!listen.ip().is_unspecified()).then(|| std::net::SocketAddr::new(listen.ip(), 0)),
        })
    }

    /// The cached connection to `address`, or a future that makes one.
    fn client(&self, address: &str) -> impl std::future::Future<Output = Result<Client, String>> + Send + 'static {
        self.client_in(&self.clients, address, Duration::from_secs(2))
    }

    fn client_in(
        &self,
        cache: &ClientCache,
        address: &str,
        request_timeout: Duration,
    ) -> impl std::future::Future<Output = Result<Client, String>> + Send + 'static {
        let cached = cache.lock().expect("clients lock").get(address).cloned();
        let mut config = ClientConfig::new(address.to_string(), self.ca_pem.clone());
        config.identity = Some(self.identity.clone());
        config.bind = self.bind;
        config.connect_timeout = Duration::from_secs(1);
        config.request_timeout = request_timeout;
        config.client_software = "quiver-node".into();
        let cache = cache.clone();
        let address = address.to_string();
        async move {
            if let Some(c) = cached {
                return Ok(c);
            }
            let c = Client::connect(config).await.map_err(|e| e.to_string())?;
            cache.lock().expect("clients lock").insert(address, c.clone());
            Ok(c)
        }
    }

    /// Forgets a connection that failed, so the next call makes a new one.
    fn forget(cache: &Mutex<HashMap<String, Client>>, address: &str) {
        cache.lock().expect("clients lock").remove(address);
    }
}

impl Transport for QuicTransport {
    fn send(&self, target: NodeId, address: String, body: Vec<u8>) -> TransportFuture {
        let client = self.client(&address);
        let cache = self.clients.clone();
        Box::pin(async move {
            let client = client
                .await
                .map_err(|e| SendError::Unreachable(format!("cannot reach controller {target} at {address}: {e}")))?;
            match client.call(&ControllerCall { body: body.into() }).await {
                Ok(answer) => Ok(answer.body.to_vec()),
                Err(CallError::Connect(e)) => {
                    Self::forget(&cache, &address);
                    Err(SendError::Unreachable(e.to_string()))
                }
                Err(CallError::Broker(e)) if e.code == ErrorCode::NotAuthorized => {
                    Err(SendError::Unreachable(format!("node {target} at {address} refused us: {}", e.message)))
                }
                Err(e) => {
                    Self::forget(&cache, &address);
                    Err(SendError::Unknown(e.to_string()))
                }
            }
        })
    }
}

impl QuicTransport {
    /// One request to the broker `leader`, over a connection from `cache`.
    fn broker_call<R: quiver_protocol::messages::Request + 'static>(
        &self,
        cache: &ClientCache,
        request_timeout: Duration,
        leader: NodeId,
        address: String,
        request: R,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<R::Response, WireError>> + Send>> {
        let client = self.client_in(cache, &address, request_timeout);
        let cache = cache.clone();
        Box::pin(async move {
            let unreachable =
                |e: String| WireError::new(ErrorCode::RequestTimedOut, format!("leader {leader} at {address}: {e}"));
            let client = client.await.map_err(unreachable)?;
            match client.call(&request).await {
                Ok(response) => Ok(response),
                Err(CallError::Broker(e)) => Err(e),
                Err(e) => {
                    Self::forget(&cache, &address);
                    Err(unreachable(e.to_string()))
                }
            }
        })
    }
}

impl quiver_broker::ReplicaLink for QuicTransport {
    fn fetch(
        &self,
        leader: NodeId,
        address: String,
        request: ReplicaFetchRequest,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<ReplicaFetchResponse, WireError>> + Send>> {
        self.broker_call(&self.clients, Duration::from_secs(2), leader, address, request)
    }

    fn produce(
        &self,
        leader: NodeId,
        address: String,
        request: ProduceRequest,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<ProduceResponse, WireError>> + Send>> {
        self.broker_call(&self.producers, PRODUCE_TIMEOUT, leader, address, request)
    }

    fn read(
        &self,
        leader: NodeId,
        address: String,
        request: FetchRequest,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<FetchResponse, WireError>> + Send>> {
        // These reads do not wait for records (the coordinator polls).
        self.broker_call(&self.clients, Duration::from_secs(2), leader, address, request)
    }

    fn list_plugins(
        &self,
        node: NodeId,
        address: String,
        request: PluginListRequest,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<PluginListResponse, WireError>> + Send>> {
        self.broker_call(&self.clients, Duration::from_secs(2), node, address, request)
    }

    fn add_partitions_to_txn(
        &self,
        node: NodeId,
        address: String,
        request: AddPartitionsToTxnRequest,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<AddPartitionsToTxnResponse, WireError>> + Send>> {
        // The coordinator stores the change with acks=all before it answers.
        self.broker_call(&self.clients, PRODUCE_TIMEOUT, node, address, request)
    }

    fn write_txn_markers(
        &self,
        leader: NodeId,
        address: String,
        request: WriteTxnMarkersRequest,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<WriteTxnMarkersResponse, WireError>> + Send>> {
        self.broker_call(&self.producers, PRODUCE_TIMEOUT, leader, address, request)
    }

    fn init_producer_id(
        &self,
        node: NodeId,
        address: String,
        request: InitProducerIdRequest,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<InitProducerIdResponse, WireError>> + Send>> {
        self.broker_call(&self.clients, PRODUCE_TIMEOUT, node, address, request)
    }

    fn end_txn(
        &self,
        node: NodeId,
        address: String,
        request: EndTxnRequest,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<EndTxnResponse, WireError>> + Send>> {
        self.broker_call(&self.clients, PRODUCE_TIMEOUT, node, address, request)
    }
}

#[derive(clap::Subcommand, Debug)]
pub enum ClusterCommand {
    /// Nodes (address, rack, fenced, voter), the controller leader, topic
    /// and partition counts.
    Info {
        #[arg(long, value_enum, default_value_t = crate::cli::Format::Text)]
        format: crate::cli::Format,
    },
    /// Under-replicated and offline partitions, fenced nodes, no quorum;
    /// exits 1 when anything is unhealthy.
    Health {
        #[arg(long, value_enum, default_value_t = crate::cli::Format::Text)]
        format: crate::cli::Format,
    },
    /// Move every partition's leadership back to its preferred (first)
    /// replica where that one is live and in sync (the controller also does
    /// this every `cluster.leader_rebalance_interval_ms`).
    Rebalance,
    /// Make a node that follows the metadata log (any started broker not in
    /// --controllers joins as a learner) a voter of the quorum.
    AddVoter { node: u32 },
    /// Turn a voter back into a learner (before retiring its machine).
    RemoveVoter { node: u32 },
    /// Run a local cluster of N nodes on 127.0.0.1 (certificates, data and
    /// logs under --dir) until Ctrl-C; client commands find it from --dir.
    Up {
        #[arg(short = 'n', long, default_value_t = 3)]
        nodes: u32,
        #[arg(long, default_value = ".quiver")]
        dir: PathBuf,
        /// Node N listens on BASE_PORT + N - 1 (UDP).
        #[arg(long, default_value_t = 7878)]
        base_port: u16,
    },
}

pub async fn run(conn: crate::cli::ConnArgs, command: ClusterCommand) -> anyhow::Result<std::process::ExitCode> {
    use std::process::ExitCode;
    match command {
        ClusterCommand::Info { format } => {
            let info = conn.connect().await?.call(&ClusterInfoRequest {}).await?;
            match format {
                crate::cli::Format::Json => println!("{}", info_json(&info)),
                crate::cli::Format::Text => print_info(&info),
            }
            Ok(ExitCode::SUCCESS)
        }
        ClusterCommand::Health { format } => {
            let info = conn.connect().await?.call(&ClusterInfoRequest {}).await?;
            let problems = problems(&info);
            match format {
                crate::cli::Format::Json => println!(
                    "{}",
                    serde_json::json!({"healthy": problems.is_empty(), "problems": problems, "info": info_json(&info)})
                ),
                crate::cli::Format::Text if problems.is_empty() => println!(
                    "healthy: {}, {} partitions, controller leader {}",
                    nodes(info.nodes.len()),
                    info.partitions,
                    info.controller_leader
                ),
                crate::cli::Format::Text => {
                    println!("unhealthy:");
                    for p in &problems {
                        println!("  {p}");
                    }
                }
            }
            Ok(if problems.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        ClusterCommand::Up { nodes, dir, base_port } => up(nodes, &dir, base_port).await,
        ClusterCommand::AddVoter { node } | ClusterCommand::RemoveVoter { node } => {
            let adding = matches!(command, ClusterCommand::AddVoter { .. });
            let request = if adding {
                AlterVotersRequest { add: vec![node], remove: vec![] }
            } else {
                AlterVotersRequest { add: vec![], remove: vec![node] }
            };
            let answer = conn.connect().await?.call(&request).await?;
            let voters: Vec<String> = answer.voters.iter().map(u32::to_string).collect();
            println!("voters: {}", voters.join(", "));
            Ok(ExitCode::SUCCESS)
        }
        ClusterCommand::Rebalance => {
            let answer = conn.connect().await?.call(&ElectLeadersRequest {}).await?;
            if answer.elected.is_empty() {
                println!("every partition is led by its preferred replica (or it is not live and in sync)");
            } else {
                let names: Vec<String> =
                    answer.elected.iter().map(|p| format!("{}-{}", p.topic, p.partition)).collect();
                println!("moved {} leaderships back to their preferred replicas: {}", names.len(), names.join(", "));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn problems(info: &ClusterInfoResponse) -> Vec<String> {
    let mut out = Vec::new();
    if info.clustered && info.controller_leader == NO_LEADER {
        out.push(format!("no controller quorum: node {} knows no metadata leader", info.node_id));
    }
    for n in info.nodes.iter().filter(|n| n.fenced) {
        out.push(format!("node {} at {} is fenced (missed its heartbeats)", n.node_id, n.address));
    }
    for p in &info.offline {
        out.push(format!("{}-{} is offline: no live in-sync replica", p.topic, p.partition));
    }
    for p in &info.under_replicated {
        out.push(format!("{}-{} is under-replicated", p.topic, p.partition));
    }
    for p in &info.unclean_elections {
        out.push(format!(
            "{}-{} had an unclean leader election (acknowledged records may be lost)",
            p.topic, p.partition
        ));
    }
    out
}

fn refs_json(list: &[quiver_protocol::messages::PartitionRef]) -> serde_json::Value {
    list.iter().map(|p| serde_json::json!({"topic": p.topic, "partition": p.partition})).collect()
}

fn info_json(info: &ClusterInfoResponse) -> serde_json::Value {
    serde_json::json!({
        "clustered": info.clustered,
        "node_id": info.node_id,
        "controller_leader": (info.controller_leader != NO_LEADER).then_some(info.controller_leader),
        "raft_term": info.raft_term,
        "metadata_applied": info.metadata_applied,
        "nodes": info.nodes.iter().map(|n| serde_json::json!({
            "node_id": n.node_id, "address": n.address, "rack": (!n.rack.is_empty()).then_some(&n.rack),
            "fenced": n.fenced, "voter": n.voter,
        })).collect::<Vec<_>>(),
        "topics": info.topics,
        "partitions": info.partitions,
        "under_replicated": refs_json(&info.under_replicated),
        "offline": refs_json(&info.offline),
        "unclean_elections": refs_json(&info.unclean_elections),
    })
}

fn nodes(n: usize) -> String {
    if n == 1 { "1 node".into() } else { format!("{n} nodes") }
}

fn print_info(info: &ClusterInfoResponse) {
    if !info.clustered {
        // A broker of an earlier release (every node has a metadata log now).
        println!("single node {} at {} (no metadata quorum)", info.node_id, info.nodes[0].address);
    } else {
        let leader =
            if info.controller_leader == NO_LEADER { "none".to_string() } else { info.controller_leader.to_string() };
        println!(
            "cluster: {}, controller leader {leader}, term {}, metadata applied to {} (asked node {})",
            nodes(info.nodes.len()),
            info.raft_term,
            info.metadata_applied,
            info.node_id
        );
        for n in &info.nodes {
            let mut tags = Vec::new();
            tags.push(if n.voter { "voter" } else { "learner" });
            if n.fenced {
                tags.push("FENCED");
            }
            if n.node_id == info.controller_leader {
                tags.push("controller leader");
            }
            let rack = if n.rack.is_empty() { String::new() } else { format!(" rack {}", n.rack) };
            println!("  node {} {}{rack} ({})", n.node_id, n.address, tags.join(", "));
        }
    }
    println!(
        "{} topics, {} partitions, {} under-replicated, {} offline",
        info.topics,
        info.partitions,
        info.under_replicated.len(),
        info.offline.len()
    );
}

/// `quiver cluster up`: certificates, then one `quiver broker` child per
/// node; stops them all (SIGTERM) on Ctrl-C or when one exits.
/// Broker processes of a local cluster on 127.0.0.1, each with its data and
/// `broker.log` in `DIR/node-N` and certificates from one cluster CA.
pub struct LocalCluster {
    pub dir: PathBuf,
    /// Node N's address is `addresses[N - 1]`.
    pub addresses: Vec<String>,
    pub ca: PathBuf,
    children: Vec<Option<tokio::process::Child>>,
}

impl LocalCluster {
    /// Makes certificates and starts nodes `1..=ports.len()`, node N
    /// listening on `ports[N - 1]`.
    pub fn start(dir: &Path, ports: &[u16], env: &[(&str, &str)]) -> anyhow::Result<LocalCluster> {
        let ids: Vec<u32> = (1..=ports.len() as u32).collect();
        let certs = dir.join("certs");
        crate::tls::init_cluster_certs(&certs, &ids.iter().map(|i| (*i, Vec::new())).collect::<Vec<_>>(), &[])?;
        let mut cluster = LocalCluster {
            dir: dir.to_path_buf(),
            addresses: ports.iter().map(|p| format!("127.0.0.1:{p}")).collect(),
            ca: certs.join("ca.pem"),
            children: ids.iter().map(|_| None).collect(),
        };
        for i in ids {
            cluster.start_node(i, env)?;
        }
        Ok(cluster)
    }

    fn controllers(&self) -> String {
        self.addresses.iter().enumerate().map(|(i, a)| format!("{}@{a}", i + 1)).collect::<Vec<_>>().join(",")
    }

    /// Starts (or restarts) node `i`.
    pub fn start_node(&mut self, i: u32, env: &[(&str, &str)]) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("finding the quiver executable")?;
        let node_dir = self.dir.join("certs").join(format!("node-{i}"));
        let data = self.dir.join(format!("node-{i}"));
        std::fs::create_dir_all(&data)?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(data.join("broker.log"))?;
        let child = tokio::process::Command::new(&exe)
            .arg("broker")
            .args(["--node-id", &i.to_string()])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen", &self.addresses[i as usize - 1]])
            .args(["--controllers", &self.controllers()])
            .arg("--cert")
            .arg(node_dir.join("broker.pem"))
            .arg("--key")
            .arg(node_dir.join("broker.key"))
            .arg("--ca")
            .arg(&self.ca)
            .arg("-v")
            // A local cluster is for development, as `quiver dev` is.
            .env("QUIVER_BROKER__ALLOW_ANONYMOUS_ADMIN", "true")
            .envs(env.iter().copied())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting node {i}"))?;
        self.children[i as usize - 1] = Some(child);
        Ok(())
    }

    /// SIGKILL: no flush, no goodbye.
    pub async fn kill9(&mut self, i: u32) {
        if let Some(mut child) = self.children[i as usize - 1].take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// Resolves with the first node that exits on its own.
    pub async fn exited(&mut self) -> (u32, std::process::ExitStatus) {
        loop {
            for (i, c) in self.children.iter_mut().enumerate() {
                if let Some(c) = c
                    && let Ok(Some(status)) = c.try_wait()
                {
                    return (i as u32 + 1, status);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// SIGTERM to every node (each flushes and closes its logs), then waits.
    pub async fn stop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            if let Some(pid) = c.id() {
                let _ = std::process::Command::new("kill").arg(pid.to_string()).status();
            }
        }
        for c in self.children.iter_mut().flatten() {
            let _ = tokio::time::timeout(Duration::from_secs(10), c.wait()).await;
        }
    }
}

async fn up(nodes: u32, dir: &Path, base_port: u16) -> anyhow::Result<std::process::ExitCode> {
    if nodes == 0 || nodes > 9 {
        bail!("--nodes must be between 1 and 9");
    }
    let ports: Vec<u16> = (0..nodes as u16).map(|i| base_port + i).collect();
    let mut cluster = LocalCluster::start(dir, &ports, &[])?;
    let ids: Vec<u32> = (1..=nodes).collect();
    let address = |i: u32| cluster.addresses[i as usize - 1].clone();
    let controllers = cluster.controllers();
    let certs = dir.join("certs");
    // Client commands run from here find the cluster through the dev dir.
    std::fs::write(dir.join("address"), ids.iter().map(|i| address(*i)).collect::<Vec<_>>().join(","))?;
    std::fs::copy(certs.join("ca.pem"), dir.join("ca.pem"))?;
    println!("quiver cluster of {nodes} nodes: {controllers}");
    println!("  data and logs: {}/node-N (broker.log)", dir.display());
    println!("  CA: {}", dir.join("ca.pem").display());
    println!("try: quiver cluster info; quiver topic create orders -p 6 -r 3");
    use std::io::Write;
    std::io::stdout().flush()?;
    let mut stop = crate::cli::StopSignals::new()?;
    let failed = tokio::select! {
        _ = stop.recv() => None,
        (i, status) = cluster.exited() => Some((i, status)),
    };
    cluster.stop().await;
    match failed {
        Some((i, status)) => {
            bail!("node {i} exited ({status}); see {}", dir.join(format!("node-{i}")).join("broker.log").display())
        }
        None => {
            eprintln!("quiver: cluster stopped");
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}
