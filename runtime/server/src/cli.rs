//! Command-line interface. Every client command is built on the
//! `quiver-client` library and nothing else.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use quiver_client::{
    Acks, Client, ClientConfig, Compression, ConsumerConfig, Header, OffsetSpec, ProducerConfig, ProducerRecord,
};
use quiver_protocol::messages::OFFSET_LATEST;

use crate::config::FileConfig;
use crate::node::{Node, write_dev_discovery};

#[derive(Parser, Debug)]
#[command(name = "quiver", version, about = "Quiver: a streaming platform over QUIC")]
pub struct Cli {
    /// More logging (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum CertsCommand {
    /// Create the cluster CA in DIR (or reuse the one there) and a
    /// certificate for each node that has none: DIR/node-ID/broker.{pem,key},
    /// valid for localhost, node-ID and the --host names, for serving and
    /// for connecting to other brokers; and for each --client NAME,
    /// DIR/client-NAME/client.{pem,key}: a client that presents it
    /// (--client-cert, --client-key) acts as User:NAME, e.g. for admin
    /// commands. Private keys are readable by the owner only; keep
    /// DIR/ca.key away from the nodes.
    Init {
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Node ids, e.g. 1,2,3 (run again with new ids to add nodes).
        #[arg(long, value_delimiter = ',', required_unless_present = "clients")]
        nodes: Vec<u32>,
        /// ID=HOST: an extra name or address for node ID's certificate (repeatable).
        #[arg(long = "host", value_parser = parse_key_value)]
        hosts: Vec<(String, String)>,
        /// A client certificate for NAME (repeatable).
        #[arg(long = "client")]
        clients: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a single development node: data and self-signed certificates in
    /// --data-dir; prints how to connect.
    Dev {
        #[arg(long, default_value = ".quiver")]
        data_dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:7878")]
        listen: SocketAddr,
    },
    /// Run a broker node from a configuration file (keys: README.md, "Running a broker").
    Broker {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Overrides broker.data_dir.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Overrides broker.listen.
        #[arg(long)]
        listen: Option<String>,
        /// Overrides broker.node_id.
        #[arg(long)]
        node_id: Option<u32>,
        /// Overrides cluster.controllers: the metadata quorum's voters,
        /// 1@HOST:PORT,2@HOST:PORT,3@HOST:PORT.
        #[arg(long)]
        controllers: Option<String>,
        /// Overrides tls.cert (this node's certificate, PEM).
        #[arg(long)]
        cert: Option<PathBuf>,
        /// Overrides tls.key.
        #[arg(long)]
        key: Option<PathBuf>,
        /// Overrides tls.ca (the cluster CA, PEM).
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Overrides cluster.rack.
        #[arg(long)]
        rack: Option<String>,
    },
    /// The cluster: nodes, controller leader, partitions' health; run a
    /// local cluster.
    Cluster {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        command: crate::cluster::ClusterCommand,
    },
    /// Certificates for a cluster: a CA and one certificate per node.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Start an embedded node, create a topic, produce and consume, print what happened.
    Demo {
        #[arg(long, default_value_t = 10_000)]
        records: u64,
    },
    /// Topics: create, list, describe, delete, produce, consume.
    Topic {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        command: TopicCommand,
    },
    /// WebAssembly plugins: init, build, test, deploy, list, describe, pause, resume, remove, logs.
    Plugin {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        command: crate::plugin_cli::PluginCommand,
    },
    /// Consumer groups: list, describe (members, offsets, lag), reset offsets, delete.
    Group {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        command: crate::group_cli::GroupCommand,
    },
    /// Transactions: list, describe (state, partitions, age, producer),
    /// abort a hanging one.
    Transaction {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        command: crate::txn_cli::TransactionCommand,
    },
    /// Load generator: produce, consume, end-to-end latency, raw QUIC baseline.
    Bench(crate::bench::BenchArgs),
}

/// How client commands find the broker.
#[derive(Args, Debug, Clone)]
pub struct ConnArgs {
    /// Broker address(es), comma separated. Default: $QUIVER_BROKERS, else
    /// the address `quiver dev` wrote in the dev dir.
    #[arg(long, env = "QUIVER_BROKERS", global = true)]
    pub brokers: Option<String>,
    /// CA certificate (PEM) that signed the brokers' certificates. Default:
    /// $QUIVER_CA, else ca.pem in the dev dir.
    #[arg(long, env = "QUIVER_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Where `quiver dev` keeps its data.
    #[arg(long, env = "QUIVER_DEV_DIR", default_value = ".quiver", global = true)]
    pub dev_dir: PathBuf,
    /// A client certificate (PEM) of the cluster CA to present: its common
    /// name is who the brokers take this client for (admin commands need
    /// one, outside development nodes). Made by `quiver certs init --client`.
    #[arg(long, env = "QUIVER_CLIENT_CERT", global = true, requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// The key of --client-cert (PEM).
    #[arg(long, env = "QUIVER_CLIENT_KEY", global = true, requires = "client_cert")]
    pub client_key: Option<PathBuf>,
}

impl ConnArgs {
    pub fn client_config(&self) -> anyhow::Result<ClientConfig> {
        let brokers = match &self.brokers {
            Some(b) => b.clone(),
            None => std::fs::read_to_string(self.dev_dir.join("address")).map_err(|_| {
                anyhow::anyhow!(
                    "no broker address: pass --brokers HOST:PORT, set QUIVER_BROKERS, or start `quiver dev` \
                     (it writes {}/address)",
                    self.dev_dir.display()
                )
            })?,
        };
        let ca_path = self.ca.clone().unwrap_or_else(|| self.dev_dir.join("ca.pem"));
        let ca_pem = std::fs::read(&ca_path).with_context(|| {
            format!("cannot read the CA certificate {}: pass --ca FILE or set QUIVER_CA", ca_path.display())
        })?;
        let mut config = ClientConfig::new(String::new(), ca_pem);
        config.brokers = brokers.trim().split(',').map(|s| s.trim().to_string()).collect();
        if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
            let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
            config.identity = Some((read(cert)?, read(key)?));
        }
        Ok(config)
    }

    pub async fn connect(&self) -> anyhow::Result<Client> {
        Ok(Client::connect(self.client_config()?).await?)
    }
}

#[derive(Subcommand, Debug)]
pub enum TopicCommand {
    /// Move a partition's replicas to other brokers while it keeps serving:
    /// the new replicas copy from the leader, and the old ones leave once
    /// the new ones are in sync (watch `topic describe`).
    Reassign {
        name: String,
        #[arg(short, long)]
        partition: u32,
        /// The new replicas, comma-separated node ids; the first is the
        /// preferred leader.
        #[arg(long, value_delimiter = ',', required_unless_present = "cancel", conflicts_with = "cancel")]
        replicas: Vec<u32>,
        /// Stop the move in progress: the partition goes back to the
        /// replicas it started from.
        #[arg(long)]
        cancel: bool,
    },
    /// Create a topic.
    Create {
        name: String,
        #[arg(short, long, default_value_t = 1)]
        partitions: u32,
        /// Replicas per partition, on distinct brokers.
        #[arg(short = 'r', long, default_value_t = 1)]
        replication_factor: u16,
        /// Topic config KEY=VALUE (repeatable): cleanup.policy (delete, compact,
        /// compact,delete), retention.ms, retention.bytes, segment.bytes,
        /// segment.ms, compression, max.message.bytes, delete.retention.ms,
        /// min.cleanable.dirty.ratio, ... (`topic describe` lists them all).
        #[arg(short, long = "config", value_parser = parse_key_value)]
        configs: Vec<(String, String)>,
    },
    /// List topics.
    List {
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Show a topic's partitions, offsets, sizes and configs.
    Describe {
        name: String,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Delete a topic and its data.
    Delete { name: String },
    /// Clean a compacted topic now on every broker (admin): each replica
    /// keeps the latest record of each key, whatever its dirty ratio.
    Compact {
        name: String,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Produce one record per line of standard input.
    Produce {
        name: String,
        /// Split each line at the first SEP into key and value (e.g. '\t').
        #[arg(long)]
        key_sep: Option<String>,
        /// A value equal to this is sent as no value: a tombstone, which
        /// deletes its key from a compacted topic (Kafka's null.marker).
        #[arg(long)]
        null_marker: Option<String>,
        #[arg(long, value_enum, default_value_t = AcksArg::All)]
        acks: AcksArg,
        /// Fixed partition (default: the topic's partitioner plugin if it
        /// names one, else by key, sticky for keyless records).
        #[arg(short, long)]
        partition: Option<u32>,
        #[arg(long, default_value = "none")]
        compression: Compression,
        /// Header KEY=VALUE added to every record (repeatable).
        #[arg(long = "header", value_parser = parse_key_value)]
        headers: Vec<(String, String)>,
        #[arg(long, default_value_t = 5)]
        linger_ms: u64,
        #[arg(long, default_value_t = 128 * 1024)]
        batch_bytes: usize,
        /// Let the broker run the topic's partitioner plugin instead of
        /// running it here.
        #[arg(long)]
        broker_partitioning: bool,
        /// Give up on a record (exit 1) when it is not acknowledged within
        /// this many ms, retries included (e.g. while a cluster has too few
        /// in-sync replicas or no leader for the partition).
        #[arg(long, default_value_t = 120_000)]
        timeout_ms: u64,
        /// Send batches without producer sequence numbers: a batch whose
        /// answer was lost then fails as "delivery unknown" instead of being
        /// sent again (idempotence is on by default, as in Kafka).
        #[arg(long)]
        no_idempotence: bool,
        /// How long to ask for the topic's metadata while the cluster does
        /// not know it (just created, a node catching up) or cannot be
        /// reached, before giving up (Kafka's max.block.ms).
        #[arg(long, default_value_t = 60_000)]
        max_block_ms: u64,
        /// Write in transactions as this transactional id: every
        /// --transaction-size records are committed together (read_committed
        /// consumers see them all at once, or none); a new instance with the
        /// same id fences this one.
        #[arg(long, conflicts_with = "no_idempotence")]
        transactional_id: Option<String>,
        /// Records per transaction (the last one commits what is left at
        /// the end of the input).
        #[arg(long, default_value_t = 1_000, requires = "transactional_id")]
        transaction_size: u64,
        /// The transaction timeout (ms): an open transaction is aborted by
        /// its coordinator past it.
        #[arg(long, default_value_t = 60_000, requires = "transactional_id")]
        transaction_timeout_ms: u64,
    },
    /// Print records: value per line, or JSON objects with --format json.
    /// With --group, as a member of a consumer group: the group assigns the
    /// partitions, and the positions of printed records are committed.
    Consume {
        name: String,
        /// start | end | OFFSET | @UNIX_MS, optionally ':end' to stop at the
        /// end offsets as of launch (e.g. start:end). With --group: where a
        /// partition the group has no committed offset for starts (start or
        /// end).
        #[arg(short, long, default_value = "end")]
        offset: String,
        /// Consume as a member of this consumer group.
        #[arg(short, long)]
        group: Option<String>,
        /// A static member's id (group.instance.id): restarted within its
        /// session, it gets its partitions back without a rebalance.
        #[arg(long, requires = "group")]
        instance_id: Option<String>,
        /// How often the positions of printed records are committed.
        #[arg(long, default_value_t = 5_000, requires = "group")]
        commit_interval_ms: u64,
        /// Consume as a member of this share group (queue semantics): the
        /// members share every partition, each record goes to one member at
        /// a time and is acknowledged once printed.
        #[arg(long, conflicts_with_all = ["group", "partition"])]
        share_group: Option<String>,
        /// How a share group member acknowledges each printed record:
        /// accept, release (deliver it again) or reject (to the topic's
        /// dead-letter topic, TOPIC-dlq).
        #[arg(long, value_enum, default_value_t = AckArg::Accept, requires = "share_group")]
        ack: AckArg,
        #[arg(short, long)]
        partition: Option<u32>,
        /// Stop after this many records.
        #[arg(short = 'n', long)]
        count: Option<u64>,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Print key and value separated by this string (text format).
        #[arg(long)]
        key_sep: Option<String>,
        /// Print this for a record without a value (a tombstone), so that it
        /// differs from an empty value (text format).
        #[arg(long)]
        null_marker: Option<String>,
        /// A deployed filter plugin the broker runs before sending.
        #[arg(long)]
        filter: Option<String>,
        #[arg(long = "filter-param", value_parser = parse_key_value)]
        filter_params: Vec<(String, String)>,
        /// Decode values with the topic's value serializer.
        #[arg(long)]
        decode: bool,
        /// read-committed: only committed transactions' records (and those
        /// written outside transactions), up to each partition's last stable
        /// offset. read-uncommitted (the default): every record.
        #[arg(long, value_enum, default_value_t = IsolationArg::ReadUncommitted, conflicts_with = "share_group")]
        isolation: IsolationArg,
    },
}

/// `topic consume --isolation`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum IsolationArg {
    ReadUncommitted,
    ReadCommitted,
}

impl From<IsolationArg> for quiver_client::Isolation {
    fn from(i: IsolationArg) -> Self {
        match i {
            IsolationArg::ReadUncommitted => quiver_client::Isolation::ReadUncommitted,
            IsolationArg::ReadCommitted => quiver_client::Isolation::ReadCommitted,
        }
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcksArg {
    None,
    Leader,
    All,
}

impl From<AcksArg> for Acks {
    fn from(a: AcksArg) -> Acks {
        match a {
            AcksArg::None => Acks::None,
            AcksArg::Leader => Acks::Leader,
            AcksArg::All => Acks::All,
        }
    }
}

pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("'{s}' is not KEY=VALUE"))
}

pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Dev { data_dir, listen } => {
            // `QUIVER_SECTION__KEY` settings apply to a dev node too.
            let mut file = FileConfig::load(None, std::env::vars())?;
            file.broker.data_dir = data_dir.clone();
            file.broker.listen = listen.to_string();
            // A development node: anyone who trusts its CA may administer it.
            file.broker.allow_anonymous_admin = true;
            if file.tls.cert.is_some() || file.tls.key.is_some() {
                bail!(
                    "quiver dev makes its own certificates: unset QUIVER_TLS__CERT and QUIVER_TLS__KEY, or run `quiver broker`"
                );
            }
            let node = Node::start(file.validate()?).await?;
            let ca = node.ca_cert.clone().expect("dev nodes use dev certificates");
            write_dev_discovery(&data_dir, node.address, &ca)?;
            println!("quiver dev node listening on {} (QUIC, TLS 1.3)", node.address);
            println!("  data:  {}", data_dir.display());
            println!("  CA:    {}", data_dir.join("ca.pem").display());
            println!("client commands run from this directory find the node by themselves, e.g.");
            println!("  quiver topic create orders -p 6");
            println!("  seq 1 1000 | quiver topic produce orders");
            println!("  quiver topic consume orders -o start:end");
            println!("elsewhere: QUIVER_BROKERS={} QUIVER_CA={}", node.address, data_dir.join("ca.pem").display());
            std::io::stdout().flush()?;
            run_until_signal(node).await
        }
        Command::Broker { config, data_dir, listen, node_id, controllers, cert, key, ca, rack } => {
            let mut file = FileConfig::load(config.as_deref(), std::env::vars())?;
            if let Some(d) = data_dir {
                file.broker.data_dir = d;
            }
            if let Some(l) = listen {
                file.broker.listen = l;
            }
            if let Some(n) = node_id {
                file.broker.node_id = n;
            }
            if let Some(c) = controllers {
                file.cluster.controllers = c;
            }
            file.tls.cert = cert.or(file.tls.cert);
            file.tls.key = key.or(file.tls.key);
            file.tls.ca = ca.or(file.tls.ca);
            file.cluster.rack = rack.or(file.cluster.rack);
            let node = Node::start(file.validate()?).await?;
            println!("quiver broker listening on {}", node.address);
            if let Some(ca) = &node.ca_cert {
                println!("development CA: {}", ca.display());
            }
            std::io::stdout().flush()?;
            run_until_signal(node).await
        }
        Command::Certs { command: CertsCommand::Init { dir, nodes, hosts, clients } } => {
            let mut per_node: Vec<(u32, Vec<String>)> = nodes.iter().map(|n| (*n, Vec::new())).collect();
            for (id, host) in hosts {
                let id: u32 = id.parse().with_context(|| format!("--host {id}={host}: '{id}' is not a node id"))?;
                match per_node.iter_mut().find(|(n, _)| *n == id) {
                    Some((_, h)) => h.push(host),
                    None => bail!("--host {id}={host}: node {id} is not in --nodes"),
                }
            }
            let done = crate::tls::init_cluster_certs(&dir, &per_node, &clients)?;
            let ca = dir.join("ca.pem");
            println!("{} CA {}", if done.created_ca { "created" } else { "kept the existing" }, ca.display());
            for (id, _) in &per_node {
                let what = if done.issued.contains(id) { "issued" } else { "kept" };
                println!("node {id}: {what} {}", dir.join(format!("node-{id}")).join("broker.pem").display());
            }
            for name in &clients {
                let what = if done.clients.contains(name) { "issued" } else { "kept" };
                println!("client {name}: {what} {}", dir.join(format!("client-{name}")).join("client.pem").display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { records } => crate::demo::run(records).await.map(|()| ExitCode::SUCCESS),
        Command::Topic { conn, command } => topic(conn, command).await,
        Command::Plugin { conn, command } => crate::plugin_cli::run(conn, command).await,
        Command::Group { conn, command } => crate::group_cli::run(conn, command).await,
        Command::Transaction { conn, command } => crate::txn_cli::run(conn, command).await,
        Command::Cluster { conn, command } => crate::cluster::run(conn, command).await,
        Command::Bench(args) => crate::bench::run(args).await.map(|()| ExitCode::SUCCESS),
    }
}

/// SIGTERM and SIGINT: how a long-running command is asked to stop.
pub(crate) struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    pub(crate) fn new() -> std::io::Result<StopSignals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(StopSignals { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    /// Waits for either; its name.
    pub(crate) async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Serves until SIGINT or SIGTERM, then shuts down cleanly.
async fn run_until_signal(node: Node) -> anyhow::Result<ExitCode> {
    let mut stop = StopSignals::new()?;
    tokio::select! {
        signal = stop.recv() => tracing::info!("{signal}: shutting down"),
        message = node.fatal() => {
            node.shutdown().await;
            bail!("{message}");
        }
    }
    node.shutdown().await;
    eprintln!("quiver: shut down cleanly");
    Ok(ExitCode::SUCCESS)
}

async fn topic(conn: ConnArgs, command: TopicCommand) -> anyhow::Result<ExitCode> {
    let client = conn.connect().await?;
    let admin = client.admin();
    match command {
        TopicCommand::Create { name, partitions, replication_factor, configs } => {
            admin.create_replicated_topic(&name, partitions, replication_factor, &configs).await?;
            println!("created topic '{name}' with {partitions} partition(s)");
        }
        TopicCommand::List { format } => {
            let topics = admin.describe_topics(None).await?;
            match format {
                Format::Json => {
                    let list: Vec<_> = topics
                        .iter()
                        .map(|t| serde_json::json!({"name": t.name, "partitions": t.partitions.len()}))
                        .collect();
                    println!("{}", serde_json::to_string(&list)?);
                }
                Format::Text => {
                    for t in topics {
                        println!("{}\t{} partition(s)", t.name, t.partitions.len());
                    }
                }
            }
        }
        TopicCommand::Describe { name, format } => {
            let t = admin
                .describe_topics(Some(vec![name]))
                .await?
                .into_iter()
                .next()
                .context("broker described no topic")?;
            match format {
                Format::Json => {
                    let partitions: Vec<_> = t
                        .partitions
                        .iter()
                        .map(|p| {
                            serde_json::json!({
                                "partition": p.partition,
                                "leader": (p.leader != quiver_protocol::messages::NO_LEADER).then_some(p.leader),
                                "leader_epoch": p.leader_epoch, "replicas": p.replicas, "isr": p.isr,
                                "log_start_offset": p.log_start_offset, "high_watermark": p.high_watermark,
                                "size_bytes": p.size_bytes, "segments": p.segments,
                                "compaction": p.compaction.as_ref().map(|c| serde_json::json!({
                                    "dirty_ratio": f64::from(c.dirty_ratio_permille) / 1000.0,
                                    "first_dirty_offset": c.first_dirty_offset,
                                    "last_clean_ms": (c.last_clean_ms >= 0).then_some(c.last_clean_ms),
                                })),
                            })
                        })
                        .collect();
                    let configs: serde_json::Map<_, _> =
                        t.configs.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
                    let out = serde_json::json!({"name": t.name, "partitions": partitions, "configs": configs});
                    println!("{}", serde_json::to_string(&out)?);
                }
                Format::Text => {
                    println!("topic {}", t.name);
                    let compacted = t.partitions.iter().any(|p| p.compaction.is_some());
                    let extra = if compacted { "\tdirty_ratio\tlast_clean" } else { "" };
                    println!("partition\tleader\treplicas\tisr\tstart\thigh_watermark\tbytes\tsegments{extra}");
                    let list = |l: &[u32]| l.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
                    for p in &t.partitions {
                        let leader = if p.leader == quiver_protocol::messages::NO_LEADER {
                            "none".to_string()
                        } else {
                            p.leader.to_string()
                        };
                        let compaction = match &p.compaction {
                            Some(c) => format!(
                                "\t{:.3}\t{}",
                                f64::from(c.dirty_ratio_permille) / 1000.0,
                                if c.last_clean_ms < 0 { "never".into() } else { ago(c.last_clean_ms) }
                            ),
                            None if compacted => "\t-\t-".into(),
                            None => String::new(),
                        };
                        println!(
                            "{}\t{leader}\t{}\t{}\t{}\t{}\t{}\t{}{compaction}",
                            p.partition,
                            list(&p.replicas),
                            list(&p.isr),
                            p.log_start_offset,
                            p.high_watermark,
                            p.size_bytes,
                            p.segments
                        );
                    }
                    println!("configs:");
                    for (k, v) in &t.configs {
                        println!("  {k}={v}");
                    }
                }
            }
        }
        TopicCommand::Reassign { name, partition, replicas, cancel } => {
            let request = quiver_protocol::messages::ReassignPartitionRequest {
                topic: name.clone(),
                partition,
                replicas: replicas.clone(),
                cancel,
            };
            client.call(&request).await?;
            if cancel {
                println!(
                    "cancelled the move of {name}-{partition}: back to the replicas it started from \
                     (`quiver topic describe {name}`)"
                );
            } else {
                println!(
                    "reassigning {name}-{partition} to replicas {replicas:?}; `quiver topic describe {name}` shows the move"
                );
            }
        }
        TopicCommand::Delete { name } => {
            admin.delete_topic(&name).await?;
            println!("deleted topic '{name}'");
        }
        TopicCommand::Compact { name, format } => {
            let answers = admin.compact_topic(&name).await?;
            let rows = answers.iter().flat_map(|a| a.partitions.iter().map(move |p| (a.node_id, p)));
            match format {
                Format::Json => {
                    let rows: Vec<_> = rows
                        .map(|(node, p)| {
                            serde_json::json!({
                                "node": node, "partition": p.partition, "cleaned": p.cleaned,
                                "first_dirty_offset": p.first_dirty_offset, "cleaned_to": p.cleaned_to,
                                "bytes_before": p.bytes_before, "bytes_after": p.bytes_after,
                                "records_before": p.records_before, "records_after": p.records_after,
                            })
                        })
                        .collect();
                    println!("{}", serde_json::to_string(&rows)?);
                }
                Format::Text => {
                    println!("node\tpartition\tcleaned_to\tbytes_before\tbytes_after\trecords_before\trecords_after");
                    for (node, p) in rows {
                        if p.cleaned {
                            println!(
                                "{node}\t{}\t{}\t{}\t{}\t{}\t{}",
                                p.partition,
                                p.cleaned_to,
                                p.bytes_before,
                                p.bytes_after,
                                p.records_before,
                                p.records_after
                            );
                        } else {
                            println!("{node}\t{}\tnothing to clean", p.partition);
                        }
                    }
                }
            }
        }
        TopicCommand::Produce {
            name,
            key_sep,
            null_marker,
            acks,
            partition,
            compression,
            headers,
            linger_ms,
            batch_bytes,
            broker_partitioning,
            timeout_ms,
            no_idempotence,
            max_block_ms,
            transactional_id,
            transaction_size,
            transaction_timeout_ms,
        } => {
            let config = ProducerConfig {
                transaction_timeout: Duration::from_millis(transaction_timeout_ms),
                delivery_timeout: Duration::from_millis(timeout_ms),
                acks: acks.into(),
                compression,
                linger: Duration::from_millis(linger_ms),
                batch_bytes_max: batch_bytes,
                partition_locally: !broker_partitioning,
                idempotent: !no_idempotence,
                max_block: Duration::from_millis(max_block_ms),
                ..ProducerConfig::default()
            };
            if transaction_size == 0 {
                bail!("--transaction-size must be at least 1");
            }
            let transactions = transactional_id.map(|id| (id, transaction_size));
            return produce_stdin(&client, name, (key_sep, null_marker), partition, headers, config, transactions)
                .await;
        }
        TopicCommand::Consume {
            name,
            offset,
            group,
            instance_id,
            commit_interval_ms,
            share_group,
            ack,
            partition,
            count,
            format,
            key_sep,
            null_marker,
            filter,
            filter_params,
            decode,
            isolation,
        } => {
            let fetch = ConsumerConfig {
                filter,
                filter_params,
                decode_values: decode,
                isolation: isolation.into(),
                ..ConsumerConfig::default()
            };
            let printer = Printer { format, sep: key_sep.as_deref().map(unescape), null: null_marker };
            if let Some(group) = share_group {
                if fetch.filter.is_some() || decode {
                    bail!("--share-group reads the records as stored: no --filter or --decode");
                }
                return consume_share(&client, &name, &group, count, printer, ack.into()).await;
            }
            if let Some(group) = group {
                if partition.is_some() {
                    bail!("--partition and --group: a group member gets its partitions from the group");
                }
                let fetch = ConsumerConfig {
                    instance_id,
                    auto_commit_interval: Duration::from_millis(commit_interval_ms),
                    ..fetch
                };
                return consume_group(&client, &name, &group, &offset, count, printer, fetch).await;
            }
            return consume(&client, &name, &offset, partition, count, printer, fetch).await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn unescape(sep: &str) -> String {
    sep.replace("\\t", "\t").replace("\\n", "\n")
}

/// `(key_sep, null_marker)`: how a line splits into a key and a value, and
/// the value that means none.
async fn produce_stdin(
    client: &Client,
    topic: String,
    (key_sep, null_marker): (Option<String>, Option<String>),
    partition: Option<u32>,
    headers: Vec<(String, String)>,
    config: ProducerConfig,
    transactions: Option<(String, u64)>,
) -> anyhow::Result<ExitCode> {
    let mut sink = match transactions {
        None => Sink::Plain(client.producer(config)),
        Some((id, size)) => {
            let producer = client.transactional_producer(&id, config);
            producer.init().await.with_context(|| format!("initialising transactional id '{id}'"))?;
            Sink::Transactional { producer, size, open: 0, committed: 0, transactions: 0 }
        }
    };
    let topic: std::sync::Arc<str> = topic.into();
    let key_sep = key_sep.map(|s| unescape(&s));
    let headers: Vec<Header> = headers.into_iter().map(|(k, v)| Header { key: k, value: Some(v.into()) }).collect();
    // Delivery results are checked in send order by a separate task, so
    // reading stdin never waits for acknowledgements.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<quiver_client::DeliveryFuture>(100_000);
    let checker = tokio::spawn(async move {
        let (mut ok, mut failed, mut first_error) = (0u64, 0u64, None);
        while let Some(delivery) = rx.recv().await {
            match delivery.await {
                Ok(_) => ok += 1,
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert(e.to_string());
                }
            }
        }
        (ok, failed, first_error)
    });
    let (line_tx, mut line_rx) = tokio::sync::mpsc::channel::<std::io::Result<String>>(10_000);
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::stdin().lock().lines() {
            if line_tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    let mut send_error = None;
    while let Some(line) = line_rx.recv().await {
        let line = line.context("reading standard input")?;
        let (key, value) = match &key_sep {
            Some(sep) => match line.split_once(sep.as_str()) {
                Some((k, v)) => (Some(k.to_string()), v.to_string()),
                None => (None, line),
            },
            None => (None, line),
        };
        let mut record = ProducerRecord::new(topic.clone(), value);
        if null_marker.as_ref().is_some_and(|m| record.value.as_deref() == Some(m.as_bytes())) {
            record.value = None;
        }
        record.key = key.map(Into::into);
        record.partition = partition;
        record.headers = headers.clone();
        match sink.send(record).await {
            Ok(delivery) => {
                if tx.send(delivery).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                send_error = Some(e);
                break;
            }
        }
        if let Err(e) = sink.commit_if_full().await {
            send_error = Some(e);
            break;
        }
    }
    let finished = match send_error {
        None => sink.finish().await,
        Some(e) => {
            sink.abandon().await;
            Err(e)
        }
    };
    drop(tx);
    let (ok, failed, first_error) = checker.await?;
    if let Sink::Transactional { committed, transactions, .. } = &sink {
        if let Err(e) = finished {
            bail!(
                "{e}: the open transaction was aborted; {committed} record(s) were committed in {transactions} \
                 transaction(s) before"
            );
        }
        eprintln!("produced {committed} record(s) to '{topic}' in {transactions} transaction(s)");
        return Ok(ExitCode::SUCCESS);
    }
    if let Err(e) = finished {
        bail!("{e} ({ok} record(s) acknowledged before)");
    }
    if failed > 0 {
        eprintln!("{failed} record(s) failed, {ok} acknowledged; first error: {}", first_error.unwrap_or_default());
        return Ok(ExitCode::FAILURE);
    }
    eprintln!("produced {ok} record(s) to '{topic}'");
    Ok(ExitCode::SUCCESS)
}

/// Where `topic produce` sends: a plain producer, or a transactional one
/// committing every `size` records.
enum Sink {
    Plain(quiver_client::Producer),
    Transactional {
        producer: quiver_client::TransactionalProducer,
        size: u64,
        /// Records in the open transaction.
        open: u64,
        committed: u64,
        transactions: u64,
    },
}

impl Sink {
    async fn send(&mut self, record: ProducerRecord) -> anyhow::Result<quiver_client::DeliveryFuture> {
        match self {
            Sink::Plain(p) => Ok(p.send(record).await?),
            Sink::Transactional { producer, open, .. } => {
                if *open == 0 {
                    producer.begin()?;
                }
                *open += 1;
                Ok(producer.send(record).await?)
            }
        }
    }

    async fn commit_if_full(&mut self) -> anyhow::Result<()> {
        match self {
            Sink::Transactional { size, open, .. } if *open >= *size => self.commit().await,
            _ => Ok(()),
        }
    }

    async fn commit(&mut self) -> anyhow::Result<()> {
        let Sink::Transactional { producer, open, committed, transactions, .. } = self else { return Ok(()) };
        if *open == 0 {
            return Ok(());
        }
        producer.commit().await?;
        *committed += *open;
        *transactions += 1;
        *open = 0;
        Ok(())
    }

    /// Everything sent: the plain producer flushed, the last transaction
    /// committed and its markers written (a reader started next sees it).
    async fn finish(&mut self) -> anyhow::Result<()> {
        match self {
            Sink::Plain(p) => {
                p.flush().await;
                Ok(())
            }
            Sink::Transactional { .. } => {
                self.commit().await?;
                if let Sink::Transactional { producer, transactions: 1.., .. } = self {
                    producer.settled().await?;
                }
                Ok(())
            }
        }
    }

    /// After a failure: what was sent is flushed, an open transaction
    /// aborted (unless its producer was fenced).
    async fn abandon(&mut self) {
        match self {
            Sink::Plain(p) => p.flush().await,
            Sink::Transactional { producer, open, .. } => {
                if *open > 0
                    && let Err(e) = producer.abort().await
                {
                    eprintln!("aborting the open transaction: {e}");
                }
            }
        }
    }
}

/// Parses `-o`: start | end | OFFSET | @UNIX_MS, with an optional `:end`.
pub fn parse_offset_arg(arg: &str) -> anyhow::Result<(OffsetSpec, bool)> {
    let (start, stop_at_end) = match arg.rsplit_once(':') {
        Some((s, "end")) => (s, true),
        Some(_) => bail!("'{arg}': only ':end' may follow the start position"),
        None => (arg, false),
    };
    let spec = match start {
        "start" | "earliest" | "beginning" => OffsetSpec::Earliest,
        "end" | "latest" => OffsetSpec::Latest,
        s if s.starts_with('@') => OffsetSpec::Timestamp(
            s[1..].parse().with_context(|| format!("'{s}': expected @ followed by milliseconds since the epoch"))?,
        ),
        s => {
            OffsetSpec::Offset(s.parse().with_context(|| format!("'{s}' is not start, end, an offset or @timestamp"))?)
        }
    };
    Ok((spec, stop_at_end))
}

/// How `topic consume` prints a record.
struct Printer {
    format: Format,
    /// Text: print the key, then this, then the value.
    sep: Option<String>,
    /// Text: what a missing value prints as.
    null: Option<String>,
}

impl Printer {
    fn print(&self, out: &mut impl Write, r: &quiver_client::ConsumerRecord) -> anyhow::Result<()> {
        match self.format {
            Format::Json => {
                serde_json::to_writer(&mut *out, &record_json(r))?;
                out.write_all(b"\n")?;
            }
            Format::Text => {
                if let Some(sep) = &self.sep {
                    out.write_all(r.key.as_deref().unwrap_or_default())?;
                    out.write_all(sep.as_bytes())?;
                }
                match (&r.value, &self.null) {
                    (None, Some(null)) => out.write_all(null.as_bytes())?,
                    (value, _) => out.write_all(value.as_deref().unwrap_or_default())?,
                }
                out.write_all(b"\n")?;
            }
        }
        Ok(())
    }
}

async fn consume(
    client: &Client,
    topic: &str,
    offset: &str,
    partition: Option<u32>,
    count: Option<u64>,
    printer: Printer,
    fetch: ConsumerConfig,
) -> anyhow::Result<ExitCode> {
    let (spec, stop_at_end) = parse_offset_arg(offset)?;
    let mut consumer = client.consumer(fetch);
    consumer.assign(topic, partition.map(|p| vec![p]), spec).await?;
    // With ':end', remember each partition's end offset now and stop there.
    let mut ends = std::collections::BTreeMap::new();
    if stop_at_end {
        for (topic, partition) in consumer.assignment() {
            ends.insert(partition, consumer.lookup(&topic, partition, OFFSET_LATEST).await?);
        }
        unassign_ended(&mut consumer, &ends);
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut printed = 0u64;
    let limit = count.unwrap_or(u64::MAX);
    while printed < limit && !consumer.assignment().is_empty() {
        let records = consumer.poll().await?;
        for r in records {
            if stop_at_end && r.offset >= ends.get(&r.partition).copied().unwrap_or(i64::MAX) {
                continue;
            }
            if printed >= limit {
                break;
            }
            printer.print(&mut out, &r)?;
            printed += 1;
        }
        out.flush()?;
        if stop_at_end {
            unassign_ended(&mut consumer, &ends);
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// Prints a group member's assignment changes on standard error, one line
/// each: `assigned|revoked|lost TOPIC-P,...`, or with `--format json`
/// `{"event": .., "partitions": ["TOPIC-P", ..], "at_ms": ..}` (a checker
/// can tell from these who owned what when).
struct LogRebalance {
    json: bool,
}

impl LogRebalance {
    fn log(&self, event: &str, partitions: &[(String, u32)]) {
        if partitions.is_empty() {
            return;
        }
        let list: Vec<String> = partitions.iter().map(|(t, p)| format!("{t}-{p}")).collect();
        match self.json {
            true => eprintln!(
                "{}",
                serde_json::json!({"event": event, "partitions": list, "at_ms": quiver_broker::now_ms()})
            ),
            false => eprintln!("{event} {}", list.join(",")),
        }
    }
}

impl quiver_client::RebalanceListener for LogRebalance {
    fn on_assigned(&mut self, partitions: &[(String, u32)]) {
        self.log("assigned", partitions);
    }

    fn on_revoked(&mut self, partitions: &[(String, u32)]) {
        self.log("revoked", partitions);
    }

    fn on_lost(&mut self, partitions: &[(String, u32)]) {
        self.log("lost", partitions);
    }
}

/// `topic consume --group`: prints records as a group member until SIGINT,
/// SIGTERM or `-n` records; the positions of printed records are committed
/// (every commit interval, before a partition is given up, and at the end),
/// then the member leaves the group.
async fn consume_group(
    client: &Client,
    topic: &str,
    group: &str,
    offset: &str,
    count: Option<u64>,
    printer: Printer,
    mut config: ConsumerConfig,
) -> anyhow::Result<ExitCode> {
    let (spec, stop_at_end) = parse_offset_arg(offset)?;
    config.auto_offset_reset = match (spec, stop_at_end) {
        (OffsetSpec::Earliest, false) => quiver_client::OffsetReset::Earliest,
        (OffsetSpec::Latest, false) => quiver_client::OffsetReset::Latest,
        _ => bail!(
            "-o '{offset}' with --group: a group resumes from its committed offsets; -o says where a partition without \
             one starts: start or end"
        ),
    };
    let mut consumer = client.consumer(config);
    consumer.set_rebalance_listener(LogRebalance { json: printer.format == Format::Json });
    consumer.subscribe(group, &[topic]).await?;
    let mut stop = StopSignals::new()?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut printed = 0u64;
    let limit = count.unwrap_or(u64::MAX);
    while printed < limit {
        let records = tokio::select! {
            records = consumer.poll() => records?,
            _ = stop.recv() => break,
        };
        // With -n, the records past the limit are not committed: the
        // group reads them next.
        let mut unprinted: std::collections::BTreeMap<(String, u32), i64> = Default::default();
        for r in records {
            if printed >= limit {
                unprinted.entry((r.topic.to_string(), r.partition)).or_insert(r.offset);
                continue;
            }
            printer.print(&mut out, &r)?;
            printed += 1;
        }
        out.flush()?;
        for ((t, p), offset) in unprinted {
            consumer.seek(&t, p, OffsetSpec::Offset(offset)).await?;
        }
    }
    out.flush()?;
    consumer.close().await?;
    Ok(ExitCode::SUCCESS)
}

/// How `topic consume --share-group` acknowledges records.
#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum AckArg {
    Accept,
    Release,
    Reject,
}

impl From<AckArg> for quiver_client::AckKind {
    fn from(a: AckArg) -> Self {
        match a {
            AckArg::Accept => quiver_client::AckKind::Accept,
            AckArg::Release => quiver_client::AckKind::Release,
            AckArg::Reject => quiver_client::AckKind::Reject,
        }
    }
}

/// `topic consume --share-group`: prints records as a share group member
/// until SIGINT, SIGTERM or `-n` records, acknowledging each printed one
/// with `ack`; then leaves (what it still held goes to the others). With
/// `--format json` each record has its `delivery_count`.
async fn consume_share(
    client: &Client,
    topic: &str,
    group: &str,
    count: Option<u64>,
    printer: Printer,
    ack: quiver_client::AckKind,
) -> anyhow::Result<ExitCode> {
    let mut consumer = client.share_consumer(group, &[topic], quiver_client::ShareConsumerConfig::default());
    let mut stop = StopSignals::new()?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut printed = 0u64;
    let limit = count.unwrap_or(u64::MAX);
    while printed < limit {
        let records = tokio::select! {
            records = consumer.poll() => records?,
            _ = stop.recv() => break,
        };
        for r in records {
            // Past -n: given back for another member (or a later run).
            if printed >= limit {
                consumer.acknowledge(&r, quiver_client::AckKind::Release);
                continue;
            }
            match printer.format {
                Format::Json => {
                    let mut json = record_json(&r.record);
                    json["delivery_count"] = r.delivery_count.into();
                    serde_json::to_writer(&mut out, &json)?;
                    out.write_all(b"\n")?;
                }
                Format::Text => printer.print(&mut out, &r.record)?,
            }
            consumer.acknowledge(&r, ack);
            printed += 1;
        }
        out.flush()?;
        for refused in consumer.refused() {
            eprintln!(
                "{}-{}@{}: acknowledgement refused: {}",
                refused.topic, refused.partition, refused.offset, refused.error.message
            );
        }
    }
    out.flush()?;
    consumer.close().await?;
    Ok(ExitCode::SUCCESS)
}

/// `-o start:end`: stops reading the partitions that reached the end
/// offset they had at launch.
fn unassign_ended(consumer: &mut quiver_client::Consumer, ends: &std::collections::BTreeMap<u32, i64>) {
    for (t, p) in consumer.assignment() {
        if consumer.position(&t, p) >= ends.get(&p).copied() {
            consumer.unassign(&t, p);
        }
    }
}

/// Bytes as JSON: a string when valid UTF-8, else `{"hex": "..."}`.
pub fn bytes_json(b: Option<&[u8]>) -> serde_json::Value {
    match b {
        None => serde_json::Value::Null,
        Some(b) => match std::str::from_utf8(b) {
            Ok(s) => serde_json::Value::String(s.to_string()),
            Err(_) => {
                serde_json::json!({"hex": b.iter().map(|x| format!("{x:02x}")).collect::<String>()})
            }
        },
    }
}

pub fn record_json(r: &quiver_client::ConsumerRecord) -> serde_json::Value {
    let headers: Vec<_> =
        r.headers.iter().map(|h| serde_json::json!({"key": h.key, "value": bytes_json(h.value.as_deref())})).collect();
    serde_json::json!({
        "partition": r.partition,
        "offset": r.offset,
        "timestamp": r.timestamp_ms,
        "key": bytes_json(r.key.as_deref()),
        "value": bytes_json(r.value.as_deref()),
        "headers": headers,
    })
}

/// Used by the demo and benchmarks: a client for an in-process node.
pub async fn connect_local(address: SocketAddr, ca: &Path) -> anyhow::Result<Client> {
    let ca_pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
    Ok(Client::connect(ClientConfig::new(address.to_string(), ca_pem)).await?)
}

/// How long ago a wall-clock time in ms was, for people: `42s ago`.
fn ago(ms: i64) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    let seconds = (now - ms).max(0) / 1000;
    match seconds {
        s if s < 120 => format!("{s}s ago"),
        s if s < 7200 => format!("{}m ago", s / 60),
        s => format!("{}h ago", s / 3600),
    }
}
