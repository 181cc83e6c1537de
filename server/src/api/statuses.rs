//! Every node's `Cluster.Status` at once: what the metadata leader's
//! balancing decisions (`auto_spread.rs`, `balancer.rs`) are made from,
//! since only a partition's leader reports its load.

use std::sync::Arc;
use std::time::Duration;

use tally_proto::v1::cluster_client::ClusterClient;
use tally_proto::v1::{StatusRequest, StatusResponse};
use tonic::Request;

use crate::node::Node;

/// Every node's `Cluster.Status`: this node's own, and each other node's
/// that answers within `timeout` (at once). For the metadata leader's
/// balancing decisions (`auto_spread.rs`, `balancer.rs`), which need every
/// leader's load.
pub async fn all_statuses(node: &Arc<Node>, timeout: Duration) -> Vec<StatusResponse> {
    let map = node.map();
    let others = map.nodes.iter().filter(|(id, _)| **id != node.id).map(|(&id, addrs)| {
        let addr = addrs.addr.clone();
        async move {
            let channel = node.peers.public_channel(id, &addr).ok()?;
            let mut request = Request::new(StatusRequest {});
            request.set_timeout(timeout);
            let answer = tokio::time::timeout(timeout, ClusterClient::new(channel).status(request)).await.ok()?.ok()?;
            Some(answer.into_inner())
        }
    });
    let mut all = vec![super::cluster::local_status(node)];
    all.extend(futures::future::join_all(others).await.into_iter().flatten());
    all
}
