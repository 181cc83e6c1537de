//! `tally ingest`: one event from arguments (optionally repeated), or a
//! stream of NDJSON or CSV records from a file or stdin.
//!
//! Files are streamed, never loaded whole: a reader thread parses records
//! and hands them over a bounded channel to the sender, which feeds
//! [`TallyClient::send`](tally_client::TallyClient::send); the client's bounded
//! buffer then paces the reader (backpressure all the way to the disk). A
//! collector awaits the outcomes and keeps totals plus the first
//! [`MAX_LISTED`] problems, so memory stays flat for any file size.
//!
//! Record fields (NDJSON keys or CSV header names): `entity_id` (or
//! `entity`), `event_type` (or `type`), optional `time` (epoch ms, RFC 3339,
//! `now`, `-5m`; alias `event_time_ms`, default now), optional `event_id`
//! (alias `id`; assigned by the client when absent), optional `value`.
//!
//! JSON summary (`--json`): `{"events", "accepted", "duplicates",
//! "rejected", "failed", "problems": [{"line", "field", "reason"}],
//! "elapsed_ms", "events_per_sec"}`; `line` is the record's line number in
//! the input (1-based; for argument events, the repetition number).

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use futures::stream::{FuturesUnordered, StreamExt};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;

use crate::{print_json, Cli, EXIT_PARTIAL};
use tally_client::time_arg::{now_ms, parse_time};
use tally_client::{Event, IngestSummary, Outcome, Ticket};

/// Problems listed individually in the summary; the rest are only counted.
pub const MAX_LISTED: usize = 100;

/// Input formats for `--file`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// One JSON object per line.
    Ndjson,
    /// Comma-separated with a header row.
    Csv,
}

/// Arguments of `tally ingest`.
#[derive(Debug, Args)]
pub struct IngestArgs {
    /// Entity id of a single event (omit to read records from --file/stdin).
    pub entity: Option<String>,
    /// Event type of a single event.
    pub event_type: Option<String>,
    /// Event time of the single event (default now).
    #[arg(long, default_value = "now", allow_hyphen_values = true)]
    pub time: String,
    /// Idempotency key of the single event.
    #[arg(long)]
    pub id: Option<String>,
    /// Value of the single event (default 1).
    #[arg(long)]
    pub value: Option<i64>,
    /// Send the single event this many times (distinct ids unless --id).
    #[arg(long, default_value_t = 1)]
    pub repeat: u32,
    /// Read records from this file ("-" for stdin).
    #[arg(long, short = 'f')]
    pub file: Option<PathBuf>,
    /// Record format; default from the file extension (.csv), else NDJSON.
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// One input record as written in NDJSON or CSV.
#[derive(Debug, Deserialize)]
struct Record {
    #[serde(alias = "entity")]
    entity_id: String,
    #[serde(alias = "type")]
    event_type: String,
    #[serde(default, alias = "event_time_ms")]
    time: Option<serde_json::Value>,
    #[serde(default, alias = "id")]
    event_id: Option<String>,
    #[serde(default)]
    value: Option<i64>,
    /// Who caused it (for unique counts).
    #[serde(default, alias = "actor")]
    actor_id: Option<String>,
}

/// A parsed record or why it could not be.
type Parsed = Result<Event, (&'static str, String)>;

fn to_event(record: Record, now: i64) -> Parsed {
    let event_time_ms = match record.time {
        None | Some(serde_json::Value::Null) => now,
        Some(serde_json::Value::Number(n)) => n.as_i64().ok_or(("event_time_ms", format!("{n} is not an integer")))?,
        Some(serde_json::Value::String(s)) if s.is_empty() => now,
        Some(serde_json::Value::String(s)) => parse_time(&s).map_err(|e| ("event_time_ms", e.to_string()))?,
        Some(other) => return Err(("event_time_ms", format!("{other} is not a time"))),
    };
    Ok(Event {
        actor_id: record.actor_id.unwrap_or_default().into_bytes(),
        entity_id: record.entity_id.into_bytes(),
        event_type: record.event_type,
        event_time_ms,
        event_id: record.event_id.unwrap_or_default().into_bytes(),
        value: record.value,
    })
}

/// Parses NDJSON lines; blank lines are skipped.
pub fn parse_ndjson_line(line: &str, now: i64) -> Option<Parsed> {
    let line = line.trim();
    if line.is_empty() {
        return None;
    }
    Some(match serde_json::from_str::<Record>(line) {
        Ok(record) => to_event(record, now),
        Err(e) => Err(("record", format!("not a valid event object: {e}"))),
    })
}

/// Counts bytes read, for the progress bar.
struct Counting<R> {
    inner: R,
    bar: ProgressBar,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}

/// Reads records on a blocking thread and sends (line, parsed) pairs.
fn spawn_reader(
    input: Box<dyn Read + Send>,
    format: Format,
    tx: mpsc::Sender<(u64, Parsed)>,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    tokio::task::spawn_blocking(move || {
        let now = now_ms();
        match format {
            Format::Ndjson => {
                for (i, line) in BufReader::new(input).lines().enumerate() {
                    let line = line.context("reading input")?;
                    if let Some(parsed) = parse_ndjson_line(&line, now) {
                        if tx.blocking_send((i as u64 + 1, parsed)).is_err() {
                            break;
                        }
                    }
                }
            }
            Format::Csv => {
                let mut reader = csv::ReaderBuilder::new().trim(csv::Trim::All).from_reader(input);
                let headers = reader.headers().context("reading the CSV header")?.clone();
                let mut row = csv::StringRecord::new();
                loop {
                    let parsed = match reader.read_record(&mut row) {
                        Ok(false) => break,
                        Ok(true) => row
                            .deserialize::<Record>(Some(&headers))
                            .map_err(|e| ("record", format!("not a valid event row: {e}")))
                            .and_then(|record| to_event(record, now)),
                        Err(e) if matches!(e.kind(), csv::ErrorKind::Io(_)) => {
                            return Err(e).context("reading input");
                        }
                        Err(e) => Err(("record", e.to_string())),
                    };
                    let line = row.position().map_or(0, csv::Position::line);
                    if tx.blocking_send((line, parsed)).is_err() {
                        break;
                    }
                }
            }
        }
        Ok(())
    })
}

fn progress(args: &IngestArgs, cli: &Cli, total_bytes: Option<u64>) -> ProgressBar {
    if args.quiet || cli.json {
        return ProgressBar::hidden();
    }
    let bar = match total_bytes {
        Some(len) => ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr()).with_style(
            ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {msg} ({eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        ),
        None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()).with_style(
            ProgressStyle::with_template("{spinner} {bytes} read {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    };
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

#[derive(Default)]
struct Collected {
    summary: IngestSummary,
    problems: Vec<serde_json::Value>,
}

pub(crate) async fn run(cli: &Cli, args: &IngestArgs) -> anyhow::Result<i32> {
    let started = Instant::now();
    let client = crate::client(cli).await?;
    let (tx, mut rx) = mpsc::channel::<(u64, Parsed)>(8192);
    let bar;
    let reader = match (&args.entity, &args.event_type, &args.file) {
        (Some(entity), Some(event_type), None) => {
            bar = ProgressBar::hidden();
            let event_time_ms = parse_time(&args.time)?;
            let (entity, event_type, id, value, repeat) =
                (entity.clone(), event_type.clone(), args.id.clone(), args.value, args.repeat);
            tokio::spawn(async move {
                for i in 0..repeat {
                    let event = Event {
                        actor_id: Vec::new(),
                        entity_id: entity.clone().into_bytes(),
                        event_type: event_type.clone(),
                        event_time_ms,
                        event_id: id.clone().unwrap_or_default().into_bytes(),
                        value,
                    };
                    if tx.send((u64::from(i) + 1, Ok(event))).await.is_err() {
                        break;
                    }
                }
                Ok(())
            })
        }
        (Some(_), None, _) => bail!("give both ENTITY and EVENT_TYPE, or neither to read records"),
        (Some(_), Some(_), Some(_)) => bail!("give either ENTITY EVENT_TYPE or --file, not both"),
        (None, _, file) => {
            let path = file.clone().filter(|p| p.as_os_str() != "-");
            let format = args.format.unwrap_or(match &path {
                Some(p) if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv")) => Format::Csv,
                _ => Format::Ndjson,
            });
            let (input, len): (Box<dyn Read + Send>, Option<u64>) = match &path {
                Some(p) => {
                    let f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
                    let len = f.metadata().ok().map(|m| m.len());
                    (Box::new(f), len)
                }
                None => (Box::new(std::io::stdin()), None),
            };
            bar = progress(args, cli, len);
            spawn_reader(Box::new(Counting { inner: input, bar: bar.clone() }), format, tx)
        }
    };

    // The collector awaits outcomes while the loop below keeps sending.
    let (ticket_tx, mut ticket_rx) = mpsc::channel::<(u64, Ticket)>(8192);
    let collector = tokio::spawn(async move {
        let mut collected = Collected::default();
        let mut pending = FuturesUnordered::new();
        loop {
            tokio::select! {
                next = ticket_rx.recv() => match next {
                    Some((line, ticket)) => pending.push(async move { (line, ticket.await) }),
                    None => break,
                },
                Some((line, outcome)) = pending.next() => record(&mut collected, line, &outcome),
            }
        }
        while let Some((line, outcome)) = pending.next().await {
            record(&mut collected, line, &outcome);
        }
        collected
    });
    let mut events = 0u64;
    while let Some((line, parsed)) = rx.recv().await {
        events += 1;
        let ticket = match parsed {
            Ok(event) => client.send(event).await?,
            Err((field, reason)) => Ticket::ready(Outcome::Rejected { field: field.to_owned(), reason }),
        };
        if ticket_tx.send((line, ticket)).await.is_err() {
            break;
        }
        if events & 1023 == 0 {
            bar.set_message(format!("{events} events"));
        }
    }
    reader.await.context("input reader")??;
    client.flush().await?;
    drop(ticket_tx);
    let collected = collector.await.context("outcome collector")?;
    bar.finish_and_clear();

    let s = collected.summary;
    // Per-event outcomes are exact (and agree with `client.totals()`).
    let (accepted, duplicates) = (s.accepted, s.duplicates);
    let elapsed = started.elapsed();
    if cli.json {
        print_json(&json!({
            "events": events, "accepted": accepted, "duplicates": duplicates,
            "rejected": s.rejected, "failed": s.failed, "problems": collected.problems,
            "elapsed_ms": elapsed.as_millis() as u64,
            "events_per_sec": (events as f64 / elapsed.as_secs_f64().max(1e-9)).round(),
        }));
    } else {
        let mut line = format!("accepted {accepted}, duplicates {duplicates}, rejected {}", s.rejected);
        if s.failed > 0 {
            line.push_str(&format!(", failed {}", s.failed));
        }
        println!("{line}");
        for p in &collected.problems {
            println!(
                "  event {}: {} {}",
                p["line"],
                p["field"].as_str().unwrap_or(""),
                p["reason"].as_str().unwrap_or("")
            );
        }
        let listed = collected.problems.len() as u64;
        if s.rejected + s.failed > listed {
            println!("  ... and {} more", s.rejected + s.failed - listed);
        }
        if events > 1 {
            eprintln!("{events} events in {:.1?} ({:.0}/s)", elapsed, events as f64 / elapsed.as_secs_f64().max(1e-9));
        }
    }
    Ok(if s.rejected + s.failed > 0 { EXIT_PARTIAL } else { 0 })
}

fn record(collected: &mut Collected, line: u64, outcome: &Outcome) {
    collected.summary.add(outcome);
    if collected.problems.len() < MAX_LISTED {
        match outcome {
            Outcome::Rejected { field, reason } => {
                collected.problems.push(json!({"line": line, "field": field, "reason": reason}));
            }
            Outcome::Failed { error, attempts } => collected.problems.push(
                json!({"line": line, "field": "", "reason": format!("failed after {attempts} attempts: {error}")}),
            ),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ndjson_records() {
        let e = parse_ndjson_line(r#"{"entity_id":"v1","event_type":"view","time":1000,"event_id":"a","value":3}"#, 5)
            .and_then(Result::ok)
            .expect("valid");
        assert_eq!(
            (e.entity_id.as_slice(), e.event_type.as_str(), e.event_time_ms, e.value),
            (&b"v1"[..], "view", 1000, Some(3))
        );
        assert_eq!(e.event_id, b"a");
        let e = parse_ndjson_line(r#"{"entity":"v1","type":"like"}"#, 5).and_then(Result::ok).expect("aliases");
        assert_eq!(e.event_time_ms, 5);
        let e = parse_ndjson_line(r#"{"entity":"v1","type":"like","time":"1970-01-01T00:01:00Z"}"#, 5)
            .and_then(Result::ok)
            .expect("rfc 3339");
        assert_eq!(e.event_time_ms, 60_000);
        assert!(parse_ndjson_line("   ", 5).is_none());
        assert!(matches!(parse_ndjson_line("{not json", 5), Some(Err(("record", _)))));
        assert!(matches!(
            parse_ndjson_line(r#"{"entity":"v","type":"t","time":"soon"}"#, 5),
            Some(Err(("event_time_ms", _)))
        ));
    }
}
