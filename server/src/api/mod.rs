//! Public gRPC services. They translate between protobuf and the node; all
//! counting logic lives in the processor and the storage layer.
//!
//! Besides the services: `admission` and `decode_errors` are the tower
//! layers of the public listener (see `server.rs`), `batch_limits` the
//! whole-batch limits Ingest and Propose share, `propose` the receiving end
//! of forwarded ingest, and `node_addrs` how nodes' public and peer
//! addresses are reported and learnt.

pub mod admission;
pub mod batch_limits;
pub mod cluster;
pub mod decode_errors;
pub mod ingest;
pub mod membership;
pub mod node_addrs;
pub mod propose;
pub mod query;
pub mod transfer;
