//! The generated Python client against a real cluster: health checks,
//! ingest with ids, duplicates, rejections, stats, series, stale reads and
//! the shared partitioner (client/python/tally_smoke.py).
//!
//! `scripts/gen-clients.sh` creates the virtual environment and installs
//! grpcio-tools from PyPI on first use. If that is impossible this test
//! fails with the script's message; it never skips. The second test runs
//! the same checks over TLS with a bearer token.

use cluster_tests::{ClusterOptions, TestCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_python_client_drives_a_real_cluster() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::shared().await;
    let cluster = TestCluster::start(ClusterOptions { nodes: 3, partitions: 8, args: vec![] }).await?;
    cluster_tests::python::run_checks(&cluster, "python-test").await
}

/// The same checks over TLS with a bearer token (writer and reader roles),
/// as an operator's Python service would connect to a `--secure` cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_python_client_connects_with_tls_and_a_token() -> anyhow::Result<()> {
    use sha2::{Digest, Sha256};
    let _turn = cluster_tests::serial::shared().await;
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/make-certs.sh");
    let made = std::process::Command::new(script).arg(&certs).output()?;
    anyhow::ensure!(made.status.success(), "make-certs.sh: {}", String::from_utf8_lossy(&made.stderr));
    let hash = |t: &str| Sha256::digest(t.as_bytes()).iter().map(|b| format!("{b:02x}")).collect::<String>();
    let (app, node) = ("py-app-4f1c9e", "py-node-8a2d7b");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("app writer,reader {}\nnodes node {}\n", hash(app), hash(node)))?;
    std::fs::write(dir.path().join("node.token"), node)?;
    let file = |name: &str| dir.path().join(name).display().to_string();
    let cert = |name: &str| certs.join(name).display().to_string();
    let args = vec![
        "--auth-file".into(),
        file("tokens"),
        "--node-token-file".into(),
        file("node.token"),
        "--tls-cert".into(),
        cert("node.pem"),
        "--tls-key".into(),
        cert("node.key"),
        "--peer-ca".into(),
        cert("ca.pem"),
    ];
    let cluster = TestCluster::start(ClusterOptions { nodes: 3, partitions: 8, args }).await?;
    let env = [("TALLY_CA", cert("ca.pem")), ("TALLY_TOKEN", app.to_string())];
    cluster_tests::python::run_checks_with(&cluster, "python-test", &env).await
}
