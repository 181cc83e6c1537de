//! The public Ingest service: validate, split the batch by partition, and
//! have each partition's leader process its share — locally, or over the
//! internal Propose call to the leader's node.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use openraft::async_runtime::WatchReceiver;
use tally_proto::internal::propose_response::Status as ProposeStatus;
use tally_proto::internal::raft_client::RaftClient;
use tally_proto::internal::{ProposeRequest, ProposeResponse};
use tally_proto::partition::partition_of;
use tally_proto::v1::ingest_server::Ingest;
use tally_proto::v1::{Event, IngestRequest, IngestResponse, LeaderHint, Rejection};
use tally_proto::validate::validate_event;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use super::batch_limits;
use crate::node::Node;
use crate::processor::{IngestJob, ProposeOutcome};
use crate::raft::types::NodeId;
use crate::stages::{Stage, Timer};

/// Hops to follow "not leader" hints before giving up on a sub-batch.
const MAX_ROUTING_ATTEMPTS: u32 = 4;

pub struct IngestService {
    node: Arc<Node>,
}

impl IngestService {
    pub fn new(node: Arc<Node>) -> IngestService {
        IngestService { node }
    }
}

#[tonic::async_trait]
impl Ingest for IngestService {
    async fn ingest(&self, request: Request<IngestRequest>) -> Result<Response<IngestResponse>, Status> {
        // Admission (how many requests at once) is the layer in front of
        // this service (`admission.rs`): it ran before the body was read.
        let _timer = Timer::start(Stage::IngestRequest);
        let req = request.into_inner();
        batch_limits::check(&req.events)?;
        let Some(partition_count) = self.node.partition_count() else {
            return Err(Status::unavailable("the cluster is not initialised yet (see `tally cluster init`)"));
        };
        let dedup_window_ms = self.node.config.dedup_window_secs * 1000;
        let mut response = IngestResponse { dedup_window_ms, ..Default::default() };
        let mut by_partition: BTreeMap<u32, (Vec<u32>, Vec<Event>)> = BTreeMap::new();
        for (index, event) in req.events.into_iter().enumerate() {
            let index = index as u32;
            match validate_event(&event) {
                Ok(()) => {
                    let slot = by_partition.entry(partition_of(&event.entity_id, partition_count)).or_default();
                    slot.0.push(index);
                    slot.1.push(event);
                }
                Err(e) => response.rejected.push(Rejection {
                    index,
                    field: e.field.to_string(),
                    reason: e.reason,
                    retryable: false,
                }),
            }
        }
        let node = &self.node;
        let results = join_all(by_partition.into_iter().map(|(partition, (indexes, events))| async move {
            let timeout = Duration::from_millis(node.config.ingest_timeout_ms);
            let outcome = match tokio::time::timeout(timeout, route(node, partition, events)).await {
                Ok(r) => r,
                Err(_) => ProposeResponse {
                    status: ProposeStatus::Unavailable as i32,
                    message: format!("partition {partition}: no commit within {} ms", timeout.as_millis()),
                    ..Default::default()
                },
            };
            (partition, indexes, outcome)
        }))
        .await;
        // Every valid event refused because a dedup index is at its memory
        // bound: the request as a whole is RESOURCE_EXHAUSTED, with why.
        let exhausted = |o: &ProposeResponse| o.status == ProposeStatus::ResourceExhausted as i32;
        if response.rejected.is_empty() && !results.is_empty() && results.iter().all(|(_, _, o)| exhausted(o)) {
            let why =
                results.iter().map(|(p, _, o)| format!("partition {p}: {}", o.message)).next().unwrap_or_default();
            return Err(Status::resource_exhausted(format!("{why}; {}", retry_advice(dedup_window_ms))));
        }
        for (partition, indexes, outcome) in results {
            if outcome.leader_node_id != 0 {
                response.leaders.push(LeaderHint {
                    partition,
                    leader_node_id: outcome.leader_node_id,
                    leader_addr: outcome.leader_addr.clone(),
                });
            }
            if outcome.status == ProposeStatus::Ok as i32 {
                response.accepted += outcome.accepted;
                response.duplicates += outcome.duplicates;
                response
                    .duplicate_indexes
                    .extend(outcome.duplicate_positions.iter().filter_map(|p| indexes.get(*p as usize).copied()));
            } else {
                let retry = retry_advice(dedup_window_ms);
                let reason = if outcome.message.is_empty() {
                    format!("partition {partition} has no reachable leader; {retry}")
                } else {
                    format!("partition {partition}: {}; {retry}", outcome.message)
                };
                response.rejected.extend(indexes.into_iter().map(|index| Rejection {
                    index,
                    field: String::new(),
                    reason: reason.clone(),
                    retryable: true,
                }));
            }
        }
        response.rejected.sort_by_key(|r| r.index);
        response.duplicate_indexes.sort_unstable();
        Ok(Response::new(response))
    }
}

/// What a retryable rejection tells the client: a retry is safe only with
/// the same event_id and within the dedup window.
fn retry_advice(dedup_window_ms: u64) -> String {
    let window = if dedup_window_ms % 1000 == 0 {
        format!("{} s", dedup_window_ms / 1000)
    } else {
        format!("{dedup_window_ms} ms")
    };
    format!("retry with the same event_id within the dedup window ({window}) of the first attempt")
}

/// Send one partition's events to its leader, following leader hints.
async fn route(node: &Arc<Node>, partition: u32, events: Vec<Event>) -> ProposeResponse {
    let mut target = first_guess(node, partition);
    let mut last = ProposeResponse::default();
    for attempt in 0..MAX_ROUTING_ATTEMPTS {
        let Some(to) = target else {
            tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
            target = first_guess(node, partition);
            continue;
        };
        last = if to == node.id {
            propose_local(node, partition, events.clone()).await
        } else {
            forward(node, to, partition, events.clone()).await
        };
        if last.status != ProposeStatus::NotLeader as i32 {
            return last;
        }
        target = if last.leader_node_id != 0 && last.leader_node_id != to { Some(last.leader_node_id) } else { None };
    }
    if last.status == ProposeStatus::Ok as i32 {
        return last;
    }
    ProposeResponse { status: ProposeStatus::Unavailable as i32, message: "no leader found".into(), ..last }
}

fn first_guess(node: &Node, partition: u32) -> Option<NodeId> {
    if let Some(replica) = node.partition(partition) {
        if let Some(leader) = replica.raft.metrics().borrow_watched().current_leader {
            return Some(leader);
        }
    }
    node.preferred_replica(partition)
}

async fn forward(node: &Node, to: NodeId, partition: u32, events: Vec<Event>) -> ProposeResponse {
    let unavailable =
        |message: String| ProposeResponse { status: ProposeStatus::Unavailable as i32, message, ..Default::default() };
    // Propose is peer traffic: the leader's peer port.
    let Some(addr) = node.peer_addr_of(to) else {
        return unavailable(format!("node {to} is not in the cluster map"));
    };
    let channel = match node.peers.channel(to, &addr) {
        Ok(c) => c,
        Err(e) => return unavailable(format!("node {to}: {e}")),
    };
    let mut client = RaftClient::new(channel);
    match client.propose(ProposeRequest { partition, events }).await {
        Ok(resp) => resp.into_inner(),
        Err(status) => unavailable(format!("forwarding to node {to}: {}", status.message())),
    }
}

/// Hand events to this node's processor for the partition.
pub async fn propose_local(node: &Node, partition: u32, events: Vec<Event>) -> ProposeResponse {
    let Some(replica) = node.partition(partition) else {
        return ProposeResponse {
            status: ProposeStatus::NotLeader as i32,
            leader_node_id: node.preferred_replica(partition).unwrap_or(0),
            message: format!("node {} holds no replica of partition {partition}", node.id),
            ..Default::default()
        };
    };
    let (reply, rx) = oneshot::channel();
    if replica.ingest.send(IngestJob::new(events, reply)).await.is_err() {
        return ProposeResponse {
            status: ProposeStatus::Unavailable as i32,
            message: "processor stopped".into(),
            ..Default::default()
        };
    }
    let outcome = rx.await.unwrap_or(ProposeOutcome::Unavailable("processor stopped".into()));
    let leader_of = |leader: Option<NodeId>| {
        let id = leader.unwrap_or(0);
        (id, node.addr_of(id).unwrap_or_default())
    };
    match outcome {
        ProposeOutcome::Done { accepted, duplicates } => {
            let (id, addr) = leader_of(Some(node.id));
            ProposeResponse {
                status: ProposeStatus::Ok as i32,
                accepted,
                duplicates: duplicates.len() as u32,
                leader_node_id: id,
                leader_addr: addr,
                message: String::new(),
                duplicate_positions: duplicates,
            }
        }
        ProposeOutcome::NotLeader { leader } => {
            let (id, addr) = leader_of(leader);
            ProposeResponse {
                status: ProposeStatus::NotLeader as i32,
                leader_node_id: id,
                leader_addr: addr,
                ..Default::default()
            }
        }
        ProposeOutcome::Unavailable(message) => {
            ProposeResponse { status: ProposeStatus::Unavailable as i32, message, ..Default::default() }
        }
        ProposeOutcome::Exhausted(message) => {
            ProposeResponse { status: ProposeStatus::ResourceExhausted as i32, message, ..Default::default() }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::retry_advice;

    #[test]
    fn retry_advice_names_the_window() {
        assert_eq!(
            retry_advice(600_000),
            "retry with the same event_id within the dedup window (600 s) of the first attempt"
        );
        assert!(retry_advice(1_500).contains("(1500 ms)"));
    }
}
