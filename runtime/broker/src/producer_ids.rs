//! Producer ids for idempotent producers. A broker hands them out from a
//! block it took: in a cluster from the metadata quorum (so no two brokers
//! ever give out the same id), on a single node from a file in the data
//! directory. Ids of a block not handed out before a restart are skipped,
//! never reused.

use std::path::PathBuf;

use quiver_controller::{Command, Outcome};
use quiver_protocol::messages::{InitProducerIdRequest, InitProducerIdResponse};
use quiver_protocol::{ErrorCode, WireError};

use crate::broker::{Broker, storage_error, write_atomic};
use crate::cluster::write_error;

/// Ids taken per block.
pub(crate) const PRODUCER_ID_BLOCK: u32 = 1000;

/// On a single node: the first id of the next block (text).
const PRODUCER_IDS_FILE: &str = "producer-ids";

/// The ids this broker may still hand out: `next..end`.
#[derive(Default)]
pub(crate) struct ProducerIds {
    block: tokio::sync::Mutex<(i64, i64)>,
}

impl Broker {
    pub(crate) async fn init_producer_id(&self, _: InitProducerIdRequest) -> Result<InitProducerIdResponse, WireError> {
        let mut block = self.producer_ids.block.lock().await;
        if block.0 >= block.1 {
            let first = self.take_producer_ids().await?;
            *block = (first, first + i64::from(PRODUCER_ID_BLOCK));
        }
        let producer_id = block.0;
        block.0 += 1;
        Ok(InitProducerIdResponse { producer_id, producer_epoch: 0 })
    }

    /// A fresh block's first id.
    async fn take_producer_ids(&self) -> Result<i64, WireError> {
        if let Some(controller) = self.controller() {
            let command = Command::AllocateProducerIds { node_id: self.config.node_id, count: PRODUCER_ID_BLOCK };
            return match controller.write(command).await.map_err(write_error)? {
                Outcome::ProducerIds(first) => Ok(first),
                other => Err(WireError::new(ErrorCode::Internal, format!("producer id block answered {other:?}"))),
            };
        }
        let path: PathBuf = self.config.data_dir.join(PRODUCER_IDS_FILE);
        tokio::task::spawn_blocking(move || {
            let first = match std::fs::read_to_string(&path) {
                Ok(text) => text.trim().parse::<i64>().map_err(|e| {
                    storage_error(format!("{} holds '{}', not a producer id: {e}", path.display(), text.trim()))
                })?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
                Err(e) => return Err(storage_error(format!("cannot read {}: {e}", path.display()))),
            };
            // Durable before any id of the block is handed out.
            let next = first + i64::from(PRODUCER_ID_BLOCK);
            write_atomic(&path, next.to_string().as_bytes())
                .map_err(|e| storage_error(format!("cannot write {}: {e}", path.display())))?;
            Ok(first)
        })
        .await
        .map_err(storage_error)?
    }
}
