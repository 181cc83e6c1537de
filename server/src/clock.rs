//! Wall-clock time the dedup window can trust.
//!
//! Dedup keys are stamped with the leader's wall clock and expire a window
//! later, measured along the log (every replica expires at the same entry).
//! A leader whose clock runs ahead would expire keys early — a retry inside
//! the real window could then count twice — and one far in the future would
//! stamp keys that never expire. So a leader does not take its own clock on
//! faith: every liveness ping also reads the peer's clock (offset estimated
//! from the round trip, as NTP does), and when this node's clock differs
//! from the cluster's lower median by more than `max_skew`, stamps follow
//! the cluster instead. The lower median errs towards earlier stamps, and an
//! early stamp only keeps a key longer: the safe direction. The state
//! machine adds the other half: a stamp never goes below the previous
//! entry's (`DedupState::stamp`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::sync::MutexExt;
use crate::type_config::NodeId;

/// Readings older than this are ignored: a peer that stopped answering no
/// longer vouches for the time.
const READING_TTL: Duration = Duration::from_secs(30);
/// Round trips longer than this give too coarse an offset to use.
const MAX_RTT_MS: u64 = 1_000;

pub struct ClusterClock {
    /// Test-only shift of this node's clock (`--clock-offset-ms`).
    test_offset_ms: i64,
    max_skew_ms: i64,
    /// Peer → (its clock minus ours, ms; when read).
    readings: Mutex<HashMap<NodeId, (i64, Instant)>>,
}

/// A stamp and how far this node's own clock is from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrustedTime {
    pub now_ms: u64,
    /// Cluster time minus local time; 0 when the local clock is trusted.
    pub correction_ms: i64,
}

impl ClusterClock {
    pub fn new(test_offset_ms: i64, max_skew: Duration) -> ClusterClock {
        ClusterClock { test_offset_ms, max_skew_ms: max_skew.as_millis() as i64, readings: Mutex::default() }
    }

    /// This node's wall clock, ms since the epoch.
    pub fn local_ms(&self) -> u64 {
        let system = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
        system.saturating_add(self.test_offset_ms).max(0) as u64
    }

    /// A ping sent at `sent_ms` and answered at `received_ms` (local clock)
    /// carried the peer's clock `peer_ms`.
    pub fn observe(&self, peer: NodeId, sent_ms: u64, peer_ms: u64, received_ms: u64) {
        if received_ms < sent_ms || received_ms - sent_ms > MAX_RTT_MS || peer_ms == 0 {
            return;
        }
        let midpoint = (sent_ms / 2 + received_ms / 2) as i64;
        let offset = peer_ms as i64 - midpoint;
        self.readings.lock_unpoisoned().insert(peer, (offset, Instant::now()));
    }

    /// Whether a peer's clock was read within the last readings' lifetime:
    /// until then (just started, or cut off) this node cannot tell whether
    /// its own clock is off.
    pub fn checked_by_peers(&self) -> bool {
        self.readings.lock_unpoisoned().values().any(|(_, at)| at.elapsed() < READING_TTL)
    }

    /// The time to stamp with now.
    pub fn trusted(&self) -> TrustedTime {
        let local = self.local_ms();
        let mut offsets = vec![0i64];
        offsets.extend(
            self.readings.lock_unpoisoned().values().filter(|(_, at)| at.elapsed() < READING_TTL).map(|(o, _)| *o),
        );
        let correction = decide_correction(&mut offsets, self.max_skew_ms);
        TrustedTime { now_ms: (local as i64).saturating_add(correction).max(0) as u64, correction_ms: correction }
    }
}

/// Offsets of every clock from ours (ours is 0): the correction to apply to
/// our clock — the lower median when we are further than `max_skew` from it.
fn decide_correction(offsets: &mut [i64], max_skew_ms: i64) -> i64 {
    offsets.sort_unstable();
    let median = offsets.get((offsets.len().max(1) - 1) / 2).copied().unwrap_or(0);
    if median.abs() > max_skew_ms {
        median
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN11: i64 = 11 * 60_000;

    #[test]
    fn a_clock_far_ahead_of_its_peers_follows_them() {
        // We are 11 minutes ahead: both peers read 11 minutes behind us.
        assert_eq!(decide_correction(&mut [0, -MIN11, -MIN11 + 3], 2_000), -MIN11 + 3);
        // We are 11 minutes behind.
        assert_eq!(decide_correction(&mut [0, MIN11, MIN11], 2_000), MIN11);
    }

    #[test]
    fn one_skewed_peer_does_not_move_a_good_clock() {
        assert_eq!(decide_correction(&mut [0, 5, MIN11], 2_000), 0);
        assert_eq!(decide_correction(&mut [0, 5, -MIN11], 2_000), 0);
        assert_eq!(decide_correction(&mut [0], 2_000), 0);
    }

    #[test]
    fn with_two_clocks_the_earlier_wins() {
        // Cannot tell who is wrong: the earlier clock keeps keys longer.
        assert_eq!(decide_correction(&mut [0, -MIN11], 2_000), -MIN11);
        assert_eq!(decide_correction(&mut [0, MIN11], 2_000), 0);
    }

    #[test]
    fn readings_correct_the_local_clock() {
        let clock = ClusterClock::new(MIN11, Duration::from_secs(2));
        let local = clock.local_ms();
        let real = local - MIN11 as u64;
        clock.observe(2, local, real, local + 2);
        clock.observe(3, local, real + 1, local + 2);
        let t = clock.trusted();
        assert!((t.now_ms as i64 - real as i64).abs() < 1_000, "{t:?}");
        // A slow round trip is ignored.
        let c2 = ClusterClock::new(0, Duration::from_secs(2));
        c2.observe(2, 1_000, 99_000_000, 5_000);
        assert_eq!(c2.trusted().correction_ms, 0);
    }
}
