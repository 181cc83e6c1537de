//! The client's picture of the cluster: which node leads which partition.
//!
//! Why route at all, when every node forwards: a forwarded batch costs one
//! extra network hop and work on a node that does not own the data. Sending
//! each partition's events straight to its leader removes both, and it is
//! cheap because the server tells the client where leaders are.
//!
//! Where the picture comes from:
//! * `Cluster.Status` of several nodes, merged ([`PartitionMap::merge`]): a
//!   node only knows the leaders of partitions it replicates, and one node's
//!   view may be stale, so for each partition the report with the highest
//!   Raft term wins.
//! * The `leaders` hints of every `IngestResponse`, applied as they arrive.
//! * Failures: a node that cannot be reached loses its leaderships in the
//!   map until the next refresh says otherwise.
//!
//! Entities are placed with [`tally_proto::partition::partition_of`], the one
//! function the server uses too, so client and server cannot disagree.

use std::collections::BTreeMap;
use std::sync::Arc;

use tally_proto::routing::{Routing, SplitRange, SpreadRoute};

use tally_proto::v1::{LeaderHint, StatusResponse};

/// One partition's replicas and leader, as far as the client knows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionRoute {
    /// Leader node id; 0 when unknown.
    pub leader: u64,
    /// Raft term the leader was reported in (0 when learnt from a hint).
    pub term: u64,
    /// Replica node ids.
    pub replicas: Vec<u64>,
    /// Voters of the partition's Raft group, as reported by the replica
    /// with the most recent view (highest term, the leader's own report
    /// preferred); empty when no replica reported. They differ from
    /// `replicas` while a membership change moves the partition.
    pub voters: Vec<u64>,
}

impl PartitionRoute {
    /// Whether the partition's Raft voters are known and differ from its
    /// replicas in the cluster map: a membership change is moving it.
    pub fn changing(&self) -> bool {
        let sorted = |v: &[u64]| {
            let mut v = v.to_vec();
            v.sort_unstable();
            v.dedup();
            v
        };
        !self.voters.is_empty() && sorted(&self.voters) != sorted(&self.replicas)
    }
}

/// Partition count, nodes and per-partition leaders.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionMap {
    partition_count: u32,
    nodes: BTreeMap<u64, String>,
    partitions: Vec<PartitionRoute>,
    /// The partitioner and the active spreads of hot entities, from the
    /// report that knows most of them. A client whose map predates a spread
    /// still counts right: the home partition answers "moved" and the node
    /// routes those events again.
    routing: Arc<Routing>,
}

impl PartitionMap {
    /// Merges the status reports of several nodes. `None` when no report
    /// comes from an initialised node.
    pub fn merge(statuses: &[StatusResponse]) -> Option<PartitionMap> {
        let initialized: Vec<&StatusResponse> = statuses.iter().filter(|s| s.initialized).collect();
        let partition_count = initialized.iter().map(|s| s.partition_count).max()?;
        let spreads = initialized
            .iter()
            .map(|s| &s.spreads)
            .max_by_key(|spreads| spreads.iter().filter(|s| s.from_ms != 0).count())
            .map(|spreads| {
                spreads
                    .iter()
                    .filter(|s| s.from_ms != 0)
                    .map(|s| {
                        (s.entity_id.clone(), SpreadRoute { from_ms: s.from_ms, partitions: s.partitions.clone() })
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        // Splits from the report with the most partitions (the newest map).
        let newest = initialized.iter().max_by_key(|s| s.partition_count);
        let slots = newest.map_or(partition_count, |s| s.slots);
        let splits: Vec<SplitRange> = newest
            .map(|s| {
                s.splits
                    .iter()
                    .filter(|s| s.active)
                    .map(|s| SplitRange { partition: s.partition, slot: s.slot, lo: s.lo })
                    .collect()
            })
            .unwrap_or_default();
        let mut map = PartitionMap {
            partition_count,
            nodes: BTreeMap::new(),
            partitions: vec![PartitionRoute::default(); partition_count as usize],
            routing: Arc::new(Routing::new(partition_count, spreads).with_splits(slots, splits)),
        };
        // (term, reported by the leader itself) of the voters taken so far.
        let mut voters_seen: Vec<Option<(u64, bool)>> = vec![None; partition_count as usize];
        for status in &initialized {
            for node in &status.nodes {
                if !node.addr.is_empty() {
                    map.nodes.insert(node.node_id, node.addr.clone());
                }
            }
            for p in &status.partitions {
                let Some(route) = map.partitions.get_mut(p.partition as usize) else { continue };
                if route.replicas.is_empty() {
                    route.replicas = p.replicas.clone();
                }
                if !p.voters.is_empty() {
                    let rank = (p.term, p.leader_node_id == status.node_id);
                    let seen = &mut voters_seen[p.partition as usize];
                    if seen.is_none_or(|s| rank > s) {
                        *seen = Some(rank);
                        route.voters = p.voters.clone();
                    }
                }
                // A known leader beats an unknown one; a higher term beats a
                // lower one (the older report is from before an election).
                let better = if p.leader_node_id == 0 { false } else { route.leader == 0 || p.term > route.term };
                if better {
                    route.leader = p.leader_node_id;
                    route.term = p.term;
                }
            }
        }
        Some(map)
    }

    /// Number of partitions (grows when a partition splits).
    pub fn partition_count(&self) -> u32 {
        self.partition_count
    }

    /// The home partition of an entity, exactly as the server computes it.
    pub fn partition_of(&self, entity_id: &[u8]) -> u32 {
        self.routing.home_of(entity_id)
    }

    /// How events are routed: the partitioner and the active spreads.
    pub fn routing(&self) -> Arc<Routing> {
        self.routing.clone()
    }

    /// Leader of `partition` and its address, when known.
    pub fn leader(&self, partition: u32) -> Option<(u64, &str)> {
        let id = self.partitions.get(partition as usize)?.leader;
        if id == 0 {
            return None;
        }
        Some((id, self.nodes.get(&id)?.as_str()))
    }

    /// Every known node: id and address.
    pub fn nodes(&self) -> impl Iterator<Item = (u64, &str)> {
        self.nodes.iter().map(|(id, addr)| (*id, addr.as_str()))
    }

    /// Address of a node.
    pub fn addr_of(&self, node: u64) -> Option<&str> {
        self.nodes.get(&node).map(String::as_str)
    }

    /// Every partition's route, indexed by partition.
    pub fn partitions(&self) -> &[PartitionRoute] {
        &self.partitions
    }

    /// Applies a leader hint from an ingest answer. Returns whether
    /// anything changed.
    pub fn apply_hint(&mut self, hint: &LeaderHint) -> bool {
        let mut changed = false;
        if hint.leader_node_id != 0 && !hint.leader_addr.is_empty() {
            let old = self.nodes.insert(hint.leader_node_id, hint.leader_addr.clone());
            changed |= old.as_deref() != Some(hint.leader_addr.as_str());
        }
        if let Some(route) = self.partitions.get_mut(hint.partition as usize) {
            if hint.leader_node_id != route.leader {
                route.leader = hint.leader_node_id;
                changed = true;
            }
        }
        changed
    }

    /// Forgets every leadership of `node` (it failed); those partitions are
    /// sent to another node, which forwards, until the map is refreshed.
    pub fn forget_node(&mut self, node: u64) {
        for route in &mut self.partitions {
            if route.leader == node {
                route.leader = 0;
            }
        }
    }

    /// Partitions without a known leader.
    pub fn leaderless(&self) -> usize {
        self.partitions.iter().filter(|p| p.leader == 0).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_proto::v1::{NodeInfo, PartitionInfo};

    fn status(node: u64, leaders: &[(u64, u64)]) -> StatusResponse {
        StatusResponse {
            node_id: node,
            initialized: true,
            partition_count: leaders.len() as u32,
            replication_factor: 3,
            nodes: (1..=3)
                .map(|id| NodeInfo { node_id: id, addr: format!("n{id}:1"), reachable: true, ..Default::default() })
                .collect(),
            partitions: leaders
                .iter()
                .enumerate()
                .map(|(p, &(leader, term))| PartitionInfo {
                    partition: p as u32,
                    replicas: vec![1, 2, 3],
                    leader_node_id: leader,
                    term,
                    commit_index: 0,
                    applied_index: 0,
                    voters: vec![1, 2, 3],
                    ..Default::default()
                })
                .collect(),
            metadata_leader_node_id: 1,
            ..Default::default()
        }
    }

    #[test]
    fn merge_prefers_known_leaders_and_higher_terms() {
        let a = status(1, &[(1, 5), (0, 7), (2, 3)]);
        let b = status(2, &[(3, 6), (2, 7), (2, 3)]);
        let map = PartitionMap::merge(&[a, b]).expect("initialised");
        assert_eq!(map.partition_count(), 3);
        assert_eq!(map.leader(0), Some((3, "n3:1")), "term 6 beats term 5");
        assert_eq!(map.leader(1), Some((2, "n2:1")), "known beats unknown");
        assert_eq!(map.leader(2), Some((2, "n2:1")));
        assert_eq!(map.leaderless(), 0);
        assert_eq!(map.nodes().count(), 3);
    }

    #[test]
    fn merge_takes_the_most_recent_voters() {
        let mut a = status(1, &[(1, 5), (2, 4)]);
        let mut b = status(2, &[(1, 5), (2, 4)]);
        let mut c = status(3, &[(0, 0), (2, 4)]);
        // Partition 0: node 2's report is as recent but node 1 leads.
        a.partitions[0].voters = vec![1, 2, 3, 4];
        b.partitions[0].voters = vec![1, 2, 3];
        // Partition 1: a report from an older term loses; node 3
        // holds no replica (reports no voters).
        b.partitions[1].voters = vec![2, 3, 1];
        a.partitions[1].voters = vec![4];
        a.partitions[1].term = 3;
        c.partitions[1].voters = vec![];
        let map = PartitionMap::merge(&[a, b, c]).expect("initialised");
        assert_eq!(map.partitions()[0].voters, vec![1, 2, 3, 4]);
        assert!(map.partitions()[0].changing());
        assert_eq!(map.partitions()[1].voters, vec![2, 3, 1]);
        assert!(!map.partitions()[1].changing(), "same set, other order");
        let unknown = PartitionRoute { replicas: vec![1, 2, 3], ..Default::default() };
        assert!(!unknown.changing(), "no voters reported: nothing to say");
    }

    #[test]
    fn merge_needs_an_initialised_node() {
        let mut s = status(1, &[(1, 1)]);
        s.initialized = false;
        assert_eq!(PartitionMap::merge(&[s]), None);
        assert_eq!(PartitionMap::merge(&[]), None);
    }

    #[test]
    fn hints_and_failures_update_leaders() {
        let mut map = PartitionMap::merge(&[status(1, &[(1, 1), (1, 1), (2, 1)])]).expect("initialised");
        assert!(map.apply_hint(&LeaderHint { partition: 0, leader_node_id: 4, leader_addr: "n4:1".into() }));
        assert_eq!(map.leader(0), Some((4, "n4:1")));
        assert!(!map.apply_hint(&LeaderHint { partition: 0, leader_node_id: 4, leader_addr: "n4:1".into() }));
        // Out-of-range partitions are ignored, not a panic.
        map.apply_hint(&LeaderHint { partition: 99, leader_node_id: 1, leader_addr: String::new() });
        map.forget_node(1);
        assert_eq!(map.leader(1), None);
        assert_eq!(map.leader(2), Some((2, "n2:1")));
        assert_eq!(map.leaderless(), 1);
    }

    #[test]
    fn partition_of_is_the_servers() {
        let map = PartitionMap::merge(&[status(1, &vec![(1, 1); 64])]).expect("initialised");
        // Pinned in tally-proto: video-1 lives in partition 55 of 64.
        assert_eq!(map.partition_of(b"video-1"), 55);
    }
}
