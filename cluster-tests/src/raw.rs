//! Ingest requests sent raw over a tonic channel (a 5-byte gRPC frame
//! header, then the body): bodies that are encoded once and sent many
//! times, that are larger than any limit, or that never finish — what a
//! generated client cannot send (`ingest_flood`, `spike`).

use bytes::Bytes;
use http_body_util::BodyExt;
use prost::Message;
use tally_proto::v1::IngestRequest;
use tonic::codegen::{http, Service};
use tonic::transport::Channel;
use tonic::Status;

/// A gRPC message frame header: uncompressed, `len` bytes follow.
pub fn frame_header(len: usize) -> [u8; 5] {
    let mut header = [0u8; 5];
    header[1..].copy_from_slice(&(len as u32).to_be_bytes());
    header
}

/// `request` as a complete gRPC request body, encoded once.
pub fn encoded(request: &IngestRequest) -> Bytes {
    let message = request.encode_to_vec();
    let mut body = frame_header(message.len()).to_vec();
    body.extend_from_slice(&message);
    Bytes::from(body)
}

/// Send `body` to /tally.v1.Ingest/Ingest and return the gRPC status (its
/// metadata holds the answer's headers and trailers, e.g. retry hints).
pub async fn raw_ingest(mut channel: Channel, body: tonic::body::Body) -> anyhow::Result<Status> {
    let request = http::Request::builder()
        .method("POST")
        .uri("/tally.v1.Ingest/Ingest")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)?;
    futures::future::poll_fn(|cx| channel.poll_ready(cx)).await?;
    let response = channel.call(request).await?;
    let (parts, body) = response.into_parts();
    if let Some(status) = Status::from_header_map(&parts.headers) {
        return Ok(status); // trailers-only: refused before any message
    }
    let collected = body.collect().await?;
    let trailers = collected.trailers().cloned().unwrap_or_default();
    Status::from_header_map(&trailers).ok_or_else(|| anyhow::anyhow!("no grpc-status in the answer"))
}
