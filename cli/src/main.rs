//! `tally` — the Tally command line. The client library (`tally-client`)
//! does the talking to the cluster and `tally-bench` the measuring
//! (`tally bench`, `tally probe-writes`); this crate is the commands, their
//! flags and their output.
//!
//! Conventions every subcommand follows: `--addr` (or `TALLY_ADDR`) names one
//! or more seed nodes, comma-separated; `--json` replaces the human output
//! with exactly one JSON document on stdout (progress bars and notes go to
//! stderr and are hidden when it is not a terminal); times accept `now`,
//! relative offsets (`-1h`, `+5m`), RFC 3339 or epoch milliseconds. Exit
//! status: 0 success, 1 error, 2 when some events were rejected or failed
//! (or `cluster rebalance` could not move every leadership, or
//! `probe-writes` found partitions that never acknowledged), 3 when `bench`
//! verification found a mismatch.

mod audit;
mod bench_steps;
mod canary;
mod cluster;
mod dlq;
mod ingest;
mod probe_writes;
mod query;
mod retention;
mod split;
mod spread;
mod stages;
mod table;

use clap::{Parser, Subcommand};

/// Exit status for "ran, but some events were rejected or failed" (or, for
/// `cluster rebalance`, some leaderships could not be moved).
pub const EXIT_PARTIAL: i32 = 2;
/// Exit status for a failed `bench` verification.
pub const EXIT_MISMATCH: i32 = tally_bench::EXIT_MISMATCH;

/// `tally`: exact real-time event counts.
#[derive(Debug, Parser)]
#[command(name = "tally", version, about = "Tally: exact real-time event counts")]
pub struct Cli {
    /// Node(s) to talk to, host:port, comma-separated.
    #[arg(long, global = true, env = "TALLY_ADDR", default_value = "127.0.0.1:7001")]
    pub addr: String,
    /// Machine-readable JSON output (one document on stdout).
    #[arg(long, global = true)]
    pub json: bool,
    /// Bearer token for a cluster that runs with `tallyd --auth-file`
    /// (roles: writer to ingest, reader to query and read status, admin to
    /// change the cluster). Prefer the environment variable: a flag shows
    /// in the process list.
    #[arg(long, global = true, env = "TALLY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) of a cluster that runs with TLS: connect over
    /// https and verify the nodes against it.
    #[arg(long, global = true, env = "TALLY_CA")]
    pub ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM), for nodes that require one (--tls-client-ca).
    #[arg(long, global = true, env = "TALLY_CERT", requires = "key")]
    pub cert: Option<std::path::PathBuf>,
    /// Key of --cert (PEM).
    #[arg(long, global = true, env = "TALLY_KEY", requires = "cert")]
    pub key: Option<std::path::PathBuf>,
    #[allow(missing_docs)] // a doc comment here would change clap's help text
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Cluster administration: init, status, wait, leaderships, membership.
    Cluster {
        #[allow(missing_docs)]
        #[command(subcommand)]
        command: cluster::ClusterCommand,
    },
    /// Ingest events from arguments, or NDJSON/CSV from a file or stdin.
    Ingest(ingest::IngestArgs),
    /// The dead-letter logs: rejected events with their reasons; export
    /// them to fix and ingest again.
    Dlq {
        #[allow(missing_docs)]
        #[command(subcommand)]
        command: dlq::DlqCommand,
    },
    /// Count, sum and average over [from, to).
    Stats(query::StatsArgs),
    /// Buckets of one granularity over [from, to).
    Series(query::SeriesArgs),
    /// The k entities with the most events of a type over [from, to), exact.
    Top(query::TopArgs),
    /// Recount a series from the raw-event log and compare with its counts
    /// (exit 3 when any minute differs).
    Audit(audit::AuditArgs),
    /// Load generator with latency percentiles and count verification;
    /// `tally bench report` renders docs/BENCHMARKS.md from a run of
    /// scripts/bench.sh.
    Bench(Box<bench_steps::BenchCommand>),
    /// Time until each partition acknowledges a write (e.g. after a leader dies).
    ProbeWrites(probe_writes::ProbeWritesArgs),
    /// Write known events continuously and check their counts and how soon
    /// every node shows them; Prometheus metrics with --metrics-listen.
    Canary(canary::CanaryArgs),
}

impl Cli {
    /// A channel to one node for raw stubs, presenting `--token`.
    pub(crate) async fn connect_node(
        &self,
        addr: &str,
    ) -> Result<tally_client::TokenChannel, tally_client::ClientError> {
        tally_client::connect_secure(addr, self.token.as_deref(), self.tls()?.as_ref()).await
    }

    /// TLS from --ca, --cert and --key; `None` without --ca.
    pub(crate) fn tls(&self) -> Result<Option<tally_client::TlsFiles>, tally_client::ClientError> {
        match &self.ca {
            Some(ca) => tally_client::TlsFiles::read(ca, self.cert.as_deref(), self.key.as_deref()).map(Some),
            None => Ok(None),
        }
    }

    /// The seed addresses of `--addr`.
    pub fn seeds(&self) -> Vec<String> {
        self.addr.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
    }
}

/// Runs the parsed command; returns the process exit status.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    match &cli.command {
        Command::Cluster { command } => cluster::run(&cli, command).await,
        Command::Ingest(args) => ingest::run(&cli, args).await,
        Command::Dlq { command } => dlq::run(&cli, command).await,
        Command::Stats(args) => query::stats(&cli, args).await,
        Command::Series(args) => query::series(&cli, args).await,
        Command::Top(args) => query::top(&cli, args).await,
        Command::Audit(args) => audit::run(&cli, args).await,
        Command::Bench(command) => bench_steps::run(&cli, command).await,
        Command::ProbeWrites(args) => probe_writes::run(&cli, args).await,
        Command::Canary(args) => canary::run(&cli, args).await,
    }
}

/// Connects a [`TallyClient`](tally_client::TallyClient) to `--addr`.
pub(crate) async fn client(cli: &Cli) -> anyhow::Result<tally_client::TallyClient> {
    use anyhow::Context;
    let config = tally_client::ClientConfig {
        token: cli.token.clone(),
        tls: cli.tls()?,
        ..tally_client::ClientConfig::new(cli.seeds())
    };
    tally_client::TallyClient::with_config(config).await.with_context(|| format!("connecting to {}", cli.addr))
}

/// Prints a JSON document on stdout.
pub(crate) fn print_json(value: &serde_json::Value) {
    println!("{value}");
}

#[tokio::main]
async fn main() {
    restore_default_sigpipe();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Rust ignores SIGPIPE, so `println!` into a closed pipe panics
/// (`tally cluster status --json | head`). A command-line tool should end
/// quietly like every other Unix tool when its reader goes away.
fn restore_default_sigpipe() {
    // SAFETY: a signal's disposition is process-wide and set atomically by
    // the kernel, whichever thread asks; SIG_DFL is valid for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
