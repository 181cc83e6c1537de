//! A node's two addresses as the API shows and learns them.
//!
//! Every node has a public address (clients) and a peer address (Raft,
//! `--peer-listen`). Operators and scripts know the public ones, so
//! `Initialize` and `AddNode` accept `NodeInfo.peer_addr` empty and learn it
//! from the node itself: its public `Cluster.Status` lists it with its own
//! peer address, even before it belongs to a cluster.

use std::sync::Arc;
use std::time::Duration;

use tally_proto::v1::cluster_client::ClusterClient;
use tally_proto::v1::{NodeInfo, StatusRequest, StatusResponse};
use tonic::Status;

use crate::meta::{ClusterMap, NodeAddrs};
use crate::node::Node;
use crate::type_config::NodeId;

/// How long asking a node for its peer address may take.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// `StatusResponse.nodes`: every node of the map with both addresses; a node
/// not initialised yet lists itself, so callers can learn its peer address.
pub fn node_infos(node: &Arc<Node>, map: &ClusterMap) -> Vec<NodeInfo> {
    let mut infos: Vec<NodeInfo> = map
        .nodes
        .iter()
        .map(|(id, a)| NodeInfo {
            node_id: *id,
            addr: a.addr.clone(),
            reachable: node.liveness.is_up(*id),
            peer_addr: a.peer_addr.clone(),
        })
        .collect();
    if !map.is_initialized() {
        infos.push(NodeInfo {
            node_id: node.id,
            addr: node.config.advertise_addr().to_string(),
            reachable: true,
            peer_addr: node.config.peer_advertise_addr().to_string(),
        });
    }
    infos
}

/// This node's own addresses, as it advertises them.
pub fn own_addrs(node: &Node) -> NodeAddrs {
    NodeAddrs::new(node.config.advertise_addr(), node.config.peer_advertise_addr())
}

/// Both addresses of node `id`, whose public address is `addr`: the peer
/// address given, or the one the node reports for itself. Checks that the
/// node at `addr` is node `id` when it has to ask. `what` names the request
/// field in errors.
pub async fn resolve(
    node: &Arc<Node>,
    what: &str,
    id: NodeId,
    addr: &str,
    peer_addr: &str,
) -> Result<NodeAddrs, Status> {
    if !peer_addr.is_empty() {
        return Ok(NodeAddrs::new(addr, peer_addr));
    }
    if id == node.id {
        return Ok(NodeAddrs::new(addr, node.config.peer_advertise_addr()));
    }
    let (reported_id, peer_addr) = ask(node, what, addr).await?;
    if reported_id != id {
        return Err(Status::invalid_argument(format!(
            "{what}: the node at {addr} is node {reported_id}, not node {id}"
        )));
    }
    Ok(NodeAddrs::new(addr, peer_addr))
}

/// Ask the tallyd at public address `addr` for its id and peer address.
pub async fn ask(node: &Node, what: &str, addr: &str) -> Result<(NodeId, String), Status> {
    let status = status_of(node, what, addr).await?;
    Ok((status.node_id, reported_peer_addr(&status, what, addr)?))
}

/// The `Cluster.Status` of the tallyd at public address `addr`.
pub async fn status_of(node: &Node, what: &str, addr: &str) -> Result<StatusResponse, Status> {
    let channel = node
        .peers
        .public_channel(u64::MAX, addr)
        .map_err(|e| Status::invalid_argument(format!("{what}: {addr}: {e}")))?;
    let mut request = tonic::Request::new(StatusRequest {});
    request.set_timeout(ASK_TIMEOUT);
    Ok(ClusterClient::new(channel)
        .status(request)
        .await
        .map_err(|e| Status::unavailable(format!("{what}: cannot reach a tallyd at {addr}: {}", e.message())))?
        .into_inner())
}

/// The peer address a node reports for itself in its status.
pub fn reported_peer_addr(status: &StatusResponse, what: &str, addr: &str) -> Result<String, Status> {
    status
        .nodes
        .iter()
        .find(|n| n.node_id == status.node_id)
        .map(|n| n.peer_addr.clone())
        .filter(|p| !p.is_empty())
        .ok_or_else(|| {
            Status::failed_precondition(format!(
                "{what}: the node at {addr} (id {}) did not report its peer address (a tallyd without a peer port?)",
                status.node_id
            ))
        })
}
