//! Node configuration: one TOML file, `QUIVER_SECTION__KEY` environment
//! overrides on top, CLI flags on top of that. Unknown keys are errors;
//! [`FileConfig::validate`] turns the raw file into a typed `NodeConfig`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use quiver_broker::BrokerConfig;
use quiver_broker::topic::TopicConfig;
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub broker: BrokerSection,
    #[serde(default)]
    pub storage: StorageSection,
    #[serde(default)]
    pub tls: TlsSection,
    #[serde(default)]
    pub cluster: ClusterSection,
    #[serde(default)]
    pub groups: GroupsSection,
    #[serde(default)]
    pub plugins: PluginsSection,
    #[serde(default)]
    pub transactions: TransactionsSection,
    /// Defaults for new topics, e.g. `"retention.ms" = "86400000"`.
    #[serde(default)]
    pub topic_defaults: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerSection {
    pub node_id: u32,
    pub data_dir: PathBuf,
    pub listen: String,
    /// What clients are told to connect to; defaults to `listen`.
    pub advertised_address: Option<String>,
    pub frame_bytes_max: usize,
    /// Request bytes read and not yet answered, broker-wide (at least
    /// `frame_bytes_max`): past it requests wait, then get `broker_busy`.
    pub request_bytes_in_flight_max: usize,
    /// A request must arrive whole within this long of its first byte.
    pub request_read_timeout_ms: u64,
    /// Admin operations (voters, reassignment, plugin deploy and control)
    /// for clients without a certificate. Off: they need a client
    /// certificate of `tls.ca` (`quiver certs init --client NAME`).
    pub allow_anonymous_admin: bool,
    pub fetch_wait_ms_max: u32,
}

impl Default for BrokerSection {
    fn default() -> Self {
        BrokerSection {
            node_id: 1,
            data_dir: PathBuf::from("quiver-data"),
            listen: "127.0.0.1:7878".into(),
            advertised_address: None,
            frame_bytes_max: quiver_protocol::frame::FRAME_BYTES_MAX_DEFAULT,
            request_bytes_in_flight_max: quiver_broker::REQUEST_BYTES_IN_FLIGHT_MAX_DEFAULT,
            request_read_timeout_ms: 30_000,
            allow_anonymous_admin: false,
            fetch_wait_ms_max: 30_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSection {
    /// Background fsync interval; 0 leaves flushing to the OS (acks=all
    /// still fsyncs before it answers).
    pub flush_interval_ms: u64,
    pub retention_check_interval_ms: u64,
    /// Log cleaner threads for compacted topics; 0: only `topic compact`.
    pub cleaner_threads: usize,
    /// Memory of the cleaners' key maps, all threads together.
    pub cleaner_dedupe_buffer_bytes: usize,
    /// Bytes per second the cleaners read together; 0: unthrottled.
    pub cleaner_io_bytes_per_second: u64,
    /// How often an idle cleaner looks for a log to clean.
    pub cleaner_backoff_ms: u64,
}

impl Default for StorageSection {
    fn default() -> Self {
        let cleaner = quiver_broker::CleanerConfig::default();
        StorageSection {
            flush_interval_ms: 1_000,
            retention_check_interval_ms: 60_000,
            cleaner_threads: cleaner.threads,
            cleaner_dedupe_buffer_bytes: cleaner.dedupe_buffer_bytes,
            cleaner_io_bytes_per_second: 0,
            cleaner_backoff_ms: cleaner.backoff_ms,
        }
    }
}

/// Limits of WebAssembly plugins.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsSection {
    /// Linear memory one plugin instance may grow to.
    pub memory_max_bytes: usize,
    /// Wall-clock time one batch call may take.
    pub call_deadline_ms: u64,
    /// Plugin instances alive at once on this broker.
    pub instances_max: u32,
    /// Keys and values one stateful transform may keep per input partition
    /// (in the broker's memory; a `put` past it fails).
    pub state_max_bytes: usize,
}

impl Default for PluginsSection {
    fn default() -> Self {
        let host = quiver_broker::PluginHostConfig::default();
        PluginsSection {
            memory_max_bytes: host.memory_max_bytes,
            call_deadline_ms: host.call_deadline.as_millis() as u64,
            instances_max: host.instances_max,
            state_max_bytes: host.state_max_bytes,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// PEM certificate chain of this broker. With neither cert nor key, a
    /// development CA and certificate are created in `<data_dir>/tls`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The cluster CA (`quiver certs init`): other brokers' certificates
    /// must chain to it. Required in a cluster.
    pub ca: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// The metadata quorum's voters, `1@host:port,2@host:port,3@host:port`.
    /// Empty: a single node without a quorum.
    pub controllers: String,
    /// This node's rack (replicas of a partition go to different racks).
    pub rack: Option<String>,
    /// A broker silent this long is fenced and its partitions move.
    pub session_timeout_ms: u64,
    pub heartbeat_interval_ms: u64,
    /// A follower that has not caught up with its leader for this long
    /// leaves the ISR (Kafka's `replica.lag.time.max.ms`).
    pub replica_lag_time_max_ms: u64,
    /// How often the controller moves leaderships back to preferred
    /// replicas that are live and in sync; 0 = only on `cluster rebalance`.
    pub leader_rebalance_interval_ms: u64,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            controllers: String::new(),
            rack: None,
            session_timeout_ms: 1500,
            heartbeat_interval_ms: 200,
            replica_lag_time_max_ms: 10_000,
            leader_rebalance_interval_ms: 30_000,
        }
    }
}

/// Consumer groups coordinated by this broker.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GroupsSection {
    /// A member not heard from for this long is fenced and its partitions
    /// go to the others (Kafka's `group.consumer.session.timeout.ms`).
    pub session_timeout_ms: u64,
    /// How often members heartbeat.
    pub heartbeat_interval_ms: u64,
    /// How long a member may keep partitions it was asked to give up.
    pub rebalance_timeout_ms: u64,
    /// `uniform` (sticky, balanced) or `range`.
    pub assignor: String,
    /// Partitions of `__consumer_offsets`, when the first group request
    /// creates it.
    pub offsets_topic_partitions: u32,
    /// Its replication factor; 0: three, or every broker when fewer.
    pub offsets_topic_replication_factor: u16,
    /// Share groups: how long a member may hold a record before it is
    /// offered again (Kafka's `group.share.record.lock.duration.ms`).
    pub share_lock_timeout_ms: u64,
    /// Share groups: deliveries of a record before it goes to the
    /// dead-letter topic (Kafka's `group.share.delivery.count.limit`).
    pub share_delivery_attempts: u32,
    /// Share groups: records in flight per partition (Kafka's
    /// `group.share.partition.max.record.locks`).
    pub share_max_in_flight: u64,
    /// Share groups: where a partition the group never read starts,
    /// `latest` or `earliest`.
    pub share_auto_offset_reset: String,
}

impl Default for GroupsSection {
    fn default() -> Self {
        let g = quiver_groups::GroupConfig::default();
        GroupsSection {
            session_timeout_ms: g.session_timeout_ms,
            heartbeat_interval_ms: g.heartbeat_interval_ms,
            rebalance_timeout_ms: g.rebalance_timeout_ms,
            assignor: g.assignor.name().to_owned(),
            offsets_topic_partitions: 50,
            offsets_topic_replication_factor: 0,
            share_lock_timeout_ms: g.share.lock_timeout_ms,
            share_delivery_attempts: g.share.max_delivery_attempts,
            share_max_in_flight: g.share.max_in_flight,
            share_auto_offset_reset: "latest".to_owned(),
        }
    }
}

/// Transactions coordinated by this broker.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransactionsSection {
    /// Partitions of `__transaction_state`, when the first transactional
    /// producer creates it (Kafka's `transaction.state.log.num.partitions`).
    pub state_topic_partitions: u32,
    /// Its replication factor; 0: three, or every broker when fewer.
    pub state_topic_replication_factor: u16,
    /// The largest transaction timeout a producer may ask for (Kafka's
    /// `transaction.max.timeout.ms`, 15 minutes).
    pub timeout_max_ms: u64,
    /// An idle transactional id is forgotten after this long (Kafka's
    /// `transactional.id.expiration.ms`, 7 days).
    pub id_expiration_ms: u64,
}

impl Default for TransactionsSection {
    fn default() -> Self {
        let t = quiver_broker::TransactionsConfig::default();
        TransactionsSection {
            state_topic_partitions: t.state_topic_partitions,
            state_topic_replication_factor: t.state_topic_replication_factor,
            timeout_max_ms: t.limits.timeout_max_ms,
            id_expiration_ms: t.limits.id_expiration_ms,
        }
    }
}

/// A validated cluster membership.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub voters: BTreeMap<u32, String>,
    pub ca: PathBuf,
    pub rack: Option<String>,
    pub session_timeout_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub leader_rebalance_interval_ms: u64,
}

/// A validated node configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub broker: BrokerConfig,
    pub listen: SocketAddr,
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Clients may present a certificate signed by this CA (`tls.ca`); its
    /// subject is their principal.
    pub client_ca: Option<PathBuf>,
    pub cluster: Option<ClusterSettings>,
}

impl FileConfig {
    /// Reads `path` (if any) and applies `QUIVER_SECTION__KEY` variables.
    pub fn load(path: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> anyhow::Result<FileConfig> {
        let mut table = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("reading config {}", p.display()))?;
                text.parse::<toml::Table>().with_context(|| format!("parsing config {}", p.display()))?
            }
            None => toml::Table::new(),
        };
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("QUIVER_") else {
                continue;
            };
            let Some((section, key)) = rest.split_once("__") else {
                continue;
            };
            let section = section.to_ascii_lowercase();
            let key = key.to_ascii_lowercase();
            let entry = table.entry(section.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let toml::Value::Table(section_table) = entry else {
                bail!("{name}: [{section}] is not a section");
            };
            section_table.insert(key, env_value(&value));
        }
        let config: FileConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| anyhow::anyhow!("invalid configuration: {}", e.message()))?;
        Ok(config)
    }

    pub fn validate(self) -> anyhow::Result<NodeConfig> {
        let listen: SocketAddr =
            self.broker.listen.parse().with_context(|| {
                format!("broker.listen '{}' is not an address like 127.0.0.1:7878", self.broker.listen)
            })?;
        let overrides: Vec<(String, String)> = self
            .topic_defaults
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_string)))
            .collect();
        let topic_defaults = TopicConfig::default()
            .with_overrides(overrides.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .map_err(|e| anyhow::anyhow!("topic_defaults: {e}"))?;
        let tls = match (self.tls.cert, self.tls.key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => bail!("tls.cert and tls.key go together: give both, or neither for development certificates"),
        };
        if self.broker.frame_bytes_max < 1024 {
            bail!("broker.frame_bytes_max must be at least 1024");
        }
        if self.broker.request_bytes_in_flight_max < self.broker.frame_bytes_max {
            bail!(
                "broker.request_bytes_in_flight_max ({}) must be at least broker.frame_bytes_max ({}): the largest \
                 request must fit",
                self.broker.request_bytes_in_flight_max,
                self.broker.frame_bytes_max
            );
        }
        if self.broker.request_read_timeout_ms == 0 {
            bail!("broker.request_read_timeout_ms must be above 0");
        }
        let cluster = if self.cluster.controllers.trim().is_empty() {
            None
        } else {
            let voters = crate::cluster::parse_controllers(&self.cluster.controllers)?;
            let (Some(ca), Some(_)) = (self.tls.ca.clone(), tls.as_ref()) else {
                bail!(
                    "a cluster node needs tls.cert, tls.key and tls.ca (flags --cert, --key, --ca): make them with \
                     `quiver certs init --dir certs --nodes 1,2,3`"
                );
            };
            if self.cluster.heartbeat_interval_ms == 0
                || self.cluster.session_timeout_ms <= self.cluster.heartbeat_interval_ms
            {
                bail!("cluster.session_timeout_ms must be larger than cluster.heartbeat_interval_ms (> 0)");
            }
            Some(ClusterSettings {
                voters,
                ca,
                rack: self.cluster.rack.filter(|r| !r.is_empty()),
                session_timeout_ms: self.cluster.session_timeout_ms,
                heartbeat_interval_ms: self.cluster.heartbeat_interval_ms,
                leader_rebalance_interval_ms: self.cluster.leader_rebalance_interval_ms,
            })
        };
        let mut broker = BrokerConfig::new(self.broker.data_dir);
        broker.node_id = self.broker.node_id;
        broker.advertised_address = self.broker.advertised_address.unwrap_or_else(|| listen.to_string());
        broker.frame_bytes_max = self.broker.frame_bytes_max;
        broker.request_bytes_in_flight_max = self.broker.request_bytes_in_flight_max;
        broker.request_read_timeout_ms = self.broker.request_read_timeout_ms;
        broker.allow_anonymous_admin = self.broker.allow_anonymous_admin;
        broker.fetch_wait_ms_max = self.broker.fetch_wait_ms_max;
        broker.flush_interval_ms = (self.storage.flush_interval_ms > 0).then_some(self.storage.flush_interval_ms);
        broker.retention_check_interval_ms = self.storage.retention_check_interval_ms.max(10);
        broker.cleaner = quiver_broker::CleanerConfig {
            threads: self.storage.cleaner_threads,
            // At least a few thousand keys per pass.
            dedupe_buffer_bytes: self.storage.cleaner_dedupe_buffer_bytes.max(1 << 20),
            io_bytes_per_second: (self.storage.cleaner_io_bytes_per_second > 0)
                .then_some(self.storage.cleaner_io_bytes_per_second),
            backoff_ms: self.storage.cleaner_backoff_ms.max(10),
        };
        broker.topic_defaults = topic_defaults;
        let plugins = &self.plugins;
        if plugins.memory_max_bytes < (1 << 20) || plugins.call_deadline_ms == 0 || plugins.instances_max == 0 {
            bail!("plugins: memory_max_bytes must be at least 1 MiB, call_deadline_ms and instances_max at least 1");
        }
        broker.plugins.memory_max_bytes = plugins.memory_max_bytes;
        broker.plugins.call_deadline = std::time::Duration::from_millis(plugins.call_deadline_ms);
        broker.plugins.instances_max = plugins.instances_max;
        broker.plugins.state_max_bytes = plugins.state_max_bytes;
        broker.replica_lag_time_max_ms = self.cluster.replica_lag_time_max_ms.max(1);
        let groups = &self.groups;
        if groups.heartbeat_interval_ms == 0 || groups.session_timeout_ms <= groups.heartbeat_interval_ms {
            bail!("groups.session_timeout_ms must be larger than groups.heartbeat_interval_ms (> 0)");
        }
        if groups.offsets_topic_partitions == 0 {
            bail!("groups.offsets_topic_partitions must be at least 1");
        }
        broker.group_defaults = quiver_groups::GroupConfig {
            session_timeout_ms: groups.session_timeout_ms,
            heartbeat_interval_ms: groups.heartbeat_interval_ms,
            rebalance_timeout_ms: groups.rebalance_timeout_ms.max(1),
            assignor: quiver_groups::Assignor::parse(&groups.assignor)
                .map_err(|e| anyhow::anyhow!("groups.assignor: {e}"))?,
            share: quiver_groups::share::ShareConfig {
                lock_timeout_ms: groups.share_lock_timeout_ms.max(1),
                max_delivery_attempts: groups.share_delivery_attempts.max(1),
                max_in_flight: groups.share_max_in_flight.max(1),
            },
            share_reset: match groups.share_auto_offset_reset.as_str() {
                "latest" => quiver_groups::share::ShareReset::Latest,
                "earliest" => quiver_groups::share::ShareReset::Earliest,
                other => bail!("groups.share_auto_offset_reset: '{other}' is neither latest nor earliest"),
            },
        };
        broker.offsets_topic_partitions = groups.offsets_topic_partitions;
        broker.offsets_topic_replication_factor = groups.offsets_topic_replication_factor;
        let txns = &self.transactions;
        if txns.state_topic_partitions == 0 {
            bail!("transactions.state_topic_partitions must be at least 1");
        }
        if txns.timeout_max_ms == 0 {
            bail!("transactions.timeout_max_ms must be at least 1");
        }
        broker.transactions = quiver_broker::TransactionsConfig {
            state_topic_partitions: txns.state_topic_partitions,
            state_topic_replication_factor: txns.state_topic_replication_factor,
            limits: quiver_transactions::TxnConfig {
                timeout_max_ms: txns.timeout_max_ms,
                id_expiration_ms: txns.id_expiration_ms.max(1),
            },
        };
        let client_ca = self.tls.ca.clone();
        Ok(NodeConfig { broker, listen, tls, client_ca, cluster })
    }
}

/// Environment values are typed the way TOML would read them: integers and
/// booleans as such, anything else as a string.
fn env_value(raw: &str) -> toml::Value {
    if let Ok(i) = raw.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    match raw {
        "true" => toml::Value::Boolean(true),
        "false" => toml::Value::Boolean(false),
        _ => toml::Value::String(raw.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_env_and_validation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("quiver.toml");
        std::fs::write(
            &path,
            "[broker]\nnode_id = 3\nlisten = \"127.0.0.1:9000\"\n[topic_defaults]\n\"retention.ms\" = \"1000\"\n",
        )
        .unwrap();
        let env = vec![
            ("QUIVER_BROKER__NODE_ID".to_string(), "7".to_string()),
            ("QUIVER_STORAGE__FLUSH_INTERVAL_MS".to_string(), "0".to_string()),
            ("QUIVER_BROKERS".to_string(), "ignored".to_string()),
        ];
        let node = FileConfig::load(Some(&path), env).unwrap().validate().unwrap();
        assert_eq!(node.broker.node_id, 7);
        assert_eq!(node.broker.flush_interval_ms, None);
        assert_eq!(node.broker.topic_defaults.retention_ms, Some(1000));
        assert_eq!(node.listen.port(), 9000);
    }

    #[test]
    fn unknown_keys_are_errors() {
        let env = vec![("QUIVER_BROKER__NODEID".to_string(), "7".to_string())];
        let err = FileConfig::load(None, env).unwrap_err().to_string();
        assert!(err.contains("nodeid"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.toml");
        std::fs::write(&path, "[topic_defaults]\n\"retention.weeks\" = 1\n").unwrap();
        let err = FileConfig::load(Some(&path), vec![]).unwrap().validate().unwrap_err().to_string();
        assert!(err.contains("retention.weeks"), "{err}");
    }

    #[test]
    fn the_readme_example_is_valid() {
        let readme = include_str!("../../../README.md");
        let start = readme.find("```toml\n[broker]").expect("README has the config example") + "```toml\n".len();
        let example = &readme[start..start + readme[start..].find("```").unwrap()];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("quiver.toml");
        std::fs::write(&path, example).unwrap();
        let node = FileConfig::load(Some(&path), vec![]).unwrap().validate().unwrap();
        assert_eq!(node.broker.group_defaults.session_timeout_ms, 45_000);
        assert_eq!(node.broker.offsets_topic_partitions, 50);
        let bad = vec![("QUIVER_GROUPS__ASSIGNOR".to_string(), "roundrobin".to_string())];
        let err = FileConfig::load(Some(&path), bad).unwrap().validate().unwrap_err().to_string();
        assert!(err.contains("groups.assignor"), "{err}");
    }
}
