//! `--target redis-incr`: one `INCR counts:{entity}:{type}` per event, a
//! batch per pipeline, on a single Redis without persistence.
//!
//! Why it is in the comparison: it is an upper bound, not a peer. It does
//! strictly less than Tally — no dedup (a re-sent event is counted again),
//! no time buckets, no sums, no replication, nothing on disk — so it shows
//! the cost of a network round trip and a hash-table increment on this
//! machine. Every answered event is reported `Accepted`.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{all_failed, entity_str, redis_connections, BatchSend};
use tally_client::{Event, Outcome};

/// Pipelined INCR over a few multiplexed connections.
pub(crate) struct RedisIncr {
    conns: Vec<redis::aio::MultiplexedConnection>,
    next: AtomicUsize,
}

impl RedisIncr {
    /// Connects `connections` multiplexed connections to `addr`.
    pub(crate) async fn connect(addr: &str, connections: usize) -> anyhow::Result<RedisIncr> {
        Ok(RedisIncr { conns: redis_connections(addr, connections.min(8)).await?, next: AtomicUsize::new(0) })
    }
}

impl BatchSend for RedisIncr {
    async fn send_batch(&self, events: Vec<Event>) -> Vec<Outcome> {
        let n = events.len();
        let mut pipe = redis::pipe();
        for e in &events {
            pipe.cmd("INCR").arg(format!("counts:{}:{}", entity_str(e), e.event_type));
        }
        let mut conn = self.conns[self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len()].clone();
        match pipe.query_async::<Vec<i64>>(&mut conn).await {
            Ok(r) if r.len() == n => vec![Outcome::Accepted; n],
            Ok(r) => all_failed(n, format!("redis answered {} results for {n} commands", r.len())),
            Err(e) => all_failed(n, format!("redis: {e}")),
        }
    }
}
