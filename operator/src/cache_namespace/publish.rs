//! Publish: write the computed status, and say what changed.
//!
//! The status is merged only into the object as it was read (its resourceVersion is a
//! precondition): the operator records node directories in the status on several paths, and a
//! status computed from an older read would drop what was recorded since. A conflict is not a
//! failure; the next look computes the status again from a fresh read. A change of phase is
//! also an Event, so that `kubectl describe` tells the story of the CacheNamespace.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use lakecache_api::{CacheNamespace, CacheNamespaceStatus, NodeDirectory};

use super::{node_dirs, status};
use crate::controller::key;
use crate::error::kube as kerr;
use crate::{Context, Error};

/// Publishes the phase change (if any) as an Event and writes `new` if it differs from the
/// object's status.
pub(super) async fn publish(
    cn: &CacheNamespace,
    new: &CacheNamespaceStatus,
    ctx: &Context,
) -> Result<(), Error> {
    let old_phase = cn.status.as_ref().and_then(|s| s.phase);
    if let Some((type_, reason, message)) = status::phase_event(old_phase, new) {
        ctx.event(cn, type_, reason, "Status", message).await;
    }
    if cn.status.as_ref() != Some(new) {
        write_status(cn, serde_json::to_value(new).unwrap_or_default(), ctx).await?;
    }
    Ok(())
}

/// Merges `status` into the CacheNamespace's status, only if the object is still the one read
/// (its resourceVersion): a status computed from an older read would drop node directories
/// recorded since. A conflict is retried shortly, with a fresh read.
pub(super) async fn write_status(
    cn: &CacheNamespace,
    status: serde_json::Value,
    ctx: &Context,
) -> Result<(), Error> {
    let api: Api<CacheNamespace> =
        Api::namespaced(ctx.client.clone(), &cn.namespace().unwrap_or_default());
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": cn.resource_version()},
        "status": status,
    });
    match api
        .patch_status(
            &cn.name_any(),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Err(Error::Waiting(format!(
            "CacheNamespace {} changed since it was read; its status is written on the next look",
            key(cn)
        ))),
        Err(e) => Err(kerr(format!(
            "writing the status of CacheNamespace {}",
            key(cn)
        ))(e)),
    }
}

/// Adds the host-path Disk tier directory of each of `pods` (the workers of this
/// CacheNamespace's own StatefulSet) to `status.diskDirectories`, and returns the list; with
/// `write`, writes it when it changed. Only through the status subresource, which tenants
/// cannot write.
pub(super) async fn record_disk_directories(
    cn: &CacheNamespace,
    pods: &[Pod],
    write: bool,
    ctx: &Context,
) -> Result<Vec<NodeDirectory>, Error> {
    let ns = cn.namespace().unwrap_or_default();
    let name = cn.name_any();
    let known = cn
        .status
        .as_ref()
        .map(|s| s.disk_directories.clone())
        .unwrap_or_default();
    let found = pods
        .iter()
        .filter_map(|p| node_dirs::of_pod(p, &ns, &name, &ctx.cfg.allowed_host_path_roots));
    let (all, left_out) = node_dirs::merge(&known, found);
    if left_out > 0 {
        ctx.event(
            cn,
            EventType::Warning,
            "NodeDirectoriesNotRecorded",
            "Record",
            format!(
                "status.diskDirectories holds at most {} directories: {left_out} more were not \
                 recorded and will not be removed when the CacheNamespace is deleted",
                node_dirs::MAX_DIRECTORIES
            ),
        )
        .await;
    }
    if write && all != known {
        write_status(cn, serde_json::json!({ "diskDirectories": all }), ctx).await?;
    }
    Ok(all)
}
