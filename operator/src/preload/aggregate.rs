//! The progress of a run: every worker's part summed into the CachePreload's status (no I/O).
//!
//! A run gives every ready worker the same paths and the same member list; each walks every
//! matched file but loads only the blocks it owns by the readers' placement. So the files are
//! the same on every worker and count once (the run is done with a file when the slowest worker
//! is), while the bytes are disjoint shares and add up. The total is known only once every
//! worker has expanded the paths: a share of a partial total would make the progress go
//! backwards, so until then it says 0%. A run succeeds only when every worker's part does;
//! a worker that lost the run (it restarted, or stopped answering) fails it by name.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use lakecache_api::{CachePreloadPhase, CachePreloadStatus, MAX_REPORTED_FAILURES, PreloadFailure};
use lakecache_proto::lakecache::v1 as pb;

use crate::conditions::{Cond, settle};

/// One worker's part of a run.
#[derive(Debug, Clone, Default)]
pub struct WorkerRun {
    pub name: String,
    pub status: Option<pb::PreloadStatus>,
    /// Why the worker's part cannot finish (it did not answer, or lost the preload).
    pub error: Option<String>,
}

impl WorkerRun {
    pub(super) fn finished(&self) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::t;

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
}
