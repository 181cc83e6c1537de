//! Tally's load generator and the measurements built on it — everything
//! behind `tally bench` and `tally probe-writes`, and the figures of
//! docs/BENCHMARKS.md. A crate of its own so that applications embedding
//! `tally-client` pull in none of it (Redis client, HDR histograms,
//! progress bars), and so that the cluster tests can reuse the same
//! measurements.
//!
//! * [`generator`]: `tally bench`, the load generator that also verifies
//!   the counts it produced.
//! * [`targets`]: the systems it drives — Tally, and Redis and etcd for
//!   the comparison — behind one "send a batch, get acks" step.
//! * [`probes`]: readers beside the writers (query latency, ack → visible
//!   on a follower).
//! * [`first_write`]: time until a partition acknowledges a write again
//!   (after a leader is killed).
//! * [`top_k_latency`]: TopK latency, one query at a time.
//! * [`stats_latency`]: Stats latency over one range for many entities (cold and warm passes).
//! * [`measure`]: the one percentile definition and the HDR histograms.
//! * [`results`]: what a run measured, as types; [`report`]: the benchmark
//!   report (docs/BENCHMARKS.md) rendered from a work directory of them.
//! * [`cpu_time`]: the generator's own CPU.

pub mod cpu_time;
pub mod first_write;
pub mod generator;
pub mod measure;
pub mod probes;
pub mod report;
pub mod results;
pub mod stats_latency;
pub mod targets;
pub mod top_k_latency;

/// Client stubs for the subset of etcd's v3 KV API (`package etcdserverpb`:
/// `KV.Put`, `KV.Txn`) in `etcd/etcdserverpb/kv_subset.proto`, for
/// `--target etcd`. Generated here from a vendored subset rather than taken
/// from the `etcd-client` crate, whose build needs a system `protoc`.
pub mod etcd_proto {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("etcdserverpb");
}

/// Exit status of `tally bench` when verification found a mismatch.
pub const EXIT_MISMATCH: i32 = 3;
