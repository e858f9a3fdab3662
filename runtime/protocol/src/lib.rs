//! Quiver's wire protocol and record batch format, with no I/O.
//!
//! - [`batch`]: record batches as stored and sent (Kafka record batch v2).
//! - [`codec`]: the binary encoding of message bodies.
//! - [`messages`]: every request and response.
//! - [`frame`]: length-prefixed request and response frames.
//! - [`error`]: wire error codes.
//!
//! The same crate is used by the broker and the client, so the two cannot
//! disagree on a byte.

pub mod batch;
pub mod codec;
pub mod control;
pub mod error;
pub mod frame;
pub mod messages;
pub mod partitioner;
pub mod varint;

pub use error::{ErrorCode, WireError};

/// ALPN protocol id spoken on every Quiver QUIC connection.
pub const ALPN: &[u8] = b"quiver/1";
