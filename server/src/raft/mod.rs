//! Raft plumbing shared by every group: type configuration, network client,
//! peer channel pool and the internal gRPC service.

pub mod liveness;
pub mod network;
pub mod peer_link;
pub mod peers;
pub mod quiesce;
pub mod quiesce_state;
pub mod ticker;
