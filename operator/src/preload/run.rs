//! A run's life in this process: starting (or resuming) it on the CacheNamespace's ready
//! workers, and cancelling it when the CachePreload is deleted.
//!
//! A run's id on the workers is `<namespace>/<name>/<uid>/<run>` ([`run_id`]), so a restarted
//! operator that resumes a Running preload asks the workers for the same id, and a worker
//! answers a start of a known id with its status instead of starting again. A resumed run keeps
//! its members ([`members`]): the workers placed its blocks by the member list it was started
//! with, and a different list would load them elsewhere. The task that follows the run is kept
//! in the [`Context`] by the CachePreload's uid, so that a reconcile meanwhile leaves it alone
//! and a deletion can stop it.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use lakecache_api::{CachePreload, CachePreloadPhase};

use super::{RunHandle, fetch, follow, now, status};
use crate::workers::WorkerRef;
use crate::{Context, Error};

/// Whether a run of `cp` is going on in this process, or has ended in it since `cp` was read
/// (its task writes the status; see [`RunHandle::covers`]).
pub(super) fn running_here(cp: &CachePreload, ctx: &Context) -> bool {
    let uid = cp.uid().unwrap_or_default();
    ctx.preloads
        .lock()
        .get(&uid)
        .is_some_and(|h| h.covers(cp.status.as_ref()))
}

/// The id of run `run` of `cp` on the workers.
pub fn run_id(cp: &CachePreload, run: i64) -> String {
    format!(
        "{}/{}/{}/{run}",
        cp.namespace().unwrap_or_default(),
        cp.name_any(),
        cp.uid().unwrap_or_default()
    )
}

/// The members of a run, by name: every `ready` worker, except that a resumed run keeps those of
/// its `previous` members that are ready (the ring its blocks were placed on), unless none is.
pub fn members(ready: Vec<WorkerRef>, previous: &[String], resume: bool) -> Vec<WorkerRef> {
    let mut workers = ready;
    if resume && !previous.is_empty() {
        let kept: Vec<WorkerRef> = previous
            .iter()
            .filter_map(|n| workers.iter().find(|w| w.name == *n).cloned())
            .collect();
        if !kept.is_empty() {
            workers = kept;
        }
    }
    workers.sort_by(|a, b| a.name.cmp(&b.name));
    workers
}

/// Starts run `run` of `cp` (or resumes it), or says in the status why it cannot start yet.
pub(super) async fn start(
    cp: &Arc<CachePreload>,
    ctx: &Arc<Context>,
    run: i64,
    resume: bool,
    scheduled: bool,
) -> Result<Action, Error> {
    let ready = match fetch::workers_of(cp, ctx).await? {
        Ok(w) => w,
        Err(problem) => {
            let st = status::blocked(cp, CachePreloadPhase::Pending, &problem, &now());
            status::write(cp, ctx, &st).await?;
            return Ok(Action::requeue(Duration::from_secs(5)));
        }
    };
    let prev = cp.status.clone().unwrap_or_default();
    let workers = members(ready, &prev.workers, resume);
    let id = run_id(cp, run);
    let base = status::running(cp, run, resume, scheduled, &workers, &now());
    status::write(cp, ctx, &base).await?;
    if !resume {
        ctx.event(
            &**cp,
            EventType::Normal,
            "Started",
            "Preload",
            format!(
                "run {run}: {} paths on {} workers ({})",
                cp.spec.paths.len(),
                workers.len(),
                base.workers.join(", ")
            ),
        )
        .await;
    }
    let ended = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(follow::follow_run(
        cp.clone(),
        ctx.clone(),
        id.clone(),
        workers.clone(),
        base,
        ended.clone(),
    ));
    ctx.preloads.lock().insert(
        cp.uid().unwrap_or_default(),
        RunHandle {
            run,
            id,
            workers,
            task,
            ended,
        },
    );
    Ok(Action::requeue(ctx.cfg.resync))
}

/// Cancels `cp`'s running run on every worker (its task here, if any, first).
pub(super) async fn cancel(cp: &CachePreload, ctx: &Context) -> Result<(), Error> {
    let uid = cp.uid().unwrap_or_default();
    let handle = ctx.preloads.lock().remove(&uid);
    let running = cp.status.as_ref().and_then(|s| s.phase) == Some(CachePreloadPhase::Running);
    let (id, workers) = match handle {
        Some(h) => {
            h.task.abort();
            (Some(h.id), h.workers)
        }
        None if running => {
            let run = cp.status.as_ref().map(|s| s.run).unwrap_or(1);
            let workers: Vec<WorkerRef> = fetch::workers_of(cp, ctx).await?.unwrap_or_default();
            (Some(run_id(cp, run)), workers)
        }
        None => (None, vec![]),
    };
    if let Some(id) = id
        && running
    {
        for w in &workers {
            if let Err(e) = ctx.workers.cancel_preload(w, &id).await {
                tracing::warn!(preload = %cp.name_any(), error = %e, "cannot cancel on a worker; it finishes on its own");
            }
        }
        ctx.event(
            cp,
            EventType::Normal,
            "Cancelled",
            "Delete",
            format!("cancelled the running preload on {} workers", workers.len()),
        )
        .await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{preload, worker as w};

    fn names(ws: &[WorkerRef]) -> Vec<&str> {
        ws.iter().map(|w| w.name.as_str()).collect()
    }

    #[test]
    fn a_new_run_takes_every_ready_worker_in_name_order() {
        let m = members(vec![w("w2"), w("w0"), w("w1")], &["w0".into()], false);
        assert_eq!(names(&m), ["w0", "w1", "w2"]);
    }

    #[test]
    fn a_resumed_run_keeps_its_members() {
        let prev = ["w1".to_string(), "w0".to_string(), "w9".to_string()];
        let m = members(vec![w("w2"), w("w0"), w("w1")], &prev, true);
        assert_eq!(names(&m), ["w0", "w1"]);
        // None of them is ready any more: whoever is.
        let m = members(vec![w("w3")], &prev, true);
        assert_eq!(names(&m), ["w3"]);
        // A status without members (written by an older operator): every ready worker.
        let m = members(vec![w("w1"), w("w0")], &[], true);
        assert_eq!(names(&m), ["w0", "w1"]);
    }

    #[test]
    fn run_ids_name_the_object_and_the_run() {
        let mut cp = preload(&[], None, None);
        cp.metadata.uid = Some("u1".into());
        assert_eq!(run_id(&cp, 3), "ml/warm/u1/3");
    }
}
