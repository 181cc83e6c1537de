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
use std::task::{Context, Poll};

use serde::Serialize;
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
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

    pub(crate) fn ready(outcome: Outcome) -> Ticket {
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
