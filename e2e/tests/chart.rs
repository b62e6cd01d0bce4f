//! The Helm chart (`charts/lakecache`) and the examples (`examples/`) against a real
//! kube-apiserver with etcd (no kubelet, so nothing runs: what is checked is what the API server
//! accepts and what RBAC grants).
//!
//! - `helm lint --strict` passes, with the default values and with changed ones.
//! - The rendered chart (CRDs included) is accepted by `kubectl apply --server-side`; the
//!   operator Deployment, the CSI node DaemonSet (three containers, Bidirectional propagation of
//!   kubelet's directory), the CSIDriver and the RBAC objects are there as the code expects them;
//!   changed values (another kubelet directory, more replicas, an image tag, the metrics Service,
//!   the allowed host path roots, no NetworkPolicies) change what the server stores. The
//!   operator is told to make NetworkPolicies whose peers are exactly the chart's CSI node and
//!   operator pods, the init image it runs as root is the chart's image, and the CSIDriver asks
//!   kubelet to republish volumes (so a new token reaches mounted ones).
//! - The CSI node DaemonSet is upgraded in place: its updateStrategy is OnDelete, and the roll
//!   hook (a post-upgrade Job running `lakecache-csi-node roll` from the chart's image, with its
//!   own ServiceAccount) is there unless `csi.roll.enabled=false` or RollingUpdate. The plugin's
//!   memory limit is the mounter's, since it hosts the FUSE servers while the mounter is away.
//! - RBAC is least privilege: the operator's ServiceAccount can do what the operator does (apply
//!   children, create PersistentVolumes, read Secrets by name, hold its Lease) and nothing like
//!   listing Secrets or deleting Nodes; the CSI ServiceAccount can follow CacheNamespaces exactly
//!   as the FUSE servers do (a get, then a watch by name, with a real token) and read no Secret;
//!   the roll's ServiceAccount makes the roll's calls (read the DaemonSet, list its pods, set a
//!   container's image with a JSON patch guarded by a test of the container's name) in the
//!   release namespace only, and can neither delete pods nor read Secrets.
//! - Every example is accepted by the API server, whose CEL rules in our CRDs run here (after the
//!   CRDs and test copies of the Kubeflow CRDs are installed), and broken variants are refused.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolume, Pod, Secret};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use kube::runtime::{WatchStreamExt, watcher};
use lakecache_e2e::cluster::{HELM_ENV, client_from_kubeconfig, eventually};
use lakecache_e2e::{Cluster, ClusterOptions};
use serde_json::{Value, json};

const NS: &str = "lakecache-system";
const RELEASE: &str = "lakecache";
const OPERATOR_SA: &str = "lakecache-operator";
const CSI_SA: &str = "lakecache-csi-node";
/// The roll hook's Job and its ServiceAccount.
const ROLL: &str = "lakecache-csi-roll";
const IMAGE: &str = "ghcr.io/lakecache/lakecache:0.1.0";
const WAIT: Duration = Duration::from_secs(60);
const COMMAND_LIMIT: Duration = Duration::from_secs(120);

fn repo() -> PathBuf {
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo"))
        .parent()
        .expect("e2e/ is in the workspace")
        .to_path_buf()
}

fn chart() -> String {
    repo().join("charts/lakecache").display().to_string()
}

/// Runs `cmd` to completion, killing it (and failing) after `limit`.
fn run_bounded(cmd: &mut Command, limit: Duration) -> anyhow::Result<Output> {
    lakecache_e2e::cluster::output_within(cmd, None, limit)
}

/// `kubectl apply --server-side --dry-run=server --validate=strict` of `manifests`: the objects
/// as the API server would store them.
fn dry_run(cluster: &Cluster, what: &str, manifests: &str) -> anyhow::Result<Vec<Value>> {
    let dry = ok(
        what,
        cluster.kubectl_with_stdin(
            &[
                "apply",
                "--server-side",
                "--dry-run=server",
                "--validate=strict",
                "-o",
                "json",
                "-f",
                "-",
            ],
            Some(manifests),
        ),
    )?;
    objects(&dry)
}

/// `helm ARGS` without a cluster, with helm's homes in `home`.
fn helm(home: &Path, args: &[&str]) -> anyhow::Result<Output> {
    let bin = std::env::var_os(HELM_ENV).with_context(|| {
        format!("{HELM_ENV} is not set: run `eval \"$(scripts/setup --env)\"` first")
    })?;
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"));
    run_bounded(&mut cmd, COMMAND_LIMIT)
}

/// The output's stdout, or an error with its stderr when it failed.
fn ok(what: &str, output: Output) -> anyhow::Result<String> {
    ensure!(
        output.status.success(),
        "{what}: exit {}\nstderr: {}\nstdout: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// `helm template` of the chart into `lakecache-system` with `extra` arguments.
fn render(home: &Path, extra: &[&str]) -> anyhow::Result<String> {
    let chart = chart();
    let mut args = vec!["template", RELEASE, chart.as_str(), "--namespace", NS];
    args.extend_from_slice(extra);
    ok("helm template", helm(home, &args)?)
}

/// The objects of kubectl's `-o json` output: one object, or the items of a List.
fn objects(json_text: &str) -> anyhow::Result<Vec<Value>> {
    let v: Value = serde_json::from_str(json_text).context("kubectl's JSON")?;
    Ok(match v["kind"].as_str() {
        Some("List") => v["items"].as_array().cloned().unwrap_or_default(),
        _ => vec![v],
    })
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> anyhow::Result<&'a Value> {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .with_context(|| format!("no {kind} {name} among {} objects", objs.len()))
}

/// `kubectl get KIND NAME [-n NS] -o json`.
fn get(cluster: &Cluster, kind: &str, name: &str, ns: Option<&str>) -> anyhow::Result<Value> {
    let mut args = vec!["get", kind, name, "-o", "json"];
    if let Some(ns) = ns {
        args.extend(["-n", ns]);
    }
    let text = ok(
        &format!("kubectl get {kind} {name}"),
        cluster.kubectl(&args),
    )?;
    Ok(serde_json::from_str(&text)?)
}

fn container<'a>(pod_spec: &'a Value, name: &str) -> anyhow::Result<&'a Value> {
    pod_spec["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .with_context(|| format!("no container {name}"))
}

fn env_value<'a>(c: &'a Value, name: &str) -> Option<&'a Value> {
    c["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
        .map(|e| e.get("value").unwrap_or(&e["valueFrom"]))
}

fn mount<'a>(c: &'a Value, volume: &str) -> anyhow::Result<&'a Value> {
    c["volumeMounts"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == volume))
        .with_context(|| format!("container {} does not mount {volume}", c["name"]))
}

fn host_path<'a>(pod_spec: &'a Value, volume: &str) -> anyhow::Result<&'a Value> {
    pod_spec["volumes"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["name"] == volume))
        .map(|v| &v["hostPath"])
        .with_context(|| format!("no volume {volume}"))
}

#[test]
fn chart_lints_with_default_and_changed_values() -> anyhow::Result<()> {
    let home = tempfile::tempdir()?;
    let chart = chart();
    let started = Instant::now();
    for extra in [
        &[][..],
        &[
            "--set",
            "csi.kubeletDir=/data/kubelet,operator.replicas=1,operator.metrics.service.enabled=true",
            "--set",
            "operator.logLevel=debug,csi.logLevel=debug,image.tag=dev",
            "--set",
            "networkPolicy.enabled=false,workers.allowedHostPathRoots={},workers.initImage=x/y:1",
            "--set",
            "csi.roll.containerTimeout=90s",
        ][..],
        &["--set", "csi.roll.enabled=false"][..],
        &["--set", "csi.updateStrategy.type=RollingUpdate"][..],
    ] {
        let mut args = vec!["lint", "--strict", chart.as_str()];
        args.extend_from_slice(extra);
        let out = ok("helm lint", helm(home.path(), &args)?)?;
        assert!(
            out.contains("1 chart(s) linted, 0 chart(s) failed"),
            "helm lint {extra:?}: {out}"
        );
    }
    // A broken chart fails the same lint, so the check above can fail.
    let broken = home.path().join("broken");
    std::fs::create_dir_all(broken.join("templates"))?;
    std::fs::write(
        broken.join("Chart.yaml"),
        "apiVersion: v2\nname: broken\nversion: 0.1.0\n",
    )?;
    std::fs::write(
        broken.join("templates/cm.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Values.missing.name }}\n",
    )?;
    let out = helm(
        home.path(),
        &["lint", "--strict", broken.to_str().context("utf-8")?],
    )?;
    assert!(!out.status.success(), "a broken chart linted clean");
    eprintln!(
        "helm lint: 5 runs in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_installs_with_least_privilege_rbac() -> anyhow::Result<()> {
    lakecache_e2e::init_logging();
    let cluster = Cluster::start(ClusterOptions::apiserver_only()).await?;
    eprintln!(
        "etcd + kube-apiserver ready in {:.1} s",
        cluster.started_in().as_secs_f64()
    );
    let started = Instant::now();
    let home = cluster.dir().join("helm-home");

    // The whole chart, CRDs first, through server-side apply.
    ok(
        "create namespace",
        cluster.kubectl(&["create", "namespace", NS]),
    )?;
    let manifests = render(&home, &["--include-crds"])?;
    let applied = ok(
        "kubectl apply the chart",
        cluster.kubectl_with_stdin(
            &["apply", "--server-side", "--validate=strict", "-f", "-"],
            Some(&manifests),
        ),
    )?;
    for expected in [
        "customresourcedefinition.apiextensions.k8s.io/cachenamespaces.lakecache.io serverside-applied",
        "customresourcedefinition.apiextensions.k8s.io/cachepreloads.lakecache.io serverside-applied",
        "deployment.apps/lakecache-operator serverside-applied",
        "daemonset.apps/lakecache-csi-node serverside-applied",
        "csidriver.storage.k8s.io/csi.lakecache.io serverside-applied",
        "job.batch/lakecache-csi-roll serverside-applied",
        "serviceaccount/lakecache-csi-roll serverside-applied",
        "role.rbac.authorization.k8s.io/lakecache-csi-roll serverside-applied",
        "rolebinding.rbac.authorization.k8s.io/lakecache-csi-roll serverside-applied",
    ] {
        assert!(applied.contains(expected), "{expected} not in:\n{applied}");
    }
    let kinds = applied.lines().count();
    eprintln!("chart applied: {kinds} objects");

    // The operator's Deployment.
    let deploy = get(&cluster, "deployment", OPERATOR_SA, Some(NS))?;
    assert_eq!(deploy["spec"]["replicas"], 2);
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], OPERATOR_SA);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let op = container(pod, "operator")?;
    assert_eq!(op["command"], json!(["lakecache-operator"]));
    assert_eq!(op["image"], "ghcr.io/lakecache/lakecache:0.1.0");
    assert_eq!(
        env_value(op, "LAKECACHE_WORKER_IMAGE"),
        Some(&json!("ghcr.io/lakecache/lakecache:0.1.0"))
    );
    assert_eq!(
        env_value(op, "POD_NAME").map(|v| &v["fieldRef"]["fieldPath"]),
        Some(&json!("metadata.name"))
    );
    assert_eq!(
        env_value(op, "POD_NAMESPACE").map(|v| &v["fieldRef"]["fieldPath"]),
        Some(&json!("metadata.namespace"))
    );
    for var in [
        "LAKECACHE_RESYNC",
        "LAKECACHE_SOURCE_SCAN_INTERVAL",
        "LAKECACHE_ADMIN_LISTEN",
    ] {
        assert!(env_value(op, var).is_some(), "operator env lacks {var}");
    }
    assert_eq!(env_value(op, "LAKECACHE_LOG_FORMAT"), Some(&json!("json")));
    // The root init container of a host-path Disk tier runs the chart's image; no host path
    // unless the admin lists roots; NetworkPolicies on, admitting the release's own pods.
    assert_eq!(
        env_value(op, "LAKECACHE_WORKER_INIT_IMAGE"),
        Some(&json!("ghcr.io/lakecache/lakecache:0.1.0"))
    );
    // Empty: the API server keeps the variable without a value.
    let roots = env_value(op, "LAKECACHE_ALLOWED_HOST_PATH_ROOTS");
    assert!(
        roots.is_some_and(|v| v.is_null() || *v == json!("")),
        "{roots:?}"
    );
    let retired = env_value(op, "LAKECACHE_RETIRED_HOST_PATH_ROOTS");
    assert!(
        retired.is_some_and(|v| v.is_null() || *v == json!("")),
        "{retired:?}"
    );
    assert_eq!(
        env_value(op, "LAKECACHE_NETWORK_POLICY"),
        Some(&json!("true"))
    );
    assert_eq!(
        env_value(op, "LAKECACHE_NETWORK_POLICY_NAMESPACE"),
        Some(&json!(NS))
    );
    let peer_labels = env_value(op, "LAKECACHE_NETWORK_POLICY_PEER_LABELS")
        .and_then(Value::as_str)
        .context("no LAKECACHE_NETWORK_POLICY_PEER_LABELS")?
        .to_string();
    let peer_components = env_value(op, "LAKECACHE_NETWORK_POLICY_PEER_COMPONENTS")
        .and_then(Value::as_str)
        .context("no LAKECACHE_NETWORK_POLICY_PEER_COMPONENTS")?
        .to_string();
    let operator_pod_labels = deploy["spec"]["template"]["metadata"]["labels"].clone();
    assert_eq!(
        op["ports"],
        json!([{"name": "metrics", "containerPort": 9820, "protocol": "TCP"}])
    );
    assert_eq!(op["livenessProbe"]["httpGet"]["path"], "/livez");
    assert_eq!(op["readinessProbe"]["httpGet"]["path"], "/readyz");
    let sc = &op["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    // No metrics Service unless asked for.
    let svc = cluster.kubectl(&["get", "service", "-n", NS, "-o", "name"]);
    assert_eq!(ok("get services", svc)?.trim(), "");

    // The CSI node plugin's DaemonSet.
    let ds = get(&cluster, "daemonset", CSI_SA, Some(NS))?;
    let pod = &ds["spec"]["template"]["spec"];
    let names: Vec<&str> = pod["containers"]
        .as_array()
        .context("containers")?
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, ["node-driver-registrar", "csi-plugin", "mounter"]);
    // The registrar is lakecache's own by default, the upstream one on request.
    check_builtin_registrar(
        container(pod, "node-driver-registrar")?,
        "ghcr.io/lakecache/lakecache:0.1.0",
    );
    check_upstream_registrar(&cluster, &home)?;
    assert_eq!(pod["serviceAccountName"], CSI_SA);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["tolerations"], json!([{"operator": "Exists"}]));
    check_kubelet_dir(pod, "/var/lib/kubelet")?;
    let plugin = container(pod, "csi-plugin")?;
    assert_eq!(plugin["command"], json!(["lakecache-csi-node", "plugin"]));
    assert_eq!(
        env_value(plugin, "NODE_NAME").map(|v| &v["fieldRef"]["fieldPath"]),
        Some(&json!("spec.nodeName"))
    );
    assert_eq!(
        env_value(plugin, "CSI_ENDPOINT"),
        Some(&json!("unix:///csi/csi.sock"))
    );
    assert_eq!(
        env_value(plugin, "LAKECACHE_ADMIN_LISTEN"),
        Some(&json!("0.0.0.0:9810"))
    );
    for var in [
        "LAKECACHE_REPAIR_INTERVAL",
        "LAKECACHE_PREFETCH_BUDGET",
        "LAKECACHE_FUSE_THREADS",
    ] {
        assert!(env_value(plugin, var).is_some(), "plugin env lacks {var}");
    }
    assert_eq!(plugin["livenessProbe"]["httpGet"]["path"], "/livez");
    assert_eq!(plugin["livenessProbe"]["httpGet"]["port"], "admin");
    assert_eq!(mount(plugin, "plugin-dir")?["mountPath"], "/csi");
    let mounter = container(pod, "mounter")?;
    assert_eq!(mounter["command"], json!(["lakecache-csi-node", "mounter"]));
    assert_eq!(host_path(pod, "fuse-device")?["type"], "CharDevice");
    assert_eq!(host_path(pod, "plugin-dir")?["type"], "DirectoryOrCreate");
    assert_eq!(host_path(pod, "kubelet-dir")?["type"], "Directory");
    // Upgraded in place, by the roll hook: the DaemonSet controller deletes no pod.
    assert_eq!(ds["spec"]["updateStrategy"], json!({"type": "OnDelete"}));
    // The plugin hosts the FUSE servers while the mounter is away: the same memory limit.
    assert_eq!(plugin["resources"]["limits"]["memory"], "4Gi");
    assert_eq!(
        plugin["resources"]["limits"]["memory"],
        mounter["resources"]["limits"]["memory"]
    );
    assert_eq!(plugin["resources"]["requests"]["memory"], "32Mi");
    let job = get(&cluster, "job", ROLL, Some(NS))?;
    check_roll_job(&job, IMAGE, "5m", 100 * (3 * 300 + 60));
    // A Job's pod template cannot change: Helm deletes the hook's Job before it makes the next
    // one (before-hook-creation), and so does this test before its dry runs with other values.
    ok(
        "delete the roll Job",
        cluster.kubectl(&["delete", "job", ROLL, "-n", NS]),
    )?;
    check_roll_switches(&cluster, &home)?;

    // The NetworkPolicy the operator makes per CacheNamespace admits pods with these labels and
    // components in the release namespace: exactly the CSI node and operator pods, so their
    // FUSE servers and status calls reach the workers.
    let csi_pod_labels = &ds["spec"]["template"]["metadata"]["labels"];
    for labels in [&operator_pod_labels, csi_pod_labels] {
        for kv in peer_labels.split(',') {
            let (k, v) = kv.split_once('=').context("peer label k=v")?;
            assert_eq!(labels[k], json!(v), "{k} in {labels}");
        }
        let component = labels["app.kubernetes.io/component"]
            .as_str()
            .context("component label")?;
        assert!(
            peer_components.split(',').any(|c| c == component),
            "{component} not among {peer_components}"
        );
    }

    // The CSIDriver, as kubelet will read it.
    let driver = get(&cluster, "csidriver", "csi.lakecache.io", None)?;
    let spec = &driver["spec"];
    assert_eq!(spec["attachRequired"], false);
    assert_eq!(spec["podInfoOnMount"], true);
    assert_eq!(
        spec["volumeLifecycleModes"],
        json!(["Persistent", "Ephemeral"])
    );
    assert_eq!(spec["fsGroupPolicy"], "None");
    assert_eq!(spec["requiresRepublish"], true);

    // The RBAC objects and the accounts they bind.
    for (kind, name, ns) in [
        ("clusterrole", OPERATOR_SA, None),
        ("clusterrolebinding", OPERATOR_SA, None),
        ("clusterrole", CSI_SA, None),
        ("clusterrolebinding", CSI_SA, None),
        ("role", "lakecache-operator-leader-election", Some(NS)),
        (
            "rolebinding",
            "lakecache-operator-leader-election",
            Some(NS),
        ),
        ("role", "lakecache-operator-disk-cleanup", Some(NS)),
        ("rolebinding", "lakecache-operator-disk-cleanup", Some(NS)),
        ("serviceaccount", OPERATOR_SA, Some(NS)),
        ("serviceaccount", CSI_SA, Some(NS)),
        ("serviceaccount", ROLL, Some(NS)),
        ("role", ROLL, Some(NS)),
        ("rolebinding", ROLL, Some(NS)),
    ] {
        get(&cluster, kind, name, ns)?;
    }
    let csi_role = get(&cluster, "clusterrole", CSI_SA, None)?;
    assert_eq!(
        csi_role["rules"],
        json!([{"apiGroups": ["lakecache.io"], "resources": ["cachenamespaces"], "verbs": ["get", "list", "watch"]}])
    );

    // The roll's rights, whole: nothing beyond the release namespace's pods and this DaemonSet.
    let roll_role = get(&cluster, "role", ROLL, Some(NS))?;
    assert_eq!(
        roll_role["rules"],
        json!([
            {"apiGroups": ["apps"], "resources": ["daemonsets"], "resourceNames": [CSI_SA], "verbs": ["get"]},
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "patch"]},
        ])
    );

    check_rbac(&cluster).await?;
    check_roll_rights(&cluster).await?;
    check_values_change_what_is_stored(&cluster, &home)?;
    eprintln!("chart checks took {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// The builtin registrar (`csi.registrar.mode=builtin`, the default): `lakecache-csi-node
/// registrar` from the lakecache image, its admin port probed, root without capabilities.
fn check_builtin_registrar(r: &Value, image: &str) {
    assert_eq!(r["image"], image);
    assert_eq!(r["command"], json!(["lakecache-csi-node", "registrar"]));
    assert!(r["args"].is_null(), "builtin registrar args {}", r["args"]);
    assert_eq!(
        env_value(r, "LAKECACHE_ADMIN_LISTEN"),
        Some(&json!("0.0.0.0:9809"))
    );
    assert_eq!(env_value(r, "LAKECACHE_CSI_TIMEOUT"), Some(&json!("60s")));
    assert_eq!(env_value(r, "LAKECACHE_LOG_FORMAT"), Some(&json!("json")));
    assert_eq!(
        r["ports"],
        json!([{"name": "registrar", "containerPort": 9809, "protocol": "TCP"}])
    );
    assert_eq!(r["livenessProbe"]["httpGet"]["path"], "/livez");
    assert_eq!(r["livenessProbe"]["httpGet"]["port"], "registrar");
    let sc = &r["securityContext"];
    assert!(sc["privileged"].is_null(), "the registrar is privileged");
    assert_eq!(sc["runAsUser"], 0);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
}

/// `csi.registrar.mode=upstream` renders the upstream node-driver-registrar, which the API
/// server accepts; a mode that is neither fails to render.
fn check_upstream_registrar(cluster: &Cluster, home: &Path) -> anyhow::Result<()> {
    let manifests = render(home, &["--set", "csi.registrar.mode=upstream"])?;
    let objs = dry_run(
        cluster,
        "kubectl apply --dry-run=server (upstream registrar)",
        &manifests,
    )?;
    let pod = &find(&objs, "DaemonSet", CSI_SA)?["spec"]["template"]["spec"];
    let r = container(pod, "node-driver-registrar")?;
    assert_eq!(
        r["image"],
        "registry.k8s.io/sig-storage/csi-node-driver-registrar:v2.13.0"
    );
    assert!(r["command"].is_null(), "upstream command {}", r["command"]);
    assert!(
        r["args"]
            .as_array()
            .context("upstream args")?
            .contains(&json!("--http-endpoint=0.0.0.0:9809")),
        "{}",
        r["args"]
    );
    assert_eq!(r["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(r["securityContext"]["readOnlyRootFilesystem"], true);
    check_kubelet_dir(pod, "/var/lib/kubelet")?;

    let chart = chart();
    let bad = helm(
        home,
        &[
            "template",
            RELEASE,
            chart.as_str(),
            "--set",
            "csi.registrar.mode=sidecar",
        ],
    )?;
    assert!(!bad.status.success(), "mode=sidecar rendered");
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("csi.registrar.mode must be builtin or upstream, not \"sidecar\""),
        "{err}"
    );
    Ok(())
}

/// The DaemonSet pod mounts kubelet's directory `dir` where the code expects it.
fn check_kubelet_dir(pod: &Value, dir: &str) -> anyhow::Result<()> {
    let plugin_dir = format!("{dir}/plugins/csi.lakecache.io");
    let registrar = container(pod, "node-driver-registrar")?;
    let host_socket = format!("{plugin_dir}/csi.sock");
    if registrar["command"] == json!(["lakecache-csi-node", "registrar"]) {
        for (var, value) in [
            ("LAKECACHE_CSI_ADDRESS", "/csi/csi.sock"),
            ("LAKECACHE_KUBELET_REGISTRATION_PATH", host_socket.as_str()),
            ("LAKECACHE_REGISTRATION_DIR", "/registration"),
        ] {
            assert_eq!(env_value(registrar, var), Some(&json!(value)), "{var}");
        }
    } else {
        let args = registrar["args"].as_array().context("registrar args")?;
        for arg in [
            "--csi-address=/csi/csi.sock".to_string(),
            format!("--kubelet-registration-path={host_socket}"),
        ] {
            assert!(
                args.contains(&json!(arg)),
                "registrar args {args:?} lack {arg}"
            );
        }
    }
    assert_eq!(
        mount(registrar, "registration-dir")?["mountPath"],
        "/registration"
    );
    assert_eq!(host_path(pod, "plugin-dir")?["path"], plugin_dir);
    assert_eq!(
        host_path(pod, "registration-dir")?["path"],
        format!("{dir}/plugins_registry")
    );
    assert_eq!(host_path(pod, "kubelet-dir")?["path"], dir);
    // The state directory (tokens, the mounter's socket) is not in the plugin directory, which
    // the registrar mounts too.
    let state = json!(format!("{dir}/plugins/csi.lakecache.io-state"));
    let under_plugin_dir = format!("{plugin_dir}/");
    assert!(!state.as_str().unwrap().starts_with(&under_plugin_dir));
    for name in ["csi-plugin", "mounter"] {
        let c = container(pod, name)?;
        let m = mount(c, "kubelet-dir")?;
        assert_eq!(m["mountPath"], dir, "{name}");
        assert_eq!(m["mountPropagation"], "Bidirectional", "{name}");
        assert_eq!(mount(c, "fuse-device")?["mountPath"], "/dev/fuse", "{name}");
        assert_eq!(c["securityContext"]["privileged"], true, "{name}");
        assert_eq!(c["securityContext"]["runAsUser"], 0, "{name}");
        // The plugin and the mounter meet on the mounter's socket in the state directory.
        assert_eq!(env_value(c, "LAKECACHE_STATE_DIR"), Some(&state), "{name}");
    }
    // The plugin knows the mounter's memory limit, which every FUSE server shares.
    let mounter = container(pod, "mounter")?;
    assert_eq!(mounter["resources"]["limits"]["memory"], "4Gi");
    let plugin = container(pod, "csi-plugin")?;
    let limit = env_value(plugin, "LAKECACHE_MOUNTER_MEMORY_LIMIT");
    let want = json!({"containerName": "mounter", "resource": "limits.memory", "divisor": "1"});
    assert_eq!(limit.map(|v| &v["resourceFieldRef"]), Some(&want));
    assert_eq!(
        env_value(plugin, "LAKECACHE_MAX_PREFETCH_BUDGET"),
        Some(&json!("1GiB"))
    );
    Ok(())
}

/// `kubectl auth can-i VERB RESOURCE ARGS --as=system:serviceaccount:NS:SA`: "yes" or "no".
fn can_i(cluster: &Cluster, sa: &str, check: &str) -> anyhow::Result<bool> {
    let user = format!("--as=system:serviceaccount:{NS}:{sa}");
    let mut args = vec!["auth", "can-i", user.as_str()];
    args.extend(check.split_whitespace());
    let out = cluster.kubectl(&args);
    match String::from_utf8_lossy(&out.stdout).trim() {
        "yes" => Ok(true),
        s if s.starts_with("no") => Ok(false),
        s => bail!(
            "kubectl auth can-i {check:?}: {s:?} ({})",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

async fn check_rbac(cluster: &Cluster) -> anyhow::Result<()> {
    // (account, `kubectl auth can-i` arguments)
    let allowed = [
        (OPERATOR_SA, "watch cachenamespaces.lakecache.io -A"),
        (OPERATOR_SA, "patch cachenamespaces.lakecache.io -n ml"),
        (
            OPERATOR_SA,
            "patch cachenamespaces.lakecache.io --subresource=status -n ml",
        ),
        (
            OPERATOR_SA,
            "update cachenamespaces.lakecache.io --subresource=finalizers -n ml",
        ),
        (
            OPERATOR_SA,
            "patch cachepreloads.lakecache.io --subresource=status -n ml",
        ),
        (OPERATOR_SA, "list cachepreloads.lakecache.io -A"),
        (OPERATOR_SA, "patch statefulsets.apps -n ml"),
        (OPERATOR_SA, "create statefulsets.apps -n ml"),
        (OPERATOR_SA, "delete statefulsets.apps -n ml"),
        (OPERATOR_SA, "watch statefulsets.apps -A"),
        (OPERATOR_SA, "patch services -n ml"),
        (OPERATOR_SA, "watch configmaps -A"),
        (OPERATOR_SA, "create persistentvolumeclaims -n ml"),
        (OPERATOR_SA, "create persistentvolumes"),
        (OPERATOR_SA, "patch persistentvolumes"),
        (OPERATOR_SA, "delete persistentvolumes"),
        (OPERATOR_SA, "get secrets -n ml"),
        (OPERATOR_SA, "create secrets -n ml"),
        (OPERATOR_SA, "patch secrets -n ml"),
        (OPERATOR_SA, "list pods -A"),
        (OPERATOR_SA, "create poddisruptionbudgets.policy -n ml"),
        (OPERATOR_SA, "create events.events.k8s.io -n ml"),
        (OPERATOR_SA, "create events -n ml"),
        (
            OPERATOR_SA,
            "create leases.coordination.k8s.io -n lakecache-system",
        ),
        (
            OPERATOR_SA,
            "patch leases.coordination.k8s.io -n lakecache-system",
        ),
        (
            OPERATOR_SA,
            "create networkpolicies.networking.k8s.io -n ml",
        ),
        (OPERATOR_SA, "patch networkpolicies.networking.k8s.io -n ml"),
        (OPERATOR_SA, "watch networkpolicies.networking.k8s.io -A"),
        (OPERATOR_SA, "get nodes"),
        (OPERATOR_SA, "create pods -n lakecache-system"),
        (OPERATOR_SA, "delete pods -n lakecache-system"),
        (CSI_SA, "get cachenamespaces.lakecache.io -n ml"),
        (CSI_SA, "list cachenamespaces.lakecache.io -A"),
        (CSI_SA, "watch cachenamespaces.lakecache.io -A"),
        (
            ROLL,
            "get daemonsets.apps/lakecache-csi-node -n lakecache-system",
        ),
        (ROLL, "list pods -n lakecache-system"),
        (ROLL, "get pods -n lakecache-system"),
        (ROLL, "patch pods -n lakecache-system"),
    ];
    let denied = [
        (OPERATOR_SA, "list secrets -n ml"),
        (OPERATOR_SA, "watch secrets -A"),
        (OPERATOR_SA, "list persistentvolumes"),
        (OPERATOR_SA, "delete nodes"),
        (OPERATOR_SA, "create pods -n ml"),
        (OPERATOR_SA, "delete pods -n ml"),
        (OPERATOR_SA, "create cachenamespaces.lakecache.io -n ml"),
        (OPERATOR_SA, "delete cachenamespaces.lakecache.io -n ml"),
        (OPERATOR_SA, "create leases.coordination.k8s.io -n ml"),
        (OPERATOR_SA, "create clusterroles.rbac.authorization.k8s.io"),
        (OPERATOR_SA, "create deployments.apps -n ml"),
        (
            OPERATOR_SA,
            "delete networkpolicies.networking.k8s.io -n ml",
        ),
        (
            OPERATOR_SA,
            "create pods --subresource=exec -n lakecache-system",
        ),
        (CSI_SA, "get secrets -n ml"),
        (CSI_SA, "list secrets -A"),
        (CSI_SA, "patch cachenamespaces.lakecache.io -n ml"),
        (
            CSI_SA,
            "patch cachenamespaces.lakecache.io --subresource=status -n ml",
        ),
        (OPERATOR_SA, "list nodes"),
        (OPERATOR_SA, "patch nodes"),
        (CSI_SA, "list cachepreloads.lakecache.io -A"),
        (CSI_SA, "list pods -A"),
        (CSI_SA, "create persistentvolumes"),
        (ROLL, "patch pods -n ml"),
        (ROLL, "list pods -A"),
        (ROLL, "delete pods -n lakecache-system"),
        (ROLL, "create pods -n lakecache-system"),
        (ROLL, "create pods --subresource=exec -n lakecache-system"),
        (ROLL, "get secrets -n lakecache-system"),
        (ROLL, "get daemonsets.apps/another -n lakecache-system"),
        (
            ROLL,
            "patch daemonsets.apps/lakecache-csi-node -n lakecache-system",
        ),
        (ROLL, "get daemonsets.apps -n ml"),
    ];
    // RBAC reaches the authorizer through its informers: wait until every grant is seen, so a
    // "no" below is the rules' answer, not a binding not yet seen.
    eventually("every grant of the chart is in force", WAIT, || async {
        for (sa, check) in allowed.iter() {
            if !can_i(cluster, sa, check)? {
                bail!("{sa} cannot {check:?}");
            }
        }
        Ok(Some(()))
    })
    .await?;
    for (sa, check) in denied.iter() {
        assert!(!can_i(cluster, sa, check)?, "{sa} can {check:?}");
    }

    // With real tokens, as the pods will run: the FUSE servers' exact calls (a get, then a watch
    // of one CacheNamespace by name) work for the CSI account, and no Secret is readable.
    ok(
        "create namespace ml",
        cluster.kubectl(&["create", "namespace", "ml"]),
    )?;
    let cn = json!({
        "apiVersion": "lakecache.io/v1alpha1",
        "kind": "CacheNamespace",
        "metadata": {"name": "imagenet", "namespace": "ml"},
        "spec": {"source": {"uri": "s3://datasets/imagenet"}, "tiers": [{"kind": "Memory", "size": "1Gi"}]},
    });
    ok(
        "create a CacheNamespace",
        cluster.kubectl_with_stdin(&["create", "-f", "-"], Some(&cn.to_string())),
    )?;
    ok(
        "create a Secret",
        cluster.kubectl(&[
            "create",
            "secret",
            "generic",
            "imagenet-token",
            "-n",
            "ml",
            "--from-literal=token=t",
        ]),
    )?;
    let csi =
        client_from_kubeconfig(&cluster.kubeconfig_for_service_account(NS, CSI_SA).await?).await?;
    let gvk = GroupVersionKind::gvk("lakecache.io", "v1alpha1", "CacheNamespace");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "cachenamespaces");
    let cns: Api<DynamicObject> = Api::namespaced_with(csi.clone(), "ml", &ar);
    let got = cns
        .get("imagenet")
        .await
        .context("the CSI account gets a CacheNamespace")?;
    assert_eq!(got.metadata.name.as_deref(), Some("imagenet"));
    let cfg = watcher::Config::default().fields("metadata.name=imagenet");
    let mut events = watcher(cns, cfg).applied_objects().boxed();
    let first = tokio::time::timeout(Duration::from_secs(30), events.next())
        .await
        .context("no watch event within 30 s")?
        .context("the watch ended")?
        .context("the CSI account's watch failed")?;
    assert_eq!(first.metadata.name.as_deref(), Some("imagenet"));
    let denied = Api::<Secret>::namespaced(csi, "ml")
        .get("imagenet-token")
        .await;
    assert!(
        is_forbidden(&denied),
        "the CSI account read a Secret: {denied:?}"
    );

    let operator = client_from_kubeconfig(
        &cluster
            .kubeconfig_for_service_account(NS, OPERATOR_SA)
            .await?,
    )
    .await?;
    let secrets = Api::<Secret>::namespaced(operator.clone(), "ml");
    secrets
        .get("imagenet-token")
        .await
        .context("the operator reads a Secret by name")?;
    let denied = secrets.list(&ListParams::default()).await;
    assert!(
        is_forbidden(&denied),
        "the operator listed Secrets: {denied:?}"
    );
    let denied = Api::<PersistentVolume>::all(operator.clone())
        .list(&ListParams::default())
        .await;
    assert!(is_forbidden(&denied), "the operator listed PVs: {denied:?}");
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "lakecache-operator"},
        "spec": {"holderIdentity": "test", "leaseDurationSeconds": 15},
    }))?;
    Api::<Lease>::namespaced(operator.clone(), NS)
        .create(&PostParams::default(), &lease)
        .await
        .context("the operator creates its Lease")?;
    let denied = Api::<Lease>::namespaced(operator, "ml")
        .create(&PostParams::default(), &lease)
        .await;
    assert!(
        is_forbidden(&denied),
        "the operator made a Lease in ml: {denied:?}"
    );
    Ok(())
}

/// The roll hook's Job as the API server stores it: a post-upgrade hook running `lakecache-csi-node
/// roll` on this release's DaemonSet from `image`, as its own unprivileged account, once, within
/// `deadline` seconds.
fn check_roll_job(job: &Value, image: &str, timeout: &str, deadline: u64) {
    let annotations = &job["metadata"]["annotations"];
    assert_eq!(annotations["helm.sh/hook"], "post-upgrade");
    assert_eq!(
        annotations["helm.sh/hook-delete-policy"],
        "before-hook-creation,hook-succeeded"
    );
    assert_eq!(job["spec"]["backoffLimit"], 0);
    assert_eq!(job["spec"]["activeDeadlineSeconds"], deadline);
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], ROLL);
    assert_eq!(pod["restartPolicy"], "Never");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    assert_eq!(pod["nodeSelector"], json!({"kubernetes.io/os": "linux"}));
    let c = &pod["containers"][0];
    assert_eq!(c["image"], image);
    assert_eq!(
        c["command"],
        json!([
            "lakecache-csi-node",
            "roll",
            "--daemonset",
            CSI_SA,
            "--namespace",
            NS
        ])
    );
    assert_eq!(
        env_value(c, "LAKECACHE_ROLL_CONTAINER_TIMEOUT"),
        Some(&json!(timeout))
    );
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
}

/// The roll hook follows its values: another timeout sizes the deadline, a malformed one fails
/// to render, and `csi.roll.enabled=false` or a RollingUpdate DaemonSet (which replaces its
/// pods itself) leave out the Job and its rights.
fn check_roll_switches(cluster: &Cluster, home: &Path) -> anyhow::Result<()> {
    let objs = dry_run(
        cluster,
        "kubectl apply --dry-run=server (roll timeout)",
        &render(home, &["--set", "csi.roll.containerTimeout=90s"])?,
    )?;
    check_roll_job(find(&objs, "Job", ROLL)?, IMAGE, "90s", 100 * (3 * 90 + 60));

    let bad = helm(
        home,
        &[
            "template",
            RELEASE,
            chart().as_str(),
            "--set",
            "csi.roll.containerTimeout=90",
        ],
    )?;
    assert!(!bad.status.success(), "containerTimeout=90 rendered");
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("csi.roll.containerTimeout must be a whole number of seconds, minutes or hours (90s, 5m, 1h), not \"90\""),
        "{err}"
    );

    for (values, strategy) in [
        ("csi.roll.enabled=false", json!({"type": "OnDelete"})),
        (
            "csi.updateStrategy.type=RollingUpdate",
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}),
        ),
    ] {
        let objs = dry_run(
            cluster,
            &format!("kubectl apply --dry-run=server ({values})"),
            &render(home, &["--set", values])?,
        )?;
        let roll: Vec<String> = objs
            .iter()
            .filter(|o| o["metadata"]["name"] == ROLL)
            .map(|o| o["kind"].to_string())
            .collect();
        assert!(roll.is_empty(), "{values} still renders {roll:?}");
        assert_eq!(
            find(&objs, "DaemonSet", CSI_SA)?["spec"]["updateStrategy"],
            strategy,
            "{values}"
        );
    }
    Ok(())
}

/// The roll's calls, made with the roll account's own token: read the DaemonSet, list its pods
/// by the DaemonSet's labels, set a container's image with a JSON patch that first tests the
/// container's name (refused with a bare 422 when the name does not match, which the roll reports
/// as a changed pod), and read the pod back. Only in the release
/// namespace; no delete.
async fn check_roll_rights(cluster: &Cluster) -> anyhow::Result<()> {
    let admin = cluster.client().await?;
    let ds = Api::<DaemonSet>::namespaced(admin.clone(), NS)
        .get(CSI_SA)
        .await?;
    let labels = ds
        .spec
        .as_ref()
        .and_then(|s| s.selector.match_labels.clone())
        .context("the DaemonSet's matchLabels")?;
    let uid = ds.metadata.uid.clone().context("the DaemonSet's uid")?;
    // A pod as the DaemonSet would make it (nothing runs it: there is no kubelet).
    let pod = |ns: &str| -> anyhow::Result<Pod> {
        Ok(serde_json::from_value(json!({
            "metadata": {
                "name": "lakecache-csi-node-test",
                "namespace": ns,
                "labels": labels,
                "ownerReferences": [{
                    "apiVersion": "apps/v1", "kind": "DaemonSet", "name": CSI_SA,
                    "uid": uid, "controller": true,
                }],
            },
            "spec": {
                "nodeName": "node-a",
                "containers": [
                    {"name": "csi-plugin", "image": IMAGE},
                    {"name": "mounter", "image": IMAGE},
                ],
            },
        }))?)
    };
    for ns in [NS, "ml"] {
        Api::<Pod>::namespaced(admin.clone(), ns)
            .create(&PostParams::default(), &pod(ns)?)
            .await
            .with_context(|| format!("creating a test pod in {ns}"))?;
    }

    let roll =
        client_from_kubeconfig(&cluster.kubeconfig_for_service_account(NS, ROLL).await?).await?;
    let got = Api::<DaemonSet>::namespaced(roll.clone(), NS)
        .get(CSI_SA)
        .await
        .context("the roll account reads the DaemonSet")?;
    assert_eq!(got.metadata.uid.as_deref(), Some(uid.as_str()));
    let pods = Api::<Pod>::namespaced(roll.clone(), NS);
    let selector: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let listed = pods
        .list(&ListParams::default().labels(&selector.join(",")))
        .await
        .context("the roll account lists the DaemonSet's pods")?;
    let names: Vec<_> = listed
        .iter()
        .filter_map(|p| p.metadata.name.as_deref())
        .collect();
    assert_eq!(names, ["lakecache-csi-node-test"]);

    const NEW: &str = "ghcr.io/lakecache/lakecache:0.2.0";
    let set_image = |index: usize, name: &str| -> anyhow::Result<Patch<()>> {
        Ok(Patch::Json(serde_json::from_value(json!([
            {"op": "test", "path": format!("/spec/containers/{index}/name"), "value": name},
            {"op": "replace", "path": format!("/spec/containers/{index}/image"), "value": NEW},
        ]))?))
    };
    let pp = PatchParams::default();
    let patched = pods
        .patch("lakecache-csi-node-test", &pp, &set_image(1, "mounter")?)
        .await
        .context("the roll account sets the mounter's image")?;
    let images: Vec<_> = patched
        .spec
        .as_ref()
        .context("spec")?
        .containers
        .iter()
        .map(|c| (c.name.as_str(), c.image.as_deref()))
        .collect();
    assert_eq!(
        images,
        [("csi-plugin", Some(IMAGE)), ("mounter", Some(NEW))]
    );
    // Container 0 is not the mounter: the test op refuses the whole patch.
    let moved = pods
        .patch("lakecache-csi-node-test", &pp, &set_image(0, "mounter")?)
        .await;
    match &moved {
        Err(kube::Error::Api(s)) => {
            // A bare 422, without the test's detail: the roll reads any 422 as a changed pod.
            assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"), "{s:?}");
        }
        other => panic!("a patch whose test fails was not refused: {other:?}"),
    }
    let after = pods.get("lakecache-csi-node-test").await?;
    assert_eq!(
        after.spec.context("spec")?.containers[0].image.as_deref(),
        Some(IMAGE)
    );
    let denied = Api::<Pod>::namespaced(roll.clone(), "ml")
        .patch("lakecache-csi-node-test", &pp, &set_image(1, "mounter")?)
        .await;
    assert!(
        is_forbidden(&denied),
        "the roll patched a pod in ml: {denied:?}"
    );
    let denied = pods
        .delete("lakecache-csi-node-test", &DeleteParams::default())
        .await;
    assert!(is_forbidden(&denied), "the roll deleted a pod: {denied:?}");
    let denied = Api::<Secret>::namespaced(roll, NS)
        .list(&ListParams::default())
        .await;
    assert!(is_forbidden(&denied), "the roll listed Secrets: {denied:?}");
    for ns in [NS, "ml"] {
        Api::<Pod>::namespaced(admin.clone(), ns)
            .delete(
                "lakecache-csi-node-test",
                &DeleteParams::default().grace_period(0),
            )
            .await?;
    }
    Ok(())
}

fn is_forbidden<T: std::fmt::Debug>(result: &kube::Result<T>) -> bool {
    matches!(result, Err(kube::Error::Api(status)) if status.code == 403)
}

/// Changed values, rendered and dry-run applied: the server stores what the values say.
fn check_values_change_what_is_stored(cluster: &Cluster, home: &Path) -> anyhow::Result<()> {
    let manifests = render(
        home,
        &[
            "--set",
            "csi.kubeletDir=/data/kubelet/,operator.replicas=3,operator.metrics.service.enabled=true",
            "--set",
            "image.repository=registry.example/lakecache,image.tag=v9,csi.prefetchBudget=1GiB",
            "--set",
            "networkPolicy.enabled=false,workers.allowedHostPathRoots={/mnt/nvme0,/mnt/nvme1}",
            "--set",
            "workers.retiredHostPathRoots={/mnt/old}",
        ],
    )?;
    let objs = dry_run(
        cluster,
        "kubectl apply --dry-run=server (changed values)",
        &manifests,
    )?;
    let ds = find(&objs, "DaemonSet", CSI_SA)?;
    let pod = &ds["spec"]["template"]["spec"];
    check_kubelet_dir(pod, "/data/kubelet")?;
    assert!(
        !ds.to_string().contains("/var/lib/kubelet"),
        "the default kubelet directory is left in {ds}"
    );
    let plugin = container(pod, "csi-plugin")?;
    assert_eq!(
        env_value(plugin, "LAKECACHE_PREFETCH_BUDGET"),
        Some(&json!("1GiB"))
    );
    assert_eq!(plugin["image"], "registry.example/lakecache:v9");
    check_roll_job(
        find(&objs, "Job", ROLL)?,
        "registry.example/lakecache:v9",
        "5m",
        100 * (3 * 300 + 60),
    );
    let deploy = find(&objs, "Deployment", OPERATOR_SA)?;
    assert_eq!(deploy["spec"]["replicas"], 3);
    let op = container(&deploy["spec"]["template"]["spec"], "operator")?;
    assert_eq!(
        env_value(op, "LAKECACHE_WORKER_IMAGE"),
        Some(&json!("registry.example/lakecache:v9"))
    );
    assert_eq!(
        env_value(op, "LAKECACHE_WORKER_INIT_IMAGE"),
        Some(&json!("registry.example/lakecache:v9"))
    );
    assert_eq!(
        env_value(op, "LAKECACHE_ALLOWED_HOST_PATH_ROOTS"),
        Some(&json!("/mnt/nvme0,/mnt/nvme1"))
    );
    assert_eq!(
        env_value(op, "LAKECACHE_RETIRED_HOST_PATH_ROOTS"),
        Some(&json!("/mnt/old"))
    );
    assert_eq!(
        env_value(op, "LAKECACHE_NETWORK_POLICY"),
        Some(&json!("false"))
    );
    assert!(env_value(op, "LAKECACHE_NETWORK_POLICY_PEER_LABELS").is_none());
    // No NetworkPolicies, no right to make them.
    let role = find(&objs, "ClusterRole", OPERATOR_SA)?;
    assert!(
        !role.to_string().contains("networkpolicies"),
        "networkPolicy.enabled=false still grants NetworkPolicies: {role}"
    );
    let svc = find(&objs, "Service", "lakecache-operator-metrics")?;
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "metrics");
    // The selector picks the operator pods and nothing else.
    let labels = &deploy["spec"]["template"]["metadata"]["labels"];
    let selector = svc["spec"]["selector"].as_object().context("selector")?;
    for (k, v) in selector {
        assert_eq!(&labels[k], v, "service selector {k}");
    }
    assert_eq!(selector["app.kubernetes.io/component"], "operator");
    Ok(())
}

/// What each example file must create, by kind and name.
fn expected_examples() -> BTreeMap<&'static str, Vec<(&'static str, &'static str)>> {
    BTreeMap::from([
        (
            "cachenamespace-s3.yaml",
            vec![
                ("Secret", "imagenet-s3-credentials"),
                ("CacheNamespace", "imagenet"),
            ],
        ),
        (
            "cachenamespace-oss.yaml",
            vec![
                ("Secret", "coco-oss-credentials"),
                ("CacheNamespace", "coco"),
            ],
        ),
        (
            "cachenamespace-azure.yaml",
            vec![
                ("Secret", "laion-azure-credentials"),
                ("CacheNamespace", "laion"),
            ],
        ),
        (
            "cachenamespace-hdfs.yaml",
            vec![("CacheNamespace", "clicklogs")],
        ),
        (
            "cachepreload.yaml",
            vec![("CachePreload", "imagenet-train")],
        ),
        (
            "cachepreload-scheduled.yaml",
            vec![("CachePreload", "coco-nightly-metadata")],
        ),
        ("tfjob.yaml", vec![("TFJob", "resnet50-tf")]),
        ("mpijob.yaml", vec![("MPIJob", "resnet50-horovod")]),
        ("pytorchjob.yaml", vec![("PyTorchJob", "resnet50-pytorch")]),
        ("inline-volume-pod.yaml", vec![("Pod", "imagenet-browser")]),
    ])
}

/// Every pod spec in `v`, wherever it is nested (a Pod's spec, a job's replica templates).
fn pod_specs(v: &Value, out: &mut Vec<Value>) {
    match v {
        Value::Object(m) => {
            if m.contains_key("containers") && m.contains_key("volumes") {
                out.push(v.clone());
            }
            for child in m.values() {
                pod_specs(child, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|c| pod_specs(c, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_is_accepted_and_broken_ones_are_refused() -> anyhow::Result<()> {
    lakecache_e2e::init_logging();
    let cluster = Cluster::start(ClusterOptions::apiserver_only()).await?;
    eprintln!(
        "etcd + kube-apiserver ready in {:.1} s",
        cluster.started_in().as_secs_f64()
    );
    let started = Instant::now();
    let root = repo();
    let crds = root.join("crds");
    let fixture = root.join("e2e/fixtures/kubeflow-crds.yaml");
    for path in [&crds, &fixture] {
        ok(
            "apply CRDs",
            cluster.kubectl(&[
                "apply",
                "--server-side",
                "-f",
                path.to_str().context("utf-8")?,
            ]),
        )?;
    }
    ok(
        "wait for the CRDs",
        cluster.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/cachenamespaces.lakecache.io",
            "crd/cachepreloads.lakecache.io",
            "crd/tfjobs.kubeflow.org",
            "crd/mpijobs.kubeflow.org",
            "crd/pytorchjobs.kubeflow.org",
        ]),
    )?;

    let examples = root.join("examples");
    let apply = |file: &Path| {
        cluster.kubectl(&[
            "apply",
            "--server-side",
            "--validate=strict",
            "-o",
            "json",
            "-f",
            file.to_str().expect("utf-8 path"),
        ])
    };
    let ns = objects(&ok(
        "apply namespace.yaml",
        apply(&examples.join("namespace.yaml")),
    )?)?;
    assert_eq!(ns.len(), 1);
    assert_eq!(
        (ns[0]["kind"].as_str(), ns[0]["metadata"]["name"].as_str()),
        (Some("Namespace"), Some("ml"))
    );

    let expected = expected_examples();
    let mut files: BTreeSet<String> = BTreeSet::new();
    for entry in std::fs::read_dir(&examples)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.ends_with(".yaml") && name != "namespace.yaml" {
            files.insert(name);
        }
    }
    assert_eq!(
        files,
        expected
            .keys()
            .map(|k| k.to_string())
            .collect::<BTreeSet<_>>(),
        "every example file is checked, and every checked file exists"
    );
    let mut stored = Vec::new();
    // CacheNamespaces before what refers to them, as a user would apply them.
    for file in expected
        .keys()
        .copied()
        .filter(|f| f.starts_with("cachenamespace"))
        .chain(
            expected
                .keys()
                .copied()
                .filter(|f| !f.starts_with("cachenamespace")),
        )
    {
        let objs = objects(&ok(
            &format!("apply examples/{file}"),
            apply(&examples.join(file)),
        )?)?;
        let got: Vec<(String, String)> = objs
            .iter()
            .map(|o| {
                (
                    o["kind"].as_str().unwrap_or_default().to_string(),
                    o["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                )
            })
            .collect();
        let want: Vec<(String, String)> = expected[file]
            .iter()
            .map(|(k, n)| (k.to_string(), n.to_string()))
            .collect();
        assert_eq!(got, want, "examples/{file}");
        for o in &objs {
            assert_eq!(o["metadata"]["namespace"], "ml", "examples/{file}");
        }
        stored.extend(objs);
    }

    // What was stored is what the examples meant: nothing pruned, every mount of the cache
    // read-only and propagated from the host.
    let cn = find(&stored, "CacheNamespace", "imagenet")?;
    assert_eq!(cn["spec"]["tiers"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        cn["spec"]["source"]["credentialsSecretRef"]["name"],
        "imagenet-s3-credentials"
    );
    let oss = find(&stored, "CacheNamespace", "coco")?;
    assert!(
        oss["spec"]["source"]["uri"]
            .as_str()
            .is_some_and(|u| u.starts_with("oss://"))
    );
    assert_eq!(
        oss["spec"]["source"]["endpoint"],
        "https://oss-cn-hangzhou-internal.aliyuncs.com"
    );
    let oss_secret = get(&cluster, "secret", "coco-oss-credentials", Some("ml"))?;
    let keys: BTreeSet<&str> = oss_secret["data"]
        .as_object()
        .context("secret data")?
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, BTreeSet::from(["access_key_id", "access_key_secret"]));
    let scheduled = find(&stored, "CachePreload", "coco-nightly-metadata")?;
    assert_eq!(scheduled["spec"]["schedule"], "0 3 * * *");
    let caches: BTreeSet<&str> = stored
        .iter()
        .filter(|o| o["kind"] == "CacheNamespace")
        .filter_map(|o| o["metadata"]["name"].as_str())
        .collect();
    for preload in stored.iter().filter(|o| o["kind"] == "CachePreload") {
        let target = preload["spec"]["cacheNamespace"]
            .as_str()
            .unwrap_or_default();
        assert!(
            caches.contains(target),
            "{} preloads unknown {target}",
            preload["metadata"]["name"]
        );
    }
    for kind in ["TFJob", "MPIJob", "PyTorchJob", "Pod"] {
        let objs: Vec<&Value> = stored.iter().filter(|o| o["kind"] == kind).collect();
        assert_eq!(objs.len(), 1, "{kind}");
        let mut specs = Vec::new();
        pod_specs(objs[0], &mut specs);
        let mut cache_mounts = 0;
        for spec in &specs {
            for vol in spec["volumes"].as_array().into_iter().flatten() {
                let cache = if let Some(claim) = vol["persistentVolumeClaim"]["claimName"].as_str()
                {
                    assert_eq!(vol["persistentVolumeClaim"]["readOnly"], true, "{kind}");
                    claim.to_string()
                } else if vol["csi"]["driver"] == "csi.lakecache.io" {
                    let csi = &vol["csi"];
                    assert_eq!(csi["readOnly"], true, "{kind}");
                    let name = csi["volumeAttributes"]["cacheNamespace"]
                        .as_str()
                        .context("cacheNamespace attribute")?;
                    assert_eq!(csi["nodePublishSecretRef"]["name"], format!("{name}-token"));
                    name.to_string()
                } else {
                    continue;
                };
                assert!(
                    caches.contains(cache.as_str()),
                    "{kind} mounts unknown cache {cache}"
                );
                for c in spec["containers"].as_array().into_iter().flatten() {
                    for m in c["volumeMounts"].as_array().into_iter().flatten() {
                        if m["name"] == vol["name"] {
                            assert_eq!(m["readOnly"], true, "{kind} {}", c["name"]);
                            assert_eq!(
                                m["mountPropagation"], "HostToContainer",
                                "{kind} {}",
                                c["name"]
                            );
                            cache_mounts += 1;
                        }
                    }
                }
            }
        }
        assert!(cache_mounts > 0, "{kind} mounts no cache");
    }

    // The CRDs' CEL rules run here: broken variants of the examples are refused, by the rule
    // that names what to fix.
    let base = cn.clone();
    let variant = |name: &str, edit: &dyn Fn(&mut Value)| {
        let mut v = json!({
            "apiVersion": base["apiVersion"],
            "kind": base["kind"],
            "metadata": {"name": name, "namespace": "ml"},
            "spec": base["spec"],
        });
        edit(&mut v);
        v
    };
    let refused: Vec<(Value, &str)> = vec![
        (
            variant("creds-in-options", &|v| {
                v["spec"]["source"]["options"] = json!({"secret_access_key": "x"})
            }),
            "source.options must not hold credentials",
        ),
        (
            variant("two-disk-places", &|v| {
                v["spec"]["tiers"][1]["storageClassName"] = json!("fast")
            }),
            "a Disk tier needs exactly one of path",
        ),
        (
            variant("odd-block", &|v| v["spec"]["blockSize"] = json!("3Mi")),
            "blockSize must be a power of two",
        ),
        (
            variant("ftp", &|v| v["spec"]["source"]["uri"] = json!("ftp://nn/x")),
            "source.uri must be",
        ),
        (
            json!({
                "apiVersion": "lakecache.io/v1alpha1",
                "kind": "CachePreload",
                "metadata": {"name": "daily", "namespace": "ml"},
                "spec": {"cacheNamespace": "imagenet", "paths": ["train/**"], "schedule": "daily"},
            }),
            "schedule must be a cron expression",
        ),
    ];
    for (obj, message) in refused {
        let out = cluster.kubectl_with_stdin(
            &["apply", "--server-side", "-f", "-"],
            Some(&obj.to_string()),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(message),
            "{} was not refused with {message:?}: {stderr}",
            obj["metadata"]["name"]
        );
    }
    eprintln!(
        "{} example objects accepted, 5 broken ones refused, in {:.1} s",
        stored.len() + 1,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
