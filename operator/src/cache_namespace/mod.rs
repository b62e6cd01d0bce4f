//! The CacheNamespace controller.
//!
//! One reconcile: fetch what the object refers to (its credentials Secret, its token Secret) →
//! check the spec into a [`ValidSpec`] or a [`Problem`] (no I/O) → build every child
//! ([`build`], no I/O) → apply them with server-side apply → observe the StatefulSet, the worker
//! pods and what each ready worker says → compute the status ([`status`], no I/O) → write it.
//!
//! A problem with the object (an invalid spec, a missing Secret) changes nothing that runs: the
//! children stay as they were, the workers keep serving what they cached, and the status says
//! Failed with a condition and a Warning Event that name what to fix. The object is looked at
//! again every resync, so fixing the Secret is noticed without touching the CacheNamespace.
//!
//! The source's size (for the cached percentage) comes from a metadata-only preload of `**`
//! on one ready worker, run in the background every `source_scan_interval`.

pub mod build;
pub mod status;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, PersistentVolume, PersistentVolumeClaim, Pod, Secret, Service,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PropagationPolicy};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, Resource, ResourceExt};
use lakecache_api::{CacheNamespace, CacheNamespacePhase, DEFAULT_WORKER_PORT, ValidSpec};
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
    )
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

fn check(cn: &CacheNamespace, inputs: &Inputs) -> Result<ValidSpec, Problem> {
    if let Some(p) = &inputs.problem {
        return Err(p.clone());
    }
    cn.spec.validate().map_err(|e| Problem {
        reason: "InvalidSpec",
        message: e.to_string(),
    })
}

async fn apply(cn: Arc<CacheNamespace>, ctx: Arc<Context>) -> Result<Action, Error> {
    let inputs = fetch(&cn, &ctx).await?;
    let checked = check(&cn, &inputs);
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
            let dp = DeleteParams {
                propagation_policy: Some(PropagationPolicy::Orphan),
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
    ssa(&pvs, &names.pv, &c.pv)
        .await
        .map_err(kerr(format!("applying PersistentVolume {}", names.pv)))?;
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
    let statefulset = sts.get_opt(&names.statefulset).await.map_err(kerr(format!(
        "reading StatefulSet {ns}/{}",
        names.statefulset
    )))?;
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

async fn cleanup(cn: Arc<CacheNamespace>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = cn.namespace().unwrap_or_default();
    let names = Names::of(&ns, &cn.name_any());
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    if let Some(pv) = pvs
        .get_opt(&names.pv)
        .await
        .map_err(kerr(format!("reading PersistentVolume {}", names.pv)))?
    {
        // Only a PV we made: its claim is this CacheNamespace's claim.
        let ours = pv.labels().get(build::CACHE_NAMESPACE_LABEL) == Some(&cn.name_any())
            && pv.labels().get("lakecache.io/namespace") == Some(&ns);
        if ours {
            match pvs.delete(&names.pv, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(kerr(format!("deleting PersistentVolume {}", names.pv))(e)),
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
            "deleted PersistentVolume {}; the other children go with the CacheNamespace",
            names.pv
        ),
    )
    .await;
    Ok(Action::await_change())
}
