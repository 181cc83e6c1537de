//! Every knob of the client in one place, with defaults that suit a small
//! cluster on a fast network.
//!
//! The defaults are chosen so that a plain `TallyClient::connect(["host:7001"])`
//! behaves well: batches stay far below the server's limits (10,000 events,
//! 4 MiB), a short linger trades a few milliseconds of latency for much larger
//! batches under load, the buffer bounds memory to roughly
//! `buffer_events × average event size`, and retries give up after about the
//! time a Raft election plus a reconnect takes, several times over.

use std::time::Duration;

use crate::backoff::RetryPolicy;
use crate::breaker::BreakerConfig;
use crate::error::{ClientError, Result};

/// Configuration of a [`TallyClient`](crate::TallyClient).
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Addresses (`host:port` or `http://host:port`) to learn the cluster
    /// from. One reachable node is enough; the rest are discovered.
    pub seeds: Vec<String>,
    /// Limit on establishing a TCP + HTTP/2 connection to one node.
    pub connect_timeout: Duration,
    /// Limit on one request, from sending to the complete answer. Also sent
    /// to the server as the gRPC deadline.
    pub request_timeout: Duration,
    /// Most requests in flight to one node at a time (a tower concurrency
    /// limit); further requests wait their turn.
    pub max_requests_per_node: usize,
    /// Retries of failed or partly failed requests.
    pub retry: RetryPolicy,
    /// When a node is considered broken and skipped for a while.
    pub breaker: BreakerConfig,
    /// Batching of [`send`](crate::TallyClient::send).
    pub batch: BatchConfig,
    /// Minimum time between two refreshes of the partition map, so a burst
    /// of "no leader" answers causes one refresh, not thousands.
    pub min_refresh_interval: Duration,
    /// Bearer token presented on every call, for clusters that run with
    /// `tallyd --auth-file` (role `writer` to send, `reader` to query).
    pub token: Option<String>,
    /// TLS for clusters that run with `tallyd --tls-cert` (https to every
    /// node); `None`: plaintext.
    pub tls: Option<crate::credentials::TlsFiles>,
}

/// How events are grouped into requests.
#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// A partition's batch is sent once it holds this many events.
    pub max_events: usize,
    /// ... or once its encoded size reaches this many bytes.
    pub max_bytes: usize,
    /// ... or once its oldest event has waited this long.
    pub linger: Duration,
    /// Events accepted by `send` but not yet resolved (buffered or in
    /// flight), across all partitions. When reached, `send` waits.
    pub buffer_events: usize,
    /// Requests in flight for one partition at a time. More than one keeps
    /// a partition busy while an earlier batch waits for its quorum; counts
    /// are commutative, so reordering between batches is harmless.
    pub max_in_flight_per_partition: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_events: 2_000,
            max_bytes: 1024 * 1024,
            linger: Duration::from_millis(5),
            buffer_events: 100_000,
            max_in_flight_per_partition: 4,
        }
    }
}

impl ClientConfig {
    /// Defaults for the given seed addresses.
    pub fn new<I, S>(seeds: I) -> ClientConfig
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ClientConfig {
            seeds: seeds.into_iter().map(Into::into).collect(),
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(10),
            max_requests_per_node: 64,
            retry: RetryPolicy::default(),
            breaker: BreakerConfig::default(),
            batch: BatchConfig::default(),
            min_refresh_interval: Duration::from_millis(200),
            token: None,
            tls: None,
        }
    }

    /// Checks the limits against each other and the server's, so a bad
    /// configuration fails at `connect` instead of at the first request.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(ClientError::Config(m.to_owned()));
        if self.seeds.is_empty() {
            return bad("at least one seed address is needed");
        }
        let b = &self.batch;
        if b.max_events == 0 || b.max_events > tally_proto::validate::MAX_BATCH_EVENTS {
            return bad("batch.max_events must be 1 to 10000 (the server's limit)");
        }
        // Room for the request's own framing below the server's 4 MiB.
        if b.max_bytes < 1024 || b.max_bytes > tally_proto::validate::MAX_BATCH_BYTES - 64 * 1024 {
            return bad("batch.max_bytes must be 1 KiB to 4 MiB - 64 KiB");
        }
        if b.buffer_events == 0 {
            return bad("batch.buffer_events must be at least 1");
        }
        if b.max_in_flight_per_partition == 0 || self.max_requests_per_node == 0 {
            return bad("in-flight limits must be at least 1");
        }
        if self.retry.max_attempts == 0 {
            return bad("retry.max_attempts must be at least 1");
        }
        if self.request_timeout.is_zero() || self.connect_timeout.is_zero() {
            return bad("timeouts must be positive");
        }
        if let Some(token) = &self.token {
            crate::credentials::bearer_header(token)?;
        }
        self.breaker.validate().map_err(|m| ClientError::Config(m.to_owned()))
    }
}
