//! A node's circuit breaker opens when the node dies, requests keep
//! succeeding through the other nodes meanwhile, and the breaker closes
//! again through a half-open probe once the node is back.

use std::time::{Duration, Instant};

use cluster_tests::{ClusterOptions, TestCluster};
use tally_client::{BreakerState, ClientConfig, Consistency, Event, TallyClient};

fn state_of(client: &TallyClient, addr: &str) -> Option<BreakerState> {
    client.breaker_states().into_iter().find(|(a, _)| a == addr).map(|(_, s)| s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_on_a_dead_node_and_recovers() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::shared().await;
    let mut cluster = TestCluster::start(ClusterOptions { nodes: 3, partitions: 8, args: vec![] }).await?;
    let seeds: Vec<String> = cluster.nodes.iter().map(|n| n.addr.clone()).collect();
    let mut config = ClientConfig::new(seeds);
    config.breaker.min_requests = 2;
    config.breaker.failure_rate = 0.5;
    config.breaker.open_for = Duration::from_millis(800);
    config.retry.max_attempts = 40;
    config.retry.deadline = Duration::from_secs(30);
    let client = TallyClient::with_config(config).await?;

    let victim = cluster.busiest_leader().await?;
    let victim_addr = cluster.addr(victim)?;
    assert_eq!(state_of(&client, &victim_addr), Some(BreakerState::Closed));
    cluster.kill9(victim)?;

    // Ingest for entities all over the partitions: the client still routes
    // some to the dead leader until it learns better, and those fail.
    let now = tally_client::time_arg::now_ms();
    let events: Vec<Event> = (0..400)
        .map(|i| Event { event_time_ms: now, ..tally_client::event(format!("breaker-{}", i % 40), "view") })
        .collect();
    let outcomes = client.ingest(events).await?;
    assert!(outcomes.iter().all(|o| o.is_stored()), "{:?}", outcomes.iter().find(|o| !o.is_stored()));
    // Probe the dead node directly until its breaker opens (a couple of
    // connection refusals are enough with these settings).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while !seen.contains(&Some(BreakerState::Open)) {
        assert!(Instant::now() < deadline, "breaker of the dead node never opened: {seen:?}");
        let _ = client.node_status().await;
        seen.push(state_of(&client, &victim_addr));
    }
    eprintln!("breakers after node {victim} died: {:?}", client.breaker_states());

    // While it is open, every request still succeeds elsewhere.
    for i in 0..20 {
        client.node_status().await?;
        client.stats(format!("breaker-{i}"), "view", now - 60_000..now + 60_000, Consistency::Linearizable).await?;
    }

    // Back up: a half-open probe gets through and closes the breaker.
    cluster.restart(victim).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while state_of(&client, &victim_addr) != Some(BreakerState::Closed) {
        assert!(Instant::now() < deadline, "breaker never closed: {:?}", client.breaker_states());
        let _ = client.node_status().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Nothing was lost or counted twice along the way.
    let mut total = 0;
    for e in 0..40 {
        total += client
            .stats(format!("breaker-{e}"), "view", now - 60_000..now + 60_000, Consistency::Linearizable)
            .await?
            .count;
    }
    assert_eq!(total, 400);
    Ok(())
}
