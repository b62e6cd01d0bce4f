//! Mount points: finding them, checking that they answer, bind mounts and unmounts.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::mount::{MntFlags, MsFlags};

/// One line of `/proc/self/mountinfo`, and its parser: one definition, in the client crate.
pub use lakecache_client::mountinfo::MountInfo;

/// The current mount table of this process's mount namespace.
pub fn mount_table() -> io::Result<Vec<MountInfo>> {
    lakecache_client::mountinfo::read_self()
}

/// The device number of the mount on top at `path`, from the mount table: no call reaches the
/// filesystem (a FUSE mount without a server would not answer).
pub fn device_of(path: &Path) -> io::Result<Option<u64>> {
    let path = normalize(path);
    Ok(mount_table()?
        .iter()
        .rev()
        .find(|m| m.mount_point == path)
        .and_then(|m| {
            let (maj, min) = m.device.split_once(':')?;
            Some(nix::sys::stat::makedev(
                maj.parse().ok()?,
                min.parse().ok()?,
            ))
        }))
}

/// How many mounts are stacked on `path` (0 when it is not a mount point).
pub fn mount_count(path: &Path) -> io::Result<usize> {
    let path = normalize(path);
    Ok(mount_table()?
        .iter()
        .filter(|m| m.mount_point == path)
        .count())
}

/// Whether `path` is a mount point. Works on broken FUSE mounts too (it never stats the path).
pub fn is_mount_point(path: &Path) -> io::Result<bool> {
    Ok(mount_count(path)? > 0)
}

/// Absolute form of `path` without touching the filesystem (a broken mount cannot be
/// canonicalized).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

/// What a look at a mount point found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Mounted and answering.
    Healthy,
    /// Nothing is mounted there.
    NotMounted,
    /// Mounted but broken: the FUSE server is gone ("transport endpoint is not connected") or the
    /// path does not answer.
    Broken(String),
}

/// How long a mount point may take to answer a health check before it counts as broken.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// Checks a mount point: it must be in the mount table and answer a `statfs`.
///
/// `statfs` is used rather than `stat` because the kernel answers a `stat` of a FUSE mount's root
/// from its attribute cache (an hour, for immutable data) even after the server has died, while
/// a `statfs` always reaches the server: a dead one gives "transport endpoint is not connected"
/// at once. The call runs on its own thread, so a server that hangs makes the mount `Broken`
/// after [`HEALTH_TIMEOUT`] instead of hanging the caller.
pub fn health(path: &Path) -> Health {
    health_within(path, HEALTH_TIMEOUT)
}

/// [`health`], with `timeout` for the `statfs`.
pub fn health_within(path: &Path, timeout: Duration) -> Health {
    match is_mount_point(path) {
        Ok(true) => {}
        Ok(false) => {
            // A stat of a dead FUSE mount's path fails with ENOTCONN even when the table was
            // read from another namespace view; report that as broken rather than absent.
            return match std::fs::metadata(path) {
                Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Health::Broken(e.to_string()),
                _ => Health::NotMounted,
            };
        }
        Err(e) => return Health::Broken(format!("reading the mount table: {e}")),
    }
    match statfs_within(path, timeout) {
        Ok(()) => Health::Healthy,
        Err(e) => Health::Broken(e.to_string()),
    }
}

/// `statfs(path)` on a helper thread, given up on after `timeout`. A thread stuck on a hung
/// FUSE server stays stuck until the server answers or its mount is detached; that is one thread
/// per check of a hung mount, and repairs detach it.
fn statfs_within(path: &Path, timeout: Duration) -> io::Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    let p = path.to_path_buf();
    std::thread::Builder::new()
        .name("lakecache-statfs".into())
        .spawn(move || {
            let _ = tx.send(nix::sys::statvfs::statvfs(&p).map(|_| ()));
        })?;
    match rx.recv_timeout(timeout) {
        Ok(r) => r.map_err(io::Error::from),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the mount did not answer statfs within {timeout:?}"),
        )),
    }
}

/// Bind-mounts `source` on `target` read-only.
pub fn bind_read_only(source: &Path, target: &Path) -> io::Result<()> {
    nix::mount::mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| io::Error::other(format!("bind-mounting {source:?} on {target:?}: {e}")))?;
    // A bind mount takes the read-only flag only from a remount.
    if let Err(e) = nix::mount::mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    ) {
        let _ = nix::mount::umount2(target, MntFlags::MNT_DETACH);
        return Err(io::Error::other(format!(
            "making the bind mount on {target:?} read-only: {e}"
        )));
    }
    Ok(())
}

/// Unmounts everything stacked on `path`. A busy or broken mount is detached lazily, which
/// never blocks on a dead FUSE server. Returns how many mounts were removed.
pub fn unmount_all(path: &Path) -> io::Result<usize> {
    // Bounded: a path never has more mounts stacked than this in practice.
    for removed in 0..16 {
        if !is_mount_point(path)? {
            return Ok(removed);
        }
        match nix::mount::umount2(path, MntFlags::empty()) {
            Ok(()) => {}
            Err(nix::errno::Errno::EINVAL) => return Ok(removed),
            Err(_) => nix::mount::umount2(path, MntFlags::MNT_DETACH)
                .map_err(|e| io::Error::other(format!("unmounting {path:?}: {e}")))?,
        }
    }
    Err(io::Error::other(format!(
        "{path:?} still has mounts after 16 unmounts"
    )))
}

/// Lazily detaches a (broken) mount on `path` if there is one.
pub fn detach(path: &Path) -> io::Result<()> {
    match nix::mount::umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(io::Error::other(format!("detaching {path:?}: {e}"))),
    }
}

/// Usage of the filesystem at `path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub bytes_total: u64,
    pub bytes_available: u64,
    pub bytes_used: u64,
    pub inodes_total: u64,
    pub inodes_free: u64,
    pub inodes_used: u64,
}

pub fn usage(path: &Path) -> io::Result<Usage> {
    let s = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
    let frag = s.fragment_size() as u64;
    let total = s.blocks() as u64 * frag;
    let avail = s.blocks_available() as u64 * frag;
    let free = s.blocks_free() as u64 * frag;
    let files = s.files() as u64;
    let ffree = s.files_free() as u64;
    Ok(Usage {
        bytes_total: total,
        bytes_available: avail,
        bytes_used: total.saturating_sub(free),
        inodes_total: files,
        inodes_free: ffree,
        inodes_used: files.saturating_sub(ffree),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_without_touching_the_filesystem() {
        assert_eq!(normalize(Path::new("/a/./b/../c/")), PathBuf::from("/a/c"));
    }

    #[test]
    fn a_plain_directory_is_not_mounted() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(health(dir.path()), Health::NotMounted);
        assert!(!is_mount_point(dir.path()).unwrap());
        assert!(is_mount_point(Path::new("/proc")).unwrap());
    }
}
