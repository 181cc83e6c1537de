//! A node is down while every partition is quiesced: `Status` reports it
//! unreachable, a leadership transfer to it is refused at once, `rebalance`
//! skips the partitions it would lead — and every partition keeps taking
//! writes. Before, a transfer to the dead node left its partition with a
//! leader that had stepped aside (no heartbeats, writes refused) and
//! followers asleep, until the node came back.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use cluster_tests::nemesis::time_to_first_write;
use cluster_tests::{ClusterOptions, TestCluster};
use tally_proto::v1::{RebalanceRequest, TransferLeaderRequest};
use tonic::Code;

const PARTITIONS: u32 = 16;

/// Until node `observer` reports `node` as `reachable`; returns how long it took.
async fn wait_reachable(
    cluster: &TestCluster,
    observer: u64,
    node: u64,
    reachable: bool,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let status = cluster.status(observer).await?;
        let info =
            status.nodes.iter().find(|n| n.node_id == node).with_context(|| format!("node {node} not in the map"))?;
        if info.reachable == reachable {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            bail!("node {observer} still reports node {node} reachable={} after {timeout:?}", info.reachable);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_to_a_down_node_are_refused_and_no_partition_stalls() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::exclusive().await;
    let mut cluster = TestCluster::start(ClusterOptions { nodes: 3, partitions: PARTITIONS, args: Vec::new() }).await?;

    // Reachability comes from liveness: every node reports every node.
    for observer in cluster.node_ids() {
        for node in cluster.node_ids() {
            wait_reachable(&cluster, observer, node, true, Duration::from_secs(5)).await?;
        }
    }
    let took = cluster.wait_all_quiesced(Duration::from_secs(30)).await?;
    eprintln!("all replicas quiesced {took:?} after the cluster was ready");

    cluster.kill9(3)?;
    for observer in [1, 2] {
        let took = wait_reachable(&cluster, observer, 3, false, Duration::from_secs(5)).await?;
        eprintln!("node {observer} reports node 3 unreachable {took:?} after the kill");
    }

    // A partition led by a survivor: its leader must refuse, at once and by
    // name, to hand it to node 3. Asked through the other survivor, so the
    // refusal also crosses the forwarding hop.
    let status = cluster.status(1).await?;
    let p = status.partitions.iter().find(|p| p.leader_node_id == 1).context("node 1 leads no partition")?.partition;
    let mut admin = cluster.cluster_client(2).await?;
    let asked = Instant::now();
    let err =
        admin.transfer_leader(TransferLeaderRequest { partition: p, node_id: 3 }).await.expect_err("node 3 is down");
    eprintln!("transfer of partition {p} to node 3 refused in {:?}: {}", asked.elapsed(), err.message());
    ensure!(err.code() == Code::Unavailable, "{err:?}");
    ensure!(err.message().contains("node 3 is down"), "{}", err.message());
    ensure!(asked.elapsed() < Duration::from_secs(2), "a refusal, not a timeout: {:?}", asked.elapsed());

    // Wait for node 3's partitions to fail over, then rebalance: the
    // partitions node 3 should lead are reported as skipped, not attempted.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = cluster.status(1).await?;
        if s.partitions.iter().all(|p| p.leader_node_id == 1 || p.leader_node_id == 2) {
            break;
        }
        ensure!(Instant::now() < deadline, "no failover from node 3 within 20 s: {:?}", s.partitions);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let preferred_3: Vec<u32> =
        status.partitions.iter().filter(|p| p.replicas.first() == Some(&3)).map(|p| p.partition).collect();
    let asked = Instant::now();
    let mut request = tonic::Request::new(RebalanceRequest {});
    request.set_timeout(Duration::from_secs(60));
    let resp = admin.rebalance(request).await?.into_inner();
    eprintln!("rebalance in {:?}: {resp:?}", asked.elapsed());
    ensure!(
        resp.skipped == preferred_3,
        "skipped {:?}, expected the partitions node 3 prefers {preferred_3:?}",
        resp.skipped
    );
    ensure!(resp.failed == 0, "{resp:?}");

    // Every partition takes writes through both survivors.
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for via in [1, 2] {
        for p in 0..PARTITIONS {
            match time_to_first_write(&cluster, via, p, started, Duration::from_secs(10)).await {
                Some(t) => slowest = slowest.max(t),
                None => bail!("partition {p}: no write acknowledged through node {via} within 10 s"),
            }
        }
    }
    eprintln!("every partition acknowledged a write through nodes 1 and 2 within {slowest:?}");

    // Node 3 returns: rebalance hands its partitions back once it has caught up.
    cluster.restart(3).await?;
    cluster.wait_ready(Duration::from_secs(30)).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let resp = admin.rebalance(RebalanceRequest {}).await?.into_inner();
        let s = cluster.status(1).await?;
        let off_preferred: BTreeSet<u32> = s
            .partitions
            .iter()
            .filter(|p| p.replicas.first() != Some(&p.leader_node_id))
            .map(|p| p.partition)
            .collect();
        if resp.skipped.is_empty() && resp.failed == 0 && off_preferred.is_empty() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "not rebalanced 30 s after node 3 returned: {resp:?}, off preferred {off_preferred:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let compared = cluster.assert_replicas_identical(Duration::from_secs(30)).await?;
    eprintln!("{compared} replicas identical after node 3 returned");
    Ok(())
}
