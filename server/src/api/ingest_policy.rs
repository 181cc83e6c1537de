//! The cluster's ingest policy on the wire: conversions, the admin call
//! that replaces it, and the per-event rejection an event outside it gets.
//!
//! The policy lives in the metadata group (`meta::IngestPolicy`,
//! `Command::SetIngestPolicy`), so every node applies the one committed
//! last. Event times are checked by the partition's leader against the
//! stamp of the entry it builds (the log's clock: its cluster-checked clock,
//! `clock.rs`, never behind an earlier entry's), not by the node a client
//! called: events outside the policy are rejected one by one and kept in
//! the partition's dead-letter log (`storage/dead_letters.rs`), the rest of
//! the batch goes on.

use std::sync::Arc;

use tally_proto::v1::{self as pb, Rejection, RejectionCode};
use tonic::Status;

use super::membership::{coordinator, Coordinator};
use crate::command::Command;
use crate::meta::{IngestPolicy, LogBounds, TimeRejection, DEFAULT_DEAD_LETTERS, DEFAULT_RAW_EVENTS};
use crate::node::Node;

/// Longest `max_future_skew_ms` accepted: a day. More would let a client's
/// wrong clock fill buckets nobody will query for years.
const MAX_FUTURE_SKEW_MS: u64 = 24 * 3_600_000;

/// Most rejected events a partition's dead-letter log may be asked to keep
/// (a record is at most ~16 KiB; typical ones ~100 bytes).
const MAX_DEAD_LETTER_EVENTS: u64 = 10_000_000;
/// Most events a partition's raw-event log may be asked to keep.
const MAX_RAW_LOG_EVENTS: u64 = 100_000_000;

pub fn to_proto(policy: IngestPolicy) -> pb::IngestPolicy {
    pb::IngestPolicy {
        allowed_lateness_ms: policy.allowed_lateness_ms,
        max_future_skew_ms: policy.max_future_skew_ms,
        dead_letter_keep_ms: Some(policy.dead_letters.keep_ms),
        dead_letter_max_events: Some(policy.dead_letters.max_events),
        raw_log_keep_ms: Some(policy.raw_events.keep_ms),
        raw_log_max_events: Some(policy.raw_events.max_events),
    }
}

/// A policy from a request, or INVALID_ARGUMENT naming the field.
pub fn from_proto(policy: &pb::IngestPolicy) -> Result<IngestPolicy, Status> {
    if policy.max_future_skew_ms > MAX_FUTURE_SKEW_MS {
        return Err(Status::invalid_argument(format!(
            "policy.max_future_skew_ms: must be at most {MAX_FUTURE_SKEW_MS} (a day), got {}",
            policy.max_future_skew_ms
        )));
    }
    let max_events = policy.dead_letter_max_events.unwrap_or(DEFAULT_DEAD_LETTERS.max_events);
    if max_events > MAX_DEAD_LETTER_EVENTS {
        return Err(Status::invalid_argument(format!(
            "policy.dead_letter_max_events: must be at most {MAX_DEAD_LETTER_EVENTS}, got {max_events}"
        )));
    }
    let raw_max_events = policy.raw_log_max_events.unwrap_or(DEFAULT_RAW_EVENTS.max_events);
    if raw_max_events > MAX_RAW_LOG_EVENTS {
        return Err(Status::invalid_argument(format!(
            "policy.raw_log_max_events: must be at most {MAX_RAW_LOG_EVENTS}, got {raw_max_events}"
        )));
    }
    Ok(IngestPolicy {
        allowed_lateness_ms: policy.allowed_lateness_ms,
        max_future_skew_ms: policy.max_future_skew_ms,
        dead_letters: LogBounds {
            keep_ms: policy.dead_letter_keep_ms.unwrap_or(DEFAULT_DEAD_LETTERS.keep_ms),
            max_events,
        },
        raw_events: LogBounds {
            keep_ms: policy.raw_log_keep_ms.unwrap_or(DEFAULT_RAW_EVENTS.keep_ms),
            max_events: raw_max_events,
        },
    })
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
