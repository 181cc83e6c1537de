//! The HTTP listener (`--http-listen`): what operators and their tools
//! scrape, apart from the gRPC ports.
//!
//! - `GET /metrics`: Prometheus text format (`metrics.rs`). The gauges that
//!   describe the node's state are read from it here, at scrape time.
//! - `GET /healthz`: 200 while the process serves HTTP at all.
//! - `GET /readyz`: 200 once this node serves: it knows the cluster map and
//!   every partition replica here has re-applied what was committed when it
//!   started (reads from it cannot go backwards); 503 with the reason
//!   otherwise.
//! - `GET /` and `/api/…`: the live dashboard (`dashboard.rs`).
//!
//! axum, since tonic already builds on it; the listener is separate from the
//! gRPC ports so that it can be exposed to a monitoring network alone.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use openraft::async_runtime::WatchReceiver;
use openraft::ServerState;

use crate::metrics::{metrics, process_usage, CpuLabels, PartitionLabels};
use crate::node::Node;
use crate::processor::QUEUE_CAPACITY;

/// The router of the HTTP listener.
pub fn router(node: Arc<Node>, tokens: crate::api::auth::Tokens) -> Router {
    Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(node.clone())
        .merge(super::dashboard::routes(node, tokens))
}

async fn serve_metrics(State(node): State<Arc<Node>>) -> Response {
    refresh_gauges(&node);
    match metrics().encode() {
        Ok(text) => ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics: {e}\n")).into_response(),
    }
}

async fn ready(State(node): State<Arc<Node>>) -> Response {
    if node.partition_count().is_none() {
        return (StatusCode::SERVICE_UNAVAILABLE, "the cluster map is not known yet (tally cluster init)\n")
            .into_response();
    }
    let recovering: Vec<u32> =
        node.local_partitions().iter().filter(|r| !r.recovered.load(Ordering::Relaxed)).map(|r| r.partition).collect();
    if !recovering.is_empty() {
        let message = format!("{} partition replicas still recovering: {recovering:?}\n", recovering.len());
        return (StatusCode::SERVICE_UNAVAILABLE, message).into_response();
    }
    "ready\n".into_response()
}

/// Set the gauges of `metrics.rs` from the node's state now.
fn refresh_gauges(node: &Node) {
    let g = &metrics().gauges;
    let replicas = node.local_partitions();
    let (mut led, mut quiesced, mut max_term, mut queued, mut lag) = (0i64, 0i64, 0u64, 0usize, 0u64);
    let mut load = crate::load::LoadRates::default();
    g.partition_events_per_second.clear();
    g.partition_bytes_per_second.clear();
    for r in &replicas {
        let rates = r.load.rates();
        load = load.add(rates);
        {
            let m = r.raft.metrics();
            let m = m.borrow_watched();
            if m.state == ServerState::Leader {
                led += 1;
                let labels = PartitionLabels { partition: r.partition };
                g.partition_events_per_second.get_or_create(&labels).set(rates.events_per_sec);
                g.partition_bytes_per_second.get_or_create(&labels).set(rates.bytes_per_sec);
            }
            max_term = max_term.max(m.current_term);
            let applied = m.last_applied.as_ref().map(|l| l.index).unwrap_or(0);
            lag += m.last_log_index.unwrap_or(0).saturating_sub(applied);
        }
        if node
            .quiescence
            .group(tally_proto::partition::group_of_partition(r.partition))
            .is_some_and(|q| q.is_quiesced())
        {
            quiesced += 1;
        }
        queued += QUEUE_CAPACITY.saturating_sub(r.ingest.capacity());
    }
    g.load_events_per_second.set(load.events_per_sec);
    g.load_bytes_per_second.set(load.bytes_per_sec);
    g.load_cpu.get_or_create(&CpuLabels { stage: "processor" }).set(load.processor_cpu);
    g.load_cpu.get_or_create(&CpuLabels { stage: "apply" }).set(load.apply_cpu);
    g.partitions_led.set(led);
    g.replicas.set(replicas.len() as i64);
    g.quiesced_replicas.set(quiesced);
    g.max_term.set(max_term as i64);
    g.ingest_queue_depth.set(queued as i64);
    g.apply_lag_entries.set(lag as i64);
    let budget = &node.dedup_budget;
    g.dedup_keys.set(budget.used() as i64);
    g.dedup_max_keys.set(budget.max_keys() as i64);
    g.dedup_bytes.set((budget.used() * crate::dedup::BYTES_PER_KEY) as i64);
    let db = node.engine.db();
    let property = |name: &str| db.property_int_value(name).ok().flatten().unwrap_or(0) as i64;
    g.rocksdb_memtable_bytes.set(property("rocksdb.cur-size-all-mem-tables"));
    g.rocksdb_pending_compaction_bytes.set(property("rocksdb.estimate-pending-compaction-bytes"));
    g.rocksdb_write_stopped.set(property("rocksdb.is-write-stopped"));
    g.rocksdb_l0_files.set(
        db.property_value("rocksdb.num-files-at-level0")
            .ok()
            .flatten()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0),
    );
    if let Some((rss, cpu)) = process_usage() {
        g.process_resident_memory_bytes.set(rss as i64);
        g.process_cpu_seconds.set(cpu);
    }
    let map = node.map();
    g.peers_up.set(map.nodes.keys().filter(|id| **id != node.id && node.liveness.is_up(**id)).count() as i64);
}
