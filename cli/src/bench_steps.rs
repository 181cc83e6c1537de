//! `tally bench`: a load-generator run (`tally_bench::generator`), or one
//! of the steps `scripts/bench.sh` calls between starting and stopping the
//! systems — so that the script reads no JSON itself. `report` is for
//! people too; the others are hidden from `--help`.

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, Subcommand};
use tally_bench::generator::BenchArgs;
use tally_bench::report::steps::{self, Record, ReportArgs};

use crate::Cli;

/// `tally bench [FLAGS]` runs the load generator; `tally bench STEP …` a step.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchCommand {
    #[allow(missing_docs)]
    #[command(subcommand)]
    pub step: Option<BenchStep>,
    #[command(flatten)]
    pub run: BenchArgs,
}

/// What `tally bench` can do besides generating load.
#[derive(Debug, Subcommand)]
pub enum BenchStep {
    /// Render the benchmark report (docs/BENCHMARKS.md) from the work
    /// directory of a scripts/bench.sh run (BENCH_KEEP=1 keeps it).
    Report(ReportArgs),
    /// Record one phase of scripts/bench.sh from its documents.
    #[command(hide = true)]
    Record {
        #[command(subcommand)]
        step: Record,
    },
    /// Print half the throughput of a `tally bench` result (the latency
    /// run's rate); exit 1 when it acknowledged nothing.
    #[command(hide = true)]
    HalfRate {
        /// A `tally bench --out` file.
        run: PathBuf,
    },
    /// Print `NODE P1,P2,…`: the reachable node leading the most
    /// partitions and those partitions (the failover phase's victim).
    #[command(hide = true)]
    BusiestLeader,
    /// Exit 0 when every node reports all its replicas quiesced, 1 if not.
    #[command(hide = true)]
    AllQuiesced,
    /// TopK latency: the same query repeated one at a time, with HDR
    /// percentiles (`scripts/bench-top-k.sh`).
    TopK(tally_bench::top_k_latency::TopKLatencyArgs),
    /// Stats latency over one range for the range's top entities, a cold
    /// pass then a warm one (`scripts/bench-archive.sh`).
    Stats(tally_bench::stats_latency::StatsLatencyArgs),
}

pub async fn run(cli: &Cli, command: &BenchCommand) -> anyhow::Result<i32> {
    match &command.step {
        None => tally_bench::generator::run(&cli.addr, cli.json, &command.run).await,
        Some(BenchStep::Report(args)) => steps::report(args),
        Some(BenchStep::Record { step }) => steps::record(step),
        Some(BenchStep::HalfRate { run }) => {
            println!("{}", steps::half_rate(run)?);
            Ok(0)
        }
        Some(BenchStep::BusiestLeader) => {
            let view = crate::cluster::status_view(cli).await?;
            let Some((node, led)) = view.busiest_leader() else { bail!("no reachable node leads a partition") };
            let led: Vec<String> = led.iter().map(u32::to_string).collect();
            println!("{node} {}", led.join(","));
            Ok(0)
        }
        Some(BenchStep::TopK(args)) => {
            let measured = tally_bench::top_k_latency::run(cli.seeds(), args).await?;
            if cli.json {
                crate::print_json(&serde_json::to_value(&measured)?);
            } else {
                let l = measured.latency_ms;
                println!(
                    "TopK k={} over [{}, {}): {} queries, p50 {:?} ms, p99 {:?} ms, max {:?} ms; {} entries, top count {}",
                    measured.k, measured.from_ms, measured.to_ms, l.count, l.p50, l.p99, l.max, measured.entries, measured.top_count
                );
            }
            Ok(0)
        }
        Some(BenchStep::Stats(args)) => {
            let m = tally_bench::stats_latency::run(cli.seeds(), args).await?;
            if cli.json {
                crate::print_json(&serde_json::to_value(&m)?);
            } else {
                let (a, b) = (m.first_ms, m.second_ms);
                println!(
                    "Stats over [{}, {}) for {} entities: first pass p50 {:?} ms, p99 {:?} ms; second pass p50 {:?} ms, p99 {:?} ms; {} archive buckets, {} events",
                    m.from_ms, m.to_ms, m.entities, a.p50, a.p99, b.p50, b.p99, m.archive_buckets, m.events_counted
                );
            }
            Ok(0)
        }
        Some(BenchStep::AllQuiesced) => {
            let view = crate::cluster::status_view(cli).await?;
            Ok(if view.all_quiesced() { 0 } else { 1 })
        }
    }
}
