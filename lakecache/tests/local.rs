//! `lakecache local` as a user runs it: the real binary mounts a lake, serves reads, and
//! unmounts cleanly on SIGTERM and on SIGINT.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn mounted(at: &std::path::Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let at = at.to_string_lossy().to_string();
    mounts
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(at.as_str()))
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How a test ends `lakecache local`.
enum Stop {
    Signal(&'static str),
    /// `fusermount3 -u`, as a user (or a cleanup script) might.
    Unmount,
}

fn run_and_stop(how: Stop) {
    // A memory tier left behind by a process that is gone (no pid is above 2^22) is removed.
    // Each test has its own, as they run at once.
    let fake_pid = 4_194_305
        + match how {
            Stop::Signal(s) => s.len() as u32,
            Stop::Unmount => 0,
        };
    let stale = std::path::PathBuf::from(format!("/dev/shm/lakecache-{fake_pid}-local-0"));
    std::fs::create_dir_all(&stale).unwrap();
    let lake = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(lake.path().join("a b/ç")).unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(lake.path().join("a b/ç/data.bin"), &data).unwrap();
    let work = tempfile::tempdir().unwrap();
    let mnt = work.path().join("mnt");
    let mut child = Command::new(env!("CARGO_BIN_EXE_lakecache"))
        .args([
            "local",
            "--workers",
            "2",
            "--memory",
            "64MiB",
            "--block-size",
            "1MiB",
        ])
        .arg("--source")
        .arg(format!("file://{}", lake.path().display()))
        .arg("--mount")
        .arg(&mnt)
        .arg("--disk")
        .arg(format!("{}:256MiB", work.path().join("cache").display()))
        .stderr(Stdio::piped())
        .spawn()
        .expect("start lakecache local");
    wait_for("the mount", Duration::from_secs(20), || mounted(&mnt));
    let got = std::fs::read(mnt.join("a b/ç/data.bin")).expect("read through the mount");
    assert!(got == data, "bytes differ");
    assert!(
        std::fs::write(mnt.join("new"), b"x").is_err(),
        "the mount is writable"
    );
    assert!(!stale.exists(), "a dead process's memory tier was kept");
    assert!(
        !lakecache_worker::store::memory_dirs_of(child.id()).is_empty(),
        "no memory tier"
    );
    let signal = match how {
        Stop::Signal(signal) => {
            let status = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(child.id().to_string())
                .status();
            assert!(status.unwrap().success());
            signal
        }
        Stop::Unmount => {
            let status = Command::new("fusermount3").arg("-u").arg(&mnt).status();
            assert!(status.unwrap().success());
            "(none: unmounted from outside)"
        }
    };
    let start = Instant::now();
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "lakecache did not stop on SIG{signal}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        exit.success(),
        "lakecache exited with {exit} on SIG{signal}"
    );
    assert!(!mounted(&mnt), "still mounted after SIG{signal}");
    assert!(
        lakecache_worker::store::memory_dirs_of(child.id()).is_empty(),
        "the memory tier outlived the process"
    );
}

#[test]
fn mounts_serves_and_unmounts_on_sigterm() {
    run_and_stop(Stop::Signal("TERM"));
}

#[test]
fn unmounts_on_sigint() {
    run_and_stop(Stop::Signal("INT"));
}

#[test]
fn stops_when_unmounted_from_outside() {
    run_and_stop(Stop::Unmount);
}

/// Runs `lakecache` with `args`; it must fail (not mount and wait) within 20 s.
fn must_fail(args: &[&str]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lakecache"))
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("lakecache {args:?} did not fail within 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "lakecache {args:?} succeeded");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    err
}

#[test]
fn bad_or_missing_sources_fail_clearly() {
    let work = tempfile::tempdir().unwrap();
    let mnt = work.path().join("mnt");
    let mnt = mnt.to_str().unwrap();
    let err = must_fail(&["local", "--source", "ftp://x/y", "--mount", mnt]);
    assert!(
        err.contains("use s3, oss, gs, azblob, hdfs or file"),
        "{err}"
    );
    let missing = work.path().join("no-such-lake");
    let uri = format!("file://{}", missing.display());
    let err = must_fail(&["local", "--source", &uri, "--mount", mnt]);
    assert!(err.contains("is not a directory on this machine"), "{err}");
    assert!(!missing.exists(), "the missing lake was created");
    let err = must_fail(&["local", "--source", "s3://", "--mount", mnt]);
    assert!(err.contains("bucket is empty"), "{err}");
}

#[test]
fn preloads_on_request_and_keeps_local_copies() {
    use std::io::{BufRead, BufReader};
    let lake = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(lake.path().join("train")).unwrap();
    let data: Vec<u8> = (0..2_500_000u32).map(|i| (i % 249) as u8).collect();
    std::fs::write(lake.path().join("train/a.rec"), &data).unwrap();
    std::fs::write(lake.path().join("train/b.rec"), &data[..1000]).unwrap();
    std::fs::write(lake.path().join("other.txt"), b"not preloaded").unwrap();
    let work = tempfile::tempdir().unwrap();
    let copies = tempfile::tempdir_in("/dev/shm").unwrap();
    let mnt = work.path().join("mnt");
    let mut child = Command::new(env!("CARGO_BIN_EXE_lakecache"))
        .args([
            "local",
            "--workers",
            "2",
            "--memory",
            "64MiB",
            "--block-size",
            "1MiB",
        ])
        .args(["--preload", "train/**"])
        .arg("--source")
        .arg(format!("file://{}", lake.path().display()))
        .arg("--mount")
        .arg(&mnt)
        .arg("--local-cache")
        .arg(format!("{}:64MiB", copies.path().display()))
        .stderr(Stdio::piped())
        .spawn()
        .expect("start lakecache local");
    // The summary line: both files under train/, every byte of them.
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let summary = loop {
        let line = lines.next().expect("a summary line").unwrap();
        if line.contains("preloaded") {
            break line;
        }
    };
    assert!(
        summary.contains("preloaded 2 files, 2501000 bytes"),
        "{summary}"
    );
    assert!(!summary.contains("failed"), "{summary}");
    // Reading keeps a whole local copy of the file, which later opens are served from.
    assert!(std::fs::read(mnt.join("train/a.rec")).unwrap() == data);
    wait_for("the local copy", Duration::from_secs(10), || {
        std::fs::read_dir(copies.path().join(lakecache_client::local_cache::SUBDIR))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                e.metadata().map(|m| m.len()).unwrap_or(0) == data.len() as u64
                    && !e.file_name().to_string_lossy().ends_with(".part")
            })
    });
    assert!(std::fs::read(mnt.join("train/a.rec")).unwrap() == data);
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < Duration::from_secs(20), "did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!mounted(&mnt));
}
