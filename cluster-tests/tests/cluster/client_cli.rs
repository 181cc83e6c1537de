//! The `tally` CLI against a real cluster: every command's `--json` output
//! has the documented shape and the right numbers, files and stdin stream
//! through `ingest`, `bench` verifies its own counts, and `cluster
//! transfer-leader` / `cluster rebalance` move leaderships.

use std::time::{Duration, Instant};

use cluster_tests::cli::{all_addrs, tally};
use cluster_tests::{ClusterOptions, TestCluster};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_commands_produce_the_documented_json() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::shared().await;
    let cluster = TestCluster::start(ClusterOptions { nodes: 3, partitions: 8, args: vec![] }).await?;
    let addr = all_addrs(&cluster);
    let dir = tempfile::tempdir()?;

    // cluster status: every node, partition, leader and lag.
    let status = tally(&addr, &["cluster", "status", "--json"], None).await?;
    assert_eq!(status.code, 0, "{}", status.stderr);
    let s = status.json()?;
    assert_eq!(s["initialized"], json!(true));
    assert_eq!(s["partition_count"], json!(8));
    assert_eq!(s["leaderless"], json!(0));
    assert_eq!(s["nodes"].as_array().map(Vec::len), Some(3));
    assert!(s["nodes"].as_array().into_iter().flatten().all(|n| n["reachable"] == json!(true)));
    let leads: u64 = s["nodes"].as_array().into_iter().flatten().filter_map(|n| n["leads"].as_u64()).sum();
    assert_eq!(leads, 8);
    let p0 = &s["partitions"][0];
    assert_eq!(p0["replicas"].as_array().map(Vec::len), Some(3));
    assert_eq!(p0["lag"].as_object().map(|m| m.len()), Some(3), "{p0}");
    assert!(p0["leader"].as_u64().is_some_and(|l| l > 0));
    // No membership change: every partition's voters are its replicas.
    assert_eq!(s["changing"], json!(0));
    assert_eq!(sorted(&p0["voters"]), sorted(&p0["replicas"]), "{p0}");
    assert_eq!(p0["changing"], json!(false));
    // The human table names every node.
    let table = tally(&addr, &["cluster", "status", "--partitions"], None).await?;
    assert_eq!(table.code, 0);
    assert!(table.stdout.contains("NODE") && table.stdout.contains("PARTITION"), "{}", table.stdout);
    for n in &cluster.nodes {
        assert!(table.stdout.contains(&n.addr), "{}", table.stdout);
    }

    // ingest from arguments; the same id repeated is one event.
    let r = tally(&addr, &["--json", "ingest", "cli-video", "view", "--repeat", "5"], None).await?;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j = r.json()?;
    assert_eq!((j["events"].clone(), j["accepted"].clone(), j["duplicates"].clone()), (json!(5), json!(5), json!(0)));
    assert_eq!((j["rejected"].clone(), j["failed"].clone()), (json!(0), json!(0)));
    let r = tally(&addr, &["--json", "ingest", "cli-video", "view", "--id", "same", "--repeat", "3"], None).await?;
    let j = r.json()?;
    assert_eq!((j["accepted"].clone(), j["duplicates"].clone()), (json!(1), json!(2)));
    // Plain output keeps the documented one-line summary.
    let r = tally(&addr, &["ingest", "cli-video", "view", "--id", "same"], None).await?;
    assert_eq!(r.stdout.trim(), "accepted 0, duplicates 1, rejected 0");

    // NDJSON from a file: 3,000 good lines and two bad ones.
    let path = dir.path().join("events.ndjson");
    let mut text = String::new();
    for i in 0..3_000 {
        text.push_str(&format!(
            "{{\"entity_id\":\"cli-file-{}\",\"event_type\":\"like\",\"event_id\":\"f{i}\",\"value\":2}}\n",
            i % 7
        ));
        if i == 10 {
            text.push_str("{\"entity_id\":\"cli-file-0\",\"event_type\":\"Bad Type\"}\n");
        }
        if i == 20 {
            text.push_str("this is not json\n");
        }
    }
    std::fs::write(&path, &text)?;
    let r = tally(&addr, &["--json", "ingest", "--file", path.to_str().unwrap_or_default()], None).await?;
    assert_eq!(r.code, 2, "rejections give exit status 2: {}", r.stderr);
    let j = r.json()?;
    assert_eq!(
        (j["events"].clone(), j["accepted"].clone(), j["rejected"].clone()),
        (json!(3_002), json!(3_000), json!(2))
    );
    let problems = j["problems"].as_array().cloned().unwrap_or_default();
    assert_eq!(problems.len(), 2);
    assert_eq!((problems.iter().map(|p| p["line"].clone()).collect::<Vec<_>>()), vec![json!(12), json!(23)]);
    assert!(problems.iter().any(|p| p["field"] == json!("event_type")));
    // The same file again: all duplicates.
    let j = tally(&addr, &["--json", "ingest", "-f", path.to_str().unwrap_or_default()], None).await?.json()?;
    assert_eq!((j["accepted"].clone(), j["duplicates"].clone()), (json!(0), json!(3_000)));

    // CSV on stdin.
    let csv =
        "entity_id,event_type,time,event_id,value\ncli-csv,view,now,c1,5\ncli-csv,view,-1m,c2,\ncli-csv,view,,c3,1\n";
    let j = tally(&addr, &["--json", "ingest", "--format", "csv"], Some(csv.as_bytes())).await?.json()?;
    assert_eq!((j["events"].clone(), j["accepted"].clone()), (json!(3), json!(3)));

    // stats and series see all of it.
    let j =
        tally(&addr, &["--json", "stats", "cli-video", "view", "--from", "-1h", "--to", "+1m"], None).await?.json()?;
    assert_eq!((j["count"].clone(), j["sum"].clone()), (json!(6), json!(6)));
    assert!(j["served_by"].as_u64().is_some_and(|n| n > 0) && j["from_ms"].is_i64() && j["to_ms"].is_i64());
    let j =
        tally(&addr, &["--json", "stats", "cli-csv", "view", "--from", "-1h", "--to", "now", "--stale"], None).await;
    // A stale read may lag, but answers with the same shape.
    assert!(j?.json()?["count"].is_u64());
    let mut total = 0;
    for e in 0..7 {
        let entity = format!("cli-file-{e}");
        let j = tally(
            &addr,
            &["--json", "series", &entity, "like", "--from", "-1h", "--to", "+1m", "--granularity", "hour"],
            None,
        )
        .await?
        .json()?;
        let buckets = j["buckets"].as_array().cloned().unwrap_or_default();
        assert!(!buckets.is_empty() && buckets.iter().all(|b| b["start_ms"].is_i64() && b["sum"].is_i64()));
        total += buckets.iter().filter_map(|b| b["count"].as_u64()).sum::<u64>();
    }
    assert_eq!(total, 3_000);
    // cluster stages: every node reports every stage; the writes and reads
    // above moved the counters of the stages they pass through, and
    // --reset starts a new window.
    let j = tally(&addr, &["--json", "cluster", "stages", "--reset"], None).await?.json()?;
    let nodes = j["nodes"].as_array().cloned().unwrap_or_default();
    assert_eq!(nodes.len(), 3, "{j}");
    let count = |stage: &str| -> u64 {
        nodes
            .iter()
            .flat_map(|n| n["stages"].as_array().cloned().unwrap_or_default())
            .filter(|s| s["name"] == stage)
            .filter_map(|s| s["count"].as_u64())
            .sum()
    };
    for stage in [
        "ingest.request",
        "ingest.queue_wait",
        "ingest.build_entry",
        "ingest.raft_write",
        "raft.replicate",
        "raft.follower_append",
        "log.write",
        "log.fsync",
        "apply.round",
        "read.request",
        "read.storage",
    ] {
        assert!(count(stage) > 0, "{stage} never recorded: {j}");
    }
    assert!(
        nodes
            .iter()
            .all(|n| n["stages"].as_array().is_some_and(|s| s.len() == 14 && s.iter().all(|s| s["p99_ms"].is_f64()))),
        "{j}"
    );
    let j = tally(&addr, &["--json", "cluster", "stages"], None).await?.json()?;
    let after: u64 = j["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|n| n["stages"].as_array().cloned().unwrap_or_default())
        .filter(|s| s["name"] == "ingest.request")
        .filter_map(|s| s["count"].as_u64())
        .sum();
    assert_eq!(after, 0, "reset: no ingest since: {j}");
    let table = tally(&addr, &["cluster", "stages"], None).await?;
    assert!(table.stdout.contains("log.fsync") && table.stdout.contains("p99"), "{}", table.stdout);

    // A reader that goes away early (`| head`) ends the CLI quietly, not
    // with a panic: ~8,600 minute buckets are far more than a pipe holds.
    {
        use std::io::Read;
        let mut child = std::process::Command::new(cluster_tests::cli::tally_binary()?)
            .args([
                "--addr",
                &addr,
                "--json",
                "series",
                "cli-video",
                "view",
                "--from",
                "-6d",
                "--to",
                "now",
                "--granularity",
                "minute",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let mut first = [0u8; 64];
        child.stdout.take().map(|mut out| out.read(&mut first)).transpose()?;
        let out = child.wait_with_output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked") && out.status.code() != Some(101), "{:?}: {stderr}", out.status);
    }

    let bad = tally(&addr, &["series", "x", "view", "--granularity", "week"], None).await?;
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains("minute, hour, day, month or year"), "{}", bad.stderr);

    // bench: verifies its own counts and reports percentiles, to stdout and file.
    let out = dir.path().join("bench.json");
    let out_arg = out.to_str().unwrap_or_default();
    let r = tally(
        &addr,
        &[
            "--json",
            "bench",
            "--events",
            "3000",
            "--ids",
            "50",
            "--zipf",
            "1.1",
            "--duplicates",
            "0.1",
            "--concurrency",
            "2",
            "--out",
            out_arg,
        ],
        None,
    )
    .await?;
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let j = r.json()?;
    let from_file: serde_json::Value = serde_json::from_slice(&std::fs::read(&out)?)?;
    assert_eq!(j, from_file);
    assert_eq!(j["ok"], json!(true));
    assert_eq!(j["sent"], json!(3000));
    assert_eq!(j["verify"]["ok"], json!(true), "{}", j["verify"]);
    assert_eq!(j["verify"]["mismatched_keys"], json!(0));
    let resent = j["resent_duplicates"].as_u64().unwrap_or(0);
    assert!(resent > 100, "about 10 % re-sent: {resent}");
    assert_eq!(j["verify"]["expected_events"].as_u64(), Some(3000 - resent));
    for q in ["p50", "p90", "p99", "p999", "max"] {
        assert!(j["latency_ms"][q].as_f64().is_some_and(|v| v > 0.0), "{q}: {}", j["latency_ms"]);
    }
    assert_eq!(j["corrected_for_coordinated_omission"], json!(false));
    // The generator reports its own CPU per event (getrusage), a small
    // positive figure: what each event cost the load generator.
    let own = j["generator_cpu_us_per_event"].as_f64().unwrap_or(-1.0);
    assert!(own > 0.0 && own < 100_000.0, "generator CPU per event: {}", j["generator_cpu_us_per_event"]);
    // Fixed rate for a duration.
    let r =
        tally(&addr, &["--json", "bench", "--rate", "400", "--duration", "2s", "--ids", "20", "--out", out_arg], None)
            .await?;
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let j = r.json()?;
    assert_eq!(j["corrected_for_coordinated_omission"], json!(true));
    assert_eq!(j["verify"]["ok"], json!(true));
    let sent = j["sent"].as_u64().unwrap_or(0);
    assert!((600..=1000).contains(&sent), "about 800 events at 400/s for 2 s: {sent}");

    // cluster transfer-leader: move partition 0's leadership to a replica
    // that is neither its leader nor its preferred leader (the first
    // replica), so that rebalance has something to move back.
    let s = tally(&addr, &["--json", "cluster", "status"], None).await?.json()?;
    let p0 = &s["partitions"][0];
    let replicas: Vec<u64> = p0["replicas"].as_array().into_iter().flatten().filter_map(|r| r.as_u64()).collect();
    let (leader, preferred) = (p0["leader"].as_u64().unwrap_or(0), replicas[0]);
    let target = *replicas.iter().find(|&&r| r != leader && r != preferred).expect("3 replicas");
    let target_arg = target.to_string();
    let r = tally(&addr, &["--json", "cluster", "transfer-leader", "0", &target_arg], None).await?;
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert_eq!(r.json()?, json!({"partition": 0, "requested": target, "leader": target, "moved": true}));
    let s = status_until(&addr, |s| s["partitions"][0]["leader"] == json!(target)).await?;
    assert_eq!(s["partitions"][0]["leader"], json!(target), "status after transfer-leader: {}", s["partitions"][0]);
    // Asking again is a no-op that still succeeds.
    let r = tally(&addr, &["--json", "cluster", "transfer-leader", "0", &target_arg], None).await?;
    assert_eq!((r.code, r.json()?["leader"].clone()), (0, json!(target)), "{}", r.stderr);
    // Errors: not a replica, no such partition, with context and status 1.
    let r = tally(&addr, &["--json", "cluster", "transfer-leader", "0", "99"], None).await?;
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.is_empty(), "no JSON on failure: {}", r.stdout);
    assert!(
        r.stderr.contains("moving the leadership of partition 0 to node 99") && r.stderr.contains("InvalidArgument"),
        "{}",
        r.stderr
    );
    let r = tally(&addr, &["cluster", "transfer-leader", "999", &target_arg], None).await?;
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("partition 999") && r.stderr.contains("InvalidArgument"), "{}", r.stderr);

    // cluster rebalance: every partition back on its preferred leader.
    let r = tally(&addr, &["--json", "cluster", "rebalance"], None).await?;
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let j = r.json()?;
    assert_eq!(j.as_object().map(|o| o.len()), Some(3), "{j}");
    assert!(j["moved"].as_u64().is_some_and(|m| m >= 1), "partition 0 at least: {j}");
    assert_eq!(j["failed"], json!(0));
    let on_preferred = |s: &serde_json::Value| {
        s["partitions"].as_array().is_some_and(|ps| ps.iter().all(|p| p["leader"] == p["replicas"][0]))
    };
    let s = status_until(&addr, on_preferred).await?;
    assert!(on_preferred(&s), "every partition led by its first replica: {}", s["partitions"]);
    let leads: Vec<u64> = s["nodes"].as_array().into_iter().flatten().filter_map(|n| n["leads"].as_u64()).collect();
    assert_eq!(leads.iter().sum::<u64>(), 8, "{leads:?}");
    // Balanced already: nothing to move.
    let j = tally(&addr, &["--json", "cluster", "rebalance"], None).await?.json()?;
    assert_eq!(j, json!({"moved": 0, "failed": 0, "skipped": []}));
    // The readable forms.
    let r = tally(&addr, &["cluster", "transfer-leader", "0", &target_arg], None).await?;
    assert_eq!(r.stdout.trim(), format!("partition 0: node {target} leads"), "{}", r.stderr);
    let r = tally(&addr, &["cluster", "rebalance"], None).await?;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.starts_with("leadership moved for 1 partitions"), "{}", r.stdout);
    Ok(())
}

fn sorted(v: &serde_json::Value) -> Vec<u64> {
    let mut v: Vec<u64> = v.as_array().into_iter().flatten().filter_map(|x| x.as_u64()).collect();
    v.sort_unstable();
    v
}

/// `cluster status --json` once `done` holds, or the last one after 10 s.
async fn status_until(addr: &str, done: impl Fn(&serde_json::Value) -> bool) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = tally(addr, &["--json", "cluster", "status"], None).await?.json()?;
        if done(&s) || Instant::now() > deadline {
            return Ok(s);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
