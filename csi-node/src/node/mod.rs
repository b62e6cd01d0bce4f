//! The CSI Identity and Node services, and the repair loop.
//!
//! What a request may ask is checked before anything is touched: the volume context's rules
//! ([`VolumeAttributes`]: an inline volume, the tenant's own text, may not name workers; a volume
//! that resolves a CacheNamespace needs the pod's namespace), the plugin's caps on a volume's
//! sizes, and, for a volume not staged yet, room in the mounter's memory for one more FUSE
//! server (its prefetch budget plus a fixed overhead, against the mounter's limit).
//!
//! Handlers never wait on the filesystem on a runtime thread: every file and mount call runs
//! on the blocking pool under a deadline ([`PluginConfig::fs_timeout`]). A look into a cache
//! mount asks the workers, and a worker that starts a listing and never ends it would
//! otherwise hold the thread (and, with two such calls on two cores, every other call) for as
//! long as the FUSE server waits on it. Such a look holds no volume lock (`Plugin::look`):
//! a FUSE server that hangs must not keep its volume locked, or the repair loop, which skips a
//! locked volume, would never replace it. Changes (bind mounts, unmounts, state writes) keep the
//! lock until their threads end.
//!
//! The data-plane token is a file of its own in the volume's state (mode 0600). kubelet
//! publishes a volume again and again (`requiresRepublish`) with the current token of its
//! publish secret; a new one replaces the file, which the FUSE server follows without a
//! restart.
//!
//! The module is laid out by call: [`request`] checks a request's arguments (no I/O),
//! [`stage`], [`publish`] and [`repair`] act, through [`host::Host`] for every file and mount
//! call so that their rules are unit-tested against a fake node; [`error::NodeError`] is
//! translated to a gRPC code in one place; [`service`] and [`identity`] are the thin tonic
//! adapters.

mod blocking;
mod config;
mod error;
pub mod host;
mod identity;
mod publish;
mod repair;
mod request;
mod service;
mod stage;
#[cfg(test)]
mod testkit;

use std::collections::HashSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lakecache_proto::lakecache::v1::mounter_client::MounterClient;
use lakecache_proto::lakecache::v1::{ListMountsRequest, MountRequest, UnmountRequest};
use tonic::transport::Channel;
use tonic::{Code, Response, Status};

use self::blocking::{HELD, blocking, blocking_holding};
pub use self::config::{
    DEFAULT_LISTING_BUDGET, FUSE_PROCESS_BYTES, PluginConfig, check_mounter_memory,
    fuse_server_overhead,
};
pub use self::error::NodeError;
pub use self::host::{Host, NodeHost};
pub use self::service::Services;
use crate::handoff::{Connection, Keeper, Role, Successor};
use crate::metrics::CsiMetrics;
use crate::state::{StateDir, VolumeRecord, write_atomic};
use crate::volume::{FuseServerConfig, VolumeAttributes};

/// The plugin: CSI services over the state directory and the mounter.
pub struct Plugin {
    cfg: PluginConfig,
    state: StateDir,
    mounter: MounterClient<Channel>,
    busy: Arc<parking_lot::Mutex<HashSet<String>>>,
    /// Held from the memory check of a new volume until its record is saved, so that two
    /// volumes staged at once cannot both take the last share of the mounter's memory.
    admission: Arc<tokio::sync::Mutex<()>>,
    /// Volumes with a look into their cache mount in flight (see [`Plugin::look`]).
    looks: Arc<parking_lot::Mutex<HashSet<String>>>,
    pub metrics: Arc<CsiMetrics>,
    /// A copy of every staged volume's FUSE connection; while the mounter is away, the plugin
    /// starts the successors of the FUSE servers that went with it ([`crate::handoff`]).
    pub keeper: Arc<Keeper>,
    /// The node's filesystem and mounts ([`host`]).
    host: Arc<dyn Host>,
}

/// Starts successors in the plugin's own container, while the mounter is away. They are
/// handed back when the mounter is back: the repair pass asks it to mount, and it takes over.
struct PluginSuccessor {
    state: StateDir,
    timeout: Duration,
}

#[tonic::async_trait]
impl Successor for PluginSuccessor {
    async fn start(&self, volume_id: &str, device: Connection) -> anyhow::Result<()> {
        let exe = std::env::current_exe()?;
        let config = self.state.fuse_config_path(volume_id);
        let (pid, _) =
            crate::mounter::spawn_fuse_server(&exe, volume_id, &config, Some(device), self.timeout)
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
        tracing::warn!(
            volume = volume_id,
            pid,
            "the mounter is away: a successor in the plugin's container serves the FUSE connection until it is back"
        );
        Ok(())
    }
}

/// Marks a volume busy for the length of one operation, and of the blocking calls it started
/// that outlive it (see [`HELD`]). Also marks a look into a volume's mount in flight, in
/// [`Plugin::looks`].
struct Busy {
    set: Arc<parking_lot::Mutex<HashSet<String>>>,
    volume_id: String,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.set.lock().remove(&self.volume_id);
    }
}
impl Plugin {
    pub fn new(cfg: PluginConfig, state: StateDir) -> Self {
        Self::with_host(cfg, state, Arc::new(NodeHost))
    }

    /// A plugin over `host` (the node's filesystem and mounts, or a fake in tests).
    pub fn with_host(cfg: PluginConfig, state: StateDir, host: Arc<dyn Host>) -> Self {
        let mounter = crate::mounter_client(&state.mounter_socket());
        let keeper = Keeper::new(
            Role::Plugin,
            &state,
            Arc::new(PluginSuccessor {
                state: state.clone(),
                timeout: cfg.startup_timeout + Duration::from_secs(30),
            }),
        );
        Self {
            cfg,
            state,
            mounter,
            busy: Default::default(),
            admission: Default::default(),
            looks: Default::default(),
            metrics: Arc::new(CsiMetrics::default()),
            keeper,
            host,
        }
    }

    /// Keeps the FUSE connection of every staged volume whose server runs (at start).
    pub async fn keep_all(&self) {
        for rec in self.state.all().into_iter().flatten() {
            if let Err(e) = self.keeper.keep(&rec.volume_id).await {
                tracing::info!(volume = %rec.volume_id, error = %format!("{e:#}"), "cannot keep the FUSE connection yet; the repair pass will");
            }
        }
    }

    /// Takes the volume's lock for this operation (`Aborted` while another holds it). Blocking
    /// calls started on this task from now on hold it too, until their threads end.
    fn busy(&self, volume_id: &str, rpc: &str) -> Result<Arc<Busy>, NodeError> {
        if !self.busy.lock().insert(volume_id.to_string()) {
            return Err(NodeError::Busy(format!(
                "{rpc}: another operation on volume {volume_id} is in progress (or a file or \
                 mount call of an earlier one is still running); retry"
            )));
        }
        let busy = Arc::new(Busy {
            set: self.busy.clone(),
            volume_id: volume_id.to_string(),
        });
        let _ = HELD.try_with(|h| *h.lock() = Arc::downgrade(&busy));
        Ok(busy)
    }

    /// Runs `f` on the blocking pool within the filesystem deadline.
    async fn fs<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce(&dyn Host) -> Result<T, NodeError> + Send + 'static,
    ) -> Result<T, NodeError> {
        let host = self.host.clone();
        blocking(what, self.cfg.fs_timeout, move || f(&*host)).await
    }

    /// Runs a call that looks into volume `volume_id`'s cache mount without changing anything
    /// (a stat or `statfs` of a path in it) on the blocking pool within the filesystem deadline,
    /// like [`Plugin::fs`] but holding no volume lock. Such a call waits as long as the FUSE
    /// server does (its read deadline, or for ever when it hangs); holding the volume's lock
    /// meanwhile would keep every later call on the volume `Aborted`, and keep the repair loop,
    /// which skips a locked volume, from replacing the hung server. A look changes nothing, so
    /// an operation that gave up on it may let another run beside it; changes (bind mounts,
    /// unmounts, state writes) go through [`Plugin::fs`] and keep the lock.
    ///
    /// One look at a time per volume: while an earlier one still waits on the mount, the next
    /// is `Unavailable` at once, rather than one more thread stuck on a hung server for every
    /// retry of kubelet.
    async fn look<T: Send + 'static>(
        &self,
        volume_id: &str,
        what: &str,
        f: impl FnOnce(&dyn Host) -> Result<T, NodeError> + Send + 'static,
    ) -> Result<T, NodeError> {
        if !self.looks.lock().insert(volume_id.to_string()) {
            return Err(NodeError::Unavailable(format!(
                "{what}: an earlier look into the cache mount of volume {volume_id} has not \
                 returned yet (its FUSE server may hang; the plugin is repairing it); retry"
            )));
        }
        let mark = Busy {
            set: self.looks.clone(),
            volume_id: volume_id.to_string(),
        };
        let host = self.host.clone();
        blocking_holding(what, self.cfg.fs_timeout, Some(mark), move || f(&*host)).await
    }

    /// [`Plugin::look`] without the one-at-a-time rule, for looks bounded on their own (a
    /// [`mounts::health`] gives up on a `statfs` after [`mounts::HEALTH_TIMEOUT`]): the repair
    /// loop checks a volume's mounts while a publish still waits on them.
    async fn glance<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce(&dyn Host) -> Result<T, NodeError> + Send + 'static,
    ) -> Result<T, NodeError> {
        let host = self.host.clone();
        blocking_holding(what, self.cfg.fs_timeout, None::<()>, move || f(&*host)).await
    }

    async fn load(&self, volume_id: &str) -> Result<Option<VolumeRecord>, NodeError> {
        let (state, id) = (self.state.clone(), volume_id.to_string());
        self.fs("reading the volume's state", move |_| {
            state
                .load(&id)
                .map_err(|e| NodeError::Internal(format!("reading the state of volume {id}: {e}")))
        })
        .await
    }

    async fn save(&self, rec: &VolumeRecord) -> Result<(), NodeError> {
        self.save_holding(rec, None::<()>).await
    }

    /// [`Plugin::save`], with `guard` dropped when the write ends (on its thread, even past
    /// the deadline), besides the volume's lock.
    async fn save_holding<G: Send + 'static>(
        &self,
        rec: &VolumeRecord,
        guard: Option<G>,
    ) -> Result<(), NodeError> {
        let (state, rec) = (self.state.clone(), rec.clone());
        self.fs("saving the volume's state", move |_| {
            #[cfg(test)]
            tests::slow_save(&rec.volume_id);
            let r = state.save(&rec).map_err(|e| {
                NodeError::Internal(format!("saving the state of volume {}: {e}", rec.volume_id))
            });
            drop(guard);
            r
        })
        .await
    }

    async fn forget(&self, volume_id: &str) -> Result<(), NodeError> {
        let (state, id) = (self.state.clone(), volume_id.to_string());
        self.fs("removing the volume's state", move |_| {
            state
                .remove(&id)
                .map_err(|e| NodeError::io(format!("removing the state of volume {id}"), e))
        })
        .await
    }

    /// Saves the record of a volume that is not staged yet, if the mounter's memory holds one
    /// more FUSE server with its budget (`ResourceExhausted` if not).
    async fn admit(&self, rec: &VolumeRecord, rpc: &str) -> Result<(), NodeError> {
        // The turn is held until the record is written, not until this call gives up on the
        // write: a save past the deadline goes on on its thread, and a volume admitted beside
        // it would not count this one. The next admission waits for it within the deadline.
        let turn = tokio::time::timeout(self.cfg.fs_timeout, self.admission.clone().lock_owned())
            .await
            .map_err(|_| {
                NodeError::Unavailable(format!(
                    "{rpc}: the record of another volume staged on this node is still being \
                     written after {}; retry",
                    humantime::format_duration(self.cfg.fs_timeout)
                ))
            })?;
        let state = self.state.clone();
        let id = rec.volume_id.clone();
        let default = self.cfg.prefetch_budget;
        let staged: Vec<u64> = self
            .fs("reading the staged volumes", move |_| {
                Ok(state
                    .all()
                    .into_iter()
                    .filter_map(Result::ok)
                    .filter(|r| r.volume_id != id)
                    .map(|r| r.prefetch_budget.unwrap_or(default))
                    .collect())
            })
            .await?;
        let budget = rec.prefetch_budget.unwrap_or(default);
        check_mounter_memory(&self.cfg, &rec.volume_id, budget, &staged)
            .map_err(|m| NodeError::NoRoom(format!("{rpc}: {m}")))?;
        self.save_holding(rec, Some(turn)).await
    }

    /// Writes a volume's token file (mode 0600) when `token` differs from what it holds.
    /// Returns whether it wrote. The FUSE server reads the file again when it changes.
    async fn write_token(&self, volume_id: &str, token: &str) -> Result<bool, NodeError> {
        let path = self.state.token_path(volume_id);
        let dir = self.state.volume_dir(volume_id);
        let token = token.to_string();
        self.fs("writing the volume's token", move |_| {
            if std::fs::read(&path).is_ok_and(|old| old == token.as_bytes()) {
                return Ok(false);
            }
            std::fs::create_dir_all(&dir)
                .map_err(|e| NodeError::io("creating the volume's state directory", e))?;
            write_atomic(&path, token.as_bytes(), 0o600)
                .map_err(|e| NodeError::io(format!("writing {}", path.display()), e))?;
            Ok(true)
        })
        .await
    }

    /// Times and counts one call, and logs its outcome.
    async fn observed<T>(
        &self,
        rpc: &'static str,
        volume_id: &str,
        f: impl Future<Output = Result<T, NodeError>>,
    ) -> Result<Response<T>, Status> {
        let start = Instant::now();
        let r = HELD.scope(Default::default(), f).await;
        let code = match &r {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        };
        self.metrics.observe(rpc, code, start.elapsed());
        match &r {
            Ok(_) => tracing::info!(
                rpc,
                volume = volume_id,
                ms = start.elapsed().as_millis() as u64,
                "ok"
            ),
            Err(e) => {
                tracing::warn!(rpc, volume = volume_id, code = ?e.code(), message = %e, "failed")
            }
        }
        r.map(Response::new).map_err(Status::from)
    }

    /// Writes the FUSE server's configuration and asks the mounter for a healthy mount. Whether
    /// a new FUSE server was started for it (a successor on the same connection or not).
    async fn ensure_fuse(
        &self,
        rec: &VolumeRecord,
        ctx: Option<(&VolumeAttributes, Option<&str>)>,
    ) -> Result<bool, NodeError> {
        let config_path = self.state.fuse_config_path(&rec.volume_id);
        if let Some((ctx, token)) = ctx {
            // The token goes to a file of its own, which a publish with a rotated token
            // rewrites and the FUSE server follows.
            let token_file = match token {
                Some(t) => {
                    self.write_token(&rec.volume_id, t).await?;
                    Some(self.state.token_path(&rec.volume_id))
                }
                None => None,
            };
            let cfg = FuseServerConfig {
                volume_id: rec.volume_id.clone(),
                mount_path: rec.staging_path.clone(),
                namespace: ctx.namespace.clone(),
                name: ctx.name.clone(),
                workers: ctx.workers.clone(),
                token: None,
                token_file,
                inline: rec.ephemeral,
                metadata_ttl: ctx.metadata_ttl,
                prefetch_budget: ctx.prefetch_budget.unwrap_or(self.cfg.prefetch_budget),
                fuse_threads: self.cfg.fuse_threads,
                local_cache_dir: self.local_cache_dir(&rec.volume_id),
                local_cache_size: ctx.local_cache_size.unwrap_or(self.cfg.local_cache_size),
                listing_budget: Some(self.cfg.listing_budget),
                block_transport: self.cfg.block_transport,
                startup_timeout: self.cfg.startup_timeout,
            };
            let json =
                serde_json::to_vec_pretty(&cfg).map_err(|e| NodeError::Internal(e.to_string()))?;
            let dir = self.state.volume_dir(&rec.volume_id);
            let path = config_path.clone();
            self.fs("writing the FUSE server's configuration", move |_| {
                std::fs::create_dir_all(dir)
                    .map_err(|e| NodeError::io("creating the volume's state directory", e))?;
                write_atomic(&path, &json, 0o600)
                    .map_err(|e| NodeError::io(format!("writing {}", path.display()), e))
            })
            .await?;
        }
        let mut client = self.mounter.clone();
        let call = client.mount(MountRequest {
            volume_id: rec.volume_id.clone(),
            mount_path: rec.staging_path.display().to_string(),
            config_path: config_path.display().to_string(),
            replace: false,
            exe: String::new(),
        });
        let resp = tokio::time::timeout(self.cfg.mounter_timeout, call)
            .await
            .map_err(|_| {
                NodeError::Unavailable(format!(
                    "the mounter did not answer within {}; is the mounter container running?",
                    humantime::format_duration(self.cfg.mounter_timeout)
                ))
            })?
            .map_err(|s| mounter_error(&rec.volume_id, s))?
            .into_inner();
        if resp.took_over {
            self.metrics.repair("takeover");
            tracing::info!(volume = %rec.volume_id, pid = resp.pid, "a successor took over the FUSE connection; the mount stayed");
        }
        if resp.started || !self.keeper.is_kept(&rec.volume_id) {
            // The connection of a new mount, or one not kept yet (this plugin just started).
            if let Err(e) = self.keeper.keep(&rec.volume_id).await {
                tracing::warn!(volume = %rec.volume_id, error = %format!("{e:#}"), "cannot keep the FUSE connection");
            }
        }
        Ok(resp.started && !resp.took_over)
    }

    /// Removes a volume's local copies once its FUSE server is gone.
    async fn drop_local_copies(&self, volume_id: &str) {
        let Some(dir) = self.local_cache_dir(volume_id) else {
            return;
        };
        let vid = volume_id.to_string();
        let _ = self
            .fs("removing the volume's local copies", move |_| {
                if let Err(e) = std::fs::remove_dir_all(&dir)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(volume = %vid, dir = %dir.display(), error = %e, "cannot remove the volume's local copies");
                }
                Ok(())
            })
            .await;
    }

    /// The directory of a volume's local copies.
    fn local_cache_dir(&self, volume_id: &str) -> Option<PathBuf> {
        let dir = self.cfg.local_cache_dir.as_ref()?;
        let hash = blake3::hash(volume_id.as_bytes()).to_hex();
        Some(dir.join(&hash.as_str()[..32]))
    }

    async fn stop_fuse(&self, rec: &VolumeRecord) -> Result<(), NodeError> {
        // Its server's end is on purpose: no successor.
        self.keeper.forget(&rec.volume_id);
        let mut client = self.mounter.clone();
        let call = client.unmount(UnmountRequest {
            volume_id: rec.volume_id.clone(),
            mount_path: rec.staging_path.display().to_string(),
        });
        tokio::time::timeout(self.cfg.mounter_timeout, call)
            .await
            .map_err(|_| {
                NodeError::Unavailable(
                    "the mounter did not answer; is the mounter container running?".into(),
                )
            })?
            .map_err(|s| mounter_error(&rec.volume_id, s))?;
        Ok(())
    }

    /// Whether the plugin can mount: the mounter answers and the kernel has FUSE.
    pub async fn can_mount(&self) -> Result<(), String> {
        if !Path::new("/dev/fuse").exists() {
            return Err("/dev/fuse is missing: the plugin container needs it (privileged, or the device mounted)".into());
        }
        let mut client = self.mounter.clone();
        match tokio::time::timeout(
            Duration::from_secs(3),
            client.list_mounts(ListMountsRequest {}),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(s)) => Err(format!("the mounter failed: {}", s.message())),
            Err(_) => Err("the mounter did not answer within 3s".into()),
        }
    }

    pub fn volumes(&self) -> usize {
        self.state.all().len()
    }
}

/// The mounter's error, with the volume named. A status that the mounter sent keeps its code and
/// message (a bad token or unreachable workers already say what to fix); one that tonic made
/// because the mounter's socket did not answer carries its transport error as its source, and
/// says to look at the mounter container.
fn mounter_error(volume_id: &str, s: Status) -> NodeError {
    if std::error::Error::source(&s).is_some() {
        return NodeError::Unavailable(format!(
            "cannot reach the mounter for volume {volume_id} ({}); is the mounter container running?",
            s.message()
        ));
    }
    NodeError::Mounter {
        code: s.code(),
        message: format!("volume {volume_id}: {}", s.message()),
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::testkit::config;
    use super::*;

    /// Volume ids whose record writes take a second (a slow or hung state directory).
    static SLOW_SAVES: parking_lot::Mutex<Vec<String>> = parking_lot::Mutex::new(Vec::new());

    pub(super) fn slow_save(volume_id: &str) {
        if SLOW_SAVES.lock().iter().any(|v| v == volume_id) {
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// A new volume's record written past the deadline still counts for the next volume's
    /// memory check: the next admission waits for the write (within the deadline), and once
    /// it is done, finds the first volume staged.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_admission_holds_its_turn_until_its_record_is_written() {
        const MIB: u64 = 1 << 20;
        let root = tempfile::tempdir().unwrap();
        let state = StateDir::open(&root.path().join("state")).unwrap();
        let mut cfg = config(100 * MIB, 10 * MIB);
        cfg.fs_timeout = Duration::from_millis(300);
        let plugin = Plugin::new(cfg, state.clone());
        let rec = |v: &str| VolumeRecord {
            volume_id: v.into(),
            staging_path: root.path().join(v),
            ephemeral: false,
            namespace: "ml".into(),
            name: "imagenet".into(),
            targets: Default::default(),
            prefetch_budget: Some(50 * MIB),
        };
        SLOW_SAVES.lock().push("admit-slow".into());
        let started = Instant::now();
        let e = plugin
            .admit(&rec("admit-slow"), "NodeStageVolume")
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(started.elapsed() < Duration::from_millis(900));
        // The write goes on: the next volume may not pass the check without it.
        let e = plugin
            .admit(&rec("admit-next"), "NodeStageVolume")
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(e.message().contains("still being written"), "{e:?}");
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(state.load("admit-slow").unwrap().is_some());
        let e = plugin
            .admit(&rec("admit-next"), "NodeStageVolume")
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(state.load("admit-next").unwrap().is_none());
    }

    /// A look into a mount holds no volume lock, even past its deadline, and only one runs per
    /// volume: the next is Unavailable at once while the first still waits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_look_past_its_deadline_keeps_no_volume_locked() {
        let root = tempfile::tempdir().unwrap();
        let state = StateDir::open(&root.path().join("state")).unwrap();
        let mut cfg = config(0, 0);
        cfg.fs_timeout = Duration::from_millis(200);
        let plugin = Plugin::new(cfg, state);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let e = HELD
            .scope(Default::default(), async {
                let _busy = plugin.busy("v", "NodePublishVolume").unwrap();
                plugin
                    .look("v", "looking at the cache mount", move |_| {
                        let _ = rx.recv_timeout(Duration::from_secs(10));
                        Ok(())
                    })
                    .await
                    .unwrap_err()
            })
            .await;
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        // The look still runs; the volume is free.
        let e = HELD
            .scope(Default::default(), async {
                let _busy = plugin.busy("v", "NodeUnpublishVolume").unwrap();
                plugin
                    .look("v", "looking at the cache mount", |_| Ok(()))
                    .await
                    .unwrap_err()
            })
            .await;
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(e.message().contains("has not returned"), "{e:?}");
        // A change, by contrast, keeps the lock until its thread ends.
        HELD.scope(Default::default(), async {
            let _busy = plugin.busy("w", "NodePublishVolume").unwrap();
            let e = plugin
                .fs("binding", |_| {
                    std::thread::sleep(Duration::from_millis(600));
                    Ok(())
                })
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::Unavailable);
        })
        .await;
        assert_eq!(
            plugin.busy("w", "x").err().map(|e| e.code()),
            Some(Code::Aborted)
        );
        tx.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        plugin.look("v", "x", |_| Ok(())).await.unwrap();
        plugin.busy("w", "x").unwrap();
    }
}
