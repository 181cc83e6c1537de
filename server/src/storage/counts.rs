//! The value stored per (entity, type, granularity, bucket): a count and a
//! sum, combined by a RocksDB merge operator so applying a batch is a blind
//! write per bucket — no read-modify-write on the apply path.
//!
//! RocksDB folds merge operands in groupings that depend on flushes,
//! compactions and read paths, which differ from replica to replica. The
//! arithmetic must therefore be associative and commutative, or replicas of
//! the same log could disagree. Saturating i64 addition is neither
//! (`(MAX + 1) + -1` ≠ `MAX + (1 + -1)`); addition modulo 2¹²⁸ is both. And
//! it never actually wraps: events carry i64 values and a bucket holds at
//! most 2⁶⁴ of them, so |sum| ≤ 2⁶³·2⁶⁴ = 2¹²⁷ fits an i128 exactly.

/// Encoded length of a value: count (u64) and sum (i128), little-endian.
pub const COUNTS_VALUE_LEN: usize = 24;
/// Values written before sums were 128-bit: count (u64) and sum (i64).
const LEGACY_VALUE_LEN: usize = 16;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CountSum {
    pub count: u64,
    pub sum: i128,
}

impl CountSum {
    pub fn encode(self) -> [u8; COUNTS_VALUE_LEN] {
        let mut v = [0u8; COUNTS_VALUE_LEN];
        v[..8].copy_from_slice(&self.count.to_le_bytes());
        v[8..].copy_from_slice(&self.sum.to_le_bytes());
        v
    }

    /// Values of another length cannot come from Tally; they decode as zero
    /// rather than poisoning every read of the bucket.
    pub fn decode(bytes: &[u8]) -> CountSum {
        let count = |b: &[u8]| b.get(..8).and_then(|c| c.try_into().ok()).map(u64::from_le_bytes).unwrap_or(0);
        match bytes.len() {
            COUNTS_VALUE_LEN => CountSum {
                count: count(bytes),
                sum: bytes.get(8..24).and_then(|s| s.try_into().ok()).map(i128::from_le_bytes).unwrap_or(0),
            },
            LEGACY_VALUE_LEN => CountSum {
                count: count(bytes),
                sum: bytes.get(8..16).and_then(|s| s.try_into().ok()).map(i64::from_le_bytes).unwrap_or(0) as i128,
            },
            _ => CountSum::default(),
        }
    }

    /// Associative and commutative (see the module docs); never actually
    /// wraps for sums of i64 values.
    pub fn add(self, other: CountSum) -> CountSum {
        CountSum { count: self.count.wrapping_add(other.count), sum: self.sum.wrapping_add(other.sum) }
    }

    /// The sum as the API's int64: clamped to the nearest limit, with a flag
    /// saying whether it had to be.
    pub fn sum_i64(self) -> (i64, bool) {
        match i64::try_from(self.sum) {
            Ok(s) => (s, false),
            Err(_) => (if self.sum < 0 { i64::MIN } else { i64::MAX }, true),
        }
    }

    pub fn average(self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum as f64 / self.count as f64
        }
    }
}

/// RocksDB associative merge: existing value plus every operand.
pub fn merge_counts(_key: &[u8], existing: Option<&[u8]>, operands: &rocksdb::MergeOperands) -> Option<Vec<u8>> {
    let mut total = existing.map(CountSum::decode).unwrap_or_default();
    for op in operands {
        total = total.add(CountSum::decode(op));
    }
    Some(total.encode().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn encode_roundtrip_and_legacy_values() {
        let a = CountSum { count: 3, sum: -7 };
        assert_eq!(CountSum::decode(&a.encode()), a);
        let mut legacy = [0u8; 16];
        legacy[..8].copy_from_slice(&5u64.to_le_bytes());
        legacy[8..].copy_from_slice(&(-9i64).to_le_bytes());
        assert_eq!(CountSum::decode(&legacy), CountSum { count: 5, sum: -9 });
        assert_eq!(CountSum::decode(b"short"), CountSum::default());
    }

    #[test]
    fn sums_beyond_i64_are_exact_and_flagged() {
        let max = CountSum { count: 1, sum: i64::MAX as i128 };
        let two = max.add(max);
        assert_eq!(two.sum, 2 * i64::MAX as i128);
        assert_eq!(two.sum_i64(), (i64::MAX, true));
        // The grouping that broke saturating sums: (MAX + MAX) + MIN + MIN.
        let min = CountSum { count: 1, sum: i64::MIN as i128 };
        assert_eq!(two.add(min).add(min).sum, -2);
        assert_eq!(two.add(min).add(min).sum_i64(), (-2, false));
    }

    proptest! {
        /// Any grouping and order of operands gives the same value: what
        /// makes replicas agree whatever RocksDB's compactions do.
        #[test]
        fn merge_is_associative_and_commutative(values in proptest::collection::vec(any::<i64>(), 1..40), split in 0usize..40) {
            let ops: Vec<CountSum> = values.iter().map(|v| CountSum { count: 1, sum: *v as i128 }).collect();
            let split = split.min(ops.len());
            let left = ops[..split].iter().fold(CountSum::default(), |a, b| a.add(*b));
            let right = ops[split..].iter().fold(CountSum::default(), |a, b| a.add(*b));
            let reversed = ops.iter().rev().fold(CountSum::default(), |a, b| a.add(*b));
            prop_assert_eq!(left.add(right), reversed);
            prop_assert_eq!(reversed.sum, values.iter().map(|v| *v as i128).sum::<i128>());
        }
    }
}
