//! Every child of a CacheNamespace, built from the validated spec without I/O.
//!
//! The worker pods read one configuration file (from the ConfigMap), the data-plane token (from
//! the token Secret) and, if the source needs them, the user's credentials (their Secret,
//! mounted as files: the keys never pass through the operator or the spec). Each worker binds
//! its pod IP, so workers that share a network (pods with `hostNetwork`) never collide.
//! Tiers become volumes: Memory a RAM-backed emptyDir sized to the tier, Disk a per-worker
//! subdirectory of a host path (kept across restarts on the node) or a volume claim template.
//!
//! A CacheNamespace is written by a tenant, who may create nothing but CacheNamespaces and pods
//! in their own namespace; what is built from it must not reach further. So a host path is only
//! ever `ROOT/NAMESPACE/NAME` below a root the admin allows (checked before the build, see
//! [`host_path_root`]), the root init container that chowns it runs the operator's image and not
//! the tenant's, the PersistentVolume's name keeps namespace and name apart (`.` cannot occur in
//! a namespace), and an optional NetworkPolicy lets only the chart's CSI plugin and operator
//! reach the workers' data port.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{
    RollingUpdateStatefulSetStrategy, StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Affinity, CSIPersistentVolumeSource, Capabilities, ConfigMap, ConfigMapVolumeSource, Container,
    ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction, HostPathVolumeSource,
    ObjectFieldSelector, ObjectReference, PersistentVolume, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PersistentVolumeSpec, PodAffinityTerm, PodAntiAffinity,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, Secret, SecretReference,
    SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
    VolumeResourceRequirements, WeightedPodAffinityTerm,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta, OwnerReference,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use lakecache_api::{CSI_DRIVER, CacheNamespace, DiskLocation, ValidSpec};

use crate::NetworkPolicyPeers;

/// Where things are inside a worker container.
pub const CONFIG_DIR: &str = "/etc/lakecache/config";
pub const CONFIG_FILE: &str = "worker.yaml";
pub const TOKEN_DIR: &str = "/etc/lakecache/token";
pub const CREDENTIALS_DIR: &str = "/etc/lakecache/credentials";
pub const MEMORY_DIR: &str = "/cache/memory";
pub const DISK_DIR: &str = "/cache/disk";
/// The key of the token in the token Secret (and in the CSI stage secret).
pub const TOKEN_KEY: &str = "token";
/// The pod-template annotation that changes when the configuration does, to roll the workers.
pub const CONFIG_HASH_ANNOTATION: &str = "lakecache.io/config-hash";
/// The pod-template annotation that changes when the data-plane token does (a hash prefix, never
/// the token), so that the workers roll when the token Secret is replaced.
pub const TOKEN_HASH_ANNOTATION: &str = "lakecache.io/token-hash";
/// The PersistentVolume's labels and annotation that name its CacheNamespace: a PV is
/// cluster-scoped and cannot have an owner reference, so these say whose it is.
pub const NAMESPACE_LABEL: &str = "lakecache.io/namespace";
pub const OWNER_UID_ANNOTATION: &str = "lakecache.io/cache-namespace-uid";
/// The unprivileged user of the lakecache image (see the Dockerfile).
pub const WORKER_UID: i64 = 65532;
/// Labels.
pub const CACHE_NAMESPACE_LABEL: &str = "lakecache.io/cache-namespace";
/// A PersistentVolume's capacity is nominal: a CacheNamespace has no fixed size (what it holds
/// shows in its status); CSI drivers of this kind (Fluid, JuiceFS) use the same convention.
pub const NOMINAL_CAPACITY: &str = "1Pi";

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

/// The allowed root that a Disk tier's `path` names, normalized, or `None` if it names none.
///
/// The path must be one of the roots itself, compared by normalized components (`//`, `.` and a
/// trailing `/` do not matter; a relative path or one with `..` names nothing), not a directory
/// below one: below a root lie the CacheNamespaces' own directories, and a path into one of them
/// (or through a symlink a worker made there, which a hostPath follows) would reach another
/// CacheNamespace's cache or out of the root. Prefixes do not count: `/var/lib/lakecache-evil`
/// is not `/var/lib/lakecache`.
pub fn host_path_root<'a>(path: &str, roots: &'a [String]) -> Option<&'a str> {
    let p = normalize_path(path)?;
    roots
        .iter()
        .find(|r| normalize_path(r).as_deref() == Some(p.as_str()))
        .map(String::as_str)
}

/// An absolute path with `//`, `.` and a trailing `/` removed; `None` for a relative path, an
/// empty one, or one with a `..` component.
pub fn normalize_path(path: &str) -> Option<String> {
    if !path.starts_with('/') {
        return None;
    }
    let mut parts = vec![];
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => return None,
            c => parts.push(c),
        }
    }
    Some(format!("/{}", parts.join("/")))
}

/// The node directory of a CacheNamespace's host-path Disk tier: its own, below the root.
pub fn host_dir(root: &str, namespace: &str, name: &str) -> String {
    format!("{}/{namespace}/{name}", root.trim_end_matches('/'))
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

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn env_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                api_version: None,
            }),
            ..Default::default()
        }),
    }
}

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(true),
        ..Default::default()
    }
}

/// The worker configuration file (the worker's `WorkerConfig`, as YAML). Listen addresses come
/// from the environment (the pod IP), the worker id from the pod name.
pub fn worker_config(cn: &CacheNamespace, v: &ValidSpec) -> String {
    let src = &cn.spec.source;
    let mut options = serde_json::Map::new();
    for (k, val) in &src.options {
        options.insert(k.clone(), val.clone().into());
    }
    if let Some(e) = &src.endpoint {
        options.insert("endpoint".into(), e.clone().into());
    }
    if let Some(r) = &src.region {
        options.insert("region".into(), r.clone().into());
    }
    let mut source = serde_json::json!({
        "uri": src.uri,
        "options": options,
        "timeout": format!("{}ms", v.source_timeout.as_millis()),
    });
    if src.credentials_secret_ref.is_some() {
        source["credentialsDir"] = CREDENTIALS_DIR.into();
    }
    let mut tiers = vec![];
    if let Some(m) = v.memory {
        tiers.push(serde_json::json!({"kind": "Memory", "path": MEMORY_DIR, "size": m}));
    }
    if let Some(d) = &v.disk {
        tiers.push(serde_json::json!({"kind": "Disk", "path": DISK_DIR, "size": d.size}));
    }
    let metadata = match v.metadata_ttl {
        None => serde_json::json!({"policy": "Immutable"}),
        Some(t) => serde_json::json!({"policy": "Ttl", "ttl": format!("{}ms", t.as_millis())}),
    };
    let cfg = serde_json::json!({
        "source": source,
        "listen": format!("0.0.0.0:{}", v.port),
        "adminListen": format!("0.0.0.0:{}", v.port + 1),
        "blockSize": v.block_size,
        "tiers": tiers,
        "metadata": metadata,
        "tokenFile": format!("{TOKEN_DIR}/{TOKEN_KEY}"),
    });
    serde_yaml_ng::to_string(&cfg).expect("JSON values serialize as YAML")
}

/// Builds every child of `cn`.
pub fn children(cn: &CacheNamespace, inp: &BuildInputs<'_>) -> Children {
    let name = cn.name_any();
    let ns = cn.namespace().unwrap_or_default();
    let mut names = Names::of(&ns, &name);
    if let Some(pv) = inp.pv_name {
        names.pv = pv.to_string();
    }
    let owner = cn
        .controller_owner_ref(&())
        .expect("a CacheNamespace from the API server has a name and uid");
    let v = inp.spec;
    let config = worker_config(cn, v);
    let config_hash = blake3::hash(config.as_bytes()).to_hex()[..16].to_string();
    let token_hash = blake3::hash(inp.token.as_bytes()).to_hex()[..16].to_string();

    let config_map = ConfigMap {
        metadata: meta(cn, &names.config_map, &owner),
        data: Some(BTreeMap::from([(CONFIG_FILE.into(), config)])),
        ..Default::default()
    };

    let token_secret = Secret {
        metadata: meta(cn, &names.token_secret, &owner),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            TOKEN_KEY.into(),
            ByteString(inp.token.as_bytes().to_vec()),
        )])),
        ..Default::default()
    };

    let ports = vec![
        ServicePort {
            name: Some("grpc".into()),
            port: v.port,
            target_port: Some(IntOrString::Int(v.port)),
            ..Default::default()
        },
        ServicePort {
            name: Some("admin".into()),
            port: v.port + 1,
            target_port: Some(IntOrString::Int(v.port + 1)),
            ..Default::default()
        },
    ];
    let service = Service {
        metadata: meta(cn, &names.service, &owner),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(selector_labels(&name)),
            ports: Some(ports),
            publish_not_ready_addresses: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    };

    let statefulset = statefulset(cn, &names, &owner, v, inp, &config_hash, &token_hash);
    let network_policy = inp
        .network_policy
        .map(|peers| network_policy(cn, &names, &owner, v, peers));

    let pdb = PodDisruptionBudget {
        metadata: meta(cn, &names.pdb, &owner),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&name)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };

    let capacity = BTreeMap::from([("storage".to_string(), Quantity(NOMINAL_CAPACITY.into()))]);
    let pvc = PersistentVolumeClaim {
        metadata: meta(cn, &names.pvc, &owner),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadOnlyMany".into()]),
            storage_class_name: Some(String::new()),
            volume_name: Some(names.pv.clone()),
            resources: Some(VolumeResourceRequirements {
                requests: Some(capacity.clone()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };

    // A PersistentVolume is cluster-scoped and cannot be owned by a namespaced object: the
    // CacheNamespace's finalizer deletes it.
    let pv = PersistentVolume {
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
            capacity: Some(capacity),
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
                volume_attributes: Some(BTreeMap::from([
                    ("cacheNamespace".into(), name.clone()),
                    ("namespace".into(), ns.clone()),
                ])),
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
    };

    Children {
        config_map,
        token_secret,
        service,
        statefulset,
        pdb,
        pvc,
        pv,
        network_policy,
    }
}

/// Ingress to the worker pods: the data port only from the chart's CSI plugin and operator pods
/// (in their namespace), the admin port (probes, /metrics; no data) from anywhere.
fn network_policy(
    cn: &CacheNamespace,
    names: &Names,
    owner: &OwnerReference,
    v: &ValidSpec,
    peers: &NetworkPolicyPeers,
) -> NetworkPolicy {
    let port = |p: i32| NetworkPolicyPort {
        port: Some(IntOrString::Int(p)),
        protocol: Some("TCP".into()),
        ..Default::default()
    };
    let peer = NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                "kubernetes.io/metadata.name".into(),
                peers.namespace.clone(),
            )])),
            ..Default::default()
        }),
        pod_selector: Some(LabelSelector {
            match_labels: Some(peers.labels.clone()),
            match_expressions: (!peers.components.is_empty()).then(|| {
                vec![LabelSelectorRequirement {
                    key: "app.kubernetes.io/component".into(),
                    operator: "In".into(),
                    values: Some(peers.components.clone()),
                }]
            }),
        }),
        ..Default::default()
    };
    NetworkPolicy {
        metadata: meta(cn, &names.network_policy, owner),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&cn.name_any())),
                ..Default::default()
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    from: Some(vec![peer]),
                    ports: Some(vec![port(v.port)]),
                },
                NetworkPolicyIngressRule {
                    from: None,
                    ports: Some(vec![port(v.port + 1)]),
                },
            ]),
            ..Default::default()
        }),
    }
}

fn statefulset(
    cn: &CacheNamespace,
    names: &Names,
    owner: &OwnerReference,
    v: &ValidSpec,
    inp: &BuildInputs<'_>,
    config_hash: &str,
    token_hash: &str,
) -> StatefulSet {
    let name = cn.name_any();
    let ns = cn.namespace().unwrap_or_default();
    let w = &cn.spec.workers;
    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: names.config_map.clone(),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: "token".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(names.token_secret.clone()),
                default_mode: Some(0o440),
                ..Default::default()
            }),
            ..Default::default()
        },
    ];
    let mut mounts = vec![mount("config", CONFIG_DIR), mount("token", TOKEN_DIR)];
    if let Some(r) = &cn.spec.source.credentials_secret_ref {
        volumes.push(Volume {
            name: "credentials".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(r.name.clone()),
                default_mode: Some(0o440),
                ..Default::default()
            }),
            ..Default::default()
        });
        mounts.push(mount("credentials", CREDENTIALS_DIR));
    }
    if let Some(size) = v.memory {
        // The tier keeps itself within `size`; the limit leaves room for files being written.
        let limit = size + size / 10 + (64 << 20);
        volumes.push(Volume {
            name: "memory".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: Some(Quantity(limit.to_string())),
            }),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name: "memory".into(),
            mount_path: MEMORY_DIR.into(),
            ..Default::default()
        });
    }
    let mut claim_templates = None;
    let mut init_containers = vec![];
    if let Some(d) = &v.disk {
        match &d.location {
            DiskLocation::HostPath(p) => {
                volumes.push(Volume {
                    name: "disk".into(),
                    host_path: Some(HostPathVolumeSource {
                        path: host_dir(p, &ns, &name),
                        type_: Some("DirectoryOrCreate".into()),
                    }),
                    ..Default::default()
                });
                // Each worker its own directory, so two workers on one node never share blocks.
                let disk_mount = VolumeMount {
                    name: "disk".into(),
                    mount_path: DISK_DIR.into(),
                    sub_path_expr: Some("$(POD_NAME)".into()),
                    ..Default::default()
                };
                // fsGroup does not reach a host path: hand the directory to the worker's user,
                // with nothing but the right to change owners. It runs as root, so it runs the
                // operator's image, never the one the CacheNamespace names.
                init_containers.push(Container {
                    name: "prepare-disk".into(),
                    image: Some(inp.init_image.into()),
                    command: Some(vec![
                        "chown".into(),
                        format!("{WORKER_UID}:{WORKER_UID}"),
                        DISK_DIR.into(),
                    ]),
                    env: Some(vec![env_field("POD_NAME", "metadata.name")]),
                    volume_mounts: Some(vec![disk_mount.clone()]),
                    security_context: Some(SecurityContext {
                        run_as_user: Some(0),
                        run_as_non_root: Some(false),
                        allow_privilege_escalation: Some(false),
                        capabilities: Some(Capabilities {
                            add: Some(vec!["CHOWN".into()]),
                            drop: Some(vec!["ALL".into()]),
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                });
                mounts.push(disk_mount);
            }
            DiskLocation::StorageClass(class) => {
                claim_templates = Some(vec![PersistentVolumeClaim {
                    metadata: ObjectMeta {
                        name: Some("disk".into()),
                        labels: Some(selector_labels(&name)),
                        ..Default::default()
                    },
                    spec: Some(PersistentVolumeClaimSpec {
                        access_modes: Some(vec!["ReadWriteOnce".into()]),
                        storage_class_name: Some(class.clone()),
                        resources: Some(VolumeResourceRequirements {
                            requests: Some(BTreeMap::from([(
                                "storage".to_string(),
                                Quantity(d.size.to_string()),
                            )])),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]);
                mounts.push(VolumeMount {
                    name: "disk".into(),
                    mount_path: DISK_DIR.into(),
                    ..Default::default()
                });
            }
        }
    }
    let admin = v.port + 1;
    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("admin".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(3),
        ..Default::default()
    };
    let container = Container {
        name: "worker".into(),
        image: Some(w.image.clone().unwrap_or_else(|| inp.default_image.into())),
        image_pull_policy: w.image_pull_policy.clone(),
        command: Some(vec!["lakecache-worker".into()]),
        args: Some(vec![
            "--config".into(),
            format!("{CONFIG_DIR}/{CONFIG_FILE}"),
        ]),
        env: Some(vec![
            env_field("POD_NAME", "metadata.name"),
            env_field("POD_IP", "status.podIP"),
            env("LAKECACHE_WORKER_ID", "$(POD_NAME)"),
            env("LAKECACHE_LISTEN", &format!("$(POD_IP):{}", v.port)),
            env("LAKECACHE_ADMIN_LISTEN", &format!("$(POD_IP):{admin}")),
            env("LAKECACHE_LOG_FORMAT", "json"),
        ]),
        ports: Some(vec![
            ContainerPort {
                name: Some("grpc".into()),
                container_port: v.port,
                ..Default::default()
            },
            ContainerPort {
                name: Some("admin".into()),
                container_port: admin,
                ..Default::default()
            },
        ]),
        readiness_probe: Some(probe("/readyz", 5, 3)),
        liveness_probe: Some(probe("/livez", 10, 6)),
        resources: w.resources.clone(),
        volume_mounts: Some(mounts),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    // By default workers prefer distinct nodes: a node's loss then costs one worker's share.
    let affinity = w.affinity.clone().unwrap_or_else(|| Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: PodAffinityTerm {
                        label_selector: Some(LabelSelector {
                            match_labels: Some(selector_labels(&name)),
                            ..Default::default()
                        }),
                        topology_key: "kubernetes.io/hostname".into(),
                        ..Default::default()
                    },
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    });
    let mut pod_labels = labels(&name);
    pod_labels.extend(selector_labels(&name));
    StatefulSet {
        metadata: meta(cn, &names.statefulset, owner),
        spec: Some(StatefulSetSpec {
            replicas: Some(w.replicas),
            service_name: Some(names.service.clone()),
            // Workers are independent: start and replace them all at once.
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector {
                match_labels: Some(selector_labels(&name)),
                ..Default::default()
            },
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateStatefulSetStrategy {
                    partition: Some(0),
                    ..Default::default()
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(BTreeMap::from([
                        (CONFIG_HASH_ANNOTATION.into(), config_hash.into()),
                        (TOKEN_HASH_ANNOTATION.into(), token_hash.into()),
                    ])),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    init_containers: (!init_containers.is_empty()).then_some(init_containers),
                    containers: vec![container],
                    // The image's unprivileged user; fsGroup makes the Secrets and a claimed
                    // Disk volume readable and writable by it.
                    security_context: Some(PodSecurityContext {
                        run_as_user: Some(WORKER_UID),
                        run_as_group: Some(WORKER_UID),
                        fs_group: Some(WORKER_UID),
                        fs_group_change_policy: Some("OnRootMismatch".into()),
                        ..Default::default()
                    }),
                    volumes: Some(volumes),
                    affinity: Some(affinity),
                    node_selector: w.node_selector.clone(),
                    tolerations: w.tolerations.clone(),
                    priority_class_name: w.priority_class_name.clone(),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    termination_grace_period_seconds: Some(30),
                    ..Default::default()
                }),
            },
            volume_claim_templates: claim_templates,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lakecache_api::{
        CacheNamespaceSpec, MetadataPolicyKind, MetadataSpec, SecretReference as CredRef,
        SourceSpec, TierKind, TierSpec, WorkersSpec,
    };

    pub fn cn(tiers: Vec<TierSpec>) -> CacheNamespace {
        let mut cn = CacheNamespace::new(
            "imagenet",
            CacheNamespaceSpec {
                source: SourceSpec {
                    uri: "s3://datasets/imagenet".into(),
                    endpoint: Some("http://s3.example:9000".into()),
                    region: Some("us-east-1".into()),
                    credentials_secret_ref: Some(CredRef {
                        name: "s3-creds".into(),
                    }),
                    options: BTreeMap::from([("enable_virtual_host_style".into(), "false".into())]),
                    timeout: None,
                },
                workers: WorkersSpec {
                    replicas: 3,
                    ..Default::default()
                },
                tiers,
                block_size: Some("8Mi".into()),
                metadata: MetadataSpec {
                    policy: MetadataPolicyKind::Ttl,
                    ttl: Some("5m".into()),
                },
            },
        );
        cn.metadata.namespace = Some("ml".into());
        cn.metadata.uid = Some("uid-1".into());
        cn
    }

    fn tier(kind: TierKind, size: &str, path: Option<&str>, class: Option<&str>) -> TierSpec {
        TierSpec {
            kind,
            size: size.into(),
            path: path.map(Into::into),
            storage_class_name: class.map(Into::into),
        }
    }

    fn build(cn: &CacheNamespace) -> Children {
        build_with(cn, "t0ken", None)
    }

    fn build_with(cn: &CacheNamespace, token: &str, np: Option<&NetworkPolicyPeers>) -> Children {
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

    fn template_annotation(c: &Children, key: &str) -> String {
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
    fn the_config_says_what_the_spec_says_and_holds_no_secret() {
        let cn = cn(vec![tier(TierKind::Memory, "1Gi", None, None)]);
        let v = cn.spec.validate().unwrap();
        let y = worker_config(&cn, &v);
        let val: serde_json::Value = serde_yaml_ng::from_str(&y).unwrap();
        assert_eq!(val["source"]["uri"], "s3://datasets/imagenet");
        assert_eq!(
            val["source"]["options"]["endpoint"],
            "http://s3.example:9000"
        );
        assert_eq!(val["source"]["options"]["region"], "us-east-1");
        assert_eq!(val["source"]["credentialsDir"], CREDENTIALS_DIR);
        assert_eq!(val["blockSize"], 8 << 20);
        assert_eq!(val["tiers"][0]["size"], 1u64 << 30);
        assert_eq!(val["metadata"]["policy"], "Ttl");
        assert!(!y.contains("t0ken"));
    }

    #[test]
    fn a_config_change_changes_the_pod_template() {
        let a = cn(vec![tier(TierKind::Memory, "1Gi", None, None)]);
        let mut b = a.clone();
        b.spec.tiers[0].size = "2Gi".into();
        let hash = |c: &Children| template_annotation(c, CONFIG_HASH_ANNOTATION);
        assert_ne!(hash(&build(&a)), hash(&build(&b)));
        assert_eq!(hash(&build(&a)), hash(&build(&a)));
    }

    #[test]
    fn a_storage_class_disk_becomes_a_claim_template() {
        let cn = cn(vec![tier(TierKind::Disk, "50Gi", None, Some("fast-ssd"))]);
        let c = build(&cn);
        let sts = c.statefulset.spec.unwrap();
        let t = &sts.volume_claim_templates.unwrap()[0];
        let spec = t.spec.as_ref().unwrap();
        assert_eq!(spec.storage_class_name.as_deref(), Some("fast-ssd"));
        assert_eq!(
            spec.resources.as_ref().unwrap().requests.as_ref().unwrap()["storage"].0,
            (50u64 << 30).to_string()
        );
        let pod = sts.template.spec.unwrap();
        assert!(pod.volumes.unwrap().iter().all(|v| v.name != "disk"));
        assert!(
            pod.containers[0]
                .volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .any(|m| m.name == "disk")
        );
    }

    #[test]
    fn a_new_token_rolls_the_workers_and_its_hash_hides_it() {
        let cn = cn(vec![tier(TierKind::Memory, "1Gi", None, None)]);
        let a = template_annotation(&build_with(&cn, "token-a", None), TOKEN_HASH_ANNOTATION);
        let b = template_annotation(&build_with(&cn, "token-b", None), TOKEN_HASH_ANNOTATION);
        assert_ne!(a, b);
        assert_eq!(a.len(), 16);
        assert!(!a.contains("token"));
        assert_eq!(
            template_annotation(&build_with(&cn, "token-a", None), CONFIG_HASH_ANNOTATION),
            template_annotation(&build_with(&cn, "token-b", None), CONFIG_HASH_ANNOTATION),
        );
    }

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

    #[test]
    fn host_paths_must_be_an_allowed_root() {
        let roots = vec!["/var/lib/lakecache".to_string(), "/mnt/nvme/".to_string()];
        for ok in [
            "/var/lib/lakecache",
            "/var/lib/lakecache/",
            "//var/lib//lakecache/.",
            "/mnt/nvme",
        ] {
            assert!(host_path_root(ok, &roots).is_some(), "{ok}");
        }
        for bad in [
            "/var/lib/lakecache-evil",
            "/var/lib/lakecach",
            "/var/lib",
            "/",
            "/etc",
            "/var/lib/lakecache/../../../etc",
            "/var/lib/lakecache/..",
            "/var/lib/lakecache/ns/other",
            "var/lib/lakecache",
            "./var/lib/lakecache",
            "",
        ] {
            assert!(host_path_root(bad, &roots).is_none(), "{bad}");
        }
        assert!(host_path_root("/var/lib/lakecache", &[]).is_none());
        assert_eq!(host_dir("/", "ns", "n"), "/ns/n");
        assert_eq!(
            host_dir("/var/lib/lakecache", "ns", "n"),
            "/var/lib/lakecache/ns/n"
        );
    }

    #[test]
    fn the_network_policy_lets_only_the_chart_pods_reach_the_data_port() {
        let cn = cn(vec![tier(TierKind::Memory, "1Gi", None, None)]);
        let peers = NetworkPolicyPeers {
            namespace: "lakecache-system".into(),
            labels: BTreeMap::from([("app.kubernetes.io/name".into(), "lakecache".into())]),
            components: vec!["csi-node".into(), "operator".into()],
        };
        let c = build_with(&cn, "t", Some(&peers));
        let np = c.network_policy.unwrap();
        assert_eq!(
            np.metadata.owner_references.as_ref().unwrap()[0].uid,
            "uid-1"
        );
        let spec = np.spec.unwrap();
        assert_eq!(
            spec.pod_selector.unwrap().match_labels.unwrap(),
            selector_labels("imagenet")
        );
        let rules = spec.ingress.unwrap();
        let data = &rules[0];
        assert_eq!(
            data.ports.as_ref().unwrap()[0].port,
            Some(IntOrString::Int(7700))
        );
        let from = &data.from.as_ref().unwrap()[0];
        assert_eq!(
            from.namespace_selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref()
                .unwrap()["kubernetes.io/metadata.name"],
            "lakecache-system"
        );
        let ps = from.pod_selector.as_ref().unwrap();
        assert_eq!(
            ps.match_labels.as_ref().unwrap()["app.kubernetes.io/name"],
            "lakecache"
        );
        assert_eq!(
            ps.match_expressions.as_ref().unwrap()[0].values.as_deref(),
            Some(&["csi-node".to_string(), "operator".to_string()][..])
        );
        // The admin port (probes, metrics) is open; no other rule lets anyone in.
        assert_eq!(rules.len(), 2);
        assert_eq!(
            rules[1].ports.as_ref().unwrap()[0].port,
            Some(IntOrString::Int(7701))
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
