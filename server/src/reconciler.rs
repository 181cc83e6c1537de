//! Drives every Raft group's actual membership toward the cluster map.
//!
//! Membership changes are declarative: an operator's change commits a new
//! cluster map to the metadata group, and this loop — on every node, for the
//! groups it leads — makes reality match: new replicas are added as learners
//! (caught up through log or snapshot), then, once their logs have caught up
//! with the leader's, the voter set is replaced with joint consensus. Because the target lives in the replicated map, a change
//! survives the crash of whoever started it: the next leader of each group
//! picks it up.
//!
//! A replica the map no longer assigns to a node is deleted only once the
//! group's voters no longer include the node. Until then it may still be
//! needed for a quorum: its replacement joins as a learner and can take
//! minutes to catch up (a snapshot of a large partition), and dropping the
//! old voter earlier would run a 3-replica group on 2 for all that time. A
//! removed follower may never see the entry that removed it (the leader
//! stops replicating to it), so when its own log still lists it as a voter
//! it asks the group's leader (`Cluster.Status`) for the current voters.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::{BasicNode, ServerState};

use crate::meta::ClusterMap;
use crate::node::Node;
use crate::partition_view::{partitions_settled, PeerReports};
use crate::type_config::NodeId;
use crate::RaftInstance;

const TICK: Duration = Duration::from_millis(500);
/// How long a peer gets to answer the status call that asks for a group's
/// current voters.
const STATUS_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a replica kept because it is still a voter is logged.
const KEEP_LOG_EVERY: Duration = Duration::from_secs(30);

/// `peers`: how other nodes' views are asked for (the API layer's
/// `Cluster.Status` client).
pub fn spawn(node: Arc<Node>, peers: Arc<dyn PeerReports>) {
    tokio::spawn(async move {
        let mut pass = Passes::default();
        loop {
            tokio::time::sleep(TICK).await;
            reconcile_once(&node, peers.as_ref(), &mut pass).await;
        }
    });
}

/// What one round of the loop carries to the next.
///
/// Most rounds visit only the partitions that still need work: those led
/// here whose voters differ from the map, and replicas the map moved away.
/// Every partition is visited when the map changes and at least every
/// [`FULL_PASS`] (a node that became leader of a group whose change a dead
/// leader left half done picks it up then). An idle node with 10,000
/// replicas spent most of its CPU on visiting every one of them twice a
/// second and copying the whole map for it.
#[derive(Default)]
struct Passes {
    /// Map version of the last full pass (0: none yet).
    map_version: u64,
    last_full: Option<Instant>,
    /// Partitions the last round left unsettled.
    attention: BTreeSet<u32>,
    /// When a kept replica was last logged (see [`KEEP_LOG_EVERY`]).
    kept_logged: BTreeMap<u32, Instant>,
}

/// Every partition is visited at least this often.
const FULL_PASS: Duration = Duration::from_secs(5);

/// What to do with a replica the cluster map no longer assigns to this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unwanted {
    /// Delete it: the group's membership no longer counts on it.
    Drop,
    /// This node's log still lists it as a voter, which may be stale: ask
    /// the group's leader for the current voters.
    AskLeader,
    /// Keep it: it is still a voter (or no leader could say otherwise).
    Keep,
}

/// The drop decision for an unwanted replica of node `me`. `members` and
/// `voters` are the group's membership in this node's log; `leader_voters`
/// the voters reported by the group's current leader, once asked (`None`:
/// not asked yet, or no leader answered).
///
/// A node that is no member, or only a learner, counts for no quorum and
/// may go at once. A voter goes only once the leader's voter set — which
/// contains its replacement only after the replacement was promoted —
/// excludes it. During joint consensus the voters are both configurations',
/// so the old voter stays until the change has completed.
pub fn unwanted_replica(
    me: NodeId,
    members: &BTreeSet<NodeId>,
    voters: &BTreeSet<NodeId>,
    leader_voters: Option<&BTreeSet<NodeId>>,
) -> Unwanted {
    if !members.contains(&me) || !voters.contains(&me) {
        return Unwanted::Drop;
    }
    match leader_voters {
        None => Unwanted::AskLeader,
        Some(v) if !v.contains(&me) => Unwanted::Drop,
        Some(_) => Unwanted::Keep,
    }
}

async fn reconcile_once(node: &Arc<Node>, peers: &dyn PeerReports, pass: &mut Passes) {
    let (initialized, version) = {
        let map = node.cluster_map.borrow();
        (map.is_initialized(), map.version)
    };
    if !initialized {
        return;
    }
    let full = version != pass.map_version || pass.last_full.is_none_or(|t| t.elapsed() >= FULL_PASS);
    // Metadata group: every node of the map is a voter (members join first,
    // leave last: only once no partition group still counts on them).
    let metadata_change = is_leader(&node.metadata, node.id)
        .then(|| {
            let want: BTreeSet<NodeId> = node.cluster_map.borrow().nodes.keys().copied().collect();
            let have = voters(&node.metadata);
            (want != have).then_some((want, have))
        })
        .flatten();
    if !full && metadata_change.is_none() && pass.attention.is_empty() {
        return;
    }
    // A copy, held across the awaits below; taken only when there is work.
    let map = node.map();
    if let Some((want, have)) = metadata_change {
        let joining = !want.is_subset(&have);
        let leaving = !have.is_subset(&want);
        if joining || (leaving && partitions_settled(node, peers, &map).await) {
            if let Err(e) = change_voters(&node.metadata, &map, &want, &have).await {
                tracing::warn!(error = %e, "metadata membership change");
            }
        }
    }
    let replicas = if full {
        pass.map_version = version;
        pass.last_full = Some(Instant::now());
        node.local_partitions()
    } else {
        pass.attention.iter().filter_map(|p| node.partition(*p)).collect()
    };
    let mut attention = BTreeSet::new();
    // Unwanted replicas whose own log still lists this node as a voter:
    // the leaders are asked about them together, below.
    let mut ask = Vec::new();
    for replica in replicas {
        let want: BTreeSet<NodeId> = map.replicas_of(replica.partition).iter().copied().collect();
        if want.is_empty() {
            continue;
        }
        if is_leader(&replica.raft, node.id) {
            let have = voters(&replica.raft);
            if have != want {
                attention.insert(replica.partition);
                tracing::debug!(partition = replica.partition, ?have, ?want, "moving replicas");
                let group = tally_proto::partition::group_of_partition(replica.partition);
                if let Some(q) = node.quiescence.group(group) {
                    q.prepare_write().await;
                }
                if let Err(e) = change_voters(&replica.raft, &map, &want, &have).await {
                    tracing::warn!(partition = replica.partition, error = %e, "partition membership change");
                }
            }
        } else if !want.contains(&node.id) {
            match unwanted_replica(node.id, &members(&replica.raft), &voters(&replica.raft), None) {
                Unwanted::Drop => drop_replica(node, replica.partition, &mut pass.kept_logged).await,
                Unwanted::AskLeader => ask.push(replica.partition),
                Unwanted::Keep => {}
            }
            if node.partition(replica.partition).is_some() {
                attention.insert(replica.partition);
            }
        }
    }
    pass.attention = attention;
    if ask.is_empty() {
        pass.kept_logged.clear();
        return;
    }
    let reported = leader_voters(node, peers, &map, &ask).await;
    let kept_logged = &mut pass.kept_logged;
    for partition in ask {
        let Some(replica) = node.partition(partition) else { continue };
        let leader_view = reported.get(&partition).map(|(_, _, v)| v);
        match unwanted_replica(node.id, &members(&replica.raft), &voters(&replica.raft), leader_view) {
            Unwanted::Drop => drop_replica(node, partition, kept_logged).await,
            Unwanted::AskLeader | Unwanted::Keep => {
                let due = kept_logged.get(&partition).is_none_or(|t| t.elapsed() >= KEEP_LOG_EVERY);
                if due {
                    kept_logged.insert(partition, Instant::now());
                    match reported.get(&partition) {
                        Some((leader, _, v)) => tracing::info!(
                            partition,
                            leader,
                            voters = ?v,
                            "keeping a replica the map moved away: still a voter until its replacement is promoted"
                        ),
                        None => tracing::info!(
                            partition,
                            "keeping a replica the map moved away: no leader reachable to confirm it left the voters"
                        ),
                    }
                }
            }
        }
    }
}

async fn drop_replica(node: &Arc<Node>, partition: u32, kept_logged: &mut BTreeMap<u32, Instant>) {
    match node.drop_partition(partition).await {
        Ok(()) => {
            kept_logged.remove(&partition);
        }
        Err(e) => tracing::warn!(partition, error = %e, "dropping replica"),
    }
}

/// For each of `partitions`, (leader, term, voters) as reported by the node
/// that leads it — the one with the highest term if several claim to (a
/// stale leader cut off from the others may not know it was deposed).
/// Every other node of the map is asked at once, each call bounded, so a
/// dead or paused node costs one timeout per round, not one per partition.
async fn leader_voters(
    node: &Arc<Node>,
    peers: &dyn PeerReports,
    map: &ClusterMap,
    partitions: &[u32],
) -> BTreeMap<u32, (NodeId, u64, BTreeSet<NodeId>)> {
    let calls = map.nodes.iter().filter(|(id, _)| **id != node.id).map(|(id, addr)| {
        let node: &Node = node;
        async move { Some((*id, peers.report(node, *id, &addr.addr, STATUS_TIMEOUT).await?)) }
    });
    let mut reported: BTreeMap<u32, (NodeId, u64, BTreeSet<NodeId>)> = BTreeMap::new();
    for (id, report) in futures::future::join_all(calls).await.into_iter().flatten() {
        for p in report.partitions.iter().filter(|p| p.leader == Some(id) && partitions.contains(&p.partition)) {
            let newer = reported.get(&p.partition).is_none_or(|(_, term, _)| p.term > *term);
            if newer {
                reported.insert(p.partition, (id, p.term, p.voters.iter().copied().collect()));
            }
        }
    }
    reported
}

pub fn is_leader(raft: &RaftInstance, me: NodeId) -> bool {
    let m = raft.metrics();
    let m = m.borrow_watched();
    m.state == ServerState::Leader && m.current_leader == Some(me)
}

fn voters(raft: &RaftInstance) -> BTreeSet<NodeId> {
    raft.metrics().borrow_watched().membership_config.voter_ids().collect()
}

/// Voters and learners.
fn members(raft: &RaftInstance) -> BTreeSet<NodeId> {
    raft.metrics().borrow_watched().membership_config.nodes().map(|(id, _)| *id).collect()
}

/// One step toward `want` as the voters of a group this node leads: add the
/// missing replicas as learners, then — once every one of them has caught
/// up — replace the voters (joint consensus). Never blocks on a learner: a
/// slow one (a large snapshot, a paused node) is waited for tick after tick
/// while the other groups this node leads move on.
///
/// openraft's "blocking" `add_learner` is no catch-up wait: it returns once
/// the learner is within `replication_lag_threshold` (5,000 entries) of the
/// leader, which for a partition's short log is at once — an empty, even
/// paused learner would be promoted and count toward the quorum. So
/// promotion waits on the learner's matched log itself (`lagging_learner`).
async fn change_voters(
    raft: &RaftInstance,
    map: &ClusterMap,
    want: &BTreeSet<NodeId>,
    have: &BTreeSet<NodeId>,
) -> anyhow::Result<()> {
    if raft.metrics().borrow_watched().membership_config.get_joint_config().len() > 1 {
        return Ok(()); // a change is still being committed
    }
    let known = members(raft);
    for id in want.difference(&known) {
        let addr = map.peer_addr_of(*id).ok_or_else(|| anyhow::anyhow!("node {id} has no address"))?;
        tracing::info!(node = id, "adding a learner");
        raft.add_learner(*id, BasicNode::new(addr), false).await?;
    }
    let (matched, last) = {
        let m = raft.metrics();
        let m = m.borrow_watched();
        let matched: BTreeMap<NodeId, Option<u64>> =
            m.replication.iter().flatten().map(|(id, l)| (*id, l.as_ref().map(|l| l.index))).collect();
        (matched, m.last_log_index.unwrap_or(0))
    };
    if let Some(id) = lagging_learner(want.difference(have).copied(), &matched, last) {
        tracing::debug!(node = id, matched = ?matched.get(&id), last, "learner still catching up");
        return Ok(());
    }
    tracing::info!(?have, ?want, "replacing the voters");
    raft.change_membership(want.clone(), false).await?;
    Ok(())
}

/// Entries a replica's matched log may trail the leader's and still count
/// as caught up: one replication batch (`max_payload_entries`), which it
/// receives in one round trip.
pub const CAUGHT_UP_LAG: u64 = 64;

/// Whether a replica whose matched log index is `matched` (as its leader
/// sees it; `None`: nothing acknowledged yet) has caught up with the
/// leader's `last_log_index`.
pub fn is_caught_up(matched: Option<u64>, last_log_index: u64) -> bool {
    matched.is_some_and(|m| m.saturating_add(CAUGHT_UP_LAG) >= last_log_index)
}

/// The first of `joining` that has not caught up (see [`is_caught_up`]),
/// given the leader's matched index per replica.
pub fn lagging_learner(
    mut joining: impl Iterator<Item = NodeId>,
    matched: &BTreeMap<NodeId, Option<u64>>,
    last_log_index: u64,
) -> Option<NodeId> {
    joining.find(|id| !is_caught_up(matched.get(id).copied().flatten(), last_log_index))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    #[test]
    fn a_learner_is_promoted_only_once_its_log_has_caught_up() {
        let matched = BTreeMap::from([(4, Some(1_000)), (5, Some(10)), (6, None)]);
        assert_eq!(lagging_learner([4].into_iter(), &matched, 1_000 + CAUGHT_UP_LAG), None);
        assert_eq!(lagging_learner([4, 5].into_iter(), &matched, 1_000), Some(5));
        // Nothing acknowledged yet: lagging, however short the leader's log
        // (openraft's own threshold would call it caught up).
        assert_eq!(lagging_learner([6].into_iter(), &matched, 3), Some(6));
        assert_eq!(lagging_learner([7].into_iter(), &matched, 3), Some(7), "not replicated to at all");
        assert!(!is_caught_up(Some(1_000 - CAUGHT_UP_LAG - 1), 1_000));
        assert!(is_caught_up(Some(1_000 - CAUGHT_UP_LAG), 1_000));
    }

    #[test]
    fn a_replica_that_is_no_voter_goes_at_once() {
        // Out of the membership in this node's own log.
        assert_eq!(unwanted_replica(4, &set(&[1, 2, 3]), &set(&[1, 2, 3]), None), Unwanted::Drop);
        // A learner that the map moved away again before it was promoted.
        assert_eq!(unwanted_replica(4, &set(&[1, 2, 3, 4]), &set(&[1, 2, 3]), None), Unwanted::Drop);
    }

    #[test]
    fn a_voter_stays_until_the_leader_reports_it_gone() {
        let members = set(&[1, 2, 4, 5]);
        let voters = set(&[1, 2, 4]);
        // Its own log says voter: ask the leader.
        assert_eq!(unwanted_replica(4, &members, &voters, None), Unwanted::AskLeader);
        // The replacement (5) is still a learner: the leader's voters include 4.
        assert_eq!(unwanted_replica(4, &members, &voters, Some(&set(&[1, 2, 4]))), Unwanted::Keep);
        // Joint consensus: both configurations' voters, 4 among them.
        assert_eq!(unwanted_replica(4, &members, &voters, Some(&set(&[1, 2, 4, 5]))), Unwanted::Keep);
        // Promoted: 5 replaced 4.
        assert_eq!(unwanted_replica(4, &members, &voters, Some(&set(&[1, 2, 5]))), Unwanted::Drop);
    }
}
