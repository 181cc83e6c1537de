//! One RocksDB per node, shared by every Raft group on it.
//!
//! Durability is batched across groups: a log append is written to RocksDB
//! without sync (so it is readable at once) and its completion callback is
//! handed to the [`WalSyncer`], a thread that fsyncs the write-ahead log once
//! for everything queued since its last fsync and only then tells openraft
//! the entries are durable. Under load one fsync covers appends of many
//! groups, and nothing is acknowledged before it is on disk.

use std::{path::Path, sync::Arc, thread};

use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};
use tokio::sync::{mpsc, oneshot};

use super::counts::merge_counts;
use super::keys::{CF_COUNTS, CF_LOG, CF_RAFT, CF_STATE};
use super::StorageError;
use crate::raft::types::TypeConfig;

/// Waiting fsync requests; senders wait (backpressure) when it is full.
const SYNC_QUEUE_CAPACITY: usize = 16 * 1024;

pub struct Engine {
    db: Arc<DB>,
    syncer: WalSyncer,
}

impl Engine {
    pub fn open(path: &Path) -> Result<Arc<Engine>, StorageError> {
        std::fs::create_dir_all(path).map_err(|e| StorageError::Io(format!("create {}: {e}", path.display())))?;
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(2);
        db_opts.set_bytes_per_sync(1 << 20);
        db_opts.set_keep_log_file_num(3);

        let mut log_opts = Options::default();
        log_opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        let mut counts_opts = Options::default();
        counts_opts.set_merge_operator_associative("tally_counts", merge_counts);
        counts_opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_LOG, log_opts),
            ColumnFamilyDescriptor::new(CF_RAFT, Options::default()),
            ColumnFamilyDescriptor::new(CF_STATE, Options::default()),
            ColumnFamilyDescriptor::new(CF_COUNTS, counts_opts),
        ];
        let db = Arc::new(DB::open_cf_descriptors(&db_opts, path, cfs)?);
        let syncer = WalSyncer::start(db.clone())?;
        Ok(Arc::new(Engine { db, syncer }))
    }

    pub fn db(&self) -> &DB {
        &self.db
    }

    pub fn shared_db(&self) -> Arc<DB> {
        self.db.clone()
    }

    pub fn cf(&self, name: &str) -> Result<&ColumnFamily, StorageError> {
        self.db.cf_handle(name).ok_or_else(|| StorageError::Corrupt(format!("missing column family {name}")))
    }

    /// Write without fsync: visible to readers at once, durable after the
    /// next [`Engine::sync`] or syncer round.
    pub fn write(&self, batch: WriteBatch) -> Result<(), StorageError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(false);
        self.db.write_opt(batch, &opts)?;
        Ok(())
    }

    /// Resolves once everything written so far is on disk.
    pub async fn sync(&self) -> Result<(), StorageError> {
        let (tx, rx) = oneshot::channel();
        self.syncer.submit(SyncWaiter::Oneshot(tx)).await?;
        rx.await.map_err(|_| StorageError::Io("WAL syncer stopped".into()))?.map_err(|e| StorageError::Io(e.to_string()))
    }

    /// Queue openraft's completion callback behind the next fsync.
    pub async fn sync_then(&self, callback: openraft::storage::IOFlushed<TypeConfig>) -> Result<(), StorageError> {
        self.syncer.submit(SyncWaiter::Raft(callback)).await
    }
}

enum SyncWaiter {
    Raft(openraft::storage::IOFlushed<TypeConfig>),
    Oneshot(oneshot::Sender<Result<(), std::io::Error>>),
}

impl SyncWaiter {
    fn complete(self, result: &Result<(), rocksdb::Error>) {
        let result = result.as_ref().map(|_| ()).map_err(|e| std::io::Error::other(e.to_string()));
        match self {
            SyncWaiter::Raft(cb) => cb.io_completed(result),
            SyncWaiter::Oneshot(tx) => {
                let _ = tx.send(result);
            }
        }
    }
}

struct WalSyncer {
    tx: Option<mpsc::Sender<SyncWaiter>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Drop for WalSyncer {
    /// Closing the queue ends the thread after a last fsync; joining it
    /// releases its handle on the database, so the directory can be reopened.
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl WalSyncer {
    fn start(db: Arc<DB>) -> Result<WalSyncer, StorageError> {
        let (tx, mut rx) = mpsc::channel::<SyncWaiter>(SYNC_QUEUE_CAPACITY);
        let thread = thread::Builder::new()
            .name("tally-wal-sync".into())
            .spawn(move || {
                let mut waiters = Vec::new();
                while let Some(first) = rx.blocking_recv() {
                    waiters.push(first);
                    while let Ok(more) = rx.try_recv() {
                        waiters.push(more);
                    }
                    // Every waiter's write happened before it was queued, so
                    // this one fsync covers all of them.
                    let result = db.flush_wal(true);
                    if let Err(e) = &result {
                        tracing::error!(error = %e, "WAL fsync failed");
                    }
                    for w in waiters.drain(..) {
                        w.complete(&result);
                    }
                }
            })
            .map_err(|e| StorageError::Io(format!("spawn WAL syncer: {e}")))?;
        Ok(WalSyncer { tx: Some(tx), thread: Some(thread) })
    }

    async fn submit(&self, waiter: SyncWaiter) -> Result<(), StorageError> {
        let tx = self.tx.as_ref().ok_or_else(|| StorageError::Io("WAL syncer stopped".into()))?;
        tx.send(waiter).await.map_err(|_| StorageError::Io("WAL syncer stopped".into()))
    }
}
