//! Summing the shares of a spread entity (`Cluster.Spread`): its home
//! partition holds its events before the spread's start, each of the
//! spread's partitions a hash-chosen part of the rest, so every event is in
//! exactly one share and the sum of the shares is the entity's count.
//! Distinct actors are merged from the shares' sketches, as one partition
//! merges its buckets'.

use std::collections::BTreeMap;

use tally_proto::v1::{Bucket, SeriesResponse, StatsResponse};
use tonic::Status;

use crate::storage::counts::CountSum;
use crate::storage::sketch::Sketch;

/// One share's exact count and sum (`sum_exact`, else the clamped `sum`).
pub fn total_of(count: u64, sum: i64, sum_exact: &str) -> CountSum {
    CountSum { count, sum: sum_exact.parse::<i128>().unwrap_or(i128::from(sum)) }
}

fn merge_sketch(into: &mut Sketch, encoded: &[u8]) {
    if let Some(sketch) = Sketch::decode(encoded) {
        into.merge(&sketch);
    }
}

/// The shares' stats as one answer (`shares` = how many were summed). The
/// effective range and resolution are the widest of the shares'.
pub fn merge_stats(node_id: u64, shares: Vec<StatsResponse>) -> StatsResponse {
    let mut total = CountSum::default();
    let mut sketch = Sketch::default();
    let (mut from, mut to, mut resolution, mut archive_buckets) = (i64::MAX, i64::MIN, 0, 0);
    let applied_index = shares.first().map_or(0, |s| s.applied_index);
    let count = shares.len() as u32;
    for share in shares {
        total = total.add(total_of(share.count, share.sum, &share.sum_exact));
        merge_sketch(&mut sketch, &share.actors_sketch);
        from = from.min(share.effective_from_ms);
        to = to.max(share.effective_to_ms);
        resolution = resolution.max(share.resolution);
        archive_buckets += share.archive_buckets;
    }
    let (sum, sum_overflow) = total.sum_i64();
    StatsResponse {
        count: total.count,
        sum,
        average: total.average(),
        effective_from_ms: from,
        effective_to_ms: to,
        served_by_node_id: node_id,
        applied_index,
        sum_overflow,
        sum_exact: total.sum.to_string(),
        resolution,
        uniques: sketch.estimate(),
        archive_buckets,
        actors_sketch: Vec::new(),
        shares: count,
    }
}

/// The shares' series as one, bucket by bucket. Every share answers the
/// same buckets (same range and granularity); one that does not is an
/// error, not a guess.
pub fn merge_series(node_id: u64, shares: Vec<SeriesResponse>) -> Result<SeriesResponse, Status> {
    let applied_index = shares.first().map_or(0, |s| s.applied_index);
    let count = shares.len() as u32;
    let starts: Vec<i64> = shares.first().map(|s| s.buckets.iter().map(|b| b.start_ms).collect()).unwrap_or_default();
    let mut merged: BTreeMap<i64, (CountSum, Sketch)> =
        starts.iter().map(|s| (*s, (CountSum::default(), Sketch::default()))).collect();
    let mut archive_buckets = 0;
    for share in shares {
        if share.buckets.len() != starts.len() {
            return Err(Status::internal("the shares of a spread entity answered different buckets; retry"));
        }
        archive_buckets += share.archive_buckets;
        for b in share.buckets {
            let Some((total, sketch)) = merged.get_mut(&b.start_ms) else {
                return Err(Status::internal("the shares of a spread entity answered different buckets; retry"));
            };
            *total = total.add(total_of(b.count, b.sum, &b.sum_exact));
            merge_sketch(sketch, &b.actors_sketch);
        }
    }
    Ok(SeriesResponse {
        buckets: merged
            .into_iter()
            .map(|(start_ms, (total, sketch))| {
                let (sum, sum_overflow) = total.sum_i64();
                Bucket {
                    start_ms,
                    count: total.count,
                    sum,
                    sum_overflow,
                    sum_exact: total.sum.to_string(),
                    uniques: sketch.estimate(),
                    actors_sketch: Vec::new(),
                }
            })
            .collect(),
        served_by_node_id: node_id,
        applied_index,
        archive_buckets,
        shares: count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_sum_exactly_and_merge_actors() {
        let share = |count: u64, sum: i128, actors: &[u64]| {
            let mut sketch = Sketch::default();
            actors.iter().for_each(|a| sketch.insert(crate::storage::sketch::actor_hash(&a.to_le_bytes())));
            StatsResponse {
                count,
                sum: sum.clamp(i64::MIN as i128, i64::MAX as i128) as i64,
                sum_exact: sum.to_string(),
                effective_from_ms: 60_000,
                effective_to_ms: 120_000,
                actors_sketch: sketch.encode(),
                resolution: 1,
                ..Default::default()
            }
        };
        let merged = merge_stats(7, vec![share(2, i64::MAX as i128, &[1, 2]), share(3, 10, &[2, 3, 4])]);
        assert_eq!(merged.count, 5);
        assert_eq!(merged.sum_exact, (i64::MAX as i128 + 10).to_string());
        assert!(merged.sum_overflow);
        assert_eq!(merged.uniques, 4, "actor 2 is in both shares, counted once");
        assert_eq!(merged.shares, 2);
        assert_eq!((merged.effective_from_ms, merged.effective_to_ms), (60_000, 120_000));
    }

    #[test]
    fn series_shares_must_answer_the_same_buckets() {
        let bucket = |start_ms, count| Bucket { start_ms, count, sum_exact: count.to_string(), ..Default::default() };
        let a = SeriesResponse { buckets: vec![bucket(0, 1), bucket(60_000, 2)], ..Default::default() };
        let b = SeriesResponse { buckets: vec![bucket(0, 3), bucket(60_000, 4)], ..Default::default() };
        let merged = merge_series(1, vec![a.clone(), b]).unwrap();
        assert_eq!(merged.buckets.iter().map(|b| b.count).collect::<Vec<_>>(), vec![4, 6]);
        let short = SeriesResponse { buckets: vec![bucket(0, 3)], ..Default::default() };
        assert!(merge_series(1, vec![a, short]).is_err());
    }
}
