//! A Jepsen-style check of transactions across three real `quiver broker`
//! processes behind UDP proxies, under the seeded faults of
//! `common::faults` (kill -9 and restart, SIGSTOP, inbound cuts, a node
//! partitioned from the others, lossy packets).
//!
//! Two transactional producers (the client library) write transactions of
//! one to six records over three partitions, committing most and aborting
//! some on purpose; each records what it was told: committed, aborted, or
//! unknown (the end's answer was lost or refused after it may have
//! happened). A read_committed consumer polls throughout. After healing, a
//! read_committed read of every partition and the consumer's history are
//! checked ([`check`]) for: a value of an aborted transaction seen
//! (aborted read), a committed transaction's value missing (lost write),
//! a value seen twice, an offset holding two values, the consumer's
//! offsets going backwards or skipping a committed record, and a
//! transaction seen in part.
//!
//! Seeds: `QUIVER_FAULT_SEEDS=1,2,3` (default `3,4,5,6`).

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::cluster::Cluster;
use common::faults::{self, Rng};
use quiver_client::{
    ClientConfig, ConsumerConfig, Isolation, OffsetSpec, ProducerConfig, ProducerRecord, TransactionalProducer,
};

const TOPIC: &str = "txchk";
const PARTITIONS: u32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Committed,
    Aborted,
    /// The end may or may not have happened.
    Unknown,
}

/// A transaction as its producer saw it.
#[derive(Debug, Clone)]
struct Txn {
    /// `p{producer}-t{number}`.
    name: String,
    /// Values in send order (`{name}-{i}of{n}`).
    values: Vec<String>,
    outcome: Outcome,
}

/// Everything observed in one round.
#[derive(Debug, Default)]
struct History {
    txns: Vec<Txn>,
    /// The live read_committed consumer's records in poll order:
    /// (partition, offset, value).
    live: Vec<(u32, i64, String)>,
    /// The final read_committed read of each partition: (offset, value).
    last: BTreeMap<u32, Vec<(i64, String)>>,
}

/// The transaction a value belongs to: (its name, its size).
fn parse(value: &str) -> Option<(String, usize)> {
    let (name, rest) = value.rsplit_once('-')?;
    let (_, n) = rest.split_once("of")?;
    Some((name.to_owned(), n.parse().ok()?))
}

/// Every violation of the transactional guarantees in `h`.
fn check(h: &History) -> Vec<String> {
    let mut violations = Vec::new();
    let outcomes: HashMap<&str, Outcome> = h.txns.iter().map(|t| (t.name.as_str(), t.outcome)).collect();
    let mut at: HashMap<(u32, i64), &str> = HashMap::new();
    let mut seen_where: HashMap<&str, (u32, i64)> = HashMap::new();
    let mut per_txn: HashMap<String, usize> = HashMap::new();
    for (&partition, records) in &h.last {
        for (offset, value) in records {
            if let Some(first) = seen_where.insert(value, (partition, *offset)) {
                violations.push(format!("duplicate: {value} at {first:?} and {:?}", (partition, *offset)));
            }
            at.insert((partition, *offset), value);
            match parse(value) {
                None => violations.push(format!("never written: {value} at {partition}/{offset}")),
                Some((name, _)) => *per_txn.entry(name).or_default() += 1,
            }
        }
    }
    for (partition, offset, value) in &h.live {
        match at.get(&(*partition, *offset)) {
            Some(v) if v != value => {
                violations.push(format!("offset {partition}/{offset} holds {v} and {value}"));
            }
            _ => {}
        }
    }
    for value in h.live.iter().map(|(_, _, v)| v).chain(h.last.values().flatten().map(|(_, v)| v)) {
        if let Some((name, _)) = parse(value)
            && outcomes.get(name.as_str()) == Some(&Outcome::Aborted)
        {
            violations.push(format!("aborted read: {value}"));
        }
    }
    for t in &h.txns {
        let seen = per_txn.get(&t.name).copied().unwrap_or(0);
        if t.outcome == Outcome::Committed && seen != t.values.len() {
            violations.push(format!("lost write: committed {} has {seen} of {} values", t.name, t.values.len()));
        } else if seen != 0 && seen != t.values.len() {
            violations.push(format!("seen in part: {} ({seen} of {} values)", t.name, t.values.len()));
        }
    }
    // The live consumer: per partition, offsets only go up, and nothing
    // the final read has below its last offset was skipped.
    let mut live_by_partition: BTreeMap<u32, Vec<i64>> = BTreeMap::new();
    for (partition, offset, _) in &h.live {
        live_by_partition.entry(*partition).or_default().push(*offset);
    }
    for (partition, offsets) in &live_by_partition {
        if let Some(w) = offsets.windows(2).find(|w| w[0] >= w[1]) {
            violations.push(format!("the consumer went from {partition}/{} back to {partition}/{}", w[0], w[1]));
        }
        let read: BTreeSet<i64> = offsets.iter().copied().collect();
        let last_seen = *offsets.last().expect("not empty");
        for (offset, value) in h.last.get(partition).into_iter().flatten() {
            if *offset < last_seen && !read.contains(offset) {
                violations.push(format!("the consumer skipped {value} at {partition}/{offset}"));
            }
        }
    }
    violations
}

/// One producer's transactions until `stop`.
fn produce_transactions(id: u32, config: ClientConfig, seed: u64, stop: Arc<AtomicBool>) -> Vec<Txn> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    runtime.block_on(async move {
        let client = faults::connect_until_up(config).await;
        let mut rng = Rng::seeded(seed * 31 + u64::from(id));
        let mut txns = Vec::new();
        let mut producer: Option<TransactionalProducer> = None;
        let mut number = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let p = match &producer {
                Some(p) => p,
                None => {
                    let config = ProducerConfig {
                        delivery_timeout: Duration::from_secs(10),
                        transaction_timeout: Duration::from_secs(10),
                        linger: Duration::from_millis(1),
                        ..ProducerConfig::default()
                    };
                    let p = client.transactional_producer(&format!("writer-{id}"), config);
                    if let Err(e) = p.init().await {
                        eprintln!("producer {id}: init: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                    producer.insert(p)
                }
            };
            number += 1;
            let name = format!("p{id}-t{number}");
            let n = 1 + rng.below(6) as usize;
            let values: Vec<String> = (0..n).map(|i| format!("{name}-{i}of{n}")).collect();
            let mut ok = p.begin().is_ok();
            let mut deliveries = Vec::new();
            for v in &values {
                let partition = rng.below(u64::from(PARTITIONS)) as u32;
                match p.send(ProducerRecord::new(TOPIC, v.clone()).partition(partition)).await {
                    Ok(d) => deliveries.push(d),
                    Err(_) => ok = false,
                }
            }
            for d in deliveries {
                ok &= d.await.is_ok();
            }
            let commit = ok && rng.below(100) < 85;
            let outcome = if commit {
                match p.commit().await {
                    Ok(()) => Outcome::Committed,
                    // Not committed if the abort goes through: an end
                    // already decided as a commit refuses an abort.
                    Err(e) if !e.is_fatal() => match p.abort().await {
                        Ok(()) => Outcome::Aborted,
                        Err(_) => Outcome::Unknown,
                    },
                    Err(_) => Outcome::Unknown,
                }
            } else {
                match p.abort().await {
                    Ok(()) => Outcome::Aborted,
                    Err(_) => Outcome::Unknown,
                }
            };
            if outcome == Outcome::Unknown {
                // Start over as a new instance (fencing this one).
                producer = None;
            }
            txns.push(Txn { name, values, outcome });
        }
        txns
    })
}

/// A read_committed consumer of every partition until `stop` (and a last
/// few polls after).
fn consume_committed(config: ClientConfig, stop: Arc<AtomicBool>) -> Vec<(u32, i64, String)> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    runtime.block_on(async move {
        let client = faults::connect_until_up(config).await;
        let mut consumer = client.consumer(ConsumerConfig {
            isolation: Isolation::ReadCommitted,
            fetch_max_wait: Duration::from_millis(200),
            ..ConsumerConfig::default()
        });
        while consumer.assign(TOPIC, None, OffsetSpec::Earliest).await.is_err() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut seen = Vec::new();
        let mut after_stop = 0;
        while after_stop < 10 {
            if stop.load(Ordering::Relaxed) {
                after_stop += 1;
            }
            match consumer.poll().await {
                Ok(records) => seen.extend(records.into_iter().map(|r| {
                    (
                        r.partition,
                        r.offset,
                        String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned(),
                    )
                })),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        seen
    })
}

fn read_committed(cluster: &Cluster, partition: u32) -> Option<Vec<(i64, String)>> {
    faults::read_partition(cluster, TOPIC, partition, &["--isolation", "read-committed"])
}

fn round(seed: u64) {
    let mut rng = Rng::seeded(seed);
    let env = [
        ("QUIVER_CLUSTER__REPLICA_LAG_TIME_MAX_MS", "2000"),
        ("QUIVER_CLUSTER__LEADER_REBALANCE_INTERVAL_MS", "3000"),
        ("QUIVER_TRANSACTIONS__STATE_TOPIC_PARTITIONS", "3"),
    ];
    let mut cluster = Cluster::start_proxied(3, &env, seed);
    cluster.wait_formed();
    let partitions = PARTITIONS.to_string();
    cluster.ok(1, &["topic", "create", TOPIC, "-p", &partitions, "-r", "3", "-c", "min.insync.replicas=2"]);

    let addresses: Vec<String> = (1..=3).map(|n| cluster.address(n)).collect();
    let ca = std::fs::read(cluster.certs().join("ca.pem")).unwrap();
    let mut config = ClientConfig::new(addresses[0].clone(), ca);
    config.brokers = addresses;
    config.connect_timeout = Duration::from_secs(2);
    config.request_timeout = Duration::from_secs(5);

    let stop = Arc::new(AtomicBool::new(false));
    let producers: Vec<_> = (1..=2)
        .map(|id| {
            let (config, stop) = (config.clone(), stop.clone());
            std::thread::spawn(move || produce_transactions(id, config, seed, stop))
        })
        .collect();
    let consumer = {
        let (config, stop) = (config.clone(), stop.clone());
        std::thread::spawn(move || consume_committed(config, stop))
    };
    faults::inject(&mut cluster, &mut rng, seed, Duration::from_secs(20));
    stop.store(true, Ordering::Relaxed);
    let txns: Vec<Txn> = producers.into_iter().flat_map(|p| p.join().expect("a producer thread")).collect();
    let count = |o: Outcome| txns.iter().filter(|t| t.outcome == o).count();
    eprintln!(
        "seed {seed}: {} transactions: {} committed, {} aborted, {} unknown",
        txns.len(),
        count(Outcome::Committed),
        count(Outcome::Aborted),
        count(Outcome::Unknown)
    );
    assert!(count(Outcome::Committed) > 20, "too few commits to prove anything");

    cluster.wait_for("a healthy cluster with complete ISRs", Duration::from_secs(90), || {
        let parts = cluster.partitions(1, TOPIC);
        parts.len() == PARTITIONS as usize
            && parts.iter().all(|p| p["isr"].as_array().unwrap().len() == 3)
            && cluster.quiver(1, &["cluster", "health"]).status.success()
    });
    // Unknown ends and abandoned transactions get decided (coordinators
    // finish them or time them out): then the last stable offsets reach
    // the high watermarks.
    cluster.wait_for("every transaction decided", Duration::from_secs(60), || {
        let out = cluster.quiver(1, &["transaction", "list", "--format", "json"]);
        out.status.success() && {
            let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
            list.len() == 2 && list.iter().all(|t| t["state"].as_str().unwrap().starts_with("complete"))
        }
    });
    let mut last = BTreeMap::new();
    for partition in 0..PARTITIONS {
        let mut records = None;
        cluster.wait_for("reading back", Duration::from_secs(60), || {
            records = read_committed(&cluster, partition);
            records.is_some()
        });
        last.insert(partition, records.unwrap());
    }
    let live = consumer.join().expect("the consumer thread");
    eprintln!(
        "seed {seed}: the live consumer read {} records; {} in the end",
        live.len(),
        last.values().map(Vec::len).sum::<usize>()
    );
    let history = History { txns, live, last };
    let violations = check(&history);
    assert!(violations.is_empty(), "seed {seed}: {} violation(s):\n{}", violations.len(), violations.join("\n"));
}

#[test]
fn transactions_hold_under_kills_pauses_and_partitions() {
    faults::for_each_seed(&[3, 4, 5, 6], round);
}

/// The checker itself: each anomaly in a made-up history is reported.
#[test]
fn the_checker_reports_every_anomaly() {
    let txn = |name: &str, n: usize, outcome| Txn {
        name: name.into(),
        values: (0..n).map(|i| format!("{name}-{i}of{n}")).collect(),
        outcome,
    };
    let good = || History {
        txns: vec![
            txn("p1-t1", 2, Outcome::Committed),
            txn("p1-t2", 1, Outcome::Aborted),
            txn("p2-t1", 1, Outcome::Unknown),
        ],
        live: vec![(0, 0, "p1-t1-0of2".into()), (0, 3, "p1-t1-1of2".into())],
        last: BTreeMap::from([(0, vec![(0, "p1-t1-0of2".into()), (3, "p1-t1-1of2".into())]), (1, vec![])]),
    };
    assert_eq!(check(&good()), Vec::<String>::new());
    type Corrupt<'a> = Box<dyn Fn(&mut History) + 'a>;
    let cases: Vec<(&str, Corrupt)> = vec![
        ("aborted read", Box::new(|h| h.last.get_mut(&1).unwrap().push((0, "p1-t2-0of1".into())))),
        (
            "lost write",
            Box::new(|h| {
                h.last.get_mut(&0).unwrap().pop();
                h.live.pop();
            }),
        ),
        ("duplicate", Box::new(|h| h.last.get_mut(&1).unwrap().push((5, "p1-t1-0of2".into())))),
        ("holds", Box::new(|h| h.live[0].2 = "p2-t1-0of1".into())),
        ("went from", Box::new(|h| h.live.swap(0, 1))),
        (
            "skipped",
            Box::new(|h| {
                h.live.remove(0);
            }),
        ),
        (
            "seen in part",
            Box::new(|h| {
                h.txns[2] = txn("p2-t1", 2, Outcome::Unknown);
                h.last.get_mut(&1).unwrap().push((0, "p2-t1-0of2".into()));
            }),
        ),
        ("never written", Box::new(|h| h.last.get_mut(&1).unwrap().push((0, "garbage".into())))),
    ];
    for (what, corrupt) in cases {
        let mut h = good();
        corrupt(&mut h);
        let violations = check(&h);
        assert!(violations.iter().any(|v| v.contains(what)), "{what}: {violations:?}");
    }
}
