//! Support for the operator's tests against a real control plane: the operator binary as a
//! process (its worker pods run on the cluster's real node, as containers of our image), a
//! sample dataset on the real S3 server, what to print when a test fails, and small API
//! helpers.
#![allow(dead_code)]

pub use lakecache_e2e::kit::{free_port, pattern};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use lakecache_e2e::cluster::eventually;
use lakecache_e2e::{Cluster, S3Server};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

pub const BIN: &str = env!("CARGO_BIN_EXE_lakecache-operator");
/// How long a step may take. Generous: worker pods on the real node pull nothing, but each
/// start runs an init container and then waits for its readiness probe, and a rollout of three
/// pods replaces them one at a time.
pub const WAIT: Duration = Duration::from_secs(120);

/// Cluster tests start a control plane each; on two cores they run one at a time. (tokio's
/// mutex works across the tests' separate runtimes and is not poisoned by a failed test.)
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

pub fn repo_root() -> PathBuf {
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo")).join("..")
}

/// The image the chart runs (`image.repository` and the chart's appVersion): the one the real
/// node was given, so the operator's worker pods run the workspace's own binaries.
pub fn worker_image() -> String {
    let path = repo_root().join("charts/lakecache/Chart.yaml");
    let chart = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let version = chart
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .unwrap_or_else(|| panic!("no appVersion in {}", path.display()))
        .trim()
        .trim_matches('"');
    format!("{}:{version}", lakecache_e2e::node::IMAGE_REPOSITORY)
}

pub fn object<T: DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("a valid object")
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
    lakecache_e2e::kit::chart_account(cluster, "operator").await
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
                &worker_image(),
            ])
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            // A log file, printed when a test fails: no colour codes.
            .env("NO_COLOR", "1")
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

/// A sample dataset in a bucket of the real S3 server.
pub struct Dataset {
    pub s3: S3Server,
    pub bucket: String,
    pub prefix: String,
    /// Paths under the prefix, with contents.
    pub files: Vec<(String, Vec<u8>)>,
}

impl Dataset {
    /// The dataset in bucket `bucket` of a new S3 server on `host` (the cluster's
    /// [`Cluster::host_ip`], for worker pods to reach it).
    pub async fn create(bucket: &str, host: &str) -> anyhow::Result<Dataset> {
        let s3 = S3Server::start_on(host)?;
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

/// Prints what explains a failed test that runs worker pods on the cluster's real node (it
/// needs one: [`lakecache_e2e::ClusterOptions::with_node`]), when dropped
/// before [`Diagnostics::passed`]: the namespace's pods and Events, the end of each worker
/// pod's logs (its restarted container's too) and of the operator's and kubelet's logs. A test
/// that returns an error does not panic, so neither the operator's nor the cluster's own drop
/// prints anything then: this does, for both ways of failing.
pub struct Diagnostics<'a> {
    cluster: &'a Cluster,
    namespace: &'a str,
    operator_log: PathBuf,
    passed: bool,
}

impl<'a> Diagnostics<'a> {
    pub fn new(cluster: &'a Cluster, namespace: &'a str, operator: &Operator) -> Self {
        Self {
            cluster,
            namespace,
            operator_log: operator.log.clone(),
            passed: false,
        }
    }

    pub fn passed(mut self) {
        self.passed = true;
    }

    fn print(&self) {
        let ns = self.namespace;
        let run = |args: &[&str]| {
            let out = self.cluster.kubectl(args);
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        };
        eprintln!(
            "--- pods in {ns} ---\n{}",
            run(&["get", "pods", "-n", ns, "-o", "wide"])
        );
        let events = run(&["get", "events", "-n", ns, "--sort-by=.lastTimestamp"]);
        let events: Vec<&str> = events.lines().collect();
        eprintln!(
            "--- the last events in {ns} ---\n{}",
            events[events.len().saturating_sub(30)..].join("\n")
        );
        let pods = run(&[
            "get",
            "pods",
            "-n",
            ns,
            "-l",
            "app.kubernetes.io/component=worker",
            "-o",
            "name",
        ]);
        for pod in pods.lines().filter(|l| l.starts_with("pod/")) {
            for previous in ["--previous=false", "--previous=true"] {
                let logs = run(&[
                    "logs",
                    "-n",
                    ns,
                    pod,
                    "--all-containers",
                    "--prefix",
                    "--tail=40",
                    previous,
                ]);
                if previous.ends_with("true") && logs.contains("previous terminated container") {
                    continue;
                }
                eprintln!("--- kubectl logs {pod} {previous} ---\n{logs}");
            }
        }
        if !std::thread::panicking() {
            // (A panic prints it already, when the operator is dropped.)
            eprintln!(
                "--- operator log ({}) ---\n{}",
                self.operator_log.display(),
                tail(&self.operator_log, 60)
            );
        }
        // kubelet logs every volume set-up and sync at its verbosity: its errors, warnings and
        // probe results say more.
        let kubelet = self.cluster.node().log_path("kubelet");
        let text = std::fs::read_to_string(&kubelet).unwrap_or_default();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with('E') || l.starts_with('W') || l.contains("probe"))
            .collect();
        eprintln!(
            "--- kubelet's errors, warnings and probes ({}) ---\n{}",
            kubelet.display(),
            lines[lines.len().saturating_sub(30)..].join("\n")
        );
    }
}

impl Drop for Diagnostics<'_> {
    fn drop(&mut self) {
        if !self.passed {
            self.print();
        }
    }
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("(unreadable: {e})"));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The running worker pods of CacheNamespace `name`: (pod name, pod IP, the worker
/// container's ID and restart count).
pub async fn worker_pods(
    client: &Client,
    ns: &str,
    name: &str,
) -> anyhow::Result<Vec<(String, String, String, i32)>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list = pods
        .list(&ListParams::default().labels(&format!("lakecache.io/cache-namespace={name}")))
        .await?;
    Ok(list
        .items
        .into_iter()
        .filter_map(|p| {
            let st = p.status.as_ref()?;
            let ip = st.pod_ip.clone()?;
            let c = st
                .container_statuses
                .as_ref()?
                .iter()
                .find(|c| c.name == "worker")?;
            Some((
                p.name_any(),
                ip,
                c.container_id.clone().unwrap_or_default(),
                c.restart_count,
            ))
        })
        .collect())
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
