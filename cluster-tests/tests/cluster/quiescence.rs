//! Idle partitions quiesce (no heartbeats, no timers), wake on a write,
//! fail over when their leader's node dies — which only the node-level
//! liveness probe can notice, since quiesced followers run no election
//! timer — and a restarted node rejoins without taking leadership away.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::bail;
use cluster_tests::nemesis::time_to_first_write;
use cluster_tests::{ClusterOptions, TestCluster};

const PARTITIONS: u32 = 16;

async fn leaders(cluster: &TestCluster, via: u64) -> anyhow::Result<BTreeMap<u32, u64>> {
    Ok(cluster.status(via).await?.partitions.iter().map(|p| (p.partition, p.leader_node_id)).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_partitions_quiesce_wake_on_writes_and_fail_over_through_liveness() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::exclusive().await;
    let mut cluster = TestCluster::start(ClusterOptions { nodes: 3, partitions: PARTITIONS, args: Vec::new() }).await?;

    let took = cluster.wait_all_quiesced(Duration::from_secs(30)).await?;
    eprintln!("all replicas quiesced {took:?} after the cluster was ready");

    // A write to a quiesced partition is acknowledged and wakes it.
    let started = Instant::now();
    for p in 0..PARTITIONS {
        if time_to_first_write(&cluster, 1, p, started, Duration::from_secs(10)).await.is_none() {
            bail!("partition {p}: no write acknowledged while quiesced");
        }
    }
    let awake = {
        let s = cluster.status(1).await?;
        s.partitions.iter().filter(|p| !p.quiesced).count()
    };
    assert!(awake > 0, "writes to every partition left none of node 1's replicas awake");
    cluster.wait_all_quiesced(Duration::from_secs(30)).await?;

    // Kill the busiest leader while everything is quiesced: no follower has
    // an election timer running, so only liveness can start the failover.
    let victim = cluster.busiest_leader().await?;
    let survivor = cluster.node_ids().into_iter().find(|id| *id != victim).unwrap_or(1);
    let led: Vec<u32> =
        leaders(&cluster, survivor).await?.into_iter().filter(|(_, l)| *l == victim).map(|(p, _)| p).collect();
    assert!(!led.is_empty());
    cluster.kill9(victim)?;
    let killed = Instant::now();
    let mut resumed = Vec::new();
    for p in 0..PARTITIONS {
        match time_to_first_write(&cluster, survivor, p, killed, Duration::from_secs(20)).await {
            Some(t) => resumed.push(t),
            None => bail!("partition {p}: no write acknowledged within 20 s of killing node {victim} (it led {led:?})"),
        }
    }
    eprintln!(
        "node {victim} (leader of {} partitions) killed; every partition written again within {:?}",
        led.len(),
        resumed.iter().max()
    );
    let after_kill = leaders(&cluster, survivor).await?;
    assert!(after_kill.values().all(|l| *l != victim && *l != 0), "leaders after the kill: {after_kill:?}");

    // Let the survivors quiesce, restart the victim: its replicas start
    // dormant, the leaders wake when liveness reports the restart, and no
    // partition changes leader because a follower came back.
    cluster.wait_all_quiesced(Duration::from_secs(30)).await?;
    let before_restart = leaders(&cluster, survivor).await?;
    cluster.restart(victim).await?;
    cluster.wait_ready(Duration::from_secs(30)).await?;
    cluster.wait_all_quiesced(Duration::from_secs(30)).await?;
    let after_restart = leaders(&cluster, survivor).await?;
    assert_eq!(before_restart, after_restart, "a restarted follower took leadership away");
    let log = cluster.log(survivor);
    assert!(
        log.contains("Restarted("),
        "survivor {survivor} never saw node {victim} restart:\n{}",
        cluster.log_tail(survivor, 20)
    );

    let partitions = cluster.assert_replicas_identical(Duration::from_secs(30)).await?;
    eprintln!("{partitions} partitions identical on every replica");
    Ok(())
}
