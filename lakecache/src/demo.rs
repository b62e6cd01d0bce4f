//! `lakecache demo`: the embedded default. Makes a sample lake, puts it behind an emulated slow
//! link, runs `lakecache local` over it, and reads everything for two epochs with several
//! readers, as a training job would; prints epoch times, throughput and hit ratio.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytesize::ByteSize;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lakecache_client::metrics::OriginLabel;
use lakecache_lake::{OpendalSource, Source, SourceSpec, ThrottledSource};
use rand::SeedableRng;
use rand::seq::SliceRandom;

use crate::local::{self, LocalArgs};
use crate::sample::{self, SampleSpec};

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Working directory: the sample lake, the disk cache and the mount go under it.
    #[arg(
        long,
        env = "LAKECACHE_DEMO_DIR",
        default_value = "/tmp/lakecache-demo"
    )]
    pub dir: PathBuf,
    /// Number of image files (~110 KiB each).
    #[arg(long, env = "LAKECACHE_DEMO_IMAGES", default_value_t = 2000)]
    pub images: u64,
    /// Number of shards.
    #[arg(long, env = "LAKECACHE_DEMO_SHARDS", default_value_t = 2)]
    pub shards: u64,
    /// Size of one shard.
    #[arg(long, env = "LAKECACHE_DEMO_SHARD_SIZE", default_value = "128MiB")]
    pub shard_size: ByteSize,
    /// Parallel readers (DataLoader workers).
    #[arg(long, env = "LAKECACHE_DEMO_READERS", default_value_t = 8)]
    pub readers: usize,
    /// Cache workers.
    #[arg(long, env = "LAKECACHE_WORKERS", default_value_t = 3)]
    pub workers: usize,
    /// Epochs to read.
    #[arg(long, env = "LAKECACHE_DEMO_EPOCHS", default_value_t = 2)]
    pub epochs: usize,
    /// First-byte latency of the emulated lake link.
    #[arg(long, env = "LAKECACHE_DEMO_LATENCY", default_value = "20ms")]
    pub latency: humantime::Duration,
    /// Bandwidth of the emulated lake link, bytes per second.
    #[arg(long, env = "LAKECACHE_DEMO_BANDWIDTH", default_value = "125MB")]
    pub bandwidth: ByteSize,
    /// Memory tier over all workers.
    #[arg(long, env = "LAKECACHE_MEMORY", default_value = "1GiB")]
    pub memory: ByteSize,
    /// Hide the progress bar.
    #[arg(long, env = "LAKECACHE_DEMO_QUIET")]
    pub quiet: bool,
}

struct Epoch {
    seconds: f64,
    bytes: u64,
    files: u64,
    hit_ratio: f64,
}

fn origin_counts(l: &local::Local) -> (u64, u64) {
    let m = &l.reader.metrics;
    let get = |o: &str| {
        m.blocks
            .get_or_create(&OriginLabel { origin: o.into() })
            .get()
    };
    (get("memory") + get("disk"), get("source") + get("direct"))
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let spec = SampleSpec {
        images: args.images,
        classes: 100,
        image_size: 110 << 10,
        shards: args.shards,
        shard_size: args.shard_size.as_u64(),
    };
    let lake = args.dir.join("lake");
    let total: u64 = sample::files(&spec).iter().map(|f| f.1).sum();
    eprintln!(
        "lakecache demo: sample lake of {} images and {} shards ({}) in {}",
        args.images,
        args.shards,
        ByteSize::b(total),
        lake.display()
    );
    let spec2 = spec.clone();
    let lake2 = lake.clone();
    tokio::task::spawn_blocking(move || sample::generate(&lake2, &spec2)).await??;
    let uri = format!("file://{}", lake.display());
    let real: Arc<dyn Source> = Arc::new(OpendalSource::new(&SourceSpec::new(&uri))?);
    let source: Arc<dyn Source> = Arc::new(ThrottledSource::new(
        real,
        *args.latency,
        args.bandwidth.as_u64(),
    ));
    eprintln!("lake link: {}", source.describe());
    let mount = args.dir.join("mnt");
    let cache = args.dir.join("cache");
    let _ = std::fs::remove_dir_all(&cache);
    let largs = LocalArgs {
        source: uri,
        mount: mount.clone(),
        workers: args.workers,
        memory: args.memory,
        disk: Some(format!("{}:{}", cache.display(), ByteSize::gib(4))),
        block_size: ByteSize::mib(4),
        source_flags: Default::default(),
        metadata_ttl: Duration::ZERO.into(),
        prefetch_budget: ByteSize::mib(512),
        fuse_threads: 2,
        port: 0,
        local_cache: None,
        no_passthrough: false,
        preload: vec![],
    };
    let mut l = local::start(&largs, source).await?;
    let mut files: Vec<(String, u64)> = sample::files(&spec)
        .into_iter()
        .map(|(p, s, _)| (p, s))
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut epochs = Vec::new();
    for e in 1..=args.epochs {
        // A fresh mount per epoch: the kernel's page cache starts empty, so what is measured is
        // lakecache, not the kernel.
        l.mount(&largs, &mount)?;
        files.shuffle(&mut rng);
        let before = origin_counts(&l);
        let list_start = Instant::now();
        let listed = walk(&mount)?;
        let list_time = list_start.elapsed();
        anyhow::ensure!(
            listed == files.len(),
            "listed {listed} files, expected {}",
            files.len()
        );
        let ep = read_epoch(&mount, &files, args.readers, e, args.quiet).await?;
        let after = origin_counts(&l);
        let hits = after.0 - before.0;
        let misses = after.1 - before.1;
        let hit_ratio = if hits + misses == 0 {
            0.0
        } else {
            hits as f64 / (hits + misses) as f64
        };
        let ep = Epoch { hit_ratio, ..ep };
        println!(
            "epoch {e}: {:>6.2} s  {:>8.1} MB/s  {:>7.0} files/s  hit ratio {:.2}  (listing {} files took {:.2} s)",
            ep.seconds,
            ep.bytes as f64 / ep.seconds / 1e6,
            ep.files as f64 / ep.seconds,
            ep.hit_ratio,
            listed,
            list_time.as_secs_f64()
        );
        epochs.push(ep);
        l.unmount()?;
    }
    if epochs.len() >= 2 {
        println!(
            "epoch 2 vs epoch 1: {:.1}x faster",
            epochs[0].seconds / epochs[1].seconds.max(1e-9)
        );
    }
    l.stop().await?;
    Ok(())
}

fn walk(root: &std::path::Path) -> anyhow::Result<usize> {
    let mut n = 0;
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let e = e?;
            if e.file_type()?.is_dir() {
                dirs.push(e.path());
            } else {
                n += 1;
            }
        }
    }
    Ok(n)
}

async fn read_epoch(
    mount: &std::path::Path,
    files: &[(String, u64)],
    readers: usize,
    epoch: usize,
    quiet: bool,
) -> anyhow::Result<Epoch> {
    let total: u64 = files.iter().map(|f| f.1).sum();
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "epoch {msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(epoch.to_string());
    let files = Arc::new(files.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..readers.max(1) {
        let (files, next, bytes, bar) = (files.clone(), next.clone(), bytes.clone(), bar.clone());
        let mount = mount.to_path_buf();
        handles.push(tokio::task::spawn_blocking(
            move || -> anyhow::Result<()> {
                use std::io::Read;
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((path, size)) = files.get(i) else {
                        return Ok(());
                    };
                    let p = mount.join(path);
                    let mut f = std::fs::File::open(&p)
                        .with_context(|| format!("opening {}", p.display()))?;
                    let mut got = 0u64;
                    loop {
                        let n = f
                            .read(&mut buf)
                            .with_context(|| format!("reading {}", p.display()))?;
                        if n == 0 {
                            break;
                        }
                        got += n as u64;
                        bar.inc(n as u64);
                    }
                    anyhow::ensure!(
                        got == *size,
                        "{}: read {got} bytes, expected {size}",
                        p.display()
                    );
                    bytes.fetch_add(got, Ordering::Relaxed);
                }
            },
        ));
    }
    for h in handles {
        h.await??;
    }
    bar.finish_and_clear();
    Ok(Epoch {
        seconds: start.elapsed().as_secs_f64(),
        bytes: bytes.load(Ordering::Relaxed),
        files: files.len() as u64,
        hit_ratio: 0.0,
    })
}
