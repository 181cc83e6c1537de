//! Other nodes' reports of their groups (`partition_view::PeerReports`),
//! asked with `Cluster.Status` on their public port: the wire side of what
//! the reconciler and membership changes need to know about peers.

use std::time::Duration;

use futures::future::BoxFuture;
use tally_proto::v1::cluster_client::ClusterClient;
use tally_proto::v1::StatusRequest;
use tonic::Request;

use crate::meta::NodeId;
use crate::node::Node;
use crate::partition_view::{NodeReport, PartitionView, PeerReports};

/// Other nodes' reports, asked with `Cluster.Status` on their public port.
pub struct StatusReports;

impl PeerReports for StatusReports {
    fn report<'a>(
        &'a self,
        from: &'a Node,
        node: NodeId,
        addr: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Option<NodeReport>> {
        Box::pin(async move {
            let channel = from.peers.public_channel(node, addr).ok()?;
            let mut request = Request::new(StatusRequest {});
            request.set_timeout(timeout);
            let mut client = ClusterClient::new(channel);
            let status = tokio::time::timeout(timeout, client.status(request)).await.ok()?.ok()?.into_inner();
            Some(NodeReport {
                metadata_leader: (status.metadata_leader_node_id != 0).then_some(status.metadata_leader_node_id),
                partitions: status
                    .partitions
                    .into_iter()
                    // Partitions the node hosts: the ones it reports a term for.
                    .filter(|p| p.term != 0 || p.leader_node_id != 0 || !p.voters.is_empty())
                    .map(|p| PartitionView {
                        partition: p.partition,
                        leader: (p.leader_node_id != 0).then_some(p.leader_node_id),
                        term: p.term,
                        commit_index: p.commit_index,
                        applied_index: p.applied_index,
                        voters: p.voters,
                        quiesced: p.quiesced,
                    })
                    .collect(),
            })
        })
    }
}
