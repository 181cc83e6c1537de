//! How busy each partition replica is: events and bytes its leader's
//! processor took in, and the time its processor and its apply spent —
//! what `Cluster.Status` reports per partition and per node (`tally cluster
//! status --hot`) and `/metrics` exports, so a hot partition or node shows.
//!
//! Counters only on the hot paths (relaxed atomic adds, one per proposal or
//! apply round, never per event); rates are computed when someone asks,
//! over the time since the previous question, smoothed with a 10-second
//! time constant — no task polls 10,000 replicas when nobody looks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::hot_entity::HotEntities;
use crate::sync::MutexExt;

/// Smoothing time constant of the rates.
const TIME_CONSTANT: Duration = Duration::from_secs(10);
/// Rates are recomputed at most this often (answers in between reuse them).
const MIN_INTERVAL: Duration = Duration::from_millis(500);

/// One replica's load counters.
#[derive(Debug)]
pub struct PartitionLoad {
    events: AtomicU64,
    bytes: AtomicU64,
    process_ns: AtomicU64,
    apply_ns: AtomicU64,
    rates: Mutex<Sampled>,
    /// The hottest entity among the events the leader's processor took.
    pub hot: HotEntities,
}

#[derive(Debug)]
struct Sampled {
    /// The previous question (at first: when the replica opened, at zero).
    last: (Instant, [u64; 4]),
    rates: LoadRates,
}

impl Default for PartitionLoad {
    fn default() -> Self {
        PartitionLoad {
            events: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            process_ns: AtomicU64::new(0),
            apply_ns: AtomicU64::new(0),
            rates: Mutex::new(Sampled { last: (Instant::now(), [0; 4]), rates: LoadRates::default() }),
            hot: HotEntities::default(),
        }
    }
}

/// Per second, smoothed: events and bytes taken in by the leader's
/// processor, and the share of one core its processor and its apply used.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LoadRates {
    pub events_per_sec: f64,
    pub bytes_per_sec: f64,
    pub processor_cpu: f64,
    pub apply_cpu: f64,
}

impl LoadRates {
    pub fn add(self, other: LoadRates) -> LoadRates {
        LoadRates {
            events_per_sec: self.events_per_sec + other.events_per_sec,
            bytes_per_sec: self.bytes_per_sec + other.bytes_per_sec,
            processor_cpu: self.processor_cpu + other.processor_cpu,
            apply_cpu: self.apply_cpu + other.apply_cpu,
        }
    }
}

impl PartitionLoad {
    /// A proposal of `events` events (`bytes` as they arrived) built in `took`.
    pub fn proposed(&self, events: u64, bytes: u64, took: Duration) {
        self.events.fetch_add(events, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.process_ns.fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }

    /// An apply round that took `took` of a core.
    pub fn applied(&self, took: Duration) {
        self.apply_ns.fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }

    /// The smoothed rates now.
    pub fn rates(&self) -> LoadRates {
        let now = Instant::now();
        let counters = [&self.events, &self.bytes, &self.process_ns, &self.apply_ns].map(|c| c.load(Ordering::Relaxed));
        let mut sampled = self.rates.lock_unpoisoned();
        let (at, before) = sampled.last;
        let elapsed = now.duration_since(at);
        if elapsed < MIN_INTERVAL {
            return sampled.rates;
        }
        let secs = elapsed.as_secs_f64();
        let per_sec = |i: usize| counters[i].saturating_sub(before[i]) as f64 / secs;
        let fresh = LoadRates {
            events_per_sec: per_sec(0),
            bytes_per_sec: per_sec(1),
            processor_cpu: per_sec(2) / 1e9,
            apply_cpu: per_sec(3) / 1e9,
        };
        // Exponential smoothing by elapsed time: a long gap since the last
        // question weighs the fresh average (over that gap) almost fully.
        let weight = 1.0 - (-secs / TIME_CONSTANT.as_secs_f64()).exp();
        let old = sampled.rates;
        let blend = |o: f64, f: f64| o + weight * (f - o);
        sampled.rates = LoadRates {
            events_per_sec: blend(old.events_per_sec, fresh.events_per_sec),
            bytes_per_sec: blend(old.bytes_per_sec, fresh.bytes_per_sec),
            processor_cpu: blend(old.processor_cpu, fresh.processor_cpu),
            apply_cpu: blend(old.apply_cpu, fresh.apply_cpu),
        };
        sampled.last = (now, counters);
        sampled.rates
    }
}

/// The CPU the whole process uses, in cores, smoothed like the rates.
#[derive(Debug)]
pub struct ProcessCpu {
    /// (previous question: when, CPU seconds then; cores then). At first:
    /// when the node started, with the CPU used until then.
    sampled: Mutex<((Instant, f64), f64)>,
}

impl Default for ProcessCpu {
    fn default() -> Self {
        let used = crate::metrics::process_usage().map_or(0.0, |(_, cpu)| cpu);
        ProcessCpu { sampled: Mutex::new(((Instant::now(), used), 0.0)) }
    }
}

impl ProcessCpu {
    /// Cores in use now, smoothed.
    pub fn cores(&self) -> f64 {
        let Some((_, cpu_secs)) = crate::metrics::process_usage() else { return 0.0 };
        let now = Instant::now();
        let mut sampled = self.sampled.lock_unpoisoned();
        let ((at, before), cores) = *sampled;
        if now.duration_since(at) < MIN_INTERVAL {
            return cores;
        }
        let secs = now.duration_since(at).as_secs_f64();
        let fresh = (cpu_secs - before).max(0.0) / secs;
        let weight = 1.0 - (-secs / TIME_CONSTANT.as_secs_f64()).exp();
        let smoothed = cores + weight * (fresh - cores);
        *sampled = ((now, cpu_secs), smoothed);
        smoothed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_follow_the_counters() {
        let load = PartitionLoad::default();
        load.proposed(1_000, 50_000, Duration::from_millis(100));
        load.applied(Duration::from_millis(300));
        std::thread::sleep(Duration::from_millis(600));
        let r = load.rates();
        // ~0.6 s: weight ~6 % of the fresh averages (~1,667 events/s).
        assert!(r.events_per_sec > 50.0 && r.events_per_sec < 200.0, "{r:?}");
        assert!(r.bytes_per_sec > 40.0 * r.events_per_sec && r.bytes_per_sec < 60.0 * r.events_per_sec, "{r:?}");
        assert!(r.apply_cpu > 2.5 * r.processor_cpu && r.apply_cpu < 3.5 * r.processor_cpu, "{r:?}");
        // Asked again at once: the same answer.
        assert_eq!(load.rates(), r);
    }
}
