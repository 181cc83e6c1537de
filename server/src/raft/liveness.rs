//! Node-level liveness: one small `Ping` to every peer per interval,
//! whatever the number of Raft groups.
//!
//! Per-group heartbeats are what makes many Raft groups expensive: with
//! 1,000 partitions every node would wake 1,000 timers and send hundreds of
//! heartbeats per interval. Idle groups therefore quiesce (see
//! `quiesce.rs`): their leader stops heartbeating and followers stop their
//! election timers. What still has to be detected — a leader's node dying
//! or becoming unreachable — is a property of the node, not of the group,
//! so this module detects it once per peer and reports changes:
//!
//! - `Down(peer)` after pings have failed for `suspect_after` and at least
//!   twice in a row (one slow reply on a starved machine must not move the
//!   leadership of hundreds of groups) — or at once when the connection is
//!   refused: nothing listens on the peer's port, so its process is gone
//!   (killed, crashed), and its groups need not wait out the window;
//! - `Up(peer)` when a peer answers after being down;
//! - `Restarted(peer)` when it answers with a new boot id: it lost every
//!   group's in-memory state (leadership, quiescence), possibly faster than
//!   `Down` could notice.
//!
//! Pings travel on the pooled peer channel, so they take the same path, and
//! the same faults, as Raft traffic. Raft traffic also speaks for the peer
//! (`peer_link.rs`): a reply from it counts as an answer, so a peer whose
//! pings are slow on a starved machine while its Raft replies flow is not
//! reported down (which would wake and re-elect hundreds of groups), and a
//! conversation that breaks triggers a probe round at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tally_proto::internal::raft_client::RaftClient;
use tally_proto::internal::PingRequest;

use crate::clock::ClusterClock;
use tokio::sync::{mpsc, watch};

use super::peers::PeerPool;
use crate::meta::ClusterMap;
use crate::sync::MutexExt;
use crate::type_config::NodeId;

/// What one ping found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    /// The peer answered with its boot id.
    Answered(u64),
    /// No answer in time, or an error that says nothing certain.
    Failed,
    /// The connection was refused: no process listens on the peer port.
    Refused,
}

/// A change in a peer's reachability, as seen from this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerChange {
    /// Answering again after being reported down.
    Up(NodeId),
    /// Answering with a new boot id: the process restarted, whether or not
    /// it was reported down in between.
    Restarted(NodeId),
    Down(NodeId),
}

#[derive(Debug)]
struct PeerState {
    last_ok: Instant,
    consecutive_failures: u32,
    up: bool,
    boot_id: u64,
}

pub struct Liveness {
    node_id: NodeId,
    boot_id: u64,
    interval: Duration,
    suspect_after: Duration,
    peers: Mutex<HashMap<NodeId, PeerState>>,
    /// Fed with the peer clocks each ping carries.
    clock: Arc<ClusterClock>,
    /// Wakes the probe loop before its next tick.
    probe_now: tokio::sync::Notify,
}

/// Bound on undelivered changes; a consumer that falls this far behind has
/// bigger problems, and a full queue only delays (never loses) a wake-up
/// because the sender waits.
const CHANGE_QUEUE: usize = 256;

impl Liveness {
    /// Start probing the peers of the current cluster map.
    pub fn spawn(
        node_id: NodeId,
        interval: Duration,
        suspect_after: Duration,
        peers: Arc<PeerPool>,
        map: watch::Receiver<ClusterMap>,
        clock: Arc<ClusterClock>,
    ) -> (Arc<Liveness>, mpsc::Receiver<PeerChange>) {
        let liveness = Arc::new(Liveness {
            node_id,
            boot_id: rand::random::<u64>() | 1,
            interval,
            suspect_after,
            peers: Mutex::default(),
            clock,
            probe_now: tokio::sync::Notify::new(),
        });
        let (tx, rx) = mpsc::channel(CHANGE_QUEUE);
        tokio::spawn(liveness.clone().probe_loop(peers, map, tx));
        (liveness, rx)
    }

    pub fn boot_id(&self) -> u64 {
        self.boot_id
    }

    /// Whether `node` answered recently. Unknown peers count as up: nothing
    /// says otherwise yet, and this node itself is always up.
    pub fn is_up(&self, node: NodeId) -> bool {
        node == self.node_id || self.peers.lock_unpoisoned().get(&node).is_none_or(|s| s.up)
    }

    /// A conversation with `node` got a reply: as good as an answered ping
    /// for reachability (restarts are still told by the pings' boot ids).
    pub fn heard_from(&self, node: NodeId) {
        if let Some(state) = self.peers.lock_unpoisoned().get_mut(&node) {
            if state.up {
                state.last_ok = Instant::now();
                state.consecutive_failures = 0;
            }
        }
    }

    /// A conversation with `node` broke: probe every peer now rather than
    /// at the next tick.
    pub fn probe_soon(&self) {
        self.probe_now.notify_one();
    }

    async fn probe_loop(
        self: Arc<Self>,
        pool: Arc<PeerPool>,
        map: watch::Receiver<ClusterMap>,
        tx: mpsc::Sender<PeerChange>,
    ) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Every peer ever in the map stays probed: a node removed from the
        // map can still lead groups whose membership has not moved yet, and
        // if it dies, only its `Down` wakes those groups' followers.
        let mut known: HashMap<NodeId, String> = HashMap::new();
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = self.probe_now.notified() => {}
            }
            {
                let m = map.borrow();
                for (id, addr) in m.nodes.iter().filter(|(id, _)| **id != self.node_id) {
                    known.insert(*id, addr.peer_addr.clone());
                }
            }
            let probes = known.iter().map(|(&id, addr)| {
                let (pool, me, addr) = (pool.clone(), self.clone(), addr.clone());
                async move { (id, me.ping(&pool, id, &addr).await) }
            });
            let results = futures::future::join_all(probes).await;
            let changes = self.record(results, Instant::now());
            for change in changes {
                if tx.send(change).await.is_err() {
                    return;
                }
            }
        }
    }

    async fn ping(&self, pool: &PeerPool, node: NodeId, addr: &str) -> Probe {
        let Ok(channel) = pool.channel(node, addr) else { return Probe::Failed };
        // A ping shares its connection with every group's traffic; on a
        // loaded node it can wait behind thousands of streams. Give it the
        // whole suspicion window rather than one interval, or load alone
        // would read as a dead peer and move leaderships around.
        let deadline = self.suspect_after.max(self.interval);
        let mut request = tonic::Request::new(PingRequest { from_node_id: self.node_id, boot_id: self.boot_id });
        request.set_timeout(deadline);
        let mut client = RaftClient::new(channel);
        let sent_ms = self.clock.local_ms();
        match tokio::time::timeout(deadline, client.ping(request)).await {
            Ok(Ok(reply)) => {
                let reply = reply.into_inner();
                self.clock.observe(node, sent_ms, reply.wall_ms, self.clock.local_ms());
                Probe::Answered(reply.boot_id)
            }
            Ok(Err(status)) if refused(&status) => Probe::Refused,
            Ok(Err(_)) | Err(_) => Probe::Failed,
        }
    }

    /// Fold one round of probe results into the peer table; return what changed.
    fn record(&self, results: Vec<(NodeId, Probe)>, now: Instant) -> Vec<PeerChange> {
        let mut changes = Vec::new();
        let mut peers = self.peers.lock_unpoisoned();
        for (node, result) in results {
            let state =
                peers.entry(node).or_insert(PeerState { last_ok: now, consecutive_failures: 0, up: true, boot_id: 0 });
            match result {
                Probe::Answered(boot_id) => {
                    if state.boot_id != 0 && state.boot_id != boot_id {
                        changes.push(PeerChange::Restarted(node));
                    } else if !state.up {
                        changes.push(PeerChange::Up(node));
                    }
                    *state = PeerState { last_ok: now, consecutive_failures: 0, up: true, boot_id };
                }
                Probe::Refused => {
                    state.consecutive_failures += 1;
                    if state.up {
                        state.up = false;
                        changes.push(PeerChange::Down(node));
                    }
                }
                Probe::Failed => {
                    state.consecutive_failures += 1;
                    if state.up
                        && state.consecutive_failures >= 2
                        && now.duration_since(state.last_ok) >= self.suspect_after
                    {
                        state.up = false;
                        changes.push(PeerChange::Down(node));
                    }
                }
            }
        }
        changes
    }
}

/// Whether a failed call was refused a connection: the one failure that
/// proves nothing listens on the peer's port (a timeout or a reset may be a
/// slow or restarting peer).
fn refused(status: &tonic::Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn liveness() -> Liveness {
        Liveness {
            node_id: 1,
            boot_id: 11,
            interval: Duration::from_millis(100),
            suspect_after: Duration::from_millis(300),
            peers: Mutex::default(),
            clock: Arc::new(ClusterClock::new(0, Duration::from_secs(2))),
            probe_now: tokio::sync::Notify::new(),
        }
    }

    #[test]
    fn raft_replies_keep_a_peer_with_slow_pings_up() {
        let l = liveness();
        let t0 = Instant::now();
        assert!(l.record(vec![(2, Probe::Answered(5))], t0).is_empty());
        // Pings fail for longer than suspect_after, but replies keep coming.
        for i in 1..=10u64 {
            l.heard_from(2);
            let now = Instant::now().max(t0 + Duration::from_millis(100 * i));
            assert!(l.record(vec![(2, Probe::Failed)], now).is_empty(), "round {i}");
        }
        assert!(l.is_up(2));
        // Then silence: the second failed round past suspect_after is down.
        let later = Instant::now() + Duration::from_millis(400);
        assert_eq!(l.record(vec![(2, Probe::Failed)], later), vec![PeerChange::Down(2)]);
    }

    #[test]
    fn down_needs_both_repeated_failures_and_elapsed_time() {
        let l = liveness();
        let t0 = Instant::now();
        assert!(l.record(vec![(2, Probe::Answered(7))], t0).is_empty());
        // Two quick failures: not long enough.
        assert!(l.record(vec![(2, Probe::Failed)], t0 + Duration::from_millis(100)).is_empty());
        assert!(l.record(vec![(2, Probe::Failed)], t0 + Duration::from_millis(200)).is_empty());
        assert!(l.is_up(2));
        assert_eq!(l.record(vec![(2, Probe::Failed)], t0 + Duration::from_millis(300)), vec![PeerChange::Down(2)]);
        assert!(!l.is_up(2));
        // Reported once, not every round.
        assert!(l.record(vec![(2, Probe::Failed)], t0 + Duration::from_millis(400)).is_empty());
        assert_eq!(l.record(vec![(2, Probe::Answered(7))], t0 + Duration::from_millis(500)), vec![PeerChange::Up(2)]);
        assert!(l.is_up(2));
    }

    #[test]
    fn one_slow_reply_after_a_pause_is_not_down() {
        let l = liveness();
        let t0 = Instant::now();
        l.record(vec![(2, Probe::Answered(7))], t0);
        // This node was paused for 5 s; the first probe after it fails once.
        assert!(l.record(vec![(2, Probe::Failed)], t0 + Duration::from_secs(5)).is_empty());
        assert!(l.record(vec![(2, Probe::Answered(7))], t0 + Duration::from_millis(5100)).is_empty());
    }

    #[test]
    fn a_new_boot_id_reports_a_restart() {
        let l = liveness();
        let t0 = Instant::now();
        l.record(vec![(2, Probe::Answered(7)), (3, Probe::Answered(8))], t0);
        assert_eq!(
            l.record(vec![(2, Probe::Answered(9)), (3, Probe::Answered(8))], t0 + Duration::from_millis(100)),
            vec![PeerChange::Restarted(2)]
        );
    }

    #[test]
    fn a_refused_connection_is_down_at_once() {
        let l = liveness();
        let t0 = Instant::now();
        l.record(vec![(2, Probe::Answered(7))], t0);
        // Even with a Raft reply just heard: nothing listens any more.
        l.heard_from(2);
        assert_eq!(l.record(vec![(2, Probe::Refused)], t0 + Duration::from_millis(100)), vec![PeerChange::Down(2)]);
        assert!(!l.is_up(2));
        assert!(l.record(vec![(2, Probe::Refused)], t0 + Duration::from_millis(200)).is_empty());
        // Back with a new process: a restart.
        assert_eq!(
            l.record(vec![(2, Probe::Answered(9))], t0 + Duration::from_millis(300)),
            vec![PeerChange::Restarted(2)]
        );
    }

    #[test]
    fn unknown_peers_and_self_count_as_up() {
        let l = liveness();
        assert!(l.is_up(1));
        assert!(l.is_up(42));
    }
}
