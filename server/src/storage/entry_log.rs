//! Per-entry record logs of a partition, kept in its `state` column family:
//! the **dead-letter log** (events refused for their time or fields, with
//! why, so an operator can fix and ingest them again) and the optional
//! **raw-event log** (every event counted, as it arrived, for `tally audit`
//! to recount).
//!
//! Both are replicated state like the counts. The leader puts an entry's
//! records into the entry (`IngestBatch::dead_letters`, `raw_events`) with
//! the log's bounds in force; apply writes them as ONE state key per entry —
//! (tag, stamp, log index), like the dedup keys — and trims the log from its
//! oldest end: entries older than `keep_ms` on the log's clock (expired,
//! not counted), then whole entries while it holds more than `max_events`
//! (dropped, counted in a state key). Every replica applies the same entries
//! with the same bounds, so it keeps the same keys at every log position:
//! snapshots and digests carry the logs with the rest of the state CF.
//!
//! Memory holds only a summary per entry (stamp, index, records by class),
//! rebuilt from the keys when the group opens or installs a snapshot.
//! Records stay on disk; a reader checkpoints the group first, then reads
//! the keys.

use std::collections::VecDeque;

use rocksdb::{Direction, IteratorMode, ReadOptions};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::codec::{decode, encode};
use super::keys::{self, CF_STATE};
use super::write_back::StateWrite;
use super::{Engine, StorageError};
use crate::command::{DeadLetter, DeadLetterReason, RawRecord};
use crate::meta::LogBounds;

/// Records by class (a dead letter's reason; raw events have one class).
pub type Classes = [u64; 3];

/// What a kind of record log is: where its keys live and how its records
/// are classified.
pub trait LogKind {
    type Record: Serialize + DeserializeOwned;
    /// State tag of its entry keys.
    const TAG: u8;
    /// State tag of its dropped-records counter.
    const DROPPED_TAG: u8;
    fn class(record: &Self::Record) -> usize;

    /// The classes of one stored entry's records (for the summary rebuilt
    /// on open): decodes them unless a kind knows better.
    fn classes_of(value: &[u8]) -> Result<Classes, StorageError> {
        let records: Vec<Self::Record> = decode(value)?;
        Ok(classes::<Self>(&records))
    }
}

/// The dead-letter log: classes TOO_LATE, IN_FUTURE, INVALID.
pub struct DeadLetters;

impl LogKind for DeadLetters {
    type Record = DeadLetter;
    const TAG: u8 = keys::STATE_DEAD_LETTERS;
    const DROPPED_TAG: u8 = keys::STATE_DEAD_LETTERS_DROPPED;
    fn class(record: &DeadLetter) -> usize {
        match record.reason {
            DeadLetterReason::TooLate { .. } => 0,
            DeadLetterReason::InFuture { .. } => 1,
            DeadLetterReason::Invalid { .. } => 2,
        }
    }
}

/// The raw-event log: one class.
pub struct RawEvents;

impl LogKind for RawEvents {
    type Record = RawRecord;
    const TAG: u8 = keys::STATE_RAW_EVENTS;
    const DROPPED_TAG: u8 = keys::STATE_RAW_EVENTS_DROPPED;
    fn class(_: &RawRecord) -> usize {
        0
    }

    /// One class: the count is the encoded vector's length prefix (a
    /// varint), so opening a group does not decode millions of records.
    fn classes_of(value: &[u8]) -> Result<Classes, StorageError> {
        let mut count = 0u64;
        for (i, byte) in value.iter().take(10).enumerate() {
            count |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok([count, 0, 0]);
            }
        }
        Err(StorageError::Corrupt("raw-event log entry without a length".into()))
    }
}

fn classes<K: LogKind + ?Sized>(records: &[K::Record]) -> Classes {
    let mut counts = [0u64; 3];
    for r in records {
        counts[K::class(r).min(2)] += 1;
    }
    counts
}

/// One entry's records, summarised.
#[derive(Debug, Clone, Copy)]
struct EntryRecords {
    stamp_ms: u64,
    log_index: u64,
    classes: Classes,
}

/// The in-memory summary of one record log of a partition.
#[derive(Debug, Default)]
pub struct EntryLog {
    entries: VecDeque<EntryRecords>,
    kept: Classes,
    dropped: u64,
}

/// A partition's record logs, as applied.
#[derive(Debug, Default)]
pub struct PartitionLogs {
    pub dead_letters: EntryLog,
    pub raw_events: EntryLog,
}

impl PartitionLogs {
    /// Both logs of `group` as on disk. Blocking.
    pub fn load(engine: &Engine, group: u32) -> Result<PartitionLogs, StorageError> {
        Ok(PartitionLogs {
            dead_letters: EntryLog::load::<DeadLetters>(engine, group)?,
            raw_events: EntryLog::load::<RawEvents>(engine, group)?,
        })
    }
}

impl EntryLog {
    /// Records kept, by class, and records dropped for space so far.
    pub fn counts(&self) -> (Classes, u64) {
        (self.kept, self.dropped)
    }

    /// Apply one ingest entry's share: keep its records (unless the log is
    /// off), then trim to `bounds` at the entry's stamp. The writes go to
    /// `state`, in apply order.
    pub fn apply<K: LogKind>(
        &mut self,
        group: u32,
        stamp_ms: u64,
        log_index: u64,
        records: &[K::Record],
        bounds: LogBounds,
        state: &mut Vec<StateWrite>,
    ) -> Result<(), StorageError> {
        if !records.is_empty() && bounds.max_events > 0 {
            state.push(StateWrite::Put(
                keys::stamped_key(group, K::TAG, stamp_ms, log_index).to_vec(),
                encode(records)?,
            ));
            let classes = classes::<K>(records);
            (0..3).for_each(|c| self.kept[c] += classes[c]);
            self.entries.push_back(EntryRecords { stamp_ms, log_index, classes });
        }
        let expired_before = if bounds.keep_ms == 0 { 0 } else { stamp_ms.saturating_sub(bounds.keep_ms) };
        let (mut trimmed, mut dropped) = (false, 0u64);
        while let Some(oldest) = self.entries.front().copied() {
            let expired = oldest.stamp_ms < expired_before;
            let over = self.kept.iter().sum::<u64>() > bounds.max_events;
            if !expired && !over {
                break;
            }
            if !expired {
                dropped += oldest.classes.iter().sum::<u64>();
            }
            (0..3).for_each(|c| self.kept[c] = self.kept[c].saturating_sub(oldest.classes[c]));
            self.entries.pop_front();
            trimmed = true;
        }
        if trimmed {
            let end = match self.entries.front() {
                Some(e) => keys::stamped_key(group, K::TAG, e.stamp_ms, e.log_index).to_vec(),
                None => keys::tagged(group, K::TAG + 1).to_vec(),
            };
            state.push(StateWrite::DeleteRange(keys::tagged(group, K::TAG).to_vec(), end));
        }
        if dropped > 0 {
            self.dropped += dropped;
            state.push(StateWrite::Put(keys::tagged(group, K::DROPPED_TAG).to_vec(), encode(&self.dropped)?));
        }
        Ok(())
    }

    /// The summary of what `group` holds on disk. Blocking.
    fn load<K: LogKind>(engine: &Engine, group: u32) -> Result<EntryLog, StorageError> {
        let mut log = EntryLog::default();
        let snap = engine.db().snapshot();
        for item in scan::<K>(engine, &snap, group, &keys::tagged(group, K::TAG))? {
            let (key, value) = item?;
            let (stamp_ms, log_index) = stamp_of(&key)?;
            let classes = K::classes_of(&value)?;
            (0..3).for_each(|c| log.kept[c] += classes[c]);
            log.entries.push_back(EntryRecords { stamp_ms, log_index, classes });
        }
        let dropped = engine.db().get_pinned_cf(engine.cf(CF_STATE)?, keys::tagged(group, K::DROPPED_TAG))?;
        log.dropped = dropped.map(|bytes| decode::<u64>(&bytes)).transpose()?.unwrap_or(0);
        Ok(log)
    }
}

fn stamp_of(key: &[u8]) -> Result<(u64, u64), StorageError> {
    keys::dedup_stamp_of(key).ok_or_else(|| StorageError::Corrupt("record log key".into()))
}

fn scan<'a, K: LogKind>(
    engine: &'a Engine,
    snapshot: &'a rocksdb::Snapshot<'a>,
    group: u32,
    from: &[u8],
) -> Result<impl Iterator<Item = Result<(Box<[u8]>, Box<[u8]>), rocksdb::Error>> + 'a, StorageError> {
    let mut opts = ReadOptions::default();
    opts.set_iterate_upper_bound(keys::tagged(group, K::TAG + 1).to_vec());
    opts.fill_cache(false);
    opts.set_snapshot(snapshot);
    Ok(engine.db().iterator_cf_opt(engine.cf(CF_STATE)?, opts, IteratorMode::From(from, Direction::Forward)))
}

/// Where a page of a log ends: the entry (stamp, index) and the position
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
        if b.len() != 20 {
            return None;
        }
        Some(Cursor {
            stamp_ms: u64::from_be_bytes(b.get(..8)?.try_into().ok()?),
            log_index: u64::from_be_bytes(b.get(8..16)?.try_into().ok()?),
            position: u32::from_be_bytes(b.get(16..20)?.try_into().ok()?),
        })
    }
}

/// A page of records read from disk.
pub struct Page<R> {
    /// Each record with its entry's stamp.
    pub records: Vec<(u64, R)>,
    /// Where the next page starts, if there are more records.
    pub next: Option<Cursor>,
}

/// Up to `limit` records after `after`, oldest first, from what is on disk
/// (the caller checkpoints first for the newest). Blocking.
pub fn read_page<K: LogKind>(
    engine: &Engine,
    group: u32,
    after: Option<Cursor>,
    limit: usize,
) -> Result<Page<K::Record>, StorageError> {
    let from = match after {
        Some(c) => keys::stamped_key(group, K::TAG, c.stamp_ms, c.log_index).to_vec(),
        None => keys::tagged(group, K::TAG).to_vec(),
    };
    let mut page = Page { records: Vec::new(), next: None };
    if limit == 0 {
        return Ok(page);
    }
    let mut last = None;
    let snap = engine.db().snapshot();
    for item in scan::<K>(engine, &snap, group, &from)? {
        let (key, value) = item?;
        let (stamp_ms, log_index) = stamp_of(&key)?;
        let records: Vec<K::Record> = decode(&value)?;
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

/// Every record of the log in `snapshot` that `keep` selects, and the stamp
/// of the oldest entry the log holds. Blocking; reads the whole log
/// (bounded by its `max_events`).
pub fn scan_all<K: LogKind>(
    engine: &Engine,
    snapshot: &rocksdb::Snapshot<'_>,
    group: u32,
    mut keep: impl FnMut(&K::Record) -> bool,
) -> Result<(Vec<K::Record>, Option<u64>), StorageError> {
    let (mut out, mut oldest) = (Vec::new(), None);
    for item in scan::<K>(engine, snapshot, group, &keys::tagged(group, K::TAG))? {
        let (key, value) = item?;
        let (stamp_ms, _) = stamp_of(&key)?;
        oldest.get_or_insert(stamp_ms);
        let records: Vec<K::Record> = decode(&value)?;
        out.extend(records.into_iter().filter(|r| keep(r)));
    }
    Ok((out, oldest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raw_entry_is_counted_from_its_length_prefix() {
        let record = RawRecord {
            entity_id: b"v".to_vec(),
            event_type: "view".into(),
            event_time_ms: 1,
            value: None,
            event_id: vec![],
            actor_id: vec![],
        };
        for n in [0usize, 1, 127, 128, 300, 20_000] {
            let value = encode(&vec![record.clone(); n]).unwrap();
            assert_eq!(RawEvents::classes_of(&value).unwrap(), [n as u64, 0, 0]);
        }
    }
}
