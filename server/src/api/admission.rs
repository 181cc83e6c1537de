//! Admission control for Ingest, in front of the request body.
//!
//! A tower layer around the generated Ingest service: each request first
//! waits up to [`ADMISSION_WAIT`] for one of [`MAX_CONCURRENT_REQUESTS`]
//! permits, and only then is its body read and decoded. A request that gets
//! no permit is answered RESOURCE_EXHAUSTED at once, with its body unread —
//! so a flood of large or slow requests costs a few bytes of headers each,
//! not a decoded batch each (which is what a semaphore inside the handler
//! would cost: tonic decodes the whole message before calling it). The
//! permit is held until the handler has answered.
//!
//! Memory held by admitted requests is then bounded by permits × the Ingest
//! decode limit (see `server.rs`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::Semaphore;
use tonic::codegen::http;
use tonic::server::NamedService;
use tower::{Layer, Service};

use super::retry_hint::{exhausted, BUSY_RETRY_AFTER, RETRY_AFTER_MS};

/// Ingest requests served at once per node.
pub const MAX_CONCURRENT_REQUESTS: usize = 256;
/// How long a request may wait for a slot before it is refused.
pub const ADMISSION_WAIT: Duration = Duration::from_secs(2);

/// Wraps a service with admission control.
#[derive(Clone)]
pub struct AdmissionLayer {
    permits: Arc<Semaphore>,
    max: usize,
    wait: Duration,
}

impl AdmissionLayer {
    pub fn new(max_concurrent: usize, wait: Duration) -> AdmissionLayer {
        AdmissionLayer { permits: Arc::new(Semaphore::new(max_concurrent)), max: max_concurrent, wait }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Admission<S> {
        Admission { inner, permits: self.permits.clone(), max: self.max, wait: self.wait }
    }
}

#[derive(Clone)]
pub struct Admission<S> {
    inner: S,
    permits: Arc<Semaphore>,
    max: usize,
    wait: Duration,
}

/// Routed under the wrapped service's name.
impl<S: NamedService> NamedService for Admission<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Admission<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        // The clone that was polled ready serves this request (tower's rule).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (permits, max, wait) = (self.permits.clone(), self.max, self.wait);
        Box::pin(async move {
            let permit = match tokio::time::timeout(wait, permits.acquire_owned()).await {
                Ok(Ok(permit)) => permit,
                // Timed out, or the semaphore closed (never: it is not closed).
                Ok(Err(_)) | Err(_) => {
                    crate::metrics::metrics().shed("ingest_slots");
                    let message = format!(
                        "{}: node busy: all {max} ingest slots stayed taken for {} ms; \
                         nothing was read or ingested; retry after {} ms (metadata {RETRY_AFTER_MS})",
                        request.uri().path(),
                        wait.as_millis(),
                        BUSY_RETRY_AFTER.as_millis()
                    );
                    return Ok(exhausted(message, BUSY_RETRY_AFTER).into_http());
                }
            };
            let response = inner.call(request).await;
            drop(permit);
            response
        })
    }
}
