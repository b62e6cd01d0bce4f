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
//!
//! **Hand-off.** The kernel's connection (the `/dev/fuse` descriptor, [`Mount::device`]) can be
//! served by a successor process: [`resume`] takes a descriptor and the state the predecessor
//! journaled ([`crate::handoff`]) and serves the same inode numbers and open files. It answers
//! a replayed `FUSE_INIT` (the kernel sends only one per connection) and then asks the kernel
//! to send again every request that was read but never answered (`FUSE_NOTIFY_RESEND`), so a
//! predecessor that died mid-request, or froze ([`Mount::freeze`]) to hand over, costs a
//! stall, not an error. Every reply goes through one gate; a frozen server sends none, and
//! its journal is then complete.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fuser::{
    BackingId, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr,
    Request, Session, SessionACL,
};
use lakecache_lake::Kind;
use parking_lot::{Mutex, RwLock};
use tokio::runtime::Handle;

use crate::fs::{Attr, FsCore};
use crate::handoff::KernelInit;
use crate::reader::ReadError;

struct LakeFs {
    core: Arc<FsCore>,
    rt: Handle,
    passthrough: Arc<Passthrough>,
    gate: Arc<Gate>,
}

/// Every reply goes through here. Once frozen (a successor takes the connection over), none is
/// sent: the request stays with the kernel, which sends it again to the successor.
#[derive(Default)]
struct Gate {
    frozen: RwLock<bool>,
}

impl Gate {
    fn answer<R>(&self, reply: R, send: impl FnOnce(R)) {
        self.answer_or(reply, send, || {});
    }

    /// [`Gate::answer`], running `undo` instead when frozen: the kernel asks the successor
    /// again, so what this request changed (an open handle, a reference) must not stay in the
    /// journal the successor replays.
    fn answer_or<R>(&self, reply: R, send: impl FnOnce(R), undo: impl FnOnce()) {
        let frozen = self.frozen.read();
        if *frozen {
            undo();
            // Dropping a reply would answer EIO; this one must stay unanswered.
            std::mem::forget(reply);
            return;
        }
        send(reply);
    }

    /// Waits for replies being sent, and lets no other out.
    fn freeze(&self) {
        *self.frozen.write() = true;
    }
}

/// The open modes of one inode.
#[derive(Default)]
struct InodeIo {
    cached: u32,
    passthrough: u32,
    /// The kernel's id of the backing file its passthrough opens share.
    backing: Option<u32>,
}

#[derive(Default)]
struct Passthrough {
    /// Asked for by the mount and granted by the kernel.
    enabled: AtomicBool,
    /// The connection, for registering and closing backing files.
    device: OnceLock<Arc<OwnedFd>>,
    inodes: Mutex<HashMap<u64, InodeIo>>,
    /// Open handles: inode, and whether the open is a passthrough one.
    handles: Mutex<HashMap<u64, (u64, bool)>>,
}

/// `FUSE_DEV_IOC_BACKING_CLOSE`: `_IOW(229, 2, uint32_t)`.
const FUSE_DEV_IOC_BACKING_CLOSE: libc::c_ulong = 0x4004_e502;

impl Passthrough {
    /// Rebuilds the open modes from a restored core's open files.
    fn restore(&self, handles: &[(u64, u64, Option<u32>)]) {
        let mut inodes = self.inodes.lock();
        let mut opens = self.handles.lock();
        for (fh, ino, backing) in handles {
            let io = inodes.entry(*ino).or_default();
            match backing {
                Some(id) => {
                    io.passthrough += 1;
                    io.backing = Some(*id);
                }
                None => io.cached += 1,
            }
            opens.insert(*fh, (*ino, backing.is_some()));
        }
    }

    fn close_backing(&self, id: u32) {
        let Some(dev) = self.device.get() else { return };
        // SAFETY: the ioctl reads one u32 from a valid pointer on a /dev/fuse descriptor.
        #[allow(unsafe_code)]
        let rc = unsafe {
            libc::ioctl(
                dev.as_raw_fd(),
                FUSE_DEV_IOC_BACKING_CLOSE as _,
                &id as *const u32,
            )
        };
        if rc != 0 {
            tracing::warn!(id, error = %std::io::Error::last_os_error(), "closing a passthrough backing file failed");
        }
    }

    /// Decides an open's mode and records it; returns the backing file's id for a passthrough
    /// open.
    fn open(&self, ino: u64, fh: u64, local: Option<&std::fs::File>) -> Option<u32> {
        let mut inodes = self.inodes.lock();
        let io = inodes.entry(ino).or_default();
        let backing = if io.cached > 0 || !self.enabled.load(Ordering::Relaxed) {
            None
        } else if let Some(id) = io.backing {
            Some(id)
        } else if let (Some(file), Some(dev)) = (local, self.device.get()) {
            match BackingId::create_raw(dev.as_fd(), file) {
                Ok(id) => {
                    io.backing = Some(id);
                    Some(id)
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
                if io.passthrough == 0
                    && let Some(id) = io.backing.take()
                {
                    self.close_backing(id);
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
        let offered_readahead = match config.set_max_readahead(1 << 20) {
            Ok(previous) => previous,
            Err(max) => max,
        };
        let abi = config.kernel_abi();
        self.core.set_kernel_init(KernelInit {
            major: abi.0,
            minor: abi.1,
            flags: config.capabilities().bits(),
            max_readahead: offered_readahead,
        });
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
        let gate = self.gate.clone();
        let Some(name) = name.to_str().map(str::to_string) else {
            gate.answer(reply, |r| r.error(Errno::ENOENT));
            return;
        };
        let ttl = self.ttl();
        self.rt.spawn(async move {
            let res = core.lookup(parent.0, &name).await;
            let taken = res.as_ref().ok().map(|a| a.ino);
            gate.answer_or(
                reply,
                |r| match res {
                    Ok(a) => r.entry(&ttl, &fattr(&core, &a), Generation(0)),
                    Err(e) => r.error(errno(&e)),
                },
                || {
                    if let Some(ino) = taken {
                        core.forget(ino, 1);
                    }
                },
            );
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.core.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let core = self.core.clone();
        let gate = self.gate.clone();
        let ttl = self.ttl();
        self.rt.spawn(async move {
            let res = core.getattr(ino.0).await;
            gate.answer(reply, |r| match res {
                Ok(a) => r.attr(&ttl, &fattr(&core, &a)),
                Err(e) => r.error(errno(&e)),
            });
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            self.gate.answer(reply, |r| r.error(Errno::EROFS));
            return;
        }
        let core = self.core.clone();
        let gate = self.gate.clone();
        let keep = self.core.config().keep_cache;
        let pt = self.passthrough.clone();
        self.rt.spawn(async move {
            let fh = match core.open(ino.0).await {
                Ok(fh) => fh,
                Err(e) => return gate.answer(reply, |r| r.error(errno(&e))),
            };
            let local = core.local_file(fh);
            let undo = || {
                core.release(fh);
                pt.release(fh);
            };
            if let Some(id) = pt.open(ino.0, fh, local.as_deref()) {
                // Journaled before the kernel hears of it: a successor must reuse this id.
                core.set_backing(fh, id);
                core.reader().metrics.passthrough_opens.inc();
                gate.answer_or(
                    reply,
                    |r| {
                        // SAFETY: `id` is a backing file registered on this connection and
                        // still open (its opens are counted); the wrapper is taken apart again
                        // so that only `Passthrough::release` closes it.
                        #[allow(unsafe_code)]
                        let backing = unsafe { r.wrap_backing(id) };
                        r.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &backing);
                        let _ = backing.into_raw();
                    },
                    undo,
                );
                return;
            }
            let flags = if keep {
                FopenFlags::FOPEN_KEEP_CACHE
            } else {
                FopenFlags::empty()
            };
            gate.answer_or(reply, |r| r.opened(FileHandle(fh), flags), undo);
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
        let gate = self.gate.clone();
        self.rt.spawn(async move {
            let res = core.read(fh.0, offset, size).await;
            gate.answer(reply, |r| match res {
                Ok(b) => r.data(&b),
                Err(e) => {
                    tracing::warn!(error = %e, "read failed");
                    r.error(errno(&e))
                }
            });
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
        self.gate.answer(reply, |r| r.ok());
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
        self.gate.answer(reply, |r| r.ok());
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        self.gate
            .answer(reply, |r| r.error(Errno::from_i32(libc::ENODATA)));
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.gate
            .answer(reply, |r| if size == 0 { r.size(0) } else { r.data(&[]) });
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let flags = if self.core.config().keep_cache {
            FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR
        } else {
            FopenFlags::empty()
        };
        self.gate.answer(reply, |r| r.opened(FileHandle(0), flags));
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        let core = self.core.clone();
        let gate = self.gate.clone();
        self.rt.spawn(async move {
            let res = core.readdir(ino.0, offset, false).await;
            gate.answer(reply, |mut r| match res {
                Ok(entries) => {
                    for (off, name, a) in entries {
                        let kind = match a.kind {
                            Kind::Directory => FileType::Directory,
                            Kind::File => FileType::RegularFile,
                        };
                        if r.add(INodeNo(a.ino), off, kind, &name) {
                            break;
                        }
                    }
                    r.ok()
                }
                Err(e) => r.error(errno(&e)),
            });
        });
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        let core = self.core.clone();
        let gate = self.gate.clone();
        let ttl = self.ttl();
        self.rt.spawn(async move {
            let res = core.readdir(ino.0, offset, true).await;
            gate.answer(reply, |mut r| match res {
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
                        if r.add(
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
                    r.ok()
                }
                Err(e) => r.error(errno(&e)),
            });
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
        self.gate.answer(reply, |r| r.ok());
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.core.statfs();
        self.gate.answer(reply, |r| {
            r.statfs(s.blocks, 0, 0, s.files, 0, s.block_size, 255, s.block_size)
        });
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
    /// The connection may be handed to a successor ([`resume`]): its reading threads then
    /// share one descriptor (see [`session_config`]).
    pub handoff: bool,
}

impl Default for MountConfig {
    fn default() -> Self {
        Self {
            allow_other: true,
            threads: 2,
            fs_name: "lakecache".into(),
            passthrough: true,
            handoff: false,
        }
    }
}

/// A mounted filesystem; unmounts when dropped.
pub struct Mount {
    session: Option<fuser::BackgroundSession>,
    pub mountpoint: PathBuf,
    device: Arc<OwnedFd>,
    gate: Arc<Gate>,
    /// Mounted by a predecessor: fuser did not mount it, so it does not unmount it either.
    resumed: bool,
}

impl Mount {
    /// Whether the session has ended: the filesystem was unmounted from outside (`umount`,
    /// `fusermount3 -u`) or the kernel aborted the connection.
    pub fn is_finished(&self) -> bool {
        self.session.as_ref().is_none_or(|s| s.guard.is_finished())
    }

    /// The kernel's connection: a successor serves the mount through a copy of it.
    pub fn device(&self) -> Arc<OwnedFd> {
        self.device.clone()
    }

    /// [`Mount::freeze`], callable from elsewhere.
    pub fn freezer(&self) -> Arc<dyn Fn() + Send + Sync> {
        let gate = self.gate.clone();
        Arc::new(move || gate.freeze())
    }

    /// Stops answering the kernel, for good: replies being sent are waited for, every other
    /// request stays unanswered, for a successor to answer. The journal is then complete; the
    /// process should exit without unmounting.
    pub fn freeze(&self) {
        self.gate.freeze();
    }

    /// Unmounts and waits for the session to end.
    pub fn unmount(mut self) -> std::io::Result<()> {
        let s = self.session.take();
        match s {
            // Unmounted from outside already: only the thread is left to join.
            Some(s) if s.guard.is_finished() => s.join(),
            Some(s) if self.resumed => {
                umount(&self.mountpoint)?;
                s.join()
            }
            Some(s) => s.umount_and_join(),
            None => Ok(()),
        }
    }
}

fn umount(path: &Path) -> std::io::Result<()> {
    Ok(nix::mount::umount(path)?)
}

impl Drop for Mount {
    fn drop(&mut self) {
        // A resumed mount is unmounted only when asked ([`Mount::unmount`]): a successor that
        // fails after taking the connection over leaves the mount to the next one.
        if self.resumed {
            return;
        }
        if let Some(s) = self.session.take()
            && let Err(e) = s.umount_and_join()
        {
            tracing::warn!(mountpoint = %self.mountpoint.display(), error = %e, "unmount failed");
        }
    }
}

/// fuser's settings for a mount.
fn session_config(cfg: &MountConfig) -> Config {
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
    // A cloned descriptor per thread (FUSE_DEV_IOC_CLONE) spares the threads one queue, but it
    // belongs to this process alone, and the kernel fails the requests read through it when
    // the process dies instead of keeping them for a successor: a connection that may be
    // handed over is read through the one shared descriptor.
    config.clone_fd = cfg.threads > 1 && !cfg.handoff;
    config
}

fn lake_fs(core: Arc<FsCore>, cfg: &MountConfig, rt: Handle) -> LakeFs {
    let passthrough = Arc::new(Passthrough::default());
    passthrough.enabled.store(
        cfg.passthrough && core.local_cache().is_some(),
        Ordering::Relaxed,
    );
    passthrough.restore(&core.open_handles());
    LakeFs {
        core,
        rt,
        passthrough,
        gate: Arc::default(),
    }
}

/// Mounts `core` read-only at `mountpoint`, serving requests on `rt`.
pub fn mount(
    core: Arc<FsCore>,
    mountpoint: &Path,
    cfg: &MountConfig,
    rt: Handle,
) -> std::io::Result<Mount> {
    let fs = lake_fs(core, cfg, rt);
    let passthrough = fs.passthrough.clone();
    let gate = fs.gate.clone();
    let session = Session::new(fs, mountpoint, &session_config(cfg))?;
    let device = Arc::new(session.as_fd().try_clone_to_owned()?);
    let _ = passthrough.device.set(device.clone());
    Ok(Mount {
        session: Some(session.spawn()?),
        mountpoint: mountpoint.to_path_buf(),
        device,
        gate,
        resumed: false,
    })
}

/// `FUSE_INIT`'s opcode.
const FUSE_INIT: u32 = 26;
/// `FUSE_INIT_EXT`: the offer's flags go on in a second word.
const FUSE_INIT_EXT: u64 = 1 << 30;
/// `FUSE_NOTIFY_RESEND`'s notification code.
const FUSE_NOTIFY_RESEND: i32 = 7;

/// The `FUSE_INIT` request the kernel sent the first server, rebuilt from what was journaled.
fn init_request(k: &KernelInit) -> Vec<u8> {
    let flags = k.flags | FUSE_INIT_EXT;
    let mut b = Vec::with_capacity(104);
    // fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding.
    b.extend_from_slice(&104u32.to_le_bytes());
    b.extend_from_slice(&FUSE_INIT.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&[0u8; 16]);
    // fuse_init_in: major, minor, max_readahead, flags, flags2, unused[11].
    b.extend_from_slice(&k.major.to_le_bytes());
    b.extend_from_slice(&k.minor.to_le_bytes());
    b.extend_from_slice(&k.max_readahead.to_le_bytes());
    b.extend_from_slice(&(flags as u32).to_le_bytes());
    b.extend_from_slice(&((flags >> 32) as u32).to_le_bytes());
    b.extend_from_slice(&[0u8; 44]);
    b
}

/// `FUSE_HAS_RESEND` in the kernel's `FUSE_INIT` offer: it takes `FUSE_NOTIFY_RESEND`.
const FUSE_HAS_RESEND: u64 = 1 << 39;

/// Whether a connection the kernel offered `k` on can be taken over: only a kernel that sends
/// unanswered requests again (Linux 6.9) lets a successor answer what its predecessor read.
pub fn can_hand_over(k: &KernelInit) -> bool {
    k.flags & FUSE_HAS_RESEND != 0
}

/// Asks the kernel to send again every request of the connection that was read and not
/// answered (`FUSE_NOTIFY_RESEND`, Linux 6.9).
pub fn resend(device: BorrowedFd<'_>) -> std::io::Result<()> {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&16u32.to_le_bytes());
    b[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_le_bytes());
    nix::unistd::write(device, &b)?;
    Ok(())
}

/// Serves an existing connection `device` (mounted at `mountpoint` by a predecessor) with
/// `core`, which holds the predecessor's state ([`FsCore::restore`]). The predecessor must be
/// gone, or frozen: the kernel is asked to send its unanswered requests again.
pub fn resume(
    core: Arc<FsCore>,
    device: OwnedFd,
    mountpoint: &Path,
    cfg: &MountConfig,
    rt: Handle,
) -> std::io::Result<Mount> {
    let kernel = core.kernel_init().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the saved state has no FUSE_INIT record: the predecessor never served",
        )
    })?;
    if !can_hand_over(&kernel) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "the kernel cannot send a connection's unanswered requests again (FUSE_NOTIFY_RESEND, Linux 6.9)",
        ));
    }
    let fs = lake_fs(core, cfg, rt);
    let passthrough = fs.passthrough.clone();
    let gate = fs.gate.clone();
    // fuser's session starts with the kernel's FUSE_INIT, which a connection sends once. The
    // session is made on one end of a socket pair that carries the predecessor's INIT (so it
    // negotiates what the kernel agreed to then), and the connection then takes the place of
    // that end under the same descriptor number.
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    nix::unistd::write(&ours, &init_request(&kernel))?;
    let slot = theirs.as_raw_fd();
    let session = Session::from_fd(fs, theirs, session_config(cfg).acl, session_config(cfg))?;
    // SAFETY: `slot` is the descriptor the session owns and reads; dup3 makes it, in one step,
    // another reference to the connection (the socket it named is closed by that).
    #[allow(unsafe_code)]
    let rc = unsafe { libc::dup3(device.as_raw_fd(), slot, libc::O_CLOEXEC) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    drop(ours);
    let device = Arc::new(device);
    let _ = passthrough.device.set(device.clone());
    // Before this session reads: what it reads after is answered once.
    resend(device.as_fd())?;
    let session = session.spawn()?;
    Ok(Mount {
        session: Some(session),
        mountpoint: mountpoint.to_path_buf(),
        device,
        gate,
        resumed: true,
    })
}
