//! Topic names and topic configs: parsing, validation, defaults, and the
//! mapping onto the storage engine's `LogConfig`.

use std::collections::BTreeMap;

use quiver_log::{CompactionConfig, LogConfig};
use quiver_protocol::batch::Compression;
use serde::{Deserialize, Serialize};

pub const TOPIC_NAME_BYTES_MAX: usize = 249;
pub const PARTITIONS_MAX: u32 = 10_000;

/// Checks a topic name: Kafka's rule (ASCII letters, digits, `.`, `_`, `-`;
/// at most 249 bytes; not `.` or `..`), so names round-trip with Kafka tools.
pub fn validate_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("topic name is empty".into());
    }
    if name.len() > TOPIC_NAME_BYTES_MAX {
        return Err(format!("topic name is longer than {TOPIC_NAME_BYTES_MAX} bytes"));
    }
    if name == "." || name == ".." {
        return Err(format!("'{name}' is not a valid topic name"));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!(
            "topic name '{name}' contains '{c}': only ASCII letters, digits, '.', '_' and '-' are allowed"
        ));
    }
    Ok(())
}

/// What the broker does with the codec of incoming batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicCompression {
    /// Store batches as the producer compressed them.
    Producer,
    /// Re-encode batches that do not already use this codec.
    Codec(Compression),
}

/// What happens to a topic's old records (`cleanup.policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CleanupPolicy {
    /// Segments past `retention.ms` / `retention.bytes` are deleted.
    pub delete: bool,
    /// Only the latest record of each key is kept.
    pub compact: bool,
}

impl CleanupPolicy {
    fn parse(key: &str, value: &str) -> Result<CleanupPolicy, String> {
        let mut policy = CleanupPolicy { delete: false, compact: false };
        for part in value.split(',').map(str::trim) {
            match part {
                "delete" => policy.delete = true,
                "compact" => policy.compact = true,
                _ => return Err(format!("{key}: '{value}' is not compact, delete or compact,delete")),
            }
        }
        Ok(policy)
    }
}

impl std::fmt::Display for CleanupPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match (self.compact, self.delete) {
            (true, true) => "compact,delete",
            (true, false) => "compact",
            _ => "delete",
        })
    }
}

/// A topic's typed configuration. Every key has a default; unknown keys and
/// bad values are refused at creation with a message that names them.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicConfig {
    pub cleanup_policy: CleanupPolicy,
    /// How a compacted topic is cleaned (used when `cleanup_policy.compact`).
    pub compaction: CompactionConfig,
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
    pub segment_bytes: u64,
    pub segment_ms: Option<u64>,
    pub compression: TopicCompression,
    pub record_bytes_max: usize,
    pub index_interval_bytes: u32,
    /// A deployed serializer plugin that checks and encodes values on
    /// produce (and decodes them for consumers that ask).
    pub value_serializer: Option<String>,
    /// The same for keys: the serializer sees each key as a value.
    pub key_serializer: Option<String>,
    /// A deployed partitioner plugin that places records produced without
    /// a partition (run by clients that can, by the broker otherwise).
    pub partitioner: Option<String>,
    /// In a cluster: `acks=all` writes are refused while fewer replicas are
    /// in sync.
    pub min_insync_replicas: usize,
    /// In a cluster: whether a replica outside the ISR may become leader
    /// when no ISR member is live (acknowledged records may be lost).
    pub unclean_leader_election: bool,
}

impl Default for TopicConfig {
    fn default() -> Self {
        TopicConfig {
            cleanup_policy: CleanupPolicy { delete: true, compact: false },
            compaction: CompactionConfig::default(),
            retention_ms: Some(7 * 24 * 3600 * 1000),
            retention_bytes: None,
            segment_bytes: 1024 * 1024 * 1024,
            segment_ms: Some(7 * 24 * 3600 * 1000),
            compression: TopicCompression::Producer,
            record_bytes_max: 1024 * 1024,
            index_interval_bytes: 4096,
            value_serializer: None,
            key_serializer: None,
            partitioner: None,
            min_insync_replicas: 1,
            unclean_leader_election: false,
        }
    }
}

/// The keys `TopicConfig` understands, with what they mean (for `--help`
/// texts and errors).
pub const CONFIG_KEYS: &[(&str, &str)] = &[
    (
        "cleanup.policy",
        "delete | compact | compact,delete: drop old segments by retention, keep each key's latest record, or both",
    ),
    (
        "min.cleanable.dirty.ratio",
        "compacted topics: clean once this share of the log (0..1) is new since the last clean",
    ),
    ("min.compaction.lag.ms", "compacted topics: a record stays uncompacted at least this long"),
    ("max.compaction.lag.ms", "compacted topics: a record is compacted at the latest after this long; -1 = no bound"),
    ("delete.retention.ms", "compacted topics: how long a tombstone (null value) stays readable after its first clean"),
    ("retention.ms", "delete segments older than this (ms); -1 keeps forever"),
    ("retention.bytes", "delete oldest segments while the partition is larger (bytes); -1 = no limit"),
    ("segment.bytes", "roll to a new segment at this size (bytes, >= 1024)"),
    ("segment.ms", "roll to a new segment at this age (ms); -1 = never"),
    ("compression", "producer | none | lz4 | zstd: codec batches are stored with"),
    ("max.message.bytes", "largest record accepted (key + value + headers, bytes)"),
    ("index.interval.bytes", "bytes between sparse offset index entries"),
    ("min.insync.replicas", "in a cluster: acks=all writes are refused while fewer replicas are in sync"),
    (
        "unclean.leader.election.enable",
        "in a cluster: true lets a replica outside the ISR lead when no ISR member is live (may lose records)",
    ),
    ("value.serializer", "a deployed serializer plugin run on every produced batch; empty = none"),
    ("key.serializer", "a deployed serializer plugin run on the keys of every produced batch; empty = none"),
    (
        "partitioner",
        "a deployed partitioner plugin placing records sent without a partition; empty = murmur2 of the key",
    ),
];

fn optional_ms(key: &str, value: &str) -> Result<Option<u64>, String> {
    match value.parse::<i64>() {
        Ok(-1) => Ok(None),
        Ok(v) if v >= 0 => Ok(Some(v as u64)),
        _ => Err(format!("{key}: '{value}' is not a non-negative integer or -1")),
    }
}

fn positive<T: std::str::FromStr + PartialOrd + From<u16>>(key: &str, value: &str, min: u16) -> Result<T, String> {
    match value.parse::<T>() {
        Ok(v) if v >= T::from(min) => Ok(v),
        _ => Err(format!("{key}: '{value}' is not an integer >= {min}")),
    }
}

impl TopicConfig {
    /// Applies `key=value` overrides on top of `self`.
    pub fn with_overrides<'a>(
        mut self,
        overrides: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, String> {
        for (key, value) in overrides {
            match key {
                "cleanup.policy" => self.cleanup_policy = CleanupPolicy::parse(key, value)?,
                "min.cleanable.dirty.ratio" => {
                    self.compaction.min_cleanable_dirty_ratio = match value.parse::<f64>() {
                        Ok(r) if (0.0..=1.0).contains(&r) => r,
                        _ => return Err(format!("{key}: '{value}' is not a number between 0 and 1")),
                    }
                }
                "min.compaction.lag.ms" => self.compaction.min_compaction_lag_ms = positive(key, value, 0)?,
                "max.compaction.lag.ms" => self.compaction.max_compaction_lag_ms = optional_ms(key, value)?,
                "delete.retention.ms" => self.compaction.delete_retention_ms = positive(key, value, 0)?,
                "retention.ms" => self.retention_ms = optional_ms(key, value)?,
                "retention.bytes" => self.retention_bytes = optional_ms(key, value)?,
                "segment.bytes" => self.segment_bytes = positive(key, value, 1024)?,
                "segment.ms" => self.segment_ms = optional_ms(key, value)?,
                "compression" => {
                    self.compression = match value {
                        "producer" => TopicCompression::Producer,
                        other => TopicCompression::Codec(other.parse().map_err(|e| format!("compression: {e}"))?),
                    }
                }
                "max.message.bytes" => self.record_bytes_max = positive::<u32>(key, value, 1)? as usize,
                "index.interval.bytes" => self.index_interval_bytes = positive(key, value, 1)?,
                "min.insync.replicas" => self.min_insync_replicas = positive::<u16>(key, value, 1)? as usize,
                "unclean.leader.election.enable" => {
                    self.unclean_leader_election = match value {
                        "true" => true,
                        "false" => false,
                        _ => return Err(format!("{key}: '{value}' is not true or false")),
                    }
                }
                "value.serializer" => self.value_serializer = Some(value.to_owned()).filter(|v| !v.is_empty()),
                "key.serializer" => self.key_serializer = Some(value.to_owned()).filter(|v| !v.is_empty()),
                "partitioner" => self.partitioner = Some(value.to_owned()).filter(|v| !v.is_empty()),
                other => {
                    let known: Vec<_> = CONFIG_KEYS.iter().map(|(k, _)| *k).collect();
                    return Err(format!("unknown topic config '{other}' (known: {})", known.join(", ")));
                }
            }
        }
        Ok(self)
    }

    /// The plugins this config names, each with its config key.
    pub fn plugins(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("value.serializer", &self.value_serializer),
            ("key.serializer", &self.key_serializer),
            ("partitioner", &self.partitioner),
        ]
        .into_iter()
        .filter_map(|(key, name)| Some((key, name.as_deref()?)))
    }

    /// Every key with its effective value, as `describe` shows them.
    pub fn to_pairs(&self) -> Vec<(String, String)> {
        let ms = |v: Option<u64>| v.map_or("-1".to_string(), |v| v.to_string());
        vec![
            ("cleanup.policy".into(), self.cleanup_policy.to_string()),
            (
                "compression".into(),
                match self.compression {
                    TopicCompression::Producer => "producer".into(),
                    TopicCompression::Codec(c) => c.to_string(),
                },
            ),
            ("delete.retention.ms".into(), self.compaction.delete_retention_ms.to_string()),
            ("index.interval.bytes".into(), self.index_interval_bytes.to_string()),
            ("key.serializer".into(), self.key_serializer.clone().unwrap_or_default()),
            ("max.compaction.lag.ms".into(), ms(self.compaction.max_compaction_lag_ms)),
            ("max.message.bytes".into(), self.record_bytes_max.to_string()),
            ("min.cleanable.dirty.ratio".into(), self.compaction.min_cleanable_dirty_ratio.to_string()),
            ("min.compaction.lag.ms".into(), self.compaction.min_compaction_lag_ms.to_string()),
            ("min.insync.replicas".into(), self.min_insync_replicas.to_string()),
            ("partitioner".into(), self.partitioner.clone().unwrap_or_default()),
            ("retention.bytes".into(), ms(self.retention_bytes)),
            ("retention.ms".into(), ms(self.retention_ms)),
            ("segment.bytes".into(), self.segment_bytes.to_string()),
            ("segment.ms".into(), ms(self.segment_ms)),
            ("unclean.leader.election.enable".into(), self.unclean_leader_election.to_string()),
            ("value.serializer".into(), self.value_serializer.clone().unwrap_or_default()),
        ]
    }

    /// Whether produced records must have keys.
    pub fn is_compacted(&self) -> bool {
        self.cleanup_policy.compact
    }

    /// Retention applies only with `delete` in the policy.
    pub fn log_config(&self) -> LogConfig {
        let delete = self.cleanup_policy.delete;
        LogConfig {
            segment_bytes_max: self.segment_bytes,
            segment_ms_max: self.segment_ms,
            retention_ms: self.retention_ms.filter(|_| delete),
            retention_bytes: self.retention_bytes.filter(|_| delete),
            index_interval_bytes: self.index_interval_bytes,
            compaction: self.cleanup_policy.compact.then(|| self.compaction.clone()),
        }
    }
}

/// A topic as persisted in the broker's metadata file: name, partition count
/// and only the overrides the user gave (so changing a default later applies
/// to topics that did not override it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicRecord {
    pub name: String,
    pub partitions: u32,
    pub overrides: BTreeMap<String, String>,
    pub created_ms: i64,
    /// In a cluster: the metadata log index that created the topic (a topic
    /// deleted and created again under its name has another).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<u64>,
    /// In a cluster: the partitions this broker holds a replica of (`None`:
    /// all of them, as on a single node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<Vec<u32>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_topic_name("orders.v1_eu-west").is_ok());
        assert!(validate_topic_name("").is_err());
        assert!(validate_topic_name("..").is_err());
        assert!(validate_topic_name("a/b").unwrap_err().contains("'/'"));
        assert!(validate_topic_name(&"x".repeat(250)).is_err());
    }

    #[test]
    fn overrides() {
        let c = TopicConfig::default()
            .with_overrides([("retention.ms", "-1"), ("compression", "zstd"), ("segment.bytes", "4096")])
            .unwrap();
        assert_eq!(c.retention_ms, None);
        assert_eq!(c.compression, TopicCompression::Codec(Compression::Zstd));
        assert_eq!(c.segment_bytes, 4096);
        let err = TopicConfig::default().with_overrides([("retention.hours", "1")]).unwrap_err();
        assert!(err.contains("unknown topic config 'retention.hours'"), "{err}");
        assert!(TopicConfig::default().with_overrides([("segment.bytes", "12")]).is_err());
        assert!(TopicConfig::default().with_overrides([("compression", "gzip")]).is_err());
    }
}
