//! The lakecache CSI node plugin (`csi.lakecache.io`).
//!
//! Four roles in one binary, in three containers of the node DaemonSet pod:
//! - **plugin** ([`node`]): the CSI Identity and Node services on kubelet's unix socket. It keeps
//!   its state in a directory ([`state`]), binds the cache into pods, and repairs broken mounts at
//!   start and then periodically.
//! - **mounter** ([`mounter`]): hosts the FUSE servers, in the sidecar container, so a restart of
//!   the plugin never takes a mount down.
//! - **fuse-server** ([`fuse_server`]): one process per staged volume, serving the cache through
//!   FUSE; started by the mounter.
//! - **registrar** ([`registrar`]): tells kubelet where the plugin's socket is, through kubelet's
//!   plugin registration API (the `node-driver-registrar` container).
//!
//! [`handoff`] keeps every FUSE connection alive across restarts of these processes. Its one
//! unsafe line takes ownership of a descriptor received over a unix socket.
#![deny(unsafe_code)]

pub mod fuse_metrics;
pub mod fuse_server;
pub mod handoff;
pub mod kube_members;
pub mod metrics;
pub mod mounter;
pub mod mounts;
pub mod node;
pub mod registrar;
pub mod roll;
pub mod state;
pub mod volume;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use lakecache_proto::csi::v1::identity_server::IdentityServer;
use lakecache_proto::csi::v1::node_server::NodeServer;
use lakecache_proto::lakecache::v1::mounter_client::MounterClient;
use lakecache_telemetry::{AdminServer, Readiness, Registry};
use tokio::net::UnixListener;
use tonic::transport::{Channel, Endpoint};

/// The CSI driver name (the operator writes it into PersistentVolumes).
pub use lakecache_api::CSI_DRIVER;

/// The build's tag: a fixed-width literal, so that a test can make a copy of the binary that
/// is another build (another version string) without compiling one.
macro_rules! build_tag {
    () => {
        "lakecache-build-0000"
    };
}

/// What `--version` and a starting FUSE server say.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", build_tag!(), ")");
/// The topology key NodeGetInfo reports, with the node name as its value.
pub const TOPOLOGY_KEY: &str = "topology.lakecache.io/node";

/// The path of a `unix://` endpoint (`unix:///csi/csi.sock` or a plain path).
pub fn socket_path(endpoint: &str) -> anyhow::Result<PathBuf> {
    let p = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    anyhow::ensure!(
        p.starts_with('/'),
        "endpoint {endpoint:?} must be unix:///absolute/path"
    );
    Ok(PathBuf::from(p))
}

/// Why a unix socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("cannot create the directory {}", .dir.display())]
    CreateDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot remove the stale socket {}", .path.display())]
    RemoveStale {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} exists and is not a socket: remove it or choose another path", .path.display())]
    NotASocket { path: PathBuf },
    #[error("cannot listen on {}", .path.display())]
    Listen {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Binds a unix socket, replacing a stale socket file left by an earlier process.
pub fn bind_unix(path: &Path) -> Result<UnixListener, BindError> {
    use std::os::unix::fs::FileTypeExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| BindError::CreateDir {
            dir: dir.to_path_buf(),
            source,
        })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| BindError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })?
        }
        Ok(_) => {
            return Err(BindError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        Err(_) => {}
    }
    UnixListener::bind(path).map_err(|source| BindError::Listen {
        path: path.to_path_buf(),
        source,
    })
}

/// A lazily connecting gRPC channel to a unix socket; each connection attempt gives up after
/// `connect_timeout`.
pub fn unix_channel(socket: &Path, connect_timeout: Duration) -> Channel {
    let socket = socket.to_path_buf();
    // The URI is required by tonic but unused: the connector dials the socket.
    Endpoint::from_static("http://unix.invalid")
        .connect_timeout(connect_timeout)
        .connect_with_connector_lazy(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                let s = tokio::net::UnixStream::connect(&socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
}

/// A lazily connecting client of the mounter's socket.
pub fn mounter_client(socket: &Path) -> MounterClient<Channel> {
    MounterClient::new(unix_channel(socket, Duration::from_secs(3)))
}

/// Settings of the plugin process.
#[derive(Debug, Clone)]
pub struct PluginOptions {
    pub endpoint: PathBuf,
    pub state_dir: PathBuf,
    /// The state directory of earlier versions, whose volumes are moved to `state_dir`.
    pub legacy_state_dir: Option<PathBuf>,
    pub admin_listen: std::net::SocketAddr,
    pub repair_interval: Duration,
    pub plugin: node::PluginConfig,
}

/// A running plugin: its socket, its admin server and its repair loop.
pub struct RunningPlugin {
    pub plugin: Arc<node::Plugin>,
    pub admin: AdminServer,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl RunningPlugin {
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let mut tasks = std::mem::take(&mut self.tasks);
        let server = tasks.pop();
        for t in tasks {
            t.abort();
        }
        if let Some(server) = server {
            let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        }
        self.admin.stop();
    }
}

/// Starts the plugin: repairs what it finds, then serves CSI on the endpoint.
pub async fn start_plugin(opts: PluginOptions) -> anyhow::Result<RunningPlugin> {
    let state = state::StateDir::open(&opts.state_dir)
        .with_context(|| format!("opening the state directory {}", opts.state_dir.display()))?;
    // Volumes staged before the state directory moved are repaired and unstaged from here.
    if let Some(legacy) = &opts.legacy_state_dir {
        let moved = state.adopt_legacy(legacy).with_context(|| {
            format!(
                "moving the volumes staged in {} to {}",
                legacy.display(),
                opts.state_dir.display()
            )
        })?;
        for volume in moved {
            tracing::warn!(%volume, from = %legacy.display(), "took over a volume staged in the old state directory");
        }
    }
    // Tokens and the mounter's socket must be the plugin's alone, whatever left them.
    let fixed = state.enforce_modes().with_context(|| {
        format!(
            "making the state directory {} private",
            opts.state_dir.display()
        )
    })?;
    for path in fixed {
        tracing::warn!(path = %path.display(), "was readable by others; made private");
    }
    let plugin = Arc::new(node::Plugin::new(opts.plugin.clone(), state));
    plugin.keep_all().await;
    let mut registry = Registry::with_prefix("lakecache_csi");
    plugin.metrics.register(&mut registry);
    let ready = Readiness::default();
    // The FUSE servers' own metrics, with a volume label (see `fuse_metrics`).
    let snapshots = state::StateDir::open(&opts.state_dir)?;
    let extra: lakecache_telemetry::ExtraMetrics =
        Arc::new(move || fuse_metrics::gather(&snapshots));
    let admin = AdminServer::start_with(
        opts.admin_listen,
        Arc::new(parking_lot::Mutex::new(registry)),
        ready.clone(),
        Some(extra),
    )
    .await?;

    let repairer = plugin.clone();
    let interval = opts.repair_interval;
    let repair = tokio::spawn(async move {
        // Bounded by the process's life; one pass per interval.
        loop {
            match repairer.can_mount().await {
                Ok(()) => {
                    ready.set_ready(true);
                    let n = repairer.repair_all().await;
                    if n > 0 {
                        tracing::warn!(repairs = n, "repair pass done");
                    }
                }
                Err(why) => {
                    ready.set_ready(false);
                    tracing::warn!(%why, "cannot mount; repair waits");
                }
            }
            tokio::time::sleep(interval).await;
        }
    });

    let listener = bind_unix(&opts.endpoint)?;
    tracing::info!(endpoint = %opts.endpoint.display(), node = %opts.plugin.node_id, admin = %admin.addr, "CSI plugin listening");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let services = node::Services(plugin.clone());
    let server = tokio::spawn(async move {
        let r = tonic::transport::Server::builder()
            .add_service(IdentityServer::new(services.clone()))
            .add_service(NodeServer::new(services))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                async {
                    let _ = rx.await;
                },
            )
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "CSI server stopped");
        }
    });
    Ok(RunningPlugin {
        plugin,
        admin,
        tasks: vec![repair, server],
        shutdown: Some(tx),
    })
}
