//! The CachePreload controller.
//!
//! A CachePreload warms a CacheNamespace's cache ahead of a job, once or on a cron schedule. A
//! run gives the preload to every ready worker of the CacheNamespace at once, with the same
//! member list, so each loads the blocks it owns by the readers' rendezvous placement: the
//! workers load disjoint shares in parallel, and readers later find each block where they look.
//!
//! A run takes hours and outlives reconciles, operator restarts and leader changes, so the
//! reconcile never waits for one. It decides, starts and returns; a background task per run
//! ([`follow`]) follows every worker's progress and writes the summed progress
//! ([`aggregate`](mod@aggregate)) to the status. The reconcile (`converge`) is the same pipeline
//! as the CacheNamespace's, with the decision of what runs next in place of the build:
//!
//! 1. [`validate`] (no I/O): the spec into its parsed schedule, or a [`Problem`](crate::Problem)
//!    (Failed until the spec changes);
//! 2. [`schedule::next_run`] (no I/O): from the spec, the status and the time, what comes next:
//!    start a run, resume one an earlier process started, wait for a tick, or nothing;
//! 3. [`fetch`] (dereference): the CacheNamespace's ready workers and token, or why there are
//!    none (Pending, looked at again shortly). Only when a run is to start: a waiting or
//!    finished preload does not depend on its CacheNamespace;
//! 4. [`run`](mod@run): the run's base [`status`] written, the run started on the workers, and
//!    its task kept in the shared context.
//!
//! Runs are numbered; a run's id on the workers is `<namespace>/<name>/<uid>/<run>`, so a
//! restarted operator picks up a Running preload where it was (a worker answers a start of a
//! known id with its status). Deleting a CachePreload cancels its run on every worker
//! (`finalize`, under a finalizer).

pub mod aggregate;
pub mod fetch;
pub mod follow;
pub mod run;
pub mod schedule;
pub mod status;
pub mod validate;

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::runtime::controller::Action;
use kube::runtime::{Controller, watcher};
use lakecache_api::CachePreload;

pub use self::aggregate::{WorkerRun, aggregate};
use self::schedule::NextRun;
pub use self::schedule::{next_tick, parse_schedule};
use crate::workers::WorkerRef;
use crate::{Context, Error};

/// Cancels a running preload when its object is deleted.
pub const FINALIZER: &str = "lakecache.io/cancel";
/// The controller's name in metrics.
pub const CONTROLLER: &str = "cachepreload";

/// A run in progress in this operator process.
pub struct RunHandle {
    pub run: i64,
    pub id: String,
    pub workers: Vec<WorkerRef>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
    synced: tokio::sync::oneshot::Sender<()>,
) {
    let controller = Controller::new(
        Api::<CachePreload>::all(ctx.client.clone()),
        watcher::Config::default(),
    )
    .graceful_shutdown_on(shutdown);
    crate::controller::drive(controller, CONTROLLER, ctx, synced, reconcile).await;
}

async fn reconcile(cp: Arc<CachePreload>, ctx: Arc<Context>) -> Result<Action, Error> {
    crate::controller::reconcile_with(cp, ctx, CONTROLLER, FINALIZER, converge, finalize).await
}

fn now() -> Time {
    Time(Timestamp::now())
}

/// One reconcile of a live CachePreload: the pipeline above.
async fn converge(cp: Arc<CachePreload>, ctx: Arc<Context>) -> Result<Action, Error> {
    // A run of this process is going: its task writes the status.
    if run::running_here(&cp, &ctx) {
        return Ok(Action::requeue(ctx.cfg.resync));
    }
    let schedule = match validate::validate(&cp) {
        Ok(schedule) => schedule,
        Err(problem) => {
            problem.report(&ctx, &*cp, CONTROLLER).await;
            status::write(&cp, &ctx, &status::invalid(&cp, &problem, &now())).await?;
            return Ok(Action::await_change());
        }
    };
    let scheduled = schedule.is_some();
    match schedule::next_run(&cp, schedule.as_ref(), &now())? {
        NextRun::Start { run } => run::start(&cp, &ctx, run, false, scheduled).await,
        NextRun::Resume { run } => run::start(&cp, &ctx, run, true, scheduled).await,
        NextRun::Wait { until, after } => {
            status::write(&cp, &ctx, &status::waiting(&cp, until)).await?;
            Ok(Action::requeue(after))
        }
        NextRun::Nothing => Ok(Action::await_change()),
    }
}

/// One reconcile of a deleted CachePreload, under its finalizer: its run cancelled.
async fn finalize(cp: Arc<CachePreload>, ctx: Arc<Context>) -> Result<Action, Error> {
    run::cancel(&cp, &ctx).await?;
    Ok(Action::await_change())
}
