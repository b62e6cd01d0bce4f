//! The FUSE adapter: each fuser callback hands its request to the async core on a tokio runtime
//! and replies from there, so reads are served concurrently rather than one at a time on the
//! session thread. Nothing here decides anything; it translates types and errors.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr,
    Request, SessionACL,
};
use lakecache_lake::Kind;
use tokio::runtime::Handle;

use crate::fs::{Attr, FsCore};
use crate::reader::ReadError;

struct LakeFs {
    core: Arc<FsCore>,
    rt: Handle,
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
        self.rt.spawn(async move {
            match core.open(ino.0).await {
                Ok(fh) => {
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
}

impl Default for MountConfig {
    fn default() -> Self {
        Self {
            allow_other: true,
            threads: 2,
            fs_name: "lakecache".into(),
        }
    }
}

/// A mounted filesystem; unmounts when dropped.
pub struct Mount {
    session: Option<fuser::BackgroundSession>,
    pub mountpoint: PathBuf,
}

impl Mount {
    /// Unmounts and waits for the session to end.
    pub fn unmount(mut self) -> std::io::Result<()> {
        match self.session.take() {
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
    let fs = LakeFs { core, rt };
    let session = fuser::spawn_mount(fs, mountpoint, &config)?;
    Ok(Mount {
        session: Some(session),
        mountpoint: mountpoint.to_path_buf(),
    })
}
