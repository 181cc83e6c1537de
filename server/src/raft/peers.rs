//! One gRPC channel per peer node, shared by every Raft group and by
//! ingest/query forwarding. tonic channels multiplex HTTP/2 streams, so a
//! node with 64 groups talks to a peer over one connection, not 64.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::raft::types::NodeId;

pub struct PeerPool {
    channels: RwLock<HashMap<NodeId, (String, Channel)>>,
    connect_timeout: Duration,
    /// Per-peer address overrides (`--peer-route`).
    routes: HashMap<NodeId, String>,
}

impl PeerPool {
    pub fn new(connect_timeout: Duration, routes: HashMap<NodeId, String>) -> Arc<PeerPool> {
        Arc::new(PeerPool { channels: RwLock::default(), connect_timeout, routes })
    }

    /// The channel to `node` at `addr`; replaced if the address changed.
    pub fn channel(&self, node: NodeId, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let addr = self.routes.get(&node).map(String::as_str).unwrap_or(addr);
        if let Ok(map) = self.channels.read() {
            if let Some((known, ch)) = map.get(&node) {
                if known == addr {
                    return Ok(ch.clone());
                }
            }
        }
        let uri = if addr.starts_with("http://") || addr.starts_with("https://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let channel = Endpoint::from_shared(uri)?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            // Generous: a node starved of CPU for a few seconds must not have
            // every stream on its peer connection cut.
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            .connect_lazy();
        if let Ok(mut map) = self.channels.write() {
            map.insert(node, (addr.to_string(), channel.clone()));
        }
        Ok(channel)
    }
}
