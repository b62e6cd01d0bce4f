//! Apply: write the built children with server-side apply, never over an object that is not
//! ours.
//!
//! Server-side apply with `force` takes over whatever object has the name, so it is used only on
//! a child known to be ours (`put`): a missing child is created (AlreadyExists if one appeared
//! meanwhile: looked at again), and one that is ours is applied over with its uid as a
//! precondition, so that an object made in its place since it was read is refused rather than
//! taken over. The fetch step already refused to go on when a name was taken; what appears
//! between that check and the write stops the reconcile here (Waiting) and is named as a
//! conflict by the next one.
//!
//! Two changes Kubernetes refuses are handled rather than reported: a StatefulSet whose volume
//! claim templates change is replaced with its pods orphaned (the new one adopts them and rolls
//! them), and a PersistentVolume an older operator made keeps its source (a Warning says what
//! that costs).

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, PersistentVolume, PersistentVolumeClaim, Secret, Service,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions, PropagationPolicy};
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use lakecache_api::CacheNamespace;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::build::{Children, Names};
use super::ownership::{controlled_by, pv_is_ours};
use crate::error::kube as kerr;
use crate::{Context, Error, MANAGER};

/// Server-side apply of one object we own.
async fn ssa<K>(api: &Api<K>, name: &str, obj: &K) -> Result<K, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    api.patch(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
}

/// What [`put`] did.
enum Put {
    Done,
    /// The name is taken by an object that is not ours (made since [`name_conflict`] looked):
    /// nothing was written; the next reconcile names it.
    Foreign,
}

/// Writes child `obj` named `name`: created when nothing has the name (a create fails with
/// AlreadyExists if something appeared meanwhile, and is looked at again), applied over with
/// `force` only when the object there is ours (`ours`), with its uid in the applied object so
/// that one made in its place meanwhile is refused, not taken over.
async fn put<K>(
    api: &Api<K>,
    name: &str,
    obj: &K,
    ours: impl Fn(&K) -> bool,
) -> Result<Put, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    match api.get_opt(name).await? {
        None => {
            let pp = PostParams {
                field_manager: Some(MANAGER.into()),
                ..Default::default()
            };
            match api.create(&pp, obj).await {
                Ok(created) => {
                    take_as_applied(api, name, &created).await?;
                    Ok(Put::Done)
                }
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(Put::Foreign),
                Err(e) => Err(e),
            }
        }
        Some(existing) if ours(&existing) => {
            let mut o = obj.clone();
            o.meta_mut().uid = existing.meta().uid.clone();
            ssa(api, name, &o).await.map(|_| Put::Done)
        }
        Some(_) => Ok(Put::Foreign),
    }
}

/// Turns the fields a create recorded for [`MANAGER`] (an Update) into its server-side apply's
/// (as client-go's csaupgrade does), so that a field the next apply leaves out is removed, not
/// kept by the create's entry.
async fn take_as_applied<K>(api: &Api<K>, name: &str, created: &K) -> Result<(), kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let mut fields = created.meta().managed_fields.clone().unwrap_or_default();
    let mut changed = false;
    for f in &mut fields {
        if f.manager.as_deref() == Some(MANAGER) && f.operation.as_deref() == Some("Update") {
            f.operation = Some("Apply".into());
            changed = true;
        }
    }
    if !changed {
        return Ok(());
    }
    let patch = serde_json::json!({"metadata": {
        "uid": created.meta().uid,
        "resourceVersion": created.meta().resource_version,
        "managedFields": fields,
    }});
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        Ok(_) => {}
        // Changed meanwhile, or refused: the fields stay co-owned by the create, which matters
        // only for a field a later apply drops; the object is ours either way.
        Err(e) => {
            tracing::warn!(object = name, error = %e, "could not hand a created object's fields to server-side apply")
        }
    }
    Ok(())
}

pub(super) async fn apply_children(
    cn: &CacheNamespace,
    c: &Children,
    ctx: &Context,
) -> Result<(), Error> {
    let ns = cn.namespace().unwrap_or_default();
    let names = Names::of(&ns, &cn.name_any());
    let uid = cn.uid().unwrap_or_default();
    let client = ctx.client.clone();
    let foreign = |kind: &str, name: &str| {
        Error::Waiting(format!(
            "{kind} {name} was made by someone else since the names were checked; \
             the next look reports the conflict"
        ))
    };
    macro_rules! apply_ns {
        ($ty:ty, $obj:expr, $name:expr) => {{
            let api: Api<$ty> = Api::namespaced(client.clone(), &ns);
            let done = put(&api, &$name, &$obj, |o| controlled_by(o, &uid))
                .await
                .map_err(kerr(format!("applying {} {ns}/{}", stringify!($ty), $name)))?;
            if let Put::Foreign = done {
                return Err(foreign(stringify!($ty), &format!("{ns}/{}", $name)));
            }
        }};
    }
    apply_ns!(ConfigMap, c.config_map, names.config_map);
    apply_ns!(Secret, c.token_secret, names.token_secret);
    apply_ns!(Service, c.service, names.service);
    apply_ns!(PodDisruptionBudget, c.pdb, names.pdb);
    if let Some(np) = &c.network_policy {
        apply_ns!(NetworkPolicy, np, names.network_policy);
    }
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    match put(&sts, &names.statefulset, &c.statefulset, |o| {
        controlled_by(o, &uid)
    })
    .await
    {
        Ok(Put::Done) => {}
        Ok(Put::Foreign) => {
            return Err(foreign(
                "StatefulSet",
                &format!("{ns}/{}", names.statefulset),
            ));
        }
        // Kubernetes refuses changes to a StatefulSet's volume claim templates (a Disk tier that
        // moves to or between storage classes). Replace the StatefulSet but orphan its pods:
        // the new one adopts them and rolls them one by one, so the cache stays up.
        Err(kube::Error::Api(s)) if s.code == 422 && s.message.contains("Forbidden") => {
            ctx.event(
                cn,
                EventType::Normal,
                "RecreatingStatefulSet",
                "Apply",
                format!(
                    "replacing StatefulSet {ns}/{} to change fields Kubernetes does not update in place ({}); its pods keep running and roll one by one",
                    names.statefulset, s.message
                ),
            )
            .await;
            // Only the StatefulSet checked to be ours: a uid precondition, so that one made in
            // its place since then is not deleted.
            let uid = sts
                .get_opt(&names.statefulset)
                .await
                .map_err(kerr(format!(
                    "reading StatefulSet {ns}/{}",
                    names.statefulset
                )))?
                .filter(|o| cn.uid().is_some_and(|u| controlled_by(o, &u)))
                .and_then(|o| o.uid());
            let Some(uid) = uid else {
                // Gone, or no longer ours: the next reconcile looks again.
                return Err(Error::Kube {
                    action: format!("replacing StatefulSet {ns}/{}", names.statefulset),
                    source: kube::Error::Api(s),
                });
            };
            let dp = DeleteParams {
                propagation_policy: Some(PropagationPolicy::Orphan),
                preconditions: Some(Preconditions {
                    uid: Some(uid),
                    resource_version: None,
                }),
                ..Default::default()
            };
            sts.delete(&names.statefulset, &dp)
                .await
                .map_err(kerr(format!(
                    "replacing StatefulSet {ns}/{}",
                    names.statefulset
                )))?;
            // The orphaning delete finishes in the background; the next reconcile applies.
            return Err(Error::Kube {
                action: format!("replacing StatefulSet {ns}/{}", names.statefulset),
                source: kube::Error::Api(s),
            });
        }
        Err(e) => {
            return Err(kerr(format!(
                "applying StatefulSet {ns}/{}",
                names.statefulset
            ))(e));
        }
    }
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let pv_name = c.pv.name_any();
    let legacy = pv_name != names.pv;
    let cn_name = cn.name_any();
    match put(&pvs, &pv_name, &c.pv, |pv| {
        pv_is_ours(pv, &ns, &cn_name, &uid, legacy)
    })
    .await
    {
        Ok(Put::Done) => {}
        Ok(Put::Foreign) => return Err(foreign("PersistentVolume", &pv_name)),
        // A PV's source cannot change after creation: one an older operator made (without the
        // publish secret) stays as it is and keeps serving; only token rotation for volumes
        // mounted from it waits until the CacheNamespace is made again.
        Err(kube::Error::Api(s)) if s.code == 422 && pv_name != names.pv => {
            ctx.event(
                cn,
                EventType::Warning,
                "PersistentVolumeKept",
                "Apply",
                format!(
                    "PersistentVolume {pv_name} was made by an older operator and Kubernetes does \
                     not change a PV's source ({}); it keeps serving, but without its \
                     nodePublishSecretRef kubelet cannot hand a replaced data-plane token to \
                     volumes already mounted from it: delete and create the CacheNamespace again \
                     to get a PV that has one",
                    s.message
                ),
            )
            .await;
        }
        Err(e) => return Err(kerr(format!("applying PersistentVolume {pv_name}"))(e)),
    }
    apply_ns!(PersistentVolumeClaim, c.pvc, names.pvc);
    Ok(())
}
