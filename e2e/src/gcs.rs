//! A real Google Cloud Storage server for tests: fake-gcs-server (built by scripts/setup from
//! the module pinned in tools/fake-gcs-server), in memory, on a free loopback port.

use std::collections::BTreeMap;
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::azurite::{http_request, spawn_on_free_port, stop};

pub struct GcsServer {
    child: Child,
    port: u16,
    /// Holds the server's log; removed after it stops.
    dir: tempfile::TempDir,
}

impl GcsServer {
    /// Starts `fake-gcs-server` (`$LAKECACHE_FAKE_GCS_SERVER`, which scripts/setup prints) on
    /// 127.0.0.1 and a free port, plain HTTP, in memory, and waits until it answers.
    pub fn start() -> anyhow::Result<Self> {
        let bin = std::env::var("LAKECACHE_FAKE_GCS_SERVER").map_err(|_| {
            anyhow::anyhow!(
                "LAKECACHE_FAKE_GCS_SERVER is not set: run `eval \"$(scripts/setup --env)\"`, \
                 which builds fake-gcs-server"
            )
        })?;
        let dir = tempfile::Builder::new().prefix("fake-gcs-").tempdir()?;
        let log = dir.path().join("fake-gcs-server.log");
        let (child, port) = spawn_on_free_port(&bin, &log, |port| {
            let url = format!("http://127.0.0.1:{port}");
            let mut cmd = Command::new(&bin);
            cmd.args([
                "-backend",
                "memory",
                "-scheme",
                "http",
                "-host",
                "127.0.0.1",
            ])
            .args(["-port", &port.to_string(), "-external-url", &url])
            // `-data` names a directory of objects to load at start: one that does not exist,
            // so nothing is, whatever `$FAKE_GCS_DATA` (its default) says.
            .arg("-data")
            .arg(dir.path().join("data"))
            .args(["-log-level", "error"])
            .current_dir(dir.path());
            cmd
        })?;
        Ok(Self { child, port, dir })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The directory holding the server's log (`fake-gcs-server.log`).
    pub fn dir(&self) -> std::path::PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Creates bucket `name` (OpenDAL cannot): the JSON API's `buckets.insert`, unauthenticated.
    pub async fn create_bucket(&self, name: &str) -> anyhow::Result<()> {
        let body = serde_json::to_vec(&serde_json::json!({ "name": name }))?;
        let response = http_request(
            self.port,
            "POST",
            "/storage/v1/b?project=test",
            &[("Content-Type", "application/json")],
            &body,
        )
        .await
        .with_context(|| format!("creating bucket {name}"))?;
        let made_by_a_retry = response.retried && response.status == 409;
        if response.status != 200 && !made_by_a_retry {
            bail!(
                "creating bucket {name}: {} {}",
                response.status_line,
                response.body
            );
        }
        Ok(())
    }

    /// OpenDAL `gcs` options for the server at `endpoint` (its own, or a proxy's in front of it);
    /// add `bucket`. Requests go unsigned, and no credentials are looked for, neither in the
    /// environment and well-known files nor from the GCE metadata server, so nothing leaves
    /// loopback.
    pub fn options(endpoint: &str) -> BTreeMap<String, String> {
        [
            ("endpoint", endpoint),
            ("skip_signature", "true"),
            ("disable_config_load", "true"),
            ("disable_vm_metadata", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }
}

impl Drop for GcsServer {
    fn drop(&mut self) {
        stop(&mut self.child, Duration::from_secs(3));
    }
}
