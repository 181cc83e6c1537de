//! `tally canary`: against a healthy cluster it writes known events to
//! every partition, finds every count exact, measures how soon each node
//! shows them, and exports all of it at `/metrics` while it runs — also
//! across a kill -9 of a node. Rerun with the same run id, the counts it
//! reads are not what it acknowledged (its events are duplicates of the
//! first run's, and the first run's are in its range): the canary must
//! report wrong counts and exit 1, so its check can fail.

use std::time::Duration;

use cluster_tests::{free_ports, ClusterOptions, TestCluster};

/// The value of the first sample of `name` with `label` in Prometheus text.
fn sample(text: &str, name: &str, label: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name) && l.contains(label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn scrape(port: u16) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: canary\r\n\r\n").await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    Ok(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_canary_checks_counts_and_visibility_and_catches_a_wrong_count() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::shared().await;
    let mut cluster = TestCluster::start(ClusterOptions { nodes: 3, partitions: 8, args: vec![] }).await?;
    let port = free_ports(1)?[0];
    let addrs = cluster_tests::cli::all_addrs(&cluster);
    let listen = format!("127.0.0.1:{port}");
    let args = [
        "--json",
        "canary",
        "--rate",
        "40",
        "--duration",
        "12s",
        "--metrics-listen",
        listen.as_str(),
        "--run-id",
        "test-run",
    ];
    let canary = tokio::spawn({
        let addrs = addrs.clone();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            cluster_tests::cli::tally(&addrs, &args, None).await
        }
    });
    // While it runs: events acknowledged, checks passing, every node's
    // visibility measured.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let text = scrape(port).await?;
    assert!(sample(&text, "tally_canary_events_total", "outcome=\"acked\"").unwrap_or(0.0) > 20.0, "{text}");
    assert!(sample(&text, "tally_canary_checks_total", "outcome=\"ok\"").unwrap_or(0.0) > 0.0, "{text}");
    for node in 1..=3 {
        let seen = sample(&text, "tally_canary_visible_seconds_count", &format!("node=\"{node}\"")).unwrap_or(0.0);
        assert!(seen > 0.0, "node {node}'s visibility was measured: {text}");
    }
    assert_eq!(sample(&text, "tally_canary_wrong_counts_total", ""), Some(0.0), "{text}");
    // A node dies under the canary: its writes retry elsewhere, counts stay exact.
    cluster.kill9(3)?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.restart(3).await?;
    let run = canary.await??;
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let json = run.json()?;
    assert_eq!(json["wrong_counts"].as_u64(), Some(0), "{json}");
    assert!(json["acked"].as_u64().unwrap_or(0) >= 200, "{json}");

    // The same run id again: every event is a duplicate of the first run's,
    // acknowledged but not counted — and the canary says so.
    let rerun = cluster_tests::cli::tally(
        &addrs,
        &["--json", "canary", "--rate", "20", "--duration", "3s", "--run-id", "test-run"],
        None,
    )
    .await?;
    assert_eq!(rerun.code, 1, "{}\n{}", rerun.stdout, rerun.stderr);
    let json = rerun.json()?;
    assert!(json["wrong_counts"].as_u64().unwrap_or(0) > 0, "{json}");
    assert!(rerun.stderr.contains("WRONG"), "{}", rerun.stderr);
    Ok(())
}
