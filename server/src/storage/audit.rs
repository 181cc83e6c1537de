//! The recount behind `Query.Audit`: one (entity, type)'s events in the
//! partition's raw-event log, summed per minute, against its minute counts.
//!
//! Both come from ONE RocksDB snapshot taken after a checkpoint: a
//! checkpoint writes an epoch's counts and its raw records in the same
//! batch with the applied id, so the snapshot holds both as of one log
//! position and any difference is real, not a race with apply. Minutes
//! below the floors (expired) are not audited. The raw log is read whole
//! (it is bounded by its `max_events`) and filtered: an audit is an
//! operator's check, not a query path.

use std::collections::BTreeMap;
use std::sync::Arc;

use rocksdb::{Direction, IteratorMode, ReadOptions};
use tally_proto::time::{bucket_start, Granularity};

use super::counts::CountSum;
use super::entry_log::{scan_all, RawEvents};
use super::keys::{self, CF_COUNTS};
use super::read::{disk_applied, disk_floors};
use super::write_back::WriteBack;
use super::{Engine, StorageError};

/// What an audit found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditRead {
    /// The minutes audited: `[from, to)` widened to minutes, raised to the
    /// oldest minute kept.
    pub from_ms: i64,
    pub to_ms: i64,
    pub raw_total: CountSum,
    pub counted_total: CountSum,
    /// Minutes whose recount differs: (minute, recount, counts).
    pub differences: Vec<(i64, CountSum, CountSum)>,
    /// The stamp of the oldest entry the raw log holds.
    pub raw_log_from_ms: Option<u64>,
    /// The applied index both were read at.
    pub applied: u64,
}

/// Recount `[from_ms, to_ms)` (minute-aligned by the caller) of one
/// series from the raw log and compare with its minute counts.
pub async fn audit(
    engine: &Arc<Engine>,
    write_back: &Arc<WriteBack>,
    entity_id: &[u8],
    event_type: &str,
    from_ms: i64,
    to_ms: i64,
) -> Result<AuditRead, StorageError> {
    let group = write_back.group();
    let prefix = keys::series_prefix(group, entity_id, event_type, Granularity::Minute)?;
    let (wb, entity_id, event_type) = (write_back.clone(), entity_id.to_vec(), event_type.to_string());
    engine
        .blocking(move |engine| {
            wb.checkpoint(engine, false)?;
            let db = engine.db();
            let snap = db.snapshot();
            let applied = disk_applied(engine, &snap, group)?;
            let floors = disk_floors(engine, &snap, group)?;
            let from_ms = from_ms.max(floors[Granularity::Minute.as_u8() as usize]);
            let to_ms = to_ms.max(from_ms);
            let mut counted: BTreeMap<i64, CountSum> = BTreeMap::new();
            let mut opts = ReadOptions::default();
            opts.set_snapshot(&snap);
            opts.set_iterate_upper_bound(keys::counts_key(&prefix, to_ms));
            let start = keys::counts_key(&prefix, from_ms);
            for item in db.iterator_cf_opt(engine.cf(CF_COUNTS)?, opts, IteratorMode::From(&start, Direction::Forward))
            {
                let (key, value) = item?;
                let Some(minute) = keys::bucket_of_counts_key(&key) else { continue };
                counted.insert(minute, CountSum::decode(&value));
            }
            let in_range = |t: i64| {
                let minute = bucket_start(Granularity::Minute, t);
                minute >= from_ms && minute < to_ms
            };
            let (raw, raw_log_from_ms) = scan_all::<RawEvents>(engine, &snap, group, |r| {
                r.entity_id == entity_id && r.event_type == event_type && in_range(r.event_time_ms)
            })?;
            let mut recount: BTreeMap<i64, CountSum> = BTreeMap::new();
            for r in raw {
                let slot = recount.entry(bucket_start(Granularity::Minute, r.event_time_ms)).or_default();
                *slot = slot.add(CountSum { count: 1, sum: i128::from(r.value.unwrap_or(1)) });
            }
            let mut read = AuditRead { from_ms, to_ms, raw_log_from_ms, applied, ..Default::default() };
            let minutes: std::collections::BTreeSet<i64> = counted.keys().chain(recount.keys()).copied().collect();
            for minute in minutes {
                let (raw, counts) = (
                    recount.get(&minute).copied().unwrap_or_default(),
                    counted.get(&minute).copied().unwrap_or_default(),
                );
                read.raw_total = read.raw_total.add(raw);
                read.counted_total = read.counted_total.add(counts);
                if raw != counts {
                    read.differences.push((minute, raw, counts));
                }
            }
            Ok(read)
        })
        .await
}
