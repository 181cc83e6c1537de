//! A membership change survives the crash of the node coordinating it: once
//! the new cluster map is committed, the groups' own leaders finish moving
//! the replicas, and the next metadata leader finishes the metadata group.

use std::time::{Duration, Instant};

use cluster_tests::{ClusterOptions, TestCluster};
use tally_proto::v1::{AddNodeRequest, IngestRequest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_node_completes_after_its_coordinator_is_killed() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::shared().await;
    let mut cluster = TestCluster::start(ClusterOptions { nodes: 3, partitions: 8, args: vec![] }).await?;
    let now = tally_client::time_arg::now_ms();
    let events = cluster_tests::view_events(2_000, 10, now, "e");
    let resp = cluster.ingest_client(1).await?.ingest(IngestRequest { events }).await?.into_inner();
    assert_eq!(resp.accepted, 2_000);

    let coordinator = cluster.status(1).await?.metadata_leader_node_id;
    let observer = (1..=3).find(|id| *id != coordinator).unwrap_or(1);
    let four = cluster.spawn_extra_node().await?;
    let addr = cluster.addr(four)?;
    let mut admin = cluster.cluster_client(coordinator).await?;
    let call = tokio::spawn(async move { admin.add_node(AddNodeRequest { addr }).await });

    // Kill the coordinator as soon as the new map is committed.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = cluster.status(observer).await?;
        if s.nodes.iter().any(|n| n.node_id == four) {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the new map was never committed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.kill9(coordinator)?;
    let _ = call.await?; // failed or not: the change must finish anyway

    // Every partition's leader reports voters == replicas, with node 4 in.
    let deadline = Instant::now() + Duration::from_secs(90);
    while !cluster.membership_settled().await {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the change did not finish after its coordinator died\n{}",
            cluster.post_mortem(&[]).await
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    anyhow::ensure!(cluster.status(observer).await?.nodes.iter().any(|n| n.node_id == four), "node 4 is in the map");
    cluster.restart(coordinator).await?;
    cluster.wait_ready(Duration::from_secs(30)).await?;
    let total =
        cluster.total_count(four, (0..10).map(|e| format!("video-{e}")), "view", now - 60_000, now + 60_000).await?;
    assert_eq!(total, 2_000);
    assert!(cluster.assert_replicas_identical(Duration::from_secs(60)).await? >= 24);
    Ok(())
}
