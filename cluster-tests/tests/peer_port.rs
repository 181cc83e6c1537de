//! Peer traffic has its own port, and that port trusts nothing it receives.
//!
//! * The public port does not serve the internal Raft service (UNIMPLEMENTED
//!   for every method, and reflection does not list it); the peer port does
//!   not serve the public services.
//! * Each node knows every node's peer address, learnt at initialisation
//!   from the nodes themselves (the harness gives public addresses only).
//! * Crafted peer RPCs from a process that is not a member — proposals with
//!   an invalid event, an event of another partition, too many events, a
//!   partition that does not exist; AppendEntries and Vote with a payload
//!   that does not decode, or for a group that does not exist — are refused
//!   with the code that says why, nothing is counted, and the cluster keeps
//!   working.

use std::time::Duration;

use cluster_tests::{ClusterOptions, TestCluster};
use tally_proto::internal::raft_client::RaftClient;
use tally_proto::internal::{PingRequest, ProposeRequest, RaftMessage, SnapshotChunk};
use tally_proto::partition::{group_of_partition, partition_of};
use tally_proto::v1::ingest_client::IngestClient;
use tally_proto::v1::{Event, IngestRequest, StatsRequest};
use tonic::transport::Channel;
use tonic::Code;

const PARTITIONS: u32 = 8;

fn event(entity: &str, event_type: &str, time: i64, id: &str) -> Event {
    Event { entity_id: entity.as_bytes().to_vec(), event_type: event_type.into(), event_time_ms: time, event_id: id.as_bytes().to_vec(), value: None }
}

/// An entity of `partition`, and one of another partition.
fn entity_in(partition: u32) -> String {
    (0..).map(|i| format!("video-{i}")).find(|e| partition_of(e.as_bytes(), PARTITIONS) == partition).unwrap_or_default()
}

async fn connect(addr: &str) -> anyhow::Result<Channel> {
    Ok(tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?)
}

async fn count(cluster: &TestCluster, entity: &str, now: i64) -> anyhow::Result<u64> {
    let req = StatsRequest { entity_id: entity.into(), event_type: "view".into(), from_ms: now - 3_600_000, to_ms: now + 60_000, consistency: 0 };
    Ok(cluster.query_client(2).await?.stats(req).await?.into_inner().count)
}

fn expect_code<T: std::fmt::Debug>(what: &str, result: Result<T, tonic::Status>, code: Code, says: &str) -> anyhow::Result<()> {
    match result {
        Ok(v) => anyhow::bail!("{what}: expected {code:?}, got an answer: {v:?}"),
        Err(s) => {
            anyhow::ensure!(s.code() == code, "{what}: expected {code:?}, got {:?}: {}", s.code(), s.message());
            anyhow::ensure!(s.message().contains(says), "{what}: the message should say {says:?}: {}", s.message());
            eprintln!("{what}: {:?} {}", s.code(), s.message());
            Ok(())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_traffic_is_on_its_own_port_and_checked() -> anyhow::Result<()> {
    let cluster = TestCluster::start(ClusterOptions { nodes: 3, partitions: PARTITIONS, args: vec![] }).await?;
    let now = tally_client::time_arg::now_ms();

    // Every node reports every node's two addresses.
    for id in cluster.node_ids() {
        let status = cluster.status(id).await?;
        for n in &status.nodes {
            assert_eq!(n.addr, cluster.addr(n.node_id)?, "node {id}'s view of node {}", n.node_id);
            assert_eq!(n.peer_addr, cluster.peer_addr(n.node_id)?, "node {id}'s view of node {}", n.node_id);
        }
        assert_eq!(status.nodes.len(), 3);
    }

    // Some counts to watch.
    let target = entity_in(0);
    let other = entity_in(1);
    let resp = cluster
        .ingest_client(1)
        .await?
        .ingest(IngestRequest { events: (0..10).map(|i| event(&target, "view", now, &format!("base-{i}"))).collect() })
        .await?
        .into_inner();
    assert_eq!(resp.accepted, 10, "{resp:?}");
    assert_eq!((count(&cluster, &target, now).await?, count(&cluster, &other, now).await?), (10, 0));

    // (a) The public port has no Raft service.
    let mut public = RaftClient::new(cluster.channel(1).await?);
    let group = RaftMessage { group_id: group_of_partition(0), payload: vec![1, 2, 3], quiesce: false };
    expect_code("public AppendEntries", public.append_entries(group.clone()).await, Code::Unimplemented, "")?;
    expect_code("public Vote", public.vote(group.clone()).await, Code::Unimplemented, "")?;
    expect_code("public PreVote", public.pre_vote(group.clone()).await, Code::Unimplemented, "")?;
    expect_code("public TransferLeader", public.transfer_leader(group.clone()).await, Code::Unimplemented, "")?;
    expect_code("public Ping", public.ping(PingRequest { from_node_id: 9, boot_id: 1 }).await, Code::Unimplemented, "")?;
    let propose = ProposeRequest { partition: 0, events: vec![event(&target, "view", now, "via-public")] };
    expect_code("public Propose", public.propose(propose).await, Code::Unimplemented, "")?;
    let chunk = SnapshotChunk { group_id: group_of_partition(0), header: vec![0xff; 8], data: vec![] };
    expect_code("public InstallSnapshot", public.install_snapshot(futures::stream::iter([chunk])).await, Code::Unimplemented, "")?;
    // ... and the peer port no public service.
    let peer_channel = connect(&cluster.peer_addr(1)?).await?;
    let peer_ingest = IngestClient::new(peer_channel.clone())
        .ingest(IngestRequest { events: vec![event(&target, "view", now, "via-peer-port")] })
        .await;
    expect_code("Ingest on the peer port", peer_ingest, Code::Unimplemented, "")?;

    // (b) Crafted peer RPCs from a non-member, to the peer port of the
    // partition's leader and of a follower: refused, with the reason.
    for id in cluster.node_ids() {
        let mut peer = RaftClient::new(connect(&cluster.peer_addr(id)?).await?).max_encoding_message_size(64 << 20);
        let at = |what: &str| format!("node {id}: {what}");
        // The Ping answers: the peer port is up and serving.
        let pong = peer.ping(PingRequest { from_node_id: 99, boot_id: 1 }).await?.into_inner();
        assert_eq!(pong.node_id, id);

        let bad = ProposeRequest { partition: 0, events: vec![event(&target, "view", now, "ok"), event(&target, "Not Valid", now, "bad")] };
        expect_code(&at("Propose with an invalid event"), peer.propose(bad).await, Code::InvalidArgument, "events[1].event_type")?;
        let foreign = ProposeRequest { partition: 0, events: vec![event(&target, "view", now, "mine"), event(&other, "view", now, "foreign")] };
        expect_code(&at("Propose with another partition's event"), peer.propose(foreign).await, Code::InvalidArgument, "belongs to partition 1")?;
        let many = ProposeRequest { partition: 0, events: (0..10_001).map(|i| event(&target, "view", now, &format!("many-{i}"))).collect() };
        expect_code(&at("Propose with too many events"), peer.propose(many).await, Code::ResourceExhausted, "10000")?;
        let big = ProposeRequest {
            partition: 0,
            events: (0..9_000).map(|i| event(&target, "view", now, &format!("{i:0>500}"))).collect(),
        };
        expect_code(&at("Propose over 4 MiB"), peer.propose(big).await, Code::ResourceExhausted, "bytes")?;
        let nowhere = ProposeRequest { partition: PARTITIONS + 5, events: vec![event(&target, "view", now, "nowhere")] };
        expect_code(&at("Propose to a partition that does not exist"), peer.propose(nowhere).await, Code::InvalidArgument, "does not exist")?;

        for g in [0, group_of_partition(0), group_of_partition(PARTITIONS - 1)] {
            let garbage = RaftMessage { group_id: g, payload: vec![0xff; 64], quiesce: false };
            expect_code(&at(&format!("AppendEntries garbage, group {g}")), peer.append_entries(garbage.clone()).await, Code::InvalidArgument, "undecodable")?;
            expect_code(&at(&format!("Vote garbage, group {g}")), peer.vote(garbage.clone()).await, Code::InvalidArgument, "undecodable")?;
            expect_code(&at(&format!("PreVote garbage, group {g}")), peer.pre_vote(garbage).await, Code::InvalidArgument, "undecodable")?;
        }
        let missing = RaftMessage { group_id: 10_000, payload: vec![0xff; 64], quiesce: false };
        expect_code(&at("AppendEntries for a group that does not exist"), peer.append_entries(missing.clone()).await, Code::NotFound, "no partition")?;
        expect_code(&at("Vote for a group that does not exist"), peer.vote(missing).await, Code::NotFound, "no partition")?;
        let chunk = SnapshotChunk { group_id: group_of_partition(0), header: vec![0xff; 8], data: vec![1; 16] };
        let snapshot = peer.install_snapshot(futures::stream::iter([chunk])).await;
        match &snapshot {
            // A replica of partition 0 decodes the header; a node without one has no such group open.
            Err(s) if s.code() == Code::InvalidArgument || s.code() == Code::Unavailable => {}
            other => anyhow::bail!("{}: garbage snapshot: {other:?}", at("InstallSnapshot")),
        }
    }

    // Nothing was counted, and the cluster still counts.
    assert_eq!((count(&cluster, &target, now).await?, count(&cluster, &other, now).await?), (10, 0));
    cluster.wait_ready(Duration::from_secs(10)).await?;
    for via in cluster.node_ids() {
        let resp = cluster
            .ingest_client(via)
            .await?
            .ingest(IngestRequest {
                events: vec![event(&target, "view", now, &format!("after-{via}")), event(&other, "view", now, &format!("after-{via}"))],
            })
            .await?
            .into_inner();
        assert_eq!(resp.accepted, 2, "through node {via}: {resp:?}");
    }
    assert_eq!((count(&cluster, &target, now).await?, count(&cluster, &other, now).await?), (13, 3));
    assert!(cluster.assert_replicas_identical(Duration::from_secs(30)).await? >= (PARTITIONS * 3) as usize);
    Ok(())
}
