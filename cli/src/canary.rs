//! `tally canary`: a standing end-to-end check. It writes known events at a
//! steady rate — one canary entity per partition, so every partition's
//! leader, log and apply path is exercised — and checks, continuously:
//!
//! * **exactness**: a linearizable Stats of each canary entity must equal
//!   the events acknowledged to it (or lie between acknowledged and
//!   attempted while some outcome is unknown); anything else is a wrong
//!   count, logged with the partition and counted;
//! * **visibility**: for every acknowledged event, how long until a STALE
//!   read through each node shows it (a replica lagging behind its leader
//!   shows here first).
//!
//! Results go to stdout (a line every `--report-every`, and a summary at
//! the end) and, with `--metrics-listen`, to Prometheus text at
//! `/metrics`, so operators can alert on `tally_canary_wrong_counts_total`
//! and on the visibility histogram. Exit code 1 when a wrong count was seen.
//!
//! Canary events are of type `canary` with ids `canary-RUN-N`: a new random
//! RUN per start, so runs never collide in the dedup window (`--run-id`
//! reuses one, which only the canary's own test wants: a rerun's events are
//! then duplicates, acknowledged but not counted again, and the canary must
//! call that out). Counts are read over the run's own time range, so old
//! runs' events do not matter.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde_json::json;
use tally_client::{Consistency, Outcome, TallyClient};
use tally_proto::v1::query_client::QueryClient;
use tally_proto::v1::{Event, StatsRequest};

use crate::{print_json, Cli};

const EVENT_TYPE: &str = "canary";

#[derive(Debug, Clone, Args)]
pub struct CanaryArgs {
    /// Events per second, spread over every partition.
    #[arg(long, default_value_t = 10)]
    rate: u32,
    /// Stop after this long (and print a summary); runs until killed when
    /// not given.
    #[arg(long)]
    duration: Option<humantime::Duration>,
    /// Serve Prometheus text at http://ADDR/metrics.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// How often every node is read (stale) and every partition checked.
    #[arg(long, default_value = "200ms")]
    check_every: humantime::Duration,
    /// A progress line this often.
    #[arg(long, default_value = "10s")]
    report_every: humantime::Duration,
    /// Reuse a run id instead of a random one (tests of the canary only).
    #[arg(long, hide = true)]
    run_id: Option<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabel {
    node: String,
}

/// What the canary exports.
struct Metrics {
    events: Family<OutcomeLabel, Counter>,
    write_seconds: Histogram,
    visible_seconds: Family<NodeLabel, Histogram>,
    checks: Family<OutcomeLabel, Counter>,
    wrong_counts: Counter,
    last_ok: Gauge,
}

impl Metrics {
    fn register() -> (Arc<Metrics>, Registry) {
        let metrics = Arc::new(Metrics {
            events: Family::default(),
            write_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            visible_seconds: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 16))),
            checks: Family::default(),
            wrong_counts: Counter::default(),
            last_ok: Gauge::default(),
        });
        let mut registry = Registry::with_prefix("tally_canary");
        registry.register("events", "Canary events by outcome (acked, failed)", metrics.events.clone());
        registry.register(
            "write_seconds",
            "Send to acknowledgement of one canary event",
            metrics.write_seconds.clone(),
        );
        registry.register(
            "visible_seconds",
            "Acknowledgement to visible in a STALE read through each node",
            metrics.visible_seconds.clone(),
        );
        registry.register("checks", "Exactness checks by result (ok, wrong, error)", metrics.checks.clone());
        registry.register(
            "wrong_counts",
            "Checks where a partition's count disagreed with what was acknowledged",
            metrics.wrong_counts.clone(),
        );
        registry.register(
            "last_ok_timestamp_seconds",
            "When every partition last checked exact (unix seconds)",
            metrics.last_ok.clone(),
        );
        (metrics, registry)
    }
}

/// One partition's canary entity and what was sent to it.
#[derive(Default)]
struct Lane {
    entity: Vec<u8>,
    acked: u64,
    /// Sent but not acknowledged (in flight, or failed: maybe counted).
    uncertain: u64,
    /// Acknowledgement times of events not yet seen by every node, with
    /// the acked count each made.
    unseen: VecDeque<(u64, Instant)>,
    /// Per node, the count its last stale read showed.
    seen: BTreeMap<u64, u64>,
}

struct Shared {
    lanes: Mutex<Vec<Lane>>,
    stop: AtomicBool,
    wrong: Mutex<Vec<String>>,
    /// The last read error, printed once when it changes.
    last_error: Mutex<String>,
}

/// Read errors are expected during failovers; each new kind is printed.
fn note_error(shared: &Shared, error: String) {
    let Ok(mut last) = shared.last_error.lock() else { return };
    if *last != error {
        eprintln!("canary: {error}");
        *last = error;
    }
}

pub async fn run(cli: &Cli, args: &CanaryArgs) -> anyhow::Result<i32> {
    let client = crate::client(cli).await?;
    let status = client.cluster_status().await.context("reading the cluster's shape")?;
    let partitions = status.map.partition_count();
    anyhow::ensure!(partitions > 0, "the cluster is not initialised");
    let nodes: Vec<(u64, String)> = status.map.nodes().map(|(id, addr)| (id, addr.to_owned())).collect();
    let run_id = args.run_id.clone().unwrap_or_else(|| format!("{:016x}", rand_u64()));
    let lanes = canary_entities(&run_id, &status.map.routing())
        .into_iter()
        .map(|entity| Lane { entity, seen: nodes.iter().map(|(id, _)| (*id, 0)).collect(), ..Lane::default() })
        .collect::<Vec<_>>();
    // The run's events, and none of an earlier run's: from a minute
    // before the start (clocks differ), to a little ahead of each check.
    let from_ms = tally_client::time_arg::now_ms() - 60_000;
    let shared = Arc::new(Shared {
        lanes: Mutex::new(lanes),
        stop: AtomicBool::new(false),
        wrong: Mutex::default(),
        last_error: Mutex::default(),
    });
    let (metrics, registry) = Metrics::register();
    if let Some(addr) = args.metrics_listen {
        serve_metrics(addr, registry).await?;
    }
    if !cli.json {
        println!(
            "canary run {run_id}: {} events/s over {partitions} partitions, {} nodes{}",
            args.rate,
            nodes.len(),
            args.metrics_listen.map(|a| format!(", metrics at http://{a}/metrics")).unwrap_or_default()
        );
    }
    let mut readers = Vec::new();
    for (id, addr) in &nodes {
        let channel = cli.connect_node(addr).await.with_context(|| format!("connecting to node {id} at {addr}"))?;
        readers.push((*id, QueryClient::new(channel)));
    }
    let checker =
        tokio::spawn(check_loop(client.clone(), readers, shared.clone(), metrics.clone(), from_ms, *args.check_every));
    let writer = tokio::spawn(write_loop(client.clone(), shared.clone(), metrics.clone(), run_id.clone(), args.rate));
    let deadline = args.duration.map(|d| Instant::now() + *d);
    let mut report = tokio::time::interval(*args.report_every);
    report.tick().await;
    loop {
        tokio::select! {
            _ = report.tick() => if !cli.json { print_progress(&shared, &metrics) },
            _ = tokio::time::sleep_until(deadline.map_or_else(far_future, tokio::time::Instant::from_std)) => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    shared.stop.store(true, Ordering::Relaxed);
    let _ = writer.await;
    // A last check once every outcome is in.
    let _ = checker.await;
    let wrong = shared.wrong.lock().map(|w| w.clone()).unwrap_or_default();
    let (acked, failed) = (events(&metrics, "acked"), events(&metrics, "failed"));
    if cli.json {
        print_json(&json!({
            "run_id": run_id, "acked": acked, "failed": failed,
            "checks_ok": metrics.checks.get_or_create(&OutcomeLabel { outcome: "ok" }).get(),
            "wrong_counts": wrong.len(), "wrong": wrong,
        }));
    } else {
        print_progress(&shared, &metrics);
        for w in &wrong {
            println!("WRONG: {w}");
        }
    }
    Ok(if wrong.is_empty() { 0 } else { 1 })
}

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(100 * 365 * 86_400)
}

fn events(metrics: &Metrics, outcome: &'static str) -> u64 {
    metrics.events.get_or_create(&OutcomeLabel { outcome }).get()
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish()
}

/// One entity per partition: the first `canary-RUN-pP-N` that hashes there.
fn canary_entities(run_id: &str, routing: &tally_proto::routing::Routing) -> Vec<Vec<u8>> {
    (0..routing.partition_count())
        .map(|p| {
            (0u64..)
                .map(|n| format!("canary-{run_id}-p{p}-{n}").into_bytes())
                .find(|e| routing.home_of(e) == p)
                .unwrap_or_default()
        })
        .collect()
}

/// Sends `rate` events a second, partitions in turn, each awaited on its
/// own task so one slow partition does not hold the others.
async fn write_loop(client: TallyClient, shared: Arc<Shared>, metrics: Arc<Metrics>, run_id: String, rate: u32) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut in_flight = tokio::task::JoinSet::new();
    let mut seq = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let lane_count = shared.lanes.lock().map(|l| l.len()).unwrap_or(1).max(1);
        let lane = (seq % lane_count as u64) as usize;
        let entity = {
            let Ok(mut lanes) = shared.lanes.lock() else { return };
            let Some(l) = lanes.get_mut(lane) else { return };
            l.uncertain += 1;
            l.entity.clone()
        };
        let event = Event {
            actor_id: Vec::new(),
            entity_id: entity,
            event_type: EVENT_TYPE.into(),
            event_time_ms: tally_client::time_arg::now_ms(),
            event_id: format!("canary-{run_id}-{seq}").into_bytes(),
            value: Some(1),
        };
        seq += 1;
        let (client, shared, metrics) = (client.clone(), shared.clone(), metrics.clone());
        in_flight.spawn(async move {
            let sent = Instant::now();
            let outcome = match client.send(event).await {
                Ok(ticket) => ticket.await,
                Err(e) => Outcome::Failed { error: e.to_string(), attempts: 0 },
            };
            let Ok(mut lanes) = shared.lanes.lock() else { return };
            let Some(l) = lanes.get_mut(lane) else { return };
            match outcome {
                Outcome::Accepted | Outcome::Duplicate => {
                    metrics.write_seconds.observe(sent.elapsed().as_secs_f64());
                    metrics.events.get_or_create(&OutcomeLabel { outcome: "acked" }).inc();
                    l.uncertain -= 1;
                    l.acked += 1;
                    let acked = l.acked;
                    l.unseen.push_back((acked, Instant::now()));
                }
                // Failed: maybe counted, so it stays uncertain for good.
                _ => {
                    metrics.events.get_or_create(&OutcomeLabel { outcome: "failed" }).inc();
                }
            }
        });
        while in_flight.try_join_next().is_some() {}
    }
    while in_flight.join_next().await.is_some() {}
}

type Reader = (u64, QueryClient<tally_client::TokenChannel>);

/// Every `every`: a stale read of each lane through each node (visibility),
/// then a linearizable read of each lane (exactness). Runs once more after
/// the writer stopped.
async fn check_loop(
    client: TallyClient,
    mut readers: Vec<Reader>,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    from_ms: i64,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let last = shared.stop.load(Ordering::Relaxed);
        let range = from_ms..tally_client::time_arg::now_ms() + 10 * 60_000;
        let entities: Vec<Vec<u8>> =
            shared.lanes.lock().map(|l| l.iter().map(|l| l.entity.clone()).collect()).unwrap_or_default();
        for (node, reader) in readers.iter_mut() {
            for (lane, entity) in entities.iter().enumerate() {
                let request = StatsRequest {
                    share_partition_plus_one: 0,
                    entity_id: entity.clone(),
                    event_type: EVENT_TYPE.into(),
                    from_ms: range.start,
                    to_ms: range.end,
                    consistency: Consistency::Stale as i32,
                };
                let reply = match reader.stats(request).await {
                    Ok(reply) => reply,
                    Err(e) => {
                        note_error(&shared, format!("stale read through node {node}: {}", e.message()));
                        continue;
                    }
                };
                observe_visible(&shared, &metrics, lane, *node, reply.into_inner().count);
            }
        }
        check_exact(&client, &shared, &metrics, &entities, &range).await;
        if last {
            return;
        }
    }
}

/// Node `node` showed `count` events of lane `lane`: every acknowledged
/// event up to it is visible there now.
fn observe_visible(shared: &Shared, metrics: &Metrics, lane: usize, node: u64, count: u64) {
    let Ok(mut lanes) = shared.lanes.lock() else { return };
    let Some(l) = lanes.get_mut(lane) else { return };
    let before = l.seen.get(&node).copied().unwrap_or(0);
    if count <= before {
        return;
    }
    l.seen.insert(node, count);
    let label = NodeLabel { node: node.to_string() };
    for (_, at) in l.unseen.iter().filter(|(acked, _)| *acked > before && *acked <= count) {
        metrics.visible_seconds.get_or_create(&label).observe(at.elapsed().as_secs_f64());
    }
    // Drop what every node has seen.
    let everywhere = l.seen.values().copied().min().unwrap_or(0);
    while l.unseen.front().is_some_and(|(acked, _)| *acked <= everywhere) {
        l.unseen.pop_front();
    }
}

/// The linearizable count of each lane against what was acknowledged.
async fn check_exact(
    client: &TallyClient,
    shared: &Shared,
    metrics: &Metrics,
    entities: &[Vec<u8>],
    range: &std::ops::Range<i64>,
) {
    let mut all_ok = true;
    for (lane, entity) in entities.iter().enumerate() {
        // Bounds taken before the read: an event acknowledged meanwhile may
        // or may not be in it, so it widens the upper bound only.
        let (low, high_before) = match shared.lanes.lock() {
            Ok(l) => l.get(lane).map_or((0, 0), |l| (l.acked, l.acked + l.uncertain)),
            Err(_) => return,
        };
        let count = match client.stats(entity, EVENT_TYPE, range.clone(), Consistency::Linearizable).await {
            Ok(reply) => reply.count,
            Err(e) => {
                note_error(shared, format!("linearizable read: {e}"));
                metrics.checks.get_or_create(&OutcomeLabel { outcome: "error" }).inc();
                all_ok = false;
                continue;
            }
        };
        let high = shared.lanes.lock().map_or(high_before, |l| l.get(lane).map_or(0, |l| l.acked + l.uncertain));
        if count < low || count > high.max(high_before) {
            all_ok = false;
            metrics.checks.get_or_create(&OutcomeLabel { outcome: "wrong" }).inc();
            metrics.wrong_counts.inc();
            let what = format!(
                "partition of {}: count {count}, but {low} acknowledged and at most {} sent",
                String::from_utf8_lossy(entity),
                high.max(high_before)
            );
            eprintln!("canary: WRONG {what}");
            if let Ok(mut wrong) = shared.wrong.lock() {
                wrong.push(what);
            }
        } else {
            metrics.checks.get_or_create(&OutcomeLabel { outcome: "ok" }).inc();
        }
    }
    if all_ok {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        metrics.last_ok.set(i64::try_from(now).unwrap_or(i64::MAX));
    }
}

fn print_progress(shared: &Shared, metrics: &Metrics) {
    let wrong = shared.wrong.lock().map_or(0, |w| w.len());
    println!(
        "canary: {} acked, {} failed, {} checks ok, {wrong} wrong",
        events(metrics, "acked"),
        events(metrics, "failed"),
        metrics.checks.get_or_create(&OutcomeLabel { outcome: "ok" }).get()
    );
}

/// `/metrics` on its own small server, for the life of the process.
async fn serve_metrics(addr: std::net::SocketAddr, registry: Registry) -> anyhow::Result<()> {
    let registry = Arc::new(registry);
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                let mut text = String::new();
                match prometheus_client::encoding::text::encode(&mut text, &registry) {
                    Ok(()) => (axum::http::StatusCode::OK, text),
                    Err(e) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("--metrics-listen {addr}"))?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("canary: metrics server stopped: {e}");
        }
    });
    Ok(())
}
