//! The API contract at its edges, seen from a plain grpcio client
//! (client/python/tally_contract.py): bodies that are not protobuf are
//! INVALID_ARGUMENT naming the method, type and field; requests over a
//! method's size limit are RESOURCE_EXHAUSTED naming the limit; Initialize
//! on an initialised cluster answers already_initialized for the same shape
//! (replication factor capped by the node count) and FAILED_PRECONDITION
//! naming what differs otherwise; the Raft service is not on the public
//! port; Status carries peer addresses and Ingest the dedup window.
//!
//! Like client_python.rs, `scripts/gen-clients.sh` sets up the Python
//! environment on first use, and this test fails (never skips) without it.

use cluster_tests::{ClusterOptions, TestCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_client_sees_the_promised_codes() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::shared().await;
    let cluster = TestCluster::start(ClusterOptions { nodes: 3, partitions: 8, args: vec![] }).await?;
    cluster_tests::python::run_checks(&cluster, "python-contract").await
}
