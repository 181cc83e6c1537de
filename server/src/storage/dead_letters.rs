//! The dead-letter log of one partition: events rejected for their time
//! (by the leader, against the entry's stamp) or for their fields, kept
//! with the reason so an operator can see what was refused, fix it and
//! ingest it again.
//!
//! It is replicated state like the counts. The leader puts the rejected
//! events of an entry's requests into the entry (`IngestBatch::dead_letters`)
//! with the log's bounds in force; apply writes them as ONE state key per
//! entry — (tag, stamp, log index), like the dedup keys — and trims the log
//! from its oldest end: entries older than `keep_ms` on the log's clock
//! (expired, not counted), then whole entries while it holds more than
//! `max_events` (dropped, counted). Every replica applies the same entries
//! with the same bounds, so it keeps the same keys at every log position:
//! snapshots and digests carry the log with the rest of the state CF.
//!
//! Memory holds only a summary per entry (stamp, index, counts by reason),
//! rebuilt from the keys when the group opens or installs a snapshot.
//! Records stay on disk; a reader checkpoints the group first, then pages
//! through the keys.

use std::collections::VecDeque;

use rocksdb::{Direction, IteratorMode, ReadOptions};

use super::codec::{decode, encode};
use super::keys::{self, CF_STATE, STATE_DEAD_LETTERS, STATE_DEAD_LETTERS_DROPPED};
use super::write_back::StateWrite;
use super::{Engine, StorageError};
use crate::command::{DeadLetter, DeadLetterReason};
use crate::meta::DeadLetterBounds;

/// Records of the log, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReasonCounts {
    pub too_late: u64,
    pub in_future: u64,
    pub invalid: u64,
}

impl ReasonCounts {
    fn of(records: &[DeadLetter]) -> ReasonCounts {
        let mut counts = ReasonCounts::default();
        for r in records {
            match r.reason {
                DeadLetterReason::TooLate { .. } => counts.too_late += 1,
                DeadLetterReason::InFuture { .. } => counts.in_future += 1,
                DeadLetterReason::Invalid { .. } => counts.invalid += 1,
            }
        }
        counts
    }

    pub fn total(&self) -> u64 {
        self.too_late + self.in_future + self.invalid
    }

    fn add(&mut self, other: ReasonCounts) {
        self.too_late += other.too_late;
        self.in_future += other.in_future;
        self.invalid += other.invalid;
    }

    fn sub(&mut self, other: ReasonCounts) {
        self.too_late = self.too_late.saturating_sub(other.too_late);
        self.in_future = self.in_future.saturating_sub(other.in_future);
        self.invalid = self.invalid.saturating_sub(other.invalid);
    }
}

/// One entry's records, summarised.
#[derive(Debug, Clone, Copy)]
struct EntryRecords {
    stamp_ms: u64,
    log_index: u64,
    counts: ReasonCounts,
}

/// The in-memory summary of a partition's dead-letter log.
#[derive(Debug, Default)]
pub struct DeadLetterLog {
    entries: VecDeque<EntryRecords>,
    kept: ReasonCounts,
    dropped: u64,
}

impl DeadLetterLog {
    /// Records kept, by reason, and records dropped for space so far.
    pub fn counts(&self) -> (ReasonCounts, u64) {
        (self.kept, self.dropped)
    }

    /// Apply one ingest entry's share: keep its records (unless the log is
    /// off), then trim to `bounds` at the entry's stamp. The writes go to
    /// `state`, in apply order.
    pub fn apply(
        &mut self,
        group: u32,
        stamp_ms: u64,
        log_index: u64,
        records: &[DeadLetter],
        bounds: DeadLetterBounds,
        state: &mut Vec<StateWrite>,
    ) -> Result<(), StorageError> {
        if !records.is_empty() && bounds.max_events > 0 {
            state.push(StateWrite::Put(
                keys::stamped_key(group, STATE_DEAD_LETTERS, stamp_ms, log_index).to_vec(),
                encode(records)?,
            ));
            let counts = ReasonCounts::of(records);
            self.kept.add(counts);
            self.entries.push_back(EntryRecords { stamp_ms, log_index, counts });
        }
        let expired_before = if bounds.keep_ms == 0 { 0 } else { stamp_ms.saturating_sub(bounds.keep_ms) };
        let (mut trimmed, mut dropped) = (false, 0u64);
        while let Some(oldest) = self.entries.front().copied() {
            let expired = oldest.stamp_ms < expired_before;
            let over = self.kept.total() > bounds.max_events;
            if !expired && !over {
                break;
            }
            if !expired {
                dropped += oldest.counts.total();
            }
            self.kept.sub(oldest.counts);
            self.entries.pop_front();
            trimmed = true;
        }
        if trimmed {
            let end = match self.entries.front() {
                Some(e) => keys::stamped_key(group, STATE_DEAD_LETTERS, e.stamp_ms, e.log_index).to_vec(),
                None => keys::tagged(group, STATE_DEAD_LETTERS + 1).to_vec(),
            };
            state.push(StateWrite::DeleteRange(keys::tagged(group, STATE_DEAD_LETTERS).to_vec(), end));
        }
        if dropped > 0 {
            self.dropped += dropped;
            state.push(StateWrite::Put(
                keys::tagged(group, STATE_DEAD_LETTERS_DROPPED).to_vec(),
                encode(&self.dropped)?,
            ));
        }
        Ok(())
    }

    /// The summary of what `group` holds on disk. Blocking.
    pub fn load(engine: &Engine, group: u32) -> Result<DeadLetterLog, StorageError> {
        let mut log = DeadLetterLog::default();
        for item in scan(engine, group, &keys::tagged(group, STATE_DEAD_LETTERS))? {
            let (key, value) = item?;
            let (stamp_ms, log_index) =
                keys::dedup_stamp_of(&key).ok_or_else(|| StorageError::Corrupt("dead-letter key".into()))?;
            let records: Vec<DeadLetter> = decode(&value)?;
            let counts = ReasonCounts::of(&records);
            log.kept.add(counts);
            log.entries.push_back(EntryRecords { stamp_ms, log_index, counts });
        }
        let dropped =
            engine.db().get_pinned_cf(engine.cf(CF_STATE)?, keys::tagged(group, STATE_DEAD_LETTERS_DROPPED))?;
        log.dropped = dropped.map(|bytes| decode::<u64>(&bytes)).transpose()?.unwrap_or(0);
        Ok(log)
    }
}

fn scan<'a>(
    engine: &'a Engine,
    group: u32,
    from: &[u8],
) -> Result<impl Iterator<Item = Result<(Box<[u8]>, Box<[u8]>), rocksdb::Error>> + 'a, StorageError> {
    let mut opts = ReadOptions::default();
    opts.set_iterate_upper_bound(keys::tagged(group, STATE_DEAD_LETTERS + 1).to_vec());
    opts.fill_cache(false);
    Ok(engine.db().iterator_cf_opt(engine.cf(CF_STATE)?, opts, IteratorMode::From(from, Direction::Forward)))
}

/// Where a page of the log ends: the entry (stamp, index) and the position
/// of the last record returned in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub stamp_ms: u64,
    pub log_index: u64,
    pub position: u32,
}

impl Cursor {
    pub fn to_bytes(self) -> Vec<u8> {
        let mut b = Vec::with_capacity(20);
        b.extend_from_slice(&self.stamp_ms.to_be_bytes());
        b.extend_from_slice(&self.log_index.to_be_bytes());
        b.extend_from_slice(&self.position.to_be_bytes());
        b
    }

    pub fn from_bytes(b: &[u8]) -> Option<Cursor> {
        Some(Cursor {
            stamp_ms: u64::from_be_bytes(b.get(..8)?.try_into().ok()?),
            log_index: u64::from_be_bytes(b.get(8..16)?.try_into().ok()?),
            position: u32::from_be_bytes(b.get(16..20)?.try_into().ok()?),
        })
        .filter(|_| b.len() == 20)
    }
}

/// A page of records read from disk.
pub struct Page {
    /// Each record with its entry's stamp.
    pub records: Vec<(u64, DeadLetter)>,
    /// Where the next page starts, if there are more records.
    pub next: Option<Cursor>,
}

/// Up to `limit` records after `after`, oldest first, from what is on disk
/// (the caller checkpoints first for the newest). Blocking.
pub fn read_page(engine: &Engine, group: u32, after: Option<Cursor>, limit: usize) -> Result<Page, StorageError> {
    let from = match after {
        Some(c) => keys::stamped_key(group, STATE_DEAD_LETTERS, c.stamp_ms, c.log_index).to_vec(),
        None => keys::tagged(group, STATE_DEAD_LETTERS).to_vec(),
    };
    let mut page = Page { records: Vec::new(), next: None };
    if limit == 0 {
        return Ok(page);
    }
    let mut last = None;
    for item in scan(engine, group, &from)? {
        let (key, value) = item?;
        let (stamp_ms, log_index) =
            keys::dedup_stamp_of(&key).ok_or_else(|| StorageError::Corrupt("dead-letter key".into()))?;
        let records: Vec<DeadLetter> = decode(&value)?;
        let skip = match after {
            Some(c) if c.stamp_ms == stamp_ms && c.log_index == log_index => c.position as usize + 1,
            _ => 0,
        };
        for (position, record) in records.into_iter().enumerate().skip(skip) {
            if page.records.len() == limit {
                // One more exists: the next page starts after the last one.
                page.next = last;
                return Ok(page);
            }
            page.records.push((stamp_ms, record));
            last = Some(Cursor { stamp_ms, log_index, position: position as u32 });
        }
    }
    Ok(page)
}
