//! `tally cluster init | status | wait | transfer-leader | rebalance |
//! add-node | remove-node | balancer | set-policy | set-retention | stages | spread
//! | split` (the last four in `retention.rs`, `stages.rs`, `spread.rs` and
//! `split.rs`).
//!
//! `status` asks every node, not just `--addr`: a node only knows the
//! leaders of the partitions it replicates, and only the node itself knows
//! how far its replicas have applied. Merging all answers gives the leader
//! of every partition and each replica's lag (the leader's commit index
//! minus the replica's applied index, in log entries). It also shows each
//! partition's Raft voters, which differ from its replicas while a
//! membership change (`add-node`, `remove-node`) is moving it.
//!
//! The changing commands call one node (the first of `--addr` that accepts
//! a connection), which forwards to whoever must act: the partition's leader
//! for `transfer-leader`, the metadata leader for `add-node` and
//! `remove-node`. They are not retried automatically (a membership change
//! must not run twice); each has a `--timeout` for the whole call.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Subcommand;
use serde_json::json;
use tally_proto::v1::cluster_client::ClusterClient;
use tally_proto::v1::{
    AddNodeRequest, IngestPolicy, InitializeRequest, MoveReplicaRequest, NodeInfo, RebalanceRequest, RemoveNodeRequest,
    RetentionPolicy, SetBalancerRequest, SetIngestPolicyRequest, StatusRequest, StatusResponse, TransferLeaderRequest,
};

use crate::retention::RetentionArgs;
use crate::table::Table;
use crate::{print_json, Cli};
use tally_client::PartitionMap;

/// `tally cluster ...`
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Initialise a new cluster: --node 1=127.0.0.1:7001 --node 2=...
    Init {
        /// ID=HOST:PORT of every node, the one at --addr included.
        #[arg(long = "node", required = true)]
        nodes: Vec<String>,
        /// Partitions, fixed for the cluster's life.
        #[arg(long, default_value_t = 64)]
        partitions: u32,
        /// Replicas per partition.
        #[arg(long, default_value_t = 3)]
        replication_factor: u32,
        /// Ingest policy (defaults: 7d late, 5m ahead; dead letters kept 7d,
        /// at most 100000 per partition).
        #[command(flatten)]
        policy: PolicyArgs,
        #[command(flatten)]
        retention: RetentionArgs,
    },
    /// Change how long each granularity's buckets are kept (admin): a
    /// duration (14d) or forever per flag; what is not given stays.
    SetRetention {
        #[command(flatten)]
        retention: RetentionArgs,
    },
    /// Change which event times the cluster accepts (admin); what is not
    /// given stays as it is.
    SetPolicy {
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// Nodes, partitions, leaders and replica lag, merged from every node.
    Status {
        /// Also list every partition.
        #[arg(long)]
        partitions: bool,
        /// Load instead: each node's events/s, bytes/s and CPU, and the
        /// busiest partitions first (all of them with --partitions).
        #[arg(long)]
        hot: bool,
    },
    /// Wait until the cluster is initialised and every partition has a leader.
    Wait {
        /// Give up after this long.
        #[arg(long, default_value = "60s")]
        timeout: humantime::Duration,
    },
    /// Move a partition's leadership to one of its replicas.
    TransferLeader {
        /// The partition.
        partition: u32,
        /// The node to lead it (one of its replicas).
        #[arg(value_name = "NODE")]
        node: u64,
        /// Give up after this long.
        #[arg(long, default_value = "30s")]
        timeout: humantime::Duration,
    },
    /// Spread a hot entity's events over more partitions: from the next
    /// minute its home has not counted, each event goes to one of WAYS more
    /// partitions by a hash of its event_id; queries sum the shares.
    /// Permanent; asking again shows the spread in force.
    Spread {
        /// The entity id.
        entity: String,
        /// Partitions to spread over besides the home.
        #[arg(long, default_value_t = 4)]
        ways: u32,
        /// Give up after this long.
        #[arg(long, default_value = "60s")]
        timeout: humantime::Duration,
    },
    /// Split a partition in two: the upper half of its hash range goes to a
    /// new partition on the same nodes, which starts from exactly the
    /// state the partition held for it.
    Split {
        /// The partition to split.
        partition: u32,
        /// Give up after this long.
        #[arg(long, default_value = "60s")]
        timeout: humantime::Duration,
    },
    /// Pause (off) or resume (on) the balancer, which moves leaderships
    /// toward even load by itself.
    Balancer {
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// Move one replica of a partition to another node (what the balancer
    /// does by load): the new replica catches up before the old one leaves.
    MoveReplica {
        /// The partition.
        partition: u32,
        /// The node giving up its replica.
        #[arg(long = "from")]
        from: u64,
        /// The node taking it.
        #[arg(long = "to")]
        to: u64,
    },
    /// Move leaderships so every node leads an even share of the partitions.
    Rebalance {
        /// Give up after this long.
        #[arg(long, default_value = "5m")]
        timeout: humantime::Duration,
    },
    /// Add a running, empty node; returns once its replicas have caught up.
    AddNode {
        /// The new node's address, HOST:PORT (its id is read from the node).
        // Not named `addr`: that id is the global --addr, which clap would
        // then fill from this positional.
        #[arg(value_name = "ADDR")]
        node_addr: String,
        /// Give up after this long (moving replicas can take minutes).
        #[arg(long, default_value = "5m")]
        timeout: humantime::Duration,
    },
    /// Latency of each stage of every node's write and read paths.
    Stages {
        /// Start a new window on every node after reading it.
        #[arg(long)]
        reset: bool,
    },
    /// Move every replica off a node, then drop it from the cluster.
    RemoveNode {
        /// The node's id.
        #[arg(value_name = "ID")]
        node_id: u64,
        /// Give up after this long (moving replicas can take minutes).
        #[arg(long, default_value = "5m")]
        timeout: humantime::Duration,
    },
}

/// The ingest policy's flags, for `init` and `set-policy`.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct PolicyArgs {
    /// Refuse events older than this (TOO_LATE); 0s accepts any age.
    #[arg(long)]
    allowed_lateness: Option<humantime::Duration>,
    /// Refuse events further ahead than this (IN_FUTURE).
    #[arg(long)]
    max_future_skew: Option<humantime::Duration>,
    /// How long each partition's dead-letter log keeps a rejected event;
    /// 0s keeps it until the size bound drops it.
    #[arg(long)]
    dead_letter_keep: Option<humantime::Duration>,
    /// Rejected events each partition's dead-letter log holds at most (the
    /// oldest are dropped, and counted); 0 keeps none.
    #[arg(long)]
    dead_letter_max_events: Option<u64>,
    /// How long each partition's raw-event log (for `tally audit`) keeps an
    /// event; 0s keeps it until the size bound drops it.
    #[arg(long)]
    raw_log_keep: Option<humantime::Duration>,
    /// Events each partition's raw-event log holds at most (the oldest are
    /// dropped, and counted); 0 (the default) keeps no raw-event log.
    #[arg(long)]
    raw_log_max_events: Option<u64>,
}

impl PolicyArgs {
    fn any(&self) -> bool {
        self.allowed_lateness.is_some()
            || self.max_future_skew.is_some()
            || self.dead_letter_keep.is_some()
            || self.dead_letter_max_events.is_some()
            || self.raw_log_keep.is_some()
            || self.raw_log_max_events.is_some()
    }

    /// The policy with these flags over `base` (unset dead-letter fields
    /// in `base` are the server's defaults).
    fn over(&self, base: IngestPolicy) -> IngestPolicy {
        IngestPolicy {
            allowed_lateness_ms: self.allowed_lateness.map_or(base.allowed_lateness_ms, |d| d.as_millis() as u64),
            max_future_skew_ms: self.max_future_skew.map_or(base.max_future_skew_ms, |d| d.as_millis() as u64),
            dead_letter_keep_ms: self.dead_letter_keep.map(|d| d.as_millis() as u64).or(base.dead_letter_keep_ms),
            dead_letter_max_events: self.dead_letter_max_events.or(base.dead_letter_max_events),
            raw_log_keep_ms: self.raw_log_keep.map(|d| d.as_millis() as u64).or(base.raw_log_keep_ms),
            raw_log_max_events: self.raw_log_max_events.or(base.raw_log_max_events),
        }
    }
}

pub(crate) async fn run(cli: &Cli, command: &ClusterCommand) -> anyhow::Result<i32> {
    match command {
        ClusterCommand::Init { nodes, partitions, replication_factor, policy, retention } => {
            let defaults = IngestPolicy {
                allowed_lateness_ms: DEFAULT_LATENESS_MS,
                max_future_skew_ms: DEFAULT_FUTURE_SKEW_MS,
                ..Default::default()
            };
            let policy = policy.any().then(|| policy.over(defaults));
            init(cli, nodes, *partitions, *replication_factor, policy, retention.for_init()).await
        }
        ClusterCommand::SetRetention { retention } => crate::retention::set(cli, retention).await,
        ClusterCommand::SetPolicy { policy } => set_policy(cli, policy).await,
        ClusterCommand::Status { partitions, hot } => status(cli, *partitions, *hot).await,
        ClusterCommand::Wait { timeout } => wait(cli, **timeout).await,
        ClusterCommand::TransferLeader { partition, node, timeout } => {
            transfer_leader(cli, *partition, *node, **timeout).await
        }
        ClusterCommand::Rebalance { timeout } => rebalance(cli, **timeout).await,
        ClusterCommand::Spread { entity, ways, timeout } => crate::spread::run(cli, entity, *ways, **timeout).await,
        ClusterCommand::Split { partition, timeout } => crate::split::run(cli, *partition, **timeout).await,
        ClusterCommand::Balancer { state } => balancer(cli, state == "off").await,
        ClusterCommand::MoveReplica { partition, from, to } => move_replica(cli, *partition, *from, *to).await,
        ClusterCommand::AddNode { node_addr, timeout } => add_node(cli, node_addr, **timeout).await,
        ClusterCommand::RemoveNode { node_id, timeout } => remove_node(cli, *node_id, **timeout).await,
        ClusterCommand::Stages { reset } => crate::stages::run(cli, *reset).await,
    }
}

/// A cluster stub on the first seed that accepts a connection, and its
/// address.
async fn admin_client(cli: &Cli) -> anyhow::Result<(String, ClusterClient<tally_client::TokenChannel>)> {
    let mut errors = Vec::new();
    for addr in cli.seeds() {
        match cli.connect_node(&addr).await {
            Ok(channel) => return Ok((addr, ClusterClient::new(channel))),
            Err(e) => errors.push(format!("{addr}: {e}")),
        }
    }
    if errors.is_empty() {
        bail!("--addr is empty");
    }
    bail!("no node could be reached: {}", errors.join("; "))
}

/// Runs one admin call bounded by `timeout` (also sent as the gRPC
/// deadline), turning a gRPC error into a readable one.
pub(crate) async fn admin_call<T, F, Fut>(cli: &Cli, what: &str, timeout: Duration, f: F) -> anyhow::Result<T>
where
    F: FnOnce(ClusterClient<tally_client::TokenChannel>, Duration) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let (addr, client) = admin_client(cli).await?;
    match tokio::time::timeout(timeout, f(client, timeout)).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(anyhow::Error::new(tally_client::ClientError::Rpc {
            addr: addr.clone(),
            code: status.code(),
            message: status.message().to_owned(),
        }))
        .context(what.to_owned()),
        Err(_) => bail!("{what}: no answer from {addr} within {}", humantime::format_duration(timeout)),
    }
}

/// A request with `timeout` as its gRPC deadline.
pub(crate) fn with_deadline<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

async fn transfer_leader(cli: &Cli, partition: u32, node: u64, timeout: Duration) -> anyhow::Result<i32> {
    let what = format!("moving the leadership of partition {partition} to node {node}");
    let resp = admin_call(cli, &what, timeout, |mut c, t| async move {
        c.transfer_leader(with_deadline(TransferLeaderRequest { partition, node_id: node }, t)).await
    })
    .await?;
    let moved = resp.leader_node_id == node;
    if cli.json {
        print_json(&json!({"partition": partition, "requested": node, "leader": resp.leader_node_id, "moved": moved}));
    } else if moved {
        println!("partition {partition}: node {node} leads");
    } else {
        println!("partition {partition}: leader is node {}", resp.leader_node_id);
    }
    if !moved {
        eprintln!("error: {what}: the leader is node {} when the call returned", resp.leader_node_id);
    }
    Ok(if moved { 0 } else { 1 })
}

async fn balancer(cli: &Cli, paused: bool) -> anyhow::Result<i32> {
    let what = if paused { "pausing the balancer" } else { "resuming the balancer" };
    let resp = admin_call(cli, what, Duration::from_secs(30), |mut c, t| async move {
        c.set_balancer(with_deadline(SetBalancerRequest { paused }, t)).await
    })
    .await?;
    if cli.json {
        print_json(&json!({"balancer_paused": resp.paused}));
    } else {
        println!("balancer {}", if resp.paused { "off (paused)" } else { "on" });
    }
    Ok(0)
}

async fn move_replica(cli: &Cli, partition: u32, from: u64, to: u64) -> anyhow::Result<i32> {
    let what = format!("moving partition {partition}'s replica from node {from} to node {to}");
    let request = MoveReplicaRequest { partition, from_node_id: from, to_node_id: to };
    let resp = admin_call(cli, &what, Duration::from_secs(30), |mut c, t| async move {
        c.move_replica(with_deadline(request, t)).await
    })
    .await?;
    if cli.json {
        print_json(&json!({"partition": partition, "replicas": resp.replicas}));
    } else {
        println!(
            "partition {partition}: replicas now {:?}; the new one catches up before the old one leaves (see `tally cluster status`)",
            resp.replicas
        );
    }
    Ok(0)
}

async fn rebalance(cli: &Cli, timeout: Duration) -> anyhow::Result<i32> {
    let resp = admin_call(cli, "rebalancing leaderships", timeout, |mut c, t| async move {
        c.rebalance(with_deadline(RebalanceRequest {}, t)).await
    })
    .await?;
    if cli.json {
        print_json(&json!({"moved": resp.moved, "failed": resp.failed, "skipped": resp.skipped}));
    } else {
        println!("leadership moved for {} partitions, {} could not be moved", resp.moved, resp.failed);
        if !resp.skipped.is_empty() {
            println!(
                "skipped {} partitions whose preferred leader is down or behind: {:?}; rebalance again once it is back",
                resp.skipped.len(),
                resp.skipped
            );
        }
    }
    Ok(if resp.failed == 0 && resp.skipped.is_empty() { 0 } else { crate::EXIT_PARTIAL })
}

async fn add_node(cli: &Cli, addr: &str, timeout: Duration) -> anyhow::Result<i32> {
    let what = format!("adding the node at {addr}");
    let request = AddNodeRequest { addr: addr.to_owned() };
    let resp =
        admin_call(cli, &what, timeout, |mut c, t| async move { c.add_node(with_deadline(request, t)).await }).await?;
    if cli.json {
        print_json(&json!({"node_id": resp.node_id, "addr": addr, "replicas_moved": resp.replicas_moved}));
    } else {
        println!("node {} ({addr}) added; {} replicas moved to it", resp.node_id, resp.replicas_moved);
    }
    Ok(0)
}

async fn remove_node(cli: &Cli, id: u64, timeout: Duration) -> anyhow::Result<i32> {
    let what = format!("removing node {id}");
    let resp = admin_call(cli, &what, timeout, |mut c, t| async move {
        c.remove_node(with_deadline(RemoveNodeRequest { node_id: id }, t)).await
    })
    .await?;
    if cli.json {
        print_json(&json!({"node_id": id, "replicas_moved": resp.replicas_moved}));
    } else {
        println!("node {id} removed; {} replicas moved off it", resp.replicas_moved);
    }
    Ok(0)
}

pub(crate) async fn raw_client(cli: &Cli) -> anyhow::Result<ClusterClient<tally_client::TokenChannel>> {
    let seeds = cli.seeds();
    let addr = seeds.first().context("--addr is empty")?;
    let channel = cli.connect_node(addr).await.with_context(|| format!("connecting to {addr}"))?;
    Ok(ClusterClient::new(channel))
}

/// The server's defaults, for an init that sets only one of the two.
const DEFAULT_LATENESS_MS: u64 = 7 * 24 * 3_600_000;
const DEFAULT_FUTURE_SKEW_MS: u64 = 5 * 60_000;

fn print_policy(cli: &Cli, policy: &IngestPolicy) {
    if cli.json {
        print_json(&json!({
            "allowed_lateness_ms": policy.allowed_lateness_ms,
            "max_future_skew_ms": policy.max_future_skew_ms,
            "dead_letter_keep_ms": policy.dead_letter_keep_ms,
            "dead_letter_max_events": policy.dead_letter_max_events,
            "raw_log_keep_ms": policy.raw_log_keep_ms,
            "raw_log_max_events": policy.raw_log_max_events,
        }));
    } else {
        let lateness = if policy.allowed_lateness_ms == 0 {
            "any age".to_string()
        } else {
            humantime::format_duration(Duration::from_millis(policy.allowed_lateness_ms)).to_string()
        };
        println!(
            "ingest policy: events up to {lateness} late, up to {} ahead",
            humantime::format_duration(Duration::from_millis(policy.max_future_skew_ms))
        );
        let describe = |what: &str, keep_ms: Option<u64>, max_events: Option<u64>| {
            let keep = match keep_ms {
                Some(0) => "until the log is full".to_string(),
                Some(ms) => format!("for {}", humantime::format_duration(Duration::from_millis(ms))),
                None => "for the default time".to_string(),
            };
            match max_events {
                Some(0) => format!("{what}: off"),
                Some(n) => format!("{what}: kept {keep}, at most {n} events per partition"),
                None => format!("{what}: kept {keep}, default size"),
            }
        };
        println!("{}", describe("dead-letter log", policy.dead_letter_keep_ms, policy.dead_letter_max_events));
        println!("{}", describe("raw-event log", policy.raw_log_keep_ms, policy.raw_log_max_events));
    }
}

async fn set_policy(cli: &Cli, args: &PolicyArgs) -> anyhow::Result<i32> {
    let mut client = raw_client(cli).await?;
    let current = client.status(StatusRequest {}).await?.into_inner().ingest_policy.unwrap_or_default();
    let policy = args.over(current);
    let resp = client.set_ingest_policy(SetIngestPolicyRequest { policy: Some(policy) }).await?.into_inner();
    print_policy(cli, &resp.policy.unwrap_or(policy));
    Ok(0)
}

async fn init(
    cli: &Cli,
    nodes: &[String],
    partitions: u32,
    replication_factor: u32,
    ingest_policy: Option<IngestPolicy>,
    retention: Option<RetentionPolicy>,
) -> anyhow::Result<i32> {
    let nodes = nodes
        .iter()
        .map(|n| {
            let (id, addr) = n.split_once('=').context("--node takes ID=HOST:PORT")?;
            // Peer addresses are left to the nodes: each reports its own.
            Ok(NodeInfo { node_id: id.parse().context("node id")?, addr: addr.to_string(), ..Default::default() })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let resp = raw_client(cli)
        .await?
        .initialize(InitializeRequest { nodes, partitions, replication_factor, ingest_policy, retention })
        .await?
        .into_inner();
    if cli.json {
        print_json(&json!({"already_initialized": resp.already_initialized}));
    } else if resp.already_initialized {
        println!("cluster was already initialised");
    } else {
        println!("cluster initialised");
    }
    Ok(0)
}

async fn wait(cli: &Cli, timeout: Duration) -> anyhow::Result<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        let leaderless = match raw_client(cli).await {
            Ok(mut client) => match client.status(StatusRequest {}).await {
                Ok(s) if s.get_ref().initialized => {
                    Some(s.get_ref().partitions.iter().filter(|p| p.leader_node_id == 0).count())
                }
                _ => None,
            },
            Err(_) => None,
        };
        if leaderless == Some(0) {
            if cli.json {
                print_json(&json!({"ready": true}));
            } else {
                println!("every partition has a leader");
            }
            return Ok(0);
        }
        if Instant::now() > deadline {
            let what = leaderless.map_or_else(
                || "not initialised or unreachable".to_owned(),
                |n| format!("{n} partitions without a leader"),
            );
            bail!("cluster not ready after {}: {what}", humantime::format_duration(timeout));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The merged view behind `cluster status`.
#[derive(Debug)]
pub struct StatusView {
    /// Each address asked and its answer.
    pub answers: Vec<(String, Result<StatusResponse, String>)>,
    /// The merged map (`None`: no node is initialised).
    pub map: Option<PartitionMap>,
}

impl StatusView {
    fn reports(&self) -> impl Iterator<Item = &StatusResponse> {
        self.answers.iter().filter_map(|(_, r)| r.as_ref().ok())
    }

    /// (node, partition) → (commit, applied) as the node reported.
    fn replica_indexes(&self) -> BTreeMap<(u64, u32), (u64, u64)> {
        let mut out = BTreeMap::new();
        for s in self.reports() {
            for p in &s.partitions {
                out.insert((s.node_id, p.partition), (p.commit_index, p.applied_index));
            }
        }
        out
    }

    /// Lag of every replica of `partition` the status knows: leader commit
    /// index minus the replica's applied index.
    fn lags(&self, partition: u32, leader: u64, indexes: &BTreeMap<(u64, u32), (u64, u64)>) -> BTreeMap<u64, u64> {
        let leader_commit = indexes.get(&(leader, partition)).map(|(c, _)| *c).unwrap_or_else(|| {
            indexes.iter().filter(|((_, p), _)| *p == partition).map(|(_, (c, _))| *c).max().unwrap_or(0)
        });
        indexes
            .iter()
            .filter(|((_, p), _)| *p == partition)
            .map(|((node, _), (_, applied))| (*node, leader_commit.saturating_sub(*applied)))
            .collect()
    }

    /// Replicas each node reports quiesced; `None` for a node that did not answer.
    fn quiesced_of(&self, node: u64) -> Option<usize> {
        self.reports().find(|s| s.node_id == node).map(|s| s.partitions.iter().filter(|p| p.quiesced).count())
    }

    /// The reachable node leading the most partitions (the first such in
    /// the map's order) and the partitions it leads; `None` when no
    /// reachable node leads any.
    pub fn busiest_leader(&self) -> Option<(u64, Vec<u32>)> {
        let map = self.map.as_ref()?;
        let reachable: Vec<u64> = self.reports().map(|s| s.node_id).collect();
        let leads = |id: u64| map.partitions().iter().filter(|r| r.leader == id).count();
        let mut best: Option<(u64, usize)> = None;
        for (id, _) in map.nodes().filter(|(id, _)| reachable.contains(id)) {
            if best.is_none_or(|(_, n)| leads(id) > n) {
                best = Some((id, leads(id)));
            }
        }
        let (node, _) = best?;
        let led: Vec<u32> =
            map.partitions().iter().enumerate().filter(|(_, r)| r.leader == node).map(|(p, _)| p as u32).collect();
        (!led.is_empty()).then_some((node, led))
    }

    /// Every node of the map answered and reports all its replicas quiesced.
    pub fn all_quiesced(&self) -> bool {
        let Some(map) = &self.map else { return false };
        let mut nodes = map.nodes().peekable();
        nodes.peek().is_some()
            && nodes.all(|(id, _)| {
                let replicas = map.partitions().iter().filter(|r| r.replicas.contains(&id)).count();
                self.quiesced_of(id) == Some(replicas)
            })
    }

    /// The JSON document of `cluster status --json`.
    pub fn to_json(&self) -> serde_json::Value {
        let Some(map) = &self.map else {
            let errors: Vec<_> =
                self.answers.iter().map(|(a, r)| json!({"addr": a, "error": r.as_ref().err()})).collect();
            return json!({"initialized": false, "nodes": errors, "partitions": []});
        };
        let indexes = self.replica_indexes();
        let first = self.reports().find(|s| s.initialized);
        let mut node_lag: BTreeMap<u64, u64> = BTreeMap::new();
        let partitions: Vec<_> = map
            .partitions()
            .iter()
            .enumerate()
            .map(|(p, route)| {
                let p = p as u32;
                let lags = self.lags(p, route.leader, &indexes);
                for (node, lag) in &lags {
                    let max = node_lag.entry(*node).or_default();
                    *max = (*max).max(*lag);
                }
                let commit = indexes.get(&(route.leader, p)).map(|(c, _)| *c);
                // The cold archive as the leader applied it (0: none).
                let archive = self
                    .reports()
                    .find(|s| s.node_id == route.leader)
                    .and_then(|s| s.partitions.iter().find(|i| i.partition == p))
                    .map(|i| (i.sealed_below_ms, i.archived_upto_ms, i.archive_segments));
                json!({
                    "partition": p, "leader": route.leader, "term": route.term, "replicas": route.replicas,
                    "voters": route.voters, "changing": route.changing(), "commit_index": commit,
                    "sealed_below_ms": archive.map(|a| a.0), "archived_upto_ms": archive.map(|a| a.1),
                    "archive_segments": archive.map(|a| a.2),
                    "lag": lags.iter().map(|(n, l)| (n.to_string(), json!(l))).collect::<serde_json::Map<_, _>>(),
                })
            })
            .collect();
        let answered: BTreeMap<String, u64> =
            self.answers.iter().filter_map(|(a, r)| r.as_ref().ok().map(|s| (a.clone(), s.node_id))).collect();
        let nodes: Vec<_> = map
            .nodes()
            .map(|(id, addr)| {
                let reachable = answered.values().any(|n| *n == id);
                let error = self.answers.iter().find(|(a, _)| a == addr).and_then(|(_, r)| r.as_ref().err());
                // Replicas this node has quiesced (idle groups with timers off).
                let report = self.reports().find(|s| s.node_id == id);
                let quiesced = self.quiesced_of(id);
                json!({
                    "quiesced": quiesced,
                    "dedup_conflicts": report.map(|s| s.dedup_conflicts),
                    "dedup_keys": report.map(|s| s.dedup_keys),
                    "dedup_bytes": report.map(|s| s.dedup_bytes),
                    "node_id": id, "addr": addr, "reachable": reachable,
                    "leads": map.partitions().iter().filter(|r| r.leader == id).count(),
                    "replicas": map.partitions().iter().filter(|r| r.replicas.contains(&id)).count(),
                    "max_lag": if reachable { node_lag.get(&id).copied() } else { None },
                    "error": error,
                })
            })
            .collect();
        json!({
            "initialized": true,
            "partition_count": map.partition_count(),
            "replication_factor": first.map(|s| s.replication_factor),
            "metadata_leader": self.reports().map(|s| s.metadata_leader_node_id).find(|id| *id != 0).unwrap_or(0),
            "answered_by": answered.values().collect::<Vec<_>>(),
            "leaderless": map.leaderless(),
            "changing": map.partitions().iter().filter(|r| r.changing()).count(),
            "nodes": nodes,
            "partitions": partitions,
            "spreads": crate::spread::spreads_of(self.reports()).iter().map(crate::spread::to_json).collect::<Vec<_>>(),
            "splits": crate::split::splits_of(self.reports()).iter().map(crate::split::to_json).collect::<Vec<_>>(),
            "balancer_paused": self.reports().any(|s| s.balancer_paused),
        })
    }

    /// Load: each node's (as it reports it) and each partition's (as its
    /// leader reports it), busiest partitions first.
    pub fn hot_json(&self) -> serde_json::Value {
        let nodes: Vec<_> = self
            .reports()
            .map(|s| {
                let l = s.load.unwrap_or_default();
                json!({"node_id": s.node_id, "events_per_sec": l.events_per_sec, "bytes_per_sec": l.bytes_per_sec,
                    "processor_cpu": l.processor_cpu, "apply_cpu": l.apply_cpu, "process_cpu": l.process_cpu,
                    "queued_requests": l.queued_requests, "partitions_led": l.partitions_led})
            })
            .collect();
        let mut partitions: Vec<_> = self
            .reports()
            .flat_map(|s| s.partitions.iter().filter(|p| p.leader_node_id == s.node_id && s.node_id != 0))
            .map(|p| {
                json!({"partition": p.partition, "leader": p.leader_node_id, "events_per_sec": p.events_per_sec,
                    "bytes_per_sec": p.bytes_per_sec, "processor_cpu": p.processor_cpu, "apply_cpu": p.apply_cpu,
                    "queued_requests": p.queued_requests})
            })
            .collect();
        let rate = |v: &serde_json::Value| v["events_per_sec"].as_f64().unwrap_or(0.0);
        partitions.sort_by(|a, b| rate(b).total_cmp(&rate(a)));
        let total: f64 = partitions.iter().map(rate).sum();
        let spread = {
            let cpus: Vec<f64> = nodes.iter().filter_map(|n| n["process_cpu"].as_f64()).collect();
            let (min, max) = cpus.iter().fold((f64::MAX, 0.0f64), |(lo, hi), c| (lo.min(*c), hi.max(*c)));
            if cpus.is_empty() || min <= 0.0 {
                serde_json::Value::Null
            } else {
                json!(max / min)
            }
        };
        json!({"events_per_sec": total, "cpu_max_over_min": spread, "nodes": nodes, "partitions": partitions})
    }

    /// The human rendering of [`StatusView::hot_json`], `limit` partitions.
    pub fn render_hot(&self, limit: usize) -> String {
        let doc = self.hot_json();
        let f = |v: &serde_json::Value, digits: usize| format!("{:.*}", digits, v.as_f64().unwrap_or(0.0));
        let mut nodes =
            Table::new(["node", "events/s", "bytes/s", "cpu (process)", "processor", "apply", "queued", "leads"]);
        for n in doc["nodes"].as_array().into_iter().flatten() {
            nodes.row([
                n["node_id"].to_string(),
                f(&n["events_per_sec"], 0),
                f(&n["bytes_per_sec"], 0),
                f(&n["process_cpu"], 2),
                f(&n["processor_cpu"], 2),
                f(&n["apply_cpu"], 2),
                n["queued_requests"].to_string(),
                n["partitions_led"].to_string(),
            ]);
        }
        let mut out = format!(
            "load (per second, smoothed over ~10 s; CPU in cores): {} events/s in all{}\n",
            f(&doc["events_per_sec"], 0),
            doc["cpu_max_over_min"]
                .as_f64()
                .map(|s| format!(", busiest node's CPU {s:.2}× the idlest's"))
                .unwrap_or_default()
        );
        out.push_str(&nodes.render());
        let partitions = doc["partitions"].as_array().cloned().unwrap_or_default();
        let total = doc["events_per_sec"].as_f64().unwrap_or(0.0);
        let mut parts =
            Table::new(["partition", "leader", "events/s", "share", "bytes/s", "processor", "apply", "queued"]);
        for p in partitions.iter().take(limit) {
            let rate = p["events_per_sec"].as_f64().unwrap_or(0.0);
            parts.row([
                p["partition"].to_string(),
                p["leader"].to_string(),
                f(&p["events_per_sec"], 0),
                if total > 0.0 { format!("{:.1}%", 100.0 * rate / total) } else { "-".into() },
                f(&p["bytes_per_sec"], 0),
                f(&p["processor_cpu"], 3),
                f(&p["apply_cpu"], 3),
                p["queued_requests"].to_string(),
            ]);
        }
        out.push('\n');
        out.push_str(&parts.render());
        if partitions.len() > limit {
            out.push_str(&format!("({} more partitions; --partitions lists all)\n", partitions.len() - limit));
        }
        out
    }

    /// The human rendering.
    pub fn render(&self, with_partitions: bool) -> String {
        let doc = self.to_json();
        let mut out = String::new();
        if doc["initialized"] != json!(true) {
            out.push_str("cluster not initialised (or no node reachable)\n");
            for n in doc["nodes"].as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "  {}: {}\n",
                    n["addr"].as_str().unwrap_or(""),
                    n["error"].as_str().unwrap_or("not initialised")
                ));
            }
            return out;
        }
        out.push_str(&format!(
            "{} partitions, replication factor {}, metadata leader {}, partitions without a leader: {}\n",
            doc["partition_count"], doc["replication_factor"], doc["metadata_leader"], doc["leaderless"]
        ));
        if doc["changing"].as_u64().is_some_and(|n| n > 0) {
            out.push_str(&format!(
                "membership change in progress: {} partitions have voters other than their replicas{}\n",
                doc["changing"],
                if with_partitions { " (marked *)" } else { " (see --partitions)" }
            ));
        }
        if doc["balancer_paused"] == json!(true) {
            out.push_str("balancer: off (`tally cluster balancer on` resumes it)\n");
        }
        for spread in crate::spread::spreads_of(self.reports()) {
            out.push_str(&format!("spread: {}\n", crate::spread::describe(&spread)));
        }
        for split in crate::split::splits_of(self.reports()) {
            out.push_str(&format!("split: {}\n", crate::split::describe(&split)));
        }
        out.push('\n');
        let mut nodes = Table::new([
            "NODE",
            "ADDR",
            "UP",
            "LEADS",
            "REPLICAS",
            "QUIESCED",
            "MAX_LAG",
            "DEDUP_KEYS",
            "DEDUP_MIB",
            "DEDUP_CONFLICTS",
        ]);
        for n in doc["nodes"].as_array().into_iter().flatten() {
            nodes.row([
                n["node_id"].to_string(),
                n["addr"].as_str().unwrap_or("").to_owned(),
                if n["reachable"] == json!(true) { "yes".to_owned() } else { "NO".to_owned() },
                n["leads"].to_string(),
                n["replicas"].to_string(),
                n["quiesced"].as_u64().map_or("-".to_owned(), |q| q.to_string()),
                n["max_lag"].as_u64().map_or("-".to_owned(), |l| l.to_string()),
                n["dedup_keys"].as_u64().map_or("-".to_owned(), |k| k.to_string()),
                n["dedup_bytes"].as_u64().map_or("-".to_owned(), |b| format!("{:.1}", b as f64 / (1 << 20) as f64)),
                n["dedup_conflicts"].as_u64().map_or("-".to_owned(), |c| c.to_string()),
            ]);
        }
        out.push_str(&nodes.render());
        if with_partitions {
            out.push('\n');
            // VOTERS only while a membership change is moving partitions.
            let any_changing = doc["changing"].as_u64().is_some_and(|n| n > 0);
            let mut header = vec!["PARTITION", "LEADER", "TERM", "COMMIT", "REPLICAS (node:lag)"];
            if any_changing {
                header.push("VOTERS");
            }
            let mut parts = Table::new(header);
            for p in doc["partitions"].as_array().into_iter().flatten() {
                let lag = p["lag"].as_object();
                let replicas: Vec<String> = p["replicas"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|r| {
                        let l = lag.and_then(|m| m.get(&r.to_string())).and_then(|v| v.as_u64());
                        format!("{r}:{}", l.map_or("?".to_owned(), |l| l.to_string()))
                    })
                    .collect();
                let changing = p["changing"] == json!(true);
                let voters = if changing {
                    let v: Vec<String> = p["voters"].as_array().into_iter().flatten().map(|v| v.to_string()).collect();
                    format!("{} *", v.join(","))
                } else {
                    String::new()
                };
                let mut row = vec![
                    p["partition"].to_string(),
                    if p["leader"] == json!(0) { "-".to_owned() } else { p["leader"].to_string() },
                    p["term"].to_string(),
                    p["commit_index"].as_u64().map_or("-".to_owned(), |c| c.to_string()),
                    replicas.join(" "),
                ];
                if any_changing {
                    row.push(voters);
                }
                parts.row(row);
            }
            out.push_str(&parts.render());
        }
        out
    }
}

/// Asks every node of the cluster `--addr` belongs to.
pub async fn status_view(cli: &Cli) -> anyhow::Result<StatusView> {
    match crate::client(cli).await {
        Ok(client) => {
            let status = client.cluster_status().await?;
            Ok(StatusView { answers: status.nodes, map: Some(status.map) })
        }
        Err(_) => {
            // Not initialised (or unreachable): report what the seeds say.
            let mut answers = Vec::new();
            for addr in cli.seeds() {
                let answer = match cli.connect_node(&addr).await {
                    Ok(channel) => ClusterClient::new(channel)
                        .status(StatusRequest {})
                        .await
                        .map(|r| r.into_inner())
                        .map_err(|s| s.message().to_owned()),
                    Err(e) => Err(e.to_string()),
                };
                answers.push((addr, answer));
            }
            let ok: Vec<StatusResponse> = answers.iter().filter_map(|(_, r)| r.as_ref().ok().cloned()).collect();
            Ok(StatusView { map: PartitionMap::merge(&ok), answers })
        }
    }
}

async fn status(cli: &Cli, with_partitions: bool, hot: bool) -> anyhow::Result<i32> {
    let view = status_view(cli).await?;
    match (cli.json, hot) {
        (true, false) => print_json(&view.to_json()),
        (false, false) => print!("{}", view.render(with_partitions)),
        (true, true) => print_json(&view.hot_json()),
        (false, true) => print!("{}", view.render_hot(if with_partitions { usize::MAX } else { 20 })),
    }
    // Success when some node answered, initialised or not: scripts probe a
    // freshly started node with this command before `cluster init`.
    Ok(if view.answers.iter().any(|(_, r)| r.is_ok()) { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use tally_proto::v1::PartitionInfo;

    use super::*;

    fn report(node: u64, voters0: Vec<u64>) -> StatusResponse {
        StatusResponse {
            node_id: node,
            initialized: true,
            partition_count: 2,
            replication_factor: 3,
            nodes: (1..=4)
                .map(|id| NodeInfo { node_id: id, addr: format!("n{id}:1"), reachable: true, ..Default::default() })
                .collect(),
            partitions: vec![
                PartitionInfo {
                    partition: 0,
                    replicas: vec![1, 2, 4],
                    leader_node_id: 1,
                    term: 2,
                    voters: voters0,
                    ..Default::default()
                },
                PartitionInfo {
                    partition: 1,
                    replicas: vec![2, 3, 1],
                    leader_node_id: 2,
                    term: 2,
                    voters: vec![1, 2, 3],
                    ..Default::default()
                },
            ],
            metadata_leader_node_id: 1,
            ..Default::default()
        }
    }

    fn view(reports: Vec<StatusResponse>) -> StatusView {
        let map = PartitionMap::merge(&reports);
        StatusView { answers: reports.into_iter().map(|r| (format!("n{}:1", r.node_id), Ok(r))).collect(), map }
    }

    #[test]
    fn positional_addresses_do_not_clobber_addr() {
        use clap::Parser;
        let cli = Cli::try_parse_from(["tally", "--addr", "a:1", "cluster", "add-node", "b:2"]).expect("parses");
        assert_eq!(cli.addr, "a:1");
        match cli.command {
            crate::Command::Cluster { command: ClusterCommand::AddNode { node_addr, timeout } } => {
                assert_eq!(node_addr, "b:2");
                assert_eq!(*timeout, Duration::from_secs(300));
            }
            other => panic!("{other:?}"),
        }
        let cli =
            Cli::try_parse_from(["tally", "cluster", "transfer-leader", "3", "2", "--addr", "a:1"]).expect("parses");
        assert!(matches!(
            cli.command,
            crate::Command::Cluster { command: ClusterCommand::TransferLeader { partition: 3, node: 2, .. } }
        ));
        assert_eq!(cli.addr, "a:1");
    }

    #[test]
    fn status_json_is_what_the_benchmark_report_reads() {
        let v = view(vec![report(1, vec![1, 2]), report(2, vec![1, 2])]);
        let nodes: tally_bench::report::StatusNodes = serde_json::from_value(v.to_json()).expect("parses");
        assert!(!nodes.nodes.is_empty());
        assert!(nodes.nodes.iter().all(|n| n.replicas.is_some()), "{:?}", v.to_json());
        assert_eq!(v.all_quiesced(), nodes.nodes.iter().all(|n| n.quiesced == n.replicas));
    }

    #[test]
    fn status_shows_voters_and_marks_membership_changes() {
        let v = view(vec![report(1, vec![1, 2, 3, 4])]);
        let doc = v.to_json();
        assert_eq!(doc["partitions"][0]["voters"], json!([1, 2, 3, 4]));
        assert_eq!(doc["partitions"][0]["changing"], json!(true));
        assert_eq!(doc["partitions"][1]["voters"], json!([1, 2, 3]));
        assert_eq!(doc["partitions"][1]["changing"], json!(false));
        assert_eq!(doc["changing"], json!(1));
        let text = v.render(true);
        assert!(text.contains("membership change in progress: 1 partitions"), "{text}");
        assert!(text.contains("VOTERS") && text.contains("1,2,3,4 *"), "{text}");
        assert!(v.render(false).contains("(see --partitions)"));

        // Settled: no mark, no column.
        let v = view(vec![report(1, vec![4, 2, 1])]);
        assert_eq!(v.to_json()["changing"], json!(0));
        let text = v.render(true);
        assert!(!text.contains("VOTERS") && !text.contains("membership change"), "{text}");
    }
}
