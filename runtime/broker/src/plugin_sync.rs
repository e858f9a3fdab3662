//! Plugins and the metadata log. The log is the registry: a deploy, pause,
//! resume or remove is a metadata command, and every broker makes its local
//! registry (`plugins.rs`) match the image, the way it does for topics.
//! Components are content-addressed by SHA-256 and travel inside the log
//! (zstd-compressed, stored once per hash), so a broker that was down, or
//! joins later, gets every deployed plugin from the log or a snapshot, with
//! no other broker to ask.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quiver_controller::{BUILTIN_PREFIX, Blob, ClusterImage, Command, Controller, Outcome, PluginImage};
use quiver_plugin_host::{Monitor, Plugin};
use quiver_protocol::messages::{PluginAction, PluginDeployRequest, PluginListRequest};

use crate::broker::Broker;
use crate::errors::{MetadataError, PluginAdminError};
use crate::files::write_atomic;
use crate::registry::{Deployed, Deployment, Plugins, pack_blob, unknown};

/// How long an admin request waits for this broker to apply its own change.
const APPLY_WAIT: Duration = Duration::from_secs(30);

impl Broker {
    /// Stores a validated deployment in the metadata log and waits until
    /// this broker runs it.
    pub(crate) async fn deploy_in_metadata(
        &self,
        r: &PluginDeployRequest,
        plugin: &Plugin,
        deployment: Deployment,
    ) -> Result<(u32, String, String), PluginAdminError> {
        let sha256 = plugin.sha256().to_owned();
        let blob = if r.builtin.is_empty() {
            // Kept here too, so this broker need not unpack it from the log.
            let path = self.plugins.blob_path(&sha256);
            if !path.exists() {
                write_atomic(&path, &r.wasm).map_err(PluginAdminError::Storage)?;
            }
            Some(pack_blob(&r.wasm).map_err(PluginAdminError::Internal)?)
        } else {
            None
        };
        let controller = &self.controller;
        let image = controller.image().borrow().clone();
        let keep_progress = image
            .plugins
            .get(&r.name)
            .and_then(|p| serde_json::from_str::<Deployment>(&p.spec).ok())
            .is_some_and(|previous| previous.input == deployment.input);
        let command = Command::DeployPlugin {
            name: r.name.clone(),
            sha256: sha256.clone(),
            spec: serde_json::to_string(&deployment).expect("deployment serialises"),
            blob,
            keep_progress,
        };
        let version = match controller.write(command).await? {
            Outcome::PluginVersion(v) => v,
            other => return Err(MetadataError::Unexpected(format!("{other:?} to a deploy")).into()),
        };
        self.wait_for_plugin(&r.name, |d| d.is_some_and(|d| deployed_version(d) >= version)).await?;
        self.wait_for_peers(controller, &r.name, version).await?;
        tracing::info!(plugin = %r.name, version, "plugin deployed");
        Ok((version, sha256, deployment.abi_version))
    }

    /// Pause, resume or remove, through the metadata log.
    pub(crate) async fn control_in_metadata(&self, name: &str, action: PluginAction) -> Result<(), PluginAdminError> {
        self.plugins.get(name).ok_or_else(|| unknown(name))?;
        let command = match action {
            PluginAction::Pause => {
                Command::SetPluginPaused { name: name.into(), version: 0, paused: Some("paused by a user".into()) }
            }
            PluginAction::Resume => Command::SetPluginPaused { name: name.into(), version: 0, paused: None },
            PluginAction::Remove => {
                self.check_unused(name)?;
                Command::RemovePlugin { name: name.into() }
            }
        };
        self.controller.write(command).await?;
        let want_paused = action == PluginAction::Pause;
        self.wait_for_plugin(name, |d| match (action, d) {
            (PluginAction::Remove, d) => d.is_none(),
            (_, Some(d)) => d.deployment.read().expect("deployment lock").paused.is_some() == want_paused,
            (_, None) => true,
        })
        .await
    }

    /// Waits (bounded) until every other live broker runs `version` of the
    /// plugin, so that a deploy that returned is usable through any broker
    /// (a topic naming a serializer can be created anywhere at once). A
    /// broker that is down gets it from the metadata log when it returns.
    async fn wait_for_peers(&self, controller: &Controller, name: &str, version: u32) -> Result<(), PluginAdminError> {
        let link = &self.replica_link;
        let deadline = Instant::now() + APPLY_WAIT;
        let image = controller.image().borrow().clone();
        for b in image.brokers.values().filter(|b| !b.fenced && b.node_id != self.config.node_id) {
            loop {
                let request = PluginListRequest { names: Some(vec![name.to_owned()]) };
                let last = match link.list_plugins(b.node_id, b.address.clone(), request).await {
                    Ok(r) if r.plugins.iter().any(|p| p.version >= version) => break,
                    Ok(_) => format!("it runs an older version of '{name}' or none"),
                    Err(e) => e.message,
                };
                if Instant::now() > deadline {
                    return Err(PluginAdminError::NotApplied(format!(
                        "plugin '{name}' version {version} is deployed, but broker {} has not loaded it within \
                         {APPLY_WAIT:?} ({last})",
                        b.node_id
                    )));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// Waits (bounded) until this broker's registry satisfies `done`.
    async fn wait_for_plugin(
        &self,
        name: &str,
        done: impl Fn(Option<&Deployed>) -> bool,
    ) -> Result<(), PluginAdminError> {
        let deadline = Instant::now() + APPLY_WAIT;
        while !done(self.plugins.get(name).as_deref()) {
            if Instant::now() > deadline {
                return Err(PluginAdminError::NotApplied(format!(
                    "the change to plugin '{name}' is in the metadata log but this broker has not applied it yet"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Makes the local registry match the image: loads new deployments and
    /// versions, applies pauses, and (once the image is `complete`) removes
    /// what the cluster removed. Then starts transform tasks for input
    /// replicas that arrived here.
    pub(crate) async fn reconcile_plugins(self: &Arc<Self>, image: &ClusterImage, complete: bool) {
        let plugins = &self.plugins;
        let _guard = plugins.admin.lock().await;
        let mut changed = false;
        for (name, wanted) in &image.plugins {
            let local = plugins.get(name);
            if let Some(d) = &local {
                let (version, sha256) = {
                    let dep = d.deployment.read().expect("deployment lock");
                    (dep.version, dep.sha256.clone())
                };
                if version == wanted.version && sha256 == wanted.sha256 {
                    changed |= self.apply_paused(d, &wanted.paused);
                    continue;
                }
            }
            match self.install_from_image(name, wanted, image, local).await {
                Ok(()) => changed = true,
                Err(e) => tracing::error!(plugin = %name, error = %e, "cannot load a deployed plugin"),
            }
        }
        if complete {
            let gone: Vec<Arc<Deployed>> = plugins
                .deployed
                .read()
                .expect("deployed lock")
                .iter()
                .filter(|(name, _)| !image.plugins.contains_key(*name))
                .map(|(_, d)| d.clone())
                .collect();
            for d in gone {
                let (name, sha256) = {
                    let dep = d.deployment.read().expect("deployment lock");
                    (dep.name.clone(), dep.sha256.clone())
                };
                self.stop_transform(&d).await;
                plugins.deployed.write().expect("deployed lock").remove(&name);
                let _ = std::fs::remove_file(plugins.progress_path(&name));
                if !image.blobs.contains_key(&sha256) {
                    let _ = std::fs::remove_file(plugins.blob_path(&sha256));
                }
                tracing::info!(plugin = %name, "plugin removed");
                changed = true;
            }
        }
        if changed && let Err(e) = plugins.write_registry() {
            tracing::error!(error = %e, "cannot write the local plugin registry");
        }
        let all: Vec<_> = plugins.deployed.read().expect("deployed lock").values().cloned().collect();
        for d in all {
            self.start_transform(&d);
        }
    }

    /// Pauses or resumes a local deployment to match the image. True if it
    /// changed.
    fn apply_paused(&self, d: &Deployed, paused: &Option<String>) -> bool {
        let mut dep = d.deployment.write().expect("deployment lock");
        if dep.paused == *paused {
            return false;
        }
        dep.paused = paused.clone();
        d.run.send_replace(paused.is_none());
        d.monitor.log("info", paused.as_ref().map_or("resumed".to_owned(), |why| format!("paused: {why}")));
        true
    }

    /// Loads one deployment from the image (its component from the local
    /// blob store, or unpacked from the image) in place of `previous`.
    async fn install_from_image(
        self: &Arc<Self>,
        name: &str,
        wanted: &PluginImage,
        image: &ClusterImage,
        previous: Option<Arc<Deployed>>,
    ) -> Result<(), String> {
        let mut deployment: Deployment =
            serde_json::from_str(&wanted.spec).map_err(|e| format!("the deployment in the metadata: {e}"))?;
        deployment.name = name.to_owned();
        deployment.version = wanted.version;
        deployment.sha256 = wanted.sha256.clone();
        deployment.paused = wanted.paused.clone();
        let broker = self.clone();
        let sha256 = wanted.sha256.clone();
        let blob = image.blobs.get(&sha256).cloned();
        let plugin = tokio::task::spawn_blocking(move || load_component(&broker.plugins, &sha256, blob))
            .await
            .map_err(|e| e.to_string())??;
        let monitor = previous.as_ref().map(|p| p.monitor.clone()).unwrap_or_else(|| Arc::new(Monitor::default()));
        // Stopped before its progress is read: a step it finished meanwhile
        // would otherwise be done again by the new version.
        if let Some(p) = &previous {
            self.stop_transform(p).await;
        }
        let progress = match &previous {
            Some(p) if p.deployment.read().expect("deployment lock").input == deployment.input => {
                p.progress.lock().expect("progress lock").clone()
            }
            _ => {
                let _ = std::fs::remove_file(self.plugins.progress_path(name));
                BTreeMap::new()
            }
        };
        let version = deployment.version;
        let deployed = Plugins::deployed(deployment, plugin, monitor, progress);
        deployed.monitor.log("info", format!("version {version} deployed ({})", wanted.sha256));
        self.plugins.deployed.write().expect("deployed lock").insert(name.to_owned(), deployed);
        tracing::info!(plugin = %name, version, "plugin loaded from the metadata log");
        Ok(())
    }
}

fn deployed_version(d: &Deployed) -> u32 {
    d.deployment.read().expect("deployment lock").version
}

/// A component by hash: built in, in the local blob store, or unpacked from
/// the metadata (and then stored locally). Its hash is checked. Blocking.
fn load_component(plugins: &Plugins, sha256: &str, blob: Option<Blob>) -> Result<Arc<Plugin>, String> {
    if let Some(builtin) = sha256.strip_prefix(BUILTIN_PREFIX) {
        return plugins.host.builtin(builtin).map_err(|e| e.to_string());
    }
    let path = plugins.blob_path(sha256);
    let wasm = match std::fs::read(&path) {
        Ok(wasm) => wasm,
        Err(_) => {
            let blob = blob.ok_or_else(|| format!("component {sha256} is neither stored here nor in the metadata"))?;
            let wasm = zstd::stream::decode_all(&blob.0[..]).map_err(|e| format!("component {sha256}: {e}"))?;
            write_atomic(&path, &wasm).map_err(|e| format!("{}: {e}", path.display()))?;
            wasm
        }
    };
    let plugin = plugins.host.load(&wasm).map_err(|e| e.to_string())?;
    if plugin.sha256() != sha256 {
        let _ = std::fs::remove_file(&path);
        return Err(format!("component {sha256} does not match its hash ({})", plugin.sha256()));
    }
    Ok(plugin)
}
