//! What each node reports about the Raft groups of the partitions it hosts,
//! and whether the partitions have settled on a cluster map.
//!
//! The reconciler (is a replica it no longer wants still a voter?) and
//! membership changes (have the voters of every partition caught up with
//! the map?) both need other nodes' views. They ask through
//! [`PeerReports`], which the API layer implements with `Cluster.Status`:
//! this module and the reconciler never see a wire type, and the node
//! depends on neither.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::future::BoxFuture;
use openraft::async_runtime::WatchReceiver;
use tally_proto::partition::group_of_partition;

use crate::meta::{ClusterMap, NodeId};
use crate::node::Node;

/// One node's view of one partition's group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionView {
    pub partition: u32,
    /// The leader it knows of, if any.
    pub leader: Option<NodeId>,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub voters: Vec<NodeId>,
    pub quiesced: bool,
}

/// What a node reports about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeReport {
    pub metadata_leader: Option<NodeId>,
    /// Only partitions with a replica on the reporting node.
    pub partitions: Vec<PartitionView>,
}

/// How to ask another node for its report.
pub trait PeerReports: Send + Sync {
    /// `node`'s report, or `None` if it does not answer within `timeout`.
    fn report<'a>(
        &'a self,
        from: &'a Node,
        node: NodeId,
        addr: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Option<NodeReport>>;
}

/// This node's view of partition `partition`, if it hosts a replica.
pub fn local_view(node: &Node, partition: u32) -> Option<PartitionView> {
    let replica = node.partition(partition)?;
    // Read in place: polled often, and a copy of the metrics of 10,000
    // groups is 10,000 allocations or more.
    let metrics = replica.raft.metrics();
    let m = metrics.borrow_watched();
    let mut view = PartitionView {
        partition,
        leader: m.current_leader,
        term: m.current_term,
        commit_index: m.cluster_committed.as_ref().map(|l| l.index).unwrap_or(0),
        applied_index: m.last_applied.as_ref().map(|l| l.index).unwrap_or(0),
        voters: m.membership_config.voter_ids().collect(),
        quiesced: false,
    };
    drop(m);
    view.quiesced = node.quiescence.group(group_of_partition(partition)).is_some_and(|q| q.is_quiesced());
    Some(view)
}

/// This node's report.
pub fn local_report(node: &Node) -> NodeReport {
    let count = node.map().partition_count;
    NodeReport {
        metadata_leader: node.metadata_leader(),
        partitions: (0..count).filter_map(|p| local_view(node, p)).collect(),
    }
}

/// Every partition group's voters equal its replicas in `map`, as reported
/// by the group leaders.
pub async fn partitions_settled(node: &Node, peers: &dyn PeerReports, map: &ClusterMap) -> bool {
    unsettled_partition(node, peers, map).await.is_none()
}

/// The first reason the partitions have not settled on `map`, if any.
pub async fn unsettled_partition(node: &Node, peers: &dyn PeerReports, map: &ClusterMap) -> Option<String> {
    let mut seen: BTreeMap<u32, Option<String>> = BTreeMap::new();
    for (id, addrs) in &map.nodes {
        let report = if *id == node.id {
            local_report(node)
        } else {
            // A dead node is skipped: its partitions have new leaders that report.
            match peers.report(node, *id, &addrs.addr, Duration::from_secs(2)).await {
                Some(r) => r,
                None => continue,
            }
        };
        for p in report.partitions.iter().filter(|p| p.leader == Some(*id)) {
            let want: BTreeSet<NodeId> = map.replicas_of(p.partition).iter().copied().collect();
            let have: BTreeSet<NodeId> = p.voters.iter().copied().collect();
            let problem =
                (want != have).then(|| format!("partition {}: voters {have:?}, replicas {want:?}", p.partition));
            seen.insert(p.partition, problem);
        }
    }
    if let Some(p) = (0..map.partition_count).find(|p| !seen.contains_key(p)) {
        return Some(format!("partition {p}: no reachable leader"));
    }
    seen.into_values().flatten().next()
}
