//! Bearer tokens on the public port (`--auth-file`): who may ingest, read
//! or change the cluster.
//!
//! The file lists tokens by their SHA-256, never the tokens themselves, one
//! per line: `NAME ROLES SHA256-HEX` (`#` starts a comment), e.g.
//!
//! ```text
//! # echo -n "$TOKEN" | sha256sum
//! ingest-service  writer         9f86d081884c7d65…
//! grafana         reader         60303ae22b998861…
//! ops             admin          fd61a03af4f77d87…
//! tallyd          node           2c26b46b68ffc68f…
//! ```
//!
//! Roles: `writer` calls Ingest; `reader` calls Query and the read-only
//! Cluster calls (Digest, Stages); `admin` calls every Cluster method (init,
//! add/remove node, transfer, rebalance) and what a reader may; any role may
//! call Cluster.Status, because a client that only writes must still learn
//! which node leads which partition to route its events;
//! `node` is what nodes present to each other (`--node-token-file`): they
//! forward queries and cluster changes to the node that must serve them.
//! Health and reflection stay open, so probes and tools need no token.
//!
//! A missing or unknown token is `UNAUTHENTICATED`, a token without the role
//! the method needs `PERMISSION_DENIED`; both name the method and, for the
//! second, the token's name and the role it lacks — never the token. The
//! file is read again on SIGHUP; a file that does not parse then leaves the
//! previous one in force (and says so in the log).
//!
//! A tower layer rather than tonic interceptors: the role depends on the
//! method (Cluster.Status needs less than Cluster.Initialize), and only the
//! HTTP request carries the method's path.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};
use tonic::codegen::http;
use tonic::Status;
use tower::{Layer, Service};

use crate::sync::RwLockExt;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Writer,
    Reader,
    Admin,
    Node,
}

impl Role {
    fn parse(name: &str) -> Option<Role> {
        match name {
            "writer" => Some(Role::Writer),
            "reader" => Some(Role::Reader),
            "admin" => Some(Role::Admin),
            "node" => Some(Role::Node),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Role::Writer => "writer",
            Role::Reader => "reader",
            Role::Admin => "admin",
            Role::Node => "node",
        }
    }
}

/// What a method needs of the caller's token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// A token with this role (admin also serves for reader; node for all).
    Role(Role),
    /// Any listed token: Cluster.Status, which routing needs.
    AnyToken,
}

impl Need {
    fn name(self) -> &'static str {
        match self {
            Need::Role(r) => r.name(),
            Need::AnyToken => "any",
        }
    }
}

/// What a method needs; `None`: open to anyone.
pub fn required(path: &str) -> Option<Need> {
    if path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.") {
        return None;
    }
    if path.starts_with("/tally.v1.Ingest/") {
        return Some(Need::Role(Role::Writer));
    }
    if path.starts_with("/tally.v1.Query/") {
        return Some(Need::Role(Role::Reader));
    }
    match path {
        "/tally.v1.Cluster/Status" => Some(Need::AnyToken),
        "/tally.v1.Cluster/Digest" | "/tally.v1.Cluster/Stages" => Some(Need::Role(Role::Reader)),
        _ => Some(Need::Role(Role::Admin)),
    }
}

/// One token's grant.
#[derive(Debug, Clone)]
struct Grant {
    name: String,
    roles: Vec<Role>,
}

impl Grant {
    fn allows(&self, need: Need) -> bool {
        let Need::Role(needed) = need else { return true };
        self.roles.iter().any(|&r| r == needed || r == Role::Node || (r == Role::Admin && needed == Role::Reader))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthFileError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} line {line}: {problem}")]
    Line { path: PathBuf, line: usize, problem: String },
}

/// The tokens of an auth file, by SHA-256.
#[derive(Debug, Default)]
pub struct TokenTable {
    by_hash: HashMap<[u8; 32], Grant>,
}

impl TokenTable {
    pub fn load(path: &Path) -> Result<TokenTable, AuthFileError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| AuthFileError::Read { path: path.to_owned(), source })?;
        Self::parse(&text).map_err(|(line, problem)| AuthFileError::Line { path: path.to_owned(), line, problem })
    }

    /// Parses the file's text; on error, the 1-based line and what is wrong.
    pub fn parse(text: &str) -> Result<TokenTable, (usize, String)> {
        let mut by_hash = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [name, roles, hash] = fields[..] else {
                return Err((i + 1, format!("expected NAME ROLES SHA256-HEX, found {} fields", fields.len())));
            };
            let roles = roles
                .split(',')
                .map(|r| {
                    Role::parse(r).ok_or_else(|| (i + 1, format!("unknown role {r:?} (writer, reader, admin, node)")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let hash =
                parse_sha256(hash).ok_or_else(|| (i + 1, "the hash is not 64 hex digits (sha256sum)".to_string()))?;
            if by_hash.insert(hash, Grant { name: name.to_string(), roles }).is_some() {
                return Err((i + 1, format!("the token of {name:?} is listed twice")));
            }
        }
        Ok(TokenTable { by_hash })
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// Whether a request with `authorization` (the header's value) may call
    /// `path`; the refusal otherwise.
    pub fn check(&self, path: &str, authorization: Option<&[u8]>) -> Result<(), Status> {
        let Some(needed) = required(path) else { return Ok(()) };
        let token = authorization
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty());
        let Some(token) = token else {
            return Err(Status::unauthenticated(format!(
                "{path} needs a bearer token (metadata authorization: Bearer TOKEN) with the {} role",
                needed.name()
            )));
        };
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let Some(grant) = self.by_hash.get(&hash) else {
            return Err(Status::unauthenticated(format!(
                "{path}: the bearer token is not in this cluster's auth file"
            )));
        };
        if grant.allows(needed) {
            return Ok(());
        }
        let roles: Vec<&str> = grant.roles.iter().map(|r| r.name()).collect();
        Err(Status::permission_denied(format!(
            "{path} needs the {} role; token {:?} has {}",
            needed.name(),
            grant.name,
            roles.join(",")
        )))
    }
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.strip_prefix("sha256:").unwrap_or(hex);
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The tokens in force; `None` when the node runs without `--auth-file`.
#[derive(Clone, Default)]
pub struct Tokens(Arc<RwLock<Option<Arc<TokenTable>>>>);

impl Tokens {
    pub fn new(table: Option<TokenTable>) -> Tokens {
        Tokens(Arc::new(RwLock::new(table.map(Arc::new))))
    }

    /// Checks a request for `path` as the public port would; `Ok` when the
    /// node runs without tokens. For other listeners that serve the same
    /// data (the dashboard's JSON).
    pub fn check(&self, path: &str, authorization: Option<&[u8]>) -> Result<(), Status> {
        match self.current() {
            Some(table) => table.check(path, authorization),
            None => Ok(()),
        }
    }

    fn current(&self) -> Option<Arc<TokenTable>> {
        self.0.read_unpoisoned().clone()
    }

    /// Reads `path` again on every SIGHUP for as long as the process runs.
    pub fn reload_on_sighup(&self, path: PathBuf) {
        let tokens = self.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let mut hangups = match signal(SignalKind::hangup()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGHUP: the auth file will not be reloaded");
                    return;
                }
            };
            while hangups.recv().await.is_some() {
                match TokenTable::load(&path) {
                    Ok(table) => {
                        tracing::info!(tokens = table.len(), path = %path.display(), "auth file reloaded");
                        *tokens.0.write_unpoisoned() = Some(Arc::new(table));
                    }
                    Err(e) => tracing::error!(error = %e, "auth file not reloaded; the previous tokens stay in force"),
                }
            }
        });
    }
}

/// The tower layer that checks every public request against [`Tokens`].
#[derive(Clone)]
pub struct AuthLayer {
    tokens: Tokens,
}

impl AuthLayer {
    pub fn new(tokens: Tokens) -> AuthLayer {
        AuthLayer { tokens }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Authenticated<S>;

    fn layer(&self, inner: S) -> Authenticated<S> {
        Authenticated { inner, tokens: self.tokens.clone() }
    }
}

#[derive(Clone)]
pub struct Authenticated<S> {
    inner: S,
    tokens: Tokens,
}

impl<S, ReqBody> Service<http::Request<ReqBody>> for Authenticated<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        if let Some(table) = self.tokens.current() {
            let header = request.headers().get(http::header::AUTHORIZATION).map(|v| v.as_bytes());
            if let Err(refusal) = table.check(request.uri().path(), header) {
                return Box::pin(async move { Ok(refusal.into_http()) });
            }
        }
        Box::pin(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(token: &str) -> String {
        Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
    }

    fn table() -> TokenTable {
        let text = format!(
            "# comment\nw writer {}\nr reader {}\na admin {} # trailing\nn node {}\nwr writer,reader {}\n",
            hash("tw"),
            hash("tr"),
            hash("ta"),
            hash("tn"),
            hash("twr")
        );
        TokenTable::parse(&text).unwrap()
    }

    fn code(t: &TokenTable, path: &str, token: Option<&str>) -> Option<tonic::Code> {
        let header = token.map(|t| format!("Bearer {t}"));
        t.check(path, header.as_deref().map(str::as_bytes)).err().map(|s| s.code())
    }

    #[test]
    fn each_role_may_do_exactly_its_part() {
        // Columns: Ingest, Query.Stats, Cluster.Status, Cluster.Initialize.
        use tonic::Code::{PermissionDenied as Denied, Unauthenticated as Unauth};
        let t = table();
        let ingest = "/tally.v1.Ingest/Ingest";
        let stats = "/tally.v1.Query/Stats";
        let status = "/tally.v1.Cluster/Status";
        let init = "/tally.v1.Cluster/Initialize";
        let health = "/grpc.health.v1.Health/Check";
        for (token, expected) in [
            (Some("tw"), [None, Some(Denied), None, Some(Denied)]),
            (Some("tr"), [Some(Denied), None, None, Some(Denied)]),
            (Some("ta"), [Some(Denied), None, None, None]),
            (Some("tn"), [None, None, None, None]),
            (Some("twr"), [None, None, None, Some(Denied)]),
            (Some("wrong"), [Some(Unauth); 4]),
            (None, [Some(Unauth); 4]),
        ] {
            let got = [ingest, stats, status, init].map(|p| code(&t, p, token));
            assert_eq!(got, expected, "token {token:?}");
            assert_eq!(code(&t, health, token), None, "health is open");
        }
    }

    #[test]
    fn refusals_name_the_method_and_role_never_the_token() {
        let t = table();
        assert_eq!(code(&t, "/tally.v1.Cluster/Digest", Some("tw")), Some(tonic::Code::PermissionDenied));
        let denied = t.check("/tally.v1.Cluster/AddNode", Some(b"Bearer tw")).unwrap_err();
        assert!(denied.message().contains("AddNode") && denied.message().contains("admin"), "{denied:?}");
        assert!(denied.message().contains("\"w\"") && !denied.message().contains("tw\""), "{denied:?}");
        let unknown = t.check("/tally.v1.Query/Stats", Some(b"Bearer s3cret")).unwrap_err();
        assert!(!unknown.message().contains("s3cret"), "{unknown:?}");
    }

    #[test]
    fn bad_files_name_the_line() {
        assert_eq!(TokenTable::parse("a writer").unwrap_err().0, 1);
        let e = TokenTable::parse(&format!("\na root {}", hash("x"))).unwrap_err();
        assert_eq!(e.0, 2);
        assert!(e.1.contains("root"));
        assert!(TokenTable::parse("a writer abc").unwrap_err().1.contains("64 hex"));
        let twice = format!("a writer {0}\nb reader {0}\n", hash("x"));
        assert!(TokenTable::parse(&twice).unwrap_err().1.contains("twice"));
    }
}
