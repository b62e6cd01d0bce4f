//! A real HDFS for tests: Hadoop's MiniDFSCluster (one namenode, one datanode, in one JVM) on
//! loopback ports, started by our launcher `tools/hdfs/MiniHdfs.java`, which `scripts/setup`
//! compiles against the jars `tools/hdfs/pom.xml` pins.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::cluster::tail;

/// How long the cluster may take to print `READY` (about 10 s here when warm).
const START_LIMIT: Duration = Duration::from_secs(90);
/// How long a stop may take before the JVM is killed (under a second here).
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// A real HDFS: Hadoop's MiniDFSCluster, with permissions on, in a temporary directory that goes
/// with it.
///
/// The namenode's RPC server is at 127.0.0.1:[`HdfsServer::port`]; the datanode listens on a
/// loopback port of its own, which the namenode hands out, and clients connect to it directly
/// for the data (so a proxy in front of the namenode does not see the bytes). Owned by the user
/// running the tests, who is HDFS's superuser; `/private` (0700, holding `/private/secret.bin`)
/// is there for checking that another user (`HADOOP_USER_NAME`) is refused, and `/shared`
/// (0700, owned by the HDFS user `alice`, holding `/shared/alice.bin`) for checking that the
/// right one is let in.
///
/// Needs `LAKECACHE_HDFS_HOME`, which `scripts/setup --env` exports, and `java` on `PATH`.
pub struct HdfsServer {
    child: Child,
    port: u16,
    log: PathBuf,
    // Dropped after the JVM has ended (Drop::drop runs before the fields are dropped).
    _dir: tempfile::TempDir,
}

impl HdfsServer {
    /// Starts the cluster and waits until it is up (the launcher prints `READY <port>`), 90 s at
    /// most.
    pub fn start() -> anyhow::Result<Self> {
        let home = std::env::var_os("LAKECACHE_HDFS_HOME").context(
            "LAKECACHE_HDFS_HOME is not set: run `eval \"$(scripts/setup --env)\"` first \
             (it fetches Hadoop's MiniDFSCluster and compiles tools/hdfs/MiniHdfs.java)",
        )?;
        let home = PathBuf::from(home);
        anyhow::ensure!(
            home.join("classes/MiniHdfs.class").exists(),
            "LAKECACHE_HDFS_HOME={} has no classes/MiniHdfs.class: run `eval \"$(scripts/setup --env)\"` again",
            home.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("lakecache-hdfs-")
            .tempdir()?;
        let log = dir.path().join("minihdfs.log");
        let classpath = format!(
            "{}:{}/*",
            home.join("classes").display(),
            home.join("lib").display()
        );
        let mut child = Command::new("java")
            .arg("-Xmx512m")
            .arg("-cp")
            .arg(&classpath)
            .arg("MiniHdfs")
            .arg("0")
            .arg(dir.path().join("dfs"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(File::create(&log).with_context(|| format!("creating {}", log.display()))?)
            .spawn()
            .context("starting java: run scripts/setup (it installs openjdk-17-jdk-headless)")?;

        // The launcher's stdout carries its READY line and nothing else; a thread reads it, so
        // that the wait below is bounded.
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = Self {
            child,
            port: 0,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "MiniHdfs exited ({status}) while starting; the end of its log:\n{}",
                    tail(&server.log, 30)
                );
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // Dropping `server` kills the JVM; the log goes with the directory, so its end
                // is read first.
                bail!(
                    "MiniHdfs was not ready within {START_LIMIT:?}; the end of its log:\n{}",
                    tail(&server.log, 30)
                );
            }
            match rx.recv_timeout(left.min(Duration::from_millis(500))) {
                Ok(Ok(line)) => match line.strip_prefix("READY ") {
                    Some(port) => {
                        server.port = port
                            .trim()
                            .parse()
                            .with_context(|| format!("MiniHdfs printed {line:?}"))?;
                        return Ok(server);
                    }
                    None => bail!("MiniHdfs printed {line:?} before READY"),
                },
                Ok(Err(e)) => bail!("reading MiniHdfs's stdout: {e}"),
                // EOF: the process is exiting; try_wait reports it on the next turn.
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
    }

    /// The namenode's RPC port, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `hdfs://127.0.0.1:<port>/<prefix>`.
    pub fn uri(&self, prefix: &str) -> String {
        format!(
            "hdfs://127.0.0.1:{}/{}",
            self.port,
            prefix.trim_start_matches('/')
        )
    }

    /// The JVM's process id (namenode and datanode both), for tests that stop it with SIGSTOP
    /// to hang the filesystem.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The launcher's log (Hadoop's warnings, stderr).
    pub fn log(&self) -> &std::path::Path {
        &self.log
    }
}

impl Drop for HdfsServer {
    fn drop(&mut self) {
        // Either ends it: EOF on stdin, SIGTERM. SIGCONT in case a test left it stopped.
        drop(self.child.stdin.take());
        let pid = Pid::from_raw(self.child.id() as i32);
        if let Ok(None) = self.child.try_wait() {
            let _ = kill(pid, Signal::SIGTERM);
            let _ = kill(pid, Signal::SIGCONT);
        }
        let deadline = Instant::now() + STOP_LIMIT;
        while let Ok(None) = self.child.try_wait() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- the end of MiniHdfs ({}) ---\n{}",
                self.log.display(),
                tail(&self.log, 15)
            );
        }
    }
}
