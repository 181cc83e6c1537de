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
//! It uses the raw `Ingest` stub, not [`TallyClient`](crate::TallyClient):
//! the client's retries with backoff, its circuit breaker and its map
//! refreshes would add their own delays and hide the cluster's. Attempts go
//! round-robin over `--addr`, each cut off after `--request-timeout`. One
//! attempt at a time is the rule: a failed one is followed by the next
//! `--interval` later. But an attempt can hang (sent to a node that still
//! forwards to the dead leader, or waiting for a commit), so once the
//! attempts in flight have all waited `--hedge-after`, another is started
//! beside them, up to [`MAX_IN_FLIGHT`]. That keeps the resolution near
//! the hedge delay rather than the request timeout, without multiplying
//! the writes when the cluster is merely slow.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use futures::stream::{FuturesUnordered, StreamExt};
use serde_json::json;
use tally_proto::partition::partition_of;
use tally_proto::v1::cluster_client::ClusterClient;
use tally_proto::v1::ingest_client::IngestClient;
use tally_proto::v1::{IngestRequest, StatusRequest};
use tonic::transport::{Channel, Endpoint};

use super::table::Table;
use super::{print_json, Cli, EXIT_PARTIAL};
use crate::time_arg::{now_ms, parse_time_at};
use crate::Event;

/// Attempts outstanding per partition at most.
const MAX_IN_FLIGHT: usize = 8;
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

/// For each wanted partition, the first `probe-{k}` entity that lands in
/// it. None when some partition has no such name among the first many
/// (which a uniform hash makes practically impossible).
pub fn probe_entities(partitions: &[u32], count: u32) -> Option<BTreeMap<u32, String>> {
    let mut out = BTreeMap::new();
    let mut missing = partitions.len();
    // Coupon collector: about count × ln(count) names find every partition;
    // the bound is far above that.
    let bound = u64::from(count).saturating_mul(1_000).max(100_000);
    for k in 0..bound {
        if missing == 0 {
            break;
        }
        let name = format!("probe-{k}");
        let p = partition_of(name.as_bytes(), count);
        if partitions.binary_search(&p).is_ok() && !out.contains_key(&p) {
            out.insert(p, name);
            missing -= 1;
        }
    }
    (missing == 0).then_some(out)
}

/// Nearest-rank percentile `q` (0 < q ≤ 1) of ascending `sorted`.
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// How one partition's probing ended.
#[derive(Debug)]
struct PartitionResult {
    partition: u32,
    entity: String,
    /// From the origin to the first acknowledgement.
    first_ack: Option<Duration>,
    attempts: u64,
    last_error: Option<String>,
}

/// Runs `tally probe-writes`.
pub(crate) async fn run(cli: &Cli, args: &ProbeWritesArgs) -> anyhow::Result<i32> {
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
    let channels: Vec<Channel> =
        addrs.iter().map(|a| lazy_channel(a, *args.request_timeout)).collect::<anyhow::Result<_>>()?;
    let count = partition_count(&addrs, &channels).await?;
    let partitions = parse_partitions(&args.partitions, count)?;
    let entities = probe_entities(&partitions, count)
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
            tokio::spawn(async move { probe(partition, entity, channels, pacing, deadline, started).await })
        })
        .collect();
    let mut results = Vec::with_capacity(tasks.len());
    for t in tasks {
        let mut r = t.await.context("probe task")?;
        r.first_ack = r.first_ack.map(|d| d + head_start);
        results.push(r);
    }

    let mut acked: Vec<f64> = results.iter().filter_map(|r| r.first_ack).map(|d| d.as_secs_f64() * 1000.0).collect();
    acked.sort_by(f64::total_cmp);
    let failed: Vec<u32> = results.iter().filter(|r| r.first_ack.is_none()).map(|r| r.partition).collect();
    let doc = json!({
        "addrs": addrs,
        "partition_count": count,
        "since_ms": since_ms,
        "timeout_s": args.timeout.as_secs_f64(),
        "probed": results.len(),
        "acked": acked.len(),
        "failed": failed.len(),
        "failed_partitions": failed,
        "first_ack_ms": {
            "p50": percentile(&acked, 0.5), "p99": percentile(&acked, 0.99),
            "max": acked.last(), "count": acked.len(),
        },
        "partitions": results.iter().map(|r| json!({
            "partition": r.partition, "entity": r.entity,
            "first_ack_ms": r.first_ack.map(|d| d.as_secs_f64() * 1000.0),
            "attempts": r.attempts, "last_error": r.last_error,
        })).collect::<Vec<_>>(),
    });
    if cli.json {
        print_json(&doc);
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
            ms(percentile(&acked, 0.5)),
            ms(percentile(&acked, 0.99)),
            ms(acked.last().copied()),
            humantime::format_duration(*args.timeout),
            failed.len()
        );
    }
    Ok(if failed.is_empty() { 0 } else { EXIT_PARTIAL })
}

/// A channel that connects on first use and reconnects by itself, so a
/// dead address costs a failed attempt, not a stalled start.
fn lazy_channel(addr: &str, connect_timeout: Duration) -> anyhow::Result<Channel> {
    let uri = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
    Ok(Endpoint::from_shared(uri)
        .with_context(|| format!("address {addr}"))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .connect_lazy())
}

/// The partition count, from the first node that reports an initialised
/// cluster.
async fn partition_count(addrs: &[String], channels: &[Channel]) -> anyhow::Result<u32> {
    let mut errors = Vec::new();
    for (addr, channel) in addrs.iter().zip(channels) {
        let mut request = tonic::Request::new(StatusRequest {});
        request.set_timeout(STATUS_TIMEOUT);
        match tokio::time::timeout(STATUS_TIMEOUT, ClusterClient::new(channel.clone()).status(request)).await {
            Ok(Ok(s)) if s.get_ref().initialized && s.get_ref().partition_count > 0 => {
                return Ok(s.get_ref().partition_count)
            }
            Ok(Ok(_)) => errors.push(format!("{addr}: not initialised")),
            Ok(Err(status)) => errors.push(format!("{addr}: {}", status.message())),
            Err(_) => errors.push(format!("{addr}: no answer within {STATUS_TIMEOUT:?}")),
        }
    }
    bail!("no node reported the partition count: {}", errors.join("; "))
}

/// When attempts start and how long they may take.
#[derive(Debug, Clone, Copy)]
struct Pacing {
    interval: Duration,
    hedge_after: Duration,
    request_timeout: Duration,
}

/// Probes one partition until an event is acknowledged or `deadline`.
async fn probe(
    partition: u32,
    entity: String,
    channels: Arc<[Channel]>,
    pacing: Pacing,
    deadline: Instant,
    started: Instant,
) -> PartitionResult {
    let mut result = PartitionResult { partition, entity, first_ack: None, attempts: 0, last_error: None };
    let mut in_flight = FuturesUnordered::new();
    let mut next = Instant::now();
    let run_id: u64 = rand::random();
    loop {
        tokio::select! {
            // Answers first: an ack that arrived must not lose to the deadline.
            biased;
            Some(answer) = in_flight.next() => match answer {
                // Typed here: the set's first push comes later in the loop.
                Ok::<Instant, String>(at) => {
                    result.first_ack = Some(at.duration_since(started));
                    return result;
                }
                Err(e) => {
                    result.last_error = Some(e);
                    next = next.min(Instant::now() + pacing.interval);
                }
            },
            _ = tokio::time::sleep_until(deadline.into()) => return result,
            _ = tokio::time::sleep_until(next.into()), if in_flight.len() < MAX_IN_FLIGHT => {
                // Different partitions start on different nodes.
                let k = result.attempts as usize + partition as usize;
                let channel = channels[k % channels.len()].clone();
                let event = Event {
                    entity_id: result.entity.clone().into_bytes(),
                    event_type: "probe".into(),
                    event_time_ms: now_ms(),
                    event_id: format!("probe-{partition}-{run_id:016x}-{}", result.attempts).into_bytes(),
                    value: None,
                };
                result.attempts += 1;
                in_flight.push(attempt(channel, event, pacing.request_timeout));
                // The next one only if this one fails (see above) or hangs.
                next = Instant::now() + pacing.hedge_after;
            },
        }
    }
}

/// Sends one event; the moment it was acknowledged, or why not.
async fn attempt(channel: Channel, event: Event, timeout: Duration) -> Result<Instant, String> {
    let mut request = tonic::Request::new(IngestRequest { events: vec![event] });
    request.set_timeout(timeout);
    // The outer timeout also bounds connecting, which the gRPC deadline
    // does not cover.
    let answer = tokio::time::timeout(timeout, IngestClient::new(channel).ingest(request))
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
        .map_err(|status| format!("{:?}: {}", status.code(), status.message()))?
        .into_inner();
    if answer.accepted + answer.duplicates >= 1 {
        return Ok(Instant::now());
    }
    Err(answer.rejected.first().map_or_else(|| "not acknowledged".to_owned(), |r| r.reason.clone()))
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

    #[test]
    fn probe_entities_land_in_their_partitions() {
        let wanted: Vec<u32> = (0..1000).collect();
        let found = probe_entities(&wanted, 1000).expect("every partition has a probe name");
        assert_eq!(found.len(), 1000);
        for (p, name) in &found {
            assert_eq!(partition_of(name.as_bytes(), 1000), *p, "{name}");
        }
        let some = probe_entities(&[3, 5], 64).expect("found");
        assert_eq!(some.keys().copied().collect::<Vec<_>>(), vec![3, 5]);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&v, 1.0), Some(100.0));
        assert_eq!(percentile(&[4.0], 0.99), Some(4.0));
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 0.5), Some(2.0));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
