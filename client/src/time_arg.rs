//! Time arguments as people type them: `now`, relative offsets such as
//! `-1h` or `+15m` (humantime durations), RFC 3339 timestamps, or raw
//! milliseconds since the epoch.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A time argument in none of the accepted forms.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {input:?} as a time: use now, -1h, +30m, 2026-11-26T10:00:00Z or milliseconds since the epoch")]
pub struct TimeArgError {
    input: String,
}

/// The current time in milliseconds since the Unix epoch (0 if the clock
/// is before 1970).
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Parse a time argument relative to `now_ms`.
pub fn parse_time_at(input: &str, now_ms: i64) -> Result<i64, TimeArgError> {
    let err = || TimeArgError { input: input.to_string() };
    let s = input.trim();
    if s == "now" {
        return Ok(now_ms);
    }
    if let Some(rest) = s.strip_prefix('-').or_else(|| s.strip_prefix('+')) {
        if let Ok(d) = humantime::parse_duration(rest) {
            let ms = d.as_millis() as i64;
            return Ok(if s.starts_with('-') { now_ms - ms } else { now_ms + ms });
        }
    }
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let t = humantime::parse_rfc3339_weak(s).map_err(|_| err())?;
    let d: Duration = t.duration_since(UNIX_EPOCH).map_err(|_| err())?;
    Ok(d.as_millis() as i64)
}

/// Parses a time argument relative to the current time.
pub fn parse_time(input: &str) -> Result<i64, TimeArgError> {
    parse_time_at(input, now_ms())
}

/// RFC 3339 rendering of ms since epoch, for output.
pub fn format_ms(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        let now = 1_700_000_000_000;
        assert_eq!(parse_time_at("now", now).unwrap(), now);
        assert_eq!(parse_time_at("-1h", now).unwrap(), now - 3_600_000);
        assert_eq!(parse_time_at("+30m", now).unwrap(), now + 1_800_000);
        assert_eq!(parse_time_at("1234", now).unwrap(), 1234);
        assert_eq!(parse_time_at("1970-01-01T00:01:00Z", now).unwrap(), 60_000);
        assert!(parse_time_at("yesterday-ish", now).is_err());
    }
}
