//! The library's error type.
//!
//! One enum for every fallible call, so an application can match on what
//! went wrong instead of parsing strings. Per-event results of ingestion are
//! not errors: an event that was rejected or could not be delivered is an
//! [`Outcome`](crate::Outcome), because the other events of the same call may
//! well have succeeded and the caller needs to know which.

use std::time::Duration;

use tally_proto::validate::FieldError;

/// Everything that can go wrong in a client call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The configuration cannot work (no seed address, zero limits, ...).
    #[error("invalid client configuration: {0}")]
    Config(String),

    /// An address could not be turned into a gRPC endpoint.
    #[error("invalid address {addr:?}: {source}")]
    Address {
        /// The address as given.
        addr: String,
        /// Why tonic refused it.
        #[source]
        source: tonic::transport::Error,
    },

    /// A query argument breaks the rules shared with the server.
    #[error("invalid argument: {0}")]
    InvalidArgument(#[from] FieldError),

    /// No node answered the cluster status probe, or none reported an
    /// initialised cluster.
    #[error("no node of the cluster could be reached: {0}")]
    NoCluster(String),

    /// A server answered with a gRPC error that retrying cannot fix, or the
    /// last error seen when the retries ran out.
    #[error("{code:?} from {addr}: {message}")]
    Rpc {
        /// The node that answered.
        addr: String,
        /// The gRPC status code.
        code: tonic::Code,
        /// The server's message.
        message: String,
    },

    /// Retries ran out (attempt count or overall deadline) without an answer.
    #[error("gave up after {attempts} attempts in {elapsed:?}; last error: {last}")]
    RetriesExhausted {
        /// Attempts made.
        attempts: u32,
        /// Time spent, including backoff.
        elapsed: Duration,
        /// The last error seen.
        last: String,
    },

    /// The client was shut down while the call was waiting.
    #[error("the client is closed")]
    Closed,
}

impl ClientError {
    pub(crate) fn rpc(addr: &str, status: &tonic::Status) -> ClientError {
        ClientError::Rpc { addr: addr.to_owned(), code: status.code(), message: status.message().to_owned() }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;
