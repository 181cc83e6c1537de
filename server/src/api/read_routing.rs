//! Where a read of one partition runs, shared by every query: the local
//! replica (after making the read linearizable unless STALE was asked) or
//! the node to forward it to, and the hop count that keeps forwarded
//! queries from looping.

use openraft::async_runtime::WatchReceiver;
use openraft::errors::{LinearizableReadError, RaftError};
use openraft::LinearizerOption;
use std::sync::Arc;
use tally_proto::v1::query_client::QueryClient;
use tally_proto::v1::Consistency;
use tonic::{Request, Status};

use crate::node::{Listener, Node, PartitionReplica};
use crate::stages::{Stage, Timer};
use crate::type_config::NodeId;

const FORWARDED: &str = "x-tally-forwarded";
const READ_INDEX_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a read waits for a partition without a known leader to elect
/// one: a few election timeouts.
const LEADER_WAIT: std::time::Duration = std::time::Duration::from_secs(3);
/// Pause before asking again when this node is about to lead or has just
/// stopped leading: shorter than a heartbeat, so a settled leader is found
/// within one.
const LEADERSHIP_SETTLE: std::time::Duration = std::time::Duration::from_millis(20);

/// The local replica to read from, after making the read linearizable if
/// asked; or the node to forward to.
pub async fn replica_for(
    node: &Node,
    partition: u32,
    consistency: i32,
) -> Result<Result<Arc<PartitionReplica>, NodeId>, Status> {
    let stale = consistency == Consistency::Stale as i32;
    let Some(replica) = node.partition(partition) else {
        return node
            .preferred_replica(partition)
            .map(Err)
            .ok_or_else(|| Status::unavailable(format!("partition {partition} has no replicas")));
    };
    if stale && replica.recovered.load(std::sync::atomic::Ordering::Acquire) {
        return Ok(Ok(replica));
    }
    // Leadership in motion (an election, a transfer to or from this
    // node, a leader that has not yet confirmed its lease) is absorbed
    // here for a few election timeouts rather than failing the read.
    let deadline = tokio::time::Instant::now() + LEADER_WAIT;
    loop {
        let mut leader = replica.raft.metrics().borrow_watched().current_leader;
        if leader.is_none() {
            leader = replica
                .raft
                .wait(Some(deadline.saturating_duration_since(tokio::time::Instant::now())))
                .metrics(|m| m.current_leader.is_some(), "a leader to be elected")
                .await
                .ok()
                .and_then(|m| m.current_leader);
        }
        match leader {
            Some(l) if l != node.id => return Ok(Err(l)),
            None => return Err(Status::unavailable(format!("partition {partition} has no leader right now; retry"))),
            Some(_) => {}
        }
        // Lease read: while a quorum acknowledged this leader within
        // its lease (followers refuse votes for that long), no round
        // trip at all; otherwise (a quiesced group) one heartbeat round.
        // Without a quorum that round never completes.
        let linearizing = Timer::start(Stage::ReadLinearize);
        let read = tokio::time::timeout(
            READ_INDEX_TIMEOUT,
            replica.raft.ensure_linearizable(LinearizerOption::new(None, true)),
        )
        .await
        .map_err(|_| {
            Status::unavailable(format!(
                "partition {partition}: no quorum for a linearizable read; retry or read STALE"
            ))
        })?;
        drop(linearizing);
        match read {
            Ok(_) => return Ok(Ok(replica)),
            Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f))) => match f.leader_id {
                Some(l) if l != node.id => return Ok(Err(l)),
                _ if tokio::time::Instant::now() < deadline => tokio::time::sleep(LEADERSHIP_SETTLE).await,
                _ => return Err(Status::unavailable(format!("partition {partition}: leadership is moving; retry"))),
            },
            Err(e) => return Err(Status::unavailable(format!("partition {partition}: {e}"))),
        }
    }
}

pub fn forward_client(node: &Node, to: NodeId) -> Result<QueryClient<crate::raft::peers::NodeChannel>, Status> {
    Ok(QueryClient::new(node.forward_to_leader(to, Listener::Public, None)?))
}

pub fn partition_count(node: &Node) -> Result<u32, Status> {
    node.partition_count().ok_or_else(|| Status::unavailable("the cluster is not initialised yet"))
}

/// `partition` as a request names it: one the cluster has, else
/// INVALID_ARGUMENT naming the ones it has.
pub fn existing_partition(node: &Node, partition: u32) -> Result<u32, Status> {
    let count = partition_count(node)?;
    if partition >= count {
        return Err(Status::invalid_argument(format!(
            "partition: {partition} does not exist; the cluster has partitions 0 to {}",
            count - 1
        )));
    }
    Ok(partition)
}

pub fn invalid(e: tally_proto::validate::FieldError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// Hops a query may take: a node without a replica asks one that has, which
/// may point at the leader once more.
pub const MAX_HOPS: u32 = 2;

pub fn hops<T>(req: &Request<T>) -> u32 {
    req.metadata().get(FORWARDED).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0)
}

pub fn forwarded<T>(inner: T, hops: u32) -> Request<T> {
    let mut req = Request::new(inner);
    if let Ok(v) = tonic::metadata::MetadataValue::try_from((hops + 1).to_string()) {
        req.metadata_mut().insert(FORWARDED, v);
    }
    req
}

/// A query's latency as its client sees it, recorded (`metrics.rs`) when
/// dropped, by the node the client called: a forwarded query is timed there,
/// not again at each hop.
pub struct ClientLatency {
    kind: &'static str,
    consistency: &'static str,
    started: Option<std::time::Instant>,
}

impl ClientLatency {
    pub fn start(kind: &'static str, consistency: i32, hops: u32) -> ClientLatency {
        let consistency = if consistency == Consistency::Stale as i32 { "stale" } else { "linearizable" };
        ClientLatency { kind, consistency, started: (hops == 0).then(std::time::Instant::now) }
    }
}

impl Drop for ClientLatency {
    fn drop(&mut self) {
        if let Some(started) = self.started {
            crate::metrics::metrics().query(self.kind, self.consistency, started.elapsed().as_secs_f64());
        }
    }
}

/// A read's storage error as the client sees it: floors that moved under
/// the read are worth a retry; anything else is the node's fault.
pub fn storage_status(e: crate::storage::StorageError) -> Status {
    match e {
        crate::storage::StorageError::FloorsMoved | crate::storage::StorageError::Archive(_) => {
            Status::unavailable(e.to_string())
        }
        crate::storage::StorageError::NoArchive => Status::failed_precondition(e.to_string()),
        e => Status::internal(e.to_string()),
    }
}
