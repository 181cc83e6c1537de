//! `tally dlq count|list|export`: the partitions' dead-letter logs — events
//! rejected as TOO_LATE, IN_FUTURE or INVALID, kept with the reason
//! (`Cluster.DeadLetters`, read at each partition's leader).
//!
//! `export` writes NDJSON that `tally ingest --file` reads back (it ignores
//! the extra `code`, `field`, `reason`, `rejected_at_ms` and `partition`
//! keys): fix the records, then ingest the file. The records keep their
//! event ids, so ingesting an export twice counts each event once.
//! Entity, event and actor ids that are not UTF-8 are written lossily
//! (the CLI's ingest reads text).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::json;
use tally_proto::v1::{DeadLetter, DeadLettersRequest, RejectionCode, StatusRequest};

use crate::{print_json, Cli};

#[derive(Subcommand, Debug)]
pub enum DlqCommand {
    /// Records each partition's log holds, by reason, and how many it
    /// dropped because it was full.
    Count(DlqScope),
    /// The oldest records (each with its reason), up to --limit.
    List {
        #[command(flatten)]
        scope: DlqScope,
        /// Records to show at most.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Every record as NDJSON that `tally ingest --file` reads back.
    Export {
        #[command(flatten)]
        scope: DlqScope,
        /// Write here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Only records with this code.
        #[arg(long, value_parser = ["too-late", "in-future", "invalid"])]
        code: Option<String>,
    },
}

#[derive(Args, Debug)]
pub struct DlqScope {
    /// One partition only (default: all).
    #[arg(long)]
    partition: Option<u32>,
}

/// Records a page asks for.
const PAGE: u32 = 1_000;
/// How long one page is retried while its partition has no reachable
/// leader (an election, a node just killed).
const RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(15);

type Client = tally_proto::v1::cluster_client::ClusterClient<tally_client::TokenChannel>;

/// One page, retried with backoff while the answer is UNAVAILABLE.
async fn page(client: &mut Client, req: DeadLettersRequest) -> anyhow::Result<tally_proto::v1::DeadLettersResponse> {
    let partition = req.partition;
    let deadline = std::time::Instant::now() + RETRY_FOR;
    let mut pause = std::time::Duration::from_millis(50);
    loop {
        match client.dead_letters(req.clone()).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) if s.code() == tonic::Code::Unavailable && std::time::Instant::now() + pause < deadline => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(1));
            }
            Err(s) => return Err(anyhow::anyhow!("partition {partition}: {}", s.message())),
        }
    }
}

async fn partitions(cli: &Cli, scope: &DlqScope) -> anyhow::Result<Vec<u32>> {
    let mut client = crate::cluster::raw_client(cli).await?;
    let count = client.status(StatusRequest {}).await?.into_inner().partition_count;
    if count == 0 {
        anyhow::bail!("the cluster is not initialised yet (see `tally cluster init`)");
    }
    match scope.partition {
        Some(p) if p >= count => anyhow::bail!("--partition {p}: the cluster has partitions 0 to {}", count - 1),
        Some(p) => Ok(vec![p]),
        None => Ok((0..count).collect()),
    }
}

fn code_name(code: i32) -> &'static str {
    match RejectionCode::try_from(code) {
        Ok(RejectionCode::TooLate) => "TOO_LATE",
        Ok(RejectionCode::InFuture) => "IN_FUTURE",
        Ok(RejectionCode::Invalid) => "INVALID",
        _ => "UNKNOWN",
    }
}

fn record_json(partition: u32, d: &DeadLetter) -> serde_json::Value {
    let e = d.event.clone().unwrap_or_default();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let mut doc = json!({
        "entity_id": text(&e.entity_id),
        "event_type": e.event_type,
        "event_time_ms": e.event_time_ms,
        "code": code_name(d.code),
        "field": d.field,
        "reason": d.reason,
        "rejected_at_ms": d.rejected_at_ms,
        "partition": partition,
    });
    if !e.event_id.is_empty() {
        doc["event_id"] = json!(text(&e.event_id));
    }
    if let Some(v) = e.value {
        doc["value"] = json!(v);
    }
    if !e.actor_id.is_empty() {
        doc["actor_id"] = json!(text(&e.actor_id));
    }
    if d.truncated {
        doc["truncated"] = json!(true);
    }
    doc
}

pub async fn run(cli: &Cli, command: &DlqCommand) -> anyhow::Result<i32> {
    let mut client = crate::cluster::raw_client(cli).await?;
    match command {
        DlqCommand::Count(scope) => {
            let mut rows = Vec::new();
            let (mut late, mut future, mut invalid, mut dropped) = (0u64, 0u64, 0u64, 0u64);
            for p in partitions(cli, scope).await? {
                let r = page(&mut client, DeadLettersRequest { partition: p, limit: 0, ..Default::default() }).await?;
                late += r.too_late;
                future += r.in_future;
                invalid += r.invalid;
                dropped += r.dropped;
                if r.too_late + r.in_future + r.invalid + r.dropped > 0 {
                    rows.push(json!({"partition": p, "too_late": r.too_late, "in_future": r.in_future,
                        "invalid": r.invalid, "dropped": r.dropped}));
                }
            }
            if cli.json {
                print_json(&json!({"too_late": late, "in_future": future, "invalid": invalid,
                    "total": late + future + invalid, "dropped": dropped, "partitions": rows}));
            } else {
                println!(
                    "dead letters: {} (too late {late}, in future {future}, invalid {invalid}); dropped when full: {dropped}",
                    late + future + invalid
                );
                for row in rows {
                    println!(
                        "  partition {}: too late {}, in future {}, invalid {}, dropped {}",
                        row["partition"], row["too_late"], row["in_future"], row["invalid"], row["dropped"]
                    );
                }
            }
            Ok(0)
        }
        DlqCommand::List { scope, limit } => {
            let mut shown = Vec::new();
            'partitions: for p in partitions(cli, scope).await? {
                let mut after = Vec::new();
                loop {
                    let want = (*limit - shown.len()).min(PAGE as usize) as u32;
                    if want == 0 {
                        break 'partitions;
                    }
                    let req = DeadLettersRequest { partition: p, after, limit: want, ..Default::default() };
                    let r = page(&mut client, req).await?;
                    shown.extend(r.records.iter().map(|d| record_json(p, d)));
                    if r.next_cursor.is_empty() {
                        break;
                    }
                    after = r.next_cursor;
                }
            }
            if cli.json {
                print_json(&json!({ "records": shown }));
            } else {
                for r in &shown {
                    println!(
                        "partition {} {} {} at {}: {} ({})",
                        r["partition"], r["entity_id"], r["event_type"], r["event_time_ms"], r["code"], r["reason"]
                    );
                }
                println!("{} records shown", shown.len());
            }
            Ok(0)
        }
        DlqCommand::Export { scope, out, code } => {
            let wanted = code.as_deref().map(|c| match c {
                "too-late" => RejectionCode::TooLate as i32,
                "in-future" => RejectionCode::InFuture as i32,
                _ => RejectionCode::Invalid as i32,
            });
            let mut sink: Box<dyn Write> = match out {
                Some(path) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
                )),
                None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
            };
            let mut written = 0u64;
            for p in partitions(cli, scope).await? {
                let mut after = Vec::new();
                loop {
                    let req = DeadLettersRequest { partition: p, after, limit: PAGE, ..Default::default() };
                    let r = page(&mut client, req).await?;
                    for d in r.records.iter().filter(|d| wanted.is_none_or(|c| c == d.code)) {
                        serde_json::to_writer(&mut sink, &record_json(p, d))?;
                        sink.write_all(b"\n")?;
                        written += 1;
                    }
                    if r.next_cursor.is_empty() {
                        break;
                    }
                    after = r.next_cursor;
                }
            }
            sink.flush()?;
            drop(sink);
            if out.is_some() {
                eprintln!("exported {written} dead letters");
            }
            Ok(0)
        }
    }
}
