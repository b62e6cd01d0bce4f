//! A real Kubernetes control plane for tests: etcd, kube-apiserver and, on request,
//! kube-controller-manager and kube-scheduler, each a real upstream binary built from pinned Go
//! modules by `scripts/setup`, on loopback ports in a temporary directory.
//!
//! With [`ClusterOptions::with_node`] it also runs a real node ([`crate::node`]: kubelet,
//! containerd and kube-proxy) whose pods are real containers of our own image. Without one, no
//! container runs: this is the control plane that a chart and RBAC rules are checked against,
//! the way controller-runtime's envtest does it; pods can be bound by the real scheduler to
//! fake nodes ([`Cluster::add_fake_node`]) and stay Pending there.
//!
//! What the start does, in order, with every wait bounded:
//!
//! 1. Makes a CA and a serving certificate for 127.0.0.1 and `localhost` (ECDSA P-256, fast), and
//!    an RSA-2048 service-account signing key (RSA because that is what kubeadm and every
//!    managed cluster use, so tokens look like real ones). These come from `rcgen`, not the
//!    openssl CLI and not the apiserver's own `--cert-dir` self-signing: no system package and no
//!    child process, and the CA exists before anything starts, so the kubeconfig, the
//!    controller-manager's `--root-ca-file` and the other components' serving certificates all
//!    chain to one CA known up front.
//! 2. Writes a static token file: an admin in `system:masters`, and the users
//!    `system:kube-controller-manager` and `system:kube-scheduler`, whose rights come from the
//!    apiserver's bootstrap RBAC policy exactly as in a kubeadm cluster.
//! 3. Starts etcd and waits for its `/health`, then the apiserver and waits for `/readyz`, then
//!    the controller-manager and the scheduler (which give up if the apiserver is not there yet)
//!    and waits for their `/healthz`.
//!
//! Each component is its own process group, logs to `<dir>/<name>.log`, and is killed on drop;
//! the directory is removed then, unless `LAKECACHE_KEEP_CLUSTER` is set. When a test panics,
//! drop prints the tail of every component's log.

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::json;

use crate::node::{Node as RealNode, NodeControlPlane, NodeNetwork};

/// The environment variables `scripts/setup --env` exports, one per binary.
pub const ETCD_ENV: &str = "LAKECACHE_ETCD";
pub const KUBE_APISERVER_ENV: &str = "LAKECACHE_KUBE_APISERVER";
pub const KUBE_CONTROLLER_MANAGER_ENV: &str = "LAKECACHE_KUBE_CONTROLLER_MANAGER";
pub const KUBE_SCHEDULER_ENV: &str = "LAKECACHE_KUBE_SCHEDULER";
pub const KUBECTL_ENV: &str = "LAKECACHE_KUBECTL";
pub const HELM_ENV: &str = "LAKECACHE_HELM";
pub const KUBELET_ENV: &str = "LAKECACHE_KUBELET";
pub const KUBE_PROXY_ENV: &str = "LAKECACHE_KUBE_PROXY";

/// The Kubernetes version `scripts/setup` builds (tools/kube pins it).
pub const KUBE_VERSION: &str = "v1.34.4";

/// The controllers kube-controller-manager runs unless [`ClusterOptions::controllers`] says
/// otherwise: every default one (garbage collector, namespace, deployment, replicaset,
/// statefulset, daemonset, job, serviceaccount and token, persistentvolume binder and
/// protection, …) except the node lifecycle controller, which would mark fake nodes Unknown and
/// taint them unreachable once they miss their 50 s of kubelet heartbeats. Controllers that
/// need a cloud provider or `--allocate-node-cidrs` do nothing without them.
pub const DEFAULT_CONTROLLERS: &str = "*,-node-lifecycle-controller";

const ETCD_START: Duration = Duration::from_secs(30);
const APISERVER_START: Duration = Duration::from_secs(90);
const COMPONENT_START: Duration = Duration::from_secs(60);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// What to start besides etcd and kube-apiserver.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Start kube-controller-manager (needed for anything that turns one object into others:
    /// Deployments, StatefulSets, garbage collection, namespace deletion, PV binding, the
    /// `default` ServiceAccount). Without it the ServiceAccount admission plugin is turned off,
    /// since nothing would create the accounts it requires.
    pub controller_manager: bool,
    /// Start kube-scheduler (binds pods to nodes).
    pub scheduler: bool,
    /// kube-controller-manager's `--controllers`; [`DEFAULT_CONTROLLERS`] when `None`.
    pub controllers: Option<String>,
    /// Extra kube-apiserver flags (feature gates, admission plugins, …), appended last.
    pub apiserver_args: Vec<String>,
    /// Also start a real node ([`crate::node`]: kubelet, containerd, kube-proxy) that runs our
    /// image. Implies the controller-manager (with every controller, the node lifecycle one
    /// too) and the scheduler; the API server then binds [`crate::node::HOST_IP`].
    pub node: bool,
}

impl ClusterOptions {
    /// etcd and kube-apiserver only.
    pub fn apiserver_only() -> Self {
        Self::default()
    }

    /// The whole control plane: also kube-controller-manager and kube-scheduler.
    pub fn full() -> Self {
        Self {
            controller_manager: true,
            scheduler: true,
            ..Self::default()
        }
    }

    /// The whole control plane and a real node running our image.
    pub fn with_node() -> Self {
        Self {
            node: true,
            ..Self::full()
        }
    }
}

/// A process of the test cluster (a control-plane component, or one of the node's), in a
/// process group of its own and logging to a file.
pub(crate) struct Component {
    pub(crate) name: &'static str,
    pub(crate) child: Child,
    pub(crate) log: PathBuf,
}

impl Component {
    /// Starts `cmd` with its output in `log`, in its own process group, so that [`Component::kill`]
    /// ends it and anything it started.
    pub(crate) fn spawn(
        name: &'static str,
        mut cmd: Command,
        log: PathBuf,
    ) -> anyhow::Result<Component> {
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(Component { name, child, log })
    }

    /// Kills the process group and reaps the process; while a test panics, prints the end of
    /// its log.
    pub(crate) fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        }
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- the end of {} ({}) ---\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 15)
            );
        }
    }
}

/// Calls `probe` every 100 ms until it succeeds, component `name` exits or `limit` passes; the
/// error then carries the last probe failure and the tail of the component's log.
pub(crate) async fn wait_until<F, Fut>(
    components: &mut [Component],
    name: &str,
    limit: Duration,
    mut probe: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + limit;
    let mut last = String::from("not probed yet");
    loop {
        let component = components
            .iter_mut()
            .find(|c| c.name == name)
            .context("unknown component")?;
        if let Some(status) = component.child.try_wait()? {
            bail!(
                "{name} exited ({status}) while starting; the end of {}:\n{}",
                component.log.display(),
                tail(&component.log, 30)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{name} was not ready within {limit:?} (last probe: {last}); the end of {}:\n{}",
                component.log.display(),
                tail(&component.log, 30)
            );
        }
        match tokio::time::timeout(Duration::from_secs(10), probe()).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => last = e,
            Err(_) => last = "probe timed out after 10 s".into(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A running control plane; dropping it kills every process and removes its directory.
pub struct Cluster {
    // Stopped first (in drop), while the API server is still there.
    node: Option<RealNode>,
    // Declared before `dir`, so the processes are gone before their directory is removed.
    components: Vec<Component>,
    // Removed last: the API server binds to the host end of its link.
    network: Option<NodeNetwork>,
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    server: String,
    ca_pem: String,
    admin_token: String,
    kubeconfig: PathBuf,
    kubectl: PathBuf,
    helm: PathBuf,
    started_in: Duration,
}

impl Cluster {
    /// Starts the control plane and returns once every started component is healthy.
    ///
    /// Ports are picked free and then handed to the components, so a test starting beside it
    /// can take one in between; a start that fails on a port in use is tried again, twice.
    pub async fn start(options: ClusterOptions) -> anyhow::Result<Cluster> {
        let mut attempt = 1;
        loop {
            match Self::start_once(&options).await {
                Err(e) if attempt < 3 && format!("{e:#}").contains("address already in use") => {
                    eprintln!("cluster start lost a port race, trying again: {e:#}");
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn start_once(options: &ClusterOptions) -> anyhow::Result<Cluster> {
        let started = Instant::now();
        install_crypto_provider();
        let mut options = options.clone();
        if options.node {
            options.controller_manager = true;
            options.scheduler = true;
            options.controllers.get_or_insert_with(|| "*".into());
        }
        let options = &options;
        // The images are built (or found in the cache) before anything starts.
        let images = if options.node {
            crate::image::node_images()?
        } else {
            Vec::new()
        };
        // Off the runtime's threads: it may wait for another test's node to stop.
        let network = if options.node {
            Some(tokio::task::spawn_blocking(NodeNetwork::create).await??)
        } else {
            None
        };
        let host = if network.is_some() {
            crate::node::HOST_IP
        } else {
            "127.0.0.1"
        };
        let etcd = binary(ETCD_ENV);
        let apiserver = binary(KUBE_APISERVER_ENV);
        let controller_manager = options
            .controller_manager
            .then(|| binary(KUBE_CONTROLLER_MANAGER_ENV));
        let scheduler = options.scheduler.then(|| binary(KUBE_SCHEDULER_ENV));
        let kubectl = binary(KUBECTL_ENV);
        let helm = binary(HELM_ENV);

        let dir = tempfile::Builder::new()
            .prefix("lakecache-cluster-")
            .tempdir()
            .context("creating the cluster's directory")?;
        let path = dir.path().to_path_buf();
        let [
            etcd_port,
            peer_port,
            apiserver_port,
            cm_port,
            scheduler_port,
        ] = free_ports()?;
        let server = format!("https://{host}:{apiserver_port}");

        let pki = Pki::generate(host)?;
        let ca = write(&path, "ca.crt", &pki.ca_pem)?;
        let serving_cert = write(&path, "serving.crt", &pki.serving_cert_pem)?;
        let serving_key = write(&path, "serving.key", &pki.serving_key_pem)?;
        let sa_key = write(&path, "sa.key", &pki.service_account_key_pem)?;

        let admin_token = random_token();
        let cm_token = random_token();
        let scheduler_token = random_token();
        let kubelet_token = random_token();
        let kube_proxy_token = random_token();
        // The node's kubelet is `system:node:<name>` in `system:nodes` (what the Node
        // authorizer and NodeRestriction know), kube-proxy `system:kube-proxy` (bound to
        // `system:node-proxier` by the bootstrap policy), as with kubeadm.
        let tokens = write(
            &path,
            "tokens.csv",
            &format!(
                "{admin_token},admin,admin,\"system:masters\"\n\
                 {cm_token},system:kube-controller-manager,system:kube-controller-manager\n\
                 {scheduler_token},system:kube-scheduler,system:kube-scheduler\n\
                 {kubelet_token},system:node:{node},system:node:{node},\"system:nodes\"\n\
                 {kube_proxy_token},system:kube-proxy,system:kube-proxy\n",
                node = RealNode::NAME,
            ),
        )?;
        let kubeconfig = write(
            &path,
            "admin.kubeconfig",
            &kubeconfig_json(&server, &ca, "admin", &admin_token, None),
        )?;

        let mut cluster = Cluster {
            node: None,
            components: Vec::new(),
            network,
            dir: Some(dir),
            path: path.clone(),
            server: server.clone(),
            ca_pem: pki.ca_pem.clone(),
            admin_token,
            kubeconfig,
            kubectl,
            helm,
            started_in: Duration::ZERO,
        };

        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        cluster.spawn(
            "etcd",
            &etcd,
            &[
                "--name=lakecache".into(),
                format!("--data-dir={}", path.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=lakecache={peer_url}"),
                // A test cluster's data dies with it: fsync buys nothing and costs seconds.
                "--unsafe-no-fsync=true".into(),
                "--log-level=warn".into(),
            ],
        )?;
        cluster
            .wait_until("etcd", ETCD_START, || async {
                match http_get_status(etcd_port, "/health").await {
                    Ok(200) => Ok(()),
                    Ok(code) => Err(format!("/health answered {code}")),
                    Err(e) => Err(e.to_string()),
                }
            })
            .await?;

        let mut args = vec![
            format!("--etcd-servers={etcd_url}"),
            format!("--bind-address={host}"),
            format!("--secure-port={apiserver_port}"),
            format!("--advertise-address={host}"),
            format!("--cert-dir={}", path.join("apiserver-certs").display()),
            format!("--tls-cert-file={}", serving_cert.display()),
            format!("--tls-private-key-file={}", serving_key.display()),
            format!("--client-ca-file={}", ca.display()),
            // The front-proxy settings of a kubeadm cluster. Without them the controller-manager
            // and the scheduler, which read them for their own authentication, log an error
            // about the missing CA bundle every few seconds.
            format!("--requestheader-client-ca-file={}", ca.display()),
            "--requestheader-allowed-names=front-proxy-client".into(),
            "--requestheader-username-headers=X-Remote-User".into(),
            "--requestheader-group-headers=X-Remote-Group".into(),
            "--requestheader-extra-headers-prefix=X-Remote-Extra-".into(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", sa_key.display()),
            format!("--service-account-signing-key-file={}", sa_key.display()),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            "--allow-privileged=true".into(),
            format!("--token-auth-file={}", tokens.display()),
            "--enable-priority-and-fairness=false".into(),
            "--profiling=false".into(),
        ];
        if !options.controller_manager {
            args.push("--disable-admission-plugins=ServiceAccount".into());
        }
        if options.node {
            // A real node: its kubelet is authorized by the Node authorizer and limited by
            // NodeRestriction; the API server reaches it (logs, exec) at its InternalIP with a
            // client certificate kubelet checks against the cluster CA.
            let cert = write(&path, "kubelet-client.crt", &pki.kubelet_client_cert_pem)?;
            let key = write(&path, "kubelet-client.key", &pki.kubelet_client_key_pem)?;
            args.extend([
                "--authorization-mode=Node,RBAC".into(),
                "--enable-admission-plugins=NodeRestriction".into(),
                format!("--kubelet-client-certificate={}", cert.display()),
                format!("--kubelet-client-key={}", key.display()),
                "--kubelet-preferred-address-types=InternalIP".into(),
            ]);
        } else {
            args.extend([
                "--authorization-mode=RBAC".into(),
                // The `kubernetes` Service's endpoints would be 127.0.0.1, which endpoint
                // validation rejects; nothing routes to it without a node anyway.
                "--endpoint-reconciler-type=none".into(),
            ]);
        }
        args.extend(options.apiserver_args.iter().cloned());
        cluster.spawn("kube-apiserver", &apiserver, &args)?;
        let probe = probe_client(&pki.ca_der)?;
        cluster
            .wait_until("kube-apiserver", APISERVER_START, || {
                get_ok(&probe, format!("{server}/readyz"))
            })
            .await?;

        let mut probes = Vec::new();
        if let Some(bin) = controller_manager {
            let kc = write(
                &path,
                "controller-manager.kubeconfig",
                &kubeconfig_json(
                    &server,
                    &ca,
                    "system:kube-controller-manager",
                    &cm_token,
                    None,
                ),
            )?;
            let controllers = options
                .controllers
                .clone()
                .unwrap_or_else(|| DEFAULT_CONTROLLERS.into());
            cluster.spawn(
                "kube-controller-manager",
                &bin,
                &[
                    format!("--kubeconfig={}", kc.display()),
                    format!("--authentication-kubeconfig={}", kc.display()),
                    format!("--authorization-kubeconfig={}", kc.display()),
                    "--leader-elect=false".into(),
                    "--bind-address=127.0.0.1".into(),
                    format!("--secure-port={cm_port}"),
                    format!(
                        "--cert-dir={}",
                        path.join("controller-manager-certs").display()
                    ),
                    format!("--tls-cert-file={}", serving_cert.display()),
                    format!("--tls-private-key-file={}", serving_key.display()),
                    format!("--service-account-private-key-file={}", sa_key.display()),
                    format!("--root-ca-file={}", ca.display()),
                    "--use-service-account-credentials=true".into(),
                    format!("--controllers={controllers}"),
                    "--profiling=false".into(),
                ],
            )?;
            probes.push(("kube-controller-manager", cm_port));
        }
        if let Some(bin) = scheduler {
            let kc = write(
                &path,
                "scheduler.kubeconfig",
                &kubeconfig_json(
                    &server,
                    &ca,
                    "system:kube-scheduler",
                    &scheduler_token,
                    None,
                ),
            )?;
            cluster.spawn(
                "kube-scheduler",
                &bin,
                &[
                    format!("--kubeconfig={}", kc.display()),
                    format!("--authentication-kubeconfig={}", kc.display()),
                    format!("--authorization-kubeconfig={}", kc.display()),
                    "--leader-elect=false".into(),
                    "--bind-address=127.0.0.1".into(),
                    format!("--secure-port={scheduler_port}"),
                    format!("--cert-dir={}", path.join("scheduler-certs").display()),
                    format!("--tls-cert-file={}", serving_cert.display()),
                    format!("--tls-private-key-file={}", serving_key.display()),
                    "--profiling=false".into(),
                ],
            )?;
            probes.push(("kube-scheduler", scheduler_port));
        }
        for (name, port) in probes {
            cluster
                .wait_until(name, COMPONENT_START, || {
                    get_ok(&probe, format!("https://127.0.0.1:{port}/healthz"))
                })
                .await?;
        }

        if let Some(network) = &cluster.network {
            let node = RealNode::start(
                network,
                NodeControlPlane {
                    server: &server,
                    ca: &ca,
                    kubelet_token: &kubelet_token,
                    kube_proxy_token: &kube_proxy_token,
                    client: cluster.client().await?,
                },
                &images,
            )
            .await?;
            cluster.node = Some(node);
        }

        cluster.started_in = started.elapsed();
        Ok(cluster)
    }

    /// The real node, when the cluster was started [`ClusterOptions::with_node`].
    pub fn node(&self) -> &RealNode {
        self.node
            .as_ref()
            .expect("the cluster was started without a node (ClusterOptions::with_node)")
    }

    /// The address test servers bind to so that pods reach them: the host's end of the
    /// node's link with a node, loopback without one.
    pub fn host_ip(&self) -> &'static str {
        if self.network.is_some() {
            crate::node::HOST_IP
        } else {
            "127.0.0.1"
        }
    }

    /// How long [`Cluster::start`] took.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The cluster's directory (certificates, kubeconfigs, logs, etcd's data).
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// The apiserver's URL, `https://127.0.0.1:<port>`.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The CA that every component's serving certificate chains to, as PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The file holding [`Cluster::ca_pem`].
    pub fn ca_path(&self) -> PathBuf {
        self.path.join("ca.crt")
    }

    /// A kubeconfig for a cluster admin (`system:masters`).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// A client for a cluster admin, built from [`Cluster::kubeconfig_path`].
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        client_from_kubeconfig(&self.kubeconfig).await
    }

    /// A kubeconfig whose requests are made as user `name` in `groups` (and
    /// `system:authenticated`), so RBAC grants them exactly what that user has.
    ///
    /// It impersonates (kubeconfig `as` and `as-groups`) with the admin's token, as
    /// `kubectl --as` does, because the static token file cannot change after start; the
    /// apiserver authorizes every request as the impersonated user alone. For a
    /// ServiceAccount, [`Cluster::kubeconfig_for_service_account`] gives a real token instead.
    pub fn kubeconfig_for_user(&self, name: &str, groups: &[&str]) -> anyhow::Result<PathBuf> {
        let file = format!("user-{}.kubeconfig", sanitize(name));
        write(
            &self.path,
            &file,
            &kubeconfig_json(
                &self.server,
                &self.ca_path(),
                "admin",
                &self.admin_token,
                Some((name, groups)),
            ),
        )
    }

    /// A kubeconfig holding a real token of ServiceAccount `namespace/name` (from the
    /// TokenRequest API, valid for a day; the account must exist), so a process using it has
    /// exactly the rights that account is bound to: what a pod running as it would get.
    pub async fn kubeconfig_for_service_account(
        &self,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<PathBuf> {
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client().await?, namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![],
                expiration_seconds: Some(24 * 3600),
                ..Default::default()
            },
            ..Default::default()
        };
        let token = accounts
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .with_context(|| format!("requesting a token for ServiceAccount {namespace}/{name}"))?
            .status
            .context("the TokenRequest has no status")?
            .token;
        let file = format!("sa-{}-{}.kubeconfig", sanitize(namespace), sanitize(name));
        write(
            &self.path,
            &file,
            &kubeconfig_json(
                &self.server,
                &self.ca_path(),
                &format!("system:serviceaccount:{namespace}:{name}"),
                &token,
                None,
            ),
        )
    }

    /// Runs `kubectl --kubeconfig <admin> ARGS` (at most 2 minutes) and returns its output.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_with_stdin(args, None)
    }

    /// [`Cluster::kubectl`] with `stdin` fed to it (for `apply -f -`).
    /// kubectl's stdout, or an error with the command and its stderr.
    pub fn kubectl_ok(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        let out = self.kubectl_with_stdin(args, stdin);
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn kubectl_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(&self.kubectl);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        run_bounded(cmd, stdin, COMMAND_TIMEOUT)
    }

    /// The kubectl binary.
    pub fn kubectl_path(&self) -> &Path {
        &self.kubectl
    }

    /// The helm binary.
    pub fn helm_path(&self) -> &Path {
        &self.helm
    }

    /// Runs `helm ARGS` (at most 2 minutes) against this cluster as its admin, with helm's
    /// cache, config and data under the cluster's directory rather than the user's home.
    pub fn helm(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.helm);
        let home = self.path.join("helm");
        cmd.args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"));
        run_bounded(cmd, None, COMMAND_TIMEOUT)
    }

    /// Creates a Node that the scheduler will bind pods to: Ready, with room for 110 pods,
    /// 8 CPUs and 16 GiB, labelled `kubernetes.io/hostname=<name>`, and without the
    /// `node.kubernetes.io/not-ready` taint that admission puts on every new node (a kubelet's
    /// first Ready status would have the node lifecycle controller lift it). No kubelet runs
    /// for it: its pods stay Pending, and Terminating when deleted.
    pub async fn add_fake_node(&self, name: &str) -> anyhow::Result<Node> {
        let nodes: Api<Node> = Api::all(self.client().await?);
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                },
            },
        }))?;
        nodes
            .create(&PostParams::default(), &node)
            .await
            .with_context(|| format!("creating node {name}"))?;
        let resources = json!({"cpu": "8", "memory": "16Gi", "pods": "110"});
        let status = json!({
            "status": {
                "capacity": resources,
                "allocatable": resources,
                "conditions": [{
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "fake node of the lakecache test harness",
                }],
            },
        });
        nodes
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .with_context(|| format!("setting node {name} Ready"))?;
        let untainted = nodes
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"spec": {"taints": null}})),
            )
            .await
            .with_context(|| format!("removing node {name}'s taints"))?;
        Ok(untainted)
    }

    /// The log file of a component (`etcd`, `kube-apiserver`, `kube-controller-manager`,
    /// `kube-scheduler`).
    pub fn log_path(&self, component: &str) -> PathBuf {
        self.path.join(format!("{component}.log"))
    }

    fn spawn(&mut self, name: &'static str, bin: &Path, args: &[String]) -> anyhow::Result<()> {
        let mut cmd = Command::new(bin);
        cmd.args(args);
        let component = Component::spawn(name, cmd, self.log_path(name))?;
        self.components.push(component);
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
        wait_until(&mut self.components, name, limit, probe).await
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        drop(self.node.take());
        for c in self.components.iter_mut().rev() {
            c.kill();
        }
        if std::env::var_os("LAKECACHE_KEEP_CLUSTER").is_some()
            && let Some(dir) = self.dir.take()
        {
            eprintln!("cluster directory kept: {}", dir.keep().display());
        }
    }
}

/// Calls `check` every 250 ms until it returns `Some`, and fails after `limit` with `what` and
/// the last error `check` returned: how tests wait for controllers without sleeping blindly.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + limit;
    loop {
        let last = match tokio::time::timeout(Duration::from_secs(10), check()).await {
            Ok(Ok(Some(value))) => return Ok(value),
            Ok(Ok(None)) => "not yet".to_string(),
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => "a check hung for 10 s".to_string(),
        };
        if Instant::now() > deadline {
            bail!("{what}: not within {limit:?} (last: {last})");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A client built from a kubeconfig file, as a process given `--kubeconfig` would build it.
pub async fn client_from_kubeconfig(path: &Path) -> anyhow::Result<kube::Client> {
    install_crypto_provider();
    let kubeconfig = Kubeconfig::read_from(path)
        .with_context(|| format!("reading kubeconfig {}", path.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("loading kubeconfig {}", path.display()))?;
    Ok(kube::Client::try_from(config)?)
}

/// kube brings rustls with ring and opendal's reqwest brings it with aws-lc-rs; with both
/// compiled in, rustls refuses to pick one, so the process must.
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The path in `var`, which `scripts/setup --env` exports.
pub(crate) fn binary(var: &str) -> PathBuf {
    let Some(path) = std::env::var_os(var) else {
        panic!(
            "{var} is not set: run `eval \"$(scripts/setup --env)\"` first (it builds the binary)"
        );
    };
    let path = PathBuf::from(path);
    assert!(
        path.is_file(),
        "{var}={} does not exist: run `eval \"$(scripts/setup --env)\"` again",
        path.display()
    );
    path
}

/// Distinct free loopback ports: all are held at once while picked, so none repeats.
fn free_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    let mut ports = [0; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

struct Pki {
    ca_pem: String,
    ca_der: Vec<u8>,
    serving_cert_pem: String,
    serving_key_pem: String,
    service_account_key_pem: String,
    kubelet_client_cert_pem: String,
    kubelet_client_key_pem: String,
}

impl Pki {
    /// `host`: the address the API server binds; its certificate also names the `kubernetes`
    /// Service's ClusterIP and DNS names, as pods reach it through them.
    fn generate(host: &str) -> anyhow::Result<Self> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose, PKCS_RSA_SHA256, RsaKeySize,
        };
        let mut ca = CertificateParams::new(Vec::new())?;
        ca.distinguished_name
            .push(DnType::CommonName, "lakecache-test-ca");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);

        let mut names: Vec<String> = [
            "127.0.0.1",
            "localhost",
            "10.0.0.1",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ]
        .map(String::from)
        .to_vec();
        if !names.iter().any(|n| n == host) {
            names.push(host.to_string());
        }
        let mut serving = CertificateParams::new(names)?;
        serving
            .distinguished_name
            .push(DnType::CommonName, "lakecache-test-control-plane");
        serving.use_authority_key_identifier_extension = true;
        serving.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let serving_key = KeyPair::generate()?;
        let serving_cert_pem = serving.signed_by(&serving_key, &issuer)?.pem();

        // The API server's client certificate for kubelet (kubeadm's
        // `apiserver-kubelet-client`).
        let mut kubelet_client = CertificateParams::new(Vec::new())?;
        kubelet_client
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver-kubelet-client");
        kubelet_client
            .distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        kubelet_client.use_authority_key_identifier_extension = true;
        kubelet_client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let kubelet_client_key = KeyPair::generate()?;
        let kubelet_client_cert_pem = kubelet_client
            .signed_by(&kubelet_client_key, &issuer)?
            .pem();

        let sa_key = KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, RsaKeySize::_2048)?;
        Ok(Pki {
            kubelet_client_cert_pem,
            kubelet_client_key_pem: kubelet_client_key.serialize_pem(),
            ca_pem: ca_cert.pem(),
            ca_der: ca_cert.der().to_vec(),
            serving_cert_pem,
            serving_key_pem: serving_key.serialize_pem(),
            service_account_key_pem: sa_key.serialize_pem(),
        })
    }
}

fn random_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

fn write(dir: &Path, name: &str, contents: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// A kubeconfig (JSON is YAML, and spares quoting rules) with one cluster, one user and one
/// context, optionally impersonating `(user, groups)`.
pub(crate) fn kubeconfig_json(
    server: &str,
    ca: &Path,
    user: &str,
    token: &str,
    impersonate: Option<(&str, &[&str])>,
) -> String {
    let mut auth = json!({ "token": token });
    if let Some((name, groups)) = impersonate {
        auth["as"] = json!(name);
        auth["as-groups"] = json!(groups);
    }
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "lakecache-test",
            "cluster": { "server": server, "certificate-authority": ca },
        }],
        "users": [{ "name": user, "user": auth }],
        "contexts": [{
            "name": "lakecache-test",
            "context": { "cluster": "lakecache-test", "user": user, "namespace": "default" },
        }],
        "current-context": "lakecache-test",
    });
    serde_json::to_string_pretty(&config).expect("a JSON value serializes")
}

/// An unauthenticated client for the components' secure ports (their health paths need no
/// identity). It is a bare hyper client: kube's own stack logs every failed request at ERROR,
/// which while a component starts is every request. Requests carry absolute URLs.
fn probe_client(ca_der: &[u8]) -> anyhow::Result<kube::Client> {
    use kube::client::ConfigExt;
    let mut config = kube::Config::new(http::Uri::from_static("https://127.0.0.1"));
    config.root_cert = Some(vec![ca_der.to_vec()]);
    let connector = config.rustls_https_connector()?;
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, kube::client::Body>(connector);
    Ok(kube::Client::new(http, "default"))
}

async fn get_ok(client: &kube::Client, url: String) -> Result<(), String> {
    let request = http::Request::get(&url)
        .body(Vec::new())
        .map_err(|e| e.to_string())?;
    client
        .request_text(request)
        .await
        .map(|_| ())
        .map_err(|e| format!("GET {url}: {e}"))
}

/// The status code of a plain-HTTP GET on loopback (etcd's `/health`).
async fn http_get_status(port: u16, path: &str) -> std::io::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    s.read_to_end(&mut response).await?;
    let head = String::from_utf8_lossy(&response);
    head.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {head:.80}")))
}

/// The last `lines` lines of a log file.
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("(unreadable: {e})"));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs `cmd` to completion or kills it after `limit` (and panics, naming it).
pub(crate) fn run_bounded(mut cmd: Command, stdin: Option<&str>, limit: Duration) -> Output {
    output_within(&mut cmd, stdin, limit).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Runs `cmd` to completion with `stdin` fed to it and returns its output, or kills it and
/// fails after `limit`: how tests run a command that must not hang them.
pub fn output_within(
    cmd: &mut Command,
    stdin: Option<&str>,
    limit: Duration,
) -> anyhow::Result<Output> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let input = input.as_bytes().to_vec();
        std::thread::spawn(move || pipe.write_all(&input));
    }
    let read = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    };
    let stdout = read(Box::new(child.stdout.take().context("stdout")?));
    let stderr = read(Box::new(child.stderr.take().context("stderr")?));
    let deadline = Instant::now() + limit;
    let status = loop {
        match child
            .try_wait()
            .with_context(|| format!("waiting for {cmd:?}"))?
        {
            Some(status) => break status,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{cmd:?} did not finish within {limit:?}");
            }
        }
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}
