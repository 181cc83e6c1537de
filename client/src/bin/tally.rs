//! `tally` — the Tally command line. See `tally --help` and
//! `tally_client::cli` for the implementation.

use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = tally_client::cli::Cli::parse();
    match tally_client::cli::run(cli).await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
