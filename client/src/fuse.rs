//! The FUSE adapter: each fuser callback hands its request to the async core on a tokio runtime
//! and replies from there, so reads are served concurrently rather than one at a time on the
//! session thread. It translates types and errors, and makes one decision the core cannot:
//! whether an open is handed to the kernel.
//!
//! **Passthrough.** When the core serves an open from a complete node-local copy
//! ([`crate::local_cache`]) and the kernel granted `FUSE_PASSTHROUGH` at init, the open is
//! answered with that file as its backing file, and the kernel reads it directly at the speed of
//! its filesystem. The kernel insists that all the opens of one inode use one mode at a time (and
//! one backing file), and answers a mixed open with `EIO`; so the adapter counts, per inode, its
//! opens of each mode: an inode with ordinary opens gets only ordinary opens until they are
//! released, and an inode with passthrough opens gets passthrough with the same backing file. If
//! the kernel refuses a backing file (no privilege, a filesystem it cannot stack on), passthrough
//! is turned off for the mount and local copies are read through the ordinary path.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fuser::{
    BackingId, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr,
    Request, SessionACL,
};
use lakecache_lake::Kind;
use parking_lot::Mutex;
use tokio::runtime::Handle;

use crate::fs::{Attr, FsCore};
use crate::reader::ReadError;

struct LakeFs {
    core: Arc<FsCore>,
    rt: Handle,
    passthrough: Arc<Passthrough>,
}

/// The open modes of one inode.
#[derive(Default)]
struct InodeIo {
    cached: u32,
    passthrough: u32,
    backing: Option<Arc<BackingId>>,
}

#[derive(Default)]
struct Passthrough {
    /// Asked for by the mount and granted by the kernel.
    enabled: AtomicBool,
    inodes: Mutex<HashMap<u64, InodeIo>>,
    /// Open handles: inode, and whether the open is a passthrough one.
    handles: Mutex<HashMap<u64, (u64, bool)>>,
}

impl Passthrough {
    /// Decides an open's mode and records it; returns the backing file for a passthrough open.
    fn open(
        &self,
        ino: u64,
        fh: u64,
        local: Option<&std::fs::File>,
        reply: &ReplyOpen,
    ) -> Option<Arc<BackingId>> {
        let mut inodes = self.inodes.lock();
        let io = inodes.entry(ino).or_default();
        let backing = if io.cached > 0 || !self.enabled.load(Ordering::Relaxed) {
            None
        } else if let Some(b) = &io.backing {
            Some(b.clone())
        } else if let Some(file) = local {
            match reply.open_backing(file) {
                Ok(b) => {
                    let b = Arc::new(b);
                    io.backing = Some(b.clone());
                    Some(b)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the kernel refused a passthrough backing file; serving local copies through FUSE");
                    self.enabled.store(false, Ordering::Relaxed);
                    None
                }
            }
        } else {
            None
        };
        if backing.is_some() {
            io.passthrough += 1;
        } else {
            io.cached += 1;
        }
        self.handles.lock().insert(fh, (ino, backing.is_some()));
        backing
    }

    fn release(&self, fh: u64) {
        let Some((ino, passthrough)) = self.handles.lock().remove(&fh) else {
            return;
        };
        let mut inodes = self.inodes.lock();
        if let Some(io) = inodes.get_mut(&ino) {
            if passthrough {
                io.passthrough = io.passthrough.saturating_sub(1);
                if io.passthrough == 0 {
                    io.backing = None;
                }
            } else {
                io.cached = io.cached.saturating_sub(1);
            }
            if io.cached == 0 && io.passthrough == 0 {
                inodes.remove(&ino);
            }
        }
    }
}

fn errno(e: &ReadError) -> Errno {
    Errno::from_i32(e.errno())
}

fn fattr(core: &FsCore, a: &Attr) -> FileAttr {
    let c = core.config();
    file_attr(a, c.uid, c.gid, 128 << 10)
}

fn file_attr(a: &Attr, uid: u32, gid: u32, block_size: u32) -> FileAttr {
    let (kind, perm, nlink) = match a.kind {
        Kind::Directory => (FileType::Directory, 0o555, 2),
        Kind::File => (FileType::RegularFile, 0o444, 1),
    };
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.mtime,
        crtime: a.mtime,
        kind,
        perm,
        nlink,
        uid,
        gid,
        rdev: 0,
        blksize: block_size,
        flags: 0,
    }
}

impl LakeFs {
    fn ttl(&self) -> Duration {
        self.core.config().attr_ttl
    }
}

impl Filesystem for LakeFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        let _ = config
            .add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
        if self.passthrough.enabled.load(Ordering::Relaxed) {
            let granted = config.set_max_stack_depth(1).is_ok()
                && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok();
            if !granted {
                tracing::info!(
                    "the kernel offers no FUSE passthrough; local copies are read through FUSE"
                );
            }
            self.passthrough.enabled.store(granted, Ordering::Relaxed);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let core = self.core.clone();
        let Some(name) = name.to_str().map(str::to_string) else {
            reply.error(Errno::ENOENT);
            return;
        };
        let ttl = self.ttl();
        self.rt.spawn(async move {
            match core.lookup(parent.0, &name).await {
                Ok(a) => reply.entry(&ttl, &fattr(&core, &a), Generation(0)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.core.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let core = self.core.clone();
        let ttl = self.ttl();
        self.rt.spawn(async move {
            match core.getattr(ino.0).await {
                Ok(a) => reply.attr(&ttl, &fattr(&core, &a)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            reply.error(Errno::EROFS);
            return;
        }
        let core = self.core.clone();
        let keep = self.core.config().keep_cache;
        let pt = self.passthrough.clone();
        self.rt.spawn(async move {
            match core.open(ino.0).await {
                Ok(fh) => {
                    let local = core.local_file(fh);
                    if let Some(backing) = pt.open(ino.0, fh, local.as_deref(), &reply) {
                        core.reader().metrics.passthrough_opens.inc();
                        reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &backing);
                        return;
                    }
                    let flags = if keep {
                        FopenFlags::FOPEN_KEEP_CACHE
                    } else {
                        FopenFlags::empty()
                    };
                    reply.opened(FileHandle(fh), flags)
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let core = self.core.clone();
        self.rt.spawn(async move {
            match core.read(fh.0, offset, size).await {
                Ok(b) => reply.data(&b),
                Err(e) => {
                    tracing::warn!(error = %e, "read failed");
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.core.release(fh.0);
        self.passthrough.release(fh.0);
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Read-only: nothing to write back.
        reply.ok();
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::from_i32(libc::ENODATA));
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0)
        } else {
            reply.data(&[])
        }
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let flags = if self.core.config().keep_cache {
            FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR
        } else {
            FopenFlags::empty()
        };
        reply.opened(FileHandle(0), flags);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let core = self.core.clone();
        self.rt.spawn(async move {
            match core.readdir(ino.0, offset, false).await {
                Ok(entries) => {
                    for (off, name, a) in entries {
                        let kind = match a.kind {
                            Kind::Directory => FileType::Directory,
                            Kind::File => FileType::RegularFile,
                        };
                        if reply.add(INodeNo(a.ino), off, kind, &name) {
                            break;
                        }
                    }
                    reply.ok()
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let core = self.core.clone();
        let ttl = self.ttl();
        self.rt.spawn(async move {
            match core.readdir(ino.0, offset, true).await {
                Ok(entries) => {
                    let mut full = false;
                    for (off, name, a) in entries {
                        let dot = name == "." || name == "..";
                        if full {
                            if !dot {
                                // Not sent: give back the reference readdir took for it.
                                core.forget(a.ino, 1);
                            }
                            continue;
                        }
                        if reply.add(
                            INodeNo(a.ino),
                            off,
                            &name,
                            &ttl,
                            &fattr(&core, &a),
                            Generation(0),
                        ) {
                            full = true;
                            if !dot {
                                core.forget(a.ino, 1);
                            }
                        }
                    }
                    reply.ok()
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.core.statfs();
        reply.statfs(s.blocks, 0, 0, s.files, 0, s.block_size, 255, s.block_size);
    }
}

/// Mount options.
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// Let users other than the mounting one read (needed for pods).
    pub allow_other: bool,
    /// Threads reading from `/dev/fuse`.
    pub threads: usize,
    /// Name shown as the mount's source.
    pub fs_name: String,
    /// Hand opens of complete local copies to the kernel (FUSE passthrough), if it allows.
    pub passthrough: bool,
}

impl Default for MountConfig {
    fn default() -> Self {
        Self {
            allow_other: true,
            threads: 2,
            fs_name: "lakecache".into(),
            passthrough: true,
        }
    }
}

/// A mounted filesystem; unmounts when dropped.
pub struct Mount {
    session: Option<fuser::BackgroundSession>,
    pub mountpoint: PathBuf,
}

impl Mount {
    /// Whether the session has ended: the filesystem was unmounted from outside (`umount`,
    /// `fusermount3 -u`) or the kernel aborted the connection.
    pub fn is_finished(&self) -> bool {
        self.session.as_ref().is_none_or(|s| s.guard.is_finished())
    }

    /// Unmounts and waits for the session to end.
    pub fn unmount(mut self) -> std::io::Result<()> {
        match self.session.take() {
            // Unmounted from outside already: only the thread is left to join.
            Some(s) if s.guard.is_finished() => s.join(),
            Some(s) => s.umount_and_join(),
            None => Ok(()),
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(s) = self.session.take()
            && let Err(e) = s.umount_and_join()
        {
            tracing::warn!(mountpoint = %self.mountpoint.display(), error = %e, "unmount failed");
        }
    }
}

/// Mounts `core` read-only at `mountpoint`, serving requests on `rt`.
pub fn mount(
    core: Arc<FsCore>,
    mountpoint: &Path,
    cfg: &MountConfig,
    rt: Handle,
) -> std::io::Result<Mount> {
    let mut options = vec![
        MountOption::FSName(cfg.fs_name.clone()),
        MountOption::Subtype("lakecache".into()),
        MountOption::RO,
        MountOption::NoAtime,
        MountOption::DefaultPermissions,
    ];
    if cfg.allow_other {
        options.push(MountOption::CUSTOM("allow_other".into()));
    }
    let mut config = Config::default();
    config.mount_options = options;
    config.acl = if cfg.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(cfg.threads.max(1));
    config.clone_fd = cfg.threads > 1;
    let passthrough = Arc::new(Passthrough::default());
    passthrough.enabled.store(
        cfg.passthrough && core.local_cache().is_some(),
        Ordering::Relaxed,
    );
    let fs = LakeFs {
        core,
        rt,
        passthrough,
    };
    let session = fuser::spawn_mount(fs, mountpoint, &config)?;
    Ok(Mount {
        session: Some(session),
        mountpoint: mountpoint.to_path_buf(),
    })
}
