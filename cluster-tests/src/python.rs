//! Running the generated Python client's scripts (client/python/) against a
//! test cluster, through `scripts/gen-clients.sh`, which sets up the virtual
//! environment and generates the stubs on first use. A script prints one
//! line per check and "N passed, N failed"; anything but a clean run fails
//! the test (never a skip).

use std::path::Path;

use crate::TestCluster;

/// `scripts/gen-clients.sh MODE ADDRS` against every node of `cluster`
/// (`python-test`: tally_smoke.py, `python-contract`: tally_contract.py).
pub async fn run_checks(cluster: &TestCluster, mode: &str) -> anyhow::Result<()> {
    run_checks_with(cluster, mode, &[]).await
}

/// [`run_checks`] with environment variables for the script (`TALLY_CA`,
/// `TALLY_TOKEN`, ...).
pub async fn run_checks_with(cluster: &TestCluster, mode: &str, env: &[(&str, String)]) -> anyhow::Result<()> {
    // The running checkout's, not the one this library was compiled in: a
    // shared target dir may hold a build made from another clone.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string());
    let script = Path::new(&manifest_dir).join("../scripts/gen-clients.sh");
    let out = tokio::process::Command::new("bash")
        .arg(&script)
        .arg(mode)
        .arg(crate::cli::all_addrs(cluster))
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .kill_on_drop(true)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}\n{stderr}");
    anyhow::ensure!(out.status.success(), "gen-clients.sh {mode} failed ({}):\n{stdout}\n{stderr}", out.status);
    let failed = stdout.lines().any(|l| l.starts_with("FAIL "));
    anyhow::ensure!(stdout.contains(" passed, 0 failed") && !failed, "gen-clients.sh {mode}:\n{stdout}");
    Ok(())
}
