//! The node's filesystem and mount table, as the CSI handlers and the repair loop see them.
//!
//! Stage, publish and repair have rules about what is already there: a target that is already
//! published with the same sub path is left alone, a stale mount on a target is cleared before
//! the bind, a path that is mounted but not ours is never unmounted, a broken target gets a new
//! bind on top of the dead one. Proving those rules with real mounts needs root and a FUSE
//! server; behind [`Host`] they are unit-tested against [`fake::FakeHost`], an in-memory mount
//! table, and the real [`NodeHost`] runs in the suite's mount tests and csi-sanity.

use std::io;
use std::path::Path;

use crate::mounts::{self, Health, Usage};

/// What the handlers do to the node's filesystem and mounts.
pub trait Host: Send + Sync + 'static {
    /// Whether the mount at `path` answers (without waiting on a hung one for long).
    fn health(&self, path: &Path) -> Health;
    /// How many mounts are stacked on `path` (0: not a mount point). Reads the mount table.
    fn mount_count(&self, path: &Path) -> io::Result<usize>;
    /// Whether `path` is a mount point.
    fn is_mount_point(&self, path: &Path) -> io::Result<bool> {
        Ok(self.mount_count(path)? > 0)
    }
    /// Whether `path` holds a lakecache FUSE mount or a bind of one.
    fn is_ours(&self, path: &Path) -> bool;
    /// Binds `source` read-only on `target` (on top of what is mounted there).
    fn bind_read_only(&self, source: &Path, target: &Path) -> io::Result<()>;
    /// Unmounts everything stacked on `path`.
    fn unmount_all(&self, path: &Path) -> io::Result<()>;
    /// The usage of the filesystem at `path`.
    fn usage(&self, path: &Path) -> io::Result<Usage>;
    /// Whether `path` is a directory (a stat: inside a cache mount, this asks the workers).
    fn is_dir(&self, path: &Path) -> io::Result<bool>;
    /// Whether anything is at `path`.
    fn exists(&self, path: &Path) -> bool;
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    fn remove_dir(&self, path: &Path) -> io::Result<()>;
}

/// The real node.
pub struct NodeHost;

impl Host for NodeHost {
    fn health(&self, path: &Path) -> Health {
        mounts::health(path)
    }
    fn mount_count(&self, path: &Path) -> io::Result<usize> {
        mounts::mount_count(path)
    }
    fn is_ours(&self, path: &Path) -> bool {
        let Ok(table) = mounts::mount_table() else {
            return false;
        };
        table
            .iter()
            .any(|m| m.mount_point == path && m.is_lakecache())
    }
    fn bind_read_only(&self, source: &Path, target: &Path) -> io::Result<()> {
        mounts::bind_read_only(source, target)
    }
    fn unmount_all(&self, path: &Path) -> io::Result<()> {
        mounts::unmount_all(path).map(|_| ())
    }
    fn usage(&self, path: &Path) -> io::Result<Usage> {
        mounts::usage(path)
    }
    fn is_dir(&self, path: &Path) -> io::Result<bool> {
        std::fs::metadata(path).map(|m| m.is_dir())
    }
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }
    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir(path)
    }
}

#[cfg(test)]
pub mod fake {
    //! An in-memory node: directories, files, and a mount table of stacked binds.

    use std::collections::{BTreeMap, BTreeSet};
    use std::io;
    use std::path::{Path, PathBuf};

    use parking_lot::Mutex;

    use super::Host;
    use crate::mounts::{Health, Usage};

    /// One mount on a path: where it comes from, and whether it still answers.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct FakeMount {
        pub source: PathBuf,
        pub ours: bool,
        pub broken: bool,
    }

    #[derive(Default)]
    pub struct FakeHost {
        pub dirs: Mutex<BTreeSet<PathBuf>>,
        pub files: Mutex<BTreeSet<PathBuf>>,
        /// The stack of mounts on each path, the top last.
        pub mounts: Mutex<BTreeMap<PathBuf, Vec<FakeMount>>>,
        /// Paths whose stat fails as a hung or dead mount's does.
        pub failing: Mutex<BTreeSet<PathBuf>>,
        /// Every bind and unmount, in order.
        pub log: Mutex<Vec<String>>,
    }

    impl FakeHost {
        pub fn with_dirs(dirs: &[&Path]) -> Self {
            let host = Self::default();
            for d in dirs {
                host.dirs.lock().insert(d.to_path_buf());
            }
            host
        }

        /// Mounts the cache (ours) at `path`, and makes `dirs` directories of it.
        pub fn mount_cache(&self, path: &Path, dirs: &[&str]) {
            self.dirs.lock().insert(path.to_path_buf());
            for d in dirs {
                self.dirs.lock().insert(path.join(d));
            }
            self.mounts
                .lock()
                .entry(path.into())
                .or_default()
                .push(FakeMount {
                    source: "lakecache".into(),
                    ours: true,
                    broken: false,
                });
        }

        pub fn top(&self, path: &Path) -> Option<FakeMount> {
            self.mounts.lock().get(path).and_then(|s| s.last().cloned())
        }

        pub fn stacked(&self, path: &Path) -> usize {
            self.mounts.lock().get(path).map_or(0, Vec::len)
        }

        pub fn log(&self) -> Vec<String> {
            self.log.lock().clone()
        }
    }

    impl Host for FakeHost {
        fn health(&self, path: &Path) -> Health {
            match self.top(path) {
                None => Health::NotMounted,
                Some(m) if m.broken => Health::Broken("transport endpoint is not connected".into()),
                Some(_) => Health::Healthy,
            }
        }
        fn mount_count(&self, path: &Path) -> io::Result<usize> {
            Ok(self.stacked(path))
        }
        fn is_ours(&self, path: &Path) -> bool {
            self.top(path).is_some_and(|m| m.ours)
        }
        fn bind_read_only(&self, source: &Path, target: &Path) -> io::Result<()> {
            if !self.dirs.lock().contains(target) {
                return Err(io::Error::from(io::ErrorKind::NotFound));
            }
            // The bind shows what the source's top mount shows.
            let ours = self
                .mounts
                .lock()
                .iter()
                .any(|(p, s)| source.starts_with(p) && s.last().is_some_and(|m| m.ours));
            self.mounts
                .lock()
                .entry(target.into())
                .or_default()
                .push(FakeMount {
                    source: source.into(),
                    ours,
                    broken: false,
                });
            self.log
                .lock()
                .push(format!("bind {} {}", source.display(), target.display()));
            Ok(())
        }
        fn unmount_all(&self, path: &Path) -> io::Result<()> {
            self.mounts.lock().remove(path);
            self.log.lock().push(format!("unmount {}", path.display()));
            Ok(())
        }
        fn usage(&self, _path: &Path) -> io::Result<Usage> {
            Ok(Usage {
                bytes_total: 100,
                bytes_available: 0,
                bytes_used: 100,
                inodes_total: 10,
                inodes_free: 0,
                inodes_used: 10,
            })
        }
        fn is_dir(&self, path: &Path) -> io::Result<bool> {
            if self.failing.lock().iter().any(|f| path.starts_with(f)) {
                return Err(io::Error::from_raw_os_error(libc::ENOTCONN));
            }
            if self.dirs.lock().contains(path) {
                Ok(true)
            } else if self.files.lock().contains(path) {
                Ok(false)
            } else {
                Err(io::Error::from(io::ErrorKind::NotFound))
            }
        }
        fn exists(&self, path: &Path) -> bool {
            self.dirs.lock().contains(path) || self.files.lock().contains(path)
        }
        fn create_dir_all(&self, path: &Path) -> io::Result<()> {
            // As on a real node: over a dead mount the path does not stat, and mkdir finds it
            // taken.
            if self.top(path).is_some_and(|m| m.broken) {
                return Err(io::Error::from(io::ErrorKind::AlreadyExists));
            }
            let mut dirs = self.dirs.lock();
            for a in path.ancestors() {
                dirs.insert(a.to_path_buf());
            }
            Ok(())
        }
        fn remove_dir(&self, path: &Path) -> io::Result<()> {
            if self.mounts.lock().contains_key(path) {
                return Err(io::Error::from(io::ErrorKind::ResourceBusy));
            }
            if self.dirs.lock().remove(path) {
                Ok(())
            } else {
                Err(io::Error::from(io::ErrorKind::NotFound))
            }
        }
    }
}
