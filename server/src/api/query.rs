//! The public Query service. Linearizable reads run on the partition leader
//! under its lease (after a read-index round when the lease is stale);
//! stale reads on any replica (`read_routing.rs` decides which, and where
//! to forward). Either reads the replica's memory and RocksDB
//! (`storage/read.rs`), never waiting for a checkpoint. TopK gathers every
//! partition's share (`top_k.rs`).

use std::sync::Arc;

use futures::future::join_all;

use openraft::async_runtime::WatchReceiver;
use tally_proto::partition::partition_of;
use tally_proto::time::{align_range, series_starts, Granularity};
use tally_proto::v1::query_server::Query;
use tally_proto::v1::{
    AuditRequest, AuditResponse, Bucket, SeriesRequest, SeriesResponse, StatsRequest, StatsResponse, TopKEntry,
    TopKRequest, TopKResponse,
};
use tally_proto::validate::{validate_query_key, validate_range};
use tonic::{Request, Response, Status};

use super::read_routing::{
    forward_client, forwarded, hops, invalid, partition_count, replica_for, storage_status, ClientLatency, MAX_HOPS,
};
use super::shares;
use crate::node::{Node, PartitionReplica};
use crate::stages::{Stage, Timer};
use crate::storage::ranking::{best_k, RankBy};
use crate::storage::read::{read_series, read_stats, ArchiveAccess, SeriesRead};

/// Most buckets one series answer may hold.
pub const MAX_SERIES_BUCKETS: usize = 10_000;

pub struct QueryService {
    node: Arc<Node>,
}

impl QueryService {
    pub fn new(node: Arc<Node>) -> QueryService {
        QueryService { node }
    }
}

#[tonic::async_trait]
impl Query for QueryService {
    async fn audit(&self, request: Request<AuditRequest>) -> Result<Response<AuditResponse>, Status> {
        Ok(Response::new(super::audit::serve(&self.node, request).await?))
    }

    async fn stats(&self, request: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        let _timer = Timer::start(Stage::ReadRequest);
        let hops = hops(&request);
        let req = request.into_inner();
        let _latency = ClientLatency::start("stats", req.consistency, hops);
        validate_query_key(&req.entity_id, &req.event_type).map_err(invalid)?;
        validate_range(req.from_ms, req.to_ms).map_err(invalid)?;
        let mut partitions = partitions_to_read(&self.node, &req.entity_id, req.share_partition_plus_one)?;
        if let [partition] = partitions[..] {
            match self.stats_of(req.clone(), partition, hops).await {
                // The map caught up with a spread: read every share.
                Err(e) if e.message() == MAP_BEHIND_SPREAD => {
                    partitions = partitions_to_read(&self.node, &req.entity_id, 0)?;
                    if partitions == [partition] {
                        return Err(e);
                    }
                }
                answer => return answer.map(Response::new),
            }
        }
        // A spread entity: every share, at once, summed.
        let shares = join_all(partitions.iter().map(|&partition| {
            let req = StatsRequest { share_partition_plus_one: partition + 1, ..req.clone() };
            self.stats_of(req, partition, hops)
        }))
        .await
        .into_iter()
        .collect::<Result<Vec<_>, Status>>()?;
        Ok(Response::new(shares::merge_stats(self.node.id, shares)))
    }

    async fn series(&self, request: Request<SeriesRequest>) -> Result<Response<SeriesResponse>, Status> {
        let _timer = Timer::start(Stage::ReadRequest);
        let hops = hops(&request);
        let req = request.into_inner();
        let _latency = ClientLatency::start("series", req.consistency, hops);
        validate_query_key(&req.entity_id, &req.event_type).map_err(invalid)?;
        validate_range(req.from_ms, req.to_ms).map_err(invalid)?;
        let granularity = tally_proto::v1::Granularity::try_from(req.granularity)
            .ok()
            .and_then(Granularity::from_proto)
            .ok_or_else(|| Status::invalid_argument("granularity: must be MINUTE, HOUR, DAY, MONTH or YEAR"))?;
        let (from, to) = align_range(req.from_ms, req.to_ms);
        let buckets = series_starts(granularity, from, to).into_iter().take(MAX_SERIES_BUCKETS + 1).count();
        if buckets > MAX_SERIES_BUCKETS {
            return Err(Status::invalid_argument(format!(
                "granularity: the range holds more than {MAX_SERIES_BUCKETS} {} buckets; use a coarser granularity or a shorter range",
                granularity.name()
            )));
        }
        let mut partitions = partitions_to_read(&self.node, &req.entity_id, req.share_partition_plus_one)?;
        if let [partition] = partitions[..] {
            match self.series_of(req.clone(), partition, granularity, hops).await {
                Err(e) if e.message() == MAP_BEHIND_SPREAD => {
                    partitions = partitions_to_read(&self.node, &req.entity_id, 0)?;
                    if partitions == [partition] {
                        return Err(e);
                    }
                }
                answer => return answer.map(Response::new),
            }
        }
        let shares = join_all(partitions.iter().map(|&partition| {
            let req = SeriesRequest { share_partition_plus_one: partition + 1, ..req.clone() };
            self.series_of(req, partition, granularity, hops)
        }))
        .await
        .into_iter()
        .collect::<Result<Vec<_>, Status>>()?;
        shares::merge_series(self.node.id, shares).map(Response::new)
    }

    async fn top_k(&self, request: Request<TopKRequest>) -> Result<Response<TopKResponse>, Status> {
        let whole = request.get_ref().partitions.is_empty();
        let req = request.get_ref().clone();
        let mut answer = super::top_k::top_k(&self.node, request).await?.into_inner();
        if whole {
            self.exact_spread_entries(&req, &mut answer).await?;
        }
        Ok(Response::new(answer))
    }
}

impl QueryService {
    /// Stats of one partition: read here, or forwarded to where it can be.
    /// A share (`share_partition_plus_one` set) carries its actors' sketch.
    async fn stats_of(&self, req: StatsRequest, partition: u32, hops: u32) -> Result<StatsResponse, Status> {
        let replica = match replica_for(&self.node, partition, req.consistency).await? {
            Ok(r) => r,
            Err(_) if hops >= MAX_HOPS => {
                return Err(Status::unavailable(format!("partition {partition}: leader moved; retry")))
            }
            Err(to) => {
                return Ok(forward_client(&self.node, to)?.stats(forwarded(req, hops)).await?.into_inner());
            }
        };
        if req.share_partition_plus_one == 0 {
            map_caught_up_with_spread(&self.node, &replica, &req.entity_id).await?;
        }
        let applied = replica.raft.metrics().borrow_watched().last_applied.map(|l| l.index).unwrap_or(0);
        let reading = Timer::start(Stage::ReadStorage);
        let archive = ArchiveAccess { manifest: &replica.archive, store: self.node.archive.as_deref() };
        let read = read_stats(
            &self.node.engine,
            &replica.write_back,
            Some(archive),
            &req.entity_id,
            &req.event_type,
            req.from_ms,
            req.to_ms,
        )
        .await
        .map_err(storage_status)?;
        drop(reading);
        if req.share_partition_plus_one == 0 {
            not_split_away(&self.node, &replica, partition, &req.entity_id).await?;
        }
        let total = read.total;
        let (sum, sum_overflow) = total.sum_i64();
        let share = req.share_partition_plus_one != 0;
        Ok(StatsResponse {
            count: total.count,
            sum,
            average: total.average(),
            effective_from_ms: read.from_ms,
            effective_to_ms: read.to_ms,
            served_by_node_id: self.node.id,
            applied_index: applied,
            sum_overflow,
            sum_exact: total.sum.to_string(),
            resolution: read.resolution.to_proto().into(),
            uniques: read.sketch.estimate(),
            archive_buckets: read.archive_buckets,
            actors_sketch: if share { read.sketch.encode() } else { Vec::new() },
            shares: 1,
        })
    }

    /// A series of one partition, as [`QueryService::stats_of`].
    async fn series_of(
        &self,
        req: SeriesRequest,
        partition: u32,
        granularity: Granularity,
        hops: u32,
    ) -> Result<SeriesResponse, Status> {
        let replica = match replica_for(&self.node, partition, req.consistency).await? {
            Ok(r) => r,
            Err(_) if hops >= MAX_HOPS => {
                return Err(Status::unavailable(format!("partition {partition}: leader moved; retry")))
            }
            Err(to) => {
                return Ok(forward_client(&self.node, to)?.series(forwarded(req, hops)).await?.into_inner());
            }
        };
        if req.share_partition_plus_one == 0 {
            map_caught_up_with_spread(&self.node, &replica, &req.entity_id).await?;
        }
        let (from, to) = align_range(req.from_ms, req.to_ms);
        let applied = replica.raft.metrics().borrow_watched().last_applied.map(|l| l.index).unwrap_or(0);
        let reading = Timer::start(Stage::ReadStorage);
        let archive = ArchiveAccess { manifest: &replica.archive, store: self.node.archive.as_deref() };
        let series = read_series(
            &self.node.engine,
            &replica.write_back,
            Some(archive),
            &req.entity_id,
            &req.event_type,
            granularity,
            from,
            to,
        )
        .await
        .map_err(storage_status)?;
        drop(reading);
        if req.share_partition_plus_one == 0 {
            not_split_away(&self.node, &replica, partition, &req.entity_id).await?;
        }
        let (series, archive_buckets) = match series {
            SeriesRead::Buckets(buckets, archived) => (buckets, archived),
            SeriesRead::Expired { first_kept_ms } => {
                return Err(super::retention::series_expired(&self.node, granularity, first_kept_ms))
            }
        };
        let share = req.share_partition_plus_one != 0;
        Ok(SeriesResponse {
            buckets: series
                .into_iter()
                .map(|(start_ms, c, sketch)| {
                    let (sum, sum_overflow) = c.sum_i64();
                    Bucket {
                        start_ms,
                        count: c.count,
                        sum,
                        sum_overflow,
                        sum_exact: c.sum.to_string(),
                        uniques: sketch.estimate(),
                        actors_sketch: if share { sketch.encode() } else { Vec::new() },
                    }
                })
                .collect(),
            served_by_node_id: self.node.id,
            applied_index: applied,
            archive_buckets,
            shares: 1,
        })
    }
}

/// Why a whole read of one partition stopped: the partition (the entity's
/// home) has moved the entity's newer events away, but the map this node
/// routed the read by has no spread for it yet.
const MAP_BEHIND_SPREAD: &str =
    "the entity was just spread over more partitions, or its partition split, and this node's cluster map is behind; retry";
/// How long a read waits for this node's map to catch up with a spread.
const SPREAD_MAP_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// A read of the home alone is exact only if the entity was not spread:
/// the home's replicated state says so (its record of moved entities,
/// applied before the map could route any event away; a linearizable read
/// has applied everything committed before it began). If the entity was
/// spread but this node's map does not know it yet, the map is waited for,
/// and the caller reads every share ([`MAP_BEHIND_SPREAD`]).
async fn map_caught_up_with_spread(node: &Node, replica: &PartitionReplica, entity_id: &[u8]) -> Result<(), Status> {
    if !replica.moved.get().moved.contains_key(entity_id) {
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + SPREAD_MAP_WAIT;
    while node.routing().is_none_or(|r| r.spread_of(entity_id).is_none()) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Err(Status::unavailable(MAP_BEHIND_SPREAD))
}

/// A read of a partition is exact only for an entity still in its hash
/// range. Its record of ranges split off is checked after the read: the
/// record is set before a split moves any state (`storage/split.rs`), so a
/// read that finds the entity not split away afterwards saw all of it. If
/// it was, the map is waited for and the caller reads the entity's new
/// partition ([`MAP_BEHIND_SPREAD`]).
async fn not_split_away(
    node: &Node,
    replica: &PartitionReplica,
    partition: u32,
    entity_id: &[u8],
) -> Result<(), Status> {
    if replica.moved.get().split_to(entity_id).is_none() {
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + SPREAD_MAP_WAIT;
    while node.home_of(entity_id).is_none_or(|home| home == partition) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Err(Status::unavailable(MAP_BEHIND_SPREAD))
}

/// The partitions a read of `entity_id` covers: the one share asked for
/// (`share_partition_plus_one`), else the entity's home and its spread's.
fn partitions_to_read(node: &Node, entity_id: &[u8], share_partition_plus_one: u32) -> Result<Vec<u32>, Status> {
    let count = partition_count(node)?;
    if share_partition_plus_one != 0 {
        let partition = share_partition_plus_one - 1;
        if partition >= count {
            return Err(Status::invalid_argument(format!(
                "share_partition_plus_one: partition {partition} does not exist; the cluster has {count}"
            )));
        }
        return Ok(vec![partition]);
    }
    Ok(node.routing().map_or_else(|| vec![partition_of(entity_id, count)], |r| r.partitions_of_entity(entity_id)))
}

impl QueryService {
    /// TopK's spread entities with their exact totals over its range (a
    /// share may be missing from its partition's list), ranked again.
    async fn exact_spread_entries(&self, req: &TopKRequest, answer: &mut TopKResponse) -> Result<(), Status> {
        let Some(routing) = self.node.routing() else { return Ok(()) };
        if !answer.entries.iter().any(|e| routing.spread_of(&e.entity_id).is_some()) {
            return Ok(());
        }
        let mut ranked = Vec::with_capacity(answer.entries.len());
        for entry in answer.entries.drain(..) {
            let mut total = shares::total_of(entry.count, entry.sum, &entry.sum_exact);
            if routing.spread_of(&entry.entity_id).is_some() {
                let stats = StatsRequest {
                    entity_id: entry.entity_id.clone(),
                    event_type: req.event_type.clone(),
                    from_ms: answer.effective_from_ms,
                    to_ms: answer.effective_to_ms,
                    consistency: req.consistency,
                    share_partition_plus_one: 0,
                };
                let exact = self.stats(Request::new(stats)).await?.into_inner();
                total = shares::total_of(exact.count, exact.sum, &exact.sum_exact);
            }
            ranked.push((entry.entity_id, total));
        }
        let by = if req.order == tally_proto::v1::TopKOrder::Sum as i32 { RankBy::Sum } else { RankBy::Count };
        answer.entries = best_k(ranked, req.k as usize, by)
            .into_iter()
            .map(|(entity_id, c)| {
                let (sum, sum_overflow) = c.sum_i64();
                TopKEntry { entity_id, count: c.count, sum, sum_overflow, sum_exact: c.sum.to_string() }
            })
            .collect();
        Ok(())
    }
}
