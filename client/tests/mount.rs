//! The node-local copy and FUSE passthrough through a real mount: a file read once through the
//! cache is kept whole on local storage; later opens are handed to the kernel (or, without
//! passthrough, read from the copy through FUSE), byte for byte the same; an inode that is open
//! the ordinary way is never opened with passthrough at the same time (the kernel would fail
//! that open with EIO).

use lakecache_e2e::kit::{self, pattern};
use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytesize::ByteSize;
use lakecache_client::fuse::{self, MountConfig};
use lakecache_client::{FsConfig, FsCore, LocalFileCache, Reader, ReaderConfig};
use lakecache_lake::SourceSpec;
use lakecache_worker::Worker;
use lakecache_worker::config::WorkerConfig;
use lakecache_worker::store::TierKind;

const BS: u64 = 256 << 10;

struct Setup {
    _lake: tempfile::TempDir,
    _tiers: tempfile::TempDir,
    _workers: Vec<Worker>,
    mnt: tempfile::TempDir,
    core: Arc<FsCore>,
    cache: Arc<LocalFileCache>,
    _cache_dir: tempfile::TempDir,
    mount: Option<fuse::Mount>,
    files: Vec<(String, Vec<u8>)>,
}

async fn setup(passthrough: bool) -> Setup {
    let lake = tempfile::tempdir().unwrap();
    let files = vec![
        ("shard.rec".to_string(), pattern(1, (BS * 5 + 123) as usize)),
        ("img.jpg".to_string(), pattern(2, 50_000)),
    ];
    for (p, d) in &files {
        std::fs::write(lake.path().join(p), d).unwrap();
    }
    let tiers = tempfile::tempdir().unwrap();
    let mut workers = vec![];
    for i in 0..2 {
        let source = SourceSpec::new(format!("file://{}", lake.path().display()));
        let tier = tiers.path().join(format!("w{i}"));
        let cfg = WorkerConfig {
            tiers: vec![kit::tier(TierKind::Disk, &tier, ByteSize::mib(64))],
            ..kit::worker_config(i, source, BS)
        };
        workers.push(Worker::start(cfg).await.unwrap());
    }
    let m = kit::membership(workers.iter().map(kit::member).collect(), None);
    let reader = Arc::new(Reader::new(
        ReaderConfig {
            block_size: BS,
            worker_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(10),
            metadata_ttl: None,
            direct_fallback: false,
        },
        m,
        None,
    ));
    // The local copies live on tmpfs, as they would on a node.
    let cache_dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let cache = LocalFileCache::open(cache_dir.path(), 64 << 20).unwrap();
    let core = Arc::new(FsCore::new(reader, FsConfig::default()).with_local_cache(cache.clone()));
    let mnt = tempfile::tempdir().unwrap();
    let cfg = MountConfig {
        allow_other: false,
        threads: 2,
        passthrough,
        handoff: false,
        ..MountConfig::default()
    };
    let mount = fuse::mount(
        core.clone(),
        mnt.path(),
        &cfg,
        tokio::runtime::Handle::current(),
    )
    .unwrap();
    Setup {
        _lake: lake,
        _tiers: tiers,
        _workers: workers,
        mnt,
        core,
        cache,
        _cache_dir: cache_dir,
        mount: Some(mount),
        files,
    }
}

async fn read(path: &Path) -> Vec<u8> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::read(&p).unwrap())
        .await
        .unwrap()
}

async fn wait_complete(s: &Setup, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.cache.stats().files < n {
        assert!(
            Instant::now() < deadline,
            "the local copies were not completed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn metric(s: &Setup, name: &str) -> u64 {
    let m = &s.core.reader().metrics;
    match name {
        "local" => m.local_opens.get(),
        _ => m.passthrough_opens.get(),
    }
}

fn kernel_has_passthrough() -> bool {
    // FUSE passthrough came with Linux 6.9.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut it = release.trim().split(['.', '-']);
    let major: u32 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    let minor: u32 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    (major, minor) >= (6, 9)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn warm_opens_are_handed_to_the_kernel_with_the_same_bytes() {
    let mut s = setup(true).await;
    for (p, d) in &s.files {
        assert!(
            read(&s.mnt.path().join(p)).await == *d,
            "{p} differs (cold)"
        );
    }
    wait_complete(&s, 2).await;
    for (p, d) in &s.files {
        assert!(
            read(&s.mnt.path().join(p)).await == *d,
            "{p} differs (warm)"
        );
    }
    assert_eq!(
        metric(&s, "local"),
        2,
        "both warm opens come from the local copies"
    );
    if kernel_has_passthrough() {
        assert_eq!(
            metric(&s, "passthrough"),
            2,
            "both were handed to the kernel"
        );
    }
    s.mount.take().unwrap().unmount().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_inode_open_the_ordinary_way_is_not_also_opened_with_passthrough() {
    let mut s = setup(true).await;
    let (p, d) = s.files[0].clone();
    let path = s.mnt.path().join(&p);
    // Held open the ordinary way while its local copy completes.
    let path2 = path.clone();
    let held = tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::open(&path2).unwrap();
        let mut v = vec![];
        f.read_to_end(&mut v).unwrap();
        (f, v)
    })
    .await
    .unwrap();
    assert!(held.1 == d);
    wait_complete(&s, 1).await;
    // A second open now must not be passthrough (the kernel would answer EIO).
    assert!(read(&path).await == d, "the second open failed or differs");
    assert_eq!(metric(&s, "passthrough"), 0);
    drop(held);
    // Once released, the next open may be handed to the kernel.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(read(&path).await == d);
    if kernel_has_passthrough() {
        assert_eq!(metric(&s, "passthrough"), 1);
    }
    s.mount.take().unwrap().unmount().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_passthrough_local_copies_are_read_through_fuse() {
    let mut s = setup(false).await;
    for (p, d) in &s.files {
        assert!(read(&s.mnt.path().join(p)).await == *d);
    }
    wait_complete(&s, 2).await;
    // A fresh core: the kernel page cache of the FUSE inodes is gone with the old mount.
    s.mount.take().unwrap().unmount().unwrap();
    let cfg = MountConfig {
        allow_other: false,
        passthrough: false,
        handoff: false,
        ..MountConfig::default()
    };
    let core = Arc::new(
        FsCore::new(s.core.reader().clone(), FsConfig::default()).with_local_cache(s.cache.clone()),
    );
    let m = fuse::mount(
        core.clone(),
        s.mnt.path(),
        &cfg,
        tokio::runtime::Handle::current(),
    )
    .unwrap();
    for (p, d) in &s.files {
        assert!(
            read(&s.mnt.path().join(p)).await == *d,
            "{p} differs from its local copy"
        );
    }
    assert_eq!(core.reader().metrics.passthrough_opens.get(), 0);
    assert!(core.reader().metrics.local_opens.get() >= 2);
    m.unmount().unwrap();
}
