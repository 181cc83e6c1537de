//! The value stored per (entity, type, granularity, bucket): a count and a
//! sum, combined by a RocksDB merge operator so applying a batch is a blind
//! write per bucket — no read-modify-write on the apply path.

pub const COUNTS_VALUE_LEN: usize = 16;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CountSum {
    pub count: u64,
    pub sum: i64,
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
        match (bytes.get(..8), bytes.get(8..16)) {
            (Some(c), Some(s)) if bytes.len() == COUNTS_VALUE_LEN => CountSum {
                count: u64::from_le_bytes(c.try_into().unwrap_or_default()),
                sum: i64::from_le_bytes(s.try_into().unwrap_or_default()),
            },
            _ => CountSum::default(),
        }
    }

    /// Sums saturate: a counter pinned at the limit is less surprising than
    /// one that wraps negative.
    pub fn add(self, other: CountSum) -> CountSum {
        CountSum { count: self.count.saturating_add(other.count), sum: self.sum.saturating_add(other.sum) }
    }
}

/// RocksDB associative merge: existing value plus every operand.
pub fn merge_counts(
    _key: &[u8],
    existing: Option<&[u8]>,
    operands: &rocksdb::MergeOperands,
) -> Option<Vec<u8>> {
    let mut total = existing.map(CountSum::decode).unwrap_or_default();
    for op in operands {
        total = total.add(CountSum::decode(op));
    }
    Some(total.encode().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_roundtrip_and_saturation() {
        let a = CountSum { count: 3, sum: -7 };
        assert_eq!(CountSum::decode(&a.encode()), a);
        let big = CountSum { count: u64::MAX, sum: i64::MAX };
        assert_eq!(big.add(a), CountSum { count: u64::MAX, sum: i64::MAX - 7 });
        assert_eq!(CountSum::decode(b"short"), CountSum::default());
    }
}
