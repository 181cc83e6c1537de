//! Reads of a partition's counts: stats over a range (the fewest kept
//! year/month/day/hour/minute buckets, fetched with one multi-get) and
//! series of one granularity (one range scan).
//!
//! Every read is the disk state of a RocksDB snapshot plus what the group's
//! write-back still holds in memory beyond that snapshot's applied index
//! (see `write_back.rs` for why that is never torn). The public functions
//! are async and run their RocksDB reads on the engine's blocking pool
//! ([`Engine::blocking`]), never on the API's tokio worker.

use std::sync::Arc;

use rocksdb::{Direction, IteratorMode, ReadOptions};
use tally_proto::time::{decompose_kept, is_kept, series_starts, Floors, Granularity, KEEP_ALL};

use super::archive::{ArchiveStore, ArchivedBucket};
use super::codec::decode;
use super::counts::CountSum;
use super::keys::{self, CF_COUNTS, CF_STATE, CF_UNIQUES, STATE_APPLIED, STATE_FLOORS, STATE_LAST_DIGESTED};
use super::sketch::Sketch;
use super::write_back::WriteBack;
use super::{Engine, StorageError};
use crate::archive_manifest::{ArchiveManifest, ArchiveSegment, SharedManifest};
use crate::type_config::LogId;

/// The applied index a RocksDB snapshot holds for `group`.
pub(super) fn disk_applied(engine: &Engine, snap: &rocksdb::Snapshot<'_>, group: u32) -> Result<u64, StorageError> {
    let applied: Option<LogId> = match snap.get_cf(engine.cf(CF_STATE)?, keys::tagged(group, STATE_APPLIED))? {
        Some(v) => decode(&v)?,
        None => None,
    };
    Ok(applied.map(|l| l.index).unwrap_or(0))
}

/// Reads that found the floors raised under them try again this often
/// before giving up ([`StorageError::FloorsMoved`]); floors rise at most
/// once an hour, so a second try practically always succeeds.
const FLOOR_RETRIES: usize = 4;

/// The floors a RocksDB snapshot holds for `group`.
pub(super) fn disk_floors(engine: &Engine, snap: &rocksdb::Snapshot<'_>, group: u32) -> Result<Floors, StorageError> {
    match snap.get_cf(engine.cf(CF_STATE)?, keys::tagged(group, STATE_FLOORS))? {
        Some(v) => Ok(decode(&v)?),
        None => Ok(KEEP_ALL),
    }
}

/// What a Stats read counted.
#[derive(Debug, Clone)]
pub struct StatsRead {
    pub total: CountSum,
    /// The distinct actors of the counted events: merged, and estimated
    /// (`Sketch::estimate`) for the answer.
    pub sketch: Sketch,
    /// The range counted: `[from, to)` widened to whole minutes, or to
    /// whole buckets of `resolution` where minutes (or more) had expired.
    pub from_ms: i64,
    pub to_ms: i64,
    pub resolution: Granularity,
    /// Buckets read from the cold archive.
    pub archive_buckets: u32,
}

/// Where a partition's archived buckets are read: its manifest as applied
/// and this node's archive, if it has one.
#[derive(Clone, Copy)]
pub struct ArchiveAccess<'a> {
    pub manifest: &'a SharedManifest,
    pub store: Option<&'a ArchiveStore>,
}

/// Total over `[from, to)`, tiled by the buckets the group still keeps,
/// and below them (with `archive`) by the buckets its archive holds.
pub async fn read_stats(
    engine: &Arc<Engine>,
    write_back: &WriteBack,
    archive: Option<ArchiveAccess<'_>>,
    entity_id: &[u8],
    event_type: &str,
    from_ms: i64,
    to_ms: i64,
) -> Result<StatsRead, StorageError> {
    let group = write_back.group();
    let prefixes: Vec<Vec<u8>> = Granularity::ALL
        .iter()
        .map(|g| keys::series_prefix(group, entity_id, event_type, *g))
        .collect::<Result<_, _>>()?;
    for _ in 0..FLOOR_RETRIES {
        // Floors first, then the manifest (apply publishes them the other
        // way round): the manifest covers whatever the floors dropped.
        let floors = write_back.floors();
        let manifest = archive.map(|a| a.manifest.get());
        let readable = manifest.as_ref().map_or(floors, |m| m.readable_floors(&floors));
        let tiling = decompose_kept(from_ms, to_ms, &readable, Granularity::Minute);
        let (hot, cold): (Vec<_>, Vec<_>) = tiling.buckets.iter().partition(|(g, start)| is_kept(&floors, *g, *start));
        let keys: Vec<Vec<u8>> =
            hot.iter().map(|(g, start)| keys::counts_key(&prefixes[g.as_u8() as usize], *start)).collect();
        let overlay = write_back.overlay(&keys);
        if overlay.floors != floors {
            continue;
        }
        let mut sketch = Sketch::default();
        write_back.uniques_overlay_each(&keys).iter().flatten().for_each(|s| sketch.merge(s));
        let pieces = hot.clone();
        let found = engine
            .blocking(move |engine| {
                let db = engine.db();
                let snap = db.snapshot();
                let on_disk = disk_applied(engine, &snap, group)?;
                if !all_kept(&disk_floors(engine, &snap, group)?, &pieces) {
                    return Ok(None);
                }
                let mut opts = ReadOptions::default();
                opts.set_snapshot(&snap);
                let mut total = CountSum::default();
                for (i, value) in
                    db.batched_multi_get_cf_opt(engine.cf(CF_COUNTS)?, &keys, false, &opts).into_iter().enumerate()
                {
                    if let Some(v) = value? {
                        total = total.add(CountSum::decode(&v));
                    }
                    total = total.add(overlay.delta(i, on_disk));
                }
                for value in db.batched_multi_get_cf_opt(engine.cf(CF_UNIQUES)?, &keys, false, &opts) {
                    if let Some(on_disk) = value?.as_deref().and_then(Sketch::decode) {
                        sketch.merge(&on_disk);
                    }
                }
                Ok(Some((total, sketch)))
            })
            .await?;
        let Some((mut total, mut sketch)) = found else { continue };
        if let (Some(access), Some(manifest)) = (archive, &manifest) {
            for row in read_archived(access, manifest, entity_id, event_type, &cold).await? {
                total = total.add(row.total);
                if let Some(s) = row.sketch.as_deref().and_then(Sketch::decode) {
                    sketch.merge(&s);
                }
            }
        }
        return Ok(StatsRead {
            total,
            sketch,
            from_ms: tiling.from_ms,
            to_ms: tiling.to_ms,
            resolution: tiling.resolution,
            archive_buckets: cold.len() as u32,
        });
    }
    Err(StorageError::FloorsMoved)
}

/// The archived rows of `wanted` buckets (a bucket not in its file had no
/// events), each segment's file read once.
async fn read_archived(
    access: ArchiveAccess<'_>,
    manifest: &ArchiveManifest,
    entity_id: &[u8],
    event_type: &str,
    wanted: &[(Granularity, i64)],
) -> Result<Vec<ArchivedBucket>, StorageError> {
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let store = access.store.ok_or(StorageError::NoArchive)?;
    // Segments in order of their end: one read of each file.
    let mut by_segment: std::collections::BTreeMap<i64, (&ArchiveSegment, Vec<(u8, i64)>)> = Default::default();
    for &(g, start) in wanted {
        let segment = manifest.segment_of(g, start).ok_or_else(|| {
            StorageError::Archive(format!("no archived segment holds the {} bucket starting at {start} ms", g.name()))
        })?;
        by_segment.entry(segment.upto_ms).or_insert_with(|| (segment, Vec::new())).1.push((g.as_u8(), start));
    }
    let mut found = Vec::new();
    for (segment, mut buckets) in by_segment.into_values() {
        buckets.sort_unstable();
        let rows = store.read(segment, entity_id, event_type).await?;
        found.extend(
            rows.iter().filter(|r| buckets.binary_search(&(r.granularity.as_u8(), r.start_ms)).is_ok()).cloned(),
        );
    }
    Ok(found)
}

/// Whether every bucket of `pieces` is kept under `floors`.
pub(super) fn all_kept(floors: &Floors, pieces: &[(Granularity, i64)]) -> bool {
    pieces.iter().all(|(g, start)| is_kept(floors, *g, *start))
}

/// What a Series read found.
#[derive(Debug, Clone)]
pub enum SeriesRead {
    /// Every bucket of the range, empty ones included: start, count and
    /// sum, the sketch of its distinct actors; and how many came from the
    /// archive.
    Buckets(Vec<(i64, CountSum, Sketch)>, u32),
    /// The range starts before the granularity's oldest bucket kept (or
    /// archived), `first_kept_ms`.
    Expired { first_kept_ms: i64 },
}

/// Buckets of `granularity` covering [from, to), empty ones included.
#[allow(clippy::too_many_arguments)]
pub async fn read_series(
    engine: &Arc<Engine>,
    write_back: &WriteBack,
    archive: Option<ArchiveAccess<'_>>,
    entity_id: &[u8],
    event_type: &str,
    granularity: Granularity,
    from_ms: i64,
    to_ms: i64,
) -> Result<SeriesRead, StorageError> {
    let starts: Vec<i64> = series_starts(granularity, from_ms, to_ms).into_iter().collect();
    let (Some(&first), Some(&last)) = (starts.first(), starts.last()) else {
        return Ok(SeriesRead::Buckets(Vec::new(), 0));
    };
    let group = write_back.group();
    let g = usize::from(granularity.as_u8());
    let prefix = keys::series_prefix(group, entity_id, event_type, granularity)?;
    let bucket_keys: Vec<Vec<u8>> = starts.iter().map(|s| keys::counts_key(&prefix, *s)).collect();
    for _ in 0..FLOOR_RETRIES {
        let overlay = write_back.overlay(&bucket_keys);
        let sketches = write_back.uniques_overlay_each(&bucket_keys);
        let floors = overlay.floors;
        let manifest = archive.map(|a| a.manifest.get());
        let readable = manifest.as_ref().map_or(floors, |m| m.readable_floors(&floors));
        if !is_kept(&readable, granularity, first) {
            return Ok(SeriesRead::Expired { first_kept_ms: readable[g] });
        }
        let first_hot = starts.iter().copied().find(|s| is_kept(&floors, granularity, *s));
        let cold: Vec<(Granularity, i64)> =
            starts.iter().filter(|s| !is_kept(&floors, granularity, **s)).map(|s| (granularity, *s)).collect();
        let prefix = prefix.clone();
        let found = engine
            .blocking(move |engine| {
                let snap = engine.db().snapshot();
                let on_disk = disk_applied(engine, &snap, group)?;
                let Some(first_hot) = first_hot else {
                    return Ok(Some(Default::default()));
                };
                if !is_kept(&disk_floors(engine, &snap, group)?, granularity, first_hot) {
                    return Ok(None);
                }
                let found =
                    scan_series(engine, &snap, CF_COUNTS, &prefix, first_hot, last, |v| Some(CountSum::decode(v)))?;
                let sketches_on_disk =
                    scan_series(engine, &snap, CF_UNIQUES, &prefix, first_hot, last, Sketch::decode)?;
                Ok(Some((found, sketches_on_disk, on_disk)))
            })
            .await?;
        let Some((mut found, mut sketches_on_disk, on_disk)) = found else { continue };
        if let (Some(access), Some(manifest)) = (archive, &manifest) {
            for row in read_archived(access, manifest, entity_id, event_type, &cold).await? {
                found.insert(row.start_ms, row.total);
                if let Some(s) = row.sketch.as_deref().and_then(Sketch::decode) {
                    sketches_on_disk.insert(row.start_ms, s);
                }
            }
        }
        return Ok(SeriesRead::Buckets(
            starts
                .iter()
                .zip(sketches)
                .enumerate()
                .map(|(i, (s, in_memory))| {
                    // Archived buckets are sealed: memory holds nothing for them.
                    let in_memory_total =
                        if is_kept(&floors, granularity, *s) { overlay.delta(i, on_disk) } else { CountSum::default() };
                    let total = found.get(s).copied().unwrap_or_default().add(in_memory_total);
                    let sketch = match (sketches_on_disk.remove(s), in_memory) {
                        (Some(mut disk), Some(memory)) => {
                            disk.merge(&memory);
                            disk
                        }
                        (Some(only), None) => only,
                        (None, Some(only)) => only.clone(),
                        (None, None) => Sketch::default(),
                    };
                    (*s, total, sketch)
                })
                .collect(),
            cold.len() as u32,
        ));
    }
    Err(StorageError::FloorsMoved)
}

/// The buckets of one series in `[first, last]` that `cf` holds in `snap`,
/// decoded by `decode` (a value that does not decode is left out).
fn scan_series<T>(
    engine: &Engine,
    snap: &rocksdb::Snapshot<'_>,
    cf: &str,
    prefix: &[u8],
    first: i64,
    last: i64,
    decode: impl Fn(&[u8]) -> Option<T>,
) -> Result<std::collections::HashMap<i64, T>, StorageError> {
    let mut opts = ReadOptions::default();
    opts.set_snapshot(snap);
    opts.set_iterate_upper_bound(keys::counts_key(prefix, last.saturating_add(1)));
    let from_key = keys::counts_key(prefix, first);
    let mut found = std::collections::HashMap::new();
    for item in snap.iterator_cf_opt(engine.cf(cf)?, opts, IteratorMode::From(&from_key, Direction::Forward)) {
        let (key, value) = item?;
        if !key.starts_with(prefix) {
            break;
        }
        if let (Some(bucket), Some(decoded)) = (keys::bucket_of_counts_key(&key), decode(&value)) {
            found.insert(bucket, decoded);
        }
    }
    Ok(found)
}

/// Digest of a group's replicated state (counts and dedup keys) and the
/// applied index it corresponds to: everything applied is checkpointed
/// first, then read from one RocksDB snapshot.
pub async fn state_digest(engine: &Arc<Engine>, write_back: &Arc<WriteBack>) -> Result<(u64, u64, u64), StorageError> {
    let wb = write_back.clone();
    engine
        .blocking(move |engine| {
            wb.checkpoint(engine, false)?;
            digest(engine, wb.group())
        })
        .await
}

fn digest(engine: &Engine, group: u32) -> Result<(u64, u64, u64), StorageError> {
    use super::keys::STATE_DEDUP;
    let db = engine.db();
    let snap = db.snapshot();
    let applied = disk_applied(engine, &snap, group)?;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut count = 0u64;
    let ranges = [
        (CF_COUNTS, keys::group_prefix(group).to_vec(), keys::group_end(group).to_vec()),
        (CF_UNIQUES, keys::group_prefix(group).to_vec(), keys::group_end(group).to_vec()),
        // Dedup keys, the log clock, the conflict counter, the floors and
        // the dead-letter log.
        (CF_STATE, keys::tagged(group, STATE_DEDUP).to_vec(), keys::tagged(group, STATE_LAST_DIGESTED + 1).to_vec()),
    ];
    for (cf_name, start, end) in ranges {
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(end);
        for item in snap.iterator_cf_opt(engine.cf(cf_name)?, opts, IteratorMode::From(&start, Direction::Forward)) {
            let (key, value) = item?;
            hasher.update(&(key.len() as u32).to_le_bytes());
            hasher.update(&key);
            hasher.update(&(value.len() as u32).to_le_bytes());
            hasher.update(&value);
            count += 1;
        }
    }
    Ok((applied, hasher.digest(), count))
}
