//! The FUSE connection outlives every process around it, with real processes, a real FUSE
//! mount and a reader that holds files open: a FUSE server killed, a FUSE server replaced by
//! another binary, the mounter killed with its FUSE server (as its container's death does) and
//! the plugin killed. Each costs no failed read, the files opened before it still read, the
//! mount is never replaced, and the longest read is printed.

mod support;

use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lakecache_proto::lakecache::v1::MountRequest;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use parking_lot::Mutex;
use support::*;

const VOLUME: &str = "lakecache-ml-imagenet";

/// What the reader saw in one stretch of time.
#[derive(Default)]
struct Seen {
    failed: Vec<String>,
    slowest: Duration,
}

/// Reads every file in a loop, through handles opened once at the start (held across every
/// event) and through new opens, bypassing the page cache; bounded by `stop`.
fn reader(
    files: Vec<(String, Vec<u8>)>,
    root: PathBuf,
    stop: Arc<AtomicBool>,
    passes: Arc<AtomicUsize>,
    seen: Arc<Mutex<Seen>>,
) {
    let held: Vec<std::fs::File> = files
        .iter()
        .map(|(p, _)| std::fs::File::open(root.join(p)).unwrap())
        .collect();
    let drop_cache = |f: &std::fs::File| {
        nix::fcntl::posix_fadvise(f, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED)
    };
    while !stop.load(Ordering::Acquire) {
        for ((p, want), h) in files.iter().zip(&held) {
            let t = Instant::now();
            let got = drop_cache(h).map_err(std::io::Error::from).and_then(|_| {
                let mut v = vec![0u8; want.len()];
                h.read_exact_at(&mut v, 0)?;
                Ok(v)
            });
            let took = t.elapsed();
            let t = Instant::now();
            let fresh = std::fs::File::open(root.join(p)).and_then(|mut f| {
                drop_cache(&f)?;
                let mut v = Vec::new();
                f.read_to_end(&mut v)?;
                Ok(v)
            });
            let took = took.max(t.elapsed());
            let mut s = seen.lock();
            s.slowest = s.slowest.max(took);
            for (how, r) in [("held", got), ("new", fresh)] {
                match r {
                    Ok(v) if v == *want => {}
                    Ok(_) => s.failed.push(format!("{p} ({how} handle): wrong bytes")),
                    Err(e) => s.failed.push(format!("{p} ({how} handle): {e}")),
                }
            }
        }
        passes.fetch_add(1, Ordering::AcqRel);
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| !r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn parent(pid: u32) -> u32 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    s.rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// The pid of the process serving the volume: the holder of its serve lock, found as the FUSE
/// server whose command line names the volume's configuration.
fn server_pid(state: &Path) -> Option<u32> {
    let config = lakecache_csi_node::state::StateDir::open(state)
        .unwrap()
        .fuse_config_path(VOLUME);
    let mut found = vec![];
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        if args.contains(&&b"fuse-server"[..])
            && args.contains(&config.as_os_str().as_encoded_bytes())
            && alive(pid)
        {
            found.push(pid);
        }
    }
    (found.len() == 1).then(|| found[0])
}

async fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for `n` more reader passes, then takes what the reader saw since the last call.
async fn passes_then_take(passes: &AtomicUsize, seen: &Mutex<Seen>, n: usize) -> Seen {
    let start = passes.load(Ordering::Acquire);
    wait_for("reader passes", Duration::from_secs(60), || {
        (passes.load(Ordering::Acquire) >= start + n).then_some(())
    })
    .await;
    std::mem::take(&mut *seen.lock())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_fuse_connection_outlives_every_process_around_it() {
    let lake = Lake::start(2).await;
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProcs::new(root.path());
    node.start_mounter();
    node.start_plugin();
    let csi = node.connect().await;
    let mut n = csi.node();
    let volume = KubeletVolume::new(root.path(), &lake);
    let staging = volume.staging.clone();
    let target = volume.target("p1");
    n.node_stage_volume(volume.stage()).await.unwrap();
    n.node_publish_volume(volume.publish(&target, "ml"))
        .await
        .unwrap();
    let device = std::fs::metadata(&staging).unwrap().dev();

    let stop = Arc::new(AtomicBool::new(false));
    let passes = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let t = {
        let (files, target, stop, passes, seen) = (
            lake.files.clone(),
            target.clone(),
            stop.clone(),
            passes.clone(),
            seen.clone(),
        );
        std::thread::spawn(move || reader(files, target, stop, passes, seen))
    };
    let before = passes_then_take(&passes, &seen, 2).await;
    assert!(before.failed.is_empty(), "{:?}", before.failed);
    let mut report = vec![];
    let state = node.state.clone();
    let check = |what: &str, s: Seen, report: &mut Vec<String>| {
        assert!(s.failed.is_empty(), "{what}: failed reads {:?}", s.failed);
        assert_eq!(
            std::fs::metadata(&staging).unwrap().dev(),
            device,
            "{what}: the mount was replaced"
        );
        report.push(format!("{what}: longest read {:?}", s.slowest));
    };

    // 1. The FUSE server is killed: the mounter starts a successor on the kept connection.
    let first = server_pid(&state).expect("one FUSE server");
    kill(Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
    let second = wait_for("a successor", Duration::from_secs(20), || {
        server_pid(&state).filter(|p| *p != first)
    })
    .await;
    check(
        "FUSE server killed",
        passes_then_take(&passes, &seen, 3).await,
        &mut report,
    );

    // 2. Upgraded in place to another binary: the successor asks the running server to hand
    // over; the old one stops answering and exits.
    let bin_dir = tempfile::tempdir().unwrap();
    let next = bin_dir.path().join("lakecache-csi-node-next");
    std::fs::copy(BIN, &next).unwrap();
    let mut mounter = lakecache_csi_node::mounter_client(&state.join("mounter.sock"));
    let resp = mounter
        .mount(MountRequest {
            volume_id: VOLUME.into(),
            mount_path: staging.display().to_string(),
            config_path: lakecache_csi_node::state::StateDir::open(&state)
                .unwrap()
                .fuse_config_path(VOLUME)
                .display()
                .to_string(),
            replace: true,
            exe: next.display().to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.started && resp.took_over, "{resp:?}");
    let third = resp.pid;
    assert_ne!(third, second);
    wait_for("the old server to exit", Duration::from_secs(10), || {
        (!alive(second)).then_some(())
    })
    .await;
    assert_eq!(
        std::fs::read_link(format!("/proc/{third}/exe")).unwrap(),
        next,
        "the new binary serves"
    );
    check(
        "FUSE server upgraded",
        passes_then_take(&passes, &seen, 3).await,
        &mut report,
    );

    // 3. The mounter dies with its FUSE server (its container's death kills both): the plugin
    // starts a successor in its own process while the mounter is away...
    let mounter_pid = node.mounter.as_ref().unwrap().id();
    let plugin_pid = node.plugin.as_ref().unwrap().id();
    node.kill_mounter();
    kill(Pid::from_raw(third as i32), Signal::SIGKILL).unwrap();
    let fourth = wait_for("a successor in the plugin", Duration::from_secs(20), || {
        server_pid(&state).filter(|p| *p != third)
    })
    .await;
    assert_eq!(parent(fourth), plugin_pid, "the plugin hosts the successor");
    check(
        "mounter and FUSE server killed",
        passes_then_take(&passes, &seen, 3).await,
        &mut report,
    );
    // ... and hands it back once the mounter is back.
    node.start_mounter();
    let new_mounter = node.mounter.as_ref().unwrap().id();
    assert_ne!(new_mounter, mounter_pid);
    let fifth = wait_for("the mounter hosting again", Duration::from_secs(30), || {
        server_pid(&state).filter(|p| *p != fourth && parent(*p) == new_mounter)
    })
    .await;
    check(
        "mounter back, FUSE server handed back",
        passes_then_take(&passes, &seen, 3).await,
        &mut report,
    );

    // 4. The plugin is killed and started again: nothing moves.
    node.kill_plugin();
    check(
        "plugin killed",
        passes_then_take(&passes, &seen, 2).await,
        &mut report,
    );
    node.start_plugin();
    let _ = node.connect().await;
    check(
        "plugin back",
        passes_then_take(&passes, &seen, 2).await,
        &mut report,
    );
    assert_eq!(server_pid(&state), Some(fifth));

    // 5. A successor handed a connection that is not the one mounted (a stale copy from an
    // earlier mount at this path) refuses, before it asks anyone to hand over.
    let config = lakecache_csi_node::state::StateDir::open(&state)
        .unwrap()
        .fuse_config_path(VOLUME);
    let out = std::process::Command::new(BIN)
        .arg("fuse-server")
        .arg("--config")
        .arg(&config)
        .args(["--successor", "--connection", "1"])
        .stdin(std::fs::File::open("/dev/null").unwrap())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("is not the one mounted at"), "{said}");
    assert_eq!(
        server_pid(&state),
        Some(fifth),
        "the running server serves on"
    );
    check(
        "a stale connection refused",
        passes_then_take(&passes, &seen, 2).await,
        &mut report,
    );

    stop.store(true, Ordering::Release);
    t.join().unwrap();
    eprintln!("hand-off under a reader holding files open (0 failed reads):");
    for r in &report {
        eprintln!("  {r}");
    }
}
