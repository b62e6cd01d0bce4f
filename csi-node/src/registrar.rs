//! The registrar: tells kubelet where the CSI plugin's socket is.
//!
//! kubelet does not look for CSI drivers; it waits to be told. Its plugin watcher watches
//! `<kubelet-root>/plugins_registry/` for new unix sockets, dials each one and calls the
//! `pluginregistration.Registration` service on it: `GetInfo` ("what are you, and where is your
//! API?"), then `NotifyRegistrationStatus` ("I took you" or "I did not, because …"). Recent
//! kubelets then call `GetInfo` every 10 s to see that the plugin is still there. Removing the
//! socket unregisters the plugin; a socket created anew (by a restarted registrar) registers it
//! again, as does kubelet's own restart, which finds the sockets already there.
//!
//! **Why a separate socket and a separate process, not the plugin answering itself.** The
//! plugin's socket lives in the plugin's own directory and speaks CSI; kubelet wants a second
//! socket in its registry directory that speaks the registration API and names the first. Kept in
//! its own container (as the upstream `node-driver-registrar` is), the registrar needs neither
//! privileges nor the kubelet directory's mount propagation, and a crash or upgrade of the plugin
//! does not unregister the driver: kubelet keeps calling the plugin's socket, which the
//! restarted plugin binds again.
//!
//! **Why the driver name comes from the plugin.** The name kubelet registers must be the name
//! the plugin gives in CSI `GetPluginInfo` and the name PVs carry. Rather than keeping a second
//! copy of it here, the registrar waits (bounded by `--csi-timeout`) until the plugin answers
//! `GetPluginInfo` on its socket and registers whatever name it gives. That wait is also what
//! orders the two containers: kubelet is only told about a plugin that answers.
//!
//! **Why a refusal ends the process.** Every kubelet tries a registration when a socket appears
//! and when it starts; only recent ones also come back to a socket they did not register.
//! Exiting with the reason, after removing the socket, makes the container restart, which
//! creates the socket anew, so every kubelet tries again, with the container's restart backoff
//! between tries, and the reason and the restart count show in the pod's status. The upstream
//! registrar exits on a refusal too.
//!
//! **Why kubelet's connections go through a front.** kubelet sends the registration socket's
//! path as each request's HTTP/2 `:authority`, which the `h2` crate under tonic refuses; the
//! registrar accepts kubelet's connections itself and hands them to its gRPC server with that
//! authority replaced (see [`authority`]).
//!
//! The admin server (`--admin-listen`) answers `/livez` while the process runs and `/readyz`
//! once kubelet has reported the plugin registered.

use std::future::Future;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lakecache_proto::csi::v1::GetPluginInfoRequest;
use lakecache_proto::csi::v1::identity_client::IdentityClient;
use lakecache_proto::pluginregistration::registration_server::{Registration, RegistrationServer};
use lakecache_proto::pluginregistration::{
    InfoRequest, PluginInfo, RegistrationStatus, RegistrationStatusResponse,
};
use lakecache_telemetry::{AdminError, AdminServer, Readiness, Registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

pub mod authority;

use crate::metrics::MethodLabel;
use crate::{BindError, bind_unix, unix_channel};

/// The plugin type kubelet hands CSI drivers to.
pub const CSI_PLUGIN_TYPE: &str = "CSIPlugin";
/// The versions of kubelet's CSI plugin API the plugin serves.
pub const SUPPORTED_VERSIONS: &[&str] = &["1.0.0"];
/// The registration socket's name ends with this, after the driver name (as upstream's does).
pub const SOCKET_SUFFIX: &str = "-reg.sock";

/// How long one `GetPluginInfo` call may take before the registrar tries again.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between two tries.
const RETRY_EVERY: Duration = Duration::from_millis(200);
/// How often the wait says it is still waiting.
const REPORT_EVERY: Duration = Duration::from_secs(10);
/// How long the gRPC server may take to finish answering after it is told to stop.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Settings of the registrar process.
#[derive(Debug, Clone)]
pub struct RegistrarConfig {
    /// The plugin's socket, as this process sees it.
    pub csi_socket: PathBuf,
    /// The plugin's socket as kubelet dials it: a path on the host.
    pub kubelet_registration_path: PathBuf,
    /// kubelet's plugin registry directory, as this process sees it.
    pub registration_dir: PathBuf,
    /// How long to wait for the plugin to answer `GetPluginInfo`.
    pub csi_timeout: Duration,
    pub admin_listen: std::net::SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistrarError {
    #[error(
        "the CSI plugin at {} did not answer GetPluginInfo within {} (last: {last}); \
         check that the csi-plugin container runs and that --csi-address is its socket",
        .socket.display(),
        humantime::format_duration(*.waited)
    )]
    PluginNotAnswering {
        socket: PathBuf,
        waited: Duration,
        last: String,
    },
    #[error(
        "the CSI plugin at {} gave the driver name {name:?}, which cannot name a registration \
         socket (it must be non-empty, must not start with '.' and must not contain '/')",
        .socket.display()
    )]
    BadDriverName { socket: PathBuf, name: String },
    #[error("--kubelet-registration-path {} must be an absolute path on the host", .0.display())]
    RelativeRegistrationPath(PathBuf),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error("cannot serve the registration socket")]
    Bind(#[source] BindError),
    #[error("cannot make the registration socket {} private", .path.display())]
    Permissions {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the registration server on {} stopped", .path.display())]
    Serve {
        path: PathBuf,
        source: tonic::transport::Error,
    },
    #[error("the registration server on {} stopped without an error", .path.display())]
    ServerGone { path: PathBuf },
    #[error(
        "kubelet did not register the CSI plugin {driver}: {reason}; exiting so that the \
         container restarts and kubelet tries again"
    )]
    NotRegistered { driver: String, reason: String },
}

/// What the plugin said about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginIdentity {
    pub name: String,
    pub vendor_version: String,
}

/// The registration socket of `driver` in `dir`: `<dir>/<driver>-reg.sock`.
pub fn registration_socket(dir: &Path, driver: &str) -> Option<PathBuf> {
    // kubelet ignores names that start with '.'; a '/' would leave the directory.
    let usable = !driver.is_empty() && !driver.starts_with('.') && !driver.contains('/');
    usable.then(|| dir.join(format!("{driver}{SOCKET_SUFFIX}")))
}

/// Asks the plugin at `socket` for its name until it answers, at most `timeout`.
pub async fn wait_for_plugin(
    socket: &Path,
    timeout: Duration,
) -> Result<PluginIdentity, RegistrarError> {
    let started = Instant::now();
    let deadline = started + timeout;
    tracing::info!(
        csi_address = %socket.display(),
        timeout = %humantime::format_duration(timeout),
        "waiting for the CSI plugin to answer GetPluginInfo"
    );
    let mut last = "no try yet".to_string();
    let mut reported = started;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(RegistrarError::PluginNotAnswering {
                socket: socket.to_path_buf(),
                waited: timeout,
                last,
            });
        }
        if std::fs::symlink_metadata(socket).is_err() {
            last = "the socket does not exist".into();
        } else {
            let limit = left.min(CALL_TIMEOUT);
            let mut client = IdentityClient::new(unix_channel(socket, limit));
            match tokio::time::timeout(limit, client.get_plugin_info(GetPluginInfoRequest {})).await
            {
                Ok(Ok(r)) => {
                    let r = r.into_inner();
                    tracing::info!(
                        driver = %r.name,
                        vendor_version = %r.vendor_version,
                        waited_ms = started.elapsed().as_millis() as u64,
                        "the CSI plugin answered"
                    );
                    return Ok(PluginIdentity {
                        name: r.name,
                        vendor_version: r.vendor_version,
                    });
                }
                Ok(Err(status)) => {
                    last = format!(
                        "GetPluginInfo failed: {:?}: {}",
                        status.code(),
                        status.message()
                    )
                }
                Err(_) => {
                    last = format!(
                        "GetPluginInfo did not answer within {}",
                        humantime::format_duration(limit)
                    )
                }
            }
        }
        if reported.elapsed() >= REPORT_EVERY {
            reported = Instant::now();
            tracing::info!(
                csi_address = %socket.display(),
                waited_s = started.elapsed().as_secs(),
                %last,
                "still waiting for the CSI plugin"
            );
        }
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(left.min(RETRY_EVERY)).await;
    }
}

/// The registrar's metrics, under the `lakecache_csi_registrar` prefix.
#[derive(Debug, Default)]
pub struct RegistrarMetrics {
    /// kubelet's calls by method (GetInfo keeps coming: it is kubelet's health check).
    pub calls: Family<MethodLabel, Counter>,
    /// 1 once kubelet reported the plugin registered.
    pub registered: Gauge,
}

impl RegistrarMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "kubelet_calls",
            "Registration calls from kubelet, by method",
            self.calls.clone(),
        );
        r.register(
            "registered",
            "1 once kubelet reported the CSI plugin registered",
            self.registered.clone(),
        );
    }

    fn call(&self, method: &str) {
        self.calls
            .get_or_create(&MethodLabel {
                method: method.into(),
            })
            .inc();
    }
}

/// kubelet's `Registration` service for one CSI plugin.
pub struct RegistrationService {
    info: PluginInfo,
    ready: Readiness,
    metrics: Arc<RegistrarMetrics>,
    /// Where a refusal goes: the registrar stops with it.
    refused: mpsc::Sender<String>,
}

impl RegistrationService {
    pub fn new(
        driver: &str,
        kubelet_registration_path: &Path,
        ready: Readiness,
        metrics: Arc<RegistrarMetrics>,
        refused: mpsc::Sender<String>,
    ) -> Self {
        Self {
            info: PluginInfo {
                r#type: CSI_PLUGIN_TYPE.into(),
                name: driver.into(),
                endpoint: kubelet_registration_path.display().to_string(),
                supported_versions: SUPPORTED_VERSIONS.iter().map(|v| v.to_string()).collect(),
            },
            ready,
            metrics,
            refused,
        }
    }

    /// What kubelet's status means for this process; a refusal is passed on to stop it.
    fn status(&self, s: RegistrationStatus) {
        self.ready.set_ready(s.plugin_registered);
        self.metrics.registered.set(i64::from(s.plugin_registered));
        if s.plugin_registered {
            tracing::info!(driver = %self.info.name, endpoint = %self.info.endpoint, "kubelet registered the CSI plugin");
        } else {
            tracing::error!(driver = %self.info.name, error = %s.error, "kubelet did not register the CSI plugin");
            // The first refusal stops the process; later ones add nothing.
            let _ = self.refused.try_send(s.error);
        }
    }
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn get_info(&self, _req: Request<InfoRequest>) -> Result<Response<PluginInfo>, Status> {
        self.metrics.call("GetInfo");
        tracing::debug!(driver = %self.info.name, "kubelet asked GetInfo");
        Ok(Response::new(self.info.clone()))
    }

    async fn notify_registration_status(
        &self,
        req: Request<RegistrationStatus>,
    ) -> Result<Response<RegistrationStatusResponse>, Status> {
        self.metrics.call("NotifyRegistrationStatus");
        self.status(req.into_inner());
        Ok(Response::new(RegistrationStatusResponse {}))
    }
}

/// The registration socket this process created; removed only if it is still that one, so a
/// late stop never removes the socket of a registrar that started after this one.
struct OwnSocket {
    path: PathBuf,
    dev_ino: Option<(u64, u64)>,
}

impl OwnSocket {
    fn new(path: PathBuf) -> Self {
        let dev_ino = std::fs::symlink_metadata(&path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        Self { path, dev_ino }
    }

    fn remove(&self) {
        let now = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if now.is_none() || now != self.dev_ino {
            return;
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => {
                tracing::info!(socket = %self.path.display(), "registration socket removed")
            }
            Err(e) => {
                tracing::warn!(socket = %self.path.display(), error = %e, "cannot remove the registration socket")
            }
        }
    }
}

/// Runs the registrar until `shutdown` resolves (then `Ok`) or kubelet refuses the plugin.
pub async fn run(
    cfg: RegistrarConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RegistrarError> {
    if !cfg.kubelet_registration_path.is_absolute() {
        return Err(RegistrarError::RelativeRegistrationPath(
            cfg.kubelet_registration_path,
        ));
    }
    let metrics = Arc::new(RegistrarMetrics::default());
    let mut registry = Registry::with_prefix("lakecache_csi_registrar");
    metrics.register(&mut registry);
    let ready = Readiness::default();
    let admin = AdminServer::start(
        cfg.admin_listen,
        Arc::new(parking_lot::Mutex::new(registry)),
        ready.clone(),
    )
    .await?;
    tokio::pin!(shutdown);

    let plugin = tokio::select! {
        r = wait_for_plugin(&cfg.csi_socket, cfg.csi_timeout) => r?,
        () = &mut shutdown => {
            tracing::info!("stopped before the CSI plugin answered");
            return Ok(());
        }
    };
    let path = registration_socket(&cfg.registration_dir, &plugin.name).ok_or_else(|| {
        RegistrarError::BadDriverName {
            socket: cfg.csi_socket.clone(),
            name: plugin.name.clone(),
        }
    })?;
    let listener = bind_unix(&path).map_err(RegistrarError::Bind)?;
    let own = OwnSocket::new(path.clone());
    // Only kubelet (root) needs to dial it, as with the upstream registrar.
    if let Err(source) = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)) {
        own.remove();
        return Err(RegistrarError::Permissions { path, source });
    }

    let (refused_tx, mut refused_rx) = mpsc::channel(1);
    let service = RegistrationService::new(
        &plugin.name,
        &cfg.kubelet_registration_path,
        ready,
        metrics,
        refused_tx,
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RegistrationServer::new(service))
            .serve_with_incoming_shutdown(authority::incoming(listener), async {
                let _ = stop_rx.await;
            }),
    );
    tracing::info!(
        socket = %path.display(),
        driver = %plugin.name,
        endpoint = %cfg.kubelet_registration_path.display(),
        admin = %admin.addr,
        "registration socket listening; waiting for kubelet"
    );

    let mut server_done = false;
    let outcome = tokio::select! {
        () = &mut shutdown => Ok(()),
        Some(reason) = refused_rx.recv() => Err(RegistrarError::NotRegistered {
            driver: plugin.name.clone(),
            reason,
        }),
        r = &mut server => {
            server_done = true;
            match r {
                Ok(Err(source)) => Err(RegistrarError::Serve { path: path.clone(), source }),
                _ => Err(RegistrarError::ServerGone { path: path.clone() }),
            }
        }
    };
    // Let an answer in flight (kubelet's refusal itself) reach kubelet, then stop.
    let _ = stop_tx.send(());
    if !server_done && tokio::time::timeout(STOP_GRACE, &mut server).await.is_err() {
        server.abort();
    }
    own.remove();
    admin.stop();
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> (RegistrationService, Readiness, mpsc::Receiver<String>) {
        let ready = Readiness::default();
        let (tx, rx) = mpsc::channel(1);
        let svc = RegistrationService::new(
            "csi.example.io",
            Path::new("/var/lib/kubelet/plugins/csi.example.io/csi.sock"),
            ready.clone(),
            Arc::new(RegistrarMetrics::default()),
            tx,
        );
        (svc, ready, rx)
    }

    #[test]
    fn socket_is_named_after_the_driver() {
        let dir = Path::new("/registration");
        assert_eq!(
            registration_socket(dir, "csi.lakecache.io"),
            Some(PathBuf::from("/registration/csi.lakecache.io-reg.sock"))
        );
        for bad in ["", ".hidden", "a/b", "../x"] {
            assert_eq!(registration_socket(dir, bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn get_info_names_the_plugin_and_its_host_socket() {
        let (svc, _, _) = service();
        let info = svc
            .get_info(Request::new(InfoRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.r#type, "CSIPlugin");
        assert_eq!(info.name, "csi.example.io");
        assert_eq!(
            info.endpoint,
            "/var/lib/kubelet/plugins/csi.example.io/csi.sock"
        );
        assert_eq!(info.supported_versions, ["1.0.0"]);
        assert_eq!(
            svc.metrics
                .calls
                .get_or_create(&MethodLabel {
                    method: "GetInfo".into()
                })
                .get(),
            1
        );
    }

    #[tokio::test]
    async fn registered_makes_ready_and_a_refusal_stops() {
        let (svc, ready, mut refused) = service();
        assert!(!ready.is_ready());
        svc.notify_registration_status(Request::new(RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        }))
        .await
        .unwrap();
        assert!(ready.is_ready());
        assert_eq!(svc.metrics.registered.get(), 1);
        assert!(
            refused.try_recv().is_err(),
            "a success stopped the registrar"
        );

        // A refusal is answered (kubelet gets its response) and passed on, once.
        for _ in 0..2 {
            svc.notify_registration_status(Request::new(RegistrationStatus {
                plugin_registered: false,
                error: "boom".into(),
            }))
            .await
            .unwrap();
        }
        assert!(!ready.is_ready());
        assert_eq!(svc.metrics.registered.get(), 0);
        assert_eq!(refused.try_recv().unwrap(), "boom");
        assert!(refused.try_recv().is_err());
    }

    #[test]
    fn own_socket_is_removed_only_while_it_is_ours() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d-reg.sock");
        let _first = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let own = OwnSocket::new(path.clone());
        // Another registrar replaced it: not ours any more. (The first socket stays bound, so
        // the second cannot reuse its inode number.)
        let other = dir.path().join("other.sock");
        let _second = std::os::unix::net::UnixListener::bind(&other).unwrap();
        std::fs::rename(&other, &path).unwrap();
        own.remove();
        assert!(path.exists(), "removed a socket that is not ours");
        OwnSocket::new(path.clone()).remove();
        assert!(!path.exists());
    }
}
