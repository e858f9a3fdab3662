//! The broker's own files in its data directory, and how they are
//! replaced durably.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::OpenError;
use crate::topic::TopicRecord;

/// Replaces `path` with `body` durably: a temporary file, fsync, rename,
/// fsync of the directory. A crash leaves the old or the new content.
pub(crate) fn write_atomic(path: &Path, body: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(body)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(path.parent().expect("a file has a directory"))?.sync_all()
}

/// Replaces `topics.json` at `path` with `topics`, atomically.
pub(crate) fn write_records(path: &Path, topics: Vec<TopicRecord>) -> std::io::Result<()> {
    let body = serde_json::to_vec_pretty(&MetadataFile { topics }).expect("metadata serialises");
    write_atomic(path, &body)
}

/// `topics.json`: the topics this broker holds replicas of, as it opened
/// them (which metadata-log topic, which partitions). The image decides;
/// this file lets a restart open the logs before the image is replayed.
#[derive(Serialize, Deserialize, Default)]
pub(crate) struct MetadataFile {
    pub(crate) topics: Vec<TopicRecord>,
}

/// The records of `topics.json` (none if it does not exist).
pub(crate) fn read_records(path: &Path) -> Result<Vec<TopicRecord>, OpenError> {
    match std::fs::read(path) {
        Ok(raw) => serde_json::from_slice::<MetadataFile>(&raw)
            .map(|m| m.topics)
            .map_err(|e| OpenError::Metadata { path: path.to_path_buf(), reason: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(OpenError::DataDir { path: path.to_path_buf(), source }),
    }
}

pub(crate) fn partition_dir(logs_dir: &Path, topic: &str, partition: u32) -> PathBuf {
    logs_dir.join(format!("{topic}-{partition}"))
}

pub(crate) const METADATA_FILE: &str = "topics.json";

pub(crate) const LOGS_DIR: &str = "logs";
