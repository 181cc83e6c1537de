//! Tally's Rust client.
//!
//! Re-exports the generated stubs of every public service ([`proto`]) and the
//! rules shared with the server (partitioner, validation, time buckets).

pub use tally_proto as proto;
pub use tally_proto::partition::partition_of;

pub mod time_arg;

use tonic::transport::{Channel, Endpoint};

/// Open a channel to one node, accepting `host:port` or a full URI.
pub async fn connect(addr: &str) -> Result<Channel, tonic::transport::Error> {
    let uri = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
    Endpoint::from_shared(uri)?
        .connect_timeout(std::time::Duration::from_secs(3))
        .tcp_nodelay(true)
        .connect()
        .await
}
