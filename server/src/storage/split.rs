//! A partition split, as the parent's state machine applies it.
//!
//! `Command::Split` is an entry of the parent's own log. Applying it, every
//! replica of the parent — at the same log position, so with the same
//! state — writes one batch (after checkpointing everything before the
//! entry, `WriteBack::write_after_checkpoint`) that:
//!
//! * moves every counts bucket, ranking-index entry and actor sketch of the
//!   entities in the split-off range from the parent's keys to the child
//!   group's (deleted from the parent, put under the child's group id);
//! * copies the parent's dedup window (every batch of keys: a key does not
//!   name its entity, and a retry of an event counted before the split now
//!   reaches the child, whose window must know it), its log clock, its
//!   retention floors and its archive manifest (sealed hours stay where
//!   they were exported; the child reads them from the same files);
//! * moves the range's records of the raw-event log (`entry_log.rs`) to the
//!   child, so `tally audit` recounts an entity where it now lives (each
//!   entry's records split by entity under the same key; the parent's
//!   summary is rebuilt from its keys after the batch); dead letters stay
//!   with the parent, an operator's log of what it refused;
//! * gives the child the spreads of its entities (`MovedEntities::inherited_by`);
//! * records the range as moved in the parent (from now on refused, every
//!   time, `moved.rs`) and the split entry as the parent's applied id;
//! * makes the child a Raft group that has applied its first entry: applied
//!   and purged id [`initial_log_id`], membership the parent's voters. Every
//!   replica of the child thus starts initialised, with the same state and
//!   no log; a replica that never applied the split (its parent replica was
//!   restored from a later snapshot, or it was added later) starts empty
//!   and gets the child's state as a snapshot, since the log before the
//!   first entry is purged.
//!
//! One batch, so a crash leaves either the parent before the split (the
//! entry is applied again on restart) or both sides after it.

use std::collections::{BTreeMap, BTreeSet};

use openraft::Membership;
use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch};

use super::codec::{decode, encode};
use super::keys::{self, CF_COUNTS, CF_RAFT, CF_STATE, CF_UNIQUES};
use super::{Engine, StorageError};
use crate::command::RawRecord;
use crate::moved::{MovedEntities, MovedRange};
use crate::type_config::{LogId, StoredMembership};

/// The log id a split-off group starts at: it has "applied" its first
/// entry, the membership, and its log before it is purged.
pub fn initial_log_id() -> LogId {
    LogId::new(openraft::impls::leader_id_adv::LeaderId { term: 0, node_id: 0 }, 0)
}

/// The child's membership: the parent's voters (of its newest config).
pub fn child_membership(parent: &StoredMembership) -> Result<StoredMembership, StorageError> {
    let m = parent.membership();
    let voters: BTreeSet<u64> = m.get_joint_config().last().cloned().unwrap_or_default();
    let nodes: BTreeMap<u64, openraft::BasicNode> =
        voters.iter().filter_map(|id| m.get_node(id).map(|n| (*id, n.clone()))).collect();
    let membership = Membership::new(vec![voters], nodes)
        .map_err(|e| StorageError::Corrupt(format!("the parent's membership cannot seed a split: {e}")))?;
    Ok(StoredMembership::new(Some(initial_log_id()), membership))
}

/// How much a split moved, for the log.
#[derive(Debug, Default, Clone, Copy)]
pub struct Moved {
    pub buckets: usize,
    pub sketches: usize,
    pub dedup_batches: usize,
    pub raw_events: usize,
}

/// Whether the child group has any state on this node already.
pub fn child_exists(engine: &Engine, child_group: u32) -> Result<bool, StorageError> {
    Ok(engine.db().get_pinned_cf(engine.cf(CF_STATE)?, keys::tagged(child_group, keys::STATE_APPLIED))?.is_some())
}

/// Adds to `batch` everything a split writes besides the parent's applied
/// id (see the module docs). `parent_moved` is the parent's record with
/// the range already added. With `seed_child` false (the child already has
/// state here) the parent's keys are only deleted. Blocking.
#[allow(clippy::too_many_arguments)]
pub fn split_batch(
    engine: &Engine,
    parent_group: u32,
    child_group: u32,
    range: &MovedRange,
    parent_moved: &MovedEntities,
    parent_membership: &StoredMembership,
    seed_child: bool,
    batch: &mut WriteBatch,
) -> Result<Moved, StorageError> {
    let mut moved = Moved::default();
    let state_cf = engine.cf(CF_STATE)?;
    let counts_cf = engine.cf(CF_COUNTS)?;
    let uniques_cf = engine.cf(CF_UNIQUES)?;
    let rank = super::write_back::ranking_index();
    // Counts: the entity-first layout names the entity; the ranking index
    // is derived from it (`keys.rs`) and moves with it.
    for_each_in_group(engine, CF_COUNTS, parent_group, |key, value| {
        let Some(parts) = keys::parse_counts_key(key) else { return Ok(()) };
        if !range.contains(parts.entity_id) {
            return Ok(());
        }
        batch.delete_cf(counts_cf, key);
        if let Some(ranked) = keys::ranking_key_of(parent_group, key) {
            batch.delete_cf(counts_cf, ranked);
        }
        if seed_child {
            let child_key = regroup(key, child_group);
            if rank {
                if let Some(ranked) = keys::ranking_key_of(child_group, &child_key) {
                    batch.put_cf(counts_cf, ranked, value);
                }
            }
            batch.put_cf(counts_cf, child_key, value);
        }
        moved.buckets += 1;
        Ok(())
    })?;
    for_each_in_group(engine, CF_UNIQUES, parent_group, |key, value| {
        let Some(parts) = keys::parse_counts_key(key) else { return Ok(()) };
        if !range.contains(parts.entity_id) {
            return Ok(());
        }
        batch.delete_cf(uniques_cf, key);
        if seed_child {
            batch.put_cf(uniques_cf, regroup(key, child_group), value);
        }
        moved.sketches += 1;
        Ok(())
    })?;
    batch.put_cf(state_cf, keys::tagged(parent_group, keys::STATE_MOVED), encode(parent_moved)?);
    // Raw events: each entry's records of the range leave the parent.
    let from = keys::tagged(parent_group, keys::STATE_RAW_EVENTS);
    let to = keys::tagged(parent_group, keys::STATE_RAW_EVENTS + 1);
    for_each_between(engine, CF_STATE, &from, &to, |key, value| {
        let records: Vec<RawRecord> = decode(value)?;
        let (leaving, staying): (Vec<RawRecord>, Vec<RawRecord>) =
            records.into_iter().partition(|r| range.contains(&r.entity_id));
        if leaving.is_empty() {
            return Ok(());
        }
        if staying.is_empty() {
            batch.delete_cf(state_cf, key);
        } else {
            batch.put_cf(state_cf, key, encode(&staying)?);
        }
        if seed_child {
            batch.put_cf(state_cf, regroup(key, child_group), encode(&leaving)?);
        }
        moved.raw_events += leaving.len();
        Ok(())
    })?;
    if !seed_child {
        return Ok(moved);
    }
    // The dedup window, whole.
    let from = keys::tagged(parent_group, keys::STATE_DEDUP);
    let to = keys::tagged(parent_group, keys::STATE_DEDUP + 1);
    for_each_between(engine, CF_STATE, &from, &to, |key, value| {
        batch.put_cf(state_cf, regroup(key, child_group), value);
        moved.dedup_batches += 1;
        Ok(())
    })?;
    // The raw log's dropped counter goes along: some of what it dropped may
    // have been the range's, and an audit says so.
    for tag in [keys::STATE_LOG_CLOCK, keys::STATE_FLOORS, keys::STATE_ARCHIVE, keys::STATE_RAW_EVENTS_DROPPED] {
        if let Some(value) = engine.db().get_pinned_cf(state_cf, keys::tagged(parent_group, tag))? {
            batch.put_cf(state_cf, keys::tagged(child_group, tag), &*value);
        }
    }
    batch.put_cf(state_cf, keys::tagged(child_group, keys::STATE_MOVED), encode(&parent_moved.inherited_by(range))?);
    let initial = initial_log_id();
    batch.put_cf(state_cf, keys::tagged(child_group, keys::STATE_APPLIED), encode(&Some(initial))?);
    batch.put_cf(
        state_cf,
        keys::tagged(child_group, keys::STATE_MEMBERSHIP),
        encode(&child_membership(parent_membership)?)?,
    );
    let raft_cf = engine.cf(CF_RAFT)?;
    batch.put_cf(raft_cf, keys::tagged(child_group, keys::RAFT_PURGED), encode(&initial)?);
    batch.put_cf(raft_cf, keys::tagged(child_group, keys::RAFT_COMMITTED), encode(&Some(initial))?);
    Ok(moved)
}

/// The same key under another group id.
fn regroup(key: &[u8], group: u32) -> Vec<u8> {
    let mut k = key.to_vec();
    if let Some(prefix) = k.get_mut(..4) {
        prefix.copy_from_slice(&keys::group_prefix(group));
    }
    k
}

fn for_each_in_group(
    engine: &Engine,
    cf: &str,
    group: u32,
    f: impl FnMut(&[u8], &[u8]) -> Result<(), StorageError>,
) -> Result<(), StorageError> {
    for_each_between(engine, cf, &keys::group_prefix(group), &keys::group_end(group), f)
}

fn for_each_between(
    engine: &Engine,
    cf: &str,
    from: &[u8],
    to: &[u8],
    mut f: impl FnMut(&[u8], &[u8]) -> Result<(), StorageError>,
) -> Result<(), StorageError> {
    let mut opts = ReadOptions::default();
    opts.set_iterate_upper_bound(to.to_vec());
    for item in engine.db().iterator_cf_opt(engine.cf(cf)?, opts, IteratorMode::From(from, Direction::Forward)) {
        let (key, value) = item?;
        f(&key, &value)?;
    }
    Ok(())
}

/// Whether this node may open the child group of a split of `parent_group`:
/// once the child has state here; or once the parent here is past the
/// split without having seeded it (it installed a later snapshot; the child
/// then starts empty and gets a snapshot); or when no replica of the parent
/// is here at all (`parent_open` false and no state of it on disk). Not
/// while a parent replica here has yet to apply the split: opening the
/// child then would put a group under the state the split writes.
/// Blocking.
pub fn child_ready(engine: &Engine, parent_group: u32, child: u32, parent_open: bool) -> Result<bool, StorageError> {
    let child_group = tally_proto::partition::group_of_partition(child);
    if child_exists(engine, child_group)? {
        return Ok(true);
    }
    let state_cf = engine.cf(CF_STATE)?;
    let parent_on_disk =
        engine.db().get_pinned_cf(state_cf, keys::tagged(parent_group, keys::STATE_APPLIED))?.is_some();
    if !parent_open && !parent_on_disk {
        return Ok(true);
    }
    let Some(bytes) = engine.db().get_pinned_cf(state_cf, keys::tagged(parent_group, keys::STATE_MOVED))? else {
        return Ok(false);
    };
    let moved: MovedEntities = decode(&bytes)?;
    Ok(moved.ranges.iter().any(|r| r.to == child))
}
