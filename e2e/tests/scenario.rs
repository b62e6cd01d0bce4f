//! The flow users run, as a whole, on a working cluster: a real control plane and a real node
//! (kubelet, containerd, runc) running our own image: `helm install` installs the operator and
//! the CSI DaemonSet, which registers itself with kubelet; a CacheNamespace over a bucket of a
//! real S3 server becomes three worker containers and a bound PVC; a CachePreload warms part of
//! the dataset; a training pod (the PyTorchJob example's pod template) mounts the PVC through
//! kubelet and checks every file against a checksum list; the workers scale 3→2 while a reader
//! runs without a failed read; under a reader that holds every file open, the CSI pod's plugin
//! and mounter containers are killed, the FUSE server is upgraded to another build and the
//! whole pod is upgraded through `helm upgrade`, each without a failed read or a lost open
//! file (the stalls are printed); deleting the pod costs a repair whose time is measured;
//! deleting the CacheNamespace removes everything it made and the mounts are gone.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use lakecache_e2e::cluster::eventually;
use lakecache_e2e::{Cluster, ClusterOptions, S3Server};
use serde_json::{Value, json};
use sha2::Digest;

const WAIT: Duration = Duration::from_secs(120);
const NS: &str = "ml";
const SYSTEM: &str = "lakecache-system";

fn repo() -> PathBuf {
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo")).join("..")
}

fn kubectl(cluster: &Cluster, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    cluster.kubectl_ok(args, stdin)
}

async fn wait<T, F, Fut>(what: &str, f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    eventually(what, WAIT, f).await
}

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn phase(p: &Pod) -> String {
    p.status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default()
}

/// The dataset: image-like files in class folders, two larger shards, a validation set.
fn dataset() -> Vec<(String, Vec<u8>)> {
    let mut files = vec![];
    for c in 0..10u64 {
        for i in 0..24u64 {
            let len = 12_000 + ((c * 7 + i * 13) % 20) as usize * 1000;
            files.push((
                format!("train/n{c:04}/img-{i:03}.jpg"),
                lakecache_e2e::pattern(c * 100 + i, len),
            ));
        }
    }
    for s in 0..2u64 {
        files.push((
            format!("shards/train-{s:05}.tfrecord"),
            lakecache_e2e::pattern(9000 + s, 5 * 1024 * 1024 + 4321),
        ));
    }
    for i in 0..20u64 {
        files.push((
            format!("val/img-{i:03}.jpg"),
            lakecache_e2e::pattern(5000 + i, 30_000),
        ));
    }
    files
}

fn sha256sums(files: &[(String, Vec<u8>)]) -> String {
    files
        .iter()
        .map(|(p, d)| format!("{}  {p}\n", hex(&sha2::Sha256::digest(d))))
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The pod template of the PyTorchJob example's master, made to read and check every file.
fn training_pod(name: &str, script: &str) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(repo().join("examples/pytorchjob.yaml"))?;
    let job: Value = serde_yaml_ng::from_str(&text)?;
    let mut template = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"].clone();
    ensure!(
        template.is_object(),
        "no master template in the PyTorchJob example"
    );
    let c = &mut template["spec"]["containers"][0];
    let mount = c["volumeMounts"][0]["mountPath"]
        .as_str()
        .context("a data mount")?
        .to_string();
    // No GPUs on this node, and no PyTorch image (nothing is pulled here): a shell of our own
    // image reads the files instead.
    c.as_object_mut().unwrap().remove("resources");
    c["image"] = json!(lakecache_e2e::image::chart_image()?);
    c["imagePullPolicy"] = json!("Never");
    c["command"] = json!(["sh", "-c", script.replace("$DATA", &mount)]);
    c["volumeMounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "checks", "mountPath": "/checks", "readOnly": true}));
    template["spec"]["volumes"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "checks", "configMap": {"name": "imagenet-checksums"}}));
    template["spec"]["restartPolicy"] = json!("Never");
    Ok(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {"app": "trainer"}},
        "spec": template["spec"],
    }))
}

struct Env {
    // Declared first, so the server stops before the cluster's network goes.
    s3: S3Server,
    cluster: Cluster,
    root: tempfile::TempDir,
}

impl Env {
    /// A container's log (`kubectl logs`), or what kubectl said.
    fn logs(&self, ns: &str, pod: &str, container: &str) -> String {
        let out = self
            .cluster
            .kubectl(&["-n", ns, "logs", pod, "-c", container]);
        if out.status.success() {
            String::from_utf8_lossy(&out.stdout).into_owned()
        } else {
            format!("(kubectl logs: {})", String::from_utf8_lossy(&out.stderr))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_training_job_reads_its_dataset_through_the_pvc() -> anyhow::Result<()> {
    lakecache_e2e::init_logging();
    let started = Instant::now();
    let files = dataset();
    let cluster = Cluster::start(ClusterOptions::with_node()).await?;
    let s3 = S3Server::start_on(cluster.host_ip())?;
    let uploads: Vec<_> = files
        .iter()
        .map(|(p, d)| (format!("imagenet/{p}"), d.clone()))
        .collect();
    s3.create_bucket("datasets", &uploads).await?;
    let root = tempfile::Builder::new()
        .prefix("lc-e2e-")
        .tempdir_in("/tmp")?;
    let env = Env { s3, cluster, root };
    let r = scenario(&env, &files, started).await;
    if r.is_err() {
        let client = env.cluster.client().await?;
        for ns in [SYSTEM, NS] {
            let Ok(list) = Api::<Pod>::namespaced(client.clone(), ns)
                .list(&ListParams::default())
                .await
            else {
                continue;
            };
            for p in &list.items {
                let name = p.metadata.name.clone().unwrap_or_default();
                for c in p.spec.iter().flat_map(|s| s.containers.iter()) {
                    let log = env.logs(ns, &name, &c.name);
                    let tail: Vec<&str> = log.lines().rev().take(25).collect();
                    eprintln!(
                        "--- {ns}/{name}/{} ---\n{}",
                        c.name,
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
            }
        }
        let kubelet = env.cluster.node().log_path("kubelet");
        let text = std::fs::read_to_string(&kubelet).unwrap_or_default();
        let errors: Vec<&str> = text.lines().filter(|l| l.starts_with('E')).collect();
        eprintln!(
            "--- kubelet errors (last 25) ---\n{}",
            errors[errors.len().saturating_sub(25)..].join("\n")
        );
    }
    r
}

async fn scenario(env: &Env, files: &[(String, Vec<u8>)], started: Instant) -> anyhow::Result<()> {
    let cluster = &env.cluster;
    let client = cluster.client().await?;
    let kubelet = env.cluster.node().kubelet_dir();
    let mut steps: Vec<(String, f64)> = vec![];
    // The first step counts from the test's start: the control plane, the node and the image.
    let mut mark = started;
    let mut step = |name: &str| {
        steps.push((name.to_string(), mark.elapsed().as_secs_f64()));
        mark = Instant::now();
    };
    step("control plane, a Ready node with our image, and the S3 server up");

    // 1. Install lakecache from the chart, as users do; the image is the one the node holds
    // (the chart's default name), which is never pulled.
    let chart = repo().join("charts/lakecache");
    let out = cluster.helm(&[
        "install",
        "lakecache",
        chart.to_str().unwrap(),
        "--namespace",
        SYSTEM,
        "--create-namespace",
        "--set",
        &format!("csi.kubeletDir={}", kubelet.display()),
        "--set",
        "operator.replicas=1",
        "--set",
        "operator.resync=2s",
        "--set",
        "operator.sourceScanInterval=5s",
        "--set",
        "csi.repairInterval=1s",
        "--set",
        "image.pullPolicy=Never",
        // The CacheNamespace's Disk tier lives in the test's directory: the one the operator
        // allows.
        "--set",
        &format!(
            "workers.allowedHostPathRoots={{{}}}",
            env.root.path().join("node-cache").display()
        ),
    ]);
    ensure!(
        out.status.success(),
        "helm install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sys: Api<Pod> = Api::namespaced(client.clone(), SYSTEM);
    wait("the operator and the CSI plugin ready", || async {
        let pods = sys.list(&ListParams::default()).await?.items;
        let ok = |part: &str| {
            pods.iter()
                .any(|p| p.metadata.name.as_deref().unwrap_or("").contains(part) && ready(p))
        };
        Ok((ok("operator") && ok("csi-node")).then_some(()))
    })
    .await?;
    let deploy: Deployment = Api::namespaced(client.clone(), "lakecache-system")
        .get("lakecache-operator")
        .await?;
    ensure!(deploy.status.and_then(|s| s.ready_replicas) == Some(1));
    let ds: DaemonSet = Api::namespaced(client.clone(), "lakecache-system")
        .get("lakecache-csi-node")
        .await?;
    ensure!(ds.status.map(|s| s.number_ready) == Some(1));
    // kubelet knows the driver: the registrar registered it.
    let registered = wait("the driver registered with kubelet", || async {
        let n: k8s_openapi::api::storage::v1::CSINode = Api::all(client.clone())
            .get(env.cluster.node().name())
            .await?;
        Ok(n.spec
            .drivers
            .iter()
            .find(|d| d.name == lakecache_api::CSI_DRIVER)
            .map(|d| d.node_id.clone()))
    })
    .await?;
    ensure!(
        registered == env.cluster.node().name(),
        "node id {registered}"
    );
    step("chart installed; operator and CSI plugin running, driver registered");

    // 2. A Secret and a CacheNamespace over the bucket.
    kubectl(cluster, &["create", "namespace", NS], None)?;
    let manifest = json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds", "namespace": NS},
         "stringData": {"access_key_id": lakecache_e2e::s3::ACCESS_KEY, "secret_access_key": lakecache_e2e::s3::SECRET_KEY}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "imagenet-checksums", "namespace": NS},
         "data": {"SHA256SUMS": sha256sums(files)}},
        {"apiVersion": "lakecache.io/v1alpha1", "kind": "CacheNamespace",
         "metadata": {"name": "imagenet", "namespace": NS},
         "spec": {
            "source": {
                "uri": "s3://datasets/imagenet", "endpoint": env.s3.endpoint(), "region": "us-east-1",
                "credentialsSecretRef": {"name": "s3-creds"},
                "options": {"disable_config_load": "true", "disable_ec2_metadata": "true"},
            },
            "workers": {"replicas": 3},
            "tiers": [
                {"kind": "Memory", "size": "32Mi"},
                {"kind": "Disk", "size": "128Mi", "path": env.root.path().join("node-cache").display().to_string()},
            ],
            "blockSize": "1Mi",
         }},
    ]});
    kubectl(
        cluster,
        &["apply", "--server-side", "-f", "-"],
        Some(&manifest.to_string()),
    )?;

    // 3. Ready: real worker processes, the worker list published, the PVC bound.
    let cns: Api<lakecache_api::CacheNamespace> = Api::namespaced(client.clone(), NS);
    let cn = wait("the CacheNamespace Ready with 3 workers", || async {
        let cn = cns.get("imagenet").await?;
        let st = cn.status.clone().unwrap_or_default();
        Ok(
            (st.phase == Some(lakecache_api::CacheNamespacePhase::Ready) && st.ready_workers == 3)
                .then_some(cn),
        )
    })
    .await?;
    let st = cn.status.unwrap();
    ensure!(
        st.workers
            .iter()
            .all(|w| w.ready && w.address.starts_with("198.19.0.")),
        "{:?}",
        st.workers
    );
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), NS);
    wait("the PVC bound", || async {
        let pvc = pvcs.get("imagenet").await?;
        Ok((pvc.status.and_then(|s| s.phase).as_deref() == Some("Bound")).then_some(()))
    })
    .await?;
    let scanned = wait("the source scanned", || async {
        let st = cns.get("imagenet").await?.status.unwrap_or_default();
        Ok(st.source_files.map(|f| (f, st.source_bytes.unwrap_or(0))))
    })
    .await?;
    ensure!(
        scanned.0 == files.len() as i64,
        "scan found {} files",
        scanned.0
    );
    step("CacheNamespace Ready: 3 workers, PVC bound, source scanned");

    // 4. Preload the train folder; its progress reaches 100% and the cached share rises.
    let before = cns
        .get("imagenet")
        .await?
        .status
        .unwrap_or_default()
        .cached_bytes
        .unwrap_or(0);
    kubectl(
        cluster,
        &["apply", "-f", "-"],
        Some(
            &json!({
                "apiVersion": "lakecache.io/v1alpha1", "kind": "CachePreload",
                "metadata": {"name": "warm-train", "namespace": NS},
                "spec": {"cacheNamespace": "imagenet", "paths": ["train/**"]},
            })
            .to_string(),
        ),
    )?;
    let cpls: Api<lakecache_api::CachePreload> = Api::namespaced(client.clone(), NS);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let cp = wait("the preload at 100%", || {
        let cpls = cpls.clone();
        let seen = seen.clone();
        async move {
            let cp = cpls.get("warm-train").await?;
            let st = cp.status.clone().unwrap_or_default();
            if let Some(p) = &st.progress {
                let mut seen = seen.lock().unwrap();
                if seen.last() != Some(p) {
                    seen.push(p.clone());
                }
            }
            ensure!(
                st.phase != Some(lakecache_api::CachePreloadPhase::Failed),
                "preload failed: {st:?}"
            );
            Ok((st.phase == Some(lakecache_api::CachePreloadPhase::Succeeded)).then_some(cp))
        }
    })
    .await?;
    let ps = cp.status.unwrap();
    let train_bytes: u64 = files
        .iter()
        .filter(|(p, _)| p.starts_with("train/"))
        .map(|(_, d)| d.len() as u64)
        .sum();
    ensure!(
        ps.progress.as_deref() == Some("100%") && ps.bytes_done == train_bytes as i64,
        "{ps:?}"
    );
    ensure!(ps.workers.len() == 3);
    let cn = wait("the cached share to rise", || async {
        let cn = cns.get("imagenet").await?;
        let c = cn
            .status
            .clone()
            .unwrap_or_default()
            .cached_bytes
            .unwrap_or(0);
        Ok((c >= before + train_bytes as i64).then_some(cn))
    })
    .await?;
    let pct = cn
        .status
        .as_ref()
        .unwrap()
        .cached_percentage
        .clone()
        .unwrap_or_default();
    let seen = seen.lock().unwrap().join(" → ");
    step(&format!("preload: progress {seen} → cached {pct}"));

    // 5. The training pod reads every file through the PVC and checks each.
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let check = "cd $DATA && sha256sum -c --quiet /checks/SHA256SUMS && echo ALL-FILES-OK";
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(training_pod("trainer-0", check)?)?,
    )
    .await?;
    let p = wait("the training pod to finish", || async {
        let p = pods.get("trainer-0").await?;
        Ok(matches!(phase(&p).as_str(), "Succeeded" | "Failed").then_some(p))
    })
    .await?;
    let log = env.logs(NS, "trainer-0", "pytorch");
    ensure!(
        phase(&p) == "Succeeded" && log.contains("ALL-FILES-OK"),
        "the reader failed:\n{log}"
    );
    let hit = wait("the hit ratio to reflect the preload", || async {
        let st = cns.get("imagenet").await?.status.unwrap_or_default();
        Ok(st.hit_ratio.filter(|h| *h > 0.3))
    })
    .await?;
    step(&format!(
        "training pod read and checked {} files; hit ratio {hit}",
        files.len()
    ));

    // One stage; publish at least once (the CSIDriver's requiresRepublish has kubelet publish
    // again periodically, with the current token).
    let calls = csi_calls(env).await?;
    ensure!(
        calls.get("NodeStageVolume/Ok") == Some(&1)
            && calls.get("NodePublishVolume/Ok").copied().unwrap_or(0) >= 1,
        "{calls:?}"
    );

    // 6. Scale 3→2 while a reader runs: not one failed read. The test drops the node's page
    // cache between the reader's passes (the pod itself may not), so every pass reads through
    // the mount.
    let loops = "for i in 1 2 3 4 5 6; do \
                 cd $DATA && sha256sum -c --quiet /checks/SHA256SUMS || exit 1; echo pass-$i; sleep 0.5; done; echo ALL-PASSES-OK";
    let dropper = drop_caches_while_running();
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(training_pod("trainer-1", loops)?)?,
    )
    .await?;
    wait("the reader's first pass", || async {
        Ok(env
            .logs(NS, "trainer-1", "pytorch")
            .contains("pass-1")
            .then_some(()))
    })
    .await?;
    kubectl(
        cluster,
        &[
            "scale",
            "cachenamespace",
            "imagenet",
            "-n",
            NS,
            "--replicas=2",
        ],
        None,
    )?;
    let p = wait("the reader to finish", || async {
        let p = pods.get("trainer-1").await?;
        Ok(matches!(phase(&p).as_str(), "Succeeded" | "Failed").then_some(p))
    })
    .await?;
    let log = env.logs(NS, "trainer-1", "pytorch");
    ensure!(
        phase(&p) == "Succeeded" && log.contains("ALL-PASSES-OK"),
        "a read failed during the scale-down:\n{log}"
    );
    let st = wait("two workers", || async {
        let st = cns.get("imagenet").await?.status.unwrap_or_default();
        Ok((st.ready_workers == 2 && st.workers.len() == 2).then_some(st))
    })
    .await?;
    ensure!(
        st.workers.iter().all(|w| w.name != "imagenet-worker-2"),
        "{:?}",
        st.workers
    );
    step("scaled 3→2 under a reader with no failed read");

    // 7. The CSI pod's processes restart and upgrade under readers. One holds every file open
    // (`lakecache verify --hold`: each pass reads every file through the handle it opened at
    // its first pass and through a new open, past the page cache, and checks its checksum); a
    // plain one reads with `sha256sum`. The plugin and the mounter each keep a copy of the
    // FUSE connection, and a successor takes it over: the plugin killed, the mounter killed
    // (with its FUSE server), the FUSE server upgraded to another build and the whole CSI pod
    // upgraded through the chart (`helm upgrade`, whose hook restarts the pod's containers one
    // at a time) each cost no failed read and no open file. Deleting the pod kills every
    // holder: the DaemonSet's new pod repairs the mount (files open on it break), and the
    // plain reader reads again after a stall that is measured.
    let holder = "exec lakecache verify --sums /checks/SHA256SUMS --dir $DATA --hold --every 200ms";
    let reader = "trap 'exit 0' TERM; while true; do cd / && cd $DATA && \
                  if sha256sum -c --quiet /checks/SHA256SUMS >/dev/null 2>&1; \
                  then echo ok $(date +%s.%N); else echo fail $(date +%s.%N); fi; sleep 0.2; done";
    for (name, script) in [("holder", holder), ("reader", reader)] {
        pods.create(
            &PostParams::default(),
            &serde_json::from_value(training_pod(name, script)?)?,
        )
        .await?;
    }
    wait("the readers' first passes", || async {
        Ok((env.logs(NS, "holder", "pytorch").contains(" ok files=")
            && env.logs(NS, "reader", "pytorch").contains("ok "))
        .then_some(()))
    })
    .await?;
    let fuse_servers_before = fuse_server_pids();
    ensure!(
        fuse_servers_before.len() == 1,
        "FUSE servers: {fuse_servers_before:?}"
    );
    let csi_pod = |sys: Api<Pod>| async move {
        let list = sys
            .list(&ListParams::default().labels("app.kubernetes.io/component=csi-node"))
            .await?;
        list.items.into_iter().next().context("no CSI pod")
    };
    let restarts = |p: &Pod, c: &str| {
        p.status
            .iter()
            .flat_map(|s| s.container_statuses.iter().flatten())
            .find(|s| s.name == c)
            .map(|s| {
                (
                    s.restart_count,
                    s.container_id.clone().unwrap_or_default(),
                    s.ready,
                )
            })
            .unwrap_or_default()
    };
    // The holder's passes since `since`: (ok, the pass's end, its slowest read in ms, the line).
    let held_passes = |since: f64| {
        env.logs(NS, "holder", "pytorch")
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                (w.next()? == "pass").then_some(())?;
                let _n = w.next()?;
                let t: f64 = w.next()?.parse().ok()?;
                let ok = w.next()? == "ok";
                let slowest = l
                    .rsplit_once("slowest_ms=")
                    .and_then(|(_, v)| v.parse::<u64>().ok())
                    .unwrap_or(0);
                (t > since).then(|| (ok, t, slowest, l.to_string()))
            })
            .collect::<Vec<_>>()
    };
    let files_held = format!("held={}", files.len());
    // After an event that began at `since` and ended at `done`: three good passes after
    // `done`, no failed pass since `since`, every file still read through the handle opened
    // before it; the longest read and the longest gap between passes (a pass waiting on the
    // mount) since `since`.
    let after_event = |what: String, since: f64, done: f64| {
        let files_held = files_held.clone();
        let held_passes = &held_passes;
        async move {
            wait(&format!("three good passes after {what}"), || async {
                Ok((held_passes(done).iter().filter(|p| p.0).count() >= 3).then_some(()))
            })
            .await?;
            let passes = held_passes(since);
            let failed: Vec<&String> = passes.iter().filter(|p| !p.0).map(|p| &p.3).collect();
            ensure!(failed.is_empty(), "{what}: failed reads: {failed:?}");
            ensure!(
                passes.iter().all(|p| p.3.contains(&files_held)),
                "{what}: a handle opened before the event is gone: {passes:?}"
            );
            let slowest = passes.iter().map(|p| p.2).max().unwrap_or(0);
            let mut gap = 0.0f64;
            let mut last = since;
            for p in &passes {
                gap = gap.max(p.1 - last);
                last = p.1;
            }
            anyhow::Ok(format!(
                "{what}: {} passes, none failed, files opened before it still read; longest read {slowest} ms, longest gap between passes {:.0} ms",
                passes.len(),
                gap * 1000.0
            ))
        }
    };
    let mut stalls = vec![];

    // The plugin killed: the FUSE server lives in the mounter and does not notice.
    let p = csi_pod(sys.clone()).await?;
    let (before, id, _) = restarts(&p, "csi-plugin");
    let killed_at = now();
    env.cluster.node().kill_container(&id)?;
    wait("the csi-plugin container restarted and ready", || async {
        let p = csi_pod(sys.clone()).await?;
        let (n, _, ready) = restarts(&p, "csi-plugin");
        Ok((n > before && ready).then_some(()))
    })
    .await?;
    stalls.push(after_event("csi-plugin killed".into(), killed_at, now()).await?);
    ensure!(
        fuse_server_pids() == fuse_servers_before,
        "the plugin's restart started or stopped FUSE servers: {:?} → {:?}",
        fuse_servers_before,
        fuse_server_pids()
    );
    step(stalls.last().unwrap());

    // The mounter killed, and its FUSE server with it: the plugin starts a successor on the
    // connection it kept, and hands it back to the mounter once that is back.
    let p = csi_pod(sys.clone()).await?;
    let (before, id, _) = restarts(&p, "mounter");
    let killed_at = now();
    env.cluster.node().kill_container(&id)?;
    wait("the mounter container restarted and ready", || async {
        let p = csi_pod(sys.clone()).await?;
        let (n, _, ready) = restarts(&p, "mounter");
        Ok((n > before && ready).then_some(()))
    })
    .await?;
    stalls.push(after_event("mounter killed".into(), killed_at, now()).await?);
    let servers = fuse_server_pids();
    ensure!(
        servers.len() == 1 && servers != fuse_servers_before,
        "FUSE servers after the mounter's death: {fuse_servers_before:?} → {servers:?}"
    );
    step(stalls.last().unwrap());

    // The FUSE server upgraded to another build: a copy of the binary whose build tag (the
    // version string) differs, in the state directory the mounter sees, run by
    // `lakecache-csi-node upgrade-fuse` in the mounter container.
    let state_dir = kubelet.join(format!("plugins/{}-state", lakecache_api::CSI_DRIVER));
    let next = state_dir.join("lakecache-csi-node-next");
    {
        let bin = lakecache_e2e::image::binaries_dir()?.join("lakecache-csi-node");
        let mut b = std::fs::read(&bin).with_context(|| format!("reading {}", bin.display()))?;
        let (old, new) = (b"lakecache-build-0000", b"lakecache-build-0001");
        let mut patched = 0;
        for i in 0..b.len().saturating_sub(old.len()) {
            if &b[i..i + old.len()] == old {
                b[i..i + old.len()].copy_from_slice(new);
                patched += 1;
            }
        }
        ensure!(patched > 0, "no build tag in {}", bin.display());
        std::fs::write(&next, &b)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o755))?;
    }
    let p = csi_pod(sys.clone()).await?;
    let csi_pod_name = p.metadata.name.clone().unwrap_or_default();
    let upgraded_at = now();
    let out = kubectl(
        cluster,
        &[
            "-n",
            SYSTEM,
            "exec",
            &csi_pod_name,
            "-c",
            "mounter",
            "--",
            "lakecache-csi-node",
            "upgrade-fuse",
            "--exe",
            next.to_str().unwrap(),
        ],
        None,
    )?;
    ensure!(out.contains("took over"), "upgrade-fuse: {out}");
    stalls.push(after_event("FUSE server upgraded".into(), upgraded_at, now()).await?);
    let log = env.logs(SYSTEM, &csi_pod_name, "mounter");
    ensure!(
        log.contains("lakecache-build-0001"),
        "the new build does not serve: {}",
        log.lines().rev().take(20).collect::<Vec<_>>().join("\n")
    );
    step(stalls.last().unwrap());

    // The whole CSI pod upgraded as the README says: `helm upgrade` with a new image (here
    // the same content under a new tag); the chart's hook restarts the pod's containers one at
    // a time, in place. The pod stays (same uid), each container runs the new image.
    let image = lakecache_e2e::image::chart_image()?;
    let (repo_name, _) = image.rsplit_once(':').context("an image tag")?;
    let next_image = format!("{repo_name}:next");
    env.cluster
        .node()
        .ctr(&["images", "tag", "--force", &image, &next_image])?;
    let old = csi_pod(sys.clone()).await?;
    let old_uid = old.metadata.uid.clone();
    let upgraded_at = now();
    let out = cluster.helm(&[
        "upgrade",
        "lakecache",
        chart.to_str().unwrap(),
        "--namespace",
        SYSTEM,
        "--reuse-values",
        "--set",
        "image.tag=next",
        "--timeout",
        "10m",
    ]);
    ensure!(
        out.status.success(),
        "helm upgrade: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let p = wait("the CSI pod on the new image", || async {
        let p = csi_pod(sys.clone()).await?;
        let on_new = p.spec.as_ref().is_some_and(|s| {
            s.containers
                .iter()
                .all(|c| c.image.as_deref() == Some(next_image.as_str()))
        });
        Ok((on_new && ready(&p)).then_some(p))
    })
    .await?;
    ensure!(
        p.metadata.uid == old_uid,
        "the upgrade replaced the CSI pod instead of restarting its containers"
    );
    stalls.push(
        after_event(
            "CSI pod upgraded through the chart".into(),
            upgraded_at,
            now(),
        )
        .await?,
    );
    step(stalls.last().unwrap());
    pods.delete("holder", &DeleteParams::default()).await?;

    // Every holder of the connection killed at once: the pod deleted. The DaemonSet's new pod
    // repairs the mount; the plain reader reads again after a stall.
    let passes_after = |since: f64| {
        let log = env.logs(NS, "reader", "pytorch");
        log.lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(_, t)| t.parse::<f64>().is_ok_and(|t| t > since))
            .map(|(r, t)| (r.to_string(), t.parse::<f64>().unwrap()))
            .collect::<Vec<_>>()
    };
    let old = csi_pod(sys.clone()).await?;
    let old_uid = old.metadata.uid.clone();
    let killed_at = now();
    sys.delete(
        old.metadata.name.as_deref().unwrap_or_default(),
        &DeleteParams::default(),
    )
    .await?;
    wait("a new CSI pod ready", || async {
        let p = csi_pod(sys.clone()).await?;
        Ok((p.metadata.uid != old_uid && ready(&p)).then_some(()))
    })
    .await?;
    let back = wait(
        "the reader reading again after the CSI pod's replacement",
        || async { Ok(reading_again(&passes_after(killed_at))) },
    )
    .await?;
    let pod_stall = back - killed_at;
    step(&format!(
        "CSI pod deleted: the DaemonSet's new pod repaired the mount, the reader read again {pod_stall:.1} s after the delete"
    ));
    eprintln!("hand-off on the real node:");
    for s in &stalls {
        eprintln!("  {s}");
    }
    drop(dropper);

    // 7b. A tenant attacks through the node: a ServiceAccount of another namespace that may only
    // create pods and CacheNamespaces there. Each attack is refused, and says why.
    let refused = tenant_attacks(env, &client).await?;
    step(&format!(
        "tenant attacks through the node refused: {refused}"
    ));

    // 8. The pods go (their mounts are unpublished, the volume unstaged); deleting the
    // CacheNamespace removes everything it made.
    for p in ["trainer-0", "trainer-1", "reader"] {
        pods.delete(p, &DeleteParams::default()).await?;
    }
    wait("the trainer pods gone", || async {
        Ok(pods
            .list(&ListParams::default().labels("app=trainer"))
            .await?
            .items
            .is_empty()
            .then_some(()))
    })
    .await?;
    let fuse_mounts = || -> anyhow::Result<Vec<String>> {
        let text = std::fs::read_to_string("/proc/self/mountinfo")?;
        Ok(text
            .lines()
            .filter(|l| l.contains(" - fuse") && l.contains("lakecache"))
            .filter(|l| {
                l.split(' ')
                    .nth(4)
                    .is_some_and(|m| Path::new(m).starts_with(&kubelet))
            })
            .map(str::to_string)
            .collect())
    };
    wait("no lakecache mount left on the node", || async {
        Ok(fuse_mounts()?.is_empty().then_some(()))
    })
    .await?;
    // The mount goes while NodeUnstageVolume is still answering: wait for the call to be done.
    // The plugin that answers is the CSI pod's replacement: its counters start there.
    let calls = wait("NodeUnstageVolume answered", || async {
        let calls = csi_calls(env).await?;
        Ok(calls.contains_key("NodeUnstageVolume/Ok").then_some(calls))
    })
    .await?;
    // The trainers finished earlier (kubelet unpublished their volumes then); the reader's
    // volume is the one the new plugin unpublished.
    ensure!(
        calls.get("NodeUnpublishVolume/Ok").copied().unwrap_or(0) >= 1,
        "{calls:?}"
    );
    let pv_name = {
        let pvc = pvcs.get("imagenet").await?;
        pvc.spec
            .and_then(|s| s.volume_name)
            .context("the PVC names no PV")?
    };
    cns.delete("imagenet", &DeleteParams::default()).await?;
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    wait("everything the CacheNamespace made gone", || async {
        let left = [
            sts.get_opt("imagenet-worker").await?.is_some(),
            pvcs.get_opt("imagenet").await?.is_some(),
            pvs.get_opt(&pv_name).await?.is_some(),
            !pods
                .list(&ListParams::default().labels("app.kubernetes.io/component=worker"))
                .await?
                .items
                .is_empty(),
            cns.get_opt("imagenet").await?.is_some(),
        ];
        Ok((!left.iter().any(|l| *l)).then_some(()))
    })
    .await?;
    step("CacheNamespace deleted: workers, PVC, PV and mounts gone");
    let node = env.cluster.node();
    ensure!(
        fuse_server_pids().is_empty(),
        "FUSE servers left on the node: {:?}",
        fuse_server_pids()
    );
    eprintln!("(node up in {:.1} s)", node.started_in().as_secs_f64());
    let total = started.elapsed().as_secs_f64();
    eprintln!("scenario steps:");
    for (name, secs) in &steps {
        eprintln!("  {secs:6.1} s  {name}");
    }
    eprintln!("  {total:6.1} s  in all");
    Ok(())
}

const TENANT_NS: &str = "team-b";

/// The `FailedMount` messages kubelet recorded for a pod (`kubectl get events`), joined.
fn mount_failures(cluster: &Cluster, pod: &str) -> anyhow::Result<String> {
    let out = kubectl(
        cluster,
        &[
            "-n",
            TENANT_NS,
            "get",
            "events",
            "--field-selector",
            &format!("involvedObject.name={pod},reason=FailedMount"),
            "-o",
            "jsonpath={range .items[*]}{.message}{\"\\n\"}{end}",
        ],
        None,
    )?;
    Ok(out)
}

/// A tenant, as an attacker: a ServiceAccount of namespace `team-b` whose Role lets it create
/// pods and CacheNamespaces there and nothing else, tries what it must not be able to do
/// through the CSI driver and the API. Returns a summary of what each attempt got.
async fn tenant_attacks(env: &Env, admin: &kube::Client) -> anyhow::Result<String> {
    let cluster = &env.cluster;
    kubectl(cluster, &["create", "namespace", TENANT_NS], None)?;
    let rbac = json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": "tenant", "namespace": TENANT_NS}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "tenant", "namespace": TENANT_NS},
         "rules": [
            {"apiGroups": [""], "resources": ["pods", "secrets"],
             "verbs": ["create", "get", "list", "watch", "delete"]},
            {"apiGroups": ["lakecache.io"], "resources": ["cachenamespaces"],
             "verbs": ["create", "get", "list", "watch", "delete"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "tenant", "namespace": TENANT_NS},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tenant"},
         "subjects": [{"kind": "ServiceAccount", "name": "tenant", "namespace": TENANT_NS}]},
    ]});
    kubectl(cluster, &["apply", "-f", "-"], Some(&rbac.to_string()))?;
    let tenant = lakecache_e2e::cluster::client_from_kubeconfig(
        &cluster
            .kubeconfig_for_service_account(TENANT_NS, "tenant")
            .await?,
    )
    .await?;
    let mut got = vec![];

    // Through the API: the other namespace's token, its cache, a PersistentVolume of the driver.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(tenant.clone(), NS);
    ensure!(
        is_forbidden(&secrets.get("imagenet-token").await),
        "the tenant read another namespace's data-plane token"
    );
    let other: Api<lakecache_api::CacheNamespace> = Api::namespaced(tenant.clone(), NS);
    ensure!(is_forbidden(&other.list(&ListParams::default()).await));
    let pvs: Api<PersistentVolume> = Api::all(tenant.clone());
    let pv: PersistentVolume = serde_json::from_value(json!({
        "metadata": {"name": "tenant-steals-imagenet"},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"],
                 "csi": {"driver": lakecache_api::CSI_DRIVER, "volumeHandle": "x",
                         "volumeAttributes": {"cacheNamespace": "imagenet", "namespace": NS}}},
    }))?;
    ensure!(is_forbidden(&pvs.create(&PostParams::default(), &pv).await));
    got.push("API: token Secret, CacheNamespaces of ml, a PV → Forbidden".to_string());

    // Through the node: pods with CSI inline volumes, each refused by the plugin. Each carries
    // a token of the tenant's own as its publish secret, so a missing token is not the reason.
    let own: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(tenant.clone(), TENANT_NS);
    own.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": "guess"}, "stringData": {"token": "a-guessed-token"},
        }))?,
    )
    .await?;
    let servers_before = fuse_server_pids().len();
    let image = lakecache_e2e::image::chart_image()?;
    let pods: Api<Pod> = Api::namespaced(tenant.clone(), TENANT_NS);
    let attacks: [(&str, Value, &[&str]); 4] = [
        (
            // A port scanner: the FUSE server would connect anywhere from the node's network.
            "scan",
            json!({"cacheNamespace": "x", "workers": "w=198.18.0.1:22"}),
            &["InvalidArgument", "workers"],
        ),
        (
            // Another namespace's cache.
            "steal",
            json!({"cacheNamespace": "imagenet", "namespace": NS}),
            &["PermissionDenied", NS],
        ),
        (
            // All the node's memory for one mount's read-ahead.
            "hog-memory",
            json!({"cacheNamespace": "x", "prefetchBudget": "1Ti"}),
            &["InvalidArgument", "prefetchBudget"],
        ),
        (
            // All the node's local-copy disk.
            "hog-disk",
            json!({"cacheNamespace": "x", "localCacheSize": "1Ti"}),
            &["InvalidArgument", "localCacheSize"],
        ),
    ];
    for (name, attributes, _) in &attacks {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": TENANT_NS},
            "spec": {
                "containers": [{"name": "c", "image": image, "imagePullPolicy": "Never",
                                "command": ["sleep", "3600"],
                                "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                "volumes": [{"name": "data", "csi": {"driver": lakecache_api::CSI_DRIVER,
                             "readOnly": true, "volumeAttributes": attributes,
                             "nodePublishSecretRef": {"name": "guess"}}}],
            },
        }))?;
        pods.create(&PostParams::default(), &pod).await?;
    }
    let admin_pods: Api<Pod> = Api::namespaced(admin.clone(), TENANT_NS);
    for (name, _, want) in &attacks {
        let message = wait(&format!("the {name} pod's mount refused"), || async {
            let m = mount_failures(cluster, name)?;
            Ok((!m.trim().is_empty()).then_some(m))
        })
        .await?;
        for w in *want {
            ensure!(message.contains(w), "{name}: expected {w:?} in {message}");
        }
        ensure!(
            !message.contains("198.18.0.1") || !message.to_lowercase().contains("connect"),
            "{name}: the refusal tells a scanner about the address: {message}"
        );
        let p = admin_pods.get(name).await?;
        ensure!(phase(&p) == "Pending", "{name}: {}", phase(&p));
        let first = message.lines().next().unwrap_or_default();
        got.push(format!(
            "{name} → {}",
            first.split("desc = ").nth(1).unwrap_or(first)
        ));
    }
    ensure!(
        fuse_server_pids().len() == servers_before,
        "a refused mount started a FUSE server"
    );
    for (name, _, _) in &attacks {
        pods.delete(name, &DeleteParams::default().grace_period(0))
            .await?;
    }
    for g in &got {
        eprintln!("  tenant: {g}");
    }
    Ok(format!("{} attempts", got.len()))
}

fn is_forbidden<T: std::fmt::Debug>(result: &kube::Result<T>) -> bool {
    matches!(result, Err(kube::Error::Api(e)) if e.code == 403)
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The `lakecache-csi-node fuse-server` processes on the machine (the mounter container's
/// children, seen from the host).
fn fuse_server_pids() -> Vec<i32> {
    // The node's processes live in its network namespace; FUSE servers that other tests (or an
    // earlier run that failed) started on this machine live in ours and are not the node's.
    let ours = std::fs::read_link("/proc/self/ns/net").ok();
    let mut pids: Vec<i32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|pid: &i32| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
                args.iter().any(|a| a.ends_with(b"lakecache-csi-node"))
                    && args.iter().any(|a| *a == b"fuse-server")
            }) && std::fs::read_link(format!("/proc/{pid}/ns/net")).ok() != ours
        })
        .collect();
    pids.sort();
    pids
}

/// Drops the machine's page cache every 300 ms until dropped (the node's kernel is the host's),
/// so a reader's passes read through the mount rather than from the cache.
fn drop_caches_while_running() -> impl Drop {
    struct Stop(std::sync::Arc<std::sync::atomic::AtomicBool>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        // Bounded: at most 20 minutes, in case the guard is leaked.
        for _ in 0..4000 {
            if flag.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    Stop(stop)
}

/// The CSI plugin's call counters (`lakecache_csi_calls_total`), as `method/code` → count,
/// read from its admin port on the pod's IP.
async fn csi_calls(env: &Env) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
    let sys: Api<Pod> = Api::namespaced(env.cluster.client().await?, SYSTEM);
    let pod = sys
        .list(&ListParams::default().labels("app.kubernetes.io/component=csi-node"))
        .await?
        .items
        .into_iter()
        .find(ready)
        .context("no ready CSI pod")?;
    let ip = pod.status.and_then(|s| s.pod_ip).context("no pod IP")?;
    let text = tokio::task::spawn_blocking(move || http_get(&ip, 9810, "/metrics")).await??;
    let mut out = std::collections::BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("lakecache_csi_calls_total{"))
    {
        let label = |k: &str| {
            line.split(&format!("{k}=\""))
                .nth(1)
                .and_then(|r| r.split('"').next())
        };
        let (Some(m), Some(c)) = (label("method"), label("code")) else {
            continue;
        };
        let n: f64 = line
            .rsplit(' ')
            .next()
            .unwrap_or("0")
            .parse()
            .unwrap_or(0.0);
        out.insert(format!("{m}/{c}"), n as u64);
    }
    Ok(out)
}

fn http_get(host: &str, port: u16, path: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = format!("{host}:{port}").parse()?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

/// When a reader was reading again after an event, from its passes since the event (`ok` or
/// `fail`, with the time each ended): the end of the first good pass after the last failed
/// one, once two good passes followed it; or, if three passes went by without a failure, the
/// end of the first (the event cost nothing a pass could see).
fn reading_again(passes: &[(String, f64)]) -> Option<f64> {
    match passes.iter().rposition(|(r, _)| r != "ok") {
        None => (passes.len() >= 3).then(|| passes[0].1),
        Some(i) => (passes.len() - i > 2).then(|| passes[i + 1].1),
    }
}
