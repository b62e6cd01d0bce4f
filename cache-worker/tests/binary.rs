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
            ],
            "smaller than one block",
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
    }
}
