//! Keeping every FUSE connection alive while the processes around it restart.
//!
//! A FUSE mount lives as long as some process holds its `/dev/fuse` descriptor; the FUSE server
//! is only one of them. Each FUSE server serves a control socket, `fuse.ctl` in its volume's
//! directory, that gives a copy of the descriptor (`SCM_RIGHTS`) to whoever asks and keeps the
//! connection open; both the mounter and the plugin (two containers of the CSI pod) ask, keep
//! the copy ([`Keeper`]) and watch the connection. When a FUSE server dies, its mount does not:
//! requests wait in the kernel, and a **successor** started with the kept descriptor on its
//! standard input takes over the journaled state ([`lakecache_client::handoff`]) and asks the
//! kernel to send the unanswered requests again. Who starts it:
//! - the mounter, whenever it runs (it hosts the FUSE servers);
//! - the plugin, only while the mounter is away (its container restarting or being upgraded):
//!   it then hosts successors itself, and hands them back when the mounter is back (the
//!   plugin's repair pass asks the mounter to mount, and the mounter takes over).
//!
//! A successor may also replace a FUSE server that still runs (a new binary): it asks the old
//! one over `fuse.ctl` to hand over; the old one stops answering the kernel, and exits.
//! Whoever serves holds the volume's serve lock, so two servers never answer one connection.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use lakecache_client::handoff::ServeLock;
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// The control socket's name in a volume's directory.
pub const CTL: &str = "fuse.ctl";
/// Written by a successor while it asks a running server to hand over: a watcher that sees the
/// server go meanwhile does not start another.
pub const HANDOVER_MARK: &str = "fuse.handover";
/// How long a hand-over mark counts.
const MARK_FRESH: Duration = Duration::from_secs(20);
/// How long a control socket call may take.
const CTL_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends `msg` with a copy of `fd` attached.
fn send_fd(stream: &UnixStream, fd: BorrowedFd<'_>, msg: &[u8]) -> std::io::Result<()> {
    let fds = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(msg)],
        &cmsg,
        MsgFlags::empty(),
        None,
    )?;
    Ok(())
}

/// Receives a message and the descriptor attached to it, if any.
fn recv_fd(stream: &UnixStream) -> std::io::Result<(Vec<u8>, Option<OwnedFd>)> {
    let mut buf = [0u8; 256];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fd = None;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for raw in fds {
                // The kernel made `raw` for this process just now; it is owned once, here.
                fd = Some(owned(raw));
            }
        }
    }
    let n = msg.bytes;
    Ok((buf[..n].to_vec(), fd))
}

/// Takes ownership of a descriptor the kernel just handed this process.
fn owned(raw: RawFd) -> OwnedFd {
    // SAFETY: `raw` was created for this process by the `recvmsg` above and nothing else owns
    // or closes it: it is owned exactly once, here.
    #[allow(unsafe_code)]
    unsafe {
        OwnedFd::from_raw_fd(raw)
    }
}

/// The FUSE server's side: serves `fuse.ctl` in `dir` on threads of its own. `fd` gives a copy
/// of the connection to whoever asks and keeps the connection open (its end is how keepers
/// learn that this server is gone); `handover` runs `freeze` (after which the server answers
/// the kernel no more), says `frozen` and exits the process.
/// `conn` names the connection (the mount's device number): a keeper holding another one (of
/// an earlier mount at the same place) replaces it.
pub fn serve_ctl(
    dir: &Path,
    device: Arc<OwnedFd>,
    conn: u64,
    freeze: Arc<dyn Fn() + Send + Sync>,
) -> std::io::Result<()> {
    let path = dir.join(CTL);
    let _ = std::fs::remove_file(&path);
    let (_dir, short) = short_path(dir)?;
    let listener = UnixListener::bind(&short)?;
    // Only root reaches it through the 0700 state directory; the socket says so too.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    std::thread::Builder::new()
        .name("fuse-ctl".into())
        .spawn(move || {
            // Bounded by the process's life.
            let id = conn;
            for c in listener.incoming() {
                let Ok(c) = c else { continue };
                let device = device.clone();
                let freeze = freeze.clone();
                let _ = std::thread::Builder::new()
                    .name("fuse-ctl-conn".into())
                    .spawn(move || ctl_conn(c, &device, id, &*freeze));
            }
        })?;
    Ok(())
}

fn ctl_conn(conn: UnixStream, device: &OwnedFd, id: u64, freeze: &(dyn Fn() + Send + Sync)) {
    let Ok(reader) = conn.try_clone() else { return };
    let mut lines = BufReader::new(reader).lines();
    // Bounded by the peer: one command per line until it hangs up.
    while let Some(Ok(line)) = lines.next() {
        match line.trim() {
            "fd" => {
                if let Err(e) = send_fd(&conn, device.as_fd(), format!("ok {id}\n").as_bytes()) {
                    tracing::warn!(error = %e, "cannot hand out the FUSE connection");
                    return;
                }
            }
            "handover" => {
                tracing::info!("a successor takes over the FUSE connection; handing over");
                freeze();
                let _ = (&conn).write_all(b"frozen\n");
                // Without unmounting, and without running destructors that would.
                std::process::exit(0);
            }
            other => {
                let _ = (&conn).write_all(format!("error: unknown command {other:?}\n").as_bytes());
            }
        }
    }
}

/// `dir`'s control socket as a path short enough for a socket address (108 bytes): through a
/// descriptor of the directory, which the caller keeps open while it binds or connects.
/// Kubelet directories such as MicroK8s' make the full path too long.
fn short_path(dir: &Path) -> std::io::Result<(std::fs::File, PathBuf)> {
    let d = std::fs::File::open(dir)?;
    let short = PathBuf::from(format!("/proc/self/fd/{}/{CTL}", d.as_raw_fd()));
    Ok((d, short))
}

fn connect(dir: &Path) -> std::io::Result<UnixStream> {
    let (_dir, short) = short_path(dir)?;
    let s = UnixStream::connect(short)?;
    s.set_read_timeout(Some(CTL_TIMEOUT))?;
    s.set_write_timeout(Some(CTL_TIMEOUT))?;
    Ok(s)
}

/// Asks the server of the volume in `dir` for a copy of its connection, and its name. Returns
/// the open control connection too: it reads end-of-file when that server is gone.
pub fn fetch(dir: &Path) -> std::io::Result<(UnixStream, OwnedFd, u64)> {
    let s = connect(dir)?;
    (&s).write_all(b"fd\n")?;
    let (msg, fd) = recv_fd(&s)?;
    let fd = fd.ok_or_else(|| {
        std::io::Error::other(format!(
            "the FUSE server answered {:?} without a descriptor",
            String::from_utf8_lossy(&msg)
        ))
    })?;
    let id = String::from_utf8_lossy(&msg)
        .trim()
        .strip_prefix("ok ")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    s.set_read_timeout(None)?;
    Ok((s, fd, id))
}

/// Asks the server of the volume in `dir` to stop answering the kernel and exit. `Ok(false)`:
/// none listens (it is gone).
pub fn request_handover(dir: &Path) -> std::io::Result<bool> {
    let s = match connect(dir) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(false);
        }
        Err(e) => return Err(e),
    };
    (&s).write_all(b"handover\n")?;
    let mut answer = String::new();
    // The old server answers, then exits; EOF without an answer means it died meanwhile,
    // which leaves the same state.
    let _ = BufReader::new(&s).read_line(&mut answer);
    if !answer.is_empty() && answer.trim() != "frozen" {
        return Err(std::io::Error::other(format!(
            "the running FUSE server refused to hand over: {}",
            answer.trim()
        )));
    }
    Ok(true)
}

/// Marks a hand-over in progress in `dir` (removed when dropped).
pub struct HandoverMark(PathBuf);

impl HandoverMark {
    pub fn new(dir: &Path) -> HandoverMark {
        let path = dir.join(HANDOVER_MARK);
        let _ = std::fs::write(&path, std::process::id().to_string());
        HandoverMark(path)
    }
}

impl Drop for HandoverMark {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Whether a hand-over started in `dir` in the last [`MARK_FRESH`].
pub fn handing_over(dir: &Path) -> bool {
    std::fs::metadata(dir.join(HANDOVER_MARK))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age < MARK_FRESH)
}

/// Whether some process serves the volume in `dir` (holds its serve lock).
pub fn served(dir: &Path) -> bool {
    ServeLock::acquire(dir, Duration::ZERO).is_err()
}

/// Who keeps the connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Hosts the FUSE servers; starts a successor for any that dies.
    Mounter,
    /// Starts a successor only when the mounter is away.
    Plugin,
}

/// A copy of a mount's FUSE connection, and its name (the mount's device number).
#[derive(Debug)]
pub struct Connection {
    pub fd: OwnedFd,
    pub id: u64,
}

/// Starts a successor for a volume whose server is gone.
#[tonic::async_trait]
pub trait Successor: Send + Sync {
    async fn start(&self, volume_id: &str, device: Connection) -> anyhow::Result<()>;
}

/// Holds a copy of every volume's connection and watches each volume's server.
pub struct Keeper {
    role: Role,
    state: crate::state::StateDir,
    kept: parking_lot::Mutex<HashMap<String, Kept>>,
    successor: Arc<dyn Successor>,
}

struct Kept {
    fd: Arc<OwnedFd>,
    /// The connection's name (see [`serve_ctl`]).
    id: u64,
    /// The latest watch of the volume's server: only it acts when the server goes.
    watch: u64,
}

/// How long a watcher waits for someone to serve a volume whose server went, before it starts
/// a successor itself (the plugin, when the mounter looks alive but does not).
const PLUGIN_PATIENCE: Duration = Duration::from_secs(1);
/// How long a watcher follows one volume's server going away before it gives up on it (the
/// plugin's repair pass takes over from there).
const WATCH_LIMIT: Duration = Duration::from_secs(60);

impl Keeper {
    pub fn new(
        role: Role,
        state: &crate::state::StateDir,
        successor: Arc<dyn Successor>,
    ) -> Arc<Keeper> {
        Arc::new(Keeper {
            role,
            state: state.clone(),
            kept: Default::default(),
            successor,
        })
    }

    fn dir(&self, volume_id: &str) -> PathBuf {
        self.state.volume_dir(volume_id)
    }

    /// A copy of the kept connection of `volume_id`.
    pub fn device(&self, volume_id: &str) -> Option<Connection> {
        let kept = self.kept.lock();
        let k = kept.get(volume_id)?;
        Some(Connection {
            fd: k.fd.try_clone().ok()?,
            id: k.id,
        })
    }

    pub fn is_kept(&self, volume_id: &str) -> bool {
        self.kept.lock().contains_key(volume_id)
    }

    /// Volumes whose connections are kept.
    pub fn volumes(&self) -> Vec<String> {
        self.kept.lock().keys().cloned().collect()
    }

    /// Stops keeping `volume_id` (it is being unmounted): its server's end starts nothing.
    pub fn forget(&self, volume_id: &str) {
        if self.kept.lock().remove(volume_id).is_some() {
            tracing::info!(volume = volume_id, "no longer keeping the FUSE connection");
        }
    }

    /// Takes a copy of the connection of `volume_id` from its running server, and watches the
    /// server. Keeping a volume kept already only renews the watch.
    pub async fn keep(self: &Arc<Self>, volume_id: &str) -> anyhow::Result<()> {
        let dir = self.dir(volume_id);
        let (conn, fd, id) = tokio::task::spawn_blocking(move || fetch(&dir))
            .await?
            .map_err(|e| {
                anyhow::anyhow!("asking the FUSE server of {volume_id} for its connection: {e}")
            })?;
        let watch = {
            let mut kept = self.kept.lock();
            match kept.get_mut(volume_id) {
                // The same connection (a successor's copy is the one kept): a new watch.
                Some(k) if k.id == id => {
                    k.watch += 1;
                    k.watch
                }
                old => {
                    let watch = old.map(|k| k.watch + 1).unwrap_or(0);
                    tracing::info!(volume = volume_id, role = ?self.role, connection = id, "keeping the FUSE connection");
                    kept.insert(
                        volume_id.to_string(),
                        Kept {
                            fd: Arc::new(fd),
                            id,
                            watch,
                        },
                    );
                    watch
                }
            }
        };
        self.watch(volume_id.to_string(), conn, watch);
        Ok(())
    }

    fn watch(self: &Arc<Self>, volume_id: String, conn: UnixStream, watch: u64) {
        let me = self.clone();
        tokio::spawn(async move {
            // Waits until the server is gone (end of file or an error). Not on a blocking
            // thread: the runtime's shutdown would wait for it, and a container stopping this
            // process would wait out its grace period.
            let conn = conn
                .set_nonblocking(true)
                .and_then(|_| tokio::net::UnixStream::from_std(conn));
            if let Ok(mut conn) = conn {
                use tokio::io::AsyncReadExt;
                let mut b = [0u8; 64];
                // Bounded by the server's life; it sends nothing unasked.
                while matches!(conn.read(&mut b).await, Ok(n) if n > 0) {}
            }
            let latest = me
                .kept
                .lock()
                .get(&volume_id)
                .is_some_and(|k| k.watch == watch);
            if latest {
                me.server_gone(&volume_id).await;
            }
        });
    }

    /// The server of `volume_id` is gone: someone else took over, or a successor must start.
    async fn server_gone(self: &Arc<Self>, volume_id: &str) {
        let dir = self.dir(volume_id);
        let since = Instant::now();
        let mut started = false;
        // Bounded by WATCH_LIMIT; one look every 20 ms.
        while since.elapsed() < WATCH_LIMIT {
            let Some(device) = self.device(volume_id) else {
                return; // Unmounted on purpose.
            };
            let d = dir.clone();
            let (serving, marked) =
                tokio::task::spawn_blocking(move || (served(&d), handing_over(&d)))
                    .await
                    .unwrap_or((false, false));
            if serving {
                // Watch the new server once its control socket answers.
                if self.keep(volume_id).await.is_ok() {
                    return;
                }
            } else if !marked && !started && self.should_start(since).await {
                started = true;
                tracing::warn!(volume = volume_id, role = ?self.role, "the FUSE server is gone; starting a successor on the kept connection");
                // The other keeper waits while this successor gets ready.
                let _mark = HandoverMark::new(&dir);
                if let Err(e) = self.successor.start(volume_id, device).await {
                    tracing::error!(volume = volume_id, error = %format!("{e:#}"), "cannot start a successor; trying again in a second");
                    started = false;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::warn!(
            volume = volume_id,
            "nobody serves the volume; leaving it to the repair pass"
        );
    }

    async fn should_start(&self, since: Instant) -> bool {
        match self.role {
            Role::Mounter => true,
            Role::Plugin => {
                let sock = self.state.mounter_socket();
                let mounter_away =
                    tokio::task::spawn_blocking(move || UnixStream::connect(sock).is_err())
                        .await
                        .unwrap_or(true);
                mounter_away || since.elapsed() > PLUGIN_PATIENCE
            }
        }
    }
}
