//! What both controllers share: running a kube `Controller` until shutdown (with readiness once
//! its watch has synced), and the frame of one reconcile (the finalizer, a Warning Event and the
//! metrics for a failure), so each controller's module holds only its own steps.

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::runtime::Controller;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Context, Error};

/// A namespaced object this operator reconciles.
pub trait Reconciled:
    Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
    + Clone
    + DeserializeOwned
    + Serialize
    + Debug
    + Send
    + Sync
    + 'static
{
}

impl<K> Reconciled for K where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + Debug
        + Send
        + Sync
        + 'static
{
}

/// `namespace/name` of an object, for logs.
pub fn key<K: Resource>(o: &K) -> String {
    format!(
        "{}/{}",
        o.meta().namespace.as_deref().unwrap_or_default(),
        o.meta().name.as_deref().unwrap_or_default()
    )
}

/// Runs `controller` with `reconcile` until its graceful shutdown, sending on `synced` once its
/// watch has listed everything.
pub async fn drive<K, R, Fut>(
    controller: Controller<K>,
    name: &'static str,
    ctx: Arc<Context>,
    synced: tokio::sync::oneshot::Sender<()>,
    reconcile: R,
) where
    K: Reconciled,
    R: FnMut(Arc<K>, Arc<Context>) -> Fut,
    Fut: Future<Output = Result<Action, Error>> + Send + 'static,
{
    tokio::spawn(crate::signal_synced(controller.store(), name, synced));
    controller
        .run(
            reconcile,
            move |obj: Arc<K>, err: &Error, _ctx: Arc<Context>| {
                if let Error::Waiting(what) = err {
                    tracing::info!(controller = name, object = %key(&*obj), %what, "waiting");
                    return Action::requeue(Duration::from_secs(2));
                }
                tracing::warn!(controller = name, object = %key(&*obj), reason = err.reason(), error = %err, "reconcile failed; retrying");
                Action::requeue(Duration::from_secs(5))
            },
            ctx,
        )
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(controller = name, error = %e, "controller event");
            }
        })
        .await;
}

/// One reconcile of `obj`: `apply` while it lives, `cleanup` (once) when it is deleted, under a
/// finalizer; a failure is published as a Warning Event on the object and counted.
pub async fn reconcile_with<K, A, AF, C, CF>(
    obj: Arc<K>,
    ctx: Arc<Context>,
    name: &'static str,
    finalizer_name: &str,
    apply: A,
    cleanup: C,
) -> Result<Action, Error>
where
    K: Reconciled,
    A: FnOnce(Arc<K>, Arc<Context>) -> AF,
    AF: Future<Output = Result<Action, Error>>,
    C: FnOnce(Arc<K>, Arc<Context>) -> CF,
    CF: Future<Output = Result<Action, Error>>,
{
    let start = Instant::now();
    let r = match obj.namespace() {
        None => Err(Error::NoNamespace(obj.name_any())),
        Some(ns) => {
            let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
            let c = ctx.clone();
            finalizer(&api, finalizer_name, obj.clone(), |ev| async move {
                match ev {
                    FinalizerEvent::Apply(o) => apply(o, c).await,
                    FinalizerEvent::Cleanup(o) => cleanup(o, c).await,
                }
            })
            .await
            .map_err(|e| match e {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
                other => Error::Finalizer(other.to_string()),
            })
        }
    };
    if let Err(e) = &r
        && !matches!(e, Error::Waiting(_))
    {
        ctx.event(
            &*obj,
            EventType::Warning,
            e.reason(),
            "Reconcile",
            e.to_string(),
        )
        .await;
    }
    // Waiting is progress, not a failure: it counts as a good reconcile.
    let failed = r
        .as_ref()
        .err()
        .filter(|e| !matches!(e, Error::Waiting(_)))
        .map(|e| e.reason());
    ctx.metrics.reconciled(name, start.elapsed(), failed);
    r
}
