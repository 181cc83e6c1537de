//! openraft state machine of one group.
//!
//! A partition group's state is its counts (minute/hour/day/month/year
//! buckets of every (entity, type)), its dedup index, its floors (what
//! retention expired) and its record logs (`entry_log.rs`: dead letters
//! and, when on, raw events); the metadata group's state is the cluster map and
//! the ingest and retention policies. Apply is in memory: each round's merged deltas and
//! state writes go to the group's write-back ([`WriteBack`]), which
//! checkpoints them to RocksDB with the applied log id in one batch every
//! few seconds, so state and applied id on disk never disagree after a
//! crash and everything after them is re-applied from the log.
//!
//! A round's work — dedup, aggregation, the state writes — is a function of
//! the round's entries, the shared dedup index and the applied id it starts
//! from (`apply_chunk`); it runs on the engine's blocking pool
//! ([`Engine::blocking`]) like every RocksDB and file call, never on a
//! tokio worker. The state machine awaits it, then takes the new applied
//! id, membership and cluster map and only then answers the round's
//! responders, so a client never hears of an entry before reads see it.
//! Rounds of one group run one after another.

use std::io;
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use openraft::storage::{ApplyResponder, EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, RaftSnapshotBuilder};
use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch};
use tally_proto::time::{bucket_start, is_kept, Floors, Granularity, KEEP_ALL};
use tokio::sync::{oneshot, watch};

use super::codec::{decode, encode};
use super::counts::CountSum;
use super::entry_log::{DeadLetters, PartitionLogs, RawEvents};
use super::keys::{self, CF_COUNTS, CF_STATE, CF_UNIQUES};
use super::snapshot::{self, SnapshotDir, SnapshotFile};
use super::split;
use super::write_back::{RoundChanges, StateWrite, WriteBack, CHECKPOINT_KEYS, MAX_DIRTY_KEYS};
use super::{Engine, StorageError};
use crate::archive_manifest::{ArchiveManifest, SharedManifest};
use crate::command::{Command, CommandOutcome, IngestBatch, RawRecord};
use crate::dedup::DedupIndex;
use crate::load::PartitionLoad;
use crate::meta::{ClusterMap, IngestPolicy};
use crate::moved::{MovedEntities, SharedMoved};
use crate::retention::{raise, RetentionPolicy};
use crate::stages::{Stage, Timer};
use crate::sync::MutexExt;
use crate::type_config::{Entry, LogId, SnapshotMeta, StoredMembership, TypeConfig};

pub type Snapshot = openraft::storage::Snapshot<
    openraft::impls::leader_id_adv::LeaderId<u64, u64>,
    u64,
    openraft::BasicNode,
    SnapshotFile,
>;

type Responder = ApplyResponder<TypeConfig>;

/// Entries applied per RocksDB write at most.
const APPLY_CHUNK: usize = 256;

pub struct GroupStateMachine {
    group: u32,
    engine: Arc<Engine>,
    applied: Option<LogId>,
    membership: StoredMembership,
    dedup: Arc<DedupIndex>,
    logs: Arc<Mutex<PartitionLogs>>,
    /// The partition's archive manifest, as applied.
    archive: Arc<SharedManifest>,
    /// Entities spread away from the partition, as applied.
    moved: Arc<SharedMoved>,
    /// The group's load counters (apply time).
    load: Arc<PartitionLoad>,
    write_back: Arc<WriteBack>,
    snapshots: SnapshotDir,
    /// Metadata group only: publishes every applied cluster map and policy.
    metadata: Option<MetadataWatches>,
    /// The newest snapshot file as found when opening, served once to
    /// openraft's start-up (one trip to the blocking pool, not two).
    initial_snapshot: Option<Option<(SnapshotMeta, std::path::PathBuf)>>,
}

/// A group's state machine as on disk: what [`load_state`] reads back.
struct Loaded {
    applied: Option<LogId>,
    membership: StoredMembership,
    cluster_map: Option<ClusterMap>,
    ingest_policy: Option<IngestPolicy>,
    retention: Option<RetentionPolicy>,
    floors: Floors,
    logs: PartitionLogs,
    archive: ArchiveManifest,
    moved: MovedEntities,
}

/// Where the metadata group's state machine publishes what it applies.
pub struct MetadataWatches {
    pub map: watch::Sender<ClusterMap>,
    pub policy: watch::Sender<IngestPolicy>,
    pub retention: watch::Sender<RetentionPolicy>,
}

impl MetadataWatches {
    fn publish(&self, map: Option<ClusterMap>, policy: Option<IngestPolicy>, retention: Option<RetentionPolicy>) {
        if let Some(map) = map {
            self.map.send_replace(map);
        }
        if let Some(policy) = policy {
            self.policy.send_replace(policy);
        }
        if let Some(retention) = retention {
            self.retention.send_replace(retention);
        }
    }
}

/// What one apply round changed, for the state machine to take over.
struct Applied {
    applied: Option<LogId>,
    /// The newest membership among the round's entries, if any.
    membership: Option<StoredMembership>,
    cluster_map: Option<ClusterMap>,
    ingest_policy: Option<IngestPolicy>,
    retention: Option<RetentionPolicy>,
    /// One per entry, in order.
    outcomes: Vec<CommandOutcome>,
    /// Buckets the write-back holds after the round.
    dirty_keys: usize,
}

impl GroupStateMachine {
    pub async fn open(
        engine: Arc<Engine>,
        group: u32,
        snapshot_root: &std::path::Path,
        dedup: Arc<DedupIndex>,
        metadata: Option<MetadataWatches>,
    ) -> Result<GroupStateMachine, StorageError> {
        let root = snapshot_root.to_path_buf();
        let shared_dedup = dedup.clone();
        // Opening is a handful of reads, unless a crash interrupted a
        // snapshot install (rare): the short pool, so a node opening a
        // thousand groups is not held to the bulk pool's few permits.
        let (snapshots, loaded, newest) = engine
            .blocking(move |engine| {
                let snapshots = SnapshotDir::new(&root, group)?;
                snapshots.remove_temp_files()?;
                recover_interrupted_install(engine, group, &snapshots)?;
                let loaded = load_state(engine, group, &shared_dedup)?;
                let newest = snapshots.newest()?;
                Ok((snapshots, loaded, newest))
            })
            .await?;
        let write_back = WriteBack::new(group, loaded.applied, loaded.floors);
        let mut sm = GroupStateMachine {
            group,
            engine,
            applied: None,
            membership: StoredMembership::default(),
            dedup,
            logs: Arc::default(),
            archive: Arc::default(),
            moved: Arc::default(),
            load: Arc::default(),
            write_back,
            snapshots,
            metadata,
            initial_snapshot: Some(newest),
        };
        sm.take_loaded(loaded);
        Ok(sm)
    }

    /// The group's write-back, which reads and checkpoints go through.
    pub fn write_back(&self) -> Arc<WriteBack> {
        self.write_back.clone()
    }

    /// The group's load counters.
    pub fn load(&self) -> Arc<PartitionLoad> {
        self.load.clone()
    }

    /// The summary of the group's record logs, as applied.
    pub fn logs(&self) -> Arc<Mutex<PartitionLogs>> {
        self.logs.clone()
    }

    /// The partition's archive manifest, as applied.
    pub fn archive(&self) -> Arc<SharedManifest> {
        self.archive.clone()
    }

    /// The entities spread away from the partition, as applied.
    pub fn moved(&self) -> Arc<SharedMoved> {
        self.moved.clone()
    }

    /// Start a checkpoint beside apply once the write-back holds an epoch's
    /// worth of buckets; wait for one when it holds several (the disk fell
    /// behind, and memory stays bounded).
    async fn checkpoint_if_full(&self, dirty_keys: usize) -> Result<(), StorageError> {
        if dirty_keys >= MAX_DIRTY_KEYS {
            let wb = self.write_back.clone();
            self.engine.blocking(move |engine| wb.checkpoint(engine, false)).await?;
        } else if dirty_keys >= CHECKPOINT_KEYS && self.write_back.claim_background() {
            let (wb, engine) = (self.write_back.clone(), self.engine.clone());
            tokio::spawn(async move {
                let bg = wb.clone();
                if let Err(e) = engine.blocking(move |engine| bg.checkpoint(engine, false)).await {
                    tracing::warn!(group = wb.group(), error = %e, "checkpoint failed; retried later");
                }
                wb.release();
            });
        }
        Ok(())
    }

    /// Apply a run of entries (no split among them) and answer them.
    async fn apply_round(&mut self, chunk: Vec<Entry>, responders: Vec<Option<Responder>>) -> Result<(), io::Error> {
        let (group, dedup, write_back, applied) =
            (self.group, self.dedup.clone(), self.write_back.clone(), self.applied);
        let (logs, load, archive, moved) =
            (self.logs.clone(), self.load.clone(), self.archive.clone(), self.moved.clone());
        let done = self
            .engine
            .blocking(move |_| {
                let _timer = Timer::start(Stage::ApplyRound);
                let started = std::time::Instant::now();
                let done = apply_chunk(group, &dedup, &logs, &archive, &moved, &write_back, applied, chunk);
                load.applied(started.elapsed());
                done
            })
            .await?;
        // Written: now the in-memory view moves, and only then are
        // clients answered.
        self.applied = done.applied;
        if let Some(membership) = done.membership {
            self.membership = membership;
        }
        if let Some(watches) = &self.metadata {
            watches.publish(done.cluster_map, done.ingest_policy, done.retention);
        }
        for (responder, outcome) in responders.into_iter().zip(done.outcomes) {
            if let Some(r) = responder {
                r.send(outcome);
            }
        }
        self.checkpoint_if_full(done.dirty_keys).await?;
        Ok(())
    }

    /// Apply a `Command::Split` entry (`split.rs`): the range's state moves
    /// to the child group in one batch after a checkpoint.
    async fn apply_split(&mut self, entry: Entry, responder: Option<Responder>) -> Result<(), io::Error> {
        let log_id = entry.log_id;
        let EntryPayload::Normal(Command::Split(range)) = entry.payload else {
            return Err(io::Error::other("apply_split called with another entry"));
        };
        let child_group = tally_proto::partition::group_of_partition(range.to);
        let membership = self.membership.clone();
        let voters: Vec<u64> =
            membership.membership().get_joint_config().last().map(|c| c.iter().copied().collect()).unwrap_or_default();
        let mut moved = (*self.moved.get()).clone();
        let fresh = moved.split_off(range);
        if fresh {
            // Before the state leaves: a read that finds the range still
            // here after reading saw it whole (`api/query.rs`).
            self.moved.set(moved.clone());
        }
        let (group, write_back) = (self.group, self.write_back.clone());
        let done = self
            .engine
            .blocking_bulk(move |engine| {
                let mut stats = None;
                write_back.write_after_checkpoint(engine, log_id, |engine, batch| {
                    if fresh {
                        let seed = !split::child_exists(engine, child_group)?;
                        stats = Some(split::split_batch(
                            engine,
                            group,
                            child_group,
                            &range,
                            &moved,
                            &membership,
                            seed,
                            batch,
                        )?);
                    }
                    Ok(())
                })?;
                crate::crash_point::reach("split-written");
                // The raw-event log lost the range's records on disk: its
                // summary is rebuilt from the keys, as on open.
                let logs = PartitionLogs::load(engine, group)?;
                Ok::<_, StorageError>((stats, logs))
            })
            .await?;
        let (stats, logs) = done;
        *self.logs.lock_unpoisoned() = logs;
        if let Some(stats) = stats {
            tracing::info!(group, child_group, ?range, ?stats, "split applied");
        }
        self.applied = Some(log_id);
        if let Some(r) = responder {
            r.send(CommandOutcome { split_voters: Some(voters), ..Default::default() });
        }
        Ok(())
    }

    /// Take over the in-memory view read by [`load_state`].
    fn take_loaded(&mut self, loaded: Loaded) {
        self.applied = loaded.applied;
        *self.logs.lock_unpoisoned() = loaded.logs;
        self.archive.set(loaded.archive);
        self.moved.set(loaded.moved);
        self.membership = loaded.membership;
        if let Some(watches) = &self.metadata {
            watches.publish(loaded.cluster_map, loaded.ingest_policy, loaded.retention);
        }
    }
}

/// An install interrupted by a crash left its marker: go back to the newest
/// local snapshot, or to nothing. Blocking.
fn recover_interrupted_install(engine: &Engine, group: u32, snapshots: &SnapshotDir) -> Result<(), StorageError> {
    let installing =
        engine.db().get_pinned_cf(engine.cf(CF_STATE)?, keys::tagged(group, keys::STATE_INSTALLING))?.is_some();
    if !installing {
        return Ok(());
    }
    tracing::warn!(group, "snapshot install was interrupted; restoring the newest local snapshot");
    match snapshots.newest()? {
        Some((_, path)) => {
            snapshot::install_snapshot_file(engine, group, &path)?;
        }
        None => {
            let mut batch = WriteBatch::default();
            batch.delete_range_cf(engine.cf(CF_STATE)?, keys::group_prefix(group), keys::group_end(group));
            batch.delete_range_cf(engine.cf(CF_COUNTS)?, keys::group_prefix(group), keys::group_end(group));
            batch.delete_range_cf(engine.cf(CF_UNIQUES)?, keys::group_prefix(group), keys::group_end(group));
            engine.write_synced(batch)?;
        }
    }
    Ok(())
}

fn get_state<T: serde::de::DeserializeOwned>(engine: &Engine, group: u32, tag: u8) -> Result<Option<T>, StorageError> {
    let cf = engine.cf(CF_STATE)?;
    match engine.db().get_pinned_cf(cf, keys::tagged(group, tag))? {
        Some(bytes) => Ok(Some(decode(&bytes)?)),
        None => Ok(None),
    }
}

/// Rebuild the in-memory view (applied id, membership, dedup index,
/// cluster map) from what is on disk. Blocking.
fn load_state(engine: &Engine, group: u32, dedup: &DedupIndex) -> Result<Loaded, StorageError> {
    let applied = get_state::<Option<LogId>>(engine, group, keys::STATE_APPLIED)?.flatten();
    let membership = get_state(engine, group, keys::STATE_MEMBERSHIP)?.unwrap_or_default();
    let mut index = dedup.lock();
    index.clear();
    let cf = engine.cf(CF_STATE)?;
    let start = keys::tagged(group, keys::STATE_DEDUP);
    let mut opts = ReadOptions::default();
    opts.set_iterate_upper_bound(keys::tagged(group, keys::STATE_DEDUP + 1).to_vec());
    for item in engine.db().iterator_cf_opt(cf, opts, IteratorMode::From(&start, Direction::Forward)) {
        let (key, value) = item?;
        let stamp = keys::dedup_stamp_of(&key).ok_or_else(|| StorageError::Corrupt("dedup key".into()))?;
        index.insert_batch(stamp, decode(&value)?);
    }
    drop(index);
    let clock = get_state::<u64>(engine, group, keys::STATE_LOG_CLOCK)?.unwrap_or(0);
    let conflicts = get_state::<u64>(engine, group, keys::STATE_CONFLICTS)?.unwrap_or(0);
    dedup.lock().restore_counters(clock, conflicts);
    let cluster_map = get_state::<ClusterMap>(engine, group, keys::STATE_CLUSTER_MAP)?;
    let ingest_policy = get_state::<IngestPolicy>(engine, group, keys::STATE_INGEST_POLICY)?;
    let retention = get_state::<RetentionPolicy>(engine, group, keys::STATE_RETENTION)?;
    let floors = get_state::<Floors>(engine, group, keys::STATE_FLOORS)?.unwrap_or(KEEP_ALL);
    let logs = PartitionLogs::load(engine, group)?;
    let archive = get_state::<ArchiveManifest>(engine, group, keys::STATE_ARCHIVE)?.unwrap_or_default();
    let moved = get_state::<MovedEntities>(engine, group, keys::STATE_MOVED)?.unwrap_or_default();
    Ok(Loaded { applied, membership, cluster_map, ingest_policy, retention, floors, logs, archive, moved })
}

/// Apply a run of entries in memory, starting from `applied`, and hand the
/// changes to the write-back. Blocking (CPU only).
#[allow(clippy::too_many_arguments)]
fn apply_chunk(
    group: u32,
    dedup: &DedupIndex,
    logs: &Mutex<PartitionLogs>,
    archive: &SharedManifest,
    shared_moved: &SharedMoved,
    write_back: &WriteBack,
    mut applied: Option<LogId>,
    chunk: Vec<Entry>,
) -> Result<Applied, StorageError> {
    let mut round = RoundChanges::default();
    let mut outcomes = Vec::with_capacity(chunk.len());
    let mut membership = None;
    let mut cluster_map = None;
    let mut ingest_policy = None;
    let mut retention = None;
    let mut floors = write_back.floors();
    let mut manifest = archive.get();
    let mut manifest_changed = false;
    let mut moved = shared_moved.get();
    let mut moved_changed = false;
    for entry in chunk {
        let mut outcome = CommandOutcome::default();
        match entry.payload {
            EntryPayload::Blank => {}
            EntryPayload::Membership(m) => {
                let stored = StoredMembership::new(Some(entry.log_id), m);
                round
                    .state
                    .push(StateWrite::Put(keys::tagged(group, keys::STATE_MEMBERSHIP).to_vec(), encode(&stored)?));
                membership = Some(stored);
            }
            EntryPayload::Normal(Command::Ingest(ingest)) => {
                let refusals = Refusals { manifest: &manifest, moved: &moved };
                let (skipped, refused, latest_minute) =
                    apply_ingest(group, dedup, logs, &mut round, &floors, refusals, entry.log_id.index, ingest)?;
                (outcome.skipped, outcome.sealed, outcome.moved) = (skipped, refused.sealed, refused.moved);
                // Compared before `make_mut`, which copies the shared record:
                // the latest minute moves about once a minute, entries far
                // more often.
                if let Some(m) = latest_minute.filter(|m| moved.latest_minute_ms.is_none_or(|l| l < *m)) {
                    moved_changed |= Arc::make_mut(&mut moved).counted(m);
                }
            }
            EntryPayload::Normal(Command::SetClusterMap(map)) => {
                round.state.push(StateWrite::Put(keys::tagged(group, keys::STATE_CLUSTER_MAP).to_vec(), encode(&map)?));
                cluster_map = Some(map);
            }
            EntryPayload::Normal(Command::SetIngestPolicy(policy)) => {
                round
                    .state
                    .push(StateWrite::Put(keys::tagged(group, keys::STATE_INGEST_POLICY).to_vec(), encode(&policy)?));
                ingest_policy = Some(policy);
            }
            EntryPayload::Normal(Command::SetRetention(policy)) => {
                round
                    .state
                    .push(StateWrite::Put(keys::tagged(group, keys::STATE_RETENTION).to_vec(), encode(&policy)?));
                retention = Some(policy);
            }
            EntryPayload::Normal(Command::Expire(proposed)) => {
                // Nothing leaves the hot store before it is archived.
                let raised = raise(&floors, &manifest.cap_floors(&proposed));
                if raised != floors {
                    floors = raised;
                    round
                        .state
                        .push(StateWrite::Put(keys::tagged(group, keys::STATE_FLOORS).to_vec(), encode(&floors)?));
                    round.floors = Some(floors);
                }
            }
            EntryPayload::Normal(Command::Seal { below_ms }) => {
                if Arc::make_mut(&mut manifest).seal(below_ms, &floors) {
                    manifest_changed = true;
                    round
                        .state
                        .push(StateWrite::Put(keys::tagged(group, keys::STATE_ARCHIVE).to_vec(), encode(&*manifest)?));
                }
            }
            EntryPayload::Normal(Command::Spread { entity_id, from_ms }) => {
                let before = moved.moved.len();
                outcome.spread_from_ms = Some(Arc::make_mut(&mut moved).move_out(&entity_id, from_ms));
                moved_changed |= moved.moved.len() != before;
            }
            // Applied alone, by `apply_split`; never in a chunk.
            EntryPayload::Normal(Command::Split(_)) => {}
            EntryPayload::Normal(Command::Archived(segment)) => {
                if Arc::make_mut(&mut manifest).add(segment) {
                    manifest_changed = true;
                    round
                        .state
                        .push(StateWrite::Put(keys::tagged(group, keys::STATE_ARCHIVE).to_vec(), encode(&*manifest)?));
                }
            }
        }
        applied = Some(entry.log_id);
        outcomes.push(outcome);
    }
    round.applied = applied;
    if moved_changed {
        round.state.push(StateWrite::Put(keys::tagged(group, keys::STATE_MOVED).to_vec(), encode(&*moved)?));
        // Before the entries' answers: a proposer told "spread" finds it.
        shared_moved.set((*moved).clone());
    }
    // The manifest before the floors it allows (readers read floors first).
    if manifest_changed {
        archive.set((*manifest).clone());
    }
    let dirty_keys = write_back.absorb(round);
    Ok(Applied { applied, membership, cluster_map, ingest_policy, retention, outcomes, dirty_keys })
}

/// What makes apply refuse a delta: a sealed minute, or an entity spread
/// away from the partition.
#[derive(Clone, Copy)]
struct Refusals<'a> {
    manifest: &'a ArchiveManifest,
    moved: &'a MovedEntities,
}

/// Deltas (indexes in `IngestBatch::deltas`) apply refused, by reason.
#[derive(Default)]
struct Refused {
    sealed: Vec<u32>,
    moved: Vec<u32>,
}

/// Apply one ingest entry; returns the positions of keyed events not
/// counted because their key already was (see `KeyedEvent`), the deltas
/// refused (`Refusals`), and the latest minute it counted.
#[allow(clippy::too_many_arguments)]
fn apply_ingest(
    group: u32,
    dedup: &DedupIndex,
    logs: &Mutex<PartitionLogs>,
    round: &mut RoundChanges,
    floors: &Floors,
    refusals: Refusals<'_>,
    log_index: u64,
    ingest: IngestBatch,
) -> Result<(Vec<u32>, Refused, Option<i64>), StorageError> {
    let IngestBatch {
        proposed_at_ms,
        dedup_window_ms,
        mut deltas,
        keyed,
        provisional,
        dead_letters,
        dead_letter_bounds,
        raw_events,
        raw_event_bounds,
    } = ingest;
    let mut dedup = dedup.lock();
    // Expire by the log's clock, never the local one: replicas must agree
    // on the index at every log position. The stamp never goes back.
    let stamp = dedup.stamp(proposed_at_ms);
    let cutoff = stamp.saturating_sub(dedup_window_ms);
    if dedup.expire_before(cutoff) {
        // Only what the index no longer holds: it keeps keys to the start
        // of the cutoff's second, and a restarted replica must load the same.
        let live_from = dedup.live_from_ms(cutoff);
        round.state.push(StateWrite::DeleteRange(
            keys::tagged(group, keys::STATE_DEDUP).to_vec(),
            keys::dedup_key(group, live_from, 0).to_vec(),
        ));
    }
    round.state.push(StateWrite::Put(keys::tagged(group, keys::STATE_LOG_CLOCK).to_vec(), encode(&stamp)?));
    // Deltas of sealed minutes, or of entities spread away, are not
    // counted, and their events' keys not recorded: they were refused, so
    // a retry (corrected, or routed anew) must not be taken for a duplicate.
    let mut refused = Refused::default();
    for (i, d) in deltas.iter().enumerate() {
        if refusals.manifest.is_sealed(d.minute_ms) {
            refused.sealed.push(i as u32);
        } else if refusals.moved.refuses(&d.entity_id, d.minute_ms) {
            refused.moved.push(i as u32);
        }
    }
    let sealed: Vec<u32> = if refused.moved.is_empty() {
        refused.sealed.clone()
    } else {
        let mut all = [refused.sealed.as_slice(), refused.moved.as_slice()].concat();
        all.sort_unstable();
        all
    };
    let is_sealed = |delta: u32| !sealed.is_empty() && sealed.binary_search(&delta).is_ok();
    let mut admitted =
        dedup.admit((stamp, log_index), keyed.iter().filter(|e| !is_sealed(e.delta)).map(|k| k.key), provisional);
    if !sealed.is_empty() {
        // Back to positions in `keyed` (only entries with sealed deltas
        // skipped any: the common entry pays nothing).
        let counted: Vec<u32> =
            (0..keyed.len() as u32).filter(|&k| keyed.get(k as usize).is_some_and(|e| !is_sealed(e.delta))).collect();
        for position in &mut admitted.skipped {
            *position = counted.get(*position as usize).copied().unwrap_or(u32::MAX);
        }
    }
    if !admitted.keys.is_empty() {
        round.state.push(StateWrite::Put(keys::dedup_key(group, stamp, log_index).to_vec(), encode(&admitted.keys)?));
    }
    let conflicts = !admitted.skipped.is_empty() && !provisional;
    if conflicts {
        round
            .state
            .push(StateWrite::Put(keys::tagged(group, keys::STATE_CONFLICTS).to_vec(), encode(&dedup.conflicts())?));
    }
    drop(dedup);
    // On the entry's (monotonic) stamp, like the dedup keys. Raw events
    // apply takes back out of the counts leave the raw log too.
    let raw: Vec<RawRecord> = raw_events
        .into_iter()
        .filter(|r| r.keyed.is_none_or(|k| admitted.skipped.binary_search(&k).is_err()) && !is_sealed(r.delta))
        .filter_map(|r| {
            let d = deltas.get(r.delta as usize)?;
            Some(RawRecord {
                entity_id: d.entity_id.clone(),
                event_type: d.event_type.clone(),
                event_time_ms: r.event_time_ms,
                value: r.value,
                event_id: r.event_id,
                actor_id: r.actor_id,
            })
        })
        .collect();
    let mut logs = logs.lock_unpoisoned();
    logs.dead_letters.apply::<DeadLetters>(
        group,
        stamp,
        log_index,
        &dead_letters,
        dead_letter_bounds,
        &mut round.state,
    )?;
    logs.raw_events.apply::<RawEvents>(group, stamp, log_index, &raw, raw_event_bounds, &mut round.state)?;
    drop(logs);
    if !admitted.skipped.is_empty() && provisional {
        tracing::debug!(
            group,
            log_index,
            skipped = admitted.skipped.len(),
            "a new leader re-proposed events earlier entries had counted; not counted again"
        );
    } else if conflicts {
        tracing::error!(
            group,
            log_index,
            skipped = admitted.skipped.len(),
            "entry carried events whose key was already counted; not counted again"
        );
    }
    // Take the skipped events back out of the deltas that include them.
    for &position in &admitted.skipped {
        let Some(event) = keyed.get(position as usize) else { continue };
        if let Some(d) = deltas.get_mut(event.delta as usize) {
            d.count = d.count.wrapping_sub(1);
            d.sum = d.sum.wrapping_sub(event.value as i128);
        }
    }
    let mut latest_minute = None;
    for (i, d) in deltas.into_iter().enumerate() {
        if (d.count == 0 && d.sum == 0) || is_sealed(i as u32) {
            continue;
        }
        latest_minute = latest_minute.max(Some(d.minute_ms));
        let delta = CountSum { count: d.count, sum: d.sum };
        for g in Granularity::ALL {
            let start = bucket_start(g, d.minute_ms);
            if !is_kept(floors, g, start) {
                // Expired (a late event): counted in the coarser buckets
                // still kept, like every event of its time.
                continue;
            }
            let key = match keys::bucket_key(group, &d.entity_id, &d.event_type, g, start) {
                Ok(key) => key,
                Err(e) => {
                    // Validation keeps such deltas out of the log; if one got in
                    // anyway, every replica skips it alike (failing the apply
                    // would stop the group for good).
                    tracing::error!(group, log_index, error = %e, "delta not counted");
                    break;
                }
            };
            if !d.actors.is_empty() {
                let sketch = round.uniques.entry(key.clone()).or_default();
                d.actors.iter().for_each(|hash| sketch.insert(*hash));
            }
            let slot = round.counts.entry(key).or_default();
            *slot = slot.add(delta);
        }
    }
    if !sealed.is_empty() {
        tracing::debug!(
            group,
            log_index,
            sealed = refused.sealed.len(),
            moved = refused.moved.len(),
            "deltas of sealed minutes or spread entities not counted"
        );
    }
    Ok((admitted.skipped, refused, latest_minute))
}

impl RaftStateMachine<TypeConfig> for GroupStateMachine {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<Strm>(&mut self, entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + openraft::OptionalSend,
    {
        let mut chunks = entries.ready_chunks(APPLY_CHUNK);
        while let Some(items) = chunks.next().await {
            let chunk = items.into_iter().collect::<Result<Vec<_>, io::Error>>()?;
            let (mut chunk, mut responders): (Vec<Entry>, Vec<_>) = chunk.into_iter().unzip();
            // A split is applied alone, after everything before it
            // (`split.rs`): it reads the whole state from disk.
            while !chunk.is_empty() {
                let is_split = |e: &Entry| matches!(e.payload, EntryPayload::Normal(Command::Split(_)));
                match chunk.iter().position(is_split) {
                    Some(0) => {
                        let rest = chunk.split_off(1);
                        let rest_responders = responders.split_off(1);
                        let (entry, responder) = (chunk.pop(), responders.pop());
                        if let Some(entry) = entry {
                            self.apply_split(entry, responder.flatten()).await?;
                        }
                        (chunk, responders) = (rest, rest_responders);
                    }
                    Some(n) => {
                        let rest = chunk.split_off(n);
                        let rest_responders = responders.split_off(n);
                        self.apply_round(
                            std::mem::replace(&mut chunk, rest),
                            std::mem::replace(&mut responders, rest_responders),
                        )
                        .await?;
                    }
                    None => {
                        self.apply_round(std::mem::take(&mut chunk), std::mem::take(&mut responders)).await?;
                    }
                }
            }
        }
        Ok(())
    }
    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        self.initial_snapshot = None;
        // The snapshot is read from RocksDB, and the log is purged behind
        // it: everything applied goes to disk first, fsynced.
        let wb = self.write_back.clone();
        if let Err(e) = self.engine.blocking(move |engine| wb.checkpoint(engine, true)).await {
            let (done_tx, done_rx) = oneshot::channel();
            let _ = done_tx.send(Err(e));
            return SnapshotBuilder { done: Some(done_rx) };
        }
        let meta = SnapshotMeta { last_log_id: self.applied, last_membership: self.membership.clone() };
        let db = self.engine.shared_db();
        let group = self.group;
        let dir = self.snapshots.clone();
        let (taken_tx, taken_rx) = oneshot::channel::<()>();
        let (done_tx, done_rx) = oneshot::channel();
        // The RocksDB snapshot must be taken before this state machine applies
        // anything else, so it matches `meta`; the file is written afterwards
        // on its own thread while applying continues.
        let spawned = std::thread::Builder::new().name(format!("tally-snap-{group}")).spawn(move || {
            let snap = db.snapshot();
            let _ = taken_tx.send(());
            let temp = dir.temp_path();
            let result = snapshot::write_snapshot_file(&db, &snap, group, &meta, &temp)
                .and_then(|()| dir.publish(&temp, &meta))
                .map(|path| Snapshot { meta, snapshot: SnapshotFile { path } });
            if result.is_err() {
                let _ = std::fs::remove_file(&temp);
            }
            let _ = done_tx.send(result);
        });
        match spawned {
            Ok(_) => {
                let _ = taken_rx.await;
            }
            Err(e) => tracing::error!(group, error = %e, "cannot spawn snapshot thread"),
        }
        SnapshotBuilder { done: Some(done_rx) }
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: SnapshotFile) -> Result<(), io::Error> {
        self.initial_snapshot = None;
        let (group, dedup, snapshots, meta) = (self.group, self.dedup.clone(), self.snapshots.clone(), meta.clone());
        let write_back = self.write_back.clone();
        let loaded = self
            .engine
            .blocking_bulk(move |engine| {
                // What memory holds is older than the snapshot: dropped.
                write_back.replace(|| {
                    let installed = snapshot::install_snapshot_file(engine, group, &snapshot.path)?;
                    if installed != meta {
                        return Err(StorageError::Corrupt("snapshot file does not match its metadata".into()));
                    }
                    crate::crash_point::reach("snapshot-install-written");
                    snapshots.publish(&snapshot.path, &meta)?;
                    let loaded = load_state(engine, group, &dedup)?;
                    let (applied, floors) = (loaded.applied, loaded.floors);
                    Ok((loaded, applied, floors))
                })
            })
            .await?;
        self.take_loaded(loaded);
        tracing::info!(group = self.group, applied = ?self.applied, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let newest = match self.initial_snapshot.take() {
            Some(newest) => newest,
            None => {
                let snapshots = self.snapshots.clone();
                self.engine.blocking(move |_| snapshots.newest()).await?
            }
        };
        Ok(newest.map(|(meta, path)| Snapshot { meta, snapshot: SnapshotFile { path } }))
    }
}

pub struct SnapshotBuilder {
    done: Option<oneshot::Receiver<Result<Snapshot, StorageError>>>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let done = self.done.take().ok_or_else(|| io::Error::other("snapshot builder used twice"))?;
        match done.await {
            Ok(result) => Ok(result?),
            Err(_) => Err(io::Error::other("snapshot thread stopped before finishing")),
        }
    }
}

/// Delete a group's state machine data (the node no longer replicates it;
/// its write-back is closed first, so no checkpoint can follow). Blocking.
pub fn delete_group_state(engine: &Engine, write_back: &WriteBack) -> Result<(), StorageError> {
    write_back.close();
    let group = write_back.group();
    let mut batch = WriteBatch::default();
    batch.delete_range_cf(engine.cf(CF_STATE)?, keys::group_prefix(group), keys::group_end(group));
    batch.delete_range_cf(engine.cf(CF_COUNTS)?, keys::group_prefix(group), keys::group_end(group));
    batch.delete_range_cf(engine.cf(CF_UNIQUES)?, keys::group_prefix(group), keys::group_end(group));
    engine.write(batch)
}
