//! 3 real nodes with `--http-listen`: health endpoints answer; events sent
//! with known outcomes (new, re-sent, invalid) move `tally_events_total` on
//! the nodes that received them by exactly what the replies said; queries
//! move the query histogram; the gauges describe the cluster (16 partitions,
//! each led once, three replicas each); and every series the Grafana
//! dashboard (deploy/grafana/tally.json) queries exists on every node.
//! The nodes log with `--log-format json`: every line is one JSON object.

use std::collections::{BTreeMap, BTreeSet};

use cluster_tests::{ClusterOptions, TestCluster};
use tally_proto::v1::{Consistency, Event, IngestRequest, StatsRequest};

const PARTITIONS: u32 = 16;

/// Samples of one exposition: (name, labels) → value.
type Samples = BTreeMap<(String, String), f64>;

fn parse(text: &str) -> anyhow::Result<Samples> {
    let mut out = Samples::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let (series, value) = line.rsplit_once(' ').ok_or_else(|| anyhow::anyhow!("bad sample line {line:?}"))?;
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        out.insert((name.to_string(), labels.to_string()), value.parse()?);
    }
    Ok(out)
}

/// Sum of `name` over the samples whose labels contain every `filter`.
fn sum(samples: &Samples, name: &str, filters: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|((n, labels), _)| n == name && filters.iter().all(|f| labels.contains(f)))
        .map(|(_, v)| v)
        .sum()
}

async fn scrape_all(cluster: &TestCluster) -> anyhow::Result<Vec<Samples>> {
    let mut all = Vec::new();
    for id in 1..=3 {
        let (status, body) = cluster.http_get(id, "/metrics").await?;
        anyhow::ensure!(status == 200, "node {id} /metrics: {status} {body}");
        all.push(parse(&body)?);
    }
    Ok(all)
}

fn event(entity: &str, id: &str) -> Event {
    Event {
        actor_id: Vec::new(),
        entity_id: entity.as_bytes().to_vec(),
        event_type: "view".into(),
        event_time_ms: tally_client::time_arg::now_ms(),
        event_id: id.as_bytes().to_vec(),
        value: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened_and_serve_every_dashboard_series() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::shared().await;
    let args = ["--log-format", "json"].map(String::from).to_vec();
    let cluster = TestCluster::start(ClusterOptions { nodes: 3, partitions: PARTITIONS, args }).await?;
    for id in 1..=3 {
        assert_eq!(cluster.http_get(id, "/healthz").await?.0, 200);
        let (status, body) = cluster.http_get(id, "/readyz").await?;
        assert_eq!(status, 200, "node {id} not ready: {body}");
        assert_eq!(cluster.http_get(id, "/nothing-here").await?.0, 404);
    }
    let before = scrape_all(&cluster).await?;

    // Known outcomes: 1,200 new events, 300 of them sent again, and a batch
    // of 5 invalid events (no entity) with 5 new valid ones. Every reply is
    // kept: the metrics must agree with what the clients were told.
    let mut batches: Vec<Vec<Event>> =
        (0..4).map(|b| (0..300).map(|i| event(&format!("video-{}", i % 40), &format!("m{b}-{i}"))).collect()).collect();
    batches.push((0..300).map(|i| event(&format!("video-{}", i % 40), &format!("m1-{i}"))).collect());
    let mut mixed: Vec<Event> = (0..5).map(|i| event("", &format!("bad-{i}"))).collect();
    mixed.extend((0..5).map(|i| event("video-x", &format!("x-{i}"))));
    batches.push(mixed);
    // Per receiving node: (accepted, duplicates, invalid, retryable).
    let mut told: BTreeMap<u64, [u64; 4]> = BTreeMap::new();
    for (i, events) in batches.into_iter().enumerate() {
        let node = 1 + (i as u64 % 3);
        let reply = cluster.ingest_client(node).await?.ingest(IngestRequest { events }).await?.into_inner();
        let t = told.entry(node).or_default();
        t[0] += u64::from(reply.accepted);
        t[1] += u64::from(reply.duplicates);
        t[2] += reply.rejected.iter().filter(|r| !r.retryable).count() as u64;
        t[3] += reply.rejected.iter().filter(|r| r.retryable).count() as u64;
    }
    let total = |k: usize| told.values().map(|t| t[k]).sum::<u64>();
    assert_eq!(total(2), 5, "the five events without an entity are rejected as invalid");
    assert_eq!(total(0) + total(1) + total(3), 1_505, "every valid event has an outcome");

    // Queries: 4 linearizable and 2 stale Stats, to different nodes.
    for (i, stale) in [false, false, true, false, true, false].into_iter().enumerate() {
        let consistency = if stale { Consistency::Stale } else { Consistency::Linearizable } as i32;
        let req = StatsRequest {
            share_partition_plus_one: 0,
            entity_id: b"video-1".to_vec(),
            event_type: "view".into(),
            from_ms: 0,
            to_ms: tally_client::time_arg::now_ms() + 60_000,
            consistency,
        };
        cluster.query_client(1 + i as u64 % 3).await?.stats(req).await?;
    }

    let after = scrape_all(&cluster).await?;
    for id in 1..=3u64 {
        let (b, a) = (&before[id as usize - 1], &after[id as usize - 1]);
        let moved = |filters: &[&str]| sum(a, "tally_events_total", filters) - sum(b, "tally_events_total", filters);
        let t = told.get(&id).copied().unwrap_or_default();
        assert_eq!(moved(&["outcome=\"accepted\""]), t[0] as f64, "node {id}: accepted");
        assert_eq!(moved(&["outcome=\"duplicate\""]), t[1] as f64, "node {id}: duplicates");
        assert_eq!(moved(&["reason=\"invalid\""]), t[2] as f64, "node {id}: invalid");
        assert_eq!(
            moved(&["reason=\"unavailable\""]) + moved(&["reason=\"exhausted\""]),
            t[3] as f64,
            "node {id}: retryable"
        );
        let queries = |s: &Samples, c: &str| sum(s, "tally_query_duration_seconds_count", &["kind=\"stats\"", c]);
        let lin = "consistency=\"linearizable\"";
        let stale = "consistency=\"stale\"";
        // Query i went to node 1 + i % 3.
        let (want_lin, want_stale) = if id == 1 { (2.0, 0.0) } else { (1.0, 1.0) };
        assert_eq!(queries(a, lin) - queries(b, lin), want_lin, "node {id}: linearizable stats timed");
        assert_eq!(queries(a, stale) - queries(b, stale), want_stale, "node {id}: stale stats timed");
        assert!(sum(a, "tally_process_resident_memory_bytes", &[]) > 1e6, "node {id}: RSS");
        assert!(sum(a, "tally_process_cpu_seconds", &[]) > 0.0, "node {id}: CPU");
        assert_eq!(sum(a, "tally_raft_replicas", &[]), f64::from(PARTITIONS), "node {id}: one replica per partition");
        assert_eq!(sum(a, "tally_peers_up", &[]), 2.0, "node {id}: sees both peers");
        assert!(
            sum(a, "tally_stage_duration_seconds_count", &["stage=\"log.fsync\""]) > 0.0,
            "node {id}: fsyncs timed"
        );
    }
    let led: f64 = after.iter().map(|s| sum(s, "tally_raft_partitions_led", &[])).sum();
    assert_eq!(led, f64::from(PARTITIONS), "every partition led by exactly one node");
    let accepted: f64 = after.iter().map(|s| sum(s, "tally_events_total", &["outcome=\"accepted\""])).sum();
    assert_eq!(accepted, total(0) as f64, "accepted events counted once cluster-wide");

    // Every series the dashboard queries is served by every node.
    let dashboard = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana/tally.json"))?;
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard)?;
    let mut names = BTreeSet::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_default();
            let mut rest = expr;
            while let Some(at) = rest.find("tally_") {
                let name: String = rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                rest = &rest[at + name.len()..];
                names.insert(name);
            }
        }
    }
    assert!(names.len() >= 15, "the dashboard queries the golden signals: {names:?}");
    for node in &cluster.nodes {
        let log = std::fs::read_to_string(&node.log_path)?;
        let mut lines = 0;
        for line in log.lines() {
            let value: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| anyhow::anyhow!("node {} logged a line that is not JSON ({e}): {line}", node.id))?;
            assert!(value["level"].is_string() && value["timestamp"].is_string(), "{line}");
            lines += 1;
        }
        assert!(log.contains("\"message\":\"tallyd started\""), "node {}: {lines} lines, no start line", node.id);
    }
    for (i, samples) in after.iter().enumerate() {
        for name in &names {
            assert!(samples.keys().any(|(n, _)| n == name), "node {}: no series {name} for the dashboard", i + 1);
        }
    }
    Ok(())
}
