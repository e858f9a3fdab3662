//! Quiver's broker core: the topics and partitions of one node, and the
//! answer to every request frame.
//!
//! Architecture invariant: nothing here knows about QUIC, TLS or sockets.
//! The server crate reads a request frame from a stream, calls
//! [`Broker::handle`], and writes the response frame back. That keeps every
//! request path testable with plain byte frames.

#![forbid(unsafe_code)]

pub mod access;
mod api;
mod broker;
mod cleaner;
mod cluster;
mod config;
mod coordinator;
mod errors;
mod files;
mod group_shards;
mod long_poll;
mod migrate;
mod order;
mod partition;
mod placement;
mod plugin_sync;
mod plugins;
mod producer_ids;
mod reconcile;
mod registry;
mod replica;
pub mod topic;
mod transform_state;
mod txn_coordinator;
mod txn_shards;
mod waiters;
mod wire;

pub use access::{Principal, RequestContext};
pub use broker::{Broker, Membership, now_ms};
pub use config::{BrokerConfig, CleanerConfig, OpenError, REQUEST_BYTES_IN_FLIGHT_MAX_DEFAULT, TransactionsConfig};
pub use order::{AppendOrder, AppendTurn};
pub use partition::ReplicaLink;
pub use quiver_plugin_host::HostConfig as PluginHostConfig;
pub use registry::{Deployment, OnError, StartAt};
