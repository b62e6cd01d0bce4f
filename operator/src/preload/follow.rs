//! Following a run: one background task per run starts it on every worker, listens to their
//! progress streams and writes the summed progress to the status.
//!
//! The reconcile cannot wait for a run (they take hours), and writing the status on every
//! progress message of every worker would load the API server with one patch per worker per
//! message. So a task per run keeps the latest status of each worker's part, and writes their
//! [`aggregate`](mod@super::aggregate) at most once per `preload_status_interval`, and only when it
//! changed. A broken stream is opened again a few times; a worker that no longer knows the run
//! (it restarted) or keeps failing has its part failed by name. When every part is finished the
//! task writes the final status, counts the run by its result (the `preload_runs` metric, which
//! the failing-preload alert watches), publishes the outcome as an Event and ends; the next
//! reconcile then sees the run finished. Counting here, once the final phase is written, and not
//! in the reconcile from the phase it reads, is what keeps a run counted once: a restarted
//! operator reads every finished run again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use lakecache_api::{CachePreload, CachePreloadPhase, CachePreloadStatus};
use lakecache_proto::lakecache::v1 as pb;

use super::aggregate::{WorkerRun, aggregate};
use super::now;
use crate::Context;
use crate::metrics::RunResult;
use crate::workers::{WorkerError, WorkerRef};

/// Starts (or resumes) one run on every worker and follows it to the end.
pub(super) async fn follow_run(
    cp: Arc<CachePreload>,
    ctx: Arc<Context>,
    id: String,
    workers: Vec<WorkerRef>,
    base: CachePreloadStatus,
    ended: Arc<AtomicBool>,
) {
    let members: Vec<String> = workers.iter().map(|w| w.name.clone()).collect();
    let mut parts: Vec<WorkerRun> = workers
        .iter()
        .map(|w| WorkerRun {
            name: w.name.clone(),
            ..Default::default()
        })
        .collect();
    let req = pb::StartPreloadRequest {
        id: id.clone(),
        paths: cp
            .spec
            .paths
            .iter()
            .map(|p| p.as_str().to_string())
            .collect(),
        metadata_only: cp.spec.metadata_only,
        members,
    };
    let starts = workers
        .iter()
        .map(|w| ctx.workers.start_preload(w, req.clone()));
    let started = futures::future::join_all(starts).await;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(usize, Result<pb::PreloadStatus, String>)>(64);
    for (i, r) in started.into_iter().enumerate() {
        match r {
            Ok(s) => {
                parts[i].status = Some(s);
                tokio::spawn(watch_worker(
                    ctx.clone(),
                    workers[i].clone(),
                    id.clone(),
                    i,
                    tx.clone(),
                ));
            }
            Err(e) => parts[i].error = Some(e.message),
        }
    }
    drop(tx);
    let mut tick = tokio::time::interval(ctx.cfg.preload_status_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_written: Option<CachePreloadStatus> = None;
    loop {
        let finished = parts.iter().all(WorkerRun::finished);
        let st = aggregate(&base, &parts, cp.spec.metadata_only, &now());
        if finished || last_written.as_ref() != Some(&st) {
            let api: Api<CachePreload> =
                Api::namespaced(ctx.client.clone(), &cp.namespace().unwrap_or_default());
            match api
                .patch_status(
                    &cp.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({ "status": st })),
                )
                .await
            {
                Ok(_) => last_written = Some(st.clone()),
                Err(kube::Error::Api(e)) if e.code == 404 => return,
                Err(e) => {
                    tracing::warn!(preload = %cp.name_any(), error = %e, "cannot write the preload's progress; will retry")
                }
            }
        }
        if finished && last_written.is_some() {
            // The run's final phase is written, by this task, which ends here: the one place a
            // run is counted. A process that reads a finished run never follows it (see
            // `schedule::next_run`), and this one does not follow it again while its watch
            // still shows it Running (`RunHandle::covers`, which `ended` tells).
            let result = run_result(&st);
            ctx.metrics.preload_run(result);
            ended.store(true, Ordering::Release);
            let (type_, reason) = match result {
                RunResult::Succeeded => (EventType::Normal, "Succeeded"),
                RunResult::Failed => (EventType::Warning, "Failed"),
            };
            let message = st
                .conditions
                .iter()
                .find(|c| c.type_ == "Complete")
                .map(|c| c.message.clone())
                .unwrap_or_default();
            ctx.event(&*cp, type_, reason, "Preload", message).await;
            return;
        }
        tokio::select! {
            m = rx.recv() => match m {
                Some((i, Ok(s))) => parts[i].status = Some(s),
                Some((i, Err(e))) => parts[i].error = Some(e),
                None => {
                    // Every stream ended; anything unfinished lost its worker.
                    for p in parts.iter_mut().filter(|p| !p.finished()) {
                        p.error = Some("the worker stopped reporting before the preload ended".into());
                    }
                }
            },
            _ = tick.tick() => {}
        }
    }
}

/// How a finished run ended, from its final status: only a Succeeded run succeeded.
fn run_result(st: &CachePreloadStatus) -> RunResult {
    if st.phase == Some(CachePreloadPhase::Succeeded) {
        RunResult::Succeeded
    } else {
        RunResult::Failed
    }
}

/// Follows one worker's progress, retrying a broken stream a few times.
async fn watch_worker(
    ctx: Arc<Context>,
    w: WorkerRef,
    id: String,
    i: usize,
    tx: tokio::sync::mpsc::Sender<(usize, Result<pb::PreloadStatus, String>)>,
) {
    let mut failures = 0;
    // Bounded: at most 5 broken streams in a row.
    while failures < 5 {
        match ctx.workers.watch_preload(&w, &id).await {
            Ok(mut stream) => {
                while let Some(item) = stream.next().await {
                    match item {
                        Ok(s) => {
                            failures = 0;
                            let done = s.phase != pb::PreloadPhase::Running as i32;
                            if tx.send((i, Ok(s))).await.is_err() || done {
                                return;
                            }
                        }
                        Err(e) => {
                            if lost(&e, &tx, i).await {
                                return;
                            }
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                if lost(&e, &tx, i).await {
                    return;
                }
            }
        }
        failures += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let _ = tx
        .send((
            i,
            Err("the worker stopped answering during the preload".into()),
        ))
        .await;
}

/// Reports a worker that no longer knows the preload (it restarted); true if so.
async fn lost(
    e: &WorkerError,
    tx: &tokio::sync::mpsc::Sender<(usize, Result<pb::PreloadStatus, String>)>,
    i: usize,
) -> bool {
    if e.not_found {
        let _ = tx
            .send((
                i,
                Err("the worker restarted and lost the preload; run it again".into()),
            ))
            .await;
        return true;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_succeeded_run_counts_as_succeeded() {
        let st = |phase| CachePreloadStatus {
            phase: Some(phase),
            ..Default::default()
        };
        assert_eq!(
            run_result(&st(CachePreloadPhase::Succeeded)),
            RunResult::Succeeded
        );
        assert_eq!(
            run_result(&st(CachePreloadPhase::Failed)),
            RunResult::Failed
        );
        // Paths that failed on the workers fail the run (see `aggregate`), and count as failed.
        let parts = [WorkerRun {
            name: "w0".into(),
            status: Some(pb::PreloadStatus {
                phase: pb::PreloadPhase::Failed as i32,
                failures: vec![pb::PathFailure {
                    path: "missing/**".into(),
                    reason: "NotFound".into(),
                }],
                ..Default::default()
            }),
            error: None,
        }];
        let base = CachePreloadStatus {
            phase: Some(CachePreloadPhase::Running),
            run: 1,
            ..Default::default()
        };
        let done = aggregate(&base, &parts, false, &now());
        assert_eq!(run_result(&done), RunResult::Failed);
    }
}
