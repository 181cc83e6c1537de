//! `tally` — the Tally command line: initialise and inspect a cluster,
//! ingest events, query stats and series.


use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde_json::json;
use tally_client::proto::v1::cluster_client::ClusterClient;
use tally_client::proto::v1::ingest_client::IngestClient;
use tally_client::proto::v1::query_client::QueryClient;
use tally_client::proto::v1::{
    Consistency, Event, Granularity, IngestRequest, InitializeRequest, NodeInfo, SeriesRequest, StatsRequest, StatusRequest,
};
use tally_client::time_arg::{format_ms, now_ms, parse_time};

#[derive(Parser)]
#[command(name = "tally", version, about = "Tally: exact real-time event counts")]
struct Cli {
    /// Node to talk to (host:port).
    #[arg(long, global = true, env = "TALLY_ADDR", default_value = "127.0.0.1:7001")]
    addr: String,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Cluster administration.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Ingest one event given by arguments.
    Ingest {
        entity: String,
        event_type: String,
        /// Event time (default now).
        #[arg(long, default_value = "now")]
        time: String,
        /// Idempotency key.
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        value: Option<i64>,
        /// Send the event this many times (distinct ids when --id is unset).
        #[arg(long, default_value_t = 1)]
        repeat: u32,
    },
    /// Count, sum and average over [from, to).
    Stats {
        entity: String,
        event_type: String,
        #[arg(long, default_value = "-30d")]
        from: String,
        #[arg(long, default_value = "+1m")]
        to: String,
        /// Read from any replica (cheaper, may lag).
        #[arg(long)]
        stale: bool,
    },
    /// Buckets of one granularity over [from, to).
    Series {
        entity: String,
        event_type: String,
        #[arg(long, default_value = "-1h")]
        from: String,
        #[arg(long, default_value = "+1m")]
        to: String,
        #[arg(long, default_value = "minute")]
        granularity: String,
        #[arg(long)]
        stale: bool,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Initialise a new cluster: --node 1=127.0.0.1:7001 --node 2=...
    Init {
        #[arg(long = "node", required = true)]
        nodes: Vec<String>,
        #[arg(long, default_value_t = 64)]
        partitions: u32,
        #[arg(long, default_value_t = 3)]
        replication_factor: u32,
    },
    /// Nodes, partitions and leaders.
    Status,
    /// Wait until the cluster is initialised and every partition has a leader.
    Wait {
        #[arg(long, default_value = "60s")]
        timeout: humantime::Duration,
    },
}

fn consistency(stale: bool) -> i32 {
    if stale { Consistency::Stale as i32 } else { Consistency::Linearizable as i32 }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let channel = tally_client::connect(&cli.addr).await.with_context(|| format!("connecting to {}", cli.addr))?;
    match cli.command {
        Command::Cluster { command: ClusterCommand::Init { nodes, partitions, replication_factor } } => {
            let nodes = nodes
                .iter()
                .map(|n| {
                    let (id, addr) = n.split_once('=').context("--node takes ID=HOST:PORT")?;
                    Ok(NodeInfo { node_id: id.parse().context("node id")?, addr: addr.to_string(), reachable: false })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let resp = ClusterClient::new(channel)
                .initialize(InitializeRequest { nodes, partitions, replication_factor })
                .await?
                .into_inner();
            if cli.json {
                println!("{}", json!({"already_initialized": resp.already_initialized}));
            } else if resp.already_initialized {
                println!("cluster was already initialised");
            } else {
                println!("cluster initialised");
            }
        }
        Command::Cluster { command: ClusterCommand::Status } => {
            let s = ClusterClient::new(channel).status(StatusRequest {}).await?.into_inner();
            if cli.json {
                let partitions: Vec<_> = s
                    .partitions
                    .iter()
                    .map(|p| json!({"partition": p.partition, "replicas": p.replicas, "leader": p.leader_node_id,
                        "term": p.term, "commit_index": p.commit_index, "applied_index": p.applied_index}))
                    .collect();
                let nodes: Vec<_> = s.nodes.iter().map(|n| json!({"node_id": n.node_id, "addr": n.addr})).collect();
                println!("{}", json!({"node_id": s.node_id, "initialized": s.initialized, "partition_count": s.partition_count,
                    "replication_factor": s.replication_factor, "metadata_leader": s.metadata_leader_node_id,
                    "nodes": nodes, "partitions": partitions}));
            } else {
                println!("answered by node {}; initialised: {}; {} partitions, replication factor {}; metadata leader: {}",
                    s.node_id, s.initialized, s.partition_count, s.replication_factor, s.metadata_leader_node_id);
                for n in &s.nodes {
                    let leads = s.partitions.iter().filter(|p| p.leader_node_id == n.node_id).count();
                    println!("  node {:>3}  {:<22} leads {leads} partitions", n.node_id, n.addr);
                }
                let leaderless = s.partitions.iter().filter(|p| p.leader_node_id == 0).count();
                println!("  partitions without a known leader: {leaderless}");
            }
        }
        Command::Cluster { command: ClusterCommand::Wait { timeout } } => {
            let deadline = std::time::Instant::now() + *timeout;
            let mut client = ClusterClient::new(channel);
            loop {
                let leaderless = match client.status(StatusRequest {}).await {
                    Ok(s) if s.get_ref().initialized => {
                        s.get_ref().partitions.iter().filter(|p| p.leader_node_id == 0).count()
                    }
                    _ => usize::MAX,
                };
                if leaderless == 0 {
                    if !cli.json {
                        println!("every partition has a leader");
                    }
                    break;
                }
                if std::time::Instant::now() > deadline {
                    bail!("cluster not ready after {timeout}: {} partitions without a leader",
                        if leaderless == usize::MAX { "all".to_string() } else { leaderless.to_string() });
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
        Command::Ingest { entity, event_type, time, id, value, repeat } => {
            let event_time_ms = parse_time(&time)?;
            let stamp = now_ms();
            let events = (0..repeat)
                .map(|i| Event {
                    entity_id: entity.clone().into_bytes(),
                    event_type: event_type.clone(),
                    event_time_ms,
                    event_id: id.clone().unwrap_or_else(|| format!("cli-{stamp}-{}-{i}", rand::random::<u32>())).into_bytes(),
                    value,
                })
                .collect();
            let resp = IngestClient::new(channel).ingest(IngestRequest { events }).await?.into_inner();
            if cli.json {
                let rejected: Vec<_> = resp.rejected.iter().map(|r| json!({"index": r.index, "field": r.field, "reason": r.reason, "retryable": r.retryable})).collect();
                println!("{}", json!({"accepted": resp.accepted, "duplicates": resp.duplicates, "rejected": rejected}));
            } else {
                println!("accepted {}, duplicates {}, rejected {}", resp.accepted, resp.duplicates, resp.rejected.len());
                for r in &resp.rejected {
                    println!("  event {}: {} {}", r.index, r.field, r.reason);
                }
            }
            if !resp.rejected.is_empty() {
                std::process::exit(2);
            }
        }
        Command::Stats { entity, event_type, from, to, stale } => {
            let req = StatsRequest {
                entity_id: entity.into_bytes(),
                event_type,
                from_ms: parse_time(&from)?,
                to_ms: parse_time(&to)?,
                consistency: consistency(stale),
            };
            let s = QueryClient::new(channel).stats(req).await?.into_inner();
            if cli.json {
                println!("{}", json!({"count": s.count, "sum": s.sum, "average": s.average,
                    "from_ms": s.effective_from_ms, "to_ms": s.effective_to_ms, "served_by": s.served_by_node_id}));
            } else {
                println!("count {}  sum {}  average {:.3}   [{} .. {})", s.count, s.sum, s.average,
                    format_ms(s.effective_from_ms), format_ms(s.effective_to_ms));
            }
        }
        Command::Series { entity, event_type, from, to, granularity, stale } => {
            let g = match granularity.as_str() {
                "minute" => Granularity::Minute,
                "hour" => Granularity::Hour,
                "day" => Granularity::Day,
                "month" => Granularity::Month,
                other => bail!("--granularity must be minute, hour, day or month, not {other:?}"),
            };
            let req = SeriesRequest {
                entity_id: entity.into_bytes(),
                event_type,
                from_ms: parse_time(&from)?,
                to_ms: parse_time(&to)?,
                granularity: g as i32,
                consistency: consistency(stale),
            };
            let s = QueryClient::new(channel).series(req).await?.into_inner();
            if cli.json {
                let buckets: Vec<_> = s.buckets.iter().map(|b| json!({"start_ms": b.start_ms, "count": b.count, "sum": b.sum})).collect();
                println!("{}", json!({"buckets": buckets}));
            } else {
                for b in &s.buckets {
                    println!("{}  {:>10}  {:>12}", format_ms(b.start_ms), b.count, b.sum);
                }
            }
        }
    }
    Ok(())
}
