//! Moving a single node's metadata from files into its metadata log, once.
//!
//! Releases before the one-voter controller kept a single node's metadata
//! in files: `topics.json` (records with no metadata-log id),
//! `plugins/registry.json` with `plugins/progress/<name>.json`, and
//! `producer-ids`. The first start with a metadata log moves them into it:
//! 1. before the controller starts, [`pending`] recognises that layout (no
//!    `controller/` directory yet, some of those files) and leaves the
//!    marker `metadata-migration`;
//! 2. [`run`], once this broker is registered, writes one
//!    `Command::ImportNode` (the topics, wholly on this node and led here,
//!    and the first producer id not handed out), then each plugin's
//!    deployment, committed progress and pause; then gives each partition
//!    a leader-epoch file (its batches were written in epoch 0), rewrites
//!    `topics.json` with the topics' ids, and removes `producer-ids` and
//!    the marker.
//!
//! Each step is idempotent, so a crash anywhere repeats the migration at
//! the next start and ends with the same image; the logs themselves are
//! not touched.

use std::path::Path;

use quiver_controller::{BUILTIN_PREFIX, Command, Controller, ImportedTopic, Outcome, Registration};

use crate::config::{BrokerConfig, OpenError};
use crate::files::{LOGS_DIR, METADATA_FILE, partition_dir, read_records, write_atomic, write_records};
use crate::registry::{REGISTRY_FILE, RegistryFile, blob_path, pack_blob, progress_path};

const MARKER: &str = "metadata-migration";
const PRODUCER_IDS_FILE: &str = "producer-ids";

/// Whether the data directory holds metadata still to move into the log.
/// Call before the controller starts (it creates `controller/`).
pub(crate) fn pending(data_dir: &Path) -> Result<bool, OpenError> {
    let marker = data_dir.join(MARKER);
    if marker.exists() {
        return Ok(true);
    }
    if data_dir.join("controller").exists() {
        return Ok(false);
    }
    let old = read_records(&data_dir.join(METADATA_FILE))?.iter().any(|r| r.cluster_id.is_none())
        || data_dir.join(PRODUCER_IDS_FILE).exists()
        || data_dir.join("plugins").join(REGISTRY_FILE).exists();
    if old {
        write_atomic(&marker, b"this node's metadata is being moved into its metadata log\n")
            .map_err(|source| OpenError::DataDir { path: marker, source })?;
    }
    Ok(old)
}

/// Moves the files' metadata into the log (see the module doc).
pub(crate) async fn run(config: &BrokerConfig, controller: &Controller) -> Result<(), OpenError> {
    let dir = &config.data_dir;
    let fail = |what: &str, e: &dyn std::fmt::Display| OpenError::Migration(format!("{what}: {e}"));
    let meta_path = dir.join(METADATA_FILE);
    let mut records = read_records(&meta_path)?;
    let next_producer_id = match std::fs::read_to_string(dir.join(PRODUCER_IDS_FILE)) {
        Ok(text) => text.trim().parse::<i64>().map_err(|e| fail(PRODUCER_IDS_FILE, &e))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(fail(PRODUCER_IDS_FILE, &e)),
    };
    let plugins_dir = dir.join("plugins");
    let registry = RegistryFile::read(&plugins_dir).map_err(OpenError::Migration)?;
    let topics: Vec<ImportedTopic> = records
        .iter()
        .filter(|r| r.cluster_id.is_none())
        .map(|r| ImportedTopic {
            name: r.name.clone(),
            partitions: r.partitions,
            configs: r.overrides.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        })
        .collect();
    tracing::info!(
        topics = topics.len(),
        plugins = registry.plugins.len(),
        next_producer_id,
        dir = %dir.display(),
        "moving this node's metadata from files into its metadata log (once)"
    );
    let mut registration = controller.registration();
    let registered = registration.wait_for(|r| !matches!(r, Registration::Pending)).await;
    if let Ok(r) = registered
        && let Registration::Refused(why) = &*r
    {
        return Err(OpenError::Migration(why.clone()));
    }
    let node_id = config.node_id;
    write(controller, Command::ImportNode { node_id, topics, next_producer_id }).await?;
    let image = controller.image().borrow().clone();
    let logs_dir = dir.join(LOGS_DIR);
    for r in records.iter_mut().filter(|r| r.cluster_id.is_none()) {
        let t = image.topics.get(&r.name).ok_or_else(|| fail(&r.name, &"not in the image after its import"))?;
        for p in 0..r.partitions {
            let partition = partition_dir(&logs_dir, &r.name, p);
            let epochs = partition.join(crate::partition::EPOCHS_FILE);
            if partition.is_dir() && !epochs.exists() {
                write_atomic(&epochs, b"0 0\n").map_err(|e| fail(&epochs.display().to_string(), &e))?;
            }
        }
        r.cluster_id = Some(t.id);
        r.held = Some((0..r.partitions).collect());
    }
    let mut registry = registry;
    for d in &mut registry.plugins {
        let version = match image.plugins.get(&d.name) {
            Some(p) if p.sha256 == d.sha256 => p.version,
            _ => {
                let blob = match d.sha256.starts_with(BUILTIN_PREFIX) {
                    true => None,
                    false => {
                        let path = blob_path(&plugins_dir, &d.sha256);
                        let wasm = std::fs::read(&path).map_err(|e| fail(&path.display().to_string(), &e))?;
                        Some(pack_blob(&wasm).map_err(|e| fail(&d.name, &e))?)
                    }
                };
                let spec = serde_json::to_string(d).expect("deployment serialises");
                let deploy = Command::DeployPlugin {
                    name: d.name.clone(),
                    sha256: d.sha256.clone(),
                    spec,
                    blob,
                    keep_progress: false,
                };
                match write(controller, deploy).await? {
                    Outcome::PluginVersion(v) => v,
                    other => return Err(fail(&d.name, &format!("a deploy answered {other:?}"))),
                }
            }
        };
        let progress_path = progress_path(&plugins_dir, &d.name);
        let progress: std::collections::BTreeMap<u32, i64> = match std::fs::read(&progress_path) {
            Ok(raw) => serde_json::from_slice(&raw).map_err(|e| fail(&progress_path.display().to_string(), &e))?,
            Err(_) => Default::default(),
        };
        if !progress.is_empty() {
            let progress = progress.into_iter().collect();
            write(controller, Command::PluginProgress { name: d.name.clone(), version, progress }).await?;
        }
        if d.paused.is_some() {
            write(controller, Command::SetPluginPaused { name: d.name.clone(), version, paused: d.paused.clone() })
                .await?;
        }
        // The local registry names the image's version, so the broker runs
        // the deployment it loads at open on, instead of loading it again.
        d.version = version;
    }
    if !registry.plugins.is_empty() {
        registry.write(&plugins_dir).map_err(|e| fail(REGISTRY_FILE, &e))?;
    }
    write_records(&meta_path, records).map_err(|source| OpenError::DataDir { path: meta_path, source })?;
    for done in [PRODUCER_IDS_FILE, MARKER] {
        match std::fs::remove_file(dir.join(done)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(fail(done, &e)),
            _ => {}
        }
    }
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| fail(&dir.display().to_string(), &e))?;
    tracing::info!("this node's metadata is in its metadata log now");
    Ok(())
}

async fn write(controller: &Controller, command: Command) -> Result<Outcome, OpenError> {
    controller.write(command).await.map_err(|e| OpenError::Migration(e.to_string()))
}
