//! The commands Tally replicates through the Raft logs, and what applying
//! one answers.
//!
//! Below both the Raft plumbing (`raft/`, which carries them without
//! looking inside) and the state machine (`storage/`, which applies them):
//! counting types live here, not in `raft/`.

use std::fmt;

use serde::{Deserialize, Serialize};

use tally_proto::time::Floors;

use crate::archive_manifest::ArchiveSegment;
use crate::meta::{ClusterMap, IngestPolicy, LogBounds};
use crate::moved::MovedRange;
use crate::retention::RetentionPolicy;

/// Estimated encoded bytes of one ingest entry at most. The processor stops
/// adding requests to an entry at this size (one request alone — at most
/// 10,000 events and 4 MiB — always fits), and AppendEntries carry at most
/// `network::MAX_APPEND_BYTES`, well below what a peer decodes: an entry can
/// never be too big to replicate.
pub const MAX_ENTRY_BYTES: usize = 8 << 20;

/// A replicated command. Entries are per batch, never per event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Command {
    /// Pre-aggregated events of one partition (partition groups only).
    Ingest(IngestBatch),
    /// Replace the cluster map (metadata group only).
    SetClusterMap(ClusterMap),
    /// Replace the ingest policy (metadata group only). After the variants
    /// above, so entries written before it existed still decode.
    SetIngestPolicy(IngestPolicy),
    /// Replace the retention policy (metadata group only).
    SetRetention(RetentionPolicy),
    /// Raise the partition's floors (partition groups only): buckets below
    /// them expire on every replica at this entry (`retention.rs`). Floors
    /// lower than the ones in force change nothing.
    Expire(Floors),
    /// Refuse, from this entry on, every delta of a minute before
    /// `below_ms` (partition groups only): its buckets are about to be
    /// archived (`storage/archive_manifest.rs`).
    Seal { below_ms: i64 },
    /// A sealed range is in the archive: append it to the manifest.
    Archived(ArchiveSegment),
    /// Stop counting the entity's events from `from_ms` on (partition
    /// groups only, the entity's home): it is being spread (`moved.rs`).
    /// Apply fixes the actual start, never before a minute already counted,
    /// and answers it in `CommandOutcome::spread_from_ms`.
    Spread { entity_id: Vec<u8>, from_ms: i64 },
    /// Split the range's entities off into the partition `range.to`
    /// (partition groups only, the range's owner): at this entry every
    /// replica moves their state into the new partition's group and counts
    /// none of their events from then on (`moved.rs`,
    /// `storage/split.rs`). Answers the new group's voters in
    /// `CommandOutcome::split_voters`.
    Split(MovedRange),
}

/// What the leader commits for a group of coalesced ingest requests: the
/// aggregated deltas, and for every event that carried an event_id its dedup
/// key and what it contributed — so the state machine, not only the leader,
/// decides what counts (see `KeyedEvent`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct IngestBatch {
    /// Leader's (cluster-checked) wall clock when proposed. It stamps the
    /// dedup keys, so every replica expires them at the same log position.
    /// The state machine never lets it go below an earlier entry's stamp.
    pub proposed_at_ms: u64,
    /// The leader's dedup window; keys stamped before stamp − window expire
    /// when this entry is applied.
    pub dedup_window_ms: u64,
    /// Per (entity, type, minute) totals of the events the leader accepted,
    /// keyed and keyless alike.
    pub deltas: Vec<MinuteDelta>,
    /// One per accepted event with an event_id, in the order of the leader's
    /// reply bookkeeping.
    pub keyed: Vec<KeyedEvent>,
    /// Proposed before the leader's dedup view was complete (entries of
    /// earlier terms not yet applied, processor.rs rule 1): keys that apply
    /// finds already counted are expected here, not a conflict.
    pub provisional: bool,
    /// Events of these requests that were rejected (by the leader for their
    /// time, or by validation), for the partition's dead-letter log.
    pub dead_letters: Vec<DeadLetter>,
    /// The bounds of the dead-letter log in force when proposed: apply trims
    /// by the entry's bounds, so every replica keeps the same records.
    pub dead_letter_bounds: LogBounds,
    /// The accepted events as they arrived, when the raw-event log is on
    /// (empty otherwise), for `tally audit` to recount.
    pub raw_events: Vec<RawEvent>,
    pub raw_event_bounds: LogBounds,
}

/// An accepted event for the raw-event log: its delta gives entity and type.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RawEvent {
    /// Index into `IngestBatch::deltas`.
    pub delta: u32,
    /// Its position in `IngestBatch::keyed`, if it has an event_id: apply
    /// leaves out an event it takes back out of the counts.
    pub keyed: Option<u32>,
    pub event_time_ms: i64,
    pub value: Option<i64>,
    pub event_id: Vec<u8>,
    pub actor_id: Vec<u8>,
}

/// A counted event as the raw-event log keeps it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RawRecord {
    pub entity_id: Vec<u8>,
    pub event_type: String,
    pub event_time_ms: i64,
    pub value: Option<i64>,
    pub event_id: Vec<u8>,
    pub actor_id: Vec<u8>,
}

/// Why an event went to the dead-letter log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// Older than the allowed lateness: the limit it crossed.
    TooLate { limit_ms: i64 },
    /// Further ahead than the allowed skew.
    InFuture { limit_ms: i64 },
    /// A field failed validation.
    Invalid { field: String, reason: String },
}

/// A rejected event as it arrived (long fields cut, see `truncated`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeadLetter {
    pub entity_id: Vec<u8>,
    pub event_type: String,
    pub event_time_ms: i64,
    pub event_id: Vec<u8>,
    pub value: Option<i64>,
    pub actor_id: Vec<u8>,
    pub reason: DeadLetterReason,
    /// A field was longer than [`DEAD_LETTER_FIELD_BYTES`] and was cut.
    pub truncated: bool,
}

/// Longest field a dead letter keeps: an invalid event may carry a huge
/// one, and the log is bounded by records, so each record is bounded too.
pub const DEAD_LETTER_FIELD_BYTES: usize = 4096;

impl DeadLetter {
    /// The record of `event`, rejected for `reason`.
    pub fn of(event: &tally_proto::v1::Event, reason: DeadLetterReason) -> DeadLetter {
        let mut truncated = false;
        let mut cut = |bytes: &[u8]| {
            truncated |= bytes.len() > DEAD_LETTER_FIELD_BYTES;
            bytes[..bytes.len().min(DEAD_LETTER_FIELD_BYTES)].to_vec()
        };
        let (entity_id, event_id, actor_id) = (cut(&event.entity_id), cut(&event.event_id), cut(&event.actor_id));
        let mut event_type = event.event_type.clone();
        if event_type.len() > DEAD_LETTER_FIELD_BYTES {
            let mut end = DEAD_LETTER_FIELD_BYTES;
            while !event_type.is_char_boundary(end) {
                end -= 1;
            }
            event_type.truncate(end);
            truncated = true;
        }
        DeadLetter {
            entity_id,
            event_type,
            event_time_ms: event.event_time_ms,
            event_id,
            value: event.value,
            actor_id,
            reason,
            truncated,
        }
    }

    /// Upper estimate of its encoded size.
    pub fn estimated_bytes(&self) -> usize {
        let reason = match &self.reason {
            DeadLetterReason::Invalid { field, reason } => field.len() + reason.len(),
            _ => 0,
        };
        64 + self.entity_id.len() + self.event_type.len() + self.event_id.len() + self.actor_id.len() + reason
    }
}

/// An accepted event with an idempotency key. At apply, an event whose key
/// is already in the dedup index (or earlier in the same entry) is taken
/// back out of its delta — deterministically on every replica — so a leader
/// whose dedup view was incomplete costs a wrong "accepted" at worst, never
/// a count.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyedEvent {
    /// 128-bit hash of (entity, type, event_id).
    pub key: u128,
    /// Index into `IngestBatch::deltas` of the delta that counts it.
    pub delta: u32,
    /// Its value (also included in that delta's sum).
    pub value: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MinuteDelta {
    pub entity_id: Vec<u8>,
    pub event_type: String,
    /// Start of the minute, ms since epoch.
    pub minute_ms: i64,
    pub count: u64,
    /// Exact: i64 values summed in 128 bits never overflow.
    pub sum: i128,
    /// Hashes of the distinct actor ids of its events (`sketch::actor_hash`),
    /// for the buckets' unique-actor sketches. An event apply finds already
    /// counted leaves its actor here: a sketch is a set, and a duplicate's
    /// actor is its original's.
    pub actors: Vec<u64>,
}

/// The state machine's answer to one applied command.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CommandOutcome {
    /// Positions in `IngestBatch::keyed` of events the state machine did not
    /// count because their key was already counted. Always empty when the
    /// leader's dedup argument holds; the leader reports them as duplicates,
    /// and every node counts them (`dedup_conflicts`) so a violation is seen.
    pub skipped: Vec<u32>,
    /// Indexes in `IngestBatch::deltas` of deltas not counted because their
    /// minute is sealed for the archive (an entry built before the leader
    /// saw the seal): the leader answers their events TOO_LATE.
    pub sealed: Vec<u32>,
    /// Indexes in `IngestBatch::deltas` of deltas not counted because their
    /// entity was spread away from this partition (an entry built before
    /// the leader saw the spread): the leader answers their events "moved".
    pub moved: Vec<u32>,
    /// For `Command::Spread`: the `from_ms` in force.
    pub spread_from_ms: Option<i64>,
    /// For `Command::Split`: the voters the new partition's group starts
    /// with (the parent's at the split).
    #[serde(default)]
    pub split_voters: Option<Vec<u64>>,
}

impl Command {
    /// Upper estimate of the encoded size, without encoding (the network
    /// layer cuts AppendEntries by it).
    pub fn estimated_bytes(&self) -> usize {
        match self {
            Command::Ingest(b) => {
                64 + b
                    .deltas
                    .iter()
                    .map(|d| d.entity_id.len() + d.event_type.len() + 48 + 10 * d.actors.len())
                    .sum::<usize>()
                    + b.keyed.len() * 32
                    + b.dead_letters.iter().map(DeadLetter::estimated_bytes).sum::<usize>()
                    + b.raw_events.iter().map(|r| 32 + r.event_id.len() + r.actor_id.len()).sum::<usize>()
            }
            Command::SetClusterMap(m) => {
                64 + m.replicas.iter().map(|r| 8 + 10 * r.len()).sum::<usize>() + m.nodes.len() * 128
            }
            Command::SetIngestPolicy(_) | Command::SetRetention(_) | Command::Expire(_) | Command::Seal { .. } => 64,
            Command::Archived(segment) => 64 + segment.path.len(),
            Command::Spread { entity_id, .. } => 64 + entity_id.len(),
            Command::Split(_) => 64,
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Ingest(b) => write!(
                f,
                "Ingest({} deltas, {} keys, {} dead letters)",
                b.deltas.len(),
                b.keyed.len(),
                b.dead_letters.len()
            ),
            Command::SetClusterMap(m) => write!(f, "SetClusterMap(v{})", m.version),
            Command::SetIngestPolicy(p) => write!(f, "SetIngestPolicy({p:?})"),
            Command::SetRetention(p) => write!(f, "SetRetention({p:?})"),
            Command::Expire(floors) => write!(f, "Expire({floors:?})"),
            Command::Seal { below_ms } => write!(f, "Seal(below {below_ms})"),
            Command::Archived(segment) => write!(f, "Archived(upto {}, {})", segment.upto_ms, segment.path),
            Command::Spread { entity_id, from_ms } => {
                write!(f, "Spread({}, from {from_ms})", String::from_utf8_lossy(entity_id))
            }
            Command::Split(range) => write!(f, "Split({range:?})"),
        }
    }
}

impl fmt::Display for CommandOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CommandOutcome(skipped={}, sealed={}, moved={})",
            self.skipped.len(),
            self.sealed.len(),
            self.moved.len()
        )
    }
}
