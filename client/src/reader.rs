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
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hashlink::LinkedHashMap;
use lakecache_lake::block::path_item;
use lakecache_lake::{BlockKey, DirEntry, Kind, LakeError, ObjectMeta, Source};
use lakecache_proto::lakecache::v1 as pb;
use lakecache_proto::lakecache::v1::{NOT_CACHED_KEY, SOURCE_ERROR_KEY};
use parking_lot::Mutex;
use tonic::Code;

use crate::blocks::{BlockStream, Event, StartError};
use crate::health::Health;
use crate::membership::{Conn, Membership};
use crate::metrics::{OriginLabel, ReaderMetrics, TransportLabel};

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

/// Why a call to one worker gave no usable answer.
#[derive(Debug)]
enum Miss {
    /// The answer is final: another worker would say the same (the source failed, the object
    /// is gone or changed, the reader is misconfigured).
    Final(ReadError),
    /// The worker did not answer in time or its connection failed: it counts against its
    /// health, and the next owner is asked.
    Fault,
    /// Ask the next owner, but the worker is not at fault (a short block).
    Next,
    /// The worker refused the data-plane token (both tokens, during a rotation): ask the next
    /// owner; when every one refuses and the token may be rotated, ask again after a pause
    /// (see [`Reader::block_uncached`]).
    Refused,
}

/// A worker's answer, or why there is none.
type Attempt<T> = Result<T, Miss>;

fn classify(status: tonic::Status, what: &str, worker: &str) -> Miss {
    let from_source = status.metadata().get(SOURCE_ERROR_KEY).is_some();
    let msg = format!("{what} via worker {worker}: {}", status.message());
    match status.code() {
        // A hedge's cache-only question: not here, which says nothing about the object.
        Code::NotFound if status.metadata().get(NOT_CACHED_KEY).is_some() => Miss::Next,
        Code::NotFound => Miss::Final(ReadError::NotFound(what.to_string())),
        Code::FailedPrecondition if from_source => Miss::Final(ReadError::Stale {
            path: what.to_string(),
        }),
        Code::PermissionDenied if from_source => Miss::Final(ReadError::Denied(msg)),
        _ if from_source => Miss::Final(ReadError::Unavailable(msg)),
        Code::Unauthenticated => {
            // Reads that every worker refuses ask again every second during a rotation: log
            // the refusal once every few seconds, not once per call.
            if refusal_log_due() {
                tracing::error!(worker, "{}", status.message());
            } else {
                tracing::debug!(worker, "{}", status.message());
            }
            Miss::Refused
        }
        // A reader and workers configured differently (block size): no worker will do better.
        Code::FailedPrecondition | Code::InvalidArgument | Code::OutOfRange => {
            tracing::error!(worker, "{msg}");
            Miss::Final(ReadError::Unavailable(msg))
        }
        _ => {
            tracing::debug!(worker, code = ?status.code(), "{msg}; trying the next worker");
            Miss::Fault
        }
    }
}

/// Whether a refused token is worth an error line now: at most one every 10 s per process.
fn refusal_log_due() -> bool {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = START.get_or_init(Instant::now).elapsed().as_secs();
    let next = NEXT.load(Ordering::Relaxed);
    now >= next
        && NEXT
            .compare_exchange(next, now + 10, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// Listings kept, least recently used first, within a budget of entries.
#[derive(Default)]
struct Listings {
    map: LinkedHashMap<String, Listing>,
    entries: usize,
}

struct Listing {
    entries: Arc<Vec<DirEntry>>,
    at: Instant,
}

impl Listings {
    fn insert(&mut self, dir: String, listing: Listing, budget: usize) {
        self.remove(&dir);
        let n = listing.entries.len().max(1);
        // Make room; a listing larger than the whole budget is kept alone, so that the walk
        // of a huge directory (readdir calls, then lookups) lists it once.
        while self.entries + n > budget {
            let Some((_, old)) = self.map.pop_front() else {
                break;
            };
            self.entries -= old.entries.len().max(1);
        }
        self.entries += n;
        self.map.insert(dir, listing);
    }

    fn remove(&mut self, dir: &str) {
        if let Some(old) = self.map.remove(dir) {
            self.entries -= old.entries.len().max(1);
        }
    }
}

/// Entries of listings a reader keeps by default (`lakecache local`): ~420 MB at most (see
/// [`LISTING_ENTRY_BYTES`]).
pub const DEFAULT_LISTING_BUDGET: usize = 2_000_000;

/// What one kept listing entry takes of memory, for budgets in bytes: 208 bytes measured
/// (the RSS growth of a million `DirEntry` with 28-byte names and 34-byte S3 ETags, glibc
/// malloc: 80 bytes in place, the rest the two strings on the heap), rounded up for longer
/// keys and the listing map.
pub const LISTING_ENTRY_BYTES: u64 = 256;

/// The first pause before asking the workers again when every one refused the token.
pub const REFUSED_FIRST_PAUSE: Duration = Duration::from_millis(250);
/// The longest pause between passes while every worker refuses the token.
pub const REFUSED_MAX_PAUSE: Duration = Duration::from_secs(1);

/// What wakes a read that waits because every worker refused the token.
struct Changes {
    tokens: tokio::sync::watch::Receiver<u64>,
    members: tokio::sync::watch::Receiver<u64>,
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
    listings: Mutex<Listings>,
    listing_budget: usize,
    /// One listing request at a time per directory.
    list_gates: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Workers of this process, by member id.
    local: HashMap<String, Arc<dyn LocalBlocks>>,
    health: Arc<Health>,
    pub metrics: Arc<ReaderMetrics>,
}

/// What one block read needs to know, shared by its attempts (which may outlive it).
struct BlockCall {
    key: BlockKey,
    size: u64,
    block_size: u64,
    first_deadline: Duration,
    worker_timeout: Duration,
    health: Arc<Health>,
    membership: Arc<Membership>,
    metrics: Arc<ReaderMetrics>,
}

impl BlockCall {
    fn what(&self) -> String {
        format!("{} block {}", self.key.path, self.key.index)
    }

    /// What an error status from worker `id` means, recorded against the worker when it is
    /// the worker's fault.
    fn refused(&self, status: tonic::Status, what: &str, id: &str) -> Miss {
        let miss = classify(status, what, id);
        if matches!(miss, Miss::Fault) {
            self.fault(id);
        }
        miss
    }

    /// Records a worker fault, and starts probing the worker if this ejected it.
    fn fault(&self, id: &str) {
        if self.health.failed(id) {
            self.health.watch(id.to_string(), self.membership.clone());
        }
    }

    /// One attempt at the block on one worker. It records the worker's health itself, so that
    /// an attempt a hedge overtook still tells whether its worker is alive.
    /// With `cached_only`, the worker answers from its tiers only (a hedge's question).
    async fn attempt(
        self: Arc<Self>,
        conn: Arc<Conn>,
        local: Option<Arc<dyn LocalBlocks>>,
        answered: Arc<AtomicBool>,
        cached_only: bool,
    ) -> Attempt<(Bytes, &'static str)> {
        let id = conn.member.id.as_str();
        let started = Instant::now();
        if let Some(local) = local {
            if cached_only {
                // An in-process worker has no cache-only read; it is never silent anyway.
                return Err(Miss::Next);
            }
            // In this process: it cannot hang on its own, and a miss is its lake's time (not a
            // first-answer latency, so it is not recorded as one).
            answered.store(true, Ordering::Release);
            let call = local.block(self.key.clone(), self.size);
            return match tokio::time::timeout(self.worker_timeout, call).await {
                Ok(Ok(found)) => {
                    self.health.alive(id);
                    self.transport("local");
                    Ok(found)
                }
                Ok(Err(e)) => Err(Miss::Final(e)),
                Err(_) => {
                    self.fault(id);
                    Err(Miss::Fault)
                }
            };
        }
        let what = self.what();
        let req = pb::ReadBlockRequest {
            key: Some(pb::BlockKey {
                path: self.key.path.clone(),
                version: self.key.version.clone(),
                index: self.key.index,
                object_size: self.size,
            }),
            block_size: self.block_size,
            offset: 0,
            length: 0,
            cached_only,
        };
        // The call waits on the worker until its last message; each message is a sign of life.
        let waiting = self.health.waiting(id);
        // The first sign of life: the worker's heartbeat, sent as soon as it takes the call (or
        // the block itself when it is ready at once, or, from an older worker over gRPC, the
        // first chunk of data).
        let first = tokio::time::timeout(self.first_deadline, self.first(&conn, req)).await;
        let first = match first {
            Ok(Ok(found)) => found,
            Ok(Err(s)) => return Err(self.refused(s, &what, id)),
            Err(_) => {
                tracing::debug!(worker = id, %what, deadline = ?self.first_deadline,
                    "no first answer; trying the next worker");
                self.fault(id);
                return Err(Miss::Fault);
            }
        };
        answered.store(true, Ordering::Release);
        self.health.answered(id, started.elapsed());
        let (start, end) = self.key.range(self.block_size, self.size);
        let want = (end - start) as usize;
        let transport = match &first {
            First::Grpc(..) => "grpc",
            First::Blocks(..) => "blocks",
        };
        let rest = async {
            match first {
                First::Grpc(stream, first) => self.rest_grpc(id, stream, first, want).await,
                First::Blocks(stream, first) => self.rest_blocks(id, stream, first, want).await,
            }
        };
        // Past the first answer the worker is alive; a slow disk or lake gets the whole timeout,
        // and running out of it is slowness, not the worker's fault (a worker that dies
        // meanwhile breaks the stream, or falls silent: HTTP/2 keepalive drops a gRPC
        // connection, the block transport's silence bound its connection, both as its fault).
        let (bytes, origin) = match tokio::time::timeout(self.worker_timeout, rest).await {
            Ok(Ok(found)) => found,
            Ok(Err(s)) => return Err(self.refused(s, &what, id)),
            Err(_) => return Err(Miss::Next),
        };
        waiting.end();
        if bytes.len() != want {
            tracing::warn!(worker = id, %what, got = bytes.len(), want,
                "short block from worker; trying the next");
            return Err(Miss::Next);
        }
        self.transport(transport);
        Ok((bytes, origin))
    }

    fn transport(&self, transport: &'static str) {
        self.metrics
            .worker_reads
            .get_or_create(&TransportLabel { transport })
            .inc();
    }

    /// Asks worker `conn` for the block and waits for its first answer: over the block
    /// transport when the worker speaks it, else over gRPC. Either token of a rotation (see
    /// `Membership::call`).
    async fn first(&self, conn: &Conn, req: pb::ReadBlockRequest) -> Result<First, tonic::Status> {
        if let Some(pool) = self.membership.block_pool(conn)
            // Whether the worker speaks the transport is settled before the call: an old worker
            // must not count as having taken (or refused) a token during a rotation.
            && pool.ready().await?
        {
            let (stream, first) = self
                .membership
                .call(conn, req, |call| {
                    let authorization = call
                        .metadata()
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                        .unwrap_or_else(|| self.membership.authorization());
                    let pool = pool.clone();
                    async move {
                        pool.start(authorization, call.into_inner())
                            .await
                            .map_err(|e| match e {
                                StartError::Status(s) => s,
                                // A kept connection was closed and the new one found a worker
                                // that no longer speaks the transport (rolled back): this read
                                // fails over, the next ones use gRPC.
                                StartError::Unsupported => tonic::Status::unavailable(
                                    "the worker stopped speaking the block transport",
                                ),
                            })
                    }
                })
                .await?;
            return Ok(First::Blocks(stream, first));
        }
        let (stream, first) = self
            .membership
            .call(conn, req, |req| {
                let mut client = conn.client.clone();
                async move {
                    let mut stream = client.read_block(req).await?.into_inner();
                    let first = stream.message().await?;
                    Ok::<_, tonic::Status>((stream, first))
                }
            })
            .await?;
        Ok(First::Grpc(stream, first))
    }

    /// The rest of a gRPC answer: its chunks, joined.
    async fn rest_grpc(
        &self,
        id: &str,
        mut stream: tonic::Streaming<pb::Chunk>,
        first: Option<pb::Chunk>,
        want: usize,
    ) -> Result<(Bytes, &'static str), tonic::Status> {
        let mut origin = None;
        let mut parts: Vec<Bytes> = Vec::new();
        let mut received = 0usize;
        let mut next = first;
        while let Some(c) = next {
            // A block is at most `want` bytes: a worker that sends more (broken, or not a
            // worker at all) fails the call before its bytes are kept, so one call never
            // holds more than a block plus one message (at most the client's message size).
            received = received.saturating_add(c.data.len());
            if received > want {
                return Err(tonic::Status::data_loss(format!(
                    "the worker sent more than the block's {want} bytes"
                )));
            }
            if origin.is_none() && c.served_from != pb::Tier::Unspecified as i32 {
                origin = Some(tier_label(c.served_from));
            }
            if !c.data.is_empty() {
                parts.push(c.data);
            }
            next = stream.message().await?;
            // Each message (data, or the worker's heartbeat while it waits on its lake)
            // shows the worker alive.
            self.health.progress(id);
        }
        Ok((join(parts, want), origin.unwrap_or("source")))
    }

    /// The rest of a block transport answer: heartbeats, then the bytes, received into one
    /// buffer.
    async fn rest_blocks(
        &self,
        id: &str,
        mut stream: BlockStream,
        first: Event,
        want: usize,
    ) -> Result<(Bytes, &'static str), tonic::Status> {
        let mut next = first;
        loop {
            match next {
                Event::Beat => {
                    next = stream.next().await?;
                    self.health.progress(id);
                }
                Event::Data(d) => {
                    // As over gRPC: never more than the block's bytes are taken in.
                    if d.offset != 0 || d.length > want as u64 {
                        return Err(tonic::Status::data_loss(format!(
                            "the worker sent {} bytes at {} for a whole block of {want}",
                            d.length, d.offset
                        )));
                    }
                    let bytes = stream
                        .body(d.length as usize, || self.health.progress(id))
                        .await?;
                    return Ok((bytes, tier_label(d.served_from)));
                }
            }
        }
    }
}

/// A worker's first answer to a block read, on either transport.
enum First {
    Grpc(tonic::Streaming<pb::Chunk>, Option<pb::Chunk>),
    Blocks(BlockStream, Event),
}

/// The origin label of a tier as a worker sends it.
fn tier_label(served_from: i32) -> &'static str {
    match pb::Tier::try_from(served_from) {
        Ok(pb::Tier::Memory) => "memory",
        Ok(pb::Tier::Disk) => "disk",
        _ => "source",
    }
}

/// A listing in name order: lookups binary-search it.
fn sorted(mut v: Vec<DirEntry>) -> Vec<DirEntry> {
    if !v.is_sorted_by(|a, b| a.name <= b.name) {
        v.sort_by(|a, b| a.name.cmp(&b.name));
    }
    v
}

/// One attempt of a block read in flight.
struct Running {
    /// Index of the owner asked.
    owner: usize,
    /// Set once the worker gave its first answer.
    answered: Arc<AtomicBool>,
    /// A hedge's question: from the worker's tiers only.
    cached_only: bool,
    task: tokio::task::JoinHandle<Attempt<(Bytes, &'static str)>>,
}

/// The attempts of one block read. When the read ends (answered, failed, or dropped by its
/// caller's deadline), attempts whose worker answered are cancelled; those still waiting for a
/// first answer run on to their deadline, so that a hung worker is found out and ejected.
struct Attempts(Vec<Running>);

impl Drop for Attempts {
    fn drop(&mut self) {
        for r in &self.0 {
            if r.answered.load(Ordering::Acquire) {
                r.task.abort();
            }
        }
    }
}

/// The chunks of a block as one buffer; a block of one chunk is not copied.
fn join(mut parts: Vec<Bytes>, want: usize) -> Bytes {
    parts.retain(|p| !p.is_empty());
    match parts.len() {
        0 => Bytes::new(),
        1 => parts.pop().unwrap_or_default(),
        _ => {
            let mut b = BytesMut::with_capacity(want);
            for p in parts {
                b.extend_from_slice(&p);
            }
            b.freeze()
        }
    }
}

impl Reader {
    pub fn new(
        cfg: ReaderConfig,
        membership: Arc<Membership>,
        source: Option<Arc<dyn Source>>,
    ) -> Self {
        let metrics = Arc::new(ReaderMetrics::default());
        Self {
            cfg,
            membership,
            source,
            listings: Default::default(),
            listing_budget: DEFAULT_LISTING_BUDGET,
            list_gates: Default::default(),
            local: HashMap::new(),
            health: Arc::new(Health::new(metrics.clone())),
            metrics,
        }
    }

    /// Reads the blocks of member `id` by calling `blocks` (a worker in this process).
    pub fn with_local_worker(mut self, id: &str, blocks: Arc<dyn LocalBlocks>) -> Self {
        self.local.insert(id.to_string(), blocks);
        self
    }

    /// Keeps at most `entries` directory entries of listings (at least one directory).
    pub fn with_listing_budget(mut self, entries: usize) -> Self {
        self.listing_budget = entries.max(1);
        self
    }

    pub fn config(&self) -> &ReaderConfig {
        &self.cfg
    }

    pub fn membership(&self) -> &Arc<Membership> {
        &self.membership
    }

    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// Entries of listings held now.
    pub fn listing_entries(&self) -> usize {
        self.listings.lock().entries
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

    /// The members to ask for an item, best first: healthy owners in rendezvous order, then
    /// suspect ones, then, when the reader cannot read the source itself, the ejected ones
    /// (better a slow answer than none).
    fn candidates(&self, item: u128) -> Vec<Arc<Conn>> {
        let (usable, ejected): (Vec<_>, Vec<_>) = self
            .membership
            .owners(item)
            .into_iter()
            .partition(|c| !self.health.is_ejected(&c.member.id));
        let (mut order, suspect): (Vec<_>, Vec<_>) = usable
            .into_iter()
            .partition(|c| !self.health.is_suspect(&c.member.id));
        order.extend(suspect);
        let direct = self.cfg.direct_fallback && self.source.is_some();
        if !direct {
            order.extend(ejected);
        }
        order
    }

    fn cached_listing(&self, dir: &str) -> Option<Arc<Vec<DirEntry>>> {
        let mut listings = self.listings.lock();
        let l = listings.map.get(dir)?;
        let fresh = self.cfg.metadata_ttl.is_none_or(|ttl| l.at.elapsed() < ttl);
        let entries = l.entries.clone();
        if fresh {
            listings.map.to_back(dir);
            Some(entries)
        } else {
            None
        }
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
                self.listing_budget,
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
        // Bounded by the caller's deadline: a pass per pause while every worker refuses.
        let mut pause = None;
        loop {
            let mut changes = self.changes();
            let mut refused = false;
            for conn in self.candidates(path_item(dir)) {
                match self.list_on(&conn, dir).await {
                    Ok(v) => return Ok(sorted(v)),
                    Err(Miss::Final(e)) => return Err(e),
                    Err(Miss::Fault) => {
                        if self.health.failed(&conn.member.id) {
                            self.health
                                .watch(conn.member.id.clone(), self.membership.clone());
                        }
                        self.metrics.failovers.inc();
                    }
                    Err(Miss::Next) => {
                        self.metrics.failovers.inc();
                    }
                    Err(Miss::Refused) => {
                        refused = true;
                        self.metrics.failovers.inc();
                    }
                }
            }
            if !(refused && self.wait_after_refusal(&mut changes, &mut pause).await) {
                break;
            }
        }
        match &self.source {
            Some(s) if self.cfg.direct_fallback => s.list(dir).await.map(sorted).map_err(from_lake),
            _ => Err(ReadError::Unavailable(format!("{dir}: no worker answered"))),
        }
    }

    /// A listing from one worker: its first page (the worker sends one at once, empty if it
    /// must ask the source) within the first-answer deadline, each next page within the worker
    /// timeout. A worker older than `ListPages` is asked with `List`.
    async fn list_on(&self, conn: &Conn, dir: &str) -> Attempt<Vec<DirEntry>> {
        let id = conn.member.id.as_str();
        let started = Instant::now();
        let deadline = self.health.first_answer_deadline(self.cfg.worker_timeout);
        let req = pb::ListRequest {
            path: dir.to_string(),
        };
        let first = self.membership.call(conn, req.clone(), |req| {
            let mut client = conn.client.clone();
            async move {
                let mut pages = client.list_pages(req).await?.into_inner();
                let first = pages.message().await?;
                Ok::<_, tonic::Status>((pages, first))
            }
        });
        let (mut pages, first) = match tokio::time::timeout(deadline, first).await {
            Ok(Ok(found)) => found,
            Ok(Err(s)) if s.code() == Code::Unimplemented => {
                return self.list_whole(conn, req).await;
            }
            Ok(Err(s)) => return Err(classify(s, dir, id)),
            Err(_) => return Err(Miss::Fault),
        };
        self.health.answered(id, started.elapsed());
        let mut entries = Vec::new();
        let mut page = first;
        while let Some(p) = page {
            entries.extend(p.entries.into_iter().filter_map(entry_from));
            // Past the first page the worker is alive: a page that takes too long is the
            // source's slowness, not the worker's fault.
            page = match tokio::time::timeout(self.cfg.worker_timeout, pages.message()).await {
                Ok(Ok(p)) => p,
                Ok(Err(s)) => return Err(classify(s, dir, id)),
                Err(_) => return Err(Miss::Next),
            };
        }
        Ok(entries)
    }

    /// A listing in one message, from a worker that predates `ListPages`.
    async fn list_whole(&self, conn: &Conn, req: pb::ListRequest) -> Attempt<Vec<DirEntry>> {
        let dir = req.path.clone();
        let call = self.membership.call(conn, req, |req| {
            let mut client = conn.client.clone();
            async move { client.list(req).await }
        });
        match tokio::time::timeout(self.cfg.worker_timeout, call).await {
            Ok(Ok(r)) => Ok(r
                .into_inner()
                .entries
                .into_iter()
                .filter_map(entry_from)
                .collect()),
            Ok(Err(s)) => Err(classify(s, &dir, &conn.member.id)),
            Err(_) => Err(Miss::Fault),
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
            .bounded(&what, self.block_uncached(key, meta.size))
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

    /// Asks the block's owners in turn, hedging a silent one:
    ///
    /// - after the hedge delay (about the p99 of first answers) with no answer, the next owner
    ///   is asked whether it holds the block (`cached_only`: no lake read if it does not), if a
    ///   hedge token is left;
    /// - once the owner asked is suspect (no sign of life, not even the heartbeat it sends while
    ///   it waits on its lake, while calls wait on it), the next owner is asked in full, without
    ///   a token: that is the failover of a hung worker, before or after its first answer;
    /// - an owner that answers and keeps sending signs of life is waited for (a slow lake is not
    ///   hedged), and a failed attempt moves on to the next owner unless another still may
    ///   answer.
    async fn block_uncached(&self, key: BlockKey, size: u64) -> Result<Bytes, ReadError> {
        // Bounded by the caller's deadline: a pass per pause while every worker refuses, and
        // by the membership's worker wait while none answers.
        let mut pause = None;
        let mut unanswered_since: Option<Instant> = None;
        loop {
            let mut changes = self.changes();
            let mut refused = false;
            let mut unanswered = false;
            match self
                .block_pass(key.clone(), size, &mut refused, &mut unanswered)
                .await
            {
                Err(e) if refused => {
                    if !self.wait_after_refusal(&mut changes, &mut pause).await {
                        return Err(e);
                    }
                }
                Err(e) if unanswered => {
                    let since = *unanswered_since.get_or_insert_with(Instant::now);
                    let budget = self.membership.worker_wait();
                    if since.elapsed() >= budget {
                        return Err(e);
                    }
                    if pause.is_none() {
                        tracing::warn!(error = %e, "no worker answers; asking again when the workers change, for up to {budget:?}");
                    }
                    let wait = pause.map_or(REFUSED_FIRST_PAUSE, |p: Duration| {
                        (p * 2).min(REFUSED_MAX_PAUSE)
                    });
                    pause = Some(wait);
                    tokio::select! {
                        _ = changes.members.changed() => {}
                        _ = tokio::time::sleep(wait.min(budget.saturating_sub(since.elapsed()))) => {}
                    }
                }
                r => return r,
            }
        }
    }

    fn changes(&self) -> Changes {
        Changes {
            tokens: self.membership.token_changes(),
            members: self.membership.member_changes(),
        }
    }

    /// Whether to try again after every worker refused the token (both tokens, when a previous
    /// one is kept), and when: when the token may be rotated, after a pause that grows from
    /// [`REFUSED_FIRST_PAUSE`] to [`REFUSED_MAX_PAUSE`], or at once when the token or the
    /// member list changes (or changed since `changes` was taken). During a rotation the
    /// workers and this reader take the new token at different moments: the workers may roll
    /// before kubelet publishes the volume again (about a minute on a real kubelet) or
    /// restart with a token this reader already holds. The caller's deadline bounds the
    /// passes (the FUSE server's is 120 s).
    async fn wait_after_refusal(
        &self,
        changes: &mut Changes,
        pause: &mut Option<Duration>,
    ) -> bool {
        if !self.membership.token_rotates() || self.cfg.direct_fallback && self.source.is_some() {
            return false;
        }
        let wait = match *pause {
            None => {
                tracing::warn!(
                    "every worker refused the data-plane token; retrying until the workers or \
                     this reader take the new one"
                );
                REFUSED_FIRST_PAUSE
            }
            Some(p) => (p * 2).min(REFUSED_MAX_PAUSE),
        };
        *pause = Some(wait);
        tokio::select! {
            _ = changes.tokens.changed() => {}
            _ = changes.members.changed() => {}
            _ = tokio::time::sleep(wait) => {}
        }
        true
    }

    /// One pass over the block's owners (see [`Reader::block_uncached`]); sets `refused` when
    /// a worker refused the token, `unanswered` when no worker gave an answer.
    async fn block_pass(
        &self,
        key: BlockKey,
        size: u64,
        refused: &mut bool,
        unanswered: &mut bool,
    ) -> Result<Bytes, ReadError> {
        let owners = self.candidates(key.id().0);
        self.health.earn();
        let call = Arc::new(BlockCall {
            key,
            size,
            block_size: self.cfg.block_size,
            first_deadline: self.health.first_answer_deadline(self.cfg.worker_timeout),
            worker_timeout: self.cfg.worker_timeout,
            health: self.health.clone(),
            membership: self.membership.clone(),
            metrics: self.metrics.clone(),
        });
        let started = tokio::time::Instant::now();
        let mut running = Attempts(Vec::new());
        let mut next = 0;
        // When to look at hedging next; `None` once it is settled.
        let mut hedge_at = Some(started + self.health.hedge_delay());
        let mut asked_cached = false;
        let mut hedge: Option<usize> = None;
        let start = |i: usize, cached_only: bool, running: &mut Attempts| {
            let conn = owners[i].clone();
            let local = self.local.get(&conn.member.id).cloned();
            let answered = Arc::new(AtomicBool::new(false));
            let task =
                tokio::spawn(
                    call.clone()
                        .attempt(conn, local, answered.clone(), cached_only),
                );
            running.0.push(Running {
                owner: i,
                answered,
                cached_only,
                task,
            });
        };
        let outcome = loop {
            if running.0.is_empty() {
                if next >= owners.len() {
                    break None;
                }
                start(next, false, &mut running);
                next += 1;
            }
            let done = futures::future::select_all(running.0.iter_mut().map(|r| &mut r.task));
            let wake = hedge_at.unwrap_or(started);
            tokio::select! {
                (r, pos, _) = done => {
                    let finished = running.0.swap_remove(pos);
                    let r = r.unwrap_or_else(|e| {
                        Err(Miss::Final(ReadError::Unavailable(format!("read task failed: {e}"))))
                    });
                    match r {
                        Ok(found) => {
                            if hedge == Some(finished.owner) {
                                self.metrics.hedge_wins.inc();
                            }
                            break Some(Ok(found));
                        }
                        Err(Miss::Final(e)) if !finished.cached_only => break Some(Err(e)),
                        Err(_) if finished.cached_only => {}
                        Err(miss) => {
                            *refused |= matches!(miss, Miss::Refused);
                            self.metrics.failovers.inc();
                            // Move on now, unless an attempt still running may answer.
                            if !running.0.is_empty()
                                && !running.0.iter().any(|r| !r.cached_only)
                                && next < owners.len()
                            {
                                start(next, false, &mut running);
                                next += 1;
                            }
                        }
                    }
                }
                _ = tokio::time::sleep_until(wake), if hedge_at.is_some() => {
                    if next >= owners.len() {
                        // Nobody left to ask: wait for the attempts running.
                        hedge_at = None;
                        continue;
                    }
                    let full: Vec<&Running> = running.0.iter().filter(|r| !r.cached_only).collect();
                    let suspect = full
                        .iter()
                        .any(|r| self.health.is_suspect(&owners[r.owner].member.id));
                    if suspect {
                        // The worker fell silent (before or after its first answer): ask the
                        // next owner in full.
                        self.metrics.hedges.inc();
                        hedge = Some(next);
                        start(next, false, &mut running);
                        next += 1;
                        hedge_at = None;
                        continue;
                    }
                    let answered = full.iter().any(|r| r.answered.load(Ordering::Acquire));
                    if !answered && !asked_cached && self.health.take_hedge() {
                        self.metrics.hedges.inc();
                        hedge = Some(next);
                        start(next, true, &mut running);
                    }
                    asked_cached = true;
                    // Keep watching for silence while the read lasts.
                    hedge_at = Some(tokio::time::Instant::now() + self.health.suspect_after() / 2);
                }
            }
        };
        drop(running);
        match outcome {
            Some(Ok((bytes, origin))) => {
                self.count(origin, bytes.len());
                return Ok(bytes);
            }
            Some(Err(e)) => {
                // A final answer: another token would not change it.
                *refused = false;
                return Err(e);
            }
            None => {}
        }
        let key = &call.key;
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
            _ => {
                *unanswered = true;
                Err(ReadError::Unavailable(format!(
                    "{} block {}: no worker answered and direct reads are off",
                    key.path, key.index
                )))
            }
        }
    }

    fn count(&self, origin: &str, len: usize) {
        let l = OriginLabel {
            origin: origin.to_string(),
        };
        self.metrics.blocks.get_or_create(&l).inc();
        self.metrics.bytes.get_or_create(&l).inc_by(len as u64);
    }
}

fn entry_from(e: pb::DirEntry) -> Option<DirEntry> {
    Some(DirEntry {
        meta: meta_from(e.attributes.as_ref()?),
        name: e.name,
    })
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
