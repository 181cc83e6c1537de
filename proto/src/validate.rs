//! The rules events and queries must satisfy, shared by client and server.
//!
//! The server is the authority and checks everything it receives, but the
//! client runs the same checks before sending so that a bad event is reported
//! at the call site, with the same wording, instead of a round trip later.
//! Keeping the rules in this one crate is what keeps the two from drifting.
//!
//! Every failure is a [`FieldError`] naming the offending field (as spelled in
//! the proto) and a reason written for the person who sent it: what is
//! allowed and what was received. The server copies both into
//! `Rejection.field` / `Rejection.reason`, so these strings are user-facing.
//!
//! Why the limits exist:
//! * entity ids, event types and event ids are parts of storage keys; bounding
//!   them bounds key size, and the small event-type alphabet keeps keys
//!   printable and free of separators.
//! * timestamps before 1970 have no use here, and stopping before year 10000
//!   keeps every bucket start (including month arithmetic and rounding a
//!   range end up to a minute) far from `i64` overflow and printable as a
//!   four-digit year.
//! * batch limits bound the memory and Raft entry size of one request.

use crate::v1::Event;

/// Longest accepted `entity_id`, in bytes.
pub const MAX_ENTITY_ID_BYTES: usize = 256;
/// Longest accepted `actor_id`, in bytes.
pub const MAX_ACTOR_ID_BYTES: usize = 256;
/// Longest accepted `event_type`, in characters (all allowed characters are
/// ASCII, so this is also its length in bytes).
pub const MAX_EVENT_TYPE_CHARS: usize = 64;
/// Longest accepted `event_id`, in bytes. Empty means "no idempotency key".
pub const MAX_EVENT_ID_BYTES: usize = 64;
/// Most events accepted in one ingest batch.
pub const MAX_BATCH_EVENTS: usize = 10_000;
/// Largest accepted encoded ingest batch, in bytes.
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// 10000-01-01T00:00:00Z in milliseconds since the Unix epoch. Event times
/// must be strictly before it; a range end (exclusive) may equal it.
pub const YEAR_10000_START_MS: i64 = 253_402_300_800_000;

/// Why a field of an event or query was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    /// The field's name as spelled in the proto, e.g. `"event_type"`.
    pub field: &'static str,
    /// A sentence for the sender: what is allowed and what was received.
    pub reason: String,
}

impl FieldError {
    fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self { field, reason: reason.into() }
    }
}

/// Checks every field of one event.
pub fn validate_event(event: &Event) -> Result<(), FieldError> {
    validate_entity_id(&event.entity_id)?;
    validate_event_type(&event.event_type)?;
    validate_event_time(event.event_time_ms)?;
    validate_event_id(&event.event_id)?;
    validate_actor_id(&event.actor_id)?;
    Ok(())
}

/// Checks the (entity, event type) key of a query with the same rules as
/// ingestion, so a key that could never have been ingested is reported as
/// invalid rather than answered with zero.
pub fn validate_query_key(entity_id: &[u8], event_type: &str) -> Result<(), FieldError> {
    validate_entity_id(entity_id)?;
    validate_event_type(event_type)
}

/// Most entities one TopK answer may rank.
pub const MAX_TOP_K: u32 = 1_000;

/// Checks a TopK query: its event type as ingestion would, its range as
/// any query's, and `1 <= k <= MAX_TOP_K`.
pub fn validate_top_k(event_type: &str, from_ms: i64, to_ms: i64, k: u32) -> Result<(), FieldError> {
    validate_event_type(event_type)?;
    validate_range(from_ms, to_ms)?;
    if k == 0 || k > MAX_TOP_K {
        return Err(FieldError::new("k", format!("must be 1 to {MAX_TOP_K}, got {k}")));
    }
    Ok(())
}

/// Checks a query's `[from_ms, to_ms)` range: it must start at or after the
/// epoch, be non-empty, and end no later than the start of year 10000.
pub fn validate_range(from_ms: i64, to_ms: i64) -> Result<(), FieldError> {
    if from_ms < 0 {
        return Err(FieldError::new("from_ms", format!("must be 0 (1970-01-01T00:00:00Z) or later, got {from_ms}")));
    }
    if to_ms <= from_ms {
        return Err(FieldError::new("to_ms", format!("must be greater than from_ms ({from_ms}), got {to_ms}")));
    }
    if to_ms > YEAR_10000_START_MS {
        return Err(FieldError::new(
            "to_ms",
            format!("must be at most {YEAR_10000_START_MS} (the start of year 10000), got {to_ms}"),
        ));
    }
    Ok(())
}

pub fn validate_entity_id(entity_id: &[u8]) -> Result<(), FieldError> {
    let len = entity_id.len();
    if len == 0 || len > MAX_ENTITY_ID_BYTES {
        return Err(FieldError::new("entity_id", format!("must be 1 to {MAX_ENTITY_ID_BYTES} bytes, got {len}")));
    }
    Ok(())
}

fn validate_event_type(event_type: &str) -> Result<(), FieldError> {
    let chars = event_type.chars().count();
    if chars == 0 || chars > MAX_EVENT_TYPE_CHARS {
        return Err(FieldError::new(
            "event_type",
            format!("must be 1 to {MAX_EVENT_TYPE_CHARS} characters, got {chars}"),
        ));
    }
    let first_disallowed = event_type.chars().enumerate().find(|&(_, c)| !is_event_type_char(c));
    if let Some((index, c)) = first_disallowed {
        let position = index + 1;
        return Err(FieldError::new(
            "event_type",
            format!(
                "character {c:?} at position {position} is not allowed; \
                 use only lowercase letters a-z, digits 0-9, '_', '.' and '-'"
            ),
        ));
    }
    Ok(())
}

fn is_event_type_char(c: char) -> bool {
    matches!(c, 'a'..='z' | '0'..='9' | '_' | '.' | '-')
}

fn validate_event_time(event_time_ms: i64) -> Result<(), FieldError> {
    if event_time_ms < 0 {
        return Err(FieldError::new(
            "event_time_ms",
            format!("must be 0 (1970-01-01T00:00:00Z) or later, got {event_time_ms}"),
        ));
    }
    if event_time_ms >= YEAR_10000_START_MS {
        return Err(FieldError::new(
            "event_time_ms",
            format!(
                "must be before {YEAR_10000_START_MS} (the start of year 10000), \
                 got {event_time_ms}"
            ),
        ));
    }
    Ok(())
}

fn validate_actor_id(actor_id: &[u8]) -> Result<(), FieldError> {
    if actor_id.len() > MAX_ACTOR_ID_BYTES {
        return Err(FieldError::new(
            "actor_id",
            format!("must be at most {MAX_ACTOR_ID_BYTES} bytes, got {}", actor_id.len()),
        ));
    }
    Ok(())
}

fn validate_event_id(event_id: &[u8]) -> Result<(), FieldError> {
    let len = event_id.len();
    if len > MAX_EVENT_ID_BYTES {
        return Err(FieldError::new("event_id", format!("must be at most {MAX_EVENT_ID_BYTES} bytes, got {len}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid_event() -> Event {
        Event {
            actor_id: Vec::new(),
            entity_id: b"video-1".to_vec(),
            event_type: "view".to_owned(),
            event_time_ms: 1_700_000_000_000,
            event_id: b"0123456789abcdef".to_vec(),
            value: Some(5),
        }
    }

    fn field_of(result: Result<(), FieldError>) -> Option<&'static str> {
        result.err().map(|e| e.field)
    }

    #[test]
    fn valid_event_passes() {
        assert_eq!(validate_event(&valid_event()), Ok(()));
    }

    #[test]
    fn entity_id_length_boundaries() {
        for (len, ok) in [(0, false), (1, true), (256, true), (257, false)] {
            let event = Event { entity_id: vec![b'x'; len], ..valid_event() };
            let expected = if ok { None } else { Some("entity_id") };
            assert_eq!(field_of(validate_event(&event)), expected, "len {len}");
        }
    }

    #[test]
    fn entity_id_may_hold_any_bytes() {
        let event = Event { entity_id: vec![0, 255, b' ', 0xC3], ..valid_event() };
        assert_eq!(validate_event(&event), Ok(()));
    }

    #[test]
    fn entity_id_reason_is_readable() {
        let event = Event { entity_id: Vec::new(), ..valid_event() };
        let error = validate_event(&event).unwrap_err();
        assert_eq!(error.reason, "must be 1 to 256 bytes, got 0");
        assert_eq!(error.to_string(), "entity_id: must be 1 to 256 bytes, got 0");
    }

    #[test]
    fn event_type_length_boundaries() {
        for (len, ok) in [(0, false), (1, true), (64, true), (65, false)] {
            let event = Event { event_type: "a".repeat(len), ..valid_event() };
            let expected = if ok { None } else { Some("event_type") };
            assert_eq!(field_of(validate_event(&event)), expected, "len {len}");
        }
    }

    #[test]
    fn event_type_length_counts_characters() {
        // 33 two-byte characters: 66 bytes but 33 characters, so the length
        // check passes and the character check is what rejects it.
        let event = Event { event_type: "é".repeat(33), ..valid_event() };
        let error = validate_event(&event).unwrap_err();
        assert_eq!(error.field, "event_type");
        assert!(error.reason.contains("'é' at position 1"), "{}", error.reason);

        let too_long = Event { event_type: "é".repeat(65), ..valid_event() };
        let error = validate_event(&too_long).unwrap_err();
        assert_eq!(error.reason, "must be 1 to 64 characters, got 65");
    }

    #[test]
    fn event_type_accepts_whole_alphabet() {
        let event = Event { event_type: "abcdefghijklmnopqrstuvwxyz0123456789_.-".to_owned(), ..valid_event() };
        assert_eq!(validate_event(&event), Ok(()));
    }

    #[test]
    fn event_type_rejects_characters_just_outside_each_range() {
        // Neighbours of the allowed ranges in ASCII order, plus common
        // mistakes.
        for bad in ['`', '{', '/', ':', 'A', 'Z', ' ', '+', ',', '\n', 'é', '😀'] {
            let event = Event { event_type: format!("ok{bad}"), ..valid_event() };
            let error = validate_event(&event).unwrap_err();
            assert_eq!(error.field, "event_type", "{bad:?}");
            let expected_start = format!("character {bad:?} at position 3 is not allowed");
            assert!(error.reason.starts_with(&expected_start), "{}", error.reason);
        }
    }

    #[test]
    fn event_type_reason_names_first_bad_character() {
        let event = Event { event_type: "Page View".to_owned(), ..valid_event() };
        let error = validate_event(&event).unwrap_err();
        assert_eq!(
            error.reason,
            "character 'P' at position 1 is not allowed; \
             use only lowercase letters a-z, digits 0-9, '_', '.' and '-'"
        );
    }

    #[test]
    fn event_time_boundaries() {
        for (time, ok) in [
            (i64::MIN, false),
            (-1, false),
            (0, true),
            (YEAR_10000_START_MS - 1, true),
            (YEAR_10000_START_MS, false),
            (i64::MAX, false),
        ] {
            let event = Event { event_time_ms: time, ..valid_event() };
            let expected = if ok { None } else { Some("event_time_ms") };
            assert_eq!(field_of(validate_event(&event)), expected, "time {time}");
        }
    }

    #[test]
    fn event_time_reasons_are_readable() {
        let early = Event { event_time_ms: -5, ..valid_event() };
        assert_eq!(validate_event(&early).unwrap_err().reason, "must be 0 (1970-01-01T00:00:00Z) or later, got -5");
        let late = Event { event_time_ms: YEAR_10000_START_MS, ..valid_event() };
        assert_eq!(
            validate_event(&late).unwrap_err().reason,
            "must be before 253402300800000 (the start of year 10000), got 253402300800000"
        );
    }

    #[test]
    fn event_id_boundaries() {
        for (len, ok) in [(0, true), (1, true), (64, true), (65, false)] {
            let event = Event { event_id: vec![7; len], ..valid_event() };
            let expected = if ok { None } else { Some("event_id") };
            assert_eq!(field_of(validate_event(&event)), expected, "len {len}");
        }
        let event = Event { event_id: vec![7; 65], ..valid_event() };
        assert_eq!(validate_event(&event).unwrap_err().reason, "must be at most 64 bytes, got 65");
    }

    #[test]
    fn value_is_unrestricted() {
        for value in [None, Some(i64::MIN), Some(0), Some(i64::MAX)] {
            let event = Event { value, ..valid_event() };
            assert_eq!(validate_event(&event), Ok(()));
        }
    }

    #[test]
    fn query_key_uses_event_rules() {
        assert_eq!(validate_query_key(b"video-1", "view"), Ok(()));
        assert_eq!(validate_query_key(&[b'x'; 256], &"a".repeat(64)), Ok(()));
        assert_eq!(field_of(validate_query_key(b"", "view")), Some("entity_id"));
        assert_eq!(field_of(validate_query_key(&[b'x'; 257], "view")), Some("entity_id"));
        assert_eq!(field_of(validate_query_key(b"v", "")), Some("event_type"));
        assert_eq!(field_of(validate_query_key(b"v", &"a".repeat(65))), Some("event_type"));
        assert_eq!(field_of(validate_query_key(b"v", "View")), Some("event_type"));
    }

    #[test]
    fn range_start_boundaries() {
        assert_eq!(validate_range(0, 1), Ok(()));
        assert_eq!(field_of(validate_range(-1, 1)), Some("from_ms"));
        assert_eq!(field_of(validate_range(i64::MIN, 1)), Some("from_ms"));
        assert_eq!(validate_range(-1, 1).unwrap_err().reason, "must be 0 (1970-01-01T00:00:00Z) or later, got -1");
    }

    #[test]
    fn range_must_be_non_empty() {
        assert_eq!(validate_range(100, 101), Ok(()));
        assert_eq!(field_of(validate_range(100, 100)), Some("to_ms"));
        assert_eq!(field_of(validate_range(100, 99)), Some("to_ms"));
        assert_eq!(validate_range(100, 100).unwrap_err().reason, "must be greater than from_ms (100), got 100");
    }

    #[test]
    fn range_end_boundaries() {
        assert_eq!(validate_range(0, YEAR_10000_START_MS), Ok(()));
        assert_eq!(field_of(validate_range(0, YEAR_10000_START_MS + 1)), Some("to_ms"));
        assert_eq!(field_of(validate_range(0, i64::MAX)), Some("to_ms"));
        assert_eq!(
            validate_range(0, YEAR_10000_START_MS + 1).unwrap_err().reason,
            "must be at most 253402300800000 (the start of year 10000), got 253402300800001"
        );
    }

    #[test]
    fn batch_limits_match_the_documented_api() {
        assert_eq!(MAX_BATCH_EVENTS, 10_000);
        assert_eq!(MAX_BATCH_BYTES, 4_194_304);
    }
}
