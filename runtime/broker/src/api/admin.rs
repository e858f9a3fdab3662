//! Administration: topics (create, delete), preferred-leader elections,
//! partition reassignments and the metadata quorum's voters — each a
//! command in the metadata log, answered once this broker's image has it
//! where a client's next request would look.

use quiver_controller::{Command, NodeId};

use crate::broker::Broker;
use crate::errors::AdminError;

/// A topic to create.
#[derive(Debug, Clone)]
pub(crate) struct NewTopic {
    pub(crate) name: String,
    pub(crate) partitions: u32,
    /// At least 1 (0 means 1).
    pub(crate) replication_factor: u16,
    /// Overrides of the broker's topic defaults, e.g. ("retention.ms", "86400000").
    pub(crate) configs: Vec<(String, String)>,
}

impl Broker {
    /// The replication factor of a topic the broker creates for itself
    /// (the offsets topic, dead-letter topics): three, or every live broker
    /// when fewer.
    pub(crate) fn internal_replication_factor(&self) -> u16 {
        let brokers = self.controller.image().borrow().brokers.values().filter(|b| !b.fenced).count();
        brokers.clamp(1, 3) as u16
    }

    /// Creates a topic the broker needs for itself unless it exists. When
    /// another request created it meanwhile, the quorum has it but this
    /// broker's image may not yet: waits until it does.
    pub(crate) async fn create_topic_unless_exists(&self, new: &NewTopic) -> Result<(), AdminError> {
        match self.create_topic(new).await {
            Ok(_) | Err(AdminError::TopicExists(_)) => Ok(()),
            Err(AdminError::Metadata(crate::errors::MetadataError::Refused(r)))
                if r.kind == quiver_controller::RefusalKind::TopicExists =>
            {
                self.wait_applied(&self.controller, |image| image.topics.contains_key(&new.name)).await;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Creates a topic through the metadata log; returns its effective
    /// configs once this broker's image has it.
    pub(crate) async fn create_topic(&self, r: &NewTopic) -> Result<Vec<(String, String)>, AdminError> {
        let controller = &self.controller;
        let (overrides, config) = self.validate_new_topic(&r.name, r.partitions, &r.configs)?;
        if config.min_insync_replicas > usize::from(r.replication_factor.max(1)) {
            return Err(AdminError::InvalidConfig(format!(
                "min.insync.replicas {} is larger than the replication factor {}: no acks=all write could succeed",
                config.min_insync_replicas,
                r.replication_factor.max(1)
            )));
        }
        let command = Command::CreateTopic {
            name: r.name.clone(),
            partitions: r.partitions,
            replication_factor: r.replication_factor.max(1),
            configs: overrides.into_iter().collect(),
        };
        controller.write(command).await?;
        self.wait_applied(controller, |image| image.topics.contains_key(&r.name)).await;
        Ok(config.to_pairs())
    }

    pub(crate) async fn delete_topic_in_metadata(&self, name: &str) -> Result<(), AdminError> {
        let controller = &self.controller;
        controller.write(Command::DeleteTopic { name: name.to_string() }).await?;
        self.wait_applied(controller, |image| !image.topics.contains_key(name)).await;
        Ok(())
    }

    /// Moves leaderships back to preferred replicas; returns the partitions
    /// whose leader changed.
    pub(crate) async fn elect_leaders(&self) -> Result<Vec<(String, u32)>, AdminError> {
        let controller = &self.controller;
        let due = controller.image().borrow().preferred_elections_due();
        if !due.is_empty() {
            controller.write(Command::PreferredElection).await?;
            self.wait_applied(controller, |image| {
                let now = image.preferred_elections_due();
                due.iter().all(|d| !now.contains(d))
            })
            .await;
        }
        Ok(due)
    }

    /// Starts moving a partition to `replicas` (it completes once the new
    /// replicas are in sync), or with `None` cancels the move in progress.
    pub(crate) async fn reassign_partition(
        &self,
        topic: String,
        partition: u32,
        replicas: Option<Vec<NodeId>>,
    ) -> Result<(), AdminError> {
        let command = match replicas {
            None => Command::CancelReassignment { topic, partition },
            Some(replicas) => Command::ReassignPartition { topic, partition, replicas },
        };
        self.controller.write(command).await?;
        Ok(())
    }

    /// Adds or removes voters of the metadata quorum; returns the voters.
    pub(crate) async fn alter_voters(&self, add: Vec<NodeId>, remove: Vec<NodeId>) -> Result<Vec<NodeId>, AdminError> {
        Ok(self.controller.alter_voters(add, remove).await?)
    }
}
