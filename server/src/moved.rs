//! A partition's record of the entities spread away from it, and of the
//! latest minute it has counted — the replicated half of a spread.
//!
//! Spreading a hot entity (`Cluster.Spread`, `spreader.rs`) must never count
//! an event twice, though the entity's events change partitions while
//! clients retry. Routing is by event time: the home partition keeps every
//! event before the spread's `from_ms`, the spread's partitions take the
//! rest by a hash of the event_id (`tally_proto::routing`). So the one thing
//! to rule out is an event at or after `from_ms` counted at home before the
//! switch and again, on a retry, at its new partition. The home partition
//! rules it out in its own log:
//!
//! * Apply tracks the latest minute the partition has counted
//!   (`latest_minute_ms`), deterministically on every replica.
//! * `Command::Spread { entity, from_ms }` fixes the entity's `from_ms` at
//!   the later of the one asked and the minute after `latest_minute_ms`:
//!   no event of it at or after that minute was counted here.
//! * From that entry on, apply refuses any delta of the entity at or after
//!   `from_ms` (its events are answered "moved", not counted, their keys
//!   not recorded); the leader's processor refuses such events first.
//!
//! Only after the home's entry is committed does the cluster map route
//! the entity's new events away (`meta.rs`), so every event at or after
//! `from_ms` is counted, if at all, where the map sends it.
//!
//! A split (`Cluster.Split`) moves a whole hash range, for every event
//! time: at `Command::Split` the parent's replicas hand the range's state,
//! dedup window included, to the new partition (`storage/split.rs`) and
//! from that entry on refuse every delta of the range (`ranges`). An event
//! counted before the split is in the state the child starts from, and its
//! key in the child's dedup window, so a retry routed to the child is a
//! duplicate there; an event after it is counted, if at all, by the child.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tally_proto::time::MINUTE_MS;

use crate::sync::MutexExt;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MovedEntities {
    /// The latest minute a counted delta of this partition fell in.
    pub latest_minute_ms: Option<i64>,
    /// Entity → the first minute no longer counted here.
    pub moved: BTreeMap<Vec<u8>, i64>,
    /// Hash ranges split off to other partitions, none of whose events
    /// are counted here any more.
    #[serde(default)]
    pub ranges: Vec<MovedRange>,
}

/// A hash range split off a partition (`tally_proto::routing`): positions
/// `lo..=last` of `slot` under the modulus `slots`, now counted by `to`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub struct MovedRange {
    pub slots: u32,
    pub slot: u32,
    pub lo: u64,
    pub last: u64,
    pub to: u32,
}

impl MovedRange {
    pub fn contains(&self, entity: &[u8]) -> bool {
        self.contains_key(tally_proto::routing::range_key(entity, self.slots))
    }

    /// Whether the range holds the (slot, position) of an entity under
    /// this range's `slots`.
    fn contains_key(&self, (slot, position): (u32, u64)) -> bool {
        slot == self.slot && (self.lo..=self.last).contains(&position)
    }
}

impl MovedEntities {
    /// Records that a delta of `minute_ms` was counted; whether that
    /// changed the record.
    pub fn counted(&mut self, minute_ms: i64) -> bool {
        if self.latest_minute_ms.is_some_and(|m| m >= minute_ms) {
            return false;
        }
        self.latest_minute_ms = Some(minute_ms);
        true
    }

    /// Moves `entity` away from `wanted_from_ms` at the earliest (rounded
    /// up to a minute); returns the `from_ms` in force, which a repeated
    /// command does not change.
    pub fn move_out(&mut self, entity: &[u8], wanted_from_ms: i64) -> i64 {
        if let Some(&from) = self.moved.get(entity) {
            return from;
        }
        let wanted =
            wanted_from_ms.div_euclid(MINUTE_MS).saturating_add(i64::from(wanted_from_ms.rem_euclid(MINUTE_MS) != 0))
                * MINUTE_MS;
        let after_counted = self.latest_minute_ms.map_or(i64::MIN, |m| m.saturating_add(MINUTE_MS));
        let from = wanted.max(after_counted);
        self.moved.insert(entity.to_vec(), from);
        from
    }

    /// Whether a delta of `entity` at `minute_ms` is no longer counted here.
    pub fn refuses(&self, entity: &[u8], minute_ms: i64) -> bool {
        (!self.moved.is_empty() && self.moved.get(entity).is_some_and(|from| minute_ms >= *from))
            || self.split_to(entity).is_some()
    }

    /// The partition the entity's range was split off to, if it was.
    pub fn split_to(&self, entity: &[u8]) -> Option<u32> {
        // Every range of a partition has the map's one modulus: the entity
        // is hashed once, however many ranges were split off (per event).
        let first = self.ranges.first()?;
        let key = tally_proto::routing::range_key(entity, first.slots);
        self.ranges
            .iter()
            .find(|r| if r.slots == first.slots { r.contains_key(key) } else { r.contains(entity) })
            .map(|r| r.to)
    }

    /// Record the range as split off; false if it already was (a split is
    /// applied once, however often it is asked).
    pub fn split_off(&mut self, range: MovedRange) -> bool {
        if self.ranges.iter().any(|r| r.to == range.to) {
            return false;
        }
        self.ranges.push(range);
        true
    }

    /// What the new partition inherits: the spreads of entities in its range
    /// and the latest minute counted (so a later spread there never starts
    /// before a minute the parent counted).
    pub fn inherited_by(&self, range: &MovedRange) -> MovedEntities {
        MovedEntities {
            latest_minute_ms: self.latest_minute_ms,
            moved: self.moved.iter().filter(|(e, _)| range.contains(e)).map(|(e, f)| (e.clone(), *f)).collect(),
            ranges: Vec::new(),
        }
    }
}

/// The applied record, shared with the processor and status.
#[derive(Debug, Default)]
pub struct SharedMoved {
    current: Mutex<Arc<MovedEntities>>,
}

impl SharedMoved {
    pub fn get(&self) -> Arc<MovedEntities> {
        self.current.lock_unpoisoned().clone()
    }

    pub fn set(&self, moved: MovedEntities) {
        *self.current.lock_unpoisoned() = Arc::new(moved);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_780_000_000_000 / MINUTE_MS * MINUTE_MS;

    #[test]
    fn from_is_after_everything_counted_and_fixed_once() {
        let mut m = MovedEntities::default();
        assert!(m.counted(T + 5 * MINUTE_MS));
        assert!(!m.counted(T), "the latest minute never goes back");
        // Asked for a minute already counted: the next uncounted one.
        assert_eq!(m.move_out(b"hot", T), T + 6 * MINUTE_MS);
        assert_eq!(m.move_out(b"hot", T + 60 * MINUTE_MS), T + 6 * MINUTE_MS, "fixed once");
        // Asked for a later one: rounded up to its minute.
        assert_eq!(m.move_out(b"other", T + 10 * MINUTE_MS + 1), T + 11 * MINUTE_MS);
        assert!(m.refuses(b"hot", T + 6 * MINUTE_MS));
        assert!(!m.refuses(b"hot", T + 5 * MINUTE_MS));
        assert!(!m.refuses(b"cold", T + 60 * MINUTE_MS));
        // Nothing counted yet: the minute asked.
        assert_eq!(MovedEntities::default().move_out(b"x", T), T);
    }

    #[test]
    fn a_split_range_is_refused_at_every_time_and_recorded_once() {
        let slots = 4;
        let last = tally_proto::routing::slot_last(slots);
        let (slot, position) = tally_proto::routing::range_key(b"video-7", slots);
        let range = MovedRange { slots, slot, lo: position, last, to: 9 };
        let mut m = MovedEntities::default();
        assert!(m.move_out(b"video-7", T) > 0);
        assert!(m.split_off(range));
        assert!(!m.split_off(range), "applied once");
        assert_eq!(m.split_to(b"video-7"), Some(9));
        assert!(m.refuses(b"video-7", 0), "every time, not only from a minute");
        let outside: Vec<&str> =
            ["a", "b", "c", "d", "e", "f", "g", "h"].into_iter().filter(|e| !range.contains(e.as_bytes())).collect();
        assert!(!outside.is_empty());
        for e in &outside {
            assert!(!m.refuses(e.as_bytes(), T));
        }
        let child = m.inherited_by(&range);
        assert_eq!(child.moved.len(), 1, "the spread of an entity in the range goes with it");
        assert!(child.ranges.is_empty());
    }
}
