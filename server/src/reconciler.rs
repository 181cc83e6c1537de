//! Drives every Raft group's actual membership toward the cluster map.
//!
//! Membership changes are declarative: an operator's change commits a new
//! cluster map to the metadata group, and this loop — on every node, for the
//! groups it leads — makes reality match: new replicas are added as learners
//! (caught up through log or snapshot), then the voter set is replaced with
//! joint consensus. Because the target lives in the replicated map, a change
//! survives the crash of whoever started it: the next leader of each group
//! picks it up. Replicas a node no longer holds are deleted once the group's
//! membership no longer includes the node.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::{BasicNode, ServerState};

use crate::meta::ClusterMap;
use crate::node::Node;
use crate::raft::types::NodeId;
use crate::RaftInstance;

const TICK: Duration = Duration::from_millis(500);
/// A removed follower may never see the membership entry that removed it
/// (the leader stops replicating to it), so it also drops its replica this
/// long after the map stopped assigning it. Dropping is safe for Raft: the
/// group never runs on this node again, like a node that failed for good.
const DROP_AFTER: Duration = Duration::from_secs(20);

pub fn spawn(node: Arc<Node>) {
    tokio::spawn(async move {
        let mut unwanted_since = BTreeMap::new();
        loop {
            tokio::time::sleep(TICK).await;
            reconcile_once(&node, &mut unwanted_since).await;
        }
    });
}

async fn reconcile_once(node: &Arc<Node>, unwanted_since: &mut BTreeMap<u32, Instant>) {
    let map = node.map();
    if !map.is_initialized() {
        return;
    }
    // Metadata group: every node of the map is a voter (members join first,
    // leave last: only once no partition group still counts on them).
    if is_leader(&node.metadata, node.id) {
        let want: BTreeSet<NodeId> = map.nodes.keys().copied().collect();
        let have = voters(&node.metadata);
        let joining: Vec<NodeId> = want.difference(&have).copied().collect();
        let leaving = !have.is_subset(&want);
        if !joining.is_empty() || (leaving && partitions_settled(node, &map).await) {
            if let Err(e) = change_voters(&node.metadata, &map, &want, &have).await {
                tracing::warn!(error = %e, "metadata membership change");
            }
        }
    }
    for replica in node.local_partitions() {
        let want: BTreeSet<NodeId> = map.replicas_of(replica.partition).iter().copied().collect();
        if want.is_empty() {
            continue;
        }
        if is_leader(&replica.raft, node.id) {
            let have = voters(&replica.raft);
            if have != want {
                tracing::info!(partition = replica.partition, ?have, ?want, "moving replicas");
                let group = tally_proto::partition::group_of_partition(replica.partition);
                if let Some(q) = node.quiescence.group(group) {
                    q.prepare_write().await;
                }
                if let Err(e) = change_voters(&replica.raft, &map, &want, &have).await {
                    tracing::warn!(partition = replica.partition, error = %e, "partition membership change");
                }
            }
        } else if !want.contains(&node.id) {
            let since = *unwanted_since.entry(replica.partition).or_insert_with(Instant::now);
            if !members(&replica.raft).contains(&node.id) || since.elapsed() > DROP_AFTER {
                match node.drop_partition(replica.partition).await {
                    Ok(()) => {
                        unwanted_since.remove(&replica.partition);
                    }
                    Err(e) => tracing::warn!(partition = replica.partition, error = %e, "dropping replica"),
                }
            }
        } else {
            unwanted_since.remove(&replica.partition);
        }
    }
}

fn is_leader(raft: &RaftInstance, me: NodeId) -> bool {
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
    for id in want.difference(have) {
        let addr = map.peer_addr_of(*id).ok_or_else(|| anyhow::anyhow!("node {id} has no address"))?;
        if !known.contains(id) {
            // Blocking: returns once the learner has caught up, so the voter
            // change below never waits on a replica that is far behind.
            tokio::time::timeout(Duration::from_secs(120), raft.add_learner(*id, BasicNode::new(addr), true))
                .await
                .map_err(|_| anyhow::anyhow!("learner {id} did not catch up in 120s"))??;
        }
    }
    raft.change_membership(want.clone(), false).await?;
    Ok(())
}

/// Every partition group's voters equal its replicas in `map`, as reported by
/// the group leaders (asked through each node's status).
pub async fn partitions_settled(node: &Arc<Node>, map: &ClusterMap) -> bool {
    unsettled_partition(node, map).await.is_none()
}

/// The first reason the partitions have not settled on `map`, if any.
pub async fn unsettled_partition(node: &Arc<Node>, map: &ClusterMap) -> Option<String> {
    let mut seen: BTreeMap<u32, Option<String>> = BTreeMap::new();
    for (id, addrs) in &map.nodes {
        let status = if *id == node.id {
            crate::api::cluster::local_status(node)
        } else {
            // A dead node is skipped: its partitions have new leaders that report.
            let Ok(channel) = node.peers.public_channel(*id, &addrs.addr) else { continue };
            let mut client = tally_proto::v1::cluster_client::ClusterClient::new(channel);
            let mut req = tonic::Request::new(tally_proto::v1::StatusRequest {});
            req.set_timeout(Duration::from_secs(2));
            match client.status(req).await {
                Ok(s) => s.into_inner(),
                Err(_) => continue,
            }
        };
        for p in status.partitions.iter().filter(|p| p.leader_node_id == *id) {
            let want: BTreeSet<NodeId> = map.replicas_of(p.partition).iter().copied().collect();
            let have: BTreeSet<NodeId> = p.voters.iter().copied().collect();
            let problem = (want != have).then(|| format!("partition {}: voters {have:?}, replicas {want:?}", p.partition));
            seen.insert(p.partition, problem);
        }
    }
    if let Some(p) = (0..map.partition_count).find(|p| !seen.contains_key(p)) {
        return Some(format!("partition {p}: no reachable leader"));
    }
    seen.into_values().flatten().next()
}
