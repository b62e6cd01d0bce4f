//! The flow users run, as a whole, on a working cluster: a real control plane, a node whose
//! pods really run (the test node agent runs each container as a local process and calls the
//! CSI plugin over its socket as kubelet does), and the shipped binaries, unchanged: the chart
//! installs the operator and the CSI DaemonSet; a CacheNamespace over a bucket of a real S3
//! server becomes three running workers and a bound PVC; a CachePreload warms part of the
//! dataset; a training pod (the PyTorchJob example's pod template) reads every file through the
//! PVC and checks each against a checksum list; the workers scale 3→2 while a reader runs
//! without a failed read; deleting the CacheNamespace removes everything it made and the mounts
//! are gone.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use lakecache_e2e::cluster::eventually;
use lakecache_e2e::{AgentOptions, Cluster, ClusterOptions, NodeAgent, S3Server};
use serde_json::{Value, json};
use sha2::Digest;

const WAIT: Duration = Duration::from_secs(120);
const POD_EXEC: &str = env!("CARGO_BIN_EXE_lakecache-pod-exec");
const NS: &str = "ml";

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
    // No GPUs on this node, and no PyTorch: a shell reads the files instead.
    c.as_object_mut().unwrap().remove("resources");
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
    agent: NodeAgent,
    cluster: Cluster,
    s3: S3Server,
    root: tempfile::TempDir,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_training_job_reads_its_dataset_through_the_pvc() -> anyhow::Result<()> {
    lakecache_e2e::init_logging();
    let started = Instant::now();
    let bin_dir = Path::new(POD_EXEC).parent().unwrap().to_path_buf();
    for b in [
        "lakecache-operator",
        "lakecache-worker",
        "lakecache-csi-node",
    ] {
        ensure!(
            bin_dir.join(b).is_file(),
            "{} is missing: build the workspace's binaries first (cargo build --workspace, which \
             `cargo test --workspace` does)",
            bin_dir.join(b).display()
        );
    }
    let files = dataset();
    let s3 = S3Server::start()?;
    let uploads: Vec<_> = files
        .iter()
        .map(|(p, d)| (format!("imagenet/{p}"), d.clone()))
        .collect();
    s3.create_bucket("datasets", &uploads).await?;
    let cluster = Cluster::start(ClusterOptions::full()).await?;
    let root = tempfile::Builder::new()
        .prefix("lc-e2e-")
        .tempdir_in("/tmp")?;
    let agent = NodeAgent::start(
        &cluster,
        AgentOptions::new("node-1", root.path(), 30, POD_EXEC),
    )
    .await?;
    let env = Env {
        agent,
        cluster,
        s3,
        root,
    };
    let r = scenario(&env, &files, started).await;
    if r.is_err() {
        for (pod, c) in [
            ("operator", "operator"),
            ("csi", "csi-plugin"),
            ("csi", "mounter"),
        ] {
            let ns = "lakecache-system";
            if let Ok(list) = Api::<Pod>::namespaced(env.cluster.client().await?, ns)
                .list(&ListParams::default())
                .await
            {
                for p in list
                    .items
                    .iter()
                    .filter(|p| p.metadata.name.as_deref().unwrap_or("").contains(pod))
                {
                    let name = p.metadata.name.clone().unwrap_or_default();
                    let log = env.agent.logs(ns, &name, c);
                    let tail: Vec<&str> = log.lines().rev().take(30).collect();
                    eprintln!(
                        "--- {name}/{c} ---\n{}",
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
            }
        }
    }
    r
}

async fn scenario(env: &Env, files: &[(String, Vec<u8>)], started: Instant) -> anyhow::Result<()> {
    let cluster = &env.cluster;
    let client = cluster.client().await?;
    let kubelet = env.agent.kubelet_dir().to_path_buf();
    let mut steps: Vec<(String, f64)> = vec![];
    let mut mark = Instant::now();
    let mut step = |name: &str| {
        steps.push((name.to_string(), mark.elapsed().as_secs_f64()));
        mark = Instant::now();
    };
    step("cluster, S3 server and node agent up");

    // 1. Install lakecache from the chart.
    let chart = repo().join("charts/lakecache");
    let out = cluster.helm(&[
        "template",
        "lakecache",
        chart.to_str().unwrap(),
        "--namespace",
        "lakecache-system",
        "--include-crds",
        "--set",
        &format!("csi.kubeletDir={}", kubelet.display()),
        "--set",
        "operator.replicas=1",
        "--set",
        "operator.resync=2s",
        "--set",
        "operator.sourceScanInterval=5s",
        "--set",
        "image.repository=lakecache",
        "--set",
        "image.tag=dev",
    ]);
    ensure!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    kubectl(cluster, &["create", "namespace", "lakecache-system"], None)?;
    kubectl(
        cluster,
        &["apply", "--server-side", "-f", "-"],
        Some(&String::from_utf8(out.stdout)?),
    )?;
    let sys: Api<Pod> = Api::namespaced(client.clone(), "lakecache-system");
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
    step("chart installed; operator and CSI plugin running");

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
            .all(|w| w.ready && w.address.starts_with("127.0.30.")),
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
    let log = env.agent.logs(NS, "trainer-0", "pytorch");
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

    // 6. Scale 3→2 while a reader runs: not one failed read.
    let loops = "for i in 1 2 3 4 5 6; do echo 3 > /proc/sys/vm/drop_caches; \
                 cd $DATA && sha256sum -c --quiet /checks/SHA256SUMS || exit 1; echo pass-$i; done; echo ALL-PASSES-OK";
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(training_pod("trainer-1", loops)?)?,
    )
    .await?;
    wait("the reader's first pass", || async {
        Ok(env
            .agent
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
    let log = env.agent.logs(NS, "trainer-1", "pytorch");
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

    // 7. The pods go (their mounts are unpublished, the volume unstaged); deleting the
    // CacheNamespace removes everything it made.
    for p in ["trainer-0", "trainer-1"] {
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
    wait("NodeUnstageVolume answered", || async {
        Ok(env
            .agent
            .csi_calls()
            .iter()
            .any(|c| c.method == "NodeUnstageVolume")
            .then_some(()))
    })
    .await?;
    let calls = env.agent.csi_calls();
    let count = |m: &str| {
        calls
            .iter()
            .filter(|c| c.method == m && c.code == "Ok")
            .count()
    };
    ensure!(
        count("NodeStageVolume") >= 1 && count("NodeUnstageVolume") >= 1,
        "{calls:?}"
    );
    ensure!(
        count("NodePublishVolume") == 2 && count("NodeUnpublishVolume") >= 2,
        "{calls:?}"
    );
    cns.delete("imagenet", &DeleteParams::default()).await?;
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    wait("everything the CacheNamespace made gone", || async {
        let left = [
            sts.get_opt("imagenet-worker").await?.is_some(),
            pvcs.get_opt("imagenet").await?.is_some(),
            pvs.get_opt("lakecache-ml-imagenet").await?.is_some(),
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
    let total = started.elapsed().as_secs_f64();
    eprintln!("scenario steps:");
    for (name, secs) in &steps {
        eprintln!("  {secs:6.1} s  {name}");
    }
    eprintln!("  {total:6.1} s  in all");
    Ok(())
}
