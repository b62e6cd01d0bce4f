//! Whose an object is, decided without I/O.
//!
//! Labels are anyone's to set: whoever may create pods or ConfigMaps in a namespace can give
//! them the labels the operator uses. So the operator never trusts a label to say that an
//! object is its own. A namespaced child is ours when its controller reference names this
//! CacheNamespace's uid; a worker pod when its controller is our StatefulSet and its name one of
//! that StatefulSet's ordinals; the cluster-scoped PersistentVolume, which can have no owner
//! reference, when its labels and annotation name this CacheNamespace's namespace, name and
//! uid. Every step that reads, applies or deletes a child asks here first.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolume, Pod};
use kube::{Resource, ResourceExt};

use super::build;

/// Whether a PersistentVolume is the one this operator made for CacheNamespace `ns/name` (uid
/// `uid`). A `legacy` PV (the one an older operator made and bound this CacheNamespace's own
/// claim to) may lack the uid annotation; the next apply adds it.
pub(super) fn pv_is_ours(
    pv: &PersistentVolume,
    ns: &str,
    name: &str,
    uid: &str,
    legacy: bool,
) -> bool {
    let annotated = pv
        .annotations()
        .get(build::OWNER_UID_ANNOTATION)
        .map(String::as_str);
    pv.labels()
        .get(build::CACHE_NAMESPACE_LABEL)
        .map(String::as_str)
        == Some(name)
        && pv.labels().get(build::NAMESPACE_LABEL).map(String::as_str) == Some(ns)
        && (annotated == Some(uid) || (legacy && annotated.is_none()))
}

/// Whether `pod` is one of StatefulSet `sts`'s workers: its controller is `sts` (by uid) and its
/// name is `STS-N` for an ordinal below the StatefulSet's replicas. The StatefulSet controller
/// adopts an orphan pod with its labels and a member's name, so a pod a tenant made with the
/// labels and, say, `NAME-worker-7` would have `sts` as controller until scaled away.
pub(super) fn is_worker(pod: &Pod, sts: &StatefulSet) -> bool {
    let Some(uid) = sts.uid() else { return false };
    let replicas = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let name = pod.name_any();
    let member = name
        .strip_prefix(&format!("{}-", sts.name_any()))
        .and_then(|n| Some((n, n.parse::<i32>().ok()?)))
        .is_some_and(|(n, i)| i.to_string() == n && (0..replicas).contains(&i));
    member && controlled_by(pod, &uid)
}

/// Whether `o`'s controller is the object of uid `uid`.
pub(super) fn controlled_by(o: &impl Resource, uid: &str) -> bool {
    o.meta()
        .owner_references
        .iter()
        .flatten()
        .any(|r| r.controller == Some(true) && r.uid == uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_is_a_member_pod_our_statefulset_controls() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
        let mut sts = StatefulSet::default();
        sts.metadata.name = Some("x-worker".into());
        sts.metadata.uid = Some("sts-uid".into());
        sts.spec = Some(k8s_openapi::api::apps::v1::StatefulSetSpec {
            replicas: Some(2),
            ..Default::default()
        });
        let pod = |name: &str, uid: Option<&str>, controller: bool| {
            let mut p = Pod::default();
            p.metadata.name = Some(name.into());
            p.metadata.owner_references = uid.map(|u| {
                vec![OwnerReference {
                    uid: u.into(),
                    controller: Some(controller),
                    kind: "StatefulSet".into(),
                    name: "x-worker".into(),
                    ..Default::default()
                }]
            });
            p
        };
        assert!(is_worker(&pod("x-worker-0", Some("sts-uid"), true), &sts));
        assert!(is_worker(&pod("x-worker-1", Some("sts-uid"), true), &sts));
        for p in [
            pod("x-worker-0", None, false),
            pod("x-worker-0", Some("other"), true),
            pod("x-worker-0", Some("sts-uid"), false),
            pod("x-worker-2", Some("sts-uid"), true),
            pod("x-worker-01", Some("sts-uid"), true),
            pod("x-worker-+1", Some("sts-uid"), true),
            pod("x-worker-fake", Some("sts-uid"), true),
            pod("y-worker-0", Some("sts-uid"), true),
        ] {
            assert!(!is_worker(&p, &sts), "{:?}", p.metadata);
        }
    }

    #[test]
    fn a_pv_is_ours_only_when_it_names_our_namespace_name_and_uid() {
        let pv = |ns: &str, name: &str, uid: Option<&str>| {
            let mut p = PersistentVolume::default();
            p.metadata.labels = Some(
                [
                    (build::NAMESPACE_LABEL.to_string(), ns.to_string()),
                    (build::CACHE_NAMESPACE_LABEL.to_string(), name.to_string()),
                ]
                .into(),
            );
            p.metadata.annotations =
                uid.map(|u| [(build::OWNER_UID_ANNOTATION.to_string(), u.to_string())].into());
            p
        };
        assert!(pv_is_ours(
            &pv("a", "b-c", Some("u1")),
            "a",
            "b-c",
            "u1",
            false
        ));
        // Another CacheNamespace's (the old name scheme made a/b-c and a-b/c share one).
        assert!(!pv_is_ours(
            &pv("a-b", "c", Some("u2")),
            "a",
            "b-c",
            "u1",
            false
        ));
        // An earlier CacheNamespace of the same name.
        assert!(!pv_is_ours(
            &pv("a", "b-c", Some("u0")),
            "a",
            "b-c",
            "u1",
            false
        ));
        assert!(!pv_is_ours(
            &pv("a", "b-c", Some("u0")),
            "a",
            "b-c",
            "u1",
            true
        ));
        // An older operator's PV, which our own claim is bound to: ours until annotated.
        assert!(pv_is_ours(&pv("a", "b-c", None), "a", "b-c", "u1", true));
        assert!(!pv_is_ours(&pv("a", "b-c", None), "a", "b-c", "u1", false));
        // Anyone's PV without our labels.
        assert!(!pv_is_ours(
            &PersistentVolume::default(),
            "a",
            "b-c",
            "u1",
            true
        ));
    }
}
