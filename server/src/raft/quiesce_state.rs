//! Quiescence decisions as a value: `(state, event) → (state, action)`.
//!
//! `quiesce.rs` explains what quiescence is for and drives it against
//! openraft; everything it *decides* is here, with no lock, task, timer or
//! openraft call in sight, so that every transition is a unit test. The
//! shape follows TiKV's `hibernate_state.rs`: the driver feeds what happened
//! ([`Event`]) together with a read-only view of the group ([`GroupView`])
//! and the node's liveness, and performs the returned [`Action`]; whether
//! the node ticker drives the group follows from the new state alone
//! ([`State::driven`]).
//!
//! Raft safety never depends on these decisions: they only choose when
//! timers run and when an election starts. A wrong decision costs an
//! unneeded election or a slower failover, never a count.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::liveness::PeerChange;
use crate::type_config::NodeId;

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
pub enum State {
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

impl State {
    /// Whether the node ticker drives the group (heartbeats on a leader,
    /// the election timer on the others).
    pub fn driven(&self) -> bool {
        matches!(self, State::Active | State::Quiescing { .. })
    }

    /// Whether the periodic sweep has something to decide for the group
    /// every round. A group quiet under a live leader changes only on an
    /// event (a message, a peer's change), so the sweep visits it only in
    /// its rare full rounds, as a safety net: an idle node with 10,000
    /// groups then sweeps next to nothing.
    pub fn needs_sweep(&self) -> bool {
        !matches!(self, State::Quiesced { wake_at: None, .. })
    }

    /// Whether the group is asleep, as `Cluster.Status` reports it.
    pub fn asleep(&self) -> bool {
        matches!(self, State::Quiesced { .. } | State::Dormant { .. })
    }

    /// Whether this node's heartbeats for the group carry the quiesce flag.
    pub fn flags_heartbeats(&self, me: NodeId) -> bool {
        match self {
            State::Quiescing { .. } => true,
            State::Quiesced { leader, .. } => *leader == me,
            _ => false,
        }
    }

    /// The leader the group went (or is going) quiet under.
    fn quiet_under(&self, me: NodeId) -> Option<NodeId> {
        match self {
            State::Quiesced { leader, .. } => Some(*leader),
            State::Quiescing { .. } => Some(me),
            _ => None,
        }
    }
}

/// A replica's role, as openraft reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leader,
    Candidate,
    Follower,
    Learner,
}

/// What a decision may read about the group. The driver reads openraft's
/// metrics lazily, so events that need nothing cost nothing.
pub trait GroupView {
    fn role(&self) -> Role;
    /// The leader this replica knows of, if any.
    fn current_leader(&self) -> Option<NodeId>;
    /// Leader only: everything in its log applied, and every member that
    /// `is_up` reports up has matched its last log index.
    fn caught_up(&self, is_up: &dyn Fn(NodeId) -> bool) -> bool;
    /// Voters and learners of the current membership.
    fn members(&self) -> Vec<NodeId>;
    /// Voters of the current membership.
    fn voters(&self) -> Vec<NodeId>;
}

/// What happened to the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The replica was opened, and starts this way.
    Opened(ReplicaStart),
    /// Something outside wants the timers on (a leadership transfer starts).
    Woken,
    /// This node is about to propose on the group (a client write, a
    /// membership change).
    WriteComing,
    /// Leader: an AppendEntries with entries is about to go to `target`.
    EntriesSent { target: NodeId },
    /// Leader: `target` accepted a flagged heartbeat.
    FlaggedHeartbeatAcked { target: NodeId },
    /// Follower: this replica accepted an AppendEntries from `leader`
    /// (refused ones are not events: a stale leader must not wake a group).
    Accepted { leader: NodeId, flagged: bool },
    /// The periodic sweep; the leader last sent entries `idle_for` ago.
    Sweep { idle_for: Duration },
    /// Liveness reported a change of a peer.
    Peer(PeerChange),
    /// The group's leader `leader` stepped aside for `to` (a leadership
    /// transfer; openraft has just dropped this replica's leader lease).
    LeaderSteppingAside { leader: NodeId, to: NodeId },
}

/// What the driver does besides taking the new state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Nothing,
    /// The leader is active now: its idle clock starts over.
    MarkActive,
    /// Restart the election timer and start a pre-vote election now.
    ElectNow,
    /// Once this replica's leader lease for `lost` has run out (the
    /// ticker's record of when it last heard `lost`), start pre-vote
    /// elections while it still sees `lost` as its leader: the first after
    /// `rank` turns, then one every `of` turns, so that the `of` surviving
    /// voters take turns and never campaign at the same instant.
    ElectWhenLeaseEnds {
        lost: NodeId,
        rank: u32,
        of: u32,
    },
    /// Mark activity, then renew the lease (one read-index round) before
    /// the write: a quiesced leader's lease has expired, and openraft
    /// refuses writes without one.
    RenewLease,
}

/// The new state and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub next: State,
    pub action: Action,
}

impl Decision {
    fn to(next: State) -> Decision {
        Decision { next, action: Action::Nothing }
    }

    fn with(next: State, action: Action) -> Decision {
        Decision { next, action }
    }
}

/// What every decision may know beyond the group: who we are, the
/// settings, the time, and which nodes liveness reports up.
pub struct Context<'a> {
    pub me: NodeId,
    pub config: &'a QuiesceConfig,
    pub now: Instant,
    pub is_up: &'a dyn Fn(NodeId) -> bool,
}

/// The one transition function.
pub fn decide(state: &State, event: Event, view: &dyn GroupView, cx: &Context) -> Decision {
    let me = cx.me;
    let stay = || Decision::to(state.clone());
    match event {
        Event::Opened(start) => {
            let grace = match start {
                // It elects at once and keeps its timers: its election is
                // retried if the others have not opened the group yet.
                ReplicaStart::Creator => return stay(),
                ReplicaStart::AwaitingCreator => CREATION_GRACE,
                ReplicaStart::Existing => cx.config.startup_grace,
            };
            Decision::to(State::Dormant { since: cx.now, grace })
        }
        Event::Woken => Decision::to(State::Active),
        Event::WriteComing => match state {
            State::Quiesced { leader, .. } if *leader == me => Decision::with(State::Active, Action::RenewLease),
            _ => stay(),
        },
        // Entries re-sent to a node liveness reports down are not activity:
        // openraft retries them forever, and a dead follower must not keep
        // its groups awake.
        Event::EntriesSent { target } if !(cx.is_up)(target) => stay(),
        Event::EntriesSent { .. } => Decision::with(State::Active, Action::MarkActive),
        Event::FlaggedHeartbeatAcked { target } => match state {
            State::Quiescing { acked } => {
                let mut acked = acked.clone();
                acked.insert(target);
                // Members liveness reports down do not hold quiescence up: a
                // cluster with a dead node would otherwise keep every group
                // it hosted awake. When the node answers again, `Up` or
                // `Restarted` wakes its groups.
                let all_acked =
                    view.members().into_iter().filter(|id| *id != me && (cx.is_up)(*id)).all(|id| acked.contains(&id));
                if all_acked {
                    Decision::to(State::Quiesced { leader: me, wake_at: None })
                } else {
                    Decision::to(State::Quiescing { acked })
                }
            }
            _ => stay(),
        },
        Event::Accepted { flagged: false, .. } => Decision::to(State::Active),
        Event::Accepted { leader, flagged: true } if leader != me => match state {
            State::Quiesced { leader: l, wake_at: None } if *l == leader => stay(),
            _ => Decision::to(State::Quiesced { leader, wake_at: None }),
        },
        Event::Accepted { .. } => stay(),
        Event::Sweep { idle_for } => sweep(state, idle_for, view, cx),
        Event::Peer(change) => peer_changed(state, change, view, cx),
        Event::LeaderSteppingAside { to, .. } if to == me => Decision::to(State::Active),
        Event::LeaderSteppingAside { leader, to } => {
            // Only the leader this replica quiesced under counts: a stale one
            // (say, one that restarted believing it led) must not wake a
            // group whose real leader is healthy and quiet. An awake replica
            // needs nothing: its election timer runs, and the leader no
            // longer heartbeats.
            let asleep_under_it = match state {
                State::Quiesced { leader: l, .. } => *l == leader,
                State::Dormant { .. } => true,
                _ => false,
            };
            if !asleep_under_it {
                return stay();
            }
            // The designated replica (lowest-id live voter besides the two)
            // wakes after `backup_delay`, the others after twice that, so
            // one candidate runs first and they do not split the vote.
            let designated = view.voters().into_iter().filter(|v| *v != leader && *v != to && (cx.is_up)(*v)).min();
            let delay = if designated == Some(me) { cx.config.backup_delay } else { cx.config.backup_delay * 2 };
            Decision::to(State::Quiesced { leader, wake_at: Some(cx.now + delay) })
        }
    }
}

fn sweep(state: &State, idle_for: Duration, view: &dyn GroupView, cx: &Context) -> Decision {
    let stay = || Decision::to(state.clone());
    match state {
        State::Active => {
            let quiet = view.role() == Role::Leader && idle_for >= cx.config.after && view.caught_up(cx.is_up);
            if quiet {
                Decision::to(State::Quiescing { acked: BTreeSet::new() })
            } else {
                stay()
            }
        }
        State::Quiescing { .. } if view.role() != Role::Leader => Decision::to(State::Active),
        State::Quiescing { .. } => stay(),
        State::Dormant { since, grace } if cx.now.saturating_duration_since(*since) >= *grace => {
            Decision::to(State::Active)
        }
        State::Dormant { .. } => stay(),
        State::Quiesced { leader, wake_at } => {
            let role = view.role();
            let still_quiet_under_it = if *leader == cx.me {
                role == Role::Leader
            } else {
                role != Role::Leader && role != Role::Candidate && view.current_leader().is_none_or(|c| c == *leader)
            };
            if !still_quiet_under_it || wake_at.is_some_and(|t| cx.now >= t) {
                Decision::to(State::Active)
            } else if wake_at.is_none() && *leader != cx.me && !(cx.is_up)(*leader) {
                // Missed the Down report (quiesced after it fired).
                leader_lost(*leader, view, cx)
            } else {
                stay()
            }
        }
    }
}

fn peer_changed(state: &State, change: PeerChange, view: &dyn GroupView, cx: &Context) -> Decision {
    let me = cx.me;
    let quiet_under = state.quiet_under(me);
    match change {
        // A follower is back, or restarted and lost its quiesced state: let
        // it hear heartbeats before its timer fires.
        PeerChange::Up(peer) | PeerChange::Restarted(peer)
            if quiet_under == Some(me) && view.members().contains(&peer) =>
        {
            Decision::with(State::Active, Action::MarkActive)
        }
        // The leader is gone, or restarted and forgot it led.
        PeerChange::Down(peer) | PeerChange::Restarted(peer) if quiet_under == Some(peer) => {
            leader_lost(peer, view, cx)
        }
        // A busy group lost its leader. Voters refuse a successor until
        // openraft's lease (election timeout max) has run out since they
        // last heard the leader, and a follower whose randomised timer
        // fires earlier is refused and waits a whole timeout again. The
        // surviving voters elect right when the lease is over instead,
        // taking turns in id order: the first is not always the one that
        // can win (under load the other may hold a longer log, and then a
        // pre-vote from the first is refused for good), and a refused
        // pre-vote changes no term, so the next turn is cheap.
        PeerChange::Down(peer)
            if *state == State::Active && view.role() == Role::Follower && view.current_leader() == Some(peer) =>
        {
            let successors = live_successors(peer, view, cx);
            match successors.iter().position(|v| *v == me) {
                Some(rank) => Decision::with(
                    State::Active,
                    Action::ElectWhenLeaseEnds { lost: peer, rank: rank as u32, of: successors.len() as u32 },
                ),
                None => Decision::to(State::Active),
            }
        }
        _ => Decision::to(state.clone()),
    }
}

/// The lowest-id voter other than `lost` that liveness reports up: the one
/// replica that elects at once when a leader is lost, so that the others do
/// not split the vote.
fn designated_successor(lost: NodeId, view: &dyn GroupView, cx: &Context) -> Option<NodeId> {
    live_successors(lost, view, cx).first().copied()
}

/// The voters other than `lost` that liveness reports up, by id.
fn live_successors(lost: NodeId, view: &dyn GroupView, cx: &Context) -> Vec<NodeId> {
    let mut voters: Vec<NodeId> = view.voters().into_iter().filter(|v| *v != lost && (cx.is_up)(*v)).collect();
    voters.sort_unstable();
    voters
}

/// A quiet group lost its leader: the designated successor wakes and starts
/// a pre-vote election now; the others wake after `backup_delay` in case it
/// cannot.
fn leader_lost(lost: NodeId, view: &dyn GroupView, cx: &Context) -> Decision {
    if designated_successor(lost, view, cx) == Some(cx.me) {
        Decision::with(State::Active, Action::ElectNow)
    } else {
        Decision::to(State::Quiesced { leader: lost, wake_at: Some(cx.now + cx.config.backup_delay) })
    }
}

#[cfg(test)]
#[path = "quiesce_state_tests.rs"]
mod tests;
