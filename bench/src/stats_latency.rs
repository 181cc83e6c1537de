//! `tally bench stats`: Stats latency over one range for many entities, as
//! a dashboard of popular videos sees it — the range's top entities (by
//! TopK over `--rank-from`..`--rank-to`), then one Stats per entity, one
//! query at a time, twice: the first pass reads whatever the range needs
//! for the first time (the cold archive's files among them, when the range
//! reaches archived buckets), the second what the first left cached.

use std::time::Instant;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tally_client::{ClientConfig, Consistency, TallyClient, TopKOrder};

use crate::measure::{latency_histogram, record, LatencyMs};

#[derive(Debug, Clone, clap::Args)]
pub struct StatsLatencyArgs {
    #[arg(long = "type", default_value = "view")]
    pub event_type: String,
    /// Range asked (minute-aligned by the server): now, -1d, RFC 3339 or epoch ms.
    #[arg(long, allow_hyphen_values = true)]
    pub from: String,
    #[arg(long, allow_hyphen_values = true)]
    pub to: String,
    /// Where the entities come from: the top `--entities` of this range.
    #[arg(long, default_value = "-7d", allow_hyphen_values = true)]
    pub rank_from: String,
    #[arg(long, default_value = "+1m", allow_hyphen_values = true)]
    pub rank_to: String,
    /// Entities asked about (at most 1,000: one TopK).
    #[arg(long, default_value_t = 200)]
    pub entities: u32,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatsLatency {
    pub from_ms: i64,
    pub to_ms: i64,
    pub entities: usize,
    /// The first pass over the entities, and the second.
    pub first_ms: LatencyMs,
    pub second_ms: LatencyMs,
    /// Buckets the answers read from the archive (first pass), and in all.
    pub archive_buckets: u64,
    pub events_counted: u64,
}

pub async fn run(seeds: Vec<String>, args: &StatsLatencyArgs) -> anyhow::Result<StatsLatency> {
    let time = tally_client::time_arg::parse_time;
    let (from, to) = (time(&args.from)?, time(&args.to)?);
    let client = TallyClient::with_config(ClientConfig::new(seeds)).await.context("connecting")?;
    let ranked = client
        .top_k(
            &args.event_type,
            time(&args.rank_from)?..time(&args.rank_to)?,
            args.entities.min(1_000),
            TopKOrder::Count,
            Consistency::Linearizable,
        )
        .await
        .context("TopK for the entities")?;
    let entities: Vec<Vec<u8>> = ranked.entries.into_iter().map(|e| e.entity_id).collect();
    anyhow::ensure!(!entities.is_empty(), "no {} events between --rank-from and --rank-to", args.event_type);
    let (mut archive_buckets, mut events_counted) = (0u64, 0u64);
    let mut passes = Vec::new();
    for pass in 0..2 {
        let mut histogram = latency_histogram();
        for entity in &entities {
            let started = Instant::now();
            let s =
                client.stats(entity, &args.event_type, from..to, Consistency::Linearizable).await.context("Stats")?;
            record(&mut histogram, started.elapsed());
            if pass == 0 {
                archive_buckets += u64::from(s.archive_buckets);
                events_counted += s.count;
            }
        }
        passes.push(LatencyMs::of(&histogram));
    }
    let second_ms = passes.pop().context("second pass")?;
    let first_ms = passes.pop().context("first pass")?;
    Ok(StatsLatency {
        from_ms: from,
        to_ms: to,
        entities: entities.len(),
        first_ms,
        second_ms,
        archive_buckets,
        events_counted,
    })
}
