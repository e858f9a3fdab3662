//! A UDP proxy in front of one node: everything sent to the node (by
//! clients and by other nodes) goes through it, so a test can cut the
//! node's inbound traffic, drop a share of its packets both ways, or drop
//! everything from chosen source addresses, while the process keeps
//! running. QUIC survives loss; a cut looks like a network partition
//! (asymmetric: the node's own outgoing connections go through the other
//! nodes' proxies). Nodes behind proxies listen on distinct loopback
//! addresses and connect to each other from them, so blocking sources on
//! every proxy makes a symmetric partition between nodes that clients
//! (from 127.0.0.1) still cross.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the proxy does with packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    /// Drop every packet.
    Cut,
    /// Drop this many packets in a hundred, both ways.
    Lossy(u8),
    /// Pass what is sent to the node, drop what it sends back: requests
    /// arrive and are served, their answers are lost.
    DropReplies,
}

impl Mode {
    fn encode(self) -> u64 {
        match self {
            Mode::Pass => 0,
            Mode::Cut => 1,
            Mode::Lossy(p) => 2 | (u64::from(p) << 8),
            Mode::DropReplies => 3,
        }
    }
}

struct Shared {
    mode: AtomicU64,
    stop: AtomicBool,
    rng: AtomicU64,
    /// Sources whose packets (and the answers to them) are dropped.
    blocked: Mutex<HashSet<IpAddr>>,
}

impl Shared {
    /// Whether to drop the next packet from or (`reply`) to `peer`.
    fn drop_packet(&self, peer: SocketAddr, reply: bool) -> bool {
        if self.blocked.lock().unwrap().contains(&peer.ip()) {
            return true;
        }
        let mode = self.mode.load(Ordering::Relaxed);
        match mode & 0xff {
            0 => false,
            1 => true,
            3 => reply,
            _ => {
                // xorshift; races only make it more random.
                let mut x = self.rng.load(Ordering::Relaxed);
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                self.rng.store(x, Ordering::Relaxed);
                x % 100 < (mode >> 8)
            }
        }
    }
}

pub struct UdpProxy {
    pub port: u16,
    shared: Arc<Shared>,
}

impl UdpProxy {
    /// Listens on a free loopback port and forwards to `target`.
    pub fn start(target: SocketAddr, seed: u64) -> UdpProxy {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        front.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let port = front.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            mode: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            rng: AtomicU64::new(seed | 1),
            blocked: Mutex::default(),
        });
        let upstreams: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>> = Arc::default();
        let s = shared.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !s.stop.load(Ordering::Relaxed) {
                let Ok((n, source)) = front.recv_from(&mut buf) else { continue };
                if s.drop_packet(source, false) {
                    continue;
                }
                let upstream = upstreams
                    .lock()
                    .unwrap()
                    .entry(source)
                    .or_insert_with(|| {
                        // One upstream socket per source, so replies find
                        // their way back.
                        let up = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
                        up.connect(target).unwrap();
                        up.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
                        let (up2, front2, s2) = (up.clone(), front.clone(), s.clone());
                        std::thread::spawn(move || {
                            let mut buf = vec![0u8; 65536];
                            while !s2.stop.load(Ordering::Relaxed) {
                                let Ok(n) = up2.recv(&mut buf) else { continue };
                                if !s2.drop_packet(source, true) {
                                    let _ = front2.send_to(&buf[..n], source);
                                }
                            }
                        });
                        up
                    })
                    .clone();
                let _ = upstream.send(&buf[..n]);
            }
        });
        UdpProxy { port, shared }
    }

    pub fn set(&self, mode: Mode) {
        self.shared.mode.store(mode.encode(), Ordering::Relaxed);
    }

    /// Drops every packet from these source addresses, and the answers to
    /// them, until the next call (an empty list heals).
    pub fn block(&self, sources: &[IpAddr]) {
        *self.shared.blocked.lock().unwrap() = sources.iter().copied().collect();
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}
