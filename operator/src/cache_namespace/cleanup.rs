//! Cleanup: what a deleted CacheNamespace leaves that owner references do not remove.
//!
//! Every namespaced child has the CacheNamespace as its controller and goes with it through the
//! garbage collector. Two things do not: the PersistentVolume (cluster-scoped, so it cannot be
//! owned by a namespaced object) and the host-path Disk tier's directories on the nodes (not API
//! objects at all). The finalizer removes both, each only when it is provably this
//! CacheNamespace's: the PV by its labels and uid annotation, with its uid as a delete
//! precondition; the node directories as [`super::node_dirs`] describes (recorded in the status,
//! checked again against the allowed and retired roots, removed by a pod per node once the
//! workers have stopped). Each step is retried (`Error::Waiting`) until done, and a node that
//! never runs its cleanup pod is given up after a timeout with a Warning, so that nothing blocks
//! a deletion for ever.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Node, PersistentVolume, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use lakecache_api::{CacheNamespace, NodeDirectory};

use super::build::{self, Names};
use super::node_dirs;
use super::ownership::{controlled_by, is_worker, pv_is_ours};
use super::publish::{record_disk_directories, write_status};
use super::validate::{host_root, spec_host_path};
use crate::controller::key;
use crate::error::kube as kerr;
use crate::{Context, Error};

/// Whether `cn` may have node directories to remove: some are recorded, or its spec has a
/// host-path Disk tier below an allowed root (whose directories a worker may have made before
/// any was recorded).
pub(super) fn has_node_dirs(cn: &CacheNamespace, cfg: &crate::Config) -> bool {
    let recorded = cn
        .status
        .as_ref()
        .is_some_and(|s| !s.disk_directories.is_empty());
    recorded || host_root(cn, cfg).is_some()
}

/// Deletes `cn`'s PersistentVolume `pv_name`: only a PV made for this very CacheNamespace (its
/// uid), and only that one.
pub(super) async fn delete_pv(
    cn: &CacheNamespace,
    pv_name: &str,
    ctx: &Context,
) -> Result<(), Error> {
    let ns = cn.namespace().unwrap_or_default();
    let names = Names::of(&ns, &cn.name_any());
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let Some(pv) = pvs
        .get_opt(pv_name)
        .await
        .map_err(kerr(format!("reading PersistentVolume {pv_name}")))?
    else {
        return Ok(());
    };
    let legacy = pv_name != names.pv;
    let ours = pv_is_ours(
        &pv,
        &ns,
        &cn.name_any(),
        &cn.uid().unwrap_or_default(),
        legacy,
    );
    if !ours {
        return Ok(());
    }
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: pv.uid(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match pvs.delete(pv_name, &dp).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(kerr(format!("deleting PersistentVolume {pv_name}"))(e)),
    }
}

/// Imports the nodes an older operator listed in the `lakecache.io/disk-nodes` annotation into
/// `status.diskDirectories`, once: only while that list is empty, each paired with the
/// directory of the spec's current host-path Disk tier below an allowed (or retired) root, and
/// only nodes that exist as Node objects. Then removes the annotation. Anyone who may edit the
/// CacheNamespace may write the annotation, so it can name nothing but this CacheNamespace's
/// own directory on real nodes. `Err(Waiting)` when it changed the object (the caller's copy is
/// stale then), `Ok` when there was nothing to do.
pub(super) async fn import_disk_nodes(cn: &CacheNamespace, ctx: &Context) -> Result<(), Error> {
    let Some(value) = cn.annotations().get(node_dirs::DISK_NODES_ANNOTATION) else {
        return Ok(());
    };
    let ns = cn.namespace().unwrap_or_default();
    let name = cn.name_any();
    let recorded = cn
        .status
        .as_ref()
        .is_some_and(|s| !s.disk_directories.is_empty());
    let mut imported = vec![];
    if !recorded {
        let nodes: Api<Node> = Api::all(ctx.client.clone());
        let candidates = node_dirs::from_annotation(
            value,
            spec_host_path(cn).as_deref(),
            &ctx.cfg.cleanup_roots(),
            &ns,
            &name,
        );
        for d in candidates {
            if nodes
                .get_opt(&d.node)
                .await
                .map_err(kerr(format!("reading Node {}", d.node)))?
                .is_some()
            {
                imported.push(d);
            }
        }
        if !imported.is_empty() {
            write_status(cn, serde_json::json!({ "diskDirectories": imported }), ctx).await?;
        }
    }
    let api: Api<CacheNamespace> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = serde_json::json!({"metadata": {"annotations": {
        node_dirs::DISK_NODES_ANNOTATION: null,
    }}});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .map_err(kerr(format!(
            "removing the {} annotation of CacheNamespace {}",
            node_dirs::DISK_NODES_ANNOTATION,
            key(cn)
        )))?;
    tracing::info!(cache_namespace = %key(cn), imported = imported.len(), "the old disk-nodes annotation imported and removed");
    Err(Error::Waiting(format!(
        "the {} annotation of {} imported ({} node directories) and removed",
        node_dirs::DISK_NODES_ANNOTATION,
        key(cn),
        imported.len()
    )))
}

/// Removes the Disk tier's directories from every node that held one (see [`node_dirs`]): the
/// workers stop first, then a pod per node and directory removes it. `Err(Waiting)` until done.
pub(super) async fn remove_node_dirs(cn: &CacheNamespace, ctx: &Context) -> Result<(), Error> {
    let ns = cn.namespace().unwrap_or_default();
    let name = cn.name_any();
    let uid = cn.uid().unwrap_or_default();
    let names = Names::of(&ns, &name);
    let sts: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &ns);
    let ours = sts
        .get_opt(&names.statefulset)
        .await
        .map_err(kerr(format!(
            "reading StatefulSet {ns}/{}",
            names.statefulset
        )))?
        .filter(|o| controlled_by(o, &uid));
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let labelled = pods
        .list(&ListParams::default().labels(&build::selector_string(&name)))
        .await
        .map_err(kerr(format!("listing the worker pods of {ns}/{name}")))?
        .items;
    // The workers: pods whose controller is our StatefulSet, or, once it is gone, a
    // StatefulSet of its name (the garbage collector removes those of a deleted one). A pod
    // that merely carries the labels neither waits nor names a directory.
    let workers: Vec<Pod> = labelled
        .into_iter()
        .filter(|p| match ours.as_ref().and_then(|s| s.uid()) {
            Some(sts_uid) => controlled_by(p, &sts_uid),
            None => p.owner_references().iter().any(|r| {
                r.controller == Some(true) && r.kind == "StatefulSet" && r.name == names.statefulset
            }),
        })
        .collect();
    // The status from a fresh read: the controller's copy may lag the one written on the last
    // pass, and directories recorded there would be missed.
    let fresh = Api::<CacheNamespace>::namespaced(ctx.client.clone(), &ns)
        .get(&name)
        .await
        .map_err(kerr(format!("reading CacheNamespace {}", key(cn))))?;
    let dirs = if let Some(s) = &ours {
        let members: Vec<Pod> = workers
            .iter()
            .filter(|p| is_worker(p, s))
            .cloned()
            .collect();
        record_disk_directories(&fresh, &members, true, ctx).await?
    } else {
        // A pod the StatefulSet made after the last look (between the list and its deletion)
        // is recorded now: it can name only this CacheNamespace's own directory below an
        // allowed root.
        record_disk_directories(&fresh, &workers, true, ctx).await?
    };
    if ours.is_some() {
        match sts
            .delete(&names.statefulset, &DeleteParams::background())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                return Err(kerr(format!(
                    "deleting StatefulSet {ns}/{}",
                    names.statefulset
                ))(e));
            }
        }
    }
    if !workers.is_empty() {
        return Err(Error::Waiting(format!(
            "{} worker pods of {ns}/{name} to stop before their node directories are removed",
            workers.len()
        )));
    }
    let own = &ctx.cfg.own_namespace;
    let cleaners: Api<Pod> = Api::namespaced(ctx.client.clone(), own);
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let now = k8s_openapi::jiff::Timestamp::now();
    let timeout = ctx.cfg.disk_cleanup_timeout.as_secs() as i64;
    // How long the deletion has been going on: what a node's cleanup is measured against when
    // its pod cannot be made at all.
    let deleting_for = cn
        .metadata
        .deletion_timestamp
        .as_ref()
        .map(|t| now.as_second() - t.0.as_second())
        .unwrap_or(0);
    let mut pending = vec![];
    let mut finished = vec![];
    let mut given_up: Vec<(&NodeDirectory, Option<String>, String)> = vec![];
    // Checked again here, not only when recorded: whoever may write the status subresource
    // could list any path, and a root may have been removed from the allowed ones since.
    let roots = ctx.cfg.cleanup_roots();
    let mut skipped = vec![];
    for d in &dirs {
        let pod_name = node_dirs::pod_name(&uid, &d.node, &d.path);
        if let Err(why) = node_dirs::removable(&d.path, &ns, &name, &roots) {
            tracing::warn!(cache_namespace = %key(cn), node = %d.node, path = %d.path, %why, "recorded directory skipped");
            skipped.push(format!("{} on node {} ({why})", d.path, d.node));
            continue;
        }
        let Some(pod) = node_dirs::cleanup_pod(&node_dirs::CleanupInputs {
            uid: &uid,
            namespace: &ns,
            name: &name,
            path: &d.path,
            roots: &roots,
            node: &d.node,
            pod_namespace: own,
            image: &ctx.cfg.worker_init_image,
        }) else {
            continue;
        };
        let existing = cleaners
            .get_opt(&pod_name)
            .await
            .map_err(kerr(format!("reading Pod {own}/{pod_name}")))?;
        match existing {
            None => {
                let node = nodes
                    .get_opt(&d.node)
                    .await
                    .map_err(kerr(format!("reading Node {}", d.node)))?;
                if node.is_none() {
                    ctx.event(
                        cn,
                        EventType::Warning,
                        "NodeDirectoryLeft",
                        "Delete",
                        format!(
                            "the Disk tier directory {} was not removed from node {}: there is \
                             no such Node (any more); remove it by hand if the node comes back",
                            d.path, d.node
                        ),
                    )
                    .await;
                    continue;
                }
                match cleaners.create(&PostParams::default(), &pod).await {
                    Ok(_) => pending.push(d.node.clone()),
                    Err(kube::Error::Api(s)) if s.code == 409 => pending.push(d.node.clone()),
                    Err(e) if deleting_for >= timeout => given_up.push((
                        d,
                        None,
                        format!("its cleanup pod could not be created: {e}"),
                    )),
                    Err(e) => {
                        tracing::warn!(cache_namespace = %key(cn), node = %d.node, error = %e, "creating a cleanup pod failed; retrying");
                        pending.push(format!("{} (creating its pod failed: {e})", d.node));
                    }
                }
            }
            Some(p) => {
                let phase = p.status.as_ref().and_then(|s| s.phase.clone());
                let age = p
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|t| now.as_second() - t.0.as_second())
                    .unwrap_or(0);
                if phase.as_deref() == Some("Succeeded") {
                    finished.push(pod_name);
                } else if age >= timeout {
                    given_up.push((
                        d,
                        Some(pod_name),
                        format!(
                            "its cleanup pod did not finish within {timeout}s (the node may be \
                             gone or not ready)"
                        ),
                    ));
                } else {
                    pending.push(d.node.clone());
                }
            }
        }
    }
    if !skipped.is_empty() {
        // One Event for all: the recorder folds Events of one reason and action into one.
        ctx.event(
            cn,
            EventType::Warning,
            "NodeDirectoryLeft",
            "CheckDirectory",
            format!(
                "status.diskDirectories lists directories that were not removed: {}",
                skipped.join("; ")
            ),
        )
        .await;
    }
    if !pending.is_empty() {
        return Err(Error::Waiting(format!(
            "removing the Disk tier directories of {ns}/{name} on nodes {}",
            pending.join(", ")
        )));
    }
    for (d, _, why) in &given_up {
        ctx.event(
            cn,
            EventType::Warning,
            "NodeDirectoryLeft",
            "Delete",
            format!(
                "the Disk tier directory {} on node {} was not removed: {why}; remove it by hand \
                 if the node comes back",
                d.path, d.node
            ),
        )
        .await;
    }
    let to_delete = finished
        .iter()
        .chain(given_up.iter().filter_map(|(_, p, _)| p.as_ref()));
    for pod_name in to_delete {
        match cleaners.delete(pod_name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(kerr(format!("deleting Pod {own}/{pod_name}"))(e)),
        }
    }
    if !finished.is_empty() {
        tracing::info!(cache_namespace = %key(cn), directories = finished.len(), "node directories removed");
    }
    Ok(())
}
