//! What the plugin's unit tests share: a fake mounter and plugins over temporary state.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use lakecache_proto::csi::v1 as csi;
use lakecache_proto::lakecache::v1::mounter_server::{Mounter, MounterServer};
use lakecache_proto::lakecache::v1::{
    ListMountsRequest, ListMountsResponse, MountRequest, MountResponse, UnmountRequest,
    UnmountResponse,
};
use tonic::{Request, Response, Status};

use super::{DEFAULT_LISTING_BUDGET, Plugin, PluginConfig};
use crate::state::{StateDir, TargetRecord, VolumeRecord};
use crate::volume::{Caps, VolumeAttributes, keys};

type Meanwhile = Box<dyn FnOnce(&str) + Send>;

/// A mounter that records the volumes it was asked to mount and, at the first request, runs
/// `meanwhile` with that request's volume id: a CSI call on another volume that lands while
/// the repair loop waits for the mounter.
struct FakeMounter {
    mounted: Arc<parking_lot::Mutex<Vec<String>>>,
    meanwhile: parking_lot::Mutex<Option<Meanwhile>>,
}

#[tonic::async_trait]
impl Mounter for FakeMounter {
    async fn mount(&self, req: Request<MountRequest>) -> Result<Response<MountResponse>, Status> {
        let volume_id = req.into_inner().volume_id;
        let meanwhile = self.meanwhile.lock().take();
        if let Some(f) = meanwhile {
            f(&volume_id);
        }
        self.mounted.lock().push(volume_id);
        Ok(Response::new(MountResponse {
            pid: 1,
            started: false,
            took_over: false,
        }))
    }

    async fn unmount(
        &self,
        _: Request<UnmountRequest>,
    ) -> Result<Response<UnmountResponse>, Status> {
        Ok(Response::new(UnmountResponse {}))
    }

    async fn list_mounts(
        &self,
        _: Request<ListMountsRequest>,
    ) -> Result<Response<ListMountsResponse>, Status> {
        Ok(Response::new(ListMountsResponse::default()))
    }
}

/// Two staged volumes, `a` and `b`, each with one target whose path is gone (so a repair
/// rewrites its record), a plugin over them and a fake mounter that runs `meanwhile` with
/// the volume it is first asked about. Returns the plugin, its state and the volumes the
/// mounter was asked to mount.
pub(crate) async fn two_volumes(
    root: &Path,
    meanwhile: impl FnOnce(&StateDir, &str) + Send + 'static,
) -> (Plugin, StateDir, Arc<parking_lot::Mutex<Vec<String>>>) {
    let state = StateDir::open(&root.join("state")).unwrap();
    for v in ["a", "b"] {
        let mut rec = VolumeRecord {
            volume_id: v.into(),
            staging_path: root.join(v).join("globalmount"),
            ephemeral: false,
            namespace: "ml".into(),
            name: "imagenet".into(),
            targets: Default::default(),
            prefetch_budget: None,
        };
        rec.targets.insert(
            root.join(v).join("gone"),
            TargetRecord {
                sub_path: String::new(),
            },
        );
        state.save(&rec).unwrap();
    }
    let mounted = Arc::new(parking_lot::Mutex::new(vec![]));
    let other = state.clone();
    let fake = FakeMounter {
        mounted: mounted.clone(),
        meanwhile: parking_lot::Mutex::new(Some(Box::new(move |v: &str| meanwhile(&other, v)))),
    };
    let listener = tokio::net::UnixListener::bind(state.mounter_socket()).unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(MounterServer::new(fake))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    let cfg = PluginConfig {
        node_id: "node-1".into(),
        prefetch_budget: 0,
        fuse_threads: 1,
        local_cache_dir: None,
        local_cache_size: 0,
        startup_timeout: Duration::from_secs(1),
        mounter_timeout: Duration::from_secs(5),
        caps: Caps::default(),
        mounter_memory: 0,
        fuse_server_overhead: 0,
        listing_budget: DEFAULT_LISTING_BUDGET,
        block_transport: true,
        fs_timeout: Duration::from_secs(5),
    };
    (Plugin::new(cfg, state.clone()), state, mounted)
}

pub(crate) fn config(mounter_memory: u64, overhead: u64) -> PluginConfig {
    PluginConfig {
        node_id: "n".into(),
        prefetch_budget: 0,
        fuse_threads: 1,
        local_cache_dir: None,
        local_cache_size: 0,
        startup_timeout: Duration::from_secs(1),
        mounter_timeout: Duration::from_secs(1),
        caps: Caps::default(),
        mounter_memory,
        fuse_server_overhead: overhead,
        listing_budget: DEFAULT_LISTING_BUDGET,
        block_transport: true,
        fs_timeout: Duration::from_secs(1),
    }
}

/// A plugin over a fake node (`host`) and a fake mounter that mounts nothing; its state lives
/// under `root`. Returns the plugin, its state and the volumes the mounter was asked to mount.
pub(crate) fn fake_node(
    root: &Path,
    host: Arc<super::host::fake::FakeHost>,
) -> (Plugin, StateDir, Arc<parking_lot::Mutex<Vec<String>>>) {
    let state = StateDir::open(&root.join("state")).unwrap();
    let mounted = Arc::new(parking_lot::Mutex::new(vec![]));
    let fake = FakeMounter {
        mounted: mounted.clone(),
        meanwhile: parking_lot::Mutex::new(None),
    };
    let listener = tokio::net::UnixListener::bind(state.mounter_socket()).unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(MounterServer::new(fake))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    let mut cfg = config(0, 0);
    cfg.mounter_timeout = Duration::from_secs(5);
    cfg.fs_timeout = Duration::from_secs(5);
    (Plugin::with_host(cfg, state.clone(), host), state, mounted)
}

/// A read-only filesystem capability, as kubelet asks for a ReadOnlyMany volume.
pub(crate) fn read_only() -> Option<csi::VolumeCapability> {
    use csi::volume_capability::{AccessMode, AccessType, MountVolume, access_mode::Mode};
    Some(csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode {
            mode: Mode::MultiNodeReaderOnly as i32,
        }),
    })
}

/// The volume context of CacheNamespace ml/imagenet, for a pod in `pod_namespace`, with `extra`.
pub(crate) fn context(pod_namespace: &str, extra: &[(&str, &str)]) -> HashMap<String, String> {
    let mut m: HashMap<String, String> = VolumeAttributes::of("ml", "imagenet")
        .to_map()
        .into_iter()
        .collect();
    m.insert(keys::POD_NAMESPACE.into(), pod_namespace.into());
    for (k, v) in extra {
        m.insert(k.to_string(), v.to_string());
    }
    m
}
