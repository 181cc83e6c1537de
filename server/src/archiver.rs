//! The node's archiver: every `--archive-check-ms` (a minute), each
//! partition leader on this node moves its partition's archive along, when
//! the retention policy archives (`archive_after_ms`) and this node has an
//! archive (`--archive-url`):
//!
//! 1. it commits `Command::Seal` at the horizon the policy gives at its
//!    cluster-checked clock, when that is past the partition's seal;
//! 2. it exports whatever is sealed but not archived — its own seal, or one
//!    a previous leader committed and crashed before archiving — to the
//!    segment's file, and commits `Command::Archived`.
//!
//! Why this is exactly-once for every bucket is `archive_manifest.rs`'s
//! module doc. Only with a clock the other nodes have checked, as for
//! expiry: a leader whose clock ran ahead must not seal buckets early.

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::StreamExt;
use tally_proto::partition::group_of_partition;

use crate::command::Command;
use crate::node::{Node, PartitionReplica};
use crate::reconciler::is_leader;
use crate::storage::archive::ArchiveStore;

/// Longest wait for one commit before the loop moves on (it tries again
/// next round).
const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Partitions archived at once per node (an export scans the partition).
const EXPORTS_AT_ONCE: usize = 2;

pub fn spawn(node: Weak<Node>, every: Duration) {
    tokio::spawn(async move {
        let mut round = tokio::time::interval(every);
        round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned = false;
        loop {
            round.tick().await;
            let Some(node) = node.upgrade() else { return };
            let Some(seal) = due_seal(&node) else { continue };
            let Some(store) = node.archive.clone() else {
                if !warned {
                    tracing::warn!("the retention policy archives, but this node has no --archive-url: its leaders neither seal nor export");
                    warned = true;
                }
                continue;
            };
            archive_led_partitions(&node, &store, seal).await;
        }
    });
}

/// The seal the policy gives now, if it archives and the clock may say.
fn due_seal(node: &Node) -> Option<i64> {
    let alone = node.cluster_map.borrow().nodes.len() <= 1;
    if !node.clock.checked_by_peers() && !alone {
        return None;
    }
    let now = i64::try_from(node.clock.trusted().now_ms).unwrap_or(i64::MAX);
    node.retention.borrow().seal_at(now)
}

async fn archive_led_partitions(node: &Arc<Node>, store: &Arc<ArchiveStore>, seal: i64) {
    let due: Vec<_> = node
        .local_partitions()
        .into_iter()
        .filter(|r| {
            let manifest = r.archive.get();
            let behind = manifest.sealed_below_ms.is_none_or(|s| s < seal) || manifest.unarchived().is_some();
            behind && is_leader(&r.raft, node.id)
        })
        .collect();
    futures::stream::iter(due)
        .for_each_concurrent(EXPORTS_AT_ONCE, |replica| async move {
            if let Err(e) = archive_partition(node, store, &replica, seal).await {
                tracing::warn!(partition = replica.partition, error = %e, "archiving not finished; next round");
            }
        })
        .await;
}

async fn archive_partition(
    node: &Arc<Node>,
    store: &ArchiveStore,
    replica: &PartitionReplica,
    seal: i64,
) -> anyhow::Result<()> {
    if replica.archive.get().sealed_below_ms.is_none_or(|s| s < seal) {
        commit(node, replica, Command::Seal { below_ms: seal }).await?;
    }
    let manifest = replica.archive.get();
    let started = std::time::Instant::now();
    let Some(segment) = store.export(&node.engine, &replica.write_back, replica.partition, &manifest).await? else {
        return Ok(());
    };
    crate::crash_point::reach("archive-written");
    let (upto, rows, bytes) = (segment.upto_ms, segment.rows, segment.bytes);
    commit(node, replica, Command::Archived(segment)).await?;
    let took_ms = started.elapsed().as_millis() as u64;
    tracing::info!(partition = replica.partition, upto, rows, bytes, took_ms, "archived");
    Ok(())
}

async fn commit(node: &Node, replica: &PartitionReplica, command: Command) -> anyhow::Result<()> {
    if let Some(quiet) = node.quiescence.group(group_of_partition(replica.partition)) {
        quiet.prepare_write().await;
    }
    match tokio::time::timeout(COMMIT_TIMEOUT, replica.raft.client_write(command)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(anyhow::anyhow!("commit failed: {e}")),
        Err(_) => Err(anyhow::anyhow!("commit timed out after {COMMIT_TIMEOUT:?}")),
    }
}
