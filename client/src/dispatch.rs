//! Sending one request until it succeeds: the retry loop around every call,
//! and the per-event bookkeeping of an ingest batch.
//!
//! Why retries are Tally's own and not `tower::retry`: a retry here is not
//! "the same request to the same service again". After a failure the loop
//! may pick another node (the failed one's breaker may be open, the leader
//! may have moved), and after a partly successful ingest it resends only the
//! events the server marked retryable. Both need the answer's contents and
//! the router, which a tower `Policy` around one node's service does not
//! have.
//!
//! Why retrying ingest is safe: every event carries an id (the client fills
//! in missing ones), so an event that was in fact committed before its
//! answer got lost comes back as a duplicate instead of being counted again.
//!
//! Every answer says which events were accepted, which were duplicates
//! (`duplicate_indexes`) and which were rejected (`rejected`), by index in
//! the request, so each event's [`Outcome`] is exact.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tally_proto::v1::IngestResponse;
use tokio::sync::Semaphore;

use crate::encoded::{self, EncodedIngestRequest};
use crate::error::{ClientError, Result};
use crate::leader_router::{Route, Router};
use crate::node_pool::{classify, retry_after, Failure, Node};
use crate::outcome::{Outcome, Reply, ServerTotals};

/// One event on its way, with whoever waits for its outcome.
#[derive(Debug)]
pub(crate) struct Item {
    /// The event, encoded once (see `encoded.rs`).
    pub(crate) event: Bytes,
    /// Its partition, computed before encoding.
    pub(crate) partition: u32,
    pub(crate) reply: Reply,
    /// Keeps the flush epoch the event was sent in open until it resolves.
    pub(crate) _epoch: Arc<crate::batcher::EpochToken>,
}

impl Item {
    /// Returns the event's buffer slot, then its outcome. In this order:
    /// resolving drops the item's epoch token, which may end a `flush`, and
    /// the caller of `flush` must then see the slot free.
    fn resolve(self, outcome: Outcome, permits: &Semaphore) {
        permits.add_permits(1);
        let Item { reply, _epoch, .. } = self;
        reply.resolve(outcome);
        drop(_epoch);
    }
}

/// Calls `f` on the node chosen for `route` until it succeeds, retrying
/// node failures and transient answers with backoff.
pub(crate) async fn call<T, F, Fut>(router: &Arc<Router>, route: Route, mut f: F) -> Result<T>
where
    F: FnMut(Arc<Node>) -> Fut,
    Fut: Future<Output = std::result::Result<T, tonic::Status>>,
{
    let mut retry = router.config.retry.start(Instant::now());
    let mut avoid: Option<String> = None;
    loop {
        let mut hint = None;
        let last = match router.pick(route, avoid.as_deref()) {
            Some(node) if node.breaker().try_acquire(Instant::now()) => match f(node.clone()).await {
                Ok(answer) => {
                    node.breaker().on_success(Instant::now());
                    return Ok(answer);
                }
                Err(status) => match classify(&status) {
                    Failure::Permanent => {
                        node.breaker().on_success(Instant::now());
                        return Err(ClientError::rpc(node.addr(), &status));
                    }
                    Failure::Transient => {
                        node.breaker().on_success(Instant::now());
                        router.refresh_soon();
                        hint = retry_after(&status);
                        ClientError::rpc(node.addr(), &status).to_string()
                    }
                    Failure::Node => {
                        router.node_failed(&node);
                        avoid = Some(node.addr().to_owned());
                        ClientError::rpc(node.addr(), &status).to_string()
                    }
                },
            },
            Some(node) => format!("circuit breaker of {} is open", node.addr()),
            None => "the circuit breakers of all nodes are open".to_owned(),
        };
        let now = Instant::now();
        let delay = retry.next_delay(now, &mut rand::rng());
        match delay {
            Some(delay) => tokio::time::sleep(delay.max(hint.unwrap_or_default())).await,
            None => {
                return Err(ClientError::RetriesExhausted {
                    attempts: retry.attempts(),
                    elapsed: retry.elapsed(now),
                    last,
                })
            }
        }
    }
}

/// Delivers one batch of one partition, resolving every item exactly once
/// and returning its buffer permit as soon as it is resolved.
pub(crate) async fn deliver(
    router: Arc<Router>,
    totals: Arc<ServerTotals>,
    permits: Arc<Semaphore>,
    partition: u32,
    mut items: Vec<Item>,
) {
    let mut retry = router.config.retry.start(Instant::now());
    let mut avoid: Option<String> = None;
    loop {
        let mut hint = None;
        let last_error = match router.pick(Route::Leader(partition), avoid.as_deref()) {
            Some(node) if node.breaker().try_acquire(Instant::now()) => {
                let events = items.iter().map(|i| i.event.clone()).collect();
                match attempt(&router, &totals, &node, events).await {
                    Ok(answer) => {
                        let (rest, last) = settle(items, &answer, &permits);
                        items = rest;
                        if items.is_empty() {
                            return;
                        }
                        // Retryable rejections mean "no leader / timed out":
                        // the map is probably stale.
                        router.refresh_soon();
                        last
                    }
                    Err(status) => match classify(&status) {
                        Failure::Permanent => {
                            node.breaker().on_success(Instant::now());
                            let error = ClientError::rpc(node.addr(), &status).to_string();
                            let attempts = retry.attempts();
                            resolve_all(items, &permits, |_| Outcome::Failed { error: error.clone(), attempts });
                            return;
                        }
                        failure => {
                            if failure == Failure::Node {
                                router.node_failed(&node);
                                avoid = Some(node.addr().to_owned());
                            } else {
                                node.breaker().on_success(Instant::now());
                                router.refresh_soon();
                                hint = retry_after(&status);
                            }
                            // The request may have been applied before the
                            // answer was lost: the retry then reports those
                            // events as duplicates.
                            ClientError::rpc(node.addr(), &status).to_string()
                        }
                    },
                }
            }
            Some(node) => format!("circuit breaker of {} is open", node.addr()),
            None => "the circuit breakers of all nodes are open".to_owned(),
        };
        let delay = retry.next_delay(Instant::now(), &mut rand::rng());
        match delay {
            // A node shedding load said how long to stay away.
            Some(delay) => tokio::time::sleep(delay.max(hint.unwrap_or_default())).await,
            None => {
                let attempts = retry.attempts();
                resolve_all(items, &permits, |_| Outcome::Failed { error: last_error.clone(), attempts });
                return;
            }
        }
    }
}

/// One Ingest call with already encoded events (a reference count per
/// event, not a copy: see `encoded.rs`); an answer closes the breaker and
/// teaches the router the leaders it names.
async fn attempt(
    router: &Router,
    totals: &ServerTotals,
    node: &Node,
    events: Vec<Bytes>,
) -> std::result::Result<IngestResponse, tonic::Status> {
    let answer = encoded::ingest(node.service(), node.request(EncodedIngestRequest { events })).await?.into_inner();
    node.breaker().on_success(Instant::now());
    totals.add(answer.accepted, answer.duplicates);
    router.apply_hints(&answer.leaders);
    Ok(answer)
}

/// Delivers the batches of several partitions that share a leader: the
/// first attempt is one request with all of them, the answer is split per
/// partition, and whatever is left to retry (or everything, if that request
/// failed) goes on in each partition's own [`deliver`] loop. Each partition
/// is reported on `completed` as soon as its own part is resolved.
///
/// Why: at moderate rates a partition fills only a few events per linger,
/// so one request per partition meant about one request per event (64
/// partitions, 15,000 events/s: ~12,000 requests/s), and the per-request
/// cost on both sides — not the events — was most of the CPU. The server
/// splits a request by partition anyway.
pub(crate) async fn deliver_together(
    router: Arc<Router>,
    totals: Arc<ServerTotals>,
    permits: Arc<Semaphore>,
    groups: Vec<(u32, Vec<Item>)>,
    completed: tokio::sync::mpsc::Sender<u32>,
) {
    let shared = match groups.as_slice() {
        [(first, _), _, ..] => router.pick(Route::Leader(*first), None),
        _ => None,
    };
    let leftovers: Vec<(u32, Vec<Item>)> = match shared {
        Some(node) if node.breaker().try_acquire(Instant::now()) => {
            let events = groups.iter().flat_map(|(_, items)| items.iter().map(|i| i.event.clone())).collect();
            match attempt(&router, &totals, &node, events).await {
                Ok(answer) => {
                    let mut offset = 0;
                    let mut left = Vec::new();
                    for (partition, items) in groups {
                        let part = answer_part(&answer, offset, items.len());
                        offset += items.len();
                        let (rest, _) = settle(items, &part, &permits);
                        if rest.is_empty() {
                            let _ = completed.send(partition).await;
                        } else {
                            left.push((partition, rest));
                        }
                    }
                    if !left.is_empty() {
                        router.refresh_soon();
                    }
                    left
                }
                Err(status) => {
                    // Whatever the failure, each partition's own loop
                    // classifies it again and retries with backoff; the
                    // events may have been applied, so retries may report
                    // duplicates, as with any lost answer.
                    if classify(&status) == Failure::Node {
                        router.node_failed(&node);
                    } else {
                        node.breaker().on_success(Instant::now());
                        router.refresh_soon();
                    }
                    groups
                }
            }
        }
        _ => groups,
    };
    futures::future::join_all(leftovers.into_iter().map(|(partition, items)| {
        let (router, totals, permits, completed) = (router.clone(), totals.clone(), permits.clone(), completed.clone());
        async move {
            deliver(router, totals, permits, partition, items).await;
            let _ = completed.send(partition).await;
        }
    }))
    .await;
}

/// The part of `answer` about events `offset..offset + len` of its
/// request, with indexes relative to that part.
fn answer_part(answer: &IngestResponse, offset: usize, len: usize) -> IngestResponse {
    let range = offset..offset + len;
    let inside = |i: u32| range.contains(&(i as usize)).then(|| i - offset as u32);
    IngestResponse {
        rejected: answer
            .rejected
            .iter()
            .filter_map(|r| inside(r.index).map(|index| tally_proto::v1::Rejection { index, ..r.clone() }))
            .collect(),
        duplicate_indexes: answer.duplicate_indexes.iter().filter_map(|&i| inside(i)).collect(),
        ..Default::default()
    }
}

fn resolve_all(items: Vec<Item>, permits: &Semaphore, outcome: impl Fn(&Item) -> Outcome) {
    for item in items {
        let o = outcome(&item);
        item.resolve(o, permits);
    }
}

/// Resolves the items an answer settled; returns those to retry and the
/// reason they need it. `items` are in request order, so an index in the
/// answer is an index into `items`.
fn settle(items: Vec<Item>, answer: &IngestResponse, permits: &Semaphore) -> (Vec<Item>, String) {
    let mut rejection = vec![None; items.len()];
    for r in &answer.rejected {
        if let Some(slot) = rejection.get_mut(r.index as usize) {
            *slot = Some(r);
        }
    }
    let mut duplicate = vec![false; items.len()];
    for &i in &answer.duplicate_indexes {
        if let Some(slot) = duplicate.get_mut(i as usize) {
            *slot = true;
        }
    }
    let mut retry = Vec::new();
    let mut last = String::new();
    for ((item, rejected), duplicate) in items.into_iter().zip(rejection).zip(duplicate) {
        match rejected {
            Some(r) if r.retryable => {
                last.clone_from(&r.reason);
                retry.push(item);
            }
            Some(r) => item.resolve(Outcome::Rejected { field: r.field.clone(), reason: r.reason.clone() }, permits),
            None => item.resolve(if duplicate { Outcome::Duplicate } else { Outcome::Accepted }, permits),
        }
    }
    (retry, last)
}

#[cfg(test)]
mod tests {
    use tally_proto::v1::Rejection;

    use prost::Message;
    use tally_proto::v1::Event;
    use tokio::sync::oneshot;

    use super::*;
    use crate::batcher::EpochToken;

    fn items(n: usize) -> (Vec<Item>, Vec<oneshot::Receiver<Outcome>>) {
        (0..n)
            .map(|i| {
                let (tx, rx) = oneshot::channel();
                let event = Event { event_id: vec![i as u8], ..crate::event("e", "view") };
                let item = Item {
                    event: encoded::encode_event(&event),
                    partition: 0,
                    reply: Reply::one(tx),
                    _epoch: EpochToken::detached(),
                };
                (item, rx)
            })
            .unzip()
    }

    fn rejection(index: u32, retryable: bool) -> Rejection {
        Rejection {
            index,
            field: if retryable { String::new() } else { "event_type".into() },
            reason: format!("r{index}"),
            retryable,
            code: 0,
        }
    }

    #[test]
    fn a_shared_answer_splits_into_parts_with_their_own_indexes() {
        let answer = IngestResponse {
            rejected: vec![rejection(1, false), rejection(3, true), rejection(6, false)],
            duplicate_indexes: vec![0, 4, 5],
            ..Default::default()
        };
        let first = answer_part(&answer, 0, 3);
        assert_eq!(first.rejected.iter().map(|r| r.index).collect::<Vec<_>>(), vec![1]);
        assert_eq!(first.duplicate_indexes, vec![0]);
        let second = answer_part(&answer, 3, 4);
        assert_eq!(
            second.rejected.iter().map(|r| (r.index, r.retryable)).collect::<Vec<_>>(),
            vec![(0, true), (3, false)]
        );
        assert_eq!(second.duplicate_indexes, vec![1, 2]);
        assert_eq!(answer_part(&answer, 7, 2), IngestResponse::default());
    }

    #[test]
    fn every_event_of_a_mixed_batch_gets_its_exact_outcome() {
        let (items, mut rxs) = items(6);
        let answer = IngestResponse {
            accepted: 2,
            duplicates: 2,
            rejected: vec![rejection(2, false), rejection(4, true)],
            leaders: vec![],
            duplicate_indexes: vec![1, 5],
            ..Default::default()
        };
        let permits = Semaphore::new(0);
        let (retry, last) = settle(items, &answer, &permits);
        assert_eq!(permits.available_permits(), 5, "every resolved event frees its slot");
        assert_eq!(retry.len(), 1);
        assert_eq!(Event::decode(retry[0].event.clone()).map(|e| e.event_id).ok(), Some(vec![4]));
        assert_eq!(last, "r4");
        let outcomes: Vec<Option<Outcome>> = rxs.iter_mut().map(|rx| rx.try_recv().ok()).collect();
        assert_eq!(
            outcomes,
            vec![
                Some(Outcome::Accepted),
                Some(Outcome::Duplicate),
                Some(Outcome::Rejected { field: "event_type".into(), reason: "r2".into() }),
                Some(Outcome::Accepted),
                None, // to be retried
                Some(Outcome::Duplicate),
            ]
        );
    }

    #[test]
    fn a_resent_batch_is_duplicate_per_event() {
        let (items, mut rxs) = items(3);
        let answer = IngestResponse { duplicates: 3, duplicate_indexes: vec![0, 1, 2], ..Default::default() };
        let permits = Semaphore::new(0);
        let (retry, _) = settle(items, &answer, &permits);
        assert!(retry.is_empty());
        assert_eq!(permits.available_permits(), 3);
        assert!(rxs.iter_mut().all(|rx| rx.try_recv() == Ok(Outcome::Duplicate)));
    }

    #[test]
    fn out_of_range_indexes_are_ignored() {
        let (items, mut rxs) = items(1);
        let answer = IngestResponse {
            accepted: 1,
            duplicate_indexes: vec![7],
            rejected: vec![rejection(9, false)],
            ..Default::default()
        };
        let (retry, _) = settle(items, &answer, &Semaphore::new(0));
        assert!(retry.is_empty());
        assert_eq!(rxs[0].try_recv(), Ok(Outcome::Accepted));
    }
}
