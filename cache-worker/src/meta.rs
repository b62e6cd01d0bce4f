//! The worker's metadata cache: attributes and listings of the paths it is asked about.
//!
//! Readers send a path's metadata requests to the path's rendezvous owner, so each worker caches
//! its own share. With the `Immutable` policy (training data that does not change under a job)
//! entries never expire; with a TTL they are fetched again once older than it. A listing also
//! fills the attribute cache for every entry in it, so `ls -l` over a directory of a million
//! files costs one listing, not a million HEAD requests.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lakecache_lake::{DirEntry, LakeError, ObjectMeta, Source};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::metrics::{OpLabel, WorkerMetrics};

/// How long metadata stays valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "policy", rename_all = "PascalCase")]
pub enum MetadataPolicy {
    /// The source does not change while cached: keep metadata until restart.
    #[default]
    Immutable,
    /// Fetch metadata again after this long.
    Ttl {
        #[serde(with = "humantime_serde")]
        ttl: Duration,
    },
}

impl MetadataPolicy {
    fn fresh(&self, at: Instant) -> bool {
        match self {
            MetadataPolicy::Immutable => true,
            MetadataPolicy::Ttl { ttl } => at.elapsed() < *ttl,
        }
    }
}

/// A cached listing and when it was fetched.
type Listing = (Arc<Vec<DirEntry>>, Instant);

pub struct MetadataCache {
    source: Arc<dyn Source>,
    policy: MetadataPolicy,
    stats: Mutex<HashMap<String, (ObjectMeta, Instant)>>,
    lists: Mutex<HashMap<String, Listing>>,
    metrics: Arc<WorkerMetrics>,
}

impl MetadataCache {
    pub fn new(
        source: Arc<dyn Source>,
        policy: MetadataPolicy,
        metrics: Arc<WorkerMetrics>,
    ) -> Self {
        Self {
            source,
            policy,
            stats: Default::default(),
            lists: Default::default(),
            metrics,
        }
    }

    fn count(&self, op: &str, hit: bool) {
        let l = OpLabel { op: op.to_string() };
        if hit {
            self.metrics.metadata_hits.get_or_create(&l).inc();
        } else {
            self.metrics.metadata_misses.get_or_create(&l).inc();
        }
    }

    pub async fn stat(&self, path: &str) -> Result<ObjectMeta, LakeError> {
        if let Some((m, at)) = self.stats.lock().get(path)
            && self.policy.fresh(*at)
        {
            self.count("stat", true);
            return Ok(m.clone());
        }
        self.count("stat", false);
        let m = self.source.stat(path).await?;
        self.stats
            .lock()
            .insert(path.to_string(), (m.clone(), Instant::now()));
        Ok(m)
    }

    pub async fn list(&self, dir: &str) -> Result<Arc<Vec<DirEntry>>, LakeError> {
        if let Some((l, at)) = self.lists.lock().get(dir)
            && self.policy.fresh(*at)
        {
            self.count("list", true);
            return Ok(l.clone());
        }
        self.count("list", false);
        let entries = Arc::new(self.source.list(dir).await?);
        let now = Instant::now();
        {
            let mut stats = self.stats.lock();
            for e in entries.iter() {
                stats.insert(lakecache_lake::join(dir, &e.name), (e.meta.clone(), now));
            }
        }
        self.lists
            .lock()
            .insert(dir.to_string(), (entries.clone(), now));
        Ok(entries)
    }
}
