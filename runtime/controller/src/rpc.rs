//! Messages between controllers and the transport that carries them.
//! Bodies are JSON (metadata traffic is small); the server sends them as the
//! body of the `Controller` API over broker-to-broker QUIC.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use openraft::BasicNode;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::{Deserialize, Serialize};

use crate::{Command, Liveness, NodeId, Outcome, TypeConfig, WriteError};

#[derive(Debug, Serialize, Deserialize)]
pub enum ControllerRequest {
    Vote(VoteRequest<NodeId>),
    Append(AppendEntriesRequest<TypeConfig>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    /// A metadata write forwarded to the leader.
    Write(Command),
    /// A change of the Raft voters forwarded to the leader.
    AlterVoters {
        add: Vec<NodeId>,
        remove: Vec<NodeId>,
    },
    /// A broker's liveness signal to the leader; `register` on the first one
    /// of a process.
    Heartbeat {
        node_id: NodeId,
        incarnation: u64,
        address: String,
        rack: Option<String>,
        register: bool,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ControllerResponse {
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    Append(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Snapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
    Write(Result<Outcome, WriteError>),
    Voters(Result<Vec<NodeId>, WriteError>),
    Heartbeat(Result<Liveness, WriteError>),
}

/// Why a message got no answer.
#[derive(Debug, Clone)]
pub enum SendError {
    /// Certainly not delivered (no connection).
    Unreachable(String),
    /// Perhaps delivered (the answer was lost or late).
    Unknown(String),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Unreachable(e) => write!(f, "unreachable: {e}"),
            SendError::Unknown(e) => write!(f, "no answer: {e}"),
        }
    }
}

impl std::error::Error for SendError {}

pub type TransportFuture = Pin<Box<dyn Future<Output = Result<Vec<u8>, SendError>> + Send>>;

/// Carries a serialized [`ControllerRequest`] to node `target` at `address`
/// and returns its serialized [`ControllerResponse`].
pub trait Transport: Send + Sync + 'static {
    fn send(&self, target: NodeId, address: String, body: Vec<u8>) -> TransportFuture;
}

/// The transport of a quorum of one (a single node, KRaft's combined mode
/// with one voter): there is nobody to send to.
pub struct NoPeers;

impl Transport for NoPeers {
    fn send(&self, target: NodeId, _address: String, _body: Vec<u8>) -> TransportFuture {
        Box::pin(async move {
            Err(SendError::Unreachable(format!(
                "node {target} is not reachable: this node runs alone (no --controllers)"
            )))
        })
    }
}

pub(crate) struct Network {
    pub(crate) transport: Arc<dyn Transport>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        Peer { target, address: node.addr.clone(), transport: self.transport.clone() }
    }
}

pub(crate) struct Peer {
    target: NodeId,
    address: String,
    transport: Arc<dyn Transport>,
}

impl Peer {
    async fn call<E: std::error::Error>(
        &self,
        request: ControllerRequest,
        timeout: std::time::Duration,
    ) -> Result<ControllerResponse, RPCError<NodeId, BasicNode, E>> {
        let body = serde_json::to_vec(&request).expect("request serialises");
        let send = self.transport.send(self.target, self.address.clone(), body);
        let raw = match tokio::time::timeout(timeout, send).await {
            Ok(Ok(raw)) => raw,
            Ok(Err(SendError::Unreachable(e))) => {
                return Err(RPCError::Unreachable(Unreachable::new(&SendError::Unreachable(e))));
            }
            Ok(Err(e)) => return Err(RPCError::Network(NetworkError::new(&e))),
            Err(_) => return Err(RPCError::Network(NetworkError::new(&SendError::Unknown("timed out".into())))),
        };
        serde_json::from_slice(&raw).map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }
}

fn unexpected<E: std::error::Error>(answer: ControllerResponse) -> RPCError<NodeId, BasicNode, E> {
    RPCError::Network(NetworkError::new(&SendError::Unknown(format!("unexpected answer {answer:?}"))))
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self.call(ControllerRequest::Append(rpc), option.hard_ttl()).await? {
            ControllerResponse::Append(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            other => Err(unexpected(other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        match self.call(ControllerRequest::Snapshot(rpc), option.hard_ttl()).await? {
            ControllerResponse::Snapshot(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            other => Err(unexpected(other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self.call(ControllerRequest::Vote(rpc), option.hard_ttl()).await? {
            ControllerResponse::Vote(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            other => Err(unexpected(other)),
        }
    }
}
