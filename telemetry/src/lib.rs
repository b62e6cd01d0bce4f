//! One telemetry setup for every lakecache binary.
//!
//! - [`init_logging`]: `tracing` to stderr, filtered by `RUST_LOG` (else the binary's default), as text or
//!   JSON lines.
//! - [`Registry`]: the Prometheus registry each component adds its metrics to, under its own
//!   prefix (`lakecache_worker_…`, `lakecache_fuse_…`).
//! - [`AdminServer`]: serves `/metrics` (Prometheus text), `/livez` (the process answers) and
//!   `/readyz` (the component said it is ready: a worker once its disk index is rebuilt and its
//!   gRPC port is bound).
//! - [`shutdown_signal`]: resolves on SIGINT or SIGTERM, so binaries stop gracefully.
//! - [`install_crypto_provider`]: one TLS provider for the process.
//! - [`runtime_with_env`]: the process's tokio runtime, built after the environment a source
//!   needs is set (the one place that sets environment variables, so the one `unsafe`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
pub use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown log format {other:?}: use text or json")),
        }
    }
}

/// Picks the TLS crypto provider for the process. kube's client brings rustls with `ring` and
/// OpenDAL's HTTP client brings it with `aws-lc-rs`; with both compiled in (a workspace build
/// unifies them) rustls refuses to choose, and the first TLS connection would panic. Every
/// binary calls this first; later calls do nothing.
/// Sets `vars` in the process's environment, then builds the multi-threaded tokio runtime.
/// Setting a variable is sound only while no other thread may read the environment, so this
/// refuses unless the calling thread is the process's only one: call it from `main`, before
/// anything starts a thread.
pub fn runtime_with_env(
    vars: impl IntoIterator<Item = (&'static str, String)>,
) -> std::io::Result<tokio::runtime::Runtime> {
    let vars: Vec<_> = vars.into_iter().collect();
    if !vars.is_empty() {
        let threads = std::fs::read_dir("/proc/self/task")?.count();
        if threads != 1 {
            return Err(std::io::Error::other(format!(
                "cannot set {:?} with {threads} threads running: set them before any starts",
                vars.iter().map(|(k, _)| *k).collect::<Vec<_>>()
            )));
        }
        for (key, value) in vars {
            // SAFETY: this thread is the only one (checked above), and only it could start
            // another, which it does not do before the loop ends.
            #[allow(unsafe_code)]
            unsafe {
                std::env::set_var(key, value)
            };
        }
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Sets up `tracing` once for the process; later calls are ignored (tests call it many times).
pub fn init_logging(format: LogFormat, default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// The readiness of a component, shared between the component and its admin server.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set_ready(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// More metrics for `/metrics`, in OpenMetrics text without the final `# EOF` (for example
/// what child processes report), gathered at each scrape.
pub type ExtraMetrics = Arc<dyn Fn() -> String + Send + Sync>;

#[derive(Clone)]
struct AdminState {
    registry: Arc<parking_lot::Mutex<Registry>>,
    ready: Readiness,
    extra: Option<ExtraMetrics>,
}

/// The admin HTTP server of a component.
pub struct AdminServer {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot listen for the admin server on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
}

impl AdminServer {
    /// Binds `addr` (port 0 picks a free one) and serves until dropped or [`AdminServer::stop`].
    pub async fn start(
        addr: SocketAddr,
        registry: Arc<parking_lot::Mutex<Registry>>,
        ready: Readiness,
    ) -> Result<Self, AdminError> {
        Self::start_with(addr, registry, ready, None).await
    }

    /// [`AdminServer::start`], with `extra` metrics appended to the registry's at each scrape.
    pub async fn start_with(
        addr: SocketAddr,
        registry: Arc<parking_lot::Mutex<Registry>>,
        ready: Readiness,
        extra: Option<ExtraMetrics>,
    ) -> Result<Self, AdminError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| AdminError::Bind(addr, e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| AdminError::Bind(addr, e))?;
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/livez", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .with_state(AdminState {
                registry,
                ready,
                extra,
            });
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "admin server stopped");
            }
        });
        Ok(Self { addr, task })
    }

    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    let mut body = String::new();
    let result = encode(&mut body, &s.registry.lock());
    if let (Ok(()), Some(extra)) = (&result, &s.extra) {
        let own = body.strip_suffix("# EOF\n").unwrap_or(&body).to_string();
        body = format!("{own}{}# EOF\n", extra());
    }
    match result {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            format!("cannot encode metrics: {e}\n"),
        ),
    }
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    if s.ready.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// Resolves when the process receives SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops this process");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, stopping"),
        _ = term.recv() => tracing::info!("SIGTERM received, stopping"),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_environment_is_set_only_by_a_lone_thread() {
        // The test harness runs tests on threads of their own: this one is not alone.
        let e = runtime_with_env([("LAKECACHE_TELEMETRY_TEST", "x".to_string())]).unwrap_err();
        assert!(e.to_string().contains("threads running"), "{e}");
        assert!(std::env::var("LAKECACHE_TELEMETRY_TEST").is_err());
        // Nothing to set: a runtime, whatever runs.
        assert!(runtime_with_env([]).is_ok());
    }

    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_and_probes() -> anyhow::Result<()> {
        let mut reg = Registry::with_prefix("lakecache_test");
        let c: Counter = Counter::default();
        reg.register("things", "Things counted", c.clone());
        c.inc_by(3);
        let ready = Readiness::default();
        let srv = AdminServer::start(
            "127.0.0.1:0".parse()?,
            Arc::new(parking_lot::Mutex::new(reg)),
            ready.clone(),
        )
        .await?;
        assert!(get(srv.addr, "/livez").await.starts_with("HTTP/1.1 200"));
        assert!(get(srv.addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        ready.set_ready(true);
        assert!(get(srv.addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        let m = get(srv.addr, "/metrics").await;
        assert!(m.contains("lakecache_test_things_total 3"), "{m}");
        Ok(())
    }
}
