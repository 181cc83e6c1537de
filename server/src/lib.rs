//! tallyd: a Tally node.
//!
//! Layers, each depending only on those below it:
//! * [`api`] — public gRPC services (Ingest, Query, Cluster) and [`server`].
//! * [`node`] — the groups a node hosts; [`processor`] — leader-side
//!   dedup, aggregation and group commit; [`meta`] — the cluster map.
//! * [`raft`] — openraft types, network and the internal peer service.
//! * [`storage`] — RocksDB: log storage, state machine, snapshots, reads.
//!   Knows nothing of gRPC.

pub mod api;
pub mod checkpointer;
pub mod clock;
pub mod config;
pub mod crash_point;
pub mod dedup;
pub mod dedup_table;
pub mod meta;
pub mod node;
pub mod processor;
pub mod raft;
pub mod reconciler;
pub mod server;
pub mod stages;
pub mod storage;
pub mod sync;

/// The Raft instance type of every group.
pub type RaftInstance = openraft::Raft<raft::types::TypeConfig, storage::state_machine::GroupStateMachine>;
