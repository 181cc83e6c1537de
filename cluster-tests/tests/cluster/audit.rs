//! The raw-event log and `tally audit`: with the log turned on, a recount
//! of a series from the raw events agrees with its counts minute by minute
//! — after retried batches, a kill -9 and a snapshot catch-up, on every
//! replica (STALE reads each one's own, digests equal) — and an audit that
//! should disagree does: events counted while the log was off are reported
//! with the minutes they are in, and the command exits 3.

use cluster_tests::model::{event, Model};
use cluster_tests::{ClusterOptions, TestCluster};
use tally_proto::time::{bucket_start, Granularity, HOUR_MS, MINUTE_MS};
use tally_proto::v1::{AuditRequest, Consistency, Event};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audits_recount_the_raw_events_and_find_what_the_log_missed() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::shared().await;
    let mut cluster = TestCluster::start(ClusterOptions {
        nodes: 3,
        partitions: 4,
        args: vec!["--snapshot-logs".into(), "50".into()],
    })
    .await?;
    let addr = cluster.addr(2)?;
    let tally = async |args: &[&str]| cluster_tests::cli::tally(&addr, args, None).await;
    // Off by default: an audit says why it cannot answer.
    let err = cluster
        .query_client(1)
        .await?
        .audit(AuditRequest {
            entity_id: b"v".to_vec(),
            event_type: "view".into(),
            from_ms: 0,
            to_ms: 1,
            consistency: 0,
        })
        .await
        .expect_err("no raw log");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("--raw-log-max-events"), "{}", err.message());
    let run = tally(&["--json", "cluster", "set-policy", "--raw-log-max-events", "1000000"]).await?;
    assert_eq!(run.json()?["raw_log_max_events"].as_u64(), Some(1_000_000), "{run:?}");
    cluster.wait_for_policy(|p| p.raw_log_max_events == Some(1_000_000)).await?;

    let now = tally_client::time_arg::now_ms();
    let start = bucket_start(Granularity::Hour, now - 2 * HOUR_MS);
    let mut model = Model::default();
    let entity = "audited";
    let batch = |tag: &str, n: i64| -> Vec<Event> {
        (0..n)
            .map(|i| {
                let mut e = event(entity, "view", start + (i * 7_919) % (2 * HOUR_MS), &format!("{tag}-{i}"));
                e.value = Some(i % 13 - 4);
                e
            })
            .collect()
    };
    // Each batch sent twice (a retry with the same ids): counted once, and
    // in the raw log once.
    for (i, via) in [1u64, 2, 3].into_iter().enumerate() {
        let events = batch(&format!("b{i}"), 400);
        cluster.ingest_answered(via, &events).await?;
        cluster.ingest_answered(1 + (via % 3), &events).await?;
        events.iter().for_each(|e| model.record(e));
    }
    let audit = |from: i64, to: i64| {
        let (from, to) = (from.to_string(), to.to_string());
        async move { tally(&["--json", "audit", entity, "view", "--from", &from, "--to", &to]).await }
    };
    let run = audit(start, start + 2 * HOUR_MS).await?;
    let doc = run.json()?;
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(doc["agree"], true, "{doc}");
    let (count, sum) = model.stats(entity.as_bytes(), "view", start, start + 2 * HOUR_MS);
    assert_eq!((doc["raw_count"].as_u64(), doc["counted"].as_u64()), (Some(count), Some(count)), "{doc}");
    assert_eq!(doc["raw_sum"], sum.to_string(), "{doc}");

    // Node 3 misses more and catches up through a snapshot carrying the log
    // (missing more again if the leader had not purged what it missed yet:
    // a busy machine may still be writing the snapshot that allows it).
    for attempt in 0.. {
        cluster.kill9(3)?;
        for i in 0..150 {
            let events = batch(&format!("k{attempt}-{i}"), 5);
            cluster.ingest_answered(1, &events).await?;
            events.iter().for_each(|e| model.record(e));
        }
        if cluster.restart_and_converge(3).await? {
            break;
        }
        anyhow::ensure!(attempt < 3, "node 3 never caught up through a snapshot");
    }
    let (count, _) = model.stats(entity.as_bytes(), "view", start, start + 2 * HOUR_MS);
    for id in cluster.node_ids() {
        let reply = cluster
            .query_client(id)
            .await?
            .audit(AuditRequest {
                entity_id: entity.as_bytes().to_vec(),
                event_type: "view".into(),
                from_ms: start,
                to_ms: start + 2 * HOUR_MS,
                consistency: Consistency::Stale as i32,
            })
            .await?
            .into_inner();
        assert_eq!((reply.raw_count, reply.counted), (count, count), "node {id}: {reply:?}");
        assert!(reply.differences.is_empty(), "node {id}: {reply:?}");
    }

    // Events counted while the log is off are not in it: the audit finds
    // exactly their minutes.
    let run = tally(&["cluster", "set-policy", "--raw-log-max-events", "0"]).await?;
    assert_eq!(run.code, 0, "{run:?}");
    cluster.wait_for_policy(|p| p.raw_log_max_events == Some(0)).await?;
    let unlogged_minute = start + 17 * MINUTE_MS;
    let unlogged: Vec<Event> =
        (0..3).map(|i| event(entity, "view", unlogged_minute + i, &format!("off-{i}"))).collect();
    cluster.ingest_answered(2, &unlogged).await?;
    tally(&["cluster", "set-policy", "--raw-log-max-events", "1000000"]).await?;
    cluster.wait_for_policy(|p| p.raw_log_max_events == Some(1_000_000)).await?;
    let logged: Vec<Event> =
        (0..2).map(|i| event(entity, "view", unlogged_minute + 10 + i, &format!("on-{i}"))).collect();
    cluster.ingest_answered(3, &logged).await?;
    let run = audit(unlogged_minute, unlogged_minute + MINUTE_MS).await?;
    assert_eq!(run.code, 3, "{run:?}");
    let doc = run.json()?;
    let differences = doc["differences"].as_array().cloned().unwrap_or_default();
    assert_eq!(differences.len(), 1, "{doc}");
    assert_eq!(differences[0]["minute_ms"].as_i64(), Some(unlogged_minute), "{doc}");
    // Turning the log off emptied it: only the two events since are in it.
    assert_eq!(differences[0]["raw_count"].as_u64(), Some(2), "{doc}");
    let (in_minute, _) = model.stats(entity.as_bytes(), "view", unlogged_minute, unlogged_minute + MINUTE_MS);
    assert_eq!(differences[0]["counted"].as_u64(), Some(in_minute + 5), "{doc}");
    Ok(())
}
