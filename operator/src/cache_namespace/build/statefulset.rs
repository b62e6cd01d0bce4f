//! The workers' StatefulSet: one pod per worker, each with its own cache tiers.
//!
//! A StatefulSet, not a Deployment, because a worker's identity is its cache: readers place
//! blocks on workers by name (rendezvous hashing over the member list), so a replaced worker must
//! come back under the same name and, for a Disk tier, find its blocks again. Workers are
//! independent of each other, so they start and are replaced in parallel.
//!
//! Tiers become volumes: Memory a RAM-backed emptyDir sized to the tier (with headroom for
//! files being written), Disk either a per-worker subdirectory of the CacheNamespace's own host
//! directory (kept across restarts on the node, handed to the worker's user by a root init
//! container that runs the operator's image, never the tenant's) or a volume claim template of
//! the named storage class. The pod template carries hashes of the configuration and of the
//! token, so that a change of either rolls the workers, one at a time.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    RollingUpdateStatefulSetStrategy, StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvVar, EnvVarSource, HTTPGetAction, HostPathVolumeSource, ObjectFieldSelector,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PodAffinityTerm, PodAntiAffinity,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SecretVolumeSource, SecurityContext,
    Volume, VolumeMount, VolumeResourceRequirements, WeightedPodAffinityTerm,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use lakecache_api::{CacheNamespace, DiskLocation, ValidSpec};

use super::{
    BuildInputs, CONFIG_DIR, CONFIG_FILE, CREDENTIALS_DIR, DISK_DIR, MEMORY_DIR, Names, TOKEN_DIR,
    host_dir, labels, meta, selector_labels,
};

/// The pod-template annotation that changes when the configuration does, to roll the workers.
pub const CONFIG_HASH_ANNOTATION: &str = "lakecache.io/config-hash";
/// The pod-template annotation that changes when the data-plane token does (a hash prefix, never
/// the token), so that the workers roll when the token Secret is replaced.
pub const TOKEN_HASH_ANNOTATION: &str = "lakecache.io/token-hash";
/// The unprivileged user of the lakecache image (see the Dockerfile).
pub const WORKER_UID: i64 = 65532;

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

pub(super) fn statefulset(
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
    use super::super::Children;
    use super::super::fixtures::*;
    use super::*;
    use lakecache_api::TierKind;

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
}
