//! Who may do what: the request context every request carries, and the one
//! authorization point the dispatcher asks before it runs a request.
//!
//! Today's policy is small: the cluster's own APIs (the metadata quorum's
//! messages, followers' fetches) are for cluster nodes only, and admin
//! operations (voters, reassignment, leader elections, plugin deploy and
//! control) need an authenticated principal unless the broker allows
//! anonymous admin (development nodes do). ACLs replace [`authorize`]'s body,
//! not its callers.

use std::fmt;
use std::net::SocketAddr;

use quiver_protocol::messages::ApiKey;

/// Who sent a request, as the transport authenticated it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A client that presented no certificate.
    Anonymous,
    /// A client certificate's subject (its common name).
    User(String),
    /// Another node of the cluster, by its node certificate.
    Node(u32),
    /// The broker itself: transforms and in-process callers.
    Internal,
}

impl Principal {
    /// The principal of a certificate subject's common name: `quiver node N`
    /// (what `quiver certs init` issues to nodes) is node N, anything else
    /// a user of that name.
    pub fn from_common_name(name: &str) -> Principal {
        match name.strip_prefix("quiver node ").and_then(|id| id.parse().ok()) {
            Some(id) => Principal::Node(id),
            None => Principal::User(name.to_string()),
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Anonymous => f.write_str("anonymous"),
            Principal::User(name) => write!(f, "User:{name}"),
            Principal::Node(id) => write!(f, "node:{id}"),
            Principal::Internal => f.write_str("internal"),
        }
    }
}

/// What every request carries into the broker.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub principal: Principal,
    /// The client's address, when it came over the network.
    pub peer: Option<SocketAddr>,
    /// The connection it came on (unique in this process), for logs and
    /// per-connection state.
    pub connection: u64,
}

impl RequestContext {
    /// A request made by the broker itself (or a test driving it in
    /// process).
    pub fn internal() -> RequestContext {
        RequestContext { principal: Principal::Internal, peer: None, connection: 0 }
    }
}

/// What a request does to its resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Read,
    Write,
    Describe,
    Create,
    Delete,
    Alter,
    /// The cluster's own traffic between nodes.
    ClusterAction,
}

/// What a request acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Cluster,
    Topic,
    Plugin,
    Group,
    TransactionalId,
}

/// The operation and resource of an API.
pub fn operation_of(api: ApiKey) -> (Operation, Resource) {
    use ApiKey::*;
    match api {
        ApiVersions | Metadata | ClusterInfo => (Operation::Describe, Resource::Cluster),
        DescribeTopics | ListOffsets => (Operation::Describe, Resource::Topic),
        CreateTopic => (Operation::Create, Resource::Topic),
        DeleteTopic => (Operation::Delete, Resource::Topic),
        Produce | InitProducerId => (Operation::Write, Resource::Topic),
        Fetch => (Operation::Read, Resource::Topic),
        PluginList | PluginFetch | PluginLogs => (Operation::Describe, Resource::Plugin),
        PluginDeploy | PluginControl => (Operation::Alter, Resource::Plugin),
        ElectLeaders | AlterVoters | ReassignPartition | CompactTopic => (Operation::Alter, Resource::Cluster),
        Controller | ReplicaFetch => (Operation::ClusterAction, Resource::Cluster),
        FindCoordinator | GroupHeartbeat | OffsetCommit | OffsetFetch | ShareFetch | TxnOffsetCommit => {
            (Operation::Read, Resource::Group)
        }
        ListGroups | DescribeGroup => (Operation::Describe, Resource::Group),
        DeleteGroup => (Operation::Delete, Resource::Group),
        AlterGroupConfig => (Operation::Alter, Resource::Group),
        EndTxn | AddPartitionsToTxn => (Operation::Write, Resource::TransactionalId),
        ListTransactions | DescribeTransaction => (Operation::Describe, Resource::TransactionalId),
        // An operator's: it fences the id's producer.
        AbortTransaction => (Operation::Alter, Resource::Cluster),
        WriteTxnMarkers => (Operation::ClusterAction, Resource::Cluster),
    }
}

/// The broker's answer to "may this principal do this?".
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Admin operations ([`Operation::Alter`] on the cluster or a plugin)
    /// without a certificate.
    pub allow_anonymous_admin: bool,
}

/// A request its principal may not make, and what would allow it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{principal} may not {what}")]
pub struct Denied {
    pub principal: String,
    pub what: &'static str,
}

/// The one authorization point: every request passes here before it runs.
pub fn authorize(
    policy: Policy,
    principal: &Principal,
    operation: Operation,
    resource: Resource,
) -> Result<(), Denied> {
    let denied = |what: &'static str| Err(Denied { principal: principal.to_string(), what });
    match (operation, principal) {
        (_, Principal::Internal | Principal::Node(_)) => Ok(()),
        (Operation::ClusterAction, _) => denied(
            "use the cluster's own APIs (the metadata quorum, replication): connect with a node certificate of \
             the cluster CA",
        ),
        (Operation::Alter, Principal::Anonymous)
            if matches!(resource, Resource::Cluster | Resource::Plugin) && !policy.allow_anonymous_admin =>
        {
            denied(
                "change the cluster or its plugins: present a client certificate of the cluster CA (`quiver certs \
                 init --client NAME`, then --client-cert and --client-key, or QUIVER_CLIENT_CERT and \
                 QUIVER_CLIENT_KEY), or set broker.allow_anonymous_admin = true",
            )
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRICT: Policy = Policy { allow_anonymous_admin: false };

    #[test]
    fn cluster_apis_are_for_nodes() {
        let (op, resource) = operation_of(ApiKey::ReplicaFetch);
        assert!(authorize(STRICT, &Principal::Node(2), op, resource).is_ok());
        for who in [Principal::Anonymous, Principal::User("alice".into())] {
            let err = authorize(STRICT, &who, op, resource).unwrap_err().to_string();
            assert!(err.contains("node certificate"), "{err}");
        }
    }

    #[test]
    fn admin_needs_a_principal_unless_anonymous_admin_is_allowed() {
        for api in [ApiKey::AlterVoters, ApiKey::ReassignPartition, ApiKey::PluginDeploy, ApiKey::PluginControl] {
            let (op, resource) = operation_of(api);
            let err = authorize(STRICT, &Principal::Anonymous, op, resource).unwrap_err().to_string();
            assert!(err.starts_with("anonymous may not change"), "{api:?}: {err}");
            assert!(authorize(STRICT, &Principal::User("ops".into()), op, resource).is_ok());
            assert!(authorize(Policy { allow_anonymous_admin: true }, &Principal::Anonymous, op, resource).is_ok());
        }
        for api in [ApiKey::Produce, ApiKey::Fetch, ApiKey::CreateTopic, ApiKey::Metadata, ApiKey::PluginList] {
            let (op, resource) = operation_of(api);
            assert!(authorize(STRICT, &Principal::Anonymous, op, resource).is_ok(), "{api:?}");
        }
    }

    #[test]
    fn node_certificates_name_nodes() {
        assert_eq!(Principal::from_common_name("quiver node 3"), Principal::Node(3));
        assert_eq!(Principal::from_common_name("quiver node x"), Principal::User("quiver node x".into()));
        assert_eq!(Principal::from_common_name("alice").to_string(), "User:alice");
        assert_eq!(Principal::Node(3).to_string(), "node:3");
    }
}
