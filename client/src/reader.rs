//! Reading metadata and blocks from the workers, with failover.
//!
//! Every request goes first to the rendezvous owner of its item (a block's id, a directory's
//! path), then to the other workers in rendezvous order, and at last, when enabled, straight to
//! the source. A worker that fails to answer (refused, reset, timed out, overloaded) is skipped;
//! an answer that says the *source* failed (the worker marks those) is final, because asking
//! another worker would only ask the same source again and multiply the wait. The whole read is
//! bounded by `read_timeout`, so an unreachable lake yields EIO in bounded time, never a hang.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use lakecache_lake::block::path_item;
use lakecache_lake::{BlockKey, DirEntry, Kind, LakeError, ObjectMeta, Source};
use lakecache_proto::lakecache::v1 as pb;
use parking_lot::Mutex;
use tonic::Code;

use crate::membership::{Conn, Membership};
use crate::metrics::{OriginLabel, ReaderMetrics};

/// Metadata key a worker sets on errors that come from its source.
const SOURCE_ERROR_KEY: &str = "lakecache-source-error";

#[derive(Debug, Clone)]
pub struct ReaderConfig {
    pub block_size: u64,
    /// Deadline of one call to one worker.
    pub worker_timeout: Duration,
    /// Deadline of one whole read or metadata request, failovers included.
    pub read_timeout: Duration,
    /// How long listings and attributes stay valid; `None` for `Immutable` data.
    pub metadata_ttl: Option<Duration>,
    /// Read straight from the source when no worker answers.
    pub direct_fallback: bool,
}

impl Default for ReaderConfig {
    fn default() -> Self {
        Self {
            block_size: 4 << 20,
            worker_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
            metadata_ttl: None,
            direct_fallback: true,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadError {
    #[error("{0}: no such file or directory")]
    NotFound(String),
    #[error("{0}: not a directory")]
    NotADirectory(String),
    #[error("{0}: is a directory")]
    IsADirectory(String),
    #[error("{path}: the object changed in the source; reopen the file")]
    Stale { path: String },
    #[error("access denied: {0}")]
    Denied(String),
    #[error("file handle {0} is not open")]
    BadHandle(u64),
    #[error("{what}: no answer within {timeout:?}")]
    TimedOut { what: String, timeout: Duration },
    #[error("{0}")]
    Unavailable(String),
}

impl ReadError {
    /// The errno the filesystem returns for this error.
    pub fn errno(&self) -> i32 {
        match self {
            ReadError::NotFound(_) => libc::ENOENT,
            ReadError::NotADirectory(_) => libc::ENOTDIR,
            ReadError::IsADirectory(_) => libc::EISDIR,
            ReadError::Stale { .. } => libc::ESTALE,
            ReadError::Denied(_) => libc::EACCES,
            ReadError::BadHandle(_) => libc::EBADF,
            ReadError::TimedOut { .. } | ReadError::Unavailable(_) => libc::EIO,
        }
    }
}

fn from_lake(e: LakeError) -> ReadError {
    ReadError::from_lake(e)
}

impl ReadError {
    /// The error a source's error becomes for a reader.
    pub fn from_lake(e: LakeError) -> ReadError {
        match e {
            LakeError::NotFound { path } => ReadError::NotFound(path),
            LakeError::Changed { path, .. } => ReadError::Stale { path },
            LakeError::PermissionDenied { path, message } => {
                ReadError::Denied(format!("{path}: {message}"))
            }
            e => ReadError::Unavailable(e.to_string()),
        }
    }
}

/// A worker's answer: final (`Err(Some)`), or try the next worker (`Err(None)`).
type Attempt<T> = Result<T, Option<ReadError>>;

fn classify(status: tonic::Status, what: &str, worker: &str) -> Option<ReadError> {
    let from_source = status.metadata().get(SOURCE_ERROR_KEY).is_some();
    let msg = format!("{what} via worker {worker}: {}", status.message());
    match status.code() {
        Code::NotFound => Some(ReadError::NotFound(what.to_string())),
        Code::FailedPrecondition if from_source => Some(ReadError::Stale {
            path: what.to_string(),
        }),
        Code::PermissionDenied if from_source => Some(ReadError::Denied(msg)),
        _ if from_source => Some(ReadError::Unavailable(msg)),
        Code::Unauthenticated => {
            tracing::error!(worker, "{}", status.message());
            None
        }
        // A reader and workers configured differently (block size): no worker will do better.
        Code::FailedPrecondition | Code::InvalidArgument | Code::OutOfRange => {
            tracing::error!(worker, "{msg}");
            Some(ReadError::Unavailable(msg))
        }
        _ => {
            tracing::debug!(worker, code = ?status.code(), "{msg}; trying the next worker");
            None
        }
    }
}

struct Listing {
    entries: Arc<Vec<DirEntry>>,
    at: Instant,
}

/// A worker in the reader's own process (`lakecache local`): its blocks come by a function call
/// into its cache instead of gRPC over loopback, which saves the encoding, the socket and two
/// copies of every byte. Its errors are final (they come from its source or its store); a worker
/// that does not answer in time is skipped like a remote one.
pub trait LocalBlocks: Send + Sync {
    /// The whole block, and where it was served from (`memory`, `disk` or `source`).
    fn block(
        &self,
        key: BlockKey,
        object_size: u64,
    ) -> futures::future::BoxFuture<'static, Result<(Bytes, &'static str), ReadError>>;
}

/// The reader: metadata and blocks of one CacheNamespace.
pub struct Reader {
    cfg: ReaderConfig,
    membership: Arc<Membership>,
    source: Option<Arc<dyn Source>>,
    listings: Mutex<HashMap<String, Listing>>,
    /// One listing request at a time per directory.
    list_gates: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Workers of this process, by member id.
    local: HashMap<String, Arc<dyn LocalBlocks>>,
    pub metrics: Arc<ReaderMetrics>,
}

impl Reader {
    pub fn new(
        cfg: ReaderConfig,
        membership: Arc<Membership>,
        source: Option<Arc<dyn Source>>,
    ) -> Self {
        Self {
            cfg,
            membership,
            source,
            listings: Default::default(),
            list_gates: Default::default(),
            local: HashMap::new(),
            metrics: Arc::new(ReaderMetrics::default()),
        }
    }

    /// Reads the blocks of member `id` by calling `blocks` (a worker in this process).
    pub fn with_local_worker(mut self, id: &str, blocks: Arc<dyn LocalBlocks>) -> Self {
        self.local.insert(id.to_string(), blocks);
        self
    }

    pub fn config(&self) -> &ReaderConfig {
        &self.cfg
    }

    pub fn membership(&self) -> &Arc<Membership> {
        &self.membership
    }

    async fn bounded<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, ReadError>>,
    ) -> Result<T, ReadError> {
        match tokio::time::timeout(self.cfg.read_timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(ReadError::TimedOut {
                what: what.to_string(),
                timeout: self.cfg.read_timeout,
            }),
        }
    }

    fn cached_listing(&self, dir: &str) -> Option<Arc<Vec<DirEntry>>> {
        let listings = self.listings.lock();
        let l = listings.get(dir)?;
        self.cfg
            .metadata_ttl
            .is_none_or(|ttl| l.at.elapsed() < ttl)
            .then(|| l.entries.clone())
    }

    /// Whether a fresh listing of `dir` is cached.
    pub fn has_listing(&self, dir: &str) -> bool {
        self.cached_listing(dir).is_some()
    }

    /// The entries of a directory. Concurrent requests for one directory make one request to
    /// the workers (a listing ahead and the reader's own request meet here).
    pub async fn list(&self, dir: &str) -> Result<Arc<Vec<DirEntry>>, ReadError> {
        if let Some(e) = self.cached_listing(dir) {
            return Ok(e);
        }
        let gate = self
            .list_gates
            .lock()
            .entry(dir.to_string())
            .or_default()
            .clone();
        let result = async {
            let _turn = gate.lock().await;
            if let Some(e) = self.cached_listing(dir) {
                return Ok(e);
            }
            let entries = Arc::new(self.bounded(dir, self.list_uncached(dir)).await?);
            self.listings.lock().insert(
                dir.to_string(),
                Listing {
                    entries: entries.clone(),
                    at: Instant::now(),
                },
            );
            Ok(entries)
        }
        .await;
        // The last one through removes the gate (the map holds one reference, we hold one).
        let mut gates = self.list_gates.lock();
        if gates.get(dir).is_some_and(|g| Arc::strong_count(g) <= 2) {
            gates.remove(dir);
        }
        result
    }

    async fn list_uncached(&self, dir: &str) -> Result<Vec<DirEntry>, ReadError> {
        self.metrics.listings.inc();
        for conn in self.membership.owners(path_item(dir)) {
            match self.list_on(&conn, dir).await {
                Ok(v) => return Ok(v),
                Err(Some(e)) => return Err(e),
                Err(None) => {
                    self.metrics.failovers.inc();
                }
            }
        }
        match &self.source {
            Some(s) if self.cfg.direct_fallback => s.list(dir).await.map_err(from_lake),
            _ => Err(ReadError::Unavailable(format!("{dir}: no worker answered"))),
        }
    }

    async fn list_on(&self, conn: &Conn, dir: &str) -> Attempt<Vec<DirEntry>> {
        let fetch = async {
            let mut client = conn.client.clone();
            let mut pages = client
                .list(pb::ListRequest {
                    path: dir.to_string(),
                })
                .await
                .map_err(|s| classify(s, dir, &conn.member.id))?
                .into_inner();
            let mut entries = Vec::new();
            while let Some(page) = pages
                .message()
                .await
                .map_err(|s| classify(s, dir, &conn.member.id))?
            {
                entries.extend(page.entries.into_iter().filter_map(|e| {
                    Some(DirEntry {
                        meta: meta_from(e.attributes.as_ref()?),
                        name: e.name,
                    })
                }));
            }
            Ok(entries)
        };
        match tokio::time::timeout(self.cfg.worker_timeout, fetch).await {
            Ok(r) => r,
            Err(_) => Err(None),
        }
    }

    /// Attributes of a path, from its parent's listing.
    pub async fn stat(&self, path: &str) -> Result<ObjectMeta, ReadError> {
        if path.is_empty() {
            return Ok(ObjectMeta::directory());
        }
        let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
        let entries = self.list(parent).await?;
        entries
            .binary_search_by(|e| e.name.as_str().cmp(name))
            .ok()
            .map(|i| entries[i].meta.clone())
            .ok_or_else(|| ReadError::NotFound(path.to_string()))
    }

    /// Forgets cached metadata of a directory (after a stale read).
    pub fn invalidate(&self, dir: &str) {
        self.listings.lock().remove(dir);
    }

    /// One whole block of a file.
    pub async fn block(
        &self,
        path: &str,
        meta: &ObjectMeta,
        index: u64,
    ) -> Result<Bytes, ReadError> {
        let key = BlockKey::new(path, &meta.version, index);
        let what = format!("{path} block {index}");
        let result = self
            .bounded(&what, self.block_uncached(&key, meta.size))
            .await;
        if let Err(e) = &result {
            if matches!(e, ReadError::Stale { .. }) {
                let parent = path.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
                self.invalidate(parent);
            }
            self.metrics.read_errors.inc();
        }
        result
    }

    async fn block_uncached(&self, key: &BlockKey, size: u64) -> Result<Bytes, ReadError> {
        for conn in self.membership.owners(key.id().0) {
            if let Some(local) = self.local.get(&conn.member.id) {
                let call = local.block(key.clone(), size);
                match tokio::time::timeout(self.cfg.worker_timeout, call).await {
                    Ok(Ok((bytes, origin))) => {
                        self.count(origin, bytes.len());
                        return Ok(bytes);
                    }
                    Ok(Err(e)) => return Err(e),
                    Err(_) => {
                        self.metrics.failovers.inc();
                        continue;
                    }
                }
            }
            match self.block_on(&conn, key, size).await {
                Ok((bytes, origin)) => {
                    self.count(origin, bytes.len());
                    return Ok(bytes);
                }
                Err(Some(e)) => return Err(e),
                Err(None) => {
                    self.metrics.failovers.inc();
                }
            }
        }
        match &self.source {
            Some(s) if self.cfg.direct_fallback => {
                let (start, end) = key.range(self.cfg.block_size, size);
                let bytes = s
                    .read(&key.path, &key.version, start, end)
                    .await
                    .map_err(from_lake)?;
                if bytes.len() as u64 != end - start {
                    return Err(ReadError::Stale {
                        path: key.path.clone(),
                    });
                }
                self.count("direct", bytes.len());
                Ok(bytes)
            }
            _ => Err(ReadError::Unavailable(format!(
                "{} block {}: no worker answered and direct reads are off",
                key.path, key.index
            ))),
        }
    }

    fn count(&self, origin: &str, len: usize) {
        let l = OriginLabel {
            origin: origin.to_string(),
        };
        self.metrics.blocks.get_or_create(&l).inc();
        self.metrics.bytes.get_or_create(&l).inc_by(len as u64);
    }

    async fn block_on(
        &self,
        conn: &Conn,
        key: &BlockKey,
        size: u64,
    ) -> Attempt<(Bytes, &'static str)> {
        let req = pb::ReadBlockRequest {
            key: Some(pb::BlockKey {
                path: key.path.clone(),
                version: key.version.clone(),
                index: key.index,
                object_size: size,
            }),
            block_size: self.cfg.block_size,
            offset: 0,
            length: 0,
        };
        let what = format!("{} block {}", key.path, key.index);
        let fetch = async {
            let mut client = conn.client.clone();
            let mut stream = client
                .read_block(req)
                .await
                .map_err(|s| classify(s, &what, &conn.member.id))?
                .into_inner();
            let mut first: Option<pb::Chunk> = None;
            let mut buf: Option<BytesMut> = None;
            let mut origin = "source";
            while let Some(chunk) = stream
                .message()
                .await
                .map_err(|s| classify(s, &what, &conn.member.id))?
            {
                if first.is_none() && buf.is_none() {
                    origin = match pb::Tier::try_from(chunk.served_from) {
                        Ok(pb::Tier::Memory) => "memory",
                        Ok(pb::Tier::Disk) => "disk",
                        _ => "source",
                    };
                    first = Some(chunk);
                    continue;
                }
                let b = buf.get_or_insert_with(|| {
                    let f = first.take().map(|c| c.data).unwrap_or_default();
                    let mut b = BytesMut::with_capacity(self.cfg.block_size as usize);
                    b.extend_from_slice(&f);
                    b
                });
                b.extend_from_slice(&chunk.data);
            }
            let bytes = match (buf, first) {
                (Some(b), _) => b.freeze(),
                (None, Some(c)) => c.data,
                (None, None) => Bytes::new(),
            };
            let (start, end) = key.range(self.cfg.block_size, size);
            if bytes.len() as u64 != end - start {
                tracing::warn!(worker = %conn.member.id, %what, got = bytes.len(), want = end - start,
                    "short block from worker; trying the next");
                return Err(None);
            }
            Ok((bytes, origin))
        };
        match tokio::time::timeout(self.cfg.worker_timeout, fetch).await {
            Ok(r) => r,
            Err(_) => Err(None),
        }
    }
}

fn meta_from(a: &pb::Attributes) -> ObjectMeta {
    let kind = if a.kind == pb::EntryKind::Directory as i32 {
        Kind::Directory
    } else {
        Kind::File
    };
    let modified = (a.mtime_seconds > 0)
        .then(|| std::time::UNIX_EPOCH + Duration::new(a.mtime_seconds as u64, a.mtime_nanos));
    ObjectMeta {
        kind,
        size: a.size,
        version: a.version.clone(),
        modified,
    }
}
