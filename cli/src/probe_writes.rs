//! `tally probe-writes`: how soon each partition acknowledges a write
//! again, e.g. after its leader was killed.
//!
//! For every selected partition, concurrently, it writes one event at a
//! time to an entity of that partition (`probe-{k}`, the first such name)
//! with a fresh event id, until one is acknowledged, and reports when that
//! happened. Times run from the command's start, or from `--since` (the
//! moment a leader was killed, say), so the start-up of this process is
//! not hidden in the number.
//!
//! The probing itself is `tally_bench::first_write`, shared with the
//! benchmark and the cluster tests; this module is the command around it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use tally_bench::first_write::{first_write, lazy_channel, probe_entities, FirstWrite, Pacing, ProbeWritesRun};
use tally_bench::measure::RankedMs;
use tally_client::time_arg::{now_ms, parse_time_at};
use tally_proto::v1::cluster_client::ClusterClient;
use tally_proto::v1::StatusRequest;
use tonic::transport::Channel;

use crate::table::Table;
use crate::{Cli, EXIT_PARTIAL};
/// Limit on the `Cluster.Status` call that learns the partition count.
const STATUS_TIMEOUT: Duration = Duration::from_secs(3);

/// Arguments of `tally probe-writes`.
#[derive(Debug, Args)]
pub struct ProbeWritesArgs {
    /// Partitions to probe: all, or a comma-separated list such as 0,3,7.
    #[arg(long, default_value = "all")]
    pub partitions: String,
    /// Give up on a partition this long after the command started.
    #[arg(long, default_value = "10s")]
    pub timeout: humantime::Duration,
    /// Time from a failed attempt to the next one on the same partition.
    #[arg(long, default_value = "10ms")]
    pub interval: humantime::Duration,
    /// Start another attempt beside those in flight once they have all
    /// waited this long.
    #[arg(long, default_value = "100ms")]
    pub hedge_after: humantime::Duration,
    /// Limit on one attempt.
    #[arg(long, default_value = "500ms")]
    pub request_timeout: humantime::Duration,
    /// Measure from this moment instead of the command's start: now, -2s,
    /// RFC 3339 or milliseconds since the epoch (e.g. `date +%s%3N` taken
    /// just before a kill).
    #[arg(long)]
    pub since: Option<String>,
}

/// Parses `all` or `0,3,7` against `count` partitions: sorted, no repeats.
pub fn parse_partitions(spec: &str, count: u32) -> anyhow::Result<Vec<u32>> {
    let spec = spec.trim();
    if spec == "all" {
        return Ok((0..count).collect());
    }
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let p: u32 = part.parse().with_context(|| format!("--partitions: {part:?} is not a partition number"))?;
        if p >= count {
            bail!("--partitions: the cluster has partitions 0..{count}, not {p}");
        }
        out.push(p);
    }
    out.sort_unstable();
    out.dedup();
    if out.is_empty() {
        bail!("--partitions needs `all` or at least one partition number");
    }
    Ok(out)
}

/// Runs `tally probe-writes`.
pub async fn run(cli: &Cli, args: &ProbeWritesArgs) -> anyhow::Result<i32> {
    let started = Instant::now();
    let started_ms = now_ms();
    // How long before the command's start the origin was.
    let since_ms = args.since.as_deref().map(|s| parse_time_at(s, started_ms)).transpose().context("--since")?;
    let head_start = since_ms.map_or(Duration::ZERO, |since| {
        // A --since in the future counts as the command's start.
        Duration::from_millis(u64::try_from(started_ms - since).unwrap_or(0))
    });
    let addrs = cli.seeds();
    if addrs.is_empty() {
        bail!("--addr names no node");
    }
    let channels: Vec<Channel> = addrs
        .iter()
        .map(|a| lazy_channel(a, *args.request_timeout).with_context(|| format!("address {a}")))
        .collect::<anyhow::Result<_>>()?;
    let routing = cluster_routing(&addrs, &channels).await?;
    let count = routing.partition_count();
    let partitions = parse_partitions(&args.partitions, count)?;
    let entities = probe_entities(&partitions, &routing)
        .context("no probe entity name found for some partition (this should not happen)")?;

    let channels: Arc<[Channel]> = channels.into();
    let deadline = started + *args.timeout;
    let tasks: Vec<_> = entities
        .into_iter()
        .map(|(partition, entity)| {
            let channels = channels.clone();
            let pacing = Pacing {
                interval: *args.interval,
                hedge_after: *args.hedge_after,
                request_timeout: *args.request_timeout,
            };
            tokio::spawn(first_write(partition, entity, channels, pacing, deadline, started))
        })
        .collect();
    let mut results = Vec::with_capacity(tasks.len());
    for t in tasks {
        let mut r = t.await.context("probe task")?;
        r.first_ack = r.first_ack.map(|d| d + head_start);
        results.push(r);
    }

    let acked: Vec<f64> = results.iter().filter_map(FirstWrite::first_ack_ms).collect();
    let failed: Vec<u32> = results.iter().filter(|r| r.first_ack.is_none()).map(|r| r.partition).collect();
    let first_ack_ms = RankedMs::of(&acked);
    let doc = ProbeWritesRun {
        addrs: addrs.clone(),
        partition_count: count,
        since_ms,
        timeout_s: args.timeout.as_secs_f64(),
        probed: results.len(),
        acked: acked.len(),
        failed: failed.len(),
        failed_partitions: failed.clone(),
        first_ack_ms,
        partitions: results.iter().map(FirstWrite::to_probe).collect(),
    };
    if cli.json {
        println!("{}", serde_json::to_string(&doc)?);
    } else {
        let mut table = Table::new(["PARTITION", "FIRST_ACK_MS", "ATTEMPTS", "LAST_ERROR"]);
        for r in &results {
            table.row([
                r.partition.to_string(),
                r.first_ack.map_or("-".to_owned(), |d| format!("{:.1}", d.as_secs_f64() * 1000.0)),
                r.attempts.to_string(),
                r.last_error.clone().unwrap_or_default(),
            ]);
        }
        print!("{}", table.render());
        let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
        println!(
            "first ack of {}/{} partitions{}: p50 {} ms  p99 {} ms  max {} ms; never acknowledged within {}: {}",
            acked.len(),
            results.len(),
            if args.since.is_some() { " (from --since)" } else { "" },
            ms(first_ack_ms.p50),
            ms(first_ack_ms.p99),
            ms(first_ack_ms.max),
            humantime::format_duration(*args.timeout),
            failed.len()
        );
    }
    Ok(if failed.is_empty() { 0 } else { EXIT_PARTIAL })
}

/// How the cluster routes (its partitions, splits and spreads), from the
/// first node that reports an initialised cluster.
async fn cluster_routing(addrs: &[String], channels: &[Channel]) -> anyhow::Result<tally_proto::routing::Routing> {
    let mut errors = Vec::new();
    for (addr, channel) in addrs.iter().zip(channels) {
        let mut request = tonic::Request::new(StatusRequest {});
        request.set_timeout(STATUS_TIMEOUT);
        match tokio::time::timeout(STATUS_TIMEOUT, ClusterClient::new(channel.clone()).status(request)).await {
            Ok(Ok(s)) if s.get_ref().initialized && s.get_ref().partition_count > 0 => {
                return Ok(tally_proto::routing::Routing::of_status(s.get_ref()))
            }
            Ok(Ok(_)) => errors.push(format!("{addr}: not initialised")),
            Ok(Err(status)) => errors.push(format!("{addr}: {}", status.message())),
            Err(_) => errors.push(format!("{addr}: no answer within {STATUS_TIMEOUT:?}")),
        }
    }
    bail!("no node reported the partition count: {}", errors.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_selection() {
        assert_eq!(parse_partitions("all", 4).expect("all"), vec![0, 1, 2, 3]);
        assert_eq!(parse_partitions(" 7,0, 3,7 ", 8).expect("list"), vec![0, 3, 7]);
        assert!(parse_partitions("8", 8).is_err(), "out of range");
        assert!(parse_partitions("x", 8).is_err());
        assert!(parse_partitions("", 8).is_err());
        assert!(parse_partitions(",", 8).is_err());
    }
}
