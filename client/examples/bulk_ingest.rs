//! Stream many events through the client and account for every one.
//!
//! `send` waits when the client's bounded buffer is full, so this loop runs
//! only as fast as the cluster acknowledges — memory stays flat however
//! many events are sent. Outcomes are collected concurrently.
//!
//! ```sh
//! cargo run -p tally-client --example bulk_ingest -- 200000
//! ```

use std::time::Instant;

use futures::stream::{FuturesUnordered, StreamExt};
use tally_client::{ClientConfig, Event, IngestSummary, TallyClient};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(50_000);
    let seeds = std::env::var("TALLY_ADDR").unwrap_or_else(|_| "127.0.0.1:7001".into());
    let mut config = ClientConfig::new(seeds.split(','));
    config.batch.buffer_events = 20_000; // at most this many events held in memory
    config.batch.max_events = 2_000;
    let client = TallyClient::with_config(config).await?;

    let started = Instant::now();
    let mut summary = IngestSummary::default();
    let mut pending = FuturesUnordered::new();
    for i in 0..n {
        let event =
            Event { value: Some((i % 10) as i64 + 1), ..tally_client::event(format!("bulk-{}", i % 1000), "view") };
        pending.push(client.send(event).await?);
        // Drain resolved outcomes as we go so the ticket list stays small.
        while pending.len() > 20_000 {
            if let Some(outcome) = pending.next().await {
                summary.add(&outcome);
            }
        }
    }
    client.flush().await?;
    while let Some(outcome) = pending.next().await {
        summary.add(&outcome);
    }
    let elapsed = started.elapsed();
    println!("{n} events in {elapsed:.2?} ({:.0}/s)", n as f64 / elapsed.as_secs_f64());
    println!("per event: {summary:?}");
    println!("server totals: accepted {}, duplicates {}", client.totals().accepted(), client.totals().duplicates());
    Ok(())
}
