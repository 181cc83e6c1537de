//! `Query.Audit`: recount one series from its partition's raw-event log and
//! compare with its minute counts (`storage/audit.rs`), on a replica of the
//! partition — its leader unless STALE — or forwarded to one.

use std::sync::Arc;

use tally_proto::time::align_range;
use tally_proto::v1::{AuditDifference, AuditRequest, AuditResponse};
use tally_proto::validate::{validate_query_key, validate_range};
use tonic::{Request, Status};

use super::read_routing::{
    forward_client, forwarded, hops, invalid, partition_count, replica_for, storage_status, ClientLatency, MAX_HOPS,
};
use crate::node::Node;
use crate::storage::audit::audit;
use crate::sync::MutexExt;

/// Differing minutes one answer lists at most.
const MAX_DIFFERENCES: usize = 10_000;

pub async fn serve(node: &Arc<Node>, request: Request<AuditRequest>) -> Result<AuditResponse, Status> {
    let hops = hops(&request);
    let req = request.into_inner();
    let _latency = ClientLatency::start("audit", req.consistency, hops);
    validate_query_key(&req.entity_id, &req.event_type).map_err(invalid)?;
    validate_range(req.from_ms, req.to_ms).map_err(invalid)?;
    if node.ingest_policy.borrow().raw_events.max_events == 0 {
        return Err(Status::failed_precondition(
            "the cluster keeps no raw-event log to audit from; turn it on with `tally cluster set-policy --raw-log-max-events N` (events counted before then cannot be recounted)",
        ));
    }
    partition_count(node)?;
    let partition = node.home_of(&req.entity_id).unwrap_or(0);
    let replica = match replica_for(node, partition, req.consistency).await? {
        Ok(r) => r,
        Err(_) if hops >= MAX_HOPS => {
            return Err(Status::unavailable(format!("partition {partition}: leader moved; retry")))
        }
        Err(to) => return Ok(forward_client(node, to)?.audit(forwarded(req, hops)).await?.into_inner()),
    };
    let (from_ms, to_ms) = align_range(req.from_ms, req.to_ms);
    let dropped = replica.logs.lock_unpoisoned().raw_events.counts().1;
    let read = audit(&node.engine, &replica.write_back, &req.entity_id, &req.event_type, from_ms, to_ms)
        .await
        .map_err(storage_status)?;
    Ok(AuditResponse {
        audited_from_ms: read.from_ms,
        audited_to_ms: read.to_ms,
        raw_count: read.raw_total.count,
        raw_sum: read.raw_total.sum.to_string(),
        counted: read.counted_total.count,
        counted_sum: read.counted_total.sum.to_string(),
        differences: read
            .differences
            .iter()
            .take(MAX_DIFFERENCES)
            .map(|(minute_ms, raw, counted)| AuditDifference {
                minute_ms: *minute_ms,
                raw_count: raw.count,
                raw_sum: raw.sum.to_string(),
                counted: counted.count,
                counted_sum: counted.sum.to_string(),
            })
            .collect(),
        raw_log_from_ms: read.raw_log_from_ms.unwrap_or(0),
        raw_log_dropped: dropped,
        served_by_node_id: node.id,
        applied_index: read.applied,
    })
}
