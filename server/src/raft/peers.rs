//! Pooled gRPC channels to the other nodes, one per node and port.
//!
//! A node talks to a peer on two ports. Raft traffic, liveness pings and
//! forwarded proposals go to the peer port (`tallyd --peer-listen`, the only
//! place the internal Raft service is served); the few public calls one node
//! makes on another (Status while a membership change settles, forwarded
//! Query, Initialize, AddNode, TransferLeader) go to the public port, where
//! those services live. Keeping the two apart here is what lets the peer
//! channel alone get client certificates once the peer port has mTLS.
//!
//! tonic channels multiplex HTTP/2 streams, so a node with 64 groups talks
//! to a peer over one connection, not 64; on it, the Raft messages of every
//! group travel in two conversations (`peer_link.rs`: a control lane and a
//! data lane), not one stream per message. `--peer-route` overrides reroute
//! the peer port only: that is the link a test's fault proxy stands on.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::peer_link::{LinkEvent, PeerEvents, PeerLink};
use crate::sync::RwLockExt;
use crate::type_config::NodeId;

/// HTTP/2 flow-control windows of peer connections: one conversation
/// carries every group's appends, so its stream window must hold a full
/// AppendEntries and the connection a few of them.
pub const PEER_STREAM_WINDOW: u32 = 16 << 20;
pub const PEER_CONNECTION_WINDOW: u32 = 64 << 20;

/// What this node presents when it calls another node's public port
/// (`--node-token-file`): the bearer token of the `node` role, or nothing
/// when the cluster runs without tokens.
#[derive(Clone, Default)]
pub struct NodeCredentials(Option<MetadataValue<Ascii>>);

impl NodeCredentials {
    /// Credentials from the token; an error if it cannot be a header value.
    pub fn bearer(token: &str) -> Result<NodeCredentials, String> {
        let value = MetadataValue::try_from(format!("Bearer {}", token.trim()))
            .map_err(|_| "the node token has characters a header cannot carry".to_string())?;
        Ok(NodeCredentials(Some(value)))
    }
}

impl Interceptor for NodeCredentials {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            request.metadata_mut().insert("authorization", token.clone());
        }
        Ok(request)
    }
}

/// A channel to another node that carries this node's credentials.
pub type NodeChannel = InterceptedService<Channel, NodeCredentials>;

/// The two conversations with one peer.
#[derive(Clone)]
pub struct PeerLinks {
    /// Heartbeats, votes, leadership transfers: small and urgent.
    pub control: Arc<PeerLink>,
    /// AppendEntries that carry entries.
    pub data: Arc<PeerLink>,
}

pub struct PeerPool {
    /// Peer port channels: node → (address, channel).
    peer: RwLock<HashMap<NodeId, (String, Channel)>>,
    /// Public port channels, for public calls between nodes.
    public: RwLock<HashMap<NodeId, (String, Channel)>>,
    connect_timeout: Duration,
    /// Per-peer overrides of the peer address (`--peer-route`).
    routes: HashMap<NodeId, String>,
    /// Conversations per peer: node → (peer address, links).
    links: RwLock<HashMap<NodeId, (String, PeerLinks)>>,
    /// What the conversations learn about peers (liveness listens).
    events: Arc<PeerEvents>,
    credentials: NodeCredentials,
    /// TLS of calls to other nodes (`tls.rs`); `None`: plaintext.
    tls: Option<ClientTlsConfig>,
}

impl PeerPool {
    pub fn new(
        connect_timeout: Duration,
        routes: HashMap<NodeId, String>,
        credentials: NodeCredentials,
        tls: Option<ClientTlsConfig>,
    ) -> Arc<PeerPool> {
        Arc::new(PeerPool {
            peer: RwLock::default(),
            public: RwLock::default(),
            connect_timeout,
            routes,
            links: RwLock::default(),
            events: Arc::default(),
            credentials,
            tls,
        })
    }

    /// Who hears what the conversations learn about peers; set once.
    pub fn set_link_events(&self, sink: impl Fn(NodeId, LinkEvent) + Send + Sync + 'static) {
        self.events.set(sink);
    }

    /// Calls waiting in the most backed-up control lane: how far behind this
    /// node's messages to its peers are.
    pub fn control_backlog(&self) -> usize {
        self.links.read_unpoisoned().values().map(|(_, l)| l.control.queued()).max().unwrap_or(0)
    }

    /// The conversations with `node` at `peer_addr`, started on first use
    /// and replaced if the address changed.
    pub fn links(&self, node: NodeId, peer_addr: &str) -> Result<PeerLinks, tonic::transport::Error> {
        pooled(&self.links, node, peer_addr, || {
            let channel = self.channel(node, peer_addr)?;
            Ok(PeerLinks {
                control: PeerLink::start(node, channel.clone(), self.events.clone()),
                data: PeerLink::start(node, channel, self.events.clone()),
            })
        })
    }

    /// The channel to `node`'s peer port at `peer_addr` (or its route);
    /// replaced if the address changed.
    pub fn channel(&self, node: NodeId, peer_addr: &str) -> Result<Channel, tonic::transport::Error> {
        let addr = self.routes.get(&node).map(String::as_str).unwrap_or(peer_addr);
        pooled(&self.peer, node, addr, || self.connect_lazy(addr))
    }

    /// The channel to `node`'s public port at `addr`, for calling a public
    /// service (Cluster, Query) on another node.
    pub fn public_channel(&self, node: NodeId, addr: &str) -> Result<NodeChannel, tonic::transport::Error> {
        pooled(&self.public, node, addr, || self.connect_lazy(addr)).map(|c| self.with_credentials(c))
    }

    /// `channel` presenting this node's credentials on every call.
    pub fn with_credentials(&self, channel: Channel) -> NodeChannel {
        InterceptedService::new(channel, self.credentials.clone())
    }

    fn connect_lazy(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let uri = if addr.starts_with("http://") || addr.starts_with("https://") {
            addr.to_string()
        } else {
            format!("{scheme}://{addr}")
        };
        let mut endpoint = Endpoint::from_shared(uri)?;
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone())?;
        }
        Ok(endpoint
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            // Generous: a node starved of CPU for a few seconds must not have
            // every stream on its peer connection cut.
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            .initial_stream_window_size(PEER_STREAM_WINDOW)
            .initial_connection_window_size(PEER_CONNECTION_WINDOW)
            .connect_lazy())
    }
}

/// The pooled value for `node` at `addr`, made (and pooled) if there is
/// none or the address changed. Checked again under the write lock, so two
/// callers racing never both make one (a link starts a task).
fn pooled<T: Clone, E>(
    pool: &RwLock<HashMap<NodeId, (String, T)>>,
    node: NodeId,
    addr: &str,
    make: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    let known = |map: &HashMap<NodeId, (String, T)>| map.get(&node).filter(|(a, _)| a == addr).map(|(_, v)| v.clone());
    if let Some(value) = known(&pool.read_unpoisoned()) {
        return Ok(value);
    }
    let mut map = pool.write_unpoisoned();
    if let Some(value) = known(&map) {
        return Ok(value);
    }
    let value = make()?;
    map.insert(node, (addr.to_string(), value.clone()));
    Ok(value)
}
