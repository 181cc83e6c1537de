//! Bearer tokens: what the client presents when the cluster runs with
//! `tallyd --auth-file`. The token goes into every request's
//! `authorization: Bearer …` header: through a tower layer for
//! [`TallyClient`](crate::TallyClient) (`ClientConfig::token`), through a
//! tonic interceptor for raw stubs ([`connect_with_token`]).

use tonic::codegen::http::HeaderValue;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

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

/// TLS to a cluster that runs with `tallyd --tls-cert`: the CA that signed
/// the nodes' certificates, and a client certificate where the nodes
/// require one (`tallyd --tls-client-ca`).
#[derive(Clone)]
pub struct TlsFiles {
    ca: Certificate,
    identity: Option<Identity>,
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsFiles {{ client certificate: {} }}", self.identity.is_some())
    }
}

impl TlsFiles {
    /// From PEM: the CA, and optionally a client certificate and its key.
    pub fn from_pem(ca: Vec<u8>, client: Option<(Vec<u8>, Vec<u8>)>) -> TlsFiles {
        TlsFiles { ca: Certificate::from_pem(ca), identity: client.map(|(cert, key)| Identity::from_pem(cert, key)) }
    }

    /// Reads the PEM files.
    pub fn read(
        ca: &std::path::Path,
        cert: Option<&std::path::Path>,
        key: Option<&std::path::Path>,
    ) -> Result<TlsFiles> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| ClientError::Config(format!("reading {}: {e}", p.display())))
        };
        let client = match (cert, key) {
            (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
            (None, None) => None,
            _ => {
                return Err(ClientError::Config("a client certificate needs its key, and a key its certificate".into()))
            }
        };
        Ok(TlsFiles::from_pem(read(ca)?, client))
    }

    pub(crate) fn client_config(&self) -> ClientTlsConfig {
        let config = ClientTlsConfig::new().ca_certificate(self.ca.clone());
        match &self.identity {
            Some(identity) => config.identity(identity.clone()),
            None => config,
        }
    }
}

/// An endpoint for `addr` (`host:port` or a URI): https with `tls`.
pub(crate) fn endpoint(addr: &str, tls: Option<&TlsFiles>) -> Result<Endpoint> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let uri = if addr.contains("://") { addr.to_string() } else { format!("{scheme}://{addr}") };
    let address_error = |source| ClientError::Address { addr: addr.to_owned(), source };
    let endpoint = Endpoint::from_shared(uri).map_err(address_error)?;
    match tls {
        Some(tls) => endpoint.tls_config(tls.client_config()).map_err(address_error),
        None => Ok(endpoint),
    }
}

/// A channel whose calls carry a bearer token.
pub type TokenChannel = InterceptedService<Channel, BearerToken>;

/// Opens a channel to one node, accepting `host:port` or a full URI, whose
/// calls present `token` — for the raw generated stubs in
/// [`proto`](crate::proto). [`TallyClient`](crate::TallyClient) manages its
/// own connections.
pub async fn connect_with_token(addr: &str, token: Option<&str>) -> Result<TokenChannel> {
    connect_secure(addr, token, None).await
}

/// [`connect_with_token`] over TLS when `tls` is given.
pub async fn connect_secure(addr: &str, token: Option<&str>, tls: Option<&TlsFiles>) -> Result<TokenChannel> {
    let interceptor = BearerToken::new(token)?;
    let channel = endpoint(addr, tls)?
        .connect_timeout(std::time::Duration::from_secs(3))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| ClientError::NoCluster(format!("connecting to {addr}: {e}")))?;
    Ok(InterceptedService::new(channel, interceptor))
}
