//! The whole-batch limits of an ingest batch, checked the same way whether
//! the batch comes from a client (`Ingest`) or from a peer forwarding its
//! share of one (`Propose`): at most `MAX_BATCH_EVENTS` events and
//! `MAX_BATCH_BYTES` encoded bytes. They bound the memory of one request and
//! the size of the Raft entry it becomes.
//!
//! The decode limit of the public Ingest service (`server.rs`) sits just
//! above `MAX_BATCH_BYTES`, so a batch slightly over is decoded and answered
//! with its exact size here, and anything far over is refused before it is
//! read.

use tally_proto::v1::Event;
use tally_proto::validate::{MAX_BATCH_BYTES, MAX_BATCH_EVENTS};
use tonic::Status;

/// RESOURCE_EXHAUSTED naming the limit when `events` exceed one.
pub fn check(events: &[Event]) -> Result<(), Status> {
    if events.len() > MAX_BATCH_EVENTS {
        return Err(Status::resource_exhausted(format!(
            "events: batch has {} events; the limit is {MAX_BATCH_EVENTS} per request",
            events.len()
        )));
    }
    // Encoded as the repeated field 1 of IngestRequest (and of
    // ProposeRequest's events, give or take the partition number).
    let size = prost::encoding::message::encoded_len_repeated(1, events);
    if size > MAX_BATCH_BYTES {
        return Err(Status::resource_exhausted(format!(
            "events: batch is {size} bytes; the limit is {MAX_BATCH_BYTES} bytes per request"
        )));
    }
    Ok(())
}
