//! The node's expiry loop: every `--retention-check-ms` (a minute), each
//! partition leader on this node commits the floors the cluster's
//! retention policy gives at its clock, when they are above the partition's
//! (`Command::Expire`; `retention.rs` explains why expiry goes through the
//! log). Applying the entry expires the buckets on every replica alike,
//! and the checkpoint after it deletes them (`storage/write_back.rs`).
//!
//! With an archive (`archive_after_ms`), a partition expires nothing until
//! its first seal, and apply then keeps every bucket until it is archived
//! (`archive_manifest.rs`).
//!
//! Only with a clock the other nodes have checked: a leader whose clock ran
//! ahead must not expire buckets early. A partition whose leader is down
//! expires when the next leader's turn comes; floors move in steps of an
//! hour or more, so an idle partition costs one entry an hour at most.

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::StreamExt;
use tally_proto::partition::group_of_partition;

use crate::command::Command;
use crate::node::Node;
use crate::reconciler::is_leader;
use crate::retention::raise;

/// Longest wait for one partition's Expire to commit before the loop moves
/// on (it tries again next round).
const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Expiry commits in flight at once per node.
const COMMITS_AT_ONCE: usize = 16;

pub fn spawn(node: Weak<Node>, every: Duration) {
    tokio::spawn(async move {
        let mut round = tokio::time::interval(every);
        round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            round.tick().await;
            let Some(node) = node.upgrade() else { return };
            expire_led_partitions(&node).await;
        }
    });
}

async fn expire_led_partitions(node: &Arc<Node>) {
    let alone = node.cluster_map.borrow().nodes.len() <= 1;
    if !node.clock.checked_by_peers() && !alone {
        return;
    }
    let now = i64::try_from(node.clock.trusted().now_ms).unwrap_or(i64::MAX);
    let (wanted, archiving) = {
        let policy = node.retention.borrow();
        (policy.floors_at(now), policy.archive_after_ms > 0)
    };
    // A few commits at once: the first expiry after a policy change
    // reaches every partition, and one at a time would take minutes on a
    // node leading thousands.
    let due: Vec<_> = node
        .local_partitions()
        .into_iter()
        .filter_map(|r| {
            // With an archive, nothing expires before the partition's first
            // seal: apply caps floors at the archive only from then on, and
            // buckets dropped earlier would never reach the archive.
            let manifest = r.archive.get();
            if archiving && manifest.sealed_below_ms.is_none() {
                return None;
            }
            // What apply would allow: asking for more would commit an entry
            // every round that raises nothing.
            let wanted = manifest.cap_floors(&wanted);
            let current = r.write_back.floors();
            (raise(&current, &wanted) != current && is_leader(&r.raft, node.id)).then_some((r, wanted))
        })
        .collect();
    futures::stream::iter(due)
        .for_each_concurrent(COMMITS_AT_ONCE, |(replica, wanted)| async move {
            if let Some(quiet) = node.quiescence.group(group_of_partition(replica.partition)) {
                quiet.prepare_write().await;
            }
            match tokio::time::timeout(COMMIT_TIMEOUT, replica.raft.client_write(Command::Expire(wanted))).await {
                Ok(Ok(_)) => tracing::debug!(partition = replica.partition, ?wanted, "floors raised"),
                Ok(Err(e)) => {
                    tracing::debug!(partition = replica.partition, error = %e, "expiry not committed; next round")
                }
                Err(_) => tracing::debug!(partition = replica.partition, "expiry commit timed out; next round"),
            }
        })
        .await;
}
