//! Retention: `tally cluster set-retention` expires minute buckets older
//! than an hour and hour buckets older than a day on every replica alike.
//! Stats over expired ranges answer from the next coarser granularity kept
//! and say so (resolution, effective range) — exact against the model over
//! that range, from every node; Series at an expired granularity is
//! refused naming the retention; TopK widens the same way; a late event for
//! an expired minute still counts (once) in its hour. A node killed with -9
//! before the change catches up through snapshots, and digests (floors
//! included) are equal; floors survive a restart; bad policies are refused
//! naming the field.

use std::time::{Duration, Instant};

use cluster_tests::ingestor::RetryingIngestor;
use cluster_tests::model::{event, Model, Workload};
use cluster_tests::{stats_request, ClusterOptions, TestCluster};
use tally_proto::time::{bucket_start, Granularity, DAY_MS, HOUR_MS, MINUTE_MS};
use tally_proto::v1::{
    Consistency, Event, Granularity as WireGranularity, IngestRequest, RetentionPolicy, SeriesRequest, StatsResponse,
    TopKOrder, TopKRequest,
};
use tonic::Code;

const EVENTS: usize = 6_000;
const ENTITIES: u32 = 120;

fn series_request(entity: &[u8], from: i64, to: i64, granularity: WireGranularity) -> SeriesRequest {
    SeriesRequest {
        share_partition_plus_one: 0,
        entity_id: entity.to_vec(),
        event_type: "view".into(),
        from_ms: from,
        to_ms: to,
        granularity: granularity as i32,
        consistency: Consistency::Linearizable as i32,
    }
}

/// The reply agrees with the model over the range it says it counted.
fn check_stats(model: &Model, entity: &[u8], event_type: &str, reply: &StatsResponse, what: &str) {
    let (count, sum) = model.stats(entity, event_type, reply.effective_from_ms, reply.effective_to_ms);
    assert_eq!(
        (reply.count, reply.sum),
        (count, sum),
        "{what}: {} {event_type} over [{}, {}) at resolution {}",
        String::from_utf8_lossy(entity),
        reply.effective_from_ms,
        reply.effective_to_ms,
        reply.resolution
    );
}

/// Waits until a one-minute range `age` back answers at `resolution` or
/// coarser for every entity (each partition's leader expired it).
async fn expired_everywhere(
    cluster: &TestCluster,
    entities: &[Vec<u8>],
    at: i64,
    resolution: WireGranularity,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut query = cluster.query_client(1).await?;
    for entity in entities {
        loop {
            let reply = query
                .stats(stats_request(entity, "view", at, at + MINUTE_MS, Consistency::Linearizable))
                .await?
                .into_inner();
            if reply.resolution >= resolution as i32 {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "{entity:?} at {at} still at resolution {}", reply.resolution);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_buckets_answer_coarser_exactly_on_every_replica() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::shared().await;
    let mut cluster = TestCluster::start(ClusterOptions {
        nodes: 3,
        partitions: 8,
        args: vec!["--snapshot-logs".into(), "50".into(), "--retention-check-ms".into(), "300".into()],
    })
    .await?;
    let now = tally_client::time_arg::now_ms();
    // Three days back: minutes, hours and days all in play.
    let mut workload = Workload::new(47, ENTITIES, now, 3 * DAY_MS);
    let mut model = Model::default();
    let events: Vec<Event> = (0..EVENTS).map(|_| workload.event()).collect();
    for e in &events {
        model.record(e);
    }
    let (first, second) = events.split_at(EVENTS / 2);
    let all = RetryingIngestor::new((1..=3).map(|id| (id, cluster.addr(id).unwrap_or_default())).collect());
    all.send_all(first.chunks(300).map(<[Event]>::to_vec).collect(), 4).await?;

    // Before any retention: a minute two hours back is a minute.
    let entities: Vec<Vec<u8>> = (0..ENTITIES).map(|i| format!("video-{i}").into_bytes()).collect();
    let old_minute = bucket_start(Granularity::Minute, now - 2 * HOUR_MS);
    let mut query = cluster.query_client(2).await?;
    let before = query
        .stats(stats_request(&entities[0], "view", old_minute, old_minute + MINUTE_MS, Consistency::Linearizable))
        .await?
        .into_inner();
    assert_eq!(before.resolution, WireGranularity::Minute as i32);
    assert_eq!((before.effective_from_ms, before.effective_to_ms), (old_minute, old_minute + MINUTE_MS));

    // Node 3 is down while the policy changes and the rest arrives: it
    // catches up through snapshots that carry the floors.
    cluster.kill9(3)?;
    let bad =
        cluster_tests::cli::tally(&cluster.addr(1)?, &["cluster", "set-retention", "--keep-minutes", "10m"], None)
            .await?;
    assert_ne!(bad.code, 0);
    assert!(bad.stderr.contains("minute_ms"), "{}", bad.stderr);
    let inverted = cluster_tests::cli::tally(
        &cluster.addr(1)?,
        &["cluster", "set-retention", "--keep-minutes", "3d", "--keep-hours", "1d"],
        None,
    )
    .await?;
    assert!(inverted.stderr.contains("hour_ms"), "{}", inverted.stderr);
    let run = cluster_tests::cli::tally(
        &cluster.addr(1)?,
        &["--json", "cluster", "set-retention", "--keep-minutes", "1h", "--keep-hours", "1d"],
        None,
    )
    .await?;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let policy = RetentionPolicy { minute_ms: HOUR_MS as u64, hour_ms: DAY_MS as u64, ..cluster_tests::TEST_RETENTION };
    assert_eq!(run.json()?["minute_ms"].as_u64(), Some(policy.minute_ms));
    let two = RetryingIngestor::new((1..=2).map(|id| (id, cluster.addr(id).unwrap_or_default())).collect());
    two.send_all(second.chunks(40).map(<[Event]>::to_vec).collect(), 4).await?;
    let two_days_back = bucket_start(Granularity::Minute, now - 2 * DAY_MS);
    expired_everywhere(&cluster, &entities, old_minute, WireGranularity::Hour).await?;
    expired_everywhere(&cluster, &entities, two_days_back, WireGranularity::Day).await?;

    cluster.restart(3).await?;
    cluster.wait_ready(Duration::from_secs(60)).await?;
    cluster.assert_replicas_identical(Duration::from_secs(60)).await?;
    assert!(cluster.log(3).contains("installed snapshot"), "node 3 caught up through snapshots");
    for id in cluster.live_node_ids() {
        assert_eq!(cluster.status(id).await?.retention, Some(policy), "node {id}");
    }

    // Every node, linearizable and stale, agrees with the model over the
    // range it reports; old ranges come back coarser, recent ones exact.
    let ranges = [
        (old_minute, old_minute + MINUTE_MS, WireGranularity::Hour),
        (two_days_back + 7 * MINUTE_MS, two_days_back + 3 * HOUR_MS, WireGranularity::Day),
        (now - 3 * DAY_MS, now, WireGranularity::Day),
        (now - 20 * MINUTE_MS, now - 5 * MINUTE_MS, WireGranularity::Minute),
    ];
    for id in cluster.live_node_ids() {
        let mut query = cluster.query_client(id).await?;
        for consistency in [Consistency::Linearizable, Consistency::Stale] {
            for entity in entities.iter().step_by(7) {
                for event_type in ["view", "like"] {
                    for (from, to, resolution) in ranges {
                        let reply =
                            query.stats(stats_request(entity, event_type, from, to, consistency)).await?.into_inner();
                        assert_eq!(reply.resolution, resolution as i32, "node {id} {from}..{to}");
                        assert!(reply.effective_from_ms <= from && reply.effective_to_ms >= to);
                        check_stats(&model, entity, event_type, &reply, &format!("node {id} {consistency:?}"));
                    }
                }
            }
        }
    }

    // Series: expired granularities are refused naming the retention;
    // coarser ones answer.
    let entity = &entities[0];
    let minutes =
        query.series(series_request(entity, old_minute, old_minute + 5 * MINUTE_MS, WireGranularity::Minute)).await;
    let refusal = minutes.expect_err("minutes two hours back have expired");
    assert_eq!(refusal.code(), Code::OutOfRange, "{refusal:?}");
    assert!(refusal.message().contains("minute buckets are kept for 1 hour"), "{}", refusal.message());
    let hours =
        query.series(series_request(entity, two_days_back, two_days_back + HOUR_MS, WireGranularity::Hour)).await;
    assert!(hours.expect_err("hours two days back have expired").message().contains("hour buckets are kept for 1 day"));
    let day_start = bucket_start(Granularity::Day, two_days_back);
    let days = query
        .series(series_request(entity, day_start, day_start + 3 * DAY_MS, WireGranularity::Day))
        .await?
        .into_inner();
    let want: Vec<(i64, u64)> = model
        .series(entity, "view", Granularity::Day, day_start, day_start + 3 * DAY_MS)
        .into_iter()
        .map(|(start, count, _)| (start, count))
        .collect();
    assert_eq!(days.buckets.iter().map(|b| (b.start_ms, b.count)).collect::<Vec<_>>(), want);

    // TopK over hours two days back ranks whole days, exactly.
    let top = query
        .top_k(TopKRequest {
            event_type: "view".into(),
            from_ms: two_days_back,
            to_ms: two_days_back + 2 * HOUR_MS,
            k: 20,
            order: TopKOrder::Count as i32,
            consistency: Consistency::Linearizable as i32,
            partitions: vec![],
        })
        .await?
        .into_inner();
    assert_eq!(top.resolution, WireGranularity::Day as i32);
    let ranked: Vec<(Vec<u8>, u64)> = top.entries.iter().map(|e| (e.entity_id.clone(), e.count)).collect();
    let want: Vec<(Vec<u8>, u64)> = model
        .top_k("view", top.effective_from_ms, top.effective_to_ms, 20, false)
        .into_iter()
        .map(|(e, c, _)| (e, c))
        .collect();
    assert_eq!(ranked, want);

    // A late event for an expired minute counts in its hour, once.
    let late = event("video-0", "view", old_minute + 30_000, "late-into-expired-minute");
    let mut ingest = cluster.ingest_client(2).await?;
    let first = ingest.ingest(IngestRequest { events: vec![late.clone()] }).await?.into_inner();
    let again = ingest.ingest(IngestRequest { events: vec![late.clone()] }).await?.into_inner();
    assert_eq!((first.accepted, again.duplicates), (1, 1), "{first:?} {again:?}");
    model.record(&late);
    let reply = query
        .stats(stats_request(b"video-0", "view", old_minute, old_minute + MINUTE_MS, Consistency::Linearizable))
        .await?
        .into_inner();
    check_stats(&model, b"video-0", "view", &reply, "after the late event");

    // Floors are replicated state: kill -9 and restart, nothing changes.
    cluster.kill9(1)?;
    cluster.restart(1).await?;
    cluster.wait_ready(Duration::from_secs(60)).await?;
    cluster.assert_replicas_identical(Duration::from_secs(60)).await?;
    let mut stale = cluster.query_client(1).await?;
    let reply = stale
        .stats(stats_request(b"video-0", "view", old_minute, old_minute + MINUTE_MS, Consistency::Stale))
        .await?
        .into_inner();
    assert_eq!(reply.resolution, WireGranularity::Hour as i32);
    check_stats(&model, b"video-0", "view", &reply, "node 1 after a restart");
    assert_eq!(cluster.dedup_conflicts().await?, 0);
    Ok(())
}
