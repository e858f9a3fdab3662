//! Three controllers in one process, connected by an in-memory transport
//! that can cut nodes off: election, replicated writes, fencing and
//! failover of partition leaders, no quorum, restart from disk with a
//! snapshot, and a node id already taken.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quiver_controller::{
    ClusterImage, Command, Controller, ControllerConfig, ControllerRequest, NodeId, Outcome, RefusalKind, Registration,
    SendError, Transport, TransportFuture, WriteError,
};

#[derive(Default)]
struct Net {
    nodes: Mutex<HashMap<NodeId, Arc<Controller>>>,
    down: Mutex<HashSet<NodeId>>,
}

struct Link {
    from: NodeId,
    net: Arc<Net>,
}

impl Transport for Link {
    fn send(&self, target: NodeId, _address: String, body: Vec<u8>) -> TransportFuture {
        let net = self.net.clone();
        let from = self.from;
        Box::pin(async move {
            let cut = {
                let down = net.down.lock().unwrap();
                down.contains(&from) || down.contains(&target)
            };
            let node = net.nodes.lock().unwrap().get(&target).cloned();
            let Some(node) = node.filter(|_| !cut) else {
                return Err(SendError::Unreachable(format!("node {target} is down")));
            };
            let request: ControllerRequest = serde_json::from_slice(&body).unwrap();
            Ok(serde_json::to_vec(&node.handle(request).await).unwrap())
        })
    }
}

fn voters() -> BTreeMap<NodeId, String> {
    (1..=3).map(|n| (n, format!("127.0.0.1:{}", 9000 + n))).collect()
}

async fn start(net: &Arc<Net>, dirs: &[tempfile::TempDir], node: NodeId, snapshot_every: u64) -> Arc<Controller> {
    let mut config = ControllerConfig::new(
        node,
        format!("127.0.0.1:{}", 9000 + node),
        dirs[node as usize - 1].path().to_path_buf(),
        voters(),
    );
    config.write_timeout = Duration::from_secs(3);
    config.snapshot_every = snapshot_every;
    let c = Controller::start(config, Arc::new(Link { from: node, net: net.clone() })).await.unwrap();
    net.nodes.lock().unwrap().insert(node, c.clone());
    net.down.lock().unwrap().remove(&node);
    c
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn image(c: &Controller) -> Arc<ClusterImage> {
    c.image().borrow().clone()
}

fn create(name: &str, partitions: u32, rf: u16) -> Command {
    Command::CreateTopic { name: name.into(), partitions, replication_factor: rf, configs: vec![] }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_survives_a_node_and_a_restarted_node_catches_up() {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).try_init();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let net = Arc::new(Net::default());
    let mut nodes = Vec::new();
    for n in 1..=3 {
        nodes.push(start(&net, &dirs, n, 20).await);
    }
    wait_for("all three brokers registered", || {
        nodes.iter().all(|c| *c.registration().borrow() == Registration::Registered)
            && image(&nodes[0]).brokers.len() == 3
    })
    .await;

    // A write through a follower is forwarded to the leader and applied
    // everywhere.
    let leader = nodes[0].leader().unwrap();
    let follower = nodes.iter().find(|c| c.node_id() != leader).unwrap().clone();
    assert_eq!(follower.write(create("orders", 6, 3)).await, Ok(Outcome::Done));
    match follower.write(create("orders", 1, 1)).await {
        Err(WriteError::Refused(r)) => assert_eq!(r.kind, RefusalKind::TopicExists),
        other => panic!("{other:?}"),
    }
    wait_for("the topic on every node", || nodes.iter().all(|c| image(c).topics.contains_key("orders"))).await;

    // Many writes, so that snapshots are taken and the log is purged.
    for i in 0..60 {
        follower.write(create(&format!("t{i}"), 1, 1)).await.unwrap();
    }

    // The leader goes away: a new one is elected, the old one's broker is
    // fenced and its partitions move to in-sync replicas.
    net.down.lock().unwrap().insert(leader);
    let cut = Instant::now();
    nodes[leader as usize - 1].shutdown().await;
    let survivors: Vec<_> = nodes.iter().filter(|c| c.node_id() != leader).cloned().collect();
    wait_for("the old leader fenced", || image(&survivors[0]).brokers[&leader].fenced).await;
    // Its session counts from its last append to the new leader (at most
    // one Raft heartbeat interval before the cut), never less.
    let session = nodes[0].config().session_timeout;
    assert!(cut.elapsed() + Duration::from_millis(100) >= session, "fenced {:?} after the cut", cut.elapsed());
    let img = image(&survivors[0]);
    for p in &img.topics["orders"].partitions {
        assert_ne!(p.leader, Some(leader));
        assert!(p.leader.is_some());
        assert!(!p.isr.contains(&leader));
    }
    assert_eq!(img.under_replicated().len(), 6);
    match survivors[0].write(create("wide", 1, 3)).await {
        Err(WriteError::Refused(r)) => {
            assert_eq!(r.kind, RefusalKind::NotEnoughBrokers);
            assert!(r.message.contains("fenced"), "{}", r.message);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(survivors[0].write(create("narrow", 2, 2)).await, Ok(Outcome::Done));

    // It restarts from its data directory (snapshot + log) and catches up,
    // registers again, and is unfenced.
    let back = start(&net, &dirs, leader, 20).await;
    wait_for("the restarted node caught up", || {
        let mine = image(&back);
        mine.topics.contains_key("narrow") && !image(&survivors[0]).brokers[&leader].fenced
    })
    .await;
    wait_for("identical images", || image(&back).topics == image(&survivors[0]).topics).await;
    let (_, _, applied) = back.raft_progress();
    assert!(applied.unwrap() > 60);

    // A second process with a taken node id is refused.
    let imposter_dir = tempfile::tempdir().unwrap();
    let mut config = ControllerConfig::new(9, "127.0.0.1:9009".into(), imposter_dir.path().to_path_buf(), voters());
    config.node_id = survivors[0].node_id();
    let imposter = Controller::start(config, Arc::new(Link { from: 99, net: net.clone() })).await.unwrap();
    let mut reg = imposter.registration();
    let _ =
        tokio::time::timeout(Duration::from_secs(10), reg.wait_for(|r| matches!(r, Registration::Refused(_)))).await;
    match &*reg.borrow() {
        Registration::Refused(m) => assert!(m.contains("already taken"), "{m}"),
        other => panic!("{other:?}"),
    };
    imposter.shutdown().await;

    // Two of three voters gone: writes fail with a clear "no quorum".
    for c in &survivors {
        net.down.lock().unwrap().insert(c.node_id());
    }
    let started = Instant::now();
    match back.write(create("lonely", 1, 1)).await {
        Err(WriteError::NoQuorum(m)) => assert!(m.contains("majority"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10));
}
