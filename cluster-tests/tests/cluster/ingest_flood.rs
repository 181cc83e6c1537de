//! Ingest limits hold before a request body is read.
//!
//! * 200 concurrent 60 MiB Ingest requests against one node: each is refused
//!   RESOURCE_EXHAUSTED from its length prefix (the decode limit sits just
//!   above the 4 MiB batch limit), the node stays up with its peak RSS
//!   bounded, and a normal ingest works afterwards. Before the limits moved,
//!   every body was buffered whole (up to 64 MiB each) before any check.
//! * Admission comes before the body: with every ingest slot held by a
//!   request whose body never finishes, further requests — whose bodies
//!   never even start — are answered RESOURCE_EXHAUSTED after the admission
//!   wait, instead of hanging in decode.
//!
//! * The dedup index's memory bound: with `--dedup-memory-mib 1` (~45,000
//!   keys per node) and a 3 s window, distinct events beyond the bound are
//!   refused — RESOURCE_EXHAUSTED when nothing of a request could be taken,
//!   retryable rejections naming the bound otherwise — never counted, never
//!   dropped from the index early; every accepted event is counted exactly
//!   once, and once the window passes the same events are accepted.
//!
//! Requests are sent raw (a 5-byte gRPC frame header, then the body) over a
//! tonic channel: one shared 60 MiB buffer serves every request, and bodies
//! can stall, which a generated client cannot do.

use std::time::{Duration, Instant};

use bytes::Bytes;
use cluster_tests::raw::{frame_header, raw_ingest};
use cluster_tests::{ClusterOptions, TestCluster};
use futures::StreamExt;
use http_body::Frame;
use http_body_util::{Full, StreamBody};
use tally_proto::v1::{Event, IngestRequest};
use tonic::transport::Channel;
use tonic::Code;

const FLOOD_REQUESTS: usize = 200;
const FLOOD_BODY_BYTES: usize = 60 << 20;
const RSS_LIMIT_KIB: u64 = 1 << 20; // 1 GiB
/// `MAX_CONCURRENT_REQUESTS` of server/src/api/admission.rs.
const INGEST_SLOTS: usize = 256;
const SURPLUS: usize = 20;

async fn channels(cluster: &TestCluster, n: usize) -> anyhow::Result<Vec<Channel>> {
    let mut out = Vec::new();
    for _ in 0..n {
        // Separate connections: the flood does not share one HTTP/2 window.
        out.push(tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.addr(1)?))?.connect().await?);
    }
    Ok(out)
}

async fn ingest_works(cluster: &TestCluster, tag: &str) -> anyhow::Result<()> {
    let now = tally_client::time_arg::now_ms();
    let events = (0..100)
        .map(|i| Event {
            actor_id: Vec::new(),
            entity_id: format!("video-{i}").into_bytes(),
            event_type: "view".into(),
            event_time_ms: now,
            event_id: format!("{tag}-{i}").into_bytes(),
            value: None,
        })
        .collect();
    let resp = cluster.ingest_client(1).await?.ingest(IngestRequest { events }).await?.into_inner();
    anyhow::ensure!(resp.accepted == 100, "normal ingest after {tag}: {resp:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_stalled_ingest_is_refused_before_its_body() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::exclusive().await;
    let cluster = TestCluster::start(ClusterOptions { nodes: 3, partitions: 8, args: vec![] }).await?;
    let pid = cluster.pid(1)?;
    ingest_works(&cluster, "before").await?;
    let rss_before = cluster_tests::peak_rss_kib(pid)?;

    // 200 × 60 MiB, all at once, over 4 connections; one shared buffer.
    let mut body = Vec::with_capacity(FLOOD_BODY_BYTES + 5);
    body.extend_from_slice(&frame_header(FLOOD_BODY_BYTES));
    body.resize(FLOOD_BODY_BYTES + 5, 0x0a);
    let body = Bytes::from(body);
    let conns = channels(&cluster, 4).await?;
    let started = Instant::now();
    let answers = futures::future::join_all((0..FLOOD_REQUESTS).map(|i| {
        let (channel, body) = (conns[i % conns.len()].clone(), body.clone());
        async move { raw_ingest(channel, tonic::body::Body::new(Full::new(body))).await }
    }))
    .await;
    let took = started.elapsed();
    let rss_after = cluster_tests::peak_rss_kib(pid)?;
    println!(
        "flood: {FLOOD_REQUESTS} × {} MiB in {took:?}; tallyd peak RSS {} MiB before, {} MiB after",
        FLOOD_BODY_BYTES >> 20,
        rss_before / 1024,
        rss_after / 1024
    );
    let mut refused = 0;
    for (i, answer) in answers.iter().enumerate() {
        match answer {
            Ok(s) if s.code() == Code::ResourceExhausted => {
                assert!(
                    s.message().contains("/tally.v1.Ingest/Ingest") && s.message().contains("limit"),
                    "request {i}: {}",
                    s.message()
                );
                refused += 1;
            }
            other => panic!("request {i}: expected RESOURCE_EXHAUSTED, got {other:?}"),
        }
    }
    assert_eq!(refused, FLOOD_REQUESTS);
    if let Some(Ok(s)) = answers.first() {
        println!("flood: every answer RESOURCE_EXHAUSTED, e.g. {:?}", s.message());
    }
    assert!(rss_after < RSS_LIMIT_KIB, "tallyd peak RSS {} MiB under the flood", rss_after / 1024);
    assert!(cluster.is_running(1) && std::path::Path::new(&format!("/proc/{pid}")).exists(), "node 1 died");
    ingest_works(&cluster, "after-flood").await?;

    // Every slot held by a body that never finishes (a header promising 1 KiB,
    // 10 bytes of it, then silence), plus SURPLUS more.
    let conns = channels(&cluster, 2).await?;
    let mut stalled = Vec::new();
    let mut finished = Vec::new();
    for i in 0..INGEST_SLOTS + SURPLUS {
        let channel = conns[i % conns.len()].clone();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        finished.push(rx);
        stalled.push(tokio::spawn(async move {
            let mut first = frame_header(1024).to_vec();
            first.extend_from_slice(&[0u8; 10]);
            let frames = futures::stream::iter([Ok::<_, std::io::Error>(Frame::data(Bytes::from(first)))])
                .chain(futures::stream::pending());
            let answer = raw_ingest(channel, tonic::body::Body::new(StreamBody::new(frames))).await;
            let _ = tx.send(answer);
        }));
    }
    // The surplus wait out the admission wait (2 s), then are refused.
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut busy = 0;
    for rx in &mut finished {
        if let Ok(answer) = rx.try_recv() {
            match answer {
                Ok(s) if s.code() == Code::ResourceExhausted && s.message().contains("node busy") => busy += 1,
                other => panic!("a stalled request was answered with {other:?}"),
            }
        }
    }
    // A request whose body never starts gets the same answer, unread.
    let probe = raw_ingest(
        conns[0].clone(),
        tonic::body::Body::new(StreamBody::new(futures::stream::pending::<Result<Frame<Bytes>, std::io::Error>>())),
    );
    let probe =
        tokio::time::timeout(Duration::from_secs(10), probe).await.map_err(|_| anyhow::anyhow!("the probe hung"))??;
    println!(
        "admission: {busy} of {} stalled requests refused after {:?}; probe: {:?} {}",
        INGEST_SLOTS + SURPLUS,
        started.elapsed(),
        probe.code(),
        probe.message()
    );
    assert_eq!(busy, SURPLUS, "exactly the requests beyond the {INGEST_SLOTS} slots are refused");
    assert_eq!(probe.code(), Code::ResourceExhausted, "{}", probe.message());
    assert!(probe.message().contains("node busy"), "{}", probe.message());

    // Letting go of the stalled requests frees the slots.
    for task in &stalled {
        task.abort();
    }
    drop(conns);
    let deadline = Instant::now() + Duration::from_secs(20);
    for attempt in 0.. {
        match ingest_works(&cluster, &format!("after-stall-{attempt}")).await {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => {
                eprintln!("not yet: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
    assert!(cluster_tests::peak_rss_kib(pid)? < RSS_LIMIT_KIB);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_dedup_index_refuses_new_events_until_keys_expire() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::exclusive().await;
    let cluster = TestCluster::start(ClusterOptions {
        nodes: 3,
        partitions: 4,
        args: vec!["--dedup-memory-mib".into(), "1".into(), "--dedup-window-secs".into(), "3".into()],
    })
    .await?;
    let now = tally_client::time_arg::now_ms();
    let batch = |r: u32| -> Vec<Event> {
        (0..5_000u32)
            .map(|i| Event {
                actor_id: Vec::new(),
                entity_id: format!("v{}", i % 50).into_bytes(),
                event_type: "view".into(),
                event_time_ms: now,
                event_id: format!("r{r}-{i}").into_bytes(),
                value: None,
            })
            .collect()
    };
    // 20 × 5,000 distinct events against ~45,000 keys a node: the first
    // ones fit, then the bound is reached.
    let mut client = cluster.ingest_client(1).await?;
    let (mut accepted, mut refused_whole, mut refused_events) = (0u64, 0u32, 0usize);
    let mut refused_batches = Vec::new();
    for r in 0..20 {
        match client.ingest(IngestRequest { events: batch(r) }).await {
            Ok(resp) => {
                let resp = resp.into_inner();
                accepted += u64::from(resp.accepted);
                for rej in &resp.rejected {
                    assert!(rej.retryable && rej.reason.contains("dedup index is full"), "{rej:?}");
                }
                refused_events += resp.rejected.len();
                if !resp.rejected.is_empty() {
                    refused_batches.push(r);
                }
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                let hint = status.metadata().get(tally_proto::RETRY_AFTER_MS).and_then(|v| v.to_str().ok());
                assert_eq!(hint, Some("1000"), "shed load says when to retry: {status:?}");
                assert!(
                    status.message().contains("--dedup-memory-mib") && status.message().contains("retry"),
                    "{}",
                    status.message()
                );
                refused_whole += 1;
                refused_batches.push(r);
            }
        }
    }
    assert!((30_000..100_000).contains(&accepted), "accepted {accepted}");
    assert!(refused_whole > 0 || refused_events > 0, "nothing refused");
    let total =
        async || cluster.total_count(1, (0..50).map(|e| format!("v{e}")), "view", now - 60_000, now + 60_000).await;
    assert_eq!(total().await?, accepted, "exactly the accepted events are counted");
    let status = cluster.status(1).await?;
    assert!(status.dedup_keys <= (1 << 20) / 23 + 5_000, "{} keys held", status.dedup_keys);

    // The window passes: keys leave, and the refused events go in on retry.
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Expiry moves with the log: one small write per partition moves it.
    for _ in 0..3 {
        let _ = client
            .ingest(IngestRequest {
                events: (0..50)
                    .map(|e| Event {
                        actor_id: Vec::new(),
                        entity_id: format!("v{e}").into_bytes(),
                        event_type: "tick".into(),
                        event_time_ms: now,
                        event_id: Vec::new(),
                        value: None,
                    })
                    .collect(),
            })
            .await?;
    }
    let r = refused_batches[refused_batches.len() - 1];
    let resp = client.ingest(IngestRequest { events: batch(r) }).await?.into_inner();
    assert!(resp.rejected.is_empty(), "{:?}", resp.rejected.first());
    let retried = u64::from(resp.accepted);
    assert!(retried > 0 && retried + u64::from(resp.duplicates) == 5_000, "{resp:?}");
    assert_eq!(total().await?, accepted + retried);
    Ok(())
}
