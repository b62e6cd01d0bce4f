//! The worker's metadata cache: attributes and listings of the paths it is asked about.
//!
//! Readers send a path's metadata requests to the path's rendezvous owner, so each worker caches
//! its own share. With the `Immutable` policy (training data that does not change under a job)
//! entries never expire; with a TTL they are fetched again once older than it. A listing also
//! fills the attribute cache for every entry in it, so `ls -l` over a directory of a million
//! files costs one listing, not a million HEAD requests.
//!
//! Never expiring is not the same as never forgetting: a worker asked about a lake of a hundred
//! million objects would hold them all and run out of memory. Stats and listings share one LRU
//! bounded by a number of entries, where a listing counts as its entries, so the bound holds
//! whatever the mix; a listing larger than the whole bound is answered but not kept.

use std::sync::Arc;
use std::time::Instant;

use hashlink::LinkedHashMap;
use lakecache_lake::{DirEntry, LakeError, ObjectMeta, Source};
use parking_lot::Mutex;

use crate::metrics::{OpLabel, WorkerMetrics};

pub use lakecache_api::worker::{DEFAULT_METADATA_ENTRIES, MetadataPolicy};

/// Whether an entry fetched `at` is still valid under `policy`.
fn fresh(policy: &MetadataPolicy, at: Instant) -> bool {
    match policy {
        MetadataPolicy::Immutable => true,
        MetadataPolicy::Ttl { ttl } => at.elapsed() < *ttl,
    }
}

/// What one entry of the cache holds: an object's attributes, or a directory's listing.
enum Cached {
    Stat(ObjectMeta),
    List(Arc<Vec<DirEntry>>),
}

impl Cached {
    /// Entries this counts against the budget: a listing counts every entry it holds.
    fn weight(&self) -> usize {
        match self {
            Cached::Stat(_) => 1,
            Cached::List(l) => 1 + l.len(),
        }
    }
}

/// A stat and a listing of the same path are different entries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Stat(String),
    List(String),
}

/// The cache proper: one LRU over stats and listings, and the entries it holds.
#[derive(Default)]
struct Lru {
    map: LinkedHashMap<Key, (Cached, Instant)>,
    weight: usize,
}

impl Lru {
    /// A fresh entry, made the most recently used.
    fn get(&mut self, key: &Key, policy: &MetadataPolicy) -> Option<&Cached> {
        let (_, at) = self.map.to_back(key)?;
        if !fresh(policy, *at) {
            return None;
        }
        self.map.get(key).map(|(c, _)| c)
    }

    /// Inserts an entry as the most recently used and evicts the least recently used ones until
    /// the total fits `budget`. An entry heavier than the whole budget is not kept.
    fn insert(&mut self, key: Key, value: Cached, at: Instant, budget: usize) {
        if let Some((old, _)) = self.map.remove(&key) {
            self.weight -= old.weight();
        }
        let w = value.weight();
        if w > budget {
            return;
        }
        self.weight += w;
        self.map.insert(key, (value, at));
        while self.weight > budget {
            let Some((_, (old, _))) = self.map.pop_front() else {
                break;
            };
            self.weight -= old.weight();
        }
    }
}

pub struct MetadataCache {
    source: Arc<dyn Source>,
    policy: MetadataPolicy,
    /// Most entries kept, counting each stat as one and each listing as one plus its entries.
    budget: usize,
    lru: Mutex<Lru>,
    metrics: Arc<WorkerMetrics>,
}

impl MetadataCache {
    pub fn new(
        source: Arc<dyn Source>,
        policy: MetadataPolicy,
        budget: usize,
        metrics: Arc<WorkerMetrics>,
    ) -> Self {
        Self {
            source,
            policy,
            budget,
            lru: Default::default(),
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

    /// The cached attributes of a path, if fresh, without asking the source.
    pub fn cached(&self, path: &str) -> Option<ObjectMeta> {
        match self
            .lru
            .lock()
            .get(&Key::Stat(path.to_string()), &self.policy)
        {
            Some(Cached::Stat(m)) => Some(m.clone()),
            _ => None,
        }
    }

    /// Entries held, as counted against the budget.
    pub fn entries(&self) -> usize {
        self.lru.lock().weight
    }

    pub async fn stat(&self, path: &str) -> Result<ObjectMeta, LakeError> {
        if let Some(m) = self.cached(path) {
            self.count("stat", true);
            return Ok(m);
        }
        self.count("stat", false);
        let m = self.source.stat(path).await?;
        self.lru.lock().insert(
            Key::Stat(path.to_string()),
            Cached::Stat(m.clone()),
            Instant::now(),
            self.budget,
        );
        Ok(m)
    }

    pub async fn list(&self, dir: &str) -> Result<Arc<Vec<DirEntry>>, LakeError> {
        let key = Key::List(dir.to_string());
        if let Some(Cached::List(l)) = self.lru.lock().get(&key, &self.policy) {
            self.count("list", true);
            return Ok(l.clone());
        }
        self.count("list", false);
        let entries = Arc::new(self.source.list(dir).await?);
        let now = Instant::now();
        let listing = Cached::List(entries.clone());
        // A listing too large for the budget is answered but not kept, nor are its entries'
        // stats: they would only push everything else out.
        if listing.weight() <= self.budget {
            let mut lru = self.lru.lock();
            for e in entries.iter() {
                lru.insert(
                    Key::Stat(lakecache_lake::join(dir, &e.name)),
                    Cached::Stat(e.meta.clone()),
                    now,
                    self.budget,
                );
            }
            lru.insert(key, listing, now, self.budget);
        }
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lakecache_lake::{OpendalSource, SourceSpec};

    fn cache(lake: &std::path::Path, budget: usize) -> (MetadataCache, Arc<WorkerMetrics>) {
        let source = OpendalSource::new(&SourceSpec::new(format!("file://{}", lake.display())));
        let metrics = Arc::new(WorkerMetrics::default());
        let c = MetadataCache::new(
            Arc::new(source.unwrap()),
            MetadataPolicy::Immutable,
            budget,
            metrics.clone(),
        );
        (c, metrics)
    }

    fn misses(m: &WorkerMetrics, op: &str) -> u64 {
        m.metadata_misses
            .get_or_create(&OpLabel { op: op.into() })
            .get()
    }

    #[tokio::test]
    async fn immutable_metadata_is_bounded_least_recently_used_first() {
        let lake = tempfile::tempdir().unwrap();
        std::fs::create_dir(lake.path().join("d")).unwrap();
        for i in 0..4 {
            std::fs::write(lake.path().join(format!("d/f{i}")), b"x").unwrap();
        }
        for name in ["x", "y"] {
            std::fs::write(lake.path().join(name), b"y").unwrap();
        }
        let (c, m) = cache(lake.path(), 10);
        // The listing counts 1 + 4 and fills 4 stats.
        assert_eq!(c.list("d").await.unwrap().len(), 4);
        assert_eq!(c.entries(), 9);
        c.stat("d/f0").await.unwrap();
        assert_eq!(misses(&m, "stat"), 0, "the listing did not fill the stats");
        c.stat("x").await.unwrap();
        assert_eq!(c.entries(), 10);
        // One more pushes out the least recently used: d/f1 (d/f0 was just used).
        c.stat("y").await.unwrap();
        assert_eq!(c.entries(), 10);
        assert_eq!(misses(&m, "stat"), 2);
        c.stat("d/f0").await.unwrap();
        assert_eq!(misses(&m, "stat"), 2, "a recently used entry was evicted");
        c.stat("d/f1").await.unwrap();
        assert_eq!(
            misses(&m, "stat"),
            3,
            "the least recently used entry was kept"
        );
        assert!(c.entries() <= 10);
    }

    #[tokio::test]
    async fn a_listing_larger_than_the_budget_is_answered_but_not_kept() {
        let lake = tempfile::tempdir().unwrap();
        std::fs::create_dir(lake.path().join("big")).unwrap();
        for i in 0..12 {
            std::fs::write(lake.path().join(format!("big/f{i:02}")), b"x").unwrap();
        }
        std::fs::write(lake.path().join("small"), b"x").unwrap();
        let (c, m) = cache(lake.path(), 10);
        c.stat("small").await.unwrap();
        for _ in 0..2 {
            assert_eq!(c.list("big").await.unwrap().len(), 12);
        }
        assert_eq!(misses(&m, "list"), 2, "an oversized listing was kept");
        assert_eq!(
            c.entries(),
            1,
            "an oversized listing pushed other entries out"
        );
        c.stat("small").await.unwrap();
        assert_eq!(misses(&m, "stat"), 1);
    }
}
