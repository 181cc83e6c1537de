//! Key layout of the node's single RocksDB.
//!
//! Every key starts with the 4-byte big-endian Raft group id, so one group's
//! data is one contiguous range per column family: a snapshot is a range
//! scan, dropping a group's state is a range delete, and groups never see
//! each other's keys. Integers are big-endian so byte order is numeric order.
//!
//! | column family | key                                             | value |
//! |---------------|-------------------------------------------------|-------|
//! | `log`         | group, index                                    | Raft entry |
//! | `raft`        | group, tag (vote / committed / last purged)     | encoded log id or vote |
//! | `state`       | group, tag, …                                   | applied log id, membership, cluster map, dedup keys, dead letters |
//! | `counts`      | group, entity len, entity, type len, type, granularity, bucket start | count and sum (merge operator) |
//! | `counts`      | group, [`RANKING_TAG`], type len, type, granularity, bucket start, entity len, entity | the same count and sum, for hour, day, month and year buckets |
//! | `uniques`     | as the first `counts` layout                    | HyperLogLog sketch of the bucket's actors (`sketch.rs`; merge operator: union) |
//!
//! The second `counts` layout is the ranking index TopK reads: the same
//! buckets ordered by (type, bucket) first, so every entity's share of one
//! bucket is one range scan. It is derived from the first at checkpoint
//! (`write_back.rs`) in the same batch, so it travels in snapshots, digests
//! and group deletes with the counts and never disagrees with them. Its tag
//! cannot begin an entity key: entity lengths stay below `0xFF00`.

use tally_proto::time::Granularity;

pub const CF_LOG: &str = "log";
pub const CF_RAFT: &str = "raft";
pub const CF_STATE: &str = "state";
pub const CF_COUNTS: &str = "counts";
/// Unique-actor sketches, keyed like the counts (first layout).
pub const CF_UNIQUES: &str = "uniques";

pub const RAFT_VOTE: u8 = 1;
pub const RAFT_COMMITTED: u8 = 2;
pub const RAFT_PURGED: u8 = 3;

pub const STATE_APPLIED: u8 = 1;
pub const STATE_MEMBERSHIP: u8 = 2;
pub const STATE_CLUSTER_MAP: u8 = 3;
/// Present while a snapshot is being installed: state of the group is then
/// incomplete and must be discarded if the node restarts.
pub const STATE_INSTALLING: u8 = 4;
/// Dedup keys of one applied batch: tag, stamp (8), log index (8).
pub const STATE_DEDUP: u8 = 5;
/// The log's clock: the highest dedup stamp applied (u64).
pub const STATE_LOG_CLOCK: u8 = 6;
/// Events skipped at apply because their key was already counted (u64).
pub const STATE_CONFLICTS: u8 = 7;
/// The ingest policy (metadata group only).
pub const STATE_INGEST_POLICY: u8 = 8;
/// The retention policy (metadata group only).
pub const STATE_RETENTION: u8 = 9;
/// Where each granularity's kept buckets begin (partition groups; see
/// `retention.rs`).
pub const STATE_FLOORS: u8 = 10;
/// Dead letters of one applied entry: tag, stamp (8), log index (8)
/// (`entry_log.rs`).
pub const STATE_DEAD_LETTERS: u8 = 11;
/// Dead letters dropped because the log was full (u64).
pub const STATE_DEAD_LETTERS_DROPPED: u8 = 12;
/// Raw events of one applied entry: tag, stamp (8), log index (8).
pub const STATE_RAW_EVENTS: u8 = 13;
/// Raw events dropped because the log was full (u64).
pub const STATE_RAW_EVENTS_DROPPED: u8 = 14;
/// The partition's archive manifest (`archive_manifest.rs`).
pub const STATE_ARCHIVE: u8 = 15;
/// Entities spread away from the partition, and its latest counted minute
/// (`moved.rs`).
pub const STATE_MOVED: u8 = 16;
/// The last tag of the replicated partition state a digest covers.
pub const STATE_LAST_DIGESTED: u8 = STATE_MOVED;

/// A value the key layout cannot represent. Validation keeps requests far
/// inside these limits; the encoder refuses rather than truncate a length
/// prefix into a key that aliases another series.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("entity_id is {0} bytes; keys hold at most {max}", max = MAX_KEY_ENTITY_LEN)]
    EntityTooLong(usize),
    #[error("event_type is {0} bytes; keys hold at most {max}", max = u8::MAX)]
    TypeTooLong(usize),
    #[error("bucket start {0} ms is before the epoch")]
    NegativeTime(i64),
}

/// First byte after the group id of a ranking-index key.
pub const RANKING_TAG: u8 = 0xFF;
/// Longest entity id a key holds: its u16 length never starts with
/// [`RANKING_TAG`].
const MAX_KEY_ENTITY_LEN: usize = 0xFEFF;

pub fn group_prefix(group: u32) -> [u8; 4] {
    group.to_be_bytes()
}

/// First key after every key of `group`.
pub fn group_end(group: u32) -> [u8; 4] {
    // Group ids stay far below u32::MAX (at most MAX_PARTITIONS + 1).
    group.saturating_add(1).to_be_bytes()
}

pub fn log_key(group: u32, index: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&group.to_be_bytes());
    k[4..].copy_from_slice(&index.to_be_bytes());
    k
}

pub fn log_index_of(key: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = key.get(4..12)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

pub fn tagged(group: u32, tag: u8) -> [u8; 5] {
    let mut k = [0u8; 5];
    k[..4].copy_from_slice(&group.to_be_bytes());
    k[4] = tag;
    k
}

pub fn dedup_key(group: u32, proposed_at_ms: u64, log_index: u64) -> [u8; 21] {
    stamped_key(group, STATE_DEDUP, proposed_at_ms, log_index)
}

/// A state key of one applied entry's records, in log order (stamps never
/// go back): tag, the entry's stamp, its log index.
pub fn stamped_key(group: u32, tag: u8, stamp_ms: u64, log_index: u64) -> [u8; 21] {
    let mut k = [0u8; 21];
    k[..5].copy_from_slice(&tagged(group, tag));
    k[5..13].copy_from_slice(&stamp_ms.to_be_bytes());
    k[13..].copy_from_slice(&log_index.to_be_bytes());
    k
}

pub fn dedup_stamp_of(key: &[u8]) -> Option<(u64, u64)> {
    let at: [u8; 8] = key.get(5..13)?.try_into().ok()?;
    let idx: [u8; 8] = key.get(13..21)?.try_into().ok()?;
    Some((u64::from_be_bytes(at), u64::from_be_bytes(idx)))
}

/// Prefix of every counts key of one (entity, type, granularity) series.
pub fn series_prefix(
    group: u32,
    entity_id: &[u8],
    event_type: &str,
    granularity: Granularity,
) -> Result<Vec<u8>, KeyError> {
    if entity_id.len() > MAX_KEY_ENTITY_LEN {
        return Err(KeyError::EntityTooLong(entity_id.len()));
    }
    let entity_len = u16::try_from(entity_id.len()).map_err(|_| KeyError::EntityTooLong(entity_id.len()))?;
    let type_len = u8::try_from(event_type.len()).map_err(|_| KeyError::TypeTooLong(event_type.len()))?;
    let mut k = Vec::with_capacity(4 + 2 + entity_id.len() + 1 + event_type.len() + 1 + 8);
    k.extend_from_slice(&group.to_be_bytes());
    k.extend_from_slice(&entity_len.to_be_bytes());
    k.extend_from_slice(entity_id);
    k.push(type_len);
    k.extend_from_slice(event_type.as_bytes());
    k.push(granularity.as_u8());
    Ok(k)
}

/// The counts key of one bucket in a single allocation (the apply hot path
/// builds several per delta).
pub fn bucket_key(
    group: u32,
    entity_id: &[u8],
    event_type: &str,
    granularity: Granularity,
    bucket_start_ms: i64,
) -> Result<Vec<u8>, KeyError> {
    let start = u64::try_from(bucket_start_ms).map_err(|_| KeyError::NegativeTime(bucket_start_ms))?;
    let mut k = series_prefix(group, entity_id, event_type, granularity)?;
    k.extend_from_slice(&start.to_be_bytes());
    Ok(k)
}

/// A counts key from a series prefix; times before the epoch (only ever a
/// query bound: events are validated to be >= 0) sort as the epoch.
pub fn counts_key(prefix: &[u8], bucket_start_ms: i64) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + 8);
    k.extend_from_slice(prefix);
    k.extend_from_slice(&(bucket_start_ms.max(0) as u64).to_be_bytes());
    k
}

pub fn bucket_of_counts_key(key: &[u8]) -> Option<i64> {
    let tail: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail) as i64)
}

/// The parts of a counts key (the entity-first layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CountsKey<'a> {
    pub entity_id: &'a [u8],
    pub event_type: &'a [u8],
    pub granularity: u8,
    pub bucket_start: u64,
}

/// Splits an entity-first counts key; `None` for a ranking-index key or
/// anything malformed.
pub fn parse_counts_key(key: &[u8]) -> Option<CountsKey<'_>> {
    let rest = key.get(4..)?;
    if rest.first() == Some(&RANKING_TAG) {
        return None;
    }
    let entity_len = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    let entity_id = rest.get(2..2 + entity_len)?;
    let rest = rest.get(2 + entity_len..)?;
    let type_len = *rest.first()? as usize;
    let event_type = rest.get(1..1 + type_len)?;
    let rest = rest.get(1 + type_len..)?;
    let granularity = *rest.first()?;
    let bucket_start = u64::from_be_bytes(rest.get(1..9)?.try_into().ok()?);
    (rest.len() == 9).then_some(CountsKey { entity_id, event_type, granularity, bucket_start })
}

/// The granularity code and bucket start of a counts or ranking-index key.
pub fn bucket_of_any_key(key: &[u8]) -> Option<(u8, u64)> {
    if key.get(4) != Some(&RANKING_TAG) {
        let parts = parse_counts_key(key)?;
        return Some((parts.granularity, parts.bucket_start));
    }
    let type_len = *key.get(5)? as usize;
    let rest = key.get(6 + type_len..)?;
    let granularity = *rest.first()?;
    let bucket_start = u64::from_be_bytes(rest.get(1..9)?.try_into().ok()?);
    Some((granularity, bucket_start))
}

/// Prefix of the ranking-index keys of one (type, granularity, bucket):
/// every entity with events there follows it.
pub fn ranking_prefix(group: u32, event_type: &[u8], granularity: u8, bucket_start: u64) -> Option<Vec<u8>> {
    let type_len = u8::try_from(event_type.len()).ok()?;
    let mut k = Vec::with_capacity(4 + 1 + 1 + event_type.len() + 1 + 8 + 2 + 32);
    k.extend_from_slice(&group.to_be_bytes());
    k.push(RANKING_TAG);
    k.push(type_len);
    k.extend_from_slice(event_type);
    k.push(granularity);
    k.extend_from_slice(&bucket_start.to_be_bytes());
    Some(k)
}

/// The ranking-index key of a counts key, for the granularities TopK reads
/// (hour and coarser); `None` for minute buckets.
pub fn ranking_key_of(group: u32, counts_key: &[u8]) -> Option<Vec<u8>> {
    let parts = parse_counts_key(counts_key)?;
    if parts.granularity <= Granularity::Minute.as_u8() {
        return None;
    }
    let mut k = ranking_prefix(group, parts.event_type, parts.granularity, parts.bucket_start)?;
    k.extend_from_slice(&u16::try_from(parts.entity_id.len()).ok()?.to_be_bytes());
    k.extend_from_slice(parts.entity_id);
    Some(k)
}

/// The entity of a ranking-index key that starts with `prefix`.
pub fn entity_of_ranking_key<'a>(key: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    let rest = key.strip_prefix(prefix)?;
    let len = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    let entity = rest.get(2..)?;
    (entity.len() == len).then_some(entity)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_ranges_do_not_overlap() {
        assert!(log_key(1, u64::MAX).as_slice() < group_end(1).as_slice());
        assert!(group_end(1).as_slice() <= log_key(2, 0).as_slice());
        assert_eq!(group_end(u32::MAX - 1), u32::MAX.to_be_bytes());
    }

    #[test]
    fn counts_keys_sort_by_time_within_a_series() {
        let p = series_prefix(3, b"video", "view", Granularity::Minute).unwrap();
        let a = counts_key(&p, 60_000);
        let b = counts_key(&p, 120_000);
        assert!(a < b);
        assert_eq!(bucket_of_counts_key(&b), Some(120_000));
        // A longer entity id sharing a prefix is a different series.
        let q = series_prefix(3, b"video1", "view", Granularity::Minute).unwrap();
        assert!(!counts_key(&q, 0).starts_with(&p));
    }

    #[test]
    fn the_encoder_refuses_what_its_length_prefixes_cannot_hold() {
        let long_entity = vec![b'x'; 70_000];
        assert_eq!(series_prefix(1, &long_entity, "view", Granularity::Hour), Err(KeyError::EntityTooLong(70_000)));
        let long_type = "t".repeat(300);
        assert_eq!(series_prefix(1, b"e", &long_type, Granularity::Hour), Err(KeyError::TypeTooLong(300)));
        assert_eq!(bucket_key(1, b"e", "view", Granularity::Minute, -60_000), Err(KeyError::NegativeTime(-60_000)));
        assert!(series_prefix(1, &vec![b'x'; 0xFEFF], &"t".repeat(255), Granularity::Day).is_ok());
        // A length that would start with the ranking tag is refused.
        assert_eq!(
            series_prefix(1, &vec![b'x'; 0xFF00], "view", Granularity::Day),
            Err(KeyError::EntityTooLong(0xFF00))
        );
    }

    #[test]
    fn ranking_keys_mirror_hour_and_coarser_counts_keys() {
        let day = bucket_key(7, b"video-1", "view", Granularity::Day, 86_400_000).unwrap();
        let parts = parse_counts_key(&day).unwrap();
        assert_eq!(
            (parts.entity_id, parts.event_type, parts.bucket_start),
            (&b"video-1"[..], &b"view"[..], 86_400_000)
        );
        let ranked = ranking_key_of(7, &day).unwrap();
        let prefix = ranking_prefix(7, b"view", Granularity::Day.as_u8(), 86_400_000).unwrap();
        assert_eq!(entity_of_ranking_key(&ranked, &prefix), Some(&b"video-1"[..]));
        // Inside the group's range, and never parsed as a counts key.
        assert!(ranked.as_slice() >= group_prefix(7).as_slice() && ranked.as_slice() < group_end(7).as_slice());
        assert_eq!(parse_counts_key(&ranked), None);
        // Minutes are not indexed; a longer type is another prefix.
        let minute = bucket_key(7, b"video-1", "view", Granularity::Minute, 60_000).unwrap();
        assert_eq!(ranking_key_of(7, &minute), None);
        assert_eq!(bucket_of_any_key(&day), Some((Granularity::Day.as_u8(), 86_400_000)));
        assert_eq!(bucket_of_any_key(&ranked), Some((Granularity::Day.as_u8(), 86_400_000)));
        let other = ranking_prefix(7, b"views", Granularity::Day.as_u8(), 86_400_000).unwrap();
        assert_eq!(entity_of_ranking_key(&ranked, &other), None);
    }
}
