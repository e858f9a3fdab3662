//! Producer ids for idempotent producers. A broker hands them out from a
//! block it took from the metadata log (so no two brokers ever give out the
//! same id). Ids of a block not handed out before a restart are skipped,
//! never reused.

use quiver_controller::{Command, Outcome};

use crate::broker::Broker;
use crate::errors::{AdminError, MetadataError};

/// Ids taken per block.
pub(crate) const PRODUCER_ID_BLOCK: u32 = 1000;

impl Broker {
    /// A producer id no broker has handed out (epoch 0).
    pub(crate) async fn init_producer_id(&self) -> Result<i64, AdminError> {
        let mut block = self.producer_ids.block.lock().await;
        if block.0 >= block.1 {
            let first = self.take_producer_ids().await?;
            *block = (first, first + i64::from(PRODUCER_ID_BLOCK));
        }
        let producer_id = block.0;
        block.0 += 1;
        Ok(producer_id)
    }

    /// A fresh block's first id.
    async fn take_producer_ids(&self) -> Result<i64, AdminError> {
        let command = Command::AllocateProducerIds { node_id: self.config.node_id, count: PRODUCER_ID_BLOCK };
        match self.controller.write(command).await? {
            Outcome::ProducerIds(first) => Ok(first),
            other => Err(MetadataError::Unexpected(format!("{other:?} to a producer id block")).into()),
        }
    }
}
