//! Running a broker node: open the broker, bind the QUIC endpoint, serve,
//! and shut down cleanly (fsync and close every log) on request.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use quiver_broker::{Broker, BrokerConfig, Membership};
use tokio::sync::watch;

use crate::config::NodeConfig;
use crate::tls::{TlsPaths, ensure_dev_certs, server_config_with_clients};

/// A running node.
pub struct Node {
    pub broker: Arc<Broker>,
    pub address: SocketAddr,
    /// CA that signed this node's certificate, when development
    /// certificates are in use.
    pub ca_cert: Option<PathBuf>,
    shutdown: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
}

impl Node {
    /// Starts a node. Without TLS files, development certificates are made
    /// (once) in `<data_dir>/tls`.
    pub async fn start(mut config: NodeConfig) -> anyhow::Result<Node> {
        let (cert, key, ca_cert) = match &config.tls {
            Some((c, k)) => (c.clone(), k.clone(), None),
            None => {
                let hosts = vec![config.listen.ip().to_string()];
                let paths = ensure_dev_certs(&config.broker.data_dir.join("tls"), &hosts)?;
                (paths.cert, paths.key, Some(paths.ca_cert))
            }
        };
        let server_config = server_config_with_clients(&cert, &key, config.client_ca.as_deref())?;
        let endpoint = quinn::Endpoint::server(server_config, config.listen)
            .with_context(|| format!("cannot listen on {} (UDP)", config.listen))?;
        let address = endpoint.local_addr()?;
        // Told to listen on port 0 (tests, `bench --embedded`): clients are
        // told the port the system chose.
        if config.listen.port() == 0 && config.broker.advertised_address == config.listen.to_string() {
            config.broker.advertised_address = address.to_string();
        }
        let mut membership = None;
        if let Some(cluster) = &config.cluster {
            let transport = Arc::new(crate::cluster::QuicTransport::new(&cluster.ca, &cert, &key, address)?);
            let mut cc = quiver_controller::ControllerConfig::new(
                config.broker.node_id,
                config.broker.advertised_address.clone(),
                config.broker.data_dir.clone(),
                cluster.voters.clone(),
            );
            cc.rack = cluster.rack.clone();
            cc.session_timeout = std::time::Duration::from_millis(cluster.session_timeout_ms);
            cc.heartbeat_interval = std::time::Duration::from_millis(cluster.heartbeat_interval_ms);
            cc.leader_rebalance_interval = (cluster.leader_rebalance_interval_ms > 0)
                .then(|| std::time::Duration::from_millis(cluster.leader_rebalance_interval_ms));
            membership = Some(Membership { controller: cc, transport: transport.clone(), link: transport });
        }
        let broker = Broker::start(config.broker.clone(), membership).await.context("starting the broker")?;
        broker.spawn_background();
        let (shutdown, rx) = watch::channel(false);
        let server = tokio::spawn(crate::net::serve(endpoint, broker.clone(), rx));
        tracing::info!(%address, node_id = config.broker.node_id, "broker listening");
        Ok(Node { broker, address, ca_cert, shutdown, server })
    }

    /// Resolves with a message if this node can no longer run (its node id
    /// is taken by another live broker); never resolves otherwise.
    pub async fn fatal(&self) -> String {
        let mut registration = self.broker.controller().registration();
        match registration.wait_for(|r| matches!(r, quiver_controller::Registration::Refused(_))).await {
            Ok(r) => match &*r {
                quiver_controller::Registration::Refused(m) => m.clone(),
                _ => unreachable!("waited for a refusal"),
            },
            Err(_) => std::future::pending().await,
        }
    }

    /// Stops serving, then fsyncs and closes every log.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.server.await;
        self.broker.controller().shutdown().await;
        let broker = self.broker.clone();
        let _ = tokio::task::spawn_blocking(move || broker.shutdown()).await;
    }
}

/// The files `quiver dev` leaves so that client commands find the node
/// without flags.
pub fn write_dev_discovery(dev_dir: &Path, address: SocketAddr, ca_cert: &Path) -> anyhow::Result<()> {
    std::fs::write(dev_dir.join("address"), address.to_string())?;
    let target = dev_dir.join("ca.pem");
    if ca_cert != target {
        std::fs::copy(ca_cert, &target)?;
    }
    Ok(())
}

/// A development node configuration: data in `data_dir`, listening on `listen`.
pub fn dev_config(data_dir: &Path, listen: SocketAddr) -> NodeConfig {
    let mut broker = BrokerConfig::new(data_dir);
    broker.advertised_address = listen.to_string();
    broker.allow_anonymous_admin = true;
    NodeConfig { broker, listen, tls: None, client_ca: None, cluster: None }
}

/// Dev TLS paths for a data dir.
pub fn dev_tls(data_dir: &Path) -> TlsPaths {
    TlsPaths::in_dir(&data_dir.join("tls"))
}
