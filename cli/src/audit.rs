//! `tally audit ENTITY TYPE --from --to`: recount a series from its
//! partition's raw-event log and compare with its counts, minute by minute
//! (`Query.Audit`). Exit 0 when they agree, 3 when any minute differs.

use anyhow::Context;
use clap::Args;
use serde_json::json;
use tally_client::time_arg::{format_ms, parse_time};
use tally_proto::v1::query_client::QueryClient;
use tally_proto::v1::{AuditRequest, Consistency};

use crate::{print_json, Cli, EXIT_MISMATCH};

/// Arguments of `tally audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Entity id.
    pub entity: String,
    /// Event type.
    pub event_type: String,
    /// Range start (inclusive).
    #[arg(long, default_value = "-1d", allow_hyphen_values = true)]
    pub from: String,
    /// Range end (exclusive).
    #[arg(long, default_value = "+1m", allow_hyphen_values = true)]
    pub to: String,
    /// Read any replica's logs (each replica holds the same at a log position).
    #[arg(long)]
    pub stale: bool,
}

pub async fn run(cli: &Cli, args: &AuditArgs) -> anyhow::Result<i32> {
    let (from_ms, to_ms) = (parse_time(&args.from)?, parse_time(&args.to)?);
    let seeds = cli.seeds();
    let addr = seeds.first().context("--addr is empty")?;
    let channel = cli.connect_node(addr).await.with_context(|| format!("connecting to {addr}"))?;
    let consistency = if args.stale { Consistency::Stale } else { Consistency::Linearizable };
    let request = AuditRequest {
        entity_id: args.entity.clone().into_bytes(),
        event_type: args.event_type.clone(),
        from_ms,
        to_ms,
        consistency: consistency as i32,
    };
    let r =
        QueryClient::new(channel).audit(request).await.map_err(|s| anyhow::anyhow!("{}", s.message()))?.into_inner();
    let agree = r.differences.is_empty();
    if cli.json {
        let differences: Vec<_> = r
            .differences
            .iter()
            .map(|d| {
                json!({"minute_ms": d.minute_ms, "raw_count": d.raw_count, "raw_sum": d.raw_sum,
                "counted": d.counted, "counted_sum": d.counted_sum})
            })
            .collect();
        print_json(&json!({
            "entity": args.entity, "event_type": args.event_type,
            "from_ms": r.audited_from_ms, "to_ms": r.audited_to_ms,
            "raw_count": r.raw_count, "raw_sum": r.raw_sum, "counted": r.counted, "counted_sum": r.counted_sum,
            "agree": agree, "differences": differences,
            "raw_log_from_ms": r.raw_log_from_ms, "raw_log_dropped": r.raw_log_dropped,
            "served_by": r.served_by_node_id, "applied_index": r.applied_index,
        }));
    } else {
        println!(
            "audit {} {} [{} .. {}): recounted {} (sum {}), counted {} (sum {}) — {}",
            args.entity,
            args.event_type,
            format_ms(r.audited_from_ms),
            format_ms(r.audited_to_ms),
            r.raw_count,
            r.raw_sum,
            r.counted,
            r.counted_sum,
            if agree { "they agree".to_string() } else { format!("{} minutes differ", r.differences.len()) }
        );
        for d in &r.differences {
            println!(
                "  {}: recounted {} (sum {}), counted {} (sum {})",
                format_ms(d.minute_ms),
                d.raw_count,
                d.raw_sum,
                d.counted,
                d.counted_sum
            );
        }
        if r.raw_log_from_ms > 0 {
            println!(
                "raw-event log holds entries since {}{}; events counted before then are not in the recount",
                format_ms(r.raw_log_from_ms as i64),
                if r.raw_log_dropped > 0 {
                    format!(" ({} dropped when full)", r.raw_log_dropped)
                } else {
                    String::new()
                }
            );
        }
    }
    Ok(if agree { 0 } else { EXIT_MISMATCH })
}
