//! A partition's archive manifest: which of its buckets are sealed, and
//! which are in the cold archive's Parquet files (`storage/archive.rs`).
//!
//! The manifest is replicated state, changed only by the partition's log:
//!
//! 1. `Command::Seal { below_ms }` — the leader's archiver (`archiver.rs`)
//!    commits a horizon, a whole hour at least `archive_after` old. From
//!    that entry on, apply refuses every delta of a minute before it, on
//!    every replica alike (the proposer answers those events `TOO_LATE`):
//!    a bucket that ends at or before the horizon can never change again.
//! 2. The archiver reads those buckets — any applied index after the seal
//!    gives the same ones — writes them to ONE file whose name is a
//!    function of the partition and the range, then commits
//!    `Command::Archived(segment)`. Apply appends the segment only if it
//!    continues the last one, so a segment committed twice (a leader that
//!    crashed after committing, whose successor exported again) is
//!    appended once; a crash before the commit leaves a file the manifest
//!    does not name, which the next export overwrites with the same rows.
//! 3. Segment k holds every kept bucket of every granularity whose end is
//!    in (segment k−1's end, segment k's end]; the first one every bucket
//!    ending by its end and kept when the first seal was applied
//!    (`from_floors`).
//!
//! Retention never drops a bucket that is not archived yet once a
//! partition archives: apply caps the floors an `Expire` raises at the
//! archived horizon (`cap_floors`), so the hot store and the archive
//! together always cover every bucket from `from_floors` on, and a read can
//! take each bucket from whichever holds it.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tally_proto::time::{bucket_start, next_bucket_start, Floors, Granularity, KEEP_ALL};

use crate::sync::MutexExt;

/// One archived file of a partition.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ArchiveSegment {
    /// The previous segment's `upto_ms`; `None` for the first.
    pub after_ms: Option<i64>,
    /// Buckets ending at or before this time (and after `after_ms`).
    pub upto_ms: i64,
    /// The file, relative to the archive's root; empty when the partition
    /// had no bucket to archive in the range.
    pub path: String,
    pub rows: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ArchiveManifest {
    /// Minutes before this are refused at apply; `None` until the first seal.
    pub sealed_below_ms: Option<i64>,
    /// The floors when the first seal was applied: the archive holds the
    /// buckets kept then, and every one after.
    pub from_floors: Floors,
    pub segments: Vec<ArchiveSegment>,
}

impl Default for ArchiveManifest {
    fn default() -> Self {
        ArchiveManifest { sealed_below_ms: None, from_floors: KEEP_ALL, segments: Vec::new() }
    }
}

impl ArchiveManifest {
    /// The end of the newest segment: every bucket ending by then is archived.
    pub fn archived_upto(&self) -> Option<i64> {
        self.segments.last().map(|s| s.upto_ms)
    }

    /// Raise the seal (never lowered). Returns whether it changed.
    pub fn seal(&mut self, below_ms: i64, floors: &Floors) -> bool {
        if self.sealed_below_ms.is_some_and(|s| s >= below_ms) {
            return false;
        }
        if self.sealed_below_ms.is_none() {
            self.from_floors = *floors;
        }
        self.sealed_below_ms = Some(below_ms);
        true
    }

    /// Append `segment` if it continues the newest one within the seal.
    /// Returns whether it was appended (false for a repeat).
    pub fn add(&mut self, segment: ArchiveSegment) -> bool {
        let continues = segment.after_ms == self.archived_upto();
        let within = self.sealed_below_ms.is_some_and(|s| segment.upto_ms <= s);
        let forward = segment.after_ms.is_none_or(|a| segment.upto_ms > a);
        if !(continues && within && forward) {
            return false;
        }
        self.segments.push(segment);
        true
    }

    /// Whether apply refuses a delta of the minute starting at `minute_ms`.
    pub fn is_sealed(&self, minute_ms: i64) -> bool {
        self.sealed_below_ms.is_some_and(|s| minute_ms < s)
    }

    /// The range sealed but not archived yet: (after, upto).
    pub fn unarchived(&self) -> Option<(Option<i64>, i64)> {
        let sealed = self.sealed_below_ms?;
        let after = self.archived_upto();
        (after.is_none_or(|a| a < sealed)).then_some((after, sealed))
    }

    /// `proposed` floors lowered so that no bucket leaves the hot store
    /// before it is archived, once the partition archives.
    pub fn cap_floors(&self, proposed: &Floors) -> Floors {
        if self.sealed_below_ms.is_none() {
            return *proposed;
        }
        let mut capped = *proposed;
        for g in Granularity::ALL {
            let i = usize::from(g.as_u8());
            // The first bucket not archived yet starts here.
            let first_unarchived = match self.archived_upto() {
                Some(upto) => bucket_start(g, upto).max(self.from_floors[i]),
                None => self.from_floors[i],
            };
            capped[i] = capped[i].min(first_unarchived);
        }
        capped
    }

    /// The oldest bucket of each granularity a read can answer from, with
    /// `hot` the partition's floors: the archive's start where it has any.
    pub fn readable_floors(&self, hot: &Floors) -> Floors {
        if self.segments.is_empty() {
            return *hot;
        }
        let mut floors = *hot;
        for (f, from) in floors.iter_mut().zip(self.from_floors) {
            *f = (*f).min(from);
        }
        floors
    }

    /// The segment holding bucket (`granularity`, `start_ms`), if archived.
    pub fn segment_of(&self, granularity: Granularity, start_ms: i64) -> Option<&ArchiveSegment> {
        if start_ms < self.from_floors[usize::from(granularity.as_u8())] {
            return None;
        }
        let end = next_bucket_start(granularity, start_ms);
        let i = self.segments.partition_point(|s| s.upto_ms < end);
        self.segments.get(i).filter(|s| s.after_ms.is_none_or(|a| a < end))
    }
}

/// The manifest as applied, shared with the partition's readers, archiver
/// and processor. Apply publishes a new one before the floors it allows
/// (`state_machine.rs`), and readers read the floors first, so a reader
/// never sees floors above what the manifest it then reads covers.
#[derive(Debug)]
pub struct SharedManifest {
    current: Mutex<Arc<ArchiveManifest>>,
    /// `sealed_below_ms`, or `i64::MIN`: the processor's check per event.
    sealed_below: AtomicI64,
}

impl Default for SharedManifest {
    fn default() -> Self {
        SharedManifest { current: Mutex::new(Arc::default()), sealed_below: AtomicI64::new(i64::MIN) }
    }
}

impl SharedManifest {
    pub fn get(&self) -> Arc<ArchiveManifest> {
        self.current.lock_unpoisoned().clone()
    }

    pub fn set(&self, manifest: ArchiveManifest) {
        self.sealed_below.store(manifest.sealed_below_ms.unwrap_or(i64::MIN), Ordering::Release);
        *self.current.lock_unpoisoned() = Arc::new(manifest);
    }

    /// Events before this are refused (`i64::MIN` when nothing is sealed).
    pub fn sealed_below_ms(&self) -> i64 {
        self.sealed_below.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_proto::time::{DAY_MS, HOUR_MS, MINUTE_MS};

    fn segment(after: Option<i64>, upto: i64) -> ArchiveSegment {
        ArchiveSegment { after_ms: after, upto_ms: upto, path: format!("p/{upto}"), rows: 1, bytes: 1 }
    }

    const T: i64 = 1_780_000_000_000 / DAY_MS * DAY_MS;

    #[test]
    fn segments_continue_the_last_one_within_the_seal() {
        let mut m = ArchiveManifest::default();
        assert!(!m.add(segment(None, T)), "nothing sealed yet");
        assert!(m.seal(T + HOUR_MS, &KEEP_ALL));
        assert!(!m.seal(T, &KEEP_ALL), "the seal never goes back");
        assert!(!m.add(segment(None, T + 2 * HOUR_MS)), "beyond the seal");
        assert!(m.add(segment(None, T)));
        assert!(!m.add(segment(None, T)), "a repeat is appended once");
        assert!(m.add(segment(Some(T), T + HOUR_MS)));
        assert_eq!(m.unarchived(), None);
        assert!(m.is_sealed(T + HOUR_MS - MINUTE_MS) && !m.is_sealed(T + HOUR_MS));
    }

    #[test]
    fn every_bucket_has_one_segment_and_floors_wait_for_the_archive() {
        let floors_at_seal = [T - DAY_MS, i64::MIN, i64::MIN, i64::MIN, i64::MIN];
        let mut m = ArchiveManifest::default();
        m.seal(T + 2 * HOUR_MS, &floors_at_seal);
        // Before the first segment, nothing may expire.
        assert_eq!(m.cap_floors(&[T + DAY_MS; 5]), floors_at_seal);
        m.add(segment(None, T + HOUR_MS));
        m.add(segment(Some(T + HOUR_MS), T + 2 * HOUR_MS));
        let minute = |t| m.segment_of(Granularity::Minute, t).map(|s| s.upto_ms);
        assert_eq!(minute(T - DAY_MS - MINUTE_MS), None, "expired before the archive began");
        assert_eq!(minute(T - DAY_MS), Some(T + HOUR_MS));
        assert_eq!(minute(T + HOUR_MS - MINUTE_MS), Some(T + HOUR_MS));
        assert_eq!(minute(T + HOUR_MS), Some(T + 2 * HOUR_MS));
        assert_eq!(minute(T + 2 * HOUR_MS), None, "not archived yet");
        // The day of T ends after the newest segment.
        assert_eq!(m.segment_of(Granularity::Day, T), None);
        assert_eq!(m.segment_of(Granularity::Day, T - DAY_MS).map(|s| s.upto_ms), Some(T + HOUR_MS));
        let capped = m.cap_floors(&[T + DAY_MS; 5]);
        assert_eq!(capped[0], T + 2 * HOUR_MS);
        assert_eq!(capped[1], T + 2 * HOUR_MS);
        assert_eq!(capped[2], T, "the day of the horizon is not archived yet");
        let readable = m.readable_floors(&capped);
        assert_eq!(readable[0], T - DAY_MS);
        assert_eq!(readable[1], i64::MIN);
    }
}
