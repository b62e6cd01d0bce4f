//! A fault-injecting [`Source`] for tests: counts requests and can be switched off.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::{DirEntry, LakeError, ObjectMeta, Result, Source};

/// How a [`FaultSource`] behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FaultMode {
    /// Pass every call through.
    Healthy = 0,
    /// Fail every call at once with [`LakeError::Unavailable`].
    Down = 1,
    /// Hang, as a black-holed network does, until the caller's deadline.
    Hang = 2,
}

/// Wraps a source; counts reads and can fail or hang on demand.
pub struct FaultSource {
    inner: Arc<dyn Source>,
    mode: AtomicU8,
    reads: AtomicU64,
    /// Reads under way now, and the most there ever were at once.
    reading: Arc<AtomicU64>,
    max_reading: Arc<AtomicU64>,
    read_delay: parking_lot::Mutex<Duration>,
}

impl FaultSource {
    pub fn new(inner: Arc<dyn Source>) -> Self {
        Self {
            inner,
            mode: AtomicU8::new(0),
            reads: AtomicU64::new(0),
            reading: Default::default(),
            max_reading: Default::default(),
            read_delay: parking_lot::Mutex::new(Duration::ZERO),
        }
    }

    pub fn set_mode(&self, mode: FaultMode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    /// Makes every read wait this long first, so that tests can line up concurrent misses.
    pub fn set_read_delay(&self, d: Duration) {
        *self.read_delay.lock() = d;
    }

    /// Number of `read` calls that reached this source.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::SeqCst)
    }

    /// The most `read` calls that were under way at once.
    pub fn max_concurrent_reads(&self) -> u64 {
        self.max_reading.load(Ordering::SeqCst)
    }

    async fn gate(&self) -> Result<()> {
        match self.mode.load(Ordering::SeqCst) {
            0 => Ok(()),
            1 => Err(LakeError::Unavailable("injected fault: source down".into())),
            _ => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Err(LakeError::Unavailable("injected fault: source hung".into()))
            }
        }
    }
}

struct Reading(Arc<AtomicU64>);

impl Drop for Reading {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl Source for FaultSource {
    async fn stat(&self, path: &str) -> Result<ObjectMeta> {
        self.gate().await?;
        self.inner.stat(path).await
    }

    async fn list(&self, dir: &str) -> Result<Vec<DirEntry>> {
        self.gate().await?;
        self.inner.list(dir).await
    }

    async fn read(&self, path: &str, version: &str, start: u64, end: u64) -> Result<Bytes> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let now = self.reading.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_reading.fetch_max(now, Ordering::SeqCst);
        // Counted down however the read ends, a cancelled one included.
        let _reading = Reading(self.reading.clone());
        let delay = *self.read_delay.lock();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        self.gate().await?;
        self.inner.read(path, version, start, end).await
    }

    fn describe(&self) -> String {
        format!("fault({})", self.inner.describe())
    }
}
