//! Deployed plugins at work on this node: deployment (validated, then
//! written to the metadata log), transforms (one task per input partition
//! led here), and the request path's serializers, partitioners and filters.
//! What is loaded lives in `registry.rs`, under `<data_dir>/plugins/`:
//! - `registry.json`: every deployment loaded from the image (name, version,
//!   kind, hash, params, transform settings, paused or not), replaced
//!   atomically;
//! - `blobs/<sha256>.wasm`: the components, content-addressed;
//! - `cache/`: compiled components (by content hash and engine);
//! - `progress/<name>.json`: per input partition, the next input offset a
//!   transform will process. Written after the outputs of everything before
//!   it are appended and fsynced: a restart resumes there, so no input is
//!   lost (at-least-once: a crash between the two repeats some outputs).
//!
//! A transform whose component imports the WIT `state` interface keeps a
//! state store per input partition (`quiver_plugin_host::StateStore`),
//! changelogged to the compacted topic `<name>-state` (created at deploy;
//! `transform_state.rs` has the record layout). Each step writes its
//! outputs, then its state changes and progress in one batch; the store is
//! rebuilt from the changelog whenever this broker starts leading the input
//! partition, and the transform resumes from the progress in it. Outputs
//! stay at-least-once; the state never counts an input twice.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use quiver_controller::Command;
use quiver_plugin_host::{BUILTIN_PREFIX, CallError, Entry, Input, Instance, Kind, Plugin, SharedState, StateStore};
use quiver_protocol::ErrorCode;
use quiver_protocol::batch::{self, BatchBuilder, Batches, Compression, Header, Record};
use quiver_protocol::control::ReadCommitted;
use quiver_protocol::messages::{
    Acks, PluginDeployRequest, PluginFetchResponse, PluginInfo, PluginListResponse, PluginLogLine,
    PluginPartitionProgress, ProducePartition, ProduceRequest,
};
use quiver_protocol::partitioner::partition_for_key;

use crate::api::{self, NewTopic, Read, Write};
use crate::broker::{Broker, now_ms};
use crate::errors::{AdminError, PluginAdminError, PluginCallError, ProduceError};
use crate::files::write_atomic;
use crate::partition::Topic;
use crate::registry::{BatchMode, Deployed, Deployment, Guarantee, OnError, StartAt, invalid, serializers, unknown};
use crate::topic::{TopicCompression, TopicConfig};
use crate::transform_state::{Rebuild, barrier_batch, state_topic, state_topic_configs, step_batch};
use crate::wire::code_of_produce;

/// Input read per transform step, at most.
const READ_BYTES_MAX: usize = 1 << 20;
/// Changelog read per fetch while a state store is rebuilt.
const REBUILD_READ_BYTES: u32 = 4 << 20;
/// How long a rebuild waits for the changelog to reach its barrier.
const REBUILD_WAIT: Duration = Duration::from_secs(10);

impl Broker {
    /// Starts the tasks of every deployed transform (at open).
    pub fn start_plugins(self: &Arc<Self>) {
        let all: Vec<_> = self.plugins.deployed.read().expect("deployed lock").values().cloned().collect();
        for d in all {
            self.start_transform(&d);
        }
    }

    /// Starts a transform's task for every input partition held here that
    /// has none (each runs while this broker leads its partition). Called
    /// again whenever the replicas held here may have changed.
    pub(crate) fn start_transform(self: &Arc<Self>, d: &Arc<Deployed>) {
        if d.plugin.kind() != Kind::Transform {
            return;
        }
        let input = d.deployment.read().expect("deployment lock").input.clone();
        let Some(topic) = self.topic(&input) else { return };
        let mut tasks = d.tasks.lock().expect("tasks lock");
        for p in topic.local().map(|p| p.id).collect::<Vec<_>>() {
            if tasks.contains_key(&p) {
                continue;
            }
            let (broker, d2) = (self.clone(), d.clone());
            tasks.insert(p, tokio::spawn(async move { broker.run_transform(d2, p).await }));
        }
    }

    /// Stops a deployment's tasks and waits for them (each finishes its
    /// current batch first).
    pub(crate) async fn stop_transform(&self, d: &Arc<Deployed>) {
        d.run.send_replace(false);
        let tasks: Vec<_> = std::mem::take(&mut *d.tasks.lock().expect("tasks lock")).into_values().collect();
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
    }

    pub(crate) async fn deploy_plugin(
        self: &Arc<Self>,
        r: PluginDeployRequest,
    ) -> Result<(u32, String, String), PluginAdminError> {
        let (plugin, deployment) = self.validate_deployment(&r).await?;
        if deployment.keeps_changelog(&plugin) {
            self.ensure_state_topic(&r.name, &r.input).await?;
        }
        self.deploy_in_metadata(&r, &plugin, deployment).await
    }

    /// Everything a deployment must pass before it is stored: the name, the
    /// component (loaded and of the stated kind), the topics it names, and
    /// one instance started with its parameters. Returns the plugin and the
    /// deployment (version 0: the registry assigns it).
    async fn validate_deployment(
        self: &Arc<Self>,
        r: &PluginDeployRequest,
    ) -> Result<(Arc<Plugin>, Deployment), PluginAdminError> {
        validate_plugin_name(&r.name).map_err(invalid)?;
        let kind: Kind = r.kind.parse().map_err(invalid)?;
        let on_error = OnError::parse(&r.on_error).map_err(invalid)?;
        let start = StartAt::parse(&r.start).map_err(invalid)?;
        let guarantee = Guarantee::parse(&r.guarantee).map_err(invalid)?;
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
        .await??;
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
            let state = state_topic(&r.name);
            let changelog = plugin.uses_state() || guarantee == Guarantee::ExactlyOnce;
            if changelog && (state == r.input || r.outputs.contains(&state)) {
                return Err(invalid(format!(
                    "topic '{state}' is this transform's state changelog; it cannot be its input or an output"
                )));
            }
        } else if !r.input.is_empty() || !r.outputs.is_empty() {
            return Err(invalid(format!("--input and --output are for transforms; this plugin is a {kind}")));
        } else if !r.guarantee.is_empty() {
            return Err(invalid(format!("--guarantee is for transforms; this plugin is a {kind}")));
        }
        // Start one instance now: bad parameters are refused at deploy time.
        let monitor = plugins.get(&r.name).map(|d| d.monitor.clone()).unwrap_or_default();
        let (p2, params, outputs) = (plugin.clone(), r.params.clone(), r.outputs.clone());
        tokio::task::spawn_blocking(move || p2.instantiate(&params, &outputs, monitor).map(drop))
            .await?
            .map_err(invalid)?;
        let deployment = Deployment {
            name: r.name.clone(),
            version: 0,
            kind,
            sha256: plugin.sha256().to_owned(),
            abi_version: plugin.abi_version().to_owned(),
            size_bytes: r.wasm.len() as u64,
            deployed_ms: now_ms(),
            params: r.params.clone(),
            input: r.input.clone(),
            outputs: r.outputs.clone(),
            on_error,
            start,
            paused: None,
            guarantee,
        };
        Ok((plugin, deployment))
    }

    fn check_transform_topics(
        &self,
        input: &str,
        outputs: &[String],
        on_error: &OnError,
    ) -> Result<(), PluginAdminError> {
        if input.is_empty() || outputs.is_empty() {
            return Err(invalid("a transform needs --input TOPIC and at least one --output TOPIC"));
        }
        let dlq = match on_error {
            OnError::DeadLetter(t) => Some(t),
            _ => None,
        };
        for t in std::iter::once(&input.to_owned()).chain(outputs).chain(dlq) {
            if self.output_topic(t).is_none() {
                return Err(PluginAdminError::UnknownTopic(t.clone()));
            }
        }
        if outputs.iter().any(|o| o == input) {
            return Err(invalid(format!("topic '{input}' cannot be both the input and an output")));
        }
        Ok(())
    }

    /// Creates `<name>-state` for a stateful transform reading `input`
    /// (compacted, as many partitions as the input, its replication
    /// factor), or checks the one there can hold the state.
    async fn ensure_state_topic(&self, name: &str, input: &str) -> Result<(), PluginAdminError> {
        let topic = state_topic(name);
        let image = self.controller.image().borrow().clone();
        let source = image.topics.get(input).ok_or_else(|| PluginAdminError::UnknownTopic(input.to_owned()))?;
        let partitions = source.partitions.len() as u32;
        if let Some(existing) = image.topics.get(&topic) {
            let compacted = self.image_topic_config(&existing.configs).is_ok_and(|c| c.is_compacted());
            if compacted && existing.partitions.len() as u32 >= partitions {
                return Ok(());
            }
            return Err(invalid(format!(
                "topic '{topic}' exists but cannot hold this transform's state: it must be compacted \
                 (cleanup.policy=compact) and have at least {partitions} partitions, as '{input}' has"
            )));
        }
        let replication_factor = source.partitions.first().map_or(1, |p| p.replicas.len()) as u16;
        let new = NewTopic { name: topic.clone(), partitions, replication_factor, configs: state_topic_configs() };
        self.create_topic_unless_exists(&new)
            .await
            .map_err(|e| invalid(format!("cannot create the state changelog '{topic}': {e}")))
    }

    pub(crate) async fn control_plugin(
        &self,
        name: &str,
        action: quiver_protocol::messages::PluginAction,
    ) -> Result<(), PluginAdminError> {
        self.control_in_metadata(name, action).await
    }

    pub(crate) fn list_plugins(&self, names: Option<Vec<String>>) -> Result<PluginListResponse, PluginAdminError> {
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
                let mut progress = d.progress.lock().expect("progress lock").clone();
                // Other leaders' progress, as last committed.
                let image = self.controller.image().borrow().clone();
                for (p, n) in
                    image.plugins.get(&dep.name).filter(|i| i.version == dep.version).iter().flat_map(|i| &i.progress)
                {
                    let at = progress.entry(*p).or_insert(*n);
                    *at = (*at).max(*n);
                }
                let progress = progress
                    .into_iter()
                    .map(|(partition, next_offset)| PluginPartitionProgress {
                        partition,
                        next_offset,
                        high_watermark: self
                            .partition(&dep.input, partition)
                            .map_or(-1, |(_, part)| part.high_watermark()),
                    })
                    .collect();
                let (state_topic, state_keys, state_bytes) = self.describe_stores(d, &dep);
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
                    state_topic,
                    state_keys,
                    state_bytes,
                    guarantee: if dep.kind == Kind::Transform {
                        dep.guarantee.name().to_owned()
                    } else {
                        String::new()
                    },
                }
            })
            .collect();
        Ok(PluginListResponse { plugins })
    }

    /// A stateful transform's changelog topic and the keys and bytes of its
    /// stores for the input partitions led here (empty and zeros for any
    /// other plugin).
    fn describe_stores(&self, d: &Deployed, dep: &Deployment) -> (String, u64, u64) {
        if !dep.keeps_changelog(&d.plugin) {
            return (String::new(), 0, 0);
        }
        let leads = |p: u32| self.topic(&dep.input).and_then(|t| t.held(p)).is_some_and(|p| p.leads());
        let (mut keys, mut bytes) = (0, 0);
        for (p, store) in d.stores.lock().expect("stores lock").iter() {
            if leads(*p) {
                let store = store.lock().expect("state lock");
                keys += store.len() as u64;
                bytes += store.bytes() as u64;
            }
        }
        (state_topic(&dep.name), keys, bytes)
    }

    /// A deployed plugin's component and deployment, for a client that runs
    /// it locally (a topic's partitioner).
    pub(crate) fn fetch_plugin(&self, name: &str) -> Result<PluginFetchResponse, PluginAdminError> {
        let d = self.plugins.get(name).ok_or_else(|| unknown(name))?;
        let deployment = d.deployment.read().expect("deployment lock").clone();
        if deployment.sha256.starts_with(BUILTIN_PREFIX) {
            return Err(invalid(format!("plugin '{name}' is built into the broker; it has no component")));
        }
        let wasm = std::fs::read(self.plugins.blob_path(&deployment.sha256)).map_err(PluginAdminError::Storage)?;
        Ok(PluginFetchResponse {
            name: deployment.name,
            version: deployment.version,
            kind: deployment.kind.name().to_string(),
            sha256: deployment.sha256,
            params: deployment.params,
            wasm: Bytes::from(wasm),
        })
    }

    pub(crate) fn plugin_logs(&self, name: &str, since: u64) -> Result<Vec<PluginLogLine>, PluginAdminError> {
        let d = self.plugins.get(name).ok_or_else(|| unknown(name))?;
        Ok(d.monitor
            .lines_since(since)
            .into_iter()
            .map(|l| PluginLogLine { seq: l.seq, timestamp_ms: l.timestamp_ms, level: l.level, message: l.message })
            .collect())
    }

    /// One input partition of a transform, while this broker leads it: read
    /// up to the high watermark, call the plugin batch by batch, produce the
    /// outputs (acks=all, to each output partition's leader), then store
    /// progress; wait for more input.
    async fn run_transform(self: Arc<Self>, d: Arc<Deployed>, partition: u32) {
        let mut run = d.run.subscribe();
        let mut wake_all = self.wake_all.subscribe();
        let waiter = Arc::new(tokio::sync::Notify::new());
        let mut instance: Option<Instance> = None;
        // The store is kept in the deployment too, for `plugin describe`.
        // An exactly-once transform has one (empty for a stateless plugin):
        // its progress is in its changelog, committed with its outputs.
        let changelog = d.deployment.read().expect("deployment lock").keeps_changelog(&d.plugin);
        let mut state = changelog.then(|| {
            let store = StateStore::shared(self.plugins.host.config().state_max_bytes);
            d.stores.lock().expect("stores lock").insert(partition, store.clone());
            TaskState { store, ready: None, txn: None }
        });
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
            // Registered before the step reads, so that an append during
            // the step wakes the wait after it.
            wake_all.borrow_and_update();
            let input = d.deployment.read().expect("deployment lock").input.clone();
            if let Some(p) = self.topic(&input).and_then(|t| t.held(partition)) {
                p.waiters.register(&waiter);
            }
            let stateful = match &mut state {
                None => Ok(None),
                Some(s) => self.prepare_state(&d, partition, s).await,
            };
            let result = match stateful {
                Err(e) => Err(e),
                // A stateful transform runs only on a store rebuilt while
                // this broker leads the input partition.
                Ok(None) if state.is_some() => Ok(false),
                Ok(stateful) => {
                    let (broker, d2) = (self.clone(), d.clone());
                    let mut inst = instance.take();
                    let step = tokio::task::spawn_blocking(move || {
                        let r = broker.transform_step(&d2, partition, &mut inst, stateful.as_ref());
                        (r, inst)
                    })
                    .await;
                    let (result, inst) = match step {
                        Ok(x) => x,
                        Err(e) => (Err(StepError::Policy(format!("transform task failed: {e}"))), None),
                    };
                    instance = inst;
                    match result {
                        Ok(Some(step)) => {
                            let cursor = step.cursor;
                            let finished = self.finish_step(&d, partition, step, state.as_mut()).await;
                            if let (Ok(_), Some(s)) = (&finished, &mut state)
                                && let Some(ready) = &mut s.ready
                            {
                                ready.next = Some(cursor);
                            }
                            finished
                        }
                        Ok(None) => Ok(false),
                        Err(e) => Err(e),
                    }
                }
            };
            if let (Err(_), Some(s)) = (&result, &mut state) {
                // The store may hold a step that was not written: rebuild
                // it from the changelog before the next one.
                s.ready = None;
            }
            match result {
                Ok(true) => continue,
                Ok(false) => {
                    self.commit_progress(&d, true).await;
                    // Caught up (or not the leader): wait for an append or a
                    // pause.
                    tokio::select! {
                        () = waiter.notified() => {}
                        changed = wake_all.changed() => if changed.is_err() { return },
                        changed = run.changed() => if changed.is_err() { return },
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                Err(StepError::Retry(reason)) => {
                    // The outputs could not all be written: nothing is
                    // recorded as done, the step runs again (some outputs
                    // may be written twice: at-least-once).
                    d.monitor.log("warn", format!("{reason}; retrying"));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(StepError::Policy(reason)) => {
                    // The policy said fail: pause the whole transform.
                    let reason = format!("failed: {reason}");
                    d.monitor.log("error", format!("{reason}; paused (resume retries from the stored progress)"));
                    d.run.send_replace(false);
                    let version = {
                        let mut dep = d.deployment.write().expect("deployment lock");
                        dep.paused = Some(reason.clone());
                        dep.version
                    };
                    // Paused on every broker, through the metadata log.
                    let name = d.deployment.read().expect("deployment lock").name.clone();
                    let command = Command::SetPluginPaused { name, version, paused: Some(reason) };
                    if let Err(e) = self.controller.write(command).await {
                        tracing::warn!(error = %e, "cannot record a failed transform's pause");
                    }
                }
            }
        }
    }

    /// Reads what is available (up to `READ_BYTES_MAX`) and runs it through
    /// the plugin. `None` when this broker does not lead the input
    /// partition. Blocking.
    fn transform_step(
        &self,
        d: &Deployed,
        partition: u32,
        instance: &mut Option<Instance>,
        state: Option<&StepState>,
    ) -> Result<Option<Step>, StepError> {
        let dep = d.deployment.read().expect("deployment lock").clone();
        let Some(input) = self.topic(&dep.input).and_then(|t| t.held(partition)).filter(|p| p.leads()) else {
            return Ok(None);
        };
        if state.is_some_and(|s| input.leader_epoch() != Some(s.epoch)) {
            // Led by another epoch than the store was rebuilt in.
            return Ok(None);
        }
        let next = match state.and_then(|s| s.next) {
            Some(n) => n.max(input.log.log_start_offset()),
            None => self.transform_next(d, &dep, partition, &input),
        };
        let store = state.map(|s| &s.store);
        let mut step = Step { from: next, cursor: next, outputs: Outputs::new() };
        // Transforms read committed: up to the last stable offset, without
        // aborted transactions' records or transaction markers.
        let end = input.log.last_stable_offset(input.high_watermark());
        if next >= end {
            return Ok(Some(step));
        }
        let data = input.log.read(next, READ_BYTES_MAX, end).map_err(|e| StepError::Retry(e.to_string()))?;
        let aborted = input.log.aborted_transactions(next, end);
        let mut committed = ReadCommitted::new(aborted.iter().map(|a| (a.producer_id, a.first_offset)).collect());
        for item in Batches::new(data) {
            let (header, batch) = item.map_err(|e| StepError::Policy(e.to_string()))?;
            if header.next_offset() <= step.cursor {
                continue;
            }
            if !committed.keep_batch(&header, &batch) {
                step.cursor = header.next_offset();
                continue;
            }
            step.cursor = self
                .transform_batch(d, &dep, partition, &batch, step.cursor, instance, store, &mut step.outputs)
                .map_err(StepError::Policy)?;
        }
        Ok(Some(step))
    }

    /// Where a transform goes on in `partition`: the furthest of what this
    /// broker stored and what the metadata log has (another leader's
    /// progress), else the deployment's start position.
    fn transform_next(
        &self,
        d: &Deployed,
        dep: &Deployment,
        partition: u32,
        input: &crate::partition::Partition,
    ) -> i64 {
        let stored = d.progress.lock().expect("progress lock").get(&partition).copied();
        let committed = {
            let image = self.controller.image();
            let image = image.borrow();
            image
                .plugins
                .get(&dep.name)
                .filter(|p| p.version == dep.version)
                .and_then(|p| p.progress.get(&partition).copied())
        };
        let next = match stored.max(committed) {
            Some(n) => n,
            None => match dep.start {
                StartAt::Start => input.log.log_start_offset(),
                StartAt::End => input.high_watermark(),
                StartAt::Offset(n) => n,
                StartAt::Timestamp(ts) => {
                    input.log.offset_for_timestamp(ts).ok().flatten().map_or(input.high_watermark(), |(o, _)| o)
                }
            },
        };
        next.max(input.log.log_start_offset())
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
        store: Option<&SharedState>,
        outputs: &mut Outputs,
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
                        .instantiate_with_state(&dep.params, &dep.outputs, d.monitor.clone(), store.cloned())
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
                    self.collect_outputs(dep, partition, rest, &entries, outputs)?;
                    inst.count_output(produced);
                    match refusal {
                        None => return Ok(header.next_offset()),
                        Some(r) => {
                            let bad =
                                rest.get(r.index as usize).ok_or("the plugin refused a record it was not given")?;
                            self.poison(d, dep, partition, std::slice::from_ref(bad), &r.message, outputs)?;
                            first += r.index as usize + 1;
                        }
                    }
                }
                Err(e) => {
                    // The whole call failed: the policy applies to every
                    // record it was given.
                    self.poison(d, dep, partition, rest, &plugin_failure(&e), outputs)?;
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
        outputs: &mut Outputs,
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
                let (count, _) =
                    self.output_topic(topic).ok_or_else(|| format!("dead-letter topic '{topic}' does not exist"))?;
                let b = outputs
                    .entry((topic.clone(), partition % count))
                    .or_insert_with(|| BatchBuilder::new(Compression::None));
                for r in records {
                    let mut headers = r.headers.clone();
                    headers.push(Header { key: "quiver.error".into(), value: Some(Bytes::from(reason.to_owned())) });
                    let source = format!("{}/{partition}/{}", dep.input, r.offset);
                    headers.push(Header { key: "quiver.source".into(), value: Some(Bytes::from(source)) });
                    b.append(r.timestamp, r.key.as_deref(), r.value.as_deref(), &headers);
                }
                d.monitor.log("warn", format!("dead-lettered {what} to '{topic}': {reason}"));
                Ok(())
            }
        }
    }

    /// A transform's output topic: its partition count and the codec its
    /// batches are built with (the topic's, where this broker holds it).
    fn output_topic(&self, name: &str) -> Option<(u32, Compression)> {
        if let Some(t) = self.topic(name) {
            let codec = match t.config.compression {
                TopicCompression::Codec(c) => c,
                TopicCompression::Producer => Compression::None,
            };
            return Some((t.count(), codec));
        }
        let image = self.controller.image();
        let count = image.borrow().topics.get(name)?.partitions.len() as u32;
        Some((count, Compression::None))
    }

    /// Adds a call's outputs to the step's batches, by output partition, in
    /// order.
    fn collect_outputs(
        &self,
        dep: &Deployment,
        input_partition: u32,
        inputs: &[Record],
        entries: &[Entry<'_>],
        outputs: &mut Outputs,
    ) -> Result<(), String> {
        let mut topics = Vec::with_capacity(dep.outputs.len());
        for name in &dep.outputs {
            topics.push(self.output_topic(name).ok_or_else(|| format!("output topic '{name}' does not exist"))?);
        }
        for entry in entries {
            let t = entry.topic();
            let (n, codec) = topics[t as usize];
            let name = &dep.outputs[t as usize];
            let src = &inputs[entry.input() as usize];
            match entry {
                Entry::Forward { .. } => {
                    let p = src.key.as_deref().map_or(input_partition % n, |k| partition_for_key(k, n));
                    let b = outputs.entry((name.clone(), p)).or_insert_with(|| BatchBuilder::new(codec));
                    b.append(src.timestamp, src.key.as_deref(), src.value.as_deref(), &src.headers);
                }
                Entry::New { partition, key, value, headers, .. } => {
                    let p = match (partition, key) {
                        (Some(p), _) if *p < n => *p,
                        (Some(p), _) => {
                            return Err(format!("the plugin chose partition {p} of '{name}', which has {n}"));
                        }
                        (None, Some(k)) => partition_for_key(k, n),
                        (None, None) => input_partition % n,
                    };
                    let headers: Vec<Header> = headers
                        .iter()
                        .map(|(k, v)| Header { key: (*k).to_owned(), value: v.map(Bytes::copy_from_slice) })
                        .collect();
                    let b = outputs.entry((name.clone(), p)).or_insert_with(|| BatchBuilder::new(codec));
                    b.append(src.timestamp, *key, *value, &headers);
                }
            }
        }
        Ok(())
    }

    /// Produces a step's outputs, then its state changes with its progress
    /// (a stateful transform), then stores its progress: never in another
    /// order. Ok(true) if the step moved on.
    async fn finish_step(
        self: &Arc<Self>,
        d: &Deployed,
        partition: u32,
        step: Step,
        state: Option<&mut TaskState>,
    ) -> Result<bool, StepError> {
        let name = d.deployment.read().expect("deployment lock").name.clone();
        let Step { from, cursor, outputs } = step;
        match state {
            Some(s) if s.txn.is_some() => {
                if cursor == from {
                    return Ok(false);
                }
                self.commit_step(&name, partition, cursor, outputs, s).await?;
            }
            state => {
                for ((topic, p), b) in outputs {
                    self.produce_output(&topic, p, b.build(), None).await?;
                }
                if let Some(s) = state
                    && cursor > from
                {
                    let changes = s.store.lock().expect("state lock").take_changes();
                    let batch = step_batch(&changes, cursor, now_ms(), None);
                    self.produce_output(&state_topic(&name), partition, batch, None).await?;
                }
            }
        }
        let step = Step { from, cursor, outputs: Outputs::new() };
        {
            let mut progress = d.progress.lock().expect("progress lock");
            if progress.get(&partition) != Some(&step.cursor) {
                progress.insert(partition, step.cursor);
                // Written under the lock: one writer of the file at a time.
                let body = serde_json::to_vec(&*progress).expect("progress serialises");
                write_atomic(&self.plugins.progress_path(&name), &body)
                    .map_err(|e| StepError::Policy(format!("cannot store progress: {e}")))?;
            }
        }
        self.commit_progress(d, false).await;
        Ok(step.cursor > step.from)
    }

    /// An exactly-once step: its outputs, then its state changes with its
    /// progress, in one transaction of the task's producer, committed. On
    /// any failure the transaction is aborted (as its coordinator would at
    /// its timeout) and the task's producer is initialised again before the
    /// next step, which rebuilds the store from what was committed.
    async fn commit_step(
        self: &Arc<Self>,
        name: &str,
        partition: u32,
        cursor: i64,
        outputs: Outputs,
        s: &mut TaskState,
    ) -> Result<(), StepError> {
        let (producer_id, epoch) = s.txn.take().expect("an exactly-once task's producer");
        let id = transform_txn_id(name, partition);
        let written = async {
            for ((topic, p), b) in outputs {
                let batch = b.with_producer(producer_id, epoch, 0).transactional().build();
                self.produce_output(&topic, p, batch, Some(&id)).await?;
            }
            let changes = s.store.lock().expect("state lock").take_changes();
            let batch = step_batch(&changes, cursor, now_ms(), Some((producer_id, epoch)));
            self.produce_output(&state_topic(name), partition, batch, Some(&id)).await
        }
        .await;
        let ended = self.end_anywhere(&id, producer_id, epoch, written.is_ok()).await;
        match (written, ended) {
            (Ok(_), Ok(next)) => {
                s.txn = Some(next);
                Ok(())
            }
            (Ok(_), Err(e)) => Err(StepError::Retry(format!("committing the step's transaction: {e}"))),
            (Err(e), _) => Err(e),
        }
    }

    /// Writes one output batch as a producer with acks=all would: to the
    /// partition's leader, here or on another broker, acknowledged once the
    /// in-sync replicas have it on disk (in the transaction of
    /// `transactional_id`, if given). Returns the batch's base offset.
    async fn produce_output(
        self: &Arc<Self>,
        topic: &str,
        partition: u32,
        records: Bytes,
        transactional_id: Option<&str>,
    ) -> Result<i64, StepError> {
        let output = |message: String| format!("output {topic}-{partition}: {message}");
        let (code, message) = match self
            .remote_leader(topic, partition)
            .map_err(|e| StepError::Retry(output(e.to_string())))?
        {
            None => {
                let write = Write {
                    transactional_id: transactional_id.map(str::to_owned),
                    ..Write::new(topic, partition, records)
                };
                let written = self.write(vec![write], api::Acks::All, None).await;
                match written.and_then(|mut all| all.pop().unwrap_or(Err(ProduceError::Internal("no answer".into())))) {
                    Ok(written) => return Ok(written.base_offset),
                    Err(e) => (code_of_produce(&e), e.to_string()),
                }
            }
            Some(remote) => {
                let request = ProduceRequest {
                    transactional_id: transactional_id.map(str::to_owned),
                    acks: Acks::All,
                    timeout_ms: 10_000,
                    partitions: vec![ProducePartition { topic: topic.to_owned(), partition, records }],
                };
                let result = self
                    .produce_at(remote, request)
                    .await
                    .map_err(|e| StepError::Retry(output(e.message)))?
                    .partitions
                    .pop()
                    .ok_or_else(|| StepError::Retry(output("an empty produce answer".into())))?;
                match result.error {
                    ErrorCode::None => return Ok(result.base_offset),
                    code => (code, result.message),
                }
            }
        };
        // Here or there, a write is judged by its code: a retry may succeed
        // (and a transform's outputs are at-least-once anyway), or the error
        // policy decides.
        let message = output(format!("{}: {message}", code.name()));
        // An exactly-once task fenced (a newer instance of it runs, or its
        // transaction timed out) starts again as a new instance.
        let fenced = matches!(
            code,
            ErrorCode::ProducerFenced | ErrorCode::InvalidTxnState | ErrorCode::InvalidProducerIdMapping
        );
        if code.is_retriable() || fenced || matches!(code, ErrorCode::NotReplicated | ErrorCode::StorageError) {
            Err(StepError::Retry(message))
        } else {
            Err(StepError::Policy(message))
        }
    }

    /// Makes a stateful transform's store ready for a step: rebuilt from
    /// the changelog once per leader epoch of the input partition. `None`
    /// while this broker does not lead the input partition.
    async fn prepare_state(
        self: &Arc<Self>,
        d: &Deployed,
        partition: u32,
        s: &mut TaskState,
    ) -> Result<Option<StepState>, StepError> {
        let input = d.deployment.read().expect("deployment lock").input.clone();
        let epoch = self.topic(&input).and_then(|t| t.held(partition)).and_then(|p| p.leader_epoch());
        let Some(epoch) = epoch else {
            s.ready = None;
            return Ok(None);
        };
        if s.ready.is_none_or(|r| r.epoch != epoch) {
            s.ready = None;
            let (name, exactly_once) = {
                let dep = d.deployment.read().expect("deployment lock");
                (dep.name.clone(), dep.guarantee == Guarantee::ExactlyOnce)
            };
            if exactly_once {
                // Fences every earlier instance of this task (another
                // broker's, before a failover) and aborts what it left
                // open: the rebuild below reads only what was committed.
                let id = transform_txn_id(&name, partition);
                let initialised = self.init_anywhere(&id, TRANSFORM_TXN_TIMEOUT_MS).await;
                s.txn = Some(initialised.map_err(|e| StepError::Retry(format!("initialising '{id}': {e}")))?);
            }
            let started = Instant::now();
            let next = self.rebuild_state(d, partition, &s.store).await?;
            let keys = s.store.lock().expect("state lock").len();
            d.monitor.log(
                "info",
                format!(
                    "state of partition {partition} rebuilt from '{}' in {:?}: {keys} keys, input offset {}",
                    state_topic(&d.deployment.read().expect("deployment lock").name),
                    started.elapsed(),
                    next.map_or("none yet".to_owned(), |n| n.to_string())
                ),
            );
            s.ready = Some(Ready { epoch, next });
        }
        Ok(s.ready.map(|r| StepState { store: s.store.clone(), epoch: r.epoch, next: r.next }))
    }

    /// Empties `store` and replays `<name>-state` partition `partition`
    /// into it, up to a barrier written first; returns the input offset the
    /// rebuilt store stands for (none before the first step).
    async fn rebuild_state(
        self: &Arc<Self>,
        d: &Deployed,
        partition: u32,
        store: &SharedState,
    ) -> Result<Option<i64>, StepError> {
        let topic = state_topic(&d.deployment.read().expect("deployment lock").name);
        let barrier =
            self.produce_output(&topic, partition, barrier_batch(self.config.node_id, now_ms()), None).await?;
        store.lock().expect("state lock").clear();
        let mut rebuild = Rebuild::default();
        let deadline = Instant::now() + REBUILD_WAIT;
        while rebuild.next <= barrier {
            let read = Read { topic: topic.clone(), partition, offset: rebuild.next, max_bytes: REBUILD_READ_BYTES };
            // Read committed: an exactly-once step that did not commit is
            // not in the store.
            let answer = self.read_anywhere(vec![read], REBUILD_READ_BYTES, Duration::ZERO, true).await.pop();
            let (records, aborted) = match answer {
                None => (Ok(Bytes::new()), Vec::new()),
                Some(a) => (a.records, a.aborted),
            };
            let records = records.map_err(|e| StepError::Retry(format!("rebuilding the state from '{topic}': {e}")))?;
            if records.is_empty() {
                if Instant::now() >= deadline {
                    return Err(StepError::Retry(format!(
                        "rebuilding the state from '{topic}': the changelog stopped at offset {} before the \
                         barrier at {barrier}",
                        rebuild.next
                    )));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let mut store = store.lock().expect("state lock");
            rebuild.apply(&mut store, records, aborted).map_err(StepError::Policy)?;
        }
        Ok(rebuild.progress)
    }

    /// Writes this broker's new progress to the metadata log (at most once
    /// a second unless `now`), so that a new leader of an input partition
    /// goes on from there.
    async fn commit_progress(&self, d: &Deployed, now: bool) {
        let changes: Vec<(u32, i64)> = {
            let mut committed = d.committed.lock().expect("committed lock");
            if !now && committed.0.is_some_and(|at| at.elapsed() < PROGRESS_COMMIT_INTERVAL) {
                return;
            }
            let progress = d.progress.lock().expect("progress lock");
            let changes: Vec<_> =
                progress.iter().filter(|(p, n)| committed.1.get(p) != Some(n)).map(|(p, n)| (*p, *n)).collect();
            if changes.is_empty() {
                return;
            }
            committed.0 = Some(Instant::now());
            committed.1.extend(changes.iter().copied());
            changes
        };
        let (name, version) = {
            let dep = d.deployment.read().expect("deployment lock");
            (dep.name.clone(), dep.version)
        };
        if let Err(e) =
            self.controller.write(Command::PluginProgress { name, version, progress: changes.clone() }).await
        {
            tracing::debug!(error = %e, "transform progress not committed; will retry");
            let mut committed = d.committed.lock().expect("committed lock");
            for (p, _) in changes {
                committed.1.remove(&p);
            }
        }
    }
}

/// How often a transform's leader commits its progress to the metadata log
/// (a new leader may repeat up to this much: at-least-once).
const PROGRESS_COMMIT_INTERVAL: Duration = Duration::from_secs(1);

/// Output batches of one transform step, per output topic and partition, in
/// input order.
type Outputs = BTreeMap<(String, u32), BatchBuilder>;

/// A stateful (or exactly-once) transform's store, as its partition's task
/// holds it.
struct TaskState {
    store: SharedState,
    /// Set once the store is rebuilt for the input's current leader epoch.
    ready: Option<Ready>,
    /// An exactly-once task's transactional producer: its producer id and
    /// epoch (set when the store is rebuilt; taken while a step commits).
    txn: Option<(i64, i16)>,
}

/// How long an exactly-once step's transaction may stay open before its
/// coordinator aborts it.
const TRANSFORM_TXN_TIMEOUT_MS: u64 = 60_000;

/// The transactional id of an exactly-once transform's task for one input
/// partition: the same on every broker, so a new leader's task fences the
/// old one's.
fn transform_txn_id(name: &str, partition: u32) -> String {
    format!("__transform-{name}-{partition}")
}

/// Where a rebuilt store stands.
#[derive(Clone, Copy)]
struct Ready {
    /// The input partition's leader epoch the store was rebuilt in.
    epoch: i32,
    /// The next input offset the store stands for (none before the first
    /// step: the deployment's start position).
    next: Option<i64>,
}

/// What a step of a stateful transform runs on (off the runtime).
struct StepState {
    store: SharedState,
    epoch: i32,
    next: Option<i64>,
}

/// What one transform step read and produced.
struct Step {
    from: i64,
    /// The next input offset once the outputs are written.
    cursor: i64,
    outputs: Outputs,
}

enum StepError {
    /// The error policy (or a broken plugin) stops the transform.
    Policy(String),
    /// Writing the outputs failed for now (leader moved, no quorum, ...).
    Retry(String),
}

impl Broker {
    /// The deployed version of plugin `name` (0 for none).
    pub(crate) fn plugin_version(&self, name: &str) -> u32 {
        self.plugins.get(name).map_or(0, |d| d.deployment.read().expect("deployment lock").version)
    }

    /// A topic may name only deployed serializers as its key and value
    /// serializers and only a deployed partitioner as its partitioner.
    pub(crate) fn check_topic_plugins(&self, config: &TopicConfig) -> Result<(), AdminError> {
        for (key, name) in config.plugins() {
            let kind = if key == "partitioner" { Kind::Partitioner } else { Kind::Serializer };
            let d = self
                .plugins
                .get(name)
                .ok_or_else(|| AdminError::InvalidConfig(format!("{key}: plugin '{name}' is not deployed")))?;
            d.plugin.expect_kind(kind).map_err(|e| AdminError::InvalidConfig(format!("{key}: {e}")))?;
        }
        Ok(())
    }

    /// A plugin that a topic's config names cannot be removed.
    pub(crate) fn check_unused(&self, name: &str) -> Result<(), PluginAdminError> {
        let users = self.topics_using(name);
        if users.is_empty() {
            return Ok(());
        }
        Err(invalid(format!(
            "plugin '{name}' is named by the config of topic(s) {}; delete those topics first",
            users.join(", ")
        )))
    }

    /// The topics whose configs name plugin `name` (it cannot be removed
    /// while one does).
    pub(crate) fn topics_using(&self, name: &str) -> Vec<String> {
        let image = self.controller.image().borrow().clone();
        image
            .topics
            .iter()
            .filter(|(_, t)| self.image_topic_config(&t.configs).is_ok_and(|c| c.plugins().any(|(_, n)| n == name)))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Runs the topic's serializers' encode on a produced batch: keys, then
    /// values. `None` when it names none. Blocking: call off the runtime.
    pub(crate) fn encode_for_topic(&self, topic: &Topic, produced: &Bytes) -> Result<Option<Bytes>, PluginCallError> {
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
    ) -> Result<Bytes, PluginCallError> {
        let d = self.plugins.get(name).ok_or_else(|| PluginCallError::NotDeployed { name: name.to_owned() })?;
        let want = if mode == BatchMode::Filter { Kind::Filter } else { Kind::Serializer };
        d.plugin.expect_kind(want).map_err(|e| PluginCallError::WrongKind(e.to_string()))?;
        let (header, body) = batch::records_section(stored).map_err(PluginCallError::Corrupt)?;
        let records = batch::decode_section(&header, &body).map_err(PluginCallError::Corrupt)?;
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
        let plugin = format!("plugin '{name}'");
        let called = d
            .with_instance(params, |inst| match mode {
                BatchMode::Encode | BatchMode::EncodeKeys => inst.serialize(&input, true),
                BatchMode::Decode | BatchMode::DecodeKeys => inst.serialize(&input, false),
                BatchMode::Filter => inst.filter(&input),
            })
            .map_err(|e| PluginCallError::Failed { plugin: plugin.clone(), detail: e.to_string() })?;
        let failed = |source: CallError| PluginCallError::Stopped { plugin: plugin.clone(), source };
        let out = called.map_err(failed)?;
        if let Some(r) = &out.refusal {
            return Err(PluginCallError::Rejected {
                index: r.index,
                what: mode.what(),
                name: name.to_owned(),
                message: r.message.clone(),
            });
        }
        let entries = out.decode(input.count, 1).map_err(failed)?;
        if mode != BatchMode::Filter && entries.len() != records.len() {
            return Err(failed(CallError::BadOutput(format!(
                "a serializer must answer every record: {} outputs for {} records",
                entries.len(),
                records.len()
            ))));
        }
        let codec = header.compression().map_err(PluginCallError::Corrupt)?;
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
fn keys_as_values(header: &batch::BatchHeader, records: &[Record]) -> Result<Bytes, PluginCallError> {
    let mut b = BatchBuilder::rebuild_of(header, Compression::None);
    for r in records {
        b.append_at((r.offset - header.base_offset) as i32, r.timestamp, None, r.key.as_deref(), &r.headers);
    }
    Ok(batch::records_section(&b.build()).map_err(PluginCallError::Corrupt)?.1)
}

fn plugin_failure(e: &CallError) -> String {
    format!("plugin {e}")
}

/// Plugin names follow topic-name rules (they name files).
fn validate_plugin_name(name: &str) -> Result<(), String> {
    crate::topic::validate_topic_name(name).map_err(|e| e.replace("topic name", "plugin name"))
}
