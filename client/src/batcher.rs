//! Buffering and batching of `send`: one background task groups events by
//! partition and hands each batch to a delivery task.
//!
//! Bounds, all fixed at construction:
//! * `buffer_events` permits of a semaphore: `send` takes one before an
//!   event enters the client and the delivery task gives it back when the
//!   event is resolved. Buffered plus in-flight events therefore never
//!   exceed the limit, and `send` waits (backpressure) when it is reached.
//! * The command channel from `send` to the task is a bounded `mpsc`.
//! * Per partition at most `max_in_flight_per_partition` delivery tasks; the
//!   total number of tasks is also bounded by the buffer, since each holds
//!   at least one event.
//!
//! A partition's buffer is sent when it reaches `max_events` or `max_bytes`,
//! when its oldest event has waited `linger`, or on `flush`. Linger
//! deadlines go into a FIFO queue: the linger is the same for every
//! partition, so deadlines come out in order and no timer per partition or
//! scan over all partitions is needed.
//!
//! `flush` waits for every event sent before it, and not for later ones
//! (which could starve it under steady load). Events carry a reference to
//! the "epoch" they were sent in; a flush closes the current epoch and waits
//! until every epoch up to it has no unresolved event left.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use futures::future::{join_all, FutureExt, Shared};
use prost::Message;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::dispatch::{deliver, Item};
use crate::error::{ClientError, Result};
use crate::router::Router;
use crate::outcome::{Outcome, ServerTotals};
use tally_proto::v1::Event;

/// Open while any event of its epoch is unresolved; dropping the last
/// reference signals the epoch's flush waiters.
#[derive(Debug)]
pub(crate) struct EpochToken {
    done: Option<oneshot::Sender<()>>,
}

#[cfg(test)]
impl EpochToken {
    /// A token of no epoch, for unit tests of delivery.
    pub(crate) fn detached() -> Arc<EpochToken> {
        Arc::new(EpochToken { done: None })
    }
}

impl Drop for EpochToken {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            let _ = done.send(());
        }
    }
}

type EpochDone = Shared<oneshot::Receiver<()>>;

fn new_epoch() -> (Arc<EpochToken>, EpochDone) {
    let (tx, rx) = oneshot::channel();
    (Arc::new(EpochToken { done: Some(tx) }), rx.shared())
}

enum Command {
    Event(Item),
    /// Send every buffered event now; reply once they are handed to
    /// delivery tasks.
    Flush(oneshot::Sender<()>),
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Event(_) => f.write_str("Event"),
            Command::Flush(_) => f.write_str("Flush"),
        }
    }
}

#[derive(Debug)]
struct Epochs {
    /// The epoch new events join.
    current: Arc<EpochToken>,
    current_done: EpochDone,
    /// Closed epochs that may still have unresolved events.
    closed: Vec<EpochDone>,
}

/// The `send` side of the batcher.
#[derive(Debug)]
pub(crate) struct Batcher {
    commands: mpsc::Sender<Command>,
    permits: Arc<Semaphore>,
    epochs: std::sync::Mutex<Epochs>,
    capacity: usize,
}

impl Batcher {
    pub(crate) fn spawn(router: Arc<Router>, totals: Arc<ServerTotals>) -> Batcher {
        let capacity = router.config.batch.buffer_events;
        let permits = Arc::new(Semaphore::new(capacity));
        let (commands, rx) = mpsc::channel(capacity.min(4096));
        let (current, current_done) = new_epoch();
        let task = Task::new(router, totals, permits.clone());
        tokio::spawn(task.run(rx));
        Batcher {
            commands,
            permits,
            epochs: std::sync::Mutex::new(Epochs { current, current_done, closed: Vec::new() }),
            capacity,
        }
    }

    fn lock_epochs(&self) -> std::sync::MutexGuard<'_, Epochs> {
        self.epochs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Events buffered or in flight.
    pub(crate) fn pending(&self) -> usize {
        self.capacity.saturating_sub(self.permits.available_permits())
    }

    /// Queues one event, waiting while the buffer is full.
    pub(crate) async fn send(&self, event: Event, reply: oneshot::Sender<Outcome>) -> Result<()> {
        let permit = self.permits.acquire().await.map_err(|_| ClientError::Closed)?;
        let epoch = self.lock_epochs().current.clone();
        let item = Item { event, reply: Some(reply), _epoch: epoch };
        self.commands.send(Command::Event(item)).await.map_err(|_| ClientError::Closed)?;
        // From here the delivery task returns the permit when the event is
        // resolved. (Cancelled before this line, the permit is dropped and
        // so returned, and the event was never queued.)
        permit.forget();
        Ok(())
    }

    /// Waits until every event queued before this call is resolved.
    pub(crate) async fn flush(&self) -> Result<()> {
        let waiting = {
            let mut epochs = self.lock_epochs();
            let (fresh, fresh_done) = new_epoch();
            // Dropping our reference leaves only the unresolved events'.
            drop(std::mem::replace(&mut epochs.current, fresh));
            let closed = std::mem::replace(&mut epochs.current_done, fresh_done);
            epochs.closed.retain(|e| e.peek().is_none());
            epochs.closed.push(closed);
            epochs.closed.clone()
        };
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Flush(tx)).await.map_err(|_| ClientError::Closed)?;
        rx.await.map_err(|_| ClientError::Closed)?;
        // An event whose `send` raced with this flush may reach the task
        // after the Flush command; it still holds the old epoch, so this
        // waits for it (sent after its linger instead of at once).
        join_all(waiting).await;
        Ok(())
    }
}

#[derive(Default)]
struct PartitionBuffer {
    /// A deque: batches are taken from the front while new events arrive
    /// at the back, without moving the rest.
    items: VecDeque<Item>,
    bytes: usize,
    /// When the oldest buffered event arrived.
    since: Option<Instant>,
    in_flight: usize,
    /// A flush asked for everything buffered now to go out regardless of
    /// linger.
    forced: bool,
}

struct Task {
    router: Arc<Router>,
    totals: Arc<ServerTotals>,
    permits: Arc<Semaphore>,
    buffers: Vec<PartitionBuffer>,
    /// (deadline, partition), in deadline order.
    lingering: VecDeque<(Instant, u32)>,
    completed_tx: mpsc::Sender<u32>,
    completed_rx: mpsc::Receiver<u32>,
    /// The client is gone: send everything, ignoring the in-flight limit.
    draining: bool,
}

impl Task {
    fn new(router: Arc<Router>, totals: Arc<ServerTotals>, permits: Arc<Semaphore>) -> Task {
        let partitions = router.with_map(|m| m.partition_count()).max(1) as usize;
        let max_in_flight = partitions * router.config.batch.max_in_flight_per_partition;
        // Every delivery task reports completion once; capacity for all of
        // them means reporting never waits.
        let (completed_tx, completed_rx) = mpsc::channel(max_in_flight.max(1));
        Task {
            router,
            totals,
            permits,
            buffers: (0..partitions).map(|_| PartitionBuffer::default()).collect(),
            lingering: VecDeque::new(),
            completed_tx,
            completed_rx,
            draining: false,
        }
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let linger = self.router.config.batch.linger;
        loop {
            let next_deadline = self.lingering.front().map(|(d, _)| *d);
            tokio::select! {
                command = commands.recv() => match command {
                    Some(Command::Event(item)) => self.add(item, linger),
                    Some(Command::Flush(reply)) => self.flush(reply),
                    None => break,
                },
                Some(partition) = self.completed_rx.recv() => {
                    if let Some(b) = self.buffers.get_mut(partition as usize) {
                        b.in_flight = b.in_flight.saturating_sub(1);
                    }
                    self.dispatch(partition, Instant::now());
                }
                () = sleep_until(next_deadline) => {
                    let now = Instant::now();
                    while let Some(&(deadline, partition)) = self.lingering.front() {
                        if deadline > now {
                            break;
                        }
                        self.lingering.pop_front();
                        self.dispatch(partition, now);
                    }
                }
            }
        }
        // The client was dropped: send what is left, without linger.
        self.draining = true;
        for p in 0..self.buffers.len() {
            self.buffers[p].forced = true;
            self.dispatch(p as u32, Instant::now());
        }
    }

    fn add(&mut self, item: Item, linger: std::time::Duration) {
        // The partition count is fixed for the cluster's life and the
        // buffers were sized from it; computing with the buffer count keeps
        // the index in range even if a map ever disagreed.
        let partition = crate::partition_of(&item.event.entity_id, self.buffers.len() as u32);
        let now = Instant::now();
        let Some(buffer) = self.buffers.get_mut(partition as usize) else {
            // Unreachable (partition < buffers.len()); resolving keeps the
            // buffer permit accounting right even so.
            self.permits.add_permits(1);
            drop(item);
            return;
        };
        // Field tag + length prefix + the event itself.
        buffer.bytes += item.event.encoded_len() + 4;
        buffer.items.push_back(item);
        if buffer.since.is_none() {
            buffer.since = Some(now);
            self.lingering.push_back((now + linger, partition));
        }
        self.dispatch(partition, now);
    }

    fn flush(&mut self, reply: oneshot::Sender<()>) {
        let now = Instant::now();
        for p in 0..self.buffers.len() {
            if !self.buffers[p].items.is_empty() {
                self.buffers[p].forced = true;
                self.dispatch(p as u32, now);
            }
        }
        let _ = reply.send(());
    }

    /// Sends as many batches of `partition` as its limits allow.
    fn dispatch(&mut self, partition: u32, now: Instant) {
        let batch = self.router.config.batch.clone();
        let draining = self.draining;
        let Some(buffer) = self.buffers.get_mut(partition as usize) else { return };
        loop {
            if buffer.items.is_empty() {
                buffer.forced = false;
                buffer.since = None;
                return;
            }
            let due = buffer.since.is_some_and(|s| now >= s + batch.linger);
            let full = buffer.items.len() >= batch.max_events || buffer.bytes >= batch.max_bytes;
            if !(due || full || buffer.forced) || (!draining && buffer.in_flight >= batch.max_in_flight_per_partition) {
                return;
            }
            // Take the longest prefix within both limits (at least one).
            let mut bytes = 0;
            let mut take = 0;
            for item in buffer.items.iter().take(batch.max_events) {
                let size = item.event.encoded_len() + 4;
                if take > 0 && bytes + size > batch.max_bytes {
                    break;
                }
                bytes += size;
                take += 1;
            }
            let items: Vec<Item> = buffer.items.drain(..take).collect();
            buffer.bytes -= bytes;
            buffer.in_flight += 1;
            let remaining_since = if buffer.items.is_empty() { None } else { Some(now) };
            if buffer.since.is_some() && remaining_since.is_some() && !buffer.forced {
                // What is left starts a new linger period.
                buffer.since = remaining_since;
                self.lingering.push_back((now + batch.linger, partition));
            } else {
                buffer.since = remaining_since;
            }
            let router = self.router.clone();
            let totals = self.totals.clone();
            let permits = self.permits.clone();
            let completed = self.completed_tx.clone();
            tokio::spawn(async move {
                deliver(router, totals, permits, partition, items).await;
                let _ = completed.send(partition).await;
            });
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
