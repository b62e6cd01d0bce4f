//! Membership from the Kubernetes API: the ready workers that the operator publishes in a
//! CacheNamespace's `status.workers`, followed with a watch while the volume is mounted.

use std::sync::Arc;

use anyhow::Context;
use futures::StreamExt;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use lakecache_api::{CACHE_NAMESPACE_KIND, CACHE_NAMESPACE_PLURAL, GROUP, VERSION, WorkerStatus};
use lakecache_client::{Member, Membership};

/// The ready workers listed in a CacheNamespace object.
pub fn ready_workers(obj: &DynamicObject) -> Vec<Member> {
    let workers = obj
        .data
        .get("status")
        .and_then(|s| s.get("workers"))
        .cloned()
        .unwrap_or_default();
    let workers: Vec<WorkerStatus> = serde_json::from_value(workers).unwrap_or_default();
    workers
        .into_iter()
        .filter(|w| w.ready && !w.address.is_empty())
        .map(|w| Member {
            endpoint: if w.address.contains("://") {
                w.address
            } else {
                format!("http://{}", w.address)
            },
            id: w.name,
        })
        .collect()
}

/// Makes `membership` the ready workers of `obj`. Members are compared whole, id and endpoint:
/// a StatefulSet pod that is recreated keeps its name but usually gets a new IP, and comparing
/// ids only would leave the mount dialling the dead address. An unchanged list is not set again
/// (the watch resends objects on every resync); a changed one keeps the connections of the
/// members that did not change.
fn apply(membership: &Membership, obj: &DynamicObject) {
    let members = ready_workers(obj);
    let unchanged = membership
        .snapshot()
        .iter()
        .map(|c| &c.member)
        .eq(members.iter());
    if unchanged {
        return;
    }
    let after: Vec<String> = members
        .iter()
        .map(|m| format!("{}={}", m.id, m.endpoint))
        .collect();
    match membership.set(members) {
        Ok(()) => tracing::info!(workers = ?after, "workers changed"),
        Err(e) => tracing::warn!(error = %e, "ignoring a worker list that cannot be used"),
    }
}

/// Reads the CacheNamespace once (so a missing one fails the mount with a clear message), then
/// keeps `membership` in step with it in a background task.
pub async fn follow(
    namespace: &str,
    name: &str,
    membership: Arc<Membership>,
) -> anyhow::Result<()> {
    let client = Client::try_default().await.context(
        "no access to the Kubernetes API (neither an in-cluster service account nor KUBECONFIG); \
         without the operator, list the workers in volumeAttributes.workers",
    )?;
    let gvk = GroupVersionKind::gvk(GROUP, VERSION, CACHE_NAMESPACE_KIND);
    let ar = ApiResource::from_gvk_with_plural(&gvk, CACHE_NAMESPACE_PLURAL);
    let api: Api<DynamicObject> = Api::namespaced_with(client, namespace, &ar);
    let obj = match api.get(name).await {
        Ok(o) => o,
        Err(kube::Error::Api(s)) if s.code == 404 => {
            anyhow::bail!(
                "CacheNamespace {namespace}/{name} does not exist; check volumeAttributes"
            )
        }
        Err(e) => return Err(e).context(format!("reading CacheNamespace {namespace}/{name}")),
    };
    apply(&membership, &obj);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let (ns, n) = (namespace.to_string(), name.to_string());
    tokio::spawn(async move {
        let mut events = watcher(api, cfg)
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Some(ev) = events.next().await {
            match ev {
                Ok(obj) => apply(&membership, &obj),
                Err(e) => {
                    tracing::warn!(cache_namespace = %format!("{ns}/{n}"), error = %e, "watch failed; retrying")
                }
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ready_workers_with_an_address_are_used() {
        let obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "lakecache.io/v1alpha1",
            "kind": "CacheNamespace",
            "metadata": {"name": "imagenet", "namespace": "ml"},
            "status": {"workers": [
                {"name": "imagenet-worker-0", "address": "10.0.0.1:7070", "ready": true},
                {"name": "imagenet-worker-1", "address": "10.0.0.2:7070", "ready": false},
                {"name": "imagenet-worker-2", "address": "", "ready": true},
                {"name": "imagenet-worker-3", "address": "https://w3:7070", "ready": true}
            ]}
        }))
        .unwrap();
        let m = ready_workers(&obj);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].id, "imagenet-worker-0");
        assert_eq!(m[0].endpoint, "http://10.0.0.1:7070");
        assert_eq!(m[1].endpoint, "https://w3:7070");
    }

    #[test]
    fn no_status_means_no_workers() {
        let obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "lakecache.io/v1alpha1",
            "kind": "CacheNamespace",
            "metadata": {"name": "imagenet", "namespace": "ml"}
        }))
        .unwrap();
        assert!(ready_workers(&obj).is_empty());
    }

    fn with_worker_0_at(address: &str) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "lakecache.io/v1alpha1",
            "kind": "CacheNamespace",
            "metadata": {"name": "imagenet", "namespace": "ml"},
            "status": {"workers": [
                {"name": "imagenet-worker-0", "address": address, "ready": true}
            ]}
        }))
        .unwrap()
    }

    /// A StatefulSet pod keeps its name when it is recreated but usually gets a new IP: the
    /// mount must dial the new address, not keep the connection to the dead one.
    #[tokio::test]
    async fn a_worker_that_comes_back_under_a_new_address_is_followed() {
        let membership = Membership::new(None, std::time::Duration::from_secs(1)).unwrap();
        apply(&membership, &with_worker_0_at("10.0.0.1:7070"));
        apply(&membership, &with_worker_0_at("10.0.0.9:7070"));
        let members: Vec<Member> = membership
            .snapshot()
            .iter()
            .map(|c| c.member.clone())
            .collect();
        assert_eq!(
            members,
            vec![Member {
                id: "imagenet-worker-0".into(),
                endpoint: "http://10.0.0.9:7070".into(),
            }]
        );
    }
}
