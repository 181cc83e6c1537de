//! `Query.TopK`: scatter-gather over partitions from whichever node is
//! asked.
//!
//! Each partition's share comes from a replica chosen as any other read's
//! (`read_routing::replica_for`: the leader after making the read
//! linearizable, or for STALE any recovered replica). Partitions this node
//! can answer are read here (`storage/ranking.rs`); the rest are asked of
//! the nodes that can, one call per node carrying the list of its
//! partitions, with the forwarding hop count every query carries. An
//! entity lives in one partition unless it was spread (`Cluster.Spread`):
//! then the lists are summed per entity, and the node asked replaces each
//! spread entity that ranks with its exact total over the range (a Stats
//! of all its shares, `query.rs`). So the k best of every partition's k best are the k
//! best overall, except that a spread entity ranks only once one of its
//! shares ranks in its own partition.
//!
//! Every partition must rank the same range, so the node asked tiles it
//! once, with the floors the cluster's retention policy gives a minute
//! ahead of its clock: never finer than any partition still keeps (their
//! leaders raise floors from the same policy at their own, checked,
//! clocks). A partition whose floors went past them anyway (a retention
//! shortened a moment ago) refuses, and so does a node that tiled the range
//! differently; the caller retries.

use std::collections::BTreeMap;

use futures::future::{join_all, try_join_all};
use futures::StreamExt;
use tally_proto::time::{decompose_kept, Granularity, Tiling};
use tally_proto::v1::{TopKEntry, TopKOrder, TopKRequest, TopKResponse};
use tally_proto::validate::validate_top_k;
use tonic::{Request, Response, Status};

use super::read_routing::{
    forward_client, forwarded, hops, invalid, partition_count, replica_for, storage_status, ClientLatency, MAX_HOPS,
};
use crate::node::{Node, PartitionReplica};
use crate::stages::{Stage, Timer};
use crate::storage::counts::CountSum;
use crate::storage::ranking::{best_k, read_top_k, RankBy};
use crate::storage::StorageError;
use crate::type_config::NodeId;

/// Partitions this node reads at once for one TopK: enough to keep the
/// blocking pool busy, few enough that their lists stay small.
const LOCAL_READS_AT_ONCE: usize = 8;

pub async fn top_k(node: &Node, request: Request<TopKRequest>) -> Result<Response<TopKResponse>, Status> {
    let _timer = Timer::start(Stage::ReadRequest);
    let hops = hops(&request);
    let req = request.into_inner();
    let _latency = ClientLatency::start("top_k", req.consistency, hops);
    validate_top_k(&req.event_type, req.from_ms, req.to_ms, req.k).map_err(invalid)?;
    let by = match TopKOrder::try_from(req.order) {
        Ok(TopKOrder::Sum) => RankBy::Sum,
        Ok(TopKOrder::Count | TopKOrder::Unspecified) => RankBy::Count,
        Err(_) => return Err(Status::invalid_argument(format!("order: must be COUNT or SUM, got {}", req.order))),
    };
    let count = partition_count(node)?;
    let partitions: Vec<u32> = if req.partitions.is_empty() {
        (0..count).collect()
    } else {
        if let Some(p) = req.partitions.iter().find(|p| **p >= count) {
            return Err(Status::invalid_argument(format!(
                "partitions: partition {p} does not exist; the cluster has {count} (0 to {})",
                count - 1
            )));
        }
        let mut ps = req.partitions.clone();
        ps.sort_unstable();
        ps.dedup();
        ps
    };
    let tiling = policy_tiling(node, req.from_ms, req.to_ms);
    let k = req.k as usize;

    // Where each partition's share is read.
    let placements = join_all(partitions.iter().map(|p| replica_for(node, *p, req.consistency))).await;
    let mut local = Vec::new();
    let mut remote: BTreeMap<NodeId, Vec<u32>> = BTreeMap::new();
    for (partition, placement) in partitions.iter().zip(placements) {
        match placement? {
            Ok(replica) => {
                agrees_on_splits(node, &replica, req.partitions.is_empty().then_some(partitions.as_slice()))?;
                local.push(replica)
            }
            Err(_) if hops >= MAX_HOPS => {
                return Err(Status::unavailable(format!("partition {partition}: leader moved; retry")))
            }
            Err(node) => remote.entry(node).or_default().push(*partition),
        }
    }

    // Partitions are read a few at a time and folded into the running k
    // best as they finish, so memory stays a few times k entries however
    // many partitions the node leads.
    let local_reads = async {
        let mut best: Vec<(Vec<u8>, CountSum)> = Vec::new();
        let mut reads = futures::stream::iter(local)
            .map(|replica| {
                let (engine, event_type, pieces) = (node.engine.clone(), req.event_type.clone(), &tiling.buckets);
                async move { read_top_k(&engine, &replica.write_back, &event_type, pieces, k, by).await }
            })
            .buffer_unordered(LOCAL_READS_AT_ONCE);
        while let Some(list) = reads.next().await {
            best.extend(list?);
            if best.len() >= 4 * k {
                best = best_k(summed_per_entity(best), k, by);
            }
        }
        Ok::<_, StorageError>(best)
    };
    let remote_calls = try_join_all(remote.into_iter().map(|(to_node, share)| {
        let ask = TopKRequest { partitions: share, ..req.clone() };
        async move {
            let mut client = forward_client(node, to_node)?;
            client.top_k(forwarded(ask, hops)).await.map(Response::into_inner)
        }
    }));
    let (local_best, remote_replies) = tokio::join!(local_reads, remote_calls);
    let mut entries = local_best.map_err(storage_status)?;
    for reply in remote_replies? {
        if (reply.effective_from_ms, reply.effective_to_ms) != (tiling.from_ms, tiling.to_ms) {
            return Err(Status::unavailable(
                "nodes tiled the range differently (the retention policy changed while asked); retry",
            ));
        }
        for e in reply.entries {
            let sum = e.sum_exact.parse::<i128>().map_err(|_| {
                Status::internal(format!("a node answered a TopK sum that is not a number: {:?}", e.sum_exact))
            })?;
            entries.push((e.entity_id, CountSum { count: e.count, sum }));
        }
    }
    // A split that became active while the shares were read would leave
    // the list of partitions read short of the new one.
    if req.partitions.is_empty() && partition_count(node)? != count {
        return Err(Status::unavailable("a partition split became active while TopK was read; retry"));
    }
    let entries = best_k(summed_per_entity(entries), k, by)
        .into_iter()
        .map(|(entity_id, c)| {
            let (sum, sum_overflow) = c.sum_i64();
            TopKEntry { entity_id, count: c.count, sum, sum_overflow, sum_exact: c.sum.to_string() }
        })
        .collect();
    Ok(Response::new(TopKResponse {
        entries,
        effective_from_ms: tiling.from_ms,
        effective_to_ms: tiling.to_ms,
        partitions_answered: partitions.len() as u32,
        resolution: tiling.resolution.to_proto().into(),
    }))
}

/// Entries of one entity (the shares of a spread one) summed into one.
fn summed_per_entity(entries: Vec<(Vec<u8>, CountSum)>) -> Vec<(Vec<u8>, CountSum)> {
    let mut summed: BTreeMap<Vec<u8>, CountSum> = BTreeMap::new();
    for (entity, c) in entries {
        let slot = summed.entry(entity).or_default();
        *slot = slot.add(c);
    }
    summed.into_iter().collect()
}

/// How far ahead of this node's clock the policy's floors are taken: more
/// than the clock skew the cluster tolerates between nodes, so no partition
/// leader can have raised its floors past them.
const FLOORS_AHEAD_MS: i64 = 60_000;

/// `[from, to)` tiled by hour and coarser buckets that every partition
/// still keeps under the retention policy.
fn policy_tiling(node: &Node, from_ms: i64, to_ms: i64) -> Tiling {
    let now = i64::try_from(node.clock.trusted().now_ms).unwrap_or(i64::MAX);
    let floors = node.retention.borrow().floors_at(now.saturating_add(FLOORS_AHEAD_MS));
    decompose_kept(from_ms, to_ms, &floors, Granularity::Hour)
}

/// TopK across partitions is exact around a split only if each replica
/// read agrees with the partitions read: a parent that has handed a range
/// to a partition not read (the split's activation had not reached the
/// map the list was made from — `whole`, this node's list when it reads
/// every partition, else this node's map) would miss the range's entities,
/// and a parent replica that has not yet applied a split its map has
/// active would count them twice. Either is a moment of the switch: retry.
fn agrees_on_splits(node: &Node, replica: &PartitionReplica, whole: Option<&[u32]>) -> Result<(), Status> {
    let moved = replica.moved.get();
    let count = node.partition_count().unwrap_or(0);
    let unread = |to: u32| whole.map_or(to >= count, |read| !read.contains(&to));
    if let Some(range) = moved.ranges.iter().find(|r| unread(r.to)) {
        return Err(Status::unavailable(format!(
            "partition {} was just split into {}, which this read does not cover yet; retry",
            replica.partition, range.to
        )));
    }
    let map = node.cluster_map.borrow();
    let behind = map.splits.iter().find(|(child, plan)| {
        plan.parent == replica.partition && plan.voters.is_some() && !moved.ranges.iter().any(|r| r.to == **child)
    });
    match behind {
        Some((child, _)) => Err(Status::unavailable(format!(
            "this replica of partition {} has not applied its split into {child} yet; retry",
            replica.partition
        ))),
        None => Ok(()),
    }
}
