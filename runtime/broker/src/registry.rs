//! The plugins a broker has loaded: its local registry
//! (`<data_dir>/plugins/`, what it loaded from the metadata image), the
//! deployments' settings, and the engine that runs them. Transforms and the
//! request path's plugins are `plugins.rs`; following the image is
//! `plugin_sync.rs`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use quiver_plugin_host::{BUILTIN_PREFIX, HostConfig, Instance, Kind, Monitor, Plugin, PluginHost};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use quiver_controller::Blob;

use crate::errors::PluginAdminError;
use crate::files::write_atomic;
use crate::topic::TopicConfig;

pub(crate) const REGISTRY_FILE: &str = "registry.json";

/// What a transform promises about its outputs. New deployments are
/// exactly-once unless they ask otherwise; a stored deployment without one
/// (from before transactions) stays at-least-once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Guarantee {
    /// A step's outputs may be written again after a failure or failover.
    #[default]
    AtLeastOnce,
    /// Each step's outputs, state changes and progress are one transaction:
    /// read_committed consumers of the outputs see each input's outputs
    /// once.
    ExactlyOnce,
}

impl Guarantee {
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        match s {
            "at-least-once" => Ok(Guarantee::AtLeastOnce),
            "" | "exactly-once" => Ok(Guarantee::ExactlyOnce),
            other => Err(format!("--guarantee '{other}': expected at-least-once or exactly-once")),
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Guarantee::AtLeastOnce => "at-least-once",
            Guarantee::ExactlyOnce => "exactly-once",
        }
    }
}

/// What happens to a record a transform refuses (or a batch it fails on).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnError {
    /// Pause the transform and report; resuming retries the record.
    Fail,
    /// Log it and go on.
    Skip,
    /// Write it to this topic with the error in a `quiver.error` header.
    DeadLetter(String),
}

impl OnError {
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        match s {
            "" | "fail" => Ok(OnError::Fail),
            "skip" => Ok(OnError::Skip),
            _ => match s.strip_prefix("dead-letter=") {
                Some(topic) if !topic.is_empty() => Ok(OnError::DeadLetter(topic.to_owned())),
                _ => Err(format!("--on-error '{s}': expected fail, skip or dead-letter=TOPIC")),
            },
        }
    }

    pub(crate) fn name(&self) -> String {
        match self {
            OnError::Fail => "fail".into(),
            OnError::Skip => "skip".into(),
            OnError::DeadLetter(t) => format!("dead-letter={t}"),
        }
    }
}

/// Where a transform starts when it has no stored progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StartAt {
    Start,
    End,
    Offset(i64),
    Timestamp(i64),
}

impl StartAt {
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("--start '{s}': expected start, end, offset:N or @UNIX_MS");
        match s {
            "" | "start" => Ok(StartAt::Start),
            "end" => Ok(StartAt::End),
            _ => {
                if let Some(n) = s.strip_prefix("offset:") {
                    n.parse().map(StartAt::Offset).map_err(|_| bad())
                } else if let Some(ms) = s.strip_prefix('@') {
                    ms.parse().map(StartAt::Timestamp).map_err(|_| bad())
                } else {
                    Err(bad())
                }
            }
        }
    }
}

/// One deployment as stored in the registry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Deployment {
    pub name: String,
    pub version: u32,
    pub kind: Kind,
    pub sha256: String,
    pub abi_version: String,
    pub size_bytes: u64,
    pub deployed_ms: i64,
    pub params: Vec<(String, String)>,
    pub input: String,
    pub outputs: Vec<String>,
    pub on_error: OnError,
    pub start: StartAt,
    /// Why the transform is paused (by a user or by its policy); none = running.
    pub paused: Option<String>,
    /// Transforms: at-least-once (deployments from before transactions) or
    /// exactly-once.
    #[serde(default)]
    pub guarantee: Guarantee,
}

impl Deployment {
    /// A transform that keeps a changelog (`<name>-state`): a stateful one,
    /// or an exactly-once one (its progress commits with its outputs).
    pub(crate) fn keeps_changelog(&self, plugin: &Plugin) -> bool {
        self.kind == Kind::Transform && (plugin.uses_state() || self.guarantee == Guarantee::ExactlyOnce)
    }
}

#[derive(Serialize, Deserialize, Default)]
pub(crate) struct RegistryFile {
    pub(crate) plugins: Vec<Deployment>,
}

/// A deployment that is loaded and (for transforms) running.
pub(crate) struct Deployed {
    pub(crate) deployment: RwLock<Deployment>,
    pub(crate) plugin: Arc<Plugin>,
    pub(crate) monitor: Arc<Monitor>,
    /// Next input offset per input partition (transforms).
    pub(crate) progress: Mutex<BTreeMap<u32, i64>>,
    /// Running or paused; dropping the sender stops the tasks.
    pub(crate) run: watch::Sender<bool>,
    /// A transform's task per input partition held here.
    pub(crate) tasks: Mutex<BTreeMap<u32, tokio::task::JoinHandle<()>>>,
    /// In a cluster: when progress was last committed to the metadata log,
    /// and what.
    pub(crate) committed: Mutex<(Option<Instant>, BTreeMap<u32, i64>)>,
    /// Idle instances for request-path kinds (serializer, filter), by params.
    pub(crate) pool: Mutex<HashMap<Params, Vec<Instance>>>,
    /// A stateful transform's store per input partition whose task runs
    /// here (for describing it).
    pub(crate) stores: Mutex<BTreeMap<u32, quiver_plugin_host::SharedState>>,
}

/// A deployment's parameters, as given.
type Params = Vec<(String, String)>;

impl Deployed {
    /// Runs `f` on an idle instance started with `params` (or a new one),
    /// and keeps the instance for the next call if it is still usable.
    pub(crate) fn with_instance<R>(
        &self,
        params: &[(String, String)],
        f: impl FnOnce(&mut Instance) -> R,
    ) -> Result<R, quiver_plugin_host::PluginError> {
        let idle = self.pool.lock().expect("pool lock").get_mut(params).and_then(Vec::pop);
        let mut instance = match idle {
            Some(i) => i,
            None => self.plugin.instantiate(params, &[], self.monitor.clone())?,
        };
        let result = f(&mut instance);
        if instance.is_usable() {
            let mut pool = self.pool.lock().expect("pool lock");
            let idle = pool.entry(params.to_vec()).or_default();
            if idle.len() < 8 {
                idle.push(instance);
            }
        }
        Ok(result)
    }
}

/// The plugin registry and engine of one broker.
pub(crate) struct Plugins {
    pub(crate) host: PluginHost,
    pub(crate) dir: PathBuf,
    pub(crate) deployed: RwLock<HashMap<String, Arc<Deployed>>>,
    pub(crate) admin: tokio::sync::Mutex<()>,
}

pub(crate) fn invalid(message: impl std::fmt::Display) -> PluginAdminError {
    PluginAdminError::Invalid(message.to_string())
}

pub(crate) fn unknown(name: &str) -> PluginAdminError {
    PluginAdminError::NotDeployed { name: name.to_owned() }
}

impl Plugins {
    /// Opens `<data_dir>/plugins` and loads every deployment (tasks are
    /// started by [`Broker::start_plugins`]).
    pub(crate) fn open(data_dir: &Path, mut config: HostConfig) -> Result<Plugins, String> {
        let dir = data_dir.join("plugins");
        for sub in ["blobs", "cache", "progress"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(|e| format!("{}: {e}", dir.join(sub).display()))?;
        }
        config.cache_dir = Some(dir.join("cache"));
        let host = PluginHost::new(config).map_err(|e| e.to_string())?;
        let plugins = Plugins { host, dir, deployed: RwLock::new(HashMap::new()), admin: tokio::sync::Mutex::new(()) };
        let registry = RegistryFile::read(&plugins.dir)?;
        for deployment in registry.plugins {
            let plugin = match deployment.sha256.strip_prefix(BUILTIN_PREFIX) {
                Some(builtin) => plugins.host.builtin(builtin),
                None => {
                    let wasm = std::fs::read(plugins.blob_path(&deployment.sha256))
                        .map_err(|e| format!("plugin '{}': its component is missing: {e}", deployment.name))?;
                    plugins.host.load(&wasm)
                }
            };
            let plugin = plugin.map_err(|e| format!("plugin '{}': {e}", deployment.name))?;
            let progress = plugins.read_progress(&deployment.name);
            let name = deployment.name.clone();
            let deployed = Self::deployed(deployment, plugin, Arc::new(Monitor::default()), progress);
            plugins.deployed.write().expect("deployed lock").insert(name, deployed);
        }
        Ok(plugins)
    }

    pub(crate) fn deployed(
        deployment: Deployment,
        plugin: Arc<Plugin>,
        monitor: Arc<Monitor>,
        progress: BTreeMap<u32, i64>,
    ) -> Arc<Deployed> {
        let running = deployment.paused.is_none();
        Arc::new(Deployed {
            deployment: RwLock::new(deployment),
            plugin,
            monitor,
            progress: Mutex::new(progress),
            run: watch::channel(running).0,
            tasks: Mutex::new(BTreeMap::new()),
            committed: Mutex::new((None, BTreeMap::new())),
            pool: Mutex::new(HashMap::new()),
            stores: Mutex::new(BTreeMap::new()),
        })
    }

    pub(crate) fn blob_path(&self, sha256: &str) -> PathBuf {
        blob_path(&self.dir, sha256)
    }

    pub(crate) fn progress_path(&self, name: &str) -> PathBuf {
        progress_path(&self.dir, name)
    }

    pub(crate) fn read_progress(&self, name: &str) -> BTreeMap<u32, i64> {
        std::fs::read(self.progress_path(name))
            .ok()
            .and_then(|raw| serde_json::from_slice(&raw).ok())
            .unwrap_or_default()
    }

    pub(crate) fn get(&self, name: &str) -> Option<Arc<Deployed>> {
        self.deployed.read().expect("deployed lock").get(name).cloned()
    }

    pub(crate) fn write_registry(&self) -> std::io::Result<()> {
        let mut plugins: Vec<Deployment> = self
            .deployed
            .read()
            .expect("deployed lock")
            .values()
            .map(|d| d.deployment.read().expect("deployment lock").clone())
            .collect();
        plugins.sort_by(|a, b| a.name.cmp(&b.name));
        RegistryFile { plugins }.write(&self.dir)
    }
}

/// A component's file in the blob store under `dir` (`<data_dir>/plugins`).
pub(crate) fn blob_path(dir: &Path, sha256: &str) -> PathBuf {
    dir.join("blobs").join(format!("{sha256}.wasm"))
}

/// A transform's stored progress under `dir` (`<data_dir>/plugins`).
pub(crate) fn progress_path(dir: &Path, name: &str) -> PathBuf {
    dir.join("progress").join(format!("{name}.json"))
}

impl RegistryFile {
    /// The registry under `dir` (`<data_dir>/plugins`); empty if none was
    /// written yet.
    pub(crate) fn read(dir: &Path) -> Result<RegistryFile, String> {
        let path = dir.join(REGISTRY_FILE);
        match std::fs::read(&path) {
            Ok(raw) => serde_json::from_slice(&raw).map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RegistryFile::default()),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Replaces the registry under `dir` atomically.
    pub(crate) fn write(&self, dir: &Path) -> std::io::Result<()> {
        let body = serde_json::to_vec_pretty(self).expect("registry serialises");
        write_atomic(&dir.join(REGISTRY_FILE), &body)
    }
}

/// A component as the metadata log carries it (zstd-compressed).
pub(crate) fn pack_blob(wasm: &[u8]) -> Result<Blob, String> {
    zstd::bulk::compress(wasm, BLOB_LEVEL)
        .map(|packed| Blob(packed.into()))
        .map_err(|e| format!("cannot compress the component: {e}"))
}

/// zstd level for components in the metadata log.
const BLOB_LEVEL: i32 = 3;

/// What a request-path plugin does to a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BatchMode {
    /// Value serializer on produce: one output per record; a refusal
    /// rejects all.
    Encode,
    /// Value serializer on fetch.
    Decode,
    /// Key serializer on produce: the plugin sees each record's key as its
    /// value (same ABI), and its output value becomes the key.
    EncodeKeys,
    /// Key serializer on fetch.
    DecodeKeys,
    /// Read-side filter: at most one output per record.
    Filter,
}

/// A topic's serializers in the order they run, keys first, with the mode
/// for produce (`encode`) or fetch.
pub(crate) fn serializers(config: &TopicConfig, encode: bool) -> Vec<(&str, BatchMode)> {
    let (keys, values) =
        if encode { (BatchMode::EncodeKeys, BatchMode::Encode) } else { (BatchMode::DecodeKeys, BatchMode::Decode) };
    [(config.key_serializer.as_deref(), keys), (config.value_serializer.as_deref(), values)]
        .into_iter()
        .filter_map(|(name, mode)| Some((name?, mode)))
        .collect()
}

impl BatchMode {
    pub(crate) fn on_keys(self) -> bool {
        matches!(self, BatchMode::EncodeKeys | BatchMode::DecodeKeys)
    }

    pub(crate) fn what(self) -> &'static str {
        match self {
            BatchMode::Filter => "filter",
            BatchMode::EncodeKeys | BatchMode::DecodeKeys => "key serializer",
            BatchMode::Encode | BatchMode::Decode => "serializer",
        }
    }
}
