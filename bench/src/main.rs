//! `lakecache-bench`: lakecache against the peers a user would pick instead (rclone mount,
//! s3fs, direct S3 reads, a tmpfs copy), over the same bucket behind the same emulated remote
//! link, in one run; writes `results.json`, `results.md` and `results.png`.
//!
//! The pipeline: [`plan`] (flags → one typed value) → [`net`] (a network namespace with the
//! store, a shaped veth pair, a latency proxy) → [`dataset`] (generated into the store) →
//! [`runner`] (the raw link, then every workload on every [`systems`] start, read by the same
//! [`readers`]) → [`report`] and [`chart`]. Everything the run changes on the machine is
//! undone by the [`janitor`], on success, failure, or a signal.
//!
//! This is a tool whose errors end in a message to a person, never translated for a caller, so
//! it uses `anyhow` throughout rather than an error enum per module.

#![forbid(unsafe_code)]

mod chart;
mod dataset;
mod janitor;
mod net;
mod plan;
mod proc;
mod readers;
mod report;
mod runner;
mod s3;
mod systems;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use bytesize::ByteSize;
use clap::Parser;

use crate::plan::{LinkName, Overrides, Plan, ProfileName, SystemKind, Workload};

#[derive(Debug, Parser)]
#[command(
    name = "lakecache-bench",
    version,
    about = "Benchmark lakecache against rclone, s3fs, direct reads and tmpfs under an emulated \
             remote lake (needs root: network namespaces, tc, mounts)"
)]
struct Cli {
    /// Dataset and cache sizes: `small` runs in seconds (the smoke test), `full` is the real
    /// measurement.
    #[arg(
        long,
        env = "LAKECACHE_BENCH_PROFILE",
        value_enum,
        default_value = "full"
    )]
    profile: ProfileName,
    /// The link to the lake: `near` (~1 ms RTT, 5 Gbit/s) or `far` (~20 ms RTT, 1 Gbit/s).
    #[arg(long, env = "LAKECACHE_BENCH_LINK", value_enum, default_value = "far")]
    link: LinkName,
    /// Where results.json, results.md, results.png and logs/ go.
    #[arg(
        long,
        env = "LAKECACHE_BENCH_OUT",
        default_value = "/tmp/lakecache-bench/results"
    )]
    out: PathBuf,
    /// Runs work in <DIR>/<pid> (the store's and the ceiling's tmpfs, mounts, caches); removed
    /// at the end.
    #[arg(
        long,
        env = "LAKECACHE_BENCH_WORK",
        default_value = "/tmp/lakecache-bench/work"
    )]
    work: PathBuf,
    /// Systems to run, comma-separated (default: all but lakecache-3w-csi-grpc):
    /// lakecache-1w, lakecache-3w, lakecache-1w-local, lakecache-3w-csi, lakecache-3w-csi-grpc
    /// (the CSI path reading over gRPC only), rclone, s3fs, direct, tmpfs, fuse-copy; any
    /// lakecache-<N>w… from 1 to 16 workers.
    #[arg(long, env = "LAKECACHE_BENCH_SYSTEMS", value_delimiter = ',')]
    systems: Option<Vec<SystemKind>>,
    /// Workloads to run, comma-separated (default: all): metadata, shards, images, preload,
    /// partial.
    #[arg(long, env = "LAKECACHE_BENCH_WORKLOADS", value_delimiter = ',')]
    workloads: Option<Vec<Workload>>,
    /// Number of shards (profile default otherwise).
    #[arg(long, env = "LAKECACHE_BENCH_SHARDS")]
    shards: Option<u64>,
    /// Size of one shard.
    #[arg(long, env = "LAKECACHE_BENCH_SHARD_SIZE")]
    shard_size: Option<ByteSize>,
    /// Number of images.
    #[arg(long, env = "LAKECACHE_BENCH_IMAGES")]
    images: Option<u64>,
    /// Mean size of one image.
    #[arg(long, env = "LAKECACHE_BENCH_IMAGE_SIZE")]
    image_size: Option<ByteSize>,
    /// lakecache's Memory tier over all workers (and the peers' cache size with --disk).
    #[arg(long, env = "LAKECACHE_BENCH_MEMORY")]
    memory: Option<ByteSize>,
    /// lakecache's Disk tier over all workers.
    #[arg(long, env = "LAKECACHE_BENCH_DISK")]
    disk: Option<ByteSize>,
    /// Bound on one workload of one system; past it the run cleans up and exits (status 3).
    #[arg(long, env = "LAKECACHE_BENCH_WORKLOAD_TIMEOUT")]
    workload_timeout: Option<humantime::Duration>,
    /// The `lakecache` binary (`cargo build --release -p lakecache`).
    #[arg(long, env = "LAKECACHE_BENCH_LAKECACHE", default_value = "lakecache")]
    lakecache: PathBuf,
    /// The versitygw binary (`scripts/setup --env` exports it).
    #[arg(long, env = "LAKECACHE_VERSITYGW", default_value = "versitygw")]
    versitygw: PathBuf,
    /// The toxiproxy server binary (`scripts/setup --env` exports it).
    #[arg(
        long,
        env = "LAKECACHE_TOXIPROXY_SERVER",
        default_value = "toxiproxy-server"
    )]
    toxiproxy: PathBuf,
    #[arg(long, env = "LAKECACHE_BENCH_RCLONE", default_value = "rclone")]
    rclone: PathBuf,
    #[arg(long, env = "LAKECACHE_BENCH_S3FS", default_value = "s3fs")]
    s3fs: PathBuf,
    #[arg(long, env = "LAKECACHE_BENCH_BINDFS", default_value = "bindfs")]
    bindfs: PathBuf,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        // The whole chain on one line, without the backtrace RUST_BACKTRACE may ask anyhow for.
        eprintln!("lakecache-bench: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let plan = Plan::new(
        cli.profile,
        cli.link,
        Overrides {
            shards: cli.shards,
            shard_size: cli.shard_size,
            images: cli.images,
            image_size: cli.image_size,
            memory: cli.memory,
            disk: cli.disk,
            systems: cli.systems.clone(),
            workloads: cli.workloads.clone(),
            workload_timeout: cli.workload_timeout.map(Into::into),
        },
    )
    .map_err(anyhow::Error::msg)?;
    if !nix::unistd::geteuid().is_root() {
        bail!("lakecache-bench needs root: it creates a network namespace, qdiscs and mounts");
    }
    let janitor = janitor::Janitor::new();
    janitor.on_signals()?;
    net::sweep_stale(&cli.work);
    let needs = |k: fn(&SystemKind) -> bool| plan.systems.iter().any(k);
    let setup = runner::Setup {
        work: cli.work.join(std::process::id().to_string()),
        out: cli.out.clone(),
        lake: net::LakeBins {
            versitygw: resolve(&cli.versitygw, true)?,
            toxiproxy: resolve(&cli.toxiproxy, true)?,
        },
        systems: systems::SystemBins {
            lakecache: resolve(&cli.lakecache, needs(SystemKind::is_lakecache))?,
            rclone: resolve(&cli.rclone, needs(|k| *k == SystemKind::Rclone))?,
            s3fs: resolve(&cli.s3fs, needs(|k| *k == SystemKind::S3fs))?,
            bindfs: resolve(&cli.bindfs, needs(|k| *k == SystemKind::FuseCopy))?,
        },
    };
    let mut results = runner::run(&plan, &setup, &janitor);
    // Clean up before writing, so a failure to write still leaves the machine as it was.
    janitor.run_all();
    if janitor.interrupted() {
        // The signal's thread cleaned up and exits the process with the signal's status; what
        // failed here failed because of it.
        loop {
            std::thread::park();
        }
    }
    let results = results.as_mut().map_err(|e| anyhow::anyhow!("{e:#}"))?;
    results.versions = versions(&setup);
    results.machine.perf = perf_hint();
    results.notes.push(
        "Preload rows: lakecache's is `lakecache local --preload '**'` (every worker loads its \
         share, nothing read through the mount); rclone's and s3fs's, which have no preload, \
         read everything once with the preload readers; tmpfs's is the copy."
            .into(),
    );
    write_results(results, &cli.out)?;
    println!("{}", results.markdown());
    eprintln!(
        "lakecache-bench: wrote {}/results.json, results.md, results.png",
        cli.out.display()
    );
    Ok(())
}

/// Writes `results.json`, `results.md` and `results.png` into `out`.
fn write_results(results: &report::Results, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(results)? + "\n",
    )?;
    std::fs::write(out.join("results.md"), results.markdown())?;
    chart::draw(results, &out.join("results.png")).context("drawing results.png")?;
    Ok(())
}

/// A program path, looked up on PATH when it has no slash; checked only when `needed`.
fn resolve(p: &Path, needed: bool) -> anyhow::Result<PathBuf> {
    if !needed {
        return Ok(p.to_path_buf());
    }
    let found = if p.components().count() > 1 {
        p.is_file().then(|| p.to_path_buf())
    } else {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join(p))
                .find(|c| c.is_file())
        })
    };
    found.with_context(|| {
        format!(
            "{} not found: `scripts/setup --env` builds and exports what the benchmark needs \
             (scripts/bench does all of it)",
            p.display()
        )
    })
}

/// The first line of `PROGRAM ARGS`, or the version in a setup-built binary's name.
fn versions(setup: &runner::Setup) -> std::collections::BTreeMap<String, String> {
    let first_line = |p: &Path, args: &[&str]| {
        proc::run(Command::new(p).args(args), Duration::from_secs(10))
            .ok()
            .and_then(|o| o.lines().next().map(|l| l.trim().to_string()))
            .unwrap_or_default()
    };
    let from_name = |p: &Path| {
        p.file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| {
                n.split('-').find(|part| {
                    part.starts_with('v') && part[1..].starts_with(|c: char| c.is_ascii_digit())
                })
            })
            .map(String::from)
            .unwrap_or_default()
    };
    let mut v = std::collections::BTreeMap::new();
    let s = &setup.systems;
    v.insert("lakecache".into(), first_line(&s.lakecache, &["--version"]));
    v.insert("rclone".into(), first_line(&s.rclone, &["--version"]));
    v.insert("s3fs".into(), first_line(&s.s3fs, &["--version"]));
    v.insert("bindfs".into(), first_line(&s.bindfs, &["--version"]));
    v.insert("versitygw".into(), from_name(&setup.lake.versitygw));
    v.insert("toxiproxy".into(), from_name(&setup.lake.toxiproxy));
    v.retain(|_, val| !val.is_empty());
    v
}

/// Whether `perf` can profile here (hardware counters are often missing in VMs).
fn perf_hint() -> String {
    match proc::run(
        Command::new("perf").args(["stat", "-e", "instructions,task-clock", "true"]),
        Duration::from_secs(10),
    ) {
        Err(e) if format!("{e:#}").contains("starting") => "perf is not installed".into(),
        _ => {
            let out = Command::new("perf")
                .args(["stat", "-e", "instructions", "true"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stderr).to_string())
                .unwrap_or_default();
            if out.contains("not supported") {
                "perf works, without hardware counters (instructions: <not supported>); \
                 sample with `perf record -e cpu-clock`"
                    .into()
            } else {
                "perf works, with hardware counters".into()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_valid() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_lists() {
        let c = Cli::try_parse_from([
            "lakecache-bench",
            "--systems",
            "lakecache-1w,tmpfs",
            "--workloads",
            "shards,images",
            "--link",
            "near",
        ])
        .unwrap();
        assert_eq!(
            c.systems,
            Some(vec![SystemKind::Lakecache(1), SystemKind::Tmpfs])
        );
        assert_eq!(c.workloads, Some(vec![Workload::Shards, Workload::Images]));
        assert_eq!(c.link, LinkName::Near);
    }
}
