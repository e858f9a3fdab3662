//! The broker's typed operations: what a client (or a transform, or a
//! future Kafka-protocol listener) can ask of the data path, in the
//! broker's own types, failing with the broker's own errors
//! (`errors.rs`). The Quiver wire adapter (`wire.rs`) decodes request
//! frames into these calls and their results and errors into response
//! frames; transforms call them directly.
//!
//! - [`produce`]: [`Broker::write`](crate::Broker) — validate, run the
//!   topic's serializers and partitioner, append as leader (or forward a
//!   share to its leader), wait for the in-sync replicas.
//! - [`fetch`]: `Broker::read` — long-poll reads up to the high watermark,
//!   off the runtime's threads, through a filter and value decoders; and
//!   `Broker::find_offsets` (earliest, latest, by time).
//! - [`groups`]: consumer groups — coordinator lookup, heartbeats,
//!   offset commits and fetches, list, describe, delete.
//! - [`admin`]: topics (create, delete), preferred-leader elections,
//!   reassignments, voters — commands in the metadata log.
//! - [`compaction`]: the log cleaner's loops and `topic compact`.
//! - [`transactions`]: transactional producers' init, partitions joining
//!   on their first write, commit and abort, markers at partitions' leaders,
//!   list, describe and an operator's abort.
//!
//! Not here yet: describing topics and the cluster, and the plugin
//! operations (`cluster.rs`, `plugins.rs`, `plugin_sync.rs`) take or answer
//! wire structs; they already fail with typed errors.

pub(crate) mod admin;
pub(crate) mod compaction;
pub(crate) mod fetch;
pub(crate) mod groups;
pub(crate) mod produce;
pub(crate) mod share_groups;
pub(crate) mod transactions;

pub(crate) use admin::NewTopic;
pub(crate) use fetch::{OffsetQuery, Read, ReadOptions};
pub(crate) use produce::{Acks, Write};
