//! Automatic spreading (`tallyd --auto-spread-share`): the metadata leader
//! looks at every partition leader's hottest entity (`hot_entity.rs`, in
//! `Cluster.Status`) every few seconds, and spreads (`spread.rs`) one that
//! takes more than the configured share of a partition busier than the
//! configured rate, twice in a row — a burst is not a hot entity — and at
//! most one entity per [`AUTO_SPREAD_EVERY`], so each spread's effect is
//! seen before the next is decided.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::spread::plan_and_complete;
use super::statuses::all_statuses;
use crate::node::Node;

/// Checks while this node leads the metadata group; nothing without
/// `--auto-spread-share`.
pub fn spawn(node: Arc<Node>) {
    if node.config.auto_spread_share <= 0.0 {
        return;
    }
    tokio::spawn(async move {
        let mut auto = AutoSpread::default();
        loop {
            tokio::time::sleep(AUTO_CHECK).await;
            if node.metadata_leader() == Some(node.id) {
                auto.check(&node).await;
            } else {
                auto = AutoSpread::default();
            }
        }
    });
}

/// How often the load is looked at for automatic spreading.
const AUTO_CHECK: Duration = Duration::from_secs(5);
/// Checks in a row an entity must be hot in before it is spread: a burst
/// of a few seconds is not a hot entity.
const AUTO_SIGHTINGS: u32 = 2;
/// At most one automatic spread this often: each moves load that the next
/// check must see settle first.
const AUTO_SPREAD_EVERY: Duration = Duration::from_secs(30);
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// Automatic spreading's memory between checks.
#[derive(Default)]
struct AutoSpread {
    last_spread: Option<std::time::Instant>,
    /// Entity → its partition, and the checks in a row it was found hot in.
    sightings: HashMap<Vec<u8>, (u32, u32)>,
}

impl AutoSpread {
    /// Every partition's leader report: an entity above the share of a
    /// partition busier than the minimum, not spread yet, is sighted; one
    /// sighted [`AUTO_SIGHTINGS`] times in a row is spread.
    async fn check(&mut self, node: &Arc<Node>) {
        let map = node.map();
        let reports = all_statuses(node, STATUS_TIMEOUT).await;
        let config = &node.config;
        let mut hot: Vec<(Vec<u8>, u32, f64)> = Vec::new();
        let mut reported: std::collections::BTreeSet<u32> = Default::default();
        for report in &reports {
            for p in report.partitions.iter().filter(|p| p.leader_node_id == report.node_id && report.node_id != 0) {
                reported.insert(p.partition);
                if p.events_per_sec >= config.auto_spread_min_events_per_sec
                    && p.hot_entity_share >= config.auto_spread_share
                    && !p.hot_entity_id.is_empty()
                    && !map.spreads.contains_key(&p.hot_entity_id)
                {
                    hot.push((p.hot_entity_id.clone(), p.partition, p.hot_entity_share));
                }
            }
        }
        // A sighting lapses when its partition's leader reports it cool,
        // not when the leader's node was too busy to answer in time (the
        // hottest partition's node is the likeliest to be).
        self.sightings
            .retain(|entity, (partition, _)| hot.iter().any(|(e, _, _)| e == entity) || !reported.contains(partition));
        for (entity, partition, _) in &hot {
            self.sightings.entry(entity.clone()).or_insert((*partition, 0)).1 += 1;
        }
        if self.last_spread.is_some_and(|t| t.elapsed() < AUTO_SPREAD_EVERY) {
            return;
        }
        let Some((entity, partition, share)) = hot
            .into_iter()
            .filter(|(e, _, _)| self.sightings.get(e).is_some_and(|(_, n)| *n >= AUTO_SIGHTINGS))
            .max_by(|a, b| a.2.total_cmp(&b.2))
        else {
            return;
        };
        let ways = config.auto_spread_ways.clamp(1, map.partition_count.saturating_sub(1).max(1));
        tracing::info!(
            entity = %String::from_utf8_lossy(&entity),
            partition,
            share,
            ways,
            "spreading a hot entity"
        );
        self.last_spread = Some(std::time::Instant::now());
        self.sightings.remove(&entity);
        if let Err(e) = plan_and_complete(node, &entity, ways).await {
            tracing::info!(error = %e.message(), "automatic spread not planned; retried");
        }
    }
}
