//! Unique actors per bucket: a HyperLogLog sketch (precision 14: 16,384
//! registers, standard error 1.04/√16384 ≈ 0.81 %), kept per (entity,
//! type, granularity, bucket) in the `uniques` column family and merged
//! across buckets at query time — the union of sketches is the sketch of
//! the union, so any range's distinct actors come from the same buckets
//! its counts do.
//!
//! Written here rather than taken from a crate because replicas must hold
//! byte-identical state (`Cluster.Digest`) whatever order RocksDB merged
//! operands in: the encoding is *canonical* — a function of the register
//! values alone (sparse, sorted (index, value) pairs while few registers
//! are set; all 16,384 registers after) — and the merge operator is
//! register-wise max, which is associative, commutative and idempotent. The
//! crates we looked at keep an order-dependent representation or a hasher
//! in their serialised form.
//!
//! The estimate is Otmar Ertl's improved raw estimator ("New cardinality
//! estimation algorithms for HyperLogLog sketches", 2017), which has no
//! bias from small to huge cardinalities, so no empirical correction tables
//! and no switch to linear counting are needed.

/// Bits of the hash that choose the register.
const PRECISION: u32 = 14;
/// Registers.
const M: usize = 1 << PRECISION;
/// Bits left for the rank: a register holds 1 + leading zeros of them, at
/// most `Q + 1`.
const Q: u32 = 64 - PRECISION;
/// Set registers beyond which the dense form is smaller (3 bytes each
/// sparse, on disk).
const SPARSE_MAX: usize = M / 4 - 1;

const TAG_SPARSE: u8 = 1;
const TAG_DENSE: u8 = 2;

/// The 64-bit hash of an actor id that sketches are fed.
pub fn actor_hash(actor_id: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(actor_id, 0x7a11_7a11)
}

/// A register update packed as `index << 8 | value`: sorting packed
/// updates sorts by index, then value.
fn pack(index: u16, value: u8) -> u32 {
    (u32::from(index) << 8) | u32::from(value)
}

fn unpack(packed: u32) -> (u16, u8) {
    ((packed >> 8) as u16, packed as u8)
}

/// A HyperLogLog sketch. Few actors: a list of register updates, appended
/// to and normalised (sorted, one per register, the highest kept) only
/// when it grows or is read — apply adds an actor in a push, not a tree
/// insert. Many: all registers.
#[derive(Debug, Clone)]
pub enum Sketch {
    Sparse(Vec<u32>),
    Dense(Box<[u8]>),
}

impl Default for Sketch {
    fn default() -> Self {
        Sketch::Sparse(Vec::new())
    }
}

/// Sorts `updates` and keeps the highest value of each register.
fn normalise(updates: &mut Vec<u32>) {
    updates.sort_unstable();
    // Sorted ascending, so the last update of a register is its highest.
    let mut write = 0;
    for read in 0..updates.len() {
        let last_of_register = updates.get(read + 1).is_none_or(|next| next >> 8 != updates[read] >> 8);
        if last_of_register {
            updates[write] = updates[read];
            write += 1;
        }
    }
    updates.truncate(write);
}

impl Sketch {
    /// Adds one hashed actor.
    pub fn insert(&mut self, hash: u64) {
        let index = (hash >> Q) as u16;
        let rest = hash << PRECISION;
        let value = (rest.leading_zeros() + 1).min(Q + 1) as u8;
        self.raise(index, value);
    }

    fn raise(&mut self, index: u16, value: u8) {
        match self {
            Sketch::Sparse(updates) => {
                updates.push(pack(index, value));
                self.compact_if_long();
            }
            Sketch::Dense(registers) => {
                if let Some(slot) = registers.get_mut(usize::from(index)) {
                    *slot = (*slot).max(value);
                }
            }
        }
    }

    /// Normalises a long update list, and turns it dense when it still
    /// holds more registers than the sparse form should.
    fn compact_if_long(&mut self) {
        if let Sketch::Sparse(updates) = self {
            if updates.len() > 2 * SPARSE_MAX {
                normalise(updates);
                if updates.len() > SPARSE_MAX {
                    self.densify();
                }
            }
        }
    }

    fn densify(&mut self) {
        if let Sketch::Sparse(updates) = self {
            let mut dense = vec![0u8; M].into_boxed_slice();
            for packed in updates.iter() {
                let (index, value) = unpack(*packed);
                if let Some(slot) = dense.get_mut(usize::from(index)) {
                    *slot = (*slot).max(value);
                }
            }
            *self = Sketch::Dense(dense);
        }
    }

    /// The union with `other`, in place.
    pub fn merge(&mut self, other: &Sketch) {
        match (&mut *self, other) {
            (Sketch::Sparse(mine), Sketch::Sparse(theirs)) => {
                mine.extend_from_slice(theirs);
                self.compact_if_long();
            }
            (Sketch::Dense(mine), Sketch::Sparse(theirs)) => {
                for packed in theirs {
                    let (index, value) = unpack(*packed);
                    if let Some(slot) = mine.get_mut(usize::from(index)) {
                        *slot = (*slot).max(value);
                    }
                }
            }
            (_, Sketch::Dense(theirs)) => {
                self.densify();
                if let Sketch::Dense(mine) = self {
                    for (slot, value) in mine.iter_mut().zip(theirs.iter()) {
                        *slot = (*slot).max(*value);
                    }
                }
            }
        }
    }

    /// Memory it takes, in units of ~100 bytes (a counts bucket's share of
    /// the write-back), for bounding what a group holds in memory.
    pub fn weight(&self) -> usize {
        match self {
            Sketch::Sparse(updates) => 1 + updates.len() / 25,
            Sketch::Dense(_) => M / 100,
        }
    }

    /// (register value histogram) of the normalised registers.
    fn histogram(&self) -> [u32; (Q + 2) as usize] {
        let mut histogram = [0u32; (Q + 2) as usize];
        match self {
            Sketch::Sparse(updates) => {
                let mut registers = updates.clone();
                normalise(&mut registers);
                histogram[0] = (M - registers.len()) as u32;
                for packed in registers {
                    histogram[usize::from(unpack(packed).1).min(Q as usize + 1)] += 1;
                }
            }
            Sketch::Dense(registers) => {
                for value in registers.iter() {
                    histogram[usize::from(*value).min(Q as usize + 1)] += 1;
                }
            }
        }
        histogram
    }

    /// Estimated number of distinct actors.
    pub fn estimate(&self) -> u64 {
        let histogram = self.histogram();
        let m = M as f64;
        let mut z = m * tau(1.0 - f64::from(histogram[Q as usize + 1]) / m);
        for k in (1..=Q as usize).rev() {
            z = 0.5 * (z + f64::from(histogram[k]));
        }
        z += m * sigma(f64::from(histogram[0]) / m);
        let alpha_infinity = 1.0 / (2.0 * std::f64::consts::LN_2);
        let estimate = alpha_infinity * m * m / z;
        if estimate.is_finite() {
            estimate.round() as u64
        } else {
            0
        }
    }

    /// The canonical bytes: the same registers always encode the same way.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Sketch::Sparse(updates) => {
                let mut registers = updates.clone();
                normalise(&mut registers);
                if registers.len() > SPARSE_MAX {
                    let mut dense = Sketch::Sparse(registers);
                    dense.densify();
                    return dense.encode();
                }
                encode_sparse(registers.iter().map(|p| unpack(*p)), registers.len())
            }
            Sketch::Dense(registers) => {
                let set = registers.iter().filter(|v| **v != 0).count();
                if set > SPARSE_MAX {
                    let mut out = Vec::with_capacity(1 + M);
                    out.push(TAG_DENSE);
                    out.extend_from_slice(registers);
                    return out;
                }
                let nonzero = registers.iter().enumerate().filter(|(_, v)| **v != 0);
                encode_sparse(nonzero.map(|(i, v)| (i as u16, *v)), set)
            }
        }
    }

    /// A sketch from [`Sketch::encode`]'s bytes; `None` for anything else.
    pub fn decode(bytes: &[u8]) -> Option<Sketch> {
        let (tag, body) = bytes.split_first()?;
        match *tag {
            TAG_SPARSE if body.len() % 3 == 0 => {
                let mut updates = Vec::with_capacity(body.len() / 3);
                for entry in body.chunks_exact(3) {
                    let index = u16::from_be_bytes([entry[0], entry[1]]);
                    if usize::from(index) >= M {
                        return None;
                    }
                    updates.push(pack(index, entry[2]));
                }
                Some(Sketch::Sparse(updates))
            }
            TAG_DENSE if body.len() == M => Some(Sketch::Dense(body.to_vec().into_boxed_slice())),
            _ => None,
        }
    }
}

fn encode_sparse(registers: impl Iterator<Item = (u16, u8)>, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 3 * len);
    out.push(TAG_SPARSE);
    for (index, value) in registers {
        out.extend_from_slice(&index.to_be_bytes());
        out.push(value);
    }
    out
}

/// RocksDB merge operator of the `uniques` column family: the union.
/// Malformed values (never written by Tally) are skipped alike on every
/// replica.
pub fn merge_sketches(_key: &[u8], existing: Option<&[u8]>, operands: &rocksdb::MergeOperands) -> Option<Vec<u8>> {
    let mut union = existing.and_then(Sketch::decode).unwrap_or_default();
    for op in operands {
        if let Some(sketch) = Sketch::decode(op) {
            union.merge(&sketch);
        }
    }
    Some(union.encode())
}

fn sigma(mut x: f64) -> f64 {
    if x >= 1.0 {
        return f64::INFINITY;
    }
    let (mut y, mut z) = (1.0, x);
    loop {
        x *= x;
        let before = z;
        z += x * y;
        y += y;
        if z == before {
            return z;
        }
    }
}

fn tau(mut x: f64) -> f64 {
    if x <= 0.0 || x >= 1.0 {
        return 0.0;
    }
    let (mut y, mut z) = (1.0, 1.0 - x);
    loop {
        x = x.sqrt();
        let before = z;
        y *= 0.5;
        z -= (1.0 - x).powi(2) * y;
        if z == before {
            return z / 3.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sketch_of(range: std::ops::Range<u64>) -> Sketch {
        let mut s = Sketch::default();
        for i in range {
            s.insert(actor_hash(&i.to_be_bytes()));
        }
        s
    }

    fn relative_error(estimate: u64, truth: u64) -> f64 {
        (estimate as f64 - truth as f64).abs() / truth as f64
    }

    #[test]
    fn estimates_within_two_percent_from_tens_to_a_million() {
        for n in [10u64, 100, 1_000, 10_000, 50_000, 200_000, 1_000_000] {
            let estimate = sketch_of(0..n).estimate();
            let bound = if n <= 100 { 0.05 } else { 0.02 };
            assert!(relative_error(estimate, n) <= bound, "{n} distinct estimated {estimate}");
        }
        assert_eq!(Sketch::default().estimate(), 0);
        // Repeats change nothing.
        let mut twice = sketch_of(0..5_000);
        twice.merge(&sketch_of(0..5_000));
        assert_eq!(twice.encode(), sketch_of(0..5_000).encode());
    }

    #[test]
    fn merge_is_the_union_and_encodes_canonically_in_any_order() {
        let (a, b, c) = (sketch_of(0..3_000), sketch_of(2_000..9_000), sketch_of(8_000..400_000));
        let mut abc = a.clone();
        abc.merge(&b);
        abc.merge(&c);
        let mut cba = c.clone();
        cba.merge(&b);
        cba.merge(&a);
        assert_eq!(abc.encode(), cba.encode());
        assert_eq!(abc.encode(), sketch_of(0..400_000).encode());
        // Sparse and dense forms of the same registers encode alike.
        let small = sketch_of(0..100);
        let mut dense = small.clone();
        dense.densify();
        assert_eq!(dense.encode(), small.encode());
        for s in [&small, &abc] {
            assert_eq!(Sketch::decode(&s.encode()).map(|d| d.encode()), Some(s.encode()));
        }
        assert!(Sketch::decode(b"").is_none());
        assert!(Sketch::decode(&[TAG_SPARSE, 0xFF, 0xFF, 1]).is_none());
    }
}
