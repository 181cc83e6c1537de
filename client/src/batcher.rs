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
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::dispatch::{deliver_together, Item};
use crate::encoded;
use crate::error::{ClientError, Result};
use crate::leader_router::Router;
use crate::outcome::{Reply, ServerTotals};
use tally_proto::routing::Routing;
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

/// Events per command of `send_many` at most, so one batch of a million
/// events neither waits for a million free slots at once nor holds the
/// task in one long loop.
const MAX_CHUNK: usize = 4096;

fn new_epoch() -> (Arc<EpochToken>, EpochDone) {
    let (tx, rx) = oneshot::channel();
    (Arc::new(EpochToken { done: Some(tx) }), rx.shared())
}

enum Command {
    Event(Item),
    /// Events of one `send_batch` chunk, queued together.
    Events(Vec<Item>),
    /// Send every buffered event now; reply once they are handed to
    /// delivery tasks.
    Flush(oneshot::Sender<()>),
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Event(_) => f.write_str("Event"),
            Command::Events(items) => write!(f, "Events({})", items.len()),
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
    /// Where the routing of events before they are encoded comes from (the
    /// partitioner and the spreads of hot entities).
    router: Arc<Router>,
}

impl Batcher {
    pub(crate) fn spawn(router: Arc<Router>, totals: Arc<ServerTotals>) -> Batcher {
        let capacity = router.config.batch.buffer_events;
        let permits = Arc::new(Semaphore::new(capacity));
        let (commands, rx) = mpsc::channel(capacity.min(4096));
        let (current, current_done) = new_epoch();
        let partitions = router.with_map(|m| m.partition_count()).max(1);
        let task = Task::new(router.clone(), totals, permits.clone(), partitions as usize);
        tokio::spawn(task.run(rx));
        Batcher {
            commands,
            permits,
            epochs: std::sync::Mutex::new(Epochs { current, current_done, closed: Vec::new() }),
            capacity,
            router,
        }
    }

    fn lock_epochs(&self) -> std::sync::MutexGuard<'_, Epochs> {
        self.epochs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Events buffered or in flight.
    pub(crate) fn pending(&self) -> usize {
        self.capacity.saturating_sub(self.permits.available_permits())
    }

    fn item(&self, routing: &Routing, event: &Event, reply: Reply, epoch: Arc<EpochToken>) -> Item {
        Item { event: encoded::encode_event(event), partition: routing.partition_of_event(event), reply, _epoch: epoch }
    }

    /// Queues one event, waiting while the buffer is full.
    pub(crate) async fn send(&self, event: &Event, reply: Reply) -> Result<()> {
        let permit = self.permits.acquire().await.map_err(|_| ClientError::Closed)?;
        let epoch = self.lock_epochs().current.clone();
        let item = self.item(&self.router.with_map(|m| m.routing()), event, reply, epoch);
        self.commands.send(Command::Event(item)).await.map_err(|_| ClientError::Closed)?;
        // From here the delivery task returns the permit when the event is
        // resolved. (Cancelled before this line, the permit is dropped and
        // so returned, and the event was never queued.)
        permit.forget();
        Ok(())
    }

    /// Queues many events, in chunks that fit the buffer, each chunk with
    /// one permit acquisition and one command. Cancelled part-way, the
    /// chunks not yet queued resolve as not confirmed (their replies drop).
    pub(crate) async fn send_many(&self, events: Vec<(Event, Reply)>) -> Result<()> {
        let chunk = self.capacity.clamp(1, MAX_CHUNK);
        let mut events = events.into_iter().peekable();
        while events.peek().is_some() {
            let part: Vec<(Event, Reply)> = events.by_ref().take(chunk).collect();
            // At most MAX_CHUNK: the cast cannot truncate.
            let permits = self.permits.acquire_many(part.len() as u32).await.map_err(|_| ClientError::Closed)?;
            let epoch = self.lock_epochs().current.clone();
            let routing = self.router.with_map(|m| m.routing());
            let items =
                part.into_iter().map(|(event, reply)| self.item(&routing, &event, reply, epoch.clone())).collect();
            self.commands.send(Command::Events(items)).await.map_err(|_| ClientError::Closed)?;
            permits.forget();
        }
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
    fn new(router: Arc<Router>, totals: Arc<ServerTotals>, permits: Arc<Semaphore>, partitions: usize) -> Task {
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
                    Some(Command::Events(items)) => {
                        for item in items {
                            self.add(item, linger);
                        }
                    }
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
        // Computed by `Batcher::item` with the count the buffers were sized
        // from (fixed for the cluster's life).
        let partition = item.partition;
        let now = Instant::now();
        let Some(buffer) = self.buffers.get_mut(partition as usize) else {
            // Unreachable (partition < buffers.len()); resolving keeps the
            // buffer permit accounting right even so.
            self.permits.add_permits(1);
            drop(item);
            return;
        };
        buffer.bytes += encoded::framed_len(&item.event);
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

    /// Sends as many batches of `partition` as its limits allow, each
    /// together with what other partitions of the same leader have
    /// buffered (see [`deliver_together`]).
    fn dispatch(&mut self, partition: u32, now: Instant) {
        let batch = self.router.config.batch.clone();
        loop {
            let Some(buffer) = self.buffers.get_mut(partition as usize) else { return };
            if buffer.items.is_empty() {
                buffer.forced = false;
                buffer.since = None;
                return;
            }
            let due = buffer.since.is_some_and(|s| now >= s + batch.linger);
            let full = buffer.items.len() >= batch.max_events || buffer.bytes >= batch.max_bytes;
            if !(due || full || buffer.forced) || !self.has_room(partition, batch.max_in_flight_per_partition) {
                return;
            }
            let mut budget = Budget { events: batch.max_events, bytes: batch.max_bytes, empty: true };
            let mut groups = vec![(partition, self.take(partition, &mut budget, now))];
            for other in self.companions(partition, batch.max_in_flight_per_partition) {
                if budget.events == 0 || budget.bytes == 0 {
                    break;
                }
                let items = self.take(other, &mut budget, now);
                if !items.is_empty() {
                    groups.push((other, items));
                }
            }
            let router = self.router.clone();
            let totals = self.totals.clone();
            let permits = self.permits.clone();
            let completed = self.completed_tx.clone();
            tokio::spawn(deliver_together(router, totals, permits, groups, completed));
        }
    }

    fn has_room(&self, partition: u32, max_in_flight: usize) -> bool {
        self.draining || self.buffers.get(partition as usize).is_some_and(|b| b.in_flight < max_in_flight)
    }

    /// Partitions other than `partition` with buffered events, room in
    /// flight and the same known leader.
    fn companions(&self, partition: u32, max_in_flight: usize) -> Vec<u32> {
        let candidates: Vec<u32> = (0..self.buffers.len() as u32)
            .filter(|&p| {
                p != partition && !self.buffers[p as usize].items.is_empty() && self.has_room(p, max_in_flight)
            })
            .collect();
        if candidates.is_empty() {
            return candidates;
        }
        self.router.with_map(|m| {
            let Some((leader, _)) = m.leader(partition) else { return Vec::new() };
            candidates.into_iter().filter(|&p| m.leader(p).is_some_and(|(l, _)| l == leader)).collect()
        })
    }

    /// Takes the longest prefix of `partition`'s buffer within `budget`
    /// (at least one event while the request is still empty, however large)
    /// and counts it in flight.
    fn take(&mut self, partition: u32, budget: &mut Budget, now: Instant) -> Vec<Item> {
        let linger = self.router.config.batch.linger;
        let Some(buffer) = self.buffers.get_mut(partition as usize) else { return Vec::new() };
        let mut bytes = 0;
        let mut take = 0;
        for item in buffer.items.iter().take(budget.events) {
            let size = encoded::framed_len(&item.event);
            if (take > 0 || !budget.empty) && bytes + size > budget.bytes {
                break;
            }
            bytes += size;
            take += 1;
        }
        if take == 0 {
            return Vec::new();
        }
        budget.empty = false;
        budget.events -= take;
        budget.bytes = budget.bytes.saturating_sub(bytes);
        let items: Vec<Item> = buffer.items.drain(..take).collect();
        buffer.bytes -= bytes;
        buffer.in_flight += 1;
        if buffer.items.is_empty() {
            buffer.since = None;
            buffer.forced = false;
        } else if buffer.since.is_some() && !buffer.forced {
            // What is left starts a new linger period.
            buffer.since = Some(now);
            self.lingering.push_back((now + linger, partition));
        } else {
            buffer.since = Some(now);
        }
        items
    }
}

/// What one request may still carry.
struct Budget {
    events: usize,
    bytes: usize,
    /// Nothing taken yet: the first event goes even if it alone is over
    /// `bytes` (the server's limit is higher; refusing it would strand it).
    empty: bool,
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
