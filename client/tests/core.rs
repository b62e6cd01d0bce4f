//! The reader and filesystem core against real workers over a local lake, without a mount.

use lakecache_e2e::kit::{self, pattern};
use std::sync::Arc;
use std::time::Duration;

use bytesize::ByteSize;
use lakecache_client::fs::ROOT_INO;
use lakecache_client::{FsConfig, FsCore, Membership, ReadError, Reader, ReaderConfig};
use lakecache_lake::{Kind, OpendalSource, Source, SourceSpec};
use lakecache_worker::Worker;
use lakecache_worker::config::WorkerConfig;
use lakecache_worker::store::TierKind;

const BS: u64 = 64 << 10;

struct Lake {
    dir: tempfile::TempDir,
    _tiers: Vec<tempfile::TempDir>,
    workers: Vec<Option<Worker>>,
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
        let source = SourceSpec::new(format!("file://{}", dir.path().display()));
        let cfg = worker_config(i, source, t.path());
        workers.push(Some(Worker::start(cfg).await.unwrap()));
        tiers.push(t);
    }
    Lake {
        dir,
        _tiers: tiers,
        workers,
    }
}

/// Worker `w<i>` over `source`, with a 64 MiB Disk tier in `tier`.
fn worker_config(i: usize, source: SourceSpec, tier: &std::path::Path) -> WorkerConfig {
    WorkerConfig {
        tiers: vec![kit::tier(TierKind::Disk, tier, ByteSize::mib(64))],
        token: Some("secret".into()),
        ..kit::worker_config(i, source, BS)
    }
}

/// A membership of `workers`, sending `token`.
fn membership<'a>(workers: impl Iterator<Item = &'a Worker>, token: &str) -> Arc<Membership> {
    kit::membership(workers.map(kit::member).collect(), Some(token))
}

fn reader(l: &Lake, token: &str, direct: bool) -> Arc<Reader> {
    let m = membership(l.workers.iter().flatten(), token);
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

/// A read that every worker refuses, when the token may rotate, is asked again after a pause of
/// at most a second until its deadline: workers that restart with the token the reader holds
/// serve it with no change on the reader's side. (Kubelet published the new token before the
/// workers rolled, and the FUSE server started with it, so it keeps no previous token.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_every_worker_refuses_goes_on_once_the_workers_take_its_token() {
    let mut l = lake(1).await;
    let restart = |l: &mut Lake, token: &str| {
        let old = l.workers[0].take().unwrap();
        let addr = old.addr;
        let mut cfg = worker_config(
            0,
            SourceSpec::new(format!("file://{}", l.dir.path().display())),
            l._tiers[0].path(),
        );
        cfg.listen = addr;
        cfg.token = Some(token.into());
        async move {
            old.stop().await;
            Worker::start(cfg).await.unwrap()
        }
    };
    let w = restart(&mut l, "old").await;
    l.workers[0] = Some(w);
    let r = reader(&l, "new", false);
    r.membership().expect_rotation();
    let cfg = ReaderConfig {
        read_timeout: Duration::from_secs(20),
        ..r.config().clone()
    };
    let r = Arc::new(Reader::new(cfg, r.membership().clone(), None));
    let started = std::time::Instant::now();
    let listing = tokio::spawn({
        let r = r.clone();
        async move { r.list("train").await }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!listing.is_finished(), "the refused listing waits");
    let w = restart(&mut l, "new").await;
    l.workers[0] = Some(w);
    let restarted = started.elapsed();
    let entries = listing.await.unwrap().unwrap();
    let took = started.elapsed();
    eprintln!(
        "refused listing answered {:?} after the worker restarted",
        took - restarted
    );
    assert!(entries.iter().any(|e| e.name == "big.rec"));
    assert!(
        took - restarted < Duration::from_secs(3),
        "the listing waited {:?} after the restart",
        took - restarted
    );
    // Without rotation a refusal fails at once.
    let plain = reader(&l, "wrong", false);
    let e = plain.list("train").await.unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn workers_serve_metrics_and_probes() {
    let l = lake(1).await;
    let fs = FsCore::new(reader(&l, "secret", false), FsConfig::default());
    let train = fs.lookup(ROOT_INO, "train").await.unwrap();
    let big = fs.lookup(train.ino, "big.rec").await.unwrap();
    read_all(&fs, big.ino, 1 << 20).await;
    let admin = l.workers[0].as_ref().unwrap().admin_addr;
    assert!(http_get(admin, "/livez").await.starts_with("HTTP/1.1 200"));
    assert!(http_get(admin, "/readyz").await.starts_with("HTTP/1.1 200"));
    let m = http_get(admin, "/metrics").await;
    for needle in [
        "lakecache_worker_block_misses_total 21",
        "lakecache_worker_source_requests_total 21",
        "lakecache_worker_served_bytes_total{tier=\"source\"} 1310737",
        "lakecache_worker_source_bytes_total 1310737",
        "lakecache_worker_block_seconds_bucket{",
        "lakecache_worker_tier_used_bytes{tier=\"disk\"} 1310737",
        "lakecache_worker_metadata_misses_total{op=\"list\"}",
    ] {
        assert!(m.contains(needle), "metrics lack {needle:?}:\n{m}");
    }
}

#[tokio::test]
async fn preload_loads_each_workers_share_and_reports_progress() {
    use lakecache_proto::lakecache::v1 as pb;
    let l = lake(2).await;
    let members: Vec<String> = l.workers.iter().flatten().map(|w| w.id.clone()).collect();
    let mut watches = Vec::new();
    for w in l.workers.iter().flatten() {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", w.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let token: tonic::metadata::MetadataValue<_> = "Bearer secret".parse().unwrap();
        let mut c = pb::cache_worker_client::CacheWorkerClient::with_interceptor(
            ch,
            move |mut r: tonic::Request<()>| {
                r.metadata_mut().insert("authorization", token.clone());
                Ok(r)
            },
        );
        let req = pb::StartPreloadRequest {
            id: "p1".into(),
            paths: vec!["train/*.rec".into(), "missing/**".into()],
            metadata_only: false,
            members: members.clone(),
        };
        let started = c.start_preload(req).await.unwrap().into_inner();
        assert_eq!(started.phase, pb::PreloadPhase::Running as i32);
        let bad = c
            .start_preload(pb::StartPreloadRequest {
                id: "p2".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        let stream = c
            .watch_preload(pb::WatchPreloadRequest { id: "p1".into() })
            .await
            .unwrap()
            .into_inner();
        watches.push(stream);
    }
    let mut bytes_done = 0;
    for mut stream in watches {
        let mut last = None;
        while let Some(s) = stream.message().await.unwrap() {
            last = Some(s);
        }
        let s = last.expect("a final status");
        // `missing/**` names nothing that exists: the preload reports it, by path.
        assert_eq!(s.phase, pb::PreloadPhase::Failed as i32, "{s:?}");
        assert_eq!(s.failures.len(), 1, "{s:?}");
        assert_eq!(s.failures[0].path, "missing/**");
        assert_eq!(s.files_total, 1, "`*` must not cross folders: {s:?}");
        assert_eq!(s.bytes_done, s.bytes_total);
        assert_eq!(
            s.matched_bytes,
            BS * 20 + 17,
            "every worker sees the whole match"
        );
        bytes_done += s.bytes_done;
    }
    assert_eq!(
        bytes_done,
        BS * 20 + 17,
        "the workers' shares do not add up to the file"
    );
    // Every block of the file is now where readers look: reading it goes to no source.
    let fs = FsCore::new(reader(&l, "secret", false), FsConfig::default());
    let train = fs.lookup(ROOT_INO, "train").await.unwrap();
    let big = fs.lookup(train.ino, "big.rec").await.unwrap();
    let before: u64 = l
        .workers
        .iter()
        .flatten()
        .map(|w| w.metrics.source_requests.get())
        .sum();
    assert_eq!(
        read_all(&fs, big.ino, 1 << 20).await.len() as u64,
        BS * 20 + 17
    );
    let after: u64 = l
        .workers
        .iter()
        .flatten()
        .map(|w| w.metrics.source_requests.get())
        .sum();
    assert_eq!(before, after, "reads after a preload went to the source");
}

#[tokio::test]
async fn concurrent_listings_of_one_directory_make_one_request() {
    let l = lake(2).await;
    let r = reader(&l, "secret", false);
    let all = futures::future::join_all((0..16).map(|_| r.list("train"))).await;
    for entries in all {
        let mut names: Vec<String> = entries.unwrap().iter().map(|e| e.name.clone()).collect();
        names.sort();
        assert_eq!(names, ["big.rec", "cats"]);
    }
    assert_eq!(r.metrics.listings.get(), 1);
    // Cached now: no further request.
    r.list("train").await.unwrap();
    assert_eq!(r.metrics.listings.get(), 1);
}

#[tokio::test]
async fn reading_a_directory_lists_its_subdirectories_ahead() {
    let l = lake(2).await;
    let fs = FsCore::new(reader(&l, "secret", false), FsConfig::default());
    fs.readdir(ROOT_INO, 0, true).await.unwrap();
    assert!(!fs.reader().has_listing("empty"), "a file is not listed");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !fs.reader().has_listing("train") {
        assert!(
            std::time::Instant::now() < deadline,
            "train/ was not listed ahead"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The walk's own listing of train/ is then free.
    let before = fs.reader().metrics.listings.get();
    fs.reader().list("train").await.unwrap();
    assert_eq!(fs.reader().metrics.listings.get(), before);
}

/// A flat directory of a million objects: listed in pages streamed by the worker, read by the
/// kernel's way of readdir (batches from an offset), and every file in it found and opened. The
/// reader holds the listing within its entry budget (about 150 bytes an entry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flat_directory_of_a_million_objects_lists_and_every_file_opens() {
    const N: usize = 1_000_000;
    let started = std::time::Instant::now();
    let source = Arc::new(OpendalSource::new(&SourceSpec::new("memory://")).unwrap());
    let name = |i: usize| format!("img-{i:07}.jpg");
    {
        let op = source.operator().clone();
        use futures::StreamExt;
        let mut puts = futures::stream::iter((0..N).map(|i| {
            let op = op.clone();
            let name = name(i);
            async move { op.write(&format!("flat/{name}"), name.into_bytes()).await }
        }))
        .buffer_unordered(64);
        while let Some(r) = puts.next().await {
            r.unwrap();
        }
    }
    eprintln!("{N} objects written in {:?}", started.elapsed());
    let mut workers = Vec::new();
    let mut tiers = Vec::new();
    for i in 0..2 {
        let t = tempfile::tempdir().unwrap();
        let cfg = worker_config(i, SourceSpec::new("memory://"), t.path());
        workers.push(
            Worker::start_with_source(cfg, source.clone())
                .await
                .unwrap(),
        );
        tiers.push(t);
    }
    let m = membership(workers.iter(), "secret");
    let cfg = ReaderConfig {
        block_size: BS,
        worker_timeout: Duration::from_secs(60),
        read_timeout: Duration::from_secs(120),
        metadata_ttl: None,
        direct_fallback: false,
    };
    let reader = Arc::new(Reader::new(cfg, m, None));
    let fs = FsCore::new(reader.clone(), FsConfig::default());
    let flat = fs.lookup(ROOT_INO, "flat").await.unwrap();
    // readdir as the kernel calls it: from the offset after the last entry it took.
    let t = std::time::Instant::now();
    let mut names = Vec::with_capacity(N);
    let mut offset = 0;
    loop {
        let batch = fs.readdir(flat.ino, offset, false).await.unwrap();
        let Some(last) = batch.last() else { break };
        assert!(batch.len() <= lakecache_client::fs::READDIR_BATCH);
        offset = last.0;
        names.extend(
            batch
                .into_iter()
                .filter(|(_, n, _)| n != "." && n != "..")
                .map(|(_, n, _)| n),
        );
    }
    eprintln!("listed {} entries in {:?}", names.len(), t.elapsed());
    assert_eq!(names.len(), N, "every object is listed once");
    assert_eq!(names[0], name(0));
    assert_eq!(names[N - 1], name(N - 1));
    assert_eq!(
        reader.metrics.listings.get(),
        2,
        "the root and the directory, once each"
    );
    assert_eq!(reader.listing_entries(), N + 1);
    eprintln!(
        "an entry is {} bytes in place plus its name and version on the heap",
        std::mem::size_of::<lakecache_lake::DirEntry>()
    );
    // Every file is found and opens; some are read.
    let t = std::time::Instant::now();
    for (i, n) in names.iter().enumerate() {
        let a = fs.lookup(flat.ino, n).await.unwrap();
        assert_eq!(a.size, n.len() as u64, "{n}");
        let fh = fs.open(a.ino).await.unwrap();
        if i % 50_000 == 0 {
            let data = fs.read(fh, 0, 4096).await.unwrap();
            assert_eq!(&data[..], n.as_bytes());
        }
        fs.release(fh);
        fs.forget(a.ino, 1);
    }
    eprintln!("looked up and opened {N} files in {:?}", t.elapsed());
    // The budget bounds what the reader holds: a smaller one keeps the newest listing only.
    let small = Arc::new(
        Reader::new(reader.config().clone(), reader.membership().clone(), None)
            .with_listing_budget(1000),
    );
    small.list("").await.unwrap();
    assert_eq!(small.listing_entries(), 1);
    small.list("flat").await.unwrap();
    assert_eq!(
        small.listing_entries(),
        N,
        "a listing past the budget is kept alone"
    );
    small.list("").await.unwrap();
    assert_eq!(
        small.listing_entries(),
        1,
        "and goes when another is needed"
    );
}

/// The blocks reads fetch are counted against the budget like read-ahead: many open files that
/// each read where they stand keep no more than the budget, and reads that find it spent still
/// get their bytes from the read reserve, which they give back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_fetched_for_reads_stay_within_the_budget() {
    use lakecache_client::prefetch::{FileReader, PrefetchBudget, READ_RESERVE};
    let l = lake(2).await;
    let r = reader(&l, "secret", false);
    let meta = r.stat("train/big.rec").await.unwrap();
    let want = pattern(2, (BS * 20 + 17) as usize);
    let budget = PrefetchBudget::new(2 * BS, 8);
    let files: Vec<FileReader> = (0..10)
        .map(|_| {
            FileReader::new(
                r.clone(),
                "train/big.rec".into(),
                meta.clone(),
                budget.clone(),
            )
        })
        .collect();
    // Each file reads a block somewhere else, as shuffled readers of one big file do.
    for (i, f) in files.iter().enumerate() {
        let off = i as u64 * 2 * BS;
        let b = f.read(off, BS as u32).await.unwrap();
        assert_eq!(&b[..], &want[off as usize..(off + BS) as usize], "file {i}");
    }
    let kept: usize = files.iter().map(|f| f.kept_blocks()).sum();
    assert!(kept <= 2, "{kept} blocks kept with a budget of 2");
    assert_eq!(
        budget.reserve_available(),
        READ_RESERVE,
        "the reserve was given back"
    );
    drop(files);
    assert_eq!(budget.available(), 2 * BS, "the budget was given back");
}
