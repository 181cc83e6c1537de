//! The live dashboard (`GET /` on the HTTP port) in a real browser: Debian's
//! Chromium, headless, loads the page from a 3-node cluster with a query in
//! its address; the test reads the rendered DOM until it shows every node
//! up, a leader on every partition and the series just ingested (and the
//! same count from Stats), then kills a node and waits for the page to show
//! it down. A screenshot is saved under the test's temp dir (its path is
//! printed). The JSON routes refuse bad queries with a message naming the
//! field. Without Chromium (`scripts/setup.sh` installs it) the browser
//! part says it skipped.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cluster_tests::{ClusterOptions, TestCluster};
use tally_proto::v1::{Event, IngestRequest};

const PARTITIONS: u32 = 16;

fn chromium() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("TALLY_CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    ["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Headless Chromium against a closed network: no background requests, a
/// fresh profile, virtual time so the page's polls and queries run.
fn headless(browser: &PathBuf, profile: &std::path::Path, extra: &[String], url: &str) -> anyhow::Result<String> {
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1280,1000",
            "--virtual-time-budget=4000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .output()
        .context("starting chromium")?;
    if !out.status.success() {
        bail!("chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The value of `data-NAME="…"` on the page's body, if set.
fn body_data(dom: &str, name: &str) -> Option<String> {
    let body = &dom[dom.find("<body")?..];
    let tag = &body[..body.find('>')?];
    let start = tag.find(&format!("data-{name}=\""))? + name.len() + 7;
    Some(tag[start..start + tag[start..].find('"')?].to_string())
}

/// Loads the page until `ready` holds for its DOM (the cluster's state
/// takes a poll or two to show), or gives up after `timeout`.
fn dom_until(
    browser: &PathBuf,
    profile: &std::path::Path,
    url: &str,
    timeout: Duration,
    ready: impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let dom = headless(browser, profile, &["--dump-dom".to_string()], url)?;
        if ready(&dom) {
            return Ok(dom);
        }
        if Instant::now() > deadline {
            bail!("the page never got there; last DOM:\n{dom}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_cluster_and_a_series_in_a_browser() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::shared().await;
    let mut cluster = TestCluster::start(ClusterOptions { nodes: 3, partitions: PARTITIONS, args: Vec::new() }).await?;

    // The page's JSON refuses bad queries with a message naming what was wrong.
    for (path, names) in [
        ("/api/stats?entity=v&type=view&from=0", "to"),
        ("/api/series?entity=v&type=view&from=0&to=1&granularity=week", "granularity"),
        ("/api/stats?entity=v&type=view&from=0&to=1&consistency=eventual", "consistency"),
        ("/api/stats?entity=&type=view&from=0&to=1", "entity"),
    ] {
        let (status, body) = cluster.http_get(1, path).await?;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body.contains(names), "{path}: the error names {names}: {body}");
    }
    let (status, body) = cluster.http_get(1, "/api/cluster").await?;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"partition_count\":16"), "{body}");

    let Some(browser) = chromium() else {
        eprintln!("SKIPPED dashboard browser test: no chromium (scripts/setup.sh installs Debian's chromium)");
        return Ok(());
    };

    // 17 views of one entity over the last few minutes.
    let now = tally_client::time_arg::now_ms();
    let events: Vec<Event> = (0..17)
        .map(|i| Event {
            actor_id: Vec::new(),
            entity_id: b"video-dash".to_vec(),
            event_type: "view".into(),
            event_time_ms: now - (i % 4) * 60_000,
            event_id: format!("dash-{i}").into_bytes(),
            value: None,
        })
        .collect();
    let reply = cluster.ingest_client(2).await?.ingest(IngestRequest { events }).await?.into_inner();
    assert_eq!(reply.accepted, 17, "{reply:?}");

    let dir = tempfile::Builder::new().prefix("tally-dashboard-").tempdir()?.keep();
    let profile = dir.join("profile");
    let url = format!(
        "http://{}/?entity=video-dash&type=view&from=-1h&to=%2B1m&granularity=minute",
        cluster.nodes[0].http_addr
    );
    let browser_ = browser.clone();
    let (profile_, url_) = (profile.clone(), url.clone());
    let dom = tokio::task::spawn_blocking(move || {
        dom_until(&browser_, &profile_, &url_, Duration::from_secs(60), |dom| {
            body_data(dom, "nodes-up").as_deref() == Some("3")
                && body_data(dom, "leaderless").as_deref() == Some("0")
                && body_data(dom, "series-total").is_some()
        })
    })
    .await??;
    assert_eq!(body_data(&dom, "nodes").as_deref(), Some("3"));
    assert_eq!(body_data(&dom, "series-total").as_deref(), Some("17"), "series total in the page");
    assert_eq!(body_data(&dom, "stats-count").as_deref(), Some("17"), "Stats count in the page");
    assert!(dom.contains("3/3 nodes up"), "the header shows the live node count");
    assert_eq!(dom.matches("class=\"cell").count() as u32, PARTITIONS + 3, "a cell per partition, a badge per node");
    for node in 1..=3 {
        assert!(dom.contains(&format!("data-leader=\"{node}\"")), "node {node} leads some partition in the page");
    }
    // The chart has one bar per minute bucket of the range, and the bars add up.
    let bars: Vec<u64> =
        dom.split("data-count=\"").skip(1).filter_map(|s| s.split('"').next().and_then(|n| n.parse().ok())).collect();
    assert!(bars.len() >= 60, "one bar per minute of the hour: {}", bars.len());
    assert_eq!(bars.iter().sum::<u64>(), 17, "the bars add up to the events sent");

    let screenshot = dir.join("dashboard.png");
    let shot = format!("--screenshot={}", screenshot.display());
    let (browser_, profile_, url_) = (browser.clone(), profile.clone(), url.clone());
    tokio::task::spawn_blocking(move || headless(&browser_, &profile_, &[shot], &url_)).await??;
    anyhow::ensure!(std::fs::metadata(&screenshot)?.len() > 10_000, "the screenshot is empty");
    eprintln!("dashboard screenshot: {}", screenshot.display());

    // A dead node shows as down.
    cluster.kill9(3)?;
    let dom = tokio::task::spawn_blocking(move || {
        dom_until(&browser, &profile, &url, Duration::from_secs(30), |dom| {
            body_data(dom, "nodes-up").as_deref() == Some("2")
        })
    })
    .await??;
    assert!(dom.contains("2/3 nodes up"), "the header shows the node down");
    assert!(dom.contains("class=\"down\""), "the node's row says down");
    Ok(())
}
