//! `tally cluster init | status | wait`.
//!
//! `status` asks every node, not just `--addr`: a node only knows the
//! leaders of the partitions it replicates, and only the node itself knows
//! how far its replicas have applied. Merging all answers gives the leader
//! of every partition and each replica's lag (the leader's commit index
//! minus the replica's applied index, in log entries).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Subcommand;
use serde_json::json;
use tally_proto::v1::cluster_client::ClusterClient;
use tally_proto::v1::{InitializeRequest, NodeInfo, StatusRequest, StatusResponse};

use super::table::Table;
use super::{print_json, Cli};
use crate::routing::PartitionMap;

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
    },
    /// Nodes, partitions, leaders and replica lag, merged from every node.
    Status {
        /// Also list every partition.
        #[arg(long)]
        partitions: bool,
    },
    /// Wait until the cluster is initialised and every partition has a leader.
    Wait {
        /// Give up after this long.
        #[arg(long, default_value = "60s")]
        timeout: humantime::Duration,
    },
}

pub(crate) async fn run(cli: &Cli, command: &ClusterCommand) -> anyhow::Result<i32> {
    match command {
        ClusterCommand::Init { nodes, partitions, replication_factor } => {
            init(cli, nodes, *partitions, *replication_factor).await
        }
        ClusterCommand::Status { partitions } => status(cli, *partitions).await,
        ClusterCommand::Wait { timeout } => wait(cli, **timeout).await,
    }
}

async fn raw_client(cli: &Cli) -> anyhow::Result<ClusterClient<tonic::transport::Channel>> {
    let seeds = cli.seeds();
    let addr = seeds.first().context("--addr is empty")?;
    let channel = crate::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
    Ok(ClusterClient::new(channel))
}

async fn init(cli: &Cli, nodes: &[String], partitions: u32, replication_factor: u32) -> anyhow::Result<i32> {
    let nodes = nodes
        .iter()
        .map(|n| {
            let (id, addr) = n.split_once('=').context("--node takes ID=HOST:PORT")?;
            Ok(NodeInfo { node_id: id.parse().context("node id")?, addr: addr.to_string(), reachable: false })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let resp = raw_client(cli)
        .await?
        .initialize(InitializeRequest { nodes, partitions, replication_factor })
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
            let what = leaderless.map_or_else(|| "not initialised or unreachable".to_owned(), |n| {
                format!("{n} partitions without a leader")
            });
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

    /// The JSON document of `cluster status --json`.
    pub fn to_json(&self) -> serde_json::Value {
        let Some(map) = &self.map else {
            let errors: Vec<_> = self
                .answers
                .iter()
                .map(|(a, r)| json!({"addr": a, "error": r.as_ref().err()}))
                .collect();
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
                json!({
                    "partition": p, "leader": route.leader, "term": route.term, "replicas": route.replicas,
                    "commit_index": commit,
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
                json!({
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
            "nodes": nodes,
            "partitions": partitions,
        })
    }

    /// The human rendering.
    pub fn render(&self, with_partitions: bool) -> String {
        let doc = self.to_json();
        let mut out = String::new();
        if doc["initialized"] != json!(true) {
            out.push_str("cluster not initialised (or no node reachable)\n");
            for n in doc["nodes"].as_array().into_iter().flatten() {
                out.push_str(&format!("  {}: {}\n", n["addr"].as_str().unwrap_or(""), n["error"].as_str().unwrap_or("not initialised")));
            }
            return out;
        }
        out.push_str(&format!(
            "{} partitions, replication factor {}, metadata leader {}, partitions without a leader: {}\n\n",
            doc["partition_count"], doc["replication_factor"], doc["metadata_leader"], doc["leaderless"]
        ));
        let mut nodes = Table::new(["NODE", "ADDR", "UP", "LEADS", "REPLICAS", "MAX_LAG"]);
        for n in doc["nodes"].as_array().into_iter().flatten() {
            nodes.row([
                n["node_id"].to_string(),
                n["addr"].as_str().unwrap_or("").to_owned(),
                if n["reachable"] == json!(true) { "yes".to_owned() } else { "NO".to_owned() },
                n["leads"].to_string(),
                n["replicas"].to_string(),
                n["max_lag"].as_u64().map_or("-".to_owned(), |l| l.to_string()),
            ]);
        }
        out.push_str(&nodes.render());
        if with_partitions {
            out.push('\n');
            let mut parts = Table::new(["PARTITION", "LEADER", "TERM", "COMMIT", "REPLICAS (node:lag)"]);
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
                parts.row([
                    p["partition"].to_string(),
                    if p["leader"] == json!(0) { "-".to_owned() } else { p["leader"].to_string() },
                    p["term"].to_string(),
                    p["commit_index"].as_u64().map_or("-".to_owned(), |c| c.to_string()),
                    replicas.join(" "),
                ]);
            }
            out.push_str(&parts.render());
        }
        out
    }
}

/// Asks every node of the cluster `--addr` belongs to.
pub async fn status_view(cli: &Cli) -> anyhow::Result<StatusView> {
    match super::client(cli).await {
        Ok(client) => {
            let status = client.cluster_status().await?;
            Ok(StatusView { answers: status.nodes, map: Some(status.map) })
        }
        Err(_) => {
            // Not initialised (or unreachable): report what the seeds say.
            let mut answers = Vec::new();
            for addr in cli.seeds() {
                let answer = match crate::connect(&addr).await {
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

async fn status(cli: &Cli, with_partitions: bool) -> anyhow::Result<i32> {
    let view = status_view(cli).await?;
    if cli.json {
        print_json(&view.to_json());
    } else {
        print!("{}", view.render(with_partitions));
    }
    // Success when some node answered, initialised or not: scripts probe a
    // freshly started node with this command before `cluster init`.
    Ok(if view.answers.iter().any(|(_, r)| r.is_ok()) { 0 } else { 1 })
}
