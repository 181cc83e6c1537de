//! The cluster's ingest policy on the wire: conversions, the admin call
//! that replaces it, and the per-event rejection an event outside it gets.
//!
//! The policy lives in the metadata group (`meta::IngestPolicy`,
//! `Command::SetIngestPolicy`), so every node applies the one committed
//! last. An Ingest request is checked by the node that receives it, against
//! its cluster-checked clock (`clock.rs`: within `--max-clock-skew-ms` of
//! the other nodes'), before anything is routed: events outside the policy
//! are rejected one by one, the rest of the batch goes on.

use std::sync::Arc;

use tally_proto::v1::{self as pb, Rejection, RejectionCode};
use tonic::Status;

use super::membership::{coordinator, Coordinator};
use crate::command::Command;
use crate::meta::{IngestPolicy, TimeRejection};
use crate::node::Node;

/// Longest `max_future_skew_ms` accepted: a day. More would let a client's
/// wrong clock fill buckets nobody will query for years.
const MAX_FUTURE_SKEW_MS: u64 = 24 * 3_600_000;

pub fn to_proto(policy: IngestPolicy) -> pb::IngestPolicy {
    pb::IngestPolicy { allowed_lateness_ms: policy.allowed_lateness_ms, max_future_skew_ms: policy.max_future_skew_ms }
}

/// A policy from a request, or INVALID_ARGUMENT naming the field.
pub fn from_proto(policy: &pb::IngestPolicy) -> Result<IngestPolicy, Status> {
    if policy.max_future_skew_ms > MAX_FUTURE_SKEW_MS {
        return Err(Status::invalid_argument(format!(
            "policy.max_future_skew_ms: must be at most {MAX_FUTURE_SKEW_MS} (a day), got {}",
            policy.max_future_skew_ms
        )));
    }
    Ok(IngestPolicy { allowed_lateness_ms: policy.allowed_lateness_ms, max_future_skew_ms: policy.max_future_skew_ms })
}

/// `Cluster.SetIngestPolicy`: committed by the metadata leader.
pub async fn set(node: &Arc<Node>, req: pb::SetIngestPolicyRequest) -> Result<pb::SetIngestPolicyResponse, Status> {
    let wanted = from_proto(&req.policy.ok_or_else(|| Status::invalid_argument("policy: required"))?)?;
    if let Coordinator::Forward(mut leader) = coordinator(node).await? {
        return Ok(leader
            .set_ingest_policy(pb::SetIngestPolicyRequest { policy: Some(to_proto(wanted)) })
            .await?
            .into_inner());
    }
    node.metadata
        .client_write(Command::SetIngestPolicy(wanted))
        .await
        .map_err(|e| Status::unavailable(format!("committing the ingest policy: {e}")))?;
    tracing::info!(?wanted, "ingest policy changed");
    Ok(pb::SetIngestPolicyResponse { policy: Some(to_proto(wanted)) })
}

/// The rejection of event `index`, whose time is outside the policy.
pub fn rejection(index: u32, event_time_ms: i64, why: TimeRejection) -> Rejection {
    let (code, reason) = match why {
        TimeRejection::TooLate { limit_ms } => (
            RejectionCode::TooLate,
            format!(
                "TOO_LATE: event_time_ms {event_time_ms} is older than the cluster's allowed lateness (events before {limit_ms} are refused; see Cluster.SetIngestPolicy)"
            ),
        ),
        TimeRejection::InFuture { limit_ms } => (
            RejectionCode::InFuture,
            format!(
                "IN_FUTURE: event_time_ms {event_time_ms} is ahead of the cluster's clock by more than the allowed skew (events after {limit_ms} are refused)"
            ),
        ),
    };
    Rejection { index, field: "event_time_ms".into(), reason, retryable: false, code: code as i32 }
}
