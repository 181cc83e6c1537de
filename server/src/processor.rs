//! The processing service of one partition, running on its leader.
//!
//! Ingest requests for the partition queue here (bounded). The processor
//! coalesces whatever is queued into one batch (group commit), drops
//! duplicates, pre-aggregates the rest into per (entity, type, minute)
//! deltas and proposes ONE Raft entry for the batch. Requests are answered
//! only after their entry is committed and applied.
//!
//! Exactly-once rests on these rules (argued in ARCHITECTURE.md):
//! 1. A leadership session starts once a quorum has answered this leader in
//!    its term (openraft's write lease; in practice the blank entry's
//!    commit), without waiting for earlier entries to apply (that wait cost
//!    150-300 ms per failover on a busy machine). Until they are applied its
//!    dedup view may miss their keys: proposals built until then are marked
//!    `provisional`, such events go into the entry as new and rule 5 takes
//!    them back out. The view only decides replies early, never counts.
//! 2. Every proposal is bound to the session's leader id (term and node,
//!    openraft's `with_leader`): a proposal built from one term's view can
//!    never be appended in another.
//! 3. Within a session, keys of in-flight proposals are held in `pending`
//!    until their entry is applied (when the index has them).
//! 4. Any failed proposal ends the session; the next one begins with an
//!    empty `pending` and rule 1 again.
//! 5. The state machine has the last word: an entry lists each keyed event
//!    with its delta, and apply takes back out any event whose key is
//!    already counted, and the reply is corrected from apply's outcome. A
//!    dedup view that lags (rule 1) or a mistake in rules 2–4 costs a larger
//!    entry at worst, never a count.
//!
//! Dedup keys are stamped with the cluster-checked clock (`clock.rs`), never
//! below the previous stamp of the log. Event times are checked against the
//! same stamp (the cluster's `IngestPolicy`): events too late or too far
//! ahead are answered as rejected and go into the entry as dead letters
//! (`storage/entry_log.rs`), with the events the API refused for their
//! fields. Duplicates are decided first: a retry of an event that was
//! counted is a duplicate even if its time has since become too late.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use openraft::async_runtime::WatchReceiver;
use openraft::error::ClientWriteError;
use openraft::impls::ProgressResponder;
use openraft::{LinearizerOption, ServerState};
use tally_proto::time::{bucket_start, Granularity};
use tally_proto::v1::Event;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::archive_manifest::SharedManifest;
use crate::clock::ClusterClock;
use crate::command::{
    Command, CommandOutcome, DeadLetter, DeadLetterReason, IngestBatch, KeyedEvent, MinuteDelta, RawEvent,
    MAX_ENTRY_BYTES,
};
use crate::dedup::{dedup_key, DedupIndex};
use crate::load::PartitionLoad;
use crate::meta::{ClusterMap, IngestPolicy, TimeRejection};
use crate::moved::{MovedEntities, SharedMoved};
use crate::raft::quiesce::GroupQuiescence;
use crate::stages::{self, Stage};
use crate::type_config::NodeId;
use crate::RaftInstance;

/// Queued ingest requests per partition before senders wait.
pub const QUEUE_CAPACITY: usize = 4096;

/// Estimated entry bytes an event adds beyond its entity, type, id and
/// actor: its share of a delta (minute, count, sum, lengths), its keyed
/// record (key, delta index, value) and, with the raw-event log on, its raw
/// record (time, value, indexes). Generous, so the estimate bounds the
/// encoded size.
const EVENT_OVERHEAD_BYTES: usize = 112;

#[derive(Debug, Clone)]
pub struct ProcessorConfig {
    /// Events per Raft entry at most (a single request larger than this
    /// still goes as one entry).
    pub max_batch_events: usize,
    /// Entries proposed but not yet applied, per partition.
    pub max_inflight: usize,
    /// How long to wait for more requests when the pipeline is busy anyway.
    pub linger: Duration,
    pub dedup_window_ms: u64,
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        ProcessorConfig {
            max_batch_events: 20_000,
            max_inflight: 4,
            linger: Duration::from_millis(1),
            dedup_window_ms: 10 * 60 * 1000,
        }
    }
}

/// Validated events of one partition from one caller.
pub struct IngestJob {
    pub events: Vec<Event>,
    /// Events of the same request that failed validation, already answered
    /// as rejected: only for the dead-letter log.
    pub invalid: Vec<DeadLetter>,
    pub reply: oneshot::Sender<ProposeOutcome>,
    /// When it was queued (for `ingest.queue_wait`).
    pub enqueued: Instant,
}

impl IngestJob {
    pub fn new(events: Vec<Event>, invalid: Vec<DeadLetter>, reply: oneshot::Sender<ProposeOutcome>) -> IngestJob {
        IngestJob { events, invalid, reply, enqueued: Instant::now() }
    }

    /// Upper estimate of what this job adds to an entry (an event rejected
    /// for its time goes in whole, as a dead letter).
    fn entry_bytes(&self) -> usize {
        let events: usize = self
            .events
            .iter()
            .map(|e| {
                e.entity_id.len() + e.event_type.len() + e.event_id.len() + e.actor_id.len() + EVENT_OVERHEAD_BYTES
            })
            .sum();
        events + self.invalid.iter().map(DeadLetter::estimated_bytes).sum::<usize>()
    }
}

/// Where the processor reads the cluster's ingest policy, and whether its
/// clock may judge event times.
#[derive(Clone)]
pub struct PolicySource {
    pub policy: tokio::sync::watch::Receiver<IngestPolicy>,
    pub cluster_map: tokio::sync::watch::Receiver<ClusterMap>,
    /// The partition's archive seal (events before it are refused).
    pub archive: Arc<SharedManifest>,
    /// Entities spread away from the partition (their new events are
    /// answered "moved").
    pub moved: Arc<SharedMoved>,
}

/// What one entry is built under.
#[derive(Debug, Clone)]
pub struct EntryRules {
    pub dedup_window_ms: u64,
    pub policy: IngestPolicy,
    /// Whether event times are checked: not by a node whose clock no peer
    /// has checked yet (just restarted, or cut off), which may be minutes
    /// off — refusing a valid event is the worse mistake. Alone in its
    /// cluster, its clock is the cluster's.
    pub check_times: bool,
    /// Events before this are refused as too late: their buckets are sealed
    /// for the archive (`archive_manifest.rs`). Replicated state, so checked
    /// whatever the clock; apply refuses them too, for entries built before
    /// the seal was seen.
    pub sealed_below_ms: i64,
    /// Entities spread away (`moved.rs`): their events from the spread's
    /// start are answered "moved", not counted. Replicated state too, and
    /// apply refuses them alike.
    pub moved: Arc<MovedEntities>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProposeOutcome {
    /// `duplicates` holds the positions, within the job's events, of the
    /// events that were already counted; `rejected` those refused for
    /// their time (both ascending).
    Done {
        accepted: u32,
        duplicates: Vec<u32>,
        rejected: Vec<(u32, TimeRejection)>,
        /// Positions of events not counted because their entity was spread
        /// away: to be routed again by the new map (ascending).
        moved: Vec<u32>,
    },
    NotLeader {
        leader: Option<NodeId>,
    },
    Unavailable(String),
    /// The node's dedup index is at its memory bound: nothing of the job
    /// was proposed; the message says so and when to retry.
    Exhausted(String),
}

/// `quiet`: the group's quiescence, woken (and its lease renewed) before a
/// proposal to a quiesced leader.
pub fn spawn(
    partition: u32,
    raft: RaftInstance,
    dedup: Arc<DedupIndex>,
    config: ProcessorConfig,
    quiet: Arc<GroupQuiescence>,
    clock: Arc<ClusterClock>,
    policy: PolicySource,
    load: Arc<PartitionLoad>,
) -> mpsc::Sender<IngestJob> {
    let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
    let processor = Processor { raft, dedup, config, quiet, clock, policy, load };
    // A debug span: the partition on every processor log line, free when
    // debug logging is off.
    tokio::spawn(processor.run(rx).instrument(tracing::debug_span!("processor", partition)));
    tx
}

struct Processor {
    raft: RaftInstance,
    dedup: Arc<DedupIndex>,
    config: ProcessorConfig,
    quiet: Arc<GroupQuiescence>,
    clock: Arc<ClusterClock>,
    policy: PolicySource,
    load: Arc<PartitionLoad>,
}

/// A leadership session: what every proposal of it is bound to.
#[derive(Debug, Clone)]
struct Session {
    term: u64,
    /// Committed leader id (term, node): proposals carry it (rule 2).
    leader_id: openraft::impls::leader_id_adv::LeaderId<u64, u64>,
    /// Highest dedup stamp proposed so far (starts at the log's clock).
    last_stamp: u64,
    /// Until everything in the leader's log at the start of the session is
    /// applied, the log index that must be: proposals until then are
    /// provisional (rule 1).
    view_complete_at: Option<u64>,
}

impl Session {
    /// Whether the dedup view is still incomplete (and stop asking once not).
    fn view_incomplete(&mut self, raft: &RaftInstance) -> bool {
        let Some(at) = self.view_complete_at else { return false };
        let applied = raft.metrics().borrow_watched().last_applied.as_ref().map(|l| l.index).unwrap_or(0);
        if applied >= at {
            self.view_complete_at = None;
            return false;
        }
        true
    }
}

/// The answer to one job, adjusted by the state machine's outcome.
struct JobReply {
    reply: oneshot::Sender<ProposeOutcome>,
    accepted: u32,
    duplicates: Vec<u32>,
    rejected: Vec<(u32, TimeRejection)>,
    moved: Vec<u32>,
    /// Per event of the job, the delta counting it (`NOT_COUNTED` if none):
    /// to answer the events of deltas apply refused (sealed or moved).
    deltas: Vec<u32>,
}

const NOT_COUNTED: u32 = u32::MAX;

/// One proposal: the jobs it answers and what each contributed.
pub struct Proposal {
    jobs: Vec<JobReply>,
    /// Per keyed event of the command: (job, position in the job).
    keyed_owner: Vec<(u32, u32)>,
    keys: Vec<u128>,
    /// The Raft command: per-minute deltas and the keyed events.
    pub command: Command,
}

impl Proposal {
    /// The command, to hand to Raft; the bookkeeping stays here.
    pub fn take_command(&mut self) -> Command {
        std::mem::replace(&mut self.command, Command::Ingest(IngestBatch::default()))
    }

    /// Answer every job. Events the state machine skipped (already counted)
    /// move from accepted to duplicates; those of deltas it refused as
    /// sealed (before `sealed_below_ms`) to rejected, as too late.
    fn answer(mut self, outcome: &CommandOutcome, sealed_below_ms: i64) {
        if !outcome.sealed.is_empty() || !outcome.moved.is_empty() {
            for j in &mut self.jobs {
                for (position, delta) in j.deltas.iter().enumerate() {
                    if *delta == NOT_COUNTED {
                        continue;
                    }
                    if outcome.sealed.binary_search(delta).is_ok() {
                        j.accepted = j.accepted.saturating_sub(1);
                        j.rejected.push((position as u32, TimeRejection::TooLate { limit_ms: sealed_below_ms }));
                    } else if outcome.moved.binary_search(delta).is_ok() {
                        j.accepted = j.accepted.saturating_sub(1);
                        j.moved.push(position as u32);
                    }
                }
                j.rejected.sort_unstable_by_key(|(position, _)| *position);
                j.moved.sort_unstable();
            }
        }
        for &k in &outcome.skipped {
            if let Some(&(job, position)) = self.keyed_owner.get(k as usize) {
                if let Some(j) = self.jobs.get_mut(job as usize) {
                    j.accepted = j.accepted.saturating_sub(1);
                    j.duplicates.push(position);
                }
            }
        }
        for mut j in self.jobs {
            j.duplicates.sort_unstable();
            let _ = j.reply.send(ProposeOutcome::Done {
                accepted: j.accepted,
                duplicates: j.duplicates,
                rejected: j.rejected,
                moved: j.moved,
            });
        }
    }

    /// Built from an incomplete dedup view (rule 1).
    fn mark_provisional(&mut self) {
        if let Command::Ingest(batch) = &mut self.command {
            batch.provisional = true;
        }
    }

    fn fail(self, outcome: ProposeOutcome) {
        for j in self.jobs {
            let _ = j.reply.send(outcome.clone());
        }
    }
}

impl Processor {
    async fn run(self, mut rx: mpsc::Receiver<IngestJob>) {
        loop {
            let Some(session) = self.wait_until_ready_leader(&mut rx).await else {
                return;
            };
            if !self.lead_session(&mut rx, session).await {
                return;
            }
        }
    }

    fn rules(&self) -> EntryRules {
        let policy = *self.policy.policy.borrow();
        let check_times = self.clock.checked_by_peers() || self.policy.cluster_map.borrow().nodes.len() <= 1;
        let sealed_below_ms = self.policy.archive.sealed_below_ms();
        let moved = self.policy.moved.get();
        EntryRules { dedup_window_ms: self.config.dedup_window_ms, policy, check_times, sealed_below_ms, moved }
    }

    fn leader_hint(&self) -> Option<NodeId> {
        self.raft.metrics().borrow_watched().current_leader
    }

    /// Answers jobs with NotLeader until this node leads and rule 1 holds.
    /// Returns the session, or None when the queue is closed.
    async fn wait_until_ready_leader(&self, rx: &mut mpsc::Receiver<IngestJob>) -> Option<Session> {
        // The server metrics change only with role, vote, leader or
        // membership. The full metrics change with every append, commit,
        // apply and replication ack: waiting on them woke every replica's
        // processor several times per entry for nothing.
        let mut server = self.raft.server_metrics();
        loop {
            let is_leader = server.borrow_watched().state == ServerState::Leader;
            if is_leader {
                let term = self.raft.metrics().borrow_watched().current_term;
                match self.start_session(term).await {
                    Ok(session) => return Some(session),
                    Err(why) => tracing::debug!(term, why, "not ready to lead yet"),
                }
                // Not ready (e.g. no quorum): answer waiting callers and retry.
                while let Ok(job) = rx.try_recv() {
                    let _ = job.reply.send(ProposeOutcome::NotLeader { leader: self.leader_hint() });
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            tokio::select! {
                job = rx.recv() => {
                    let job = job?;
                    let _ = job.reply.send(ProposeOutcome::NotLeader { leader: self.leader_hint() });
                }
                changed = server.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
            }
        }
    }

    /// Rule 1: a session starts once this node leads `term` and a quorum
    /// has answered something it sent in the term (openraft refuses writes
    /// before: the leader lease). In practice that answer is to the blank
    /// entry, so the session starts when the blank entry commits; it does not
    /// wait for that entry, or earlier ones, to apply. Entries not yet
    /// applied may hold keys the index lacks: proposals until they are
    /// applied are provisional, such events go into the entry as new, and
    /// apply takes them back out and the reply says duplicate (rule 5), so
    /// the count is exact either way.
    async fn start_session(&self, term: u64) -> Result<Session, String> {
        let started = Instant::now();
        // An acknowledgement within the lease, fresh or not, heartbeat if none.
        let confirmed = LinearizerOption::new(None, true);
        let _ = self.raft.get_read_linearizer(confirmed).await.map_err(|e| e.to_string())?;
        let (leader_id, log_end) = {
            let m = self.raft.metrics();
            let m = m.borrow_watched();
            if m.state != ServerState::Leader || m.current_term != term || !m.vote.is_committed() {
                return Err("leadership changed".into());
            }
            (m.vote.leader_id().clone(), m.last_log_index.unwrap_or(0))
        };
        // The log's clock may still advance as earlier entries apply; apply
        // keeps it monotonic whatever a proposal carries (dedup.rs).
        let last_stamp = self.dedup.lock().log_clock_ms();
        tracing::debug!(term, confirm_ms = started.elapsed().as_millis() as u64, "leadership confirmed");
        Ok(Session { term, leader_id, last_stamp, view_complete_at: Some(log_end) })
    }

    /// The stamp of the next proposal: the cluster-checked clock, never
    /// below the previous stamp.
    fn next_stamp(&self, session: &mut Session, warned: &mut bool) -> u64 {
        let t = self.clock.trusted();
        if t.correction_ms != 0 && !*warned {
            *warned = true;
            tracing::warn!(
                correction_ms = t.correction_ms,
                "this node's clock is off from its peers'; dedup stamps follow the cluster's clock"
            );
        }
        session.last_stamp = session.last_stamp.max(t.now_ms);
        session.last_stamp
    }

    /// Lead one session. Returns false when the queue is closed.
    async fn lead_session(&self, rx: &mut mpsc::Receiver<IngestJob>, mut session: Session) -> bool {
        let term = session.term;
        tracing::debug!(term, "leading partition");
        crate::metrics::metrics().leadership_taken();
        let config = &self.config;
        let mut pending: HashSet<u128> = HashSet::new();
        let mut inflight = FuturesUnordered::new();
        let mut queued: VecDeque<IngestJob> = VecDeque::new();
        let mut queued_events = 0usize;
        let mut failed = false;
        let mut open = true;
        let mut warned_clock = false;
        // Role and vote only (see `wait_until_ready_leader`).
        let mut server = self.raft.server_metrics();

        loop {
            let still_leader = {
                let m = server.borrow_watched();
                m.state == ServerState::Leader && m.vote.leader_id() == &session.leader_id
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
                                Some(job) => { queued_events += job.events.len(); queued.push_back(job); }
                                None => { open = false; break; }
                            }
                        }
                        if queued_events >= config.max_batch_events {
                            break;
                        }
                    }
                }
                self.quiet.prepare_write().await;
                let jobs = take_batch(&mut queued, config.max_batch_events, MAX_ENTRY_BYTES);
                for job in &jobs {
                    stages::record(Stage::IngestQueueWait, job.enqueued.elapsed());
                }
                // The memory bound: refuse rather than forget a key early
                // or grow without limit. Keys in flight count too.
                let keyed: usize =
                    jobs.iter().map(|j| j.events.iter().filter(|e| !e.event_id.is_empty()).count()).sum();
                let budget = self.dedup.budget();
                if keyed > 0 && budget.would_exceed(keyed + pending.len()) {
                    let message = format!(
                        "this node's dedup index is full ({} of {} keys, --dedup-memory-mib): keys leave it as the dedup window ({} s) passes; retry later",
                        budget.used(),
                        budget.max_keys(),
                        config.dedup_window_ms / 1000
                    );
                    for job in jobs {
                        let _ = job.reply.send(ProposeOutcome::Exhausted(message.clone()));
                    }
                    queued_events = queued.iter().map(|j| j.events.len()).sum();
                    continue;
                }
                queued_events = queued.iter().map(|j| j.events.len()).sum();
                let stamp = self.next_stamp(&mut session, &mut warned_clock);
                let building = stages::Timer::start(Stage::IngestBuildEntry);
                let build_started = Instant::now();
                let events: usize = jobs.iter().map(|j| j.events.len()).sum();
                let bytes: usize = jobs.iter().flat_map(|j| &j.events).map(prost::Message::encoded_len).sum();
                // Asked before the index is read: a view that completes
                // during the build still counts as incomplete for it.
                let provisional = session.view_incomplete(&self.raft);
                let mut proposal = build_proposal(&self.dedup, &mut pending, jobs, stamp, &self.rules());
                if provisional {
                    proposal.mark_provisional();
                }
                if let Command::Ingest(batch) = &proposal.command {
                    self.load.hot.saw(batch.deltas.iter().map(|d| (d.entity_id.as_slice(), d.count)));
                }
                drop(building);
                self.load.proposed(events as u64, bytes as u64, build_started.elapsed());
                let raft = self.raft.clone();
                let leader_id = session.leader_id.clone();
                let mut proposal = proposal;
                let command = proposal.take_command();
                inflight.push(async move {
                    let writing = Instant::now();
                    let result = propose(&raft, command, leader_id).await;
                    stages::record(Stage::IngestRaftWrite, writing.elapsed());
                    (result, proposal)
                });
                continue;
            }
            if failed || !open {
                for job in queued.drain(..) {
                    let _ = job.reply.send(ProposeOutcome::NotLeader { leader: self.leader_hint() });
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
                        queued.push_back(job);
                        while queued_events < config.max_batch_events {
                            match rx.try_recv() {
                                Ok(job) => { queued_events += job.events.len(); queued.push_back(job); }
                                Err(_) => break,
                            }
                        }
                    }
                    None => open = false,
                },
                Some((result, proposal)) = inflight.next() => {
                    match result {
                        Ok(outcome) => {
                            // Applied: the index has these keys now (rule 3).
                            for k in &proposal.keys {
                                pending.remove(k);
                            }
                            proposal.answer(&outcome, self.policy.archive.sealed_below_ms());
                        }
                        Err(outcome) => {
                            // Rule 4. The entry may still commit under the next
                            // leader; callers retry with the same event ids.
                            tracing::debug!(term, ?outcome, "proposal failed; ending leadership session");
                            failed = true;
                            proposal.fail(outcome);
                        }
                    }
                },
                changed = server.changed() => {
                    if changed.is_err() {
                        failed = true;
                    }
                }
            }
        }
    }
}

/// Append `command` only under `leader_id` (rule 2), wait until applied.
async fn propose(
    raft: &RaftInstance,
    command: Command,
    leader_id: openraft::impls::leader_id_adv::LeaderId<u64, u64>,
) -> Result<CommandOutcome, ProposeOutcome> {
    let (responder, applied) = ProgressResponder::complete_only();
    raft.write(command)
        .with_leader(leader_id)
        .responder(responder)
        .await
        .map_err(|fatal| ProposeOutcome::Unavailable(format!("raft stopped: {fatal}")))?;
    match applied.await {
        Ok(Ok(response)) => Ok(response.data),
        Ok(Err(ClientWriteError::ForwardToLeader(f))) => Err(ProposeOutcome::NotLeader { leader: f.leader_id }),
        Ok(Err(e)) => Err(ProposeOutcome::Unavailable(e.to_string())),
        Err(_) => Err(ProposeOutcome::Unavailable("raft stopped before answering".into())),
    }
}

/// Jobs from the front of the queue for one entry: up to `max_events`
/// events and `max_bytes` estimated entry bytes, and always at least one job
/// (a single request is bounded by the API's limits, which fit an entry).
pub fn take_batch(queued: &mut VecDeque<IngestJob>, max_events: usize, max_bytes: usize) -> Vec<IngestJob> {
    let mut taken = Vec::new();
    let (mut events, mut bytes) = (0usize, 0usize);
    while let Some(job) = queued.front() {
        let (e, b) = (job.events.len(), job.entry_bytes());
        if !taken.is_empty() && (events + e > max_events || bytes + b > max_bytes) {
            break;
        }
        events += e;
        bytes += b;
        if let Some(job) = queued.pop_front() {
            taken.push(job);
        }
    }
    taken
}

/// Dedup and aggregate jobs into one command. Per-event work is in memory
/// only. Public for the micro-benchmarks (`benches/hot_path.rs`).
pub fn build_proposal(
    dedup: &DedupIndex,
    pending: &mut HashSet<u128>,
    jobs: Vec<IngestJob>,
    stamp_ms: u64,
    rules: &EntryRules,
) -> Proposal {
    let mut slots: HashMap<(Vec<u8>, String, i64), u32> = HashMap::new();
    let mut deltas: Vec<MinuteDelta> = Vec::new();
    let mut keyed = Vec::new();
    let mut keyed_owner = Vec::new();
    let mut keys = Vec::new();
    let mut answered = Vec::with_capacity(jobs.len());
    let mut dead_letters = Vec::new();
    let mut raw_events = Vec::new();
    let raw_on = rules.policy.raw_events.max_events > 0;
    let index = dedup.lock();
    for (job_index, job) in jobs.into_iter().enumerate() {
        let (mut accepted, mut duplicates, mut rejected, mut moved) = (0u32, Vec::new(), Vec::new(), Vec::new());
        let mut counted_by = vec![NOT_COUNTED; job.events.len()];
        for (position, event) in job.events.into_iter().enumerate() {
            // Before the dedup check: the partition it moved to owns the
            // event's key now.
            if rules.moved.refuses(&event.entity_id, bucket_start(Granularity::Minute, event.event_time_ms)) {
                moved.push(position as u32);
                continue;
            }
            let key =
                (!event.event_id.is_empty()).then(|| dedup_key(&event.entity_id, &event.event_type, &event.event_id));
            if let Some(key) = key {
                if index.contains(&key) || pending.contains(&key) {
                    duplicates.push(position as u32);
                    continue;
                }
            }
            let sealed = (event.event_time_ms < rules.sealed_below_ms)
                .then_some(TimeRejection::TooLate { limit_ms: rules.sealed_below_ms });
            let policy = || rules.policy.check(event.event_time_ms, stamp_ms).err();
            if let Some(why) = sealed.or_else(|| rules.check_times.then(policy).flatten()) {
                let reason = match why {
                    TimeRejection::TooLate { limit_ms } => DeadLetterReason::TooLate { limit_ms },
                    TimeRejection::InFuture { limit_ms } => DeadLetterReason::InFuture { limit_ms },
                };
                dead_letters.push(DeadLetter::of(&event, reason));
                rejected.push((position as u32, why));
                continue;
            }
            if let Some(key) = key {
                pending.insert(key);
            }
            accepted += 1;
            let value = event.value.unwrap_or(1);
            let minute = bucket_start(Granularity::Minute, event.event_time_ms);
            let next = deltas.len() as u32;
            let slot = *slots.entry((event.entity_id, event.event_type, minute)).or_insert(next);
            if let Some(c) = counted_by.get_mut(position) {
                *c = slot;
            }
            if slot == next {
                // First event of this (entity, type, minute): the map took the
                // key's strings; the delta gets them back at the end.
                deltas.push(MinuteDelta {
                    entity_id: Vec::new(),
                    event_type: String::new(),
                    minute_ms: minute,
                    count: 0,
                    sum: 0,
                    actors: Vec::new(),
                });
            }
            if let Some(d) = deltas.get_mut(slot as usize) {
                d.count += 1;
                d.sum += value as i128;
                if !event.actor_id.is_empty() {
                    d.actors.push(crate::storage::sketch::actor_hash(&event.actor_id));
                }
            }
            if let Some(key) = key {
                keyed.push(KeyedEvent { key, delta: slot, value });
                keyed_owner.push((job_index as u32, position as u32));
                keys.push(key);
            }
            if raw_on {
                raw_events.push(RawEvent {
                    delta: slot,
                    keyed: key.map(|_| keyed.len() as u32 - 1),
                    event_time_ms: event.event_time_ms,
                    value: event.value,
                    event_id: event.event_id,
                    actor_id: event.actor_id,
                });
            }
        }
        dead_letters.extend(job.invalid);
        answered.push(JobReply { reply: job.reply, accepted, duplicates, rejected, moved, deltas: counted_by });
    }
    drop(index);
    for ((entity_id, event_type, _), slot) in slots {
        if let Some(d) = deltas.get_mut(slot as usize) {
            d.entity_id = entity_id;
            d.event_type = event_type;
            // A popular video's minute has many repeat viewers: each once.
            d.actors.sort_unstable();
            d.actors.dedup();
        }
    }
    let batch = IngestBatch {
        proposed_at_ms: stamp_ms,
        dedup_window_ms: rules.dedup_window_ms,
        deltas,
        keyed,
        provisional: false,
        dead_letters,
        dead_letter_bounds: rules.policy.dead_letters,
        raw_events,
        raw_event_bounds: rules.policy.raw_events,
    };
    Proposal { jobs: answered, keyed_owner, keys, command: Command::Ingest(batch) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(entity: &str, t: i64, id: &str, value: Option<i64>) -> Event {
        Event {
            actor_id: Vec::new(),
            entity_id: entity.into(),
            event_type: "view".into(),
            event_time_ms: t,
            event_id: id.into(),
            value,
        }
    }

    /// Rules that never refuse an event for its time.
    fn rules(dedup_window_ms: u64) -> EntryRules {
        EntryRules {
            dedup_window_ms,
            policy: IngestPolicy::default(),
            check_times: false,
            sealed_below_ms: i64::MIN,
            moved: Arc::default(),
        }
    }

    #[test]
    fn events_outside_the_policy_become_dead_letters_after_the_dedup_check() {
        let index = DedupIndex::default();
        index.lock().insert_batch((0, 1), vec![dedup_key(b"a", "view", b"counted")]);
        let now = 100 * 86_400_000u64;
        let week_ago = now as i64 - 8 * 86_400_000;
        let (j, rx) = job(vec![
            ev("a", now as i64, "1", None),
            ev("a", week_ago, "counted", None), // a retry of a counted event: a duplicate
            ev("a", week_ago, "2", None),
            ev("a", now as i64 + 3_600_000, "3", None),
            ev("a", week_ago, "2", None), // the same again: rejected again, not a duplicate
        ]);
        let mut pending = HashSet::new();
        let checked = EntryRules { check_times: true, ..rules(600_000) };
        let p = build_proposal(&index, &mut pending, vec![j], now, &checked);
        let Command::Ingest(batch) = &p.command else { panic!("not an ingest") };
        assert_eq!(batch.deltas.iter().map(|d| d.count).sum::<u64>(), 1);
        let reasons: Vec<_> = batch.dead_letters.iter().map(|d| (d.event_id.clone(), d.reason.clone())).collect();
        let late = DeadLetterReason::TooLate { limit_ms: now as i64 - 7 * 86_400_000 };
        let ahead = DeadLetterReason::InFuture { limit_ms: now as i64 + 300_000 };
        assert_eq!(reasons, vec![(b"2".to_vec(), late.clone()), (b"3".to_vec(), ahead), (b"2".to_vec(), late)]);
        assert_eq!(batch.dead_letter_bounds, IngestPolicy::default().dead_letters);
        // Rejected events hold no dedup key: a corrected retry may count.
        assert_eq!(pending.len(), 1);
        p.answer(&CommandOutcome::default(), i64::MIN);
        let ProposeOutcome::Done { accepted, duplicates, rejected, .. } = rx.blocking_recv().unwrap() else {
            panic!("not done")
        };
        assert_eq!((accepted, duplicates), (1, vec![1]));
        assert_eq!(rejected.iter().map(|r| r.0).collect::<Vec<_>>(), vec![2, 3, 4]);
    }

    fn job(events: Vec<Event>) -> (IngestJob, oneshot::Receiver<ProposeOutcome>) {
        let (reply, rx) = oneshot::channel();
        (IngestJob::new(events, Vec::new(), reply), rx)
    }

    #[test]
    fn proposal_drops_duplicates_and_aggregates_per_minute() {
        let index = DedupIndex::default();
        index.lock().insert_batch((0, 1), vec![dedup_key(b"a", "view", b"old")]);
        let mut pending = HashSet::new();
        pending.insert(dedup_key(b"a", "view", b"inflight"));
        let (j1, _rx1) = job(vec![
            ev("a", 60_000, "1", None),
            ev("a", 60_500, "2", Some(5)),
            ev("a", 60_700, "1", None),   // same batch
            ev("a", 61_000, "old", None), // already applied
        ]);
        let (j2, _rx2) =
            job(vec![ev("a", 120_000, "inflight", None), ev("a", 119_999, "", Some(2)), ev("a", 119_999, "", Some(2))]);
        let p = build_proposal(&index, &mut pending, vec![j1, j2], 7_000, &rules(600_000));
        let counts: Vec<(u32, Vec<u32>)> = p.jobs.iter().map(|j| (j.accepted, j.duplicates.clone())).collect();
        assert_eq!(counts, vec![(2, vec![2, 3]), (2, vec![0])]);
        let Command::Ingest(batch) = &p.command else { panic!("not an ingest") };
        let deltas: Vec<_> = batch.deltas.iter().map(|d| (d.minute_ms, d.count, d.sum, d.entity_id.clone())).collect();
        // Events without an id are never duplicates; the four accepted land in one minute.
        assert_eq!(deltas, vec![(60_000, 4, 10, b"a".to_vec())]);
        assert_eq!(batch.proposed_at_ms, 7_000);
        // Each keyed event names its delta and value, for apply to check.
        assert_eq!(batch.keyed.iter().map(|k| (k.delta, k.value)).collect::<Vec<_>>(), vec![(0, 1), (0, 5)]);
        assert_eq!(p.keyed_owner, vec![(0, 0), (0, 1)]);
        assert_eq!(pending.len(), 3);
    }

    #[tokio::test]
    async fn events_skipped_at_apply_are_answered_as_duplicates() {
        let index = DedupIndex::default();
        let mut pending = HashSet::new();
        let (j1, rx1) = job(vec![ev("a", 0, "x", None), ev("a", 0, "y", None), ev("a", 0, "", None)]);
        let p = build_proposal(&index, &mut pending, vec![j1], 1, &rules(600_000));
        p.answer(&CommandOutcome { skipped: vec![1], ..Default::default() }, i64::MIN);
        assert_eq!(
            rx1.await.unwrap(),
            ProposeOutcome::Done { accepted: 2, duplicates: vec![1], rejected: vec![], moved: vec![] }
        );
    }

    /// The seal refuses old events at the leader (as dead letters), and
    /// apply's refusal of a delta built before the leader saw the seal turns
    /// its events, keyed or not, into TOO_LATE rejections.
    #[tokio::test]
    async fn sealed_events_are_answered_too_late() {
        let index = DedupIndex::default();
        let mut pending = HashSet::new();
        let sealed = EntryRules { sealed_below_ms: 3_600_000, ..rules(600_000) };
        let (j1, rx1) = job(vec![ev("a", 0, "x", None), ev("a", 3_600_000, "y", None)]);
        let p = build_proposal(&index, &mut pending, vec![j1], 1, &sealed);
        let Command::Ingest(batch) = &p.command else { panic!("not an ingest") };
        assert_eq!(batch.dead_letters.len(), 1);
        assert_eq!(batch.deltas.len(), 1);
        p.answer(&CommandOutcome::default(), 3_600_000);
        let too_late = TimeRejection::TooLate { limit_ms: 3_600_000 };
        assert_eq!(
            rx1.await.unwrap(),
            ProposeOutcome::Done { accepted: 1, duplicates: vec![], rejected: vec![(0, too_late)], moved: vec![] }
        );

        // Built before the seal: apply refuses the first minute's delta.
        let (j2, rx2) = job(vec![ev("b", 7_200_000, "", None), ev("b", 0, "z", None), ev("b", 60, "", None)]);
        let p = build_proposal(&index, &mut pending, vec![j2], 1, &rules(600_000));
        let Command::Ingest(batch) = &p.command else { panic!("not an ingest") };
        let old = batch.deltas.iter().position(|d| d.minute_ms == 0).unwrap() as u32;
        p.answer(&CommandOutcome { sealed: vec![old], ..Default::default() }, 3_600_000);
        assert_eq!(
            rx2.await.unwrap(),
            ProposeOutcome::Done {
                accepted: 1,
                duplicates: vec![],
                rejected: vec![(1, too_late), (2, too_late)],
                moved: vec![]
            }
        );
    }

    /// Events of an entity spread away are answered "moved", not counted,
    /// their keys not pending; so are those of deltas apply refused.
    #[tokio::test]
    async fn events_of_a_spread_entity_are_answered_moved() {
        let index = DedupIndex::default();
        let mut pending = HashSet::new();
        let mut moved = crate::moved::MovedEntities::default();
        moved.move_out(b"hot", 120_000);
        let spread = EntryRules { moved: Arc::new(moved), ..rules(600_000) };
        let (j1, rx1) =
            job(vec![ev("hot", 60_000, "a", None), ev("hot", 120_000, "b", None), ev("c", 120_000, "", None)]);
        let p = build_proposal(&index, &mut pending, vec![j1], 1, &spread);
        assert!(!pending.contains(&dedup_key(b"hot", "view", b"b")), "the new partition owns the key");
        let Command::Ingest(batch) = &p.command else { panic!("not an ingest") };
        assert_eq!(batch.deltas.len(), 2);
        p.answer(&CommandOutcome::default(), i64::MIN);
        assert_eq!(
            rx1.await.unwrap(),
            ProposeOutcome::Done { accepted: 2, duplicates: vec![], rejected: vec![], moved: vec![1] }
        );

        // Built before the spread: apply refuses the delta at its start.
        let (j2, rx2) = job(vec![ev("hot", 120_000, "d", None), ev("hot", 0, "e", None)]);
        let p = build_proposal(&index, &mut pending, vec![j2], 1, &rules(600_000));
        let Command::Ingest(batch) = &p.command else { panic!("not an ingest") };
        let refused = batch.deltas.iter().position(|d| d.minute_ms == 120_000).unwrap() as u32;
        p.answer(&CommandOutcome { moved: vec![refused], ..Default::default() }, i64::MIN);
        assert_eq!(
            rx2.await.unwrap(),
            ProposeOutcome::Done { accepted: 1, duplicates: vec![], rejected: vec![], moved: vec![0] }
        );
    }

    #[test]
    fn batches_stay_under_the_event_and_byte_caps() {
        let mut queued: VecDeque<IngestJob> = (0..5).map(|_| job(vec![ev("e", 0, "", None); 400]).0).collect();
        // 400 events a job: at most two jobs fit 1,000 events.
        assert_eq!(take_batch(&mut queued, 1_000, usize::MAX).len(), 2);
        // A byte cap below one job still takes that job, alone.
        assert_eq!(take_batch(&mut queued, usize::MAX, 10).len(), 1);
        let one_job = queued.front().map(|j| j.entry_bytes()).unwrap();
        assert_eq!(take_batch(&mut queued, usize::MAX, 2 * one_job).len(), 2);
        assert!(queued.is_empty());
    }

    /// The entry-size estimate must bound the encoded entry (the 8 MiB cap
    /// relies on it), for the worst case of one delta per event; and what
    /// the per-event records for apply's dedup check cost, in bytes.
    #[test]
    fn the_size_estimate_bounds_the_encoded_entry() {
        let events: Vec<Event> = (0..1_000)
            .map(|i| Event {
                actor_id: Vec::new(),
                entity_id: vec![b'e'; 200 + i % 57],
                event_type: "view".into(),
                event_time_ms: 1_790_000_000_000 + i as i64 * 61_000,
                event_id: format!("id-{i}").into_bytes(),
                value: Some(i64::MIN + i as i64),
            })
            .collect();
        let (j, _rx) = job(events);
        let estimate = j.entry_bytes();
        // With the raw-event log on: the worst case.
        let raw_on = crate::meta::LogBounds { keep_ms: 0, max_events: 1 };
        let rules =
            EntryRules { policy: IngestPolicy { raw_events: raw_on, ..IngestPolicy::default() }, ..rules(u64::MAX) };
        let p = build_proposal(&DedupIndex::default(), &mut HashSet::new(), vec![j], u64::MAX, &rules);
        let encoded = crate::storage::codec::encode(&p.command).unwrap().len();
        assert!(encoded <= estimate, "encoded {encoded} > estimate {estimate}");
        let Command::Ingest(mut batch) = p.command else { panic!("not an ingest") };
        batch.keyed.clear();
        let without = crate::storage::codec::encode(&Command::Ingest(batch)).unwrap().len();
        let per_event = (encoded - without) as f64 / 1_000.0;
        eprintln!("keyed records: {per_event:.1} bytes per event ({encoded} bytes per 1,000 events with them, {without} without)");
        assert!(per_event <= 32.0);
    }
}
