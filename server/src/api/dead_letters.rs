//! The dead-letter log on the wire: the `Cluster.DeadLetters` call (one
//! partition's records a page at a time, with its counts), and the
//! conversions between a stored record and `tally.v1.DeadLetter`, used by
//! that call and by forwarded ingest (invalid events travel with their
//! partition's share, `propose.rs`).

use std::sync::Arc;

use tally_proto::v1::cluster_client::ClusterClient;
use tally_proto::v1::{self as pb, DeadLettersRequest, DeadLettersResponse, RejectionCode};
use tonic::{Request, Status};

use super::{ingest_policy, read_routing};
use crate::command::{DeadLetter, DeadLetterReason};
use crate::meta::TimeRejection;
use crate::node::{Listener, Node};
use crate::storage::entry_log::{read_page, Cursor, DeadLetters};
use crate::sync::MutexExt;

/// Records one page holds at most.
pub const MAX_PAGE: u32 = 1_000;

/// A stored record as the wire carries it; `rejected_at_ms` is its entry's
/// stamp (0 for one not yet in a log).
pub fn to_proto(d: &DeadLetter, rejected_at_ms: u64) -> pb::DeadLetter {
    let event = pb::Event {
        entity_id: d.entity_id.clone(),
        event_type: d.event_type.clone(),
        event_time_ms: d.event_time_ms,
        event_id: d.event_id.clone(),
        value: d.value,
        actor_id: d.actor_id.clone(),
    };
    let (code, field, reason) = match &d.reason {
        DeadLetterReason::TooLate { limit_ms } => {
            let r = ingest_policy::rejection(0, d.event_time_ms, TimeRejection::TooLate { limit_ms: *limit_ms });
            (RejectionCode::TooLate, r.field, r.reason)
        }
        DeadLetterReason::InFuture { limit_ms } => {
            let r = ingest_policy::rejection(0, d.event_time_ms, TimeRejection::InFuture { limit_ms: *limit_ms });
            (RejectionCode::InFuture, r.field, r.reason)
        }
        DeadLetterReason::Invalid { field, reason } => (RejectionCode::Invalid, field.clone(), reason.clone()),
    };
    pb::DeadLetter { event: Some(event), code: code as i32, field, reason, rejected_at_ms, truncated: d.truncated }
}

/// An invalid event a peer forwarded for the dead-letter log (fields cut
/// again: a peer's word is not taken for their size). Only INVALID records
/// travel: times are judged by the leader itself.
pub fn invalid_from_proto(d: pb::DeadLetter) -> Result<DeadLetter, Status> {
    if d.code != RejectionCode::Invalid as i32 {
        return Err(Status::invalid_argument("invalid[].code: a forwarded dead letter must be INVALID"));
    }
    let event = d.event.ok_or_else(|| Status::invalid_argument("invalid[].event: required"))?;
    let mut record = DeadLetter::of(&event, DeadLetterReason::Invalid { field: d.field, reason: d.reason });
    if let DeadLetterReason::Invalid { field, reason } = &mut record.reason {
        field.truncate(64);
        truncate_utf8(reason, 1024);
    }
    record.truncated |= d.truncated;
    Ok(record)
}

fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// `Cluster.DeadLetters`: read locally from a replica of the partition (its
/// leader unless STALE), or forward to one.
pub async fn serve(node: &Arc<Node>, request: Request<DeadLettersRequest>) -> Result<DeadLettersResponse, Status> {
    let hops = read_routing::hops(&request);
    let req = request.into_inner();
    let partitions = read_routing::partition_count(node)?;
    if req.partition >= partitions {
        return Err(Status::invalid_argument(format!(
            "partition: {} does not exist; the cluster has partitions 0 to {}",
            req.partition,
            partitions - 1
        )));
    }
    if req.limit > MAX_PAGE {
        return Err(Status::invalid_argument(format!("limit: at most {MAX_PAGE} records a page, got {}", req.limit)));
    }
    let after = if req.after.is_empty() {
        None
    } else {
        Some(Cursor::from_bytes(&req.after).ok_or_else(|| {
            Status::invalid_argument("after: not a cursor this call returned (DeadLettersResponse.next_cursor)")
        })?)
    };
    let replica = match read_routing::replica_for(node, req.partition, req.consistency).await? {
        Ok(replica) => replica,
        Err(to) => {
            if hops >= read_routing::MAX_HOPS {
                return Err(Status::unavailable(format!("partition {}: no replica reachable; retry", req.partition)));
            }
            let mut client = ClusterClient::new(node.forward_to_leader(to, Listener::Public, None)?);
            return Ok(client.dead_letters(read_routing::forwarded(req, hops)).await?.into_inner());
        }
    };
    let (kept, dropped) = replica.logs.lock_unpoisoned().dead_letters.counts();
    let write_back = replica.write_back.clone();
    let limit = req.limit as usize;
    // The newest records may still be in memory: written first.
    let page = node
        .engine
        .blocking(move |engine| {
            write_back.checkpoint(engine, false)?;
            read_page::<DeadLetters>(engine, write_back.group(), after, limit)
        })
        .await
        .map_err(read_routing::storage_status)?;
    Ok(DeadLettersResponse {
        records: page.records.iter().map(|(stamp, d)| to_proto(d, *stamp)).collect(),
        next_cursor: page.next.map(Cursor::to_bytes).unwrap_or_default(),
        too_late: kept[0],
        in_future: kept[1],
        invalid: kept[2],
        dropped,
        served_by_node_id: node.id,
    })
}
