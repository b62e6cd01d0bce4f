//! Dereference: the workers a preload runs on, from its CacheNamespace.
//!
//! A preload names a CacheNamespace; it runs on that CacheNamespace's ready workers, as its
//! status lists them, with the data-plane token from its token Secret. The CacheNamespace
//! controller lists only workers it has checked to be its own, so the list can be trusted here.
//! A CacheNamespace that does not exist, has no token yet or no ready worker is not an error
//! but a [`Problem`]: the preload waits (Pending) and says why. The reads are here, what they
//! mean is [`ready_workers`] (no I/O).

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, ResourceExt};
use lakecache_api::{CacheNamespace, CachePreload};

use crate::cache_namespace::build::{Names, TOKEN_KEY};
use crate::error::kube as kerr;
use crate::workers::WorkerRef;
use crate::{Context, Error, Problem};

/// The CacheNamespace's ready workers and token, or why there are none.
pub(super) async fn workers_of(
    cp: &CachePreload,
    ctx: &Context,
) -> Result<Result<Vec<WorkerRef>, Problem>, Error> {
    let ns = cp.namespace().unwrap_or_default();
    let cn_name = &cp.spec.cache_namespace;
    let cns: Api<CacheNamespace> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(cn) = cns
        .get_opt(cn_name)
        .await
        .map_err(kerr(format!("reading CacheNamespace {ns}/{cn_name}")))?
    else {
        return Ok(Err(Problem::new(
            "CacheNamespaceNotFound",
            format!(
                "CacheNamespace {ns}/{cn_name} does not exist: create it, or fix spec.cacheNamespace"
            ),
        )));
    };
    let names = Names::of(&ns, cn_name);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let token = secrets
        .get_opt(&names.token_secret)
        .await
        .map_err(kerr(format!("reading Secret {ns}/{}", names.token_secret)))?
        .and_then(|s| s.data)
        .and_then(|d| d.get(TOKEN_KEY).cloned())
        .and_then(|b| String::from_utf8(b.0).ok());
    Ok(ready_workers(cp, cn, token))
}

/// The ready workers (with an address) of `cn`, the CacheNamespace `cp` names, each with
/// `token`; or why `cp` cannot run on them yet.
pub fn ready_workers(
    cp: &CachePreload,
    cn: CacheNamespace,
    token: Option<String>,
) -> Result<Vec<WorkerRef>, Problem> {
    let ns = cp.namespace().unwrap_or_default();
    let cn_name = &cp.spec.cache_namespace;
    let Some(token) = token else {
        return Err(Problem::new(
            "NoReadyWorkers",
            format!("CacheNamespace {ns}/{cn_name} has no data-plane token yet; waiting for it"),
        ));
    };
    let workers: Vec<WorkerRef> = cn
        .status
        .map(|s| s.workers)
        .unwrap_or_default()
        .into_iter()
        .filter(|w| w.ready && !w.address.is_empty())
        .map(|w| WorkerRef {
            name: w.name,
            address: w.address,
            token: token.clone(),
        })
        .collect();
    if workers.is_empty() {
        return Err(Problem::new(
            "NoReadyWorkers",
            format!(
                "CacheNamespace {ns}/{cn_name} has no ready workers yet; the preload starts when one is ready"
            ),
        ));
    }
    Ok(workers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lakecache_api::{CacheNamespaceStatus, WorkerStatus};

    fn preload() -> CachePreload {
        crate::fixtures::preload(&[], None, None)
    }

    /// The shared CacheNamespace, its status listing `workers` (name, address, ready).
    fn cache_namespace(workers: &[(&str, &str, bool)]) -> CacheNamespace {
        let mut cn = crate::fixtures::cache_namespace(1, vec![]);
        cn.status = Some(CacheNamespaceStatus {
            workers: workers
                .iter()
                .map(|(name, address, ready)| WorkerStatus {
                    name: name.to_string(),
                    address: address.to_string(),
                    ready: *ready,
                })
                .collect(),
            ..Default::default()
        });
        cn
    }

    #[test]
    fn a_preload_runs_on_the_ready_workers_with_the_token() {
        let cn = cache_namespace(&[
            ("imagenet-worker-0", "10.0.0.1:7700", true),
            ("imagenet-worker-1", "10.0.0.2:7700", false),
            ("imagenet-worker-2", "", true),
            ("imagenet-worker-3", "10.0.0.4:7700", true),
        ]);
        let ws = ready_workers(&preload(), cn, Some("t0ken".into())).unwrap();
        let got: Vec<(&str, &str, &str)> = ws
            .iter()
            .map(|w| (w.name.as_str(), w.address.as_str(), w.token.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("imagenet-worker-0", "10.0.0.1:7700", "t0ken"),
                ("imagenet-worker-3", "10.0.0.4:7700", "t0ken"),
            ]
        );
    }

    #[test]
    fn without_a_token_or_a_ready_worker_the_preload_waits() {
        let cn = cache_namespace(&[("imagenet-worker-0", "10.0.0.1:7700", true)]);
        let p = ready_workers(&preload(), cn, None).unwrap_err();
        assert_eq!(p.reason, "NoReadyWorkers");
        assert!(
            p.message.contains("ml/imagenet has no data-plane token"),
            "{}",
            p.message
        );
        let cn = cache_namespace(&[("imagenet-worker-0", "10.0.0.1:7700", false)]);
        let p = ready_workers(&preload(), cn, Some("t".into())).unwrap_err();
        assert_eq!(p.reason, "NoReadyWorkers");
        assert!(p.message.contains("no ready workers yet"), "{}", p.message);
        let mut cn = cache_namespace(&[]);
        cn.status = None;
        assert!(ready_workers(&preload(), cn, Some("t".into())).is_err());
    }
}
