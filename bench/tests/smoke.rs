//! The whole benchmark at tiny sizes, inside the test command: the real lake (versitygw in a
//! network namespace behind tbf and toxiproxy), every system (the real `lakecache local`
//! binary with 1 and 3 workers and with local copies, the CSI data path of worker processes and
//! a `lakecache-csi-node fuse-server` over both of its transports, rclone, s3fs, direct reads,
//! tmpfs, bindfs), every workload, and the three result files; then that a run leaves nothing
//! behind, also when it is interrupted.
//!
//! Needs root and what `scripts/setup --env` exports (`scripts/test` provides both). The
//! `lakecache` binary is `$LAKECACHE_BENCH_LAKECACHE`, or the one next to this test, built or
//! brought up to date here (with `lakecache-worker` and `lakecache-csi-node` beside it).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The default systems and the CSI path over gRPC only (not a default: it is the data path
/// before the block transport, for an A/B).
const SYSTEMS: [&str; 10] = [
    "lakecache-1w",
    "lakecache-3w",
    "lakecache-1w-local",
    "lakecache-3w-csi",
    "lakecache-3w-csi-grpc",
    "rclone",
    "s3fs",
    "direct",
    "tmpfs",
    "fuse-copy",
];

/// The `lakecache` binary: `$LAKECACHE_BENCH_LAKECACHE`, or the one cargo builds next to this
/// test under `cargo test --workspace`; built here (once) if it is missing or older than the
/// sources it is made of, as after `cargo test -p lakecache-bench` alone.
fn lakecache_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("LAKECACHE_BENCH_LAKECACHE") {
            return p.into();
        }
        // target/<profile>/deps/smoke-<hash> → target/<profile>/lakecache
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        let bin = profile_dir.join("lakecache");
        let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
        let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo");
        let root = Path::new(&manifest_dir).parent().unwrap();
        let sources = [
            "lakecache",
            "client",
            "cache-worker",
            "csi-node",
            "lake",
            "telemetry",
            "proto",
        ]
        .iter()
        .map(|d| newest(&root.join(d)))
        .chain([newest(&root.join("Cargo.lock"))])
        .max()
        .flatten();
        if built.is_none() || sources > built {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut build = Command::new(cargo);
            build
                .args(["build", "-q", "-p", "lakecache", "-p", "lakecache-worker"])
                .args(["-p", "lakecache-csi-node", "--target-dir"])
                .arg(profile_dir.parent().unwrap())
                .current_dir(root);
            if profile_dir.file_name().is_some_and(|n| n == "release") {
                build.arg("--release");
            }
            let status = build.status().expect("running cargo build");
            assert!(
                status.success(),
                "cargo build of lakecache's binaries failed"
            );
        }
        bin
    })
    .clone()
}

/// The newest modification time of a file or of any file under a directory.
fn newest(path: &Path) -> Option<std::time::SystemTime> {
    let m = std::fs::symlink_metadata(path).ok()?;
    if !m.is_dir() {
        return m.modified().ok();
    }
    std::fs::read_dir(path)
        .ok()?
        .flatten()
        .filter(|e| e.file_name() != "target")
        .filter_map(|e| newest(&e.path()))
        .max()
}

fn bench(out: &Path, work: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lakecache-bench"));
    // The caller's benchmark settings must not change what the test runs.
    for (k, _) in std::env::vars() {
        if k.starts_with("LAKECACHE_BENCH_") {
            c.env_remove(k);
        }
    }
    c.args([
        "--profile",
        "small",
        "--link",
        "near",
        "--workload-timeout",
        "60s",
    ])
    .arg("--out")
    .arg(out)
    .arg("--work")
    .arg(work)
    .arg("--lakecache")
    .arg(lakecache_bin())
    .args(extra);
    c
}

/// Waits for `child` at most `limit`, killing it past that.
fn wait(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the benchmark did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The pids of the cache processes a run started, from its progress lines.
fn started_pids(log: &str) -> Vec<u32> {
    log.lines()
        .filter(|l| l.contains(": ready (pid "))
        .filter_map(|l| l.rsplit_once("(pid ")?.1.trim_end_matches(')').parse().ok())
        .collect()
}

/// Nothing of the run with `pid` is left: no namespace, no veth, no mount, no work directory,
/// no process it started, no memory tier of a lakecache it started.
fn assert_clean(work: &Path, pid: u32, log: &str) {
    let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let ns = String::from_utf8_lossy(&ns.stdout);
    assert!(
        !ns.lines()
            .any(|l| l.starts_with(&format!("lcb-{pid} ")) || l == format!("lcb-{pid}")),
        "namespace lcb-{pid} left behind: {ns}"
    );
    let link = Command::new("ip")
        .args(["link", "show", &format!("lcbh{pid}")])
        .output()
        .unwrap();
    assert!(!link.status.success(), "veth lcbh{pid} left behind");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let dir = work.to_string_lossy().to_string();
    assert!(
        !mounts.lines().any(|l| l.contains(&dir)),
        "mounts left under {dir}:\n{mounts}"
    );
    assert!(!work.join(pid.to_string()).exists(), "work directory left");
    let children = started_pids(log);
    assert!(!children.is_empty(), "no cache process was started:\n{log}");
    for child in children {
        assert!(
            !Path::new("/proc").join(child.to_string()).exists(),
            "process {child} outlived the run"
        );
        let prefix = format!("lakecache-{child}-");
        let left: Vec<String> = std::fs::read_dir("/dev/shm")
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with(&prefix))
            .collect();
        assert!(left.is_empty(), "memory tiers left in /dev/shm: {left:?}");
    }
}

fn rows<'a>(r: &'a Value, system: &str, workload: &str) -> Vec<&'a Value> {
    r["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|row| row["system"] == system && row["workload"] == workload)
        .collect()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("{v} is not a number"))
}

#[test]
fn small_profile_measures_every_system_and_writes_every_file() {
    let out = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let systems = SYSTEMS.join(",");
    let mut child = bench(out.path(), work.path(), &["--systems", &systems])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting lakecache-bench");
    let pid = child.id();
    let stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let status = wait(&mut child, Duration::from_secs(150));
    let log = log.join().unwrap();
    assert!(
        status.success(),
        "lakecache-bench failed ({status}):\n{log}"
    );
    eprintln!(
        "the small profile took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_clean(work.path(), pid, &log);

    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("results.json")).unwrap())
            .unwrap();
    assert_eq!(r["plan"]["profile"], "small");
    assert!(f(&r["raw_link"]["mb_s"]) > 1.0);
    let images = r["plan"]["dataset"]["images"].as_u64().unwrap();
    let images_bytes = r["images_bytes"].as_u64().unwrap();
    let shards_bytes = r["shards_bytes"].as_u64().unwrap();
    let total = r["dataset_bytes"].as_u64().unwrap();
    for sys in SYSTEMS {
        let cache_process = !matches!(sys, "direct" | "tmpfs");
        let lakecache = sys.starts_with("lakecache");
        // Local copies: warm opens go to the kernel (passthrough), not to the workers.
        let local_copies = sys.ends_with("-local");
        // The CSI path: a FUSE server and worker processes apart.
        let csi = sys.contains("-csi");
        for (workload, bytes) in [
            ("metadata", 0),
            ("shards", shards_bytes),
            ("images", images_bytes),
        ] {
            let rs = rows(&r, sys, workload);
            assert_eq!(rs.len(), 2, "{sys} {workload}: cold and warm");
            for (row, phase) in rs.iter().zip(["cold", "warm"]) {
                let what = format!("{sys} {workload} {phase}");
                assert_eq!(row["phase"], phase, "{what}");
                assert_eq!(row["bytes"].as_u64(), Some(bytes), "{what}");
                let fig = if workload == "metadata" {
                    f(&row["files_s"])
                } else {
                    f(&row["mb_s"])
                };
                assert!(fig.is_finite() && fig > 0.0, "{what}: {fig}");
                if workload == "metadata" {
                    assert_eq!(row["files"].as_u64(), Some(images), "{what}");
                }
                assert!(f(&row["p50_ms"]) <= f(&row["p99_ms"]), "{what}");
                if cache_process {
                    assert!(f(&row["peak_rss"]) > 0.0, "{what}: peak RSS");
                    assert!(f(&row["cpu_seconds"]) >= 0.0, "{what}: CPU");
                }
                // CPU per GB: the reader is the process the mount lives in, the worker the
                // CSI path's worker processes; CPU ticks are 10 ms, so a short epoch may
                // measure none.
                let (reader, worker) = (&row["reader_cpu_s_per_gb"], &row["worker_cpu_s_per_gb"]);
                if cache_process && workload != "metadata" {
                    let cpu = f(reader);
                    assert!(cpu.is_finite() && cpu >= 0.0, "{what}: reader CPU/GB {cpu}");
                } else {
                    assert!(reader.is_null(), "{what}: reader CPU/GB {reader}");
                }
                if csi && workload != "metadata" {
                    let cpu = f(worker);
                    assert!(cpu.is_finite() && cpu >= 0.0, "{what}: worker CPU/GB {cpu}");
                } else {
                    assert!(worker.is_null(), "{what}: worker CPU/GB {worker}");
                }
            }
            if lakecache && workload != "metadata" {
                assert!(f(&rs[0]["hit_ratio"]) < 0.05, "{sys} {workload} cold hits");
                let warm = &rs[1]["hit_ratio"];
                assert!(
                    (local_copies && warm.is_null()) || f(warm) > 0.99,
                    "{sys} {workload} warm hits: {warm}"
                );
                assert!(f(&rs[1]["memory_tier_used"]) > 0.0, "{sys}: tier used");
            }
        }
        // The block transport sends warm Memory tier blocks with sendfile; gRPC never does, nor
        // lakecache local, whose reader calls its workers in the process.
        if lakecache {
            let sent: f64 = ["shards", "images"]
                .iter()
                .flat_map(|w| rows(&r, sys, w))
                .map(|row| f(&row["sendfile_bytes"]))
                .sum();
            if sys == "lakecache-3w-csi" {
                assert!(sent > 0.0, "{sys}: nothing went out with sendfile");
            } else {
                assert_eq!(sent, 0.0, "{sys}: bytes went out with sendfile");
            }
        }
        let preload = rows(&r, sys, "preload");
        match sys {
            "direct" | "fuse-copy" | "lakecache-3w-csi" | "lakecache-3w-csi-grpc" => {
                assert!(preload.is_empty(), "{sys} has no preload")
            }
            _ => {
                assert_eq!(preload.len(), 1, "{sys} preload");
                assert_eq!(preload[0]["bytes"].as_u64(), Some(total), "{sys} preload");
                assert!(f(&preload[0]["mb_s"]) > 0.0);
            }
        }
        let partial = rows(&r, sys, "partial");
        if (lakecache && !local_copies) || sys == "rclone" {
            assert_eq!(partial.len(), 3, "{sys}: three partial-cache epochs");
            for row in &partial {
                assert_eq!(row["bytes"].as_u64(), Some(images_bytes));
            }
            if lakecache {
                // Half the images fit: some hits once the cache has filled, never all.
                let later = f(&partial[2]["hit_ratio"]);
                assert!(
                    later > 0.0 && later < 1.0,
                    "{sys} epoch 3 hit ratio {later}"
                );
                let used = f(&partial[2]["memory_tier_used"]);
                assert!(
                    used <= (images_bytes / 2) as f64 + 1.0,
                    "{sys} tier over its size"
                );
            }
        } else {
            assert!(partial.is_empty(), "{sys} has no bounded cache");
        }
    }
    // Every row compares with tmpfs where tmpfs ran the same thing.
    for row in rows(&r, "lakecache-1w", "images") {
        assert!(f(&row["vs_tmpfs"]) > 0.0);
        assert!(f(&row["vs_best_peer"]) > 0.0);
    }
    let settings = |sys: &str| {
        r["systems"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == sys)
            .map(|s| s["settings"].as_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("no settings for {sys}"))
    };
    assert!(settings("lakecache-3w-csi").contains("block transport"));
    assert!(settings("lakecache-3w-csi-grpc").contains("over gRPC"));
    let targets = r["targets"].as_array().unwrap();
    assert_eq!(
        targets.len(),
        2 * 8 + 7 + 2 * 11,
        "eight targets for each lakecache system (seven without the partial-cache run); on the \
         CSI path none for preload, four more against lakecache-1w"
    );
    let reader_cpu = |w: &str| f(&rows(&r, "lakecache-1w", w)[1]["reader_cpu_s_per_gb"]);
    for t in targets {
        let what = t["target"].as_str().unwrap();
        // A ratio to lakecache-1w's reader CPU has no value if that epoch measured none.
        let no_base = ["shards", "images"]
            .iter()
            .any(|w| what.ends_with(&format!("lakecache-1w's ({w})")) && reader_cpu(w) == 0.0);
        assert!(t["measured"].is_number() || no_base, "{t}");
        let better = if what.contains('≤') {
            "lower"
        } else {
            "higher"
        };
        assert_eq!(t["better"], better, "{t}");
    }
    for sys in ["lakecache-3w-csi", "lakecache-3w-csi-grpc"] {
        let vs_1w: Vec<&str> = targets
            .iter()
            .filter(|t| t["system"] == sys)
            .map(|t| t["target"].as_str().unwrap())
            .filter(|t| t.contains("lakecache-1w"))
            .collect();
        assert_eq!(
            vs_1w,
            [
                "warm shards ≥ 0.8× lakecache-1w (in process)",
                "warm images ≥ 0.8× lakecache-1w (in process)",
                "reader CPU per warm GB ≤ 1.5× lakecache-1w's (shards)",
                "reader CPU per warm GB ≤ 1.5× lakecache-1w's (images)",
            ],
            "{sys}"
        );
    }

    let md = std::fs::read_to_string(out.path().join("results.md")).unwrap();
    for needle in SYSTEMS.iter().chain(&[
        "## Metadata",
        "## Shards",
        "## Images",
        "## Preload",
        "## Partial cache",
        "## Targets",
        "raw link",
        "reader CPU s/GB",
        "in reader",
    ]) {
        assert!(md.contains(needle), "results.md lacks {needle}");
    }
    let png = std::fs::read(out.path().join("results.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert_eq!((width, height), (1500, 760));
    assert!(png.len() > 20_000, "a chart, not a blank image");
    assert!(out.path().join("logs/versitygw.log").exists());
}

#[test]
fn an_interrupted_run_cleans_up() {
    let out = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let mut child = bench(
        out.path(),
        work.path(),
        &[
            "--systems",
            "lakecache-3w,rclone",
            "--workloads",
            "images,partial",
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .expect("starting lakecache-bench");
    let pid = child.id();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            text.push_str(&line);
            text.push('\n');
            let _ = tx.send(line);
        }
        text
    });
    // Interrupt while lakecache is mounted, between its two image epochs.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the run reached lakecache's first epoch");
        if line.contains("lakecache-3w images cold") {
            break;
        }
    }
    nix_kill(pid, "TERM");
    let status = wait(&mut child, Duration::from_secs(60));
    let log = reader.join().unwrap();
    assert_eq!(
        status.code(),
        Some(143),
        "exit status after SIGTERM:\n{log}"
    );
    assert!(log.contains("interrupted; cleaning up"), "{log}");
    assert_clean(work.path(), pid, &log);
    assert!(!out.path().join("results.json").exists());
}

fn nix_kill(pid: u32, signal: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{signal} {pid}");
}
