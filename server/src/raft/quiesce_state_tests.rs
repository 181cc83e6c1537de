//! Every transition of `quiesce_state::decide`, on plain values.

use super::*;

const ME: NodeId = 2;
const SEC: Duration = Duration::from_secs(1);

fn config() -> QuiesceConfig {
    QuiesceConfig {
        after: Duration::from_secs(2),
        startup_grace: Duration::from_millis(1_100),
        backup_delay: Duration::from_millis(800),
    }
}

/// A group of voters 1, 2, 3 and learner 4, led by 1 unless a test says
/// otherwise, seen from node 2.
#[derive(Clone)]
struct View {
    role: Role,
    leader: Option<NodeId>,
    caught_up: bool,
    voters: Vec<NodeId>,
    learners: Vec<NodeId>,
}

impl View {
    fn follower_of(leader: NodeId) -> View {
        View { role: Role::Follower, leader: Some(leader), caught_up: false, voters: vec![1, 2, 3], learners: vec![4] }
    }

    fn leader() -> View {
        View { role: Role::Leader, leader: Some(ME), caught_up: true, ..View::follower_of(ME) }
    }
}

impl GroupView for View {
    fn role(&self) -> Role {
        self.role
    }
    fn current_leader(&self) -> Option<NodeId> {
        self.leader
    }
    fn caught_up(&self, _: &dyn Fn(NodeId) -> bool) -> bool {
        self.caught_up
    }
    fn members(&self) -> Vec<NodeId> {
        self.voters.iter().chain(&self.learners).copied().collect()
    }
    fn voters(&self) -> Vec<NodeId> {
        self.voters.clone()
    }
}

/// Runs `decide` at time `now` with the nodes in `down` reported down.
struct Run {
    config: QuiesceConfig,
    now: Instant,
    down: Vec<NodeId>,
}

impl Run {
    fn new() -> Run {
        Run { config: config(), now: Instant::now(), down: Vec::new() }
    }

    fn with_down(down: &[NodeId]) -> Run {
        Run { down: down.to_vec(), ..Run::new() }
    }

    fn decide(&self, state: &State, event: Event, view: &View) -> Decision {
        let is_up = |id: NodeId| !self.down.contains(&id);
        let cx = Context { me: ME, config: &self.config, now: self.now, is_up: &is_up };
        decide(state, event, view, &cx)
    }
}

fn quiesced_under(leader: NodeId) -> State {
    State::Quiesced { leader, wake_at: None }
}

fn to(next: State) -> Decision {
    Decision { next, action: Action::Nothing }
}

fn every_state(now: Instant) -> Vec<State> {
    vec![
        State::Active,
        State::Dormant { since: now, grace: SEC },
        State::Quiescing { acked: BTreeSet::from([3]) },
        quiesced_under(1),
        quiesced_under(ME),
        State::Quiesced { leader: 1, wake_at: Some(now + SEC) },
    ]
}

#[test]
fn driven_means_active_or_quiescing() {
    let now = Instant::now();
    let driven: Vec<bool> = every_state(now).iter().map(State::driven).collect();
    assert_eq!(driven, [true, false, true, false, false, false]);
    let asleep: Vec<bool> = every_state(now).iter().map(State::asleep).collect();
    assert_eq!(asleep, [false, true, false, true, true, true]);
    // Only a wake-up due at a time needs the sweep among the quiet states.
    let swept: Vec<bool> = every_state(now).iter().map(State::needs_sweep).collect();
    assert_eq!(swept, [true, true, true, false, false, true]);
}

#[test]
fn only_a_quiescing_or_quiesced_leader_flags_its_heartbeats() {
    let flags: Vec<bool> = every_state(Instant::now()).iter().map(|s| s.flags_heartbeats(ME)).collect();
    assert_eq!(flags, [false, false, true, false, true, false]);
}

#[test]
fn an_opened_replica_is_dormant_unless_it_creates_the_group() {
    let run = Run::new();
    let view = View::follower_of(1);
    let opened = |start| run.decide(&State::Active, Event::Opened(start), &view);
    assert_eq!(opened(ReplicaStart::Creator), to(State::Active));
    assert_eq!(opened(ReplicaStart::AwaitingCreator), to(State::Dormant { since: run.now, grace: CREATION_GRACE }));
    assert_eq!(opened(ReplicaStart::Existing), to(State::Dormant { since: run.now, grace: config().startup_grace }));
}

#[test]
fn woken_is_active_from_every_state() {
    let run = Run::new();
    for state in every_state(run.now) {
        assert_eq!(run.decide(&state, Event::Woken, &View::follower_of(1)), to(State::Active), "{state:?}");
    }
}

#[test]
fn a_write_on_a_quiesced_leader_wakes_it_and_renews_its_lease() {
    let run = Run::new();
    let view = View::leader();
    assert_eq!(
        run.decide(&quiesced_under(ME), Event::WriteComing, &view),
        Decision { next: State::Active, action: Action::RenewLease }
    );
    // Awake or quiescing leaders hold a lease already; a follower forwards.
    for state in [State::Active, State::Quiescing { acked: BTreeSet::new() }, quiesced_under(1)] {
        assert_eq!(run.decide(&state, Event::WriteComing, &view), to(state.clone()));
    }
}

#[test]
fn entries_to_a_live_member_are_activity_but_not_to_a_dead_one() {
    let view = View::leader();
    let active = Decision { next: State::Active, action: Action::MarkActive };
    let run = Run::new();
    for state in [State::Quiescing { acked: BTreeSet::new() }, quiesced_under(ME), State::Active] {
        assert_eq!(run.decide(&state, Event::EntriesSent { target: 3 }, &view), active);
    }
    let run = Run::with_down(&[3]);
    let state = quiesced_under(ME);
    assert_eq!(run.decide(&state, Event::EntriesSent { target: 3 }, &view), to(state.clone()));
}

#[test]
fn a_leader_quiesces_once_every_live_member_acknowledged_a_flagged_heartbeat() {
    let view = View::leader();
    let run = Run::new();
    let acked = |state: &State, target| run.decide(state, Event::FlaggedHeartbeatAcked { target }, &view).next;
    let s = acked(&State::Quiescing { acked: BTreeSet::new() }, 1);
    assert_eq!(s, State::Quiescing { acked: BTreeSet::from([1]) });
    let s = acked(&s, 3);
    assert_eq!(s, State::Quiescing { acked: BTreeSet::from([1, 3]) });
    // The learner counts too.
    assert_eq!(acked(&s, 4), quiesced_under(ME));

    // A member reported down is not waited for.
    let run = Run::with_down(&[3, 4]);
    let next =
        run.decide(&State::Quiescing { acked: BTreeSet::new() }, Event::FlaggedHeartbeatAcked { target: 1 }, &view);
    assert_eq!(next, to(quiesced_under(ME)));

    // A late acknowledgement changes nothing once the group woke.
    assert_eq!(Run::new().decide(&State::Active, Event::FlaggedHeartbeatAcked { target: 1 }, &view), to(State::Active));
}

#[test]
fn an_accepted_message_wakes_or_quiets_a_follower() {
    let run = Run::new();
    let view = View::follower_of(1);
    for state in every_state(run.now) {
        let unflagged = run.decide(&state, Event::Accepted { leader: 1, flagged: false }, &view);
        assert_eq!(unflagged, to(State::Active), "{state:?}");
        let flagged = run.decide(&state, Event::Accepted { leader: 1, flagged: true }, &view);
        // A flagged message also clears a pending wake-up: the leader is back.
        assert_eq!(flagged, to(quiesced_under(1)), "{state:?}");
    }
    // Its own flagged messages (as recorded on a leader) change nothing.
    let state = State::Quiescing { acked: BTreeSet::new() };
    assert_eq!(run.decide(&state, Event::Accepted { leader: ME, flagged: true }, &view), to(state.clone()));
}

#[test]
fn the_sweep_starts_quiescing_an_idle_caught_up_leader() {
    let run = Run::new();
    let idle = Event::Sweep { idle_for: Duration::from_secs(2) };
    let busy = Event::Sweep { idle_for: Duration::from_millis(1_999) };
    let quiescing = to(State::Quiescing { acked: BTreeSet::new() });
    assert_eq!(run.decide(&State::Active, idle, &View::leader()), quiescing);
    assert_eq!(run.decide(&State::Active, busy, &View::leader()), to(State::Active));
    let behind = View { caught_up: false, ..View::leader() };
    assert_eq!(run.decide(&State::Active, idle, &behind), to(State::Active));
    assert_eq!(run.decide(&State::Active, idle, &View::follower_of(1)), to(State::Active));
}

#[test]
fn the_sweep_wakes_a_quiescing_replica_that_no_longer_leads() {
    let run = Run::new();
    let state = State::Quiescing { acked: BTreeSet::from([1]) };
    let sweep = Event::Sweep { idle_for: SEC * 10 };
    assert_eq!(run.decide(&state, sweep, &View::leader()), to(state.clone()));
    assert_eq!(run.decide(&state, sweep, &View::follower_of(3)), to(State::Active));
}

#[test]
fn the_sweep_ends_dormancy_after_the_grace() {
    let run = Run::new();
    let sweep = Event::Sweep { idle_for: Duration::ZERO };
    let view = View::follower_of(1);
    let fresh = State::Dormant { since: run.now - Duration::from_millis(999), grace: SEC };
    assert_eq!(run.decide(&fresh, sweep, &view), to(fresh.clone()));
    let over = State::Dormant { since: run.now - SEC, grace: SEC };
    assert_eq!(run.decide(&over, sweep, &view), to(State::Active));
}

#[test]
fn the_sweep_wakes_a_quiesced_replica_whose_leader_changed() {
    let run = Run::new();
    let sweep = Event::Sweep { idle_for: Duration::ZERO };
    let state = quiesced_under(1);
    assert_eq!(run.decide(&state, sweep, &View::follower_of(1)), to(state.clone()));
    // Knowing no leader is still quiet under it (openraft forgets on restart).
    assert_eq!(run.decide(&state, sweep, &View { leader: None, ..View::follower_of(1) }), to(state.clone()));
    assert_eq!(run.decide(&state, sweep, &View::follower_of(3)), to(State::Active));
    let candidate = View { role: Role::Candidate, leader: None, ..View::follower_of(1) };
    assert_eq!(run.decide(&state, sweep, &candidate), to(State::Active));
    assert_eq!(run.decide(&state, sweep, &View::leader()), to(State::Active));
    // The quiesced leader itself wakes once it no longer leads.
    assert_eq!(run.decide(&quiesced_under(ME), sweep, &View::leader()), to(quiesced_under(ME)));
    assert_eq!(run.decide(&quiesced_under(ME), sweep, &View::follower_of(3)), to(State::Active));
}

#[test]
fn the_sweep_wakes_a_replica_whose_wake_up_is_due() {
    let run = Run::new();
    let sweep = Event::Sweep { idle_for: Duration::ZERO };
    let view = View::follower_of(1);
    let later = State::Quiesced { leader: 1, wake_at: Some(run.now + Duration::from_millis(1)) };
    assert_eq!(run.decide(&later, sweep, &view), to(later.clone()));
    let due = State::Quiesced { leader: 1, wake_at: Some(run.now) };
    assert_eq!(run.decide(&due, sweep, &view), to(State::Active));
}

#[test]
fn the_sweep_catches_a_lost_leader_whose_down_report_came_before_quiescing() {
    let sweep = Event::Sweep { idle_for: Duration::ZERO };
    // Node 2 is the lowest-id surviving voter of {1, 2, 3} without 1.
    let run = Run::with_down(&[1]);
    let elect = Decision { next: State::Active, action: Action::ElectNow };
    assert_eq!(run.decide(&quiesced_under(1), sweep, &View::follower_of(1)), elect);
    // Seen from node 2 when node 3 led: voter 1 is designated, 2 backs up.
    let run = Run::with_down(&[3]);
    let backup = State::Quiesced { leader: 3, wake_at: Some(run.now + config().backup_delay) };
    assert_eq!(run.decide(&quiesced_under(3), sweep, &View::follower_of(3)), to(backup.clone()));
    // Already waiting for its wake-up: it waits on.
    assert_eq!(run.decide(&backup, sweep, &View::follower_of(3)), to(backup.clone()));
}

#[test]
fn a_follower_back_up_wakes_the_groups_quiet_under_this_leader() {
    let run = Run::new();
    let view = View::leader();
    let woken = Decision { next: State::Active, action: Action::MarkActive };
    for change in [PeerChange::Up(3), PeerChange::Restarted(3), PeerChange::Up(4)] {
        assert_eq!(run.decide(&quiesced_under(ME), Event::Peer(change), &view), woken, "{change:?}");
        let quiescing = State::Quiescing { acked: BTreeSet::new() };
        assert_eq!(run.decide(&quiescing, Event::Peer(change), &view), woken, "{change:?}");
    }
    // Not a member of this group: nothing to do.
    assert_eq!(run.decide(&quiesced_under(ME), Event::Peer(PeerChange::Up(5)), &view), to(quiesced_under(ME)));
    // Followers do not care about other followers.
    assert_eq!(
        run.decide(&quiesced_under(1), Event::Peer(PeerChange::Up(3)), &View::follower_of(1)),
        to(quiesced_under(1))
    );
}

#[test]
fn a_lost_leader_has_the_designated_successor_elect_and_the_others_back_it_up() {
    let elect = Decision { next: State::Active, action: Action::ElectNow };
    for change in [PeerChange::Down(1), PeerChange::Restarted(1)] {
        let run = Run::with_down(&[1]);
        assert_eq!(run.decide(&quiesced_under(1), Event::Peer(change), &View::follower_of(1)), elect, "{change:?}");
    }
    // With a live voter 0, node 2 is not the designated successor: it backs up.
    let view = View { voters: vec![0, 1, 2], ..View::follower_of(1) };
    let run = Run::with_down(&[1]);
    let backup = State::Quiesced { leader: 1, wake_at: Some(run.now + config().backup_delay) };
    assert_eq!(run.decide(&quiesced_under(1), Event::Peer(PeerChange::Down(1)), &view), to(backup));
    // If 0 is down too, 2 goes first.
    let run = Run::with_down(&[0, 1]);
    assert_eq!(run.decide(&quiesced_under(1), Event::Peer(PeerChange::Down(1)), &view), elect);
    // A dormant replica knows no leader yet: its grace ends it.
    let dormant = State::Dormant { since: run.now, grace: SEC };
    assert_eq!(run.decide(&dormant, Event::Peer(PeerChange::Down(1)), &view), to(dormant.clone()));
}

#[test]
fn a_busy_groups_surviving_voters_take_turns_to_elect_when_the_lease_ends() {
    let down = Event::Peer(PeerChange::Down(1));
    let run = Run::with_down(&[1]);
    // Voters 1, 2, 3; 1 is lost: 2 (this node) goes first of two.
    assert_eq!(
        run.decide(&State::Active, down, &View::follower_of(1)),
        Decision { next: State::Active, action: Action::ElectWhenLeaseEnds { lost: 1, rank: 0, of: 2 } }
    );
    // With voter 0 alive this node takes the second turn: voter 0's log
    // may be the shorter one, and then only this node can win.
    let view = View { voters: vec![0, 1, 2], ..View::follower_of(1) };
    assert_eq!(
        run.decide(&State::Active, down, &view),
        Decision { next: State::Active, action: Action::ElectWhenLeaseEnds { lost: 1, rank: 1, of: 2 } }
    );
    // A voter liveness also reports down takes no turn.
    let run_two_down = Run::with_down(&[0, 1]);
    assert_eq!(
        run_two_down.decide(&State::Active, down, &view),
        Decision { next: State::Active, action: Action::ElectWhenLeaseEnds { lost: 1, rank: 0, of: 1 } }
    );
    // Not its leader, or not a follower: the timers do it.
    assert_eq!(run.decide(&State::Active, down, &View::follower_of(3)), to(State::Active));
    let learner = View { role: Role::Learner, ..View::follower_of(1) };
    assert_eq!(run.decide(&State::Active, down, &learner), to(State::Active));
}

#[test]
fn a_leader_stepping_aside_wakes_its_target_now_and_the_others_later() {
    let run = Run::new();
    let view = View::follower_of(1);
    let aside = |to| Event::LeaderSteppingAside { leader: 1, to };
    for state in every_state(run.now) {
        assert_eq!(run.decide(&state, aside(ME), &view), to(State::Active), "{state:?}");
    }
    // Leader 1 hands over to 3: 2 is the designated replica.
    let backup = config().backup_delay;
    let woken_after = |d| to(State::Quiesced { leader: 1, wake_at: Some(run.now + d) });
    assert_eq!(run.decide(&quiesced_under(1), aside(3), &view), woken_after(backup));
    let dormant = State::Dormant { since: run.now, grace: SEC };
    assert_eq!(run.decide(&dormant, aside(3), &view), woken_after(backup));
    // With voter 0 live, 2 waits twice as long; with 0 down, it goes first.
    let view0 = View { voters: vec![0, 1, 2, 3], ..View::follower_of(1) };
    assert_eq!(run.decide(&quiesced_under(1), aside(3), &view0), woken_after(backup * 2));
    let run0 = Run { down: vec![0], ..Run::new() };
    let run0_after = to(State::Quiesced { leader: 1, wake_at: Some(run0.now + backup) });
    assert_eq!(run0.decide(&quiesced_under(1), aside(3), &view0), run0_after);
    // A learner (not among the voters) never goes first.
    let learner_view = View { voters: vec![1, 3, 5], learners: vec![ME], ..View::follower_of(1) };
    assert_eq!(run.decide(&quiesced_under(1), aside(3), &learner_view), woken_after(backup * 2));
    // Quiet under another leader, or awake: nothing.
    assert_eq!(run.decide(&quiesced_under(3), aside(5), &view), to(quiesced_under(3)));
    assert_eq!(run.decide(&State::Active, aside(3), &view), to(State::Active));
}
