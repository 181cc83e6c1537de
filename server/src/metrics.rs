//! This node's Prometheus metrics, served at `GET /metrics` on the HTTP
//! listener (`api/http.rs`). Every name starts with `tally_` and carries
//! its unit.
//!
//! Two kinds:
//! - **Counted where it happens**: events by outcome, query latency by kind
//!   and consistency, every stage of `stages.rs` as a latency histogram
//!   (ingest request, Raft write, fsync, apply …), requests shed, elections
//!   started and leaderships taken. Counters only go up; a rate over them is
//!   what a dashboard shows.
//! - **Read at scrape time**: partitions led, quiesced replicas, queue
//!   depths, apply lag, dedup keys, RocksDB's memtables, L0 files and
//!   pending compaction, process RSS and CPU. The scrape handler sets these
//!   gauges just before encoding ([`Gauges`]), so nothing polls between
//!   scrapes.
//!
//! One process-wide registry, like `stages.rs` and for the same reason: the
//! storage threads and the Raft timers record without a handle threaded
//! through every layer. `prometheus-client` (the Prometheus project's own
//! Rust client) does the text format; nothing here formats by hand.

use std::sync::{LazyLock, Mutex};

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::sync::MutexExt;

/// Outcome of one ingested event, where the client's request arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventOutcome {
    Accepted,
    Duplicate,
    /// A field failed validation; never retryable.
    Invalid,
    /// The partition had no reachable leader or did not commit in time.
    Unavailable,
    /// A dedup index was at its memory bound.
    Exhausted,
    /// Older than the ingest policy allows.
    TooLate,
    /// Further ahead than the ingest policy allows.
    InFuture,
    /// The whole request was refused (too large, cluster not initialised).
    RequestRefused,
}

impl EventOutcome {
    const ALL: [EventOutcome; 8] = [
        EventOutcome::Accepted,
        EventOutcome::Duplicate,
        EventOutcome::Invalid,
        EventOutcome::Unavailable,
        EventOutcome::Exhausted,
        EventOutcome::TooLate,
        EventOutcome::InFuture,
        EventOutcome::RequestRefused,
    ];

    fn labels(self) -> OutcomeLabels {
        let (outcome, reason) = match self {
            EventOutcome::Accepted => ("accepted", ""),
            EventOutcome::Duplicate => ("duplicate", ""),
            EventOutcome::Invalid => ("rejected", "invalid"),
            EventOutcome::Unavailable => ("rejected", "unavailable"),
            EventOutcome::Exhausted => ("rejected", "exhausted"),
            EventOutcome::TooLate => ("rejected", "too_late"),
            EventOutcome::InFuture => ("rejected", "in_future"),
            EventOutcome::RequestRefused => ("rejected", "request_refused"),
        };
        OutcomeLabels { outcome, reason }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct QueryLabels {
    kind: &'static str,
    consistency: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StageLabels {
    stage: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ShedLabels {
    reason: &'static str,
}

/// Latency buckets from 100 µs to ~105 s (doubling): fsyncs at the bottom,
/// a failover's first write at the top.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 21))
}

/// A partition replica's load series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PartitionLabels {
    pub partition: u32,
}

/// Whose CPU share: a partition's processor or its apply.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CpuLabels {
    pub stage: &'static str,
}

/// A float gauge.
pub type GaugeF64 = Gauge<f64, std::sync::atomic::AtomicU64>;

/// Gauges the scrape handler fills in from the node before encoding.
#[derive(Default)]
pub struct Gauges {
    /// Load (`load.rs`) of the partitions this node leads, per partition.
    pub partition_events_per_second: Family<PartitionLabels, GaugeF64>,
    pub partition_bytes_per_second: Family<PartitionLabels, GaugeF64>,
    /// The node's load: sums over its replicas.
    pub load_events_per_second: GaugeF64,
    pub load_bytes_per_second: GaugeF64,
    pub load_cpu: Family<CpuLabels, GaugeF64>,
    pub partitions_led: Gauge,
    pub replicas: Gauge,
    pub quiesced_replicas: Gauge,
    pub max_term: Gauge,
    /// Ingest jobs queued in this node's partition processors.
    pub ingest_queue_depth: Gauge,
    /// Entries in leaders' logs not yet applied, summed over replicas here.
    pub apply_lag_entries: Gauge,
    pub dedup_keys: Gauge,
    pub dedup_max_keys: Gauge,
    pub dedup_bytes: Gauge,
    pub rocksdb_memtable_bytes: Gauge,
    pub rocksdb_l0_files: Gauge,
    pub rocksdb_pending_compaction_bytes: Gauge,
    pub rocksdb_write_stopped: Gauge,
    pub process_resident_memory_bytes: Gauge,
    pub process_cpu_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub peers_up: Gauge,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    events: Family<OutcomeLabels, Counter>,
    queries: Family<QueryLabels, Histogram>,
    stages: Family<StageLabels, Histogram>,
    shed: Family<ShedLabels, Counter>,
    elections: Counter,
    leaderships: Counter,
    /// Client queries answered (the histograms' counts, summed), for
    /// `Cluster.Status` and the dashboard.
    queries_answered: Counter,
    pub gauges: Gauges,
}

/// Counters of this node since it started, as `Cluster.Status` reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeTotals {
    pub events_accepted: u64,
    pub events_duplicate: u64,
    pub events_rejected: u64,
    pub queries: u64,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Metrics {
        let events = Family::<OutcomeLabels, Counter>::default();
        let queries = Family::<QueryLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> Histogram);
        let stages = Family::<StageLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> Histogram);
        let shed = Family::<ShedLabels, Counter>::default();
        let (elections, leaderships) = (Counter::default(), Counter::default());
        let gauges = Gauges::default();
        let mut r = Registry::with_prefix("tally");
        r.register("events", "Events by outcome where the client's request arrived", events.clone());
        r.register_with_unit(
            "query_duration",
            "Stats and Series requests by kind and consistency",
            Unit::Seconds,
            queries.clone(),
        );
        r.register_with_unit(
            "stage_duration",
            "Each stage of the write and read paths (tally cluster stages)",
            Unit::Seconds,
            stages.clone(),
        );
        r.register("requests_shed", "Requests refused early to protect the node", shed.clone());
        r.register("raft_elections_started", "Elections this node's replicas started", elections.clone());
        r.register("raft_leaderships", "Partition leaderships this node took up", leaderships.clone());
        let g = &gauges;
        r.register("raft_partitions_led", "Partitions this node leads", g.partitions_led.clone());
        r.register("raft_replicas", "Partition replicas on this node", g.replicas.clone());
        r.register(
            "raft_quiesced_replicas",
            "Replicas quiesced (no heartbeats, no timers)",
            g.quiesced_replicas.clone(),
        );
        r.register("raft_term_max", "Highest Raft term among this node's replicas", g.max_term.clone());
        r.register("ingest_queue_depth", "Ingest jobs queued in partition processors", g.ingest_queue_depth.clone());
        r.register("apply_lag_entries", "Log entries here not yet applied", g.apply_lag_entries.clone());
        r.register("dedup_keys", "Event ids in this node's dedup indexes", g.dedup_keys.clone());
        r.register("dedup_max_keys", "Bound on dedup keys (--dedup-memory-mib; 0 unbounded)", g.dedup_max_keys.clone());
        r.register_with_unit("dedup", "Estimated memory of the dedup indexes", Unit::Bytes, g.dedup_bytes.clone());
        r.register_with_unit(
            "rocksdb_memtable",
            "RocksDB memtables, all column families",
            Unit::Bytes,
            g.rocksdb_memtable_bytes.clone(),
        );
        r.register("rocksdb_l0_files", "RocksDB files at level 0", g.rocksdb_l0_files.clone());
        r.register_with_unit(
            "rocksdb_pending_compaction",
            "RocksDB's estimate of bytes compaction must rewrite",
            Unit::Bytes,
            g.rocksdb_pending_compaction_bytes.clone(),
        );
        r.register("rocksdb_write_stopped", "1 while RocksDB stops writes", g.rocksdb_write_stopped.clone());
        r.register_with_unit(
            "process_resident_memory",
            "Resident set size of tallyd",
            Unit::Bytes,
            g.process_resident_memory_bytes.clone(),
        );
        r.register_with_unit(
            "process_cpu",
            "CPU time tallyd used, user + system",
            Unit::Seconds,
            g.process_cpu_seconds.clone(),
        );
        r.register("peers_up", "Peers node-level liveness reports up", g.peers_up.clone());
        r.register(
            "partition_events_per_second",
            "Events a partition this node leads takes in, per second (smoothed over ~10 s)",
            g.partition_events_per_second.clone(),
        );
        r.register(
            "partition_bytes_per_second",
            "Event bytes a partition this node leads takes in, per second",
            g.partition_bytes_per_second.clone(),
        );
        r.register(
            "load_events_per_second",
            "Events this node's leaders take in, per second",
            g.load_events_per_second.clone(),
        );
        r.register(
            "load_bytes_per_second",
            "Event bytes this node's leaders take in, per second",
            g.load_bytes_per_second.clone(),
        );
        r.register(
            "load_cpu",
            "Cores this node's partition processors and applies use (smoothed over ~10 s)",
            g.load_cpu.clone(),
        );
        // Series that exist from the start (at 0), so a dashboard or alert
        // never sees "no data" for what simply has not happened yet.
        for outcome in EventOutcome::ALL {
            let _ = events.get_or_create(&outcome.labels());
        }
        for kind in ["stats", "series", "top_k"] {
            for consistency in ["linearizable", "stale"] {
                let _ = queries.get_or_create(&QueryLabels { kind, consistency });
            }
        }
        for reason in ["ingest_slots", "dedup_full"] {
            let _ = shed.get_or_create(&ShedLabels { reason });
        }
        Metrics {
            registry: Mutex::new(r),
            events,
            queries,
            stages,
            shed,
            elections,
            leaderships,
            queries_answered: Counter::default(),
            gauges,
        }
    }

    pub fn events(&self, outcome: EventOutcome, n: u64) {
        if n > 0 {
            self.events.get_or_create(&outcome.labels()).inc_by(n);
        }
    }

    pub fn query(&self, kind: &'static str, consistency: &'static str, seconds: f64) {
        self.queries.get_or_create(&QueryLabels { kind, consistency }).observe(seconds);
        self.queries_answered.inc();
    }

    pub fn totals(&self) -> NodeTotals {
        let count = |outcome: EventOutcome| self.events.get_or_create(&outcome.labels()).get();
        NodeTotals {
            events_accepted: count(EventOutcome::Accepted),
            events_duplicate: count(EventOutcome::Duplicate),
            events_rejected: EventOutcome::ALL
                .into_iter()
                .filter(|o| !matches!(o, EventOutcome::Accepted | EventOutcome::Duplicate))
                .map(count)
                .sum(),
            queries: self.queries_answered.get(),
        }
    }

    pub fn stage(&self, stage: &'static str, seconds: f64) {
        self.stages.get_or_create(&StageLabels { stage }).observe(seconds);
    }

    pub fn shed(&self, reason: &'static str) {
        self.shed.get_or_create(&ShedLabels { reason }).inc();
    }

    pub fn election_started(&self) {
        self.elections.inc();
    }

    pub fn leadership_taken(&self) {
        self.leaderships.inc();
    }

    /// The Prometheus text exposition of everything registered.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        encode(&mut out, &self.registry.lock_unpoisoned())?;
        Ok(out)
    }
}

/// Resident memory and CPU time of this process from `/proc/self` (Linux;
/// elsewhere both stay unknown). `/proc` reports CPU in USER_HZ, which the
/// kernel fixes at 100 per second for every userspace interface.
pub fn process_usage() -> Option<(u64, f64)> {
    const USER_HZ: f64 = 100.0;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let rss_kib: u64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()?;
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at ')'.
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((rss_kib * 1024, (utime + stime) as f64 / USER_HZ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_names_units_and_labels() {
        let m = metrics();
        m.events(EventOutcome::Accepted, 3);
        m.events(EventOutcome::Invalid, 1);
        m.query("stats", "linearizable", 0.002);
        m.stage("log.fsync", 0.0004);
        let text = m.encode().unwrap();
        assert!(text.contains("tally_events_total{outcome=\"accepted\",reason=\"\"}"), "{text}");
        assert!(text.contains("tally_events_total{outcome=\"rejected\",reason=\"invalid\"}"), "{text}");
        assert!(text.contains("tally_query_duration_seconds_bucket{le="), "{text}");
        assert!(text.contains("kind=\"stats\",consistency=\"linearizable\""), "{text}");
        assert!(text.contains("tally_stage_duration_seconds_count{stage=\"log.fsync\"}"), "{text}");
        assert!(text.contains("# UNIT tally_process_resident_memory_bytes bytes"), "{text}");
    }

    #[test]
    fn process_usage_reads_proc() {
        let (rss, cpu) = process_usage().expect("Linux /proc");
        assert!(rss > 1 << 20, "rss {rss}");
        assert!(cpu >= 0.0);
    }
}
