//! Server side of peer traffic: the internal Raft service. Each message
//! names its group; the node hands it to that group's Raft instance.

use std::sync::Arc;

use futures::StreamExt;
use openraft::raft::{AppendEntriesRequest, TransferLeaderRequest, VoteRequest};
use tally_proto::internal::raft_server::Raft as RaftRpc;
use tally_proto::internal::{PingRequest, PingResponse, ProposeRequest, ProposeResponse, RaftMessage, SnapshotChunk};
use tokio::io::AsyncWriteExt;
use tonic::{Request, Response, Status, Streaming};

use super::types::{SnapshotMeta, TypeConfig, Vote};
use crate::api::ingest::propose_local;
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

    fn group(&self, group: u32) -> Result<RaftInstance, Status> {
        self.node.group(group).ok_or_else(|| Status::unavailable(format!("group {group} is not open on this node")))
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
        Ok(Response::new(PingResponse { node_id: self.node.id, boot_id: self.node.liveness.boot_id() }))
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
        let req = request.into_inner();
        Ok(Response::new(propose_local(&self.node, req.partition, req.events).await))
    }
}
