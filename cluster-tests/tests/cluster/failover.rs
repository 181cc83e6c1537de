//! Kill -9 the node leading the most partitions in the middle of ingest;
//! clients retry unacknowledged batches with the same event ids. Counts must
//! be exact, replicas identical, and the killed node must catch up after a
//! restart — through a snapshot, because its log was purged meanwhile.
//! And a node that crashes in the middle of installing those snapshots
//! (at named crash points, so the crash lands there every time) recovers
//! to the same exact state on its next start.

use std::time::Duration;

use cluster_tests::ingestor::RetryingIngestor;
use cluster_tests::model::{Model, Workload};
use cluster_tests::{ClusterOptions, TestCluster};
use tally_proto::time::{align_range, DAY_MS};
use tally_proto::v1::{Consistency, Event, StatsRequest};

const BATCH: usize = 500;

async fn ingest_all(ingestor: &RetryingIngestor, batches: Vec<Vec<Event>>) -> anyhow::Result<(u64, u64)> {
    let acked = ingestor.send_all(batches, 4).await?;
    Ok((acked.accepted, acked.attempts))
}

async fn check_counts(
    cluster: &TestCluster,
    node: u64,
    model: &Model,
    end: i64,
    consistency: Consistency,
) -> anyhow::Result<()> {
    let mut q = cluster.query_client(node).await?;
    let (from, to) = align_range(end - 31 * DAY_MS, end + 60_000);
    let mut total = 0;
    for (entity, event_type) in model.keys() {
        let s = q
            .stats(StatsRequest {
                share_partition_plus_one: 0,
                entity_id: entity.clone(),
                event_type: event_type.clone(),
                from_ms: from,
                to_ms: to,
                consistency: consistency as i32,
            })
            .await?
            .into_inner();
        assert_eq!(
            (s.count, s.sum),
            model.stats(entity, event_type, from, to),
            "node {node}: {:?}/{event_type}",
            String::from_utf8_lossy(entity)
        );
        total += s.count;
    }
    assert_eq!(total as usize, model.distinct_events());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_crash_loses_nothing_and_counts_nothing_twice() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::exclusive().await;
    let mut cluster = TestCluster::start(ClusterOptions {
        nodes: 3,
        partitions: 16,
        // Snapshot and purge often, so the restarted node needs a snapshot.
        args: vec!["--snapshot-logs".into(), "20".into()],
    })
    .await?;
    let end = tally_client::time_arg::now_ms();
    let mut workload = Workload::new(11, 300, end, 30 * DAY_MS);
    let mut model = Model::default();
    let mut make_batches = |n: usize, model: &mut Model| -> Vec<Vec<Event>> {
        (0..n)
            .map(|_| {
                (0..BATCH)
                    .map(|_| {
                        let e = workload.event();
                        model.record(&e);
                        e
                    })
                    .collect()
            })
            .collect()
    };
    let first = make_batches(120, &mut model);
    let ingestor = RetryingIngestor::new((1..=3).map(|id| (id, cluster.addr(id).unwrap_or_default())).collect());

    let victim = cluster.busiest_leader().await?;
    let ingest = tokio::spawn({
        let ingestor = ingestor.clone();
        async move { ingest_all(&ingestor, first).await }
    });
    // Let a good part of the ingest happen, then kill the busiest leader.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ingestor.mark_dead(victim);
    cluster.kill9(victim)?;
    eprintln!("killed node {victim}");
    let (accepted, attempts) = ingest.await??;
    eprintln!("phase 1: {accepted} accepted over {attempts} attempts");
    assert!(accepted as usize <= model.distinct_events());

    let survivor = (1..=3).find(|id| *id != victim).unwrap_or(1);
    check_counts(&cluster, survivor, &model, end, Consistency::Linearizable).await?;

    // More writes while the victim is down, so its log falls behind snapshots.
    let second = make_batches(40, &mut model);
    ingest_all(&ingestor, second).await?;
    check_counts(&cluster, survivor, &model, end, Consistency::Linearizable).await?;

    cluster.restart(victim).await?;
    ingestor.mark_live(victim);
    let digests = cluster.converged_digests(Duration::from_secs(90)).await?;
    assert_eq!(digests.len(), 3);
    for w in digests.windows(2) {
        assert_eq!(w[0].1, w[1].1, "nodes {} and {} disagree", w[0].0, w[1].0);
    }
    check_counts(&cluster, victim, &model, end, Consistency::Stale).await?;
    assert!(
        cluster.log(victim).contains("installed snapshot"),
        "the restarted node should have caught up through a snapshot"
    );
    cluster.wait_ready(Duration::from_secs(30)).await?;
    Ok(())
}

/// The victim is behind its peers' snapshots, so catching up means
/// installing them; it crashes twice while doing so — once with its old
/// state wiped and the new one not yet written, once with the new state
/// written but not yet published or loaded — and then starts normally.
/// Recovery must end with the same state as its peers (digests) and exact
/// counts on it, also for writes made after the crashes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_in_the_middle_of_a_snapshot_install_lose_nothing() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::exclusive().await;
    let mut cluster = TestCluster::start(ClusterOptions {
        nodes: 3,
        partitions: 8,
        args: vec!["--snapshot-logs".into(), "20".into(), "--checkpoint-interval-ms".into(), "100".into()],
    })
    .await?;
    let end = tally_client::time_arg::now_ms();
    let mut workload = Workload::new(12, 200, end, 30 * DAY_MS);
    let mut model = Model::default();
    let mut batches = |n: usize, model: &mut Model| -> Vec<Vec<Event>> {
        let mut event = || {
            let e = workload.event();
            model.record(&e);
            e
        };
        (0..n).map(|_| (0..BATCH).map(|_| event()).collect()).collect()
    };
    let ingestor = RetryingIngestor::new((1..=3).map(|id| (id, cluster.addr(id).unwrap_or_default())).collect());
    ingest_all(&ingestor, batches(20, &mut model)).await?;

    let victim = 3;
    ingestor.mark_dead(victim);
    cluster.kill9(victim)?;
    // Enough writes while it is down that every partition's log moves past
    // a snapshot and is purged: the victim can only catch up by snapshot.
    ingest_all(&ingestor, batches(40, &mut model)).await?;

    for point in ["snapshot-install-wiped", "snapshot-install-written"] {
        cluster.set_node_args(victim, vec!["--crash-at".into(), point.into()])?;
        let status = cluster.run_until_exit(victim, Duration::from_secs(60)).await?;
        assert!(!status.success(), "node {victim} should have crashed at {point}: {status}");
        assert!(cluster.log(victim).contains(&format!("crash point {point} reached")), "{point} not reached");
    }
    cluster.set_node_args(victim, Vec::new())?;
    cluster.restart(victim).await?;
    ingestor.mark_live(victim);
    assert!(
        cluster.log(victim).contains("snapshot install was interrupted"),
        "the restart after the first crash should have found the install marker"
    );
    // Writes after the crashes reach the victim too.
    ingest_all(&ingestor, batches(10, &mut model)).await?;
    let digests = cluster.converged_digests(Duration::from_secs(90)).await?;
    assert_eq!(digests.len(), 3);
    for w in digests.windows(2) {
        assert_eq!(w[0].1, w[1].1, "nodes {} and {} disagree", w[0].0, w[1].0);
    }
    check_counts(&cluster, victim, &model, end, Consistency::Stale).await?;
    check_counts(&cluster, 1, &model, end, Consistency::Linearizable).await?;
    Ok(())
}
