//! A leader killed -9 and restarted at once — as a supervisor restarts a
//! crashed process, before anyone else is elected — must not count its
//! clients' retries twice. openraft 0.10 restores such a leader into its old
//! term by default; its first blank entry of that term is the old one, so a
//! new leadership session could start with entries of the old session still
//! unapplied and accept a retry of an event one of them carries. Measured on
//! the code before the fix: 1.4% of acknowledged events counted twice.
//!
//! Writers retry with the same ids; every 2–3 s the busiest leader is killed
//! and restarted 0–300 ms later. Then every acknowledged event must be
//! counted exactly once (counts and sums), replicas identical, and the state
//! machines' dedup tripwire at 0 — the leader's argument held on its own.
//!
//! Checkpoints run every 50 ms here (5 s by default), so most kills land
//! during or between checkpoint writes and every restart replays the log
//! after the last one: the write-back state machine's crash boundary.

use std::time::{Duration, Instant};

use cluster_tests::checker::{self, Writers};
use cluster_tests::ingestor::RetryingIngestor;
use cluster_tests::model::Workload;
use cluster_tests::{ClusterOptions, TestCluster};
use rand::Rng;
use tally_proto::time::{align_range, DAY_MS};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaders_restarted_at_once_count_every_retry_once() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::exclusive().await;
    let secs = std::env::var("TALLY_RESTART_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    let mut cluster = TestCluster::start(ClusterOptions {
        nodes: 3,
        partitions: 16,
        args: vec!["--checkpoint-interval-ms".into(), "50".into()],
    })
    .await?;
    let end = tally_client::time_arg::now_ms();
    let ingestor = RetryingIngestor::new(
        cluster.node_ids().into_iter().map(|id| (id, cluster.addr(id).unwrap_or_default())).collect(),
    );
    let seed: u64 = rand::random();
    eprintln!("restart-at-once seed {seed}");
    let workloads = (0..3).map(|w| Workload::new(seed.wrapping_add(w), 100, end, DAY_MS)).collect();
    let writers = Writers::spawn(&ingestor, workloads, 100, Duration::from_secs(60));

    let started = Instant::now();
    let mut restarts = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(2_000..3_000))).await;
        let victim = cluster.busiest_leader().await?;
        cluster.kill9(victim)?;
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(0..300))).await;
        cluster.restart(victim).await?;
        restarts += 1;
    }
    // Let the last retries settle before stopping the writers.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let history = writers.finish().await;
    cluster.wait_ready(Duration::from_secs(60)).await?;
    let (from, to) = align_range(end - 2 * DAY_MS, end + 60_000);
    let violations = checker::violations(&cluster, &history, 1, from, to).await?;
    eprintln!(
        "{restarts} restarts at once; events attempted {}, acknowledged {}; batches {} ({} partly given up); violations {}",
        history.attempted.distinct_events(),
        history.acknowledged.distinct_events(),
        history.batches_attempted,
        history.batches_given_up,
        violations.len()
    );
    for v in violations.iter().take(20) {
        eprintln!("  {v}");
    }
    assert!(violations.is_empty(), "{} violations (see above)", violations.len());
    assert!(history.acknowledged.distinct_events() > 1_000, "the workload made progress");
    Ok(())
}
