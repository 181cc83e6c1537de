//! What readers see while `tally bench` writes (`--target tally` only):
//! `--query-rate` and `--visibility-rate`.
//!
//! Both are background loads beside the producers, each on its own fixed
//! schedule (the n-th operation is due at `start + n / rate`), so they add
//! a known, steady load whatever the cluster does:
//!
//! * **Queries** alternate a linearizable Stats over the last 30 days and a
//!   linearizable Series of minute buckets over the last 2 hours, for an
//!   (entity, type) drawn exactly as the producers draw theirs (same Zipf
//!   over the same prefixed ids, same type weights), through the bench's
//!   own [`TallyClient`] — what a dashboard beside the writers gets.
//!   Latency runs from the query's *scheduled* time to its answer, like the
//!   ingest histogram: a query that has to wait for a free slot is charged
//!   the wait (no coordinated omission). Stats and Series have separate
//!   histograms since they read very different numbers of buckets.
//! * **Visibility probes** each write one event for a fresh entity
//!   (`{prefix}-vis-{n}`), wait for its ack, then poll a STALE Stats of that
//!   entity every millisecond directly on a follower of its partition
//!   until the event shows. The delay, ack → visible, is how far a
//!   follower's applied state trails the leader's commit: what a reader of
//!   stale (cheap, any-replica) queries must tolerate. The follower is
//!   chosen after the ack, when the ingest answer has told the client who
//!   leads, and the reply's `served_by_node_id` must be that follower: a
//!   read the node forwarded elsewhere does not count as visible there.
//!   Probes use their own client so the bench client's server totals stay
//!   those of the producers' events, and their own entities, which the
//!   bench's verification never queries.
//!
//! Both keep a bounded number of operations in flight; each operation is a
//! spawned task so it progresses while the scheduler sleeps.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;
use rand::distr::weighted::WeightedIndex;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Zipf};
use tally_proto::v1::query_client::QueryClient;
use tally_proto::v1::StatsRequest;
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use crate::measure::{latency_histogram, record, LatencyMs};
use crate::results::{QueryKindLatency, QueryLatency, Visibility as VisibilityReport};

use tally_client::time_arg::now_ms;
use tally_client::{ClientConfig, Consistency, Event, Granularity, TallyClient};

/// Range of the Stats queries: the last 30 days.
const STATS_RANGE_MS: i64 = 30 * 86_400_000;
/// Range of the Series queries: the last 2 hours, in minute buckets.
const SERIES_RANGE_MS: i64 = 2 * 3_600_000;
/// Queries in flight at most; beyond, the scheduler waits (and the wait is
/// charged to the queries that were due meanwhile).
const MAX_QUERIES_IN_FLIGHT: usize = 256;
/// Visibility probes in flight at most.
const MAX_PROBES_IN_FLIGHT: usize = 64;
/// A probe whose event is not visible on the follower by then is a timeout.
const VISIBILITY_TIMEOUT: Duration = Duration::from_secs(10);
/// Time between two stale reads of one probe.
const POLL_INTERVAL: Duration = Duration::from_millis(1);
/// Limit on one stale read (the follower may be slow, not gone).
const POLL_REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// Error messages kept per load, to say what went wrong without flooding.
const ERROR_SAMPLES: usize = 3;

/// How the producers pick entities and types, so the queries read the
/// same keys.
#[derive(Debug, Clone)]
pub(crate) struct Workload {
    /// The run's entity prefix (entities are `{prefix}-{n}`).
    pub prefix: String,
    /// Number of distinct entities.
    pub ids: u64,
    /// Zipf exponent of their popularity.
    pub zipf: f64,
    /// Event types and weights.
    pub types: Vec<(String, u32)>,
    /// Seed of the query generator's random numbers.
    pub seed: u64,
}

/// The background loads of one bench run.
pub(crate) struct Probes {
    stop: watch::Sender<bool>,
    queries: Option<(f64, JoinHandle<anyhow::Result<QueryResults>>)>,
    visibility: Option<(f64, JoinHandle<anyhow::Result<VisibilityResults>>)>,
}

/// The loads' results, `None` for a load that was off.
pub(crate) struct ProbeReport {
    pub query_latency_ms: Option<QueryLatency>,
    pub visibility_ms: Option<VisibilityReport>,
}

impl Probes {
    /// Starts the loads whose rate is positive. `client` is the bench's
    /// client (queries share it); `seeds` connect the probes' own client.
    pub(crate) async fn start(
        client: &TallyClient,
        seeds: Vec<String>,
        workload: Workload,
        query_rate: f64,
        visibility_rate: f64,
    ) -> anyhow::Result<Probes> {
        let (stop, stop_rx) = watch::channel(false);
        let start = Instant::now();
        let queries = if query_rate > 0.0 {
            let task = tokio::spawn(run_queries(client.clone(), workload.clone(), query_rate, start, stop_rx.clone()));
            Some((query_rate, task))
        } else {
            None
        };
        let visibility = if visibility_rate > 0.0 {
            let probe_client = TallyClient::with_config(ClientConfig::new(seeds))
                .await
                .context("connecting the visibility probes' client")?;
            let event_type = workload.types.first().map(|(t, _)| t.clone()).unwrap_or_else(|| "view".into());
            let task = tokio::spawn(run_visibility(
                probe_client,
                workload.prefix,
                event_type,
                visibility_rate,
                start,
                stop_rx,
            ));
            Some((visibility_rate, task))
        } else {
            None
        };
        Ok(Probes { stop, queries, visibility })
    }

    /// Stops scheduling, waits for what is in flight and reports.
    pub(crate) async fn finish(self) -> anyhow::Result<ProbeReport> {
        // Err only when every receiver is gone, i.e. the loads already ended.
        let _ = self.stop.send(true);
        let query_latency_ms = match self.queries {
            Some((rate, task)) => Some(task.await.context("query load")??.report(rate)),
            None => None,
        };
        let visibility_ms = match self.visibility {
            Some((rate, task)) => Some(task.await.context("visibility probes")??.report(rate)),
            None => None,
        };
        Ok(ProbeReport { query_latency_ms, visibility_ms })
    }
}

/// Schedule slot `n` at `rate` per second from `start`.
fn due(start: Instant, rate: f64, n: u64) -> Instant {
    start + Duration::from_secs_f64(n as f64 / rate)
}

/// Waits until `at`, or returns false at once when told to stop.
async fn wait_until(at: Instant, stop: &mut watch::Receiver<bool>) -> bool {
    if *stop.borrow() {
        return false;
    }
    tokio::select! {
        _ = tokio::time::sleep_until(at.into()) => true,
        // A closed channel means the bench is gone: stop too.
        _ = stop.changed() => false,
    }
}

#[derive(Debug, Clone, Copy)]
enum QueryKind {
    Stats,
    Series,
}

/// Latencies and failures of one kind of query.
struct QueryStats {
    latency: Histogram<u64>,
    errors: u64,
    error_samples: Vec<String>,
}

impl QueryStats {
    fn new() -> QueryStats {
        QueryStats { latency: latency_histogram(), errors: 0, error_samples: Vec::new() }
    }

    fn add(&mut self, result: Result<Duration, String>) {
        match result {
            Ok(d) => record(&mut self.latency, d),
            Err(e) => {
                self.errors += 1;
                if self.error_samples.len() < ERROR_SAMPLES {
                    self.error_samples.push(e);
                }
            }
        }
    }

    fn report(&self) -> QueryKindLatency {
        QueryKindLatency {
            latency: LatencyMs::of(&self.latency),
            errors: self.errors,
            error_samples: self.error_samples.clone(),
        }
    }
}

struct QueryResults {
    stats: QueryStats,
    series: QueryStats,
}

impl QueryResults {
    fn report(&self, rate: f64) -> QueryLatency {
        QueryLatency { rate, stats: self.stats.report(), series: self.series.report() }
    }

    fn add(&mut self, (kind, result): (QueryKind, Result<Duration, String>)) {
        match kind {
            QueryKind::Stats => self.stats.add(result),
            QueryKind::Series => self.series.add(result),
        }
    }
}

async fn run_queries(
    client: TallyClient,
    workload: Workload,
    rate: f64,
    start: Instant,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<QueryResults> {
    // Its own seed, so adding queries does not change what producers send.
    let mut rng = StdRng::seed_from_u64(workload.seed ^ 0x5155_4552_5953);
    let zipf = Zipf::new(workload.ids as f64, workload.zipf).map_err(|e| anyhow::anyhow!("--zipf: {e}"))?;
    let weights = WeightedIndex::new(workload.types.iter().map(|(_, w)| *w)).context("--types weights")?;
    let mut results = QueryResults { stats: QueryStats::new(), series: QueryStats::new() };
    let mut in_flight = FuturesUnordered::new();
    'schedule: for n in 0u64.. {
        let at = due(start, rate, n);
        // Collect answers while waiting for the next slot (and for room).
        while in_flight.len() >= MAX_QUERIES_IN_FLIGHT || at > Instant::now() {
            tokio::select! {
                Some(done) = in_flight.next() => results.add(flatten(done, QueryKind::Stats)),
                go = wait_until(at, &mut stop), if in_flight.len() < MAX_QUERIES_IN_FLIGHT => {
                    if !go { break 'schedule; }
                },
            }
        }
        if *stop.borrow() {
            break;
        }
        let kind = if n % 2 == 0 { QueryKind::Stats } else { QueryKind::Series };
        let entity = (zipf.sample(&mut rng) as u64).clamp(1, workload.ids) - 1;
        let entity = crate::generator::entity_name(&workload.prefix, entity);
        let event_type = workload.types[weights.sample(&mut rng)].0.clone();
        let client = client.clone();
        in_flight.push(tokio::spawn(async move { (kind, query(&client, kind, &entity, &event_type, at).await) }));
    }
    while let Some(done) = in_flight.next().await {
        results.add(flatten(done, QueryKind::Stats));
    }
    Ok(results)
}

/// A task's result, or its panic as an error of `fallback` kind.
fn flatten(
    joined: Result<(QueryKind, Result<Duration, String>), tokio::task::JoinError>,
    fallback: QueryKind,
) -> (QueryKind, Result<Duration, String>) {
    joined.unwrap_or_else(|e| (fallback, Err(format!("query task: {e}"))))
}

/// One query; its latency from the scheduled time `intended`.
async fn query(
    client: &TallyClient,
    kind: QueryKind,
    entity: &str,
    event_type: &str,
    intended: Instant,
) -> Result<Duration, String> {
    let now = now_ms();
    let result = match kind {
        QueryKind::Stats => {
            client.stats(entity, event_type, now - STATS_RANGE_MS..now, Consistency::Linearizable).await.map(|_| ())
        }
        QueryKind::Series => client
            .series(entity, event_type, now - SERIES_RANGE_MS..now, Granularity::Minute, Consistency::Linearizable)
            .await
            .map(|_| ()),
    };
    result.map(|()| intended.elapsed()).map_err(|e| format!("{kind:?} {entity}/{event_type}: {e}"))
}

/// How one visibility probe ended.
enum Visibility {
    Visible(Duration),
    TimedOut,
    Failed(String),
}

struct VisibilityResults {
    delay: Histogram<u64>,
    timeouts: u64,
    errors: u64,
    error_samples: Vec<String>,
}

impl VisibilityResults {
    fn add(&mut self, v: Visibility) {
        match v {
            Visibility::Visible(d) => record(&mut self.delay, d),
            Visibility::TimedOut => self.timeouts += 1,
            Visibility::Failed(e) => {
                self.errors += 1;
                if self.error_samples.len() < ERROR_SAMPLES {
                    self.error_samples.push(e);
                }
            }
        }
    }

    fn report(&self, rate: f64) -> VisibilityReport {
        VisibilityReport {
            latency: LatencyMs::of(&self.delay),
            rate,
            timeouts: self.timeouts,
            timeout_s: VISIBILITY_TIMEOUT.as_secs_f64(),
            errors: self.errors,
            error_samples: self.error_samples.clone(),
        }
    }
}

/// Query stubs of the nodes probes read from, connected on first use and
/// shared (a tonic channel multiplexes).
#[derive(Default)]
struct Readers(Mutex<HashMap<String, Channel>>);

impl Readers {
    async fn get(&self, addr: &str) -> Result<QueryClient<Channel>, String> {
        let mut channels = self.0.lock().await;
        if let Some(c) = channels.get(addr) {
            return Ok(QueryClient::new(c.clone()));
        }
        let channel = tally_client::connect(addr).await.map_err(|e| format!("connecting to {addr}: {e}"))?;
        channels.insert(addr.to_owned(), channel.clone());
        Ok(QueryClient::new(channel))
    }
}

async fn run_visibility(
    client: TallyClient,
    prefix: String,
    event_type: String,
    rate: f64,
    start: Instant,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<VisibilityResults> {
    let readers = Arc::new(Readers::default());
    let mut results =
        VisibilityResults { delay: latency_histogram(), timeouts: 0, errors: 0, error_samples: Vec::new() };
    let mut in_flight = FuturesUnordered::new();
    let join = |r: Result<Visibility, tokio::task::JoinError>| {
        r.unwrap_or_else(|e| Visibility::Failed(format!("probe task: {e}")))
    };
    'schedule: for n in 0u64.. {
        let at = due(start, rate, n);
        while in_flight.len() >= MAX_PROBES_IN_FLIGHT || at > Instant::now() {
            tokio::select! {
                Some(done) = in_flight.next() => results.add(join(done)),
                go = wait_until(at, &mut stop), if in_flight.len() < MAX_PROBES_IN_FLIGHT => {
                    if !go { break 'schedule; }
                },
            }
        }
        if *stop.borrow() {
            break;
        }
        let entity = format!("{prefix}-vis-{n}");
        let (client, readers, event_type) = (client.clone(), readers.clone(), event_type.clone());
        in_flight.push(tokio::spawn(async move { probe(&client, &readers, entity, event_type, n).await }));
    }
    while let Some(done) = in_flight.next().await {
        results.add(join(done));
    }
    Ok(results)
}

/// Writes one event for `entity`, then polls a follower until it sees it.
async fn probe(client: &TallyClient, readers: &Readers, entity: String, event_type: String, n: u64) -> Visibility {
    let event_time_ms = now_ms();
    let event = Event {
        actor_id: Vec::new(),
        entity_id: entity.clone().into_bytes(),
        event_type: event_type.clone(),
        event_time_ms,
        event_id: Vec::new(), // the client assigns a unique one
        value: Some(1),
    };
    let ticket = match client.send(event).await {
        Ok(t) => t,
        Err(e) => return Visibility::Failed(format!("sending {entity}: {e}")),
    };
    let outcome = ticket.await;
    let acked = Instant::now();
    if !outcome.is_stored() {
        return Visibility::Failed(format!("{entity} not acknowledged: {outcome:?}"));
    }
    // The ack's leader hint has just updated the map: its leader is current.
    let map = client.partition_map();
    let partition = map.partition_of(entity.as_bytes());
    let Some(route) = map.partitions().get(partition as usize) else {
        return Visibility::Failed(format!("partition {partition} of {entity} is not in the map"));
    };
    if route.leader == 0 {
        return Visibility::Failed(format!("partition {partition}: leader unknown, no follower to read from"));
    }
    let followers: Vec<u64> = route.replicas.iter().copied().filter(|r| *r != route.leader).collect();
    // Rotate over the followers so every one is measured.
    let Some(&follower) = followers.get((n % followers.len().max(1) as u64) as usize) else {
        return Visibility::Failed(format!("partition {partition} has no follower"));
    };
    let Some(addr) = map.addr_of(follower) else {
        return Visibility::Failed(format!("address of node {follower} unknown"));
    };
    let mut reader = match readers.get(addr).await {
        Ok(r) => r,
        Err(e) => return Visibility::Failed(e),
    };
    let request = StatsRequest {
        entity_id: entity.into_bytes(),
        event_type,
        from_ms: event_time_ms - 60_000,
        to_ms: event_time_ms + 60_000,
        consistency: Consistency::Stale as i32,
        share_partition_plus_one: 0,
    };
    while acked.elapsed() < VISIBILITY_TIMEOUT {
        let mut r = tonic::Request::new(request.clone());
        r.set_timeout(POLL_REQUEST_TIMEOUT);
        // Errors (the follower busy or restarting) are polled through until
        // the timeout: the question is when the event becomes visible.
        if let Ok(Ok(answer)) = tokio::time::timeout(POLL_REQUEST_TIMEOUT, reader.stats(r)).await {
            let answer = answer.into_inner();
            if answer.served_by_node_id == follower && answer.count >= 1 {
                return Visibility::Visible(acked.elapsed());
            }
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    Visibility::TimedOut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_is_fixed_by_rate() {
        let t = Instant::now();
        assert_eq!(due(t, 50.0, 0), t);
        assert_eq!(due(t, 50.0, 50), t + Duration::from_secs(1));
        assert_eq!(due(t, 4.0, 3), t + Duration::from_millis(750));
    }

    #[test]
    fn query_errors_are_counted_and_sampled() {
        let mut q = QueryStats::new();
        q.add(Ok(Duration::from_millis(2)));
        for i in 0..5 {
            q.add(Err(format!("e{i}")));
        }
        let r = q.report();
        assert_eq!(r.latency.count, 1);
        assert_eq!(r.errors, 5);
        assert_eq!(r.error_samples.len(), ERROR_SAMPLES);
    }
}
