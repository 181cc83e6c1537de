//! The cluster map: which nodes exist and where each partition's replicas
//! live. It is the state of the metadata Raft group (group 0), replicated to
//! every node, so no external coordinator is needed.
//!
//! Each node has two addresses: the public one clients use, and the peer one
//! Raft traffic uses (`tallyd --peer-listen`). Raft memberships hold the peer
//! address; leader hints and status answers give clients the public one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A node's id: unique in the cluster, never reused, never 0 (0 means
/// "no node" on the wire).
pub type NodeId = u64;

pub const DEFAULT_PARTITIONS: u32 = 64;
/// A node hosts one Raft group per replica; with conversations per peer and
/// one ticker per node, 10,000 partitions are a question of memory (about
/// 0.2 MiB per replica), not of timers or streams.
pub const MAX_PARTITIONS: u32 = 16_384;

/// Where a node is reached.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeAddrs {
    /// Public API (Ingest, Query, Cluster): what clients use.
    pub addr: String,
    /// Peer port (the internal Raft service): what other nodes use.
    pub peer_addr: String,
}

impl NodeAddrs {
    pub fn new(addr: impl Into<String>, peer_addr: impl Into<String>) -> NodeAddrs {
        NodeAddrs { addr: addr.into(), peer_addr: peer_addr.into() }
    }
}

/// Which event times the cluster accepts, relative to its clock when an
/// event arrives: held by the metadata group beside the map, so every node
/// applies the same policy, and changed by an admin call.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct IngestPolicy {
    /// An event older than this is refused as `TOO_LATE`. 0 = any age.
    pub allowed_lateness_ms: u64,
    /// An event further ahead than this is refused as `IN_FUTURE`.
    pub max_future_skew_ms: u64,
    /// What each partition's dead-letter log keeps of the rejected events.
    pub dead_letters: LogBounds,
    /// What each partition's raw-event log keeps of the counted events
    /// (for `tally audit`); off (`max_events` 0) by default.
    pub raw_events: LogBounds,
}

/// How much one of a partition's record logs (dead letters, raw events;
/// `storage/entry_log.rs`) keeps.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LogBounds {
    /// Records older than this on the log's clock are dropped; 0 = no age
    /// bound.
    pub keep_ms: u64,
    /// Records kept at most; 0 = none kept.
    pub max_events: u64,
}

/// No raw-event log; when one is turned on, a week of events by default.
pub const DEFAULT_RAW_EVENTS: LogBounds = LogBounds { keep_ms: 7 * 24 * 3_600_000, max_events: 0 };

/// A week of rejected events, at most 100,000 per partition.
pub const DEFAULT_DEAD_LETTERS: LogBounds = LogBounds { keep_ms: 7 * 24 * 3_600_000, max_events: 100_000 };

impl Default for IngestPolicy {
    fn default() -> Self {
        IngestPolicy {
            allowed_lateness_ms: 7 * 24 * 3_600_000,
            max_future_skew_ms: 5 * 60_000,
            dead_letters: DEFAULT_DEAD_LETTERS,
            raw_events: DEFAULT_RAW_EVENTS,
        }
    }
}

/// Why an event's time is outside the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeRejection {
    TooLate { limit_ms: i64 },
    InFuture { limit_ms: i64 },
}

impl IngestPolicy {
    /// Whether an event at `event_time_ms` may be counted at `now_ms`.
    pub fn check(&self, event_time_ms: i64, now_ms: u64) -> Result<(), TimeRejection> {
        let now = i64::try_from(now_ms).unwrap_or(i64::MAX);
        let future_limit = now.saturating_add(i64::try_from(self.max_future_skew_ms).unwrap_or(i64::MAX));
        if event_time_ms > future_limit {
            return Err(TimeRejection::InFuture { limit_ms: future_limit });
        }
        if self.allowed_lateness_ms > 0 {
            let late_limit = now.saturating_sub(i64::try_from(self.allowed_lateness_ms).unwrap_or(i64::MAX));
            if event_time_ms < late_limit {
                return Err(TimeRejection::TooLate { limit_ms: late_limit });
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterMap {
    /// Bumped by every change, so nodes can tell old maps from new.
    pub version: u64,
    /// Node id → its public and peer addresses.
    pub nodes: BTreeMap<NodeId, NodeAddrs>,
    pub partition_count: u32,
    pub replication_factor: u32,
    /// Replica node ids of each partition; the first is the preferred leader.
    pub replicas: Vec<Vec<NodeId>>,
    /// Hot entities spread over more partitions than their home
    /// (`moved.rs` argues why no event is lost or counted twice).
    #[serde(default)]
    pub spreads: BTreeMap<Vec<u8>, SpreadPlan>,
    /// The balancer (`api/balancer.rs`) moves no leadership while set
    /// (`tally cluster balancer off`).
    #[serde(default)]
    pub balancer_paused: bool,
    /// The partitioner's modulus once a partition has split (0 until then:
    /// `partition_count`, see [`ClusterMap::slot_count`]).
    #[serde(default)]
    pub slots: u32,
    /// Partitions split off others, by partition: pending while `voters`
    /// is `None` (the parent has not committed the split), and only then
    /// counted in `partition_count` and placed in `replicas`.
    #[serde(default)]
    pub splits: BTreeMap<u32, SplitPlan>,
}

/// A split as the map holds it: the partition it was split off, and the
/// hash range it takes (`tally_proto::routing`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SplitPlan {
    pub parent: u32,
    pub slot: u32,
    pub lo: u64,
    pub last: u64,
    /// The voters the new group started with, once the parent committed
    /// the split; `None` while pending.
    pub voters: Option<Vec<NodeId>>,
}

/// A hot entity's spread as the map holds it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SpreadPlan {
    /// The partitions sharing its events from `from_ms` on (never the home).
    pub partitions: Vec<u32>,
    /// Fixed by the home partition's log (`Command::Spread`); `None` while
    /// pending, when every event still goes home.
    pub from_ms: Option<i64>,
}

impl ClusterMap {
    /// A fresh map with replicas spread evenly: partition p starts at node
    /// p mod n and takes the next `rf` nodes, so every node holds the same
    /// number of replicas and is preferred leader of the same number of
    /// partitions.
    pub fn initial(nodes: BTreeMap<NodeId, NodeAddrs>, partition_count: u32, replication_factor: u32) -> Self {
        let ids: Vec<NodeId> = nodes.keys().copied().collect();
        let n = ids.len().max(1);
        let rf = (replication_factor as usize).clamp(1, n);
        let replicas = (0..partition_count as usize)
            .map(|p| (0..rf).filter_map(|i| ids.get((p + i) % n).copied()).collect())
            .collect();
        ClusterMap {
            version: 1,
            nodes,
            partition_count,
            replication_factor: rf as u32,
            replicas,
            spreads: BTreeMap::new(),
            balancer_paused: false,
            slots: 0,
            splits: BTreeMap::new(),
        }
    }

    /// The partitioner's modulus: the partition count before any split.
    pub fn slot_count(&self) -> u32 {
        if self.slots == 0 {
            self.partition_count
        } else {
            self.slots
        }
    }

    /// The map with `parent` planned to split: the upper half of its hash
    /// range to a new partition (numbered `partition_count`). One split is
    /// pending at a time; asking again for the pending one returns the map
    /// unchanged.
    pub fn with_split_planned(&self, parent: u32) -> Result<ClusterMap, String> {
        if let Some((child, plan)) = self.splits.iter().find(|(_, p)| p.voters.is_none()) {
            if plan.parent == parent {
                return Ok(self.clone());
            }
            return Err(format!(
                "partition: the split of partition {} into {child} is still pending; retry once it is active",
                plan.parent
            ));
        }
        if parent >= self.partition_count {
            return Err(format!(
                "partition: {parent} is not a partition of this cluster (it has {})",
                self.partition_count
            ));
        }
        let routing = self.routing();
        let Some((slot, lo, last)) = routing.range_of(parent) else {
            return Err(format!("partition: {parent} owns no hash range"));
        };
        if last <= lo {
            return Err(format!("partition: {parent} owns a single hash position and cannot split"));
        }
        let middle = lo + (last - lo) / 2 + 1;
        let mut next = self.clone();
        next.version += 1;
        next.slots = self.slot_count();
        next.splits.insert(self.partition_count, SplitPlan { parent, slot, lo: middle, last, voters: None });
        Ok(next)
    }

    /// The pending split, if any: the new partition's number and its plan.
    pub fn pending_split(&self) -> Option<(u32, &SplitPlan)> {
        self.splits.iter().find(|(_, p)| p.voters.is_none()).map(|(c, p)| (*c, p))
    }

    /// The map with the pending split into `child` active: the new
    /// partition counted, placed on `voters`, and routed to. `None` when
    /// there is nothing to change.
    pub fn with_split_active(&self, child: u32, voters: &[NodeId]) -> Option<ClusterMap> {
        let plan = self.splits.get(&child)?;
        if plan.voters.is_some() || child != self.partition_count || voters.is_empty() {
            return None;
        }
        let mut next = self.clone();
        next.version += 1;
        next.partition_count += 1;
        next.replicas.push(voters.to_vec());
        if let Some(plan) = next.splits.get_mut(&child) {
            plan.voters = Some(voters.to_vec());
        }
        Some(next)
    }

    /// The map with the balancer paused or running; `None` if it already is.
    pub fn with_balancer_paused(&self, paused: bool) -> Option<ClusterMap> {
        if self.balancer_paused == paused {
            return None;
        }
        let mut next = self.clone();
        next.version += 1;
        next.balancer_paused = paused;
        Some(next)
    }

    /// The map with `entity` planned to spread over `ways` partitions: the
    /// ones after its home, whose preferred leaders are on successive nodes
    /// (`initial`). Pending until the home fixes `from_ms`. An entity
    /// already spread keeps its spread (the map is returned unchanged).
    pub fn with_spread_planned(&self, entity: &[u8], ways: u32) -> Result<ClusterMap, String> {
        if ways == 0 || ways >= self.partition_count {
            return Err(format!(
                "ways: must be 1 to {} (the partitions besides the entity's home), got {ways}",
                self.partition_count.saturating_sub(1)
            ));
        }
        if self.spreads.contains_key(entity) {
            return Ok(self.clone());
        }
        let routing = self.routing();
        let home = routing.home_of(entity);
        // Never a partition of the entity's own slot (one split off its home
        // or its home's parent): such a partition refuses every event of the
        // ranges it split away, the entity's among them (`moved.rs`).
        let (slot, _) = tally_proto::routing::range_key(entity, routing.slots());
        let partitions: Vec<u32> = (1..self.partition_count)
            .map(|i| (home + i) % self.partition_count)
            .filter(|p| routing.range_of(*p).is_none_or(|(s, _, _)| s != slot))
            .take(ways as usize)
            .collect();
        if partitions.len() < ways as usize {
            return Err(format!(
                "ways: only {} partitions lie outside the entity's hash slot, got {ways}",
                partitions.len()
            ));
        }
        let mut next = self.clone();
        next.version += 1;
        next.spreads.insert(entity.to_vec(), SpreadPlan { partitions, from_ms: None });
        Ok(next)
    }

    /// The map with `entity`'s planned spread active from `from_ms`; `None`
    /// when there is nothing to change.
    pub fn with_spread_active(&self, entity: &[u8], from_ms: i64) -> Option<ClusterMap> {
        let plan = self.spreads.get(entity)?;
        if plan.from_ms.is_some() {
            return None;
        }
        let mut next = self.clone();
        next.version += 1;
        next.spreads
            .insert(entity.to_vec(), SpreadPlan { partitions: plan.partitions.clone(), from_ms: Some(from_ms) });
        Some(next)
    }

    /// How events are routed under this map: the partitioner and the
    /// active spreads.
    pub fn routing(&self) -> tally_proto::routing::Routing {
        tally_proto::routing::Routing::new(
            self.partition_count,
            self.spreads.iter().filter_map(|(entity, plan)| {
                let from_ms = plan.from_ms?;
                Some((
                    entity.clone(),
                    tally_proto::routing::SpreadRoute { from_ms, partitions: plan.partitions.clone() },
                ))
            }),
        )
        .with_splits(
            self.slot_count(),
            self.splits.iter().filter(|(_, p)| p.voters.is_some()).map(|(child, p)| tally_proto::routing::SplitRange {
                partition: *child,
                slot: p.slot,
                lo: p.lo,
            }),
        )
    }

    /// The map after `id` joins: the new node takes over replicas from the
    /// most loaded nodes until loads are even, one partition at a time, in
    /// place (so a partition's preferred leader only changes if it moved).
    /// Deterministic, so any node computes the same map.
    pub fn with_node_added(&self, id: NodeId, addr: NodeAddrs) -> ClusterMap {
        let mut next = self.clone();
        next.version += 1;
        next.nodes.insert(id, addr);
        let mut load = next.loads();
        let total: usize = load.values().sum();
        let target = total / next.nodes.len().max(1);
        for replicas in next.replicas.iter_mut() {
            if load.get(&id).copied().unwrap_or(0) >= target || replicas.contains(&id) {
                continue;
            }
            // Most loaded replica of this partition; ties go to the higher id.
            let Some((slot, &from)) =
                replicas.iter().enumerate().max_by_key(|(_, n)| (load.get(n).copied().unwrap_or(0), **n))
            else {
                continue;
            };
            if load.get(&from).copied().unwrap_or(0) <= target {
                continue;
            }
            replicas[slot] = id;
            *load.entry(from).or_default() -= 1;
            *load.entry(id).or_default() += 1;
        }
        next
    }

    /// The map after `id` leaves: each of its replicas moves to the least
    /// loaded node not already holding the partition. Fails when too few
    /// nodes would remain to keep the replication factor.
    pub fn with_node_removed(&self, id: NodeId) -> Result<ClusterMap, String> {
        if !self.nodes.contains_key(&id) {
            return Err(format!("node {id} is not in the cluster"));
        }
        if self.nodes.len() <= self.replication_factor as usize {
            return Err(format!(
                "removing node {id} would leave {} nodes for replication factor {}; add a node first",
                self.nodes.len() - 1,
                self.replication_factor
            ));
        }
        let mut next = self.clone();
        next.version += 1;
        next.nodes.remove(&id);
        let mut load = next.loads();
        load.remove(&id);
        for replicas in next.replicas.iter_mut() {
            let Some(slot) = replicas.iter().position(|n| *n == id) else { continue };
            let to = next
                .nodes
                .keys()
                .filter(|n| !replicas.contains(n))
                .min_by_key(|n| (load.get(n).copied().unwrap_or(0), **n))
                .copied();
            match to {
                Some(to) => {
                    replicas[slot] = to;
                    *load.entry(to).or_default() += 1;
                }
                None => {
                    replicas.remove(slot);
                }
            }
        }
        Ok(next)
    }

    /// The map with `partition`'s replica on `from` moved to `to` (in its
    /// place, so the preferred leader changes only if it was `from`);
    /// `None` when `from` holds none or `to` holds one already.
    pub fn with_replica_moved(&self, partition: u32, from: NodeId, to: NodeId) -> Option<ClusterMap> {
        let replicas = self.replicas.get(partition as usize)?;
        let at = replicas.iter().position(|n| *n == from)?;
        if replicas.contains(&to) || !self.nodes.contains_key(&to) {
            return None;
        }
        let mut next = self.clone();
        next.version += 1;
        next.replicas[partition as usize][at] = to;
        Some(next)
    }

    /// Replicas held per node (every node of the map listed, even at 0).
    fn loads(&self) -> BTreeMap<NodeId, usize> {
        let mut load: BTreeMap<NodeId, usize> = self.nodes.keys().map(|n| (*n, 0)).collect();
        for r in self.replicas.iter().flatten() {
            *load.entry(*r).or_default() += 1;
        }
        load
    }

    /// How `wanted` (an [`ClusterMap::initial`] map, so with the effective
    /// replication factor) differs in shape from this map: nodes and their
    /// addresses, partition count, replication factor. A peer address left
    /// empty in `wanted` matches any. Empty when the shapes agree.
    pub fn shape_differences(&self, wanted: &ClusterMap) -> Vec<String> {
        let mut differences = Vec::new();
        let ids = |m: &ClusterMap| m.nodes.keys().copied().collect::<Vec<_>>();
        if ids(self) != ids(wanted) {
            differences.push(format!(
                "nodes: the cluster has nodes {:?}, the request names {:?}",
                ids(self),
                ids(wanted)
            ));
        } else {
            for (id, want) in &wanted.nodes {
                let Some(have) = self.nodes.get(id) else { continue };
                if have.addr != want.addr {
                    differences
                        .push(format!("nodes: node {id} has addr {}, the request gives {}", have.addr, want.addr));
                }
                if !want.peer_addr.is_empty() && have.peer_addr != want.peer_addr {
                    differences.push(format!(
                        "nodes: node {id} has peer_addr {}, the request gives {}",
                        have.peer_addr, want.peer_addr
                    ));
                }
            }
        }
        if self.slot_count() != wanted.partition_count {
            differences.push(format!(
                "partitions: the cluster has {}, the request asks for {}",
                self.slot_count(),
                wanted.partition_count
            ));
        }
        if self.replication_factor != wanted.replication_factor {
            differences.push(format!(
                "replication_factor: the cluster has {}, the request asks for {} (capped by the number of nodes)",
                self.replication_factor, wanted.replication_factor
            ));
        }
        differences
    }

    pub fn is_initialized(&self) -> bool {
        self.partition_count > 0
    }

    pub fn replicas_of(&self, partition: u32) -> &[NodeId] {
        self.replicas.get(partition as usize).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The public (client) address of a node.
    pub fn addr_of(&self, node: NodeId) -> Option<&str> {
        self.nodes.get(&node).map(|n| n.addr.as_str())
    }

    /// The peer (Raft) address of a node.
    pub fn peer_addr_of(&self, node: NodeId) -> Option<&str> {
        self.nodes.get(&node).map(|n| n.peer_addr.as_str())
    }

    /// Partitions that `node` holds a replica of.
    pub fn partitions_of(&self, node: NodeId) -> impl Iterator<Item = u32> + '_ {
        self.replicas.iter().enumerate().filter(move |(_, r)| r.contains(&node)).map(|(p, _)| p as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_policy_takes_a_week_back_and_five_minutes_ahead() {
        let policy = IngestPolicy::default();
        let now = 1_800_000_000_000u64;
        let t = now as i64;
        assert_eq!(policy.check(t, now), Ok(()));
        assert_eq!(policy.check(t - 7 * 86_400_000, now), Ok(()));
        assert_eq!(
            policy.check(t - 7 * 86_400_000 - 1, now),
            Err(TimeRejection::TooLate { limit_ms: t - 7 * 86_400_000 })
        );
        assert_eq!(policy.check(t + 300_000, now), Ok(()));
        assert_eq!(policy.check(t + 300_001, now), Err(TimeRejection::InFuture { limit_ms: t + 300_000 }));
        // 0 accepts any age, and nothing overflows at the extremes.
        let any_age = IngestPolicy { allowed_lateness_ms: 0, ..policy };
        assert_eq!(any_age.check(0, now), Ok(()));
        assert!(any_age.check(i64::MAX, u64::MAX).is_ok());
        assert!(policy.check(i64::MIN, 0).is_err());
    }

    fn addrs(i: u64) -> NodeAddrs {
        NodeAddrs::new(format!("n{i}"), format!("n{i}-peer"))
    }

    #[test]
    fn a_split_is_planned_once_then_routed_when_active() {
        let nodes: BTreeMap<_, _> = (1..=3).map(|i| (i, addrs(i))).collect();
        let map = ClusterMap::initial(nodes, 4, 3);
        let planned = map.with_split_planned(1).expect("plan");
        assert_eq!(planned.with_split_planned(1).expect("again"), planned, "asking again changes nothing");
        assert!(planned.with_split_planned(2).is_err(), "one pending split at a time");
        assert_eq!(planned.partition_count, 4, "pending: not a partition yet");
        assert_eq!(planned.routing(), map.routing(), "pending: routes as before");
        let (child, plan) = planned.pending_split().expect("pending");
        assert_eq!((child, plan.parent, plan.slot), (4, 1, 1));
        let active = planned.with_split_active(4, &[2, 3, 1]).expect("activate");
        assert!(active.with_split_active(4, &[2, 3, 1]).is_none(), "once");
        assert_eq!((active.partition_count, active.slot_count()), (5, 4));
        assert_eq!(active.replicas_of(4), &[2, 3, 1]);
        let routing = active.routing();
        let (_, lo, last) = routing.range_of(4).expect("child range");
        assert_eq!((lo, last), (plan.lo, plan.last));
        assert_eq!(routing.range_of(1), Some((1, 0, plan.lo - 1)));
        // The child splits again: its upper half to partition 5.
        let again = active.with_split_planned(4).expect("plan").with_split_active(5, &[1, 2, 3]).expect("active");
        let r = again.routing();
        assert_eq!(r.range_of(4).map(|(_, lo, _)| lo), Some(plan.lo));
        assert_eq!(r.range_of(5).map(|(_, _, last)| last), Some(plan.last));
        assert!(map.with_split_planned(9).is_err());
        // A spread of an entity whose home is a split-off partition never
        // shares with a partition of its own slot (its parent refuses it).
        let entity = (0..1_000)
            .map(|i| format!("e{i}"))
            .find(|e| routing.home_of(e.as_bytes()) == 4)
            .expect("an entity of partition 4");
        assert!(active.with_spread_planned(entity.as_bytes(), 4).is_err(), "3 partitions lie outside its slot");
        let spread = active.with_spread_planned(entity.as_bytes(), 3).expect("spread");
        let shares = &spread.spreads[entity.as_bytes()].partitions;
        assert_eq!(shares, &vec![0, 2, 3]);
        assert!(!shares.contains(&1) && !shares.contains(&4), "{shares:?}");
    }

    #[test]
    fn placement_is_even() {
        let nodes: BTreeMap<_, _> = (1..=4).map(|i| (i, addrs(i))).collect();
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
    fn adding_a_node_evens_the_load_and_moves_few_replicas() {
        let nodes: BTreeMap<_, _> = (1..=3).map(|i| (i, addrs(i))).collect();
        let map = ClusterMap::initial(nodes, 64, 3);
        let next = map.with_node_added(4, addrs(4));
        assert_eq!(next.version, map.version + 1);
        for node in 1..=4 {
            assert_eq!(next.partitions_of(node).count(), 48, "node {node}");
        }
        let moved: usize =
            map.replicas.iter().zip(&next.replicas).map(|(a, b)| a.iter().zip(b).filter(|(x, y)| x != y).count()).sum();
        assert_eq!(moved, 48, "only the new node's share moves");
        assert!(next.replicas.iter().all(|r| {
            let mut s = r.clone();
            s.sort();
            s.dedup();
            s.len() == 3
        }));
    }

    #[test]
    fn removing_a_node_moves_its_replicas_to_the_others() {
        let nodes: BTreeMap<_, _> = (1..=4).map(|i| (i, addrs(i))).collect();
        let map = ClusterMap::initial(nodes, 64, 3);
        let next = map.with_node_removed(2).unwrap();
        assert!(next.replicas.iter().all(|r| r.len() == 3 && !r.contains(&2)));
        for node in [1, 3, 4] {
            assert_eq!(next.partitions_of(node).count(), 64, "node {node}");
        }
        let three = ClusterMap::initial((1..=3).map(|i| (i, addrs(i))).collect(), 8, 3);
        assert!(three.with_node_removed(1).unwrap_err().contains("add a node first"));
        assert!(three.with_node_removed(9).is_err());
    }

    #[test]
    fn both_addresses_are_kept() {
        let map = ClusterMap::initial((1..=3).map(|i| (i, addrs(i))).collect(), 8, 3).with_node_added(4, addrs(4));
        assert_eq!(map.addr_of(4), Some("n4"));
        assert_eq!(map.peer_addr_of(4), Some("n4-peer"));
        assert_eq!(map.peer_addr_of(9), None);
    }

    #[test]
    fn shape_differences_name_what_differs() {
        let map = ClusterMap::initial((1..=3).map(|i| (i, addrs(i))).collect(), 8, 3);
        let same_without_peers = (1..=3).map(|i| (i, NodeAddrs::new(format!("n{i}"), ""))).collect();
        assert!(map.shape_differences(&ClusterMap::initial(same_without_peers, 8, 3)).is_empty());
        // rf 5 on 3 nodes is rf 3: the same shape.
        assert!(map.shape_differences(&ClusterMap::initial((1..=3).map(|i| (i, addrs(i))).collect(), 8, 5)).is_empty());
        let rf2 = map.shape_differences(&ClusterMap::initial((1..=3).map(|i| (i, addrs(i))).collect(), 8, 2));
        assert_eq!(rf2.len(), 1);
        assert!(rf2[0].starts_with("replication_factor: the cluster has 3, the request asks for 2"), "{rf2:?}");
        let parts = map.shape_differences(&ClusterMap::initial((1..=3).map(|i| (i, addrs(i))).collect(), 16, 3));
        assert!(parts[0].starts_with("partitions:"), "{parts:?}");
        let two = map.shape_differences(&ClusterMap::initial((1..=2).map(|i| (i, addrs(i))).collect(), 8, 2));
        assert!(two[0].starts_with("nodes:") && two.iter().any(|d| d.starts_with("replication_factor")), "{two:?}");
        let moved = (1..=3).map(|i| (i, NodeAddrs::new(format!("n{i}"), "elsewhere"))).collect();
        assert!(map.shape_differences(&ClusterMap::initial(moved, 8, 3))[0].contains("peer_addr"));
    }

    #[test]
    fn a_spread_is_planned_then_activated_once() {
        let map = ClusterMap::initial((1..=3).map(|i| (i, addrs(i))).collect(), 8, 3);
        let home = tally_proto::partition::partition_of(b"hot", 8);
        assert!(map.with_spread_planned(b"hot", 0).unwrap_err().starts_with("ways: must be 1 to 7"));
        assert!(map.with_spread_planned(b"hot", 8).is_err());
        let planned = map.with_spread_planned(b"hot", 3).unwrap();
        assert_eq!(planned.version, map.version + 1);
        let plan = &planned.spreads[b"hot".as_slice()];
        assert_eq!(plan.partitions, (1..=3).map(|i| (home + i) % 8).collect::<Vec<_>>());
        assert_eq!(plan.from_ms, None);
        assert_eq!(planned.routing().spread_of(b"hot"), None, "pending: nothing routes differently");
        assert_eq!(planned.with_spread_planned(b"hot", 5).unwrap(), planned, "planned once");
        let active = planned.with_spread_active(b"hot", 60_000).unwrap();
        assert_eq!(active.routing().spread_of(b"hot").map(|s| s.from_ms), Some(60_000));
        assert_eq!(active.with_spread_active(b"hot", 120_000), None, "from_ms is fixed once");
        assert_eq!(map.with_spread_active(b"hot", 1), None, "nothing planned");
    }

    #[test]
    fn replication_factor_is_capped_by_node_count() {
        let nodes: BTreeMap<_, _> = (1..=2).map(|i| (i, addrs(i))).collect();
        let map = ClusterMap::initial(nodes, 8, 3);
        assert_eq!(map.replication_factor, 2);
        assert!(map.replicas.iter().all(|r| r.len() == 2));
    }
}
