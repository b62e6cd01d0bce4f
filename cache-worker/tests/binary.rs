//! The `lakecache-worker` binary as a pod runs it: configured by a file and flags, ready once
//! serving, stopped gracefully by SIGTERM; bad configuration fails at once with a clear message.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

#[test]
fn starts_from_a_config_file_and_stops_on_sigterm() {
    let lake = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("token"), "t0k3n\n").unwrap();
    let (grpc, admin) = (free_port(), free_port());
    let config = format!(
        "id: w-0\nsource:\n  uri: file://{}\nlisten: 127.0.0.1:{grpc}\nadminListen: 127.0.0.1:{admin}\n\
         tiers:\n  - {{ kind: Memory, path: {}, size: 64MiB }}\n  - {{ kind: Disk, path: {}, size: 128MiB }}\n\
         tokenFile: {}\n",
        lake.path().display(),
        work.path().join("mem").display(),
        work.path().join("disk").display(),
        work.path().join("token").display(),
    );
    std::fs::write(work.path().join("worker.yaml"), config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lakecache-worker"))
        .arg("--config")
        .arg(work.path().join("worker.yaml"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if get(admin, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "worker never became ready"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let metrics = get(admin, "/metrics").unwrap();
    assert!(
        metrics.contains("lakecache_worker_tier_capacity_bytes{tier=\"memory\"} 67108864"),
        "{metrics}"
    );
    assert!(TcpStream::connect(("127.0.0.1", grpc)).is_ok());
    assert!(
        Command::new("kill")
            .arg(child.id().to_string())
            .status()
            .unwrap()
            .success()
    );
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "worker did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "worker exited with {status}");
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!err.contains("t0k3n"), "the token was logged");
    assert!(err.contains("SIGTERM received"), "{err}");
}

#[test]
fn bad_configuration_fails_at_once() {
    let work = tempfile::tempdir().unwrap();
    std::fs::write(
        work.path().join("bad.yaml"),
        "source: { uri: s3://b }\ntiers: []\nbogus: 1\n",
    )
    .unwrap();
    std::fs::write(work.path().join("empty-token"), "").unwrap();
    std::fs::write(work.path().join("blank-token"), " \n\t\n").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--config".into(),
                work.path().join("bad.yaml").display().to_string(),
            ],
            "bogus",
        ),
        (
            vec!["--config".into(), "/nonexistent/worker.yaml".into()],
            "/nonexistent/worker.yaml",
        ),
        (vec!["--source".into(), "file:///tmp".into()], "no tiers"),
        (
            vec![
                "--source".into(),
                "file:///tmp".into(),
                "--memory".into(),
                "1MiB".into(),
                "--block-size".into(),
                "4MiB".into(),
                "--listen".into(),
                "127.0.0.1:0".into(),
            ],
            "smaller than one block",
        ),
        // Fail closed: no token on a network address, an empty or blank token, a secret on
        // the command line.
        (
            vec![
                "--source".into(),
                "file:///tmp".into(),
                "--memory".into(),
                "64MiB".into(),
                "--listen".into(),
                "0.0.0.0:0".into(),
            ],
            "--insecure-open-data-plane",
        ),
        (
            vec![
                "--source".into(),
                "file:///tmp".into(),
                "--memory".into(),
                "64MiB".into(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--token-file".into(),
                work.path().join("empty-token").display().to_string(),
            ],
            "is empty",
        ),
        (
            vec![
                "--source".into(),
                "file:///tmp".into(),
                "--memory".into(),
                "64MiB".into(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--token-file".into(),
                work.path().join("blank-token").display().to_string(),
            ],
            "is empty",
        ),
        (
            vec![
                "--source".into(),
                "s3://b".into(),
                "--memory".into(),
                "64MiB".into(),
                "--source-option".into(),
                "secret_access_key=hunter2".into(),
            ],
            "--credentials-dir",
        ),
        (
            vec![
                "--source".into(),
                "file:///tmp".into(),
                "--disk".into(),
                "/tmp/x".into(),
            ],
            "PATH:SIZE",
        ),
    ];
    for (args, want) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_lakecache-worker"))
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: expected {want:?} in {err}");
        assert!(!err.contains("hunter2"), "a secret was printed: {err}");
    }
}

/// Outside Kubernetes a Memory tier without a path gets a private directory in /dev/shm: a
/// random name made fresh (so nothing planted beforehand is used), mode 0700, removed at exit;
/// the tiers of workers that died are removed at the next start, and a symlink is never
/// followed.
#[test]
fn memory_tiers_in_shared_memory_are_private() {
    use std::os::unix::fs::PermissionsExt;
    // What another user could plant under the old, predictable name, and a stale tier of a
    // dead process (no pid is above 2^22) next to a symlink of the same shape.
    let victim = tempfile::tempdir().unwrap();
    std::fs::write(victim.path().join("keep"), "x").unwrap();
    let planted = std::path::PathBuf::from("/dev/shm/lakecache-w-private");
    let _ = std::fs::remove_file(&planted);
    std::os::unix::fs::symlink(victim.path(), &planted).unwrap();
    let stale = std::path::PathBuf::from("/dev/shm/lakecache-4194399-worker-gone-x");
    std::fs::create_dir_all(&stale).unwrap();
    let stale_link = std::path::PathBuf::from("/dev/shm/lakecache-4194398-worker-link");
    let _ = std::fs::remove_file(&stale_link);
    std::os::unix::fs::symlink(victim.path(), &stale_link).unwrap();

    let (grpc, admin) = (free_port(), free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_lakecache-worker"))
        .args([
            "--id",
            "w-private",
            "--source",
            "file:///tmp",
            "--memory",
            "64MiB",
        ])
        .args(["--listen", &format!("127.0.0.1:{grpc}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !get(admin, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "worker never became ready"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let dirs = lakecache_worker::store::memory_dirs_of(child.id());
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let name = dirs[0].file_name().unwrap().to_str().unwrap().to_string();
    assert!(
        name.starts_with(&format!("lakecache-{}-worker-w-private-", child.id())),
        "{name}"
    );
    let meta = std::fs::symlink_metadata(&dirs[0]).unwrap();
    assert!(meta.is_dir());
    assert_eq!(meta.permissions().mode() & 0o777, 0o700, "{name}");
    assert!(!stale.exists(), "the tier of a dead worker was left");
    assert!(
        std::fs::symlink_metadata(&stale_link).is_ok(),
        "a symlink was removed"
    );
    assert!(
        victim.path().join("keep").exists(),
        "a symlink was followed"
    );
    assert_eq!(std::fs::read_dir(victim.path()).unwrap().count(), 1);

    assert!(
        Command::new("kill")
            .arg(child.id().to_string())
            .status()
            .unwrap()
            .success()
    );
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "worker did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!dirs[0].exists(), "the memory tier outlived the worker");
    let _ = std::fs::remove_file(&planted);
    let _ = std::fs::remove_file(&stale_link);
}
