//! The one definition of each latency figure Tally reports, shared by
//! `tally bench`, `tally probe-writes`, the benchmark report and the
//! cluster tests, so that docs/BENCHMARKS.md and docs/RELIABILITY.md never
//! compute "p99" two ways.
//!
//! * Streams of latencies (ack latency, queries, visibility) go into an HDR
//!   histogram of microseconds ([`latency_histogram`], [`record`]): bounded
//!   memory whatever the run length, 3 significant digits.
//! * Small sets of exact values (one kill → first write per partition) use
//!   the nearest-rank percentile ([`percentile`]): the smallest value with
//!   at least `q` of the values at or below it. It is always one of the
//!   measured values (no interpolation), and for p99 of fewer than 100
//!   values it is the maximum, which is the honest answer for so few.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// The largest latency a histogram holds: 10 minutes, in microseconds.
/// Longer ones are recorded as this (`saturating_record`).
const MAX_MICROS: u64 = 600_000_000;

/// An empty latency histogram: microseconds, 1 µs to 10 minutes, 3
/// significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    match Histogram::new_with_bounds(1, MAX_MICROS, 3) {
        Ok(h) => h,
        // The bounds are constants that hdrhistogram accepts (low ≥ 1,
        // high ≥ 2 × low, sigfig ≤ 5); only a change here could fail.
        Err(e) => unreachable!("constant histogram bounds rejected: {e}"),
    }
}

/// Records `d`, rounded down to whole microseconds and at least 1.
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record(u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1));
}

/// Nearest-rank percentile `q` (0 < q ≤ 1) of ascending `sorted`; `None`
/// when it is empty.
pub fn percentile<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// Percentiles of a latency histogram, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyMs {
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub p999: Option<f64>,
    pub max: Option<f64>,
    /// Absent where a report never had it (the ack latency of older runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean: Option<f64>,
    /// Values recorded.
    #[serde(default)]
    pub count: u64,
}

impl LatencyMs {
    /// The figures of `h` (microseconds). An empty histogram gives `None`
    /// everywhere rather than zeros, so a load that measured nothing cannot
    /// pass for an instant one.
    pub fn of(h: &Histogram<u64>) -> LatencyMs {
        if h.is_empty() {
            return LatencyMs::default();
        }
        let ms = |v: u64| Some(v as f64 / 1000.0);
        LatencyMs {
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: Some(h.mean() / 1000.0),
            count: h.len(),
        }
    }
}

/// Nearest-rank p50, p99, the maximum and the count of exact millisecond
/// values (e.g. every partition's kill → first write).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RankedMs {
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
    pub count: usize,
}

impl RankedMs {
    /// The figures of `values`, in any order.
    pub fn of(values: &[f64]) -> RankedMs {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        RankedMs {
            p50: percentile(&sorted, 0.5),
            p99: percentile(&sorted, 0.99),
            max: sorted.last().copied(),
            count: sorted.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&v, 1.0), Some(100.0));
        assert_eq!(percentile(&[4.0], 0.99), Some(4.0));
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 0.5), Some(2.0));
        assert_eq!(percentile::<f64>(&[], 0.5), None);
        let d: Vec<Duration> = (1..=10).map(Duration::from_secs).collect();
        assert_eq!(percentile(&d, 0.99), Some(Duration::from_secs(10)), "p99 of 10 values is the max");
    }

    #[test]
    fn ranked_sorts_first() {
        let r = RankedMs::of(&[3.0, 1.0, 2.0]);
        assert_eq!((r.p50, r.p99, r.max, r.count), (Some(2.0), Some(3.0), Some(3.0), 3));
        assert_eq!(RankedMs::of(&[]), RankedMs::default());
    }

    #[test]
    fn histogram_figures_in_milliseconds_and_none_when_empty() {
        let mut h = latency_histogram();
        for ms in 1..=1000u64 {
            record(&mut h, Duration::from_millis(ms));
        }
        let s = LatencyMs::of(&h);
        let near = |v: Option<f64>, want: f64| v.is_some_and(|v| (v - want).abs() <= 1.0);
        assert_eq!(s.count, 1000);
        assert!(near(s.p50, 500.0) && near(s.p99, 990.0) && near(s.max, 1000.0), "{s:?}");
        assert_eq!(LatencyMs::of(&latency_histogram()), LatencyMs::default());
    }
}
