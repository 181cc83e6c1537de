//! `tallyd` entry point: configuration and logging, then [`tally_server::server::run`].

use clap::Parser;
use tally_server::config::{Cli, LogFormat};
use tracing_subscriber::EnvFilter;

/// Threads of tokio's blocking pool at most. Storage runs its RocksDB and
/// file calls there, at most `storage::engine::BLOCKING_PERMITS` +
/// `BULK_PERMITS` at once, so `tokio::fs` and DNS lookups keep threads of
/// their own; beyond this many, work queues for a free thread instead of
/// spawning more. Tokio's default, 512, would let a burst of slow disk
/// reads start hundreds of threads.
const MAX_BLOCKING_THREADS: usize = 64;

fn main() -> anyhow::Result<()> {
    // Worker threads: one per core, tokio's default.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build()
        .map_err(|e| anyhow::anyhow!("tokio runtime: {e}"))?;
    runtime.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    // openraft warns on every failed heartbeat and vote: with hundreds of
    // groups a dead peer means thousands of lines a second, which costs more
    // CPU than the failure. `RUST_LOG=info,openraft=warn` brings them back.
    let cli = Cli::parse();
    let print_config = cli.print_config;
    let config = cli.load().map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
    if print_config {
        print!("{}", config.to_toml().map_err(|e| anyhow::anyhow!("configuration as TOML: {e}"))?);
        return Ok(());
    }
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,openraft=error"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    match config.log_format {
        LogFormat::Text => logs.init(),
        // One JSON object per line, span fields flattened, for log shippers.
        LogFormat::Json => logs.json().flatten_event(true).with_current_span(true).init(),
    }
    tally_server::server::run(config).await
}
