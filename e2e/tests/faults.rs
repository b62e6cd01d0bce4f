//! A worker that hangs, as pods meet it: three `lakecache-worker` processes over a real S3
//! server, read through the CSI plugin's own `fuse-server` process (static worker list), by four
//! threads that read 120 files of 90 KB–5 MB whole and check every byte. Mid-epoch one worker
//! stops answering, first as a stopped process (SIGSTOP: its connections stay open and silent),
//! then behind a TCP proxy that accepts and never answers. Each time the epoch must end with no
//! failed read; the slowest file read and the epoch's throughput against a healthy epoch are
//! printed (the figures issue 12 asks for; they are not asserted, so a slow machine cannot fail
//! them). Once the worker answers again it must serve again within 30 s.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use lakecache_e2e::image::binaries_dir;
use lakecache_e2e::kit::free_port;
use lakecache_e2e::{Proxy, S3Server, pattern};
use lakecache_proto::lakecache::v1::InfoRequest;
use lakecache_proto::lakecache::v1::cache_worker_client::CacheWorkerClient;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const TOKEN: &str = "faults-token";
const FILES: usize = 120;
const READERS: usize = 4;

fn dataset() -> BTreeMap<String, Vec<u8>> {
    (0..FILES)
        .map(|i| {
            // 90 KB to 5 MB, spread evenly.
            let size = 90_000 + i * (5_000_000 - 90_000) / (FILES - 1);
            (
                format!("train/c{:02}/f{i:03}.bin", i % 8),
                pattern(i as u64, size),
            )
        })
        .collect()
}

/// A `lakecache-worker` process.
struct WorkerProcess {
    id: String,
    child: Child,
    port: u16,
}

impl WorkerProcess {
    fn start(bins: &Path, dir: &Path, s3: &S3Server, i: usize) -> anyhow::Result<Self> {
        let id = format!("w{i}");
        let (port, admin) = (free_port(), free_port());
        let token = dir.join("token");
        std::fs::write(&token, TOKEN)?;
        let config = serde_json::json!({
            "id": id,
            "source": s3.spec("lake", None),
            "listen": format!("127.0.0.1:{port}"),
            "adminListen": format!("127.0.0.1:{admin}"),
            "blockSize": "1MiB",
            "tiers": [{"kind": "Memory", "path": dir.join(format!("mem-{id}")), "size": "256MiB"}],
            "tokenFile": token,
        });
        let path = dir.join(format!("{id}.yaml"));
        std::fs::write(&path, serde_json::to_vec(&config)?)?;
        let log = std::fs::File::create(dir.join(format!("{id}.log")))?;
        let child = Command::new(bins.join("lakecache-worker"))
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting lakecache-worker")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            ensure!(
                Instant::now() < deadline,
                "worker {id} did not listen in 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self { id, child, port })
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn signal(&self, s: Signal) -> anyhow::Result<()> {
        kill(Pid::from_raw(self.child.id() as i32), s)?;
        Ok(())
    }

    /// Blocks this worker has served (hits and misses), by its own count.
    async fn served(&self) -> anyhow::Result<u64> {
        let info = self.info().await?;
        Ok(info.hits + info.misses)
    }

    /// Blocks this worker had to read from the lake.
    async fn misses(&self) -> anyhow::Result<u64> {
        Ok(self.info().await?.misses)
    }

    async fn info(&self) -> anyhow::Result<lakecache_proto::lakecache::v1::WorkerInfo> {
        let channel = tonic::transport::Endpoint::from_shared(self.endpoint())?
            .connect_timeout(Duration::from_secs(1))
            .connect()
            .await?;
        let token: tonic::metadata::MetadataValue<_> = format!("Bearer {TOKEN}").parse()?;
        let mut client =
            CacheWorkerClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
                r.metadata_mut().insert("authorization", token.clone());
                Ok(r)
            });
        let info = tokio::time::timeout(Duration::from_secs(2), client.info(InfoRequest {}))
            .await
            .context("worker info timed out")??
            .into_inner();
        Ok(info)
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.signal(Signal::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The CSI plugin's FUSE server process over a static worker list.
struct FuseServer {
    child: Child,
    mountpoint: PathBuf,
    config: PathBuf,
    log: PathBuf,
}

impl FuseServer {
    fn start(
        bins: &Path,
        dir: &Path,
        name: &str,
        workers: &[(String, String)],
    ) -> anyhow::Result<Self> {
        let mountpoint = dir.join(name);
        let config = serde_json::json!({
            "volumeId": name,
            "mountPath": mountpoint,
            "namespace": "ml",
            "name": "lake",
            "workers": workers.iter().map(|(id, endpoint)| serde_json::json!({"id": id, "endpoint": endpoint})).collect::<Vec<_>>(),
            "token": TOKEN,
            "prefetchBudget": 256u64 << 20,
            "fuseThreads": 4,
            "startupTimeout": "20s",
        });
        let path = dir.join(format!("{name}.json"));
        std::fs::write(&path, serde_json::to_vec(&config)?)?;
        let log_path = dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path)?;
        let mut child = Command::new(bins.join("lakecache-csi-node"))
            .args(["fuse-server", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("starting the fuse-server")?;
        let stdout = child.stdout.take().context("fuse-server stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let server = Self {
            child,
            mountpoint,
            config: path,
            log: log_path,
        };
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .context("the fuse-server printed no status in 30 s")?;
        if line.trim() != "ready" {
            bail!("the fuse-server did not mount: {line}");
        }
        Ok(server)
    }
}

impl FuseServer {
    /// A counter from the snapshot of its metrics that the FUSE server writes beside its
    /// configuration (what the CSI plugin's `/metrics` shows per volume).
    fn counter(&self, name: &str) -> f64 {
        std::fs::read_to_string(self.config.with_extension("prom"))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    }

    fn logged(&self, what: &str) -> bool {
        std::fs::read_to_string(&self.log).is_ok_and(|l| l.contains(what))
    }

    /// Waits for the ejection to show in the metrics snapshot, and prints the hedges.
    async fn report_counters(&self, what: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.counter("lakecache_fuse_worker_ejections_total") < 1.0 {
            ensure!(
                Instant::now() < deadline,
                "{what}: no ejection in the metrics"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!(
            "{what}: {} ejection(s), {} hedged block reads, {} won by the hedge",
            self.counter("lakecache_fuse_worker_ejections_total"),
            self.counter("lakecache_fuse_hedges_total"),
            self.counter("lakecache_fuse_hedge_wins_total"),
        );
        // What pods get: blocks over the block transport, so its hangs are the ones measured.
        let blocks = self.counter("lakecache_fuse_worker_block_reads_total{transport=\"blocks\"}");
        let grpc = self.counter("lakecache_fuse_worker_block_reads_total{transport=\"grpc\"}");
        ensure!(
            blocks > 0.0 && grpc == 0.0,
            "{what}: {blocks} blocks over the block transport and {grpc} over gRPC"
        );
        Ok(())
    }

    /// Waits (at most 10 s) until the log says `what`.
    async fn wait_logged(&self, what: &str, otherwise: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.logged(what) {
            ensure!(
                Instant::now() < deadline,
                "{otherwise} (log: {})",
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }
}

impl Drop for FuseServer {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// One epoch: every file read whole by `READERS` threads, with its page cache dropped first.
struct Epoch {
    bytes: u64,
    took: Duration,
    slowest: (Duration, String),
    failed: Vec<String>,
}

impl Epoch {
    fn throughput(&self) -> f64 {
        self.bytes as f64 / self.took.as_secs_f64()
    }
}

/// Reads every file; calls `mid` once a third of them are done.
fn epoch(root: &Path, files: &Arc<BTreeMap<String, Vec<u8>>>, mid: impl FnOnce()) -> Epoch {
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let names: Arc<Vec<String>> = Arc::new(files.keys().cloned().collect());
    let started = Instant::now();
    let threads: Vec<_> = (0..READERS)
        .map(|_| {
            let (next, done, names, files) =
                (next.clone(), done.clone(), names.clone(), files.clone());
            let root = root.to_path_buf();
            std::thread::spawn(move || {
                let mut out = vec![];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(name) = names.get(i) else { break };
                    let t = Instant::now();
                    let r = read_uncached(&root.join(name));
                    let ok = matches!(&r, Ok(data) if *data == files[name]);
                    out.push((
                        name.clone(),
                        t.elapsed(),
                        ok,
                        r.err().map(|e| e.to_string()),
                    ));
                    done.fetch_add(1, Ordering::Relaxed);
                }
                out
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(300);
    while done.load(Ordering::Relaxed) < FILES / 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    mid();
    let mut e = Epoch {
        bytes: files.values().map(|d| d.len() as u64).sum(),
        took: Duration::ZERO,
        slowest: (Duration::ZERO, String::new()),
        failed: vec![],
    };
    for t in threads {
        for (name, took, ok, err) in t.join().expect("reader thread") {
            if took > e.slowest.0 {
                e.slowest = (took, name.clone());
            }
            if !ok {
                e.failed.push(format!(
                    "{name}: {}",
                    err.unwrap_or_else(|| "bytes differ".into())
                ));
            }
        }
    }
    e.took = started.elapsed();
    e
}

/// A file's bytes, read after dropping its pages from the page cache (so the read goes through
/// the FUSE server, not the kernel's cache).
fn read_uncached(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(path)?;
    nix::fcntl::posix_fadvise(
        &f,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .map_err(std::io::Error::from)?;
    let mut data = Vec::new();
    f.read_to_end(&mut data)?;
    Ok(data)
}

/// Reads files until worker `w` serves a block to this mount again, and its FUSE server logged
/// that it is back; the time since `since` (when the worker could answer again). Calls that
/// waited in the worker's socket while it hung are answered first; they are let drain before
/// counting.
async fn serves_again(
    w: &WorkerProcess,
    fuse: &FuseServer,
    since: Instant,
    files: &Arc<BTreeMap<String, Vec<u8>>>,
) -> anyhow::Result<Duration> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = w.served().await?;
    for name in files.keys().cycle() {
        ensure!(
            since.elapsed() < Duration::from_secs(30),
            "worker {} served nothing within 30 s of answering again",
            w.id
        );
        let got = read_uncached(&fuse.mountpoint.join(name))?;
        ensure!(got == files[name], "{name}: bytes differ");
        if w.served().await? > before && fuse.logged("worker is back") {
            return Ok(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    unreachable!("cycle never ends")
}

fn report(what: &str, healthy: &Epoch, hung: &Epoch) {
    eprintln!(
        "{what}: healthy epoch {:.0} MB/s in {:.2?}; with the hung worker {:.0} MB/s in {:.2?} \
         ({:.2}× healthy); slowest file read {:.2?} ({})",
        healthy.throughput() / 1e6,
        healthy.took,
        hung.throughput() / 1e6,
        hung.took,
        hung.throughput() / healthy.throughput(),
        hung.slowest.0,
        hung.slowest.1,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_worker_fails_no_read_and_serves_again_when_it_answers() -> anyhow::Result<()> {
    lakecache_e2e::init_logging();
    let bins = binaries_dir()?;
    let dir = tempfile::tempdir()?;
    let files = Arc::new(dataset());
    let s3 = S3Server::start()?;
    let list: Vec<(String, Vec<u8>)> = files.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    s3.create_bucket("lake", &list).await?;
    let workers = (0..3)
        .map(|i| WorkerProcess::start(&bins, dir.path(), &s3, i))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let members: Vec<(String, String)> = workers
        .iter()
        .map(|w| (w.id.clone(), w.endpoint()))
        .collect();

    // 1. A stopped worker process.
    {
        let fuse = FuseServer::start(&bins, dir.path(), "stopped", &members)?;
        let root = fuse.mountpoint.clone();
        let cold = tokio::task::block_in_place(|| epoch(&root, &files, || {}));
        ensure!(
            cold.failed.is_empty(),
            "cold epoch failed reads: {:?}",
            cold.failed
        );
        let healthy = tokio::task::block_in_place(|| epoch(&root, &files, || {}));
        ensure!(
            healthy.failed.is_empty(),
            "healthy epoch failed reads: {:?}",
            healthy.failed
        );
        let stopped_at = std::sync::Mutex::new(None);
        let misses_before = workers[0].misses().await? + workers[2].misses().await?;
        let hung = tokio::task::block_in_place(|| {
            epoch(&root, &files, || {
                workers[1].signal(Signal::SIGSTOP).expect("SIGSTOP");
                *stopped_at.lock().unwrap() = Some(Instant::now());
            })
        });
        assert!(
            stopped_at.lock().unwrap().is_some(),
            "the worker was never stopped"
        );
        assert!(
            hung.failed.is_empty(),
            "reads failed with a stopped worker: {:?}",
            hung.failed
        );
        report("worker stopped (SIGSTOP)", &healthy, &hung);
        let refetched = workers[0].misses().await? + workers[2].misses().await? - misses_before;
        // What the epoch lost is mostly this: the stopped worker's share read again from S3.
        eprintln!(
            "worker stopped (SIGSTOP): the other workers read {refetched} blocks (1 MiB at most) \
             of its share again from S3"
        );
        // Calls it left unanswered end at their deadline, and eject it.
        fuse.wait_logged("worker ejected", "the stopped worker was not ejected")
            .await?;
        fuse.report_counters("worker stopped (SIGSTOP)").await?;
        workers[1].signal(Signal::SIGCONT)?;
        let back = serves_again(&workers[1], &fuse, Instant::now(), &files).await?;
        eprintln!("worker stopped (SIGSTOP): serves again {back:.2?} after SIGCONT");
    }

    // 2. A worker behind a proxy that accepts connections and never answers.
    {
        let proxy = Proxy::start(workers[2].port).await?;
        let mut via_proxy = members.clone();
        via_proxy[2].1 = proxy.endpoint();
        let fuse = FuseServer::start(&bins, dir.path(), "blackholed", &via_proxy)?;
        let root = fuse.mountpoint.clone();
        let healthy = tokio::task::block_in_place(|| epoch(&root, &files, || {}));
        ensure!(
            healthy.failed.is_empty(),
            "healthy epoch failed reads: {:?}",
            healthy.failed
        );
        let misses_before = workers[0].misses().await? + workers[1].misses().await?;
        let hung =
            tokio::task::block_in_place(|| epoch(&root, &files, || proxy.set_blackhole(true)));
        assert!(
            hung.failed.is_empty(),
            "reads failed with a black-holed worker: {:?}",
            hung.failed
        );
        report("worker black-holed (proxy)", &healthy, &hung);
        let refetched = workers[0].misses().await? + workers[1].misses().await? - misses_before;
        eprintln!(
            "worker black-holed (proxy): the other workers read {refetched} blocks of its share \
             again from S3"
        );
        // Calls it left unanswered end at their deadline, and eject it.
        fuse.wait_logged("worker ejected", "the black-holed worker was not ejected")
            .await?;
        fuse.report_counters("worker black-holed (proxy)").await?;
        proxy.set_blackhole(false);
        let back = serves_again(&workers[2], &fuse, Instant::now(), &files).await?;
        eprintln!("worker black-holed (proxy): serves again {back:.2?} after the proxy answers");
    }
    Ok(())
}
