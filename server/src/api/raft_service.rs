//! Server side of peer traffic: the internal Raft service, served on the
//! peer port only (`server.rs`). Each message names its group; the node
//! hands it to that group's Raft instance. Nothing here trusts the sender:
//! payloads that do not decode are INVALID_ARGUMENT, unknown groups
//! NOT_FOUND, and forwarded proposals are checked like client batches
//! (`api/propose.rs`).

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use openraft::raft::{AppendEntriesRequest, TransferLeaderRequest, VoteRequest};
use tally_proto::internal::raft_server::Raft as RaftRpc;
use tally_proto::internal::{
    CommitSplitRequest, CommitSplitResponse, CommitSpreadRequest, CommitSpreadResponse, PeerCall, PeerFrame, PeerReply,
    PeerReplyFrame, PingRequest, PingResponse, ProposeRequest, ProposeResponse, RaftCallKind, RaftMessage,
    SnapshotChunk,
};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::api::propose;
use crate::node::Node;
use crate::stages::{Stage, Timer};
use crate::storage::codec::{decode, encode};
use crate::storage::snapshot::{SnapshotDir, SnapshotFile};
use crate::storage::state_machine::Snapshot;
use crate::type_config::{SnapshotMeta, TypeConfig, Vote};
use crate::RaftInstance;

/// Calls of one conversation being handled at once, at most.
const CONVERSE_CALLS_IN_FLIGHT: usize = 4_096;
/// Finished replies waiting to be framed.
const CONVERSE_REPLY_QUEUE: usize = 4_096;
/// Replies packed into one frame at most.
const CONVERSE_REPLIES_PER_FRAME: usize = 2_048;

pub struct RaftService {
    node: Arc<Node>,
}

impl RaftService {
    pub fn new(node: Arc<Node>) -> RaftService {
        RaftService { node }
    }

    /// One Raft call of a conversation: decode it, hand it to its group's
    /// Raft, encode the reply.
    async fn handle(&self, kind: RaftCallKind, msg: RaftMessage) -> Result<Vec<u8>, Status> {
        let raft = self.group(msg.group_id)?;
        let group = msg.group_id;
        match kind {
            RaftCallKind::AppendEntries => {
                let rpc: AppendEntriesRequest<TypeConfig> = decode(&msg.payload).map_err(bad_payload)?;
                let leader = rpc.vote.leader_id().node_id;
                let timer = (!rpc.entries.is_empty()).then(|| Timer::start(Stage::RaftFollowerAppend));
                let resp = raft.append_entries(rpc).await.map_err(|e| Status::unavailable(e.to_string()))?;
                drop(timer);
                if resp.is_success() {
                    self.node.ticker.heard(group);
                }
                if let Some(q) = self.node.quiescence.group(group) {
                    q.received(leader, msg.quiesce, resp.is_success());
                }
                encode_reply(&resp)
            }
            RaftCallKind::Vote => {
                let rpc: VoteRequest<TypeConfig> = decode(&msg.payload).map_err(bad_payload)?;
                let resp = raft.vote(rpc).await.map_err(|e| Status::unavailable(e.to_string()))?;
                // Granting a vote restarts the election timer, as in Raft.
                if resp.vote_granted {
                    self.node.ticker.heard(group);
                    self.node.ticker.candidate_seen(group);
                }
                encode_reply(&resp)
            }
            RaftCallKind::PreVote => {
                let rpc: VoteRequest<TypeConfig> = decode(&msg.payload).map_err(bad_payload)?;
                let resp = raft.pre_vote(rpc).await.map_err(|e| Status::unavailable(e.to_string()))?;
                // A granted pre-vote changes no term or timer in openraft,
                // but a successor whose turn comes while another's election
                // is under way must not campaign across it (quiesce.rs).
                if resp.vote_granted {
                    self.node.ticker.candidate_seen(group);
                }
                encode_reply(&resp)
            }
            RaftCallKind::TransferLeader => {
                let rpc: TransferLeaderRequest<TypeConfig> = decode(&msg.payload).map_err(bad_payload)?;
                let (leader, to) = (rpc.from_leader().leader_id().node_id, *rpc.to_node_id());
                let resp = raft.handle_transfer_leader(rpc).await;
                // The leader stepped aside: a quiesced replica must not sleep
                // through it, nor an awake one wait out its patience.
                self.node.ticker.lease_dropped(group);
                self.node.quiescence.leader_stepping_aside(group, leader, to);
                encode_reply(&resp.map_err(|e| Status::unavailable(e.to_string()))?)
            }
        }
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
            (Some(p), Some(count)) if p >= count => {
                Err(Status::not_found(format!("group {group}: the cluster has no partition {p} (groups 0 to {count})")))
            }
            _ => Err(Status::unavailable(format!("group {group} is not open on this node"))),
        }
    }
}

fn bad_payload(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("undecodable raft payload: {e}"))
}

fn encode_reply<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Status> {
    encode(value).map_err(|e| Status::internal(e.to_string()))
}

fn reply<T: serde::Serialize>(group: u32, value: &T) -> Result<Response<RaftMessage>, Status> {
    Ok(Response::new(RaftMessage { group_id: group, payload: encode_reply(value)?, quiesce: false }))
}

/// Answer one call of a conversation.
async fn answer(service: &RaftService, call: PeerCall) -> PeerReply {
    let id = call.id;
    let result = match (RaftCallKind::try_from(call.kind), call.message) {
        (Ok(kind), Some(msg)) => service.handle(kind, msg).await,
        (Err(_), _) => Err(Status::invalid_argument(format!("unknown raft call kind {}", call.kind))),
        (_, None) => Err(Status::invalid_argument("raft call without a message")),
    };
    match result {
        Ok(payload) => PeerReply { id, code: Code::Ok as i32, error: String::new(), payload },
        Err(status) => {
            PeerReply { id, code: status.code() as i32, error: status.message().to_string(), payload: Vec::new() }
        }
    }
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    type ConverseStream = Pin<Box<dyn Stream<Item = Result<PeerReplyFrame, Status>> + Send + 'static>>;

    async fn converse(&self, request: Request<Streaming<PeerFrame>>) -> Result<Response<Self::ConverseStream>, Status> {
        let mut inbound = request.into_inner();
        let service = Arc::new(RaftService { node: self.node.clone() });
        let (replies, replies_rx) = mpsc::channel::<PeerReply>(CONVERSE_REPLY_QUEUE);
        let calls_in_flight = Arc::new(Semaphore::new(CONVERSE_CALLS_IN_FLIGHT));
        tokio::spawn(async move {
            // Each call on its own task: a slow one (an fsync, a group busy
            // applying) holds back only its own reply. Past the in-flight
            // bound this loop stops reading, and HTTP/2 flow control pushes
            // back on the sender.
            while let Ok(Some(frame)) = inbound.message().await {
                for call in frame.calls {
                    let Ok(permit) = calls_in_flight.clone().acquire_owned().await else { return };
                    let (service, replies) = (service.clone(), replies.clone());
                    tokio::spawn(async move {
                        let reply = answer(&service, call).await;
                        let _ = replies.send(reply).await;
                        drop(permit);
                    });
                }
            }
        });
        let frames = ReceiverStream::new(replies_rx)
            .ready_chunks(CONVERSE_REPLIES_PER_FRAME)
            .map(|replies| Ok(PeerReplyFrame { replies }));
        Ok(Response::new(Box::pin(frames)))
    }

    async fn commit_spread(
        &self,
        request: Request<CommitSpreadRequest>,
    ) -> Result<Response<CommitSpreadResponse>, Status> {
        Ok(Response::new(super::spread::serve_commit(&self.node, request.into_inner()).await?))
    }

    async fn commit_split(
        &self,
        request: Request<CommitSplitRequest>,
    ) -> Result<Response<CommitSplitResponse>, Status> {
        Ok(Response::new(super::split::serve_commit(&self.node, request.into_inner()).await?))
    }

    async fn ping(&self, request: Request<PingRequest>) -> Result<Response<PingResponse>, Status> {
        let _from = request.into_inner().from_node_id;
        Ok(Response::new(PingResponse {
            node_id: self.node.id,
            boot_id: self.node.liveness.boot_id(),
            wall_ms: self.node.clock.local_ms(),
        }))
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftMessage>, Status> {
        let mut stream = request.into_inner();
        let first = stream.next().await.ok_or_else(|| Status::invalid_argument("empty snapshot stream"))??;
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
