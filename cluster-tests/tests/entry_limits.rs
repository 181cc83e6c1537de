//! Entries near the size limits, and a follower far behind. Before the fix
//! an entry could grow past its cap by a whole request, and one
//! AppendEntries carried up to 64 entries against the receiver's 64 MiB
//! decode limit: once a follower fell that far behind, replication re-sent
//! the same oversized request forever and the follower never caught up.
//! Now entries stop at 8 MiB (estimated) and AppendEntries at 16 MiB.
//!
//! It moves ~70 MiB through a debug build (about two minutes on 2 cores), so
//! it runs from `scripts/nemesis.sh`; the test command covers the same caps
//! with unit tests (`processor::tests`, `raft::network::tests`).

use std::time::{Duration, Instant};

use cluster_tests::ingestor::RetryingIngestor;
use cluster_tests::{ClusterOptions, TestCluster};
use tally_proto::v1::{Consistency, Event, StatsRequest};

/// A request near the API's limits: 10,000 events, each with a 256-byte
/// entity id of its own (about 3 MiB encoded; every event its own delta).
fn big_request(r: usize) -> Vec<Event> {
    (0..10_000)
        .map(|i| {
            let mut entity = format!("r{r}-e{i}-").into_bytes();
            entity.resize(256, b'x');
            Event { entity_id: entity, event_type: "view".into(), event_time_ms: 1_790_000_000_000, event_id: format!("{r}-{i}").into_bytes(), value: None }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run by scripts/nemesis.sh"]
async fn a_follower_far_behind_catches_up_through_big_entries() -> anyhow::Result<()> {
    let cluster = TestCluster::start(ClusterOptions { nodes: 3, partitions: 1, args: vec![] }).await?;
    let leader = cluster.busiest_leader().await?;
    let follower = cluster.node_ids().into_iter().find(|id| *id != leader).unwrap_or(2);
    cluster.pause(follower)?;
    let live: Vec<(u64, String)> =
        cluster.node_ids().into_iter().filter(|id| *id != follower).map(|id| (id, cluster.addr(id).unwrap_or_default())).collect();
    let ingestor = RetryingIngestor::new(live);
    // ~24 × 3 MiB: far more than one 64 MiB AppendEntries could carry.
    // Slow acks may be retried; a retry of a committed event is a duplicate.
    let acked = ingestor.send_all((0..24).map(big_request).collect(), 4).await?;
    assert_eq!(acked.accepted + acked.duplicates, 240_000);
    cluster.resume(follower)?;

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let leader_status = cluster.status(leader).await?;
        let follower_status = cluster.status(follower).await?;
        let (want, have) = (leader_status.partitions[0].commit_index, follower_status.partitions[0].applied_index);
        if have >= want && want > 0 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "follower {follower} stuck at applied index {have} of {want}; log:\n{}",
            cluster.log_tail(leader, 20)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    cluster.assert_replicas_identical(Duration::from_secs(60)).await?;
    // A sample of the events, each counted once, on the follower itself.
    let mut query = cluster.query_client(follower).await?;
    for r in (0..24).step_by(5) {
        for event in big_request(r).into_iter().step_by(997) {
            let s = query
                .stats(StatsRequest {
                    entity_id: event.entity_id,
                    event_type: "view".into(),
                    from_ms: 1_789_999_000_000,
                    to_ms: 1_790_001_000_000,
                    consistency: Consistency::Stale as i32,
                })
                .await?
                .into_inner();
            assert_eq!(s.count, 1);
        }
    }
    Ok(())
}
