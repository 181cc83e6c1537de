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

use tally_proto::v1::{Event, IngestRequest, IngestResponse};
use tokio::sync::{oneshot, Semaphore};

use crate::error::{ClientError, Result};
use crate::node::{classify, Failure, Node};
use crate::outcome::{Outcome, ServerTotals};
use crate::router::{Route, Router};

/// One event on its way, with whoever waits for its outcome.
#[derive(Debug)]
pub(crate) struct Item {
    pub(crate) event: Event,
    pub(crate) reply: Option<oneshot::Sender<Outcome>>,
    /// Keeps the flush epoch the event was sent in open until it resolves.
    pub(crate) _epoch: Arc<crate::batcher::EpochToken>,
}

impl Item {
    /// Returns the event's buffer slot, then its outcome. In this order:
    /// resolving drops the item's epoch token, which may end a `flush`, and
    /// the caller of `flush` must then see the slot free.
    fn resolve(mut self, outcome: Outcome, permits: &Semaphore) {
        permits.add_permits(1);
        if let Some(reply) = self.reply.take() {
            // The caller may have dropped its ticket; that is allowed.
            let _ = reply.send(outcome);
        }
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
            Some(delay) => tokio::time::sleep(delay).await,
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
        let last_error = match router.pick(Route::Leader(partition), avoid.as_deref()) {
            Some(node) if node.breaker().try_acquire(Instant::now()) => {
                let events: Vec<Event> = items.iter().map(|i| i.event.clone()).collect();
                match node.ingest().ingest(node.request(IngestRequest { events })).await {
                    Ok(answer) => {
                        node.breaker().on_success(Instant::now());
                        let answer = answer.into_inner();
                        totals.add(answer.accepted, answer.duplicates);
                        router.apply_hints(&answer.leaders);
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
            Some(delay) => tokio::time::sleep(delay).await,
            None => {
                let attempts = retry.attempts();
                resolve_all(items, &permits, |_| Outcome::Failed { error: last_error.clone(), attempts });
                return;
            }
        }
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

    use super::*;
    use crate::batcher::EpochToken;

    fn items(n: usize) -> (Vec<Item>, Vec<oneshot::Receiver<Outcome>>) {
        (0..n)
            .map(|i| {
                let (tx, rx) = oneshot::channel();
                let event = Event { event_id: vec![i as u8], ..crate::event("e", "view") };
                (Item { event, reply: Some(tx), _epoch: EpochToken::detached() }, rx)
            })
            .unzip()
    }

    fn rejection(index: u32, retryable: bool) -> Rejection {
        Rejection { index, field: if retryable { String::new() } else { "event_type".into() }, reason: format!("r{index}"), retryable }
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
        assert_eq!(retry[0].event.event_id, vec![4]);
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
        let answer = IngestResponse { accepted: 1, duplicate_indexes: vec![7], rejected: vec![rejection(9, false)], ..Default::default() };
        let (retry, _) = settle(items, &answer, &Semaphore::new(0));
        assert!(retry.is_empty());
        assert_eq!(rxs[0].try_recv(), Ok(Outcome::Accepted));
    }
}
