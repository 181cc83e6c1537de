//! The dedup index's storage: an open-addressing set of 16-byte slots, each
//! a key's 112-bit fingerprint and a 16-bit generation (the second of the
//! log's clock it was admitted at, relative to a base).
//!
//! A std `HashMap<u128, stamp>` plus per-batch key lists for expiry cost
//! ~60–70 bytes a key on every replica, and a 10-minute window at tens of
//! thousands of events per second holds tens of millions of keys. Here a
//! key costs its slot divided by the load factor: the table grows to 70%
//! load and rebuilds at 85%, so 16 / 0.70 ≈ 22.9 bytes a key at most after
//! a rebuild and ~18.8 just before the next (`bytes_per_key`, tested ≤ 24).
//!
//! **Expiry is lazy.** A key is live while its generation is at or after
//! `live_from` (the log clock's cutoff, in seconds, rounded down — so a key
//! outlives the window by under a second, never expires early). Expired
//! slots are reused by inserts that probe past them and dropped at the
//! next rebuild; there are no per-batch key lists and no work per expiry.
//!
//! Generations are stored relative to `base` so they fit 16 bits: every
//! rebuild re-bases to `live_from`, and the window is at most
//! [`MAX_WINDOW_MS`], so every live key's generation stays within range.
//!
//! Fingerprints: the key (already a 128-bit hash, but tests and future
//! callers may pass anything) is multiplied by an odd constant — a
//! bijection of u128 — and its top 112 bits kept. Two keys collide only
//! with probability ~n²/2¹¹³: none at any real volume.

use std::collections::BTreeMap;

/// Milliseconds of log clock per generation.
pub const GENERATION_MS: u64 = 1_000;
/// Longest dedup window the table can hold (generations must fit 16 bits).
pub const MAX_WINDOW_MS: u64 = 60_000 * GENERATION_MS;

const GENERATION_BITS: u32 = 16;
const GENERATION_MASK: u128 = (1 << GENERATION_BITS) - 1;
/// Set in every fingerprint, so an occupied slot is never 0 (empty).
const OCCUPIED_BIT: u128 = 1 << GENERATION_BITS;
const MIN_CAPACITY: usize = 64;
/// Occupied slots (live or expired) beyond which the table is rebuilt.
const MAX_LOAD: f64 = 0.85;
/// Load right after a rebuild.
const TARGET_LOAD: f64 = 0.70;

fn fingerprint(key: u128) -> u128 {
    // An odd multiplier makes this a bijection: distinct keys stay distinct
    // in the bits that are mixed from all of the input (the top ones).
    let mixed = key.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835);
    (mixed & !GENERATION_MASK) | OCCUPIED_BIT
}

#[derive(Debug)]
pub struct KeyTable {
    slots: Vec<u128>,
    /// Non-empty slots, live or expired.
    occupied: usize,
    /// Generation that a stored offset of 0 stands for.
    base: u64,
    /// Keys of earlier generations are expired.
    live_from: u64,
    /// Live keys per generation (one entry per second of the window), so
    /// the live count is known without a scan as generations expire.
    per_generation: BTreeMap<u64, usize>,
    live: usize,
}

impl Default for KeyTable {
    fn default() -> Self {
        KeyTable {
            slots: vec![0; MIN_CAPACITY],
            occupied: 0,
            base: 0,
            live_from: 0,
            per_generation: BTreeMap::new(),
            live: 0,
        }
    }
}

enum Probe {
    /// The key's slot, and whether it is live.
    Found(usize, bool),
    /// Not present: where to put it (the first expired slot on the way,
    /// else the empty slot that ended the probe).
    Absent(usize),
}

impl KeyTable {
    pub fn generation_of(stamp_ms: u64) -> u64 {
        stamp_ms / GENERATION_MS
    }

    fn home(&self, fp: u128) -> usize {
        // Fast range: the fingerprint's top 64 bits scaled to the capacity.
        (((fp >> 64) as u64 as u128 * self.slots.len() as u128) >> 64) as usize
    }

    fn generation(&self, slot: u128) -> u64 {
        self.base + (slot & GENERATION_MASK) as u64
    }

    fn probe(&self, fp: u128) -> Probe {
        let mut i = self.home(fp);
        let mut reusable = None;
        loop {
            let slot = self.slots[i];
            if slot == 0 {
                return Probe::Absent(reusable.unwrap_or(i));
            }
            let live = self.generation(slot) >= self.live_from;
            if slot & !GENERATION_MASK == fp {
                return Probe::Found(i, live);
            }
            if !live && reusable.is_none() {
                reusable = Some(i);
            }
            i += 1;
            if i == self.slots.len() {
                i = 0;
            }
        }
    }

    /// Whether `key` is live.
    pub fn contains(&self, key: u128) -> bool {
        matches!(self.probe(fingerprint(key)), Probe::Found(_, true))
    }

    /// Keys before `generation` expire. Returns whether the boundary moved.
    pub fn expire_before(&mut self, generation: u64) -> bool {
        if generation <= self.live_from {
            return false;
        }
        self.live_from = generation;
        let still_live = self.per_generation.split_off(&generation);
        let expired: usize = std::mem::replace(&mut self.per_generation, still_live).values().sum();
        self.live -= expired.min(self.live);
        true
    }

    fn count_new_key(&mut self, generation: u64) {
        *self.per_generation.entry(generation).or_default() += 1;
        self.live += 1;
    }

    /// Insert `key` admitted at `generation` unless it is live already.
    /// Returns whether it was inserted (a key expired on arrival is not).
    pub fn insert(&mut self, key: u128, generation: u64) -> bool {
        if generation < self.live_from {
            return false;
        }
        if self.occupied == 0 {
            self.base = generation;
        } else if generation < self.base || generation - self.base > GENERATION_MASK as u64 {
            // The log clock moved past the 16-bit range since the last
            // rebuild (or a key older than every other arrives while
            // loading): re-base.
            self.rebuild(self.slots.len(), generation);
        }
        let fp = fingerprint(key);
        match self.probe(fp) {
            Probe::Found(_, true) => false,
            Probe::Found(i, false) => {
                // Its old generation's count went when it expired.
                self.slots[i] = fp | (generation - self.base) as u128;
                self.count_new_key(generation);
                true
            }
            Probe::Absent(i) => {
                if self.slots[i] == 0 {
                    self.occupied += 1;
                }
                self.slots[i] = fp | (generation - self.base) as u128;
                self.count_new_key(generation);
                if self.occupied as f64 > self.slots.len() as f64 * MAX_LOAD {
                    self.rebuild(0, generation);
                }
                true
            }
        }
    }

    /// Re-insert the live keys into at least `capacity` slots (at most 70%
    /// full), re-based to the oldest of them and `also`. Expired keys go.
    fn rebuild(&mut self, capacity: usize, also: u64) {
        let old = std::mem::take(&mut self.slots);
        let old_base = self.base;
        let live: Vec<(u128, u64)> = old
            .iter()
            .filter(|s| **s != 0)
            .map(|s| (*s & !GENERATION_MASK, old_base + (*s & GENERATION_MASK) as u64))
            .filter(|(_, g)| *g >= self.live_from)
            .collect();
        drop(old);
        self.base = live.iter().map(|(_, g)| *g).min().map_or(also, |oldest| oldest.min(also));
        let capacity = capacity.max((live.len() as f64 / TARGET_LOAD) as usize).max(MIN_CAPACITY);
        self.slots = vec![0; capacity];
        self.occupied = live.len();
        for (fp, generation) in live {
            // Live generations lie within one window of the log clock, and
            // the window is at most MAX_WINDOW_MS: the offset fits.
            debug_assert!(generation - self.base <= GENERATION_MASK as u64);
            let offset = (generation - self.base).min(GENERATION_MASK as u64);
            let mut i = self.home(fp);
            while self.slots[i] != 0 {
                i = if i + 1 == self.slots.len() { 0 } else { i + 1 };
            }
            self.slots[i] = fp | offset as u128;
        }
    }

    /// Live keys.
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the table holds.
    pub fn bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<u128>()
    }

    /// Bytes per live key (0 when empty).
    pub fn bytes_per_key(&self) -> f64 {
        if self.live == 0 {
            0.0
        } else {
            self.bytes() as f64 / self.live as f64
        }
    }

    pub fn clear(&mut self) {
        *self = KeyTable::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_and_adjacent_keys_stay_distinct() {
        let mut t = KeyTable::default();
        for k in 0..10_000u128 {
            assert!(t.insert(k, 5));
        }
        for k in 0..10_000u128 {
            assert!(t.contains(k));
            assert!(!t.insert(k, 6), "a live key is not inserted twice");
        }
        assert!(!t.contains(10_000));
        assert_eq!(t.len(), 10_000);
    }

    #[test]
    fn a_million_keys_cost_at_most_24_bytes_each_at_every_size() {
        let mut t = KeyTable::default();
        let mut worst: f64 = 0.0;
        for k in 0..1_000_000u128 {
            t.insert(k.wrapping_mul(0x1234_5678_9abc_def1), 100 + (k / 50_000) as u64);
            if k % 9_973 == 0 && k > 10_000 {
                worst = worst.max(t.bytes_per_key());
            }
        }
        assert!(worst <= 24.0, "worst {worst:.1} bytes per key");
        assert!(t.bytes_per_key() <= 24.0, "{:.1}", t.bytes_per_key());
    }

    #[test]
    fn expiry_is_by_generation_never_early_and_frees_slots() {
        let mut t = KeyTable::default();
        for k in 0..1_000u128 {
            t.insert(k, 10);
        }
        for k in 1_000..2_000u128 {
            t.insert(k, 20);
        }
        assert!(t.expire_before(10), "keys of generation 10 stay");
        assert!(t.contains(0) && t.contains(1_500));
        assert!(t.expire_before(11));
        assert!(!t.contains(0) && t.contains(1_500));
        assert_eq!(t.len(), 1_000);
        // An expired key can be admitted again, under its new generation.
        assert!(t.insert(0, 21));
        assert!(t.contains(0));
        // Churn through many generations: memory follows the live keys.
        for g in 21..2_000u64 {
            t.expire_before(g);
            for k in 0..500u128 {
                t.insert(g as u128 * 1_000_000 + k, g);
            }
        }
        assert_eq!(t.len(), 500, "only the newest generation is live");
        assert!(t.bytes() <= 16 * 4 * 1_000, "{} bytes for 500 live keys", t.bytes());
    }

    #[test]
    fn the_live_count_matches_a_scan_through_expiry_and_rebuilds() {
        let mut t = KeyTable::default();
        for g in 0..300u64 {
            t.expire_before(g.saturating_sub(60));
            for k in 0..(g % 7 + 1) * 40 {
                t.insert((g as u128) << 40 | k as u128, g);
                // Re-sends of recent keys are not new.
                t.insert(((g.saturating_sub(3)) as u128) << 40 | k as u128, g);
            }
            let scanned = t.slots.iter().filter(|s| **s != 0 && t.generation(**s) >= t.live_from).count();
            assert_eq!(t.len(), scanned, "generation {g}");
        }
    }

    #[test]
    fn generations_far_apart_are_rebased_not_wrapped() {
        let mut t = KeyTable::default();
        t.insert(1, 1_000);
        t.expire_before(1_000);
        // 100,000 generations later (more than 16 bits): key 1 is expired
        // when the cutoff passes it, and a new key is live.
        t.expire_before(100_000);
        t.insert(2, 100_500);
        assert!(!t.contains(1));
        assert!(t.contains(2));
        t.insert(3, 100_500 + 60_000);
        assert!(t.contains(2) && t.contains(3));
    }
}
