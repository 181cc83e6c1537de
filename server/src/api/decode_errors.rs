//! Status codes of requests that never reach a handler, as the API promises
//! them.
//!
//! tonic answers two failures itself, before any handler runs, with codes
//! the gRPC status guide gives for other cases: a body that is not a valid
//! protobuf message gets INTERNAL ("failed to decode Protobuf message"), and
//! a message over the service's decode limit gets OUT_OF_RANGE ("decoded
//! message length too large"). The first is the client's fault, so it is
//! INVALID_ARGUMENT; the second is a size limit, which the API promises as
//! RESOURCE_EXHAUSTED. This layer, on the public server, rewrites those
//! trailers-only answers and names the method and what failed.
//!
//! Why a layer and not a custom codec (tonic-prost-build `codec_path`): the
//! size limit is enforced by tonic's framing, outside any codec, so a codec
//! could fix only the first case; and a layer covers every service on the
//! listener (health and reflection too) without touching generated code,
//! which the clients share. It looks only at the response headers of
//! failures, so successful answers pass through untouched.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use prost::Message;
use tonic::codegen::http;
use tonic::{Code, Status};
use tower::{Layer, Service};

const DECODE_FAILED: &str = "failed to decode Protobuf message";
const TOO_LARGE: &str = "Error, decoded message length too large";

/// Rewrites tonic's decode failures on every service it wraps.
#[derive(Clone)]
pub struct DecodeErrorLayer {
    /// gRPC path (`/tally.v1.Ingest/Ingest`) → request message type.
    request_types: Arc<HashMap<String, String>>,
}

impl DecodeErrorLayer {
    /// `descriptor_sets`: encoded `FileDescriptorSet`s of the services
    /// served, to name each method's request type.
    pub fn new(descriptor_sets: &[&[u8]]) -> DecodeErrorLayer {
        let mut request_types = HashMap::new();
        for set in descriptor_sets {
            let Ok(set) = prost_types::FileDescriptorSet::decode(*set) else { continue };
            for file in &set.file {
                let package = file.package();
                for service in &file.service {
                    for method in &service.method {
                        let full = if package.is_empty() {
                            service.name().to_string()
                        } else {
                            format!("{package}.{}", service.name())
                        };
                        let path = format!("/{full}/{}", method.name());
                        request_types.insert(path, method.input_type().trim_start_matches('.').to_string());
                    }
                }
            }
        }
        DecodeErrorLayer { request_types: Arc::new(request_types) }
    }
}

impl<S> Layer<S> for DecodeErrorLayer {
    type Service = DecodeErrors<S>;

    fn layer(&self, inner: S) -> DecodeErrors<S> {
        DecodeErrors { inner, request_types: self.request_types.clone() }
    }
}

#[derive(Clone)]
pub struct DecodeErrors<S> {
    inner: S,
    request_types: Arc<HashMap<String, String>>,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for DecodeErrors<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let path = request.uri().path().to_string();
        let request_types = self.request_types.clone();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let mut response = answer.await?;
            // Only trailers-only answers carry grpc-status in the headers;
            // a successful answer never does.
            if let Some(status) = Status::from_header_map(response.headers()) {
                let request_type = request_types.get(&path).map(String::as_str);
                if let Some(fixed) = rewrite(&path, request_type, &status) {
                    replace_status(&mut response, fixed);
                }
            }
            Ok(response)
        })
    }
}

/// The status the API promises instead of `status`, if it differs.
fn rewrite(path: &str, request_type: Option<&str>, status: &Status) -> Option<Status> {
    let message = status.message();
    match status.code() {
        Code::Internal if message.starts_with(DECODE_FAILED) => {
            let detail = message.trim_start_matches(DECODE_FAILED).trim_start_matches(':').trim();
            let what = request_type.unwrap_or("request message");
            Some(Status::invalid_argument(format!("{path}: request is not a valid {what}: {detail}")))
        }
        Code::OutOfRange if message.starts_with(TOO_LARGE) => {
            let (found, limit) = sizes(message);
            Some(Status::resource_exhausted(match (found, limit) {
                (Some(found), Some(limit)) => {
                    format!("{path}: request message is {found} bytes; the limit is {limit} bytes for this method")
                }
                _ => format!("{path}: request message is over this method's size limit ({message})"),
            }))
        }
        _ => None,
    }
}

/// (found, limit) from tonic's "found N bytes, the limit is: M bytes".
fn sizes(message: &str) -> (Option<usize>, Option<usize>) {
    let number_after = |marker: &str| {
        let rest = &message[message.find(marker)? + marker.len()..];
        rest.trim_start().split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    };
    (number_after("found"), number_after("the limit is:"))
}

fn replace_status<B>(response: &mut http::Response<B>, status: Status) {
    let headers = response.headers_mut();
    headers.remove(Status::GRPC_STATUS);
    headers.remove(Status::GRPC_MESSAGE);
    headers.remove(Status::GRPC_STATUS_DETAILS);
    if status.add_header(headers).is_err() {
        // Cannot happen for an ASCII message; keep the original answer's
        // code rather than none at all.
        headers.insert(Status::GRPC_STATUS, http::HeaderValue::from(status.code() as i32));
    }
    response.extensions_mut().insert(status);
}

#[cfg(test)]
mod tests {
    use super::*;

    const INGEST: &str = "/tally.v1.Ingest/Ingest";

    #[test]
    fn request_types_come_from_the_descriptors() {
        let layer = DecodeErrorLayer::new(&[tally_proto::FILE_DESCRIPTOR_SET]);
        assert_eq!(layer.request_types.get(INGEST).map(String::as_str), Some("tally.v1.IngestRequest"));
        assert_eq!(
            layer.request_types.get("/tally.v1.Cluster/Initialize").map(String::as_str),
            Some("tally.v1.InitializeRequest")
        );
    }

    #[test]
    fn undecodable_is_invalid_argument_naming_method_and_field() {
        let tonic_says = Status::internal(
            "failed to decode Protobuf message: IngestRequest.events: invalid wire type: Varint (expected LengthDelimited)",
        );
        let fixed = rewrite(INGEST, Some("tally.v1.IngestRequest"), &tonic_says).expect("rewritten");
        assert_eq!(fixed.code(), Code::InvalidArgument);
        assert_eq!(
            fixed.message(),
            "/tally.v1.Ingest/Ingest: request is not a valid tally.v1.IngestRequest: IngestRequest.events: invalid wire type: Varint (expected LengthDelimited)"
        );
    }

    #[test]
    fn too_large_is_resource_exhausted_naming_the_limit() {
        let tonic_says = Status::out_of_range(
            "Error, decoded message length too large: found 62914560 bytes, the limit is: 4259840 bytes",
        );
        let fixed = rewrite(INGEST, None, &tonic_says).expect("rewritten");
        assert_eq!(fixed.code(), Code::ResourceExhausted);
        assert_eq!(
            fixed.message(),
            "/tally.v1.Ingest/Ingest: request message is 62914560 bytes; the limit is 4259840 bytes for this method"
        );
    }

    #[test]
    fn other_failures_pass_through() {
        assert!(rewrite(INGEST, None, &Status::internal("processor stopped")).is_none());
        assert!(rewrite(INGEST, None, &Status::out_of_range("to_ms: too far")).is_none());
        assert!(rewrite(INGEST, None, &Status::resource_exhausted("busy")).is_none());
    }

    #[test]
    fn the_rewritten_status_replaces_the_headers() {
        let mut response = Status::internal(format!("{DECODE_FAILED}: x")).into_http::<()>();
        replace_status(&mut response, Status::invalid_argument("fixed"));
        let seen = Status::from_header_map(response.headers()).expect("status");
        assert_eq!((seen.code(), seen.message()), (Code::InvalidArgument, "fixed"));
        assert_eq!(response.extensions().get::<Status>().map(Status::code), Some(Code::InvalidArgument));
    }
}
