//! The CSI Identity and Node services, and the repair loop.
//!
//! What a request may ask is checked before anything is touched: the volume context's rules
//! ([`VolumeContext`]: an inline volume, the tenant's own text, may not name workers; a volume
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

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crate::handoff::{Connection, Keeper, Role, Successor};
use lakecache_client::local_cache::QUEUE_BYTES;
use lakecache_client::prefetch::READ_RESERVE;
use lakecache_client::reader::LISTING_ENTRY_BYTES;
use lakecache_proto::csi::v1 as csi;
use lakecache_proto::csi::v1::identity_server::Identity;
use lakecache_proto::csi::v1::node_server::Node;
use lakecache_proto::csi::v1::node_service_capability::rpc::Type as RpcType;
use lakecache_proto::csi::v1::volume_capability::access_mode::Mode;
use lakecache_proto::lakecache::v1::mounter_client::MounterClient;
use lakecache_proto::lakecache::v1::{ListMountsRequest, MountRequest, UnmountRequest};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use crate::metrics::CsiMetrics;
use crate::mounts::{self, Health};
use crate::state::{StateDir, TargetRecord, VolumeRecord, write_atomic};
use crate::volume::{Caps, FuseServerConfig, VolumeContext, token_from_secrets};
use crate::{DRIVER_NAME, TOPOLOGY_KEY};

/// Plugin settings.
#[derive(Debug, Clone)]
pub struct PluginConfig {
    pub node_id: String,
    /// Read-ahead budget of a mount, unless its volume context sets one.
    pub prefetch_budget: u64,
    pub fuse_threads: usize,
    /// Where FUSE servers keep node-local whole-file copies (a subdirectory per volume), and
    /// how much per volume unless its volume context says otherwise; `None` or 0 turns them off.
    pub local_cache_dir: Option<PathBuf>,
    pub local_cache_size: u64,
    /// How long a FUSE server may wait for a first worker.
    pub startup_timeout: Duration,
    /// How long a call to the mounter may take.
    pub mounter_timeout: Duration,
    /// The most a volume may ask for (`prefetchBudget`, `localCacheSize`).
    pub caps: Caps,
    /// The mounter container's memory limit, which every FUSE server shares; 0 when unknown
    /// (no check).
    pub mounter_memory: u64,
    /// Memory of one FUSE server beyond its prefetch budget (its read reserve, copy queue,
    /// listings, the process itself), counted against `mounter_memory` for every staged
    /// volume; see [`fuse_server_overhead`].
    pub fuse_server_overhead: u64,
    /// Entries of directory listings each FUSE server keeps.
    pub listing_budget: usize,
    /// Whether FUSE servers read blocks over the block transport (gRPC otherwise).
    pub block_transport: bool,
    /// How long a filesystem call of a CSI handler may take (a look at the mounted cache, a
    /// bind mount): a mount whose workers hang must not hold the handler for minutes.
    pub fs_timeout: Duration,
}

/// Entries of listings a FUSE server keeps by default: ~50 MB (at [`LISTING_ENTRY_BYTES`]), a
/// tenth of what `lakecache local` keeps. A directory larger than the budget is still listed
/// once and kept alone while it is walked.
pub const DEFAULT_LISTING_BUDGET: usize = 200_000;

/// What a FUSE server's own process takes beyond its buffers and listings: the binary, the
/// runtime and its threads, the FUSE threads' request buffers, the inode table, the worker
/// connections. An allowance, not a measured bound.
pub const FUSE_PROCESS_BYTES: u64 = 32 << 20;

/// The memory of one FUSE server beyond its prefetch budget, when `--fuse-server-overhead` is
/// not given: its read reserve ([`READ_RESERVE`], 64 MiB), its queue of blocks for node-local
/// copies ([`QUEUE_BYTES`], 32 MiB), its listings at [`LISTING_ENTRY_BYTES`] an entry, and
/// [`FUSE_PROCESS_BYTES`]: 177 MiB with the default listing budget.
///
/// Not covered: each read call in flight holds its block beyond the reserve when the block is
/// larger than what the reserve has left (block size × calls in flight: FUSE threads ×
/// the kernel's read-ahead requests), and the HTTP/2 windows of worker connections.
pub fn fuse_server_overhead(listing_budget: usize) -> u64 {
    READ_RESERVE
        + QUEUE_BYTES
        + (listing_budget as u64).saturating_mul(LISTING_ENTRY_BYTES)
        + FUSE_PROCESS_BYTES
}

impl PluginConfig {
    /// What one FUSE server with `budget` takes of the mounter's memory.
    fn fuse_server_memory(&self, budget: u64) -> u64 {
        budget.saturating_add(self.fuse_server_overhead)
    }
}

/// Whether the mounter's memory limit holds one more FUSE server of `budget` beside `staged`
/// (the budgets of the other staged volumes); the error says which value to raise.
pub fn check_mounter_memory(
    cfg: &PluginConfig,
    volume_id: &str,
    budget: u64,
    staged: &[u64],
) -> Result<(), String> {
    if cfg.mounter_memory == 0 {
        return Ok(());
    }
    let others: u64 = staged.iter().map(|b| cfg.fuse_server_memory(*b)).sum();
    let need = others.saturating_add(cfg.fuse_server_memory(budget));
    if need <= cfg.mounter_memory {
        return Ok(());
    }
    let b = bytesize::ByteSize;
    Err(format!(
        "volume {volume_id} needs {} of the mounter's memory (prefetchBudget {} plus {} per FUSE \
         server), and the {} volumes staged on this node already take {}: that is more than the \
         mounter's memory limit {}. Raise csi.mounter.resources.limits.memory, lower the \
         volume's prefetchBudget (or csi.prefetchBudget), or run the pod on another node",
        b(cfg.fuse_server_memory(budget)),
        b(budget),
        b(cfg.fuse_server_overhead),
        staged.len(),
        b(others),
        b(cfg.mounter_memory)
    ))
}

tokio::task_local! {
    /// The volume lock taken last by the operation running on this task (a CSI call, a repair
    /// pass), if it still holds it. A blocking call started under it keeps the lock until its
    /// thread ends: past the deadline the handler answers and lets go of its guard, but the
    /// thread (a bind mount, an unmount, a state write) runs on, and a retry must get `Aborted`
    /// rather than run beside it.
    static HELD: parking_lot::Mutex<Weak<Busy>>;
}

/// Runs `f` on the blocking pool, for at most `deadline`; past it the call is `Unavailable`
/// (the thread finishes on its own, holding the volume lock of the operation that started it,
/// see [`HELD`]). Every file and mount call of a handler that changes something goes through
/// here, so that none holds a thread of the gRPC runtime; looks into a cache mount go through
/// [`Plugin::look`], which holds no volume lock.
async fn blocking<T: Send + 'static>(
    what: &str,
    deadline: Duration,
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    let held = HELD.try_with(|h| h.lock().upgrade()).ok().flatten();
    blocking_holding(what, deadline, held, f).await
}

/// Runs `f` on the blocking pool within `deadline`; `held` (a lock guard) is dropped when the
/// thread ends, not when the caller gives up on it.
async fn blocking_holding<T: Send + 'static, G: Send + 'static>(
    what: &str,
    deadline: Duration,
    held: Option<G>,
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    let f = move || {
        let r = f();
        drop(held);
        r
    };
    match tokio::time::timeout(deadline, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(Status::internal(format!("{what}: {e}"))),
        Err(_) => Err(Status::unavailable(format!(
            "{what} did not finish within {}; the cache mount or its workers are slow, retry",
            humantime::format_duration(deadline)
        ))),
    }
}

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

fn required<'a>(v: &'a str, field: &str, rpc: &str) -> Result<&'a str, Status> {
    if v.is_empty() {
        Err(Status::invalid_argument(format!(
            "{rpc}: {field} is required"
        )))
    } else {
        Ok(v)
    }
}

/// Checks the capability: a filesystem, used read-only.
fn check_capability(cap: Option<&csi::VolumeCapability>, rpc: &str) -> Result<(), Status> {
    let cap = cap
        .ok_or_else(|| Status::invalid_argument(format!("{rpc}: volume_capability is required")))?;
    match &cap.access_type {
        Some(csi::volume_capability::AccessType::Mount(_)) => {}
        Some(csi::volume_capability::AccessType::Block(_)) => {
            return Err(Status::invalid_argument(format!(
                "{rpc}: lakecache volumes are filesystems; use volumeMode: Filesystem, not Block"
            )));
        }
        None => {
            return Err(Status::invalid_argument(format!(
                "{rpc}: volume_capability has no access type; ask for a mount volume"
            )));
        }
    }
    let mode = cap
        .access_mode
        .as_ref()
        .map(|m| m.mode())
        .unwrap_or(Mode::Unknown);
    match mode {
        Mode::MultiNodeMultiWriter | Mode::SingleNodeMultiWriter => {
            Err(Status::invalid_argument(format!(
                "{rpc}: lakecache volumes are read-only; use access mode ReadOnlyMany ({mode:?} was asked)"
            )))
        }
        Mode::Unknown => Err(Status::invalid_argument(format!(
            "{rpc}: volume_capability has no access mode; use ReadOnlyMany"
        ))),
        _ => Ok(()),
    }
}

fn context_error(rpc: &str, e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{rpc}: {e}"))
}

fn io_error(what: String, e: std::io::Error) -> Status {
    Status::internal(format!("{what}: {e}"))
}

impl Plugin {
    pub fn new(cfg: PluginConfig, state: StateDir) -> Self {
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
    fn busy(&self, volume_id: &str, rpc: &str) -> Result<Arc<Busy>, Status> {
        if !self.busy.lock().insert(volume_id.to_string()) {
            return Err(Status::aborted(format!(
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
        f: impl FnOnce() -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        blocking(what, self.cfg.fs_timeout, f).await
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
        f: impl FnOnce() -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        if !self.looks.lock().insert(volume_id.to_string()) {
            return Err(Status::unavailable(format!(
                "{what}: an earlier look into the cache mount of volume {volume_id} has not \
                 returned yet (its FUSE server may hang; the plugin is repairing it); retry"
            )));
        }
        let mark = Busy {
            set: self.looks.clone(),
            volume_id: volume_id.to_string(),
        };
        blocking_holding(what, self.cfg.fs_timeout, Some(mark), f).await
    }

    /// [`Plugin::look`] without the one-at-a-time rule, for looks bounded on their own (a
    /// [`mounts::health`] gives up on a `statfs` after [`mounts::HEALTH_TIMEOUT`]): the repair
    /// loop checks a volume's mounts while a publish still waits on them.
    async fn glance<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce() -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        blocking_holding(what, self.cfg.fs_timeout, None::<()>, f).await
    }

    async fn load(&self, volume_id: &str) -> Result<Option<VolumeRecord>, Status> {
        let (state, id) = (self.state.clone(), volume_id.to_string());
        self.fs("reading the volume's state", move || {
            state
                .load(&id)
                .map_err(|e| Status::internal(format!("reading the state of volume {id}: {e}")))
        })
        .await
    }

    async fn save(&self, rec: &VolumeRecord) -> Result<(), Status> {
        self.save_holding(rec, None::<()>).await
    }

    /// [`Plugin::save`], with `guard` dropped when the write ends (on its thread, even past
    /// the deadline), besides the volume's lock.
    async fn save_holding<G: Send + 'static>(
        &self,
        rec: &VolumeRecord,
        guard: Option<G>,
    ) -> Result<(), Status> {
        let (state, rec) = (self.state.clone(), rec.clone());
        self.fs("saving the volume's state", move || {
            #[cfg(test)]
            tests::slow_save(&rec.volume_id);
            let r = state.save(&rec).map_err(|e| {
                Status::internal(format!("saving the state of volume {}: {e}", rec.volume_id))
            });
            drop(guard);
            r
        })
        .await
    }

    async fn forget(&self, volume_id: &str) -> Result<(), Status> {
        let (state, id) = (self.state.clone(), volume_id.to_string());
        self.fs("removing the volume's state", move || {
            state
                .remove(&id)
                .map_err(|e| io_error(format!("removing the state of volume {id}"), e))
        })
        .await
    }

    /// Saves the record of a volume that is not staged yet, if the mounter's memory holds one
    /// more FUSE server with its budget (`ResourceExhausted` if not).
    async fn admit(&self, rec: &VolumeRecord, rpc: &str) -> Result<(), Status> {
        // The turn is held until the record is written, not until this call gives up on the
        // write: a save past the deadline goes on on its thread, and a volume admitted beside
        // it would not count this one. The next admission waits for it within the deadline.
        let turn = tokio::time::timeout(self.cfg.fs_timeout, self.admission.clone().lock_owned())
            .await
            .map_err(|_| {
                Status::unavailable(format!(
                    "{rpc}: the record of another volume staged on this node is still being \
                     written after {}; retry",
                    humantime::format_duration(self.cfg.fs_timeout)
                ))
            })?;
        let state = self.state.clone();
        let id = rec.volume_id.clone();
        let default = self.cfg.prefetch_budget;
        let staged: Vec<u64> = self
            .fs("reading the staged volumes", move || {
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
            .map_err(|m| Status::resource_exhausted(format!("{rpc}: {m}")))?;
        self.save_holding(rec, Some(turn)).await
    }

    /// Writes a volume's token file (mode 0600) when `token` differs from what it holds.
    /// Returns whether it wrote. The FUSE server reads the file again when it changes.
    async fn write_token(&self, volume_id: &str, token: &str) -> Result<bool, Status> {
        let path = self.state.token_path(volume_id);
        let dir = self.state.volume_dir(volume_id);
        let token = token.to_string();
        self.fs("writing the volume's token", move || {
            if std::fs::read(&path).is_ok_and(|old| old == token.as_bytes()) {
                return Ok(false);
            }
            std::fs::create_dir_all(&dir)
                .map_err(|e| io_error("creating the volume's state directory".into(), e))?;
            write_atomic(&path, token.as_bytes(), 0o600)
                .map_err(|e| io_error(format!("writing {}", path.display()), e))?;
            Ok(true)
        })
        .await
    }

    /// Times and counts one call, and logs its outcome.
    async fn observed<T>(
        &self,
        rpc: &'static str,
        volume_id: &str,
        f: impl Future<Output = Result<T, Status>>,
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
            Err(s) => {
                tracing::warn!(rpc, volume = volume_id, code = ?s.code(), message = s.message(), "failed")
            }
        }
        r.map(Response::new)
    }

    /// Writes the FUSE server's configuration and asks the mounter for a healthy mount. Whether
    /// a new FUSE server was started for it (a successor on the same connection or not).
    async fn ensure_fuse(
        &self,
        rec: &VolumeRecord,
        ctx: Option<(&VolumeContext, Option<&str>)>,
    ) -> Result<bool, Status> {
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
                serde_json::to_vec_pretty(&cfg).map_err(|e| Status::internal(e.to_string()))?;
            let dir = self.state.volume_dir(&rec.volume_id);
            let path = config_path.clone();
            self.fs("writing the FUSE server's configuration", move || {
                std::fs::create_dir_all(dir)
                    .map_err(|e| io_error("creating the volume's state directory".into(), e))?;
                write_atomic(&path, &json, 0o600)
                    .map_err(|e| io_error(format!("writing {}", path.display()), e))
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
                Status::unavailable(format!(
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
            .fs("removing the volume's local copies", move || {
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

    async fn stop_fuse(&self, rec: &VolumeRecord) -> Result<(), Status> {
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
                Status::unavailable("the mounter did not answer; is the mounter container running?")
            })?
            .map_err(|s| mounter_error(&rec.volume_id, s))?;
        Ok(())
    }

    async fn stage(
        &self,
        req: csi::NodeStageVolumeRequest,
    ) -> Result<csi::NodeStageVolumeResponse, Status> {
        const RPC: &str = "NodeStageVolume";
        let volume_id = required(&req.volume_id, "volume_id", RPC)?;
        let staging = required(&req.staging_target_path, "staging_target_path", RPC)?;
        check_capability(req.volume_capability.as_ref(), RPC)?;
        let ctx = VolumeContext::parse(&req.volume_context).map_err(|e| context_error(RPC, e))?;
        ctx.check_caps(&self.cfg.caps)
            .map_err(|e| context_error(RPC, e))?;
        let token = token_from_secrets(&req.secrets).map_err(|e| context_error(RPC, e))?;
        let _busy = self.busy(volume_id, RPC)?;
        let staging = PathBuf::from(staging);
        let existing = self.load(volume_id).await?;
        if let Some(rec) = &existing
            && rec.staging_path != staging
        {
            return Err(Status::already_exists(format!(
                "{RPC}: volume {volume_id} is already staged at {}; unstage it there first",
                rec.staging_path.display()
            )));
        }
        let rec = match &existing {
            Some(rec) => rec.clone(),
            None => {
                let rec = VolumeRecord {
                    volume_id: volume_id.to_string(),
                    staging_path: staging.clone(),
                    ephemeral: false,
                    namespace: ctx.namespace.clone(),
                    name: ctx.name.clone(),
                    targets: Default::default(),
                    prefetch_budget: Some(ctx.prefetch_budget.unwrap_or(self.cfg.prefetch_budget)),
                };
                self.admit(&rec, RPC).await?;
                rec
            }
        };
        match self.ensure_fuse(&rec, Some((&ctx, token))).await {
            Ok(_) => Ok(csi::NodeStageVolumeResponse {}),
            Err(e) => {
                if existing.is_none() {
                    let _ = self.forget(volume_id).await;
                }
                Err(e)
            }
        }
    }

    async fn unstage(
        &self,
        req: csi::NodeUnstageVolumeRequest,
    ) -> Result<csi::NodeUnstageVolumeResponse, Status> {
        const RPC: &str = "NodeUnstageVolume";
        let volume_id = required(&req.volume_id, "volume_id", RPC)?;
        let staging = PathBuf::from(required(
            &req.staging_target_path,
            "staging_target_path",
            RPC,
        )?);
        let _busy = self.busy(volume_id, RPC)?;
        let Some(mut rec) = self.load(volume_id).await? else {
            // Not ours (any more): make sure nothing of ours is left on the path.
            self.fs("unmounting the staging path", move || {
                if is_our_mount(&staging) {
                    mounts::unmount_all(&staging)
                        .map_err(|e| io_error(format!("unmounting {}", staging.display()), e))?;
                }
                Ok(())
            })
            .await?;
            return Ok(csi::NodeUnstageVolumeResponse {});
        };
        if rec.staging_path != staging {
            return Err(Status::invalid_argument(format!(
                "{RPC}: volume {volume_id} is staged at {}, not at {}",
                rec.staging_path.display(),
                staging.display()
            )));
        }
        let targets: Vec<PathBuf> = rec.targets.keys().cloned().collect();
        let gone: Vec<PathBuf> = self
            .fs("checking the published targets", move || {
                Ok(targets
                    .into_iter()
                    .filter(|t| !mounts::is_mount_point(t).unwrap_or(true))
                    .collect())
            })
            .await?;
        rec.targets.retain(|t, _| !gone.contains(t));
        if !rec.targets.is_empty() {
            let list: Vec<_> = rec
                .targets
                .keys()
                .map(|t| t.display().to_string())
                .collect();
            self.save(&rec).await?;
            return Err(Status::failed_precondition(format!(
                "{RPC}: volume {volume_id} is still published at {}; unpublish those first",
                list.join(", ")
            )));
        }
        self.stop_fuse(&rec).await?;
        self.drop_local_copies(volume_id).await;
        self.forget(volume_id).await?;
        Ok(csi::NodeUnstageVolumeResponse {})
    }

    async fn publish(
        &self,
        req: csi::NodePublishVolumeRequest,
    ) -> Result<csi::NodePublishVolumeResponse, Status> {
        const RPC: &str = "NodePublishVolume";
        let volume_id = required(&req.volume_id, "volume_id", RPC)?;
        let target = PathBuf::from(required(&req.target_path, "target_path", RPC)?);
        check_capability(req.volume_capability.as_ref(), RPC)?;
        let ctx = VolumeContext::parse(&req.volume_context).map_err(|e| context_error(RPC, e))?;
        ctx.check_pod_namespace()
            .map_err(|e| Status::permission_denied(format!("{RPC}: {e}")))?;
        ctx.check_caps(&self.cfg.caps)
            .map_err(|e| context_error(RPC, e))?;
        let token = token_from_secrets(&req.secrets).map_err(|e| context_error(RPC, e))?;
        let _busy = self.busy(volume_id, RPC)?;

        let mut rec = match self.load(volume_id).await? {
            Some(rec) => rec,
            None if ctx.ephemeral => {
                let rec = VolumeRecord {
                    volume_id: volume_id.to_string(),
                    staging_path: self.state.volume_dir(volume_id).join("mnt"),
                    ephemeral: true,
                    namespace: ctx.namespace.clone(),
                    name: ctx.name.clone(),
                    targets: Default::default(),
                    prefetch_budget: Some(ctx.prefetch_budget.unwrap_or(self.cfg.prefetch_budget)),
                };
                self.admit(&rec, RPC).await?;
                if let Err(e) = self.ensure_fuse(&rec, Some((&ctx, token))).await {
                    let _ = self.forget(volume_id).await;
                    return Err(e);
                }
                rec
            }
            None => {
                required(&req.staging_target_path, "staging_target_path", RPC)?;
                return Err(Status::not_found(format!(
                    "{RPC}: volume {volume_id} is not staged on this node; NodeStageVolume must come first"
                )));
            }
        };
        if !rec.ephemeral {
            let staging = required(&req.staging_target_path, "staging_target_path", RPC)?;
            if rec.staging_path != Path::new(staging) {
                return Err(Status::invalid_argument(format!(
                    "{RPC}: volume {volume_id} is staged at {}, not at {staging}",
                    rec.staging_path.display()
                )));
            }
        }
        if (rec.namespace.as_str(), rec.name.as_str())
            != (ctx.namespace.as_str(), ctx.name.as_str())
        {
            return Err(Status::invalid_argument(format!(
                "{RPC}: volume {volume_id} was staged for CacheNamespace {}/{}, but this request names {}/{}",
                rec.namespace, rec.name, ctx.namespace, ctx.name
            )));
        }
        // kubelet publishes again and again (`requiresRepublish`) with the current token of the
        // publish secret: a rotated token replaces the one the FUSE server uses, which follows
        // its token file without a restart.
        if let Some(token) = token
            && self.write_token(volume_id, token).await?
        {
            tracing::info!(
                volume = volume_id,
                "the data-plane token changed; the FUSE server takes the new one"
            );
        }
        if let Some(t) = rec.targets.get(&target)
            && t.sub_path != ctx.sub_path
        {
            return Err(Status::already_exists(format!(
                "{RPC}: {} already shows subPath {:?} of volume {volume_id}; unpublish it first",
                target.display(),
                t.sub_path
            )));
        }
        let source = rec.staging_path.join(&ctx.sub_path);
        let published = rec.targets.contains_key(&target);
        let (t, src, sub) = (target.clone(), source.clone(), ctx.sub_path.clone());
        let (ns, name, vid) = (
            ctx.namespace.clone(),
            ctx.name.clone(),
            volume_id.to_string(),
        );
        // A look into the cache mount asks the workers (a listing): bounded by the deadline,
        // and without the volume's lock, which a hung FUSE server would otherwise keep.
        let done = self
            .look(volume_id, "looking at the cache mount", move || {
                if published && mounts::health(&t) == Health::Healthy {
                    return Ok(true);
                }
                match std::fs::metadata(&src) {
                    Ok(m) if m.is_dir() => Ok(false),
                    Ok(_) => Err(Status::invalid_argument(format!(
                        "{RPC}: subPath {sub:?} of CacheNamespace {ns}/{name} is a file; name a directory"
                    ))),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Status::not_found(format!(
                        "{RPC}: subPath {sub:?} does not exist in CacheNamespace {ns}/{name}; check volumeAttributes.subPath"
                    ))),
                    Err(e) => Err(Status::unavailable(format!(
                        "{RPC}: the cache mount of volume {vid} does not answer ({e}); the plugin is repairing it, retry"
                    ))),
                }
            })
            .await?;
        if done {
            return Ok(csi::NodePublishVolumeResponse {});
        }
        let t = target.clone();
        self.fs("binding the cache to the target", move || {
            std::fs::create_dir_all(&t)
                .map_err(|e| io_error(format!("{RPC}: creating {}", t.display()), e))?;
            if mounts::is_mount_point(&t).unwrap_or(false) {
                mounts::unmount_all(&t)
                    .map_err(|e| io_error(format!("{RPC}: clearing {}", t.display()), e))?;
            }
            mounts::bind_read_only(&source, &t).map_err(|e| io_error(RPC.into(), e))
        })
        .await?;
        rec.targets.insert(
            target,
            TargetRecord {
                sub_path: ctx.sub_path.clone(),
            },
        );
        self.save(&rec).await?;
        Ok(csi::NodePublishVolumeResponse {})
    }

    async fn unpublish(
        &self,
        req: csi::NodeUnpublishVolumeRequest,
    ) -> Result<csi::NodeUnpublishVolumeResponse, Status> {
        const RPC: &str = "NodeUnpublishVolume";
        let volume_id = required(&req.volume_id, "volume_id", RPC)?;
        let target = PathBuf::from(required(&req.target_path, "target_path", RPC)?);
        let _busy = self.busy(volume_id, RPC)?;
        let rec = self.load(volume_id).await?;
        let ours = rec
            .as_ref()
            .is_some_and(|r| r.targets.contains_key(&target));
        let t = target.clone();
        self.fs("unmounting the target", move || {
            if ours || is_our_mount(&t) {
                mounts::unmount_all(&t)
                    .map_err(|e| io_error(format!("{RPC}: unmounting {}", t.display()), e))?;
            }
            match std::fs::remove_dir(&t) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io_error(format!("{RPC}: removing {}", t.display()), e)),
            }
        })
        .await?;
        if let Some(mut rec) = rec {
            rec.targets.remove(&target);
            if rec.ephemeral && rec.targets.is_empty() {
                self.stop_fuse(&rec).await?;
                self.drop_local_copies(volume_id).await;
                self.forget(volume_id).await?;
            } else {
                self.save(&rec).await?;
            }
        }
        Ok(csi::NodeUnpublishVolumeResponse {})
    }

    async fn stats(
        &self,
        req: csi::NodeGetVolumeStatsRequest,
    ) -> Result<csi::NodeGetVolumeStatsResponse, Status> {
        const RPC: &str = "NodeGetVolumeStats";
        let volume_id = required(&req.volume_id, "volume_id", RPC)?;
        let path = PathBuf::from(required(&req.volume_path, "volume_path", RPC)?);
        let Some(rec) = self.load(volume_id).await? else {
            return Err(Status::not_found(format!(
                "{RPC}: volume {volume_id} is not staged or published on this node"
            )));
        };
        if rec.staging_path != path && !rec.targets.contains_key(&path) {
            return Err(Status::not_found(format!(
                "{RPC}: volume {volume_id} is not staged or published at {}",
                path.display()
            )));
        }
        let (usage, condition) = self
            .look(volume_id, "looking at the mount", move || {
                Ok(match mounts::health(&path) {
                    Health::Healthy => match mounts::usage(&path) {
                        Ok(u) => (
                            vec![
                                csi::VolumeUsage {
                                    available: u.bytes_available as i64,
                                    total: u.bytes_total as i64,
                                    used: u.bytes_used as i64,
                                    unit: csi::volume_usage::Unit::Bytes as i32,
                                },
                                csi::VolumeUsage {
                                    available: u.inodes_free as i64,
                                    total: u.inodes_total as i64,
                                    used: u.inodes_used as i64,
                                    unit: csi::volume_usage::Unit::Inodes as i32,
                                },
                            ],
                            csi::VolumeCondition {
                                abnormal: false,
                                message: "the cache mount answers".into(),
                            },
                        ),
                        Err(e) => (vec![], abnormal(format!("statfs failed: {e}"))),
                    },
                    Health::NotMounted => (
                        vec![],
                        abnormal("not mounted; the plugin will mount it again".into()),
                    ),
                    Health::Broken(m) => {
                        (vec![], abnormal(format!("{m}; the plugin will repair it")))
                    }
                })
            })
            .await?;
        Ok(csi::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(condition),
        })
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

    /// Finds every recorded mount and repairs the broken ones. Returns how many repairs it made.
    ///
    /// The list of volumes is read without any volume's lock, and a pass waits on the mounter
    /// for each volume in turn: by the time a volume's turn comes, a CSI call may have
    /// published or unpublished a target of it, or unstaged it. So each volume's record is read
    /// again once its lock is held, and a volume whose record is gone is left alone; repairing
    /// the listed copy would write it back over the newer one (dropping a new target) or mount
    /// an unstaged volume again.
    pub async fn repair_all(&self) -> usize {
        HELD.scope(Default::default(), self.repair_pass()).await
    }

    async fn repair_pass(&self) -> usize {
        let mut repaired = 0;
        let state = self.state.clone();
        let all = match self
            .fs("listing the volumes", move || Ok(state.all()))
            .await
        {
            Ok(all) => all,
            Err(e) => {
                tracing::warn!(message = e.message(), "cannot list the volumes; will retry");
                return 0;
            }
        };
        for rec in all {
            let volume_id = match rec {
                Ok(r) => r.volume_id,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read a volume's state; leaving it alone");
                    continue;
                }
            };
            let Ok(_busy) = self.busy(&volume_id, "repair") else {
                continue;
            };
            let rec = match self.load(&volume_id).await {
                Ok(Some(r)) => r,
                Ok(None) => {
                    tracing::debug!(volume = %volume_id, "unstaged during the repair pass");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(volume = %volume_id, message = e.message(), "cannot read a volume's state; leaving it alone");
                    continue;
                }
            };
            repaired += self.repair(rec).await;
        }
        repaired
    }

    /// Repairs one volume's FUSE mount and targets. `rec` must have been read under the
    /// volume's lock, which the caller holds until this returns: it is written back when a
    /// target is forgotten.
    async fn repair(&self, mut rec: VolumeRecord) -> usize {
        let vid = rec.volume_id.clone();
        let mut repaired = 0;
        let path = rec.staging_path.clone();
        let health = self
            .glance("checking the cache mount", move || {
                Ok(mounts::health(&path))
            })
            .await
            .unwrap_or_else(|e| Health::Broken(e.message().to_string()));
        if health != Health::Healthy {
            tracing::warn!(volume = %vid, path = %rec.staging_path.display(), ?health, "the cache mount is broken; repairing");
        }
        // The mounter is asked either way: it also restarts a server that died while its
        // mount still looked fine.
        match self.ensure_fuse(&rec, None).await {
            Ok(true) => {
                repaired += 1;
                self.metrics.repair("fuse");
                tracing::warn!(volume = %vid, path = %rec.staging_path.display(), "repaired: a new FUSE server serves the cache mount");
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(volume = %vid, code = ?e.code(), message = e.message(), "cannot repair the cache mount; will retry");
                return repaired;
            }
        }
        let mut changed = false;
        let targets: Vec<_> = rec
            .targets
            .iter()
            .map(|(p, t)| (p.clone(), t.clone()))
            .collect();
        for (target, t) in targets {
            let p = target.clone();
            // Whether the path exists matters only when nothing is mounted on it: a stat of a
            // mounted target would ask its FUSE server.
            let looked = self
                .glance("checking a target", move || {
                    let health = mounts::health(&p);
                    let exists = health != Health::NotMounted || p.exists();
                    Ok((health, exists))
                })
                .await;
            let (health, exists) = match looked {
                Ok(found) => found,
                Err(e) => {
                    tracing::warn!(volume = %vid, target = %target.display(), message = e.message(), "cannot check a target; will retry");
                    continue;
                }
            };
            match health {
                Health::Healthy => continue,
                Health::NotMounted if !exists => {
                    tracing::info!(volume = %vid, target = %target.display(), "the target path is gone; forgetting it");
                    rec.targets.remove(&target);
                    changed = true;
                    continue;
                }
                h => {
                    tracing::warn!(volume = %vid, target = %target.display(), health = ?h, "a published target is broken; repairing")
                }
            }
            let source = rec.staging_path.join(&t.sub_path);
            // The new bind goes on top of the dead one, not in its place: a pod's container
            // holds a copy of the target mount (a slave of its peer group, with
            // `mountPropagation: HostToContainer`), and only mounts made *on* that mount reach
            // the copy. Unmounting the target first would take the pod's copy away and put the
            // new mount where no copy follows it (found on a real kubelet). Each repair stacks
            // one dead mount under the live one; unpublish unmounts the whole stack, and past
            // MAX_STACKED repairs of one target the stack is cleared first.
            let p = target.clone();
            let r = self
                .fs("binding a target again", move || {
                    Ok(if mounts::mount_count(&p).unwrap_or(0) >= MAX_STACKED {
                        mounts::unmount_all(&p).and_then(|_| mounts::bind_read_only(&source, &p))
                    } else {
                        mounts::bind_read_only(&source, &p)
                    })
                })
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.message().to_string())));
            match r {
                Ok(()) => {
                    repaired += 1;
                    self.metrics.repair("target");
                    tracing::warn!(volume = %vid, target = %target.display(), "repaired: the target shows the cache again");
                }
                Err(e) => {
                    tracing::error!(volume = %vid, target = %target.display(), error = %e, "cannot repair the target; will retry")
                }
            }
        }
        if changed && let Err(e) = self.save(&rec).await {
            tracing::warn!(volume = %vid, message = e.message(), "cannot save the volume's state");
        }
        repaired
    }

    pub fn volumes(&self) -> usize {
        self.state.all().len()
    }
}

/// How many mounts may stack on one target before a repair clears the stack instead (pods then
/// see the new mount only after a restart). `mounts::unmount_all` removes up to 16.
const MAX_STACKED: usize = 8;

fn abnormal(message: String) -> csi::VolumeCondition {
    csi::VolumeCondition {
        abnormal: true,
        message,
    }
}

/// The mounter's error, with the volume named. A status that the mounter sent keeps its code and
/// message (a bad token or unreachable workers already say what to fix); one that tonic made
/// because the mounter's socket did not answer carries its transport error as its source, and
/// says to look at the mounter container.
fn mounter_error(volume_id: &str, s: Status) -> Status {
    if std::error::Error::source(&s).is_some() {
        return Status::unavailable(format!(
            "cannot reach the mounter for volume {volume_id} ({}); is the mounter container running?",
            s.message()
        ));
    }
    Status::new(s.code(), format!("volume {volume_id}: {}", s.message()))
}

/// Whether `path` holds a lakecache FUSE mount (or a bind of one).
fn is_our_mount(path: &Path) -> bool {
    let Ok(table) = mounts::mount_table() else {
        return false;
    };
    table
        .iter()
        .any(|m| m.mount_point == path && m.is_lakecache())
}

/// The CSI services, sharing one plugin.
#[derive(Clone)]
pub struct Services(pub Arc<Plugin>);

#[tonic::async_trait]
impl Identity for Services {
    async fn get_plugin_info(
        &self,
        _req: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: DRIVER_NAME.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: HashMap::new(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _req: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        // Node-only: no CONTROLLER_SERVICE.
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities: vec![],
        }))
    }

    async fn probe(
        &self,
        _req: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        let ready = match self.0.can_mount().await {
            Ok(()) => true,
            Err(why) => {
                tracing::warn!(%why, "probe: not ready");
                false
            }
        };
        Ok(Response::new(csi::ProbeResponse { ready: Some(ready) }))
    }
}

#[tonic::async_trait]
impl Node for Services {
    async fn node_stage_volume(
        &self,
        req: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let req = req.into_inner();
        let vid = req.volume_id.clone();
        self.0
            .observed("NodeStageVolume", &vid, self.0.stage(req))
            .await
    }

    async fn node_unstage_volume(
        &self,
        req: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let req = req.into_inner();
        let vid = req.volume_id.clone();
        self.0
            .observed("NodeUnstageVolume", &vid, self.0.unstage(req))
            .await
    }

    async fn node_publish_volume(
        &self,
        req: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let req = req.into_inner();
        let vid = req.volume_id.clone();
        self.0
            .observed("NodePublishVolume", &vid, self.0.publish(req))
            .await
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let req = req.into_inner();
        let vid = req.volume_id.clone();
        self.0
            .observed("NodeUnpublishVolume", &vid, self.0.unpublish(req))
            .await
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let req = req.into_inner();
        let vid = req.volume_id.clone();
        self.0
            .observed("NodeGetVolumeStats", &vid, self.0.stats(req))
            .await
    }

    async fn node_expand_volume(
        &self,
        _req: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "lakecache volumes are read-only caches and cannot be expanded",
        ))
    }

    async fn node_get_capabilities(
        &self,
        _req: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        let caps = [
            RpcType::StageUnstageVolume,
            RpcType::GetVolumeStats,
            RpcType::VolumeCondition,
        ]
        .into_iter()
        .map(|t| csi::NodeServiceCapability {
            r#type: Some(csi::node_service_capability::Type::Rpc(
                csi::node_service_capability::Rpc { r#type: t as i32 },
            )),
        })
        .collect();
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities: caps,
        }))
    }

    async fn node_get_info(
        &self,
        _req: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        let node = &self.0.cfg.node_id;
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: node.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(csi::Topology {
                segments: HashMap::from([(TOPOLOGY_KEY.to_string(), node.clone())]),
            }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lakecache_proto::lakecache::v1::mounter_server::{Mounter, MounterServer};
    use lakecache_proto::lakecache::v1::{ListMountsResponse, MountResponse, UnmountResponse};

    type Meanwhile = Box<dyn FnOnce(&str) + Send>;

    /// A mounter that records the volumes it was asked to mount and, at the first request, runs
    /// `meanwhile` with that request's volume id: a CSI call on another volume that lands while
    /// the repair loop waits for the mounter.
    struct FakeMounter {
        mounted: Arc<parking_lot::Mutex<Vec<String>>>,
        meanwhile: parking_lot::Mutex<Option<Meanwhile>>,
    }

    #[tonic::async_trait]
    impl Mounter for FakeMounter {
        async fn mount(
            &self,
            req: Request<MountRequest>,
        ) -> Result<Response<MountResponse>, Status> {
            let volume_id = req.into_inner().volume_id;
            let meanwhile = self.meanwhile.lock().take();
            if let Some(f) = meanwhile {
                f(&volume_id);
            }
            self.mounted.lock().push(volume_id);
            Ok(Response::new(MountResponse {
                pid: 1,
                started: false,
                took_over: false,
            }))
        }

        async fn unmount(
            &self,
            _: Request<UnmountRequest>,
        ) -> Result<Response<UnmountResponse>, Status> {
            Ok(Response::new(UnmountResponse {}))
        }

        async fn list_mounts(
            &self,
            _: Request<ListMountsRequest>,
        ) -> Result<Response<ListMountsResponse>, Status> {
            Ok(Response::new(ListMountsResponse::default()))
        }
    }

    /// Two staged volumes, `a` and `b`, each with one target whose path is gone (so a repair
    /// rewrites its record), a plugin over them and a fake mounter that runs `meanwhile` with
    /// the volume it is first asked about. Returns the plugin, its state and the volumes the
    /// mounter was asked to mount.
    async fn two_volumes(
        root: &Path,
        meanwhile: impl FnOnce(&StateDir, &str) + Send + 'static,
    ) -> (Plugin, StateDir, Arc<parking_lot::Mutex<Vec<String>>>) {
        let state = StateDir::open(&root.join("state")).unwrap();
        for v in ["a", "b"] {
            let mut rec = VolumeRecord {
                volume_id: v.into(),
                staging_path: root.join(v).join("globalmount"),
                ephemeral: false,
                namespace: "ml".into(),
                name: "imagenet".into(),
                targets: Default::default(),
                prefetch_budget: None,
            };
            rec.targets.insert(
                root.join(v).join("gone"),
                TargetRecord {
                    sub_path: String::new(),
                },
            );
            state.save(&rec).unwrap();
        }
        let mounted = Arc::new(parking_lot::Mutex::new(vec![]));
        let other = state.clone();
        let fake = FakeMounter {
            mounted: mounted.clone(),
            meanwhile: parking_lot::Mutex::new(Some(Box::new(move |v: &str| meanwhile(&other, v)))),
        };
        let listener = tokio::net::UnixListener::bind(state.mounter_socket()).unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(MounterServer::new(fake))
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
        );
        let cfg = PluginConfig {
            node_id: "node-1".into(),
            prefetch_budget: 0,
            fuse_threads: 1,
            local_cache_dir: None,
            local_cache_size: 0,
            startup_timeout: Duration::from_secs(1),
            mounter_timeout: Duration::from_secs(5),
            caps: Caps::default(),
            mounter_memory: 0,
            fuse_server_overhead: 0,
            listing_budget: DEFAULT_LISTING_BUDGET,
            block_transport: true,
            fs_timeout: Duration::from_secs(5),
        };
        (Plugin::new(cfg, state.clone()), state, mounted)
    }

    fn config(mounter_memory: u64, overhead: u64) -> PluginConfig {
        PluginConfig {
            node_id: "n".into(),
            prefetch_budget: 0,
            fuse_threads: 1,
            local_cache_dir: None,
            local_cache_size: 0,
            startup_timeout: Duration::from_secs(1),
            mounter_timeout: Duration::from_secs(1),
            caps: Caps::default(),
            mounter_memory,
            fuse_server_overhead: overhead,
            listing_budget: DEFAULT_LISTING_BUDGET,
            block_transport: true,
            fs_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn the_default_overhead_covers_the_reserve_the_copy_queue_and_the_listings() {
        const MIB: u64 = 1 << 20;
        let o = fuse_server_overhead(DEFAULT_LISTING_BUDGET);
        assert_eq!(o, 64 * MIB + 32 * MIB + 200_000 * 256 + 32 * MIB);
        assert_eq!(o / MIB, 176, "about 177 MiB");
        assert!(fuse_server_overhead(2_000_000) > 550 * MIB);
    }

    #[test]
    fn the_mounters_memory_holds_the_staged_budgets_and_an_overhead_each() {
        const MIB: u64 = 1 << 20;
        let cfg = config(100 * MIB, 10 * MIB);
        check_mounter_memory(&cfg, "v", 90 * MIB, &[]).unwrap();
        check_mounter_memory(&cfg, "v", 20 * MIB, &[60 * MIB]).unwrap();
        let e = check_mounter_memory(&cfg, "v", 21 * MIB, &[60 * MIB]).unwrap_err();
        assert!(e.contains("csi.mounter.resources.limits.memory"), "{e}");
        assert!(e.contains("prefetchBudget"), "{e}");
        // The overhead counts for every server, even with no budget.
        let e = check_mounter_memory(&cfg, "v", 0, &[0; 10]).unwrap_err();
        assert!(e.contains("10 volumes"), "{e}");
        // Unknown limit: no check.
        check_mounter_memory(&config(0, MIB), "v", u64::MAX / 2, &[u64::MAX / 2]).unwrap();
    }

    #[tokio::test]
    async fn a_blocking_call_past_its_deadline_is_unavailable_and_frees_the_handler() {
        let started = Instant::now();
        let e = blocking(
            "looking at the cache mount",
            Duration::from_millis(100),
            || {
                std::thread::sleep(Duration::from_secs(2));
                Ok(())
            },
        )
        .await
        .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(e.code(), Code::Unavailable);
        assert!(e.message().contains("looking at the cache mount"), "{e:?}");
        assert_eq!(
            blocking("x", Duration::from_secs(1), || Ok(7))
                .await
                .unwrap(),
            7
        );
    }

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
                    .look("v", "looking at the cache mount", move || {
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
                    .look("v", "looking at the cache mount", || Ok(()))
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
                .fs("binding", || {
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
        plugin.look("v", "x", || Ok(())).await.unwrap();
        plugin.busy("w", "x").unwrap();
    }

    fn other(volume_id: &str) -> &'static str {
        if volume_id == "a" { "b" } else { "a" }
    }

    #[tokio::test]
    async fn a_target_published_during_a_repair_pass_is_kept() {
        // The published target must be left alone by the repair, so it is a path that is
        // mounted and answers; make sure /proc is one here before the plugin may act on it.
        let published = PathBuf::from("/proc");
        assert_eq!(mounts::health(&published), Health::Healthy);
        let root = tempfile::tempdir().unwrap();
        let p = published.clone();
        let (plugin, state, _) = two_volumes(root.path(), move |state, v| {
            let mut rec = state.load(other(v)).unwrap().unwrap();
            rec.targets.insert(
                p,
                TargetRecord {
                    sub_path: String::new(),
                },
            );
            state.save(&rec).unwrap();
        })
        .await;
        plugin.repair_all().await;
        for v in ["a", "b"] {
            let rec = state.load(v).unwrap().unwrap();
            let gone = root.path().join(v).join("gone");
            assert!(!rec.targets.contains_key(&gone), "{v}: {rec:?}");
        }
        let published_to: Vec<_> = ["a", "b"]
            .into_iter()
            .filter(|v| {
                state
                    .load(v)
                    .unwrap()
                    .unwrap()
                    .targets
                    .contains_key(&published)
            })
            .collect();
        assert_eq!(
            published_to.len(),
            1,
            "the target published meanwhile is still recorded"
        );
    }

    #[tokio::test]
    async fn a_volume_unstaged_during_a_repair_pass_is_not_mounted_again() {
        let root = tempfile::tempdir().unwrap();
        let (plugin, state, mounted) = two_volumes(root.path(), |state, v| {
            state.remove(other(v)).unwrap();
        })
        .await;
        plugin.repair_all().await;
        let mounted = mounted.lock().clone();
        assert_eq!(mounted.len(), 1, "mounted: {mounted:?}");
        let left: Vec<_> = state
            .all()
            .into_iter()
            .map(|r| r.unwrap().volume_id)
            .collect();
        assert_eq!(
            left, mounted,
            "the unstaged volume's record is not written back"
        );
    }
}
