//! The mounter: hosts the FUSE servers of a node, one process per staged volume.
//!
//! It runs in another container than the CSI plugin (the `mounter` sidecar of the DaemonSet
//! pod), so restarting or upgrading the plugin never kills a FUSE server. FUSE servers run in
//! their own process group and outlive the mounter too; a restarted mounter adopts the ones still
//! alive from their pid files. The plugin asks it over a unix socket ([`crate::proto`]'s
//! `Mounter` service) to mount, unmount and list.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

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
use crate::mounts::{self, Health};
use crate::state::{StateDir, write_atomic};

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
}

impl MounterService {
    /// Creates the service and adopts the FUSE servers that earlier mounters left running.
    pub fn new(cfg: MounterConfig) -> Self {
        let svc = Self {
            cfg,
            procs: Default::default(),
            locks: Default::default(),
        };
        svc.adopt();
        svc
    }

    fn adopt(&self) {
        let Ok(rd) = std::fs::read_dir(self.cfg.state.root().join("volumes")) else {
            return;
        };
        for e in rd.flatten() {
            if let Some((volume_id, p)) = adoptable(&e.path().join("fuse.pid")) {
                self.procs.lock().insert(volume_id, p);
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

    pub fn into_server(self) -> MounterServer<Self> {
        MounterServer::new(self)
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

    async fn spawn(
        &self,
        volume_id: &str,
        mount_path: &Path,
        config: &Path,
    ) -> Result<Proc, Status> {
        let mut cmd = tokio::process::Command::new(&self.cfg.exe);
        cmd.arg("fuse-server")
            .arg("--config")
            .arg(config)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            // Its own process group: a signal to the mounter's group (Ctrl-C) leaves it alone.
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd.spawn().map_err(|e| {
            Status::internal(format!(
                "starting the FUSE server {}: {e}",
                self.cfg.exe.display()
            ))
        })?;
        let pid = child.id().unwrap_or_default();
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(self.cfg.mount_timeout, lines.next_line()).await;
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
                humantime::format_duration(self.cfg.mount_timeout)
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
                    tracing::warn!(volume = %vid, pid, status = %s, "FUSE server died; the plugin will repair its mount")
                }
                Err(e) => {
                    tracing::warn!(volume = %vid, pid, error = %e, "lost track of the FUSE server")
                }
            }
        });
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
        if let Some(p) = existing {
            // Off the runtime: a hung server's mount takes HEALTH_TIMEOUT to be found broken.
            let mp = mount_path.clone();
            let health = tokio::task::spawn_blocking(move || mounts::health(&mp))
                .await
                .unwrap_or_else(|e| Health::Broken(format!("checking the mount failed: {e}")));
            if p.is_alive() && p.mount_path == mount_path && health == Health::Healthy {
                let pid = p.pid;
                self.procs.lock().insert(volume_id.to_string(), p);
                return Ok(Response::new(MountResponse {
                    pid,
                    started: false,
                }));
            }
            tracing::warn!(
                volume = volume_id,
                pid = p.pid,
                alive = p.is_alive(),
                ?health,
                "replacing the FUSE server"
            );
            self.stop_proc(&p).await;
        }
        // Whatever is left on the path (a dead server's mount) goes before the new one.
        if mounts::is_mount_point(&mount_path).unwrap_or(false) {
            mounts::unmount_all(&mount_path)
                .map_err(|e| Status::internal(format!("clearing {}: {e}", mount_path.display())))?;
        }
        let p = self.spawn(volume_id, &mount_path, &config).await?;
        let pid = p.pid;
        tracing::info!(volume = volume_id, pid, path = %mount_path.display(), "FUSE server started");
        self.procs.lock().insert(volume_id.to_string(), p);
        Ok(Response::new(MountResponse { pid, started: true }))
    }

    async fn unmount(
        &self,
        req: Request<UnmountRequest>,
    ) -> Result<Response<UnmountResponse>, Status> {
        let req = req.into_inner();
        let volume_id = required(&req.volume_id, "volume_id")?;
        let lock = self.lock_for(volume_id);
        let _guard = lock.lock().await;
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
    let svc = MounterService::new(cfg);
    tonic::transport::Server::builder()
        .add_service(svc.into_server())
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await?;
    Ok(())
}
