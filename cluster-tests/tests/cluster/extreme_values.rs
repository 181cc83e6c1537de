//! Values at the i64 limits, with a follower paused while they arrive (it
//! catches up later, so RocksDB folds its merge operands in other groupings
//! than the leader's). Sums used to saturate, and saturating addition is not
//! associative: replicas could disagree and sums were wrong. Now sums are
//! exact (128-bit) and every replica answers the same.

use std::time::Duration;

use cluster_tests::checker::{self, History};
use cluster_tests::ingestor::RetryingIngestor;
use cluster_tests::model::Workload;
use cluster_tests::{ClusterOptions, TestCluster};
use tally_proto::time::{align_range, DAY_MS};
use tally_proto::v1::{Consistency, StatsRequest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sums_at_the_i64_limits_are_exact_on_every_replica() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::shared().await;
    let cluster = TestCluster::start(ClusterOptions { nodes: 3, partitions: 4, args: vec![] }).await?;
    let end = tally_client::time_arg::now_ms();
    let mut workload = Workload::new(5, 20, end, DAY_MS).with_extreme_values();
    let mut history = History::default();
    let ingestor = RetryingIngestor::new(
        cluster.node_ids().into_iter().map(|id| (id, cluster.addr(id).unwrap_or_default())).collect(),
    );
    let send = |n: usize, workload: &mut Workload, history: &mut History| {
        let batches: Vec<Vec<_>> = (0..n).map(|_| (0..100).map(|_| workload.event()).collect()).collect();
        for e in batches.iter().flatten() {
            history.attempted.record(e);
            history.acknowledged.record(e);
        }
        batches
    };
    let first = send(10, &mut workload, &mut history);
    ingestor.send_all(first, 2).await?;
    cluster.pause(3)?;
    let second = send(10, &mut workload, &mut history);
    let live = RetryingIngestor::new(vec![(1, cluster.addr(1)?), (2, cluster.addr(2)?)]);
    live.send_all(second, 2).await?;
    cluster.resume(3)?;
    let third = send(10, &mut workload, &mut history);
    ingestor.send_all(third, 2).await?;

    let (from, to) = align_range(end - 2 * DAY_MS, end + 60_000);
    let violations = checker::violations(&cluster, &history, 1, from, to).await?;
    assert!(violations.is_empty(), "{violations:#?}");
    // Every replica answers the exact sums, and says when they overflow int64.
    let mut overflowing = 0;
    for node in cluster.node_ids() {
        let mut query = cluster.query_client(node).await?;
        for (entity, event_type) in history.acknowledged.keys() {
            let s = query
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
            let (count, sum) = history.acknowledged.exact_stats(entity, event_type, from, to);
            assert_eq!((s.count, s.sum_exact.clone()), (count, sum.to_string()), "node {node}");
            assert_eq!(s.sum_overflow, i64::try_from(sum).is_err());
            overflowing += usize::from(s.sum_overflow);
        }
    }
    assert!(overflowing > 0, "the workload reached sums beyond int64");
    cluster.assert_replicas_identical(Duration::from_secs(30)).await?;
    Ok(())
}
