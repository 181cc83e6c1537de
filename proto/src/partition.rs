//! Which partition an entity lives in, and which Raft group serves it.
//!
//! All counters of one entity live in exactly one partition, so the mapping
//! from entity to partition is part of the on-disk data layout: every event
//! ever stored was placed with it. It must therefore never change, not even
//! to a "better" hash: a different function would send an entity's new events
//! to a partition that does not hold its old ones, silently splitting its
//! counts. The hash is XXH3-64 with seed 0 because it is fast, has a frozen
//! specification, and is available in every language a client may be written
//! in.
//!
//! Clients and servers both call [`partition_of`]. Clients use it to send each
//! event straight to its partition's leader; servers use it to check and, if
//! needed, forward. Sharing one function is what guarantees the two agree.
//!
//! Raft groups are numbered separately from partitions because the cluster
//! also runs one group that holds no events: the metadata group (group 0),
//! which records the cluster's nodes and the placement of partitions. Partition
//! `p` is served by group `p + 1`.

/// The Raft group holding cluster metadata (nodes and partition placement).
/// It serves no partition.
pub const METADATA_GROUP: u32 = 0;

/// The partition that owns `entity_id`: `xxh3_64(entity_id) % partition_count`.
///
/// Frozen forever; see the module documentation. A `partition_count` of 0
/// (an uninitialised cluster) is treated as 1, so every entity maps to
/// partition 0 instead of panicking on a division by zero.
pub fn partition_of(entity_id: &[u8], partition_count: u32) -> u32 {
    let partition_count = u64::from(partition_count.max(1));
    let partition = xxhash_rust::xxh3::xxh3_64(entity_id) % partition_count;
    // The remainder is below `partition_count`, which came from a u32.
    u32::try_from(partition).unwrap_or(0)
}

/// The Raft group that serves partition `partition`.
///
/// Partitions are numbered below a `u32` partition count, so the largest
/// possible partition is `u32::MAX - 1` and the addition cannot overflow.
pub fn group_of_partition(partition: u32) -> u32 {
    partition + 1
}

/// The partition served by Raft group `group`, or `None` for the metadata
/// group, which serves no partition.
pub fn partition_of_group(group: u32) -> Option<u32> {
    group.checked_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values computed once from the implementation and pinned: if this test
    /// fails, the partitioner changed and existing data would be re-routed.
    #[test]
    fn partitioner_is_stable() {
        // Raw XXH3-64 (seed 0) of the empty input, as published by the
        // reference implementation.
        assert_eq!(xxhash_rust::xxh3::xxh3_64(b""), 0x2D06_8005_38D3_94C2);
        assert_eq!(xxhash_rust::xxh3::xxh3_64(b"video-1"), 0x2175_95FE_4187_9037);

        assert_eq!(partition_of(b"video-1", 64), 55);
        assert_eq!(partition_of(b"video-2", 64), 36);
        assert_eq!(partition_of(b"user:42", 1000), 826);
        assert_eq!(partition_of(&[0u8, 255, 7], 7), 4);
    }

    #[test]
    fn zero_partition_count_maps_everything_to_partition_zero() {
        assert_eq!(partition_of(b"anything", 0), 0);
        assert_eq!(partition_of(b"", 0), 0);
    }

    #[test]
    fn single_partition_takes_everything() {
        for i in 0..1000u32 {
            assert_eq!(partition_of(&i.to_le_bytes(), 1), 0);
        }
    }

    #[test]
    fn partition_is_always_below_count() {
        for count in [1u32, 2, 3, 7, 64, 1000, u32::MAX] {
            for i in 0..1000u32 {
                assert!(partition_of(format!("e{i}").as_bytes(), count) < count);
            }
        }
    }

    #[test]
    fn distribution_over_64_partitions_is_roughly_even() {
        const PARTITIONS: u32 = 64;
        const IDS: u32 = 100_000;
        let mut per_partition = vec![0u32; PARTITIONS as usize];
        for i in 0..IDS {
            let id = format!("entity-{i}");
            per_partition[partition_of(id.as_bytes(), PARTITIONS) as usize] += 1;
        }
        let expected = f64::from(IDS) / f64::from(PARTITIONS);
        for (partition, &count) in per_partition.iter().enumerate() {
            let deviation = (f64::from(count) - expected).abs() / expected;
            assert!(deviation < 0.10, "partition {partition} got {count} ids, expected about {expected}");
        }
    }

    #[test]
    fn groups_and_partitions_round_trip() {
        assert_eq!(partition_of_group(METADATA_GROUP), None);
        assert_eq!(group_of_partition(0), 1);
        assert_eq!(partition_of_group(1), Some(0));
        for partition in [0u32, 1, 63, 1000, u32::MAX - 1] {
            let group = group_of_partition(partition);
            assert_ne!(group, METADATA_GROUP);
            assert_eq!(partition_of_group(group), Some(partition));
        }
    }
}
