//! The public Query service. Linearizable reads run on the partition leader
//! under its lease (after a read-index round when the lease is stale);
//! stale reads on any replica. Either reads the replica's memory and
//! RocksDB (`storage/read.rs`), never waiting for a checkpoint. A node without a
//! suitable replica forwards the query, at most twice (a replica it asks
//! may point at the leader), counting hops in a header so it never loops.

use std::sync::Arc;

use openraft::async_runtime::WatchReceiver;
use openraft::errors::{LinearizableReadError, RaftError};
use openraft::LinearizerOption;
use tally_proto::partition::partition_of;
use tally_proto::time::{align_range, series_starts, Granularity};
use tally_proto::v1::query_client::QueryClient;
use tally_proto::v1::query_server::Query;
use tally_proto::v1::{Bucket, Consistency, SeriesRequest, SeriesResponse, StatsRequest, StatsResponse};
use tally_proto::validate::{validate_query_key, validate_range};
use tonic::{Request, Response, Status};

use crate::node::{Listener, Node, PartitionReplica};
use crate::stages::{Stage, Timer};
use crate::storage::read::{read_series, read_stats};
use crate::type_config::NodeId;

/// Most buckets one series answer may hold.
pub const MAX_SERIES_BUCKETS: usize = 10_000;
const FORWARDED: &str = "x-tally-forwarded";
const READ_INDEX_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a read waits for a partition without a known leader to elect
/// one: a few election timeouts.
const LEADER_WAIT: std::time::Duration = std::time::Duration::from_secs(3);
/// Pause before asking again when this node is about to lead or has just
/// stopped leading: shorter than a heartbeat, so a settled leader is found
/// within one.
const LEADERSHIP_SETTLE: std::time::Duration = std::time::Duration::from_millis(20);

pub struct QueryService {
    node: Arc<Node>,
}

impl QueryService {
    pub fn new(node: Arc<Node>) -> QueryService {
        QueryService { node }
    }

    /// The local replica to read from, after making the read linearizable if
    /// asked; or the node to forward to.
    async fn replica_for(
        &self,
        partition: u32,
        consistency: i32,
    ) -> Result<Result<Arc<PartitionReplica>, NodeId>, Status> {
        let stale = consistency == Consistency::Stale as i32;
        let Some(replica) = self.node.partition(partition) else {
            return self
                .node
                .preferred_replica(partition)
                .map(Err)
                .ok_or_else(|| Status::unavailable(format!("partition {partition} has no replicas")));
        };
        if stale && replica.recovered.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(Ok(replica));
        }
        // Leadership in motion (an election, a transfer to or from this
        // node, a leader that has not yet confirmed its lease) is absorbed
        // here for a few election timeouts rather than failing the read.
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        loop {
            let mut leader = replica.raft.metrics().borrow_watched().current_leader;
            if leader.is_none() {
                leader = replica
                    .raft
                    .wait(Some(deadline.saturating_duration_since(tokio::time::Instant::now())))
                    .metrics(|m| m.current_leader.is_some(), "a leader to be elected")
                    .await
                    .ok()
                    .and_then(|m| m.current_leader);
            }
            match leader {
                Some(l) if l != self.node.id => return Ok(Err(l)),
                None => {
                    return Err(Status::unavailable(format!("partition {partition} has no leader right now; retry")))
                }
                Some(_) => {}
            }
            // Lease read: while a quorum acknowledged this leader within
            // its lease (followers refuse votes for that long), no round
            // trip at all; otherwise (a quiesced group) one heartbeat round.
            // Without a quorum that round never completes.
            let linearizing = Timer::start(Stage::ReadLinearize);
            let read = tokio::time::timeout(
                READ_INDEX_TIMEOUT,
                replica.raft.ensure_linearizable(LinearizerOption::new(None, true)),
            )
            .await
            .map_err(|_| {
                Status::unavailable(format!(
                    "partition {partition}: no quorum for a linearizable read; retry or read STALE"
                ))
            })?;
            drop(linearizing);
            match read {
                Ok(_) => return Ok(Ok(replica)),
                Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f))) => match f.leader_id {
                    Some(l) if l != self.node.id => return Ok(Err(l)),
                    _ if tokio::time::Instant::now() < deadline => tokio::time::sleep(LEADERSHIP_SETTLE).await,
                    _ => {
                        return Err(Status::unavailable(format!("partition {partition}: leadership is moving; retry")))
                    }
                },
                Err(e) => return Err(Status::unavailable(format!("partition {partition}: {e}"))),
            }
        }
    }

    fn forward_client(&self, to: NodeId) -> Result<QueryClient<crate::raft::peers::NodeChannel>, Status> {
        Ok(QueryClient::new(self.node.forward_to_leader(to, Listener::Public, None)?))
    }

    fn partition_count(&self) -> Result<u32, Status> {
        self.node.partition_count().ok_or_else(|| Status::unavailable("the cluster is not initialised yet"))
    }
}

fn invalid(e: tally_proto::validate::FieldError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// Hops a query may take: a node without a replica asks one that has, which
/// may point at the leader once more.
const MAX_HOPS: u32 = 2;

fn hops<T>(req: &Request<T>) -> u32 {
    req.metadata().get(FORWARDED).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn forwarded<T>(inner: T, hops: u32) -> Request<T> {
    let mut req = Request::new(inner);
    if let Ok(v) = tonic::metadata::MetadataValue::try_from((hops + 1).to_string()) {
        req.metadata_mut().insert(FORWARDED, v);
    }
    req
}

/// A query's latency as its client sees it, recorded (`metrics.rs`) when
/// dropped, by the node the client called: a forwarded query is timed there,
/// not again at each hop.
struct ClientLatency {
    kind: &'static str,
    consistency: &'static str,
    started: Option<std::time::Instant>,
}

impl ClientLatency {
    fn start(kind: &'static str, consistency: i32, hops: u32) -> ClientLatency {
        let consistency = if consistency == Consistency::Stale as i32 { "stale" } else { "linearizable" };
        ClientLatency { kind, consistency, started: (hops == 0).then(std::time::Instant::now) }
    }
}

impl Drop for ClientLatency {
    fn drop(&mut self) {
        if let Some(started) = self.started {
            crate::metrics::metrics().query(self.kind, self.consistency, started.elapsed().as_secs_f64());
        }
    }
}

#[tonic::async_trait]
impl Query for QueryService {
    async fn stats(&self, request: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        let _timer = Timer::start(Stage::ReadRequest);
        let hops = hops(&request);
        let req = request.into_inner();
        let _latency = ClientLatency::start("stats", req.consistency, hops);
        validate_query_key(&req.entity_id, &req.event_type).map_err(invalid)?;
        validate_range(req.from_ms, req.to_ms).map_err(invalid)?;
        let partition = partition_of(&req.entity_id, self.partition_count()?);
        let replica = match self.replica_for(partition, req.consistency).await? {
            Ok(r) => r,
            Err(_) if hops >= MAX_HOPS => {
                return Err(Status::unavailable(format!("partition {partition}: leader moved; retry")))
            }
            Err(to) => return self.forward_client(to)?.stats(forwarded(req, hops)).await,
        };
        let (from, to) = align_range(req.from_ms, req.to_ms);
        let applied = replica.raft.metrics().borrow_watched().last_applied.map(|l| l.index).unwrap_or(0);
        let reading = Timer::start(Stage::ReadStorage);
        let total = read_stats(&self.node.engine, &replica.write_back, &req.entity_id, &req.event_type, from, to)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        drop(reading);
        let (sum, sum_overflow) = total.sum_i64();
        Ok(Response::new(StatsResponse {
            count: total.count,
            sum,
            average: total.average(),
            effective_from_ms: from,
            effective_to_ms: to,
            served_by_node_id: self.node.id,
            applied_index: applied,
            sum_overflow,
            sum_exact: total.sum.to_string(),
        }))
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
            .ok_or_else(|| Status::invalid_argument("granularity: must be MINUTE, HOUR, DAY or MONTH"))?;
        let (from, to) = align_range(req.from_ms, req.to_ms);
        let buckets = series_starts(granularity, from, to).into_iter().take(MAX_SERIES_BUCKETS + 1).count();
        if buckets > MAX_SERIES_BUCKETS {
            return Err(Status::invalid_argument(format!(
                "granularity: the range holds more than {MAX_SERIES_BUCKETS} {} buckets; use a coarser granularity or a shorter range",
                granularity.name()
            )));
        }
        let partition = partition_of(&req.entity_id, self.partition_count()?);
        let replica = match self.replica_for(partition, req.consistency).await? {
            Ok(r) => r,
            Err(_) if hops >= MAX_HOPS => {
                return Err(Status::unavailable(format!("partition {partition}: leader moved; retry")))
            }
            Err(to) => return self.forward_client(to)?.series(forwarded(req, hops)).await,
        };
        let applied = replica.raft.metrics().borrow_watched().last_applied.map(|l| l.index).unwrap_or(0);
        let reading = Timer::start(Stage::ReadStorage);
        let series =
            read_series(&self.node.engine, &replica.write_back, &req.entity_id, &req.event_type, granularity, from, to)
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
        drop(reading);
        Ok(Response::new(SeriesResponse {
            buckets: series
                .into_iter()
                .map(|(start_ms, c)| {
                    let (sum, sum_overflow) = c.sum_i64();
                    Bucket { start_ms, count: c.count, sum, sum_overflow, sum_exact: c.sum.to_string() }
                })
                .collect(),
            served_by_node_id: self.node.id,
            applied_index: applied,
        }))
    }
}
