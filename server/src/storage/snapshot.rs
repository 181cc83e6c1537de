//! Snapshot files: a group's state machine streamed out of a RocksDB
//! snapshot into a file, sent to peers chunk by chunk, and loaded back in
//! bounded write batches. No step holds a whole snapshot in memory.
//!
//! File layout: `TALLYSNAP1`, u32 header length, header (encoded
//! [`SnapshotMeta`]), then records `cf u8, key len u32, key, value len u32,
//! value`, ended by a zero byte.

use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use rocksdb::{IteratorMode, ReadOptions, WriteBatch, DB};

use super::codec::{decode, encode};
use super::keys::{self, CF_COUNTS, CF_STATE, CF_UNIQUES, STATE_INSTALLING};
use super::{Engine, StorageError};
use crate::type_config::SnapshotMeta;

const MAGIC: &[u8] = b"TALLYSNAP1";
const RECORD_STATE: u8 = 1;
const RECORD_COUNTS: u8 = 2;
const RECORD_UNIQUES: u8 = 3;
const END: u8 = 0;
/// Flush the install batch past this many bytes.
const INSTALL_BATCH_BYTES: usize = 4 << 20;
/// Snapshot files kept per group (the newest may be mid-transfer to a peer
/// while a newer one is built).
const KEEP_FILES: usize = 2;

/// The snapshot data openraft passes around: a path to a finished file.
#[derive(Debug, Clone)]
pub struct SnapshotFile {
    pub path: PathBuf,
}

/// Where one group's snapshot files live.
#[derive(Debug, Clone)]
pub struct SnapshotDir {
    dir: PathBuf,
}

impl SnapshotDir {
    pub fn new(root: &Path, group: u32) -> Result<SnapshotDir, StorageError> {
        let dir = root.join(format!("g{group}"));
        fs::create_dir_all(&dir)?;
        Ok(SnapshotDir { dir })
    }

    /// A fresh file name for an incoming or in-progress snapshot.
    pub fn temp_path(&self) -> PathBuf {
        self.dir.join(format!("tmp-{}.snap", rand::random::<u64>()))
    }

    fn final_path(&self, meta: &SnapshotMeta) -> PathBuf {
        let (term, index) = meta.last_log_id.map(|l| (l.leader_id.term, l.index)).unwrap_or((0, 0));
        self.dir.join(format!("snap-{index:020}-{term:020}.snap"))
    }

    /// Move a complete file into place as the newest snapshot and drop old ones.
    /// A file from elsewhere (another group's directory, in tests) is
    /// copied, never taken away from its owner.
    pub fn publish(&self, file: &Path, meta: &SnapshotMeta) -> Result<PathBuf, StorageError> {
        let dest = self.final_path(meta);
        if file.parent() == Some(self.dir.as_path()) {
            fs::rename(file, &dest)?;
        } else {
            let temp = self.temp_path();
            fs::copy(file, &temp)?;
            fs::rename(&temp, &dest)?;
        }
        let mut files = self.finished_files()?;
        while files.len() > KEEP_FILES {
            let oldest = files.remove(0);
            let _ = fs::remove_file(oldest);
        }
        Ok(dest)
    }

    /// Finished snapshot files, oldest first (names sort by log index).
    fn finished_files(&self) -> Result<Vec<PathBuf>, StorageError> {
        let mut files: Vec<PathBuf> = fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("snap-")))
            .collect();
        files.sort();
        Ok(files)
    }

    pub fn newest(&self) -> Result<Option<(SnapshotMeta, PathBuf)>, StorageError> {
        match self.finished_files()?.pop() {
            Some(path) => Ok(Some((read_meta(&path)?, path))),
            None => Ok(None),
        }
    }

    /// Remove leftovers of builds or transfers interrupted by a crash.
    pub fn remove_temp_files(&self) -> Result<(), StorageError> {
        for entry in fs::read_dir(&self.dir)?.flatten() {
            if entry.file_name().to_str().is_some_and(|n| n.starts_with("tmp-")) {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(())
    }
}

pub fn read_meta(path: &Path) -> Result<SnapshotMeta, StorageError> {
    let mut r = BufReader::new(File::open(path)?);
    read_header(&mut r)
}

fn read_header(r: &mut impl Read) -> Result<SnapshotMeta, StorageError> {
    let mut magic = [0u8; MAGIC.len()];
    r.read_exact(&mut magic)?;
    if magic != MAGIC {
        return Err(StorageError::Corrupt("not a Tally snapshot file".into()));
    }
    let header = read_block(r)?;
    decode(&header)
}

fn read_block(r: &mut impl Read) -> Result<Vec<u8>, StorageError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > 64 << 20 {
        return Err(StorageError::Corrupt(format!("snapshot record of {len} bytes")));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

fn write_block(w: &mut impl Write, bytes: &[u8]) -> Result<(), StorageError> {
    w.write_all(&(bytes.len() as u32).to_le_bytes())?;
    w.write_all(bytes)?;
    Ok(())
}

/// Write `group`'s state as of `snapshot` into a new file at `path`.
pub fn write_snapshot_file(
    db: &DB,
    snapshot: &rocksdb::Snapshot<'_>,
    group: u32,
    meta: &SnapshotMeta,
    path: &Path,
) -> Result<(), StorageError> {
    let file = File::create(path)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    w.write_all(MAGIC)?;
    write_block(&mut w, &encode(meta)?)?;
    for (cf_name, tag) in [(CF_STATE, RECORD_STATE), (CF_COUNTS, RECORD_COUNTS), (CF_UNIQUES, RECORD_UNIQUES)] {
        let cf = db.cf_handle(cf_name).ok_or_else(|| StorageError::Corrupt(format!("missing cf {cf_name}")))?;
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(keys::group_end(group));
        opts.fill_cache(false);
        let start = keys::group_prefix(group);
        let iter = snapshot.iterator_cf_opt(cf, opts, IteratorMode::From(&start, rocksdb::Direction::Forward));
        for item in iter {
            let (key, value) = item?;
            if tag == RECORD_STATE && key.get(4) == Some(&STATE_INSTALLING) {
                continue;
            }
            w.write_all(&[tag])?;
            write_block(&mut w, &key)?;
            write_block(&mut w, &value)?;
        }
    }
    w.write_all(&[END])?;
    let file = w.into_inner().map_err(|e| StorageError::Io(e.to_string()))?;
    file.sync_all()?;
    Ok(())
}

/// Replace `group`'s state machine with the file's content.
///
/// Crash safety: the first batch deletes the old state and sets the
/// INSTALLING marker; the last one writes the applied id and clears the
/// marker; both are fsync'd before going on. A node that restarts with the
/// marker set reloads its newest local snapshot file (see the state
/// machine's recovery).
///
/// Blocking (file reads and RocksDB writes): run it on the engine's
/// blocking pool.
pub fn install_snapshot_file(engine: &Engine, group: u32, path: &Path) -> Result<SnapshotMeta, StorageError> {
    let state = engine.cf(CF_STATE)?;
    let counts = engine.cf(CF_COUNTS)?;
    let uniques = engine.cf(CF_UNIQUES)?;
    let mut reader = BufReader::with_capacity(1 << 20, File::open(path)?);
    let meta = read_header(&mut reader)?;

    let mut batch = WriteBatch::default();
    batch.delete_range_cf(state, keys::group_prefix(group), keys::group_end(group));
    batch.delete_range_cf(counts, keys::group_prefix(group), keys::group_end(group));
    batch.delete_range_cf(uniques, keys::group_prefix(group), keys::group_end(group));
    batch.put_cf(state, keys::tagged(group, STATE_INSTALLING), []);
    engine.write_synced(batch)?;
    crate::crash_point::reach("snapshot-install-wiped");

    let mut batch = WriteBatch::default();
    loop {
        let mut tag = [0u8; 1];
        reader.read_exact(&mut tag)?;
        let cf = match tag[0] {
            END => break,
            RECORD_STATE => state,
            RECORD_COUNTS => counts,
            RECORD_UNIQUES => uniques,
            other => return Err(StorageError::Corrupt(format!("snapshot record tag {other}"))),
        };
        let key = read_block(&mut reader)?;
        let value = read_block(&mut reader)?;
        if !key.starts_with(&keys::group_prefix(group)) {
            return Err(StorageError::Corrupt("snapshot key outside its group".into()));
        }
        batch.put_cf(cf, key, value);
        if batch.size_in_bytes() >= INSTALL_BATCH_BYTES {
            engine.write(std::mem::take(&mut batch))?;
        }
    }
    batch.put_cf(state, keys::tagged(group, keys::STATE_APPLIED), encode(&meta.last_log_id)?);
    batch.put_cf(state, keys::tagged(group, keys::STATE_MEMBERSHIP), encode(&meta.last_membership)?);
    batch.delete_cf(state, keys::tagged(group, STATE_INSTALLING));
    engine.write_synced(batch)?;
    Ok(meta)
}
