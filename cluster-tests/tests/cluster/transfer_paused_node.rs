//! A leadership transfer to a node that is alive when asked but then never
//! takes over (SIGSTOP) times out, and the partition takes writes again
//! within a bound instead of waiting for the node to wake up: the leader
//! hands the leadership to another voter, and the quiesced follower that
//! heard its leader step aside wakes and elects.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use cluster_tests::nemesis::time_to_first_write;
use cluster_tests::{ClusterOptions, TestCluster};
use tally_proto::v1::TransferLeaderRequest;
use tonic::Code;

const PARTITIONS: u32 = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_to_a_paused_node_times_out_and_the_partition_writes_again() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::exclusive().await;
    let cluster = TestCluster::start(ClusterOptions { nodes: 3, partitions: PARTITIONS, args: Vec::new() }).await?;
    cluster.wait_all_quiesced(Duration::from_secs(30)).await?;

    // A partition, its leader, the target to pause (not the metadata
    // leader, to keep the metadata group out of it) and the third replica.
    let status = cluster.status(1).await?;
    let metadata_leader = status.metadata_leader_node_id;
    let (p, leader, target) = status
        .partitions
        .iter()
        .find_map(|p| {
            let target = p.replicas.iter().copied().find(|r| *r != p.leader_node_id && *r != metadata_leader)?;
            (p.leader_node_id != 0).then_some((p.partition, p.leader_node_id, target))
        })
        .context("no partition with a follower outside the metadata leader")?;
    let third = cluster.node_ids().into_iter().find(|id| *id != leader && *id != target).context("3 nodes")?;
    eprintln!("partition {p}: leader {leader}, target {target} (to be paused), third replica {third}");

    // Pause, and ask at once: liveness still calls the target up, so the
    // transfer starts and must time out rather than stall the partition.
    let mut admin = cluster.cluster_client(leader).await?;
    cluster.pause(target)?;
    let paused = Instant::now();
    let mut request = tonic::Request::new(TransferLeaderRequest { partition: p, node_id: target });
    request.set_timeout(Duration::from_secs(30));
    let outcome = admin.transfer_leader(request).await;
    let answered = paused.elapsed();
    eprintln!("transfer answered after {answered:?}: {outcome:?}");
    let err = outcome.expect_err("a paused node cannot take over");
    ensure!(err.code() == Code::Unavailable, "{err:?}");
    ensure!(err.message().contains(&format!("node {target}")), "{}", err.message());
    ensure!(answered < Duration::from_secs(10), "the transfer is bounded: answered after {answered:?}");

    // The partition takes writes through the old leader and the third
    // replica while the target is still paused.
    let mut slowest = Duration::ZERO;
    for via in [leader, third] {
        match time_to_first_write(&cluster, via, p, paused, Duration::from_secs(10)).await {
            Some(t) => slowest = slowest.max(t),
            None => {
                bail!("partition {p}: no write acknowledged through node {via} within 10 s of pausing node {target}")
            }
        }
    }
    eprintln!("partition {p} acknowledged writes through nodes {leader} and {third} {slowest:?} after the pause");
    let now_led_by = cluster.status(third).await?.partitions[p as usize].leader_node_id;
    ensure!(now_led_by == leader || now_led_by == third, "partition {p} led by {now_led_by}");

    // And so does every other partition (those the target led fail over).
    for q in 0..PARTITIONS {
        if time_to_first_write(&cluster, third, q, paused, Duration::from_secs(15)).await.is_none() {
            bail!("partition {q}: no write acknowledged through node {third} within 15 s of pausing node {target}");
        }
    }
    eprintln!("every partition written within {:?} of the pause", paused.elapsed());

    cluster.resume(target)?;
    cluster.wait_ready(Duration::from_secs(30)).await?;
    let compared = cluster.assert_replicas_identical(Duration::from_secs(30)).await?;
    eprintln!("{compared} replicas identical after node {target} resumed");
    Ok(())
}
