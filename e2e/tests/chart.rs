//! The Helm chart (`charts/lakecache`) and the examples (`examples/`) against a real
//! kube-apiserver with etcd (no kubelet, so nothing runs: what is checked is what the API server
//! accepts and what RBAC grants).
//!
//! - `helm lint --strict` passes, with the default values and with changed ones (monitoring on
//!   included).
//! - The values schema (`values.schema.json`) refuses what values.yaml does not describe: helm
//!   fails an unknown key, a value of the wrong type, an enum's stranger, a malformed duration or
//!   size, naming the field. The schema describes every value of values.yaml and every value the
//!   templates read, each with a description, and no value values.yaml lacks.
//! - The monitoring objects (off by default): the ServiceMonitor selects the operator's metrics
//!   Service on its port, the PodMonitors select the CSI node pods on their named ports and the
//!   workers exactly as the real operator labels their pods (a StatefulSet it made), on their
//!   `admin` port; the Prometheus Operator's own Go types decode every object strictly, and
//!   Prometheus's own rule file parser accepts the PrometheusRule's groups (tools/promcheck), and
//!   refuses broken copies; the dashboard ConfigMap holds `dashboards/lakecache.json`.
//! - Every metric the dashboard's queries and the alerts name is one the real binaries serve
//!   (worker, FUSE server, CSI plugin, registrar and operator, started here and scraped), and the
//!   dashboard shows every metric family they serve.
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
use lakecache_e2e::kit::free_port;
use lakecache_e2e::{Cluster, ClusterOptions};
use lakecache_proto::csi::v1::NodeGetVolumeStatsRequest;
use lakecache_proto::csi::v1::node_client::NodeClient;
use lakecache_proto::pluginregistration::registration_client::RegistrationClient;
use lakecache_proto::pluginregistration::{InfoRequest, RegistrationStatus};
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
        &[
            "--set",
            MONITORING_ON,
            "--set",
            "monitoring.labels.release=kps,monitoring.prometheusRule.alertLabels.team=ml",
        ][..],
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
        "helm lint: 6 runs in {:.1} s",
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
    // The values schema refuses it before the template's own check would.
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("at '/csi/registrar/mode': value must be one of 'builtin', 'upstream'"),
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
    // The values schema refuses a number, and a string without a unit, before the template's
    // own check would.
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("at '/csi/roll/containerTimeout': got number, want string"),
        "{err}"
    );
    let bad = helm(
        home,
        &[
            "template",
            RELEASE,
            chart().as_str(),
            "--set-string",
            "csi.roll.containerTimeout=90",
        ],
    )?;
    assert!(!bad.status.success(), "containerTimeout=\"90\" rendered");
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("at '/csi/roll/containerTimeout': '90' does not match pattern"),
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

/// Every monitoring object of the chart on.
const MONITORING_ON: &str = "monitoring.serviceMonitor.enabled=true,monitoring.podMonitor.enabled=true,monitoring.prometheusRule.enabled=true,monitoring.dashboard.enabled=true";
/// tools/promcheck, which `scripts/setup` builds.
const PROMCHECK_ENV: &str = "LAKECACHE_PROMCHECK";
/// Metrics Prometheus makes itself for every target, which the alerts and the dashboard may use.
const PROMETHEUS_METRICS: &[&str] = &["up"];

/// `promcheck ARGS < stdin` (tools/promcheck: Prometheus's rule file and PromQL parsers and the
/// Prometheus Operator's API types).
fn promcheck(args: &[&str], stdin: &str) -> anyhow::Result<Output> {
    let bin = std::env::var_os(PROMCHECK_ENV).with_context(|| {
        format!("{PROMCHECK_ENV} is not set: run `eval \"$(scripts/setup --env)\"` first (it builds tools/promcheck)")
    })?;
    let mut cmd = Command::new(bin);
    cmd.args(args);
    lakecache_e2e::cluster::output_within(&mut cmd, Some(stdin), COMMAND_LIMIT)
}

/// `promcheck objects` of `manifests`: each monitoring.coreos.com object's kind, name, number of
/// rules and the metric names its rules select.
fn check_monitoring_objects(manifests: &str) -> anyhow::Result<Vec<Value>> {
    let out = ok("promcheck objects", promcheck(&["objects"], manifests)?)?;
    Ok(serde_json::from_str(&out)?)
}

/// The documents of `helm template` output, as JSON (empty ones left out).
fn documents(yaml: &str) -> anyhow::Result<Vec<Value>> {
    use serde::Deserialize;
    let mut out = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
        let v = Value::deserialize(doc).context("a document of helm's output")?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// Whether a Kubernetes label selector (`matchLabels`, `matchExpressions`) selects `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let by_label = selector["matchLabels"]
        .as_object()
        .is_none_or(|m| m.iter().all(|(k, v)| labels.get(k) == Some(v)));
    let by_expression = selector["matchExpressions"].as_array().is_none_or(|es| {
        es.iter().all(|e| {
            let value = e["key"].as_str().and_then(|k| labels.get(k));
            let values = e["values"].as_array();
            match e["operator"].as_str() {
                Some("Exists") => value.is_some(),
                Some("DoesNotExist") => value.is_none(),
                Some("In") => value.is_some_and(|v| values.is_some_and(|vs| vs.contains(v))),
                Some("NotIn") => !value.is_some_and(|v| values.is_some_and(|vs| vs.contains(v))),
                _ => false,
            }
        })
    });
    !selector.is_null() && by_label && by_expression
}

/// The named ports of a pod spec's containers: port name → (container, port number).
fn named_ports(pod_spec: &Value) -> BTreeMap<String, (String, u64)> {
    let mut out = BTreeMap::new();
    for c in pod_spec["containers"].as_array().into_iter().flatten() {
        for p in c["ports"].as_array().into_iter().flatten() {
            if let (Some(name), Some(port)) = (p["name"].as_str(), p["containerPort"].as_u64()) {
                out.insert(
                    name.to_string(),
                    (c["name"].as_str().unwrap_or_default().to_string(), port),
                );
            }
        }
    }
    out
}

/// The `job` a monitor's endpoint gives its targets (its relabeling to `job`).
fn job_of(endpoint: &Value) -> Option<&str> {
    endpoint["relabelings"]
        .as_array()?
        .iter()
        .find(|r| r["targetLabel"] == "job")?["replacement"]
        .as_str()
}

/// Resolves a `$ref` to the schema's definitions.
fn resolve<'a>(schema: &'a Value, node: &'a Value) -> &'a Value {
    match node["$ref"].as_str() {
        Some(r) => r
            .strip_prefix("#/definitions/")
            .map_or(node, |name| &schema["definitions"][name]),
        None => node,
    }
}

/// The schema of the value at `path` (`csi.registrar.mode`), if the schema describes it.
fn schema_at<'a>(schema: &'a Value, path: &str) -> Option<&'a Value> {
    let mut node = schema;
    for key in path.split('.') {
        node = resolve(schema, node)["properties"].get(key)?;
    }
    Some(node)
}

/// Every key path of a values document (`csi.registrar.mode`), objects' own paths included.
fn value_paths(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    if let Some(m) = v.as_object() {
        for (k, child) in m {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            out.insert(path.clone());
            value_paths(child, &path, out);
        }
    }
}

/// Every property path the schema describes, with its schema and whether it comes from a shared
/// definition (`resources`' `claims`, which values.yaml need not set); free maps (labels,
/// annotations, resources' requests) end the walk.
fn schema_paths<'a>(
    schema: &'a Value,
    node: &'a Value,
    prefix: &str,
    shared: bool,
    out: &mut BTreeMap<String, (&'a Value, bool)>,
) {
    let shared = shared || !node["$ref"].is_null();
    if let Some(props) = resolve(schema, node)["properties"].as_object() {
        for (k, child) in props {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            out.insert(path.clone(), (child, shared));
            schema_paths(schema, child, &path, shared, out);
        }
    }
}

/// The `.Values.a.b` paths the chart's templates read.
fn template_value_paths() -> anyhow::Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir(repo().join("charts/lakecache/templates"))? {
        let text = std::fs::read_to_string(entry?.path())?;
        for (i, _) in text.match_indices(".Values.") {
            let rest = &text[i + ".Values.".len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
                .unwrap_or(rest.len());
            let path = rest[..end].trim_end_matches('.');
            if !path.is_empty() {
                out.insert(path.to_string());
            }
        }
    }
    Ok(out)
}

#[test]
fn the_values_schema_describes_every_value_and_refuses_wrong_ones_by_name() -> anyhow::Result<()> {
    let home = tempfile::tempdir()?;
    let root = repo().join("charts/lakecache");
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("values.schema.json"))?)?;
    assert_eq!(schema["$schema"], "http://json-schema.org/draft-07/schema#");
    let values: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(root.join("values.yaml"))?)?;

    // The schema and values.yaml describe the same values, each with a description, and every
    // object whose keys the chart owns refuses others.
    let mut described = BTreeMap::new();
    schema_paths(&schema, &schema, "", false, &mut described);
    let mut set = BTreeSet::new();
    value_paths(&values, "", &mut set);
    let free_maps = |path: &str| {
        // Maps whose keys are the user's: labels, annotations, node selectors, resources.
        let mut parent = path.rsplit_once('.').map(|p| p.0);
        while let Some(p) = parent {
            if let Some((s, _)) = described.get(p) {
                let s = resolve(&schema, s);
                if s["additionalProperties"] != json!(false) || s["properties"].is_null() {
                    return true;
                }
            }
            parent = p.rsplit_once('.').map(|p| p.0);
        }
        false
    };
    let in_values_only: Vec<&String> = set
        .iter()
        .filter(|p| !described.contains_key(*p) && !free_maps(p))
        .collect();
    assert!(
        in_values_only.is_empty(),
        "values the schema lacks: {in_values_only:?}"
    );
    // Values the chart reads though values.yaml leaves them unset.
    let optional = ["global", "csi.updateStrategy.rollingUpdate"];
    let in_schema_only: Vec<&String> = described
        .iter()
        .filter(|(p, (_, shared))| !set.contains(*p) && !shared && !optional.contains(&p.as_str()))
        .map(|(p, _)| p)
        .collect();
    assert!(
        in_schema_only.is_empty(),
        "schema entries values.yaml lacks: {in_schema_only:?}"
    );
    for (path, (node, _)) in &described {
        assert!(
            node["description"].as_str().is_some_and(|d| d.len() > 10),
            "{path} has no description"
        );
        let node = resolve(&schema, node);
        assert!(
            ["type", "oneOf", "anyOf", "enum"]
                .iter()
                .any(|k| !node[*k].is_null()),
            "{path} has no type"
        );
        if node["type"] == "object" && !node["properties"].is_null() {
            assert_eq!(
                node["additionalProperties"],
                json!(false),
                "{path} takes unknown keys"
            );
        }
    }
    assert_eq!(schema["additionalProperties"], json!(false));
    // Every value a template reads is described.
    let read = template_value_paths()?;
    assert!(read.len() > 60, "only {} values read: {read:?}", read.len());
    let undescribed: Vec<&String> = read
        .iter()
        .filter(|p| schema_at(&schema, p).is_none())
        .collect();
    assert!(
        undescribed.is_empty(),
        "templates read values the schema lacks: {undescribed:?}"
    );

    // helm refuses wrong values, naming the field, in `helm template` and in `helm lint`.
    let chart = chart();
    let refused: &[(&str, &str, &str)] = &[
        (
            "--set",
            "someTypo=1",
            "at '': additional properties 'someTypo' not allowed",
        ),
        (
            "--set",
            "csi.something=1",
            "at '/csi': additional properties 'something' not allowed",
        ),
        (
            "--set",
            "monitoring.podMonitor.enable=true",
            "at '/monitoring/podMonitor': additional properties 'enable' not allowed",
        ),
        (
            "--set",
            "csi.fuseThreads=many",
            "at '/csi/fuseThreads': got string, want integer",
        ),
        (
            "--set",
            "operator.replicas=-1",
            "at '/operator/replicas': minimum: got -1, want 0",
        ),
        (
            "--set",
            "csi.blockTransport=yes",
            "at '/csi/blockTransport': got string, want boolean",
        ),
        (
            "--set",
            "image.pullPolicy=Sometimes",
            "at '/image/pullPolicy': value must be one of 'Always', 'IfNotPresent', 'Never'",
        ),
        (
            "--set",
            "csi.updateStrategy.type=Recreate",
            "at '/csi/updateStrategy/type': value must be one of 'OnDelete', 'RollingUpdate'",
        ),
        (
            "--set",
            "operator.resync=soon",
            "at '/operator/resync': 'soon' does not match pattern",
        ),
        (
            "--set",
            "csi.prefetchBudget=lots",
            "at '/csi/prefetchBudget'",
        ),
        (
            "--set",
            "image.tag=a tag",
            "at '/image/tag': 'a tag' does not match pattern",
        ),
        (
            "--set",
            "csi.adminPort=70000",
            "at '/csi/adminPort': maximum: got 70,000, want 65,535",
        ),
        (
            "--set",
            "csi.kubeletDir=var/lib/kubelet",
            "at '/csi/kubeletDir'",
        ),
        (
            "--set",
            "monitoring.prometheusRule.hitRatio.threshold=2",
            "at '/monitoring/prometheusRule/hitRatio/threshold': maximum: got 2, want 1",
        ),
        (
            "--set",
            "monitoring.interval=30 seconds",
            "at '/monitoring/interval'",
        ),
        (
            "--set",
            "monitoring.prometheusRule.disabledAlerts={LakecacheWorkersDown}",
            "at '/monitoring/prometheusRule/disabledAlerts/0': value must be one of",
        ),
        (
            "--set",
            "monitoring.dashboard.labels.grafana_dashboard=1",
            "at '/monitoring/dashboard/labels/grafana_dashboard': got number, want string",
        ),
        (
            "--set",
            "monitoring.labels.bad key=x",
            "at '/monitoring/labels': additional properties 'bad key' not allowed",
        ),
    ];
    for (flag, value, message) in refused {
        for verb in ["template", "lint"] {
            let out = helm(home.path(), &[verb, RELEASE, chart.as_str(), flag, value])?;
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                !out.status.success(),
                "helm {verb} accepted {value}: {text}"
            );
            assert!(
                text.contains(message),
                "helm {verb} {value}: {message:?} not in {text}"
            );
        }
    }
    // What the schema accepts renders: values given the other way round still pass.
    for value in [
        "csi.maxPrefetchBudget=0",
        "csi.localCache.size=8Gi",
        "csi.fuseServerOverhead=200MiB",
        "monitoring.interval=",
        "operator.resync=1h 30m",
        "operator.resources.requests.cpu=.5",
        "operator.resources.limits.memory=1e9",
        "image.tag=1.2.0@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "fullnameOverride=a-very-long-name-that-the-chart-truncates-to-fifty-characters-anyway",
        "csi.fuseThreads=128",
    ] {
        render(home.path(), &["--set", value]).with_context(|| value.to_string())?;
    }
    Ok(())
}

#[test]
fn monitoring_objects_select_the_workloads_and_pass_prometheus_checks() -> anyhow::Result<()> {
    let home = tempfile::tempdir()?;
    let started = Instant::now();

    // Off by default: no monitoring object, no metrics Service, no dashboard.
    let plain = documents(&render(home.path(), &[])?)?;
    for o in &plain {
        assert_ne!(o["apiVersion"], "monitoring.coreos.com/v1", "{}", o["kind"]);
        assert_ne!(o["kind"], "Service", "{}", o["metadata"]["name"]);
        assert_ne!(o["kind"], "ConfigMap", "{}", o["metadata"]["name"]);
    }

    let text = render(
        home.path(),
        &[
            "--set",
            MONITORING_ON,
            "--set",
            "monitoring.labels.release=kps,monitoring.prometheusRule.alertLabels.team=ml",
        ],
    )?;
    let objs = documents(&text)?;
    let kinds: BTreeSet<(String, String)> = objs
        .iter()
        .filter(|o| o["apiVersion"] == "monitoring.coreos.com/v1")
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
    let expected: BTreeSet<(String, String)> = [
        ("ServiceMonitor", "lakecache-operator"),
        ("PodMonitor", "lakecache-csi-node"),
        ("PodMonitor", "lakecache-workers"),
        ("PrometheusRule", "lakecache"),
    ]
    .iter()
    .map(|(k, n)| (k.to_string(), n.to_string()))
    .collect();
    assert_eq!(kinds, expected);
    for o in objs
        .iter()
        .filter(|o| o["apiVersion"] == "monitoring.coreos.com/v1")
    {
        assert_eq!(o["metadata"]["namespace"], NS);
        // The label the Prometheus meant to use them selects.
        assert_eq!(o["metadata"]["labels"]["release"], "kps", "{}", o["kind"]);
    }

    // The operator: ServiceMonitor → the metrics Service (turned on by it) → the operator pods.
    let deploy = find(&objs, "Deployment", OPERATOR_SA)?;
    let operator_pod = &deploy["spec"]["template"];
    let svc = find(&objs, "Service", "lakecache-operator-metrics")?;
    let sm = find(&objs, "ServiceMonitor", "lakecache-operator")?;
    assert!(
        selects(&sm["spec"]["selector"], &svc["metadata"]["labels"]),
        "{sm}"
    );
    assert_eq!(sm["spec"]["namespaceSelector"], json!({"matchNames": [NS]}));
    let svc_selector = json!({"matchLabels": svc["spec"]["selector"]});
    assert!(selects(&svc_selector, &operator_pod["metadata"]["labels"]));
    let endpoints = sm["spec"]["endpoints"].as_array().context("endpoints")?;
    assert_eq!(endpoints.len(), 1);
    let port = endpoints[0]["port"].as_str().context("port")?;
    let svc_port = svc["spec"]["ports"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == port))
        .with_context(|| format!("the Service has no port {port}"))?;
    let target = svc_port["targetPort"].as_str().context("targetPort")?;
    let ports = named_ports(&operator_pod["spec"]);
    assert_eq!(ports.get(target), Some(&("operator".to_string(), 9820)));
    assert_eq!(endpoints[0]["path"], "/metrics");
    assert_eq!(endpoints[0]["interval"], "30s");
    assert_eq!(job_of(&endpoints[0]), Some("lakecache-operator"));

    // The CSI node plugin: its pods, on the plugin's and the builtin registrar's ports.
    let ds = find(&objs, "DaemonSet", CSI_SA)?;
    let csi_pod = &ds["spec"]["template"];
    let pm = find(&objs, "PodMonitor", "lakecache-csi-node")?;
    assert!(
        selects(&pm["spec"]["selector"], &csi_pod["metadata"]["labels"]),
        "{pm}"
    );
    assert!(!selects(
        &pm["spec"]["selector"],
        &operator_pod["metadata"]["labels"]
    ));
    assert_eq!(pm["spec"]["namespaceSelector"], json!({"matchNames": [NS]}));
    let ports = named_ports(&csi_pod["spec"]);
    let scraped: Vec<(String, String, u64)> = pm["spec"]["podMetricsEndpoints"]
        .as_array()
        .context("podMetricsEndpoints")?
        .iter()
        .map(|e| {
            let name = e["port"].as_str().unwrap_or_default();
            assert_eq!(e["path"], "/metrics");
            assert_eq!(job_of(e), Some("lakecache-csi-node"));
            let (c, p) = ports.get(name).cloned().unwrap_or_default();
            (name.to_string(), c, p)
        })
        .collect();
    assert_eq!(
        scraped,
        [
            ("admin".to_string(), "csi-plugin".to_string(), 9810),
            (
                "registrar".to_string(),
                "node-driver-registrar".to_string(),
                9809
            ),
        ]
    );
    // The upstream registrar serves no metrics: only the plugin is scraped.
    let upstream = documents(&render(
        home.path(),
        &[
            "--set",
            MONITORING_ON,
            "--set",
            "csi.registrar.mode=upstream",
        ],
    )?)?;
    let endpoints =
        &find(&upstream, "PodMonitor", "lakecache-csi-node")?["spec"]["podMetricsEndpoints"];
    assert_eq!(endpoints.as_array().map(Vec::len), Some(1), "{endpoints}");
    assert_eq!(endpoints[0]["port"], "admin");

    // The workers: in every namespace unless told which; a `cache_namespace` label from their
    // pods' (checked against the operator's real pods in the metrics test).
    let workers = find(&objs, "PodMonitor", "lakecache-workers")?;
    assert_eq!(workers["spec"]["namespaceSelector"], json!({"any": true}));
    assert!(!selects(
        &workers["spec"]["selector"],
        &csi_pod["metadata"]["labels"]
    ));
    assert!(!selects(
        &workers["spec"]["selector"],
        &operator_pod["metadata"]["labels"]
    ));
    let only = documents(&render(
        home.path(),
        &[
            "--set",
            MONITORING_ON,
            "--set",
            "monitoring.podMonitor.workerNamespaces={ml,vision}",
        ],
    )?)?;
    assert_eq!(
        find(&only, "PodMonitor", "lakecache-workers")?["spec"]["namespaceSelector"],
        json!({"matchNames": ["ml", "vision"]})
    );

    // The alerts: every one labelled, and checked by Prometheus's own parsers; the Prometheus
    // Operator's types decode every monitoring object strictly.
    let rule = find(&objs, "PrometheusRule", "lakecache")?;
    let alerts: Vec<&Value> = rule["spec"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .collect();
    let names: BTreeSet<String> = alerts
        .iter()
        .filter_map(|a| a["alert"].as_str().map(String::from))
        .collect();
    assert_eq!(
        names,
        schema_alert_names()?.into_iter().collect::<BTreeSet<_>>(),
        "the alerts rendered are the ones the schema lets disable"
    );
    for a in &alerts {
        assert!(
            ["warning", "critical"].contains(&a["labels"]["severity"].as_str().unwrap_or_default()),
            "{a}"
        );
        assert_eq!(a["labels"]["team"], "ml", "{}", a["alert"]);
        for k in ["summary", "description"] {
            assert!(
                a["annotations"][k].as_str().is_some_and(|t| t.len() > 20),
                "{} {k}",
                a["alert"]
            );
        }
    }
    let checked = check_monitoring_objects(&text)?;
    assert_eq!(checked.len(), 4, "{checked:?}");
    let rules = checked
        .iter()
        .find(|o| o["kind"] == "PrometheusRule")
        .context("promcheck skipped the PrometheusRule")?;
    assert_eq!(rules["rules"], json!(alerts.len()));
    // The alerts that need the chart's scrape jobs go with them; others can be turned off.
    let fewer = documents(&render(
        home.path(),
        &[
            "--set",
            "monitoring.prometheusRule.enabled=true",
            "--set",
            "monitoring.prometheusRule.disabledAlerts={LakecacheMountRepairs}",
        ],
    )?)?;
    let fewer: BTreeSet<String> = find(&fewer, "PrometheusRule", "lakecache")?["spec"]["groups"][0]
        ["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["alert"].as_str().map(String::from))
        .collect();
    for gone in [
        "LakecacheWorkerDown",
        "LakecacheCacheWorkersAllDown",
        "LakecacheCsiNodeDown",
        "LakecacheOperatorDown",
        "LakecacheMountRepairs",
    ] {
        assert!(!fewer.contains(gone), "{gone} rendered: {fewer:?}");
    }
    assert!(fewer.contains("LakecacheCacheHitRatioLow"), "{fewer:?}");

    // Broken copies are refused, each naming what is wrong: the checks above could fail.
    let broken: &[(&str, &str, &str)] = &[
        (
            "rate(lakecache_worker_source_errors_total[10m])",
            "rate(lakecache_worker_source_errors_total[10m)",
            "LakecacheSourceErrors",
        ),
        ("for: 30m", "for: 30 minutes", "30 minutes"),
        (
            "summary: \"Reads through volume {{ $labels.volume }} fail\"",
            "summary: \"Reads through volume {{ $labels.volume fail\"",
            "LakecacheFuseReadErrors",
        ),
        (
            "  podMetricsEndpoints:",
            "  podMetricEndpoints:",
            "unknown field \"podMetricEndpoints\"",
        ),
        (
            "    - port: metrics",
            "    - port: 9820",
            "ServiceMonitor lakecache-operator",
        ),
        (
            "    any: true",
            "    any: yes please",
            "PodMonitor lakecache-workers",
        ),
    ];
    for (from, to, message) in broken {
        assert!(text.contains(from), "{from:?} is not in the rendered chart");
        let copy = text.replacen(from, to, 1);
        let out = promcheck(&["objects"], &copy)?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "promcheck accepted {to:?}");
        assert!(err.contains(message), "{to:?}: {message:?} not in {err}");
    }

    // The dashboard's ConfigMap, where Grafana's sidecar finds it.
    let cm = find(&objs, "ConfigMap", "lakecache-dashboard")?;
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(cm["metadata"]["namespace"], NS);
    let shipped: Value =
        serde_json::from_str(cm["data"]["lakecache.json"].as_str().context("data")?)?;
    let file: Value = serde_json::from_str(&std::fs::read_to_string(
        repo().join("charts/lakecache/dashboards/lakecache.json"),
    )?)?;
    assert_eq!(shipped, file);
    let elsewhere = documents(&render(
        home.path(),
        &[
            "--set",
            "monitoring.dashboard.enabled=true,monitoring.dashboard.namespace=grafana",
            "--set",
            "monitoring.dashboard.annotations.grafana_folder=lakecache",
        ],
    )?)?;
    let cm = find(&elsewhere, "ConfigMap", "lakecache-dashboard")?;
    assert_eq!(cm["metadata"]["namespace"], "grafana");
    assert_eq!(cm["metadata"]["annotations"]["grafana_folder"], "lakecache");
    check_dashboard_layout(&file)?;
    eprintln!(
        "monitoring objects: {} alerts, checked in {:.1} s",
        alerts.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The alert names `monitoring.prometheusRule.disabledAlerts` accepts.
fn schema_alert_names() -> anyhow::Result<Vec<String>> {
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(
        repo().join("charts/lakecache/values.schema.json"),
    )?)?;
    Ok(schema["definitions"]["alertName"]["enum"]
        .as_array()
        .context("alertName enum")?
        .iter()
        .filter_map(|v| v.as_str().map(String::from))
        .collect())
}

/// Every panel of a dashboard, rows' own panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().into_iter().flatten() {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// A dashboard Grafana can lay out: unique panel ids, inside 24 columns, no two panels on the
/// same cells, and every graph querying the dashboard's Prometheus data source.
fn check_dashboard_layout(d: &Value) -> anyhow::Result<()> {
    assert_eq!(d["uid"], "lakecache");
    let all = panels(d);
    assert!(all.len() > 20, "{} panels", all.len());
    let mut ids = BTreeSet::new();
    let mut cells = BTreeSet::new();
    for p in &all {
        assert!(
            ids.insert(p["id"].as_u64().context("panel id")?),
            "id {} twice",
            p["id"]
        );
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().context("x")?,
            g["y"].as_u64().context("y")?,
            g["w"].as_u64().context("w")?,
            g["h"].as_u64().context("h")?,
        );
        ensure!(
            x + w <= 24,
            "panel {} is wider than the dashboard",
            p["title"]
        );
        for cx in x..x + w {
            for cy in y..y + h {
                ensure!(
                    cells.insert((cx, cy)),
                    "panel {} overlaps another",
                    p["title"]
                );
            }
        }
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        assert!(
            p["description"].as_str().is_some_and(|t| !t.is_empty()),
            "{}",
            p["title"]
        );
        let targets = p["targets"].as_array().context("targets")?;
        assert!(!targets.is_empty(), "{} queries nothing", p["title"]);
    }
    Ok(())
}

/// The PromQL of a dashboard: every panel's queries and the selectors of its variables'
/// `label_values(SELECTOR, LABEL)`, with Grafana's variables replaced by values PromQL accepts.
fn dashboard_queries(d: &Value) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for p in panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(
                t["expr"]
                    .as_str()
                    .context("a target without expr")?
                    .to_string(),
            );
        }
    }
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"]
            .as_str()
            .or(v["query"].as_str())
            .context("variable query")?;
        let selector = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .and_then(|r| r.rsplit_once(','))
            .map(|(s, _)| s)
            .with_context(|| {
                format!(
                    "variable {}: {q} is not label_values(SELECTOR, LABEL)",
                    v["name"]
                )
            })?;
        out.push(selector.to_string());
    }
    Ok(out.into_iter().map(|q| without_variables(&q)).collect())
}

/// `q` with Grafana's variables replaced: `$__rate_interval` and its kind by `5m`, others (in
/// label matchers) by `x`.
fn without_variables(q: &str) -> String {
    let mut out = String::new();
    let mut chars = q.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        let braced = chars.peek() == Some(&'{');
        if braced {
            chars.next();
        }
        let mut name = String::new();
        while let Some(&n) = chars.peek() {
            if n.is_ascii_alphanumeric() || n == '_' {
                name.push(n);
                chars.next();
            } else {
                break;
            }
        }
        if braced && chars.peek() == Some(&'}') {
            chars.next();
        }
        out.push_str(if name.starts_with("__") { "5m" } else { "x" });
    }
    out
}

/// The metric names `exprs` select, parsed by Prometheus's PromQL parser (tools/promcheck);
/// fails if any does not parse.
fn selected_metrics(exprs: &[String]) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let out = promcheck(&["exprs"], &serde_json::to_string(exprs)?)?;
    let results: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("promcheck exprs: {}", String::from_utf8_lossy(&out.stderr)))?;
    let mut by_expr = BTreeMap::new();
    for r in results.as_array().context("promcheck's results")? {
        let expr = r["expr"].as_str().unwrap_or_default().to_string();
        ensure!(r["error"].is_null(), "{expr}: {}", r["error"]);
        let names: Vec<String> = r["metrics"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m.as_str().map(String::from))
            .collect();
        ensure!(!names.is_empty(), "{expr} selects no metric by name");
        by_expr.insert(expr, names);
    }
    ensure!(out.status.success(), "promcheck exprs failed");
    Ok(by_expr)
}

/// The metric names in `used` that are neither served nor made by Prometheus.
fn unknown_metrics<'a>(
    used: impl IntoIterator<Item = &'a String>,
    served: &BTreeMap<String, BTreeSet<String>>,
) -> BTreeSet<String> {
    let known: BTreeSet<&str> = served
        .values()
        .flatten()
        .map(String::as_str)
        .chain(PROMETHEUS_METRICS.iter().copied())
        .collect();
    used.into_iter()
        .filter(|m| !known.contains(m.as_str()))
        .cloned()
        .collect()
}

/// The metric families of a /metrics text, each with the sample names Prometheus stores for it
/// (from its `# TYPE`, so families with no sample yet count): a counter's `_total`, a
/// histogram's `_bucket`, `_sum` and `_count`.
fn families(text: &str) -> anyhow::Result<BTreeMap<String, BTreeSet<String>>> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').context("a TYPE line")?;
        let samples: Vec<String> = match kind.trim() {
            "counter" => vec![format!("{name}_total")],
            "histogram" => ["_bucket", "_sum", "_count"]
                .iter()
                .map(|s| format!("{name}{s}"))
                .collect(),
            "gauge" | "unknown" => vec![name.to_string()],
            other => bail!("{name}: a {other}, which this test does not know"),
        };
        out.insert(name.to_string(), samples.into_iter().collect());
    }
    Ok(out)
}

/// The structs that hold each component's metrics, with the prefix of the registry they are
/// registered in (`Registry::with_prefix`), by crate.
const METRIC_STRUCTS: &[(&str, &str, &str)] = &[
    ("cache-worker", "WorkerMetrics", "lakecache_worker"),
    ("client", "ReaderMetrics", "lakecache_fuse"),
    ("csi-node", "CsiMetrics", "lakecache_csi"),
    ("csi-node", "RegistrarMetrics", "lakecache_csi_registrar"),
    ("operator", "OperatorMetrics", "lakecache_operator"),
];

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            rust_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// The Rust string literal at the start of `s` (after blanks), and what follows it.
fn string_literal(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start().strip_prefix('"')?;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => return Some((&s[..i], &s[i + 1..])),
            _ => {}
        }
    }
    None
}

/// The metric families the code registers, by struct: each `register` method's
/// `r.register("name", "help", self.field.clone())`, named with its registry's prefix and typed
/// by the field's declaration (a `Histogram`, `Counter` or `Gauge`, alone or in a `Family`), with
/// the sample names Prometheus stores for it. A binary serves a family only once it has a
/// sample, so this is what the binaries may serve; what they do serve is checked against it.
fn declared_metrics() -> anyhow::Result<BTreeMap<String, BTreeMap<String, BTreeSet<String>>>> {
    let mut files = Vec::new();
    for krate in [
        "cache-worker",
        "client",
        "csi-node",
        "operator",
        "telemetry",
    ] {
        rust_files(&repo().join(krate).join("src"), &mut files)?;
    }
    let sources: Vec<(PathBuf, String)> = files
        .into_iter()
        .map(|f| Ok((f.clone(), std::fs::read_to_string(&f)?)))
        .collect::<anyhow::Result<_>>()?;
    let mut out = BTreeMap::new();
    for (krate, name, prefix) in METRIC_STRUCTS {
        let needle = format!("Registry::with_prefix(\"{prefix}\")");
        ensure!(
            sources.iter().any(|(_, text)| text.contains(&needle)),
            "no registry has the prefix {prefix}"
        );
        let start = format!("pub struct {name} {{");
        let (file, text) = sources
            .iter()
            .filter(|(f, _)| f.starts_with(repo().join(krate)))
            .find(|(_, text)| text.contains(&start))
            .with_context(|| format!("no struct {name} in {krate}"))?;
        let what = format!("{name} in {}", file.display());
        let decl = &text[text.find(&start).context("struct")?..];
        let decl = &decl[..decl
            .find("\n}")
            .with_context(|| format!("{what}: struct end"))?];
        let fields: BTreeMap<&str, &str> = decl
            .lines()
            .filter_map(|l| l.trim().strip_prefix("pub ")?.split_once(':'))
            .map(|(f, t)| (f.trim(), t.trim()))
            .collect();
        let imp = &text[text
            .find(&format!("impl {name} {{"))
            .with_context(|| format!("{what}: no impl"))?..];
        let method = &imp[imp
            .find("fn register(")
            .with_context(|| format!("{what}: no register method"))?..];
        let method = &method[..method.find("\n    }").context("register's end")?];
        let mut families = BTreeMap::new();
        for (i, _) in method.match_indices(".register(") {
            let call = &method[i + ".register(".len()..];
            let parsed = (|| {
                let (metric, rest) = string_literal(call)?;
                let (_help, rest) = string_literal(rest.trim_start().strip_prefix(',')?)?;
                let field = rest
                    .trim_start()
                    .strip_prefix(',')?
                    .trim_start()
                    .strip_prefix("self.")?;
                let field = field
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .next()?;
                Some((metric, field))
            })();
            let (metric, field) = parsed.with_context(|| {
                format!(
                    "{what}: a register call not of the form \
                     r.register(\"name\", \"help\", self.field.clone()): {}",
                    &call[..call.len().min(120)]
                )
            })?;
            let ty = fields
                .get(field)
                .with_context(|| format!("{what}: no field {field}"))?;
            let family = format!("{prefix}_{metric}");
            let samples: BTreeSet<String> = if ty.contains("Histogram") {
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .map(|s| format!("{family}{s}"))
                    .collect()
            } else if ty.contains("Counter") {
                BTreeSet::from([format!("{family}_total")])
            } else if ty.contains("Gauge") {
                BTreeSet::from([family.clone()])
            } else {
                bail!("{what}: {field} is a {ty}, which this test does not know");
            };
            families.insert(family, samples);
        }
        ensure!(
            families.len() > 1,
            "{what}: {} metrics registered",
            families.len()
        );
        out.insert(name.to_string(), families);
    }
    Ok(out)
}

/// A gRPC channel to a unix socket.
async fn unix_channel(socket: &Path) -> anyhow::Result<tonic::transport::Channel> {
    let socket = socket.to_path_buf();
    Ok(
        tonic::transport::Endpoint::from_static("http://unix.invalid")
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(20))
            .connect_with_connector(tower::service_fn(move |_| {
                let socket = socket.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(&socket).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }))
            .await?,
    )
}

/// A child process, killed when dropped.
struct Child {
    what: String,
    child: std::process::Child,
    log: PathBuf,
}

impl Child {
    fn start(what: &str, cmd: &mut Command, dir: &Path) -> anyhow::Result<Self> {
        let log = dir.join(format!("{what}.log"));
        let child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {what}: {cmd:?}"))?;
        Ok(Self {
            what: what.to_string(),
            child,
            log,
        })
    }

    /// Its /metrics on `port`, once it serves them (within 60 s, while it runs).
    fn scrape(&mut self, port: u16) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(body) = http_get(port, "/metrics") {
                return Ok(body);
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before serving /metrics: {}",
                    self.what,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "{} served no /metrics on {port} in 60 s: {}",
                self.what,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The body of a 200 answer to `GET path` on a loopback port, or `None`.
fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// The FUSE server's metrics: `lakecache-csi-node fuse-server` over one worker, mounted, a file
/// read through it, then the snapshot it writes beside its configuration (what the plugin's
/// /metrics adds per volume).
fn fuse_server_metrics(
    bins: &Path,
    dir: &Path,
    worker: u16,
    token: &str,
) -> anyhow::Result<String> {
    use std::io::{BufRead, BufReader};
    let mountpoint = dir.join("mnt");
    std::fs::create_dir_all(&mountpoint)?;
    let config = dir.join("fuse.json");
    std::fs::write(
        &config,
        serde_json::to_vec(&json!({
            "volumeId": "metrics-test",
            "mountPath": mountpoint,
            "namespace": "ml",
            "name": "lake",
            "workers": [{"id": "w0", "endpoint": format!("http://127.0.0.1:{worker}")}],
            "token": token,
            "prefetchBudget": 16u64 << 20,
            "fuseThreads": 2,
            "startupTimeout": "20s",
        }))?,
    )?;
    let mut child = Command::new(bins.join("lakecache-csi-node"))
        .args(["fuse-server", "--config"])
        .arg(&config)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(dir.join("fuse-server.log"))?)
        .spawn()
        .context("starting the fuse-server")?;
    // Unmounted and stopped however this ends.
    struct Mounted(std::process::Child, PathBuf);
    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(self.0.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
            let _ = nix::mount::umount2(&self.1, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let stdout = child.stdout.take().context("fuse-server stdout")?;
    let _mounted = Mounted(child, mountpoint.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .context("the fuse-server said nothing in 30 s")?;
    ensure!(
        line.trim() == "ready",
        "the fuse-server did not mount: {line} {}",
        std::fs::read_to_string(dir.join("fuse-server.log")).unwrap_or_default()
    );
    let read = std::fs::read(mountpoint.join("data/a.bin")).context("reading through FUSE")?;
    ensure!(
        read == lakecache_e2e::pattern(1, 300_000),
        "FUSE read other bytes"
    );
    // A snapshot written after the read (one every 2 s) counts its blocks.
    let snapshot = config.with_extension("prom");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&snapshot).unwrap_or_default();
        if text
            .lines()
            .any(|l| l.starts_with("lakecache_fuse_blocks_total{") && !l.ends_with(" 0"))
        {
            return Ok(text);
        }
        ensure!(
            Instant::now() < deadline,
            "no snapshot counting the read in {}: {text}",
            snapshot.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_name_only_metrics_the_binaries_serve() -> anyhow::Result<()> {
    lakecache_e2e::init_logging();
    let bins = lakecache_e2e::image::binaries_dir()?;
    let cluster = Cluster::start(ClusterOptions::apiserver_only()).await?;
    let started = Instant::now();
    let dir = tempfile::tempdir()?;
    let dir = dir.path();
    // What each binary serves here: metric family → the sample names Prometheus stores.
    let mut served: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();

    // A worker over a lake of one file, as its pod runs it.
    let lake = dir.join("lake");
    std::fs::create_dir_all(lake.join("data"))?;
    std::fs::write(lake.join("data/a.bin"), lakecache_e2e::pattern(1, 300_000))?;
    let token = "metrics-token";
    std::fs::write(dir.join("token"), token)?;
    let (grpc, admin) = (free_port(), free_port());
    std::fs::write(
        dir.join("worker.json"),
        serde_json::to_vec(&json!({
            "id": "w0",
            "source": {"uri": format!("file://{}", lake.display())},
            "listen": format!("127.0.0.1:{grpc}"),
            "adminListen": format!("127.0.0.1:{admin}"),
            "blockSize": "64KiB",
            "tiers": [
                {"kind": "Memory", "path": dir.join("mem"), "size": "64MiB"},
                {"kind": "Disk", "path": dir.join("disk"), "size": "64MiB"},
            ],
            "tokenFile": dir.join("token"),
        }))?,
    )?;
    let mut worker = Child::start(
        "worker",
        Command::new(bins.join("lakecache-worker"))
            .arg("--config")
            .arg(dir.join("worker.json")),
        dir,
    )?;
    worker.scrape(admin)?;
    let fuse = tokio::task::block_in_place(|| fuse_server_metrics(&bins, dir, grpc, token))?;
    served.insert("FUSE server".into(), families(&fuse)?);
    // After the read: the worker's hits and misses have samples too.
    let worker_text = worker.scrape(admin)?;
    ensure!(
        worker_text.contains("lakecache_worker_block_misses_total "),
        "{worker_text}"
    );
    served.insert("worker".into(), families(&worker_text)?);

    // The CSI plugin, called as kubelet calls it, and the builtin registrar dialing it,
    // registered as kubelet registers it.
    let csi_admin = free_port();
    let socket = dir.join("csi.sock");
    let mut plugin = Child::start(
        "csi-plugin",
        Command::new(bins.join("lakecache-csi-node"))
            .arg("plugin")
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .args(["--node-id", "node-1"])
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--legacy-state-dir")
            .arg(dir.join("legacy-state"))
            .arg("--admin-listen")
            .arg(format!("127.0.0.1:{csi_admin}")),
        dir,
    )?;
    plugin.scrape(csi_admin)?;
    let mut node = NodeClient::new(unix_channel(&socket).await?);
    let stats = node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: "no-such-volume".into(),
            volume_path: dir.join("nowhere").display().to_string(),
            ..Default::default()
        })
        .await;
    ensure!(stats.is_err(), "stats of a volume never staged: {stats:?}");
    let text = plugin.scrape(csi_admin)?;
    ensure!(
        text.contains("lakecache_csi_calls_total{"),
        "the call was not counted: {text}"
    );
    served.insert("CSI plugin".into(), families(&text)?);
    let registrar_admin = free_port();
    let registry = dir.join("registry");
    std::fs::create_dir_all(&registry)?;
    let mut registrar = Child::start(
        "registrar",
        Command::new(bins.join("lakecache-csi-node"))
            .arg("registrar")
            .arg("--csi-address")
            .arg(&socket)
            .arg("--kubelet-registration-path")
            .arg("/var/lib/kubelet/plugins/csi.lakecache.io/csi.sock")
            .arg("--registration-dir")
            .arg(&registry)
            .arg("--admin-listen")
            .arg(format!("127.0.0.1:{registrar_admin}")),
        dir,
    )?;
    registrar.scrape(registrar_admin)?;
    let reg_socket = registry.join("csi.lakecache.io-reg.sock");
    eventually("the registration socket", WAIT, || async {
        Ok(reg_socket.exists().then_some(()))
    })
    .await?;
    let mut kubelet = RegistrationClient::new(unix_channel(&reg_socket).await?);
    kubelet.get_info(InfoRequest {}).await?;
    kubelet
        .notify_registration_status(RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        })
        .await?;
    let text = registrar.scrape(registrar_admin)?;
    ensure!(
        text.contains("lakecache_csi_registrar_kubelet_calls_total{"),
        "kubelet's calls were not counted: {text}"
    );
    served.insert("registrar".into(), families(&text)?);

    // The operator, leading against a real API server, with a CacheNamespace to reconcile.
    let crds = repo().join("crds");
    ok(
        "apply CRDs",
        cluster.kubectl(&[
            "apply",
            "--server-side",
            "-f",
            crds.to_str().context("utf-8")?,
        ]),
    )?;
    ok(
        "wait for the CRDs",
        cluster.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/cachenamespaces.lakecache.io",
            "crd/cachepreloads.lakecache.io",
        ]),
    )?;
    ok(
        "create namespace ml",
        cluster.kubectl(&["create", "namespace", "ml"]),
    )?;
    let cn = json!({
        "apiVersion": "lakecache.io/v1alpha1",
        "kind": "CacheNamespace",
        "metadata": {"name": "imagenet", "namespace": "ml"},
        "spec": {
            "source": {"uri": "s3://datasets/imagenet", "endpoint": "http://127.0.0.1:9", "region": "us-east-1"},
            "workers": {"replicas": 2},
            "tiers": [{"kind": "Memory", "size": "64Mi"}],
        },
    });
    // And one whose credentials Secret is missing: a problem the operator counts.
    let mut missing = cn.clone();
    missing["metadata"]["name"] = json!("coco");
    missing["spec"]["source"]["credentialsSecretRef"] = json!({"name": "no-such-secret"});
    for obj in [&cn, &missing] {
        ok(
            "apply a CacheNamespace",
            cluster.kubectl_with_stdin(
                &["apply", "--server-side", "-f", "-"],
                Some(&obj.to_string()),
            ),
        )?;
    }
    let operator_admin = free_port();
    let mut operator = Child::start(
        "operator",
        Command::new(bins.join("lakecache-operator"))
            .env("KUBECONFIG", cluster.kubeconfig_path())
            .env("POD_NAMESPACE", "default")
            .env("POD_NAME", "operator-metrics-test")
            .env("LAKECACHE_WORKER_IMAGE", IMAGE)
            .env(
                "LAKECACHE_ADMIN_LISTEN",
                format!("127.0.0.1:{operator_admin}"),
            ),
        dir,
    )?;
    operator.scrape(operator_admin)?;
    let sts = eventually(
        "the operator makes the workers' StatefulSet",
        WAIT,
        || async { Ok(get(&cluster, "statefulset", "imagenet-worker", Some("ml")).ok()) },
    )
    .await?;
    let deadline = Instant::now() + WAIT;
    let text = loop {
        let text = operator.scrape(operator_admin)?;
        if text.contains("lakecache_operator_object_problems_total{") {
            break text;
        }
        ensure!(
            Instant::now() < deadline,
            "the operator counted no problem for the missing Secret in {WAIT:?}: {text}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    ensure!(
        text.contains("lakecache_operator_reconciles_total{"),
        "no reconcile counted: {text}"
    );
    served.insert("operator".into(), families(&text)?);
    // What the binaries serve is what their code registers; the families with no sample yet
    // (a repair, a reconcile error) are taken from the code.
    let declared = declared_metrics()?;
    let all: BTreeMap<String, BTreeSet<String>> = declared
        .values()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (binary, fams) in &served {
        for (family, samples) in fams {
            assert_eq!(
                all.get(family),
                Some(samples),
                "{binary} serves {family} as {samples:?}, which its code does not register so"
            );
        }
        eprintln!("{binary}: serves {} metric families", fams.len());
    }
    for (name, fams) in &declared {
        let confirmed = fams
            .keys()
            .filter(|f| served.values().any(|s| s.contains_key(*f)))
            .count();
        eprintln!("{name}: {} registered, {confirmed} served here", fams.len());
        ensure!(
            confirmed > 0,
            "no metric of {name} was served: is its prefix right?"
        );
    }

    // The workers' PodMonitor selects the pods the operator makes, on their admin port, and
    // takes their CacheNamespace's name from the label they carry.
    let manifests = render(&cluster.dir().join("helm-home"), &["--set", MONITORING_ON])?;
    let objs = documents(&manifests)?;
    let pm = find(&objs, "PodMonitor", "lakecache-workers")?;
    let template = &sts["spec"]["template"];
    let pod_labels = &template["metadata"]["labels"];
    assert!(
        selects(&pm["spec"]["selector"], pod_labels),
        "{pm} does not select {pod_labels}"
    );
    let endpoint = &pm["spec"]["podMetricsEndpoints"][0];
    let ports = named_ports(&template["spec"]);
    let (_, admin_port) = ports
        .get(endpoint["port"].as_str().context("port")?)
        .with_context(|| format!("the workers have no port {}: {ports:?}", endpoint["port"]))?;
    let (_, grpc_port) = ports.get("grpc").context("the workers have no grpc port")?;
    assert_eq!(*admin_port, grpc_port + 1);
    let relabel = endpoint["relabelings"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["targetLabel"] == "cache_namespace"))
        .context("no cache_namespace relabeling")?;
    // Prometheus names a pod label's meta label with every character outside [A-Za-z0-9_] as _.
    let (key, value) = pod_labels
        .as_object()
        .and_then(|m| {
            m.iter()
                .find(|(k, v)| k.ends_with("/cache-namespace") && *v == "imagenet")
        })
        .context("the workers carry no label naming their CacheNamespace")?;
    let meta: String = key
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    assert_eq!(
        relabel["sourceLabels"],
        json!([format!("__meta_kubernetes_pod_label_{meta}")]),
        "{key}={value}"
    );

    // Every metric the dashboard and the alerts name is served, and the dashboard shows every
    // family served.
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(
        repo().join("charts/lakecache/dashboards/lakecache.json"),
    )?)?;
    let queries = dashboard_queries(&dashboard)?;
    let by_query = selected_metrics(&queries)?;
    let in_dashboard: BTreeSet<String> = by_query.values().flatten().cloned().collect();
    let unknown = unknown_metrics(&in_dashboard, &all);
    assert!(
        unknown.is_empty(),
        "the dashboard names metrics nothing serves: {unknown:?}"
    );
    let checked = check_monitoring_objects(&manifests)?;
    let in_alerts: BTreeSet<String> = checked
        .iter()
        .flat_map(|o| o["metrics"].as_array().into_iter().flatten())
        .filter_map(|m| m.as_str().map(String::from))
        .collect();
    assert!(in_alerts.len() > 5, "{in_alerts:?}");
    let unknown = unknown_metrics(&in_alerts, &all);
    assert!(
        unknown.is_empty(),
        "the alerts name metrics nothing serves: {unknown:?}"
    );
    let unshown: Vec<(&String, &String)> = declared
        .iter()
        .flat_map(|(binary, fams)| fams.iter().map(move |(f, samples)| (binary, f, samples)))
        .filter(|(_, _, samples)| samples.is_disjoint(&in_dashboard))
        .map(|(binary, f, _)| (binary, f))
        .collect();
    assert!(
        unshown.is_empty(),
        "the dashboard shows no panel of: {unshown:?}"
    );
    // A query naming a metric nothing serves is caught by the same check.
    let mut misspelt = queries.clone();
    let first = misspelt
        .iter_mut()
        .find(|q| q.contains("lakecache_worker_block_hits_total"))
        .context("no query of lakecache_worker_block_hits_total")?;
    *first = first.replace(
        "lakecache_worker_block_hits_total",
        "lakecache_worker_block_hit_total",
    );
    let unknown = unknown_metrics(selected_metrics(&misspelt)?.values().flatten(), &all);
    assert_eq!(
        unknown,
        BTreeSet::from(["lakecache_worker_block_hit_total".to_string()])
    );
    let broken = vec!["sum(rate(lakecache_worker_block_hits_total[5m])".to_string()];
    assert!(
        selected_metrics(&broken).is_err(),
        "a query that does not parse passed"
    );
    eprintln!(
        "{} dashboard queries and {} alert metrics checked against {} registered metric \
         families ({} served here) in {:.1} s",
        queries.len(),
        in_alerts.len(),
        all.len(),
        served.values().map(BTreeMap::len).sum::<usize>(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
