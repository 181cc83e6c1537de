//! openraft's network for one group: requests are encoded with postcard,
//! wrapped with the group id and handed to the node's conversation with the
//! peer (`peer_link.rs`), shared by every group: heartbeats and votes on its
//! control lane, appends with entries on its data lane. Snapshots stream
//! from their file in chunks on a call of their own.
//! AppendEntries pass through the group's quiescence (`quiesce.rs`), which
//! counts entries as activity and flags the heartbeats of idle groups.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, TransferLeaderResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use tally_proto::internal::raft_client::RaftClient;
use tally_proto::internal::{RaftCallKind, RaftMessage, SnapshotChunk};
use tokio::io::AsyncReadExt;
use tonic::transport::Channel;

use super::peer_link::{LinkError, PEER_MAX_MESSAGE_BYTES};
use super::peers::{PeerLinks, PeerPool};
use super::quiesce::GroupQuiescence;
use crate::stages::{Stage, Timer};
use crate::storage::codec::{decode, encode};
use crate::storage::snapshot::SnapshotFile;
use crate::storage::state_machine::Snapshot;
use crate::type_config::{NodeId, TypeConfig, Vote};

pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
/// Encoded bytes of one AppendEntries at most. Larger runs of entries are
/// sent in prefixes (openraft's `PartialSuccess`), so a request never nears
/// what the receiver decodes (`PEER_MAX_MESSAGE_BYTES`, 64 MiB) and
/// each stays quick to ship, decode and fsync. One entry is at most about
/// `MAX_ENTRY_BYTES` plus one request; it goes alone if it is larger.
pub const MAX_APPEND_BYTES: usize = 8 << 20;
/// Extra deadline per byte of an AppendEntries: a far-behind follower on a
/// busy machine must be able to take a full one, or replication would time
/// out and re-send the same request forever.
const APPEND_BYTES_PER_SEC: usize = 4 << 20;
const _: () = assert!(crate::command::MAX_ENTRY_BYTES + (5 << 20) < PEER_MAX_MESSAGE_BYTES / 2);
/// Deadline of an AppendEntries that carries entries (see `append_entries`).
const APPEND_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct NetworkFactory {
    group: u32,
    peers: Arc<PeerPool>,
    quiescence: Option<Arc<GroupQuiescence>>,
}

impl NetworkFactory {
    /// `quiescence`: None for groups that never quiesce (the metadata group).
    pub fn new(group: u32, peers: Arc<PeerPool>, quiescence: Option<Arc<GroupQuiescence>>) -> NetworkFactory {
        NetworkFactory { group, peers, quiescence }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = GroupNetwork;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> GroupNetwork {
        GroupNetwork {
            group: self.group,
            target,
            channel: self.peers.channel(target, &node.addr).map_err(|e| e.to_string()),
            links: self.peers.links(target, &node.addr).map_err(|e| e.to_string()),
            quiescence: self.quiescence.clone(),
        }
    }
}

pub struct GroupNetwork {
    group: u32,
    target: NodeId,
    /// For snapshots only.
    channel: Result<Channel, String>,
    links: Result<PeerLinks, String>,
    quiescence: Option<Arc<GroupQuiescence>>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct NetMessage(String);

fn unreachable<E: std::fmt::Display>(e: E) -> Unreachable<TypeConfig> {
    Unreachable::new(&NetMessage(e.to_string()))
}

fn status_to_rpc(status: tonic::Status) -> RPCError<TypeConfig> {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            RPCError::Unreachable(unreachable(status.message()))
        }
        _ => RPCError::Network(NetworkError::new(&NetMessage(format!("{}: {}", status.code(), status.message())))),
    }
}

fn link_to_rpc(e: LinkError) -> RPCError<TypeConfig> {
    match e {
        LinkError::Status(status) => status_to_rpc(status),
        LinkError::TimedOut(_) | LinkError::Unreachable(..) => RPCError::Unreachable(unreachable(e)),
    }
}

impl GroupNetwork {
    fn snapshot_client(&self) -> Result<RaftClient<Channel>, Unreachable<TypeConfig>> {
        let channel = self.channel.as_ref().map_err(unreachable)?;
        // The peer's decode limit, on both sides: a request it would refuse
        // fails here instead of crossing the network first.
        let limit = PEER_MAX_MESSAGE_BYTES;
        Ok(RaftClient::new(channel.clone()).max_decoding_message_size(limit).max_encoding_message_size(limit))
    }

    async fn call<Req, Resp>(
        &self,
        kind: RaftCallKind,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
    {
        let payload = encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        self.call_encoded(kind, payload, false, option.hard_ttl(), false).await
    }

    /// One call on the control lane, or on the data lane if it carries
    /// entries. Small appends stay on the data lane too: under load nearly
    /// every append is small, and on the control lane they delayed the
    /// heartbeats and votes it exists for (failover at 29,456 events/s went
    /// from p99 2.5 s to 10.5 s).
    async fn call_encoded<Resp>(
        &self,
        kind: RaftCallKind,
        payload: Vec<u8>,
        quiesce: bool,
        ttl: Duration,
        carries_entries: bool,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Resp: serde::de::DeserializeOwned,
    {
        let links = self.links.as_ref().map_err(|e| RPCError::Unreachable(unreachable(e)))?;
        let link = if carries_entries { &links.data } else { &links.control };
        let message = RaftMessage { group_id: self.group, payload, quiesce };
        let reply = link.call(kind, message, ttl).await.map_err(link_to_rpc)?;
        decode(&reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }
}

/// Encode an AppendEntries of at most `max_bytes`: keep the longest prefix
/// of entries whose estimated size fits (at least one entry), encode once,
/// and halve further only if the estimate was short. Returns the payload
/// and, if entries were dropped, the last log id it carries.
fn encode_within(
    mut rpc: AppendEntriesRequest<TypeConfig>,
    max_bytes: usize,
) -> Result<(Vec<u8>, Option<crate::type_config::LogId>), RPCError<TypeConfig>> {
    let mut sent_up_to = None;
    let mut total = 0usize;
    let fitting = rpc
        .entries
        .iter()
        .take_while(|e| {
            total += entry_bytes(e);
            total <= max_bytes
        })
        .count()
        .max(1);
    if fitting < rpc.entries.len() {
        rpc.entries.truncate(fitting);
        sent_up_to = rpc.entries.last().map(|e| e.log_id);
    }
    loop {
        let payload = encode(&rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        if payload.len() <= max_bytes || rpc.entries.len() <= 1 {
            return Ok((payload, sent_up_to));
        }
        rpc.entries.truncate(rpc.entries.len() / 2);
        sent_up_to = rpc.entries.last().map(|e| e.log_id);
    }
}

/// Estimated encoded size of one entry.
fn entry_bytes(entry: &crate::type_config::Entry) -> usize {
    match &entry.payload {
        openraft::EntryPayload::Normal(command) => 32 + command.estimated_bytes(),
        openraft::EntryPayload::Blank => 32,
        openraft::EntryPayload::Membership(m) => 64 + 64 * m.nodes().count(),
    }
}

impl RaftNetworkV2<TypeConfig> for GroupNetwork {
    type SnapshotData = SnapshotFile;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let has_entries = !rpc.entries.is_empty();
        let flagged = self.quiescence.as_ref().is_some_and(|q| q.before_send(self.target, has_entries));
        // openraft gives replication RPCs the heartbeat interval (100 ms) as
        // their deadline. A batch of entries on a loaded follower (fsync,
        // a starved CPU) can take longer; timing it out only re-sends the
        // same batch after a backoff, so entries get a longer deadline.
        let (payload, sent_up_to) = encode_within(rpc, MAX_APPEND_BYTES)?;
        let ttl = if has_entries {
            let shipping = Duration::from_millis((payload.len() * 1_000 / APPEND_BYTES_PER_SEC) as u64);
            option.hard_ttl().max(APPEND_TIMEOUT + shipping)
        } else {
            option.hard_ttl()
        };
        let timer = has_entries.then(|| Timer::start(Stage::RaftReplicate));
        let mut resp: AppendEntriesResponse<TypeConfig> =
            self.call_encoded(RaftCallKind::AppendEntries, payload, flagged, ttl, has_entries).await?;
        drop(timer);
        if let (Some(last), true) = (sent_up_to, resp.is_success()) {
            // Only a prefix went; openraft sends the rest next.
            resp = AppendEntriesResponse::PartialSuccess(Some(last));
        }
        if flagged && resp.is_success() {
            if let Some(q) = &self.quiescence {
                q.flagged_heartbeat_acked(self.target);
            }
        }
        Ok(resp)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(RaftCallKind::Vote, &rpc, &option).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(RaftCallKind::PreVote, &rpc, &option).await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(RaftCallKind::TransferLeader, &req, &option).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let header =
            encode(&(vote, snapshot.meta.clone())).map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        let group = self.group;
        let file = tokio::fs::File::open(&snapshot.snapshot.path)
            .await
            .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        // Chunks are read lazily as the stream is polled, so memory holds at
        // most a couple of chunks whatever the snapshot size.
        let first = SnapshotChunk { group_id: group, header, data: Vec::new() };
        let body = futures::stream::unfold(Some(file), move |state| async move {
            let mut file = state?;
            let mut buf = vec![0u8; SNAPSHOT_CHUNK_BYTES];
            let mut filled = 0;
            while filled < buf.len() {
                match file.read(&mut buf[filled..]).await {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) => {
                        // Ending early makes the receiver reject the truncated file.
                        tracing::warn!(group, error = %e, "reading snapshot file");
                        return None;
                    }
                }
            }
            if filled == 0 {
                return None;
            }
            buf.truncate(filled);
            Some((SnapshotChunk { group_id: group, header: Vec::new(), data: buf }, Some(file)))
        });
        let chunks = futures::StreamExt::chain(futures::stream::once(async move { first }), body);
        let mut client = self.snapshot_client().map_err(StreamingError::Unreachable)?;
        let send = client.install_snapshot(chunks);
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            reply = send => {
                let reply = reply.map_err(|s| match status_to_rpc(s) {
                    RPCError::Unreachable(u) => StreamingError::Unreachable(u),
                    other => StreamingError::Network(NetworkError::new(&other)),
                })?;
                decode(&reply.into_inner().payload).map_err(|e| StreamingError::Network(NetworkError::new(&e)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use openraft::impls::leader_id_adv::LeaderId;
    use openraft::EntryPayload;

    use super::*;
    use crate::command::{Command, IngestBatch, MinuteDelta};
    use crate::type_config::{Entry, LogId};

    fn entry(index: u64, bytes: usize) -> Entry {
        let delta = MinuteDelta {
            entity_id: vec![b'e'; bytes],
            event_type: "view".into(),
            minute_ms: 0,
            count: 1,
            sum: 1,
            actors: vec![],
        };
        let batch = IngestBatch { deltas: vec![delta], ..Default::default() };
        Entry {
            log_id: LogId { leader_id: LeaderId { term: 1, node_id: 1 }, index },
            payload: EntryPayload::Normal(Command::Ingest(batch)),
        }
    }

    #[test]
    fn append_entries_are_cut_to_the_byte_budget() {
        let vote = openraft::Vote::new_committed(1, 1);
        let rpc = |n: u64| AppendEntriesRequest::<TypeConfig> {
            vote,
            prev_log_id: None,
            leader_commit: None,
            entries: (1..=n).map(|i| entry(i, 1_000)).collect(),
        };
        let (payload, cut) = encode_within(rpc(64), 10_000).unwrap();
        assert!(payload.len() <= 10_000, "{}", payload.len());
        assert_eq!(cut.map(|l| l.index), Some(8));
        // Within budget: sent whole.
        assert_eq!(encode_within(rpc(4), 10_000).unwrap().1, None);
        // One entry over the budget still goes (alone), never dropped.
        let (payload, cut) = encode_within(rpc(1), 100).unwrap();
        assert!(payload.len() > 100 && cut.is_none());
    }
}
