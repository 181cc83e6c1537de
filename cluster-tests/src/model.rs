//! The test's own model of what the cluster must answer: every distinct
//! acknowledged event, and the exact stats and series that follow from them.

use std::collections::{BTreeMap, HashMap};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tally_proto::time::{bucket_start, series_starts, Granularity};
use tally_proto::v1::Event;

/// One event with the given fields and no value (counts 1, adds 0).
pub fn event(entity: &str, event_type: &str, time: i64, id: &str) -> Event {
    Event {
        actor_id: Vec::new(),
        entity_id: entity.as_bytes().to_vec(),
        event_type: event_type.into(),
        event_time_ms: time,
        event_id: id.as_bytes().to_vec(),
        value: None,
    }
}

pub const EVENT_TYPES: [&str; 3] = ["view", "like", "comment"];

/// (entity, type).
type Key = (Vec<u8>, String);

#[derive(Default)]
pub struct Model {
    /// (entity, type) → (event time, value) of each distinct event.
    events: BTreeMap<Key, Vec<(i64, i64)>>,
    /// Every event id recorded, to catch a test recording one twice.
    ids: HashMap<Vec<u8>, ()>,
}

impl Model {
    /// Record a distinct event (its id must not have been recorded before).
    pub fn record(&mut self, e: &Event) {
        if !e.event_id.is_empty() {
            assert!(self.ids.insert(e.event_id.clone(), ()).is_none(), "model recorded an id twice");
        }
        self.events
            .entry((e.entity_id.clone(), e.event_type.clone()))
            .or_default()
            .push((e.event_time_ms, e.value.unwrap_or(1)));
    }

    pub fn distinct_events(&self) -> usize {
        self.events.values().map(Vec::len).sum()
    }

    pub fn keys(&self) -> impl Iterator<Item = &(Vec<u8>, String)> {
        self.events.keys()
    }

    /// Count and sum of events with time in [from, to). Panics if the sum
    /// leaves the i64 range: use [`Model::exact_stats`] for extreme values.
    pub fn stats(&self, entity: &[u8], event_type: &str, from: i64, to: i64) -> (u64, i64) {
        let (count, sum) = self.exact_stats(entity, event_type, from, to);
        (count, i64::try_from(sum).unwrap_or_else(|_| panic!("model sum {sum} is outside i64: use exact_stats")))
    }

    /// Count and exact (128-bit) sum of events with time in [from, to).
    pub fn exact_stats(&self, entity: &[u8], event_type: &str, from: i64, to: i64) -> (u64, i128) {
        let mut count = 0;
        let mut sum = 0i128;
        if let Some(evs) = self.events.get(&(entity.to_vec(), event_type.to_string())) {
            for (t, v) in evs {
                if *t >= from && *t < to {
                    count += 1;
                    sum += *v as i128;
                }
            }
        }
        (count, sum)
    }

    /// The `k` entities with the highest count (or exact sum, `by_sum`) of
    /// `event_type` over [from, to): highest first, ties by entity id
    /// ascending, as `Query.TopK` ranks. (entity, count, exact sum).
    pub fn top_k(&self, event_type: &str, from: i64, to: i64, k: usize, by_sum: bool) -> Vec<(Vec<u8>, u64, i128)> {
        let mut all: Vec<(Vec<u8>, u64, i128)> = self
            .events
            .keys()
            .filter(|(_, t)| t == event_type)
            .map(|(entity, _)| {
                let (count, sum) = self.exact_stats(entity, event_type, from, to);
                (entity.clone(), count, sum)
            })
            .filter(|(_, count, _)| *count > 0)
            .collect();
        all.sort_by(|a, b| {
            let by_value = if by_sum { b.2.cmp(&a.2) } else { b.1.cmp(&a.1) };
            by_value.then_with(|| a.0.cmp(&b.0))
        });
        all.truncate(k);
        all
    }

    /// Dense buckets of granularity `g` covering [from, to).
    pub fn series(&self, entity: &[u8], event_type: &str, g: Granularity, from: i64, to: i64) -> Vec<(i64, u64, i64)> {
        let mut by_bucket: HashMap<i64, (u64, i64)> = HashMap::new();
        if let Some(evs) = self.events.get(&(entity.to_vec(), event_type.to_string())) {
            for (t, v) in evs {
                let b = by_bucket.entry(bucket_start(g, *t)).or_default();
                b.0 += 1;
                b.1 += v;
            }
        }
        series_starts(g, from, to)
            .map(|s| {
                let (c, v) = by_bucket.get(&s).copied().unwrap_or_default();
                (s, c, v)
            })
            .collect()
    }
}

/// Generates events: `entities` ids with a skew toward low ids, the three
/// event types, times spread over `span_ms` before `end_ms`, values 1..=100.
pub struct Workload {
    rng: StdRng,
    pub entities: u32,
    pub end_ms: i64,
    pub span_ms: i64,
    next_id: u64,
    prefix: String,
    extreme: bool,
    /// Times are the last `span_ms` before the clock when the event is
    /// made, not before `end_ms` (see [`Workload::live`]).
    live: bool,
}

/// Entities of events meant to be refused (see [`Workload::doomed_event`]).
pub const DOOMED_PREFIX: &str = "doomed-";

impl Workload {
    pub fn new(seed: u64, entities: u32, end_ms: i64, span_ms: i64) -> Workload {
        Workload {
            rng: StdRng::seed_from_u64(seed),
            entities,
            end_ms,
            span_ms,
            next_id: 0,
            prefix: format!("s{seed}"),
            extreme: false,
            live: false,
        }
    }

    /// Events of the last `span_ms` as they are made, on entities
    /// `live-0` … (the hot ones a fault run spreads): their times pass any
    /// spread's start, so both sides of it are written.
    pub fn live(mut self) -> Workload {
        self.live = true;
        self.prefix = format!("{}l", self.prefix);
        self
    }

    /// Values at and near the i64 limits (sums leave the i64 range, and any
    /// non-associative arithmetic shows), on entities of their own.
    pub fn with_extreme_values(mut self) -> Workload {
        self.extreme = true;
        self.prefix = format!("{}x", self.prefix);
        self
    }

    pub fn event(&mut self) -> Event {
        // Square of a uniform number: low ids are hot, like real traffic.
        let u: f64 = self.rng.random();
        let entity = ((u * u) * self.entities as f64) as u32;
        let event_type = EVENT_TYPES[self.rng.random_range(0..EVENT_TYPES.len())];
        let end = if self.live { tally_client::time_arg::now_ms() } else { self.end_ms };
        let time = end - self.rng.random_range(0..self.span_ms);
        self.next_id += 1;
        let value = if self.extreme {
            const EXTREMES: [i64; 6] = [i64::MAX, i64::MIN, i64::MAX - 1, i64::MIN + 1, -1, 1];
            Some(EXTREMES[self.rng.random_range(0..EXTREMES.len())])
        } else if self.rng.random_bool(0.5) {
            Some(self.rng.random_range(1..=100))
        } else {
            None
        };
        let kind = if self.extreme {
            "extreme"
        } else if self.live {
            "live"
        } else {
            "video"
        };
        // Viewers, so every fault run also carries unique-actor sketches
        // through crashes and snapshots (their digests must agree).
        let actor = format!("viewer-{}", self.next_id % 997).into_bytes();
        Event {
            actor_id: actor,
            entity_id: format!("{kind}-{entity}").into_bytes(),
            event_type: event_type.to_string(),
            event_time_ms: time,
            event_id: format!("{}-{}", self.prefix, self.next_id).into_bytes(),
            value,
        }
    }

    /// An event a day ahead of the clock: refused as IN_FUTURE by every
    /// policy the tests use, kept in its partition's dead-letter log, never
    /// counted. Its entity starts with [`DOOMED_PREFIX`].
    pub fn doomed_event(&mut self) -> Event {
        self.next_id += 1;
        Event {
            actor_id: Vec::new(),
            entity_id: format!("{DOOMED_PREFIX}{}", self.prefix).into_bytes(),
            event_type: "view".into(),
            event_time_ms: tally_client::time_arg::now_ms() + tally_proto::time::DAY_MS,
            event_id: format!("{}-{}", self.prefix, self.next_id).into_bytes(),
            value: None,
        }
    }

    pub fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }
}
