//! The CachePreload controller.
//!
//! A run gives the preload to every ready worker of the CacheNamespace at once, with the same
//! member list, so each loads the blocks it owns by the readers' rendezvous placement: the
//! workers load disjoint shares in parallel, and readers later find each block where they look.
//! A background task per run follows every worker's progress stream and writes the summed
//! progress to the status about once a second ([`aggregate`] is the I/O-free part).
//!
//! Runs are numbered; a run's id on the workers is `<namespace>/<name>/<uid>/<run>`, so a
//! restarted operator picks up a Running preload where it was (a worker answers a start of a
//! known id with its status). With a cron `schedule`, a new run starts at each tick unless one is
//! still running. Deleting a CachePreload cancels its run on every worker (a finalizer).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::{Controller, watcher};
use kube::{Api, ResourceExt};
use lakecache_api::{
    CacheNamespace, CachePreload, CachePreloadPhase, CachePreloadStatus, MAX_REPORTED_FAILURES,
    PreloadFailure,
};
use lakecache_proto::lakecache::v1 as pb;

use crate::cache_namespace::build::{Names, TOKEN_KEY};
use crate::conditions::{Cond, settle};
use crate::error::kube as kerr;
use crate::workers::{WorkerError, WorkerRef};
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
    crate::controller::reconcile_with(cp, ctx, CONTROLLER, FINALIZER, apply, cleanup).await
}

fn now() -> Time {
    Time(Timestamp::now())
}

/// The next tick of `schedule` strictly after `after`.
pub fn next_tick(schedule: &croner::Cron, after: &Time) -> Result<Time, String> {
    let t = chrono::DateTime::from_timestamp(after.0.as_second(), 0).ok_or("time out of range")?;
    let next = schedule
        .find_next_occurrence(&t, false)
        .map_err(|e| e.to_string())?;
    Timestamp::from_second(next.timestamp())
        .map(Time)
        .map_err(|e| e.to_string())
}

/// Parses a five-field cron schedule.
pub fn parse_schedule(s: &str) -> Result<croner::Cron, String> {
    if s.split_whitespace().count() != 5 {
        return Err(format!(
            "spec.schedule {s:?} must have five fields (minute hour day month weekday), like '0 3 * * *'"
        ));
    }
    croner::Cron::from_str(s)
        .map_err(|e| format!("spec.schedule {s:?} is not a cron schedule: {e}"))
}

async fn write_status(
    cp: &CachePreload,
    ctx: &Context,
    status: &CachePreloadStatus,
) -> Result<(), Error> {
    if cp.status.as_ref() == Some(status) {
        return Ok(());
    }
    let api: Api<CachePreload> =
        Api::namespaced(ctx.client.clone(), &cp.namespace().unwrap_or_default());
    api.patch_status(
        &cp.name_any(),
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "status": status })),
    )
    .await
    .map_err(kerr(format!(
        "writing the status of CachePreload {}",
        cp.name_any()
    )))?;
    Ok(())
}

/// A status that says why the preload cannot run (now or at all).
fn blocked(
    cp: &CachePreload,
    phase: CachePreloadPhase,
    reason: &'static str,
    message: String,
) -> CachePreloadStatus {
    let prev = cp.status.clone().unwrap_or_default();
    CachePreloadStatus {
        phase: Some(phase),
        conditions: settle(
            vec![
                Cond::new("Ready", false, reason, message.clone()),
                Cond::new("Complete", false, reason, message),
            ],
            &prev.conditions,
            cp.metadata.generation,
            &now(),
        ),
        observed_generation: prev.observed_generation,
        ..prev
    }
}

async fn apply(cp: Arc<CachePreload>, ctx: Arc<Context>) -> Result<Action, Error> {
    let uid = cp.uid().unwrap_or_default();
    // A run of this process is going: its task writes the status.
    if let Some(h) = ctx.preloads.lock().get(&uid)
        && !h.task.is_finished()
    {
        return Ok(Action::requeue(ctx.cfg.resync));
    }
    let schedule = match cp.spec.validate() {
        Err(e) => Err(("InvalidSpec", e.to_string())),
        Ok(()) => cp
            .spec
            .schedule
            .as_deref()
            .map(parse_schedule)
            .transpose()
            .map_err(|e| ("InvalidSchedule", e)),
    };
    let schedule = match schedule {
        Ok(s) => s,
        Err((reason, message)) => {
            ctx.metrics.problem(CONTROLLER, reason);
            ctx.event(
                &*cp,
                EventType::Warning,
                reason,
                "Validate",
                message.clone(),
            )
            .await;
            let mut st = blocked(&cp, CachePreloadPhase::Failed, reason, message);
            st.observed_generation = cp.metadata.generation;
            write_status(&cp, &ctx, &st).await?;
            return Ok(Action::await_change());
        }
    };
    let st = cp.status.clone().unwrap_or_default();
    let spec_changed =
        st.observed_generation.is_some() && st.observed_generation != cp.metadata.generation;
    let run = match st.phase {
        // Started by an earlier operator process: follow it again.
        Some(CachePreloadPhase::Running) => st.run.max(1),
        None | Some(CachePreloadPhase::Pending) if st.start_time.is_none() => st.run + 1,
        _ if spec_changed && schedule.is_none() => st.run + 1,
        _ => {
            let Some(schedule) = &schedule else {
                return Ok(Action::await_change());
            };
            let after = st
                .last_schedule_time
                .clone()
                .or_else(|| cp.metadata.creation_timestamp.clone())
                .unwrap_or_else(now);
            let next = next_tick(schedule, &after)
                .map_err(|e| Error::Spec(lakecache_api::SpecError::new("spec.schedule", e)))?;
            let now_s = Timestamp::now().as_second();
            if next.0.as_second() > now_s {
                let mut s = st.clone();
                s.next_schedule_time = Some(next.clone());
                write_status(&cp, &ctx, &s).await?;
                let wait = (next.0.as_second() - now_s) as u64;
                return Ok(Action::requeue(Duration::from_secs(wait.clamp(1, 3600))));
            }
            st.run + 1
        }
    };
    let resume = st.phase == Some(CachePreloadPhase::Running);
    start_run(&cp, &ctx, run, resume, schedule.as_ref()).await
}

/// The CacheNamespace's ready workers and token, or why there are none.
async fn workers_of(
    cp: &CachePreload,
    ctx: &Context,
) -> Result<Result<Vec<WorkerRef>, (&'static str, String)>, Error> {
    let ns = cp.namespace().unwrap_or_default();
    let cn_name = &cp.spec.cache_namespace;
    let cns: Api<CacheNamespace> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(cn) = cns
        .get_opt(cn_name)
        .await
        .map_err(kerr(format!("reading CacheNamespace {ns}/{cn_name}")))?
    else {
        return Ok(Err((
            "CacheNamespaceNotFound",
            format!(
                "CacheNamespace {ns}/{cn_name} does not exist: create it, or fix spec.cacheNamespace"
            ),
        )));
    };
    let names = Names::of(&ns, cn_name);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let token = secrets
        .get_opt(&names.token_secret)
        .await
        .map_err(kerr(format!("reading Secret {ns}/{}", names.token_secret)))?
        .and_then(|s| s.data)
        .and_then(|d| d.get(TOKEN_KEY).cloned())
        .and_then(|b| String::from_utf8(b.0).ok());
    let Some(token) = token else {
        return Ok(Err((
            "NoReadyWorkers",
            format!("CacheNamespace {ns}/{cn_name} has no data-plane token yet; waiting for it"),
        )));
    };
    let workers: Vec<WorkerRef> = cn
        .status
        .map(|s| s.workers)
        .unwrap_or_default()
        .into_iter()
        .filter(|w| w.ready && !w.address.is_empty())
        .map(|w| WorkerRef {
            name: w.name,
            address: w.address,
            token: token.clone(),
        })
        .collect();
    if workers.is_empty() {
        return Ok(Err((
            "NoReadyWorkers",
            format!(
                "CacheNamespace {ns}/{cn_name} has no ready workers yet; the preload starts when one is ready"
            ),
        )));
    }
    Ok(Ok(workers))
}

fn run_id(cp: &CachePreload, run: i64) -> String {
    format!(
        "{}/{}/{}/{run}",
        cp.namespace().unwrap_or_default(),
        cp.name_any(),
        cp.uid().unwrap_or_default()
    )
}

async fn start_run(
    cp: &Arc<CachePreload>,
    ctx: &Arc<Context>,
    run: i64,
    resume: bool,
    schedule: Option<&croner::Cron>,
) -> Result<Action, Error> {
    let mut workers = match workers_of(cp, ctx).await? {
        Ok(w) => w,
        Err((reason, message)) => {
            let st = blocked(cp, CachePreloadPhase::Pending, reason, message);
            write_status(cp, ctx, &st).await?;
            return Ok(Action::requeue(Duration::from_secs(5)));
        }
    };
    let prev = cp.status.clone().unwrap_or_default();
    // A resumed run keeps its members (the ring its blocks were placed on).
    if resume && !prev.workers.is_empty() {
        let all = workers.clone();
        workers = prev
            .workers
            .iter()
            .filter_map(|n| all.iter().find(|w| w.name == *n).cloned())
            .collect();
        if workers.is_empty() {
            workers = all;
        }
    }
    workers.sort_by(|a, b| a.name.cmp(&b.name));
    let id = run_id(cp, run);
    let start_time = if resume {
        prev.start_time.clone().unwrap_or_else(now)
    } else {
        now()
    };
    let base = CachePreloadStatus {
        phase: Some(CachePreloadPhase::Running),
        run,
        start_time: Some(start_time.clone()),
        completion_time: None,
        workers: workers.iter().map(|w| w.name.clone()).collect(),
        last_schedule_time: if schedule.is_some() && !resume {
            Some(now())
        } else {
            prev.last_schedule_time.clone()
        },
        next_schedule_time: None,
        observed_generation: cp.metadata.generation,
        conditions: settle(
            vec![
                Cond::new(
                    "Ready",
                    true,
                    "WorkersReady",
                    format!("{} workers load their shares", workers.len()),
                ),
                Cond::new(
                    "Complete",
                    false,
                    "Running",
                    format!("run {run} is loading"),
                ),
            ],
            &prev.conditions,
            cp.metadata.generation,
            &now(),
        ),
        ..Default::default()
    };
    write_status(cp, ctx, &base).await?;
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
    let task = tokio::spawn(follow_run(
        cp.clone(),
        ctx.clone(),
        id.clone(),
        workers.clone(),
        base,
    ));
    ctx.preloads.lock().insert(
        cp.uid().unwrap_or_default(),
        RunHandle {
            run,
            id,
            workers,
            task,
        },
    );
    Ok(Action::requeue(ctx.cfg.resync))
}

/// One worker's part of a run.
#[derive(Debug, Clone, Default)]
pub struct WorkerRun {
    pub name: String,
    pub status: Option<pb::PreloadStatus>,
    /// Why the worker's part cannot finish (it did not answer, or lost the preload).
    pub error: Option<String>,
}

impl WorkerRun {
    fn finished(&self) -> bool {
        self.error.is_some()
            || self
                .status
                .as_ref()
                .is_some_and(|s| s.phase != pb::PreloadPhase::Running as i32)
    }
}

/// The summed progress of every worker's part of a run (no I/O). Every worker walks every
/// matched file (loading only its own blocks), so files count once, bytes add up.
pub fn aggregate(
    base: &CachePreloadStatus,
    parts: &[WorkerRun],
    metadata_only: bool,
    now: &Time,
) -> CachePreloadStatus {
    let mut st = base.clone();
    let statuses: Vec<&pb::PreloadStatus> =
        parts.iter().filter_map(|p| p.status.as_ref()).collect();
    st.files_total = statuses
        .iter()
        .map(|s| s.files_total as i64)
        .max()
        .unwrap_or(0);
    st.files_done = if statuses.len() == parts.len() {
        statuses
            .iter()
            .map(|s| s.files_done as i64)
            .min()
            .unwrap_or(0)
    } else {
        0
    };
    st.bytes_total = statuses.iter().map(|s| s.bytes_total as i64).sum();
    st.bytes_done = statuses.iter().map(|s| s.bytes_done as i64).sum();
    let mut failures: Vec<PreloadFailure> = vec![];
    for p in parts {
        if let Some(e) = &p.error {
            failures.push(PreloadFailure {
                path: String::new(),
                reason: format!("worker {}: {e}", p.name),
            });
        }
        for f in p.status.iter().flat_map(|s| s.failures.iter()) {
            if !failures
                .iter()
                .any(|x| x.path == f.path && !f.path.is_empty())
            {
                failures.push(PreloadFailure {
                    path: f.path.clone(),
                    reason: f.reason.clone(),
                });
            }
        }
    }
    st.failed_files = failures.len() as i64;
    failures.truncate(MAX_REPORTED_FAILURES);
    st.failures = failures;
    let (done, total) = if metadata_only || st.bytes_total == 0 {
        (st.files_done, st.files_total)
    } else {
        (st.bytes_done, st.bytes_total)
    };
    // A worker reports its totals once it has expanded the paths; until every worker has, the
    // total is not known and a share of a partial total would later go backwards.
    let expanded = parts.iter().all(|p| {
        p.finished()
            || p.status
                .as_ref()
                .is_some_and(|s| s.files_total > 0 || s.phase != pb::PreloadPhase::Running as i32)
    });
    st.progress = Some(if !expanded {
        "0%".into()
    } else if total > 0 {
        format!("{}%", (done * 100 / total).min(100))
    } else if parts.iter().all(WorkerRun::finished) {
        "100%".into()
    } else {
        "0%".into()
    });
    st.files = Some(format!("{}/{}", st.files_done, st.files_total));
    let started = st
        .start_time
        .as_ref()
        .map(|t| t.0.as_millisecond())
        .unwrap_or(0);
    let elapsed_ms = (now.0.as_millisecond() - started).max(1);
    st.throughput_bytes_per_second = Some(st.bytes_done * 1000 / elapsed_ms);
    if parts.iter().all(WorkerRun::finished) {
        let ok = st.failed_files == 0
            && statuses
                .iter()
                .all(|s| s.phase == pb::PreloadPhase::Succeeded as i32)
            && statuses.len() == parts.len();
        st.phase = Some(if ok {
            CachePreloadPhase::Succeeded
        } else {
            CachePreloadPhase::Failed
        });
        st.completion_time = Some(now.clone());
        let (reason, message) = if ok {
            (
                "Succeeded",
                format!(
                    "run {}: {} files, {} bytes loaded",
                    st.run, st.files_done, st.bytes_done
                ),
            )
        } else {
            (
                "PathsFailed",
                format!(
                    "run {}: {} of {} files failed; first: {}",
                    st.run,
                    st.failed_files,
                    st.files_total,
                    st.failures
                        .first()
                        .map(|f| format!("{} ({})", f.path, f.reason))
                        .unwrap_or_default()
                ),
            )
        };
        st.conditions = settle(
            vec![
                Cond::new("Ready", true, "WorkersReady", "the preload ran"),
                Cond::new("Complete", ok, reason, message),
            ],
            &base.conditions,
            base.observed_generation,
            now,
        );
    }
    st
}

/// Starts (or resumes) one run on every worker and follows it to the end.
async fn follow_run(
    cp: Arc<CachePreload>,
    ctx: Arc<Context>,
    id: String,
    workers: Vec<WorkerRef>,
    base: CachePreloadStatus,
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
            let (type_, reason) = if st.phase == Some(CachePreloadPhase::Succeeded) {
                (EventType::Normal, "Succeeded")
            } else {
                (EventType::Warning, "Failed")
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

async fn cleanup(cp: Arc<CachePreload>, ctx: Arc<Context>) -> Result<Action, Error> {
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
            let workers: Vec<WorkerRef> = workers_of(&cp, &ctx).await?.unwrap_or_default();
            (Some(run_id(&cp, run)), workers)
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
            &*cp,
            EventType::Normal,
            "Cancelled",
            "Delete",
            format!("cancelled the running preload on {} workers", workers.len()),
        )
        .await;
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Time {
        Time(Timestamp::from_second(s).unwrap())
    }

    fn ws(
        phase: pb::PreloadPhase,
        files: (u64, u64),
        bytes: (u64, u64),
        failures: &[&str],
    ) -> pb::PreloadStatus {
        pb::PreloadStatus {
            phase: phase as i32,
            files_done: files.0,
            files_total: files.1,
            bytes_done: bytes.0,
            bytes_total: bytes.1,
            failures: failures
                .iter()
                .map(|p| pb::PathFailure {
                    path: p.to_string(),
                    reason: "NotFound".into(),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn base() -> CachePreloadStatus {
        CachePreloadStatus {
            phase: Some(CachePreloadPhase::Running),
            run: 1,
            start_time: Some(t(100)),
            ..Default::default()
        }
    }

    #[test]
    fn progress_sums_bytes_and_counts_files_once() {
        let parts = vec![
            WorkerRun {
                name: "w0".into(),
                status: Some(ws(pb::PreloadPhase::Running, (3, 10), (300, 1000), &[])),
                error: None,
            },
            WorkerRun {
                name: "w1".into(),
                status: Some(ws(pb::PreloadPhase::Running, (5, 10), (700, 1000), &[])),
                error: None,
            },
        ];
        let s = aggregate(&base(), &parts, false, &t(110));
        assert_eq!(s.files_total, 10);
        assert_eq!(s.files_done, 3);
        assert_eq!(s.bytes_total, 2000);
        assert_eq!(s.bytes_done, 1000);
        assert_eq!(s.progress.as_deref(), Some("50%"));
        assert_eq!(s.files.as_deref(), Some("3/10"));
        assert_eq!(s.throughput_bytes_per_second, Some(100));
        assert_eq!(s.phase, Some(CachePreloadPhase::Running));
        assert!(s.completion_time.is_none());
    }

    #[test]
    fn a_run_succeeds_only_when_every_worker_does() {
        let done = |f: &[&str], phase| WorkerRun {
            name: "w".into(),
            status: Some(ws(phase, (10, 10), (1000, 1000), f)),
            error: None,
        };
        let s = aggregate(
            &base(),
            &[
                done(&[], pb::PreloadPhase::Succeeded),
                done(&[], pb::PreloadPhase::Succeeded),
            ],
            false,
            &t(120),
        );
        assert_eq!(s.phase, Some(CachePreloadPhase::Succeeded));
        assert_eq!(s.progress.as_deref(), Some("100%"));
        assert_eq!(s.completion_time, Some(t(120)));
        assert!(crate::conditions::is_true(&s.conditions, "Complete"));
        // The same missing path reported by both workers counts once.
        let s = aggregate(
            &base(),
            &[
                done(&["missing/**"], pb::PreloadPhase::Failed),
                done(&["missing/**"], pb::PreloadPhase::Failed),
            ],
            false,
            &t(120),
        );
        assert_eq!(s.phase, Some(CachePreloadPhase::Failed));
        assert_eq!(s.failed_files, 1);
        assert_eq!(s.failures[0].path, "missing/**");
        // A worker that vanished fails the run, by name.
        let s = aggregate(
            &base(),
            &[
                done(&[], pb::PreloadPhase::Succeeded),
                WorkerRun {
                    name: "w9".into(),
                    status: None,
                    error: Some("no answer".into()),
                },
            ],
            false,
            &t(120),
        );
        assert_eq!(s.phase, Some(CachePreloadPhase::Failed));
        assert!(s.failures[0].reason.contains("w9"), "{:?}", s.failures);
    }

    #[test]
    fn progress_waits_for_every_workers_total() {
        let parts = vec![
            WorkerRun {
                name: "w0".into(),
                status: Some(ws(pb::PreloadPhase::Running, (9, 10), (900, 1000), &[])),
                error: None,
            },
            WorkerRun {
                name: "w1".into(),
                // Still expanding the paths: no totals yet.
                status: Some(ws(pb::PreloadPhase::Running, (0, 0), (0, 0), &[])),
                error: None,
            },
        ];
        let s = aggregate(&base(), &parts, false, &t(110));
        assert_eq!(s.progress.as_deref(), Some("0%"));
    }

    #[test]
    fn metadata_only_progress_counts_files() {
        let parts = vec![WorkerRun {
            name: "w0".into(),
            status: Some(ws(pb::PreloadPhase::Running, (1, 4), (0, 0), &[])),
            error: None,
        }];
        let s = aggregate(&base(), &parts, true, &t(101));
        assert_eq!(s.progress.as_deref(), Some("25%"));
    }

    #[test]
    fn schedules_parse_and_tick() {
        let c = parse_schedule("0 3 * * *").unwrap();
        // 1970-01-01T00:00:00Z → 03:00 the same day.
        assert_eq!(next_tick(&c, &t(0)).unwrap(), t(3 * 3600));
        assert_eq!(next_tick(&c, &t(3 * 3600)).unwrap(), t(27 * 3600));
        assert!(parse_schedule("every day").is_err());
        assert!(
            parse_schedule("0 3 * *")
                .unwrap_err()
                .contains("five fields")
        );
        assert!(parse_schedule("61 3 * * *").is_err());
    }
}
