//! The gRPC services: the public ones (Ingest, Query, Cluster) and the peer
//! service (`raft_service`: Raft messages, snapshots, forwarded proposals).
//! They translate between protobuf and the node; all counting logic lives
//! in the processor and the storage layer, and only this layer converts to
//! and from wire types (`raft/` carries openraft's messages as opaque
//! payloads).
//!
//! Besides the services: `admission` and `decode_errors` are the tower
//! layers of the public listener (see `server.rs`), `dead_letters` the
//! dead-letter log's call and wire forms, `audit` the raw-log recount, `batch_limits` the
//! whole-batch limits Ingest and Propose share, `propose` the receiving end
//! of forwarded ingest, `node_addrs` how nodes' public and peer addresses
//! are reported and learnt, and `peer_reports` other nodes' views of their
//! groups for the reconciler and membership changes.

pub mod admission;
pub mod audit;
pub mod auth;
pub mod auto_split;
pub mod auto_spread;
pub mod balancer;
pub mod batch_limits;
pub mod cluster;
pub mod dashboard;
pub mod dead_letters;
pub mod decode_errors;
pub mod http;
pub mod ingest;
pub mod ingest_policy;
pub mod map_change;
pub mod membership;
pub mod node_addrs;
pub mod peer_reports;
pub mod propose;
pub mod query;
pub mod raft_service;
pub mod read_routing;
pub mod replica_move;
pub mod retention;
pub mod retry_hint;
pub mod shares;
pub mod split;
pub mod spread;
pub mod statuses;
pub mod top_k;
pub mod transfer;

use crate::node::ForwardError;

/// A call that could not be forwarded is retryable: the leader may be
/// reachable, or known, a moment later.
impl From<ForwardError> for tonic::Status {
    fn from(e: ForwardError) -> tonic::Status {
        tonic::Status::unavailable(format!("forwarding to the leader: {e}"))
    }
}
