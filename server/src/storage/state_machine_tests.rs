//! State machine behaviour on a real RocksDB: apply, dedup determinism,
//! snapshot → install on another node, restart, interrupted install.

use std::sync::Arc;

use openraft::impls::leader_id_adv::LeaderId;
use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, RaftSnapshotBuilder};
use tally_proto::time::{DAY_MS, HOUR_MS, MINUTE_MS};

use super::read::{read_series, read_stats, state_digest, SeriesRead};
use super::state_machine::GroupStateMachine;
use super::Engine;
use crate::command::{Command, DeadLetter, DeadLetterReason, IngestBatch, KeyedEvent, MinuteDelta};
use crate::dedup::DedupIndex;
use crate::meta::LogBounds;
use crate::type_config::{Entry, LogId};

const GROUP: u32 = 3;
/// 2024-02-29T23:59:00Z: a minute whose hour, day and month all end with it.
const T: i64 = 1_709_251_140_000;

fn log_id(index: u64) -> LogId {
    LogId { leader_id: LeaderId { term: 1, node_id: 1 }, index }
}

/// An entry whose keys belong to events outside its deltas (value 0, no
/// delta): for tests of the index alone.
fn ingest(index: u64, proposed_at_ms: u64, deltas: Vec<MinuteDelta>, keys: Vec<u128>) -> Entry {
    let keyed = keys.into_iter().map(|key| KeyedEvent { key, delta: u32::MAX, value: 0 }).collect();
    keyed_ingest(index, proposed_at_ms, deltas, keyed)
}

fn keyed_ingest(index: u64, proposed_at_ms: u64, deltas: Vec<MinuteDelta>, keyed: Vec<KeyedEvent>) -> Entry {
    Entry {
        log_id: log_id(index),
        payload: EntryPayload::Normal(Command::Ingest(IngestBatch {
            proposed_at_ms,
            dedup_window_ms: 600_000,
            deltas,
            keyed,
            provisional: false,
            dead_letters: vec![],
            dead_letter_bounds: crate::meta::DEFAULT_DEAD_LETTERS,
            ..Default::default()
        })),
    }
}

/// An entry of `n` events rejected as too late, under `bounds`.
fn rejected(index: u64, proposed_at_ms: u64, n: usize, bounds: LogBounds) -> Entry {
    let event = |i: usize| tally_proto::v1::Event {
        entity_id: format!("v{index}-{i}").into_bytes(),
        event_type: "view".into(),
        event_time_ms: 5,
        ..Default::default()
    };
    let dead_letters = (0..n).map(|i| DeadLetter::of(&event(i), DeadLetterReason::TooLate { limit_ms: 10 })).collect();
    Entry {
        log_id: log_id(index),
        payload: EntryPayload::Normal(Command::Ingest(IngestBatch {
            proposed_at_ms,
            dedup_window_ms: 600_000,
            dead_letters,
            dead_letter_bounds: bounds,
            ..Default::default()
        })),
    }
}

fn delta(entity: &str, minute_ms: i64, count: u64, sum: i64) -> MinuteDelta {
    MinuteDelta {
        entity_id: entity.as_bytes().to_vec(),
        event_type: "view".into(),
        minute_ms,
        count,
        sum: sum as i128,
        actors: vec![],
    }
}

async fn open(dir: &std::path::Path) -> (Arc<Engine>, GroupStateMachine, Arc<DedupIndex>) {
    let engine = Engine::open(&dir.join("db")).unwrap();
    let dedup = Arc::new(DedupIndex::default());
    let sm = GroupStateMachine::open(engine.clone(), GROUP, &dir.join("snapshots"), dedup.clone(), None).await.unwrap();
    (engine, sm, dedup)
}

/// The buckets of a series read of a range nothing has expired from.
fn buckets(read: SeriesRead) -> Vec<(i64, super::counts::CountSum)> {
    match read {
        SeriesRead::Buckets(buckets, _) => buckets.into_iter().map(|(start, total, _)| (start, total)).collect(),
        SeriesRead::Expired { first_kept_ms } => panic!("expired before {first_kept_ms}"),
    }
}

async fn apply(sm: &mut GroupStateMachine, entries: Vec<Entry>) {
    let stream = futures::stream::iter(entries.into_iter().map(|e| Ok((e, None))));
    sm.apply(stream).await.unwrap();
}

/// A replica in a directory of its own.
type Replica = (tempfile::TempDir, Arc<Engine>, GroupStateMachine);

/// Two replicas of one log: `a` applies it in one go; `b` checkpoints after
/// its first `split` entries and then applies the rest — the same entries
/// reach their disks through different checkpoints.
async fn two_replicas(log: Vec<Entry>, split: usize) -> (Replica, Replica) {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a_engine, mut a, _) = open(a_dir.path()).await;
    apply(&mut a, log.clone()).await;
    let (b_engine, mut b, _) = open(b_dir.path()).await;
    let mut entries = log;
    let rest = entries.split_off(split);
    apply(&mut b, entries).await;
    state_digest(&b_engine, &b.write_back()).await.unwrap();
    apply(&mut b, rest).await;
    ((a_dir, a_engine, a), (b_dir, b_engine, b))
}

#[tokio::test]
async fn apply_aggregates_into_every_granularity() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, mut sm, dedup) = open(dir.path()).await;
    apply(
        &mut sm,
        vec![
            ingest(1, 1_000, vec![delta("v", T, 2, 10), delta("v", T - MINUTE_MS, 1, 1)], vec![1, 2, 3]),
            ingest(2, 2_000, vec![delta("v", T, 1, 5), delta("w", T, 7, 7)], vec![4]),
        ],
    )
    .await;
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(2)));
    assert_eq!(dedup.lock().len(), 4);

    let stats =
        async |from, to| read_stats(&engine, &sm.write_back(), None, b"v", "view", from, to).await.unwrap().total;
    let minute = stats(T, T + MINUTE_MS).await;
    assert_eq!((minute.count, minute.sum), (3, 15));
    // A whole month (February 2024) is one bucket read.
    let feb = 1_706_745_600_000;
    assert_eq!(stats(feb, feb + 29 * DAY_MS).await.count, 4);
    // Ranges that cut through buckets still add up exactly.
    assert_eq!(stats(T - HOUR_MS, T).await.count, 1);
    assert_eq!(stats(T + MINUTE_MS, T + DAY_MS).await.count, 0);
    let hours = read_series(
        &engine,
        &sm.write_back(),
        None,
        b"v",
        "view",
        tally_proto::time::Granularity::Hour,
        T - HOUR_MS,
        T + HOUR_MS,
    )
    .await
    .unwrap();
    assert_eq!(buckets(hours).iter().map(|(_, c)| c.count).collect::<Vec<_>>(), vec![0, 4, 0]);
}

#[tokio::test]
async fn dedup_keys_expire_by_the_leaders_stamp() {
    let dir = tempfile::tempdir().unwrap();
    let (_engine, mut sm, dedup) = open(dir.path()).await;
    apply(&mut sm, vec![ingest(1, 1_000, vec![], vec![1]), ingest(2, 500_000, vec![], vec![2])]).await;
    assert!(dedup.lock().contains(&1));
    // Keys live to the end of the second the window ends in (never
    // shorter than the window): a millisecond past 10 minutes, still there.
    apply(&mut sm, vec![ingest(3, 601_001, vec![], vec![3])]).await;
    assert!(dedup.lock().contains(&1));
    // A second later its keys go; later ones stay.
    apply(&mut sm, vec![ingest(4, 602_000, vec![], vec![4])]).await;
    let index = dedup.lock();
    assert!(!index.contains(&1) && index.contains(&2) && index.contains(&3));
}

#[tokio::test]
async fn snapshot_installs_identically_and_survives_restart() {
    let leader_dir = tempfile::tempdir().unwrap();
    let (leader_engine, mut leader, _) = open(leader_dir.path()).await;
    let entries: Vec<Entry> = (1..=50)
        .map(|i| {
            ingest(
                i,
                i * 1_000,
                vec![delta(&format!("e{}", i % 7), T - (i as i64) * MINUTE_MS, i, i as i64)],
                vec![i as u128],
            )
        })
        .collect();
    apply(&mut leader, entries).await;
    let snapshot = leader.get_snapshot_builder().await.build_snapshot().await.unwrap();
    assert_eq!(snapshot.meta.last_log_id, Some(log_id(50)));
    // Applying more after the builder was made does not leak into it.
    apply(&mut leader, vec![ingest(51, 60_000, vec![delta("late", T, 1, 1)], vec![999])]).await;

    let follower_dir = tempfile::tempdir().unwrap();
    {
        let (follower_engine, mut follower, dedup) = open(follower_dir.path()).await;
        follower.install_snapshot(&snapshot.meta, snapshot.snapshot.clone()).await.unwrap();
        assert_eq!(follower.applied_state().await.unwrap().0, Some(log_id(50)));
        assert_eq!(dedup.lock().len(), 50);
        assert_eq!(
            read_stats(&follower_engine, &follower.write_back(), None, b"late", "view", 0, T + DAY_MS)
                .await
                .unwrap()
                .total
                .count,
            0
        );
        apply(&mut follower, vec![ingest(51, 60_000, vec![delta("late", T, 1, 1)], vec![999])]).await;
        assert_eq!(
            state_digest(&follower_engine, &follower.write_back()).await.unwrap(),
            state_digest(&leader_engine, &leader.write_back()).await.unwrap()
        );
    }
    // Restart: everything comes back from disk.
    let (engine, mut sm, dedup) = open(follower_dir.path()).await;
    assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(51)));
    assert_eq!(dedup.lock().len(), 51);
    assert_eq!(
        state_digest(&engine, &sm.write_back()).await.unwrap(),
        state_digest(&leader_engine, &leader.write_back()).await.unwrap()
    );
    assert!(sm.get_current_snapshot().await.unwrap().is_some());
}

#[tokio::test]
async fn interrupted_install_restores_the_local_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let digest_at_snapshot;
    {
        let (engine, mut sm, _) = open(dir.path()).await;
        apply(&mut sm, vec![ingest(1, 1_000, vec![delta("a", T, 3, 3)], vec![1])]).await;
        sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        digest_at_snapshot = state_digest(&engine, &sm.write_back()).await.unwrap();
        apply(&mut sm, vec![ingest(2, 2_000, vec![delta("a", T, 1, 1)], vec![2])]).await;
        // Simulate a crash in the middle of installing a snapshot.
        let mut batch = rocksdb::WriteBatch::default();
        batch.put_cf(
            engine.cf(super::keys::CF_STATE).unwrap(),
            super::keys::tagged(GROUP, super::keys::STATE_INSTALLING),
            [],
        );
        batch.delete_range_cf(
            engine.cf(super::keys::CF_COUNTS).unwrap(),
            super::keys::group_prefix(GROUP),
            super::keys::group_end(GROUP),
        );
        engine.write(batch).unwrap();
        engine.sync().await.unwrap();
    }
    let (engine, mut sm, _) = open(dir.path()).await;
    assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(1)));
    assert_eq!(state_digest(&engine, &sm.write_back()).await.unwrap(), digest_at_snapshot);
}

#[tokio::test]
async fn apply_skips_events_whose_key_is_already_counted() {
    // Two replicas apply the same log; the second entry repeats key 1 (a
    // leader whose dedup view was incomplete). Neither counts it twice.
    let k = |key, value| KeyedEvent { key, delta: 0, value };
    let log = || {
        vec![
            keyed_ingest(1, 1_000, vec![delta("v", T, 2, 10)], vec![k(1, 4), k(2, 6)]),
            // Key 1 again, key 3 twice, and one event without a key (value 1).
            keyed_ingest(2, 2_000, vec![delta("v", T, 4, 17)], vec![k(1, 4), k(3, 6), k(3, 6)]),
        ]
    };
    let mut digests = Vec::new();
    for _ in 0..2 {
        let dir = tempfile::tempdir().unwrap();
        {
            let (engine, mut sm, dedup) = open(dir.path()).await;
            apply(&mut sm, log()).await;
            let s = read_stats(&engine, &sm.write_back(), None, b"v", "view", T, T + MINUTE_MS).await.unwrap().total;
            // Entry 2 counts key 3 once and the keyless event: 2 + 2 events.
            assert_eq!((s.count, s.sum), (4, 10 + 6 + 1));
            assert_eq!(dedup.conflicts(), 2);
            digests.push(state_digest(&engine, &sm.write_back()).await.unwrap());
        }
        // The counter is replicated state: it survives a restart.
        let (_engine, _sm, dedup) = open(dir.path()).await;
        assert_eq!(dedup.conflicts(), 2);
    }
    assert_eq!(digests[0], digests[1]);
}

#[tokio::test]
async fn a_leader_with_a_slow_clock_cannot_expire_keys_early() {
    let dir = tempfile::tempdir().unwrap();
    let (_engine, mut sm, dedup) = open(dir.path()).await;
    // The second leader's clock is 16 minutes behind the first's.
    apply(&mut sm, vec![ingest(1, 1_000_000, vec![], vec![1]), ingest(2, 40_000, vec![], vec![2])]).await;
    assert_eq!(dedup.lock().log_clock_ms(), 1_000_000);
    // Stamped with the log's clock, key 2 lives a whole window from there.
    apply(&mut sm, vec![ingest(3, 1_000_001, vec![], vec![])]).await;
    assert!(dedup.lock().contains(&2));
    apply(&mut sm, vec![ingest(4, 1_601_000, vec![], vec![])]).await;
    assert!(!dedup.lock().contains(&1) && !dedup.lock().contains(&2));
}

#[tokio::test]
async fn sums_at_the_i64_limits_are_exact_whatever_rocksdb_merges_first() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, mut sm, _) = open(dir.path()).await;
    let big = |i, sum: i64| ingest(i, i * 1_000, vec![delta("x", T, 1, sum)], vec![]);
    let checkpoint = |sm: &GroupStateMachine| sm.write_back().checkpoint(&engine, false).unwrap();
    apply(&mut sm, vec![big(1, i64::MAX), big(2, i64::MAX)]).await;
    // Checkpoint, flush and compact between operands, so RocksDB folds them
    // in another grouping than a replica that never flushed.
    checkpoint(&sm);
    engine.db().flush_cf(engine.cf(super::keys::CF_COUNTS).unwrap()).unwrap();
    apply(&mut sm, vec![big(3, i64::MIN)]).await;
    checkpoint(&sm);
    engine.db().compact_range_cf(engine.cf(super::keys::CF_COUNTS).unwrap(), None::<&[u8]>, None::<&[u8]>);
    apply(&mut sm, vec![big(4, i64::MIN)]).await;
    let s = read_stats(&engine, &sm.write_back(), None, b"x", "view", T, T + MINUTE_MS).await.unwrap().total;
    assert_eq!((s.count, s.sum), (4, -2));
    // Over a day (another bucket, merged in another order) it agrees.
    let day =
        read_stats(&engine, &sm.write_back(), None, b"x", "view", T - 23 * HOUR_MS - 59 * MINUTE_MS, T + MINUTE_MS)
            .await
            .unwrap();
    assert_eq!(day.total.sum, -2);
    let partial = read_series(
        &engine,
        &sm.write_back(),
        None,
        b"x",
        "view",
        tally_proto::time::Granularity::Minute,
        T,
        T + MINUTE_MS,
    )
    .await
    .unwrap();
    assert_eq!(buckets(partial)[0].1.sum, -2);
}

#[tokio::test]
async fn reads_add_memory_to_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, mut sm, _) = open(dir.path()).await;
    apply(&mut sm, vec![ingest(1, 1_000, vec![delta("v", T, 2, 2)], vec![1])]).await;
    assert!(sm.write_back().checkpoint(&engine, false).unwrap());
    apply(&mut sm, vec![ingest(2, 2_000, vec![delta("v", T, 3, 3)], vec![2])]).await;
    // One bucket on disk (2) and in memory (3); the month bucket likewise.
    assert_eq!(
        read_stats(&engine, &sm.write_back(), None, b"v", "view", T, T + MINUTE_MS).await.unwrap().total.count,
        5
    );
    let feb = 1_706_745_600_000;
    assert_eq!(
        read_stats(&engine, &sm.write_back(), None, b"v", "view", feb, feb + 29 * DAY_MS).await.unwrap().total.count,
        5
    );
    let minutes = read_series(
        &engine,
        &sm.write_back(),
        None,
        b"v",
        "view",
        tally_proto::time::Granularity::Minute,
        T - MINUTE_MS,
        T + MINUTE_MS,
    )
    .await
    .unwrap();
    assert_eq!(buckets(minutes).iter().map(|(_, c)| c.count).collect::<Vec<_>>(), vec![0, 5]);
}

/// A crash loses what memory held since the last checkpoint; openraft
/// re-applies the log after the checkpoint's applied id, and the result is
/// exactly the state of a replica that never crashed.
#[tokio::test]
async fn a_crash_between_checkpoints_replays_to_the_same_state() {
    let log: Vec<Entry> = (1..=30)
        .map(|i| {
            ingest(
                i,
                i * 1_000,
                vec![delta(&format!("e{}", i % 4), T - (i as i64 % 5) * MINUTE_MS, i, i as i64)],
                vec![i as u128],
            )
        })
        .collect();
    let steady_dir = tempfile::tempdir().unwrap();
    let (steady_engine, mut steady, _) = open(steady_dir.path()).await;
    apply(&mut steady, log.clone()).await;
    let want = state_digest(&steady_engine, &steady.write_back()).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    {
        let (engine, mut sm, _) = open(dir.path()).await;
        apply(&mut sm, log[..10].to_vec()).await;
        assert!(sm.write_back().checkpoint(&engine, false).unwrap());
        apply(&mut sm, log[10..25].to_vec()).await;
        // Crash: entries 11..=25 were only in memory.
    }
    let (engine, mut sm, dedup) = open(dir.path()).await;
    assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(10)));
    assert_eq!(dedup.lock().len(), 10, "the index is the checkpoint's");
    apply(&mut sm, log[10..].to_vec()).await;
    assert_eq!(state_digest(&engine, &sm.write_back()).await.unwrap(), want);
    let total = read_stats(&engine, &sm.write_back(), None, b"e1", "view", T - DAY_MS, T + MINUTE_MS).await.unwrap();
    assert_eq!(total.total.count, (1..=30).filter(|i| i % 4 == 1).sum::<u64>());
}

#[tokio::test]
async fn expiry_removes_the_same_buckets_on_every_replica() {
    use tally_proto::time::{bucket_start, Granularity, KEEP_ALL};
    // An old minute, two days before T; the floors expire minutes before
    // the hour a day before T.
    let old = T - 2 * DAY_MS;
    let mut floors = KEEP_ALL;
    floors[0] = bucket_start(Granularity::Hour, T - DAY_MS);
    let log = || {
        vec![
            ingest(1, 1_000, vec![delta("v", old, 2, 2), delta("v", T, 1, 1)], vec![]),
            Entry { log_id: log_id(2), payload: EntryPayload::Normal(Command::Expire(floors)) },
            // A late event for the expired minute: its hour, day, month
            // and year still count it.
            ingest(3, 3_000, vec![delta("v", old, 5, 5)], vec![]),
            // Lower floors change nothing.
            Entry { log_id: log_id(4), payload: EntryPayload::Normal(Command::Expire(KEEP_ALL)) },
        ]
    };
    // Replica b writes its first entry to disk before the expiry comes.
    let ((a_dir, a_engine, a), (_b_dir, b_engine, b)) = two_replicas(log(), 1).await;

    for (engine, sm) in [(&a_engine, &a), (&b_engine, &b)] {
        let read = read_stats(engine, &sm.write_back(), None, b"v", "view", old, old + MINUTE_MS).await.unwrap();
        assert_eq!(read.total.count, 7);
        assert_eq!(read.resolution, Granularity::Hour);
        assert_eq!(
            (read.from_ms, read.to_ms),
            (bucket_start(Granularity::Hour, old), bucket_start(Granularity::Hour, old) + HOUR_MS)
        );
        let recent = read_stats(engine, &sm.write_back(), None, b"v", "view", T, T + MINUTE_MS).await.unwrap();
        assert_eq!((recent.total.count, recent.resolution), (1, Granularity::Minute));
        let minutes =
            read_series(engine, &sm.write_back(), None, b"v", "view", Granularity::Minute, old, old + MINUTE_MS)
                .await
                .unwrap();
        assert!(matches!(minutes, SeriesRead::Expired { first_kept_ms } if first_kept_ms == floors[0]));
    }
    let digest_a = state_digest(&a_engine, &a.write_back()).await.unwrap();
    assert_eq!(digest_a, state_digest(&b_engine, &b.write_back()).await.unwrap());
    // On disk: no minute bucket below the floor, in either layout.
    for engine in [&a_engine, &b_engine] {
        let cf = engine.cf(super::keys::CF_COUNTS).unwrap();
        for item in engine.db().iterator_cf(cf, rocksdb::IteratorMode::Start) {
            let (key, _) = item.unwrap();
            assert!(super::write_back::is_kept_key(&floors, &key), "expired key left on disk: {key:?}");
        }
    }
    // The floors are state: a restart keeps them.
    drop((a, a_engine));
    let (a_engine, a, _) = open(a_dir.path()).await;
    assert_eq!(a.write_back().floors(), floors);
    assert_eq!(state_digest(&a_engine, &a.write_back()).await.unwrap(), digest_a);
}

/// The dead-letter log is state like the counts: every replica keeps the
/// same records under the bounds each entry carries, whenever it
/// checkpoints, and a restart or a snapshot brings back the same log.
#[tokio::test]
async fn dead_letters_are_trimmed_alike_on_every_replica() {
    use super::entry_log::{read_page, DeadLetters};
    let bounds = LogBounds { keep_ms: 10_000, max_events: 5 };
    let log = || {
        vec![
            rejected(1, 1_000, 2, bounds),
            rejected(2, 2_000, 2, bounds),
            // 6 > 5: the oldest entry's two go (dropped, counted).
            rejected(3, 3_000, 2, bounds),
            // No dead letters, but a stamp 10 s after entry 2: it expires
            // (not counted as dropped).
            rejected(4, 12_500, 0, bounds),
            rejected(5, 13_000, 1, bounds),
        ]
    };
    let ((a_dir, a_engine, a), (_b_dir, b_engine, b)) = two_replicas(log(), 2).await;

    let digest_a = state_digest(&a_engine, &a.write_back()).await.unwrap();
    assert_eq!(digest_a, state_digest(&b_engine, &b.write_back()).await.unwrap());
    for (engine, sm) in [(&a_engine, &a), (&b_engine, &b)] {
        let (kept, dropped) = sm.logs().lock().unwrap().dead_letters.counts();
        // Entry 1 dropped for space (2), entry 2 expired; entries 3 and 5 kept.
        assert_eq!((kept, dropped), ([3, 0, 0], 2));
        let page = read_page::<DeadLetters>(engine, GROUP, None, 10).unwrap();
        let ids: Vec<_> = page.records.iter().map(|(stamp, d)| (*stamp, d.entity_id.clone())).collect();
        assert_eq!(ids, vec![(3_000, b"v3-0".to_vec()), (3_000, b"v3-1".to_vec()), (13_000, b"v5-0".to_vec())]);
        assert!(page.next.is_none());
        // Pages of two continue where the last one ended.
        let first = read_page::<DeadLetters>(engine, GROUP, None, 2).unwrap();
        assert_eq!(first.records.len(), 2);
        let second = read_page::<DeadLetters>(engine, GROUP, first.next, 2).unwrap();
        assert_eq!(second.records.iter().map(|(_, d)| d.entity_id.clone()).collect::<Vec<_>>(), vec![b"v5-0".to_vec()]);
        assert!(second.next.is_none());
    }
    // A restart reloads the same summary.
    drop((a, a_engine));
    let (a_engine, a, _) = open(a_dir.path()).await;
    assert_eq!(a.logs().lock().unwrap().dead_letters.counts(), ([3, 0, 0], 2));
    assert_eq!(state_digest(&a_engine, &a.write_back()).await.unwrap(), digest_a);
    // Bounds of 0 events turn the log off: what it held goes.
    let mut a = a;
    apply(&mut a, vec![rejected(6, 14_000, 3, LogBounds { keep_ms: 0, max_events: 0 })]).await;
    assert_eq!(a.logs().lock().unwrap().dead_letters.counts().0, [0, 0, 0]);
    state_digest(&a_engine, &a.write_back()).await.unwrap();
    assert!(read_page::<DeadLetters>(&a_engine, GROUP, None, 10).unwrap().records.is_empty());
}

/// The raw-event log holds what the counts hold: an event apply takes back
/// out (its key already counted) leaves the raw log too, so an audit of a
/// replica agrees; and the log is state, equal across replicas.
#[tokio::test]
async fn raw_events_follow_what_apply_counts() {
    use crate::command::RawEvent;
    let raw = |keyed: Option<u32>, value: i64| RawEvent {
        delta: 0,
        keyed,
        event_time_ms: T + 5,
        value: Some(value),
        event_id: vec![],
        actor_id: vec![],
    };
    let bounds = LogBounds { keep_ms: 0, max_events: 100 };
    let entry = |index: u64, keyed: Vec<KeyedEvent>, raw_events: Vec<RawEvent>, count: u64, sum: i64| Entry {
        log_id: log_id(index),
        payload: EntryPayload::Normal(Command::Ingest(IngestBatch {
            proposed_at_ms: index * 1_000,
            dedup_window_ms: 600_000,
            deltas: vec![delta("v", T, count, sum)],
            keyed,
            raw_events,
            raw_event_bounds: bounds,
            provisional: true,
            ..Default::default()
        })),
    };
    let key = |key: u128, value: i64| KeyedEvent { key, delta: 0, value };
    let log = || {
        vec![
            entry(1, vec![key(1, 2), key(2, 3)], vec![raw(Some(0), 2), raw(Some(1), 3), raw(None, 4)], 3, 9),
            // Key 1 again (a re-proposal): taken back out of counts and raw log.
            entry(2, vec![key(1, 2), key(3, 5)], vec![raw(Some(0), 2), raw(Some(1), 5)], 2, 7),
        ]
    };
    let ((_a_dir, a_engine, a), (_b_dir, b_engine, b)) = two_replicas(log(), 1).await;
    assert_eq!(
        state_digest(&a_engine, &a.write_back()).await.unwrap(),
        state_digest(&b_engine, &b.write_back()).await.unwrap()
    );
    for (engine, sm) in [(&a_engine, &a), (&b_engine, &b)] {
        assert_eq!(sm.logs().lock().unwrap().raw_events.counts(), ([4, 0, 0], 0));
        let read = super::audit::audit(engine, &sm.write_back(), b"v", "view", T, T + MINUTE_MS).await.unwrap();
        assert_eq!((read.raw_total.count, read.raw_total.sum), (4, 14));
        assert_eq!(read.raw_total, read.counted_total);
        assert!(read.differences.is_empty());
    }
}

/// The archive's seal and segments are state like the floors: a sealed
/// minute's delta is refused on every replica (its keys not recorded), no
/// bucket leaves the hot store before the archive holds it, and reads take
/// dropped buckets from the archive's file — exactly.
#[tokio::test]
async fn sealed_buckets_are_archived_before_they_expire() {
    use super::archive::ArchiveStore;
    use super::read::ArchiveAccess;
    use crate::archive_manifest::ArchiveSegment;
    use tally_proto::time::{bucket_start, Granularity};
    let old = T - 2 * DAY_MS;
    let seal = bucket_start(Granularity::Hour, T - DAY_MS);
    let late_key = 77u128;
    let mut drop_minutes = tally_proto::time::KEEP_ALL;
    drop_minutes[0] = bucket_start(Granularity::Hour, T);
    let entry = |index, command| Entry { log_id: log_id(index), payload: EntryPayload::Normal(command) };
    let sealed_log = vec![
        keyed_ingest(
            1,
            1_000,
            vec![delta("v", old, 2, 7), delta("v", T, 1, 1)],
            vec![KeyedEvent { key: 5, delta: 0, value: 3 }],
        ),
        entry(2, Command::Seal { below_ms: seal }),
        // Built before the leader saw the seal: refused at apply.
        keyed_ingest(3, 3_000, vec![delta("v", old, 1, 9)], vec![KeyedEvent { key: late_key, delta: 0, value: 9 }]),
        // Nothing is archived yet: the floors must not move.
        entry(4, Command::Expire(drop_minutes)),
    ];
    let ((a_dir, a_engine, mut a), (_b_dir, b_engine, mut b)) = two_replicas(sealed_log, 2).await;
    assert_eq!(a.write_back().floors(), tally_proto::time::KEEP_ALL, "floors wait for the archive");
    let before = read_stats(&a_engine, &a.write_back(), None, b"v", "view", old, old + MINUTE_MS).await.unwrap();
    assert_eq!((before.total.count, before.total.sum), (2, 7), "the sealed minute's late delta is not counted");

    let store = ArchiveStore::open(&a_dir.path().join("archive").to_string_lossy(), std::time::Duration::from_secs(60))
        .unwrap();
    let manifest = a.archive().get();
    let segment = store.export(&a_engine, &a.write_back(), 2, &manifest).await.unwrap().unwrap();
    assert_eq!((segment.after_ms, segment.upto_ms), (None, seal));
    // The old minute, its hour and its day end before the seal: 3 rows.
    assert_eq!(segment.rows, 3, "{segment:?}");
    let archived = vec![
        entry(5, Command::Archived(segment.clone())),
        // A repeat (a leader that crashed after committing) is appended once.
        entry(6, Command::Archived(ArchiveSegment { path: "elsewhere".into(), ..segment.clone() })),
        entry(7, Command::Expire(drop_minutes)),
    ];
    apply(&mut a, archived.clone()).await;
    apply(&mut b, archived).await;
    for (engine, sm) in [(&a_engine, &a), (&b_engine, &b)] {
        assert_eq!(sm.archive().get().segments, vec![segment.clone()]);
        assert_eq!(sm.write_back().floors()[0], seal, "minutes drop up to what the archive holds");
        let shared = sm.archive();
        let access = ArchiveAccess { manifest: &shared, store: Some(&store) };
        let read =
            read_stats(engine, &sm.write_back(), Some(access), b"v", "view", old, old + MINUTE_MS).await.unwrap();
        assert_eq!((read.total.count, read.total.sum, read.resolution), (2, 7, Granularity::Minute));
        assert_eq!(read.archive_buckets, 1);
        let all = read_stats(engine, &sm.write_back(), Some(access), b"v", "view", old - DAY_MS, T + MINUTE_MS)
            .await
            .unwrap();
        assert_eq!((all.total.count, all.resolution), (3, Granularity::Minute));
        let without = read_stats(engine, &sm.write_back(), None, b"v", "view", old, old + MINUTE_MS).await.unwrap();
        assert_eq!(without.resolution, Granularity::Hour, "without the archive, the kept hour answers");
    }
    assert_eq!(
        state_digest(&a_engine, &a.write_back()).await.unwrap(),
        state_digest(&b_engine, &b.write_back()).await.unwrap()
    );
    // The refused event's key was not recorded: a corrected retry is new.
    drop((a, a_engine));
    let (_engine, a, dedup) = open(a_dir.path()).await;
    assert!(!dedup.lock().contains(&late_key));
    assert!(dedup.lock().contains(&5));
    assert_eq!(a.archive().get().segments, vec![segment]);
}

#[tokio::test]
async fn a_spread_entity_is_counted_at_home_only_before_its_start() {
    let entry = |index, command| Entry { log_id: log_id(index), payload: EntryPayload::Normal(command) };
    let (hot_key, late_key, other_key) = (41u128, 42u128, 43u128);
    let log = vec![
        // The home counted up to minute T + 2 min.
        keyed_ingest(
            1,
            1_000,
            vec![delta("hot", T, 1, 1), delta("hot", T + 2 * MINUTE_MS, 1, 1)],
            vec![KeyedEvent { key: 1, delta: 1, value: 1 }],
        ),
        // Asked from T: fixed at the first minute not counted, T + 3 min.
        entry(2, Command::Spread { entity_id: b"hot".to_vec(), from_ms: T }),
        // A repeat changes nothing.
        entry(3, Command::Spread { entity_id: b"hot".to_vec(), from_ms: T + DAY_MS }),
        // Built before the leader saw the spread: the delta at T + 3 min is
        // refused, its key not recorded; the late one and another entity's
        // are counted.
        keyed_ingest(
            4,
            4_000,
            vec![delta("hot", T + 3 * MINUTE_MS, 2, 5), delta("hot", T + MINUTE_MS, 1, 1), delta("cold", T, 1, 1)],
            vec![
                KeyedEvent { key: hot_key, delta: 0, value: 2 },
                KeyedEvent { key: late_key, delta: 1, value: 1 },
                KeyedEvent { key: other_key, delta: 2, value: 1 },
            ],
        ),
    ];
    let ((a_dir, a_engine, a), (_b_dir, b_engine, b)) = two_replicas(log, 3).await;
    for (engine, sm) in [(&a_engine, &a), (&b_engine, &b)] {
        let moved = sm.moved().get();
        assert_eq!(moved.moved.get(b"hot".as_slice()), Some(&(T + 3 * MINUTE_MS)));
        assert_eq!(moved.latest_minute_ms, Some(T + 2 * MINUTE_MS), "the refused delta is not counted");
        let hot = read_stats(engine, &sm.write_back(), None, b"hot", "view", T, T + DAY_MS).await.unwrap();
        assert_eq!((hot.total.count, hot.total.sum), (3, 3));
        let cold = read_stats(engine, &sm.write_back(), None, b"cold", "view", T, T + DAY_MS).await.unwrap();
        assert_eq!(cold.total.count, 1);
    }
    assert_eq!(
        state_digest(&a_engine, &a.write_back()).await.unwrap(),
        state_digest(&b_engine, &b.write_back()).await.unwrap()
    );
    drop((a, a_engine));
    let (_engine, a, dedup) = open(a_dir.path()).await;
    assert!(!dedup.lock().contains(&hot_key), "a refused event's key is free for its new partition");
    assert!(dedup.lock().contains(&late_key) && dedup.lock().contains(&other_key));
    assert_eq!(a.moved().get().moved.get(b"hot".as_slice()), Some(&(T + 3 * MINUTE_MS)), "survives a restart");
}

#[tokio::test]
async fn a_split_moves_the_ranges_state_to_the_child_at_its_entry() {
    use crate::moved::MovedRange;
    use tally_proto::routing::{range_key, slot_last};
    const CHILD: u32 = 7;
    let child_group = tally_proto::partition::group_of_partition(CHILD);
    let slots = 4;
    let slot = GROUP - 1;
    let lo = slot_last(slots) / 2 + 1;
    let range = MovedRange { slots, slot, lo, last: slot_last(slots), to: CHILD };
    // Entities of the parent's slot, on both sides of the split.
    let entities: Vec<String> =
        (0..400).map(|i| format!("e{i}")).filter(|e| range_key(e.as_bytes(), slots).0 == slot).collect();
    let (moving, staying): (Vec<&String>, Vec<&String>) = entities.iter().partition(|e| range.contains(e.as_bytes()));
    assert!(moving.len() >= 3 && staying.len() >= 3);
    let entry = |index, command| Entry { log_id: log_id(index), payload: EntryPayload::Normal(command) };
    let voters = openraft::Membership::new_with_defaults(vec![[1u64, 2, 3].into_iter().collect()], []);
    let key = |i: usize| 1_000 + i as u128;
    let before: Vec<MinuteDelta> =
        moving.iter().take(3).chain(staying.iter().take(3)).map(|e| delta(e, T, 2, 3)).collect();
    let keyed: Vec<KeyedEvent> =
        (0..before.len()).map(|i| KeyedEvent { key: key(i), delta: i as u32, value: 1 }).collect();
    let log = vec![
        Entry { log_id: log_id(1), payload: EntryPayload::Membership(voters) },
        keyed_ingest(2, 1_000, before.clone(), keyed),
        entry(3, Command::Split(range)),
        // A repeat changes nothing.
        entry(4, Command::Split(range)),
        // After it: a delta of the range is refused, the other counted.
        keyed_ingest(
            5,
            5_000,
            vec![delta(moving[0], T, 5, 5), delta(staying[0], T, 5, 5)],
            vec![KeyedEvent { key: 9_000, delta: 0, value: 5 }, KeyedEvent { key: 9_001, delta: 1, value: 5 }],
        ),
    ];
    // One replica checkpoints just before the split, the other in one go.
    let ((a_dir, a_engine, a), (b_dir, b_engine, b)) = two_replicas(log, 2).await;
    let mut child_digests = Vec::new();
    for (dir, engine, sm) in [(&a_dir, &a_engine, &a), (&b_dir, &b_engine, &b)] {
        assert_eq!(sm.moved().get().split_to(moving[0].as_bytes()), Some(CHILD));
        for e in &moving {
            let r = read_stats(engine, &sm.write_back(), None, e.as_bytes(), "view", T, T + DAY_MS).await.unwrap();
            assert_eq!(r.total.count, 0, "{e} left the parent");
        }
        let kept =
            read_stats(engine, &sm.write_back(), None, staying[0].as_bytes(), "view", T, T + DAY_MS).await.unwrap();
        assert_eq!(kept.total.count, 2 + 5);
        // The child, opened on the same node, starts from the parent's state
        // at the split: the range's counts, the whole dedup window, applied
        // its first entry, the parent's voters.
        let child_dedup = Arc::new(DedupIndex::default());
        let mut child = GroupStateMachine::open(
            engine.clone(),
            child_group,
            &dir.path().join("snapshots"),
            child_dedup.clone(),
            None,
        )
        .await
        .unwrap();
        let (applied, membership) = child.applied_state().await.unwrap();
        assert_eq!(applied, Some(super::split::initial_log_id()));
        assert_eq!(membership.voter_ids().collect::<Vec<_>>(), vec![1, 2, 3]);
        for d in before.iter().filter(|d| range.contains(&d.entity_id)) {
            let r = read_stats(engine, &child.write_back(), None, &d.entity_id, "view", T, T + DAY_MS).await.unwrap();
            assert_eq!((r.total.count, r.total.sum), (2, 3));
        }
        let stayed =
            read_stats(engine, &child.write_back(), None, staying[0].as_bytes(), "view", T, T + DAY_MS).await.unwrap();
        assert_eq!(stayed.total.count, 0, "the other half stays in the parent");
        assert!((0..before.len()).all(|i| child_dedup.lock().contains(&key(i))), "the dedup window goes along");
        assert!(!child_dedup.lock().contains(&9_000), "refused after the split: not recorded");
        child_digests.push(state_digest(engine, &child.write_back()).await.unwrap());
    }
    assert_eq!(child_digests[0], child_digests[1], "every replica seeds the same child");
    assert_eq!(
        state_digest(&a_engine, &a.write_back()).await.unwrap(),
        state_digest(&b_engine, &b.write_back()).await.unwrap()
    );
    drop((a, a_engine));
    let (_engine, a, _) = open(a_dir.path()).await;
    assert_eq!(a.moved().get().split_to(moving[0].as_bytes()), Some(CHILD), "survives a restart");
}
