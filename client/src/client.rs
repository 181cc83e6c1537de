//! [`TallyClient`]: the one object an application holds.
//!
//! It is a cheap handle (`Clone` shares everything) over three parts: the
//! router (partition map, node connections, breakers), the batcher (the
//! bounded buffer behind [`TallyClient::send`]), and the retry loop used by
//! every call. Queries go through the same router, so they too go straight
//! to the right node and survive leader changes.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tally_proto::v1::{
    Consistency, Event, Granularity, SeriesRequest, SeriesResponse, StatsRequest, StatsResponse, StatusRequest,
    StatusResponse, TopKOrder, TopKRequest, TopKResponse,
};
use tally_proto::validate::{validate_event, validate_query_key, validate_range, validate_top_k};
use tokio::sync::oneshot;

use crate::batcher::Batcher;
use crate::config::ClientConfig;
use crate::dispatch::call;
use crate::error::Result;
use crate::leader_router::{Route, Router};
use crate::outcome::{BatchSlots, BatchTicket, Outcome, Reply, ServerTotals, Ticket};
use crate::partition_map::PartitionMap;

/// A connection to a Tally cluster: batched, routed, retried ingestion and
/// typed queries.
///
/// Clones share one buffer and one set of connections. Dropping the last
/// clone still sends whatever is buffered, in the background, but nothing
/// waits for it: call [`flush`](Self::flush) first to know the outcomes.
///
/// ```no_run
/// # async fn demo() -> Result<(), tally_client::ClientError> {
/// use tally_client::{Consistency, TallyClient};
///
/// let client = TallyClient::connect(["127.0.0.1:7001"]).await?;
/// let ticket = client.send(tally_client::event("video-42", "view")).await?;
/// client.flush().await?;
/// println!("{:?}", ticket.await); // Accepted
/// let now = tally_client::time_arg::now_ms();
/// let stats = client.stats("video-42", "view", now - 3_600_000..now + 60_000, Consistency::Linearizable).await?;
/// println!("{} views", stats.count);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct TallyClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    router: Arc<Router>,
    batcher: Batcher,
    totals: Arc<ServerTotals>,
    /// Random per client instance: ids of two clients never collide.
    id_prefix: u64,
    next_id: AtomicU64,
}

/// What the cluster looks like, merged from every reachable node.
#[derive(Debug, Clone)]
pub struct ClusterStatus {
    /// The merged map: partition count, nodes, leaders.
    pub map: PartitionMap,
    /// Each node's own answer (address, then status or why it failed).
    pub nodes: Vec<(String, std::result::Result<StatusResponse, String>)>,
}

impl TallyClient {
    /// Connects with default settings to a cluster that one of `seeds`
    /// (`host:port`) belongs to.
    pub async fn connect<I, S>(seeds: I) -> Result<TallyClient>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        TallyClient::with_config(ClientConfig::new(seeds)).await
    }

    /// Connects with the given configuration. Fails when the configuration
    /// is invalid or no seed answers with an initialised cluster.
    pub async fn with_config(config: ClientConfig) -> Result<TallyClient> {
        let router = Router::connect(config).await?;
        let totals = Arc::new(ServerTotals::default());
        let batcher = Batcher::spawn(router.clone(), totals.clone());
        Ok(TallyClient {
            inner: Arc::new(Inner { router, batcher, totals, id_prefix: rand::random(), next_id: AtomicU64::new(0) }),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.router.config
    }

    /// Queues one event and returns a [`Ticket`] for its outcome.
    ///
    /// Returns at once while the buffer has room, and waits for room when
    /// it is full (backpressure). An event without `event_id` gets a unique
    /// one, so retries never count it twice. An invalid event is not sent:
    /// its ticket is already resolved to [`Outcome::Rejected`].
    pub async fn send(&self, mut event: Event) -> Result<Ticket> {
        if event.event_id.is_empty() {
            event.event_id = self.new_event_id();
        }
        if let Err(e) = validate_event(&event) {
            return Ok(Ticket::ready(Outcome::Rejected { field: e.field.to_owned(), reason: e.reason }));
        }
        let (tx, rx) = oneshot::channel();
        self.inner.batcher.send(&event, Reply::one(tx)).await?;
        Ok(Ticket::pending(rx))
    }

    /// Queues many events and returns one [`BatchTicket`] for all their
    /// outcomes, in order. The same as calling [`send`](Self::send) for
    /// each (ids filled in, invalid events resolved as rejected, waiting
    /// for buffer room), at a fraction of the cost per event: one ticket,
    /// and the buffer taken and queued in chunks. The events still travel
    /// in per-partition batches like any others.
    pub async fn send_batch(&self, events: Vec<Event>) -> Result<BatchTicket> {
        let mut outcomes = Vec::with_capacity(events.len());
        // Valid events with their position in the batch.
        let mut valid = Vec::with_capacity(events.len());
        for (index, mut event) in events.into_iter().enumerate() {
            if event.event_id.is_empty() {
                event.event_id = self.new_event_id();
            }
            match validate_event(&event) {
                Ok(()) => {
                    outcomes.push(None);
                    valid.push((index, event));
                }
                Err(e) => outcomes.push(Some(Outcome::Rejected { field: e.field.to_owned(), reason: e.reason })),
            }
        }
        let (slots, ticket) = BatchSlots::new(outcomes);
        let queued = valid.into_iter().map(|(index, event)| (event, Reply::slot(slots.clone(), index))).collect();
        self.inner.batcher.send_many(queued).await?;
        Ok(ticket)
    }

    /// Waits until every event given to [`send`](Self::send) before this
    /// call is resolved (accepted, duplicate, rejected or failed). Events
    /// sent meanwhile by other tasks are not waited for.
    pub async fn flush(&self) -> Result<()> {
        self.inner.batcher.flush().await
    }

    /// Sends a set of events and waits for each one's outcome, in order.
    pub async fn ingest<I>(&self, events: I) -> Result<Vec<Outcome>>
    where
        I: IntoIterator<Item = Event>,
    {
        let ticket = self.send_batch(events.into_iter().collect()).await?;
        self.flush().await?;
        Ok(ticket.await)
    }

    /// Exact totals of accepted and duplicate events over all batches this
    /// client sent (see [`ServerTotals`]).
    pub fn totals(&self) -> &ServerTotals {
        &self.inner.totals
    }

    /// Events buffered or in flight right now.
    pub fn pending(&self) -> usize {
        self.inner.batcher.pending()
    }

    /// A fresh event id: 8 random bytes of this client, then a counter.
    fn new_event_id(&self) -> Vec<u8> {
        let n = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut id = Vec::with_capacity(16);
        id.extend_from_slice(&self.inner.id_prefix.to_be_bytes());
        id.extend_from_slice(&n.to_be_bytes());
        id
    }

    /// Count, sum and average of `entity_id`/`event_type` over
    /// `range` (ms since epoch, `[start, end)`, widened to whole minutes).
    pub async fn stats(
        &self,
        entity_id: impl AsRef<[u8]>,
        event_type: &str,
        range: Range<i64>,
        consistency: Consistency,
    ) -> Result<StatsResponse> {
        let entity_id = entity_id.as_ref();
        validate_query_key(entity_id, event_type)?;
        validate_range(range.start, range.end)?;
        let request = StatsRequest {
            entity_id: entity_id.to_vec(),
            event_type: event_type.to_owned(),
            from_ms: range.start,
            to_ms: range.end,
            consistency: consistency as i32,
            share_partition_plus_one: 0,
        };
        let route = self.query_route(entity_id, consistency);
        call(&self.inner.router, route, |node| {
            let request = node.request(request.clone());
            async move { node.query().stats(request).await.map(tonic::Response::into_inner) }
        })
        .await
    }

    /// Buckets of `granularity` covering `range`, empty ones included.
    pub async fn series(
        &self,
        entity_id: impl AsRef<[u8]>,
        event_type: &str,
        range: Range<i64>,
        granularity: Granularity,
        consistency: Consistency,
    ) -> Result<SeriesResponse> {
        let entity_id = entity_id.as_ref();
        validate_query_key(entity_id, event_type)?;
        validate_range(range.start, range.end)?;
        let request = SeriesRequest {
            entity_id: entity_id.to_vec(),
            event_type: event_type.to_owned(),
            from_ms: range.start,
            to_ms: range.end,
            granularity: granularity as i32,
            consistency: consistency as i32,
            share_partition_plus_one: 0,
        };
        let route = self.query_route(entity_id, consistency);
        call(&self.inner.router, route, |node| {
            let request = node.request(request.clone());
            async move { node.query().series(request).await.map(tonic::Response::into_inner) }
        })
        .await
    }

    /// The `k` (1 to 1,000) entities with the highest count (or, with
    /// [`TopKOrder::Sum`], sum) of `event_type` over `range` rounded out to
    /// whole hours, exact; highest first. Any node answers: it gathers
    /// every partition's share itself.
    pub async fn top_k(
        &self,
        event_type: &str,
        range: Range<i64>,
        k: u32,
        order: TopKOrder,
        consistency: Consistency,
    ) -> Result<TopKResponse> {
        validate_top_k(event_type, range.start, range.end, k)?;
        let request = TopKRequest {
            event_type: event_type.to_owned(),
            from_ms: range.start,
            to_ms: range.end,
            k,
            order: order as i32,
            consistency: consistency as i32,
            partitions: Vec::new(),
        };
        call(&self.inner.router, Route::Any, |node| {
            let request = node.request(request.clone());
            async move { node.query().top_k(request).await.map(tonic::Response::into_inner) }
        })
        .await
    }

    fn query_route(&self, entity_id: &[u8], consistency: Consistency) -> Route {
        let partition = self.inner.router.with_map(|m| m.partition_of(entity_id));
        match consistency {
            Consistency::Stale => Route::Replica(partition),
            Consistency::Linearizable | Consistency::Unspecified => Route::Leader(partition),
        }
    }

    /// The status as one node (any) sees it, with retries.
    pub async fn node_status(&self) -> Result<StatusResponse> {
        call(&self.inner.router, Route::Any, |node| {
            let request = node.request(StatusRequest {});
            async move { node.cluster().status(request).await.map(tonic::Response::into_inner) }
        })
        .await
    }

    /// Asks every known node for its status, merges the answers into a
    /// fresh partition map (which the client then routes with) and returns
    /// both. Fails only when no node reports an initialised cluster.
    pub async fn cluster_status(&self) -> Result<ClusterStatus> {
        let nodes = self.inner.router.statuses().await;
        let answers: Vec<StatusResponse> = nodes.iter().filter_map(|(_, r)| r.as_ref().ok().cloned()).collect();
        let map = PartitionMap::merge(&answers).ok_or_else(|| {
            crate::ClientError::NoCluster(
                nodes
                    .iter()
                    .map(|(a, r)| format!("{a}: {}", r.as_ref().err().map_or("not initialised", |e| e)))
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })?;
        Ok(ClusterStatus { map, nodes })
    }

    /// The partition map the client routes with now.
    pub fn partition_map(&self) -> PartitionMap {
        self.inner.router.with_map(Clone::clone)
    }

    /// Re-learns the partition map from the cluster now.
    pub async fn refresh(&self) -> Result<()> {
        self.inner.router.refresh(true).await
    }

    /// The circuit breaker state of every node the client has used.
    pub fn breaker_states(&self) -> Vec<(String, crate::BreakerState)> {
        self.inner.router.pool.states()
    }
}
