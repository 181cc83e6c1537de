//! TLS on real nodes (`tallyd --tls-cert --tls-key --peer-ca
//! --tls-client-ca`, certificates from `scripts/make-certs.sh`): a
//! plaintext client, a TLS client without a certificate and one with a
//! certificate from another CA are all refused on the public port; on the
//! peer port a certificate from another CA is refused where the node's own
//! is accepted; and with TLS on, a leader killed with -9 under load and
//! restarted loses and doubles nothing (every batch retried with the same
//! ids until acknowledged; counts exact, replicas identical).

use std::path::{Path, PathBuf};
use std::time::Duration;

use cluster_tests::{ClusterOptions, TestCluster};
use tally_client::TlsFiles;
use tally_proto::v1::{Event, IngestRequest, StatusRequest};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const BATCHES: u32 = 30;
const BATCH: u32 = 100;
const ENTITIES: u32 = 10;

fn make_certs(dir: &Path) -> anyhow::Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/make-certs.sh");
    let out = std::process::Command::new(script).arg(dir).output()?;
    anyhow::ensure!(out.status.success(), "make-certs.sh: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

fn pem(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

async fn health(addr: &str, tls: Option<&TlsFiles>) -> anyhow::Result<()> {
    let channel = tally_client::connect_secure(addr, None, tls).await?;
    let mut client = HealthClient::new(channel);
    let check = client.check(HealthCheckRequest { service: String::new() });
    tokio::time::timeout(Duration::from_secs(5), check).await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_both_ports_refuses_strangers_and_survives_a_kill() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::exclusive().await;
    let dir = tempfile::tempdir()?;
    let (ours, theirs) = (dir.path().join("cluster"), dir.path().join("stranger"));
    make_certs(&ours)?;
    make_certs(&theirs)?;
    let path = |p: PathBuf| p.display().to_string();
    let args = vec![
        "--tls-cert".into(),
        path(pem(&ours, "node.pem")),
        "--tls-key".into(),
        path(pem(&ours, "node.key")),
        "--peer-ca".into(),
        path(pem(&ours, "ca.pem")),
        "--tls-client-ca".into(),
        path(pem(&ours, "ca.pem")),
    ];
    let mut cluster = TestCluster::start(ClusterOptions { nodes: 3, partitions: 8, args }).await?;
    let addr = cluster.addr(1)?;
    let peer = cluster.peer_addr(1)?;
    let ca = || pem(&ours, "ca.pem");
    let node_cert = TlsFiles::read(&ca(), Some(&pem(&ours, "node.pem")), Some(&pem(&ours, "node.key")))?;
    let no_cert = TlsFiles::read(&ca(), None, None)?;
    let stranger = TlsFiles::read(&ca(), Some(&pem(&theirs, "node.pem")), Some(&pem(&theirs, "node.key")))?;

    // The public port: only TLS, only with a certificate from the cluster's CA.
    assert!(health(&addr, None).await.is_err(), "plaintext accepted on the public port");
    assert!(health(&addr, Some(&no_cert)).await.is_err(), "no client certificate accepted");
    assert!(health(&addr, Some(&stranger)).await.is_err(), "a certificate from another CA accepted");
    health(&addr, Some(&node_cert)).await?;
    // A client that does not trust the cluster's CA refuses the node.
    let wrong_trust =
        TlsFiles::read(&pem(&theirs, "ca.pem"), Some(&pem(&theirs, "node.pem")), Some(&pem(&theirs, "node.key")))?;
    assert!(health(&addr, Some(&wrong_trust)).await.is_err(), "a node not signed by the trusted CA was believed");

    // The peer port: a stranger cannot even open a connection to speak Raft.
    assert!(health(&peer, None).await.is_err(), "plaintext accepted on the peer port");
    assert!(health(&peer, Some(&no_cert)).await.is_err(), "a peer without a certificate accepted");
    assert!(health(&peer, Some(&stranger)).await.is_err(), "a peer with another CA's certificate accepted");
    health(&peer, Some(&node_cert)).await?;

    // With TLS on: batches retried with the same ids until acknowledged,
    // the busiest leader killed with -9 a third of the way, restarted at
    // two thirds.
    let now = tally_client::time_arg::now_ms();
    for b in 0..BATCHES {
        if b == BATCHES / 3 {
            let victim = cluster.busiest_leader().await?;
            cluster.kill9(victim)?;
        }
        if b == 2 * BATCHES / 3 {
            for id in cluster.node_ids() {
                if !cluster.is_running(id) {
                    cluster.restart(id).await?;
                }
            }
        }
        let events: Vec<Event> = (0..BATCH)
            .map(|i| Event {
                actor_id: Vec::new(),
                entity_id: format!("video-tls-{}", i % ENTITIES).into_bytes(),
                event_type: "view".into(),
                event_time_ms: now,
                event_id: format!("tls-{b}-{i}").into_bytes(),
                value: None,
            })
            .collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut attempt = 0u64;
        loop {
            let live = cluster.live_node_ids();
            let via = live[(attempt as usize) % live.len()];
            attempt += 1;
            let answer = async {
                cluster
                    .ingest_client(via)
                    .await?
                    .ingest(IngestRequest { events: events.clone() })
                    .await
                    .map_err(anyhow::Error::from)
            };
            match answer.await {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    if reply.rejected.is_empty() && reply.accepted + reply.duplicates == BATCH {
                        break;
                    }
                }
                Err(_) if tokio::time::Instant::now() < deadline => {}
                Err(e) => return Err(e.context(format!("batch {b} never acknowledged"))),
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "batch {b} never fully acknowledged");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    cluster.wait_ready(Duration::from_secs(60)).await?;
    let entities = (0..ENTITIES).map(|e| format!("video-tls-{e}"));
    let total = cluster.total_count(1, entities, "view", 0, now + 120_000).await?;
    assert_eq!(total, u64::from(BATCHES * BATCH), "every acknowledged event counted exactly once");
    assert_eq!(cluster.dedup_conflicts().await?, 0);
    cluster.assert_replicas_identical(Duration::from_secs(60)).await?;
    let status = cluster.cluster_client(2).await?.status(StatusRequest {}).await?.into_inner();
    assert_eq!(status.nodes.len(), 3);
    Ok(())
}
