//! The wire errors the broker answers with, made from what failed: storage,
//! decoding, reads, metadata writes, leadership; and running blocking work
//! off the runtime.

use quiver_controller::{ClusterImage, RefusalKind, WriteError};
use quiver_log::ReadError;
use quiver_protocol::messages::*;
use quiver_protocol::{ErrorCode, WireError};

pub(crate) fn storage_error(e: impl std::fmt::Display) -> WireError {
    WireError::new(ErrorCode::StorageError, e.to_string())
}

pub(crate) fn corrupt(e: impl std::fmt::Display) -> WireError {
    WireError::new(ErrorCode::CorruptMessage, e.to_string())
}

/// `Ok` when `me` leads `topic`-`partition` in `image`; otherwise the error
/// a client needs to find the leader.
pub(crate) fn check_leader(me: u32, image: &ClusterImage, topic: &str, partition: u32) -> Result<(), WireError> {
    let t = image
        .topics
        .get(topic)
        .ok_or_else(|| WireError::new(ErrorCode::UnknownTopic, format!("topic '{topic}' does not exist")))?;
    let p = t.partitions.get(partition as usize).ok_or_else(|| {
        WireError::new(
            ErrorCode::UnknownPartition,
            format!("topic '{topic}' has {} partitions; there is no partition {partition}", t.partitions.len()),
        )
    })?;
    match p.leader {
        Some(l) if l == me => Ok(()),
        Some(l) => {
            let at = image.brokers.get(&l).map(|b| b.address.as_str()).unwrap_or("?");
            Err(WireError::new(
                ErrorCode::NotLeader,
                format!("broker {me} is not the leader of {topic}-{partition}; broker {l} at {at} is"),
            ))
        }
        None => Err(WireError::new(
            ErrorCode::NotLeader,
            format!(
                "{topic}-{partition} is offline: none of its in-sync replicas {:?} is live (replicas {:?})",
                p.isr, p.replicas
            ),
        )),
    }
}

pub(crate) fn write_error(e: WriteError) -> WireError {
    match e {
        WriteError::Refused(r) => {
            let code = match r.kind {
                RefusalKind::TopicExists => ErrorCode::TopicAlreadyExists,
                RefusalKind::UnknownTopic => ErrorCode::UnknownTopic,
                RefusalKind::UnknownPartition => ErrorCode::UnknownPartition,
                RefusalKind::NotEnoughBrokers => ErrorCode::NotEnoughReplicas,
                RefusalKind::UnknownPlugin => ErrorCode::UnknownPlugin,
                RefusalKind::Stale | RefusalKind::UnknownBroker | RefusalKind::Invalid => ErrorCode::InvalidRequest,
            };
            WireError::new(code, r.message)
        }
        e @ (WriteError::NoQuorum(_) | WriteError::NotLeader { .. } | WriteError::Unreachable(_)) => {
            WireError::new(ErrorCode::NoQuorum, e.to_string())
        }
        e @ WriteError::Unknown(_) => WireError::new(
            ErrorCode::RequestTimedOut,
            format!("{e}; the change may or may not have been made: check before retrying"),
        ),
    }
}

/// The Metadata entry of a topic that does not exist.
pub(crate) fn unknown_topic_metadata(name: String) -> TopicMetadata {
    TopicMetadata {
        name,
        error: ErrorCode::UnknownTopic,
        partitions: vec![],
        partitioner: String::new(),
        partitioner_version: 0,
    }
}

pub(crate) fn read_error(e: ReadError) -> WireError {
    match e {
        ReadError::OffsetOutOfRange { .. } => WireError::new(ErrorCode::OffsetOutOfRange, e.to_string()),
        ReadError::Corrupt { .. } => {
            tracing::error!(error = %e, "corrupt batch on disk; not served");
            WireError::new(ErrorCode::CorruptStoredBatch, e.to_string())
        }
        other => WireError::new(ErrorCode::StorageError, other.to_string()),
    }
}

/// Runs blocking work (wasm calls, batch rebuilding, a follower's log
/// writes) off the runtime.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, WireError> + Send + 'static,
) -> Result<T, WireError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))?
}
