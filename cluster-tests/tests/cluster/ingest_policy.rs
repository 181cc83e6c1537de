//! The ingest policy: events older than the allowed lateness or further
//! ahead than the allowed skew are rejected one by one (TOO_LATE,
//! IN_FUTURE, with the field and a code), never counted and never dropped
//! silently, while the rest of the batch is counted; the policy is changed
//! with `tally cluster set-policy`, reaches every node, survives kill -9 of
//! the metadata leader, and shows in /metrics.

use std::time::Duration;

use cluster_tests::model::event;
use cluster_tests::{ClusterOptions, TestCluster, TEST_INGEST_POLICY};
use tally_proto::time::{DAY_MS, MINUTE_MS};
use tally_proto::v1::{IngestPolicy, IngestRequest, RejectionCode, SetIngestPolicyRequest, StatsRequest};
use tonic::Code;

const WEEK_MS: u64 = 7 * DAY_MS as u64;

async fn policy_everywhere(cluster: &TestCluster, want: IngestPolicy) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    for id in cluster.live_node_ids() {
        while cluster.status(id).await?.ingest_policy != Some(want) {
            anyhow::ensure!(std::time::Instant::now() < deadline, "node {id} never applied {want:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_outside_the_policy_are_rejected_by_index_and_counted_nowhere() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::shared().await;
    let mut cluster = TestCluster::start(ClusterOptions { nodes: 3, partitions: 8, args: vec![] }).await?;
    policy_everywhere(&cluster, TEST_INGEST_POLICY).await?;
    let now = tally_client::time_arg::now_ms();
    let mut ingest = cluster.ingest_client(1).await?;
    // Under the test clusters' policy a month-old event is fine.
    let old = ingest.ingest(IngestRequest { events: vec![event("v", "view", now - 30 * DAY_MS, "old")] }).await?;
    assert_eq!(old.into_inner().accepted, 1);

    // The default policy, set through the CLI.
    let run = cluster_tests::cli::tally(
        &cluster.addr(2)?,
        &["--json", "cluster", "set-policy", "--allowed-lateness", "7d", "--max-future-skew", "5m"],
        None,
    )
    .await?;
    assert_eq!(run.json()?["allowed_lateness_ms"].as_u64(), Some(WEEK_MS), "{:?}", run.json());
    let default = IngestPolicy {
        allowed_lateness_ms: WEEK_MS,
        max_future_skew_ms: 5 * MINUTE_MS as u64,
        dead_letter_keep_ms: Some(WEEK_MS),
        dead_letter_max_events: Some(100_000),
        raw_log_keep_ms: Some(WEEK_MS),
        raw_log_max_events: Some(0),
    };
    policy_everywhere(&cluster, default).await?;

    let events = vec![
        event("v", "view", now, "a"),
        event("v", "view", now - 8 * DAY_MS, "b"),
        event("v", "view", now - 6 * DAY_MS, "c"),
        event("v", "view", now + 10 * MINUTE_MS, "d"),
        event("v", "view", now + MINUTE_MS, "e"),
        event("v", "Not Valid", now, "f"),
    ];
    for via in [1, 3] {
        let mut ingest = cluster.ingest_client(via).await?;
        let reply = ingest.ingest(IngestRequest { events: events.clone() }).await?.into_inner();
        let expect_accepted = if via == 1 { 3 } else { 0 };
        assert_eq!(reply.accepted + reply.duplicates, 3, "{reply:?}");
        assert_eq!(reply.accepted, expect_accepted, "{reply:?}");
        let rejected: Vec<(u32, i32, &str)> =
            reply.rejected.iter().map(|r| (r.index, r.code, r.field.as_str())).collect();
        assert_eq!(
            rejected,
            vec![
                (1, RejectionCode::TooLate as i32, "event_time_ms"),
                (3, RejectionCode::InFuture as i32, "event_time_ms"),
                (5, RejectionCode::Invalid as i32, "event_type"),
            ],
            "{reply:?}"
        );
        assert!(reply.rejected[0].reason.starts_with("TOO_LATE"), "{}", reply.rejected[0].reason);
        assert!(reply.rejected[1].reason.starts_with("IN_FUTURE"), "{}", reply.rejected[1].reason);
        assert!(reply.rejected.iter().all(|r| !r.retryable));
    }
    // Counted: the month-old event and a, c, e — once each.
    let stats = cluster
        .query_client(2)
        .await?
        .stats(StatsRequest {
            share_partition_plus_one: 0,
            entity_id: b"v".to_vec(),
            event_type: "view".into(),
            from_ms: now - 40 * DAY_MS,
            to_ms: now + DAY_MS,
            consistency: 0,
        })
        .await?
        .into_inner();
    assert_eq!(stats.count, 4);
    let (_, metrics) = cluster.http_get(1, "/metrics").await?;
    for line in [
        "tally_events_total{outcome=\"rejected\",reason=\"too_late\"} 1",
        "tally_events_total{outcome=\"rejected\",reason=\"in_future\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }

    // The policy is the metadata group's: it survives its leader's kill -9.
    let leader = cluster.status(1).await?.metadata_leader_node_id;
    cluster.kill9(leader)?;
    cluster.restart(leader).await?;
    cluster.wait_ready(Duration::from_secs(60)).await?;
    policy_everywhere(&cluster, default).await?;

    // Bad policies name the field; the one in force stays.
    let mut admin = cluster.cluster_client(1).await?;
    let err = admin
        .set_ingest_policy(SetIngestPolicyRequest {
            policy: Some(IngestPolicy {
                allowed_lateness_ms: 0,
                max_future_skew_ms: 2 * DAY_MS as u64,
                ..Default::default()
            }),
        })
        .await
        .expect_err("too far ahead");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("policy.max_future_skew_ms"), "{}", err.message());
    let err = admin.set_ingest_policy(SetIngestPolicyRequest { policy: None }).await.expect_err("no policy");
    assert!(err.message().starts_with("policy"), "{}", err.message());
    policy_everywhere(&cluster, default).await?;
    Ok(())
}
