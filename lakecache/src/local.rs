//! `lakecache local`: N workers and the FUSE mount in one process.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytesize::ByteSize;
use clap::Args;
use lakecache_client::fuse::{self, Mount, MountConfig};
use lakecache_client::{
    FsConfig, FsCore, LocalBlocks, LocalFileCache, Member, Membership, ReadError, Reader,
    ReaderConfig,
};
use lakecache_lake::{OpendalSource, Source, SourceSpec};
use lakecache_worker::Worker;
use lakecache_worker::config::{TierConfig, WorkerConfig, parse_disk};
use lakecache_worker::meta::MetadataPolicy;
use lakecache_worker::store::TierKind;

#[derive(Debug, Clone, Args)]
pub struct LocalArgs {
    /// Source URI: s3://bucket/prefix, oss://bucket/prefix, gs://…, azblob://…,
    /// hdfs://namenode:8020/prefix, file:///path.
    #[arg(long, env = "LAKECACHE_SOURCE")]
    pub source: String,
    /// Where to mount the cache (a directory).
    #[arg(long, env = "LAKECACHE_MOUNT")]
    pub mount: PathBuf,
    /// Number of cache workers.
    #[arg(long, env = "LAKECACHE_WORKERS", default_value_t = 1)]
    pub workers: usize,
    /// Memory tier size over all workers (0 for none).
    #[arg(long, env = "LAKECACHE_MEMORY", default_value = "1GiB")]
    pub memory: ByteSize,
    /// Disk tier over all workers, as PATH:SIZE.
    #[arg(long, env = "LAKECACHE_DISK")]
    pub disk: Option<String>,
    /// Block size.
    #[arg(long, env = "LAKECACHE_BLOCK_SIZE", default_value = "4MiB")]
    pub block_size: ByteSize,
    #[command(flatten)]
    pub source_flags: lakecache_lake::SourceFlags,
    /// Metadata TTL; 0 means the data is immutable (cache metadata and pages for good).
    #[arg(long, env = "LAKECACHE_METADATA_TTL", default_value = "0s")]
    pub metadata_ttl: humantime::Duration,
    /// Read-ahead memory over all open files.
    #[arg(long, env = "LAKECACHE_PREFETCH_BUDGET", default_value = "512MiB")]
    pub prefetch_budget: ByteSize,
    /// Threads reading FUSE requests.
    #[arg(long, env = "LAKECACHE_FUSE_THREADS", default_value_t = 2)]
    pub fuse_threads: usize,
    /// First worker's gRPC port (0 picks free ports).
    #[arg(long, env = "LAKECACHE_PORT", default_value_t = 0)]
    pub port: u16,
    /// Keep whole files read through the cache in DIR/lakecache-local-v1 (made on first use;
    /// nothing else in DIR is touched), up to SIZE, as DIR:SIZE, and serve later opens from
    /// there, handed to the kernel with FUSE passthrough where it allows (Linux 6.9+). On a tmpfs
    /// such as /dev/shm, warm reads then run at memory speed. Copies left by an earlier run are
    /// served once their checksum is checked. Off by default: it keeps a second copy of what it
    /// holds.
    #[arg(long, env = "LAKECACHE_LOCAL_CACHE")]
    pub local_cache: Option<String>,
    /// Do not hand local copies to the kernel (read them through FUSE instead).
    #[arg(long, env = "LAKECACHE_NO_PASSTHROUGH")]
    pub no_passthrough: bool,
    /// Paths or globs (`train/**`) to load into the workers right after mounting; every worker
    /// loads its share in parallel, and the time and rate are printed. Repeat for several.
    #[arg(long = "preload", env = "LAKECACHE_PRELOAD", value_delimiter = ',')]
    pub preload: Vec<String>,
}

/// A running `lakecache local`.
pub struct Local {
    pub workers: Vec<Worker>,
    pub reader: Arc<Reader>,
    pub core: Arc<FsCore>,
    pub mount: Option<Mount>,
    memory_dirs: Vec<PathBuf>,
    pub local_cache: Option<Arc<LocalFileCache>>,
}

impl LocalArgs {
    pub fn source_spec(&self) -> anyhow::Result<SourceSpec> {
        let mut spec = SourceSpec::new(self.source.clone());
        self.source_flags.apply(&mut spec)?;
        Ok(spec)
    }
}

/// Starts the workers over `source`, and the reader (not yet mounted).
pub async fn start(args: &LocalArgs, source: Arc<dyn Source>) -> anyhow::Result<Local> {
    anyhow::ensure!(args.workers >= 1, "--workers must be at least 1");
    let spec = args.source_spec()?;
    let n = args.workers as u64;
    let disk = args.disk.as_deref().map(parse_disk).transpose()?;
    let ttl = *args.metadata_ttl;
    let metadata = if ttl.is_zero() {
        MetadataPolicy::Immutable
    } else {
        MetadataPolicy::Ttl { ttl }
    };
    for dir in lakecache_worker::store::remove_stale_memory_dirs() {
        eprintln!(
            "lakecache: removed {}, the memory tier of a process that is gone",
            dir.display()
        );
    }
    let mut workers = Vec::new();
    let mut memory_dirs = Vec::new();
    for i in 0..args.workers {
        let id = format!("local-{i}");
        let mut tiers = Vec::new();
        if args.memory.as_u64() > 0 {
            let dir = lakecache_worker::store::private_memory_dir(&id)
                .with_context(|| format!("making the memory tier of {id} in /dev/shm"))?;
            memory_dirs.push(dir.clone());
            tiers.push(TierConfig {
                kind: TierKind::Memory,
                path: Some(dir),
                size: ByteSize::b(args.memory.as_u64() / n),
            });
        }
        if let Some((path, size)) = &disk {
            tiers.push(TierConfig {
                kind: TierKind::Disk,
                path: Some(path.join(&id)),
                size: ByteSize::b(size.as_u64() / n),
            });
        }
        let port = if args.port == 0 {
            0
        } else {
            args.port + i as u16
        };
        let cfg = WorkerConfig {
            id: id.clone(),
            source: spec.clone(),
            listen: format!("127.0.0.1:{port}").parse()?,
            admin_listen: "127.0.0.1:0".parse()?,
            block_size: args.block_size,
            tiers,
            metadata,
            token_file: None,
            insecure_open_data_plane: false,
            token: None,
            limits: Default::default(),
        };
        let w = Worker::start_with_source(cfg, source.clone())
            .await
            .with_context(|| format!("starting worker {id}"))?;
        workers.push(w);
    }
    let membership = Arc::new(Membership::new(None, Duration::from_secs(2))?);
    membership.set(
        workers
            .iter()
            .map(|w| Member {
                id: w.id.clone(),
                endpoint: format!("http://{}", w.addr),
            })
            .collect(),
    )?;
    let reader_cfg = ReaderConfig {
        block_size: args.block_size.as_u64(),
        worker_timeout: spec.timeout + Duration::from_secs(5),
        read_timeout: spec.timeout * 2 + Duration::from_secs(5),
        metadata_ttl: (!ttl.is_zero()).then_some(ttl),
        direct_fallback: true,
    };
    let mut reader = Reader::new(reader_cfg, membership, Some(source));
    for w in &workers {
        reader = reader.with_local_worker(&w.id, Arc::new(InProcess(w.cache.clone())));
    }
    let reader = Arc::new(reader);
    let local_cache = match &args.local_cache {
        Some(v) => {
            let (dir, size) = parse_disk(v).context("--local-cache")?;
            Some(
                LocalFileCache::open(&dir, size.as_u64())
                    .with_context(|| format!("opening the local cache in {}", dir.display()))?,
            )
        }
        None => None,
    };
    let core = new_core(&reader, args, local_cache.as_ref());
    Ok(Local {
        workers,
        reader,
        core,
        mount: None,
        memory_dirs,
        local_cache,
    })
}

/// A worker of this process, read by a function call (see [`LocalBlocks`]).
struct InProcess(Arc<lakecache_worker::cache::BlockCache>);

impl LocalBlocks for InProcess {
    fn block(
        &self,
        key: lakecache_lake::BlockKey,
        object_size: u64,
    ) -> futures::future::BoxFuture<'static, Result<(bytes::Bytes, &'static str), ReadError>> {
        let cache = self.0.clone();
        Box::pin(async move {
            match cache.get(&key, object_size).await {
                Ok((b, origin)) => Ok((b, origin.label())),
                Err(lakecache_worker::cache::BlockError::Lake(e)) => Err(ReadError::from_lake(e)),
                Err(e) => Err(ReadError::Unavailable(e.to_string())),
            }
        })
    }
}

/// A fresh filesystem core over `reader`.
fn new_core(
    reader: &Arc<Reader>,
    args: &LocalArgs,
    local_cache: Option<&Arc<LocalFileCache>>,
) -> Arc<FsCore> {
    let core = FsCore::new(reader.clone(), fs_config(args, *args.metadata_ttl));
    Arc::new(match local_cache {
        Some(c) => core.with_local_cache(c.clone()),
        None => core,
    })
}

fn fs_config(args: &LocalArgs, ttl: Duration) -> FsConfig {
    FsConfig {
        attr_ttl: if ttl.is_zero() {
            Duration::from_secs(3600)
        } else {
            ttl
        },
        keep_cache: ttl.is_zero(),
        uid: 0,
        gid: 0,
        prefetch_budget: args.prefetch_budget.as_u64(),
        max_window_blocks: 16,
    }
}

/// What a preload did.
#[derive(Debug, Clone, Default)]
pub struct PreloadSummary {
    pub files: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub failures: Vec<String>,
}

impl Local {
    /// Loads `paths` into the workers: each loads the blocks it owns, all at once.
    pub async fn preload(&self, paths: &[String]) -> anyhow::Result<PreloadSummary> {
        use lakecache_proto::lakecache::v1 as pb;
        let start = std::time::Instant::now();
        let members: Vec<String> = self.workers.iter().map(|w| w.id.clone()).collect();
        let id = format!("local-{}", std::process::id());
        let conns = self.reader.membership().snapshot();
        let mut watches = vec![];
        for c in conns.iter() {
            let mut client = c.client.clone();
            client
                .start_preload(pb::StartPreloadRequest {
                    id: id.clone(),
                    paths: paths.to_vec(),
                    metadata_only: false,
                    members: members.clone(),
                })
                .await
                .with_context(|| format!("starting the preload on worker {}", c.member.id))?;
            let id = id.clone();
            watches.push(async move {
                let mut stream = client
                    .watch_preload(pb::WatchPreloadRequest { id })
                    .await?
                    .into_inner();
                let mut last = None;
                while let Some(s) = stream.message().await? {
                    last = Some(s);
                }
                Ok::<_, tonic::Status>(last)
            });
        }
        let mut out = PreloadSummary::default();
        for r in futures::future::join_all(watches).await {
            let Some(s) = r.context("following the preload")? else {
                continue;
            };
            out.files = out.files.max(s.files_done);
            out.bytes += s.bytes_done;
            for f in s.failures {
                let line = format!("{}: {}", f.path, f.reason);
                if !out.failures.contains(&line) {
                    out.failures.push(line);
                }
            }
        }
        out.seconds = start.elapsed().as_secs_f64();
        Ok(out)
    }

    /// Mounts at `at` (a fresh filesystem core, so the kernel's caches start empty).
    pub fn mount(&mut self, args: &LocalArgs, at: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(at).with_context(|| format!("creating {}", at.display()))?;
        self.core = new_core(&self.reader, args, self.local_cache.as_ref());
        let cfg = MountConfig {
            threads: args.fuse_threads,
            passthrough: !args.no_passthrough,
            handoff: false,
            ..MountConfig::default()
        };
        let m = fuse::mount(
            self.core.clone(),
            at,
            &cfg,
            tokio::runtime::Handle::current(),
        )
        .with_context(|| {
            format!(
                "mounting at {} (is fuse3 installed and /dev/fuse usable?)",
                at.display()
            )
        })?;
        self.mount = Some(m);
        Ok(())
    }

    pub fn unmount(&mut self) -> anyhow::Result<()> {
        if let Some(m) = self.mount.take() {
            let at = m.mountpoint.clone();
            m.unmount()
                .with_context(|| format!("unmounting {}", at.display()))?;
        }
        Ok(())
    }

    /// Resolves when the mount is gone without us (unmounted from outside).
    async fn mount_ended(&self) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            if self.mount.as_ref().is_none_or(|m| m.is_finished()) {
                return;
            }
        }
    }

    /// Unmounts, stops the workers, and frees their memory tiers.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.unmount()?;
        for w in self.workers.drain(..) {
            w.stop().await;
        }
        for d in &self.memory_dirs {
            let _ = std::fs::remove_dir_all(d);
        }
        Ok(())
    }
}

/// Runs `lakecache local` until SIGINT or SIGTERM.
pub async fn run(args: LocalArgs) -> anyhow::Result<()> {
    let spec = args.source_spec()?;
    let source: Arc<dyn Source> = Arc::new(OpendalSource::new(&spec)?);
    // Fail early and clearly if the source cannot be listed.
    source
        .list("")
        .await
        .with_context(|| format!("listing {}", spec.redacted()))?;
    let mut local = start(&args, source).await?;
    local.mount(&args, &args.mount)?;
    eprintln!(
        "lakecache: {} mounted read-only at {} with {} worker(s); Ctrl-C to unmount",
        spec.redacted(),
        args.mount.display(),
        args.workers
    );
    if !args.preload.is_empty() {
        tokio::select! {
            r = local.preload(&args.preload) => {
                let s = r?;
                eprintln!(
                    "lakecache: preloaded {} files, {} bytes in {:.2} s ({:.1} MB/s){}",
                    s.files,
                    s.bytes,
                    s.seconds,
                    s.bytes as f64 / s.seconds.max(1e-9) / 1e6,
                    if s.failures.is_empty() { String::new() } else { format!("; {} failed: {}", s.failures.len(), s.failures.join("; ")) }
                );
            }
            _ = lakecache_telemetry::shutdown_signal() => {
                local.stop().await?;
                return Ok(());
            }
        }
    }
    tokio::select! {
        _ = lakecache_telemetry::shutdown_signal() => {}
        _ = local.mount_ended() => {
            eprintln!("lakecache: {} was unmounted from outside; stopping", args.mount.display());
        }
    }
    local.stop().await?;
    eprintln!("lakecache: unmounted {}", args.mount.display());
    Ok(())
}
