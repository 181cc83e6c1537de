//! `tally bench`: a load generator that also checks the cluster's answers.
//!
//! Workload: `--ids` entities drawn from a Zipf distribution (`--zipf`
//! exponent; 0 is uniform), event types mixed by weight (`--types
//! view=8,like=1`), values 1..=10, and a fraction (`--duplicates`) of sends
//! that re-send an earlier event with its original id, which the cluster
//! must recognise. It runs for `--duration` or `--events`, from
//! `--concurrency` producer tasks sharing one [`TallyClient`], either as
//! fast as the client accepts events or at a fixed `--rate`.
//!
//! Targets: `--target tally` (the default) drives a Tally cluster through
//! [`TallyClient`]; `redis-incr`, `redis-dedup` and `etcd` drive the peers
//! `scripts/bench.sh` compares Tally with (see [`crate::targets`]).
//! Everything but the "send a batch, get acks" step is this module's, the
//! same for every target, so only the system under test differs.
//! `--time-spread` spreads event times uniformly over that much of the
//! past (the comparison uses 2 hours, so events fall into many buckets).
//!
//! Latency is the time from an event's *intended* send time to its
//! acknowledgement. At a fixed rate the intended time comes from the
//! schedule, so when the system stalls, the events that should have been
//! sent meanwhile are charged the stall too: the correction for
//! coordinated omission (as in wrk2), done by construction rather than
//! with HdrHistogram's after-the-fact `record_correct`, because the
//! schedule is known exactly. As fast as possible there is no schedule,
//! and the send call's start is used. Values go into an HDR histogram
//! (microseconds, 3 significant digits).
//!
//! Readers beside the writers (`--target tally` only): `--query-rate`
//! adds linearizable Stats and Series queries on the producers' keys and
//! `--visibility-rate` times how long an acknowledged event takes to show
//! in a stale read on a follower; see [`crate::probes`]. Their
//! entities are not the producers', so verification is unaffected.
//!
//! Verification (Tally and `redis-dedup` only; `redis-incr` does not dedup
//! and `etcd` does not count, so for them it is skipped and the report says
//! why): the bench knows every event it originated and whether any
//! send of it was acknowledged. Afterwards it queries count and sum of every
//! (entity, type) it used and compares them with the acknowledged events.
//! Events that failed after all retries may or may not have been counted,
//! so they widen the accepted range instead of failing the run. Anything
//! outside the range is a mismatch and fails the run (exit status 3).
//! Entities carry a per-run prefix, so earlier runs do not disturb the
//! comparison. Keeping that record costs about 32 bytes per originated
//! event (320 MB for ten million); `--no-verify` does not save it, so size
//! `--events`/`--duration` accordingly.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use futures::stream::{self, FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::distr::weighted::WeightedIndex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use tokio::sync::mpsc;

use tally_client::time_arg::now_ms;
use tally_client::{BatchTicket, ClientConfig, Consistency, Event, IngestSummary, Outcome};

use crate::measure::{latency_histogram, record, LatencyMs};
use crate::probes::{Probes, Workload};
use crate::results::{BenchRun, Mismatch, RunConfig, ServerTotals, Verify};
use crate::targets::{BatchSettings, Target, TargetKind};
use crate::EXIT_MISMATCH;

/// Arguments of `tally bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Events per second in total; 0 = as fast as possible.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// How long to send (ignored when --events is given).
    #[arg(long, default_value = "10s")]
    pub duration: humantime::Duration,
    /// Send exactly this many events (re-sent duplicates included).
    #[arg(long)]
    pub events: Option<u64>,
    /// Number of distinct entity ids.
    #[arg(long, default_value_t = 1000)]
    pub ids: u64,
    /// Zipf exponent of the entity popularity (0 = uniform).
    #[arg(long, default_value_t = 1.0)]
    pub zipf: f64,
    /// Event types and weights, e.g. view=8,like=1,comment=1.
    #[arg(long, default_value = "view=8,like=1,comment=1")]
    pub types: String,
    /// Fraction of sends that re-send an earlier event (same id).
    #[arg(long, default_value_t = 0.05)]
    pub duplicates: f64,
    /// Producer tasks.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Where to write the JSON results.
    #[arg(long, default_value = "tally-bench.json")]
    pub out: PathBuf,
    /// Skip the verification queries.
    #[arg(long)]
    pub no_verify: bool,
    /// Client batch size in events.
    #[arg(long)]
    pub batch_events: Option<usize>,
    /// Client linger before a partial batch is sent.
    #[arg(long)]
    pub linger: Option<humantime::Duration>,
    /// Client buffer (events buffered or in flight).
    #[arg(long)]
    pub buffer: Option<usize>,
    /// Random seed (default: random).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Entity names `PREFIX-N` instead of a random prefix per run, so
    /// successive runs write the same entities (the hot ones stay hot:
    /// `scripts/bench-skew.sh`); event ids then carry a random run tag, so
    /// no run's events are taken for an earlier run's duplicates.
    #[arg(long)]
    pub entity_prefix: Option<String>,
    /// The system to drive: tally (--addr), redis-incr, redis-dedup, etcd.
    #[arg(long, value_enum, default_value = "tally")]
    pub target: TargetKind,
    /// Address(es) of a redis or etcd target, host:port (etcd: comma-separated
    /// members). Default 127.0.0.1:6379 (redis), 127.0.0.1:2379 (etcd).
    #[arg(long)]
    pub target_addr: Option<String>,
    /// Batches in flight at once for redis and etcd targets.
    #[arg(long, default_value_t = 32)]
    pub inflight: usize,
    /// Spread event times uniformly over this much of the past (0 = now).
    #[arg(long, default_value = "0s")]
    pub time_spread: humantime::Duration,
    /// Tally only: queries per second beside the ingest, alternately a
    /// 30-day Stats and a 2-hour minute Series (0 = none).
    #[arg(long, default_value_t = 0.0)]
    pub query_rate: f64,
    /// Tally only: write-to-visible probes per second, each one event whose
    /// visibility on a follower (stale read) is timed (0 = none).
    #[arg(long, default_value_t = 0.0)]
    pub visibility_rate: f64,
    /// Tally only: give each event an actor_id out of this many viewers
    /// (0 = none), for unique counts; a re-sent event keeps its actor.
    #[arg(long, default_value_t = 0)]
    pub actors: u64,
}

/// Parses `view=8,like=1` into names and weights.
pub fn parse_types(spec: &str) -> anyhow::Result<Vec<(String, u32)>> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, weight) = match part.split_once('=') {
            Some((n, w)) => (n.trim(), w.trim().parse::<u32>().with_context(|| format!("weight of {n}"))?),
            None => (part, 1),
        };
        tally_proto::validate::validate_query_key(b"x", name).map_err(|e| anyhow::anyhow!("--types: {e}"))?;
        out.push((name.to_owned(), weight));
    }
    if out.is_empty() || out.iter().all(|(_, w)| *w == 0) {
        bail!("--types needs at least one type with a positive weight");
    }
    Ok(out)
}

/// What the bench sent, one entry per originated event.
#[derive(Debug, Clone, Copy)]
struct Original {
    entity: u64,
    event_type: u16,
    value: i64,
    stored: bool,
    failed: bool,
}

enum Sent {
    New(Original),
    /// Re-send of the producer's original number `n`.
    Again(usize),
}

/// One producer's results.
struct ProducerResult {
    originals: Vec<Original>,
    histogram: Histogram<u64>,
    outcomes: IngestSummary,
    resent: u64,
}

struct Shared {
    target: Target,
    args: BenchArgs,
    types: Vec<(String, u32)>,
    prefix: String,
    /// Before every event id: empty with a per-run prefix, a run tag with
    /// `--entity-prefix`.
    id_tag: String,
    start: Instant,
    deadline: Option<Instant>,
    claimed: AtomicU64,
    acked: AtomicU64,
    stop: AtomicBool,
}

pub(crate) fn entity_name(prefix: &str, entity: u64) -> String {
    format!("{prefix}-{entity}")
}

/// Events a producer hands to the target at once at most. Large enough that
/// the per-batch costs (a ticket, a channel message, a wake-up) vanish per
/// event at saturation; at a fixed rate a chunk is whatever came due.
const CHUNK: usize = 512;

/// An originated event, kept so that a re-send can rebuild it exactly.
#[derive(Debug, Clone, Copy)]
struct Recent {
    n: usize,
    entity: u64,
    event_type: u16,
    time_ms: i64,
    value: i64,
}

/// A well-mixed 64-bit function of `x` (SplitMix64's finaliser): actors
/// spread evenly whatever the event numbers.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Producer `k`'s event number `r.n`: the same bytes every time it is built.
fn build_event(shared: &Shared, k: usize, r: &Recent) -> Event {
    let actor_id = match shared.args.actors {
        0 => Vec::new(),
        actors => format!("viewer-{}", splitmix64(((k as u64) << 40) ^ r.n as u64) % actors).into_bytes(),
    };
    Event {
        actor_id,
        entity_id: entity_name(&shared.prefix, r.entity).into_bytes(),
        event_type: shared.types[usize::from(r.event_type)].0.clone(),
        event_time_ms: r.time_ms,
        event_id: format!("{}{k}-{}", shared.id_tag, r.n).into_bytes(),
        value: Some(r.value),
    }
}

/// One chunk on its way: what each event was and when it was meant to go.
struct SentChunk {
    sent: Vec<Sent>,
    intended: Vec<Instant>,
    ticket: BatchTicket,
}

async fn producer(shared: Arc<Shared>, k: usize, seed: u64) -> anyhow::Result<ProducerResult> {
    let args = &shared.args;
    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(k as u64));
    let zipf = Zipf::new(args.ids as f64, args.zipf).map_err(|e| anyhow::anyhow!("--zipf: {e}"))?;
    let weights = WeightedIndex::new(shared.types.iter().map(|(_, w)| *w)).context("--types weights")?;
    let interval = (args.rate > 0.0).then(|| Duration::from_secs_f64(args.concurrency as f64 / args.rate));
    let offset = interval.map(|i| i.mul_f64(k as f64 / args.concurrency as f64)).unwrap_or_default();
    let spread_ms = i64::try_from(args.time_spread.as_millis()).unwrap_or(i64::MAX);

    // Outcomes are awaited by a collector so sending never waits on them.
    let (tx, mut rx) = mpsc::channel::<SentChunk>(1024);
    let collector_shared = shared.clone();
    let collector = tokio::spawn(async move {
        let mut originals: Vec<Original> = Vec::new();
        let mut histogram = latency_histogram();
        let mut outcomes = IngestSummary::default();
        let mut resent = 0;
        let mut pending = FuturesUnordered::new();
        let mut handle =
            |indexes: Vec<usize>, intended: Vec<Instant>, results: Vec<Outcome>, originals: &mut Vec<Original>| {
                let now = Instant::now();
                collector_shared.acked.fetch_add(results.len() as u64, Ordering::Relaxed);
                for ((index, intended), outcome) in indexes.into_iter().zip(intended).zip(results) {
                    record(&mut histogram, now.saturating_duration_since(intended));
                    outcomes.add(&outcome);
                    if let Some(o) = originals.get_mut(index) {
                        match outcome {
                            o2 if o2.is_stored() => o.stored = true,
                            Outcome::Failed { .. } => o.failed = true,
                            _ => {}
                        }
                    }
                }
            };
        loop {
            tokio::select! {
                next = rx.recv() => match next {
                    Some(chunk) => {
                        let indexes: Vec<usize> = chunk.sent.into_iter().map(|sent| match sent {
                            Sent::New(o) => {
                                originals.push(o);
                                originals.len() - 1
                            }
                            Sent::Again(n) => {
                                resent += 1;
                                n
                            }
                        }).collect();
                        let (intended, ticket) = (chunk.intended, chunk.ticket);
                        pending.push(async move { (indexes, intended, ticket.await) });
                    }
                    None => break,
                },
                Some((indexes, intended, results)) = pending.next() => handle(indexes, intended, results, &mut originals),
            }
        }
        while let Some((indexes, intended, results)) = pending.next().await {
            handle(indexes, intended, results, &mut originals);
        }
        anyhow::Ok(ProducerResult { originals, histogram, outcomes, resent })
    });

    // Recent originals a re-send can pick from: the last few thousand, so
    // re-sends stay well inside the server's dedup window.
    let mut recent: Vec<Recent> = Vec::new();
    const RECENT: usize = 4096;
    let mut originated = 0usize;
    let mut j = 0u64;
    'produce: loop {
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        let now = Instant::now();
        if shared.deadline.is_some_and(|d| now >= d) {
            break;
        }
        // How many events this chunk may hold: a full chunk at saturation,
        // what has come due at a fixed rate (waiting for the next if none).
        let mut room = CHUNK;
        if let Some(interval) = interval {
            let next = shared.start + offset + interval.mul_f64(j as f64);
            if next > now + Duration::from_millis(1) {
                tokio::time::sleep_until(next.into()).await;
            }
            let now = Instant::now();
            let due = (now.saturating_duration_since(shared.start + offset).as_secs_f64() / interval.as_secs_f64())
                .floor() as u64
                + 1;
            room = usize::try_from(due.saturating_sub(j)).unwrap_or(CHUNK).clamp(1, CHUNK);
        }
        if let Some(total) = args.events {
            let claimed = shared.claimed.fetch_add(room as u64, Ordering::Relaxed);
            if claimed >= total {
                break 'produce;
            }
            room = room.min(usize::try_from(total - claimed).unwrap_or(room));
        }
        let mut events = Vec::with_capacity(room);
        let mut sent = Vec::with_capacity(room);
        let mut intended = Vec::with_capacity(room);
        let now_wall = now_ms();
        let now = Instant::now();
        for _ in 0..room {
            intended.push(match interval {
                Some(interval) => shared.start + offset + interval.mul_f64(j as f64),
                None => now,
            });
            j += 1;
            let resend = !recent.is_empty() && rng.random_bool(args.duplicates.clamp(0.0, 1.0));
            if resend {
                let r = recent[rng.random_range(0..recent.len())];
                events.push(build_event(&shared, k, &r));
                sent.push(Sent::Again(r.n));
            } else {
                let r = Recent {
                    n: originated,
                    entity: (zipf.sample(&mut rng) as u64).clamp(1, args.ids) - 1,
                    event_type: weights.sample(&mut rng) as u16,
                    time_ms: if spread_ms > 0 { now_wall - rng.random_range(0..spread_ms) } else { now_wall },
                    value: rng.random_range(1..=10),
                };
                events.push(build_event(&shared, k, &r));
                sent.push(Sent::New(Original {
                    entity: r.entity,
                    event_type: r.event_type,
                    value: r.value,
                    stored: false,
                    failed: false,
                }));
                if recent.len() < RECENT {
                    recent.push(r);
                } else {
                    let slot = rng.random_range(0..RECENT);
                    recent[slot] = r;
                }
                originated += 1;
            }
        }
        let ticket = shared.target.send_batch(events).await?;
        if tx.send(SentChunk { sent, intended, ticket }).await.is_err() {
            break;
        }
    }
    drop(tx);
    collector.await.context("collector")?
}

fn progress(json: bool, args: &BenchArgs) -> ProgressBar {
    if json {
        return ProgressBar::hidden();
    }
    let (len, template) = match args.events {
        Some(n) => (n, "{bar:40} {pos}/{len} events  {msg}"),
        None => (args.duration.as_secs().max(1), "{bar:40} {pos}/{len} s  {msg}"),
    };
    ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr())
        .with_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()))
}

/// Runs `tally bench` against `addr` (Tally's seed nodes, comma-separated;
/// peers use `--target-addr`). With `json`, the report goes to stdout as
/// one document instead of the human summary. Returns the exit status.
pub async fn run(addr: &str, json: bool, args: &BenchArgs) -> anyhow::Result<i32> {
    let seeds: Vec<String> = addr.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect();
    let types = parse_types(&args.types)?;
    if args.concurrency == 0 || args.ids == 0 {
        bail!("--concurrency and --ids must be at least 1");
    }
    if !(args.rate >= 0.0 && args.rate.is_finite()) {
        bail!("--rate must be 0 (as fast as possible) or a positive number");
    }
    for (flag, rate) in [("--query-rate", args.query_rate), ("--visibility-rate", args.visibility_rate)] {
        if !(rate >= 0.0 && rate.is_finite()) {
            bail!("{flag} must be 0 (off) or a positive number");
        }
        if rate > 0.0 && args.target != TargetKind::Tally {
            bail!("{flag} is for --target tally only");
        }
    }
    let mut config = ClientConfig::new(seeds.clone());
    if let Some(n) = args.batch_events {
        config.batch.max_events = n;
    }
    if let Some(l) = args.linger {
        config.batch.linger = *l;
    }
    if let Some(b) = args.buffer {
        config.batch.buffer_events = b;
    }
    // Peers batch like the Tally client: same linger and buffer defaults,
    // their own batch size (etcd caps a transaction at 128 operations).
    let batch = BatchSettings {
        max_events: args.batch_events.unwrap_or(args.target.default_batch()),
        linger: config.batch.linger,
        inflight: args.inflight.max(1),
        buffer_events: config.batch.buffer_events,
    };
    let target_addr = match args.target {
        TargetKind::Tally => addr.to_owned(),
        kind => args.target_addr.clone().unwrap_or_else(|| kind.default_addr().to_owned()),
    };
    let target = Target::connect(args.target, &target_addr, config, batch)
        .await
        .with_context(|| format!("connecting to the {} target at {target_addr}", args.target.name()))?;
    let seed = args.seed.unwrap_or_else(rand::random);
    let (prefix, id_tag) = match &args.entity_prefix {
        Some(fixed) => (fixed.clone(), format!("{:08x}-", rand::random::<u32>())),
        None => (format!("bench-{:08x}", rand::random::<u32>()), String::new()),
    };
    let start = Instant::now();
    let start_ms = now_ms();
    let cpu_at_start = crate::cpu_time::process_cpu_time();
    let shared = Arc::new(Shared {
        target,
        args: clone_args(args),
        types: types.clone(),
        prefix: prefix.clone(),
        id_tag,
        start,
        deadline: if args.events.is_some() { None } else { Some(start + *args.duration) },
        claimed: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });

    // Readers beside the writers (Tally only, checked above).
    let probes = match &shared.target {
        Target::Tally(client) if args.query_rate > 0.0 || args.visibility_rate > 0.0 => {
            let workload =
                Workload { prefix: prefix.clone(), ids: args.ids, zipf: args.zipf, types: types.clone(), seed };
            Some(Probes::start(client, seeds, workload, args.query_rate, args.visibility_rate).await?)
        }
        _ => None,
    };

    let bar = progress(json, args);
    let ticker = {
        let shared = shared.clone();
        let bar = bar.clone();
        tokio::spawn(async move {
            let mut last = (Instant::now(), 0u64);
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let acked = shared.acked.load(Ordering::Relaxed);
                let now = Instant::now();
                let rate = (acked - last.1) as f64 / now.duration_since(last.0).as_secs_f64().max(1e-9);
                last = (now, acked);
                match shared.args.events {
                    Some(_) => bar.set_position(acked),
                    None => bar.set_position(now.duration_since(shared.start).as_secs()),
                }
                bar.set_message(format!("{acked} acked, {rate:.0} ev/s, {} in flight", shared.target.pending()));
            }
        })
    };

    let producers: Vec<_> = (0..args.concurrency).map(|k| tokio::spawn(producer(shared.clone(), k, seed))).collect();
    let mut results = Vec::new();
    for p in producers {
        results.push(p.await.context("producer")??);
    }
    shared.target.flush().await?;
    let elapsed = start.elapsed();
    // The generator's own CPU over the sending phase (probes included,
    // verification not): what each event cost this process.
    let generator_cpu =
        crate::cpu_time::process_cpu_time().zip(cpu_at_start).map(|(end, begin)| end.saturating_sub(begin));
    ticker.abort();
    bar.finish_and_clear();
    let end_ms = now_ms();
    let probes = match probes {
        Some(p) => Some(p.finish().await?),
        None => None,
    };
    let (query_latency_ms, visibility_ms) = probes.map_or((None, None), |p| (p.query_latency_ms, p.visibility_ms));

    let mut histogram = latency_histogram();
    let mut outcomes = IngestSummary::default();
    let mut resent = 0;
    for r in &results {
        histogram.add(&r.histogram).map_err(|e| anyhow::anyhow!("merging histograms: {e}"))?;
        let o = r.outcomes;
        outcomes.accepted += o.accepted;
        outcomes.duplicates += o.duplicates;
        outcomes.rejected += o.rejected;
        outcomes.failed += o.failed;
        resent += r.resent;
    }
    let sent = outcomes.total();
    let verify_skipped = match (&shared.target, args.no_verify) {
        (_, true) => Some("--no-verify"),
        (Target::Tally(_) | Target::RedisDedup(..), false) => None,
        (Target::RedisIncr(_), false) => Some("redis-incr does not dedup: re-sent events are counted again"),
        (Target::Etcd(_), false) => Some("etcd stores events but does not count them"),
    };
    let range = (start_ms - time_spread_ms(args) - 120_000)..(end_ms + 120_000);
    let verify = match verify_skipped {
        Some(_) => None,
        None => Some(verify(&shared.target, &prefix, &types, &results, range).await?),
    };
    let ok = verify.as_ref().is_none_or(|v| v.ok);
    let server_totals = match &shared.target {
        Target::Tally(client) => {
            Some(ServerTotals { accepted: client.totals().accepted(), duplicates: client.totals().duplicates() })
        }
        _ => None,
    };
    let report = BenchRun {
        target: args.target.name().to_owned(),
        target_addr,
        prefix,
        config: RunConfig {
            rate: args.rate,
            duration_s: args.duration.as_secs_f64(),
            events: args.events,
            ids: args.ids,
            zipf: args.zipf,
            types: args.types.clone(),
            duplicates: args.duplicates,
            concurrency: args.concurrency,
            seed,
            time_spread_s: args.time_spread.as_secs_f64(),
            batch_events: batch.max_events,
            inflight: batch.inflight,
            query_rate: args.query_rate,
            visibility_rate: args.visibility_rate,
        },
        elapsed_s: elapsed.as_secs_f64(),
        sent,
        resent_duplicates: resent,
        throughput_eps: sent as f64 / elapsed.as_secs_f64().max(1e-9),
        generator_cpu_s: generator_cpu.map(|c| c.as_secs_f64()),
        generator_cpu_us_per_event: generator_cpu.filter(|_| sent > 0).map(|c| c.as_secs_f64() * 1e6 / sent as f64),
        outcomes,
        server_totals,
        latency_ms: LatencyMs::of(&histogram),
        corrected_for_coordinated_omission: args.rate > 0.0,
        query_latency_ms,
        visibility_ms,
        verify,
        verify_skipped: verify_skipped.map(str::to_owned),
        ok,
    };
    let document = serde_json::to_vec_pretty(&report)?;
    std::fs::write(&args.out, &document).with_context(|| format!("writing {}", args.out.display()))?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_summary(&report);
        println!("results written to {}", args.out.display());
    }
    Ok(if ok { 0 } else { EXIT_MISMATCH })
}

/// The human summary of a run.
fn print_summary(r: &BenchRun) {
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| v.to_string());
    println!(
        "sent {} events ({} re-sent duplicates) in {:.1} s: {:.0} events/s; this generator used {} µs of CPU per event",
        r.sent,
        r.resent_duplicates,
        r.elapsed_s,
        r.throughput_eps,
        r.generator_cpu_us_per_event.map_or("?".into(), |c| format!("{c:.2}"))
    );
    let l = &r.latency_ms;
    println!(
        "ack latency ms: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}{}",
        ms(l.p50),
        ms(l.p90),
        ms(l.p99),
        ms(l.p999),
        ms(l.max),
        if r.corrected_for_coordinated_omission { "  (corrected for coordinated omission)" } else { "" }
    );
    let o = &r.outcomes;
    println!(
        "target {}: outcomes: accepted {}, duplicates {}, rejected {}, failed {}{}",
        r.target,
        o.accepted,
        o.duplicates,
        o.rejected,
        o.failed,
        r.server_totals.map_or(String::new(), |t| format!(
            " (server totals: accepted {}, duplicates {})",
            t.accepted, t.duplicates
        ))
    );
    if let Some(q) = &r.query_latency_ms {
        for (kind, range, k) in [("stats", "30-day range", &q.stats), ("series", "2 h of minute buckets", &q.series)] {
            let l = &k.latency;
            println!(
                "{kind} query latency ms (linearizable, {range}): p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  ({} answered, {} errors)",
                ms(l.p50), ms(l.p90), ms(l.p99), ms(l.p999), ms(l.max), l.count, k.errors
            );
        }
    }
    if let Some(v) = &r.visibility_ms {
        let l = &v.latency;
        println!(
            "ack to visible on a follower (stale read) ms: p50 {}  p90 {}  p99 {}  max {}  ({} probes, {} timeouts, {} errors)",
            ms(l.p50), ms(l.p90), ms(l.p99), ms(l.max), l.count, v.timeouts, v.errors
        );
    }
    if let Some(why) = &r.verify_skipped {
        println!("verify: skipped ({why})");
    }
    if let Some(v) = &r.verify {
        if v.ok {
            println!("verify: {} keys, {} events: every count and sum matches", v.keys, v.expected_events);
        } else {
            let first: Vec<String> = v.mismatches.iter().map(|m| format!("{m:?}")).collect();
            println!("verify: MISMATCH on {} of {} keys: {}", v.mismatched_keys, v.keys, first.join("; "));
        }
    }
}

fn clone_args(a: &BenchArgs) -> BenchArgs {
    BenchArgs {
        rate: a.rate,
        duration: a.duration,
        events: a.events,
        ids: a.ids,
        zipf: a.zipf,
        types: a.types.clone(),
        duplicates: a.duplicates,
        concurrency: a.concurrency,
        out: a.out.clone(),
        no_verify: a.no_verify,
        batch_events: a.batch_events,
        linger: a.linger,
        buffer: a.buffer,
        seed: a.seed,
        entity_prefix: a.entity_prefix.clone(),
        target: a.target,
        target_addr: a.target_addr.clone(),
        inflight: a.inflight,
        time_spread: a.time_spread,
        query_rate: a.query_rate,
        visibility_rate: a.visibility_rate,
        actors: a.actors,
    }
}

fn time_spread_ms(args: &BenchArgs) -> i64 {
    i64::try_from(args.time_spread.as_millis()).unwrap_or(i64::MAX / 4)
}

/// Expected (count, sum) per key and the unknown (failed) range on top.
#[derive(Debug, Default, Clone, Copy)]
struct Expect {
    count: u64,
    sum: i64,
    unknown_count: u64,
    unknown_sum: i64,
}

/// Count and sum of one (entity, type) as the target has it.
async fn count_of(
    target: &Target,
    entity: &str,
    event_type: &str,
    range: std::ops::Range<i64>,
) -> anyhow::Result<(u64, i64)> {
    match target {
        Target::Tally(client) => {
            let s = client.stats(entity, event_type, range, Consistency::Linearizable).await?;
            Ok((s.count, s.sum))
        }
        Target::RedisDedup(_, redis) => redis.count_of(entity, event_type).await,
        Target::RedisIncr(_) | Target::Etcd(_) => bail!("this target cannot be verified"),
    }
}

async fn verify(
    target: &Target,
    prefix: &str,
    types: &[(String, u32)],
    results: &[ProducerResult],
    range: std::ops::Range<i64>,
) -> anyhow::Result<Verify> {
    let mut expected: BTreeMap<(u64, u16), Expect> = BTreeMap::new();
    for r in results {
        for o in &r.originals {
            let e = expected.entry((o.entity, o.event_type)).or_default();
            if o.stored {
                e.count += 1;
                e.sum += o.value;
            } else if o.failed {
                e.unknown_count += 1;
                e.unknown_sum += o.value;
            }
        }
    }
    let checks = stream::iter(expected.iter())
        .map(|(&(entity, t), &e)| {
            let name = entity_name(prefix, entity);
            let event_type = types[t as usize].0.clone();
            let range = range.clone();
            async move {
                let s = count_of(target, &name, &event_type, range).await;
                (name, event_type, e, s)
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let mut mismatches = Vec::new();
    let mut mismatched = 0u64;
    let (mut expected_events, mut counted_events) = (0u64, 0u64);
    for (name, event_type, e, s) in checks {
        let (count, sum) = s.with_context(|| format!("querying {name}/{event_type}"))?;
        expected_events += e.count;
        counted_events += count;
        let count_ok = count >= e.count && count <= e.count + e.unknown_count;
        let sum_ok = sum >= e.sum && sum <= e.sum + e.unknown_sum;
        if !(count_ok && sum_ok) {
            mismatched += 1;
            if mismatches.len() < 10 {
                mismatches.push(Mismatch {
                    entity: name,
                    event_type,
                    expected_count: e.count,
                    unknown_count: e.unknown_count,
                    count,
                    expected_sum: e.sum,
                    sum,
                });
            }
        }
    }
    Ok(Verify {
        ok: mismatched == 0,
        keys: expected.len(),
        expected_events,
        counted_events,
        unknown_events: expected.values().map(|e| e.unknown_count).sum::<u64>(),
        mismatched_keys: mismatched,
        mismatches,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_mix_parsing() {
        let t = parse_types("view=8, like=1,comment").expect("valid");
        assert_eq!(t, vec![("view".into(), 8), ("like".into(), 1), ("comment".into(), 1)]);
        assert!(parse_types("View=1").is_err());
        assert!(parse_types("view=0").is_err());
        assert!(parse_types("").is_err());
        assert!(parse_types("view=x").is_err());
    }
}
