//! The log writer and WAL syncer (`engine.rs`) behind the log storage:
//! durability batched across groups, votes durable on return.

use futures::FutureExt;
use openraft::impls::leader_id_adv::LeaderId;
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::type_config::TypeConfigExt;
use openraft::{EntryPayload, RaftLogReader};

use super::log_store::LogStore;
use super::Engine;
use crate::type_config::{Entry, LogId, TypeConfig, Vote};

fn blank(index: u64) -> Entry {
    Entry { log_id: LogId { leader_id: LeaderId { term: 1, node_id: 1 }, index }, payload: EntryPayload::Blank }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_of_many_groups_queued_together_share_one_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(&dir.path().join("db")).unwrap();
    engine.sync().await.unwrap();
    let before = engine.fsync_count();

    // The syncer stops behind everything queued so far; appends pile up.
    let release = engine.hold_syncer().await.unwrap();
    let mut flushed = Vec::new();
    for group in 1..=5u32 {
        let mut log = LogStore::new(engine.clone(), group);
        let (tx, rx) = TypeConfig::oneshot();
        log.append([blank(1), blank(2)], IOFlushed::signal(tx)).await.unwrap();
        // Readable as soon as append returns, as openraft requires...
        assert_eq!(log.try_get_log_entries(1..3).await.unwrap().len(), 2);
        flushed.push(rx);
    }
    // ...but not acknowledged before an fsync covers it.
    for rx in &mut flushed {
        assert!(rx.now_or_never().is_none(), "append acknowledged before its fsync");
    }
    assert_eq!(engine.fsync_count(), before);

    drop(release);
    for rx in flushed {
        rx.await.unwrap().unwrap();
    }
    assert_eq!(engine.fsync_count(), before + 1, "one fsync for the five groups' appends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vote_is_durable_when_save_vote_returns() {
    let dir = tempfile::tempdir().unwrap();
    let vote = Vote::new(7, 3);
    {
        let engine = Engine::open(&dir.path().join("db")).unwrap();
        let before = engine.fsync_count();
        let mut log = LogStore::new(engine.clone(), 4);
        log.save_vote(&vote).await.unwrap();
        assert!(engine.fsync_count() > before, "save_vote returned before an fsync");
        // Truncation waits for its fsync too, in order with the appends.
        let (tx, rx) = TypeConfig::oneshot();
        log.append([blank(1), blank(2), blank(3)], IOFlushed::signal(tx)).await.unwrap();
        log.truncate_after(Some(blank(1).log_id)).await.unwrap();
        rx.await.unwrap().unwrap();
    }
    let engine = Engine::open(&dir.path().join("db")).unwrap();
    let mut log = LogStore::new(engine, 4);
    assert_eq!(log.read_vote().await.unwrap(), Some(vote));
    assert_eq!(log.get_log_state().await.unwrap().last_log_id, Some(blank(1).log_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_read_ahead_at_open_is_served_once_and_never_stale() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(&dir.path().join("db")).unwrap();
    let vote = Vote::new(3, 2);
    {
        let mut log = LogStore::new(engine.clone(), 9);
        log.save_vote(&vote).await.unwrap();
        let (tx, rx) = TypeConfig::oneshot();
        log.append([blank(1), blank(2)], IOFlushed::signal(tx)).await.unwrap();
        rx.await.unwrap().unwrap();
        log.save_committed(Some(blank(1).log_id)).await.unwrap();
    }
    let mut log = LogStore::open(engine.clone(), 9).await.unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(vote));
    assert_eq!(log.read_committed().await.unwrap(), Some(blank(1).log_id));
    assert_eq!(log.get_log_state().await.unwrap().last_log_id, Some(blank(2).log_id));
    // After a write, reads see the store, not what was read ahead.
    let newer = Vote::new(4, 1);
    log.save_vote(&newer).await.unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(newer));
    log.truncate_after(Some(blank(1).log_id)).await.unwrap();
    assert_eq!(log.get_log_state().await.unwrap().last_log_id, Some(blank(1).log_id));
}
