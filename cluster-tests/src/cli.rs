//! Running the `tally` CLI against a test cluster, for tests of what a
//! user of the command line sees (`client_cli` and friends).

use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{bail, Context};
use tokio::io::AsyncWriteExt;

use crate::TestCluster;

/// The `tally` binary: `TALLY_BIN`, else next to `tallyd`.
pub fn tally_binary() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("TALLY_BIN") {
        return Ok(PathBuf::from(p));
    }
    let tallyd = crate::tallyd_binary()?;
    let candidate = tallyd.with_file_name("tally");
    if candidate.exists() {
        return Ok(candidate);
    }
    bail!(
        "tally not found at {}; run `cargo build --workspace --all-targets` first or set TALLY_BIN",
        candidate.display()
    )
}

/// Every node's address, comma-separated, for `--addr`.
pub fn all_addrs(cluster: &TestCluster) -> String {
    cluster.nodes.iter().map(|n| n.addr.clone()).collect::<Vec<_>>().join(",")
}

/// What one CLI run produced.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// stdout parsed as one JSON document.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(self.stdout.trim())
            .with_context(|| format!("stdout is not one JSON document:\n{}\nstderr:\n{}", self.stdout, self.stderr))
    }
}

/// Runs `tally ARGS` with `--addr` set through `TALLY_ADDR`, optionally
/// feeding `stdin`.
pub async fn tally(addr: &str, args: &[&str], stdin: Option<&[u8]>) -> anyhow::Result<Run> {
    let mut child = tokio::process::Command::new(tally_binary()?)
        .args(args)
        .env("TALLY_ADDR", addr)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting tally")?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input).await?;
        drop(pipe);
    }
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait_with_output())
        .await
        .context("tally ran for more than 60 s")??;
    Ok(Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}
