//! The dedup index of one partition: every event_id seen within the dedup
//! window, as a 128-bit hash of (entity, type, event_id).
//!
//! It is part of the replicated state: the state machine inserts the keys of
//! each applied batch and expires keys older than the window, both stamped
//! with the leader's `proposed_at` from the log entry, so every replica holds
//! the same index at the same log position. The leader's processor reads it
//! (plus its own in-flight keys) to decide what is a duplicate; see
//! ARCHITECTURE.md for why that decision is complete.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use xxhash_rust::xxh3::Xxh3;

use crate::dedup_table::{KeyTable, GENERATION_MS};
use crate::sync::MutexExt;

/// Dedup key of an event: a 128-bit hash, so the index costs the same for
/// every id length. Collisions are ~n²/2¹²⁹: negligible at any real volume.
pub fn dedup_key(entity_id: &[u8], event_type: &str, event_id: &[u8]) -> u128 {
    let mut h = Xxh3::new();
    // Length prefixes keep ("ab","c") and ("a","bc") apart.
    h.update(&(entity_id.len() as u32).to_le_bytes());
    h.update(entity_id);
    h.update(&(event_type.len() as u32).to_le_bytes());
    h.update(event_type.as_bytes());
    h.update(event_id);
    h.digest128()
}

#[derive(Default)]
pub struct DedupState {
    /// Live keys, each with the generation (log-clock second) of the entry
    /// that admitted it; ~19–23 bytes a key (`dedup_table.rs`).
    keys: KeyTable,
    /// The log's clock: the highest stamp applied. Stamps never go below it,
    /// so a leader with a slow clock cannot move expiry backwards.
    log_clock_ms: u64,
    /// Events the state machine refused to count because their key was
    /// already counted (see `admit`). Replicated state, so equal everywhere.
    conflicts: u64,
}

/// What [`DedupState::admit`] decided for an entry's keyed events.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Admitted {
    /// Keys counted now, in entry order.
    pub keys: Vec<u128>,
    /// Positions (in the entry's keyed events) of events already counted.
    pub skipped: Vec<u32>,
}

impl DedupState {
    pub fn contains(&self, key: &u128) -> bool {
        self.keys.contains(*key)
    }

    /// Live keys (counted as they come and expire: no scan).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Bytes the index holds, and per live key.
    pub fn memory(&self) -> (usize, f64) {
        (self.keys.bytes(), self.keys.bytes_per_key())
    }

    pub fn log_clock_ms(&self) -> u64 {
        self.log_clock_ms
    }

    pub fn conflicts(&self) -> u64 {
        self.conflicts
    }

    /// Restore the persisted clock and conflict counter (start-up, snapshot).
    pub fn restore_counters(&mut self, log_clock_ms: u64, conflicts: u64) {
        self.log_clock_ms = log_clock_ms;
        self.conflicts = conflicts;
    }

    /// The stamp an entry proposed at `proposed_at_ms` really gets: never
    /// below an earlier entry's, so expiry only moves forward along the log.
    /// Advances the log clock.
    pub fn stamp(&mut self, proposed_at_ms: u64) -> u64 {
        self.log_clock_ms = self.log_clock_ms.max(proposed_at_ms);
        self.log_clock_ms
    }

    /// Keys admitted before `cutoff_ms` (rounded down to a whole
    /// generation, so never early) expire. Returns whether the boundary
    /// moved into a new generation — when the state machine deletes the
    /// persisted batches before it.
    pub fn expire_before(&mut self, cutoff_ms: u64) -> bool {
        self.keys.expire_before(KeyTable::generation_of(cutoff_ms))
    }

    /// The first stamp still live: persisted batches before it may go.
    pub fn live_from_ms(&self, cutoff_ms: u64) -> u64 {
        KeyTable::generation_of(cutoff_ms) * GENERATION_MS
    }

    /// The state machine's dedup decision for one entry: each key not yet in
    /// the index (nor earlier in the entry) is recorded under `stamp`; the
    /// others are skipped, and counted as conflicts unless the entry was
    /// `provisional`. Deterministic, so every replica skips the same events.
    pub fn admit(&mut self, stamp: (u64, u64), keys: impl Iterator<Item = u128>, provisional: bool) -> Admitted {
        let generation = KeyTable::generation_of(stamp.0);
        let mut admitted = Admitted::default();
        for (position, k) in keys.enumerate() {
            if self.keys.insert(k, generation) {
                admitted.keys.push(k);
            } else {
                admitted.skipped.push(position as u32);
            }
        }
        if !provisional {
            self.conflicts += admitted.skipped.len() as u64;
        }
        admitted
    }

    /// Record a batch's keys as loaded from disk (already admitted once).
    pub fn insert_batch(&mut self, stamp: (u64, u64), keys: Vec<u128>) {
        let generation = KeyTable::generation_of(stamp.0);
        for k in keys {
            self.keys.insert(k, generation);
        }
    }

    pub fn clear(&mut self) {
        self.keys.clear();
        self.log_clock_ms = 0;
        self.conflicts = 0;
    }
}

/// Memory one key of a dedup index takes, as the budget counts it.
pub const BYTES_PER_KEY: usize = 23;

/// Live dedup keys of every replica of a node together, against which
/// leaders check the node's memory bound (`--dedup-memory-mib`). Tables
/// rebuild to 70% full, dropping expired keys, so memory follows the live
/// keys: ~23 bytes each at most.
#[derive(Debug, Default)]
pub struct DedupBudget {
    keys: AtomicUsize,
    /// Keys the node may hold; 0 = unbounded.
    max_keys: usize,
}

impl DedupBudget {
    pub fn with_memory_mib(mib: u64) -> Arc<DedupBudget> {
        let max_keys = (mib.saturating_mul(1 << 20) / BYTES_PER_KEY as u64) as usize;
        Arc::new(DedupBudget { keys: AtomicUsize::new(0), max_keys })
    }

    pub fn used(&self) -> usize {
        self.keys.load(Ordering::Relaxed)
    }

    pub fn max_keys(&self) -> usize {
        self.max_keys
    }

    /// Whether `more` keys would take the node past its bound.
    pub fn would_exceed(&self, more: usize) -> bool {
        self.max_keys > 0 && self.used().saturating_add(more) > self.max_keys
    }

    fn adjust(&self, before: usize, after: usize) {
        if after >= before {
            self.keys.fetch_add(after - before, Ordering::Relaxed);
        } else {
            self.keys.fetch_sub(before - after, Ordering::Relaxed);
        }
    }
}

#[derive(Default)]
pub struct DedupIndex {
    state: Mutex<DedupState>,
    budget: Arc<DedupBudget>,
}

/// The index locked; on release, the node's budget learns how many live
/// keys it now holds.
pub struct DedupGuard<'a> {
    state: MutexGuard<'a, DedupState>,
    budget: &'a DedupBudget,
    live_before: usize,
}

impl std::ops::Deref for DedupGuard<'_> {
    type Target = DedupState;
    fn deref(&self) -> &DedupState {
        &self.state
    }
}

impl std::ops::DerefMut for DedupGuard<'_> {
    fn deref_mut(&mut self) -> &mut DedupState {
        &mut self.state
    }
}

impl Drop for DedupGuard<'_> {
    fn drop(&mut self) {
        self.budget.adjust(self.live_before, self.state.keys.len());
    }
}

impl DedupIndex {
    /// An index whose live keys count against the node's `budget`.
    pub fn new(budget: Arc<DedupBudget>) -> DedupIndex {
        DedupIndex { state: Mutex::default(), budget }
    }

    pub fn budget(&self) -> &DedupBudget {
        &self.budget
    }

    /// Events skipped at apply because their key was already counted.
    pub fn conflicts(&self) -> u64 {
        self.lock().conflicts()
    }

    pub fn lock(&self) -> DedupGuard<'_> {
        let state = self.state.lock_unpoisoned();
        let live_before = state.keys.len();
        DedupGuard { state, budget: &self.budget, live_before }
    }
}

impl Drop for DedupIndex {
    fn drop(&mut self) {
        // A dropped replica gives its keys back.
        // The poisoned-lock policy of `sync.rs`: the value is still whole.
        let live = self.state.get_mut().unwrap_or_else(PoisonError::into_inner).keys.len();
        self.budget.adjust(live, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_distinguish_fields() {
        assert_ne!(dedup_key(b"ab", "c", b"1"), dedup_key(b"a", "bc", b"1"));
        assert_ne!(dedup_key(b"v", "view", b"1"), dedup_key(b"v", "like", b"1"));
        assert_eq!(dedup_key(b"v", "view", b"1"), dedup_key(b"v", "view", b"1"));
    }

    #[test]
    fn expiry_removes_only_old_batches_never_early() {
        let mut s = DedupState::default();
        s.insert_batch((1_000, 1), vec![1, 2]);
        s.insert_batch((5_000, 2), vec![3]);
        // A cutoff inside the first batch's second keeps it (never early).
        s.expire_before(1_500);
        assert!(s.contains(&1));
        assert!(s.expire_before(2_000));
        assert!(!s.contains(&1) && !s.contains(&2));
        assert!(s.contains(&3));
        s.expire_before(7_000);
        assert!(s.is_empty());
    }

    #[test]
    fn admit_skips_keys_already_counted_and_repeats_within_an_entry() {
        let mut s = DedupState::default();
        s.insert_batch((1_000, 1), vec![7]);
        let a = s.admit((2_000, 2), [5, 7, 6, 5].into_iter(), false);
        assert_eq!(a, Admitted { keys: vec![5, 6], skipped: vec![1, 3] });
        assert_eq!(s.conflicts(), 2);
        // Key 7 keeps its first stamp: expiring batch 1 removes it.
        s.expire_before(2_000);
        assert!(!s.contains(&7) && s.contains(&5) && s.contains(&6));
    }

    #[test]
    fn a_provisional_entry_skips_counted_keys_without_calling_them_conflicts() {
        let mut s = DedupState::default();
        s.insert_batch((1_000, 1), vec![7]);
        let a = s.admit((2_000, 2), [7, 8, 8].into_iter(), true);
        assert_eq!(a, Admitted { keys: vec![8], skipped: vec![0, 2] });
        assert_eq!(s.conflicts(), 0);
        let a = s.admit((3_000, 3), [8].into_iter(), false);
        assert_eq!(a.skipped, vec![0]);
        assert_eq!(s.conflicts(), 1);
    }

    #[test]
    fn the_log_clock_never_goes_back() {
        let mut s = DedupState::default();
        assert_eq!(s.stamp(10_000), 10_000);
        // A leader whose clock is behind cannot move expiry backwards.
        assert_eq!(s.stamp(4_000), 10_000);
        assert_eq!(s.stamp(12_000), 12_000);
    }
}

#[cfg(test)]
mod budget_tests {
    use super::*;

    #[test]
    fn replicas_count_against_one_node_budget_and_give_it_back() {
        let budget = DedupBudget::with_memory_mib(1);
        assert_eq!(budget.max_keys(), (1 << 20) / 23);
        let a = DedupIndex::new(budget.clone());
        let b = DedupIndex::new(budget.clone());
        a.lock().admit((1_000, 1), 0..1_000u128, false);
        b.lock().admit((1_000, 1), 0..500u128, false);
        assert_eq!(budget.used(), 1_500);
        assert!(!budget.would_exceed(1_000));
        assert!(budget.would_exceed(budget.max_keys()));
        // Expiry gives keys back as generations pass.
        b.lock().expire_before(2_000);
        assert_eq!(budget.used(), 1_000);
        drop(a);
        assert_eq!(budget.used(), 0);
        b.lock().admit((3_000, 2), 0..10u128, false);
        assert_eq!(budget.used(), 10);
        b.lock().clear();
        assert_eq!(budget.used(), 0);
    }
}
