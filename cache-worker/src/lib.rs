//! The lakecache cache worker.
//!
//! A worker keeps blocks of one source in a Memory tier and a Disk tier ([`store`]), admits and
//! evicts them by a scan-resistant policy ([`policy`]), fetches misses from the source once per
//! block ([`cache`]), caches metadata ([`meta`]), preloads paths ([`preload`]), and serves all of
//! it over gRPC ([`server`]) with metrics and probes on an admin port. Block bytes also go out
//! through the block transport ([`blocks`]), on the same port.
//!
//! [`Worker::start`] wires a [`config::WorkerConfig`] into a running worker; the binary and
//! `lakecache local` both use it.

pub mod blocks;
pub mod cache;
pub mod config;
pub mod meta;
pub mod metrics;
pub mod policy;
pub mod preload;
pub mod server;
pub mod store;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lakecache_lake::{OpendalSource, Source};
use lakecache_proto::lakecache::v1::cache_worker_server::CacheWorkerServer;
use lakecache_telemetry::{AdminServer, Readiness, Registry};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::cache::BlockCache;
use crate::config::{WorkerConfig, WorkerConfigExt};
use crate::meta::MetadataCache;
use crate::metrics::WorkerMetrics;
use crate::preload::Preloader;
use crate::server::{TokenCheck, WorkerService};
use crate::store::BlockStore;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("source: {0}")]
    Source(#[from] lakecache_lake::SpecError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error(transparent)]
    Admin(#[from] lakecache_telemetry::AdminError),
}

/// A running worker.
pub struct Worker {
    pub id: String,
    /// The gRPC address.
    pub addr: SocketAddr,
    /// The admin (metrics, probes) address.
    pub admin_addr: SocketAddr,
    pub cache: Arc<BlockCache>,
    pub metrics: Arc<WorkerMetrics>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    /// Turned true when the worker stops: the accept loop stops and block connections close.
    stop_accepting: watch::Sender<bool>,
    accept: JoinHandle<()>,
    _admin: AdminServer,
    /// The private memory tier made for this worker, removed when it stops.
    _memory_dir: Option<PrivateDir>,
}

/// A directory this process made for itself and removes when dropped.
struct PrivateDir(PathBuf);

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A worker id as a file-name part: anything but ASCII letters, digits, `-`, `_` and `.`
/// becomes `_`.
fn sanitize(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Worker {
    /// Starts a worker reading its source through OpenDAL.
    pub async fn start(cfg: WorkerConfig) -> Result<Self, WorkerError> {
        let source: Arc<dyn Source> = Arc::new(OpendalSource::new(&cfg.source)?);
        Self::start_with_source(cfg, source).await
    }

    /// Starts a worker over a given source (tests and demos wrap the real one).
    pub async fn start_with_source(
        cfg: WorkerConfig,
        source: Arc<dyn Source>,
    ) -> Result<Self, WorkerError> {
        cfg.validate().map_err(config::ConfigError::from)?;
        let token = cfg.resolve_token()?;
        if token.is_none() {
            if cfg.listen.ip().is_loopback() {
                tracing::info!(listen = %cfg.listen, "no data-plane token: open to local callers only");
            } else {
                tracing::warn!(listen = %cfg.listen,
                    "no data-plane token and --insecure-open-data-plane: anyone who reaches this \
                     address can read the whole source");
            }
        }
        let metrics = Arc::new(WorkerMetrics::default());
        let mut registry = Registry::with_prefix("lakecache_worker");
        metrics.register(&mut registry);
        let ready = Readiness::default();
        let admin = AdminServer::start(
            cfg.admin_listen,
            Arc::new(parking_lot::Mutex::new(registry)),
            ready.clone(),
        )
        .await?;
        let bs = cfg.block_size.as_u64();
        let memory_dir = if cfg.needs_memory_dir() {
            for dir in store::remove_stale_memory_dirs() {
                tracing::info!(dir = %dir.display(), "removed the memory tier of a worker that is gone");
            }
            let dir = store::private_memory_dir(&format!("worker-{}", sanitize(&cfg.id)))
                .map_err(|e| store::StoreError::Dir(store::SHM.into(), e))?;
            Some(PrivateDir(dir))
        } else {
            None
        };
        let default_dir = memory_dir.as_ref().map_or(Path::new(store::SHM), |d| &d.0);
        let store = Arc::new(BlockStore::open(
            cfg.tier_specs(default_dir),
            bs,
            metrics.clone(),
        )?);
        let meta = Arc::new(MetadataCache::new(
            source.clone(),
            cfg.metadata,
            cfg.limits.metadata_entries,
            metrics.clone(),
        ));
        let cache = Arc::new(BlockCache::new(
            store,
            source.clone(),
            meta.clone(),
            bs,
            cfg.limits.max_source_fetches,
            metrics.clone(),
        ));
        let preloader = Preloader::new(cfg.id.clone(), cache.clone(), meta.clone());
        let service = WorkerService {
            id: cfg.id.clone(),
            cache: cache.clone(),
            meta,
            preloader,
            metrics: metrics.clone(),
        };
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| WorkerError::Listen(cfg.listen, e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| WorkerError::Listen(cfg.listen, e))?;
        let check = TokenCheck {
            expected: token.map(Arc::from),
        };
        let blocks = Arc::new(blocks::BlockServer {
            cache: cache.clone(),
            metrics: metrics.clone(),
            check: check.clone(),
        });
        let svc = tonic::service::interceptor::InterceptedService::new(
            CacheWorkerServer::new(service)
                .max_decoding_message_size(16 << 20)
                .max_encoding_message_size(16 << 20),
            check,
        );
        let (tx, rx) = oneshot::channel::<()>();
        // One port for both: block transport connections are served by `blocks`, the rest
        // reach tonic (with TCP_NODELAY set, which `Server::tcp_nodelay` does only for
        // listeners tonic binds itself).
        let (stop_accepting, stopped) = watch::channel(false);
        let (incoming, accept) = blocks::accept(listener, blocks, stopped);
        let incoming = tokio_stream::wrappers::ReceiverStream::new(incoming);
        let task = tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .initial_stream_window_size(8 << 20)
                .initial_connection_window_size(32 << 20)
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "gRPC server stopped");
            }
        });
        ready.set_ready(true);
        tracing::info!(id = %cfg.id, %addr, admin = %admin.addr, source = %source.describe(),
            block_size = bs, "worker ready");
        Ok(Self {
            id: cfg.id,
            addr,
            admin_addr: admin.addr,
            cache,
            metrics,
            shutdown: Some(tx),
            task,
            stop_accepting,
            accept,
            _admin: admin,
            _memory_dir: memory_dir,
        })
    }

    /// Stops accepting calls, lets calls under way finish, and returns.
    pub async fn stop(mut self) {
        self.stop_accepting.send_replace(true);
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.accept).await;
        let _ = (&mut self.task).await;
    }

    /// Stops at once, dropping every connection (as a crash would).
    pub fn kill(self) {
        self.accept.abort();
        self.task.abort();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.accept.abort();
        self.task.abort();
    }
}
