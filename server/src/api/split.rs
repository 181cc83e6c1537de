//! Splitting a partition in two (`Cluster.Split`).
//!
//! Three steps, each idempotent, each in a replicated log:
//!
//! 1. The metadata leader commits the plan to the cluster map: the parent,
//!    and the upper half of its hash range, to be a new partition numbered
//!    `partition_count`. Nothing routes differently, and no node opens the
//!    new partition yet.
//! 2. The parent's leader commits `Command::Split` to the parent's log
//!    (asked here over the peer port, `CommitSplit`). At that entry every
//!    replica of the parent moves the range's state into the new group and
//!    refuses the range's events from then on (`storage/split.rs`,
//!    `moved.rs`); the entry answers the voters the new group starts with.
//! 3. The metadata leader commits the split as active: the new partition
//!    is counted, placed on those voters, and routed to. Each node opens
//!    its replica of it once its replica of the parent has applied the
//!    split (`Node::split_child_ready`).
//!
//! Events of the range in flight between 2 and 3 are refused by the parent
//! as "moved" and routed again by the newer map (`ingest.rs`); a read of
//! one of its entities at the parent waits for the map (`query.rs`). A plan
//! left pending (the coordinator died, the parent had no leader) is
//! finished by [`spawn_completer`] on whichever node leads the metadata
//! group, so a split either completes or never took effect.

use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use tally_proto::internal::raft_client::RaftClient;
use tally_proto::internal::{CommitSplitRequest, CommitSplitResponse};
use tally_proto::partition::group_of_partition;
use tally_proto::v1::{SplitInfo, SplitRequest, SplitResponse};
use tonic::Status;

use super::map_change::change_map;
use super::membership::{coordinator, Coordinator};
use crate::command::Command;
use crate::meta::{ClusterMap, SplitPlan};
use crate::moved::MovedRange;
use crate::node::{Listener, Node};
use crate::type_config::NodeId;

/// How long `Cluster.Split` waits for its split to become active.
const ACTIVATE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the metadata leader looks for a pending split.
const COMPLETER_TICK: Duration = Duration::from_secs(1);
const COMMIT_TIMEOUT: Duration = Duration::from_secs(20);
/// Leader hints followed when asking the parent to commit.
const HOPS: usize = 4;
/// How long a node asked to commit waits for a map that has the plan.
const PLAN_WAIT: Duration = Duration::from_secs(2);

/// `Cluster.Split`: plan on the metadata leader, drive to active.
pub async fn split(node: &Arc<Node>, req: SplitRequest) -> Result<SplitResponse, Status> {
    super::read_routing::existing_partition(node, req.partition)?;
    if let Coordinator::Forward(mut leader) = coordinator(node).await? {
        return Ok(leader.split(req).await?.into_inner());
    }
    let child = plan_and_complete(node, req.partition).await?;
    let mut watch = node.cluster_map.clone();
    let active = watch.wait_for(|m| m.splits.get(&child).is_some_and(|p| p.voters.is_some()));
    let split = match tokio::time::timeout(ACTIVATE_TIMEOUT, active).await {
        Ok(Ok(map)) => map.splits.get(&child).map(|p| split_info(child, p)),
        _ => None,
    };
    match split {
        Some(split) => Ok(SplitResponse { split: Some(split) }),
        None => Err(Status::deadline_exceeded(format!(
            "the split of partition {} into {child} is planned but not active after {} s (the partition has no leader?); it completes on its own — watch `tally cluster status`",
            req.partition,
            ACTIVATE_TIMEOUT.as_secs(),
        ))),
    }
}

/// The map's splits as `Cluster.Status` reports them, in split order.
pub fn split_infos(map: &ClusterMap) -> Vec<SplitInfo> {
    map.splits.iter().map(|(child, plan)| split_info(*child, plan)).collect()
}

fn split_info(child: u32, plan: &SplitPlan) -> SplitInfo {
    SplitInfo {
        partition: child,
        parent: plan.parent,
        slot: plan.slot,
        lo: plan.lo,
        last: plan.last,
        active: plan.voters.is_some(),
    }
}

/// Finishes a pending split while this node leads the metadata group.
pub fn spawn_completer(node: Arc<Node>) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(COMPLETER_TICK).await;
            let pending = node.cluster_map.borrow().pending_split().is_some();
            if pending && node.metadata_leader() == Some(node.id) {
                complete_pending(&node).await;
            }
        }
    });
}

/// Plans the split of `parent` (the pending one, if it is `parent`'s) and
/// drives it to active; the new partition's number.
pub async fn plan_and_complete(node: &Arc<Node>, parent: u32) -> Result<u32, Status> {
    change_map(node, |map| {
        let next = map.with_split_planned(parent).map_err(Status::failed_precondition)?;
        Ok((next != *map).then_some(next))
    })
    .await?;
    let child = node
        .cluster_map
        .borrow()
        .pending_split()
        .map(|(child, _)| child)
        .ok_or_else(|| Status::unavailable("the split plan was not found in the map after committing it; retry"))?;
    complete_pending(node).await;
    Ok(child)
}

/// Steps 2 and 3 for the pending split.
async fn complete_pending(node: &Arc<Node>) {
    let map = node.map();
    let Some((child, plan)) = map.pending_split() else { return };
    let range = MovedRange { slots: map.slot_count(), slot: plan.slot, lo: plan.lo, last: plan.last, to: child };
    let voters = match commit_at_parent(node, plan.parent, range).await {
        Ok(voters) => voters,
        Err(e) => {
            tracing::info!(parent = plan.parent, child, error = %e, "split: the parent has not committed it yet");
            return;
        }
    };
    let result = change_map(node, |map| {
        let placed: Vec<NodeId> = voters.iter().copied().filter(|v| map.nodes.contains_key(v)).collect();
        Ok(map.with_split_active(child, &placed))
    })
    .await;
    match result {
        Ok(false) => {}
        Ok(true) => tracing::info!(parent = plan.parent, child, ?voters, "split active"),
        Err(e) => tracing::info!(error = %e, "split: activating it failed; retried"),
    }
}

/// Step 2 on the parent's leader, wherever it is; the new group's voters.
async fn commit_at_parent(node: &Node, parent: u32, range: MovedRange) -> anyhow::Result<Vec<NodeId>> {
    let mut target = node
        .partition(parent)
        .and_then(|r| r.raft.metrics().borrow_watched().current_leader)
        .or_else(|| node.preferred_replica(parent));
    for _ in 0..HOPS {
        let Some(to) = target else { break };
        let answer = if to == node.id {
            commit_here(node, parent, range).await?
        } else {
            let channel = node.forward_to_leader(to, Listener::Peer, None)?;
            let request = CommitSplitRequest {
                parent,
                child: range.to,
                slots: range.slots,
                slot: range.slot,
                lo: range.lo,
                last: range.last,
            };
            RaftClient::new(channel).commit_split(request).await?.into_inner()
        };
        if !answer.voters.is_empty() {
            return Ok(answer.voters);
        }
        target = (answer.leader_node_id != 0 && answer.leader_node_id != to).then_some(answer.leader_node_id);
    }
    anyhow::bail!("no leader of partition {parent} committed the split")
}

/// `CommitSplit` on the peer port: only the split the map has pending.
pub async fn serve_commit(node: &Node, req: CommitSplitRequest) -> Result<CommitSplitResponse, Status> {
    let mut map = node.cluster_map.clone();
    let planned = |m: &ClusterMap| {
        m.splits
            .get(&req.child)
            .is_some_and(|p| p.parent == req.parent && p.slot == req.slot && p.lo == req.lo && p.last == req.last)
            && m.slot_count() == req.slots
    };
    if tokio::time::timeout(PLAN_WAIT, map.wait_for(planned)).await.is_err() {
        return Err(Status::failed_precondition(format!(
            "partition {}: no split into {} with this range is planned in this node's cluster map",
            req.parent, req.child
        )));
    }
    let range = MovedRange { slots: req.slots, slot: req.slot, lo: req.lo, last: req.last, to: req.child };
    commit_here(node, req.parent, range)
        .await
        .map_err(|e| Status::unavailable(format!("partition {}: {e}", req.parent)))
}

/// Commits the split to the local replica if it leads; else the leader it
/// knows of (no voters). This node is put first among the voters: the new
/// partition's first replica elects at once (`Node::open_partition`).
async fn commit_here(node: &Node, parent: u32, range: MovedRange) -> anyhow::Result<CommitSplitResponse> {
    let Some(replica) = node.partition(parent) else {
        let hint: Option<NodeId> = node.preferred_replica(parent);
        return Ok(CommitSplitResponse { voters: Vec::new(), leader_node_id: hint.unwrap_or(0) });
    };
    let leader = replica.raft.metrics().borrow_watched().current_leader;
    if leader != Some(node.id) {
        return Ok(CommitSplitResponse { voters: Vec::new(), leader_node_id: leader.unwrap_or(0) });
    }
    if let Some(quiet) = node.quiescence.group(group_of_partition(parent)) {
        quiet.prepare_write().await;
    }
    let written = tokio::time::timeout(COMMIT_TIMEOUT, replica.raft.client_write(Command::Split(range)))
        .await
        .map_err(|_| anyhow::anyhow!("commit timed out after {COMMIT_TIMEOUT:?}"))?
        .map_err(|e| anyhow::anyhow!("commit failed: {e}"))?;
    let mut voters = written.data.split_voters.ok_or_else(|| anyhow::anyhow!("apply answered no voters"))?;
    if let Some(here) = voters.iter().position(|v| *v == node.id) {
        voters[..=here].rotate_right(1);
    }
    Ok(CommitSplitResponse { voters, leader_node_id: node.id })
}
