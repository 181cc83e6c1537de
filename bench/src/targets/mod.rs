//! The systems `tally bench` can drive: Tally itself and the peers it is
//! compared with in `scripts/bench.sh` (Redis two ways, etcd).
//!
//! Why adapters rather than one bench per system: a comparison is only
//! honest if everything except the system under test is the same code. So
//! event generation, rate control, the HDR histogram, the correction for
//! coordinated omission and the JSON report all stay in `bench.rs`, and a
//! target only answers "here are events, give me a [`BatchTicket`] that
//! resolves to their outcomes". Tally's target is the ordinary
//! [`TallyClient`] (routing, batching, retries). The peers share
//! [`PeerBatcher`], which does what the Tally client does for batching —
//! collect up to `--batch-events` events or `--linger`, keep at most
//! `--inflight` batches outstanding, bound the buffer — and hands each
//! batch to the target's "send a batch, get acks" step:
//!
//! * [`redis_incr`]: pipelined `INCR` of one key per event. No dedup, no
//!   time buckets, no durability: an upper bound that does less work.
//! * [`redis_dedup`]: Tally's semantics in one Lua script per event
//!   (`SET NX EX` on the event's dedup key, then `HINCRBY` count and sum
//!   of its minute, hour, day and month buckets), pipelined.
//! * [`etcd`]: one durable put per event, a batch per transaction.

pub mod etcd;
pub mod redis_dedup;
pub mod redis_incr;
pub mod tally;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::ValueEnum;
use tokio::sync::{mpsc, Semaphore};

use tally_client::{BatchTicket, Event, Outcome, OutcomeSlot, TallyClient};

/// Which system `tally bench` drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TargetKind {
    /// A Tally cluster (`--addr`), through the Rust client.
    Tally,
    /// Redis: pipelined INCR of one key per event (no dedup, no buckets).
    RedisIncr,
    /// Redis: per event SET NX EX for dedup, then HINCRBY of four buckets (Lua).
    RedisDedup,
    /// etcd: one put per event, a batch per transaction.
    Etcd,
}

impl TargetKind {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Tally => "tally",
            TargetKind::RedisIncr => "redis-incr",
            TargetKind::RedisDedup => "redis-dedup",
            TargetKind::Etcd => "etcd",
        }
    }

    /// Address used when `--target-addr` is not given (Tally uses `--addr`).
    pub fn default_addr(self) -> &'static str {
        match self {
            TargetKind::Tally => "127.0.0.1:7001",
            TargetKind::RedisIncr | TargetKind::RedisDedup => "127.0.0.1:6379",
            TargetKind::Etcd => "127.0.0.1:2379",
        }
    }

    /// Events per batch when `--batch-events` is not given. etcd refuses
    /// transactions of more than `--max-txn-ops` (default 128) operations.
    pub fn default_batch(self) -> usize {
        match self {
            TargetKind::Tally => 2000,
            TargetKind::RedisIncr | TargetKind::RedisDedup => 1000,
            TargetKind::Etcd => 128,
        }
    }
}

/// How a peer batcher is sized.
#[derive(Debug, Clone, Copy)]
pub struct BatchSettings {
    /// Events per batch at most.
    pub max_events: usize,
    /// How long a partial batch waits for more events.
    pub linger: Duration,
    /// Batches sent and not yet answered, at most.
    pub inflight: usize,
    /// Events buffered (not yet in a batch) at most; `send` waits beyond.
    pub buffer_events: usize,
}

/// A peer's "send a batch, get acks" step. One outcome per event, in order.
pub(crate) trait BatchSend: Send + Sync + 'static {
    /// Sends `events` as one batch (a pipeline or a transaction).
    fn send_batch(&self, events: Vec<Event>) -> impl Future<Output = Vec<Outcome>> + Send;
}

/// The system under test, as the bench's producers see it.
pub(crate) enum Target {
    Tally(TallyClient),
    RedisIncr(PeerBatcher),
    RedisDedup(PeerBatcher, Arc<redis_dedup::RedisDedup>),
    Etcd(PeerBatcher),
}

impl Target {
    /// Connects to the target. `addr` is `--target-addr` (or, for Tally,
    /// `--addr`), comma-separated where a target takes several endpoints.
    pub(crate) async fn connect(
        kind: TargetKind,
        addr: &str,
        tally_config: tally_client::ClientConfig,
        batch: BatchSettings,
    ) -> anyhow::Result<Target> {
        Ok(match kind {
            TargetKind::Tally => Target::Tally(tally::connect(tally_config).await?),
            TargetKind::RedisIncr => {
                let t = Arc::new(redis_incr::RedisIncr::connect(addr, batch.inflight).await?);
                Target::RedisIncr(PeerBatcher::start(t, batch))
            }
            TargetKind::RedisDedup => {
                let t = Arc::new(redis_dedup::RedisDedup::connect(addr, batch.inflight).await?);
                Target::RedisDedup(PeerBatcher::start(t.clone(), batch), t)
            }
            TargetKind::Etcd => Target::Etcd(PeerBatcher::start(Arc::new(etcd::Etcd::connect(addr).await?), batch)),
        })
    }

    /// Queues events; the ticket resolves to their outcomes, in order.
    pub(crate) async fn send_batch(&self, events: Vec<Event>) -> anyhow::Result<BatchTicket> {
        match self {
            Target::Tally(c) => Ok(c.send_batch(events).await?),
            Target::RedisIncr(b) | Target::RedisDedup(b, _) | Target::Etcd(b) => b.send_batch(events).await,
        }
    }

    /// Events queued or in flight.
    pub(crate) fn pending(&self) -> usize {
        match self {
            Target::Tally(c) => c.pending(),
            Target::RedisIncr(b) | Target::RedisDedup(b, _) | Target::Etcd(b) => b.pending(),
        }
    }

    /// Waits for everything sent so far (peers: every ticket is awaited by
    /// the bench anyway, so there is nothing left to wait for).
    pub(crate) async fn flush(&self) -> anyhow::Result<()> {
        if let Target::Tally(c) = self {
            c.flush().await?;
        }
        Ok(())
    }
}

type Job = (Event, OutcomeSlot);

/// Batching for the peers, the counterpart of the Tally client's batcher:
/// a bounded queue, batches of at most `max_events` cut after `linger`, at
/// most `inflight` batches outstanding. Each event's ticket resolves when
/// its batch is answered.
pub(crate) struct PeerBatcher {
    tx: mpsc::Sender<Job>,
    pending: Arc<AtomicUsize>,
}

impl PeerBatcher {
    /// Starts the batching task for `target`.
    pub(crate) fn start<T: BatchSend>(target: Arc<T>, settings: BatchSettings) -> PeerBatcher {
        let (tx, rx) = mpsc::channel::<Job>(settings.buffer_events.max(1));
        let pending = Arc::new(AtomicUsize::new(0));
        tokio::spawn(run_batcher(target, settings, rx, pending.clone()));
        PeerBatcher { tx, pending }
    }

    async fn send_batch(&self, events: Vec<Event>) -> anyhow::Result<BatchTicket> {
        let (ticket, slots) = BatchTicket::with_slots(events.len());
        self.pending.fetch_add(events.len(), Ordering::Relaxed);
        for job in events.into_iter().zip(slots) {
            self.tx.send(job).await.map_err(|_| anyhow::anyhow!("the batching task has stopped"))?;
        }
        Ok(ticket)
    }

    fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }
}

async fn run_batcher<T: BatchSend>(
    target: Arc<T>,
    settings: BatchSettings,
    mut rx: mpsc::Receiver<Job>,
    pending: Arc<AtomicUsize>,
) {
    let permits = Arc::new(Semaphore::new(settings.inflight.max(1)));
    let max = settings.max_events.max(1);
    loop {
        // Wait for a free slot first, so events keep accumulating into the
        // next batch while every slot is busy (as the Tally client does).
        let Ok(permit) = permits.clone().acquire_owned().await else { return };
        let Some(first) = rx.recv().await else { return };
        let mut jobs = Vec::with_capacity(max);
        jobs.push(first);
        let deadline = tokio::time::Instant::now() + settings.linger;
        while jobs.len() < max {
            // Take what is already queued without waiting, then linger.
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(job)) => jobs.push(job),
                    Ok(None) | Err(_) => break,
                },
            }
        }
        let target = target.clone();
        let pending = pending.clone();
        tokio::spawn(async move {
            let (events, acks): (Vec<Event>, Vec<OutcomeSlot>) = jobs.into_iter().unzip();
            let n = acks.len();
            let mut outcomes = target.send_batch(events).await.into_iter();
            // Before the acks, so `pending` is never behind a resolved ticket.
            pending.fetch_sub(n, Ordering::Relaxed);
            for ack in acks {
                let outcome = outcomes.next().unwrap_or_else(|| Outcome::Failed {
                    error: "the target answered fewer results than the batch had events".into(),
                    attempts: 1,
                });
                ack.resolve(outcome);
            }
            drop(permit);
        });
    }
}

/// Every event of a batch failed with `error` (one attempt; peers are not
/// retried, so a failure is visible in the report rather than hidden).
pub(crate) fn all_failed(n: usize, error: impl std::fmt::Display) -> Vec<Outcome> {
    let error = error.to_string();
    (0..n).map(|_| Outcome::Failed { error: error.clone(), attempts: 1 }).collect()
}

/// `host:port` or `redis://…` to a Redis URL.
pub(crate) fn redis_url(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("redis://{addr}/")
    }
}

/// Opens `n` multiplexed Redis connections (batches are spread over them
/// round-robin), with a response timeout long enough for a big pipeline on
/// a saturated server.
pub(crate) async fn redis_connections(addr: &str, n: usize) -> anyhow::Result<Vec<redis::aio::MultiplexedConnection>> {
    let url = redis_url(addr);
    let client = redis::Client::open(url.as_str()).with_context(|| format!("redis address {url}"))?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(3)))
        .set_response_timeout(Some(Duration::from_secs(30)));
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        out.push(
            client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .with_context(|| format!("connecting to redis at {url}"))?,
        );
    }
    Ok(out)
}

/// Entity id bytes as text for keys (the bench's ids are ASCII).
pub(crate) fn entity_str(event: &Event) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(&event.entity_id)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Records batch sizes; answers duplicate for odd values.
    struct Fake(Mutex<Vec<usize>>);

    impl BatchSend for Fake {
        async fn send_batch(&self, events: Vec<Event>) -> Vec<Outcome> {
            self.0.lock().expect("lock").push(events.len());
            events
                .iter()
                .map(|e| if e.value.unwrap_or(0) % 2 == 1 { Outcome::Duplicate } else { Outcome::Accepted })
                .collect()
        }
    }

    #[tokio::test]
    async fn peer_batcher_batches_and_resolves_every_ticket_in_order() {
        let fake = Arc::new(Fake(Mutex::new(Vec::new())));
        let settings =
            BatchSettings { max_events: 10, linger: Duration::from_millis(5), inflight: 2, buffer_events: 1000 };
        let batcher = PeerBatcher::start(fake.clone(), settings);
        let events: Vec<Event> = (0..95)
            .map(|i| Event {
                actor_id: Vec::new(),
                entity_id: b"e".to_vec(),
                event_type: "view".into(),
                event_time_ms: 1,
                event_id: format!("{i}").into_bytes(),
                value: Some(i),
            })
            .collect();
        let outcomes = batcher.send_batch(events).await.expect("send").await;
        assert_eq!(outcomes.len(), 95);
        for (i, outcome) in outcomes.into_iter().enumerate() {
            let want = if i % 2 == 1 { Outcome::Duplicate } else { Outcome::Accepted };
            assert_eq!(outcome, want, "event {i}");
        }
        let sizes = fake.0.lock().expect("lock").clone();
        assert_eq!(sizes.iter().sum::<usize>(), 95);
        assert!(sizes.iter().all(|&n| n <= 10), "{sizes:?}");
        assert_eq!(batcher.pending(), 0);
    }

    #[test]
    fn redis_urls() {
        assert_eq!(redis_url("127.0.0.1:6379"), "redis://127.0.0.1:6379/");
        assert_eq!(redis_url("redis://h:1/2"), "redis://h:1/2");
    }
}
