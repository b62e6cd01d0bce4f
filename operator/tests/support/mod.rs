//! Support for the operator's tests against a real control plane: the operator binary as a
//! process, a kubelet stand-in that runs each scheduled worker pod as a real in-process cache
//! worker (built from the ConfigMap and Secrets the operator wrote) and reports the pod Ready
//! with a loopback address, and small API helpers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use lakecache_e2e::cluster::eventually;
use lakecache_e2e::{Cluster, S3Server};
use lakecache_worker::Worker;
use lakecache_worker::config::WorkerConfig;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

pub const BIN: &str = env!("CARGO_BIN_EXE_lakecache-operator");
pub const WAIT: Duration = Duration::from_secs(90);

/// Cluster tests start a control plane each; on two cores they run one at a time. (tokio's
/// mutex works across the tests' separate runtimes and is not poisoned by a failed test.)
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

pub fn repo_root() -> PathBuf {
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo")).join("..")
}

pub fn object<T: DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("a valid object")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// kubectl's stdout, or an error with its stderr.
pub fn kubectl(cluster: &Cluster, args: &[&str]) -> anyhow::Result<String> {
    cluster.kubectl_ok(args, None)
}

/// Installs the checked-in CRDs and waits until they are served.
pub fn install_crds(cluster: &Cluster) -> anyhow::Result<()> {
    let dir = repo_root().join("crds");
    kubectl(
        cluster,
        &["apply", "--server-side", "-f", dir.to_str().unwrap()],
    )?;
    kubectl(
        cluster,
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/cachenamespaces.lakecache.io",
            "crd/cachepreloads.lakecache.io",
        ],
    )?;
    Ok(())
}

/// Installs the chart's operator ServiceAccount and RBAC into `lakecache-system` and returns a
/// kubeconfig with that account's token: the operator then runs with exactly the rights the
/// chart gives it.
pub async fn operator_account(cluster: &Cluster) -> anyhow::Result<PathBuf> {
    let chart = repo_root().join("charts/lakecache");
    let out = cluster.helm(&[
        "template",
        "lakecache",
        chart.to_str().unwrap(),
        "--namespace",
        "lakecache-system",
        "--show-only",
        "templates/operator-serviceaccount.yaml",
        "--show-only",
        "templates/operator-rbac.yaml",
    ]);
    if !out.status.success() {
        bail!("helm template: {}", String::from_utf8_lossy(&out.stderr));
    }
    let manifest = String::from_utf8(out.stdout)?;
    let _ = kubectl(cluster, &["create", "namespace", "lakecache-system"]);
    let applied =
        cluster.kubectl_with_stdin(&["apply", "--server-side", "-f", "-"], Some(&manifest));
    if !applied.status.success() {
        bail!(
            "applying the operator's RBAC: {}",
            String::from_utf8_lossy(&applied.stderr)
        );
    }
    cluster
        .kubeconfig_for_service_account("lakecache-system", "lakecache-operator")
        .await
}

pub async fn create_namespace(client: &Client, name: &str) -> anyhow::Result<()> {
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    api.create(
        &PostParams::default(),
        &object(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})),
    )
    .await?;
    Ok(())
}

/// The operator binary, killed on drop; its log is printed if the test fails.
pub struct Operator {
    pub child: Child,
    pub admin_port: u16,
    pub log: PathBuf,
}

impl Operator {
    pub fn start(kubeconfig: &Path, dir: &Path, extra: &[&str]) -> anyhow::Result<Operator> {
        let admin_port = free_port();
        let log = dir.join(format!("operator-{admin_port}.log"));
        let out = std::fs::File::create(&log)?;
        let child = Command::new(BIN)
            .args([
                "--admin-listen",
                &format!("127.0.0.1:{admin_port}"),
                "--resync",
                "1s",
                "--source-scan-interval",
                "3s",
                "--worker-timeout",
                "3s",
                "--worker-image",
                "lakecache:test",
            ])
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env(
                "RUST_LOG",
                std::env::var("LAKECACHE_TEST_OPERATOR_LOG")
                    .unwrap_or_else(|_| "info,lakecache_operator=debug,kube=warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting lakecache-operator")?;
        Ok(Operator {
            child,
            admin_port,
            log,
        })
    }

    pub async fn get(&self, path: &str) -> String {
        http_get(self.admin_port, path).await.unwrap_or_default()
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!(
                "--- operator log ({}) ---\n{}",
                self.log.display(),
                tail.join("\n")
            );
        }
    }
}

pub async fn http_get(port: u16, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

/// The value of the first metric line starting with `prefix`.
pub fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Deterministic file contents.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    lakecache_e2e::pattern(seed, len)
}

/// A sample dataset in a bucket of the real S3 server.
pub struct Dataset {
    pub s3: S3Server,
    pub bucket: String,
    pub prefix: String,
    /// Paths under the prefix, with contents.
    pub files: Vec<(String, Vec<u8>)>,
}

impl Dataset {
    pub async fn create(bucket: &str) -> anyhow::Result<Dataset> {
        let s3 = S3Server::start()?;
        let prefix = "imagenet".to_string();
        let mut files = vec![];
        for c in 0..3 {
            for i in 0..4 {
                files.push((
                    format!("train/class-{c}/img-{i}.jpg"),
                    pattern(c * 10 + i, 20_000 + (i as usize) * 1000),
                ));
            }
        }
        files.push(("train/shard-0.rec".into(), pattern(99, 600_000)));
        files.push(("val/img-0.jpg".into(), pattern(100, 30_000)));
        let uploads: Vec<(String, Vec<u8>)> = files
            .iter()
            .map(|(p, d)| (format!("{prefix}/{p}"), d.clone()))
            .collect();
        s3.create_bucket(bucket, &uploads).await?;
        Ok(Dataset {
            s3,
            bucket: bucket.into(),
            prefix,
            files,
        })
    }

    pub fn bytes(&self, under: &str) -> u64 {
        self.files
            .iter()
            .filter(|(p, _)| p.starts_with(under))
            .map(|(_, d)| d.len() as u64)
            .sum()
    }

    pub fn count(&self, under: &str) -> usize {
        self.files
            .iter()
            .filter(|(p, _)| p.starts_with(under))
            .count()
    }
}

/// Stands in for the kubelet of every node: runs each scheduled worker pod of the watched
/// namespace as a real cache worker in this process, from the ConfigMap and Secrets its volumes
/// name, listening on a loopback address of its own (`127.0.<net>.<n>`) and the port the pod
/// declares; reports it Running and Ready; stops it and removes the pod when the pod is deleted.
pub struct FakeKubelet {
    task: tokio::task::JoinHandle<()>,
    pub workers: Arc<tokio::sync::Mutex<HashMap<String, Worker>>>,
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct KubeletState {
    client: Client,
    namespace: String,
    net: u8,
    ips: HashMap<String, String>,
    next_ip: u8,
    dir: tempfile::TempDir,
    /// The endpoint the workers' S3 source is reached at, overriding the ConfigMap's (to put a
    /// proxy in between), by CacheNamespace.
    endpoints: HashMap<String, String>,
}

impl FakeKubelet {
    pub fn start(client: Client, namespace: &str, net: u8) -> FakeKubelet {
        Self::start_with(client, namespace, net, HashMap::new())
    }

    pub fn start_with(
        client: Client,
        namespace: &str,
        net: u8,
        endpoints: HashMap<String, String>,
    ) -> FakeKubelet {
        let workers: Arc<tokio::sync::Mutex<HashMap<String, Worker>>> = Default::default();
        let mut st = KubeletState {
            client,
            namespace: namespace.into(),
            net,
            ips: HashMap::new(),
            next_ip: 1,
            dir: tempfile::tempdir().unwrap(),
            endpoints,
        };
        let w = workers.clone();
        let task = tokio::spawn(async move {
            // Bounded by the test: the task is aborted when the stand-in is dropped.
            loop {
                if let Err(e) = st.sync(&w).await {
                    tracing::debug!(error = %format!("{e:#}"), "fake kubelet sync");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        FakeKubelet { task, workers }
    }

    /// Stops a worker without telling the API server, as a crashed container would.
    pub async fn kill(&self, pod: &str) {
        if let Some(w) = self.workers.lock().await.remove(pod) {
            w.kill();
        }
    }
}

impl KubeletState {
    async fn sync(
        &mut self,
        workers: &tokio::sync::Mutex<HashMap<String, Worker>>,
    ) -> anyhow::Result<()> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let list = pods
            .list(&ListParams::default().labels("app.kubernetes.io/component=worker"))
            .await?;
        let mut running = workers.lock().await;
        let live: Vec<String> = list.items.iter().map(|p| p.name_any()).collect();
        let gone: Vec<String> = running
            .keys()
            .filter(|k| !live.contains(k))
            .cloned()
            .collect();
        for k in gone {
            if let Some(w) = running.remove(&k) {
                w.stop().await;
            }
        }
        for pod in list.items {
            let name = pod.name_any();
            if pod.metadata.deletion_timestamp.is_some() {
                if let Some(w) = running.remove(&name) {
                    w.stop().await;
                }
                let _ = pods
                    .delete(
                        &name,
                        &DeleteParams {
                            grace_period_seconds: Some(0),
                            ..Default::default()
                        },
                    )
                    .await;
                continue;
            }
            let scheduled = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_ref())
                .is_some();
            if !scheduled || running.contains_key(&name) {
                continue;
            }
            let ip = self
                .ips
                .entry(pod.uid().unwrap_or_default())
                .or_insert_with(|| {
                    let ip = format!("127.0.{}.{}", self.net, self.next_ip);
                    self.next_ip += 1;
                    ip
                })
                .clone();
            let worker = self
                .start_worker(&pod, &ip)
                .await
                .with_context(|| format!("starting {name}"))?;
            let now = k8s_openapi::jiff::Timestamp::now().to_string();
            let status = json!({"status": {
                "phase": "Running",
                "hostIP": "127.0.0.1",
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "startTime": now,
                "conditions": [
                    {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                    {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                    {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                    {"type": "Ready", "status": "True", "lastTransitionTime": now},
                ],
                "containerStatuses": [{
                    "name": "worker", "ready": true, "started": true, "restartCount": 0,
                    "image": "lakecache:test", "imageID": "",
                    "state": {"running": {"startedAt": now}},
                }],
            }});
            pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                .await?;
            running.insert(name, worker);
        }
        Ok(())
    }

    async fn start_worker(&self, pod: &Pod, ip: &str) -> anyhow::Result<Worker> {
        let name = pod.name_any();
        let spec = pod.spec.as_ref().context("no spec")?;
        let container = &spec.containers[0];
        let port = container
            .ports
            .as_ref()
            .and_then(|p| p.iter().find(|p| p.name.as_deref() == Some("grpc")))
            .map(|p| p.container_port)
            .context("no grpc port")?;
        let vols = spec.volumes.clone().unwrap_or_default();
        let cm_name = vols
            .iter()
            .find_map(|v| v.config_map.as_ref().map(|c| c.name.clone()))
            .context("no config volume")?;
        let secret_of = |vol: &str| {
            vols.iter()
                .find(|v| v.name == vol)
                .and_then(|v| v.secret.as_ref())
                .and_then(|s| s.secret_name.clone())
        };
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let yaml = cms
            .get(&cm_name)
            .await?
            .data
            .and_then(|d| d.get("worker.yaml").cloned())
            .context("no worker.yaml")?;
        let mut cfg: WorkerConfig =
            serde_yaml_ng::from_str(&yaml).context("parsing worker.yaml")?;
        let token_secret = secret_of("token").context("no token volume")?;
        let token = secrets.get(&token_secret).await?;
        let token =
            String::from_utf8(token.data.context("empty token Secret")?["token"].0.clone())?;
        let dir = self
            .dir
            .path()
            .join(&name)
            .join(pod.uid().unwrap_or_default());
        if let Some(cred) = secret_of("credentials") {
            // As a kubelet mounts a Secret: one file per key.
            let s = secrets.get(&cred).await?;
            let cdir = dir.join("credentials");
            std::fs::create_dir_all(&cdir)?;
            for (k, v) in s.data.unwrap_or_default() {
                std::fs::write(cdir.join(k), v.0)?;
            }
            cfg.source.credentials_dir = Some(cdir);
        }
        let cn = pod
            .labels()
            .get("lakecache.io/cache-namespace")
            .cloned()
            .unwrap_or_default();
        if let Some(e) = self.endpoints.get(&cn) {
            cfg.source.options.insert("endpoint".into(), e.clone());
        }
        for t in &mut cfg.tiers {
            let p = dir.join(format!("{:?}", t.kind).to_lowercase());
            std::fs::create_dir_all(&p)?;
            t.path = Some(p);
        }
        cfg.id = name;
        cfg.listen = format!("{ip}:{port}").parse()?;
        cfg.admin_listen = format!("{ip}:0").parse()?;
        cfg.token_file = None;
        cfg.token = Some(token);
        Ok(Worker::start(cfg).await?)
    }
}

/// Waits for `f` to return `Some`.
pub async fn wait<T, F, Fut>(what: &str, f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    eventually(what, WAIT, f).await
}

/// Every Event (events.k8s.io) about the object named `name` in `ns`: (type, reason, note).
pub async fn events(
    client: &Client,
    ns: &str,
    name: &str,
) -> anyhow::Result<Vec<(String, String, String)>> {
    let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| {
            (
                e.type_.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default(),
            )
        })
        .collect())
}
