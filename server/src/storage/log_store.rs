//! openraft log storage for one group: entries, vote and committed id under
//! the group's key prefix in the shared RocksDB.
//!
//! Nothing here touches RocksDB on the caller's (tokio worker) thread:
//! writes are encoded here and handed to the engine's log writer thread,
//! reads run on the engine's blocking pool (see `engine.rs`). Appends return
//! once written (readable, as openraft requires) and are acknowledged to
//! openraft through the WAL syncer once fsync'd; votes and truncations wait
//! for their fsync before returning, because a forgotten vote or a
//! resurrected conflicting entry would break Raft's safety. All of a group's
//! writes go through the one FIFO writer, so a truncation is ordered with
//! the appends around it.

use std::sync::{Arc, Mutex};
use std::{fmt::Debug, io, ops::RangeBounds};

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch};

use super::codec::{decode, encode};
use super::keys::{self, CF_LOG, CF_RAFT, RAFT_COMMITTED, RAFT_PURGED, RAFT_VOTE};
use super::{Engine, StorageError};
use crate::sync::MutexExt;
use crate::type_config::{Entry, LogId, TypeConfig, Vote};

#[derive(Clone)]
pub struct LogStore {
    group: u32,
    engine: Arc<Engine>,
    /// Read by [`LogStore::open`], served once each to openraft's start-up.
    initial: Arc<Mutex<InitialState>>,
}

/// What openraft reads of a group's log when its Raft starts (vote,
/// committed id, log state), read in one trip to the blocking pool instead
/// of one each: a node opening a thousand groups pays the trip, not the read.
/// Each value is served once; later calls read the store.
#[derive(Default)]
struct InitialState {
    vote: Option<Option<Vote>>,
    committed: Option<Option<LogId>>,
    log_state: Option<LogState<TypeConfig>>,
}

impl LogStore {
    pub fn new(engine: Arc<Engine>, group: u32) -> LogStore {
        LogStore { group, engine, initial: Arc::default() }
    }

    /// A group's log store with its start-up state read ahead, before its
    /// Raft starts (nothing else writes the group's log until then).
    pub async fn open(engine: Arc<Engine>, group: u32) -> Result<LogStore, StorageError> {
        let initial = engine
            .blocking(move |engine| {
                Ok(InitialState {
                    vote: Some(get_raft_meta(engine, group, RAFT_VOTE)?),
                    committed: Some(get_raft_meta::<Option<LogId>>(engine, group, RAFT_COMMITTED)?.flatten()),
                    log_state: Some(log_state(engine, group)?),
                })
            })
            .await?;
        Ok(LogStore { group, engine, initial: Arc::new(Mutex::new(initial)) })
    }

    /// Once anything is written, what was read ahead is stale.
    fn forget_initial(&self) {
        *self.initial.lock_unpoisoned() = InitialState::default();
    }

    fn initial<T>(&self, take: impl FnOnce(&mut InitialState) -> Option<T>) -> Option<T> {
        take(&mut self.initial.lock_unpoisoned())
    }

    /// Run a read of this group's log on the engine's blocking pool.
    async fn read<T, F>(&self, f: F) -> Result<T, io::Error>
    where
        F: FnOnce(&Engine, u32) -> Result<T, StorageError> + Send + 'static,
        T: Send + 'static,
    {
        let group = self.group;
        Ok(self.engine.blocking(move |engine| f(engine, group)).await?)
    }
}

/// Remove every trace of `group`'s log (the node no longer replicates it).
/// Unsynced: a crash before the next fsync brings back a log nothing opens.
pub fn delete_group_log(engine: &Engine, group: u32) -> Result<(), StorageError> {
    let mut batch = WriteBatch::default();
    let (start, end) = (keys::group_prefix(group), keys::group_end(group));
    batch.delete_range_cf(engine.cf(CF_LOG)?, start, end);
    batch.delete_range_cf(engine.cf(CF_RAFT)?, start, end);
    engine.write(batch)
}

fn get_raft_meta<T: serde::de::DeserializeOwned>(
    engine: &Engine,
    group: u32,
    tag: u8,
) -> Result<Option<T>, StorageError> {
    let cf = engine.cf(CF_RAFT)?;
    match engine.db().get_pinned_cf(cf, keys::tagged(group, tag))? {
        Some(bytes) => Ok(Some(decode(&bytes)?)),
        None => Ok(None),
    }
}

fn last_log_id_in_store(engine: &Engine, group: u32) -> Result<Option<LogId>, StorageError> {
    let cf = engine.cf(CF_LOG)?;
    let end = keys::log_key(group, u64::MAX);
    let mut iter = engine.db().iterator_cf(cf, IteratorMode::From(&end, Direction::Reverse));
    match iter.next() {
        Some(item) => {
            let (key, value) = item?;
            if !key.starts_with(&keys::group_prefix(group)) {
                return Ok(None);
            }
            let entry: Entry = decode(&value)?;
            Ok(Some(entry.log_id))
        }
        None => Ok(None),
    }
}

fn log_state(engine: &Engine, group: u32) -> Result<LogState<TypeConfig>, StorageError> {
    let last_purged: Option<LogId> = get_raft_meta(engine, group, RAFT_PURGED)?;
    let last = last_log_id_in_store(engine, group)?.or(last_purged);
    Ok(LogState { last_purged_log_id: last_purged, last_log_id: last })
}

fn read_entries(engine: &Engine, group: u32, start: u64, end_exclusive: u64) -> Result<Vec<Entry>, StorageError> {
    if start >= end_exclusive {
        return Ok(Vec::new());
    }
    let cf = engine.cf(CF_LOG)?;
    let mut opts = ReadOptions::default();
    opts.set_iterate_upper_bound(keys::log_key(group, end_exclusive).to_vec());
    let from = keys::log_key(group, start);
    let iter = engine.db().iterator_cf_opt(cf, opts, IteratorMode::From(&from, Direction::Forward));
    let mut entries = Vec::new();
    for item in iter {
        let (_, value) = item?;
        entries.push(decode::<Entry>(&value)?);
    }
    Ok(entries)
}

fn bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    use std::ops::Bound::*;
    let start = match range.start_bound() {
        Included(s) => *s,
        Excluded(s) => s.saturating_add(1),
        Unbounded => 0,
    };
    let end = match range.end_bound() {
        Included(e) => e.saturating_add(1),
        Excluded(e) => *e,
        Unbounded => u64::MAX,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let (start, end) = bounds(&range);
        self.read(move |engine, group| read_entries(engine, group, start, end)).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        if let Some(vote) = self.initial(|i| i.vote.take()) {
            return Ok(vote);
        }
        self.read(|engine, group| get_raft_meta(engine, group, RAFT_VOTE)).await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        if let Some(state) = self.initial(|i| i.log_state.take()) {
            return Ok(state);
        }
        self.read(log_state).await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.forget_initial();
        let mut batch = WriteBatch::default();
        batch.put_cf(self.engine.cf(CF_RAFT)?, keys::tagged(self.group, RAFT_VOTE), encode(vote)?);
        self.engine.write_durable(batch).await?;
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        self.forget_initial();
        // Not synced: openraft only uses it to re-apply sooner after restart;
        // losing it is safe. Awaited until written, so `read_committed`
        // sees it.
        let mut batch = WriteBatch::default();
        batch.put_cf(self.engine.cf(CF_RAFT)?, keys::tagged(self.group, RAFT_COMMITTED), encode(&committed)?);
        self.engine.write_queued(batch).await?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        if let Some(committed) = self.initial(|i| i.committed.take()) {
            return Ok(committed);
        }
        self.read(|engine, group| Ok(get_raft_meta::<Option<LogId>>(engine, group, RAFT_COMMITTED)?.flatten())).await
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        self.forget_initial();
        let cf = self.engine.cf(CF_LOG)?;
        let mut batch = WriteBatch::default();
        for entry in entries {
            batch.put_cf(cf, keys::log_key(self.group, entry.log_id.index), encode(&entry)?);
        }
        // Returns once written (readable); `callback` after the fsync.
        self.engine.append(batch, callback).await?;
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        self.forget_initial();
        let from = last_log_id.map(|l| l.index + 1).unwrap_or(0);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            self.engine.cf(CF_LOG)?,
            &keys::log_key(self.group, from)[..],
            &keys::group_end(self.group)[..],
        );
        self.engine.write_durable(batch).await?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        self.forget_initial();
        let mut batch = WriteBatch::default();
        batch.put_cf(self.engine.cf(CF_RAFT)?, keys::tagged(self.group, RAFT_PURGED), encode(&log_id)?);
        batch.delete_range_cf(
            self.engine.cf(CF_LOG)?,
            keys::log_key(self.group, 0),
            keys::log_key(self.group, log_id.index.saturating_add(1)),
        );
        // Unsynced: if lost, the purged entries come back with it — harmless.
        self.engine.write_queued(batch).await?;
        Ok(())
    }
}
