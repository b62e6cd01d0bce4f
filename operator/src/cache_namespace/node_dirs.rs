//! Removing a deleted CacheNamespace's host-path Disk tier from the nodes.
//!
//! A host-path Disk tier lives in `ROOT/NAMESPACE/NAME` on every node that ran a worker, and
//! outlives the worker pods by design (a restarted worker finds its blocks again). Nothing in
//! Kubernetes removes it: owner references reach API objects, not node directories, and the
//! workers themselves cannot do it on their way out (a pod that is evicted, whose node restarts,
//! or that is killed does not run its preStop hook, and the next pod of the same name would need
//! the directory anyway). So the CacheNamespace's finalizer does it, in three steps, each retried
//! until done:
//!
//! 1. The directories are known: every reconcile adds the node and the mounted directory of each
//!    worker pod to the CacheNamespace's `status.diskDirectories`, so directories that a worker
//!    used long ago, or under a `path` or root since changed, are remembered too. Only the
//!    operator writes there (tenants have no right to the status subresource), only pods whose
//!    controller is the CacheNamespace's own StatefulSet count, and only a directory
//!    `ROOT/NAMESPACE/NAME` below an allowed root; the list holds at most [`MAX_DIRECTORIES`].
//!    The nodes an older operator listed in the `lakecache.io/disk-nodes` annotation are
//!    imported once, paired with the directory of the spec's current `path`
//!    ([`from_annotation`]), and the annotation removed.
//! 2. The workers stop first (the StatefulSet is deleted and the finalizer waits for its pods),
//!    so no worker writes while its directory goes.
//! 3. One pod per node, in the operator's own namespace (a tenant cannot touch it), pinned to the
//!    node by `nodeName`, runs `rm -rf` of that directory from the operator's image as root with
//!    only `CAP_DAC_OVERRIDE` (the blocks belong to the worker's user). It mounts
//!    `ROOT/NAMESPACE`, never more, and `rm` does not follow symlinks a worker may have left.
//!    Once it succeeded it is deleted. Before that, a listed directory is checked again: it must
//!    be `ROOT/NAMESPACE/NAME` of this CacheNamespace with `ROOT` an allowed root or one the
//!    admin retired (`--retired-host-path-roots`), since whoever may write the status subresource
//!    could list any path; one that is not is skipped with a Warning. A listed node that is no Node (any more) is skipped with a
//!    Warning. A node that never runs the pod (unschedulable, not ready), or where the pod cannot
//!    even be created, is given up `disk_cleanup_timeout` after the deletion began, with a
//!    Warning Event that names the node and the directory, so nothing blocks the deletion for
//!    ever.

use k8s_openapi::api::core::v1::{
    Capabilities, Container, HostPathVolumeSource, Pod, PodSpec, SecurityContext, Toleration,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use lakecache_api::NodeDirectory;
use std::collections::BTreeMap;

/// The most node directories a CacheNamespace's status lists; beyond it, new ones are not
/// recorded (the oldest are kept) and a Warning says so.
pub const MAX_DIRECTORIES: usize = 1000;

/// The CacheNamespace annotation in which an older operator listed the nodes its workers ran on
/// (comma-separated); imported into `status.diskDirectories` once, then removed.
pub const DISK_NODES_ANNOTATION: &str = "lakecache.io/disk-nodes";

/// The directories the old [`DISK_NODES_ANNOTATION`] value `nodes` stands for: each node it
/// lists with the directory `ROOT/NAMESPACE/NAME` of `spec_path` (the spec's current host-path
/// Disk tier, if any), only if `spec_path` is one of `roots`; at most [`MAX_DIRECTORIES`]. Which
/// nodes exist is the caller's to check. Anyone who may edit the CacheNamespace may write the
/// annotation, so it can name nothing but this CacheNamespace's own directory.
pub fn from_annotation(
    nodes: &str,
    spec_path: Option<&str>,
    roots: &[String],
    namespace: &str,
    name: &str,
) -> Vec<NodeDirectory> {
    let Some(root) = spec_path.and_then(|p| super::build::host_path_root(p, roots)) else {
        return vec![];
    };
    let path = super::build::host_dir(root, namespace, name);
    let mut all: Vec<NodeDirectory> = vec![];
    for node in nodes.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let d = NodeDirectory {
            node: node.into(),
            path: path.clone(),
        };
        if !all.contains(&d) && all.len() < MAX_DIRECTORIES {
            all.push(d);
        }
    }
    all
}

/// The root of a recorded directory `path` if the cleanup may remove it: `ROOT/NAMESPACE/NAME`
/// of CacheNamespace `namespace/name` with `ROOT` one of `roots` (the allowed and the retired
/// ones); otherwise why not.
pub fn removable<'a>(
    path: &str,
    namespace: &str,
    name: &str,
    roots: &'a [String],
) -> Result<&'a str, String> {
    let Some(root) = root_of(path, namespace, name) else {
        return Err(format!(
            "it is not this CacheNamespace's directory (ROOT/{namespace}/{name})"
        ));
    };
    super::build::host_path_root(root, roots).ok_or_else(|| {
        format!(
            "its root {root} is neither an allowed host path root nor a retired one, see the \
             chart's workers.allowedHostPathRoots and workers.retiredHostPathRoots"
        )
    })
}

/// The directory `ROOT/NAMESPACE/NAME` of CacheNamespace `namespace/name`, if `path` is one
/// (absolute, normalized, ending in `/NAMESPACE/NAME`), as its root.
pub fn root_of<'a>(path: &'a str, namespace: &str, name: &str) -> Option<&'a str> {
    if super::build::normalize_path(path).as_deref() != Some(path) {
        return None;
    }
    let root = path.strip_suffix(&format!("/{namespace}/{name}"))?;
    Some(if root.is_empty() { "/" } else { root })
}

/// The Disk tier directory `pod` mounts from its node, with the node, if it is a worker of
/// CacheNamespace `namespace/name` scheduled to a node and the directory lies below one of
/// `roots` (a pod the operator did not make names no other directory).
pub fn of_pod(pod: &Pod, namespace: &str, name: &str, roots: &[String]) -> Option<NodeDirectory> {
    let spec = pod.spec.as_ref()?;
    let node = spec.node_name.clone().filter(|n| !n.is_empty())?;
    let path = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "disk")?
        .host_path
        .as_ref()?
        .path
        .clone();
    let root = root_of(&path, namespace, name)?;
    super::build::host_path_root(root, roots)?;
    Some(NodeDirectory { node, path })
}

/// `known` with the directories of `found` it lacks appended, at most [`MAX_DIRECTORIES`]
/// (the oldest kept), and how many were left out.
pub fn merge(
    known: &[NodeDirectory],
    found: impl IntoIterator<Item = NodeDirectory>,
) -> (Vec<NodeDirectory>, usize) {
    let mut all = known.to_vec();
    let mut left_out = 0;
    for d in found {
        if all.contains(&d) {
            continue;
        }
        if all.len() >= MAX_DIRECTORIES {
            left_out += 1;
        } else {
            all.push(d);
        }
    }
    (all, left_out)
}

/// The name of the cleanup pod of CacheNamespace `uid` for directory `path` on `node`.
pub fn pod_name(uid: &str, node: &str, path: &str) -> String {
    let h = blake3::hash(format!("{uid}/{node}/{path}").as_bytes()).to_hex();
    format!("lakecache-disk-cleanup-{}", &h.as_str()[..16])
}

/// What the cleanup pod needs.
pub struct CleanupInputs<'a> {
    pub uid: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
    /// The directory to remove, `ROOT/NAMESPACE/NAME` (see [`removable`]).
    pub path: &'a str,
    /// The roots it may lie below: the allowed and the retired ones.
    pub roots: &'a [String],
    pub node: &'a str,
    /// Where the pod runs: the operator's namespace.
    pub pod_namespace: &'a str,
    /// The operator's image.
    pub image: &'a str,
}

/// The pod that removes `ROOT/NAMESPACE/NAME` on one node; `None` if `path` is no such
/// directory of this CacheNamespace below one of `roots` (see [`removable`]).
pub fn cleanup_pod(i: &CleanupInputs<'_>) -> Option<Pod> {
    let root = removable(i.path, i.namespace, i.name, i.roots).ok()?;
    let parent = format!("{}/{}", root.trim_end_matches('/'), i.namespace);
    Some(Pod {
        metadata: ObjectMeta {
            name: Some(pod_name(i.uid, i.node, i.path)),
            namespace: Some(i.pod_namespace.into()),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/name".into(), "lakecache".into()),
                ("app.kubernetes.io/component".into(), "disk-cleanup".into()),
                ("app.kubernetes.io/managed-by".into(), crate::MANAGER.into()),
                (super::build::NAMESPACE_LABEL.into(), i.namespace.into()),
                (super::build::CACHE_NAMESPACE_LABEL.into(), i.name.into()),
            ])),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(i.node.into()),
            restart_policy: Some("OnFailure".into()),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            // It must run wherever a worker ran, whatever the node's taints.
            tolerations: Some(vec![Toleration {
                operator: Some("Exists".into()),
                ..Default::default()
            }]),
            containers: vec![Container {
                name: "remove".into(),
                image: Some(i.image.into()),
                command: Some(vec![
                    "rm".into(),
                    "-rf".into(),
                    "--one-file-system".into(),
                    format!("/parent/{}", i.name),
                ]),
                volume_mounts: Some(vec![VolumeMount {
                    name: "parent".into(),
                    mount_path: "/parent".into(),
                    ..Default::default()
                }]),
                security_context: Some(SecurityContext {
                    run_as_user: Some(0),
                    run_as_non_root: Some(false),
                    allow_privilege_escalation: Some(false),
                    read_only_root_filesystem: Some(true),
                    capabilities: Some(Capabilities {
                        add: Some(vec!["DAC_OVERRIDE".into()]),
                        drop: Some(vec!["ALL".into()]),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            volumes: Some(vec![Volume {
                name: "parent".into(),
                host_path: Some(HostPathVolumeSource {
                    path: parent,
                    type_: Some("DirectoryOrCreate".into()),
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cleanup_pod_removes_only_its_own_directory_with_one_capability() {
        let p = cleanup_pod(&CleanupInputs {
            uid: "uid-1",
            namespace: "ml",
            name: "imagenet",
            path: "/var/lib/lakecache/ml/imagenet",
            roots: &["/var/lib/lakecache".to_string()],
            node: "node-a",
            pod_namespace: "lakecache-system",
            image: "lakecache:op",
        })
        .unwrap();
        assert_eq!(p.metadata.namespace.as_deref(), Some("lakecache-system"));
        let spec = p.spec.unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("node-a"));
        let v = &spec.volumes.unwrap()[0];
        assert_eq!(v.host_path.as_ref().unwrap().path, "/var/lib/lakecache/ml");
        let c = &spec.containers[0];
        assert_eq!(c.image.as_deref(), Some("lakecache:op"));
        assert_eq!(
            c.command.as_ref().unwrap().last().map(String::as_str),
            Some("/parent/imagenet")
        );
        let caps = c
            .security_context
            .as_ref()
            .unwrap()
            .capabilities
            .clone()
            .unwrap();
        assert_eq!(caps.add, Some(vec!["DAC_OVERRIDE".to_string()]));
        assert_eq!(caps.drop, Some(vec!["ALL".to_string()]));
        assert_ne!(
            pod_name("u1", "node-a", "/r/a/b"),
            pod_name("u1", "node-b", "/r/a/b")
        );
        assert_ne!(
            pod_name("u1", "node-a", "/r/a/b"),
            pod_name("u2", "node-a", "/r/a/b")
        );
        assert_ne!(
            pod_name("u1", "node-a", "/r/a/b"),
            pod_name("u1", "node-a", "/s/a/b")
        );
        // Never another directory than this CacheNamespace's own.
        for bad in [
            "/var/lib/lakecache/ml/other",
            "/var/lib/lakecache/ml/imagenet/",
            "/var/lib/lakecache/../ml/imagenet",
            "/var/lib/lakecache//ml/imagenet",
            "relative/ml/imagenet",
            "/var/lib/lakecache/xml/imagenet",
            // This CacheNamespace's name, but below no allowed or retired root.
            "/etc/ml/imagenet",
            "/ml/imagenet",
            "/var/lib/lakecache/sub/ml/imagenet",
        ] {
            let p = cleanup_pod(&CleanupInputs {
                uid: "uid-1",
                namespace: "ml",
                name: "imagenet",
                path: bad,
                roots: &["/var/lib/lakecache".to_string(), "/var/lib".to_string()],
                node: "node-a",
                pod_namespace: "lakecache-system",
                image: "lakecache:op",
            });
            assert!(p.is_none(), "{bad}");
        }
        assert_eq!(root_of("/ml/imagenet", "ml", "imagenet"), Some("/"));
    }

    #[test]
    fn a_recorded_directory_is_removed_only_below_an_allowed_or_retired_root() {
        let roots = vec!["/var/lib/lakecache".to_string(), "/mnt/old/".to_string()];
        assert_eq!(
            removable("/var/lib/lakecache/ml/imagenet", "ml", "imagenet", &roots),
            Ok("/var/lib/lakecache")
        );
        assert_eq!(
            removable("/mnt/old/ml/imagenet", "ml", "imagenet", &roots),
            Ok("/mnt/old/")
        );
        // A forged status entry: CacheNamespace default/kubelet and kubelet's defaults file.
        let why = removable("/etc/default/kubelet", "default", "kubelet", &roots).unwrap_err();
        assert!(why.contains("/etc") && why.contains("retired"), "{why}");
        let why = removable("/var/lib/lakecache/ml/other", "ml", "imagenet", &roots).unwrap_err();
        assert!(why.contains("ROOT/ml/imagenet"), "{why}");
        assert!(removable("/var/lib/lakecache/ml/imagenet", "ml", "imagenet", &[]).is_err());
        let pod = cleanup_pod(&CleanupInputs {
            uid: "u",
            namespace: "default",
            name: "kubelet",
            path: "/etc/default/kubelet",
            roots: &roots,
            node: "n1",
            pod_namespace: "lakecache-system",
            image: "lakecache:op",
        });
        assert!(pod.is_none());
        let pod = cleanup_pod(&CleanupInputs {
            uid: "u",
            namespace: "ml",
            name: "imagenet",
            path: "/mnt/old/ml/imagenet",
            roots: &roots,
            node: "n1",
            pod_namespace: "lakecache-system",
            image: "lakecache:op",
        })
        .unwrap();
        let v = &pod.spec.unwrap().volumes.unwrap()[0];
        assert_eq!(v.host_path.as_ref().unwrap().path, "/mnt/old/ml");
    }

    #[test]
    fn the_old_annotation_names_only_the_spec_directory_below_an_allowed_root() {
        let roots = vec!["/var/lib/lakecache".to_string()];
        let d = |node: &str| NodeDirectory {
            node: node.into(),
            path: "/var/lib/lakecache/ml/imagenet".into(),
        };
        assert_eq!(
            from_annotation(
                " n1, n2,,n1 ,",
                Some("/var/lib/lakecache/"),
                &roots,
                "ml",
                "imagenet"
            ),
            vec![d("n1"), d("n2")]
        );
        // No host-path tier, or one below no allowed root: nothing.
        assert_eq!(
            from_annotation("n1", None, &roots, "ml", "imagenet"),
            vec![]
        );
        for path in ["/etc", "/var/lib", "/var/lib/lakecache/ml", "relative"] {
            assert_eq!(
                from_annotation("n1", Some(path), &roots, "ml", "imagenet"),
                vec![],
                "{path}"
            );
        }
        assert_eq!(
            from_annotation("", Some("/var/lib/lakecache"), &roots, "ml", "imagenet"),
            vec![]
        );
        let many = (0..MAX_DIRECTORIES + 5)
            .map(|i| format!("n{i}"))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(
            from_annotation(&many, Some("/var/lib/lakecache"), &roots, "ml", "imagenet").len(),
            MAX_DIRECTORIES
        );
    }

    fn worker(node: Option<&str>, path: &str) -> Pod {
        Pod {
            spec: Some(PodSpec {
                node_name: node.map(String::from),
                volumes: Some(vec![Volume {
                    name: "disk".into(),
                    host_path: Some(HostPathVolumeSource {
                        path: path.into(),
                        type_: None,
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_worker_names_only_its_own_directory_below_an_allowed_root() {
        let roots = vec!["/var/lib/lakecache".to_string()];
        let d = of_pod(
            &worker(Some("n1"), "/var/lib/lakecache/ml/imagenet"),
            "ml",
            "imagenet",
            &roots,
        );
        assert_eq!(
            d,
            Some(NodeDirectory {
                node: "n1".into(),
                path: "/var/lib/lakecache/ml/imagenet".into()
            })
        );
        for (node, path) in [
            (None, "/var/lib/lakecache/ml/imagenet"),
            (Some("n1"), "/etc/ml/imagenet"),
            (Some("n1"), "/var/lib/lakecache/ml/other"),
            (Some("n1"), "/var/lib/lakecache/x/ml/imagenet"),
        ] {
            assert_eq!(
                of_pod(&worker(node, path), "ml", "imagenet", &roots),
                None,
                "{node:?} {path}"
            );
        }
    }

    #[test]
    fn the_list_keeps_the_oldest_and_stops_at_the_cap() {
        let d = |n: usize| NodeDirectory {
            node: format!("n{n}"),
            path: "/r/ml/x".into(),
        };
        let (l, out) = merge(&[d(1)], [d(2), d(1), d(2)]);
        assert_eq!((l, out), (vec![d(1), d(2)], 0));
        let full: Vec<_> = (0..MAX_DIRECTORIES).map(d).collect();
        let (l, out) = merge(&full, [d(0), d(MAX_DIRECTORIES), d(MAX_DIRECTORIES + 1)]);
        assert_eq!(l, full);
        assert_eq!(out, 2);
    }
}
