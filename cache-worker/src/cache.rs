//! Getting a block: Memory, then Disk, then the source, with one source request per block no
//! matter how many readers miss it at once.
//!
//! A miss starts a task that reads the block's range from the source and offers it to the store;
//! the task's result is a shared future that every concurrent miss of the same block awaits. The
//! task is spawned, so a reader that gives up does not cancel the fetch for the others. The entry
//! leaves the in-flight map only once the store has the block (or refused it), so a request that
//! arrives in between joins the flight rather than missing again.
//!
//! Source reads are capped per worker by a semaphore (`maxSourceFetches`), so that a burst of
//! misses queues in the worker instead of opening a request per miss against the lake. A block's
//! length is checked against the object's size as the worker knows it before it is stored (see
//! [`Loader::load`]): the size a reader sends may be wrong, and a short block cached under the
//! real key would be served to every reader after it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use lakecache_lake::{BlockId, BlockKey, LakeError, Source};
use parking_lot::Mutex;
use tokio::sync::Semaphore;

use crate::meta::MetadataCache;
use crate::metrics::WorkerMetrics;
use crate::store::{BlockStore, Body, Lookup, TierKind};

/// Where a block came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Tier(TierKind),
    Source,
}

impl Origin {
    pub fn label(&self) -> &'static str {
        match self {
            Origin::Tier(t) => t.label(),
            Origin::Source => "source",
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum BlockError {
    #[error("block {index} is past the end of {path} ({size} bytes)")]
    OutOfRange { path: String, index: u64, size: u64 },
    #[error(transparent)]
    Lake(#[from] LakeError),
}

type Flight = Shared<BoxFuture<'static, Result<Bytes, BlockError>>>;

/// Removes a block's flight from the in-flight map when dropped.
struct Leave {
    map: Arc<Mutex<HashMap<BlockId, Flight>>>,
    id: BlockId,
}

impl Drop for Leave {
    fn drop(&mut self) {
        self.map.lock().remove(&self.id);
    }
}

/// Default of [`BlockCache`]'s cap on source reads at once.
pub use lakecache_api::worker::DEFAULT_MAX_SOURCE_FETCHES;

/// The block cache of one worker.
pub struct BlockCache {
    loader: Arc<Loader>,
    inflight: Arc<Mutex<HashMap<BlockId, Flight>>>,
}

/// What a fetch task needs, shared with the tasks.
struct Loader {
    store: Arc<BlockStore>,
    source: Arc<dyn Source>,
    meta: Arc<MetadataCache>,
    block_size: u64,
    /// Source reads under way at once: without a cap, a burst of misses (a preload, an epoch's
    /// start) opens as many requests as there are misses, and the lake or the worker's memory
    /// gives out first.
    permits: Arc<Semaphore>,
    metrics: Arc<WorkerMetrics>,
}

impl BlockCache {
    pub fn new(
        store: Arc<BlockStore>,
        source: Arc<dyn Source>,
        meta: Arc<MetadataCache>,
        block_size: u64,
        max_source_fetches: usize,
        metrics: Arc<WorkerMetrics>,
    ) -> Self {
        Self {
            loader: Arc::new(Loader {
                store,
                source,
                meta,
                block_size,
                permits: Arc::new(Semaphore::new(max_source_fetches.max(1))),
                metrics,
            }),
            inflight: Default::default(),
        }
    }

    pub fn block_size(&self) -> u64 {
        self.loader.block_size
    }

    pub fn store(&self) -> &Arc<BlockStore> {
        &self.loader.store
    }

    pub fn source(&self) -> &Arc<dyn Source> {
        &self.loader.source
    }

    /// Block `key` if a tier holds it with the right length; never asks the source, and a block
    /// not held is not a miss (the caller asked only in case it was here).
    pub async fn cached(&self, key: &BlockKey, size: u64) -> Option<(Bytes, Origin)> {
        let (body, origin) = self.cached_body(key, size, false).await?;
        Some((body.into_bytes().ok()?, origin))
    }

    /// As [`BlockCache::cached`]; with `files`, a checked Memory tier block comes as its open
    /// file (see [`BlockStore::get_file`]).
    pub async fn cached_body(
        &self,
        key: &BlockKey,
        size: u64,
        files: bool,
    ) -> Option<(Body, Origin)> {
        let metrics = &self.loader.metrics;
        let size = self.loader.known_size(key).unwrap_or(size);
        let (start, end) = key.range(self.loader.block_size, size);
        if start >= end {
            return None;
        }
        match self.lookup(key, files).await {
            Lookup::Hit { body, tier } if body.len() == end - start => {
                metrics
                    .hits
                    .get_or_create(&metrics.tier(tier.label()))
                    .inc();
                Some((body, Origin::Tier(tier)))
            }
            _ => None,
        }
    }

    async fn lookup(&self, key: &BlockKey, files: bool) -> Lookup {
        if files {
            self.loader.store.get_file(key).await
        } else {
            self.loader.store.get(key).await
        }
    }

    /// The whole block `key` of an object of `size` bytes.
    ///
    /// `size` is the reader's word for the object's size; the worker's own metadata, when it
    /// has the object at the key's version, takes precedence (see [`Loader::load`]).
    pub async fn get(&self, key: &BlockKey, size: u64) -> Result<(Bytes, Origin), BlockError> {
        let (body, origin) = self.get_body(key, size, false).await?;
        let bytes = body.into_bytes().map_err(|e| {
            BlockError::Lake(LakeError::Unavailable(format!("reading a block file: {e}")))
        })?;
        Ok((bytes, origin))
    }

    /// As [`BlockCache::get`]; with `files`, a checked Memory tier block comes as its open
    /// file (see [`BlockStore::get_file`]).
    pub async fn get_body(
        &self,
        key: &BlockKey,
        size: u64,
        files: bool,
    ) -> Result<(Body, Origin), BlockError> {
        let started = Instant::now();
        let metrics = &self.loader.metrics;
        let size = self.loader.known_size(key).unwrap_or(size);
        let (start, end) = key.range(self.loader.block_size, size);
        if start >= end && !(size == 0 && key.index == 0) {
            return Err(BlockError::OutOfRange {
                path: key.path.clone(),
                index: key.index,
                size,
            });
        }
        if start == end {
            return Ok((Body::Bytes(Bytes::new()), Origin::Source));
        }
        let (body, origin) = match self.lookup(key, files).await {
            // The key does not include the object's size: a block cached for a caller that
            // claimed another size is not this caller's block. Fetch it again; the fetch finds
            // out which length is right and the store keeps that one.
            Lookup::Hit { body, .. } if body.len() != end - start => {
                metrics.misses.inc();
                (Body::Bytes(self.fetch(key, 0, size).await?), Origin::Source)
            }
            Lookup::Hit { body, tier } => {
                metrics
                    .hits
                    .get_or_create(&metrics.tier(tier.label()))
                    .inc();
                (body, Origin::Tier(tier))
            }
            Lookup::Miss { past } => {
                metrics.misses.inc();
                (
                    Body::Bytes(self.fetch(key, past, size).await?),
                    Origin::Source,
                )
            }
        };
        let label = metrics.tier(origin.label());
        metrics
            .block_latency
            .get_or_create(&label)
            .observe(started.elapsed().as_secs_f64());
        Ok((body, origin))
    }

    async fn fetch(&self, key: &BlockKey, past: u8, size: u64) -> Result<Bytes, BlockError> {
        let id = key.id();
        let flight = {
            let mut inflight = self.inflight.lock();
            if let Some(f) = inflight.get(&id) {
                self.loader.metrics.coalesced.inc();
                f.clone()
            } else {
                let loader = self.loader.clone();
                let map = self.inflight.clone();
                let key = key.clone();
                let task = tokio::spawn(async move {
                    // Leave the in-flight map however this task ends, panics included.
                    let _leave = Leave { map, id };
                    loader.load(key, past, size).await
                });
                let fut: BoxFuture<'static, Result<Bytes, BlockError>> = async move {
                    match task.await {
                        Ok(r) => r,
                        Err(e) => Err(BlockError::Lake(LakeError::Unavailable(format!(
                            "source fetch task failed: {e}"
                        )))),
                    }
                }
                .boxed();
                let shared = fut.shared();
                inflight.insert(id, shared.clone());
                shared
            }
        };
        flight.await
    }
}

impl Loader {
    /// The object's size by this worker's metadata, if it has the object at the key's version.
    fn known_size(&self, key: &BlockKey) -> Option<u64> {
        self.meta
            .cached(&key.path)
            .filter(|m| m.version == key.version && !m.is_dir())
            .map(|m| m.size)
    }

    /// Reads a block from the source and offers it to the store.
    ///
    /// The key names path, version and index but not the object's size, which comes from the
    /// reader; a reader with a wrong size would otherwise get a short block cached under the
    /// real key, and every reader after it a block of the wrong length. So the size is the
    /// worker's own when it knows the object at this version. When it does not, a full block
    /// checks itself (a source that returns fewer bytes than asked shows the size was wrong),
    /// but a range shorter than a block claims to be the object's last block, which only the
    /// object's real size can confirm: the object is looked up (through the metadata cache,
    /// alongside the read, so it costs no extra round trip) and the block read again if the
    /// reader's range was wrong. A block whose length is not that of the range asked is never
    /// stored: the reader gets [`LakeError::Changed`] and looks the object up again.
    async fn load(&self, key: BlockKey, past: u8, size: u64) -> Result<Bytes, BlockError> {
        let bs = self.block_size;
        let known = self.known_size(&key);
        let asked = key.range(bs, known.unwrap_or(size));
        let (bytes, (start, end)) = if known.is_none() && asked.1 - asked.0 < bs {
            let (stat, read) = tokio::join!(self.meta.stat(&key.path), self.read(&key, asked));
            let real = match stat {
                Ok(m) if m.version == key.version && !m.is_dir() => key.range(bs, m.size),
                _ => asked,
            };
            if real == asked {
                (read?, asked)
            } else if real.0 < real.1 {
                (self.read(&key, real).await?, real)
            } else {
                return Err(self.mismatch(&key, asked, 0));
            }
        } else {
            (self.read(&key, asked).await?, asked)
        };
        if bytes.len() as u64 != end - start {
            return Err(self.mismatch(&key, (start, end), bytes.len()));
        }
        self.store.put(&key, past, bytes.clone()).await;
        Ok(bytes)
    }

    /// One source read, within the cap on reads at once.
    async fn read(&self, key: &BlockKey, (start, end): (u64, u64)) -> Result<Bytes, BlockError> {
        let _permit = self.permits.acquire().await.map_err(|_| {
            BlockError::Lake(LakeError::Unavailable("the worker is shutting down".into()))
        })?;
        let t = Instant::now();
        self.metrics.source_requests.inc();
        let result = self.source.read(&key.path, &key.version, start, end).await;
        self.metrics
            .source_latency
            .observe(t.elapsed().as_secs_f64());
        match result {
            Ok(bytes) => {
                self.metrics.source_bytes.inc_by(bytes.len() as u64);
                Ok(bytes)
            }
            Err(e) => {
                self.metrics.source_errors.inc();
                Err(BlockError::Lake(e))
            }
        }
    }

    /// The error for a block whose length is not the one its object's size implies.
    fn mismatch(&self, key: &BlockKey, (start, end): (u64, u64), got: usize) -> BlockError {
        tracing::warn!(path = %key.path, version = %key.version, index = key.index, start, end,
            got, "block length does not match the object's size; not caching it");
        BlockError::Lake(LakeError::Changed {
            path: key.path.clone(),
            expected: key.version.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::TierSpec;
    use lakecache_lake::{FaultMode, FaultSource, OpendalSource, SourceSpec};

    struct Fixture {
        _lake: tempfile::TempDir,
        _mem: tempfile::TempDir,
        fault: Arc<FaultSource>,
        cache: BlockCache,
    }

    fn fixture() -> Fixture {
        fixture_with(DEFAULT_MAX_SOURCE_FETCHES, |real| real)
    }

    /// A lake with `obj` (100 bytes, 0..100) and `big` (256 bytes), read through `wrap` and a
    /// [`FaultSource`], in blocks of 16 bytes.
    fn fixture_with(
        max_source_fetches: usize,
        wrap: impl FnOnce(Arc<dyn Source>) -> Arc<dyn Source>,
    ) -> Fixture {
        let lake = tempfile::tempdir().unwrap();
        std::fs::write(lake.path().join("obj"), (0..100u8).collect::<Vec<_>>()).unwrap();
        std::fs::write(lake.path().join("big"), [7u8; 256]).unwrap();
        let real = OpendalSource::new(&SourceSpec::new(format!(
            "file://{}",
            lake.path().display()
        )))
        .unwrap();
        let fault = Arc::new(FaultSource::new(wrap(Arc::new(real))));
        let mem = tempfile::tempdir().unwrap();
        let metrics = Arc::new(WorkerMetrics::default());
        let store = BlockStore::open(
            vec![TierSpec {
                kind: TierKind::Memory,
                dir: mem.path().into(),
                capacity: 1000,
            }],
            16,
            metrics.clone(),
        )
        .unwrap();
        let meta = Arc::new(MetadataCache::new(
            fault.clone(),
            Default::default(),
            1000,
            metrics.clone(),
        ));
        let cache = BlockCache::new(
            Arc::new(store),
            fault.clone(),
            meta,
            16,
            max_source_fetches,
            metrics,
        );
        Fixture {
            _lake: lake,
            _mem: mem,
            fault,
            cache,
        }
    }

    #[tokio::test]
    async fn concurrent_misses_make_one_source_request() {
        let f = fixture();
        let version = f.cache.source().stat("obj").await.unwrap().version;
        f.fault
            .set_read_delay(std::time::Duration::from_millis(200));
        let key = BlockKey::new("obj", version, 2);
        let gets = (0..16).map(|_| f.cache.get(&key, 100));
        let results = futures::future::join_all(gets).await;
        for r in results {
            let (bytes, _) = r.unwrap();
            assert_eq!(&bytes[..], &(32..48u8).collect::<Vec<_>>()[..]);
        }
        assert_eq!(f.fault.reads(), 1, "concurrent misses were not coalesced");
        let (_, origin) = f.cache.get(&key, 100).await.unwrap();
        assert_eq!(origin, Origin::Tier(TierKind::Memory));
        assert_eq!(f.fault.reads(), 1);
    }

    #[tokio::test]
    async fn cached_blocks_survive_a_dead_source_and_misses_fail_clearly() {
        let f = fixture();
        let version = f.cache.source().stat("obj").await.unwrap().version;
        let last = BlockKey::new("obj", version.clone(), 6);
        let (bytes, _) = f.cache.get(&last, 100).await.unwrap();
        assert_eq!(bytes.len(), 4, "last block is short");
        f.fault.set_mode(FaultMode::Down);
        assert!(f.cache.get(&last, 100).await.is_ok());
        let err = f
            .cache
            .get(&BlockKey::new("obj", version.clone(), 0), 100)
            .await
            .unwrap_err();
        assert!(
            matches!(err, BlockError::Lake(LakeError::Unavailable(_))),
            "{err}"
        );
        let err = f
            .cache
            .get(&BlockKey::new("obj", version, 7), 100)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("past the end"), "{err}");
    }

    #[tokio::test]
    async fn a_reader_with_a_wrong_size_does_not_leave_a_short_block_cached() {
        let f = fixture();
        let version = f.cache.source().stat("obj").await.unwrap().version;
        let last = BlockKey::new("obj", version, 6);
        let right = (96..100u8).collect::<Vec<_>>();
        // This reader thinks the object ends at 98: its last block would be 2 bytes.
        let (bytes, _) = f.cache.get(&last, 98).await.unwrap();
        assert_eq!(&bytes[..], &right[..], "the worker's own size comes first");
        let (bytes, _) = f.cache.get(&last, 100).await.unwrap();
        assert_eq!(&bytes[..], &right[..]);
        let (bytes, origin) = f.cache.get(&last, 100).await.unwrap();
        assert_eq!(&bytes[..], &right[..]);
        assert_eq!(
            origin,
            Origin::Tier(TierKind::Memory),
            "right block not cached"
        );
    }

    #[tokio::test]
    async fn a_cached_block_of_another_length_is_replaced() {
        let f = fixture();
        let key = BlockKey::new("obj", "v", 6);
        let store = f.cache.store();
        store.put(&key, 0, Bytes::from_static(b"ab")).await;
        store.put(&key, 0, Bytes::from_static(b"abcd")).await;
        match store.get(&key).await {
            Lookup::Hit { body, .. } => assert_eq!(&body.into_bytes().unwrap()[..], b"abcd"),
            Lookup::Miss { .. } => panic!("the replacement was not stored"),
        }
        let usage = store.usage();
        assert_eq!((usage[0].used, usage[0].blocks), (4, 1), "{usage:?}");
    }

    /// Answers every read one byte short, and no stat: a source whose object changed size.
    /// (`Source` is an `async_trait`; this crate does not depend on the macro, so the boxed
    /// futures are spelled out.)
    struct ShortReads(Arc<dyn Source>);

    type Boxed<'a, T> = BoxFuture<'a, Result<T, LakeError>>;

    impl Source for ShortReads {
        fn stat<'a, 'b, 'c>(&'a self, path: &'b str) -> Boxed<'c, lakecache_lake::ObjectMeta>
        where
            'a: 'c,
            'b: 'c,
            Self: 'c,
        {
            let e = LakeError::Unavailable(format!("no stat of {path} here"));
            async move { Err(e) }.boxed()
        }
        fn list<'a, 'b, 'c>(&'a self, dir: &'b str) -> Boxed<'c, Vec<lakecache_lake::DirEntry>>
        where
            'a: 'c,
            'b: 'c,
            Self: 'c,
        {
            self.0.list(dir)
        }
        fn read<'a, 'b, 'd, 'c>(
            &'a self,
            path: &'b str,
            version: &'d str,
            start: u64,
            end: u64,
        ) -> Boxed<'c, Bytes>
        where
            'a: 'c,
            'b: 'c,
            'd: 'c,
            Self: 'c,
        {
            async move {
                let b = self.0.read(path, version, start, end).await?;
                Ok(b.slice(..b.len().saturating_sub(1)))
            }
            .boxed()
        }
        fn describe(&self) -> String {
            "short".into()
        }
    }

    #[tokio::test]
    async fn a_block_of_the_wrong_length_is_an_error_and_not_stored() {
        let f = fixture_with(DEFAULT_MAX_SOURCE_FETCHES, |real| {
            Arc::new(ShortReads(real))
        });
        for (index, size) in [(0, 100), (6, 100)] {
            let key = BlockKey::new("obj", "", index);
            let err = f.cache.get(&key, size).await.unwrap_err();
            assert!(
                matches!(err, BlockError::Lake(LakeError::Changed { .. })),
                "{err}"
            );
            assert!(
                f.cache.store().block_file(&key).is_none(),
                "short block stored"
            );
        }
    }

    #[tokio::test]
    async fn source_reads_at_once_are_capped() {
        let f = fixture_with(2, |real| real);
        let version = f.cache.source().stat("big").await.unwrap().version;
        f.fault
            .set_read_delay(std::time::Duration::from_millis(100));
        let keys: Vec<_> = (0..8)
            .map(|i| BlockKey::new("big", version.clone(), i))
            .collect();
        let results = futures::future::join_all(keys.iter().map(|k| f.cache.get(k, 256))).await;
        for r in results {
            assert_eq!(&r.unwrap().0[..], &[7u8; 16][..]);
        }
        assert_eq!(f.fault.reads(), 8);
        assert_eq!(
            f.fault.max_concurrent_reads(),
            2,
            "more reads at once than the cap"
        );
    }
}
