//! One behaviour suite, every source: the same cases run against a real server of each kind
//! the README names, read the way a user reads them, through the `lakecache` binary's
//! `local` command and its FUSE mount.
//!
//! | source | server |
//! |---|---|
//! | `s3://` | moto's S3 server (PyPI); for bad credentials, versitygw (Go module), which checks signatures |
//! | `oss://` | moto's S3 server spoken to by OpenDAL's `oss` service, path-style: the request shapes, XML, errors and If-Match of OSS, not its signing (no OSS emulator is published in any registry) |
//! | `gs://` | fake-gcs-server (Go module), in memory |
//! | `azblob://` | Azurite's blob service (npm), in memory |
//! | `hdfs://` | Hadoop's MiniDFSCluster (Maven Central), one namenode and one datanode |
//!
//! Each source is reached through a [`Proxy`], so the same test can make it hang (the proxy
//! holds every byte) or die (it closes every connection).

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use lakecache_e2e::s3::S3Gateway;
use lakecache_e2e::{AzuriteServer, GcsServer, HdfsServer, Proxy, S3Server, pattern};
use lakecache_lake::{OpendalSource, SourceSpec};

/// The block size the suite mounts with: small, so that files span several blocks.
const BS: usize = 64 << 10;
/// Where in the bucket (or HDFS tree) the suite's lake lies.
const PREFIX: &str = "lake";

/// How to reach a source at a port (the server's own, or the proxy's in front of it).
struct Access {
    uri: String,
    /// Options that may be on a command line.
    options: BTreeMap<String, String>,
    /// Options that go in a credentials directory (a mounted Secret).
    credentials: BTreeMap<String, String>,
}

impl Access {
    fn spec(&self) -> SourceSpec {
        let mut spec = SourceSpec::new(self.uri.clone());
        spec.options = self.options.clone();
        spec.options.extend(self.credentials.clone());
        spec
    }
}

type AccessFn = Box<dyn Fn(u16) -> Access + Send + Sync>;

/// One source kind under test.
struct Lake {
    label: &'static str,
    /// The loopback port clients connect to first (the proxy goes in front of it).
    port: u16,
    access: AccessFn,
    /// Access the server must refuse, and the secret that must never be printed; or why this
    /// server cannot tell.
    bad_access: Result<(AccessFn, Option<String>), &'static str>,
    /// Why the "object changed" case cannot hold for this server, if it cannot.
    no_if_match: Option<&'static str>,
    /// The servers; dropped (stopped) at the end.
    _servers: Vec<Box<dyn Send>>,
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The suite's files: nested, a name with spaces and non-ASCII, one file for the rewrite, one
/// read before the outage, one only after it started.
fn dataset() -> Vec<(String, Vec<u8>)> {
    [
        ("a/b/c.bin", 1, 4 * BS + 123),
        ("a/top.bin", 2, 10_000),
        ("dir with space/ファイル データ.bin", 3, BS + 7),
        ("rewrite.bin", 4, 32 * BS),
        ("cached.bin", 5, 3 * BS + 5),
        ("lost.bin", 6, 3 * BS + 9),
        ("zero.bin", 7, 0),
    ]
    .into_iter()
    .map(|(p, seed, len)| (p.to_string(), pattern(seed, len)))
    .collect()
}

async fn fill(lake: &Lake, files: &[(String, Vec<u8>)]) -> anyhow::Result<()> {
    let access = (lake.access)(lake.port);
    let source = OpendalSource::new(&access.spec())?;
    let op = source.operator();
    for (path, data) in files {
        op.write(path, data.clone())
            .await
            .with_context(|| format!("{}: writing {path}", lake.label))?;
    }
    op.create_dir("empty/")
        .await
        .with_context(|| format!("{}: making empty/", lake.label))?;
    Ok(())
}

/// A running `lakecache local`, stopped (and unmounted) on drop.
struct Local {
    child: Child,
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

fn mounted(at: &Path) -> bool {
    lakecache_e2e::mountinfo::is_mount_point(at).unwrap_or(false)
}

/// Starts `lakecache local` over `access` (credentials from a directory, as from a Secret).
fn spawn_local(access: &Access) -> anyhow::Result<(Child, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let creds = dir.path().join("credentials");
    std::fs::create_dir(&creds)?;
    for (k, v) in &access.credentials {
        std::fs::write(creds.join(k), v)?;
    }
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lakecache"));
    cmd.args(["local", "--workers", "2", "--memory", "64MiB"])
        .args(["--block-size", "64KiB", "--source-timeout"])
        .arg(format!("{}s", SOURCE_TIMEOUT.as_secs()))
        .arg("--source")
        .arg(&access.uri)
        .arg("--mount")
        .arg(dir.path().join("mnt"))
        .arg("--credentials-dir")
        .arg(&creds)
        .stdout(Stdio::null())
        // A file, not a pipe: nobody reads a pipe while the mount runs, and a full one would
        // block the process's logging.
        .stderr(std::fs::File::create(dir.path().join("stderr"))?);
    for (k, v) in &access.options {
        cmd.arg("--source-option").arg(format!("{k}={v}"));
    }
    Ok((cmd.spawn().context("starting lakecache local")?, dir))
}

impl Local {
    fn start(access: &Access) -> anyhow::Result<Self> {
        let (child, dir) = spawn_local(access)?;
        // The guard first: whatever goes wrong below, the process is stopped and unmounted.
        let mut local = Self {
            child,
            mnt: dir.path().join("mnt"),
            _dir: dir,
        };
        let start = Instant::now();
        while !mounted(&local.mnt) {
            if let Some(status) = local.child.try_wait()? {
                let err = std::fs::read_to_string(local._dir.path().join("stderr"))?;
                bail!("lakecache local exited with {status}: {err}");
            }
            ensure!(
                start.elapsed() < Duration::from_secs(60),
                "not mounted in 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(local)
    }

    fn path(&self, p: &str) -> PathBuf {
        self.mnt.join(p)
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if mounted(&self.mnt) {
            let _ = Command::new("fusermount3")
                .arg("-uz")
                .arg(&self.mnt)
                .status();
        }
    }
}

/// Forgets the kernel's cached pages of a file, so that the next read asks lakecache.
fn drop_page_cache(path: &Path) -> anyhow::Result<()> {
    let f = std::fs::File::open(path)?;
    nix::fcntl::posix_fadvise(
        &f,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )?;
    Ok(())
}

fn names(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<anyhow::Result<_>>()?;
    v.sort();
    Ok(v)
}

/// Reads a file in a blocking thread, with its duration. A read that has not ended after a
/// minute fails the test (the mount is then stopped, which ends the read).
async fn timed_read(path: PathBuf) -> (std::io::Result<Vec<u8>>, Duration) {
    let shown = path.display().to_string();
    let read = tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let r = std::fs::read(&path);
        (r, start.elapsed())
    });
    match tokio::time::timeout(Duration::from_secs(60), read).await {
        Ok(r) => r.expect("read thread"),
        Err(_) => panic!("reading {shown} has not ended after 60 s"),
    }
}

/// `lakecache local`'s source timeout in this suite (`--source-timeout`).
const SOURCE_TIMEOUT: Duration = Duration::from_secs(3);

/// The suite. Each case says what it checks in its failure message.
async fn behaves(lake: &Lake) -> anyhow::Result<()> {
    let label = lake.label;
    let files = dataset();
    fill(lake, &files).await?;
    let proxy = Proxy::start(lake.port).await?;
    let local =
        Local::start(&(lake.access)(proxy.port)).with_context(|| format!("{label}: mounting"))?;

    // Listing: nested, an empty directory, names with spaces and non-ASCII.
    assert_eq!(
        names(&local.mnt)?,
        [
            "a",
            "cached.bin",
            "dir with space",
            "empty",
            "lost.bin",
            "rewrite.bin",
            "zero.bin"
        ],
        "{label}: root listing"
    );
    assert_eq!(names(&local.path("a"))?, ["b", "top.bin"], "{label}: a/");
    assert_eq!(names(&local.path("a/b"))?, ["c.bin"], "{label}: a/b/");
    assert_eq!(
        names(&local.path("dir with space"))?,
        ["ファイル データ.bin"],
        "{label}: non-ASCII"
    );
    assert!(
        local.path("empty").is_dir() && names(&local.path("empty"))?.is_empty(),
        "{label}: empty directory"
    );

    // Stat, whole and ranged reads, byte for byte.
    for (path, data) in &files {
        if path == "lost.bin" || path == "cached.bin" || path == "rewrite.bin" {
            continue;
        }
        let meta = std::fs::metadata(local.path(path))?;
        assert!(meta.is_file(), "{label}: {path} is a file");
        assert_eq!(meta.len(), data.len() as u64, "{label}: size of {path}");
        let f = std::fs::File::open(local.path(path))?;
        for (at, len) in [(BS - 1, 2), (2 * BS + 17, BS + 3), (1, 5), (0, 1)] {
            if at + len > data.len() {
                continue;
            }
            let mut buf = vec![0u8; len];
            f.read_exact_at(&mut buf, at as u64)?;
            assert!(buf == data[at..at + len], "{label}: {path} [{at}, +{len})");
        }
        assert!(
            std::fs::read(local.path(path))? == *data,
            "{label}: whole {path}"
        );
    }

    // A missing object.
    for missing in ["nope.bin", "a/nope.bin", "nope/x.bin"] {
        let e = std::fs::metadata(local.path(missing)).expect_err(missing);
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{label}: {missing}");
    }

    // An object rewritten after part of it was cached: all old, all new, or an error.
    let old = files
        .iter()
        .find(|(p, _)| p == "rewrite.bin")
        .unwrap()
        .1
        .clone();
    let new = pattern(40, old.len());
    let mut head = [0u8; 100];
    std::fs::File::open(local.path("rewrite.bin"))?.read_exact_at(&mut head, 0)?;
    assert!(head[..] == old[..100], "{label}: head of rewrite.bin");
    match lake.no_if_match {
        Some(why) => eprintln!("{label}: rewrite case skipped: {why}"),
        None => {
            // A later modification time, also where it counts in seconds.
            tokio::time::sleep(Duration::from_millis(1100)).await;
            let writer = OpendalSource::new(&(lake.access)(lake.port).spec())?;
            writer.operator().write("rewrite.bin", new.clone()).await?;
            let outcome = match std::fs::read(local.path("rewrite.bin")) {
                Ok(b) if b == old => "all old".to_string(),
                Ok(b) if b == new => "all new".to_string(),
                Ok(b) => panic!("{label}: rewrite.bin read mixed bytes ({} bytes)", b.len()),
                Err(e) if e.raw_os_error() == Some(nix::libc::ESTALE) => format!("{e}"),
                Err(e) => panic!("{label}: rewrite.bin failed with {e}, not ESTALE"),
            };
            eprintln!("{label}: rewrite.bin after a rewrite: {outcome}");
        }
    }

    // The source hangs, then dies: cached data still reads, an uncached read fails in bounded
    // time; then it comes back.
    let cached = &files.iter().find(|(p, _)| p == "cached.bin").unwrap().1;
    let lost = &files.iter().find(|(p, _)| p == "lost.bin").unwrap().1;
    assert!(std::fs::read(local.path("cached.bin"))? == *cached);
    std::fs::metadata(local.path("lost.bin"))?;
    for (how, set) in [
        (
            "hangs",
            &(|p: &Proxy, on| p.set_blackhole(on)) as &dyn Fn(&Proxy, bool),
        ),
        ("dies", &|p: &Proxy, on| p.set_down(on)),
    ] {
        set(&proxy, true);
        drop_page_cache(&local.path("cached.bin"))?;
        let (r, took) = timed_read(local.path("cached.bin")).await;
        assert!(
            r.with_context(|| format!("{label}: cached read while the source {how}"))? == *cached,
            "{label}: cached bytes while the source {how}"
        );
        assert!(
            took < SOURCE_TIMEOUT,
            "{label}: a cached read while the source {how} waited {took:?}"
        );
        let (r, took_lost) = timed_read(local.path("lost.bin")).await;
        let e = r.expect_err("an uncached read succeeded with the source away");
        eprintln!(
            "{label}: source {how}: cached read {took:.2?}; uncached read failed after \
             {took_lost:.2?} ({e})"
        );
        assert!(
            took_lost < Duration::from_secs(30),
            "{label}: an uncached read while the source {how} took {took_lost:?}"
        );
        set(&proxy, false);
    }
    let (r, took) = timed_read(local.path("lost.bin")).await;
    assert!(
        r.with_context(|| format!("{label}: reading after the source came back"))? == *lost,
        "{label}: lost.bin after the source came back"
    );
    eprintln!("{label}: back: uncached read {took:.2?}");
    drop(local);

    // Bad credentials: a clear error that names the source and never the secret.
    match &lake.bad_access {
        Err(why) => eprintln!("{label}: bad-credentials case skipped: {why}"),
        Ok((bad, secret)) => {
            let access = bad(lake.port);
            let start = Instant::now();
            let err = refused(&access).with_context(|| format!("{label}: bad credentials"))?;
            if let Some(secret) = secret {
                assert!(
                    !err.contains(secret.as_str()),
                    "{label}: secret shown: {err}"
                );
            }
            eprintln!(
                "{label}: bad credentials refused in {:.2?}: {}",
                start.elapsed(),
                err.lines().next().unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// Runs `lakecache local` over `access`, which the source must refuse: the process must exit
/// with an error that names the source and says access was denied. Returns its stderr.
fn refused(access: &Access) -> anyhow::Result<String> {
    let (child, dir) = spawn_local(access)?;
    let mut local = Local {
        child,
        mnt: dir.path().join("mnt"),
        _dir: dir,
    };
    let start = Instant::now();
    let status = loop {
        if let Some(s) = local.child.try_wait()? {
            break s;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(60),
            "lakecache local ran for 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = std::fs::read_to_string(local._dir.path().join("stderr"))?;
    ensure!(!status.success(), "it was accepted: {err}");
    ensure!(
        err.contains(&access.uri),
        "the error does not name the source: {err}"
    );
    ensure!(
        err.contains("source denied access"),
        "the error does not say access was denied: {err}"
    );
    Ok(err)
}

async fn s3_lake() -> anyhow::Result<Lake> {
    let s3 = S3Server::start()?;
    s3.create_bucket("data", &[]).await?;
    let access = |port: u16, access_key_id: &str, secret_access_key: &str| Access {
        uri: format!("s3://data/{PREFIX}"),
        options: map(&[
            ("endpoint", &format!("http://127.0.0.1:{port}")),
            ("region", "us-east-1"),
            ("disable_config_load", "true"),
            ("disable_ec2_metadata", "true"),
        ]),
        credentials: map(&[
            ("access_key_id", access_key_id),
            ("secret_access_key", secret_access_key),
        ]),
    };
    // moto accepts any signature: the bad-credentials case has a server that checks them,
    // and that first accepts the right keys.
    let gateway = S3Gateway::start("data")?;
    let right = access(gateway.port, S3Gateway::ACCESS_KEY, S3Gateway::SECRET_KEY);
    OpendalSource::new(&right.spec())?
        .operator()
        .list("/")
        .await
        .context("the gateway refused the right keys")?;
    const WRONG_SECRET: &str = "lakecache-wrong-secret-0123456789abcdefghij";
    let gateway_port = gateway.port;
    let bad = move |_: u16| access(gateway_port, S3Gateway::ACCESS_KEY, WRONG_SECRET);
    Ok(Lake {
        label: "s3 (moto)",
        port: s3.port,
        access: Box::new(move |port| {
            access(
                port,
                lakecache_e2e::s3::ACCESS_KEY,
                lakecache_e2e::s3::SECRET_KEY,
            )
        }),
        bad_access: Ok((Box::new(bad), Some(WRONG_SECRET.to_string()))),
        no_if_match: None,
        _servers: vec![Box::new(s3), Box::new(gateway)],
    })
}

async fn oss_lake() -> anyhow::Result<Lake> {
    let s3 = S3Server::start()?;
    s3.create_bucket("data", &[]).await?;
    let access = |port: u16| Access {
        uri: format!("oss://data/{PREFIX}"),
        options: map(&[
            ("endpoint", &format!("http://127.0.0.1:{port}")),
            ("addressing_style", "path"),
        ]),
        credentials: map(&[
            ("access_key_id", "oss-test"),
            ("access_key_secret", "oss-test-secret"),
        ]),
    };
    Ok(Lake {
        label: "oss (OpenDAL's oss service against moto, path-style)",
        port: s3.port,
        access: Box::new(access),
        bad_access: Err("moto does not check OSS signatures"),
        no_if_match: None,
        _servers: vec![Box::new(s3)],
    })
}

async fn azblob_lake() -> anyhow::Result<Lake> {
    let azurite = AzuriteServer::start()?;
    azurite.create_container("data").await?;
    let access = |port: u16| Access {
        uri: format!("azblob://data/{PREFIX}"),
        options: AzuriteServer::options(&format!(
            "http://127.0.0.1:{port}/{}",
            lakecache_e2e::azurite::ACCOUNT
        )),
        credentials: AzuriteServer::credentials(),
    };
    // A well-formed key that is not the account's.
    const WRONG_KEY: &str = "bGFrZWNhY2hlLXdyb25nLWtleS1sYWtlY2FjaGUtd3Jvbmcta2V5LTAxMjM0NTY3ODk=";
    let bad = move |port: u16| Access {
        credentials: map(&[("account_key", WRONG_KEY)]),
        ..access(port)
    };
    Ok(Lake {
        label: "azblob (Azurite)",
        port: azurite.port(),
        access: Box::new(access),
        bad_access: Ok((Box::new(bad), Some(WRONG_KEY.to_string()))),
        no_if_match: None,
        _servers: vec![Box::new(azurite)],
    })
}

async fn gcs_lake() -> anyhow::Result<Lake> {
    let gcs = GcsServer::start()?;
    gcs.create_bucket("data").await?;
    let access = |port: u16| Access {
        uri: format!("gs://data/{PREFIX}"),
        options: GcsServer::options(&format!("http://127.0.0.1:{port}")),
        credentials: BTreeMap::new(),
    };
    Ok(Lake {
        label: "gs (fake-gcs-server)",
        port: gcs.port(),
        access: Box::new(access),
        bad_access: Err("fake-gcs-server accepts any credentials or none"),
        no_if_match: Some(
            "fake-gcs-server ignores If-Match on reads (it checks preconditions on uploads \
             only); real GCS answers 412 and lakecache reports the object changed",
        ),
        _servers: vec![Box::new(gcs)],
    })
}

async fn hdfs_lake() -> anyhow::Result<Lake> {
    let hdfs = HdfsServer::start()?;
    // The lake by a name service (`hdfs://NS/…` and the client's `dfs.*` settings for it), as a
    // cluster with an HA pair is named; this one has one namenode.
    let access = |port: u16| Access {
        uri: format!("hdfs://lakens/{PREFIX}"),
        options: map(&[
            ("dfs.ha.namenodes.lakens", "nn1"),
            (
                "dfs.namenode.rpc-address.lakens.nn1",
                &format!("127.0.0.1:{port}"),
            ),
        ]),
        credentials: BTreeMap::new(),
    };
    // HDFS's simple authentication has no secret: the wrong credentials are a user whom the
    // namenode refuses a directory (/shared is alice's, 0700, made by the launcher).
    let bad = |port: u16| Access {
        uri: format!("hdfs://127.0.0.1:{port}/shared"),
        options: map(&[("user", "bob")]),
        credentials: BTreeMap::new(),
    };
    Ok(Lake {
        label: "hdfs (MiniDFSCluster)",
        port: hdfs.port(),
        access: Box::new(access),
        bad_access: Ok((Box::new(bad), None)),
        no_if_match: None,
        _servers: vec![Box::new(hdfs)],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_behaves() -> anyhow::Result<()> {
    behaves(&s3_lake().await?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oss_behaves() -> anyhow::Result<()> {
    behaves(&oss_lake().await?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn azblob_behaves() -> anyhow::Result<()> {
    behaves(&azblob_lake().await?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gcs_behaves() -> anyhow::Result<()> {
    behaves(&gcs_lake().await?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hdfs_behaves() -> anyhow::Result<()> {
    let lake = hdfs_lake().await?;
    behaves(&lake).await?;
    // The `user` option is the user the namenode sees: alice reads her 0700 directory (bob
    // was refused it above, and the superuser running the tests is not asked).
    let alices = Access {
        uri: format!("hdfs://127.0.0.1:{}/shared", lake.port),
        options: map(&[("user", "alice")]),
        credentials: BTreeMap::new(),
    };
    let local = Local::start(&alices).context("mounting /shared as alice")?;
    assert_eq!(std::fs::read(local.path("alice.bin"))?, b"for alice\n");
    Ok(())
}
