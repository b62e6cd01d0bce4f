//! N real workers and a real FUSE mount over one source.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytesize::ByteSize;
use lakecache_client::fuse::{self, Mount, MountConfig};
use lakecache_client::{FsConfig, FsCore, Membership, Reader, ReaderConfig};
use lakecache_lake::{OpendalSource, Source, SourceSpec};
use lakecache_worker::Worker;
use lakecache_worker::config::WorkerConfig;
use lakecache_worker::store::TierKind;

use crate::kit;

#[derive(Debug, Clone)]
pub struct StackConfig {
    pub workers: usize,
    pub block_size: u64,
    /// Memory tier per worker (0 for none).
    pub memory: u64,
    /// Disk tier per worker (0 for none).
    pub disk: u64,
    pub worker_timeout: Duration,
    pub read_timeout: Duration,
    pub direct_fallback: bool,
}

impl Default for StackConfig {
    fn default() -> Self {
        Self {
            workers: 3,
            block_size: 64 << 10,
            memory: 32 << 20,
            disk: 256 << 20,
            worker_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(20),
            direct_fallback: true,
        }
    }
}

pub struct Stack {
    pub cfg: StackConfig,
    pub spec: SourceSpec,
    pub workers: Vec<Option<Worker>>,
    pub reader: Arc<Reader>,
    pub core: Arc<FsCore>,
    mount: Option<Mount>,
    pub mountpoint: PathBuf,
    /// Per-worker tier directories: (memory, disk).
    pub dirs: Vec<(PathBuf, PathBuf)>,
    _tmp: tempfile::TempDir,
    _shm: tempfile::TempDir,
}

const TOKEN: &str = "e2e-token";

impl Stack {
    pub async fn start(spec: SourceSpec, cfg: StackConfig) -> anyhow::Result<Self> {
        let tmp = tempfile::tempdir()?;
        let shm = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir())?;
        let mut workers = Vec::new();
        let mut dirs = Vec::new();
        for i in 0..cfg.workers {
            let d = (
                shm.path().join(format!("w{i}")),
                tmp.path().join(format!("disk-w{i}")),
            );
            workers.push(Some(start_worker(&spec, &cfg, i, &d, 0).await?));
            dirs.push(d);
        }
        let membership = Arc::new(Membership::new(Some(TOKEN), Duration::from_secs(1))?);
        let source: Arc<dyn Source> = Arc::new(OpendalSource::new(&spec)?);
        let reader = Arc::new(Reader::new(
            ReaderConfig {
                block_size: cfg.block_size,
                worker_timeout: cfg.worker_timeout,
                read_timeout: cfg.read_timeout,
                metadata_ttl: None,
                direct_fallback: cfg.direct_fallback,
            },
            membership,
            Some(source),
        ));
        let mountpoint = tmp.path().join("mnt");
        std::fs::create_dir_all(&mountpoint)?;
        let core = Arc::new(FsCore::new(reader.clone(), FsConfig::default()));
        let mut stack = Self {
            cfg,
            spec,
            workers,
            reader,
            core,
            mount: None,
            mountpoint,
            dirs,
            _tmp: tmp,
            _shm: shm,
        };
        stack.publish()?;
        stack.remount()?;
        Ok(stack)
    }

    /// Publishes the running workers to the reader.
    pub fn publish(&self) -> anyhow::Result<()> {
        self.reader
            .membership()
            .set(self.workers.iter().flatten().map(kit::member).collect())?;
        Ok(())
    }

    /// Unmounts (if mounted) and mounts again with a fresh filesystem core, so the kernel's page
    /// cache and the core's open files start empty; the reader's metadata cache is kept.
    pub fn remount(&mut self) -> anyhow::Result<()> {
        if let Some(m) = self.mount.take() {
            m.unmount()?;
        }
        self.core = Arc::new(FsCore::new(self.reader.clone(), FsConfig::default()));
        let cfg = MountConfig {
            threads: 2,
            ..MountConfig::default()
        };
        let m = fuse::mount(
            self.core.clone(),
            &self.mountpoint,
            &cfg,
            tokio::runtime::Handle::current(),
        )
        .context("mounting FUSE (needs /dev/fuse and fuse3)")?;
        self.mount = Some(m);
        Ok(())
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mountpoint.join(rel)
    }

    /// Kills worker `i` as a crash would; it stays in the membership (briefly down).
    pub fn kill_worker(&mut self, i: usize) {
        if let Some(w) = self.workers[i].take() {
            w.kill();
        }
    }

    /// Starts worker `i` again over the same tier directories, on the same port if `same_port`.
    pub async fn restart_worker(&mut self, i: usize, port: u16) -> anyhow::Result<()> {
        if let Some(w) = self.workers[i].take() {
            w.stop().await;
        }
        self.workers[i] = Some(start_worker(&self.spec, &self.cfg, i, &self.dirs[i], port).await?);
        self.publish()
    }

    pub fn worker(&self, i: usize) -> &Worker {
        self.workers[i].as_ref().expect("worker is running")
    }
}

async fn start_worker(
    spec: &SourceSpec,
    cfg: &StackConfig,
    i: usize,
    dirs: &(PathBuf, PathBuf),
    port: u16,
) -> anyhow::Result<Worker> {
    let mut tiers = Vec::new();
    if cfg.memory > 0 {
        tiers.push(kit::tier(
            TierKind::Memory,
            &dirs.0,
            ByteSize::b(cfg.memory),
        ));
    }
    if cfg.disk > 0 {
        tiers.push(kit::tier(TierKind::Disk, &dirs.1, ByteSize::b(cfg.disk)));
    }
    let wc = WorkerConfig {
        listen: format!("127.0.0.1:{port}").parse()?,
        tiers,
        token: Some(TOKEN.into()),
        ..kit::worker_config(i, spec.clone(), cfg.block_size)
    };
    Ok(Worker::start(wc).await?)
}

/// Every regular file under `root`, as relative paths, sorted.
pub fn walk(root: &Path) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let e = e?;
            let p = e.path();
            if e.file_type()?.is_dir() {
                dirs.push(p);
            } else {
                out.push(p.strip_prefix(root)?.to_string_lossy().to_string());
            }
        }
    }
    out.sort();
    Ok(out)
}
