//! Test support: real cache workers, the real plugin and mounter binaries, and a CSI client over
//! the real unix socket, the way kubelet talks to the plugin.
#![allow(dead_code)]

pub use lakecache_e2e::kit::{self, free_port, pattern};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytesize::ByteSize;
use lakecache_proto::csi::v1 as csi;
use lakecache_proto::csi::v1::identity_client::IdentityClient;
use lakecache_proto::csi::v1::node_client::NodeClient;
use lakecache_worker::Worker;
use lakecache_worker::config::WorkerConfig;
use lakecache_worker::store::TierKind;
use tonic::transport::{Channel, Endpoint};

pub const BIN: &str = env!("CARGO_BIN_EXE_lakecache-csi-node");
pub const TOKEN: &str = "data-plane-token-for-tests";

/// A sample lake on the local filesystem, and cache workers over it.
pub struct Lake {
    pub dir: tempfile::TempDir,
    pub workers: Vec<Worker>,
    pub files: Vec<(String, Vec<u8>)>,
}

impl Lake {
    pub async fn start(workers: usize) -> Lake {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("lake");
        let files = vec![
            (
                "train/shard-0.bin".to_string(),
                pattern(1, 3 * 1024 * 1024 + 17),
            ),
            ("train/shard-1.bin".to_string(), pattern(2, 700 * 1024)),
            ("val/labels.txt".to_string(), b"cat\ndog\n".to_vec()),
        ];
        for (p, data) in &files {
            let path = src.join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, data).unwrap();
        }
        let mut ws = Vec::new();
        for i in 0..workers {
            let cfg = worker_config(dir.path(), i, "127.0.0.1:0".parse().unwrap(), TOKEN);
            ws.push(Worker::start(cfg).await.unwrap());
        }
        Lake {
            dir,
            workers: ws,
            files,
        }
    }

    /// Stops worker `i` and starts it again on the same address, with its Disk tier, requiring
    /// `token` (a token rotation on the workers' side).
    pub async fn restart_worker(&mut self, i: usize, token: &str) {
        let old = self.workers.remove(i);
        let addr = old.addr;
        old.stop().await;
        let cfg = worker_config(self.dir.path(), i, addr, token);
        self.workers.insert(i, Worker::start(cfg).await.unwrap());
    }

    /// The `workers` volume attribute.
    pub fn workers_attr(&self) -> String {
        self.workers
            .iter()
            .map(|w| format!("{}={}", w.id, w.addr))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Worker `i` of a lake in `dir`, listening on `listen`, requiring `token`.
pub fn worker_config(
    dir: &Path,
    i: usize,
    listen: std::net::SocketAddr,
    token: &str,
) -> WorkerConfig {
    let source = lakecache_lake::SourceSpec::new(format!("file://{}", dir.join("lake").display()));
    let tier = dir.join(format!("tier-{i}"));
    WorkerConfig {
        listen,
        tiers: vec![kit::tier(TierKind::Disk, &tier, ByteSize::mib(64))],
        token: Some(token.to_string()),
        ..kit::worker_config(i, source, 1 << 20)
    }
}

/// The plugin and mounter processes of one node.
pub struct NodeProcs {
    pub root: PathBuf,
    pub state: PathBuf,
    pub socket: PathBuf,
    pub admin_port: u16,
    pub plugin: Option<Child>,
    pub mounter: Option<Child>,
    pub startup_timeout: &'static str,
    /// Extra environment of both processes (KUBECONFIG for the FUSE servers).
    pub env: Vec<(String, String)>,
    /// Extra arguments of the plugin.
    pub plugin_args: Vec<String>,
    /// The plugin's `--legacy-state-dir`.
    pub legacy_state: PathBuf,
}

impl NodeProcs {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            state: root.join("state"),
            socket: root.join("csi/csi.sock"),
            admin_port: free_port(),
            plugin: None,
            mounter: None,
            startup_timeout: "3s",
            env: vec![],
            plugin_args: vec![],
            legacy_state: root.join("legacy-state"),
        }
    }

    pub fn start_mounter(&mut self) {
        let child = Command::new(BIN)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(["mounter", "--state-dir"])
            .arg(&self.state)
            .args(["--mount-timeout", "20s"])
            .stdin(Stdio::null())
            .spawn()
            .expect("starting the mounter");
        self.mounter = Some(child);
    }

    pub fn start_plugin(&mut self) {
        let child = Command::new(BIN)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .arg("plugin")
            .arg("--endpoint")
            .arg(format!("unix://{}", self.socket.display()))
            .args(["--node-id", "node-1"])
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--legacy-state-dir")
            .arg(&self.legacy_state)
            .arg("--admin-listen")
            .arg(format!("127.0.0.1:{}", self.admin_port))
            .args(["--repair-interval", "500ms"])
            .args(["--startup-timeout", self.startup_timeout])
            .args(["--prefetch-budget", "16MiB"])
            .arg("--local-cache-dir")
            .arg(self.root.join("local-copies"))
            .args(["--local-cache-size", "64MiB"])
            .args(&self.plugin_args)
            .stdin(Stdio::null())
            .spawn()
            .expect("starting the plugin");
        self.plugin = Some(child);
    }

    pub fn kill_plugin(&mut self) {
        if let Some(mut c) = self.plugin.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn kill_mounter(&mut self) {
        if let Some(mut c) = self.mounter.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A CSI connection once the plugin answers Probe with ready.
    pub async fn connect(&self) -> Csi {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = String::new();
        while Instant::now() < deadline {
            if self.socket.exists() {
                let csi = Csi::new(&self.socket);
                match csi.identity().probe(csi::ProbeRequest {}).await {
                    Ok(r) if r.get_ref().ready == Some(true) => return csi,
                    Ok(r) => last = format!("{:?}", r.get_ref()),
                    Err(e) => last = e.to_string(),
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the plugin was not ready within 30 s: {last}");
    }

    /// The plugin's /metrics text.
    pub async fn metrics(&self) -> String {
        http_get(self.admin_port, "/metrics").await
    }
}

/// Ends every FUSE connection mounted under `root` through the kernel's fusectl (mounted at
/// /sys/fs/fuse/connections first if need be): the plugin and the mounter keep copies of the
/// connections, so killing the FUSE servers alone leaves them up, and a thread waiting on a
/// hung one waits on.
pub fn abort_fuse_under(root: &Path) {
    let ctl = Path::new("/sys/fs/fuse/connections");
    if std::fs::read_dir(ctl).is_ok_and(|mut d| d.next().is_none()) {
        let _ = nix::mount::mount(
            Some("fusectl"),
            ctl,
            Some("fusectl"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        );
    }
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    for line in info.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let fuse = line
            .split(" - ")
            .nth(1)
            .is_some_and(|rest| rest.starts_with("fuse"));
        if fuse
            && f.len() > 4
            && Path::new(f[4]).starts_with(root)
            && let Some((_, minor)) = f[2].split_once(':')
        {
            let _ = std::fs::write(ctl.join(minor).join("abort"), "1");
        }
    }
}

/// Kills every FUSE server whose configuration lies under `state` (the mounter's, and any the
/// plugin started while the mounter was away).
pub fn kill_fuse_servers(state: &Path) {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return;
    };
    let needle = state.as_os_str().as_encoded_bytes();
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        if args.contains(&&b"fuse-server"[..])
            && args
                .iter()
                .any(|a| a.windows(needle.len()).any(|w| w == needle))
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Drop for NodeProcs {
    fn drop(&mut self) {
        abort_fuse_under(&self.root);
        kill_fuse_servers(&self.state);
        self.kill_plugin();
        self.kill_mounter();
        // Stop every FUSE server left behind and clear their mounts, so a failed test leaves
        // nothing mounted.
        if let Ok(rd) = std::fs::read_dir(self.state.join("volumes")) {
            for e in rd.flatten() {
                if let Ok(b) = std::fs::read(e.path().join("fuse.pid"))
                    && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b)
                    && let Some(pid) = v["pid"].as_i64()
                {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        if let Ok(table) = lakecache_csi_node::mounts::mount_table() {
            let mut ours: Vec<_> = table
                .into_iter()
                .filter(|m| m.mount_point.starts_with(&self.root))
                .collect();
            ours.reverse();
            for m in ours {
                let _ = lakecache_csi_node::mounts::detach(&m.mount_point);
            }
        }
    }
}

pub async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// A CSI client over the unix socket.
#[derive(Clone)]
pub struct Csi {
    channel: Channel,
}

impl Csi {
    pub fn new(socket: &Path) -> Self {
        let socket = socket.to_path_buf();
        let channel = Endpoint::from_static("http://csi.invalid").connect_with_connector_lazy(
            tower::service_fn(move |_| {
                let socket = socket.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(&socket).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }),
        );
        Self { channel }
    }

    pub fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel.clone())
    }

    pub fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel.clone())
    }
}

pub fn mount_capability(mode: csi::volume_capability::access_mode::Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Mount(
            csi::volume_capability::MountVolume::default(),
        )),
        access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
    }
}

pub fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Polls `f` until it returns `Some`, at most `timeout`.
pub async fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(v) = f() {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: not within {timeout:?}");
}

/// A fake cache worker whose listings never end: it sends the first (empty) page of every
/// listing at once, as a worker does while it asks its lake, and then nothing. A reader waits
/// on it for its whole worker timeout. Everything else but `Info` is unimplemented.
pub struct StalledLister;

type Stream<T> = std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl lakecache_proto::lakecache::v1::cache_worker_server::CacheWorker for StalledLister {
    type ReadBlockStream = Stream<lakecache_proto::lakecache::v1::Chunk>;
    type ListPagesStream = Stream<lakecache_proto::lakecache::v1::ListResponse>;
    type WatchPreloadStream = Stream<lakecache_proto::lakecache::v1::PreloadStatus>;

    async fn read_block(
        &self,
        _: tonic::Request<lakecache_proto::lakecache::v1::ReadBlockRequest>,
    ) -> Result<tonic::Response<Self::ReadBlockStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("stalled lister"))
    }
    async fn stat(
        &self,
        _: tonic::Request<lakecache_proto::lakecache::v1::StatRequest>,
    ) -> Result<tonic::Response<lakecache_proto::lakecache::v1::StatResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("stalled lister"))
    }
    async fn list(
        &self,
        _: tonic::Request<lakecache_proto::lakecache::v1::ListRequest>,
    ) -> Result<tonic::Response<lakecache_proto::lakecache::v1::ListResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("stalled lister"))
    }
    async fn list_pages(
        &self,
        _: tonic::Request<lakecache_proto::lakecache::v1::ListRequest>,
    ) -> Result<tonic::Response<Self::ListPagesStream>, tonic::Status> {
        use futures::StreamExt;
        let first = futures::stream::iter([Ok(Default::default())]);
        Ok(tonic::Response::new(Box::pin(
            first.chain(futures::stream::pending()),
        )))
    }
    async fn start_preload(
        &self,
        _: tonic::Request<lakecache_proto::lakecache::v1::StartPreloadRequest>,
    ) -> Result<tonic::Response<lakecache_proto::lakecache::v1::PreloadStatus>, tonic::Status> {
        Err(tonic::Status::unimplemented("stalled lister"))
    }
    async fn watch_preload(
        &self,
        _: tonic::Request<lakecache_proto::lakecache::v1::WatchPreloadRequest>,
    ) -> Result<tonic::Response<Self::WatchPreloadStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("stalled lister"))
    }
    async fn cancel_preload(
        &self,
        _: tonic::Request<lakecache_proto::lakecache::v1::CancelPreloadRequest>,
    ) -> Result<tonic::Response<lakecache_proto::lakecache::v1::PreloadStatus>, tonic::Status> {
        Err(tonic::Status::unimplemented("stalled lister"))
    }
    async fn info(
        &self,
        _: tonic::Request<lakecache_proto::lakecache::v1::InfoRequest>,
    ) -> Result<tonic::Response<lakecache_proto::lakecache::v1::WorkerInfo>, tonic::Status> {
        Ok(tonic::Response::new(
            lakecache_proto::lakecache::v1::WorkerInfo {
                block_size: 1 << 20,
                ..Default::default()
            },
        ))
    }
}

impl StalledLister {
    /// Serves it on a loopback port; returns the `workers` attribute naming it.
    pub async fn start() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(
                    lakecache_proto::lakecache::v1::cache_worker_server::CacheWorkerServer::new(
                        StalledLister,
                    ),
                )
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("w0={addr}")
    }
}

/// Volume `lakecache-ml-imagenet` of CacheNamespace ml/imagenet over `lake`'s workers, laid out
/// as kubelet lays out a CSI volume under `root`: the requests kubelet sends for it.
pub struct KubeletVolume {
    pub id: String,
    pub staging: PathBuf,
    root: PathBuf,
    context: HashMap<String, String>,
}

impl KubeletVolume {
    pub fn new(root: &Path, lake: &Lake) -> Self {
        let staging = root.join(format!(
            "kubelet/plugins/kubernetes.io/csi/{}/abc/globalmount",
            lakecache_csi_node::CSI_DRIVER
        ));
        std::fs::create_dir_all(&staging).unwrap();
        let workers = lake.workers_attr();
        Self {
            id: "lakecache-ml-imagenet".into(),
            staging,
            root: root.to_path_buf(),
            context: map(&[
                ("cacheNamespace", "imagenet"),
                ("namespace", "ml"),
                ("workers", &workers),
            ]),
        }
    }

    /// The target of pod `pod`'s volume `data` (its parent made, as kubelet does).
    pub fn target(&self, pod: &str) -> PathBuf {
        let t = self.root.join(format!(
            "kubelet/pods/{pod}/volumes/kubernetes.io~csi/data/mount"
        ));
        std::fs::create_dir_all(t.parent().unwrap()).unwrap();
        t
    }

    pub fn stage(&self) -> csi::NodeStageVolumeRequest {
        csi::NodeStageVolumeRequest {
            volume_id: self.id.clone(),
            staging_target_path: self.staging.display().to_string(),
            volume_capability: Some(mount_capability(
                csi::volume_capability::access_mode::Mode::MultiNodeReaderOnly,
            )),
            secrets: map(&[("token", TOKEN)]),
            volume_context: self.context.clone(),
            ..Default::default()
        }
    }

    /// A publish to `target` for pod `trainer-0` in namespace `pod_ns`.
    pub fn publish(&self, target: &Path, pod_ns: &str) -> csi::NodePublishVolumeRequest {
        let mut vc = self.context.clone();
        vc.insert("csi.storage.k8s.io/pod.namespace".into(), pod_ns.into());
        vc.insert("csi.storage.k8s.io/pod.name".into(), "trainer-0".into());
        csi::NodePublishVolumeRequest {
            volume_id: self.id.clone(),
            staging_target_path: self.staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(mount_capability(
                csi::volume_capability::access_mode::Mode::MultiNodeReaderOnly,
            )),
            readonly: true,
            volume_context: vc,
            ..Default::default()
        }
    }
}
