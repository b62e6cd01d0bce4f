//! The filesystem core: inodes, lookup, attributes, directory listings, open files and reads,
//! as async functions over the [`Reader`]. The FUSE adapter ([`crate::fuse`]) only translates;
//! everything here is tested without a mount.
//!
//! Inode numbers are handed out on first lookup and kept while the kernel holds a reference
//! (lookup counts, dropped by `forget`), so a tree of millions of files costs memory only for
//! what the kernel has seen recently. The filesystem is read-only; every error becomes an errno
//! in one place ([`ReadError::errno`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use lakecache_lake::{Kind, ObjectMeta};
use parking_lot::Mutex;

use crate::handoff::{Journal, KernelInit, Record, Saved};
use crate::local_cache::LocalFileCache;
use crate::prefetch::{FileReader, PrefetchBudget};
use crate::reader::{ReadError, Reader};

pub const ROOT_INO: u64 = 1;

#[derive(Debug, Clone)]
pub struct FsConfig {
    /// How long the kernel may cache attributes and entries.
    pub attr_ttl: Duration,
    /// Keep the kernel page cache between opens (data is immutable).
    pub keep_cache: bool,
    pub uid: u32,
    pub gid: u32,
    /// Bytes of read-ahead over all open files.
    pub prefetch_budget: u64,
    /// Largest read-ahead window of one file, in blocks.
    pub max_window_blocks: u64,
}

impl Default for FsConfig {
    fn default() -> Self {
        Self {
            attr_ttl: Duration::from_secs(3600),
            keep_cache: true,
            uid: 0,
            gid: 0,
            prefetch_budget: 512 << 20,
            max_window_blocks: 16,
        }
    }
}

/// Attributes as the filesystem reports them.
#[derive(Debug, Clone, PartialEq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub mtime: SystemTime,
}

struct Node {
    path: String,
    meta: ObjectMeta,
    lookups: u64,
}

#[derive(Default)]
struct Inodes {
    nodes: HashMap<u64, Node>,
    by_path: HashMap<String, u64>,
}

/// Filesystem statistics for `statfs`.
#[derive(Debug, Clone, Copy)]
pub struct FsStats {
    pub blocks: u64,
    pub block_size: u32,
    pub files: u64,
}

/// An open file: read through the cache, or from its complete local copy.
#[derive(Clone)]
enum Handle {
    Remote(Arc<FileReader>),
    Local(Arc<std::fs::File>),
}

/// An open file and what a successor needs to know of it ([`crate::handoff`]).
struct Open {
    ino: u64,
    path: String,
    meta: ObjectMeta,
    io: Handle,
    /// The kernel's id of the passthrough backing file the open was answered with.
    backing: Option<u32>,
}

impl Open {
    fn record(&self, fh: u64) -> Record {
        Record::Open {
            fh,
            ino: self.ino,
            path: self.path.clone(),
            meta: (&self.meta).into(),
            local: matches!(self.io, Handle::Local(_)),
        }
    }
}

pub struct FsCore {
    reader: Arc<Reader>,
    cfg: FsConfig,
    budget: PrefetchBudget,
    inodes: Mutex<Inodes>,
    next_ino: AtomicU64,
    handles: Mutex<HashMap<u64, Open>>,
    next_fh: AtomicU64,
    /// Where every change the kernel learns of is written first, for a successor.
    journal: Option<Journal>,
    kernel: Mutex<Option<KernelInit>>,
    local: Option<Arc<LocalFileCache>>,
    /// Listings ahead in flight at once.
    list_ahead: Arc<tokio::sync::Semaphore>,
}

/// Most entries one readdir call returns: more than any kernel buffer takes (128 KiB holds
/// about 2,500 plain entries).
pub const READDIR_BATCH: usize = 4096;

/// Subdirectories of one directory listed ahead, and how many at once.
const LIST_AHEAD_MAX: usize = 256;
const LIST_AHEAD_CONCURRENCY: usize = 8;

impl FsCore {
    pub fn new(reader: Arc<Reader>, cfg: FsConfig) -> Self {
        let mut inodes = Inodes::default();
        inodes.nodes.insert(
            ROOT_INO,
            Node {
                path: String::new(),
                meta: ObjectMeta::directory(),
                lookups: 1,
            },
        );
        inodes.by_path.insert(String::new(), ROOT_INO);
        let budget = PrefetchBudget::new(cfg.prefetch_budget, cfg.max_window_blocks);
        Self {
            reader,
            cfg,
            budget,
            inodes: Mutex::new(inodes),
            next_ino: AtomicU64::new(ROOT_INO + 1),
            handles: Default::default(),
            next_fh: AtomicU64::new(1),
            journal: None,
            kernel: Mutex::new(None),
            local: None,
            list_ahead: Arc::new(tokio::sync::Semaphore::new(LIST_AHEAD_CONCURRENCY)),
        }
    }

    /// Keeps whole files read through the cache in `cache`, and serves later opens from there.
    pub fn with_local_cache(mut self, cache: Arc<LocalFileCache>) -> Self {
        self.local = Some(cache);
        self
    }

    pub fn local_cache(&self) -> Option<&Arc<LocalFileCache>> {
        self.local.as_ref()
    }

    pub fn config(&self) -> &FsConfig {
        &self.cfg
    }

    pub fn reader(&self) -> &Arc<Reader> {
        &self.reader
    }

    fn attr(ino: u64, meta: &ObjectMeta) -> Attr {
        Attr {
            ino,
            kind: meta.kind,
            size: meta.size,
            mtime: meta.modified.unwrap_or(SystemTime::UNIX_EPOCH),
        }
    }

    fn path_of(&self, ino: u64) -> Result<(String, ObjectMeta), ReadError> {
        let inodes = self.inodes.lock();
        inodes
            .nodes
            .get(&ino)
            .map(|n| (n.path.clone(), n.meta.clone()))
            .ok_or_else(|| ReadError::NotFound(format!("inode {ino}")))
    }

    /// Registers (or refreshes) paths and takes one kernel reference on each; journals them
    /// before any reply can tell the kernel.
    fn remember(&self, entries: impl IntoIterator<Item = (String, ObjectMeta)>) -> Vec<Attr> {
        let mut records = Vec::new();
        let mut inodes = self.inodes.lock();
        let attrs: Vec<Attr> = entries
            .into_iter()
            .map(|(path, meta)| {
                let (ino, node) = match inodes.by_path.get(&path).copied() {
                    Some(ino) => {
                        let node = inodes.nodes.get_mut(&ino).expect("by_path and nodes agree");
                        node.lookups += 1;
                        node.meta = meta;
                        (ino, &*node)
                    }
                    None => {
                        let ino = self.next_ino.fetch_add(1, Ordering::Relaxed);
                        inodes.by_path.insert(path.clone(), ino);
                        let node = inodes.nodes.entry(ino).or_insert(Node {
                            path,
                            meta,
                            lookups: 1,
                        });
                        (ino, &*node)
                    }
                };
                if self.journal.is_some() {
                    records.push(Record::Node {
                        ino,
                        path: node.path.clone(),
                        meta: (&node.meta).into(),
                        lookups: node.lookups,
                    });
                }
                Self::attr(ino, &node.meta)
            })
            .collect();
        let due = self.journal_inodes(&inodes, &records);
        drop(inodes);
        if due {
            self.compact();
        }
        attrs
    }

    /// Appends inode records (the inode table is locked by the caller, so they are in the
    /// order of the changes); whether a snapshot is due.
    fn journal_inodes(&self, inodes: &Inodes, records: &[Record]) -> bool {
        match &self.journal {
            // The inodes alone stand for the live state here: counting the open files too
            // would take their lock inside this one on every lookup.
            Some(j) => j.append(records, inodes.nodes.len() as u64),
            None => false,
        }
    }

    /// Appends handle records (the handle table is locked by the caller).
    fn journal_handles(&self, handles: &HashMap<u64, Open>, records: &[Record]) -> bool {
        match &self.journal {
            Some(j) => j.append(records, handles.len() as u64),
            None => false,
        }
    }

    /// The whole state as journal records.
    fn snapshot(&self, inodes: &Inodes, handles: &HashMap<u64, Open>) -> Vec<Record> {
        let mut out = Vec::with_capacity(inodes.nodes.len() + handles.len() + 2);
        if let Some(k) = *self.kernel.lock() {
            out.push(Record::Kernel(k));
        }
        out.push(Record::Next {
            ino: self.next_ino.load(Ordering::Relaxed),
            fh: self.next_fh.load(Ordering::Relaxed),
        });
        for (ino, n) in inodes.nodes.iter().filter(|(i, _)| **i != ROOT_INO) {
            out.push(Record::Node {
                ino: *ino,
                path: n.path.clone(),
                meta: (&n.meta).into(),
                lookups: n.lookups,
            });
        }
        for (fh, o) in handles {
            out.push(o.record(*fh));
            if let Some(id) = o.backing {
                out.push(Record::Backing { fh: *fh, id });
            }
        }
        out
    }

    /// Rewrites the journal as a snapshot of the live state.
    fn compact(&self) {
        let Some(j) = &self.journal else { return };
        let inodes = self.inodes.lock();
        let handles = self.handles.lock();
        j.rewrite(&self.snapshot(&inodes, &handles));
    }

    /// Journals every change in `dir` from now on, starting from the state as it is (a fresh
    /// mount, or one [`FsCore::restore`]d).
    pub fn journal_in(mut self, dir: &std::path::Path) -> std::io::Result<Self> {
        let snapshot = self.snapshot(&self.inodes.lock(), &self.handles.lock());
        self.journal = Some(Journal::create(dir, &snapshot)?);
        Ok(self)
    }

    /// Takes over the state a predecessor journaled: its inodes, with the kernel's references,
    /// and its open files, each reading the version it opened (from its local copy if that is
    /// still complete). Call after [`FsCore::with_local_cache`] and before
    /// [`FsCore::journal_in`].
    pub fn restore(self, saved: Saved) -> Self {
        {
            let mut inodes = self.inodes.lock();
            for n in saved.nodes {
                inodes.by_path.insert(n.path.clone(), n.ino);
                inodes.nodes.insert(
                    n.ino,
                    Node {
                        path: n.path,
                        meta: n.meta,
                        lookups: n.lookups,
                    },
                );
            }
        }
        let mut handles = self.handles.lock();
        for h in saved.handles {
            let io = self.handle_for(&h.path, &h.meta, h.local);
            handles.insert(
                h.fh,
                Open {
                    ino: h.ino,
                    path: h.path,
                    meta: h.meta,
                    io,
                    backing: h.backing,
                },
            );
        }
        drop(handles);
        self.next_ino
            .fetch_max(saved.next_ino.max(ROOT_INO + 1), Ordering::Relaxed);
        self.next_fh
            .fetch_max(saved.next_fh.max(1), Ordering::Relaxed);
        *self.kernel.lock() = saved.kernel;
        self
    }

    /// What the kernel offered at `FUSE_INIT`, once known.
    pub fn kernel_init(&self) -> Option<KernelInit> {
        *self.kernel.lock()
    }

    /// Records what the kernel offered at `FUSE_INIT` (a successor replays it).
    pub fn set_kernel_init(&self, k: KernelInit) {
        let mut kernel = self.kernel.lock();
        *kernel = Some(k);
        if let Some(j) = &self.journal {
            j.append(&[Record::Kernel(k)], 0);
        }
    }

    /// Records that the open `fh` was answered with the passthrough backing file `id`.
    pub fn set_backing(&self, fh: u64, id: u32) {
        let mut handles = self.handles.lock();
        if let Some(o) = handles.get_mut(&fh) {
            o.backing = Some(id);
        }
        let due = self.journal_handles(&handles, &[Record::Backing { fh, id }]);
        drop(handles);
        if due {
            self.compact();
        }
    }

    /// The open files: handle, inode and passthrough backing id (the FUSE adapter rebuilds its
    /// per-inode open modes from these after a restore).
    pub fn open_handles(&self) -> Vec<(u64, u64, Option<u32>)> {
        self.handles
            .lock()
            .iter()
            .map(|(fh, o)| (*fh, o.ino, o.backing))
            .collect()
    }

    pub async fn lookup(&self, parent: u64, name: &str) -> Result<Attr, ReadError> {
        let (dir, dir_meta) = self.path_of(parent)?;
        if !dir_meta.is_dir() {
            return Err(ReadError::NotADirectory(dir));
        }
        let path = lakecache_lake::join(&dir, name);
        let meta = self.reader.stat(&path).await?;
        Ok(self.remember([(path, meta)]).remove(0))
    }

    /// The kernel dropped `n` references to `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let mut inodes = self.inodes.lock();
        let (gone, record) = match inodes.nodes.get_mut(&ino) {
            Some(node) => {
                node.lookups = node.lookups.saturating_sub(n);
                if node.lookups == 0 {
                    (Some(node.path.clone()), Record::Gone { ino })
                } else {
                    (
                        None,
                        Record::Lookups {
                            ino,
                            lookups: node.lookups,
                        },
                    )
                }
            }
            None => return,
        };
        if let Some(path) = gone {
            inodes.nodes.remove(&ino);
            inodes.by_path.remove(&path);
        }
        let due = self.journal_inodes(&inodes, &[record]);
        drop(inodes);
        if due {
            self.compact();
        }
    }

    pub async fn getattr(&self, ino: u64) -> Result<Attr, ReadError> {
        let (_, meta) = self.path_of(ino)?;
        Ok(Self::attr(ino, &meta))
    }

    /// Entries of a directory from `offset` on (offsets are 1-based positions in the listing;
    /// `.` and `..` come first), at most [`READDIR_BATCH`] of them: the kernel asks again from
    /// where a reply ended, so a directory of a million entries costs a million entries of work,
    /// not a million per call. With `plus`, each entry takes a kernel reference and gets an
    /// inode number that stays valid; without, entries get their number if they have one.
    pub async fn readdir(
        &self,
        ino: u64,
        offset: u64,
        plus: bool,
    ) -> Result<Vec<(u64, String, Attr)>, ReadError> {
        let (dir, meta) = self.path_of(ino)?;
        if !meta.is_dir() {
            return Err(ReadError::NotADirectory(dir));
        }
        let entries = self.reader.list(&dir).await?;
        if offset == 0 {
            self.list_ahead(&dir, &entries);
        }
        let mut out = Vec::new();
        let dots = [(".", ino), ("..", ino)];
        for (pos, (name, i)) in dots.iter().enumerate() {
            if (pos as u64) >= offset {
                out.push((pos as u64 + 1, name.to_string(), Self::attr(*i, &meta)));
            }
        }
        let skip = offset.saturating_sub(2) as usize;
        let room = READDIR_BATCH - out.len();
        let batch: Vec<(u64, &lakecache_lake::DirEntry)> = entries
            .iter()
            .enumerate()
            .skip(skip)
            .take(room)
            .map(|(pos, e)| (pos as u64 + 2, e))
            .collect();
        if plus {
            let attrs = self.remember(
                batch
                    .iter()
                    .map(|(_, e)| (lakecache_lake::join(&dir, &e.name), e.meta.clone())),
            );
            for ((pos, e), attr) in batch.iter().zip(attrs) {
                out.push((pos + 1, e.name.clone(), attr));
            }
        } else {
            let inodes = self.inodes.lock();
            for (pos, e) in batch {
                let path = lakecache_lake::join(&dir, &e.name);
                let known = inodes.by_path.get(&path).copied();
                // Without plus the kernel only needs a number that is unique in the listing.
                let attr = Self::attr(known.unwrap_or(u64::MAX - pos), &e.meta);
                out.push((pos + 1, e.name.clone(), attr));
            }
        }
        Ok(out)
    }

    /// Lists the subdirectories of a directory being read, a few at a time in the background:
    /// a tree walk (`ls -R`, `find`, a loader indexing its dataset) then finds each folder's
    /// listing ready instead of paying one round trip after another. Only the directory the
    /// kernel asked for starts this, so it goes one level ahead of the walk, never further.
    fn list_ahead(&self, dir: &str, entries: &[lakecache_lake::DirEntry]) {
        for e in entries
            .iter()
            .filter(|e| e.meta.is_dir())
            .take(LIST_AHEAD_MAX)
        {
            let sub = lakecache_lake::join(dir, &e.name);
            if self.reader.has_listing(&sub) {
                continue;
            }
            let reader = self.reader.clone();
            let gate = self.list_ahead.clone();
            tokio::spawn(async move {
                let Ok(_turn) = gate.acquire_owned().await else {
                    return;
                };
                if let Err(e) = reader.list(&sub).await {
                    tracing::debug!(dir = %sub, error = %e, "listing ahead failed");
                }
            });
        }
    }

    pub async fn open(&self, ino: u64) -> Result<u64, ReadError> {
        let (path, meta) = self.path_of(ino)?;
        if meta.is_dir() {
            return Err(ReadError::IsADirectory(path));
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let io = self.handle_for(&path, &meta, true);
        if matches!(io, Handle::Local(_)) {
            self.reader.metrics.local_opens.inc();
        }
        let open = Open {
            ino,
            path,
            meta,
            io,
            backing: None,
        };
        let mut handles = self.handles.lock();
        let record = open.record(fh);
        handles.insert(fh, open);
        let due = self.journal_handles(&handles, &[record]);
        drop(handles);
        if due {
            self.compact();
        }
        Ok(fh)
    }

    /// How an open of `path` at `meta` reads: from its complete local copy when `local` allows
    /// one and it is there, otherwise through the cache.
    fn handle_for(&self, path: &str, meta: &ObjectMeta, local: bool) -> Handle {
        match self
            .local
            .as_ref()
            .filter(|_| local)
            .and_then(|c| c.get(path, meta))
        {
            Some(f) => Handle::Local(Arc::new(f)),
            None => Handle::Remote(Arc::new(
                FileReader::new(
                    self.reader.clone(),
                    path.to_string(),
                    meta.clone(),
                    self.budget.clone(),
                )
                .with_local_cache(self.local.clone()),
            )),
        }
    }

    /// The complete local copy behind `fh`, if it is served from one: the FUSE adapter hands it
    /// to the kernel (passthrough).
    pub fn local_file(&self, fh: u64) -> Option<Arc<std::fs::File>> {
        match self.handles.lock().get(&fh).map(|o| &o.io) {
            Some(Handle::Local(f)) => Some(f.clone()),
            _ => None,
        }
    }

    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Bytes, ReadError> {
        let handle = match self.handles.lock().get(&fh) {
            Some(o) => o.io.clone(),
            None => return Err(ReadError::BadHandle(fh)),
        };
        match handle {
            Handle::Remote(file) => file.read(offset, size).await,
            Handle::Local(file) => {
                let out = tokio::task::spawn_blocking(move || {
                    use std::os::unix::fs::FileExt;
                    let mut buf = vec![0u8; size as usize];
                    let mut got = 0;
                    while got < buf.len() {
                        match file.read_at(&mut buf[got..], offset + got as u64) {
                            Ok(0) => break,
                            Ok(n) => got += n,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(e),
                        }
                    }
                    buf.truncate(got);
                    Ok(Bytes::from(buf))
                })
                .await
                .map_err(|e| ReadError::Unavailable(format!("local read task: {e}")))?;
                out.map_err(|e| ReadError::Unavailable(format!("reading the local copy: {e}")))
            }
        }
    }

    /// The kernel released `fh`. A handle it does not know (released already, by a
    /// predecessor whose reply never reached the kernel) is no error: the kernel asks again.
    pub fn release(&self, fh: u64) {
        let mut handles = self.handles.lock();
        if handles.remove(&fh).is_none() {
            return;
        }
        let due = self.journal_handles(&handles, &[Record::Release { fh }]);
        drop(handles);
        if due {
            self.compact();
        }
    }

    pub fn open_files(&self) -> usize {
        self.handles.lock().len()
    }

    pub fn statfs(&self) -> FsStats {
        let bs = self.reader.config().block_size as u32;
        FsStats {
            blocks: 0,
            block_size: bs,
            files: self.inodes.lock().nodes.len() as u64,
        }
    }

    /// Bytes of prefetch budget not in use.
    pub fn prefetch_available(&self) -> u64 {
        self.budget.available()
    }
}
