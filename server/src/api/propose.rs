//! The receiving end of `Propose`: a peer's share of an ingest batch, for a
//! partition this node leads.
//!
//! The forwarding node has already validated and partitioned the events,
//! but the receiver does not take its word for it: whatever reaches the peer
//! port is checked exactly as `Ingest` checks a client's batch — the batch
//! limits, every event's fields, that the partition exists and that every
//! event belongs to it — before any of it reaches the processor. A request
//! that fails is refused whole, with a status naming what is wrong; nothing
//! of it is counted. (A legitimate peer never sends one, so there is no
//! per-event answer to give.)

use tally_proto::internal::{ProposeRequest, ProposeResponse};
use tally_proto::partition::partition_of;
use tally_proto::validate::validate_event;
use tonic::Status;

use super::batch_limits;
use super::ingest::propose_local;
use crate::node::Node;

/// Check a forwarded share, then hand it to the partition's processor.
pub async fn serve(node: &Node, request: ProposeRequest) -> Result<ProposeResponse, Status> {
    check(node, &request)?;
    Ok(propose_local(node, request.partition, request.events).await)
}

fn check(node: &Node, request: &ProposeRequest) -> Result<(), Status> {
    let Some(partition_count) = node.partition_count() else {
        return Err(Status::unavailable("the cluster is not initialised on this node yet"));
    };
    let partition = request.partition;
    if partition >= partition_count {
        return Err(Status::invalid_argument(format!(
            "partition: {partition} does not exist; the cluster has partitions 0 to {}",
            partition_count - 1
        )));
    }
    batch_limits::check(&request.events)?;
    for (index, event) in request.events.iter().enumerate() {
        validate_event(event).map_err(|e| Status::invalid_argument(format!("events[{index}].{e}")))?;
        let belongs = partition_of(&event.entity_id, partition_count);
        if belongs != partition {
            return Err(Status::invalid_argument(format!(
                "events[{index}].entity_id: the event belongs to partition {belongs}, not to partition {partition}"
            )));
        }
    }
    Ok(())
}
