//! A consumer process of a test cluster (`quiver topic consume ...`): its
//! printed records and its log, killed with kill -9 or stopped cleanly.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use super::cluster::Cluster;

/// A formed 3-node cluster for group tests (heartbeat 300 ms, session 4 s,
/// 10 offsets partitions) with `topic` created, `partitions` × 3 replicas.
pub fn group_cluster(topic: &str, partitions: u32) -> Cluster {
    let cluster = Cluster::start(
        3,
        &[
            ("QUIVER_GROUPS__HEARTBEAT_INTERVAL_MS", "300"),
            ("QUIVER_GROUPS__SESSION_TIMEOUT_MS", "4000"),
            ("QUIVER_GROUPS__OFFSETS_TOPIC_PARTITIONS", "10"),
        ],
    );
    cluster.wait_formed();
    cluster.ok(1, &["topic", "create", topic, "-p", &partitions.to_string(), "-r", "3"]);
    cluster
}

/// One consumer process: its output and log files.
pub struct Member {
    pub name: String,
    child: Option<Child>,
    pub out: PathBuf,
    pub log: PathBuf,
    /// When it was killed with kill -9.
    pub killed_at_ms: Option<i64>,
    /// A stuck member's standard output, read by nobody until it dies.
    pipe: Option<std::process::ChildStdout>,
}

impl Member {
    /// Runs `quiver topic consume` with `args` through node 1, knowing
    /// every node of the cluster.
    pub fn start(cluster: &Cluster, name: &str, args: &[&str]) -> Member {
        Member::spawn(cluster, name, args, false)
    }

    /// A member whose output nobody reads: once the pipe is full it blocks
    /// in the middle of printing what it fetched, holding those records
    /// unacknowledged, as a hung consumer does. What it printed is read
    /// when it is killed.
    pub fn start_stuck(cluster: &Cluster, name: &str, args: &[&str]) -> Member {
        Member::spawn(cluster, name, args, true)
    }

    fn spawn(cluster: &Cluster, name: &str, args: &[&str], stuck: bool) -> Member {
        let out = cluster.dir.path().join(format!("{name}.out"));
        let log = cluster.dir.path().join(format!("{name}.log"));
        let brokers: Vec<String> = (1..=3).map(|i| cluster.address(i)).collect();
        let stdout = if stuck { Stdio::piped() } else { std::fs::File::create(&out).unwrap().into() };
        let mut child = cluster
            .anonymous(1, &[&["topic", "consume"], args].concat())
            .env("QUIVER_BROKERS", brokers.join(","))
            .stdout(stdout)
            .stderr(std::fs::File::create(&log).unwrap())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let pipe = child.stdout.take();
        Member { name: name.into(), child: Some(child), out, log, killed_at_ms: None, pipe }
    }

    pub fn kill9(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        self.killed_at_ms = Some(quiver_broker::now_ms());
        if let Some(mut pipe) = self.pipe.take() {
            let mut printed = Vec::new();
            std::io::Read::read_to_end(&mut pipe, &mut printed).unwrap();
            std::fs::write(&self.out, printed).unwrap();
        }
    }

    /// SIGTERM: the member leaves cleanly, and must exit with success.
    pub fn terminate(&mut self) {
        let mut child = self.child.take().unwrap();
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().unwrap();
        assert!(
            status.success(),
            "{} exited with {status}: {}",
            self.name,
            std::fs::read_to_string(&self.log).unwrap()
        );
    }

    /// The records it printed (`--format json`), in order.
    pub fn records(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        // The last line may be half written by a killed process.
        text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).collect()
    }

    /// The values it printed, in order.
    pub fn values(&self) -> Vec<String> {
        self.records().iter().map(|r| r["value"].as_str().unwrap().to_string()).collect()
    }

    /// The JSON lines of its log (stderr).
    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).collect()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits up to 90 s for `done`; on a timeout prints the members' logs (and
/// the nodes', through `Cluster::wait_for`) before failing.
pub fn wait(cluster: &Cluster, members: &[Member], what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while !done() {
        if std::time::Instant::now() > deadline {
            for m in members {
                eprintln!("--- {} log\n{}", m.name, std::fs::read_to_string(&m.log).unwrap_or_default());
            }
            cluster.wait_for(what, Duration::ZERO, done);
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
