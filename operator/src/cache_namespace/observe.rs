//! Observe: what runs for a CacheNamespace, as the input of its status.
//!
//! Only what this CacheNamespace controls is observed: a foreign StatefulSet of the same name
//! says nothing about its workers, and a pod that merely carries the workers' labels is not a
//! worker (see [`super::ownership`]), since the worker list in the status is what readers, and
//! preloads with the token, connect to. Each ready worker is asked for its tiers and hits; one
//! that does not answer is recorded as such (the status says Degraded), not an error.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use lakecache_api::CacheNamespace;

use super::build::{self, Names};
use super::ownership::{controlled_by, is_worker};
use super::status::{self, Observed};
use crate::error::kube as kerr;
use crate::workers::WorkerRef;
use crate::{Context, Error};

pub(super) async fn observe(
    cn: &CacheNamespace,
    port: i32,
    token: Option<&str>,
    ctx: &Context,
) -> Result<Observed, Error> {
    let ns = cn.namespace().unwrap_or_default();
    let name = cn.name_any();
    let names = Names::of(&ns, &name);
    let sts: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &ns);
    let uid = cn.uid();
    // Only ours: a foreign StatefulSet of the same name says nothing about this one's workers.
    let statefulset = sts
        .get_opt(&names.statefulset)
        .await
        .map_err(kerr(format!(
            "reading StatefulSet {ns}/{}",
            names.statefulset
        )))?
        .filter(|o| uid.as_ref().is_some_and(|u| controlled_by(o, u)));
    // Only the pods of our StatefulSet: anyone who may create pods in the namespace can give one
    // the workers' labels, and the workers' list is what readers (and preloads, with the token)
    // connect to.
    let pods: Vec<Pod> = match &statefulset {
        None => vec![],
        Some(s) => Api::<Pod>::namespaced(ctx.client.clone(), &ns)
            .list(&ListParams::default().labels(&build::selector_string(&name)))
            .await
            .map_err(kerr(format!("listing the worker pods of {ns}/{name}")))?
            .items
            .into_iter()
            .filter(|p| is_worker(p, s))
            .collect(),
    };
    let mut infos = vec![];
    if let Some(token) = token {
        let ready: Vec<_> = status::workers(&pods, port)
            .into_iter()
            .filter(|w| w.ready)
            .collect();
        let calls = ready.iter().map(|w| {
            let r = WorkerRef {
                name: w.name.clone(),
                address: w.address.clone(),
                token: token.to_string(),
            };
            async move {
                let info = ctx.workers.info(&r).await.map_err(|e| e.message);
                (r.name, info)
            }
        });
        infos = futures::future::join_all(calls).await;
    }
    Ok(Observed {
        statefulset,
        pods,
        infos,
        scan: None,
    })
}
