//! The CacheNamespace controller.
//!
//! A CacheNamespace is written by a tenant and becomes what serves their cache: a worker
//! StatefulSet, a headless Service, a ConfigMap with the worker configuration, a data-plane
//! token Secret, a PodDisruptionBudget, an optional NetworkPolicy, and a PersistentVolume and
//! claim of the CSI driver. A reconcile that read, decided and wrote as it went could be tested
//! only against a cluster, and each new rule would be one more branch between two API calls. So
//! one reconcile (`converge`) is a pipeline of steps, each in its own module; the decisions live
//! in the three that do no I/O, which carry most of the unit tests:
//!
//! 1. [`fetch`] (dereference): the Secrets it names, the name of its PersistentVolume, and
//!    whether its children's names are free; what is missing or taken is a
//!    [`Problem`](crate::Problem);
//! 2. [`validate`] (no I/O): the spec and those findings into one
//!    [`ValidSpec`](lakecache_api::ValidSpec) or a problem;
//! 3. [`build`] (no I/O): every child, from the valid spec;
//! 4. [`apply`]: each child with server-side apply, only over objects that are ours;
//! 5. [`observe`]: the StatefulSet, the worker pods and what each ready worker says, with the
//!    latest source size from the background [`scan`];
//! 6. [`status`] (no I/O): phase and conditions from what was observed;
//! 7. [`publish`]: the status written, a change of phase told as an Event.
//!
//! A problem with the object (an invalid spec, a missing Secret, a name taken by an object that
//! is not ours) skips the build and the apply: nothing that runs is changed, the workers keep
//! serving what they cached, and the status says Failed with a condition and a Warning Event
//! that name what to fix. The object is looked at again every resync, so fixing the Secret is
//! noticed without touching the CacheNamespace. Only failures to act are errors, handled by the
//! shared frame in [`crate::controller`].
//!
//! Whose an object is never comes from labels ([`ownership`]): a child is ours when its
//! controller is this CacheNamespace, a worker when its controller is our StatefulSet and its
//! name one of its ordinals. Deleting a CacheNamespace runs `finalize` under a finalizer: the
//! steps of [`cleanup`] remove what owner references cannot, the PersistentVolume and the Disk
//! tier's node directories ([`node_dirs`]). Both start by importing, once, the node list an
//! older operator kept in an annotation (`cleanup::import_disk_nodes`).

pub mod apply;
pub mod build;
pub mod cleanup;
pub mod fetch;
pub mod node_dirs;
pub mod observe;
pub mod ownership;
pub mod publish;
pub mod scan;
pub mod status;
pub mod validate;

use std::sync::Arc;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, ResourceExt};
use lakecache_api::CacheNamespace;

use self::build::BuildInputs;
pub use self::scan::ScanState;
use crate::{Context, Error, MANAGER};

/// Removes what owner references cannot (the cluster-scoped PersistentVolume).
pub const FINALIZER: &str = "lakecache.io/cleanup";
/// The controller's name in metrics.
pub const CONTROLLER: &str = "cachenamespace";

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
    crate::controller::reconcile_with(cn, ctx, CONTROLLER, FINALIZER, converge, finalize).await
}

/// One reconcile of a live CacheNamespace: the pipeline above.
async fn converge(cn: Arc<CacheNamespace>, ctx: Arc<Context>) -> Result<Action, Error> {
    cleanup::import_disk_nodes(&cn, &ctx).await?;
    let (inputs, pv_name) = fetch::fetch(&cn, &ctx).await?;
    let checked = validate::check(&cn, &inputs, &ctx.cfg);
    let port = validate::port(&cn, &checked);
    let token = inputs.token.clone().unwrap_or_else(fetch::new_token);
    let mut obs = match &checked {
        Ok(spec) => {
            let children = build::children(
                &cn,
                &BuildInputs {
                    spec,
                    token: &token,
                    default_image: &ctx.cfg.worker_image,
                    init_image: &ctx.cfg.worker_init_image,
                    network_policy: ctx.cfg.network_policy.as_ref(),
                    pv_name: Some(&pv_name),
                },
            );
            apply::apply_children(&cn, &children, &ctx).await?;
            observe::observe(&cn, port, Some(&token), &ctx).await?
        }
        Err(problem) => {
            problem.report(&ctx, &*cn, CONTROLLER).await;
            // Whatever runs keeps running; the status still lists its workers.
            observe::observe(&cn, port, inputs.token.as_deref(), &ctx).await?
        }
    };
    if checked.is_ok() {
        obs.scan = scan::scan(&cn, &obs, &token, port, &ctx);
    }
    // Written with the rest of the status below.
    let disk_directories = publish::record_disk_directories(&cn, &obs.pods, false, &ctx).await?;
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let mut new = status::compute(&cn, port, checked.as_ref().err(), &obs, &now);
    new.disk_directories = disk_directories;
    publish::publish(&cn, &new, &ctx).await?;
    Ok(Action::requeue(ctx.cfg.resync))
}

/// One reconcile of a deleted CacheNamespace, under its finalizer: the node directories, then
/// the PersistentVolume; the other children go with it through their owner references.
async fn finalize(cn: Arc<CacheNamespace>, ctx: Arc<Context>) -> Result<Action, Error> {
    cleanup::import_disk_nodes(&cn, &ctx).await?;
    if cleanup::has_node_dirs(&cn, &ctx.cfg) {
        cleanup::remove_node_dirs(&cn, &ctx).await?;
    }
    let pv_name = fetch::pv_name(&cn, &ctx).await?;
    cleanup::delete_pv(&cn, &pv_name, &ctx).await?;
    scan::forget(&cn, &ctx);
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
