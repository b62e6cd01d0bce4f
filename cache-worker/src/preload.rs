//! Preloading: loading paths into the cache before a job reads them.
//!
//! A preload names paths or glob patterns. The worker expands them through its metadata cache
//! (which warms the metadata too), then loads the blocks it owns among the members it was given,
//! by the same rendezvous placement the readers use, so that every worker of a CacheNamespace
//! loads a disjoint share in parallel and the readers later find each block where they look.
//! Progress (files and bytes done of total) and per-path failures are kept per preload id and
//! can be watched; a preload can be cancelled.

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

/// A preload request as the worker sees it.
#[derive(Debug, Clone)]
pub struct PreloadSpec {
    pub id: String,
    pub paths: Vec<String>,
    pub metadata_only: bool,
    pub members: Vec<String>,
}

struct Job {
    status: watch::Sender<PreloadStatus>,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// Runs and tracks the preloads of one worker.
pub struct Preloader {
    me: String,
    cache: Arc<BlockCache>,
    meta: Arc<MetadataCache>,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
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
        })
    }

    /// Starts a preload, or returns the status of the one with that id.
    pub fn start(self: &Arc<Self>, spec: PreloadSpec) -> PreloadStatus {
        let mut jobs = self.jobs.lock();
        if let Some(job) = jobs.get(&spec.id) {
            return job.status.borrow().clone();
        }
        let initial = PreloadStatus {
            id: spec.id.clone(),
            phase: PreloadPhase::Running as i32,
            started_unix_millis: now_millis(),
            ..Default::default()
        };
        let (tx, _) = watch::channel(initial.clone());
        let job = Arc::new(Job {
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
        let mut files: Vec<(String, ObjectMeta)> = Vec::new();
        for pattern in &spec.paths {
            match self.expand(pattern).await {
                Ok(mut found) => files.append(&mut found),
                Err(e) => update(&|s| {
                    s.failures.push(PathFailure {
                        path: pattern.clone(),
                        reason: e.to_string(),
                    })
                }),
            }
        }
        files.sort_by(|a, b| a.0.cmp(&b.0));
        files.dedup_by(|a, b| a.0 == b.0);
        let me = spec.members.iter().position(|m| *m == self.me);
        if !spec.members.is_empty() && me.is_none() {
            let reason = format!("worker {} is not among the preload's members", self.me);
            update(&|s| {
                s.failures.push(PathFailure {
                    path: String::new(),
                    reason: reason.clone(),
                });
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
                    s.failures.push(PathFailure {
                        path: path.clone(),
                        reason: reason.clone(),
                    });
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
