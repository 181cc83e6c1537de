//! Tally's Rust client: exact real-time event counts.
//!
//! * [`TallyClient`] — connect with one or more seed addresses, then
//!   [`send`](TallyClient::send) events (buffered, batched per partition,
//!   routed to each partition's leader, retried without double counting)
//!   and query [`stats`](TallyClient::stats), [`series`](TallyClient::series)
//!   and [`cluster_status`](TallyClient::cluster_status).
//! * [`proto`] — the generated gRPC stubs of every public service
//!   (`proto::v1::{ingest_client, query_client, cluster_client}`) for those
//!   who want the raw API, plus the rules shared with the server:
//!   [`partition_of`], validation and time buckets.
//! * [`time_arg`] — time arguments as people type them (`now`, `-1h`,
//!   RFC 3339).
//!
//! # How a sent event travels
//!
//! `send` validates the event, gives it an id if it has none, takes a slot
//! of the bounded buffer (waiting if there is none: backpressure) and queues
//! it ([`send_batch`](TallyClient::send_batch) does the same for many events
//! under one ticket). A background task groups events by partition and sends
//! a partition's batch when it is full (events or bytes) or its oldest event
//! has lingered long enough, together with whatever other partitions of the
//! same leader have buffered: one request per leader, not per partition.
//! Each batch goes to the partition's leader; failures are
//! retried with exponential backoff and full jitter, elsewhere if the node
//! is down, and a node that keeps failing is skipped by its circuit breaker
//! for a while. Every event ends with one [`Outcome`].
//!
//! # Which parts are tower
//!
//! Per node, the gRPC channel is wrapped in tower's timeout and concurrency
//! limit layers. Routing, retries (which resend only the retryable events of
//! a batch, possibly to another node) and the circuit breaker (one per node,
//! shared by all stubs) are Tally's own; each module explains why.
//!
//! The `tally` command line (crate `tally-cli`) and the load generator
//! (crate `tally-bench`) are built on this library but live in crates of
//! their own, so an application that embeds it pulls in none of their
//! dependencies.
//!
//! Runnable examples: `cargo run -p tally-client --example quickstart`,
//! `--example bulk_ingest`, `--example queries` (they expect a cluster at
//! `TALLY_ADDR`, default `127.0.0.1:7001`; `scripts/cluster.sh up` starts
//! one).

#![warn(missing_docs)]

pub use tally_proto as proto;
pub use tally_proto::partition::partition_of;
pub use tally_proto::v1::{
    Consistency, Event, Granularity, SeriesResponse, StatsResponse, StatusResponse, TopKOrder, TopKResponse,
};

pub mod backoff;
mod batcher;
pub mod breaker;
mod client;
pub mod config;
pub mod credentials;
mod dispatch;
mod encoded;
pub mod error;
mod leader_router;
pub mod node_pool;
pub mod outcome;
pub mod partition_map;
pub mod time_arg;

pub use backoff::RetryPolicy;
pub use breaker::{BreakerConfig, BreakerState};
pub use client::{ClusterStatus, TallyClient};
pub use config::{BatchConfig, ClientConfig};
pub use credentials::{connect_secure, connect_with_token, TlsFiles, TokenChannel};
pub use error::ClientError;
pub use outcome::{BatchTicket, IngestSummary, Outcome, OutcomeSlot, ServerTotals, Ticket};
pub use partition_map::PartitionMap;

use tonic::transport::{Channel, Endpoint};

/// An event of `event_type` for `entity_id`, happening now, counted with
/// value 1 and no id (the client assigns one when sending). Set the other
/// fields directly: `Event { value: Some(30), ..event("v", "watch") }`.
pub fn event(entity_id: impl Into<Vec<u8>>, event_type: impl Into<String>) -> Event {
    Event {
        actor_id: Vec::new(),
        entity_id: entity_id.into(),
        event_type: event_type.into(),
        event_time_ms: time_arg::now_ms(),
        event_id: Vec::new(),
        value: None,
    }
}

/// Opens a plain channel to one node, accepting `host:port` or a full URI —
/// for the raw generated stubs in [`proto`]. [`TallyClient`] manages its own
/// connections.
pub async fn connect(addr: &str) -> Result<Channel, tonic::transport::Error> {
    let uri = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
    Endpoint::from_shared(uri)?.connect_timeout(std::time::Duration::from_secs(3)).tcp_nodelay(true).connect().await
}
