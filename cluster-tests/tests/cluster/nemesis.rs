//! Jepsen-style run: concurrent clients ingest unique events and retry until
//! acknowledged while a seeded nemesis kills (and restarts at once), pauses,
//! partitions (both ways and one way), skews clocks, transfers leadership
//! to dead nodes and shortens the retention (then kills a leader while
//! partitions expire buckets). The cold archive is on throughout: events
//! older than its seal, sent first, are sealed and archived by every
//! partition, then dropped from the nodes by the shortened retentions, and
//! the checker reads them back from the archive. One writer sends values at
//! the i64 limits; another writes hot entities as time passes, which the
//! nemesis spreads over more partitions (killing the home partition's
//! leader while it does), and splits partitions (killing the partition's
//! leader while it does). The balancer moves leaderships throughout, and is
//! paused once while a leader is killed. At the end a node joins, one
//! replica moves to it (the balancer's replica move, asked by hand) and
//! another node leaves, all under load. After healing,
//! the checker (`cluster_tests::checker`) holds every acknowledged event —
//! tracked per event, even when the rest of its batch was given up — to
//! exactly once in counts and exact sums, requires identical replica
//! digests, the state machines' dedup tripwire at 0 on every node, and one
//! agreed leader per partition that accepts writes.
//!
//! `TALLY_NEMESIS_SECS` (default 60) and `TALLY_NEMESIS_SEED` reproduce or
//! lengthen a run (`scripts/nemesis.sh`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cluster_tests::checker::{self, Writers};
use cluster_tests::ingestor::RetryingIngestor;
use cluster_tests::model::Workload;
use cluster_tests::nemesis::{apply_links, time_to_first_write, Fault, NemesisConfig, RETENTION_STEPS};
use cluster_tests::{ClusterOptions, TestCluster, TEST_RETENTION};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tally_bench::measure::percentile;
use tally_proto::time::{align_range, bucket_start, Granularity, DAY_MS, HOUR_MS};
use tally_proto::v1::{
    AddNodeRequest, Event, MoveReplicaRequest, RebalanceRequest, RemoveNodeRequest, RetentionPolicy,
    SetBalancerRequest, SetRetentionRequest, SplitRequest, SpreadRequest, TransferLeaderRequest,
};

const SKEW_MS: i64 = 11 * 60_000;
/// The workload spans 10 days: sealing 11 days back refuses none of it.
const ARCHIVE_AFTER_MS: u64 = 11 * DAY_MS as u64;
/// Entities of the live writer (`live-0` …), the ones the run spreads.
const LIVE_ENTITIES: u32 = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_event_lost_or_double_counted_under_faults() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::exclusive().await;
    let config = NemesisConfig::from_env(60);
    eprintln!("nemesis seed {} for {:?} (TALLY_NEMESIS_SEED reproduces it)", config.seed, config.duration);
    let archive = tempfile::tempdir()?;
    let mut cluster = TestCluster::start_proxied(ClusterOptions {
        nodes: 3,
        partitions: 16,
        // Frequent snapshots and checkpoints: faults land during both.
        args: vec![
            // The balancer moves leaderships under the faults too.
            "--balancer-interval-ms".into(),
            "2000".into(),
            "--snapshot-logs".into(),
            "200".into(),
            "--checkpoint-interval-ms".into(),
            "200".into(),
            "--retention-check-ms".into(),
            "500".into(),
            "--archive-check-ms".into(),
            "500".into(),
            "--archive-url".into(),
            archive.path().to_string_lossy().to_string(),
        ],
    })
    .await?;
    // The raw-event log on: every fault also carries it through crashes and
    // snapshots, and the checker audits entities against it.
    let policy = tally_proto::v1::IngestPolicy {
        raw_log_max_events: Some(10_000_000),
        raw_log_keep_ms: Some(0),
        ..cluster_tests::TEST_INGEST_POLICY
    };
    cluster
        .cluster_client(1)
        .await?
        .set_ingest_policy(tally_proto::v1::SetIngestPolicyRequest { policy: Some(policy) })
        .await?;
    let end = tally_client::time_arg::now_ms();
    let ingestor = RetryingIngestor::new(
        cluster.node_ids().into_iter().map(|id| (id, cluster.addr(id).unwrap_or_default())).collect(),
    );
    // Older than any seal of the run: archived, then dropped from the nodes.
    let oldest_seal = bucket_start(Granularity::Day, end - ARCHIVE_AFTER_MS as i64);
    let mut archived = Workload::new(config.seed.wrapping_add(5), 40, oldest_seal, 12 * HOUR_MS);
    let preload: Vec<Event> = (0..2_000).map(|_| archived.event()).collect();
    ingestor.send_all(preload.chunks(100).map(<[Event]>::to_vec).collect(), 4).await?;
    let archiving = RetentionPolicy { archive_after_ms: ARCHIVE_AFTER_MS, ..TEST_RETENTION };
    cluster.cluster_client(1).await?.set_retention(SetRetentionRequest { policy: Some(archiving) }).await?;
    let mut workloads: Vec<Workload> =
        (0..3u64).map(|w| Workload::new(config.seed.wrapping_add(w * 7919), 200, end, 10 * DAY_MS)).collect();
    workloads.push(Workload::new(config.seed.wrapping_add(4), 20, end, 10 * DAY_MS).with_extreme_values());
    // Hot entities written as time passes, for the spreads to move.
    workloads.push(Workload::new(config.seed.wrapping_add(6), LIVE_ENTITIES, end, 2 * 60_000).live());
    let writers = Writers::spawn(&ingestor, workloads, 200, Duration::from_secs(120));
    {
        let mut history = writers.history.lock().unwrap_or_else(|p| p.into_inner());
        for e in &preload {
            history.attempted.record(e);
            history.acknowledged.record(e);
        }
    }

    let mut rng = StdRng::seed_from_u64(config.seed);
    let mut recoveries: Vec<Duration> = Vec::new();
    let mut retention_steps = RETENTION_STEPS.iter().cycle();
    let mut spread: Vec<Vec<u8>> = Vec::new();
    // Partitions split off by the Split fault (whose call may have failed).
    let mut splits_asked = 0u32;
    let mut applied: BTreeMap<String, u32> = BTreeMap::new();
    let started = Instant::now();
    for fault in config.schedule() {
        if started.elapsed() > config.duration && applied.len() >= nemesis_kinds() {
            break;
        }
        *applied.entry(format!("{fault:?}")).or_default() += 1;
        let victim = cluster.busiest_leader().await?;
        let status = cluster.status(victim).await?;
        let led: Vec<u32> =
            status.partitions.iter().filter(|p| p.leader_node_id == victim).map(|p| p.partition).collect();
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
                        None => {
                            eprintln!("{}", cluster.post_mortem(&[*p]).await);
                            anyhow::bail!("partition {p}: no write within 30s of killing node {victim}")
                        }
                    }
                }
                tokio::time::sleep(config.hold).await;
                cluster.restart(victim).await?;
                ingestor.mark_live(victim);
            }
            Fault::RestartAtOnce => {
                for _ in 0..3 {
                    let victim = cluster.busiest_leader().await?;
                    cluster.kill9(victim)?;
                    let after = rng.random_range(0..300);
                    tokio::time::sleep(Duration::from_millis(after)).await;
                    cluster.restart(victim).await?;
                    eprintln!("nemesis: kill -9 node {victim}, restarted {after} ms later");
                    tokio::time::sleep(Duration::from_millis(rng.random_range(1_000..2_000))).await;
                }
            }
            Fault::Pause => {
                ingestor.mark_dead(victim);
                cluster.pause(victim)?;
                eprintln!("nemesis: SIGSTOP node {victim} for {:?}", config.hold);
                tokio::time::sleep(config.hold).await;
                cluster.resume(victim)?;
                ingestor.mark_live(victim);
            }
            Fault::ClockSkew => {
                let offset = if rng.random_bool(0.5) { SKEW_MS } else { -SKEW_MS };
                ingestor.mark_dead(victim);
                cluster.kill9(victim)?;
                cluster.set_node_args(victim, vec!["--clock-offset-ms".into(), offset.to_string()])?;
                cluster.restart(victim).await?;
                ingestor.mark_live(victim);
                eprintln!("nemesis: node {victim} restarted with its clock {} ms off; it leads again", offset);
                tokio::time::sleep(Duration::from_secs(1)).await;
                for p in &led {
                    let _ = cluster
                        .cluster_client(victim)
                        .await?
                        .transfer_leader(TransferLeaderRequest { partition: *p, node_id: victim })
                        .await;
                }
                tokio::time::sleep(config.hold).await;
                cluster.kill9(victim)?;
                cluster.set_node_args(victim, Vec::new())?;
                cluster.restart(victim).await?;
            }
            Fault::TransferToDead => {
                let dead = cluster.node_ids().into_iter().find(|id| *id != victim).unwrap_or(1);
                ingestor.mark_dead(dead);
                cluster.kill9(dead)?;
                let mut admin = cluster.cluster_client(victim).await?;
                let mut refused = 0;
                for p in led.iter().take(4) {
                    let req = TransferLeaderRequest { partition: *p, node_id: dead };
                    if admin.transfer_leader(req).await.is_err() {
                        refused += 1;
                    }
                }
                let rebalance = admin.rebalance(RebalanceRequest {}).await.map(|r| r.into_inner());
                eprintln!("nemesis: node {dead} killed; transfers to it refused {refused}; rebalance {rebalance:?}");
                let asked_at = Instant::now();
                let partitions: Vec<u32> = (0..cluster.status(victim).await?.partition_count).collect();
                for p in partitions {
                    if time_to_first_write(&cluster, victim, p, asked_at, Duration::from_secs(30)).await.is_none() {
                        eprintln!("{}", cluster.post_mortem(&[p]).await);
                        anyhow::bail!("partition {p}: no write within 30s of transfers toward dead node {dead}");
                    }
                }
                tokio::time::sleep(config.hold).await;
                cluster.restart(dead).await?;
                ingestor.mark_live(dead);
            }
            Fault::ShortenRetention => {
                let (minutes_h, hours_h) = retention_steps.next().copied().unwrap_or((1, 72));
                let policy = RetentionPolicy {
                    minute_ms: minutes_h * HOUR_MS as u64,
                    hour_ms: hours_h * HOUR_MS as u64,
                    archive_after_ms: ARCHIVE_AFTER_MS,
                    ..TEST_RETENTION
                };
                let mut admin = cluster.cluster_client(via).await?;
                let set =
                    admin.set_retention(SetRetentionRequest { policy: Some(policy) }).await.map(|r| r.into_inner());
                let after = rng.random_range(0..500);
                tokio::time::sleep(Duration::from_millis(after)).await;
                ingestor.mark_dead(victim);
                cluster.kill9(victim)?;
                eprintln!("nemesis: retention minutes {minutes_h} h, hours {hours_h} h ({:?}); kill -9 node {victim} {after} ms later", set.map(|_| "set"));
                tokio::time::sleep(config.hold).await;
                cluster.restart(victim).await?;
                ingestor.mark_live(victim);
            }
            Fault::Spread => {
                // The hottest live entity not spread yet (the workload
                // favours low numbers), or the last one again.
                let n = (spread.len() as u32).min(LIVE_ENTITIES - 1);
                let entity = format!("live-{n}").into_bytes();
                let home = tally_proto::routing::Routing::of_status(&cluster.status(via).await?).home_of(&entity);
                let home_leader = cluster
                    .status(via)
                    .await?
                    .partitions
                    .iter()
                    .find(|p| p.partition == home)
                    .map(|p| p.leader_node_id)
                    .filter(|l| *l != 0)
                    .unwrap_or(victim);
                let coordinator = cluster.node_ids().into_iter().find(|id| *id != home_leader).unwrap_or(via);
                let mut admin = cluster.cluster_client(coordinator).await?;
                let request = SpreadRequest { entity_id: entity.clone(), ways: 3 };
                let asked = tokio::spawn(async move { admin.spread(request).await.map(|r| r.into_inner()) });
                let after = rng.random_range(0..500);
                tokio::time::sleep(Duration::from_millis(after)).await;
                ingestor.mark_dead(home_leader);
                cluster.kill9(home_leader)?;
                let answer = asked.await?;
                eprintln!(
                    "nemesis: spread {} (home {home}) over 3 more partitions; kill -9 its leader, node {home_leader}, {after} ms later: {:?}",
                    String::from_utf8_lossy(&entity),
                    answer.as_ref().map(|a| a.spread.as_ref().map(|s| s.from_ms)).map_err(|e| e.message().to_string())
                );
                tokio::time::sleep(config.hold).await;
                cluster.restart(home_leader).await?;
                ingestor.mark_live(home_leader);
                // A call that failed (its coordinator forwarded to a killed
                // metadata leader) may have planned nothing: then the next
                // spread fault asks for the same entity again. A planned
                // spread must become active, answered or not.
                let mut planned =
                    answer.is_ok() || cluster.status(via).await?.spreads.iter().any(|s| s.entity_id == entity);
                // Nothing planned: asked again, without a kill, so that every
                // run spreads (under the other faults still running).
                let deadline = Instant::now() + Duration::from_secs(30);
                while !planned && Instant::now() < deadline {
                    let mut admin = cluster.cluster_client(via).await?;
                    let again = admin.spread(SpreadRequest { entity_id: entity.clone(), ways: 3 }).await;
                    eprintln!(
                        "nemesis: spread asked again: {:?}",
                        again.as_ref().map(|_| "active").map_err(|e| e.message().to_string())
                    );
                    planned = again.is_ok();
                }
                if planned && !spread.contains(&entity) {
                    spread.push(entity);
                }
            }
            Fault::PauseBalancer => {
                // Paused while the busiest leader is killed and restarted
                // (its leaderships pile up on the others), resumed after.
                let mut admin = cluster.cluster_client(via).await?;
                let paused =
                    admin.set_balancer(SetBalancerRequest { paused: true }).await.map(|r| r.into_inner().paused);
                ingestor.mark_dead(victim);
                cluster.kill9(victim)?;
                tokio::time::sleep(config.hold).await;
                cluster.restart(victim).await?;
                ingestor.mark_live(victim);
                let resumed =
                    admin.set_balancer(SetBalancerRequest { paused: false }).await.map(|r| r.into_inner().paused);
                eprintln!(
                    "nemesis: balancer paused ({:?}), kill -9 node {victim}, restarted, balancer resumed ({:?})",
                    paused.map_err(|e| e.message().to_string()),
                    resumed.map_err(|e| e.message().to_string())
                );
            }
            Fault::Split => {
                // A partition the workloads write to; its leader is killed
                // 0-500 ms after the split is asked for, through another node.
                let status = cluster.status(via).await?;
                let parent = rng.random_range(0..status.partition_count);
                let leader = status
                    .partitions
                    .iter()
                    .find(|p| p.partition == parent)
                    .map(|p| p.leader_node_id)
                    .filter(|l| *l != 0)
                    .unwrap_or(victim);
                let coordinator = cluster.node_ids().into_iter().find(|id| *id != leader).unwrap_or(via);
                let mut admin = cluster.cluster_client(coordinator).await?;
                let request = SplitRequest { partition: parent };
                let asked = tokio::spawn(async move { admin.split(request).await.map(|r| r.into_inner()) });
                let after = rng.random_range(0..500);
                tokio::time::sleep(Duration::from_millis(after)).await;
                ingestor.mark_dead(leader);
                cluster.kill9(leader)?;
                let answer = asked.await?;
                eprintln!(
                    "nemesis: split partition {parent}; kill -9 its leader, node {leader}, {after} ms later: {:?}",
                    answer.as_ref().map(|a| a.split.as_ref().map(|s| s.partition)).map_err(|e| e.message().to_string())
                );
                tokio::time::sleep(config.hold).await;
                cluster.restart(leader).await?;
                ingestor.mark_live(leader);
                splits_asked += 1;
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
    let added = admin.add_node(AddNodeRequest { addr: cluster.addr(joined)? }).await;
    let added = settled_anyway(&cluster, added).await?;
    eprintln!("nemesis: node {joined} joined under load ({:?} replicas moved)", added.map(|a| a.replicas_moved));
    // The balancer's replica move (a map change the reconciler carries
    // out), asked by hand under load: a follower replica of a partition
    // the new node does not hold moves to it.
    let status = cluster.status(coordinator).await?;
    let candidate = status.partitions.iter().find_map(|p| {
        let from = p.replicas.iter().copied().find(|r| *r != p.leader_node_id && *r != joined)?;
        (!p.replicas.contains(&joined)).then_some((p.partition, from))
    });
    if let Some((partition, from)) = candidate {
        let request = MoveReplicaRequest { partition, from_node_id: from, to_node_id: joined };
        let moved = admin.move_replica(request).await.map(|r| r.into_inner().replicas);
        eprintln!(
            "nemesis: partition {partition}'s replica moved from node {from} to node {joined} under load: {moved:?}"
        );
        let started = Instant::now();
        while !cluster.membership_settled().await {
            anyhow::ensure!(started.elapsed() < Duration::from_secs(120), "the replica move never completed");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        *applied.entry("MoveReplica".into()).or_default() += 1;
    }
    let removed = admin.remove_node(RemoveNodeRequest { node_id: leaving }).await;
    let removed = settled_anyway(&cluster, removed).await?;
    eprintln!("nemesis: node {leaving} removed under load ({:?} replicas moved)", removed.map(|r| r.replicas_moved));
    *applied.entry("MembershipChange".into()).or_default() += 1;
    ingestor.mark_dead(leaving);
    cluster.stop(leaving)?;

    let history = writers.finish().await;
    cluster.heal();
    cluster.wait_ready(Duration::from_secs(60)).await?;
    // The checker reads a quiet cluster: the balancer, on for the whole
    // run, would otherwise move leaderships under the checks of who leads.
    let paused = cluster
        .cluster_client(cluster.live_node_ids()[0])
        .await?
        .set_balancer(SetBalancerRequest { paused: true })
        .await
        .map(|r| r.into_inner().paused);
    eprintln!("nemesis: balancer paused for the checker: {paused:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Checker.
    let probe_via = cluster.live_node_ids()[0];
    // To a minute past now: the live writer's events reach the run's end.
    let (from, to) = align_range(oldest_seal - DAY_MS, tally_client::time_arg::now_ms() + 60_000);
    let mut violations = checker::violations(&cluster, &history, probe_via, from, to).await?;
    // Every spread asked for became active, whatever was killed meanwhile
    // (the metadata leader finishes what a coordinator left pending).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let spreads = cluster.status(probe_via).await?.spreads;
        let inactive: Vec<String> = spread
            .iter()
            .filter(|e| !spreads.iter().any(|s| &s.entity_id == *e && s.from_ms != 0))
            .map(|e| {
                let state = if spreads.iter().any(|s| &s.entity_id == e) { "pending" } else { "not in the map" };
                format!("{} ({state})", String::from_utf8_lossy(e))
            })
            .collect();
        if inactive.is_empty() {
            eprintln!("nemesis: {} spreads active", spread.len());
            break;
        }
        if Instant::now() > deadline {
            violations.push(format!("spreads never became active: {inactive:?}"));
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // A split planned is a split completed: none left pending, whatever was
    // killed meanwhile (the metadata leader finishes it).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let splits = cluster.status(probe_via).await?.splits;
        let pending: Vec<u32> = splits.iter().filter(|s| !s.active).map(|s| s.partition).collect();
        if pending.is_empty() {
            eprintln!("nemesis: {} of {splits_asked} splits asked for are active", splits.len());
            break;
        }
        if Instant::now() > deadline {
            violations.push(format!("splits never became active: partitions {pending:?}"));
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Every partition sealed and archived what is older than any seal.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let behind: Vec<u32> = cluster
            .status(probe_via)
            .await?
            .partitions
            .iter()
            .filter(|p| p.archived_upto_ms < oldest_seal)
            .map(|p| p.partition)
            .collect();
        if behind.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            violations.push(format!("partitions {behind:?} never archived up to {oldest_seal}"));
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
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
        "events attempted {}, acknowledged {}; batches attempted {}, partly given up {}",
        history.attempted.distinct_events(),
        history.acknowledged.distinct_events(),
        history.batches_attempted,
        history.batches_given_up
    );
    eprintln!(
        "events meant to be refused (IN_FUTURE) {}: refused {}, acknowledged {} (a leader not yet clock-checked)",
        history.doomed_attempted.distinct_events(),
        history.refused,
        history.doomed_acknowledged.distinct_events()
    );
    eprintln!(
        "kill -9 → first write on the victim's partitions: p50 {:?}, p99 {:?} over {} partitions",
        percentile(&recoveries, 0.5),
        percentile(&recoveries, 0.99),
        recoveries.len()
    );
    eprintln!("violations (counts, sums, digests, dedup conflicts, dead letters): {}", violations.len());
    for v in violations.iter().take(20) {
        eprintln!("  {v}");
    }
    assert!(violations.is_empty(), "{} violations (see above)", violations.len());
    assert!(history.acknowledged.distinct_events() > 0, "the workload made progress");
    assert!(history.refused > 0, "the cluster refused events (and kept them as dead letters)");
    cluster.heal();
    Ok(())
}

/// A membership change whose settling outlasted its RPC's deadline says it
/// "will complete on its own": hold it to that (the map is committed; every
/// partition must reach voters == replicas with a leader) instead of
/// failing on the deadline. `None` when it completed late.
async fn settled_anyway<T>(
    cluster: &TestCluster,
    reply: Result<tonic::Response<T>, tonic::Status>,
) -> anyhow::Result<Option<T>> {
    let status = match reply {
        Ok(r) => return Ok(Some(r.into_inner())),
        Err(s) if s.code() == tonic::Code::DeadlineExceeded => s,
        Err(s) => return Err(s.into()),
    };
    eprintln!("nemesis: {}; waiting for it\n{}", status.message(), cluster.post_mortem(&[]).await);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(120) {
        if cluster.membership_settled().await {
            eprintln!("nemesis: the membership change completed {:?} after its deadline", started.elapsed());
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("{}", cluster.post_mortem(&[]).await);
    anyhow::bail!("the membership change never completed: {}", status.message())
}

/// Every fault kind at least once before the run may end.
fn nemesis_kinds() -> usize {
    cluster_tests::nemesis::ALL_FAULTS.len()
}
