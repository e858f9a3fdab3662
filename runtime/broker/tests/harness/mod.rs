//! Several brokers in one process: each a real `Broker` with its controller
//! and logs in a temporary directory, connected by an in-memory transport
//! (controller messages and replica fetches as the server would carry
//! them, request frames included) that can cut a node off. Cluster
//! behaviour — elections, replication, failover — is tested here without
//! processes or sockets; `runtime/server/tests` covers the same through the
//! real binary.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Buf;
use quiver_broker::{Broker, BrokerConfig, Membership, Principal, ReplicaLink, RequestContext};
use quiver_controller::{ControllerConfig, ControllerRequest, NodeId, SendError, Transport, TransportFuture};
use quiver_protocol::codec::concat;
use quiver_protocol::frame::{decode_response, encode_request};
use quiver_protocol::messages::*;
use quiver_protocol::{ErrorCode, WireError};

/// What connects the brokers: who is running, and who is cut off.
#[derive(Default)]
pub struct Net {
    brokers: Mutex<HashMap<NodeId, Arc<Broker>>>,
    cut: Mutex<HashSet<NodeId>>,
    /// Per topic, how many more produce answers between brokers to lose
    /// after the write was applied (a transform's write that happened but
    /// whose acknowledgement never arrived).
    lost_answers: Mutex<HashMap<String, u32>>,
}

impl Net {
    /// The broker `to`, as `from` reaches it (`None`: down or cut off).
    fn reach(&self, from: NodeId, to: NodeId) -> Option<Arc<Broker>> {
        let cut = self.cut.lock().unwrap();
        if cut.contains(&from) || cut.contains(&to) {
            return None;
        }
        self.brokers.lock().unwrap().get(&to).cloned()
    }
}

/// One node's end of the in-memory network.
struct Wire {
    from: NodeId,
    net: Arc<Net>,
}

type Answer<T> = Pin<Box<dyn Future<Output = Result<T, WireError>> + Send>>;

impl Wire {
    /// Sends `request` to broker `to` as node `from` would over QUIC: a
    /// request frame in, a response frame out.
    fn call<R: Request + Send + Sync + 'static>(&self, to: NodeId, request: R) -> Answer<R::Response>
    where
        R::Response: Send,
    {
        let (from, net) = (self.from, self.net.clone());
        Box::pin(async move {
            let broker = net.reach(from, to).ok_or_else(|| {
                WireError::new(ErrorCode::NotLeader, format!("broker {to} is not reachable from {from}"))
            })?;
            let context = RequestContext { principal: Principal::Node(from), peer: None, connection: from.into() };
            let mut frame = concat(&encode_request(&request)).slice(4..);
            let api_key = frame.get_u16();
            let response = concat(&broker.handle_after_key(&context, api_key, frame, None).await);
            // A cut made while the request ran loses its answer, as a
            // network partition would.
            net.reach(from, to).ok_or_else(|| {
                WireError::new(ErrorCode::RequestTimedOut, format!("the answer of broker {to} to {from} was lost"))
            })?;
            decode_response::<R::Response>(response.slice(4..))
                .map_err(|e| WireError::new(ErrorCode::CorruptMessage, e.to_string()))?
        })
    }
}

impl Transport for Wire {
    fn send(&self, target: NodeId, _address: String, body: Vec<u8>) -> TransportFuture {
        let (from, net) = (self.from, self.net.clone());
        Box::pin(async move {
            let broker =
                net.reach(from, target).ok_or_else(|| SendError::Unreachable(format!("node {target} is cut off")))?;
            let request: ControllerRequest = serde_json::from_slice(&body).expect("controller request");
            let answer = serde_json::to_vec(&broker.controller().handle(request).await).expect("controller answer");
            match net.reach(from, target) {
                Some(_) => Ok(answer),
                None => Err(SendError::Unknown(format!("the answer of node {target} was lost"))),
            }
        })
    }
}

impl ReplicaLink for Wire {
    fn fetch(&self, leader: NodeId, _: String, request: ReplicaFetchRequest) -> Answer<ReplicaFetchResponse> {
        self.call(leader, request)
    }

    fn produce(&self, leader: NodeId, _: String, request: ProduceRequest) -> Answer<ProduceResponse> {
        let topic = request.partitions.first().map(|p| p.topic.clone()).unwrap_or_default();
        let (answer, net) = (self.call(leader, request), self.net.clone());
        Box::pin(async move {
            let answer = answer.await?;
            let mut lost = net.lost_answers.lock().unwrap();
            match lost.get_mut(&topic) {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    Err(WireError::new(
                        ErrorCode::RequestTimedOut,
                        format!("the answer of a produce to {topic} was lost"),
                    ))
                }
                _ => Ok(answer),
            }
        })
    }

    fn read(&self, leader: NodeId, _: String, request: FetchRequest) -> Answer<FetchResponse> {
        self.call(leader, request)
    }

    fn list_plugins(&self, node: NodeId, _: String, request: PluginListRequest) -> Answer<PluginListResponse> {
        self.call(node, request)
    }

    fn add_partitions_to_txn(
        &self,
        node: NodeId,
        _: String,
        request: AddPartitionsToTxnRequest,
    ) -> Answer<AddPartitionsToTxnResponse> {
        self.call(node, request)
    }

    fn write_txn_markers(
        &self,
        leader: NodeId,
        _: String,
        request: WriteTxnMarkersRequest,
    ) -> Answer<WriteTxnMarkersResponse> {
        self.call(leader, request)
    }

    fn init_producer_id(
        &self,
        node: NodeId,
        _: String,
        request: InitProducerIdRequest,
    ) -> Answer<InitProducerIdResponse> {
        self.call(node, request)
    }

    fn end_txn(&self, node: NodeId, _: String, request: EndTxnRequest) -> Answer<EndTxnResponse> {
        self.call(node, request)
    }
}

/// `n` brokers, every one a voter.
pub struct Cluster {
    pub net: Arc<Net>,
    dirs: BTreeMap<NodeId, tempfile::TempDir>,
    /// Applied to every broker's configuration.
    configure: fn(&mut BrokerConfig),
}

/// How long a test binary using the harness may run. A task that never
/// yields can starve the runtime's timers, so no timeout inside the test
/// would fire: this thread ends the process instead of leaving CI hanging.
const WATCHDOG: Duration = Duration::from_secs(600);

fn watchdog() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        std::thread::spawn(|| {
            std::thread::sleep(WATCHDOG);
            eprintln!("the in-process cluster test has run for {WATCHDOG:?}: it hangs; aborting");
            std::process::abort();
        });
    });
}

fn address(node: NodeId) -> String {
    format!("in-process:{node}")
}

impl Cluster {
    pub async fn start(n: u32) -> Cluster {
        Cluster::start_with(n, |_| {}).await
    }

    /// Like [`Cluster::start`], with `configure` applied to every broker's
    /// configuration.
    pub async fn start_with(n: u32, configure: fn(&mut BrokerConfig)) -> Cluster {
        watchdog();
        let mut cluster = Cluster { net: Arc::default(), dirs: BTreeMap::new(), configure };
        for node in 1..=n {
            cluster.dirs.insert(node, tempfile::tempdir().unwrap());
        }
        for node in 1..=n {
            cluster.start_node(node).await;
        }
        cluster
            .wait_for("every broker registered and caught up", Duration::from_secs(30), |c| {
                c.brokers().iter().all(|b| {
                    let controller = b.controller();
                    controller.is_caught_up()
                        && controller.image().borrow().brokers.values().filter(|r| !r.fenced).count() == n as usize
                })
            })
            .await;
        cluster
    }

    async fn start_node(&self, node: NodeId) {
        let voters = self.dirs.keys().map(|id| (*id, address(*id))).collect();
        let dir = self.dirs[&node].path().to_path_buf();
        let mut config = BrokerConfig::new(&dir);
        config.node_id = node;
        config.advertised_address = address(node);
        config.flush_interval_ms = None;
        (self.configure)(&mut config);
        let wire = Arc::new(Wire { from: node, net: self.net.clone() });
        let controller = ControllerConfig::new(node, address(node), dir, voters);
        let membership = Membership { controller, transport: wire.clone(), link: wire };
        let broker = Broker::start(config, Some(membership)).await.unwrap();
        broker.spawn_background();
        self.net.brokers.lock().unwrap().insert(node, broker);
    }

    pub fn broker(&self, node: NodeId) -> Arc<Broker> {
        self.net.brokers.lock().unwrap()[&node].clone()
    }

    pub fn brokers(&self) -> Vec<Arc<Broker>> {
        let brokers = self.net.brokers.lock().unwrap();
        let mut all: Vec<_> = brokers.iter().map(|(id, b)| (*id, b.clone())).collect();
        all.sort_by_key(|(id, _)| *id);
        all.into_iter().map(|(_, b)| b).collect()
    }

    /// Cuts `node` off from every other (`false`: heals it).
    pub fn cut(&self, node: NodeId, cut: bool) {
        let mut set = self.net.cut.lock().unwrap();
        if cut {
            set.insert(node);
        } else {
            set.remove(&node);
        }
    }

    /// Loses the answers of the next `n` produce requests between brokers
    /// to `topic`, after their writes were applied.
    pub fn lose_produce_answers(&self, topic: &str, n: u32) {
        self.net.lost_answers.lock().unwrap().insert(topic.to_owned(), n);
    }

    /// A request to `node` from a client (the broker's own principal).
    pub async fn call<R: Request>(&self, node: NodeId, request: &R) -> Result<R::Response, WireError> {
        let frame = concat(&encode_request(request)).slice(4..);
        let response = concat(&self.broker(node).handle(frame, None).await);
        decode_response::<R::Response>(response.slice(4..)).unwrap()
    }

    /// The leader of `topic`-`partition` in `node`'s image.
    pub fn leader(&self, node: NodeId, topic: &str, partition: u32) -> Option<(NodeId, i32)> {
        let image = self.broker(node).controller().image().borrow().clone();
        let p = image.topics.get(topic)?.partitions.get(partition as usize)?.clone();
        p.leader.map(|l| (l, p.leader_epoch))
    }

    pub async fn wait_for(&self, what: &str, timeout: Duration, mut done: impl FnMut(&Cluster) -> bool) {
        let deadline = Instant::now() + timeout;
        while !done(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops every broker, then every controller.
    pub async fn stop(self) {
        for b in self.brokers() {
            b.shutdown();
        }
        for b in self.brokers() {
            b.controller().shutdown().await;
        }
    }
}
