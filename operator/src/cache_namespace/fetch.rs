//! Dereference: fetch what a CacheNamespace refers to, and whether the names of its children
//! are free.
//!
//! A CacheNamespace refers to a credentials Secret (the user's), and to the token Secret and the
//! PersistentVolume that the operator made for it earlier. What is missing or not ours is not an
//! error of the operator but a [`Problem`] of the object, returned next to what was found, so
//! that the reconcile goes on to say so in the status (see [`crate::problem`]). Only a failure
//! to read is an [`Error`].
//!
//! A child's name may already be taken by an object this CacheNamespace does not control (made
//! by an admin, another tool, or another CacheNamespace): server-side apply with `force` would
//! take it over, and a tenant could thereby rewrite or delete what is not theirs. So every name
//! is looked up first, and the first one taken is a NameConflict problem: nothing is applied.
//! The PersistentVolume's name is looked up too, since a claim bound to a PV an older operator
//! named keeps that name (`pv_name`).

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, PersistentVolume, PersistentVolumeClaim, Secret, Service,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::{Api, Resource, ResourceExt};
use lakecache_api::CacheNamespace;
use serde::de::DeserializeOwned;

use super::build::{Names, TOKEN_KEY};
use super::ownership::{controlled_by, pv_is_ours};
use crate::error::kube as kerr;
use crate::{Context, Error, Problem};

/// Everything the CacheNamespace refers to, in the order the reconcile needs it: the Secrets
/// (and a problem with them), the name of its PersistentVolume, and, when the Secrets are fine,
/// whether a child's name is taken.
pub(super) async fn fetch(cn: &CacheNamespace, ctx: &Context) -> Result<(Inputs, String), Error> {
    let mut inputs = secrets(cn, ctx).await?;
    let pv = pv_name(cn, ctx).await?;
    if inputs.problem.is_none() {
        inputs.problem = name_conflict(cn, ctx, &pv).await?;
    }
    Ok((inputs, pv))
}

/// What the object refers to, fetched.
pub(super) struct Inputs {
    /// The token of the existing token Secret.
    pub token: Option<String>,
    pub problem: Option<Problem>,
}

async fn secrets(cn: &CacheNamespace, ctx: &Context) -> Result<Inputs, Error> {
    let ns = cn.namespace().unwrap_or_default();
    let names = Names::of(&ns, &cn.name_any());
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let mut problem = None;
    if let Some(r) = &cn.spec.source.credentials_secret_ref {
        match secrets
            .get_opt(&r.name)
            .await
            .map_err(kerr(format!("reading Secret {ns}/{}", r.name)))?
        {
            None => {
                problem = Some(Problem {
                    reason: "SecretNotFound",
                    message: format!(
                        "Secret {ns}/{} named by spec.source.credentialsSecretRef does not exist: \
                         create it with the source's credentials (keys such as access_key_id and \
                         secret_access_key), or remove credentialsSecretRef for a public source",
                        r.name
                    ),
                })
            }
            Some(s)
                if s.data.as_ref().is_none_or(|d| d.is_empty())
                    && s.string_data.as_ref().is_none_or(|d| d.is_empty()) =>
            {
                problem = Some(Problem {
                    reason: "SecretEmpty",
                    message: format!(
                        "Secret {ns}/{} named by spec.source.credentialsSecretRef has no keys: \
                         add the source's credentials (such as access_key_id and secret_access_key)",
                        r.name
                    ),
                })
            }
            Some(_) => {}
        }
    }
    let uid = cn.uid().unwrap_or_default();
    let token = match secrets
        .get_opt(&names.token_secret)
        .await
        .map_err(kerr(format!("reading Secret {ns}/{}", names.token_secret)))?
    {
        None => None,
        Some(s) => {
            let ours = s
                .owner_references()
                .iter()
                .any(|o| o.uid == uid && o.kind == "CacheNamespace");
            if !ours {
                problem.get_or_insert(Problem {
                    reason: "TokenSecretConflict",
                    message: format!(
                        "Secret {ns}/{} exists and does not belong to this CacheNamespace: \
                         rename or delete it, the operator keeps the data-plane token there",
                        names.token_secret
                    ),
                });
                None
            } else {
                s.data
                    .as_ref()
                    .and_then(|d| d.get(TOKEN_KEY))
                    .and_then(|b| String::from_utf8(b.0.clone()).ok())
                    .filter(|t| !t.is_empty())
            }
        }
    };
    Ok(Inputs { token, problem })
}

/// A new data-plane token: 32 random bytes as hex.
pub(super) fn new_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Whether the object `name` exists and whose it is.
enum Holder {
    Nobody,
    Us,
    Other,
}

async fn holder<K>(api: &Api<K>, name: &str, uid: &str) -> Result<Holder, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    Ok(match api.get_opt(name).await? {
        None => Holder::Nobody,
        Some(o) if controlled_by(&o, uid) => Holder::Us,
        Some(_) => Holder::Other,
    })
}

/// The first child whose name is taken by an object this CacheNamespace does not control, as a
/// problem; the PersistentVolume (cluster-scoped, without owner) is ours when its labels and
/// annotation name this CacheNamespace's namespace, name and uid.
async fn name_conflict(
    cn: &CacheNamespace,
    ctx: &Context,
    pv_name: &str,
) -> Result<Option<Problem>, Error> {
    let ns = cn.namespace().unwrap_or_default();
    let name = cn.name_any();
    let uid = cn.uid().unwrap_or_default();
    let names = Names::of(&ns, &name);
    let legacy = pv_name != names.pv;
    let client = ctx.client.clone();
    let mut taken: Option<(&str, String)> = None;
    macro_rules! check_ns {
        ($ty:ty, $kind:expr, $name:expr) => {
            if taken.is_none() {
                let api: Api<$ty> = Api::namespaced(client.clone(), &ns);
                let h = holder(&api, &$name, &uid)
                    .await
                    .map_err(kerr(format!("reading {} {ns}/{}", $kind, $name)))?;
                if let Holder::Other = h {
                    taken = Some(($kind, format!("{ns}/{}", $name)));
                }
            }
        };
    }
    check_ns!(ConfigMap, "ConfigMap", names.config_map);
    check_ns!(Service, "Service", names.service);
    check_ns!(PodDisruptionBudget, "PodDisruptionBudget", names.pdb);
    check_ns!(StatefulSet, "StatefulSet", names.statefulset);
    check_ns!(PersistentVolumeClaim, "PersistentVolumeClaim", names.pvc);
    if ctx.cfg.network_policy.is_some() {
        check_ns!(NetworkPolicy, "NetworkPolicy", names.network_policy);
    }
    if taken.is_none() {
        let pvs: Api<PersistentVolume> = Api::all(client.clone());
        if let Some(pv) = pvs
            .get_opt(pv_name)
            .await
            .map_err(kerr(format!("reading PersistentVolume {pv_name}")))?
            && !pv_is_ours(&pv, &ns, &name, &uid, legacy)
        {
            taken = Some(("PersistentVolume", pv_name.to_string()));
        }
    }
    Ok(taken.map(|(kind, obj)| Problem {
        reason: "NameConflict",
        message: format!(
            "{kind} {obj} exists and does not belong to this CacheNamespace, so nothing was \
             applied: rename the CacheNamespace, or have the {kind} removed if it is left over"
        ),
    }))
}

/// The name of this CacheNamespace's PersistentVolume: [`Names::of`]'s, unless its own claim
/// (controlled by it) is already bound to another, which a claim cannot change.
pub(super) async fn pv_name(cn: &CacheNamespace, ctx: &Context) -> Result<String, Error> {
    let ns = cn.namespace().unwrap_or_default();
    let names = Names::of(&ns, &cn.name_any());
    let uid = cn.uid().unwrap_or_default();
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let bound = pvcs
        .get_opt(&names.pvc)
        .await
        .map_err(kerr(format!(
            "reading PersistentVolumeClaim {ns}/{}",
            names.pvc
        )))?
        .filter(|c| controlled_by(c, &uid))
        .and_then(|c| c.spec?.volume_name)
        .filter(|v| !v.is_empty());
    Ok(bound.unwrap_or(names.pv))
}
