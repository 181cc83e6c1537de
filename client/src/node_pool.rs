//! Connections to the cluster's nodes: one lazily connected gRPC channel per
//! address, wrapped in tower layers, plus that node's circuit breaker.
//!
//! What is tower and what is Tally's own:
//! * tower: the per-request timeout (`TimeoutLayer`), the bound on requests
//!   in flight to one node (`ConcurrencyLimitLayer`, so a slow node cannot
//!   accumulate an unbounded queue of requests), and an error mapping
//!   (`MapErrLayer`) that turns the timeout into gRPC `DEADLINE_EXCEEDED`.
//!   These are generic request/response concerns that tower does well and
//!   that compose under tonic's generated stubs unchanged.
//! * Tally's own: the circuit breaker (see `breaker.rs`), retries and
//!   routing (see `dispatch.rs`). They need to see inside answers (per-event
//!   retryable rejections, leader hints) and to move a request to another
//!   node, which a layer around one node's channel cannot do.
//!
//! Connections are lazy: a node that is down costs nothing until it is
//! used, and tonic reconnects by itself once it is back.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tally_proto::v1::cluster_client::ClusterClient;
use tally_proto::v1::ingest_client::IngestClient;
use tally_proto::v1::query_client::QueryClient;
use tonic::body::Body;
use tonic::codegen::http;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, ServiceBuilder};

use crate::breaker::{BreakerConfig, CircuitBreaker};
use crate::error::Result;

/// The service every generated stub of one node runs on.
///
/// Its error is a concrete [`tonic::Status`] rather than tower's boxed error:
/// tonic maps either the same way, and a concrete type keeps the generated
/// stubs' futures `Send` for `tokio::spawn` (a boxed error trips a
/// higher-ranked lifetime limitation of the compiler there).
pub type NodeService = BoxCloneSyncService<http::Request<Body>, http::Response<Body>, tonic::Status>;

/// One node: its address, tower-wrapped channel and breaker.
#[derive(Debug)]
pub struct Node {
    addr: String,
    service: NodeService,
    breaker: CircuitBreaker,
    request_timeout: Duration,
}

impl Node {
    /// The node's address as used to connect.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The node's circuit breaker.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    /// A request carrying the gRPC deadline, so the server stops working on
    /// it when the client stops waiting.
    pub(crate) fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.request_timeout);
        request
    }

    /// The node's tower stack, for calls without a generated stub.
    pub(crate) fn service(&self) -> NodeService {
        self.service.clone()
    }

    /// Stub of the Ingest service on this node.
    pub fn ingest(&self) -> IngestClient<NodeService> {
        IngestClient::new(self.service.clone())
    }

    /// Stub of the Query service on this node.
    pub fn query(&self) -> QueryClient<NodeService> {
        QueryClient::new(self.service.clone())
    }

    /// Stub of the Cluster service on this node.
    pub fn cluster(&self) -> ClusterClient<NodeService> {
        ClusterClient::new(self.service.clone())
    }
}

/// How a failed call should be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The node did not answer properly (refused, reset, timed out): count
    /// it against the node's breaker and retry, preferably elsewhere.
    Node,
    /// The node answered, but the cluster could not serve the request right
    /// now (no leader, leader moved): retry after refreshing the map.
    Transient,
    /// Retrying cannot help (invalid request, unimplemented, ...).
    Permanent,
}

/// Classifies a failed call. A status that tonic built on the client side
/// from a transport error carries that error as its source; a status sent
/// by the server has none, which tells "node down" from "node says no".
pub(crate) fn classify(status: &tonic::Status) -> Failure {
    use tonic::Code;
    let from_transport = std::error::Error::source(status).is_some();
    match status.code() {
        Code::DeadlineExceeded | Code::Cancelled => Failure::Node,
        _ if from_transport => Failure::Node,
        // Shed load says when to come back; without that, a size limit.
        Code::ResourceExhausted if retry_after(status).is_none() => Failure::Permanent,
        Code::Unavailable
        | Code::Aborted
        | Code::ResourceExhausted
        | Code::FailedPrecondition
        | Code::Internal
        | Code::Unknown => Failure::Transient,
        _ => Failure::Permanent,
    }
}

/// Longest `retry-after-ms` hint honoured: a node cannot park a client.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// A node's hint (gRPC metadata `retry-after-ms`, sent with
/// RESOURCE_EXHAUSTED when it sheds load) of how long to wait before
/// retrying, capped at [`MAX_RETRY_AFTER`].
pub(crate) fn retry_after(status: &tonic::Status) -> Option<Duration> {
    let ms: u64 = status.metadata().get(tally_proto::RETRY_AFTER_MS)?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_millis(ms).min(MAX_RETRY_AFTER))
}

/// The nodes the client has talked to, by address.
#[derive(Debug)]
pub(crate) struct NodePool {
    nodes: RwLock<HashMap<String, Arc<Node>>>,
    connect_timeout: Duration,
    request_timeout: Duration,
    max_requests_per_node: usize,
    breaker: BreakerConfig,
    /// `authorization` header of every call (`ClientConfig::token`).
    token: Option<http::HeaderValue>,
    tls: Option<crate::credentials::TlsFiles>,
}

/// Tower errors as gRPC statuses: our own timeout becomes
/// `DEADLINE_EXCEEDED`; transport errors keep their source, which is how
/// [`classify`] recognises them.
fn to_status(error: BoxError) -> tonic::Status {
    if error.is::<tower::timeout::error::Elapsed>() {
        tonic::Status::deadline_exceeded("request timed out in the client")
    } else {
        tonic::Status::from_error(error)
    }
}

impl NodePool {
    pub(crate) fn new(
        connect_timeout: Duration,
        request_timeout: Duration,
        max_requests_per_node: usize,
        breaker: BreakerConfig,
        token: Option<http::HeaderValue>,
        tls: Option<crate::credentials::TlsFiles>,
    ) -> NodePool {
        NodePool {
            nodes: RwLock::default(),
            connect_timeout,
            request_timeout,
            max_requests_per_node,
            breaker,
            token,
            tls,
        }
    }

    /// The breaker state of every node, by address.
    pub(crate) fn states(&self) -> Vec<(String, crate::BreakerState)> {
        let now = Instant::now();
        let mut states: Vec<_> = self
            .nodes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|n| (n.addr.clone(), n.breaker.state(now)))
            .collect();
        states.sort_by(|a, b| a.0.cmp(&b.0));
        states
    }

    /// The node at `addr`, created (not yet connected) on first use.
    pub(crate) fn get(&self, addr: &str) -> Result<Arc<Node>> {
        if let Some(node) = self.nodes.read().unwrap_or_else(|p| p.into_inner()).get(addr) {
            return Ok(node.clone());
        }
        let node = Arc::new(self.build(addr)?);
        let mut nodes = self.nodes.write().unwrap_or_else(|p| p.into_inner());
        Ok(nodes.entry(addr.to_owned()).or_insert(node).clone())
    }

    fn build(&self, addr: &str) -> Result<Node> {
        let endpoint = crate::credentials::endpoint(addr, self.tls.as_ref())?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let channel = endpoint.connect_lazy();
        let token = self.token.clone();
        let service = ServiceBuilder::new()
            .map_err(to_status as fn(BoxError) -> tonic::Status)
            .map_request(move |mut request: http::Request<Body>| {
                if let Some(token) = &token {
                    request.headers_mut().insert(http::header::AUTHORIZATION, token.clone());
                }
                request
            })
            .timeout(self.request_timeout)
            .concurrency_limit(self.max_requests_per_node)
            .service(channel);
        Ok(Node {
            addr: addr.to_owned(),
            service: BoxCloneSyncService::new(service),
            breaker: CircuitBreaker::new(self.breaker.clone(), Instant::now()),
            request_timeout: self.request_timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert_eq!(classify(&tonic::Status::unavailable("no leader")), Failure::Transient);
        assert_eq!(classify(&tonic::Status::deadline_exceeded("slow")), Failure::Node);
        assert_eq!(classify(&tonic::Status::invalid_argument("bad")), Failure::Permanent);
        let mut busy = tonic::Status::resource_exhausted("node busy");
        assert_eq!(classify(&busy), Failure::Permanent, "no hint: a limit that a retry hits again");
        busy.metadata_mut().insert(tally_proto::RETRY_AFTER_MS, tonic::metadata::MetadataValue::from_static("250"));
        assert_eq!(classify(&busy), Failure::Transient);
        assert_eq!(retry_after(&busy), Some(Duration::from_millis(250)));
        busy.metadata_mut()
            .insert(tally_proto::RETRY_AFTER_MS, tonic::metadata::MetadataValue::from_static("99999999"));
        assert_eq!(retry_after(&busy), Some(MAX_RETRY_AFTER), "capped");
        let refused = tonic::Status::from_error(Box::new(std::io::Error::other("connection refused")));
        assert_eq!(classify(&refused), Failure::Node, "{refused:?}");
    }
}
