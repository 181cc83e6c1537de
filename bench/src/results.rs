//! What one `tally bench` run measured, as a type: the document it writes
//! to `--out` (and prints with `--json`), which the benchmark report reads
//! back ([`crate::report`]). One definition on both sides, so a renamed or
//! missing field is a compile error or a parse error naming the field,
//! never a silently empty table cell.

use serde::{Deserialize, Serialize};
use tally_client::IngestSummary;

use crate::measure::LatencyMs;

/// One run of `tally bench`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchRun {
    /// `tally`, `redis-incr`, `redis-dedup` or `etcd`.
    pub target: String,
    pub target_addr: String,
    /// The per-run entity prefix (entities are `{prefix}-{n}`).
    pub prefix: String,
    pub config: RunConfig,
    pub elapsed_s: f64,
    /// Events sent, re-sent duplicates included.
    pub sent: u64,
    pub resent_duplicates: u64,
    /// `sent` per second of `elapsed_s`.
    pub throughput_eps: f64,
    /// The generator's own CPU over the sending phase.
    pub generator_cpu_s: Option<f64>,
    pub generator_cpu_us_per_event: Option<f64>,
    /// Per-event outcomes as the target answered them.
    pub outcomes: IngestSummary,
    /// Tally only: what the servers reported in their answers.
    pub server_totals: Option<ServerTotals>,
    /// Ack latency from each event's intended send time.
    pub latency_ms: LatencyMs,
    /// True at a fixed `--rate` (latency runs from the schedule).
    pub corrected_for_coordinated_omission: bool,
    /// `--query-rate`: latency of the readers beside the writers.
    pub query_latency_ms: Option<QueryLatency>,
    /// `--visibility-rate`: ack → visible on a follower.
    pub visibility_ms: Option<Visibility>,
    pub verify: Option<Verify>,
    /// Why verification did not run, when it did not.
    pub verify_skipped: Option<String>,
    /// False only when verification found a mismatch.
    pub ok: bool,
}

/// The workload and client settings of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunConfig {
    /// Events per second asked for; 0 = as fast as possible.
    pub rate: f64,
    pub duration_s: f64,
    pub events: Option<u64>,
    pub ids: u64,
    pub zipf: f64,
    pub types: String,
    pub duplicates: f64,
    pub concurrency: usize,
    pub seed: u64,
    pub time_spread_s: f64,
    pub batch_events: usize,
    pub inflight: usize,
    pub query_rate: f64,
    pub visibility_rate: f64,
}

/// Server-side totals (Tally's answers), beside the per-event outcomes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ServerTotals {
    pub accepted: u64,
    pub duplicates: u64,
}

/// The query load's latencies.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueryLatency {
    /// Queries per second, Stats and Series alternately.
    pub rate: f64,
    /// Linearizable Stats over the last 30 days.
    pub stats: QueryKindLatency,
    /// Linearizable Series of minute buckets over the last 2 hours.
    pub series: QueryKindLatency,
}

/// Latencies and failures of one kind of query.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueryKindLatency {
    #[serde(flatten)]
    pub latency: LatencyMs,
    pub errors: u64,
    /// The first few error messages.
    pub error_samples: Vec<String>,
}

/// Ack → visible in a stale read on a follower.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Visibility {
    #[serde(flatten)]
    pub latency: LatencyMs,
    /// Probes per second.
    pub rate: f64,
    /// Probes whose event was not visible within `timeout_s`.
    pub timeouts: u64,
    pub timeout_s: f64,
    pub errors: u64,
    pub error_samples: Vec<String>,
}

/// The counts queried back and compared with the acknowledged events.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verify {
    pub ok: bool,
    /// (entity, type) pairs checked.
    pub keys: usize,
    pub expected_events: u64,
    pub counted_events: u64,
    /// Events that failed after all retries: counted or not, either is right.
    pub unknown_events: u64,
    pub mismatched_keys: u64,
    /// The first few mismatches.
    pub mismatches: Vec<Mismatch>,
}

/// One (entity, type) whose count or sum is outside the accepted range.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Mismatch {
    pub entity: String,
    pub event_type: String,
    pub expected_count: u64,
    pub unknown_count: u64,
    pub count: u64,
    pub expected_sum: i64,
    pub sum: i64,
}
