//! Serving: one tonic server per node with the public services, the
//! internal Raft service, gRPC health and reflection; graceful shutdown on
//! SIGTERM/SIGINT.

use std::time::Duration;

use anyhow::Context;
use tally_proto::internal::raft_server::RaftServer;
use tally_proto::v1::cluster_server::ClusterServer;
use tally_proto::v1::ingest_server::IngestServer;
use tally_proto::v1::query_server::QueryServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::api::{cluster::ClusterService, ingest::IngestService, query::QueryService};
use crate::config::NodeConfig;
use crate::node::Node;
use crate::raft::service::RaftService;

/// Largest message accepted; batch limits are checked against the decoded
/// request so the error can say which limit was exceeded.
const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// HTTP/2 streams per connection (see `run`).
const MAX_CONCURRENT_STREAMS: u32 = 16_384;

pub async fn run(config: NodeConfig) -> anyhow::Result<()> {
    let listener = TcpListener::bind(&config.listen).await.with_context(|| format!("binding {}", config.listen))?;
    let node = Node::start(config.clone()).await?;
    tracing::info!(node_id = node.id, listen = %config.listen, "tallyd started");

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<IngestServer<IngestService>>().await;
    health_reporter.set_serving::<QueryServer<QueryService>>().await;
    health_reporter.set_serving::<ClusterServer<ClusterService>>().await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tally_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("reflection service")?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tally_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("reflection service")?;

    let shutdown = async {
        wait_for_signal().await;
        tracing::info!("shutdown requested: no new requests; draining");
    };
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        // Every Raft group of a peer shares its one connection: with 1,000
        // partitions, elections and heartbeats alone exceed hyper's default
        // of 200 concurrent streams, and refused streams time out as
        // failed heartbeats and votes. Streams are small; bound them high.
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            IngestServer::new(IngestService::new(node.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(QueryServer::new(QueryService::new(node.clone())))
        .add_service(ClusterServer::new(ClusterService::new(node.clone())))
        .add_service(
            RaftServer::new(RaftService::new(node.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
        .context("gRPC server")?;
    // In-flight requests are done (tonic waits for them); stop the groups.
    let drained = tokio::time::timeout(Duration::from_secs(config.drain_secs), node.shutdown()).await;
    if drained.is_err() {
        tracing::warn!("shutdown took longer than {}s", config.drain_secs);
    }
    tracing::info!("tallyd stopped");
    Ok(())
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
