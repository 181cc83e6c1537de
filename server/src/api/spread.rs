//! Spreading a hot entity over more partitions (`Cluster.Spread`).
//!
//! Three steps, each idempotent, each in a replicated log (`moved.rs`
//! argues why no event is lost or counted twice):
//!
//! 1. The metadata leader commits the plan to the cluster map: the entity
//!    and the partitions to spread over, with no `from_ms` yet. Nothing
//!    routes differently.
//! 2. The leader of the entity's home partition commits
//!    `Command::Spread`, which fixes `from_ms` — never before a minute the
//!    home has counted — and from which the home counts none of the
//!    entity's events at or after it (asked here over the peer port,
//!    `CommitSpread`).
//! 3. The metadata leader commits `from_ms` to the map: from then on every
//!    node and client routes the entity's events at or after it to the
//!    spread's partitions.
//!
//! A plan left pending (the coordinator crashed, the home had no leader)
//! is finished by [`spawn_completer`] on whichever node leads the metadata
//! group. Until step 3 reaches a node, events the home refuses are
//! answered "moved" and routed again (`ingest.rs`).

use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use tally_proto::internal::raft_client::RaftClient;
use tally_proto::internal::{CommitSpreadRequest, CommitSpreadResponse};
use tally_proto::partition::group_of_partition;
use tally_proto::v1::{SpreadInfo, SpreadRequest, SpreadResponse};
use tonic::Status;

use super::map_change::change_map;
use super::membership::{coordinator, Coordinator};
use crate::command::Command;
use crate::meta::ClusterMap;
use crate::node::{Listener, Node};
use crate::type_config::NodeId;

/// How long `Cluster.Spread` waits for its spread to become active.
const ACTIVATE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the metadata leader looks for pending spreads.
const COMPLETER_TICK: Duration = Duration::from_secs(1);
const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Leader hints followed when asking the home partition to commit.
const HOPS: usize = 4;

/// `Cluster.Spread`: plan on the metadata leader, drive to active.
pub async fn spread(node: &Arc<Node>, req: SpreadRequest) -> Result<SpreadResponse, Status> {
    tally_proto::validate::validate_entity_id(&req.entity_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
    if let Coordinator::Forward(mut leader) = coordinator(node).await? {
        return Ok(leader.spread(req).await?.into_inner());
    }
    plan_and_complete(node, &req.entity_id, req.ways).await?;
    let mut watch = node.cluster_map.clone();
    let active = watch.wait_for(|m| m.spreads.get(&req.entity_id).is_some_and(|p| p.from_ms.is_some()));
    let map = match tokio::time::timeout(ACTIVATE_TIMEOUT, active).await {
        Ok(Ok(map)) => Some(map.clone()),
        _ => None,
    };
    match map {
        Some(map) => Ok(SpreadResponse { spread: spread_info(&map, &req.entity_id) }),
        _ => Err(Status::deadline_exceeded(format!(
            "the spread is planned but not active after {} s (the home partition {} has no leader?); it completes on its own — watch `tally cluster status`",
            ACTIVATE_TIMEOUT.as_secs(),
            node.home_of(&req.entity_id).unwrap_or(0),
        ))),
    }
}

/// The map's spreads as `Cluster.Status` reports them.
pub fn spread_infos(map: &ClusterMap) -> Vec<SpreadInfo> {
    map.spreads.keys().filter_map(|entity| spread_info(map, entity)).collect()
}

fn spread_info(map: &ClusterMap, entity: &[u8]) -> Option<SpreadInfo> {
    let plan = map.spreads.get(entity)?;
    Some(SpreadInfo {
        entity_id: entity.to_vec(),
        home_partition: map.routing().home_of(entity),
        partitions: plan.partitions.clone(),
        from_ms: plan.from_ms.unwrap_or(0),
    })
}

/// Finishes pending spreads while this node leads the metadata group.
pub fn spawn_completer(node: Arc<Node>) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(COMPLETER_TICK).await;
            let pending = node.cluster_map.borrow().spreads.values().any(|p| p.from_ms.is_none());
            if pending && node.metadata_leader() == Some(node.id) {
                complete_pending(&node).await;
            }
        }
    });
}

/// Plans `entity`'s spread over `ways` partitions (an entity already
/// spread keeps its spread) and drives pending spreads to active.
pub async fn plan_and_complete(node: &Arc<Node>, entity: &[u8], ways: u32) -> Result<(), Status> {
    change_map(node, |map| {
        let next = map.with_spread_planned(entity, ways).map_err(Status::invalid_argument)?;
        Ok((next != *map).then_some(next))
    })
    .await?;
    complete_pending(node).await;
    Ok(())
}

/// Steps 2 and 3 for every pending spread.
async fn complete_pending(node: &Arc<Node>) {
    let pending: Vec<Vec<u8>> =
        node.map().spreads.iter().filter(|(_, p)| p.from_ms.is_none()).map(|(e, _)| e.clone()).collect();
    for entity in pending {
        let home = node.home_of(&entity).unwrap_or(0);
        let wanted = node.clock.trusted().now_ms as i64;
        let from_ms = match commit_at_home(node, home, &entity, wanted).await {
            Ok(from_ms) => from_ms,
            Err(e) => {
                tracing::info!(partition = home, error = %e, "spread: the home partition has not committed it yet");
                continue;
            }
        };
        match change_map(node, |map| Ok(map.with_spread_active(&entity, from_ms))).await {
            Ok(false) => {}
            Ok(true) => tracing::info!(
                entity = %String::from_utf8_lossy(&entity),
                home,
                from_ms,
                "spread active"
            ),
            Err(e) => tracing::info!(error = %e, "spread: activating it failed; retried"),
        }
    }
}

/// Step 2 on the home partition's leader, wherever it is; its `from_ms`.
async fn commit_at_home(node: &Node, partition: u32, entity: &[u8], from_ms: i64) -> anyhow::Result<i64> {
    let mut target = node
        .partition(partition)
        .and_then(|r| r.raft.metrics().borrow_watched().current_leader)
        .or_else(|| node.preferred_replica(partition));
    for _ in 0..HOPS {
        let Some(to) = target else { break };
        let answer = if to == node.id {
            commit_here(node, partition, entity, from_ms).await?
        } else {
            let channel = node.forward_to_leader(to, Listener::Peer, None)?;
            let request = CommitSpreadRequest { partition, entity_id: entity.to_vec(), from_ms };
            RaftClient::new(channel).commit_spread(request).await?.into_inner()
        };
        if answer.from_ms != 0 {
            return Ok(answer.from_ms);
        }
        target = (answer.leader_node_id != 0 && answer.leader_node_id != to).then_some(answer.leader_node_id);
    }
    anyhow::bail!("no leader of partition {partition} committed the spread")
}

/// `CommitSpread` on the peer port.
pub async fn serve_commit(node: &Node, req: CommitSpreadRequest) -> Result<CommitSpreadResponse, Status> {
    let partitions = node.partition_count().unwrap_or(0);
    if req.partition >= partitions || node.home_of(&req.entity_id) != Some(req.partition) {
        return Err(Status::invalid_argument(format!(
            "partition: {} is not the home partition of the entity",
            req.partition
        )));
    }
    commit_here(node, req.partition, &req.entity_id, req.from_ms)
        .await
        .map_err(|e| Status::unavailable(format!("partition {}: {e}", req.partition)))
}

/// Commits the spread to the local replica if it leads; else the leader
/// it knows of (`from_ms` 0).
async fn commit_here(node: &Node, partition: u32, entity: &[u8], from_ms: i64) -> anyhow::Result<CommitSpreadResponse> {
    let Some(replica) = node.partition(partition) else {
        let hint: Option<NodeId> = node.preferred_replica(partition);
        return Ok(CommitSpreadResponse { from_ms: 0, leader_node_id: hint.unwrap_or(0) });
    };
    let leader = replica.raft.metrics().borrow_watched().current_leader;
    if leader != Some(node.id) {
        return Ok(CommitSpreadResponse { from_ms: 0, leader_node_id: leader.unwrap_or(0) });
    }
    if let Some(quiet) = node.quiescence.group(group_of_partition(partition)) {
        quiet.prepare_write().await;
    }
    let command = Command::Spread { entity_id: entity.to_vec(), from_ms };
    let written = tokio::time::timeout(COMMIT_TIMEOUT, replica.raft.client_write(command))
        .await
        .map_err(|_| anyhow::anyhow!("commit timed out after {COMMIT_TIMEOUT:?}"))?
        .map_err(|e| anyhow::anyhow!("commit failed: {e}"))?;
    let from_ms = written.data.spread_from_ms.ok_or_else(|| anyhow::anyhow!("apply answered no from_ms"))?;
    Ok(CommitSpreadResponse { from_ms, leader_node_id: node.id })
}
