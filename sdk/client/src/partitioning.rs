//! Topics that name a partitioner plugin (topic config `partitioner`).
//!
//! Records sent to such a topic without a partition are collected in one
//! batch per topic (not per partition). When that batch is sealed, either
//! the client runs the topic's partitioner on it, in this process, once per
//! batch, and splits it into per-partition batches ([`LocalPartitioner`],
//! cargo feature `plugins`, on by default); or the batch is sent as is with
//! `PARTITION_ANY` and the broker runs the same module. Both split with
//! [`quiver_protocol::partitioner::split_by_partition`], so a record lands
//! in the same partition either way.

#[cfg(feature = "plugins")]
pub(crate) use local::LocalPartitioner;

/// How a topic's records sent without a partition are placed.
#[derive(Clone)]
pub(crate) enum Placement {
    /// murmur2 of the key; sticky for keyless records (Kafka's default).
    Murmur2,
    /// The topic's partitioner plugin, run here.
    #[cfg(feature = "plugins")]
    Local(std::sync::Arc<LocalPartitioner>),
    /// The topic's partitioner plugin, run by the broker (`PARTITION_ANY`).
    Broker,
}

#[cfg(feature = "plugins")]
mod local {
    use std::sync::{Arc, Mutex, OnceLock};

    use bytes::Bytes;
    use quiver_plugin_host::{HostConfig, Input, Instance, Kind, Monitor, Plugin, PluginHost};
    use quiver_protocol::batch::{self, Record};

    use crate::Client;

    /// One plugin engine per process, shared by every producer.
    fn host() -> Result<&'static PluginHost, String> {
        static HOST: OnceLock<Result<PluginHost, String>> = OnceLock::new();
        HOST.get_or_init(|| PluginHost::new(HostConfig::default()).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(Clone::clone)
    }

    /// A topic's partitioner, downloaded from the broker and run in this
    /// process.
    pub(crate) struct LocalPartitioner {
        name: String,
        plugin: Arc<Plugin>,
        params: Vec<(String, String)>,
        monitor: Arc<Monitor>,
        /// One instance, reused across batches; replaced after a trap.
        instance: Mutex<Option<Instance>>,
    }

    impl LocalPartitioner {
        /// Downloads and compiles plugin `name` (compiling takes a while:
        /// done once per topic and producer, off the async runtime).
        pub(crate) async fn fetch(client: &Client, name: &str) -> Result<LocalPartitioner, String> {
            let fetched = client.admin().fetch_plugin(name).await.map_err(|e| e.to_string())?;
            let wasm = fetched.wasm;
            let plugin = tokio::task::spawn_blocking(move || host()?.load(&wasm).map_err(|e| e.to_string()))
                .await
                .map_err(|e| e.to_string())??;
            plugin.expect_kind(Kind::Partitioner).map_err(|e| e.to_string())?;
            let local = LocalPartitioner {
                name: name.to_string(),
                plugin,
                params: fetched.params,
                monitor: Arc::default(),
                instance: Mutex::new(None),
            };
            // Parameters are checked now, not at the first batch.
            local.with_instance(|_| ())?;
            Ok(local)
        }

        fn with_instance<R>(&self, f: impl FnOnce(&mut Instance) -> R) -> Result<R, String> {
            let mut slot = self.instance.lock().expect("partitioner instance");
            if slot.as_ref().is_none_or(|i| !i.is_usable()) {
                let instance = self.plugin.instantiate(&self.params, &[], self.monitor.clone());
                *slot = Some(instance.map_err(|e| format!("partitioner '{}': {e}", self.name))?);
            }
            Ok(f(slot.as_mut().expect("set above")))
        }

        /// The records of an uncompressed batch and the partition of each.
        /// Blocking (one plugin call for the whole batch).
        pub(crate) fn partition(&self, built: &Bytes, partitions: u32) -> Result<(Vec<Record>, Vec<u32>), String> {
            let (header, body) = batch::records_section(built).map_err(|e| e.to_string())?;
            let records = batch::decode_section(&header, &body).map_err(|e| e.to_string())?;
            let input = Input {
                base_offset: 0,
                base_timestamp: header.base_timestamp,
                count: records.len() as u32,
                records: &body,
            };
            let name = &self.name;
            match self.with_instance(|i| i.partition(&input, partitions))? {
                Ok(Ok(chosen)) => Ok((records, chosen)),
                Ok(Err(refusal)) => {
                    Err(format!("record {} rejected by partitioner '{name}': {}", refusal.index, refusal.message))
                }
                Err(e) => Err(format!("partitioner '{name}' {e}")),
            }
        }
    }
}
