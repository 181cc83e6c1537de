//! One RocksDB per node, shared by every Raft group on it, and the threads
//! that keep RocksDB off the tokio workers.
//!
//! A node runs up to ~1,000 groups on 2 tokio workers: a RocksDB call that
//! stalls (a write stall, a slow disk, an fsync) on a worker would stall
//! heartbeats, acks and reads of every group. So no storage call runs on a
//! worker:
//!
//! * **Writes of the Raft log** (appends, votes, truncations, purges, the
//!   committed id) go through one FIFO *log writer* thread, over a bounded
//!   queue ([`WRITE_QUEUE_CAPACITY`]). The caller builds and encodes the
//!   write batch (CPU only) and hands it over; the writer writes it
//!   unsynced — readable at once — and passes whoever waits for durability
//!   on to the *WAL syncer*. One thread for every group keeps a group's
//!   writes in the order they were made (a truncation is never overtaken by
//!   an earlier append of the same group, nor the other way round).
//! * **Durability is batched across groups**: the WAL syncer thread takes
//!   everything queued since its last fsync ([`SYNC_QUEUE_CAPACITY`] at
//!   most), fsyncs the write-ahead log once (`flush_wal(true)`), and only
//!   then completes the waiters — openraft's append callbacks and the
//!   votes and truncations waiting in [`Engine::write_durable`]. Under load
//!   one fsync covers appends of many groups, and nothing is acknowledged
//!   before it is on disk. The writer never waits for an fsync, so an
//!   append returns (its entries readable, as openraft requires of
//!   `append`) after a queue hop and a memtable insert, not after a disk
//!   flush.
//! * **Everything else** (log reads, state machine apply, snapshot install,
//!   query reads) runs through [`Engine::blocking`] on tokio's blocking
//!   pool, at most [`BLOCKING_PERMITS`] calls at once; further callers wait
//!   asynchronously for a permit, so that queue is bounded by the callers
//!   themselves (openraft tasks and admitted API requests), never by an
//!   unbounded spawn queue. The blocking pool rather than a dedicated
//!   thread: reads are independent and concurrent (RocksDB reads are
//!   thread-safe), one slow scan must not hold up every other group's
//!   reads, and the pool grows and shrinks with demand. Snapshot installs,
//!   which take seconds, have permits of their own
//!   ([`Engine::blocking_bulk`]). Apply is ordered per group because each
//!   state machine awaits its chunk before the next.
//!
//! [`Engine::write`] and [`Engine::write_synced`] write on the calling
//! thread: for code already on the blocking pool (apply, install) and for
//! rare administrative deletes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::{path::Path, sync::Arc, thread};

use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::counts::merge_counts;
use super::keys::{CF_COUNTS, CF_LOG, CF_RAFT, CF_STATE, CF_UNIQUES};
use super::StorageError;
use crate::stages::{Stage, Timer};
use crate::type_config::TypeConfig;

/// Write requests waiting for the log writer; senders wait (backpressure)
/// when it is full. Each group's Raft core has at most a few requests in it
/// at once (it awaits each write), so this is about one per group.
const WRITE_QUEUE_CAPACITY: usize = 1024;
/// Writes waiting for an fsync; the writer waits when it is full. Also the
/// most one fsync round completes.
const SYNC_QUEUE_CAPACITY: usize = 16 * 1024;
/// Storage calls on tokio's blocking pool at once, short ones and long ones
/// ([`Engine::blocking_bulk`]); together well below the runtime's
/// `max_blocking_threads` (`main.rs`), so `tokio::fs` and DNS keep threads.
pub const BLOCKING_PERMITS: usize = 32;
pub const BULK_PERMITS: usize = 4;

pub struct Engine {
    db: Arc<DB>,
    writer: LogWriter,
    blocking_permits: Arc<Semaphore>,
    bulk_permits: Arc<Semaphore>,
    fsyncs: Arc<AtomicU64>,
}

impl Engine {
    pub fn open(path: &Path) -> Result<Arc<Engine>, StorageError> {
        std::fs::create_dir_all(path).map_err(|e| StorageError::Io(format!("create {}: {e}", path.display())))?;
        // RocksDB's settings, for the machine Tally is benchmarked on (3
        // nodes sharing 2 cores) and anything larger; every other option is
        // RocksDB's default, on purpose (measured: no default showed up as
        // a cost in `perf` once apply moved to memory, see BENCHMARKS.md).
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        // Flushes and compactions together at most 2 threads per node: on
        // 2 cores shared by 3 nodes, more would only preempt the Raft path;
        // fewer lets L0 pile up into write stalls at saturation.
        db_opts.set_max_background_jobs(2);
        // Flushed and compacted SST files are synced incrementally (every
        // MiB) rather than all at the end, so the disk never has hundreds of
        // MiB of dirty pages to push at once: the WAL syncer's fsyncs, which
        // acknowledgements wait for, do not queue behind them.
        db_opts.set_bytes_per_sync(1 << 20);
        // RocksDB's own info logs: three files are enough to debug with
        // and keep a node's data directory from growing with them.
        db_opts.set_keep_log_file_num(3);

        // The Raft log and the counts compress well (repeated entity ids,
        // small integers); LZ4 costs little CPU, unlike zstd at this rate.
        let mut log_opts = Options::default();
        log_opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        let mut counts_opts = Options::default();
        // Checkpoints add deltas to buckets without reading them first.
        counts_opts.set_merge_operator_associative("tally_counts", merge_counts);
        counts_opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        let mut uniques_opts = Options::default();
        uniques_opts.set_merge_operator_associative("tally_uniques", super::sketch::merge_sketches);
        uniques_opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_LOG, log_opts),
            ColumnFamilyDescriptor::new(CF_RAFT, Options::default()),
            ColumnFamilyDescriptor::new(CF_STATE, Options::default()),
            ColumnFamilyDescriptor::new(CF_COUNTS, counts_opts),
            ColumnFamilyDescriptor::new(CF_UNIQUES, uniques_opts),
        ];
        let db = Arc::new(DB::open_cf_descriptors(&db_opts, path, cfs)?);
        let fsyncs = Arc::new(AtomicU64::new(0));
        let writer = LogWriter::start(db.clone(), fsyncs.clone())?;
        Ok(Arc::new(Engine {
            db,
            writer,
            blocking_permits: Arc::new(Semaphore::new(BLOCKING_PERMITS)),
            bulk_permits: Arc::new(Semaphore::new(BULK_PERMITS)),
            fsyncs,
        }))
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

    /// fsyncs of the write-ahead log made by the WAL syncer so far.
    pub fn fsync_count(&self) -> u64 {
        self.fsyncs.load(Ordering::Relaxed)
    }

    /// Run a storage call on tokio's blocking pool (see the module docs);
    /// waits for one of [`BLOCKING_PERMITS`] first. The call runs to its end
    /// even if the returned future is dropped.
    pub async fn blocking<T, F>(self: &Arc<Self>, f: F) -> Result<T, StorageError>
    where
        F: FnOnce(&Engine) -> Result<T, StorageError> + Send + 'static,
        T: Send + 'static,
    {
        self.run_blocking(&self.blocking_permits, f).await
    }

    /// [`Engine::blocking`] for calls that take long (a snapshot install:
    /// seconds of file reads and writes), with permits of their own
    /// ([`BULK_PERMITS`]), so a wave of installs never holds up the short
    /// reads and applies of every other group.
    pub async fn blocking_bulk<T, F>(self: &Arc<Self>, f: F) -> Result<T, StorageError>
    where
        F: FnOnce(&Engine) -> Result<T, StorageError> + Send + 'static,
        T: Send + 'static,
    {
        self.run_blocking(&self.bulk_permits, f).await
    }

    async fn run_blocking<T, F>(self: &Arc<Self>, permits: &Arc<Semaphore>, f: F) -> Result<T, StorageError>
    where
        F: FnOnce(&Engine) -> Result<T, StorageError> + Send + 'static,
        T: Send + 'static,
    {
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StorageError::Io("storage blocking pool closed".into()))?;
        let engine = self.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            f(&engine)
        })
        .await
        .map_err(|e| StorageError::Io(format!("storage call on the blocking pool: {e}")))?
    }

    /// Write without fsync on the calling thread: visible to readers at
    /// once, durable after the next fsync. Blocking: not for async code.
    pub fn write(&self, batch: WriteBatch) -> Result<(), StorageError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(false);
        self.db.write_opt(batch, &opts)?;
        Ok(())
    }

    /// Write and fsync on the calling thread. Blocking: not for async code.
    pub fn write_synced(&self, batch: WriteBatch) -> Result<(), StorageError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(batch, &opts)?;
        Ok(())
    }

    /// A log append: returns once the batch is written (readable); openraft's
    /// `callback` is completed after the fsync that covers it.
    pub async fn append(
        &self,
        batch: WriteBatch,
        callback: openraft::storage::IOFlushed<TypeConfig>,
    ) -> Result<(), StorageError> {
        let (written, rx) = oneshot::channel();
        self.writer
            .submit(WriteRequest {
                batch: Some(batch),
                written: Some(written),
                durable: Some(SyncWaiter::Raft(callback)),
            })
            .await?;
        rx.await.map_err(|_| writer_stopped())?
    }

    /// Write through the log writer, in order with the log's other writes;
    /// returns once written (readable), not yet durable.
    pub async fn write_queued(&self, batch: WriteBatch) -> Result<(), StorageError> {
        let (written, rx) = oneshot::channel();
        self.writer.submit(WriteRequest { batch: Some(batch), written: Some(written), durable: None }).await?;
        rx.await.map_err(|_| writer_stopped())?
    }

    /// Write through the log writer and return once the batch is on disk.
    pub async fn write_durable(&self, batch: WriteBatch) -> Result<(), StorageError> {
        self.durable(Some(batch)).await
    }

    /// Resolves once everything written so far — directly or queued to the
    /// log writer before this call — is on disk.
    pub async fn sync(&self) -> Result<(), StorageError> {
        self.durable(None).await
    }

    async fn durable(&self, batch: Option<WriteBatch>) -> Result<(), StorageError> {
        let (tx, rx) = oneshot::channel();
        self.writer.submit(WriteRequest { batch, written: None, durable: Some(SyncWaiter::Oneshot(tx)) }).await?;
        rx.await.map_err(|_| writer_stopped())?
    }

    /// Tests: stop the WAL syncer (behind every request queued so far) until
    /// the returned sender is used or dropped, so requests pile up for it.
    #[cfg(test)]
    pub(crate) async fn hold_syncer(&self) -> Result<std::sync::mpsc::Sender<()>, StorageError> {
        let (release, held) = std::sync::mpsc::channel();
        let (written, rx) = oneshot::channel();
        self.writer
            .submit(WriteRequest { batch: None, written: Some(written), durable: Some(SyncWaiter::Hold(held)) })
            .await?;
        rx.await.map_err(|_| writer_stopped())??;
        Ok(release)
    }
}

fn writer_stopped() -> StorageError {
    StorageError::Io("log writer stopped".into())
}

/// One request to the log writer.
struct WriteRequest {
    /// None: nothing to write (a sync barrier).
    batch: Option<WriteBatch>,
    /// Told once the batch is written, before it is durable.
    written: Option<oneshot::Sender<Result<(), StorageError>>>,
    /// Completed after the fsync that covers the batch.
    durable: Option<SyncWaiter>,
}

enum SyncWaiter {
    Raft(openraft::storage::IOFlushed<TypeConfig>),
    Oneshot(oneshot::Sender<Result<(), StorageError>>),
    /// Tests: the syncer stops here until the sender side is used or dropped.
    #[cfg(test)]
    Hold(std::sync::mpsc::Receiver<()>),
}

impl SyncWaiter {
    fn complete(self, result: Result<(), &str>) {
        match self {
            SyncWaiter::Raft(cb) => cb.io_completed(result.map_err(std::io::Error::other)),
            SyncWaiter::Oneshot(tx) => {
                let _ = tx.send(result.map_err(|e| StorageError::Io(e.to_string())));
            }
            #[cfg(test)]
            SyncWaiter::Hold(_) => {}
        }
    }
}

/// The log writer and WAL syncer threads.
struct LogWriter {
    tx: Option<mpsc::Sender<WriteRequest>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Drop for LogWriter {
    /// Closing the queue ends the writer, whose end closes the syncer's queue
    /// and ends it after a last fsync; joining them releases their handles on
    /// the database, so the directory can be reopened.
    fn drop(&mut self) {
        self.tx.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl LogWriter {
    fn start(db: Arc<DB>, fsyncs: Arc<AtomicU64>) -> Result<LogWriter, StorageError> {
        let (tx, rx) = mpsc::channel::<WriteRequest>(WRITE_QUEUE_CAPACITY);
        let (sync_tx, sync_rx) = mpsc::channel::<SyncWaiter>(SYNC_QUEUE_CAPACITY);
        let syncer_db = db.clone();
        let syncer = thread::Builder::new()
            .name("tally-wal-sync".into())
            .spawn(move || run_syncer(&syncer_db, sync_rx, &fsyncs))
            .map_err(|e| StorageError::Io(format!("spawn WAL syncer: {e}")))?;
        // If this spawn fails, dropping `sync_tx` ends the syncer at once.
        let writer = thread::Builder::new()
            .name("tally-log-writer".into())
            .spawn(move || run_writer(&db, rx, sync_tx))
            .map_err(|e| StorageError::Io(format!("spawn log writer: {e}")))?;
        // Writer first: the syncer ends only once the writer has.
        Ok(LogWriter { tx: Some(tx), threads: vec![writer, syncer] })
    }

    async fn submit(&self, request: WriteRequest) -> Result<(), StorageError> {
        let tx = self.tx.as_ref().ok_or_else(writer_stopped)?;
        tx.send(request).await.map_err(|_| writer_stopped())
    }
}

/// Writes each request in arrival order, unsynced, then hands its durability
/// waiter to the syncer: the write happened before the waiter is queued, so
/// the syncer's next fsync covers it.
fn run_writer(db: &DB, mut rx: mpsc::Receiver<WriteRequest>, syncer: mpsc::Sender<SyncWaiter>) {
    let mut opts = WriteOptions::default();
    opts.set_sync(false);
    while let Some(request) = rx.blocking_recv() {
        let result = match request.batch {
            Some(batch) => {
                let _timer = Timer::start(Stage::LogWrite);
                db.write_opt(batch, &opts).map_err(|e| e.to_string())
            }
            None => Ok(()),
        };
        if let Err(e) = &result {
            tracing::error!(error = %e, "log write failed");
        }
        if let Some(written) = request.written {
            let _ = written.send(result.clone().map_err(StorageError::Io));
        }
        match (request.durable, result) {
            (Some(waiter), Ok(())) => {
                if let Err(mpsc::error::SendError(waiter)) = syncer.blocking_send(waiter) {
                    waiter.complete(Err("WAL syncer stopped"));
                }
            }
            (Some(waiter), Err(e)) => waiter.complete(Err(&e)),
            (None, _) => {}
        }
    }
}

/// One fsync for everything queued since the last one, then completes it all.
fn run_syncer(db: &DB, mut rx: mpsc::Receiver<SyncWaiter>, fsyncs: &AtomicU64) {
    let mut waiters = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        let mut next = Some(first);
        while let Some(waiter) = next {
            match waiter {
                #[cfg(test)]
                SyncWaiter::Hold(held) => {
                    let _ = held.recv();
                }
                waiter => waiters.push(waiter),
            }
            next = if waiters.len() < SYNC_QUEUE_CAPACITY { rx.try_recv().ok() } else { None };
        }
        if waiters.is_empty() {
            continue;
        }
        // Every waiter's write happened before it was queued, so this one
        // fsync covers all of them.
        let fsync = Timer::start(Stage::LogFsync);
        let result = db.flush_wal(true).map_err(|e| e.to_string());
        drop(fsync);
        fsyncs.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = &result {
            tracing::error!(error = %e, "WAL fsync failed");
        }
        for w in waiters.drain(..) {
            w.complete(result.as_ref().map(|_| ()).map_err(String::as_str));
        }
    }
}
