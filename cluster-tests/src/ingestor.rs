//! A test client that retries every batch until each event is acknowledged,
//! always with the same event ids, moving to another live node on errors —
//! what a careful application does, and what must never double count.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tally_proto::v1::ingest_client::IngestClient;
use tally_proto::v1::{Event, IngestRequest};
use tonic::transport::Channel;

#[derive(Clone)]
pub struct RetryingIngestor {
    addrs: Vec<(u64, String)>,
    live: Arc<Mutex<BTreeSet<u64>>>,
    clients: Arc<Mutex<HashMap<u64, IngestClient<Channel>>>>,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Acked {
    pub accepted: u64,
    pub duplicates: u64,
    pub attempts: u64,
}

impl RetryingIngestor {
    pub fn new(addrs: Vec<(u64, String)>) -> RetryingIngestor {
        let live = addrs.iter().map(|(id, _)| *id).collect();
        RetryingIngestor { addrs, live: Arc::new(Mutex::new(live)), clients: Arc::default() }
    }

    pub fn mark_dead(&self, id: u64) {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        self.clients.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    }

    pub fn mark_live(&self, id: u64) {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(id);
    }

    fn pick(&self, attempt: u64) -> Option<(u64, String)> {
        let live: Vec<u64> = self.live.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().collect();
        let id = *live.get(attempt as usize % live.len().max(1))?;
        self.addrs.iter().find(|(n, _)| *n == id).cloned()
    }

    async fn client(&self, id: u64, addr: &str) -> anyhow::Result<IngestClient<Channel>> {
        if let Some(c) = self.clients.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
            return Ok(c.clone());
        }
        let c = IngestClient::new(tally_client::connect(addr).await?);
        self.clients.lock().unwrap_or_else(|p| p.into_inner()).insert(id, c.clone());
        Ok(c)
    }

    /// Send every batch (batch i starting at node i, `concurrency` at a time)
    /// until acknowledged; returns the summed acknowledgements.
    pub async fn send_all(&self, batches: Vec<Vec<Event>>, concurrency: usize) -> anyhow::Result<Acked> {
        use futures::stream::{self, StreamExt};
        let results: Vec<anyhow::Result<Acked>> = stream::iter(batches.into_iter().enumerate())
            .map(|(i, events)| async move { self.send(events, i as u64).await })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        let mut total = Acked::default();
        for r in results {
            let a = r?;
            total.accepted += a.accepted;
            total.duplicates += a.duplicates;
            total.attempts += a.attempts;
        }
        Ok(total)
    }

    /// Send until every event is accepted or reported duplicate.
    pub async fn send(&self, events: Vec<Event>, start_node: u64) -> anyhow::Result<Acked> {
        let tracked = self.send_tracked(events, start_node, Duration::from_secs(120)).await;
        match tracked.given_up {
            Some(e) => Err(e),
            None => Ok(tracked.acked),
        }
    }

    /// Send until every event is acknowledged or `patience` runs out, and
    /// say exactly which events were acknowledged (accepted or duplicate):
    /// a checker can then hold each of them to exactly once even when the
    /// rest of its batch was given up.
    pub async fn send_tracked(&self, events: Vec<Event>, start_node: u64, patience: Duration) -> Tracked {
        let deadline = Instant::now() + patience;
        let mut remaining = events;
        let mut tracked = Tracked::default();
        let mut attempt = start_node;
        while !remaining.is_empty() {
            if Instant::now() > deadline {
                tracked.given_up =
                    Some(anyhow::anyhow!("{} events still unacknowledged after {patience:?}", remaining.len()));
                break;
            }
            tracked.acked.attempts += 1;
            let Some((id, addr)) = self.pick(attempt) else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            attempt += 1;
            let mut client = match self.client(id, &addr).await {
                Ok(c) => c,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let mut req = tonic::Request::new(IngestRequest { events: remaining.clone() });
            req.set_timeout(Duration::from_secs(15));
            match client.ingest(req).await {
                Ok(resp) => {
                    let resp = resp.into_inner();
                    tracked.acked.accepted += resp.accepted as u64;
                    tracked.acked.duplicates += resp.duplicates as u64;
                    // Refused for good: only the events meant to be, as IN_FUTURE.
                    let doomed = |r: &tally_proto::v1::Rejection| {
                        r.code == tally_proto::v1::RejectionCode::InFuture as i32
                            && remaining
                                .get(r.index as usize)
                                .is_some_and(|e| e.entity_id.starts_with(crate::model::DOOMED_PREFIX.as_bytes()))
                    };
                    if let Some(bad) = resp.rejected.iter().find(|r| !r.retryable && !doomed(r)) {
                        tracked.given_up = Some(anyhow::anyhow!("valid event rejected: {bad:?}"));
                        break;
                    }
                    let refused: BTreeSet<u32> =
                        resp.rejected.iter().filter(|r| !r.retryable).map(|r| r.index).collect();
                    let retry: BTreeSet<u32> = resp.rejected.iter().filter(|r| r.retryable).map(|r| r.index).collect();
                    let (again, done): (Vec<_>, Vec<_>) =
                        remaining.into_iter().enumerate().partition(|(i, _)| retry.contains(&(*i as u32)));
                    for (i, e) in done {
                        if !refused.contains(&(i as u32)) {
                            tracked.acknowledged.push(e);
                        }
                    }
                    tracked.refused += refused.len() as u64;
                    remaining = again.into_iter().map(|(_, e)| e).collect();
                    if !remaining.is_empty() {
                        tokio::time::sleep(Duration::from_millis(50 + rand::random::<u64>() % 150)).await;
                    }
                }
                Err(_) => {
                    // Unknown outcome: resend everything with the same ids.
                    tokio::time::sleep(Duration::from_millis(50 + rand::random::<u64>() % 150)).await;
                }
            }
        }
        tracked
    }
}

/// What [`RetryingIngestor::send_tracked`] achieved.
#[derive(Debug, Default)]
pub struct Tracked {
    /// Events the cluster acknowledged (each exactly once in here).
    pub acknowledged: Vec<Event>,
    /// Events refused as meant to be (IN_FUTURE, `Workload::doomed_event`).
    pub refused: u64,
    pub acked: Acked,
    /// Why the rest were given up, if any were.
    pub given_up: Option<anyhow::Error>,
}

/// `events` in batches of `batch`, each batch twice in a row: the second
/// is what a client's retry of it looks like (same ids).
pub fn batches_sent_twice(events: &[Event], batch: usize) -> Vec<Vec<Event>> {
    events.chunks(batch.max(1)).flat_map(|c| [c.to_vec(), c.to_vec()]).collect()
}
