//! `quiver bench group`: what consumer groups cost and how fast they hand
//! partitions over.
//!
//! - Throughput: the topic read from its start by three hand-assigned
//!   consumers, then by a new three-member group, alternating for
//!   `--rounds` rounds; each until every partition was read to its end. The
//!   group's members join with every partition paused and the clock starts
//!   once the group is stable (three members sharing every partition):
//!   this is the cost of reading as a group, not of joining one (the
//!   hand-over figures below are that).
//! - Hand-over: a member in a child `quiver topic consume --group` process
//!   shares a topic with a member in this process; the child is killed
//!   (`kill -9`, group session 10 s) or stopped (SIGTERM: it leaves), and
//!   the time runs until this process's member reads its first record of a
//!   partition the child held. `--handoffs` times each.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use quiver_client::{Client, ClientConfig, Consumer, ConsumerConfig, OffsetReset, OffsetSpec, ProducerRecord};
use tokio::io::AsyncBufReadExt;

use super::{BenchOpts, BenchResult, Target, ensure_records, progress, unless};

/// The group's session in the hand-over bench (what issue 19 asks).
const SESSION_MS: u64 = 10_000;
/// Its heartbeat interval: a member learns of a new assignment at its
/// next heartbeat.
const HEARTBEAT_MS: u64 = 1_000;
const MEMBERS: u32 = 3;
const HANDOFF_PARTITIONS: u32 = 4;

pub(super) async fn group(target: &Target, opts: &BenchOpts) -> anyhow::Result<Vec<BenchResult>> {
    ensure_records(target, opts).await?;
    let mut results = Vec::new();
    for round in 0..opts.rounds.max(1) {
        results.push(read_all(target, opts, None).await?);
        let group = format!("bench-group-{}-{round}", std::process::id());
        results.push(read_all(target, opts, Some(&group)).await?);
        unless(quiver_client::ErrorCode::UnknownGroup, target.client.admin().delete_group(&group).await)?;
    }
    results.extend(handoffs(target, opts).await?);
    Ok(results)
}

/// The next offset to read of each partition, the highest any reader got
/// to, and the end each must reach.
struct Progress {
    next: Vec<AtomicI64>,
    ends: Vec<i64>,
    done: AtomicBool,
    finished: std::sync::Mutex<Option<Instant>>,
    /// Group: the partitions each member owns while joining.
    owned: Vec<std::sync::atomic::AtomicUsize>,
    /// Group: when the group became stable (the clock's start).
    started: std::sync::OnceLock<Instant>,
}

impl Progress {
    /// Records that `partition` was read up to `offset`; true once every
    /// partition reached its end (the first to see it notes the time).
    fn read(&self, partition: u32, offset: i64) -> bool {
        self.next[partition as usize].fetch_max(offset + 1, Ordering::Relaxed);
        if self.done.load(Ordering::Relaxed) {
            return true;
        }
        let all = self.next.iter().zip(&self.ends).all(|(n, &end)| n.load(Ordering::Relaxed) >= end);
        if all && !self.done.swap(true, Ordering::Relaxed) {
            *self.finished.lock().expect("not poisoned") = Some(Instant::now());
        }
        all
    }
}

/// Three consumers read the topic from its start: hand-assigned
/// (partition p to consumer p % 3) without a group, or as members of
/// `group`. Each has its own connection.
async fn read_all(target: &Target, opts: &BenchOpts, group: Option<&str>) -> anyhow::Result<BenchResult> {
    let described = target.client.admin().describe_topics(Some(vec![opts.topic.clone()])).await?;
    let partitions = &described.first().context("the bench topic is gone")?.partitions;
    let mut ends = vec![0; partitions.len()];
    let mut total = 0u64;
    for p in partitions {
        ends[p.partition as usize] = p.high_watermark;
        total += (p.high_watermark - p.log_start_offset) as u64;
    }
    let progress_of = Arc::new(Progress {
        next: partitions.iter().map(|_| AtomicI64::new(0)).collect(),
        ends,
        done: AtomicBool::new(false),
        finished: std::sync::Mutex::new(None),
        owned: (0..MEMBERS).map(|_| std::sync::atomic::AtomicUsize::new(0)).collect(),
        started: std::sync::OnceLock::new(),
    });
    let label = if group.is_some() { "group-3-members" } else { "assigned-3-consumers" };
    let bar = progress(total, label);
    let mut clients = Vec::new();
    for _ in 0..MEMBERS {
        clients.push(Client::connect(ClientConfig::new(target.address.to_string(), target.ca_pem.clone())).await?);
    }
    let mut tasks = tokio::task::JoinSet::new();
    if group.is_none() {
        progress_of.started.set(Instant::now()).expect("set once");
    }
    for (i, client) in clients.into_iter().enumerate() {
        let (progress_of, bar, topic) = (progress_of.clone(), bar.clone(), opts.topic.clone());
        let group = group.map(str::to_owned);
        let count = partitions.len() as u32;
        tasks.spawn(async move {
            let config = ConsumerConfig { auto_offset_reset: OffsetReset::Earliest, ..ConsumerConfig::default() };
            let mut consumer = client.consumer(config);
            match &group {
                Some(g) => {
                    // Joins paused: nothing is read until the group is
                    // stable.
                    for p in 0..count {
                        consumer.pause(&topic, p);
                    }
                    consumer.subscribe(g, &[&topic]).await?;
                    let joining = Instant::now();
                    while progress_of.started.get().is_none() {
                        anyhow::ensure!(
                            joining.elapsed() < Duration::from_secs(120),
                            "the group was not stable in 2 minutes"
                        );
                        consumer.poll().await?;
                        progress_of.owned[i].store(consumer.assignment().len(), Ordering::Relaxed);
                        let owned: Vec<usize> = progress_of.owned.iter().map(|o| o.load(Ordering::Relaxed)).collect();
                        if owned.iter().all(|&n| n > 0) && owned.iter().sum::<usize>() == count as usize {
                            let _ = progress_of.started.set(Instant::now());
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    for p in 0..count {
                        consumer.resume(&topic, p);
                    }
                }
                None => {
                    let mine = (0..count).filter(|p| p % MEMBERS == i as u32).collect();
                    consumer.assign(&topic, Some(mine), OffsetSpec::Earliest).await?;
                }
            }
            let (mut records, mut bytes) = (0u64, 0u64);
            let started = *progress_of.started.get().expect("started");
            while !progress_of.done.load(Ordering::Relaxed) {
                anyhow::ensure!(started.elapsed() < Duration::from_secs(300), "not read within 5 minutes");
                let batch = consumer.poll().await?;
                for r in &batch {
                    bytes += r.value.as_ref().map_or(0, |v| v.len() as u64);
                    progress_of.read(r.partition, r.offset);
                }
                records += batch.len() as u64;
                bar.inc(batch.len() as u64);
            }
            consumer.close().await?;
            client.close();
            anyhow::Ok((records, bytes))
        });
    }
    let (mut records, mut bytes) = (0u64, 0u64);
    while let Some(done) = tasks.join_next().await {
        let (r, b) = done??;
        records += r;
        bytes += b;
    }
    bar.finish_and_clear();
    let finished = progress_of.finished.lock().expect("not poisoned").context("the readers stopped early")?;
    let started = *progress_of.started.get().expect("started");
    // Throughput of the records there were; a record read twice (a
    // partition handed over before its position was committed) costs time,
    // not credit.
    let unique_bytes = (bytes * total).checked_div(records).unwrap_or(0);
    let mut result = BenchResult::new(label, total, unique_bytes, finished.duration_since(started), None);
    result.records_read_twice = Some(records.saturating_sub(total));
    Ok(result)
}

/// `--handoffs` kills (session 10 s) and as many clean leaves.
async fn handoffs(target: &Target, opts: &BenchOpts) -> anyhow::Result<Vec<BenchResult>> {
    let admin = target.client.admin();
    let topic = format!("{}-handoff", opts.topic);
    unless(quiver_client::ErrorCode::UnknownTopic, admin.delete_topic(&topic).await)?;
    admin.create_topic(&topic, HANDOFF_PARTITIONS, &[]).await?;
    let ca = tempfile::NamedTempFile::new()?;
    std::fs::write(ca.path(), &target.ca_pem)?;
    let mut results = Vec::new();
    for round in 0..opts.handoffs {
        for killed in [true, false] {
            let what = if killed { "kill" } else { "leave" };
            let group = format!("bench-handoff-{}-{what}-{round}", std::process::id());
            let ms = handoff(target, &topic, &group, ca.path(), killed)
                .await
                .with_context(|| format!("hand-over after a {what} (round {})", round + 1))?;
            unless(quiver_client::ErrorCode::UnknownGroup, admin.delete_group(&group).await)?;
            let mut result = BenchResult::new(&format!("handoff-{what}"), 0, 0, Duration::ZERO, None);
            result.handoff_ms = Some(ms);
            results.push(result);
        }
    }
    admin.delete_topic(&topic).await?;
    Ok(results)
}

/// One hand-over; its time in milliseconds.
async fn handoff(target: &Target, topic: &str, group: &str, ca: &std::path::Path, killed: bool) -> anyhow::Result<f64> {
    let configs = [
        ("session.timeout.ms".to_string(), SESSION_MS.to_string()),
        ("heartbeat.interval.ms".to_string(), HEARTBEAT_MS.to_string()),
    ];
    target.client.admin().alter_group_config(group, &configs).await?;
    let producer = target.client.producer(quiver_client::ProducerConfig::default());
    let mark = |partitions: Vec<u32>| {
        let producer = producer.clone();
        async move {
            for p in partitions {
                producer.send(ProducerRecord::new(topic.to_owned(), "mark").partition(p)).await?.await?;
            }
            anyhow::Ok(())
        }
    };
    mark((0..HANDOFF_PARTITIONS).collect()).await?;
    let mut child = tokio::process::Command::new(std::env::current_exe().context("finding the quiver executable")?)
        .args(["topic", "consume", topic, "--group", group, "-o", "start", "--format", "json"])
        .args(["--commit-interval-ms", "100", "--brokers", &target.address.to_string()])
        .arg("--ca")
        .arg(ca)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting the member process")?;
    let pid = child.id().context("the member process exited at once")?;
    let mut events = tokio::io::BufReader::new(child.stderr.take().expect("piped")).lines();
    // The child owns every partition before the second member joins.
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = events.next_line().await? {
            if line.contains("\"assigned\"") {
                return anyhow::Ok(());
            }
        }
        anyhow::bail!("the member process ended before it was assigned anything")
    })
    .await
    .context("the member process got no partitions within 30 s")??;
    tokio::spawn(async move { while let Ok(Some(_)) = events.next_line().await {} });

    let config = ConsumerConfig {
        auto_offset_reset: OffsetReset::Earliest,
        fetch_max_wait: Duration::from_millis(100),
        ..ConsumerConfig::default()
    };
    let mut successor: Consumer = target.client.consumer(config);
    successor.subscribe(group, &[topic]).await?;
    let settled = Instant::now();
    while successor.assignment().len() < (HANDOFF_PARTITIONS / 2) as usize {
        anyhow::ensure!(settled.elapsed() < Duration::from_secs(30), "the group did not share its partitions in 30 s");
        successor.poll().await?;
    }
    let mine: Vec<u32> = successor.assignment().into_iter().map(|(_, p)| p).collect();
    let theirs: Vec<u32> = (0..HANDOFF_PARTITIONS).filter(|p| !mine.contains(p)).collect();

    let signal = if killed { "-KILL" } else { "-TERM" };
    let started = Instant::now();
    std::process::Command::new("kill").args([signal, &pid.to_string()]).status()?;
    mark(theirs.clone()).await?;
    let outcome = loop {
        if started.elapsed() > Duration::from_secs(60) {
            break Err(anyhow::anyhow!("the successor read nothing of partitions {theirs:?} within 60 s"));
        }
        let records = successor.poll().await?;
        if records.iter().any(|r| theirs.contains(&r.partition)) {
            break Ok(started.elapsed().as_secs_f64() * 1000.0);
        }
    };
    successor.close().await?;
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    outcome
}
