//! The cluster harness against itself: a real etcd, kube-apiserver, kube-controller-manager and
//! kube-scheduler, checked for the things later tests lean on (objects round-trip, the version is
//! the pinned one, RBAC denies what it should, controllers create and collect pods, the scheduler
//! binds them, PVs bind, namespaces finalize, helm installs).

use std::time::Duration;

use anyhow::{Context, ensure};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{
    ConfigMap, Namespace, PersistentVolume, PersistentVolumeClaim, Pod, Secret, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::Resource;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use lakecache_e2e::cluster::{KUBE_VERSION, client_from_kubeconfig, eventually};
use lakecache_e2e::{Cluster, ClusterOptions};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

fn object<T: DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("a valid object")
}

async fn create<K>(api: &Api<K>, value: Value) -> anyhow::Result<K>
where
    K: Resource + Clone + DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    Ok(api.create(&PostParams::default(), &object(value)).await?)
}

fn is_forbidden<T: std::fmt::Debug>(result: &kube::Result<T>) -> bool {
    matches!(result, Err(kube::Error::Api(status)) if status.code == 403)
}

fn stdout(output: &std::process::Output) -> anyhow::Result<String> {
    ensure!(
        output.status.success(),
        "exit {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout.clone())?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_stores_objects_reports_its_version_and_enforces_rbac() -> anyhow::Result<()> {
    lakecache_e2e::init_logging();
    let cluster = Cluster::start(ClusterOptions::apiserver_only()).await?;
    eprintln!(
        "etcd + kube-apiserver ready in {:.1} s",
        cluster.started_in().as_secs_f64()
    );
    let client = cluster.client().await?;

    // Objects round-trip through the apiserver and etcd.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    create(&namespaces, json!({"metadata": {"name": "team-a"}})).await?;
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), "team-a");
    create(
        &config_maps,
        json!({"metadata": {"name": "settings"}, "data": {"block-size": "4MiB"}}),
    )
    .await?;
    let read = config_maps.get("settings").await?;
    assert_eq!(
        read.data
            .unwrap_or_default()
            .get("block-size")
            .map(String::as_str),
        Some("4MiB")
    );

    // kubectl talks to it with the same kubeconfig, and both sides are the pinned version.
    let version: Value =
        serde_json::from_str(&stdout(&cluster.kubectl(&["version", "-o", "json"]))?)?;
    assert_eq!(
        version["serverVersion"]["gitVersion"], KUBE_VERSION,
        "{version}"
    );
    assert_eq!(
        version["clientVersion"]["gitVersion"], KUBE_VERSION,
        "{version}"
    );
    let via_kubectl = stdout(&cluster.kubectl(&[
        "get",
        "configmap",
        "settings",
        "-n",
        "team-a",
        "-o",
        "jsonpath={.data.block-size}",
    ]))?;
    assert_eq!(via_kubectl, "4MiB");

    // A user holds only what RBAC grants: reading ConfigMaps in team-a, through its group.
    let roles: Api<Role> = Api::namespaced(client.clone(), "team-a");
    create(
        &roles,
        json!({
            "metadata": {"name": "configmap-reader"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}],
        }),
    )
    .await?;
    let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), "team-a");
    create(
        &bindings,
        json!({
            "metadata": {"name": "readers"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "configmap-reader"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "readers"}],
        }),
    )
    .await?;
    let alice =
        client_from_kubeconfig(&cluster.kubeconfig_for_user("alice", &["readers"])?).await?;
    let alice_cms: Api<ConfigMap> = Api::namespaced(alice.clone(), "team-a");
    eventually(
        "alice reads a ConfigMap once her group's binding is seen",
        WAIT,
        || async { Ok(alice_cms.get("settings").await.ok()) },
    )
    .await?;
    let denied = Api::<Secret>::namespaced(alice.clone(), "team-a")
        .list(&ListParams::default())
        .await;
    assert!(is_forbidden(&denied), "alice listed secrets: {denied:?}");
    let denied = alice_cms
        .create(
            &PostParams::default(),
            &object(json!({"metadata": {"name": "by-alice"}})),
        )
        .await;
    assert!(
        is_forbidden(&denied),
        "alice created a ConfigMap: {denied:?}"
    );
    let denied = Api::<ConfigMap>::namespaced(alice.clone(), "default")
        .list(&ListParams::default())
        .await;
    assert!(
        is_forbidden(&denied),
        "alice listed another namespace: {denied:?}"
    );
    // A user in no bound group gets nothing, so the grant above came from the binding.
    let bob = client_from_kubeconfig(&cluster.kubeconfig_for_user("bob", &["others"])?).await?;
    let denied = Api::<ConfigMap>::namespaced(bob, "team-a")
        .get("settings")
        .await;
    assert!(is_forbidden(&denied), "bob read a ConfigMap: {denied:?}");

    // A ServiceAccount's real token: denied until bound, then allowed.
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "team-a");
    create(&accounts, json!({"metadata": {"name": "operator"}})).await?;
    let sa_kubeconfig = cluster
        .kubeconfig_for_service_account("team-a", "operator")
        .await?;
    let sa = client_from_kubeconfig(&sa_kubeconfig).await?;
    let sa_cms: Api<ConfigMap> = Api::namespaced(sa, "team-a");
    let denied = sa_cms.get("settings").await;
    assert!(
        is_forbidden(&denied),
        "an unbound ServiceAccount read: {denied:?}"
    );
    create(
        &bindings,
        json!({
            "metadata": {"name": "operator-reads"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "configmap-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "operator", "namespace": "team-a"}],
        }),
    )
    .await?;
    eventually("the ServiceAccount reads once bound", WAIT, || async {
        Ok(sa_cms.get("settings").await.ok())
    })
    .await?;

    // helm installs a chart into it.
    let chart = cluster.dir().join("chart");
    std::fs::create_dir_all(chart.join("templates"))?;
    std::fs::write(
        chart.join("Chart.yaml"),
        "apiVersion: v2\nname: demo\nversion: 0.1.0\n",
    )?;
    std::fs::write(chart.join("values.yaml"), "greeting: hi\n")?;
    std::fs::write(
        chart.join("templates/configmap.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-config\n\
         data:\n  greeting: {{ .Values.greeting | quote }}\n",
    )?;
    let chart = chart.to_str().context("utf-8 path")?;
    stdout(&cluster.helm(&[
        "install",
        "demo",
        chart,
        "--namespace",
        "team-a",
        "--set",
        "greeting=hello",
    ]))?;
    let installed = config_maps.get("demo-config").await?;
    assert_eq!(
        installed
            .data
            .unwrap_or_default()
            .get("greeting")
            .map(String::as_str),
        Some("hello")
    );
    let releases: Value = serde_json::from_str(&stdout(&cluster.helm(&[
        "list",
        "--namespace",
        "team-a",
        "-o",
        "json",
    ]))?)?;
    assert_eq!(releases[0]["name"], "demo", "{releases}");
    assert_eq!(releases[0]["status"], "deployed", "{releases}");

    // Dropping the cluster stops every process and removes its directory.
    let dir = cluster.dir().to_path_buf();
    let address = cluster.server().trim_start_matches("https://").to_string();
    drop(cluster);
    assert!(!dir.exists(), "{} is still there", dir.display());
    assert!(
        std::net::TcpStream::connect(&address).is_err(),
        "the apiserver still listens on {address}"
    );
    Ok(())
}

#[tokio::test]
async fn a_component_that_cannot_start_fails_the_start_with_its_log() {
    let started = std::time::Instant::now();
    let error = Cluster::start(ClusterOptions {
        apiserver_args: vec!["--no-such-flag=1".into()],
        ..ClusterOptions::apiserver_only()
    })
    .await
    .err()
    .expect("an apiserver with an unknown flag does not start");
    let message = format!("{error:#}");
    assert!(message.contains("kube-apiserver exited"), "{message}");
    assert!(
        message.contains("unknown flag: --no-such-flag"),
        "{message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controllers_create_pods_the_scheduler_binds_and_the_collector_deletes()
-> anyhow::Result<()> {
    lakecache_e2e::init_logging();
    let cluster = Cluster::start(ClusterOptions::full()).await?;
    eprintln!(
        "etcd + kube-apiserver + kube-controller-manager + kube-scheduler ready in {:.1} s",
        cluster.started_in().as_secs_f64()
    );
    let client = cluster.client().await?;
    let node = cluster.add_fake_node("node-a").await?;
    assert!(
        node.spec
            .and_then(|s| s.taints)
            .unwrap_or_default()
            .is_empty()
    );

    let namespaces: Api<Namespace> = Api::all(client.clone());
    create(&namespaces, json!({"metadata": {"name": "jobs"}})).await?;
    // The serviceaccount controller makes `default`, which admission requires of every pod.
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "jobs");
    eventually("the default ServiceAccount", WAIT, || async {
        Ok(accounts.get_opt("default").await?)
    })
    .await?;

    let storage_classes: Api<StorageClass> = Api::all(client.clone());
    create(
        &storage_classes,
        json!({
            "metadata": {"name": "manual"},
            "provisioner": "kubernetes.io/no-provisioner",
            "volumeBindingMode": "Immediate",
        }),
    )
    .await?;
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    for i in 0..2 {
        create(
            &volumes,
            json!({
                "metadata": {"name": format!("pv-{i}")},
                "spec": {
                    "capacity": {"storage": "1Gi"},
                    "accessModes": ["ReadWriteOnce"],
                    "storageClassName": "manual",
                    "persistentVolumeReclaimPolicy": "Retain",
                    "csi": {"driver": lakecache_api::CSI_DRIVER, "volumeHandle": format!("volume-{i}")},
                },
            }),
        )
        .await?;
    }

    let pod_template = |app: &str| {
        json!({
            "metadata": {"labels": {"app": app}},
            "spec": {
                "containers": [{"name": "main", "image": "registry.invalid/never-pulled:1"}],
                "terminationGracePeriodSeconds": 30,
            },
        })
    };
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "jobs");
    create(
        &deployments,
        json!({
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "web"}},
                "template": pod_template("web"),
            },
        }),
    )
    .await?;
    let mut db_template = pod_template("db");
    db_template["spec"]["containers"][0]["volumeMounts"] =
        json!([{"name": "data", "mountPath": "/data"}]);
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), "jobs");
    create(
        &statefulsets,
        json!({
            "metadata": {"name": "db"},
            "spec": {
                "replicas": 2,
                "podManagementPolicy": "Parallel",
                "serviceName": "db",
                "selector": {"matchLabels": {"app": "db"}},
                "template": db_template,
                "volumeClaimTemplates": [{
                    "metadata": {"name": "data"},
                    "spec": {
                        "accessModes": ["ReadWriteOnce"],
                        "storageClassName": "manual",
                        "resources": {"requests": {"storage": "1Gi"}},
                    },
                }],
            },
        }),
    )
    .await?;

    // Controllers create the pods (Deployment → ReplicaSet → Pods; StatefulSet → PVCs + Pods),
    // the PV binder binds the claims, and the scheduler binds every pod to the one node.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "jobs");
    for app in ["web", "db"] {
        let placed = eventually(&format!("2 {app} pods bound to node-a"), WAIT, || async {
            let list = pods
                .list(&ListParams::default().labels(&format!("app={app}")))
                .await?;
            let nodes: Vec<Option<String>> = list
                .items
                .iter()
                .map(|p| p.spec.as_ref().and_then(|s| s.node_name.clone()))
                .collect();
            let bound = nodes.len() == 2 && nodes.iter().all(|n| n.as_deref() == Some("node-a"));
            Ok(bound.then_some(list.items))
        })
        .await?;
        assert_eq!(placed.len(), 2);
    }
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "jobs");
    for i in 0..2 {
        let claim = claims.get(&format!("data-db-{i}")).await?;
        assert_eq!(
            claim.status.and_then(|s| s.phase).as_deref(),
            Some("Bound"),
            "claim data-db-{i}"
        );
    }

    // Deleting the Deployment leaves its ReplicaSet and pods to the garbage collector. Pods on
    // a node wait for their kubelet to confirm, so "collected" means deleted or terminating.
    let replicasets: Api<ReplicaSet> = Api::namespaced(client.clone(), "jobs");
    let owned = replicasets
        .list(&ListParams::default().labels("app=web"))
        .await?;
    assert_eq!(owned.items.len(), 1, "one ReplicaSet for web");
    deployments.delete("web", &DeleteParams::default()).await?;
    eventually("web's ReplicaSet and pods collected", WAIT, || async {
        let sets = replicasets
            .list(&ListParams::default().labels("app=web"))
            .await?;
        let left = pods.list(&ListParams::default().labels("app=web")).await?;
        let collected = sets.items.is_empty()
            && left
                .items
                .iter()
                .all(|p| p.metadata.deletion_timestamp.is_some());
        Ok(collected.then_some(()))
    })
    .await?;

    // Deleting the namespace empties it through the namespace controller; acting as the
    // missing kubelet, force-delete pods once they are terminating.
    namespaces.delete("jobs", &DeleteParams::default()).await?;
    let force = DeleteParams::default().grace_period(0);
    eventually(
        "namespace jobs finalized",
        Duration::from_secs(90),
        || async {
            for pod in pods.list(&ListParams::default()).await?.items {
                if pod.metadata.deletion_timestamp.is_some()
                    && let Some(name) = pod.metadata.name.as_deref()
                {
                    let _ = pods.delete(name, &force).await;
                }
            }
            Ok(namespaces.get_opt("jobs").await?.is_none().then_some(()))
        },
    )
    .await?;
    // The claims are gone with it and their volumes, Retain, are Released.
    for i in 0..2 {
        let name = format!("pv-{i}");
        eventually(&format!("{name} Released"), WAIT, || async {
            let phase = volumes.get(&name).await?.status.and_then(|s| s.phase);
            Ok((phase.as_deref() == Some("Released")).then_some(()))
        })
        .await?;
    }
    Ok(())
}
