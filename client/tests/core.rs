//! The reader and filesystem core against real workers over a local lake, without a mount.

use std::sync::Arc;
use std::time::Duration;

use bytesize::ByteSize;
use lakecache_client::fs::ROOT_INO;
use lakecache_client::{FsConfig, FsCore, Member, Membership, ReadError, Reader, ReaderConfig};
use lakecache_lake::{Kind, OpendalSource, Source, SourceSpec};
use lakecache_worker::Worker;
use lakecache_worker::config::{TierConfig, WorkerConfig};
use lakecache_worker::meta::MetadataPolicy;
use lakecache_worker::store::TierKind;

const BS: u64 = 64 << 10;

struct Lake {
    dir: tempfile::TempDir,
    _tiers: Vec<tempfile::TempDir>,
    workers: Vec<Option<Worker>>,
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn lake(n: usize) -> Lake {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("train/cats")).unwrap();
    std::fs::write(dir.path().join("train/cats/a.jpg"), pattern(1, 1000)).unwrap();
    std::fs::write(
        dir.path().join("train/big.rec"),
        pattern(2, (BS * 20 + 17) as usize),
    )
    .unwrap();
    std::fs::write(dir.path().join("empty"), b"").unwrap();
    let mut tiers = Vec::new();
    let mut workers = Vec::new();
    for i in 0..n {
        let t = tempfile::tempdir().unwrap();
        let cfg = WorkerConfig {
            id: format!("w{i}"),
            source: SourceSpec::new(format!("file://{}", dir.path().display())),
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            block_size: ByteSize::b(BS),
            tiers: vec![TierConfig {
                kind: TierKind::Disk,
                path: Some(t.path().into()),
                size: ByteSize::mib(64),
            }],
            metadata: MetadataPolicy::Immutable,
            token_file: None,
            token: Some("secret".into()),
        };
        workers.push(Some(Worker::start(cfg).await.unwrap()));
        tiers.push(t);
    }
    Lake {
        dir,
        _tiers: tiers,
        workers,
    }
}

fn reader(l: &Lake, token: &str, direct: bool) -> Arc<Reader> {
    let m = Arc::new(Membership::new(Some(token), Duration::from_secs(1)).unwrap());
    m.set(
        l.workers
            .iter()
            .flatten()
            .map(|w| Member {
                id: w.id.clone(),
                endpoint: format!("http://{}", w.addr),
            })
            .collect(),
    )
    .unwrap();
    let source: Arc<dyn Source> = Arc::new(
        OpendalSource::new(&SourceSpec::new(format!(
            "file://{}",
            l.dir.path().display()
        )))
        .unwrap(),
    );
    let cfg = ReaderConfig {
        block_size: BS,
        worker_timeout: Duration::from_secs(2),
        read_timeout: Duration::from_secs(5),
        metadata_ttl: None,
        direct_fallback: direct,
    };
    Arc::new(Reader::new(cfg, m, Some(source)))
}

async fn read_all(fs: &FsCore, ino: u64, chunk: u32) -> Vec<u8> {
    let fh = fs.open(ino).await.unwrap();
    let mut out = Vec::new();
    loop {
        let b = fs.read(fh, out.len() as u64, chunk).await.unwrap();
        if b.is_empty() {
            break;
        }
        out.extend_from_slice(&b);
    }
    fs.release(fh);
    out
}

#[tokio::test]
async fn lookup_readdir_and_read_through_workers() {
    let l = lake(3).await;
    let fs = FsCore::new(reader(&l, "secret", false), FsConfig::default());
    let root = fs.readdir(ROOT_INO, 0, true).await.unwrap();
    let names: Vec<&str> = root.iter().map(|(_, n, _)| n.as_str()).collect();
    assert_eq!(names, [".", "..", "empty", "train"]);
    // Resuming from an offset returns the rest.
    let rest = fs.readdir(ROOT_INO, 3, false).await.unwrap();
    assert_eq!(
        rest.iter().map(|(_, n, _)| n.as_str()).collect::<Vec<_>>(),
        ["train"]
    );
    let train = fs.lookup(ROOT_INO, "train").await.unwrap();
    assert_eq!(train.kind, Kind::Directory);
    let big = fs.lookup(train.ino, "big.rec").await.unwrap();
    assert_eq!(big.size, BS * 20 + 17);
    let got = read_all(&fs, big.ino, 128 << 10).await;
    assert!(got == pattern(2, (BS * 20 + 17) as usize), "bytes differ");
    let empty = fs.lookup(ROOT_INO, "empty").await.unwrap();
    assert!(read_all(&fs, empty.ino, 4096).await.is_empty());
    assert!(matches!(
        fs.lookup(ROOT_INO, "nope").await,
        Err(ReadError::NotFound(_))
    ));
    assert_eq!(
        fs.lookup(train.ino, "nope").await.unwrap_err().errno(),
        libc::ENOENT
    );
    assert_eq!(fs.open(train.ino).await.unwrap_err().errno(), libc::EISDIR);
    // The whole file was served by workers, not directly.
    assert!(fs.reader().metrics.hit_ratio() >= 0.0);
    let direct =
        fs.reader()
            .metrics
            .blocks
            .get_or_create(&lakecache_client::metrics::OriginLabel {
                origin: "direct".into(),
            });
    assert_eq!(direct.get(), 0);
    // Forgetting every reference drops the inode.
    fs.forget(big.ino, 1);
    assert!(fs.getattr(big.ino).await.is_err());
}

#[tokio::test]
async fn prefetch_window_grows_on_sequential_reads_and_resets_on_seek() {
    let l = lake(2).await;
    let fs = FsCore::new(
        reader(&l, "secret", false),
        FsConfig {
            max_window_blocks: 8,
            ..FsConfig::default()
        },
    );
    let train = fs.lookup(ROOT_INO, "train").await.unwrap();
    let big = fs.lookup(train.ino, "big.rec").await.unwrap();
    let fh = fs.open(big.ino).await.unwrap();
    let mut off = 0;
    for _ in 0..5 {
        fs.read(fh, off, BS as u32).await.unwrap();
        off += BS;
    }
    let before = fs.prefetch_available();
    assert!(before < (512 << 20), "nothing was prefetched");
    // A seek far away collapses the window and frees the budget of blocks no longer needed.
    let b = fs.read(fh, BS * 15 + 3, 10).await.unwrap();
    assert_eq!(
        &b[..],
        &pattern(2, (BS * 20 + 17) as usize)[(BS * 15 + 3) as usize..(BS * 15 + 13) as usize]
    );
    assert!(
        fs.prefetch_available() > before,
        "seek did not release prefetched blocks"
    );
    fs.release(fh);
    assert_eq!(
        fs.prefetch_available(),
        512 << 20,
        "budget leaked after release"
    );
}

#[tokio::test]
async fn dead_worker_costs_speed_not_a_failed_read() {
    let mut l = lake(3).await;
    let r = reader(&l, "secret", false);
    let fs = FsCore::new(r.clone(), FsConfig::default());
    let train = fs.lookup(ROOT_INO, "train").await.unwrap();
    let big = fs.lookup(train.ino, "big.rec").await.unwrap();
    l.workers[1].take().unwrap().kill();
    let got = read_all(&fs, big.ino, 100_000).await;
    assert!(got == pattern(2, (BS * 20 + 17) as usize));
    assert!(r.metrics.failovers.get() > 0, "no failover happened");
}

#[tokio::test]
async fn no_workers_falls_back_to_the_source_or_fails_clearly() {
    let mut l = lake(1).await;
    l.workers[0].take().unwrap().kill();
    let fs = FsCore::new(reader(&l, "secret", true), FsConfig::default());
    let train = fs.lookup(ROOT_INO, "train").await.unwrap();
    let cats = fs.lookup(train.ino, "cats").await.unwrap();
    let a = fs.lookup(cats.ino, "a.jpg").await.unwrap();
    assert_eq!(read_all(&fs, a.ino, 4096).await, pattern(1, 1000));
    let fs = FsCore::new(reader(&l, "secret", false), FsConfig::default());
    let e = fs.lookup(ROOT_INO, "train").await.unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
}

#[tokio::test]
async fn wrong_token_is_refused() {
    let l = lake(1).await;
    let fs = FsCore::new(reader(&l, "not-the-token", false), FsConfig::default());
    let e = fs.lookup(ROOT_INO, "train").await.unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
}
