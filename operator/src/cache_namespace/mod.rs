//! The CacheNamespace controller.
//!
//! One reconcile: fetch what the object refers to (its credentials Secret, its token Secret) →
//! check the spec into a [`ValidSpec`] or a [`Problem`] (no I/O) → build every child
//! ([`build`], no I/O) → apply them with server-side apply → observe the StatefulSet, the worker
//! pods and what each ready worker says → compute the status ([`status`], no I/O) → write it.
//!
//! A child's name may already be taken by an object this CacheNamespace does not control (made
//! by an admin, another tool, or another CacheNamespace): then nothing is applied or deleted,
//! since server-side apply with `force` would take the object over and a tenant could thereby
//! rewrite or delete what is not theirs. The status says NameConflict and names the object.
//!
//! A problem with the object (an invalid spec, a missing Secret) changes nothing that runs: the
//! children stay as they were, the workers keep serving what they cached, and the status says
//! Failed with a condition and a Warning Event that name what to fix. The object is looked at
//! again every resync, so fixing the Secret is noticed without touching the CacheNamespace.
//!
//! The source's size (for the cached percentage) comes from a metadata-only preload of `**`
//! on one ready worker, run in the background every `source_scan_interval`.

pub mod build;
pub mod node_dirs;
pub mod status;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, PersistentVolume, PersistentVolumeClaim, Pod, Secret, Service,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{
    DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions, PropagationPolicy,
};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, Resource, ResourceExt};
use lakecache_api::{
    CacheNamespace, CacheNamespacePhase, DEFAULT_WORKER_PORT, DiskLocation, ValidSpec,
};
use lakecache_proto::lakecache::v1 as pb;
use serde::Serialize;
use serde::de::DeserializeOwned;

use self::build::{BuildInputs, Children, Names, TOKEN_KEY};
use self::status::{Observed, Problem, ScanResult};
use crate::controller::key;
use crate::error::kube as kerr;
use crate::workers::WorkerRef;
use crate::{Context, Error, MANAGER};

/// Removes what owner references cannot (the cluster-scoped PersistentVolume).
pub const FINALIZER: &str = "lakecache.io/cleanup";
/// The controller's name in metrics.
pub const CONTROLLER: &str = "cachenamespace";

/// A CacheNamespace's source scan.
#[derive(Debug, Clone)]
pub enum ScanState {
    Running {
        started: Instant,
    },
    Done {
        result: ScanResult,
        started: Instant,
    },
    Failed {
        message: String,
        started: Instant,
    },
}

/// The label selector of everything this operator manages.
pub fn managed_selector() -> String {
    format!("app.kubernetes.io/managed-by={MANAGER}")
}

/// Runs the controller until `shutdown` resolves. `synced` is called once its watches have
/// listed everything.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
    synced: tokio::sync::oneshot::Sender<()>,
) {
    let client = ctx.client.clone();
    // Not watched, so that the operator needs no right to list Secrets or PersistentVolumes:
    // the token Secret (read on every reconcile) and the PV (changed only by us).
    let owned = watcher::Config::default().labels(&managed_selector());
    let controller = Controller::new(
        Api::<CacheNamespace>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(Api::<StatefulSet>::all(client.clone()), owned.clone())
    .owns(Api::<Service>::all(client.clone()), owned.clone())
    .owns(Api::<ConfigMap>::all(client.clone()), owned.clone())
    .owns(
        Api::<PodDisruptionBudget>::all(client.clone()),
        owned.clone(),
    )
    .owns(
        Api::<PersistentVolumeClaim>::all(client.clone()),
        owned.clone(),
    );
    let controller = if ctx.cfg.network_policy.is_some() {
        controller.owns(Api::<NetworkPolicy>::all(client.clone()), owned.clone())
    } else {
        controller
    };
    let controller = controller
        .watches(Api::<Pod>::all(client.clone()), owned, |pod: Pod| {
            let cn = pod.labels().get(build::CACHE_NAMESPACE_LABEL)?.clone();
            Some(ObjectRef::<CacheNamespace>::new(&cn).within(&pod.namespace()?))
        })
        .graceful_shutdown_on(shutdown);
    crate::controller::drive(controller, CONTROLLER, ctx, synced, reconcile).await;
}

async fn reconcile(cn: Arc<CacheNamespace>, ctx: Arc<Context>) -> Result<Action, Error> {
    crate::controller::reconcile_with(cn, ctx, CONTROLLER, FINALIZER, apply, cleanup).await
}

/// What the object refers to, fetched.
struct Inputs {
    /// The token of the existing token Secret.
    token: Option<String>,
    problem: Option<Problem>,
}

async fn fetch(cn: &CacheNamespace, ctx: &Context) -> Result<Inputs, Error> {
    let ns = cn.namespace().unwrap_or_default();
    let names = Names::of(&ns, &cn.name_any());
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let mut problem = None;
    if let Some(r) = &cn.spec.source.credentials_secret_ref {
        match secrets
            .get_opt(&r.name)
            .await
            .map_err(kerr(format!("reading Secret {ns}/{}", r.name)))?
        {
            None => {
                problem = Some(Problem {
                    reason: "SecretNotFound",
                    message: format!(
                        "Secret {ns}/{} named by spec.source.credentialsSecretRef does not exist: \
                         create it with the source's credentials (keys such as access_key_id and \
                         secret_access_key), or remove credentialsSecretRef for a public source",
                        r.name
                    ),
                })
            }
            Some(s)
                if s.data.as_ref().is_none_or(|d| d.is_empty())
                    && s.string_data.as_ref().is_none_or(|d| d.is_empty()) =>
            {
                problem = Some(Problem {
                    reason: "SecretEmpty",
                    message: format!(
                        "Secret {ns}/{} named by spec.source.credentialsSecretRef has no keys: \
                         add the source's credentials (such as access_key_id and secret_access_key)",
                        r.name
                    ),
                })
            }
            Some(_) => {}
        }
    }
    let uid = cn.uid().unwrap_or_default();
    let token = match secrets
        .get_opt(&names.token_secret)
        .await
        .map_err(kerr(format!("reading Secret {ns}/{}", names.token_secret)))?
    {
        None => None,
        Some(s) => {
            let ours = s
                .owner_references()
                .iter()
                .any(|o| o.uid == uid && o.kind == "CacheNamespace");
            if !ours {
                problem.get_or_insert(Problem {
                    reason: "TokenSecretConflict",
                    message: format!(
                        "Secret {ns}/{} exists and does not belong to this CacheNamespace: \
                         rename or delete it, the operator keeps the data-plane token there",
                        names.token_secret
                    ),
                });
                None
            } else {
                s.data
                    .as_ref()
                    .and_then(|d| d.get(TOKEN_KEY))
                    .and_then(|b| String::from_utf8(b.0.clone()).ok())
                    .filter(|t| !t.is_empty())
            }
        }
    };
    Ok(Inputs { token, problem })
}

/// A new data-plane token: 32 random bytes as hex.
fn new_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn check(cn: &CacheNamespace, inputs: &Inputs, cfg: &crate::Config) -> Result<ValidSpec, Problem> {
    if let Some(p) = &inputs.problem {
        return Err(p.clone());
    }
    let mut v = cn.spec.validate().map_err(|e| Problem {
        reason: "InvalidSpec",
        message: e.to_string(),
    })?;
    if let Some(d) = &mut v.disk
        && let DiskLocation::HostPath(path) = &mut d.location
    {
        let roots = &cfg.allowed_host_path_roots;
        let i = cn
            .spec
            .tiers
            .iter()
            .position(|t| t.path.is_some())
            .unwrap_or(0);
        match build::host_path_root(path, roots) {
            Some(root) => *path = root.to_string(),
            None if roots.is_empty() => {
                return Err(Problem {
                    reason: "HostPathNotAllowed",
                    message: format!(
                        "spec.tiers[{i}].path: this cluster allows no Disk tier on a node \
                         directory (the operator's allowed host path roots are empty): use \
                         storageClassName for a volume per worker instead, or ask the cluster \
                         admin to allow a directory (the chart's workers.allowedHostPathRoots)"
                    ),
                });
            }
            None => {
                return Err(Problem {
                    reason: "HostPathNotAllowed",
                    message: format!(
                        "spec.tiers[{i}].path: {path:?} is not a node directory the cluster \
                         admin allows for Disk tiers; set it to one of {} (the CacheNamespace \
                         gets its own subdirectory there), or use storageClassName for a \
                         volume per worker; admins allow directories with the chart's \
                         workers.allowedHostPathRoots",
                        roots.join(", ")
                    ),
                });
            }
        }
    }
    Ok(v)
}

/// Whether the object `name` exists and whose it is.
enum Holder {
    Nobody,
    Us,
    Other,
}

async fn holder<K>(api: &Api<K>, name: &str, uid: &str) -> Result<Holder, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    Ok(match api.get_opt(name).await? {
        None => Holder::Nobody,
        Some(o)
            if o.meta()
                .owner_references
                .iter()
                .flatten()
                .any(|r| r.controller == Some(true) && r.uid == uid) =>
        {
            Holder::Us
        }
        Some(_) => Holder::Other,
    })
}

/// The first child whose name is taken by an object this CacheNamespace does not control, as a
/// problem; the PersistentVolume (cluster-scoped, without owner) is ours when its labels and
/// annotation name this CacheNamespace's namespace, name and uid.
async fn name_conflict(
    cn: &CacheNamespace,
    ctx: &Context,
    pv_name: &str,
) -> Result<Option<Problem>, Error> {
    let ns = cn.namespace().unwrap_or_default();
    let name = cn.name_any();
    let uid = cn.uid().unwrap_or_default();
    let names = Names::of(&ns, &name);
    let legacy = pv_name != names.pv;
    let client = ctx.client.clone();
    let mut taken: Option<(&str, String)> = None;
    macro_rules! check_ns {
        ($ty:ty, $kind:expr, $name:expr) => {
            if taken.is_none() {
                let api: Api<$ty> = Api::namespaced(client.clone(), &ns);
                let h = holder(&api, &$name, &uid)
                    .await
                    .map_err(kerr(format!("reading {} {ns}/{}", $kind, $name)))?;
                if let Holder::Other = h {
                    taken = Some(($kind, format!("{ns}/{}", $name)));
                }
            }
        };
    }
    check_ns!(ConfigMap, "ConfigMap", names.config_map);
    check_ns!(Service, "Service", names.service);
    check_ns!(PodDisruptionBudget, "PodDisruptionBudget", names.pdb);
    check_ns!(StatefulSet, "StatefulSet", names.statefulset);
    check_ns!(PersistentVolumeClaim, "PersistentVolumeClaim", names.pvc);
    if ctx.cfg.network_policy.is_some() {
        check_ns!(NetworkPolicy, "NetworkPolicy", names.network_policy);
    }
    if taken.is_none() {
        let pvs: Api<PersistentVolume> = Api::all(client.clone());
        if let Some(pv) = pvs
            .get_opt(pv_name)
            .await
            .map_err(kerr(format!("reading PersistentVolume {pv_name}")))?
            && !pv_is_ours(&pv, &ns, &name, &uid, legacy)
        {
            taken = Some(("PersistentVolume", pv_name.to_string()));
        }
    }
    Ok(taken.map(|(kind, obj)| Problem {
        reason: "NameConflict",
        message: format!(
            "{kind} {obj} exists and does not belong to this CacheNamespace, so nothing was \
             applied: rename the CacheNamespace, or have the {kind} removed if it is left over"
        ),
    }))
}

/// Whether a PersistentVolume is the one this operator made for CacheNamespace `ns/name` (uid
/// `uid`). A `legacy` PV (the one an older operator made and bound this CacheNamespace's own
/// claim to) may lack the uid annotation; the next apply adds it.
fn pv_is_ours(pv: &PersistentVolume, ns: &str, name: &str, uid: &str, legacy: bool) -> bool {
    let annotated = pv
        .annotations()
        .get(build::OWNER_UID_ANNOTATION)
        .map(String::as_str);
    pv.labels()
        .get(build::CACHE_NAMESPACE_LABEL)
        .map(String::as_str)
        == Some(name)
        && pv.labels().get(build::NAMESPACE_LABEL).map(String::as_str) == Some(ns)
        && (annotated == Some(uid) || (legacy && annotated.is_none()))
}

/// The name of this CacheNamespace's PersistentVolume: [`Names::of`]'s, unless its own claim
/// (controlled by it) is already bound to another, which a claim cannot change.
async fn pv_name(cn: &CacheNamespace, ctx: &Context) -> Result<String, Error> {
    let ns = cn.namespace().unwrap_or_default();
    let names = Names::of(&ns, &cn.name_any());
    let uid = cn.uid().unwrap_or_default();
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let bound = pvcs
        .get_opt(&names.pvc)
        .await
        .map_err(kerr(format!(
            "reading PersistentVolumeClaim {ns}/{}",
            names.pvc
        )))?
        .filter(|c| {
            c.owner_references()
                .iter()
                .any(|r| r.controller == Some(true) && r.uid == uid)
        })
        .and_then(|c| c.spec?.volume_name)
        .filter(|v| !v.is_empty());
    Ok(bound.unwrap_or(names.pv))
}

async fn apply(cn: Arc<CacheNamespace>, ctx: Arc<Context>) -> Result<Action, Error> {
    let mut inputs = fetch(&cn, &ctx).await?;
    let pv = pv_name(&cn, &ctx).await?;
    if inputs.problem.is_none() {
        inputs.problem = name_conflict(&cn, &ctx, &pv).await?;
    }
    let checked = check(&cn, &inputs, &ctx.cfg);
    let port = checked
        .as_ref()
        .map(|v| v.port)
        .unwrap_or_else(|_| cn.spec.workers.port.unwrap_or(DEFAULT_WORKER_PORT));
    let token = inputs.token.clone().unwrap_or_else(new_token);
    let mut obs = match &checked {
        Ok(v) => {
            let children = build::children(
                &cn,
                &BuildInputs {
                    spec: v,
                    token: &token,
                    default_image: &ctx.cfg.worker_image,
                    init_image: &ctx.cfg.worker_init_image,
                    network_policy: ctx.cfg.network_policy.as_ref(),
                    pv_name: Some(&pv),
                },
            );
            apply_children(&cn, &children, &ctx).await?;
            observe(&cn, port, Some(&token), &ctx).await?
        }
        Err(problem) => {
            ctx.metrics.problem(CONTROLLER, problem.reason);
            ctx.event(
                &*cn,
                EventType::Warning,
                problem.reason,
                "Validate",
                problem.message.clone(),
            )
            .await;
            // Whatever runs keeps running; the status still lists its workers.
            observe(&cn, port, inputs.token.as_deref(), &ctx).await?
        }
    };
    if checked.is_ok() {
        obs.scan = scan(&cn, &obs, &token, port, &ctx);
    }
    if host_root(&cn, &ctx.cfg).is_some() {
        let nodes = obs
            .pods
            .iter()
            .filter_map(|p| p.spec.as_ref()?.node_name.clone());
        remember_disk_nodes(&cn, nodes, &ctx).await?;
    }
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let new = status::compute(&cn, port, checked.as_ref().err(), &obs, &now);
    let old_phase = cn.status.as_ref().and_then(|s| s.phase);
    if new.phase != old_phase
        && let Some(phase) = new.phase
    {
        let (type_, reason) = match phase {
            CacheNamespacePhase::Ready => (EventType::Normal, "Ready"),
            CacheNamespacePhase::Pending => (EventType::Normal, "Pending"),
            CacheNamespacePhase::Degraded => (EventType::Warning, "Degraded"),
            CacheNamespacePhase::Failed => (EventType::Warning, "Failed"),
        };
        let ready = new
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| c.message.clone())
            .unwrap_or_default();
        ctx.event(&*cn, type_, reason, "Status", ready).await;
    }
    if cn.status.as_ref() != Some(&new) {
        let api: Api<CacheNamespace> =
            Api::namespaced(ctx.client.clone(), &cn.namespace().unwrap_or_default());
        api.patch_status(
            &cn.name_any(),
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "status": new })),
        )
        .await
        .map_err(kerr(format!(
            "writing the status of CacheNamespace {}",
            key(&*cn)
        )))?;
    }
    Ok(Action::requeue(ctx.cfg.resync))
}

/// Server-side apply of one object we own.
async fn ssa<K>(api: &Api<K>, name: &str, obj: &K) -> Result<K, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    api.patch(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
}

async fn apply_children(cn: &CacheNamespace, c: &Children, ctx: &Context) -> Result<(), Error> {
    let ns = cn.namespace().unwrap_or_default();
    let names = Names::of(&ns, &cn.name_any());
    let client = ctx.client.clone();
    macro_rules! apply_ns {
        ($ty:ty, $obj:expr, $name:expr) => {{
            let api: Api<$ty> = Api::namespaced(client.clone(), &ns);
            ssa(&api, &$name, &$obj).await.map_err(kerr(format!(
                "applying {} {ns}/{}",
                stringify!($ty),
                $name
            )))?;
        }};
    }
    apply_ns!(ConfigMap, c.config_map, names.config_map);
    apply_ns!(Secret, c.token_secret, names.token_secret);
    apply_ns!(Service, c.service, names.service);
    apply_ns!(PodDisruptionBudget, c.pdb, names.pdb);
    if let Some(np) = &c.network_policy {
        apply_ns!(NetworkPolicy, np, names.network_policy);
    }
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    match ssa(&sts, &names.statefulset, &c.statefulset).await {
        Ok(_) => {}
        // Kubernetes refuses changes to a StatefulSet's volume claim templates (a Disk tier that
        // moves to or between storage classes). Replace the StatefulSet but orphan its pods:
        // the new one adopts them and rolls them one by one, so the cache stays up.
        Err(kube::Error::Api(s)) if s.code == 422 && s.message.contains("Forbidden") => {
            ctx.event(
                cn,
                EventType::Normal,
                "RecreatingStatefulSet",
                "Apply",
                format!(
                    "replacing StatefulSet {ns}/{} to change fields Kubernetes does not update in place ({}); its pods keep running and roll one by one",
                    names.statefulset, s.message
                ),
            )
            .await;
            // Only the StatefulSet checked to be ours: a uid precondition, so that one made in
            // its place since then is not deleted.
            let uid = sts
                .get_opt(&names.statefulset)
                .await
                .map_err(kerr(format!(
                    "reading StatefulSet {ns}/{}",
                    names.statefulset
                )))?
                .filter(|o| {
                    o.owner_references()
                        .iter()
                        .any(|r| r.controller == Some(true) && Some(&r.uid) == cn.uid().as_ref())
                })
                .and_then(|o| o.uid());
            let Some(uid) = uid else {
                // Gone, or no longer ours: the next reconcile looks again.
                return Err(Error::Kube {
                    action: format!("replacing StatefulSet {ns}/{}", names.statefulset),
                    source: kube::Error::Api(s),
                });
            };
            let dp = DeleteParams {
                propagation_policy: Some(PropagationPolicy::Orphan),
                preconditions: Some(Preconditions {
                    uid: Some(uid),
                    resource_version: None,
                }),
                ..Default::default()
            };
            sts.delete(&names.statefulset, &dp)
                .await
                .map_err(kerr(format!(
                    "replacing StatefulSet {ns}/{}",
                    names.statefulset
                )))?;
            // The orphaning delete finishes in the background; the next reconcile applies.
            return Err(Error::Kube {
                action: format!("replacing StatefulSet {ns}/{}", names.statefulset),
                source: kube::Error::Api(s),
            });
        }
        Err(e) => {
            return Err(kerr(format!(
                "applying StatefulSet {ns}/{}",
                names.statefulset
            ))(e));
        }
    }
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let pv_name = c.pv.name_any();
    match ssa(&pvs, &pv_name, &c.pv).await {
        Ok(_) => {}
        // A PV's source cannot change after creation: one an older operator made (without the
        // publish secret) stays as it is and keeps serving; only token rotation for volumes
        // mounted from it waits until the CacheNamespace is made again.
        Err(kube::Error::Api(s)) if s.code == 422 && pv_name != names.pv => {
            ctx.event(
                cn,
                EventType::Warning,
                "PersistentVolumeKept",
                "Apply",
                format!(
                    "PersistentVolume {pv_name} was made by an older operator and Kubernetes does \
                     not change a PV's source ({}); it keeps serving, but without its \
                     nodePublishSecretRef kubelet cannot hand a replaced data-plane token to \
                     volumes already mounted from it: delete and create the CacheNamespace again \
                     to get a PV that has one",
                    s.message
                ),
            )
            .await;
        }
        Err(e) => return Err(kerr(format!("applying PersistentVolume {pv_name}"))(e)),
    }
    apply_ns!(PersistentVolumeClaim, c.pvc, names.pvc);
    Ok(())
}

async fn observe(
    cn: &CacheNamespace,
    port: i32,
    token: Option<&str>,
    ctx: &Context,
) -> Result<Observed, Error> {
    let ns = cn.namespace().unwrap_or_default();
    let name = cn.name_any();
    let names = Names::of(&ns, &name);
    let sts: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &ns);
    let uid = cn.uid();
    // Only ours: a foreign StatefulSet of the same name says nothing about this one's workers.
    let statefulset = sts
        .get_opt(&names.statefulset)
        .await
        .map_err(kerr(format!(
            "reading StatefulSet {ns}/{}",
            names.statefulset
        )))?
        .filter(|o| {
            o.owner_references()
                .iter()
                .any(|r| r.controller == Some(true) && Some(&r.uid) == uid.as_ref())
        });
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let pods = pods
        .list(&ListParams::default().labels(&build::selector_string(&name)))
        .await
        .map_err(kerr(format!("listing the worker pods of {ns}/{name}")))?
        .items;
    let mut infos = vec![];
    if let Some(token) = token {
        let ready: Vec<_> = status::workers(&pods, port)
            .into_iter()
            .filter(|w| w.ready)
            .collect();
        let calls = ready.iter().map(|w| {
            let r = WorkerRef {
                name: w.name.clone(),
                address: w.address.clone(),
                token: token.to_string(),
            };
            async move {
                let info = ctx.workers.info(&r).await.map_err(|e| e.message);
                (r.name, info)
            }
        });
        infos = futures::future::join_all(calls).await;
    }
    Ok(Observed {
        statefulset,
        pods,
        infos,
        scan: None,
    })
}

/// The latest scan result, starting a scan when none is recent and a worker is ready.
fn scan(
    cn: &CacheNamespace,
    obs: &Observed,
    token: &str,
    port: i32,
    ctx: &Arc<Context>,
) -> Option<ScanResult> {
    let uid = cn.uid()?;
    let interval = ctx.cfg.source_scan_interval;
    let mut scans = ctx.scans.lock();
    let (latest, due) = match scans.get(&uid) {
        None => (None, true),
        Some(ScanState::Running { .. }) => (None, false),
        Some(ScanState::Done { result, started }) => {
            (Some(result.clone()), started.elapsed() >= interval)
        }
        Some(ScanState::Failed { started, message }) => {
            tracing::debug!(cache_namespace = %key(cn), %message, "last source scan failed");
            (
                None,
                started.elapsed() >= interval.min(Duration::from_secs(60)),
            )
        }
    };
    let worker = status::workers(&obs.pods, port)
        .into_iter()
        .find(|w| w.ready && obs.infos.iter().any(|(n, r)| *n == w.name && r.is_ok()));
    if due && let Some(w) = worker {
        let started = Instant::now();
        scans.insert(uid.clone(), ScanState::Running { started });
        let r = WorkerRef {
            name: w.name,
            address: w.address,
            token: token.into(),
        };
        let ctx = ctx.clone();
        let cn_key = key(cn);
        tokio::spawn(async move {
            let outcome = run_scan(&ctx, &r, &uid).await;
            let state = match outcome {
                Ok(result) => {
                    tracing::info!(cache_namespace = %cn_key, files = result.files, bytes = result.bytes, "source scanned");
                    ScanState::Done { result, started }
                }
                Err(message) => {
                    tracing::warn!(cache_namespace = %cn_key, %message, "source scan failed");
                    ScanState::Failed { message, started }
                }
            };
            // A scan of a CacheNamespace deleted meanwhile is dropped.
            let mut scans = ctx.scans.lock();
            if scans.contains_key(&uid) {
                scans.insert(uid, state);
            }
        });
    }
    latest
}

async fn run_scan(ctx: &Context, w: &WorkerRef, uid: &str) -> Result<ScanResult, String> {
    let id = format!(
        "scan-{uid}-{}",
        k8s_openapi::jiff::Timestamp::now().as_second()
    );
    ctx.workers
        .start_preload(
            w,
            pb::StartPreloadRequest {
                id: id.clone(),
                paths: vec!["**".into()],
                metadata_only: true,
                members: vec![],
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut stream = ctx
        .workers
        .watch_preload(w, &id)
        .await
        .map_err(|e| e.to_string())?;
    let mut last = None;
    let deadline = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            item = stream.next() => match item {
                Some(Ok(s)) => last = Some(s),
                Some(Err(e)) => return Err(e.to_string()),
                None => break,
            },
            _ = &mut deadline => return Err("the scan took more than an hour".into()),
        }
    }
    let s = last.ok_or("the worker ended the scan without a status")?;
    if s.phase != pb::PreloadPhase::Succeeded as i32 {
        let why = s
            .failures
            .first()
            .map(|f| format!("{}: {}", f.path, f.reason))
            .unwrap_or_default();
        return Err(format!("the scan did not succeed: {why}"));
    }
    Ok(ScanResult {
        files: s.files_total as i64,
        bytes: s.matched_bytes as i64,
        at: Time(k8s_openapi::jiff::Timestamp::now()),
    })
}

/// The allowed root of `cn`'s host-path Disk tier, if it has one that the operator allows (only
/// then were node directories made).
fn host_root(cn: &CacheNamespace, cfg: &crate::Config) -> Option<String> {
    let v = cn.spec.validate().ok()?;
    match v.disk?.location {
        DiskLocation::HostPath(p) => {
            build::host_path_root(&p, &cfg.allowed_host_path_roots).map(String::from)
        }
        DiskLocation::StorageClass(_) => None,
    }
}

/// Adds `nodes` to the CacheNamespace's list of nodes that hold its Disk tier directory.
async fn remember_disk_nodes(
    cn: &CacheNamespace,
    nodes: impl Iterator<Item = String>,
    ctx: &Context,
) -> Result<std::collections::BTreeSet<String>, Error> {
    let known = node_dirs::parse_nodes(cn.annotations().get(node_dirs::DISK_NODES_ANNOTATION));
    let mut all = known.clone();
    all.extend(nodes);
    if all != known {
        let api: Api<CacheNamespace> =
            Api::namespaced(ctx.client.clone(), &cn.namespace().unwrap_or_default());
        let patch = serde_json::json!({"metadata": {"annotations": {
            node_dirs::DISK_NODES_ANNOTATION: node_dirs::format_nodes(&all),
        }}});
        api.patch(
            &cn.name_any(),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await
        .map_err(kerr(format!(
            "recording the Disk tier's nodes on CacheNamespace {}",
            key(cn)
        )))?;
    }
    Ok(all)
}

/// Removes the Disk tier's directory from every node that held one (see [`node_dirs`]): the
/// workers stop first, then a pod per node removes it. `Err(Waiting)` until done.
async fn remove_node_dirs(cn: &CacheNamespace, ctx: &Context, root: &str) -> Result<(), Error> {
    let ns = cn.namespace().unwrap_or_default();
    let name = cn.name_any();
    let uid = cn.uid().unwrap_or_default();
    let names = Names::of(&ns, &name);
    let sts: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &ns);
    if let Holder::Us = holder(&sts, &names.statefulset, &uid)
        .await
        .map_err(kerr(format!(
            "reading StatefulSet {ns}/{}",
            names.statefulset
        )))?
    {
        match sts
            .delete(&names.statefulset, &DeleteParams::background())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                return Err(kerr(format!(
                    "deleting StatefulSet {ns}/{}",
                    names.statefulset
                ))(e));
            }
        }
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let prefix = format!("{}-", names.statefulset);
    let workers: Vec<Pod> = pods
        .list(&ListParams::default().labels(&build::selector_string(&name)))
        .await
        .map_err(kerr(format!("listing the worker pods of {ns}/{name}")))?
        .items
        .into_iter()
        .filter(|p| p.name_any().starts_with(&prefix))
        .collect();
    let nodes = remember_disk_nodes(
        cn,
        workers
            .iter()
            .filter_map(|p| p.spec.as_ref()?.node_name.clone()),
        ctx,
    )
    .await?;
    if !workers.is_empty() {
        return Err(Error::Waiting(format!(
            "{} worker pods of {ns}/{name} to stop before their node directories are removed",
            workers.len()
        )));
    }
    let own = &ctx.cfg.own_namespace;
    let cleaners: Api<Pod> = Api::namespaced(ctx.client.clone(), own);
    let now = k8s_openapi::jiff::Timestamp::now();
    let (mut pending, mut finished, mut given_up) = (vec![], vec![], vec![]);
    for node in &nodes {
        let pod_name = node_dirs::pod_name(&uid, node);
        let existing = cleaners
            .get_opt(&pod_name)
            .await
            .map_err(kerr(format!("reading Pod {own}/{pod_name}")))?;
        match existing {
            None => {
                let pod = node_dirs::cleanup_pod(&node_dirs::CleanupInputs {
                    uid: &uid,
                    namespace: &ns,
                    name: &name,
                    root,
                    node,
                    pod_namespace: own,
                    image: &ctx.cfg.worker_init_image,
                });
                match cleaners.create(&PostParams::default(), &pod).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 409 => {}
                    Err(e) => return Err(kerr(format!("creating Pod {own}/{pod_name}"))(e)),
                }
                pending.push(node.clone());
            }
            Some(p) => {
                let phase = p.status.as_ref().and_then(|s| s.phase.clone());
                let age = p
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|t| now.as_second() - t.0.as_second())
                    .unwrap_or(0);
                if phase.as_deref() == Some("Succeeded") {
                    finished.push(pod_name);
                } else if age >= ctx.cfg.disk_cleanup_timeout.as_secs() as i64 {
                    given_up.push((node.clone(), pod_name));
                } else {
                    pending.push(node.clone());
                }
            }
        }
    }
    if !pending.is_empty() {
        return Err(Error::Waiting(format!(
            "removing the Disk tier directory {} on nodes {}",
            build::host_dir(root, &ns, &name),
            pending.join(", ")
        )));
    }
    for (node, _) in &given_up {
        ctx.event(
            cn,
            EventType::Warning,
            "NodeDirectoryLeft",
            "Delete",
            format!(
                "the Disk tier directory {} on node {node} was not removed within {}s (the node                  may be gone or not ready): remove it by hand if the node comes back",
                build::host_dir(root, &ns, &name),
                ctx.cfg.disk_cleanup_timeout.as_secs()
            ),
        )
        .await;
    }
    for pod_name in finished.iter().chain(given_up.iter().map(|(_, p)| p)) {
        match cleaners.delete(pod_name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(kerr(format!("deleting Pod {own}/{pod_name}"))(e)),
        }
    }
    if !finished.is_empty() {
        tracing::info!(cache_namespace = %key(cn), nodes = finished.len(), "node directories removed");
    }
    Ok(())
}

async fn cleanup(cn: Arc<CacheNamespace>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = cn.namespace().unwrap_or_default();
    let names = Names::of(&ns, &cn.name_any());
    if let Some(root) = host_root(&cn, &ctx.cfg) {
        remove_node_dirs(&cn, &ctx, &root).await?;
    }
    let pv_name = pv_name(&cn, &ctx).await?;
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    if let Some(pv) = pvs
        .get_opt(&pv_name)
        .await
        .map_err(kerr(format!("reading PersistentVolume {pv_name}")))?
    {
        // Only a PV we made for this very CacheNamespace (its uid), and only that one.
        let legacy = pv_name != names.pv;
        let ours = pv_is_ours(
            &pv,
            &ns,
            &cn.name_any(),
            &cn.uid().unwrap_or_default(),
            legacy,
        );
        if ours {
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: pv.uid(),
                    resource_version: None,
                }),
                ..Default::default()
            };
            match pvs.delete(&pv_name, &dp).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(kerr(format!("deleting PersistentVolume {pv_name}"))(e)),
            }
        }
    }
    if let Some(uid) = cn.uid() {
        ctx.scans.lock().remove(&uid);
    }
    ctx.event(
        &*cn,
        EventType::Normal,
        "CleanedUp",
        "Delete",
        format!(
            "deleted PersistentVolume {pv_name}; the other children go with the CacheNamespace"
        ),
    )
    .await;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lakecache_api::{CacheNamespaceSpec, SourceSpec, TierKind, TierSpec};

    fn with_disk(path: &str) -> CacheNamespace {
        let mut cn = CacheNamespace::new(
            "imagenet",
            CacheNamespaceSpec {
                source: SourceSpec {
                    uri: "s3://datasets/imagenet".into(),
                    ..Default::default()
                },
                workers: Default::default(),
                tiers: vec![TierSpec {
                    kind: TierKind::Disk,
                    size: "1Gi".into(),
                    path: Some(path.into()),
                    storage_class_name: None,
                }],
                block_size: None,
                metadata: Default::default(),
            },
        );
        cn.metadata.namespace = Some("ml".into());
        cn
    }

    fn checked(path: &str, roots: &[&str]) -> Result<ValidSpec, Problem> {
        let cfg = crate::Config {
            allowed_host_path_roots: roots.iter().map(|r| r.to_string()).collect(),
            ..Default::default()
        };
        let inputs = Inputs {
            token: None,
            problem: None,
        };
        check(&with_disk(path), &inputs, &cfg)
    }

    #[test]
    fn a_disk_path_must_name_an_allowed_root() {
        let v = checked("/var/lib/lakecache/", &["/var/lib/lakecache"]).unwrap();
        assert_eq!(
            v.disk.unwrap().location,
            DiskLocation::HostPath("/var/lib/lakecache".into())
        );
        for bad in [
            "/etc",
            "/var/lib/lakecache-evil",
            "/var/lib/lakecache/other",
        ] {
            let p = checked(bad, &["/var/lib/lakecache"]).unwrap_err();
            assert_eq!(p.reason, "HostPathNotAllowed", "{bad}");
            assert!(p.message.contains("spec.tiers[0].path"), "{}", p.message);
            assert!(p.message.contains("/var/lib/lakecache"), "{}", p.message);
            assert!(p.message.contains("storageClassName"), "{}", p.message);
        }
        let p = checked("/var/lib/lakecache", &[]).unwrap_err();
        assert_eq!(p.reason, "HostPathNotAllowed");
        assert!(
            p.message
                .contains("allows no Disk tier on a node directory")
        );
        assert!(host_root(&with_disk("/var/lib/lakecache"), &crate::Config::default()).is_some());
        assert!(host_root(&with_disk("/etc"), &crate::Config::default()).is_none());
    }

    #[test]
    fn a_pv_is_ours_only_when_it_names_our_namespace_name_and_uid() {
        let pv = |ns: &str, name: &str, uid: Option<&str>| {
            let mut p = PersistentVolume::default();
            p.metadata.labels = Some(
                [
                    (build::NAMESPACE_LABEL.to_string(), ns.to_string()),
                    (build::CACHE_NAMESPACE_LABEL.to_string(), name.to_string()),
                ]
                .into(),
            );
            p.metadata.annotations =
                uid.map(|u| [(build::OWNER_UID_ANNOTATION.to_string(), u.to_string())].into());
            p
        };
        assert!(pv_is_ours(
            &pv("a", "b-c", Some("u1")),
            "a",
            "b-c",
            "u1",
            false
        ));
        // Another CacheNamespace's (the old name scheme made a/b-c and a-b/c share one).
        assert!(!pv_is_ours(
            &pv("a-b", "c", Some("u2")),
            "a",
            "b-c",
            "u1",
            false
        ));
        // An earlier CacheNamespace of the same name.
        assert!(!pv_is_ours(
            &pv("a", "b-c", Some("u0")),
            "a",
            "b-c",
            "u1",
            false
        ));
        assert!(!pv_is_ours(
            &pv("a", "b-c", Some("u0")),
            "a",
            "b-c",
            "u1",
            true
        ));
        // An older operator's PV, which our own claim is bound to: ours until annotated.
        assert!(pv_is_ours(&pv("a", "b-c", None), "a", "b-c", "u1", true));
        assert!(!pv_is_ours(&pv("a", "b-c", None), "a", "b-c", "u1", false));
        // Anyone's PV without our labels.
        assert!(!pv_is_ours(
            &PersistentVolume::default(),
            "a",
            "b-c",
            "u1",
            true
        ));
    }
}
