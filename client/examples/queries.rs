//! Typed queries: stats, series and cluster status, with both consistency
//! levels.
//!
//! ```sh
//! cargo run -p tally-client --example quickstart   # puts some data in
//! cargo run -p tally-client --example queries
//! ```

use tally_client::time_arg::{format_ms, now_ms};
use tally_client::{Consistency, Granularity, TallyClient};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let seeds = std::env::var("TALLY_ADDR").unwrap_or_else(|_| "127.0.0.1:7001".into());
    let client = TallyClient::connect(seeds.split(',')).await?;
    let now = now_ms();
    let last_day = now - 86_400_000..now + 60_000;

    // Linearizable (default): sees every event acknowledged before the call.
    let exact = client.stats("video-42", "view", last_day.clone(), Consistency::Linearizable).await?;
    // Stale: any replica answers, without a quorum round; may lag slightly.
    let cheap = client.stats("video-42", "view", last_day.clone(), Consistency::Stale).await?;
    println!("views today: {} (stale read: {})", exact.count, cheap.count);

    let series = client
        .series("video-42", "view", now - 3_600_000..now + 60_000, Granularity::Minute, Consistency::Linearizable)
        .await?;
    for bucket in series.buckets.iter().filter(|b| b.count > 0) {
        println!("  {}  {}", format_ms(bucket.start_ms), bucket.count);
    }

    // Invalid arguments fail before any request, with the server's wording.
    if let Err(e) = client.stats("", "view", last_day, Consistency::Linearizable).await {
        println!("as expected: {e}");
    }

    let status = client.cluster_status().await?;
    println!("{} partitions; leaders:", status.map.partition_count());
    for (partition, route) in status.map.partitions().iter().enumerate() {
        println!("  partition {partition}: node {} (term {})", route.leader, route.term);
    }
    Ok(())
}
