//! The cold archive: a partition's sealed buckets as Parquet files in an
//! object store, and reads of them.
//!
//! What is archived when, and why a bucket is in exactly one file, is the
//! manifest's business (`archive_manifest.rs`); this module only turns
//! buckets into files and files back into buckets:
//!
//! * **Where.** `object_store`: a local directory (`file:///path` or a plain
//!   path) by default, or `s3://bucket/prefix` for any S3-compatible store
//!   (credentials, region and endpoint from the usual `AWS_*` variables).
//!   Every node must name the same place: followers read what leaders wrote.
//! * **Files.** `partition-PPPPP/AFTER-UPTO.parquet` (times in ms since the
//!   epoch, `start` for the first): one per segment, its name a function
//!   of the range, so an export repeated after a crash overwrites the same
//!   file with the same rows. A put is atomic in both backends (a rename
//!   locally), so a reader never sees half a file.
//! * **Rows.** One per bucket, sorted by entity, type, granularity and
//!   start: `entity_id` (binary), `event_type`, `granularity` (`minute` …
//!   `year`), `bucket_start` (UTC timestamp, ms), `count` (uint64), `sum`
//!   (decimal(38,0): sums are exact 128-bit integers) and `actors_sketch`
//!   (the bucket's unique-actor HyperLogLog in Tally's encoding, null
//!   without actors). Row groups of 16,384 rows with min/max statistics, so
//!   a read of one entity fetches the footer and the groups that can hold it.
//! * **Reads** are cached with a lease: archived files never change, so the
//!   rows of one (file, entity, type) are kept until the lease ends (it
//!   bounds how long a file removed by hand keeps answering) or the cache's
//!   weight bound evicts them.

use std::sync::Arc;
use std::time::Duration;

use arrow_array::builder::{
    BinaryBuilder, Decimal128Builder, StringBuilder, TimestampMillisecondBuilder, UInt64Builder,
};
use arrow_array::cast::AsArray;
use arrow_array::types::{Decimal128Type, TimestampMillisecondType, UInt64Type};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::arrow_reader::ArrowReaderOptions;
use parquet::arrow::async_reader::AsyncFileReader;
use parquet::arrow::{ArrowWriter, ParquetRecordBatchStreamBuilder};
use parquet::basic::Compression;
use parquet::errors::ParquetError;
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};
use parquet::file::properties::WriterProperties;
use rocksdb::{Direction, IteratorMode, ReadOptions};
use tally_proto::time::{next_bucket_start, Granularity};

use super::counts::CountSum;
use super::keys::{self, CF_COUNTS, CF_UNIQUES};
use super::write_back::WriteBack;
use super::{Engine, StorageError};
use crate::archive_manifest::{ArchiveManifest, ArchiveSegment};

/// Rows per Parquet row group: the unit a read of one entity fetches and
/// decodes (an entity's day of minutes is ~1,500 rows).
const ROW_GROUP_ROWS: usize = 4_096;
/// Files whose footers (metadata: row groups and their statistics) stay
/// cached, so a read of another entity fetches only its row groups.
const CACHED_FOOTERS: u64 = 4_096;
/// Bytes of cached rows at most (each row weighs its sketch and ~96 bytes).
const CACHE_BYTES: u64 = 256 << 20;

/// One archived bucket of one (entity, type).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchivedBucket {
    pub granularity: Granularity,
    pub start_ms: i64,
    pub total: CountSum,
    /// The encoded unique-actor sketch, if its events carried actors.
    pub sketch: Option<Vec<u8>>,
}

type CacheKey = (String, Vec<u8>, String);

/// The archive one node reads and writes.
pub struct ArchiveStore {
    store: Arc<dyn ObjectStore>,
    url: String,
    cache: moka::sync::Cache<CacheKey, Arc<Vec<ArchivedBucket>>>,
    footers: moka::sync::Cache<String, Arc<ParquetMetaData>>,
}

impl std::fmt::Debug for ArchiveStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchiveStore").field("url", &self.url).finish()
    }
}

fn archive_error(context: &str, e: impl std::fmt::Display) -> StorageError {
    StorageError::Archive(format!("{context}: {e}"))
}

impl ArchiveStore {
    /// The archive at `url`: `s3://bucket[/prefix]`, `file:///dir` or a
    /// directory path (created if missing). `lease`: how long reads stay
    /// cached.
    pub fn open(url: &str, lease: Duration) -> Result<ArchiveStore, StorageError> {
        let store: Arc<dyn ObjectStore> = if let Some(rest) = url.strip_prefix("s3://") {
            // reqwest is built without a default TLS provider (ring, as for
            // tonic): install it once; a second install is refused, harmlessly.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let s3 = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()
                .map_err(|e| archive_error(&format!("opening {url}"), e))?;
            match prefix.trim_matches('/') {
                "" => Arc::new(s3),
                prefix => Arc::new(PrefixStore::new(s3, prefix)),
            }
        } else {
            let dir = url.strip_prefix("file://").unwrap_or(url);
            std::fs::create_dir_all(dir).map_err(|e| archive_error(&format!("creating {dir}"), e))?;
            Arc::new(LocalFileSystem::new_with_prefix(dir).map_err(|e| archive_error(&format!("opening {dir}"), e))?)
        };
        let cache = moka::sync::Cache::builder()
            .time_to_live(lease)
            .max_capacity(CACHE_BYTES)
            .weigher(|_: &CacheKey, rows: &Arc<Vec<ArchivedBucket>>| {
                let bytes: usize = rows.iter().map(|r| 96 + r.sketch.as_ref().map_or(0, Vec::len)).sum();
                u32::try_from(bytes).unwrap_or(u32::MAX)
            })
            .build();
        let footers = moka::sync::Cache::builder().time_to_live(lease).max_capacity(CACHED_FOOTERS).build();
        Ok(ArchiveStore { store, url: url.to_owned(), cache, footers })
    }

    /// The file of a partition's segment, relative to the archive's root.
    pub fn segment_path(partition: u32, after_ms: Option<i64>, upto_ms: i64) -> String {
        let after = after_ms.map_or_else(|| "start".to_owned(), |a| a.to_string());
        format!("partition-{partition:05}/{after}-{upto_ms}.parquet")
    }

    /// Archive what `manifest` has sealed but not archived: read those
    /// buckets after a checkpoint (so RocksDB holds everything applied,
    /// the seal included), write them to their file and return the segment
    /// to commit. `None` when nothing is waiting.
    pub async fn export(
        &self,
        engine: &Arc<Engine>,
        write_back: &Arc<WriteBack>,
        partition: u32,
        manifest: &ArchiveManifest,
    ) -> Result<Option<ArchiveSegment>, StorageError> {
        let Some((after_ms, upto_ms)) = manifest.unarchived() else { return Ok(None) };
        let (wb, from_floors) = (write_back.clone(), manifest.from_floors);
        let (bytes, rows) = engine
            .blocking_bulk(move |engine| {
                wb.checkpoint(engine, false)?;
                let rows = sealed_buckets(engine, wb.group(), after_ms, upto_ms, &from_floors)?;
                let count = rows.len() as u64;
                Ok(((!rows.is_empty()).then(|| encode_parquet(&rows)).transpose()?, count))
            })
            .await?;
        // An idle partition's segment names no file.
        let Some(bytes) = bytes else {
            return Ok(Some(ArchiveSegment { after_ms, upto_ms, path: String::new(), rows: 0, bytes: 0 }));
        };
        let path = Self::segment_path(partition, after_ms, upto_ms);
        let size = bytes.len() as u64;
        self.store
            .put(&StorePath::from(path.as_str()), PutPayload::from(bytes))
            .await
            .map_err(|e| archive_error(&format!("writing {path} to {}", self.url), e))?;
        Ok(Some(ArchiveSegment { after_ms, upto_ms, path, rows, bytes: size }))
    }

    /// Every archived bucket of (`entity_id`, `event_type`) in the file at
    /// `path` (none for a segment without a file), from the cache while its
    /// lease lasts.
    pub async fn read(
        &self,
        segment: &ArchiveSegment,
        entity_id: &[u8],
        event_type: &str,
    ) -> Result<Arc<Vec<ArchivedBucket>>, StorageError> {
        if segment.path.is_empty() {
            return Ok(Arc::default());
        }
        let key: CacheKey = (segment.path.clone(), entity_id.to_vec(), event_type.to_owned());
        if let Some(rows) = self.cache.get(&key) {
            return Ok(rows);
        }
        let rows = Arc::new(self.read_file(segment, entity_id, event_type).await?);
        self.cache.insert(key, rows.clone());
        Ok(rows)
    }

    async fn read_file(
        &self,
        segment: &ArchiveSegment,
        entity_id: &[u8],
        event_type: &str,
    ) -> Result<Vec<ArchivedBucket>, StorageError> {
        let path = &segment.path;
        let failed = |e: &dyn std::fmt::Display| archive_error(&format!("reading {path} in {}", self.url), e);
        let reader = FileRanges {
            store: self.store.clone(),
            path: StorePath::from(path.as_str()),
            size: segment.bytes,
            footer: self.footers.get(path),
        };
        let builder = ParquetRecordBatchStreamBuilder::new(reader).await.map_err(|e| failed(&e))?;
        self.footers.insert(path.clone(), builder.metadata().clone());
        // Rows are sorted by entity: only groups whose range holds it.
        let groups: Vec<usize> = builder
            .metadata()
            .row_groups()
            .iter()
            .enumerate()
            .filter(|(_, group)| {
                let stats = group.column(0).statistics();
                let min = stats.and_then(|s| s.min_bytes_opt());
                let max = stats.and_then(|s| s.max_bytes_opt());
                min.is_none_or(|m| m <= entity_id) && max.is_none_or(|m| entity_id <= m)
            })
            .map(|(i, _)| i)
            .collect();
        let stream = builder.with_row_groups(groups).build().map_err(|e| failed(&e))?;
        let batches: Vec<RecordBatch> = stream.try_collect().await.map_err(|e| failed(&e))?;
        let mut found = Vec::new();
        for batch in &batches {
            decode_rows(batch, entity_id, event_type, &mut found).map_err(|e| failed(&e))?;
        }
        Ok(found)
    }
}

/// One archived file as parquet's async reader wants it: byte ranges read
/// from the object store (the footer, then only the row groups a read
/// keeps), the file's size known from the manifest.
struct FileRanges {
    store: Arc<dyn ObjectStore>,
    path: StorePath,
    size: u64,
    /// The footer, when an earlier read left it cached.
    footer: Option<Arc<ParquetMetaData>>,
}

impl AsyncFileReader for FileRanges {
    fn get_bytes(&mut self, range: std::ops::Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        let (store, path) = (self.store.clone(), self.path.clone());
        async move { store.get_range(&path, range).await.map_err(|e| ParquetError::External(Box::new(e))) }.boxed()
    }

    /// A row group's column chunks in one request (the store merges
    /// neighbouring ranges), not one per column.
    fn get_byte_ranges(
        &mut self,
        ranges: Vec<std::ops::Range<u64>>,
    ) -> BoxFuture<'_, parquet::errors::Result<Vec<Bytes>>> {
        let (store, path) = (self.store.clone(), self.path.clone());
        async move { store.get_ranges(&path, &ranges).await.map_err(|e| ParquetError::External(Box::new(e))) }.boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        async move {
            if let Some(footer) = &self.footer {
                return Ok(footer.clone());
            }
            let size = self.size;
            let metadata =
                ParquetMetaDataReader::new().with_arrow_reader_options(options).load_and_finish(self, size).await?;
            Ok(Arc::new(metadata))
        }
        .boxed()
    }
}

/// The archive's schema (documented in the module doc and the README).
pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("entity_id", DataType::Binary, false),
        Field::new("event_type", DataType::Utf8, false),
        Field::new("granularity", DataType::Utf8, false),
        Field::new("bucket_start", DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())), false),
        Field::new("count", DataType::UInt64, false),
        Field::new("sum", DataType::Decimal128(38, 0), false),
        Field::new("actors_sketch", DataType::Binary, true),
    ]))
}

/// A bucket read from RocksDB for export.
struct ExportRow {
    entity_id: Vec<u8>,
    event_type: String,
    granularity: Granularity,
    start_ms: i64,
    total: CountSum,
    sketch: Option<Vec<u8>>,
}

/// Every kept bucket of the group ending in (`after_ms`, `upto_ms`], in key
/// order (entity, type, granularity, start). Blocking.
fn sealed_buckets(
    engine: &Engine,
    group: u32,
    after_ms: Option<i64>,
    upto_ms: i64,
    from_floors: &tally_proto::time::Floors,
) -> Result<Vec<ExportRow>, StorageError> {
    let db = engine.db();
    let snap = db.snapshot();
    let bounds = || {
        let mut opts = ReadOptions::default();
        opts.set_snapshot(&snap);
        // The entity-first keys; the ranking index (RANKING_TAG) after them
        // holds the same buckets again.
        opts.set_iterate_upper_bound(keys::tagged(group, keys::RANKING_TAG).to_vec());
        opts
    };
    let start = keys::group_prefix(group);
    let mut rows = Vec::new();
    let mut wanted_keys = Vec::new();
    for item in db.iterator_cf_opt(engine.cf(CF_COUNTS)?, bounds(), IteratorMode::From(&start, Direction::Forward)) {
        let (key, value) = item?;
        let Some(parts) = keys::parse_counts_key(&key) else { continue };
        let Some(granularity) = Granularity::from_u8(parts.granularity) else { continue };
        let start_ms = parts.bucket_start as i64;
        let end = next_bucket_start(granularity, start_ms);
        let archived_here = end <= upto_ms && after_ms.is_none_or(|a| end > a);
        if !archived_here || start_ms < from_floors[usize::from(parts.granularity)] {
            continue;
        }
        let event_type = String::from_utf8(parts.event_type.to_vec())
            .map_err(|_| StorageError::Corrupt("event type in a counts key is not UTF-8".into()))?;
        rows.push(ExportRow {
            entity_id: parts.entity_id.to_vec(),
            event_type,
            granularity,
            start_ms,
            total: CountSum::decode(&value),
            sketch: None,
        });
        wanted_keys.push(key.to_vec());
    }
    let opts = bounds();
    for (row, sketch) in
        rows.iter_mut().zip(db.batched_multi_get_cf_opt(engine.cf(CF_UNIQUES)?, &wanted_keys, false, &opts))
    {
        row.sketch = sketch?.map(|s| s.to_vec());
    }
    Ok(rows)
}

fn encode_parquet(rows: &[ExportRow]) -> Result<Vec<u8>, StorageError> {
    let failed = |e: &dyn std::fmt::Display| archive_error("encoding Parquet", e);
    let mut entity = BinaryBuilder::new();
    let mut event_type = StringBuilder::new();
    let mut granularity = StringBuilder::new();
    let mut start = TimestampMillisecondBuilder::new().with_timezone("UTC");
    let mut count = UInt64Builder::new();
    let mut sum = Decimal128Builder::new().with_precision_and_scale(38, 0).map_err(|e| failed(&e))?;
    let mut sketch = BinaryBuilder::new();
    for row in rows {
        entity.append_value(&row.entity_id);
        event_type.append_value(&row.event_type);
        granularity.append_value(row.granularity.name());
        start.append_value(row.start_ms);
        count.append_value(row.total.count);
        sum.append_value(row.total.sum);
        sketch.append_option(row.sketch.as_deref());
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(entity.finish()),
        Arc::new(event_type.finish()),
        Arc::new(granularity.finish()),
        Arc::new(start.finish()),
        Arc::new(count.finish()),
        Arc::new(sum.finish()),
        Arc::new(sketch.finish()),
    ];
    let batch = RecordBatch::try_new(schema(), columns).map_err(|e| failed(&e))?;
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .build();
    let mut out = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut out, schema(), Some(props)).map_err(|e| failed(&e))?;
    writer.write(&batch).map_err(|e| failed(&e))?;
    writer.close().map_err(|e| failed(&e))?;
    Ok(out)
}

/// The rows of `batch` for (`entity_id`, `event_type`), appended to `out`.
fn decode_rows(
    batch: &RecordBatch,
    entity_id: &[u8],
    event_type: &str,
    out: &mut Vec<ArchivedBucket>,
) -> Result<(), String> {
    let column = |name: &str| batch.column_by_name(name).ok_or_else(|| format!("no column {name}"));
    let entities = column("entity_id")?.as_binary_opt::<i32>().ok_or("entity_id is not binary")?;
    let types = column("event_type")?.as_string_opt::<i32>().ok_or("event_type is not a string")?;
    let granularities = column("granularity")?.as_string_opt::<i32>().ok_or("granularity is not a string")?;
    let starts = column("bucket_start")?
        .as_primitive_opt::<TimestampMillisecondType>()
        .ok_or("bucket_start is not a timestamp")?;
    let counts = column("count")?.as_primitive_opt::<UInt64Type>().ok_or("count is not uint64")?;
    let sums = column("sum")?.as_primitive_opt::<Decimal128Type>().ok_or("sum is not decimal128")?;
    let sketches = column("actors_sketch")?.as_binary_opt::<i32>().ok_or("actors_sketch is not binary")?;
    for i in 0..batch.num_rows() {
        if entities.value(i) != entity_id || types.value(i) != event_type {
            continue;
        }
        let name = granularities.value(i);
        let granularity = Granularity::ALL
            .into_iter()
            .find(|g| g.name() == name)
            .ok_or_else(|| format!("unknown granularity {name:?}"))?;
        out.push(ArchivedBucket {
            granularity,
            start_ms: starts.value(i),
            total: CountSum { count: counts.value(i), sum: sums.value(i) },
            sketch: (!sketches.is_null(i)).then(|| sketches.value(i).to_vec()),
        });
    }
    Ok(())
}
