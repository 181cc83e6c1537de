//! The Rust client against a real cluster: it learns the leaders, keeps
//! ingesting while the busiest leader is killed with SIGKILL, and its
//! retries never count an event twice — every acknowledged event is counted
//! exactly once, and re-sending all of them changes nothing.

use std::time::Duration;

use futures::future::BoxFuture;

use cluster_tests::model::{Model, Workload};
use cluster_tests::{ClusterOptions, TestCluster};
use tally_client::{ClientConfig, Consistency, Event, Outcome, TallyClient};
use tally_proto::time::{align_range, DAY_MS};

async fn check_counts(client: &TallyClient, model: &Model, end: i64) -> anyhow::Result<()> {
    let (from, to) = align_range(end - 2 * DAY_MS, end + 60_000);
    let mut total = 0;
    for (entity, event_type) in model.keys() {
        let s = client.stats(entity, event_type, from..to, Consistency::Linearizable).await?;
        assert_eq!(
            (s.count, s.sum),
            model.stats(entity, event_type, from, to),
            "{}/{event_type}",
            String::from_utf8_lossy(entity)
        );
        total += s.count;
    }
    assert_eq!(total as usize, model.distinct_events());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_survives_a_leader_kill_and_retries_never_double_count() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::shared().await;
    let mut cluster = TestCluster::start(ClusterOptions { nodes: 3, partitions: 8, args: vec![] }).await?;
    let seeds: Vec<String> = cluster.nodes.iter().map(|n| n.addr.clone()).collect();
    let mut config = ClientConfig::new(seeds);
    config.retry.max_attempts = 60;
    config.retry.deadline = Duration::from_secs(45);
    config.request_timeout = Duration::from_secs(5);
    let client = TallyClient::with_config(config).await?;

    // The client learnt every leader, and the same ones the cluster reports.
    let map = client.partition_map();
    assert_eq!(map.partition_count(), 8);
    assert_eq!(map.leaderless(), 0);
    let status = cluster.status(1).await?;
    for p in &status.partitions {
        assert_eq!(map.leader(p.partition).map(|(id, _)| id), Some(p.leader_node_id), "partition {}", p.partition);
    }
    // ... and places entities exactly as the server does.
    assert_eq!(map.partition_of(b"video-1"), tally_proto::partition::partition_of(b"video-1", 8));

    let end = tally_client::time_arg::now_ms();
    let mut workload = Workload::new(21, 200, end, DAY_MS);
    let mut model = Model::default();
    let events: Vec<Event> = (0..12_000)
        .map(|_| {
            let e = workload.event();
            model.record(&e);
            e
        })
        .collect();

    let victim = cluster.busiest_leader().await?;
    let sender = tokio::spawn({
        let client = client.clone();
        let events = events.clone();
        async move {
            // Chunks alternate between `send` (a ticket per event) and
            // `send_batch` (one ticket per chunk): both paths go through
            // the kill.
            let mut pending: Vec<BoxFuture<'static, Vec<Outcome>>> = Vec::new();
            for (i, chunk) in events.chunks(400).enumerate() {
                if i % 2 == 0 {
                    pending.push(Box::pin(client.send_batch(chunk.to_vec()).await?));
                } else {
                    for e in chunk {
                        let ticket = client.send(e.clone()).await?;
                        pending.push(Box::pin(async move { vec![ticket.await] }));
                    }
                }
                // Spread the sends over a few seconds so the kill lands
                // in the middle.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            client.flush().await?;
            anyhow::Ok(futures::future::join_all(pending).await.into_iter().flatten().collect::<Vec<_>>())
        }
    });
    tokio::time::sleep(Duration::from_millis(1200)).await;
    cluster.kill9(victim)?;
    eprintln!("killed node {victim}");
    let outcomes = sender.await??;
    let not_stored: Vec<&Outcome> = outcomes.iter().filter(|o| !o.is_stored()).collect();
    assert!(not_stored.is_empty(), "{} events not stored, e.g. {:?}", not_stored.len(), not_stored.first());
    eprintln!("server totals: {} accepted, {} duplicates", client.totals().accepted(), client.totals().duplicates());
    // Accepted can only be fewer than sent if a retry found its first
    // attempt already committed (then it is a duplicate); never more.
    assert!(client.totals().accepted() <= events.len() as u64);
    assert_eq!(client.totals().accepted() + client.totals().duplicates(), events.len() as u64);
    // Per event, accepted versus duplicate is exact: the outcomes add up to
    // the servers' totals (a retry whose first attempt was stored says
    // Duplicate).
    let accepted = outcomes.iter().filter(|o| **o == Outcome::Accepted).count() as u64;
    let duplicates = outcomes.iter().filter(|o| **o == Outcome::Duplicate).count() as u64;
    assert_eq!((accepted, duplicates), (client.totals().accepted(), client.totals().duplicates()));

    // Exactly once, read through leaders the client re-learnt.
    check_counts(&client, &model, end).await?;
    client.refresh().await?;
    let map = client.partition_map();
    for p in 0..8 {
        let leader = map.leader(p).map(|(id, _)| id);
        assert!(leader.is_some_and(|id| id != victim), "partition {p}: leader {leader:?} after killing {victim}");
    }

    // Re-sending everything with the same ids: every event reports
    // Duplicate, counts unchanged.
    let again = client.ingest(events.clone()).await?;
    let duplicates = again.iter().filter(|o| **o == Outcome::Duplicate).count();
    assert_eq!(duplicates, events.len(), "{:?}", again.iter().find(|o| **o != Outcome::Duplicate));
    check_counts(&client, &model, end).await?;

    // One batch of a new event, an invalid one and a stored one: each gets
    // its own outcome, in order, and the invalid one costs the others
    // nothing.
    let fresh = Event { event_id: b"batch-fresh".to_vec(), ..tally_client::event("batch-check", "view") };
    let invalid = Event { event_type: String::new(), ..tally_client::event("batch-check", "view") };
    let outcomes = client.ingest(vec![fresh, invalid, events[0].clone()]).await?;
    assert_eq!(outcomes[0], Outcome::Accepted);
    assert!(matches!(&outcomes[1], Outcome::Rejected { field, .. } if field == "event_type"), "{:?}", outcomes[1]);
    assert_eq!(outcomes[2], Outcome::Duplicate);
    Ok(())
}
