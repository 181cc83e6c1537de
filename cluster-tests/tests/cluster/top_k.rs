//! `Query.TopK` against the model: exact from every node, ranked by count
//! and by sum, over ranges that need month, day and hour buckets; the same
//! from a node that was killed with -9 and caught up through snapshots
//! while it was down (its ranking index came in them), with replica digests
//! equal; the CLI; and bad requests refused with the field named.

use std::time::Duration;

use cluster_tests::ingestor::RetryingIngestor;
use cluster_tests::model::{Model, Workload};
use cluster_tests::{ClusterOptions, TestCluster};
use tally_proto::time::{align_range_to_hours, DAY_MS, HOUR_MS, MINUTE_MS};
use tally_proto::v1::{Consistency, Event, TopKOrder, TopKRequest, TopKResponse};
use tonic::Code;

const EVENTS: usize = 24_000;

fn request(event_type: &str, from: i64, to: i64, k: u32, order: TopKOrder, consistency: Consistency) -> TopKRequest {
    TopKRequest {
        event_type: event_type.into(),
        from_ms: from,
        to_ms: to,
        k,
        order: order as i32,
        consistency: consistency as i32,
        partitions: vec![],
    }
}

/// The reply as (entity, count, exact sum), after checking its range.
fn entries(reply: &TopKResponse) -> Vec<(Vec<u8>, u64, i128)> {
    reply.entries.iter().map(|e| (e.entity_id.clone(), e.count, e.sum_exact.parse().unwrap_or(i128::MIN))).collect()
}

/// Every node's answer to several rankings equals the model's.
async fn check_rankings(
    cluster: &TestCluster,
    model: &Model,
    end: i64,
    consistency: Consistency,
) -> anyhow::Result<()> {
    let ranges = [
        // 40 days: month, day and hour pieces.
        (end - 40 * DAY_MS, end + MINUTE_MS),
        // Unaligned ends: rounded out to whole hours.
        (end - 3 * DAY_MS - 17 * MINUTE_MS, end - DAY_MS + 5 * HOUR_MS + 1),
        (end - 5 * HOUR_MS, end - 2 * HOUR_MS),
    ];
    for id in cluster.live_node_ids() {
        let mut query = cluster.query_client(id).await?;
        for (from, to) in ranges {
            let (aligned_from, aligned_to) = align_range_to_hours(from, to);
            for (event_type, k, order) in
                [("view", 10, TopKOrder::Count), ("like", 25, TopKOrder::Sum), ("comment", 1_000, TopKOrder::Count)]
            {
                let reply = query.top_k(request(event_type, from, to, k, order, consistency)).await?.into_inner();
                assert_eq!((reply.effective_from_ms, reply.effective_to_ms), (aligned_from, aligned_to));
                let want = model.top_k(event_type, aligned_from, aligned_to, k as usize, order == TopKOrder::Sum);
                assert!(!want.is_empty(), "the workload has {event_type} events in range");
                assert_eq!(entries(&reply), want, "node {id}: top {k} {event_type} by {order:?} over {from}..{to}");
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_k_is_exact_from_any_node_and_after_snapshot_catch_up() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::shared().await;
    // Snapshots every 50 entries: a node down while half the events arrive
    // can only catch up through them.
    let mut cluster = TestCluster::start(ClusterOptions {
        nodes: 3,
        partitions: 8,
        args: vec!["--snapshot-logs".into(), "50".into()],
    })
    .await?;
    let end = tally_client::time_arg::now_ms();
    let mut workload = Workload::new(31, 300, end, 40 * DAY_MS);
    let mut model = Model::default();
    let events: Vec<Event> = (0..EVENTS).map(|_| workload.event()).collect();
    for e in &events {
        model.record(e);
    }
    let (first, second) = events.split_at(EVENTS / 2);
    let ingestor = RetryingIngestor::new((1..=3).map(|id| (id, cluster.addr(id).unwrap_or_default())).collect());
    ingestor.send_all(first.chunks(500).map(<[Event]>::to_vec).collect(), 4).await?;
    let mut half = Model::default();
    for e in first {
        half.record(e);
    }
    check_rankings(&cluster, &half, end, Consistency::Linearizable).await?;

    // Node 3 misses the second half and catches up from snapshots.
    cluster.kill9(3)?;
    let two = RetryingIngestor::new((1..=2).map(|id| (id, cluster.addr(id).unwrap_or_default())).collect());
    // Small batches: many entries per partition, so its log is purged.
    two.send_all(second.chunks(60).map(<[Event]>::to_vec).collect(), 4).await?;
    cluster.restart(3).await?;
    cluster.wait_ready(Duration::from_secs(60)).await?;
    cluster.assert_replicas_identical(Duration::from_secs(60)).await?;
    assert!(cluster.log(3).contains("installed snapshot"), "node 3 caught up through snapshots");
    check_rankings(&cluster, &model, end, Consistency::Linearizable).await?;
    // Stale reads on node 3 read its own replicas: its ranking index is the
    // one the snapshots carried.
    let mut stale = cluster.query_client(3).await?;
    let (from, to) = (end - 40 * DAY_MS, end + MINUTE_MS);
    let (aligned_from, aligned_to) = align_range_to_hours(from, to);
    let reply = stale.top_k(request("view", from, to, 50, TopKOrder::Count, Consistency::Stale)).await?.into_inner();
    assert_eq!(entries(&reply), model.top_k("view", aligned_from, aligned_to, 50, false));

    // The CLI prints the same ranking.
    let run = cluster_tests::cli::tally(
        &cluster.addr(1)?,
        &["--json", "top", "view", "--from", &from.to_string(), "--to", &to.to_string(), "-k", "3"],
        None,
    )
    .await?;
    let json = run.json()?;
    let want = model.top_k("view", aligned_from, aligned_to, 3, false);
    let got: Vec<(String, u64)> = json["entries"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| (e["entity"].as_str().unwrap_or_default().to_string(), e["count"].as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    let want: Vec<(String, u64)> =
        want.into_iter().map(|(e, c, _)| (String::from_utf8_lossy(&e).into_owned(), c)).collect();
    assert_eq!(got, want, "{json}");

    // Bad requests name the field.
    let mut query = cluster.query_client(2).await?;
    let bad = [
        (request("view", from, to, 0, TopKOrder::Count, Consistency::Linearizable), "k:"),
        (request("view", from, to, 1_001, TopKOrder::Count, Consistency::Linearizable), "k:"),
        (request("View!", from, to, 5, TopKOrder::Count, Consistency::Linearizable), "event_type:"),
        (request("view", to, from, 5, TopKOrder::Count, Consistency::Linearizable), "to_ms:"),
        (
            TopKRequest {
                partitions: vec![8],
                ..request("view", from, to, 5, TopKOrder::Count, Consistency::Linearizable)
            },
            "partitions:",
        ),
        (
            TopKRequest { order: 9, ..request("view", from, to, 5, TopKOrder::Count, Consistency::Linearizable) },
            "order:",
        ),
    ];
    for (req, field) in bad {
        let err = query.top_k(req).await.expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().starts_with(field), "{field}: {}", err.message());
    }
    Ok(())
}
