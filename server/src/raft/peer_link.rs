//! One conversation per peer: the Raft messages of every group this node
//! sends to one peer travel on a single long-lived bidirectional stream
//! (`Raft.Converse`), not one HTTP/2 stream per message.
//!
//! Why: with a thousand groups, per-message unary calls meant thousands of
//! concurrent streams per connection. When a loaded peer fell behind, calls
//! timed out, each timeout reset its stream, h2's limit on reset streams
//! dropped the whole connection, and every group on it lost its heartbeats
//! at once — elections feeding elections (TiKV, YugabyteDB and CockroachDB
//! all batch per node pair for the same reason). Here:
//!
//! - Callers queue a call (bounded queue) and wait on a oneshot with their
//!   own deadline. A caller that gives up is simply forgotten: nothing is
//!   reset on the wire, and a call whose caller is gone is not even sent.
//! - The writer packs every call that is ready into one frame (up to
//!   [`MAX_FRAME_CALLS`] calls and [`MAX_FRAME_BYTES`]); under load a frame
//!   carries the heartbeats of many groups, so a tick of a thousand groups
//!   is a handful of frames.
//! - The receiver handles each call on its own and streams replies back as
//!   they finish, so a slow call (an fsync behind a big append) delays only
//!   its own reply.
//! - A node keeps two links per peer (`PeerPool::links`): a control lane
//!   for heartbeats, votes and transfers, and a data lane for appends that
//!   carry entries, so megabytes of entries never queue ahead of a heartbeat.
//! - If the stream breaks, every call on it fails at once as unreachable
//!   (openraft retries), and the next call opens a new stream after a short
//!   backoff.
//! - Every reply frame is evidence the peer is alive, and a broken stream
//!   that it may not be: both are reported ([`PeerEvents`]) to liveness, so
//!   a peer whose pings are slow on a starved machine but whose Raft traffic
//!   flows is not declared down, and a refused connection is probed at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tally_proto::internal::raft_client::RaftClient;
use tally_proto::internal::{PeerCall, PeerFrame, PeerReply, PeerReplyFrame, RaftCallKind, RaftMessage};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::sync::MutexExt;
use crate::type_config::NodeId;

/// Calls waiting to be packed into a frame; callers wait (within their own
/// deadline) when it is full.
const QUEUE_CAPACITY: usize = 8_192;
/// Frames handed to the HTTP/2 stream and not yet written; past this the
/// writer waits for the transport (HTTP/2 flow control is the backpressure).
const FRAMES_IN_FLIGHT: usize = 4;
/// Calls in one frame at most.
pub const MAX_FRAME_CALLS: usize = 2_048;
/// Encoded bytes of calls in one frame at most (one call larger than this
/// goes alone). Well under what the receiver decodes.
pub const MAX_FRAME_BYTES: usize = 16 << 20;
/// Largest peer message either side encodes or decodes (the peer listener
/// in `server.rs` and snapshot transfers in `network.rs` use it too).
pub const PEER_MAX_MESSAGE_BYTES: usize = 64 << 20;
const _: () = assert!(MAX_FRAME_BYTES * 2 < PEER_MAX_MESSAGE_BYTES);
/// Reconnect backoff after a failed or broken stream.
const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_millis(500);

/// What a conversation learns about its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkEvent {
    /// A reply frame arrived.
    Heard,
    /// The stream broke or could not be opened.
    Broken,
}

type EventSink = Box<dyn Fn(NodeId, LinkEvent) + Send + Sync>;

/// Where conversations report [`LinkEvent`]s; the receiver (liveness) is
/// plugged in once it exists, which is after the first links may start.
#[derive(Default)]
pub struct PeerEvents {
    sink: OnceLock<EventSink>,
}

impl PeerEvents {
    pub fn set(&self, sink: impl Fn(NodeId, LinkEvent) + Send + Sync + 'static) {
        let _ = self.sink.set(Box::new(sink));
    }

    fn emit(&self, node: NodeId, event: LinkEvent) {
        if let Some(sink) = self.sink.get() {
            sink(node, event);
        }
    }
}

/// Why a call got no reply.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The peer answered with this status (e.g. the group is not open there).
    #[error("{}: {}", .0.code(), .0.message())]
    Status(Status),
    /// The deadline passed before the reply came.
    #[error("node {0} did not answer in time")]
    TimedOut(NodeId),
    /// The stream broke or could not be opened.
    #[error("node {0} unreachable: {1}")]
    Unreachable(NodeId, String),
}

type Reply = Result<Vec<u8>, LinkError>;

struct Outgoing {
    call: PeerCall,
    reply: oneshot::Sender<Reply>,
}

/// Calls sent on the current stream and not yet answered.
#[derive(Default)]
struct InFlight {
    calls: HashMap<u64, oneshot::Sender<Reply>>,
    /// Size at which abandoned calls are next swept out.
    sweep_at: usize,
}

impl InFlight {
    fn insert(&mut self, id: u64, reply: oneshot::Sender<Reply>) {
        if self.calls.len() >= self.sweep_at {
            // Callers that gave up dropped their receivers; a peer that never
            // answers them must not grow this map without bound.
            self.calls.retain(|_, r| !r.is_closed());
            self.sweep_at = (self.calls.len() * 2).max(1_024);
        }
        self.calls.insert(id, reply);
    }
}

/// A conversation with one peer (one lane of it).
pub struct PeerLink {
    target: NodeId,
    queue: mpsc::Sender<Outgoing>,
    next_id: AtomicU64,
}

impl PeerLink {
    /// Start the conversation's task; it opens the stream on the first call
    /// and ends when the last handle on the link is dropped.
    pub fn start(target: NodeId, channel: Channel, events: Arc<PeerEvents>) -> Arc<PeerLink> {
        let (queue, rx) = mpsc::channel(QUEUE_CAPACITY);
        tokio::spawn(converse(target, channel, rx, events));
        Arc::new(PeerLink { target, queue, next_id: AtomicU64::new(1) })
    }

    /// Calls queued and not yet packed into a frame.
    pub fn queued(&self) -> usize {
        QUEUE_CAPACITY.saturating_sub(self.queue.capacity())
    }

    /// Send one call and wait for its reply, at most `ttl` in all.
    pub async fn call(&self, kind: RaftCallKind, message: RaftMessage, ttl: Duration) -> Reply {
        let deadline = tokio::time::Instant::now() + ttl;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        let outgoing = Outgoing { call: PeerCall { id, kind: kind as i32, message: Some(message) }, reply };
        match tokio::time::timeout_at(deadline, self.queue.send(outgoing)).await {
            Err(_) => return Err(LinkError::TimedOut(self.target)),
            Ok(Err(_)) => return Err(LinkError::Unreachable(self.target, "link closed".into())),
            Ok(Ok(())) => {}
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Err(_) => Err(LinkError::TimedOut(self.target)),
            Ok(Err(_)) => Err(LinkError::Unreachable(self.target, "link closed".into())),
            Ok(Ok(reply)) => reply,
        }
    }
}

/// The link's task: one stream at a time, reopened after a backoff when it
/// breaks, until the link is dropped.
async fn converse(target: NodeId, channel: Channel, mut queue: mpsc::Receiver<Outgoing>, events: Arc<PeerEvents>) {
    let mut backoff = BACKOFF_MIN;
    let mut carried: Option<Outgoing> = None;
    loop {
        // Open a stream only when there is something to say.
        let Some(first) = next_call(&mut carried, &mut queue).await else { return };
        let in_flight = Arc::new(Mutex::new(InFlight::default()));
        let (frames, frames_rx) = mpsc::channel::<PeerFrame>(FRAMES_IN_FLIGHT);
        let (frame, carry) = pack(first, &mut queue, &in_flight);
        carried = carry;
        if frames.try_send(frame).is_err() {
            continue;
        }
        let mut client = RaftClient::new(channel.clone())
            .max_decoding_message_size(PEER_MAX_MESSAGE_BYTES)
            .max_encoding_message_size(PEER_MAX_MESSAGE_BYTES);
        let replies = match client.converse(ReceiverStream::new(frames_rx)).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                tracing::debug!(target, %status, "cannot open the peer stream");
                fail_all(&in_flight, target, &status.to_string());
                if is_connection_failure(&status) {
                    events.emit(target, LinkEvent::Broken);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        backoff = BACKOFF_MIN;
        let reader = read_replies(replies, &in_flight, || events.emit(target, LinkEvent::Heard));
        let writer = async {
            loop {
                let Some(first) = next_call(&mut carried, &mut queue).await else { return true };
                let (frame, carry) = pack(first, &mut queue, &in_flight);
                carried = carry;
                if frame.calls.is_empty() {
                    continue;
                }
                if frames.send(frame).await.is_err() {
                    return false;
                }
            }
        };
        let why = tokio::select! {
            why = reader => why,
            link_dropped = writer => {
                if link_dropped {
                    return;
                }
                "stream closed".to_string()
            }
        };
        tracing::debug!(target, why, "peer stream ended");
        fail_all(&in_flight, target, &why);
        events.emit(target, LinkEvent::Broken);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// The call that did not fit the last frame, else the next queued one;
/// None once every handle on the link is gone.
async fn next_call(carried: &mut Option<Outgoing>, queue: &mut mpsc::Receiver<Outgoing>) -> Option<Outgoing> {
    match carried.take() {
        Some(call) => Some(call),
        None => queue.recv().await,
    }
}

/// Pack `first` and whatever else is queued into one frame, registering
/// each call as in flight; calls whose caller already gave up are dropped.
/// Returns the frame and a call that did not fit, for the next frame.
fn pack(
    first: Outgoing,
    queue: &mut mpsc::Receiver<Outgoing>,
    in_flight: &Mutex<InFlight>,
) -> (PeerFrame, Option<Outgoing>) {
    let mut calls = Vec::new();
    let mut bytes = 0usize;
    let mut next = Some(first);
    let mut carry = None;
    let mut registered = in_flight.lock_unpoisoned();
    while let Some(out) = next.take() {
        if !out.reply.is_closed() {
            let size = prost::Message::encoded_len(&out.call);
            if !calls.is_empty() && (bytes + size > MAX_FRAME_BYTES || calls.len() >= MAX_FRAME_CALLS) {
                carry = Some(out);
                break;
            }
            bytes += size;
            registered.insert(out.call.id, out.reply);
            calls.push(out.call);
        }
        next = queue.try_recv().ok();
    }
    (PeerFrame { calls }, carry)
}

/// Deliver replies until the stream ends; returns why it ended.
async fn read_replies(
    mut replies: tonic::Streaming<PeerReplyFrame>,
    in_flight: &Mutex<InFlight>,
    heard: impl Fn(),
) -> String {
    loop {
        match replies.message().await {
            Ok(Some(frame)) => {
                heard();
                let mut registered = in_flight.lock_unpoisoned();
                for PeerReply { id, code, error, payload } in frame.replies {
                    let Some(reply) = registered.calls.remove(&id) else { continue };
                    let result = match Code::from(code) {
                        Code::Ok => Ok(payload),
                        code => Err(LinkError::Status(Status::new(code, error))),
                    };
                    let _ = reply.send(result);
                }
            }
            Ok(None) => return "peer closed the stream".into(),
            Err(status) => return status.to_string(),
        }
    }
}

fn fail_all(in_flight: &Mutex<InFlight>, target: NodeId, why: &str) {
    for (_, reply) in in_flight.lock_unpoisoned().calls.drain() {
        let _ = reply.send(Err(LinkError::Unreachable(target, why.to_string())));
    }
}

/// The connection itself failed (refused, reset), as opposed to the peer
/// answering with an error.
fn is_connection_failure(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Cancelled)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outgoing(id: u64, bytes: usize) -> (Outgoing, oneshot::Receiver<Reply>) {
        let (reply, rx) = oneshot::channel();
        let message = RaftMessage { group_id: 1, payload: vec![0; bytes], quiesce: false };
        (
            Outgoing { call: PeerCall { id, kind: RaftCallKind::AppendEntries as i32, message: Some(message) }, reply },
            rx,
        )
    }

    #[tokio::test]
    async fn frames_pack_what_is_ready_within_limits_and_skip_abandoned_calls() {
        let (tx, mut rx) = mpsc::channel(QUEUE_CAPACITY);
        let mut receivers = Vec::new();
        let (first, r) = outgoing(0, 10);
        receivers.push(r);
        for id in 1..3_000u64 {
            let (out, r) = outgoing(id, 10);
            // Every tenth caller has given up already.
            if id % 10 != 0 {
                receivers.push(r);
            }
            tx.send(out).await.unwrap();
        }
        let in_flight = Mutex::new(InFlight::default());
        let (frame, carry) = pack(first, &mut rx, &in_flight);
        assert_eq!(frame.calls.len(), MAX_FRAME_CALLS);
        assert!(frame.calls.iter().all(|c| c.id == 0 || c.id % 10 != 0));
        let carry = carry.expect("the call after a full frame waits for the next");
        let (next, _) = pack(carry, &mut rx, &in_flight);
        assert_eq!(frame.calls.len() + next.calls.len(), 3_000 - 299);
        assert_eq!(in_flight.lock().unwrap().calls.len(), 3_000 - 299);

        // Bytes: two calls over half the budget never share a frame, and one
        // call over the whole budget still goes (alone).
        let (a, _ra) = outgoing(1, MAX_FRAME_BYTES / 2 + 1);
        let (b, _rb) = outgoing(2, MAX_FRAME_BYTES / 2 + 1);
        tx.send(b).await.unwrap();
        let (frame, carry) = pack(a, &mut rx, &in_flight);
        assert_eq!(frame.calls.len(), 1);
        assert_eq!(carry.map(|c| c.call.id), Some(2));
        let (huge, _rh) = outgoing(3, MAX_FRAME_BYTES + 1);
        assert_eq!(pack(huge, &mut rx, &in_flight).0.calls.len(), 1);
        drop(receivers);
    }

    #[test]
    fn abandoned_calls_are_swept_from_the_in_flight_table() {
        let mut in_flight = InFlight::default();
        for id in 0..10_000u64 {
            let (reply, rx) = oneshot::channel::<Reply>();
            drop(rx);
            in_flight.insert(id, reply);
        }
        assert!(in_flight.calls.len() <= 1_025, "{}", in_flight.calls.len());
    }
}
