//! The generated Python client against a real cluster: health checks,
//! ingest with ids, duplicates, rejections, stats, series, stale reads and
//! the shared partitioner (client/python/tally_smoke.py).
//!
//! `scripts/gen-clients.sh` creates the virtual environment and installs
//! grpcio-tools from PyPI on first use. If that is impossible this test
//! fails with the script's message; it never skips.

use cluster_tests::{ClusterOptions, TestCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_python_client_drives_a_real_cluster() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::shared().await;
    let cluster = TestCluster::start(ClusterOptions { nodes: 3, partitions: 8, args: vec![] }).await?;
    cluster_tests::python::run_checks(&cluster, "python-test").await
}
