//! Read-ahead for one open file.
//!
//! Training loaders read shards front to back and images whole. Waiting for each block only when
//! the kernel asks for it would pay a worker round trip (and on a miss a lake round trip) per
//! block. So each open file keeps a window of blocks fetched ahead of the reader: it starts at
//! one block, doubles every time a read continues where the last one ended (or in the next
//! block: the kernel's own read-ahead issues reads slightly out of order), up to
//! `max_window` blocks, and collapses to nothing on a seek, so random readers fetch only what
//! they read. Blocks fetched ahead hold bytes from a budget shared by every open file; when the
//! budget is spent, read-ahead pauses rather than grow memory. Blocks behind the reader are
//! dropped as it moves on.
//!
//! The blocks a read needs hold budget too, or memory would grow with the number of open files
//! (each keeps the blocks it read near its position) whatever the budget says. A read takes
//! budget first, before read-ahead does; when the budget is spent it still must not wait for
//! it (the budget is held by blocks of other files, which only their own reads release), so it
//! takes its blocks from a small reserve of its own, [`READ_RESERVE`], waits there when the
//! reserve is in use (by other reads, which end), and keeps nothing from it once it returns.
//! A fetch whose block nobody holds any more is cancelled. So the blocks of a mount take at
//! most its budget plus [`READ_RESERVE`] (a read larger than the whole reserve takes it all and
//! overruns it by the rest, which FUSE's reads, at most 1 MiB, never do with blocks of 1 MiB or
//! more), plus one block per worker call still receiving (see `Reader`: a call never holds more
//! than a block), plus, with node-local copies, [`crate::local_cache::QUEUE_BYTES`] of blocks
//! waiting to be written there.
//!
//! A file no larger than one block is one block: it is fetched whole on its first read, which is
//! how shuffled small files (images) are served.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use lakecache_lake::ObjectMeta;
use lakecache_lake::block::block_count;
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::local_cache::LocalFileCache;
use crate::reader::{ReadError, Reader};

/// Budget granularity: permits are KiB.
const UNIT: u64 = 1024;

/// Memory for the blocks of reads that find the budget spent, beyond the budget: a few reads
/// of 4 MiB blocks at once.
pub const READ_RESERVE: u64 = 64 << 20;

/// Permits for `bytes`.
fn units(bytes: u64) -> u32 {
    bytes.div_ceil(UNIT).min(u32::MAX as u64) as u32
}

/// How far behind the stream's front a read may arrive and still belong to it: twice the
/// kernel's largest read-ahead request.
const LAG: u64 = 2 << 20;

type Flight = Shared<BoxFuture<'static, Result<Bytes, ReadError>>>;

struct Slot {
    flight: Flight,
    /// The block's share of the budget, given back when the slot is dropped.
    _permit: OwnedSemaphorePermit,
    /// Fetched ahead of the reader, not for a read.
    ahead: bool,
}

struct State {
    /// Block index where the next sequential read is expected.
    next_block: Option<u64>,
    window: u64,
    blocks: BTreeMap<u64, Slot>,
}

/// Prefetch settings shared by every open file.
#[derive(Clone)]
pub struct PrefetchBudget {
    sem: Arc<Semaphore>,
    /// [`READ_RESERVE`], in permits.
    reads: Arc<Semaphore>,
    pub max_window: u64,
}

impl PrefetchBudget {
    pub fn new(bytes: u64, max_window: u64) -> Self {
        let permits = (bytes / UNIT).clamp(1, Semaphore::MAX_PERMITS as u64) as usize;
        Self {
            sem: Arc::new(Semaphore::new(permits)),
            reads: Arc::new(Semaphore::new((READ_RESERVE / UNIT) as usize)),
            max_window: max_window.max(1),
        }
    }

    /// Reserve for reads of `bytes` that found the budget spent; waits while other reads use it.
    async fn reserve(&self, bytes: u64) -> Result<OwnedSemaphorePermit, ReadError> {
        let n = units(bytes).min((READ_RESERVE / UNIT) as u32);
        self.reads
            .clone()
            .acquire_many_owned(n)
            .await
            .map_err(|e| ReadError::Unavailable(format!("read reserve: {e}")))
    }

    /// Bytes of the read reserve not in use.
    pub fn reserve_available(&self) -> u64 {
        self.reads.available_permits() as u64 * UNIT
    }

    /// Bytes of budget not in use.
    pub fn available(&self) -> u64 {
        self.sem.available_permits() as u64 * UNIT
    }
}

/// One open file.
pub struct FileReader {
    reader: Arc<Reader>,
    path: String,
    meta: ObjectMeta,
    budget: PrefetchBudget,
    state: Mutex<State>,
    /// Where whole blocks are offered to be kept as a local copy of the file.
    local: Option<Arc<LocalFileCache>>,
}

impl FileReader {
    pub fn new(
        reader: Arc<Reader>,
        path: String,
        meta: ObjectMeta,
        budget: PrefetchBudget,
    ) -> Self {
        Self {
            reader,
            path,
            meta,
            budget,
            state: Mutex::new(State {
                next_block: None,
                window: 0,
                blocks: BTreeMap::new(),
            }),
            local: None,
        }
    }

    /// Offers every block this file reads to `cache`.
    pub fn with_local_cache(mut self, cache: Option<Arc<LocalFileCache>>) -> Self {
        self.local = cache;
        self
    }

    pub fn meta(&self) -> &ObjectMeta {
        &self.meta
    }

    fn flight(&self, index: u64) -> Flight {
        let reader = self.reader.clone();
        let path = self.path.clone();
        let meta = self.meta.clone();
        let local = self.local.clone();
        let task = tokio::spawn(async move {
            let b = reader.block(&path, &meta, index).await;
            if let (Ok(data), Some(cache)) = (&b, &local) {
                let bs = reader.config().block_size;
                cache.offer(&path, &meta, bs, index, data.clone());
            }
            b
        });
        // Dropped by its last holder (the slot and every read waiting on it): the fetch stops,
        // so no block arrives into memory that nothing counts.
        let mut task = AbortOnDrop(task);
        async move {
            (&mut task.0)
                .await
                .unwrap_or_else(|e| Err(ReadError::Unavailable(format!("read task failed: {e}"))))
        }
        .boxed()
        .shared()
    }

    /// Reads `size` bytes at `offset` (fewer at the end of the file).
    pub async fn read(&self, offset: u64, size: u32) -> Result<Bytes, ReadError> {
        let file_size = self.meta.size;
        if offset >= file_size || size == 0 {
            return Ok(Bytes::new());
        }
        let end = (offset + size as u64).min(file_size);
        let bs = self.reader.config().block_size;
        let (first, last) = (offset / bs, (end - 1) / bs);
        let blocks = block_count(file_size, bs);
        let needed: Vec<(u64, Option<Flight>, bool)> = {
            let mut st = self.state.lock();
            // The kernel's own read-ahead sends several reads at once, and they arrive out of
            // order. A read that starts in a block already fetched ahead, or within `LAG` bytes
            // behind the furthest point the stream reached, or right after it, continues the
            // stream; only a read elsewhere is a seek.
            let lag_blocks = LAG.div_ceil(bs);
            let sequential = match st.next_block {
                None => offset == 0,
                Some(n) => {
                    st.blocks.contains_key(&first) || (first + lag_blocks >= n && first <= n + 1)
                }
            };
            let previous_window = st.window;
            let advancing = st.next_block.is_none_or(|n| first >= n);
            if sequential && advancing {
                st.window = (st.window * 2).clamp(1, self.budget.max_window);
            } else if !sequential {
                st.window = 0;
            }
            // Keep blocks from `LAG` behind the stream's front to the window ahead of it; on a
            // seek, keep what lies near the new position (reads sent earlier may still arrive).
            let max = self.budget.max_window;
            let front = if sequential {
                st.next_block.unwrap_or(0).max(last)
            } else {
                last
            };
            let (keep_from, keep_to) = if sequential {
                (
                    front.saturating_sub(lag_blocks).min(first),
                    front + st.window,
                )
            } else {
                (
                    first.saturating_sub(max + 1),
                    last + previous_window.max(max) + 1,
                )
            };
            // On a seek keep, of the blocks fetched for reads (not ahead), only those next to
            // this read: a random reader's blocks would otherwise take budget from read-ahead.
            let near = first.saturating_sub(1)..=last;
            st.blocks.retain(|i, slot| {
                *i >= keep_from && *i <= keep_to && (sequential || slot.ahead || near.contains(i))
            });
            // The blocks this read needs, from the budget first; those it cannot cover come
            // from the read reserve below, and are not kept.
            let needed: Vec<(u64, Option<Flight>, bool)> = (first..=last)
                .map(|i| {
                    if let Some(slot) = st.blocks.get(&i) {
                        return (i, Some(slot.flight.clone()), true);
                    }
                    let len = bs.min(file_size - i * bs);
                    match self.budget.sem.clone().try_acquire_many_owned(units(len)) {
                        Ok(permit) => {
                            let flight = self.flight(i);
                            st.blocks.insert(
                                i,
                                Slot {
                                    flight: flight.clone(),
                                    _permit: permit,
                                    ahead: false,
                                },
                            );
                            (i, Some(flight), false)
                        }
                        Err(_) => (i, None, false),
                    }
                })
                .collect();
            // Read ahead within the window and the budget.
            for i in last + 1..=(front + st.window).min(blocks.saturating_sub(1)) {
                if st.blocks.contains_key(&i) {
                    continue;
                }
                let len = bs.min(file_size - i * bs);
                let Ok(permit) = self.budget.sem.clone().try_acquire_many_owned(units(len)) else {
                    break;
                };
                self.reader.metrics.prefetched_blocks.inc();
                st.blocks.insert(
                    i,
                    Slot {
                        flight: self.flight(i),
                        _permit: permit,
                        ahead: true,
                    },
                );
            }
            let next = if end.is_multiple_of(bs) {
                end / bs
            } else {
                last
            };
            st.next_block = Some(match st.next_block {
                Some(n) if sequential => n.max(next),
                _ => next,
            });
            needed
        };
        let block_len = |i: u64| bs.min(file_size - i * bs);
        let uncovered: u64 = needed
            .iter()
            .filter(|(_, f, _)| f.is_none())
            .map(|(i, _, _)| block_len(*i))
            .sum();
        let _reserve = if uncovered > 0 {
            Some(self.budget.reserve(uncovered).await?)
        } else {
            None
        };
        let mut parts = Vec::with_capacity(needed.len());
        for (i, f, ahead) in needed {
            let f = f.unwrap_or_else(|| self.flight(i));
            let block = match f.await {
                Ok(b) => b,
                Err(first_err) => {
                    // Do not keep a failed fetch. A block fetched ahead may have failed long
                    // before this read needed it (a passing fault): try it once more now.
                    self.state.lock().blocks.remove(&i);
                    let transient = matches!(
                        first_err,
                        ReadError::Unavailable(_) | ReadError::TimedOut { .. }
                    );
                    if !(ahead && transient) {
                        return Err(first_err);
                    }
                    let _retry = if _reserve.is_none() {
                        Some(self.budget.reserve(block_len(i)).await?)
                    } else {
                        None
                    };
                    self.reader.block(&self.path, &self.meta, i).await?
                }
            };
            let block_start = i * bs;
            let from = offset.max(block_start) - block_start;
            let to = end.min(block_start + block.len() as u64) - block_start;
            if from > to || to as usize > block.len() {
                return Err(ReadError::Unavailable(format!(
                    "{}: block {i} is shorter than expected",
                    self.path
                )));
            }
            parts.push(block.slice(from as usize..to as usize));
        }
        if parts.len() == 1 {
            return Ok(parts.pop().unwrap_or_default());
        }
        let mut out = BytesMut::with_capacity((end - offset) as usize);
        for p in parts {
            out.extend_from_slice(&p);
        }
        Ok(out.freeze())
    }

    /// Blocks this file keeps now (fetched for reads or ahead, all within the budget).
    pub fn kept_blocks(&self) -> usize {
        self.state.lock().blocks.len()
    }

    /// The current read-ahead window, in blocks.
    pub fn window(&self) -> u64 {
        self.state.lock().window
    }
}

/// A task that stops when its handle is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
