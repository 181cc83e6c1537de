//! Latency of each stage of the write and read paths, as HDR histograms a
//! running node reports (`Cluster.Stages`, `tally cluster stages`).
//!
//! They are how the next bottleneck is found: an ingest's time splits into
//! its wait in the partition's queue, building its entry, and the Raft
//! write (append + replicate + commit + apply on the leader), which in turn
//! splits into the log writer's write, the WAL fsync and the apply round;
//! a read into making it linearizable and reading memory + RocksDB.
//!
//! One process-wide registry (like a metrics recorder), so the storage
//! threads record without a handle threaded through every layer. Each
//! stage is one mutex-guarded histogram recorded once per request, batch,
//! round or fsync — never per event — so the lock is cheap and uncontended
//! next to the work it times.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::sync::MutexExt;
use hdrhistogram::Histogram;

/// The timed stages, in the order of the path they belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    IngestRequest,
    IngestQueueWait,
    IngestBuildEntry,
    IngestRaftWrite,
    RaftReplicate,
    RaftFollowerAppend,
    LogWrite,
    LogFsync,
    ApplyRound,
    Checkpoint,
    Expiry,
    ReadRequest,
    ReadLinearize,
    ReadStorage,
}

impl Stage {
    pub const ALL: [Stage; 14] = [
        Stage::IngestRequest,
        Stage::IngestQueueWait,
        Stage::IngestBuildEntry,
        Stage::IngestRaftWrite,
        Stage::RaftReplicate,
        Stage::RaftFollowerAppend,
        Stage::LogWrite,
        Stage::LogFsync,
        Stage::ApplyRound,
        Stage::Checkpoint,
        Stage::Expiry,
        Stage::ReadRequest,
        Stage::ReadLinearize,
        Stage::ReadStorage,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::IngestRequest => "ingest.request",
            Stage::IngestQueueWait => "ingest.queue_wait",
            Stage::IngestBuildEntry => "ingest.build_entry",
            Stage::IngestRaftWrite => "ingest.raft_write",
            Stage::RaftReplicate => "raft.replicate",
            Stage::RaftFollowerAppend => "raft.follower_append",
            Stage::LogWrite => "log.write",
            Stage::LogFsync => "log.fsync",
            Stage::ApplyRound => "apply.round",
            Stage::Checkpoint => "apply.checkpoint",
            Stage::Expiry => "apply.expiry",
            Stage::ReadRequest => "read.request",
            Stage::ReadLinearize => "read.linearize",
            Stage::ReadStorage => "read.storage",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            Stage::IngestRequest => "an Ingest call on the node that received it, forwarding included",
            Stage::IngestQueueWait => "a partition's share of a request, waiting in the leader's processor queue",
            Stage::IngestBuildEntry => "dedup and aggregation of one batch into a Raft entry",
            Stage::IngestRaftWrite => {
                "an entry from proposal to applied on the leader (append, replicate, commit, apply)"
            }
            Stage::RaftReplicate => "an AppendEntries with entries, leader to follower and back, as the leader sees it",
            Stage::RaftFollowerAppend => "an AppendEntries with entries on the follower, until they are durable there",
            Stage::LogWrite => "one Raft log write by the log writer thread (unsynced)",
            Stage::LogFsync => "one WAL fsync, covering every group's writes queued since the last",
            Stage::ApplyRound => "one apply round of a group (dedup, aggregation into memory)",
            Stage::Checkpoint => "one checkpoint of a group's state to RocksDB",
            Stage::Expiry => "finding a group's expired buckets on disk, in the checkpoint after its floors rose",
            Stage::ReadRequest => "a Stats or Series call on the node that received it, forwarding included",
            Stage::ReadLinearize => "making a linearizable read safe (lease check or read-index round, apply wait)",
            Stage::ReadStorage => "reading memory and RocksDB for one query",
        }
    }
}

/// One stage's figures, in milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct StageSummary {
    pub stage: Stage,
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

pub struct Stages {
    /// Microseconds, one per `Stage::ALL` (None only if the histogram
    /// library refused bounds that are valid by its documentation).
    histograms: Vec<Mutex<Option<Histogram<u64>>>>,
    since: Mutex<Instant>,
}

/// Up to an hour, 3 significant digits: a few tens of KiB per stage.
const HIGHEST_US: u64 = 3_600_000_000;

fn histogram() -> Option<Histogram<u64>> {
    Histogram::new_with_bounds(1, HIGHEST_US, 3).ok()
}

impl Stages {
    fn new() -> Stages {
        Stages {
            histograms: Stage::ALL.iter().map(|_| Mutex::new(histogram())).collect(),
            since: Mutex::new(Instant::now()),
        }
    }

    fn slot(&self, stage: Stage) -> Option<&Mutex<Option<Histogram<u64>>>> {
        self.histograms.get(Stage::ALL.iter().position(|s| *s == stage)?)
    }

    pub fn record(&self, stage: Stage, took: Duration) {
        let Some(slot) = self.slot(stage) else { return };
        if let Some(h) = slot.lock_unpoisoned().as_mut() {
            h.saturating_record((took.as_micros() as u64).clamp(1, HIGHEST_US));
        }
    }

    /// Every stage since start or the last reset, and how long that is.
    pub fn summary(&self, reset: bool) -> (Vec<StageSummary>, Duration) {
        let mut since = self.since.lock_unpoisoned();
        let window = since.elapsed();
        let ms = |us: u64| us as f64 / 1000.0;
        let out = Stage::ALL
            .iter()
            .zip(&self.histograms)
            .filter_map(|(stage, slot)| {
                let mut guard = slot.lock_unpoisoned();
                let h = guard.as_mut()?;
                let s = StageSummary {
                    stage: *stage,
                    count: h.len(),
                    mean_ms: h.mean() / 1000.0,
                    p50_ms: ms(h.value_at_quantile(0.5)),
                    p90_ms: ms(h.value_at_quantile(0.9)),
                    p99_ms: ms(h.value_at_quantile(0.99)),
                    p999_ms: ms(h.value_at_quantile(0.999)),
                    max_ms: ms(h.max()),
                };
                if reset {
                    h.reset();
                }
                Some(s)
            })
            .collect();
        if reset {
            *since = Instant::now();
        }
        (out, window)
    }
}

/// The process's registry.
pub fn global() -> &'static Stages {
    static STAGES: OnceLock<Stages> = OnceLock::new();
    STAGES.get_or_init(Stages::new)
}

pub fn record(stage: Stage, took: Duration) {
    global().record(stage, took);
    crate::metrics::metrics().stage(stage.name(), took.as_secs_f64());
}

/// Times from now to when it is dropped or `finish`ed.
pub struct Timer {
    stage: Stage,
    started: Instant,
}

impl Timer {
    pub fn start(stage: Stage) -> Timer {
        Timer { stage, started: Instant::now() }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        record(self.stage, self.started.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_report_what_was_recorded_and_reset() {
        let stages = Stages::new();
        for ms in 1..=100 {
            stages.record(Stage::LogFsync, Duration::from_millis(ms));
        }
        let (summary, _) = stages.summary(true);
        let fsync = summary.iter().find(|s| s.stage == Stage::LogFsync).unwrap();
        assert_eq!(fsync.count, 100);
        assert!((fsync.p50_ms - 50.0).abs() < 0.1, "{fsync:?}");
        assert!((fsync.max_ms - 100.0).abs() < 0.1, "{fsync:?}");
        assert_eq!(summary.iter().find(|s| s.stage == Stage::ReadStorage).unwrap().count, 0);
        let (after, _) = stages.summary(false);
        assert!(after.iter().all(|s| s.count == 0));
    }
}
