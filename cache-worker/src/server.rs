//! The worker's gRPC service: thin handlers that check arguments, call the cache, and translate
//! errors to status codes once, here.

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use lakecache_lake::{BlockKey, DirEntry as LakeEntry, Kind, LakeError, ObjectMeta};
use lakecache_proto::lakecache::v1 as pb;
use lakecache_proto::lakecache::v1::cache_worker_server::CacheWorker;
use tonic::{Request, Response, Status};

use crate::cache::{BlockCache, BlockError, Origin};
use crate::meta::MetadataCache;
use crate::metrics::WorkerMetrics;
use crate::preload::{PreloadSpec, Preloader};
use crate::store::TierKind;

/// How often a ReadBlock stream says the worker is still at work while its block is not ready.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_millis(50);

/// Chunk size of a ReadBlock stream.
pub const CHUNK: usize = 1 << 20;

pub use lakecache_proto::lakecache::v1::{NOT_CACHED_KEY, SOURCE_ERROR_KEY};

pub struct WorkerService {
    pub id: String,
    pub cache: Arc<BlockCache>,
    pub meta: Arc<MetadataCache>,
    pub preloader: Arc<Preloader>,
    pub metrics: Arc<WorkerMetrics>,
}

fn lake_status(e: &LakeError) -> Status {
    let mut s = match e {
        LakeError::NotFound { .. } => Status::not_found(e.to_string()),
        LakeError::Changed { .. } => {
            Status::failed_precondition(format!("{e}; the reader must look the object up again"))
        }
        LakeError::Unavailable(_) => Status::unavailable(e.to_string()),
        LakeError::PermissionDenied { .. } => Status::permission_denied(e.to_string()),
        LakeError::Other { .. } => Status::internal(e.to_string()),
    };
    s.metadata_mut()
        .insert(SOURCE_ERROR_KEY, "1".parse().expect("ascii"));
    s
}

pub(crate) fn block_status(e: &BlockError) -> Status {
    match e {
        BlockError::OutOfRange { .. } => Status::out_of_range(e.to_string()),
        BlockError::Lake(l) => lake_status(l),
    }
}

pub fn attributes(m: &ObjectMeta) -> pb::Attributes {
    let (secs, nanos) = m
        .modified
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| (d.as_secs() as i64, d.subsec_nanos()))
        .unwrap_or((0, 0));
    pb::Attributes {
        kind: match m.kind {
            Kind::File => pb::EntryKind::File as i32,
            Kind::Directory => pb::EntryKind::Directory as i32,
        },
        size: m.size,
        version: m.version.clone(),
        mtime_seconds: secs,
        mtime_nanos: nanos,
    }
}

fn entry(e: &LakeEntry) -> pb::DirEntry {
    pb::DirEntry {
        name: e.name.clone(),
        attributes: Some(attributes(&e.meta)),
    }
}

fn tier_pb(t: TierKind) -> pb::Tier {
    match t {
        TierKind::Memory => pb::Tier::Memory,
        TierKind::Disk => pb::Tier::Disk,
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::Chunk, Status>> + Send>>;
type ListStream = Pin<Box<dyn Stream<Item = Result<pb::ListResponse, Status>> + Send>>;
type StatusStream = Pin<Box<dyn Stream<Item = Result<pb::PreloadStatus, Status>> + Send>>;

/// Most entries in one page of a listing, and most bytes of names and versions in one page: a
/// page stays far below any gRPC message limit whatever the names.
pub const LIST_PAGE_ENTRIES: usize = 4096;
pub const LIST_PAGE_BYTES: usize = 1 << 20;

/// A listing as a stream of pages, each encoded only when the client is ready for it.
fn list_pages(
    entries: Arc<Vec<LakeEntry>>,
) -> impl Stream<Item = Result<pb::ListResponse, Status>> + Send {
    futures::stream::unfold(0usize, move |at| {
        let entries = entries.clone();
        async move {
            // An empty directory is one empty page.
            if at >= entries.len() && at > 0 {
                return None;
            }
            let mut page = Vec::new();
            let mut bytes = 0;
            let mut next = at;
            while let Some(e) = entries.get(next) {
                if page.len() >= LIST_PAGE_ENTRIES || (bytes >= LIST_PAGE_BYTES && !page.is_empty())
                {
                    break;
                }
                bytes += e.name.len() + e.meta.version.len() + 32;
                page.push(entry(e));
                next += 1;
            }
            // `usize::MAX` ends the stream after an empty directory's one page.
            let next = if entries.is_empty() { usize::MAX } else { next };
            Some((Ok(pb::ListResponse { entries: page }), next))
        }
    })
}

/// The block a ReadBlock request names and its object's size, once the request is checked.
pub(crate) fn block_request(
    req: &pb::ReadBlockRequest,
    block_size: u64,
) -> Result<(BlockKey, u64), Status> {
    let key = req
        .key
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("key is required"))?;
    if key.path.is_empty() {
        return Err(Status::invalid_argument("key.path is required"));
    }
    if req.block_size != block_size {
        return Err(Status::failed_precondition(format!(
            "block size mismatch: the reader uses {} bytes, this worker {block_size}; \
             configure readers and workers alike",
            req.block_size
        )));
    }
    Ok((
        BlockKey::new(key.path.clone(), key.version.clone(), key.index),
        key.object_size,
    ))
}

/// The answer to a `cached_only` read of a block this worker does not hold.
pub(crate) fn not_cached() -> Status {
    let mut s = Status::not_found("block not cached here");
    s.metadata_mut()
        .insert(NOT_CACHED_KEY, "1".parse().expect("ascii"));
    s
}

/// The part `[start, end)` of a block of `len` bytes that a request's `offset` and `length`
/// (0: to the end) ask for.
pub(crate) fn asked_range(len: usize, offset: u64, length: u64) -> (usize, usize) {
    let start = (offset as usize).min(len);
    let end = if length == 0 {
        len
    } else {
        start.saturating_add(length as usize).min(len)
    };
    (start, end)
}

/// Counts `n` bytes served from `origin`, and says which tier that is on the wire.
pub(crate) fn served(metrics: &WorkerMetrics, origin: Origin, n: usize) -> i32 {
    metrics
        .bytes_served
        .get_or_create(&metrics.tier(origin.label()))
        .inc_by(n as u64);
    (match origin {
        Origin::Tier(t) => tier_pb(t),
        Origin::Source => pb::Tier::Source,
    }) as i32
}

/// A block (or the asked range of it) as chunks of at most [`CHUNK`] bytes.
fn chunks(
    metrics: &WorkerMetrics,
    bytes: Bytes,
    origin: Origin,
    offset: u64,
    length: u64,
) -> Vec<Result<pb::Chunk, Status>> {
    let (start, end) = asked_range(bytes.len(), offset, length);
    let data: Bytes = bytes.slice(start..end);
    let served = served(metrics, origin, data.len());
    let mut chunks = Vec::with_capacity(data.len() / CHUNK + 1);
    let mut off = 0;
    loop {
        let n = CHUNK.min(data.len() - off);
        chunks.push(Ok(pb::Chunk {
            offset: (start + off) as u64,
            data: data.slice(off..off + n),
            served_from: if off == 0 { served } else { 0 },
        }));
        off += n;
        if off >= data.len() {
            break;
        }
    }
    chunks
}

#[tonic::async_trait]
impl CacheWorker for WorkerService {
    type ReadBlockStream = ChunkStream;
    type ListPagesStream = ListStream;
    type WatchPreloadStream = StatusStream;

    async fn read_block(
        &self,
        req: Request<pb::ReadBlockRequest>,
    ) -> Result<Response<Self::ReadBlockStream>, Status> {
        let req = req.into_inner();
        let (bkey, object_size) = block_request(&req, self.cache.block_size())?;
        // An empty chunk goes out at once, and another every HEARTBEAT until the block is
        // ready: the reader then knows this worker is alive and working on its block, whether
        // the block comes from a tier or from a slow lake. The lookup runs in a task of its
        // own, so the stream's task is free to send them meanwhile.
        let cache = self.cache.clone();
        let cached_only = req.cached_only;
        let lookup = tokio::spawn(async move {
            if cached_only {
                Ok(cache.cached(&bkey, object_size).await)
            } else {
                cache.get(&bkey, object_size).await.map(Some)
            }
        });
        let (offset, length, metrics) = (req.offset, req.length, self.metrics.clone());
        let answer = move |found| match found {
            Ok(Ok(Some((bytes, origin)))) => chunks(&metrics, bytes, origin, offset, length),
            Ok(Ok(None)) => vec![Err(not_cached())],
            Ok(Err(e)) => vec![Err(block_status(&e))],
            // The worker's own failure, not its source's: the reader may ask another.
            Err(e) => vec![Err(Status::internal(format!(
                "block read task failed: {e}"
            )))],
        };
        // Until the block is ready, an empty chunk every HEARTBEAT (the first at once): the
        // reader tells a worker waiting on a slow lake from one that hangs by these.
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stream = futures::stream::unfold(Some((lookup, tick, answer)), |state| async move {
            let (mut lookup, mut tick, answer) = state?;
            tokio::select! {
                biased;
                found = &mut lookup => Some((answer(found), None)),
                _ = tick.tick() => {
                    let beat = pb::Chunk {
                        offset: 0,
                        data: Bytes::new(),
                        served_from: pb::Tier::Unspecified as i32,
                    };
                    Some((vec![Ok(beat)], Some((lookup, tick, answer))))
                }
            }
        })
        .flat_map(futures::stream::iter);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn stat(
        &self,
        req: Request<pb::StatRequest>,
    ) -> Result<Response<pb::StatResponse>, Status> {
        let path = lakecache_lake::normalize(&req.into_inner().path);
        let m = self.meta.stat(&path).await.map_err(|e| lake_status(&e))?;
        Ok(Response::new(pb::StatResponse {
            attributes: Some(attributes(&m)),
        }))
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let path = lakecache_lake::normalize(&req.into_inner().path);
        let entries = self.meta.list(&path).await.map_err(|e| lake_status(&e))?;
        Ok(Response::new(pb::ListResponse {
            entries: entries.iter().map(entry).collect(),
        }))
    }

    async fn list_pages(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<Self::ListPagesStream>, Status> {
        let path = lakecache_lake::normalize(&req.into_inner().path);
        // An empty page goes out at once, so the reader knows the worker is alive while a
        // listing it does not hold comes from the source (which may take long for a large
        // directory); the listing's pages follow. The listing runs in a task of its own: a large
        // one is long work, and the stream's task must stay free to send the first page.
        let meta = self.meta.clone();
        let task = tokio::spawn(async move { meta.list(&path).await });
        let listing = async move {
            let listed = match task.await {
                Ok(Ok(entries)) => Ok(entries),
                Ok(Err(e)) => Err(lake_status(&e)),
                Err(e) => Err(Status::internal(format!("listing task failed: {e}"))),
            };
            match listed {
                Ok(entries) => list_pages(entries).left_stream(),
                Err(s) => futures::stream::once(async move { Err(s) }).right_stream(),
            }
        };
        let alive = futures::stream::once(async { Ok(pb::ListResponse { entries: vec![] }) });
        let stream = alive.chain(futures::stream::once(listing).flatten());
        Ok(Response::new(Box::pin(stream)))
    }

    async fn start_preload(
        &self,
        req: Request<pb::StartPreloadRequest>,
    ) -> Result<Response<pb::PreloadStatus>, Status> {
        let r = req.into_inner();
        if r.id.is_empty() {
            return Err(Status::invalid_argument("id is required"));
        }
        if r.id.len() > crate::preload::MAX_ID_BYTES {
            return Err(Status::invalid_argument(format!(
                "id is {} bytes; at most {} are allowed",
                r.id.len(),
                crate::preload::MAX_ID_BYTES
            )));
        }
        if r.paths.is_empty() {
            return Err(Status::invalid_argument(
                "paths: give at least one path or pattern",
            ));
        }
        let spec = PreloadSpec {
            id: r.id,
            paths: r.paths,
            metadata_only: r.metadata_only,
            members: r.members,
        };
        Ok(Response::new(self.preloader.start(spec)))
    }

    async fn watch_preload(
        &self,
        req: Request<pb::WatchPreloadRequest>,
    ) -> Result<Response<Self::WatchPreloadStream>, Status> {
        let id = req.into_inner().id;
        let rx = self
            .preloader
            .watch(&id)
            .ok_or_else(|| Status::not_found(format!("no preload {id:?} on worker {}", self.id)))?;
        let stream = futures::stream::unfold((rx, false), |(mut rx, done)| async move {
            if done {
                return None;
            }
            let s = rx.borrow_and_update().clone();
            let finished = s.phase != pb::PreloadPhase::Running as i32;
            if !finished && rx.changed().await.is_err() {
                return None;
            }
            let s = if finished {
                s
            } else {
                rx.borrow_and_update().clone()
            };
            let finished = s.phase != pb::PreloadPhase::Running as i32;
            Some((Ok(s), (rx, finished)))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cancel_preload(
        &self,
        req: Request<pb::CancelPreloadRequest>,
    ) -> Result<Response<pb::PreloadStatus>, Status> {
        let id = req.into_inner().id;
        self.preloader
            .cancel(&id)
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no preload {id:?} on worker {}", self.id)))
    }

    async fn info(
        &self,
        _req: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::WorkerInfo>, Status> {
        let usage = self.cache.store().usage();
        let hits: u64 = [TierKind::Memory, TierKind::Disk]
            .iter()
            .map(|t| {
                self.metrics
                    .hits
                    .get_or_create(&self.metrics.tier(t.label()))
                    .get()
            })
            .sum();
        Ok(Response::new(pb::WorkerInfo {
            id: self.id.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            source: self.cache.source().describe(),
            block_size: self.cache.block_size(),
            tiers: usage
                .iter()
                .map(|u| pb::TierUsage {
                    tier: tier_pb(u.kind) as i32,
                    capacity_bytes: u.capacity,
                    used_bytes: u.used,
                    blocks: u.blocks,
                })
                .collect(),
            hits,
            misses: self.metrics.misses.get(),
        }))
    }
}

pub use lakecache_proto::auth::TokenCheck;
