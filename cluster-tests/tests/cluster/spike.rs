//! A load spike at ten times what the cluster can take, on real nodes:
//!
//! 1. Capacity: 32 closed-loop senders of new events for 3 s measure the
//!    events per second the cluster accepts (this test's build, this
//!    machine, the test itself included).
//! 2. Spike: for 20 s, batches are sent open-loop at ten times that rate,
//!    whatever the answers (a fixed schedule, as a flash crowd does not slow
//!    down when the service does). Batches come from a fixed pool of
//!    distinct events encoded once, so sending costs the test next to
//!    nothing and re-sends are duplicates, as retries would be.
//! 3. Every node stays up with its peak RSS under [`RSS_LIMIT_MIB`]; load
//!    is shed early (RESOURCE_EXHAUSTED with a `retry-after-ms` hint); the
//!    nodes' `/metrics` show the shed requests.
//! 4. Afterwards every batch of the pool is re-sent until acknowledged, and
//!    the counts equal the capacity events plus the pool exactly: nothing
//!    acknowledged during the spike was lost or counted twice, replicas
//!    identical.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cluster_tests::{ClusterOptions, TestCluster};
use tally_client::TokenChannel;
use tally_proto::v1::ingest_client::IngestClient;
use tally_proto::v1::{Event, IngestRequest};
use tonic::transport::Channel;
use tonic::Code;

const BATCH: u32 = 500;
const POOL_BATCHES: u32 = 200;
const ENTITIES: u32 = 50;
const SPIKE: Duration = Duration::from_secs(20);
const FACTOR: f64 = 10.0;
/// Peak resident memory allowed per node through the spike. The nodes'
/// bounds (256 ingest slots × 4 MiB bodies at most, bounded processor
/// queues and h2 windows) keep it far below; measured ~150-250 MiB here.
const RSS_LIMIT_MIB: u64 = 1024;

fn batch(now: i64, tag: &str) -> IngestRequest {
    IngestRequest {
        events: (0..BATCH)
            .map(|i| Event {
                actor_id: Vec::new(),
                entity_id: format!("video-spike-{}", i % ENTITIES).into_bytes(),
                event_type: "view".into(),
                event_time_ms: now,
                event_id: format!("{tag}-{i}").into_bytes(),
                value: None,
            })
            .collect(),
    }
}

/// Sum of `tally_requests_shed_total` over every node.
async fn shed_total(cluster: &TestCluster) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for id in cluster.node_ids() {
        let (status, body) = cluster.http_get(id, "/metrics").await?;
        anyhow::ensure!(status == 200, "node {id} /metrics: {status}");
        total += body
            .lines()
            .filter(|l| l.starts_with("tally_requests_shed_total"))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum::<f64>();
    }
    Ok(total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spike_at_ten_times_capacity_is_shed_and_loses_nothing() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::exclusive().await;
    let cluster = TestCluster::start(ClusterOptions { nodes: 3, partitions: 16, args: Vec::new() }).await?;
    let now = tally_client::time_arg::now_ms();
    let pool: Arc<Vec<IngestRequest>> =
        Arc::new((0..POOL_BATCHES).map(|b| batch(now, &format!("spike-{b}"))).collect());
    let bodies: Arc<Vec<bytes::Bytes>> = Arc::new(pool.iter().map(cluster_tests::raw::encoded).collect());
    // Four connections per node, so the spike is not one h2 connection's
    // stream limit.
    let mut clients: Vec<IngestClient<TokenChannel>> = Vec::new();
    let mut channels: Vec<Channel> = Vec::new();
    for _ in 0..4 {
        for id in cluster.node_ids() {
            clients.push(cluster.ingest_client(id).await?);
            channels.push(tally_client::connect(&cluster.addr(id)?).await?);
        }
    }
    let clients = Arc::new(clients);

    // 1. Capacity: new events, closed loop, each batch retried until
    // acknowledged (they are counted at the end with the pool).
    let capacity_batches = Arc::new(Mutex::new(0u64));
    let accepted = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let measure = Duration::from_secs(3);
    let senders: Vec<_> = (0..32)
        .map(|w| {
            let (clients, done, accepted) = (clients.clone(), capacity_batches.clone(), accepted.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while started.elapsed() < measure {
                    let request = batch(now, &format!("cap-{w}-{n}"));
                    n += 1;
                    let mut client = clients[w % clients.len()].clone();
                    let deadline = Instant::now() + Duration::from_secs(60);
                    loop {
                        match client.ingest(request.clone()).await {
                            Ok(reply) if reply.get_ref().rejected.is_empty() => {
                                accepted.fetch_add(u64::from(reply.get_ref().accepted), Ordering::Relaxed);
                                break;
                            }
                            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
                            other => anyhow::bail!("capacity batch cap-{w}-{} never acknowledged: {other:?}", n - 1),
                        }
                    }
                    *done.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                }
                Ok(())
            })
        })
        .collect();
    for s in senders {
        s.await??;
    }
    let capacity = accepted.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    let capacity_events = *capacity_batches.lock().unwrap_or_else(|p| p.into_inner()) * u64::from(BATCH);
    anyhow::ensure!(capacity > 0.0, "nothing was accepted while measuring capacity");

    // 2. The spike, open loop: a batch every `gap`, whatever the answers.
    let shed_before = shed_total(&cluster).await?;
    let pids: Vec<u32> = cluster.node_ids().iter().map(|&id| cluster.pid(id)).collect::<anyhow::Result<_>>()?;
    let gap = Duration::from_secs_f64(f64::from(BATCH) / (FACTOR * capacity));
    let (ok, exhausted, hinted, other) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut sent = 0u64;
    let mut tasks = Vec::new();
    let spike_start = tokio::time::Instant::now();
    let mut ticks = tokio::time::interval(gap);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while spike_start.elapsed() < SPIKE {
        ticks.tick().await;
        let body = bodies[(sent % u64::from(POOL_BATCHES)) as usize].clone();
        let channel = channels[sent as usize % channels.len()].clone();
        let counters = (ok.clone(), exhausted.clone(), hinted.clone(), other.clone());
        sent += 1;
        tasks.push(tokio::spawn(async move {
            let body = tonic::body::Body::new(http_body_util::Full::new(body));
            let answer =
                tokio::time::timeout(Duration::from_secs(10), cluster_tests::raw::raw_ingest(channel, body)).await;
            let status = match answer {
                Ok(Ok(status)) => status,
                Ok(Err(e)) => tonic::Status::unknown(e.to_string()),
                Err(_) => tonic::Status::deadline_exceeded("no answer within 10 s"),
            };
            match status {
                s if s.code() == Code::Ok => counters.0.fetch_add(1, Ordering::Relaxed),
                s if s.code() == Code::ResourceExhausted => {
                    if s.metadata().get(tally_proto::RETRY_AFTER_MS).is_some() {
                        counters.2.fetch_add(1, Ordering::Relaxed);
                    }
                    counters.1.fetch_add(1, Ordering::Relaxed)
                }
                s => {
                    if counters.3.load(Ordering::Relaxed) % 2000 == 0 {
                        eprintln!("spike: other error {:?}: {}", s.code(), s.message());
                    }
                    counters.3.fetch_add(1, Ordering::Relaxed)
                }
            };
        }));
    }
    for t in tasks {
        t.await?;
    }
    let offered = sent as f64 * f64::from(BATCH) / SPIKE.as_secs_f64();

    // 3. Up, bounded, shedding.
    for (&id, &pid) in cluster.node_ids().iter().zip(&pids) {
        anyhow::ensure!(cluster.is_running(id), "node {id} died in the spike");
        let peak = cluster_tests::peak_rss_kib(pid)? / 1024;
        eprintln!("spike: node {id} peak RSS {peak} MiB");
        assert!(peak < RSS_LIMIT_MIB, "node {id} peak RSS {peak} MiB (limit {RSS_LIMIT_MIB})");
    }
    let (ok, exhausted, hinted, other) = (
        ok.load(Ordering::Relaxed),
        exhausted.load(Ordering::Relaxed),
        hinted.load(Ordering::Relaxed),
        other.load(Ordering::Relaxed),
    );
    let shed = shed_total(&cluster).await? - shed_before;
    eprintln!(
        "spike: capacity {capacity:.0} events/s; offered {offered:.0} events/s ({:.1}×) for {SPIKE:?}: {sent} batches, \
         {ok} acknowledged, {exhausted} refused RESOURCE_EXHAUSTED ({hinted} with a retry hint), {other} other errors; \
         /metrics shed {shed} requests ({:.0}% of those sent)",
        offered / capacity,
        100.0 * shed / sent as f64
    );
    assert!(offered > 5.0 * capacity, "the spike did not reach 5× capacity: {offered:.0} vs {capacity:.0}");
    assert!(exhausted > 0, "nothing was shed at {:.1}× capacity", offered / capacity);
    assert_eq!(hinted, exhausted, "every refusal says when to retry");
    assert!(shed >= exhausted as f64 * 0.9, "/metrics shows the shed requests: {shed} vs {exhausted} refused");
    assert!(ok > 0, "the cluster kept acknowledging during the spike");

    // 4. Every batch until acknowledged; then the counts are the pool exactly.
    for (b, request) in pool.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut client = clients[b % clients.len()].clone();
            match client.ingest(request.clone()).await {
                Ok(reply) if reply.get_ref().rejected.is_empty() => break,
                _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
                other => anyhow::bail!("batch {b} never acknowledged after the spike: {other:?}"),
            }
        }
    }
    let entities = (0..ENTITIES).map(|e| format!("video-spike-{e}"));
    let total = cluster.total_count(1, entities, "view", 0, now + 120_000).await?;
    assert_eq!(total, capacity_events + u64::from(POOL_BATCHES * BATCH), "every event counted exactly once");
    assert_eq!(cluster.dedup_conflicts().await?, 0);
    cluster.assert_replicas_identical(Duration::from_secs(60)).await?;
    Ok(())
}
