//! What a FUSE server leaves for its successor, so that the kernel's FUSE connection (and every
//! file a pod holds open on the mount) outlives the process serving it.
//!
//! The kernel names files by inode numbers and open files by handles that this process chose;
//! a successor that takes over the `/dev/fuse` connection must answer for the same numbers. So
//! every change the kernel learns of (an inode handed out or refreshed, a reference dropped, a
//! file opened or released, a passthrough backing file registered) is appended to a **journal**
//! in the volume's state directory *before* the reply that tells the kernel. Appending is one
//! `write(2)` to the page cache: it survives the process being killed (only the node's crash
//! loses it, and that loses the mount too). A successor replays the journal; a torn last line
//! (a write cut by the kill) is dropped, since its reply was never sent either.
//!
//! The journal is rewritten as a snapshot of the live state when it has grown well past it
//! (a new file renamed over the old), so its size follows what the kernel holds, not the
//! history. One process at a time serves a volume: whoever holds the **lock** (`flock` on a
//! separate file, released by the kernel when its holder dies).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use lakecache_lake::{Kind, ObjectMeta};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// The journal's file name in the state directory.
pub const JOURNAL: &str = "fuse.state";
/// The lock's file name in the state directory.
pub const LOCK: &str = "fuse.lock";

/// What the kernel offered at `FUSE_INIT`: a successor answers the same offer the same way, so
/// the connection's settings (passthrough, readdirplus, read-ahead) and its own agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelInit {
    pub major: u32,
    pub minor: u32,
    /// The capability bits the kernel offered (both words).
    pub flags: u64,
    pub max_readahead: u32,
}

/// An object's attributes as the journal keeps them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedMeta {
    dir: bool,
    size: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    version: String,
    /// Nanoseconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mtime: Option<u64>,
}

impl From<&ObjectMeta> for SavedMeta {
    fn from(m: &ObjectMeta) -> Self {
        SavedMeta {
            dir: m.kind == Kind::Directory,
            size: m.size,
            version: m.version.clone(),
            mtime: m
                .modified
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos().min(u64::MAX as u128) as u64),
        }
    }
}

impl From<&SavedMeta> for ObjectMeta {
    fn from(m: &SavedMeta) -> Self {
        ObjectMeta {
            kind: if m.dir { Kind::Directory } else { Kind::File },
            size: m.size,
            version: m.version.clone(),
            modified: m.mtime.map(|ns| {
                SystemTime::UNIX_EPOCH
                    + Duration::new(ns / 1_000_000_000, (ns % 1_000_000_000) as u32)
            }),
        }
    }
}

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "r", rename_all = "snake_case")]
pub enum Record {
    Kernel(KernelInit),
    /// The next numbers to hand out (a snapshot's first line after `Kernel`).
    Next {
        ino: u64,
        fh: u64,
    },
    /// An inode handed out or refreshed, with the kernel's reference count.
    Node {
        ino: u64,
        path: String,
        meta: SavedMeta,
        lookups: u64,
    },
    /// The kernel's reference count of an inode after a partial forget.
    Lookups {
        ino: u64,
        lookups: u64,
    },
    /// The kernel forgot an inode.
    Gone {
        ino: u64,
    },
    /// A file opened: the object (and version) it reads, and whether from a local copy.
    Open {
        fh: u64,
        ino: u64,
        path: String,
        meta: SavedMeta,
        local: bool,
    },
    /// An open answered with a passthrough backing file (the kernel's id for it).
    Backing {
        fh: u64,
        id: u32,
    },
    Release {
        fh: u64,
    },
}

/// An open file as a successor finds it.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedHandle {
    pub fh: u64,
    pub ino: u64,
    pub path: String,
    pub meta: ObjectMeta,
    pub local: bool,
    pub backing: Option<u32>,
}

/// An inode as a successor finds it.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedNode {
    pub ino: u64,
    pub path: String,
    pub meta: ObjectMeta,
    pub lookups: u64,
}

/// Everything the journal says, replayed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Saved {
    pub kernel: Option<KernelInit>,
    pub next_ino: u64,
    pub next_fh: u64,
    pub nodes: Vec<SavedNode>,
    pub handles: Vec<SavedHandle>,
}

impl Saved {
    fn apply(
        &mut self,
        r: Record,
        nodes: &mut std::collections::BTreeMap<u64, SavedNode>,
        handles: &mut std::collections::BTreeMap<u64, SavedHandle>,
    ) {
        match r {
            Record::Kernel(k) => self.kernel = Some(k),
            Record::Next { ino, fh } => {
                self.next_ino = self.next_ino.max(ino);
                self.next_fh = self.next_fh.max(fh);
            }
            Record::Node {
                ino,
                path,
                meta,
                lookups,
            } => {
                self.next_ino = self.next_ino.max(ino + 1);
                nodes.insert(
                    ino,
                    SavedNode {
                        ino,
                        path,
                        meta: (&meta).into(),
                        lookups,
                    },
                );
            }
            Record::Lookups { ino, lookups } => {
                if let Some(n) = nodes.get_mut(&ino) {
                    n.lookups = lookups;
                }
            }
            Record::Gone { ino } => {
                nodes.remove(&ino);
            }
            Record::Open {
                fh,
                ino,
                path,
                meta,
                local,
            } => {
                self.next_fh = self.next_fh.max(fh + 1);
                handles.insert(
                    fh,
                    SavedHandle {
                        fh,
                        ino,
                        path,
                        meta: (&meta).into(),
                        local,
                        backing: None,
                    },
                );
            }
            Record::Backing { fh, id } => {
                if let Some(h) = handles.get_mut(&fh) {
                    h.backing = Some(id);
                }
            }
            Record::Release { fh } => {
                handles.remove(&fh);
            }
        }
    }
}

/// The exclusive right to serve a volume: held until dropped, or until the process dies.
#[derive(Debug)]
pub struct ServeLock {
    _held: Flock<File>,
}

impl ServeLock {
    /// Takes the lock in `dir`, waiting up to `wait` for the process holding it to let go (a
    /// predecessor finishing its hand-over, or dying).
    pub fn acquire(dir: &Path, wait: Duration) -> std::io::Result<ServeLock> {
        let path = dir.join(LOCK);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)?;
        let deadline = Instant::now() + wait;
        let mut file = file;
        // Bounded by `wait`; polls, since a blocking flock could not be given up.
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(held) => return Ok(ServeLock { _held: held }),
                Err((f, Errno::EWOULDBLOCK)) => file = f,
                Err((_, e)) => return Err(e.into()),
            }
            if Instant::now() >= deadline {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "another process still serves this volume ({} is still locked after {wait:?})",
                        path.display(),
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Reads the journal in `dir`. No journal is an empty state; a line that cannot be read is an
/// error, except the last one, which a kill may have cut short (its reply was never sent).
pub fn load(dir: &Path) -> std::io::Result<Saved> {
    let path = dir.join(JOURNAL);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Saved::default()),
        Err(e) => return Err(e),
    };
    let mut saved = Saved::default();
    let mut nodes = Default::default();
    let mut handles = Default::default();
    let mut lines = BufReader::new(file).lines().enumerate().peekable();
    while let Some((n, line)) = lines.next() {
        let line = line?;
        match serde_json::from_str::<Record>(&line) {
            Ok(r) => saved.apply(r, &mut nodes, &mut handles),
            Err(_) if lines.peek().is_none() => {
                tracing::warn!(file = %path.display(), line = n + 1, "dropping a journal line cut short");
            }
            Err(e) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{} line {}: {e}", path.display(), n + 1),
                ));
            }
        }
    }
    saved.nodes = nodes.into_values().collect();
    saved.handles = handles.into_values().collect();
    Ok(saved)
}

/// Appends records to the journal, and rewrites it as a snapshot when asked.
pub struct Journal {
    dir: PathBuf,
    inner: Mutex<JournalFile>,
}

struct JournalFile {
    file: File,
    /// Records appended since the last snapshot.
    appended: u64,
    /// The first error, reported once: the mount keeps serving, only a hand-over would suffer.
    failed: bool,
}

/// A snapshot is written once the records since the last one exceed this many plus twice the
/// live state.
const COMPACT_SLACK: u64 = 8192;

impl Journal {
    /// Starts a journal in `dir` with `snapshot` as its content (the state at this moment).
    pub fn create(dir: &Path, snapshot: &[Record]) -> std::io::Result<Journal> {
        let file = write_snapshot(dir, snapshot)?;
        Ok(Journal {
            dir: dir.to_path_buf(),
            inner: Mutex::new(JournalFile {
                file,
                appended: 0,
                failed: false,
            }),
        })
    }

    /// Appends `records` (one write); returns whether the journal is due for a snapshot given
    /// `live` records of state.
    pub fn append(&self, records: &[Record], live: u64) -> bool {
        if records.is_empty() {
            return false;
        }
        let buf = encode(records);
        let mut inner = self.inner.lock();
        if inner.failed {
            return false;
        }
        if let Err(e) = inner.file.write_all(&buf) {
            // A journal that misses a record would give a successor wrong numbers: it goes,
            // and a successor then fails cleanly (the mount is then mounted anew).
            tracing::error!(dir = %self.dir.display(), error = %e, "cannot write the FUSE state journal; removing it: a restart of this FUSE server will break its mount");
            inner.failed = true;
            let _ = std::fs::remove_file(self.dir.join(JOURNAL));
            return false;
        }
        inner.appended += records.len() as u64;
        inner.appended > COMPACT_SLACK + 2 * live
    }

    /// Replaces the journal with `snapshot`.
    pub fn rewrite(&self, snapshot: &[Record]) {
        let mut inner = self.inner.lock();
        if inner.failed {
            return;
        }
        match write_snapshot(&self.dir, snapshot) {
            Ok(file) => {
                inner.file = file;
                inner.appended = 0;
            }
            Err(e) => {
                // Not again before as many records again.
                inner.appended = 0;
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot rewrite the FUSE state journal; appending to the old one");
            }
        }
    }
}

/// `records` as journal lines.
fn encode(records: &[Record]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(records.len() * 96);
    for r in records {
        // Serializing these plain structs cannot fail.
        let _ = serde_json::to_writer(&mut buf, r);
        buf.push(b'\n');
    }
    buf
}

/// Writes `records` to a new file and renames it over the journal; returns it open for
/// appending.
fn write_snapshot(dir: &Path, records: &[Record]) -> std::io::Result<File> {
    let tmp = dir.join(format!("{JOURNAL}.tmp"));
    File::create(&tmp)?.write_all(&encode(records))?;
    std::fs::rename(&tmp, dir.join(JOURNAL))?;
    OpenOptions::new().append(true).open(dir.join(JOURNAL))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(size: u64, version: &str) -> ObjectMeta {
        ObjectMeta {
            kind: Kind::File,
            size,
            version: version.into(),
            modified: Some(SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 123)),
        }
    }

    #[test]
    fn a_journal_replays_to_the_live_state_and_drops_a_cut_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let k = KernelInit {
            major: 7,
            minor: 41,
            flags: 1 << 37 | 1,
            max_readahead: 131072,
        };
        let j = Journal::create(dir.path(), &[Record::Kernel(k)]).unwrap();
        let m = meta(10, "v1");
        j.append(
            &[
                Record::Node {
                    ino: 2,
                    path: "a".into(),
                    meta: (&m).into(),
                    lookups: 1,
                },
                Record::Node {
                    ino: 3,
                    path: "b".into(),
                    meta: (&m).into(),
                    lookups: 2,
                },
                Record::Open {
                    fh: 7,
                    ino: 3,
                    path: "b".into(),
                    meta: (&m).into(),
                    local: true,
                },
                Record::Backing { fh: 7, id: 4 },
                Record::Open {
                    fh: 8,
                    ino: 3,
                    path: "b".into(),
                    meta: (&m).into(),
                    local: false,
                },
                Record::Release { fh: 8 },
                Record::Gone { ino: 2 },
                Record::Lookups { ino: 3, lookups: 1 },
            ],
            0,
        );
        // A kill in the middle of a write leaves half a line.
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(JOURNAL))
            .unwrap()
            .write_all(b"{\"r\":\"node\",\"ino\":9,\"pa")
            .unwrap();
        let s = load(dir.path()).unwrap();
        assert_eq!(s.kernel, Some(k));
        assert_eq!(s.next_ino, 4);
        assert_eq!(s.next_fh, 9);
        assert_eq!(
            s.nodes,
            vec![SavedNode {
                ino: 3,
                path: "b".into(),
                meta: m.clone(),
                lookups: 1
            }]
        );
        assert_eq!(
            s.handles,
            vec![SavedHandle {
                fh: 7,
                ino: 3,
                path: "b".into(),
                meta: m,
                local: true,
                backing: Some(4)
            }]
        );
    }

    #[test]
    fn a_bad_line_inside_the_journal_is_an_error_and_no_journal_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), Saved::default());
        std::fs::write(
            dir.path().join(JOURNAL),
            "garbage\n{\"r\":\"gone\",\"ino\":2}\n",
        )
        .unwrap();
        let e = load(dir.path()).unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
    }

    #[test]
    fn a_snapshot_replaces_the_history_and_appends_go_on_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::create(dir.path(), &[]).unwrap();
        let m = meta(1, "v");
        let mut due = false;
        for ino in 2..(COMPACT_SLACK + 10) {
            due |= j.append(
                &[Record::Node {
                    ino,
                    path: format!("f{ino}"),
                    meta: (&m).into(),
                    lookups: 1,
                }],
                0,
            );
        }
        assert!(due, "the journal never asked for a snapshot");
        j.rewrite(&[Record::Next { ino: 100, fh: 5 }]);
        j.append(&[Record::Release { fh: 1 }], 0);
        let text = std::fs::read_to_string(dir.path().join(JOURNAL)).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        let s = load(dir.path()).unwrap();
        assert_eq!((s.next_ino, s.next_fh, s.nodes.len()), (100, 5, 0));
    }

    #[test]
    fn one_process_at_a_time_holds_the_serve_lock() {
        let dir = tempfile::tempdir().unwrap();
        let held = ServeLock::acquire(dir.path(), Duration::ZERO).unwrap();
        let t = Instant::now();
        let e = ServeLock::acquire(dir.path(), Duration::from_millis(50)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(t.elapsed() >= Duration::from_millis(50));
        drop(held);
        ServeLock::acquire(dir.path(), Duration::ZERO).unwrap();
    }
}
