//! Time buckets: minutes, hours, days, calendar months and calendar years,
//! all in UTC.
//!
//! Tally keeps one counter per (entity, event type, granularity, bucket
//! start). A range query is answered by summing the fewest buckets that tile
//! the range exactly ([`decompose`]), so a year-long query reads about a dozen
//! month counters instead of half a million minute counters. That only works
//! if every node and every client agree on where buckets start, so the
//! arithmetic lives here, in the crate they share.
//!
//! Design choices:
//! * UTC only, with no leap seconds (Unix time): a day is always 86,400,000 ms,
//!   so minute, hour and day buckets are plain integer flooring. Time zones
//!   would make "day" depend on the caller and multiply storage.
//! * Months are calendar months because that is what people ask for ("views in
//!   March"). Their length varies, so month arithmetic goes through civil
//!   dates, using Howard Hinnant's `days_from_civil` / `civil_from_days`
//!   (proleptic Gregorian, exact for any `i64` day count in range) rather than
//!   a date crate: it is a few lines, allocation-free, and keeps this crate's
//!   dependency footprint small for clients.
//! * The granularities nest: every month starts on a day boundary, every day on
//!   an hour boundary, every hour on a minute boundary. Because the buckets
//!   form such a hierarchy, taking, from the left, the largest bucket that
//!   starts at the cursor and still fits is optimal (any tiling must cover the
//!   cursor with some bucket starting there, and the largest fitting one
//!   contains all the others), so [`decompose`] is a simple greedy loop.
//! * The smallest unit is the minute: query ranges are widened to whole
//!   minutes ([`align_range`]) because nothing finer is stored.
//! * Functions are total: they never panic, even for times outside the range
//!   validation admits; arithmetic that would overflow saturates.

use std::fmt;
use std::str::FromStr;

/// Milliseconds in a minute.
pub const MINUTE_MS: i64 = 60_000;
/// Milliseconds in an hour.
pub const HOUR_MS: i64 = 60 * MINUTE_MS;
/// Milliseconds in a day (UTC has no leap seconds in Unix time).
pub const DAY_MS: i64 = 24 * HOUR_MS;

/// The size of a counter bucket. The discriminant is the value stored in keys,
/// so it must never change; ordering is from finest to coarsest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Granularity {
    Minute = 0,
    Hour = 1,
    Day = 2,
    /// A calendar month in UTC.
    Month = 3,
    /// A calendar year in UTC.
    Year = 4,
}

impl Granularity {
    /// Every granularity, finest first.
    pub const ALL: [Granularity; 5] =
        [Granularity::Minute, Granularity::Hour, Granularity::Day, Granularity::Month, Granularity::Year];

    /// The stable one-byte code of this granularity.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// The granularity with code `code`, or `None` for an unknown code.
    pub fn from_u8(code: u8) -> Option<Self> {
        Self::ALL.get(usize::from(code)).copied()
    }

    /// Lowercase name: `"minute"`, `"hour"`, `"day"`, `"month"` or `"year"`.
    pub fn name(&self) -> &'static str {
        match self {
            Granularity::Minute => "minute",
            Granularity::Hour => "hour",
            Granularity::Day => "day",
            Granularity::Month => "month",
            Granularity::Year => "year",
        }
    }

    /// Converts the wire enum; `Unspecified` has no bucket size and gives
    /// `None`.
    pub fn from_proto(granularity: crate::v1::Granularity) -> Option<Self> {
        use crate::v1::Granularity as Proto;
        match granularity {
            Proto::Unspecified => None,
            Proto::Minute => Some(Granularity::Minute),
            Proto::Hour => Some(Granularity::Hour),
            Proto::Day => Some(Granularity::Day),
            Proto::Month => Some(Granularity::Month),
            Proto::Year => Some(Granularity::Year),
        }
    }

    /// The wire enum of this granularity.
    pub fn to_proto(self) -> crate::v1::Granularity {
        use crate::v1::Granularity as Proto;
        match self {
            Granularity::Minute => Proto::Minute,
            Granularity::Hour => Proto::Hour,
            Granularity::Day => Proto::Day,
            Granularity::Month => Proto::Month,
            Granularity::Year => Proto::Year,
        }
    }

    /// The next coarser granularity, `None` for years.
    pub fn coarser(self) -> Option<Granularity> {
        Self::from_u8(self.as_u8() + 1)
    }

    /// Length of a bucket for the granularities whose length is fixed.
    fn fixed_length_ms(self) -> Option<i64> {
        match self {
            Granularity::Minute => Some(MINUTE_MS),
            Granularity::Hour => Some(HOUR_MS),
            Granularity::Day => Some(DAY_MS),
            Granularity::Month | Granularity::Year => None,
        }
    }
}

impl fmt::Display for Granularity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A string that names no granularity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown granularity {0:?}; expected minute, hour, day, month or year")]
pub struct UnknownGranularity(pub String);

impl FromStr for Granularity {
    type Err = UnknownGranularity;

    /// Parses `"minute"`, `"hour"`, `"day"`, `"month"` or `"year"`, ignoring
    /// ASCII case.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|g| g.name().eq_ignore_ascii_case(text))
            .ok_or_else(|| UnknownGranularity(text.to_owned()))
    }
}

/// Start of the bucket of granularity `granularity` containing `t_ms`
/// (rounds down, also for negative times).
pub fn bucket_start(granularity: Granularity, t_ms: i64) -> i64 {
    match granularity.fixed_length_ms() {
        Some(length) => t_ms.saturating_sub(t_ms.rem_euclid(length)),
        None => {
            let (year, month, _day) = civil_from_days(t_ms.div_euclid(DAY_MS));
            match granularity {
                Granularity::Year => ms_of_first_day_of_month(year, 1),
                _ => ms_of_first_day_of_month(year, month),
            }
        }
    }
}

/// Start of the bucket following the one containing `bucket_start_ms`; for
/// months, the first millisecond of the next calendar month. Saturates at
/// `i64::MAX` instead of overflowing.
pub fn next_bucket_start(granularity: Granularity, bucket_start_ms: i64) -> i64 {
    let start = bucket_start(granularity, bucket_start_ms);
    match granularity.fixed_length_ms() {
        Some(length) => start.saturating_add(length),
        None => {
            let (year, month, _day) = civil_from_days(start.div_euclid(DAY_MS));
            if granularity == Granularity::Year || month == 12 {
                ms_of_first_day_of_month(year + 1, 1)
            } else {
                ms_of_first_day_of_month(year, month + 1)
            }
        }
    }
}

/// Widens `[from_ms, to_ms)` to whole minutes: `from_ms` rounds down and
/// `to_ms` rounds up. A `to_ms` within a minute of `i64::MAX` (rejected by
/// validation anyway) rounds down instead, as rounding up would overflow.
pub fn align_range(from_ms: i64, to_ms: i64) -> (i64, i64) {
    let aligned_from = bucket_start(Granularity::Minute, from_ms);
    let to_floor = bucket_start(Granularity::Minute, to_ms);
    let aligned_to = if to_floor == to_ms { to_ms } else { to_floor.checked_add(MINUTE_MS).unwrap_or(to_floor) };
    (aligned_from, aligned_to)
}

/// Widens `[from_ms, to_ms)` to whole hours (TopK ranks from hour, day and
/// month buckets only); like [`align_range`], a `to_ms` that cannot round
/// up without overflowing rounds down.
pub fn align_range_to_hours(from_ms: i64, to_ms: i64) -> (i64, i64) {
    let aligned_from = bucket_start(Granularity::Hour, from_ms);
    let to_floor = bucket_start(Granularity::Hour, to_ms);
    let aligned_to = if to_floor == to_ms { to_ms } else { to_floor.checked_add(HOUR_MS).unwrap_or(to_floor) };
    (aligned_from, aligned_to)
}

/// The fewest buckets `(granularity, bucket_start)` that exactly tile
/// `[from_ms, to_ms)`, in ascending time order; empty when `from_ms >= to_ms`.
///
/// The range should be minute-aligned (see [`align_range`]); an unaligned
/// range is widened with [`align_range`] first, since no bucket can start or
/// end off a minute boundary.
pub fn decompose(from_ms: i64, to_ms: i64) -> Vec<(Granularity, i64)> {
    let mut buckets = Vec::new();
    if from_ms >= to_ms {
        return buckets;
    }
    let (from_ms, to_ms) = align_range(from_ms, to_ms);
    let mut cursor = from_ms;
    while cursor < to_ms {
        // Coarsest first. Minute always fits: cursor and to_ms are both
        // minute-aligned and cursor < to_ms, so the loop always advances.
        let fitting = Granularity::ALL.into_iter().rev().find_map(|g| {
            let end = next_bucket_start(g, cursor);
            (bucket_start(g, cursor) == cursor && end > cursor && end <= to_ms).then_some((g, end))
        });
        let Some((granularity, end)) = fitting else {
            // Unreachable for aligned input; stop rather than loop forever.
            break;
        };
        buckets.push((granularity, cursor));
        cursor = end;
    }
    buckets
}

/// Where each granularity's kept buckets begin, indexed by
/// [`Granularity::as_u8`]: a bucket of granularity `g` starting before
/// `floors[g]` has expired (see the retention policy). [`KEEP_ALL`] when
/// nothing has.
pub type Floors = [i64; 5];

/// Floors under which nothing has expired.
pub const KEEP_ALL: Floors = [i64::MIN; 5];

/// Whether the bucket of `granularity` starting at `start_ms` is kept.
pub fn is_kept(floors: &Floors, granularity: Granularity, start_ms: i64) -> bool {
    start_ms >= floors[usize::from(granularity.as_u8())]
}

/// A range tiled by kept buckets: what [`decompose_kept`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tiling {
    /// In ascending time order, each kept under the floors asked with.
    pub buckets: Vec<(Granularity, i64)>,
    /// The range the buckets tile exactly.
    pub from_ms: i64,
    pub to_ms: i64,
    /// The coarsest granularity the range had to be widened to (the finest
    /// asked for when it was not widened): the answer is exact to it.
    pub resolution: Granularity,
}

/// Widens `[from_ms, to_ms)` to whole buckets of `granularity`; a `to_ms`
/// that cannot round up without overflowing rounds down.
pub fn align_range_to(granularity: Granularity, from_ms: i64, to_ms: i64) -> (i64, i64) {
    let aligned_from = bucket_start(granularity, from_ms);
    let to_floor = bucket_start(granularity, to_ms);
    let aligned_to = if to_floor == to_ms {
        to_ms
    } else {
        let next = next_bucket_start(granularity, to_floor);
        if next > to_floor && next < i64::MAX {
            next
        } else {
            to_floor
        }
    };
    (aligned_from, aligned_to)
}

/// The fewest kept buckets, none finer than `finest`, that tile
/// `[from_ms, to_ms)` — widened outward where the range reaches buckets
/// past their retention, to the next coarser granularity still kept there.
///
/// Like [`decompose`], greedy from the left, coarsest fitting bucket first,
/// but only kept buckets qualify. When no kept bucket starting at the
/// cursor fits before the end, the finest kept one is taken and the range
/// grows to its end. One always exists: the cursor is aligned to the
/// bucket just taken, which was kept, so the next bucket of that
/// granularity (later, hence kept too) starts there. Only when even the
/// range's first year has expired does the range shrink: it starts at the
/// oldest year kept, since nothing older exists anywhere.
pub fn decompose_kept(from_ms: i64, to_ms: i64, floors: &Floors, finest: Granularity) -> Tiling {
    let (mut from, to) = align_range_to(finest, from_ms, to_ms);
    let coarser_or_equal = || Granularity::ALL.into_iter().filter(move |g| *g >= finest);
    let mut start = coarser_or_equal().find(|g| is_kept(floors, *g, bucket_start(*g, from)));
    if start.is_none() {
        from = from.max(floors[usize::from(Granularity::Year.as_u8())]);
        start = coarser_or_equal().find(|g| is_kept(floors, *g, bucket_start(*g, from)));
    }
    let empty = |at: i64, resolution| Tiling { buckets: Vec::new(), from_ms: at, to_ms: at, resolution };
    let Some(start) = start else { return empty(from, Granularity::Year) };
    if from >= to {
        return empty(from, if start > finest { start } else { finest });
    }
    let mut resolution = start;
    let mut cursor = bucket_start(start, from);
    let from = cursor;
    let mut buckets = Vec::new();
    while cursor < to {
        let mut finest_kept = None;
        let mut fitting = None;
        for g in coarser_or_equal().collect::<Vec<_>>().into_iter().rev() {
            let end = next_bucket_start(g, cursor);
            if bucket_start(g, cursor) != cursor || end <= cursor || !is_kept(floors, g, cursor) {
                continue;
            }
            finest_kept = Some((g, end));
            if fitting.is_none() && end <= to {
                fitting = Some((g, end));
            }
        }
        let Some((granularity, end)) = fitting.or(finest_kept) else {
            // Unreachable (see above); stop rather than loop forever.
            break;
        };
        if end > to {
            resolution = resolution.max(granularity);
        }
        buckets.push((granularity, cursor));
        cursor = end;
    }
    Tiling { buckets, from_ms: from, to_ms: cursor, resolution }
}

/// Starts of the buckets of granularity `granularity` that cover
/// `[from_ms, to_ms)`: the bucket containing `from_ms`, then each following
/// bucket that starts before `to_ms`. Empty when `from_ms >= to_ms`.
///
/// Lazy, so a caller can cap the number of buckets without materialising an
/// arbitrarily long series.
pub fn series_starts(granularity: Granularity, from_ms: i64, to_ms: i64) -> impl Iterator<Item = i64> {
    let first = (from_ms < to_ms).then(|| bucket_start(granularity, from_ms));
    std::iter::successors(first, move |&start| {
        let next = next_bucket_start(granularity, start);
        // `next > start` guards against a saturated, non-advancing step.
        (next > start && next < to_ms).then_some(next)
    })
}

/// Milliseconds since the epoch of 00:00:00 UTC on the first of the month,
/// saturating for years far outside any representable time.
fn ms_of_first_day_of_month(year: i64, month: u32) -> i64 {
    days_from_civil(year, month, 1).saturating_mul(DAY_MS)
}

/// Days since 1970-01-01 of the proleptic Gregorian date `year-month-day`
/// (Howard Hinnant's `days_from_civil`). `month` is 1..=12, `day` 1..=31.
/// Exact for every year whose day count fits comfortably in an `i64`, which
/// includes every year reachable from an `i64` millisecond time.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    // Count years from March, so the leap day is the last day of the year.
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400); // [0, 399]
    let month_from_march = i64::from((month + 9) % 12); // March = 0
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1; // [0, 365]
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year; // [0, 146096]
    era * 146_097 + day_of_era - 719_468
}

/// The proleptic Gregorian date `(year, month, day)` of the day `days` after
/// 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let days_since_0000_03_01 = days + 719_468;
    let era = days_since_0000_03_01.div_euclid(146_097);
    let day_of_era = days_since_0000_03_01.rem_euclid(146_097); // [0, 146096]
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365; // [0, 399]
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100); // [0, 365]
    let month_from_march = (5 * day_of_year + 2) / 153; // [0, 11], March = 0
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1; // [1, 31]
    let month = if month_from_march < 10 { month_from_march + 3 } else { month_from_march - 9 }; // [1, 12]
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    // Both values are within the small ranges noted above.
    (year, month as u32, day as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hour_aligned_ranges_decompose_without_minutes() {
        let (from, to) = align_range_to_hours(DAY_MS + 90 * MINUTE_MS, 3 * DAY_MS + 1);
        assert_eq!((from, to), (DAY_MS + HOUR_MS, 3 * DAY_MS + HOUR_MS));
        let pieces = decompose(from, to);
        assert!(pieces.iter().all(|(g, _)| *g != Granularity::Minute), "{pieces:?}");
        assert_eq!(align_range_to_hours(HOUR_MS, 2 * HOUR_MS), (HOUR_MS, 2 * HOUR_MS));
    }

    // ---- An independent, deliberately naive calendar used as the reference.

    fn is_leap(year: i64) -> bool {
        (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
    }

    fn days_in_month(year: i64, month: u32) -> i64 {
        match month {
            1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
            4 | 6 | 9 | 11 => 30,
            2 if is_leap(year) => 29,
            2 => 28,
            _ => panic!("month {month}"),
        }
    }

    fn days_in_year(year: i64) -> i64 {
        if is_leap(year) {
            366
        } else {
            365
        }
    }

    /// Days since 1970-01-01 by counting whole years and months (year >= 1970).
    fn naive_days(year: i64, month: u32, day: u32) -> i64 {
        let years: i64 = (1970..year).map(days_in_year).sum();
        let months: i64 = (1..month).map(|m| days_in_month(year, m)).sum();
        years + months + i64::from(day) - 1
    }

    fn naive_ms(year: i64, month: u32, day: u32, hour: i64, minute: i64) -> i64 {
        naive_days(year, month, day) * DAY_MS + hour * HOUR_MS + minute * MINUTE_MS
    }

    /// (year, month, day) of a non-negative day count, by walking forward.
    fn naive_civil(mut days: i64) -> (i64, u32, u32) {
        assert!(days >= 0);
        let mut year = 1970;
        while days >= days_in_year(year) {
            days -= days_in_year(year);
            year += 1;
        }
        let mut month = 1;
        while days >= days_in_month(year, month) {
            days -= days_in_month(year, month);
            month += 1;
        }
        (year, month, days as u32 + 1)
    }

    /// Whether a bucket of `g` starts at `t` and where it ends, by the naive
    /// calendar.
    fn naive_bucket_at(g: Granularity, t: i64) -> Option<i64> {
        let fixed = |len: i64| (t % len == 0).then_some(t + len);
        match g {
            Granularity::Minute => fixed(MINUTE_MS),
            Granularity::Hour => fixed(HOUR_MS),
            Granularity::Day => fixed(DAY_MS),
            Granularity::Month => {
                if t % DAY_MS != 0 {
                    return None;
                }
                let (year, month, day) = naive_civil(t / DAY_MS);
                (day == 1).then(|| t + days_in_month(year, month) * DAY_MS)
            }
            Granularity::Year => {
                if t % DAY_MS != 0 {
                    return None;
                }
                let (year, month, day) = naive_civil(t / DAY_MS);
                (month == 1 && day == 1).then(|| naive_ms(year + 1, 1, 1, 0, 0))
            }
        }
    }

    fn ms(year: i64, month: u32, day: u32, hour: i64, minute: i64) -> i64 {
        naive_ms(year, month, day, hour, minute)
    }

    // ---- Granularity.

    #[test]
    fn granularity_codes_names_and_parsing_round_trip() {
        for (code, g) in Granularity::ALL.into_iter().enumerate() {
            assert_eq!(usize::from(g.as_u8()), code);
            assert_eq!(Granularity::from_u8(g.as_u8()), Some(g));
            assert_eq!(g.name().parse::<Granularity>(), Ok(g));
            assert_eq!(g.to_string(), g.name());
        }
        assert_eq!(Granularity::from_u8(5), None);
        assert_eq!(Granularity::from_u8(255), None);
        assert_eq!(Granularity::Minute.as_u8(), 0);
        assert_eq!(Granularity::Month.as_u8(), 3);
        assert_eq!(["minute", "hour", "day", "month", "year"], Granularity::ALL.map(|g| g.name()));
        assert_eq!("Hour".parse::<Granularity>(), Ok(Granularity::Hour));
        assert_eq!("week".parse::<Granularity>(), Err(UnknownGranularity("week".to_owned())));
        assert!("".parse::<Granularity>().is_err());
        assert!(Granularity::Minute < Granularity::Month);
    }

    #[test]
    fn granularity_from_proto() {
        use crate::v1::Granularity as Proto;
        assert_eq!(Granularity::from_proto(Proto::Unspecified), None);
        assert_eq!(Granularity::from_proto(Proto::Minute), Some(Granularity::Minute));
        assert_eq!(Granularity::from_proto(Proto::Hour), Some(Granularity::Hour));
        assert_eq!(Granularity::from_proto(Proto::Day), Some(Granularity::Day));
        assert_eq!(Granularity::from_proto(Proto::Month), Some(Granularity::Month));
    }

    // ---- Civil conversions.

    #[test]
    fn civil_conversion_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(days_from_civil(2100, 3, 1) - 1), (2100, 2, 28));
        assert_eq!(civil_from_days(days_from_civil(1900, 3, 1) - 1), (1900, 2, 28));
        assert_eq!(civil_from_days(days_from_civil(1600, 3, 1) - 1), (1600, 2, 29));
        assert_eq!(days_from_civil(10_000, 1, 1) * DAY_MS, crate::validate::YEAR_10000_START_MS);
    }

    #[test]
    fn civil_conversion_matches_naive_calendar_day_by_day() {
        // Every day from 1970 through 2400 (covers 2000 and 2100, 2400).
        let last = naive_days(2401, 1, 1);
        let mut expected = (1970, 1, 1);
        for days in 0..last {
            assert_eq!(civil_from_days(days), expected, "day {days}");
            assert_eq!(days_from_civil(expected.0, expected.1, expected.2), days);
            let (y, m, d) = expected;
            expected = if i64::from(d) < days_in_month(y, m) {
                (y, m, d + 1)
            } else if m < 12 {
                (y, m + 1, 1)
            } else {
                (y + 1, 1, 1)
            };
        }
    }

    #[test]
    fn extreme_times_do_not_panic() {
        for g in Granularity::ALL {
            for t in [i64::MIN, i64::MIN + 1, -1, 0, i64::MAX - 1, i64::MAX] {
                let start = bucket_start(g, t);
                assert!(start <= t, "{g} {t}");
                let _ = next_bucket_start(g, t);
                let _ = series_starts(g, t, t.saturating_add(1)).take(3).count();
            }
        }
        let _ = align_range(i64::MIN, i64::MAX);
        assert!(decompose(i64::MAX - MINUTE_MS, i64::MAX).len() <= 1);
    }

    // ---- bucket_start / next_bucket_start.

    #[test]
    fn fixed_buckets_floor() {
        let t = ms(2024, 5, 17, 13, 45) + 12_345;
        assert_eq!(bucket_start(Granularity::Minute, t), ms(2024, 5, 17, 13, 45));
        assert_eq!(bucket_start(Granularity::Hour, t), ms(2024, 5, 17, 13, 0));
        assert_eq!(bucket_start(Granularity::Day, t), ms(2024, 5, 17, 0, 0));
        assert_eq!(bucket_start(Granularity::Month, t), ms(2024, 5, 1, 0, 0));
        assert_eq!(next_bucket_start(Granularity::Minute, t), ms(2024, 5, 17, 13, 46));
        assert_eq!(next_bucket_start(Granularity::Hour, t), ms(2024, 5, 17, 14, 0));
        assert_eq!(next_bucket_start(Granularity::Day, t), ms(2024, 5, 18, 0, 0));
        assert_eq!(next_bucket_start(Granularity::Month, t), ms(2024, 6, 1, 0, 0));
        for g in Granularity::ALL {
            assert_eq!(bucket_start(g, 0), 0);
        }
    }

    #[test]
    fn negative_times_floor_towards_minus_infinity() {
        assert_eq!(bucket_start(Granularity::Minute, -1), -MINUTE_MS);
        assert_eq!(bucket_start(Granularity::Day, -1), -DAY_MS);
        // 1969-12-01
        assert_eq!(bucket_start(Granularity::Month, -1), -31 * DAY_MS);
        assert_eq!(next_bucket_start(Granularity::Month, -1), 0);
    }

    #[test]
    fn month_ends() {
        let last_ms_of_january = ms(2024, 2, 1, 0, 0) - 1;
        assert_eq!(bucket_start(Granularity::Month, last_ms_of_january), ms(2024, 1, 1, 0, 0));
        assert_eq!(bucket_start(Granularity::Month, last_ms_of_january + 1), ms(2024, 2, 1, 0, 0));
        assert_eq!(bucket_start(Granularity::Day, last_ms_of_january), ms(2024, 1, 31, 0, 0));
        // December rolls into the next year.
        assert_eq!(next_bucket_start(Granularity::Month, ms(2023, 12, 1, 0, 0)), ms(2024, 1, 1, 0, 0));
        assert_eq!(bucket_start(Granularity::Month, ms(2024, 1, 1, 0, 0) - 1), ms(2023, 12, 1, 0, 0));
        // 30-day months.
        assert_eq!(next_bucket_start(Granularity::Month, ms(2024, 4, 1, 0, 0)) - ms(2024, 4, 1, 0, 0), 30 * DAY_MS);
    }

    #[test]
    fn february_in_leap_and_common_years() {
        let february_length = |year| next_bucket_start(Granularity::Month, ms(year, 2, 1, 0, 0)) - ms(year, 2, 1, 0, 0);
        assert_eq!(february_length(2000), 29 * DAY_MS); // divisible by 400
        assert_eq!(february_length(2024), 29 * DAY_MS); // divisible by 4
        assert_eq!(february_length(2023), 28 * DAY_MS);
        assert_eq!(february_length(2100), 28 * DAY_MS); // divisible by 100 only
        assert_eq!(bucket_start(Granularity::Month, ms(2000, 2, 29, 23, 59)), ms(2000, 2, 1, 0, 0));
        assert_eq!(bucket_start(Granularity::Month, ms(2100, 3, 1, 0, 0) - 1), ms(2100, 2, 1, 0, 0));
        assert_eq!(bucket_start(Granularity::Day, ms(2100, 3, 1, 0, 0) - 1), ms(2100, 2, 28, 0, 0));
    }

    // ---- align_range.

    #[test]
    fn align_range_rounds_outwards_to_minutes() {
        assert_eq!(align_range(0, 0), (0, 0));
        assert_eq!(align_range(0, MINUTE_MS), (0, MINUTE_MS));
        assert_eq!(align_range(1, MINUTE_MS - 1), (0, MINUTE_MS));
        assert_eq!(align_range(MINUTE_MS - 1, MINUTE_MS + 1), (0, 2 * MINUTE_MS));
        assert_eq!(align_range(MINUTE_MS, 2 * MINUTE_MS), (MINUTE_MS, 2 * MINUTE_MS));
        // Rounding up would overflow, so the end rounds down instead.
        let (_, to) = align_range(0, i64::MAX);
        assert_eq!(to, i64::MAX - i64::MAX % MINUTE_MS);
    }

    // ---- decompose.

    #[test]
    fn decompose_empty_ranges() {
        assert!(decompose(0, 0).is_empty());
        assert!(decompose(MINUTE_MS, 0).is_empty());
        assert!(decompose(5, 5).is_empty());
    }

    #[test]
    fn decompose_single_buckets() {
        let day = ms(2024, 3, 10, 0, 0);
        assert_eq!(decompose(day, day + DAY_MS), vec![(Granularity::Day, day)]);
        assert_eq!(decompose(0, DAY_MS), vec![(Granularity::Day, 0)]);
        assert_eq!(decompose(day, day + HOUR_MS), vec![(Granularity::Hour, day)]);
        assert_eq!(decompose(day, day + MINUTE_MS), vec![(Granularity::Minute, day)]);
        let feb = ms(2024, 2, 1, 0, 0);
        assert_eq!(decompose(feb, ms(2024, 3, 1, 0, 0)), vec![(Granularity::Month, feb)]);
    }

    #[test]
    fn decompose_a_year_is_one_bucket() {
        let pieces = decompose(ms(2024, 1, 1, 0, 0), ms(2025, 1, 1, 0, 0));
        assert_eq!(pieces, vec![(Granularity::Year, ms(2024, 1, 1, 0, 0))]);
        // December to the next February: one month each side of no year.
        let pieces = decompose(ms(2023, 12, 1, 0, 0), ms(2025, 2, 1, 0, 0));
        assert_eq!(
            pieces,
            vec![
                (Granularity::Month, ms(2023, 12, 1, 0, 0)),
                (Granularity::Year, ms(2024, 1, 1, 0, 0)),
                (Granularity::Month, ms(2025, 1, 1, 0, 0)),
            ]
        );
        assert_eq!(next_bucket_start(Granularity::Year, ms(2024, 7, 9, 3, 0)), ms(2025, 1, 1, 0, 0));
        assert_eq!(bucket_start(Granularity::Year, ms(2024, 7, 9, 3, 0)), ms(2024, 1, 1, 0, 0));
    }

    // ---- decompose_kept.

    fn floors_with(minute: i64, hour: i64) -> Floors {
        let mut floors = KEEP_ALL;
        floors[0] = minute;
        floors[1] = hour;
        floors
    }

    #[test]
    fn decompose_kept_widens_to_the_next_granularity_kept() {
        let floors = floors_with(ms(2024, 6, 3, 10, 0), i64::MIN);
        // 09:30 .. 10:45: the minutes before 10:00 have expired, so the
        // hour 09:00 counts them, then the minutes of 10:xx.
        let tiling = decompose_kept(ms(2024, 6, 3, 9, 30), ms(2024, 6, 3, 10, 45), &floors, Granularity::Minute);
        assert_eq!(tiling.from_ms, ms(2024, 6, 3, 9, 0));
        assert_eq!(tiling.to_ms, ms(2024, 6, 3, 10, 45));
        assert_eq!(tiling.resolution, Granularity::Hour);
        assert_eq!(tiling.buckets[0], (Granularity::Hour, ms(2024, 6, 3, 9, 0)));
        assert_eq!(tiling.buckets.len(), 1 + 45);
        // A range of kept minutes only is not widened.
        let recent = decompose_kept(ms(2024, 6, 3, 10, 5), ms(2024, 6, 3, 10, 7), &floors, Granularity::Minute);
        assert_eq!(
            (recent.from_ms, recent.to_ms, recent.resolution),
            (ms(2024, 6, 3, 10, 5), ms(2024, 6, 3, 10, 7), Granularity::Minute)
        );
        // The end widens too when its minutes have expired.
        let floors = floors_with(ms(2024, 6, 3, 10, 30), i64::MIN);
        let tiling = decompose_kept(ms(2024, 6, 3, 9, 0), ms(2024, 6, 3, 10, 20), &floors, Granularity::Minute);
        assert_eq!(
            tiling.buckets,
            vec![(Granularity::Hour, ms(2024, 6, 3, 9, 0)), (Granularity::Hour, ms(2024, 6, 3, 10, 0))]
        );
        assert_eq!(tiling.to_ms, ms(2024, 6, 3, 11, 0));
        // Hours gone too: days.
        let floors = floors_with(ms(2024, 6, 3, 0, 0), ms(2024, 6, 1, 0, 0));
        let tiling = decompose_kept(ms(2024, 5, 20, 7, 0), ms(2024, 6, 3, 1, 0), &floors, Granularity::Minute);
        assert_eq!(tiling.from_ms, ms(2024, 5, 20, 0, 0));
        assert_eq!(tiling.resolution, Granularity::Day);
        assert_eq!(tiling.buckets.last(), Some(&(Granularity::Hour, ms(2024, 6, 3, 0, 0))));
    }

    #[test]
    fn decompose_kept_starts_at_the_oldest_year_kept() {
        let mut floors = KEEP_ALL;
        for f in &mut floors {
            *f = ms(2020, 1, 1, 0, 0);
        }
        let tiling = decompose_kept(ms(2010, 5, 1, 0, 0), ms(2021, 1, 1, 0, 0), &floors, Granularity::Minute);
        assert_eq!(tiling.buckets, vec![(Granularity::Year, ms(2020, 1, 1, 0, 0))]);
        assert_eq!(tiling.from_ms, ms(2020, 1, 1, 0, 0));
        let gone = decompose_kept(ms(2010, 5, 1, 0, 0), ms(2011, 1, 1, 0, 0), &floors, Granularity::Minute);
        assert!(gone.buckets.is_empty());
    }

    #[test]
    fn decompose_kept_from_hours() {
        let tiling = decompose_kept(ms(2024, 6, 3, 9, 30), ms(2024, 6, 3, 10, 45), &KEEP_ALL, Granularity::Hour);
        assert_eq!(
            tiling.buckets,
            vec![(Granularity::Hour, ms(2024, 6, 3, 9, 0)), (Granularity::Hour, ms(2024, 6, 3, 10, 0))]
        );
        assert_eq!(tiling.resolution, Granularity::Hour);
    }

    #[test]
    fn decompose_thirty_days_across_a_month_boundary() {
        // Jan 15 .. Feb 14 (exclusive): 17 January days + 13 February days;
        // neither month is complete.
        let pieces = decompose(ms(2024, 1, 15, 0, 0), ms(2024, 2, 14, 0, 0));
        assert_eq!(pieces.len(), 30);
        assert!(pieces.iter().all(|&(g, _)| g == Granularity::Day));
        assert_eq!(pieces[0].1, ms(2024, 1, 15, 0, 0));
        assert_eq!(pieces[17].1, ms(2024, 2, 1, 0, 0));
        assert_eq!(pieces[29].1, ms(2024, 2, 13, 0, 0));
    }

    #[test]
    fn decompose_mixes_all_granularities() {
        // 2024-01-31 23:00 .. 2024-03-01 01:30: the last hour of January,
        // all of (leap) February, the first hour of March, then 30 minutes.
        let pieces = decompose(ms(2024, 1, 31, 23, 0), ms(2024, 3, 1, 1, 30));
        let mut expected = vec![
            (Granularity::Hour, ms(2024, 1, 31, 23, 0)),
            (Granularity::Month, ms(2024, 2, 1, 0, 0)),
            (Granularity::Hour, ms(2024, 3, 1, 0, 0)),
        ];
        expected.extend((0..30).map(|m| (Granularity::Minute, ms(2024, 3, 1, 1, m))));
        assert_eq!(pieces, expected);
    }

    #[test]
    fn decompose_ragged_edges() {
        // 10:59 .. next day 01:01 -> 1 minute, 13 hours, 1 hour, 1 minute.
        let from = ms(2024, 6, 3, 10, 59);
        let to = ms(2024, 6, 4, 1, 1);
        let pieces = decompose(from, to);
        let mut expected = vec![(Granularity::Minute, from)];
        expected.extend((11..24).map(|h| (Granularity::Hour, ms(2024, 6, 3, h, 0))));
        expected.push((Granularity::Hour, ms(2024, 6, 4, 0, 0)));
        expected.push((Granularity::Minute, ms(2024, 6, 4, 1, 0)));
        assert_eq!(pieces, expected);
    }

    #[test]
    fn decompose_widens_unaligned_input() {
        let day = ms(2024, 3, 10, 0, 0);
        assert_eq!(decompose(day + 1, day + DAY_MS - 1), decompose(day, day + DAY_MS));
    }

    // ---- series_starts.

    #[test]
    fn series_starts_covers_range() {
        let from = ms(2024, 1, 31, 12, 0);
        let to = ms(2024, 4, 1, 0, 0);
        let months: Vec<_> = series_starts(Granularity::Month, from, to).collect();
        assert_eq!(months, vec![ms(2024, 1, 1, 0, 0), ms(2024, 2, 1, 0, 0), ms(2024, 3, 1, 0, 0)]);
        let days: Vec<_> = series_starts(Granularity::Day, from, to).collect();
        assert_eq!(days.len(), 1 + 29 + 31);
        assert_eq!(days[0], ms(2024, 1, 31, 0, 0));
        assert_eq!(series_starts(Granularity::Hour, 0, DAY_MS).count(), 24);
        assert_eq!(series_starts(Granularity::Hour, 1, DAY_MS + 1).count(), 25);
        assert_eq!(series_starts(Granularity::Day, 0, 0).count(), 0);
        assert_eq!(series_starts(Granularity::Day, 5, 1).count(), 0);
        assert_eq!(series_starts(Granularity::Minute, 0, 1).collect::<Vec<_>>(), vec![0]);
    }

    // ---- Properties.

    /// 1970-01-01 .. 2200-01-01 in ms.
    const YEAR_2200_MS: i64 = 7_258_118_400_000;

    /// Checks that `pieces` tiles `[from, to)` exactly with aligned buckets,
    /// using the naive calendar. Returns a description of the first failure.
    fn check_tiling(pieces: &[(Granularity, i64)], from: i64, to: i64) -> Result<(), String> {
        let mut cursor = from;
        for &(g, start) in pieces {
            if start != cursor {
                return Err(format!("{g} bucket at {start}, expected {cursor}"));
            }
            let Some(end) = naive_bucket_at(g, start) else {
                return Err(format!("{g} bucket at {start} is not aligned"));
            };
            if end > to {
                return Err(format!("{g} bucket at {start} ends at {end}, after {to}"));
            }
            cursor = end;
        }
        if cursor != to {
            return Err(format!("tiling ends at {cursor}, expected {to}"));
        }
        Ok(())
    }

    /// Minimum number of aligned buckets tiling `[from, to)`, by dynamic
    /// programming over minute positions, right to left.
    fn min_bucket_count(from: i64, to: i64) -> usize {
        let positions = usize::try_from((to - from) / MINUTE_MS).unwrap();
        let mut fewest = vec![usize::MAX; positions + 1];
        fewest[positions] = 0;
        for i in (0..positions).rev() {
            let t = from + i as i64 * MINUTE_MS;
            for g in Granularity::ALL {
                if let Some(end) = naive_bucket_at(g, t) {
                    if end <= to {
                        let j = usize::try_from((end - from) / MINUTE_MS).unwrap();
                        fewest[i] = fewest[i].min(fewest[j].saturating_add(1));
                    }
                }
            }
        }
        fewest[0]
    }

    fn minute_aligned(max_minutes: i64) -> impl Strategy<Value = i64> {
        (0..max_minutes).prop_map(|m| m * MINUTE_MS)
    }

    proptest! {
        #[test]
        fn decompose_tiles_any_range_exactly(
            from in minute_aligned(YEAR_2200_MS / MINUTE_MS),
            length_minutes in prop_oneof![
                0i64..3 * 24 * 60,
                0i64..400 * 24 * 60,
                0i64..50 * 366 * 24 * 60,
            ],
        ) {
            let to = from + length_minutes * MINUTE_MS;
            let pieces = decompose(from, to);
            prop_assert_eq!(pieces.is_empty(), length_minutes == 0);
            if let Err(problem) = check_tiling(&pieces, from, to) {
                return Err(TestCaseError::fail(problem));
            }
        }

        #[test]
        fn decompose_kept_keeps_every_bucket_and_covers_the_range(
            from in minute_aligned(YEAR_2200_MS / MINUTE_MS),
            length_minutes in prop_oneof![0i64..3 * 24 * 60, 0i64..400 * 24 * 60, 0i64..5 * 366 * 24 * 60],
            back_minutes in prop_oneof![0i64..3 * 24 * 60, 0i64..400 * 24 * 60],
            steps in proptest::collection::vec(0i64..60 * 24 * 60, 4),
        ) {
            let to = from + length_minutes * MINUTE_MS;
            // Floors only grow coarser further back, on coarser boundaries.
            let mut floors = KEEP_ALL;
            let mut at = from + length_minutes * MINUTE_MS / 2 - back_minutes * MINUTE_MS;
            for (i, g) in Granularity::ALL.into_iter().take(4).enumerate() {
                let coarser = g.coarser().unwrap_or(Granularity::Year);
                floors[i] = bucket_start(coarser, at);
                at -= steps[i] * MINUTE_MS;
            }
            let tiling = decompose_kept(from, to, &floors, Granularity::Minute);
            prop_assert!(tiling.buckets.iter().all(|(g, s)| is_kept(&floors, *g, *s)));
            let tiled: Vec<_> = tiling.buckets.clone();
            if let Err(problem) = check_tiling(&tiled, tiling.from_ms, tiling.to_ms) {
                return Err(TestCaseError::fail(problem));
            }
            prop_assert!(tiling.from_ms <= from && tiling.to_ms >= to);
            prop_assert_eq!(tiling.buckets.is_empty(), length_minutes == 0);
            prop_assert_eq!(decompose_kept(from, to, &KEEP_ALL, Granularity::Minute).buckets, decompose(from, to));
            if from >= floors[0] {
                prop_assert_eq!(tiling.buckets, decompose(from, to));
                prop_assert_eq!(tiling.resolution, Granularity::Minute);
            }
        }

        #[test]
        fn decompose_is_minimal_for_short_ranges(
            from in minute_aligned(YEAR_2200_MS / MINUTE_MS),
            length_minutes in 0i64..=3 * 24 * 60,
        ) {
            let to = from + length_minutes * MINUTE_MS;
            prop_assert_eq!(decompose(from, to).len(), min_bucket_count(from, to));
        }

        #[test]
        fn decompose_ragged_edges_are_minimal(
            // Start a few hours/days before a month boundary so ranges often
            // contain whole months and ragged ends.
            month_index in 0i64..(2200 - 1970) * 12,
            lead_minutes in 0i64..3 * 24 * 60,
            length_minutes in 0i64..75 * 24 * 60,
        ) {
            let year = 1970 + month_index / 12;
            let month = u32::try_from(month_index % 12 + 1).unwrap();
            let from = (ms(year, month, 1, 0, 0) - lead_minutes * MINUTE_MS).max(0);
            let to = from + length_minutes * MINUTE_MS;
            let pieces = decompose(from, to);
            if let Err(problem) = check_tiling(&pieces, from, to) {
                return Err(TestCaseError::fail(problem));
            }
            prop_assert_eq!(pieces.len(), min_bucket_count(from, to));
        }

        #[test]
        fn buckets_agree_with_civil_dates(t in 0i64..YEAR_2200_MS) {
            let (year, month, day) = naive_civil(t / DAY_MS);
            let ms_of_day = t % DAY_MS;
            let hour = ms_of_day / HOUR_MS;
            let minute = ms_of_day % HOUR_MS / MINUTE_MS;

            let minute_start = ms(year, month, day, hour, minute);
            let hour_start = ms(year, month, day, hour, 0);
            let day_start = ms(year, month, day, 0, 0);
            let month_start = ms(year, month, 1, 0, 0);
            let next_month_start = month_start + days_in_month(year, month) * DAY_MS;

            prop_assert_eq!(bucket_start(Granularity::Minute, t), minute_start);
            prop_assert_eq!(bucket_start(Granularity::Hour, t), hour_start);
            prop_assert_eq!(bucket_start(Granularity::Day, t), day_start);
            prop_assert_eq!(bucket_start(Granularity::Month, t), month_start);

            prop_assert_eq!(next_bucket_start(Granularity::Minute, t), minute_start + MINUTE_MS);
            prop_assert_eq!(next_bucket_start(Granularity::Hour, t), hour_start + HOUR_MS);
            prop_assert_eq!(next_bucket_start(Granularity::Day, t), day_start + DAY_MS);
            prop_assert_eq!(next_bucket_start(Granularity::Month, t), next_month_start);
            prop_assert_eq!(next_bucket_start(Granularity::Month, month_start), next_month_start);
        }

        #[test]
        fn align_range_is_the_tightest_minute_cover(from in 0i64..YEAR_2200_MS, length in 0i64..10 * DAY_MS) {
            let to = from + length;
            let (aligned_from, aligned_to) = align_range(from, to);
            prop_assert_eq!(aligned_from % MINUTE_MS, 0);
            prop_assert_eq!(aligned_to % MINUTE_MS, 0);
            prop_assert!(aligned_from <= from && from - aligned_from < MINUTE_MS);
            prop_assert!(aligned_to >= to && aligned_to - to < MINUTE_MS);
            prop_assert_eq!(align_range(aligned_from, aligned_to), (aligned_from, aligned_to));
        }

        #[test]
        fn series_starts_are_consecutive_buckets_covering_the_range(
            g_code in 0u8..4,
            from in 0i64..YEAR_2200_MS,
            length in 1i64..90 * DAY_MS,
        ) {
            let g = Granularity::from_u8(g_code).unwrap();
            let to = from + length;
            let starts: Vec<i64> = series_starts(g, from, to).take(200_000).collect();
            prop_assert!(!starts.is_empty());
            prop_assert_eq!(starts[0], bucket_start(g, from));
            for pair in starts.windows(2) {
                prop_assert_eq!(pair[1], next_bucket_start(g, pair[0]));
            }
            let last = starts[starts.len() - 1];
            prop_assert!(last < to);
            prop_assert!(next_bucket_start(g, last) >= to);
        }
    }
}
