//! Where an event goes once hot entities may be spread: the partitioner
//! ([`crate::partition::partition_of`]) plus the cluster's spreads.
//!
//! A spread entity keeps its home partition for every event before the
//! spread's `from_ms`; events at or after it go to one of the spread's
//! partitions, chosen by a hash of (entity, event_id). Both choices are
//! functions of the event alone, so a retried event — same id, same time —
//! always lands where its first attempt did, and that partition's dedup
//! index catches it. `from_ms` is fixed by the home partition when it
//! accepts the spread (at or after the first minute it has counted nothing
//! of), so no event of the entity at or after it was ever counted at home.
//!
//! Client and server both route with [`Routing`], built from the cluster
//! map (server) or `Cluster.Status` (client).

use std::collections::HashMap;

use crate::partition::partition_of;
use crate::v1::Event;

/// Seed of the share hash: any fixed value other than the partitioner's 0,
/// so shares are independent of partitions. Frozen like the partitioner.
const SHARE_SEED: u64 = 0x5eed_7a11;

/// One active spread: where the entity's events from `from_ms` on go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpreadRoute {
    /// First event time (a minute start) routed to `partitions`.
    pub from_ms: i64,
    /// The partitions sharing the entity's events from `from_ms` on; never
    /// the home partition.
    pub partitions: Vec<u32>,
}

/// Which share of a spread an event belongs to: a hash of the entity and
/// the event_id, so one id always takes the same share. An event without an
/// id (never deduplicated) is placed by its time and actor instead.
pub fn share_of(event: &Event, ways: usize) -> usize {
    if ways <= 1 {
        return 0;
    }
    let mut hasher = xxhash_rust::xxh3::Xxh3::with_seed(SHARE_SEED);
    hasher.update(&(event.entity_id.len() as u64).to_le_bytes());
    hasher.update(&event.entity_id);
    if event.event_id.is_empty() {
        hasher.update(&event.event_time_ms.to_le_bytes());
        hasher.update(&event.actor_id);
    } else {
        hasher.update(&event.event_id);
    }
    (hasher.digest() % ways as u64) as usize
}

/// The partitioner and the active spreads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routing {
    partition_count: u32,
    spreads: HashMap<Vec<u8>, SpreadRoute>,
}

impl Routing {
    pub fn new(partition_count: u32, spreads: impl IntoIterator<Item = (Vec<u8>, SpreadRoute)>) -> Routing {
        let spreads = spreads.into_iter().filter(|(_, s)| !s.partitions.is_empty()).collect();
        Routing { partition_count, spreads }
    }

    pub fn partition_count(&self) -> u32 {
        self.partition_count
    }

    /// The entity's home partition (all of its events unless spread).
    pub fn home_of(&self, entity_id: &[u8]) -> u32 {
        partition_of(entity_id, self.partition_count)
    }

    /// The entity's spread, if it has one.
    pub fn spread_of(&self, entity_id: &[u8]) -> Option<&SpreadRoute> {
        self.spreads.get(entity_id)
    }

    /// The partition that counts `event`.
    pub fn partition_of_event(&self, event: &Event) -> u32 {
        match self.spreads.get(&event.entity_id) {
            Some(spread) if event.event_time_ms >= spread.from_ms => {
                let share = share_of(event, spread.partitions.len());
                spread.partitions.get(share).copied().unwrap_or_else(|| self.home_of(&event.entity_id))
            }
            _ => self.home_of(&event.entity_id),
        }
    }

    /// Every partition holding counts of the entity: its home first, then
    /// its spread's partitions. A read sums them; each event is in one.
    pub fn partitions_of_entity(&self, entity_id: &[u8]) -> Vec<u32> {
        let home = self.home_of(entity_id);
        let mut partitions = vec![home];
        if let Some(spread) = self.spreads.get(entity_id) {
            partitions.extend(spread.partitions.iter().copied().filter(|p| *p != home));
        }
        partitions
    }

    /// Every active spread.
    pub fn spreads(&self) -> impl Iterator<Item = (&[u8], &SpreadRoute)> {
        self.spreads.iter().map(|(e, s)| (e.as_slice(), s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(entity: &str, id: &str, time: i64) -> Event {
        Event {
            entity_id: entity.as_bytes().to_vec(),
            event_type: "view".into(),
            event_time_ms: time,
            event_id: id.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn shares_are_frozen_and_even() {
        // Pinned: if this fails, spread entities' events would move.
        let pinned: Vec<usize> = (0..8).map(|i| share_of(&event("video-1", &format!("e-{i}"), 0), 4)).collect();
        assert_eq!(pinned, vec![3, 0, 3, 1, 1, 3, 2, 3]);
        // The id decides, not the time.
        assert_eq!(share_of(&event("video-1", "e-1", 0), 4), share_of(&event("video-1", "e-1", 99), 4));
        let mut per_share = [0u32; 4];
        for i in 0..40_000 {
            per_share[share_of(&event("video-1", &format!("e-{i}"), 0), 4)] += 1;
        }
        assert!(per_share.iter().all(|n| (9_000..11_000).contains(n)), "{per_share:?}");
        // Keyless events spread by time and actor.
        let keyless: std::collections::BTreeSet<usize> =
            (0..100).map(|t| share_of(&event("video-1", "", t), 4)).collect();
        assert_eq!(keyless.len(), 4);
    }

    #[test]
    fn a_spread_takes_events_from_its_start_and_keeps_ids_together() {
        let home = partition_of(b"video-1", 64);
        let spread = SpreadRoute { from_ms: 60_000, partitions: vec![(home + 1) % 64, (home + 2) % 64] };
        let routing = Routing::new(64, [(b"video-1".to_vec(), spread.clone())]);
        assert_eq!(routing.partition_of_event(&event("video-1", "a", 59_999)), home);
        for i in 0..100 {
            let e = event("video-1", &format!("e-{i}"), 60_000 + i);
            let p = routing.partition_of_event(&e);
            assert!(spread.partitions.contains(&p));
            // A retry of the same id at the same time goes to the same place.
            assert_eq!(routing.partition_of_event(&e.clone()), p);
        }
        assert_eq!(routing.partition_of_event(&event("video-2", "a", 60_000)), partition_of(b"video-2", 64));
        assert_eq!(routing.partitions_of_entity(b"video-1"), vec![home, (home + 1) % 64, (home + 2) % 64]);
        assert_eq!(routing.partitions_of_entity(b"video-2"), vec![partition_of(b"video-2", 64)]);
    }
}
