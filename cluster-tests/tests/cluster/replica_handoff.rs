//! A replica the cluster map moves off a node stays, and keeps voting, until
//! the group's voters no longer include it — however long its replacement
//! takes to join. Before, the node dropped it 20 s after the map changed,
//! even while it was still a voter, and its group ran on two replicas of
//! three until the replacement was promoted.
//!
//! Here the replacement's node is paused (SIGSTOP) across the change, so it
//! cannot catch up; the node being removed must keep those replicas well
//! past 20 s and drop them only after the paused node resumes and is
//! promoted.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use cluster_tests::{ClusterOptions, TestCluster};
use tally_proto::v1::{DigestRequest, IngestRequest, RemoveNodeRequest, TransferLeaderRequest};

const PARTITIONS: u32 = 8;
const ENTITIES: u32 = 40;
/// The delay after which the old reconciler dropped a replica that was still a voter.
const OLD_DROP_AFTER: Duration = Duration::from_secs(20);

/// Partition → leader, as reported by each leader itself among `nodes`.
async fn self_reported_leaders(cluster: &TestCluster, nodes: &[u64]) -> anyhow::Result<BTreeMap<u32, u64>> {
    let mut leaders = BTreeMap::new();
    for n in nodes {
        let s = cluster.status(*n).await?;
        leaders.extend(s.partitions.iter().filter(|p| p.leader_node_id == *n).map(|p| (p.partition, *n)));
    }
    Ok(leaders)
}

async fn held_by(cluster: &TestCluster, node: u64) -> anyhow::Result<BTreeSet<u32>> {
    let digest = cluster.cluster_client(node).await?.digest(DigestRequest { partitions: vec![] }).await?.into_inner();
    Ok(digest.partitions.iter().map(|p| p.partition).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_moved_away_stays_a_voter_until_its_replacement_is_promoted() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::exclusive().await;
    let cluster = TestCluster::start(ClusterOptions { nodes: 4, partitions: PARTITIONS, args: Vec::new() }).await?;
    let now = tally_client::time_arg::now_ms();
    let events = cluster_tests::view_events(2_000, ENTITIES, now, "e");
    let resp = cluster.ingest_client(1).await?.ingest(IngestRequest { events }).await?.into_inner();
    ensure!(resp.accepted == 2_000, "{resp:?}");

    // Removing node 4 moves each of its replicas to the one node of 1..=3
    // that does not hold the partition yet. The slow node: one that gains
    // replicas and is not the metadata leader (which coordinates the change).
    let status = cluster.status(1).await?;
    let coordinator = status.metadata_leader_node_id;
    let newcomer: BTreeMap<u32, u64> = status
        .partitions
        .iter()
        .filter(|p| p.replicas.contains(&4))
        .filter_map(|p| (1..=3).find(|n| !p.replicas.contains(n)).map(|n| (p.partition, n)))
        .collect();
    let slow = (1..=3)
        .filter(|n| *n != coordinator)
        .max_by_key(|n| newcomer.values().filter(|m| *m == n).count())
        .context("3 nodes")?;
    let waiting: BTreeSet<u32> = newcomer.iter().filter(|(_, n)| **n == slow).map(|(p, _)| *p).collect();
    ensure!(!waiting.is_empty(), "node {slow} gains no replica: {newcomer:?}");
    eprintln!("node 4 → replacements {newcomer:?}; node {slow} (paused) replaces it for {waiting:?}");

    // Pause the slow node; its partitions fail over. Then node 4 must follow
    // in every group (a leader moves the membership itself, so node 4 would
    // never drop a group it leads): hand its leaderships to the third replica.
    cluster.pause(slow)?;
    let live: Vec<u64> = cluster.node_ids().into_iter().filter(|n| *n != slow).collect();
    let mut admin = cluster.cluster_client(coordinator).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let leaders = self_reported_leaders(&cluster, &live).await?;
        if leaders.len() == PARTITIONS as usize && leaders.values().all(|l| *l != 4) {
            break;
        }
        ensure!(Instant::now() < deadline, "partitions still led by node {slow} or 4, or leaderless: {leaders:?}");
        for (p, _) in leaders.iter().filter(|(_, l)| **l == 4) {
            let replicas = &status.partitions[*p as usize].replicas;
            let to = replicas.iter().copied().find(|r| *r != 4 && *r != slow).context("a third replica")?;
            if let Err(e) = admin.transfer_leader(TransferLeaderRequest { partition: *p, node_id: to }).await {
                eprintln!("partition {p} to node {to}: {e}; retrying");
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let call = tokio::spawn(async move {
        let mut request = tonic::Request::new(RemoveNodeRequest { node_id: 4 });
        request.set_timeout(Duration::from_secs(180));
        admin.remove_node(request).await
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if cluster.status(coordinator).await?.nodes.iter().all(|n| n.node_id != 4) {
            break;
        }
        ensure!(Instant::now() < deadline, "the map without node 4 was never committed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let committed = Instant::now();

    // Well past the old drop delay, node 4 still holds (and votes in) every
    // group whose replacement could not join.
    while committed.elapsed() < OLD_DROP_AFTER + Duration::from_secs(5) {
        let held = held_by(&cluster, 4).await?;
        ensure!(
            waiting.is_subset(&held),
            "{:?} after the change, node 4 dropped replicas still waiting for node {slow}: holds {held:?}, waiting {waiting:?}",
            committed.elapsed()
        );
        // Whichever live node leads a waiting partition counts node 4 among its voters.
        for n in &live {
            let s = cluster.status(*n).await?;
            for info in s.partitions.iter().filter(|i| waiting.contains(&i.partition) && i.leader_node_id == *n) {
                ensure!(
                    info.voters.contains(&4),
                    "partition {}: voters {:?} without node 4 before node {slow} joined",
                    info.partition,
                    info.voters
                );
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    eprintln!("node 4 kept {waiting:?} for {:?} while node {slow} was paused", committed.elapsed());

    // The replacement joins and is promoted; only then does node 4 let go.
    cluster.resume(slow)?;
    let resumed = Instant::now();
    let deadline = resumed + Duration::from_secs(90);
    loop {
        let held = held_by(&cluster, 4).await?;
        if held.is_empty() {
            break;
        }
        ensure!(Instant::now() < deadline, "node 4 still holds {held:?} 90 s after node {slow} resumed");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eprintln!("node 4 dropped every replica {:?} after node {slow} resumed", resumed.elapsed());
    let removed = call.await??.into_inner();
    eprintln!("remove-node returned: {removed:?}");

    cluster.wait_ready(Duration::from_secs(30)).await?;
    let total = cluster
        .total_count(slow, (0..ENTITIES).map(|e| format!("video-{e}")), "view", now - 3_600_000, now + 60_000)
        .await?;
    ensure!(total == 2_000, "count after the move: {total}");
    let compared = cluster.assert_replicas_identical(Duration::from_secs(30)).await?;
    eprintln!("{compared} replicas identical");
    Ok(())
}
