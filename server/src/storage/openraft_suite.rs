//! openraft's own storage test suite, run against Tally's RocksDB log
//! storage and state machine.

use std::sync::Arc;

use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::TypeConfigExt;
use openraft::StorageError;

use super::log_store::LogStore;
use super::state_machine::GroupStateMachine;
use super::Engine;
use crate::type_config::TypeConfig;

struct RocksBuilder;

impl StoreBuilder<TypeConfig, LogStore, GroupStateMachine, tempfile::TempDir> for RocksBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, GroupStateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().map_err(|e| StorageError::read(TypeConfig::err_from_error(&e)))?;
        let engine = Engine::open(&dir.path().join("db"))
            .map_err(|e| StorageError::read(TypeConfig::err_from_error(&std::io::Error::from(e))))?;
        // Group 7 rather than 0, so the key prefixes are exercised.
        let sm = GroupStateMachine::open(engine.clone(), 7, &dir.path().join("snapshots"), Arc::default(), None)
            .await
            .map_err(|e| StorageError::read(TypeConfig::err_from_error(&std::io::Error::from(e))))?;
        Ok((dir, LogStore::new(engine, 7), sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite() -> Result<(), StorageError<TypeConfig>> {
    Suite::test_all(RocksBuilder).await
}
