//! The processing service of one partition, running on its leader.
//!
//! Ingest requests for the partition queue here (bounded). The processor
//! coalesces whatever is queued into one batch (group commit), drops
//! duplicates, pre-aggregates the rest into per (entity, type, minute)
//! deltas and proposes ONE Raft entry for the batch. Requests are answered
//! only after their entry is committed and applied.
//!
//! Exactly-once rests on three rules (argued in ARCHITECTURE.md):
//! 1. A leadership session starts only after `ensure_linearizable` succeeds
//!    in the session's term, i.e. after every entry committed before the term
//!    is applied — so the state machine's dedup index is complete.
//! 2. Within a session, keys of in-flight proposals are held in `pending`
//!    until their entry is applied (when the index has them).
//! 3. Any failed proposal ends the session; the next one begins with an
//!    empty `pending` and rule 1 again, so keys of entries that were never
//!    committed are forgotten and keys of entries that were are re-read.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use openraft::async_runtime::WatchReceiver;
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use openraft::{ReadPolicy, ServerState};

use crate::raft::quiesce::GroupQuiescence;
use tally_proto::time::{bucket_start, Granularity};
use tally_proto::v1::Event;
use tokio::sync::{mpsc, oneshot};

use crate::dedup::{dedup_key, DedupIndex};
use crate::raft::types::{Command, IngestBatch, MinuteDelta, NodeId};
use crate::RaftInstance;

/// Queued ingest requests per partition before senders wait.
pub const QUEUE_CAPACITY: usize = 4096;

#[derive(Debug, Clone)]
pub struct ProcessorConfig {
    /// Events per Raft entry at most.
    pub max_batch_events: usize,
    /// Entries proposed but not yet applied, per partition.
    pub max_inflight: usize,
    /// How long to wait for more requests when the pipeline is busy anyway.
    pub linger: Duration,
    pub dedup_window_ms: u64,
    /// How long a leader may take to become ready before callers are told
    /// to retry.
    pub ready_timeout: Duration,
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        ProcessorConfig {
            max_batch_events: 20_000,
            max_inflight: 4,
            linger: Duration::from_millis(1),
            dedup_window_ms: 10 * 60 * 1000,
            ready_timeout: Duration::from_secs(5),
        }
    }
}

/// Validated events of one partition from one caller.
pub struct IngestJob {
    pub events: Vec<Event>,
    pub reply: oneshot::Sender<ProposeOutcome>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProposeOutcome {
    /// `duplicates` holds the positions, within the job's events, of the
    /// events that were already counted.
    Done { accepted: u32, duplicates: Vec<u32> },
    NotLeader { leader: Option<NodeId> },
    Unavailable(String),
}

/// `quiet`: the group's quiescence, woken (and its lease renewed) before a
/// proposal to a quiesced leader.
pub fn spawn(
    raft: RaftInstance,
    dedup: Arc<DedupIndex>,
    config: ProcessorConfig,
    quiet: Arc<GroupQuiescence>,
) -> mpsc::Sender<IngestJob> {
    let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
    tokio::spawn(run(raft, dedup, config, quiet, rx));
    tx
}

async fn run(
    raft: RaftInstance,
    dedup: Arc<DedupIndex>,
    config: ProcessorConfig,
    quiet: Arc<GroupQuiescence>,
    mut rx: mpsc::Receiver<IngestJob>,
) {
    loop {
        let Some(term) = wait_until_ready_leader(&raft, &config, &mut rx).await else {
            return;
        };
        if !lead_session(&raft, &dedup, &config, &quiet, &mut rx, term).await {
            return;
        }
    }
}

fn leader_hint(raft: &RaftInstance) -> Option<NodeId> {
    raft.metrics().borrow_watched().current_leader
}

/// Answers jobs with NotLeader until this node leads and rule 1 holds.
/// Returns the session's term, or None when the queue is closed.
async fn wait_until_ready_leader(
    raft: &RaftInstance,
    config: &ProcessorConfig,
    rx: &mut mpsc::Receiver<IngestJob>,
) -> Option<u64> {
    let mut metrics = raft.metrics();
    loop {
        let (is_leader, term) = {
            let m = metrics.borrow_watched();
            (m.state == ServerState::Leader, m.current_term)
        };
        if is_leader {
            match tokio::time::timeout(config.ready_timeout, raft.ensure_linearizable(ReadPolicy::ReadIndex)).await {
                Ok(Ok(_)) => {
                    let m = raft.metrics().borrow_watched().clone();
                    if m.state == ServerState::Leader && m.current_term == term {
                        return Some(term);
                    }
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "not ready to lead yet"),
                Err(_) => tracing::warn!(term, "leader not ready in time"),
            }
            // Not ready (e.g. no quorum): answer waiting callers and retry.
            while let Ok(job) = rx.try_recv() {
                let _ = job.reply.send(ProposeOutcome::NotLeader { leader: leader_hint(raft) });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        tokio::select! {
            job = rx.recv() => {
                let job = job?;
                let _ = job.reply.send(ProposeOutcome::NotLeader { leader: leader_hint(raft) });
            }
            changed = metrics.changed() => {
                if changed.is_err() {
                    return None;
                }
            }
        }
    }
}

/// One proposal: the jobs it answers and what each contributed.
pub struct Proposal {
    jobs: Vec<(oneshot::Sender<ProposeOutcome>, u32, Vec<u32>)>,
    keys: Vec<u128>,
    /// The Raft command: per-minute deltas and the new dedup keys.
    pub command: Command,
}

/// Lead one term. Returns false when the queue is closed.
async fn lead_session(
    raft: &RaftInstance,
    dedup: &DedupIndex,
    config: &ProcessorConfig,
    quiet: &GroupQuiescence,
    rx: &mut mpsc::Receiver<IngestJob>,
    term: u64,
) -> bool {
    tracing::debug!(term, "leading partition");
    let mut pending: HashSet<u128> = HashSet::new();
    let mut inflight = FuturesUnordered::new();
    let mut queued: Vec<IngestJob> = Vec::new();
    let mut queued_events = 0usize;
    let mut failed = false;
    let mut open = true;
    let mut metrics = raft.metrics();

    loop {
        let still_leader = {
            let m = metrics.borrow_watched();
            m.state == ServerState::Leader && m.current_term == term
        };
        if !still_leader {
            failed = true;
        }
        // Propose when there is room; with proposals already in flight, give
        // more requests `linger` to join the batch.
        if !failed && !queued.is_empty() && inflight.len() < config.max_inflight {
            if !inflight.is_empty() && queued_events < config.max_batch_events / 2 {
                let deadline = tokio::time::sleep(config.linger);
                tokio::pin!(deadline);
                loop {
                    tokio::select! {
                        _ = &mut deadline => break,
                        job = rx.recv() => match job {
                            Some(job) => { queued_events += job.events.len(); queued.push(job); }
                            None => { open = false; break; }
                        }
                    }
                    if queued_events >= config.max_batch_events {
                        break;
                    }
                }
            }
            quiet.prepare_write().await;
            let proposal = build_proposal(dedup, &mut pending, std::mem::take(&mut queued), config);
            queued_events = 0;
            let raft = raft.clone();
            inflight.push(async move {
                let result = raft.client_write(proposal.command).await;
                (result, proposal.jobs, proposal.keys)
            });
        }
        if failed || !open {
            for job in queued.drain(..) {
                let _ = job.reply.send(ProposeOutcome::NotLeader { leader: leader_hint(raft) });
            }
            queued_events = 0;
            if inflight.is_empty() {
                return open;
            }
        }
        tokio::select! {
            job = rx.recv(), if open && !failed && queued_events < config.max_batch_events => match job {
                Some(job) => {
                    queued_events += job.events.len();
                    queued.push(job);
                    while queued_events < config.max_batch_events {
                        match rx.try_recv() {
                            Ok(job) => { queued_events += job.events.len(); queued.push(job); }
                            Err(_) => break,
                        }
                    }
                }
                None => open = false,
            },
            Some((result, jobs, keys)) = inflight.next() => {
                match result {
                    Ok(_) => {
                        // Applied: the index has these keys now (rule 2).
                        for k in &keys {
                            pending.remove(k);
                        }
                        for (reply, accepted, duplicates) in jobs {
                            let _ = reply.send(ProposeOutcome::Done { accepted, duplicates });
                        }
                    }
                    Err(e) => {
                        // Rule 3. The entry may still commit under the next
                        // leader; callers retry with the same event ids.
                        tracing::debug!(term, error = %e, "proposal failed; ending leadership session");
                        failed = true;
                        let outcome = match e.forward_to_leader() {
                            Some(f) => ProposeOutcome::NotLeader { leader: f.leader_id },
                            None => ProposeOutcome::Unavailable(e.to_string()),
                        };
                        for (reply, _, _) in jobs {
                            let _ = reply.send(outcome.clone());
                        }
                    }
                }
            },
            changed = metrics.changed() => {
                if changed.is_err() {
                    failed = true;
                }
            }
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Dedup and aggregate queued jobs into one command. Per-event work is in
/// memory only. Public for the micro-benchmarks (`benches/hot_path.rs`).
pub fn build_proposal(
    dedup: &DedupIndex,
    pending: &mut HashSet<u128>,
    jobs: Vec<IngestJob>,
    config: &ProcessorConfig,
) -> Proposal {
    let mut deltas: HashMap<(Vec<u8>, String, i64), (u64, i64)> = HashMap::new();
    let mut keys = Vec::new();
    let mut answered = Vec::with_capacity(jobs.len());
    let index = dedup.lock();
    for job in jobs {
        let (mut accepted, mut duplicates) = (0u32, Vec::new());
        for (position, event) in job.events.into_iter().enumerate() {
            if !event.event_id.is_empty() {
                let key = dedup_key(&event.entity_id, &event.event_type, &event.event_id);
                if index.contains(&key) || !pending.insert(key) {
                    duplicates.push(position as u32);
                    continue;
                }
                keys.push(key);
            }
            accepted += 1;
            let minute = bucket_start(Granularity::Minute, event.event_time_ms);
            let slot = deltas.entry((event.entity_id, event.event_type, minute)).or_default();
            slot.0 += 1;
            slot.1 = slot.1.saturating_add(event.value.unwrap_or(1));
        }
        answered.push((job.reply, accepted, duplicates));
    }
    drop(index);
    let deltas = deltas
        .into_iter()
        .map(|((entity_id, event_type, minute_ms), (count, sum))| MinuteDelta { entity_id, event_type, minute_ms, count, sum })
        .collect();
    let batch = IngestBatch {
        proposed_at_ms: now_ms(),
        dedup_window_ms: config.dedup_window_ms,
        deltas,
        dedup_keys: keys.clone(),
    };
    Proposal { jobs: answered, keys, command: Command::Ingest(batch) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(entity: &str, t: i64, id: &str, value: Option<i64>) -> Event {
        Event { entity_id: entity.into(), event_type: "view".into(), event_time_ms: t, event_id: id.into(), value }
    }

    #[test]
    fn proposal_drops_duplicates_and_aggregates_per_minute() {
        let index = DedupIndex::default();
        index.lock().insert_batch((0, 1), vec![dedup_key(b"a", "view", b"old")]);
        let mut pending = HashSet::new();
        pending.insert(dedup_key(b"a", "view", b"inflight"));
        let (tx1, _rx1) = oneshot::channel();
        let (tx2, _rx2) = oneshot::channel();
        let jobs = vec![
            IngestJob {
                events: vec![
                    ev("a", 60_000, "1", None),
                    ev("a", 60_500, "2", Some(5)),
                    ev("a", 60_700, "1", None),   // same batch
                    ev("a", 61_000, "old", None), // already applied
                ],
                reply: tx1,
            },
            IngestJob {
                events: vec![ev("a", 120_000, "inflight", None), ev("a", 119_999, "", Some(2)), ev("a", 119_999, "", Some(2))],
                reply: tx2,
            },
        ];
        let p = build_proposal(&index, &mut pending, jobs, &ProcessorConfig::default());
        let counts: Vec<(u32, Vec<u32>)> = p.jobs.iter().map(|(_, a, d)| (*a, d.clone())).collect();
        assert_eq!(counts, vec![(2, vec![2, 3]), (2, vec![0])]);
        let Command::Ingest(batch) = p.command else { panic!("not an ingest") };
        let mut deltas: Vec<_> = batch.deltas.iter().map(|d| (d.minute_ms, d.count, d.sum)).collect();
        deltas.sort();
        // Events without an id are never duplicates; the four accepted land in one minute.
        assert_eq!(deltas, vec![(60_000, 4, 10)]);
        assert_eq!(batch.dedup_keys.len(), 2);
        assert_eq!(pending.len(), 3);
    }
}
