//! Serving: two gRPC listeners per node, and graceful shutdown on
//! SIGTERM/SIGINT.
//!
//! * The public listener (`--listen`) serves what clients may call: Ingest,
//!   Query, Cluster, gRPC health and reflection (v1 and v1alpha, listing the
//!   public services only). It is built by [`public_server`]: per-service
//!   decode limits (Ingest just above the 4 MiB batch limit, the rest 1 MiB),
//!   admission control in front of Ingest's body, a moderate stream limit,
//!   and the layer that gives decode failures the codes the API promises.
//! * The peer listener (`--peer-listen`) serves only the internal Raft
//!   service (and health): Raft RPCs, snapshots, forwarded proposals and
//!   liveness pings. Nothing on it is reachable from the public port, so it
//!   can be firewalled to the cluster's own hosts; [`peer_server`] is the one
//!   place that builds it, where mutual TLS for peers will go.
//! * The HTTP listener (`--http-listen`, off by default) serves metrics and
//!   health for operators' tools (`api/http.rs`).
//!
//! On SIGTERM the public listener stops accepting and drains its requests
//! while the peer listener keeps serving, so this node's Raft groups still
//! hear their peers (and commit what is being drained); then the peer
//! listener stops and the groups shut down.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prost::Message;
use tally_proto::internal::raft_server::RaftServer;
use tally_proto::v1::cluster_server::ClusterServer;
use tally_proto::v1::ingest_server::IngestServer;
use tally_proto::v1::query_server::QueryServer;
use tally_proto::validate::MAX_BATCH_BYTES;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::server::Router;
use tonic_health::pb::health_server::{Health, HealthServer};
use tower::layer::util::{Identity, Stack};
use tower::Layer;

use crate::api::admission::{AdmissionLayer, ADMISSION_WAIT, MAX_CONCURRENT_REQUESTS};
use crate::api::auth::{AuthLayer, Tokens};
use crate::api::decode_errors::DecodeErrorLayer;
use crate::api::raft_service::RaftService;
use crate::api::{cluster::ClusterService, ingest::IngestService, query::QueryService};
use crate::config::NodeConfig;
use crate::node::Node;

/// Largest Ingest message decoded: a little above the batch limit, so a
/// batch just over it is decoded and answered with its exact size, while
/// anything much larger is refused from its 5-byte length prefix, unread.
const INGEST_DECODE_LIMIT: usize = MAX_BATCH_BYTES + (64 << 10);
/// Largest Query or Cluster request decoded (they are a few hundred bytes).
const SMALL_DECODE_LIMIT: usize = 1 << 20;
/// HTTP/2 streams per public connection: enough for a pipelining client,
/// not a 16k-stream amplifier.
const PUBLIC_MAX_CONCURRENT_STREAMS: u32 = 1_024;
/// Largest peer message: Raft entries batch up to 64 entries of group
/// commits; snapshots travel in 1 MiB chunks.
use crate::raft::peer_link::PEER_MAX_MESSAGE_BYTES;
/// HTTP/2 streams per peer connection. Raft messages of every group share
/// two long-lived streams per peer (`raft/peer_link.rs`); the rest are
/// snapshots, forwarded proposals and pings. Proposals forwarded under load
/// are the most numerous; bound them high.
const PEER_MAX_CONCURRENT_STREAMS: u32 = 16_384;
/// Streams a peer may reset before their request was even accepted, before
/// the connection is dropped as abusive. h2's default (20) let a burst of
/// timed-out calls take every group's traffic down with the connection.
const PEER_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 4_096;

pub async fn run(config: NodeConfig) -> anyhow::Result<()> {
    if let Some(point) = &config.crash_at {
        crate::crash_point::arm(point).map_err(|e| anyhow::anyhow!(e))?;
    }
    let public_listener =
        TcpListener::bind(&config.listen).await.with_context(|| format!("binding --listen {}", config.listen))?;
    let peer_listener = TcpListener::bind(&config.peer_listen)
        .await
        .with_context(|| format!("binding --peer-listen {}", config.peer_listen))?;
    let http_listener = match config.http_listen.as_str() {
        "" => None,
        addr => Some(TcpListener::bind(addr).await.with_context(|| format!("binding --http-listen {addr}"))?),
    };
    if config.auth_file.is_some() && config.node_token_file.is_none() {
        anyhow::bail!(
            "--auth-file needs --node-token-file: nodes forward queries and cluster changes to each other's \
             public port, and with tokens on they must present one with the node role"
        );
    }
    let tokens = match &config.auth_file {
        Some(path) => {
            let table = crate::api::auth::TokenTable::load(std::path::Path::new(path))?;
            tracing::info!(tokens = table.len(), path = %path, "bearer tokens required on the public port");
            let tokens = crate::api::auth::Tokens::new(Some(table));
            tokens.reload_on_sighup(path.into());
            tokens
        }
        None => crate::api::auth::Tokens::new(None),
    };
    let tls = crate::tls::NodeTls::load(&config)?;
    if tls.is_some() {
        tracing::info!("TLS on both ports; the peer port accepts only certificates from --peer-ca");
    }
    let node = Node::start(config.clone(), tls.as_ref().map(|t| t.client())).await?;
    if let Some(listener) = http_listener {
        // Metrics and health only: it lives as long as the process and
        // stops with it; a failure is logged, never fatal to serving.
        let router = crate::api::http::router(node.clone(), tokens.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::error!(error = %e, "HTTP listener (--http-listen) stopped");
            }
        });
    }
    crate::reconciler::spawn(node.clone(), Arc::new(crate::api::peer_reports::StatusReports));
    crate::api::spread::spawn_completer(node.clone());
    crate::api::split::spawn_completer(node.clone());
    crate::api::auto_spread::spawn(node.clone());
    crate::api::auto_split::spawn(node.clone());
    crate::api::balancer::spawn(node.clone());
    crate::checkpointer::spawn(Arc::downgrade(&node), Duration::from_millis(node.config.checkpoint_interval_ms.max(1)));
    crate::expiry::spawn(Arc::downgrade(&node), Duration::from_millis(node.config.retention_check_ms.max(100)));
    crate::archiver::spawn(Arc::downgrade(&node), Duration::from_millis(node.config.archive_check_ms.max(100)));
    tracing::info!(node_id = node.id, listen = %config.listen, peer_listen = %config.peer_listen, "tallyd started");

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<IngestServer<IngestService>>().await;
    health_reporter.set_serving::<QueryServer<QueryService>>().await;
    health_reporter.set_serving::<ClusterServer<ClusterService>>().await;

    let (stop_peers, peers_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut peer_serving =
        tokio::spawn(peer_server(&node, health_service.clone(), tls.as_ref())?.serve_with_incoming_shutdown(
            TcpListenerStream::new(peer_listener),
            async move {
                let _ = peers_stopped.await;
            },
        ));
    let shutdown = async {
        wait_for_signal().await;
        tracing::info!("shutdown requested: no new requests; draining");
    };
    let public_serving = public_server(&node, health_service, tokens, tls.as_ref())?
        .serve_with_incoming_shutdown(TcpListenerStream::new(public_listener), shutdown);
    tokio::select! {
        served = public_serving => served.context("public gRPC server")?,
        served = &mut peer_serving => {
            // The node cannot take part in Raft any more: stop rather than
            // serve clients with groups that hear nobody.
            match served {
                Ok(Ok(())) => anyhow::bail!("peer gRPC server stopped"),
                Ok(Err(e)) => return Err(e).context("peer gRPC server"),
                Err(e) => return Err(e).context("peer gRPC server task"),
            }
        }
    }
    // Public requests are done (tonic waits for them); now peers, then groups.
    let _ = stop_peers.send(());
    let drain = Duration::from_secs(config.drain_secs);
    if tokio::time::timeout(drain, peer_serving).await.is_err() {
        tracing::warn!("peer connections still open after {}s", config.drain_secs);
    }
    if tokio::time::timeout(drain, node.shutdown()).await.is_err() {
        tracing::warn!("shutdown took longer than {}s", config.drain_secs);
    }
    tracing::info!("tallyd stopped");
    Ok(())
}

/// The public listener's server: Ingest, Query, Cluster, health and
/// reflection, with the limits described in the module docs.
fn public_server(
    node: &std::sync::Arc<Node>,
    health: HealthServer<impl Health>,
    tokens: Tokens,
    tls: Option<&crate::tls::NodeTls>,
) -> anyhow::Result<Router<Stack<DecodeErrorLayer, Stack<AuthLayer, Identity>>>> {
    let descriptors = public_descriptors().context("public file descriptors")?;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(&descriptors)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("reflection service")?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(&descriptors)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("reflection service")?;
    let ingest = AdmissionLayer::new(MAX_CONCURRENT_REQUESTS, ADMISSION_WAIT)
        .layer(IngestServer::new(IngestService::new(node.clone())).max_decoding_message_size(INGEST_DECODE_LIMIT));
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls.public_server()).context("TLS of the public port")?;
    }
    Ok(builder
        .tcp_nodelay(true)
        .max_concurrent_streams(PUBLIC_MAX_CONCURRENT_STREAMS)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .layer(AuthLayer::new(tokens))
        .layer(DecodeErrorLayer::new(&[tally_proto::FILE_DESCRIPTOR_SET, tonic_health::pb::FILE_DESCRIPTOR_SET]))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(ingest)
        .add_service(QueryServer::new(QueryService::new(node.clone())).max_decoding_message_size(SMALL_DECODE_LIMIT))
        .add_service(
            ClusterServer::new(ClusterService::new(node.clone())).max_decoding_message_size(SMALL_DECODE_LIMIT),
        ))
}

/// The peer listener's server: the internal Raft service and health, nothing
/// a client calls. Peer authentication (mTLS: `tls_config` with a client CA)
/// belongs on this builder alone.
fn peer_server(
    node: &std::sync::Arc<Node>,
    health: HealthServer<impl Health>,
    tls: Option<&crate::tls::NodeTls>,
) -> anyhow::Result<Router> {
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls.peer_server()).context("TLS of the peer port")?;
    }
    Ok(builder
        .tcp_nodelay(true)
        .max_concurrent_streams(PEER_MAX_CONCURRENT_STREAMS)
        .http2_max_pending_accept_reset_streams(Some(PEER_MAX_PENDING_ACCEPT_RESET_STREAMS))
        .initial_stream_window_size(crate::raft::peers::PEER_STREAM_WINDOW)
        .initial_connection_window_size(crate::raft::peers::PEER_CONNECTION_WINDOW)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .add_service(health)
        .add_service(
            RaftServer::new(RaftService::new(node.clone()))
                .max_decoding_message_size(PEER_MAX_MESSAGE_BYTES)
                .max_encoding_message_size(PEER_MAX_MESSAGE_BYTES),
        ))
}

/// Tally's file descriptors without the internal ones, for reflection on
/// the public port: it lists only what that port serves.
fn public_descriptors() -> Result<Vec<u8>, prost::DecodeError> {
    let mut set = prost_types::FileDescriptorSet::decode(tally_proto::FILE_DESCRIPTOR_SET)?;
    set.file.retain(|f| !f.package().starts_with("tally.internal."));
    Ok(set.encode_to_vec())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
