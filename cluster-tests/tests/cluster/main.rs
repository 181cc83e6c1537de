//! The cluster tests: one test binary made of modules, so the suite links
//! once rather than once per file. Tests start real `tallyd` processes
//! (`cluster_tests::TestCluster`); which of them may overlap is decided by
//! `cluster_tests::serial`, whose turn every test takes first.
//!
//! Run one: `cargo test -p cluster-tests --test cluster -- nemesis::`.

mod api_surface;
mod archive;
mod audit;
mod auth;
mod balancer;
mod canary;
mod client_backpressure;
mod client_breaker;
mod client_cli;
mod client_python;
mod client_python_contract;
mod client_routing;
mod clock_skew;
mod dashboard;
mod dead_letters;
mod deploy_files;
mod entry_limits;
mod exactness;
mod extreme_values;
mod failover;
mod ingest_flood;
mod ingest_policy;
mod leadership;
mod load_visibility;
mod many_partitions;
mod membership;
mod membership_crash;
mod metrics;
mod nemesis;
mod peer_port;
mod quiescence;
mod replica_handoff;
mod restart_at_once;
mod retention;
mod spike;
mod split;
mod spread;
mod tls;
mod top_k;
mod transfer_down_node;
mod transfer_paused_node;
mod uniques;

/// Every test takes a turn (`cluster_tests::serial`) before anything else,
/// so that a new test cannot silently overlap a timing-sensitive one.
#[test]
fn every_cluster_test_takes_its_turn() {
    let sources = [
        ("api_surface", include_str!("api_surface.rs")),
        ("archive", include_str!("archive.rs")),
        ("audit", include_str!("audit.rs")),
        ("auth", include_str!("auth.rs")),
        ("balancer", include_str!("balancer.rs")),
        ("canary", include_str!("canary.rs")),
        ("client_backpressure", include_str!("client_backpressure.rs")),
        ("client_breaker", include_str!("client_breaker.rs")),
        ("client_cli", include_str!("client_cli.rs")),
        ("client_python", include_str!("client_python.rs")),
        ("client_python_contract", include_str!("client_python_contract.rs")),
        ("client_routing", include_str!("client_routing.rs")),
        ("clock_skew", include_str!("clock_skew.rs")),
        ("dashboard", include_str!("dashboard.rs")),
        ("dead_letters", include_str!("dead_letters.rs")),
        ("deploy_files", include_str!("deploy_files.rs")),
        ("entry_limits", include_str!("entry_limits.rs")),
        ("exactness", include_str!("exactness.rs")),
        ("extreme_values", include_str!("extreme_values.rs")),
        ("failover", include_str!("failover.rs")),
        ("ingest_flood", include_str!("ingest_flood.rs")),
        ("ingest_policy", include_str!("ingest_policy.rs")),
        ("leadership", include_str!("leadership.rs")),
        ("load_visibility", include_str!("load_visibility.rs")),
        ("many_partitions", include_str!("many_partitions.rs")),
        ("membership", include_str!("membership.rs")),
        ("membership_crash", include_str!("membership_crash.rs")),
        ("nemesis", include_str!("nemesis.rs")),
        ("peer_port", include_str!("peer_port.rs")),
        ("quiescence", include_str!("quiescence.rs")),
        ("replica_handoff", include_str!("replica_handoff.rs")),
        ("restart_at_once", include_str!("restart_at_once.rs")),
        ("retention", include_str!("retention.rs")),
        ("spike", include_str!("spike.rs")),
        ("split", include_str!("split.rs")),
        ("spread", include_str!("spread.rs")),
        ("tls", include_str!("tls.rs")),
        ("top_k", include_str!("top_k.rs")),
        ("transfer_down_node", include_str!("transfer_down_node.rs")),
        ("transfer_paused_node", include_str!("transfer_paused_node.rs")),
        ("uniques", include_str!("uniques.rs")),
    ];
    for (module, source) in sources {
        let tests = source.matches("#[tokio::test").count();
        let turns = source.matches("let _turn = cluster_tests::serial::").count();
        assert_eq!(tests, turns, "{module}: {tests} tests but {turns} turns taken (see cluster_tests::serial)");
    }
}
