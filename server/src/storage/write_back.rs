//! Write-back of one group's state machine: applied changes live in memory
//! until a checkpoint writes them to RocksDB together with the applied log
//! id, in one atomic batch.
//!
//! Before this, every apply round wrote its own batch: four merges per
//! event per replica into the memtable, through the write-ahead log, then
//! flushed and compacted — most of a node's CPU under load (perf: the
//! memtable skip-list insert of `MergeCF` alone was a third). Now a round
//! only adds its deltas to the *active epoch* in memory, where a hot
//! bucket absorbs thousands of events into one key; a checkpoint every few
//! seconds (or when an epoch holds [`CHECKPOINT_KEYS`] buckets) writes each
//! bucket once.
//!
//! **Recovery.** RocksDB holds the state as of the last checkpoint and its
//! applied id in the same batch, so state and id never disagree; openraft
//! re-applies the committed log after that id on start. The Raft log is
//! purged only behind a snapshot, and a snapshot is built only after a
//! synced checkpoint (`GroupStateMachine::get_snapshot_builder`), so
//! everything after the last checkpoint is still in the log.
//!
//! **Reads.** A read must see the state at one entry boundary: neither
//! miss a delta moving from memory to disk nor count it twice. Each epoch
//! knows the last log index it holds (`upto`), epochs are written in
//! order, and a written epoch leaves memory only after its write. A reader
//! (1) copies, under the lock, the deltas of its keys from every epoch
//! still in memory, tagged with the epoch's `upto`; (2) then takes a
//! RocksDB snapshot and reads the applied index `A` stored in it; (3)
//! counts the disk values plus exactly the copied deltas with `upto > A`.
//! An epoch with `upto ≤ A` is in the snapshot; one with `upto > A` is
//! not, and was still in memory at (1) because it left memory after its
//! write, which came after the snapshot. The sum is the state at the end
//! of an apply round between (1) and (2) — linearizable, and never torn.
//!
//! Checkpoints of a group are serialised (`writing`), and installing a
//! snapshot or deleting the group holds the same lock, so a checkpoint can
//! never land on top of a state that replaced it.
//!
//! **Expiry.** The group's floors (`retention.rs`: per granularity, the
//! oldest bucket kept) are state like the counts: an applied `Expire`
//! raises them in memory at once, and apply stops adding to buckets below
//! them. The checkpoint that writes the epoch raising them also deletes,
//! in the same batch, every bucket on disk below them (counts and ranking
//! index) and drops the expired deltas still in memory, so the disk at an
//! applied id holds exactly the buckets kept at it — digests and snapshots
//! need no filtering. Reads tile their range with kept buckets under the
//! floors they see with the overlay, and check that the disk snapshot's
//! floors are not higher (else they retry: the range moved under them).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use foldhash::{HashMap, HashMapExt};
use rocksdb::WriteBatch;

use tally_proto::time::{Floors, KEEP_ALL};

use super::codec::encode;
use super::counts::CountSum;
use super::keys::{self, CF_COUNTS, CF_STATE, CF_UNIQUES};
use super::sketch::Sketch;
use super::{Engine, StorageError};
use crate::stages::{Stage, Timer};
use crate::sync::MutexExt;
use crate::type_config::LogId;

/// Buckets one epoch may hold before it is checkpointed, whatever its age:
/// bounds a group's memory (~100 bytes a bucket).
pub const CHECKPOINT_KEYS: usize = 32_768;
/// Buckets in memory, all epochs of a group together, beyond which apply
/// waits for a checkpoint instead of running further ahead of the disk.
pub const MAX_DIRTY_KEYS: usize = 4 * CHECKPOINT_KEYS;

/// Whether checkpoints write the ranking index: always, except in a
/// benchmark that measures what the index costs on the ingest path
/// (`TALLY_BENCH_NO_RANKING_INDEX=1` on every node; TopK is then wrong).
pub(super) fn ranking_index() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("TALLY_BENCH_NO_RANKING_INDEX").is_none())
}

/// A write to the group's `state` column family, kept in apply order.
#[derive(Debug, Clone)]
pub enum StateWrite {
    Put(Vec<u8>, Vec<u8>),
    /// Keys in [from, to).
    DeleteRange(Vec<u8>, Vec<u8>),
}

/// What one apply round changed.
#[derive(Default)]
pub struct RoundChanges {
    pub counts: HashMap<Vec<u8>, CountSum>,
    /// Unique-actor sketches of the buckets whose events carried actors.
    pub uniques: HashMap<Vec<u8>, Sketch>,
    pub state: Vec<StateWrite>,
    /// The applied id after the round.
    pub applied: Option<LogId>,
    /// The group's floors after the round, when it raised them.
    pub floors: Option<Floors>,
}

#[derive(Default)]
struct Epoch {
    counts: HashMap<Vec<u8>, CountSum>,
    uniques: HashMap<Vec<u8>, Sketch>,
    /// What `uniques` weighs (`Sketch::weight`), kept as it changes.
    uniques_weight: usize,
    state: Vec<StateWrite>,
    /// The applied id once this epoch's entries are in.
    applied: Option<LogId>,
    /// When its first change came.
    since: Option<Instant>,
    /// Whether its entries raised the floors.
    raised_floors: bool,
}

impl Epoch {
    fn upto(&self) -> u64 {
        self.applied.map(|l| l.index).unwrap_or(0)
    }
}

struct Epochs {
    active: Epoch,
    /// Frozen epochs not yet known to be on disk, oldest first.
    frozen: VecDeque<Arc<Epoch>>,
    /// The applied id of the newest epoch written (or loaded).
    written: Option<LogId>,
    /// The floors after the newest epoch.
    floors: Floors,
}

impl Epochs {
    fn dirty_keys(&self) -> usize {
        // Sketches count by their size: a dense one is 160 buckets' worth.
        let epoch_keys = |e: &Epoch| e.counts.len() + e.uniques_weight;
        epoch_keys(&self.active) + self.frozen.iter().map(|e| epoch_keys(e)).sum::<usize>()
    }
}

/// Deltas of a reader's keys still in memory, per epoch.
pub struct Overlay {
    /// (upto, one delta per requested key) for each epoch holding any.
    parts: Vec<(u64, Vec<CountSum>)>,
    /// The floors after the newest epoch: the state the read sees.
    pub floors: Floors,
}

impl Overlay {
    /// What memory adds to key `i` over a disk state applied up to
    /// `disk_applied`.
    pub fn delta(&self, i: usize, disk_applied: u64) -> CountSum {
        self.parts
            .iter()
            .filter(|(upto, _)| *upto > disk_applied)
            .filter_map(|(_, deltas)| deltas.get(i).copied())
            .fold(CountSum::default(), CountSum::add)
    }
}

pub struct WriteBack {
    group: u32,
    epochs: Mutex<Epochs>,
    /// Held while a checkpoint writes, and while the group's state is
    /// replaced or deleted. `true` once the group is deleted.
    writing: Mutex<bool>,
    /// A background checkpoint is queued or running.
    background: AtomicBool,
}

impl WriteBack {
    /// `written`: the applied id RocksDB holds for the group, `floors` the
    /// floors it holds.
    pub fn new(group: u32, written: Option<LogId>, floors: Floors) -> Arc<WriteBack> {
        Arc::new(WriteBack {
            group,
            epochs: Mutex::new(Epochs {
                active: Epoch { applied: written, ..Default::default() },
                frozen: VecDeque::new(),
                written,
                floors,
            }),
            writing: Mutex::new(false),
            background: AtomicBool::new(false),
        })
    }

    fn epochs(&self) -> MutexGuard<'_, Epochs> {
        self.epochs.lock_unpoisoned()
    }

    fn writing(&self) -> MutexGuard<'_, bool> {
        self.writing.lock_unpoisoned()
    }

    /// Take over one apply round; returns the buckets now in memory.
    pub fn absorb(&self, round: RoundChanges) -> usize {
        let mut epochs = self.epochs();
        let active = &mut epochs.active;
        if active.since.is_none() && (!round.counts.is_empty() || !round.state.is_empty()) {
            active.since = Some(Instant::now());
        }
        if active.counts.is_empty() {
            active.counts = round.counts;
        } else {
            for (key, delta) in round.counts {
                let slot = active.counts.entry(key).or_default();
                *slot = slot.add(delta);
            }
        }
        for (key, sketch) in round.uniques {
            match active.uniques.entry(key) {
                std::collections::hash_map::Entry::Occupied(mut slot) => {
                    let before = slot.get().weight();
                    slot.get_mut().merge(&sketch);
                    active.uniques_weight = active.uniques_weight + slot.get().weight() - before;
                }
                std::collections::hash_map::Entry::Vacant(slot) => {
                    active.uniques_weight += sketch.weight();
                    slot.insert(sketch);
                }
            }
        }
        active.state.extend(round.state);
        if round.applied.is_some() {
            active.applied = round.applied;
        }
        if let Some(floors) = round.floors {
            active.raised_floors = true;
            epochs.floors = floors;
        }
        epochs.dirty_keys()
    }

    /// The floors after everything applied so far.
    pub fn floors(&self) -> Floors {
        self.epochs().floors
    }

    /// Whether the group has changes in memory older than `age`, or more
    /// buckets than one epoch should hold.
    pub fn due(&self, age: Duration) -> bool {
        let epochs = self.epochs();
        !epochs.frozen.is_empty()
            || epochs.active.counts.len() >= CHECKPOINT_KEYS
            || epochs.active.since.is_some_and(|s| s.elapsed() >= age)
    }

    /// Claim the one background checkpoint a group may have queued; the
    /// claimer runs [`WriteBack::checkpoint`] and then [`WriteBack::release`].
    pub fn claim_background(&self) -> bool {
        !self.background.swap(true, Ordering::AcqRel)
    }

    pub fn release(&self) {
        self.background.store(false, Ordering::Release);
    }

    pub fn group(&self) -> u32 {
        self.group
    }

    /// The memory side of a read of `keys`.
    pub fn overlay(&self, keys: &[Vec<u8>]) -> Overlay {
        let epochs = self.epochs();
        let mut parts = Vec::new();
        for epoch in epochs.frozen.iter().map(|e| &**e).chain(std::iter::once(&epochs.active)) {
            if epoch.counts.is_empty() {
                continue;
            }
            let deltas: Vec<CountSum> = keys.iter().map(|k| epoch.counts.get(k).copied().unwrap_or_default()).collect();
            if deltas.iter().any(|d| *d != CountSum::default()) {
                parts.push((epoch.upto(), deltas));
            }
        }
        Overlay { parts, floors: epochs.floors }
    }

    /// Per key, the union of the sketches memory holds for it, every epoch
    /// (a union is idempotent: what is also on disk counts once).
    pub fn uniques_overlay_each(&self, keys: &[Vec<u8>]) -> Vec<Option<Sketch>> {
        let epochs = self.epochs();
        keys.iter()
            .map(|key| {
                let mut found: Option<Sketch> = None;
                for epoch in epochs.frozen.iter().map(|e| &**e).chain(std::iter::once(&epochs.active)) {
                    if let Some(sketch) = epoch.uniques.get(key) {
                        found.get_or_insert_with(Sketch::default).merge(sketch);
                    }
                }
                found
            })
            .collect()
    }

    /// The memory side of a TopK read: per epoch still in memory, its
    /// `upto` and the deltas of `event_type` in the `pieces` (granularity,
    /// bucket start, sorted) by entity. Scans every key in memory (bounded by
    /// [`MAX_DIRTY_KEYS`]), since memory has no index by type.
    pub fn ranking_overlay(
        &self,
        event_type: &[u8],
        pieces: &[(u8, u64)],
    ) -> (Floors, Vec<(u64, HashMap<Vec<u8>, CountSum>)>) {
        let epochs = self.epochs();
        let mut parts = Vec::new();
        for epoch in epochs.frozen.iter().map(|e| &**e).chain(std::iter::once(&epochs.active)) {
            let mut by_entity: HashMap<Vec<u8>, CountSum> = HashMap::new();
            for (key, delta) in &epoch.counts {
                let Some(bucket) = keys::parse_counts_key(key) else { continue };
                if bucket.event_type == event_type
                    && pieces.binary_search(&(bucket.granularity, bucket.bucket_start)).is_ok()
                {
                    let slot = by_entity.entry(bucket.entity_id.to_vec()).or_default();
                    *slot = slot.add(*delta);
                }
            }
            if !by_entity.is_empty() {
                parts.push((epoch.upto(), by_entity));
            }
        }
        (epochs.floors, parts)
    }

    /// Write everything applied so far to RocksDB, with the applied id, in
    /// one batch (`sync`: and fsync it). Blocking. Returns whether anything
    /// was written.
    pub fn checkpoint(&self, engine: &Engine, sync: bool) -> Result<bool, StorageError> {
        let closed = self.writing();
        if *closed {
            return Ok(false);
        }
        let (pending, floors): (Vec<Arc<Epoch>>, Floors) = {
            let mut epochs = self.epochs();
            let active_moved = epochs.active.applied != epochs.frozen.back().map_or(epochs.written, |e| e.applied);
            if active_moved
                || !epochs.active.counts.is_empty()
                || !epochs.active.uniques.is_empty()
                || !epochs.active.state.is_empty()
            {
                let applied = epochs.active.applied;
                let frozen = std::mem::replace(&mut epochs.active, Epoch { applied, ..Default::default() });
                epochs.frozen.push_back(Arc::new(frozen));
            }
            // Every epoch is frozen now, so these are the floors at the
            // last pending epoch's applied id.
            (epochs.frozen.iter().cloned().collect(), epochs.floors)
        };
        let Some(last) = pending.last() else { return Ok(false) };
        let _timer = Timer::start(Stage::Checkpoint);
        let applied = last.applied;
        let mut batch = WriteBatch::default();
        let state_cf = engine.cf(CF_STATE)?;
        let counts_cf = engine.cf(CF_COUNTS)?;
        // Floors raised since the last checkpoint: what they expired leaves
        // the disk in this batch, and the deltas to it leave memory (apply
        // added them before the floors rose).
        let expiring = pending.iter().any(|e| e.raised_floors);
        if expiring {
            delete_expired(engine, self.group, &floors, &mut batch)?;
        }
        let mut counts: HashMap<&[u8], CountSum> = HashMap::new();
        let mut uniques: HashMap<&[u8], Sketch> = HashMap::new();
        for epoch in &pending {
            for (key, sketch) in &epoch.uniques {
                uniques.entry(key.as_slice()).or_default().merge(sketch);
            }
            for write in &epoch.state {
                match write {
                    StateWrite::Put(k, v) => batch.put_cf(state_cf, k, v),
                    StateWrite::DeleteRange(from, to) => batch.delete_range_cf(state_cf, from, to),
                }
            }
            for (key, delta) in &epoch.counts {
                let slot = counts.entry(key.as_slice()).or_default();
                *slot = slot.add(*delta);
            }
        }
        for (key, delta) in counts {
            if expiring && !is_kept_key(&floors, key) {
                continue;
            }
            if delta != CountSum::default() {
                batch.merge_cf(counts_cf, key, delta.encode());
                // The ranking index (`keys.rs`) in the same batch: it can
                // never hold a delta the counts lack, or the reverse.
                if let Some(ranked) = ranking_index().then(|| keys::ranking_key_of(self.group, key)).flatten() {
                    batch.merge_cf(counts_cf, ranked, delta.encode());
                }
            }
        }
        let uniques_cf = engine.cf(CF_UNIQUES)?;
        for (key, sketch) in uniques {
            if !expiring || is_kept_key(&floors, key) {
                batch.merge_cf(uniques_cf, key, sketch.encode());
            }
        }
        batch.put_cf(state_cf, keys::tagged(self.group, keys::STATE_APPLIED), encode(&applied)?);
        if sync {
            engine.write_synced(batch)?;
        } else {
            engine.write(batch)?;
        }
        let mut epochs = self.epochs();
        epochs.frozen.drain(..pending.len());
        epochs.written = applied;
        drop(epochs);
        drop(closed);
        Ok(true)
    }

    /// Write, after everything applied so far, one more batch built by `f`
    /// (a split: `split.rs`) with `applied` as the applied id, fsynced.
    /// Checkpoints first, under the same lock, so `f` reads a disk that
    /// holds the whole state and no checkpoint runs between its reads and
    /// its write. Blocking.
    pub fn write_after_checkpoint(
        &self,
        engine: &Engine,
        applied: LogId,
        f: impl FnOnce(&Engine, &mut WriteBatch) -> Result<(), StorageError>,
    ) -> Result<(), StorageError> {
        self.checkpoint(engine, false)?;
        let closed = self.writing();
        if *closed {
            return Ok(());
        }
        let unwritten = {
            let epochs = self.epochs();
            epochs.dirty_keys() > 0 || !epochs.frozen.is_empty() || !epochs.active.state.is_empty()
        };
        if unwritten {
            return Err(StorageError::Corrupt(format!("group {}: state changed during a split", self.group)));
        }
        crate::crash_point::reach("split-checkpointed");
        let mut batch = WriteBatch::default();
        f(engine, &mut batch)?;
        batch.put_cf(engine.cf(CF_STATE)?, keys::tagged(self.group, keys::STATE_APPLIED), encode(&Some(applied))?);
        engine.write_synced(batch)?;
        let mut epochs = self.epochs();
        epochs.written = Some(applied);
        epochs.active.applied = Some(applied);
        Ok(())
    }

    /// Replace the group's state on disk with `f` (a snapshot install),
    /// dropping what memory holds: the new state supersedes it. `f`
    /// returns the applied id it installed. Blocking.
    pub fn replace<T>(
        &self,
        f: impl FnOnce() -> Result<(T, Option<LogId>, Floors), StorageError>,
    ) -> Result<T, StorageError> {
        let _writing = self.writing();
        let (out, applied, floors) = f()?;
        let mut epochs = self.epochs();
        *epochs = Epochs {
            active: Epoch { applied, ..Default::default() },
            frozen: VecDeque::new(),
            written: applied,
            floors,
        };
        Ok(out)
    }

    /// The group is being deleted: nothing may be written for it again.
    /// Blocking.
    pub fn close(&self) {
        let mut closed = self.writing();
        *closed = true;
        let mut epochs = self.epochs();
        epochs.frozen.clear();
        epochs.active = Epoch::default();
        epochs.floors = KEEP_ALL;
    }

    /// Buckets in memory, every epoch together.
    pub fn dirty_keys(&self) -> usize {
        self.epochs().dirty_keys()
    }
}

/// Whether a counts or ranking-index key's bucket is kept under `floors`
/// (a key that does not parse is kept: nothing is deleted by guess).
pub fn is_kept_key(floors: &Floors, key: &[u8]) -> bool {
    let Some((granularity, start)) = keys::bucket_of_any_key(key) else { return true };
    match (floors.get(usize::from(granularity)), i64::try_from(start)) {
        (Some(floor), Ok(start)) => start >= *floor,
        _ => true,
    }
}

/// Add to `batch` a delete of every bucket of `group` on disk that
/// `floors` expire. Blocking; one pass over the group's counts (a full
/// scan: counts keys are entity-major, so a granularity's old buckets are
/// spread over the whole range). Runs only in the checkpoint after floors
/// rose, at most once per step (an hour for minutes).
fn delete_expired(engine: &Engine, group: u32, floors: &Floors, batch: &mut WriteBatch) -> Result<(), StorageError> {
    if *floors == KEEP_ALL {
        return Ok(());
    }
    let _timer = Timer::start(Stage::Expiry);
    let mut deleted = 0u64;
    for cf_name in [CF_COUNTS, CF_UNIQUES] {
        let cf = engine.cf(cf_name)?;
        let mut opts = rocksdb::ReadOptions::default();
        opts.set_iterate_upper_bound(keys::group_end(group).to_vec());
        let start = keys::group_prefix(group);
        let from = rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward);
        for item in engine.db().iterator_cf_opt(cf, opts, from) {
            let (key, _) = item?;
            if !is_kept_key(floors, &key) {
                batch.delete_cf(cf, &key);
                deleted += 1;
            }
        }
    }
    if deleted > 0 {
        tracing::info!(group, deleted, "expired buckets deleted");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::impls::leader_id_adv::LeaderId;

    fn log_id(index: u64) -> Option<LogId> {
        Some(LogId { leader_id: LeaderId { term: 1, node_id: 1 }, index })
    }

    fn round(key: &[u8], count: u64, applied: u64) -> RoundChanges {
        let mut counts = HashMap::new();
        counts.insert(key.to_vec(), CountSum { count, sum: count as i128 });
        RoundChanges { counts, uniques: HashMap::new(), state: Vec::new(), applied: log_id(applied), floors: None }
    }

    #[test]
    fn overlay_counts_only_epochs_the_disk_lacks() {
        let wb = WriteBack::new(1, None, KEEP_ALL);
        wb.absorb(round(b"k", 2, 1));
        wb.absorb(round(b"k", 3, 2));
        let overlay = wb.overlay(&[b"k".to_vec(), b"other".to_vec()]);
        // Disk at nothing: all of it; disk past the epoch: none of it.
        assert_eq!(overlay.delta(0, 0).count, 5);
        assert_eq!(overlay.delta(0, 2).count, 0);
        assert_eq!(overlay.delta(1, 0).count, 0);
    }

    #[test]
    fn a_read_spanning_a_checkpoint_counts_each_delta_once() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path()).unwrap();
        let wb = WriteBack::new(1, None, KEEP_ALL);
        wb.absorb(round(b"k", 2, 1));
        // The reader copies memory, then the checkpoint writes and clears
        // it, then the reader looks at disk: the disk has it, the copy is
        // ignored.
        let before = wb.overlay(&[b"k".to_vec()]);
        assert!(wb.checkpoint(&engine, false).unwrap());
        assert_eq!(wb.dirty_keys(), 0);
        assert_eq!(before.delta(0, 1).count, 0);
        // A later round is memory only until the next checkpoint.
        wb.absorb(round(b"k", 4, 2));
        let after = wb.overlay(&[b"k".to_vec()]);
        assert_eq!(after.delta(0, 1).count, 4);
        assert!(wb.checkpoint(&engine, true).unwrap());
        assert!(!wb.checkpoint(&engine, false).unwrap(), "nothing new to write");
    }

    #[test]
    fn a_closed_group_is_never_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path()).unwrap();
        let wb = WriteBack::new(1, None, KEEP_ALL);
        wb.absorb(round(b"k", 2, 1));
        wb.close();
        assert!(!wb.checkpoint(&engine, false).unwrap());
    }

    #[test]
    fn due_by_age_or_size() {
        let wb = WriteBack::new(1, None, KEEP_ALL);
        assert!(!wb.due(Duration::ZERO));
        wb.absorb(round(b"k", 1, 1));
        assert!(wb.due(Duration::ZERO));
        assert!(!wb.due(Duration::from_secs(3600)));
    }
}
