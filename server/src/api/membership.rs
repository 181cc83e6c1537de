//! Adding and removing nodes. The metadata leader validates the change and
//! commits the new cluster map; the reconciler on each group's leader then
//! moves the replicas (see `reconciler.rs`), and the call returns once every
//! group matches the map. Changes are serialised: one runs at a time, and a
//! new one is refused until the previous has settled.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::BasicNode;
use tally_proto::v1::cluster_client::ClusterClient;
use tally_proto::v1::{AddNodeRequest, AddNodeResponse, RemoveNodeRequest, RemoveNodeResponse};
use tonic::Status;

use super::node_addrs;
use super::peer_reports::StatusReports;
use crate::command::Command;
use crate::meta::{ClusterMap, NodeAddrs};
use crate::node::{Listener, Node};
use crate::partition_view::{partitions_settled, unsettled_partition, PeerReports};
use crate::type_config::NodeId;

const SETTLE_TIMEOUT: Duration = Duration::from_secs(180);
/// How long `remove_node` waits for the others to see a new metadata leader.
const METADATA_HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the change must run: here, or the metadata leader to forward to.
pub enum Coordinator {
    Here,
    Forward(ClusterClient<crate::raft::peers::NodeChannel>),
}

pub async fn coordinator(node: &Arc<Node>) -> Result<Coordinator, Status> {
    let leader = node
        .metadata
        .wait(Some(Duration::from_secs(5)))
        .metrics(|m| m.current_leader.is_some(), "metadata leader")
        .await
        .map_err(|e| Status::unavailable(format!("no metadata leader: {e}")))?
        .current_leader
        .unwrap_or(0);
    if leader == node.id {
        return Ok(Coordinator::Here);
    }
    Ok(Coordinator::Forward(ClusterClient::new(node.forward_to_leader(leader, Listener::Public, None)?)))
}

fn moved_replicas(before: &ClusterMap, after: &ClusterMap) -> u32 {
    before.replicas.iter().zip(&after.replicas).map(|(a, b)| b.iter().filter(|n| !a.contains(n)).count() as u32).sum()
}

fn metadata_voters(node: &Node) -> BTreeSet<NodeId> {
    node.metadata.metrics().borrow_watched().membership_config.voter_ids().collect()
}

async fn ensure_settled(node: &Arc<Node>, map: &ClusterMap) -> Result<(), Status> {
    let nodes: BTreeSet<NodeId> = map.nodes.keys().copied().collect();
    // Give a transient state (an election, a status call that timed out) a
    // few seconds to pass before refusing.
    let started = Instant::now();
    let problem = loop {
        let voters = metadata_voters(node);
        let problem = if voters != nodes {
            Some(format!("metadata group voters {voters:?}, nodes {nodes:?}"))
        } else {
            unsettled_partition(node, &StatusReports, map).await
        };
        if problem.is_none() || started.elapsed() > Duration::from_secs(10) {
            break problem;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    match problem {
        None => Ok(()),
        Some(p) => Err(Status::failed_precondition(format!(
            "a membership change is still in progress ({p}); retry when `tally cluster status` shows every partition's voters equal to its replicas"
        ))),
    }
}

async fn commit_and_wait(node: &Arc<Node>, mut next: ClusterMap) -> Result<(), Status> {
    {
        // Spreads (`spread.rs`), splits (`split.rs`) and the balancer
        // switch may have changed the map since `next` was computed from
        // it; a membership change keeps them as they are now.
        let _map_writes = node.map_writes.lock().await;
        let current = node.map();
        if current.partition_count != next.partition_count {
            return Err(Status::failed_precondition(
                "a partition split became active while this change was planned; retry",
            ));
        }
        next.spreads = current.spreads.clone();
        next.splits = current.splits.clone();
        next.slots = current.slots;
        next.balancer_paused = current.balancer_paused;
        next.version = next.version.max(current.version + 1);
        node.metadata
            .client_write(Command::SetClusterMap(next.clone()))
            .await
            .map_err(|e| Status::unavailable(format!("committing the new cluster map: {e}")))?;
    }
    let started = Instant::now();
    let nodes: BTreeSet<NodeId> = next.nodes.keys().copied().collect();
    loop {
        if metadata_voters(node) == nodes && partitions_settled(node, &StatusReports, &next).await {
            return Ok(());
        }
        if started.elapsed() > SETTLE_TIMEOUT {
            return Err(Status::deadline_exceeded(
                "the new cluster map is committed and replicas are still moving; the change will complete on its own — watch `tally cluster status`",
            ));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

pub async fn add_node(node: &Arc<Node>, req: AddNodeRequest) -> Result<AddNodeResponse, Status> {
    if let Coordinator::Forward(mut leader) = coordinator(node).await? {
        return Ok(leader.add_node(req).await?.into_inner());
    }
    let _one_at_a_time = node.admin.lock().await;
    let map = node.map();
    ensure_settled(node, &map).await?;
    // The new node tells its id and its peer address (`--peer-advertise`).
    let status = node_addrs::status_of(node, "addr", &req.addr).await?;
    let id = status.node_id;
    if status.initialized || map.nodes.contains_key(&id) {
        return Err(Status::already_exists(format!(
            "addr: the node at {} (id {id}) already belongs to a cluster; start it with a new --node-id and an empty --data-dir",
            req.addr
        )));
    }
    let peer_addr = node_addrs::reported_peer_addr(&status, "addr", &req.addr)?;
    // The metadata log first, so the new node learns the map it is joining.
    tokio::time::timeout(Duration::from_secs(60), node.metadata.add_learner(id, BasicNode::new(&peer_addr), true))
        .await
        .map_err(|_| Status::deadline_exceeded("the new node did not catch up with the metadata group in 60 s"))?
        .map_err(|e| Status::unavailable(format!("adding node {id} to the metadata group: {e}")))?;
    let next = map.with_node_added(id, NodeAddrs::new(&req.addr, &peer_addr));
    let moved = moved_replicas(&map, &next);
    tracing::info!(node = id, addr = %req.addr, peer_addr = %peer_addr, moved, "adding node");
    commit_and_wait(node, next).await?;
    Ok(AddNodeResponse { node_id: id, replicas_moved: moved })
}

pub async fn remove_node(node: &Arc<Node>, req: RemoveNodeRequest) -> Result<RemoveNodeResponse, Status> {
    if let Coordinator::Forward(mut leader) = coordinator(node).await? {
        return Ok(leader.remove_node(req).await?.into_inner());
    }
    let _one_at_a_time = node.admin.lock().await;
    let map = node.map();
    let next = map.with_node_removed(req.node_id).map_err(|e| Status::failed_precondition(format!("node_id: {e}")))?;
    ensure_settled(node, &map).await?;
    let moved = moved_replicas(&map, &next);
    tracing::info!(node = req.node_id, moved, "removing node");
    commit_and_wait(node, next.clone()).await?;
    metadata_led_by_others(node, &next, req.node_id).await;
    Ok(RemoveNodeResponse { replicas_moved: moved })
}

/// After `removed` left the metadata group: until every remaining node that
/// answers sees another node lead it. openraft lets a removed leader step
/// down only after the change commits, and followers learn the new leader
/// later still; returning earlier, an operator who stops the removed node
/// right away leaves the others forwarding to it. Bounded: the change itself
/// is complete, so this only logs if it takes long.
async fn metadata_led_by_others(node: &Arc<Node>, map: &ClusterMap, removed: NodeId) {
    let started = Instant::now();
    loop {
        // Leader ids as each remaining node sees them, 0 for none yet. A
        // node that does not answer has no view to wait for, nor has the
        // removed node (this one, if it coordinated its own removal): the
        // group no longer tells it who leads.
        let mut views = Vec::new();
        if node.id != removed {
            views.push(node.metadata_leader().unwrap_or(0));
        }
        for (id, addr) in map.nodes.iter().filter(|(id, _)| **id != node.id) {
            if let Some(report) = StatusReports.report(node, *id, &addr.addr, Duration::from_secs(1)).await {
                views.push(report.metadata_leader.unwrap_or(0));
            }
        }
        let settled = views.iter().all(|l| *l != removed && *l != 0);
        if settled {
            return;
        }
        if started.elapsed() > METADATA_HANDOVER_TIMEOUT {
            tracing::warn!(removed, ?views, "the removed node may still be seen as the metadata leader");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
