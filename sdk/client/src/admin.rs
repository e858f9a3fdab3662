//! Topic and plugin administration.

use quiver_protocol::messages::*;

use crate::connection::{CallError, Client};

/// Creates, deletes, lists and describes topics.
#[derive(Clone)]
pub struct Admin {
    client: Client,
}

impl Client {
    pub fn admin(&self) -> Admin {
        Admin { client: self.clone() }
    }
}

impl Admin {
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// Creates a topic; `configs` are `key=value` topic configs. Returns the
    /// effective configs.
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        configs: &[(String, String)],
    ) -> Result<Vec<(String, String)>, CallError> {
        self.create_replicated_topic(name, partitions, 1, configs).await
    }

    /// Creates a topic whose partitions have `replication_factor` replicas
    /// on distinct brokers (a cluster spreads replicas and leaders).
    pub async fn create_replicated_topic(
        &self,
        name: &str,
        partitions: u32,
        replication_factor: u16,
        configs: &[(String, String)],
    ) -> Result<Vec<(String, String)>, CallError> {
        let response = self
            .client
            .call(&CreateTopicRequest { name: name.into(), partitions, replication_factor, configs: configs.to_vec() })
            .await?;
        Ok(response.configs)
    }

    pub async fn delete_topic(&self, name: &str) -> Result<(), CallError> {
        self.client.call(&DeleteTopicRequest { name: name.into() }).await?;
        Ok(())
    }

    /// Cleans every replica of compacted topic `name` now, on every broker
    /// of the cluster (each cleans the replicas it holds, whatever their
    /// dirty ratio): one answer per broker. Admin: needs a client
    /// certificate unless the brokers allow anonymous admin.
    pub async fn compact_topic(&self, name: &str) -> Result<Vec<CompactTopicResponse>, CallError> {
        let metadata = self.client.call(&MetadataRequest { topics: Some(vec![name.into()]) }).await?;
        let request = CompactTopicRequest { topic: name.into() };
        let mut answers = Vec::with_capacity(metadata.brokers.len());
        for broker in &metadata.brokers {
            answers.push(self.client.peer(&broker.address).call(&request).await?);
        }
        Ok(answers)
    }

    /// Describes the named topics, or every topic with `None`.
    pub async fn describe_topics(&self, names: Option<Vec<String>>) -> Result<Vec<TopicDescription>, CallError> {
        Ok(self.client.call(&DescribeTopicsRequest { names }).await?.topics)
    }

    pub async fn metadata(&self, topics: Option<Vec<String>>) -> Result<MetadataResponse, CallError> {
        self.client.call(&MetadataRequest { topics }).await
    }

    /// A producer id for an idempotent producer, unique in the cluster.
    pub async fn init_producer_id(&self) -> Result<InitProducerIdResponse, CallError> {
        self.client.call(&InitProducerIdRequest { transactional_id: None, transaction_timeout_ms: 0 }).await
    }

    /// Offsets for each partition: `OFFSET_EARLIEST`, `OFFSET_LATEST` or a timestamp.
    pub async fn list_offsets(
        &self,
        partitions: Vec<ListOffsetsPartition>,
    ) -> Result<Vec<ListOffsetsPartitionResult>, CallError> {
        Ok(self.client.call(&ListOffsetsRequest { partitions }).await?.partitions)
    }

    /// Deploys a plugin (or a new version of one with the same name).
    pub async fn deploy_plugin(&self, request: PluginDeployRequest) -> Result<PluginDeployResponse, CallError> {
        self.client.call(&request).await
    }

    /// The named plugins, or every plugin with `None`.
    pub async fn list_plugins(&self, names: Option<Vec<String>>) -> Result<Vec<PluginInfo>, CallError> {
        Ok(self.client.call(&PluginListRequest { names }).await?.plugins)
    }

    pub async fn control_plugin(&self, name: &str, action: PluginAction) -> Result<(), CallError> {
        self.client.call(&PluginControlRequest { name: name.into(), action }).await?;
        Ok(())
    }

    /// A deployed plugin's component with its version and parameters.
    pub async fn fetch_plugin(&self, name: &str) -> Result<PluginFetchResponse, CallError> {
        self.client.call(&PluginFetchRequest { name: name.into() }).await
    }

    /// Log lines of a plugin with a sequence number of at least `since`.
    pub async fn plugin_logs(&self, name: &str, since: u64) -> Result<Vec<PluginLogLine>, CallError> {
        Ok(self.client.call(&PluginLogsRequest { name: name.into(), since }).await?.lines)
    }
}
