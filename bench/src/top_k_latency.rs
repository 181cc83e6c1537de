//! `tally bench top-k`: TopK latency as a dashboard asking "most viewed
//! today" sees it — one query at a time through the client library, from
//! whichever node it picks — as HDR percentiles.

use std::time::Instant;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tally_client::{ClientConfig, Consistency, TallyClient, TopKOrder};

use crate::measure::{latency_histogram, record, LatencyMs};

/// What to ask and how often.
#[derive(Debug, Clone, clap::Args)]
pub struct TopKLatencyArgs {
    /// Event type to rank.
    #[arg(long = "type", default_value = "view")]
    pub event_type: String,
    /// Range start (inclusive; rounded down to the hour): now, -1d, RFC 3339 or epoch ms.
    #[arg(long, default_value = "-1d", allow_hyphen_values = true)]
    pub from: String,
    /// Range end (exclusive; rounded up to the hour).
    #[arg(long, default_value = "+1m", allow_hyphen_values = true)]
    pub to: String,
    /// Entities per answer.
    #[arg(short = 'k', long, default_value_t = 100)]
    pub k: u32,
    /// Queries, one after another (after one unmeasured warm-up).
    #[arg(long, default_value_t = 50)]
    pub repeat: u32,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TopKLatency {
    pub k: u32,
    pub from_ms: i64,
    pub to_ms: i64,
    pub latency_ms: LatencyMs,
    /// Entries of the last answer, and its top entity's count.
    pub entries: usize,
    pub top_count: u64,
}

pub async fn run(seeds: Vec<String>, args: &TopKLatencyArgs) -> anyhow::Result<TopKLatency> {
    let from = tally_client::time_arg::parse_time(&args.from)?;
    let to = tally_client::time_arg::parse_time(&args.to)?;
    let client = TallyClient::with_config(ClientConfig::new(seeds)).await.context("connecting")?;
    let ask = || client.top_k(&args.event_type, from..to, args.k, TopKOrder::Count, Consistency::Linearizable);
    let mut last = ask().await.context("warm-up TopK")?;
    let mut histogram = latency_histogram();
    for _ in 0..args.repeat {
        let started = Instant::now();
        last = ask().await.context("TopK")?;
        record(&mut histogram, started.elapsed());
    }
    Ok(TopKLatency {
        k: args.k,
        from_ms: last.effective_from_ms,
        to_ms: last.effective_to_ms,
        latency_ms: LatencyMs::of(&histogram),
        entries: last.entries.len(),
        top_count: last.entries.first().map(|e| e.count).unwrap_or(0),
    })
}
