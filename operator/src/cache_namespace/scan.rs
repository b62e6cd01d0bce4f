//! The source's size, for the cached percentage in the status.
//!
//! Listing a data lake can take minutes and thousands of requests, so it cannot be part of a
//! reconcile, and the operator has no credentials for the source anyway (they are mounted into
//! the workers only). So a worker does it: a metadata-only preload of `**` on one ready worker,
//! which walks the source and loads nothing. It runs in the background, at most once every
//! `source_scan_interval` per CacheNamespace (a failed one is retried within a minute), and each
//! reconcile reads the latest result from the shared [`Context`]; the status keeps the last
//! result until a new one is in.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use lakecache_api::{CacheNamespace, WorkerStatus};
use lakecache_proto::lakecache::v1 as pb;

use super::status::{self, Observed, ScanResult};
use crate::Context;
use crate::controller::key;
use crate::workers::WorkerRef;

/// A CacheNamespace's source scan.
#[derive(Debug, Clone)]
pub enum ScanState {
    Running {
        started: Instant,
    },
    Done {
        result: ScanResult,
        started: Instant,
    },
    Failed {
        message: String,
        started: Instant,
    },
}

/// What a reconcile takes from a CacheNamespace's scan `state`: the latest result, and whether
/// a new scan is due: when there was none, when the last one started `interval` ago, and when
/// the last one failed at most a minute ago (a failed scan says nothing about the source, so it
/// is retried sooner); never while one runs.
pub fn latest_and_due(state: Option<&ScanState>, interval: Duration) -> (Option<ScanResult>, bool) {
    match state {
        None => (None, true),
        Some(ScanState::Running { .. }) => (None, false),
        Some(ScanState::Done { result, started }) => {
            (Some(result.clone()), started.elapsed() >= interval)
        }
        Some(ScanState::Failed { started, .. }) => (
            None,
            started.elapsed() >= interval.min(Duration::from_secs(60)),
        ),
    }
}

/// The worker that scans: the first ready one (in ordinal order) that answered this reconcile.
pub fn scanner(obs: &Observed, port: i32) -> Option<WorkerStatus> {
    status::workers(&obs.pods, port)
        .into_iter()
        .find(|w| w.ready && obs.infos.iter().any(|(n, r)| *n == w.name && r.is_ok()))
}

/// The latest scan result, starting a scan when none is recent and a worker is ready.
pub(super) fn scan(
    cn: &CacheNamespace,
    obs: &Observed,
    token: &str,
    port: i32,
    ctx: &Arc<Context>,
) -> Option<ScanResult> {
    let uid = cn.uid()?;
    let interval = ctx.cfg.source_scan_interval;
    let mut scans = ctx.scans.lock();
    let state = scans.get(&uid);
    if let Some(ScanState::Failed { message, .. }) = state {
        tracing::debug!(cache_namespace = %key(cn), %message, "last source scan failed");
    }
    let (latest, due) = latest_and_due(state, interval);
    if due && let Some(w) = scanner(obs, port) {
        let started = Instant::now();
        scans.insert(uid.clone(), ScanState::Running { started });
        let r = WorkerRef {
            name: w.name,
            address: w.address,
            token: token.into(),
        };
        let ctx = ctx.clone();
        let cn_key = key(cn);
        tokio::spawn(async move {
            let outcome = run_scan(&ctx, &r, &uid).await;
            let state = match outcome {
                Ok(result) => {
                    tracing::info!(cache_namespace = %cn_key, files = result.files, bytes = result.bytes, "source scanned");
                    ScanState::Done { result, started }
                }
                Err(message) => {
                    tracing::warn!(cache_namespace = %cn_key, %message, "source scan failed");
                    ScanState::Failed { message, started }
                }
            };
            // A scan of a CacheNamespace deleted meanwhile is dropped.
            let mut scans = ctx.scans.lock();
            if scans.contains_key(&uid) {
                scans.insert(uid, state);
            }
        });
    }
    latest
}

async fn run_scan(ctx: &Context, w: &WorkerRef, uid: &str) -> Result<ScanResult, String> {
    let id = format!(
        "scan-{uid}-{}",
        k8s_openapi::jiff::Timestamp::now().as_second()
    );
    ctx.workers
        .start_preload(
            w,
            pb::StartPreloadRequest {
                id: id.clone(),
                paths: vec!["**".into()],
                metadata_only: true,
                members: vec![],
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut stream = ctx
        .workers
        .watch_preload(w, &id)
        .await
        .map_err(|e| e.to_string())?;
    let mut last = None;
    let deadline = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            item = stream.next() => match item {
                Some(Ok(s)) => last = Some(s),
                Some(Err(e)) => return Err(e.to_string()),
                None => break,
            },
            _ = &mut deadline => return Err("the scan took more than an hour".into()),
        }
    }
    let s = last.ok_or("the worker ended the scan without a status")?;
    if s.phase != pb::PreloadPhase::Succeeded as i32 {
        let why = s
            .failures
            .first()
            .map(|f| format!("{}: {}", f.path, f.reason))
            .unwrap_or_default();
        return Err(format!("the scan did not succeed: {why}"));
    }
    Ok(ScanResult {
        files: s.files_total as i64,
        bytes: s.matched_bytes as i64,
        at: Time(k8s_openapi::jiff::Timestamp::now()),
    })
}

/// Forgets the scans of a deleted CacheNamespace.
pub(super) fn forget(cn: &CacheNamespace, ctx: &Context) {
    if let Some(uid) = cn.uid() {
        ctx.scans.lock().remove(&uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Pod, PodCondition, PodStatus};

    fn ago(secs: u64) -> Instant {
        Instant::now() - Duration::from_secs(secs)
    }

    fn result() -> ScanResult {
        ScanResult {
            files: 1,
            bytes: 2,
            at: Time(k8s_openapi::jiff::Timestamp::from_second(3).unwrap()),
        }
    }

    #[test]
    fn a_scan_is_due_once_per_interval_and_a_failed_one_sooner() {
        let hour = Duration::from_secs(3600);
        assert_eq!(latest_and_due(None, hour), (None, true));
        let running = ScanState::Running { started: ago(7200) };
        assert_eq!(latest_and_due(Some(&running), hour), (None, false));
        let done = |secs| ScanState::Done {
            result: result(),
            started: ago(secs),
        };
        assert_eq!(
            latest_and_due(Some(&done(60)), hour),
            (Some(result()), false)
        );
        assert_eq!(
            latest_and_due(Some(&done(3600)), hour),
            (Some(result()), true)
        );
        let failed = |secs| ScanState::Failed {
            message: "no answer".into(),
            started: ago(secs),
        };
        assert_eq!(latest_and_due(Some(&failed(30)), hour), (None, false));
        assert_eq!(latest_and_due(Some(&failed(60)), hour), (None, true));
        // With an interval below a minute, a failed scan waits no longer than a good one.
        let short = Duration::from_secs(10);
        assert_eq!(latest_and_due(Some(&failed(10)), short), (None, true));
    }

    #[test]
    fn the_scanner_is_the_first_ready_worker_that_answered() {
        let pod = |name: &str, ip: &str, ready: bool| {
            let mut p = Pod::default();
            p.metadata.name = Some(name.into());
            p.status = Some(PodStatus {
                pod_ip: Some(ip.into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            });
            p
        };
        let obs = Observed {
            pods: vec![
                pod("x-worker-2", "10.0.0.3", true),
                pod("x-worker-0", "10.0.0.1", false),
                pod("x-worker-1", "10.0.0.2", true),
            ],
            infos: vec![
                ("x-worker-1".into(), Err("refused".into())),
                ("x-worker-2".into(), Ok(Default::default())),
            ],
            ..Default::default()
        };
        let w = scanner(&obs, 7700).unwrap();
        assert_eq!(
            (w.name.as_str(), w.address.as_str()),
            ("x-worker-2", "10.0.0.3:7700")
        );
        assert!(scanner(&Observed::default(), 7700).is_none());
    }
}
