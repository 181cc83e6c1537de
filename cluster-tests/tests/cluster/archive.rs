//! The cold archive: `tally cluster set-retention --archive-after 2h` with
//! short retentions seals every partition at the hour two hours back,
//! exports its buckets to Parquet files in the nodes' `--archive-url`, and
//! only then lets retention drop them from the nodes. Stats and Series over
//! the dropped ranges still answer at minute resolution, exactly, from every
//! node, linearizable and stale, and say they read the archive; pyarrow
//! reads the files back and finds every bucket of the model once. A node
//! killed with -9 before the archive began catches up through snapshots
//! (the manifest with them), digests are equal, and it answers archived
//! ranges too; so does a node that lost its disk and rejoined under a new
//! id. An event for a sealed hour is refused as TOO_LATE and goes
//! to the dead-letter log; a recent one still counts.

use std::time::{Duration, Instant};

use cluster_tests::ingestor::RetryingIngestor;
use cluster_tests::model::{Model, Workload};
use cluster_tests::{stats_request, ClusterOptions, TestCluster};
use tally_proto::partition::partition_of;
use tally_proto::time::{bucket_start, next_bucket_start, series_starts, Granularity, DAY_MS, HOUR_MS, MINUTE_MS};
use tally_proto::v1::{
    AddNodeRequest, Consistency, Event, Granularity as WireGranularity, RejectionCode, RemoveNodeRequest,
    SeriesRequest, StatusResponse,
};

const EVENTS: usize = 4_000;
const ENTITIES: u32 = 60;
const PARTITIONS: u32 = 8;

/// Each partition's archived horizon as node `id` applied it.
fn archived_upto(status: &StatusResponse) -> Vec<i64> {
    status.partitions.iter().map(|p| p.archived_upto_ms).collect()
}

/// Waits until node `id` sees every partition archived up to `horizon` at
/// least, and returns the horizons.
async fn archived_everywhere(cluster: &TestCluster, id: u64, horizon: i64) -> anyhow::Result<Vec<i64>> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let upto = archived_upto(&cluster.status(id).await?);
        if upto.len() == PARTITIONS as usize && upto.iter().all(|u| *u >= horizon) {
            return Ok(upto);
        }
        anyhow::ensure!(Instant::now() < deadline, "node {id}: archived up to {upto:?}, want {horizon}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archived_buckets_answer_exactly_after_they_leave_the_nodes() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::shared().await;
    let archive = tempfile::tempdir()?;
    let url = archive.path().to_string_lossy().to_string();
    let mut cluster = TestCluster::start(ClusterOptions {
        nodes: 3,
        partitions: PARTITIONS,
        args: [
            "--snapshot-logs",
            "30",
            "--retention-check-ms",
            "300",
            "--archive-check-ms",
            "300",
            "--archive-url",
            url.as_str(),
        ]
        .map(String::from)
        .to_vec(),
    })
    .await?;
    let now = tally_client::time_arg::now_ms();
    let mut workload = Workload::new(53, ENTITIES, now, 3 * DAY_MS);
    let mut model = Model::default();
    let events: Vec<Event> = (0..EVENTS).map(|_| workload.event()).collect();
    events.iter().for_each(|e| model.record(e));
    let (first, second) = events.split_at(EVENTS / 2);
    let all = RetryingIngestor::new((1..=3).map(|id| (id, cluster.addr(id).unwrap_or_default())).collect());
    all.send_all(first.chunks(200).map(<[Event]>::to_vec).collect(), 4).await?;
    // Node 3 misses the rest and the whole archive: it catches up through
    // snapshots, which carry the manifest.
    cluster.kill9(3)?;
    let two = RetryingIngestor::new((1..=2).map(|id| (id, cluster.addr(id).unwrap_or_default())).collect());
    two.send_all(second.chunks(20).map(<[Event]>::to_vec).collect(), 4).await?;

    let addr = cluster.addr(1)?;
    let bad = cluster_tests::cli::tally(&addr, &["cluster", "set-retention", "--archive-after", "10m"], None).await?;
    assert_ne!(bad.code, 0);
    assert!(bad.stderr.contains("archive_after_ms"), "{}", bad.stderr);
    let args =
        ["--json", "cluster", "set-retention", "--archive-after", "2h", "--keep-minutes", "1h", "--keep-hours", "1d"];
    let run = cluster_tests::cli::tally(&addr, &args, None).await?;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.json()?["archive_after_ms"].as_u64(), Some(2 * HOUR_MS as u64));

    // Every partition seals and archives the hour two hours back; then
    // retention drops the archived minutes (and hours older than a day).
    let horizon = bucket_start(Granularity::Hour, now - 2 * HOUR_MS);
    archived_everywhere(&cluster, 1, horizon).await?;
    let entities: Vec<Vec<u8>> = (0..ENTITIES).map(|i| format!("video-{i}").into_bytes()).collect();
    let old_minute = bucket_start(Granularity::Minute, horizon - 30 * MINUTE_MS);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut query = cluster.query_client(1).await?;
    for entity in &entities {
        loop {
            let reply = query
                .stats(stats_request(entity, "view", old_minute, old_minute + MINUTE_MS, Consistency::Linearizable))
                .await?
                .into_inner();
            assert_eq!(reply.resolution, WireGranularity::Minute as i32, "archived minutes answer as minutes");
            if reply.archive_buckets > 0 {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "{entity:?}: minutes never left the nodes");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // An event for a sealed hour is refused; a recent one counts.
    let late = cluster_tests::model::event("video-1", "view", horizon - HOUR_MS, "late-after-seal");
    let recent = cluster_tests::model::event("video-1", "view", now - 10 * MINUTE_MS, "recent-after-seal");
    let reply = cluster.ingest_answered(2, &[late, recent.clone()]).await?;
    assert_eq!(reply.accepted, 1, "{reply:?}");
    assert_eq!(reply.rejected.len(), 1, "{reply:?}");
    assert_eq!(reply.rejected[0].index, 0);
    assert_eq!(reply.rejected[0].code, RejectionCode::TooLate as i32, "{reply:?}");
    model.record(&recent);

    // Node 3 catches up through snapshots (missing recent events too, again,
    // if the leaders had not purged what it missed yet).
    let mut recent = Workload::new(59, ENTITIES, now, 30 * MINUTE_MS);
    for attempt in 0.. {
        if cluster.restart_and_converge(3).await? {
            break;
        }
        anyhow::ensure!(attempt < 3, "node 3 never caught up through a snapshot");
        cluster.kill9(3)?;
        let more: Vec<Event> = (0..1_000).map(|_| recent.event()).collect();
        more.iter().for_each(|e| model.record(e));
        two.send_all(more.chunks(10).map(<[Event]>::to_vec).collect(), 4).await?;
    }

    // Every node, linearizable and stale: exact at minute resolution over
    // ranges that reach deep into the archive, recent ones, and all of it.
    let ranges = [
        (old_minute, old_minute + MINUTE_MS),
        (now - 3 * DAY_MS, now + MINUTE_MS),
        (horizon - 5 * HOUR_MS - 7 * MINUTE_MS, horizon + 17 * MINUTE_MS),
        (now - 2 * DAY_MS - 3 * MINUTE_MS, now - DAY_MS + 11 * MINUTE_MS),
        (now - 50 * MINUTE_MS, now - 5 * MINUTE_MS),
    ];
    let mut from_archive = 0;
    for id in cluster.live_node_ids() {
        let mut query = cluster.query_client(id).await?;
        for consistency in [Consistency::Linearizable, Consistency::Stale] {
            for entity in entities.iter().step_by(5) {
                for event_type in ["view", "like"] {
                    for (from, to) in ranges {
                        let (from, to) =
                            (bucket_start(Granularity::Minute, from), bucket_start(Granularity::Minute, to));
                        let reply =
                            query.stats(stats_request(entity, event_type, from, to, consistency)).await?.into_inner();
                        let what = format!("node {id} {consistency:?} {entity:?} {event_type} [{from}, {to})");
                        assert_eq!(reply.resolution, WireGranularity::Minute as i32, "{what}");
                        assert_eq!((reply.effective_from_ms, reply.effective_to_ms), (from, to), "{what}");
                        assert_eq!((reply.count, reply.sum), model.stats(entity, event_type, from, to), "{what}");
                        from_archive += reply.archive_buckets;
                    }
                }
            }
        }
    }
    assert!(from_archive > 0, "no answer read the archive");

    // Series: minutes and hours on both sides of the horizon, bucket by bucket.
    let entity = &entities[0];
    for (granularity, wire, from, to) in [
        (Granularity::Minute, WireGranularity::Minute, horizon - 3 * HOUR_MS, horizon + HOUR_MS),
        (Granularity::Hour, WireGranularity::Hour, now - 3 * DAY_MS, now),
    ] {
        let (from, to) = (bucket_start(granularity, from), next_bucket_start(granularity, to));
        let reply = cluster
            .query_client(3)
            .await?
            .series(SeriesRequest {
                share_partition_plus_one: 0,
                entity_id: entity.clone(),
                event_type: "view".into(),
                from_ms: from,
                to_ms: to,
                granularity: wire as i32,
                consistency: Consistency::Stale as i32,
            })
            .await?
            .into_inner();
        assert!(reply.archive_buckets > 0, "{granularity:?} series read the archive");
        let got: Vec<(i64, u64, i64)> = reply.buckets.iter().map(|b| (b.start_ms, b.count, b.sum)).collect();
        assert_eq!(got, model.series(entity, "view", granularity, from, to), "{granularity:?} series");
    }

    // A node loses its disk for good: it rejoins under a new id, catches up
    // through snapshots and answers archived ranges itself, from the files.
    cluster.kill9(2)?;
    cluster.wipe(2)?;
    let fresh = cluster.spawn_extra_node().await?;
    let mut admin = cluster.cluster_client(1).await?;
    admin.add_node(AddNodeRequest { addr: cluster.addr(fresh)? }).await?;
    admin.remove_node(RemoveNodeRequest { node_id: 2 }).await?;
    cluster.wait_ready(Duration::from_secs(60)).await?;
    let mut query = cluster.query_client(fresh).await?;
    let (from, to) = (bucket_start(Granularity::Minute, horizon - 5 * HOUR_MS - 7 * MINUTE_MS), horizon);
    let deadline = Instant::now() + Duration::from_secs(60);
    for entity in entities.iter().step_by(3) {
        loop {
            let reply = query.stats(stats_request(entity, "view", from, to, Consistency::Stale)).await?.into_inner();
            if reply.served_by_node_id == fresh {
                assert_eq!((reply.count, reply.sum), model.stats(entity, "view", from, to), "node {fresh}: {entity:?}");
                assert!(reply.archive_buckets > 0, "node {fresh} read the archive");
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "node {fresh} never answered from its own replica");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    // The files, read by pyarrow: every minute and hour bucket of the model
    // that ends by its partition's horizon, each in exactly one file.
    let (expect_path, mut attempts) = (archive.path().join("expect.json"), 0);
    loop {
        let status = cluster.status(1).await?;
        let upto = archived_upto(&status);
        let files: usize = std::fs::read_dir(archive.path())?
            .flatten()
            .filter(|d| d.path().is_dir())
            .map(|d| std::fs::read_dir(d.path()).map(|f| f.count()).unwrap_or(0))
            .sum();
        let mut minutes = serde_json::Map::new();
        let mut hours = serde_json::Map::new();
        for (entity, event_type) in model.keys() {
            let horizon = upto[partition_of(entity, PARTITIONS) as usize];
            let name = String::from_utf8_lossy(entity);
            for (granularity, out) in [(Granularity::Minute, &mut minutes), (Granularity::Hour, &mut hours)] {
                let first = bucket_start(granularity, now - 4 * DAY_MS);
                for start in series_starts(granularity, first, horizon) {
                    if next_bucket_start(granularity, start) > horizon {
                        continue;
                    }
                    let (count, sum) =
                        model.exact_stats(entity, event_type, start, next_bucket_start(granularity, start));
                    if count > 0 {
                        out.insert(format!("{name}|{event_type}|{start}"), serde_json::json!([count, sum as i64]));
                    }
                }
            }
        }
        let expect = serde_json::json!({"files": files, "minutes": minutes, "hours": hours});
        std::fs::write(&expect_path, serde_json::to_vec(&expect)?)?;
        let checked = cluster_tests::python::check_archive(&archive.path().to_path_buf(), &expect_path).await;
        // An hour may have turned meanwhile and archived one more segment.
        if archived_upto(&cluster.status(1).await?) == upto || attempts == 2 {
            checked?;
            break;
        }
        attempts += 1;
    }
    Ok(())
}
