//! `lakecache-operator`: reconciles CacheNamespace and CachePreload resources.
//!
//! Replicas elect a leader with a `coordination.k8s.io` Lease; only the leader runs the
//! controllers, and a leader that loses its lease exits so that it starts again as a follower.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use lakecache_operator::{Config, Context, cache_namespace, preload, workers::GrpcWorkers};
use lakecache_telemetry::{AdminServer, Readiness, Registry};

#[derive(Debug, Parser)]
#[command(name = "lakecache-operator", version, about = "The lakecache operator")]
struct Cli {
    /// The worker image for CacheNamespaces that name none.
    #[arg(
        long,
        env = "LAKECACHE_WORKER_IMAGE",
        default_value = "ghcr.io/lakecache/lakecache:latest"
    )]
    worker_image: String,
    /// The image of the root init container that hands a host-path Disk tier to the worker's
    /// user (default: --worker-image). It must have `chown`; a CacheNamespace cannot change it.
    #[arg(long, env = "LAKECACHE_WORKER_INIT_IMAGE")]
    worker_init_image: Option<String>,
    /// Node directories a Disk tier's `path` may name, comma-separated; each CacheNamespace gets
    /// `ROOT/NAMESPACE/NAME` below its root. Each should be a filesystem of its own, so that a
    /// tier's size (which nothing on the node bounds) cannot fill the node's root disk. Empty
    /// (the default): no host-path Disk tiers, only `storageClassName`.
    #[arg(long, env = "LAKECACHE_ALLOWED_HOST_PATH_ROOTS", value_delimiter = ',')]
    allowed_host_path_roots: Vec<String>,
    /// Roots removed from --allowed-host-path-roots whose directories should still be cleaned,
    /// comma-separated: a deleted CacheNamespace's `ROOT/NAMESPACE/NAME` below one of them is
    /// removed from the nodes, but no Disk tier may use them. A recorded directory below neither
    /// kind of root is left, with a Warning.
    #[arg(long, env = "LAKECACHE_RETIRED_HOST_PATH_ROOTS", value_delimiter = ',')]
    retired_host_path_roots: Vec<String>,
    /// Make a NetworkPolicy per CacheNamespace that lets only the CSI node plugin and operator
    /// pods (below) reach the workers' data port. Effective only where the CNI enforces them.
    #[arg(long, env = "LAKECACHE_NETWORK_POLICY")]
    network_policy: bool,
    /// The namespace of the pods the NetworkPolicy lets in (default: the operator's).
    #[arg(long, env = "LAKECACHE_NETWORK_POLICY_NAMESPACE")]
    network_policy_namespace: Option<String>,
    /// Labels (`k=v,k=v`) every pod the NetworkPolicy lets in carries.
    #[arg(
        long,
        env = "LAKECACHE_NETWORK_POLICY_PEER_LABELS",
        value_delimiter = ',',
        default_value = "app.kubernetes.io/name=lakecache"
    )]
    network_policy_peer_labels: Vec<String>,
    /// The `app.kubernetes.io/component` values of the pods the NetworkPolicy lets in.
    #[arg(
        long,
        env = "LAKECACHE_NETWORK_POLICY_PEER_COMPONENTS",
        value_delimiter = ',',
        default_value = "csi-node,operator"
    )]
    network_policy_peer_components: Vec<String>,
    /// How long the pod that removes a deleted CacheNamespace's Disk tier directory from a node
    /// may take before that node is given up (a Warning Event names the directory left).
    #[arg(long, env = "LAKECACHE_DISK_CLEANUP_TIMEOUT", default_value = "5m")]
    disk_cleanup_timeout: humantime::Duration,
    /// Address of /metrics, /livez and /readyz.
    #[arg(long, env = "LAKECACHE_ADMIN_LISTEN", default_value = "0.0.0.0:9820")]
    admin_listen: SocketAddr,
    /// How often every CacheNamespace is looked at again (status, missing Secrets).
    #[arg(long, env = "LAKECACHE_RESYNC", default_value = "30s")]
    resync: humantime::Duration,
    /// How often a Ready CacheNamespace's source is scanned for its size.
    #[arg(long, env = "LAKECACHE_SOURCE_SCAN_INTERVAL", default_value = "10m")]
    source_scan_interval: humantime::Duration,
    /// Deadline of one call to a worker.
    #[arg(long, env = "LAKECACHE_WORKER_TIMEOUT", default_value = "5s")]
    worker_timeout: humantime::Duration,
    /// Run without leader election (one replica only).
    #[arg(long, env = "LAKECACHE_NO_LEADER_ELECTION")]
    no_leader_election: bool,
    /// The Lease used for leader election.
    #[arg(
        long,
        env = "LAKECACHE_LEASE_NAME",
        default_value = "lakecache-operator"
    )]
    lease_name: String,
    /// The namespace of the Lease (default: the pod's, else `default`).
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// This replica's identity in the Lease and in Events (default: the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Log format: text or json.
    #[arg(long, env = "LAKECACHE_LOG_FORMAT", default_value = "text")]
    log_format: lakecache_telemetry::LogFormat,
}

/// The non-empty entries of a roots flag, normalized.
fn normalized_roots(roots: &[String], flag: &str) -> anyhow::Result<Vec<String>> {
    let mut out = vec![];
    for r in roots.iter().filter(|r| !r.trim().is_empty()) {
        let n = lakecache_operator::cache_namespace::build::normalize_path(r.trim())
            .with_context(|| format!("{flag}: {r:?} is not an absolute path without '..'"))?;
        out.push(n);
    }
    Ok(out)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    lakecache_telemetry::install_crypto_provider();
    lakecache_telemetry::init_logging(cli.log_format, "info,kube_lease_manager=warn");
    let client = kube::Client::try_default()
        .await
        .context("no access to the Kubernetes API (neither in-cluster nor KUBECONFIG)")?;
    let identity = cli.identity.clone().unwrap_or_else(|| {
        format!(
            "{}-{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "operator".into()),
            std::process::id()
        )
    });
    let roots = normalized_roots(&cli.allowed_host_path_roots, "--allowed-host-path-roots")?;
    let retired = normalized_roots(&cli.retired_host_path_roots, "--retired-host-path-roots")?;
    let network_policy = if cli.network_policy {
        let mut labels = std::collections::BTreeMap::new();
        for kv in cli
            .network_policy_peer_labels
            .iter()
            .filter(|l| !l.is_empty())
        {
            let (k, v) = kv.split_once('=').with_context(|| {
                format!("--network-policy-peer-labels: {kv:?} is not key=value")
            })?;
            labels.insert(k.trim().to_string(), v.trim().to_string());
        }
        let namespace = cli
            .network_policy_namespace
            .clone()
            .or_else(|| cli.lease_namespace.clone())
            .context("--network-policy needs --network-policy-namespace (or POD_NAMESPACE)")?;
        Some(lakecache_operator::NetworkPolicyPeers {
            namespace,
            labels,
            components: cli
                .network_policy_peer_components
                .iter()
                .filter(|c| !c.is_empty())
                .cloned()
                .collect(),
        })
    } else {
        None
    };
    tracing::info!(allowed_host_path_roots = ?roots, retired_host_path_roots = ?retired, network_policy = network_policy.is_some(), "settings");
    let cfg = Config {
        worker_init_image: cli
            .worker_init_image
            .clone()
            .unwrap_or_else(|| cli.worker_image.clone()),
        allowed_host_path_roots: roots,
        retired_host_path_roots: retired,
        own_namespace: cli
            .lease_namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        disk_cleanup_timeout: *cli.disk_cleanup_timeout,
        network_policy,
        worker_image: cli.worker_image.clone(),
        resync: *cli.resync,
        source_scan_interval: *cli.source_scan_interval,
        worker_timeout: *cli.worker_timeout,
        ..Config::default()
    };
    let workers = Arc::new(GrpcWorkers::new(cfg.worker_timeout));
    let ctx = Context::new(client.clone(), cfg, identity.clone(), workers);
    let mut registry = Registry::with_prefix("lakecache_operator");
    ctx.metrics.register(&mut registry);
    let ready = Readiness::default();
    let admin = AdminServer::start(
        cli.admin_listen,
        Arc::new(parking_lot::Mutex::new(registry)),
        ready.clone(),
    )
    .await?;
    tracing::info!(admin = %admin.addr, %identity, "operator starting");

    // Leader election: followers are ready (they answer probes) but run nothing.
    let mut leader_rx = None;
    let mut lease_task = None;
    if !cli.no_leader_election {
        let ns = cli
            .lease_namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &cli.lease_name)
            .with_namespace(&ns)
            .with_identity(&identity)
            .with_duration(15)
            .with_grace(5)
            .build()
            .await
            .with_context(|| format!("preparing the Lease {ns}/{}", cli.lease_name))?;
        let (mut rx, task) = manager.watch().await;
        ready.set_ready(true);
        tracing::info!(lease = %format!("{ns}/{}", cli.lease_name), "waiting to lead");
        tokio::select! {
            r = async { while !*rx.borrow_and_update() { rx.changed().await?; } Ok::<_, anyhow::Error>(()) } => r?,
            _ = lakecache_telemetry::shutdown_signal() => { admin.stop(); return Ok(()); }
        }
        ready.set_ready(false);
        tracing::info!("leading");
        ctx.metrics.leader.set(1);
        leader_rx = Some(rx);
        lease_task = Some(task);
    }

    let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let stopped = |tx: &tokio::sync::broadcast::Sender<()>| {
        let mut rx = tx.subscribe();
        async move {
            let _ = rx.recv().await;
        }
    };
    let (cn_synced_tx, cn_synced) = tokio::sync::oneshot::channel();
    let (cp_synced_tx, cp_synced) = tokio::sync::oneshot::channel();
    let cn = tokio::spawn(cache_namespace::run(
        ctx.clone(),
        stopped(&stop_tx),
        cn_synced_tx,
    ));
    let cp = tokio::spawn(preload::run(ctx.clone(), stopped(&stop_tx), cp_synced_tx));
    {
        let ready = ready.clone();
        tokio::spawn(async move {
            if cn_synced.await.is_ok() && cp_synced.await.is_ok() {
                tracing::info!("watches synced; ready");
                ready.set_ready(true);
            }
        });
    }

    let lost = async {
        match leader_rx.as_mut() {
            Some(rx) => {
                while *rx.borrow_and_update() {
                    if rx.changed().await.is_err() {
                        break;
                    }
                }
            }
            None => std::future::pending::<()>().await,
        }
    };
    let mut exit_code = 0;
    tokio::select! {
        _ = lakecache_telemetry::shutdown_signal() => tracing::info!("stopping"),
        _ = lost => {
            tracing::error!("lost the leader lease; exiting so that this replica starts again as a follower");
            exit_code = 1;
        }
    }
    ready.set_ready(false);
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let _ = cn.await;
        let _ = cp.await;
    })
    .await;
    // Dropping the receiver makes the lease task release the lease.
    drop(leader_rx);
    if let Some(t) = lease_task {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    admin.stop();
    if exit_code != 0 {
        std::process::exit(exit_code);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_valid() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
