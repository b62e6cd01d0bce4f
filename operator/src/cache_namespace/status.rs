//! A CacheNamespace's status, computed from what was observed (no I/O).
//!
//! Phase and conditions come only from observed state: the worker pods and StatefulSet, what the
//! ready workers answered, and problems found in the object's inputs (an invalid spec, a missing
//! Secret), which are facts about the object, not failures of the operator.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::runtime::events::EventType;
use lakecache_api::{
    CacheNamespace, CacheNamespacePhase, CacheNamespaceStatus, TierKind, TierStatus, WorkerStatus,
};
use lakecache_proto::lakecache::v1 as pb;

use crate::conditions::{Cond, settle};

/// Something wrong with the object's inputs, found without acting on it (shared by both
/// controllers; here for the paths that name it).
pub use crate::problem::Problem;

/// The result of a source scan.
#[derive(Debug, Clone, PartialEq)]
pub struct ScanResult {
    pub files: i64,
    pub bytes: i64,
    pub at: Time,
}

/// What the operator saw of a CacheNamespace's workers.
#[derive(Debug, Default, Clone)]
pub struct Observed {
    pub statefulset: Option<StatefulSet>,
    pub pods: Vec<Pod>,
    /// What each ready worker answered (by pod name), or why it did not.
    pub infos: Vec<(String, Result<pb::WorkerInfo, String>)>,
    /// The latest source scan.
    pub scan: Option<ScanResult>,
}

fn pod_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn ordinal(name: &str) -> u64 {
    name.rsplit_once('-')
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or(u64::MAX)
}

/// The workers as readers use them, in ordinal order.
pub fn workers(pods: &[Pod], port: i32) -> Vec<WorkerStatus> {
    let mut out: Vec<WorkerStatus> = pods
        .iter()
        .map(|p| {
            let ip = p
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.clone())
                .unwrap_or_default();
            WorkerStatus {
                name: p.name_any(),
                address: if ip.is_empty() {
                    String::new()
                } else if ip.contains(':') {
                    format!("[{ip}]:{port}")
                } else {
                    format!("{ip}:{port}")
                },
                ready: pod_ready(p) && !ip.is_empty(),
            }
        })
        .collect();
    out.sort_by_key(|w| (ordinal(&w.name), w.name.clone()));
    out
}

/// `part` of `whole` as a percentage with one decimal, capped at 100%.
fn percentage(part: i64, whole: i64) -> String {
    if whole <= 0 {
        return "100.0%".into();
    }
    let p = (part as f64 / whole as f64 * 100.0).min(100.0);
    format!("{p:.1}%")
}

/// Computes the status. `problem` is set when the inputs cannot be used (nothing was applied).
pub fn compute(
    cn: &CacheNamespace,
    port: i32,
    problem: Option<&Problem>,
    obs: &Observed,
    now: &Time,
) -> CacheNamespaceStatus {
    let prev = cn.status.clone().unwrap_or_default();
    let desired = cn.spec.workers.replicas;
    let workers = workers(&obs.pods, port);
    let ready = workers.iter().filter(|w| w.ready).count() as i32;

    // Usage and hits, over the workers that answered.
    let mut tiers: Vec<TierStatus> = vec![];
    let (mut hits, mut misses, mut cached) = (0u64, 0u64, 0i64);
    let mut unreachable = vec![];
    for (name, r) in &obs.infos {
        match r {
            Ok(info) => {
                hits += info.hits;
                misses += info.misses;
                for t in &info.tiers {
                    let kind = match pb::Tier::try_from(t.tier) {
                        Ok(pb::Tier::Memory) => TierKind::Memory,
                        Ok(pb::Tier::Disk) => TierKind::Disk,
                        _ => continue,
                    };
                    cached += t.used_bytes as i64;
                    match tiers.iter_mut().find(|s| s.kind == kind) {
                        Some(s) => {
                            s.capacity_bytes += t.capacity_bytes as i64;
                            s.used_bytes += t.used_bytes as i64;
                        }
                        None => tiers.push(TierStatus {
                            kind,
                            capacity_bytes: t.capacity_bytes as i64,
                            used_bytes: t.used_bytes as i64,
                        }),
                    }
                }
            }
            Err(e) => unreachable.push(format!("{name}: {e}")),
        }
    }
    tiers.sort_by_key(|t| t.kind == TierKind::Disk);
    let answered = obs.infos.iter().any(|(_, r)| r.is_ok());

    let sts = obs.statefulset.as_ref();
    let rolling = sts.is_some_and(|s| {
        let st = s.status.clone().unwrap_or_default();
        let gen_behind = st.observed_generation.unwrap_or(0) < s.metadata.generation.unwrap_or(0);
        let revision_behind =
            st.update_revision.is_some() && st.current_revision != st.update_revision;
        let count_off = st.replicas != desired || st.updated_replicas.unwrap_or(0) < st.replicas;
        gen_behind || revision_behind || count_off
    }) || (problem.is_none() && sts.is_none());

    let (phase, conds) = match problem {
        Some(p) => (
            CacheNamespacePhase::Failed,
            vec![
                p.cond("Ready", false),
                p.cond("Degraded", true),
                Cond::new(
                    "Progressing",
                    false,
                    p.reason,
                    "nothing can roll out until this is fixed",
                ),
            ],
        ),
        None => {
            let counts = format!("{ready}/{desired} workers ready");
            let ready_cond = if desired == 0 {
                Cond::new("Ready", false, "ScaledToZero", "spec.workers.replicas is 0")
            } else if ready >= desired {
                Cond::new("Ready", true, "AllWorkersReady", counts.clone())
            } else {
                Cond::new("Ready", false, "WorkersNotReady", counts.clone())
            };
            let degraded = if !unreachable.is_empty() {
                Cond::new(
                    "Degraded",
                    true,
                    "WorkersUnreachable",
                    format!(
                        "ready workers do not answer on the data plane: {}",
                        unreachable.join("; ")
                    ),
                )
            } else if !rolling && ready < desired && ready > 0 {
                Cond::new("Degraded", true, "WorkersUnavailable", counts.clone())
            } else {
                Cond::new("Degraded", false, "AsExpected", counts.clone())
            };
            let progressing = if rolling {
                Cond::new(
                    "Progressing",
                    true,
                    "RollingOut",
                    format!("rolling out the workers: {counts}"),
                )
            } else {
                Cond::new(
                    "Progressing",
                    false,
                    "RolledOut",
                    "every worker runs the current spec",
                )
            };
            let phase = if ready_cond.status {
                CacheNamespacePhase::Ready
            } else if ready == 0 {
                CacheNamespacePhase::Pending
            } else {
                CacheNamespacePhase::Degraded
            };
            (phase, vec![ready_cond, degraded, progressing])
        }
    };
    let generation = cn.metadata.generation;
    let scan = obs.scan.clone().or_else(|| {
        Some(ScanResult {
            files: prev.source_files?,
            bytes: prev.source_bytes?,
            at: prev.last_source_scan.clone()?,
        })
    });
    CacheNamespaceStatus {
        phase: Some(phase),
        conditions: settle(conds, &prev.conditions, generation, now),
        observed_generation: generation,
        replicas: obs.pods.len() as i32,
        ready_workers: ready,
        selector: Some(super::build::selector_string(&cn.name_any())),
        workers,
        tiers,
        cached_bytes: answered.then_some(cached),
        cached_percentage: match (&scan, answered) {
            (Some(s), true) => Some(percentage(cached, s.bytes)),
            _ => None,
        },
        hit_ratio: (hits + misses > 0)
            .then(|| (hits as f64 / (hits + misses) as f64 * 1000.0).round() / 1000.0),
        source_files: scan.as_ref().map(|s| s.files),
        source_bytes: scan.as_ref().map(|s| s.bytes),
        last_source_scan: scan.map(|s| s.at),
        claim_name: (problem.is_none()).then(|| cn.name_any()),
        // Recorded by the controller, never dropped here.
        disk_directories: prev.disk_directories,
    }
}

/// The Event that a change of phase from `old` to `new`'s is told by (type, reason, the Ready
/// condition's message), or `None` when the phase did not change.
pub fn phase_event(
    old: Option<CacheNamespacePhase>,
    new: &CacheNamespaceStatus,
) -> Option<(EventType, &'static str, String)> {
    let phase = new.phase.filter(|p| Some(*p) != old)?;
    let (type_, reason) = match phase {
        CacheNamespacePhase::Ready => (EventType::Normal, "Ready"),
        CacheNamespacePhase::Pending => (EventType::Normal, "Pending"),
        CacheNamespacePhase::Degraded => (EventType::Warning, "Degraded"),
        CacheNamespacePhase::Failed => (EventType::Warning, "Failed"),
    };
    let ready = new
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    Some((type_, reason, ready))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{cache_namespace, t, tier};
    use k8s_openapi::api::apps::v1::StatefulSetStatus;
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};

    fn cn(replicas: i32) -> CacheNamespace {
        let mut c = cache_namespace(replicas, vec![tier(TierKind::Memory, "1Gi", None, None)]);
        c.metadata.generation = Some(2);
        c
    }

    fn pod(name: &str, ip: Option<&str>, ready: bool) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = Some(name.into());
        p.status = Some(PodStatus {
            pod_ip: ip.map(Into::into),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        p
    }

    fn sts(replicas: i32, updated: i32) -> StatefulSet {
        let mut s = StatefulSet::default();
        s.metadata.generation = Some(1);
        s.status = Some(StatefulSetStatus {
            observed_generation: Some(1),
            replicas,
            updated_replicas: Some(updated),
            ready_replicas: Some(replicas),
            current_revision: Some("r1".into()),
            update_revision: Some("r1".into()),
            ..Default::default()
        });
        s
    }

    fn info(mem_used: u64, hits: u64, misses: u64) -> pb::WorkerInfo {
        pb::WorkerInfo {
            tiers: vec![pb::TierUsage {
                tier: pb::Tier::Memory as i32,
                capacity_bytes: 1 << 30,
                used_bytes: mem_used,
                blocks: 1,
            }],
            hits,
            misses,
            ..Default::default()
        }
    }

    #[test]
    fn all_ready_is_ready_with_usage_hits_and_cached_share() {
        let obs = Observed {
            statefulset: Some(sts(2, 2)),
            pods: vec![
                pod("imagenet-worker-1", Some("10.0.0.2"), true),
                pod("imagenet-worker-0", Some("10.0.0.1"), true),
            ],
            infos: vec![
                ("imagenet-worker-0".into(), Ok(info(300, 3, 1))),
                ("imagenet-worker-1".into(), Ok(info(200, 5, 1))),
            ],
            scan: Some(ScanResult {
                files: 10,
                bytes: 1000,
                at: t(50),
            }),
        };
        let s = compute(&cn(2), 7700, None, &obs, &t(100));
        assert_eq!(s.phase, Some(CacheNamespacePhase::Ready));
        assert_eq!(s.ready_workers, 2);
        assert_eq!(s.workers[0].name, "imagenet-worker-0");
        assert_eq!(s.workers[0].address, "10.0.0.1:7700");
        assert_eq!(s.cached_bytes, Some(500));
        assert_eq!(s.cached_percentage.as_deref(), Some("50.0%"));
        assert_eq!(s.hit_ratio, Some(0.8));
        assert_eq!(s.tiers[0].capacity_bytes, 2 << 30);
        assert_eq!(s.source_files, Some(10));
        assert_eq!(s.observed_generation, Some(2));
        assert_eq!(s.claim_name.as_deref(), Some("imagenet"));
        assert!(crate::conditions::is_true(&s.conditions, "Ready"));
        assert!(!crate::conditions::is_true(&s.conditions, "Progressing"));
        assert!(!crate::conditions::is_true(&s.conditions, "Degraded"));
    }

    #[test]
    fn scaling_up_is_progressing_and_a_lost_worker_is_degraded() {
        let obs = Observed {
            statefulset: Some(sts(2, 2)),
            pods: vec![
                pod("imagenet-worker-0", Some("10.0.0.1"), true),
                pod("imagenet-worker-1", Some("10.0.0.2"), true),
            ],
            ..Default::default()
        };
        // Asked for 3, the StatefulSet still has 2: rolling out, not degraded.
        let s = compute(&cn(3), 7700, None, &obs, &t(100));
        assert_eq!(s.phase, Some(CacheNamespacePhase::Degraded));
        assert!(crate::conditions::is_true(&s.conditions, "Progressing"));
        assert!(!crate::conditions::is_true(&s.conditions, "Degraded"));
        // Settled at 2 of 2, one not ready: degraded.
        let obs = Observed {
            pods: vec![
                pod("imagenet-worker-0", Some("10.0.0.1"), true),
                pod("imagenet-worker-1", None, false),
            ],
            ..obs
        };
        let s = compute(&cn(2), 7700, None, &obs, &t(100));
        assert_eq!(s.phase, Some(CacheNamespacePhase::Degraded));
        assert!(crate::conditions::is_true(&s.conditions, "Degraded"));
        assert!(!s.workers[1].ready);
        assert_eq!(s.workers[1].address, "");
    }

    #[test]
    fn no_workers_yet_is_pending_and_a_problem_is_failed() {
        let s = compute(&cn(2), 7700, None, &Observed::default(), &t(100));
        assert_eq!(s.phase, Some(CacheNamespacePhase::Pending));
        assert!(crate::conditions::is_true(&s.conditions, "Progressing"));
        let p = Problem {
            reason: "SecretNotFound",
            message: "Secret ml/creds does not exist".into(),
        };
        let s = compute(&cn(2), 7700, Some(&p), &Observed::default(), &t(100));
        assert_eq!(s.phase, Some(CacheNamespacePhase::Failed));
        let ready = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.reason, "SecretNotFound");
        assert!(ready.message.contains("ml/creds"));
        assert!(crate::conditions::is_true(&s.conditions, "Degraded"));
    }

    #[test]
    fn unreachable_workers_degrade_and_keep_the_last_scan() {
        let mut c = cn(1);
        c.status = Some(CacheNamespaceStatus {
            source_files: Some(7),
            source_bytes: Some(70),
            last_source_scan: Some(t(10)),
            ..Default::default()
        });
        let obs = Observed {
            statefulset: Some(sts(1, 1)),
            pods: vec![pod("imagenet-worker-0", Some("10.0.0.1"), true)],
            infos: vec![("imagenet-worker-0".into(), Err("connection refused".into()))],
            scan: None,
        };
        let s = compute(&c, 7700, None, &obs, &t(100));
        let d = s.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "WorkersUnreachable")
        );
        assert!(d.message.contains("connection refused"));
        assert_eq!(s.source_files, Some(7));
        assert_eq!(s.cached_bytes, None);
    }

    #[test]
    fn only_a_change_of_phase_is_an_event() {
        let obs = Observed {
            statefulset: Some(sts(1, 1)),
            pods: vec![pod("imagenet-worker-0", Some("10.0.0.1"), true)],
            ..Default::default()
        };
        let s = compute(&cn(1), 7700, None, &obs, &t(100));
        let (type_, reason, message) = phase_event(Some(CacheNamespacePhase::Pending), &s).unwrap();
        assert_eq!((type_, reason), (EventType::Normal, "Ready"));
        assert_eq!(message, "1/1 workers ready");
        assert!(phase_event(Some(CacheNamespacePhase::Ready), &s).is_none());
        let p = Problem::new("InvalidSpec", "spec.tiers: at least one tier");
        let s = compute(&cn(1), 7700, Some(&p), &obs, &t(100));
        let (type_, reason, message) = phase_event(None, &s).unwrap();
        assert_eq!((type_, reason), (EventType::Warning, "Failed"));
        assert_eq!(message, "spec.tiers: at least one tier");
    }
}
