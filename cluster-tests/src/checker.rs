//! The exactly-once checker shared by the fault tests: writers that retry
//! with the same ids and record, per event, what was attempted and what was
//! acknowledged; and the check that the cluster counts each acknowledged
//! event exactly once — counts and exact sums — on identical replicas, with
//! no event caught by the state machine's dedup tripwire.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tally_proto::v1::{Event, StatsRequest};

use crate::ingestor::RetryingIngestor;
use crate::model::{Model, Workload};
use crate::TestCluster;

#[derive(Default)]
pub struct History {
    pub attempted: Model,
    pub acknowledged: Model,
    pub batches_attempted: u64,
    /// Batches with at least one event given up (its other events may
    /// still be acknowledged, and are checked exactly).
    pub batches_given_up: u64,
    /// The events sent to be refused (one per batch, a day ahead:
    /// IN_FUTURE), those acknowledged all the same (a leader whose clock no
    /// peer had checked yet does not judge times), and how many replies
    /// refused one.
    pub doomed_attempted: Model,
    pub doomed_acknowledged: Model,
    pub refused: u64,
}

/// Writers ingesting until stopped.
pub struct Writers {
    pub history: Arc<Mutex<History>>,
    stop: Arc<AtomicBool>,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    /// `workloads.len()` writers, each sending batches of `batch` events
    /// from its workload and retrying each for up to `patience`.
    pub fn spawn(ingestor: &RetryingIngestor, workloads: Vec<Workload>, batch: usize, patience: Duration) -> Writers {
        let history = Arc::new(Mutex::new(History::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let handles = workloads
            .into_iter()
            .enumerate()
            .map(|(w, mut workload)| {
                let (history, stop, ingestor) = (history.clone(), stop.clone(), ingestor.clone());
                tokio::spawn(async move {
                    let mut i = w as u64;
                    while !stop.load(Ordering::Relaxed) {
                        let mut events: Vec<Event> = (0..batch).map(|_| workload.event()).collect();
                        {
                            let mut h = history.lock().unwrap_or_else(|p| p.into_inner());
                            h.batches_attempted += 1;
                            events.iter().for_each(|e| h.attempted.record(e));
                        }
                        // One event per batch the cluster must refuse and
                        // keep in its dead-letter log, never count: the
                        // entries mix counts and dead letters through
                        // every fault, and digests compare both.
                        let doomed = workload.doomed_event();
                        history.lock().unwrap_or_else(|p| p.into_inner()).doomed_attempted.record(&doomed);
                        events.insert(events.len() / 2, doomed);
                        let tracked = ingestor.send_tracked(events, i, patience).await;
                        let mut h = history.lock().unwrap_or_else(|p| p.into_inner());
                        h.refused += tracked.refused;
                        for e in &tracked.acknowledged {
                            if e.entity_id.starts_with(crate::model::DOOMED_PREFIX.as_bytes()) {
                                h.doomed_acknowledged.record(e);
                            } else {
                                h.acknowledged.record(e);
                            }
                        }
                        if let Some(e) = tracked.given_up {
                            eprintln!("writer {w}: part of a batch given up: {e}");
                            h.batches_given_up += 1;
                        }
                        i += 1;
                    }
                })
            })
            .collect();
        Writers { history, stop, handles }
    }

    /// Stop and wait for the writers; returns what they did.
    pub async fn finish(self) -> History {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles {
            let _ = h.await;
        }
        std::mem::take(&mut *self.history.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Every violation of exactly-once the cluster shows for `history` over
/// [from, to) (minute-aligned), read linearizably through `via`:
/// - an (entity, type) whose events were all acknowledged must have exactly
///   their count and exact sum;
/// - otherwise acknowledged ≤ count ≤ attempted;
/// - replica digests identical; the dedup tripwire at 0 on every node.
pub async fn violations(
    cluster: &TestCluster,
    history: &History,
    via: u64,
    from: i64,
    to: i64,
) -> anyhow::Result<Vec<String>> {
    let mut violations = Vec::new();
    let mut query = cluster.query_client(via).await?;
    for (entity, event_type) in history.attempted.keys() {
        let s = stats(&mut query, entity, event_type, from, to).await?;
        // Retention may have widened the range to coarser buckets: the
        // model is asked about the range the cluster says it counted.
        let (from, to) = (s.effective_from_ms, s.effective_to_ms);
        let sum: i128 = s.sum_exact.parse().unwrap_or(s.sum as i128);
        let (acked, acked_sum) = history.acknowledged.exact_stats(entity, event_type, from, to);
        let (attempted, _) = history.attempted.exact_stats(entity, event_type, from, to);
        let ok = if acked == attempted {
            (s.count, sum) == (acked, acked_sum)
        } else {
            acked <= s.count && s.count <= attempted
        };
        if !ok {
            let partition = tally_proto::partition::partition_of(entity, cluster.partitions);
            violations.push(format!(
                "{}/{event_type} (partition {partition}): count {} sum {sum}, but acknowledged {acked} (sum {acked_sum}), attempted {attempted}",
                String::from_utf8_lossy(entity),
                s.count
            ));
        }
    }
    violations.extend(top_k_violations(cluster, history, via, from, to).await?);
    violations.extend(dead_letter_violations(cluster, history, via).await?);
    violations.extend(audit_violations(cluster, history, via, from, to).await?);
    if let Err(e) = cluster.assert_replicas_identical(Duration::from_secs(60)).await {
        violations.push(format!("{e}"));
    }
    let conflicts = cluster.dedup_conflicts().await?;
    if conflicts != 0 {
        violations.push(format!("the state machines refused {conflicts} events as already counted (dedup_conflicts)"));
    }
    Ok(violations)
}

/// With the raw-event log on, a recount from it must agree with the counts
/// for every series audited (the first [`AUDITED`] the workload touched):
/// it holds exactly what apply counted, whatever the faults.
async fn audit_violations(
    cluster: &TestCluster,
    history: &History,
    via: u64,
    from: i64,
    to: i64,
) -> anyhow::Result<Vec<String>> {
    const AUDITED: usize = 24;
    let raw_on = cluster.status(via).await?.ingest_policy.and_then(|p| p.raw_log_max_events).unwrap_or(0) > 0;
    if !raw_on {
        return Ok(Vec::new());
    }
    let mut violations = Vec::new();
    let mut query = cluster.query_client(via).await?;
    eprintln!("auditing {} series against the raw-event log", history.attempted.keys().take(AUDITED).count());
    for (entity, event_type) in history.attempted.keys().take(AUDITED) {
        let request = tally_proto::v1::AuditRequest {
            entity_id: entity.clone(),
            event_type: event_type.clone(),
            from_ms: from,
            to_ms: to,
            consistency: 0,
        };
        let reply = query.audit(request).await?.into_inner();
        if !reply.differences.is_empty() || reply.raw_log_dropped != 0 {
            violations.push(format!(
                "audit of {}/{event_type}: recounted {} but counted {} ({} minutes differ, {} raw events dropped)",
                String::from_utf8_lossy(entity),
                reply.raw_count,
                reply.counted,
                reply.differences.len(),
                reply.raw_log_dropped
            ));
        }
    }
    Ok(violations)
}

/// The refused events: never counted, and every refusal in the partition's
/// dead-letter log (a refusal is answered only once its entry is applied;
/// a resent one may be there twice, so at least as many; nothing dropped).
async fn dead_letter_violations(cluster: &TestCluster, history: &History, via: u64) -> anyhow::Result<Vec<String>> {
    let mut violations = Vec::new();
    let mut query = cluster.query_client(via).await?;
    let now = tally_client::time_arg::now_ms();
    let (from, to) = (now - tally_proto::time::DAY_MS, now + 3 * tally_proto::time::DAY_MS);
    for (entity, event_type) in history.doomed_attempted.keys() {
        let s = stats(&mut query, entity, event_type, from, to).await?;
        let (acked, _) = history.doomed_acknowledged.exact_stats(entity, event_type, from, to);
        let (attempted, _) = history.doomed_attempted.exact_stats(entity, event_type, from, to);
        let exact = history.batches_given_up == 0;
        if (exact && s.count != acked) || s.count < acked || s.count > attempted {
            violations.push(format!(
                "{}: {} events meant to be refused counted; {acked} of {attempted} were acknowledged",
                String::from_utf8_lossy(entity),
                s.count
            ));
        }
    }
    let mut admin = cluster.cluster_client(via).await?;
    let (mut kept, mut dropped) = (0u64, 0u64);
    // Split-off partitions included.
    let partitions = cluster.status(via).await?.partition_count;
    for partition in 0..partitions {
        let req = tally_proto::v1::DeadLettersRequest { partition, ..Default::default() };
        let page = admin.dead_letters(req).await?.into_inner();
        kept += page.in_future;
        dropped += page.dropped;
    }
    if kept < history.refused || dropped != 0 {
        violations.push(format!(
            "dead-letter logs hold {kept} IN_FUTURE records (dropped {dropped}), but {} refusals were answered",
            history.refused
        ));
    }
    Ok(violations)
}

/// TopK over the run, per event type: each entry's count equals what Stats
/// answers for that entity, and no entity with more *acknowledged* events
/// than the last entry's count is missing (its true count can only be
/// higher). Holds however many unacknowledged events were counted.
async fn top_k_violations(
    cluster: &TestCluster,
    history: &History,
    via: u64,
    from: i64,
    to: i64,
) -> anyhow::Result<Vec<String>> {
    const K: u32 = 20;
    let (from, to) = tally_proto::time::align_range_to_hours(from, to);
    let mut violations = Vec::new();
    let mut query = cluster.query_client(via).await?;
    let types: std::collections::BTreeSet<&String> = history.attempted.keys().map(|(_, t)| t).collect();
    for event_type in types {
        let top = query
            .top_k(tally_proto::v1::TopKRequest {
                event_type: event_type.clone(),
                from_ms: from,
                to_ms: to,
                k: K,
                order: 0,
                consistency: 0,
                partitions: vec![],
            })
            .await?
            .into_inner();
        let (from, to) = (top.effective_from_ms, top.effective_to_ms);
        for e in &top.entries {
            let s = stats(&mut query, &e.entity_id, event_type, from, to).await?;
            if (s.count, &s.sum_exact) != (e.count, &e.sum_exact) {
                violations.push(format!(
                    "TopK {event_type}: {} has count {} sum {}, Stats says {} sum {}",
                    String::from_utf8_lossy(&e.entity_id),
                    e.count,
                    e.sum_exact,
                    s.count,
                    s.sum_exact
                ));
            }
        }
        let last = if top.entries.len() == K as usize { top.entries.last().map(|e| e.count).unwrap_or(0) } else { 0 };
        for (entity, t) in history.attempted.keys().filter(|(_, t)| t == event_type) {
            let (acked, _) = history.acknowledged.exact_stats(entity, t, from, to);
            if acked > last && !top.entries.iter().any(|e| &e.entity_id == entity) {
                violations.push(format!(
                    "TopK {event_type}: {} ({acked} acknowledged) is missing; the last of {K} has {last}",
                    String::from_utf8_lossy(entity)
                ));
            }
        }
    }
    Ok(violations)
}

/// A linearizable `Stats` of one (entity, type) over [from, to).
async fn stats(
    query: &mut tally_proto::v1::query_client::QueryClient<tally_client::TokenChannel>,
    entity: &[u8],
    event_type: &str,
    from: i64,
    to: i64,
) -> anyhow::Result<tally_proto::v1::StatsResponse> {
    let request = StatsRequest {
        entity_id: entity.to_vec(),
        event_type: event_type.into(),
        from_ms: from,
        to_ms: to,
        consistency: 0,
        share_partition_plus_one: 0,
    };
    // UNAVAILABLE is the retryable answer a client retries: the balancer
    // may still move a leadership while the checker reads.
    let mut attempt = 0;
    loop {
        match query.stats(request.clone()).await {
            Ok(reply) => return Ok(reply.into_inner()),
            Err(status) if status.code() == tonic::Code::Unavailable && attempt < 40 => {
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            Err(status) => return Err(status.into()),
        }
    }
}
