//! tallyd: a Tally node.
//!
//! Layers, each depending only on those below it (no module imports one
//! above it, and there are no cycles between modules; ARCHITECTURE.md
//! states the rule and how it is checked):
//! * [`server`] — the daemon: listeners, and the background tasks it starts
//!   on the node ([`reconciler`], [`checkpointer`], [`expiry`]).
//! * [`api`] — every gRPC service, public (Ingest, Query, Cluster) and peer
//!   (`api::raft_service`). The only layer that converts to and from wire
//!   types.
//! * [`reconciler`], [`checkpointer`], [`expiry`] — work on the node from
//!   above it.
//! * [`node`] — the groups a node hosts, `Node::propose` and
//!   `Node::forward_to_leader`; [`partition_view`] — what nodes report of
//!   their groups (asked of peers through a trait the API implements).
//! * [`processor`] — leader-side dedup, aggregation and group commit.
//! * [`raft`] — network, peer links, liveness, the node ticker and
//!   quiescence: Raft plumbing that knows nothing of counting.
//! * [`storage`] — RocksDB: log storage, state machine, snapshots, reads.
//!   Knows nothing of gRPC.
//! * [`type_config`] (openraft's types), [`command`] (what the logs carry),
//!   [`meta`] (the cluster map), [`retention`] (policy and floors),
//!   [`dedup`], [`clock`], [`stages`], [`sync`]:
//!   the vocabulary below all of them.

pub mod api;
pub mod archive_manifest;
pub mod archiver;
pub mod checkpointer;
pub mod clock;
pub mod command;
pub mod config;
pub mod crash_point;
pub mod dedup;
pub mod dedup_table;
pub mod expiry;
pub mod hot_entity;
pub mod load;
pub mod meta;
pub mod metrics;
pub mod moved;
pub mod node;
pub mod partition_view;
pub mod processor;
pub mod raft;
pub mod reconciler;
pub mod retention;
pub mod server;
pub mod stages;
pub mod storage;
pub mod sync;
pub mod tls;
pub mod type_config;

/// The Raft instance type of every group.
pub type RaftInstance = openraft::Raft<type_config::TypeConfig, storage::state_machine::GroupStateMachine>;

#[cfg(test)]
mod layering_tests;
