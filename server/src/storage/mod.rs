//! Storage: the node's RocksDB and, on top of it, openraft's log storage and
//! state machine for each group. Knows nothing of gRPC.

pub mod archive;
pub mod audit;
pub mod codec;
pub mod counts;
pub mod engine;
pub mod entry_log;
pub mod keys;
pub mod log_store;
pub mod ranking;
pub mod read;
pub mod sketch;
pub mod snapshot;
pub mod split;
pub mod state_machine;
pub mod write_back;

#[cfg(test)]
mod log_store_tests;
#[cfg(test)]
mod openraft_suite;
#[cfg(test)]
mod state_machine_tests;

pub use engine::Engine;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("encoding: {0}")]
    Codec(#[from] postcard::Error),
    #[error("i/o: {0}")]
    Io(String),
    #[error("corrupt data: {0}")]
    Corrupt(String),
    #[error("cannot encode a storage key: {0}")]
    Key(#[from] keys::KeyError),
    /// Retention expired part of the range while it was read, again and
    /// again; the caller may retry.
    #[error("retention expired buckets of the range while it was read; retry")]
    FloorsMoved,
    /// The cold archive could not be read or written.
    #[error("archive: {0}")]
    Archive(String),
    /// A read reaches archived buckets on a node without an archive.
    #[error("the range reaches archived buckets, but this node has no --archive-url (every node needs the same one)")]
    NoArchive,
}

impl From<std::io::Error> for StorageError {
    fn from(e: std::io::Error) -> Self {
        StorageError::Io(e.to_string())
    }
}

impl From<StorageError> for std::io::Error {
    fn from(e: StorageError) -> Self {
        std::io::Error::other(e.to_string())
    }
}
