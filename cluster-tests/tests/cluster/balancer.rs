//! The balancer: a fourth node joins an idle cluster and, with no operator
//! action, gets its share of partition leaderships; the leaders then stay
//! put (no flapping); paused with `tally cluster balancer off`, it leaves a
//! pile-up alone, and resumed, evens it out again. Writes stay exact.

use std::collections::BTreeMap;
use std::time::Duration;

use cluster_tests::{ClusterOptions, TestCluster};
use tally_proto::v1::{AddNodeRequest, TransferLeaderRequest};

const PARTITIONS: u32 = 12;

/// Leaders per node, as every partition's leader reports itself.
async fn leaders(cluster: &TestCluster) -> anyhow::Result<BTreeMap<u64, Vec<u32>>> {
    let mut led: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for id in cluster.live_node_ids() {
        let status = cluster.status(id).await?;
        for p in status.partitions.iter().filter(|p| p.leader_node_id == id) {
            led.entry(id).or_default().push(p.partition);
        }
    }
    Ok(led)
}

fn spread_of(led: &BTreeMap<u64, Vec<u32>>, nodes: &[u64]) -> (usize, usize) {
    let counts: Vec<usize> = nodes.iter().map(|n| led.get(n).map_or(0, Vec::len)).collect();
    (counts.iter().copied().min().unwrap_or(0), counts.iter().copied().max().unwrap_or(0))
}

async fn wait_for_even(cluster: &TestCluster, nodes: &[u64], within: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let led = leaders(cluster).await?;
        let (min, max) = spread_of(&led, nodes);
        if max - min <= 1 && led.values().map(Vec::len).sum::<usize>() == PARTITIONS as usize {
            return Ok(());
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "leaders not even after {within:?}: {led:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_balancer_evens_leaders_by_itself_and_can_be_paused() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::exclusive().await;
    let mut cluster = TestCluster::start(ClusterOptions {
        nodes: 3,
        partitions: PARTITIONS,
        args: vec!["--balancer-interval-ms".into(), "1000".into()],
    })
    .await?;
    let now = tally_client::time_arg::now_ms();
    let events = cluster_tests::view_events(600, 30, now, "before-");
    cluster.ingest_answered(1, &events).await?;

    // A fourth node joins; nobody asks for a rebalance.
    let four = cluster.spawn_extra_node().await?;
    cluster.cluster_client(2).await?.add_node(AddNodeRequest { addr: cluster.addr(four)? }).await?;
    let all = [1, 2, 3, four];
    wait_for_even(&cluster, &all, Duration::from_secs(90)).await?;
    let led = leaders(&cluster).await?;
    assert!(led.get(&four).is_some_and(|l| l.len() >= 2), "node {four} leads {:?}", led.get(&four));

    // Balanced: nothing moves for a while.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(leaders(&cluster).await?, led, "the balancer moved leaders of a balanced cluster");

    // Paused: a pile-up on node 1 stays.
    let addr = cluster_tests::cli::all_addrs(&cluster);
    let off = cluster_tests::cli::tally(&addr, &["--json", "cluster", "balancer", "off"], None).await?;
    assert_eq!(off.json()?["balancer_paused"], serde_json::json!(true), "{off:?}");
    let status = cluster_tests::cli::tally(&addr, &["--json", "cluster", "status"], None).await?.json()?;
    assert_eq!(status["balancer_paused"], serde_json::json!(true));
    let mut admin = cluster.cluster_client(1).await?;
    for p in led.iter().filter(|(n, _)| **n != 1).flat_map(|(_, ps)| ps.iter().take(1)) {
        let replicas = cluster.status(1).await?.partitions[*p as usize].replicas.clone();
        if replicas.contains(&1) {
            admin.transfer_leader(TransferLeaderRequest { partition: *p, node_id: 1 }).await?;
        }
    }
    let piled = leaders(&cluster).await?;
    let (min, max) = spread_of(&piled, &all);
    assert!(max - min >= 2, "the pile-up did not happen: {piled:?}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(leaders(&cluster).await?, piled, "a paused balancer moved leaders");

    // Resumed: even again.
    let on = cluster_tests::cli::tally(&addr, &["cluster", "balancer", "on"], None).await?;
    assert_eq!(on.code, 0, "{on:?}");
    wait_for_even(&cluster, &all, Duration::from_secs(60)).await?;

    let more = cluster_tests::view_events(600, 30, now, "after-");
    cluster.ingest_answered(2, &more).await?;
    let total =
        cluster.total_count(3, (0..30).map(|e| format!("video-{e}")), "view", now - 60_000, now + 60_000).await?;
    assert_eq!(total, 1_200);
    cluster.assert_replicas_identical(Duration::from_secs(30)).await?;
    Ok(())
}

/// Busy partitions whose replicas all sit on the same three of four nodes:
/// the balancer, by itself, moves one of their follower replicas to the
/// fourth node (a map change the reconciler carries out), and every event
/// written meanwhile is counted once, on identical replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_follow_the_load_to_an_idle_node() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::exclusive().await;
    let cluster = TestCluster::start(ClusterOptions {
        nodes: 4,
        partitions: 8,
        args: vec!["--balancer-interval-ms".into(), "1000".into()],
    })
    .await?;
    // Partitions 0 and 4 are both on nodes 1, 2, 3 (`ClusterMap::initial`).
    let status = cluster.status(1).await?;
    let hot: Vec<u32> = vec![0, 4];
    for p in &hot {
        assert_eq!(status.partitions[*p as usize].replicas, vec![1, 2, 3]);
    }
    let entities: Vec<String> = (0..200)
        .map(|i| format!("busy-{i}"))
        .filter(|e| hot.contains(&tally_proto::partition::partition_of(e.as_bytes(), 8)))
        .take(20)
        .collect();
    let ingestor = cluster_tests::ingestor::RetryingIngestor::new(
        (1..=4).map(|id| (id, cluster.addr(id).unwrap_or_default())).collect(),
    );
    let now = tally_client::time_arg::now_ms();
    let mut sent = 0u64;
    let started = tokio::time::Instant::now();
    let moved_to_four = loop {
        let batches: Vec<Vec<tally_proto::v1::Event>> = (0..4)
            .map(|b| {
                (0..250)
                    .map(|i| tally_proto::v1::Event {
                        entity_id: entities[i % entities.len()].clone().into_bytes(),
                        event_type: "view".into(),
                        event_time_ms: now,
                        event_id: format!("e-{sent}-{b}-{i}").into_bytes(),
                        value: Some(1),
                        actor_id: Vec::new(),
                    })
                    .collect()
            })
            .collect();
        let acked = ingestor.send_all(batches, 2).await?;
        assert_eq!(acked.accepted + acked.duplicates, 1_000);
        sent += 1_000;
        let status = cluster.status(1).await?;
        // (Node 1 reports no voters for a partition it holds no replica of.)
        let settled = status.partitions.iter().filter(|p| !p.voters.is_empty()).all(|p| {
            let mut voters = p.voters.clone();
            let mut replicas = p.replicas.clone();
            voters.sort_unstable();
            replicas.sort_unstable();
            voters == replicas
        });
        let on_four: Vec<u32> =
            hot.iter().copied().filter(|p| status.partitions[*p as usize].replicas.contains(&4)).collect();
        if !on_four.is_empty() && settled {
            break on_four;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(150),
            "no replica of the busy partitions moved to node 4: {:?}",
            status.partitions.iter().map(|p| (p.partition, p.replicas.clone(), p.voters.clone())).collect::<Vec<_>>()
        );
    };
    // One move at a time: the other busy partition stayed put.
    assert_eq!(moved_to_four.len(), 1, "{moved_to_four:?}");
    let total = cluster.total_count(4, entities.iter().cloned(), "view", now - 60_000, now + 60_000).await?;
    assert_eq!(total, sent);
    cluster.assert_replicas_identical(Duration::from_secs(60)).await?;
    assert_eq!(cluster.dedup_conflicts().await?, 0);
    Ok(())
}
