//! When a preload runs: its cron schedule, and which run comes next (no I/O).
//!
//! The decision reads only the object (its spec, its status, when it was made) and the time, so
//! that a restarted operator or another replica decides the same, and each case is a unit test.
//! It used to be made inside the reconcile, between reads and writes, where a missed case could
//! only be found in a cluster. The cases, in order:
//!
//! - a run is `Running` in the status: an earlier operator process started it and this one
//!   follows it again ([`NextRun::Resume`]; a worker answers a start of a known run id with its
//!   status, so nothing starts twice);
//! - the preload never started (no status, or `Pending` without a start time, since it waited
//!   for ready workers): the first run starts;
//! - without a schedule, a changed spec (a new generation after a finished run) runs once more,
//!   and otherwise nothing happens until the object changes ([`NextRun::Nothing`]);
//! - with a schedule, a run starts when the next tick after the last one (or after the object's
//!   creation) is due, and otherwise the reconcile waits for it ([`NextRun::Wait`]), looking
//!   again at least hourly. A changed spec waits for the next tick as well.
//!
//! Ticks are computed by `croner` in UTC. The schedule has five fields (minute hour day month
//! weekday): `croner` would also take seconds and years, which a CronJob-like field should not.

use std::str::FromStr;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use lakecache_api::{CachePreload, CachePreloadPhase, SpecError};

/// The longest a reconcile waits for a tick before looking again.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);

/// What the preload does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextRun {
    /// Start run number `run`.
    Start { run: i64 },
    /// Follow run number `run` again, which an earlier operator process started.
    Resume { run: i64 },
    /// The next tick is at `until`; look again after `after` (at least a second, at most
    /// [`MAX_WAIT`]).
    Wait { until: Time, after: Duration },
    /// Nothing until the object changes: a preload without a schedule that has run.
    Nothing,
}

/// What `cp` does next at `now`, given its parsed `schedule` (`None` without one). An error
/// when the schedule has no next tick.
pub fn next_run(
    cp: &CachePreload,
    schedule: Option<&croner::Cron>,
    now: &Time,
) -> Result<NextRun, SpecError> {
    let st = cp.status.clone().unwrap_or_default();
    let spec_changed =
        st.observed_generation.is_some() && st.observed_generation != cp.metadata.generation;
    Ok(match st.phase {
        // Started by an earlier operator process: follow it again.
        Some(CachePreloadPhase::Running) => NextRun::Resume { run: st.run.max(1) },
        None | Some(CachePreloadPhase::Pending) if st.start_time.is_none() => {
            NextRun::Start { run: st.run + 1 }
        }
        _ if spec_changed && schedule.is_none() => NextRun::Start { run: st.run + 1 },
        _ => {
            let Some(schedule) = schedule else {
                return Ok(NextRun::Nothing);
            };
            let after = st
                .last_schedule_time
                .clone()
                .or_else(|| cp.metadata.creation_timestamp.clone())
                .unwrap_or_else(|| now.clone());
            let next =
                next_tick(schedule, &after).map_err(|e| SpecError::new("spec.schedule", e))?;
            let now_s = now.0.as_second();
            if next.0.as_second() > now_s {
                let wait = (next.0.as_second() - now_s) as u64;
                NextRun::Wait {
                    until: next,
                    after: Duration::from_secs(wait.clamp(1, MAX_WAIT.as_secs())),
                }
            } else {
                NextRun::Start { run: st.run + 1 }
            }
        }
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::t;
    use lakecache_api::CachePreloadStatus;

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

    const HOUR: i64 = 3600;

    /// A preload made at 01:00 on 1970-01-01, at generation 1, with `status`.
    fn preload(status: Option<CachePreloadStatus>) -> CachePreload {
        let mut cp = crate::fixtures::preload(&["train/**"], None, status);
        cp.metadata.creation_timestamp = Some(t(HOUR));
        cp.metadata.generation = Some(1);
        cp
    }

    fn finished(phase: CachePreloadPhase, run: i64) -> CachePreloadStatus {
        CachePreloadStatus {
            phase: Some(phase),
            run,
            start_time: Some(t(HOUR)),
            completion_time: Some(t(HOUR + 60)),
            observed_generation: Some(1),
            ..Default::default()
        }
    }

    fn daily_at_3() -> croner::Cron {
        parse_schedule("0 3 * * *").unwrap()
    }

    #[test]
    fn a_new_preload_starts_its_first_run() {
        let cp = preload(None);
        assert_eq!(next_run(&cp, None, &t(HOUR)), Ok(NextRun::Start { run: 1 }));
        // With a schedule too: the first run does not wait for a tick.
        assert_eq!(
            next_run(&cp, Some(&daily_at_3()), &t(HOUR)),
            Ok(NextRun::Start { run: 1 })
        );
    }

    #[test]
    fn a_preload_that_waited_for_workers_starts_when_looked_at_again() {
        // Pending without a start time: blocked before its run ever started.
        let cp = preload(Some(CachePreloadStatus {
            phase: Some(CachePreloadPhase::Pending),
            ..Default::default()
        }));
        assert_eq!(next_run(&cp, None, &t(HOUR)), Ok(NextRun::Start { run: 1 }));
        // Pending after a run (a scheduled run that found no workers) follows the schedule.
        let cp = preload(Some(CachePreloadStatus {
            phase: Some(CachePreloadPhase::Pending),
            run: 2,
            start_time: Some(t(HOUR)),
            last_schedule_time: Some(t(3 * HOUR)),
            observed_generation: Some(1),
            ..Default::default()
        }));
        assert!(matches!(
            next_run(&cp, Some(&daily_at_3()), &t(4 * HOUR)),
            Ok(NextRun::Wait { .. })
        ));
    }

    #[test]
    fn a_running_run_is_resumed_not_started_again() {
        let running = |run| {
            preload(Some(CachePreloadStatus {
                phase: Some(CachePreloadPhase::Running),
                run,
                start_time: Some(t(HOUR)),
                observed_generation: Some(1),
                ..Default::default()
            }))
        };
        assert_eq!(
            next_run(&running(3), None, &t(2 * HOUR)),
            Ok(NextRun::Resume { run: 3 })
        );
        // Even when a tick is due, and even after the spec changed.
        let mut cp = running(3);
        cp.metadata.generation = Some(2);
        assert_eq!(
            next_run(&cp, Some(&daily_at_3()), &t(30 * HOUR)),
            Ok(NextRun::Resume { run: 3 })
        );
        // A status written before runs were numbered resumes run 1.
        assert_eq!(
            next_run(&running(0), None, &t(2 * HOUR)),
            Ok(NextRun::Resume { run: 1 })
        );
    }

    #[test]
    fn a_manual_preload_runs_once() {
        for phase in [CachePreloadPhase::Succeeded, CachePreloadPhase::Failed] {
            let cp = preload(Some(finished(phase, 1)));
            assert_eq!(next_run(&cp, None, &t(100 * HOUR)), Ok(NextRun::Nothing));
        }
    }

    #[test]
    fn a_spec_change_runs_a_manual_preload_again() {
        let mut cp = preload(Some(finished(CachePreloadPhase::Succeeded, 1)));
        cp.metadata.generation = Some(2);
        assert_eq!(
            next_run(&cp, None, &t(2 * HOUR)),
            Ok(NextRun::Start { run: 2 })
        );
        // A preload that was invalid (Failed, never started) runs once it is fixed.
        let mut cp = preload(Some(CachePreloadStatus {
            phase: Some(CachePreloadPhase::Failed),
            observed_generation: Some(1),
            ..Default::default()
        }));
        cp.metadata.generation = Some(2);
        assert_eq!(
            next_run(&cp, None, &t(2 * HOUR)),
            Ok(NextRun::Start { run: 1 })
        );
    }

    #[test]
    fn a_scheduled_preload_waits_for_its_next_tick() {
        let mut st = finished(CachePreloadPhase::Succeeded, 1);
        st.last_schedule_time = Some(t(3 * HOUR));
        let cp = preload(Some(st));
        // 04:00: the next tick is 03:00 the next day.
        assert_eq!(
            next_run(&cp, Some(&daily_at_3()), &t(4 * HOUR)),
            Ok(NextRun::Wait {
                until: t(27 * HOUR),
                after: MAX_WAIT,
            })
        );
        // 02:59:30 the next day: looked at again in 30 s.
        assert_eq!(
            next_run(&cp, Some(&daily_at_3()), &t(27 * HOUR - 30)),
            Ok(NextRun::Wait {
                until: t(27 * HOUR),
                after: Duration::from_secs(30),
            })
        );
        // A spec change does not start a scheduled preload before its tick.
        let mut changed = cp.clone();
        changed.metadata.generation = Some(2);
        assert!(matches!(
            next_run(&changed, Some(&daily_at_3()), &t(4 * HOUR)),
            Ok(NextRun::Wait { .. })
        ));
    }

    #[test]
    fn a_due_tick_starts_the_next_run() {
        let mut st = finished(CachePreloadPhase::Succeeded, 4);
        st.last_schedule_time = Some(t(3 * HOUR));
        let cp = preload(Some(st));
        for now in [27 * HOUR, 27 * HOUR + 1, 60 * HOUR] {
            assert_eq!(
                next_run(&cp, Some(&daily_at_3()), &t(now)),
                Ok(NextRun::Start { run: 5 }),
                "at {now}"
            );
        }
    }

    #[test]
    fn the_first_tick_counts_from_the_creation() {
        // Ran once (not by a tick): the first tick is the one after the creation, 03:00.
        let cp = preload(Some(finished(CachePreloadPhase::Succeeded, 1)));
        assert_eq!(
            next_run(&cp, Some(&daily_at_3()), &t(2 * HOUR)),
            Ok(NextRun::Wait {
                until: t(3 * HOUR),
                after: Duration::from_secs(3600),
            })
        );
        assert_eq!(
            next_run(&cp, Some(&daily_at_3()), &t(3 * HOUR)),
            Ok(NextRun::Start { run: 2 })
        );
        // Without a creation time, from now: never due at once.
        let mut cp = cp;
        cp.metadata.creation_timestamp = None;
        assert!(matches!(
            next_run(&cp, Some(&daily_at_3()), &t(3 * HOUR)),
            Ok(NextRun::Wait { .. })
        ));
    }
}
