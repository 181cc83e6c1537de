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
//! A partition may also have been split (`Cluster.Split`): the partitioner
//! first picks the entity's *slot* (`xxh3_64(entity) mod slots`, the
//! partition count the cluster was created with), then the position of the
//! entity inside the slot (`xxh3_64(entity) / slots`) picks the partition
//! among the hash ranges the slot has been split into. An unsplit slot is
//! one range, owned by the partition of the same number, so a cluster that
//! never split routes exactly as `partition_of` does.
//!
//! Client and server both route with [`Routing`], built from the cluster
//! map (server) or `Cluster.Status` (client).

use std::collections::{BTreeMap, HashMap};

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

/// One hash range split off a partition: from `lo` (a position inside
/// `slot`, see [`range_key`]) up to the next range of the slot, owned by
/// `partition`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitRange {
    pub partition: u32,
    pub slot: u32,
    pub lo: u64,
}

/// Where an entity sits in the hash space: its slot (`xxh3 mod slots`) and
/// its position inside the slot (`xxh3 / slots`).
pub fn range_key(entity_id: &[u8], slots: u32) -> (u32, u64) {
    let slots = u64::from(slots.max(1));
    let hash = xxhash_rust::xxh3::xxh3_64(entity_id);
    // The remainder is below `slots`, which came from a u32.
    (u32::try_from(hash % slots).unwrap_or(0), hash / slots)
}

/// The last position inside a slot.
pub fn slot_last(slots: u32) -> u64 {
    u64::MAX / u64::from(slots.max(1))
}

/// The partitioner, the split ranges and the active spreads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routing {
    /// Every partition, split-off ones included.
    partition_count: u32,
    /// The partitioner's modulus: the partition count before any split.
    slots: u32,
    /// Per split slot: range start → owning partition (the slot's own
    /// partition owns from 0).
    ranges: HashMap<u32, BTreeMap<u64, u32>>,
    spreads: HashMap<Vec<u8>, SpreadRoute>,
}

impl Routing {
    pub fn new(partition_count: u32, spreads: impl IntoIterator<Item = (Vec<u8>, SpreadRoute)>) -> Routing {
        let spreads = spreads.into_iter().filter(|(_, s)| !s.partitions.is_empty()).collect();
        Routing { partition_count, slots: partition_count, ranges: HashMap::new(), spreads }
    }

    /// The same routing with `slots` as the partitioner's modulus and the
    /// split ranges (in the order they were split: a later range inside an
    /// earlier one narrows it).
    pub fn with_splits(mut self, slots: u32, splits: impl IntoIterator<Item = SplitRange>) -> Routing {
        self.slots = if slots == 0 { self.partition_count } else { slots };
        for split in splits {
            self.ranges
                .entry(split.slot)
                .or_insert_with(|| BTreeMap::from([(0, split.slot)]))
                .insert(split.lo, split.partition);
        }
        self
    }

    pub fn partition_count(&self) -> u32 {
        self.partition_count
    }

    /// The routing a node's `Cluster.Status` describes: its partitions,
    /// active splits and active spreads.
    pub fn of_status(status: &crate::v1::StatusResponse) -> Routing {
        let spreads = status
            .spreads
            .iter()
            .filter(|s| s.from_ms != 0)
            .map(|s| (s.entity_id.clone(), SpreadRoute { from_ms: s.from_ms, partitions: s.partitions.clone() }));
        let splits = status.splits.iter().filter(|s| s.active).map(|s| SplitRange {
            partition: s.partition,
            slot: s.slot,
            lo: s.lo,
        });
        Routing::new(status.partition_count, spreads).with_splits(status.slots, splits)
    }

    /// The partitioner's modulus (the partition count before any split).
    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// The entity's home partition (all of its events unless spread).
    pub fn home_of(&self, entity_id: &[u8]) -> u32 {
        if self.ranges.is_empty() {
            return partition_of(entity_id, self.slots);
        }
        let (slot, position) = range_key(entity_id, self.slots);
        match self.ranges.get(&slot) {
            Some(ranges) => ranges.range(..=position).next_back().map_or(slot, |(_, p)| *p),
            None => slot,
        }
    }

    /// The hash range `partition` owns: its slot and the first and last
    /// positions inside it; `None` for a partition the routing does not
    /// know. Every partition owns one contiguous range.
    pub fn range_of(&self, partition: u32) -> Option<(u32, u64, u64)> {
        let last_of_slot = slot_last(self.slots);
        let (slot, lo) = if partition < self.slots {
            (partition, 0)
        } else {
            self.ranges.iter().find_map(|(slot, ranges)| {
                ranges.iter().find(|(lo, p)| **p == partition && **lo > 0).map(|(lo, _)| (*slot, *lo))
            })?
        };
        let last = self
            .ranges
            .get(&slot)
            .and_then(|r| r.range(lo.saturating_add(1)..).next())
            .map_or(last_of_slot, |(next, _)| next.saturating_sub(1));
        Some((slot, lo, last))
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

    #[test]
    fn split_ranges_route_by_position_and_unsplit_slots_as_before() {
        // 4 slots; partition 1 split at the middle of its slot (partition 4
        // takes the upper half), then partition 4 split again (5 takes its
        // upper half).
        let half = slot_last(4) / 2 + 1;
        let quarter = half + (slot_last(4) - half) / 2 + 1;
        let routing = Routing::new(6, []).with_splits(
            4,
            [SplitRange { partition: 4, slot: 1, lo: half }, SplitRange { partition: 5, slot: 1, lo: quarter }],
        );
        assert_eq!(routing.range_of(1), Some((1, 0, half - 1)));
        assert_eq!(routing.range_of(4), Some((1, half, quarter - 1)));
        assert_eq!(routing.range_of(5), Some((1, quarter, slot_last(4))));
        assert_eq!(routing.range_of(2), Some((2, 0, slot_last(4))));
        assert_eq!(routing.range_of(6), None);
        let mut seen = [0u32; 6];
        for i in 0..20_000 {
            let entity = format!("video-{i}");
            let home = routing.home_of(entity.as_bytes());
            let (slot, position) = range_key(entity.as_bytes(), 4);
            let (range_slot, lo, last) = routing.range_of(home).unwrap_or_default();
            assert_eq!((range_slot, lo <= position && position <= last), (slot, true), "{entity}");
            if slot != 1 {
                assert_eq!(home, partition_of(entity.as_bytes(), 4), "unsplit slots route as before");
            }
            seen[home as usize] += 1;
        }
        // Each half of slot 1 about half of its events.
        assert!(seen[1] > 2_000 && seen[4] > 1_000 && seen[5] > 1_000, "{seen:?}");
        // Unsplit: exactly the partitioner.
        let plain = Routing::new(4, []);
        assert_eq!(plain.home_of(b"video-1"), partition_of(b"video-1", 4));
        assert_eq!(plain.range_of(3), Some((3, 0, slot_last(4))));
    }
}
