//! Getting a block: Memory, then Disk, then the source, with one source request per block no
//! matter how many readers miss it at once.
//!
//! A miss starts a task that reads the block's range from the source and offers it to the store;
//! the task's result is a shared future that every concurrent miss of the same block awaits. The
//! task is spawned, so a reader that gives up does not cancel the fetch for the others. The entry
//! leaves the in-flight map only once the store has the block (or refused it), so a request that
//! arrives in between joins the flight rather than missing again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use lakecache_lake::{BlockId, BlockKey, LakeError, Source};
use parking_lot::Mutex;

use crate::metrics::WorkerMetrics;
use crate::store::{BlockStore, Lookup, TierKind};

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

/// The block cache of one worker.
pub struct BlockCache {
    store: Arc<BlockStore>,
    source: Arc<dyn Source>,
    block_size: u64,
    inflight: Arc<Mutex<HashMap<BlockId, Flight>>>,
    metrics: Arc<WorkerMetrics>,
}

impl BlockCache {
    pub fn new(
        store: Arc<BlockStore>,
        source: Arc<dyn Source>,
        block_size: u64,
        metrics: Arc<WorkerMetrics>,
    ) -> Self {
        Self {
            store,
            source,
            block_size,
            inflight: Default::default(),
            metrics,
        }
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    pub fn store(&self) -> &Arc<BlockStore> {
        &self.store
    }

    pub fn source(&self) -> &Arc<dyn Source> {
        &self.source
    }

    /// The whole block `key` of an object of `size` bytes.
    pub async fn get(&self, key: &BlockKey, size: u64) -> Result<(Bytes, Origin), BlockError> {
        self.get_with(key, size, None).await
    }

    /// [`Self::get`], telling `on_miss` as soon as the block is known to come from the source
    /// (before the source answers), so that a caller can say so to its reader at once.
    pub async fn get_with(
        &self,
        key: &BlockKey,
        size: u64,
        on_miss: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Result<(Bytes, Origin), BlockError> {
        let miss = move || {
            if let Some(tx) = on_miss {
                let _ = tx.send(());
            }
        };
        let started = Instant::now();
        let (start, end) = key.range(self.block_size, size);
        if start >= end && !(size == 0 && key.index == 0) {
            return Err(BlockError::OutOfRange {
                path: key.path.clone(),
                index: key.index,
                size,
            });
        }
        if start == end {
            return Ok((Bytes::new(), Origin::Source));
        }
        let (bytes, origin) = match self.store.get(key).await {
            // The key does not include the object's size: a block cached for a caller that
            // claimed another size is not this caller's block. Fetch it again.
            Lookup::Hit { bytes, .. } if bytes.len() as u64 != end - start => {
                self.metrics.misses.inc();
                miss();
                (self.fetch(key, 0, start, end).await?, Origin::Source)
            }
            Lookup::Hit { bytes, tier } => {
                self.metrics
                    .hits
                    .get_or_create(&self.metrics.tier(tier.label()))
                    .inc();
                (bytes, Origin::Tier(tier))
            }
            Lookup::Miss { past } => {
                self.metrics.misses.inc();
                miss();
                (self.fetch(key, past, start, end).await?, Origin::Source)
            }
        };
        let label = self.metrics.tier(origin.label());
        self.metrics
            .block_latency
            .get_or_create(&label)
            .observe(started.elapsed().as_secs_f64());
        Ok((bytes, origin))
    }

    async fn fetch(
        &self,
        key: &BlockKey,
        past: u8,
        start: u64,
        end: u64,
    ) -> Result<Bytes, BlockError> {
        let id = key.id();
        let flight = {
            let mut inflight = self.inflight.lock();
            if let Some(f) = inflight.get(&id) {
                self.metrics.coalesced.inc();
                f.clone()
            } else {
                let (store, source, metrics) = (
                    self.store.clone(),
                    self.source.clone(),
                    self.metrics.clone(),
                );
                let map = self.inflight.clone();
                let key = key.clone();
                let task = tokio::spawn(async move {
                    // Leave the in-flight map however this task ends, panics included.
                    let _leave = Leave { map, id };
                    let t = Instant::now();
                    metrics.source_requests.inc();
                    let result = source.read(&key.path, &key.version, start, end).await;
                    metrics.source_latency.observe(t.elapsed().as_secs_f64());
                    match result {
                        Ok(bytes) => {
                            metrics.source_bytes.inc_by(bytes.len() as u64);
                            store.put(&key, past, bytes.clone()).await;
                            Ok(bytes)
                        }
                        Err(e) => {
                            metrics.source_errors.inc();
                            Err(BlockError::Lake(e))
                        }
                    }
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
        let lake = tempfile::tempdir().unwrap();
        std::fs::write(lake.path().join("obj"), (0..100u8).collect::<Vec<_>>()).unwrap();
        let real = OpendalSource::new(&SourceSpec::new(format!(
            "file://{}",
            lake.path().display()
        )))
        .unwrap();
        let fault = Arc::new(FaultSource::new(Arc::new(real)));
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
        let cache = BlockCache::new(Arc::new(store), fault.clone(), 16, metrics);
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
}
