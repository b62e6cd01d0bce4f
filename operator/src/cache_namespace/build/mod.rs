//! Every child of a CacheNamespace, built from the validated spec without I/O.
//!
//! The build is a pure function of the object and a few inputs ([`BuildInputs`]: the validated
//! spec, the token, the images, the PV name) so that what the operator would apply can be
//! checked in unit tests, without a cluster; the controller's apply step only writes what
//! [`children`] returns. One module per child or group of children:
//!
//! - [`config`]: the worker configuration file (a ConfigMap) and the data-plane token (a Secret);
//! - [`statefulset`]: the workers, their tiers as volumes, and what rolls them;
//! - [`service`]: the headless Service that names each worker;
//! - [`volume`]: the PersistentVolume of the CSI driver and the claim bound to it;
//! - [`policy`]: the NetworkPolicy (optional) and the PodDisruptionBudget;
//! - [`host_path`]: which node directory a host-path Disk tier may use.
//!
//! The worker pods read one configuration file (from the ConfigMap), the data-plane token (from
//! the token Secret) and, if the source needs them, the user's credentials (their Secret,
//! mounted as files: the keys never pass through the operator or the spec). Each worker binds
//! its pod IP, so workers that share a network (pods with `hostNetwork`) never collide.
//!
//! A CacheNamespace is written by a tenant, who may create nothing but CacheNamespaces and pods
//! in their own namespace; what is built from it must not reach further. So a host path is only
//! ever `ROOT/NAMESPACE/NAME` below a root the admin allows (checked before the build, see
//! [`host_path_root`]), the root init container that chowns it runs the operator's image and not
//! the tenant's, the PersistentVolume's name keeps namespace and name apart (`.` cannot occur in
//! a namespace), and an optional NetworkPolicy lets only the chart's CSI plugin and operator
//! reach the workers' data port.

pub mod config;
pub mod host_path;
pub mod policy;
pub mod service;
pub mod statefulset;
pub mod volume;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, PersistentVolume, PersistentVolumeClaim, Secret, Service,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};
use lakecache_api::{CacheNamespace, ValidSpec};

pub use self::config::{
    CONFIG_DIR, CONFIG_FILE, CREDENTIALS_DIR, DISK_DIR, MEMORY_DIR, TOKEN_DIR, TOKEN_KEY,
    worker_config,
};
pub use self::host_path::{host_dir, host_path_root, normalize_path};
pub use self::statefulset::{CONFIG_HASH_ANNOTATION, TOKEN_HASH_ANNOTATION, WORKER_UID};
pub use self::volume::{NAMESPACE_LABEL, NOMINAL_CAPACITY, OWNER_UID_ANNOTATION};
use crate::NetworkPolicyPeers;

/// Labels.
pub const CACHE_NAMESPACE_LABEL: &str = "lakecache.io/cache-namespace";

/// Names of a CacheNamespace's children.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub statefulset: String,
    pub service: String,
    pub config_map: String,
    pub token_secret: String,
    pub pdb: String,
    pub pvc: String,
    pub pv: String,
    pub network_policy: String,
}

impl Names {
    pub fn of(namespace: &str, name: &str) -> Self {
        // A namespace is a DNS label (no `.`), a CacheNamespace name at most 45 characters: the
        // first `.` separates them, so no two CacheNamespaces share a PV name (with `-`,
        // `a`/`b-c` and `a-b`/`c` did), and the name stays within 253 characters.
        let pv = format!("lakecache-{namespace}.{name}");
        Self {
            statefulset: format!("{name}-worker"),
            service: format!("{name}-workers"),
            config_map: format!("{name}-worker-config"),
            token_secret: format!("{name}-token"),
            pdb: format!("{name}-workers"),
            pvc: name.to_string(),
            pv,
            network_policy: format!("{name}-workers"),
        }
    }
}

/// Every child, ready to apply.
#[derive(Debug, Clone)]
pub struct Children {
    pub config_map: ConfigMap,
    pub token_secret: Secret,
    pub service: Service,
    pub statefulset: StatefulSet,
    pub pdb: PodDisruptionBudget,
    pub pvc: PersistentVolumeClaim,
    pub pv: PersistentVolume,
    /// When the operator makes NetworkPolicies.
    pub network_policy: Option<NetworkPolicy>,
}

/// What the build needs besides the object.
#[derive(Debug, Clone)]
pub struct BuildInputs<'a> {
    pub spec: &'a ValidSpec,
    /// The data-plane token (kept from the existing Secret, or new).
    pub token: &'a str,
    pub default_image: &'a str,
    /// The image of the root init container of a host-path Disk tier (the operator's own).
    pub init_image: &'a str,
    /// Who may reach the workers' data port, if the operator makes NetworkPolicies.
    pub network_policy: Option<&'a NetworkPolicyPeers>,
    /// The PersistentVolume's name when it is not [`Names::of`]'s: the one this CacheNamespace's
    /// claim is already bound to (an older operator named PVs `lakecache-NAMESPACE-NAME`, and a
    /// claim's volumeName cannot change).
    pub pv_name: Option<&'a str>,
}

/// The labels every child carries.
pub fn labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "lakecache".into()),
        ("app.kubernetes.io/instance".into(), name.into()),
        ("app.kubernetes.io/managed-by".into(), crate::MANAGER.into()),
        (CACHE_NAMESPACE_LABEL.into(), name.into()),
    ])
}

/// The labels that select a CacheNamespace's worker pods (never changed after creation).
pub fn selector_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "lakecache".into()),
        ("app.kubernetes.io/component".into(), "worker".into()),
        (CACHE_NAMESPACE_LABEL.into(), name.into()),
    ])
}

/// The selector as a string (`a=b,c=d`), as the scale subresource reports it.
pub fn selector_string(name: &str) -> String {
    selector_labels(name)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn meta(cn: &CacheNamespace, name: &str, owner: &OwnerReference) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: cn.namespace(),
        labels: Some(labels(&cn.name_any())),
        owner_references: Some(vec![owner.clone()]),
        ..Default::default()
    }
}

/// Builds every child of `cn`.
pub fn children(cn: &CacheNamespace, inp: &BuildInputs<'_>) -> Children {
    let ns = cn.namespace().unwrap_or_default();
    let mut names = Names::of(&ns, &cn.name_any());
    if let Some(pv) = inp.pv_name {
        names.pv = pv.to_string();
    }
    let owner = cn
        .controller_owner_ref(&())
        .expect("a CacheNamespace from the API server has a name and uid");
    let v = inp.spec;
    let config = worker_config(cn, v).to_yaml();
    let config_hash = blake3::hash(config.as_bytes()).to_hex()[..16].to_string();
    let token_hash = blake3::hash(inp.token.as_bytes()).to_hex()[..16].to_string();
    Children {
        config_map: config::config_map(cn, &names, &owner, config),
        token_secret: config::token_secret(cn, &names, &owner, inp.token),
        service: service::service(cn, &names, &owner, v),
        statefulset: statefulset::statefulset(
            cn,
            &names,
            &owner,
            v,
            inp,
            &config_hash,
            &token_hash,
        ),
        pdb: policy::pdb(cn, &names, &owner),
        pvc: volume::pvc(cn, &names, &owner),
        pv: volume::pv(cn, &names, &owner),
        network_policy: inp
            .network_policy
            .map(|peers| policy::network_policy(cn, &names, &owner, v, peers)),
    }
}

/// A CacheNamespace and ways to build it, for the tests of every child's module.
#[cfg(test)]
mod fixtures {
    use super::*;
    pub(super) use crate::fixtures::tier;
    use lakecache_api::{MetadataPolicyKind, MetadataSpec, SecretReference as CredRef, TierSpec};

    /// The shared CacheNamespace ([`crate::fixtures::cache_namespace`]) with 3 workers and
    /// everything its children are built from set: the source's endpoint, region, credentials
    /// and options, the block size, the metadata policy and a uid for the owner references.
    pub(super) fn cn(tiers: Vec<TierSpec>) -> CacheNamespace {
        let mut cn = crate::fixtures::cache_namespace(3, tiers);
        let source = &mut cn.spec.source;
        source.endpoint = Some("http://s3.example:9000".into());
        source.region = Some("us-east-1".into());
        source.credentials_secret_ref = Some(CredRef {
            name: "s3-creds".into(),
        });
        source.options = BTreeMap::from([("enable_virtual_host_style".into(), "false".into())]);
        cn.spec.block_size = Some("8Mi".into());
        cn.spec.metadata = MetadataSpec {
            policy: MetadataPolicyKind::Ttl,
            ttl: Some("5m".into()),
        };
        cn.metadata.uid = Some("uid-1".into());
        cn
    }

    pub(super) fn build(cn: &CacheNamespace) -> Children {
        build_with(cn, "t0ken", None)
    }

    pub(super) fn build_with(
        cn: &CacheNamespace,
        token: &str,
        np: Option<&NetworkPolicyPeers>,
    ) -> Children {
        let v = cn.spec.validate().unwrap();
        children(
            cn,
            &BuildInputs {
                spec: &v,
                token,
                default_image: "lakecache:test",
                init_image: "lakecache-operator:test",
                network_policy: np,
                pv_name: None,
            },
        )
    }

    pub(super) fn template_annotation(c: &Children, key: &str) -> String {
        c.statefulset
            .spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()[key]
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;
    use lakecache_api::TierKind;

    #[test]
    fn children_are_owned_labelled_and_wired_together() {
        let cn = cn(vec![
            tier(TierKind::Memory, "1Gi", None, None),
            tier(TierKind::Disk, "10Gi", Some("/var/cache/lakecache"), None),
        ]);
        let c = build(&cn);
        let names = Names::of("ml", "imagenet");
        for (kind, m) in [
            ("ConfigMap", &c.config_map.metadata),
            ("Secret", &c.token_secret.metadata),
            ("Service", &c.service.metadata),
            ("StatefulSet", &c.statefulset.metadata),
            ("PodDisruptionBudget", &c.pdb.metadata),
            ("PersistentVolumeClaim", &c.pvc.metadata),
        ] {
            let o = &m.owner_references.as_ref().unwrap()[0];
            assert_eq!(
                (o.kind.as_str(), o.uid.as_str()),
                ("CacheNamespace", "uid-1"),
                "{kind}"
            );
            assert_eq!(o.controller, Some(true), "{kind}");
            assert_eq!(m.namespace.as_deref(), Some("ml"), "{kind}");
        }
        assert!(
            c.pv.metadata.owner_references.is_none(),
            "a PV cannot have a namespaced owner"
        );
        let sts = c.statefulset.spec.as_ref().unwrap();
        assert_eq!(sts.replicas, Some(3));
        assert_eq!(sts.service_name.as_deref(), Some(names.service.as_str()));
        let pod = sts.template.spec.as_ref().unwrap();
        let vols = pod.volumes.as_ref().unwrap();
        let vol = |n: &str| {
            vols.iter()
                .find(|v| v.name == n)
                .unwrap_or_else(|| panic!("no volume {n}"))
        };
        assert_eq!(
            vol("config").config_map.as_ref().unwrap().name,
            names.config_map
        );
        assert_eq!(
            vol("token").secret.as_ref().unwrap().secret_name.as_deref(),
            Some(names.token_secret.as_str())
        );
        assert_eq!(
            vol("credentials")
                .secret
                .as_ref()
                .unwrap()
                .secret_name
                .as_deref(),
            Some("s3-creds")
        );
        let mem = vol("memory").empty_dir.as_ref().unwrap();
        assert_eq!(mem.medium.as_deref(), Some("Memory"));
        assert_eq!(
            vol("disk").host_path.as_ref().unwrap().path,
            "/var/cache/lakecache/ml/imagenet"
        );
        let ctr = &pod.containers[0];
        let disk_mount = ctr
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == "disk")
            .unwrap();
        assert_eq!(disk_mount.sub_path_expr.as_deref(), Some("$(POD_NAME)"));
        // The worker runs unprivileged; only the init container may chown the host directory.
        let psc = pod.security_context.as_ref().unwrap();
        assert_eq!(
            (psc.run_as_user, psc.fs_group),
            (Some(WORKER_UID), Some(WORKER_UID))
        );
        assert_eq!(
            ctr.security_context.as_ref().unwrap().run_as_non_root,
            Some(true)
        );
        let init = &pod.init_containers.as_ref().unwrap()[0];
        assert_eq!(init.command.as_ref().unwrap()[2], DISK_DIR);
        let caps = init
            .security_context
            .as_ref()
            .unwrap()
            .capabilities
            .as_ref()
            .unwrap();
        assert_eq!(caps.add.as_deref(), Some(&["CHOWN".to_string()][..]));
        assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
        assert_eq!(ctr.image.as_deref(), Some("lakecache:test"));
        // The root init container runs the operator's image, whatever the spec names.
        assert_eq!(init.image.as_deref(), Some("lakecache-operator:test"));
        let mut theirs = cn.clone();
        theirs.spec.workers.image = Some("tenant/anything:latest".into());
        let c2 = build(&theirs);
        let pod2 = c2
            .statefulset
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap();
        assert_eq!(
            pod2.init_containers.as_ref().unwrap()[0].image.as_deref(),
            Some("lakecache-operator:test")
        );
        assert_eq!(
            pod2.containers[0].image.as_deref(),
            Some("tenant/anything:latest")
        );
        // The service selects exactly the pods the StatefulSet makes.
        let pod_labels = sts
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap();
        for (k, v) in c.service.spec.as_ref().unwrap().selector.as_ref().unwrap() {
            assert_eq!(pod_labels.get(k), Some(v));
        }
        // PV and PVC point at each other; the PV carries the token Secret as its stage secret.
        let pv = c.pv.spec.as_ref().unwrap();
        let claim = pv.claim_ref.as_ref().unwrap();
        assert_eq!(
            (claim.namespace.as_deref(), claim.name.as_deref()),
            (Some("ml"), Some("imagenet"))
        );
        let csi = pv.csi.as_ref().unwrap();
        assert_eq!(csi.driver, "csi.lakecache.io");
        assert_eq!(
            csi.node_stage_secret_ref.as_ref().unwrap().name.as_deref(),
            Some(names.token_secret.as_str())
        );
        assert_eq!(csi.node_publish_secret_ref, csi.node_stage_secret_ref);
        let pv_labels = c.pv.metadata.labels.as_ref().unwrap();
        assert_eq!(pv_labels[NAMESPACE_LABEL], "ml");
        assert_eq!(pv_labels[CACHE_NAMESPACE_LABEL], "imagenet");
        assert_eq!(
            c.pv.metadata.annotations.as_ref().unwrap()[OWNER_UID_ANNOTATION],
            "uid-1"
        );
        assert!(c.network_policy.is_none());
        assert_eq!(
            csi.volume_attributes.as_ref().unwrap()["cacheNamespace"],
            "imagenet"
        );
        assert_eq!(
            c.pvc.spec.as_ref().unwrap().volume_name.as_deref(),
            Some(names.pv.as_str())
        );
        assert_eq!(
            c.pvc.spec.as_ref().unwrap().storage_class_name.as_deref(),
            Some("")
        );
        assert_eq!(
            c.token_secret.data.as_ref().unwrap()[TOKEN_KEY].0,
            b"t0ken".to_vec()
        );
    }

    #[test]
    fn long_names_stay_valid() {
        let n = Names::of(&"n".repeat(63), &"c".repeat(45));
        assert!(n.pv.len() <= 253);
        assert!(n.pv.len() <= 63 + 45 + 11);
        assert!(n.statefulset.len() <= 52);
    }
}
