//! The test node agent (`lakecache_e2e::node_agent`) against a real control plane: pods bound by
//! the real scheduler to the agent's node run as local processes, as kubelet would run them.
//!
//! - A pod with ConfigMap, Secret and emptyDir volumes, `fsGroup` and `runAsUser: 65532`, env
//!   from fieldRefs and key refs with `$(VAR)` expansion, the ServiceAccount token that
//!   admission adds, and a readiness probe served by `python3 -m http.server` on the pod IP: the
//!   container sees its volumes at their container paths and its environment, writes nothing to
//!   the host outside the agent's directory, authenticates to the apiserver with its token,
//!   becomes Ready with its IP, and deleting it kills its processes and removes the pod.
//! - `restartPolicy: Never` pods end Succeeded (exit 0, after an init container) or Failed
//!   (exit 3); an `Always` pod that keeps failing is restarted and counts its restarts; a pod
//!   shaped like the operator's cache workers (root init container chowning a `subPathExpr`
//!   directory of a hostPath, unprivileged user, read-only root, memory emptyDir) sees what a
//!   worker sees, and its failing liveness probe restarts it.
//! - Mount propagation: a privileged container's mount under a `Bidirectional` hostPath in
//!   kubelet's directory appears on the host, a mount elsewhere in the container does not, and a
//!   host mount under a `HostToContainer` hostPath appears in the container.
//! - CSI: the real `lakecache-csi-node` plugin and mounter run as a DaemonSet pod of the agent
//!   (kubelet's directory shared with them `Bidirectional`, the registrar reported without being
//!   run), and two pods read a PersistentVolume of `csi.lakecache.io` over a cache worker: one
//!   `NodeStageVolume` for both, a `NodePublishVolume` each with kubelet's pod-info keys, the
//!   right bytes inside the pods, then unpublish per pod and unstage after the last one; a third
//!   pod reads the same cache through a CSI inline volume (publish only, `ephemeral: "true"`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{
    Namespace, PersistentVolume, PersistentVolumeClaim, Pod, Secret, ServiceAccount,
};
use k8s_openapi::api::storage::v1::CSIDriver;
use kube::Resource;
use kube::api::{Api, DeleteParams, PostParams};
use lakecache_e2e::cluster::eventually;
use lakecache_e2e::node_agent::mountinfo;
use lakecache_e2e::{AgentOptions, Cluster, ClusterOptions, NodeAgent};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(90);
const POD_EXEC: &str = env!("CARGO_BIN_EXE_lakecache-pod-exec");

/// A control plane with one agent node. Fields drop in order: the agent (which unmounts what it
/// mounted) before the cluster and the agent's directory.
struct Node {
    agent: NodeAgent,
    cluster: Cluster,
    _root: tempfile::TempDir,
}

impl Node {
    async fn start(name: &str, subnet: u8) -> anyhow::Result<Node> {
        lakecache_e2e::init_logging();
        let started = Instant::now();
        let cluster = Cluster::start(ClusterOptions::full()).await?;
        // Short: the CSI socket under it must fit a unix socket path.
        let root = tempfile::Builder::new()
            .prefix("lc-agent-")
            .tempdir_in("/tmp")?;
        let agent = NodeAgent::start(
            &cluster,
            AgentOptions::new(name, root.path(), subnet, POD_EXEC),
        )
        .await?;
        eprintln!(
            "control plane and node agent {name} up in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        Ok(Node {
            agent,
            cluster,
            _root: root,
        })
    }

    async fn client(&self) -> anyhow::Result<kube::Client> {
        self.cluster.client().await
    }

    /// A namespace whose `default` ServiceAccount exists (admission refuses pods before).
    async fn namespace(&self, name: &str) -> anyhow::Result<()> {
        let client = self.client().await?;
        create(
            &Api::<Namespace>::all(client.clone()),
            json!({"metadata": {"name": name}}),
        )
        .await?;
        let accounts: Api<ServiceAccount> = Api::namespaced(client, name);
        eventually("the default ServiceAccount", WAIT, || async {
            Ok(accounts.get_opt("default").await?)
        })
        .await?;
        Ok(())
    }

    async fn pods(&self, ns: &str) -> anyhow::Result<Api<Pod>> {
        Ok(Api::namespaced(self.client().await?, ns))
    }

    /// Waits for the log of a container to hold `needle`.
    async fn log_with(
        &self,
        ns: &str,
        pod: &str,
        container: &str,
        needle: &str,
    ) -> anyhow::Result<String> {
        eventually(
            &format!("{ns}/{pod}/{container} logging {needle:?}"),
            WAIT,
            || async {
                let log = self.agent.logs(ns, pod, container);
                Ok(log.contains(needle).then_some(log))
            },
        )
        .await
        .with_context(|| format!("the log so far:\n{}", self.agent.logs(ns, pod, container)))
    }
}

fn object<T: DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("a valid object")
}

async fn create<K>(api: &Api<K>, value: Value) -> anyhow::Result<K>
where
    K: Resource + Clone + DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    Ok(api.create(&PostParams::default(), &object(value)).await?)
}

fn condition(pod: &Pod, kind: &str) -> Option<String> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| c.status.clone())
}

fn phase(pod: &Pod) -> String {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default()
}

async fn wait_ready(pods: &Api<Pod>, name: &str) -> anyhow::Result<Pod> {
    let ready = eventually(&format!("pod {name} Ready"), WAIT, || async {
        let pod = pods.get(name).await?;
        Ok((condition(&pod, "Ready").as_deref() == Some("True")).then_some(pod))
    })
    .await;
    match ready {
        Ok(pod) => Ok(pod),
        Err(e) => {
            let status = pods.get(name).await.ok().and_then(|p| p.status);
            Err(e.context(format!("its last status: {status:?}")))
        }
    }
}

async fn wait_phase(pods: &Api<Pod>, name: &str, want: &str) -> anyhow::Result<Pod> {
    eventually(&format!("pod {name} {want}"), WAIT, || async {
        let pod = pods.get(name).await?;
        Ok((phase(&pod) == want).then_some(pod))
    })
    .await
}

async fn delete_and_wait_gone(pods: &Api<Pod>, name: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    pods.delete(name, &DeleteParams::default()).await?;
    eventually(&format!("pod {name} gone"), WAIT, || async {
        Ok(pods.get_opt(name).await?.is_none().then_some(()))
    })
    .await?;
    Ok(started.elapsed())
}

/// A plain HTTP GET: the status code and the body.
async fn http_get(ip: &str, port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect((ip, port)).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n").as_bytes())
            .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        anyhow::Ok(out)
    };
    let out = tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .context("no answer within 5 s")??;
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("not an HTTP response: {out:.80}"))?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((code, body.to_string()))
}

fn on_host_mounts() -> Vec<mountinfo::MountInfo> {
    mountinfo::read_self().expect("reading /proc/self/mountinfo")
}

/// The container script of the first test: what it sees goes to its log, then it serves
/// /scratch on the pod IP. `$(POD_IP)` is expanded by the agent; `$(id -u)` is not a variable,
/// so it is left to the shell, as Kubernetes does.
const WEB_SCRIPT: &str = r#"
echo "uid=$(id -u) gid=$(id -g) groups=$(id -G)"
echo "config=$(cat /etc/lakecache-test-mount/config/settings.yaml)"
echo "config-env=$CONFIG_VALUE secret-env=$SECRET_VALUE"
echo "secret=$(cat /etc/lakecache-test-mount/secret/token)"
echo "secret-mode=$(stat -c %a:%g /etc/lakecache-test-mount/secret/token)"
touch /etc/lakecache-test-mount/secret/new 2>/dev/null || echo "secret-read-only"
echo "pod=$POD_NAME ns=$POD_NAMESPACE ip=$POD_IP node=$NODE_NAME listen=$LISTEN host=$(hostname)"
echo "sa-namespace=$(cat /var/run/secrets/kubernetes.io/serviceaccount/namespace)"
echo "api=$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT"
python3 - <<'EOF'
import os, ssl, urllib.request
d = '/var/run/secrets/kubernetes.io/serviceaccount/'
ctx = ssl.create_default_context(cafile=d + 'ca.crt')
url = 'https://%s:%s/api/v1/namespaces/%s/secrets' % (
    os.environ['KUBERNETES_SERVICE_HOST'], os.environ['KUBERNETES_SERVICE_PORT'], open(d + 'namespace').read())
req = urllib.request.Request(url, headers={'Authorization': 'Bearer ' + open(d + 'token').read()})
try:
    urllib.request.urlopen(req, context=ctx)
    print('api-answer 200')
except urllib.error.HTTPError as e:
    print('api-answer', e.code, e.read().decode())
EOF
echo hello > /scratch/written-by-container
exec python3 -m http.server --bind $(POD_IP) 8080 --directory /scratch
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_a_pod_with_volumes_env_probes_and_deletes_it() -> anyhow::Result<()> {
    let node = Node::start("agent-web", 21).await?;
    let ns = "web";
    node.namespace(ns).await?;
    let client = node.client().await?;
    create(
        &Api::namespaced(client.clone(), ns),
        json!({"metadata": {"name": "settings"}, "data": {"settings.yaml": "block-size: 4MiB"}}),
    )
    .await
    .map(|_: k8s_openapi::api::core::v1::ConfigMap| ())?;
    create(
        &Api::<Secret>::namespaced(client.clone(), ns),
        json!({"metadata": {"name": "token"}, "stringData": {"token": "s3cr3t"}}),
    )
    .await?;
    let pods = node.pods(ns).await?;
    let field = |path: &str| json!({"fieldRef": {"fieldPath": path}});
    create(
        &pods,
        json!({
            "metadata": {"name": "web"},
            "spec": {
                "securityContext": {"runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532},
                "terminationGracePeriodSeconds": 5,
                "containers": [{
                    "name": "web",
                    "image": "lakecache-test",
                    "command": ["sh", "-c"],
                    "args": [WEB_SCRIPT],
                    "env": [
                        {"name": "POD_NAME", "valueFrom": field("metadata.name")},
                        {"name": "POD_NAMESPACE", "valueFrom": field("metadata.namespace")},
                        {"name": "POD_IP", "valueFrom": field("status.podIP")},
                        {"name": "NODE_NAME", "valueFrom": field("spec.nodeName")},
                        {"name": "LISTEN", "value": "$(POD_IP):8080"},
                        {"name": "CONFIG_VALUE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "settings.yaml"}}},
                        {"name": "SECRET_VALUE", "valueFrom": {"secretKeyRef": {"name": "token", "key": "token"}}},
                    ],
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {
                        "httpGet": {"path": "/written-by-container", "port": "http"},
                        "periodSeconds": 1,
                    },
                    "volumeMounts": [
                        {"name": "config", "mountPath": "/etc/lakecache-test-mount/config"},
                        {"name": "secret", "mountPath": "/etc/lakecache-test-mount/secret", "readOnly": true},
                        {"name": "scratch", "mountPath": "/scratch"},
                    ],
                }],
                "volumes": [
                    {"name": "config", "configMap": {"name": "settings"}},
                    {"name": "secret", "secret": {"secretName": "token", "defaultMode": 0o400}},
                    {"name": "scratch", "emptyDir": {}},
                ],
            },
        }),
    )
    .await?;

    let started = Instant::now();
    let pod = wait_ready(&pods, "web").await?;
    eprintln!(
        "pod Ready {:.1} s after its creation",
        started.elapsed().as_secs_f64()
    );
    let status = pod.status.clone().unwrap_or_default();
    let ip = node
        .agent
        .pod_ip(ns, "web")
        .context("the agent knows the pod's IP")?;
    assert!(ip.starts_with("127.0.21."), "{ip}");
    assert_eq!(status.pod_ip.as_deref(), Some(ip.as_str()));
    assert_eq!(status.host_ip.as_deref(), Some("127.0.0.1"));
    assert_eq!(phase(&pod), "Running");
    assert!(status.start_time.is_some());
    let cs = &status.container_statuses.unwrap_or_default()[0];
    assert!(
        cs.ready && cs.started == Some(true) && cs.restart_count == 0,
        "{cs:?}"
    );
    assert!(
        cs.state.as_ref().and_then(|s| s.running.as_ref()).is_some(),
        "{cs:?}"
    );

    let log = node.agent.logs(ns, "web", "web");
    let port = node
        .cluster
        .server()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    for want in [
        "uid=65532 gid=65532 groups=65532".to_string(),
        "config=block-size: 4MiB".into(),
        "config-env=block-size: 4MiB secret-env=s3cr3t".into(),
        "secret=s3cr3t".into(),
        // defaultMode 0400, plus group read for the fsGroup, group-owned by it.
        "secret-mode=440:65532".into(),
        "secret-read-only".into(),
        format!("pod=web ns=web ip={ip} node=agent-web listen={ip}:8080 host=web"),
        "sa-namespace=web".into(),
        format!("api=127.0.0.1:{port}"),
        // The projected token authenticates over TLS to 127.0.0.1 with the projected CA, as
        // the pod's ServiceAccount, which may not list Secrets.
        "api-answer 403".into(),
        "system:serviceaccount:web:default".into(),
    ] {
        assert!(log.contains(&want), "{want:?} is not in the log:\n{log}");
    }
    // The readiness probe's server, from outside, on the pod IP.
    assert_eq!(
        http_get(&ip, 8080, "/written-by-container").await?,
        (200, "hello\n".into())
    );
    // The emptyDir is the pod directory's; the mount targets are in the container's overlay only.
    let pod_dir = node.agent.pod_dir(ns, "web").context("pod dir")?;
    assert_eq!(
        std::fs::read_to_string(
            pod_dir.join("volumes/kubernetes.io~empty-dir/scratch/written-by-container")
        )?,
        "hello\n"
    );
    assert!(!Path::new("/etc/lakecache-test-mount").exists());
    assert!(
        on_host_mounts()
            .iter()
            .all(|m| !m.mount_point.starts_with("/etc/lakecache-test-mount")),
        "a container mount leaked to the host"
    );

    // Deletion: the server stops (SIGTERM), the pod goes away, and so does its directory.
    let took = delete_and_wait_gone(&pods, "web").await?;
    eprintln!("pod deleted in {:.1} s", took.as_secs_f64());
    assert!(
        took < Duration::from_secs(5),
        "python should stop at SIGTERM, not at SIGKILL"
    );
    assert!(
        http_get(&ip, 8080, "/").await.is_err(),
        "the server still answers"
    );
    assert!(!pod_dir.exists(), "{} is left", pod_dir.display());
    Ok(())
}

/// What a worker-shaped container checks about itself.
const WORKER_SCRIPT: &str = r#"
echo "uid=$(id -u)"
touch /ro-test 2>/dev/null || echo root-read-only
touch /tmp/ro-test 2>/dev/null || echo tmp-read-only
echo "memory=$(stat -f -c %T /memory)"
echo data > /var/cache/lakecache/block && echo disk-writable
echo "disk-owner=$(stat -c %u /var/cache/lakecache)"
exec sleep 3600
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_finish_restart_and_run_shaped_like_cache_workers() -> anyhow::Result<()> {
    let node = Node::start("agent-jobs", 22).await?;
    let ns = "jobs";
    node.namespace(ns).await?;
    let pods = node.pods(ns).await?;
    let pod = |name: &str, policy: &str, script: &str| {
        json!({
            "metadata": {"name": name},
            "spec": {
                "restartPolicy": policy,
                "initContainers": [{
                    "name": "prepare",
                    "image": "lakecache-test",
                    "command": ["sh", "-c", "echo prepared > /work/ready"],
                    "volumeMounts": [{"name": "work", "mountPath": "/work"}],
                }],
                "containers": [{
                    "name": "main",
                    "image": "lakecache-test",
                    "command": ["sh", "-c", script],
                    "volumeMounts": [{"name": "work", "mountPath": "/work"}],
                }],
                "volumes": [{"name": "work", "emptyDir": {}}],
            },
        })
    };
    create(&pods, pod("ok", "Never", "cat /work/ready; exit 0")).await?;
    create(&pods, pod("fails", "Never", "cat /work/ready; exit 3")).await?;
    create(&pods, pod("crashes", "Always", "echo crashing; exit 1")).await?;
    // Shaped like the operator's cache workers: an unprivileged user with a read-only root, a
    // root init container handing it a per-pod directory of a hostPath (subPathExpr), a
    // memory emptyDir, and a liveness probe (here one that fails, so it is restarted).
    let disk = node
        .agent
        .kubelet_dir()
        .parent()
        .context("the agent root")?
        .join("disk");
    let pod_name_env =
        json!([{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]);
    let disk_mount =
        json!({"name": "disk", "mountPath": "/var/cache/lakecache", "subPathExpr": "$(POD_NAME)"});
    create(
        &pods,
        json!({
            "metadata": {"name": "worker-0"},
            "spec": {
                "securityContext": {"runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532},
                "terminationGracePeriodSeconds": 2,
                "initContainers": [{
                    "name": "prepare-disk",
                    "image": "lakecache",
                    "command": ["chown", "65532:65532", "/var/cache/lakecache"],
                    "env": pod_name_env,
                    "securityContext": {"runAsUser": 0},
                    "volumeMounts": [disk_mount],
                }],
                "containers": [{
                    "name": "worker",
                    "image": "lakecache",
                    "command": ["sh", "-c", WORKER_SCRIPT],
                    "env": pod_name_env,
                    "securityContext": {"readOnlyRootFilesystem": true},
                    "livenessProbe": {"tcpSocket": {"port": 9}, "periodSeconds": 1, "failureThreshold": 2},
                    "volumeMounts": [disk_mount, {"name": "memory", "mountPath": "/memory"}],
                }],
                "volumes": [
                    {"name": "disk", "hostPath": {"path": disk, "type": "DirectoryOrCreate"}},
                    {"name": "memory", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
                ],
            },
        }),
    )
    .await?;

    let ok = wait_phase(&pods, "ok", "Succeeded").await?;
    let terminated = |p: &Pod| {
        p.status
            .as_ref()
            .unwrap()
            .container_statuses
            .as_ref()
            .unwrap()[0]
            .state
            .as_ref()
            .unwrap()
            .terminated
            .clone()
            .expect("terminated")
    };
    let t = terminated(&ok);
    assert_eq!((t.exit_code, t.reason.as_deref()), (0, Some("Completed")));
    let init = &ok
        .status
        .as_ref()
        .unwrap()
        .init_container_statuses
        .as_ref()
        .unwrap()[0];
    assert_eq!(
        init.state
            .as_ref()
            .unwrap()
            .terminated
            .as_ref()
            .unwrap()
            .exit_code,
        0
    );
    assert_eq!(condition(&ok, "Initialized").as_deref(), Some("True"));
    assert_eq!(condition(&ok, "Ready").as_deref(), Some("False"));
    // The init container ran first, into the shared emptyDir.
    assert_eq!(node.agent.logs(ns, "ok", "main"), "prepared\n");

    let fails = wait_phase(&pods, "fails", "Failed").await?;
    let t = terminated(&fails);
    assert_eq!((t.exit_code, t.reason.as_deref()), (3, Some("Error")));
    // Kubelet keeps a finished pod's volumes until the pod is deleted.
    assert!(node.agent.pod_dir(ns, "fails").is_some_and(|d| {
        d.join("volumes/kubernetes.io~empty-dir/work/ready")
            .exists()
    }));

    let crashes = eventually("the crashing pod restarted twice", WAIT, || async {
        let p = pods.get("crashes").await?;
        let cs = p
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.clone())
            .unwrap_or_default();
        Ok(cs.first().filter(|c| c.restart_count >= 2).cloned())
    })
    .await?;
    let last = crashes
        .last_state
        .and_then(|s| s.terminated)
        .expect("a last state");
    assert_eq!(last.exit_code, 1);
    assert_eq!(phase(&pods.get("crashes").await?), "Running");
    assert!(
        node.agent
            .logs(ns, "crashes", "main")
            .matches("crashing")
            .count()
            >= 3
    );

    let log = node
        .log_with(ns, "worker-0", "worker", "disk-owner")
        .await?;
    for want in [
        "uid=65532",
        "root-read-only",
        "tmp-read-only",
        "memory=tmpfs",
        "disk-writable",
        "disk-owner=65532",
    ] {
        assert!(log.contains(want), "{want:?} is not in the log:\n{log}");
    }
    let block = disk.join("worker-0/block");
    assert_eq!(std::fs::read_to_string(&block)?, "data\n");
    let restarted = eventually(
        "the worker restarted by its liveness probe",
        WAIT,
        || async {
            let p = pods.get("worker-0").await?;
            let cs = p
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.clone())
                .unwrap_or_default();
            Ok(cs.first().filter(|c| c.restart_count >= 1).cloned())
        },
    )
    .await?;
    let last = restarted
        .last_state
        .and_then(|s| s.terminated)
        .expect("a last state");
    assert_eq!(last.exit_code, 128 + 15, "stopped by SIGTERM: {last:?}");

    for name in ["ok", "fails", "crashes", "worker-0"] {
        delete_and_wait_gone(&pods, name).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidirectional_mounts_reach_the_host_and_host_mounts_reach_the_container()
-> anyhow::Result<()> {
    let node = Node::start("agent-mounts", 23).await?;
    let ns = "mounts";
    node.namespace(ns).await?;
    let kubelet = node.agent.kubelet_dir().to_path_buf();
    let shared = kubelet.join("bidir-test");
    let h2c = kubelet.join("h2c-test");
    let pods = node.pods(ns).await?;
    let script = "mkdir -p /mnt/shared/x /mnt/lakecache-private \
        && mount -t tmpfs lakecache-bidir /mnt/shared/x \
        && echo from-container > /mnt/shared/x/marker \
        && mount -t tmpfs lakecache-private /mnt/lakecache-private \
        && echo mounted \
        && until [ -f /mnt/h2c/y/marker ]; do sleep 0.1; done \
        && echo \"seen $(cat /mnt/h2c/y/marker)\" && sleep 3600";
    create(
        &pods,
        json!({
            "metadata": {"name": "mounter"},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [{
                    "name": "mounter",
                    "image": "lakecache-test",
                    "command": ["sh", "-c", script],
                    "securityContext": {"privileged": true},
                    "volumeMounts": [
                        {"name": "shared", "mountPath": "/mnt/shared", "mountPropagation": "Bidirectional"},
                        {"name": "h2c", "mountPath": "/mnt/h2c", "mountPropagation": "HostToContainer"},
                    ],
                }],
                "volumes": [
                    {"name": "shared", "hostPath": {"path": shared, "type": "DirectoryOrCreate"}},
                    {"name": "h2c", "hostPath": {"path": h2c, "type": "DirectoryOrCreate"}},
                ],
            },
        }),
    )
    .await?;
    node.log_with(ns, "mounter", "mounter", "mounted").await?;
    // The container's mount under the Bidirectional volume is on the host, with its file.
    let x = shared.join("x");
    let m = on_host_mounts()
        .into_iter()
        .find(|m| m.mount_point == x)
        .with_context(|| format!("{} is not a mount point on the host", x.display()))?;
    assert_eq!(
        (m.fs_type.as_str(), m.source.as_str()),
        ("tmpfs", "lakecache-bidir")
    );
    assert_eq!(
        std::fs::read_to_string(x.join("marker"))?,
        "from-container\n"
    );
    // The one elsewhere is not, and its target was made in the container's overlay only.
    assert!(
        on_host_mounts()
            .iter()
            .all(|m| m.source != "lakecache-private")
    );
    assert!(!Path::new("/mnt/lakecache-private").exists());

    // A host mount under the HostToContainer volume, made after the container started,
    // reaches it.
    let y = h2c.join("y");
    std::fs::create_dir_all(&y)?;
    nix::mount::mount(
        Some("lakecache-h2c"),
        &y,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )?;
    std::fs::write(y.join("marker"), "from-host")?;
    let seen = node.log_with(ns, "mounter", "mounter", "seen").await;
    let _ = nix::mount::umount2(&y, nix::mount::MntFlags::MNT_DETACH);
    assert!(seen?.contains("seen from-host"));

    delete_and_wait_gone(&pods, "mounter").await?;
    Ok(())
}

/// The `lakecache-csi-node` binary next to the test's own binaries.
fn csi_binary() -> PathBuf {
    let bin = Path::new(POD_EXEC).with_file_name("lakecache-csi-node");
    assert!(
        bin.is_file(),
        "{} is missing: build it first (cargo build -p lakecache-csi-node)",
        bin.display()
    );
    bin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csi_volumes_are_staged_once_published_per_pod_and_released() -> anyhow::Result<()> {
    use bytesize::ByteSize;
    use lakecache_worker::config::{TierConfig, WorkerConfig};
    use lakecache_worker::meta::MetadataPolicy;
    use lakecache_worker::store::TierKind;
    const TOKEN: &str = "data-plane-token-for-agent-tests";

    csi_binary();
    let node = Node::start("agent-csi", 24).await?;
    let kubelet = node.agent.kubelet_dir().to_path_buf();
    let client = node.client().await?;

    // A lake on the local filesystem behind one cache worker.
    let lake = tempfile::tempdir()?;
    let shard = lakecache_e2e::pattern(7, 3 * 1024 * 1024 + 17);
    std::fs::create_dir_all(lake.path().join("src/train"))?;
    std::fs::create_dir_all(lake.path().join("src/val"))?;
    std::fs::write(lake.path().join("src/train/shard-0.bin"), &shard)?;
    std::fs::write(lake.path().join("src/val/labels.txt"), "cat\ndog\n")?;
    let worker = lakecache_worker::Worker::start(WorkerConfig {
        id: "w0".into(),
        source: lakecache_lake::SourceSpec::new(format!(
            "file://{}",
            lake.path().join("src").display()
        )),
        listen: "127.0.0.1:0".parse()?,
        admin_listen: "127.0.0.1:0".parse()?,
        block_size: ByteSize::mib(1),
        tiers: vec![TierConfig {
            kind: TierKind::Disk,
            path: Some(lake.path().join("tier")),
            size: ByteSize::mib(64),
        }],
        metadata: MetadataPolicy::Immutable,
        token_file: None,
        token: Some(TOKEN.into()),
    })
    .await?;

    // The driver, as the chart declares it, and its node plugin as a DaemonSet.
    create(
        &Api::<CSIDriver>::all(client.clone()),
        json!({
            "metadata": {"name": "csi.lakecache.io"},
            "spec": {"attachRequired": false, "podInfoOnMount": true,
                     "volumeLifecycleModes": ["Persistent", "Ephemeral"], "fsGroupPolicy": "None"},
        }),
    )
    .await?;
    node.namespace("lakecache-system").await?;
    let plugin_dir = kubelet.join("plugins/csi.lakecache.io");
    let state_dir = plugin_dir.join("state");
    let privileged = json!({"privileged": true, "runAsUser": 0, "runAsGroup": 0});
    let labels = json!({"app": "csi-node"});
    create(
        &Api::<DaemonSet>::namespaced(client.clone(), "lakecache-system"),
        json!({
            "metadata": {"name": "csi-node"},
            "spec": {
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "terminationGracePeriodSeconds": 10,
                        "containers": [
                            {
                                "name": "node-driver-registrar",
                                "image": "registry.k8s.io/sig-storage/csi-node-driver-registrar:v2.13.0",
                                "args": ["--csi-address=/csi/csi.sock"],
                                "volumeMounts": [{"name": "plugin-dir", "mountPath": "/csi"}],
                            },
                            {
                                "name": "csi-plugin",
                                "image": "lakecache",
                                "command": ["lakecache-csi-node", "plugin"],
                                "env": [
                                    {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                                    {"name": "CSI_ENDPOINT", "value": "unix:///csi/csi.sock"},
                                    {"name": "LAKECACHE_STATE_DIR", "value": state_dir},
                                    {"name": "LAKECACHE_ADMIN_LISTEN", "value": "$(POD_IP):9810"},
                                    {"name": "LAKECACHE_STARTUP_TIMEOUT", "value": "20s"},
                                    {"name": "LAKECACHE_PREFETCH_BUDGET", "value": "16MiB"},
                                ],
                                "ports": [{"name": "admin", "containerPort": 9810}],
                                "readinessProbe": {"httpGet": {"path": "/readyz", "port": "admin"}, "periodSeconds": 1},
                                "securityContext": privileged,
                                "volumeMounts": [
                                    {"name": "plugin-dir", "mountPath": "/csi"},
                                    {"name": "kubelet-dir", "mountPath": kubelet, "mountPropagation": "Bidirectional"},
                                    {"name": "fuse-device", "mountPath": "/dev/fuse"},
                                ],
                            },
                            {
                                "name": "mounter",
                                "image": "lakecache",
                                "command": ["lakecache-csi-node", "mounter"],
                                "env": [
                                    {"name": "LAKECACHE_STATE_DIR", "value": state_dir},
                                    {"name": "LAKECACHE_MOUNT_TIMEOUT", "value": "20s"},
                                ],
                                "securityContext": privileged,
                                "volumeMounts": [
                                    {"name": "kubelet-dir", "mountPath": kubelet, "mountPropagation": "Bidirectional"},
                                    {"name": "fuse-device", "mountPath": "/dev/fuse"},
                                ],
                            },
                        ],
                        "volumes": [
                            {"name": "plugin-dir", "hostPath": {"path": plugin_dir, "type": "DirectoryOrCreate"}},
                            {"name": "kubelet-dir", "hostPath": {"path": kubelet, "type": "Directory"}},
                            {"name": "fuse-device", "hostPath": {"path": "/dev/fuse", "type": "CharDevice"}},
                        ],
                    },
                },
            },
        }),
    )
    .await?;

    // The volume: a Secret with the data-plane token, a PV of the driver and its claim.
    let ns = "train";
    node.namespace(ns).await?;
    create(
        &Api::<Secret>::namespaced(client.clone(), ns),
        json!({"metadata": {"name": "lake-token"}, "stringData": {"token": TOKEN}}),
    )
    .await?;
    create(
        &Api::<PersistentVolume>::all(client.clone()),
        json!({
            "metadata": {"name": "lake-pv"},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "",
                "persistentVolumeReclaimPolicy": "Retain",
                // Pre-bound both ways, as the operator makes them: bound at once.
                "claimRef": {"kind": "PersistentVolumeClaim", "namespace": ns, "name": "lake"},
                "csi": {
                    "driver": "csi.lakecache.io",
                    "volumeHandle": "train-lake",
                    "volumeAttributes": {
                        "cacheNamespace": "lake",
                        "namespace": ns,
                        "workers": format!("w0={}", worker.addr),
                    },
                    "nodeStageSecretRef": {"name": "lake-token", "namespace": ns},
                },
            },
        }),
    )
    .await?;
    // Known to the PV controller before the claim comes, or the claim waits for the
    // controller's next periodic sync (15 s).
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    eventually("the volume seen by the PV controller", WAIT, || async {
        let pv = volumes.get("lake-pv").await?;
        Ok(pv
            .status
            .and_then(|s| s.phase)
            .filter(|p| p != "Pending")
            .map(|_| ()))
    })
    .await?;
    create(
        &Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns),
        json!({
            "metadata": {"name": "lake"},
            "spec": {
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "",
                "volumeName": "lake-pv",
                "resources": {"requests": {"storage": "1Gi"}},
            },
        }),
    )
    .await?;
    // Bound before the pods come, or the scheduler backs off for seconds before it retries.
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    eventually("the claim bound", WAIT, || async {
        let c = claims.get("lake").await?;
        Ok((c.status.and_then(|s| s.phase).as_deref() == Some("Bound")).then_some(()))
    })
    .await?;
    let pods = node.pods(ns).await?;
    let reader = |name: &str, volume: Value| {
        json!({
            "metadata": {"name": name},
            "spec": {
                "terminationGracePeriodSeconds": 2,
                "containers": [{
                    "name": "reader",
                    "image": "lakecache-test",
                    "command": ["sh", "-c", "cat /data/val/labels.txt; sha256sum /data/train/shard-0.bin; echo read-done; sleep 3600"],
                    "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": true, "mountPropagation": "HostToContainer"}],
                }],
                "volumes": [volume],
            },
        })
    };
    let claim =
        json!({"name": "data", "persistentVolumeClaim": {"claimName": "lake", "readOnly": true}});
    // A CSI inline volume of the same CacheNamespace (its namespace is the pod's).
    let inline = json!({"name": "data", "csi": {
        "driver": "csi.lakecache.io",
        "readOnly": true,
        "volumeAttributes": {"cacheNamespace": "lake", "workers": format!("w0={}", worker.addr)},
        "nodePublishSecretRef": {"name": "lake-token"},
    }});
    let started = Instant::now();
    create(&pods, reader("reader-1", claim.clone())).await?;
    create(&pods, reader("reader-2", claim)).await?;
    create(&pods, reader("reader-inline", inline)).await?;
    let sha = sha256_hex(&shard);
    for name in ["reader-1", "reader-2", "reader-inline"] {
        let log = node.log_with(ns, name, "reader", "read-done").await?;
        assert!(log.starts_with("cat\ndog\n"), "{log}");
        assert!(
            log.contains(&format!("{sha}  /data/train/shard-0.bin")),
            "{log}"
        );
    }
    eprintln!(
        "three pods read the lake through the CSI plugin pod {:.1} s after their creation",
        started.elapsed().as_secs_f64()
    );
    // The plugin's pod is Running with the registrar reported but not run.
    let system = node.pods("lakecache-system").await?;
    let plugin_pod = system
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .next()
        .context("the plugin pod")?;
    let statuses = plugin_pod
        .status
        .clone()
        .unwrap_or_default()
        .container_statuses
        .unwrap_or_default();
    assert_eq!(statuses.len(), 3);
    assert!(
        statuses.iter().all(|c| c.started == Some(true)),
        "{statuses:?}"
    );
    assert!(
        node.agent
            .logs(
                "lakecache-system",
                &plugin_pod.metadata.name.clone().unwrap(),
                "node-driver-registrar"
            )
            .is_empty()
    );

    let calls = node.agent.csi_calls();
    assert_eq!(ok_count(&calls, "NodeStageVolume"), 1, "{calls:#?}");
    assert_eq!(ok_count(&calls, "NodePublishVolume"), 3, "{calls:#?}");
    let stage = calls
        .iter()
        .find(|c| c.method == "NodeStageVolume" && c.code == "Ok")
        .unwrap();
    assert_eq!(stage.volume_id, "train-lake");
    assert!(
        stage.path.ends_with("globalmount")
            && stage
                .path
                .starts_with(kubelet.join("plugins/kubernetes.io/csi/csi.lakecache.io"))
    );
    let publish = calls
        .iter()
        .find(|c| c.method == "NodePublishVolume" && c.code == "Ok" && c.volume_id == "train-lake")
        .unwrap();
    assert_eq!(
        publish
            .volume_context
            .get("csi.storage.k8s.io/pod.namespace")
            .map(String::as_str),
        Some(ns)
    );
    assert_eq!(
        publish
            .volume_context
            .get("csi.storage.k8s.io/ephemeral")
            .map(String::as_str),
        Some("false")
    );
    assert_eq!(
        publish
            .volume_context
            .get("csi.storage.k8s.io/serviceAccount.name")
            .map(String::as_str),
        Some("default")
    );
    assert!(
        publish
            .path
            .ends_with("volumes/kubernetes.io~csi/lake-pv/mount")
    );
    // The plugin's mounts, made in its containers, are on the host.
    let staging = stage.path.clone();
    let host = on_host_mounts();
    assert!(
        host.iter().any(|m| m.mount_point == staging
            && m.fs_type.starts_with("fuse")
            && m.source == "lakecache:train/lake"),
        "the staging mount is not on the host: {:#?}",
        host.iter()
            .filter(|m| m.mount_point.starts_with(&kubelet))
            .collect::<Vec<_>>()
    );

    let inline = calls
        .iter()
        .find(|c| c.method == "NodePublishVolume" && c.volume_id.starts_with("csi-"))
        .context("the inline volume's publish")?;
    assert_eq!(inline.code, "Ok");
    assert_eq!(inline.volume_id.len(), "csi-".len() + 64);
    assert_eq!(
        inline
            .volume_context
            .get("csi.storage.k8s.io/ephemeral")
            .map(String::as_str),
        Some("true")
    );
    assert!(
        inline
            .path
            .ends_with("volumes/kubernetes.io~csi/data/mount")
    );
    delete_and_wait_gone(&pods, "reader-inline").await?;
    let calls = node.agent.csi_calls();
    assert!(
        calls.iter().any(|c| c.method == "NodeUnpublishVolume"
            && c.volume_id == inline.volume_id
            && c.code == "Ok"),
        "{calls:#?}"
    );

    // The first reader goes: its target is unpublished, the stage stays for the second.
    delete_and_wait_gone(&pods, "reader-1").await?;
    let calls = volume_calls(&node.agent, "train-lake");
    assert_eq!(ok_count(&calls, "NodeUnpublishVolume"), 1, "{calls:#?}");
    assert_eq!(ok_count(&calls, "NodeUnstageVolume"), 0, "{calls:#?}");
    assert!(on_host_mounts().iter().any(|m| m.mount_point == staging));
    // The last one goes: the volume is unstaged and nothing of it stays mounted.
    delete_and_wait_gone(&pods, "reader-2").await?;
    let calls = volume_calls(&node.agent, "train-lake");
    assert_eq!(ok_count(&calls, "NodeUnpublishVolume"), 2, "{calls:#?}");
    assert_eq!(ok_count(&calls, "NodeUnstageVolume"), 1, "{calls:#?}");
    let left: Vec<_> = on_host_mounts()
        .into_iter()
        .filter(|m| m.mount_point.starts_with(kubelet.join("pods")) || m.mount_point == staging)
        .collect();
    assert!(left.is_empty(), "still mounted: {left:#?}");
    drop(node);
    drop(worker);
    Ok(())
}

fn volume_calls(agent: &NodeAgent, volume_id: &str) -> Vec<lakecache_e2e::CsiCall> {
    agent
        .csi_calls()
        .into_iter()
        .filter(|c| c.volume_id == volume_id)
        .collect()
}

fn ok_count(calls: &[lakecache_e2e::CsiCall], method: &str) -> usize {
    calls
        .iter()
        .filter(|c| c.method == method && c.code == "Ok")
        .count()
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
