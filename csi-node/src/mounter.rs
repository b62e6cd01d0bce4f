//! The mounter: hosts the FUSE servers of a node, one process per staged volume.
//!
//! It runs in another container than the CSI plugin (the `mounter` sidecar of the DaemonSet
//! pod), so restarting or upgrading the plugin never kills a FUSE server. FUSE servers run in
//! their own process group; outside a container they outlive the mounter, and a restarted
//! mounter adopts the ones still alive from their pid files. The plugin asks it over a unix
//! socket ([`crate::proto`]'s `Mounter` service) to mount, unmount and list.
//!
//! It keeps a copy of every mount's FUSE connection ([`crate::handoff::Keeper`]): a FUSE server
//! that dies is followed by a successor on the same connection, and a mount that a running
//! server (its own, or one the plugin hosted while the mounter was away) serves is taken over,
//! never mounted again. Only a mount whose connection nobody kept is mounted anew (and its
//! open files break).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use lakecache_proto::lakecache::v1::mounter_server::{Mounter, MounterServer};
use lakecache_proto::lakecache::v1::{
    ListMountsRequest, ListMountsResponse, MountRequest, MountResponse, MountState, UnmountRequest,
    UnmountResponse,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::{Request, Response, Status};

use crate::fuse_server::READY;
use crate::handoff::{self, Connection, Keeper, Role, Successor};
use crate::mounts::{self, Health};
use crate::state::{StateDir, write_atomic};
use crate::volume::FuseServerConfig;

/// What the mounter writes next to a volume's `fuse.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PidFile {
    pid: u32,
    volume_id: String,
    mount_path: PathBuf,
}

struct Proc {
    pid: u32,
    mount_path: PathBuf,
    /// False once the process has exited (set by its reaper, or found by a probe when the
    /// process was adopted from an earlier mounter).
    alive: Arc<AtomicBool>,
    adopted: bool,
}

impl Proc {
    fn is_alive(&self) -> bool {
        if !self.alive.load(Ordering::Acquire) {
            return false;
        }
        if self.adopted && !is_fuse_server(self.pid) {
            self.alive.store(false, Ordering::Release);
            return false;
        }
        true
    }
}

/// The FUSE server a pid file names, if it still runs.
fn adoptable(path: &Path) -> Option<(String, Proc)> {
    let b = std::fs::read(path).ok()?;
    let Ok(pf) = serde_json::from_slice::<PidFile>(&b) else {
        tracing::warn!(file = %path.display(), "ignoring an unreadable pid file");
        return None;
    };
    if !is_fuse_server(pf.pid) {
        tracing::info!(volume = %pf.volume_id, pid = pf.pid, "FUSE server is gone; the plugin will repair its mount");
        return None;
    }
    tracing::info!(volume = %pf.volume_id, pid = pf.pid, path = %pf.mount_path.display(), "adopted a running FUSE server");
    let p = Proc {
        pid: pf.pid,
        mount_path: pf.mount_path,
        alive: Arc::new(AtomicBool::new(true)),
        adopted: true,
    };
    Some((pf.volume_id, p))
}

/// Whether `pid` is alive and is one of our FUSE servers (not a reused pid).
fn is_fuse_server(pid: u32) -> bool {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmd) => {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // A zombie's cmdline is empty; check the state letter too.
            let zombie = state
                .rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
                .unwrap_or(false);
            !zombie && cmd.split(|b| *b == 0).any(|a| a == b"fuse-server")
        }
        Err(_) => false,
    }
}

pub struct MounterConfig {
    pub state: StateDir,
    /// The binary to start as `<exe> fuse-server --config <file>`.
    pub exe: PathBuf,
    /// How long a FUSE server may take to report `ready`.
    pub mount_timeout: Duration,
    /// How long a FUSE server may take to stop after SIGTERM before it is killed.
    pub stop_timeout: Duration,
}

pub struct MounterService {
    cfg: MounterConfig,
    procs: parking_lot::Mutex<HashMap<String, Proc>>,
    locks: parking_lot::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    keeper: OnceLock<Arc<Keeper>>,
}

/// Starts successors for the keeper: the mounter's own mount path, under the volume's lock.
struct MounterSuccessor(Weak<MounterService>);

#[tonic::async_trait]
impl Successor for MounterSuccessor {
    async fn start(&self, volume_id: &str, device: Connection) -> anyhow::Result<()> {
        let svc = self.0.upgrade().context("the mounter is stopping")?;
        let config = svc.cfg.state.fuse_config_path(volume_id);
        let mount_path = read_mount_path(&config)?;
        let lock = svc.lock_for(volume_id);
        let _guard = lock.lock().await;
        if svc.procs.lock().get(volume_id).is_some_and(Proc::is_alive) {
            return Ok(()); // Started meanwhile (a Mount call).
        }
        let p = svc
            .spawn(volume_id, &mount_path, &config, Some(device), None)
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
        tracing::info!(
            volume = volume_id,
            pid = p.pid,
            "a successor serves the FUSE connection"
        );
        svc.procs.lock().insert(volume_id.to_string(), p);
        Ok(())
    }
}

/// The mount path a volume's FUSE server configuration names.
pub fn read_mount_path(config: &Path) -> anyhow::Result<PathBuf> {
    let text = std::fs::read(config).with_context(|| format!("reading {}", config.display()))?;
    let cfg: FuseServerConfig =
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", config.display()))?;
    Ok(cfg.mount_path)
}

impl MounterService {
    /// Creates the service, adopts the FUSE servers that earlier mounters left running and
    /// keeps the connections of every running server.
    pub async fn new(cfg: MounterConfig) -> Arc<Self> {
        let svc = Arc::new(Self {
            cfg,
            procs: Default::default(),
            locks: Default::default(),
            keeper: OnceLock::new(),
        });
        let keeper = Keeper::new(
            Role::Mounter,
            &svc.cfg.state,
            Arc::new(MounterSuccessor(Arc::downgrade(&svc))),
        );
        let _ = svc.keeper.set(keeper);
        svc.adopt().await;
        svc
    }

    fn keeper(&self) -> &Arc<Keeper> {
        self.keeper.get().expect("set in new")
    }

    async fn adopt(&self) {
        let Ok(rd) = std::fs::read_dir(self.cfg.state.root().join("volumes")) else {
            return;
        };
        for e in rd.flatten() {
            let config = e.path().join("fuse.json");
            let Some(volume_id) = std::fs::read(&config)
                .ok()
                .and_then(|b| serde_json::from_slice::<FuseServerConfig>(&b).ok())
                .map(|c| c.volume_id)
            else {
                continue;
            };
            if let Some((id, p)) = adoptable(&e.path().join("fuse.pid"))
                && id == volume_id
            {
                self.procs.lock().insert(volume_id.clone(), p);
            }
            // Whoever serves a volume (an adopted server, or one the plugin hosts while this
            // mounter was away) gives its connection to keep.
            if e.path().join(handoff::CTL).exists()
                && let Err(e) = self.keeper().keep(&volume_id).await
            {
                tracing::info!(volume = %volume_id, error = %format!("{e:#}"), "no running FUSE server to keep the connection of");
            }
        }
    }

    fn lock_for(&self, volume_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .entry(volume_id.to_string())
            .or_default()
            .clone()
    }

    pub fn into_server(self: Arc<Self>) -> MounterServer<Self> {
        MounterServer::from_arc(self)
    }

    /// Stops a FUSE server: SIGTERM, then SIGKILL after the stop timeout.
    async fn stop_proc(&self, p: &Proc) {
        if !p.is_alive() {
            return;
        }
        let _ = kill(Pid::from_raw(p.pid as i32), Signal::SIGTERM);
        let deadline = Instant::now() + self.cfg.stop_timeout;
        while p.is_alive() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if p.is_alive() {
            tracing::warn!(
                pid = p.pid,
                "FUSE server did not stop on SIGTERM; killing it"
            );
            let _ = kill(Pid::from_raw(p.pid as i32), Signal::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(5);
            while p.is_alive() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Starts a FUSE server: a fresh one that mounts, or, given the connection `device`, a
    /// successor that takes it over. `exe` replaces the mounter's own binary.
    async fn spawn(
        &self,
        volume_id: &str,
        mount_path: &Path,
        config: &Path,
        device: Option<Connection>,
        exe: Option<&Path>,
    ) -> Result<Proc, Status> {
        let exe = exe.unwrap_or(&self.cfg.exe);
        let (pid, alive) =
            spawn_fuse_server(exe, volume_id, config, device, self.cfg.mount_timeout).await?;
        let pf = PidFile {
            pid,
            volume_id: volume_id.to_string(),
            mount_path: mount_path.to_path_buf(),
        };
        let pid_path = config.with_file_name("fuse.pid");
        if let Err(e) = write_atomic(
            &pid_path,
            &serde_json::to_vec(&pf).unwrap_or_default(),
            0o644,
        ) {
            tracing::warn!(file = %pid_path.display(), error = %e, "cannot write the pid file; a restarted mounter will not adopt this server");
        }
        Ok(Proc {
            pid,
            mount_path: mount_path.to_path_buf(),
            alive,
            adopted: false,
        })
    }
}

/// Starts `<exe> fuse-server --config <config>` (with `--successor`, the connection on its
/// standard input and its name in `--connection` when `device` is given) and waits for its status line. Returns its pid and a
/// flag its reaper clears when it exits.
pub async fn spawn_fuse_server(
    exe: &Path,
    volume_id: &str,
    config: &Path,
    device: Option<Connection>,
    mount_timeout: Duration,
) -> Result<(u32, Arc<AtomicBool>), Status> {
    {
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("fuse-server").arg("--config").arg(config);
        match device {
            Some(c) => {
                cmd.arg("--successor")
                    .arg("--connection")
                    .arg(c.id.to_string())
                    .stdin(std::process::Stdio::from(c.fd));
            }
            None => {
                cmd.stdin(std::process::Stdio::null());
            }
        }
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            // Its own process group: a signal to the mounter's group (Ctrl-C) leaves it alone.
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd.spawn().map_err(|e| {
            Status::internal(format!("starting the FUSE server {}: {e}", exe.display()))
        })?;
        let pid = child.id().unwrap_or_default();
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(mount_timeout, lines.next_line()).await;
        let fail = |msg: String| Status::unavailable(msg);
        let verdict = match line {
            Ok(Ok(Some(l))) if l == READY => Ok(()),
            Ok(Ok(Some(l))) => Err(fail(l.strip_prefix("error: ").unwrap_or(&l).to_string())),
            Ok(Ok(None)) | Ok(Err(_)) => Err(fail(format!(
                "the FUSE server for volume {volume_id} exited before it was ready ({})",
                match child.wait().await {
                    Ok(s) => s.to_string(),
                    Err(e) => e.to_string(),
                }
            ))),
            Err(_) => Err(fail(format!(
                "the FUSE server for volume {volume_id} was not ready within {}",
                humantime::format_duration(mount_timeout)
            ))),
        };
        if let Err(e) = verdict {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(e);
        }
        let alive = Arc::new(AtomicBool::new(true));
        let reaper_alive = alive.clone();
        let vid = volume_id.to_string();
        tokio::spawn(async move {
            let status = child.wait().await;
            reaper_alive.store(false, Ordering::Release);
            match status {
                Ok(s) if s.success() => tracing::info!(volume = %vid, pid, "FUSE server exited"),
                Ok(s) => {
                    tracing::warn!(volume = %vid, pid, status = %s, "FUSE server died; a successor takes over its connection")
                }
                Err(e) => {
                    tracing::warn!(volume = %vid, pid, error = %e, "lost track of the FUSE server")
                }
            }
        });
        Ok((pid, alive))
    }
}

fn required<'a>(v: &'a str, what: &str) -> Result<&'a str, Status> {
    if v.is_empty() {
        Err(Status::invalid_argument(format!("{what} is required")))
    } else {
        Ok(v)
    }
}

#[tonic::async_trait]
impl Mounter for MounterService {
    async fn mount(&self, req: Request<MountRequest>) -> Result<Response<MountResponse>, Status> {
        let req = req.into_inner();
        let volume_id = required(&req.volume_id, "volume_id")?;
        let mount_path = PathBuf::from(required(&req.mount_path, "mount_path")?);
        let config = PathBuf::from(required(&req.config_path, "config_path")?);
        let lock = self.lock_for(volume_id);
        let _guard = lock.lock().await;

        // A server this mounter did not start nor find at its start (its pid file came with a
        // volume the plugin moved here from an older state directory) is adopted now.
        let existing = self.procs.lock().remove(volume_id).or_else(|| {
            adoptable(&config.with_file_name("fuse.pid"))
                .filter(|(id, _)| id == volume_id)
                .map(|(_, p)| p)
        });
        let exe = (!req.exe.is_empty()).then(|| PathBuf::from(&req.exe));
        let dir = config
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| Status::invalid_argument("config_path has no directory"))?;
        let mut previous = None;
        if let Some(p) = existing {
            // Off the runtime: a hung server's mount takes HEALTH_TIMEOUT to be found broken.
            let mp = mount_path.clone();
            let health = tokio::task::spawn_blocking(move || mounts::health(&mp))
                .await
                .unwrap_or_else(|e| Health::Broken(format!("checking the mount failed: {e}")));
            if p.is_alive()
                && p.mount_path == mount_path
                && health == Health::Healthy
                && !req.replace
            {
                let pid = p.pid;
                self.procs.lock().insert(volume_id.to_string(), p);
                if !self.keeper().is_kept(volume_id)
                    && let Err(e) = self.keeper().keep(volume_id).await
                {
                    tracing::warn!(volume = volume_id, error = %format!("{e:#}"), "cannot keep the FUSE connection");
                }
                return Ok(Response::new(MountResponse {
                    pid,
                    started: false,
                    took_over: false,
                }));
            }
            tracing::warn!(
                volume = volume_id,
                pid = p.pid,
                alive = p.is_alive(),
                ?health,
                replace = req.replace,
                "replacing the FUSE server"
            );
            let healthy = p.is_alive() && health == Health::Healthy;
            if p.is_alive() && !healthy {
                // A hung server cannot hand over: it goes, its connection stays.
                let _ = kill(Pid::from_raw(p.pid as i32), Signal::SIGKILL);
                self.stop_proc(&p).await;
            }
            previous = Some((p, healthy));
        }
        // The connection, kept here or given by the server that serves it now (one the plugin
        // hosted while this mounter was away): a successor takes it over, and the mount, with
        // every file open on it, stays.
        let device = match self.keeper().device(volume_id) {
            Some(fd) => Some(fd),
            None => {
                let d = dir.clone();
                tokio::task::spawn_blocking(move || handoff::fetch(&d))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .map(|(_, fd, id)| Connection { fd, id })
            }
        };
        if let Some(device) = device
            && mounts::is_mount_point(&mount_path).unwrap_or(false)
        {
            match self
                .spawn(
                    volume_id,
                    &mount_path,
                    &config,
                    Some(device),
                    exe.as_deref(),
                )
                .await
            {
                Ok(p) => {
                    let pid = p.pid;
                    tracing::info!(volume = volume_id, pid, path = %mount_path.display(), "a successor took over the FUSE connection");
                    self.procs.lock().insert(volume_id.to_string(), p);
                    if let Err(e) = self.keeper().keep(volume_id).await {
                        tracing::warn!(volume = volume_id, error = %format!("{e:#}"), "cannot keep the FUSE connection");
                    }
                    return Ok(Response::new(MountResponse {
                        pid,
                        started: true,
                        took_over: true,
                    }));
                }
                Err(s) => {
                    // A healthy server that was to be replaced serves on (a successor fails
                    // before it asks for the hand-over, or the old one never froze).
                    if matches!(&previous, Some((p, true)) if p.is_alive())
                        && let Some((p, _)) = previous
                    {
                        tracing::error!(
                            volume = volume_id,
                            message = s.message(),
                            "the successor failed; the running FUSE server stays"
                        );
                        self.procs.lock().insert(volume_id.to_string(), p);
                        return Err(s);
                    }
                    tracing::error!(
                        volume = volume_id,
                        message = s.message(),
                        "the successor failed"
                    );
                }
            }
        }
        // Someone else serves the mount, or is taking it over (a successor the plugin started
        // while this mounter was away): ask again later rather than mount over it.
        let d = dir.clone();
        let busy =
            tokio::task::spawn_blocking(move || handoff::served(&d) || handoff::handing_over(&d))
                .await
                .unwrap_or(true);
        if busy && mounts::is_mount_point(&mount_path).unwrap_or(false) {
            if let Some((p, _)) = previous {
                self.procs.lock().insert(volume_id.to_string(), p);
            }
            return Err(Status::unavailable(format!(
                "volume {volume_id} is being served or taken over by another FUSE server; try again"
            )));
        }
        if mounts::is_mount_point(&mount_path).unwrap_or(false) {
            tracing::warn!(volume = volume_id, path = %mount_path.display(), "no FUSE connection to take over; mounting anew (files open on the mount break)");
        }
        if let Some((p, _)) = previous {
            self.stop_proc(&p).await;
        }
        self.keeper().forget(volume_id);
        // Whatever is left on the path (a dead server's mount) goes before the new one.
        if mounts::is_mount_point(&mount_path).unwrap_or(false) {
            mounts::unmount_all(&mount_path)
                .map_err(|e| Status::internal(format!("clearing {}: {e}", mount_path.display())))?;
        }
        let p = self
            .spawn(volume_id, &mount_path, &config, None, exe.as_deref())
            .await?;
        let pid = p.pid;
        tracing::info!(volume = volume_id, pid, path = %mount_path.display(), "FUSE server started");
        self.procs.lock().insert(volume_id.to_string(), p);
        if let Err(e) = self.keeper().keep(volume_id).await {
            tracing::warn!(volume = volume_id, error = %format!("{e:#}"), "cannot keep the FUSE connection; a restart of its server will break the mount");
        }
        Ok(Response::new(MountResponse {
            pid,
            started: true,
            took_over: false,
        }))
    }

    async fn unmount(
        &self,
        req: Request<UnmountRequest>,
    ) -> Result<Response<UnmountResponse>, Status> {
        let req = req.into_inner();
        let volume_id = required(&req.volume_id, "volume_id")?;
        let lock = self.lock_for(volume_id);
        let _guard = lock.lock().await;
        // Its server's end is on purpose: no successor.
        self.keeper().forget(volume_id);
        let existing = self.procs.lock().remove(volume_id);
        let mut path = (!req.mount_path.is_empty()).then(|| PathBuf::from(&req.mount_path));
        if let Some(p) = existing {
            self.stop_proc(&p).await;
            path.get_or_insert(p.mount_path.clone());
            tracing::info!(volume = volume_id, pid = p.pid, "FUSE server stopped");
        }
        if let Some(path) = path
            && mounts::is_mount_point(&path).unwrap_or(false)
        {
            mounts::unmount_all(&path)
                .map_err(|e| Status::internal(format!("unmounting {}: {e}", path.display())))?;
        }
        let pid_file = self.cfg.state.volume_dir(volume_id).join("fuse.pid");
        let _ = std::fs::remove_file(pid_file);
        self.locks.lock().remove(volume_id);
        Ok(Response::new(UnmountResponse {}))
    }

    async fn list_mounts(
        &self,
        _req: Request<ListMountsRequest>,
    ) -> Result<Response<ListMountsResponse>, Status> {
        // The plugin's readiness and its repair loop wait on this answer (3 s): the mounts are
        // looked at on the blocking pool, all at once and outside the lock, each for at most
        // LIST_HEALTH_TIMEOUT, so that one hung FUSE server neither holds a runtime thread
        // nor keeps the answer past the plugin's deadline (which would stop every repair).
        let procs: Vec<(String, PathBuf, u32, bool)> = self
            .procs
            .lock()
            .iter()
            .map(|(vid, p)| (vid.clone(), p.mount_path.clone(), p.pid, p.is_alive()))
            .collect();
        let checks: Vec<_> = procs
            .into_iter()
            .map(|(vid, path, pid, alive)| {
                let p = path.clone();
                let check = alive.then(|| {
                    tokio::task::spawn_blocking(move || {
                        mounts::health_within(&p, LIST_HEALTH_TIMEOUT)
                    })
                });
                (vid, path, pid, check)
            })
            .collect();
        let mut mounts = Vec::with_capacity(checks.len());
        for (vid, path, pid, check) in checks {
            let (healthy, message) = match check {
                None => (false, "the FUSE server has exited".to_string()),
                Some(check) => match check.await {
                    Ok(Health::Healthy) => (true, String::new()),
                    Ok(Health::NotMounted) => (false, "not mounted".to_string()),
                    Ok(Health::Broken(m)) => (false, m),
                    Err(e) => (false, format!("checking the mount failed: {e}")),
                },
            };
            mounts.push(MountState {
                volume_id: vid,
                mount_path: path.display().to_string(),
                pid,
                healthy,
                message,
            });
        }
        Ok(Response::new(ListMountsResponse { mounts }))
    }
}

/// How long [`MounterService::list_mounts`] waits on each mount's `statfs`.
const LIST_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);

/// Serves the mounter on its socket in the state directory until `shutdown` resolves. FUSE
/// servers keep running after it stops.
pub async fn serve(
    cfg: MounterConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let socket = cfg.state.mounter_socket();
    let listener = crate::bind_unix(&socket)?;
    // It takes any command from whoever connects: only root, the plugin, may (the directory is
    // 0700 as well).
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            &socket,
            std::fs::Permissions::from_mode(crate::state::SECRET_MODE),
        )?;
    }
    tracing::info!(socket = %socket.display(), "mounter listening");
    let svc = MounterService::new(cfg).await;
    tonic::transport::Server::builder()
        .add_service(svc.into_server())
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await?;
    Ok(())
}
