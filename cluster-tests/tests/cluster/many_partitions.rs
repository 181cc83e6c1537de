//! A thousand partitions come up on a busy machine.
//!
//! Three nodes, 1,000 partitions of three replicas each (3,003 Raft
//! replicas on a 2-core machine), while a busy loop holds one of the two
//! cores: every partition and the metadata group must have a leader within
//! 30 s of initialisation, and every partition must then accept a write.
//! Before Raft messages shared one conversation per peer, a slower machine
//! never got there: per-message streams timed out, their resets made h2 drop
//! the peer connection, and every group on it lost its heartbeats at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cluster_tests::{ClusterOptions, TestCluster};
use tally_proto::partition::partition_of;
use tally_proto::v1::{Event, IngestRequest, StatsRequest};

const PARTITIONS: u32 = 1_000;
const ELECTED_WITHIN: Duration = Duration::from_secs(30);

/// Spins on one core until dropped.
struct CpuHog {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl CpuHog {
    fn start() -> CpuHog {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut spins = 0u64;
            while !flag.load(Ordering::Relaxed) {
                spins = std::hint::black_box(spins.wrapping_add(1));
            }
            spins
        });
        CpuHog { stop, thread: Some(thread) }
    }
}

impl Drop for CpuHog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One entity of every partition.
fn entity_per_partition() -> Vec<String> {
    let mut found: Vec<Option<String>> = vec![None; PARTITIONS as usize];
    let mut missing = PARTITIONS;
    for i in 0u64.. {
        let entity = format!("video-{i}");
        let slot = &mut found[partition_of(entity.as_bytes(), PARTITIONS) as usize];
        if slot.is_none() {
            *slot = Some(entity);
            missing -= 1;
            if missing == 0 {
                break;
            }
        }
    }
    found.into_iter().flatten().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_partitions_elect_within_30s_with_a_core_taken() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::exclusive().await;
    let hog = CpuHog::start();
    let cluster = TestCluster::start(ClusterOptions { nodes: 3, partitions: PARTITIONS, args: Vec::new() }).await?;
    eprintln!("{PARTITIONS} partitions: every node knew every leader {:?} after initialisation", cluster.ready_after);
    anyhow::ensure!(
        cluster.ready_after <= ELECTED_WITHIN,
        "leaders of all {PARTITIONS} partitions took {:?} (limit {ELECTED_WITHIN:?})",
        cluster.ready_after
    );
    for id in cluster.node_ids() {
        let status = cluster.status(id).await?;
        anyhow::ensure!(status.metadata_leader_node_id != 0, "node {id} knows no metadata leader");
        let leaderless = status.partitions.iter().filter(|p| p.leader_node_id == 0).count();
        anyhow::ensure!(leaderless == 0, "node {id}: {leaderless} partitions without a leader");
    }

    // Every partition accepts a write, still with the core taken.
    let now = tally_client::time_arg::now_ms();
    let entities = entity_per_partition();
    let events: Vec<Event> = entities
        .iter()
        .map(|e| Event {
            actor_id: Vec::new(),
            entity_id: e.as_bytes().to_vec(),
            event_type: "view".into(),
            event_time_ms: now,
            event_id: format!("first-{e}").into_bytes(),
            value: None,
        })
        .collect();
    let mut accepted = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut pending = events;
    while !pending.is_empty() {
        let resp =
            cluster.ingest_client(1).await?.ingest(IngestRequest { events: pending.clone() }).await?.into_inner();
        accepted += resp.accepted + resp.duplicates;
        let rejected: std::collections::HashSet<u32> = resp.rejected.iter().map(|r| r.index).collect();
        pending =
            pending.into_iter().enumerate().filter(|(i, _)| rejected.contains(&(*i as u32))).map(|(_, e)| e).collect();
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{} partitions refused writes for 30 s: {:?}",
            pending.len(),
            resp.rejected.first()
        );
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert_eq!(accepted, PARTITIONS);
    drop(hog);
    for e in entities.iter().step_by(97) {
        let req = StatsRequest {
            share_partition_plus_one: 0,
            entity_id: e.clone().into_bytes(),
            event_type: "view".into(),
            from_ms: now - 60_000,
            to_ms: now + 60_000,
            consistency: 0,
        };
        assert_eq!(cluster.query_client(2).await?.stats(req).await?.into_inner().count, 1, "{e}");
    }
    Ok(())
}
