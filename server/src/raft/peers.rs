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
//! to a peer over one connection, not 64. `--peer-route` overrides reroute
//! the peer port only: that is the link a test's fault proxy stands on.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::raft::types::NodeId;

pub struct PeerPool {
    /// Peer port channels: node → (address, channel).
    peer: RwLock<HashMap<NodeId, (String, Channel)>>,
    /// Public port channels, for public calls between nodes.
    public: RwLock<HashMap<NodeId, (String, Channel)>>,
    connect_timeout: Duration,
    /// Per-peer overrides of the peer address (`--peer-route`).
    routes: HashMap<NodeId, String>,
}

impl PeerPool {
    pub fn new(connect_timeout: Duration, routes: HashMap<NodeId, String>) -> Arc<PeerPool> {
        Arc::new(PeerPool { peer: RwLock::default(), public: RwLock::default(), connect_timeout, routes })
    }

    /// The channel to `node`'s peer port at `peer_addr` (or its route);
    /// replaced if the address changed.
    pub fn channel(&self, node: NodeId, peer_addr: &str) -> Result<Channel, tonic::transport::Error> {
        let addr = self.routes.get(&node).map(String::as_str).unwrap_or(peer_addr);
        self.pooled(&self.peer, node, addr)
    }

    /// The channel to `node`'s public port at `addr`, for calling a public
    /// service (Cluster, Query) on another node.
    pub fn public_channel(&self, node: NodeId, addr: &str) -> Result<Channel, tonic::transport::Error> {
        self.pooled(&self.public, node, addr)
    }

    fn pooled(
        &self,
        pool: &RwLock<HashMap<NodeId, (String, Channel)>>,
        node: NodeId,
        addr: &str,
    ) -> Result<Channel, tonic::transport::Error> {
        if let Ok(map) = pool.read() {
            if let Some((known, ch)) = map.get(&node) {
                if known == addr {
                    return Ok(ch.clone());
                }
            }
        }
        let channel = self.connect_lazy(addr)?;
        if let Ok(mut map) = pool.write() {
            map.insert(node, (addr.to_string(), channel.clone()));
        }
        Ok(channel)
    }

    fn connect_lazy(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let uri = if addr.starts_with("http://") || addr.starts_with("https://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        Ok(Endpoint::from_shared(uri)?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            // Generous: a node starved of CPU for a few seconds must not have
            // every stream on its peer connection cut.
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            .connect_lazy())
    }
}
