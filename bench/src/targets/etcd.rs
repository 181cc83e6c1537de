//! `--target etcd`: the same events written durably into an etcd cluster:
//! one put per event, a batch per transaction (`KV.Txn` with no compare
//! and the puts as its success branch), many transactions in flight,
//! spread round-robin over every endpoint of `--target-addr` (followers
//! forward to the leader, as Tally nodes do). etcd acknowledges a
//! transaction after it is committed on a quorum of fsync'd WALs, the same
//! durability as a Tally ack.
//!
//! What it does not do: count. The key is
//! `events/{entity}/{type}/{event_id}` and the value the event time and
//! value, so a re-sent event overwrites its own key (idempotent storage,
//! but etcd cannot say "duplicate": every answered event is `Accepted`),
//! and counts would need a range read. The bench therefore does not verify
//! etcd. A transaction may not put one key twice, so a re-send that lands
//! in the batch of its original is written once and acknowledged with it.
//!
//! The client stubs are generated in this crate from a vendored subset of
//! etcd's `rpc.proto` ([`crate::etcd_proto`]).

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::etcd_proto::kv_client::KvClient;
use crate::etcd_proto::{request_op, PutRequest, RequestOp, TxnRequest};
use anyhow::Context;
use tonic::transport::{Channel, Endpoint};

use super::{all_failed, entity_str, BatchSend};
use tally_client::{Event, Outcome};

/// HTTP/2 connections per endpoint.
const CHANNELS_PER_ENDPOINT: usize = 2;

/// Transactions over channels to every member.
pub(crate) struct Etcd {
    clients: Vec<KvClient<Channel>>,
    next: AtomicUsize,
}

impl Etcd {
    /// Connects to every endpoint of `addrs` (`host:port`, comma-separated).
    pub(crate) async fn connect(addrs: &str) -> anyhow::Result<Etcd> {
        let mut clients = Vec::new();
        for addr in addrs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            let url = if addr.contains("://") { addr.to_owned() } else { format!("http://{addr}") };
            for _ in 0..CHANNELS_PER_ENDPOINT {
                let channel = Endpoint::from_shared(url.clone())
                    .with_context(|| format!("etcd endpoint {url}"))?
                    .connect_timeout(Duration::from_secs(3))
                    .timeout(Duration::from_secs(30))
                    .connect()
                    .await
                    .with_context(|| format!("connecting to etcd at {url}"))?;
                clients.push(KvClient::new(channel));
            }
        }
        if clients.is_empty() {
            anyhow::bail!("--target-addr names no etcd endpoint");
        }
        Ok(Etcd { clients, next: AtomicUsize::new(0) })
    }
}

impl BatchSend for Etcd {
    async fn send_batch(&self, events: Vec<Event>) -> Vec<Outcome> {
        let n = events.len();
        let mut seen = HashSet::with_capacity(n);
        let mut success = Vec::with_capacity(n);
        for e in &events {
            let key = format!("events/{}/{}/{}", entity_str(e), e.event_type, String::from_utf8_lossy(&e.event_id));
            if !seen.insert(key.clone()) {
                continue;
            }
            let value = format!("{}:{}", e.event_time_ms, e.value.unwrap_or(1));
            success.push(RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: key.into_bytes(),
                    value: value.into_bytes(),
                    ..Default::default()
                })),
            });
        }
        let mut client = self.clients[self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len()].clone();
        match client.txn(TxnRequest { compare: Vec::new(), success, failure: Vec::new() }).await {
            Ok(r) if r.get_ref().succeeded => vec![Outcome::Accepted; n],
            Ok(_) => all_failed(n, "etcd: the transaction did not succeed"),
            Err(status) => all_failed(n, format!("etcd: {}: {}", status.code(), status.message())),
        }
    }
}
