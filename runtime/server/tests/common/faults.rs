//! A seeded fault injector over a proxied three-node cluster: one fault at
//! a time (so a majority is always meant to be reachable) — kill -9 and
//! restart, SIGSTOP, inbound network cut, a node partitioned from the
//! other nodes, lossy packets — each held for a random while.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use super::cluster::Cluster;
use super::proxy::Mode;

pub struct Rng(pub u64);

impl Rng {
    pub fn seeded(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Injects faults for `duration`, printing each (with `seed`) as it
/// happens.
pub fn inject(cluster: &mut Cluster, rng: &mut Rng, seed: u64, duration: Duration) {
    let until = Instant::now() + duration;
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(300 + rng.below(1200)));
        let node = 1 + rng.below(3) as u32;
        let hold = Duration::from_millis(500 + rng.below(2500));
        match rng.below(5) {
            0 => {
                eprintln!("seed {seed}: kill -9 node {node}, restart after {hold:?}");
                cluster.kill9(node);
                std::thread::sleep(hold);
                cluster.start_node(node);
            }
            1 => {
                eprintln!("seed {seed}: SIGSTOP node {node} for {hold:?}");
                cluster.pause(node, true);
                std::thread::sleep(hold);
                cluster.pause(node, false);
            }
            2 => {
                eprintln!("seed {seed}: cut node {node}'s inbound network for {hold:?}");
                cluster.proxies[node as usize - 1].set(Mode::Cut);
                std::thread::sleep(hold);
                cluster.proxies[node as usize - 1].set(Mode::Pass);
            }
            3 => {
                eprintln!("seed {seed}: partition node {node} from the other nodes for {hold:?}");
                cluster.isolate(node, true);
                std::thread::sleep(hold);
                cluster.isolate(node, false);
            }
            _ => {
                eprintln!("seed {seed}: drop 30% of node {node}'s packets for {hold:?}");
                cluster.proxies[node as usize - 1].set(Mode::Lossy(30));
                std::thread::sleep(hold);
                cluster.proxies[node as usize - 1].set(Mode::Pass);
            }
        }
    }
}

/// A client of the cluster, once one of its brokers answers.
pub async fn connect_until_up(config: quiver_client::ClientConfig) -> quiver_client::Client {
    loop {
        match quiver_client::Client::connect(config.clone()).await {
            Ok(c) => return c,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Every record of `topic`-`partition` from the start up to its end as of
/// now, through node 1's CLI with `extra` arguments: (offset, value).
/// `None` when the read failed (a node still recovering).
pub fn read_partition(cluster: &Cluster, topic: &str, partition: u32, extra: &[&str]) -> Option<Vec<(i64, String)>> {
    let p = partition.to_string();
    let mut args = vec!["topic", "consume", topic, "-p", &p, "-o", "start:end", "--format", "json"];
    args.extend_from_slice(extra);
    let out = cluster.quiver(1, &args);
    out.status.success().then(|| {
        super::json_lines(&String::from_utf8_lossy(&out.stdout))
            .iter()
            .map(|r| (r["offset"].as_i64().unwrap(), r["value"].as_str().unwrap().to_string()))
            .collect()
    })
}

/// Seeds from `QUIVER_FAULT_SEEDS=1,2,3` (default `default`); runs `round`
/// for each, naming the seed of a failure.
pub fn for_each_seed(default: &[u64], round: impl Fn(u64) + std::panic::RefUnwindSafe) {
    let seeds: Vec<u64> = std::env::var("QUIVER_FAULT_SEEDS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec());
    for seed in seeds {
        eprintln!("fault round: seed {seed}");
        if let Err(e) = std::panic::catch_unwind(|| round(seed)) {
            let message = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("fault round with seed {seed} failed (rerun with QUIVER_FAULT_SEEDS={seed}): {message}");
        }
    }
}
