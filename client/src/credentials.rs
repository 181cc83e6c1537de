//! Bearer tokens: what the client presents when the cluster runs with
//! `tallyd --auth-file`. The token goes into every request's
//! `authorization: Bearer …` header: through a tower layer for
//! [`TallyClient`](crate::TallyClient) (`ClientConfig::token`), through a
//! tonic interceptor for raw stubs ([`connect_with_token`]).

use tonic::codegen::http::HeaderValue;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};

use crate::error::{ClientError, Result};

/// The `authorization` header value for `token`.
pub fn bearer_header(token: &str) -> Result<HeaderValue> {
    let mut value = HeaderValue::try_from(format!("Bearer {}", token.trim()))
        .map_err(|_| ClientError::Config("the token has characters a header cannot carry".into()))?;
    // Never printed by debug output of the request.
    value.set_sensitive(true);
    Ok(value)
}

/// Adds the token to every call of a raw stub; no token, no header.
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    /// The interceptor for `token` (`None`: a cluster without tokens).
    pub fn new(token: Option<&str>) -> Result<BearerToken> {
        let Some(token) = token else { return Ok(BearerToken(None)) };
        let mut value = MetadataValue::try_from(format!("Bearer {}", token.trim()))
            .map_err(|_| ClientError::Config("the token has characters a header cannot carry".into()))?;
        value.set_sensitive(true);
        Ok(BearerToken(Some(value)))
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "BearerToken(***)" } else { "BearerToken(none)" })
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel whose calls carry a bearer token.
pub type TokenChannel = InterceptedService<Channel, BearerToken>;

/// Opens a channel to one node, accepting `host:port` or a full URI, whose
/// calls present `token` — for the raw generated stubs in
/// [`proto`](crate::proto). [`TallyClient`](crate::TallyClient) manages its
/// own connections.
pub async fn connect_with_token(addr: &str, token: Option<&str>) -> Result<TokenChannel> {
    let interceptor = BearerToken::new(token)?;
    let uri = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
    let endpoint =
        Endpoint::from_shared(uri).map_err(|source| ClientError::Address { addr: addr.to_owned(), source })?;
    let channel = endpoint
        .connect_timeout(std::time::Duration::from_secs(3))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| ClientError::NoCluster(format!("connecting to {addr}: {e}")))?;
    Ok(InterceptedService::new(channel, interceptor))
}
