//! Micro-benchmarks of the per-event steps of ingest, 1,000 events each:
//! decode the gRPC request, validate, partition, dedup + aggregate into a
//! Raft command, encode the command for the log, and apply it to a real
//! RocksDB state machine. `cargo bench -p tally-server --bench hot_path`;
//! the figures and what they explain are in docs/BENCHMARKS.md.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use foldhash::{HashSet, HashSetExt};
use openraft::impls::leader_id_adv::LeaderId;
use openraft::storage::RaftStateMachine;
use openraft::EntryPayload;
use prost::Message;
use tally_proto::partition::partition_of;
use tally_proto::v1::{Event, IngestRequest};
use tally_proto::validate::validate_event;
use tally_server::dedup::DedupIndex;
use tally_server::meta::IngestPolicy;
use tally_server::processor::{build_proposal, EntryRules, IngestJob};
use tally_server::storage::codec::encode;
use tally_server::storage::state_machine::GroupStateMachine;
use tally_server::storage::Engine;
use tally_server::type_config::{Entry, LogId};

const EVENTS: usize = 1_000;
const STAMP: u64 = 1_795_680_000_000;
const WINDOW: u64 = 600_000;

/// Zipf-like ids over a large space and times spread over two hours, as in
/// the comparison benchmark: most (entity, type, minute) keys are distinct.
fn events(seed: u64) -> Vec<Event> {
    let now = 1_795_680_000_000i64;
    (0..EVENTS as u64)
        .map(|i| {
            let x = (i + seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            Event {
                actor_id: Vec::new(),
                entity_id: format!("bench-{}", (x >> 40) % 50_000).into_bytes(),
                event_type: ["view", "view", "like", "comment"][(x % 4) as usize].into(),
                event_time_ms: now - ((x >> 20) % 7_200_000) as i64,
                event_id: format!("{seed}-{i}").into_bytes(),
                value: Some(1 + (x % 10) as i64),
            }
        })
        .collect()
}

fn jobs(events: Vec<Event>) -> Vec<IngestJob> {
    let (reply, _) = tokio::sync::oneshot::channel();
    vec![IngestJob::new(events, Vec::new(), reply)]
}

/// The default policy, checked against the stamp, as a leader does.
fn rules() -> EntryRules {
    EntryRules {
        dedup_window_ms: WINDOW,
        policy: IngestPolicy::default(),
        check_times: true,
        sealed_below_ms: i64::MIN,
        moved: Default::default(),
    }
}

fn per_event(c: &mut Criterion) {
    let batch = events(0);
    let bytes = IngestRequest { events: batch.clone() }.encode_to_vec();
    let mut g = c.benchmark_group("per_1000_events");
    g.throughput(Throughput::Elements(EVENTS as u64));
    g.bench_function("decode_request", |b| b.iter(|| IngestRequest::decode(bytes.as_slice())));
    g.bench_function("validate", |b| b.iter(|| batch.iter().filter(|e| validate_event(e).is_ok()).count()));
    g.bench_function("partition", |b| b.iter(|| batch.iter().map(|e| partition_of(&e.entity_id, 1_000)).sum::<u32>()));
    g.bench_function("dedup_and_aggregate", |b| {
        let dedup = DedupIndex::default();
        b.iter_batched(
            || jobs(batch.clone()),
            |jobs| build_proposal(&dedup, &mut HashSet::new(), jobs, STAMP, &rules()),
            BatchSize::SmallInput,
        )
    });
    let command =
        build_proposal(&DedupIndex::default(), &mut HashSet::new(), jobs(batch.clone()), STAMP, &rules()).command;
    g.bench_function("encode_log_entry", |b| b.iter(|| encode(&command)));
    g.finish();
}

fn apply(c: &mut Criterion) {
    let Ok(rt) = tokio::runtime::Runtime::new() else { return };
    let Ok(dir) = tempfile::tempdir() else { return };
    let Ok(engine) = Engine::open(&dir.path().join("db")) else { return };
    let Ok(mut sm) = rt.block_on(GroupStateMachine::open(
        engine,
        1,
        &dir.path().join("snapshots"),
        Arc::new(DedupIndex::default()),
        None,
    )) else {
        return;
    };
    let mut index = 0u64;
    let mut g = c.benchmark_group("per_1000_events");
    g.throughput(Throughput::Elements(EVENTS as u64));
    g.bench_function("apply_to_rocksdb", |b| {
        b.iter_batched(
            || {
                index += 1;
                let command =
                    build_proposal(&DedupIndex::default(), &mut HashSet::new(), jobs(events(index)), STAMP, &rules())
                        .command;
                Entry {
                    log_id: LogId { leader_id: LeaderId { term: 1, node_id: 1 }, index },
                    payload: EntryPayload::Normal(command),
                }
            },
            |entry: Entry| {
                let stream = futures::stream::iter([Ok((entry, None))]);
                rt.block_on(sm.apply(stream))
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, per_event, apply);
criterion_main!(benches);
