//! `tally` — the Tally command line. See `tally --help` and
//! `tally_client::cli` for the implementation.

use clap::Parser;

#[tokio::main]
async fn main() {
    restore_default_sigpipe();
    let cli = tally_client::cli::Cli::parse();
    match tally_client::cli::run(cli).await {
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
