//! Server side of peer traffic: the internal Raft service, served on the
//! peer port only (`server.rs`). Each message names its group; the node
//! hands it to that group's Raft instance. Nothing here trusts the sender:
//! payloads that do not decode are INVALID_ARGUMENT, unknown groups
//! NOT_FOUND, and forwarded proposals are checked like client batches
//! (`api/propose.rs`).

use std::sync::Arc;

use futures::StreamExt;
use openraft::raft::{AppendEntriesRequest, TransferLeaderRequest, VoteRequest};
use tally_proto::internal::raft_server::Raft as RaftRpc;
use tally_proto::internal::{PingRequest, PingResponse, ProposeRequest, ProposeResponse, RaftMessage, SnapshotChunk};
use tokio::io::AsyncWriteExt;
use tonic::{Request, Response, Status, Streaming};

use super::types::{SnapshotMeta, TypeConfig, Vote};
use crate::api::propose;
use crate::node::Node;
use crate::storage::codec::{decode, encode};
use crate::storage::snapshot::{SnapshotDir, SnapshotFile};
use crate::storage::state_machine::Snapshot;
use crate::RaftInstance;

pub struct RaftService {
    node: Arc<Node>,
}

impl RaftService {
    pub fn new(node: Arc<Node>) -> RaftService {
        RaftService { node }
    }

    /// Decode a group's request, hand it to the group's Raft, encode the reply.
    async fn dispatch<Req, Resp, E, F, Fut>(&self, request: Request<RaftMessage>, call: F) -> Result<Response<RaftMessage>, Status>
    where
        Req: serde::de::DeserializeOwned,
        Resp: serde::Serialize,
        E: std::fmt::Display,
        F: FnOnce(RaftInstance, Req) -> Fut,
        Fut: std::future::Future<Output = Result<Resp, E>>,
    {
        let msg = request.into_inner();
        let raft = self.group(msg.group_id)?;
        let rpc: Req = decode(&msg.payload).map_err(bad_payload)?;
        let resp = call(raft, rpc).await.map_err(|e| Status::unavailable(e.to_string()))?;
        reply(msg.group_id, &resp)
    }

    /// The group's Raft: NOT_FOUND for a group the cluster does not have,
    /// UNAVAILABLE for one not open here (yet: the map that places it may
    /// not have reached this node, so the sender retries).
    fn group(&self, group: u32) -> Result<RaftInstance, Status> {
        if let Some(raft) = self.node.group(group) {
            return Ok(raft);
        }
        let partition = tally_proto::partition::partition_of_group(group);
        match (partition, self.node.partition_count()) {
            (Some(p), Some(count)) if p >= count => Err(Status::not_found(format!(
                "group {group}: the cluster has no partition {p} (groups 0 to {count})"
            ))),
            _ => Err(Status::unavailable(format!("group {group} is not open on this node"))),
        }
    }
}

fn bad_payload(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("undecodable raft payload: {e}"))
}

fn reply<T: serde::Serialize>(group: u32, value: &T) -> Result<Response<RaftMessage>, Status> {
    let payload = encode(value).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(RaftMessage { group_id: group, payload, quiesce: false }))
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let msg = request.into_inner();
        let raft = self.group(msg.group_id)?;
        let rpc: AppendEntriesRequest<TypeConfig> = decode(&msg.payload).map_err(bad_payload)?;
        let leader = rpc.vote.leader_id().node_id;
        let resp = raft.append_entries(rpc).await.map_err(|e| Status::unavailable(e.to_string()))?;
        if let Some(q) = self.node.quiescence.group(msg.group_id) {
            q.received(leader, msg.quiesce, resp.is_success());
        }
        reply(msg.group_id, &resp)
    }

    async fn ping(&self, request: Request<PingRequest>) -> Result<Response<PingResponse>, Status> {
        let _from = request.into_inner().from_node_id;
        Ok(Response::new(PingResponse {
            node_id: self.node.id,
            boot_id: self.node.liveness.boot_id(),
            wall_ms: self.node.clock.local_ms(),
        }))
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.dispatch(request, |raft, rpc: VoteRequest<TypeConfig>| async move { raft.vote(rpc).await }).await
    }

    async fn pre_vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.dispatch(request, |raft, rpc: VoteRequest<TypeConfig>| async move { raft.pre_vote(rpc).await }).await
    }

    async fn transfer_leader(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let (group, node) = (request.get_ref().group_id, self.node.clone());
        self.dispatch(request, |raft, rpc: TransferLeaderRequest<TypeConfig>| async move {
            let (leader, to) = (rpc.from_leader().leader_id().node_id, *rpc.to_node_id());
            let resp = raft.handle_transfer_leader(rpc).await;
            // The leader stepped aside: a quiesced replica must not sleep through it.
            node.quiescence.leader_stepping_aside(group, leader, to);
            resp
        })
        .await
    }

    async fn install_snapshot(&self, request: Request<Streaming<SnapshotChunk>>) -> Result<Response<RaftMessage>, Status> {
        let mut stream = request.into_inner();
        let first = stream
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))??;
        let group = first.group_id;
        let raft = self.group(group)?;
        let (vote, meta): (Vote, SnapshotMeta) = decode(&first.header).map_err(bad_payload)?;
        let dir = SnapshotDir::new(&self.node.snapshot_root(), group).map_err(|e| Status::internal(e.to_string()))?;
        let path = dir.temp_path();
        let received = async {
            let mut file = tokio::fs::File::create(&path).await?;
            file.write_all(&first.data).await?;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(std::io::Error::other)?;
                file.write_all(&chunk.data).await?;
            }
            file.sync_all().await?;
            Ok::<_, std::io::Error>(())
        }
        .await;
        if let Err(e) = received {
            let _ = tokio::fs::remove_file(&path).await;
            return Err(Status::unavailable(format!("receiving snapshot: {e}")));
        }
        let snapshot = Snapshot { meta, snapshot: SnapshotFile { path: path.clone() } };
        let result = raft.install_full_snapshot(vote, snapshot).await;
        // On success the state machine moved the file into place.
        let _ = tokio::fs::remove_file(&path).await;
        let resp = result.map_err(|e| Status::unavailable(e.to_string()))?;
        reply(group, &resp)
    }

    async fn propose(&self, request: Request<ProposeRequest>) -> Result<Response<ProposeResponse>, Status> {
        // Checked like a client's Ingest batch before anything is counted.
        propose::serve(&self.node, request.into_inner()).await.map(Response::new)
    }
}
