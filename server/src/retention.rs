//! Retention: how long each granularity's buckets are kept, and which
//! buckets that leaves at a given log time.
//!
//! The policy is cluster state, held by the metadata group beside the map
//! (`Command::SetRetention`), so every node reads the same one. What
//! expires in a partition, though, must not depend on any node's view or
//! clock: replicas of a partition must hold equal state at equal log
//! positions. So a partition's leader turns the policy into *floors* — per
//! granularity, the start of the oldest bucket kept — at its cluster-checked
//! clock, and commits them to the partition's own log (`Command::Expire`,
//! proposed by `expiry.rs`). Applying that entry is what expires buckets, on
//! every replica alike; floors never move back.
//!
//! Floors move in steps of the next coarser bucket (minutes an hour at a
//! time, hours a day, days a month, months and years a year): a bucket is
//! kept at least its retention and at most one step longer, and an idle
//! partition needs an entry at most once an hour to keep up.

use serde::{Deserialize, Serialize};
use tally_proto::time::{bucket_start, Floors, Granularity, DAY_MS, HOUR_MS, KEEP_ALL};

/// Longest retention accepted: 1,000 years (more is "forever", 0).
const MAX_RETENTION_MS: u64 = 1_000 * 366 * DAY_MS as u64;

/// Per granularity, how long its buckets are kept in ms; 0 = forever.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Indexed by `Granularity::as_u8`: minute, hour, day, month, year.
    pub keep_ms: [u64; 5],
    /// Buckets that ended at least this long ago go to the cold archive
    /// (`archiver.rs`), and no event for them is counted any more; 0 = no
    /// archive. Once a partition archives, retention drops only archived
    /// buckets.
    pub archive_after_ms: u64,
}

impl Default for RetentionPolicy {
    /// Minutes 14 days, hours 400 days, days, months and years forever.
    fn default() -> Self {
        RetentionPolicy { keep_ms: [14 * DAY_MS as u64, 400 * DAY_MS as u64, 0, 0, 0], archive_after_ms: 0 }
    }
}

/// A policy the rules refuse, naming the granularity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RetentionError {
    #[error("{0}_ms: must be 0 (forever) or at least {1} ms, one {2} (expiry runs in {2} steps), got {3}")]
    TooShort(Granularity, u64, &'static str, u64),
    #[error("{0}_ms: at most {MAX_RETENTION_MS} ms (1,000 years; 0 keeps forever), got {1}")]
    TooLong(Granularity, u64),
    #[error("archive_after_ms: must be 0 (no archive) or at least {HOUR_MS} ms, one hour (buckets are sealed a whole hour at a time), and at most {MAX_RETENTION_MS}, got {0}")]
    ArchiveAfter(u64),
    #[error("{coarser}_ms: must keep {coarser} buckets at least as long as {finer} buckets ({finer}_ms is {finer_ms}, {coarser}_ms is {coarser_ms}; 0 = forever)")]
    CoarserShorter { finer: Granularity, finer_ms: u64, coarser: Granularity, coarser_ms: u64 },
}

impl RetentionPolicy {
    /// The retention of `granularity`, `None` for forever.
    pub fn keep(&self, granularity: Granularity) -> Option<u64> {
        Some(self.keep_ms[usize::from(granularity.as_u8())]).filter(|ms| *ms > 0)
    }

    /// Checks the rules in `tally.proto`'s RetentionPolicy: each value 0 or
    /// at least one step, and coarser kept at least as long as finer — so
    /// every range stays answerable at some resolution.
    pub fn validate(&self) -> Result<(), RetentionError> {
        let archive = self.archive_after_ms;
        if archive != 0 && !(HOUR_MS as u64..=MAX_RETENTION_MS).contains(&archive) {
            return Err(RetentionError::ArchiveAfter(archive));
        }
        for g in Granularity::ALL {
            let Some(ms) = self.keep(g) else { continue };
            let (step_ms, step) = step(g);
            if ms < step_ms {
                return Err(RetentionError::TooShort(g, step_ms, step, ms));
            }
            if ms > MAX_RETENTION_MS {
                return Err(RetentionError::TooLong(g, ms));
            }
        }
        for pair in Granularity::ALL.windows(2) {
            let (finer, coarser) = (pair[0], pair[1]);
            let shorter = match (self.keep(finer), self.keep(coarser)) {
                (None, Some(_)) => true,
                (Some(f), Some(c)) => c < f,
                _ => false,
            };
            if shorter {
                return Err(RetentionError::CoarserShorter {
                    finer,
                    finer_ms: self.keep_ms[usize::from(finer.as_u8())],
                    coarser,
                    coarser_ms: self.keep_ms[usize::from(coarser.as_u8())],
                });
            }
        }
        Ok(())
    }

    /// The floors this policy gives at log time `now_ms`: for each
    /// granularity kept for a while, the start of the step (one bucket of
    /// the next coarser granularity) holding `now − retention`.
    /// The archive seal at log time `now_ms`: the start of the hour (the
    /// day, when archiving after a day or more: one file a day per
    /// partition) holding `now − archive_after`; `None` without an archive.
    pub fn seal_at(&self, now_ms: i64) -> Option<i64> {
        let after = i64::try_from(self.archive_after_ms).ok().filter(|ms| *ms > 0)?;
        let step = if after >= DAY_MS { Granularity::Day } else { Granularity::Hour };
        Some(bucket_start(step, now_ms.saturating_sub(after)))
    }

    pub fn floors_at(&self, now_ms: i64) -> Floors {
        let mut floors = KEEP_ALL;
        for g in Granularity::ALL {
            if let Some(keep) = self.keep(g) {
                let cutoff = now_ms.saturating_sub(i64::try_from(keep).unwrap_or(i64::MAX));
                floors[usize::from(g.as_u8())] = bucket_start(g.coarser().unwrap_or(Granularity::Year), cutoff);
            }
        }
        floors
    }
}

/// The step floors of `granularity` move by: its shortest length, and name.
fn step(granularity: Granularity) -> (u64, &'static str) {
    match granularity {
        Granularity::Minute => (HOUR_MS as u64, "hour"),
        Granularity::Hour => (DAY_MS as u64, "day"),
        Granularity::Day => (31 * DAY_MS as u64, "month"),
        Granularity::Month | Granularity::Year => (366 * DAY_MS as u64, "year"),
    }
}

/// `floors` raised to at least `other`, granularity by granularity: floors
/// only move forward.
pub fn raise(floors: &Floors, other: &Floors) -> Floors {
    let mut out = *floors;
    for (mine, theirs) in out.iter_mut().zip(other) {
        *mine = (*mine).max(*theirs);
    }
    out
}

/// Human form of a retention for messages: "14 days", "forever".
pub fn describe(keep_ms: Option<u64>) -> String {
    match keep_ms {
        None => "forever".to_owned(),
        Some(ms) if ms % DAY_MS as u64 == 0 => plural(ms / DAY_MS as u64, "day"),
        Some(ms) if ms % HOUR_MS as u64 == 0 => plural(ms / HOUR_MS as u64, "hour"),
        Some(ms) => plural(ms, "ms"),
    }
}

fn plural(n: u64, unit: &str) -> String {
    match (n, unit) {
        (1, _) | (_, "ms") => format!("{n} {unit}"),
        _ => format!("{n} {unit}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_keep_coarse_forever() {
        let policy = RetentionPolicy::default();
        assert_eq!(policy.validate(), Ok(()));
        assert_eq!(policy.keep(Granularity::Day), None);
        let floors = policy.floors_at(400 * DAY_MS + 5 * HOUR_MS);
        // 14 days back from day 400, 05:00 is day 386, 05:00: the minutes
        // of that hour are still kept.
        assert_eq!(floors[0], 386 * DAY_MS + 5 * HOUR_MS);
        // 400 days back is day 0, 05:00: hours from the start of that day.
        assert_eq!(floors[1], 0);
        assert_eq!(floors[2], i64::MIN);
    }

    #[test]
    fn rules_name_the_granularity() {
        let short = RetentionPolicy { keep_ms: [60_000, 0, 0, 0, 0], archive_after_ms: 0 };
        assert!(short.validate().unwrap_err().to_string().starts_with("minute_ms: must be 0 (forever) or at least"));
        let inverted =
            RetentionPolicy { keep_ms: [10 * DAY_MS as u64, 2 * DAY_MS as u64, 0, 0, 0], archive_after_ms: 0 };
        assert!(inverted.validate().unwrap_err().to_string().starts_with("hour_ms: must keep hour buckets"));
        let finite_after_forever = RetentionPolicy { keep_ms: [0, 400 * DAY_MS as u64, 0, 0, 0], archive_after_ms: 0 };
        assert!(finite_after_forever.validate().is_err());
        let all_finite = RetentionPolicy {
            keep_ms: [HOUR_MS as u64, DAY_MS as u64, 400 * DAY_MS as u64, 800 * DAY_MS as u64, 900 * DAY_MS as u64],
            archive_after_ms: 0,
        };
        assert_eq!(all_finite.validate(), Ok(()));
        assert!(RetentionPolicy { keep_ms: [0, 0, 0, 0, u64::MAX], archive_after_ms: 0 }.validate().is_err());
        let archive = |ms| RetentionPolicy { archive_after_ms: ms, ..RetentionPolicy::default() };
        assert!(archive(60_000).validate().unwrap_err().to_string().starts_with("archive_after_ms: must be 0"));
        assert_eq!(archive(HOUR_MS as u64).validate(), Ok(()));
        assert_eq!(archive(HOUR_MS as u64).seal_at(5 * HOUR_MS + 30 * 60_000), Some(4 * HOUR_MS));
        assert_eq!(RetentionPolicy::default().seal_at(5 * HOUR_MS), None);
        assert_eq!(archive(DAY_MS as u64).seal_at(3 * DAY_MS + 5 * HOUR_MS), Some(2 * DAY_MS));
    }

    #[test]
    fn descriptions_read_well() {
        assert_eq!(describe(None), "forever");
        assert_eq!(describe(Some(HOUR_MS as u64)), "1 hour");
        assert_eq!(describe(Some(14 * DAY_MS as u64)), "14 days");
        assert_eq!(describe(Some(1_500)), "1500 ms");
    }

    #[test]
    fn floors_only_rise() {
        let a = [1, 5, i64::MIN, i64::MIN, i64::MIN];
        let b = [3, 2, 7, i64::MIN, i64::MIN];
        assert_eq!(raise(&a, &b), [3, 5, 7, i64::MIN, i64::MIN]);
    }
}
