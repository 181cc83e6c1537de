//! How soon a partition acknowledges a write again, e.g. after its leader
//! was killed: the measurement behind `tally probe-writes`, the failover
//! figures of docs/BENCHMARKS.md and the recovery times of the cluster
//! tests (docs/RELIABILITY.md), written once so they all mean the same.
//!
//! [`first_write`] writes one event at a time to an entity of the
//! partition ([`probe_entity`]: `probe-{k}`, the first such name that lands
//! there) with a fresh event id, until one is acknowledged. It uses the raw
//! `Ingest` stub, not `TallyClient`: the client's retries with backoff, its
//! circuit breaker and its map refreshes would add their own delays and
//! hide the cluster's. Attempts go round-robin over the given channels,
//! each cut off after [`Pacing::request_timeout`]. One attempt at a time is
//! the rule: a failed one is followed by the next [`Pacing::interval`]
//! later. But an attempt can hang (sent to a node that still forwards to
//! the dead leader, or waiting for a commit), so once the attempts in
//! flight have all waited [`Pacing::hedge_after`], another is started
//! beside them, up to [`MAX_IN_FLIGHT`]. That keeps the resolution near the
//! hedge delay rather than the request timeout, without multiplying the
//! writes when the cluster is merely slow.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use serde::{Deserialize, Serialize};
use tally_client::time_arg::now_ms;
use tally_proto::routing::Routing;
use tally_proto::v1::ingest_client::IngestClient;
use tally_proto::v1::{Event, IngestRequest};
use tonic::transport::{Channel, Endpoint};

use crate::measure::RankedMs;

/// Attempts outstanding per partition at most.
pub const MAX_IN_FLIGHT: usize = 8;

/// When attempts start and how long they may take.
#[derive(Debug, Clone, Copy)]
pub struct Pacing {
    /// Time from a failed attempt to the next one.
    pub interval: Duration,
    /// Start another attempt beside those in flight once they have all
    /// waited this long.
    pub hedge_after: Duration,
    /// Limit on one attempt (connecting included).
    pub request_timeout: Duration,
}

impl Default for Pacing {
    /// `tally probe-writes`' defaults: 10 ms, 100 ms, 500 ms.
    fn default() -> Pacing {
        Pacing {
            interval: Duration::from_millis(10),
            hedge_after: Duration::from_millis(100),
            request_timeout: Duration::from_millis(500),
        }
    }
}

/// How one partition's probing ended.
#[derive(Debug, Clone)]
pub struct FirstWrite {
    pub partition: u32,
    pub entity: String,
    /// From `started` to the first acknowledgement; `None` if none came
    /// before the deadline.
    pub first_ack: Option<Duration>,
    pub attempts: u64,
    pub last_error: Option<String>,
}

/// What `tally probe-writes` reports (`--json`), and the failover phase of
/// the benchmark reads back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeWritesRun {
    pub addrs: Vec<String>,
    pub partition_count: u32,
    /// The origin of the times, when not the command's start.
    pub since_ms: Option<i64>,
    pub timeout_s: f64,
    /// Partitions probed.
    pub probed: usize,
    /// Partitions that acknowledged a write before the timeout.
    pub acked: usize,
    /// Partitions that did not.
    pub failed: usize,
    pub failed_partitions: Vec<u32>,
    /// Origin → first acknowledged write, over the partitions that had one.
    pub first_ack_ms: RankedMs,
    pub partitions: Vec<PartitionProbe>,
}

/// One partition's line of a [`ProbeWritesRun`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartitionProbe {
    pub partition: u32,
    pub entity: String,
    pub first_ack_ms: Option<f64>,
    pub attempts: u64,
    pub last_error: Option<String>,
}

impl FirstWrite {
    /// Time to the first acknowledgement in milliseconds.
    pub fn first_ack_ms(&self) -> Option<f64> {
        self.first_ack.map(|d| d.as_secs_f64() * 1000.0)
    }

    /// This partition's line of a [`ProbeWritesRun`].
    pub fn to_probe(&self) -> PartitionProbe {
        PartitionProbe {
            partition: self.partition,
            entity: self.entity.clone(),
            first_ack_ms: self.first_ack_ms(),
            attempts: self.attempts,
            last_error: self.last_error.clone(),
        }
    }
}

/// For each wanted partition, the first `probe-{k}` entity that lands in
/// it. None when some partition has no such name among the first many
/// (which a uniform hash makes practically impossible).
pub fn probe_entities(partitions: &[u32], routing: &Routing) -> Option<BTreeMap<u32, String>> {
    let count = routing.partition_count();
    let mut wanted = partitions.to_vec();
    wanted.sort_unstable();
    wanted.dedup();
    let mut out = BTreeMap::new();
    // Coupon collector: about count × ln(count) names find every partition;
    // the bound is far above that.
    let bound = u64::from(count).saturating_mul(1_000).max(100_000);
    for k in 0..bound {
        if out.len() == wanted.len() {
            break;
        }
        let name = format!("probe-{k}");
        let p = routing.home_of(name.as_bytes());
        if wanted.binary_search(&p).is_ok() && !out.contains_key(&p) {
            out.insert(p, name);
        }
    }
    (out.len() == wanted.len()).then_some(out)
}

/// The probe entity of one partition (see [`probe_entities`]).
pub fn probe_entity(partition: u32, routing: &Routing) -> Option<String> {
    probe_entities(&[partition], routing)?.remove(&partition)
}

/// A channel that connects on first use and reconnects by itself, so a
/// dead address costs a failed attempt, not a stalled start.
pub fn lazy_channel(addr: &str, connect_timeout: Duration) -> Result<Channel, tonic::transport::Error> {
    let uri = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
    Ok(Endpoint::from_shared(uri)?.connect_timeout(connect_timeout).tcp_nodelay(true).connect_lazy())
}

/// Probes `partition` through `entity` (one of its entities) until an
/// event is acknowledged or `deadline`; times run from `started`.
/// `channels` must not be empty (the probe then only waits for the
/// deadline and reports no acknowledgement).
pub async fn first_write(
    partition: u32,
    entity: String,
    channels: Arc<[Channel]>,
    pacing: Pacing,
    deadline: Instant,
    started: Instant,
) -> FirstWrite {
    let mut result = FirstWrite { partition, entity, first_ack: None, attempts: 0, last_error: None };
    if channels.is_empty() {
        tokio::time::sleep_until(deadline.into()).await;
        result.last_error = Some("no address to write through".into());
        return result;
    }
    let mut in_flight = FuturesUnordered::new();
    let mut next = Instant::now();
    let run_id: u64 = rand::random();
    loop {
        tokio::select! {
            // Answers first: an ack that arrived must not lose to the deadline.
            biased;
            Some(answer) = in_flight.next() => match answer {
                // Typed here: the set's first push comes later in the loop.
                Ok::<Instant, String>(at) => {
                    result.first_ack = Some(at.duration_since(started));
                    return result;
                }
                Err(e) => {
                    result.last_error = Some(e);
                    next = next.min(Instant::now() + pacing.interval);
                }
            },
            _ = tokio::time::sleep_until(deadline.into()) => return result,
            _ = tokio::time::sleep_until(next.into()), if in_flight.len() < MAX_IN_FLIGHT => {
                // Different partitions start on different nodes.
                let k = result.attempts as usize + partition as usize;
                let channel = channels[k % channels.len()].clone();
                let event = Event { actor_id: Vec::new(),
                    entity_id: result.entity.clone().into_bytes(),
                    event_type: "probe".into(),
                    event_time_ms: now_ms(),
                    event_id: format!("probe-{partition}-{run_id:016x}-{}", result.attempts).into_bytes(),
                    value: None,
                };
                result.attempts += 1;
                in_flight.push(attempt(channel, event, pacing.request_timeout));
                // The next one only if this one fails (see above) or hangs.
                next = Instant::now() + pacing.hedge_after;
            },
        }
    }
}

/// Sends one event; the moment it was acknowledged, or why not.
async fn attempt(channel: Channel, event: Event, timeout: Duration) -> Result<Instant, String> {
    let mut request = tonic::Request::new(IngestRequest { events: vec![event] });
    request.set_timeout(timeout);
    // The outer timeout also bounds connecting, which the gRPC deadline
    // does not cover.
    let answer = tokio::time::timeout(timeout, IngestClient::new(channel).ingest(request))
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
        .map_err(|status| format!("{:?}: {}", status.code(), status.message()))?
        .into_inner();
    if answer.accepted + answer.duplicates >= 1 {
        return Ok(Instant::now());
    }
    Err(answer.rejected.first().map_or_else(|| "not acknowledged".to_owned(), |r| r.reason.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_entities_land_in_their_partitions() {
        let wanted: Vec<u32> = (0..1000).collect();
        let found = probe_entities(&wanted, &Routing::new(1000, [])).expect("every partition has a probe name");
        assert_eq!(found.len(), 1000);
        for (p, name) in &found {
            assert_eq!(tally_proto::partition::partition_of(name.as_bytes(), 1000), *p, "{name}");
        }
        let some = probe_entities(&[5, 3, 5], &Routing::new(64, [])).expect("found");
        assert_eq!(some.keys().copied().collect::<Vec<_>>(), vec![3, 5]);
        assert_eq!(probe_entity(5, &Routing::new(64, [])).as_ref(), some.get(&5));
    }

    #[tokio::test]
    async fn no_address_means_no_ack_at_the_deadline() {
        let now = Instant::now();
        let r = first_write(0, "probe-0".into(), Vec::new().into(), Pacing::default(), now, now).await;
        assert!(r.first_ack.is_none() && r.attempts == 0);
    }
}
