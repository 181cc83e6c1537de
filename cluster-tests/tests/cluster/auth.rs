//! Bearer tokens on real nodes (`tallyd --auth-file`, `api/auth.rs`): a
//! call without a token or with one the file does not list is
//! UNAUTHENTICATED; each role does exactly its part (writer ingests and
//! reads the map to route, reader queries and reads status, admin changes
//! the cluster), anything else is
//! PERMISSION_DENIED; health stays open; queries sent to a node that must
//! forward them still answer (nodes present the node token to each other);
//! the CLI passes `--token`; the dashboard's JSON asks for the same tokens
//! (metrics stay open); SIGHUP reloads the file on that node; no token
//! appears in any log; and a node with --auth-file but no node token
//! refuses to start.

use std::io::Write;

use cluster_tests::{ClusterOptions, TestCluster};
use sha2::{Digest, Sha256};
use tally_proto::v1::cluster_client::ClusterClient;
use tally_proto::v1::ingest_client::IngestClient;
use tally_proto::v1::query_client::QueryClient;
use tally_proto::v1::{Consistency, Event, IngestRequest, RebalanceRequest, StatsRequest, StatusRequest};
use tonic::Code;

const WRITER: &str = "wr-5b1f0c2e9d7a4c3f8e6d";
const READER: &str = "rd-0a9e8d7c6b5a4f3e2d1c";
const ADMIN: &str = "ad-f1e2d3c4b5a69788a9b0";
const NODE: &str = "nd-13579bdf2468ace0fedc";
const LATE_READER: &str = "rd2-8c7b6a5f4e3d2c1b0a99";

fn line(name: &str, roles: &str, token: &str) -> String {
    let hash: String = Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    format!("{name} {roles} {hash}\n")
}

async fn channel(cluster: &TestCluster, node: u64, token: Option<&str>) -> anyhow::Result<tally_client::TokenChannel> {
    Ok(tally_client::connect_with_token(&cluster.addr(node)?, token).await?)
}

/// The gRPC code of a result (`Ok` for success).
fn code<T>(result: Result<tonic::Response<T>, tonic::Status>) -> Code {
    result.map(|_| Code::Ok).unwrap_or_else(|s| s.code())
}

fn events(tag: &str, n: u32) -> Vec<Event> {
    let now = tally_client::time_arg::now_ms();
    (0..n)
        .map(|i| Event {
            actor_id: Vec::new(),
            entity_id: format!("video-auth-{}", i % 5).into_bytes(),
            event_type: "view".into(),
            event_time_ms: now,
            event_id: format!("{tag}-{i}").into_bytes(),
            value: None,
        })
        .collect()
}

fn stats(entity: &str) -> StatsRequest {
    StatsRequest {
        share_partition_plus_one: 0,
        entity_id: entity.as_bytes().to_vec(),
        event_type: "view".into(),
        from_ms: 0,
        to_ms: tally_client::time_arg::now_ms() + 120_000,
        consistency: Consistency::Linearizable as i32,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_roles_guard_the_public_port() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::shared().await;
    let dir = tempfile::tempdir()?;
    let auth_file = dir.path().join("tokens");
    let node_token = dir.path().join("node-token");
    std::fs::write(
        &auth_file,
        format!(
            "# test tokens\n{}{}{}{}",
            line("ingester", "writer", WRITER),
            line("dashboard", "reader", READER),
            line("ops", "admin", ADMIN),
            line("tallyd", "node", NODE)
        ),
    )?;
    std::fs::write(&node_token, format!("{NODE}\n"))?;

    // Without a node token a node with tokens on refuses to start.
    let lonely = std::process::Command::new(cluster_tests::tallyd_binary()?)
        .args(["--node-id", "9", "--listen", "127.0.0.1:0", "--peer-listen", "127.0.0.1:0"])
        .arg("--auth-file")
        .arg(&auth_file)
        .arg("--data-dir")
        .arg(dir.path().join("lonely"))
        .output()?;
    assert!(!lonely.status.success());
    assert!(String::from_utf8_lossy(&lonely.stderr).contains("--node-token-file"), "{lonely:?}");

    let args = vec![
        "--auth-file".to_string(),
        auth_file.display().to_string(),
        "--node-token-file".to_string(),
        node_token.display().to_string(),
    ];
    let cluster = TestCluster::start(ClusterOptions { nodes: 3, partitions: 8, args }).await?;

    // No token, an unknown token: UNAUTHENTICATED, whatever the method.
    for token in [None, Some("not-a-listed-token")] {
        let ch = channel(&cluster, 1, token).await?;
        assert_eq!(
            code(IngestClient::new(ch.clone()).ingest(IngestRequest { events: events("x", 1) }).await),
            Code::Unauthenticated
        );
        assert_eq!(code(QueryClient::new(ch.clone()).stats(stats("video-auth-0")).await), Code::Unauthenticated);
        assert_eq!(code(ClusterClient::new(ch).status(StatusRequest {}).await), Code::Unauthenticated);
    }
    let refusal = IngestClient::new(channel(&cluster, 1, None).await?)
        .ingest(IngestRequest { events: events("x", 1) })
        .await
        .unwrap_err();
    assert!(refusal.message().contains("bearer token") && refusal.message().contains("writer"), "{refusal:?}");

    // Health needs no token.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(&cluster, 1, None).await?);
    let serving = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await?.into_inner();
    assert_eq!(serving.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    // Each role: exactly its part. Writes go to every node (forwarded to
    // leaders over the peer port), reads to every node (forwarded to leaders
    // over the public port, with the node token).
    let mut accepted = 0;
    for node in 1..=3 {
        let writer = channel(&cluster, node, Some(WRITER)).await?;
        let reply = IngestClient::new(writer.clone())
            .ingest(IngestRequest { events: events(&format!("n{node}"), 20) })
            .await?
            .into_inner();
        accepted += reply.accepted;
        assert_eq!(code(QueryClient::new(writer.clone()).stats(stats("video-auth-0")).await), Code::PermissionDenied);
        // Status, which a writing client needs to route, is open to it.
        assert_eq!(code(ClusterClient::new(writer.clone()).status(StatusRequest {}).await), Code::Ok);
        let digest = ClusterClient::new(writer).digest(tally_proto::v1::DigestRequest { partitions: vec![] }).await;
        assert_eq!(code(digest), Code::PermissionDenied);
    }
    assert_eq!(accepted, 60);
    for node in 1..=3 {
        let reader = channel(&cluster, node, Some(READER)).await?;
        let mut total = 0;
        for e in 0..5 {
            total +=
                QueryClient::new(reader.clone()).stats(stats(&format!("video-auth-{e}"))).await?.into_inner().count;
        }
        assert_eq!(total, 60, "node {node}: every event counted once, read through any node");
        assert_eq!(code(ClusterClient::new(reader.clone()).status(StatusRequest {}).await), Code::Ok);
        assert_eq!(
            code(IngestClient::new(reader.clone()).ingest(IngestRequest { events: events("r", 1) }).await),
            Code::PermissionDenied
        );
        let denied = ClusterClient::new(reader).rebalance(RebalanceRequest {}).await.unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied);
        assert!(denied.message().contains("admin") && denied.message().contains("dashboard"), "{denied:?}");
    }
    let admin = channel(&cluster, 2, Some(ADMIN)).await?;
    assert_eq!(code(ClusterClient::new(admin.clone()).rebalance(RebalanceRequest {}).await), Code::Ok);
    assert_eq!(code(ClusterClient::new(admin.clone()).status(StatusRequest {}).await), Code::Ok);
    assert_eq!(
        code(IngestClient::new(admin).ingest(IngestRequest { events: events("a", 1) }).await),
        Code::PermissionDenied
    );

    // The CLI passes --token: a writer's client routes and ingests, a
    // reader's reads.
    let addr = cluster.addr(3)?;
    let run =
        cluster_tests::cli::tally(&addr, &["--token", WRITER, "ingest", "video-auth-1", "view", "--repeat", "3"], None)
            .await?;
    assert_eq!(run.code, 0, "{run:?}");
    let run = cluster_tests::cli::tally(
        &addr,
        &["--token", READER, "stats", "video-auth-1", "view", "--from", "-1h", "--to", "+2m", "--json"],
        None,
    )
    .await?;
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.json()?["count"], 15, "{run:?}");
    let run =
        cluster_tests::cli::tally(&addr, &["stats", "video-auth-1", "view", "--from", "-1h", "--to", "+2m"], None)
            .await?;
    assert_ne!(run.code, 0, "{run:?}");
    assert!(run.stderr.contains("bearer token"), "{run:?}");

    // SIGHUP: node 1 reads the file again (a new reader); node 2 was not told.
    let mut file = std::fs::OpenOptions::new().append(true).open(&auth_file)?;
    file.write_all(line("late", "reader", LATE_READER).as_bytes())?;
    drop(file);
    unsafe { libc::kill(cluster.pid(1)? as i32, libc::SIGHUP) };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let ch = channel(&cluster, 1, Some(LATE_READER)).await?;
        match code(QueryClient::new(ch).stats(stats("video-auth-2")).await) {
            Code::Ok => break,
            Code::Unauthenticated if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await
            }
            other => anyhow::bail!("the new token after SIGHUP: {other:?}"),
        }
    }
    let ch = channel(&cluster, 2, Some(LATE_READER)).await?;
    assert_eq!(code(QueryClient::new(ch).stats(stats("video-auth-2")).await), Code::Unauthenticated);

    // The dashboard's JSON on the HTTP port asks for the same tokens.
    let http = &cluster.nodes[0].http_addr;
    let bearer = |t: &str| format!("Authorization: Bearer {t}\r\n");
    assert_eq!(cluster_tests::http_get(http, "/api/cluster").await?.0, 401);
    assert_eq!(cluster_tests::http_get_with(http, "/api/cluster", &bearer(WRITER)).await?.0, 200);
    let stats_path =
        format!("/api/stats?entity=video-auth-1&type=view&from=0&to={}", tally_client::time_arg::now_ms() + 120_000);
    assert_eq!(cluster_tests::http_get_with(http, &stats_path, &bearer(WRITER)).await?.0, 403);
    let (status, body) = cluster_tests::http_get_with(http, &stats_path, &bearer(READER)).await?;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"count\":15"), "{body}");
    assert_eq!(cluster_tests::http_get(http, "/metrics").await?.0, 200, "metrics and health stay open for scrapers");

    // No token in any log.
    for node in 1..=3 {
        let log = cluster.log(node);
        for token in [WRITER, READER, ADMIN, NODE, LATE_READER] {
            assert!(!log.contains(token), "node {node} logged a token");
        }
        assert!(log.contains("bearer tokens required"), "node {node} says tokens are on");
    }
    Ok(())
}
