//! Runs Quiver's WebAssembly plugins (spec/wit/plugin.wit).
//!
//! One [`PluginHost`] per process holds the wasmtime engine (pooling
//! allocator, epoch interruption), the linker (Quiver's `host` interface and
//! WASI with nothing granted: no files, sockets or environment) and the disk
//! cache of compiled components. [`PluginHost::load`] checks a component's
//! kind and ABI version and compiles it once; [`Plugin::instantiate`] makes an
//! [`Instance`] (one per plugin and partition, reused across calls). Every call
//! runs under a deadline and a memory cap; a trap, a deadline or the cap
//! poisons that instance only, and the caller's policy decides what happens to
//! the batch.

mod bindings;
pub mod builder;
pub mod entries;
mod monitor;
pub mod state;

use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store, Trap};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use bindings::{filter, partitioner, serializer, transform};
pub use entries::Entry;
pub use monitor::{LOG_LINES_MAX, LogLine, Monitor, Stats};
pub use state::{SharedState, StateStore};

/// The ABI versions (WIT package versions) this host runs.
pub const ABI_VERSIONS: &[&str] = &["0.1.0"];

/// How a built-in plugin's identity starts (in place of a SHA-256).
pub const BUILTIN_PREFIX: &str = "builtin:";
const WIT_PACKAGE: &str = "quiver:plugin";

/// How often the epoch advances: the resolution of call deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// The four plugin kinds, one WIT world each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Transform,
    Filter,
    Serializer,
    Partitioner,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Transform, Kind::Filter, Kind::Serializer, Kind::Partitioner];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Transform => "transform",
            Kind::Filter => "filter",
            Kind::Serializer => "serializer",
            Kind::Partitioner => "partitioner",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Kind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown plugin kind '{s}': expected transform, filter, serializer or partitioner"))
    }
}

/// Limits and places, from the broker's `[plugins]` configuration.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Where compiled components are cached (by content hash); none = no cache.
    pub cache_dir: Option<PathBuf>,
    /// Linear memory one instance may grow to.
    pub memory_max_bytes: usize,
    /// Wall-clock time one batch call may take.
    pub call_deadline: Duration,
    /// Instances alive at once (the pooling allocator's slots).
    pub instances_max: u32,
    /// Keys, values and overhead one transform's state store may hold per
    /// input partition (in the broker's memory, not the instance's).
    pub state_max_bytes: usize,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            cache_dir: None,
            memory_max_bytes: 64 << 20,
            call_deadline: Duration::from_millis(500),
            instances_max: 256,
            state_max_bytes: 64 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("not a WebAssembly component: {0}")]
    NotAComponent(String),
    #[error(
        "not a Quiver plugin: it exports none of {WIT_PACKAGE}/{{transform,filter,serializer,partitioner}}@{}",
        ABI_VERSIONS.join("|")
    )]
    NotAPlugin,
    #[error(
        "the plugin was built for Quiver plugin ABI {found}; this broker supports {}; rebuild it with a matching quiver-plugin SDK",
        ABI_VERSIONS.join(", ")
    )]
    AbiMismatch { found: String },
    #[error("the plugin is a {found}, not a {expected}")]
    WrongKind { expected: Kind, found: Kind },
    #[error("the plugin imports something Quiver does not provide: {0}")]
    Link(String),
    #[error("the plugin refused its parameters: {0}")]
    Init(String),
    // Not `#[from]`: the message already includes the inner error, which
    // as a source would print twice in an error chain (`{:#}`).
    #[error("plugin {0}")]
    Call(CallError),
    #[error("plugin cache: {0}")]
    Cache(std::io::Error),
    #[error("{0}")]
    Engine(String),
}

impl From<CallError> for PluginError {
    fn from(e: CallError) -> Self {
        PluginError::Call(e)
    }
}

impl From<std::io::Error> for PluginError {
    fn from(e: std::io::Error) -> Self {
        PluginError::Cache(e)
    }
}

/// Why a call did not return. The instance is poisoned and must be replaced.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CallError {
    #[error("exceeded its deadline of {0:?} and was stopped")]
    Deadline(Duration),
    #[error("exceeded its memory cap of {0} bytes and was stopped")]
    MemoryCap(usize),
    #[error("trapped: {0}")]
    Trap(String),
    #[error("returned a malformed output: {0}")]
    BadOutput(String),
}

/// The process-wide engine, linker and cache.
pub struct PluginHost {
    engine: Engine,
    linker: Linker<HostState>,
    config: HostConfig,
    stop_ticker: Arc<AtomicBool>,
}

impl PluginHost {
    pub fn new(config: HostConfig) -> Result<Self, PluginError> {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(config.instances_max)
            .total_core_instances(config.instances_max * 8)
            .total_memories(config.instances_max * 2)
            .total_tables(config.instances_max * 8)
            .total_stacks(config.instances_max)
            .max_memory_size(config.memory_max_bytes);
        let mut wasm = Config::new();
        wasm.wasm_component_model(true)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .max_wasm_stack(1 << 20);
        let engine = Engine::new(&wasm).map_err(|e| PluginError::Engine(format!("{e:#}")))?;

        let mut linker: Linker<HostState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        bindings::host::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        bindings::state::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(|e| PluginError::Engine(format!("{e:#}")))?;

        let stop_ticker = Arc::new(AtomicBool::new(false));
        let (weak, stop) = (engine.weak(), stop_ticker.clone());
        std::thread::Builder::new()
            .name("plugin-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    match weak.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => return,
                    }
                }
            })
            .map_err(PluginError::Cache)?;
        if let Some(dir) = &config.cache_dir {
            std::fs::create_dir_all(dir)?;
        }
        Ok(PluginHost { engine, linker, config, stop_ticker })
    }

    pub fn config(&self) -> &HostConfig {
        &self.config
    }

    /// Checks, compiles (or loads from the cache) and links a component.
    pub fn load(&self, wasm: &[u8]) -> Result<Arc<Plugin>, PluginError> {
        let sha256 = sha256_hex(wasm);
        let (component, from_cache) = self.compile(wasm, &sha256)?;
        let (kind, abi) = inspect(&self.engine, &component)?;
        if !ABI_VERSIONS.contains(&abi.as_str()) {
            return Err(PluginError::AbiMismatch { found: abi });
        }
        let pre = self.linker.instantiate_pre(&component).map_err(|e| PluginError::Link(format!("{e:#}")))?;
        let bad_exports = |e: wasmtime::Error| {
            PluginError::NotAComponent(format!("its exports do not match the {kind} world: {e:#}"))
        };
        let pre = match kind {
            Kind::Transform => Pre::Transform(transform::TransformPluginPre::new(pre).map_err(bad_exports)?),
            Kind::Filter => Pre::Filter(filter::FilterPluginPre::new(pre).map_err(bad_exports)?),
            Kind::Serializer => Pre::Serializer(serializer::SerializerPluginPre::new(pre).map_err(bad_exports)?),
            Kind::Partitioner => Pre::Partitioner(partitioner::PartitionerPluginPre::new(pre).map_err(bad_exports)?),
        };
        let engine = self.engine.clone();
        let uses_state = imports_state(&self.engine, &component);
        Ok(Arc::new(Plugin { sha256, kind, abi, pre, from_cache, uses_state, config: self.config.clone(), engine }))
    }

    /// A transform built into the host, not a component: `identity`, a
    /// native pass-through that forwards every record to the first output.
    /// It runs through exactly the same pipeline as a Wasm transform, which
    /// makes it the baseline Wasm transforms are benchmarked against.
    pub fn builtin(&self, name: &str) -> Result<Arc<Plugin>, PluginError> {
        if name != "identity" {
            return Err(PluginError::NotAPlugin);
        }
        Ok(Arc::new(Plugin {
            sha256: format!("{BUILTIN_PREFIX}{name}"),
            kind: Kind::Transform,
            abi: ABI_VERSIONS[ABI_VERSIONS.len() - 1].to_owned(),
            pre: Pre::NativeIdentity,
            from_cache: false,
            uses_state: false,
            config: self.config.clone(),
            engine: self.engine.clone(),
        }))
    }

    fn compile(&self, wasm: &[u8], sha256: &str) -> Result<(Component, bool), PluginError> {
        if wasm.len() < 8 || &wasm[..4] != b"\0asm" {
            return Err(PluginError::NotAComponent("the file does not start with the WebAssembly magic".into()));
        }
        if wasm[4..8] == [1, 0, 0, 0] {
            return Err(PluginError::NotAComponent(
                "this is a core module; build a component with `cargo build --target wasm32-wasip2` (or `quiver plugin build`)".into(),
            ));
        }
        let Some(dir) = &self.config.cache_dir else {
            return Ok((self.compile_fresh(wasm)?, false));
        };
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        let path = dir.join(format!("{sha256}-{:016x}.cwasm", h.finish()));
        match std::fs::read(&path) {
            Ok(entry) => match cache_entry_checked(&entry) {
                // SAFETY: the bytes are what `Component::serialize` wrote
                // (their SHA-256 follows them and matches), for an engine
                // with the same compatibility hash (it is in the name).
                Some(compiled) => match unsafe { Component::deserialize(&self.engine, compiled) } {
                    Ok(component) => return Ok((component, true)),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "plugin cache entry refused; recompiling")
                    }
                },
                None => tracing::warn!(path = %path.display(), "plugin cache entry damaged; recompiling"),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "plugin cache entry unreadable; recompiling"),
        }
        let component = self.compile_fresh(wasm)?;
        let mut entry = component.serialize().map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        let checksum = Sha256::digest(&entry);
        entry.extend_from_slice(&checksum);
        write_durably(&path, &entry)?;
        Ok((component, false))
    }

    fn compile_fresh(&self, wasm: &[u8]) -> Result<Component, PluginError> {
        Component::new(&self.engine, wasm).map_err(|e| PluginError::NotAComponent(format!("{e:#}")))
    }
}

impl Drop for PluginHost {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

/// The compiled bytes of a cache entry (`serialize` output, then its
/// SHA-256), if the checksum matches: a torn or damaged file is never
/// handed to `Component::deserialize`, which trusts its input.
fn cache_entry_checked(entry: &[u8]) -> Option<&[u8]> {
    let split = entry.len().checked_sub(32)?;
    let (compiled, checksum) = entry.split_at(split);
    (Sha256::digest(compiled).as_slice() == checksum).then_some(compiled)
}

/// Writes `bytes` to `path` atomically and durably: a temporary file of
/// this process's own (two processes sharing a cache never write into one),
/// fsynced, renamed over `path`, and the directory fsynced.
fn write_durably(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let unique = NEXT.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_extension(format!("{}.{unique}.tmp", std::process::id()));
    let written = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// SHA-256 of a plugin's bytes, lowercase hex: its identity.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Finds the plugin's kind and ABI version from its exported interface name,
/// `quiver:plugin/<kind>@<version>`.
fn inspect(engine: &Engine, component: &Component) -> Result<(Kind, String), PluginError> {
    let ty = component.component_type();
    for (name, _) in ty.exports(engine) {
        let Some(rest) = name.strip_prefix(WIT_PACKAGE).and_then(|r| r.strip_prefix('/')) else { continue };
        let (iface, version) = rest.split_once('@').unwrap_or((rest, "unversioned"));
        if let Ok(kind) = iface.parse::<Kind>() {
            return Ok((kind, version.to_owned()));
        }
    }
    Err(PluginError::NotAPlugin)
}

/// Whether a component imports the `state` interface: a transform that does
/// has a state store.
fn imports_state(engine: &Engine, component: &Component) -> bool {
    let prefix = format!("{WIT_PACKAGE}/state");
    component.component_type().imports(engine).any(|(name, _)| name.starts_with(&prefix))
}

/// A compiled, linked plugin: instantiate it as often as needed.
pub struct Plugin {
    sha256: String,
    kind: Kind,
    abi: String,
    pre: Pre,
    from_cache: bool,
    uses_state: bool,
    config: HostConfig,
    engine: Engine,
}

enum Pre {
    Transform(transform::TransformPluginPre<HostState>),
    Filter(filter::FilterPluginPre<HostState>),
    Serializer(serializer::SerializerPluginPre<HostState>),
    Partitioner(partitioner::PartitionerPluginPre<HostState>),
    /// [`PluginHost::builtin`] `identity`.
    NativeIdentity,
}

impl Plugin {
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn abi_version(&self) -> &str {
        &self.abi
    }

    /// Whether the compiled code came from the disk cache.
    pub fn from_cache(&self) -> bool {
        self.from_cache
    }

    /// Whether this transform keeps keyed state (it imports `state`).
    pub fn uses_state(&self) -> bool {
        self.uses_state
    }

    /// Refuses a plugin of another kind than the caller needs.
    pub fn expect_kind(&self, expected: Kind) -> Result<(), PluginError> {
        if self.kind != expected {
            return Err(PluginError::WrongKind { expected, found: self.kind });
        }
        Ok(())
    }

    /// A new instance, started with `params` (and, for a transform, its
    /// output topics). A plugin that refuses its parameters gives
    /// [`PluginError::Init`] with its message.
    pub fn instantiate(
        self: &Arc<Self>,
        params: &[(String, String)],
        outputs: &[String],
        monitor: Arc<Monitor>,
    ) -> Result<Instance, PluginError> {
        self.instantiate_with_state(params, outputs, monitor, None)
    }

    /// [`instantiate`](Self::instantiate), with the state store its `state`
    /// calls read and write (a transform's, for one input partition).
    pub fn instantiate_with_state(
        self: &Arc<Self>,
        params: &[(String, String)],
        outputs: &[String],
        monitor: Arc<Monitor>,
        state: Option<SharedState>,
    ) -> Result<Instance, PluginError> {
        let stderr = MemoryOutputPipe::new(64 * 1024);
        let wasi = WasiCtxBuilder::new().stderr(stderr.clone()).build();
        let state = HostState {
            wasi,
            table: ResourceTable::new(),
            limiter: Limiter { memory_max: self.config.memory_max_bytes, hit: false },
            monitor: monitor.clone(),
            state,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        let mut instance = Instance {
            plugin: self.clone(),
            store,
            exports: Exports::Poisoned,
            stderr,
            monitor,
            deadline: self.config.call_deadline,
        };
        // Instantiating runs the component's start code: same limits.
        instance.arm();
        let store = &mut instance.store;
        let exports = match &self.pre {
            Pre::Transform(pre) => pre.instantiate(store).map(|p| Exports::Transform(Box::new(p))),
            Pre::Filter(pre) => pre.instantiate(store).map(|p| Exports::Filter(Box::new(p))),
            Pre::Serializer(pre) => pre.instantiate(store).map(|p| Exports::Serializer(Box::new(p))),
            Pre::Partitioner(pre) => pre.instantiate(store).map(|p| Exports::Partitioner(Box::new(p))),
            Pre::NativeIdentity => {
                instance.exports = Exports::NativeIdentity;
                return Ok(instance);
            }
        };
        instance.exports = exports.map_err(|e| PluginError::Call(instance.classify(e)))?;
        let (store, params, outputs) = (&mut instance.store, params.to_vec(), outputs.to_vec());
        let started = match &instance.exports {
            Exports::Transform(p) => p.quiver_plugin_transform().call_init(store, &params, &outputs),
            Exports::Filter(p) => p.quiver_plugin_filter().call_init(store, &params),
            Exports::Serializer(p) => p.quiver_plugin_serializer().call_init(store, &params),
            Exports::Partitioner(p) => p.quiver_plugin_partitioner().call_init(store, &params),
            Exports::Poisoned | Exports::NativeIdentity => unreachable!("set above"),
        };
        match started {
            Ok(Ok(())) => Ok(instance),
            Ok(Err(message)) => Err(PluginError::Init(message)),
            Err(e) => Err(PluginError::Call(instance.classify(e))),
        }
    }
}

/// The input of one call: a batch's records section and where it starts.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub base_offset: i64,
    pub base_timestamp: i64,
    pub count: u32,
    pub records: &'a [u8],
}

/// A record the plugin refused: its index in the batch and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub index: u32,
    pub message: String,
}

/// What a transform, filter or serializer call returned: entries for the
/// records before the refusal (all of them without one).
#[derive(Debug)]
pub struct Output {
    pub entries: Vec<u8>,
    pub refusal: Option<Refusal>,
}

impl Output {
    /// The entries, checked against the input's record count and the number
    /// of output topics.
    pub fn decode(&self, inputs: u32, topics: u32) -> Result<Vec<Entry<'_>>, CallError> {
        entries::decode(&self.entries, inputs, topics).map_err(CallError::BadOutput)
    }
}

enum Exports {
    Transform(Box<transform::TransformPlugin>),
    Filter(Box<filter::FilterPlugin>),
    Serializer(Box<serializer::SerializerPlugin>),
    Partitioner(Box<partitioner::PartitionerPlugin>),
    /// A call trapped, hit its deadline or its cap: this instance is done.
    Poisoned,
    NativeIdentity,
}

/// One live instance. Not shared: the owner (a partition's task) calls it
/// one batch at a time.
pub struct Instance {
    plugin: Arc<Plugin>,
    store: Store<HostState>,
    exports: Exports,
    stderr: MemoryOutputPipe,
    monitor: Arc<Monitor>,
    deadline: Duration,
}

impl Instance {
    pub fn plugin(&self) -> &Arc<Plugin> {
        &self.plugin
    }

    /// False once a call trapped or was stopped: make a new instance.
    pub fn is_usable(&self) -> bool {
        !matches!(self.exports, Exports::Poisoned)
    }

    /// Changes this instance's per-call deadline.
    pub fn set_deadline(&mut self, deadline: Duration) {
        self.deadline = deadline;
    }

    fn arm(&mut self) {
        let ticks = self.deadline.as_nanos().div_ceil(EPOCH_TICK.as_nanos()).max(1) as u64;
        // One extra tick: the current tick may be about to end.
        self.store.set_epoch_deadline(ticks + 1);
        self.store.epoch_deadline_trap();
    }

    fn batch(input: &Input<'_>) -> bindings::Batch {
        bindings::Batch {
            base_offset: input.base_offset,
            base_timestamp: input.base_timestamp,
            count: input.count,
            records: input.records.to_vec(),
        }
    }

    pub fn transform(&mut self, input: &Input<'_>) -> Result<Output, CallError> {
        if matches!(self.exports, Exports::NativeIdentity) {
            let started = Instant::now();
            let mut entries = Vec::with_capacity(input.count as usize * 4);
            for i in 0..input.count {
                entries.push(0);
                quiver_protocol::varint::put_varlong(&mut entries, i64::from(i));
                entries.push(0);
            }
            self.monitor.record_call(input.count as usize, 0, started.elapsed());
            return Ok(Output { entries, refusal: None });
        }
        self.call(input, |exports, store, batch| match exports {
            Exports::Transform(p) => Some(p.quiver_plugin_transform().call_transform(store, &batch)),
            _ => None,
        })
    }

    pub fn filter(&mut self, input: &Input<'_>) -> Result<Output, CallError> {
        self.call(input, |exports, store, batch| match exports {
            Exports::Filter(p) => Some(p.quiver_plugin_filter().call_filter(store, &batch)),
            _ => None,
        })
    }

    /// A serializer's encode (`encode = true`, on produce) or decode.
    pub fn serialize(&mut self, input: &Input<'_>, encode: bool) -> Result<Output, CallError> {
        self.call(input, |exports, store, batch| match exports {
            Exports::Serializer(p) if encode => Some(p.quiver_plugin_serializer().call_encode(store, &batch)),
            Exports::Serializer(p) => Some(p.quiver_plugin_serializer().call_decode(store, &batch)),
            _ => None,
        })
    }

    /// One partition per record, or the first record the plugin refused.
    pub fn partition(&mut self, input: &Input<'_>, partitions: u32) -> Result<Result<Vec<u32>, Refusal>, CallError> {
        self.check_usable()?;
        self.arm();
        let started = Instant::now();
        let batch = Self::batch(input);
        let result = match &self.exports {
            Exports::Partitioner(p) => {
                p.quiver_plugin_partitioner().call_partition(&mut self.store, &batch, partitions)
            }
            _ => return Err(self.wrong_kind()),
        };
        match result {
            Ok(Ok(parts)) => {
                if parts.len() != input.count as usize || parts.iter().any(|p| *p >= partitions) {
                    self.exports = Exports::Poisoned;
                    self.monitor.record_error();
                    return Err(CallError::BadOutput(format!(
                        "{} partitions for {} records, each must be below {partitions}",
                        parts.len(),
                        input.count
                    )));
                }
                self.monitor.record_call(input.count as usize, parts.len(), started.elapsed());
                Ok(Ok(parts))
            }
            Ok(Err(e)) => {
                self.monitor.record_call(input.count as usize, 0, started.elapsed());
                self.monitor.record_error();
                Ok(Err(Refusal { index: e.index, message: e.message }))
            }
            Err(e) => Err(self.classify(e)),
        }
    }

    fn check_usable(&self) -> Result<(), CallError> {
        if !self.is_usable() {
            return Err(CallError::Trap("the instance was stopped by an earlier failure".into()));
        }
        Ok(())
    }

    fn wrong_kind(&self) -> CallError {
        CallError::Trap(format!("this plugin is a {}", self.plugin.kind))
    }

    fn call(
        &mut self,
        input: &Input<'_>,
        f: impl FnOnce(&Exports, &mut Store<HostState>, bindings::Batch) -> Option<wasmtime::Result<bindings::BatchOutput>>,
    ) -> Result<Output, CallError> {
        self.check_usable()?;
        self.arm();
        let started = Instant::now();
        let batch = Self::batch(input);
        let mark = self.store.data().state.as_ref().map(|s| s.lock().expect("state lock").mark());
        let Some(result) = f(&self.exports, &mut self.store, batch) else {
            return Err(self.wrong_kind());
        };
        if let (Err(_), Some(mark)) = (&result, mark) {
            // A call that did not return processed nothing: its writes go.
            let state = self.store.data().state.clone().expect("marked above");
            state.lock().expect("state lock").rollback(mark);
        }
        match result {
            Ok(out) => {
                let refusal = out.error.map(|e| Refusal { index: e.index, message: e.message });
                if refusal.is_some() {
                    self.monitor.record_error();
                }
                // Entries are counted, not decoded, here: one tag per entry
                // is not cheaper to find than decoding; count the call only.
                self.monitor.record_call(input.count as usize, 0, started.elapsed());
                Ok(Output { entries: out.entries, refusal })
            }
            Err(e) => Err(self.classify(e)),
        }
    }

    /// Turns a failed call into why it failed, poisons the instance and logs
    /// what the plugin wrote to stderr (a panic message, usually).
    fn classify(&mut self, e: wasmtime::Error) -> CallError {
        self.exports = Exports::Poisoned;
        self.monitor.record_error();
        let err = if self.store.data().limiter.hit {
            CallError::MemoryCap(self.plugin.config.memory_max_bytes)
        } else if matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
            CallError::Deadline(self.deadline)
        } else {
            CallError::Trap(format!("{e:#}"))
        };
        let stderr = self.stderr.contents();
        if !stderr.is_empty() {
            for line in String::from_utf8_lossy(&stderr).lines().filter(|l| !l.is_empty()) {
                self.monitor.log("error", format!("stderr: {line}"));
            }
        }
        self.monitor.log("error", format!("plugin {err}; its instance was stopped"));
        err
    }

    /// Counts output records (the caller knows them once decoded).
    pub fn count_output(&self, records: usize) {
        self.monitor.record_output(records);
    }
}

/// Per-instance state seen by host functions.
struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: Limiter,
    monitor: Arc<Monitor>,
    /// A transform's state store, if it has one.
    state: Option<SharedState>,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl bindings::host::Host for HostState {
    fn log(&mut self, level: bindings::host::Level, message: String) {
        use bindings::host::Level;
        let level = match level {
            Level::Trace => "trace",
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        };
        self.monitor.log(level, message);
    }

    fn now_ms(&mut self) -> i64 {
        monitor::now_ms()
    }
}

impl bindings::state::Host for HostState {
    fn get(&mut self, key: Vec<u8>) -> Option<Vec<u8>> {
        let state = self.state.as_ref()?;
        state.lock().expect("state lock").get(&key).map(<[u8]>::to_vec)
    }

    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<(), String> {
        let state = self.state.as_ref().ok_or("this plugin has no state store (only transforms have one)")?;
        state.lock().expect("state lock").put(&key, &value)
    }

    fn delete(&mut self, key: Vec<u8>) {
        if let Some(state) = &self.state {
            state.lock().expect("state lock").delete(&key);
        }
    }
}

struct Limiter {
    memory_max: usize,
    hit: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.memory_max {
            self.hit = true;
            // An error (not `false`) traps at once instead of letting the
            // guest's allocator see a failed grow and abort on its own.
            return Err(wasmtime::Error::msg(format!("memory cap of {} bytes reached", self.memory_max)));
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}
