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
use std::sync::atomic::{AtomicBool, Ordering};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::runtime::controller::Action;
use kube::runtime::{Controller, watcher};
use lakecache_api::{CachePreload, CachePreloadPhase, CachePreloadStatus};

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
    /// Set by the task once it has written the run's final phase (and counted the run).
    pub ended: Arc<AtomicBool>,
}

impl RunHandle {
    /// Whether this process's task writes the status of the CachePreload whose status is
    /// `status`: it follows the run, or it followed to its end the run that `status` still
    /// calls Running. That status was read before the task's final write came back through the
    /// watch; resuming the run from it would write Running again over the final phase, and
    /// publish and count the run's outcome a second time.
    pub fn covers(&self, status: Option<&CachePreloadStatus>) -> bool {
        if !self.task.is_finished() {
            return true;
        }
        self.ended.load(Ordering::Acquire)
            && status.is_some_and(|s| {
                s.phase == Some(CachePreloadPhase::Running) && s.run.max(1) == self.run
            })
    }
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
    // A run of this process is going, or has just ended: its task writes the status.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(run: i64, task: tokio::task::JoinHandle<()>, ended: bool) -> RunHandle {
        RunHandle {
            run,
            id: format!("ml/warm/u1/{run}"),
            workers: vec![],
            task,
            ended: Arc::new(AtomicBool::new(ended)),
        }
    }

    fn status(phase: CachePreloadPhase, run: i64) -> CachePreloadStatus {
        CachePreloadStatus {
            phase: Some(phase),
            run,
            ..Default::default()
        }
    }

    async fn ended_task() -> tokio::task::JoinHandle<()> {
        let task = tokio::spawn(async {});
        while !task.is_finished() {
            tokio::task::yield_now().await;
        }
        task
    }

    #[tokio::test]
    async fn a_run_that_ended_here_is_not_followed_again_from_a_stale_status() {
        use CachePreloadPhase::{Failed, Running, Succeeded};
        // Going: its task writes the status, whatever the object says.
        let going = handle(3, tokio::spawn(std::future::pending()), false);
        assert!(going.covers(Some(&status(Running, 3))));
        assert!(going.covers(None));
        going.task.abort();
        // Ended here after writing its final phase, which the watch has not brought yet: the
        // stale Running status of that run is not resumed (and the run not counted again) ...
        let ended = handle(3, ended_task().await, true);
        assert!(ended.covers(Some(&status(Running, 3))));
        // ... while the final status, a later run, or a deleted status is reconciled as usual.
        assert!(!ended.covers(Some(&status(Failed, 3))));
        assert!(!ended.covers(Some(&status(Succeeded, 3))));
        assert!(!ended.covers(Some(&status(Running, 4))));
        assert!(!ended.covers(None));
        // A status from before runs were numbered is run 1.
        let first = handle(1, ended_task().await, true);
        assert!(first.covers(Some(&status(Running, 0))));
        // A task that ended without writing a final phase (it panicked): the run is resumed.
        let lost = handle(3, ended_task().await, false);
        assert!(!lost.covers(Some(&status(Running, 3))));
    }
}
