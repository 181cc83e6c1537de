//! The public Cluster service: status for routing and operators, and the
//! one-time initialisation of a new cluster. Leadership moves
//! (`TransferLeader`, `Rebalance`) go through `transfer.rs`, which never
//! leaves a partition without a leader that serves writes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::BasicNode;
use tally_proto::v1::cluster_client::ClusterClient;
use tally_proto::v1::cluster_server::Cluster;
use tally_proto::v1::{
    AddNodeRequest, AddNodeResponse, DeadLettersRequest, DeadLettersResponse, DigestRequest, DigestResponse,
    InitializeRequest, InitializeResponse, MoveReplicaRequest, MoveReplicaResponse, NodeLoad, PartitionDigest,
    PartitionInfo, RebalanceRequest, RebalanceResponse, RemoveNodeRequest, RemoveNodeResponse, SetBalancerRequest,
    SetBalancerResponse, SetIngestPolicyRequest, SetIngestPolicyResponse, SetRetentionRequest, SetRetentionResponse,
    SplitRequest, SplitResponse, SpreadRequest, SpreadResponse, StageLatency, StagesRequest, StagesResponse,
    StatusRequest, StatusResponse, TransferLeaderRequest, TransferLeaderResponse,
};
use tonic::{Request, Response, Status};

use super::node_addrs;
use crate::api::transfer::transfer_leadership;
use crate::command::Command;
use crate::meta::{ClusterMap, NodeAddrs, DEFAULT_PARTITIONS, MAX_PARTITIONS};
use crate::node::{Listener, Node};
use crate::partition_view::local_view;
use crate::type_config::NodeId;

pub struct ClusterService {
    node: Arc<Node>,
}

impl ClusterService {
    pub fn new(node: Arc<Node>) -> ClusterService {
        ClusterService { node }
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn status(&self, _request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(local_status(&self.node)))
    }

    async fn dead_letters(
        &self,
        request: Request<DeadLettersRequest>,
    ) -> Result<Response<DeadLettersResponse>, Status> {
        Ok(Response::new(super::dead_letters::serve(&self.node, request).await?))
    }

    async fn digest(&self, request: Request<DigestRequest>) -> Result<Response<DigestResponse>, Status> {
        let wanted = request.into_inner().partitions;
        let mut partitions = Vec::new();
        for replica in self.node.local_partitions() {
            if !wanted.is_empty() && !wanted.contains(&replica.partition) {
                continue;
            }
            let (applied_index, digest, keys) =
                crate::storage::read::state_digest(&self.node.engine, &replica.write_back)
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?;
            partitions.push(PartitionDigest { partition: replica.partition, applied_index, digest, keys });
        }
        Ok(Response::new(DigestResponse { node_id: self.node.id, partitions }))
    }

    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        let req = request.into_inner();
        let count = self.node.partition_count().unwrap_or(0);
        if req.partition >= count {
            return Err(Status::invalid_argument(format!("partition: {} is not below {count}", req.partition)));
        }
        let replicas = self.node.cluster_map.borrow().replicas_of(req.partition).to_vec();
        if !replicas.contains(&req.node_id) {
            return Err(Status::invalid_argument(format!(
                "node_id: node {} holds no replica of partition {} (replicas {replicas:?})",
                req.node_id, req.partition
            )));
        }
        let leader = transfer_leadership(&self.node, req.partition, req.node_id).await?;
        Ok(Response::new(TransferLeaderResponse { leader_node_id: leader }))
    }

    async fn rebalance(&self, _request: Request<RebalanceRequest>) -> Result<Response<RebalanceResponse>, Status> {
        let mut response = RebalanceResponse::default();
        for partition in 0..self.node.partition_count().unwrap_or(0) {
            let Some(preferred) = self.node.preferred_replica(partition) else { continue };
            // A node liveness calls down cannot take over (and if this node
            // still sees it lead, that view is stale); trying would only stall
            // the partition (see transfer.rs). The partition's leader checks
            // again, and also refuses a preferred replica that is behind.
            if !self.node.liveness.is_up(preferred) {
                response.skipped.push(partition);
                continue;
            }
            let current = self.node.partition(partition).and_then(|r| r.raft.metrics().borrow_watched().current_leader);
            if current == Some(preferred) {
                continue;
            }
            match transfer_leadership(&self.node, partition, preferred).await {
                Ok(l) if l == preferred => response.moved += 1,
                Err(e) if e.is_refusal() => response.skipped.push(partition),
                Ok(_) => response.failed += 1,
                Err(e) => {
                    tracing::info!(partition, error = %e, "rebalance: leadership not moved");
                    response.failed += 1;
                }
            }
        }
        if !response.skipped.is_empty() {
            tracing::info!(skipped = ?response.skipped, "rebalance skipped partitions whose preferred leader is down or behind");
        }
        Ok(Response::new(response))
    }

    async fn add_node(&self, request: Request<AddNodeRequest>) -> Result<Response<AddNodeResponse>, Status> {
        Ok(Response::new(super::membership::add_node(&self.node, request.into_inner()).await?))
    }

    async fn remove_node(&self, request: Request<RemoveNodeRequest>) -> Result<Response<RemoveNodeResponse>, Status> {
        Ok(Response::new(super::membership::remove_node(&self.node, request.into_inner()).await?))
    }

    async fn set_balancer(
        &self,
        request: Request<SetBalancerRequest>,
    ) -> Result<Response<SetBalancerResponse>, Status> {
        let req = request.into_inner();
        if let super::membership::Coordinator::Forward(mut leader) = super::membership::coordinator(&self.node).await? {
            return leader.set_balancer(req).await;
        }
        super::map_change::change_map(&self.node, |map| Ok(map.with_balancer_paused(req.paused))).await?;
        Ok(Response::new(SetBalancerResponse { paused: self.node.map().balancer_paused }))
    }

    async fn spread(&self, request: Request<SpreadRequest>) -> Result<Response<SpreadResponse>, Status> {
        Ok(Response::new(super::spread::spread(&self.node, request.into_inner()).await?))
    }

    async fn move_replica(
        &self,
        request: Request<MoveReplicaRequest>,
    ) -> Result<Response<MoveReplicaResponse>, Status> {
        Ok(Response::new(super::replica_move::move_replica(&self.node, request.into_inner()).await?))
    }

    async fn split(&self, request: Request<SplitRequest>) -> Result<Response<SplitResponse>, Status> {
        Ok(Response::new(super::split::split(&self.node, request.into_inner()).await?))
    }

    async fn set_ingest_policy(
        &self,
        request: Request<SetIngestPolicyRequest>,
    ) -> Result<Response<SetIngestPolicyResponse>, Status> {
        Ok(Response::new(super::ingest_policy::set(&self.node, request.into_inner()).await?))
    }

    async fn set_retention(
        &self,
        request: Request<SetRetentionRequest>,
    ) -> Result<Response<SetRetentionResponse>, Status> {
        Ok(Response::new(super::retention::set(&self.node, request.into_inner()).await?))
    }

    async fn stages(&self, request: Request<StagesRequest>) -> Result<Response<StagesResponse>, Status> {
        let (summary, window) = crate::stages::global().summary(request.into_inner().reset);
        Ok(Response::new(StagesResponse {
            node_id: self.node.id,
            window_s: window.as_secs_f64(),
            stages: summary
                .into_iter()
                .map(|s| StageLatency {
                    name: s.stage.name().into(),
                    description: s.stage.description().into(),
                    count: s.count,
                    mean_ms: s.mean_ms,
                    p50_ms: s.p50_ms,
                    p90_ms: s.p90_ms,
                    p99_ms: s.p99_ms,
                    p999_ms: s.p999_ms,
                    max_ms: s.max_ms,
                })
                .collect(),
        }))
    }

    async fn initialize(&self, request: Request<InitializeRequest>) -> Result<Response<InitializeResponse>, Status> {
        let mut req = request.into_inner();
        let requested: BTreeMap<NodeId, NodeAddrs> =
            req.nodes.iter().map(|n| (n.node_id, NodeAddrs::new(&n.addr, &n.peer_addr))).collect();
        if requested.is_empty() || requested.len() != req.nodes.len() || requested.contains_key(&0) {
            return Err(Status::invalid_argument("nodes: give each node once, with a non-zero node_id"));
        }
        if let Some(id) = requested.iter().find(|(_, a)| a.addr.is_empty()).map(|(id, _)| id) {
            return Err(Status::invalid_argument(format!("nodes: node {id} has no addr")));
        }
        if !requested.contains_key(&self.node.id) {
            return Err(Status::invalid_argument(format!("nodes: must include the node called (id {})", self.node.id)));
        }
        let partitions = if req.partitions == 0 { DEFAULT_PARTITIONS } else { req.partitions };
        if partitions > MAX_PARTITIONS {
            return Err(Status::invalid_argument(format!("partitions: at most {MAX_PARTITIONS}")));
        }
        let rf = if req.replication_factor == 0 { 3 } else { req.replication_factor };
        let policy = req.ingest_policy.as_ref().map(super::ingest_policy::from_proto).transpose()?;
        let retention = req.retention.as_ref().map(super::retention::from_proto).transpose()?;
        let current = self.node.map();
        if current.is_initialized() {
            // Peer addresses left empty are not compared: they were to be learnt.
            let differences = current.shape_differences(&ClusterMap::initial(requested, partitions, rf));
            if differences.is_empty() {
                return Ok(Response::new(InitializeResponse { already_initialized: true }));
            }
            return Err(Status::failed_precondition(format!(
                "the cluster is already initialised with a different shape: {}",
                differences.join("; ")
            )));
        }
        let resolved = futures::future::join_all(
            requested.iter().map(|(id, a)| node_addrs::resolve(&self.node, "nodes", *id, &a.addr, &a.peer_addr)),
        )
        .await;
        let mut nodes = BTreeMap::new();
        for (id, addrs) in requested.keys().zip(resolved) {
            nodes.insert(*id, addrs?);
        }
        for info in &mut req.nodes {
            info.peer_addr = nodes.get(&info.node_id).map(|a| a.peer_addr.clone()).unwrap_or_default();
        }
        let metadata = &self.node.metadata;
        if !metadata.is_initialized().await.map_err(|e| Status::internal(e.to_string()))? {
            let members: BTreeMap<NodeId, BasicNode> =
                nodes.iter().map(|(id, a)| (*id, BasicNode::new(&a.peer_addr))).collect();
            match metadata.initialize(members).await {
                // The node called elects at once rather than waiting out an
                // election timeout.
                Ok(()) => {
                    self.node.ticker.heard(tally_proto::partition::METADATA_GROUP);
                    let _ = metadata.trigger().elect(false).await;
                }
                Err(e) => tracing::debug!(error = %e, "metadata group already initialised"),
            }
        }
        let leader = metadata
            .wait(Some(Duration::from_secs(15)))
            // Not merely `current_leader`: right after `initialize` this node's
            // own vote of term 0 names it, while it is still a candidate.
            .metrics(
                |m| m.state == openraft::ServerState::Leader || m.current_leader.is_some_and(|l| l != m.id),
                "metadata leader",
            )
            .await
            .map_err(|e| Status::unavailable(format!("no metadata leader yet: {e}")))?
            .current_leader
            .unwrap_or(0);
        if leader != self.node.id {
            // Initialize is a public call: forward it to the leader's public port.
            // Before the first map is applied only the request knows the
            // leader's address.
            let fallback = nodes.get(&leader).map(|a| a.addr.as_str());
            let channel = self.node.forward_to_leader(leader, Listener::Public, fallback)?;
            return ClusterClient::new(channel).initialize(req).await;
        }
        let count = nodes.len();
        // The policies before the map: no event is taken under the
        // defaults between them.
        if let Some(policy) = policy {
            metadata
                .client_write(Command::SetIngestPolicy(policy))
                .await
                .map_err(|e| Status::unavailable(format!("writing the ingest policy: {e}")))?;
        }
        if let Some(retention) = retention {
            metadata
                .client_write(Command::SetRetention(retention))
                .await
                .map_err(|e| Status::unavailable(format!("writing the retention policy: {e}")))?;
        }
        metadata
            .client_write(Command::SetClusterMap(ClusterMap::initial(nodes, partitions, rf)))
            .await
            .map_err(|e| Status::unavailable(format!("writing the cluster map: {e}")))?;
        tracing::info!(nodes = count, partitions, "cluster initialised");
        Ok(Response::new(InitializeResponse { already_initialized: false }))
    }
}

/// This node's view: the cluster map plus, for partitions it replicates, the
/// Raft state it sees.
pub fn local_status(node: &Arc<Node>) -> StatusResponse {
    let map = node.map();
    let mut load = NodeLoad::default();
    let partitions = (0..map.partition_count)
        .map(|p| {
            let info = PartitionInfo { partition: p, replicas: map.replicas_of(p).to_vec(), ..Default::default() };
            let (Some(view), Some(replica)) = (local_view(node, p), node.partition(p)) else { return info };
            let rates = replica.load.rates();
            let queued_requests = (replica.ingest.max_capacity() - replica.ingest.capacity()) as u32;
            load.events_per_sec += rates.events_per_sec;
            load.bytes_per_sec += rates.bytes_per_sec;
            load.processor_cpu += rates.processor_cpu;
            load.apply_cpu += rates.apply_cpu;
            load.queued_requests += queued_requests;
            load.partitions_led += u32::from(view.leader == Some(node.id));
            let archive = replica.archive.get();
            let hot = if view.leader == Some(node.id) { replica.load.hot.hottest() } else { None };
            let (hot_entity_id, hot_entity_share) = hot.map_or((Vec::new(), 0.0), |h| (h.entity_id, h.share));
            PartitionInfo {
                hot_entity_id,
                hot_entity_share,
                sealed_below_ms: archive.sealed_below_ms.unwrap_or(0),
                archived_upto_ms: archive.archived_upto().unwrap_or(0),
                archive_segments: archive.segments.len() as u32,
                leader_node_id: view.leader.unwrap_or(0),
                term: view.term,
                commit_index: view.commit_index,
                applied_index: view.applied_index,
                voters: view.voters,
                quiesced: view.quiesced,
                events_per_sec: rates.events_per_sec,
                bytes_per_sec: rates.bytes_per_sec,
                processor_cpu: rates.processor_cpu,
                apply_cpu: rates.apply_cpu,
                queued_requests,
                ..info
            }
        })
        .collect();
    load.process_cpu = node.process_cpu.cores();
    let replicas = node.local_partitions();
    let totals = crate::metrics::metrics().totals();
    StatusResponse {
        node_id: node.id,
        initialized: map.is_initialized(),
        partition_count: map.partition_count,
        replication_factor: map.replication_factor,
        nodes: super::node_addrs::node_infos(node, &map),
        partitions,
        metadata_leader_node_id: node.metadata_leader().unwrap_or(0),
        dedup_conflicts: replicas.iter().map(|r| r.dedup.conflicts()).sum(),
        dedup_keys: replicas.iter().map(|r| r.dedup.lock().len() as u64).sum(),
        dedup_bytes: replicas.iter().map(|r| r.dedup.lock().memory().0 as u64).sum(),
        events_accepted: totals.events_accepted,
        events_duplicate: totals.events_duplicate,
        events_rejected: totals.events_rejected,
        queries: totals.queries,
        ingest_policy: Some(super::ingest_policy::to_proto(*node.ingest_policy.borrow())),
        retention: Some(super::retention::to_proto(*node.retention.borrow())),
        load: Some(load),
        spreads: super::spread::spread_infos(&map),
        balancer_paused: map.balancer_paused,
        slots: map.slot_count(),
        splits: super::split::split_infos(&map),
    }
}
