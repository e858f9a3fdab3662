//! The container deployment: `deploy/build-image.sh --binary` packages the
//! `quiver` binary under test into an image FROM scratch (with its shared
//! libraries: the suite builds Quiver once, not a second time as a static
//! release binary), `deploy/compose.yaml`
//! starts a three-node cluster on a private Docker network, a client on the
//! host produces to it with acks=all, one container is killed, and the
//! cluster fails over with every acknowledged record readable.
//!
//! Needs the Docker engine and docker-compose (this project's machines have
//! both); on a machine without a `docker` command it says so and passes.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{BIN, json_lines};

const NODES: [&str; 3] = ["172.28.0.11:7878", "172.28.0.12:7878", "172.28.0.13:7878"];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

struct Deployment {
    project: String,
    certs: PathBuf,
    image: String,
}

impl Deployment {
    fn compose(&self, args: &[&str]) -> Output {
        Command::new("docker-compose")
            .arg("-f")
            .arg(workspace().join("deploy/compose.yaml"))
            .args(["-p", &self.project])
            .args(args)
            .env("QUIVER_IMAGE", &self.image)
            .env("QUIVER_CERTS", &self.certs)
            .output()
            .unwrap()
    }

    fn quiver(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("QUIVER_BROKERS", NODES.join(","))
            .env("QUIVER_CA", self.certs.join("ca.pem"))
            .env_remove("QUIVER_DEV_DIR")
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.quiver(args);
        assert!(out.status.success(), "quiver {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    fn wait_for(&self, what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !done() {
            if Instant::now() > deadline {
                let logs = self.compose(&["logs", "--tail", "20"]);
                panic!("timed out waiting for {what}\n{}", String::from_utf8_lossy(&logs.stdout));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn partitions(&self) -> Vec<serde_json::Value> {
        let out = self.quiver(&["topic", "describe", "events", "--format", "json"]);
        if !out.status.success() {
            return vec![];
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["partitions"].as_array().cloned().unwrap_or_default()
    }

    fn produce(&self, partition: u32, values: &[String]) {
        use std::io::Write;
        let mut child = Command::new(BIN)
            .args(["topic", "produce", "events", "-p", &partition.to_string(), "--acks", "all"])
            .env("QUIVER_BROKERS", NODES.join(","))
            .env("QUIVER_CA", self.certs.join("ca.pem"))
            .env_remove("QUIVER_DEV_DIR")
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let input: String = values.iter().map(|v| format!("{v}\n")).collect();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    fn values(&self, partition: u32) -> Option<Vec<String>> {
        let p = partition.to_string();
        let out = self.quiver(&["topic", "consume", "events", "-p", &p, "-o", "start:end", "--format", "json"]);
        out.status.success().then(|| {
            json_lines(&String::from_utf8_lossy(&out.stdout))
                .iter()
                .map(|r| r["value"].as_str().unwrap().to_string())
                .collect()
        })
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        let _ = self.compose(&["down", "-v", "--remove-orphans"]);
    }
}

#[test]
fn a_compose_cluster_of_containers_fails_over_when_one_is_killed() {
    if Command::new("docker").arg("version").output().is_err() {
        eprintln!("skipped: no docker command on this machine");
        return;
    }
    let build = Command::new(workspace().join("deploy/build-image.sh"))
        .args(["--binary", BIN, "quiver:test"])
        .output()
        .unwrap();
    assert!(build.status.success(), "building the image: {}", String::from_utf8_lossy(&build.stderr));

    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let init = Command::new(BIN)
        .args(["certs", "init", "--dir"])
        .arg(&certs)
        .args(["--nodes", "1,2,3", "--host", "1=172.28.0.11", "--host", "2=172.28.0.12", "--host", "3=172.28.0.13"])
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let deployment =
        Deployment { project: format!("quivertest{}", std::process::id()), certs, image: "quiver:test".into() };
    let up = deployment.compose(&["up", "-d"]);
    assert!(up.status.success(), "docker-compose up: {}", String::from_utf8_lossy(&up.stderr));

    deployment.wait_for("three registered nodes", Duration::from_secs(60), || {
        let out = deployment.quiver(&["cluster", "info", "--format", "json"]);
        out.status.success() && {
            let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            info["nodes"].as_array().unwrap().iter().filter(|n| n["fenced"] == false).count() == 3
        }
    });
    deployment.ok(&["topic", "create", "events", "-p", "3", "-r", "3", "-c", "min.insync.replicas=2"]);
    let values = |from: u32, to: u32| (from..to).map(|i| format!("e{i}")).collect::<Vec<_>>();
    deployment.produce(0, &values(0, 100));
    assert_eq!(deployment.values(0).unwrap(), values(0, 100));

    // Kill the container leading partition 0: another takes over with
    // every acknowledged record, and acks=all writes go on.
    let leader = deployment.partitions()[0]["leader"].as_u64().unwrap();
    let killed = deployment.compose(&["kill", &format!("node{leader}")]);
    assert!(killed.status.success(), "{}", String::from_utf8_lossy(&killed.stderr));
    deployment.wait_for("a new leader", Duration::from_secs(30), || {
        deployment.partitions().first().is_some_and(|p| p["leader"].as_u64().is_some_and(|l| l != leader))
    });
    deployment.produce(0, &values(100, 200));
    let mut read = None;
    deployment.wait_for("every acknowledged record", Duration::from_secs(20), || {
        read = deployment.values(0);
        read.as_ref().is_some_and(|r| r.len() >= 200)
    });
    assert_eq!(read.unwrap(), values(0, 200));
    let health = deployment.quiver(&["cluster", "health"]);
    assert!(!health.status.success(), "a killed node is unhealthy");
    assert!(String::from_utf8_lossy(&health.stdout).contains(&format!("node {leader}")));
}
