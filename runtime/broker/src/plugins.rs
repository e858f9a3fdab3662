//! Deployed plugins: the registry on disk, and the transforms that run on
//! this node.
//!
//! Layout under `<data_dir>/plugins/`:
//! - `registry.json`: every deployment (name, version, kind, hash, params,
//!   transform settings, paused or not), replaced atomically;
//! - `blobs/<sha256>.wasm`: the components, content-addressed;
//! - `cache/`: compiled components (by content hash and engine);
//! - `progress/<name>.json`: per input partition, the next input offset a
//!   transform will process. Written after the outputs of everything before
//!   it are appended and fsynced: a restart resumes there, so no input is
//!   lost (at-least-once: a crash between the two repeats some outputs).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use quiver_plugin_host::{
    BUILTIN_PREFIX, CallError, Entry, HostConfig, Input, Instance, Kind, Monitor, Plugin, PluginHost,
};
use quiver_protocol::batch::{self, BatchBuilder, Batches, Compression, Header, Record};
use quiver_protocol::messages::{
    PluginDeployRequest, PluginFetchResponse, PluginInfo, PluginListResponse, PluginLogLine, PluginPartitionProgress,
};
use quiver_protocol::partitioner::partition_for_key;
use quiver_protocol::{ErrorCode, WireError};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::broker::{Broker, Topic, corrupt, now_ms, storage_error, write_atomic};
use crate::topic::{TopicCompression, TopicConfig};

const REGISTRY_FILE: &str = "registry.json";
/// Input read per transform step, at most.
const READ_BYTES_MAX: usize = 1 << 20;

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
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "" | "fail" => Ok(OnError::Fail),
            "skip" => Ok(OnError::Skip),
            _ => match s.strip_prefix("dead-letter=") {
                Some(topic) if !topic.is_empty() => Ok(OnError::DeadLetter(topic.to_owned())),
                _ => Err(format!("--on-error '{s}': expected fail, skip or dead-letter=TOPIC")),
            },
        }
    }

    fn name(&self) -> String {
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
    fn parse(s: &str) -> Result<Self, String> {
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
}

#[derive(Serialize, Deserialize, Default)]
struct RegistryFile {
    plugins: Vec<Deployment>,
}

/// A deployment that is loaded and (for transforms) running.
pub(crate) struct Deployed {
    pub(crate) deployment: RwLock<Deployment>,
    pub(crate) plugin: Arc<Plugin>,
    pub(crate) monitor: Arc<Monitor>,
    /// Next input offset per input partition (transforms).
    progress: Mutex<BTreeMap<u32, i64>>,
    /// Running or paused; dropping the sender stops the tasks.
    run: watch::Sender<bool>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Idle instances for request-path kinds (serializer, filter), by params.
    pool: Mutex<HashMap<Vec<(String, String)>, Vec<Instance>>>,
}

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
    host: PluginHost,
    dir: PathBuf,
    deployed: RwLock<HashMap<String, Arc<Deployed>>>,
    admin: tokio::sync::Mutex<()>,
}

fn invalid(message: impl std::fmt::Display) -> WireError {
    WireError::new(ErrorCode::InvalidPlugin, message.to_string())
}

fn unknown(name: &str) -> WireError {
    WireError::new(ErrorCode::UnknownPlugin, format!("plugin '{name}' is not deployed"))
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
        let registry_path = plugins.dir.join(REGISTRY_FILE);
        let registry: RegistryFile = match std::fs::read(&registry_path) {
            Ok(raw) => serde_json::from_slice(&raw).map_err(|e| format!("{}: {e}", registry_path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => RegistryFile::default(),
            Err(e) => return Err(format!("{}: {e}", registry_path.display())),
        };
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

    fn deployed(
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
            tasks: Mutex::new(Vec::new()),
            pool: Mutex::new(HashMap::new()),
        })
    }

    fn blob_path(&self, sha256: &str) -> PathBuf {
        self.dir.join("blobs").join(format!("{sha256}.wasm"))
    }

    fn progress_path(&self, name: &str) -> PathBuf {
        self.dir.join("progress").join(format!("{name}.json"))
    }

    fn read_progress(&self, name: &str) -> BTreeMap<u32, i64> {
        std::fs::read(self.progress_path(name))
            .ok()
            .and_then(|raw| serde_json::from_slice(&raw).ok())
            .unwrap_or_default()
    }

    pub(crate) fn get(&self, name: &str) -> Option<Arc<Deployed>> {
        self.deployed.read().expect("deployed lock").get(name).cloned()
    }

    fn write_registry(&self) -> std::io::Result<()> {
        let mut plugins: Vec<Deployment> = self
            .deployed
            .read()
            .expect("deployed lock")
            .values()
            .map(|d| d.deployment.read().expect("deployment lock").clone())
            .collect();
        plugins.sort_by(|a, b| a.name.cmp(&b.name));
        let body = serde_json::to_vec_pretty(&RegistryFile { plugins }).expect("registry serialises");
        write_atomic(&self.dir.join(REGISTRY_FILE), &body)
    }
}

impl Broker {
    /// Starts the tasks of every deployed transform (at open).
    pub fn start_plugins(self: &Arc<Self>) {
        let all: Vec<_> = self.plugins.deployed.read().expect("deployed lock").values().cloned().collect();
        for d in all {
            self.start_transform(&d);
        }
    }

    fn start_transform(self: &Arc<Self>, d: &Arc<Deployed>) {
        if d.plugin.kind() != Kind::Transform {
            return;
        }
        let input = d.deployment.read().expect("deployment lock").input.clone();
        let Some(topic) = self.topic(&input) else {
            d.monitor.log("error", format!("input topic '{input}' does not exist; the transform is idle"));
            return;
        };
        let mut tasks = d.tasks.lock().expect("tasks lock");
        for p in topic.local().map(|p| p.id).collect::<Vec<_>>() {
            let (broker, d2) = (self.clone(), d.clone());
            tasks.push(tokio::spawn(async move { broker.run_transform(d2, p).await }));
        }
    }

    /// Stops a deployment's tasks and waits for them (each finishes its
    /// current batch first).
    async fn stop_transform(&self, d: &Arc<Deployed>) {
        d.run.send_replace(false);
        let tasks: Vec<_> = d.tasks.lock().expect("tasks lock").drain(..).collect();
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
    }

    pub(crate) async fn deploy_plugin(
        self: &Arc<Self>,
        r: PluginDeployRequest,
    ) -> Result<(u32, String, String), WireError> {
        validate_plugin_name(&r.name).map_err(invalid)?;
        let kind: Kind = r.kind.parse().map_err(invalid)?;
        let on_error = OnError::parse(&r.on_error).map_err(invalid)?;
        let start = StartAt::parse(&r.start).map_err(invalid)?;
        let plugins = &self.plugins;
        let (broker, wasm, builtin) = (self.clone(), r.wasm.clone(), r.builtin.clone());
        let plugin = tokio::task::spawn_blocking(move || match builtin.as_str() {
            "" => broker.plugins.host.load(&wasm).map_err(invalid),
            name if wasm.is_empty() => broker
                .plugins
                .host
                .builtin(name)
                .map_err(|_| invalid(format!("there is no built-in plugin '{name}' (built in: identity)"))),
            _ => Err(invalid("give either a component or a built-in plugin name, not both")),
        })
        .await
        .map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))??;
        plugin.expect_kind(kind).map_err(invalid)?;
        let previous_kind = plugins.get(&r.name).map(|d| d.deployment.read().expect("deployment lock").kind);
        let users = self.topics_using(&r.name);
        if previous_kind.is_some_and(|k| k != kind) && !users.is_empty() {
            return Err(invalid(format!(
                "plugin '{}' is named by the config of topic(s) {}; a new version must stay a {}",
                r.name,
                users.join(", "),
                previous_kind.expect("checked")
            )));
        }
        if kind == Kind::Transform {
            self.check_transform_topics(&r.input, &r.outputs, &on_error)?;
        } else if !r.input.is_empty() || !r.outputs.is_empty() {
            return Err(invalid(format!("--input and --output are for transforms; this plugin is a {kind}")));
        }
        // Start one instance now: bad parameters are refused at deploy time.
        let monitor = plugins.get(&r.name).map(|d| d.monitor.clone()).unwrap_or_default();
        let (p2, params, outputs, m2) = (plugin.clone(), r.params.clone(), r.outputs.clone(), monitor.clone());
        tokio::task::spawn_blocking(move || p2.instantiate(&params, &outputs, m2).map(drop))
            .await
            .map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))?
            .map_err(invalid)?;

        let _guard = plugins.admin.lock().await;
        let blob = plugins.blob_path(plugin.sha256());
        if r.builtin.is_empty() && !blob.exists() {
            write_atomic(&blob, &r.wasm).map_err(storage_error)?;
        }
        let previous = plugins.get(&r.name);
        let (version, progress) = match &previous {
            Some(prev) => {
                self.stop_transform(prev).await;
                let same_input = prev.deployment.read().expect("deployment lock").input == r.input;
                let progress =
                    if same_input { prev.progress.lock().expect("progress lock").clone() } else { BTreeMap::new() };
                (prev.deployment.read().expect("deployment lock").version + 1, progress)
            }
            None => (1, BTreeMap::new()),
        };
        let deployment = Deployment {
            name: r.name.clone(),
            version,
            kind,
            sha256: plugin.sha256().to_owned(),
            abi_version: plugin.abi_version().to_owned(),
            size_bytes: r.wasm.len() as u64,
            deployed_ms: now_ms(),
            params: r.params,
            input: r.input,
            outputs: r.outputs,
            on_error,
            start,
            paused: None,
        };
        let sha = deployment.sha256.clone();
        let abi = deployment.abi_version.clone();
        if progress.is_empty() {
            let _ = std::fs::remove_file(plugins.progress_path(&r.name));
        }
        let deployed = Plugins::deployed(deployment, plugin, monitor, progress);
        plugins.deployed.write().expect("deployed lock").insert(r.name.clone(), deployed.clone());
        if let Err(e) = plugins.write_registry() {
            // Not durable: undo, so memory and disk agree.
            match previous {
                Some(prev) => plugins.deployed.write().expect("deployed lock").insert(r.name.clone(), prev),
                None => plugins.deployed.write().expect("deployed lock").remove(&r.name),
            };
            return Err(storage_error(e));
        }
        deployed.monitor.log("info", format!("version {version} deployed ({sha})"));
        self.start_transform(&deployed);
        tracing::info!(plugin = %r.name, version, %kind, "plugin deployed");
        Ok((version, sha, abi))
    }

    fn check_transform_topics(&self, input: &str, outputs: &[String], on_error: &OnError) -> Result<(), WireError> {
        if input.is_empty() || outputs.is_empty() {
            return Err(invalid("a transform needs --input TOPIC and at least one --output TOPIC"));
        }
        let dlq = match on_error {
            OnError::DeadLetter(t) => Some(t),
            _ => None,
        };
        for t in std::iter::once(&input.to_owned()).chain(outputs).chain(dlq) {
            if self.topic(t).is_none() {
                return Err(WireError::new(ErrorCode::UnknownTopic, format!("topic '{t}' does not exist")));
            }
        }
        if outputs.iter().any(|o| o == input) {
            return Err(invalid(format!("topic '{input}' cannot be both the input and an output")));
        }
        Ok(())
    }

    pub(crate) async fn control_plugin(
        &self,
        name: &str,
        action: quiver_protocol::messages::PluginAction,
    ) -> Result<(), WireError>
    where
        Self: Sized,
    {
        use quiver_protocol::messages::PluginAction;
        let plugins = &self.plugins;
        let _guard = plugins.admin.lock().await;
        let d = plugins.get(name).ok_or_else(|| unknown(name))?;
        match action {
            PluginAction::Pause | PluginAction::Resume => {
                let pause = action == PluginAction::Pause;
                d.deployment.write().expect("deployment lock").paused = pause.then(|| "paused by a user".to_owned());
                plugins.write_registry().map_err(storage_error)?;
                d.run.send_replace(!pause);
                d.monitor.log("info", if pause { "paused" } else { "resumed" });
            }
            PluginAction::Remove => {
                let users = self.topics_using(name);
                if !users.is_empty() {
                    return Err(invalid(format!(
                        "plugin '{name}' is named by the config of topic(s) {}; delete those topics first",
                        users.join(", ")
                    )));
                }
                self.stop_transform(&d).await;
                plugins.deployed.write().expect("deployed lock").remove(name);
                plugins.write_registry().map_err(storage_error)?;
                let _ = std::fs::remove_file(plugins.progress_path(name));
                let sha = d.deployment.read().expect("deployment lock").sha256.clone();
                let still_used = plugins
                    .deployed
                    .read()
                    .expect("deployed lock")
                    .values()
                    .any(|o| o.deployment.read().expect("deployment lock").sha256 == sha);
                if !still_used {
                    let _ = std::fs::remove_file(plugins.blob_path(&sha));
                }
                tracing::info!(plugin = name, "plugin removed");
            }
        }
        Ok(())
    }

    pub(crate) fn list_plugins(&self, names: Option<Vec<String>>) -> Result<PluginListResponse, WireError> {
        let all = self.plugins.deployed.read().expect("deployed lock");
        let mut chosen: Vec<Arc<Deployed>> = match names {
            None => all.values().cloned().collect(),
            Some(names) => {
                names.iter().map(|n| all.get(n).cloned().ok_or_else(|| unknown(n))).collect::<Result<_, _>>()?
            }
        };
        chosen.sort_by_key(|d| d.deployment.read().expect("deployment lock").name.clone());
        let plugins = chosen
            .iter()
            .map(|d| {
                let dep = d.deployment.read().expect("deployment lock").clone();
                let stats = d.monitor.stats();
                let progress = d
                    .progress
                    .lock()
                    .expect("progress lock")
                    .iter()
                    .map(|(p, next)| PluginPartitionProgress {
                        partition: *p,
                        next_offset: *next,
                        high_watermark: self
                            .partition(&dep.input, *p)
                            .map_or(-1, |(_, part)| part.log.log_end_offset()),
                    })
                    .collect();
                let (state, reason) = match &dep.paused {
                    None => ("running", String::new()),
                    Some(r) if r.starts_with("failed") => ("failed", r.clone()),
                    Some(r) => ("paused", r.clone()),
                };
                PluginInfo {
                    name: dep.name,
                    version: dep.version,
                    kind: dep.kind.to_string(),
                    sha256: dep.sha256,
                    abi_version: dep.abi_version,
                    size_bytes: dep.size_bytes,
                    deployed_ms: dep.deployed_ms,
                    params: dep.params,
                    input: dep.input,
                    outputs: dep.outputs,
                    on_error: if dep.kind == Kind::Transform { dep.on_error.name() } else { String::new() },
                    state: state.into(),
                    reason,
                    progress,
                    calls: stats.calls,
                    records_in: stats.records_in,
                    records_out: stats.records_out,
                    errors: stats.errors,
                    busy_ns: stats.busy_ns,
                }
            })
            .collect();
        Ok(PluginListResponse { plugins })
    }

    /// A deployed plugin's component and deployment, for a client that runs
    /// it locally (a topic's partitioner).
    pub(crate) fn fetch_plugin(&self, name: &str) -> Result<PluginFetchResponse, WireError> {
        let d = self.plugins.get(name).ok_or_else(|| unknown(name))?;
        let deployment = d.deployment.read().expect("deployment lock").clone();
        if deployment.sha256.starts_with(BUILTIN_PREFIX) {
            return Err(invalid(format!("plugin '{name}' is built into the broker; it has no component")));
        }
        let wasm = std::fs::read(self.plugins.blob_path(&deployment.sha256)).map_err(storage_error)?;
        Ok(PluginFetchResponse {
            name: deployment.name,
            version: deployment.version,
            kind: deployment.kind.name().to_string(),
            sha256: deployment.sha256,
            params: deployment.params,
            wasm: Bytes::from(wasm),
        })
    }

    pub(crate) fn plugin_logs(&self, name: &str, since: u64) -> Result<Vec<PluginLogLine>, WireError> {
        let d = self.plugins.get(name).ok_or_else(|| unknown(name))?;
        Ok(d.monitor
            .lines_since(since)
            .into_iter()
            .map(|l| PluginLogLine { seq: l.seq, timestamp_ms: l.timestamp_ms, level: l.level, message: l.message })
            .collect())
    }

    /// One input partition of a transform: read, call the plugin batch by
    /// batch, append the outputs, store progress; wait for more input.
    async fn run_transform(self: Arc<Self>, d: Arc<Deployed>, partition: u32) {
        let mut run = d.run.subscribe();
        let mut appended = self.appended.subscribe();
        let mut instance: Option<Instance> = None;
        loop {
            if self.shutting_down.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            if !*run.borrow_and_update() {
                if run.changed().await.is_err() {
                    return;
                }
                continue;
            }
            appended.borrow_and_update();
            let (broker, d2) = (self.clone(), d.clone());
            let mut inst = instance.take();
            let step = tokio::task::spawn_blocking(move || {
                let r = broker.transform_step(&d2, partition, &mut inst);
                (r, inst)
            })
            .await;
            let (result, inst) = match step {
                Ok(x) => x,
                Err(e) => (Err(format!("transform task failed: {e}")), None),
            };
            instance = inst;
            match result {
                Ok(true) => continue,
                Ok(false) => {
                    // Caught up: wait for an append or a pause.
                    tokio::select! {
                        changed = appended.changed() => if changed.is_err() { return },
                        changed = run.changed() => if changed.is_err() { return },
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                Err(reason) => {
                    // The policy said fail: pause the whole transform.
                    let reason = format!("failed: {reason}");
                    d.monitor.log("error", format!("{reason}; paused (resume retries from the stored progress)"));
                    d.deployment.write().expect("deployment lock").paused = Some(reason);
                    let _ = self.plugins.write_registry();
                    d.run.send_replace(false);
                }
            }
        }
    }

    /// Processes what is available (up to `READ_BYTES_MAX`). Ok(true) if it
    /// made progress, Ok(false) if caught up, Err when the policy is `fail`.
    fn transform_step(&self, d: &Deployed, partition: u32, instance: &mut Option<Instance>) -> Result<bool, String> {
        let dep = d.deployment.read().expect("deployment lock").clone();
        let (_, input) = self.partition(&dep.input, partition).map_err(|e| e.message)?;
        let next = {
            let progress = d.progress.lock().expect("progress lock");
            match progress.get(&partition) {
                Some(n) => *n,
                None => match dep.start {
                    StartAt::Start => input.log.log_start_offset(),
                    StartAt::End => input.log.log_end_offset(),
                    StartAt::Offset(n) => n.max(input.log.log_start_offset()),
                    StartAt::Timestamp(ts) => {
                        input.log.offset_for_timestamp(ts).ok().flatten().map_or(input.log.log_end_offset(), |(o, _)| o)
                    }
                },
            }
        };
        let next = next.max(input.log.log_start_offset());
        let hw = input.log.log_end_offset();
        if next >= hw {
            self.save_progress(d, &dep, partition, next, &[])?;
            return Ok(false);
        }
        let data = input.log.read(next, READ_BYTES_MAX, hw).map_err(|e| e.to_string())?;
        let mut cursor = next;
        let mut touched: Vec<Arc<crate::broker::Partition>> = Vec::new();
        for item in Batches::new(data) {
            let (header, batch) = item.map_err(|e| e.to_string())?;
            if header.next_offset() <= cursor {
                continue;
            }
            cursor = self.transform_batch(d, &dep, partition, &batch, cursor, instance, &mut touched)?;
        }
        self.save_progress(d, &dep, partition, cursor, &touched)?;
        Ok(cursor > next)
    }

    /// Runs one stored batch (from offset `from`) through the plugin and
    /// applies the outputs and the policy. Returns the next input offset.
    #[allow(clippy::too_many_arguments)]
    fn transform_batch(
        &self,
        d: &Deployed,
        dep: &Deployment,
        partition: u32,
        stored: &Bytes,
        from: i64,
        instance: &mut Option<Instance>,
        touched: &mut Vec<Arc<crate::broker::Partition>>,
    ) -> Result<i64, String> {
        let (header, body) = batch::records_section(stored).map_err(|e| e.to_string())?;
        let records = batch::decode_section(&header, &body).map_err(|e| e.to_string())?;
        let spans = batch::record_spans(&body).map_err(|e| e.to_string())?;
        let mut first = records.iter().position(|r| r.offset >= from).unwrap_or(records.len());
        while first < records.len() {
            let rest = &records[first..];
            let input = Input {
                base_offset: header.base_offset,
                base_timestamp: header.base_timestamp,
                count: rest.len() as u32,
                records: &body[spans[first].start..],
            };
            if instance.as_ref().is_none_or(|i| !i.is_usable()) {
                *instance = Some(
                    d.plugin
                        .instantiate(&dep.params, &dep.outputs, d.monitor.clone())
                        .map_err(|e| format!("cannot start the plugin: {e}"))?,
                );
            }
            let inst = instance.as_mut().expect("set above");
            let called = inst.transform(&input);
            let out = called.as_ref().map_err(Clone::clone).and_then(|out| {
                let entries = out.decode(input.count, dep.outputs.len() as u32)?;
                Ok((entries, out.refusal.clone()))
            });
            match out {
                Ok((entries, refusal)) => {
                    let produced = entries.len();
                    self.append_outputs(dep, partition, rest, &entries, touched)?;
                    inst.count_output(produced);
                    match refusal {
                        None => return Ok(header.next_offset()),
                        Some(r) => {
                            let bad =
                                rest.get(r.index as usize).ok_or("the plugin refused a record it was not given")?;
                            self.poison(d, dep, partition, std::slice::from_ref(bad), &r.message, touched)?;
                            first += r.index as usize + 1;
                        }
                    }
                }
                Err(e) => {
                    // The whole call failed: the policy applies to every
                    // record it was given.
                    self.poison(d, dep, partition, rest, &plugin_failure(&e), touched)?;
                    return Ok(header.next_offset());
                }
            }
        }
        Ok(header.next_offset())
    }

    /// Applies the poison-record policy to `records`.
    fn poison(
        &self,
        d: &Deployed,
        dep: &Deployment,
        partition: u32,
        records: &[Record],
        reason: &str,
        touched: &mut Vec<Arc<crate::broker::Partition>>,
    ) -> Result<(), String> {
        let first = records.first().map_or(-1, |r| r.offset);
        let what = if records.len() == 1 {
            format!("record {}-{partition}@{first}", dep.input)
        } else {
            format!("{} records from {}-{partition}@{first}", records.len(), dep.input)
        };
        match &dep.on_error {
            OnError::Fail => Err(format!("{what}: {reason}")),
            OnError::Skip => {
                d.monitor.log("warn", format!("skipped {what}: {reason}"));
                Ok(())
            }
            OnError::DeadLetter(topic) => {
                let t = self.topic(topic).ok_or_else(|| format!("dead-letter topic '{topic}' does not exist"))?;
                let p = partition % t.count();
                let mut b = BatchBuilder::new(Compression::None);
                for r in records {
                    let mut headers = r.headers.clone();
                    headers.push(Header { key: "quiver.error".into(), value: Some(Bytes::from(reason.to_owned())) });
                    let source = format!("{}/{partition}/{}", dep.input, r.offset);
                    headers.push(Header { key: "quiver.source".into(), value: Some(Bytes::from(source)) });
                    b.append(r.timestamp, r.key.as_deref(), r.value.as_deref(), &headers);
                }
                let part = t.held(p).ok_or_else(|| format!("partition {p} of '{topic}' is not on this broker"))?;
                part.log.append(&b.build(), 0).map_err(|e| e.to_string())?;
                touched.push(part);
                d.monitor.log("warn", format!("dead-lettered {what} to '{topic}': {reason}"));
                Ok(())
            }
        }
    }

    /// Appends a call's outputs: grouped by output partition, in order.
    fn append_outputs(
        &self,
        dep: &Deployment,
        input_partition: u32,
        inputs: &[Record],
        entries: &[Entry<'_>],
        touched: &mut Vec<Arc<crate::broker::Partition>>,
    ) -> Result<(), String> {
        let mut batches: BTreeMap<(u32, u32), BatchBuilder> = BTreeMap::new();
        let mut topics = Vec::with_capacity(dep.outputs.len());
        for name in &dep.outputs {
            topics.push(self.topic(name).ok_or_else(|| format!("output topic '{name}' does not exist"))?);
        }
        for entry in entries {
            let t = entry.topic();
            let topic = &topics[t as usize];
            let n = topic.count();
            let src = &inputs[entry.input() as usize];
            let codec = match topic.config.compression {
                TopicCompression::Codec(c) => c,
                TopicCompression::Producer => Compression::None,
            };
            match entry {
                Entry::Forward { .. } => {
                    let p = src.key.as_deref().map_or(input_partition % n, |k| partition_for_key(k, n));
                    let b = batches.entry((t, p)).or_insert_with(|| BatchBuilder::new(codec));
                    b.append(src.timestamp, src.key.as_deref(), src.value.as_deref(), &src.headers);
                }
                Entry::New { partition, key, value, headers, .. } => {
                    let p = match (partition, key) {
                        (Some(p), _) if *p < n => *p,
                        (Some(p), _) => {
                            return Err(format!(
                                "the plugin chose partition {p} of '{}', which has {n}",
                                dep.outputs[t as usize]
                            ));
                        }
                        (None, Some(k)) => partition_for_key(k, n),
                        (None, None) => input_partition % n,
                    };
                    let headers: Vec<Header> = headers
                        .iter()
                        .map(|(k, v)| Header { key: (*k).to_owned(), value: v.map(Bytes::copy_from_slice) })
                        .collect();
                    let b = batches.entry((t, p)).or_insert_with(|| BatchBuilder::new(codec));
                    b.append(src.timestamp, *key, *value, &headers);
                }
            }
        }
        for ((t, p), b) in batches {
            let topic = &topics[t as usize];
            let part = topic
                .held(p)
                .ok_or_else(|| format!("partition {p} of '{}' is not on this broker", topic.record.name))?;
            part.log.append(&b.build(), 0).map_err(|e| e.to_string())?;
            touched.push(part);
        }
        if !touched.is_empty() {
            self.appended.send_modify(|n| *n += 1);
        }
        Ok(())
    }

    /// Makes the outputs durable, then the progress: never the other way.
    fn save_progress(
        &self,
        d: &Deployed,
        dep: &Deployment,
        partition: u32,
        next: i64,
        touched: &[Arc<crate::broker::Partition>],
    ) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for p in touched {
            if seen.insert(Arc::as_ptr(p)) {
                p.log.sync_to(p.log.log_end_offset()).map_err(|e| format!("fsync of an output failed: {e}"))?;
            }
        }
        let mut progress = d.progress.lock().expect("progress lock");
        if progress.get(&partition) == Some(&next) {
            return Ok(());
        }
        progress.insert(partition, next);
        // Written under the lock: one writer of the file at a time.
        let body = serde_json::to_vec(&*progress).expect("progress serialises");
        write_atomic(&self.plugins.progress_path(&dep.name), &body).map_err(|e| format!("cannot store progress: {e}"))
    }
}

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
    fn on_keys(self) -> bool {
        matches!(self, BatchMode::EncodeKeys | BatchMode::DecodeKeys)
    }

    fn what(self) -> &'static str {
        match self {
            BatchMode::Filter => "filter",
            BatchMode::EncodeKeys | BatchMode::DecodeKeys => "key serializer",
            BatchMode::Encode | BatchMode::Decode => "serializer",
        }
    }
}

impl Broker {
    /// A topic may name only deployed serializers as its key and value
    /// serializers and only a deployed partitioner as its partitioner.
    pub(crate) fn check_topic_plugins(&self, config: &TopicConfig) -> Result<(), WireError> {
        for (key, name) in config.plugins() {
            let kind = if key == "partitioner" { Kind::Partitioner } else { Kind::Serializer };
            let d = self.plugins.get(name).ok_or_else(|| {
                WireError::new(ErrorCode::InvalidConfig, format!("{key}: plugin '{name}' is not deployed"))
            })?;
            d.plugin.expect_kind(kind).map_err(|e| WireError::new(ErrorCode::InvalidConfig, format!("{key}: {e}")))?;
        }
        Ok(())
    }

    /// The topics whose configs name plugin `name` (it cannot be removed
    /// while one does).
    fn topics_using(&self, name: &str) -> Vec<String> {
        self.sorted_topics()
            .iter()
            .filter(|t| t.config.plugins().any(|(_, n)| n == name))
            .map(|t| t.record.name.clone())
            .collect()
    }

    /// Runs the topic's serializers' encode on a produced batch: keys, then
    /// values. `None` when it names none. Blocking: call off the runtime.
    pub(crate) fn encode_for_topic(&self, topic: &Topic, produced: &Bytes) -> Result<Option<Bytes>, WireError> {
        let mut encoded = None;
        for (name, mode) in serializers(&topic.config, true) {
            encoded = Some(self.apply_plugin(name, None, mode, encoded.as_ref().unwrap_or(produced))?);
        }
        Ok(encoded)
    }

    /// Runs a serializer or filter over one stored (or produced) batch and
    /// rebuilds it with the same offsets. Blocking: call off the runtime.
    pub(crate) fn apply_plugin(
        &self,
        name: &str,
        params: Option<&[(String, String)]>,
        mode: BatchMode,
        stored: &Bytes,
    ) -> Result<Bytes, WireError> {
        let d = self.plugins.get(name).ok_or_else(|| unknown(name))?;
        let want = if mode == BatchMode::Filter { Kind::Filter } else { Kind::Serializer };
        d.plugin.expect_kind(want).map_err(invalid)?;
        let (header, body) = batch::records_section(stored).map_err(corrupt)?;
        let records = batch::decode_section(&header, &body).map_err(corrupt)?;
        let swapped;
        let input = Input {
            base_offset: header.base_offset,
            base_timestamp: header.base_timestamp,
            count: records.len() as u32,
            records: if mode.on_keys() {
                swapped = keys_as_values(&header, &records)?;
                &swapped
            } else {
                &body
            },
        };
        let deployed_params = d.deployment.read().expect("deployment lock").params.clone();
        let params = params.unwrap_or(&deployed_params);
        let called = d
            .with_instance(params, |inst| match mode {
                BatchMode::Encode | BatchMode::EncodeKeys => inst.serialize(&input, true),
                BatchMode::Decode | BatchMode::DecodeKeys => inst.serialize(&input, false),
                BatchMode::Filter => inst.filter(&input),
            })
            .map_err(|e| WireError::new(ErrorCode::PluginFailed, format!("plugin '{name}': {e}")))?;
        let failed = |e: CallError| WireError::new(ErrorCode::PluginFailed, format!("plugin '{name}' {e}"));
        let out = called.map_err(failed)?;
        if let Some(r) = &out.refusal {
            return Err(WireError::new(
                ErrorCode::RecordRejected,
                format!("record {} rejected by {} '{name}': {}", r.index, mode.what(), r.message),
            ));
        }
        let entries = out.decode(input.count, 1).map_err(failed)?;
        if mode != BatchMode::Filter && entries.len() != records.len() {
            return Err(failed(CallError::BadOutput(format!(
                "a serializer must answer every record: {} outputs for {} records",
                entries.len(),
                records.len()
            ))));
        }
        let codec = header.compression().map_err(corrupt)?;
        let mut b = BatchBuilder::rebuild_of(&header, codec);
        let mut last_input = None;
        for entry in &entries {
            let i = entry.input();
            if last_input.is_some_and(|l| i <= l) {
                return Err(failed(CallError::BadOutput("outputs must follow input order, one per record".into())));
            }
            last_input = Some(i);
            let src = &records[i as usize];
            let delta = (src.offset - header.base_offset) as i32;
            match entry {
                Entry::Forward { .. } => {
                    b.append_at(delta, src.timestamp, src.key.as_deref(), src.value.as_deref(), &src.headers)
                }
                Entry::New { value, .. } if mode.on_keys() => {
                    b.append_at(delta, src.timestamp, *value, src.value.as_deref(), &src.headers)
                }
                Entry::New { key, value, headers, .. } => {
                    let headers: Vec<Header> = headers
                        .iter()
                        .map(|(k, v)| Header { key: (*k).to_owned(), value: v.map(Bytes::copy_from_slice) })
                        .collect();
                    b.append_at(delta, src.timestamp, *key, *value, &headers)
                }
            }
        }
        d.monitor.record_output(entries.len());
        let rebuilt = b.build();
        // Keep the stored base offset and leader epoch (not in the CRC).
        let mut out = bytes::BytesMut::from(&rebuilt[..]);
        out[..16].copy_from_slice(&batch::patched_prefix(&rebuilt, header.base_offset, header.leader_epoch));
        Ok(out.freeze())
    }
}

/// The records section of `records` with each key in the value's place (no
/// key), for a key serializer: the serializer ABI is about values.
fn keys_as_values(header: &batch::BatchHeader, records: &[Record]) -> Result<Bytes, WireError> {
    let mut b = BatchBuilder::rebuild_of(header, Compression::None);
    for r in records {
        b.append_at((r.offset - header.base_offset) as i32, r.timestamp, None, r.key.as_deref(), &r.headers);
    }
    Ok(batch::records_section(&b.build()).map_err(corrupt)?.1)
}

fn plugin_failure(e: &CallError) -> String {
    format!("plugin {e}")
}

/// Plugin names follow topic-name rules (they name files).
fn validate_plugin_name(name: &str) -> Result<(), String> {
    crate::topic::validate_topic_name(name).map_err(|e| e.replace("topic name", "plugin name"))
}
