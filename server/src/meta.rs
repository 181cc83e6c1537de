//! The cluster map: which nodes exist and where each partition's replicas
//! live. It is the state of the metadata Raft group (group 0), replicated to
//! every node, so no external coordinator is needed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::raft::types::NodeId;

pub const DEFAULT_PARTITIONS: u32 = 64;
pub const MAX_PARTITIONS: u32 = 4096;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterMap {
    /// Bumped by every change, so nodes can tell old maps from new.
    pub version: u64,
    /// Node id → gRPC address.
    pub nodes: BTreeMap<NodeId, String>,
    pub partition_count: u32,
    pub replication_factor: u32,
    /// Replica node ids of each partition; the first is the preferred leader.
    pub replicas: Vec<Vec<NodeId>>,
}

impl ClusterMap {
    /// A fresh map with replicas spread evenly: partition p starts at node
    /// p mod n and takes the next `rf` nodes, so every node holds the same
    /// number of replicas and is preferred leader of the same number of
    /// partitions.
    pub fn initial(nodes: BTreeMap<NodeId, String>, partition_count: u32, replication_factor: u32) -> Self {
        let ids: Vec<NodeId> = nodes.keys().copied().collect();
        let n = ids.len().max(1);
        let rf = (replication_factor as usize).clamp(1, n);
        let replicas = (0..partition_count as usize)
            .map(|p| (0..rf).filter_map(|i| ids.get((p + i) % n).copied()).collect())
            .collect();
        ClusterMap { version: 1, nodes, partition_count, replication_factor: rf as u32, replicas }
    }

    pub fn is_initialized(&self) -> bool {
        self.partition_count > 0
    }

    pub fn replicas_of(&self, partition: u32) -> &[NodeId] {
        self.replicas.get(partition as usize).map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn addr_of(&self, node: NodeId) -> Option<&str> {
        self.nodes.get(&node).map(String::as_str)
    }

    /// Partitions that `node` holds a replica of.
    pub fn partitions_of(&self, node: NodeId) -> impl Iterator<Item = u32> + '_ {
        self.replicas
            .iter()
            .enumerate()
            .filter(move |(_, r)| r.contains(&node))
            .map(|(p, _)| p as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_is_even() {
        let nodes: BTreeMap<_, _> = (1..=4).map(|i| (i, format!("n{i}"))).collect();
        let map = ClusterMap::initial(nodes, 64, 3);
        for node in 1..=4 {
            assert_eq!(map.partitions_of(node).count(), 48);
            assert_eq!(map.replicas.iter().filter(|r| r[0] == node).count(), 16);
        }
        assert!(map.replicas.iter().all(|r| r.len() == 3));
        let mut distinct = map.replicas[5].clone();
        distinct.dedup();
        assert_eq!(distinct.len(), 3);
    }

    #[test]
    fn replication_factor_is_capped_by_node_count() {
        let nodes: BTreeMap<_, _> = (1..=2).map(|i| (i, format!("n{i}"))).collect();
        let map = ClusterMap::initial(nodes, 8, 3);
        assert_eq!(map.replication_factor, 2);
        assert!(map.replicas.iter().all(|r| r.len() == 2));
    }
}
