//! The cluster's retention policy on the wire: conversions, the admin call
//! that replaces it, and the error a Series past retention gets.
//!
//! The policy lives in the metadata group (`retention::RetentionPolicy`,
//! `Command::SetRetention`); partition leaders turn it into floors in their
//! own logs (`expiry.rs`).

use std::sync::Arc;

use tally_proto::time::Granularity;
use tally_proto::v1 as pb;
use tonic::Status;

use super::membership::{coordinator, Coordinator};
use crate::command::Command;
use crate::node::Node;
use crate::retention::{describe, RetentionPolicy};

pub fn to_proto(policy: RetentionPolicy) -> pb::RetentionPolicy {
    let [minute_ms, hour_ms, day_ms, month_ms, year_ms] = policy.keep_ms;
    pb::RetentionPolicy { minute_ms, hour_ms, day_ms, month_ms, year_ms, archive_after_ms: policy.archive_after_ms }
}

/// A policy from a request, or INVALID_ARGUMENT naming the field.
pub fn from_proto(policy: &pb::RetentionPolicy) -> Result<RetentionPolicy, Status> {
    let wanted = RetentionPolicy {
        keep_ms: [policy.minute_ms, policy.hour_ms, policy.day_ms, policy.month_ms, policy.year_ms],
        archive_after_ms: policy.archive_after_ms,
    };
    wanted.validate().map_err(|e| Status::invalid_argument(format!("policy.{e}")))?;
    Ok(wanted)
}

/// `Cluster.SetRetention`: committed by the metadata leader.
pub async fn set(node: &Arc<Node>, req: pb::SetRetentionRequest) -> Result<pb::SetRetentionResponse, Status> {
    let wanted = from_proto(&req.policy.ok_or_else(|| Status::invalid_argument("policy: required"))?)?;
    if let Coordinator::Forward(mut leader) = coordinator(node).await? {
        return Ok(leader
            .set_retention(pb::SetRetentionRequest { policy: Some(to_proto(wanted)) })
            .await?
            .into_inner());
    }
    node.metadata
        .client_write(Command::SetRetention(wanted))
        .await
        .map_err(|e| Status::unavailable(format!("committing the retention policy: {e}")))?;
    tracing::info!(?wanted, "retention policy changed");
    Ok(pb::SetRetentionResponse { policy: Some(to_proto(wanted)) })
}

/// A Series whose range starts before the oldest bucket of `granularity`
/// the partition keeps.
pub fn series_expired(node: &Node, granularity: Granularity, first_kept_ms: i64) -> Status {
    let keep = node.retention.borrow().keep(granularity);
    let coarser = granularity.coarser().map(|g| format!("; ask for {g} buckets for older ranges")).unwrap_or_default();
    Status::out_of_range(format!(
        "from_ms: {granularity} buckets are kept for {} (retention); the oldest kept starts at {first_kept_ms} ms{coarser}",
        describe(keep)
    ))
}
