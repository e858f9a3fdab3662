//! `quiver bench`: whole-system load generator. Measures produce and consume
//! throughput, end-to-end latency, and a raw-QUIC baseline (the same bytes
//! over one quinn stream with no broker) so results can be given as a ratio
//! of what the transport can do on the same machine in the same run.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::{Args, Subcommand};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use quiver_client::{Client, Compression, ConsumerConfig, ErrorCode, OffsetSpec, ProducerConfig, ProducerRecord};
use serde::Serialize;

use crate::cli::{AcksArg, ConnArgs, Format, connect_local};
use crate::node::{Node, dev_config};

mod compact;
mod group;
mod txn;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub mode: BenchMode,
    #[command(flatten)]
    pub opts: BenchOpts,
}

#[derive(Subcommand, Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchMode {
    /// Producer throughput and acknowledgement latency.
    Produce,
    /// Consumer catch-up throughput (records are produced first, untimed).
    Consume,
    /// Produce-to-consume latency at a fixed rate.
    E2e,
    /// Raw QUIC baseline only: bytes over one stream, no broker.
    Quic,
    /// In-stream transform throughput through the broker (input topic to
    /// output topic): a Wasm identity transform against the built-in native
    /// pass-through over the same records, the stateful `aggregate` (a count
    /// per key, changelogged) against Wasm identity over a keyed copy
    /// (`--keys`), and the time from deploy to the first output record.
    Transform,
    /// Replication on this machine: acks=all produce throughput of a
    /// 3-node cluster (replication factor 3, min.insync.replicas 2) against
    /// a 1-node cluster in the same run (child `quiver broker` processes on
    /// loopback), then failover: the time from `kill -9` of a partition
    /// leader to the first acknowledged acks=all write, `--failovers` times.
    Cluster,
    /// Broker memory: the resident set of a `quiver dev` child process
    /// idle after its start, its peak while `--records` are produced and
    /// read back, and idle again `--settle-secs` after the client left.
    Memory,
    /// Consumer groups: consume throughput of a new three-member group
    /// against three hand-assigned consumers in the same run (`--rounds`
    /// pairs), then `--handoffs` times each the time from a member's
    /// `kill -9` (group session 10 s) and from its clean leave to its
    /// successor's first record of the partitions it held.
    Group,
    /// Compacted topics: the log cleaner's throughput in MiB/s of input
    /// against a sequential copy of the same segment files (`--rounds`
    /// pairs; `--records` updates over `--keys` keys), its key map's peak
    /// against its buffer, then produce throughput while another topic is
    /// cleaned over and over against produce alone.
    Compact,
    /// Transactions: acks=all produce throughput of a transactional
    /// producer committing every 100, 1,000 and 10,000 records against an
    /// idempotent producer in the same run (`--rounds` rounds), with the
    /// commit latency.
    Txn,
}

#[derive(Args, Debug, Clone)]
pub struct BenchOpts {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Run against an in-process node in a temporary directory.
    #[arg(long, global = true)]
    pub embedded: bool,
    /// Also measure the raw QUIC baseline in the same run and print ratios.
    #[arg(long, global = true)]
    pub baseline: bool,
    /// Produce and consume with --baseline: measure this many times, each
    /// time the baseline right before, and report the median of the
    /// per-round ratios (one pair is at the mercy of a noisy machine).
    #[arg(long, global = true, default_value_t = 1)]
    pub rounds: u32,
    #[arg(long, global = true, default_value = "quiver-bench")]
    pub topic: String,
    #[arg(long, global = true, default_value_t = 6)]
    pub partitions: u32,
    #[arg(long, global = true, default_value_t = 200_000)]
    pub records: u64,
    #[arg(long, global = true, default_value_t = 1024)]
    pub record_bytes: usize,
    #[arg(long, global = true, default_value_t = 256 * 1024)]
    pub batch_bytes: usize,
    /// How long a batch waits for more records (default 5; e2e: 0, so that
    /// at light load a record leaves at once).
    #[arg(long, global = true)]
    pub linger_ms: Option<u64>,
    #[arg(long, global = true, default_value = "none")]
    pub compression: Compression,
    #[arg(long, global = true, value_enum, default_value_t = AcksArg::Leader)]
    pub acks: AcksArg,
    /// Concurrent producers, each with its own connection.
    #[arg(long, global = true, default_value_t = 1)]
    pub producers: usize,
    #[arg(long, global = true, default_value_t = 5)]
    pub in_flight: usize,
    /// Producers without sequence numbers (idempotence is on by default).
    #[arg(long, global = true)]
    pub no_idempotence: bool,
    /// Cluster bench: how many times to kill a partition leader (each one
    /// restarted and back in the ISR before the next).
    #[arg(long, global = true, default_value_t = 3)]
    pub failovers: u32,
    /// Compact and transform benches: distinct keys the records cycle over.
    #[arg(long, global = true, default_value_t = 10_000)]
    pub keys: u64,
    /// Group bench: how many member kills and clean leaves to time.
    #[arg(long, global = true, default_value_t = 5)]
    pub handoffs: u32,
    /// Cluster bench: keep the nodes' data directories and broker logs
    /// (they are kept anyway when the bench fails).
    #[arg(long, global = true)]
    pub keep_logs: bool,
    /// Memory bench: how long the broker idles after the load before the
    /// last reading (the allocator returns memory unused for 5 s to the
    /// system, its arenas' after 50 s).
    #[arg(long, global = true, default_value_t = 60)]
    pub settle_secs: u64,
    /// Records per second for e2e (0 = as fast as possible).
    #[arg(long, global = true, default_value_t = 2_000)]
    pub rate: u64,
    #[arg(long, global = true, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Transform bench: the identity component to deploy (default: build
    /// plugins/identity from this source tree).
    #[arg(long, global = true)]
    pub wasm: Option<std::path::PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct BenchResult {
    pub mode: String,
    pub records: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub mib_per_s: f64,
    pub records_per_s: f64,
    pub latency_ms_p50: Option<f64>,
    pub latency_ms_p99: Option<f64>,
    pub latency_ms_p999: Option<f64>,
    /// e2e: where the latency goes, stage by stage.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<Stage>,
    /// Transforms: from the deploy request to the first output record.
    pub first_output_ms: Option<f64>,
    /// Cluster: from killing the leader to the first acknowledged write.
    pub failover_ms: Option<f64>,
    /// Cluster: whether the killed partition leader also led the metadata
    /// quorum (its loss needs a Raft election as well).
    pub killed_controller_leader: Option<bool>,
    /// Group: from a member's kill or leave to its successor's first
    /// record of the partitions it held.
    pub handoff_ms: Option<f64>,
    /// Group: records a reader got again after a partition moved (read
    /// before the position was committed).
    pub records_read_twice: Option<u64>,
    /// Produce, consume and the baseline: CPU time (user and system) this
    /// process spent while measuring. With `--embedded` (and always for the
    /// baseline) both ends run in this process, so it is the whole cost.
    pub cpu_seconds: Option<f64>,
    /// Memory: the broker's resident set (MiB) idle after its start, its
    /// peak under load, and idle again after the load.
    pub rss_idle_mib: Option<f64>,
    pub rss_peak_mib: Option<f64>,
    pub rss_after_load_mib: Option<f64>,
    /// Compact: the cleaner's key map at its largest, and its budget.
    pub cleaner_map_mib: Option<f64>,
    pub cleaner_buffer_mib: Option<f64>,
    /// Compact: records left after the clean.
    pub records_after_clean: Option<u64>,
    /// Compact: bytes of segments the cleaner rewrote while this ran.
    pub cleaned_mib: Option<f64>,
}

impl BenchResult {
    fn new(mode: &str, records: u64, bytes: u64, elapsed: Duration, latency: Option<&Histogram<u64>>) -> Self {
        let seconds = elapsed.as_secs_f64().max(1e-9);
        let q = |p: f64| latency.map(|h| h.value_at_quantile(p) as f64 / 1000.0);
        BenchResult {
            mode: mode.into(),
            records,
            bytes,
            seconds,
            mib_per_s: bytes as f64 / seconds / (1024.0 * 1024.0),
            records_per_s: records as f64 / seconds,
            latency_ms_p50: q(0.50),
            latency_ms_p99: q(0.99),
            latency_ms_p999: q(0.999),
            stages: Vec::new(),
            first_output_ms: None,
            failover_ms: None,
            killed_controller_leader: None,
            handoff_ms: None,
            records_read_twice: None,
            cpu_seconds: None,
            rss_idle_mib: None,
            rss_peak_mib: None,
            rss_after_load_mib: None,
            cleaner_map_mib: None,
            cleaner_buffer_mib: None,
            records_after_clean: None,
            cleaned_mib: None,
        }
    }

    /// Records the CPU time spent since `cpu_at_start` ([`process_cpu`]).
    fn with_cpu(mut self, cpu_at_start: Duration) -> Self {
        self.cpu_seconds = Some(process_cpu().saturating_sub(cpu_at_start).as_secs_f64());
        self
    }

    /// CPU milliseconds per MiB moved.
    fn cpu_ms_per_mib(&self) -> Option<f64> {
        let mib = self.bytes as f64 / (1024.0 * 1024.0);
        self.cpu_seconds.filter(|&cpu| cpu > 0.0 && mib > 0.0).map(|cpu| cpu * 1000.0 / mib)
    }

    fn print(&self) {
        if let Some(ms) = self.handoff_ms {
            println!("{:<16} {ms:>8.0} ms to the successor's first record", self.mode);
            return;
        }
        if let (Some(idle), Some(peak), Some(after)) = (self.rss_idle_mib, self.rss_peak_mib, self.rss_after_load_mib) {
            println!(
                "{:<16} idle {idle:.1} MiB (aim: under {IDLE_RSS_AIM_MIB} MiB)  peak {peak:.1} MiB while {} records \
                 were produced and read back  idle again {after:.1} MiB",
                self.mode, self.records
            );
            return;
        }
        print!(
            "{:<16} {:>10} records {:>9.1} MiB/s {:>11.0} records/s in {:.2}s",
            self.mode, self.records, self.mib_per_s, self.records_per_s, self.seconds
        );
        if let (Some(a), Some(b), Some(c)) = (self.latency_ms_p50, self.latency_ms_p99, self.latency_ms_p999) {
            print!("  latency ms p50 {a:.2} p99 {b:.2} p99.9 {c:.2}");
        }
        if let (Some(cpu), Some(per_mib)) = (self.cpu_seconds, self.cpu_ms_per_mib()) {
            print!("  cpu {cpu:.2} s ({per_mib:.2} ms/MiB)");
        }
        for stage in &self.stages {
            print!(
                "\n  {:<10} ms p50 {:.3} p99 {:.3} p99.9 {:.3}  ({})",
                stage.name, stage.ms_p50, stage.ms_p99, stage.ms_p999, stage.what
            );
        }
        if let Some(ms) = self.first_output_ms {
            print!("  deploy to first output {ms:.0} ms");
        }
        if let Some(ms) = self.failover_ms {
            print!("  leader killed to first acks=all write {ms:.0} ms");
        }
        if let (Some(map), Some(buffer), Some(after)) =
            (self.cleaner_map_mib, self.cleaner_buffer_mib, self.records_after_clean)
        {
            print!("  {after} records left, key map {map:.2} MiB of {buffer:.0} MiB");
        }
        if let Some(mib) = self.cleaned_mib {
            print!("  while {mib:.0} MiB were cleaned");
        }
        if let Some(n) = self.records_read_twice.filter(|&n| n > 0) {
            print!("  ({n} read twice)");
        }
        if self.killed_controller_leader == Some(true) {
            print!(" (it also led the metadata quorum)");
        }
        println!();
    }
}

/// One stage of a record's way from `send` to a consumer (e2e).
#[derive(Debug, Serialize)]
pub struct Stage {
    pub name: &'static str,
    pub what: &'static str,
    pub ms_p50: f64,
    pub ms_p99: f64,
    pub ms_p999: f64,
}

impl Stage {
    /// The stage from microsecond pairs (start, end); pairs with an unknown
    /// start or end (0) are left out.
    fn of(name: &'static str, what: &'static str, pairs: impl Iterator<Item = (u64, u64)>) -> anyhow::Result<Stage> {
        let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
        for (start, end) in pairs.filter(|&(start, end)| start > 0 && end > 0) {
            let _ = hist.record(end.saturating_sub(start).max(1));
        }
        let q = |p: f64| hist.value_at_quantile(p) as f64 / 1000.0;
        Ok(Stage { name, what, ms_p50: q(0.5), ms_p99: q(0.99), ms_p999: q(0.999) })
    }
}

struct Target {
    client: Client,
    address: SocketAddr,
    ca_pem: Vec<u8>,
    node: Option<(Node, tempfile::TempDir)>,
}

async fn target(opts: &BenchOpts) -> anyhow::Result<Target> {
    if opts.embedded {
        let dir = tempfile::tempdir()?;
        let mut config = dev_config(dir.path(), "127.0.0.1:0".parse()?);
        config.broker.flush_interval_ms = None;
        let node = Node::start(config).await?;
        let ca = node.ca_cert.clone().expect("dev certificates");
        let client = connect_local(node.address, &ca).await?;
        let ca_pem = std::fs::read(&ca)?;
        return Ok(Target { client, address: node.address, ca_pem, node: Some((node, dir)) });
    }
    let config = opts.conn.client_config()?;
    let address =
        tokio::net::lookup_host(&config.brokers[0]).await?.next().context("broker address resolves to nothing")?;
    let ca_pem = config.ca_pem.clone();
    let client = Client::connect(config).await?;
    Ok(Target { client, address, ca_pem, node: None })
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let opts = args.opts;
    let mut results = Vec::new();
    let paired = opts.baseline && matches!(args.mode, BenchMode::Produce | BenchMode::Consume);
    let rounds = if paired { opts.rounds.max(1) } else { 1 };
    if args.mode == BenchMode::Quic || (opts.baseline && !paired) {
        results.extend(quic_baseline(&opts, Direction::Both).await?);
    }
    if args.mode == BenchMode::Cluster {
        results.extend(cluster(&opts).await?);
    } else if args.mode == BenchMode::Memory {
        results.push(memory(&opts).await?);
    } else if args.mode != BenchMode::Quic {
        let target = target(&opts).await?;
        ensure_topic(&target.client, &opts).await?;
        for round in 0..rounds {
            match args.mode {
                BenchMode::Produce => {
                    if round > 0 {
                        // Each round writes to an empty topic, as the first
                        // did: the page cache holds the same amount of data.
                        unless(ErrorCode::UnknownTopic, target.client.admin().delete_topic(&opts.topic).await)?;
                        ensure_topic(&target.client, &opts).await?;
                    }
                    if paired {
                        results.extend(quic_baseline(&opts, Direction::Upload).await?);
                    }
                    results.push(produce(&target, &opts, &opts.topic).await?)
                }
                BenchMode::Consume => {
                    // Records to read exist before the baseline runs.
                    ensure_records(&target, &opts).await?;
                    if paired {
                        results.extend(quic_baseline(&opts, Direction::Download).await?);
                    }
                    results.push(consume(&target, &opts).await?)
                }
                BenchMode::E2e => results.push(e2e(&target, &opts).await?),
                BenchMode::Transform => results.extend(transform(&target, &opts).await?),
                BenchMode::Group => {
                    results.extend(group::group(&target, &opts).await?);
                    break;
                }
                BenchMode::Compact => {
                    results.extend(compact::compact(&target, &opts).await?);
                    break;
                }
                BenchMode::Txn => {
                    results.extend(txn::txn(&target, &opts).await?);
                    break;
                }
                BenchMode::Quic | BenchMode::Cluster | BenchMode::Memory => unreachable!(),
            }
        }
        target.client.close();
        if let Some((node, _dir)) = target.node {
            node.shutdown().await;
        }
    }
    // The median over rounds of each round's ratio (rounds pair the n-th
    // result of one mode with the n-th of the other).
    let per_round_by = |a: &str, b: &str, measure: fn(&BenchResult) -> Option<f64>| -> Vec<f64> {
        let xs = results.iter().filter(|r| r.mode == a);
        let ys = results.iter().filter(|r| r.mode == b);
        xs.zip(ys).filter_map(|(x, y)| Some(measure(x)? / measure(y)?)).collect()
    };
    let per_round = |a: &str, b: &str| per_round_by(a, b, |r| Some(r.mib_per_s));
    // By CPU: the baseline's CPU per byte over the mode's, when both ends of
    // the mode ran in this process. On a machine shared with other work,
    // this moves less than the throughput does.
    let per_round_cpu =
        |a: &str, b: &str| if opts.embedded { per_round_by(b, a, BenchResult::cpu_ms_per_mib) } else { Vec::new() };
    let median = |mut all: Vec<f64>| {
        all.sort_by(f64::total_cmp);
        all.get(all.len() / 2).copied()
    };
    let ratio = |a: &str, b: &str| median(per_round(a, b));
    let handoff_times =
        |mode: &str| results.iter().filter(|r| r.mode == mode).filter_map(|r| r.handoff_ms).collect::<Vec<_>>();
    let ratio_cpu = |a: &str, b: &str| median(per_round_cpu(a, b));
    let listed = |all: &[f64]| {
        (all.len() > 1).then(|| all.iter().map(|r| format!("{:.1}", r * 100.0)).collect::<Vec<_>>().join(", "))
    };
    let ratios = serde_json::json!({
        "produce_vs_quic_upload": ratio("produce", "quic-upload"),
        "consume_vs_quic_download": ratio("consume", "quic-download"),
        "produce_vs_quic_upload_by_cpu": ratio_cpu("produce", "quic-upload"),
        "consume_vs_quic_download_by_cpu": ratio_cpu("consume", "quic-download"),
        "wasm_vs_native_transform": ratio("transform-wasm", "transform-native"),
        "cluster3_vs_single_produce": ratio("produce-3-nodes", "produce-1-node"),
        "group3_vs_assigned3_consume": ratio("group-3-members", "assigned-3-consumers"),
        "clean_vs_copy": ratio("clean", "sequential-copy"),
        "produce_cleaning_vs_alone": ratio("produce-cleaning", "produce-alone"),
        "exactly_once_vs_at_least_once_transform": ratio("transform-wasm-exactly-once", "transform-wasm"),
        "exactly_once_vs_at_least_once_stateful": ratio("transform-stateful-exactly-once", "transform-stateful"),
        "txn100_vs_idempotent": ratio(&txn::mode(100), "produce-idempotent"),
        "txn1000_vs_idempotent": ratio(&txn::mode(1_000), "produce-idempotent"),
        "txn10000_vs_idempotent": ratio(&txn::mode(10_000), "produce-idempotent"),
        "handoff_after_kill_ms_median": median(handoff_times("handoff-kill")),
        "handoff_after_leave_ms_median": median(handoff_times("handoff-leave")),
    });
    match opts.format {
        Format::Json => println!("{}", serde_json::json!({"results": results, "ratios": ratios})),
        Format::Text => {
            for r in &results {
                r.print();
            }
            for (a, b, label) in [
                ("produce", "quic-upload", "produce / raw QUIC upload  "),
                ("consume", "quic-download", "consume / raw QUIC download"),
            ] {
                let cpu_label = format!("  by CPU per byte (baseline / {a})");
                for (label, all) in [(label, per_round(a, b)), (cpu_label.as_str(), per_round_cpu(a, b))] {
                    match (listed(&all), median(all)) {
                        (Some(rounds), Some(r)) => {
                            println!("{label} = {:.1} % (median of rounds: {rounds} %)", r * 100.0)
                        }
                        (None, Some(r)) => println!("{label} = {:.1} %", r * 100.0),
                        _ => {}
                    }
                }
            }
            if let Some(r) = ratio("transform-wasm", "transform-native") {
                println!("Wasm identity / native pass-through = {:.1} %", r * 100.0);
            }
            if let Some(r) = ratio("transform-stateful", "transform-keyed-wasm") {
                println!("stateful aggregate / Wasm identity, keyed input = {:.1} %", r * 100.0);
            }
            if let Some(r) = ratio("transform-wasm-exactly-once", "transform-wasm") {
                println!("exactly-once / at-least-once Wasm identity = {:.1} %", r * 100.0);
            }
            if let Some(r) = ratio("transform-stateful-exactly-once", "transform-stateful") {
                println!("exactly-once / at-least-once stateful aggregate = {:.1} %", r * 100.0);
            }
            for (a, b, label) in [
                ("clean", "sequential-copy", "cleaner / sequential copy (MiB/s of input)"),
                ("produce-cleaning", "produce-alone", "produce while cleaning / produce alone"),
            ] {
                let all = per_round(a, b);
                if let (rounds, Some(r)) = (listed(&all), median(all)) {
                    let rounds = rounds.map(|r| format!(" (median of rounds: {r} %)")).unwrap_or_default();
                    println!("{label} = {:.1} %{rounds}", r * 100.0);
                }
            }
            for size in txn::SIZES {
                let all = per_round(&txn::mode(size), "produce-idempotent");
                if let (rounds, Some(r)) = (listed(&all), median(all)) {
                    let rounds = rounds.map(|r| format!(" (median of rounds: {r} %)")).unwrap_or_default();
                    println!("transactions of {size} records / idempotent produce = {:.1} %{rounds}", r * 100.0);
                }
            }
            if let Some(r) = ratio("produce-3-nodes", "produce-1-node") {
                println!("3-node acks=all / 1-node acks=all = {:.1} %", r * 100.0);
            }
            let all = per_round("group-3-members", "assigned-3-consumers");
            if let (rounds, Some(r)) = (listed(&all), median(all)) {
                let rounds = rounds.map(|r| format!(" (median of rounds: {r} %)")).unwrap_or_default();
                println!("3-member group / 3 hand-assigned consumers = {:.1} %{rounds}", r * 100.0);
            }
            for (mode, what) in [("handoff-kill", "kill -9, session 10 s"), ("handoff-leave", "clean leave")] {
                let mut all = handoff_times(mode);
                if let Some(m) = median(all.clone()) {
                    all.sort_by(f64::total_cmp);
                    println!(
                        "hand-over after a {what} (heartbeat 1 s): median {m:.0} ms, min {:.0}, max {:.0} over {}",
                        all[0],
                        all[all.len() - 1],
                        all.len()
                    );
                }
            }
            let mut failovers: Vec<f64> = results.iter().filter_map(|r| r.failover_ms).collect();
            if failovers.len() > 1 {
                failovers.sort_by(f64::total_cmp);
                let (min, median, max) = (failovers[0], failovers[failovers.len() / 2], failovers[failovers.len() - 1]);
                println!(
                    "failover over {} kills: min {min:.0} ms, median {median:.0} ms, max {max:.0} ms",
                    failovers.len()
                );
            }
        }
    }
    Ok(())
}

/// `bench cluster`: 1-node and 3-node clusters of child processes.
async fn cluster(opts: &BenchOpts) -> anyhow::Result<Vec<BenchResult>> {
    let mut opts = opts.clone();
    opts.acks = AcksArg::All;
    let mut results = Vec::new();
    for nodes in [1u32, 3] {
        let dir = tempfile::tempdir()?;
        let ports = (0..nodes).map(|_| free_udp_port()).collect::<anyhow::Result<Vec<_>>>()?;
        let mut local = crate::cluster::LocalCluster::start(dir.path(), &ports, &[])?;
        let outcome = async {
            let client = cluster_client(&local, Some(Duration::from_secs(10))).await?;
            let configs = vec![("min.insync.replicas".to_string(), nodes.min(2).to_string())];
            client.admin().create_replicated_topic(&opts.topic, opts.partitions, nodes as u16, &configs).await?;
            let target =
                Target { address: local.addresses[0].parse()?, ca_pem: std::fs::read(&local.ca)?, client, node: None };
            let mut result = produce(&target, &opts, &opts.topic).await?;
            result.mode = if nodes == 1 { "produce-1-node".into() } else { "produce-3-nodes".into() };
            target.client.close();
            anyhow::Ok(result)
        }
        .await;
        let outcome = match outcome {
            Ok(r) if nodes == 3 => {
                failover(&mut local, opts.failovers).await.map(|f| std::iter::once(r).chain(f).collect())
            }
            Ok(r) => Ok(vec![r]),
            Err(e) => Err(e),
        };
        local.stop().await;
        // The nodes' data and logs stay for a look after a failure, or
        // when asked to.
        if outcome.is_err() || opts.keep_logs {
            let kept = dir.keep();
            eprintln!("{nodes}-node cluster: data and broker logs kept in {}", kept.display());
        }
        results.extend(outcome.with_context(|| format!("{nodes}-node cluster"))?);
    }
    Ok(results)
}

/// What issue 2 asks of an idle broker's resident set.
const IDLE_RSS_AIM_MIB: u32 = 64;

/// `bench memory`: a `quiver dev` child process (its own data directory and
/// certificates), read from `/proc` when idle, under a produce and consume
/// load through this process's client, and idle again with no client
/// connected.
async fn memory(opts: &BenchOpts) -> anyhow::Result<BenchResult> {
    let dir = tempfile::tempdir()?;
    let address = format!("127.0.0.1:{}", free_udp_port()?);
    let log = std::fs::File::create(dir.path().join("broker.log"))?;
    let mut broker = tokio::process::Command::new(std::env::current_exe().context("finding the quiver executable")?)
        .arg("dev")
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--listen", &address])
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting a dev node")?;
    let pid = broker.id().context("the dev node exited at once")?;
    let outcome = async {
        let deadline = Instant::now() + Duration::from_secs(30);
        let (client, ca_pem) = loop {
            let ca = std::fs::read(dir.path().join("ca.pem")).unwrap_or_default();
            if !ca.is_empty()
                && let Ok(client) = Client::connect(quiver_client::ClientConfig::new(address.clone(), ca.clone())).await
            {
                break (client, ca);
            }
            anyhow::ensure!(Instant::now() < deadline, "the dev node did not answer within 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // A fresh node has nothing to do once it answers.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let idle = resident_mib(pid, "VmRSS")?;
        let target = Target { client, address: address.parse()?, ca_pem, node: None };
        ensure_topic(&target.client, opts).await?;
        let started = Instant::now();
        let produced = produce(&target, opts, &opts.topic).await?;
        consume(&target, opts).await?;
        let elapsed = started.elapsed();
        target.client.close();
        drop(target);
        tokio::time::sleep(Duration::from_secs(opts.settle_secs)).await;
        let mut result = BenchResult::new("broker-memory", produced.records, produced.bytes, elapsed, None);
        result.rss_idle_mib = Some(idle);
        result.rss_peak_mib = Some(resident_mib(pid, "VmHWM")?);
        result.rss_after_load_mib = Some(resident_mib(pid, "VmRSS")?);
        anyhow::Ok(result)
    }
    .await;
    // SIGTERM: the node flushes and closes its logs.
    let _ = std::process::Command::new("kill").arg(pid.to_string()).status();
    let _ = tokio::time::timeout(Duration::from_secs(10), broker.wait()).await;
    if outcome.is_err() {
        let kept = dir.keep();
        eprintln!("memory bench: the dev node's data and log are kept in {}", kept.display());
    }
    outcome
}

/// A `/proc/<pid>/status` memory field (`VmRSS`, `VmHWM`) in MiB.
fn resident_mib(pid: u32, field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status (the memory bench needs Linux)"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?
        .trim()
        .parse()?;
    Ok(kib / 1024.0)
}

/// A client of a local cluster (default timeouts unless given), once every
/// node registered.
async fn cluster_client(
    local: &crate::cluster::LocalCluster,
    request_timeout: Option<Duration>,
) -> anyhow::Result<Client> {
    let mut config = quiver_client::ClientConfig::new(local.addresses[0].clone(), std::fs::read(&local.ca)?);
    config.brokers = local.addresses.clone();
    if let Some(timeout) = request_timeout {
        config.request_timeout = timeout;
        config.connect_timeout = timeout.min(Duration::from_secs(1));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(client) = Client::connect(config.clone()).await
            && let Ok(info) = client.call(&quiver_protocol::messages::ClusterInfoRequest {}).await
            && info.nodes.iter().filter(|n| !n.fenced).count() == local.addresses.len()
            && info.controller_leader != quiver_protocol::messages::NO_LEADER
        {
            return Ok(client);
        }
        anyhow::ensure!(Instant::now() < deadline, "the local cluster did not form within 30 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Kills the leader of a one-partition, three-replica topic under a steady
/// acks=all producer, `rounds` times; each time measures until the first
/// write is acknowledged again, then restarts the killed node and waits
/// until it is back in the ISR.
async fn failover(local: &mut crate::cluster::LocalCluster, rounds: u32) -> anyhow::Result<Vec<BenchResult>> {
    const TOPIC: &str = "quiver-failover";
    // Library defaults (30 s request timeout): the client notices the dead
    // leader because the cluster names a new one, not by timing out.
    let client = cluster_client(local, None).await?;
    let configs = vec![("min.insync.replicas".to_string(), "2".to_string())];
    client.admin().create_replicated_topic(TOPIC, 1, 3, &configs).await?;
    // Idempotent, so a write whose leader died is retried inside its
    // delivery (written once) until the new leader takes it.
    let producer = client.producer(ProducerConfig {
        acks: quiver_client::Acks::All,
        in_flight_max: 1,
        linger: Duration::ZERO,
        delivery_timeout: Duration::from_secs(30),
        retry_backoff: Duration::from_millis(50),
        ..ProducerConfig::default()
    });
    let write = |n: u64| {
        let producer = producer.clone();
        async move {
            let record = ProducerRecord::new(TOPIC, format!("failover-{n}")).partition(0);
            let result = match producer.send(record).await {
                Ok(delivery) => delivery.await.map(drop).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = &result {
                tracing::debug!(record = n, error = %e, "acks=all write failed");
            }
            result.is_ok()
        }
    };
    // One connection per node, to ask each for its view.
    let mut nodes = Vec::new();
    for address in &local.addresses {
        let mut config = quiver_client::ClientConfig::new(address.clone(), std::fs::read(&local.ca)?);
        config.request_timeout = Duration::from_secs(2);
        config.connect_timeout = Duration::from_secs(1);
        nodes.push(Client::connect(config).await?);
    }
    let mut results = Vec::new();
    let mut n = 0;
    for round in 1..=rounds {
        // Every replica in the ISR as every node sees it (a node just
        // restarted may still answer from its old metadata) and writes
        // flowing, then kill the leader.
        let deadline = Instant::now() + Duration::from_secs(60);
        let leader = loop {
            anyhow::ensure!(Instant::now() < deadline, "{TOPIC} did not get all three replicas in sync within 60 s");
            if let Some(leader) = agreed_in_sync_leader(&nodes, TOPIC).await {
                break leader;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut flowing = 0;
        while flowing < 20 {
            anyhow::ensure!(Instant::now() < deadline, "acks=all writes to {TOPIC} do not succeed");
            n += 1;
            if write(n).await { flowing += 1 } else { flowing = 0 }
        }
        let info = client.call(&quiver_protocol::messages::ClusterInfoRequest {}).await?;
        local.kill9(leader).await;
        let killed = Instant::now();
        let mut attempts = 0u64;
        loop {
            n += 1;
            attempts += 1;
            if write(n).await {
                break;
            }
            anyhow::ensure!(killed.elapsed() < Duration::from_secs(60), "no acks=all write succeeded within 60 s");
        }
        let elapsed = killed.elapsed();
        let controller = info.controller_leader == leader;
        tracing::info!(round, leader, controller, attempts, ?elapsed, "failover");
        let mut result = BenchResult::new("failover", 1, 0, elapsed, None);
        result.failover_ms = Some(elapsed.as_secs_f64() * 1000.0);
        result.killed_controller_leader = Some(controller);
        results.push(result);
        local.start_node(leader, &[])?;
    }
    client.close();
    for node in nodes {
        node.close();
    }
    Ok(results)
}

/// The leader of `topic`-0 when every node names the same one and all
/// three replicas in its ISR.
async fn agreed_in_sync_leader(nodes: &[Client], topic: &str) -> Option<u32> {
    let mut agreed = None;
    for node in nodes {
        let described = node.admin().describe_topics(Some(vec![topic.to_string()])).await.ok()?;
        let p = described.first()?.partitions.first()?;
        if p.leader == quiver_protocol::messages::NO_LEADER || p.isr.len() != 3 || agreed.is_some_and(|l| l != p.leader)
        {
            return None;
        }
        agreed = Some(p.leader);
    }
    agreed
}

fn free_udp_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn ensure_topic(client: &Client, opts: &BenchOpts) -> anyhow::Result<()> {
    let created = client.admin().create_topic(&opts.topic, opts.partitions, &[]).await;
    unless(ErrorCode::TopicAlreadyExists, created.map(drop))
}

/// Success, or the broker's `code` (the state wanted was there already).
fn unless(code: ErrorCode, result: Result<(), quiver_client::CallError>) -> anyhow::Result<()> {
    match result {
        Err(quiver_client::CallError::Broker(e)) if e.code == code => Ok(()),
        other => Ok(other?),
    }
}

/// CPU time (user and system) this process has used so far.
fn process_cpu() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given (all-zero is a valid
    // value of it as well), and RUSAGE_SELF cannot fail.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// A payload of printable characters (compresses roughly like text), with
/// the record number in its first bytes.
fn payload(record_bytes: usize, seed: u64) -> Vec<u8> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ,.";
    let mut x = seed | 1;
    (0..record_bytes)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ALPHABET[(x % ALPHABET.len() as u64) as usize]
        })
        .collect()
}

fn progress(total: u64, label: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg:>8} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(label.to_string());
    bar
}

fn producer_config(opts: &BenchOpts) -> ProducerConfig {
    ProducerConfig {
        acks: opts.acks.into(),
        batch_bytes_max: opts.batch_bytes,
        linger: Duration::from_millis(opts.linger_ms.unwrap_or(5)),
        compression: opts.compression,
        in_flight_max: opts.in_flight,
        idempotent: !opts.no_idempotence,
        ..ProducerConfig::default()
    }
}

async fn produce(target: &Target, opts: &BenchOpts, topic: &str) -> anyhow::Result<BenchResult> {
    let producers = opts.producers.max(1);
    let per_producer = opts.records / producers as u64;
    let bar = progress(per_producer * producers as u64, "produce");
    let base = Bytes::from(payload(opts.record_bytes, 42));
    let cpu = process_cpu();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..producers {
        let client = if i == 0 {
            target.client.clone()
        } else {
            Client::connect(quiver_client::ClientConfig::new(target.address.to_string(), target.ca_pem.clone())).await?
        };
        let producer = client.producer(producer_config(opts));
        let (topic, bar, base) = (std::sync::Arc::<str>::from(topic), bar.clone(), base.clone());
        tasks.push(tokio::spawn(async move {
            // Deliveries go to the checker in groups (a channel send per
            // record would cost more than the producer's own work). A group
            // fills within microseconds, long before its records are
            // acknowledged, so the checker still sees each answer as it comes.
            const GROUP: usize = 64;
            type Sent = Vec<(Instant, quiver_client::DeliveryFuture)>;
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Sent>((1 << 16) / GROUP);
            let checker = tokio::spawn(async move {
                let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds");
                let mut errors = (0u64, None);
                while let Some(group) = rx.recv().await {
                    // One clock read per group, and one after each wait: a
                    // delivery that is ready when looked at was acknowledged
                    // by the last reading.
                    let mut now = Instant::now();
                    for (sent, delivery) in group {
                        let waited = !delivery.is_done();
                        let result = delivery.await;
                        if waited {
                            now = Instant::now();
                        }
                        match result {
                            Ok(_) => {
                                let _ = hist.record(now.saturating_duration_since(sent).as_micros().max(1) as u64);
                            }
                            Err(e) => {
                                errors.0 += 1;
                                errors.1.get_or_insert(e.to_string());
                            }
                        }
                    }
                }
                (hist, errors)
            });
            let mut group = Vec::with_capacity(GROUP);
            for n in 0..per_producer {
                // The same bytes each time (a cheap `Bytes` clone): the load
                // generator should cost as little as a real application.
                let delivery = producer.send(ProducerRecord::new(topic.clone(), base.clone())).await?;
                group.push((Instant::now(), delivery));
                if group.len() == GROUP {
                    tx.send(std::mem::replace(&mut group, Vec::with_capacity(GROUP))).await.ok();
                }
                if n % 1024 == 0 {
                    bar.inc(1024.min(per_producer - n));
                }
            }
            tx.send(group).await.ok();
            producer.flush().await;
            drop(tx);
            anyhow::Ok(checker.await?)
        }));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let (mut errors, mut first_error) = (0, None);
    for t in tasks {
        let (h, (e, first)) = t.await??;
        hist.add(&h)?;
        errors += e;
        first_error = first_error.or(first);
    }
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    if let Some(first) = first_error {
        anyhow::bail!("{errors} records were not acknowledged (the first: {first})");
    }
    let records = per_producer * producers as u64;
    Ok(BenchResult::new("produce", records, records * opts.record_bytes as u64, elapsed, Some(&hist)).with_cpu(cpu))
}

/// Produces the records a consume bench reads (untimed) unless the topic
/// holds them already.
async fn ensure_records(target: &Target, opts: &BenchOpts) -> anyhow::Result<()> {
    let end: i64 = {
        let admin = target.client.admin();
        let t = admin.describe_topics(Some(vec![opts.topic.clone()])).await?;
        t[0].partitions.iter().map(|p| p.high_watermark - p.log_start_offset).sum()
    };
    if (end as u64) < opts.records {
        produce(target, opts, &opts.topic).await?;
    }
    Ok(())
}

/// Reads the topic from its start; the records are there already
/// ([`ensure_records`]).
async fn consume(target: &Target, opts: &BenchOpts) -> anyhow::Result<BenchResult> {
    let mut consumer = target.client.consumer(ConsumerConfig::default());
    consumer.assign(&opts.topic, None, OffsetSpec::Earliest).await?;
    let bar = progress(opts.records, "consume");
    let cpu = process_cpu();
    let started = Instant::now();
    let (mut records, mut bytes) = (0u64, 0u64);
    while records < opts.records {
        let batch = consumer.poll().await?;
        anyhow::ensure!(!batch.is_empty() || started.elapsed() < Duration::from_secs(60), "consumer stalled");
        for r in &batch {
            bytes += r.value.as_ref().map_or(0, |v| v.len() as u64);
        }
        records += batch.len() as u64;
        bar.inc(batch.len() as u64);
    }
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    Ok(BenchResult::new("consume", records, bytes, elapsed, None).with_cpu(cpu))
}

async fn e2e(target: &Target, opts: &BenchOpts) -> anyhow::Result<BenchResult> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let mut consumer = target
        .client
        .consumer(ConsumerConfig { fetch_max_wait: Duration::from_millis(100), ..ConsumerConfig::default() });
    consumer.assign(&opts.topic, None, OffsetSpec::Latest).await?;
    let origin = Instant::now();
    let linger = Duration::from_millis(opts.linger_ms.unwrap_or(0));
    let producer = target.client.producer(ProducerConfig { linger, ..producer_config(opts) });
    let records = opts.records;
    // Per record, microseconds since `origin` (0: not seen): when its
    // request went out and when it was acknowledged. The record itself
    // carries its number and when `send` was called.
    let times = || std::sync::Arc::new((0..records).map(|_| AtomicU64::new(0)).collect::<Vec<_>>());
    let (sent_us, acked_us) = (times(), times());
    let (rate, topic, record_bytes) =
        (opts.rate, std::sync::Arc::<str>::from(opts.topic.as_str()), opts.record_bytes.max(16));
    let (sent, acked) = (sent_us.clone(), acked_us.clone());
    let sender = tokio::spawn(async move {
        let base = payload(record_bytes, 7);
        let mut tick = (rate > 0).then(|| {
            let mut t = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            t
        });
        let mut acks = tokio::task::JoinSet::new();
        for n in 0..records {
            if let Some(t) = tick.as_mut() {
                t.tick().await;
            }
            let mut value = base.clone();
            value[..8].copy_from_slice(&(origin.elapsed().as_micros() as u64).to_be_bytes());
            value[8..16].copy_from_slice(&n.to_be_bytes());
            let mut delivery = producer.send(ProducerRecord::new(topic.clone(), value)).await?;
            let (sent, acked) = (sent.clone(), acked.clone());
            acks.spawn(async move {
                let result = (&mut delivery).await;
                let at = origin.elapsed().as_micros() as u64;
                let i = n as usize;
                acked[i].store(at, Ordering::Relaxed);
                if let Some(s) = delivery.sent_at() {
                    sent[i].store(s.duration_since(origin).as_micros() as u64, Ordering::Relaxed);
                }
                result.map(drop)
            });
            while let Some(done) = acks.try_join_next() {
                done??;
            }
        }
        producer.flush().await;
        while let Some(done) = acks.join_next().await {
            done??;
        }
        anyhow::Ok(())
    });
    let bar = progress(records, "e2e");
    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    // (send, seen) per record, microseconds since `origin`.
    let mut seen_us = vec![(0u64, 0u64); records as usize];
    let (mut seen, mut bytes) = (0u64, 0u64);
    let started = Instant::now();
    let mut last_progress = Instant::now();
    while seen < records {
        let batch = consumer.poll().await?;
        let now = origin.elapsed().as_micros() as u64;
        if !batch.is_empty() {
            last_progress = Instant::now();
        }
        anyhow::ensure!(last_progress.elapsed() < Duration::from_secs(30), "no records for 30 s");
        for r in &batch {
            let v = r.value.as_deref().unwrap_or_default();
            anyhow::ensure!(v.len() >= 16, "short record");
            let send = u64::from_be_bytes(v[..8].try_into()?);
            let n = u64::from_be_bytes(v[8..16].try_into()?);
            let _ = hist.record(now.saturating_sub(send).max(1));
            if let Some(slot) = seen_us.get_mut(n as usize) {
                *slot = (send, now);
            }
            bytes += v.len() as u64;
        }
        seen += batch.len() as u64;
        bar.inc(batch.len() as u64);
    }
    let elapsed = started.elapsed();
    sender.await??;
    bar.finish_and_clear();
    let at = |times: &[AtomicU64], i: usize| times[i].load(Ordering::Relaxed);
    let each = || 0..records as usize;
    let stages = vec![
        Stage::of(
            "queued",
            "send to request written: linger, waiting for a request slot",
            each().map(|i| (seen_us[i].0, at(&sent_us, i))),
        )?,
        Stage::of(
            "acked",
            "request written to acknowledged: network, broker append, answer",
            each().map(|i| (at(&sent_us, i), at(&acked_us, i))),
        )?,
        Stage::of(
            "delivered",
            "request written to consumed: network, broker append, long-poll wake, fetch answer",
            each().map(|i| (at(&sent_us, i), seen_us[i].1)),
        )?,
    ];
    Ok(BenchResult { stages, ..BenchResult::new("e2e", seen, bytes, elapsed, Some(&hist)) })
}

/// Sum of the high watermarks of a topic's partitions.
async fn records_in(client: &Client, topic: &str) -> anyhow::Result<i64> {
    let described = client.admin().describe_topics(Some(vec![topic.to_string()])).await?;
    Ok(described.iter().flat_map(|t| &t.partitions).map(|p| p.high_watermark - p.log_start_offset).sum())
}

/// Runs the native pass-through, then the Wasm identity transform, each
/// from the start of the same input topic into its own new output topic.
/// Throughput counts from the first output record to the last, so the
/// component's compilation shows in `first_output_ms`, not in MiB/s.
async fn transform(target: &Target, opts: &BenchOpts) -> anyhow::Result<Vec<BenchResult>> {
    use quiver_protocol::messages::{PluginAction, PluginDeployRequest};
    let admin = target.client.admin();
    if (records_in(&target.client, &opts.topic).await? as u64) < opts.records {
        produce(target, opts, &opts.topic).await?;
    }
    let wasm = match &opts.wasm {
        Some(file) => std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?,
        None => {
            let built = tokio::task::spawn_blocking(|| quiver_plugin_host::builder::first_party("identity")).await?;
            std::fs::read(built.map_err(anyhow::Error::msg)?)?
        }
    };
    // The stateful pair reads a keyed copy of the input (`--keys` keys).
    let keyed = format!("{}-keyed", opts.topic);
    if admin.create_topic(&keyed, opts.partitions, &[]).await.is_ok() {
        compact::fill_keyed(target, opts, &keyed, "fill the keyed input").await?;
    }
    let aggregate = tokio::task::spawn_blocking(|| quiver_plugin_host::builder::first_party("aggregate")).await?;
    let aggregate = std::fs::read(aggregate.map_err(anyhow::Error::msg)?)?;
    // Exactly-once runs count their output partitions' transaction markers
    // as records too (one per partition per step of up to 1 MiB of input):
    // they finish a few records early.
    let (alo, eos) = ("at-least-once", "exactly-once");
    let runs = [
        ("transform-native", "identity", Vec::new(), &opts.topic, alo),
        ("transform-wasm", "", wasm.clone(), &opts.topic, alo),
        ("transform-wasm-exactly-once", "", wasm.clone(), &opts.topic, eos),
        ("transform-keyed-wasm", "", wasm, &keyed, alo),
        ("transform-stateful", "", aggregate.clone(), &keyed, alo),
        ("transform-stateful-exactly-once", "", aggregate, &keyed, eos),
    ];
    let mut results = Vec::new();
    for (label, builtin, wasm, input, guarantee) in runs {
        let total = records_in(&target.client, input).await?;
        let (name, output) = (format!("bench-{label}"), format!("{}-{label}", opts.topic));
        unless(ErrorCode::UnknownPlugin, admin.control_plugin(&name, PluginAction::Remove).await)?;
        unless(ErrorCode::UnknownTopic, admin.delete_topic(&output).await)?;
        // A stateful run starts from an empty changelog.
        unless(ErrorCode::UnknownTopic, admin.delete_topic(&format!("{name}-state")).await)?;
        admin.create_topic(&output, opts.partitions, &[]).await?;
        let bar = progress(total as u64, label);
        let deployed = Instant::now();
        admin
            .deploy_plugin(PluginDeployRequest {
                name: name.clone(),
                kind: "transform".into(),
                wasm: wasm.into(),
                builtin: builtin.into(),
                params: vec![],
                input: input.clone(),
                outputs: vec![output.clone()],
                on_error: "fail".into(),
                start: "start".into(),
                guarantee: guarantee.into(),
            })
            .await?;
        let (mut first, mut done) = (None, 0);
        while done < total {
            tokio::time::sleep(Duration::from_millis(if first.is_none() { 1 } else { 10 })).await;
            done = records_in(&target.client, &output).await?;
            if done > 0 && first.is_none() {
                first = Some(Instant::now());
            }
            bar.set_position(done as u64);
            anyhow::ensure!(deployed.elapsed() < Duration::from_secs(600), "{label}: {done} of {total} after 10 min");
        }
        bar.finish_and_clear();
        let first = first.expect("done > 0");
        let bytes = total as u64 * opts.record_bytes as u64;
        let mut result = BenchResult::new(label, total as u64, bytes, first.elapsed(), None);
        result.first_output_ms = Some(first.duration_since(deployed).as_secs_f64() * 1000.0);
        results.push(result);
        admin.control_plugin(&name, PluginAction::Remove).await?;
    }
    Ok(results)
}

/// Which ways the raw QUIC baseline measures.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Upload,
    Download,
    Both,
}

/// Pushes the bytes of `records` records over one QUIC stream (per
/// direction) to or from an in-process peer with no broker: the transport's
/// ceiling on this machine.
async fn quic_baseline(opts: &BenchOpts, direction: Direction) -> anyhow::Result<Vec<BenchResult>> {
    let dir = tempfile::tempdir()?;
    let paths = crate::tls::ensure_dev_certs(dir.path(), &[])?;
    let server_config = crate::tls::server_config(&paths.cert, &paths.key)?;
    let endpoint = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse()?)?;
    let address = endpoint.local_addr()?;
    let total = opts.records * opts.record_bytes as u64;
    let chunk = opts.batch_bytes.max(1024);
    let server = tokio::spawn(async move {
        let conn = endpoint.accept().await.context("no connection")?.await?;
        // Each stream starts with its kind: `u`, the client uploads until the
        // end of the stream; `d` and a length, the server sends that many bytes.
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let mut kind = [0u8; 1];
            recv.read_exact(&mut kind).await?;
            if kind[0] == b'u' {
                let mut buf = vec![0u8; 1 << 20];
                while recv.read(&mut buf).await?.is_some() {}
                send.write_all(b"k").await?;
            } else {
                let mut want = [0u8; 8];
                recv.read_exact(&mut want).await?;
                let data = Bytes::from(payload(chunk, 3));
                let mut left = u64::from_be_bytes(want);
                while left > 0 {
                    let n = left.min(chunk as u64) as usize;
                    send.write_chunk(data.slice(..n)).await?;
                    left -= n as u64;
                }
            }
            send.finish()?;
        }
        anyhow::Ok(())
    });
    let client_endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let crypto = quiver_client::quic_client_config(&std::fs::read(&paths.ca_cert)?)?;
    let conn = client_endpoint.connect_with(crypto, address, "localhost")?.await?;
    let data = Bytes::from(payload(chunk, 5));
    let mut results = Vec::new();

    if direction != Direction::Download {
        let cpu = process_cpu();
        let started = Instant::now();
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(b"u").await?;
        let mut left = total;
        while left > 0 {
            let n = left.min(chunk as u64) as usize;
            send.write_chunk(data.slice(..n)).await?;
            left -= n as u64;
        }
        send.finish()?;
        let mut ack = [0u8; 1];
        recv.read_exact(&mut ack).await?;
        results.push(BenchResult::new("quic-upload", opts.records, total, started.elapsed(), None).with_cpu(cpu));
    }

    if direction != Direction::Upload {
        let cpu = process_cpu();
        let started = Instant::now();
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(b"d").await?;
        send.write_all(&total.to_be_bytes()).await?;
        send.finish()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while let Some(n) = recv.read(&mut buf).await? {
            got += n as u64;
        }
        anyhow::ensure!(got == total, "baseline download got {got} of {total} bytes");
        results.push(BenchResult::new("quic-download", opts.records, total, started.elapsed(), None).with_cpu(cpu));
    }
    conn.close(0u32.into(), b"done");
    server.await??;
    Ok(results)
}
