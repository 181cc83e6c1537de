//! TopK of one partition: the k entities with the highest count (or sum) of
//! one event type over an hour-aligned range.
//!
//! **Why it is exact.** The range is tiled by the fewest kept hour, day,
//! month and year buckets (`decompose_kept` from hours; the coordinator
//! tiles once for every partition, so all rank the same range). The
//! ranking index (`keys.rs`) holds, for each of those buckets,
//! every entity's count and sum under one prefix, written in the same
//! checkpoint batch as the counts themselves; memory adds what is not yet
//! checkpointed, under the same snapshot rule as every other read
//! (`write_back.rs`). Summing each entity over the pieces gives its exact
//! total over the range — the same number `Stats` answers — for *every*
//! entity with events there, and the k largest of those are the answer. No
//! sketch, no candidate list that could miss an entity.
//!
//! The cost is one range scan per piece, proportional to the entities with
//! events in the range: a day of 1M entities over 16 partitions is ~62,000
//! index entries per partition.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;

use rocksdb::{Direction, IteratorMode, ReadOptions};
use tally_proto::time::Granularity;

use super::counts::CountSum;
use super::keys::{self, CF_COUNTS};
use super::read::{all_kept, disk_applied, disk_floors};
use super::write_back::WriteBack;
use super::{Engine, StorageError};

/// What TopK ranks by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RankBy {
    Count,
    Sum,
}

/// Highest first by `by`, then entity id ascending: a total order, so
/// every node and every merge ranks the same entities the same way.
pub fn rank_order(by: RankBy, a: &(Vec<u8>, CountSum), b: &(Vec<u8>, CountSum)) -> Ordering {
    let by_value = match by {
        RankBy::Count => b.1.count.cmp(&a.1.count),
        RankBy::Sum => b.1.sum.cmp(&a.1.sum),
    };
    by_value.then_with(|| a.0.cmp(&b.0))
}

/// The `k` best of `entries` in rank order.
pub fn best_k(mut entries: Vec<(Vec<u8>, CountSum)>, k: usize, by: RankBy) -> Vec<(Vec<u8>, CountSum)> {
    if entries.len() > k && k > 0 {
        entries.select_nth_unstable_by(k - 1, |a, b| rank_order(by, a, b));
        entries.truncate(k);
    }
    entries.sort_unstable_by(|a, b| rank_order(by, a, b));
    entries.truncate(k);
    entries
}

/// The `k` best entities of `event_type` over the buckets `tiling` (hour
/// or coarser, as `decompose_kept` gives them) in this group. Fails with
/// [`StorageError::FloorsMoved`] when the group no longer keeps one of
/// them: the coordinator tiled with the policy's floors, and this group's
/// rose past them (a shortened retention); the caller retries.
pub async fn read_top_k(
    engine: &Arc<Engine>,
    write_back: &WriteBack,
    event_type: &str,
    tiling: &[(Granularity, i64)],
    k: usize,
    by: RankBy,
) -> Result<Vec<(Vec<u8>, CountSum)>, StorageError> {
    let group = write_back.group();
    let kept: Vec<(Granularity, i64)> = tiling.to_vec();
    let mut pieces: Vec<(u8, u64)> =
        tiling.iter().filter_map(|(g, start)| Some((g.as_u8(), u64::try_from(*start).ok()?))).collect();
    pieces.sort_unstable();
    let prefixes: Vec<Vec<u8>> = pieces
        .iter()
        .map(|(g, start)| keys::ranking_prefix(group, event_type.as_bytes(), *g, *start))
        .collect::<Option<_>>()
        .ok_or_else(|| StorageError::Key(keys::KeyError::TypeTooLong(event_type.len())))?;
    let (floors, overlay) = write_back.ranking_overlay(event_type.as_bytes(), &pieces);
    if !all_kept(&floors, &kept) {
        return Err(StorageError::FloorsMoved);
    }
    engine
        .blocking(move |engine| {
            let db = engine.db();
            let snap = db.snapshot();
            let on_disk = disk_applied(engine, &snap, group)?;
            if !all_kept(&disk_floors(engine, &snap, group)?, &kept) {
                return Err(StorageError::FloorsMoved);
            }
            let mut totals: HashMap<Vec<u8>, CountSum> = HashMap::new();
            for prefix in &prefixes {
                let mut opts = ReadOptions::default();
                opts.set_snapshot(&snap);
                let iter =
                    snap.iterator_cf_opt(engine.cf(CF_COUNTS)?, opts, IteratorMode::From(prefix, Direction::Forward));
                for item in iter {
                    let (key, value) = item?;
                    if !key.starts_with(prefix) {
                        break;
                    }
                    if let Some(entity) = keys::entity_of_ranking_key(&key, prefix) {
                        let slot = totals.entry(entity.to_vec()).or_default();
                        *slot = slot.add(CountSum::decode(&value));
                    }
                }
            }
            for (upto, deltas) in overlay {
                if upto > on_disk {
                    for (entity, delta) in deltas {
                        let slot = totals.entry(entity).or_default();
                        *slot = slot.add(delta);
                    }
                }
            }
            Ok(best_k(totals.into_iter().collect(), k, by))
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, count: u64, sum: i128) -> (Vec<u8>, CountSum) {
        (name.as_bytes().to_vec(), CountSum { count, sum })
    }

    #[test]
    fn best_k_ranks_by_value_then_entity() {
        let all = vec![entry("c", 5, 1), entry("a", 5, 9), entry("b", 7, -3), entry("d", 1, 100)];
        let by_count: Vec<_> = best_k(all.clone(), 3, RankBy::Count).into_iter().map(|e| e.0).collect();
        assert_eq!(by_count, vec![b"b".to_vec(), b"a".to_vec(), b"c".to_vec()]);
        let by_sum: Vec<_> = best_k(all.clone(), 2, RankBy::Sum).into_iter().map(|e| e.0).collect();
        assert_eq!(by_sum, vec![b"d".to_vec(), b"a".to_vec()]);
        assert_eq!(best_k(all, 10, RankBy::Count).len(), 4);
    }
}
