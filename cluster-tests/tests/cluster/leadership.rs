//! Operators move leaders: transfer one partition's leadership to a chosen
//! replica, and rebalance so every node leads its even share — while writes
//! keep being counted exactly.

use std::collections::BTreeMap;
use std::time::Duration;

use cluster_tests::{ClusterOptions, TestCluster};
use tally_proto::v1::{Event, IngestRequest, RebalanceRequest, TransferLeaderRequest};
use tonic::Code;

async fn write_and_count(cluster: &TestCluster, n: u32, tag: &str) -> anyhow::Result<u64> {
    let now = tally_client::time_arg::now_ms();
    let events = (0..n)
        .map(|i| Event {
            actor_id: Vec::new(),
            entity_id: format!("video-{}", i % 7).into_bytes(),
            event_type: "view".into(),
            event_time_ms: now,
            event_id: format!("{tag}-{i}").into_bytes(),
            value: None,
        })
        .collect();
    let resp = cluster.ingest_client(2).await?.ingest(IngestRequest { events }).await?.into_inner();
    anyhow::ensure!(resp.rejected.is_empty(), "rejected: {:?}", resp.rejected);
    cluster.total_count(3, (0..7).map(|e| format!("video-{e}")), "view", now - 3_600_000, now + 60_000).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_leader_and_rebalance() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::shared().await;
    let cluster = TestCluster::start(ClusterOptions { nodes: 3, partitions: 9, args: vec![] }).await?;
    assert_eq!(write_and_count(&cluster, 300, "a").await?, 300);

    // Move partition 4's leadership to each of its replicas in turn, asking
    // a node that may not be the leader.
    let status = cluster.status(1).await?;
    let replicas = status.partitions[4].replicas.clone();
    let mut admin = cluster.cluster_client(1).await?;
    for to in replicas.iter().rev() {
        let resp = admin.transfer_leader(TransferLeaderRequest { partition: 4, node_id: *to }).await?.into_inner();
        assert_eq!(resp.leader_node_id, *to);
        cluster.wait_ready(Duration::from_secs(10)).await?;
        assert_eq!(cluster.status(*to).await?.partitions[4].leader_node_id, *to);
    }
    let err =
        admin.transfer_leader(TransferLeaderRequest { partition: 4, node_id: 99 }).await.expect_err("not a replica");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("node_id"), "{}", err.message());
    assert_eq!(write_and_count(&cluster, 300, "b").await?, 600);

    // Pile every leadership onto node 3, then rebalance.
    for p in 0..9 {
        let _ = admin.transfer_leader(TransferLeaderRequest { partition: p, node_id: 3 }).await?;
    }
    let leaders = |s: &tally_proto::v1::StatusResponse| {
        let mut per_node = BTreeMap::<u64, u32>::new();
        for p in &s.partitions {
            *per_node.entry(p.leader_node_id).or_default() += 1;
        }
        per_node
    };
    assert_eq!(leaders(&cluster.status(3).await?), BTreeMap::from([(3, 9)]));
    let resp = admin.rebalance(RebalanceRequest {}).await?.into_inner();
    assert_eq!((resp.moved, resp.failed), (6, 0));
    cluster.wait_ready(Duration::from_secs(10)).await?;
    assert_eq!(leaders(&cluster.status(1).await?), BTreeMap::from([(1, 3), (2, 3), (3, 3)]));
    assert_eq!(write_and_count(&cluster, 300, "c").await?, 900);
    Ok(())
}
