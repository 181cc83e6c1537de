//! `tallyd` entry point: configuration and logging, then [`tally_server::server::run`].

use clap::Parser;
use tally_server::config::Cli;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // openraft warns on every failed heartbeat and vote: with hundreds of
    // groups a dead peer means thousands of lines a second, which costs more
    // CPU than the failure. `RUST_LOG=info,openraft=warn` brings them back.
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,openraft=error")))
        .init();
    let config = Cli::parse().load().map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
    tally_server::server::run(config).await
}
