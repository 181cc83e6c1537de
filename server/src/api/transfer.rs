//! Moving a partition's leadership to a chosen replica, without ever leaving
//! the partition unable to take writes.
//!
//! openraft's `transfer_leader` makes the leader step aside: it stops
//! heartbeats, refuses writes (forwarding them to the target) and tells every
//! voter to drop its leader lease, then waits for the target to win an
//! election. Nothing in openraft undoes that state: the old leader stays a
//! leader that serves nothing until another node wins an election (a
//! `trigger().elect()` on a leader is ignored). In an active group the
//! followers' election timers do that soon enough; in a quiesced group no
//! timer runs, so a transfer to a node that is down, paused or behind left
//! the partition unwritable until that node came back. Hence:
//!
//! * a transfer is refused up front when the target is not a voter, liveness
//!   calls it down, or its matched log is well behind the leader's (the
//!   target ignores a transfer whose log it lacks);
//! * the leader supervises every transfer it starts, in a task of its own so
//!   that a caller giving up does not cancel it: if no other node leads
//!   within [`transfer_bound`], it hands the leadership to the best live,
//!   caught-up voter (the target again if it has since caught up) — a
//!   leadership-transfer election passes the voters' leases at once;
//! * followers that hear their leader step aside schedule a wake-up
//!   (`Quiescence::leader_stepping_aside`), so the group elects even if the
//!   leader itself died mid-transfer.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::{RaftMetrics, ServerState};
use tally_proto::v1::cluster_client::ClusterClient;
use tally_proto::v1::TransferLeaderRequest;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

use crate::node::{Listener, Node};
use crate::reconciler::is_caught_up;
use crate::type_config::{NodeId, TypeConfig};
use crate::RaftInstance;

/// gRPC metadata key set on a refused transfer (value: `down` or `behind`),
/// so that `rebalance`, possibly on another node, can tell "skipped, the
/// target cannot lead now" from "tried and failed".
pub const REFUSED_KEY: &str = "tally-transfer-refused";

/// Why a replica may not be handed a partition's leadership now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ineligible {
    /// Not a voter of the group (say, a learner still catching up).
    NotVoter,
    /// Liveness reports the node down: it does not answer pings.
    Down,
    /// Its matched log index trails the leader's by more than one batch
    /// ([`is_caught_up`]): a transfer stops new proposals, so a target that
    /// close catches up at once; one further behind would make the
    /// partition wait, and openraft's target ignores a transfer whose log it
    /// lacks.
    Behind { matched: Option<u64>, last: u64 },
}

impl std::fmt::Display for Ineligible {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ineligible::NotVoter => write!(f, "is not a voter of the partition's group"),
            Ineligible::Down => write!(f, "is down (it does not answer pings)"),
            Ineligible::Behind { matched, last } => write!(
                f,
                "is behind (matched log index {}, the leader's is {last})",
                matched.map_or_else(|| "none".to_string(), |m| m.to_string())
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("partition {partition}: node {node} {why}; not moving the leadership to it")]
    Refused { partition: u32, node: NodeId, why: Ineligible },
    #[error("partition {partition} has no leader right now; retry")]
    NoLeader { partition: u32 },
    #[error("partition {partition}: leadership did not move to node {to} (waited {} ms); {}", waited.as_millis(), now_led_by(*leader))]
    TimedOut { partition: u32, to: NodeId, waited: Duration, leader: Option<NodeId> },
    #[error("partition {partition}: {message}")]
    Raft { partition: u32, message: String },
    /// The error another node (the leader) answered with.
    #[error("{}", .0.message())]
    Remote(Status),
}

fn now_led_by(leader: Option<NodeId>) -> String {
    match leader {
        Some(l) => format!("node {l} leads it now"),
        None => "an election is under way".to_string(),
    }
}

impl TransferError {
    /// The target could not lead now (down or behind): nothing was attempted.
    pub fn is_refusal(&self) -> bool {
        match self {
            TransferError::Refused { why, .. } => *why != Ineligible::NotVoter,
            TransferError::Remote(status) => status.metadata().get(REFUSED_KEY).is_some(),
            _ => false,
        }
    }
}

impl From<TransferError> for Status {
    fn from(e: TransferError) -> Status {
        let message = e.to_string();
        match e {
            TransferError::Remote(status) => status,
            TransferError::Refused { why: Ineligible::NotVoter, .. } => {
                Status::failed_precondition(format!("node_id: {message}"))
            }
            TransferError::Refused { why, .. } => {
                let kind = if why == Ineligible::Down { "down" } else { "behind" };
                let mut metadata = MetadataMap::new();
                metadata.insert(REFUSED_KEY, MetadataValue::from_static(kind));
                Status::with_metadata(Code::Unavailable, message, metadata)
            }
            TransferError::NoLeader { .. } | TransferError::TimedOut { .. } => Status::unavailable(message),
            TransferError::Raft { .. } => Status::internal(message),
        }
    }
}

/// What a leader knows about its followers, from its Raft metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaderView {
    pub me: NodeId,
    pub voters: BTreeSet<NodeId>,
    pub last_log_index: u64,
    /// Matched log index per follower (`None`: nothing matched yet).
    pub matched: BTreeMap<NodeId, Option<u64>>,
}

impl LeaderView {
    /// The view of `raft` if this node (`me`) leads it.
    pub fn of(raft: &RaftInstance, me: NodeId) -> Option<LeaderView> {
        LeaderView::from_metrics(&raft.metrics().borrow_watched(), me)
    }

    fn from_metrics(m: &RaftMetrics<TypeConfig>, me: NodeId) -> Option<LeaderView> {
        if m.state != ServerState::Leader || m.current_leader != Some(me) {
            return None;
        }
        Some(LeaderView {
            me,
            voters: m.membership_config.voter_ids().collect(),
            last_log_index: m.last_log_index.unwrap_or(0),
            matched: m
                .replication
                .as_ref()
                .map(|r| r.iter().map(|(id, l)| (*id, l.as_ref().map(|l| l.index))).collect())
                .unwrap_or_default(),
        })
    }
}

/// Whether `to` may be handed the leadership now.
pub fn check_target(to: NodeId, view: &LeaderView, is_up: impl Fn(NodeId) -> bool) -> Result<(), Ineligible> {
    if to == view.me {
        return Ok(());
    }
    if !view.voters.contains(&to) {
        return Err(Ineligible::NotVoter);
    }
    if !is_up(to) {
        return Err(Ineligible::Down);
    }
    let matched = view.matched.get(&to).copied().flatten();
    if !is_caught_up(matched, view.last_log_index) {
        return Err(Ineligible::Behind { matched, last: view.last_log_index });
    }
    Ok(())
}

/// Whom to hand the leadership to after a transfer to `failed` did not take:
/// `failed` itself if it is now eligible (it may only have been a few entries
/// behind when the transfer arrived), else the eligible voter with the most
/// log, lowest id first. `None` when no other voter can lead.
pub fn fallback_target(view: &LeaderView, failed: NodeId, is_up: impl Fn(NodeId) -> bool) -> Option<NodeId> {
    let eligible = |id: NodeId| id != view.me && check_target(id, view, &is_up).is_ok();
    if eligible(failed) {
        return Some(failed);
    }
    view.voters
        .iter()
        .copied()
        .filter(|id| eligible(*id))
        .max_by_key(|id| (view.matched.get(id).copied().flatten(), std::cmp::Reverse(*id)))
}

/// How long a transfer may take before the leader gives up on the target:
/// the target needs one RPC and one vote round; three maximum election
/// timeouts leave room for a loaded machine.
pub fn transfer_bound(node: &Node) -> Duration {
    Duration::from_millis(node.raft_config.election_timeout_max.saturating_mul(3)).max(Duration::from_secs(1))
}

/// Ask the partition's leader to hand over to `to`; returns the leader once
/// `to` leads. The leader is found from this node's replica, else asked of a
/// node that holds one.
pub async fn transfer_leadership(node: &Arc<Node>, partition: u32, to: NodeId) -> Result<NodeId, TransferError> {
    let Some(replica) = node.partition(partition) else {
        // No replica here, so no idea who leads: ask a replica's node.
        let holder = node
            .cluster_map
            .borrow()
            .replicas_of(partition)
            .iter()
            .copied()
            .find(|id| *id != node.id && node.liveness.is_up(*id));
        let holder = holder.ok_or(TransferError::NoLeader { partition })?;
        return forward(node, holder, partition, to).await;
    };
    let leader = replica.raft.metrics().borrow_watched().current_leader;
    match leader {
        // A leader liveness calls down is a stale view: it is being replaced.
        Some(l) if l == to && !node.liveness.is_up(l) => {
            Err(TransferError::Refused { partition, node: to, why: Ineligible::Down })
        }
        Some(l) if l != node.id && !node.liveness.is_up(l) => Err(TransferError::NoLeader { partition }),
        Some(l) if l == to => Ok(l),
        Some(l) if l == node.id => transfer_from_here(node, &replica.raft, partition, to).await,
        // Only the leader can hand over: ask it.
        Some(l) => forward(node, l, partition, to).await,
        None => Err(TransferError::NoLeader { partition }),
    }
}

async fn forward(node: &Arc<Node>, via: NodeId, partition: u32, to: NodeId) -> Result<NodeId, TransferError> {
    let remote = |s: Status| TransferError::Remote(s);
    let channel = node.forward_to_leader(via, Listener::Public, None).map_err(|e| remote(e.into()))?;
    let mut request = tonic::Request::new(TransferLeaderRequest { partition, node_id: to });
    // The leader may wait for the target to qualify (one election timeout),
    // then twice (the target, then a fallback).
    let catch_up = Duration::from_millis(node.raft_config.election_timeout_max);
    request.set_timeout(catch_up + 2 * transfer_bound(node) + Duration::from_secs(2));
    let resp = ClusterClient::new(channel).transfer_leader(request).await.map_err(remote)?;
    Ok(resp.into_inner().leader_node_id)
}

/// This node leads `raft`: check the target, then start and supervise the
/// transfer in a task of its own (see the module docs).
async fn transfer_from_here(
    node: &Arc<Node>,
    raft: &RaftInstance,
    partition: u32,
    to: NodeId,
) -> Result<NodeId, TransferError> {
    let me = node.id;
    let is_up = |id| node.liveness.is_up(id);
    let view = LeaderView::of(raft, me).ok_or(TransferError::NoLeader { partition })?;
    match check_target(to, &view, is_up) {
        Ok(()) => {}
        // A leader learns its followers' matched logs from their replies:
        // just after an election it has not heard them yet. Give the target
        // one replication round before calling it behind.
        Err(Ineligible::Behind { .. }) => {
            let wait = Duration::from_millis(node.raft_config.election_timeout_max);
            // Timing out is an answer too: the check below then refuses.
            let _ = raft
                .wait(Some(wait))
                .metrics(
                    |m| LeaderView::from_metrics(m, me).is_some_and(|v| check_target(to, &v, is_up).is_ok()),
                    "target caught up",
                )
                .await;
            let view = LeaderView::of(raft, me).ok_or(TransferError::NoLeader { partition })?;
            check_target(to, &view, is_up).map_err(|why| TransferError::Refused { partition, node: to, why })?;
        }
        Err(why) => return Err(TransferError::Refused { partition, node: to, why }),
    }
    let group = tally_proto::partition::group_of_partition(partition);
    // A quiesced leader's timers are off; the group is busy from here on.
    if let Some(q) = node.quiescence.group(group) {
        q.wake();
    }
    let (node, raft) = (node.clone(), raft.clone());
    tokio::spawn(async move { supervise(&node, &raft, partition, to).await })
        .await
        .map_err(|e| TransferError::Raft { partition, message: format!("transfer task: {e}") })?
}

async fn supervise(node: &Arc<Node>, raft: &RaftInstance, partition: u32, to: NodeId) -> Result<NodeId, TransferError> {
    let (me, bound, started) = (node.id, transfer_bound(node), std::time::Instant::now());
    let raft_error = |e: openraft::error::Fatal<TypeConfig>| TransferError::Raft { partition, message: e.to_string() };
    raft.trigger().transfer_leader(to).await.map_err(raft_error)?;
    let mut leader = successor(raft, me, bound).await;
    if leader.is_none() {
        // Still the leader, and refusing writes until someone else leads.
        let next = LeaderView::of(raft, me).and_then(|view| fallback_target(&view, to, |id| node.liveness.is_up(id)));
        match next {
            Some(next) => {
                tracing::warn!(
                    partition,
                    to,
                    next,
                    "leadership transfer timed out; handing the leadership to another voter"
                );
                raft.trigger().transfer_leader(next).await.map_err(raft_error)?;
                leader = successor(raft, me, bound).await;
            }
            None => tracing::warn!(
                partition,
                to,
                "leadership transfer timed out and no other voter can lead now; the followers' timers will elect"
            ),
        }
    }
    match leader {
        Some(l) if l == to => Ok(l),
        _ => {
            let leader = raft.metrics().borrow_watched().current_leader;
            Err(TransferError::TimedOut { partition, to, waited: started.elapsed(), leader })
        }
    }
}

/// The node that leads after this one stepped aside, once one does (within `bound`).
async fn successor(raft: &RaftInstance, me: NodeId, bound: Duration) -> Option<NodeId> {
    raft.wait(Some(bound))
        .metrics(|m| m.current_leader.is_some_and(|l| l != me), "another node leads")
        .await
        .ok()
        .and_then(|m| m.current_leader)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconciler::CAUGHT_UP_LAG;

    fn view() -> LeaderView {
        LeaderView {
            me: 1,
            voters: BTreeSet::from([1, 2, 3]),
            last_log_index: 1_000,
            matched: BTreeMap::from([(2, Some(1_000)), (3, Some(990)), (4, Some(1_000))]),
        }
    }

    #[test]
    fn a_live_caught_up_voter_is_eligible() {
        assert_eq!(check_target(2, &view(), |_| true), Ok(()));
        // A few entries behind: one batch catches it up.
        assert_eq!(check_target(3, &view(), |_| true), Ok(()));
        assert_eq!(check_target(1, &view(), |_| false), Ok(()), "the leader itself: nothing to do");
    }

    #[test]
    fn down_learners_and_laggards_are_refused() {
        assert_eq!(check_target(3, &view(), |id| id != 3), Err(Ineligible::Down));
        assert_eq!(check_target(4, &view(), |_| true), Err(Ineligible::NotVoter), "a learner");
        let mut v = view();
        v.matched.insert(3, Some(1_000 - CAUGHT_UP_LAG - 1));
        assert_eq!(check_target(3, &v, |_| true), Err(Ineligible::Behind { matched: Some(935), last: 1_000 }));
        v.matched.remove(&3);
        assert_eq!(check_target(3, &v, |_| true), Err(Ineligible::Behind { matched: None, last: 1_000 }));
        v.matched.insert(3, Some(1_000 - CAUGHT_UP_LAG));
        assert_eq!(check_target(3, &v, |_| true), Ok(()));
    }

    #[test]
    fn fallback_prefers_the_target_then_the_most_caught_up_voter() {
        let v = view();
        assert_eq!(fallback_target(&v, 3, |_| true), Some(3), "the target caught up since");
        assert_eq!(fallback_target(&v, 3, |id| id != 3), Some(2));
        let mut v = view();
        v.voters.insert(5);
        v.matched.insert(5, Some(1_000));
        assert_eq!(fallback_target(&v, 3, |id| id != 3), Some(2), "equal logs: lowest id");
        v.matched.insert(2, Some(999));
        assert_eq!(fallback_target(&v, 3, |id| id != 3), Some(5), "the most log first");
        assert_eq!(fallback_target(&view(), 3, |id| id == 1), None, "only the leader is up");
    }

    #[test]
    fn refusals_carry_their_kind_to_other_nodes() {
        let down = TransferError::Refused { partition: 4, node: 3, why: Ineligible::Down };
        assert!(down.is_refusal());
        let status = Status::from(down);
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains("node 3 is down"), "{}", status.message());
        assert!(TransferError::Remote(status).is_refusal());
        let not_voter = Status::from(TransferError::Refused { partition: 4, node: 3, why: Ineligible::NotVoter });
        assert!(not_voter.message().starts_with("node_id"));
        assert!(!TransferError::Remote(not_voter).is_refusal());
        let timed_out =
            TransferError::TimedOut { partition: 4, to: 3, waited: Duration::from_millis(2400), leader: Some(2) };
        assert!(!timed_out.is_refusal());
        assert_eq!(
            timed_out.to_string(),
            "partition 4: leadership did not move to node 3 (waited 2400 ms); node 2 leads it now"
        );
    }
}
