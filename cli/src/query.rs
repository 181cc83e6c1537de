//! `tally stats`, `tally series` and `tally top`.
//!
//! Both go through [`TallyClient`](tally_client::TallyClient), so they are routed
//! to the partition's leader (or any replica with `--stale`) and retried
//! across a leader change like every other call.

use anyhow::bail;
use clap::Args;
use serde_json::json;

use crate::{print_json, Cli};
use tally_client::time_arg::{format_ms, parse_time};
use tally_client::{Consistency, Granularity, TopKOrder};

/// Arguments of `tally stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Entity id, e.g. video-42.
    pub entity: String,
    /// Event type, e.g. view.
    pub event_type: String,
    /// Range start (inclusive): now, -1h, RFC 3339 or epoch ms.
    #[arg(long, default_value = "-30d", allow_hyphen_values = true)]
    pub from: String,
    /// Range end (exclusive).
    #[arg(long, default_value = "+1m", allow_hyphen_values = true)]
    pub to: String,
    /// Read from any replica (cheaper, may lag).
    #[arg(long)]
    pub stale: bool,
}

/// Arguments of `tally series`.
#[derive(Debug, Args)]
pub struct SeriesArgs {
    /// Entity id.
    pub entity: String,
    /// Event type.
    pub event_type: String,
    /// Range start (inclusive).
    #[arg(long, default_value = "-1h", allow_hyphen_values = true)]
    pub from: String,
    /// Range end (exclusive).
    #[arg(long, default_value = "+1m", allow_hyphen_values = true)]
    pub to: String,
    /// minute, hour, day, month or year.
    #[arg(long, default_value = "minute")]
    pub granularity: String,
    /// Read from any replica (cheaper, may lag).
    #[arg(long)]
    pub stale: bool,
}

/// Arguments of `tally top`.
#[derive(Debug, Args)]
pub struct TopArgs {
    /// Event type, e.g. view.
    pub event_type: String,
    /// Range start (inclusive), rounded down to the hour.
    #[arg(long, default_value = "-1d", allow_hyphen_values = true)]
    pub from: String,
    /// Range end (exclusive), rounded up to the hour.
    #[arg(long, default_value = "+1m", allow_hyphen_values = true)]
    pub to: String,
    /// How many entities (1 to 1,000).
    #[arg(short = 'k', long, default_value_t = 10)]
    pub k: u32,
    /// Rank by the sum of values instead of the count.
    #[arg(long)]
    pub by_sum: bool,
    /// Read from any replica (cheaper, may lag).
    #[arg(long)]
    pub stale: bool,
}

fn consistency(stale: bool) -> Consistency {
    if stale {
        Consistency::Stale
    } else {
        Consistency::Linearizable
    }
}

/// Parses `minute|hour|day|month`.
pub fn parse_granularity(s: &str) -> anyhow::Result<Granularity> {
    Ok(match s {
        "minute" => Granularity::Minute,
        "hour" => Granularity::Hour,
        "day" => Granularity::Day,
        "month" => Granularity::Month,
        "year" => Granularity::Year,
        other => bail!("--granularity must be minute, hour, day, month or year, not {other:?}"),
    })
}

/// The exact sum when the server sent one (sums beyond int64 are clamped in
/// `sum`), else the int64 sum.
fn exact_sum(sum: i64, exact: &str) -> String {
    if exact.is_empty() {
        sum.to_string()
    } else {
        exact.to_string()
    }
}

/// The wire granularity's name, "minute" for an unknown code.
fn resolution_name(code: i32) -> &'static str {
    match Granularity::try_from(code).unwrap_or(Granularity::Minute) {
        Granularity::Hour => "hour",
        Granularity::Day => "day",
        Granularity::Month => "month",
        Granularity::Year => "year",
        Granularity::Minute | Granularity::Unspecified => "minute",
    }
}

/// A note when the answer is coarser than `usual` (retention expired the
/// finer buckets of part of the range).
fn coarser_note(code: i32, usual: Granularity) -> String {
    let name = resolution_name(code);
    if Granularity::try_from(code).is_ok_and(|g| g != usual && g != Granularity::Unspecified) {
        format!("   (to whole {name}s: finer buckets of the range have expired)")
    } else {
        String::new()
    }
}

pub(crate) async fn stats(cli: &Cli, args: &StatsArgs) -> anyhow::Result<i32> {
    let (from, to) = (parse_time(&args.from)?, parse_time(&args.to)?);
    let client = crate::client(cli).await?;
    let s = client.stats(&args.entity, &args.event_type, from..to, consistency(args.stale)).await?;
    if cli.json {
        print_json(&json!({
            "entity": args.entity, "event_type": args.event_type,
            "count": s.count, "sum": s.sum, "sum_exact": s.sum_exact, "sum_overflow": s.sum_overflow,
            "uniques": s.uniques,
            "average": s.average,
            "from_ms": s.effective_from_ms, "to_ms": s.effective_to_ms, "resolution": resolution_name(s.resolution),
            "served_by": s.served_by_node_id, "applied_index": s.applied_index,
            "archive_buckets": s.archive_buckets,
        }));
    } else {
        println!(
            "count {}  sum {}  average {:.3}{}   [{} .. {}){}{}",
            s.count,
            exact_sum(s.sum, &s.sum_exact),
            s.average,
            if s.uniques > 0 { format!("  uniques ~{}", s.uniques) } else { String::new() },
            format_ms(s.effective_from_ms),
            format_ms(s.effective_to_ms),
            coarser_note(s.resolution, Granularity::Minute),
            archive_note(s.archive_buckets)
        );
    }
    Ok(0)
}

/// Says how much of an answer came from the cold archive.
fn archive_note(buckets: u32) -> String {
    match buckets {
        0 => String::new(),
        1 => "  (1 bucket from the archive)".into(),
        n => format!("  ({n} buckets from the archive)"),
    }
}

pub(crate) async fn series(cli: &Cli, args: &SeriesArgs) -> anyhow::Result<i32> {
    let granularity = parse_granularity(&args.granularity)?;
    let (from, to) = (parse_time(&args.from)?, parse_time(&args.to)?);
    let client = crate::client(cli).await?;
    let s = client.series(&args.entity, &args.event_type, from..to, granularity, consistency(args.stale)).await?;
    if cli.json {
        let buckets: Vec<_> =
            s.buckets
                .iter()
                .map(|b| json!({"start_ms": b.start_ms, "count": b.count, "sum": b.sum, "sum_exact": b.sum_exact, "sum_overflow": b.sum_overflow}))
                .collect();
        print_json(&json!({
            "entity": args.entity, "event_type": args.event_type, "granularity": args.granularity,
            "buckets": buckets, "served_by": s.served_by_node_id, "applied_index": s.applied_index,
            "archive_buckets": s.archive_buckets,
        }));
    } else {
        for b in &s.buckets {
            println!("{}  {:>10}  {:>12}", format_ms(b.start_ms), b.count, exact_sum(b.sum, &b.sum_exact));
        }
        if s.archive_buckets > 0 {
            println!("{}", archive_note(s.archive_buckets).trim());
        }
    }
    Ok(0)
}

pub(crate) async fn top(cli: &Cli, args: &TopArgs) -> anyhow::Result<i32> {
    let (from, to) = (parse_time(&args.from)?, parse_time(&args.to)?);
    let order = if args.by_sum { TopKOrder::Sum } else { TopKOrder::Count };
    let client = crate::client(cli).await?;
    let top = client.top_k(&args.event_type, from..to, args.k, order, consistency(args.stale)).await?;
    if cli.json {
        let entries: Vec<_> = top
            .entries
            .iter()
            .map(|e| json!({"entity": String::from_utf8_lossy(&e.entity_id), "count": e.count, "sum": e.sum, "sum_exact": e.sum_exact, "sum_overflow": e.sum_overflow}))
            .collect();
        print_json(&json!({
            "event_type": args.event_type, "k": args.k, "by": if args.by_sum { "sum" } else { "count" },
            "from_ms": top.effective_from_ms, "to_ms": top.effective_to_ms, "entries": entries,
            "resolution": resolution_name(top.resolution),
        }));
    } else {
        println!(
            "top {} {} by {}   [{} .. {}){}",
            args.k,
            args.event_type,
            if args.by_sum { "sum" } else { "count" },
            format_ms(top.effective_from_ms),
            format_ms(top.effective_to_ms),
            coarser_note(top.resolution, Granularity::Hour)
        );
        for (rank, e) in top.entries.iter().enumerate() {
            println!(
                "{:>4}  {:<32}  {:>10}  {:>14}",
                rank + 1,
                String::from_utf8_lossy(&e.entity_id),
                e.count,
                exact_sum(e.sum, &e.sum_exact)
            );
        }
    }
    Ok(0)
}
