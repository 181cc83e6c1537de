//! RESOURCE_EXHAUSTED answers that say when to come back.
//!
//! A node that sheds load (all ingest slots taken, a dedup index at its
//! memory bound) refuses at once and puts `retry-after-ms` in the reply's
//! gRPC metadata: how long a client should wait before it tries this node
//! again. The Rust client waits at least that long (and no longer than its
//! own cap). A RESOURCE_EXHAUSTED without the hint is a request that would
//! fail the same way again (a batch over a size limit): retrying it does not
//! help, and the client does not.

use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::Status;

pub use tally_proto::RETRY_AFTER_MS;

/// After "node busy": long enough for a few of its slots to free, short
/// next to the 2 s a request may wait for one.
pub const BUSY_RETRY_AFTER: Duration = Duration::from_millis(250);
/// After "dedup index full": keys leave it a second of the window at a time.
pub const DEDUP_FULL_RETRY_AFTER: Duration = Duration::from_secs(1);

/// RESOURCE_EXHAUSTED with `message` and the hint to retry after `after`.
pub fn exhausted(message: String, after: Duration) -> Status {
    let mut status = Status::resource_exhausted(message);
    if let Ok(value) = MetadataValue::try_from(after.as_millis().to_string()) {
        status.metadata_mut().insert(RETRY_AFTER_MS, value);
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hint_travels_in_metadata() {
        let status = exhausted("busy".into(), Duration::from_millis(250));
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(status.metadata().get(RETRY_AFTER_MS).and_then(|v| v.to_str().ok()), Some("250"));
    }
}
