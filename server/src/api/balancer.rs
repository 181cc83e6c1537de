//! The balancer: on the metadata leader, moves leaderships toward even load
//! per node, by itself — after a node joins, after failovers piled
//! leaderships onto the survivors, under a skewed load.
//!
//! Leaders first, because moving one is cheap (a Raft leadership transfer,
//! `transfer.rs`: refused to a node that is down or behind, supervised so a
//! partition never stops taking writes). Replicas second, and only when no
//! leadership move is left to make: every replica applies every event of
//! its partition, so when the cluster is busy a node's replica load is the
//! events/s of all the partitions it holds, and [`plan_replica_move`] moves
//! one follower replica from the most loaded node to the least loaded one
//! that holds none of that partition — a map change the reconciler carries
//! out (the new replica joins as a learner, catches up, becomes a voter,
//! then the old one leaves), at most one per [`REPLICA_MOVE_EVERY`] and
//! only while no partition's membership is changing. When idle, replicas
//! stay as `meta.rs` placed them (even by count on add-node and
//! remove-node).
//!
//! What "even" means depends on the load: when the cluster takes at least
//! [`BUSY_EVENTS_PER_SEC`], each node's weight is the events/s of the
//! partitions it leads (from the leaders' own reports); when idle, it is
//! the number of partitions it leads. Never flapping:
//! * hysteresis in size — busy, only a node more than [`TOLERANCE`] above
//!   the mean counts as overloaded; idle, only a gap of two leaderships;
//! * hysteresis in time — the imbalance must be seen in two checks in a row;
//! * a move must strictly narrow the gap between the two nodes it touches,
//!   so moves cannot undo each other;
//! * at most one move per check (`--balancer-interval-ms`, 10 s), and the
//!   same partition not again within [`COOLDOWN`].
//!
//! Paused with `tally cluster balancer off` (a flag in the cluster map).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tally_proto::v1::StatusResponse;

use super::map_change::change_map;
use super::statuses::all_statuses;
use super::transfer::transfer_leadership;
use crate::meta::ClusterMap;
use crate::node::Node;
use crate::type_config::NodeId;

/// Below this many events/s in all, leaders are evened by count.
pub const BUSY_EVENTS_PER_SEC: f64 = 500.0;
/// Busy: a node this far above the mean load is overloaded.
pub const TOLERANCE: f64 = 0.2;
/// A partition whose leadership moved is left alone this long.
const COOLDOWN: Duration = Duration::from_secs(60);
/// At most one replica move this often, and a partition whose replica
/// moved is not moved again within it: a move copies the partition's state
/// and its effect on load must be seen before the next is decided.
pub const REPLICA_MOVE_EVERY: Duration = Duration::from_secs(60);
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

pub fn spawn(node: Arc<Node>) {
    let every = Duration::from_millis(node.config.balancer_interval_ms);
    if every.is_zero() {
        return;
    }
    tokio::spawn(async move {
        let mut balancer = Balancer::default();
        loop {
            tokio::time::sleep(every).await;
            let paused = node.cluster_map.borrow().balancer_paused;
            if paused || node.metadata_leader() != Some(node.id) {
                balancer = Balancer::default();
                continue;
            }
            balancer.check(&node).await;
        }
    });
}

#[derive(Default)]
struct Balancer {
    /// Checks in a row that found an imbalance.
    imbalanced: u32,
    moved_at: HashMap<u32, Instant>,
    /// Checks in a row that found a replica move to make.
    replicas_imbalanced: u32,
    replica_moved_at: Option<(u32, Instant)>,
}

impl Balancer {
    async fn check(&mut self, node: &Arc<Node>) {
        let statuses = all_statuses(node, STATUS_TIMEOUT).await;
        let map = node.map();
        self.moved_at.retain(|_, at| at.elapsed() < COOLDOWN);
        let cooling: BTreeSet<u32> = self.moved_at.keys().copied().collect();
        let Some(plan) = plan_move(&map, &statuses, &cooling) else {
            self.imbalanced = 0;
            self.check_replicas(node, &map, &statuses).await;
            return;
        };
        self.replicas_imbalanced = 0;
        self.imbalanced += 1;
        if self.imbalanced < 2 {
            return;
        }
        self.imbalanced = 0;
        self.moved_at.insert(plan.partition, Instant::now());
        match transfer_leadership(node, plan.partition, plan.to).await {
            Ok(leader) => tracing::info!(
                partition = plan.partition,
                from = plan.from,
                to = plan.to,
                leader,
                by = plan.by,
                "balancer moved a leadership"
            ),
            Err(e) => tracing::info!(partition = plan.partition, to = plan.to, error = %e, "balancer: not moved"),
        }
    }
}

impl Balancer {
    /// With no leadership to move: one replica, if the replicas' load is
    /// out of balance twice in a row and nothing is moving.
    async fn check_replicas(&mut self, node: &Arc<Node>, map: &ClusterMap, statuses: &[StatusResponse]) {
        let recent = self.replica_moved_at.filter(|(_, at)| at.elapsed() < REPLICA_MOVE_EVERY);
        let changing = statuses.iter().flat_map(|s| &s.partitions).any(|p| {
            let voters: BTreeSet<NodeId> = p.voters.iter().copied().collect();
            !p.voters.is_empty() && voters != map.replicas_of(p.partition).iter().copied().collect()
        });
        let cooling: BTreeSet<u32> = recent.map(|(p, _)| p).into_iter().collect();
        let plan = if recent.is_some() || changing { None } else { plan_replica_move(map, statuses, &cooling) };
        let Some(plan) = plan else {
            self.replicas_imbalanced = 0;
            return;
        };
        self.replicas_imbalanced += 1;
        if self.replicas_imbalanced < 2 {
            return;
        }
        self.replicas_imbalanced = 0;
        self.replica_moved_at = Some((plan.partition, Instant::now()));
        let moved = change_map(node, |map| Ok(map.with_replica_moved(plan.partition, plan.from, plan.to))).await;
        match moved {
            Ok(true) => tracing::info!(
                partition = plan.partition,
                from = plan.from,
                to = plan.to,
                "balancer moves a replica (the reconciler carries it out)"
            ),
            Ok(false) => {}
            Err(e) => tracing::info!(partition = plan.partition, error = %e.message(), "balancer: replica not moved"),
        }
    }
}

/// One leadership to move.
#[derive(Debug, Clone, PartialEq)]
pub struct Move {
    pub partition: u32,
    pub from: NodeId,
    pub to: NodeId,
    /// "load" or "count": what the nodes were weighed by.
    pub by: &'static str,
}

/// One replica to move: `partition`'s replica on `from` to `to`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaMove {
    pub partition: u32,
    pub from: NodeId,
    pub to: NodeId,
}

/// Busy clusters only: the replica move that evens the nodes' replica load
/// most (a node's load: the events/s of every partition it holds a replica
/// of, as their leaders report it), if the heaviest node is more than
/// [`TOLERANCE`] above the mean: one of its follower replicas (a leader
/// moves by `plan_move`; not `cooling`) to a node that answered and holds
/// none of the partition, such that the two nodes' gap strictly narrows.
pub fn plan_replica_move(
    map: &ClusterMap,
    statuses: &[StatusResponse],
    cooling: &BTreeSet<u32>,
) -> Option<ReplicaMove> {
    let up: BTreeSet<NodeId> = statuses.iter().map(|s| s.node_id).filter(|id| map.nodes.contains_key(id)).collect();
    if up.len() < 2 {
        return None;
    }
    // Each partition's load and leader, as its leader reports them.
    let mut partitions: BTreeMap<u32, (f64, NodeId)> = BTreeMap::new();
    for s in statuses {
        for p in s.partitions.iter().filter(|p| p.leader_node_id == s.node_id && s.node_id != 0) {
            partitions.insert(p.partition, (p.events_per_sec, s.node_id));
        }
    }
    let total: f64 = partitions.values().map(|(eps, _)| eps).sum();
    if total < BUSY_EVENTS_PER_SEC {
        return None;
    }
    let mut load: BTreeMap<NodeId, f64> = up.iter().map(|id| (*id, 0.0)).collect();
    for (partition, (eps, _)) in &partitions {
        for r in map.replicas_of(*partition) {
            if let Some(l) = load.get_mut(r) {
                *l += eps;
            }
        }
    }
    let mean = load.values().sum::<f64>() / load.len() as f64;
    let (&heaviest, &heavy) = load.iter().max_by(|a, b| a.1.total_cmp(b.1))?;
    if heavy <= mean * (1.0 + TOLERANCE) {
        return None;
    }
    let mut best: Option<(f64, ReplicaMove)> = None;
    for (&partition, &(eps, leader)) in &partitions {
        let replicas = map.replicas_of(partition);
        if leader == heaviest || !replicas.contains(&heaviest) || cooling.contains(&partition) || eps <= 0.0 {
            continue;
        }
        for (&to, &light) in load.iter().filter(|(id, _)| !replicas.contains(id)) {
            if eps >= heavy - light {
                continue;
            }
            let after = (heavy - eps - mean).abs().max((light + eps - mean).abs());
            if best.as_ref().is_none_or(|(s, _)| after < *s) {
                best = Some((after, ReplicaMove { partition, from: heaviest, to }));
            }
        }
    }
    best.map(|(_, m)| m)
}

/// The move that evens the nodes most, if they are out of balance: from
/// the heaviest node, one of its partitions (not `cooling`) to a replica
/// node that answered, such that the two nodes' gap strictly narrows.
pub fn plan_move(map: &ClusterMap, statuses: &[StatusResponse], cooling: &BTreeSet<u32>) -> Option<Move> {
    // Only nodes that answered can take a leadership.
    let up: BTreeSet<NodeId> = statuses.iter().map(|s| s.node_id).filter(|id| map.nodes.contains_key(id)).collect();
    if up.len() < 2 {
        return None;
    }
    // Each partition's leader as it reports itself, with its load.
    let mut led: BTreeMap<NodeId, Vec<(u32, f64)>> = up.iter().map(|id| (*id, Vec::new())).collect();
    for s in statuses {
        for p in s.partitions.iter().filter(|p| p.leader_node_id == s.node_id && s.node_id != 0) {
            if let Some(list) = led.get_mut(&s.node_id) {
                list.push((p.partition, p.events_per_sec));
            }
        }
    }
    let total: f64 = led.values().flatten().map(|(_, eps)| eps).sum();
    let busy = total >= BUSY_EVENTS_PER_SEC;
    let weight = |partitions: &[(u32, f64)]| -> f64 {
        if busy {
            partitions.iter().map(|(_, eps)| eps).sum()
        } else {
            partitions.len() as f64
        }
    };
    let weights: BTreeMap<NodeId, f64> = led.iter().map(|(id, ps)| (*id, weight(ps))).collect();
    let mean = weights.values().sum::<f64>() / weights.len() as f64;
    let (&heaviest, &heavy) = weights.iter().max_by(|a, b| a.1.total_cmp(b.1))?;
    let overloaded = if busy { heavy > mean * (1.0 + TOLERANCE) } else { weights.values().any(|w| heavy - w >= 2.0) };
    if !overloaded {
        return None;
    }
    let mut best: Option<(f64, Move)> = None;
    for &(partition, eps) in led.get(&heaviest).into_iter().flatten() {
        if cooling.contains(&partition) {
            continue;
        }
        let moved = if busy { eps } else { 1.0 };
        for &to in map.replicas_of(partition) {
            let Some(&light) = weights.get(&to) else { continue };
            if to == heaviest || moved <= 0.0 || moved >= heavy - light {
                continue;
            }
            // How far the two nodes end from the mean: smaller is better;
            // the preferred leader (first replica) wins ties.
            let after = (heavy - moved - mean).abs().max((light + moved - mean).abs());
            let preferred = map.replicas_of(partition).first() == Some(&to);
            let score = after - if preferred { 1e-6 } else { 0.0 };
            if best.as_ref().is_none_or(|(s, _)| score < *s) {
                let by = if busy { "load" } else { "count" };
                best = Some((score, Move { partition, from: heaviest, to, by }));
            }
        }
    }
    best.map(|(_, m)| m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::NodeAddrs;
    use tally_proto::v1::PartitionInfo;

    fn status(node: NodeId, leads: &[(u32, f64)]) -> StatusResponse {
        StatusResponse {
            node_id: node,
            partitions: leads
                .iter()
                .map(|&(partition, events_per_sec)| PartitionInfo {
                    partition,
                    leader_node_id: node,
                    events_per_sec,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn map(nodes: u64, partitions: u32) -> ClusterMap {
        ClusterMap::initial((1..=nodes).map(|i| (i, NodeAddrs::new(format!("n{i}"), ""))).collect(), partitions, 3)
    }

    #[test]
    fn a_replica_leaves_the_node_busy_partitions_pile_on() {
        // 4 nodes, RF 3: partitions 0 and 4 are both on nodes 1, 2, 3, and
        // take all the load; node 4 holds none of them.
        let map = map(4, 8);
        assert_eq!(map.replicas_of(0), &[1, 2, 3]);
        assert_eq!(map.replicas_of(4), &[1, 2, 3]);
        let statuses = [
            status(1, &[(0, 600.0), (3, 0.0)]),
            status(2, &[(4, 600.0), (1, 0.0)]),
            status(3, &[(2, 0.0)]),
            status(4, &[]),
        ];
        let m = plan_replica_move(&map, &statuses, &BTreeSet::new()).expect("node 4 carries nothing");
        assert_eq!(m.to, 4, "{m:?}");
        assert!([0, 4].contains(&m.partition));
        let leader = if m.partition == 0 { 1 } else { 2 };
        assert_ne!(m.from, leader, "a follower replica moves, never the leader's");
        let next = map.with_replica_moved(m.partition, m.from, m.to).expect("moved");
        assert!(next.replicas_of(m.partition).contains(&4) && !next.replicas_of(m.partition).contains(&m.from));
        // Cooling, or idle, or even: nothing.
        let cooling: BTreeSet<u32> = [0, 4].into_iter().collect();
        assert!(plan_replica_move(&map, &statuses, &cooling).is_none());
        let idle = [status(1, &[(0, 60.0)]), status(2, &[(4, 60.0)]), status(3, &[]), status(4, &[])];
        assert!(plan_replica_move(&map, &idle, &BTreeSet::new()).is_none());
        let even: Vec<StatusResponse> =
            (1..=4).map(|n| status(n, &[(n as u32 - 1, 300.0), (n as u32 + 3, 300.0)])).collect();
        assert!(plan_replica_move(&map, &even, &BTreeSet::new()).is_none(), "every node holds 6 of 8 equal partitions");
        // A node that did not answer takes nothing.
        assert!(plan_replica_move(&map, &statuses[..3], &BTreeSet::new()).is_none_or(|m| m.to != 4));
    }

    #[test]
    fn an_idle_new_node_gets_leaders_one_at_a_time() {
        // 4 nodes, node 4 just added: it leads nothing.
        let map = map(4, 8);
        let statuses = [
            status(1, &[(0, 0.0), (4, 0.0), (3, 0.0)]),
            status(2, &[(1, 0.0), (5, 0.0), (7, 0.0)]),
            status(3, &[(2, 0.0), (6, 0.0)]),
            status(4, &[]),
        ];
        let m = plan_move(&map, &statuses, &BTreeSet::new()).expect("node 4 is behind by 3");
        assert!([1, 2].contains(&m.from) && (m.to, m.by) == (4, "count"), "{m:?}");
        assert!(map.replicas_of(m.partition).contains(&4));
        // A gap of one is balance: nothing moves (no flapping).
        let even = [
            status(1, &[(0, 0.0), (4, 0.0)]),
            status(2, &[(1, 0.0), (5, 0.0)]),
            status(3, &[(2, 0.0), (6, 0.0)]),
            status(4, &[(3, 0.0), (7, 9.0)]),
        ];
        assert_eq!(plan_move(&map, &even, &BTreeSet::new()), None);
    }

    #[test]
    fn a_busy_node_sheds_the_leadership_that_evens_load_best() {
        let map = map(3, 6);
        let statuses = [
            status(1, &[(0, 3_000.0), (3, 900.0), (4, 100.0)]),
            status(2, &[(1, 1_000.0)]),
            status(3, &[(2, 1_000.0), (5, 0.0)]),
        ];
        let m = plan_move(&map, &statuses, &BTreeSet::new()).expect("node 1 is far above the mean");
        assert_eq!((m.from, m.partition, m.by), (1, 3, "load"), "{m:?}");
        // Moving the 3,000 events/s partition would only move the problem.
        let hot_only = [status(1, &[(0, 3_000.0)]), status(2, &[(1, 1_000.0)]), status(3, &[(2, 1_000.0)])];
        assert_eq!(plan_move(&map, &hot_only, &BTreeSet::new()), None);
        // Within the tolerance: nothing moves.
        let close = [status(1, &[(0, 1_150.0)]), status(2, &[(1, 1_000.0)]), status(3, &[(2, 1_000.0)])];
        assert_eq!(plan_move(&map, &close, &BTreeSet::new()), None);
        // A partition cooling down is not moved again.
        let cooling: BTreeSet<u32> = [3].into();
        assert_ne!(plan_move(&map, &statuses, &cooling).map(|m| m.partition), Some(3));
    }

    #[test]
    fn a_node_that_does_not_answer_takes_nothing() {
        let map = map(3, 6);
        let statuses = [status(1, &[(0, 0.0), (1, 0.0), (2, 0.0), (3, 0.0)]), status(2, &[(4, 0.0), (5, 0.0)])];
        let m = plan_move(&map, &statuses, &BTreeSet::new()).expect("1 leads 4, 2 leads 2");
        assert_eq!(m.to, 2);
    }
}
