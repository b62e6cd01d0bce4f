//! The block store: a Memory tier and a Disk tier of raw block files.
//!
//! Each tier is a directory: the Memory tier's lies on a tmpfs the worker owns (an emptyDir with
//! `medium: Memory` in Kubernetes, `/dev/shm` on one machine), the Disk tier's on a local disk.
//! A block is stored as its raw bytes in `<id>.blk`, so that a block, or a small file that is one
//! block, can be handed to the kernel as a FUSE passthrough backing file; beside it `<id>.meta`
//! holds the block's key, length and CRC32C. Files appear by rename, so a reader never sees a
//! half-written block.
//!
//! The tiers are exclusive and form one LRU chain: new blocks enter the first tier, its least
//! recently used block is demoted to the next tier when it overflows, and the last tier evicts.
//! The door is guarded by the frequency admission of [`crate::policy`]: when the whole store is
//! full, a newcomer gets in only if it was requested more often than the block it would push
//! out. A hit in a lower tier is promoted to the first tier by the same rule.
//!
//! Reads verify the block's length and CRC32C; a bad block is deleted and reported as a miss, so
//! the caller fetches it again and the bad bytes never reach a reader. Every read of a Disk tier
//! block is checked (disks are where bits rot). A Memory tier block is checked by its first read
//! after it came in from anywhere but our own write (a restart's rebuild, a promotion, a
//! demotion) and then trusted: it is RAM that only this worker writes, and the check was 8% of
//! the warm read path's time.
//! At start the index is rebuilt from the `.meta` files, so a restarted worker keeps its cache.
//!
//! A tier's size is what the worker is told, not what its filesystem has left: a Disk tier on a
//! shared disk can fill up (ENOSPC) long before its size is reached. The index moves a block
//! to its new tier when the move is decided, so a failed copy must not just be logged: the block
//! would stay as a file in the tier it came from, uncounted, and that tier's real usage would
//! creep past its size one failure at a time. Instead a failed write or move evicts the block:
//! its files are removed from both directories (temporary files included), its index entry from
//! whichever tier holds it, and the failure is counted per tier and logged with the directory.
//! The block is a miss next time; nothing else changes.
//!
//! The index is a mutex-guarded map. Changes to files (writes, moves between tiers, deletes)
//! are decided under the index lock and carried out in that order under a second lock that
//! serialises them; reads take neither lock while reading. A reader that finds a block's file
//! gone looks in the other tiers, then once more with file changes paused, and only then drops
//! the index entry and treats the read as a miss.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use hashlink::LinkedHashMap;
use lakecache_lake::{BlockId, BlockKey};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::metrics::WorkerMetrics;
use crate::policy::{FrequencySketch, admit};

/// The kind of a tier (the configuration file's and the CRD's).
pub use lakecache_api::TierKind;

/// A tier as configured.
#[derive(Debug, Clone)]
pub struct TierSpec {
    pub kind: TierKind,
    pub dir: PathBuf,
    pub capacity: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    len: u64,
    crc: u32,
    /// Checked since it entered its tier (or written there by us): Memory reads skip the CRC.
    verified: bool,
}

#[derive(Debug)]
struct TierState {
    spec: TierSpec,
    used: u64,
    lru: LinkedHashMap<BlockId, Entry>,
}

impl TierState {
    fn block_path(&self, id: BlockId) -> PathBuf {
        self.spec.dir.join(format!("{id}.blk"))
    }
}

struct Inner {
    tiers: Vec<TierState>,
    sketch: FrequencySketch,
    /// Blocks whose file is being written; their space is already counted in the first tier.
    pending: std::collections::HashSet<BlockId>,
}

impl Inner {
    fn find(&self, id: BlockId) -> Option<usize> {
        self.tiers.iter().position(|t| t.lru.contains_key(&id))
    }
}

/// What the sidecar `.meta` file holds.
#[derive(Debug, Serialize, Deserialize)]
struct BlockMeta {
    path: String,
    version: String,
    index: u64,
    len: u64,
    crc32c: u32,
}

/// A file move or deletion decided under the lock and carried out after it.
#[derive(Debug)]
enum Action {
    /// Moves a block's files into the tier `tier` (where the index already has it).
    Move {
        id: BlockId,
        from: PathBuf,
        to: PathBuf,
        tier: TierKind,
    },
    Delete {
        id: BlockId,
        dir: PathBuf,
    },
}

/// Usage of one tier.
#[derive(Debug, Clone)]
pub struct TierUsage {
    pub kind: TierKind,
    pub capacity: u64,
    pub used: u64,
    pub blocks: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot use tier directory {0}: {1}")]
    Dir(PathBuf, std::io::Error),
    #[error("tier {0:?} of {1} bytes is smaller than one block of {2} bytes")]
    TooSmall(TierKind, u64, u64),
    #[error("no tiers configured: give a Memory or a Disk tier")]
    NoTiers,
}

/// Where memory tiers without a directory of their own go: shared memory, as an emptyDir of
/// medium Memory is in Kubernetes.
pub const SHM: &str = "/dev/shm";

/// Makes a private directory for a memory tier outside Kubernetes:
/// `/dev/shm/lakecache-<pid>-<tag>-<random>`, created (never reused) with mode 0700, so no other
/// local user can read the cached data, guess the name, or plant a symlink there beforehand.
/// The pid in the name lets [`remove_stale_memory_dirs`] clean up after a process that died.
pub fn private_memory_dir(tag: &str) -> std::io::Result<PathBuf> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("lakecache-{}-{tag}-", std::process::id()))
        .rand_bytes(12)
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir_in(SHM)?;
    Ok(dir.keep())
}

/// The memory tiers [`private_memory_dir`] made for process `pid` that are still there.
pub fn memory_dirs_of(pid: u32) -> Vec<PathBuf> {
    let prefix = format!("lakecache-{pid}-");
    let Ok(entries) = std::fs::read_dir(SHM) else {
        return vec![];
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .map(|e| e.path())
        .collect()
}

/// Removes the memory tiers of processes that are gone (SIGKILL, a crash: shared memory
/// outlives its process), as made by [`private_memory_dir`]: only directories (never what a
/// symlink points to) named `lakecache-<pid>-…` whose process is gone and which this user owns.
/// Returns what it removed.
pub fn remove_stale_memory_dirs() -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let Ok(me) = std::fs::metadata("/proc/self").map(|m| m.uid()) else {
        return vec![];
    };
    let Ok(entries) = std::fs::read_dir(SHM) else {
        return vec![];
    };
    let mut removed = vec![];
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("lakecache-"))
            .and_then(|n| n.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = e.path();
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() && m.uid() == me => {}
            _ => continue,
        }
        if std::fs::remove_dir_all(&path).is_ok() {
            removed.push(path);
        }
    }
    removed
}

/// The tiered block store.
pub struct BlockStore {
    shared: Arc<Shared>,
}

struct Shared {
    inner: Mutex<Inner>,
    /// Serialises every change to the files (writes, moves, deletes) in the order the index
    /// decided them: each change is decided under `inner` while `io` is held, then carried out
    /// before `io` is released. Reads take neither lock while they read a file.
    io: Mutex<()>,
    metrics: Arc<WorkerMetrics>,
    buffers: Arc<BufferPool>,
}

/// Block-sized read buffers, kept for reuse once a reader is done with them. A freshly
/// allocated buffer costs a page fault per 4 KiB the first time it is filled, which was a third
/// of the first warm epoch's time; a kept one is already mapped.
#[derive(Debug)]
struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
    size: usize,
    keep: usize,
}

impl BufferPool {
    /// A buffer for a file of `len` bytes. Small files (an image in one block) get a buffer of
    /// their own size rather than hold a block-sized one.
    fn take(&self, len: usize) -> Vec<u8> {
        if len <= self.size / 2 || len > self.size {
            return Vec::with_capacity(len);
        }
        self.free
            .lock()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.size))
    }

    /// Adds one buffer, its pages touched, if the pool is short. Called on the write path of
    /// blocks fetched from the lake: there the CPU waits on the network anyway, and the first
    /// warm epoch then finds its buffers mapped instead of faulting them in.
    fn fill_one(&self) {
        if self.free.lock().len() >= self.keep {
            return;
        }
        // Written, not calloc'ed: a zeroed allocation would map its pages only when touched.
        let mut buf = Vec::with_capacity(self.size);
        buf.resize(self.size, 1u8);
        buf.clear();
        self.give_back(buf);
    }

    fn give_back(&self, mut buf: Vec<u8>) {
        if buf.capacity() >= self.size {
            let mut free = self.free.lock();
            if free.len() < self.keep {
                buf.clear();
                free.push(buf);
            }
        }
    }
}

/// How many buffers the pool keeps: a sixteenth of the Memory tier (the worker's memory budget
/// is its Memory tier plus 15%, and the pool is resident for good), at most 64 blocks and
/// 256 MiB, at least 2. Enough for the blocks that a few sequential readers hold at once.
fn pool_size(tiers: &[TierState], block_size: u64) -> usize {
    let memory: u64 = tiers
        .iter()
        .filter(|t| t.spec.kind == TierKind::Memory)
        .map(|t| t.spec.capacity)
        .sum();
    ((memory / 16 / block_size) as usize)
        .min(64)
        .min((256 << 20) / block_size as usize)
        .max(2)
}

/// Block bytes in a pooled buffer; the buffer goes back to the pool when the last `Bytes` that
/// shares it is dropped.
struct Pooled {
    buf: Vec<u8>,
    pool: Arc<BufferPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

impl BufferPool {
    /// Reads a whole block file into a buffer from the pool.
    fn read(self: &Arc<Self>, path: &Path) -> std::io::Result<Bytes> {
        use std::io::Read;
        let mut file = std::fs::File::open(path)?;
        let len = file.metadata()?.len() as usize;
        let mut buf = self.take(len);
        buf.reserve_exact(len.saturating_sub(buf.capacity()));
        file.read_to_end(&mut buf)?;
        Ok(Bytes::from_owner(Pooled {
            buf,
            pool: self.clone(),
        }))
    }
}

/// A cached block's bytes: read into memory, or the open file of a Memory tier block that
/// passed its check, which the block transport hands to the kernel (`sendfile`) unread.
///
/// An open file is a consistent copy: block files appear by rename and are never written in
/// place, so a block moved to another tier or evicted while its file is open keeps its bytes
/// for whoever holds the descriptor.
#[derive(Debug)]
pub enum Body {
    Bytes(Bytes),
    File { file: std::fs::File, len: u64 },
}

impl Body {
    pub fn len(&self) -> u64 {
        match self {
            Body::Bytes(b) => b.len() as u64,
            Body::File { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes, read from the file if need be.
    pub fn into_bytes(self) -> std::io::Result<Bytes> {
        match self {
            Body::Bytes(b) => Ok(b),
            Body::File { file, len } => {
                use std::io::Read;
                let mut buf = Vec::with_capacity(len as usize);
                file.take(len).read_to_end(&mut buf)?;
                if buf.len() as u64 != len {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("block file ended after {} of {len} bytes", buf.len()),
                    ));
                }
                Ok(Bytes::from(buf))
            }
        }
    }
}

/// What [`BlockStore::get`] found.
#[derive(Debug)]
pub enum Lookup {
    Hit {
        body: Body,
        tier: TierKind,
    },
    /// Not cached; `past` is how often it was requested before (for admission).
    Miss {
        past: u8,
    },
}

impl BlockStore {
    /// Opens the tiers, creating their directories, and rebuilds the index from what is on disk.
    pub fn open(
        specs: Vec<TierSpec>,
        block_size: u64,
        metrics: Arc<WorkerMetrics>,
    ) -> Result<Self, StoreError> {
        if specs.is_empty() {
            return Err(StoreError::NoTiers);
        }
        let mut tiers: Vec<TierState> = Vec::new();
        let mut total_blocks = 0usize;
        for spec in specs {
            if spec.capacity < block_size {
                return Err(StoreError::TooSmall(spec.kind, spec.capacity, block_size));
            }
            // Directories the store makes are private (0700); block files are 0600.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&spec.dir)
                .map_err(|e| StoreError::Dir(spec.dir.clone(), e))?;
            total_blocks += (spec.capacity / block_size) as usize;
            let (mut lru, mut used) =
                rebuild(&spec).map_err(|e| StoreError::Dir(spec.dir.clone(), e))?;
            // A crash in the middle of a move can leave a block in two tiers: keep the copy in
            // the upper tier and delete this one.
            let dups: Vec<BlockId> = lru
                .keys()
                .filter(|id| tiers.iter().any(|t| t.lru.contains_key(id)))
                .copied()
                .collect();
            for id in dups {
                if let Some(e) = lru.remove(&id) {
                    used -= e.len;
                }
                if let Err(e) = delete_block(id, &spec.dir) {
                    tracing::warn!(block = %id, dir = %spec.dir.display(), error = %e,
                        "cannot delete a duplicate block file");
                }
            }
            tracing::info!(tier = spec.kind.label(), dir = %spec.dir.display(), blocks = lru.len(),
                used, capacity = spec.capacity, "tier index rebuilt");
            tiers.push(TierState { spec, used, lru });
        }
        let keep = pool_size(&tiers, block_size);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                tiers,
                sketch: FrequencySketch::new(total_blocks),
                pending: Default::default(),
            }),
            io: Mutex::new(()),
            metrics,
            buffers: Arc::new(BufferPool {
                free: Mutex::new(Vec::new()),
                size: block_size as usize,
                keep,
            }),
        });
        // A tier that shrank since the last run gives back what no longer fits.
        let actions = {
            let mut inner = shared.inner.lock();
            let mut actions = Vec::new();
            cascade(&mut inner, 0, &mut actions, &shared.metrics);
            actions
        };
        shared.run_actions(actions);
        let store = Self { shared };
        store.shared.publish_usage();
        Ok(store)
    }

    /// Looks a block up, records the request for admission, and reads it if cached.
    pub async fn get(&self, key: &BlockKey) -> Lookup {
        self.lookup(key, false).await
    }

    /// As [`BlockStore::get`], but a Memory tier block that passed its check comes as its open
    /// file, unread ([`Body::File`]).
    pub async fn get_file(&self, key: &BlockKey) -> Lookup {
        self.lookup(key, true).await
    }

    async fn lookup(&self, key: &BlockKey, files: bool) -> Lookup {
        let id = key.id();
        let (past, found) = {
            let mut inner = self.shared.inner.lock();
            let past = inner.sketch.estimate(id.short());
            inner.sketch.record(id.short());
            let found = inner.find(id).map(|t| {
                let tier = &mut inner.tiers[t];
                (t, *tier.lru.to_back(&id).expect("found above"))
            });
            (past, found)
        };
        let Some((t, entry)) = found else {
            return Lookup::Miss { past };
        };
        if files
            && t == 0
            && let Some(body) = self.shared.open_trusted(id, t)
        {
            return Lookup::Hit {
                body,
                tier: TierKind::Memory,
            };
        }
        let shared = self.shared.clone();
        let read = tokio::task::spawn_blocking(move || {
            let hit = shared.read_verified(id, t, entry);
            // Promotion moves files: do it before answering, so that the file moves of one
            // request are over when it returns (a restart right after loses nothing). A hit in
            // the first tier has nowhere to go.
            if hit.is_some() && t > 0 {
                shared.maybe_promote(id);
            }
            hit
        })
        .await;
        match read {
            Ok(Some((bytes, kind))) => Lookup::Hit {
                body: Body::Bytes(bytes),
                tier: kind,
            },
            _ => Lookup::Miss { past },
        }
    }

    /// Offers a block fetched from the source. Returns whether it was admitted.
    pub async fn put(&self, key: &BlockKey, past: u8, bytes: Bytes) -> bool {
        let shared = self.shared.clone();
        let key = key.clone();
        tokio::task::spawn_blocking(move || shared.put(&key, past, &bytes))
            .await
            .unwrap_or(false)
    }

    /// Usage of every tier, first tier first.
    pub fn usage(&self) -> Vec<TierUsage> {
        self.shared.usage()
    }

    /// The path of a cached block's file, if cached (for passthrough and tests).
    pub fn block_file(&self, key: &BlockKey) -> Option<(TierKind, PathBuf)> {
        let id = key.id();
        let inner = self.shared.inner.lock();
        inner
            .find(id)
            .map(|t| (inner.tiers[t].spec.kind, inner.tiers[t].block_path(id)))
    }
}

impl Shared {
    /// The tier directories, the one at index `first` first.
    fn dirs(&self, first: usize) -> Vec<(TierKind, PathBuf)> {
        let inner = self.inner.lock();
        let mut dirs: Vec<_> = inner
            .tiers
            .iter()
            .map(|t| (t.spec.kind, t.spec.dir.clone()))
            .collect();
        let last = dirs.len() - 1;
        dirs.swap(0, first.min(last));
        dirs
    }

    /// Reads a block's file wherever it is, and checks its length and CRC32C. A block that is
    /// nowhere, or bad, leaves the index (and a bad file is deleted), and `None` is returned.
    fn read_verified(&self, id: BlockId, t: usize, entry: Entry) -> Option<(Bytes, TierKind)> {
        let attempt = || -> Option<(Bytes, TierKind, PathBuf)> {
            for (kind, dir) in self.dirs(t) {
                let path = dir.join(format!("{id}.blk"));
                match self.buffers.read(&path) {
                    Ok(data) => return Some((data, kind, path)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => {
                        tracing::warn!(block = %id, path = %path.display(), error = %e,
                            "cannot read block file");
                        return None;
                    }
                }
            }
            None
        };
        let found = match attempt() {
            Some(f) => Some(f),
            None => {
                // The file may have been between tiers: look again with file changes paused,
                // and only then drop the entry.
                let _io = self.io.lock();
                let again = attempt();
                if again.is_none() {
                    self.forget(id);
                }
                again
            }
        };
        let (data, kind, path) = found?;
        // Wrong bytes are the one failure a cache must never show: check unless this is a
        // Memory tier block that was checked already (see the module's comment).
        let trusted = kind == TierKind::Memory && entry.verified;
        if data.len() as u64 == entry.len && (trusted || crc32c::crc32c(&data) == entry.crc) {
            if kind == TierKind::Memory && !trusted {
                self.mark_verified(id);
            }
            return Some((data, kind));
        }
        self.metrics.corrupt_blocks.inc();
        tracing::warn!(block = %id, path = %path.display(), "block failed its checksum; \
            dropping it and fetching it again from the source");
        let _io = self.io.lock();
        self.forget(id);
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        self.run_actions(vec![Action::Delete { id, dir }]);
        None
    }

    /// The open file of block `id` when tier `t` is a Memory tier and the block passed its
    /// check there, with the length its entry says; `None` sends the caller to the read that
    /// checks (a file moved away meanwhile is found there). Opening a file on a tmpfs does not
    /// block, so this runs on the caller's thread.
    fn open_trusted(&self, id: BlockId, t: usize) -> Option<Body> {
        // The entry as it is now, and the file opened under the same lock: a block moved out
        // and back since the lookup (unchecked again) is not taken for the checked one. Opening
        // a file on a tmpfs is quick.
        let inner = self.inner.lock();
        let tier = inner.tiers.get(t)?;
        let entry = *tier.lru.get(&id)?;
        if tier.spec.kind != TierKind::Memory || !entry.verified {
            return None;
        }
        let file = std::fs::File::open(tier.block_path(id)).ok()?;
        drop(inner);
        let len = file.metadata().ok()?.len();
        (len == entry.len).then_some(Body::File { file, len })
    }

    /// Records that a Memory tier block passed its check.
    fn mark_verified(&self, id: BlockId) {
        let mut inner = self.inner.lock();
        if let Some(t) = inner.find(id)
            && inner.tiers[t].spec.kind == TierKind::Memory
            && let Some(e) = inner.tiers[t].lru.get_mut(&id)
        {
            e.verified = true;
        }
    }

    fn forget(&self, id: BlockId) {
        let mut inner = self.inner.lock();
        if let Some(t) = inner.find(id) {
            let tier = &mut inner.tiers[t];
            if let Some(e) = tier.lru.remove(&id) {
                tier.used -= e.len;
            }
        }
        drop(inner);
        self.publish_usage();
    }

    /// Promotes a block hit in a lower tier to the first tier, if it beats that tier's victim.
    fn maybe_promote(&self, id: BlockId) {
        let _io = self.io.lock();
        let actions = {
            let mut inner = self.inner.lock();
            let Some(cur) = inner.find(id) else { return };
            if cur == 0 {
                return;
            }
            let entry = inner.tiers[cur].lru[&id];
            let first = &inner.tiers[0];
            let fits = first.used + entry.len <= first.spec.capacity;
            if !fits {
                let victim = first.lru.front().map(|(v, _)| *v);
                // The hit itself was recorded already: compare the requests before it.
                let mine = inner.sketch.estimate(id.short()).saturating_sub(1);
                let theirs = victim
                    .map(|v| inner.sketch.estimate(v.short()))
                    .unwrap_or(0);
                if !admit(mine, theirs) {
                    return;
                }
            }
            let from = inner.tiers[cur].block_path(id);
            let tier = &mut inner.tiers[cur];
            tier.lru.remove(&id);
            tier.used -= entry.len;
            let moved = Entry {
                verified: false,
                ..entry
            };
            inner.tiers[0].lru.insert(id, moved);
            inner.tiers[0].used += entry.len;
            let to = inner.tiers[0].block_path(id);
            let tier = inner.tiers[0].spec.kind;
            let mut actions = vec![Action::Move { id, from, to, tier }];
            self.metrics.promotions.inc();
            cascade(&mut inner, 0, &mut actions, &self.metrics);
            actions
        };
        self.run_actions(actions);
        self.publish_usage();
    }

    fn put(&self, key: &BlockKey, past: u8, bytes: &[u8]) -> bool {
        let id = key.id();
        let len = bytes.len() as u64;
        let crc = crc32c::crc32c(bytes);
        // Outside the file-change lock: touching a block-sized buffer takes a moment.
        self.buffers.fill_one();
        let _io = self.io.lock();
        let (dir, kind, actions) = {
            let mut inner = self.inner.lock();
            if inner.pending.contains(&id) {
                return true;
            }
            // A cached copy of another length was fetched for a reader with a wrong idea of the
            // object's size (the key does not include it): this one replaces it, or it would be
            // served, and refetched, for good.
            let mut actions = Vec::new();
            if let Some(t) = inner.find(id) {
                let tier = &mut inner.tiers[t];
                if tier.lru[&id].len == len {
                    return true;
                }
                if let Some(old) = tier.lru.remove(&id) {
                    tier.used -= old.len;
                }
                actions.push(Action::Delete {
                    id,
                    dir: tier.spec.dir.clone(),
                });
            }
            let replacing = !actions.is_empty();
            let total_cap: u64 = inner.tiers.iter().map(|t| t.spec.capacity).sum();
            let total_used: u64 = inner.tiers.iter().map(|t| t.used).sum();
            if len > inner.tiers[0].spec.capacity {
                drop(inner);
                self.run_actions(actions);
                self.publish_usage();
                return false;
            }
            // A replacement was admitted already, as the copy it replaces.
            if total_used + len > total_cap && !replacing {
                let last = inner.tiers.last().expect("at least one tier");
                let victim = last.lru.front().map(|(v, _)| *v);
                let theirs = victim
                    .map(|v| inner.sketch.estimate(v.short()))
                    .unwrap_or(0);
                if !admit(past, theirs) {
                    self.metrics.rejections.inc();
                    return false;
                }
            }
            // Reserve the space now; the entry appears in the index once its file is written,
            // so that no reader looks for a file that is not there yet.
            inner.pending.insert(id);
            inner.tiers[0].used += len;
            let dir = inner.tiers[0].spec.dir.clone();
            let kind = inner.tiers[0].spec.kind;
            cascade(&mut inner, 0, &mut actions, &self.metrics);
            (dir, kind, actions)
        };
        self.run_actions(actions);
        let meta = BlockMeta {
            path: key.path.clone(),
            version: key.version.clone(),
            index: key.index,
            len,
            crc32c: crc,
        };
        let ok = match write_block(&dir, id, bytes, &meta) {
            Ok(()) => true,
            Err(e) => {
                self.write_failed(
                    id,
                    kind,
                    &dir,
                    &e,
                    "cannot store a block; serving it uncached",
                );
                remove_block_files(id, &dir);
                false
            }
        };
        {
            let mut inner = self.inner.lock();
            inner.pending.remove(&id);
            if ok {
                inner.tiers[0].lru.insert(
                    id,
                    Entry {
                        len,
                        crc,
                        verified: true,
                    },
                );
            } else {
                inner.tiers[0].used -= len;
            }
        }
        self.publish_usage();
        ok
    }

    /// Carries out file actions decided under the index lock; the caller holds `io`. A move that
    /// fails evicts the block (see the module's comment): a half-done move leaves files in
    /// either directory, so both are cleaned, and the index entry goes wherever it is.
    fn run_actions(&self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Move { id, from, to, tier } => {
                    if let Err(e) = move_block(id, &from, &to) {
                        let to_dir = parent(&to);
                        self.write_failed(id, tier, to_dir, &e, "cannot move a block; evicting it");
                        remove_block_files(id, parent(&from));
                        remove_block_files(id, to_dir);
                        self.forget(id);
                    }
                }
                Action::Delete { id, dir } => {
                    if let Err(e) = delete_block(id, &dir) {
                        tracing::warn!(block = %id, dir = %dir.display(), error = %e,
                            "cannot delete a block file");
                    }
                }
            }
        }
    }

    /// Counts and logs a block file that could not be written into the tier `tier` at `dir`.
    fn write_failed(
        &self,
        id: BlockId,
        tier: TierKind,
        dir: &Path,
        e: &std::io::Error,
        what: &str,
    ) {
        self.metrics
            .tier_write_errors
            .get_or_create(&self.metrics.tier(tier.label()))
            .inc();
        tracing::warn!(block = %id, tier = tier.label(), dir = %dir.display(), error = %e, "{what}");
    }

    fn usage(&self) -> Vec<TierUsage> {
        let inner = self.inner.lock();
        inner
            .tiers
            .iter()
            .map(|t| TierUsage {
                kind: t.spec.kind,
                capacity: t.spec.capacity,
                used: t.used,
                blocks: t.lru.len() as u64,
            })
            .collect()
    }

    fn publish_usage(&self) {
        for u in self.usage() {
            let l = crate::metrics::TierLabel {
                tier: u.kind.label().to_string(),
            };
            self.metrics
                .tier_used_bytes
                .get_or_create(&l)
                .set(u.used as i64);
            self.metrics
                .tier_capacity_bytes
                .get_or_create(&l)
                .set(u.capacity as i64);
            self.metrics
                .tier_blocks
                .get_or_create(&l)
                .set(u.blocks as i64);
        }
    }
}

/// Pushes overflow down from tier `from`: each tier's LRU blocks go to the next tier, the last
/// tier's are evicted.
fn cascade(inner: &mut Inner, from: usize, actions: &mut Vec<Action>, metrics: &WorkerMetrics) {
    for t in from..inner.tiers.len() {
        while inner.tiers[t].used > inner.tiers[t].spec.capacity {
            let Some((victim, entry)) = inner.tiers[t].lru.pop_front() else {
                break;
            };
            inner.tiers[t].used -= entry.len;
            let label = crate::metrics::TierLabel {
                tier: inner.tiers[t].spec.kind.label().into(),
            };
            if t + 1 < inner.tiers.len() {
                let from_path = inner.tiers[t].block_path(victim);
                let next = &mut inner.tiers[t + 1];
                // Demoted blocks enter the next tier as its most recent.
                let moved = Entry {
                    verified: false,
                    ..entry
                };
                if let Some(old) = next.lru.insert(victim, moved) {
                    next.used -= old.len;
                }
                next.used += entry.len;
                actions.push(Action::Move {
                    id: victim,
                    from: from_path,
                    to: next.block_path(victim),
                    tier: next.spec.kind,
                });
                metrics.demotions.get_or_create(&label).inc();
            } else {
                actions.push(Action::Delete {
                    id: victim,
                    dir: inner.tiers[t].spec.dir.clone(),
                });
                metrics.evictions.get_or_create(&label).inc();
            }
        }
    }
}

fn parent(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("."))
}

/// Deletes a block's files from a directory; a file already gone is not an error.
fn delete_block(id: BlockId, dir: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_file(dir.join(format!("{id}.meta")));
    match std::fs::remove_file(dir.join(format!("{id}.blk"))) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Removes every file a block may have in a directory, temporary ones included; best effort,
/// for cleaning up after a failed write.
fn remove_block_files(id: BlockId, dir: &Path) {
    for name in [
        format!("{id}.blk"),
        format!("{id}.meta"),
        format!("{id}.blk.tmp"),
        format!("{id}.meta.tmp"),
    ] {
        let _ = std::fs::remove_file(dir.join(name));
    }
}

fn move_block(id: BlockId, from: &Path, to: &Path) -> std::io::Result<()> {
    let (from_dir, to_dir) = (parent(from), parent(to));
    let from_meta = from_dir.join(format!("{id}.meta"));
    let to_meta = to_dir.join(format!("{id}.meta"));
    // Tiers live on different filesystems, so copy to a temporary name and rename.
    let tmp = to_dir.join(format!("{id}.blk.tmp"));
    match std::fs::copy(from, &tmp) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    let tmp_meta = to_dir.join(format!("{id}.meta.tmp"));
    std::fs::copy(&from_meta, &tmp_meta)?;
    std::fs::rename(&tmp, to)?;
    std::fs::rename(&tmp_meta, &to_meta)?;
    let _ = std::fs::remove_file(&from_meta);
    let _ = std::fs::remove_file(from);
    Ok(())
}

/// Creates (or truncates) a file readable only by this user.
fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

fn write_block(dir: &Path, id: BlockId, bytes: &[u8], meta: &BlockMeta) -> std::io::Result<()> {
    let tmp = dir.join(format!("{id}.blk.tmp"));
    let mut f = private_file(&tmp)?;
    f.write_all(bytes)?;
    drop(f);
    std::fs::rename(&tmp, dir.join(format!("{id}.blk")))?;
    let tmp_meta = dir.join(format!("{id}.meta.tmp"));
    private_file(&tmp_meta)?
        .write_all(&serde_json::to_vec(meta).map_err(std::io::Error::other)?)?;
    std::fs::rename(&tmp_meta, dir.join(format!("{id}.meta")))
}

/// Rebuilds a tier's index from its `.meta` files, oldest first; removes leftovers.
fn rebuild(spec: &TierSpec) -> std::io::Result<(LinkedHashMap<BlockId, Entry>, u64)> {
    let mut found: Vec<(SystemTime, BlockId, Entry)> = Vec::new();
    let mut strays: Vec<PathBuf> = Vec::new();
    for entry in std::fs::read_dir(&spec.dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        let path = entry.path();
        if name.ends_with(".tmp") {
            strays.push(path);
            continue;
        }
        let Some(stem) = name.strip_suffix(".meta") else {
            if let Some(stem) = name.strip_suffix(".blk")
                && !spec.dir.join(format!("{stem}.meta")).exists()
            {
                strays.push(path);
            }
            continue;
        };
        let Some(id) = BlockId::parse(stem) else {
            continue;
        };
        let blk = spec.dir.join(format!("{id}.blk"));
        let meta: Option<BlockMeta> = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let blk_len = std::fs::metadata(&blk).map(|m| m.len()).ok();
        match (meta, blk_len) {
            (Some(m), Some(len))
                if len == m.len && BlockKey::new(&m.path, &m.version, m.index).id() == id =>
            {
                let mtime = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                found.push((
                    mtime,
                    id,
                    Entry {
                        len,
                        crc: m.crc32c,
                        verified: false,
                    },
                ));
            }
            _ => {
                strays.push(path);
                strays.push(blk);
            }
        }
    }
    for p in strays {
        let _ = std::fs::remove_file(p);
    }
    found.sort_by_key(|(t, id, _)| (*t, *id));
    let mut lru = LinkedHashMap::new();
    let mut used = 0;
    for (_, id, e) in found {
        used += e.len;
        lru.insert(id, e);
    }
    Ok((lru, used))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(mem: &Path, disk: &Path, mem_blocks: u64, disk_blocks: u64) -> BlockStore {
        let bs = 10;
        BlockStore::open(
            vec![
                TierSpec {
                    kind: TierKind::Memory,
                    dir: mem.into(),
                    capacity: mem_blocks * bs,
                },
                TierSpec {
                    kind: TierKind::Disk,
                    dir: disk.into(),
                    capacity: disk_blocks * bs,
                },
            ],
            bs,
            Arc::new(WorkerMetrics::default()),
        )
        .unwrap()
    }

    fn key(i: u64) -> BlockKey {
        BlockKey::new("f", "v", i)
    }

    fn data(i: u64) -> Bytes {
        Bytes::from(vec![i as u8; 10])
    }

    async fn fill(s: &BlockStore, i: u64) {
        match s.get(&key(i)).await {
            Lookup::Miss { past } => {
                s.put(&key(i), past, data(i)).await;
            }
            Lookup::Hit { .. } => {}
        }
    }

    #[tokio::test]
    async fn demotes_to_disk_and_rebuilds_after_restart() {
        let (m, d) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let s = store(m.path(), d.path(), 2, 3);
        for i in 0..5 {
            fill(&s, i).await;
        }
        let u = s.usage();
        assert_eq!((u[0].blocks, u[1].blocks), (2, 3), "{u:?}");
        // Oldest blocks went to disk, newest stay in memory.
        assert_eq!(s.block_file(&key(0)).unwrap().0, TierKind::Disk);
        assert_eq!(s.block_file(&key(4)).unwrap().0, TierKind::Memory);
        drop(s);
        let s = store(m.path(), d.path(), 2, 3);
        let u = s.usage();
        assert_eq!(
            (u[0].blocks, u[1].blocks),
            (2, 3),
            "index not rebuilt: {u:?}"
        );
        for i in 0..5 {
            match s.get(&key(i)).await {
                Lookup::Hit { body, .. } => assert_eq!(body.into_bytes().unwrap(), data(i)),
                Lookup::Miss { .. } => panic!("block {i} lost across restart"),
            }
        }
    }

    #[tokio::test]
    async fn corrupt_disk_block_is_a_miss_and_is_removed() {
        let (m, d) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let s = store(m.path(), d.path(), 1, 3);
        fill(&s, 0).await;
        fill(&s, 1).await;
        let (tier, path) = s.block_file(&key(0)).unwrap();
        assert_eq!(tier, TierKind::Disk);
        let mut bad = std::fs::read(&path).unwrap();
        bad[3] ^= 0xff;
        std::fs::write(&path, bad).unwrap();
        assert!(matches!(s.get(&key(0)).await, Lookup::Miss { .. }));
        assert!(!path.exists(), "bad block file left behind");
        assert!(s.block_file(&key(0)).is_none());
    }

    #[tokio::test]
    async fn memory_block_is_checked_on_its_first_read_after_a_restart() {
        let (m, d) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let s = store(m.path(), d.path(), 2, 3);
        fill(&s, 0).await;
        let (tier, path) = s.block_file(&key(0)).unwrap();
        assert_eq!(tier, TierKind::Memory);
        drop(s);
        // Same length, other bytes: only the CRC can tell.
        let mut bad = std::fs::read(&path).unwrap();
        bad[3] ^= 0xff;
        std::fs::write(&path, bad).unwrap();
        let s = store(m.path(), d.path(), 2, 3);
        assert!(
            s.block_file(&key(0)).is_some(),
            "rebuild reads metadata only"
        );
        assert!(matches!(s.get(&key(0)).await, Lookup::Miss { .. }));
        assert!(!path.exists(), "bad block file left behind");
        // A good block passes its check once and is served after.
        fill(&s, 1).await;
        for _ in 0..2 {
            match s.get(&key(1)).await {
                Lookup::Hit { body, tier } => {
                    let bytes = body.into_bytes().unwrap();
                    assert_eq!(bytes, data(1));
                    assert_eq!(tier, TierKind::Memory);
                }
                Lookup::Miss { .. } => panic!("good block missed"),
            }
        }
    }

    #[tokio::test]
    async fn block_buffers_are_reused_and_small_blocks_get_their_own() {
        let (m, d) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let s = store(m.path(), d.path(), 4, 4);
        fill(&s, 0).await;
        let hit = |l: Lookup| match l {
            Lookup::Hit { body, .. } => body.into_bytes().unwrap(),
            Lookup::Miss { .. } => panic!("missed"),
        };
        let first = hit(s.get(&key(0)).await);
        let at = first.as_ptr();
        drop(first);
        let again = hit(s.get(&key(0)).await);
        assert_eq!(again.as_ptr(), at, "a full block's buffer was not reused");
        assert_eq!(again, data(0));
        // While one is held, another read gets another buffer.
        let other = hit(s.get(&key(0)).await);
        assert_ne!(other.as_ptr(), at);
        drop((again, other));
        assert_eq!(s.shared.buffers.free.lock().len(), 2);
        // A block under half the block size neither takes a block-sized buffer nor gives one.
        s.put(&key(9), 0, Bytes::from_static(b"abc")).await;
        let small = hit(s.get(&key(9)).await);
        assert_eq!(small, Bytes::from_static(b"abc"));
        assert_eq!(s.shared.buffers.free.lock().len(), 2);
        drop(small);
        assert_eq!(s.shared.buffers.free.lock().len(), 2);
    }

    #[tokio::test]
    async fn rebuild_drops_truncated_and_stray_files() {
        let (m, d) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let s = store(m.path(), d.path(), 1, 3);
        fill(&s, 0).await;
        fill(&s, 1).await;
        let (_, path) = s.block_file(&key(0)).unwrap();
        drop(s);
        std::fs::write(&path, b"short").unwrap();
        std::fs::write(d.path().join("junk.blk.tmp"), b"x").unwrap();
        let s = store(m.path(), d.path(), 1, 3);
        assert!(s.block_file(&key(0)).is_none(), "truncated block kept");
        assert!(s.block_file(&key(1)).is_some());
        assert!(!d.path().join("junk.blk.tmp").exists());
    }

    #[tokio::test]
    async fn full_store_rejects_a_cold_newcomer() {
        let (m, d) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let s = store(m.path(), d.path(), 1, 1);
        fill(&s, 0).await;
        fill(&s, 1).await;
        // Block 2 was never requested before: it must not evict a block.
        fill(&s, 2).await;
        assert!(s.block_file(&key(2)).is_none());
        assert!(s.block_file(&key(0)).is_some() && s.block_file(&key(1)).is_some());
        // Requested a few more times, it gets in.
        for _ in 0..3 {
            fill(&s, 2).await;
        }
        assert!(s.block_file(&key(2)).is_some());
    }
}
