//! openraft's storage test suite, run against this store on disk.
//!
//! The suite builds node ids from `u64`, so it runs on a type configuration
//! that is the crate's [`TypeConfig`](crate::TypeConfig) with `u64` node ids;
//! every other type, and all the store's code, is the production one.

use openraft::testing::{StoreBuilder, Suite};
use openraft::{BasicNode, ErrorSubject, ErrorVerb, StorageError};
use tempfile::TempDir;

use super::{LogStore, StateMachine, io_error};
use crate::image::{Command, Outcome};

openraft::declare_raft_types!(
    SuiteConfig:
        D = Command,
        R = Outcome,
        NodeId = u64,
        Node = BasicNode,
        SnapshotData = std::io::Cursor<Vec<u8>>,
);

/// Opens a store in a fresh temporary directory, removed when the suite
/// drops the guard.
struct FreshStore;

impl StoreBuilder<SuiteConfig, LogStore<SuiteConfig>, StateMachine<SuiteConfig>, TempDir> for FreshStore {
    async fn build(&self) -> Result<(TempDir, LogStore<SuiteConfig>, StateMachine<SuiteConfig>), StorageError<u64>> {
        let open = |e| io_error(ErrorSubject::Store, ErrorVerb::Read, e);
        let dir = tempfile::tempdir().map_err(open)?;
        let log = LogStore::open(dir.path()).map_err(open)?;
        let machine = StateMachine::open(dir.path()).map_err(open)?;
        Ok((dir, log, machine))
    }
}

#[test]
fn openraft_storage_suite() {
    if let Err(e) = Suite::test_all(FreshStore) {
        panic!("openraft's storage suite failed: {e}");
    }
}
