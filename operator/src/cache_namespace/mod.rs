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
//! rewrite or delete what is not theirs. The status says NameConflict and names the object. A
//! missing child is created (AlreadyExists if one appeared meanwhile: looked at again), and only
//! a child that is ours is applied over with `force`, with its uid as a precondition ([`put`]).
//!
//! The worker pods are those whose controller is this CacheNamespace's StatefulSet (by uid) and
//! whose name is one of its ordinals: the labels alone are anyone's to set.
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
    ConfigMap, Node, PersistentVolume, PersistentVolumeClaim, Pod, Secret, Service,
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
    CacheNamespace, CacheNamespacePhase, DEFAULT_WORKER_PORT, DiskLocation, NodeDirectory,
    ValidSpec,
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
        Some(o) if controlled_by(&o, uid) => Holder::Us,
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
        .filter(|c| controlled_by(c, &uid))
        .and_then(|c| c.spec?.volume_name)
        .filter(|v| !v.is_empty());
    Ok(bound.unwrap_or(names.pv))
}

async fn apply(cn: Arc<CacheNamespace>, ctx: Arc<Context>) -> Result<Action, Error> {
    import_disk_nodes(&cn, &ctx).await?;
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
    // Written with the rest of the status below.
    let disk_directories = record_disk_directories(&cn, &obs.pods, false, &ctx).await?;
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let mut new = status::compute(&cn, port, checked.as_ref().err(), &obs, &now);
    new.disk_directories = disk_directories;
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
        write_status(&cn, serde_json::to_value(&new).unwrap_or_default(), &ctx).await?;
    }
    Ok(Action::requeue(ctx.cfg.resync))
}

/// Merges `status` into the CacheNamespace's status, only if the object is still the one read
/// (its resourceVersion): a status computed from an older read would drop node directories
/// recorded since. A conflict is retried shortly, with a fresh read.
async fn write_status(
    cn: &CacheNamespace,
    status: serde_json::Value,
    ctx: &Context,
) -> Result<(), Error> {
    let api: Api<CacheNamespace> =
        Api::namespaced(ctx.client.clone(), &cn.namespace().unwrap_or_default());
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": cn.resource_version()},
        "status": status,
    });
    match api
        .patch_status(
            &cn.name_any(),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Err(Error::Waiting(format!(
            "CacheNamespace {} changed since it was read; its status is written on the next look",
            key(cn)
        ))),
        Err(e) => Err(kerr(format!(
            "writing the status of CacheNamespace {}",
            key(cn)
        ))(e)),
    }
}

/// Whether `pod` is one of StatefulSet `sts`'s workers: its controller is `sts` (by uid) and its
/// name is `STS-N` for an ordinal below the StatefulSet's replicas. The StatefulSet controller
/// adopts an orphan pod with its labels and a member's name, so a pod a tenant made with the
/// labels and, say, `NAME-worker-7` would have `sts` as controller until scaled away.
fn is_worker(pod: &Pod, sts: &StatefulSet) -> bool {
    let Some(uid) = sts.uid() else { return false };
    let replicas = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let name = pod.name_any();
    let member = name
        .strip_prefix(&format!("{}-", sts.name_any()))
        .and_then(|n| Some((n, n.parse::<i32>().ok()?)))
        .is_some_and(|(n, i)| i.to_string() == n && (0..replicas).contains(&i));
    member && controlled_by(pod, &uid)
}

/// Whether `o`'s controller is the object of uid `uid`.
fn controlled_by(o: &impl Resource, uid: &str) -> bool {
    o.meta()
        .owner_references
        .iter()
        .flatten()
        .any(|r| r.controller == Some(true) && r.uid == uid)
}

/// Adds the host-path Disk tier directory of each of `pods` (the workers of this
/// CacheNamespace's own StatefulSet) to `status.diskDirectories`, and returns the list; with
/// `write`, writes it when it changed. Only through the status subresource, which tenants
/// cannot write.
async fn record_disk_directories(
    cn: &CacheNamespace,
    pods: &[Pod],
    write: bool,
    ctx: &Context,
) -> Result<Vec<NodeDirectory>, Error> {
    let ns = cn.namespace().unwrap_or_default();
    let name = cn.name_any();
    let known = cn
        .status
        .as_ref()
        .map(|s| s.disk_directories.clone())
        .unwrap_or_default();
    let found = pods
        .iter()
        .filter_map(|p| node_dirs::of_pod(p, &ns, &name, &ctx.cfg.allowed_host_path_roots));
    let (all, left_out) = node_dirs::merge(&known, found);
    if left_out > 0 {
        ctx.event(
            cn,
            EventType::Warning,
            "NodeDirectoriesNotRecorded",
            "Record",
            format!(
                "status.diskDirectories holds at most {} directories: {left_out} more were not \
                 recorded and will not be removed when the CacheNamespace is deleted",
                node_dirs::MAX_DIRECTORIES
            ),
        )
        .await;
    }
    if write && all != known {
        write_status(cn, serde_json::json!({ "diskDirectories": all }), ctx).await?;
    }
    Ok(all)
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

/// What [`put`] did.
enum Put {
    Done,
    /// The name is taken by an object that is not ours (made since [`name_conflict`] looked):
    /// nothing was written; the next reconcile names it.
    Foreign,
}

/// Writes child `obj` named `name`: created when nothing has the name (a create fails with
/// AlreadyExists if something appeared meanwhile, and is looked at again), applied over with
/// `force` only when the object there is ours (`ours`), with its uid in the applied object so
/// that one made in its place meanwhile is refused, not taken over.
async fn put<K>(
    api: &Api<K>,
    name: &str,
    obj: &K,
    ours: impl Fn(&K) -> bool,
) -> Result<Put, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    match api.get_opt(name).await? {
        None => {
            let pp = PostParams {
                field_manager: Some(MANAGER.into()),
                ..Default::default()
            };
            match api.create(&pp, obj).await {
                Ok(created) => {
                    take_as_applied(api, name, &created).await?;
                    Ok(Put::Done)
                }
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(Put::Foreign),
                Err(e) => Err(e),
            }
        }
        Some(existing) if ours(&existing) => {
            let mut o = obj.clone();
            o.meta_mut().uid = existing.meta().uid.clone();
            ssa(api, name, &o).await.map(|_| Put::Done)
        }
        Some(_) => Ok(Put::Foreign),
    }
}

/// Turns the fields a create recorded for [`MANAGER`] (an Update) into its server-side apply's
/// (as client-go's csaupgrade does), so that a field the next apply leaves out is removed, not
/// kept by the create's entry.
async fn take_as_applied<K>(api: &Api<K>, name: &str, created: &K) -> Result<(), kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let mut fields = created.meta().managed_fields.clone().unwrap_or_default();
    let mut changed = false;
    for f in &mut fields {
        if f.manager.as_deref() == Some(MANAGER) && f.operation.as_deref() == Some("Update") {
            f.operation = Some("Apply".into());
            changed = true;
        }
    }
    if !changed {
        return Ok(());
    }
    let patch = serde_json::json!({"metadata": {
        "uid": created.meta().uid,
        "resourceVersion": created.meta().resource_version,
        "managedFields": fields,
    }});
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        Ok(_) => {}
        // Changed meanwhile, or refused: the fields stay co-owned by the create, which matters
        // only for a field a later apply drops; the object is ours either way.
        Err(e) => {
            tracing::warn!(object = name, error = %e, "could not hand a created object's fields to server-side apply")
        }
    }
    Ok(())
}

async fn apply_children(cn: &CacheNamespace, c: &Children, ctx: &Context) -> Result<(), Error> {
    let ns = cn.namespace().unwrap_or_default();
    let names = Names::of(&ns, &cn.name_any());
    let uid = cn.uid().unwrap_or_default();
    let client = ctx.client.clone();
    let foreign = |kind: &str, name: &str| {
        Error::Waiting(format!(
            "{kind} {name} was made by someone else since the names were checked; \
             the next look reports the conflict"
        ))
    };
    macro_rules! apply_ns {
        ($ty:ty, $obj:expr, $name:expr) => {{
            let api: Api<$ty> = Api::namespaced(client.clone(), &ns);
            let done = put(&api, &$name, &$obj, |o| controlled_by(o, &uid))
                .await
                .map_err(kerr(format!("applying {} {ns}/{}", stringify!($ty), $name)))?;
            if let Put::Foreign = done {
                return Err(foreign(stringify!($ty), &format!("{ns}/{}", $name)));
            }
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
    match put(&sts, &names.statefulset, &c.statefulset, |o| {
        controlled_by(o, &uid)
    })
    .await
    {
        Ok(Put::Done) => {}
        Ok(Put::Foreign) => {
            return Err(foreign(
                "StatefulSet",
                &format!("{ns}/{}", names.statefulset),
            ));
        }
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
                .filter(|o| cn.uid().is_some_and(|u| controlled_by(o, &u)))
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
    let legacy = pv_name != names.pv;
    let cn_name = cn.name_any();
    match put(&pvs, &pv_name, &c.pv, |pv| {
        pv_is_ours(pv, &ns, &cn_name, &uid, legacy)
    })
    .await
    {
        Ok(Put::Done) => {}
        Ok(Put::Foreign) => return Err(foreign("PersistentVolume", &pv_name)),
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
        .filter(|o| uid.as_ref().is_some_and(|u| controlled_by(o, u)));
    // Only the pods of our StatefulSet: anyone who may create pods in the namespace can give one
    // the workers' labels, and the workers' list is what readers (and preloads, with the token)
    // connect to.
    let pods: Vec<Pod> = match &statefulset {
        None => vec![],
        Some(s) => Api::<Pod>::namespaced(ctx.client.clone(), &ns)
            .list(&ListParams::default().labels(&build::selector_string(&name)))
            .await
            .map_err(kerr(format!("listing the worker pods of {ns}/{name}")))?
            .items
            .into_iter()
            .filter(|p| is_worker(p, s))
            .collect(),
    };
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
    let p = spec_host_path(cn)?;
    build::host_path_root(&p, &cfg.allowed_host_path_roots).map(String::from)
}

/// The path of `cn`'s host-path Disk tier as its spec says now, if it has one.
fn spec_host_path(cn: &CacheNamespace) -> Option<String> {
    match cn.spec.validate().ok()?.disk?.location {
        DiskLocation::HostPath(p) => Some(p),
        DiskLocation::StorageClass(_) => None,
    }
}

/// Imports the nodes an older operator listed in the `lakecache.io/disk-nodes` annotation into
/// `status.diskDirectories`, once: only while that list is empty, each paired with the
/// directory of the spec's current host-path Disk tier below an allowed (or retired) root, and
/// only nodes that exist as Node objects. Then removes the annotation. Anyone who may edit the
/// CacheNamespace may write the annotation, so it can name nothing but this CacheNamespace's
/// own directory on real nodes. `Err(Waiting)` when it changed the object (the caller's copy is
/// stale then), `Ok` when there was nothing to do.
async fn import_disk_nodes(cn: &CacheNamespace, ctx: &Context) -> Result<(), Error> {
    let Some(value) = cn.annotations().get(node_dirs::DISK_NODES_ANNOTATION) else {
        return Ok(());
    };
    let ns = cn.namespace().unwrap_or_default();
    let name = cn.name_any();
    let recorded = cn
        .status
        .as_ref()
        .is_some_and(|s| !s.disk_directories.is_empty());
    let mut imported = vec![];
    if !recorded {
        let nodes: Api<Node> = Api::all(ctx.client.clone());
        let candidates = node_dirs::from_annotation(
            value,
            spec_host_path(cn).as_deref(),
            &ctx.cfg.cleanup_roots(),
            &ns,
            &name,
        );
        for d in candidates {
            if nodes
                .get_opt(&d.node)
                .await
                .map_err(kerr(format!("reading Node {}", d.node)))?
                .is_some()
            {
                imported.push(d);
            }
        }
        if !imported.is_empty() {
            write_status(cn, serde_json::json!({ "diskDirectories": imported }), ctx).await?;
        }
    }
    let api: Api<CacheNamespace> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = serde_json::json!({"metadata": {"annotations": {
        node_dirs::DISK_NODES_ANNOTATION: null,
    }}});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .map_err(kerr(format!(
            "removing the {} annotation of CacheNamespace {}",
            node_dirs::DISK_NODES_ANNOTATION,
            key(cn)
        )))?;
    tracing::info!(cache_namespace = %key(cn), imported = imported.len(), "the old disk-nodes annotation imported and removed");
    Err(Error::Waiting(format!(
        "the {} annotation of {} imported ({} node directories) and removed",
        node_dirs::DISK_NODES_ANNOTATION,
        key(cn),
        imported.len()
    )))
}

/// Removes the Disk tier's directories from every node that held one (see [`node_dirs`]): the
/// workers stop first, then a pod per node and directory removes it. `Err(Waiting)` until done.
async fn remove_node_dirs(cn: &CacheNamespace, ctx: &Context) -> Result<(), Error> {
    let ns = cn.namespace().unwrap_or_default();
    let name = cn.name_any();
    let uid = cn.uid().unwrap_or_default();
    let names = Names::of(&ns, &name);
    let sts: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &ns);
    let ours = sts
        .get_opt(&names.statefulset)
        .await
        .map_err(kerr(format!(
            "reading StatefulSet {ns}/{}",
            names.statefulset
        )))?
        .filter(|o| controlled_by(o, &uid));
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let labelled = pods
        .list(&ListParams::default().labels(&build::selector_string(&name)))
        .await
        .map_err(kerr(format!("listing the worker pods of {ns}/{name}")))?
        .items;
    // The workers: pods whose controller is our StatefulSet, or, once it is gone, a
    // StatefulSet of its name (the garbage collector removes those of a deleted one). A pod
    // that merely carries the labels neither waits nor names a directory.
    let workers: Vec<Pod> = labelled
        .into_iter()
        .filter(|p| match ours.as_ref().and_then(|s| s.uid()) {
            Some(sts_uid) => controlled_by(p, &sts_uid),
            None => p.owner_references().iter().any(|r| {
                r.controller == Some(true) && r.kind == "StatefulSet" && r.name == names.statefulset
            }),
        })
        .collect();
    // The status from a fresh read: the controller's copy may lag the one written on the last
    // pass, and directories recorded there would be missed.
    let fresh = Api::<CacheNamespace>::namespaced(ctx.client.clone(), &ns)
        .get(&name)
        .await
        .map_err(kerr(format!("reading CacheNamespace {}", key(cn))))?;
    let dirs = if let Some(s) = &ours {
        let members: Vec<Pod> = workers
            .iter()
            .filter(|p| is_worker(p, s))
            .cloned()
            .collect();
        record_disk_directories(&fresh, &members, true, ctx).await?
    } else {
        // A pod the StatefulSet made after the last look (between the list and its deletion)
        // is recorded now: it can name only this CacheNamespace's own directory below an
        // allowed root.
        record_disk_directories(&fresh, &workers, true, ctx).await?
    };
    if ours.is_some() {
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
    if !workers.is_empty() {
        return Err(Error::Waiting(format!(
            "{} worker pods of {ns}/{name} to stop before their node directories are removed",
            workers.len()
        )));
    }
    let own = &ctx.cfg.own_namespace;
    let cleaners: Api<Pod> = Api::namespaced(ctx.client.clone(), own);
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let now = k8s_openapi::jiff::Timestamp::now();
    let timeout = ctx.cfg.disk_cleanup_timeout.as_secs() as i64;
    // How long the deletion has been going on: what a node's cleanup is measured against when
    // its pod cannot be made at all.
    let deleting_for = cn
        .metadata
        .deletion_timestamp
        .as_ref()
        .map(|t| now.as_second() - t.0.as_second())
        .unwrap_or(0);
    let mut pending = vec![];
    let mut finished = vec![];
    let mut given_up: Vec<(&NodeDirectory, Option<String>, String)> = vec![];
    // Checked again here, not only when recorded: whoever may write the status subresource
    // could list any path, and a root may have been removed from the allowed ones since.
    let roots = ctx.cfg.cleanup_roots();
    let mut skipped = vec![];
    for d in &dirs {
        let pod_name = node_dirs::pod_name(&uid, &d.node, &d.path);
        if let Err(why) = node_dirs::removable(&d.path, &ns, &name, &roots) {
            tracing::warn!(cache_namespace = %key(cn), node = %d.node, path = %d.path, %why, "recorded directory skipped");
            skipped.push(format!("{} on node {} ({why})", d.path, d.node));
            continue;
        }
        let Some(pod) = node_dirs::cleanup_pod(&node_dirs::CleanupInputs {
            uid: &uid,
            namespace: &ns,
            name: &name,
            path: &d.path,
            roots: &roots,
            node: &d.node,
            pod_namespace: own,
            image: &ctx.cfg.worker_init_image,
        }) else {
            continue;
        };
        let existing = cleaners
            .get_opt(&pod_name)
            .await
            .map_err(kerr(format!("reading Pod {own}/{pod_name}")))?;
        match existing {
            None => {
                let node = nodes
                    .get_opt(&d.node)
                    .await
                    .map_err(kerr(format!("reading Node {}", d.node)))?;
                if node.is_none() {
                    ctx.event(
                        cn,
                        EventType::Warning,
                        "NodeDirectoryLeft",
                        "Delete",
                        format!(
                            "the Disk tier directory {} was not removed from node {}: there is \
                             no such Node (any more); remove it by hand if the node comes back",
                            d.path, d.node
                        ),
                    )
                    .await;
                    continue;
                }
                match cleaners.create(&PostParams::default(), &pod).await {
                    Ok(_) => pending.push(d.node.clone()),
                    Err(kube::Error::Api(s)) if s.code == 409 => pending.push(d.node.clone()),
                    Err(e) if deleting_for >= timeout => given_up.push((
                        d,
                        None,
                        format!("its cleanup pod could not be created: {e}"),
                    )),
                    Err(e) => {
                        tracing::warn!(cache_namespace = %key(cn), node = %d.node, error = %e, "creating a cleanup pod failed; retrying");
                        pending.push(format!("{} (creating its pod failed: {e})", d.node));
                    }
                }
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
                } else if age >= timeout {
                    given_up.push((
                        d,
                        Some(pod_name),
                        format!(
                            "its cleanup pod did not finish within {timeout}s (the node may be \
                             gone or not ready)"
                        ),
                    ));
                } else {
                    pending.push(d.node.clone());
                }
            }
        }
    }
    if !skipped.is_empty() {
        // One Event for all: the recorder folds Events of one reason and action into one.
        ctx.event(
            cn,
            EventType::Warning,
            "NodeDirectoryLeft",
            "CheckDirectory",
            format!(
                "status.diskDirectories lists directories that were not removed: {}",
                skipped.join("; ")
            ),
        )
        .await;
    }
    if !pending.is_empty() {
        return Err(Error::Waiting(format!(
            "removing the Disk tier directories of {ns}/{name} on nodes {}",
            pending.join(", ")
        )));
    }
    for (d, _, why) in &given_up {
        ctx.event(
            cn,
            EventType::Warning,
            "NodeDirectoryLeft",
            "Delete",
            format!(
                "the Disk tier directory {} on node {} was not removed: {why}; remove it by hand \
                 if the node comes back",
                d.path, d.node
            ),
        )
        .await;
    }
    let to_delete = finished
        .iter()
        .chain(given_up.iter().filter_map(|(_, p, _)| p.as_ref()));
    for pod_name in to_delete {
        match cleaners.delete(pod_name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(kerr(format!("deleting Pod {own}/{pod_name}"))(e)),
        }
    }
    if !finished.is_empty() {
        tracing::info!(cache_namespace = %key(cn), directories = finished.len(), "node directories removed");
    }
    Ok(())
}

async fn cleanup(cn: Arc<CacheNamespace>, ctx: Arc<Context>) -> Result<Action, Error> {
    import_disk_nodes(&cn, &ctx).await?;
    let ns = cn.namespace().unwrap_or_default();
    let names = Names::of(&ns, &cn.name_any());
    let recorded = cn
        .status
        .as_ref()
        .is_some_and(|s| !s.disk_directories.is_empty());
    if recorded || host_root(&cn, &ctx.cfg).is_some() {
        remove_node_dirs(&cn, &ctx).await?;
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
        let cfg = crate::Config {
            allowed_host_path_roots: vec!["/var/lib/lakecache".into()],
            ..Default::default()
        };
        assert!(host_root(&with_disk("/var/lib/lakecache"), &cfg).is_some());
        assert!(host_root(&with_disk("/etc"), &cfg).is_none());
        // By default, no node directory at all.
        assert!(host_root(&with_disk("/var/lib/lakecache"), &crate::Config::default()).is_none());
        let p = check(
            &with_disk("/var/lib/lakecache"),
            &Inputs {
                token: None,
                problem: None,
            },
            &crate::Config::default(),
        )
        .unwrap_err();
        assert_eq!(p.reason, "HostPathNotAllowed");
    }

    #[test]
    fn a_worker_is_a_member_pod_our_statefulset_controls() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
        let mut sts = StatefulSet::default();
        sts.metadata.name = Some("x-worker".into());
        sts.metadata.uid = Some("sts-uid".into());
        sts.spec = Some(k8s_openapi::api::apps::v1::StatefulSetSpec {
            replicas: Some(2),
            ..Default::default()
        });
        let pod = |name: &str, uid: Option<&str>, controller: bool| {
            let mut p = Pod::default();
            p.metadata.name = Some(name.into());
            p.metadata.owner_references = uid.map(|u| {
                vec![OwnerReference {
                    uid: u.into(),
                    controller: Some(controller),
                    kind: "StatefulSet".into(),
                    name: "x-worker".into(),
                    ..Default::default()
                }]
            });
            p
        };
        assert!(is_worker(&pod("x-worker-0", Some("sts-uid"), true), &sts));
        assert!(is_worker(&pod("x-worker-1", Some("sts-uid"), true), &sts));
        for p in [
            pod("x-worker-0", None, false),
            pod("x-worker-0", Some("other"), true),
            pod("x-worker-0", Some("sts-uid"), false),
            pod("x-worker-2", Some("sts-uid"), true),
            pod("x-worker-01", Some("sts-uid"), true),
            pod("x-worker-+1", Some("sts-uid"), true),
            pod("x-worker-fake", Some("sts-uid"), true),
            pod("y-worker-0", Some("sts-uid"), true),
        ] {
            assert!(!is_worker(&p, &sts), "{:?}", p.metadata);
        }
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
