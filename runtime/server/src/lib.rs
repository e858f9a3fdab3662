//! The `quiver` binary's library half: node configuration, TLS material, the
//! QUIC endpoint, and the CLI commands (topics, benchmarks, demo). Kept as a
//! library so integration tests and the demo can start real nodes in-process.

pub mod bench;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod group_cli;
pub mod net;
pub mod node;
pub mod plugin_cli;
pub mod tls;
pub mod txn_cli;
