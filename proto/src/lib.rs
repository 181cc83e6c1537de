//! The contract between Tally's clients and servers.
//!
//! * [`v1`] and [`internal`]: code generated from `proto/` (public API and
//!   peer-to-peer Raft traffic).
//! * [`partition`]: which partition an entity belongs to. Client and server
//!   both route with this one function, so they can never disagree.
//! * [`routing`]: the partitioner plus spread hot entities (`Routing`).
//! * [`validate`]: the rules an event must satisfy, with errors that name
//!   the offending field.
//! * [`time`]: minute/hour/day/month buckets and the decomposition of a time
//!   range into the fewest buckets.

pub mod partition;
pub mod routing;
pub mod time;
pub mod validate;

/// Generated code for the public API (`package tally.v1`).
pub mod v1 {
    tonic::include_proto!("tally.v1");
}

/// Generated code for peer traffic (`package tally.internal.v1`).
pub mod internal {
    // Two levels deep, so the generated `super::super::v1` paths resolve.
    pub mod v1 {
        tonic::include_proto!("tally.internal.v1");
    }
    pub use v1::*;
}

/// Encoded file descriptors of every proto file, for gRPC server reflection.
/// gRPC metadata key of a RESOURCE_EXHAUSTED reply that is worth retrying:
/// milliseconds to wait before trying that node again. Without it, the same
/// request would fail the same way (a size limit).
pub const RETRY_AFTER_MS: &str = "retry-after-ms";

pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tally_descriptor");
