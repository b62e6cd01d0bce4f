//! The data plane end to end: a real S3-compatible server, real workers, a real FUSE mount.
//! Every test compares bytes read through the mount with the bytes put into the bucket.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lakecache_e2e::stack::walk;
use lakecache_e2e::{Proxy, S3Server, Stack, StackConfig, pattern};
use rand::{Rng, SeedableRng};

const BS: usize = 64 << 10;

/// The test dataset: edge sizes, many small files, awkward names, deep folders.
fn dataset() -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let sizes = [0, 1, BS - 1, BS, BS + 1, 5 * BS + 3];
    for (i, s) in sizes.iter().enumerate() {
        files.insert(format!("sizes/file-{s}.bin"), pattern(i as u64, *s));
    }
    for i in 0..2000u64 {
        let size = 1 + (i as usize * 7919) % 6000;
        files.insert(
            format!("small/c{:02}/s{i:05}.jpg", i % 20),
            pattern(100 + i, size),
        );
    }
    files.insert("names/with space/a file.txt".into(), pattern(3000, 100));
    files.insert(
        "names/naïve café/日本語 データ.bin".into(),
        pattern(3001, 70_000),
    );
    files.insert("names/emoji-🦀.dat".into(), pattern(3002, 10));
    files.insert(
        "deep/a/b/c/d/e/f/g/h/i/j/leaf.bin".into(),
        pattern(3003, 3 * BS + 11),
    );
    files.insert("shards/shard-0.rec".into(), pattern(4000, 40 * BS + 123));
    files
}

fn check_all(stack: &Stack, files: &BTreeMap<String, Vec<u8>>) -> anyhow::Result<()> {
    let listed = walk(&stack.mountpoint)?;
    let expected: Vec<String> = files.keys().cloned().collect();
    assert_eq!(
        listed, expected,
        "the mount lists other files than the bucket holds"
    );
    for (path, data) in files {
        let got = std::fs::read(stack.path(path))?;
        assert!(
            got == *data,
            "{path}: bytes differ ({} read, {} expected)",
            got.len(),
            data.len()
        );
        let meta = std::fs::metadata(stack.path(path))?;
        assert_eq!(meta.len(), data.len() as u64, "{path}: size");
    }
    Ok(())
}

async fn server_with(files: &BTreeMap<String, Vec<u8>>, bucket: &str) -> S3Server {
    lakecache_e2e::init_logging();
    let s3 = S3Server::start().expect("S3 server");
    let list: Vec<(String, Vec<u8>)> = files.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    s3.create_bucket(bucket, &list).await.expect("upload");
    s3
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_byte_through_one_two_and_three_workers() -> anyhow::Result<()> {
    let files = dataset();
    let s3 = server_with(&files, "lake").await;
    for workers in 1..=3 {
        let cfg = StackConfig {
            workers,
            ..StackConfig::default()
        };
        let stack = Stack::start(s3.spec("lake", None), cfg).await?;
        let started = Instant::now();
        check_all(&stack, &files)?;
        eprintln!(
            "{workers} worker(s): every byte checked in {:?}",
            started.elapsed()
        );
        // Every worker served blocks: placement spreads them.
        for w in stack.workers.iter().flatten() {
            let served: u64 = ["memory", "disk", "source"]
                .iter()
                .map(|t| {
                    w.metrics
                        .bytes_served
                        .get_or_create(&w.metrics.tier(t))
                        .get()
                })
                .sum();
            assert!(served > 0, "worker {} served nothing", w.id);
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_stopped_mid_read_fails_no_read() -> anyhow::Result<()> {
    let mut files = BTreeMap::new();
    for i in 0..4u64 {
        files.insert(format!("big/part-{i}.rec"), pattern(50 + i, 120 * BS + 7));
    }
    let s3 = server_with(&files, "lake").await;
    let mut stack = Stack::start(s3.spec("lake", None), StackConfig::default()).await?;
    let files = Arc::new(files);
    let mut readers = Vec::new();
    for (path, data) in files.iter() {
        let p = stack.path(path);
        let data = data.clone();
        readers.push(std::thread::spawn(move || -> anyhow::Result<()> {
            let mut f = std::fs::File::open(&p)?;
            let mut got = Vec::new();
            let mut buf = vec![0u8; 32 << 10];
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                // Slow readers (at least 240 ms a file), so the kill at 150 ms lands mid-read.
                std::thread::sleep(Duration::from_millis(1));
            }
            anyhow::ensure!(got == data, "{}: bytes differ", p.display());
            Ok(())
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    stack.kill_worker(1);
    for r in readers {
        r.join().expect("reader thread")?;
    }
    assert!(
        stack.reader.metrics.failovers.get() > 0,
        "the kill did not land mid-read"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarted_worker_keeps_its_disk_tier_and_bad_blocks_never_reach_readers()
-> anyhow::Result<()> {
    let mut files = BTreeMap::new();
    files.insert("data/a.bin".to_string(), pattern(7, 30 * BS + 5));
    let s3 = server_with(&files, "lake").await;
    // One worker, Disk tier only: every block is checked on read.
    let cfg = StackConfig {
        workers: 1,
        memory: 0,
        ..StackConfig::default()
    };
    let mut stack = Stack::start(s3.spec("lake", None), cfg).await?;
    assert!(std::fs::read(stack.path("data/a.bin"))? == files["data/a.bin"]);
    let port = stack.worker(0).addr.port();
    stack.restart_worker(0, port).await?;
    stack.remount()?;
    assert!(std::fs::read(stack.path("data/a.bin"))? == files["data/a.bin"]);
    let m = &stack.worker(0).metrics;
    assert_eq!(
        m.source_requests.get(),
        0,
        "restarted worker went to the source"
    );
    let disk_hits = m.hits.get_or_create(&m.tier("disk")).get();
    assert!(
        disk_hits >= 31,
        "only {disk_hits} of 31 block requests hit the disk tier"
    );

    // Corrupt three block files on disk.
    let disk = &stack.dirs[0].1;
    let mut blocks: Vec<_> = std::fs::read_dir(disk)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "blk"))
        .collect();
    blocks.sort();
    assert_eq!(blocks.len(), 31);
    for b in blocks.iter().take(3) {
        let mut data = std::fs::read(b)?;
        data[100] ^= 0x55;
        std::fs::write(b, data)?;
    }
    stack.remount()?;
    assert!(
        std::fs::read(stack.path("data/a.bin"))? == files["data/a.bin"],
        "corrupt bytes reached the reader"
    );
    let m = &stack.worker(0).metrics;
    assert_eq!(m.corrupt_blocks.get(), 3);
    assert_eq!(
        m.source_requests.get(),
        3,
        "bad blocks were not fetched again"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreachable_lake_cached_data_reads_uncached_fails_in_bounded_time() -> anyhow::Result<()> {
    let mut files = BTreeMap::new();
    files.insert("d/cached.bin".to_string(), pattern(8, 10 * BS + 1));
    files.insert("d/uncached.bin".to_string(), pattern(9, 10 * BS + 1));
    let s3 = server_with(&files, "lake").await;
    let proxy = Proxy::start(s3.port).await?;
    let mut spec = s3.spec("lake", Some(&proxy.endpoint()));
    spec.timeout = Duration::from_secs(2);
    spec.retries = 1;
    let cfg = StackConfig {
        workers: 2,
        worker_timeout: Duration::from_secs(4),
        read_timeout: Duration::from_secs(6),
        ..StackConfig::default()
    };
    let mut stack = Stack::start(spec, cfg).await?;
    assert!(std::fs::read(stack.path("d/cached.bin"))? == files["d/cached.bin"]);
    proxy.set_blackhole(true);
    stack.remount()?;
    assert!(
        std::fs::read(stack.path("d/cached.bin"))? == files["d/cached.bin"],
        "cached data lost"
    );
    let started = Instant::now();
    let err =
        std::fs::read(stack.path("d/uncached.bin")).expect_err("read of uncached data succeeded");
    let took = started.elapsed();
    assert_eq!(
        err.raw_os_error(),
        Some(libc_eio()),
        "expected EIO, got {err}"
    );
    assert!(
        took < Duration::from_secs(10),
        "uncached read took {took:?}"
    );
    eprintln!("uncached read failed with EIO after {took:?}");
    // Once the lake is back, the same read works.
    proxy.set_blackhole(false);
    stack.remount()?;
    assert!(std::fs::read(stack.path("d/uncached.bin"))? == files["d/uncached.bin"]);
    Ok(())
}

fn libc_eio() -> i32 {
    5
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_threads_random_and_whole_reads() -> anyhow::Result<()> {
    let mut files = BTreeMap::new();
    for i in 0..6u64 {
        files.insert(
            format!("shards/s{i}.rec"),
            pattern(200 + i, 25 * BS + (i as usize) * 977),
        );
    }
    for i in 0..200u64 {
        files.insert(
            format!("img/{i:04}.jpg"),
            pattern(300 + i, 500 + (i as usize * 4099) % (2 * BS)),
        );
    }
    let s3 = server_with(&files, "lake").await;
    let stack = Stack::start(s3.spec("lake", None), StackConfig::default()).await?;
    let files = Arc::new(files);
    let names: Arc<Vec<String>> = Arc::new(files.keys().cloned().collect());
    let mut threads = Vec::new();
    for t in 0..16u64 {
        let (files, names) = (files.clone(), names.clone());
        let root = stack.mountpoint.clone();
        threads.push(std::thread::spawn(move || -> anyhow::Result<u64> {
            let mut rng = rand::rngs::StdRng::seed_from_u64(t);
            let mut checked = 0u64;
            for _ in 0..60 {
                let name = &names[rng.random_range(0..names.len())];
                let data = &files[name];
                let mut f = std::fs::File::open(root.join(name))?;
                if t % 2 == 0 || data.is_empty() {
                    let mut got = Vec::new();
                    f.read_to_end(&mut got)?;
                    anyhow::ensure!(got == *data, "{name}: whole-file bytes differ");
                    checked += got.len() as u64;
                } else {
                    for _ in 0..8 {
                        let off = rng.random_range(0..data.len());
                        let len = rng.random_range(1..=(200_000).min(data.len() - off));
                        f.seek(SeekFrom::Start(off as u64))?;
                        let mut got = vec![0u8; len];
                        f.read_exact(&mut got)?;
                        anyhow::ensure!(
                            got[..] == data[off..off + len],
                            "{name}@{off}+{len}: bytes differ"
                        );
                        checked += len as u64;
                    }
                }
            }
            Ok(checked)
        }));
    }
    let mut total = 0;
    for t in threads {
        total += t.join().expect("reader thread")?;
    }
    eprintln!("16 threads checked {total} bytes");
    assert!(total > 0);
    Ok(())
}
