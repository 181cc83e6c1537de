//! Which entity is hottest in a partition, and what share of the
//! partition's events it takes — what automatic spreading
//! (`--auto-spread-share`, `api/spread.rs`) decides by.
//!
//! A Space-Saving summary (Metwally et al.) of [`SLOTS`] counters over
//! fixed windows of [`WINDOW`]: any entity above 1/SLOTS of a window's
//! events is in it, with its count over-estimated by at most the smallest
//! counter, which is why the share reported is the guaranteed one (count −
//! error). Fed once per proposal with its deltas (one per entity, type and
//! minute), never per event; the last complete window is what is reported.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sync::MutexExt;

/// Counters kept: entities above 1/16 of a window's events are found.
const SLOTS: usize = 16;
/// Length of a window.
const WINDOW: Duration = Duration::from_secs(10);

/// The hottest entity of the last complete window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HotEntity {
    pub entity_id: Vec<u8>,
    /// Its guaranteed share of the window's events, 0 to 1.
    pub share: f64,
}

#[derive(Debug)]
pub struct HotEntities {
    state: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    total: u64,
    /// Entity → (count, over-estimation error).
    counters: HashMap<Vec<u8>, (u64, u64)>,
    last: Option<HotEntity>,
}

impl Default for HotEntities {
    fn default() -> Self {
        HotEntities {
            state: Mutex::new(Window { started: Instant::now(), total: 0, counters: HashMap::new(), last: None }),
        }
    }
}

impl HotEntities {
    /// Events of one proposal, as (entity, events) per delta.
    pub fn saw<'a>(&self, deltas: impl Iterator<Item = (&'a [u8], u64)>) {
        let mut w = self.state.lock_unpoisoned();
        w.roll(Instant::now());
        for (entity, events) in deltas {
            w.total += events;
            if let Some((count, _)) = w.counters.get_mut(entity) {
                *count += events;
                continue;
            }
            if w.counters.len() < SLOTS {
                w.counters.insert(entity.to_vec(), (events, 0));
                continue;
            }
            // Replace the smallest counter; the newcomer inherits its count
            // as its possible error.
            let Some((smallest, min)) =
                w.counters.iter().min_by_key(|(_, (c, _))| *c).map(|(e, (c, _))| (e.clone(), *c))
            else {
                continue;
            };
            w.counters.remove(&smallest);
            w.counters.insert(entity.to_vec(), (min + events, min));
        }
    }

    /// The hottest entity of the last complete window (`None` when that
    /// window saw nothing, or the last was long ago).
    pub fn hottest(&self) -> Option<HotEntity> {
        let mut w = self.state.lock_unpoisoned();
        w.roll(Instant::now());
        w.last.clone()
    }
}

impl Window {
    fn roll(&mut self, now: Instant) {
        let elapsed = now.duration_since(self.started);
        if elapsed < WINDOW {
            return;
        }
        self.last = if elapsed >= 2 * WINDOW || self.total == 0 {
            // Idle for a window or more: nothing is hot now.
            None
        } else {
            self.counters.iter().max_by_key(|(_, (c, e))| c - e).map(|(entity, (c, e))| HotEntity {
                entity_id: entity.clone(),
                share: (c - e) as f64 / self.total as f64,
            })
        };
        self.started = now;
        self.total = 0;
        self.counters.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dominant_entity_is_found_among_many() {
        let hot = HotEntities::default();
        let cold: Vec<Vec<u8>> = (0..1_000).map(|i| format!("cold-{i}").into_bytes()).collect();
        for round in 0..100 {
            let mut deltas: Vec<(&[u8], u64)> = vec![(b"hot".as_slice(), 30)];
            deltas.extend(cold.iter().skip(round * 10).take(10).map(|c| (c.as_slice(), 7)));
            hot.saw(deltas.into_iter());
        }
        // Move the window on by hand.
        hot.state.lock_unpoisoned().started -= WINDOW;
        let found = hot.hottest().expect("a window completed");
        assert_eq!(found.entity_id, b"hot");
        // 3,000 of 10,000 events; the guaranteed share never overstates it.
        assert!(found.share > 0.25 && found.share <= 0.3 + 1e-9, "{found:?}");
        // Idle since: nothing is hot.
        hot.state.lock_unpoisoned().started -= 2 * WINDOW;
        assert_eq!(hot.hottest(), None);
    }
}
