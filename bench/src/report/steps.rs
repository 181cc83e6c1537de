//! The steps `scripts/bench.sh` calls (`tally bench record …`, `tally
//! bench report`, `tally bench half-rate`): the script passes what it
//! sampled from /proc as flags, these read the phase's documents and write
//! the records and the report.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use super::render;
use super::{
    read_json, read_json_if_there, write_json, EtcdSettings, FailoverResult, IdleResult, Machine, RedisSettings,
    Report, ServerSamples, Settings, StatusNodes, TallySettings, TargetResult, TargetRuns, Versions, Workload,
};
use crate::first_write::ProbeWritesRun;
use crate::results::BenchRun;

/// `tally bench record …`: one phase's record.
#[derive(Debug, Subcommand)]
pub enum Record {
    /// A system's two runs: reads NAME-max.json, NAME-half.json and
    /// NAME-stages.json in --work, writes NAME.json. Exit status 1 when it
    /// did not run (no event acknowledged).
    Target(RecordTarget),
    /// The failover phase: reads failover-probe-K.json and
    /// failover-bench.json, writes failover.json.
    Failover(RecordFailover),
    /// An idle cluster: reads idle-LABEL-status.json, writes idle-LABEL.json.
    Idle(RecordIdle),
}

/// Comma-separated whole numbers (`a,b,c`; empty: none).
fn numbers(list: &str) -> anyhow::Result<Vec<u64>> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().with_context(|| format!("{s:?} is not a whole number")))
        .collect()
}

#[derive(Debug, Args)]
pub struct RecordTarget {
    /// The work directory.
    #[arg(long)]
    pub work: PathBuf,
    /// The record's name (tally, redis-incr, …).
    #[arg(long)]
    pub name: String,
    /// `tally bench --target`.
    #[arg(long)]
    pub target: String,
    /// Which servers ran: tally, redis, etcd.
    #[arg(long)]
    pub system: String,
    /// utime + stime of the servers over the saturation run, in clock ticks.
    #[arg(long)]
    pub server_cpu_ticks: u64,
    /// Clock ticks per second (`getconf CLK_TCK`).
    #[arg(long)]
    pub clk_tck: u64,
    /// Peak RSS (VmHWM) of each server process, kB, comma-separated.
    #[arg(long, default_value = "")]
    pub peak_rss_kb: String,
    /// A run failed (the record says it did not run).
    #[arg(long)]
    pub failed: bool,
}

#[derive(Debug, Args)]
pub struct RecordFailover {
    #[arg(long)]
    pub work: PathBuf,
    /// The background ingest's rate, events/s.
    #[arg(long)]
    pub rate: f64,
    /// Seconds from the ingest's start to the first kill.
    #[arg(long)]
    pub kill_after_s: f64,
    /// Kills planned.
    #[arg(long)]
    pub kills_wanted: usize,
}

#[derive(Debug, Args)]
pub struct RecordIdle {
    #[arg(long)]
    pub work: PathBuf,
    #[arg(long)]
    pub label: String,
    #[arg(long)]
    pub partitions: u32,
    /// Extra tallyd flags of the run (empty: quiescence on).
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub tallyd_flags: String,
    /// Seconds waited for quiescence before sampling.
    #[arg(long)]
    pub waited_s: u64,
    /// Every replica reported quiesced before sampling.
    #[arg(long)]
    pub all_quiesced: bool,
    /// Length of the CPU sample, seconds.
    #[arg(long)]
    pub sample_s: f64,
    #[arg(long)]
    pub clk_tck: u64,
    /// Each node's utime + stime ticks before and after the sample.
    #[arg(long)]
    pub cpu_ticks_before: String,
    #[arg(long)]
    pub cpu_ticks_after: String,
    #[arg(long, default_value = "")]
    pub peak_rss_kb: String,
    /// From starting the processes to every partition led, ms.
    #[arg(long)]
    pub elected_ms: u64,
}

/// `tally bench report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The work directory of the run.
    #[arg(long)]
    pub work: PathBuf,
    /// The markdown to write; the part from the analysis marker on is kept.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub smoke: bool,
    /// As given to scripts/bench.sh --duration.
    #[arg(long)]
    pub duration: String,
    /// Cargo profile of the Tally binaries.
    #[arg(long)]
    pub profile: String,
    #[arg(long)]
    pub version_tally: String,
    #[arg(long)]
    pub version_redis: String,
    #[arg(long)]
    pub version_etcd: String,
    #[arg(long)]
    pub ids: u64,
    #[arg(long)]
    pub zipf: f64,
    #[arg(long)]
    pub types: String,
    #[arg(long)]
    pub duplicates: f64,
    #[arg(long)]
    pub time_spread: String,
    #[arg(long)]
    pub concurrency: usize,
    #[arg(long)]
    pub inflight: usize,
    #[arg(long)]
    pub seed: u64,
    #[arg(long)]
    pub partitions: u32,
    #[arg(long, allow_hyphen_values = true)]
    pub etcd_flags: String,
}

/// `tally bench record …`. Returns the exit status.
pub fn record(step: &Record) -> anyhow::Result<i32> {
    match step {
        Record::Target(a) => {
            let doc = |suffix: &str| a.work.join(format!("{}-{suffix}.json", a.name));
            let runs = TargetRuns {
                finished: !a.failed,
                max: read_json_if_there(&doc("max")),
                half: read_json_if_there(&doc("half")),
                stages: read_json_if_there(&doc("stages")),
            };
            let samples = ServerSamples {
                cpu_s: a.server_cpu_ticks as f64 / a.clk_tck.max(1) as f64,
                peak_rss_kb_per_process: numbers(&a.peak_rss_kb)?,
            };
            let r = TargetResult::from_runs(&a.name, &a.target, &a.system, runs, samples);
            write_json(&a.work.join(format!("{}.json", a.name)), &r)?;
            Ok(if r.ran { 0 } else { 1 })
        }
        Record::Failover(a) => {
            let probes = kill_probes(&a.work)?;
            let ingest: Option<BenchRun> = read_json_if_there(&a.work.join("failover-bench.json"));
            let r = FailoverResult::from_runs(&probes, ingest, a.rate, a.kill_after_s, a.kills_wanted);
            write_json(&a.work.join("failover.json"), &r)?;
            Ok(0)
        }
        Record::Idle(a) => {
            let status: StatusNodes =
                read_json_if_there(&a.work.join(format!("idle-{}-status.json", a.label))).unwrap_or_default();
            let (before, after) = (numbers(&a.cpu_ticks_before)?, numbers(&a.cpu_ticks_after)?);
            let per_second = a.clk_tck.max(1) as f64 * a.sample_s.max(1e-9);
            let r = IdleResult {
                label: a.label.clone(),
                partitions: a.partitions,
                tallyd_flags: a.tallyd_flags.clone(),
                sample_s: a.sample_s,
                start_to_all_leaders_s: (a.elected_ms as f64 / 100.0).round() / 10.0,
                waited_s: a.waited_s,
                all_quiesced_before_sample: a.tallyd_flags.is_empty().then_some(a.all_quiesced),
                quiesced_per_node: status.nodes.iter().map(|n| n.quiesced).collect(),
                replicas_per_node: status.nodes.iter().map(|n| n.replicas).collect(),
                cpu_pct_of_one_core_per_node: before
                    .iter()
                    .zip(&after)
                    .map(|(b, a)| (a.saturating_sub(*b) as f64 / per_second * 10_000.0).round() / 100.0)
                    .collect(),
                peak_rss_mib_per_node: numbers(&a.peak_rss_kb)?
                    .into_iter()
                    .map(|kb| (kb as f64 / 102.4).round() / 10.0)
                    .collect(),
            };
            write_json(&a.work.join(format!("idle-{}.json", a.label)), &r)?;
            Ok(0)
        }
    }
}

/// Each kill's `failover-probe-K.json`, in kill order; unreadable ones are
/// left out (the phase logs why).
fn kill_probes(work: &Path) -> anyhow::Result<Vec<ProbeWritesRun>> {
    let mut found: Vec<(u64, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(work).with_context(|| format!("reading {}", work.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if let Some(k) = name.strip_prefix("failover-probe-").and_then(|n| n.strip_suffix(".json")) {
            if let Ok(k) = k.parse() {
                found.push((k, path));
            }
        }
    }
    found.sort();
    Ok(found.into_iter().filter_map(|(_, p)| read_json_if_there(&p)).collect())
}

/// `tally bench half-rate FILE`: half the throughput of a `tally bench`
/// result, at least 1 event/s; an error when there is none.
pub fn half_rate(run: &Path) -> anyhow::Result<f64> {
    let run: BenchRun = read_json(run)?;
    if run.throughput_eps.is_nan() || run.throughput_eps <= 0.0 {
        bail!("the run acknowledged nothing (throughput {})", run.throughput_eps);
    }
    Ok((run.throughput_eps / 2.0).max(1.0))
}

/// This machine, as the report describes it.
fn machine() -> Machine {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let field = |text: &str, key: &str| -> Option<String> {
        text.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_once(':')).map(|(_, v)| v.trim().to_owned())
    };
    let mem_kb: u64 = field(&read("/proc/meminfo"), "MemTotal")
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0);
    Machine {
        nproc: std::thread::available_parallelism().map_or(1, usize::from),
        cpu_model: field(&cpuinfo, "model name").unwrap_or_else(|| "unknown".into()),
        mem_total_mib: mem_kb / 1024,
        kernel: format!("{} {}", read("/proc/sys/kernel/ostype").trim(), read("/proc/sys/kernel/osrelease").trim()),
    }
}

/// `YYYY-MM-DD HH:MM UTC`, now.
fn now_utc() -> String {
    let rfc = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    // 2026-11-30T20:40:12Z
    format!("{} {} UTC", &rfc[..10], &rfc[11..16])
}

/// `tally bench report`: writes the markdown, prints the summary tables.
pub fn report(a: &ReportArgs) -> anyhow::Result<i32> {
    let settings = Settings {
        smoke: a.smoke,
        duration_per_run: a.duration.clone(),
        tally_profile: a.profile.clone(),
        workload: Workload {
            ids: a.ids,
            zipf: a.zipf,
            types: a.types.clone(),
            duplicates: a.duplicates,
            event_time_spread: a.time_spread.clone(),
            seed: a.seed,
            producer_tasks: a.concurrency,
        },
        tally: TallySettings {
            nodes: 3,
            replication_factor: 3,
            partitions: a.partitions,
            client_batch_events: crate::targets::TargetKind::Tally.default_batch(),
            linger_ms: 5,
        },
        redis: RedisSettings {
            flags: "--save '' --appendonly no".into(),
            batch_events: crate::targets::TargetKind::RedisDedup.default_batch(),
            batches_in_flight: a.inflight,
        },
        etcd: EtcdSettings {
            members: 3,
            flags: a.etcd_flags.clone(),
            batch_events: crate::targets::TargetKind::Etcd.default_batch(),
            batches_in_flight: a.inflight,
        },
    };
    let versions =
        Versions { tally: a.version_tally.clone(), redis: a.version_redis.clone(), etcd: a.version_etcd.clone() };
    let report = Report::collect(&a.work, now_utc(), machine(), versions, settings);
    let existing = std::fs::read_to_string(&a.out).ok();
    let text = render::document(&report, existing.as_deref())?;
    std::fs::write(&a.out, text).with_context(|| format!("writing {}", a.out.display()))?;
    print!("{}", render::summary(&report));
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::measure::LatencyMs;
    use crate::results::RunConfig;

    fn run(throughput: f64, sent: u64, rate: f64) -> BenchRun {
        BenchRun {
            target: "tally".into(),
            target_addr: "a:1".into(),
            prefix: "bench-1".into(),
            config: RunConfig {
                rate,
                duration_s: 3.0,
                events: None,
                ids: 10,
                zipf: 1.1,
                types: "view=1".into(),
                duplicates: 0.01,
                concurrency: 2,
                seed: 42,
                time_spread_s: 0.0,
                batch_events: 2000,
                inflight: 32,
                query_rate: 0.0,
                visibility_rate: 0.0,
            },
            elapsed_s: 3.0,
            sent,
            resent_duplicates: 0,
            throughput_eps: throughput,
            generator_cpu_s: Some(0.1),
            generator_cpu_us_per_event: Some(2.5),
            outcomes: tally_client::IngestSummary { accepted: sent, ..Default::default() },
            server_totals: None,
            latency_ms: LatencyMs { p99: Some(7.5), count: sent, ..LatencyMs::default() },
            corrected_for_coordinated_omission: rate > 0.0,
            query_latency_ms: None,
            visibility_ms: None,
            verify: None,
            verify_skipped: Some("--no-verify".into()),
            ok: true,
        }
    }

    #[test]
    fn a_target_record_from_its_runs_and_samples() {
        let dir = tempfile::tempdir().expect("tempdir");
        let work = dir.path().to_path_buf();
        write_json(&work.join("tally-max.json"), &run(3000.0, 9000, 0.0)).expect("write");
        write_json(&work.join("tally-half.json"), &run(1490.0, 4470, 1500.0)).expect("write");
        assert_eq!(half_rate(&work.join("tally-max.json")).expect("rate"), 1500.0);
        let step = Record::Target(RecordTarget {
            work: work.clone(),
            name: "tally".into(),
            target: "tally".into(),
            system: "tally".into(),
            server_cpu_ticks: 900,
            clk_tck: 100,
            peak_rss_kb: "2048,1024".into(),
            failed: false,
        });
        assert_eq!(record(&step).expect("record"), 0);
        let r: TargetResult = read_json(&work.join("tally.json")).expect("record written");
        assert!(r.ran);
        assert_eq!(r.max_eps, Some(3000.0));
        assert_eq!(r.half_rate_eps, Some(1500.0));
        assert_eq!(r.server_cpu_s, 9.0);
        assert_eq!(r.cpu_s_per_million_events, Some(1000.0));
        assert_eq!(r.peak_rss_mib(), Some(2.0));
        assert_eq!(r.latency_ms.and_then(|l| l.p99), Some(7.5));
        assert_eq!(r.verified, None);

        // A system whose runs failed, and one that never left a record.
        let failed = Record::Target(RecordTarget {
            work: work.clone(),
            name: "etcd".into(),
            target: "etcd".into(),
            system: "etcd".into(),
            server_cpu_ticks: 0,
            clk_tck: 100,
            peak_rss_kb: String::new(),
            failed: true,
        });
        assert_eq!(record(&failed).expect("record"), 1, "did not run");
        let report = Report::collect(&work, "now".into(), machine(), versions(), settings());
        assert_eq!(report.results.len(), 4);
        assert!(!report.results[1].ran && report.results[1].name == "redis-incr");
        let md = render::markdown(&report).expect("renders");
        assert!(md.contains("| 3,000 | — | 7.50 |"), "{md}");
        assert!(md.contains("| etcd, 3 members, a put per event in txns of ≤128, fsync'd | failed |"), "{md}");
        assert!(!md.contains("## Tally alone"), "no Tally-only phase ran");
    }

    #[test]
    fn failover_and_idle_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let work = dir.path().to_path_buf();
        for (k, times) in [(2, vec![Some(30.0), None]), (1, vec![Some(10.0), Some(20.0)])] {
            let acked: Vec<f64> = times.iter().flatten().copied().collect();
            let probe = ProbeWritesRun {
                addrs: vec!["a:1".into()],
                partition_count: 8,
                since_ms: Some(1),
                timeout_s: 30.0,
                probed: times.len(),
                acked: acked.len(),
                failed: times.len() - acked.len(),
                failed_partitions: Vec::new(),
                first_ack_ms: crate::measure::RankedMs::of(&acked),
                partitions: times
                    .iter()
                    .enumerate()
                    .map(|(p, t)| crate::first_write::PartitionProbe {
                        partition: p as u32,
                        entity: format!("probe-{p}"),
                        first_ack_ms: *t,
                        attempts: 1,
                        last_error: None,
                    })
                    .collect(),
            };
            write_json(&work.join(format!("failover-probe-{k}.json")), &probe).expect("write");
        }
        let step =
            Record::Failover(RecordFailover { work: work.clone(), rate: 100.0, kill_after_s: 3.0, kills_wanted: 2 });
        record(&step).expect("record");
        let f: FailoverResult = read_json(&work.join("failover.json")).expect("written");
        assert!(f.ran);
        assert_eq!(f.per_kill.iter().map(|k| k.partitions_led).collect::<Vec<_>>(), vec![2, 2], "kill order");
        assert_eq!(f.per_kill[1].never_acknowledged, 1);
        assert_eq!(f.never_acknowledged, Some(1));
        // Nearest rank over 10, 20, 30: p50 is 20, p99 the maximum.
        assert_eq!((f.first_ack_after_kill_ms.p50, f.first_ack_after_kill_ms.p99), (Some(20.0), Some(30.0)));

        std::fs::write(
            work.join("idle-quiescence-status.json"),
            r#"{"initialized": true, "nodes": [{"quiesced": 8, "replicas": 8, "node_id": 1}, {"quiesced": null, "replicas": 8}]}"#,
        )
        .expect("write");
        let idle = Record::Idle(RecordIdle {
            work: work.clone(),
            label: "quiescence".into(),
            partitions: 8,
            tallyd_flags: String::new(),
            waited_s: 2,
            all_quiesced: true,
            sample_s: 2.0,
            clk_tck: 100,
            cpu_ticks_before: "10,20".into(),
            cpu_ticks_after: "16,120".into(),
            peak_rss_kb: "102400,51200".into(),
            elected_ms: 1234,
        });
        record(&idle).expect("record");
        let i: IdleResult = read_json(&work.join("idle-quiescence.json")).expect("written");
        assert_eq!(i.cpu_pct_of_one_core_per_node, vec![3.0, 50.0]);
        assert_eq!(i.peak_rss_mib_per_node, vec![100.0, 50.0]);
        assert_eq!(i.start_to_all_leaders_s, 1.2);
        assert_eq!(i.quiesced_per_node, vec![Some(8), None]);
        assert_eq!(i.all_quiesced_before_sample, Some(true));

        let report = Report::collect(&work, "now".into(), machine(), versions(), settings());
        let md = render::markdown(&report).expect("renders");
        assert!(md.contains("over all 3 (partition, kill) pairs: p50 20.00 ms, p99 30.00 ms"), "{md}");
        assert!(md.contains("| quiescence on (default) | 8 | 1.2 | 8/8, ?/8 | 3.0, 50.0 | 100, 50 |"), "{md}");
    }

    fn versions() -> Versions {
        Versions { tally: "tallyd 0".into(), redis: "redis 0".into(), etcd: "etcd 0".into() }
    }

    fn settings() -> Settings {
        Settings {
            smoke: true,
            duration_per_run: "3s".into(),
            tally_profile: "dev".into(),
            workload: Workload {
                ids: 10,
                zipf: 1.1,
                types: "view=1".into(),
                duplicates: 0.01,
                event_time_spread: "2h".into(),
                seed: 42,
                producer_tasks: 2,
            },
            tally: TallySettings {
                nodes: 3,
                replication_factor: 3,
                partitions: 8,
                client_batch_events: 2000,
                linger_ms: 5,
            },
            redis: RedisSettings { flags: String::new(), batch_events: 1000, batches_in_flight: 32 },
            etcd: EtcdSettings { members: 3, flags: String::new(), batch_events: 128, batches_in_flight: 32 },
        }
    }
}
