//! A cluster of real `quiver broker` processes on loopback with mutual TLS
//! (certificates from `quiver certs init`).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::proxy::UdpProxy;
use super::{BIN, free_port};

/// The loopback address node `id` listens on behind a proxy.
fn proxied_ip(id: u32) -> IpAddr {
    IpAddr::from([127, 0, 0, 10 + id as u8])
}

impl Cluster {
    /// Makes certificates for nodes 1..=n and starts every node.
    pub fn start(n: u32, env: &[(&str, &str)]) -> Cluster {
        Cluster::start_with(n, env, None)
    }

    /// Like [`Cluster::start`], with every node behind a [`UdpProxy`]: the
    /// addresses nodes and clients use are the proxies'.
    pub fn start_proxied(n: u32, env: &[(&str, &str)], seed: u64) -> Cluster {
        Cluster::start_with(n, env, Some(seed))
    }

    fn start_with(n: u32, env: &[(&str, &str)], proxy_seed: Option<u64>) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        let nodes: Vec<String> = (1..=n).map(|i| i.to_string()).collect();
        // And an `admin` client certificate, for admin commands.
        let init = Command::new(BIN)
            .args(["certs", "init", "--dir"])
            .arg(&certs)
            .args(["--nodes", &nodes.join(","), "--client", "admin"])
            .output();
        assert!(init.unwrap().status.success());
        let listen: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let proxies: Vec<UdpProxy> = match proxy_seed {
            None => Vec::new(),
            Some(seed) => listen
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let target = SocketAddr::new(proxied_ip(i as u32 + 1), *p);
                    UdpProxy::start(target, seed.wrapping_add(i as u64))
                })
                .collect(),
        };
        let ports = if proxies.is_empty() { listen.clone() } else { proxies.iter().map(|p| p.port).collect() };
        let mut cluster = Cluster {
            dir,
            ports,
            listen,
            children: (0..n).map(|_| None).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            proxies,
        };
        for id in 1..=n {
            cluster.start_node(id);
        }
        cluster
    }

    /// Stops (SIGSTOP) or resumes (SIGCONT) node `id`'s process.
    pub fn pause(&self, id: u32, paused: bool) {
        if let Some(child) = &self.children[id as usize - 1] {
            let signal = if paused { libc::SIGSTOP } else { libc::SIGCONT };
            unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        }
    }

    pub fn is_running(&self, id: u32) -> bool {
        self.children[id as usize - 1].is_some()
    }

    /// Waits until every node registered and the quorum has a leader.
    pub fn wait_formed(&self) {
        let n = self.ports.len();
        self.wait_for("registered nodes and a controller leader", Duration::from_secs(30), || {
            self.info(1).is_some_and(|i| {
                i["nodes"].as_array().unwrap().len() == n && !i["controller_leader"].is_null() && i["clustered"] == true
            })
        });
    }

    /// `topic describe --format json` through node `via`: the partitions.
    pub fn partitions(&self, via: u32, topic: &str) -> Vec<serde_json::Value> {
        let out = self.quiver(via, &["topic", "describe", topic, "--format", "json"]);
        if !out.status.success() {
            return vec![];
        }
        let described: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        described["partitions"].as_array().cloned().unwrap_or_default()
    }

    /// Produces `values` (one per line) to `topic`-`partition` through node
    /// `via` with the given acks and delivery timeout.
    pub fn produce(
        &self,
        via: u32,
        topic: &str,
        partition: u32,
        acks: &str,
        timeout_ms: u64,
        values: &[String],
    ) -> Output {
        let (p, t) = (partition.to_string(), timeout_ms.to_string());
        self.produce_args(via, topic, &["-p", &p, "--acks", acks, "--timeout-ms", &t], values)
    }

    /// `topic produce TOPIC ARGS...` through node `via`, one value per line.
    pub fn produce_args(&self, via: u32, topic: &str, args: &[&str], values: &[String]) -> Output {
        use std::io::Write;
        let mut child = Command::new(BIN)
            .args(["topic", "produce", topic])
            .args(args)
            .env("QUIVER_BROKERS", self.address(via))
            .env("QUIVER_CA", self.certs().join("ca.pem"))
            .env_remove("QUIVER_DEV_DIR")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let input: String = values.iter().map(|v| format!("{v}\n")).collect();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    }

    /// The values of `topic`-`partition` from the start to the high
    /// watermark, read through node `via` (its leader).
    pub fn values(&self, via: u32, topic: &str, partition: u32) -> Option<Vec<String>> {
        let p = partition.to_string();
        let out = self.quiver(via, &["topic", "consume", topic, "-p", &p, "-o", "start:end", "--format", "json"]);
        out.status.success().then(|| {
            super::json_lines(&String::from_utf8_lossy(&out.stdout))
                .iter()
                .map(|r| r["value"].as_str().unwrap().to_string())
                .collect()
        })
    }

    /// The bytes of node `node`'s replica of `topic`-`partition`: its
    /// segment files in offset order, concatenated.
    pub fn replica_bytes(&self, node: u32, topic: &str, partition: u32) -> Vec<u8> {
        let dir = self.dir.path().join(format!("node-{node}/logs/{topic}-{partition}"));
        let mut segments: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "log")).collect())
            .unwrap_or_default();
        segments.sort();
        segments.iter().flat_map(|s| std::fs::read(s).unwrap()).collect()
    }

    pub fn node_log(&self, node: u32) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("node-{node}/broker.log"))).unwrap_or_default()
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub ports: Vec<u16>,
    pub children: Vec<Option<Child>>,
    /// Extra environment for every broker (e.g. `QUIVER_CLUSTER__...`).
    pub env: Vec<(String, String)>,
    /// Where each node really listens (`ports` are then its proxies').
    pub listen: Vec<u16>,
    pub proxies: Vec<UdpProxy>,
}

impl Cluster {
    pub fn certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    pub fn controllers(&self) -> String {
        self.ports.iter().enumerate().map(|(i, p)| format!("{}@127.0.0.1:{p}", i + 1)).collect::<Vec<_>>().join(",")
    }

    pub fn address(&self, node: u32) -> String {
        format!("127.0.0.1:{}", self.ports[node as usize - 1])
    }

    /// Where node `id` listens: behind proxies, on its own loopback address
    /// (which its connections to other nodes also leave from).
    fn listen_address(&self, id: u32, port: u16) -> SocketAddr {
        let ip = if self.proxies.is_empty() { IpAddr::from([127, 0, 0, 1]) } else { proxied_ip(id) };
        SocketAddr::new(ip, port)
    }

    /// Cuts node `id` off from every other node, both ways, or heals it
    /// (proxied clusters). Clients still reach every node.
    pub fn isolate(&self, id: u32, isolated: bool) {
        let n = self.proxies.len() as u32;
        for (i, proxy) in (1..=n).zip(&self.proxies) {
            let blocked: Vec<IpAddr> = match (isolated, i == id) {
                (false, _) => Vec::new(),
                (true, true) => (1..=n).filter(|&j| j != id).map(proxied_ip).collect(),
                (true, false) => vec![proxied_ip(id)],
            };
            proxy.block(&blocked);
        }
    }

    /// Starts a broker process: node `id`, listening on `port`, with the
    /// certificates in `certs/node-{cert_of}` and the CA `ca`.
    pub fn broker(&self, id: u32, port: u16, data: &Path, cert_dir: &Path, ca: &Path) -> Child {
        std::fs::create_dir_all(data).unwrap();
        let log = std::fs::File::create(data.join("broker.log")).unwrap();
        Command::new(BIN)
            .arg("broker")
            .args(["--node-id", &id.to_string(), "--listen", &self.listen_address(id, port).to_string()])
            .arg("--data-dir")
            .arg(data)
            .args(["--controllers", &self.controllers()])
            .arg("--cert")
            .arg(cert_dir.join("broker.pem"))
            .arg("--key")
            .arg(cert_dir.join("broker.key"))
            .arg("--ca")
            .arg(ca)
            .arg("-v")
            .env("QUIVER_CLUSTER__SESSION_TIMEOUT_MS", "1500")
            .envs(
                // Behind a proxy: advertise the proxy's address.
                (self.listen.get(id as usize - 1) == Some(&port) && self.ports.get(id as usize - 1) != Some(&port))
                    .then(|| ("QUIVER_BROKER__ADVERTISED_ADDRESS", self.address(id))),
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    pub fn start_node(&mut self, id: u32) {
        let data = self.dir.path().join(format!("node-{id}"));
        let certs = self.certs();
        let child = self.broker(
            id,
            self.listen[id as usize - 1],
            &data,
            &certs.join(format!("node-{id}")),
            &certs.join("ca.pem"),
        );
        self.children[id as usize - 1] = Some(child);
    }

    pub fn kill9(&mut self, id: u32) {
        if let Some(mut c) = self.children[id as usize - 1].take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Runs a client command against node `via`, as the `admin` client.
    pub fn quiver(&self, via: u32, args: &[&str]) -> Output {
        let admin = self.certs().join("client-admin");
        self.anonymous(via, args)
            .env("QUIVER_CLIENT_CERT", admin.join("client.pem"))
            .env("QUIVER_CLIENT_KEY", admin.join("client.key"))
            .output()
            .unwrap()
    }

    /// A client command against node `via`, presenting no certificate.
    pub fn anonymous(&self, via: u32, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .env("QUIVER_BROKERS", self.address(via))
            .env("QUIVER_CA", self.certs().join("ca.pem"))
            .env_remove("QUIVER_DEV_DIR")
            .env_remove("QUIVER_CLIENT_CERT")
            .env_remove("QUIVER_CLIENT_KEY");
        command
    }

    pub fn ok(&self, via: u32, args: &[&str]) -> String {
        let out = self.quiver(via, args);
        assert!(
            out.status.success(),
            "quiver {args:?} via node {via} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn fails(&self, via: u32, args: &[&str]) -> String {
        let out = self.quiver(via, args);
        assert!(!out.status.success(), "quiver {args:?} via node {via} should fail");
        String::from_utf8(out.stderr).unwrap()
    }

    pub fn info(&self, via: u32) -> Option<serde_json::Value> {
        let out = self.quiver(via, &["cluster", "info", "--format", "json"]);
        out.status.success().then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    pub fn wait_for(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !f() {
            if Instant::now() > deadline {
                for i in 1..=self.ports.len() {
                    let log = std::fs::read_to_string(self.dir.path().join(format!("node-{i}/broker.log")))
                        .unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(15).collect();
                    eprintln!("--- node {i} log (last lines, newest first)\n{}", tail.join("\n"));
                    // A panic is the first thing to know, wherever it is.
                    for line in log.lines().filter(|l| l.contains("panicked")).take(5) {
                        eprintln!("--- node {i} panicked: {line}");
                    }
                }
                panic!("timed out waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn fenced(info: &serde_json::Value, node: u64) -> bool {
    info["nodes"].as_array().unwrap().iter().any(|n| n["node_id"] == node && n["fenced"] == true)
}
