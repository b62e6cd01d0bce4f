//! The store read directly through its S3 API (OpenDAL's S3 service, as lakecache's workers use
//! it): the no-cache system, the raw-link measurement, and the copy to tmpfs.

use std::future::IntoFuture;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use opendal::Operator;
use opendal::layers::{RetryLayer, TimeoutLayer};

use crate::dataset::FileSpec;
use crate::net::{ACCESS_KEY, BUCKET, REGION, SECRET_KEY};

/// Receives each piece of a parallel download: (file index, offset, bytes).
pub type Sink<'a> = &'a (dyn Fn(usize, u64, &[u8]) -> anyhow::Result<()> + Sync);

/// An S3 client with its own runtime, usable from plain threads.
pub struct Direct {
    op: Operator,
    rt: tokio::runtime::Runtime,
}

impl Direct {
    pub fn new(endpoint: &str) -> anyhow::Result<Arc<Direct>> {
        opendal::install_default();
        let cfg = [
            ("bucket", BUCKET),
            ("endpoint", endpoint),
            ("region", REGION),
            ("access_key_id", ACCESS_KEY),
            ("secret_access_key", SECRET_KEY),
            ("disable_config_load", "true"),
            ("disable_ec2_metadata", "true"),
        ];
        let op = Operator::via_iter("s3", cfg.map(|(k, v)| (k.to_string(), v.to_string())))
            .context("building the S3 client")?
            .layer(
                TimeoutLayer::new()
                    .with_timeout(Duration::from_secs(60))
                    .with_io_timeout(Duration::from_secs(30)),
            )
            .layer(RetryLayer::new().with_max_times(2));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        Ok(Arc::new(Direct { op, rt }))
    }

    /// Bytes `[start, end)` of `path`.
    pub fn read_range(&self, path: &str, start: u64, end: u64) -> anyhow::Result<Vec<u8>> {
        let buf = self
            .rt
            .block_on(self.op.read_with(path).range(start..end).into_future())
            .with_context(|| format!("GET {path} bytes {start}-{end}"))?;
        Ok(buf.to_vec())
    }

    /// The whole object.
    pub fn read_all(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        let buf = self
            .rt
            .block_on(self.op.read(path))
            .with_context(|| format!("GET {path}"))?;
        Ok(buf.to_vec())
    }

    /// Every object under `prefix` with its size (ListObjectsV2, recursive).
    pub fn list(&self, prefix: &str) -> anyhow::Result<Vec<(String, u64)>> {
        let entries = self
            .rt
            .block_on(self.op.list_with(prefix).recursive(true).into_future())
            .with_context(|| format!("listing {prefix}"))?;
        Ok(entries
            .into_iter()
            .filter(|e| !e.path().ends_with('/'))
            .map(|e| (e.path().to_string(), e.metadata().content_length()))
            .collect())
    }

    /// Reads `files` with `concurrency` ranged GETs of at most `range` bytes in flight, and
    /// hands each piece to `sink(file index, offset, bytes)`. Returns bytes and seconds.
    pub fn parallel_ranges(
        &self,
        files: &[FileSpec],
        range: u64,
        concurrency: usize,
        sink: Sink<'_>,
    ) -> anyhow::Result<(u64, f64)> {
        let mut pieces = Vec::new();
        for (i, f) in files.iter().enumerate() {
            let mut off = 0;
            while off < f.size {
                let end = (off + range).min(f.size);
                pieces.push((i, off, end));
                off = end;
            }
        }
        let start = Instant::now();
        let total = self.rt.block_on(async {
            let mut stream = futures::stream::iter(pieces.into_iter().map(|(i, a, b)| {
                let op = self.op.clone();
                let path = files[i].path.clone();
                async move {
                    let buf = op
                        .read_with(&path)
                        .range(a..b)
                        .await
                        .with_context(|| format!("GET {path} bytes {a}-{b}"))?;
                    anyhow::Ok((i, a, buf))
                }
            }))
            .buffer_unordered(concurrency.max(1));
            let mut total = 0u64;
            while let Some(r) = stream.next().await {
                let (i, a, buf) = r?;
                let bytes = buf.to_bytes();
                total += bytes.len() as u64;
                sink(i, a, &bytes)?;
            }
            anyhow::Ok(total)
        })?;
        Ok((total, start.elapsed().as_secs_f64()))
    }

    /// Copies `files` under `dest` with 16 ranged GETs in flight (the tmpfs system's preload).
    pub fn copy_to(&self, files: &[FileSpec], dest: &Path) -> anyhow::Result<(u64, f64)> {
        use std::os::unix::fs::FileExt;
        let mut handles = Vec::new();
        for f in files {
            let p = dest.join(&f.path);
            std::fs::create_dir_all(p.parent().unwrap_or(dest))?;
            let file = std::fs::File::create(&p)?;
            file.set_len(f.size)?;
            handles.push(file);
        }
        self.parallel_ranges(files, 8 << 20, 16, &|i, off, bytes| {
            handles[i].write_all_at(bytes, off)?;
            Ok(())
        })
    }
}
