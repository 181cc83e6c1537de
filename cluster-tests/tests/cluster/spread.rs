//! 3 real nodes: a hot entity is spread over 3 more partitions while it is
//! being written to, every batch sent twice with the same ids (a client's
//! retries). Afterwards its count, sums and minute series are exact from
//! every node, every share holds part of it, every event sent once more is
//! a duplicate, and the replicas agree.

use std::collections::BTreeMap;
use std::time::Duration;

use cluster_tests::ingestor::{batches_sent_twice, RetryingIngestor};
use cluster_tests::{ClusterOptions, TestCluster};
use tally_proto::time::{bucket_start, Granularity, MINUTE_MS};
use tally_proto::v1::{Consistency, Event, Granularity as PbGranularity, SeriesRequest, StatsRequest, TopKRequest};

const HOT: &str = "video-hot";
const BATCH: usize = 250;

/// Hot events `from..to` (ids `{tag}-{i}`), times spread over `[t0, t0 +
/// span)`, with a cold entity's event every tenth.
fn events(tag: &str, n: usize, t0: i64, span: i64) -> Vec<Event> {
    (0..n)
        .map(|i| Event {
            entity_id: if i % 10 == 9 { format!("video-cold-{}", i % 7) } else { HOT.to_string() }.into_bytes(),
            event_type: "view".into(),
            event_time_ms: t0 + (i as i64 * 7_919) % span.max(1),
            event_id: format!("{tag}-{i}").into_bytes(),
            value: Some(i as i64 % 5),
            actor_id: Vec::new(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spreading_a_hot_entity_under_load_counts_every_event_once() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::shared().await;
    let cluster = TestCluster::start(ClusterOptions { nodes: 3, partitions: 8, args: vec![] }).await?;
    let addrs: Vec<(u64, String)> = (1..=3).map(|id| (id, cluster.addr(id).unwrap_or_default())).collect();
    let ingestor = RetryingIngestor::new(addrs);
    let now = tally_client::time_arg::now_ms();
    let minute = bucket_start(Granularity::Minute, now);

    // Before: the last five minutes, all at the home partition.
    let before = events("before", 2_000, minute - 5 * MINUTE_MS, 5 * MINUTE_MS);
    let a = ingestor.send_all(batches_sent_twice(&before, BATCH), 4).await?;
    assert_eq!(a.accepted + a.duplicates, 2 * before.len() as u64);

    // During: the spread is asked for while events of this minute and the
    // next arrive — some reach the home after it stopped counting them.
    let during = events("during", 2_000, minute, 2 * MINUTE_MS);
    let addr = cluster_tests::cli::all_addrs(&cluster);
    let spread = cluster_tests::cli::tally(&addr, &["--json", "cluster", "spread", HOT, "--ways", "3"], None);
    let (run, sent) = tokio::join!(spread, ingestor.send_all(batches_sent_twice(&during, BATCH), 4));
    let (run, sent) = (run?, sent?);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(sent.accepted + sent.duplicates, 2 * during.len() as u64);
    let doc = run.json()?;
    let from_ms = doc["from_ms"].as_i64().unwrap_or(0);
    let home = doc["home_partition"].as_u64().unwrap_or(99) as u32;
    let shares: Vec<u32> =
        doc["partitions"].as_array().into_iter().flatten().filter_map(|p| p.as_u64()).map(|p| p as u32).collect();
    assert_eq!(home, tally_proto::partition::partition_of(HOT.as_bytes(), 8));
    assert_eq!(shares.len(), 3, "{doc}");
    assert!(!shares.contains(&home));
    assert!(from_ms > minute && from_ms % MINUTE_MS == 0, "from {from_ms}, now {now}");
    assert!(from_ms <= minute + 3 * MINUTE_MS, "after the latest minute counted: {from_ms}");
    // Asking again answers the spread in force.
    let again = cluster_tests::cli::tally(&addr, &["--json", "cluster", "spread", HOT, "--ways", "5"], None).await?;
    assert_eq!(again.json()?["from_ms"].as_i64(), Some(from_ms), "{again:?}");
    let status = cluster_tests::cli::tally(&addr, &["--json", "cluster", "status"], None).await?.json()?;
    assert_eq!(status["spreads"][0]["from_ms"].as_i64(), Some(from_ms), "{status}");

    // After: a minute from the spread's start, over the three shares.
    let after = events("after", 1_500, from_ms, MINUTE_MS);
    let c = ingestor.send_all(batches_sent_twice(&after, BATCH), 4).await?;
    assert_eq!(c.accepted + c.duplicates, 2 * after.len() as u64);

    // Every event once more, same ids: nothing is new, wherever it went.
    let all: Vec<Event> = before.iter().chain(&during).chain(&after).cloned().collect();
    let resent = ingestor.send_all(all.chunks(BATCH).map(<[Event]>::to_vec).collect(), 4).await?;
    assert_eq!(resent.accepted, 0, "a re-sent event was counted again");
    assert_eq!(resent.duplicates, all.len() as u64);

    // The model: per minute, count and sum of the hot entity.
    let mut model: BTreeMap<i64, (u64, i64)> = BTreeMap::new();
    for e in all.iter().filter(|e| e.entity_id == HOT.as_bytes()) {
        let slot = model.entry(bucket_start(Granularity::Minute, e.event_time_ms)).or_default();
        slot.0 += 1;
        slot.1 += e.value.unwrap_or(1);
    }
    let (count, sum) = model.values().fold((0, 0), |(c, s), (mc, ms)| (c + mc, s + ms));
    let (from, to) = (minute - 10 * MINUTE_MS, minute + 10 * MINUTE_MS);
    let request = |share: u32, consistency: Consistency| StatsRequest {
        entity_id: HOT.as_bytes().to_vec(),
        event_type: "view".into(),
        from_ms: from,
        to_ms: to,
        consistency: consistency as i32,
        share_partition_plus_one: share,
    };
    for node in 1..=3 {
        let mut query = cluster.query_client(node).await?;
        let linear = query.stats(request(0, Consistency::Linearizable)).await?.into_inner();
        assert_eq!((linear.count, linear.sum, linear.shares), (count, sum, 4), "node {node}");
        // Stale reads converge to the same.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let stale = query.stats(request(0, Consistency::Stale)).await?.into_inner();
            if (stale.count, stale.sum) == (count, sum) {
                break;
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "node {node}: stale {stale:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let series = query
            .series(SeriesRequest {
                entity_id: HOT.as_bytes().to_vec(),
                event_type: "view".into(),
                from_ms: from,
                to_ms: to,
                granularity: PbGranularity::Minute as i32,
                consistency: Consistency::Linearizable as i32,
                share_partition_plus_one: 0,
            })
            .await?
            .into_inner();
        assert_eq!(series.shares, 4);
        for b in &series.buckets {
            let want = model.get(&b.start_ms).copied().unwrap_or_default();
            assert_eq!((b.count, b.sum), want, "node {node}: minute {}", b.start_ms);
        }
    }
    // Each share holds its part: the home everything before the start, the
    // spread's partitions everything after it.
    let mut query = cluster.query_client(1).await?;
    let home_share = query.stats(request(home + 1, Consistency::Linearizable)).await?.into_inner();
    let before_start: u64 = model.range(..from_ms).map(|(_, (c, _))| c).sum();
    assert_eq!(home_share.count, before_start);
    for p in &shares {
        let share = query.stats(request(p + 1, Consistency::Linearizable)).await?.into_inner();
        assert!(share.count > 0, "partition {p} took none of the events after the start");
    }
    // The cold entities stayed where they were, exactly.
    for i in 0..7 {
        let entity = format!("video-cold-{i}");
        let want = all.iter().filter(|e| e.entity_id == entity.as_bytes()).count() as u64;
        let r = query
            .stats(StatsRequest { entity_id: entity.into_bytes(), ..request(0, Consistency::Linearizable) })
            .await?
            .into_inner();
        assert_eq!((r.count, r.shares), (want, 1));
    }
    // TopK ranks the spread entity by all of its shares.
    let top = query
        .top_k(TopKRequest {
            event_type: "view".into(),
            from_ms: from - 50 * MINUTE_MS,
            to_ms: to + 50 * MINUTE_MS,
            k: 3,
            consistency: Consistency::Linearizable as i32,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(top.entries.first().map(|e| (e.entity_id.as_slice(), e.count)), Some((HOT.as_bytes(), count)));
    cluster.assert_replicas_identical(Duration::from_secs(30)).await?;
    assert_eq!(cluster.dedup_conflicts().await?, 0);
    Ok(())
}

/// With `--auto-spread-share`, the metadata leader spreads an entity that
/// takes most of a busy partition's events by itself, and nothing sent
/// meanwhile is lost or counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_entity_is_spread_without_an_operator() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::shared().await;
    let args = ["--auto-spread-share", "0.5", "--auto-spread-min-events-per-sec", "20", "--auto-spread-ways", "2"];
    let cluster = TestCluster::start(ClusterOptions {
        nodes: 3,
        partitions: 8,
        args: args.iter().map(|a| a.to_string()).collect(),
    })
    .await?;
    let ingestor = RetryingIngestor::new((1..=3).map(|id| (id, cluster.addr(id).unwrap_or_default())).collect());
    const AUTO_HOT: &str = "video-auto-hot";
    let started = tokio::time::Instant::now();
    let mut sent: Vec<Event> = Vec::new();
    let mut after_start = 0;
    while after_start < 500 {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(150), "no spread after {:?}", started.elapsed());
        let now = tally_client::time_arg::now_ms();
        let batch: Vec<Event> = (0..100)
            .map(|i| Event {
                entity_id: if i % 5 == 4 { format!("video-cool-{}", i % 3) } else { AUTO_HOT.into() }.into_bytes(),
                event_type: "view".into(),
                event_time_ms: now,
                event_id: format!("auto-{}", sent.len() + i).into_bytes(),
                value: None,
                actor_id: Vec::new(),
            })
            .collect();
        let acked = ingestor.send_all(batches_sent_twice(&batch, BATCH), 2).await?;
        assert_eq!(acked.accepted + acked.duplicates, 200);
        let spread = cluster.status(1).await?.spreads.into_iter().find(|s| s.entity_id == AUTO_HOT.as_bytes());
        if let Some(s) = spread.filter(|s| s.from_ms != 0) {
            assert_eq!(s.partitions.len(), 2, "{s:?}");
            after_start += batch.iter().filter(|e| e.event_time_ms >= s.from_ms).count();
        }
        sent.extend(batch);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let hot = sent.iter().filter(|e| e.entity_id == AUTO_HOT.as_bytes()).count() as u64;
    let mut query = cluster.query_client(2).await?;
    let r = query
        .stats(StatsRequest {
            entity_id: AUTO_HOT.as_bytes().to_vec(),
            event_type: "view".into(),
            from_ms: started_ms(&sent) - MINUTE_MS,
            to_ms: tally_client::time_arg::now_ms() + MINUTE_MS,
            consistency: Consistency::Linearizable as i32,
            share_partition_plus_one: 0,
        })
        .await?
        .into_inner();
    assert_eq!((r.count, r.shares), (hot, 3));
    cluster.assert_replicas_identical(Duration::from_secs(30)).await?;
    Ok(())
}

fn started_ms(events: &[Event]) -> i64 {
    events.iter().map(|e| e.event_time_ms).min().unwrap_or(0)
}
