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

    let volume = KubeletVolume::new(root.path(), &lake);
    let staging = volume.staging.clone();
    let (t1, t2) = (volume.target("p1"), volume.target("p2"));
    let stage_req = volume.stage();
    let publish = |target: &Path, pod_ns: &str| volume.publish(target, pod_ns);

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

    // Kill the FUSE server: a successor takes over its connection; the mount and both
    // targets stay as they are (see tests/handoff.rs for the reader's view).
    let device = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&staging).unwrap().dev()
    };
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
    {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::metadata(&staging).unwrap().dev(),
            device,
            "the successor serves the same mount"
        );
    }
    let m = node.metrics().await;
    assert_eq!(
        metric(&m, "lakecache_csi_repairs_total{kind=\"target\"}"),
        0.0,
        "no target needed a repair: {m}"
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

/// What a tenant (who may create pods with inline volumes in its own namespace, and nothing
/// else) or a careless volume must not get, each refused with a code and a message that says
/// what to fix, before anything is mounted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tenant_and_oversized_requests_are_refused() {
    let lake = Lake::start(1).await;
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProcs::new(root.path());
    node.plugin_args = [
        "--max-prefetch-budget",
        "64MiB",
        "--max-local-cache-size",
        "128MiB",
        "--mounter-memory-limit",
        "100MiB",
        "--fuse-server-overhead",
        "10MiB",
    ]
    .map(String::from)
    .to_vec();
    node.start_mounter();
    node.start_plugin();
    let csi = node.connect().await;
    let mut n = csi.node();
    let workers = lake.workers_attr();
    let addr = lake.workers[0].addr.to_string();
    let target = root
        .path()
        .join("pods/p/volumes/kubernetes.io~csi/inline/mount");
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let staging = root.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();

    // Publishes: an inline volume naming workers (a port scanner's way in), a volume that
    // resolves a CacheNamespace while kubelet names no pod namespace, a blank publish token.
    let inline = |pairs: &[(&str, &str)], token: &str| csi::NodePublishVolumeRequest {
        volume_id: "csi-0123456789abcdef".into(),
        target_path: target.display().to_string(),
        volume_capability: Some(mount_capability(Mode::SingleNodeWriter)),
        readonly: true,
        secrets: map(&[("token", token)]),
        volume_context: map(pairs),
        ..Default::default()
    };
    let pod = [
        ("csi.storage.k8s.io/ephemeral", "true"),
        ("csi.storage.k8s.io/pod.namespace", "ml"),
        ("csi.storage.k8s.io/pod.name", "p"),
    ];
    fn with<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let mut v = vec![("cacheNamespace", "imagenet")];
        v.extend_from_slice(extra);
        v
    }
    let scan = format!("w0={addr}");
    let mut scan_ctx = with(&pod);
    scan_ctx.push(("workers", &scan));
    let mut malformed_ctx = with(&pod);
    malformed_ctx.push(("workers", "198.18.0.1:22,,="));
    let publishes: Vec<(csi::NodePublishVolumeRequest, Code, &str)> = vec![
        (
            inline(&scan_ctx, TOKEN),
            Code::InvalidArgument,
            "only on a PersistentVolume",
        ),
        (
            inline(&malformed_ctx, TOKEN),
            Code::InvalidArgument,
            "only on a PersistentVolume",
        ),
        (
            inline(
                &with(&[
                    ("namespace", "ml"),
                    ("csi.storage.k8s.io/ephemeral", "true"),
                ]),
                TOKEN,
            ),
            Code::PermissionDenied,
            "podInfoOnMount",
        ),
        (
            csi::NodePublishVolumeRequest {
                staging_target_path: staging.display().to_string(),
                ..inline(&with(&[("namespace", "ml")]), TOKEN)
            },
            Code::PermissionDenied,
            "podInfoOnMount",
        ),
        (inline(&with(&pod), ""), Code::InvalidArgument, "empty"),
        (
            inline(&with(&[pod[0], pod[1], ("prefetchBudget", "1GiB")]), TOKEN),
            Code::InvalidArgument,
            "--max-prefetch-budget",
        ),
    ];
    for (req, code, needle) in publishes {
        let e = n.node_publish_volume(req.clone()).await.unwrap_err();
        assert_eq!(e.code(), code, "{:?}: {e:?}", req.volume_context);
        assert!(
            e.message().contains(needle),
            "{needle:?} not in {:?}",
            e.message()
        );
        assert!(
            !e.message().contains(&addr),
            "names the address: {}",
            e.message()
        );
        assert!(
            !e.message().contains(TOKEN),
            "the token leaked: {}",
            e.message()
        );
        assert!(!target.exists(), "a refused publish mounts nothing");
    }

    // Stages: sizes over the plugin's caps, blank tokens.
    let stage = |id: &str, extra: &[(&str, &str)], token: &str| {
        let mut vc = map(&[
            ("cacheNamespace", "imagenet"),
            ("namespace", "ml"),
            ("workers", &workers),
            ("localCacheSize", "0"),
        ]);
        vc.extend(map(extra));
        csi::NodeStageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: root.path().join(id).display().to_string(),
            volume_capability: Some(mount_capability(Mode::MultiNodeReaderOnly)),
            secrets: map(&[("token", token)]),
            volume_context: vc,
            ..Default::default()
        }
    };
    let stages = vec![
        (
            stage("v1", &[("prefetchBudget", "65MiB")], TOKEN),
            Code::InvalidArgument,
            "--max-prefetch-budget",
        ),
        (
            stage("v1", &[("localCacheSize", "1GiB")], TOKEN),
            Code::InvalidArgument,
            "--max-local-cache-size",
        ),
        (stage("v1", &[], ""), Code::InvalidArgument, "empty"),
        (stage("v1", &[], " \n"), Code::InvalidArgument, "empty"),
    ];
    for (req, code, needle) in stages {
        let e = n.node_stage_volume(req.clone()).await.unwrap_err();
        assert_eq!(e.code(), code, "{:?}: {e:?}", req.volume_context);
        assert!(
            e.message().contains(needle),
            "{needle:?} not in {:?}",
            e.message()
        );
        assert!(
            !root.path().join("v1").exists()
                || !mounts::is_mount_point(&root.path().join("v1")).unwrap()
        );
    }

    // The mounter's memory (100 MiB) holds v1 (60 + 10 MiB), and not v2 (30 + 10 MiB) beside
    // it; 20 MiB fit. v1 staged again is not counted twice.
    for id in ["v1", "v2"] {
        std::fs::create_dir_all(root.path().join(id)).unwrap();
    }
    n.node_stage_volume(stage("v1", &[("prefetchBudget", "60MiB")], TOKEN))
        .await
        .unwrap();
    n.node_stage_volume(stage("v1", &[("prefetchBudget", "60MiB")], TOKEN))
        .await
        .unwrap();
    let e = n
        .node_stage_volume(stage("v2", &[("prefetchBudget", "30MiB")], TOKEN))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("csi.mounter.resources.limits.memory"),
        "{}",
        e.message()
    );
    assert!(!mounts::is_mount_point(&root.path().join("v2")).unwrap());
    n.node_stage_volume(stage("v2", &[("prefetchBudget", "20MiB")], TOKEN))
        .await
        .unwrap();

    // Only the plugin may read the tokens or talk to the mounter; the configuration names the
    // token's file, not the token.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
    let state = node.state.clone();
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join("mounter.sock")), 0o600);
    let vols: Vec<_> = std::fs::read_dir(state.join("volumes"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(vols.len(), 2);
    for v in &vols {
        assert_eq!(mode(&v.join("token")), 0o600);
        assert_eq!(mode(&v.join("fuse.json")), 0o600);
        assert_eq!(std::fs::read_to_string(v.join("token")).unwrap(), TOKEN);
        let cfg = std::fs::read_to_string(v.join("fuse.json")).unwrap();
        assert!(!cfg.contains(TOKEN), "{cfg}");
        // Each FUSE server keeps the plugin's listing budget, which its overhead counts.
        let cfg: serde_json::Value = serde_json::from_str(&cfg).unwrap();
        assert_eq!(cfg["listingBudget"], 200_000, "{cfg}");
    }
    // A restarted plugin makes private again what someone opened up.
    std::fs::set_permissions(
        vols[0].join("token"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    node.kill_plugin();
    node.start_plugin();
    let mut n = node.connect().await.node();
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&vols[0].join("token")), 0o600);

    for id in ["v1", "v2"] {
        n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: root.path().join(id).display().to_string(),
        })
        .await
        .unwrap();
    }
}

/// Reads every file under `root` again and again (each time from the FUSE server: the page
/// cache of the file is dropped first) until `stop`; returns the passes, the failed reads and
/// the slowest read.
fn read_loop(
    files: Vec<(String, Vec<u8>)>,
    root: PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    passes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> (Vec<String>, Duration) {
    use std::io::Read;
    let mut failed = Vec::new();
    let mut slowest = Duration::ZERO;
    while !stop.load(std::sync::atomic::Ordering::Acquire) {
        for (p, want) in &files {
            let started = std::time::Instant::now();
            let got = std::fs::File::open(root.join(p)).and_then(|mut f| {
                nix::fcntl::posix_fadvise(
                    &f,
                    0,
                    0,
                    nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
                )?;
                let mut v = Vec::new();
                f.read_to_end(&mut v)?;
                Ok(v)
            });
            slowest = slowest.max(started.elapsed());
            match got {
                Ok(v) if v == *want => {}
                Ok(_) => failed.push(format!("{p}: wrong bytes")),
                Err(e) => failed.push(format!("{p}: {e}")),
            }
        }
        passes.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }
    (failed, slowest)
}

/// The token rotation as kubelet drives it with `requiresRepublish`, in both orders: kubelet
/// publishes the volume again with the new token before the workers roll (the FUSE server then
/// keeps the old token beside the new one and reads through workers that still take only the
/// old one), or after (reads that every worker refuses are asked again until the new token
/// comes). The FUSE server takes each token without a restart, and no read fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotated_token_reaches_the_fuse_server_without_a_failed_read() {
    const NEW_TOKEN: &str = "the-rotated-data-plane-token";
    let mut lake = Lake::start(2).await;
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProcs::new(root.path());
    node.start_mounter();
    node.start_plugin();
    let mut n = node.connect().await.node();
    let staging = root.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let target = root
        .path()
        .join("pods/p1/volumes/kubernetes.io~csi/data/mount");
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    // No local copies: every read goes to the workers.
    let ctx = map(&[
        ("cacheNamespace", "imagenet"),
        ("namespace", "ml"),
        ("workers", &lake.workers_attr()),
        ("localCacheSize", "0"),
    ]);
    n.node_stage_volume(csi::NodeStageVolumeRequest {
        volume_id: "v".into(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(mount_capability(Mode::MultiNodeReaderOnly)),
        secrets: map(&[("token", TOKEN)]),
        volume_context: ctx.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let publish = |token: &str| {
        let mut vc = ctx.clone();
        vc.insert("csi.storage.k8s.io/pod.namespace".into(), "ml".into());
        csi::NodePublishVolumeRequest {
            volume_id: "v".into(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(mount_capability(Mode::MultiNodeReaderOnly)),
            readonly: true,
            secrets: map(&[("token", token)]),
            volume_context: vc,
            ..Default::default()
        }
    };
    n.node_publish_volume(publish(TOKEN)).await.unwrap();
    let pid = fuse_pid(&node.state);

    // Reads every file again and again until stopped: the failed reads and the slowest one.
    let files = lake.files.clone();
    let reading = || {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let passes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let reader = std::thread::spawn({
            let (files, t, stop, passes) =
                (files.clone(), target.clone(), stop.clone(), passes.clone());
            move || read_loop(files, t, stop, passes)
        });
        (stop, passes, reader)
    };
    let passed = |passes: &std::sync::Arc<std::sync::atomic::AtomicUsize>, n: usize| {
        let passes = passes.clone();
        async move {
            eventually(Duration::from_secs(30), "reads go on", || {
                (passes.load(std::sync::atomic::Ordering::Acquire) >= n).then_some(())
            })
            .await
        }
    };

    // Order (a): kubelet publishes the new token first; the workers then restart with it, one
    // after the other.
    let (stop, passes, reader) = reading();
    passed(&passes, 2).await;
    n.node_publish_volume(publish(NEW_TOKEN)).await.unwrap();
    // The FUSE server takes the new token within a poll of its token file; the workers still
    // take only the old one, which it now sends after a refusal.
    tokio::time::sleep(lakecache_csi_node::fuse_server::TOKEN_POLL * 2).await;
    passed(
        &passes,
        passes.load(std::sync::atomic::Ordering::Acquire) + 2,
    )
    .await;
    lake.restart_worker(0, NEW_TOKEN).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    lake.restart_worker(1, NEW_TOKEN).await;
    passed(
        &passes,
        passes.load(std::sync::atomic::Ordering::Acquire) + 3,
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Release);
    let (failed, slowest_a) = reader.join().unwrap();
    eprintln!("token rotation, publish first: slowest read {slowest_a:?}");
    assert!(
        failed.is_empty(),
        "failed reads (publish first): {failed:#?}"
    );

    // Order (b): the workers move to the next token one after the other; for a while none takes
    // the one the FUSE server holds (as long as kubelet takes to publish again).
    const NEXT_TOKEN: &str = "the-twice-rotated-data-plane-token";
    let (stop, passes, reader) = reading();
    passed(&passes, 2).await;
    lake.restart_worker(0, NEXT_TOKEN).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    lake.restart_worker(1, NEXT_TOKEN).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let republished = std::time::Instant::now();
    n.node_publish_volume(publish(NEXT_TOKEN)).await.unwrap();
    let before = passes.load(std::sync::atomic::Ordering::Acquire);
    passed(&passes, before + 1).await;
    let first_pass_after = republished.elapsed();
    passed(&passes, before + 3).await;
    stop.store(true, std::sync::atomic::Ordering::Release);
    let (failed, slowest_b) = reader.join().unwrap();
    eprintln!(
        "token rotation, workers first: slowest read {slowest_b:?}; a whole pass done {first_pass_after:?} after the publish with the new token"
    );
    assert!(
        failed.is_empty(),
        "failed reads (workers first): {failed:#?}"
    );
    assert!(
        slowest_b >= Duration::from_secs(1),
        "reads went to the workers during the rotation (and waited): slowest {slowest_b:?}"
    );
    assert_eq!(
        fuse_pid(&node.state),
        pid,
        "the FUSE server was not restarted"
    );

    // Publishing again with the same token is idempotent; the token file holds the new token.
    n.node_publish_volume(publish(NEXT_TOKEN)).await.unwrap();
    assert_eq!(mounts::mount_count(&target).unwrap(), 1);
    let vol = std::fs::read_dir(node.state.join("volumes"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    assert_eq!(
        std::fs::read_to_string(vol.join("token")).unwrap(),
        NEXT_TOKEN
    );
    n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        volume_id: "v".into(),
        target_path: target.display().to_string(),
    })
    .await
    .unwrap();
    n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: "v".into(),
        staging_target_path: staging.display().to_string(),
    })
    .await
    .unwrap();
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

/// Unpublishes `target` of volume `v`, retrying for a second while a repair pass holds the
/// volume (which it does for a moment every pass); panics on any other error.
async fn unpublish_soon(
    n: &mut lakecache_proto::csi::v1::node_client::NodeClient<tonic::transport::Channel>,
    v: &str,
    target: &Path,
) {
    let req = csi::NodeUnpublishVolumeRequest {
        volume_id: v.into(),
        target_path: target.display().to_string(),
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    loop {
        match n.node_unpublish_volume(req.clone()).await {
            Ok(_) => return,
            Err(e) if e.code() == Code::Aborted && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("unpublishing {}: {e:?}", target.display()),
        }
    }
}

/// Sends `sig` to `pid`, ignoring a process that is gone.
fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

/// Kills a stopped FUSE server when the test ends early, so that it leaks neither a stopped
/// process nor a hung mount.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        signal(self.0, nix::sys::signal::Signal::SIGKILL);
        signal(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

/// A publish looks into the cache mount (a lookup of its subPath, which lists a directory on the
/// workers). With a worker that starts every listing and never ends it (the FUSE server waits
/// a minute per attempt), two such publishes at once must not take the plugin's runtime
/// threads: other calls are answered at once, and the publishes answer Unavailable at the
/// plugin's filesystem deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_cache_mount_makes_publish_unavailable_and_blocks_no_other_call() {
    let workers = StalledLister::start().await;
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProcs::new(root.path());
    node.plugin_args = ["--fs-timeout", "2s"].map(String::from).to_vec();
    node.start_mounter();
    node.start_plugin();
    let csi = node.connect().await;
    let mut n = csi.node();
    let ctx = map(&[
        ("cacheNamespace", "imagenet"),
        ("namespace", "ml"),
        ("workers", &workers),
    ]);
    let staging = |v: &str| root.path().join(v).join("globalmount");
    for v in ["a", "b"] {
        std::fs::create_dir_all(staging(v)).unwrap();
        n.node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: v.into(),
            staging_target_path: staging(v).display().to_string(),
            volume_capability: Some(mount_capability(Mode::MultiNodeReaderOnly)),
            secrets: map(&[("token", TOKEN)]),
            volume_context: ctx.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let publish = |v: &str, sub: &str| {
        let mut vc = ctx.clone();
        vc.insert("subPath".into(), sub.into());
        vc.insert("csi.storage.k8s.io/pod.namespace".into(), "ml".into());
        csi::NodePublishVolumeRequest {
            volume_id: v.into(),
            staging_target_path: staging(v).display().to_string(),
            target_path: root.path().join(v).join("pod/mount").display().to_string(),
            volume_capability: Some(mount_capability(Mode::MultiNodeReaderOnly)),
            readonly: true,
            volume_context: vc,
            ..Default::default()
        }
    };
    let started = std::time::Instant::now();
    let calls: Vec<_> = [("a", "train"), ("b", "val")]
        .into_iter()
        .map(|(v, sub)| {
            let mut n = n.clone();
            let req = publish(v, sub);
            tokio::spawn(async move { n.node_publish_volume(req).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..3 {
        let asked = std::time::Instant::now();
        n.node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
            .await
            .unwrap();
        csi.identity().probe(csi::ProbeRequest {}).await.unwrap();
        assert!(
            asked.elapsed() < Duration::from_millis(500),
            "other calls waited {:?} behind the hung publishes",
            asked.elapsed()
        );
    }
    for c in calls {
        let e = c.await.unwrap().unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(
            e.message().contains("did not finish within 2s")
                || e.message().contains("does not answer"),
            "{}",
            e.message()
        );
    }
    let took = started.elapsed();
    eprintln!("hung publishes answered Unavailable after {took:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // The look into the mount still runs on its thread, holding no volume lock: a retry of
    // the same volume (as kubelet sends) is Unavailable at once, without one more thread stuck
    // on the mount, and an unpublish is not refused (it touches nothing in the mount).
    for _ in 0..2 {
        let asked = std::time::Instant::now();
        let e = n
            .node_publish_volume(publish("a", "train"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(e.message().contains("has not returned"), "{}", e.message());
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "{:?}",
            asked.elapsed()
        );
        unpublish_soon(&mut n, "a", &root.path().join("a/pod/mount")).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The plugin's thread that looks into the mount waits until the FUSE server answers (a
    // minute) or the connection ends; without this, killing the plugin would wait for it. The
    // plugin and the mounter keep the connections, so killing the FUSE servers would not end
    // them: they are aborted.
    abort_fuse_under(root.path());
    kill_fuse_servers(&node.state);
}

/// A FUSE server that hangs (stopped with SIGSTOP) while a publish looks into its mount: the
/// publish answers Unavailable at the plugin's filesystem deadline, and its look, stuck on its
/// thread until the server answers, keeps no lock on the volume. So the repair loop replaces
/// the hung server (the mounter kills it), and the volume publishes, reads, unpublishes and
/// unstages again. A look that held the volume's lock would hold it for as long as the server
/// is stopped: the repair loop skips a locked volume, and every call on it gets Aborted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_fuse_server_keeps_no_volume_locked() {
    use nix::sys::signal::Signal;
    let lake = Lake::start(1).await;
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProcs::new(root.path());
    node.plugin_args = ["--fs-timeout", "2s"].map(String::from).to_vec();
    node.start_mounter();
    node.start_plugin();
    let csi = node.connect().await;
    let mut n = csi.node();
    let workers = lake.workers_attr();
    let ctx = map(&[
        ("cacheNamespace", "imagenet"),
        ("namespace", "ml"),
        ("workers", &workers),
    ]);
    let staging = root.path().join("v/globalmount");
    let target = root.path().join("v/pod/mount");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    n.node_stage_volume(csi::NodeStageVolumeRequest {
        volume_id: "v".into(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(mount_capability(Mode::MultiNodeReaderOnly)),
        secrets: map(&[("token", TOKEN)]),
        volume_context: ctx.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let publish = {
        let mut vc = ctx.clone();
        vc.insert("subPath".into(), "val".into());
        vc.insert("csi.storage.k8s.io/pod.namespace".into(), "ml".into());
        csi::NodePublishVolumeRequest {
            volume_id: "v".into(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(mount_capability(Mode::MultiNodeReaderOnly)),
            readonly: true,
            volume_context: vc,
            ..Default::default()
        }
    };

    // The server stops before the publish looks up its subPath (never looked up yet, so the
    // kernel must ask the server).
    let hung = fuse_pid(&node.state);
    let _cleanup = KillOnDrop(hung);
    signal(hung, Signal::SIGSTOP);
    let asked = std::time::Instant::now();
    let e = n.node_publish_volume(publish.clone()).await.unwrap_err();
    let took = asked.elapsed();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        took < Duration::from_secs(5),
        "publish answered after {took:?}"
    );
    eprintln!("publish on a stopped FUSE server answered Unavailable after {took:?}");

    // The repair loop replaces the stopped server without any signal from here: the mounter
    // finds its mount not answering, kills it (SIGTERM, then SIGKILL after 10 s) and starts
    // another. That ends the stuck look too (the mount's connection is gone).
    let replaced = std::time::Instant::now();
    let new = eventually(Duration::from_secs(60), "a new FUSE server", || {
        let pid = fuse_pid(&node.state);
        (pid != hung && !alive(hung) && mounts::health(&staging) == Health::Healthy).then_some(pid)
    })
    .await;
    eprintln!(
        "the repair loop replaced the stopped FUSE server {hung} by {new} after {:?}",
        replaced.elapsed()
    );

    // The volume takes calls again (a repair pass may hold it for a moment, and the stuck look
    // may take a moment to end).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match n.node_publish_volume(publish.clone()).await {
            Ok(_) => break,
            Err(e)
                if matches!(e.code(), Code::Aborted | Code::Unavailable)
                    && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("publishing after the repair: {e:?}"),
        }
    }
    assert_eq!(
        read(target.join("labels.txt")).await.unwrap(),
        b"cat\ndog\n"
    );
    unpublish_soon(&mut n, "v", &target).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = n
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: "v".into(),
                staging_target_path: staging.display().to_string(),
            })
            .await;
        match r {
            Ok(_) => break,
            Err(e) if e.code() == Code::Aborted && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("unstaging: {e:?}"),
        }
    }
    assert!(!alive(new), "the FUSE server outlived the unstage");
}

/// A FUSE server started during a rotation, while one worker already requires the new token
/// and the other still the old one, mounts with the old token: the worker that refuses it is
/// passed over, not the end of the mount. Only when every worker refuses the token does the
/// stage fail at once, saying so, without the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fuse_server_started_during_a_rotation_passes_over_a_refusing_worker() {
    const NEW_TOKEN: &str = "the-rotated-data-plane-token";
    let mut lake = Lake::start(2).await;
    // The first worker asked is the one that refuses.
    lake.restart_worker(0, NEW_TOKEN).await;
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProcs::new(root.path());
    node.start_mounter();
    node.start_plugin();
    let mut n = node.connect().await.node();
    let ctx = map(&[
        ("cacheNamespace", "imagenet"),
        ("namespace", "ml"),
        ("workers", &lake.workers_attr()),
    ]);
    let stage = |v: &str| csi::NodeStageVolumeRequest {
        volume_id: v.into(),
        staging_target_path: root.path().join(v).display().to_string(),
        volume_capability: Some(mount_capability(Mode::MultiNodeReaderOnly)),
        secrets: map(&[("token", TOKEN)]),
        volume_context: ctx.clone(),
        ..Default::default()
    };
    for v in ["v", "w"] {
        std::fs::create_dir_all(root.path().join(v)).unwrap();
    }
    n.node_stage_volume(stage("v")).await.unwrap();
    assert_eq!(mounts::health(&root.path().join("v")), Health::Healthy);

    lake.restart_worker(1, NEW_TOKEN).await;
    let asked = std::time::Instant::now();
    let e = n.node_stage_volume(stage("w")).await.unwrap_err();
    eprintln!(
        "every worker refusing: {:?} after {:?}",
        e.message(),
        asked.elapsed()
    );
    assert!(
        e.message().contains("every worker (2: ")
            && e.message().contains("refused the data-plane token"),
        "{}",
        e.message()
    );
    assert!(
        !e.message().contains(TOKEN) && !e.message().contains(NEW_TOKEN),
        "the error shows a token: {}",
        e.message()
    );
    assert!(
        !e.message().contains("no cache worker answered"),
        "not a timeout: {}",
        e.message()
    );

    n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: "v".into(),
        staging_target_path: root.path().join("v").display().to_string(),
    })
    .await
    .unwrap();
}

/// An upgrade from a plugin that kept its state in the plugin directory (which the registrar
/// mounts too): the new plugin moves the staged volume's record to its own state directory,
/// the new mounter adopts the running FUSE server, reads go on, no token is left in the old
/// place, and the volume unstages as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn volumes_staged_in_the_old_state_directory_are_taken_over() {
    let lake = Lake::start(1).await;
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProcs::new(root.path());
    let old = root.path().join("csi/state");
    node.state = old.clone();
    node.start_mounter();
    node.start_plugin();
    let mut n = node.connect().await.node();
    let staging = root.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let unstage = csi::NodeUnstageVolumeRequest {
        volume_id: "v".into(),
        staging_target_path: staging.display().to_string(),
    };
    n.node_stage_volume(csi::NodeStageVolumeRequest {
        volume_id: "v".into(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(mount_capability(Mode::MultiNodeReaderOnly)),
        secrets: map(&[("token", TOKEN)]),
        volume_context: map(&[
            ("cacheNamespace", "imagenet"),
            ("namespace", "ml"),
            ("workers", &lake.workers_attr()),
        ]),
        ..Default::default()
    })
    .await
    .unwrap();
    let pid = fuse_pid(&old);

    // The upgrade: a new plugin and mounter on the new state directory.
    node.kill_plugin();
    node.kill_mounter();
    node.state = root.path().join("state");
    node.legacy_state = old.clone();
    node.start_mounter();
    node.start_plugin();
    let mut n = node.connect().await.node();
    check_reads(&lake, &staging).await;
    eventually(Duration::from_secs(10), "the volume's record moved", || {
        (fuse_pid(&node.state) == pid).then_some(())
    })
    .await;
    let left: Vec<_> = std::fs::read_dir(old.join("volumes"))
        .unwrap()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).unwrap().flatten())
        .map(|f| f.path())
        // The adopted server still writes its metrics snapshot there; no secret.
        .filter(|p| !p.ends_with("fuse.prom"))
        .collect();
    assert!(left.is_empty(), "left in the old place: {left:?}");
    n.node_unstage_volume(unstage).await.unwrap();
    assert!(!mounts::is_mount_point(&staging).unwrap());
    eventually(Duration::from_secs(15), "the FUSE server stops", || {
        (!alive(pid)).then_some(())
    })
    .await;
}
