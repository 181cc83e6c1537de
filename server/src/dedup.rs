//! The dedup index of one partition: every event_id seen within the dedup
//! window, as a 128-bit hash of (entity, type, event_id).
//!
//! It is part of the replicated state: the state machine inserts the keys of
//! each applied batch and expires keys older than the window, both stamped
//! with the leader's `proposed_at` from the log entry, so every replica holds
//! the same index at the same log position. The leader's processor reads it
//! (plus its own in-flight keys) to decide what is a duplicate; see
//! ARCHITECTURE.md for why that decision is complete.

use std::collections::BTreeMap;

use foldhash::HashMap;
use std::sync::{Mutex, MutexGuard};

use xxhash_rust::xxh3::Xxh3;

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
    /// key → (proposed_at, log index) of the batch that inserted it.
    keys: HashMap<u128, (u64, u64)>,
    /// Batches by stamp, for expiry in time order.
    batches: BTreeMap<(u64, u64), Vec<u128>>,
}

impl DedupState {
    pub fn contains(&self, key: &u128) -> bool {
        self.keys.contains_key(key)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Drop batches stamped before `cutoff_ms`. Returns whether any were.
    pub fn expire_before(&mut self, cutoff_ms: u64) -> bool {
        let keep = self.batches.split_off(&(cutoff_ms, 0));
        let expired = std::mem::replace(&mut self.batches, keep);
        let any = !expired.is_empty();
        for (stamp, keys) in expired {
            for k in keys {
                if self.keys.get(&k) == Some(&stamp) {
                    self.keys.remove(&k);
                }
            }
        }
        any
    }

    /// Record a batch's keys; returns how many were already present.
    pub fn insert_batch(&mut self, stamp: (u64, u64), keys: Vec<u128>) -> u32 {
        let mut conflicts = 0;
        for &k in &keys {
            if self.keys.insert(k, stamp).is_some() {
                conflicts += 1;
            }
        }
        if !keys.is_empty() {
            self.batches.insert(stamp, keys);
        }
        conflicts
    }

    pub fn clear(&mut self) {
        self.keys.clear();
        self.batches.clear();
    }
}

#[derive(Default)]
pub struct DedupIndex {
    state: Mutex<DedupState>,
}

impl DedupIndex {
    pub fn lock(&self) -> MutexGuard<'_, DedupState> {
        // A panic while holding the lock leaves a consistent map (every
        // method finishes its own updates), so poisoning is safe to ignore.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
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
    fn expiry_removes_only_old_batches() {
        let mut s = DedupState::default();
        assert_eq!(s.insert_batch((1_000, 1), vec![1, 2]), 0);
        assert_eq!(s.insert_batch((5_000, 2), vec![3]), 0);
        assert_eq!(s.insert_batch((6_000, 3), vec![3]), 1);
        assert!(s.expire_before(2_000));
        assert!(!s.contains(&1) && !s.contains(&2));
        assert!(s.contains(&3));
        // Key 3 was re-stamped by batch 3, so expiring batch 2 keeps it.
        s.expire_before(5_500);
        assert!(s.contains(&3));
        s.expire_before(7_000);
        assert!(s.is_empty());
    }
}
