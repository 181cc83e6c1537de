//! The node's checkpointer: a few times per interval it writes the
//! in-memory state of every group whose oldest unwritten change is older
//! than `--checkpoint-interval-ms` (5 s; see `storage/write_back.rs`).
//!
//! Apply itself starts a checkpoint when a group's epoch is full; this loop
//! covers the groups that change slowly or stop changing, so no group
//! keeps more than a few seconds of log to replay after a crash. One group
//! at a time: checkpoints are background work and must not take every
//! blocking-pool permit from reads and apply.

use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::node::Node;

pub fn spawn(node: Weak<Node>, interval: Duration) {
    // Rounds at a fifth of the interval: a change waits at most 1.2 of it.
    let every = (interval / 5).clamp(Duration::from_millis(10), Duration::from_secs(1));
    tokio::spawn(async move {
        let mut round = tokio::time::interval(every);
        round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            round.tick().await;
            let Some(node) = node.upgrade() else { return };
            for wb in node.write_backs() {
                if !wb.due(interval) || !wb.claim_background() {
                    continue;
                }
                let job = wb.clone();
                if let Err(e) = node.engine.blocking(move |engine| job.checkpoint(engine, false)).await {
                    tracing::warn!(group = wb.group(), error = %e, "checkpoint failed; retried next round");
                }
                wb.release();
            }
            drop::<Arc<Node>>(node);
        }
    });
}
