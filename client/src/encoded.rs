//! Events encoded once, when they enter the client.
//!
//! A batch may be sent several times (a retry after a timeout, to another
//! node after a failover, only its retryable part after a partial answer).
//! Building an `IngestRequest` for each attempt would copy every event
//! (three heap buffers each) and encode it again; measured in `tally bench`,
//! those copies and frees were the largest part of the generator's CPU. So
//! an event is encoded exactly once, into one shared buffer, and an attempt
//! is a list of those buffers: [`EncodedIngestRequest`] writes them with the
//! framing `IngestRequest` has on the wire (field 1, length-delimited, per
//! event), so the server decodes it as the ordinary message. Retrying costs
//! a reference count per event, not a copy.

use bytes::{BufMut, Bytes};
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, skip_field, DecodeContext, WireType};
use prost::Message;
use tally_proto::v1::{Event, IngestResponse};
use tonic::client::Grpc;
use tonic::codegen::http;

use crate::node_pool::NodeService;

/// Field number of `events` in `IngestRequest` (proto/tally/v1/tally.proto).
const EVENTS_FIELD: u32 = 1;

/// One event in its wire encoding.
pub(crate) fn encode_event(event: &Event) -> Bytes {
    Bytes::from(event.encode_to_vec())
}

/// Bytes one encoded event adds to a request: its key, its length, itself.
pub(crate) fn framed_len(encoded: &Bytes) -> usize {
    key_len(EVENTS_FIELD) + encoded_len_varint(encoded.len() as u64) + encoded.len()
}

/// An `IngestRequest` whose events are already encoded. Encode-only: the
/// client never decodes a request, so decoding skips every field.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct EncodedIngestRequest {
    pub(crate) events: Vec<Bytes>,
}

impl Message for EncodedIngestRequest {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        for event in &self.events {
            encode_key(EVENTS_FIELD, WireType::LengthDelimited, buf);
            encode_varint(event.len() as u64, buf);
            buf.put_slice(event);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl bytes::Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.events.iter().map(framed_len).sum()
    }

    fn clear(&mut self) {
        self.events.clear();
    }
}

/// `Ingest.Ingest` with pre-encoded events, on the node's tower stack (so
/// the same timeout, concurrency limit and error mapping as every stub).
pub(crate) async fn ingest(
    service: NodeService,
    request: tonic::Request<EncodedIngestRequest>,
) -> Result<tonic::Response<IngestResponse>, tonic::Status> {
    let mut grpc = Grpc::new(service);
    grpc.ready().await.map_err(|e| tonic::Status::unknown(format!("the node's channel is not ready: {e}")))?;
    let path = http::uri::PathAndQuery::from_static("/tally.v1.Ingest/Ingest");
    grpc.unary(request, path, tonic_prost::ProstCodec::default()).await
}

#[cfg(test)]
mod tests {
    use tally_proto::v1::IngestRequest;

    use super::*;

    fn event(i: u8) -> Event {
        Event {
            actor_id: Vec::new(),
            entity_id: vec![b'e', i],
            event_type: "view".into(),
            event_time_ms: 1_700_000_000_000 + i64::from(i),
            event_id: vec![i; 200], // long enough for a two-byte length
            value: Some(i64::from(i) - 3),
        }
    }

    #[test]
    fn the_server_decodes_it_as_the_ordinary_request() {
        let events: Vec<Event> = (0..5).map(event).collect();
        let encoded = EncodedIngestRequest { events: events.iter().map(encode_event).collect() };
        let bytes = encoded.encode_to_vec();
        assert_eq!(bytes.len(), encoded.encoded_len());
        assert_eq!(bytes, IngestRequest { events: events.clone() }.encode_to_vec());
        assert_eq!(IngestRequest::decode(bytes.as_slice()).ok(), Some(IngestRequest { events }));
    }

    #[test]
    fn framed_len_is_what_the_event_adds() {
        for i in 0..3 {
            let one = EncodedIngestRequest { events: vec![encode_event(&event(i))] };
            assert_eq!(framed_len(&one.events[0]), one.encode_to_vec().len());
        }
    }
}
