//! `Cluster.MoveReplica`: one replica of a partition moved by hand — the
//! same change of the cluster map the balancer makes when it moves a
//! replica by load (`balancer.rs`), committed on the metadata leader and
//! carried out by the reconciler (the new replica joins as a learner,
//! catches up and becomes a voter, then the old one leaves).

use std::sync::Arc;

use tally_proto::v1::{MoveReplicaRequest, MoveReplicaResponse};
use tonic::Status;

use super::map_change::change_map;
use super::membership::{coordinator, Coordinator};
use crate::node::Node;

/// Commits the move on the metadata leader (forwarded there); the
/// partition's replicas in the committed map.
pub async fn move_replica(node: &Arc<Node>, req: MoveReplicaRequest) -> Result<MoveReplicaResponse, Status> {
    super::read_routing::existing_partition(node, req.partition)?;
    if let Coordinator::Forward(mut leader) = coordinator(node).await? {
        return Ok(leader.move_replica(req).await?.into_inner());
    }
    change_map(node, |map| {
        let replicas = map.replicas_of(req.partition);
        if !replicas.contains(&req.from_node_id) {
            return Err(Status::failed_precondition(format!(
                "from_node_id: node {} holds no replica of partition {} (its replicas: {replicas:?})",
                req.from_node_id, req.partition
            )));
        }
        if replicas.contains(&req.to_node_id) {
            return Err(Status::failed_precondition(format!(
                "to_node_id: node {} already holds a replica of partition {}",
                req.to_node_id, req.partition
            )));
        }
        if !map.nodes.contains_key(&req.to_node_id) {
            return Err(Status::invalid_argument(format!("to_node_id: node {} is not in the cluster", req.to_node_id)));
        }
        Ok(map.with_replica_moved(req.partition, req.from_node_id, req.to_node_id))
    })
    .await?;
    Ok(MoveReplicaResponse { replicas: node.map().replicas_of(req.partition).to_vec() })
}
