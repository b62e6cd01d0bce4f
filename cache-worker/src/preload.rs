//! Preloading: loading paths into the cache before a job reads them.
//!
//! A preload names paths or glob patterns. The worker expands them through its metadata cache
//! (which warms the metadata too), then loads the blocks it owns among the members it was given,
//! by the same rendezvous placement the readers use, so that every worker of a CacheNamespace
//! loads a disjoint share in parallel and the readers later find each block where they look.
//! Progress (files and bytes done of total) and per-path failures are kept per preload id and
//! can be watched; a preload can be cancelled.
//!
//! What a worker keeps of its preloads is bounded, as a worker runs for months and a preload's
//! status travels in one gRPC message: a preload lists at most [`MAX_FAILURES`] failed paths,
//! each path and reason clipped ([`MAX_FAILURE_PATH_BYTES`], [`MAX_FAILURE_REASON_BYTES`]), the
//! last one kept saying how many more failed; so a status stays under [`MAX_STATUS_BYTES`].
//! Finished preloads stay watchable for an hour, and only the last [`KEEP_FINISHED`] of them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use globset::{GlobBuilder, GlobMatcher};
use lakecache_lake::block::{block_count, rendezvous_order};
use lakecache_lake::{BlockKey, LakeError, ObjectMeta};
use lakecache_proto::lakecache::v1::{PathFailure, PreloadPhase, PreloadStatus};
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cache::BlockCache;
use crate::meta::MetadataCache;

/// Blocks loaded at once by one worker, and the bytes they may hold in flight. A far lake
/// needs many requests in flight to fill its link (at 20 ms a round trip, 1 Gbit/s holds 2.5 MB
/// in flight): for small files the count bounds them, for large blocks the bytes do.
const BLOCK_CONCURRENCY: usize = 64;
const BYTES_IN_FLIGHT: u64 = 64 << 20;
/// Directories listed at once while the paths are expanded.
const LIST_CONCURRENCY: usize = 16;

/// Failed paths listed in one preload's status; the rest are counted in the last one's reason.
pub const MAX_FAILURES: usize = 100;
/// Longest path, and longest reason, of a listed failure, in bytes (longer ones are clipped).
pub const MAX_FAILURE_PATH_BYTES: usize = 4096;
pub const MAX_FAILURE_REASON_BYTES: usize = 1024;
/// Longest preload id this bound allows for; ids are Kubernetes object names (at most 253).
pub const MAX_ID_BYTES: usize = 4096;
/// The largest encoded `PreloadStatus` a worker sends: [`MAX_FAILURES`] failures of the longest
/// path and reason (about 500 KiB) plus the id and counters, rounded up. A client that watches
/// preloads must accept messages of this size.
pub const MAX_STATUS_BYTES: usize = 1 << 20;
/// Finished preloads kept for late watchers, and how long.
pub const KEEP_FINISHED: usize = 64;
const FINISHED_TTL_MILLIS: i64 = 3_600_000;

/// A preload request as the worker sees it.
#[derive(Debug, Clone)]
pub struct PreloadSpec {
    pub id: String,
    pub paths: Vec<String>,
    pub metadata_only: bool,
    pub members: Vec<String>,
}

struct Job {
    /// Start order, to tell apart preloads that finished in the same millisecond.
    seq: u64,
    status: watch::Sender<PreloadStatus>,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// Runs and tracks the preloads of one worker.
pub struct Preloader {
    me: String,
    cache: Arc<BlockCache>,
    meta: Arc<MetadataCache>,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    started: std::sync::atomic::AtomicU64,
}

/// Clips a string to at most `max` bytes, at a character boundary, marking the cut with `…`.
fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// The failures of one preload as they are listed: the first [`MAX_FAILURES`], clipped.
#[derive(Default)]
struct FailureLog {
    listed: usize,
    omitted: u64,
    /// The last listed failure as it was first recorded, before it counted the omitted ones.
    last: Option<PathFailure>,
}

impl FailureLog {
    /// Records a failure in a status: listed while there is room, else counted in the reason of
    /// the last listed one.
    fn record(&mut self, s: &mut PreloadStatus, path: &str, reason: &str) {
        if self.listed < MAX_FAILURES {
            let f = PathFailure {
                path: clip(path, MAX_FAILURE_PATH_BYTES),
                reason: clip(reason, MAX_FAILURE_REASON_BYTES),
            };
            self.listed += 1;
            if self.listed == MAX_FAILURES {
                self.last = Some(f.clone());
            }
            s.failures.push(f);
            return;
        }
        self.omitted += 1;
        let (Some(first), Some(last)) = (&self.last, s.failures.last_mut()) else {
            return;
        };
        let more = format!(" (and {} more failed paths, not listed)", self.omitted);
        let room = MAX_FAILURE_REASON_BYTES.saturating_sub(more.len());
        last.reason = format!("{}{more}", clip(&first.reason, room));
    }
}

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Preloader {
    pub fn new(me: String, cache: Arc<BlockCache>, meta: Arc<MetadataCache>) -> Arc<Self> {
        Arc::new(Self {
            me,
            cache,
            meta,
            jobs: Default::default(),
            started: Default::default(),
        })
    }

    /// Drops finished preloads that finished over an hour before `now` (Unix millis), then all
    /// but the last [`KEEP_FINISHED`] finished ones. Running ones stay.
    fn prune(jobs: &mut HashMap<String, Arc<Job>>, now: i64) {
        let mut finished: Vec<(i64, u64, String)> = jobs
            .iter()
            .filter_map(|(id, j)| {
                let s = j.status.borrow();
                (s.phase != PreloadPhase::Running as i32)
                    .then(|| (s.finished_unix_millis, j.seq, id.clone()))
            })
            .collect();
        finished.sort();
        let excess = finished.len().saturating_sub(KEEP_FINISHED);
        for (i, (at, _, id)) in finished.into_iter().enumerate() {
            if i < excess || at < now - FINISHED_TTL_MILLIS {
                jobs.remove(&id);
            }
        }
    }

    /// [`Self::prune`] as of `now`; the worker prunes as each preload starts.
    pub fn prune_at(&self, now: i64) {
        Self::prune(&mut self.jobs.lock(), now);
    }

    /// Starts a preload, or returns the status of the one with that id.
    pub fn start(self: &Arc<Self>, spec: PreloadSpec) -> PreloadStatus {
        let mut jobs = self.jobs.lock();
        if let Some(job) = jobs.get(&spec.id) {
            return job.status.borrow().clone();
        }
        Self::prune(&mut jobs, now_millis());
        let initial = PreloadStatus {
            id: spec.id.clone(),
            phase: PreloadPhase::Running as i32,
            started_unix_millis: now_millis(),
            ..Default::default()
        };
        let (tx, _) = watch::channel(initial.clone());
        let job = Arc::new(Job {
            seq: self
                .started
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            status: tx,
            task: Mutex::new(None),
        });
        let this = self.clone();
        let j = job.clone();
        let task = tokio::spawn(async move { this.run(spec, j).await });
        *job.task.lock() = Some(task);
        jobs.insert(initial.id.clone(), job);
        initial
    }

    pub fn watch(&self, id: &str) -> Option<watch::Receiver<PreloadStatus>> {
        self.jobs.lock().get(id).map(|j| j.status.subscribe())
    }

    pub fn cancel(&self, id: &str) -> Option<PreloadStatus> {
        let job = self.jobs.lock().get(id).cloned()?;
        if let Some(t) = job.task.lock().take() {
            t.abort();
        }
        job.status.send_if_modified(|s| {
            if s.phase == PreloadPhase::Running as i32 {
                s.phase = PreloadPhase::Cancelled as i32;
                s.finished_unix_millis = now_millis();
                true
            } else {
                false
            }
        });
        let s = job.status.borrow().clone();
        Some(s)
    }

    async fn run(self: Arc<Self>, spec: PreloadSpec, job: Arc<Job>) {
        let update = |f: &dyn Fn(&mut PreloadStatus)| {
            job.status.send_modify(|s| f(s));
        };
        let failures = Mutex::new(FailureLog::default());
        let fail = |s: &mut PreloadStatus, path: &str, reason: &str| {
            failures.lock().record(s, path, reason);
        };
        let mut files: Vec<(String, ObjectMeta)> = Vec::new();
        for pattern in &spec.paths {
            match self.expand(pattern).await {
                Ok(mut found) => files.append(&mut found),
                Err(e) => update(&|s| fail(s, pattern, &e.to_string())),
            }
        }
        files.sort_by(|a, b| a.0.cmp(&b.0));
        files.dedup_by(|a, b| a.0 == b.0);
        let me = spec.members.iter().position(|m| *m == self.me);
        if !spec.members.is_empty() && me.is_none() {
            let reason = format!("worker {} is not among the preload's members", self.me);
            update(&|s| {
                fail(s, "", &reason);
                s.phase = PreloadPhase::Failed as i32;
                s.finished_unix_millis = now_millis();
            });
            return;
        }
        let bs = self.cache.block_size();
        // The blocks of each file that this worker owns.
        let plan: Vec<(String, ObjectMeta, Vec<u64>)> = files
            .into_iter()
            .map(|(path, m)| {
                let owned = if spec.metadata_only {
                    vec![]
                } else {
                    (0..block_count(m.size, bs))
                        .filter(|i| match me {
                            None => true,
                            Some(me) => {
                                let id = BlockKey::new(&path, &m.version, *i).id();
                                rendezvous_order(&spec.members, id.0)[0] == me
                            }
                        })
                        .collect()
                };
                (path, m, owned)
            })
            .collect();
        let bytes_total: u64 = plan
            .iter()
            .map(|(p, m, owned)| {
                owned
                    .iter()
                    .map(|i| {
                        let (a, b) = BlockKey::new(p, &m.version, *i).range(bs, m.size);
                        b - a
                    })
                    .sum::<u64>()
            })
            .sum();
        let files_total = plan.len() as u64;
        let matched_bytes: u64 = plan.iter().map(|(_, m, _)| m.size).sum();
        update(&|s| {
            s.files_total = files_total;
            s.bytes_total = bytes_total;
            s.matched_bytes = matched_bytes;
        });
        // Every owned block of every file is one task; a file is done when its last block is.
        let mut remaining: Vec<usize> = plan.iter().map(|(_, _, owned)| owned.len()).collect();
        let mut failed = vec![false; plan.len()];
        let empty = remaining.iter().filter(|r| **r == 0).count() as u64;
        if empty > 0 {
            update(&|s| s.files_done += empty);
        }
        let tasks: Vec<(usize, BlockKey, u64)> = plan
            .iter()
            .enumerate()
            .flat_map(|(fi, (path, m, owned))| {
                owned
                    .iter()
                    .map(move |i| (fi, BlockKey::new(path, &m.version, *i), m.size))
            })
            .collect();
        let budget = Arc::new(tokio::sync::Semaphore::new(
            (BYTES_IN_FLIGHT >> 10) as usize,
        ));
        let cache = self.cache.clone();
        let mut results = futures::stream::iter(tasks.into_iter().map(|(fi, key, size)| {
            let cache = cache.clone();
            let budget = budget.clone();
            async move {
                let (a, b) = key.range(bs, size);
                let kib = ((b - a) >> 10).clamp(1, BYTES_IN_FLIGHT >> 10) as u32;
                let _permit = budget.acquire_many(kib).await;
                let r = cache.get(&key, size).await.map(|(b, _)| b.len() as u64);
                (fi, r)
            }
        }))
        .buffer_unordered(BLOCK_CONCURRENCY);
        while let Some((fi, r)) = results.next().await {
            let path = &plan[fi].0;
            remaining[fi] -= 1;
            let file_done = remaining[fi] == 0;
            let failure = match &r {
                Err(e) if !failed[fi] => {
                    failed[fi] = true;
                    Some(e.to_string())
                }
                _ => None,
            };
            let loaded = *r.as_ref().unwrap_or(&0);
            update(&|s| {
                s.bytes_done += loaded;
                if file_done {
                    s.files_done += 1;
                }
                if let Some(reason) = &failure {
                    fail(s, path, reason);
                }
            });
        }
        update(&|s| {
            s.phase = if s.failures.is_empty() {
                PreloadPhase::Succeeded as i32
            } else {
                PreloadPhase::Failed as i32
            };
            s.finished_unix_millis = now_millis();
        });
    }

    /// The files a path or glob pattern names.
    async fn expand(&self, pattern: &str) -> Result<Vec<(String, ObjectMeta)>, LakeError> {
        let pattern = lakecache_lake::normalize(pattern);
        let is_glob = pattern.contains(['*', '?', '[', '{']);
        let literal: Vec<&str> = pattern
            .split('/')
            .take_while(|c| !c.contains(['*', '?', '[', '{']))
            .collect();
        let base = literal.join("/");
        let matcher: Option<GlobMatcher> = if is_glob {
            Some(
                GlobBuilder::new(&pattern)
                    // `*` stays within one folder; `**` crosses folders.
                    .literal_separator(true)
                    .build()
                    .map_err(|e| LakeError::Other {
                        path: pattern.clone(),
                        message: e.to_string(),
                    })?
                    .compile_matcher(),
            )
        } else {
            None
        };
        let base_meta = self.meta.stat(&base).await?;
        if !base_meta.is_dir() {
            return Ok(vec![(base, base_meta)]);
        }
        // Directories are listed LIST_CONCURRENCY at a time: against a far lake a tree of a
        // hundred folders otherwise costs a hundred round trips one after another.
        let mut out = Vec::new();
        let mut pending = vec![base];
        let mut listing = futures::stream::FuturesUnordered::new();
        loop {
            while listing.len() < LIST_CONCURRENCY {
                let Some(dir) = pending.pop() else { break };
                let meta = self.meta.clone();
                listing.push(async move {
                    let entries = meta.list(&dir).await;
                    (dir, entries)
                });
            }
            let Some((dir, entries)) = listing.next().await else {
                break;
            };
            for e in entries?.iter() {
                let path = lakecache_lake::join(&dir, &e.name);
                if e.meta.is_dir() {
                    pending.push(path);
                } else if matcher.as_ref().is_none_or(|m| m.is_match(&path)) {
                    out.push((path, e.meta.clone()));
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::WorkerMetrics;
    use crate::store::{BlockStore, TierKind, TierSpec};
    use lakecache_lake::{FaultMode, FaultSource, OpendalSource, Source, SourceSpec};
    use prost::Message;

    struct Fixture {
        _dirs: (tempfile::TempDir, tempfile::TempDir),
        preloader: Arc<Preloader>,
    }

    fn fixture() -> Fixture {
        let (lake, mem) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let real = OpendalSource::new(&SourceSpec::new(format!(
            "file://{}",
            lake.path().display()
        )))
        .unwrap();
        // Down: every path fails at once, which is all these tests need from the lake.
        let fault = FaultSource::new(Arc::new(real));
        fault.set_mode(FaultMode::Down);
        let source: Arc<dyn Source> = Arc::new(fault);
        let metrics = Arc::new(WorkerMetrics::default());
        let store = BlockStore::open(
            vec![TierSpec {
                kind: TierKind::Memory,
                dir: mem.path().into(),
                capacity: 1 << 20,
            }],
            1 << 16,
            metrics.clone(),
        )
        .unwrap();
        let meta = Arc::new(MetadataCache::new(
            source.clone(),
            Default::default(),
            1000,
            metrics.clone(),
        ));
        let cache = Arc::new(BlockCache::new(
            Arc::new(store),
            source,
            meta.clone(),
            1 << 16,
            4,
            metrics,
        ));
        Fixture {
            _dirs: (lake, mem),
            preloader: Preloader::new("w0".into(), cache, meta),
        }
    }

    fn spec(id: &str, paths: Vec<String>) -> PreloadSpec {
        PreloadSpec {
            id: id.into(),
            paths,
            metadata_only: false,
            members: vec![],
        }
    }

    async fn finished(p: &Preloader, id: &str) -> PreloadStatus {
        let mut rx = p.watch(id).unwrap();
        rx.wait_for(|s| s.phase != PreloadPhase::Running as i32)
            .await
            .unwrap()
            .clone()
    }

    #[tokio::test]
    async fn finished_preloads_are_pruned() {
        let f = fixture();
        let p = &f.preloader;
        for i in 0..KEEP_FINISHED + 6 {
            p.start(spec(&format!("p{i}"), vec!["missing".into()]));
            finished(p, &format!("p{i}")).await;
        }
        // Each start kept the last KEEP_FINISHED finished ones: p5 to p68, then p69 started.
        assert!(p.watch("p4").is_none() && p.watch("p5").is_some());
        p.start(spec("last", vec!["missing".into()]));
        for i in 0..6 {
            assert!(p.watch(&format!("p{i}")).is_none(), "p{i} kept");
        }
        assert!(p.watch("p6").is_some() && p.watch("p69").is_some());
        assert_eq!(p.jobs.lock().len(), KEEP_FINISHED + 1);
        finished(p, "last").await;
        p.prune_at(now_millis() + FINISHED_TTL_MILLIS - 60_000);
        assert!(p.watch("p69").is_some(), "pruned before its hour was up");
        p.prune_at(now_millis() + FINISHED_TTL_MILLIS + 60_000);
        assert!(p.jobs.lock().is_empty(), "finished an hour ago and kept");
    }

    #[tokio::test]
    async fn failures_are_capped_and_clipped() {
        let f = fixture();
        // Paths over the limit, in two-byte characters: clipped at a character boundary.
        let long = "é".repeat(MAX_FAILURE_PATH_BYTES / 2);
        let paths: Vec<String> = (0..150).map(|i| format!("{i}{long}")).collect();
        f.preloader.start(spec("many", paths));
        let s = finished(&f.preloader, "many").await;
        assert_eq!(s.phase, PreloadPhase::Failed as i32);
        assert_eq!(s.failures.len(), MAX_FAILURES);
        for fl in &s.failures {
            assert!(fl.path.ends_with('…'), "path not clipped");
            assert!(fl.path.len() <= MAX_FAILURE_PATH_BYTES, "{}", fl.path.len());
            assert!(
                fl.reason.len() <= MAX_FAILURE_REASON_BYTES,
                "{}",
                fl.reason.len()
            );
        }
        let last = &s.failures.last().unwrap().reason;
        assert!(
            last.ends_with("(and 50 more failed paths, not listed)"),
            "{last}"
        );
    }

    #[test]
    fn the_largest_status_fits_its_bound() {
        let mut s = PreloadStatus {
            id: "i".repeat(MAX_ID_BYTES),
            phase: PreloadPhase::Failed as i32,
            files_total: u64::MAX,
            files_done: u64::MAX,
            bytes_total: u64::MAX,
            bytes_done: u64::MAX,
            failures: vec![],
            started_unix_millis: i64::MIN,
            finished_unix_millis: i64::MIN,
            matched_bytes: u64::MAX,
        };
        let mut log = FailureLog::default();
        let (path, reason) = ("p".repeat(100_000), "r".repeat(100_000));
        for _ in 0..10 * MAX_FAILURES {
            log.record(&mut s, &path, &reason);
        }
        assert_eq!(s.failures.len(), MAX_FAILURES);
        let len = s.encoded_len();
        assert!(len <= MAX_STATUS_BYTES, "{len} bytes > {MAX_STATUS_BYTES}");
        let listed = MAX_FAILURES * (MAX_FAILURE_PATH_BYTES + MAX_FAILURE_REASON_BYTES);
        assert!(len > listed, "not the worst case: {len} bytes");
    }
}
