//! Automatic splitting (`tallyd --auto-split-events-per-sec`): the metadata
//! leader looks at every partition leader's load (`Cluster.Status`) every
//! few seconds and splits (`split.rs`) the busiest partition that stayed
//! above the rate for [`AUTO_SIGHTINGS`] checks in a row — a burst is not a
//! hot partition — at most one per [`AUTO_SPLIT_EVERY`], so each split's
//! effect is seen before the next is decided, and never past
//! `--auto-split-max-partitions`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::split::plan_and_complete;
use super::statuses::all_statuses;
use crate::node::Node;

/// Checks while this node leads the metadata group; nothing without
/// `--auto-split-events-per-sec`.
pub fn spawn(node: Arc<Node>) {
    if node.config.auto_split_events_per_sec <= 0.0 {
        return;
    }
    tokio::spawn(async move {
        let mut auto = AutoSplit::default();
        loop {
            tokio::time::sleep(AUTO_CHECK).await;
            if node.metadata_leader() == Some(node.id) {
                auto.check(&node).await;
            } else {
                auto = AutoSplit::default();
            }
        }
    });
}

const AUTO_CHECK: Duration = Duration::from_secs(5);
/// Checks in a row a partition must be above the rate in.
const AUTO_SIGHTINGS: u32 = 3;
/// At most one automatic split this often.
const AUTO_SPLIT_EVERY: Duration = Duration::from_secs(60);
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Default)]
struct AutoSplit {
    last_split: Option<std::time::Instant>,
    /// Partition → the checks in a row it was found above the rate in.
    sightings: BTreeMap<u32, u32>,
}

impl AutoSplit {
    async fn check(&mut self, node: &Arc<Node>) {
        let map = node.map();
        let config = &node.config;
        let reports = all_statuses(node, STATUS_TIMEOUT).await;
        let mut busy: BTreeMap<u32, f64> = BTreeMap::new();
        let mut reported = std::collections::BTreeSet::new();
        for report in &reports {
            for p in report.partitions.iter().filter(|p| p.leader_node_id == report.node_id && report.node_id != 0) {
                reported.insert(p.partition);
                if p.events_per_sec >= config.auto_split_events_per_sec {
                    busy.insert(p.partition, p.events_per_sec);
                }
            }
        }
        // A sighting lapses when the partition's leader reports it below
        // the rate, not when its node was too busy to answer in time.
        self.sightings.retain(|p, _| busy.contains_key(p) || !reported.contains(p));
        for p in busy.keys() {
            *self.sightings.entry(*p).or_default() += 1;
        }
        if self.last_split.is_some_and(|t| t.elapsed() < AUTO_SPLIT_EVERY)
            || map.partition_count >= config.auto_split_max_partitions
            || map.pending_split().is_some()
        {
            return;
        }
        let Some((partition, rate)) = busy
            .into_iter()
            .filter(|(p, _)| self.sightings.get(p).is_some_and(|n| *n >= AUTO_SIGHTINGS))
            .max_by(|a, b| a.1.total_cmp(&b.1))
        else {
            return;
        };
        tracing::info!(partition, events_per_sec = rate, "splitting a busy partition");
        self.last_split = Some(std::time::Instant::now());
        self.sightings.remove(&partition);
        if let Err(e) = plan_and_complete(node, partition).await {
            tracing::info!(error = %e.message(), "automatic split not planned; retried");
        }
    }
}
