//! One run: set up the lake, measure the raw link, then run every workload on every system,
//! each start fresh, each epoch after dropping the page cache.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;

use anyhow::Context;
use rand::SeedableRng;
use rand::seq::SliceRandom;

use crate::dataset::{self, FileSpec};
use crate::janitor::Janitor;
use crate::net::{self, BUCKET, LakeBins};
use crate::plan::{Plan, SystemKind, Workload};
use crate::readers::{self, Measured};
use crate::report::{RawLink, Results, Row, SystemInfo};
use crate::s3::Direct;
use crate::systems::{self, CacheSize, Env, Running, SystemBins};

/// Where a run keeps its files, and the binaries it uses.
#[derive(Debug, Clone)]
pub struct Setup {
    /// A directory of this run only (removed at the end).
    pub work: PathBuf,
    pub out: PathBuf,
    pub lake: LakeBins,
    pub systems: SystemBins,
}

pub fn run(plan: &Plan, setup: &Setup, janitor: &Arc<Janitor>) -> anyhow::Result<Results> {
    let logs = setup.out.join("logs");
    std::fs::create_dir_all(&logs)?;
    std::fs::create_dir_all(&setup.work)?;
    let w = setup.work.clone();
    let _work = janitor.register(format!("{}", w.display()), move || {
        // A system that was just killed may still be letting go of a file in it (a lazily
        // detached mount, a last write): try again for a few seconds before giving up.
        for _ in 0..50 {
            match std::fs::remove_dir_all(&w) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    std::thread::sleep(std::time::Duration::from_millis(100))
                }
                _ => return,
            }
        }
        eprintln!("lakecache-bench: cannot remove {}", w.display());
    });
    let shards = dataset::shards(&plan.dataset);
    let images = dataset::images(&plan.dataset);
    let mut all = shards.clone();
    all.extend(images.iter().cloned());
    let total = dataset::total(&all);
    let images_bytes = dataset::total(&images);
    let mut results = Results::new(plan, total, images_bytes);
    let log = Progress {
        start: std::time::Instant::now(),
    };

    // The lake: data on a tmpfs, served from a namespace behind the shaped link.
    let store = setup.work.join("store");
    let _store = net::mount_tmpfs(janitor, &store, total + total / 8 + (64 << 20))?;
    log.say(format!(
        "generating {} shards and {} images ({}) into the store",
        shards.len(),
        images.len(),
        bytesize::ByteSize::b(total)
    ));
    dataset::generate(&store.join(BUCKET), &all)?;
    let ns = net::Netns::create(janitor, &plan.link)?;
    let lake = net::Lake::start(janitor, &ns, &setup.lake, &store, &plan.link, &logs)?;
    results.link_details = serde_json::json!({
        "namespace": ns.name,
        "host": ns.host_ip.to_string(),
        "store": lake.endpoint,
        "qdiscs": ns.describe_qdiscs(),
        "toxics": lake.toxics,
    });
    log.say(format!(
        "lake at {} ({} ms RTT, {} Mbit/s)",
        lake.endpoint,
        plan.link.rtt_ms,
        plan.link.rate_bits / 1_000_000
    ));
    let direct = Direct::new(&lake.endpoint)?;

    // The raw link: every shard in 16 concurrent ranged GETs, twice; the better one counts.
    let mut best: Option<RawLink> = None;
    for _ in 0..2 {
        drop_caches(&mut results);
        let range = (plan.shards_bytes() / 16).clamp(1 << 20, 8 << 20);
        let (bytes, secs) = direct.parallel_ranges(&shards, range, 16, &|_, _, _| Ok(()))?;
        let r = RawLink {
            bytes,
            seconds: secs,
            mb_s: bytes as f64 / secs / 1e6,
            ranges: 16,
            range_bytes: range,
        };
        if best.as_ref().is_none_or(|b| r.mb_s > b.mb_s) {
            best = Some(r);
        }
    }
    results.raw_link = best;
    if let Some(r) = &results.raw_link {
        log.say(format!("raw link: {:.1} MB/s", r.mb_s));
    }

    let env = Env {
        janitor: janitor.clone(),
        bins: setup.systems.clone(),
        endpoint: lake.endpoint.clone(),
        work: setup.work.clone(),
        logs: logs.clone(),
        direct: direct.clone(),
        ceiling: setup.work.join("ceiling"),
        starts: AtomicU32::new(0),
    };
    let mut ceiling = None;
    let mut ceiling_copy: Option<Measured> = None;
    let whole = CacheSize {
        memory: plan.memory,
        disk: plan.disk,
    };
    let half = CacheSize {
        memory: images_bytes / 2,
        disk: 0,
    };
    for &kind in &plan.systems {
        if kind.is_ceiling() && ceiling.is_none() {
            ceiling = Some(net::mount_tmpfs(
                janitor,
                &env.ceiling,
                total + total / 8 + (64 << 20),
            )?);
            drop_caches(&mut results);
            let (bytes, seconds) = direct.copy_to(&all, &env.ceiling)?;
            log.say(format!(
                "copied the dataset to tmpfs in {seconds:.2} s ({:.1} MB/s)",
                bytes as f64 / seconds / 1e6
            ));
            ceiling_copy = Some(Measured {
                seconds,
                bytes,
                files: all.len() as u64,
                latencies: vec![],
            });
        }
        let mut info = SystemInfo {
            name: kind.label(),
            settings: String::new(),
        };
        let ctx = Ctx {
            plan,
            env: &env,
            kind,
            janitor,
            log: &log,
        };
        let main_workloads = [Workload::Metadata, Workload::Shards, Workload::Images];
        if main_workloads.iter().any(|w| plan.runs(*w)) {
            let sys = ctx.start(whole)?;
            info.settings = sys.settings.clone();
            if plan.runs(Workload::Metadata) {
                for phase in ["cold", "warm"] {
                    let row = ctx.measure(&sys, &mut results, Workload::Metadata, phase, |a| {
                        readers::walk(a, "images", images.len())
                    })?;
                    results.push(row);
                }
            }
            if plan.runs(Workload::Shards) {
                for phase in ["cold", "warm"] {
                    let row = ctx.measure(&sys, &mut results, Workload::Shards, phase, |a| {
                        readers::sequential(a, &shards, plan.shard_readers, plan.read_size)
                    })?;
                    results.push(row);
                }
            }
            if plan.runs(Workload::Images) {
                for (e, phase) in ["cold", "warm"].into_iter().enumerate() {
                    let order = shuffled(&images, plan.seed + e as u64);
                    let row = ctx.measure(&sys, &mut results, Workload::Images, phase, |a| {
                        readers::whole_files(a, &order, plan.image_readers)
                    })?;
                    results.push(row);
                }
            }
            sys.stop();
        }
        if plan.runs(Workload::Preload) {
            match kind {
                SystemKind::Tmpfs => {
                    if let Some(m) = &ceiling_copy {
                        let mut row = Row::from_measured(&kind, Workload::Preload, "copy", m);
                        row.note = Some("16 ranged GETs of 8 MiB in flight into tmpfs".into());
                        results.push(row);
                    }
                }
                k if k.is_ceiling() || k == SystemKind::Direct => {}
                // Its workers are the same code as lakecache-3w's, and a preload in a cluster
                // is the operator's CachePreload, not something the mount does.
                SystemKind::LakecacheCsi(..) => {}
                k if k.is_lakecache() => {
                    // `lakecache local --preload '**'`: every worker loads its share at once.
                    drop_caches(&mut results);
                    let (sys, m) = systems::start_lakecache_preload(&env, k, whole, &["**"])?;
                    let mut row = Row::from_measured(&kind, Workload::Preload, "preload", &m);
                    // Since the start, which is when the preload began.
                    if let Some((s, cpu)) = sys.sample() {
                        row.cpu_seconds = Some(s.cpu_seconds);
                        row.peak_rss = Some(s.peak_rss);
                        row.set_cpu_per_gb(cpu.reader, cpu.workers);
                    }
                    row.note =
                        Some("lakecache local --preload '**' (time the workers report)".into());
                    log.say(format!(
                        "{kind} preload: {:.2} s, {:.1} MB/s",
                        row.seconds, row.mb_s
                    ));
                    results.push(row);
                    sys.stop();
                }
                _ => {
                    // The peers have no preload command for a mount: read everything once, as
                    // a preload would.
                    let sys = ctx.start(whole)?;
                    let order = shuffled(&all, plan.seed + 100);
                    let mut row =
                        ctx.measure(&sys, &mut results, Workload::Preload, "read-all", |a| {
                            readers::whole_files(a, &order, plan.preload_readers)
                        })?;
                    row.note = Some(format!(
                        "read every file once with {} readers",
                        plan.preload_readers
                    ));
                    results.push(row);
                    sys.stop();
                }
            }
        }
        if plan.runs(Workload::Partial) && kind.bounded_cache() {
            let sys = ctx.start(half)?;
            for e in 1..=plan.partial_epochs {
                let order = shuffled(&images, plan.seed + 10 + e as u64);
                let row = ctx.measure(
                    &sys,
                    &mut results,
                    Workload::Partial,
                    &format!("epoch {e}"),
                    |a| readers::whole_files(a, &order, plan.image_readers),
                )?;
                results.push(row);
            }
            if info.settings.is_empty() {
                info.settings = sys.settings.clone();
            }
            sys.stop();
        }
        results.systems.push(info);
    }
    drop(ceiling);
    results.finish();
    Ok(results)
}

struct Ctx<'a> {
    plan: &'a Plan,
    env: &'a Env,
    kind: SystemKind,
    janitor: &'a Arc<Janitor>,
    log: &'a Progress,
}

impl Ctx<'_> {
    fn start(&self, cache: CacheSize) -> anyhow::Result<Running> {
        self.log.say(format!("{}: starting", self.kind));
        let sys = systems::start(self.env, self.kind, cache)
            .with_context(|| format!("starting {}", self.kind))?;
        if let Some(p) = &sys.proc {
            self.log
                .say(format!("{}: ready (pid {})", self.kind, p.pid));
        }
        Ok(sys)
    }

    /// Runs one epoch after dropping the page cache, within the workload bound; adds the cache
    /// processes' CPU time (summed, and per GB for the reader and the workers apart), peak
    /// memory and (lakecache) hit ratio to the row.
    fn measure(
        &self,
        sys: &Running,
        results: &mut Results,
        workload: Workload,
        phase: &str,
        epoch: impl FnOnce(&readers::Access) -> anyhow::Result<Measured>,
    ) -> anyhow::Result<Row> {
        let what = format!("{} {} {phase}", self.kind, workload.label());
        drop_caches(results);
        sys.check()?;
        let before = sys.sample();
        let counters_before = sys.counters()?;
        sys.reset_peak();
        let m = {
            let _watchdog =
                crate::janitor::Watchdog::arm(self.janitor, &what, self.plan.workload_timeout);
            epoch(&sys.access).with_context(|| what.clone())?
        };
        sys.check()?;
        let mut row = Row::from_measured(&self.kind, workload, phase, &m);
        if let (Some((b, b_cpu)), Some((a, a_cpu))) = (before, sys.sample()) {
            row.cpu_seconds = Some(a.cpu_seconds - b.cpu_seconds);
            row.peak_rss = Some(a.peak_rss);
            row.set_cpu_per_gb(
                a_cpu.reader - b_cpu.reader,
                a_cpu.workers.zip(b_cpu.workers).map(|(a, b)| a - b),
            );
        }
        if let (Some(b), Some(a)) = (counters_before, sys.counters()?) {
            let hits = a.hits - b.hits;
            let misses = a.misses - b.misses;
            if hits + misses > 0.0 {
                row.hit_ratio = Some(hits / (hits + misses));
            }
            row.memory_tier_used = Some(a.memory_used as u64);
            row.disk_tier_used = Some(a.disk_used as u64);
            row.sendfile_bytes = Some((a.sendfile_bytes - b.sendfile_bytes) as u64);
        }
        self.log.say(format!(
            "{what}: {:.2} s, {:.1} MB/s, {:.0} files/s{}",
            row.seconds,
            row.mb_s,
            row.files_s,
            row.hit_ratio
                .map(|h| format!(", hit ratio {h:.2}"))
                .unwrap_or_default()
        ));
        Ok(row)
    }
}

fn shuffled(files: &[FileSpec], seed: u64) -> Vec<FileSpec> {
    let mut v = files.to_vec();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    v.shuffle(&mut rng);
    v
}

/// Drops the kernel's page, dentry and inode caches, so an epoch starts with what the system
/// itself keeps; records whether that works here.
fn drop_caches(results: &mut Results) {
    nix::unistd::sync();
    let ok = std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok();
    if !ok && results.page_cache.is_none() {
        results.page_cache = Some(
            "drop_caches is not permitted here: warm figures may include the kernel page cache"
                .into(),
        );
    } else if ok && results.page_cache.is_none() {
        results.page_cache =
            Some("echo 3 > /proc/sys/vm/drop_caches before every epoch (works here)".into());
    }
}

/// Progress lines on stderr, with the time since the run started.
struct Progress {
    start: std::time::Instant,
}

impl Progress {
    fn say(&self, msg: String) {
        eprintln!(
            "lakecache-bench: [{:>7.1} s] {msg}",
            self.start.elapsed().as_secs_f64()
        );
    }
}
