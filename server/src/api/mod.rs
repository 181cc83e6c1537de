//! Public gRPC services. They translate between protobuf and the node; all
//! counting logic lives in the processor and the storage layer.

pub mod cluster;
pub mod ingest;
pub mod membership;
pub mod query;
pub mod transfer;
