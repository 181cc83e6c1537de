//! `tallyd` entry point: configuration and logging, then [`tally_server::server::run`].

use clap::Parser;
use tally_server::config::Cli;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,openraft=warn")))
        .init();
    let config = Cli::parse().load().map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
    tally_server::server::run(config).await
}
