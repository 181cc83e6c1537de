//! Jepsen-style run: concurrent clients ingest unique events and retry until
//! acknowledged while a seeded nemesis kills, pauses and partitions nodes.
//! After healing, the checker requires for every (entity, type):
//! acknowledged ≤ count ≤ attempted, and count == acknowledged exactly when
//! every batch was eventually acknowledged; identical replica digests; one
//! agreed leader per partition that accepts writes.
//!
//! `TALLY_NEMESIS_SECS` (default 60) and `TALLY_NEMESIS_SEED` reproduce or
//! lengthen a run (`scripts/nemesis.sh`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster_tests::ingestor::RetryingIngestor;
use cluster_tests::model::{Model, Workload};
use cluster_tests::nemesis::{apply_links, percentile, time_to_first_write, Fault, NemesisConfig};
use cluster_tests::{ClusterOptions, TestCluster};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tally_proto::time::{align_range, DAY_MS};
use tally_proto::v1::{AddNodeRequest, RemoveNodeRequest, StatsRequest};

#[derive(Default)]
struct History {
    attempted: Model,
    acknowledged: Model,
    batches_attempted: u64,
    batches_failed: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_event_lost_or_double_counted_under_faults() -> anyhow::Result<()> {
    let config = NemesisConfig::from_env(60);
    eprintln!("nemesis seed {} for {:?} (TALLY_NEMESIS_SEED reproduces it)", config.seed, config.duration);
    let mut cluster = TestCluster::start_proxied(ClusterOptions {
        nodes: 3,
        partitions: 16,
        args: vec!["--snapshot-logs".into(), "200".into()],
    })
    .await?;
    let end = tally_client::time_arg::now_ms();
    let history = Arc::new(Mutex::new(History::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let ingestor = RetryingIngestor::new(cluster.node_ids().into_iter().map(|id| (id, cluster.addr(id).unwrap_or_default())).collect());

    let mut workers = Vec::new();
    for w in 0..3u64 {
        let (history, stop, ingestor) = (history.clone(), stop.clone(), ingestor.clone());
        let mut workload = Workload::new(config.seed.wrapping_add(w * 7919), 200, end, 10 * DAY_MS);
        workers.push(tokio::spawn(async move {
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                let batch: Vec<_> = (0..200).map(|_| workload.event()).collect();
                {
                    let mut h = history.lock().unwrap_or_else(|p| p.into_inner());
                    h.batches_attempted += 1;
                    batch.iter().for_each(|e| h.attempted.record(e));
                }
                let result = ingestor.send(batch.clone(), i).await;
                let mut h = history.lock().unwrap_or_else(|p| p.into_inner());
                match result {
                    Ok(_) => batch.iter().for_each(|e| h.acknowledged.record(e)),
                    Err(e) => {
                        eprintln!("worker {w}: batch given up: {e}");
                        h.batches_failed += 1;
                    }
                }
                i += 1;
            }
        }));
    }

    let mut rng = StdRng::seed_from_u64(config.seed);
    let mut recoveries: Vec<Duration> = Vec::new();
    let mut applied: BTreeMap<String, u32> = BTreeMap::new();
    let started = Instant::now();
    for fault in config.schedule() {
        if started.elapsed() > config.duration && applied.len() >= 6 {
            break;
        }
        *applied.entry(format!("{fault:?}")).or_default() += 1;
        let victim = cluster.busiest_leader().await?;
        let status = cluster.status(victim).await?;
        let led: Vec<u32> = status.partitions.iter().filter(|p| p.leader_node_id == victim).map(|p| p.partition).collect();
        let via = cluster.node_ids().into_iter().find(|id| *id != victim).unwrap_or(1);
        match fault {
            Fault::KillRestart => {
                ingestor.mark_dead(victim);
                let killed_at = Instant::now();
                cluster.kill9(victim)?;
                eprintln!("nemesis: kill -9 node {victim} (led {} partitions)", led.len());
                for p in &led {
                    match time_to_first_write(&cluster, via, *p, killed_at, Duration::from_secs(30)).await {
                        Some(d) => recoveries.push(d),
                        None => anyhow::bail!("partition {p}: no write within 30s of killing node {victim}"),
                    }
                }
                tokio::time::sleep(config.hold).await;
                cluster.restart(victim).await?;
                ingestor.mark_live(victim);
            }
            Fault::Pause => {
                ingestor.mark_dead(victim);
                cluster.pause(victim)?;
                eprintln!("nemesis: SIGSTOP node {victim} for {:?}", config.hold);
                tokio::time::sleep(config.hold).await;
                cluster.resume(victim)?;
                ingestor.mark_live(victim);
            }
            links => {
                let what = apply_links(&cluster, links, victim, &mut rng);
                eprintln!("nemesis: {what}");
                tokio::time::sleep(config.hold).await;
                cluster.heal();
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    // Last, a membership change under load: a new node joins, then the
    // busiest leader's node is removed (its replicas move while writes go on).
    let joined = cluster.spawn_extra_node().await?;
    let leaving = cluster.busiest_leader().await?;
    let coordinator = cluster.live_node_ids().into_iter().find(|id| *id != leaving && *id != joined).unwrap_or(joined);
    let mut admin = cluster.cluster_client(coordinator).await?;
    let added = admin.add_node(AddNodeRequest { addr: cluster.addr(joined)? }).await?.into_inner();
    eprintln!("nemesis: node {joined} joined under load ({} replicas moved)", added.replicas_moved);
    let removed = admin.remove_node(RemoveNodeRequest { node_id: leaving }).await?.into_inner();
    eprintln!("nemesis: node {leaving} removed under load ({} replicas moved)", removed.replicas_moved);
    *applied.entry("MembershipChange".into()).or_default() += 1;
    ingestor.mark_dead(leaving);
    cluster.stop(leaving)?;

    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await?;
    }
    cluster.heal();
    cluster.wait_ready(Duration::from_secs(60)).await?;

    // Checker.
    // The workers are done: take the history out of its lock.
    let h = std::mem::take(&mut *history.lock().unwrap_or_else(|p| p.into_inner()));
    let mut violations = Vec::new();
    let probe_via = cluster.live_node_ids()[0];
    let mut query = cluster.query_client(probe_via).await?;
    let (from, to) = align_range(end - 11 * DAY_MS, end + 60_000);
    let exact = h.batches_failed == 0;
    for (entity, event_type) in h.attempted.keys() {
        let s = query
            .stats(StatsRequest { entity_id: entity.clone(), event_type: event_type.clone(), from_ms: from, to_ms: to, consistency: 0 })
            .await?
            .into_inner();
        let acked = h.acknowledged.stats(entity, event_type, from, to).0;
        let attempted = h.attempted.stats(entity, event_type, from, to).0;
        let ok = if exact { s.count == acked } else { acked <= s.count && s.count <= attempted };
        if !ok {
            let partition = tally_proto::partition::partition_of(entity, cluster.partitions);
            violations.push(format!(
                "{}/{event_type} (partition {partition}): count {} but acknowledged {acked}, attempted {attempted}",
                String::from_utf8_lossy(entity),
                s.count
            ));
        }
    }
    if let Err(e) = cluster.assert_replicas_identical(Duration::from_secs(60)).await {
        violations.push(format!("{e}"));
    }
    // One agreed leader per partition among its replicas, and it accepts a write.
    let mut leaders: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for id in cluster.live_node_ids() {
        for p in cluster.status(id).await?.partitions {
            if p.replicas.contains(&id) {
                leaders.entry(p.partition).or_default().push(p.leader_node_id);
            }
        }
    }
    for (p, ls) in &leaders {
        if ls.iter().any(|l| *l == 0 || *l != ls[0]) {
            violations.push(format!("partition {p}: nodes disagree on its leader: {ls:?}"));
        }
        if time_to_first_write(&cluster, probe_via, *p, Instant::now(), Duration::from_secs(10)).await.is_none() {
            violations.push(format!("partition {p}: accepts no write after healing"));
        }
    }

    recoveries.sort();
    eprintln!("--- nemesis report (seed {}) ---", config.seed);
    eprintln!("faults applied: {applied:?}");
    eprintln!(
        "events attempted {}, acknowledged {}; batches attempted {}, given up {}",
        h.attempted.distinct_events(),
        h.acknowledged.distinct_events(),
        h.batches_attempted,
        h.batches_failed
    );
    eprintln!(
        "kill -9 → first write on the victim's partitions: p50 {:?}, p99 {:?} over {} partitions",
        percentile(&recoveries, 50.0),
        percentile(&recoveries, 99.0),
        recoveries.len()
    );
    eprintln!("violations: {}", violations.len());
    for v in violations.iter().take(20) {
        eprintln!("  {v}");
    }
    assert!(violations.is_empty(), "{} violations (see above)", violations.len());
    assert!(h.acknowledged.distinct_events() > 0, "the workload made progress");
    cluster.heal();
    Ok(())
}
