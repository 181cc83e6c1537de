//! docs/BENCHMARKS.md from a [`Report`]: a pure function of the report, so
//! the tests can render the checked-in document's own JSON block again and
//! compare.

use std::fmt::Write as _;

use super::{Report, TargetResult};
use crate::measure::LatencyMs;

/// Everything from this line on in the existing file is hand-written
/// analysis, kept as it is when the report is written again.
pub const MARKER: &str = "<!-- analysis: kept by scripts/bench.sh -->";

/// A missing figure.
const NONE: &str = "—";

/// `1234567.8` → `1,234,568`.
fn thousands(v: f64) -> String {
    let rounded = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in rounded.chars().enumerate() {
        if i > 0 && (rounded.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0.0 && rounded != "0" {
        out.insert(0, '-');
    }
    out
}

/// A whole number of events/s etc., or the dash.
fn count(v: Option<f64>) -> String {
    v.map_or_else(|| NONE.to_owned(), thousands)
}

/// Two decimals (milliseconds, ratios), or the dash.
fn ms2(v: Option<f64>) -> String {
    v.map_or_else(|| NONE.to_owned(), |v| format!("{v:.2}"))
}

/// `decimals` decimals, or the dash.
fn fixed(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| NONE.to_owned(), |v| format!("{v:.decimals$}"))
}

/// A setting as people write it: `50`, `0.5`, `1.1` (at most 6 significant
/// digits, no trailing zeros).
fn short(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let digits = 6 - 1 - v.abs().log10().floor() as i32;
    let factor = 10f64.powi(digits.max(0));
    format!("{}", (v * factor).round() / factor)
}

fn describe(name: &str) -> &str {
    match name {
        "tally" => "Tally, 3 nodes, RF 3, ack after quorum commit of fsync'd logs",
        "redis-incr" => "Redis, 1 node, pipelined INCR (no dedup, no buckets, no persistence)",
        "redis-dedup" => "Redis, 1 node, Lua SET NX EX + 4× HINCRBY count/sum, pipelined (no persistence)",
        "etcd" => "etcd, 3 members, a put per event in txns of ≤128, fsync'd",
        other => other,
    }
}

fn latency(r: &TargetResult, pick: fn(&LatencyMs) -> Option<f64>) -> Option<f64> {
    r.latency_ms.as_ref().and_then(pick)
}

/// The comparison table, one row per system.
fn systems_table(report: &Report) -> Vec<String> {
    let mut lines = vec![
        "| system | events/s at saturation | p50 ms | p99 ms | p99.9 ms | latency run: target (achieved) events/s | CPU-s per M events (servers) | generator CPU µs per event | peak RSS per process (MiB) | verified |".to_owned(),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|".to_owned(),
    ];
    for r in &report.results {
        let desc = describe(&r.name);
        let Some(max_eps) = r.max_eps.filter(|v| *v != 0.0) else {
            lines.push(format!("| {desc} | failed | | | | | | | | |"));
            continue;
        };
        let rss: Vec<String> =
            r.peak_rss_kb_per_process.iter().map(|kb| format!("{:.0}", *kb as f64 / 1024.0)).collect();
        let verified = match r.verified {
            Some(true) => "yes".to_owned(),
            Some(false) => "MISMATCH".to_owned(),
            None => format!("no ({})", r.verify_skipped.as_deref().unwrap_or("not run")),
        };
        lines.push(format!(
            "| {desc} | {} | {} | {} | {} | {} ({}) | {} | {} | {} | {verified} |",
            thousands(max_eps),
            ms2(latency(r, |l| l.p50)),
            ms2(latency(r, |l| l.p99)),
            ms2(latency(r, |l| l.p999)),
            count(r.half_rate_eps),
            count(r.half_run.as_ref().map(|h| h.throughput_eps)),
            fixed(r.cpu_s_per_million_events, 1),
            ms2(r.generator_cpu_us_per_event),
            rss.join(", "),
        ));
    }
    lines
}

/// Tally ÷ each peer.
fn ratios_table(report: &Report) -> Vec<String> {
    let mut lines = vec![
        "| Tally ÷ | throughput | p99 latency | CPU-s per M events | peak RSS per process |".to_owned(),
        "|---|---:|---:|---:|---:|".to_owned(),
    ];
    for r in report.results.iter().filter(|r| r.name != "tally") {
        let Some(q) = report.ratios_tally_over.get(&r.name) else { continue };
        lines.push(format!(
            "| {} | {} | {} | {} | {} |",
            r.name,
            ms2(q.throughput),
            ms2(q.p99_latency),
            ms2(q.cpu_per_event),
            ms2(q.peak_rss)
        ));
    }
    lines
}

/// Reads beside the writes during Tally's latency run.
fn reads_table(report: &Report) -> Vec<String> {
    let reads = &report.tally_only.reads_during_half_run;
    let (q, v) = (reads.query_latency_ms.as_ref(), reads.visibility_ms.as_ref());
    if q.is_none() && v.is_none() {
        return Vec::new();
    }
    let mut rates = Vec::new();
    if let Some(q) = q {
        rates.push(format!("{} queries/s, Stats and Series alternately", short(q.rate)));
    }
    if let Some(v) = v {
        rates.push(format!("{} visibility probes/s", short(v.rate)));
    }
    let mut lines = vec![
        format!(
            "| Tally, during the 50% run ({}) | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | count | failed |",
            rates.join(", ")
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|".to_owned(),
    ];
    let row = |what: &str, l: &LatencyMs, failed: String| {
        format!(
            "| {what} | {} | {} | {} | {} | {} | {} | {failed} |",
            ms2(l.p50),
            ms2(l.p90),
            ms2(l.p99),
            ms2(l.p999),
            ms2(l.max),
            l.count
        )
    };
    if let Some(q) = q {
        for (what, k) in [("Stats over 30 days", &q.stats), ("Series of minute buckets over 2 hours", &q.series)] {
            lines.push(row(&format!("{what}, linearizable"), &k.latency, format!("{} errors", k.errors)));
        }
    }
    if let Some(v) = v {
        lines.push(row(
            "ack → visible in a stale read on a follower",
            &v.latency,
            format!("{} timeouts, {} errors", v.timeouts, v.errors),
        ));
    }
    lines
}

/// Per stage of Tally's latency run: samples summed over the nodes and the
/// worst node's figures (a slow node is what acks wait for).
fn stages_table(report: &Report) -> Vec<String> {
    let Some(doc) = report.results.iter().find(|r| r.name == "tally").and_then(|r| r.stages_half_run.as_ref()) else {
        return Vec::new();
    };
    let nodes: Vec<_> = doc.nodes.iter().filter_map(|n| n.stages.as_ref()).collect();
    if nodes.is_empty() {
        return Vec::new();
    }
    // Stage names in the order the nodes first report them.
    let mut by_name: Vec<(&str, Vec<&super::Stage>)> = Vec::new();
    for stages in &nodes {
        for st in stages.iter() {
            match by_name.iter_mut().find(|(n, _)| *n == st.name) {
                Some((_, v)) => v.push(st),
                None => by_name.push((&st.name, vec![st])),
            }
        }
    }
    let mut lines = vec![
        format!("| Tally, stage (50% run, {} nodes: samples summed, worst node's figures) | samples | mean ms | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | what it times |", nodes.len()),
        "|---|---:|---:|---:|---:|---:|---:|---:|---|".to_owned(),
    ];
    for (name, sts) in by_name {
        // The first node with the highest p99 (ties keep the earlier node).
        let mut worst = sts[0];
        for st in &sts[1..] {
            if st.p99_ms > worst.p99_ms {
                worst = st;
            }
        }
        let samples: u64 = sts.iter().map(|s| s.count).sum();
        lines.push(format!(
            "| `{name}` | {} | {} | {} | {} | {} | {} | {} | {} |",
            thousands(samples as f64),
            ms2(Some(worst.mean_ms)),
            ms2(Some(worst.p50_ms)),
            ms2(Some(worst.p90_ms)),
            ms2(Some(worst.p99_ms)),
            ms2(Some(worst.p999_ms)),
            ms2(Some(worst.max_ms)),
            worst.description
        ));
    }
    lines
}

/// The failover paragraph.
fn failover_text(report: &Report) -> Vec<String> {
    let Some(f) = &report.tally_only.failover else { return Vec::new() };
    if !f.ran {
        return vec!["Failover: did not run (see the log).".to_owned()];
    }
    let led: Vec<usize> = f.per_kill.iter().map(|k| k.partitions_led).collect();
    let fa = &f.first_ack_after_kill_ms;
    vec![format!(
        "Failover: {} kills -9 (of {} planned) of the node leading the most partitions ({}–{} of {}), each victim \
         restarted and every partition led again before the next kill, under ingest at {} events/s. Time from a kill \
         to the first acknowledged write on each partition the victim led, over all {} (partition, kill) pairs: p50 \
         {} ms, p99 {} ms, max {} ms; never acknowledged within {} s: {}. Ack latency of the background ingest over \
         its whole run: p99 {} ms.",
        f.kills,
        f.kills_wanted,
        led.iter().min().copied().unwrap_or(0),
        led.iter().max().copied().unwrap_or(0),
        f.partition_count.map_or_else(|| NONE.to_owned(), |p| p.to_string()),
        thousands(f.ingest_rate_eps),
        fa.count,
        ms2(fa.p50),
        ms2(fa.p99),
        ms2(fa.max),
        f.probe_timeout_s.map_or_else(|| NONE.to_owned(), short),
        f.never_acknowledged.map_or_else(|| NONE.to_owned(), |n| n.to_string()),
        ms2(f.ingest_latency_ms.and_then(|l| l.p99)),
    )]
}

/// The idle clusters.
fn idle_table(report: &Report) -> Vec<String> {
    let idle = &report.tally_only.idle;
    let Some(first) = idle.first() else { return Vec::new() };
    let mut lines = vec![
        format!("| idle cluster, no load | partitions | start → every partition led (s) | replicas quiesced per node | CPU % of one core per node ({} s) | peak RSS per node (MiB) |", short(first.sample_s)),
        "|---|---:|---:|---:|---:|---:|".to_owned(),
    ];
    let opt = |v: Option<u64>| v.map_or_else(|| "?".to_owned(), |v| v.to_string());
    for r in idle {
        let what = if r.tallyd_flags.is_empty() {
            "quiescence on (default)".to_owned()
        } else {
            format!("quiescence off (`tallyd {}`)", r.tallyd_flags)
        };
        let quiesced: Vec<String> = r
            .quiesced_per_node
            .iter()
            .zip(&r.replicas_per_node)
            .map(|(q, n)| format!("{}/{}", opt(*q), opt(*n)))
            .collect();
        let cpu: Vec<String> = r.cpu_pct_of_one_core_per_node.iter().map(|c| format!("{c:.1}")).collect();
        let rss: Vec<String> = r.peak_rss_mib_per_node.iter().map(|m| format!("{m:.0}")).collect();
        lines.push(format!(
            "| {what} | {} | {:.1} | {} | {} | {} |",
            thousands(f64::from(r.partitions)),
            r.start_to_all_leaders_s,
            if quiesced.is_empty() { NONE.to_owned() } else { quiesced.join(", ") },
            cpu.join(", "),
            rss.join(", ")
        ));
    }
    lines
}

/// The tables printed on the terminal at the end of a run.
pub fn summary(report: &Report) -> String {
    let mut blocks = vec![systems_table(report), ratios_table(report)];
    blocks
        .extend([reads_table(report), failover_text(report), idle_table(report)].into_iter().filter(|b| !b.is_empty()));
    blocks.iter().map(|b| b.join("\n")).collect::<Vec<_>>().join("\n\n") + "\n"
}

/// The generated part of docs/BENCHMARKS.md (everything before [`MARKER`]).
pub fn markdown(report: &Report) -> anyhow::Result<String> {
    let s = &report.settings;
    let w = &s.workload;
    let m = &report.machine;
    let v = &report.versions;
    let mut md: Vec<String> = Vec::new();
    md.push(format!(
        "# Benchmarks{}",
        if s.smoke { " (smoke run: seconds per system, numbers meaningless)" } else { "" }
    ));
    md.push(String::new());
    md.push(format!(
        "Generated by `scripts/bench.sh{}` on {}. Every system ran the same `tally bench` workload through its \
         target adapter, one system at a time, on loopback, with the load generator on the same machine.",
        if s.smoke { " --smoke" } else { "" },
        report.generated
    ));
    md.push(String::new());
    md.push(format!("**Machine:** {} CPUs ({}), {} MiB RAM, {}.  ", m.nproc, m.cpu_model, m.mem_total_mib, m.kernel));
    md.push(format!("**Versions:** {}; {}; {}.  ", v.tally, v.redis, v.etcd));
    md.push(format!(
        "**Workload:** Zipf({}) over {} entity ids, types {}, every event with an event_id, {}% re-sent duplicates, \
         event times uniform over the last {}, {} producer tasks, seed {}; {} per run. Saturation run as fast as the \
         system acknowledges; then a run at 50% of that rate for latency (measured from each event's scheduled send \
         time, so corrected for coordinated omission).",
        short(w.zipf),
        thousands(w.ids as f64),
        w.types,
        short(w.duplicates * 100.0),
        w.event_time_spread,
        w.producer_tasks,
        w.seed,
        s.duration_per_run
    ));
    md.push(String::new());
    md.push(systems_table(report).join("\n"));
    md.push(String::new());
    md.push(ratios_table(report).join("\n"));
    md.push(String::new());
    let alone: Vec<Vec<String>> =
        [reads_table(report), stages_table(report), failover_text(report), idle_table(report)]
            .into_iter()
            .filter(|b| !b.is_empty())
            .collect();
    if !alone.is_empty() {
        md.push("## Tally alone".to_owned());
        md.push(String::new());
        for block in alone {
            md.push(block.join("\n"));
            md.push(String::new());
        }
    }
    md.push(HOW_TO_READ.trim_end().to_owned());
    md.push(String::new());
    md.push(format!(
        "Settings: Tally {} build, {} nodes, RF {}, {} partitions, client batches of ≤{} events, {} ms linger. Redis \
         `{}`, pipelines of ≤{} commands, {} in flight over ≤8 connections. etcd `{}`, transactions of ≤{} puts, {} in \
         flight over 2 connections per member.",
        s.tally_profile,
        s.tally.nodes,
        s.tally.replication_factor,
        s.tally.partitions,
        s.tally.client_batch_events,
        s.tally.linger_ms,
        s.redis.flags,
        s.redis.batch_events,
        s.redis.batches_in_flight,
        s.etcd.flags,
        s.etcd.batch_events,
        s.etcd.batches_in_flight
    ));
    md.push(String::new());
    md.push("```json".to_owned());
    md.push(serde_json::to_string_pretty(report)?);
    md.push("```".to_owned());
    md.push(String::new());
    Ok(md.join("\n"))
}

/// `markdown(report)`, then the analysis of `existing` (the file's old
/// text) from [`MARKER`] on, if it has one.
pub fn document(report: &Report, existing: Option<&str>) -> anyhow::Result<String> {
    let mut out = markdown(report)?;
    if let Some(kept) = existing.and_then(|old| old.find(MARKER).map(|at| &old[at..])) {
        let _ = write!(out, "\n{kept}");
    }
    Ok(out)
}

const HOW_TO_READ: &str = "How to read it:

* events/s: events acknowledged per second in the saturation run (re-sent duplicates included).
* Latency: ack latency of the 50% run; if its achieved rate falls short of the target, the system could not sustain half its burst rate and the latency includes the growing backlog.
* Latency: ack latency of the 50% run. Tally and etcd acknowledge after a quorum has the write on disk; Redis acknowledges from memory.
* Generator CPU µs per event: `tally bench`'s own CPU (getrusage) over the saturation run's sending phase, per event sent; it shares the machine with the servers, so every µs it spends is taken from them.
* CPU-s per M events: utime+stime of all server processes (from /proc/<pid>/stat) during the saturation run, per million events sent. The load generator's own CPU is not included, but it shares the machine.
* Peak RSS: VmHWM of each server process at the end of its runs.
* Verified: counts queried back and compared with the acknowledged events (Tally: Stats; redis-dedup: month buckets via HGETALL). redis-incr does not dedup and etcd does not count, so they are not verified.
* Ratios are Tally ÷ peer from the same run: above 1 means Tally is faster (throughput) or costlier (latency, CPU, memory).
* Tally alone, reads: during the 50% run, `tally bench --query-rate 50` issued linearizable queries on the producers' keys (same Zipf), latency from each query's scheduled time; `--visibility-rate 20` wrote one event per probe to a fresh entity and, after its ack, polled a stale Stats on a follower of its partition every millisecond: the delay is ack → visible there.
* Tally alone, failover: `tally probe-writes` writes one event at a time (raw gRPC, no client retries, 500 ms per attempt) to every partition the killed node led, through the survivors, until one is acknowledged: the next attempt 10 ms after a failure, or beside an attempt that has hung for 100 ms. Times run from just before the kill. If the background ingest's latency is high, the survivors were saturated and the probes queued behind it.
* Tally alone, idle: a fresh cluster with no load, CPU (utime+stime) and peak RSS per tallyd, with quiescence on (sampled once every replica reports quiesced) and off.
";

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in report, rendered by the Python this module replaced.
    const CHECKED_IN: &str = include_str!("../../../docs/BENCHMARKS.md");

    fn checked_in_report() -> Report {
        let start = CHECKED_IN.find("```json\n").map(|i| i + "```json\n".len()).expect("a JSON block");
        let end = start + CHECKED_IN[start..].find("\n```").expect("the block ends");
        serde_json::from_str(&CHECKED_IN[start..end]).expect("the JSON block is a Report")
    }

    #[test]
    fn the_checked_in_report_renders_to_the_same_text() {
        let report = checked_in_report();
        let md = markdown(&report).expect("renders");
        let head = |t: &str| t[..t.find("```json").expect("json block")].to_owned();
        let (want, got) = (head(CHECKED_IN), head(&md));
        for (i, (w, g)) in want.lines().zip(got.lines()).enumerate() {
            assert_eq!(w, g, "line {}", i + 1);
        }
        assert_eq!(want, got);
    }

    #[test]
    fn the_analysis_after_the_marker_is_kept() {
        let report = checked_in_report();
        let doc = document(&report, Some(CHECKED_IN)).expect("renders");
        let kept = &CHECKED_IN[CHECKED_IN.find(MARKER).expect("marker")..];
        assert!(doc.ends_with(kept));
        assert!(doc.contains("```\n\n<!-- analysis"), "one blank line before the marker");
        let fresh = document(&report, None).expect("renders");
        assert!(!fresh.contains(MARKER));
        // The JSON block reads back as the same report.
        let again: Report = {
            let start = doc.find("```json\n").map(|i| i + 8).expect("block");
            let end = start + doc[start..].find("\n```").expect("end");
            serde_json::from_str(&doc[start..end]).expect("parses")
        };
        assert_eq!(markdown(&again).expect("renders"), markdown(&report).expect("renders"));
    }

    #[test]
    fn number_formats() {
        assert_eq!(thousands(59718.37), "59,718");
        assert_eq!(thousands(1_000_000.0), "1,000,000");
        assert_eq!(thousands(999.5), "1,000");
        assert_eq!(thousands(12.0), "12");
        assert_eq!(short(50.0), "50");
        assert_eq!(short(1.1), "1.1");
        assert_eq!(short(0.01 * 100.0), "1");
        assert_eq!(short(30.0), "30");
        assert_eq!(count(None), NONE);
        assert_eq!(ms2(Some(1233.919)), "1233.92");
    }
}
