//! The volume that pods mount the cache through: a PersistentVolume of the lakecache CSI driver
//! and the claim bound to it, both named after the CacheNamespace.
//!
//! Dynamic provisioning would make a new volume per claim; the cache is one shared, read-only
//! view, so the operator makes the one PV itself, pre-bound to the one claim. A PV is
//! cluster-scoped and cannot be owned by a namespaced object, so its labels and an annotation
//! say whose it is, and the CacheNamespace's finalizer deletes it. Its name keeps namespace and
//! name apart (see [`Names::of`]), so no two CacheNamespaces can claim one PV. The token Secret
//! is its stage and publish secret: kubelet hands it to the CSI node plugin on every mount and
//! every periodic republish, so a replaced token reaches mounted volumes.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    CSIPersistentVolumeSource, ObjectReference, PersistentVolume, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PersistentVolumeSpec, SecretReference, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::ResourceExt;
use lakecache_api::volume::VolumeAttributes;
use lakecache_api::{CSI_DRIVER, CacheNamespace};

use super::{Names, labels, meta};

/// The PersistentVolume's labels and annotation that name its CacheNamespace: a PV is
/// cluster-scoped and cannot have an owner reference, so these say whose it is.
pub const NAMESPACE_LABEL: &str = "lakecache.io/namespace";
pub const OWNER_UID_ANNOTATION: &str = "lakecache.io/cache-namespace-uid";
/// A PersistentVolume's capacity is nominal: a CacheNamespace has no fixed size (what it holds
/// shows in its status); CSI drivers of this kind (Fluid, JuiceFS) use the same convention.
pub const NOMINAL_CAPACITY: &str = "1Pi";

fn capacity() -> BTreeMap<String, Quantity> {
    BTreeMap::from([("storage".to_string(), Quantity(NOMINAL_CAPACITY.into()))])
}

/// The claim pods name, bound to [`pv`] by name.
pub(super) fn pvc(
    cn: &CacheNamespace,
    names: &Names,
    owner: &OwnerReference,
) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: meta(cn, &names.pvc, owner),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadOnlyMany".into()]),
            storage_class_name: Some(String::new()),
            volume_name: Some(names.pv.clone()),
            resources: Some(VolumeResourceRequirements {
                requests: Some(capacity()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The PersistentVolume of the CSI driver, pre-bound to [`pvc`].
pub(super) fn pv(cn: &CacheNamespace, names: &Names, owner: &OwnerReference) -> PersistentVolume {
    let name = cn.name_any();
    let ns = cn.namespace().unwrap_or_default();
    // A PersistentVolume is cluster-scoped and cannot be owned by a namespaced object: the
    // CacheNamespace's finalizer deletes it.
    PersistentVolume {
        metadata: ObjectMeta {
            name: Some(names.pv.clone()),
            labels: Some({
                let mut l = labels(&name);
                l.insert(NAMESPACE_LABEL.into(), ns.clone());
                l
            }),
            annotations: Some(BTreeMap::from([(
                OWNER_UID_ANNOTATION.into(),
                owner.uid.clone(),
            )])),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            access_modes: Some(vec!["ReadOnlyMany".into()]),
            capacity: Some(capacity()),
            storage_class_name: Some(String::new()),
            persistent_volume_reclaim_policy: Some("Retain".into()),
            volume_mode: Some("Filesystem".into()),
            claim_ref: Some(ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("PersistentVolumeClaim".into()),
                name: Some(names.pvc.clone()),
                namespace: Some(ns.clone()),
                ..Default::default()
            }),
            csi: Some(CSIPersistentVolumeSource {
                driver: CSI_DRIVER.into(),
                volume_handle: names.pv.clone(),
                read_only: Some(true),
                volume_attributes: Some(VolumeAttributes::of(ns.clone(), name.clone()).to_map()),
                node_stage_secret_ref: Some(SecretReference {
                    name: Some(names.token_secret.clone()),
                    namespace: Some(ns.clone()),
                }),
                // kubelet sends it again on every periodic NodePublishVolume (the CSIDriver's
                // requiresRepublish), so a replaced token reaches mounted volumes.
                node_publish_secret_ref: Some(SecretReference {
                    name: Some(names.token_secret.clone()),
                    namespace: Some(ns.clone()),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::super::CACHE_NAMESPACE_LABEL;
    use super::super::fixtures::*;
    use super::*;
    use lakecache_api::TierKind;

    #[test]
    fn pv_names_keep_namespace_and_name_apart() {
        let ab = Names::of("a", "b-c");
        let ba = Names::of("a-b", "c");
        assert_ne!(ab.pv, ba.pv);
        assert_eq!(ab.pv, "lakecache-a.b-c");
        // And the labels say which is which.
        let mut x = cn(vec![tier(TierKind::Memory, "1Gi", None, None)]);
        x.metadata.namespace = Some("a".into());
        x.metadata.name = Some("b-c".into());
        let mut y = x.clone();
        y.metadata.namespace = Some("a-b".into());
        y.metadata.name = Some("c".into());
        let (px, py) = (build(&x).pv, build(&y).pv);
        assert_ne!(px.metadata.name, py.metadata.name);
        let l = |p: &PersistentVolume, k: &str| p.metadata.labels.as_ref().unwrap()[k].clone();
        assert_eq!(
            (l(&px, NAMESPACE_LABEL), l(&px, CACHE_NAMESPACE_LABEL)),
            ("a".into(), "b-c".into())
        );
        assert_eq!(
            (l(&py, NAMESPACE_LABEL), l(&py, CACHE_NAMESPACE_LABEL)),
            ("a-b".into(), "c".into())
        );
    }
}
