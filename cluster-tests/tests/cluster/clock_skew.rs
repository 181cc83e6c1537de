//! A node whose clock is 11 minutes off leads partitions; client retries
//! with the same event ids must still be recognised as duplicates within
//! the dedup window (10 minutes). Before the fix, dedup keys were stamped
//! with whichever leader's wall clock: a leader 11 minutes ahead expired
//! every key of the last 11 minutes at its first entry, and keys stamped by
//! a leader 11 minutes behind expired as soon as a correct leader took over
//! — either way retries were counted twice.

use std::time::{Duration, Instant};

use cluster_tests::ingestor::RetryingIngestor;
use cluster_tests::{ClusterOptions, TestCluster};
use tally_proto::time::align_range;
use tally_proto::v1::{Event, StatsRequest, TransferLeaderRequest};

const PARTITIONS: u32 = 4;
const SKEW_MS: i64 = 11 * 60_000;

fn batch(tag: &str, n: usize, now: i64) -> Vec<Event> {
    (0..n)
        .map(|i| Event {
            actor_id: Vec::new(),
            entity_id: format!("clip-{}", i % 40).into_bytes(),
            event_type: "view".into(),
            event_time_ms: now - (i as i64 % 50) * 1_000,
            event_id: format!("{tag}-{i}").into_bytes(),
            value: Some(2),
        })
        .collect()
}

/// Move every partition's leadership to `to` and wait until it holds them.
async fn lead_everything(cluster: &TestCluster, to: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = cluster.status(to).await?;
        let missing: Vec<u32> =
            status.partitions.iter().filter(|p| p.leader_node_id != to).map(|p| p.partition).collect();
        if missing.is_empty() {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "node {to} did not take over partitions {missing:?}");
        let mut admin = cluster.cluster_client(to).await?;
        for partition in missing {
            let _ = admin.transfer_leader(TransferLeaderRequest { partition, node_id: to }).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Restart `node` with its clock shifted by `offset_ms` and give its
/// liveness probe time to read its peers' clocks.
async fn skew(cluster: &mut TestCluster, node: u64, offset_ms: i64) -> anyhow::Result<()> {
    cluster.stop(node)?;
    cluster.set_node_args(node, vec!["--clock-offset-ms".into(), offset_ms.to_string()])?;
    cluster.restart(node).await?;
    cluster.wait_ready(Duration::from_secs(60)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(())
}

async fn resend_all_duplicates(ingestor: &RetryingIngestor, events: Vec<Event>, what: &str) -> anyhow::Result<()> {
    let n = events.len() as u64;
    let acked = ingestor.send(events, 0).await?;
    assert_eq!((acked.accepted, acked.duplicates), (0, n), "{what}: a retry within the dedup window was counted again");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_with_a_skewed_clock_still_recognises_retries() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::shared().await;
    let mut cluster = TestCluster::start(ClusterOptions { nodes: 3, partitions: PARTITIONS, args: vec![] }).await?;
    let ingestor = RetryingIngestor::new(
        cluster.node_ids().into_iter().map(|id| (id, cluster.addr(id).unwrap_or_default())).collect(),
    );
    let now = tally_client::time_arg::now_ms();
    let mut sent = 0u64;

    // Ahead: node 3 runs 11 minutes fast and takes over after batch A.
    let a = batch("a", 400, now);
    assert_eq!(ingestor.send(a.clone(), 0).await?.accepted, 400);
    sent += 400;
    skew(&mut cluster, 3, SKEW_MS).await?;
    lead_everything(&cluster, 3).await?;
    assert_eq!(ingestor.send(batch("b", 400, now), 0).await?.accepted, 400, "new events are counted");
    sent += 400;
    resend_all_duplicates(&ingestor, a.clone(), "leader 11 minutes ahead").await?;

    // Behind: node 3 runs 11 minutes slow, leads batch C, then hands back.
    skew(&mut cluster, 3, -SKEW_MS).await?;
    lead_everything(&cluster, 3).await?;
    let c = batch("c", 400, now);
    assert_eq!(ingestor.send(c.clone(), 0).await?.accepted, 400);
    sent += 400;
    lead_everything(&cluster, 1).await?;
    assert_eq!(ingestor.send(batch("d", 400, now), 0).await?.accepted, 400);
    sent += 400;
    resend_all_duplicates(&ingestor, c, "keys stamped by a leader 11 minutes behind").await?;
    resend_all_duplicates(&ingestor, a, "keys of the first batch").await?;

    // Exact totals: 40 clips, every event counted once with value 2.
    let (from, to) = align_range(now - 3_600_000, now + 3_600_000);
    let mut query = cluster.query_client(1).await?;
    let (mut count, mut sum) = (0u64, 0i64);
    for clip in 0..40 {
        let s = query
            .stats(StatsRequest {
                share_partition_plus_one: 0,
                entity_id: format!("clip-{clip}").into_bytes(),
                event_type: "view".into(),
                from_ms: from,
                to_ms: to,
                consistency: 0,
            })
            .await?
            .into_inner();
        count += s.count;
        sum += s.sum;
    }
    assert_eq!((count, sum), (sent, 2 * sent as i64));
    assert_eq!(cluster.dedup_conflicts().await?, 0, "the leaders' dedup views were complete");
    cluster.assert_replicas_identical(Duration::from_secs(30)).await?;
    Ok(())
}
