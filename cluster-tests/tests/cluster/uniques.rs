//! Unique actors: events carry an `actor_id`, and Stats answers how many
//! distinct actors an entity had in a range — from every node, over ranges
//! that need minute, hour and day buckets — within the sketch's error of
//! the truth (30,000 distinct actors behind 60,000 events on one entity,
//! a few hundred on others). Resent events change nothing; events without
//! an actor count but add no actor; Series buckets carry their own. A node killed with -9 catches up
//! through snapshots that carry the sketches: digests equal, and its stale
//! answers are the leader's exactly.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use cluster_tests::ingestor::RetryingIngestor;
use cluster_tests::{ClusterOptions, TestCluster};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tally_proto::time::{DAY_MS, HOUR_MS, MINUTE_MS};
use tally_proto::v1::{Consistency, Event, Granularity, IngestRequest, SeriesRequest, StatsRequest};

const ENTITIES: usize = 12;

/// (entity, time, actor) of every event, to compute the truth from.
type Truth = Vec<(String, i64, Option<String>)>;

fn distinct(truth: &Truth, entity: &str, from: i64, to: i64) -> (u64, u64) {
    let events: Vec<_> = truth.iter().filter(|(e, t, _)| e == entity && *t >= from && *t < to).collect();
    let actors: HashSet<&String> = events.iter().filter_map(|(_, _, a)| a.as_ref()).collect();
    (events.len() as u64, actors.len() as u64)
}

fn within_error(estimate: u64, truth: u64) -> bool {
    (estimate as f64 - truth as f64).abs() <= (0.03 * truth as f64).max(2.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uniques_are_within_the_sketch_error_from_every_node() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::shared().await;
    let mut cluster = TestCluster::start(ClusterOptions {
        nodes: 3,
        partitions: 8,
        args: vec!["--snapshot-logs".into(), "50".into()],
    })
    .await?;
    let now = tally_client::time_arg::now_ms();
    let mut rng = StdRng::seed_from_u64(61);
    let mut truth: Truth = Vec::new();
    let mut events = Vec::new();
    for n in 0..80_000u64 {
        // Entity 0 is the popular one: 60,000 events from 30,000 viewers.
        let entity = if n < 60_000 { 0 } else { 1 + (n as usize % (ENTITIES - 1)) };
        let pool = if entity == 0 { 30_000 } else { 50 * entity as u64 };
        let actor = (n % 10 != 9).then(|| format!("viewer-{}", rng.random_range(0..pool)));
        let time = now - rng.random_range(0..3 * DAY_MS);
        let name = format!("video-{entity}");
        events.push(Event {
            entity_id: name.clone().into_bytes(),
            event_type: "view".into(),
            event_time_ms: time,
            event_id: format!("u-{n}").into_bytes(),
            value: None,
            actor_id: actor.clone().unwrap_or_default().into_bytes(),
        });
        truth.push((name, time, actor));
    }
    let (first, second) = events.split_at(events.len() / 2);
    let all = RetryingIngestor::new((1..=3).map(|id| (id, cluster.addr(id).unwrap_or_default())).collect());
    all.send_all(first.chunks(1_000).map(<[Event]>::to_vec).collect(), 4).await?;
    cluster.kill9(3)?;
    let two = RetryingIngestor::new((1..=2).map(|id| (id, cluster.addr(id).unwrap_or_default())).collect());
    two.send_all(second.chunks(200).map(<[Event]>::to_vec).collect(), 4).await?;
    // Resent: duplicates, no new actors.
    let mut ingest = cluster.ingest_client(1).await?;
    let again = ingest.ingest(IngestRequest { events: events[..500].to_vec() }).await?.into_inner();
    assert_eq!(again.duplicates, 500, "{again:?}");
    cluster.restart(3).await?;
    cluster.wait_ready(Duration::from_secs(60)).await?;
    cluster.assert_replicas_identical(Duration::from_secs(60)).await?;
    assert!(cluster.log(3).contains("installed snapshot"), "node 3 caught up through snapshots");

    let ranges = [
        (now - 3 * DAY_MS - MINUTE_MS, now + MINUTE_MS),
        (now - DAY_MS - 7 * MINUTE_MS, now - 2 * HOUR_MS),
        (now - 5 * HOUR_MS, now - 4 * HOUR_MS + 13 * MINUTE_MS),
    ];
    let mut answers: BTreeMap<(u64, String, i64), u64> = BTreeMap::new();
    for id in cluster.live_node_ids() {
        let mut query = cluster.query_client(id).await?;
        for entity in 0..ENTITIES {
            let name = format!("video-{entity}");
            for (from, to) in ranges {
                let request = |consistency: Consistency| StatsRequest {
                    share_partition_plus_one: 0,
                    entity_id: name.clone().into_bytes(),
                    event_type: "view".into(),
                    from_ms: from,
                    to_ms: to,
                    consistency: consistency as i32,
                };
                let reply = query.stats(request(Consistency::Linearizable)).await?.into_inner();
                let (count, actors) = distinct(&truth, &name, reply.effective_from_ms, reply.effective_to_ms);
                assert_eq!(reply.count, count, "node {id} {name} {from}..{to}");
                assert!(
                    within_error(reply.uniques, actors),
                    "node {id} {name} {from}..{to}: {} uniques estimated, {actors} true",
                    reply.uniques
                );
                answers.insert((id, name.clone(), from), reply.uniques);
                // A replica's own answer is the same sketch, so the same number.
                let stale = query.stats(request(Consistency::Stale)).await?.into_inner();
                assert_eq!(stale.uniques, reply.uniques, "node {id} {name} stale");
            }
        }
    }
    // Every node gave the same estimate for the same question.
    for ((_, name, from), estimate) in &answers {
        assert_eq!(answers.get(&(1, name.clone(), *from)), Some(estimate));
    }
    // Series: each day's bucket has its own estimate.
    let mut query = cluster.query_client(2).await?;
    let day_start = tally_proto::time::bucket_start(tally_proto::time::Granularity::Day, now - 3 * DAY_MS);
    let days = query
        .series(SeriesRequest {
            share_partition_plus_one: 0,
            entity_id: b"video-0".to_vec(),
            event_type: "view".into(),
            from_ms: day_start,
            to_ms: now + MINUTE_MS,
            granularity: Granularity::Day as i32,
            consistency: Consistency::Linearizable as i32,
        })
        .await?
        .into_inner();
    assert_eq!(days.buckets.len(), 4);
    for bucket in &days.buckets {
        let (count, actors) = distinct(&truth, "video-0", bucket.start_ms, bucket.start_ms + DAY_MS);
        assert_eq!(bucket.count, count);
        assert!(
            within_error(bucket.uniques, actors),
            "day {}: {} estimated, {actors} true",
            bucket.start_ms,
            bucket.uniques
        );
    }
    let whole = ranges[0];
    let (_, big) = distinct(&truth, "video-0", whole.0, whole.1);
    assert!(big > 25_000, "the popular video has {big} distinct viewers");
    assert_eq!(cluster.dedup_conflicts().await?, 0);
    Ok(())
}
