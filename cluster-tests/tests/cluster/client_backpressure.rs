//! The client's buffer is bounded: with the cluster unable to commit (two
//! of three nodes down), `send` stops returning once the buffer is full
//! instead of growing memory, and everything buffered is delivered, once,
//! when the cluster recovers.

use std::time::Duration;

use cluster_tests::{ClusterOptions, TestCluster};
use tally_client::{ClientConfig, Consistency, Event, TallyClient};

const BUFFER: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_buffer_makes_send_wait_and_nothing_is_lost() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::shared().await;
    let mut cluster = TestCluster::start(ClusterOptions { nodes: 3, partitions: 4, args: vec![] }).await?;
    let seeds: Vec<String> = cluster.nodes.iter().map(|n| n.addr.clone()).collect();
    let mut config = ClientConfig::new(seeds);
    config.batch.buffer_events = BUFFER;
    config.batch.max_events = 50;
    config.retry.max_attempts = 1_000;
    config.retry.max_backoff = Duration::from_millis(500);
    config.retry.deadline = Duration::from_secs(50);
    config.request_timeout = Duration::from_secs(3);
    let client = TallyClient::with_config(config).await?;
    let now = tally_client::time_arg::now_ms();
    let event = |i: usize| Event { event_time_ms: now, ..tally_client::event(format!("bp-{}", i % 10), "view") };

    // While the cluster is healthy the buffer never exceeds its bound.
    let mut tickets = Vec::new();
    for i in 0..2_000 {
        tickets.push(client.send(event(i)).await?);
        assert!(client.pending() <= BUFFER, "{} pending", client.pending());
    }

    // flush returns only once everything sent before it is resolved.
    client.flush().await?;
    assert_eq!(client.pending(), 0);

    // Without a quorum nothing commits: the buffer fills and send waits.
    cluster.kill9(2)?;
    cluster.kill9(3)?;
    let mut sent = 2_000;
    let blocked = loop {
        match tokio::time::timeout(Duration::from_secs(2), client.send(event(sent))).await {
            Ok(ticket) => {
                tickets.push(ticket?);
                sent += 1;
                assert!(client.pending() <= BUFFER, "{} pending", client.pending());
                assert!(sent < 2_000 + 10 * BUFFER, "send never waited");
            }
            Err(_) => break sent,
        }
    };
    eprintln!("send waited after {} events beyond the healthy phase", blocked - 2_000);
    assert_eq!(client.pending(), BUFFER);

    // Quorum back: the waiting send goes through and everything is stored.
    cluster.restart(2).await?;
    cluster.restart(3).await?;
    let ticket = tokio::time::timeout(Duration::from_secs(40), client.send(event(sent))).await??;
    tickets.push(ticket);
    sent += 1;
    client.flush().await?;
    let outcomes = futures::future::join_all(tickets).await;
    assert_eq!(outcomes.len(), sent);
    assert!(outcomes.iter().all(|o| o.is_stored()), "{:?}", outcomes.iter().find(|o| !o.is_stored()));
    let mut total = 0;
    for e in 0..10 {
        total +=
            client.stats(format!("bp-{e}"), "view", now - 60_000..now + 60_000, Consistency::Linearizable).await?.count;
    }
    assert_eq!(total as usize, sent, "every event exactly once");
    Ok(())
}
