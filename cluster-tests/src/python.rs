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
    run_script(&[mode.into(), crate::cli::all_addrs(cluster).into()], env).await
}

/// `scripts/gen-clients.sh python-archive DIR EXPECT`: reads the archive's
/// Parquet files with pyarrow and compares them with `expect` (JSON, see
/// client/python/archive_check.py).
pub async fn check_archive(dir: &Path, expect: &Path) -> anyhow::Result<()> {
    run_script(&["python-archive".into(), dir.as_os_str().to_owned(), expect.as_os_str().to_owned()], &[]).await
}

/// `scripts/gen-clients.sh ARGS`; a clean run of its checks or an error
/// with its output.
async fn run_script(args: &[std::ffi::OsString], env: &[(&str, String)]) -> anyhow::Result<()> {
    // The running checkout's, not the one this library was compiled in: a
    // shared target dir may hold a build made from another clone.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string());
    let script = Path::new(&manifest_dir).join("../scripts/gen-clients.sh");
    let out = tokio::process::Command::new("bash")
        .arg(&script)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .kill_on_drop(true)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}\n{stderr}");
    let what = args.first().map(|a| a.to_string_lossy().to_string()).unwrap_or_default();
    anyhow::ensure!(out.status.success(), "gen-clients.sh {what} failed ({}):\n{stdout}\n{stderr}", out.status);
    let failed = stdout.lines().any(|l| l.starts_with("FAIL "));
    anyhow::ensure!(stdout.contains(" passed, 0 failed") && !failed, "gen-clients.sh {what}:\n{stdout}");
    Ok(())
}
