//! The CachePreload's status outside a run's progress (no I/O, but `write`).
//!
//! Three states are written by the reconcile, each computed here from the object and the time:
//! a preload that cannot run ([`blocked`], [`invalid`]), one that waits for its next tick
//! ([`waiting`]), and the start of a run ([`running`]), which is the base that the run's task
//! adds progress to (see [`aggregate`](mod@super::aggregate)). Conditions keep their transition times (see
//! [`crate::conditions`]); a problem is told by its reason and message in both conditions.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use lakecache_api::{CachePreload, CachePreloadPhase, CachePreloadStatus};

use crate::conditions::{Cond, settle};
use crate::error::kube as kerr;
use crate::workers::WorkerRef;
use crate::{Context, Error, Problem};

/// Writes `status` unless the object already has it.
pub(super) async fn write(
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
pub fn blocked(
    cp: &CachePreload,
    phase: CachePreloadPhase,
    problem: &Problem,
    now: &Time,
) -> CachePreloadStatus {
    let prev = cp.status.clone().unwrap_or_default();
    CachePreloadStatus {
        phase: Some(phase),
        conditions: settle(
            vec![
                problem.cond("Ready", false),
                problem.cond("Complete", false),
            ],
            &prev.conditions,
            cp.metadata.generation,
            now,
        ),
        observed_generation: prev.observed_generation,
        ..prev
    }
}

/// The status of a preload whose spec cannot run at all: Failed, for this generation (a new
/// generation runs again, see [`super::schedule::next_run`]).
pub fn invalid(cp: &CachePreload, problem: &Problem, now: &Time) -> CachePreloadStatus {
    CachePreloadStatus {
        observed_generation: cp.metadata.generation,
        ..blocked(cp, CachePreloadPhase::Failed, problem, now)
    }
}

/// The status of a scheduled preload waiting for its tick at `next`.
pub fn waiting(cp: &CachePreload, next: Time) -> CachePreloadStatus {
    CachePreloadStatus {
        next_schedule_time: Some(next),
        ..cp.status.clone().unwrap_or_default()
    }
}

/// The status at the start of run `run` on `workers` (or at its resumption): the base that the
/// run's progress is added to. A `scheduled` preload records the time of a new run as its last
/// schedule time, the one its next tick counts from.
pub fn running(
    cp: &CachePreload,
    run: i64,
    resume: bool,
    scheduled: bool,
    workers: &[WorkerRef],
    now: &Time,
) -> CachePreloadStatus {
    let prev = cp.status.clone().unwrap_or_default();
    let start_time = if resume {
        prev.start_time.clone().unwrap_or_else(|| now.clone())
    } else {
        now.clone()
    };
    CachePreloadStatus {
        phase: Some(CachePreloadPhase::Running),
        run,
        start_time: Some(start_time),
        completion_time: None,
        workers: workers.iter().map(|w| w.name.clone()).collect(),
        last_schedule_time: if scheduled && !resume {
            Some(now.clone())
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
            now,
        ),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conditions::is_true;
    use crate::fixtures::{t, worker};

    /// The shared CachePreload, daily at 03:00, at generation 3, with `status`.
    fn preload(status: Option<CachePreloadStatus>) -> CachePreload {
        let mut cp = crate::fixtures::preload(&["train/**"], Some("0 3 * * *"), status);
        cp.metadata.generation = Some(3);
        cp
    }

    #[test]
    fn a_blocked_preload_says_why_and_keeps_its_run() {
        let prev = CachePreloadStatus {
            run: 2,
            start_time: Some(t(10)),
            observed_generation: Some(2),
            ..Default::default()
        };
        let p = Problem::new("NoReadyWorkers", "no ready workers yet");
        let s = blocked(&preload(Some(prev)), CachePreloadPhase::Pending, &p, &t(20));
        assert_eq!(s.phase, Some(CachePreloadPhase::Pending));
        assert_eq!((s.run, s.start_time), (2, Some(t(10))));
        assert_eq!(s.observed_generation, Some(2));
        for c in &s.conditions {
            assert_eq!(
                (c.status.as_str(), c.reason.as_str(), c.message.as_str()),
                ("False", "NoReadyWorkers", "no ready workers yet")
            );
        }
        // An invalid spec is Failed for the generation it was found in.
        let s = invalid(
            &preload(None),
            &Problem::new("InvalidSchedule", "bad"),
            &t(20),
        );
        assert_eq!(s.phase, Some(CachePreloadPhase::Failed));
        assert_eq!(s.observed_generation, Some(3));
    }

    #[test]
    fn a_new_run_starts_now_and_a_resumed_one_keeps_its_start() {
        let prev = CachePreloadStatus {
            phase: Some(CachePreloadPhase::Running),
            run: 4,
            start_time: Some(t(10)),
            last_schedule_time: Some(t(5)),
            next_schedule_time: Some(t(50)),
            files_done: 7,
            ..Default::default()
        };
        let cp = preload(Some(prev));
        let ws = [worker("w0"), worker("w1")];
        let s = running(&cp, 5, false, true, &ws, &t(100));
        assert_eq!(s.run, 5);
        assert_eq!(s.start_time, Some(t(100)));
        assert_eq!(s.last_schedule_time, Some(t(100)));
        assert_eq!(s.next_schedule_time, None);
        assert_eq!(s.workers, ["w0", "w1"]);
        assert_eq!(s.files_done, 0);
        assert_eq!(s.observed_generation, Some(3));
        assert!(is_true(&s.conditions, "Ready"));
        assert!(!is_true(&s.conditions, "Complete"));
        let s = running(&cp, 4, true, true, &ws, &t(100));
        assert_eq!(s.start_time, Some(t(10)));
        assert_eq!(s.last_schedule_time, Some(t(5)));
        // Without a schedule there is no schedule time.
        let s = running(&preload(None), 1, false, false, &ws, &t(100));
        assert_eq!(s.last_schedule_time, None);
    }

    #[test]
    fn waiting_shows_the_next_tick_and_changes_nothing_else() {
        let prev = CachePreloadStatus {
            phase: Some(CachePreloadPhase::Succeeded),
            run: 1,
            ..Default::default()
        };
        let s = waiting(&preload(Some(prev.clone())), t(99));
        assert_eq!(
            s,
            CachePreloadStatus {
                next_schedule_time: Some(t(99)),
                ..prev
            }
        );
    }
}
