//! A circuit breaker per node: stop sending to a node that keeps failing,
//! probe it now and then, and take it back when a probe succeeds.
//!
//! Why: without it, a dead or wedged node costs every batch routed to it a
//! full connect or request timeout before the retry goes elsewhere. With
//! it, after a few failures the node is skipped outright (requests go to
//! another node, which forwards to the partition's leader) until a single
//! probe shows it is back.
//!
//! States:
//! * **Closed**: requests flow; outcomes are counted in a sliding window of
//!   ten buckets spanning `window`. When the window holds at least
//!   `min_requests` outcomes and the failure fraction reaches
//!   `failure_rate`, the breaker opens.
//! * **Open**: requests are refused for `open_for`.
//! * **Half-open**: one probe request is let through; success closes the
//!   breaker with a fresh window, failure opens it again. A probe whose
//!   outcome is never reported (its caller was cancelled) expires after
//!   `open_for`, so the breaker cannot stay stuck half-open.
//!
//! Why hand-written: tower has no circuit breaker, and the crates that add
//! one either wrap a single `Service` (the client needs one breaker per node
//! shared by its ingest and query stubs, and must count a request that
//! *succeeded at transport level* but timed out inside the cluster
//! differently from a refused connection) or are unmaintained. The state
//! machine is small, takes the clock as an argument and is unit tested
//! transition by transition.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// When a breaker opens and for how long.
#[derive(Debug, Clone)]
pub struct BreakerConfig {
    /// Span of the sliding window of outcomes.
    pub window: Duration,
    /// Fewest outcomes in the window before the failure rate is judged, so
    /// one failed request on an idle client does not open the breaker.
    pub min_requests: u32,
    /// Failure fraction (0..=1) at which the breaker opens.
    pub failure_rate: f64,
    /// How long an open breaker refuses requests before a probe.
    pub open_for: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            window: Duration::from_secs(10),
            min_requests: 5,
            failure_rate: 0.5,
            open_for: Duration::from_secs(1),
        }
    }
}

impl BreakerConfig {
    pub(crate) fn validate(&self) -> Result<(), &'static str> {
        if self.window < Duration::from_millis(BUCKETS as u64) {
            return Err("breaker.window must be at least 10 ms");
        }
        if !(self.failure_rate > 0.0 && self.failure_rate <= 1.0) {
            return Err("breaker.failure_rate must be in (0, 1]");
        }
        if self.min_requests == 0 {
            return Err("breaker.min_requests must be at least 1");
        }
        Ok(())
    }
}

/// The externally visible state of a breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests flow normally.
    Closed,
    /// Requests are refused.
    Open,
    /// One probe is allowed (or in flight).
    HalfOpen,
}

const BUCKETS: usize = 10;

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Which bucket-width slot since the breaker's creation this counts.
    slot: u64,
    successes: u32,
    failures: u32,
}

#[derive(Debug)]
enum Mode {
    Closed,
    Open { until: Instant },
    HalfOpen { probe_started: Option<Instant> },
}

#[derive(Debug)]
struct State {
    mode: Mode,
    buckets: [Bucket; BUCKETS],
}

/// A thread-safe circuit breaker. Cheap: one short mutex section per call.
#[derive(Debug)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    origin: Instant,
    state: Mutex<State>,
}

impl CircuitBreaker {
    /// A closed breaker; `now` anchors its window.
    pub fn new(config: BreakerConfig, now: Instant) -> CircuitBreaker {
        CircuitBreaker {
            config,
            origin: now,
            state: Mutex::new(State { mode: Mode::Closed, buckets: [Bucket::default(); BUCKETS] }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves counters that are
        // still meaningful; keep going rather than propagate the poison.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn slot(&self, now: Instant) -> u64 {
        let width = (self.config.window / BUCKETS as u32).as_nanos().max(1);
        u64::try_from(now.saturating_duration_since(self.origin).as_nanos() / width).unwrap_or(u64::MAX)
    }

    /// The state at `now` (an open breaker whose time is up reads half-open).
    pub fn state(&self, now: Instant) -> BreakerState {
        match self.lock().mode {
            Mode::Closed => BreakerState::Closed,
            Mode::Open { until } if now < until => BreakerState::Open,
            Mode::Open { .. } | Mode::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Whether a request may be sent now. In half-open state this claims
    /// the single probe, so call it only right before actually sending, and
    /// report the outcome with [`on_success`](Self::on_success) or
    /// [`on_failure`](Self::on_failure).
    pub fn try_acquire(&self, now: Instant) -> bool {
        let mut state = self.lock();
        match state.mode {
            Mode::Closed => true,
            Mode::Open { until } if now < until => false,
            Mode::Open { .. } => {
                state.mode = Mode::HalfOpen { probe_started: Some(now) };
                true
            }
            Mode::HalfOpen { probe_started: Some(started) }
                if now.saturating_duration_since(started) < self.config.open_for =>
            {
                false
            }
            Mode::HalfOpen { .. } => {
                state.mode = Mode::HalfOpen { probe_started: Some(now) };
                true
            }
        }
    }

    /// Whether a request would be allowed, without claiming a probe.
    pub fn would_allow(&self, now: Instant) -> bool {
        let state = self.lock();
        match state.mode {
            Mode::Closed => true,
            Mode::Open { until } => now >= until,
            Mode::HalfOpen { probe_started: Some(started) } => {
                now.saturating_duration_since(started) >= self.config.open_for
            }
            Mode::HalfOpen { probe_started: None } => true,
        }
    }

    /// Reports a request that the node answered properly.
    pub fn on_success(&self, now: Instant) {
        let slot = self.slot(now);
        let mut state = self.lock();
        match state.mode {
            Mode::Closed => bucket(&mut state, slot).successes += 1,
            Mode::HalfOpen { .. } | Mode::Open { .. } => {
                // The probe (or a request sent before the breaker opened)
                // got through: the node is back. Start a clean window.
                state.mode = Mode::Closed;
                state.buckets = [Bucket::default(); BUCKETS];
            }
        }
    }

    /// Reports a request that failed because of the node (refused, reset,
    /// timed out).
    pub fn on_failure(&self, now: Instant) {
        let slot = self.slot(now);
        let mut state = self.lock();
        match state.mode {
            Mode::Closed => {
                bucket(&mut state, slot).failures += 1;
                let (successes, failures) = totals(&state, slot);
                let total = successes + failures;
                if total >= u64::from(self.config.min_requests)
                    && failures as f64 >= self.config.failure_rate * total as f64
                {
                    state.mode = Mode::Open { until: now + self.config.open_for };
                }
            }
            Mode::HalfOpen { .. } => state.mode = Mode::Open { until: now + self.config.open_for },
            // Late failures of requests sent before opening change nothing.
            Mode::Open { .. } => {}
        }
    }
}

fn bucket(state: &mut State, slot: u64) -> &mut Bucket {
    let b = &mut state.buckets[(slot % BUCKETS as u64) as usize];
    if b.slot != slot {
        *b = Bucket { slot, successes: 0, failures: 0 };
    }
    b
}

/// Successes and failures in the window ending at `slot`.
fn totals(state: &State, slot: u64) -> (u64, u64) {
    state
        .buckets
        .iter()
        .filter(|b| b.slot <= slot && slot - b.slot < BUCKETS as u64)
        .fold((0, 0), |(s, f), b| (s + u64::from(b.successes), f + u64::from(b.failures)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BreakerConfig {
        BreakerConfig {
            window: Duration::from_secs(10),
            min_requests: 4,
            failure_rate: 0.5,
            open_for: Duration::from_secs(1),
        }
    }

    #[test]
    fn stays_closed_below_min_requests() {
        let t0 = Instant::now();
        let b = CircuitBreaker::new(config(), t0);
        for _ in 0..3 {
            b.on_failure(t0);
        }
        assert_eq!(b.state(t0), BreakerState::Closed);
        assert!(b.try_acquire(t0));
    }

    #[test]
    fn stays_closed_below_failure_rate() {
        let t0 = Instant::now();
        let b = CircuitBreaker::new(config(), t0);
        for _ in 0..10 {
            b.on_success(t0);
            b.on_success(t0);
            b.on_failure(t0);
        }
        assert_eq!(b.state(t0), BreakerState::Closed);
    }

    #[test]
    fn opens_at_failure_rate_then_refuses() {
        let t0 = Instant::now();
        let b = CircuitBreaker::new(config(), t0);
        b.on_success(t0);
        b.on_success(t0);
        b.on_failure(t0);
        assert_eq!(b.state(t0), BreakerState::Closed);
        b.on_failure(t0); // 2 of 4 = 50 %
        assert_eq!(b.state(t0), BreakerState::Open);
        assert!(!b.try_acquire(t0));
        assert!(!b.would_allow(t0 + Duration::from_millis(999)));
    }

    #[test]
    fn half_open_allows_exactly_one_probe_and_success_closes() {
        let t0 = Instant::now();
        let b = opened(t0);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.state(t1), BreakerState::HalfOpen);
        assert!(b.would_allow(t1));
        assert!(b.try_acquire(t1), "the probe");
        assert!(!b.try_acquire(t1), "only one probe at a time");
        assert!(!b.would_allow(t1));
        b.on_success(t1);
        assert_eq!(b.state(t1), BreakerState::Closed);
        // The window was reset: one new failure does not reopen it.
        b.on_failure(t1);
        assert_eq!(b.state(t1), BreakerState::Closed);
    }

    /// A breaker opened by four failures at `t0`.
    fn opened(t0: Instant) -> CircuitBreaker {
        let b = CircuitBreaker::new(config(), t0);
        for _ in 0..4 {
            b.on_failure(t0);
        }
        b
    }

    #[test]
    fn failed_probe_reopens() {
        let t0 = Instant::now();
        let b = opened(t0);
        let t1 = t0 + Duration::from_secs(1);
        assert!(b.try_acquire(t1));
        b.on_failure(t1);
        assert_eq!(b.state(t1), BreakerState::Open);
        assert!(!b.try_acquire(t1 + Duration::from_millis(500)));
        assert!(b.try_acquire(t1 + Duration::from_secs(1)), "next probe after open_for");
    }

    #[test]
    fn lost_probe_expires() {
        let t0 = Instant::now();
        let b = opened(t0);
        let t1 = t0 + Duration::from_secs(1);
        assert!(b.try_acquire(t1));
        // The probe's outcome is never reported.
        assert!(!b.try_acquire(t1 + Duration::from_millis(999)));
        assert!(b.try_acquire(t1 + Duration::from_secs(1)));
    }

    #[test]
    fn old_failures_leave_the_window() {
        let t0 = Instant::now();
        let b = CircuitBreaker::new(config(), t0);
        for _ in 0..3 {
            b.on_failure(t0);
        }
        // 11 s later the three failures are outside the 10 s window.
        let later = t0 + Duration::from_secs(11);
        b.on_success(later);
        b.on_success(later);
        b.on_success(later);
        b.on_failure(later);
        assert_eq!(b.state(later), BreakerState::Closed, "1 failure in 4 is below 50 %");
        // Within the window they would have counted: 4 failures of 7.
        let c = CircuitBreaker::new(config(), t0);
        for _ in 0..3 {
            c.on_failure(t0);
        }
        let soon = t0 + Duration::from_secs(5);
        c.on_success(soon);
        c.on_success(soon);
        c.on_success(soon);
        c.on_failure(soon);
        assert_eq!(c.state(soon), BreakerState::Open);
    }

    #[test]
    fn late_success_while_open_closes() {
        let t0 = Instant::now();
        let b = opened(t0);
        b.on_success(t0 + Duration::from_millis(10));
        assert_eq!(b.state(t0 + Duration::from_millis(10)), BreakerState::Closed);
    }

    #[test]
    fn config_validation() {
        assert!(config().validate().is_ok());
        assert!(BreakerConfig { failure_rate: 0.0, ..config() }.validate().is_err());
        assert!(BreakerConfig { failure_rate: 1.5, ..config() }.validate().is_err());
        assert!(BreakerConfig { min_requests: 0, ..config() }.validate().is_err());
        assert!(BreakerConfig { window: Duration::ZERO, ..config() }.validate().is_err());
    }
}
