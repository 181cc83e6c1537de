//! The receiving end of `Propose`: a peer's share of an ingest batch, for a
//! partition this node leads; and the one conversion between a processor's
//! [`ProposeOutcome`] and the wire's `ProposeResponse`, both ways.
//!
//! The forwarding node has already validated and partitioned the events,
//! but the receiver does not take its word for it: whatever reaches the peer
//! port is checked exactly as `Ingest` checks a client's batch — the batch
//! limits, every event's fields, that the partition exists and that every
//! event belongs to it — before any of it reaches the processor. A request
//! that fails is refused whole, with a status naming what is wrong; nothing
//! of it is counted. (A legitimate peer never sends one, so there is no
//! per-event answer to give.)

use tally_proto::internal::propose_response::Status as ProposeStatus;
use tally_proto::internal::{ProposeRequest, ProposeResponse, TimeRejected};
use tally_proto::v1::RejectionCode;
use tally_proto::validate::validate_event;
use tonic::Status;

use super::{batch_limits, dead_letters};
use crate::meta::{NodeId, TimeRejection};
use crate::node::Node;
use crate::processor::ProposeOutcome;

/// How long a share forwarded under a newer map waits for it here.
const MAP_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Check a forwarded share, then hand it to the partition's processor.
pub async fn serve(node: &Node, request: ProposeRequest) -> Result<ProposeResponse, Status> {
    if node.cluster_map.borrow().version < request.map_version {
        let mut map = node.cluster_map.clone();
        let newer = map.wait_for(|m| m.version >= request.map_version);
        // On timeout, judge by the map at hand: at worst a refused share,
        // which the forwarder reports as retryable.
        let _ = tokio::time::timeout(MAP_WAIT, newer).await;
    }
    check(node, &request)?;
    let invalid = request.invalid.into_iter().map(dead_letters::invalid_from_proto).collect::<Result<Vec<_>, _>>()?;
    Ok(to_wire(node, node.propose(request.partition, request.events, invalid).await))
}

/// A processor's outcome as the forwarding node receives it. The leader
/// named is this node when it counted the events, else its hint.
pub fn to_wire(node: &Node, outcome: ProposeOutcome) -> ProposeResponse {
    let leader = |id: Option<NodeId>| {
        let id = id.unwrap_or(0);
        (id, node.addr_of(id).unwrap_or_default())
    };
    match outcome {
        ProposeOutcome::Done { accepted, duplicates, rejected, moved } => {
            let (leader_node_id, leader_addr) = leader(Some(node.id));
            let time_rejected = rejected
                .into_iter()
                .map(|(position, why)| {
                    let (code, limit_ms) = match why {
                        TimeRejection::TooLate { limit_ms } => (RejectionCode::TooLate, limit_ms),
                        TimeRejection::InFuture { limit_ms } => (RejectionCode::InFuture, limit_ms),
                    };
                    TimeRejected { position, code: code as i32, limit_ms }
                })
                .collect();
            ProposeResponse {
                status: ProposeStatus::Ok as i32,
                accepted,
                duplicates: duplicates.len() as u32,
                leader_node_id,
                leader_addr,
                message: String::new(),
                duplicate_positions: duplicates,
                time_rejected,
                moved_positions: moved,
            }
        }
        ProposeOutcome::NotLeader { leader: hint } => {
            let (leader_node_id, leader_addr) = leader(hint);
            ProposeResponse {
                status: ProposeStatus::NotLeader as i32,
                leader_node_id,
                leader_addr,
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

/// The outcome a peer reported for a forwarded share. A status this node
/// does not know (a newer peer) is taken as unavailable: retryable, and
/// nothing is claimed counted.
pub fn from_wire(response: ProposeResponse) -> ProposeOutcome {
    match ProposeStatus::try_from(response.status) {
        Ok(ProposeStatus::Ok) => {
            let mut rejected = Vec::with_capacity(response.time_rejected.len());
            for r in response.time_rejected {
                let why = match RejectionCode::try_from(r.code) {
                    Ok(RejectionCode::TooLate) => TimeRejection::TooLate { limit_ms: r.limit_ms },
                    Ok(RejectionCode::InFuture) => TimeRejection::InFuture { limit_ms: r.limit_ms },
                    // Nothing the leader refused may pass as accepted or vanish.
                    _ => return ProposeOutcome::Unavailable(format!("unknown time rejection code {}", r.code)),
                };
                rejected.push((r.position, why));
            }
            ProposeOutcome::Done {
                accepted: response.accepted,
                duplicates: response.duplicate_positions,
                rejected,
                moved: response.moved_positions,
            }
        }
        Ok(ProposeStatus::NotLeader) => {
            ProposeOutcome::NotLeader { leader: (response.leader_node_id != 0).then_some(response.leader_node_id) }
        }
        Ok(ProposeStatus::ResourceExhausted) => ProposeOutcome::Exhausted(response.message),
        Ok(ProposeStatus::Unavailable) => ProposeOutcome::Unavailable(response.message),
        Err(_) => ProposeOutcome::Unavailable(format!("unknown propose status {}", response.status)),
    }
}

fn check(node: &Node, request: &ProposeRequest) -> Result<(), Status> {
    let Some(routing) = node.routing() else {
        return Err(Status::unavailable("the cluster is not initialised on this node yet"));
    };
    let partition_count = routing.partition_count();
    let partition = request.partition;
    if partition >= partition_count {
        return Err(Status::invalid_argument(format!(
            "partition: {partition} does not exist; the cluster has partitions 0 to {}",
            partition_count - 1
        )));
    }
    batch_limits::check(&request.events)?;
    if request.invalid.len() > tally_proto::validate::MAX_BATCH_EVENTS {
        return Err(Status::invalid_argument(format!(
            "invalid: at most {} dead letters a request, got {}",
            tally_proto::validate::MAX_BATCH_EVENTS,
            request.invalid.len()
        )));
    }
    // A forwarder whose map predates a split of this partition sends it
    // events of the range split off: taken, and answered "moved".
    let split_away =
        |entity: &[u8]| node.partition(partition).is_some_and(|r| r.moved.get().split_to(entity).is_some());
    for (index, d) in request.invalid.iter().enumerate() {
        let entity = d.event.as_ref().map(|e| e.entity_id.as_slice()).unwrap_or_default();
        let belongs = routing.home_of(entity);
        if belongs != partition && !split_away(entity) {
            return Err(Status::invalid_argument(format!(
                "invalid[{index}].event.entity_id: the event belongs to partition {belongs}, not to partition {partition}"
            )));
        }
    }
    for (index, event) in request.events.iter().enumerate() {
        validate_event(event).map_err(|e| Status::invalid_argument(format!("events[{index}].{e}")))?;
        let belongs = routing.partition_of_event(event);
        // The home also takes an event the forwarder's newer map sends
        // elsewhere: it answers it "moved" (this node's map is older).
        let home = routing.home_of(&event.entity_id);
        if belongs != partition && home != partition && !split_away(&event.entity_id) {
            return Err(Status::invalid_argument(format!(
                "events[{index}].entity_id: the event belongs to partition {belongs}, not to partition {partition}"
            )));
        }
    }
    Ok(())
}
