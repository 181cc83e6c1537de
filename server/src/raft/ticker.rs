//! One timer per node for every Raft group on it.
//!
//! openraft gives each group its own tick task, waking every
//! `heartbeat × 13/64` ms (25 times a second at 200 ms heartbeats) to check
//! its election timer and, on a leader, to send heartbeats at its own phase.
//! A thousand awake groups are 25,000 task wake-ups a second per node and
//! heartbeats spread evenly over time, so none travel together. Here
//! openraft's ticks are off (`enable_tick: false`) and one loop drives every
//! group, as TiKV's raftstore drives many regions per thread:
//!
//! - **Heartbeats**: every heartbeat interval, each group this node leads
//!   and whose timer is *driven* sends a heartbeat — all in the same instant,
//!   so the peer conversations (`peer_link.rs`) pack them into a few frames.
//! - **Elections**: a driven replica that is not the leader and has not
//!   heard from a leader (an accepted AppendEntries, or a vote it granted)
//!   for the leader lease plus a random delay starts a pre-vote election,
//!   and tries again as long later if that brought no leader. Pre-vote and
//!   openraft's leader lease still decide whether an election may succeed.
//! - **Backing off under overload**: elections start only while the
//!   previous round's messages have left (the control lanes to peers are not
//!   backed up), and at most [`MAX_ELECTIONS_PER_ROUND`] per round, so a
//!   starved node never answers slowness with more elections.
//! - **Patience with a live leader**: a follower whose leader's *node*
//!   liveness reports up waits [`PATIENCE_LEASES`] leases without a word
//!   before it campaigns, not one. On a starved machine heartbeats of a
//!   thousand groups arrive late; a pre-vote for each is refused (the other
//!   voter still hears the leader) and only adds load, which delays more
//!   heartbeats: the election storm that kept a busy 2-core machine from
//!   ever leading 1,000 partitions. A dead or unreachable leader's node is
//!   reported down within the election timeout, and then the group elects
//!   as soon as the lease allows, the survivors taking turns (`quiesce.rs`), so failover does not wait
//!   for this; only a leader that is alive but silent toward this replica
//!   (a one-way cut) costs the longer wait.
//!
//! Quiescence (`quiesce.rs`) decides which groups are driven: dormant and
//! quiesced replicas are not, exactly as their openraft tick used to be off.
//! Timers only decide *when* an election starts; votes, terms and leases are
//! openraft's, so a mistake here costs time, never safety.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::metrics::RaftServerMetrics;
use openraft::type_config::alias::WatchReceiverOf;
use openraft::ServerState;
use rand::Rng;

use crate::sync::RwLockExt;
use crate::type_config::{NodeId, TypeConfig};
use crate::RaftInstance;

/// How often the loop runs: the granularity of election timeouts.
pub const ROUND: Duration = Duration::from_millis(25);
/// Elections started per round at most (40 rounds a second).
pub const MAX_ELECTIONS_PER_ROUND: usize = 64;
/// Leases a follower waits without hearing from a leader whose node is up
/// before it campaigns.
pub const PATIENCE_LEASES: u64 = 3;

/// The timers the loop drives, by group: only these are visited each
/// round, so 10,000 quiesced groups cost the loop nothing.
type DrivenTimers = RwLock<HashMap<u32, Arc<GroupTimer>>>;

/// Timer state of one group.
pub struct GroupTimer {
    group: u32,
    raft: RaftInstance,
    /// The group's small server metrics (role, leader), read every round.
    server: WatchReceiverOf<TypeConfig, RaftServerMetrics<TypeConfig>>,
    /// The node's driven timers, which hold this one exactly while the loop
    /// drives the group (quiescence turns it off).
    driven_timers: Weak<DrivenTimers>,
    /// The group was closed: nothing may drive it again.
    removed: AtomicBool,
    /// Ms on the ticker's clock at which this replica may start an election
    /// unless it hears from a leader first.
    election_due_ms: AtomicU64,
    /// Ms on the ticker's clock at which this replica last accepted a
    /// leader's message or granted a vote: where openraft's leader lease,
    /// which makes it refuse other candidates, starts.
    heard_ms: AtomicU64,
    /// Ms on the ticker's clock at which this replica last granted another
    /// replica a vote or a pre-vote: someone else is campaigning.
    candidate_seen_ms: AtomicU64,
    clock: TimerClock,
}

/// The ticker's clock and election timing, copied into each timer.
#[derive(Clone, Copy)]
struct TimerClock {
    epoch: Instant,
    /// The leader lease: no election can succeed sooner after a leader's
    /// last word.
    lease_ms: u64,
    /// Random extra delay, at most this, so replicas do not all run at once.
    spread_ms: u64,
}

impl TimerClock {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Time from the last word of a leader to this replica's election: the
    /// lease (voters refuse any candidate before it has run out, and this
    /// replica's own pre-vote is a no-op until then) plus a random share of
    /// the spread. Firing earlier would only be refused and wait a whole
    /// timeout again.
    fn timeout_ms(&self) -> u64 {
        self.lease_ms + rand::rng().random_range(0..self.spread_ms.max(1))
    }
}

impl GroupTimer {
    /// The replica heard from a leader, granted a vote or is starting an
    /// election itself: its election timer starts over (a timer firing
    /// during an election would supersede it with a new one).
    pub fn restart(&self) {
        self.election_due_ms.store(self.clock.now_ms() + self.clock.timeout_ms(), Ordering::Relaxed);
    }

    /// The replica heard from a leader or granted a vote: the lease starts
    /// over, and so does the election timer.
    pub fn heard(&self) {
        self.heard_ms.store(self.clock.now_ms(), Ordering::Relaxed);
        self.restart();
    }

    /// This replica granted another a vote or a pre-vote.
    pub fn candidate_seen(&self) {
        self.candidate_seen_ms.store(self.clock.now_ms().max(1), Ordering::Relaxed);
    }

    /// Whether this replica granted another a vote or pre-vote in the last
    /// `window`: an election of someone else's is under way.
    pub fn candidate_seen_within(&self, window: Duration) -> bool {
        let seen = self.candidate_seen_ms.load(Ordering::Relaxed);
        seen != 0 && self.clock.now_ms() < seen + window.as_millis() as u64
    }

    /// The leader stepped aside (a leadership transfer): openraft dropped
    /// this replica's lease, and silence from the old leader is expected
    /// from now on, so no patience either.
    pub fn lease_dropped(&self) {
        self.heard_ms.store(0, Ordering::Relaxed);
    }

    /// Whether a missed heartbeat is more likely load than a lost leader:
    /// the leader's node is up and it was heard less than
    /// [`PATIENCE_LEASES`] leases ago.
    fn patient(&self, now_ms: u64, node_up: &dyn Fn(NodeId) -> bool) -> bool {
        let heard = self.heard_ms.load(Ordering::Relaxed);
        let server = self.server.borrow_watched();
        // A leader that left the voters (a node removed) steps down without
        // a word: no patience for it.
        let still_voter = |l: NodeId| server.membership_config.membership().voter_ids().any(|v| v == l);
        let leader = server.current_leader.filter(|l| still_voter(*l));
        heard != 0 && now_ms < heard + PATIENCE_LEASES * self.clock.lease_ms && leader.is_some_and(node_up)
    }

    /// How long this replica still refuses candidates under the leader
    /// lease. Recorded after openraft's own clock starts it, so never short.
    pub fn lease_left(&self) -> Duration {
        let ends = self.heard_ms.load(Ordering::Relaxed) + self.clock.lease_ms;
        Duration::from_millis(ends.saturating_sub(self.clock.now_ms()))
    }

    /// Driven or not: what `runtime_config().tick(on)` was to openraft.
    pub fn set_driven(self: &Arc<Self>, on: bool) {
        let Some(timers) = self.driven_timers.upgrade() else { return };
        let mut timers = timers.write_unpoisoned();
        if self.removed.load(Ordering::Relaxed) || timers.contains_key(&self.group) == on {
            return;
        }
        if on {
            timers.insert(self.group, self.clone());
        } else {
            timers.remove(&self.group);
        }
    }
}

pub struct NodeTicker {
    clock: TimerClock,
    heartbeat: Duration,
    groups: RwLock<HashMap<u32, Arc<GroupTimer>>>,
    driven: Arc<DrivenTimers>,
}

impl NodeTicker {
    /// `election_min` spreads elections out; `election_max` is openraft's
    /// leader lease.
    pub fn new(heartbeat: Duration, election_min: Duration, election_max: Duration) -> Arc<NodeTicker> {
        let clock = TimerClock {
            epoch: Instant::now(),
            lease_ms: election_max.as_millis() as u64,
            spread_ms: election_min.as_millis() as u64,
        };
        Arc::new(NodeTicker { clock, heartbeat, groups: RwLock::default(), driven: Arc::default() })
    }

    /// Drive `group` from now on (driven, with a full election timeout
    /// before it may elect).
    pub fn register(&self, group: u32, raft: RaftInstance) -> Arc<GroupTimer> {
        let timer = Arc::new(GroupTimer {
            group,
            server: raft.server_metrics(),
            raft,
            driven_timers: Arc::downgrade(&self.driven),
            removed: AtomicBool::new(false),
            election_due_ms: AtomicU64::new(self.clock.now_ms() + self.clock.timeout_ms()),
            heard_ms: AtomicU64::new(self.clock.now_ms()),
            candidate_seen_ms: AtomicU64::new(0),
            clock: self.clock,
        });
        self.groups.write_unpoisoned().insert(group, timer.clone());
        self.driven.write_unpoisoned().insert(group, timer.clone());
        timer
    }

    pub fn remove(&self, group: u32) {
        let timer = self.groups.write_unpoisoned().remove(&group);
        let mut driven = self.driven.write_unpoisoned();
        driven.remove(&group);
        if let Some(timer) = timer {
            timer.removed.store(true, Ordering::Relaxed);
        }
    }

    fn timer(&self, group: u32) -> Option<Arc<GroupTimer>> {
        self.groups.read_unpoisoned().get(&group).cloned()
    }

    /// [`GroupTimer::heard`] for `group`.
    pub fn heard(&self, group: u32) {
        if let Some(timer) = self.timer(group) {
            timer.heard();
        }
    }

    /// [`GroupTimer::candidate_seen`] for `group`.
    pub fn candidate_seen(&self, group: u32) {
        if let Some(timer) = self.timer(group) {
            timer.candidate_seen();
        }
    }

    /// [`GroupTimer::lease_dropped`] for `group`.
    pub fn lease_dropped(&self, group: u32) {
        if let Some(timer) = self.timer(group) {
            timer.lease_dropped();
        }
    }

    /// Run the loop until the process ends. `backlog` says how many calls
    /// wait in the most backed-up control lane to a peer; elections wait
    /// while it is above `max_backlog`. `node_up` is node-level liveness.
    pub fn spawn(
        self: Arc<Self>,
        backlog: impl Fn() -> usize + Send + 'static,
        max_backlog: usize,
        node_up: impl Fn(NodeId) -> bool + Send + Sync + 'static,
    ) {
        tokio::spawn(async move {
            let mut rounds = tokio::time::interval(ROUND);
            rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut next_heartbeat = Instant::now();
            loop {
                rounds.tick().await;
                let now = Instant::now();
                let heartbeat_round = now >= next_heartbeat;
                if heartbeat_round {
                    next_heartbeat = now + self.heartbeat;
                }
                let elections_allowed = if backlog() > max_backlog { 0 } else { MAX_ELECTIONS_PER_ROUND };
                self.round(heartbeat_round, elections_allowed, &node_up).await;
            }
        });
    }

    async fn round(&self, heartbeat_round: bool, elections_allowed: usize, node_up: &(dyn Fn(NodeId) -> bool + Sync)) {
        let timers: Vec<Arc<GroupTimer>> = self.driven.read_unpoisoned().values().cloned().collect();
        let now_ms = self.clock.now_ms();
        let mut elections = 0;
        for timer in timers {
            let state = timer.server.borrow_watched().state;
            if state == ServerState::Leader {
                if heartbeat_round {
                    let _ = timer.raft.trigger().heartbeat().await;
                }
                continue;
            }
            // A learner — which is also what openraft calls a replica that
            // has not learnt its group's membership yet, such as one whose
            // creator has not reached it — cannot be elected; campaigning
            // only costs. It takes part once a leader's entries reach it.
            if state == ServerState::Learner {
                continue;
            }
            if now_ms < timer.election_due_ms.load(Ordering::Relaxed)
                || elections >= elections_allowed
                || timer.patient(now_ms, node_up)
            {
                continue;
            }
            elections += 1;
            crate::metrics::metrics().election_started();
            tracing::trace!(group = timer.group, ?state, "election timer fired");
            // Try again one timeout later if this brings no leader.
            timer.restart();
            let _ = timer.raft.trigger().elect(true).await;
        }
        if elections > 0 {
            tracing::debug!(elections, "election timers fired");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elections_wait_out_the_lease_and_spread_over_the_minimum_timeout() {
        let ticker =
            NodeTicker::new(Duration::from_millis(100), Duration::from_millis(250), Duration::from_millis(500));
        let samples: Vec<u64> = (0..2_000).map(|_| ticker.clock.timeout_ms()).collect();
        assert!(samples.iter().all(|t| (500..750).contains(t)));
        // Spread, not one value: replicas of a group must not all run at once.
        let (min, max) = (samples.iter().min().copied(), samples.iter().max().copied());
        assert!(max.zip(min).is_some_and(|(hi, lo)| hi - lo > 200), "{min:?}..{max:?}");
    }
}
