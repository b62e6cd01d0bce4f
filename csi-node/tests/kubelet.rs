//! The plugin as kubelet drives it, over its real socket, with real workers, real FUSE mounts
//! and real bind mounts: stage, publish twice, read, restart the plugin, kill a FUSE server,
//! restart the mounter, unpublish and unstage twice, bad and cross-namespace requests.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use lakecache_csi_node::mounts::{self, Health};
use lakecache_proto::csi::v1 as csi;
use lakecache_proto::csi::v1::volume_capability::access_mode::Mode;
use support::*;
use tonic::Code;

async fn read(path: PathBuf) -> std::io::Result<Vec<u8>> {
    tokio::task::spawn_blocking(move || std::fs::read(path))
        .await
        .unwrap()
}

/// Every file of the lake reads back byte for byte under `root`.
async fn check_reads(lake: &Lake, root: &Path) {
    for (p, data) in &lake.files {
        let got = read(root.join(p))
            .await
            .unwrap_or_else(|e| panic!("reading {p} under {}: {e}", root.display()));
        assert!(got == *data, "{p} under {} differs", root.display());
    }
}

fn fuse_pid(state: &Path) -> u32 {
    let rd = std::fs::read_dir(state.join("volumes")).unwrap();
    for e in rd.flatten() {
        if let Ok(b) = std::fs::read(e.path().join("fuse.pid")) {
            let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
            return v["pid"].as_u64().unwrap() as u32;
        }
    }
    panic!("no fuse.pid under {}", state.display());
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubelet_lifecycle_survives_restarts_and_repairs_mounts() {
    let lake = Lake::start(2).await;
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProcs::new(root.path());
    node.start_mounter();
    node.start_plugin();
    let csi = node.connect().await;
    let mut n = csi.node();

    let staging = root
        .path()
        .join("kubelet/plugins/kubernetes.io/csi/csi.lakecache.io/abc/globalmount");
    std::fs::create_dir_all(&staging).unwrap();
    let t1 = root
        .path()
        .join("kubelet/pods/p1/volumes/kubernetes.io~csi/data/mount");
    let t2 = root
        .path()
        .join("kubelet/pods/p2/volumes/kubernetes.io~csi/data/mount");
    std::fs::create_dir_all(t1.parent().unwrap()).unwrap();
    std::fs::create_dir_all(t2.parent().unwrap()).unwrap();
    let workers = lake.workers_attr();
    let ctx = map(&[
        ("cacheNamespace", "imagenet"),
        ("namespace", "ml"),
        ("workers", &workers),
    ]);
    let cap = mount_capability(Mode::MultiNodeReaderOnly);
    let stage_req = csi::NodeStageVolumeRequest {
        volume_id: "lakecache-ml-imagenet".into(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap.clone()),
        secrets: map(&[("token", TOKEN)]),
        volume_context: ctx.clone(),
        ..Default::default()
    };
    let publish = |target: &Path, pod_ns: &str| {
        let mut vc = ctx.clone();
        vc.insert("csi.storage.k8s.io/pod.namespace".into(), pod_ns.into());
        vc.insert("csi.storage.k8s.io/pod.name".into(), "trainer-0".into());
        csi::NodePublishVolumeRequest {
            volume_id: "lakecache-ml-imagenet".into(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(cap.clone()),
            readonly: true,
            volume_context: vc,
            ..Default::default()
        }
    };

    // Stage (twice: the same answer), publish to two targets, read through both.
    n.node_stage_volume(stage_req.clone()).await.unwrap();
    n.node_stage_volume(stage_req.clone()).await.unwrap();
    assert_eq!(mounts::health(&staging), Health::Healthy);
    n.node_publish_volume(publish(&t1, "ml")).await.unwrap();
    n.node_publish_volume(publish(&t2, "ml")).await.unwrap();
    check_reads(&lake, &t1).await;
    check_reads(&lake, &t2).await;
    n.node_publish_volume(publish(&t1, "ml")).await.unwrap();
    assert_eq!(
        mounts::mount_count(&t1).unwrap(),
        1,
        "publishing again stacks no mount"
    );
    // Whole files read through the cache are kept as node-local copies (served with FUSE
    // passthrough from then on), in a directory of the volume's own.
    let copies = root.path().join("local-copies");
    eventually(
        Duration::from_secs(10),
        "local copies of the files read",
        || {
            let n: usize = std::fs::read_dir(&copies)
                .ok()?
                .flatten()
                .map(|d| {
                    // Copies are named by a 40-character key; the marker and checksums are not.
                    std::fs::read_dir(d.path().join(lakecache_client::local_cache::SUBDIR))
                        .map(|r| {
                            r.flatten()
                                .filter(|e| {
                                    let name = e.file_name().to_string_lossy().into_owned();
                                    name.len() == 40 && !name.contains('.')
                                })
                                .count()
                        })
                        .unwrap_or(0)
                })
                .sum();
            (n == lake.files.len()).then_some(())
        },
    )
    .await;
    check_reads(&lake, &t1).await;
    // Read-only, whatever the pod asks.
    let err = std::fs::write(t1.join("new-file"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");

    // Stats: usage and a normal condition.
    let stats = n
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: "lakecache-ml-imagenet".into(),
            volume_path: t1.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.usage.len(), 2);
    assert!(!stats.volume_condition.unwrap().abnormal);

    // Kill the plugin: the mounts keep serving. Start it again: it finds its volume.
    let pid_before = fuse_pid(&node.state);
    node.kill_plugin();
    check_reads(&lake, &t1).await;
    check_reads(&lake, &t2).await;
    node.start_plugin();
    let csi = node.connect().await;
    let mut n = csi.node();
    check_reads(&lake, &t1).await;
    check_reads(&lake, &t2).await;
    n.node_publish_volume(publish(&t1, "ml")).await.unwrap();
    assert_eq!(
        fuse_pid(&node.state),
        pid_before,
        "a plugin restart must not restart FUSE"
    );

    // Kill the FUSE server: the plugin starts a new one and binds both targets again.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid_before as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually(Duration::from_secs(5), "the FUSE server dies", || {
        (!alive(pid_before)).then_some(())
    })
    .await;
    let new_pid = eventually(Duration::from_secs(20), "a new FUSE server", || {
        let p = fuse_pid(&node.state);
        (p != pid_before
            && mounts::health(&t1) == Health::Healthy
            && mounts::health(&t2) == Health::Healthy)
            .then_some(p)
    })
    .await;
    assert!(alive(new_pid));
    check_reads(&lake, &t1).await;
    check_reads(&lake, &t2).await;
    // The admin endpoints: alive, and ready (the mounter answers).
    for path in ["/livez", "/readyz"] {
        let r = http_get(node.admin_port, path).await;
        assert_eq!(r.split_whitespace().nth(1), Some("200"), "{path}: {r}");
    }
    let m = node.metrics().await;
    assert!(
        metric(&m, "lakecache_csi_repairs_total{kind=\"fuse\"}") >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, "lakecache_csi_repairs_total{kind=\"target\"}") >= 2.0,
        "{m}"
    );
    // The FUSE servers' own metrics are there too, by volume (reads above may have come from
    // the page cache, so only their presence is certain).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let m = loop {
        let m = node.metrics().await;
        if m.contains("\nlakecache_fuse_read_errors_total{volume=\"") {
            break m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no FUSE server metrics: {m}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        m.matches("# TYPE lakecache_fuse_hedges counter").count(),
        1,
        "{m}"
    );

    // Kill the mounter: the FUSE server keeps serving; a new mounter adopts it.
    node.kill_mounter();
    check_reads(&lake, &t1).await;
    node.start_mounter();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        fuse_pid(&node.state),
        new_pid,
        "the new mounter adopts the running server"
    );
    check_reads(&lake, &t2).await;

    // A cross-namespace pod is refused, and so is a publish that names another CacheNamespace.
    let t3 = root
        .path()
        .join("kubelet/pods/p3/volumes/kubernetes.io~csi/data/mount");
    let e = n
        .node_publish_volume(publish(&t3, "other"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("\"other\""), "{}", e.message());
    assert!(!t3.exists());

    // Unstage while published: refused, naming the targets.
    let unstage = csi::NodeUnstageVolumeRequest {
        volume_id: "lakecache-ml-imagenet".into(),
        staging_target_path: staging.display().to_string(),
    };
    let e = n.node_unstage_volume(unstage.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains(&t1.display().to_string()),
        "{}",
        e.message()
    );

    // Unpublish and unstage, each twice.
    for t in [&t1, &t2] {
        for _ in 0..2 {
            n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: "lakecache-ml-imagenet".into(),
                target_path: t.display().to_string(),
            })
            .await
            .unwrap();
        }
        assert!(!t.exists(), "unpublish removes the target path");
    }
    n.node_unstage_volume(unstage.clone()).await.unwrap();
    n.node_unstage_volume(unstage.clone()).await.unwrap();
    assert!(!mounts::is_mount_point(&staging).unwrap());
    assert!(
        std::fs::read_dir(root.path().join("local-copies"))
            .unwrap()
            .next()
            .is_none(),
        "unstage removes the volume's local copies"
    );
    eventually(Duration::from_secs(15), "the FUSE server stops", || {
        (!alive(new_pid)).then_some(())
    })
    .await;
    let e = n
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: "lakecache-ml-imagenet".into(),
            volume_path: staging.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inline_ephemeral_volume_and_sub_path() {
    let lake = Lake::start(1).await;
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProcs::new(root.path());
    node.start_mounter();
    node.start_plugin();
    let csi = node.connect().await;
    let mut n = csi.node();
    let workers = lake.workers_attr();
    let target = root
        .path()
        .join("pods/p/volumes/kubernetes.io~csi/inline/mount");
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let req = csi::NodePublishVolumeRequest {
        volume_id: "csi-0123456789abcdef".into(),
        target_path: target.display().to_string(),
        volume_capability: Some(mount_capability(Mode::SingleNodeWriter)),
        readonly: true,
        secrets: map(&[("token", TOKEN)]),
        volume_context: map(&[
            ("cacheNamespace", "imagenet"),
            ("workers", &workers),
            ("subPath", "train"),
            ("csi.storage.k8s.io/ephemeral", "true"),
            ("csi.storage.k8s.io/pod.namespace", "ml"),
            ("csi.storage.k8s.io/pod.name", "p"),
        ]),
        ..Default::default()
    };
    n.node_publish_volume(req.clone()).await.unwrap();
    n.node_publish_volume(req.clone()).await.unwrap();
    let got = read(target.join("shard-1.bin")).await.unwrap();
    assert!(got == lake.files[1].1);
    assert!(!target.join("val").exists(), "only the subPath shows");
    let pid = fuse_pid(&node.state);
    for _ in 0..2 {
        n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: req.volume_id.clone(),
            target_path: req.target_path.clone(),
        })
        .await
        .unwrap();
    }
    assert!(!target.exists());
    eventually(
        Duration::from_secs(15),
        "the inline volume's FUSE server stops",
        || (!alive(pid)).then_some(()),
    )
    .await;
    assert!(
        std::fs::read_dir(node.state.join("volumes"))
            .unwrap()
            .next()
            .is_none(),
        "its state is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_get_codes_that_say_what_to_fix() {
    let lake = Lake::start(1).await;
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProcs::new(root.path());
    node.start_mounter();
    node.start_plugin();
    let csi = node.connect().await;
    let mut n = csi.node();
    let staging = root.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let workers = lake.workers_attr();
    let good = csi::NodeStageVolumeRequest {
        volume_id: "v1".into(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(mount_capability(Mode::MultiNodeReaderOnly)),
        secrets: map(&[("token", TOKEN)]),
        volume_context: map(&[
            ("cacheNamespace", "imagenet"),
            ("namespace", "ml"),
            ("workers", &workers),
        ]),
        ..Default::default()
    };
    let cases: Vec<(csi::NodeStageVolumeRequest, Code, &str)> = vec![
        (
            csi::NodeStageVolumeRequest {
                volume_id: String::new(),
                ..good.clone()
            },
            Code::InvalidArgument,
            "volume_id",
        ),
        (
            csi::NodeStageVolumeRequest {
                staging_target_path: String::new(),
                ..good.clone()
            },
            Code::InvalidArgument,
            "staging_target_path",
        ),
        (
            csi::NodeStageVolumeRequest {
                volume_capability: None,
                ..good.clone()
            },
            Code::InvalidArgument,
            "volume_capability",
        ),
        (
            csi::NodeStageVolumeRequest {
                volume_capability: Some(csi::VolumeCapability {
                    access_type: Some(
                        csi::volume_capability::AccessType::Block(Default::default()),
                    ),
                    access_mode: Some(csi::volume_capability::AccessMode {
                        mode: Mode::MultiNodeReaderOnly as i32,
                    }),
                }),
                ..good.clone()
            },
            Code::InvalidArgument,
            "Filesystem",
        ),
        (
            csi::NodeStageVolumeRequest {
                volume_capability: Some(mount_capability(Mode::MultiNodeMultiWriter)),
                ..good.clone()
            },
            Code::InvalidArgument,
            "ReadOnlyMany",
        ),
        (
            csi::NodeStageVolumeRequest {
                volume_context: map(&[("namespace", "ml")]),
                ..good.clone()
            },
            Code::InvalidArgument,
            "cacheNamespace",
        ),
        (
            csi::NodeStageVolumeRequest {
                secrets: map(&[("token", "wrong")]),
                ..good.clone()
            },
            Code::Unavailable,
            "token",
        ),
        (
            csi::NodeStageVolumeRequest {
                volume_context: map(&[
                    ("cacheNamespace", "imagenet"),
                    ("namespace", "ml"),
                    ("workers", "w0=127.0.0.1:1"),
                ]),
                ..good.clone()
            },
            Code::Unavailable,
            "no cache worker answered",
        ),
    ];
    for (req, code, needle) in cases {
        let e = n.node_stage_volume(req.clone()).await.unwrap_err();
        assert_eq!(e.code(), code, "{req:?}: {e:?}");
        assert!(
            e.message().contains(needle),
            "{needle:?} not in {:?}",
            e.message()
        );
        assert!(
            !e.message().contains(TOKEN),
            "the token leaked: {}",
            e.message()
        );
        assert!(
            !e.message().contains("mounter container"),
            "blames the mounter: {}",
            e.message()
        );
        assert!(
            !mounts::is_mount_point(&staging).unwrap(),
            "a failed stage leaves no mount"
        );
    }

    // A second call for a volume that is being staged gets Aborted.
    let slow = csi::NodeStageVolumeRequest {
        volume_id: "v2".into(),
        volume_context: map(&[
            ("cacheNamespace", "imagenet"),
            ("namespace", "ml"),
            ("workers", "w0=127.0.0.1:1"),
        ]),
        ..good.clone()
    };
    let mut n2 = n.clone();
    let first = tokio::spawn({
        let slow = slow.clone();
        async move { n2.node_stage_volume(slow).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let e = n.node_stage_volume(slow.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    assert!(first.await.unwrap().is_err());

    // Publish of a volume that was never staged, stats of an unknown volume, no expansion.
    let e = n
        .node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: "never-staged".into(),
            staging_target_path: staging.display().to_string(),
            target_path: root.path().join("t").display().to_string(),
            volume_capability: Some(mount_capability(Mode::MultiNodeReaderOnly)),
            volume_context: good.volume_context.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("NodeStageVolume"), "{}", e.message());
    let e = n
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: "unknown".into(),
            volume_path: "/nowhere".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // The good request still works after all that.
    n.node_stage_volume(good.clone()).await.unwrap();
    assert_eq!(mounts::health(&staging), Health::Healthy);
    n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: good.volume_id.clone(),
        staging_target_path: good.staging_target_path.clone(),
    })
    .await
    .unwrap();
    let m = node.metrics().await;
    assert!(
        m.contains(
            "lakecache_csi_calls_total{method=\"NodeStageVolume\",code=\"InvalidArgument\"}"
        ),
        "{m}"
    );
}
