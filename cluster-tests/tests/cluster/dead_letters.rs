//! The dead-letter log: events the partition's leader refuses for their
//! time (against its log's clock) and events whose fields fail validation
//! are answered per index AND kept, with the reason, in the partition's
//! replicated dead-letter log; `tally dlq count|list|export` reads it;
//! bounded (the oldest dropped when full, and counted); equal on every
//! replica through kill -9 and snapshot catch-up; and an export, fixed,
//! ingests again — once, however often it is sent.

use std::time::Duration;

use cluster_tests::model::event;
use cluster_tests::{ClusterOptions, TestCluster};
use tally_proto::partition::partition_of;
use tally_proto::time::{DAY_MS, HOUR_MS};
use tally_proto::v1::{Consistency, DeadLettersRequest, Event, IngestRequest, RejectionCode, StatsRequest};
use tonic::Code;

const PARTITIONS: u32 = 4;

fn events(entity: &str, tag: &str, n: usize, time: i64) -> Vec<Event> {
    (0..n).map(|i| event(entity, "view", time, &format!("{tag}-{i}"))).collect()
}

async fn count(cluster: &TestCluster, via: u64, entity: &str, now: i64) -> anyhow::Result<u64> {
    let req = StatsRequest {
        share_partition_plus_one: 0,
        entity_id: entity.as_bytes().to_vec(),
        event_type: "view".into(),
        from_ms: now - 30 * DAY_MS,
        to_ms: now + DAY_MS,
        consistency: 0,
    };
    Ok(cluster.query_client(via).await?.stats(req).await?.into_inner().count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_events_are_kept_bounded_replicated_and_can_be_ingested_again() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::shared().await;
    let mut cluster = TestCluster::start(ClusterOptions {
        nodes: 3,
        partitions: PARTITIONS,
        args: vec!["--snapshot-logs".into(), "50".into()],
    })
    .await?;
    let addr = cluster.addr(1)?;
    let tally = async |args: &[&str]| cluster_tests::cli::tally(&addr, args, None).await;
    let run = tally(&[
        "--json",
        "cluster",
        "set-policy",
        "--allowed-lateness",
        "1d",
        "--max-future-skew",
        "5m",
        "--dead-letter-max-events",
        "25",
    ])
    .await?;
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.json()?["dead_letter_max_events"].as_u64(), Some(25), "{run:?}");
    cluster.wait_for_policy(|p| p.dead_letter_max_events == Some(25)).await?;
    let now = tally_client::time_arg::now_ms();
    let entity = "dlq-video";
    let partition = partition_of(entity.as_bytes(), PARTITIONS);
    let leader = cluster
        .status(1)
        .await?
        .partitions
        .iter()
        .find(|p| p.partition == partition)
        .map(|p| p.leader_node_id)
        .unwrap_or(1);
    let follower = cluster.node_ids().into_iter().find(|id| *id != leader).unwrap_or(2);

    // One batch with every kind: through a node that does not lead the
    // partition (its share is forwarded), then more through the leader.
    let mut batch = events(entity, "ok", 20, now - HOUR_MS);
    batch.extend(events(entity, "late", 6, now - 3 * DAY_MS));
    batch.extend(events(entity, "ahead", 5, now + HOUR_MS));
    batch.extend((0..3).map(|i| event(entity, "Not Valid", now, &format!("bad-{i}"))));
    let reply = cluster.ingest_client(follower).await?.ingest(IngestRequest { events: batch }).await?.into_inner();
    assert_eq!(reply.accepted, 20, "{reply:?}");
    let codes: Vec<(u32, i32)> = reply.rejected.iter().map(|r| (r.index, r.code)).collect();
    let mut want: Vec<(u32, i32)> = (20..26).map(|i| (i, RejectionCode::TooLate as i32)).collect();
    want.extend((26..31).map(|i| (i, RejectionCode::InFuture as i32)));
    want.extend((31..34).map(|i| (i, RejectionCode::Invalid as i32)));
    assert_eq!(codes, want, "{reply:?}");
    assert!(reply.rejected.iter().all(|r| !r.retryable && !r.reason.is_empty()));
    let late = events(entity, "late-b", 4, now - 2 * DAY_MS);
    let reply = cluster.ingest_client(leader).await?.ingest(IngestRequest { events: late }).await?.into_inner();
    assert_eq!((reply.accepted, reply.rejected.len()), (0, 4), "{reply:?}");
    assert_eq!(count(&cluster, 2, entity, now).await?, 20);

    let counts = tally(&["--json", "dlq", "count"]).await?.json()?;
    assert_eq!(
        (counts["too_late"].as_u64(), counts["in_future"].as_u64(), counts["invalid"].as_u64()),
        (Some(10), Some(5), Some(3)),
        "{counts}"
    );
    assert_eq!(counts["dropped"].as_u64(), Some(0), "{counts}");
    let listed = tally(&["--json", "dlq", "list", "--limit", "7"]).await?.json()?;
    let records = listed["records"].as_array().cloned().unwrap_or_default();
    assert_eq!(records.len(), 7, "{listed}");
    assert!(records.iter().all(|r| r["partition"].as_u64() == Some(u64::from(partition))));
    assert_eq!(records[0]["code"], "TOO_LATE", "{listed}");
    assert!(records[0]["reason"].as_str().unwrap_or_default().starts_with("TOO_LATE"), "{listed}");
    assert_eq!(records[6]["code"], "IN_FUTURE");
    // Pages follow one another without gaps or repeats.
    let mut cluster_api = cluster.cluster_client(3).await?;
    let (mut seen, mut after) = (Vec::new(), Vec::new());
    loop {
        let page = cluster_api
            .dead_letters(DeadLettersRequest { partition, after, limit: 4, ..Default::default() })
            .await?
            .into_inner();
        seen.extend(page.records.into_iter().map(|r| r.event.unwrap_or_default().event_id));
        if page.next_cursor.is_empty() {
            break;
        }
        after = page.next_cursor;
    }
    assert_eq!(seen.len(), 18, "{seen:?}");
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 18, "no record twice");
    for (req, field) in [
        (DeadLettersRequest { partition, after: vec![1, 2, 3], limit: 1, ..Default::default() }, "after"),
        (DeadLettersRequest { partition, limit: 5_000, ..Default::default() }, "limit"),
        (DeadLettersRequest { partition: PARTITIONS, ..Default::default() }, "partition"),
    ] {
        let err = cluster_api.dead_letters(req).await.expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().starts_with(field), "{}", err.message());
    }

    // Node 3 misses the rest and catches up through snapshots; the log
    // overflows meanwhile: the oldest entry's records are dropped, counted.
    cluster.kill9(3)?;
    let via = if leader == 3 { 1 } else { leader };
    let more = events(entity, "late-c", 10, now - 5 * DAY_MS);
    let reply = cluster.ingest_answered(via, &more).await?;
    assert!(reply.rejected.iter().all(|r| r.code == RejectionCode::TooLate as i32), "{reply:?}");
    assert_eq!(reply.rejected.len(), 10, "{reply:?}");
    let counts = tally(&["--json", "dlq", "count"]).await?.json()?;
    // 14 + 4 + 10 > 25: the first entry's 14 records went.
    assert_eq!((counts["total"].as_u64(), counts["dropped"].as_u64()), (Some(14), Some(14)), "{counts}");
    for i in 0..80 {
        let filler = events(entity, &format!("fill-{i}"), 2, now - HOUR_MS);
        assert_eq!(cluster.ingest_answered(via, &filler).await?.accepted, 2);
    }
    cluster.restart(3).await?;
    cluster.wait_ready(Duration::from_secs(60)).await?;
    cluster.assert_replicas_identical(Duration::from_secs(60)).await?;
    assert!(cluster.log(3).contains("installed snapshot"), "node 3 caught up through snapshots");
    let counts = tally(&["--json", "dlq", "count"]).await?.json()?;
    assert_eq!((counts["total"].as_u64(), counts["dropped"].as_u64()), (Some(14), Some(14)), "{counts}");
    // Every replica holds the same records (STALE reads each one's own).
    let mut by_node = Vec::new();
    for id in cluster.node_ids() {
        let page = cluster
            .cluster_client(id)
            .await?
            .dead_letters(DeadLettersRequest {
                partition,
                limit: 100,
                consistency: Consistency::Stale as i32,
                ..Default::default()
            })
            .await?
            .into_inner();
        by_node.push(page.records);
    }
    assert!(by_node.iter().all(|r| *r == by_node[0] && r.len() == 14), "replicas disagree: {by_node:?}");

    // Export the late ones, fix their times, ingest: counted once, even
    // when the file is ingested twice.
    let dir = tempfile::tempdir()?;
    let exported = dir.path().join("late.ndjson");
    let out = exported.to_string_lossy().to_string();
    let run = tally(&["dlq", "export", "--code", "too-late", "--out", &out]).await?;
    assert_eq!(run.code, 0, "{run:?}");
    let text = std::fs::read_to_string(&exported)?;
    let mut fixed = String::new();
    for line in text.lines() {
        let mut doc: serde_json::Value = serde_json::from_str(line)?;
        assert_eq!(doc["code"], "TOO_LATE", "{line}");
        doc["event_time_ms"] = serde_json::json!(now - 2 * HOUR_MS);
        fixed.push_str(&doc.to_string());
        fixed.push('\n');
    }
    assert_eq!(fixed.lines().count(), 14);
    let fixed_path = dir.path().join("fixed.ndjson");
    std::fs::write(&fixed_path, fixed)?;
    let file = fixed_path.to_string_lossy().to_string();
    let first = tally(&["--json", "ingest", "--file", &file]).await?.json()?;
    assert_eq!(first["accepted"].as_u64(), Some(14), "{first}");
    let again = tally(&["--json", "ingest", "--file", &file]).await?.json()?;
    assert_eq!((again["accepted"].as_u64(), again["duplicates"].as_u64()), (Some(0), Some(14)), "{again}");
    assert_eq!(count(&cluster, 3, entity, now).await?, 20 + 160 + 14);

    // Rejections are counted in the metrics of the node that answered.
    let (_, metrics) = cluster.http_get(follower, "/metrics").await?;
    let counter = |reason: &str| {
        let prefix = format!("tally_events_total{{outcome=\"rejected\",reason=\"{reason}\"}} ");
        metrics.lines().find_map(|l| l.strip_prefix(prefix.as_str())).and_then(|v| v.parse::<u64>().ok())
    };
    // (The follower may also have served the later batches.)
    assert!(counter("too_late").is_some_and(|n| n >= 6), "{metrics}");
    assert_eq!((counter("in_future"), counter("invalid")), (Some(5), Some(3)), "{metrics}");
    // A log of 0 events keeps nothing, and what it held goes.
    let run = tally(&["cluster", "set-policy", "--dead-letter-max-events", "0"]).await?;
    assert_eq!(run.code, 0, "{run:?}");
    cluster.wait_for_policy(|p| p.dead_letter_max_events == Some(0)).await?;
    cluster.ingest_client(1).await?.ingest(IngestRequest { events: events(entity, "gone", 2, 0) }).await?;
    let counts = tally(&["--json", "dlq", "count"]).await?.json()?;
    assert_eq!(counts["total"].as_u64(), Some(0), "{counts}");
    cluster.assert_replicas_identical(Duration::from_secs(60)).await?;
    Ok(())
}
