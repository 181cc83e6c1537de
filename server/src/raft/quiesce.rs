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
//! Raft safety never depends on any of this: timers only decide *when* an
//! election starts, and votes, terms and leases are openraft's. A mistake
//! here costs an unneeded election or a slower failover, never a lost or
//! doubled count.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::ServerState;

use super::liveness::{Liveness, PeerChange};
use super::ticker::GroupTimer;
use super::types::NodeId;
use crate::sync::{MutexExt, RwLockExt};
use crate::RaftInstance;

#[derive(Debug, Clone, Copy)]
pub struct QuiesceConfig {
    /// Idle time after which a leader quiesces its group; zero disables.
    pub after: Duration,
    /// How long a freshly opened replica stays dormant without hearing from
    /// its leader.
    pub startup_grace: Duration,
    /// When a quiesced group's leader is lost, how long replicas other than
    /// the designated one wait before their own timers may elect.
    pub backup_delay: Duration,
    /// When an *active* group's leader is reported down, how long until
    /// openraft's leader lease has surely expired on the voters (lease minus
    /// the time liveness took to notice, plus a margin).
    pub lease_wait: Duration,
}

/// How a replica being opened starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaStart {
    /// It creates the group (the first replica of the initial map).
    Creator,
    /// A replica of a group being created elsewhere: dormant until the
    /// creator reaches it, or [`CREATION_GRACE`] passes. A node opening a
    /// thousand new groups takes seconds, and a replica that woke sooner
    /// would campaign against the creator and split its votes.
    AwaitingCreator,
    /// A replica of an existing group (a node restarting or joining).
    Existing,
}

/// How long a replica of a group being created waits for its creator
/// before its own timer may elect (the creator's node could be down).
pub const CREATION_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Timers on; the ordinary Raft group.
    Active,
    /// Timers off since the replica was opened at `since`, for `grace`.
    Dormant { since: Instant, grace: Duration },
    /// Leader only: heartbeats carry the flag; members that acknowledged one.
    Quiescing { acked: BTreeSet<NodeId> },
    /// Timers off. `leader` is this node for the leader itself. `wake_at`:
    /// the leader was lost; wake at that time unless something else did.
    Quiesced { leader: NodeId, wake_at: Option<Instant> },
}

/// Quiescence of one group on this node; shared by the group's network
/// (leader side), the Raft service (follower side) and the sweeper.
pub struct GroupQuiescence {
    group: u32,
    node_id: NodeId,
    enabled: bool,
    raft: OnceLock<RaftInstance>,
    /// The node ticker's handle on this group: quiescence decides whether
    /// the ticker drives it.
    timer: OnceLock<Arc<GroupTimer>>,
    state: Mutex<State>,
    /// When the leader last sent entries, ms on the registry's clock.
    last_activity_ms: AtomicU64,
    epoch: Instant,
    liveness: Arc<Liveness>,
}

impl GroupQuiescence {
    fn raft(&self) -> Option<&RaftInstance> {
        self.raft.get()
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn set(&self, state: &mut State, next: State) {
        let ticking = |s: &State| matches!(s, State::Active | State::Quiescing { .. });
        let (was, will) = (ticking(state), ticking(&next));
        *state = next;
        if was != will {
            if let Some(timer) = self.timer.get() {
                timer.set_driven(will);
            }
        }
    }

    fn wake_locked(&self, state: &mut State) {
        if *state != State::Active {
            tracing::debug!(group = self.group, from = ?state, "group wakes");
            self.set(state, State::Active);
        }
    }

    /// Turn the group's timers back on, whatever its state.
    pub fn wake(&self) {
        self.wake_locked(&mut self.state.lock_unpoisoned());
    }

    /// Make this leader writable before a proposal. openraft refuses writes
    /// once the leader lease has expired, and a quiesced leader's has: no
    /// heartbeats, no acknowledgements. Wake the group, then one read-index
    /// round (a heartbeat answered by a quorum) renews the lease. Costs one
    /// round trip on the first write after a quiet period; nothing when the
    /// group is awake.
    pub async fn prepare_write(&self) {
        let quiesced_leader =
            matches!(*self.state.lock_unpoisoned(), State::Quiesced { leader, .. } if leader == self.node_id);
        if !quiesced_leader {
            return;
        }
        self.last_activity_ms.store(self.now_ms(), Ordering::Relaxed);
        self.wake();
        if let Some(raft) = self.raft() {
            let renew = raft.ensure_linearizable(openraft::ReadPolicy::ReadIndex);
            if let Err(e) = tokio::time::timeout(Duration::from_secs(2), renew).await {
                tracing::debug!(group = self.group, error = %e, "lease renewal before a write timed out");
            }
        }
    }

    pub fn is_quiesced(&self) -> bool {
        matches!(*self.state.lock_unpoisoned(), State::Quiesced { .. } | State::Dormant { .. })
    }

    /// Leader side, before an AppendEntries goes to `target`: entries are
    /// activity and wake the group; returns whether a heartbeat carries the
    /// flag. Entries re-sent to a node liveness reports down are not
    /// activity: openraft retries them forever, and a dead follower must
    /// not keep its groups awake.
    pub fn before_send(&self, target: NodeId, has_entries: bool) -> bool {
        if !self.enabled {
            return false;
        }
        if has_entries && !self.liveness.is_up(target) {
            return false;
        }
        let mut s = self.state.lock_unpoisoned();
        if has_entries {
            self.last_activity_ms.store(self.now_ms(), Ordering::Relaxed);
            self.wake_locked(&mut s);
            return false;
        }
        match &*s {
            State::Quiescing { .. } => true,
            State::Quiesced { leader, .. } => *leader == self.node_id,
            _ => false,
        }
    }

    /// Leader side, after `target` answered a flagged heartbeat. Members
    /// liveness reports down do not hold quiescence up: a cluster with a
    /// dead node would otherwise keep every group it hosted awake. When the
    /// node answers again, `Up`/`Restarted` wakes its groups.
    pub fn flagged_heartbeat_acked(&self, target: NodeId) {
        let Some(raft) = self.raft() else { return };
        let members: BTreeSet<NodeId> = {
            let m = raft.metrics();
            let m = m.borrow_watched();
            m.membership_config
                .membership()
                .nodes()
                .map(|(id, _)| *id)
                .filter(|id| *id != self.node_id && self.liveness.is_up(*id))
                .collect()
        };
        let mut s = self.state.lock_unpoisoned();
        if let State::Quiescing { acked } = &mut *s {
            acked.insert(target);
            if members.is_subset(acked) {
                tracing::debug!(group = self.group, "group quiesced (leader)");
                let leader = self.node_id;
                self.set(&mut s, State::Quiesced { leader, wake_at: None });
            }
        }
    }

    /// Follower side, after this replica handled an AppendEntries from
    /// `leader`. Only accepted messages count: a stale leader (say, a node
    /// that restarted believing it still leads) is refused by openraft and
    /// must not wake the group, since a replica that wakes long after it
    /// last heard from its leader starts an election at the next ticker round.
    pub fn received(&self, leader: NodeId, flagged: bool, accepted: bool) {
        if !self.enabled || !accepted {
            return;
        }
        let mut s = self.state.lock_unpoisoned();
        if !flagged {
            self.wake_locked(&mut s);
        } else if leader != self.node_id {
            match &*s {
                State::Quiesced { leader: l, wake_at: None } if *l == leader => {}
                _ => self.set(&mut s, State::Quiesced { leader, wake_at: None }),
            }
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
}

impl Quiescence {
    pub fn new(node_id: NodeId, config: QuiesceConfig, liveness: Arc<Liveness>) -> Arc<Quiescence> {
        Arc::new(Quiescence { node_id, config, epoch: Instant::now(), liveness, groups: RwLock::default() })
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
            enabled: self.enabled(),
            raft: OnceLock::new(),
            timer: OnceLock::new(),
            state: Mutex::new(State::Active),
            last_activity_ms: AtomicU64::new(0),
            epoch: self.epoch,
            liveness: self.liveness.clone(),
        });
        self.groups.write_unpoisoned().insert(group, g.clone());
        g
    }

    /// Hand the group its Raft instance and ticker timer; a dormant start
    /// stops the timer before it can fire (a new timer's first election is
    /// a whole timeout away).
    pub fn attach(&self, g: &GroupQuiescence, raft: RaftInstance, timer: Arc<GroupTimer>, start: ReplicaStart) {
        let _ = g.raft.set(raft);
        let _ = g.timer.set(timer);
        let grace = match start {
            // It elects at once and keeps its timers: its election is retried
            // if the others have not opened the group yet.
            ReplicaStart::Creator => return,
            ReplicaStart::AwaitingCreator => CREATION_GRACE,
            ReplicaStart::Existing => self.config.startup_grace,
        };
        if self.enabled() {
            g.set(&mut g.state.lock_unpoisoned(), State::Dormant { since: Instant::now(), grace });
        }
    }

    pub fn remove(&self, group: u32) {
        self.groups.write_unpoisoned().remove(&group);
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
        let liveness = self.liveness.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticker.tick() => self.sweep(&liveness, Instant::now()),
                    change = changes.recv() => match change {
                        Some(change) => self.peer_changed(change, &liveness, Instant::now()),
                        None => return,
                    },
                }
            }
        });
    }

    fn sweep(&self, liveness: &Liveness, now: Instant) {
        // Runs over every group several times a second: read only what the
        // group's state needs, and allocate nothing on the common paths.
        for g in self.all() {
            let Some(raft) = g.raft() else { continue };
            let mut s = g.state.lock_unpoisoned();
            let metrics = raft.metrics();
            let m = metrics.borrow_watched();
            match &*s {
                State::Active if m.state == ServerState::Leader => {
                    let idle_for = g.now_ms().saturating_sub(g.last_activity_ms.load(Ordering::Relaxed));
                    let caught_up = || {
                        m.last_applied.as_ref().map(|l| l.index) == m.last_log_index
                            && m.replication.as_ref().is_some_and(|r| {
                                r.iter().all(|(id, matched)| {
                                    matched.as_ref().map(|l| l.index) == m.last_log_index || !liveness.is_up(*id)
                                })
                            })
                    };
                    if idle_for >= self.config.after.as_millis() as u64 && caught_up() {
                        g.set(&mut s, State::Quiescing { acked: BTreeSet::new() });
                    }
                }
                State::Quiescing { .. } if m.state != ServerState::Leader => g.wake_locked(&mut s),
                State::Dormant { since, grace } if now.duration_since(*since) >= *grace => g.wake_locked(&mut s),
                State::Quiesced { leader: l, wake_at } => {
                    let l = *l;
                    let still_leader = if l == self.node_id {
                        m.state == ServerState::Leader
                    } else {
                        m.state != ServerState::Leader
                            && m.state != ServerState::Candidate
                            && m.current_leader.is_none_or(|c| c == l)
                    };
                    if !still_leader || wake_at.is_some_and(|t| now >= t) {
                        g.wake_locked(&mut s);
                    } else if wake_at.is_none() && l != self.node_id && !liveness.is_up(l) {
                        // Missed the Down report (quiesced after it fired).
                        let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
                        self.leader_lost(&g, &mut s, l, &voters, liveness, now);
                    }
                }
                _ => {}
            }
        }
    }

    fn peer_changed(&self, change: PeerChange, liveness: &Liveness, now: Instant) {
        tracing::info!(?change, "peer liveness changed");
        for g in self.all() {
            let Some(raft) = g.raft() else { continue };
            let (members, voters, leader, follower): (BTreeSet<NodeId>, Vec<NodeId>, Option<NodeId>, bool) = {
                let m = raft.metrics();
                let m = m.borrow_watched();
                let membership = m.membership_config.membership();
                (
                    membership.nodes().map(|(id, _)| *id).collect(),
                    membership.voter_ids().collect(),
                    m.current_leader,
                    m.state == ServerState::Follower,
                )
            };
            let mut s = g.state.lock_unpoisoned();
            let led_by = match &*s {
                State::Quiesced { leader, .. } => Some(*leader),
                State::Quiescing { .. } => Some(self.node_id),
                _ => None,
            };
            match change {
                // A follower is back, or restarted and lost its quiesced
                // state: let it hear heartbeats before its timer fires.
                PeerChange::Up(peer) | PeerChange::Restarted(peer)
                    if led_by == Some(self.node_id) && members.contains(&peer) =>
                {
                    g.last_activity_ms.store(g.now_ms(), Ordering::Relaxed);
                    g.wake_locked(&mut s);
                }
                // The leader is gone, or restarted and forgot it led.
                PeerChange::Down(peer) | PeerChange::Restarted(peer) if led_by == Some(peer) => {
                    self.leader_lost(&g, &mut s, peer, &voters, liveness, now);
                }
                // A busy group lost its leader. Voters refuse a successor
                // until openraft's lease (election timeout max) has run out
                // since they last heard the leader, and a follower whose
                // randomised timer fires earlier is refused and waits a whole
                // timeout again. The designated voter elects right when the
                // lease is over instead; if that is still too early, the
                // pre-vote is refused without a term change and the timers
                // go on as before.
                PeerChange::Down(peer) if *s == State::Active && follower && leader == Some(peer) => {
                    let designated = voters.iter().copied().filter(|v| *v != peer && liveness.is_up(*v)).min();
                    if designated == Some(self.node_id) {
                        let (raft, wait, timer) = (raft.clone(), self.config.lease_wait, g.timer.get().cloned());
                        tokio::spawn(async move {
                            tokio::time::sleep(wait).await;
                            if raft.metrics().borrow_watched().current_leader == Some(peer) {
                                if let Some(timer) = timer {
                                    timer.restart();
                                }
                                let _ = raft.trigger().elect(true).await;
                            }
                        });
                    }
                }
                _ => {}
            }
        }
    }

    /// A replica of `group` heard its leader `leader` step aside for `to`
    /// (a leadership transfer; openraft has just dropped this replica's
    /// leader lease). The target wakes at once: it elects now and needs its
    /// timers as the leader. A quiesced or dormant other replica schedules a
    /// wake-up — the lowest-id live voter besides the two after
    /// `backup_delay`, the others after twice that — since until someone
    /// else leads the group takes no writes. If the target takes over
    /// first, its entries wake them anyway. An awake replica needs nothing:
    /// its election timer runs, and the leader no longer heartbeats.
    pub fn leader_stepping_aside(&self, group: u32, leader: NodeId, to: NodeId) {
        if !self.enabled() {
            return;
        }
        let Some(g) = self.group(group) else { return };
        let Some(raft) = g.raft() else { return };
        let voters: Vec<NodeId> = raft.metrics().borrow_watched().membership_config.membership().voter_ids().collect();
        let mut s = g.state.lock_unpoisoned();
        if to == self.node_id {
            g.wake_locked(&mut s);
            return;
        }
        // Only the leader this replica quiesced under counts: a stale one
        // (say, one that restarted believing it led) must not wake a group
        // whose real leader is healthy and quiet.
        let asleep_under_it = match &*s {
            State::Quiesced { leader: l, .. } => *l == leader,
            State::Dormant { .. } => true,
            _ => false,
        };
        if asleep_under_it {
            let delay = wake_delay_after_step_aside(
                self.node_id,
                leader,
                to,
                &voters,
                |id| self.liveness.is_up(id),
                self.config.backup_delay,
            );
            tracing::debug!(
                group,
                leader,
                to,
                ?delay,
                "leader stepping aside; waking later unless the target takes over"
            );
            g.set(&mut s, State::Quiesced { leader, wake_at: Some(Instant::now() + delay) });
        }
    }

    /// A quiesced group lost its leader: the lowest-id surviving voter wakes
    /// and starts a pre-vote election now; the others wake after
    /// `backup_delay` in case it cannot. One candidate avoids split votes.
    fn leader_lost(
        &self,
        g: &GroupQuiescence,
        s: &mut State,
        lost: NodeId,
        voters: &[NodeId],
        liveness: &Liveness,
        now: Instant,
    ) {
        let designated = voters.iter().copied().filter(|v| *v != lost && liveness.is_up(*v)).min();
        if designated == Some(self.node_id) {
            g.wake_locked(s);
            if let Some(timer) = g.timer.get() {
                timer.restart();
            }
            if let Some(raft) = g.raft().cloned() {
                tokio::spawn(async move {
                    let _ = raft.trigger().elect(true).await;
                });
            }
        } else {
            *s = State::Quiesced { leader: lost, wake_at: Some(now + self.config.backup_delay) };
        }
    }
}

/// When a replica other than the target wakes after its leader stepped
/// aside: the designated one (lowest-id live voter other than the leader and
/// the target) after `backup`, the others after twice that, so that one
/// candidate runs first and they do not split the vote.
fn wake_delay_after_step_aside(
    me: NodeId,
    leader: NodeId,
    to: NodeId,
    voters: &[NodeId],
    is_up: impl Fn(NodeId) -> bool,
    backup: Duration,
) -> Duration {
    let designated = voters.iter().copied().filter(|v| *v != leader && *v != to && is_up(*v)).min();
    if designated == Some(me) {
        backup
    } else {
        backup * 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_replica_wakes_first_after_its_leader_steps_aside() {
        let backup = Duration::from_millis(800);
        let voters = [1, 2, 3, 4, 5];
        // Leader 1 hands over to 3: 2 is the designated replica.
        assert_eq!(wake_delay_after_step_aside(2, 1, 3, &voters, |_| true, backup), backup);
        assert_eq!(wake_delay_after_step_aside(4, 1, 3, &voters, |_| true, backup), backup * 2);
        // 2 is down: 4 goes first.
        assert_eq!(wake_delay_after_step_aside(4, 1, 3, &voters, |id| id != 2, backup), backup);
        // A learner (not among the voters) never goes first.
        assert_eq!(wake_delay_after_step_aside(6, 1, 3, &voters, |_| true, backup), backup * 2);
    }
}
