//! Load you can see (issue 15, part 1): under traffic skewed to one entity,
//! `tally cluster status --hot` lists that entity's partition first with
//! most of the events/s, every node reports its load and CPU, and the
//! leader's /metrics carries the partition's rate.

use std::time::{Duration, Instant};

use cluster_tests::model::event;
use cluster_tests::{ClusterOptions, TestCluster};
use tally_proto::partition::partition_of;
use tally_proto::v1::Event;

const PARTITIONS: u32 = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hot_partition_shows_first() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::shared().await;
    let cluster = TestCluster::start(ClusterOptions { nodes: 3, partitions: PARTITIONS, args: vec![] }).await?;
    let hot = "the-viral-video";
    let hot_partition = partition_of(hot.as_bytes(), PARTITIONS);
    let now = tally_client::time_arg::now_ms();
    // Four seconds: 200-event batches for the hot entity, and one event
    // each for a few others.
    let until = Instant::now() + Duration::from_secs(4);
    let mut round = 0;
    while Instant::now() < until {
        let mut events: Vec<Event> = (0..200).map(|i| event(hot, "view", now, &format!("h{round}-{i}"))).collect();
        events.extend((0..8).map(|i| event(&format!("quiet-{i}"), "view", now, &format!("q{round}-{i}"))));
        let reply = cluster.ingest_answered(1 + round % 3, &events).await?;
        anyhow::ensure!(reply.rejected.is_empty(), "{reply:?}");
        round += 1;
    }
    let run = cluster_tests::cli::tally(&cluster.addr(1)?, &["--json", "cluster", "status", "--hot"], None).await?;
    let doc = run.json()?;
    let partitions = doc["partitions"].as_array().cloned().unwrap_or_default();
    assert_eq!(partitions.len(), PARTITIONS as usize, "every partition's leader reports it: {doc}");
    assert_eq!(partitions[0]["partition"].as_u64(), Some(u64::from(hot_partition)), "{doc}");
    let rate = |p: &serde_json::Value| p["events_per_sec"].as_f64().unwrap_or(0.0);
    let others: f64 = partitions[1..].iter().map(rate).sum();
    assert!(rate(&partitions[0]) > 5.0 * others && rate(&partitions[0]) > 0.0, "{doc}");
    assert!(partitions[0]["bytes_per_sec"].as_f64().unwrap_or(0.0) > 10.0 * rate(&partitions[0]), "{doc}");
    assert!(partitions[0]["processor_cpu"].as_f64().unwrap_or(0.0) > 0.0, "{doc}");
    assert!(partitions[0]["apply_cpu"].as_f64().unwrap_or(0.0) > 0.0, "{doc}");
    let nodes = doc["nodes"].as_array().cloned().unwrap_or_default();
    assert_eq!(nodes.len(), 3, "{doc}");
    let leader = partitions[0]["leader"].as_u64().unwrap_or(0);
    for n in &nodes {
        // Every node applies the hot partition (a replica of each is on
        // all three); its leader alone takes the events in.
        assert!(n["apply_cpu"].as_f64().unwrap_or(0.0) > 0.0, "{doc}");
        if n["node_id"].as_u64() == Some(leader) {
            assert!(rate(n) >= rate(&partitions[0]), "{doc}");
        }
    }
    let human = cluster_tests::cli::tally(&cluster.addr(2)?, &["cluster", "status", "--hot"], None).await?;
    assert_eq!(human.code, 0, "{human:?}");
    assert!(human.stdout.contains("events/s"), "{}", human.stdout);
    // The leader's /metrics carries the partition's rate and the node's.
    let (_, metrics) = cluster.http_get(leader, "/metrics").await?;
    let line = format!("tally_partition_events_per_second{{partition=\"{hot_partition}\"}} ");
    let value = metrics.lines().find_map(|l| l.strip_prefix(line.as_str())).and_then(|v| v.parse::<f64>().ok());
    assert!(value.is_some_and(|v| v > 0.0), "{line} in\n{metrics}");
    assert!(metrics.contains("tally_load_cpu{stage=\"apply\"}"), "{metrics}");
    Ok(())
}
