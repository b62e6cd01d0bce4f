//! A real Kubernetes node for the test cluster: upstream kubelet (built from `tools/kube`),
//! Debian's containerd and runc, the bridge CNI plugin, and kube-proxy, running our own image.
//!
//! # Why a real node, and how it fits on one test machine
//!
//! A stand-in kubelet written by the same hands as the plugin shares their assumptions: where
//! kubelet stages and publishes volumes, how plugin registration works, how mount propagation
//! behaves between real containers, what the image's user can do. So the cluster tests run
//! pods the way users do: kubelet asks containerd, containerd asks runc, and the containers run
//! the image `scripts/image` builds from Debian packages and our binaries.
//!
//! kubelet refuses a loopback node address, and pods need addresses of their own, so the node
//! lives in a network namespace of its own (`lcnode-<pid>`):
//!
//! ```text
//!  host: 198.19.254.1/30 (the API server binds here) ──veth── node netns: 198.19.254.2/30
//!                                                              │ kubelet, containerd, kube-proxy
//!                                                              └── bridge lcbr0 198.19.0.1/24
//!                                                                   └── pods 198.19.0.x
//! ```
//!
//! The host routes the pod range to the node, so tests reach pod IPs directly, and pods reach
//! the API server and test servers bound to the host address. kube-proxy (iptables mode, in the
//! node's namespace) gives pods the `kubernetes` Service. kubelet and containerd run in the
//! host's mount namespace (`nsenter --net`, not `ip netns exec`, which would also give them a
//! private one), so the mounts kubelet and the CSI plugin make are visible to the test.
//!
//! Only the network is in a namespace. What kubelet and containerd touch outside their
//! directories is listed in [`HOST_PATHS`] and the sysctls in [`SYSCTLS`]; the node records
//! them before it starts and puts them back when it is dropped (also when a test panics), with
//! every process, mount, cgroup (under a cgroup root of its own), network namespace and CNI
//! file it made. A machine-wide lock lets one node run at a time (their addresses are fixed),
//! and a node left by a killed test process is cleaned up by the next one.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Node as NodeObject;
use kube::api::Api;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;

use crate::cluster::Component;
use crate::mountinfo;

/// The host's end of the link to the node: the API server and test servers bind here.
pub const HOST_IP: &str = "198.19.254.1";
/// The node's address (its `InternalIP`).
pub const NODE_IP: &str = "198.19.254.2";
/// The pods' range, on the node's bridge.
pub const POD_CIDR: &str = "198.19.0.0/24";
const POD_GATEWAY: &str = "198.19.0.1";
const LINK_PREFIX: u8 = 30;
const BRIDGE: &str = "lcbr0";

/// The name the chart's image has (`image.repository` and the chart's appVersion).
pub const IMAGE_REPOSITORY: &str = "ghcr.io/lakecache/lakecache";
/// containerd's `sandbox_image`: the pause image is imported under exactly this name.
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.10";

/// Paths outside the node's directory that kubelet, containerd or the CNI plugins create
/// (kubelet's device-plugin and pod-resources sockets are not under `--root-dir`; libcni keeps
/// results in /var/lib/cni; containerd's shims put their sockets under /run/containerd). Each
/// one that did not exist before the node started is removed when it stops.
pub const HOST_PATHS: &[&str] = &[
    "/var/lib/kubelet",
    "/var/lib/cni",
    "/var/log/pods",
    "/var/log/containers",
    "/run/containerd",
    "/etc/cni",
    "/opt/cni",
    "/usr/libexec/kubernetes",
    "/var/run/kubernetes",
];

/// Sysctls kubelet sets (it checks and "fixes" kernel defaults) and kube-proxy may set; they
/// are restored when the node stops.
pub const SYSCTLS: &[&str] = &[
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/netfilter/nf_conntrack_max",
    "net/bridge/bridge-nf-call-iptables",
];

const LOCK: &str = "/run/lock/lakecache-node.lock";
/// How long a test waits for another test's node to stop (each test bounds its own run).
const LOCK_WAIT: Duration = Duration::from_secs(20 * 60);
const START: Duration = Duration::from_secs(120);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// The images a node is given before kubelet starts: OCI archives and the name each gets.
#[derive(Debug, Clone)]
pub struct NodeImage {
    pub archive: PathBuf,
    /// `ctr images import --base-name`: the repository, the tag comes from the archive.
    pub base_name: String,
}

/// The node's network namespace and link, and the lock that makes it the machine's only node.
/// Made before the control plane, whose API server binds to [`HOST_IP`].
pub struct NodeNetwork {
    netns: String,
    host_if: String,
    _lock: nix::fcntl::Flock<File>,
}

impl NodeNetwork {
    /// Takes the machine-wide node lock (waiting for another test's node to go), removes what
    /// a killed test process left, and makes the namespace, link, bridge-less routing and the
    /// host route to the pod range.
    pub fn create() -> anyhow::Result<NodeNetwork> {
        std::fs::create_dir_all("/run/lock").ok();
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK)
            .with_context(|| format!("opening {LOCK} (the node needs root)"))?;
        let waited = Instant::now();
        let mut file = lock;
        let lock = loop {
            match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(lock) => break lock,
                Err((f, nix::errno::Errno::EWOULDBLOCK)) if waited.elapsed() < LOCK_WAIT => {
                    file = f;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err((_, e)) => {
                    bail!("locking {LOCK} (another test's node) within {LOCK_WAIT:?}: {e}")
                }
            }
        };
        if waited.elapsed() > Duration::from_secs(1) {
            eprintln!(
                "waited {:.1?} for another test's node to stop",
                waited.elapsed()
            );
        }
        remove_stale_nodes();

        let pid = std::process::id();
        let netns = format!("lcnode-{pid}");
        let host_if = format!("lch{}", pid % 1_000_000);
        let node_if = format!("lcn{}", pid % 1_000_000);
        let net = NodeNetwork {
            netns: netns.clone(),
            host_if: host_if.clone(),
            _lock: lock,
        };
        ip(&["netns", "add", &netns])?;
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &node_if,
        ])?;
        ip(&["link", "set", &node_if, "netns", &netns])?;
        ip(&[
            "addr",
            "add",
            &format!("{HOST_IP}/{LINK_PREFIX}"),
            "dev",
            &host_if,
        ])?;
        ip(&["link", "set", &host_if, "up"])?;
        let inside = |args: &[&str]| {
            let mut all = vec!["-n", netns.as_str()];
            all.extend_from_slice(args);
            ip(&all)
        };
        inside(&["link", "set", "lo", "up"])?;
        inside(&[
            "addr",
            "add",
            &format!("{NODE_IP}/{LINK_PREFIX}"),
            "dev",
            &node_if,
        ])?;
        inside(&["link", "set", &node_if, "up"])?;
        inside(&["route", "add", "default", "via", HOST_IP])?;
        ip(&["route", "add", POD_CIDR, "via", NODE_IP, "dev", &host_if])?;
        // The node routes between its link and the pods' bridge.
        run_ok(
            Command::new("ip").args([
                "netns",
                "exec",
                &netns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ]),
            "enabling forwarding in the node's namespace",
        )?;
        Ok(net)
    }

    /// `/run/netns/<name>`, for `nsenter --net=`.
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }

    pub fn netns(&self) -> &str {
        &self.netns
    }
}

impl Drop for NodeNetwork {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair, the route through it and every
        // iptables chain kubelet and kube-proxy made in it.
        quiet("ip", &["netns", "del", &self.netns]);
        quiet("ip", &["link", "del", &self.host_if]);
    }
}

/// Where the control plane is, and who the node's components are to it.
pub struct NodeControlPlane<'a> {
    pub server: &'a str,
    pub ca: &'a Path,
    pub kubelet_token: &'a str,
    pub kube_proxy_token: &'a str,
    pub client: kube::Client,
}

/// A running node; dropping it stops every container and undoes what it changed on the host.
pub struct Node {
    name: String,
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    netns_path: PathBuf,
    processes: Vec<Component>,
    cgroup_root: String,
    sysctls: Vec<(String, String)>,
    absent_paths: Vec<PathBuf>,
    netns_before: BTreeSet<String>,
    started_in: Duration,
}

impl Node {
    /// The node's name (also its hostname label).
    pub const NAME: &'static str = "lakecache-node";

    /// Starts containerd, imports `images`, starts kubelet and kube-proxy, and returns once the
    /// Node object is Ready.
    pub async fn start(
        network: &NodeNetwork,
        control_plane: NodeControlPlane<'_>,
        images: &[NodeImage],
    ) -> anyhow::Result<Node> {
        let started = Instant::now();
        let containerd = which("containerd")?;
        let kubelet = crate::cluster::binary(crate::cluster::KUBELET_ENV);
        let kube_proxy = crate::cluster::binary(crate::cluster::KUBE_PROXY_ENV);
        // Short: unix socket paths under it must stay within 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("lcn-")
            .tempdir_in("/tmp")
            .context("creating the node's directory")?;
        let path = dir.path().to_path_buf();
        let name = Self::NAME.to_string();
        let cgroup_root = format!("lakecache-node-{}", std::process::id());

        let sysctls = SYSCTLS
            .iter()
            .filter_map(|s| {
                let v = std::fs::read_to_string(Path::new("/proc/sys").join(s)).ok()?;
                Some((s.to_string(), v.trim().to_string()))
            })
            .collect();
        let absent_paths = HOST_PATHS
            .iter()
            .map(PathBuf::from)
            .filter(|p| !p.exists())
            .collect();
        let mut node = Node {
            name: name.clone(),
            dir: Some(dir),
            path: path.clone(),
            netns_path: network.netns_path(),
            processes: Vec::new(),
            cgroup_root: cgroup_root.clone(),
            sysctls,
            absent_paths,
            netns_before: list_netns(),
            started_in: Duration::ZERO,
        };
        for sub in [
            "containerd/root",
            "containerd/state",
            "containerd/opt",
            "runc",
            "cni/net.d",
            "cni/ipam",
            "kubelet",
            "pod-logs",
            "volume-plugins",
        ] {
            std::fs::create_dir_all(path.join(sub))?;
        }
        make_cgroup_root(&cgroup_root)?;

        // containerd, with its CRI plugin: runc without systemd, the overlayfs snapshotter, the
        // bridge CNI, our pause image. restrict_oom_score_adj: this machine lacks
        // CAP_SYS_RESOURCE, and runc fails every sandbox that would lower its score.
        let sock = path.join("containerd/containerd.sock");
        let cni_conf = path.join("cni/net.d");
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{runc}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni_conf}"
"#,
            root = path.join("containerd/root").display(),
            state = path.join("containerd/state").display(),
            sock = sock.display(),
            opt = path.join("containerd/opt").display(),
            pause = PAUSE_IMAGE,
            runc = path.join("runc").display(),
            cni_conf = cni_conf.display(),
        );
        let config_path = write(&path, "containerd.toml", &config)?;
        let cni = json!({
            "cniVersion": "0.4.0",
            "name": "lakecache",
            "plugins": [{
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": POD_CIDR, "gateway": POD_GATEWAY }]],
                    "routes": [{ "dst": "0.0.0.0/0" }],
                    "dataDir": path.join("cni/ipam"),
                },
            }, {
                "type": "portmap",
                "capabilities": { "portMappings": true },
            }],
        });
        write(&cni_conf, "10-lakecache.conflist", &cni.to_string())?;
        node.spawn_in_netns(
            "containerd",
            &containerd,
            &[
                "--config".into(),
                config_path.display().to_string(),
                "--log-level=warn".into(),
            ],
        )?;
        let ctr_sock = sock.clone();
        node.wait_until("containerd", Duration::from_secs(30), || {
            let out = ctr_output(&ctr_sock, &["version"]);
            async move {
                match out {
                    Ok(o) if o.status.success() => Ok(()),
                    Ok(o) => Err(String::from_utf8_lossy(&o.stderr).into_owned()),
                    Err(e) => Err(e.to_string()),
                }
            }
        })
        .await?;
        for image in images {
            let t = Instant::now();
            let out = ctr_output(
                &sock,
                &[
                    "-n",
                    "k8s.io",
                    "images",
                    "import",
                    "--base-name",
                    &image.base_name,
                    &image.archive.display().to_string(),
                ],
            )?;
            if !out.status.success() {
                bail!(
                    "importing {} into containerd: {}",
                    image.archive.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            tracing::info!(image = %image.base_name, took = ?t.elapsed(), "image imported");
        }

        // kubelet. Authentication of the API server's calls (logs, exec) by its client
        // certificate from the cluster CA; every authenticated caller is allowed, since the
        // only one with such a certificate is the API server. Image GC is off (nothing could
        // be pulled again) and eviction thresholds are at zero (a test machine's disk must not
        // evict the pods under test).
        let kubeconfig = write(
            &path,
            "kubelet.kubeconfig",
            &crate::cluster::kubeconfig_json(
                control_plane.server,
                control_plane.ca,
                &format!("system:node:{name}"),
                control_plane.kubelet_token,
                None,
            ),
        )?;
        let kubelet_config = json!({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "containerRuntimeEndpoint": format!("unix://{}", sock.display()),
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": format!("/{cgroup_root}"),
            "failSwapOn": false,
            "failCgroupV1": false,
            "address": NODE_IP,
            "port": 10250,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": 10248,
            "authentication": {
                "anonymous": { "enabled": false },
                "webhook": { "enabled": false },
                "x509": { "clientCAFile": control_plane.ca },
            },
            "authorization": { "mode": "AlwaysAllow" },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "imageMinimumGCAge": "24h",
            "evictionHard": {
                "memory.available": "0%",
                "nodefs.available": "0%",
                "nodefs.inodesFree": "0%",
                "imagefs.available": "0%",
            },
            "podLogsDir": path.join("pod-logs"),
            "volumePluginDir": path.join("volume-plugins"),
            "resolvConf": "",
            "rotateCertificates": false,
            "serverTLSBootstrap": false,
            "registerNode": true,
            "maxPods": 110,
            "nodeStatusUpdateFrequency": "4s",
            "syncFrequency": "10s",
            "fileCheckFrequency": "20s",
            "shutdownGracePeriod": "0s",
            "containerLogMaxFiles": 2,
        });
        let kubelet_config_path = write(
            &path,
            "kubelet-config.json",
            &serde_json::to_string_pretty(&kubelet_config)?,
        )?;
        node.spawn_in_netns(
            "kubelet",
            &kubelet,
            &[
                format!("--config={}", kubelet_config_path.display()),
                format!("--kubeconfig={}", kubeconfig.display()),
                format!("--root-dir={}", path.join("kubelet").display()),
                format!("--cert-dir={}", path.join("kubelet/pki").display()),
                format!("--hostname-override={name}"),
                format!("--node-ip={NODE_IP}"),
                "--v=2".into(),
            ],
        )?;
        let nodes: Api<NodeObject> = Api::all(control_plane.client.clone());
        let node_name = name.clone();
        node.wait_until("kubelet", START, || {
            let nodes = nodes.clone();
            let node_name = node_name.clone();
            async move {
                let n = nodes
                    .get_opt(&node_name)
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or("the Node is not registered yet")?;
                let ready = n
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .into_iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                let tainted = n
                    .spec
                    .and_then(|s| s.taints)
                    .unwrap_or_default()
                    .iter()
                    .any(|t| t.key == "node.kubernetes.io/not-ready");
                match (ready, tainted) {
                    (true, false) => Ok(()),
                    (false, _) => Err("the Node is not Ready yet".into()),
                    (true, true) => Err("the Node still has the not-ready taint".into()),
                }
            }
        })
        .await?;

        let proxy_kubeconfig = write(
            &path,
            "kube-proxy.kubeconfig",
            &crate::cluster::kubeconfig_json(
                control_plane.server,
                control_plane.ca,
                "system:kube-proxy",
                control_plane.kube_proxy_token,
                None,
            ),
        )?;
        node.spawn_in_netns(
            "kube-proxy",
            &kube_proxy,
            &[
                format!("--kubeconfig={}", proxy_kubeconfig.display()),
                format!("--hostname-override={name}"),
                format!("--cluster-cidr={POD_CIDR}"),
                "--proxy-mode=iptables".into(),
                // No conntrack sysctls: the table is the host's, not the namespace's.
                "--conntrack-max-per-core=0".into(),
                "--metrics-bind-address=127.0.0.1:10249".into(),
                "--healthz-bind-address=127.0.0.1:10256".into(),
                "--v=1".into(),
            ],
        )?;
        let netns_path = node.netns_path.clone();
        node.wait_until("kube-proxy", Duration::from_secs(60), || {
            let out = Command::new("nsenter")
                .arg(format!("--net={}", netns_path.display()))
                .args(["iptables-save", "-t", "nat"])
                .output();
            async move {
                let out = out.map_err(|e| e.to_string())?;
                let text = String::from_utf8_lossy(&out.stdout);
                if text.contains("default/kubernetes:https") {
                    Ok(())
                } else {
                    Err("the kubernetes Service has no rules yet".into())
                }
            }
        })
        .await?;

        node.started_in = started.elapsed();
        Ok(node)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// kubelet's `--root-dir` (the chart's `csi.kubeletDir`).
    pub fn kubelet_dir(&self) -> PathBuf {
        self.path.join("kubelet")
    }

    /// The node's directory (configuration, logs, containerd's and kubelet's state).
    pub fn dir(&self) -> &Path {
        &self.path
    }

    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The log of `containerd`, `kubelet` or `kube-proxy`.
    pub fn log_path(&self, component: &str) -> PathBuf {
        self.path.join(format!("{component}.log"))
    }

    /// Runs `ctr -n k8s.io ARGS` against the node's containerd.
    pub fn ctr(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["-n", "k8s.io"];
        all.extend_from_slice(args);
        let out = ctr_output(&self.path.join("containerd/containerd.sock"), &all)?;
        if !out.status.success() {
            bail!(
                "ctr {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Kills a container's processes with SIGKILL, as an OOM kill or a crash would end them;
    /// kubelet then restarts it. `container_id` is the pod status's `containerID` with or
    /// without its `containerd://` prefix.
    pub fn kill_container(&self, container_id: &str) -> anyhow::Result<()> {
        let id = container_id
            .strip_prefix("containerd://")
            .unwrap_or(container_id);
        self.ctr(&["tasks", "kill", "--all", "--signal", "SIGKILL", id])
            .map(|_| ())
    }

    /// Runs `program ARGS` in the node's network namespace (to reach pod IPs from the node, or
    /// look at its iptables).
    pub fn command_in_netns(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns_path.display()))
            .arg("--")
            .arg(program);
        cmd
    }

    fn spawn_in_netns(
        &mut self,
        name: &'static str,
        bin: &Path,
        args: &[String],
    ) -> anyhow::Result<()> {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns_path.display()))
            .arg("--")
            .arg(bin);
        self.spawn_cmd(name, cmd, args)
    }

    fn spawn_cmd(
        &mut self,
        name: &'static str,
        mut cmd: Command,
        args: &[String],
    ) -> anyhow::Result<()> {
        cmd.args(args);
        let component = Component::spawn(name, cmd, self.log_path(name))?;
        self.processes.push(component);
        Ok(())
    }

    async fn wait_until<F, Fut>(
        &mut self,
        name: &str,
        limit: Duration,
        probe: F,
    ) -> anyhow::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        crate::cluster::wait_until(&mut self.processes, name, limit, probe).await
    }

    /// Stops everything, in the order that leaves nothing behind: kubelet and kube-proxy first
    /// (nothing restarts a container after that), then every process in the node's cgroups
    /// and the containerd shims, then containerd; then every mount under the node's
    /// directory, the pods' network namespaces, the cgroups, the host paths it created and the
    /// sysctls it changed.
    fn teardown(&mut self) {
        for p in self
            .processes
            .iter_mut()
            .filter(|p| matches!(p.name, "kubelet" | "kube-proxy"))
        {
            p.kill();
        }
        let sock = self.path.join("containerd/containerd.sock");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut pids = cgroup_pids(&self.cgroup_root);
            pids.extend(shim_pids(&sock));
            if pids.is_empty() || Instant::now() > deadline {
                break;
            }
            for pid in pids {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for p in self.processes.iter_mut().rev() {
            p.kill();
        }
        unmount_under(&self.path);
        for ns in list_netns().difference(&self.netns_before) {
            if ns.starts_with("cni-") {
                let p = Path::new("/run/netns").join(ns);
                let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
                let _ = std::fs::remove_file(&p);
            }
        }
        remove_cgroup_root(&self.cgroup_root);
        for p in &self.absent_paths {
            // A mount kubelet made there (its pod-resources or device-plugin directories are
            // not mounts, but be sure) would make remove_dir_all fail.
            unmount_under(p);
            let _ = std::fs::remove_dir_all(p);
        }
        for (key, value) in &self.sysctls {
            let _ = std::fs::write(Path::new("/proc/sys").join(key), value);
        }
        if std::env::var_os("LAKECACHE_KEEP_CLUSTER").is_some()
            && let Some(dir) = self.dir.take()
        {
            eprintln!("node directory kept: {}", dir.keep().display());
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Removes the namespaces, links, cgroups and mounts of nodes whose test process is gone.
fn remove_stale_nodes() {
    for ns in list_netns() {
        let Some(pid) = ns
            .strip_prefix("lcnode-")
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        eprintln!("removing the node a killed test left ({ns})");
        let root = format!("lakecache-node-{pid}");
        for p in cgroup_pids(&root) {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        remove_cgroup_root(&root);
        quiet("ip", &["netns", "del", &ns]);
        quiet("ip", &["link", "del", &format!("lch{}", pid % 1_000_000)]);
    }
    if let Ok(table) = mountinfo::read_self() {
        let stale: Vec<PathBuf> = table
            .iter()
            .filter_map(|m| {
                let s = m.mount_point.to_str()?;
                s.starts_with("/tmp/lcn-")
                    .then(|| m.mount_point.iter().take(3).collect::<PathBuf>())
            })
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|d| !d.join("containerd/containerd.sock").exists())
            .collect();
        for d in stale {
            unmount_under(&d);
            let _ = std::fs::remove_dir_all(&d);
        }
    }
}

fn list_netns() -> BTreeSet<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Every mount at or under `dir`, deepest first, lazily detached.
fn unmount_under(dir: &Path) {
    for _ in 0..5 {
        let Ok(table) = mountinfo::read_self() else {
            return;
        };
        let mut points: Vec<PathBuf> = table
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|p| p.starts_with(dir))
            .collect();
        if points.is_empty() {
            return;
        }
        points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        points.dedup();
        for p in points {
            let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// The cgroup v1 hierarchies (`/sys/fs/cgroup/<name>`), or the v2 root alone.
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let Ok(table) = mountinfo::read_self() else {
        return Vec::new();
    };
    table
        .into_iter()
        .filter(|m| m.fs_type == "cgroup" || m.fs_type == "cgroup2")
        .map(|m| m.mount_point)
        .collect()
}

/// kubelet wants its `cgroupRoot` to exist in every hierarchy; cpuset needs its CPUs and
/// memory nodes copied from the parent before anything can join it.
fn make_cgroup_root(root: &str) -> anyhow::Result<()> {
    for h in cgroup_hierarchies() {
        let dir = h.join(root);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating cgroup {}", dir.display()))?;
        for f in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(v) = std::fs::read_to_string(h.join(f)) {
                let _ = std::fs::write(dir.join(f), v.trim());
            }
        }
    }
    Ok(())
}

fn cgroup_pids(root: &str) -> BTreeSet<i32> {
    fn walk(dir: &Path, out: &mut BTreeSet<i32>) {
        if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), out);
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    for h in cgroup_hierarchies() {
        walk(&h.join(root), &mut out);
    }
    out
}

fn remove_cgroup_root(root: &str) {
    fn remove(dir: &Path) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    remove(&e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
    for h in cgroup_hierarchies() {
        remove(&h.join(root));
    }
}

/// containerd's shims are daemons of their own (not in containerd's process group): found by
/// the containerd address on their command line.
fn shim_pids(sock: &Path) -> BTreeSet<i32> {
    let needle = sock.display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return BTreeSet::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.contains("containerd-shim") && c.contains(&needle)
            })
        })
        .collect()
}

fn ctr_output(sock: &Path, args: &[&str]) -> anyhow::Result<Output> {
    let mut cmd = Command::new("ctr");
    cmd.arg("--address").arg(sock).args(args);
    Ok(crate::cluster::run_bounded(cmd, None, COMMAND_TIMEOUT))
}

fn which(program: &str) -> anyhow::Result<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .with_context(|| {
            format!("{program} is not installed: run scripts/setup (it installs it from Debian)")
        })
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run_ok(
        Command::new("ip").args(args),
        &format!("ip {}", args.join(" ")),
    )
}

fn run_ok(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{what}: cannot run it"))?;
    if !out.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn quiet(program: &str, args: &[&str]) {
    let _ = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn write(dir: &Path, name: &str, contents: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
