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
//! 1. The nodes are known: every reconcile adds the node of each worker pod to the
//!    CacheNamespace's `lakecache.io/disk-nodes` annotation, so nodes that ran a worker long ago
//!    are remembered too.
//! 2. The workers stop first (the StatefulSet is deleted and the finalizer waits for its pods),
//!    so no worker writes while its directory goes.
//! 3. One pod per node, in the operator's own namespace (a tenant cannot touch it), pinned to the
//!    node by `nodeName`, runs `rm -rf` of that directory from the operator's image as root with
//!    only `CAP_DAC_OVERRIDE` (the blocks belong to the worker's user). It mounts
//!    `ROOT/NAMESPACE`, never more, and `rm` does not follow symlinks a worker may have left.
//!    Once it succeeded it is deleted. A node that never runs it (gone, unschedulable, not
//!    ready) is given up after `disk_cleanup_timeout`, with a Warning Event that names the node
//!    and the directory, so a dead node cannot block the deletion for ever.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, HostPathVolumeSource, Pod, PodSpec, SecurityContext, Toleration,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use std::collections::BTreeMap;

/// The CacheNamespace annotation that lists the nodes its workers ran on (comma-separated).
pub const DISK_NODES_ANNOTATION: &str = "lakecache.io/disk-nodes";

/// The nodes an annotation value lists.
pub fn parse_nodes(v: Option<&String>) -> BTreeSet<String> {
    v.map(|v| {
        v.split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(String::from)
            .collect()
    })
    .unwrap_or_default()
}

/// The annotation value of `nodes`.
pub fn format_nodes(nodes: &BTreeSet<String>) -> String {
    nodes.iter().cloned().collect::<Vec<_>>().join(",")
}

/// The name of the cleanup pod of CacheNamespace `uid` on `node`.
pub fn pod_name(uid: &str, node: &str) -> String {
    let h = blake3::hash(format!("{uid}/{node}").as_bytes()).to_hex();
    format!("lakecache-disk-cleanup-{}", &h.as_str()[..16])
}

/// What the cleanup pod needs.
pub struct CleanupInputs<'a> {
    pub uid: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
    pub root: &'a str,
    pub node: &'a str,
    /// Where the pod runs: the operator's namespace.
    pub pod_namespace: &'a str,
    /// The operator's image.
    pub image: &'a str,
}

/// The pod that removes `ROOT/NAMESPACE/NAME` on one node.
pub fn cleanup_pod(i: &CleanupInputs<'_>) -> Pod {
    let parent = format!("{}/{}", i.root.trim_end_matches('/'), i.namespace);
    Pod {
        metadata: ObjectMeta {
            name: Some(pod_name(i.uid, i.node)),
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
    }
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
            root: "/var/lib/lakecache/",
            node: "node-a",
            pod_namespace: "lakecache-system",
            image: "lakecache:op",
        });
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
        assert_ne!(pod_name("uid-1", "node-a"), pod_name("uid-1", "node-b"));
        assert_ne!(pod_name("uid-1", "node-a"), pod_name("uid-2", "node-a"));
    }

    #[test]
    fn nodes_round_trip_through_the_annotation() {
        let n = parse_nodes(Some(&" b, a,,a ".to_string()));
        assert_eq!(format_nodes(&n), "a,b");
        assert!(parse_nodes(None).is_empty());
    }
}
