//! The Raft type configuration shared by every group on a node, and the
//! commands Tally replicates through the Raft logs.
//!
//! All groups — the metadata group and every partition group — use the same
//! [`TypeConfig`], so one storage engine, one network layer and one gRPC
//! service serve them all; the group id travels beside each message.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::meta::ClusterMap;

openraft::declare_raft_types!(
    /// Tally's openraft type configuration.
    pub TypeConfig:
        D = Command,
        R = CommandOutcome,
        NodeId = u64,
        Node = openraft::BasicNode,
);

pub type NodeId = u64;
pub type LogId = openraft::LogId<openraft::impls::leader_id_adv::LeaderId<u64, u64>>;
pub type Entry = <TypeConfig as openraft::RaftTypeConfig>::Entry;
pub type Vote = <TypeConfig as openraft::RaftTypeConfig>::Vote;
pub type StoredMembership = openraft::StoredMembership<
    openraft::impls::leader_id_adv::LeaderId<u64, u64>,
    u64,
    openraft::BasicNode,
>;
pub type SnapshotMeta =
    openraft::SnapshotMeta<openraft::impls::leader_id_adv::LeaderId<u64, u64>, u64, openraft::BasicNode>;

/// A replicated command. Entries are per batch, never per event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Command {
    /// Pre-aggregated events of one partition (partition groups only).
    Ingest(IngestBatch),
    /// Replace the cluster map (metadata group only).
    SetClusterMap(ClusterMap),
}

/// What the leader commits for a group of coalesced ingest requests: the
/// aggregated deltas and the dedup keys of the events they contain.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct IngestBatch {
    /// Leader wall clock when proposed. It stamps the dedup keys, so every
    /// replica expires them at the same log position (determinism).
    pub proposed_at_ms: u64,
    /// The leader's dedup window; keys stamped before proposed_at − window
    /// expire when this entry is applied.
    pub dedup_window_ms: u64,
    /// Per (entity, type, minute) sums of the new (non-duplicate) events.
    pub deltas: Vec<MinuteDelta>,
    /// 128-bit hashes of (entity, type, event_id) of events in `deltas` that
    /// carried an event_id.
    pub dedup_keys: Vec<u128>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MinuteDelta {
    pub entity_id: Vec<u8>,
    pub event_type: String,
    /// Start of the minute, ms since epoch.
    pub minute_ms: i64,
    pub count: u64,
    pub sum: i64,
}

/// The state machine's answer to one applied command.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CommandOutcome {
    /// Dedup keys in the entry that the state machine had already seen. Always
    /// zero when the leader's dedup invariant holds; counted and logged so a
    /// violation can never pass silently.
    pub dedup_conflicts: u32,
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Ingest(b) => write!(f, "Ingest({} deltas, {} keys)", b.deltas.len(), b.dedup_keys.len()),
            Command::SetClusterMap(m) => write!(f, "SetClusterMap(v{})", m.version),
        }
    }
}

impl fmt::Display for CommandOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CommandOutcome(conflicts={})", self.dedup_conflicts)
    }
}
