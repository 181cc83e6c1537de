//! The Raft type configuration shared by every group on a node.
//!
//! All groups — the metadata group and every partition group — use the same
//! [`TypeConfig`], so one storage engine, one network layer and one gRPC
//! service serve them all; the group id travels beside each message. What
//! the logs carry is [`crate::command`]; this module only names it for
//! openraft, so storage (which implements openraft's traits) and the Raft
//! plumbing can both use it without depending on each other.

pub use crate::command::{Command, CommandOutcome};
pub use crate::meta::NodeId;

openraft::declare_raft_types!(
    /// Tally's openraft type configuration.
    pub TypeConfig:
        D = Command,
        R = CommandOutcome,
        NodeId = u64,
        Node = openraft::BasicNode,
);

pub type LogId = openraft::LogId<openraft::impls::leader_id_adv::LeaderId<u64, u64>>;
pub type Entry = <TypeConfig as openraft::RaftTypeConfig>::Entry;
pub type Vote = <TypeConfig as openraft::RaftTypeConfig>::Vote;
pub type StoredMembership =
    openraft::StoredMembership<openraft::impls::leader_id_adv::LeaderId<u64, u64>, u64, openraft::BasicNode>;
pub type SnapshotMeta =
    openraft::SnapshotMeta<openraft::impls::leader_id_adv::LeaderId<u64, u64>, u64, openraft::BasicNode>;
