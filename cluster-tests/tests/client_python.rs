//! The generated Python client against a real cluster: health checks,
//! ingest with ids, duplicates, rejections, stats, series, stale reads and
//! the shared partitioner (client/python/tally_smoke.py).
//!
//! `scripts/gen-clients.sh` creates the virtual environment and installs
//! grpcio-tools from PyPI on first use. If that is impossible this test
//! fails with the script's message; it never skips.

use std::path::Path;

use cluster_tests::{ClusterOptions, TestCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_python_client_drives_a_real_cluster() -> anyhow::Result<()> {
    let cluster = TestCluster::start(ClusterOptions { nodes: 3, partitions: 8, args: vec![] }).await?;
    let addrs = cluster.nodes.iter().map(|n| n.addr.clone()).collect::<Vec<_>>().join(",");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/gen-clients.sh");
    let out = tokio::process::Command::new("bash")
        .arg(&script)
        .arg("python-test")
        .arg(&addrs)
        .kill_on_drop(true)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}\n{stderr}");
    assert!(out.status.success(), "the Python client failed ({}):\n{stdout}\n{stderr}", out.status);
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
    Ok(())
}
