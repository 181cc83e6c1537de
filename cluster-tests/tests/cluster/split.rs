//! Partition splits on real clusters.
//!
//! * A partition is split while events arrive, every batch sent twice with
//!   the same ids (a client's retries): afterwards every entity's count,
//!   sum and minute series are exact from every node, the entities of the
//!   upper half are wholly in the new partition and none in the old one,
//!   every event sent once more is a duplicate wherever it went, and the
//!   replicas of both partitions are identical.
//! * Every replica of the partition is killed at a crash point inside the
//!   split (before and after its batch; a replica that had not applied it
//!   when the others died is killed -9), together, so the metadata group
//!   goes down with them: after a restart the split completes by itself,
//!   and nothing was lost or counted twice.

use std::collections::BTreeMap;
use std::time::Duration;

use cluster_tests::ingestor::{batches_sent_twice, RetryingIngestor};
use cluster_tests::{ClusterOptions, TestCluster};
use tally_proto::routing::{Routing, SplitRange};
use tally_proto::time::{bucket_start, Granularity, MINUTE_MS};
use tally_proto::v1::{
    Consistency, Event, Granularity as PbGranularity, SeriesRequest, StatsRequest, StatusResponse, TopKRequest,
};

const BATCH: usize = 200;
const ENTITIES: usize = 48;

/// `n` events over `ENTITIES` entities (ids `{tag}-{i}`), times spread
/// over `[t0, t0 + span)`.
fn events(tag: &str, n: usize, t0: i64, span: i64) -> Vec<Event> {
    (0..n)
        .map(|i| Event {
            entity_id: format!("video-{}", (i * 7) % ENTITIES).into_bytes(),
            event_type: "view".into(),
            event_time_ms: t0 + (i as i64 * 7_919) % span.max(1),
            event_id: format!("{tag}-{i}").into_bytes(),
            value: Some(i as i64 % 9),
            actor_id: Vec::new(),
        })
        .collect()
}

/// Per entity: per minute, count and sum.
type Model = BTreeMap<Vec<u8>, BTreeMap<i64, (u64, i64)>>;

fn model_of(events: &[Event]) -> Model {
    let mut model = Model::new();
    for e in events {
        let slot = model
            .entry(e.entity_id.clone())
            .or_default()
            .entry(bucket_start(Granularity::Minute, e.event_time_ms))
            .or_default();
        slot.0 += 1;
        slot.1 += e.value.unwrap_or(1);
    }
    model
}

fn totals(minutes: &BTreeMap<i64, (u64, i64)>) -> (u64, i64) {
    minutes.values().fold((0, 0), |(c, s), (mc, ms)| (c + mc, s + ms))
}

/// The routing a client builds from this status.
fn routing_of(status: &StatusResponse) -> Routing {
    Routing::new(status.partition_count, []).with_splits(
        status.slots,
        status.splits.iter().filter(|s| s.active).map(|s| SplitRange {
            partition: s.partition,
            slot: s.slot,
            lo: s.lo,
        }),
    )
}

fn stats(entity: &[u8], from: i64, to: i64, consistency: Consistency, share: u32) -> StatsRequest {
    StatsRequest {
        entity_id: entity.to_vec(),
        event_type: "view".into(),
        from_ms: from,
        to_ms: to,
        consistency: consistency as i32,
        share_partition_plus_one: share,
    }
}

/// Every entity exact from every live node (linearizable; stale converges),
/// each wholly in the partition the routing gives it.
async fn check_exact(cluster: &TestCluster, model: &Model, from: i64, to: i64) -> anyhow::Result<()> {
    let status = cluster.status(cluster.live_node_ids()[0]).await?;
    let routing = routing_of(&status);
    for node in cluster.live_node_ids() {
        let mut query = cluster.query_client(node).await?;
        for (entity, minutes) in model {
            let want = totals(minutes);
            let r = query.stats(stats(entity, from, to, Consistency::Linearizable, 0)).await?.into_inner();
            assert_eq!((r.count, r.sum), want, "node {node}: {}", String::from_utf8_lossy(entity));
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                let stale = query.stats(stats(entity, from, to, Consistency::Stale, 0)).await?.into_inner();
                if (stale.count, stale.sum) == want {
                    break;
                }
                anyhow::ensure!(tokio::time::Instant::now() < deadline, "node {node}: stale {stale:?}, want {want:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    // Wholly where the routing puts it: its partition's share is all of it.
    let mut query = cluster.query_client(cluster.live_node_ids()[0]).await?;
    for (entity, minutes) in model {
        let home = routing.home_of(entity);
        let r = query.stats(stats(entity, from, to, Consistency::Linearizable, home + 1)).await?.into_inner();
        assert_eq!((r.count, r.sum), totals(minutes), "{} in partition {home}", String::from_utf8_lossy(entity));
    }
    Ok(())
}

async fn wait_split_active(cluster: &TestCluster, child: u32, timeout: Duration) -> anyhow::Result<StatusResponse> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        for node in cluster.live_node_ids() {
            if let Ok(status) = cluster.status(node).await {
                if status.splits.iter().any(|s| s.partition == child && s.active) {
                    return Ok(status);
                }
            }
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "partition {child} not active after {timeout:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splitting_a_partition_under_load_moves_its_state_exactly() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::shared().await;
    let cluster = TestCluster::start(ClusterOptions { nodes: 3, partitions: 4, args: vec![] }).await?;
    let ingestor = RetryingIngestor::new((1..=3).map(|id| (id, cluster.addr(id).unwrap_or_default())).collect());
    let now = tally_client::time_arg::now_ms();
    let minute = bucket_start(Granularity::Minute, now);

    let before = events("before", 3_000, minute - 6 * MINUTE_MS, 6 * MINUTE_MS);
    let a = ingestor.send_all(batches_sent_twice(&before, BATCH), 4).await?;
    assert_eq!(a.accepted + a.duplicates, 2 * before.len() as u64);

    // The split is asked for while more events arrive, sent twice.
    let parent: u32 = 1;
    let during = events("during", 3_000, minute - 2 * MINUTE_MS, 3 * MINUTE_MS);
    let addr = cluster_tests::cli::all_addrs(&cluster);
    let parent_arg = parent.to_string();
    let split_args = ["--json", "cluster", "split", parent_arg.as_str()];
    let split = cluster_tests::cli::tally(&addr, &split_args, None);
    let (run, sent) = tokio::join!(split, ingestor.send_all(batches_sent_twice(&during, BATCH), 4));
    let (run, sent) = (run?, sent?);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(sent.accepted + sent.duplicates, 2 * during.len() as u64);
    let doc = run.json()?;
    assert_eq!(
        (doc["partition"].as_u64(), doc["parent"].as_u64(), doc["active"].as_bool()),
        (Some(4), Some(1), Some(true)),
        "{doc}"
    );

    let after = events("after", 2_000, minute - MINUTE_MS, 2 * MINUTE_MS);
    let c = ingestor.send_all(batches_sent_twice(&after, BATCH), 4).await?;
    assert_eq!(c.accepted + c.duplicates, 2 * after.len() as u64);

    // Every event once more: nothing is new, wherever it went.
    let all: Vec<Event> = before.iter().chain(&during).chain(&after).cloned().collect();
    let resent = ingestor.send_all(all.chunks(BATCH).map(<[Event]>::to_vec).collect(), 4).await?;
    assert_eq!(resent.accepted, 0, "a re-sent event was counted again");
    assert_eq!(resent.duplicates, all.len() as u64);

    let status = cluster.status(1).await?;
    assert_eq!((status.partition_count, status.slots), (5, 4), "{status:?}");
    let routing = routing_of(&status);
    let model = model_of(&all);
    let moved: Vec<&Vec<u8>> = model.keys().filter(|e| routing.home_of(e) == 4).collect();
    let stayed = model.keys().filter(|e| routing.home_of(e) == parent).count();
    assert!(!moved.is_empty() && stayed > 0, "both halves hold entities: {} moved, {stayed} stayed", moved.len());
    let (from, to) = (minute - 30 * MINUTE_MS, minute + 10 * MINUTE_MS);
    check_exact(&cluster, &model, from, to).await?;
    // Nothing of the moved entities is left in the parent.
    let mut query = cluster.query_client(2).await?;
    for entity in &moved {
        let r = query.stats(stats(entity, from, to, Consistency::Linearizable, parent + 1)).await?.into_inner();
        assert_eq!(r.count, 0, "{} still counted in the parent", String::from_utf8_lossy(entity));
        let series = query
            .series(SeriesRequest {
                entity_id: entity.to_vec(),
                event_type: "view".into(),
                from_ms: minute - 10 * MINUTE_MS,
                to_ms: minute + 2 * MINUTE_MS,
                granularity: PbGranularity::Minute as i32,
                consistency: Consistency::Linearizable as i32,
                share_partition_plus_one: 0,
            })
            .await?
            .into_inner();
        let minutes = &model[*entity];
        for b in &series.buckets {
            assert_eq!(
                (b.count, b.sum),
                minutes.get(&b.start_ms).copied().unwrap_or_default(),
                "minute {}",
                b.start_ms
            );
        }
    }
    // TopK over the whole cluster: every entity once, with its exact count.
    let top = query
        .top_k(TopKRequest {
            event_type: "view".into(),
            from_ms: from,
            to_ms: to,
            k: ENTITIES as u32,
            consistency: Consistency::Linearizable as i32,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(top.entries.len(), model.len());
    for e in &top.entries {
        assert_eq!(e.count, totals(&model[&e.entity_id]).0, "{}", String::from_utf8_lossy(&e.entity_id));
    }
    let compared = cluster.assert_replicas_identical(Duration::from_secs(30)).await?;
    assert_eq!(compared, 15, "5 partitions x 3 replicas");
    assert_eq!(cluster.dedup_conflicts().await?, 0);

    // The new partition splits again, and writes keep their place.
    let again = cluster_tests::cli::tally(&addr, &["--json", "cluster", "split", "4"], None).await?;
    assert_eq!(again.json()?["partition"].as_u64(), Some(5), "{again:?}");
    let resent = ingestor.send_all(all.chunks(BATCH).map(<[Event]>::to_vec).collect(), 4).await?;
    assert_eq!((resent.accepted, resent.duplicates), (0, all.len() as u64));
    check_exact(&cluster, &model, from, to).await?;
    cluster.assert_replicas_identical(Duration::from_secs(30)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_whose_replicas_all_crash_inside_it_completes_after_restart() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::shared().await;
    let mut cluster = TestCluster::start(ClusterOptions { nodes: 3, partitions: 2, args: vec![] }).await?;
    let ingestor = RetryingIngestor::new((1..=3).map(|id| (id, cluster.addr(id).unwrap_or_default())).collect());
    let now = tally_client::time_arg::now_ms();
    let minute = bucket_start(Granularity::Minute, now);
    let before = events("before", 2_000, minute - 4 * MINUTE_MS, 4 * MINUTE_MS);
    ingestor.send_all(batches_sent_twice(&before, BATCH), 4).await?;

    // Node 1 dies before the split's batch, nodes 2 and 3 after it: each
    // the moment its replica of partition 0 applies the split.
    let points = [(1, "split-checkpointed"), (2, "split-written"), (3, "split-written")];
    for (node, point) in points {
        cluster.stop(node)?;
        cluster.set_node_args(node, vec!["--crash-at".into(), point.into()])?;
        cluster.restart(node).await?;
    }
    cluster.wait_ready(Duration::from_secs(60)).await?;
    let addr = cluster_tests::cli::all_addrs(&cluster);
    let split = cluster_tests::cli::tally(&addr, &["--json", "cluster", "split", "0", "--timeout", "20s"], None);
    // A replica that had not applied the split when the two others died at
    // their points cannot learn it is committed: it is killed -9 instead.
    let (_run, exits) = tokio::join!(split, async {
        let mut exits = Vec::new();
        for (node, _) in points {
            exits.push(cluster.wait_exit(node, Duration::from_secs(30)).await.ok());
        }
        exits
    });
    let mut crashed = Vec::new();
    for ((node, point), exit) in points.iter().zip(exits) {
        match exit {
            Some(exit) => {
                assert!(!exit.success(), "node {node} should have crashed at {point}");
                assert!(cluster.log(*node).contains(&format!("crash point {point} reached")), "node {node}: {point}");
                crashed.push(*point);
            }
            None => cluster.kill9(*node)?,
        }
    }
    assert!(!crashed.is_empty(), "no replica crashed inside the split");
    eprintln!("split crash test: crashed inside the split at {crashed:?}, the rest killed -9");
    for (node, _) in points {
        cluster.set_node_args(node, Vec::new())?;
        cluster.restart(node).await?;
    }
    let status = wait_split_active(&cluster, 2, Duration::from_secs(90)).await?;
    assert_eq!(status.partition_count, 3);
    cluster.wait_ready(Duration::from_secs(60)).await?;

    let after = events("after", 1_000, minute - MINUTE_MS, 2 * MINUTE_MS);
    let c = ingestor.send_all(batches_sent_twice(&after, BATCH), 4).await?;
    assert_eq!(c.accepted + c.duplicates, 2 * after.len() as u64);
    let all: Vec<Event> = before.iter().chain(&after).cloned().collect();
    let resent = ingestor.send_all(all.chunks(BATCH).map(<[Event]>::to_vec).collect(), 4).await?;
    assert_eq!((resent.accepted, resent.duplicates), (0, all.len() as u64), "a re-sent event was counted again");
    let model = model_of(&all);
    check_exact(&cluster, &model, minute - 30 * MINUTE_MS, minute + 10 * MINUTE_MS).await?;
    assert_eq!(cluster.assert_replicas_identical(Duration::from_secs(60)).await?, 9);
    assert_eq!(cluster.dedup_conflicts().await?, 0);
    Ok(())
}
