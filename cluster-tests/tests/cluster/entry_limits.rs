//! Entries near the size limits, and a follower far behind (its links cut). Before the fix
//! an entry could grow past its cap by a whole request, and one
//! AppendEntries carried up to 64 entries against the receiver's 64 MiB
//! decode limit: once a follower fell that far behind, replication re-sent
//! the same oversized request forever and the follower never caught up.
//! Now entries stop at 8 MiB (estimated) and AppendEntries at 16 MiB.
//!
//! It moves ~85 MiB through a debug build (about 100 s on 2 cores), so it
//! runs from `scripts/nemesis.sh`; the test command covers the caps with unit
//! tests (`processor::tests`, `raft::network::tests`). The code before the
//! caps stayed stuck for good (applied index 7 of 40: every retry of the
//! oversized AppendEntries was refused by the decoder). The test runs with
//! slower timers (500 ms heartbeats, 2–4 s elections): with the defaults,
//! heartbeats with a 200 ms deadline time out behind multi-MiB appends on a
//! 2-core debug build and leadership churns (the follower then got 25 of 48
//! entries in 120 s) — the overload cliff the multi-Raft issue is about.

use std::time::{Duration, Instant};

use cluster_tests::ingestor::RetryingIngestor;
use cluster_tests::netproxy::LinkMode;
use cluster_tests::{ClusterOptions, TestCluster};
use tally_proto::v1::{Consistency, Event, StatsRequest};

/// Requests sent while the follower is cut off.
const REQUESTS: usize = 32;

/// A request near the API's limits: 10,000 events, each with a 256-byte
/// entity id of its own (about 3 MiB encoded; every event its own delta).
fn big_request(r: usize) -> Vec<Event> {
    (0..10_000)
        .map(|i| {
            let mut entity = format!("r{r}-e{i}-").into_bytes();
            entity.resize(256, b'x');
            Event {
                actor_id: Vec::new(),
                entity_id: entity,
                event_type: "view".into(),
                event_time_ms: 1_790_000_000_000,
                event_id: format!("{r}-{i}").into_bytes(),
                value: None,
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run by scripts/nemesis.sh"]
async fn a_follower_far_behind_catches_up_through_big_entries() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::exclusive().await;
    // Slower timers than the defaults: this test is about entry sizes, and on
    // a 2-core debug build heartbeats behind multi-MiB appends miss 200 ms
    // deadlines and churn leadership (the multi-Raft issue's cliff).
    let args = ["--heartbeat-ms", "500", "--election-timeout-ms", "2000"].map(String::from).to_vec();
    let cluster = TestCluster::start_proxied(ClusterOptions { nodes: 3, partitions: 1, args }).await?;
    let leader = cluster.busiest_leader().await?;
    let follower = cluster.node_ids().into_iter().find(|id| *id != leader).unwrap_or(2);
    let others: Vec<u64> = cluster.node_ids().into_iter().filter(|id| *id != follower).collect();
    // Cut, not paused: a paused follower's socket buffers would take the
    // entries a few at a time. Cut, it is far behind when it comes back, and
    // the leader sends it everything from its matched index at once.
    cluster.partition(&[follower], &others, LinkMode::Drop);
    let live: Vec<(u64, String)> = cluster
        .node_ids()
        .into_iter()
        .filter(|id| *id != follower)
        .map(|id| (id, cluster.addr(id).unwrap_or_default()))
        .collect();
    let ingestor = RetryingIngestor::new(live);
    // ~32 × 2.6 MiB of entries: more than one 64 MiB AppendEntries can carry.
    // Slow acks may be retried; a retry of a committed event is a duplicate.
    let acked = ingestor.send_all((0..REQUESTS).map(big_request).collect(), 4).await?;
    assert_eq!(acked.accepted + acked.duplicates, REQUESTS as u64 * 10_000);
    cluster.heal();

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        // Everything acknowledged is applied on the nodes that were not cut.
        let mut want = 0;
        for id in &others {
            want = want.max(cluster.status(*id).await?.partitions[0].applied_index);
        }
        let have = cluster.status(follower).await?.partitions[0].applied_index;
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
    for r in (0..REQUESTS).step_by(5) {
        for event in big_request(r).into_iter().step_by(997) {
            let s = query
                .stats(StatsRequest {
                    share_partition_plus_one: 0,
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
