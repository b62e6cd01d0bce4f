//! Starting and stopping each system under test over the same bucket and link.
//!
//! Each start is fresh: an empty cache directory, a new process, a new mount. What each peer is
//! given follows its own documentation for read-heavy, immutable data (see `bench/README.md`
//! for the reasons); lakecache gets its defaults plus the tier sizes of the run.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::janitor::{Guard, Janitor};
use crate::net::{self, ACCESS_KEY, BUCKET, REGION, SECRET_KEY};
use crate::plan::{CsiTransport, SystemKind};
use crate::proc::{self, Proc, ProcStats};
use crate::readers::{Access, Measured};
use crate::s3::Direct;

/// Binaries of the systems under test.
#[derive(Debug, Clone)]
pub struct SystemBins {
    pub lakecache: PathBuf,
    pub rclone: PathBuf,
    pub s3fs: PathBuf,
    pub bindfs: PathBuf,
}

/// A cache's size for one start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSize {
    pub memory: u64,
    pub disk: u64,
}

impl CacheSize {
    pub fn total(&self) -> u64 {
        self.memory + self.disk
    }
}

/// What every start needs.
pub struct Env {
    pub janitor: Arc<Janitor>,
    pub bins: SystemBins,
    pub endpoint: String,
    pub work: PathBuf,
    pub logs: PathBuf,
    pub direct: Arc<Direct>,
    /// The tmpfs copy of the dataset (filled before tmpfs or fuse-copy start).
    pub ceiling: PathBuf,
    /// Starts so far: names each start's directories and logs.
    pub starts: AtomicU32,
}

impl Env {
    fn next_start(&self) -> u32 {
        self.starts.fetch_add(1, Ordering::Relaxed)
    }
}

/// A started system.
pub struct Running {
    pub kind: SystemKind,
    pub access: Access,
    /// The cache process, if the system has one (the FUSE server where there are several): the
    /// reader, whose CPU per GB the rows show apart.
    pub proc: Option<Proc>,
    /// Its other processes (separate workers), counted with it in CPU and memory; their CPU
    /// per GB is the rows' worker figure.
    helpers: Vec<Proc>,
    /// lakecache workers' admin addresses (`/metrics`).
    pub admin: Vec<SocketAddr>,
    pub settings: String,
    mount: Option<PathBuf>,
    // Dropped after `proc`: unmount what is left, remove cache directories.
    _guards: Vec<Guard>,
}

/// Lakecache worker counters summed over the workers.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct WorkerCounters {
    pub hits: f64,
    pub misses: f64,
    pub memory_used: f64,
    pub disk_used: f64,
    /// Bytes the block transport sent from Memory tier files with `sendfile`.
    pub sendfile_bytes: f64,
}

/// CPU seconds of a system's processes, the reader and its separate workers apart.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuApart {
    /// The process the mount lives in (for `lakecache local`, its workers too).
    pub reader: f64,
    /// The separate worker processes, summed; `None` when there are none.
    pub workers: Option<f64>,
}

impl Running {
    /// One reading of the cache's processes: their CPU and peak RSS summed (a sum of peaks: an
    /// upper bound on the peak of the sum), and their CPU with the reader (`proc`, where the
    /// mount lives) and the separate workers (`helpers`) apart.
    pub fn sample(&self) -> Option<(ProcStats, CpuApart)> {
        let main = self.proc.as_ref().and_then(|p| p.stats().ok())?;
        let helpers: Vec<ProcStats> = self.helpers.iter().filter_map(|p| p.stats().ok()).collect();
        let apart = CpuApart {
            reader: main.cpu_seconds,
            workers: (!self.helpers.is_empty())
                .then(|| helpers.iter().map(|s| s.cpu_seconds).sum()),
        };
        let sum = helpers.iter().fold(main, |a, b| ProcStats {
            cpu_seconds: a.cpu_seconds + b.cpu_seconds,
            peak_rss: a.peak_rss + b.peak_rss,
            rss: a.rss + b.rss,
        });
        Some((sum, apart))
    }

    pub fn reset_peak(&self) {
        for p in self.proc.iter().chain(&self.helpers) {
            p.reset_peak();
        }
    }

    /// Sums the workers' counters from their `/metrics`.
    pub fn counters(&self) -> anyhow::Result<Option<WorkerCounters>> {
        if self.admin.is_empty() {
            return Ok(None);
        }
        let mut sum = WorkerCounters::default();
        for a in &self.admin {
            let (status, body) = net::http(*a, "GET", "/metrics", None, Duration::from_secs(10))
                .with_context(|| format!("scraping {a}/metrics"))?;
            if status != 200 {
                bail!("{a}/metrics answered {status}");
            }
            let c = parse_metrics(&body);
            sum.hits += c.hits;
            sum.misses += c.misses;
            sum.memory_used += c.memory_used;
            sum.disk_used += c.disk_used;
            sum.sendfile_bytes += c.sendfile_bytes;
        }
        Ok(Some(sum))
    }

    /// Fails if the cache process died or its mount is gone.
    pub fn check(&self) -> anyhow::Result<()> {
        for p in self.proc.iter().chain(&self.helpers) {
            p.check_alive()?;
        }
        if let Some(m) = &self.mount
            && !net::is_mounted(m)
        {
            bail!("{} is no longer mounted at {}", self.kind, m.display());
        }
        Ok(())
    }

    /// Stops the process (which unmounts), then removes what is left.
    pub fn stop(mut self) {
        drop(self.proc.take());
        self.helpers.clear();
        drop(std::mem::take(&mut self._guards));
    }
}

/// Parses the worker metrics the benchmark uses from Prometheus text.
pub fn parse_metrics(text: &str) -> WorkerCounters {
    let mut c = WorkerCounters::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.parse::<f64>() else {
            continue;
        };
        let (metric, labels) = name.split_once('{').unwrap_or((name, ""));
        match metric {
            "lakecache_worker_block_hits_total" => c.hits += v,
            "lakecache_worker_block_misses_total" => c.misses += v,
            "lakecache_worker_tier_used_bytes" if labels.contains("tier=\"memory\"") => {
                c.memory_used += v
            }
            "lakecache_worker_tier_used_bytes" if labels.contains("tier=\"disk\"") => {
                c.disk_used += v
            }
            "lakecache_worker_sendfile_bytes_total" => c.sendfile_bytes += v,
            _ => {}
        }
    }
    c
}

fn clean_env(cmd: &mut Command) {
    // Settings meant for the benchmark or the user's own lakecache and AWS tools must not reach
    // the systems under test (rclone 1.60 fails on AWS_CA_BUNDLE with a plain-HTTP endpoint).
    for (k, _) in std::env::vars() {
        if k.starts_with("LAKECACHE_") || k.starts_with("AWS_") || k.starts_with("RCLONE_") {
            cmd.env_remove(k);
        }
    }
}

/// A fresh directory under the work directory, removed by the guard.
fn fresh_dir(env: &Env, kind: &str, name: &str, n: u32) -> anyhow::Result<(PathBuf, Guard)> {
    let dir = env.work.join(kind).join(format!("{name}-{n}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let d = dir.clone();
    let guard = env.janitor.register(format!("{}", dir.display()), move || {
        net::unmount(&d);
        let _ = std::fs::remove_dir_all(&d);
    });
    Ok((dir, guard))
}

fn wait_mounted(proc: &Proc, mnt: &Path) -> anyhow::Result<()> {
    proc::wait_until(
        &format!("the {} mount at {}", proc.name, mnt.display()),
        Duration::from_secs(60),
        || proc.check_alive(),
        || net::is_mounted(mnt) && std::fs::read_dir(mnt).is_ok(),
    )
}

pub fn start(env: &Env, kind: SystemKind, cache: CacheSize) -> anyhow::Result<Running> {
    match kind {
        SystemKind::Lakecache(n) => start_lakecache(env, kind, n, cache, &[]),
        SystemKind::LakecacheLocal(n) => start_lakecache(env, kind, n, cache, &[]),
        SystemKind::LakecacheCsi(n, transport) => {
            start_lakecache_csi(env, kind, n, transport, cache)
        }
        SystemKind::Rclone => start_rclone(env, cache),
        SystemKind::S3fs => start_s3fs(env),
        SystemKind::Direct => Ok(Running {
            kind,
            access: Access::S3(env.direct.clone()),
            proc: None,
            helpers: vec![],
            admin: vec![],
            settings: "OpenDAL S3 client in the benchmark: 1 MiB ranged GETs for shards, \
                       one GET per image, ListObjectsV2 for metadata; no cache"
                .into(),
            mount: None,
            _guards: vec![],
        }),
        SystemKind::Tmpfs => Ok(Running {
            kind,
            access: Access::Fs(env.ceiling.clone()),
            proc: None,
            helpers: vec![],
            admin: vec![],
            settings: "the dataset copied to a local tmpfs and read from it".into(),
            mount: None,
            _guards: vec![],
        }),
        SystemKind::FuseCopy => start_bindfs(env),
    }
}

/// Starts `lakecache local` and, with `preload` globs, waits for its preload of them to end and
/// returns what it reported.
pub fn start_lakecache_preload(
    env: &Env,
    kind: SystemKind,
    cache: CacheSize,
    preload: &[&str],
) -> anyhow::Result<(Running, Measured)> {
    let n = match kind {
        SystemKind::Lakecache(n) | SystemKind::LakecacheLocal(n) => n,
        other => anyhow::bail!("{other} has no preload command"),
    };
    let sys = start_lakecache(env, kind, n, cache, preload)?;
    let proc = sys.proc.as_ref().expect("lakecache runs as a process");
    let mut line = String::new();
    proc::wait_until(
        "lakecache's preload",
        Duration::from_secs(3600),
        || proc.check_alive(),
        || {
            let log = std::fs::read_to_string(&proc.log).unwrap_or_default();
            match log.lines().find(|l| l.contains("lakecache: preloaded ")) {
                Some(l) => {
                    line = l.to_string();
                    true
                }
                None => false,
            }
        },
    )?;
    let m =
        parse_preload(&line).with_context(|| format!("lakecache's preload summary: {line:?}"))?;
    anyhow::ensure!(!line.contains("failed"), "the preload had failures: {line}");
    Ok((sys, m))
}

/// `lakecache: preloaded N files, B bytes in S s (…)`.
fn parse_preload(line: &str) -> Option<Measured> {
    let rest = line.split("preloaded ").nth(1)?;
    let mut words = rest.split_whitespace();
    let files: u64 = words.next()?.parse().ok()?;
    words.next()?; // "files,"
    let bytes: u64 = words.next()?.parse().ok()?;
    words.next()?; // "bytes"
    words.next()?; // "in"
    let seconds: f64 = words.next()?.parse().ok()?;
    Some(Measured {
        seconds,
        bytes,
        files,
        latencies: vec![],
    })
}

fn start_lakecache(
    env: &Env,
    kind: SystemKind,
    workers: usize,
    cache: CacheSize,
    preload: &[&str],
) -> anyhow::Result<Running> {
    let label = kind.label();
    let n = env.next_start();
    let (mnt, g1) = fresh_dir(env, "mnt", &label, n)?;
    let (cache_dir, g2) = fresh_dir(env, "cache", &label, n)?;
    let creds = write_credentials(&cache_dir)?;
    let mut local_guard = None;
    let mut cmd = Command::new(&env.bins.lakecache);
    clean_env(&mut cmd);
    cmd.arg("local")
        .args(["--source", &format!("s3://{BUCKET}")])
        .args(["--endpoint", &env.endpoint, "--region", REGION])
        .arg("--credentials-dir")
        .arg(&creds)
        .arg("--mount")
        .arg(&mnt)
        .args(["--workers", &workers.to_string()])
        .args(["--memory", &format!("{}B", cache.memory)]);
    let mut settings = format!(
        "lakecache local --workers {workers} --memory {}",
        bytesize::ByteSize::b(cache.memory)
    );
    if cache.disk > 0 {
        let disk = cache_dir.join("disk");
        cmd.arg("--disk")
            .arg(format!("{}:{}B", disk.display(), cache.disk));
        settings += &format!(" --disk PATH:{}", bytesize::ByteSize::b(cache.disk));
    }
    if matches!(kind, SystemKind::LakecacheLocal(_)) {
        // Local copies on tmpfs: a second copy of what they hold, handed to the kernel.
        let copies = PathBuf::from("/dev/shm")
            .join(format!("lakecache-bench-copies-{}-{n}", std::process::id()));
        let c = copies.clone();
        let g = env
            .janitor
            .register(format!("{label}'s local copies"), move || {
                let _ = std::fs::remove_dir_all(&c);
            });
        local_guard = Some(g);
        cmd.arg("--local-cache").arg(format!(
            "{}:{}B",
            copies.display(),
            cache.memory.max(1 << 20)
        ));
        settings += &format!(
            " --local-cache /dev/shm/…:{} (whole-file copies served with FUSE passthrough; \
             a second copy of what they hold)",
            bytesize::ByteSize::b(cache.memory)
        );
    }
    for glob in preload {
        cmd.args(["--preload", glob]);
    }
    settings += " (defaults otherwise: 4 MiB blocks, 512 MiB prefetch budget, 2 FUSE threads)";
    // The workers log their admin address at info level; nothing else is needed from the log.
    cmd.env("RUST_LOG", "warn,lakecache_worker=info")
        .env("RUST_BACKTRACE", "0")
        .env("LAKECACHE_LOG_FORMAT", "json");
    let log = env.logs.join(format!("{label}-{n}.log"));
    // Registered before the process, so at a signal it runs after the process has stopped
    // (undos run newest first): a running lakecache would write its tier again.
    let pid = Arc::new(parking_lot::Mutex::new(None::<u32>));
    let p = pid.clone();
    let g3 = env
        .janitor
        .register(format!("{label}'s memory tier"), move || {
            if let Some(pid) = *p.lock() {
                remove_shm(pid)
            }
        });
    let proc = Proc::spawn(&env.janitor, &label, cmd, &log, Duration::from_secs(20))?;
    *pid.lock() = Some(proc.pid);
    wait_mounted(&proc, &mnt)?;
    let mut admin = Vec::new();
    proc::wait_until(
        "lakecache's workers",
        Duration::from_secs(30),
        || proc.check_alive(),
        || {
            admin = admin_addresses(&std::fs::read_to_string(&log).unwrap_or_default());
            admin.len() >= workers
        },
    )?;
    Ok(Running {
        kind,
        access: Access::Fs(mnt.clone()),
        proc: Some(proc),
        helpers: vec![],
        admin,
        settings,
        mount: Some(mnt),
        _guards: std::iter::once(g3)
            .chain(local_guard)
            .chain([g1, g2])
            .collect(),
    })
}

/// Writes the store's credentials as lakecache reads them (a mounted Secret: a file per key)
/// and returns their directory.
fn write_credentials(cache_dir: &Path) -> anyhow::Result<PathBuf> {
    let creds = cache_dir.join("credentials");
    std::fs::create_dir_all(&creds)?;
    std::fs::write(creds.join("access_key_id"), ACCESS_KEY)?;
    std::fs::write(creds.join("secret_access_key"), SECRET_KEY)?;
    Ok(creds)
}

/// The data path of a CSI-mounted volume, without Kubernetes: `workers` `lakecache-worker`
/// processes and one `lakecache-csi-node fuse-server`, configured as the CSI plugin configures
/// it (static workers, the data-plane token), reading the workers on loopback by `transport`.
fn start_lakecache_csi(
    env: &Env,
    kind: SystemKind,
    workers: usize,
    transport: CsiTransport,
    cache: CacheSize,
) -> anyhow::Result<Running> {
    let label = kind.label();
    let worker_bin = env.bins.lakecache.with_file_name("lakecache-worker");
    let csi_bin = env.bins.lakecache.with_file_name("lakecache-csi-node");
    for b in [&worker_bin, &csi_bin] {
        anyhow::ensure!(
            b.is_file(),
            "{label} needs {} beside the lakecache binary (cargo build --release -p \
             lakecache-worker -p lakecache-csi-node)",
            b.display()
        );
    }
    let n = env.next_start();
    let (mnt, g1) = fresh_dir(env, "mnt", &label, n)?;
    let (cache_dir, g2) = fresh_dir(env, "cache", &label, n)?;
    let creds = write_credentials(&cache_dir)?;
    let token = format!("bench-{}-{n}", std::process::id());
    let token_file = cache_dir.join("token");
    std::fs::write(&token_file, &token)?;
    let per = |total: u64| total / workers as u64;
    // The Memory tiers: on /dev/shm, as an emptyDir of medium Memory would be.
    let shm =
        PathBuf::from("/dev/shm").join(format!("lakecache-bench-csi-{}-{n}", std::process::id()));
    let s = shm.clone();
    let g3 = env
        .janitor
        .register(format!("{label}'s memory tiers"), move || {
            let _ = std::fs::remove_dir_all(&s);
        });
    let mut helpers = Vec::new();
    let mut admin = Vec::new();
    let mut members = Vec::new();
    for i in 0..workers {
        let id = format!("w{i}");
        let mut tiers = Vec::new();
        if cache.memory > 0 {
            tiers.push(serde_json::json!({
                "kind": "Memory", "path": shm.join(&id), "size": format!("{}B", per(cache.memory)),
            }));
        }
        if cache.disk > 0 {
            tiers.push(serde_json::json!({
                "kind": "Disk", "path": cache_dir.join(format!("disk-{id}")),
                "size": format!("{}B", per(cache.disk)),
            }));
        }
        let config = serde_json::json!({
            "id": id,
            "source": {
                "uri": format!("s3://{BUCKET}"),
                "options": { "endpoint": env.endpoint, "region": REGION },
                "credentialsDir": creds,
            },
            "listen": "127.0.0.1:0",
            "adminListen": "127.0.0.1:0",
            "tiers": tiers,
            "tokenFile": token_file,
        });
        let file = cache_dir.join(format!("worker-{id}.yaml"));
        std::fs::write(&file, serde_json::to_vec_pretty(&config)?)?;
        let mut cmd = Command::new(&worker_bin);
        clean_env(&mut cmd);
        cmd.arg("--config")
            .arg(&file)
            .env("RUST_LOG", "warn,lakecache_worker=info")
            .env("RUST_BACKTRACE", "0")
            .env("LAKECACHE_LOG_FORMAT", "json");
        let log = env.logs.join(format!("{label}-{n}-{id}.log"));
        let proc = Proc::spawn(
            &env.janitor,
            &format!("{label} {id}"),
            cmd,
            &log,
            Duration::from_secs(20),
        )?;
        let mut ready = None;
        proc::wait_until(
            &format!("{label}'s worker {id}"),
            Duration::from_secs(30),
            || proc.check_alive(),
            || {
                ready = ready_addresses(&std::fs::read_to_string(&log).unwrap_or_default());
                ready.is_some()
            },
        )?;
        let (addr, adm) = ready.expect("waited for it");
        admin.push(adm);
        members.push(serde_json::json!({ "id": id, "endpoint": format!("http://{addr}") }));
        helpers.push(proc);
    }
    let fuse = serde_json::json!({
        "volumeId": format!("bench-{n}"),
        "mountPath": mnt,
        "namespace": "bench",
        "name": "bench",
        "workers": members,
        "token": token,
        "metadataTtl": null,
        "prefetchBudget": 512u64 << 20,
        "fuseThreads": 2,
        "blockTransport": transport == CsiTransport::Blocks,
        "startupTimeout": "30s",
    });
    let file = cache_dir.join("fuse.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&fuse)?)?;
    let mut cmd = Command::new(&csi_bin);
    clean_env(&mut cmd);
    cmd.arg("fuse-server")
        .arg("--config")
        .arg(&file)
        .env("RUST_LOG", "warn")
        .env("RUST_BACKTRACE", "0");
    let log = env.logs.join(format!("{label}-{n}-fuse.log"));
    let proc = Proc::spawn(&env.janitor, &label, cmd, &log, Duration::from_secs(20))?;
    wait_mounted(&proc, &mnt)?;
    let reads = match transport {
        CsiTransport::Blocks => {
            "block bytes over the block transport on loopback, Memory tier blocks sent with \
             sendfile by the workers"
        }
        CsiTransport::Grpc => {
            "block bytes over gRPC on loopback, blockTransport false: the data path before the \
             block transport"
        }
    };
    let settings = format!(
        "{workers} lakecache-worker processes (Memory {} + Disk {} each) and \
         lakecache-csi-node fuse-server over them ({reads}; 512 MiB prefetch budget, \
         2 FUSE threads, 4 MiB blocks): the processes a CSI-mounted volume runs",
        bytesize::ByteSize::b(per(cache.memory)),
        bytesize::ByteSize::b(per(cache.disk)),
    );
    Ok(Running {
        kind,
        access: Access::Fs(mnt.clone()),
        proc: Some(proc),
        helpers,
        admin,
        settings,
        mount: Some(mnt),
        _guards: vec![g3, g1, g2],
    })
}

/// The gRPC and admin addresses of a worker's "worker ready" line in a JSON log.
fn ready_addresses(log: &str) -> Option<(SocketAddr, SocketAddr)> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "worker ready")
        .find_map(|v| {
            let addr = v["fields"]["addr"].as_str()?.parse().ok()?;
            let admin = v["fields"]["admin"].as_str()?.parse().ok()?;
            Some((addr, admin))
        })
}

/// Removes the memory tiers `lakecache local` (pid) made in /dev/shm, if it could not.
fn remove_shm(pid: u32) {
    let prefix = format!("lakecache-{pid}-");
    if let Ok(entries) = std::fs::read_dir("/dev/shm") {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// The `admin` field of every "worker ready" line of a JSON log.
pub fn admin_addresses(log: &str) -> Vec<SocketAddr> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "worker ready")
        .filter_map(|v| v["fields"]["admin"].as_str()?.parse().ok())
        .collect()
}

fn start_rclone(env: &Env, cache: CacheSize) -> anyhow::Result<Running> {
    let n = env.next_start();
    let (mnt, g1) = fresh_dir(env, "mnt", "rclone", n)?;
    let (cache_dir, g2) = fresh_dir(env, "cache", "rclone", n)?;
    let config = cache_dir.join("rclone.conf");
    std::fs::write(&config, "")?;
    let max = format!("{}", cache.total());
    let args: Vec<String> = [
        "mount",
        &format!(":s3:{BUCKET}"),
        &mnt.to_string_lossy(),
        "--read-only",
        "--config",
        &config.to_string_lossy(),
        "--cache-dir",
        &cache_dir.join("vfs").to_string_lossy(),
        // Documented for read-heavy use: a full VFS cache on local disk, a small in-memory
        // buffer with a large read-ahead into the cache, chunked reads that grow.
        "--vfs-cache-mode",
        "full",
        "--vfs-cache-max-size",
        &max,
        "--vfs-cache-max-age",
        "24h",
        "--vfs-cache-poll-interval",
        "10s",
        "--vfs-read-ahead",
        "256M",
        "--buffer-size",
        "16M",
        "--vfs-read-chunk-size",
        "32M",
        "--vfs-read-chunk-size-limit",
        "off",
        // Immutable data: no modtime HEADs, fast fingerprints, long directory and attribute
        // caching.
        "--no-modtime",
        "--vfs-fast-fingerprint",
        "--dir-cache-time",
        "24h",
        "--attr-timeout",
        "1h",
        "--max-read-ahead",
        "1M",
        "--log-level",
        "NOTICE",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut cmd = Command::new(&env.bins.rclone);
    clean_env(&mut cmd);
    cmd.args(&args)
        .env("RCLONE_S3_PROVIDER", "Other")
        .env("RCLONE_S3_ENDPOINT", &env.endpoint)
        .env("RCLONE_S3_REGION", REGION)
        .env("RCLONE_S3_ACCESS_KEY_ID", ACCESS_KEY)
        .env("RCLONE_S3_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("RCLONE_S3_FORCE_PATH_STYLE", "true");
    let proc = Proc::spawn(
        &env.janitor,
        "rclone",
        cmd,
        &env.logs.join(format!("rclone-{n}.log")),
        Duration::from_secs(20),
    )?;
    wait_mounted(&proc, &mnt)?;
    let settings = format!(
        "rclone {}",
        args[3..]
            .iter()
            .map(|a| if a.starts_with('/') { "DIR" } else { a })
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(Running {
        kind: SystemKind::Rclone,
        access: Access::Fs(mnt.clone()),
        proc: Some(proc),
        helpers: vec![],
        admin: vec![],
        settings,
        mount: Some(mnt),
        _guards: vec![g1, g2],
    })
}

fn start_s3fs(env: &Env) -> anyhow::Result<Running> {
    let n = env.next_start();
    let (mnt, g1) = fresh_dir(env, "mnt", "s3fs", n)?;
    let (cache_dir, g2) = fresh_dir(env, "cache", "s3fs", n)?;
    let passwd = cache_dir.join("passwd");
    std::fs::write(&passwd, format!("{ACCESS_KEY}:{SECRET_KEY}\n"))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&passwd, std::fs::Permissions::from_mode(0o600))?;
    }
    // s3fs's cache has no size limit (see `SystemKind::bounded_cache`).
    let files = cache_dir.join("files");
    std::fs::create_dir_all(&files)?;
    let guards = vec![g1, g2];
    let opts = [
        "ro".to_string(),
        format!("url={}", env.endpoint),
        "use_path_request_style".into(),
        format!("endpoint={REGION}"),
        format!("passwd_file={}", passwd.display()),
        format!("use_cache={}", files.display()),
        "del_cache".into(),
        "parallel_count=16".into(),
        "multipart_size=16".into(),
        "multireq_max=32".into(),
        "max_stat_cache_size=1000000".into(),
        "stat_cache_expire=86400".into(),
        "enable_noobj_cache".into(),
        "kernel_cache".into(),
        "dbglevel=warn".into(),
    ];
    let mut cmd = Command::new(&env.bins.s3fs);
    clean_env(&mut cmd);
    cmd.arg(BUCKET).arg(&mnt).arg("-f");
    for o in &opts {
        cmd.args(["-o", o]);
    }
    let proc = Proc::spawn(
        &env.janitor,
        "s3fs",
        cmd,
        &env.logs.join(format!("s3fs-{n}.log")),
        Duration::from_secs(20),
    )?;
    wait_mounted(&proc, &mnt)?;
    let shown: Vec<String> = opts
        .iter()
        .filter(|o| !o.starts_with("passwd_file") && !o.starts_with("use_cache"))
        .cloned()
        .collect();
    Ok(Running {
        kind: SystemKind::S3fs,
        access: Access::Fs(mnt.clone()),
        proc: Some(proc),
        helpers: vec![],
        admin: vec![],
        settings: format!(
            "s3fs -o use_cache=DIR (on disk; s3fs has no cache size limit) -o {}",
            shown.join(",")
        ),
        mount: Some(mnt),
        _guards: guards,
    })
}

fn start_bindfs(env: &Env) -> anyhow::Result<Running> {
    let n = env.next_start();
    let (mnt, g1) = fresh_dir(env, "mnt", "fuse-copy", n)?;
    let mut cmd = Command::new(&env.bins.bindfs);
    cmd.args(["-f", "--multithreaded", "-o", "ro"])
        .arg(&env.ceiling)
        .arg(&mnt);
    let proc = Proc::spawn(
        &env.janitor,
        "bindfs",
        cmd,
        &env.logs.join(format!("bindfs-{n}.log")),
        Duration::from_secs(10),
    )?;
    wait_mounted(&proc, &mnt)?;
    Ok(Running {
        kind: SystemKind::FuseCopy,
        access: Access::Fs(mnt.clone()),
        proc: Some(proc),
        helpers: vec![],
        admin: vec![],
        settings: "bindfs -f --multithreaded -o ro over the tmpfs copy: every read is copied \
                   through a FUSE server that does nothing else"
            .into(),
        mount: Some(mnt),
        _guards: vec![g1],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_worker_metrics() {
        let text = "# HELP lakecache_worker_block_hits Block requests served from a cache tier\n\
                    # TYPE lakecache_worker_block_hits counter\n\
                    lakecache_worker_block_hits_total{tier=\"memory\"} 7\n\
                    lakecache_worker_block_hits_total{tier=\"disk\"} 3\n\
                    lakecache_worker_block_misses_total 5\n\
                    lakecache_worker_tier_used_bytes{tier=\"memory\"} 1024\n\
                    lakecache_worker_tier_used_bytes{tier=\"disk\"} 2048\n\
                    lakecache_worker_tier_capacity_bytes{tier=\"memory\"} 4096\n\
                    lakecache_worker_sendfile_bytes_total 512\n";
        let c = parse_metrics(text);
        assert_eq!(
            c,
            WorkerCounters {
                hits: 10.0,
                misses: 5.0,
                memory_used: 1024.0,
                disk_used: 2048.0,
                sendfile_bytes: 512.0,
            }
        );
    }

    #[test]
    fn finds_admin_addresses_in_a_json_log() {
        let log = r#"{"timestamp":"t","level":"INFO","fields":{"message":"worker ready","id":"local-0","addr":"127.0.0.1:1","admin":"127.0.0.1:4001"},"target":"lakecache_worker"}
not json
{"timestamp":"t","level":"INFO","fields":{"message":"tier opened"}}
{"timestamp":"t","level":"INFO","fields":{"message":"worker ready","id":"local-1","admin":"127.0.0.1:4002"}}"#;
        let a = admin_addresses(log);
        assert_eq!(
            a,
            vec![
                "127.0.0.1:4001".parse::<SocketAddr>().unwrap(),
                "127.0.0.1:4002".parse().unwrap()
            ]
        );
    }
}
