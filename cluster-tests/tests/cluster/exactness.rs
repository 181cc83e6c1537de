//! 3 real nodes: ingest 100k distinct events plus 10% re-sent duplicates,
//! then check every stat and every granularity's series against the model,
//! stale reads on every replica, and that all replicas hold identical state.

use std::time::Duration;

use cluster_tests::ingestor::{Acked, RetryingIngestor};
use cluster_tests::model::{Model, Workload};
use cluster_tests::{ClusterOptions, TestCluster};
use rand::Rng;
use tally_proto::time::{align_range, Granularity, DAY_MS, HOUR_MS};
use tally_proto::v1::{Consistency, Event, Granularity as PbGranularity, SeriesRequest, StatsRequest};

const DISTINCT: usize = 100_000;
const BATCH: usize = 1_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_are_exact_at_every_granularity_and_replicas_agree() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::shared().await;
    let cluster = TestCluster::start(ClusterOptions { nodes: 3, partitions: 64, args: vec![] }).await?;
    let end = tally_client::time_arg::now_ms();
    // 75 days: every granularity, month boundaries included, gets exercised.
    let mut workload = Workload::new(7, 500, end, 75 * DAY_MS);
    let mut model = Model::default();

    // 100k distinct events; 10k more are re-sends of ids already sent,
    // some in the same batch, most in later ones, to any node.
    let mut sent: Vec<Event> = Vec::with_capacity(DISTINCT);
    let mut batches: Vec<Vec<Event>> = Vec::new();
    let mut batch = Vec::with_capacity(BATCH);
    let mut resent = 0;
    while sent.len() < DISTINCT || resent < DISTINCT / 10 {
        let resend = !sent.is_empty() && (sent.len() >= DISTINCT || workload.rng().random_bool(0.0909));
        if resend && resent < DISTINCT / 10 {
            let i = workload.rng().random_range(0..sent.len());
            batch.push(sent[i].clone());
            resent += 1;
        } else if sent.len() < DISTINCT {
            let e = workload.event();
            model.record(&e);
            sent.push(e.clone());
            batch.push(e);
        }
        if batch.len() == BATCH {
            batches.push(std::mem::take(&mut batch));
        }
    }
    if !batch.is_empty() {
        batches.push(batch);
    }

    // Batches go round-robin to the nodes; retryable rejections (a partition
    // briefly without a leader) are resent with the same ids.
    let total_sent: usize = batches.iter().map(Vec::len).sum();
    let batch_count = batches.len() as u64;
    let ingestor = RetryingIngestor::new((1..=3).map(|id| (id, cluster.addr(id).unwrap_or_default())).collect());
    let Acked { accepted, duplicates, attempts } = ingestor.send_all(batches, 4).await?;
    assert_eq!(accepted + duplicates, total_sent as u64, "every event is acknowledged one way or the other");
    assert!(accepted <= DISTINCT as u64, "never more accepted than distinct events");
    if attempts == batch_count {
        // No retries: the reply's accounting is exact too.
        assert_eq!(accepted, DISTINCT as u64, "every distinct event is counted once");
        assert_eq!(duplicates, (DISTINCT / 10) as u64, "every re-sent event is reported as a duplicate");
    } else {
        eprintln!("{} retries; accepted {accepted}, duplicates {duplicates}", attempts - batch_count);
    }

    // Linearizable stats of every (entity, type) over the whole span, from
    // node 1 (which forwards to leaders elsewhere).
    let mut query = cluster.query_client(1).await?;
    let (from, to) = (end - 80 * DAY_MS, end + 60_000);
    let mut total = 0;
    let keys: Vec<_> = model.keys().cloned().collect();
    for (entity, event_type) in &keys {
        let s = query
            .stats(StatsRequest {
                share_partition_plus_one: 0,
                entity_id: entity.clone(),
                event_type: event_type.clone(),
                from_ms: from,
                to_ms: to,
                consistency: 0,
            })
            .await?
            .into_inner();
        let (af, at) = align_range(from, to);
        assert_eq!(
            (s.count, s.sum),
            model.stats(entity, event_type, af, at),
            "stats of {:?}/{event_type}",
            String::from_utf8_lossy(entity)
        );
        total += s.count;
    }
    assert_eq!(total, DISTINCT as u64);

    // Random sub-ranges, unaligned on purpose: the answer covers the
    // minute-aligned range it reports.
    for _ in 0..300 {
        let (entity, event_type) = &keys[workload.rng().random_range(0..keys.len())];
        let a = end - workload.rng().random_range(0..76 * DAY_MS);
        let b = a + workload.rng().random_range(1..40 * DAY_MS);
        let s = query
            .stats(StatsRequest {
                share_partition_plus_one: 0,
                entity_id: entity.clone(),
                event_type: event_type.clone(),
                from_ms: a,
                to_ms: b,
                consistency: 0,
            })
            .await?
            .into_inner();
        let (af, at) = align_range(a, b);
        assert_eq!((s.effective_from_ms, s.effective_to_ms), (af, at));
        assert_eq!((s.count, s.sum), model.stats(entity, event_type, af, at), "range [{a}, {b})");
    }

    // Series at every granularity for the hottest keys.
    let spans = [
        (PbGranularity::Minute, Granularity::Minute, 2 * DAY_MS),
        (PbGranularity::Hour, Granularity::Hour, 20 * DAY_MS),
        (PbGranularity::Day, Granularity::Day, 80 * DAY_MS),
        (PbGranularity::Month, Granularity::Month, 200 * DAY_MS),
    ];
    for (entity, event_type) in keys.iter().take(12) {
        for (pb, g, span) in spans {
            let (from, to) = align_range(end - span - HOUR_MS / 3, end + 60_000);
            let s = query
                .series(SeriesRequest {
                    share_partition_plus_one: 0,
                    entity_id: entity.clone(),
                    event_type: event_type.clone(),
                    from_ms: from,
                    to_ms: to,
                    granularity: pb as i32,
                    consistency: 0,
                })
                .await?
                .into_inner();
            let got: Vec<_> = s.buckets.iter().map(|b| (b.start_ms, b.count, b.sum)).collect();
            assert_eq!(got, model.series(entity, event_type, g, from, to), "{} series", g.name());
        }
    }

    // Every replica converges to identical state...
    let digests = cluster.converged_digests(Duration::from_secs(30)).await?;
    for w in digests.windows(2) {
        assert_eq!(w[0].1, w[1].1, "nodes {} and {} disagree", w[0].0, w[1].0);
    }
    // ...and answers stale reads identically.
    for id in 1..=3 {
        let mut q = cluster.query_client(id).await?;
        for (entity, event_type) in keys.iter().take(30) {
            let s = q
                .stats(StatsRequest {
                    share_partition_plus_one: 0,
                    entity_id: entity.clone(),
                    event_type: event_type.clone(),
                    from_ms: from,
                    to_ms: to,
                    consistency: Consistency::Stale as i32,
                })
                .await?
                .into_inner();
            assert_eq!(s.served_by_node_id, id);
            let (af, at) = align_range(from, to);
            assert_eq!((s.count, s.sum), model.stats(entity, event_type, af, at));
        }
    }
    Ok(())
}
