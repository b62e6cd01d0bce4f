//! A test-only node agent: a stand-in kubelet for one node of the [`Cluster`] harness, which
//! runs the containers of the pods bound to its node as local processes, so that the shipped
//! binaries (operator, cache workers, the CSI plugin and its mounter, training jobs) run
//! unchanged in an end-to-end test on a machine with no Docker, no containerd and no kubelet.
//!
//! # What it does, as kubelet does
//!
//! [`NodeAgent::start`] creates the Node ([`Cluster::add_fake_node`]), makes `<root>/kubelet`
//! (kubelet's `--root-dir`) a shared mount point (`mount --bind X X; mount --make-rshared X`),
//! and starts one background task that watches the pods bound to the node (field selector
//! `spec.nodeName=<node>`, every namespace) and gives each pod a worker task, bounded by the
//! agent's life, that loops with a short sleep:
//!
//! - **Volumes** in `<kubelet>/pods/<uid>/volumes/kubernetes.io~<kind>/<name>`: `configMap`,
//!   `secret`, `projected` (the ServiceAccount token volume that admission adds: a token from
//!   the TokenRequest API bound to the pod, `ca.crt` from ConfigMap `kube-root-ca.crt`, the
//!   namespace from the downward API) and `downwardAPI` are written as files (modes from
//!   `defaultMode` and `items`, group-owned by the pod's `fsGroup` with group read as kubelet
//!   does) and refreshed every 15 s (tokens at 80 % of their life); `emptyDir` is a directory
//!   (`medium: Memory` a tmpfs of `sizeLimit`); `hostPath` is the host path itself, checked or
//!   created by its `type`. A `persistentVolumeClaim` whose PV is a CSI volume of
//!   `csi.lakecache.io` is staged once per PV per node (`NodeStageVolume` on
//!   `<kubelet>/plugins/kubernetes.io/csi/csi.lakecache.io/<sha256(pv)>/globalmount`, the stage
//!   secret from `nodeStageSecretRef`) and published to
//!   `<pod>/volumes/kubernetes.io~csi/<pv>/mount` (`NodePublishVolume`, with the pod-info keys
//!   when the CSIDriver asks for `podInfoOnMount`); a CSI inline volume is published only (its
//!   volume id `csi-<sha256(podUID + name)>`, `csi.storage.k8s.io/ephemeral: "true"`). The CSI
//!   calls go over the driver's unix socket with tonic, exactly as kubelet makes them; while the
//!   driver is not up the pod stays Pending, its status message naming the volume that waits.
//! - **Containers**: init containers one after the other to completion, then the containers,
//!   each run by the `lakecache-pod-exec` helper (its module docs describe the mount namespace,
//!   the overlayfs root and mount propagation) in a cgroup of its own, so that stopping a
//!   container stops every process it started. The command gets Kubernetes' `$(VAR)` expansion,
//!   and the environment is the container's (`value`, `fieldRef`, `secretKeyRef`,
//!   `configMapKeyRef`, `envFrom`) plus `KUBERNETES_SERVICE_HOST=127.0.0.1` and
//!   `KUBERNETES_SERVICE_PORT` (the apiserver's serving certificate covers 127.0.0.1, so
//!   in-cluster configuration works), `HOSTNAME`, `HOME` and a default `PATH` that starts with
//!   the agent's binaries (see below). The user is `runAsUser`/`runAsGroup` with `fsGroup` and
//!   `supplementalGroups` as supplementary groups. Output goes to
//!   `<pod dir>/logs/<container>.log` ([`NodeAgent::logs`]).
//! - **Status**: Pending, then Running with `podIP` (one of `127.0.<subnet>.2-254`, all
//!   loopback on Linux; a `hostNetwork` pod gets 127.0.0.1), `hostIP`, `startTime`, the
//!   conditions and the container statuses. `httpGet` and `tcpSocket` readiness probes run
//!   against the pod IP every period (a port by number or by name); a pod is Ready when every
//!   container's probe passed (or, without one, once started). A liveness probe that fails
//!   `failureThreshold` times restarts the container. A container that exits is restarted under
//!   `restartPolicy: Always` (and under `OnFailure` when it failed) after a backoff of 0.5 s
//!   doubling to 8 s; otherwise the pod ends Succeeded (all exited 0) or Failed, and its volumes
//!   stay until the pod is deleted.
//! - **Deletion**: SIGTERM to every process of the pod, up to the grace period (capped by
//!   [`AgentOptions::max_grace`]), then SIGKILL; `NodeUnpublishVolume` for each CSI volume and
//!   `NodeUnstageVolume` once the last pod using that PV on the node is gone; the pod directory
//!   is removed, and the pod deleted with grace 0 (kubelet's final delete). A pod that vanished
//!   from the API (force-deleted) gets the same cleanup.
//!
//! # Why a helper process, and cgroups
//!
//! A container's setup (a new mount namespace, mounts, chroot, user switch) must happen in the
//! process that then `exec`s the command, and in a single-threaded one: a mount namespace
//! unshared by one thread of this multi-threaded test process would not be the child's, and a
//! `pre_exec` hook doing it would need `unsafe` and async-signal-safe code. A small helper that
//! reads a JSON spec, sets the container up and `exec`s has neither problem, and can be tried by
//! hand. Each container gets a cgroup v2 of its own (when the host lets us make one; else the
//! process group stands in) because that is how a runtime finds every process of a container:
//! the mounter's FUSE servers, started in their own process groups, die with its container as
//! they would in a pod. With the cgroup the agent also tells a container's end (its main
//! process exits: the rest is killed, as when PID 1 of a pod's container exits).
//!
//! # The "image"
//!
//! Every container's root filesystem is the host's `/` under a private overlayfs, with the
//! agent's binary directory (the cargo target's `debug/`, [`AgentOptions::bin_dir`]) bound
//! read-only at [`BIN_MOUNT`], first on `PATH`: a lakecache image holds the same binaries. A
//! container runs when its `command[0]` is found there or in the system directories; any other
//! container (one that relies on its image's entrypoint, like `node-driver-registrar`) is
//! reported Running and Ready without being run, and the agent logs that it did so.
//!
//! # Not supported
//!
//! No network namespace: every pod shares the host's network, so two pods binding the same
//! port on `0.0.0.0` collide (bind `$(POD_IP)` instead); no PID or IPC namespace. `exec`,
//! `grpc` and HTTPS probes always pass (with a warning); startup probes, lifecycle hooks,
//! sidecar init containers, capabilities (root is root, any other user has none), seccomp,
//! resource limits, image pulls, Services' cluster IPs and DNS, `resourceFieldRef`, and volume
//! kinds other than the ones above are not supported. The Node gets no heartbeats (the harness
//! runs without the node lifecycle controller).
//!
//! Dropping the agent stops everything: the containers of pods with CSI volumes first, then
//! their CSI volumes are unpublished and unstaged (best effort), then every other process is
//! killed and everything mounted under the agent's root is lazily unmounted, so a failed test
//! leaves nothing mounted. The caller owns the root directory and removes it after the drop.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, DownwardAPIVolumeFile, HostIP, KeyToPath,
    PersistentVolume, PersistentVolumeClaim, Pod, PodCondition, PodIP, PodStatus, Probe, Secret,
    SecretReference, ServiceAccount, Volume,
};
use k8s_openapi::api::storage::v1::CSIDriver;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use lakecache_proto::csi::v1 as csi;
use lakecache_proto::csi::v1::node_client::NodeClient;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

use crate::Cluster;

/// The CSI driver whose volumes the agent stages and publishes.
pub const CSI_DRIVER: &str = "csi.lakecache.io";
/// Where the agent's binary directory appears in every container, first on `PATH`.
pub const BIN_MOUNT: &str = "/usr/local/lakecache/bin";
/// The system part of a container's default `PATH` (the host's root is the image).
const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The node's address: the pods' `hostIP`, and the `podIP` of `hostNetwork` pods.
const HOST_IP: &str = "127.0.0.1";

const LOOP: Duration = Duration::from_millis(200);
const RETRY: Duration = Duration::from_secs(1);
const REFRESH: Duration = Duration::from_secs(15);
const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(8);
/// A container that ran this long starts its next backoff from the beginning.
const BACKOFF_RESET: Duration = Duration::from_secs(30);
/// Long enough for a stage that waits for the first cache worker (the plugin's
/// `--startup-timeout`, 30 s by default).
const CSI_MOUNT_TIMEOUT: Duration = Duration::from_secs(90);
const CSI_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a deleted pod's CSI volumes are retried before the pod is deleted anyway.
const TEARDOWN_LIMIT: Duration = Duration::from_secs(30);

/// What [`NodeAgent::start`] needs.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The Node's name (created with [`Cluster::add_fake_node`]).
    pub node_name: String,
    /// The agent's directory: kubelet's is `<root>/kubelet`, the containers' are under
    /// `<root>/containers`. It must exist; the caller removes it after dropping the agent.
    /// Keep it short: the CSI socket under it must fit a unix socket path (108 bytes).
    pub root: PathBuf,
    /// Pod IPs are `127.0.<pod_subnet>.<2..=254>`: give each agent of a test its own.
    pub pod_subnet: u8,
    /// The directory of lakecache's binaries, bound at [`BIN_MOUNT`] in every container.
    pub bin_dir: PathBuf,
    /// The `lakecache-pod-exec` helper (tests pass `env!("CARGO_BIN_EXE_lakecache-pod-exec")`).
    pub pod_exec: PathBuf,
    /// The CSI driver's socket; `<kubelet>/plugins/csi.lakecache.io/csi.sock` when `None`.
    pub csi_socket: Option<PathBuf>,
    /// The longest grace period a deleted pod gets before SIGKILL.
    pub max_grace: Duration,
}

impl AgentOptions {
    /// Options with the binary directory taken to be the helper's own (the cargo target's
    /// `debug/`), the default CSI socket and a 10 s grace cap.
    pub fn new(
        node_name: impl Into<String>,
        root: impl Into<PathBuf>,
        pod_subnet: u8,
        pod_exec: impl Into<PathBuf>,
    ) -> Self {
        let pod_exec = pod_exec.into();
        let bin_dir = pod_exec.parent().map(Path::to_path_buf).unwrap_or_default();
        Self {
            node_name: node_name.into(),
            root: root.into(),
            pod_subnet,
            bin_dir,
            pod_exec,
            csi_socket: None,
            max_grace: Duration::from_secs(10),
        }
    }
}

/// One CSI call the agent made, for assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsiCall {
    /// `NodeStageVolume`, `NodePublishVolume`, `NodeUnpublishVolume` or `NodeUnstageVolume`.
    pub method: &'static str,
    pub volume_id: String,
    /// The staging or target path.
    pub path: PathBuf,
    /// The gRPC code's name (`Ok`, `Unavailable`, `NotFound`, ...).
    pub code: String,
    pub message: String,
    /// The volume context sent (stage and publish).
    pub volume_context: BTreeMap<String, String>,
}

/// A running node agent; dropping it stops every container and unmounts everything it mounted.
pub struct NodeAgent {
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

struct Shared {
    client: kube::Client,
    opts: AgentOptions,
    kubelet: PathBuf,
    csi_socket: PathBuf,
    /// A tmpfs holding the containers' overlay upper and work directories.
    uppers: PathBuf,
    api_port: u16,
    /// The agent's cgroup (v2); `None` falls back to process groups.
    cgroups: Option<PathBuf>,
    state: Mutex<AgentState>,
    stages: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Stage>>>>,
    calls: Mutex<Vec<CsiCall>>,
    workers: Mutex<HashMap<String, JoinHandle<()>>>,
    warned: Mutex<HashSet<String>>,
}

#[derive(Default)]
struct AgentState {
    /// Set when the agent is dropped: no container starts any more.
    stopping: bool,
    /// The last octet of each pod IP in use, and its pod's uid.
    ips: BTreeMap<u8, String>,
    pods: HashMap<String, PodEntry>,
    /// Running containers by `<uid>/<container>`.
    procs: HashMap<String, ProcEntry>,
}

#[derive(Clone)]
struct PodEntry {
    /// When the agent took the pod (the newest wins a name lookup: a StatefulSet's pod
    /// recreated under the same name while the old one is still being torn down).
    taken: Instant,
    namespace: String,
    name: String,
    ip: String,
    dir: PathBuf,
    publications: Vec<Publication>,
}

#[derive(Clone)]
struct Publication {
    volume_id: String,
    target: PathBuf,
    /// The PV, for a persistent volume (its stage is shared by the node's pods).
    pv: Option<String>,
}

#[derive(Clone)]
struct ProcEntry {
    pid: i32,
    cgroup: Option<PathBuf>,
    pod_uid: String,
}

/// A PV's stage on this node.
struct Stage {
    volume_id: String,
    staging: PathBuf,
    staged: bool,
    /// Pods that use (or are setting up) the volume.
    users: HashSet<String>,
}

impl NodeAgent {
    /// Creates the Node, prepares kubelet's directory and starts running the node's pods.
    pub async fn start(cluster: &Cluster, opts: AgentOptions) -> anyhow::Result<NodeAgent> {
        ensure!(
            opts.root.is_dir(),
            "the agent's root {} is not a directory",
            opts.root.display()
        );
        ensure!(
            opts.pod_exec.is_file(),
            "the pod-exec helper {} does not exist (build the lakecache-e2e binaries)",
            opts.pod_exec.display()
        );
        let root = opts.root.canonicalize()?;
        let kubelet = root.join("kubelet");
        for dir in ["pods", "plugins", "plugins_registry"] {
            std::fs::create_dir_all(kubelet.join(dir))?;
        }
        share(&kubelet)?;
        let uppers = root.join("uppers");
        std::fs::create_dir_all(&uppers)?;
        if !mountinfo::is_mount_point(&uppers)? {
            nix::mount::mount(
                Some("tmpfs"),
                &uppers,
                Some("tmpfs"),
                MsFlags::empty(),
                Some("mode=0700"),
            )
            .with_context(|| format!("mounting a tmpfs on {}", uppers.display()))?;
        }
        let cgroups = make_cgroup_root(&opts.node_name);
        if cgroups.is_none() {
            tracing::warn!(
                "no cgroup v2 to put containers in: a container's processes are stopped by \
                 process group only"
            );
        }
        let api_port = cluster
            .server()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .context("the apiserver URL has no port")?;
        let csi_socket = opts
            .csi_socket
            .clone()
            .unwrap_or_else(|| kubelet.join("plugins").join(CSI_DRIVER).join("csi.sock"));
        let client = cluster.client().await?;

        cluster.add_fake_node(&opts.node_name).await?;
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
        nodes
            .patch_status(
                &opts.node_name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"addresses": [
                    {"type": "InternalIP", "address": HOST_IP},
                    {"type": "Hostname", "address": opts.node_name},
                ]}})),
            )
            .await
            .context("setting the node's addresses")?;

        let shared = Arc::new(Shared {
            client,
            opts: AgentOptions { root, ..opts },
            kubelet,
            csi_socket,
            uppers,
            api_port,
            cgroups,
            state: Mutex::default(),
            stages: Mutex::default(),
            calls: Mutex::default(),
            workers: Mutex::default(),
            warned: Mutex::default(),
        });
        let task = tokio::spawn(run_agent(shared.clone()));
        tracing::info!(node = %shared.opts.node_name, kubelet = %shared.kubelet.display(), "node agent started");
        Ok(NodeAgent {
            shared,
            task: Some(task),
        })
    }

    /// The node's name.
    pub fn node_name(&self) -> &str {
        &self.shared.opts.node_name
    }

    /// kubelet's directory, `<root>/kubelet` (a shared mount point).
    pub fn kubelet_dir(&self) -> &Path {
        &self.shared.kubelet
    }

    /// The CSI driver socket the agent calls.
    pub fn csi_socket(&self) -> &Path {
        &self.shared.csi_socket
    }

    /// The IP of a pod this agent runs.
    pub fn pod_ip(&self, namespace: &str, name: &str) -> Option<String> {
        self.entry(namespace, name).map(|e| e.ip)
    }

    /// The directory of a pod this agent runs (`<kubelet>/pods/<uid>`).
    pub fn pod_dir(&self, namespace: &str, name: &str) -> Option<PathBuf> {
        self.entry(namespace, name).map(|e| e.dir)
    }

    /// The log of a container (every run of it, appended); empty when there is none.
    pub fn logs(&self, namespace: &str, pod: &str, container: &str) -> String {
        self.entry(namespace, pod)
            .and_then(|e| std::fs::read(e.dir.join("logs").join(format!("{container}.log"))).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Every CSI call made so far, in order.
    pub fn csi_calls(&self) -> Vec<CsiCall> {
        self.shared.calls.lock().unwrap().clone()
    }

    fn entry(&self, namespace: &str, name: &str) -> Option<PodEntry> {
        let state = self.shared.state.lock().unwrap();
        state
            .pods
            .values()
            .filter(|e| e.namespace == namespace && e.name == name)
            .max_by_key(|e| e.taken)
            .cloned()
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        let shared = &self.shared;
        if let Some(task) = self.task.take() {
            task.abort();
        }
        for (_, w) in shared.workers.lock().unwrap().drain() {
            w.abort();
        }
        // A worker still running (an abort lands at its next await) starts nothing after this:
        // containers are started and registered under this lock.
        let (pods, procs) = {
            let mut state = shared.state.lock().unwrap();
            state.stopping = true;
            (state.pods.clone(), state.procs.clone())
        };
        // Consumers of CSI volumes first, so that their volumes can be unpublished while the
        // plugin (which may be a pod of this agent) still runs.
        let consumers: HashSet<&String> = pods
            .iter()
            .filter(|(_, e)| !e.publications.is_empty())
            .map(|(uid, _)| uid)
            .collect();
        let (first, rest): (Vec<_>, Vec<_>) =
            procs.values().partition(|p| consumers.contains(&p.pod_uid));
        kill_all(&first);
        let publications: Vec<Publication> = pods
            .values()
            .flat_map(|e| e.publications.iter().cloned())
            .collect();
        let stages: Vec<(String, PathBuf)> = shared
            .stages
            .lock()
            .unwrap()
            .values()
            .filter_map(|s| {
                s.try_lock()
                    .ok()
                    .filter(|s| s.staged)
                    .map(|s| (s.volume_id.clone(), s.staging.clone()))
            })
            .collect();
        if (!publications.is_empty() || !stages.is_empty()) && shared.csi_socket.exists() {
            let socket = shared.csi_socket.clone();
            let cleanup = std::thread::spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(async {
                    for p in publications {
                        let req = csi::NodeUnpublishVolumeRequest {
                            volume_id: p.volume_id.clone(),
                            target_path: p.target.display().to_string(),
                        };
                        let mut client = NodeClient::new(csi_channel(&socket));
                        let call = client.node_unpublish_volume(req);
                        let _ = tokio::time::timeout(Duration::from_secs(5), call).await;
                    }
                    for (volume_id, staging) in stages {
                        let req = csi::NodeUnstageVolumeRequest {
                            volume_id,
                            staging_target_path: staging.display().to_string(),
                        };
                        let mut client = NodeClient::new(csi_channel(&socket));
                        let call = client.node_unstage_volume(req);
                        let _ = tokio::time::timeout(Duration::from_secs(5), call).await;
                    }
                });
            });
            let _ = cleanup.join();
        }
        kill_all(&rest);
        // Every mount under the root, deepest (latest) first, lazily; again while some remain
        // (a detached parent can expose mounts propagated into it meanwhile).
        for _ in 0..5 {
            let Ok(table) = mountinfo::read_self() else {
                break;
            };
            let ours: Vec<_> = table
                .iter()
                .rev()
                .filter(|m| m.mount_point.starts_with(&shared.opts.root))
                .collect();
            if ours.is_empty() {
                break;
            }
            for m in ours {
                let _ = nix::mount::umount2(&m.mount_point, MntFlags::MNT_DETACH);
            }
        }
        if let Some(cg) = &shared.cgroups {
            remove_cgroup_tree(cg);
        }
        tracing::info!(node = %shared.opts.node_name, "node agent stopped");
    }
}

/// Makes `dir` a mount point in a shared peer group of its own, as kubelet's directory is on a
/// node (so that `Bidirectional` mounts reach the host).
fn share(dir: &Path) -> anyhow::Result<()> {
    if !mountinfo::is_mount_point(dir)? {
        nix::mount::mount(
            Some(dir),
            dir,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .with_context(|| format!("mount --bind {0} {0}", dir.display()))?;
    }
    nix::mount::mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_SHARED | MsFlags::MS_REC,
        None::<&str>,
    )
    .with_context(|| format!("mount --make-rshared {}", dir.display()))?;
    Ok(())
}

/// A cgroup v2 directory for the agent's containers, when the host has cgroup v2 mounted and
/// lets us make one.
fn make_cgroup_root(node: &str) -> Option<PathBuf> {
    let table = mountinfo::read_self().ok()?;
    let base = table.iter().find(|m| m.fs_type == "cgroup2")?;
    let dir = base.mount_point.join(format!(
        "lakecache-agent-{node}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir(&dir).ok()?;
    dir.join("cgroup.kill").exists().then_some(dir)
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    for _ in 0..50 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGKILL to every process of these containers, then a bounded wait for them to be gone.
fn kill_all(procs: &[&ProcEntry]) {
    for p in procs {
        signal_container(p.pid, p.cgroup.as_deref(), Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && procs.iter().any(|p| container_alive(p)) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn container_alive(p: &ProcEntry) -> bool {
    match &p.cgroup {
        Some(cg) => cgroup_populated(cg),
        None => nix::sys::signal::kill(Pid::from_raw(p.pid), None).is_ok(),
    }
}

fn cgroup_populated(cg: &Path) -> bool {
    std::fs::read_to_string(cg.join("cgroup.events"))
        .map(|s| s.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

/// Sends `signal` to every process of a container: through its cgroup when it has one
/// (`cgroup.kill` for SIGKILL), else to its process group.
fn signal_container(pid: i32, cgroup: Option<&Path>, signal: Signal) {
    if let Some(cg) = cgroup {
        if signal == Signal::SIGKILL && std::fs::write(cg.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        if let Ok(procs) = std::fs::read_to_string(cg.join("cgroup.procs")) {
            for p in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(Pid::from_raw(p), signal);
            }
        }
    }
    let _ = nix::sys::signal::killpg(Pid::from_raw(pid), signal);
}

// ---------------------------------------------------------------------------------------------
// The node's loop: one worker per pod.

async fn run_agent(shared: Arc<Shared>) {
    let api: Api<Pod> = Api::all(shared.client.clone());
    let (store, writer) = reflector::store();
    let config =
        watcher::Config::default().fields(&format!("spec.nodeName={}", shared.opts.node_name));
    let notify = Arc::new(tokio::sync::Notify::new());
    let events = notify.clone();
    let watch_task = tokio::spawn(async move {
        let stream = reflector(writer, watcher(api, config)).default_backoff();
        futures::pin_mut!(stream);
        // Bounded by the agent's life: the task is aborted with it.
        while let Some(event) = stream.next().await {
            if let Err(e) = event {
                tracing::warn!(error = %e, "watching the node's pods");
            }
            events.notify_one();
        }
    });
    let _watch = AbortOnDrop(watch_task);
    if store.wait_until_ready().await.is_err() {
        return;
    }
    let mut senders: HashMap<String, watch::Sender<Option<Pod>>> = HashMap::new();
    let mut done: HashSet<String> = HashSet::new();
    loop {
        let mut seen = HashSet::new();
        for pod in store.state() {
            let Some(uid) = pod.metadata.uid.clone() else {
                continue;
            };
            seen.insert(uid.clone());
            if done.contains(&uid) {
                continue;
            }
            match senders.get(&uid) {
                Some(tx) => {
                    tx.send_if_modified(|old| {
                        let changed = old.as_ref().map(|o| &o.metadata.resource_version)
                            != Some(&pod.metadata.resource_version);
                        if changed {
                            *old = Some((*pod).clone());
                        }
                        changed
                    });
                }
                None => {
                    let (tx, rx) = watch::channel(Some((*pod).clone()));
                    let worker = tokio::spawn(run_pod(shared.clone(), uid.clone(), rx));
                    shared.workers.lock().unwrap().insert(uid.clone(), worker);
                    senders.insert(uid, tx);
                }
            }
        }
        for (uid, tx) in &senders {
            if !seen.contains(uid) {
                tx.send_if_modified(|old| old.take().is_some());
            }
        }
        {
            let mut workers = shared.workers.lock().unwrap();
            let finished: Vec<String> = workers
                .iter()
                .filter(|(_, w)| w.is_finished())
                .map(|(uid, _)| uid.clone())
                .collect();
            for uid in finished {
                workers.remove(&uid);
                senders.remove(&uid);
                done.insert(uid);
            }
        }
        done.retain(|uid| seen.contains(uid));
        tokio::select! {
            _ = tokio::time::sleep(LOOP) => {}
            _ = notify.notified() => {}
        }
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One pod's life on the node, from its first sight to its cleanup.
async fn run_pod(shared: Arc<Shared>, uid: String, mut rx: watch::Receiver<Option<Pod>>) {
    let Some(pod) = rx.borrow_and_update().clone() else {
        return;
    };
    let mut run = match PodRun::new(shared, uid, pod) {
        Ok(run) => run,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "cannot take the pod");
            return;
        }
    };
    loop {
        let current = rx.borrow_and_update().clone();
        match current {
            None => {
                run.teardown(false).await;
                return;
            }
            Some(pod) => {
                let deleting = pod.metadata.deletion_timestamp.is_some();
                run.pod = pod;
                if deleting {
                    run.teardown(true).await;
                    return;
                }
            }
        }
        run.step().await;
        run.publish_status().await;
        tokio::select! {
            _ = tokio::time::sleep(LOOP) => {}
            changed = rx.changed() => if changed.is_err() { return },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One pod.

struct PodRun {
    shared: Arc<Shared>,
    uid: String,
    pod: Pod,
    dir: PathBuf,
    ip: String,
    start_time: Time,
    vols: HashMap<String, Vol>,
    /// The PVs this pod uses (or tried to) on the node's CSI stages.
    pvs: BTreeSet<String>,
    next_volume_try: Instant,
    /// Why the pod cannot start yet (a volume that waits).
    waiting: Option<String>,
    init: Vec<Ctr>,
    ctrs: Vec<Ctr>,
    next_init: usize,
    /// Succeeded or Failed: nothing runs any more.
    terminal: Option<&'static str>,
    conditions: BTreeMap<&'static str, (bool, Time)>,
    last_status: Option<Value>,
}

/// A volume set up on the host.
struct Vol {
    /// What containers mount (a directory, a file or a device).
    path: PathBuf,
    /// Files written for an API-backed volume, and when to write them again.
    files: BTreeSet<PathBuf>,
    refresh_at: Option<Instant>,
    /// Tokens of a projected volume by file, and when to ask again.
    tokens: HashMap<PathBuf, (Vec<u8>, Instant)>,
}

/// A token file of a projected volume, its token and when to ask for a new one.
type NewToken = (PathBuf, Vec<u8>, Instant);

struct Ctr {
    spec: Container,
    /// Decided at the first start: whether the command can be run here.
    runnable: Option<bool>,
    state: CtrState,
    restarts: i32,
    last_term: Option<Term>,
    backoff: Duration,
    readiness: ProbeState,
    liveness: ProbeState,
}

enum CtrState {
    NotStarted,
    Running(Running),
    /// Not run (no command the agent can run), reported Running.
    Phantom(Time),
    Exited(Term),
    Backoff {
        until: Instant,
        term: Term,
    },
}

struct Running {
    child: tokio::process::Child,
    pid: i32,
    cgroup: Option<PathBuf>,
    upper: PathBuf,
    started: Time,
    started_at: Instant,
}

#[derive(Clone)]
struct Term {
    code: i32,
    reason: String,
    /// Why it could not start, when it could not.
    message: Option<String>,
    started: Time,
    finished: Time,
}

#[derive(Default)]
struct ProbeState {
    next_at: Option<Instant>,
    ok: bool,
    successes: i32,
    failures: i32,
}

impl Ctr {
    fn new(spec: Container) -> Self {
        Self {
            spec,
            runnable: None,
            state: CtrState::NotStarted,
            restarts: 0,
            last_term: None,
            backoff: BACKOFF_START,
            readiness: ProbeState::default(),
            liveness: ProbeState {
                ok: true,
                ..Default::default()
            },
        }
    }

    fn ready(&self) -> bool {
        match &self.state {
            CtrState::Phantom(_) => true,
            CtrState::Running(_) => self.spec.readiness_probe.is_none() || self.readiness.ok,
            _ => false,
        }
    }

    fn key(&self, uid: &str) -> String {
        format!("{uid}/{}", self.spec.name)
    }
}

fn now() -> Time {
    Time(Timestamp::now())
}

fn hex_sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl PodRun {
    fn new(shared: Arc<Shared>, uid: String, pod: Pod) -> anyhow::Result<Self> {
        let spec = pod.spec.clone().unwrap_or_default();
        let ip = if spec.host_network == Some(true) {
            HOST_IP.to_string()
        } else {
            let mut state = shared.state.lock().unwrap();
            let octet = (2..=254u8)
                .find(|o| !state.ips.contains_key(o))
                .context("no pod IP left on the node")?;
            state.ips.insert(octet, uid.clone());
            format!("127.0.{}.{octet}", shared.opts.pod_subnet)
        };
        let dir = shared.kubelet.join("pods").join(&uid);
        std::fs::create_dir_all(dir.join("logs"))?;
        std::fs::create_dir_all(dir.join("volumes"))?;
        shared.state.lock().unwrap().pods.insert(
            uid.clone(),
            PodEntry {
                taken: Instant::now(),
                namespace: pod.metadata.namespace.clone().unwrap_or_default(),
                name: pod.metadata.name.clone().unwrap_or_default(),
                ip: ip.clone(),
                dir: dir.clone(),
                publications: vec![],
            },
        );
        tracing::info!(pod = %pod_name(&pod), %uid, %ip, "pod accepted");
        Ok(Self {
            init: spec
                .init_containers
                .unwrap_or_default()
                .into_iter()
                .map(Ctr::new)
                .collect(),
            ctrs: spec.containers.into_iter().map(Ctr::new).collect(),
            shared,
            uid,
            pod,
            dir,
            ip,
            start_time: now(),
            vols: HashMap::new(),
            pvs: BTreeSet::new(),
            next_volume_try: Instant::now(),
            waiting: None,
            next_init: 0,
            terminal: None,
            conditions: BTreeMap::new(),
            last_status: None,
        })
    }

    fn namespace(&self) -> String {
        self.pod.metadata.namespace.clone().unwrap_or_default()
    }

    fn name(&self) -> String {
        self.pod.metadata.name.clone().unwrap_or_default()
    }

    fn restart_policy(&self) -> String {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into())
    }

    /// One pass: volumes, then init containers, then containers and their probes.
    async fn step(&mut self) {
        if self.terminal.is_some() {
            return;
        }
        if let Err(e) = self.ensure_volumes().await {
            let message = format!("{e:#}");
            if self.waiting.as_deref() != Some(message.as_str()) {
                tracing::info!(pod = %pod_name(&self.pod), %message, "pod waits");
            }
            self.waiting = Some(message);
            return;
        }
        self.waiting = None;
        let policy = self.restart_policy();
        // Init containers, in order, each to completion.
        while self.next_init < self.init.len() {
            let i = self.next_init;
            self.poll_exit(true, i, &policy);
            match &self.init[i].state {
                CtrState::NotStarted => {
                    self.start(true, i).await;
                    return;
                }
                CtrState::Backoff { until, .. } if Instant::now() >= *until => {
                    self.start(true, i).await;
                    return;
                }
                CtrState::Exited(t) if t.code == 0 => self.next_init += 1,
                CtrState::Exited(_) => {
                    // Not restarted: restartPolicy Never.
                    self.terminal = Some("Failed");
                    return;
                }
                CtrState::Phantom(_) => self.next_init += 1,
                _ => return,
            }
        }
        for i in 0..self.ctrs.len() {
            self.poll_exit(false, i, &policy);
            let due = match &self.ctrs[i].state {
                CtrState::NotStarted => true,
                CtrState::Backoff { until, .. } => Instant::now() >= *until,
                _ => false,
            };
            if due {
                self.start(false, i).await;
            }
        }
        self.probe().await;
        let all_exited = self
            .ctrs
            .iter()
            .all(|c| matches!(c.state, CtrState::Exited(_)));
        if all_exited && !self.ctrs.is_empty() {
            let ok = self
                .ctrs
                .iter()
                .all(|c| matches!(&c.state, CtrState::Exited(t) if t.code == 0));
            let phase = if ok { "Succeeded" } else { "Failed" };
            tracing::info!(pod = %pod_name(&self.pod), phase, "pod finished");
            self.terminal = Some(phase);
        }
    }

    fn ctr_mut(&mut self, init: bool, i: usize) -> &mut Ctr {
        if init {
            &mut self.init[i]
        } else {
            &mut self.ctrs[i]
        }
    }

    /// Notices a container's exit and decides on its restart.
    fn poll_exit(&mut self, init: bool, i: usize, policy: &str) {
        let uid = self.uid.clone();
        let shared = self.shared.clone();
        let pod = pod_name(&self.pod);
        let c = self.ctr_mut(init, i);
        let CtrState::Running(r) = &mut c.state else {
            return;
        };
        let status = match r.child.try_wait() {
            Ok(Some(status)) => status,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "waiting for a container");
                return;
            }
        };
        use std::os::unix::process::ExitStatusExt;
        let code = status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
        let reason = match code {
            0 => "Completed",
            125..=127 => "StartError",
            _ => "Error",
        };
        let ran = r.started_at.elapsed();
        let term = Term {
            code,
            reason: reason.into(),
            message: None,
            started: r.started.clone(),
            finished: now(),
        };
        // The container is over when its main process is: the rest of it goes too.
        signal_container(r.pid, r.cgroup.as_deref(), Signal::SIGKILL);
        let cgroup = r.cgroup.clone();
        let upper = r.upper.clone();
        tokio::spawn(async move { release_container(cgroup, upper).await });
        shared.state.lock().unwrap().procs.remove(&c.key(&uid));
        // Init containers run to completion: a failed one is retried unless the policy is
        // Never, a finished one never runs again.
        let restart = if init {
            code != 0 && policy != "Never"
        } else {
            match policy {
                "Always" => true,
                "OnFailure" => code != 0,
                _ => false,
            }
        };
        tracing::info!(%pod, container = %c.spec.name, code, restart, "container exited");
        c.readiness = ProbeState::default();
        c.liveness = ProbeState {
            ok: true,
            ..Default::default()
        };
        c.last_term = Some(term.clone());
        if restart {
            if ran >= BACKOFF_RESET {
                c.backoff = BACKOFF_START;
            }
            let until = Instant::now() + c.backoff;
            c.backoff = (c.backoff * 2).min(BACKOFF_MAX);
            c.state = CtrState::Backoff { until, term };
        } else {
            c.state = CtrState::Exited(term);
        }
    }

    /// Starts a container (or marks it Running without running it when it cannot be run).
    async fn start(&mut self, init: bool, i: usize) {
        let restarts = match self.ctr_mut(init, i).state {
            CtrState::Backoff { .. } => self.ctr_mut(init, i).restarts + 1,
            _ => self.ctr_mut(init, i).restarts,
        };
        let result = self.launch(init, i, restarts).await;
        let pod = pod_name(&self.pod);
        let logs = self.dir.join("logs");
        let c = self.ctr_mut(init, i);
        c.restarts = restarts;
        match result {
            Ok(Some(running)) => {
                let delay = |p: &Option<Probe>| {
                    p.as_ref()
                        .map(|p| secs(p.initial_delay_seconds, 0))
                        .unwrap_or_default()
                };
                c.readiness.next_at = Some(Instant::now() + delay(&c.spec.readiness_probe));
                c.liveness.next_at = Some(Instant::now() + delay(&c.spec.liveness_probe));
                tracing::info!(%pod, container = %c.spec.name, pid = running.pid, restarts, "container started");
                c.state = CtrState::Running(running);
            }
            Ok(None) => {
                tracing::info!(
                    %pod,
                    container = %c.spec.name,
                    image = c.spec.image.as_deref().unwrap_or(""),
                    "not running this container: its command is not a program the agent has \
                     (it relies on its image); reporting it Running and Ready"
                );
                c.state = CtrState::Phantom(now());
            }
            Err(e) => {
                let message = format!("{e:#}");
                tracing::warn!(%pod, container = %c.spec.name, %message, "cannot start the container");
                let term = Term {
                    code: 128,
                    reason: "StartError".into(),
                    message: Some(message.clone()),
                    started: now(),
                    finished: now(),
                };
                let until = Instant::now() + c.backoff;
                c.backoff = (c.backoff * 2).min(BACKOFF_MAX);
                c.last_term = Some(term.clone());
                c.state = CtrState::Backoff { until, term };
                let log = logs.join(format!("{}.log", c.spec.name));
                let _ = append(
                    &log,
                    &format!("lakecache node agent: cannot start: {message}\n"),
                );
            }
        }
    }

    /// Builds the container's spec for the helper and starts it; `None` when it is not
    /// runnable here.
    async fn launch(
        &mut self,
        init: bool,
        i: usize,
        restarts: i32,
    ) -> anyhow::Result<Option<Running>> {
        let spec = self.ctr_mut(init, i).spec.clone();
        let command: Vec<String> = spec.command.clone().unwrap_or_default();
        let runnable = match self.ctr_mut(init, i).runnable {
            Some(r) => r,
            None => {
                let r = command
                    .first()
                    .is_some_and(|p| self.resolve_program(p).is_some());
                self.ctr_mut(init, i).runnable = Some(r);
                r
            }
        };
        if !runnable {
            return Ok(None);
        }
        let env = self.container_env(&spec).await?;
        let lookup = |name: &str| {
            env.iter()
                .rev()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let argv: Vec<String> = command
            .iter()
            .chain(spec.args.iter().flatten())
            .map(|a| expand(a, &lookup))
            .collect();
        let mounts = self.container_mounts(&spec, &lookup)?;
        let user = self.container_user(&spec);
        let read_only_root = spec
            .security_context
            .as_ref()
            .and_then(|s| s.read_only_root_filesystem)
            .unwrap_or(false);

        let shared = &self.shared;
        let instance = format!("{}-{}-{restarts}", self.uid, spec.name);
        let cdir = shared
            .opts
            .root
            .join("containers")
            .join(&self.uid)
            .join(&spec.name);
        let rootfs = cdir.join("rootfs");
        std::fs::create_dir_all(&rootfs)?;
        let upper = shared.uppers.join(&instance);
        let _ = std::fs::remove_dir_all(&upper);
        std::fs::create_dir_all(upper.join("upper"))?;
        std::fs::create_dir_all(upper.join("work"))?;
        let cgroup = match &shared.cgroups {
            Some(base) => {
                let cg = base.join(&instance);
                match std::fs::create_dir(&cg) {
                    Ok(()) => Some(cg),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Some(cg),
                    Err(e) => bail!("creating the cgroup {}: {e}", cg.display()),
                }
            }
            None => None,
        };
        let host_network = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false);
        let exec = spec::ExecSpec {
            rootfs,
            upper_dir: upper.join("upper"),
            work_dir: upper.join("work"),
            cgroup: cgroup.clone(),
            hostname: (!host_network).then(|| self.name()),
            mounts,
            read_only_root,
            working_dir: spec.working_dir.clone(),
            user,
            argv,
            env,
        };
        // It holds the environment, secrets included.
        let spec_path = cdir.join("spec.json");
        write_file(&spec_path, &serde_json::to_vec_pretty(&exec)?, 0o600)?;
        let log_path = self.dir.join("logs").join(format!("{}.log", spec.name));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let mut command = tokio::process::Command::new(&shared.opts.pod_exec);
        command
            .arg(&spec_path)
            .env_clear()
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        let (child, pid) = {
            let mut state = shared.state.lock().unwrap();
            ensure!(!state.stopping, "the node agent is stopping");
            let child = command
                .spawn()
                .with_context(|| format!("starting {}", shared.opts.pod_exec.display()))?;
            let pid = child.id().context("the helper exited at once")? as i32;
            state.procs.insert(
                format!("{}/{}", self.uid, spec.name),
                ProcEntry {
                    pid,
                    cgroup: cgroup.clone(),
                    pod_uid: self.uid.clone(),
                },
            );
            (child, pid)
        };
        Ok(Some(Running {
            child,
            pid,
            cgroup,
            upper,
            started: now(),
            started_at: Instant::now(),
        }))
    }

    /// Where `program` would be found in the container, looked up on the host (whose root is
    /// the container's image).
    fn resolve_program(&self, program: &str) -> Option<PathBuf> {
        let is_exec = |p: &Path| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        };
        if program.contains('/') {
            let p = self.container_to_host(program);
            return is_exec(&p).then_some(p);
        }
        std::iter::once(self.shared.opts.bin_dir.clone())
            .chain(SYSTEM_PATH.split(':').map(PathBuf::from))
            .map(|d| d.join(program))
            .find(|p| is_exec(p))
    }

    fn container_to_host(&self, path: &str) -> PathBuf {
        match Path::new(path).strip_prefix(BIN_MOUNT) {
            Ok(rest) => self.shared.opts.bin_dir.join(rest),
            Err(_) => PathBuf::from(path),
        }
    }

    fn container_user(&self, c: &Container) -> Option<spec::UserSpec> {
        let psc = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.security_context.clone())
            .unwrap_or_default();
        let csc = c.security_context.clone().unwrap_or_default();
        let uid = csc.run_as_user.or(psc.run_as_user).unwrap_or(0) as u32;
        let gid = csc.run_as_group.or(psc.run_as_group).unwrap_or(0) as u32;
        let mut groups: Vec<u32> = vec![];
        if let Some(g) = psc.fs_group {
            groups.push(g as u32);
        }
        groups.extend(psc.supplemental_groups.iter().flatten().map(|g| *g as u32));
        groups.dedup();
        if uid == 0 && gid == 0 && groups.is_empty() {
            return None;
        }
        Some(spec::UserSpec { uid, gid, groups })
    }

    fn fs_group(&self) -> Option<u32> {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.security_context.as_ref())
            .and_then(|s| s.fs_group)
            .map(|g| g as u32)
    }

    /// The container's environment, in Kubernetes' order: the service variables, `envFrom`,
    /// then `env` with `$(VAR)` expanded against what is defined before it; then what the
    /// runtime adds when the container does not set it (`PATH`, `HOSTNAME`, `HOME`).
    async fn container_env(&self, c: &Container) -> anyhow::Result<Vec<(String, String)>> {
        let ns = self.namespace();
        let mut env: Vec<(String, String)> = vec![];
        let set = |env: &mut Vec<(String, String)>, k: String, v: String| match env
            .iter_mut()
            .find(|(name, _)| *name == k)
        {
            Some(slot) => slot.1 = v,
            None => env.push((k, v)),
        };
        let port = self.shared.api_port.to_string();
        for (k, v) in [
            ("KUBERNETES_SERVICE_HOST", HOST_IP.to_string()),
            ("KUBERNETES_SERVICE_PORT", port.clone()),
            ("KUBERNETES_SERVICE_PORT_HTTPS", port.clone()),
            ("KUBERNETES_PORT", format!("tcp://{HOST_IP}:{port}")),
        ] {
            set(&mut env, k.into(), v);
        }
        for from in c.env_from.iter().flatten() {
            let prefix = from.prefix.clone().unwrap_or_default();
            let data = if let Some(r) = &from.config_map_ref {
                self.config_map_data(&ns, &r.name, r.optional.unwrap_or(false))
                    .await?
            } else if let Some(r) = &from.secret_ref {
                self.secret_data(&ns, &r.name, r.optional.unwrap_or(false))
                    .await?
            } else {
                None
            };
            for (k, v) in data.unwrap_or_default() {
                set(
                    &mut env,
                    format!("{prefix}{k}"),
                    String::from_utf8_lossy(&v).into_owned(),
                );
            }
        }
        for var in c.env.iter().flatten() {
            let value = if let Some(from) = &var.value_from {
                if let Some(f) = &from.field_ref {
                    self.field_value(&f.field_path)?
                } else if let Some(r) = &from.secret_key_ref {
                    match self
                        .secret_data(&ns, &r.name, r.optional.unwrap_or(false))
                        .await?
                        .and_then(|d| d.get(&r.key).cloned())
                    {
                        Some(v) => String::from_utf8_lossy(&v).into_owned(),
                        None if r.optional == Some(true) => continue,
                        None => bail!(
                            "env {}: Secret {ns}/{} has no key {:?}",
                            var.name,
                            r.name,
                            r.key
                        ),
                    }
                } else if let Some(r) = &from.config_map_key_ref {
                    match self
                        .config_map_data(&ns, &r.name, r.optional.unwrap_or(false))
                        .await?
                        .and_then(|d| d.get(&r.key).cloned())
                    {
                        Some(v) => String::from_utf8_lossy(&v).into_owned(),
                        None if r.optional == Some(true) => continue,
                        None => bail!(
                            "env {}: ConfigMap {ns}/{} has no key {:?}",
                            var.name,
                            r.name,
                            r.key
                        ),
                    }
                } else {
                    bail!(
                        "env {}: only fieldRef, secretKeyRef and configMapKeyRef are supported by \
                         the node agent",
                        var.name
                    );
                }
            } else {
                let defined = env.clone();
                expand(var.value.as_deref().unwrap_or(""), &|name: &str| {
                    defined
                        .iter()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.clone())
                })
            };
            set(&mut env, var.name.clone(), value);
        }
        let defaults = [
            ("PATH", format!("{BIN_MOUNT}:{SYSTEM_PATH}")),
            ("HOSTNAME", self.name()),
            (
                "HOME",
                match self.container_user(c) {
                    Some(u) if u.uid != 0 => "/".to_string(),
                    _ => "/root".to_string(),
                },
            ),
        ];
        for (k, v) in defaults {
            if !env.iter().any(|(name, _)| name == k) {
                env.push((k.into(), v));
            }
        }
        Ok(env)
    }

    /// A `fieldRef` of the pod.
    fn field_value(&self, path: &str) -> anyhow::Result<String> {
        let m = &self.pod.metadata;
        let spec = self.pod.spec.clone().unwrap_or_default();
        let label = |map: &Option<BTreeMap<String, String>>, key: &str| {
            map.as_ref()
                .and_then(|m| m.get(key).cloned())
                .unwrap_or_default()
        };
        let quoted = |map: &Option<BTreeMap<String, String>>| {
            map.iter()
                .flatten()
                .map(|(k, v)| format!("{k}={v:?}\n"))
                .collect::<String>()
        };
        Ok(match path {
            "metadata.name" => self.name(),
            "metadata.namespace" => self.namespace(),
            "metadata.uid" => self.uid.clone(),
            "metadata.labels" => quoted(&m.labels),
            "metadata.annotations" => quoted(&m.annotations),
            "spec.nodeName" => spec.node_name.unwrap_or_default(),
            "spec.serviceAccountName" => spec.service_account_name.unwrap_or_default(),
            "status.podIP" | "status.podIPs" => self.ip.clone(),
            "status.hostIP" | "status.hostIPs" => HOST_IP.into(),
            p => {
                let key = |prefix: &str| {
                    p.strip_prefix(prefix)
                        .and_then(|r| r.strip_suffix("']"))
                        .map(str::to_string)
                };
                if let Some(k) = key("metadata.labels['") {
                    label(&m.labels, &k)
                } else if let Some(k) = key("metadata.annotations['") {
                    label(&m.annotations, &k)
                } else {
                    bail!("fieldRef {p:?} is not supported by the node agent")
                }
            }
        })
    }

    /// The helper's mounts for a container: its volume mounts, and the agent's binaries.
    fn container_mounts(
        &self,
        c: &Container,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Vec<spec::MountSpec>> {
        let mut mounts = vec![spec::MountSpec {
            source: self.shared.opts.bin_dir.clone(),
            target: BIN_MOUNT.into(),
            read_only: true,
            propagation: spec::Propagation::None,
        }];
        for vm in c.volume_mounts.iter().flatten() {
            let vol = self.vols.get(&vm.name).with_context(|| {
                format!("volumeMount {}: no volume {:?}", vm.mount_path, vm.name)
            })?;
            let sub = match (&vm.sub_path, &vm.sub_path_expr) {
                (Some(p), _) if !p.is_empty() => Some(p.clone()),
                (_, Some(e)) if !e.is_empty() => Some(expand(e, lookup)),
                _ => None,
            };
            let source = match sub {
                Some(sub) => {
                    let rel = Path::new(&sub);
                    ensure!(
                        rel.components().all(|c| matches!(c, Component::Normal(_))),
                        "volumeMount {}: subPath {sub:?} must be a relative path without '..'",
                        vm.mount_path
                    );
                    let p = vol.path.join(rel);
                    if std::fs::symlink_metadata(&p).is_err() {
                        std::fs::create_dir_all(&p)
                            .with_context(|| format!("creating subPath {}", p.display()))?;
                    }
                    let real = p.canonicalize()?;
                    ensure!(
                        real.starts_with(vol.path.canonicalize()?),
                        "volumeMount {}: subPath {sub:?} leaves its volume",
                        vm.mount_path
                    );
                    real
                }
                None => vol.path.clone(),
            };
            let propagation = match vm.mount_propagation.as_deref() {
                None | Some("None") => spec::Propagation::None,
                Some("HostToContainer") => spec::Propagation::HostToContainer,
                Some("Bidirectional") => spec::Propagation::Bidirectional,
                Some(other) => bail!("mountPropagation {other:?} is not a propagation mode"),
            };
            mounts.push(spec::MountSpec {
                source,
                target: vm.mount_path.clone(),
                read_only: vm.read_only.unwrap_or(false),
                propagation,
            });
        }
        Ok(mounts)
    }

    // -- Probes ---------------------------------------------------------------------------

    /// Runs the probes that are due, all at once, and applies their results.
    async fn probe(&mut self) {
        struct Due {
            idx: usize,
            liveness: bool,
            action: ProbeAction,
            timeout: Duration,
        }
        let mut due = vec![];
        let now = Instant::now();
        for (idx, c) in self.ctrs.iter().enumerate() {
            if !matches!(c.state, CtrState::Running(_)) {
                continue;
            }
            for (liveness, probe, state) in [
                (false, &c.spec.readiness_probe, &c.readiness),
                (true, &c.spec.liveness_probe, &c.liveness),
            ] {
                let Some(probe) = probe else { continue };
                if state.next_at.is_some_and(|t| now >= t) {
                    due.push(Due {
                        idx,
                        liveness,
                        action: self.probe_action(&c.spec, probe),
                        timeout: secs(probe.timeout_seconds, 1),
                    });
                }
            }
        }
        if due.is_empty() {
            return;
        }
        let results = futures::future::join_all(
            due.iter()
                .map(|d| run_probe(d.action.clone(), d.timeout, &self.shared)),
        )
        .await;
        let mut kill = vec![];
        for (d, result) in due.iter().zip(results) {
            let c = &mut self.ctrs[d.idx];
            let (probe, state) = if d.liveness {
                (c.spec.liveness_probe.clone(), &mut c.liveness)
            } else {
                (c.spec.readiness_probe.clone(), &mut c.readiness)
            };
            let probe = probe.unwrap_or_default();
            state.next_at = Some(Instant::now() + secs(probe.period_seconds, 10));
            match result {
                Ok(()) => {
                    state.failures = 0;
                    state.successes += 1;
                    if state.successes >= probe.success_threshold.unwrap_or(1).max(1) {
                        state.ok = true;
                    }
                }
                Err(why) => {
                    state.successes = 0;
                    state.failures += 1;
                    if state.failures >= probe.failure_threshold.unwrap_or(3).max(1) {
                        if state.ok || d.liveness {
                            tracing::info!(
                                pod = %pod_name(&self.pod),
                                container = %c.spec.name,
                                probe = if d.liveness { "liveness" } else { "readiness" },
                                %why,
                                "probe failed"
                            );
                        }
                        state.ok = false;
                        if d.liveness {
                            kill.push(d.idx);
                        }
                    }
                }
            }
        }
        for idx in kill {
            self.stop_container(idx).await;
        }
    }

    fn probe_action(&self, c: &Container, p: &Probe) -> ProbeAction {
        let port = |port: &IntOrString| -> Option<u16> {
            match port {
                IntOrString::Int(n) => u16::try_from(*n).ok(),
                IntOrString::String(name) => c
                    .ports
                    .iter()
                    .flatten()
                    .find(|p| p.name.as_deref() == Some(name.as_str()))
                    .and_then(|p| u16::try_from(p.container_port).ok()),
            }
        };
        if let Some(h) = &p.http_get {
            if h.scheme.as_deref().is_some_and(|s| s != "HTTP") {
                return ProbeAction::Unsupported("HTTPS httpGet probes".into());
            }
            return match port(&h.port) {
                Some(port) => ProbeAction::Http {
                    host: h.host.clone().unwrap_or_else(|| self.ip.clone()),
                    port,
                    path: h.path.clone().unwrap_or_else(|| "/".into()),
                    headers: h
                        .http_headers
                        .iter()
                        .flatten()
                        .map(|h| (h.name.clone(), h.value.clone()))
                        .collect(),
                },
                None => ProbeAction::Fail(format!("no port {:?} in the container", h.port)),
            };
        }
        if let Some(t) = &p.tcp_socket {
            return match port(&t.port) {
                Some(port) => ProbeAction::Tcp {
                    host: t.host.clone().unwrap_or_else(|| self.ip.clone()),
                    port,
                },
                None => ProbeAction::Fail(format!("no port {:?} in the container", t.port)),
            };
        }
        ProbeAction::Unsupported(if p.exec.is_some() {
            "exec probes".into()
        } else {
            "gRPC probes".into()
        })
    }

    /// Stops one container (a failed liveness probe): SIGTERM, the grace period, SIGKILL. Its
    /// exit is then handled as any other.
    async fn stop_container(&mut self, idx: usize) {
        let grace = self.grace();
        let c = &mut self.ctrs[idx];
        let CtrState::Running(r) = &mut c.state else {
            return;
        };
        tracing::info!(pod = %pod_name(&self.pod), container = %c.spec.name, "restarting the container: its liveness probe failed");
        stop_processes(&mut [r], grace).await;
    }

    fn grace(&self) -> Duration {
        let secs = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .or(self
                .pod
                .spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds))
            .unwrap_or(30)
            .max(0) as u64;
        Duration::from_secs(secs).min(self.shared.opts.max_grace)
    }

    // -- Status ---------------------------------------------------------------------------

    fn phase(&self) -> &'static str {
        if let Some(t) = self.terminal {
            return t;
        }
        if self.next_init < self.init.len()
            || self
                .ctrs
                .iter()
                .any(|c| matches!(c.state, CtrState::NotStarted))
        {
            return "Pending";
        }
        "Running"
    }

    fn condition(&mut self, kind: &'static str, value: bool) -> PodCondition {
        let entry = self
            .conditions
            .entry(kind)
            .or_insert_with(|| (value, now()));
        if entry.0 != value {
            *entry = (value, now());
        }
        PodCondition {
            type_: kind.into(),
            status: if value { "True" } else { "False" }.into(),
            last_transition_time: Some(entry.1.clone()),
            ..Default::default()
        }
    }

    fn container_status(&self, c: &Ctr) -> ContainerStatus {
        let waiting = |reason: &str, message: Option<String>| ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.into()),
                message,
            }),
            ..Default::default()
        };
        let terminated = |t: &Term| ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: t.code,
                reason: Some(t.reason.clone()),
                message: t.message.clone(),
                started_at: Some(t.started.clone()),
                finished_at: Some(t.finished.clone()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let running = |t: &Time| ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(t.clone()),
            }),
            ..Default::default()
        };
        let (state, started) = match &c.state {
            CtrState::NotStarted if self.waiting.is_some() => {
                (waiting("ContainerCreating", self.waiting.clone()), false)
            }
            CtrState::NotStarted => (waiting("PodInitializing", None), false),
            CtrState::Running(r) => (running(&r.started), true),
            CtrState::Phantom(t) => (running(t), true),
            CtrState::Exited(t) => (terminated(t), false),
            CtrState::Backoff { term, .. } => (
                waiting(
                    "CrashLoopBackOff",
                    Some(match &term.message {
                        Some(why) => format!("back-off restarting the container: {why}"),
                        None => format!(
                            "back-off restarting the container (last exit code {})",
                            term.code
                        ),
                    }),
                ),
                false,
            ),
        };
        let last_state = match (&c.state, &c.last_term) {
            (CtrState::Exited(_), _) | (_, None) => None,
            (_, Some(t)) => Some(terminated(t)),
        };
        ContainerStatus {
            name: c.spec.name.clone(),
            image: c.spec.image.clone().unwrap_or_default(),
            image_id: String::new(),
            container_id: (started || matches!(c.state, CtrState::Exited(_))).then(|| {
                format!(
                    "lakecache-agent://{}/{}/{}",
                    self.uid, c.spec.name, c.restarts
                )
            }),
            ready: c.ready(),
            started: Some(started),
            restart_count: c.restarts,
            state: Some(state),
            last_state,
            ..Default::default()
        }
    }

    /// Sends the pod's status when it changed (a merge patch carrying the pod's uid, so that
    /// it never lands on a new pod of the same name).
    async fn publish_status(&mut self) {
        let phase = self.phase();
        let initialized = self.next_init >= self.init.len();
        let containers_ready = self.terminal.is_none()
            && initialized
            && !self.ctrs.is_empty()
            && self.ctrs.iter().all(Ctr::ready);
        let conditions = vec![
            self.condition("PodScheduled", true),
            self.condition("Initialized", initialized),
            self.condition("ContainersReady", containers_ready),
            self.condition("Ready", containers_ready),
        ];
        let status = PodStatus {
            phase: Some(phase.into()),
            conditions: Some(conditions),
            host_ip: Some(HOST_IP.into()),
            host_ips: Some(vec![HostIP { ip: HOST_IP.into() }]),
            pod_ip: Some(self.ip.clone()),
            pod_ips: Some(vec![PodIP {
                ip: self.ip.clone(),
            }]),
            start_time: Some(self.start_time.clone()),
            init_container_statuses: (!self.init.is_empty())
                .then(|| self.init.iter().map(|c| self.container_status(c)).collect()),
            container_statuses: Some(self.ctrs.iter().map(|c| self.container_status(c)).collect()),
            ..Default::default()
        };
        let Ok(mut value) = serde_json::to_value(&status) else {
            return;
        };
        // A merge patch leaves out what is absent: say it.
        value["message"] = self.waiting.clone().map(Value::from).unwrap_or(Value::Null);
        if self.last_status.as_ref() == Some(&value) {
            return;
        }
        let api: Api<Pod> = Api::namespaced(self.shared.client.clone(), &self.namespace());
        let patch = json!({"metadata": {"uid": self.uid}, "status": value});
        match api
            .patch_status(&self.name(), &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => self.last_status = Some(value),
            Err(e) => {
                tracing::debug!(pod = %pod_name(&self.pod), error = %e, "status update failed; retrying")
            }
        }
    }

    // -- Teardown -------------------------------------------------------------------------

    /// The pod is deleted (or gone from the API): stop it, release its volumes and its
    /// directory, and confirm the deletion.
    async fn teardown(&mut self, confirm: bool) {
        let pod = pod_name(&self.pod);
        let grace = self.grace();
        tracing::info!(%pod, grace_s = grace.as_secs(), "stopping the pod");
        {
            let mut running: Vec<&mut Running> = self
                .init
                .iter_mut()
                .chain(self.ctrs.iter_mut())
                .filter_map(|c| match &mut c.state {
                    CtrState::Running(r) => Some(r),
                    _ => None,
                })
                .collect();
            stop_processes(&mut running, grace).await;
        }
        for c in self.init.iter_mut().chain(self.ctrs.iter_mut()) {
            if let CtrState::Running(r) = &mut c.state {
                let _ = r.child.wait().await;
                release_container(r.cgroup.clone(), r.upper.clone()).await;
            }
            c.state = CtrState::NotStarted;
        }
        {
            let mut state = self.shared.state.lock().unwrap();
            state.procs.retain(|_, p| p.pod_uid != self.uid);
        }
        self.release_csi().await;
        // Whatever is still mounted in the pod's directory (memory emptyDirs; CSI targets the
        // plugin could not unmount) goes before the directory does.
        if let Ok(table) = mountinfo::read_self() {
            for m in table
                .iter()
                .rev()
                .filter(|m| m.mount_point.starts_with(&self.dir))
            {
                let _ = nix::mount::umount2(&m.mount_point, MntFlags::MNT_DETACH);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(self.shared.opts.root.join("containers").join(&self.uid));
        {
            let mut state = self.shared.state.lock().unwrap();
            state.pods.remove(&self.uid);
            state.ips.retain(|_, uid| *uid != self.uid);
        }
        if confirm {
            let api: Api<Pod> = Api::namespaced(self.shared.client.clone(), &self.namespace());
            let params = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: Some(self.uid.clone()),
                    resource_version: None,
                }),
                ..Default::default()
            };
            match api.delete(&self.name(), &params).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
                Err(e) => tracing::warn!(%pod, error = %e, "the final delete failed"),
            }
        }
        tracing::info!(%pod, "pod removed from the node");
    }

    /// Unpublishes the pod's CSI volumes and unstages the PVs no other pod uses, retrying each
    /// call for a while as kubelet does.
    async fn release_csi(&mut self) {
        let publications = {
            let state = self.shared.state.lock().unwrap();
            state
                .pods
                .get(&self.uid)
                .map(|e| e.publications.clone())
                .unwrap_or_default()
        };
        let deadline = Instant::now() + TEARDOWN_LIMIT;
        for p in &publications {
            let stage = p.pv.as_ref().map(|pv| self.shared.stage(pv));
            // Not while the PV is being staged or unstaged for another pod.
            let guard = match &stage {
                Some(s) => Some(s.lock().await),
                None => None,
            };
            let req = csi::NodeUnpublishVolumeRequest {
                volume_id: p.volume_id.clone(),
                target_path: p.target.display().to_string(),
            };
            self.shared
                .csi_retry(
                    deadline,
                    "NodeUnpublishVolume",
                    &p.volume_id,
                    &p.target,
                    || {
                        let req = req.clone();
                        move |mut c: NodeClient<Channel>| async move {
                            c.node_unpublish_volume(req).await
                        }
                    },
                )
                .await;
            drop(guard);
        }
        // The PVs this pod registered for, even if its publish never succeeded: the last pod
        // of a PV on the node unstages it.
        for pv in std::mem::take(&mut self.pvs) {
            let stage = self.shared.stage(&pv);
            let mut g = stage.lock().await;
            g.users.remove(&self.uid);
            if !g.users.is_empty() || !g.staged {
                continue;
            }
            let req = csi::NodeUnstageVolumeRequest {
                volume_id: g.volume_id.clone(),
                staging_target_path: g.staging.display().to_string(),
            };
            let (volume_id, staging) = (g.volume_id.clone(), g.staging.clone());
            let unstaged = self
                .shared
                .csi_retry(deadline, "NodeUnstageVolume", &volume_id, &staging, || {
                    let req = req.clone();
                    move |mut c: NodeClient<Channel>| async move { c.node_unstage_volume(req).await }
                })
                .await;
            if unstaged {
                g.staged = false;
            }
        }
    }

    // -- Volumes --------------------------------------------------------------------------

    /// Sets up every volume not set up yet (retrying at most once a second), and refreshes the
    /// API-backed ones that are due.
    async fn ensure_volumes(&mut self) -> anyhow::Result<()> {
        let volumes = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .unwrap_or_default();
        let missing = volumes.iter().any(|v| !self.vols.contains_key(&v.name));
        if missing && Instant::now() < self.next_volume_try {
            bail!(
                "{}",
                self.waiting
                    .clone()
                    .unwrap_or_else(|| "waiting for volumes".into())
            );
        }
        for v in &volumes {
            let due = match self.vols.get(&v.name) {
                None => true,
                Some(vol) => vol.refresh_at.is_some_and(|t| Instant::now() >= t),
            };
            if !due {
                continue;
            }
            let fresh = self.vols.contains_key(&v.name);
            match self.setup_volume(v).await {
                Ok(()) => {}
                Err(e) if fresh => {
                    // A refresh that fails keeps what the pod has.
                    tracing::warn!(pod = %pod_name(&self.pod), volume = %v.name, error = format!("{e:#}"), "volume refresh failed");
                    if let Some(vol) = self.vols.get_mut(&v.name) {
                        vol.refresh_at = Some(Instant::now() + RETRY);
                    }
                }
                Err(e) => {
                    self.next_volume_try = Instant::now() + RETRY;
                    return Err(e.context(format!("waiting for volume {:?}", v.name)));
                }
            }
        }
        Ok(())
    }

    fn volume_dir(&self, kind: &str, name: &str) -> PathBuf {
        self.dir
            .join("volumes")
            .join(format!("kubernetes.io~{kind}"))
            .join(name)
    }

    async fn setup_volume(&mut self, v: &Volume) -> anyhow::Result<()> {
        let ns = self.namespace();
        let fs_group = self.fs_group();
        let mut new_tokens = vec![];
        let (path, files) = if let Some(src) = &v.config_map {
            let data = self
                .config_map_data(&ns, &src.name, src.optional.unwrap_or(false))
                .await?;
            let files = project(
                data.unwrap_or_default(),
                src.items.as_ref(),
                src.default_mode.unwrap_or(0o644),
                &format!("ConfigMap {ns}/{}", src.name),
                src.optional.unwrap_or(false),
            )?;
            (self.volume_dir("configmap", &v.name), Some(files))
        } else if let Some(src) = &v.secret {
            let name = src.secret_name.clone().unwrap_or_default();
            let data = self
                .secret_data(&ns, &name, src.optional.unwrap_or(false))
                .await?;
            let files = project(
                data.unwrap_or_default(),
                src.items.as_ref(),
                src.default_mode.unwrap_or(0o644),
                &format!("Secret {ns}/{name}"),
                src.optional.unwrap_or(false),
            )?;
            (self.volume_dir("secret", &v.name), Some(files))
        } else if let Some(src) = &v.downward_api {
            let mode = src.default_mode.unwrap_or(0o644);
            let files = self.downward_files(src.items.iter().flatten(), mode)?;
            (self.volume_dir("downward-api", &v.name), Some(files))
        } else if let Some(src) = &v.projected {
            let mode = src.default_mode.unwrap_or(0o644);
            let dir = self.volume_dir("projected", &v.name);
            let (files, tokens) = self.projected_files(&v.name, src, mode).await?;
            new_tokens = tokens;
            (dir, Some(files))
        } else if let Some(src) = &v.empty_dir {
            let dir = self.volume_dir("empty-dir", &v.name);
            if !dir.exists() {
                std::fs::create_dir_all(&dir)?;
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))?;
                if let Some(g) = fs_group {
                    std::os::unix::fs::chown(&dir, None, Some(g))?;
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o2777))?;
                }
            }
            if src.medium.as_deref() == Some("Memory") && !mountinfo::is_mount_point(&dir)? {
                let mut options = String::from("mode=1777");
                if let Some(size) = src.size_limit.as_ref().and_then(|q| quantity_bytes(&q.0)) {
                    options.push_str(&format!(",size={size}"));
                }
                nix::mount::mount(
                    Some("tmpfs"),
                    &dir,
                    Some("tmpfs"),
                    MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                    Some(options.as_str()),
                )
                .with_context(|| format!("mounting a tmpfs on {}", dir.display()))?;
                if let Some(g) = fs_group {
                    std::os::unix::fs::chown(&dir, None, Some(g))?;
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o2777))?;
                }
            }
            (dir, None)
        } else if let Some(src) = &v.host_path {
            (
                host_path(&src.path, src.type_.as_deref().unwrap_or(""))?,
                None,
            )
        } else if let Some(src) = &v.persistent_volume_claim {
            (
                self.setup_pvc(&src.claim_name, src.read_only.unwrap_or(false))
                    .await?,
                None,
            )
        } else if let Some(src) = &v.csi {
            (self.setup_inline_csi(&v.name, src).await?, None)
        } else {
            bail!(
                "volume {:?}: its kind is not supported by the node agent",
                v.name
            );
        };
        let refreshing = files.is_some();
        let vol = self.vols.entry(v.name.clone()).or_insert_with(|| Vol {
            path: path.clone(),
            files: BTreeSet::new(),
            refresh_at: None,
            tokens: HashMap::new(),
        });
        for (file, token, refresh) in new_tokens {
            vol.tokens.insert(file, (token, refresh));
        }
        if let Some(files) = files {
            write_volume(&path, &files, &mut vol.files, fs_group)?;
        }
        vol.refresh_at = refreshing.then(|| Instant::now() + REFRESH);
        Ok(())
    }

    fn downward_files<'a>(
        &self,
        items: impl Iterator<Item = &'a DownwardAPIVolumeFile>,
        mode: i32,
    ) -> anyhow::Result<Vec<(PathBuf, Vec<u8>, u32)>> {
        let mut files = vec![];
        for item in items {
            let Some(f) = &item.field_ref else {
                bail!(
                    "downwardAPI {}: only fieldRef is supported by the node agent",
                    item.path
                );
            };
            files.push((
                PathBuf::from(&item.path),
                self.field_value(&f.field_path)?.into_bytes(),
                item.mode.unwrap_or(mode) as u32,
            ));
        }
        Ok(files)
    }

    /// The files of a projected volume, and the tokens requested anew for it.
    async fn projected_files(
        &self,
        vol_name: &str,
        src: &k8s_openapi::api::core::v1::ProjectedVolumeSource,
        mode: i32,
    ) -> anyhow::Result<(Vec<(PathBuf, Vec<u8>, u32)>, Vec<NewToken>)> {
        let ns = self.namespace();
        let mut files = vec![];
        let mut tokens = vec![];
        for s in src.sources.iter().flatten() {
            if let Some(t) = &s.service_account_token {
                let path = PathBuf::from(&t.path);
                let cached = self
                    .vols
                    .get(vol_name)
                    .and_then(|v| v.tokens.get(&path))
                    .filter(|(_, refresh)| Instant::now() < *refresh)
                    .map(|(token, _)| token.clone());
                let token = match cached {
                    Some(token) => token,
                    None => {
                        let (token, refresh) = self
                            .request_token(t.audience.clone(), t.expiration_seconds)
                            .await?;
                        tokens.push((path.clone(), token.clone(), refresh));
                        token
                    }
                };
                files.push((path, token, mode as u32));
            }
            if let Some(c) = &s.config_map {
                let data = self
                    .config_map_data(&ns, &c.name, c.optional.unwrap_or(false))
                    .await?;
                files.extend(project(
                    data.unwrap_or_default(),
                    c.items.as_ref(),
                    mode,
                    &format!("ConfigMap {ns}/{}", c.name),
                    c.optional.unwrap_or(false),
                )?);
            }
            if let Some(c) = &s.secret {
                let data = self
                    .secret_data(&ns, &c.name, c.optional.unwrap_or(false))
                    .await?;
                files.extend(project(
                    data.unwrap_or_default(),
                    c.items.as_ref(),
                    mode,
                    &format!("Secret {ns}/{}", c.name),
                    c.optional.unwrap_or(false),
                )?);
            }
            if let Some(d) = &s.downward_api {
                files.extend(self.downward_files(d.items.iter().flatten(), mode)?);
            }
            if s.cluster_trust_bundle.is_some() || s.pod_certificate.is_some() {
                bail!(
                    "projected volume {vol_name:?}: clusterTrustBundle and podCertificate \
                     sources are not supported by the node agent"
                );
            }
        }
        Ok((files, tokens))
    }

    /// A token of the pod's ServiceAccount bound to the pod (TokenRequest), and when to ask
    /// for a new one (at 80 % of its life, as kubelet does).
    async fn request_token(
        &self,
        audience: Option<String>,
        expiration: Option<i64>,
    ) -> anyhow::Result<(Vec<u8>, Instant)> {
        let ns = self.namespace();
        let sa = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let api: Api<ServiceAccount> = Api::namespaced(self.shared.client.clone(), &ns);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: audience.into_iter().filter(|a| !a.is_empty()).collect(),
                expiration_seconds: Some(expiration.unwrap_or(3607)),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(self.name()),
                    uid: Some(self.uid.clone()),
                }),
            },
            ..Default::default()
        };
        let status = api
            .create_token_request(&sa, &PostParams::default(), &request)
            .await
            .with_context(|| format!("requesting a token for ServiceAccount {ns}/{sa}"))?
            .status
            .context("the TokenRequest has no status")?;
        let life = status
            .expiration_timestamp
            .0
            .duration_since(Timestamp::now())
            .try_into()
            .unwrap_or(Duration::from_secs(600));
        let life: Duration = life;
        Ok((
            status.token.into_bytes(),
            Instant::now() + life.mul_f64(0.8),
        ))
    }

    async fn config_map_data(
        &self,
        ns: &str,
        name: &str,
        optional: bool,
    ) -> anyhow::Result<Option<BTreeMap<String, Vec<u8>>>> {
        let api: Api<ConfigMap> = Api::namespaced(self.shared.client.clone(), ns);
        match api
            .get_opt(name)
            .await
            .with_context(|| format!("reading ConfigMap {ns}/{name}"))?
        {
            Some(cm) => {
                let mut data: BTreeMap<String, Vec<u8>> = cm
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect();
                data.extend(
                    cm.binary_data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.0)),
                );
                Ok(Some(data))
            }
            None if optional => Ok(None),
            None => bail!("ConfigMap {ns}/{name} does not exist"),
        }
    }

    async fn secret_data(
        &self,
        ns: &str,
        name: &str,
        optional: bool,
    ) -> anyhow::Result<Option<BTreeMap<String, Vec<u8>>>> {
        self.shared.secret_data(ns, name, optional).await
    }

    // -- CSI ------------------------------------------------------------------------------

    async fn csi_driver(&self, driver: &str) -> anyhow::Result<Option<CSIDriver>> {
        let api: Api<CSIDriver> = Api::all(self.shared.client.clone());
        api.get_opt(driver)
            .await
            .with_context(|| format!("reading CSIDriver {driver}"))
    }

    /// The keys kubelet adds to the volume context when the CSIDriver asks for
    /// `podInfoOnMount`.
    fn pod_info(&self, driver: Option<&CSIDriver>, ephemeral: bool) -> BTreeMap<String, String> {
        let wanted = driver
            .and_then(|d| d.spec.pod_info_on_mount)
            .unwrap_or(false);
        if !wanted {
            return BTreeMap::new();
        }
        let sa = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default();
        BTreeMap::from([
            ("csi.storage.k8s.io/pod.name".to_string(), self.name()),
            (
                "csi.storage.k8s.io/pod.namespace".to_string(),
                self.namespace(),
            ),
            ("csi.storage.k8s.io/pod.uid".to_string(), self.uid.clone()),
            ("csi.storage.k8s.io/serviceAccount.name".to_string(), sa),
            (
                "csi.storage.k8s.io/ephemeral".to_string(),
                ephemeral.to_string(),
            ),
        ])
    }

    async fn setup_pvc(&mut self, claim: &str, read_only: bool) -> anyhow::Result<PathBuf> {
        let ns = self.namespace();
        let client = self.shared.client.clone();
        let pvc = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns)
            .get_opt(claim)
            .await?
            .with_context(|| format!("PersistentVolumeClaim {ns}/{claim} does not exist"))?;
        let pv_name = pvc
            .spec
            .as_ref()
            .and_then(|s| s.volume_name.clone())
            .filter(|n| !n.is_empty())
            .filter(|_| pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound"))
            .with_context(|| format!("PersistentVolumeClaim {ns}/{claim} is not bound yet"))?;
        let pv = Api::<PersistentVolume>::all(client)
            .get_opt(&pv_name)
            .await?
            .with_context(|| format!("PersistentVolume {pv_name} does not exist"))?;
        let spec = pv.spec.clone().unwrap_or_default();
        let source = spec.csi.clone().with_context(|| {
            format!("PersistentVolume {pv_name} is not a CSI volume; the node agent supports only {CSI_DRIVER}")
        })?;
        ensure!(
            source.driver == CSI_DRIVER,
            "PersistentVolume {pv_name} is of CSI driver {}; the node agent supports only {CSI_DRIVER}",
            source.driver
        );
        self.ensure_socket()?;
        let driver = self.csi_driver(&source.driver).await?;
        let stage_secrets = self
            .shared
            .secret_ref(source.node_stage_secret_ref.as_ref())
            .await?;
        let publish_secrets = self
            .shared
            .secret_ref(source.node_publish_secret_ref.as_ref())
            .await?;
        let mode = match spec
            .access_modes
            .iter()
            .flatten()
            .next()
            .map(String::as_str)
        {
            Some("ReadWriteOnce") => csi::volume_capability::access_mode::Mode::SingleNodeWriter,
            Some("ReadWriteMany") => {
                csi::volume_capability::access_mode::Mode::MultiNodeMultiWriter
            }
            Some("ReadWriteOncePod") => {
                csi::volume_capability::access_mode::Mode::SingleNodeSingleWriter
            }
            _ => csi::volume_capability::access_mode::Mode::MultiNodeReaderOnly,
        };
        let capability = capability(
            mode,
            source.fs_type.clone().unwrap_or_default(),
            spec.mount_options.clone().unwrap_or_default(),
        );
        let mut context: BTreeMap<String, String> =
            source.volume_attributes.clone().unwrap_or_default();
        let staging = self
            .shared
            .kubelet
            .join("plugins/kubernetes.io/csi")
            .join(&source.driver)
            .join(hex_sha256(pv_name.as_bytes()))
            .join("globalmount");
        let stage = self.shared.stage(&pv_name);
        let mut g = stage.lock().await;
        g.users.insert(self.uid.clone());
        self.pvs.insert(pv_name.clone());
        if !g.staged {
            g.volume_id = source.volume_handle.clone();
            g.staging = staging.clone();
            if let Some(parent) = staging.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let req = csi::NodeStageVolumeRequest {
                volume_id: source.volume_handle.clone(),
                publish_context: Default::default(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(capability.clone()),
                secrets: stage_secrets.into_iter().collect(),
                volume_context: context.clone().into_iter().collect(),
            };
            self.shared
                .csi_call(
                    "NodeStageVolume",
                    &source.volume_handle,
                    &staging,
                    &context,
                    CSI_MOUNT_TIMEOUT,
                    move |mut c| async move { c.node_stage_volume(req).await },
                )
                .await
                .map_err(|s| csi_error("NodeStageVolume", &pv_name, s))?;
            g.staged = true;
        }
        context.extend(self.pod_info(driver.as_ref(), false));
        let target = self.volume_dir("csi", &pv_name).join("mount");
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let req = csi::NodePublishVolumeRequest {
            volume_id: source.volume_handle.clone(),
            publish_context: Default::default(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(capability),
            readonly: read_only,
            secrets: publish_secrets.into_iter().collect(),
            volume_context: context.clone().into_iter().collect(),
        };
        self.shared
            .csi_call(
                "NodePublishVolume",
                &source.volume_handle,
                &target,
                &context,
                CSI_MOUNT_TIMEOUT,
                move |mut c| async move { c.node_publish_volume(req).await },
            )
            .await
            .map_err(|s| csi_error("NodePublishVolume", &pv_name, s))?;
        drop(g);
        self.record_publication(Publication {
            volume_id: source.volume_handle.clone(),
            target: target.clone(),
            pv: Some(pv_name),
        });
        Ok(target)
    }

    async fn setup_inline_csi(
        &mut self,
        name: &str,
        source: &k8s_openapi::api::core::v1::CSIVolumeSource,
    ) -> anyhow::Result<PathBuf> {
        ensure!(
            source.driver == CSI_DRIVER,
            "volume {name:?} is of CSI driver {}; the node agent supports only {CSI_DRIVER}",
            source.driver
        );
        self.ensure_socket()?;
        let driver = self.csi_driver(&source.driver).await?;
        let ephemeral_ok = driver.as_ref().is_some_and(|d| {
            d.spec
                .volume_lifecycle_modes
                .iter()
                .flatten()
                .any(|m| m == "Ephemeral")
        });
        ensure!(
            ephemeral_ok,
            "CSIDriver {} does not exist or does not list volumeLifecycleModes Ephemeral; \
             kubelet refuses CSI inline volumes of it",
            source.driver
        );
        let secrets = match &source.node_publish_secret_ref {
            Some(r) => self
                .shared
                .secret_data(&self.namespace(), &r.name, false)
                .await?
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
                .collect(),
            None => BTreeMap::new(),
        };
        let volume_id = format!(
            "csi-{}",
            hex_sha256(format!("{}{name}", self.uid).as_bytes())
        );
        let target = self.volume_dir("csi", name).join("mount");
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut context = source.volume_attributes.clone().unwrap_or_default();
        context.extend(self.pod_info(driver.as_ref(), true));
        let req = csi::NodePublishVolumeRequest {
            volume_id: volume_id.clone(),
            publish_context: Default::default(),
            staging_target_path: String::new(),
            target_path: target.display().to_string(),
            volume_capability: Some(capability(
                csi::volume_capability::access_mode::Mode::SingleNodeWriter,
                source.fs_type.clone().unwrap_or_default(),
                vec![],
            )),
            readonly: source.read_only.unwrap_or(false),
            secrets: secrets.into_iter().collect(),
            volume_context: context.clone().into_iter().collect(),
        };
        self.shared
            .csi_call(
                "NodePublishVolume",
                &volume_id,
                &target,
                &context,
                CSI_MOUNT_TIMEOUT,
                move |mut c| async move { c.node_publish_volume(req).await },
            )
            .await
            .map_err(|s| csi_error("NodePublishVolume", name, s))?;
        self.record_publication(Publication {
            volume_id,
            target: target.clone(),
            pv: None,
        });
        Ok(target)
    }

    fn ensure_socket(&self) -> anyhow::Result<()> {
        ensure!(
            self.shared.csi_socket.exists(),
            "the CSI driver {CSI_DRIVER} is not running on this node yet (no socket {})",
            self.shared.csi_socket.display()
        );
        Ok(())
    }

    fn record_publication(&self, p: Publication) {
        let mut state = self.shared.state.lock().unwrap();
        if let Some(e) = state.pods.get_mut(&self.uid) {
            e.publications.retain(|o| o.target != p.target);
            e.publications.push(p);
        }
    }
}

fn capability(
    mode: csi::volume_capability::access_mode::Mode,
    fs_type: String,
    mount_flags: Vec<String>,
) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Mount(
            csi::volume_capability::MountVolume {
                fs_type,
                mount_flags,
                volume_mount_group: String::new(),
            },
        )),
        access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
    }
}

fn csi_error(rpc: &str, volume: &str, s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{rpc} for {volume} failed: {:?}: {}", s.code(), s.message())
}

/// A lazily connecting CSI channel over the driver's unix socket.
fn csi_channel(socket: &Path) -> Channel {
    let socket = socket.to_path_buf();
    Endpoint::from_static("http://csi.invalid")
        .connect_timeout(Duration::from_secs(3))
        .connect_with_connector_lazy(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                let s = tokio::net::UnixStream::connect(&socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
}

impl Shared {
    fn stage(&self, pv: &str) -> Arc<tokio::sync::Mutex<Stage>> {
        self.stages
            .lock()
            .unwrap()
            .entry(pv.to_string())
            .or_insert_with(|| {
                Arc::new(tokio::sync::Mutex::new(Stage {
                    volume_id: String::new(),
                    staging: PathBuf::new(),
                    staged: false,
                    users: HashSet::new(),
                }))
            })
            .clone()
    }

    /// One CSI call, recorded in [`NodeAgent::csi_calls`].
    async fn csi_call<T, F, Fut>(
        &self,
        method: &'static str,
        volume_id: &str,
        path: &Path,
        context: &BTreeMap<String, String>,
        limit: Duration,
        call: F,
    ) -> Result<T, tonic::Status>
    where
        F: FnOnce(NodeClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = NodeClient::new(csi_channel(&self.csi_socket));
        let result = match tokio::time::timeout(limit, call(client)).await {
            Ok(r) => r.map(tonic::Response::into_inner),
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "no answer within {limit:?}"
            ))),
        };
        let (code, message) = match &result {
            Ok(_) => (tonic::Code::Ok, String::new()),
            Err(s) => (s.code(), s.message().to_string()),
        };
        tracing::info!(method, volume = volume_id, path = %path.display(), ?code, %message, "CSI call");
        self.calls.lock().unwrap().push(CsiCall {
            method,
            volume_id: volume_id.to_string(),
            path: path.to_path_buf(),
            code: format!("{code:?}"),
            message,
            volume_context: context.clone(),
        });
        result
    }

    /// Repeats a teardown call until it succeeds or `deadline` passes; whether it succeeded.
    async fn csi_retry<T, M, F, Fut>(
        &self,
        deadline: Instant,
        method: &'static str,
        volume_id: &str,
        path: &Path,
        mut make: M,
    ) -> bool
    where
        M: FnMut() -> F,
        F: FnOnce(NodeClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        loop {
            let r = self
                .csi_call(
                    method,
                    volume_id,
                    path,
                    &BTreeMap::new(),
                    CSI_TIMEOUT,
                    make(),
                )
                .await;
            if r.is_ok() {
                return true;
            }
            if Instant::now() + RETRY > deadline {
                tracing::warn!(method, volume = volume_id, "giving up");
                return false;
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    async fn secret_data(
        &self,
        ns: &str,
        name: &str,
        optional: bool,
    ) -> anyhow::Result<Option<BTreeMap<String, Vec<u8>>>> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        match api
            .get_opt(name)
            .await
            .with_context(|| format!("reading Secret {ns}/{name}"))?
        {
            Some(s) => Ok(Some(
                s.data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect(),
            )),
            None if optional => Ok(None),
            None => bail!("Secret {ns}/{name} does not exist"),
        }
    }

    /// The data of the Secret a PV names (stage or publish secrets), as strings.
    async fn secret_ref(
        &self,
        r: Option<&SecretReference>,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        let Some(r) = r else {
            return Ok(BTreeMap::new());
        };
        let (ns, name) = (
            r.namespace.clone().unwrap_or_else(|| "default".into()),
            r.name.clone().unwrap_or_default(),
        );
        Ok(self
            .secret_data(&ns, &name, false)
            .await?
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
            .collect())
    }
}

// ---------------------------------------------------------------------------------------------
// Processes.

/// SIGTERM to every process of these containers, up to `grace` for them to exit, then SIGKILL;
/// waits for the main processes.
async fn stop_processes(running: &mut [&mut Running], grace: Duration) {
    for r in running.iter() {
        signal_container(r.pid, r.cgroup.as_deref(), Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    loop {
        let alive = running.iter_mut().any(|r| {
            let main = matches!(r.child.try_wait(), Ok(None));
            main || r.cgroup.as_deref().is_some_and(cgroup_populated)
        });
        if !alive {
            return;
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for r in running.iter() {
        signal_container(r.pid, r.cgroup.as_deref(), Signal::SIGKILL);
    }
    for r in running.iter_mut() {
        let _ = tokio::time::timeout(Duration::from_secs(5), r.child.wait()).await;
    }
}

/// Once a container's processes are gone: its cgroup and its overlay upper directory.
async fn release_container(cgroup: Option<PathBuf>, upper: PathBuf) {
    if let Some(cg) = cgroup {
        // Bounded: a process that will not die leaves the cgroup to the agent's drop.
        for _ in 0..100 {
            if std::fs::remove_dir(&cg).is_ok() || !cg.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let _ = std::fs::remove_dir_all(upper);
}

#[derive(Clone)]
enum ProbeAction {
    Http {
        host: String,
        port: u16,
        path: String,
        headers: Vec<(String, String)>,
    },
    Tcp {
        host: String,
        port: u16,
    },
    Fail(String),
    Unsupported(String),
}

async fn run_probe(action: ProbeAction, limit: Duration, shared: &Shared) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    match action {
        ProbeAction::Http {
            host,
            port,
            path,
            headers,
        } => {
            let attempt = async {
                let mut s = tokio::net::TcpStream::connect((host.as_str(), port))
                    .await
                    .map_err(|e| format!("GET http://{host}:{port}{path}: {e}"))?;
                let mut request = format!(
                    "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.34\r\nAccept: */*\r\nConnection: close\r\n"
                );
                for (k, v) in headers {
                    request.push_str(&format!("{k}: {v}\r\n"));
                }
                request.push_str("\r\n");
                s.write_all(request.as_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
                let mut head = Vec::new();
                let mut buf = [0u8; 512];
                while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 4096 {
                    let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
                    if n == 0 {
                        break;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                let line = String::from_utf8_lossy(&head);
                let code: u16 = line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| format!("not an HTTP response: {:.60}", line))?;
                if (200..400).contains(&code) {
                    Ok(())
                } else {
                    Err(format!("GET http://{host}:{port}{path} answered {code}"))
                }
            };
            tokio::time::timeout(limit, attempt)
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {limit:?}")))
        }
        ProbeAction::Tcp { host, port } => {
            match tokio::time::timeout(limit, tokio::net::TcpStream::connect((host.as_str(), port)))
                .await
            {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("connect {host}:{port}: {e}")),
                Err(_) => Err(format!("connect {host}:{port}: no answer within {limit:?}")),
            }
        }
        ProbeAction::Fail(why) => Err(why),
        ProbeAction::Unsupported(what) => {
            if shared.warned.lock().unwrap().insert(what.clone()) {
                tracing::warn!("the node agent does not run {what}; they always pass");
            }
            Ok(())
        }
    }
}

fn secs(v: Option<i32>, default: i32) -> Duration {
    Duration::from_secs(v.unwrap_or(default).max(0) as u64)
}

fn pod_name(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or(""),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

// ---------------------------------------------------------------------------------------------
// Volume files.

/// The files of a ConfigMap or Secret volume (or projection): every key, or the `items`.
fn project(
    data: BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
    default_mode: i32,
    what: &str,
    optional: bool,
) -> anyhow::Result<Vec<(PathBuf, Vec<u8>, u32)>> {
    match items {
        None => Ok(data
            .into_iter()
            .map(|(k, v)| (PathBuf::from(k), v, default_mode as u32))
            .collect()),
        Some(items) => {
            let mut files = vec![];
            for item in items {
                match data.get(&item.key) {
                    Some(v) => files.push((
                        PathBuf::from(&item.path),
                        v.clone(),
                        item.mode.unwrap_or(default_mode) as u32,
                    )),
                    None if optional => {}
                    None => bail!("{what} has no key {:?}", item.key),
                }
            }
            Ok(files)
        }
    }
}

/// Writes a volume's files (each atomically, by rename), removes the ones it no longer has,
/// and with an `fsGroup` gives the group read access, as kubelet does for these read-only
/// volumes.
fn write_volume(
    dir: &Path,
    files: &[(PathBuf, Vec<u8>, u32)],
    written: &mut BTreeSet<PathBuf>,
    fs_group: Option<u32>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    if let Some(g) = fs_group {
        std::os::unix::fs::chown(dir, None, Some(g))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o2755))?;
    }
    let mut now_written = BTreeSet::new();
    for (rel, data, mode) in files {
        ensure!(
            rel.components().all(|c| matches!(c, Component::Normal(_))),
            "volume file path {} must be relative, without '..'",
            rel.display()
        );
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mode = if fs_group.is_some() {
            mode | 0o440
        } else {
            *mode
        };
        let same = std::fs::read(&path).is_ok_and(|old| old == *data)
            && std::fs::metadata(&path).is_ok_and(|m| m.permissions().mode() & 0o7777 == mode);
        if !same {
            write_file(&path, data, mode)?;
            if let Some(g) = fs_group {
                std::os::unix::fs::chown(&path, None, Some(g))?;
            }
        }
        now_written.insert(rel.clone());
    }
    for stale in written.difference(&now_written) {
        let _ = std::fs::remove_file(dir.join(stale));
    }
    *written = now_written;
    Ok(())
}

/// Writes `data` to `path` with `mode`, atomically (a temporary file renamed over it).
fn write_file(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .context("a file path has a name")?
        .to_string_lossy();
    let tmp = path.with_file_name(format!("..{name}.tmp"));
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

fn append(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?
        .write_all(text.as_bytes())
}

/// A `hostPath` volume, checked (or created) by its type.
fn host_path(path: &str, kind: &str) -> anyhow::Result<PathBuf> {
    let p = PathBuf::from(path);
    let meta = std::fs::metadata(&p);
    let ok = match kind {
        "" => true,
        "DirectoryOrCreate" => {
            if meta.is_err() {
                std::fs::create_dir_all(&p)?;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
            }
            p.is_dir()
        }
        "Directory" => meta.is_ok_and(|m| m.is_dir()),
        "FileOrCreate" => {
            if meta.is_err() {
                if let Some(parent) = p.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&p)?;
            }
            p.is_file()
        }
        "File" => meta.is_ok_and(|m| m.is_file()),
        "Socket" => meta.is_ok_and(|m| m.file_type().is_socket()),
        "CharDevice" => meta.is_ok_and(|m| m.file_type().is_char_device()),
        "BlockDevice" => meta.is_ok_and(|m| m.file_type().is_block_device()),
        other => bail!("hostPath {path}: unknown type {other:?}"),
    };
    ensure!(ok, "hostPath {path} is not a {kind}");
    Ok(p)
}

/// Bytes of a Kubernetes quantity (`1Gi`, `500M`, `1073741824`); `None` when it is not one.
fn quantity_bytes(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let n: f64 = number.parse().ok()?;
    let factor: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some((n * factor).ceil() as u64)
}

/// Kubernetes' `$(VAR)` expansion (`third_party/forked/golang/expansion`): `$(NAME)` becomes the
/// variable's value, or stays as it is when the variable is not defined; `$$` becomes `$`;
/// anything else is kept.
pub fn expand(input: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
    let bytes = input.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(bytes.len());
    let mut checkpoint = 0;
    let mut cursor = 0;
    while cursor < bytes.len() {
        if bytes[cursor] == b'$' && cursor + 1 < bytes.len() {
            out.extend_from_slice(&bytes[checkpoint..cursor]);
            let rest = &bytes[cursor + 1..];
            let advance = match rest[0] {
                b'$' => {
                    out.push(b'$');
                    1
                }
                b'(' => match rest.iter().position(|&b| b == b')') {
                    Some(close) => {
                        let name = String::from_utf8_lossy(&rest[1..close]);
                        match lookup(&name) {
                            Some(v) => out.extend_from_slice(v.as_bytes()),
                            None => out.extend_from_slice(format!("$({name})").as_bytes()),
                        }
                        close + 1
                    }
                    None => {
                        out.extend_from_slice(b"$(");
                        1
                    }
                },
                other => {
                    out.push(b'$');
                    out.push(other);
                    1
                }
            };
            cursor += advance;
            checkpoint = cursor + 1;
        }
        cursor += 1;
    }
    out.extend_from_slice(&bytes[checkpoint.min(bytes.len())..]);
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Shared with the helper.

/// What the agent hands `lakecache-pod-exec`: one container.
pub mod spec {
    use std::path::PathBuf;

    use serde::{Deserialize, Serialize};

    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct ExecSpec {
        /// The (empty) directory the overlay root is mounted on.
        pub rootfs: PathBuf,
        /// The overlay's upper and work directories (one filesystem, not the root's).
        pub upper_dir: PathBuf,
        pub work_dir: PathBuf,
        /// The cgroup v2 directory to join first.
        pub cgroup: Option<PathBuf>,
        /// The hostname in a new UTS namespace (none: the host's).
        pub hostname: Option<String>,
        pub mounts: Vec<MountSpec>,
        pub read_only_root: bool,
        pub working_dir: Option<String>,
        pub user: Option<UserSpec>,
        /// The program and its arguments, expanded.
        pub argv: Vec<String>,
        /// The whole environment.
        pub env: Vec<(String, String)>,
    }

    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct MountSpec {
        /// A host path: a directory, a file or a device.
        pub source: PathBuf,
        /// The container path.
        pub target: String,
        pub read_only: bool,
        pub propagation: Propagation,
    }

    /// Kubernetes' `mountPropagation`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
    pub enum Propagation {
        None,
        HostToContainer,
        Bidirectional,
    }

    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct UserSpec {
        pub uid: u32,
        pub gid: u32,
        /// Supplementary groups (`fsGroup`, `supplementalGroups`).
        pub groups: Vec<u32>,
    }
}

/// `/proc/self/mountinfo`, parsed.
pub mod mountinfo {
    use std::path::{Path, PathBuf};

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct MountInfo {
        pub id: u32,
        pub parent: u32,
        /// The mount's root within its filesystem.
        pub root: PathBuf,
        pub mount_point: PathBuf,
        /// Per-mount options (`rw,nosuid,...`).
        pub options: String,
        /// Optional fields: `shared:N`, `master:N`, ...
        pub optional: Vec<String>,
        pub fs_type: String,
        pub source: String,
    }

    impl MountInfo {
        pub fn is_shared(&self) -> bool {
            self.optional.iter().any(|o| o.starts_with("shared:"))
        }
    }

    /// Octal escapes (`\040` for a space) undone.
    fn unescape(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'\\'
                && i + 3 < b.len()
                && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
            {
                out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
                i += 4;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    pub fn parse(text: &str) -> Vec<MountInfo> {
        text.lines()
            .filter_map(|line| {
                let (left, right) = line.split_once(" - ")?;
                let f: Vec<&str> = left.split(' ').collect();
                let r: Vec<&str> = right.split(' ').collect();
                if f.len() < 6 || r.len() < 2 {
                    return None;
                }
                Some(MountInfo {
                    id: f[0].parse().ok()?,
                    parent: f[1].parse().ok()?,
                    root: PathBuf::from(unescape(f[3])),
                    mount_point: PathBuf::from(unescape(f[4])),
                    options: f[5].to_string(),
                    optional: f[6..].iter().map(|s| s.to_string()).collect(),
                    fs_type: r[0].to_string(),
                    source: unescape(r[1]),
                })
            })
            .collect()
    }

    pub fn read_self() -> std::io::Result<Vec<MountInfo>> {
        Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
    }

    /// The mount `path` is on: the last (topmost) mount whose mount point is the longest
    /// prefix of `path`.
    pub fn containing<'a>(table: &'a [MountInfo], path: &Path) -> Option<&'a MountInfo> {
        let mut best: Option<&MountInfo> = None;
        for m in table {
            if path.starts_with(&m.mount_point)
                && best.is_none_or(|b| {
                    m.mount_point.components().count() >= b.mount_point.components().count()
                })
            {
                best = Some(m);
            }
        }
        best
    }

    pub fn is_mount_point(path: &Path) -> std::io::Result<bool> {
        Ok(read_self()?.iter().any(|m| m.mount_point == path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn expands_like_kubernetes() {
        let e = env(&[("POD_IP", "127.0.9.2"), ("NAME", "w-0")]);
        assert_eq!(expand("$(POD_IP):7700", &e), "127.0.9.2:7700");
        assert_eq!(expand("$(NAME)-$(NAME)", &e), "w-0-w-0");
        assert_eq!(expand("$(MISSING)/x", &e), "$(MISSING)/x");
        assert_eq!(expand("$$(POD_IP)", &e), "$(POD_IP)");
        assert_eq!(expand("a$b$", &e), "a$b$");
        assert_eq!(expand("$(POD_IP", &e), "$(POD_IP");
        assert_eq!(expand("naïve $(NAME) ü", &e), "naïve w-0 ü");
        assert_eq!(expand("", &e), "");
    }

    #[test]
    fn parses_mountinfo() {
        let text = "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
                    64 27 254:0 /tmp/a\\040b /tmp/a\\040b rw,nosuid shared:7 master:2 - ext4 /dev/vda rw\n";
        let t = mountinfo::parse(text);
        assert_eq!(t.len(), 2);
        assert_eq!(t[1].mount_point, Path::new("/tmp/a b"));
        assert!(t[1].is_shared() && !t[0].is_shared());
        assert_eq!(t[1].options, "rw,nosuid");
        assert_eq!(
            mountinfo::containing(&t, Path::new("/tmp/a b/c")).map(|m| m.id),
            Some(64)
        );
        assert_eq!(
            mountinfo::containing(&t, Path::new("/tmp/a")).map(|m| m.id),
            Some(27)
        );
    }

    #[test]
    fn reads_quantities() {
        assert_eq!(quantity_bytes("1Gi"), Some(1 << 30));
        assert_eq!(quantity_bytes("500M"), Some(500_000_000));
        assert_eq!(quantity_bytes("1073741824"), Some(1 << 30));
        assert_eq!(quantity_bytes("lots"), None);
    }

    #[test]
    fn projects_keys_and_items() {
        let data = BTreeMap::from([
            ("a".to_string(), b"1".to_vec()),
            ("b".to_string(), b"2".to_vec()),
        ]);
        let all = project(data.clone(), None, 0o644, "x", false).unwrap();
        assert_eq!(all.len(), 2);
        let items = vec![KeyToPath {
            key: "b".into(),
            path: "sub/b.txt".into(),
            mode: Some(0o400),
        }];
        let some = project(data.clone(), Some(&items), 0o644, "x", false).unwrap();
        assert_eq!(
            some,
            vec![(PathBuf::from("sub/b.txt"), b"2".to_vec(), 0o400)]
        );
        let missing = vec![KeyToPath {
            key: "c".into(),
            path: "c".into(),
            mode: None,
        }];
        assert!(project(data.clone(), Some(&missing), 0o644, "x", false).is_err());
        assert!(
            project(data, Some(&missing), 0o644, "x", true)
                .unwrap()
                .is_empty()
        );
    }
}
