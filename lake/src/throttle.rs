//! A [`Source`] wrapper that behaves like a lake across a slow, far link: every request waits a
//! first-byte latency, and the bytes of all requests together share a bandwidth cap (a token
//! bucket). Used by the demo, so that a local directory shows what a cache is for.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;

use crate::{DirEntry, ObjectMeta, Result, Source};

pub struct ThrottledSource {
    inner: Arc<dyn Source>,
    latency: Duration,
    bytes_per_sec: u64,
    /// The instant at which the link is free again.
    next_free: parking_lot::Mutex<Instant>,
}

impl ThrottledSource {
    pub fn new(inner: Arc<dyn Source>, latency: Duration, bytes_per_sec: u64) -> Self {
        Self {
            inner,
            latency,
            bytes_per_sec,
            next_free: parking_lot::Mutex::new(Instant::now()),
        }
    }

    async fn transfer(&self, len: u64) {
        if self.bytes_per_sec == 0 || len == 0 {
            return;
        }
        let cost = Duration::from_secs_f64(len as f64 / self.bytes_per_sec as f64);
        let done = {
            let mut next = self.next_free.lock();
            let start = (*next).max(Instant::now());
            *next = start + cost;
            *next
        };
        tokio::time::sleep_until(done.into()).await;
    }
}

#[async_trait]
impl Source for ThrottledSource {
    async fn stat(&self, path: &str) -> Result<ObjectMeta> {
        tokio::time::sleep(self.latency).await;
        self.inner.stat(path).await
    }

    async fn list(&self, dir: &str) -> Result<Vec<DirEntry>> {
        tokio::time::sleep(self.latency).await;
        self.inner.list(dir).await
    }

    async fn read(&self, path: &str, version: &str, start: u64, end: u64) -> Result<Bytes> {
        tokio::time::sleep(self.latency).await;
        let bytes = self.inner.read(path, version, start, end).await?;
        self.transfer(bytes.len() as u64).await;
        Ok(bytes)
    }

    fn describe(&self) -> String {
        format!(
            "{} (emulated link: {:?} latency, {} MB/s)",
            self.inner.describe(),
            self.latency,
            self.bytes_per_sec / 1_000_000
        )
    }
}
