//! Quiescing idle Raft groups, so that a node with 1,000 partitions costs
//! next to nothing while they are idle.
//!
//! A group that is merely idle is still driven by the node ticker
//! (`ticker.rs`): its election timer runs on every replica and its leader
//! heartbeats every follower each interval. Multiplied by a thousand groups that is most of a
//! core per node. Following CockroachDB's design, an idle group goes quiet
//! and a node-level failure detector (`liveness.rs`) stands in for its
//! heartbeats:
//!
//! 1. The leader of a group whose log has been idle for `after`, with every
//!    member caught up and everything applied, starts *quiescing*: its
//!    heartbeats carry the `quiesce` flag.
//! 2. A follower that accepts a flagged heartbeat is no longer driven by the
//!    ticker (no election timer) and remembers the leader. The heartbeat also carried
//!    the leader's commit index, so the follower's reads are current.
//! 3. Once every member acknowledged a flagged heartbeat, the leader is no
//!    longer driven either: no timers, no messages.
//!
//! Anything else wakes a group, i.e. has the ticker drive it again:
//! - the leader sends entries (a write, a membership change): followers see
//!   an unflagged message and wake on receipt;
//! - liveness reports the leader's node down (or restarted): the surviving
//!   voter with the lowest id wakes and starts a pre-vote election at once;
//!   the others wake a little later, in case it cannot;
//! - liveness reports a follower up again or restarted: its leaders wake so
//!   it hears heartbeats before its own timer could fire;
//! - a replica sees a leader other than the one it quiesced under;
//! - the leader steps aside (a leadership transfer): the target wakes at
//!   once, the others a little later, so that the group elects even if the
//!   target never takes over. A leader in transfer sends no heartbeats and
//!   refuses writes until someone else leads, so it must not keep its
//!   followers asleep.
//!
//! Read-index requests on a quiesced leader send flagged heartbeats, which
//! keep followers quiet. A freshly opened replica starts *dormant* (not
//! driven) until it hears from its leader or a grace period passes: a
//! restarting node opens its groups before it can answer pings, and timers
//! running then would start elections against leaders that are healthy but
//! quiet.
//!
//! Every decision — which event moves a group to which state, and what
//! then happens — is a pure function in `quiesce_state.rs`, unit-tested
//! transition by transition; this file feeds it events and openraft's
//! metrics, and performs what it returns (timers on or off, elections,
//! lease renewals).
//!
//! Raft safety never depends on any of this: timers only decide *when* an
//! election starts, and votes, terms and leases are openraft's. A mistake
//! here costs an unneeded election or a slower failover, never a lost or
//! doubled count.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::ServerState;

use super::liveness::{Liveness, PeerChange};
use super::quiesce_state::{decide, Action, Context, Decision, Event, GroupView, Role, State};
pub use super::quiesce_state::{QuiesceConfig, ReplicaStart, CREATION_GRACE};
use super::ticker::GroupTimer;
use crate::sync::{MutexExt, RwLockExt};
use crate::type_config::NodeId;
use crate::RaftInstance;

/// Quiescence of one group on this node; shared by the group's network
/// (leader side), the Raft service (follower side) and the sweeper.
pub struct GroupQuiescence {
    group: u32,
    node_id: NodeId,
    config: QuiesceConfig,
    raft: OnceLock<RaftInstance>,
    /// The node ticker's handle on this group: quiescence decides whether
    /// the ticker drives it.
    timer: OnceLock<Arc<GroupTimer>>,
    state: Mutex<State>,
    /// The registry's groups that every sweep visits; this group is in it
    /// exactly while its state [needs the sweep](State::needs_sweep).
    swept: Arc<Mutex<HashSet<u32>>>,
    /// When the leader last sent entries, ms on the registry's clock.
    last_activity_ms: AtomicU64,
    epoch: Instant,
    liveness: Arc<Liveness>,
}

/// openraft's metrics of a group as [`GroupView`], read when a decision
/// asks (most events ask nothing).
struct MetricsView<'a>(&'a RaftInstance);

impl GroupView for MetricsView<'_> {
    fn role(&self) -> Role {
        match self.0.metrics().borrow_watched().state {
            ServerState::Leader => Role::Leader,
            ServerState::Candidate => Role::Candidate,
            ServerState::Follower => Role::Follower,
            ServerState::Learner | ServerState::Shutdown => Role::Learner,
        }
    }

    fn current_leader(&self) -> Option<NodeId> {
        self.0.metrics().borrow_watched().current_leader
    }

    fn caught_up(&self, is_up: &dyn Fn(NodeId) -> bool) -> bool {
        let metrics = self.0.metrics();
        let m = metrics.borrow_watched();
        m.last_applied.as_ref().map(|l| l.index) == m.last_log_index
            && m.replication.as_ref().is_some_and(|r| {
                r.iter().all(|(id, matched)| matched.as_ref().map(|l| l.index) == m.last_log_index || !is_up(*id))
            })
    }

    fn members(&self) -> Vec<NodeId> {
        self.0.metrics().borrow_watched().membership_config.membership().nodes().map(|(id, _)| *id).collect()
    }

    fn voters(&self) -> Vec<NodeId> {
        self.0.metrics().borrow_watched().membership_config.membership().voter_ids().collect()
    }
}

impl GroupQuiescence {
    fn enabled(&self) -> bool {
        !self.config.after.is_zero()
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Decide on `event`, take the new state (turning the ticker's drive on
    /// or off with it) and perform the action; returns the action for
    /// callers that have a part in it.
    fn step(&self, event: Event) -> Action {
        let Some(raft) = self.raft.get().filter(|_| self.enabled()) else { return Action::Nothing };
        let is_up = |id: NodeId| self.liveness.is_up(id);
        let cx = Context { me: self.node_id, config: &self.config, now: Instant::now(), is_up: &is_up };
        let action = {
            let mut state = self.state.lock_unpoisoned();
            let Decision { next, action } = decide(&state, event, &MetricsView(raft), &cx);
            if next != *state {
                tracing::debug!(group = self.group, from = ?*state, to = ?next, ?event, "quiescence");
                if next.driven() != state.driven() {
                    if let Some(timer) = self.timer.get() {
                        timer.set_driven(next.driven());
                    }
                }
                if next.needs_sweep() != state.needs_sweep() {
                    let mut swept = self.swept.lock_unpoisoned();
                    if next.needs_sweep() {
                        swept.insert(self.group);
                    } else {
                        swept.remove(&self.group);
                    }
                }
                *state = next;
            }
            action
        };
        self.perform(raft, action);
        action
    }

    fn perform(&self, raft: &RaftInstance, action: Action) {
        match action {
            Action::Nothing => {}
            Action::MarkActive | Action::RenewLease => self.last_activity_ms.store(self.now_ms(), Ordering::Relaxed),
            Action::ElectNow => {
                if let Some(timer) = self.timer.get() {
                    timer.restart();
                }
                let raft = raft.clone();
                crate::metrics::metrics().election_started();
                tokio::spawn(async move {
                    let _ = raft.trigger().elect(true).await;
                });
            }
            Action::ElectWhenLeaseEnds { lost, rank, of } => {
                // The timer is attached with the Raft instance, before any event.
                let Some(timer) = self.timer.get().cloned() else { return };
                let raft = raft.clone();
                let group = self.group;
                let first = timer.lease_left() + LEASE_MARGIN + SUCCESSION_TURN * rank;
                let every = SUCCESSION_TURN * of.max(1);
                tokio::spawn(async move {
                    // From when this replica's lease ends, on its turns: the
                    // other voter's lease may end a little later, or its
                    // log be longer (then only its own turn can win).
                    let mut wait = first;
                    let mut campaigned: Option<std::time::Instant> = None;
                    for turn in 0..SUCCESSION_ATTEMPTS {
                        tokio::time::sleep(wait).await;
                        wait = every;
                        let (leader, state) = {
                            let m = raft.metrics();
                            let m = m.borrow_watched();
                            (m.current_leader, m.state)
                        };
                        // Done once a leader other than the lost one is known.
                        // No leader known is not done: an election (ours or
                        // another's) is under way or failed, and a failed one
                        // must not wait for the ticker's full timeout.
                        if state == openraft::ServerState::Leader || leader.is_some_and(|l| l != lost) {
                            return;
                        }
                        // Another successor is campaigning (this replica
                        // granted it a pre-vote or vote during the last round
                        // of turns): campaigning across it would make two
                        // candidates of one term, and the loser's higher vote
                        // then blocks the winner's appends until a lease ends.
                        if timer.candidate_seen_within(every) {
                            tracing::debug!(group, turn, "successor skips its turn: another is campaigning");
                            continue;
                        }
                        // Our own election still waiting for answers (a slow
                        // machine): a new one would only supersede it.
                        if state == openraft::ServerState::Candidate
                            && campaigned.is_some_and(|t| t.elapsed() < every * 2)
                        {
                            continue;
                        }
                        tracing::debug!(group, turn, rank, "successor campaigns");
                        crate::metrics::metrics().election_started();
                        campaigned = Some(std::time::Instant::now());
                        timer.restart();
                        let _ = raft.trigger().elect(true).await;
                    }
                });
            }
        }
    }

    /// Turn the group's timers back on, whatever its state.
    pub fn wake(&self) {
        self.step(Event::Woken);
    }

    /// Make this leader writable before a proposal. openraft refuses writes
    /// once the leader lease has expired, and a quiesced leader's has: no
    /// heartbeats, no acknowledgements. Wake the group, then one read-index
    /// round (a heartbeat answered by a quorum) renews the lease. Costs one
    /// round trip on the first write after a quiet period; nothing when the
    /// group is awake.
    pub async fn prepare_write(&self) {
        if self.step(Event::WriteComing) != Action::RenewLease {
            return;
        }
        if let Some(raft) = self.raft.get() {
            let renew = raft.ensure_linearizable(openraft::ReadPolicy::ReadIndex);
            if let Err(e) = tokio::time::timeout(Duration::from_secs(2), renew).await {
                tracing::debug!(group = self.group, error = %e, "lease renewal before a write timed out");
            }
        }
    }

    pub fn is_quiesced(&self) -> bool {
        self.state.lock_unpoisoned().asleep()
    }

    /// Leader side, before an AppendEntries goes to `target`: entries are
    /// activity and wake the group; returns whether a heartbeat carries the
    /// flag.
    pub fn before_send(&self, target: NodeId, has_entries: bool) -> bool {
        if !self.enabled() {
            return false;
        }
        if has_entries {
            self.step(Event::EntriesSent { target });
            return false;
        }
        self.state.lock_unpoisoned().flags_heartbeats(self.node_id)
    }

    /// Leader side, after `target` answered a flagged heartbeat.
    pub fn flagged_heartbeat_acked(&self, target: NodeId) {
        self.step(Event::FlaggedHeartbeatAcked { target });
    }

    /// Follower side, after this replica handled an AppendEntries from
    /// `leader`. Only accepted messages count: a stale leader (say, a node
    /// that restarted believing it still leads) is refused by openraft and
    /// must not wake the group, since a replica that wakes long after it
    /// last heard from its leader starts an election at the next ticker round.
    pub fn received(&self, leader: NodeId, flagged: bool, accepted: bool) {
        if accepted {
            self.step(Event::Accepted { leader, flagged });
        }
    }
}

/// Every group's quiescence on this node, and the sweeper that drives it.
pub struct Quiescence {
    node_id: NodeId,
    config: QuiesceConfig,
    epoch: Instant,
    liveness: Arc<Liveness>,
    groups: RwLock<HashMap<u32, Arc<GroupQuiescence>>>,
    /// Groups whose state needs every sweep (see [`State::needs_sweep`]).
    swept: Arc<Mutex<HashSet<u32>>>,
}

/// After the lease a surviving voter waits out, a little more: its
/// lease clock starts after openraft's, the other voters' may have started
/// a moment later.
const LEASE_MARGIN: Duration = Duration::from_millis(20);
/// The surviving voters of a busy group whose leader died take turns this
/// long to campaign (each every `voters × turn`): long enough for the first
/// one's pre-vote to reach the others before their turn on a loaded machine
/// (at 40 ms, half of the second voters campaigned before it had), short
/// next to the lease.
const SUCCESSION_TURN: Duration = Duration::from_millis(60);
/// Turns each surviving voter takes at most; after them the ticker's
/// randomised timers go on as for any group.
const SUCCESSION_ATTEMPTS: u32 = 8;

/// Every this many sweeps, the sweep visits every group, not only those
/// whose state needs it: the safety net for a wake-up an event missed.
const FULL_SWEEP_EVERY: u32 = 20;

impl Quiescence {
    pub fn new(node_id: NodeId, config: QuiesceConfig, liveness: Arc<Liveness>) -> Arc<Quiescence> {
        Arc::new(Quiescence {
            node_id,
            config,
            epoch: Instant::now(),
            liveness,
            groups: RwLock::default(),
            swept: Arc::default(),
        })
    }

    fn enabled(&self) -> bool {
        !self.config.after.is_zero()
    }

    /// Register a group about to be opened. It starts dormant (see the
    /// module docs) once `attach` hands it its Raft instance.
    pub fn register(&self, group: u32) -> Arc<GroupQuiescence> {
        let g = Arc::new(GroupQuiescence {
            group,
            node_id: self.node_id,
            config: self.config,
            raft: OnceLock::new(),
            timer: OnceLock::new(),
            state: Mutex::new(State::Active),
            swept: self.swept.clone(),
            last_activity_ms: AtomicU64::new(0),
            epoch: self.epoch,
            liveness: self.liveness.clone(),
        });
        self.groups.write_unpoisoned().insert(group, g.clone());
        self.swept.lock_unpoisoned().insert(group);
        g
    }

    /// Hand the group its Raft instance and ticker timer; a dormant start
    /// stops the timer before it can fire (a new timer's first election is
    /// a whole timeout away).
    pub fn attach(&self, g: &GroupQuiescence, raft: RaftInstance, timer: Arc<GroupTimer>, start: ReplicaStart) {
        let _ = g.raft.set(raft);
        let _ = g.timer.set(timer);
        g.step(Event::Opened(start));
    }

    pub fn remove(&self, group: u32) {
        self.groups.write_unpoisoned().remove(&group);
        self.swept.lock_unpoisoned().remove(&group);
    }

    pub fn group(&self, group: u32) -> Option<Arc<GroupQuiescence>> {
        self.groups.read_unpoisoned().get(&group).cloned()
    }

    fn all(&self) -> Vec<Arc<GroupQuiescence>> {
        self.groups.read_unpoisoned().values().cloned().collect()
    }

    /// Drive every group: start quiescing idle ones, end dormancy, wake
    /// replicas whose leader changed or was lost. Runs until the change
    /// stream ends.
    pub fn spawn(self: Arc<Self>, mut changes: tokio::sync::mpsc::Receiver<PeerChange>, every: Duration) {
        if !self.enabled() {
            return;
        }
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut rounds = 0u32;
            loop {
                tokio::select! {
                    _ = ticker.tick() => {
                        rounds = rounds.wrapping_add(1);
                        self.sweep(rounds % FULL_SWEEP_EVERY == 0);
                    }
                    change = changes.recv() => match change {
                        Some(change) => self.peer_changed(change),
                        None => return,
                    },
                }
            }
        });
    }

    fn sweep(&self, full: bool) {
        let groups = if full {
            self.all()
        } else {
            let ids: Vec<u32> = self.swept.lock_unpoisoned().iter().copied().collect();
            let groups = self.groups.read_unpoisoned();
            ids.iter().filter_map(|id| groups.get(id).cloned()).collect()
        };
        for g in groups {
            let idle_for = Duration::from_millis(g.now_ms().saturating_sub(g.last_activity_ms.load(Ordering::Relaxed)));
            g.step(Event::Sweep { idle_for });
        }
    }

    fn peer_changed(&self, change: PeerChange) {
        tracing::info!(?change, "peer liveness changed");
        for g in self.all() {
            g.step(Event::Peer(change));
        }
    }

    /// A replica of `group` heard its leader `leader` step aside for `to`
    /// (a leadership transfer; openraft has just dropped this replica's
    /// leader lease). The target wakes at once: it elects now and needs its
    /// timers as the leader. A quiesced or dormant other replica schedules a
    /// wake-up, since until someone else leads the group takes no writes;
    /// if the target takes over first, its entries wake it anyway.
    pub fn leader_stepping_aside(&self, group: u32, leader: NodeId, to: NodeId) {
        if let Some(g) = self.group(group) {
            g.step(Event::LeaderSteppingAside { leader, to });
        }
    }
}
