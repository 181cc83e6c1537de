//! The public Ingest service: validate, split the batch by partition, and
//! have each partition's leader process its share — locally, or over the
//! internal Propose call to the leader's node.
//!
//! Events whose fields fail validation are answered here; those that still
//! have an entity go with their partition's share to be kept in its
//! dead-letter log. Event times are judged by the leader (`processor.rs`),
//! against its log's clock.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use openraft::async_runtime::WatchReceiver;
use tally_proto::internal::raft_client::RaftClient;
use tally_proto::internal::ProposeRequest;
use tally_proto::routing::Routing;
use tally_proto::v1::ingest_server::Ingest;
use tally_proto::v1::{Event, IngestRequest, IngestResponse, LeaderHint, Rejection, RejectionCode};
use tally_proto::validate::validate_event;
use tonic::{Request, Response, Status};

use super::{batch_limits, dead_letters, ingest_policy, propose, retry_hint};
use crate::command::{DeadLetter, DeadLetterReason};
use crate::meta::TimeRejection;
use crate::metrics::{metrics, EventOutcome};
use crate::node::{Listener, Node};
use crate::processor::ProposeOutcome;
use crate::stages::{Stage, Timer};
use crate::type_config::NodeId;

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
        let refused = |n: usize| metrics().events(EventOutcome::RequestRefused, n as u64);
        if let Err(e) = batch_limits::check(&req.events) {
            refused(req.events.len());
            return Err(e);
        }
        let Some(routing) = self.node.routing() else {
            refused(req.events.len());
            return Err(Status::unavailable("the cluster is not initialised yet (see `tally cluster init`)"));
        };
        let dedup_window_ms = self.node.config.dedup_window_secs * 1000;
        let mut response = IngestResponse { dedup_window_ms, ..Default::default() };
        let mut by_partition: BTreeMap<u32, Share> = BTreeMap::new();
        for (index, event) in req.events.into_iter().enumerate() {
            let index = index as u32;
            if let Err(e) = validate_event(&event) {
                // Its dead letter goes to the entity's home partition.
                let slot = by_partition.entry(routing.home_of(&event.entity_id)).or_default();
                let reason = DeadLetterReason::Invalid { field: e.field.to_string(), reason: e.reason.clone() };
                slot.invalid.push(DeadLetter::of(&event, reason));
                response.rejected.push(Rejection {
                    index,
                    field: e.field.to_string(),
                    reason: e.reason,
                    retryable: false,
                    code: RejectionCode::Invalid as i32,
                });
                continue;
            }
            by_partition.entry(routing.partition_of_event(&event)).or_default().push(index, event);
        }
        let results = dispatch(&self.node, by_partition).await;
        // Every valid event refused because a dedup index is at its memory
        // bound: the request as a whole is RESOURCE_EXHAUSTED, with why.
        let exhausted = |r: &Routed| matches!(r.outcome, ProposeOutcome::Exhausted(_));
        if response.rejected.is_empty() && !results.is_empty() && results.iter().all(|(_, _, r)| exhausted(r)) {
            let why = results
                .iter()
                .find_map(|(p, _, r)| match &r.outcome {
                    ProposeOutcome::Exhausted(message) => Some(format!("partition {p}: {message}")),
                    _ => None,
                })
                .unwrap_or_default();
            let valid: usize = results.iter().map(|(_, (indexes, _), _)| indexes.len()).sum();
            metrics().events(EventOutcome::Exhausted, valid as u64);
            metrics().shed("dedup_full");
            let message = format!("{why}; {}", retry_advice(dedup_window_ms));
            return Err(retry_hint::exhausted(message, retry_hint::DEDUP_FULL_RETRY_AFTER));
        }
        let invalid = response.rejected.len();
        let (mut too_late, mut in_future) = (0usize, 0usize);
        let mut exhausted_events = 0usize;
        for (partition, (indexes, times), routed) in results {
            if let Some(leader) = routed.leader.filter(|l| *l != 0) {
                let leader_addr = self.node.addr_of(leader).unwrap_or_default();
                response.leaders.push(LeaderHint { partition, leader_node_id: leader, leader_addr });
            }
            let exhausted_now = matches!(routed.outcome, ProposeOutcome::Exhausted(_));
            let message = match routed.outcome {
                ProposeOutcome::Done { accepted, duplicates, rejected, moved } => {
                    // Still moved after the last round: the spread's map
                    // has not reached this node yet.
                    let reason = format!(
                        "partition {partition}: the entity is being spread over more partitions; {}",
                        retry_advice(dedup_window_ms)
                    );
                    response.rejected.extend(moved.iter().filter_map(|p| indexes.get(*p as usize)).map(|&index| {
                        Rejection {
                            index,
                            field: String::new(),
                            reason: reason.clone(),
                            retryable: true,
                            code: RejectionCode::Unavailable as i32,
                        }
                    }));
                    response.accepted += accepted;
                    response.duplicates += duplicates.len() as u32;
                    response
                        .duplicate_indexes
                        .extend(duplicates.iter().filter_map(|p| indexes.get(*p as usize).copied()));
                    for (position, why) in rejected {
                        let (Some(&index), Some(&time)) =
                            (indexes.get(position as usize), times.get(position as usize))
                        else {
                            continue;
                        };
                        match why {
                            TimeRejection::TooLate { .. } => too_late += 1,
                            TimeRejection::InFuture { .. } => in_future += 1,
                        }
                        response.rejected.push(ingest_policy::rejection(index, time, why));
                    }
                    continue;
                }
                ProposeOutcome::NotLeader { .. } => String::new(),
                ProposeOutcome::Unavailable(message) => message,
                ProposeOutcome::Exhausted(message) => {
                    exhausted_events += indexes.len();
                    message
                }
            };
            let retry = retry_advice(dedup_window_ms);
            let reason = if message.is_empty() {
                format!("partition {partition} has no reachable leader; {retry}")
            } else {
                format!("partition {partition}: {message}; {retry}")
            };
            let code = if exhausted_now { RejectionCode::Exhausted } else { RejectionCode::Unavailable };
            response.rejected.extend(indexes.into_iter().map(|index| Rejection {
                index,
                field: String::new(),
                reason: reason.clone(),
                retryable: true,
                code: code as i32,
            }));
        }
        let m = metrics();
        m.events(EventOutcome::Accepted, u64::from(response.accepted));
        m.events(EventOutcome::Duplicate, u64::from(response.duplicates));
        m.events(EventOutcome::Invalid, invalid as u64);
        m.events(EventOutcome::TooLate, too_late as u64);
        m.events(EventOutcome::InFuture, in_future as u64);
        m.events(EventOutcome::Exhausted, exhausted_events as u64);
        let unavailable = response.rejected.len() - invalid - too_late - in_future - exhausted_events;
        m.events(EventOutcome::Unavailable, unavailable as u64);
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

/// One partition's share of a request: its valid events (with their
/// request indexes and times, for the reply) and the invalid ones for its
/// dead-letter log.
#[derive(Default)]
struct Share {
    indexes: Vec<u32>,
    times: Vec<i64>,
    events: Vec<Event>,
    invalid: Vec<DeadLetter>,
}

impl Share {
    fn push(&mut self, index: u32, event: Event) {
        self.indexes.push(index);
        self.times.push(event.event_time_ms);
        self.events.push(event);
    }
}

/// Rounds of routing a request's events: a partition answers "moved" for
/// the events of an entity spread away from it, and they go again by the
/// map that spread it.
const ROUTING_ROUNDS: usize = 3;
/// How long a round waits for this node's map to route moved events
/// elsewhere (the spread is committed to the map right after the home
/// partition's log, so normally it is already here).
const MAP_WAIT: Duration = Duration::from_secs(2);

/// One partition's share as answered: the request indexes and times of
/// its events, and where it ended.
type ShareResult = (u32, (Vec<u32>, Vec<i64>), Routed);

/// Send every partition's share to its leader, at once; events a partition
/// answers "moved" are routed again by the newest map, up to
/// [`ROUTING_ROUNDS`] times. Moved events were not counted and their keys
/// not recorded (`moved.rs`), so sending them again counts them once.
async fn dispatch(node: &Arc<Node>, mut shares: BTreeMap<u32, Share>) -> Vec<ShareResult> {
    let mut results = Vec::with_capacity(shares.len());
    for round in 0..ROUTING_ROUNDS {
        let answered = join_all(shares.into_iter().map(|(partition, share)| async move {
            let Share { indexes, times, events, invalid } = share;
            let timeout = Duration::from_millis(node.config.ingest_timeout_ms);
            let (routed, events) = match tokio::time::timeout(timeout, route(node, partition, events, invalid)).await {
                Ok(routed) => routed,
                Err(_) => (
                    Routed {
                        outcome: ProposeOutcome::Unavailable(format!(
                            "partition {partition}: no commit within {} ms",
                            timeout.as_millis()
                        )),
                        leader: None,
                    },
                    Vec::new(),
                ),
            };
            (partition, (indexes, times), routed, events)
        }))
        .await;
        let last_round = round + 1 == ROUTING_ROUNDS;
        let mut again: Vec<(u32, u32, Event)> = Vec::new();
        for (partition, (indexes, times), mut routed, events) in answered {
            if let ProposeOutcome::Done { moved, .. } = &mut routed.outcome {
                if !last_round && !moved.is_empty() && events.len() == indexes.len() {
                    let mut events: Vec<Option<Event>> = events.into_iter().map(Some).collect();
                    for position in std::mem::take(moved) {
                        let p = position as usize;
                        if let (Some(&index), Some(event)) = (indexes.get(p), events.get_mut(p).and_then(Option::take))
                        {
                            again.push((partition, index, event));
                        }
                    }
                }
            }
            results.push((partition, (indexes, times), routed));
        }
        if again.is_empty() {
            break;
        }
        let routing = routed_away(node, &again).await;
        shares = BTreeMap::new();
        for (_, index, event) in again {
            shares.entry(routing.partition_of_event(&event)).or_default().push(index, event);
        }
    }
    results
}

/// The newest routing, once it sends every moved event away from the
/// partition that refused it (or after [`MAP_WAIT`]).
async fn routed_away(node: &Node, moved: &[(u32, u32, Event)]) -> Arc<Routing> {
    let deadline = tokio::time::Instant::now() + MAP_WAIT;
    loop {
        if let Some(routing) = node.routing() {
            let away = moved.iter().all(|(from, _, e)| routing.partition_of_event(e) != *from);
            if away || tokio::time::Instant::now() >= deadline {
                return routing;
            }
        } else if tokio::time::Instant::now() >= deadline {
            return Arc::new(Routing::default());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Where one partition's share ended: the processor's outcome, and the
/// node that gave it or was named as leader (for the client's hints).
struct Routed {
    outcome: ProposeOutcome,
    leader: Option<NodeId>,
}

/// Send one partition's events to its leader, following leader hints; the
/// events come back for a second round (see [`dispatch`]).
async fn route(node: &Arc<Node>, partition: u32, events: Vec<Event>, invalid: Vec<DeadLetter>) -> (Routed, Vec<Event>) {
    let mut target = first_guess(node, partition);
    let mut last = Routed { outcome: ProposeOutcome::Unavailable(String::new()), leader: None };
    for attempt in 0..MAX_ROUTING_ATTEMPTS {
        let Some(to) = target else {
            tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
            target = first_guess(node, partition);
            continue;
        };
        let outcome = if to == node.id {
            node.propose(partition, events.clone(), invalid.clone()).await
        } else {
            forward(node, to, partition, events.clone(), &invalid).await
        };
        let ProposeOutcome::NotLeader { leader } = outcome else {
            return (Routed { outcome, leader: Some(to) }, events);
        };
        last = Routed { outcome, leader };
        target = leader.filter(|l| *l != to);
    }
    (Routed { outcome: ProposeOutcome::Unavailable("no leader found".into()), leader: last.leader }, events)
}

fn first_guess(node: &Node, partition: u32) -> Option<NodeId> {
    if let Some(replica) = node.partition(partition) {
        if let Some(leader) = replica.raft.metrics().borrow_watched().current_leader {
            return Some(leader);
        }
    }
    node.preferred_replica(partition)
}

/// Propose is peer traffic: the leader's peer port.
async fn forward(
    node: &Node,
    to: NodeId,
    partition: u32,
    events: Vec<Event>,
    invalid: &[DeadLetter],
) -> ProposeOutcome {
    let channel = match node.forward_to_leader(to, Listener::Peer, None) {
        Ok(channel) => channel,
        Err(e) => return ProposeOutcome::Unavailable(e.to_string()),
    };
    let invalid = invalid.iter().map(|d| dead_letters::to_proto(d, 0)).collect();
    let map_version = node.cluster_map.borrow().version;
    match RaftClient::new(channel).propose(ProposeRequest { partition, events, invalid, map_version }).await {
        Ok(resp) => propose::from_wire(resp.into_inner()),
        Err(status) => ProposeOutcome::Unavailable(format!("forwarding to node {to}: {}", status.message())),
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
