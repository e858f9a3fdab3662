//! Test harness: runs the real `quiver` binary as a child process.

#![allow(dead_code)]

pub mod cluster;
pub mod faults;
pub mod member;
pub mod proxy;
pub mod totals;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_quiver");

/// A `quiver dev` node in a temporary directory.
pub struct DevNode {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
    /// Environment of the node process (`QUIVER_SECTION__KEY` settings).
    env: Vec<(String, String)>,
}

/// A UDP port on loopback that is free right now, for a node to listen on.
/// It is taken below the kernel's ephemeral range (32768 and up), where
/// client sockets get theirs: a port picked there could be taken by a
/// concurrently running test's client before the node binds it (seen as
/// "Address already in use"). Each call in this process gets another one;
/// processes start at different places.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(2_654_435_761) % COUNT;
    loop {
        let port = (FIRST + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % COUNT) as u16;
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl DevNode {
    pub fn start() -> DevNode {
        DevNode::start_with_env(&[])
    }

    /// A node with settings from the environment, e.g.
    /// `("QUIVER_BROKER__FRAME_BYTES_MAX", "4096")`.
    pub fn start_with_env(env: &[(&str, &str)]) -> DevNode {
        let dir = tempfile::tempdir().unwrap();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut node = DevNode { dir, port: free_port(), child: None, env };
        node.spawn();
        node
    }

    /// A node over a data directory that `prepare` fills first (given the
    /// data directory, which does not exist yet).
    pub fn start_prepared(prepare: impl FnOnce(&Path)) -> DevNode {
        let dir = tempfile::tempdir().unwrap();
        let mut node = DevNode { dir, port: free_port(), child: None, env: Vec::new() };
        prepare(&node.data_dir());
        node.spawn();
        node
    }

    /// The node's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn ca(&self) -> PathBuf {
        self.data_dir().join("ca.pem")
    }

    /// Starts (or restarts) the node process and waits until it answers.
    pub fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.data_dir().join("address"));
        let child = Command::new(BIN)
            .args(["dev", "--data-dir"])
            .arg(self.data_dir())
            .args(["--listen", &self.address()])
            .env("RUST_LOG", "warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn quiver dev");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.data_dir().join("address").exists() && self.quiver(&["topic", "list"]).status.success() {
                return;
            }
            assert!(Instant::now() < deadline, "quiver dev did not come up");
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("quiver dev exited early: {status}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
        }
    }

    /// SIGTERM and wait: a clean shutdown.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().unwrap()
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args).env("QUIVER_DEV_DIR", self.data_dir()).env_remove("QUIVER_BROKERS").env_remove("QUIVER_CA");
        c
    }

    pub fn quiver(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.quiver(args);
        assert!(
            out.status.success(),
            "quiver {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs a command that must fail; returns its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.quiver(args);
        assert!(!out.status.success(), "quiver {args:?} unexpectedly succeeded");
        String::from_utf8(out.stderr).unwrap()
    }

    /// Pipes `input` into `quiver topic produce ...`.
    pub fn produce(&self, args: &[&str], input: &[u8]) -> Output {
        let mut child =
            self.command(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_vec();
        let writer = std::thread::spawn(move || stdin.write_all(&input));
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap().unwrap();
        out
    }

    pub fn client_config(&self) -> quiver_client::ClientConfig {
        quiver_client::ClientConfig::new(self.address(), std::fs::read(self.ca()).unwrap())
    }

    /// Segment files of one partition, sorted.
    pub fn segments(&self, topic: &str, partition: u32) -> Vec<PathBuf> {
        let dir = self.data_dir().join("logs").join(format!("{topic}-{partition}"));
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        files.sort();
        files
    }
}

impl Drop for DevNode {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn json_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

pub fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}
