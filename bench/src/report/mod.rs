//! The benchmark report: what `scripts/bench.sh` measured, as types, and
//! docs/BENCHMARKS.md rendered from them.
//!
//! The script starts and stops the systems and samples /proc; everything
//! that reads a result is here. A run leaves a work directory of documents
//! — `tally bench` results ([`BenchRun`]), `tally probe-writes` results
//! ([`ProbeWritesRun`]), `tally cluster stages --json` ([`StagesDoc`]) and
//! `tally cluster status --json` — and the script calls, in order:
//!
//! * `tally bench record target|failover|idle …` after each phase, with
//!   the /proc samples as flags: reads that phase's documents and writes
//!   one record ([`TargetResult`], [`FailoverResult`], [`IdleResult`]);
//! * `tally bench report --work DIR --out FILE …` at the end: collects the
//!   records into one [`Report`] and renders the markdown
//!   ([`render::markdown`]), keeping whatever follows [`render::MARKER`] in
//!   the existing file.
//!
//! The JSON block at the end of docs/BENCHMARKS.md is the [`Report`]
//! itself, so a report can be rendered again from an old document (the
//! tests do exactly that with the checked-in one).

pub mod render;
pub mod steps;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tally_client::IngestSummary;

use crate::first_write::ProbeWritesRun;
use crate::measure::{LatencyMs, RankedMs};
use crate::results::{BenchRun, QueryLatency, Verify, Visibility};

/// Everything one `scripts/bench.sh` run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// When the report was made, `YYYY-MM-DD HH:MM UTC`.
    pub generated: String,
    pub machine: Machine,
    pub versions: Versions,
    pub settings: Settings,
    /// One per system, in the order of [`TARGETS`]; a system that did not
    /// run has a record with `ran: false` and nothing else.
    pub results: Vec<TargetResult>,
    /// Tally's figure ÷ each peer's, by peer name.
    pub ratios_tally_over: BTreeMap<String, Ratios>,
    pub tally_only: TallyOnly,
}

/// The systems compared, in the report's order.
pub const TARGETS: [&str; 4] = ["tally", "redis-incr", "redis-dedup", "etcd"];

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub mem_total_mib: u64,
    /// `uname -sr`.
    pub kernel: String,
}

/// Each system's `--version` line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Versions {
    pub tally: String,
    pub redis: String,
    pub etcd: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    pub smoke: bool,
    /// As given to `--duration` (e.g. `120s`).
    pub duration_per_run: String,
    /// `release` or `dev`.
    pub tally_profile: String,
    pub workload: Workload,
    pub tally: TallySettings,
    pub redis: RedisSettings,
    pub etcd: EtcdSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Workload {
    pub ids: u64,
    pub zipf: f64,
    pub types: String,
    pub duplicates: f64,
    /// As given to `--time-spread` (e.g. `2h`).
    pub event_time_spread: String,
    pub seed: u64,
    pub producer_tasks: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TallySettings {
    pub nodes: u32,
    pub replication_factor: u32,
    pub partitions: u32,
    pub client_batch_events: usize,
    pub linger_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RedisSettings {
    pub flags: String,
    pub batch_events: usize,
    pub batches_in_flight: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EtcdSettings {
    pub members: u32,
    pub flags: String,
    pub batch_events: usize,
    pub batches_in_flight: usize,
}

/// One system's saturation run, latency run and server cost.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TargetResult {
    pub name: String,
    /// `tally bench --target`.
    pub target: String,
    /// Which servers ran (`tally`, `redis`, `etcd`).
    pub system: String,
    /// Both runs finished and some event was acknowledged.
    pub ran: bool,
    /// Events per second of the saturation run.
    pub max_eps: Option<f64>,
    pub max_run: Option<MaxRun>,
    /// `tally bench`'s own CPU per event in the saturation run.
    pub generator_cpu_us_per_event: Option<f64>,
    /// The latency run's target rate (half of `max_eps`).
    pub half_rate_eps: Option<f64>,
    pub half_run: Option<HalfRun>,
    /// Ack latency of the latency run.
    pub latency_ms: Option<LatencyMs>,
    /// Tally only: reads during the latency run.
    pub query_latency_ms: Option<QueryLatency>,
    pub visibility_ms: Option<Visibility>,
    /// utime + stime of the servers during the saturation run.
    pub server_cpu_s: f64,
    pub cpu_s_per_million_events: Option<f64>,
    /// VmHWM of each server process, kB.
    pub peak_rss_kb_per_process: Vec<u64>,
    /// The latency run's verification: `None` when it did not verify.
    pub verified: Option<bool>,
    pub verify_skipped: Option<String>,
    /// Tally only: `tally cluster stages` over the latency run.
    pub stages_half_run: Option<StagesDoc>,
}

/// The saturation run, abridged.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MaxRun {
    pub elapsed_s: f64,
    pub sent: u64,
    pub outcomes: IngestSummary,
    pub latency_ms: LatencyMs,
}

/// The latency run, abridged.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HalfRun {
    pub elapsed_s: f64,
    pub sent: u64,
    pub throughput_eps: f64,
    pub outcomes: IngestSummary,
    pub latency_ms: LatencyMs,
    pub verify: Option<Verify>,
    pub verify_skipped: Option<String>,
    pub ok: bool,
    pub query_latency_ms: Option<QueryLatency>,
    pub visibility_ms: Option<Visibility>,
}

/// Tally's figure ÷ a peer's; `None` where either is missing or zero.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Ratios {
    pub throughput: Option<f64>,
    pub p99_latency: Option<f64>,
    pub cpu_per_event: Option<f64>,
    pub peak_rss: Option<f64>,
}

/// What only Tally is measured for.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TallyOnly {
    pub reads_during_half_run: Reads,
    /// `None`: the failover phase was not run at all.
    pub failover: Option<FailoverResult>,
    pub idle: Vec<IdleResult>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Reads {
    pub query_latency_ms: Option<QueryLatency>,
    pub visibility_ms: Option<Visibility>,
}

/// Leaders killed -9 under load, and how soon their partitions wrote again.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct FailoverResult {
    /// At least one kill was probed.
    pub ran: bool,
    pub kills: usize,
    pub kills_wanted: usize,
    /// The background ingest's rate.
    pub ingest_rate_eps: f64,
    pub first_kill_after_s: f64,
    pub probe_timeout_s: Option<f64>,
    /// Kill → first acknowledged write, over every (partition, kill).
    pub first_ack_after_kill_ms: RankedMs,
    pub per_kill: Vec<KillResult>,
    pub never_acknowledged: Option<usize>,
    pub partition_count: Option<u32>,
    pub ingest_outcomes: Option<IngestSummary>,
    pub ingest_latency_ms: Option<LatencyMs>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KillResult {
    /// Partitions the victim led, all of them probed.
    pub partitions_led: usize,
    pub first_ack_ms: RankedMs,
    pub never_acknowledged: usize,
}

/// A fresh cluster with no load: start-up, CPU and memory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdleResult {
    pub label: String,
    pub partitions: u32,
    /// Extra tallyd flags (`--quiesce-after-ms 0`: quiescence off).
    pub tallyd_flags: String,
    pub sample_s: f64,
    pub start_to_all_leaders_s: f64,
    pub waited_s: u64,
    /// Quiescence on only: whether every replica quiesced before sampling.
    pub all_quiesced_before_sample: Option<bool>,
    pub quiesced_per_node: Vec<Option<u64>>,
    pub replicas_per_node: Vec<Option<u64>>,
    pub cpu_pct_of_one_core_per_node: Vec<f64>,
    pub peak_rss_mib_per_node: Vec<f64>,
}

/// `tally cluster stages --json`: every node's per-stage latencies.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StagesDoc {
    pub nodes: Vec<StagesNode>,
}

/// One node's answer, or why there is none.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StagesNode {
    pub addr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stages: Option<Vec<Stage>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One stage of the write or read path on one node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stage {
    pub name: String,
    pub description: String,
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// The part of `tally cluster status --json` the idle phase reads.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StatusNodes {
    #[serde(default)]
    pub nodes: Vec<StatusNode>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StatusNode {
    /// Replicas the node has quiesced; `None` when it did not answer.
    #[serde(default)]
    pub quiesced: Option<u64>,
    #[serde(default)]
    pub replicas: Option<u64>,
}

/// Reads a JSON document of type `T`.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}

/// Reads `path` if it is there and parses; `None` otherwise (a phase that
/// failed leaves no document, and the report says so).
pub fn read_json_if_there<T: DeserializeOwned>(path: &Path) -> Option<T> {
    read_json(path).ok()
}

/// Writes a document, pretty-printed.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(value)?).with_context(|| format!("writing {}", path.display()))
}

/// Tally's figure ÷ a peer's.
fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if a != 0.0 && b != 0.0 => Some(a / b),
        _ => None,
    }
}

/// What one system's phase left in the work directory.
#[derive(Debug, Clone, Default)]
pub struct TargetRuns {
    /// Both runs ended with a result.
    pub finished: bool,
    /// The saturation run.
    pub max: Option<BenchRun>,
    /// The latency run.
    pub half: Option<BenchRun>,
    /// Tally only: `tally cluster stages` over the latency run.
    pub stages: Option<StagesDoc>,
}

/// What the script sampled from /proc for one system.
#[derive(Debug, Clone, Default)]
pub struct ServerSamples {
    /// utime + stime of the servers over the saturation run.
    pub cpu_s: f64,
    /// VmHWM of each server process, kB.
    pub peak_rss_kb_per_process: Vec<u64>,
}

impl TargetResult {
    /// The largest peak RSS of its processes, MiB.
    pub fn peak_rss_mib(&self) -> Option<f64> {
        self.peak_rss_kb_per_process.iter().max().map(|kb| *kb as f64 / 1024.0)
    }

    fn p99(&self) -> Option<f64> {
        self.latency_ms.and_then(|l| l.p99)
    }

    /// The record of one system from its two runs and the /proc samples.
    pub fn from_runs(name: &str, target: &str, system: &str, runs: TargetRuns, samples: ServerSamples) -> TargetResult {
        let TargetRuns { finished: runs_finished, max, half, stages } = runs;
        let ServerSamples { cpu_s: server_cpu_s, peak_rss_kb_per_process } = samples;
        let sent = max.as_ref().map_or(0, |m| m.sent);
        let acked = max.as_ref().map_or(0, |m| m.outcomes.accepted + m.outcomes.duplicates);
        TargetResult {
            name: name.to_owned(),
            target: target.to_owned(),
            system: system.to_owned(),
            ran: runs_finished && acked > 0,
            max_eps: max.as_ref().map(|m| m.throughput_eps),
            max_run: max.as_ref().map(|m| MaxRun {
                elapsed_s: m.elapsed_s,
                sent: m.sent,
                outcomes: m.outcomes,
                latency_ms: m.latency_ms,
            }),
            generator_cpu_us_per_event: max.as_ref().and_then(|m| m.generator_cpu_us_per_event),
            half_rate_eps: half.as_ref().map(|h| h.config.rate),
            latency_ms: half.as_ref().map(|h| h.latency_ms),
            query_latency_ms: half.as_ref().and_then(|h| h.query_latency_ms.clone()),
            visibility_ms: half.as_ref().and_then(|h| h.visibility_ms.clone()),
            verified: half.as_ref().and_then(|h| h.verify.as_ref().map(|v| v.ok)),
            verify_skipped: half.as_ref().and_then(|h| h.verify_skipped.clone()),
            half_run: half.map(|h| HalfRun {
                elapsed_s: h.elapsed_s,
                sent: h.sent,
                throughput_eps: h.throughput_eps,
                outcomes: h.outcomes,
                latency_ms: h.latency_ms,
                verify: h.verify,
                verify_skipped: h.verify_skipped,
                ok: h.ok,
                query_latency_ms: h.query_latency_ms,
                visibility_ms: h.visibility_ms,
            }),
            server_cpu_s,
            cpu_s_per_million_events: (sent > 0).then(|| server_cpu_s / sent as f64 * 1e6),
            peak_rss_kb_per_process,
            stages_half_run: stages,
        }
    }
}

impl FailoverResult {
    /// The record of the failover phase from each kill's probe-writes
    /// result (in kill order) and the background ingest's run.
    pub fn from_runs(
        probes: &[ProbeWritesRun],
        ingest: Option<BenchRun>,
        ingest_rate_eps: f64,
        first_kill_after_s: f64,
        kills_wanted: usize,
    ) -> FailoverResult {
        let times: Vec<f64> = probes.iter().flat_map(|p| p.partitions.iter().filter_map(|r| r.first_ack_ms)).collect();
        let first = probes.first();
        FailoverResult {
            ran: !probes.is_empty(),
            kills: probes.len(),
            kills_wanted,
            ingest_rate_eps,
            first_kill_after_s,
            probe_timeout_s: first.map(|p| p.timeout_s),
            // The one percentile definition, over every (partition, kill).
            first_ack_after_kill_ms: RankedMs::of(&times),
            per_kill: probes
                .iter()
                .map(|p| KillResult {
                    partitions_led: p.probed,
                    first_ack_ms: p.first_ack_ms,
                    never_acknowledged: p.failed,
                })
                .collect(),
            never_acknowledged: first.map(|_| probes.iter().map(|p| p.failed).sum()),
            partition_count: first.map(|p| p.partition_count),
            ingest_outcomes: ingest.as_ref().map(|b| b.outcomes),
            ingest_latency_ms: ingest.map(|b| b.latency_ms),
        }
    }
}

impl Report {
    /// The report of a work directory: each system's record
    /// (`{name}.json`), and Tally's failover (`failover.json`) and idle
    /// records (`idle-{label}.json`).
    pub fn collect(work: &Path, generated: String, machine: Machine, versions: Versions, settings: Settings) -> Report {
        let results: Vec<TargetResult> = TARGETS
            .iter()
            .map(|name| {
                read_json_if_there(&work.join(format!("{name}.json")))
                    .unwrap_or_else(|| TargetResult { name: (*name).to_owned(), ..TargetResult::default() })
            })
            .collect();
        let tally = results.iter().find(|r| r.name == "tally").cloned().unwrap_or_default();
        let ratios_tally_over = results
            .iter()
            .filter(|r| r.name != "tally")
            .map(|r| {
                let ratios = Ratios {
                    throughput: ratio(tally.max_eps, r.max_eps),
                    p99_latency: ratio(tally.p99(), r.p99()),
                    cpu_per_event: ratio(tally.cpu_s_per_million_events, r.cpu_s_per_million_events),
                    peak_rss: ratio(tally.peak_rss_mib(), r.peak_rss_mib()),
                };
                (r.name.clone(), ratios)
            })
            .collect();
        let idle = ["quiescence", "no-quiescence", "quiescence-large"]
            .iter()
            .filter_map(|label| read_json_if_there(&work.join(format!("idle-{label}.json"))))
            .collect();
        let tally_only = TallyOnly {
            reads_during_half_run: Reads {
                query_latency_ms: tally.query_latency_ms.clone(),
                visibility_ms: tally.visibility_ms.clone(),
            },
            failover: read_json_if_there(&work.join("failover.json")),
            idle,
        };
        Report { generated, machine, versions, settings, results, ratios_tally_over, tally_only }
    }
}
