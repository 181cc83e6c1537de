//! `--target redis-dedup`: Tally's semantics on a single Redis (no
//! replication, no persistence), so the comparison is like for like in
//! what is computed, if not in durability.
//!
//! Per event one `EVALSHA` of [`SCRIPT`] (loaded once with `SCRIPT LOAD`),
//! a batch per pipeline:
//!
//! * `SET dedup:{entity}:{type}:{event_id} 1 NX EX 600` — the dedup window
//!   of Tally's default (10 minutes). The key holds the entity and type as
//!   well as the id because that triple is what Tally dedups on, and it
//!   keeps the bench's per-run entity prefix in the key, so two runs
//!   against one Redis never see each other's ids.
//! * only if that set the key: `HINCRBY` of count and sum of the event's
//!   minute, hour, day and month bucket in the hash
//!   `counts:{entity}:{type}` (fields `m:<start>:c`, `m:<start>:s`, `h:…`,
//!   `d:…`, `mo:…`; bucket starts are UTC, computed by the bench with
//!   [`tally_proto::time::bucket_start`], the function Tally uses).
//!
//! The script answers 1 (counted) or 0 (duplicate), so outcomes are exact
//! per event as with Tally, and [`RedisDedup::count_of`] can verify the
//! counts afterwards from the month buckets.

use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;
use tally_proto::time::{bucket_start, Granularity};

use super::{all_failed, entity_str, redis_connections, BatchSend};
use tally_client::{Event, Outcome};

/// KEYS[1] dedup key, KEYS[2] counts hash; ARGV[1] dedup TTL (s), ARGV[2]
/// value, ARGV[3..6] the minute, hour, day and month bucket field prefixes.
pub const SCRIPT: &str = r#"
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  local v = tonumber(ARGV[2])
  for i = 3, 6 do
    redis.call('HINCRBY', KEYS[2], ARGV[i] .. ':c', 1)
    redis.call('HINCRBY', KEYS[2], ARGV[i] .. ':s', v)
  end
  return 1
end
return 0
"#;

/// Tally's default dedup window, in seconds.
const DEDUP_TTL_SECS: u64 = 600;

/// Pipelined EVALSHA over a few multiplexed connections.
pub(crate) struct RedisDedup {
    conns: Vec<redis::aio::MultiplexedConnection>,
    next: AtomicUsize,
    sha: String,
}

impl RedisDedup {
    /// Connects and loads [`SCRIPT`].
    pub(crate) async fn connect(addr: &str, connections: usize) -> anyhow::Result<RedisDedup> {
        let conns = redis_connections(addr, connections.min(8)).await?;
        let mut conn = conns[0].clone();
        let sha: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(SCRIPT)
            .query_async(&mut conn)
            .await
            .context("loading the dedup script into redis (SCRIPT LOAD)")?;
        Ok(RedisDedup { conns, next: AtomicUsize::new(0), sha })
    }

    /// Count and sum of one (entity, type) over all time, from its month
    /// buckets: what the bench's verification compares with the acks.
    pub(crate) async fn count_of(&self, entity: &str, event_type: &str) -> anyhow::Result<(u64, i64)> {
        let mut conn = self.conns[0].clone();
        let fields: Vec<(String, i64)> = redis::cmd("HGETALL")
            .arg(format!("counts:{entity}:{event_type}"))
            .query_async(&mut conn)
            .await
            .with_context(|| format!("HGETALL counts:{entity}:{event_type}"))?;
        let (mut count, mut sum) = (0u64, 0i64);
        for (field, v) in fields {
            if let Some(rest) = field.strip_prefix("mo:") {
                if rest.ends_with(":c") {
                    count += u64::try_from(v).unwrap_or(0);
                } else if rest.ends_with(":s") {
                    sum += v;
                }
            }
        }
        Ok((count, sum))
    }
}

impl BatchSend for RedisDedup {
    async fn send_batch(&self, events: Vec<Event>) -> Vec<Outcome> {
        let n = events.len();
        let mut pipe = redis::pipe();
        for e in &events {
            let entity = entity_str(e);
            let t = e.event_time_ms;
            pipe.cmd("EVALSHA")
                .arg(&self.sha)
                .arg(2)
                .arg(format!("dedup:{entity}:{}:{}", e.event_type, String::from_utf8_lossy(&e.event_id)))
                .arg(format!("counts:{entity}:{}", e.event_type))
                .arg(DEDUP_TTL_SECS)
                .arg(e.value.unwrap_or(1))
                .arg(format!("m:{}", bucket_start(Granularity::Minute, t)))
                .arg(format!("h:{}", bucket_start(Granularity::Hour, t)))
                .arg(format!("d:{}", bucket_start(Granularity::Day, t)))
                .arg(format!("mo:{}", bucket_start(Granularity::Month, t)));
        }
        let mut conn = self.conns[self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len()].clone();
        match pipe.query_async::<Vec<i64>>(&mut conn).await {
            Ok(r) if r.len() == n => {
                r.into_iter().map(|x| if x == 1 { Outcome::Accepted } else { Outcome::Duplicate }).collect()
            }
            Ok(r) => all_failed(n, format!("redis answered {} results for {n} scripts", r.len())),
            Err(e) => all_failed(n, format!("redis: {e}")),
        }
    }
}
