//! Whole files kept on node-local storage, so a warm open can be served by the kernel itself.
//!
//! Reads through FUSE's ordinary path cost a copy through the FUSE server per request: on two
//! cores that tops out near 1.5 GB/s, against ~10 GB/s for a file on tmpfs. Since Linux 6.9 a
//! FUSE server can instead hand the kernel an open file to read from directly
//! (`FOPEN_PASSTHROUGH`): then reads run at the speed of that file's filesystem. But it must be
//! one file for the whole of the FUSE file, while the cache holds a file as blocks spread over
//! workers. This cache bridges the two: as blocks of a file pass through the reader, they are
//! also written at their offsets into a sparse local file (`<key>.part`); once every block is
//! there the file is renamed to `<key>` and is complete. A later open of a complete file is
//! handed to the kernel (or, where passthrough is not available, read with `pread`, still without
//! a network round trip).
//!
//! The key is a hash of the path and the object's version, so a changed object never matches an
//! old copy. Complete files are kept in LRU order within a byte budget; space for a file is
//! reserved when its first block arrives (evicting complete files, then stale partial ones), and
//! a file that does not fit is simply not kept. Writes happen on a thread of their own: the read
//! path only queues the block (dropping it when the queue is full: it is a cache).
//!
//! # What it may touch
//!
//! The directory it is given is the user's (`--local-cache DIR:SIZE`, or a node path under the
//! CSI plugin's `--local-cache-dir`), and may hold anything: cleaning it of "files the cache did
//! not make" deletes whatever a user put there. So the cache keeps everything in a directory of
//! its own inside it, [`SUBDIR`], which it makes with a marker file ([`MARKER`], naming the
//! format) under a hidden temporary name and then renames, so a crash never leaves a directory
//! of that name without its marker (at worst a `.lakecache-local-v1.*.new` beside it, holding
//! only the marker). A directory of that name without the marker, or with another format's, is
//! someone else's: opening refuses, and deletes nothing. Inside its directory the cache removes
//! only names of its own pattern (`<key>`, `<key>.part`, `<key>.sum`, `<key>.sum.part`, with
//! `<key>` 40 lowercase hex digits); anything else there is left alone.
//!
//! # Copies that survive a crash
//!
//! A passthrough file is read by the kernel with no check by the server, so a copy must never be
//! handed out unless every byte of it is what was read from the cache. A rename alone does not
//! give that: after a crash, a renamed file may have its final name and size but holes (zeros)
//! where its data had not reached the disk. So a complete copy is synced, read back and hashed
//! (BLAKE3), and only then renamed; its hash and size go to a sidecar, `<key>.sum`, itself
//! synced and renamed into place after the copy. At start, partial files are deleted, and each
//! complete copy is served only once it has been read and found to match its sidecar; a copy
//! without a sidecar, with one that cannot be parsed, or that does not match, is deleted. So
//! whichever of these steps a crash interrupts, and in whatever order the filesystem kept them,
//! what is served is what was read.
//! Checking every copy at open would delay the mount by the time it takes to read the whole
//! cache (BLAKE3 reads a file on tmpfs at about 2.3 GB/s on one core, so half a minute for a
//! 64 GiB budget, more from a disk), and checking at the first open of each would put that
//! read in front of an `open` call. So a thread of its own checks them after open, most
//! recently used first; until a copy is checked, `get` does not return it and the file is read
//! through the cache as if it were not there. Completing a copy costs the same read once, on
//! the writer thread.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Write as _};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hashlink::LinkedHashMap;
use lakecache_lake::ObjectMeta;
use lakecache_lake::block::block_count;
use parking_lot::Mutex;

/// The directory the cache owns inside the one it is given; it touches nothing outside it.
pub const SUBDIR: &str = "lakecache-local-v1";
/// The file that marks [`SUBDIR`] as the cache's own; it holds the format's name.
pub const MARKER: &str = ".lakecache-local-cache";
/// The marker's content: the layout this code reads and writes.
const MARKER_TEXT: &str = "lakecache local file cache, format 1\n";

/// A partial file untouched for this long may be evicted to make room.
const STALE_PARTIAL: Duration = Duration::from_secs(120);
/// Blocks waiting to be written.
const QUEUE: usize = 64;
/// Bytes of blocks waiting to be written, at most: a block offered past it is not kept (it is a
/// cache), so the queue adds at most this much to a mount's memory whatever the block size.
pub const QUEUE_BYTES: u64 = 32 << 20;

/// Why the cache cannot be opened. Nothing in the directory is deleted when opening fails.
#[derive(Debug, thiserror::Error)]
pub enum LocalCacheError {
    #[error("cannot {what} {}: {error}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        error: io::Error,
    },
    #[error(
        "{} exists but is not a lakecache local cache (it has no {MARKER} file); it is left \
         alone: move it away, or give the local cache another directory",
        dir.display()
    )]
    NotOurs { dir: PathBuf },
    #[error(
        "{} holds a local cache of another format ({found:?} in {MARKER}); it is left alone: \
         remove it, or give the local cache another directory",
        dir.display()
    )]
    OtherFormat { dir: PathBuf, found: String },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> LocalCacheError {
    let path = path.to_path_buf();
    move |error| LocalCacheError::Io { what, path, error }
}

struct Partial {
    file: Arc<File>,
    size: u64,
    filled: Vec<bool>,
    remaining: usize,
    touched: Instant,
}

struct Inner {
    /// Complete files, least recently used first: key → size.
    complete: LinkedHashMap<String, u64>,
    /// Complete files found at open whose checksum is not checked yet: never handed out.
    unchecked: HashSet<String>,
    partial: HashMap<String, Partial>,
    /// Bytes of complete and reserved partial files.
    used: u64,
}

struct Write {
    key: String,
    size: u64,
    block_size: u64,
    index: u64,
    data: Bytes,
}

/// Counters, for metrics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LocalCacheStats {
    /// Complete copies that may be handed out.
    pub files: u64,
    /// Copies found at open whose checksum is not checked yet.
    pub unchecked_files: u64,
    pub used_bytes: u64,
    pub capacity_bytes: u64,
}

pub struct LocalFileCache {
    /// The cache's own directory, [`SUBDIR`] of the one it was given.
    dir: PathBuf,
    capacity: u64,
    inner: Arc<Mutex<Inner>>,
    queue: SyncSender<Write>,
    /// Blocks queued and not yet written.
    pending: AtomicU64,
    /// Their bytes.
    pending_bytes: AtomicU64,
}

impl std::fmt::Debug for LocalFileCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalFileCache")
            .field("dir", &self.dir)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

/// The cache key of a version of a path.
pub fn key(path: &str, version: &str) -> String {
    let mut h = blake3::Hasher::new();
    h.update(path.as_bytes());
    h.update(&[0]);
    h.update(version.as_bytes());
    h.finalize().to_hex()[..40].to_string()
}

/// A name in the cache's directory, by what it holds.
#[derive(Debug, PartialEq, Eq)]
enum Name<'a> {
    /// A complete copy.
    Copy(&'a str),
    /// A copy being filled.
    Partial(&'a str),
    /// A complete copy's checksum.
    Sum(&'a str),
    /// A checksum being written.
    PartialSum(&'a str),
}

impl<'a> Name<'a> {
    /// The name's meaning, or `None` for a name the cache does not make (left alone).
    fn parse(name: &'a str) -> Option<Self> {
        let (key, suffix) = name.split_at_checked(40)?;
        if !key.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        match suffix {
            "" => Some(Self::Copy(key)),
            ".part" => Some(Self::Partial(key)),
            ".sum" => Some(Self::Sum(key)),
            ".sum.part" => Some(Self::PartialSum(key)),
            _ => None,
        }
    }
}

/// The sidecar's content: `blake3 <hex> <size>`.
fn sum_line(hash: &blake3::Hash, size: u64) -> String {
    format!("blake3 {} {size}\n", hash.to_hex())
}

/// Hashes the file at `path`.
fn hash_file(path: &Path) -> io::Result<(blake3::Hash, u64)> {
    let f = File::open(path)?;
    let mut h = blake3::Hasher::new();
    h.update_reader(&f)?;
    Ok((h.finalize(), h.count()))
}

/// Checks the copy `key` in `dir` against its sidecar; the reason if it does not match.
fn check(dir: &Path, key: &str, size: u64) -> Result<(), String> {
    let sum = std::fs::read_to_string(dir.join(format!("{key}.sum")))
        .map_err(|e| format!("its checksum cannot be read: {e}"))?;
    let mut words = sum.strip_suffix('\n').unwrap_or("").split(' ');
    let (Some("blake3"), Some(hex), Some(len), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Err(format!("its checksum file is garbled: {sum:?}"));
    };
    let want =
        blake3::Hash::from_hex(hex).map_err(|_| format!("its checksum is garbled: {hex:?}"))?;
    if len.parse::<u64>().ok() != Some(size) {
        return Err(format!(
            "its checksum is of {len} bytes, the copy has {size}"
        ));
    }
    let (got, read) = hash_file(&dir.join(key)).map_err(|e| format!("it cannot be read: {e}"))?;
    if read != size {
        return Err(format!("it has {read} bytes, not {size}"));
    }
    if got != want {
        return Err("its content does not match its checksum".into());
    }
    Ok(())
}

/// Syncs a directory, so the renames in it are on storage.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The cache's own directory in `parent`: made with its marker if absent, refused if someone
/// else's.
fn own_dir(parent: &Path) -> Result<PathBuf, LocalCacheError> {
    std::fs::create_dir_all(parent).map_err(io_err("create", parent))?;
    let dir = parent.join(SUBDIR);
    if std::fs::symlink_metadata(&dir).is_err_and(|e| e.kind() == io::ErrorKind::NotFound) {
        // Made under another name with its marker, then renamed: a crash never leaves a
        // directory of the cache's name without its marker (which would be refused). Losing
        // the race to another process is fine; its directory is checked below.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let tmp = parent.join(format!(".{SUBDIR}.{}.{nanos}.new", std::process::id()));
        let made = (|| {
            std::fs::create_dir(&tmp)?;
            let mut m = File::create(tmp.join(MARKER))?;
            m.write_all(MARKER_TEXT.as_bytes())?;
            m.sync_all()?;
            sync_dir(&tmp)?;
            std::fs::rename(&tmp, &dir)?;
            sync_dir(parent)
        })();
        if let Err(e) = made {
            let _ = std::fs::remove_file(tmp.join(MARKER));
            let _ = std::fs::remove_dir(&tmp);
            if !dir.exists() {
                return Err(io_err("create", &dir)(e));
            }
        }
    }
    let meta = std::fs::symlink_metadata(&dir).map_err(io_err("read", &dir))?;
    if !meta.is_dir() {
        return Err(LocalCacheError::NotOurs { dir });
    }
    let marker = dir.join(MARKER);
    match std::fs::read_to_string(&marker) {
        Ok(t) if t == MARKER_TEXT => Ok(dir),
        Ok(t) => Err(LocalCacheError::OtherFormat {
            dir,
            found: t.chars().take(80).collect(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(LocalCacheError::NotOurs { dir }),
        Err(e) => Err(io_err("read", &marker)(e)),
    }
}

impl LocalFileCache {
    /// Opens (creating) the cache in [`SUBDIR`] of `dir` with a budget of `capacity` bytes.
    /// Copies left by an earlier process are checked by a thread of their own, and served once
    /// they pass.
    pub fn open(dir: &Path, capacity: u64) -> Result<Arc<Self>, LocalCacheError> {
        let this = Self::open_unchecked(dir, capacity)?;
        if this.stats().unchecked_files > 0 {
            let cache = Arc::downgrade(&this);
            std::thread::Builder::new()
                .name("lakecache-local-check".into())
                .spawn(move || Self::check_found(&cache))
                .map_err(io_err("start a thread for", &this.dir))?;
        }
        Ok(this)
    }

    /// Opens the cache, leaving the copies found in it unchecked (and not served) until
    /// [`Self::check_found`] runs.
    fn open_unchecked(dir: &Path, capacity: u64) -> Result<Arc<Self>, LocalCacheError> {
        let dir = own_dir(dir)?;
        let mut found: Vec<(std::time::SystemTime, String, u64)> = vec![];
        let mut sums = HashSet::new();
        let mut foreign = 0;
        for e in std::fs::read_dir(&dir).map_err(io_err("read", &dir))? {
            let e = e.map_err(io_err("read", &dir))?;
            let name = e.file_name();
            let Some(name) = name.to_str() else {
                foreign += 1;
                continue;
            };
            if name == MARKER {
                continue;
            }
            let is_file = e.file_type().is_ok_and(|t| t.is_file());
            match Name::parse(name) {
                Some(Name::Partial(_) | Name::PartialSum(_)) if is_file => {
                    let _ = std::fs::remove_file(e.path());
                }
                Some(Name::Copy(k)) if is_file => {
                    let m = e.metadata().map_err(io_err("read", &e.path()))?;
                    let modified = m.modified().unwrap_or(std::time::UNIX_EPOCH);
                    found.push((modified, k.to_string(), m.len()));
                }
                Some(Name::Sum(k)) if is_file => {
                    sums.insert(k.to_string());
                }
                _ => foreign += 1,
            }
        }
        if foreign > 0 {
            tracing::info!(dir = %dir.display(), foreign, "leaving alone entries that are not the local cache's own");
        }
        found.sort();
        let mut inner = Inner {
            complete: LinkedHashMap::new(),
            unchecked: HashSet::new(),
            partial: HashMap::new(),
            used: 0,
        };
        // Most recently modified last, so the budget keeps the newest.
        for (_, k, size) in found.into_iter().rev() {
            let has_sum = sums.remove(&k);
            if !has_sum || inner.used + size > capacity {
                let _ = std::fs::remove_file(dir.join(&k));
                let _ = std::fs::remove_file(dir.join(format!("{k}.sum")));
                continue;
            }
            inner.used += size;
            inner.complete.insert(k.clone(), size);
            inner.complete.to_front(&k);
            inner.unchecked.insert(k);
        }
        // Checksums of copies that are gone.
        for k in sums {
            let _ = std::fs::remove_file(dir.join(format!("{k}.sum")));
        }
        let inner = Arc::new(Mutex::new(inner));
        let (tx, rx) = sync_channel::<Write>(QUEUE);
        let this = Arc::new(Self {
            dir,
            capacity,
            inner,
            queue: tx,
            pending: AtomicU64::new(0),
            pending_bytes: AtomicU64::new(0),
        });
        let writer = Arc::downgrade(&this);
        std::thread::Builder::new()
            .name("lakecache-local-cache".into())
            .spawn(move || {
                // Ends when the cache is dropped (its sender goes with it).
                while let Ok(w) = rx.recv() {
                    let Some(cache) = writer.upgrade() else { break };
                    let len = w.data.len() as u64;
                    if let Err(e) = cache.write(w) {
                        tracing::debug!(error = %e, "local cache write failed");
                    }
                    cache.pending_bytes.fetch_sub(len, Ordering::AcqRel);
                    cache.pending.fetch_sub(1, Ordering::AcqRel);
                }
            })
            .map_err(io_err("start a thread for", &this.dir))?;
        Ok(this)
    }

    /// Checks the copies found at open, most recently used first: a copy that passes is served
    /// from then on; one that fails is deleted. Ends early when the cache is dropped.
    fn check_found(cache: &Weak<Self>) {
        let keys: Vec<(String, u64)> = match cache.upgrade() {
            Some(c) => {
                let inner = c.inner.lock();
                inner
                    .complete
                    .iter()
                    .rev()
                    .filter(|(k, _)| inner.unchecked.contains(*k))
                    .map(|(k, s)| (k.clone(), *s))
                    .collect()
            }
            None => return,
        };
        let start = Instant::now();
        let (mut good, mut bad) = (0u64, 0u64);
        for (k, size) in keys {
            let Some(c) = cache.upgrade() else { return };
            if !c.inner.lock().unchecked.contains(&k) {
                continue; // evicted meanwhile
            }
            let verdict = check(&c.dir, &k, size);
            let mut inner = c.inner.lock();
            if !inner.unchecked.remove(&k) {
                continue;
            }
            match verdict {
                Ok(()) => good += 1,
                Err(why) => {
                    bad += 1;
                    tracing::warn!(dir = %c.dir.display(), key = %k, %why, "dropping a local copy that fails its check");
                    if inner.complete.remove(&k).is_some() {
                        inner.used -= size;
                    }
                    let _ = std::fs::remove_file(c.dir.join(&k));
                    let _ = std::fs::remove_file(c.dir.join(format!("{k}.sum")));
                }
            }
        }
        tracing::info!(
            good,
            bad,
            ms = start.elapsed().as_millis() as u64,
            "checked the local copies found at start"
        );
    }

    /// The cache's own directory, where the copies are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn stats(&self) -> LocalCacheStats {
        let inner = self.inner.lock();
        LocalCacheStats {
            files: (inner.complete.len() - inner.unchecked.len()) as u64,
            unchecked_files: inner.unchecked.len() as u64,
            used_bytes: inner.used,
            capacity_bytes: self.capacity,
        }
    }

    /// The complete local copy of `path` at `meta`'s version, opened for reading. A copy found
    /// at open is not returned until it is checked.
    pub fn get(&self, path: &str, meta: &ObjectMeta) -> Option<File> {
        let k = key(path, &meta.version);
        {
            let mut inner = self.inner.lock();
            let size = *inner.complete.get(&k)?;
            if size != meta.size || inner.unchecked.contains(&k) {
                return None;
            }
            inner.complete.to_back(&k);
        }
        match File::open(self.dir.join(&k)) {
            Ok(f) => Some(f),
            Err(_) => {
                // Removed behind our back: forget it.
                let mut inner = self.inner.lock();
                if let Some(size) = inner.complete.remove(&k) {
                    inner.used -= size;
                }
                None
            }
        }
    }

    /// Offers one whole block of `path` (as read through the cache) to be kept locally.
    pub fn offer(&self, path: &str, meta: &ObjectMeta, block_size: u64, index: u64, data: Bytes) {
        if meta.size == 0 || meta.size > self.capacity / 2 || meta.version.is_empty() {
            return;
        }
        let len = data.len() as u64;
        if self.pending_bytes.fetch_add(len, Ordering::AcqRel) + len > QUEUE_BYTES {
            self.pending_bytes.fetch_sub(len, Ordering::AcqRel);
            tracing::trace!("local cache queue full (bytes); block not kept");
            return;
        }
        let w = Write {
            key: key(path, &meta.version),
            size: meta.size,
            block_size,
            index,
            data,
        };
        self.pending.fetch_add(1, Ordering::AcqRel);
        if let Err(e) = self.queue.try_send(w) {
            self.pending_bytes.fetch_sub(len, Ordering::AcqRel);
            self.pending.fetch_sub(1, Ordering::AcqRel);
            if let TrySendError::Full(_) = e {
                tracing::trace!("local cache queue full; block not kept");
            }
        }
    }

    /// Waits (at most 10 s) until every queued block is written and every copy found at open
    /// is checked: for tests and benchmarks.
    pub fn flush(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while (self.pending.load(Ordering::Acquire) > 0 || !self.inner.lock().unchecked.is_empty())
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Makes room for `size` more bytes; false if it cannot.
    fn reserve(&self, inner: &mut Inner, size: u64) -> bool {
        if size > self.capacity {
            return false;
        }
        while inner.used + size > self.capacity {
            if let Some((k, s)) = inner.complete.pop_front() {
                let _ = std::fs::remove_file(self.dir.join(&k));
                let _ = std::fs::remove_file(self.dir.join(format!("{k}.sum")));
                inner.unchecked.remove(&k);
                inner.used -= s;
                continue;
            }
            let stale = inner
                .partial
                .iter()
                .filter(|(_, p)| p.touched.elapsed() > STALE_PARTIAL)
                .map(|(k, _)| k.clone())
                .next();
            match stale {
                Some(k) => {
                    if let Some(p) = inner.partial.remove(&k) {
                        inner.used -= p.size;
                        let _ = std::fs::remove_file(self.dir.join(format!("{k}.part")));
                    }
                }
                None => return false,
            }
        }
        inner.used += size;
        true
    }

    fn write(&self, w: Write) -> io::Result<()> {
        let blocks = block_count(w.size, w.block_size) as usize;
        if w.index as usize >= blocks {
            return Ok(());
        }
        let file = {
            let mut inner = self.inner.lock();
            if inner.complete.contains_key(&w.key) {
                return Ok(());
            }
            match inner.partial.get_mut(&w.key) {
                Some(p) if p.size == w.size && p.filled.len() == blocks => {
                    if p.filled[w.index as usize] {
                        return Ok(());
                    }
                    p.touched = Instant::now();
                    p.file.clone()
                }
                Some(_) => return Ok(()),
                None => {
                    if !self.reserve(&mut inner, w.size) {
                        return Ok(());
                    }
                    let path = self.dir.join(format!("{}.part", w.key));
                    let f = match File::create(&path).and_then(|f| f.set_len(w.size).map(|_| f)) {
                        Ok(f) => Arc::new(f),
                        Err(e) => {
                            inner.used -= w.size;
                            return Err(e);
                        }
                    };
                    inner.partial.insert(
                        w.key.clone(),
                        Partial {
                            file: f.clone(),
                            size: w.size,
                            filled: vec![false; blocks],
                            remaining: blocks,
                            touched: Instant::now(),
                        },
                    );
                    f
                }
            }
        };
        let offset = w.index * w.block_size;
        let want = w.block_size.min(w.size - offset) as usize;
        if w.data.len() != want {
            return Ok(());
        }
        file.write_all_at(&w.data, offset)?;
        let mut inner = self.inner.lock();
        let done = match inner.partial.get_mut(&w.key) {
            Some(p) if !p.filled[w.index as usize] => {
                p.filled[w.index as usize] = true;
                p.remaining -= 1;
                p.remaining == 0
            }
            _ => false,
        };
        if !done {
            return Ok(());
        }
        // Out of the map but still reserved; only this thread adds files, so no other copy of
        // the key starts meanwhile.
        let p = inner.partial.remove(&w.key).expect("present");
        drop(inner);
        let r = self.finish(&w.key, &p.file);
        let mut inner = self.inner.lock();
        match r {
            Ok(()) => {
                inner.complete.insert(w.key, p.size);
                Ok(())
            }
            Err(e) => {
                inner.used -= p.size;
                for name in [".part", "", ".sum.part", ".sum"] {
                    let _ = std::fs::remove_file(self.dir.join(format!("{}{name}", w.key)));
                }
                Err(e)
            }
        }
    }

    /// Makes the filled `<key>.part` the complete copy `<key>`, with its checksum beside it.
    fn finish(&self, key: &str, file: &File) -> io::Result<()> {
        let part = self.dir.join(format!("{key}.part"));
        // On storage before any name says it is complete, and hashed as read back from there.
        file.sync_all()?;
        let (hash, size) = hash_file(&part)?;
        std::fs::rename(&part, self.dir.join(key))?;
        let sum_part = self.dir.join(format!("{key}.sum.part"));
        let mut f = File::create(&sum_part)?;
        f.write_all(sum_line(&hash, size).as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&sum_part, self.dir.join(format!("{key}.sum")))?;
        sync_dir(&self.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lakecache_lake::Kind;

    fn meta(size: u64, version: &str) -> ObjectMeta {
        ObjectMeta {
            kind: Kind::File,
            size,
            version: version.into(),
            modified: None,
        }
    }

    fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn offer_all(c: &LocalFileCache, path: &str, m: &ObjectMeta, bs: u64, d: &[u8], order: &[u64]) {
        for &i in order {
            let from = (i * bs) as usize;
            let to = (from + bs as usize).min(d.len());
            c.offer(path, m, bs, i, Bytes::copy_from_slice(&d[from..to]));
        }
        c.flush();
    }

    fn read(mut f: File) -> Vec<u8> {
        use std::io::Read;
        let mut v = vec![];
        f.read_to_end(&mut v).unwrap();
        v
    }

    #[test]
    fn a_file_is_complete_once_every_block_arrived_in_any_order() {
        let dir = tempfile::tempdir().unwrap();
        let c = LocalFileCache::open(dir.path(), 1 << 20).unwrap();
        let d = data(10_000, 7);
        let m = meta(10_000, "v1");
        offer_all(&c, "a/b", &m, 4096, &d, &[2, 0]);
        assert!(
            c.get("a/b", &m).is_none(),
            "two of three blocks is not complete"
        );
        offer_all(&c, "a/b", &m, 4096, &d, &[0, 1]);
        let f = c.get("a/b", &m).expect("complete");
        assert_eq!(read(f), d);
        // Another version of the path is another file.
        assert!(c.get("a/b", &meta(10_000, "v2")).is_none());
        assert_eq!(c.stats().files, 1);
        // A block of the wrong length is ignored, not written.
        let m2 = meta(5000, "v1");
        c.offer("short", &m2, 4096, 0, Bytes::from_static(b"xx"));
        c.flush();
        offer_all(&c, "short", &m2, 4096, &data(5000, 1), &[1]);
        assert!(c.get("short", &m2).is_none());
    }

    #[test]
    fn the_budget_evicts_the_least_recently_used_and_refuses_what_cannot_fit() {
        let dir = tempfile::tempdir().unwrap();
        let c = LocalFileCache::open(dir.path(), 25_000).unwrap();
        for (i, p) in ["x", "y"].iter().enumerate() {
            offer_all(
                &c,
                p,
                &meta(10_000, "v"),
                16_384,
                &data(10_000, i as u8),
                &[0],
            );
        }
        // Touch x, so y is the least recently used.
        assert!(c.get("x", &meta(10_000, "v")).is_some());
        offer_all(&c, "z", &meta(10_000, "v"), 16_384, &data(10_000, 9), &[0]);
        assert!(c.get("y", &meta(10_000, "v")).is_none(), "y was evicted");
        let y = key("y", "v");
        assert!(!c.dir().join(&y).exists() && !c.dir().join(format!("{y}.sum")).exists());
        assert!(c.get("x", &meta(10_000, "v")).is_some());
        assert!(c.get("z", &meta(10_000, "v")).is_some());
        assert!(c.stats().used_bytes <= 25_000);
        // Larger than half the budget: never kept.
        offer_all(
            &c,
            "big",
            &meta(20_000, "v"),
            32_768,
            &data(20_000, 3),
            &[0],
        );
        assert!(c.get("big", &meta(20_000, "v")).is_none());
    }

    /// The names in the cache's own directory, sorted.
    fn names(c: &LocalFileCache) -> Vec<String> {
        let mut v: Vec<_> = std::fs::read_dir(c.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_restart_serves_checked_copies_and_drops_partial_ones() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = LocalFileCache::open(dir.path(), 1 << 20).unwrap();
            offer_all(&c, "done", &meta(100, "v"), 4096, &data(100, 1), &[0]);
            offer_all(&c, "half", &meta(9000, "v"), 4096, &data(9000, 2), &[0]);
        }
        let c = LocalFileCache::open_unchecked(dir.path(), 1 << 20).unwrap();
        assert!(
            c.get("done", &meta(100, "v")).is_none(),
            "a copy found at open is not handed out before it is checked"
        );
        assert_eq!(c.stats().unchecked_files, 1);
        LocalFileCache::check_found(&Arc::downgrade(&c));
        assert_eq!(read(c.get("done", &meta(100, "v")).unwrap()), data(100, 1));
        assert!(c.get("half", &meta(9000, "v")).is_none());
        let k = key("done", "v");
        assert_eq!(
            names(&c),
            [MARKER.to_string(), k.clone(), format!("{k}.sum")]
        );
        // The thread that `open` starts does the same.
        drop(c);
        let c = LocalFileCache::open(dir.path(), 1 << 20).unwrap();
        c.flush();
        assert_eq!(read(c.get("done", &meta(100, "v")).unwrap()), data(100, 1));
    }

    #[test]
    fn a_copy_that_fails_its_check_is_dropped_and_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let m = meta(10_000, "v");
        let own = {
            let c = LocalFileCache::open(dir.path(), 1 << 20).unwrap();
            for (i, p) in ["good", "flipped", "no-sum", "garbled", "short"]
                .iter()
                .enumerate()
            {
                offer_all(&c, p, &m, 4096, &data(10_000, i as u8), &[0, 1, 2]);
                assert!(c.get(p, &m).is_some(), "{p} is complete");
            }
            c.dir().to_path_buf()
        };
        let file = |p: &str, ext: &str| own.join(format!("{}{ext}", key(p, "v")));
        // A byte changed, same size: what a crash leaves where data had not reached the disk.
        let mut b = std::fs::read(file("flipped", "")).unwrap();
        b[5000] ^= 1;
        std::fs::write(file("flipped", ""), b).unwrap();
        std::fs::remove_file(file("no-sum", ".sum")).unwrap();
        std::fs::write(file("garbled", ".sum"), b"blake3 zz 10000\n").unwrap();
        // Shorter than its checksum says.
        std::fs::OpenOptions::new()
            .write(true)
            .open(file("short", ""))
            .unwrap()
            .set_len(9000)
            .unwrap();

        let c = LocalFileCache::open(dir.path(), 1 << 20).unwrap();
        c.flush();
        assert_eq!(read(c.get("good", &m).unwrap()), data(10_000, 0));
        for p in ["flipped", "no-sum", "garbled", "short"] {
            assert!(c.get(p, &m).is_none(), "{p} is not served");
            assert!(!file(p, "").exists(), "{p} is deleted");
            assert!(!file(p, ".sum").exists(), "{p}'s checksum is deleted");
        }
        assert_eq!(c.stats().files, 1);
        assert_eq!(c.stats().used_bytes, 10_000);
    }

    #[test]
    fn open_touches_nothing_outside_its_own_directory() {
        let dir = tempfile::tempdir().unwrap();
        // What a user keeps there, including names that the cache once used at the top.
        let k = key("a", "v");
        let theirs = [
            ("notes.txt", &b"mine"[..]),
            ("mine/deep.bin", b"also mine"),
            (k.as_str(), b"old copy"),
            (&format!("{k}.part"), b"old partial"),
        ];
        std::fs::create_dir(dir.path().join("mine")).unwrap();
        for (name, content) in theirs {
            std::fs::write(dir.path().join(name), content).unwrap();
        }
        let c = LocalFileCache::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(c.dir(), dir.path().join(SUBDIR));
        offer_all(&c, "a", &meta(100, "v"), 4096, &data(100, 1), &[0]);
        // Inside its own directory, names it does not make are left alone too.
        std::fs::write(c.dir().join("README"), b"a note").unwrap();
        std::fs::create_dir(c.dir().join(format!("{k}.d"))).unwrap();
        drop(c);
        let c = LocalFileCache::open(dir.path(), 1 << 20).unwrap();
        c.flush();
        assert_eq!(read(c.get("a", &meta(100, "v")).unwrap()), data(100, 1));
        for (name, content) in theirs {
            assert_eq!(
                std::fs::read(dir.path().join(name)).unwrap(),
                content,
                "{name}"
            );
        }
        assert_eq!(std::fs::read(c.dir().join("README")).unwrap(), b"a note");
        assert!(c.dir().join(format!("{k}.d")).is_dir());
        let mut top: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        top.sort();
        let mut want = vec![
            k.clone(),
            format!("{k}.part"),
            SUBDIR.to_string(),
            "mine".into(),
            "notes.txt".into(),
        ];
        want.sort();
        assert_eq!(top, want, "nothing else is made beside its directory");
    }

    #[test]
    fn a_directory_of_its_name_that_is_not_its_own_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let own = dir.path().join(SUBDIR);
        std::fs::create_dir(&own).unwrap();
        std::fs::write(own.join("precious"), b"x").unwrap();
        let e = LocalFileCache::open(dir.path(), 1 << 20).unwrap_err();
        assert!(matches!(e, LocalCacheError::NotOurs { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains(&own.display().to_string()) && msg.contains(MARKER),
            "{msg}"
        );
        assert_eq!(std::fs::read(own.join("precious")).unwrap(), b"x");

        std::fs::write(own.join(MARKER), b"lakecache local file cache, format 9\n").unwrap();
        let e = LocalFileCache::open(dir.path(), 1 << 20).unwrap_err();
        assert!(matches!(e, LocalCacheError::OtherFormat { .. }), "{e}");
        assert_eq!(std::fs::read(own.join("precious")).unwrap(), b"x");

        let file = tempfile::tempdir().unwrap();
        std::fs::write(file.path().join(SUBDIR), b"a file").unwrap();
        let e = LocalFileCache::open(file.path(), 1 << 20).unwrap_err();
        assert!(matches!(e, LocalCacheError::NotOurs { .. }), "{e}");
        assert_eq!(std::fs::read(file.path().join(SUBDIR)).unwrap(), b"a file");
    }

    #[test]
    fn names_are_the_caches_own_only_in_its_pattern() {
        let k = key("p", "v");
        assert_eq!(Name::parse(&k), Some(Name::Copy(&k)));
        assert_eq!(Name::parse(&format!("{k}.part")), Some(Name::Partial(&k)));
        assert_eq!(Name::parse(&format!("{k}.sum")), Some(Name::Sum(&k)));
        assert_eq!(
            Name::parse(&format!("{k}.sum.part")),
            Some(Name::PartialSum(&k))
        );
        for other in [
            "notes.txt".to_string(),
            format!("{k}.bak"),
            k.to_uppercase(),
            k[..39].to_string(),
            format!("{k}0"),
            "é".repeat(20),
        ] {
            assert_eq!(Name::parse(&other), None, "{other}");
        }
    }
}
