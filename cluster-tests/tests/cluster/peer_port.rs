//! Peer traffic has its own port, and that port trusts nothing it receives.
//!
//! * The public port does not serve the internal Raft service (UNIMPLEMENTED
//!   for every method, and reflection does not list it); the peer port does
//!   not serve the public services.
//! * Each node knows every node's peer address, learnt at initialisation
//!   from the nodes themselves (the harness gives public addresses only).
//! * Crafted peer RPCs from a process that is not a member — proposals with
//!   an invalid event, an event of another partition, too many events, a
//!   partition that does not exist; AppendEntries and Vote calls (on a
//!   peer conversation) with a payload that does not decode, of an unknown
//!   kind, or for a group that does not exist — are refused with the code
//!   that says why, each call on its own, nothing is counted, and the
//!   cluster keeps working.

use std::time::Duration;

use cluster_tests::model::event;
use cluster_tests::{ClusterOptions, TestCluster};
use tally_proto::internal::raft_client::RaftClient;
use tally_proto::internal::{
    PeerCall, PeerFrame, PingRequest, ProposeRequest, RaftCallKind, RaftMessage, SnapshotChunk,
};
use tally_proto::partition::{group_of_partition, partition_of};
use tally_proto::v1::ingest_client::IngestClient;
use tally_proto::v1::{DeadLetter, IngestRequest, RejectionCode, StatsRequest};
use tonic::transport::Channel;
use tonic::Code;

const PARTITIONS: u32 = 8;

/// An entity of `partition`, and one of another partition.
fn entity_in(partition: u32) -> String {
    (0..)
        .map(|i| format!("video-{i}"))
        .find(|e| partition_of(e.as_bytes(), PARTITIONS) == partition)
        .unwrap_or_default()
}

async fn connect(addr: &str) -> anyhow::Result<Channel> {
    Ok(tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?)
}

async fn count(cluster: &TestCluster, entity: &str, now: i64) -> anyhow::Result<u64> {
    let req = StatsRequest {
        share_partition_plus_one: 0,
        entity_id: entity.into(),
        event_type: "view".into(),
        from_ms: now - 3_600_000,
        to_ms: now + 60_000,
        consistency: 0,
    };
    Ok(cluster.query_client(2).await?.stats(req).await?.into_inner().count)
}

fn expect_code<T: std::fmt::Debug>(
    what: &str,
    result: Result<T, tonic::Status>,
    code: Code,
    says: &str,
) -> anyhow::Result<()> {
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

/// Send `calls` as one frame of a fresh conversation; the code and error of
/// each reply, in the calls' order.
async fn converse(peer: &mut RaftClient<Channel>, calls: Vec<PeerCall>) -> anyhow::Result<Vec<tonic::Status>> {
    let ids: Vec<u64> = calls.iter().map(|c| c.id).collect();
    // The request stream ends after its one frame; replies still come.
    let mut replies = peer.converse(futures::stream::iter([PeerFrame { calls }])).await?.into_inner();
    let mut by_id = std::collections::HashMap::new();
    while by_id.len() < ids.len() {
        let frame = tokio::time::timeout(Duration::from_secs(10), replies.message())
            .await??
            .ok_or_else(|| anyhow::anyhow!("conversation ended with {} of {} replies", by_id.len(), ids.len()))?;
        for r in frame.replies {
            by_id.insert(r.id, tonic::Status::new(Code::from(r.code), r.error));
        }
    }
    Ok(ids.iter().filter_map(|id| by_id.remove(id)).collect())
}

fn call(id: u64, kind: RaftCallKind, message: &RaftMessage) -> PeerCall {
    PeerCall { id, kind: kind as i32, message: Some(message.clone()) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_traffic_is_on_its_own_port_and_checked() -> anyhow::Result<()> {
    let _turn = cluster_tests::serial::shared().await;
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
    let mut public = RaftClient::new(tally_client::connect(&cluster.addr(1)?).await?);
    let group = RaftMessage { group_id: group_of_partition(0), payload: vec![1, 2, 3], quiesce: false };
    let public_conversation = converse(&mut public, vec![call(1, RaftCallKind::AppendEntries, &group)]).await;
    match public_conversation {
        Err(e) => match e.downcast_ref::<tonic::Status>() {
            Some(s) if s.code() == Code::Unimplemented => {}
            _ => anyhow::bail!("public Converse: expected UNIMPLEMENTED, got {e}"),
        },
        Ok(replies) => anyhow::bail!("public Converse answered: {replies:?}"),
    }
    expect_code(
        "public Ping",
        public.ping(PingRequest { from_node_id: 9, boot_id: 1 }).await,
        Code::Unimplemented,
        "",
    )?;
    let propose = ProposeRequest {
        map_version: 0,
        partition: 0,
        events: vec![event(&target, "view", now, "via-public")],
        invalid: vec![],
    };
    expect_code("public Propose", public.propose(propose).await, Code::Unimplemented, "")?;
    let chunk = SnapshotChunk { group_id: group_of_partition(0), header: vec![0xff; 8], data: vec![] };
    expect_code(
        "public InstallSnapshot",
        public.install_snapshot(futures::stream::iter([chunk])).await,
        Code::Unimplemented,
        "",
    )?;
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

        let bad = ProposeRequest {
            map_version: 0,
            partition: 0,
            events: vec![event(&target, "view", now, "ok"), event(&target, "Not Valid", now, "bad")],
            invalid: vec![],
        };
        expect_code(
            &at("Propose with an invalid event"),
            peer.propose(bad).await,
            Code::InvalidArgument,
            "events[1].event_type",
        )?;
        let foreign = ProposeRequest {
            map_version: 0,
            partition: 0,
            events: vec![event(&target, "view", now, "mine"), event(&other, "view", now, "foreign")],
            invalid: vec![],
        };
        expect_code(
            &at("Propose with another partition's event"),
            peer.propose(foreign).await,
            Code::InvalidArgument,
            "belongs to partition 1",
        )?;
        // Dead letters ride along only for their own partition, and only
        // as INVALID: the leader judges times itself.
        let dead_letter = |e: &str, code: RejectionCode| DeadLetter {
            event: Some(event(e, "Not Valid", now, "dl")),
            code: code as i32,
            field: "event_type".into(),
            reason: "bad".into(),
            ..Default::default()
        };
        let foreign_dead_letter = ProposeRequest {
            map_version: 0,
            partition: 0,
            events: vec![],
            invalid: vec![dead_letter(&target, RejectionCode::Invalid), dead_letter(&other, RejectionCode::Invalid)],
        };
        expect_code(
            &at("Propose with another partition's dead letter"),
            peer.propose(foreign_dead_letter).await,
            Code::InvalidArgument,
            "invalid[1].event.entity_id",
        )?;
        let claimed_late = ProposeRequest {
            map_version: 0,
            partition: 0,
            events: vec![],
            invalid: vec![dead_letter(&target, RejectionCode::TooLate)],
        };
        expect_code(
            &at("Propose with a dead letter not INVALID"),
            peer.propose(claimed_late).await,
            Code::InvalidArgument,
            "must be INVALID",
        )?;
        let many = ProposeRequest {
            map_version: 0,
            partition: 0,
            events: (0..10_001).map(|i| event(&target, "view", now, &format!("many-{i}"))).collect(),
            invalid: vec![],
        };
        expect_code(&at("Propose with too many events"), peer.propose(many).await, Code::ResourceExhausted, "10000")?;
        let big = ProposeRequest {
            map_version: 0,
            partition: 0,
            events: (0..9_000).map(|i| event(&target, "view", now, &format!("{i:0>500}"))).collect(),
            invalid: vec![],
        };
        expect_code(&at("Propose over 4 MiB"), peer.propose(big).await, Code::ResourceExhausted, "bytes")?;
        let nowhere = ProposeRequest {
            map_version: 0,
            partition: PARTITIONS + 5,
            events: vec![event(&target, "view", now, "nowhere")],
            invalid: vec![],
        };
        expect_code(
            &at("Propose to a partition that does not exist"),
            peer.propose(nowhere).await,
            Code::InvalidArgument,
            "does not exist",
        )?;

        // One frame of hostile calls: each refused on its own, with its reason.
        let mut calls = Vec::new();
        let mut expected = Vec::new();
        for g in [0, group_of_partition(0), group_of_partition(PARTITIONS - 1)] {
            let garbage = RaftMessage { group_id: g, payload: vec![0xff; 64], quiesce: false };
            for kind in
                [RaftCallKind::AppendEntries, RaftCallKind::Vote, RaftCallKind::PreVote, RaftCallKind::TransferLeader]
            {
                calls.push(call(calls.len() as u64, kind, &garbage));
                expected.push((format!("{kind:?} garbage, group {g}"), Code::InvalidArgument, "undecodable"));
            }
        }
        let missing = RaftMessage { group_id: 10_000, payload: vec![0xff; 64], quiesce: false };
        for kind in [RaftCallKind::AppendEntries, RaftCallKind::Vote] {
            calls.push(call(calls.len() as u64, kind, &missing));
            expected.push((format!("{kind:?} for a group that does not exist"), Code::NotFound, "no partition"));
        }
        calls.push(PeerCall { id: calls.len() as u64, kind: 77, message: Some(missing.clone()) });
        expected.push(("a call of an unknown kind".into(), Code::InvalidArgument, "unknown raft call kind 77"));
        calls.push(PeerCall { id: calls.len() as u64, kind: 0, message: None });
        expected.push(("a call without a message".into(), Code::InvalidArgument, "without a message"));
        let replies = converse(&mut peer, calls).await?;
        anyhow::ensure!(replies.len() == expected.len(), "{} replies to {} calls", replies.len(), expected.len());
        for (reply, (what, code, says)) in replies.into_iter().zip(expected) {
            expect_code::<()>(&at(&what), Err(reply), code, says)?;
        }
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
                events: vec![
                    event(&target, "view", now, &format!("after-{via}")),
                    event(&other, "view", now, &format!("after-{via}")),
                ],
            })
            .await?
            .into_inner();
        assert_eq!(resp.accepted, 2, "through node {via}: {resp:?}");
    }
    assert_eq!((count(&cluster, &target, now).await?, count(&cluster, &other, now).await?), (13, 3));
    assert!(cluster.assert_replicas_identical(Duration::from_secs(30)).await? >= (PARTITIONS * 3) as usize);
    Ok(())
}
