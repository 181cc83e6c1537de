//! What a client sees at the edges: each invalid field named in its error
//! while valid neighbours are still counted; batch limits; malformed
//! messages; health and reflection; a graceful restart keeping every count.

use std::time::Duration;

use cluster_tests::model::event;
use cluster_tests::{ClusterOptions, TestCluster};
use tally_proto::v1::{Event, IngestRequest, IngestResponse, SeriesRequest, StatsRequest};
use tonic::Code;

#[derive(Clone, PartialEq, prost::Message)]
struct Malformed {
    /// IngestRequest's field 1 is a repeated message; a varint there is not.
    #[prost(uint64, tag = "1")]
    events: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_of_the_api() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::shared().await;
    let mut cluster = TestCluster::start(ClusterOptions { nodes: 3, partitions: 8, args: vec![] }).await?;
    let now = tally_client::time_arg::now_ms();
    let mut ingest = cluster.ingest_client(2).await?;

    // One batch: every kind of invalid field between valid events.
    let events = vec![
        event("video-1", "view", now, "ok-1"),
        event("", "view", now, "bad-entity"),
        event("video-1", "View", now, "bad-type"),
        event("video-1", "", now, "empty-type"),
        event("video-1", "view", -5, "bad-time"),
        event(&"x".repeat(257), "view", now, "long-entity"),
        event("video-1", "view", now, &"i".repeat(65)),
        event("video-1", "view", now, "ok-2"),
        event("video-2", "like", now, "ok-3"),
    ];
    let resp = ingest.ingest(IngestRequest { events }).await?.into_inner();
    assert_eq!(resp.accepted, 3, "valid events survive invalid neighbours: {resp:?}");
    assert_eq!(resp.dedup_window_ms, 600_000, "the reply states the dedup window");
    let fields: Vec<(u32, &str)> = resp.rejected.iter().map(|r| (r.index, r.field.as_str())).collect();
    assert_eq!(
        fields,
        vec![
            (1, "entity_id"),
            (2, "event_type"),
            (3, "event_type"),
            (4, "event_time_ms"),
            (5, "entity_id"),
            (6, "event_id")
        ]
    );
    assert!(resp.rejected.iter().all(|r| !r.retryable && !r.reason.is_empty()));
    assert!(resp.rejected[1].reason.contains('V'), "the reason names the bad character: {}", resp.rejected[1].reason);

    // Batch limits: a clear RESOURCE_EXHAUSTED, and the node keeps serving.
    let too_many: Vec<Event> = (0..10_001).map(|i| event("video-3", "view", now, &format!("many-{i}"))).collect();
    let err = ingest.ingest(IngestRequest { events: too_many }).await.expect_err("over the event limit");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("10000"), "{}", err.message());
    // Valid events top out near 400 bytes, so oversized ids make a > 4 MiB batch.
    let big: Vec<Event> = (0..9_000).map(|i| event(&"e".repeat(250), "view", now, &format!("{i:0>500}"))).collect();
    let err = ingest.ingest(IngestRequest { events: big }).await.expect_err("over the byte limit");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("bytes"), "{}", err.message());

    // A malformed message is an error, not a crash.
    let mut grpc = tonic::client::Grpc::new(cluster.channel(1).await?);
    grpc.ready().await?;
    let err = grpc
        .unary(
            tonic::Request::new(Malformed { events: 5 }),
            tonic::codegen::http::uri::PathAndQuery::from_static("/tally.v1.Ingest/Ingest"),
            tonic_prost::ProstCodec::<Malformed, IngestResponse>::default(),
        )
        .await
        .expect_err("malformed request");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(
        err.message().starts_with("/tally.v1.Ingest/Ingest: request is not a valid tally.v1.IngestRequest"),
        "{}",
        err.message()
    );

    // Bad queries name their field.
    let mut query = cluster.query_client(3).await?;
    let err = query
        .stats(StatsRequest {
            share_partition_plus_one: 0,
            entity_id: b"video-1".to_vec(),
            event_type: "view".into(),
            from_ms: now,
            to_ms: now - 1,
            consistency: 0,
        })
        .await
        .expect_err("inverted range");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("to_ms"), "{}", err.message());
    let err = query
        .series(SeriesRequest {
            share_partition_plus_one: 0,
            entity_id: b"video-1".to_vec(),
            event_type: "view".into(),
            from_ms: 0,
            to_ms: now,
            granularity: 1,
            consistency: 0,
        })
        .await
        .expect_err("too many buckets");
    assert!(err.message().starts_with("granularity"), "{}", err.message());

    // Health and reflection on the public port.
    let mut health = tonic_health::pb::health_client::HealthClient::new(cluster.channel(1).await?);
    for service in ["tally.v1.Ingest", "tally.v1.Query", "tally.v1.Cluster"] {
        let r = health.check(tonic_health::pb::HealthCheckRequest { service: service.into() }).await?.into_inner();
        assert_eq!(r.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32, "{service}");
    }
    let services = list_services_v1(&cluster).await?;
    assert!(services.iter().any(|s| s == "tally.v1.Ingest"), "{services:?}");
    // The public port does not serve the peer protocol, nor list it.
    assert!(!services.iter().any(|s| s.starts_with("tally.internal")), "{services:?}");
    let services = list_services_v1alpha(&cluster).await?;
    assert!(services.iter().any(|s| s == "tally.v1.Query"), "{services:?}");
    assert!(!services.iter().any(|s| s.starts_with("tally.internal")), "{services:?}");

    // Graceful stop and restart: exit 0, every count intact.
    let before = stats(&cluster, 1, "video-1", "view", now).await?;
    assert_eq!(before, 2);
    let status = cluster.stop(1)?;
    assert!(status.success(), "SIGTERM exit: {status:?}");
    cluster.restart(1).await?;
    cluster.wait_ready(Duration::from_secs(30)).await?;
    assert_eq!(stats(&cluster, 1, "video-1", "view", now).await?, before);
    assert_eq!(stats(&cluster, 1, "video-2", "like", now).await?, 1);
    // Re-sent ids are still known after the restart.
    let resp = cluster
        .ingest_client(1)
        .await?
        .ingest(IngestRequest { events: vec![event("video-1", "view", now, "ok-1")] })
        .await?
        .into_inner();
    assert_eq!((resp.accepted, resp.duplicates), (0, 1));
    assert_eq!(resp.duplicate_indexes, vec![0]);
    Ok(())
}

async fn stats(cluster: &TestCluster, node: u64, entity: &str, event_type: &str, now: i64) -> anyhow::Result<u64> {
    let s = cluster
        .query_client(node)
        .await?
        .stats(StatsRequest {
            share_partition_plus_one: 0,
            entity_id: entity.into(),
            event_type: event_type.into(),
            from_ms: now - 3_600_000,
            to_ms: now + 60_000,
            consistency: 0,
        })
        .await?
        .into_inner();
    Ok(s.count)
}

/// Service names listed by one reflection version (v1 and v1alpha share
/// the message shapes but not the types).
macro_rules! list_services {
    ($name:ident, $pb:path) => {
        async fn $name(cluster: &TestCluster) -> anyhow::Result<Vec<String>> {
            use pb::server_reflection_client::ServerReflectionClient;
            use pb::server_reflection_request::MessageRequest;
            use pb::server_reflection_response::MessageResponse;
            use $pb as pb;
            let mut client = ServerReflectionClient::new(cluster.channel(1).await?);
            let req = pb::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut stream = client.server_reflection_info(futures::stream::iter([req])).await?.into_inner();
            let mut names = Vec::new();
            while let Some(msg) = stream.message().await? {
                if let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response {
                    names.extend(list.service.into_iter().map(|s| s.name));
                }
            }
            Ok(names)
        }
    };
}

list_services!(list_services_v1, tonic_reflection::pb::v1);
list_services!(list_services_v1alpha, tonic_reflection::pb::v1alpha);
