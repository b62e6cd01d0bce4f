//! `lakecache-pod-exec SPEC.json`: the node agent's container runtime, one container per call.
//!
//! The test node agent ([`lakecache_e2e::node_agent`]) has no Docker or containerd to run a pod's
//! containers, so it starts this helper, which turns itself into the container and then `exec`s
//! the container's command. It is single-threaded and does everything with plain syscalls (nix's
//! safe wrappers), in this order:
//!
//! 1. **Join the container's cgroup** (cgroup v2, when the agent made one), so the agent can
//!    signal and kill every process of the container, however it forks or daemonizes.
//! 2. **`unshare(CLONE_NEWNS | CLONE_NEWUTS)`**: a private copy of the host's mount table, and the
//!    pod's name as hostname.
//! 3. **Cut propagation to the host**, mount by mount. Every mount of the copy is made
//!    `MS_SLAVE`, non-recursively, walking `/proc/self/mountinfo`: a shared mount becomes a
//!    slave (it still receives the host's mounts and unmounts, as `HostToContainer` wants, but
//!    nothing mounted here reaches the host), a private one stays private. The exception is the
//!    mount holding the source of each `Bidirectional` volume, and every mount under such a
//!    source: they stay in their host peer group, so that what the container mounts there (a
//!    CSI plugin's FUSE and bind mounts under kubelet's directory) appears on the host. A
//!    recursive `MS_REC | MS_SLAVE` on `/` cannot do this: a slave made shared again gets a new
//!    peer group and would never propagate back. The helper then checks that the mount holding
//!    the container root is not shared, so nothing below can leak.
//! 4. **The container root** `R` is an overlayfs with `lowerdir=/` (the host's root filesystem
//!    stands in for the image) and a per-container upper and work directory (on a tmpfs of the
//!    agent), so files the container creates, `/etc/lakecache/...` mount targets included, land
//!    in the upper directory and never on the host. Only the root filesystem shows through;
//!    mounts under it do not, so `/proc`, `/sys` and `/dev` (with `/dev/shm` and `/dev/pts`)
//!    are bind-mounted recursively into `R`, and `/tmp` alone (not recursively: a private copy
//!    of every mount under the host's `/tmp`, such as another test's FUSE mount, would keep
//!    that mount's filesystem alive after the host unmounts it, and its server waiting, for as
//!    long as the container runs; what a pod needs from there comes as a volume).
//! 5. **Volumes**, parents before children: each source (a directory, a file or a device of the
//!    agent's pod directory or the host) is bind-mounted recursively onto its container path in
//!    `R`, which is created as a directory or an empty file as the source is. Targets are
//!    resolved inside `R` with symlinks followed as the container would see them (Debian's
//!    `/var/run -> /run` becomes `R/run`), never out of `R`. Propagation as Kubernetes defines
//!    it: `None` makes the bind `rprivate`, `HostToContainer` `rslave`, and `Bidirectional`
//!    leaves it in the source's peer group (it is bound from the still-shared host source).
//!    `readOnly` is a read-only bind remount. `readOnlyRootFilesystem` remounts `R` (and its
//!    `/tmp`) read-only last.
//! 6. `chroot(R)`, `chdir(workingDir or /)`, `setgroups`/`setgid`/`setuid` when a user is given,
//!    and `exec` of the command with exactly the given environment (its `PATH` finds the
//!    program). Standard output and error are inherited: the agent points them at the
//!    container's log file.
//!
//! Any failure before `exec` prints `lakecache-pod-exec: <what failed>` on standard error and
//! exits 125 (127 when the program is not found, 126 when it cannot be run), which the agent
//! reports as the container's exit code. The namespace dies with the container's last process,
//! and with it every mount made here that did not propagate.
#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, ensure};
use lakecache_e2e::node_agent::mountinfo;
use lakecache_e2e::node_agent::spec::{ExecSpec, MountSpec, Propagation};
use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use nix::unistd::{Gid, Uid, chdir, chroot, setgid, setgroups, sethostname, setuid};

const NONE: Option<&str> = None;

fn main() -> ExitCode {
    let Some(path) = std::env::args_os().nth(1) else {
        eprintln!("usage: lakecache-pod-exec SPEC.json");
        return ExitCode::from(2);
    };
    let spec = match std::fs::read(&path)
        .with_context(|| format!("reading {}", Path::new(&path).display()))
        .and_then(|b| serde_json::from_slice::<ExecSpec>(&b).context("parsing the spec"))
    {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("lakecache-pod-exec: {e:#}");
            return ExitCode::from(125);
        }
    };
    let failure = match enter(&spec) {
        Ok(()) => exec(&spec),
        Err(e) => Failure::Setup(e),
    };
    match failure {
        Failure::Setup(e) => {
            eprintln!("lakecache-pod-exec: {e:#}");
            ExitCode::from(125)
        }
        Failure::Exec(e) => {
            let program = spec.argv.first().map(String::as_str).unwrap_or("");
            eprintln!("lakecache-pod-exec: cannot run {program:?}: {e}");
            ExitCode::from(match e.kind() {
                std::io::ErrorKind::NotFound => 127,
                _ => 126,
            })
        }
    }
}

enum Failure {
    Setup(anyhow::Error),
    Exec(std::io::Error),
}

/// Steps 1 to 6 up to `exec`: on return the process is inside the container.
fn enter(spec: &ExecSpec) -> anyhow::Result<()> {
    ensure!(!spec.argv.is_empty(), "the spec has no command");
    if let Some(cgroup) = &spec.cgroup {
        std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("joining the cgroup {}", cgroup.display()))?;
    }
    let mut flags = CloneFlags::CLONE_NEWNS;
    if spec.hostname.is_some() {
        flags |= CloneFlags::CLONE_NEWUTS;
    }
    unshare(flags).context("unshare(CLONE_NEWNS)")?;
    isolate(spec)?;

    let root = &spec.rootfs;
    for (dir, what) in [(&spec.upper_dir, "upper"), (&spec.work_dir, "work")] {
        ensure!(
            dir.is_dir(),
            "the overlay {what} directory {} does not exist",
            dir.display()
        );
    }
    for p in [root, &spec.upper_dir, &spec.work_dir] {
        let s = p.to_string_lossy();
        ensure!(
            !s.contains([',', ':', '\\']),
            "{s} cannot be an overlayfs option (it holds ',', ':' or '\\')"
        );
    }
    let options = format!(
        "lowerdir=/,upperdir={},workdir={}",
        spec.upper_dir.display(),
        spec.work_dir.display()
    );
    mount(
        Some("overlay"),
        root,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    )
    .with_context(|| {
        format!(
            "mounting the overlay root on {} ({options})",
            root.display()
        )
    })?;

    for dir in ["/proc", "/sys", "/dev", "/tmp"] {
        if !Path::new(dir).is_dir() {
            continue;
        }
        let target = resolve_in_root(root, dir)?;
        std::fs::create_dir_all(&target)
            .with_context(|| format!("creating {}", target.display()))?;
        if dir == "/tmp" {
            // Not recursive: a copy of every mount under the host's /tmp (other tests' FUSE
            // mounts, the agent's own directory and this very root) would be pinned by this
            // namespace, and a FUSE server unmounted on the host would wait for the container
            // to end. What a pod needs from there comes as a volume.
            mount(Some(dir), &target, NONE, MsFlags::MS_BIND, NONE)
                .with_context(|| format!("bind {dir} {}", target.display()))?;
            mount(NONE, &target, NONE, MsFlags::MS_SLAVE, NONE)
                .with_context(|| format!("making {} a slave", target.display()))?;
        } else {
            bind(Path::new(dir), &target, Propagation::HostToContainer)?;
        }
    }

    let mut mounts: Vec<&MountSpec> = spec.mounts.iter().collect();
    // Parents before children (a stable sort keeps the pod's order otherwise).
    mounts.sort_by_key(|m| Path::new(&m.target).components().count());
    for m in mounts {
        mount_volume(root, m)?;
    }
    if spec.read_only_root {
        for dir in ["/", "/tmp"] {
            let target = resolve_in_root(root, dir)?;
            remount_read_only(&target)?;
        }
    }
    if let Some(name) = &spec.hostname {
        sethostname(name).with_context(|| format!("setting the hostname {name:?}"))?;
    }
    chroot(root).with_context(|| format!("chroot {}", root.display()))?;
    chdir("/").context("chdir /")?;
    if let Some(dir) = spec.working_dir.as_deref().filter(|d| !d.is_empty()) {
        // As container runtimes do, a missing working directory is created.
        std::fs::create_dir_all(dir).with_context(|| format!("creating workingDir {dir}"))?;
        chdir(dir).with_context(|| format!("chdir {dir}"))?;
    }
    if let Some(user) = &spec.user {
        let groups: Vec<Gid> = user.groups.iter().map(|g| Gid::from_raw(*g)).collect();
        setgroups(&groups).context("setgroups")?;
        setgid(Gid::from_raw(user.gid)).with_context(|| format!("setgid {}", user.gid))?;
        setuid(Uid::from_raw(user.uid)).with_context(|| format!("setuid {}", user.uid))?;
    }
    Ok(())
}

fn exec(spec: &ExecSpec) -> Failure {
    let err = Command::new(&spec.argv[0])
        .args(&spec.argv[1..])
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .exec();
    Failure::Exec(err)
}

/// Step 3: every mount of the new namespace stops propagating to the host, except the mounts
/// that hold a `Bidirectional` source and every mount under such a source.
fn isolate(spec: &ExecSpec) -> anyhow::Result<()> {
    let table = mountinfo::read_self().context("reading /proc/self/mountinfo")?;
    let sources: Vec<&Path> = spec
        .mounts
        .iter()
        .filter(|m| m.propagation == Propagation::Bidirectional)
        .map(|m| m.source.as_path())
        .collect();
    let mut keep = HashSet::new();
    for source in &sources {
        let holder = mountinfo::containing(&table, source)
            .with_context(|| format!("no mount holds {}", source.display()))?;
        ensure!(
            holder.mount_point != Path::new("/"),
            "Bidirectional propagation of {} would share the host's root mount: the source \
             must be under its own shared mount (the agent makes kubelet's directory one)",
            source.display()
        );
        if !holder.is_shared() {
            eprintln!(
                "lakecache-pod-exec: warning: {} is on {}, which is not a shared mount; mounts \
                 made under it will not reach the host",
                source.display(),
                holder.mount_point.display()
            );
        }
        keep.insert(holder.id);
    }
    for m in &table {
        if keep.contains(&m.id) || sources.iter().any(|s| m.mount_point.starts_with(s)) {
            continue;
        }
        // A mount hidden under another at the same path gets the flag twice through the path
        // (harmless) and the hidden one none; it cannot be reached, so nothing is ever mounted
        // under it. What matters is checked below.
        let _ = mount(NONE, &m.mount_point, NONE, MsFlags::MS_SLAVE, NONE);
    }
    // The invariant everything else relies on: the container root's own mount (the overlay is
    // mounted on it) takes nothing back to the host.
    let table = mountinfo::read_self().context("reading /proc/self/mountinfo")?;
    let parent = spec.rootfs.parent().unwrap_or(Path::new("/"));
    if let Some(holder) = mountinfo::containing(&table, parent) {
        ensure!(
            !holder.is_shared(),
            "the container root {} is on {}, which is still a shared mount: the container's \
             mounts would reach the host (keep the agent's directory outside Bidirectional \
             sources)",
            spec.rootfs.display(),
            holder.mount_point.display()
        );
    }
    Ok(())
}

/// Step 5 for one volume.
fn mount_volume(root: &Path, m: &MountSpec) -> anyhow::Result<()> {
    let meta = std::fs::metadata(&m.source)
        .with_context(|| format!("the volume source {} is missing", m.source.display()))?;
    let target = resolve_in_root(root, &m.target)?;
    if meta.is_dir() {
        std::fs::create_dir_all(&target)
            .with_context(|| format!("creating the mount target {}", m.target))?;
    } else if !target.exists() {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating the parent of {}", m.target))?;
        }
        std::fs::File::create(&target)
            .with_context(|| format!("creating the mount target {}", m.target))?;
    }
    bind(&m.source, &target, m.propagation)
        .with_context(|| format!("mounting {} at {}", m.source.display(), m.target))?;
    if m.read_only {
        remount_read_only(&target)?;
    }
    Ok(())
}

/// A recursive bind mount with Kubernetes' propagation.
fn bind(source: &Path, target: &Path, propagation: Propagation) -> anyhow::Result<()> {
    mount(
        Some(source),
        target,
        NONE,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        NONE,
    )
    .with_context(|| format!("bind {} {}", source.display(), target.display()))?;
    let flags = match propagation {
        Propagation::None => MsFlags::MS_PRIVATE,
        Propagation::HostToContainer => MsFlags::MS_SLAVE,
        // Bound from a mount that is still in the host's peer group, it is in it too.
        Propagation::Bidirectional => return Ok(()),
    };
    mount(NONE, target, NONE, flags | MsFlags::MS_REC, NONE)
        .with_context(|| format!("setting the propagation of {}", target.display()))?;
    Ok(())
}

fn remount_read_only(target: &Path) -> anyhow::Result<()> {
    // A bind remount changes this mount's flags only; the flags the mount already has
    // (nosuid, nodev, ...) must be repeated or the kernel refuses the change.
    let table = mountinfo::read_self().context("reading /proc/self/mountinfo")?;
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    if let Some(m) = table.iter().rev().find(|m| m.mount_point == target) {
        for (opt, flag) in [
            ("nosuid", MsFlags::MS_NOSUID),
            ("nodev", MsFlags::MS_NODEV),
            ("noexec", MsFlags::MS_NOEXEC),
            ("noatime", MsFlags::MS_NOATIME),
            ("nodiratime", MsFlags::MS_NODIRATIME),
            ("relatime", MsFlags::MS_RELATIME),
        ] {
            if m.options.split(',').any(|o| o == opt) {
                flags |= flag;
            }
        }
    }
    mount(NONE, target, NONE, flags, NONE)
        .with_context(|| format!("remounting {} read-only", target.display()))
}

/// `path` (a container path) inside `root`, following symlinks as the container will see them
/// (an absolute link points into `root`, `..` stops at `root`), so a mount target never lands
/// outside the container root. Components that do not exist are taken as they are.
fn resolve_in_root(root: &Path, path: &str) -> anyhow::Result<PathBuf> {
    let mut pending: Vec<PathBuf> = Path::new(path)
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(PathBuf::from(s)),
            Component::ParentDir => Some(PathBuf::from("..")),
            _ => None,
        })
        .collect();
    let mut resolved = PathBuf::new();
    let mut links = 0;
    while let Some(part) = pending.pop() {
        if part == Path::new("..") {
            resolved.pop();
            continue;
        }
        let candidate = root.join(&resolved).join(&part);
        match std::fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                ensure!(
                    links <= 40,
                    "too many symlinks resolving {path} in the container"
                );
                let link = std::fs::read_link(&candidate)
                    .with_context(|| format!("reading the link {}", candidate.display()))?;
                if link.is_absolute() {
                    resolved = PathBuf::new();
                }
                for c in link.components().rev() {
                    match c {
                        Component::Normal(s) => pending.push(PathBuf::from(s)),
                        Component::ParentDir => pending.push(PathBuf::from("..")),
                        _ => {}
                    }
                }
            }
            _ => resolved.push(part),
        }
    }
    Ok(root.join(resolved))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_symlinks_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("run")).unwrap();
        std::fs::create_dir_all(root.join("var")).unwrap();
        std::os::unix::fs::symlink("/run", root.join("var/run")).unwrap();
        std::os::unix::fs::symlink("../../..", root.join("run/up")).unwrap();
        assert_eq!(
            resolve_in_root(root, "/var/run/secrets/x").unwrap(),
            root.join("run/secrets/x")
        );
        assert_eq!(
            resolve_in_root(root, "/run/up/etc/passwd").unwrap(),
            root.join("etc/passwd")
        );
        assert_eq!(
            resolve_in_root(root, "/../../etc").unwrap(),
            root.join("etc")
        );
    }
}
