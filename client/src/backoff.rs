//! Exponential backoff with full jitter, bounded by an attempt count and an
//! overall deadline.
//!
//! Why full jitter: when a leader dies, every client with a batch for its
//! partitions fails at the same moment. Plain exponential backoff makes them
//! retry in lock-step waves that hit the new leader together; "full jitter"
//! (sleep a uniformly random time in `[0, min(max, initial × 2^n)]`) spreads
//! them evenly instead, which is the variant with the least total work in
//! the well-known AWS analysis of backoff strategies.
//!
//! Why hand-written rather than tower's `retry::backoff`: tower's
//! `ExponentialBackoff` adds a bounded jitter on top of the exponential
//! delay (not full jitter) and lives behind tower's `retry` feature, whose
//! `Policy` machinery the client does not use (see `dispatch.rs` for why
//! retries are Tally's own). What is needed fits in a few lines here and is
//! unit tested for its bounds.

use std::time::{Duration, Instant};

use rand::Rng;

/// How often and how long to retry.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in total, the first one included. 1 means "never retry".
    pub max_attempts: u32,
    /// Ceiling of the first backoff; doubles with every further attempt.
    pub initial_backoff: Duration,
    /// Largest ceiling.
    pub max_backoff: Duration,
    /// Time from the first attempt after which no new attempt starts.
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 12,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            deadline: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The upper bound of the backoff before retry number `retry` (1 for the
    /// first retry): `min(max_backoff, initial_backoff × 2^(retry-1))`,
    /// without overflow for any `retry`.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let doublings = retry.saturating_sub(1).min(31);
        self.initial_backoff.checked_mul(1u32 << doublings).unwrap_or(self.max_backoff).min(self.max_backoff)
    }

    /// A backoff drawn uniformly from `[0, ceiling(retry)]` ("full jitter").
    pub fn full_jitter<R: Rng + ?Sized>(&self, retry: u32, rng: &mut R) -> Duration {
        let ceiling = self.ceiling(retry);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.random_range(0..=nanos))
    }

    /// Starts counting attempts for one operation.
    pub fn start(&self, now: Instant) -> Retry {
        Retry { policy: self.clone(), started: now, attempts: 1 }
    }
}

/// The retry state of one operation: which attempt this is and when it
/// began. The first attempt is counted by [`RetryPolicy::start`].
#[derive(Debug, Clone)]
pub struct Retry {
    policy: RetryPolicy,
    started: Instant,
    attempts: u32,
}

impl Retry {
    /// Attempts made so far.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Time since the first attempt.
    pub fn elapsed(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.started)
    }

    /// Whether another attempt is allowed, and after which pause. `None`
    /// when the attempts are used up or the pause would end past the
    /// deadline. Counts the new attempt.
    pub fn next_delay<R: Rng + ?Sized>(&mut self, now: Instant, rng: &mut R) -> Option<Duration> {
        if self.attempts >= self.policy.max_attempts {
            return None;
        }
        let delay = self.policy.full_jitter(self.attempts, rng);
        if self.elapsed(now) + delay >= self.policy.deadline {
            return None;
        }
        self.attempts += 1;
        Some(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            deadline: Duration::from_secs(10),
        }
    }

    #[test]
    fn ceiling_doubles_then_caps() {
        let p = policy();
        let ms = |r| p.ceiling(r).as_millis();
        assert_eq!([ms(0), ms(1), ms(2), ms(3), ms(4), ms(5)], [100, 100, 200, 400, 800, 1000]);
        // No overflow for absurd attempt numbers.
        assert_eq!(p.ceiling(u32::MAX), Duration::from_secs(1));
        let huge = RetryPolicy { initial_backoff: Duration::MAX, max_backoff: Duration::MAX, ..p };
        assert_eq!(huge.ceiling(40), Duration::MAX);
    }

    #[test]
    fn full_jitter_stays_within_bounds_and_spreads() {
        let p = policy();
        let mut rng = StdRng::seed_from_u64(7);
        for retry in 1..8 {
            let ceiling = p.ceiling(retry);
            let draws: Vec<Duration> = (0..2_000).map(|_| p.full_jitter(retry, &mut rng)).collect();
            assert!(draws.iter().all(|d| *d <= ceiling), "retry {retry}: a draw above {ceiling:?}");
            // Uniform on [0, ceiling]: the mean is near ceiling / 2 and both
            // halves are used, i.e. it really is full jitter.
            let mean = draws.iter().sum::<Duration>() / 2_000;
            let half = ceiling / 2;
            assert!(mean > half.mul_f64(0.9) && mean < half.mul_f64(1.1), "retry {retry}: mean {mean:?}");
            assert!(draws.iter().any(|d| *d < ceiling / 10));
            assert!(draws.iter().any(|d| *d > ceiling.mul_f64(0.9)));
        }
    }

    #[test]
    fn zero_backoff_is_allowed() {
        let p = RetryPolicy { initial_backoff: Duration::ZERO, ..policy() };
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(p.full_jitter(3, &mut rng), Duration::ZERO);
    }

    #[test]
    fn attempts_are_bounded() {
        let p = policy();
        let mut rng = StdRng::seed_from_u64(3);
        let now = Instant::now();
        let mut retry = p.start(now);
        let mut granted = 0;
        while retry.next_delay(now, &mut rng).is_some() {
            granted += 1;
        }
        assert_eq!(granted, 4, "5 attempts = the first + 4 retries");
        assert_eq!(retry.attempts(), 5);
    }

    #[test]
    fn deadline_stops_retries() {
        let p = RetryPolicy { max_attempts: 1000, ..policy() };
        let mut rng = StdRng::seed_from_u64(3);
        let start = Instant::now();
        let mut retry = p.start(start);
        assert!(retry.next_delay(start, &mut rng).is_some());
        // Past the deadline nothing more is granted.
        assert!(retry.next_delay(start + Duration::from_secs(10), &mut rng).is_none());
        // Just before it, a pause that would end after it is refused too.
        let mut late = p.start(start);
        let refused = (0..100).any(|_| late.next_delay(start + Duration::from_millis(9_999), &mut rng).is_none());
        assert!(refused);
    }
}
