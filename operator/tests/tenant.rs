//! A tenant reaches only what is theirs. A tenant here is a ServiceAccount with a Role that may
//! create, read and delete CacheNamespaces and pods in its own namespace, and update and patch
//! its CacheNamespaces (not their status), and nothing else; it talks to a real control plane
//! (etcd, kube-apiserver, kube-controller-manager with its garbage collector, kube-scheduler)
//! with its own token, and the operator runs as the chart's ServiceAccount with the chart's RBAC.
//! No node: nothing here needs a worker to run.
//!
//! What a tenant tries, and what it gets:
//! - credentials in `spec.source.options` (every key of the lake's secret list, and names that
//!   merely contain `key` or `password`): refused by the API server;
//! - a Disk tier on a node directory the admin does not allow (`/etc`, a prefix trick, `..`):
//!   refused by the API server (`..`) or Failed with HostPathNotAllowed, and no StatefulSet;
//! - a CacheNamespace named so that a child's name is an admin's StatefulSet, ConfigMap,
//!   Service or PersistentVolume: Failed with NameConflict, the object untouched (same
//!   resourceVersion), and still there after the CacheNamespace is deleted;
//! - editing its CacheNamespace (the annotation that once listed the nodes to clean, naming
//!   nodes of its choosing; the spec), writing its status (Forbidden), a pod of its own with the
//!   workers' labels: the pod is never published as a worker, and on delete no cleanup pod is
//!   made for a node the operator did not record or that is no Node, and the finalizer ends;
//! - and, as the admin: `a`/`b-c` and `a-b`/`c` get PersistentVolumes of their own, and the PV
//!   an older operator named `lakecache-NAMESPACE-NAME` is kept for the claim bound to it.

mod support;

use std::collections::BTreeMap;

use anyhow::{Context, ensure};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolume, Pod, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use lakecache_api::{CacheNamespace, CacheNamespacePhase};
use lakecache_e2e::{Cluster, ClusterOptions};
use serde_json::{Value, json};
use support::*;

const TENANT_NS: &str = "team-a";
/// The one node directory the operator allows (the tests never write it: no node).
const ROOT: &str = "/var/lib/lakecache-tenant-test";

fn cache_namespace(name: &str, ns: &str, options: Value, tiers: Value) -> Value {
    json!({
        "apiVersion": "lakecache.io/v1alpha1",
        "kind": "CacheNamespace",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "source": {"uri": "s3://datasets/x", "options": options},
            "tiers": tiers,
        },
    })
}

fn memory() -> Value {
    json!([{"kind": "Memory", "size": "64Mi"}])
}

fn disk(path: &str) -> Value {
    json!([{"kind": "Disk", "size": "64Mi", "path": path}])
}

/// The tenant: a ServiceAccount of `ns` that may only work with CacheNamespaces and pods there.
async fn tenant(cluster: &Cluster, admin: &Client, ns: &str) -> anyhow::Result<Client> {
    Api::<ServiceAccount>::namespaced(admin.clone(), ns)
        .create(
            &PostParams::default(),
            &object(json!({"metadata": {"name": "tenant", "namespace": ns}})),
        )
        .await?;
    let verbs = ["create", "get", "list", "watch", "delete"];
    // As real tenants have: they change their CacheNamespaces (spec, labels, annotations), but
    // not their status.
    let cn_verbs = [
        "create", "get", "list", "watch", "delete", "update", "patch",
    ];
    Api::<Role>::namespaced(admin.clone(), ns)
        .create(
            &PostParams::default(),
            &object(json!({
                "metadata": {"name": "tenant", "namespace": ns},
                "rules": [
                    {"apiGroups": ["lakecache.io"], "resources": ["cachenamespaces"], "verbs": cn_verbs},
                    {"apiGroups": [""], "resources": ["pods"], "verbs": verbs},
                ],
            })),
        )
        .await?;
    Api::<RoleBinding>::namespaced(admin.clone(), ns)
        .create(
            &PostParams::default(),
            &object(json!({
                "metadata": {"name": "tenant", "namespace": ns},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tenant"},
                "subjects": [{"kind": "ServiceAccount", "name": "tenant", "namespace": ns}],
            })),
        )
        .await?;
    let kubeconfig = cluster.kubeconfig_for_service_account(ns, "tenant").await?;
    lakecache_e2e::cluster::client_from_kubeconfig(&kubeconfig).await
}

/// The reason and message of a CacheNamespace's Ready condition once it is Failed.
async fn failed(api: &Api<CacheNamespace>, name: &str) -> anyhow::Result<(String, String)> {
    wait(&format!("{name} Failed"), || async {
        let cn = api.get(name).await?;
        let st = cn.status.unwrap_or_default();
        if st.phase != Some(CacheNamespacePhase::Failed) {
            return Ok(None);
        }
        let ready = st
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .context("no Ready condition")?;
        Ok(Some((ready.reason.clone(), ready.message.clone())))
    })
    .await
}

/// Waits for a Warning Event with `reason` about `name`, and returns its note.
async fn warning(client: &Client, ns: &str, name: &str, reason: &str) -> anyhow::Result<String> {
    wait(&format!("a {reason} Warning about {name}"), || async {
        Ok(events(client, ns, name)
            .await?
            .into_iter()
            .find(|(t, r, _)| t == "Warning" && r == reason)
            .map(|(_, _, note)| note))
    })
    .await
}

/// Whether the API server refused `cn` with a message that contains `says`.
async fn refused(api: &Api<CacheNamespace>, cn: Value, says: &str) -> anyhow::Result<()> {
    let name = cn["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    match api.create(&dry, &object(cn)).await {
        Err(kube::Error::Api(s)) if s.code == 422 && s.message.contains(says) => Ok(()),
        Err(e) => anyhow::bail!("{name}: refused, but not for {says:?}: {e}"),
        Ok(_) => anyhow::bail!("{name}: accepted, should be refused ({says})"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_reaches_only_what_is_theirs() -> anyhow::Result<()> {
    let _serial = serial().await;
    lakecache_e2e::init_logging();
    let cluster = Cluster::start(ClusterOptions::full()).await?;
    install_crds(&cluster)?;
    let admin = cluster.client().await?;
    create_namespace(&admin, TENANT_NS).await?;
    // Before the operator starts: what an older operator left, a PV named the old way
    // (`lakecache-NAMESPACE-NAME`) that the CacheNamespace's own claim is bound to.
    legacy_objects(&admin).await?;
    let kubeconfig = operator_account(&cluster).await?;
    let operator = Operator::start(
        &kubeconfig,
        cluster.dir(),
        &[
            "--lease-namespace",
            "lakecache-system",
            "--allowed-host-path-roots",
            ROOT,
            "--network-policy",
            "--network-policy-peer-labels",
            "app.kubernetes.io/name=lakecache,app.kubernetes.io/instance=lakecache",
        ],
    )?;
    let client = tenant(&cluster, &admin, TENANT_NS).await?;
    let cns: Api<CacheNamespace> = Api::namespaced(client.clone(), TENANT_NS);
    let admin_cns: Api<CacheNamespace> = Api::namespaced(admin.clone(), TENANT_NS);

    // The tenant's rights are what the Role says, and no more.
    let forbidden = Api::<ConfigMap>::namespaced(client.clone(), TENANT_NS)
        .list(&Default::default())
        .await;
    ensure!(
        matches!(&forbidden, Err(kube::Error::Api(s)) if s.code == 403),
        "the tenant may list ConfigMaps: {forbidden:?}"
    );

    // Credentials in options: every key of the lake's list, and names that merely contain one
    // of the secret words, in any case.
    let secret_keys: Vec<&str> = lakecache_lake::SECRET_OPTION_KEYS
        .iter()
        .copied()
        .chain(["MyApiKey", "db_password", "Secret_Access_Key", "SAS_TOKEN"])
        .collect();
    for k in &secret_keys {
        refused(
            &cns,
            cache_namespace("creds", TENANT_NS, json!({ *k: "x" }), memory()),
            "source.options must not hold credentials",
        )
        .await
        .with_context(|| format!("option {k}"))?;
    }
    let fine = json!({"region": "us-east-1", "endpoint": "http://s3:9000", "enable_virtual_host_style": "false"});
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    cns.create(
        &dry,
        &object(cache_namespace("fine", TENANT_NS, fine, memory())),
    )
    .await
    .context("region, endpoint and enable_virtual_host_style are refused")?;
    eprintln!(
        "{} secret option keys refused, 3 plain ones accepted",
        secret_keys.len()
    );

    // `..` never reaches the operator.
    for p in [
        format!("{ROOT}/../../etc"),
        format!("{ROOT}/.."),
        "relative/path".into(),
    ] {
        refused(
            &cns,
            cache_namespace("dots", TENANT_NS, json!({}), disk(&p)),
            "tiers[].path must be an absolute directory without '..'",
        )
        .await?;
    }

    // Node directories the admin does not allow: Failed, a Warning, and no StatefulSet.
    let sts: Api<StatefulSet> = Api::namespaced(admin.clone(), TENANT_NS);
    for (name, path) in [
        ("etc", "/etc".to_string()),
        ("evil", format!("{ROOT}-evil")),
        ("below", format!("{ROOT}/team-b/theirs")),
    ] {
        cns.create(
            &PostParams::default(),
            &object(cache_namespace(name, TENANT_NS, json!({}), disk(&path))),
        )
        .await?;
        let (reason, message) = failed(&admin_cns, name).await?;
        ensure!(
            reason == "HostPathNotAllowed",
            "{name}: {reason}: {message}"
        );
        ensure!(
            message.contains(ROOT) && message.contains("storageClassName"),
            "{name}: the message says neither what is allowed nor what else to do: {message}"
        );
        let note = warning(&admin, TENANT_NS, name, "HostPathNotAllowed").await?;
        ensure!(note.contains(&path), "{note}");
        ensure!(
            sts.get_opt(&format!("{name}-worker")).await?.is_none(),
            "{name}: a StatefulSet was made for {path}"
        );
    }
    eprintln!("host paths outside {ROOT}: Failed, with a Warning, and no StatefulSet");

    // The allowed root: the CacheNamespace's own directory below it, chowned by the operator's
    // image whatever image the tenant names; the token's hash rolls the workers; a
    // NetworkPolicy lets only the chart's pods reach the data port; the PV republishes the
    // token.
    let mut good = cache_namespace("good", TENANT_NS, json!({}), disk(&format!("{ROOT}/")));
    good["spec"]["workers"] = json!({"image": "tenant.example/root-shell:latest"});
    cns.create(&PostParams::default(), &object(good)).await?;
    wait("good's StatefulSet", || async {
        Ok(sts.get_opt("good-worker").await?)
    })
    .await?;
    // Created (never applied over a name someone else might have taken meanwhile), and then
    // the operator's server-side apply owns the fields, so that one it drops later goes.
    let managers = |s: &StatefulSet| -> Vec<(String, String)> {
        s.metadata
            .managed_fields
            .iter()
            .flatten()
            .map(|m| {
                (
                    m.manager.clone().unwrap_or_default(),
                    m.operation.clone().unwrap_or_default(),
                )
            })
            .collect()
    };
    let applied = wait(
        "good's StatefulSet's fields owned by the operator's apply",
        || async {
            let s = sts.get("good-worker").await?;
            let m = managers(&s);
            Ok((m.contains(&("lakecache-operator".into(), "Apply".into()))
                && !m.contains(&("lakecache-operator".into(), "Update".into())))
            .then_some(()))
        },
    )
    .await;
    let s = sts.get("good-worker").await?;
    ensure!(
        applied.is_ok(),
        "good's StatefulSet's managers: {:?}",
        managers(&s)
    );
    let pod = s.spec.as_ref().unwrap().template.clone();
    let spec = pod.spec.as_ref().unwrap();
    let host = spec
        .volumes
        .iter()
        .flatten()
        .find_map(|v| v.host_path.as_ref())
        .context("no hostPath volume")?;
    ensure!(
        host.path == format!("{ROOT}/{TENANT_NS}/good"),
        "{}",
        host.path
    );
    let init = &spec.init_containers.as_ref().context("no init container")?[0];
    ensure!(
        init.image.as_deref() == Some(worker_image().as_str()),
        "the root init container runs {:?}",
        init.image
    );
    let caps = init
        .security_context
        .as_ref()
        .and_then(|c| c.capabilities.clone())
        .unwrap_or_default();
    ensure!(caps.drop == Some(vec!["ALL".into()]) && caps.add == Some(vec!["CHOWN".into()]));
    ensure!(
        spec.containers[0].image.as_deref() == Some("tenant.example/root-shell:latest"),
        "the worker runs the tenant's image, unprivileged"
    );
    let annotations = pod
        .metadata
        .unwrap_or_default()
        .annotations
        .unwrap_or_default();
    let token_hash = annotations
        .get("lakecache.io/token-hash")
        .context("no token hash on the pod template")?;
    ensure!(token_hash.len() == 16);
    let np = wait("good's NetworkPolicy", || async {
        Ok(Api::<NetworkPolicy>::namespaced(admin.clone(), TENANT_NS)
            .get_opt("good-workers")
            .await?)
    })
    .await?;
    let np_spec = np.spec.unwrap_or_default();
    let from = &np_spec.ingress.as_ref().unwrap()[0].from.as_ref().unwrap()[0];
    ensure!(
        from.namespace_selector
            .as_ref()
            .and_then(|s| s.match_labels.as_ref())
            .and_then(|l| l.get("kubernetes.io/metadata.name"))
            .map(String::as_str)
            == Some("lakecache-system")
    );
    let pvs: Api<PersistentVolume> = Api::all(admin.clone());
    let pv = wait("good's PV", || async {
        Ok(pvs.get_opt(&format!("lakecache-{TENANT_NS}.good")).await?)
    })
    .await?;
    let csi = pv.spec.unwrap().csi.unwrap();
    ensure!(
        csi.node_publish_secret_ref
            .as_ref()
            .and_then(|r| r.name.as_deref())
            == Some("good-token")
    );

    tenant_edits_and_deletes(&client, &admin).await?;

    // Names that are taken: nothing is applied over them, deleted, or adopted.
    let cms: Api<ConfigMap> = Api::namespaced(admin.clone(), TENANT_NS);
    let svcs: Api<Service> = Api::namespaced(admin.clone(), TENANT_NS);
    let labels = BTreeMap::from([("app".to_string(), "admins".to_string())]);
    sts.create(
        &PostParams::default(),
        &object(json!({
            "metadata": {"name": "taken-worker", "namespace": TENANT_NS},
            "spec": {
                "replicas": 0,
                "serviceName": "admins",
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "c", "image": "admins/app:1"}]},
                },
            },
        })),
    )
    .await?;
    let foreign_cm = cms
        .create(
            &PostParams::default(),
            &object(json!({
                "metadata": {"name": "taken2-worker-config", "namespace": TENANT_NS},
                "data": {"admin": "settings"},
            })),
        )
        .await?;
    let foreign_svc = svcs
        .create(
            &PostParams::default(),
            &object(json!({
                "metadata": {"name": "taken3-workers", "namespace": TENANT_NS},
                "spec": {"selector": labels, "ports": [{"port": 80}]},
            })),
        )
        .await?;
    let foreign_pv = pvs
        .create(
            &PostParams::default(),
            &object(json!({
                "metadata": {"name": format!("lakecache-{TENANT_NS}.taken4")},
                "spec": {
                    "capacity": {"storage": "1Gi"},
                    "accessModes": ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Retain",
                    "hostPath": {"path": "/srv/admins"},
                },
            })),
        )
        .await?;
    // Controllers write the status of the StatefulSet and the PV once: the baseline is after.
    let foreign_sts = wait("the StatefulSet controller's status", || async {
        let s = sts.get("taken-worker").await?;
        let seen = s.status.as_ref().and_then(|st| st.observed_generation) == s.metadata.generation;
        Ok(seen.then_some(s))
    })
    .await?;
    let foreign_pv = wait("the PV Available", || async {
        let p = pvs.get(&foreign_pv.name_any()).await?;
        let available = p.status.as_ref().and_then(|st| st.phase.as_deref()) == Some("Available");
        Ok(available.then_some(p))
    })
    .await?;
    let taken = [
        ("taken", "StatefulSet", format!("{TENANT_NS}/taken-worker")),
        (
            "taken2",
            "ConfigMap",
            format!("{TENANT_NS}/taken2-worker-config"),
        ),
        ("taken3", "Service", format!("{TENANT_NS}/taken3-workers")),
        (
            "taken4",
            "PersistentVolume",
            format!("lakecache-{TENANT_NS}.taken4"),
        ),
    ];
    // The tenant's own pod with the workers' labels, for a CacheNamespace whose StatefulSet
    // name is taken: never published as a worker.
    Api::<Pod>::namespaced(client.clone(), TENANT_NS)
        .create(
            &PostParams::default(),
            &object(fake_worker("taken", "taken-worker-0", None)),
        )
        .await?;
    for (name, kind, obj) in &taken {
        cns.create(
            &PostParams::default(),
            &object(cache_namespace(name, TENANT_NS, json!({}), memory())),
        )
        .await?;
        let (reason, message) = failed(&admin_cns, name).await?;
        ensure!(reason == "NameConflict", "{name}: {reason}: {message}");
        ensure!(
            message.contains(&format!("{kind} {obj}")),
            "{name}: the message does not name {kind} {obj}: {message}"
        );
        let note = warning(&admin, TENANT_NS, name, "NameConflict").await?;
        ensure!(note.contains(obj.as_str()), "{note}");
        let workers = admin_cns
            .get(name)
            .await?
            .status
            .unwrap_or_default()
            .workers;
        ensure!(
            workers.is_empty(),
            "{name}: pods that are not its workers are published: {workers:?}"
        );
        // Nothing else was made for it either: no token Secret's worth of children.
        ensure!(
            cms.get_opt(&format!("{name}-worker-config"))
                .await?
                .is_none()
                || *name == "taken2",
            "{name}: children were applied beside the conflict"
        );
    }
    // A few resyncs later, every foreign object is as it was.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let unchanged = || async {
        let s = sts.get("taken-worker").await?;
        let c = cms.get("taken2-worker-config").await?;
        let v = svcs.get("taken3-workers").await?;
        let p = pvs.get(&format!("lakecache-{TENANT_NS}.taken4")).await?;
        ensure!(
            s.resource_version() == foreign_sts.resource_version()
                && s.owner_references().is_empty(),
            "the admin's StatefulSet changed: {:?}",
            s.metadata
        );
        ensure!(
            c.resource_version() == foreign_cm.resource_version()
                && c.owner_references().is_empty()
        );
        ensure!(
            v.resource_version() == foreign_svc.resource_version()
                && v.owner_references().is_empty()
        );
        ensure!(p.resource_version() == foreign_pv.resource_version());
        Ok::<_, anyhow::Error>(())
    };
    unchanged().await?;
    for (name, _, _) in &taken {
        cns.delete(name, &DeleteParams::default()).await?;
    }
    wait("the conflicting CacheNamespaces gone", || async {
        let mut left = 0;
        for (name, _, _) in &taken {
            left += admin_cns.get_opt(name).await?.is_some() as usize;
        }
        Ok((left == 0).then_some(()))
    })
    .await?;
    // The garbage collector had time to act on anything the CacheNamespaces owned.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    unchanged().await?;
    eprintln!(
        "a StatefulSet, a ConfigMap, a Service and a PV of the admin's: NameConflict, untouched, and still there after the CacheNamespaces are gone"
    );

    // `a`/`b-c` and `a-b`/`c`: a PersistentVolume each, labelled with its own.
    for (ns, name) in [("a", "b-c"), ("a-b", "c")] {
        create_namespace(&admin, ns).await?;
        Api::<CacheNamespace>::namespaced(admin.clone(), ns)
            .create(
                &PostParams::default(),
                &object(cache_namespace(name, ns, json!({}), memory())),
            )
            .await?;
    }
    for (ns, name) in [("a", "b-c"), ("a-b", "c")] {
        let pv = wait(&format!("the PV of {ns}/{name}"), || async {
            Ok(pvs.get_opt(&format!("lakecache-{ns}.{name}")).await?)
        })
        .await?;
        let l = pv.labels();
        ensure!(
            l.get("lakecache.io/namespace").map(String::as_str) == Some(ns)
                && l.get("lakecache.io/cache-namespace").map(String::as_str) == Some(name),
            "{:?}",
            l
        );
        let cn = Api::<CacheNamespace>::namespaced(admin.clone(), ns)
            .get(name)
            .await?;
        ensure!(pv.annotations().get("lakecache.io/cache-namespace-uid") == cn.meta().uid.as_ref());
        let claim = pv.spec.unwrap().claim_ref.unwrap();
        ensure!(claim.namespace.as_deref() == Some(ns) && claim.name.as_deref() == Some(name));
    }
    eprintln!("a/b-c and a-b/c: two PersistentVolumes");

    // The older operator's PV is kept (its claim cannot move), not duplicated, and goes with
    // its CacheNamespace; Kubernetes refuses to add the publish secret to it, which a Warning
    // says.
    let old: Api<CacheNamespace> = Api::namespaced(admin.clone(), LEGACY_NS);
    let note = warning(&admin, LEGACY_NS, "legacy", "PersistentVolumeKept").await?;
    ensure!(note.contains("lakecache-old-legacy"), "{note}");
    wait("legacy's status written", || async {
        let cn = old.get("legacy").await?;
        Ok(cn.status.and_then(|s| s.phase))
    })
    .await?;
    ensure!(pvs.get_opt("lakecache-old.legacy").await?.is_none());
    ensure!(pvs.get_opt("lakecache-old-legacy").await?.is_some());
    old.delete("legacy", &DeleteParams::default()).await?;
    wait(
        "the older operator's PV gone with its CacheNamespace",
        || async {
            Ok(pvs
                .get_opt("lakecache-old-legacy")
                .await?
                .is_none()
                .then_some(()))
        },
    )
    .await?;
    eprintln!("an older operator's PV: kept, with a Warning, and deleted with its CacheNamespace");
    drop(operator);
    Ok(())
}

/// A pod the tenant makes with the worker labels of CacheNamespace `cn`, on `node` if given,
/// mounting that CacheNamespace's node directory.
fn fake_worker(cn: &str, name: &str, node: Option<&str>) -> Value {
    json!({
        "metadata": {
            "name": name,
            "namespace": TENANT_NS,
            "labels": {
                "app.kubernetes.io/name": "lakecache",
                "app.kubernetes.io/component": "worker",
                "app.kubernetes.io/instance": cn,
                "app.kubernetes.io/managed-by": "lakecache-operator",
                "lakecache.io/cache-namespace": cn,
            },
        },
        "spec": {
            "nodeName": node,
            "containers": [{"name": "worker", "image": "tenant.example/fake-worker:1"}],
            "volumes": [{"name": "disk", "hostPath": {"path": format!("{ROOT}/{TENANT_NS}/{cn}")}}],
        },
    })
}

/// The tenant edits a host-path CacheNamespace every way its Role allows, adds a pod of its own
/// with the workers' labels on a node of its choosing, and deletes the CacheNamespace.
async fn tenant_edits_and_deletes(client: &Client, admin: &Client) -> anyhow::Result<()> {
    let cns: Api<CacheNamespace> = Api::namespaced(client.clone(), TENANT_NS);
    let admin_cns: Api<CacheNamespace> = Api::namespaced(admin.clone(), TENANT_NS);
    let sts: Api<StatefulSet> = Api::namespaced(admin.clone(), TENANT_NS);
    cns.create(
        &PostParams::default(),
        &object(cache_namespace("edits", TENANT_NS, json!({}), disk(ROOT))),
    )
    .await?;
    wait("edits' StatefulSet", || async {
        Ok(sts.get_opt("edits-worker").await?)
    })
    .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), TENANT_NS);
    pods.create(
        &PostParams::default(),
        &object(fake_worker("edits", "edits-worker-7", Some("ghost-node"))),
    )
    .await?;
    // The real worker (Pending: no node here) is published; the tenant's pod never.
    wait("edits' worker in its status", || async {
        let st = admin_cns.get("edits").await?.status.unwrap_or_default();
        Ok(st
            .workers
            .iter()
            .any(|w| w.name == "edits-worker-0")
            .then_some(()))
    })
    .await?;
    for _ in 0..3 {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let st = admin_cns.get("edits").await?.status.unwrap_or_default();
        ensure!(
            st.workers.iter().all(|w| w.name != "edits-worker-7"),
            "the tenant's pod is published as a worker: {:?}",
            st.workers
        );
        ensure!(
            st.disk_directories.is_empty(),
            "a directory of a pod the operator did not make is recorded: {:?}",
            st.disk_directories
        );
    }
    // What the tenant may change: annotations (the list of nodes an older operator cleaned) and
    // the spec. The status it may not write.
    cns.patch(
        "edits",
        &PatchParams::default(),
        &Patch::Merge(json!({
            "metadata": {"annotations": {"lakecache.io/disk-nodes": "ghost-node,control-plane-1"}},
            "spec": {"tiers": [{"kind": "Disk", "size": "32Mi", "path": format!("{ROOT}/")}]},
        })),
    )
    .await?;
    let denied = cns
        .patch_status(
            "edits",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"diskDirectories": [
                {"node": "control-plane-1", "path": format!("{ROOT}/{TENANT_NS}/edits")},
            ]}})),
        )
        .await;
    ensure!(
        matches!(&denied, Err(kube::Error::Api(s)) if s.code == 403),
        "the tenant may write the status: {denied:?}"
    );
    // The old annotation is imported once (only nodes that exist: none here) and removed.
    wait("the old disk-nodes annotation removed", || async {
        let cn = admin_cns.get("edits").await?;
        Ok((!cn.annotations().contains_key("lakecache.io/disk-nodes")).then_some(cn))
    })
    .await
    .map(|cn| {
        let st = cn.status.unwrap_or_default();
        ensure!(
            st.disk_directories.is_empty(),
            "nodes that are no Node were imported: {:?}",
            st.disk_directories
        );
        Ok(())
    })??;
    // A directory the operator recorded on a node that has gone since (written here by the
    // admin, as the operator would have), and a forged one below no allowed root (whoever may
    // write the status could write it): this CacheNamespace's name below /etc.
    admin_cns
        .patch_status(
            "edits",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"diskDirectories": [
                {"node": "gone-node", "path": format!("{ROOT}/{TENANT_NS}/edits")},
                {"node": "gone-node", "path": format!("/etc/{TENANT_NS}/edits")},
            ]}})),
        )
        .await?;
    wait("the recorded directories in the status", || async {
        let st = admin_cns.get("edits").await?.status.unwrap_or_default();
        Ok((st.disk_directories.len() == 2).then_some(()))
    })
    .await?;
    cns.delete("edits", &DeleteParams::default()).await?;
    wait("edits gone (its finalizer done)", || async {
        Ok(admin_cns.get_opt("edits").await?.is_none().then_some(()))
    })
    .await?;
    let cleaners =
        Api::<Pod>::namespaced(admin.clone(), "lakecache-system")
            .list(&ListParams::default().labels(
                "app.kubernetes.io/component=disk-cleanup,lakecache.io/cache-namespace=edits",
            ))
            .await?;
    ensure!(
        cleaners.items.is_empty(),
        "cleanup pods were made for nodes the operator did not record or that are no Node: {:?}",
        cleaners
            .items
            .iter()
            .map(|p| p.spec.as_ref().and_then(|s| s.node_name.clone()))
            .collect::<Vec<_>>()
    );
    let note = wait(
        "a NodeDirectoryLeft Warning about the gone node",
        || async {
            Ok(events(admin, TENANT_NS, "edits")
                .await?
                .into_iter()
                .find(|(t, r, note)| {
                    t == "Warning"
                        && r == "NodeDirectoryLeft"
                        && note.contains(&format!("{ROOT}/{TENANT_NS}/edits"))
                })
                .map(|(_, _, note)| note))
        },
    )
    .await?;
    ensure!(
        note.contains("gone-node") && note.contains("no such Node"),
        "{note}"
    );
    ensure!(!note.contains("  "), "garbled: {note:?}");
    let forged = wait(
        "a NodeDirectoryLeft Warning about the forged root",
        || async {
            Ok(events(admin, TENANT_NS, "edits")
                .await?
                .into_iter()
                .find(|(t, r, note)| {
                    t == "Warning" && r == "NodeDirectoryLeft" && note.contains("/etc/")
                })
                .map(|(_, _, note)| note))
        },
    )
    .await?;
    ensure!(
        forged.contains(&format!("/etc/{TENANT_NS}/edits")) && forged.contains("retired"),
        "{forged}"
    );
    ensure!(!forged.contains("  "), "garbled: {forged:?}");
    // The StatefulSet controller may have adopted and removed it, or the pod garbage collector
    // (its node does not exist).
    let _ = pods
        .delete("edits-worker-7", &DeleteParams::default())
        .await;
    eprintln!(
        "a tenant's edits, status write (Forbidden) and fake worker: not published, no cleanup pod, the finalizer done"
    );
    Ok(())
}

const LEGACY_NS: &str = "old";

/// A CacheNamespace `old/legacy` with the claim and PV an older operator made for it.
async fn legacy_objects(admin: &Client) -> anyhow::Result<()> {
    create_namespace(admin, LEGACY_NS).await?;
    let cn = Api::<CacheNamespace>::namespaced(admin.clone(), LEGACY_NS)
        .create(
            &PostParams::default(),
            &object(cache_namespace("legacy", LEGACY_NS, json!({}), memory())),
        )
        .await?;
    let uid = cn.meta().uid.clone().context("no uid")?;
    let labels = json!({
        "app.kubernetes.io/managed-by": "lakecache-operator",
        "lakecache.io/cache-namespace": "legacy",
        "lakecache.io/namespace": LEGACY_NS,
    });
    Api::<PersistentVolume>::all(admin.clone())
        .create(
            &PostParams::default(),
            &object(json!({
                "metadata": {"name": "lakecache-old-legacy", "labels": labels},
                "spec": {
                    "accessModes": ["ReadOnlyMany"],
                    "capacity": {"storage": "1Pi"},
                    "storageClassName": "",
                    "persistentVolumeReclaimPolicy": "Retain",
                    "volumeMode": "Filesystem",
                    "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": "legacy", "namespace": LEGACY_NS},
                    "csi": {
                        "driver": lakecache_api::CSI_DRIVER,
                        "volumeHandle": "lakecache-old-legacy",
                        "readOnly": true,
                        "volumeAttributes": {"cacheNamespace": "legacy", "namespace": LEGACY_NS},
                        "nodeStageSecretRef": {"name": "legacy-token", "namespace": LEGACY_NS},
                    },
                },
            })),
        )
        .await?;
    Api::<k8s_openapi::api::core::v1::PersistentVolumeClaim>::namespaced(admin.clone(), LEGACY_NS)
        .create(
            &PostParams::default(),
            &object(json!({
                "metadata": {
                    "name": "legacy", "namespace": LEGACY_NS, "labels": labels,
                    "ownerReferences": [{
                        "apiVersion": "lakecache.io/v1alpha1", "kind": "CacheNamespace",
                        "name": "legacy", "uid": uid, "controller": true,
                    }],
                },
                "spec": {
                    "accessModes": ["ReadOnlyMany"],
                    "storageClassName": "",
                    "volumeName": "lakecache-old-legacy",
                    "resources": {"requests": {"storage": "1Pi"}},
                },
            })),
        )
        .await?;
    Ok(())
}
