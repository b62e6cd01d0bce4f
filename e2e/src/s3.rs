//! Real S3-compatible servers for tests, on free loopback ports: moto's server (in memory),
//! which accepts any signature, and [`S3Gateway`] (versitygw over a directory), which checks
//! them.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use lakecache_lake::SourceSpec;

pub struct S3Server {
    child: Child,
    pub port: u16,
    host: String,
}

pub const ACCESS_KEY: &str = "lakecache-test";
pub const SECRET_KEY: &str = "lakecache-test-secret";

impl S3Server {
    /// Starts `moto_server` (from `$LAKECACHE_MOTO_SERVER` or `PATH`) on loopback and waits
    /// until it answers.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_on("127.0.0.1")
    }

    /// [`S3Server::start`] on address `host`: the cluster's [`crate::Cluster::host_ip`], so
    /// that pods of a real node reach it.
    pub fn start_on(host: &str) -> anyhow::Result<Self> {
        let port = TcpListener::bind((host, 0))?.local_addr()?.port();
        let bin = std::env::var("LAKECACHE_MOTO_SERVER").unwrap_or_else(|_| "moto_server".into());
        let child = Command::new(&bin)
            .args(["-H", host, "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| {
                format!("starting {bin}: install it with `pip install 'moto[server]'` (scripts/test does)")
            })?;
        let server = Self {
            child,
            port,
            host: host.to_string(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect((host, port)).is_err() {
            if Instant::now() > deadline {
                bail!("{bin} did not listen on port {port} within 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(server)
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }

    /// Options for an S3 source at `endpoint` (the server's, or a proxy's in front of it).
    /// Config loading and the EC2 metadata service are off, so nothing leaves loopback.
    pub fn options(endpoint: &str) -> BTreeMap<String, String> {
        [
            ("endpoint", endpoint),
            ("region", "us-east-1"),
            ("access_key_id", ACCESS_KEY),
            ("secret_access_key", SECRET_KEY),
            ("disable_config_load", "true"),
            ("disable_ec2_metadata", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    pub fn spec(&self, bucket: &str, endpoint: Option<&str>) -> SourceSpec {
        let mut s = SourceSpec::new(format!("s3://{bucket}"));
        s.options = Self::options(endpoint.unwrap_or(&self.endpoint()));
        s
    }

    /// Creates a bucket and uploads `files` into it, 16 at a time.
    pub async fn create_bucket(
        &self,
        bucket: &str,
        files: &[(String, Vec<u8>)],
    ) -> anyhow::Result<()> {
        let client = reqwest_like::put(&format!("{}/{bucket}", self.endpoint())).await;
        client.context("creating the bucket")?;
        opendal::install_default();
        let mut cfg = Self::options(&self.endpoint());
        cfg.insert("bucket".into(), bucket.into());
        let op = opendal::Operator::via_iter("s3", cfg)?;
        use futures::StreamExt;
        let mut puts = futures::stream::iter(files.iter().map(|(p, d)| {
            let op = op.clone();
            async move {
                op.write(p, d.clone())
                    .await
                    .with_context(|| format!("uploading {p}"))
            }
        }))
        .buffer_unordered(16);
        while let Some(r) = puts.next().await {
            r?;
        }
        Ok(())
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Bucket creation with a bare HTTP PUT (moto accepts unsigned requests).
mod reqwest_like {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    pub async fn put(url: &str) -> anyhow::Result<()> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| anyhow::anyhow!("not http: {url}"))?;
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let mut s = tokio::net::TcpStream::connect(host).await?;
        let req = format!(
            "PUT /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).await?;
        anyhow::ensure!(
            resp.starts_with("HTTP/1.1 200") || resp.starts_with("HTTP/1.0 200"),
            "bucket creation failed: {}",
            resp.lines().next().unwrap_or("")
        );
        Ok(())
    }
}

/// versitygw (the benchmark's lake, built by `scripts/setup`) serving a directory as S3, with
/// one account whose signatures it checks: the server for "wrong credentials". (moto checks
/// signatures only when asked to, and then refuses correct ones on listings.)
pub struct S3Gateway {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl S3Gateway {
    pub const ACCESS_KEY: &str = "lakecache-gateway";
    pub const SECRET_KEY: &str = "lakecache-gateway-secret";

    /// Starts versitygw (`$LAKECACHE_VERSITYGW`) with `bucket` made, and waits until it
    /// answers.
    pub fn start(bucket: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir(dir.path().join(bucket))?;
        let port = TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port();
        let bin = std::env::var("LAKECACHE_VERSITYGW")
            .context("LAKECACHE_VERSITYGW is not set: run `eval \"$(scripts/setup --env)\"`")?;
        let child = Command::new(&bin)
            .args(["--access", Self::ACCESS_KEY, "--secret", Self::SECRET_KEY])
            .args(["--region", "us-east-1", "--quiet", "--port"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("posix")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
        let gateway = Self {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("{bin} did not listen on port {port} within 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(gateway)
    }
}

impl Drop for S3Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
