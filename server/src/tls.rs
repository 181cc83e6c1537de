//! TLS of a node (`--tls-cert`, `--tls-key`, `--peer-ca`, `--tls-client-ca`).
//!
//! One certificate per node, issued by the cluster's CA (`--peer-ca`), is
//! used on both ports and for the node's own calls:
//! - the peer port requires a client certificate from the cluster's CA
//!   (mutual TLS): only nodes speak Raft, join, or forward proposals;
//! - the public port serves TLS with the same certificate; with
//!   `--tls-client-ca` it also requires client certificates from that CA;
//! - calls to other nodes (peer port, and public port for forwarded queries
//!   and cluster changes) verify the other node against the cluster's CA
//!   and present this node's certificate.
//!
//! All four flags are files in PEM. TLS is all or nothing for a node: a
//! certificate without the cluster's CA could not reach its peers, so it
//! is refused at start rather than failing at the first call.

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::config::NodeConfig;

/// A node's TLS material, read once at start.
#[derive(Clone)]
pub struct NodeTls {
    identity: Identity,
    peer_ca: Certificate,
    client_ca: Option<Certificate>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("{0}")]
    Flags(&'static str),
    #[error("reading {flag} {path}: {source}")]
    Read { flag: &'static str, path: String, source: std::io::Error },
}

fn read(flag: &'static str, path: &str) -> Result<Vec<u8>, TlsSetupError> {
    std::fs::read(Path::new(path)).map_err(|source| TlsSetupError::Read { flag, path: path.to_owned(), source })
}

impl NodeTls {
    /// The node's TLS from its configuration; `None` when it runs without.
    pub fn load(config: &NodeConfig) -> Result<Option<NodeTls>, TlsSetupError> {
        let (cert, key, peer_ca) = match (&config.tls_cert, &config.tls_key, &config.peer_ca) {
            (None, None, None) => {
                if config.tls_client_ca.is_some() {
                    return Err(TlsSetupError::Flags("--tls-client-ca needs --tls-cert, --tls-key and --peer-ca"));
                }
                return Ok(None);
            }
            (Some(cert), Some(key), Some(ca)) => (cert, key, ca),
            _ => {
                return Err(TlsSetupError::Flags(
                    "--tls-cert, --tls-key and --peer-ca go together: the node's certificate serves both ports, \
                     and the cluster's CA checks the other nodes it talks to",
                ))
            }
        };
        Ok(Some(NodeTls {
            identity: Identity::from_pem(read("--tls-cert", cert)?, read("--tls-key", key)?),
            peer_ca: Certificate::from_pem(read("--peer-ca", peer_ca)?),
            client_ca: match &config.tls_client_ca {
                Some(path) => Some(Certificate::from_pem(read("--tls-client-ca", path)?)),
                None => None,
            },
        }))
    }

    /// The peer port: this node's certificate; clients must be nodes.
    pub fn peer_server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(self.identity.clone()).client_ca_root(self.peer_ca.clone())
    }

    /// The public port: this node's certificate; client certificates only
    /// with `--tls-client-ca`.
    pub fn public_server(&self) -> ServerTlsConfig {
        let config = ServerTlsConfig::new().identity(self.identity.clone());
        match &self.client_ca {
            Some(ca) => config.client_ca_root(ca.clone()),
            None => config,
        }
    }

    /// Calls to other nodes: verify them against the cluster's CA, present
    /// this node's certificate.
    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new().ca_certificate(self.peer_ca.clone()).identity(self.identity.clone())
    }
}
