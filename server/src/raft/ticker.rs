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
//!
//! Quiescence (`quiesce.rs`) decides which groups are driven: dormant and
//! quiesced replicas are not, exactly as their openraft tick used to be off.
//! Timers only decide *when* an election starts; votes, terms and leases are
//! openraft's, so a mistake here costs time, never safety.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::metrics::RaftServerMetrics;
use openraft::type_config::alias::WatchReceiverOf;
use openraft::ServerState;
use rand::Rng;

use crate::raft::types::TypeConfig;
use crate::sync::RwLockExt;
use crate::RaftInstance;

/// How often the loop runs: the granularity of election timeouts.
pub const ROUND: Duration = Duration::from_millis(25);
/// Elections started per round at most (40 rounds a second).
pub const MAX_ELECTIONS_PER_ROUND: usize = 64;

/// Timer state of one group.
pub struct GroupTimer {
    raft: RaftInstance,
    /// The group's small server metrics (role, leader), read every round.
    server: WatchReceiverOf<TypeConfig, RaftServerMetrics<TypeConfig>>,
    /// Whether the node's loop drives this group (quiescence turns it off).
    driven: AtomicBool,
    /// Ms on the ticker's clock at which this replica may start an election
    /// unless it hears from a leader first.
    election_due_ms: AtomicU64,
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

    /// Driven or not: what `runtime_config().tick(on)` was to openraft.
    pub fn set_driven(&self, on: bool) {
        self.driven.store(on, Ordering::Relaxed);
    }
}

pub struct NodeTicker {
    clock: TimerClock,
    heartbeat: Duration,
    groups: RwLock<HashMap<u32, Arc<GroupTimer>>>,
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
        Arc::new(NodeTicker { clock, heartbeat, groups: RwLock::default() })
    }

    /// Drive `group` from now on (driven, with a full election timeout
    /// before it may elect).
    pub fn register(&self, group: u32, raft: RaftInstance) -> Arc<GroupTimer> {
        let timer = Arc::new(GroupTimer {
            server: raft.server_metrics(),
            raft,
            driven: AtomicBool::new(true),
            election_due_ms: AtomicU64::new(self.clock.now_ms() + self.clock.timeout_ms()),
            clock: self.clock,
        });
        self.groups.write_unpoisoned().insert(group, timer.clone());
        timer
    }

    pub fn remove(&self, group: u32) {
        self.groups.write_unpoisoned().remove(&group);
    }

    /// [`GroupTimer::restart`] for `group`.
    pub fn heard(&self, group: u32) {
        let timer = self.groups.read_unpoisoned().get(&group).cloned();
        if let Some(timer) = timer {
            timer.restart();
        }
    }

    /// Run the loop until the process ends. `backlog` says how many calls
    /// wait in the most backed-up control lane to a peer; elections wait
    /// while it is above `max_backlog`.
    pub fn spawn(self: Arc<Self>, backlog: impl Fn() -> usize + Send + 'static, max_backlog: usize) {
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
                self.round(heartbeat_round, elections_allowed).await;
            }
        });
    }

    async fn round(&self, heartbeat_round: bool, elections_allowed: usize) {
        let timers: Vec<Arc<GroupTimer>> =
            self.groups.read_unpoisoned().values().filter(|t| t.driven.load(Ordering::Relaxed)).cloned().collect();
        let now_ms = self.clock.now_ms();
        let mut elections = 0;
        for timer in timers {
            let leading = timer.server.borrow_watched().state == ServerState::Leader;
            if leading {
                if heartbeat_round {
                    let _ = timer.raft.trigger().heartbeat().await;
                }
                continue;
            }
            if now_ms < timer.election_due_ms.load(Ordering::Relaxed) || elections >= elections_allowed {
                continue;
            }
            elections += 1;
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
