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
    /// An earlier attempt may have stored it (its answer was lost), so a
    /// later "duplicate" may be this event's own first write.
    pub(crate) ambiguous: bool,
    /// Keeps the flush epoch the event was sent in open until it resolves.
    pub(crate) _epoch: Arc<crate::batcher::EpochToken>,
}

impl Item {
    fn resolve(mut self, outcome: Outcome) {
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
                            // answer was lost.
                            for item in &mut items {
                                item.ambiguous = true;
                            }
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
    let n = items.len();
    for item in items {
        let o = outcome(&item);
        item.resolve(o);
    }
    permits.add_permits(n);
}

/// Resolves the items an answer settled; returns those to retry and the
/// reason they need it.
fn settle(items: Vec<Item>, answer: &IngestResponse, permits: &Semaphore) -> (Vec<Item>, String) {
    let mut rejection = vec![None; items.len()];
    for r in &answer.rejected {
        if let Some(slot) = rejection.get_mut(r.index as usize) {
            *slot = Some(r);
        }
    }
    let mut retry = Vec::new();
    let mut last = String::new();
    let mut resolved = 0;
    for (item, rejected) in items.into_iter().zip(rejection) {
        match rejected {
            Some(r) if r.retryable => {
                last.clone_from(&r.reason);
                retry.push(item);
            }
            Some(r) => {
                resolved += 1;
                item.resolve(Outcome::Rejected { field: r.field.clone(), reason: r.reason.clone() });
            }
            None => {
                resolved += 1;
                let outcome = match (answer.accepted, answer.duplicates) {
                    (_, 0) => Outcome::Accepted,
                    (0, _) if !item.ambiguous => Outcome::Duplicate,
                    _ => Outcome::Stored,
                };
                item.resolve(outcome);
            }
        }
    }
    permits.add_permits(resolved);
    (retry, last)
}
