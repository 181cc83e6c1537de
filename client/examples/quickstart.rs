//! Connect, count a few events, read the count back.
//!
//! ```sh
//! scripts/cluster.sh up            # a local 3-node cluster on 127.0.0.1:7001..7003
//! cargo run -p tally-client --example quickstart
//! ```
//! `TALLY_ADDR` (comma-separated host:port) points it elsewhere.

use tally_client::{Consistency, Event, Outcome, TallyClient};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let seeds = std::env::var("TALLY_ADDR").unwrap_or_else(|_| "127.0.0.1:7001".into());
    // One reachable seed is enough: the client learns every node and leader.
    let client = TallyClient::connect(seeds.split(',')).await?;

    // `send` returns as soon as the event is buffered; the ticket resolves
    // once the cluster has acknowledged (or rejected) it.
    let mut tickets = Vec::new();
    for _ in 0..3 {
        tickets.push(client.send(tally_client::event("video-42", "view")).await?);
    }
    // Events may carry a value (e.g. watch seconds) and their own id.
    let watched =
        Event { value: Some(95), event_id: b"session-7".to_vec(), ..tally_client::event("video-42", "watch") };
    tickets.push(client.send(watched.clone()).await?);
    // An invalid event is reported, not sent.
    tickets.push(client.send(tally_client::event("video-42", "Bad Type")).await?);

    client.flush().await?;
    for ticket in tickets {
        match ticket.await {
            Outcome::Rejected { field, reason } => println!("rejected: {field}: {reason}"),
            other => println!("{other:?}"),
        }
    }

    // Sending the same id again is recognised as a duplicate.
    let again = client.ingest([watched]).await?;
    println!("watch event sent again: {:?}", again[0]);

    let now = tally_client::time_arg::now_ms();
    let stats = client.stats("video-42", "view", now - 3_600_000..now + 60_000, Consistency::Linearizable).await?;
    println!("video-42 views in the last hour: {} (served by node {})", stats.count, stats.served_by_node_id);
    Ok(())
}
