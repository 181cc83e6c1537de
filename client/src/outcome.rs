//! What became of each event handed to the client.
//!
//! Every event gets exactly one [`Outcome`]. Ingestion is at-most-once per
//! event id: an event that was retried is never counted twice, and an event
//! reported [`Outcome::Failed`] may or may not have been counted (if it was,
//! re-sending it with the same id reports a duplicate).
//!
//! Accepted versus duplicate is exact for every event: the server's answer
//! lists the indexes of the events it recognised as duplicates
//! (`IngestResponse.duplicate_indexes`), and every other event of the batch
//! that was not rejected was accepted. An event whose earlier attempt was
//! stored but whose answer got lost comes back as [`Outcome::Duplicate`] on
//! the retry: from the server's point of view it *is* a duplicate by then.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// The fate of one event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Counted for the first time.
    Accepted,
    /// Already counted: an event with the same (entity, type, id) arrived
    /// within the dedup window, possibly an earlier attempt of this very
    /// send whose answer was lost.
    Duplicate,
    /// Invalid; never counted. `field` names the offending field.
    Rejected {
        /// Field name as spelled in the proto, e.g. `event_type`.
        field: String,
        /// Why, in words for the sender.
        reason: String,
    },
    /// Not confirmed after all retries: it may or may not have been
    /// counted. Re-send it with the same event id to find out.
    Failed {
        /// The last error seen.
        error: String,
        /// Attempts made.
        attempts: u32,
    },
}

impl Outcome {
    /// Whether the event is known to be counted (once): [`Outcome::Accepted`]
    /// or [`Outcome::Duplicate`].
    pub fn is_stored(&self) -> bool {
        matches!(self, Outcome::Accepted | Outcome::Duplicate)
    }
}

/// Totals over many outcomes, e.g. for a CLI summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestSummary {
    /// Counted for the first time.
    pub accepted: u64,
    /// Recognised as already counted.
    pub duplicates: u64,
    /// Invalid input.
    pub rejected: u64,
    /// Unconfirmed after retries.
    pub failed: u64,
}

impl IngestSummary {
    /// Adds one outcome.
    pub fn add(&mut self, outcome: &Outcome) {
        match outcome {
            Outcome::Accepted => self.accepted += 1,
            Outcome::Duplicate => self.duplicates += 1,
            Outcome::Rejected { .. } => self.rejected += 1,
            Outcome::Failed { .. } => self.failed += 1,
        }
    }

    /// Events accounted for.
    pub fn total(&self) -> u64 {
        self.accepted + self.duplicates + self.rejected + self.failed
    }
}

/// Running totals of what the servers answered for this client's batches,
/// summed over every answer. They agree with the per-event outcomes: a
/// retried event whose first attempt was in fact stored (its answer lost) is
/// counted in `duplicates`, as its [`Outcome::Duplicate`] says.
#[derive(Debug, Default)]
pub struct ServerTotals {
    accepted: std::sync::atomic::AtomicU64,
    duplicates: std::sync::atomic::AtomicU64,
}

impl ServerTotals {
    pub(crate) fn add(&self, accepted: u32, duplicates: u32) {
        use std::sync::atomic::Ordering::Relaxed;
        self.accepted.fetch_add(u64::from(accepted), Relaxed);
        self.duplicates.fetch_add(u64::from(duplicates), Relaxed);
    }

    /// Events the servers reported as counted for the first time.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Events the servers reported as duplicates.
    pub fn duplicates(&self) -> u64 {
        self.duplicates.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Resolves to the [`Outcome`] of one event given to
/// [`TallyClient::send`](crate::TallyClient::send). Dropping it is fine: the
/// event is still delivered, and [`flush`](crate::TallyClient::flush) still
/// waits for it.
#[derive(Debug)]
pub struct Ticket {
    rx: TicketInner,
}

#[derive(Debug)]
enum TicketInner {
    Pending(oneshot::Receiver<Outcome>),
    Ready(Option<Outcome>),
}

impl Ticket {
    pub(crate) fn pending(rx: oneshot::Receiver<Outcome>) -> Ticket {
        Ticket { rx: TicketInner::Pending(rx) }
    }

    /// A ticket that already holds its outcome: for an event the caller
    /// settles itself (input it rejected before sending, say), so that
    /// every event still ends in one stream of tickets.
    pub fn ready(outcome: Outcome) -> Ticket {
        Ticket { rx: TicketInner::Ready(Some(outcome)) }
    }
}

impl Future for Ticket {
    type Output = Outcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        match &mut self.rx {
            TicketInner::Ready(outcome) => Poll::Ready(outcome.take().unwrap_or_else(closed)),
            TicketInner::Pending(rx) => Pin::new(rx).poll(cx).map(|r| r.unwrap_or_else(|_| closed())),
        }
    }
}

/// The outcome of an event whose sender vanished: only possible when the
/// client's background task ended (the runtime shut down) before the event
/// was resolved.
fn closed() -> Outcome {
    Outcome::Failed { error: "the client was shut down before the event was confirmed".into(), attempts: 0 }
}

/// Resolves to the outcomes of the events given to
/// [`TallyClient::send_batch`](crate::TallyClient::send_batch), in the
/// order they were given. Like a [`Ticket`], dropping it is fine.
///
/// One ticket for many events rather than one per event: a producer that
/// generates events in bulk (a log shipper, the load generator) then pays
/// one channel and one wake-up per batch instead of per event.
#[derive(Debug)]
pub struct BatchTicket {
    slots: Arc<BatchSlots>,
    /// `None` when nothing was pending (every event was invalid).
    done: Option<oneshot::Receiver<()>>,
}

impl BatchTicket {
    /// A ticket for `n` events whose outcomes the caller supplies, one
    /// [`OutcomeSlot`] each (slot `i` is the `i`-th outcome the ticket
    /// yields). For code that puts another transport behind the same
    /// "events in, a ticket of outcomes out" shape — the load generator
    /// drives Redis and etcd this way — and for test doubles. A slot
    /// dropped unresolved reads as not confirmed, like an event of a
    /// client that shut down.
    pub fn with_slots(n: usize) -> (BatchTicket, Vec<OutcomeSlot>) {
        let (slots, ticket) = BatchSlots::new((0..n).map(|_| None).collect());
        let replies = (0..n).map(|index| OutcomeSlot(Reply::slot(slots.clone(), index))).collect();
        (ticket, replies)
    }
}

/// One event's place in a [`BatchTicket`] made by
/// [`BatchTicket::with_slots`].
#[derive(Debug)]
pub struct OutcomeSlot(Reply);

impl OutcomeSlot {
    /// Gives the event its outcome.
    pub fn resolve(self, outcome: Outcome) {
        self.0.resolve(outcome);
    }
}

/// Where the events of one batch leave their outcomes.
#[derive(Debug)]
pub(crate) struct BatchSlots {
    outcomes: Mutex<Vec<Option<Outcome>>>,
    /// Events not resolved yet; whoever resolves the last one signals.
    remaining: AtomicUsize,
    done: Mutex<Option<oneshot::Sender<()>>>,
}

impl BatchSlots {
    /// Slots for `outcomes.len()` events, of which those already `Some`
    /// (invalid events) are resolved. Returns the ticket with them.
    pub(crate) fn new(outcomes: Vec<Option<Outcome>>) -> (Arc<BatchSlots>, BatchTicket) {
        let pending = outcomes.iter().filter(|o| o.is_none()).count();
        let (tx, rx) = oneshot::channel();
        let slots = Arc::new(BatchSlots {
            outcomes: Mutex::new(outcomes),
            remaining: AtomicUsize::new(pending),
            done: Mutex::new(Some(tx)),
        });
        let ticket = BatchTicket { slots: slots.clone(), done: (pending > 0).then_some(rx) };
        (slots, ticket)
    }

    fn resolve(&self, index: usize, outcome: Outcome) {
        {
            // Poisoning cannot leave the vector inconsistent (a slot is
            // written whole), so a poisoned lock is used as it is.
            let mut outcomes = self.outcomes.lock().unwrap_or_else(|p| p.into_inner());
            match outcomes.get_mut(index) {
                Some(slot @ None) => *slot = Some(outcome),
                // Already resolved or out of range: a bug, but never a
                // reason to signal twice.
                _ => return,
            }
        }
        if self.remaining.fetch_sub(1, AtomicOrdering::AcqRel) == 1 {
            if let Some(done) = self.done.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = done.send(());
            }
        }
    }
}

impl Future for BatchTicket {
    type Output = Vec<Outcome>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Vec<Outcome>> {
        if let Some(done) = &mut self.done {
            // An error means the sender was dropped unsent, which only
            // happens once every slot is resolved or abandoned.
            if Pin::new(done).poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.done = None;
        }
        let outcomes = std::mem::take(&mut *self.slots.outcomes.lock().unwrap_or_else(|p| p.into_inner()));
        Poll::Ready(outcomes.into_iter().map(|o| o.unwrap_or_else(closed)).collect())
    }
}

/// Whoever waits for one event's outcome: a [`Ticket`] or a slot of a
/// [`BatchTicket`]. Dropped unresolved (the client shut down), the waiter
/// learns that the event was not confirmed.
#[derive(Debug)]
pub(crate) struct Reply(Option<ReplyTo>);

#[derive(Debug)]
enum ReplyTo {
    One(oneshot::Sender<Outcome>),
    Slot { slots: Arc<BatchSlots>, index: usize },
}

impl Reply {
    /// The outcome goes to a [`Ticket`].
    pub(crate) fn one(tx: oneshot::Sender<Outcome>) -> Reply {
        Reply(Some(ReplyTo::One(tx)))
    }

    /// The outcome goes to slot `index` of a [`BatchTicket`].
    pub(crate) fn slot(slots: Arc<BatchSlots>, index: usize) -> Reply {
        Reply(Some(ReplyTo::Slot { slots, index }))
    }

    pub(crate) fn resolve(mut self, outcome: Outcome) {
        match self.0.take() {
            // The caller may have dropped its ticket; that is allowed.
            Some(ReplyTo::One(tx)) => {
                let _ = tx.send(outcome);
            }
            Some(ReplyTo::Slot { slots, index }) => slots.resolve(index, outcome),
            None => {}
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        // A dropped oneshot sender already reads as `closed()`; a slot must
        // be filled or its batch would wait forever.
        if let Some(ReplyTo::Slot { slots, index }) = self.0.take() {
            slots.resolve(index, closed());
        }
    }
}

#[cfg(test)]
mod batch_ticket_tests {
    use super::*;

    #[tokio::test]
    async fn outcomes_come_back_in_order_once_the_last_slot_resolves() {
        let rejected = Outcome::Rejected { field: "event_type".into(), reason: "empty".into() };
        let (slots, mut ticket) = BatchSlots::new(vec![None, Some(rejected.clone()), None]);
        let (a, b) = (Reply::slot(slots.clone(), 0), Reply::slot(slots.clone(), 2));
        b.resolve(Outcome::Duplicate);
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut ticket).poll(&mut cx).is_pending(), "slot 0 is still open");
        a.resolve(Outcome::Accepted);
        assert_eq!(ticket.await, vec![Outcome::Accepted, rejected, Outcome::Duplicate]);
    }

    #[tokio::test]
    async fn a_dropped_reply_reads_as_not_confirmed() {
        let (slots, ticket) = BatchSlots::new(vec![None, None]);
        Reply::slot(slots.clone(), 0).resolve(Outcome::Accepted);
        drop(Reply::slot(slots, 1));
        let outcomes = ticket.await;
        assert_eq!(outcomes[0], Outcome::Accepted);
        assert!(matches!(outcomes[1], Outcome::Failed { attempts: 0, .. }), "{:?}", outcomes[1]);
    }

    #[tokio::test]
    async fn a_batch_with_nothing_pending_is_ready_at_once() {
        let rejected = Outcome::Rejected { field: "entity_id".into(), reason: "empty".into() };
        let (_slots, ticket) = BatchSlots::new(vec![Some(rejected.clone())]);
        assert_eq!(ticket.await, vec![rejected]);
    }

    #[tokio::test]
    async fn caller_supplied_slots_resolve_in_order() {
        let (ticket, mut slots) = BatchTicket::with_slots(3);
        let (c, b, a) = (slots.pop(), slots.pop(), slots.pop());
        assert!(slots.is_empty());
        if let (Some(a), Some(c)) = (a, c) {
            c.resolve(Outcome::Duplicate);
            a.resolve(Outcome::Accepted);
        }
        drop(b);
        let outcomes = ticket.await;
        assert_eq!(outcomes[0], Outcome::Accepted);
        assert!(matches!(outcomes[1], Outcome::Failed { attempts: 0, .. }), "{:?}", outcomes[1]);
        assert_eq!(outcomes[2], Outcome::Duplicate);
    }

    #[test]
    fn a_slot_resolved_twice_keeps_its_first_outcome() {
        let (slots, _ticket) = BatchSlots::new(vec![None, None]);
        slots.resolve(0, Outcome::Accepted);
        slots.resolve(0, Outcome::Duplicate);
        assert_eq!(slots.remaining.load(AtomicOrdering::Acquire), 1);
    }
}
