//! The lakecache operator.
//!
//! Two controllers share one [`Context`]:
//! - [`cache_namespace`]: a `CacheNamespace` becomes a worker StatefulSet, a headless Service, a
//!   ConfigMap with the worker configuration, a data-plane token Secret, a PodDisruptionBudget,
//!   and a bound PersistentVolume + PersistentVolumeClaim named like the CacheNamespace. Its
//!   status is computed from what was observed: the StatefulSet, the worker pods, and what each
//!   ready worker says about its tiers and hits.
//! - [`preload`]: a `CachePreload` asks every ready worker of its CacheNamespace to load its
//!   share of the paths, follows their progress, and runs again on a cron schedule.
//!
//! Each reconcile is a pipeline of small steps, one module each, driven by a short function in
//! the controller's `mod.rs`: fetch what the object refers to → validate into one typed value
//! (no I/O) → build every child, or decide the next run (no I/O) → apply with server-side apply
//! → compute status from what was observed (no I/O) → write it. The I/O-free steps carry most of
//! the unit tests. Errors are translated once, in [`error`], into an Event reason and a metric
//! label; what is wrong with a user's object is a [`Problem`], reported the same way by both
//! controllers ([`problem`]); conditions never come from errors, only from observed state.
#![forbid(unsafe_code)]

pub mod cache_namespace;
pub mod conditions;
pub mod controller;
pub mod error;
#[cfg(test)]
pub(crate) mod fixtures;
pub mod metrics;
pub mod preload;
pub mod problem;
pub mod workers;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Resource, ResourceExt};

pub use error::Error;
pub use problem::Problem;

/// The field manager of every server-side apply, and the `managed-by` label value.
pub const MANAGER: &str = "lakecache-operator";

/// Settings of the operator process.
#[derive(Debug, Clone)]
pub struct Config {
    /// The worker image when a CacheNamespace names none.
    pub worker_image: String,
    /// How often a CacheNamespace is looked at again (status refresh, missing Secrets).
    pub resync: Duration,
    /// How often the source of a Ready CacheNamespace is scanned for its size.
    pub source_scan_interval: Duration,
    /// Deadline of one call to a worker.
    pub worker_timeout: Duration,
    /// How often a running preload's status is written.
    pub preload_status_interval: Duration,
    /// The image of the init container that hands a host-path Disk tier to the worker's user:
    /// the operator's own image, never a CacheNamespace's (that one runs as root).
    pub worker_init_image: String,
    /// The node directories a Disk tier's `path` may name (normalized, absolute). Empty (the
    /// default): no host-path Disk tier is allowed.
    pub allowed_host_path_roots: Vec<String>,
    /// Roots an admin removed from `allowed_host_path_roots` whose CacheNamespaces' directories
    /// the cleanup still removes (normalized, absolute); no new Disk tier may use them.
    pub retired_host_path_roots: Vec<String>,
    /// A NetworkPolicy per CacheNamespace that lets only these pods reach the workers' data
    /// port; `None`: no NetworkPolicy.
    pub network_policy: Option<NetworkPolicyPeers>,
    /// The operator's own namespace: where the pods that remove a deleted CacheNamespace's node
    /// directories run, out of tenants' reach.
    pub own_namespace: String,
    /// How long such a pod may take before its node is given up (a Warning names it).
    pub disk_cleanup_timeout: Duration,
}

impl Config {
    /// The roots below which a recorded node directory may be removed: the allowed ones and the
    /// retired ones.
    pub fn cleanup_roots(&self) -> Vec<String> {
        self.allowed_host_path_roots
            .iter()
            .chain(&self.retired_host_path_roots)
            .cloned()
            .collect()
    }
}

/// The pods that may reach the workers' data port: the chart's CSI node plugin and operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkPolicyPeers {
    /// Their namespace (the chart's release namespace).
    pub namespace: String,
    /// Labels every one of them carries (`app.kubernetes.io/name`, `…/instance`).
    pub labels: std::collections::BTreeMap<String, String>,
    /// Their `app.kubernetes.io/component` values (`csi-node`, `operator`).
    pub components: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            worker_image: "ghcr.io/lakecache/lakecache:latest".into(),
            resync: Duration::from_secs(30),
            source_scan_interval: Duration::from_secs(600),
            worker_timeout: Duration::from_secs(5),
            preload_status_interval: Duration::from_secs(1),
            worker_init_image: "ghcr.io/lakecache/lakecache:latest".into(),
            allowed_host_path_roots: vec![],
            retired_host_path_roots: vec![],
            network_policy: None,
            own_namespace: "default".into(),
            disk_cleanup_timeout: Duration::from_secs(300),
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub cfg: Config,
    pub metrics: Arc<metrics::OperatorMetrics>,
    pub recorder: Recorder,
    pub workers: Arc<dyn workers::WorkerApi>,
    /// Source scans, by CacheNamespace uid.
    pub scans: parking_lot::Mutex<HashMap<String, cache_namespace::ScanState>>,
    /// Running preloads, by CachePreload uid.
    pub preloads: parking_lot::Mutex<HashMap<String, preload::RunHandle>>,
}

impl Context {
    pub fn new(
        client: Client,
        cfg: Config,
        instance: String,
        workers: Arc<dyn workers::WorkerApi>,
    ) -> Arc<Self> {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance: Some(instance),
            },
        );
        Arc::new(Self {
            client,
            cfg,
            metrics: Arc::new(metrics::OperatorMetrics::default()),
            recorder,
            workers,
            scans: Default::default(),
            preloads: Default::default(),
        })
    }

    /// Publishes an Event about `obj`; a failure to publish is logged, never fatal.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(truncate(&note, 1000)),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::warn!(object = %obj.name_any(), reason, error = %e, "cannot publish an event");
        }
    }
}

/// Sends on `synced` once `store` has listed everything.
///
/// The store's readiness wakes only the last task that waited on it (its receiver keeps one
/// waker), and the controller waits on it too, so a single `wait_until_ready().await` here could
/// sleep forever. Asking again every 200 ms sees it, since the value is kept once it is set.
pub async fn signal_synced<K>(
    store: kube::runtime::reflector::Store<K>,
    controller: &'static str,
    synced: tokio::sync::oneshot::Sender<()>,
) where
    K: kube::runtime::reflector::Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    // Bounded by the process: the task ends with the sync, or with the store's writer.
    loop {
        match tokio::time::timeout(Duration::from_millis(200), store.wait_until_ready()).await {
            Ok(Ok(())) => {
                tracing::info!(controller, "watch synced");
                let _ = synced.send(());
                return;
            }
            Ok(Err(e)) => {
                tracing::error!(controller, error = %e, "the watch ended before it synced");
                return;
            }
            Err(_) => {}
        }
    }
}

/// At most `max` bytes of `s`, cut at a character boundary.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
