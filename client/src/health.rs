//! How the reader judges its workers: who is answering, how fast answers come, and when to ask
//! a second worker.
//!
//! A worker that dies is cheap: its connections are refused or reset and the reader moves to the
//! next owner at once. A worker that *hangs* (a frozen node, a partition, a stopped process, a
//! half-open connection) is the expensive failure: calls to it are accepted and never answered.
//! Four things keep it cheap, together:
//!
//! - **Deadlines that follow the workers.** Every call must show a first sign of life within
//!   [`Health::first_answer_deadline`]: several times the p99 of the first answers seen lately,
//!   at least [`MIN_DEADLINE`], at most the configured worker timeout. A worker answers a block
//!   request at once with an empty chunk, and a listing with an empty page, before it reads a
//!   tier or the lake: so the first answer measures whether the worker is alive, and a slow disk
//!   or lake never counts against it (the data then gets the whole worker timeout).
//! - **Hedged reads.** A block whose worker has not answered after about the p99 of first
//!   answers ([`Health::hedge_delay`]) is asked of the next owner too; the first good answer
//!   wins. Only silence is hedged, not a slow answer: the next owner seldom holds the block, so a
//!   hedge costs a lake read, which beats a silent worker but not a busy one. Hedges spend
//!   tokens that every block read earns a tenth of, so at most about one read in ten is hedged
//!   and a struggling cluster is not doubled in load.
//! - **Suspicion.** A worker with calls waiting that gives no sign of life for a few p99s (200 ms
//!   at least; a worker sends a heartbeat every 50 ms while a block waits on its lake)
//!   ([`Health::is_suspect`]) is asked after the others, and reads waiting on it go to the next
//!   owner at once: a hang, before or after a call's first answer, is noticed in a fraction of a
//!   second, long before any deadline.
//! - **Ejection.** [`EJECT_AFTER`] consecutive failures (timeouts, transport errors) eject a
//!   worker: reads skip it and go straight to the next owner. A probe in the background asks
//!   the worker for its `Info` after a backoff (doubling from [`BACKOFF_MIN`] to [`BACKOFF_MAX`])
//!   and brings it back when it answers, so a worker that resumes serves again within seconds.
//! - **HTTP/2 keepalive** on every worker connection (see [`crate::membership`]): a connection
//!   whose peer stopped answering pings is closed, which fails its calls at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lakecache_proto::lakecache::v1 as pb;
use parking_lot::Mutex;

use crate::membership::Membership;
use crate::metrics::ReaderMetrics;

/// Consecutive failures that eject a worker.
pub const EJECT_AFTER: u32 = 2;
/// First and longest wait before an ejected worker is probed.
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
pub const BACKOFF_MAX: Duration = Duration::from_secs(8);
/// A worker ejected again within this long of coming back doubles its last backoff.
const FLAPPING: Duration = Duration::from_secs(30);
/// How long a probe waits for the worker's answer.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// The shortest first-answer deadline: below it, a busy machine's scheduling noise would eject
/// healthy workers.
pub const MIN_DEADLINE: Duration = Duration::from_secs(1);
/// A worker is suspect after answering nothing for this many times the p99, and at least
/// [`MIN_SUSPECT`], while calls wait on it.
const SUSPECT_FACTOR: u32 = 4;
/// At least four of a worker's 50 ms heartbeats, and the time a 1 MiB chunk takes at 10 MB/s.
const MIN_SUSPECT: Duration = Duration::from_millis(200);
/// The first-answer deadline is this many times the observed p99.
const DEADLINE_FACTOR: u32 = 8;
/// Hedge delay bounds.
const MIN_HEDGE: Duration = Duration::from_millis(5);
/// Until enough answers are seen, assume this p99.
const DEFAULT_P99: Duration = Duration::from_millis(50);
/// Answers kept for the percentile, and how many before it is trusted.
const WINDOW: usize = 512;
const MIN_SAMPLES: usize = 32;
/// Hedge tokens: the most kept, and what one block read earns.
const HEDGE_BURST: f64 = 10.0;
const HEDGE_EARN: f64 = 0.1;

#[derive(Debug, Default)]
struct WorkerState {
    failures: u32,
    /// Set while ejected: the current backoff.
    ejected: Option<Duration>,
    /// Calls to the worker waiting for their first answer.
    waiting: u32,
    /// Since when the worker has answered nothing while calls wait on it.
    quiet_since: Option<Instant>,
    /// The backoff of its last ejection, and when it came back: a worker ejected again soon
    /// after (its probe answers but its reads do not) waits twice as long each time.
    last_backoff: Duration,
    back_at: Option<Instant>,
}

/// The latest first-answer latencies, and their p99 (recomputed every few samples).
struct Latencies {
    samples: Vec<Duration>,
    next: usize,
    since_sorted: usize,
    p99: Duration,
}

impl Latencies {
    fn record(&mut self, d: Duration) {
        if self.samples.len() < WINDOW {
            self.samples.push(d);
        } else {
            self.samples[self.next] = d;
            self.next = (self.next + 1) % WINDOW;
        }
        self.since_sorted += 1;
        if self.samples.len() >= MIN_SAMPLES && self.since_sorted >= 32 {
            let mut s = self.samples.clone();
            s.sort_unstable();
            self.p99 = s[(s.len() * 99 / 100).min(s.len() - 1)];
            self.since_sorted = 0;
        }
    }
}

/// Health of every worker, shared by all reads of one reader.
pub struct Health {
    workers: Mutex<HashMap<String, WorkerState>>,
    latencies: Mutex<Latencies>,
    tokens: Mutex<f64>,
    metrics: Arc<ReaderMetrics>,
}

impl Health {
    pub fn new(metrics: Arc<ReaderMetrics>) -> Self {
        Self {
            workers: Default::default(),
            latencies: Mutex::new(Latencies {
                samples: Vec::with_capacity(WINDOW),
                next: 0,
                since_sorted: 0,
                p99: DEFAULT_P99,
            }),
            tokens: Mutex::new(HEDGE_BURST),
            metrics,
        }
    }

    /// The p99 of recent first answers.
    pub fn p99(&self) -> Duration {
        self.latencies.lock().p99
    }

    /// How long a call may take to show its first sign of life.
    pub fn first_answer_deadline(&self, worker_timeout: Duration) -> Duration {
        (self.p99() * DEADLINE_FACTOR)
            .max(MIN_DEADLINE)
            .min(worker_timeout)
    }

    /// How long a block read waits for a first answer before asking the next owner too.
    pub fn hedge_delay(&self) -> Duration {
        self.p99().max(MIN_HEDGE)
    }

    /// A block read started: it earns a fraction of a hedge token.
    pub fn earn(&self) {
        let mut t = self.tokens.lock();
        *t = (*t + HEDGE_EARN).min(HEDGE_BURST);
    }

    /// Takes a hedge token, if one is left.
    pub fn take_hedge(&self) -> bool {
        let mut t = self.tokens.lock();
        if *t >= 1.0 {
            *t -= 1.0;
            true
        } else {
            false
        }
    }

    /// How long a worker with calls waiting may answer none of them before it is suspect.
    pub fn suspect_after(&self) -> Duration {
        (self.p99() * SUSPECT_FACTOR).clamp(MIN_SUSPECT, MIN_DEADLINE)
    }

    /// Whether `id` has calls waiting and gave no sign of life (a first answer, data, or the
    /// heartbeat a worker sends every 50 ms while it waits on its lake) for
    /// [`Self::suspect_after`]: a hanging worker looks so long before its calls time out. A suspect worker is asked
    /// after the others, and reads waiting on it are hedged without spending a token.
    pub fn is_suspect(&self, id: &str) -> bool {
        let after = self.suspect_after();
        self.workers
            .lock()
            .get(id)
            .is_some_and(|w| w.waiting > 0 && w.quiet_since.is_some_and(|t| t.elapsed() > after))
    }

    /// A call to `id` starts waiting for its first answer; the guard ends the wait.
    pub fn waiting(self: &Arc<Self>, id: &str) -> Waiting {
        let mut workers = self.workers.lock();
        let w = workers.entry(id.to_string()).or_default();
        w.waiting += 1;
        w.quiet_since.get_or_insert_with(Instant::now);
        Waiting {
            health: self.clone(),
            id: id.to_string(),
            done: false,
        }
    }

    fn stop_waiting(&self, id: &str) {
        if let Some(w) = self.workers.lock().get_mut(id) {
            w.waiting = w.waiting.saturating_sub(1);
            if w.waiting == 0 {
                w.quiet_since = None;
            }
        }
    }

    /// Whether `id` is ejected.
    pub fn is_ejected(&self, id: &str) -> bool {
        self.workers
            .lock()
            .get(id)
            .is_some_and(|w| w.ejected.is_some())
    }

    /// A call to `id` showed its first sign of life after `latency`.
    pub fn answered(&self, id: &str, latency: Duration) {
        self.latencies.lock().record(latency);
        if let Some(w) = self.workers.lock().get_mut(id) {
            w.failures = 0;
            if w.waiting > 0 {
                w.quiet_since = Some(Instant::now());
            }
        }
    }

    /// A call to `id` got another message (data, or a heartbeat): the worker is alive.
    pub fn progress(&self, id: &str) {
        if let Some(w) = self.workers.lock().get_mut(id)
            && w.waiting > 0
        {
            w.quiet_since = Some(Instant::now());
        }
    }

    /// A call to `id` got its answer, without a first-answer latency worth recording (a worker
    /// in this process).
    pub fn alive(&self, id: &str) {
        if let Some(w) = self.workers.lock().get_mut(id) {
            w.failures = 0;
        }
    }

    /// A call to `id` failed for the worker's own reasons (no answer, transport error). Returns
    /// true when this ejected it; then the caller starts the probe ([`Self::watch`]).
    pub fn failed(&self, id: &str) -> bool {
        let mut workers = self.workers.lock();
        let w = workers.entry(id.to_string()).or_default();
        w.failures += 1;
        if w.ejected.is_none() && w.failures >= EJECT_AFTER {
            let flapping = w.back_at.is_some_and(|t| t.elapsed() < FLAPPING);
            let backoff = if flapping {
                (w.last_backoff * 2).min(BACKOFF_MAX)
            } else {
                BACKOFF_MIN
            };
            w.ejected = Some(backoff);
            self.metrics.ejections.inc();
            self.metrics.ejected_workers.inc();
            tracing::warn!(
                worker = id,
                failures = w.failures,
                "worker ejected: it stopped answering; reads go to the next owner until it \
                 answers a probe"
            );
            return true;
        }
        false
    }

    /// Probes ejected worker `id` in the background until it answers (then it is back) or
    /// leaves the membership.
    pub fn watch(self: &Arc<Self>, id: String, membership: Arc<Membership>) {
        let health = self.clone();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            // Bounded: each round waits at least BACKOFF_MIN, and the worker leaves the
            // membership or answers in the end; the reader's drop ends the runtime too.
            loop {
                let backoff = match health.workers.lock().get(&id).and_then(|w| w.ejected) {
                    Some(b) => b,
                    None => return,
                };
                tokio::time::sleep(backoff).await;
                let conn = membership
                    .snapshot()
                    .iter()
                    .find(|c| c.member.id == id)
                    .cloned();
                let Some(conn) = conn else {
                    health.forget(&id);
                    return;
                };
                let mut client = conn.client.clone();
                let started = Instant::now();
                let answer =
                    tokio::time::timeout(PROBE_TIMEOUT, client.info(pb::InfoRequest {})).await;
                match answer {
                    // Any answer (even a refusal of the token) shows the worker is serving.
                    Ok(Ok(_)) => {
                        health.reinstate(&id, started.elapsed());
                        return;
                    }
                    Ok(Err(s)) if s.code() == tonic::Code::Unauthenticated => {
                        health.reinstate(&id, started.elapsed());
                        return;
                    }
                    _ => {
                        if let Some(w) = health.workers.lock().get_mut(&id)
                            && let Some(b) = w.ejected.as_mut()
                        {
                            *b = (*b * 2).min(BACKOFF_MAX);
                        }
                    }
                }
            }
        });
    }

    fn reinstate(&self, id: &str, took: Duration) {
        let mut workers = self.workers.lock();
        if let Some(w) = workers.get_mut(id)
            && let Some(backoff) = w.ejected.take()
        {
            w.failures = 0;
            w.last_backoff = backoff;
            w.back_at = Some(Instant::now());
            self.metrics.readmissions.inc();
            self.metrics.ejected_workers.dec();
            tracing::info!(worker = id, probe = ?took, "worker is back: it answered a probe");
        }
    }

    /// Drops what is known of a worker that left the membership.
    fn forget(&self, id: &str) {
        if let Some(w) = self.workers.lock().remove(id)
            && w.ejected.is_some()
        {
            self.metrics.ejected_workers.dec();
        }
    }
}

/// A call waiting for its first answer (see [`Health::waiting`]).
pub struct Waiting {
    health: Arc<Health>,
    id: String,
    done: bool,
}

impl Waiting {
    /// The call got its first answer (or failed): it waits no more.
    pub fn end(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        if !self.done {
            self.done = true;
            self.health.stop_waiting(&self.id);
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> Arc<Health> {
        Arc::new(Health::new(Arc::new(ReaderMetrics::default())))
    }

    #[test]
    fn consecutive_failures_eject_and_an_answer_in_between_resets_them() {
        let h = health();
        assert!(!h.failed("w0"));
        h.answered("w0", Duration::from_millis(1));
        assert!(!h.failed("w0"), "an answer resets the count");
        assert!(h.failed("w0"), "two in a row eject");
        assert!(h.is_ejected("w0"));
        assert!(!h.failed("w0"), "ejected once, not again");
        assert!(!h.is_ejected("w1"));
        assert_eq!(h.metrics.ejections.get(), 1);
        h.reinstate("w0", Duration::ZERO);
        assert!(!h.is_ejected("w0"));
        assert_eq!(h.metrics.ejected_workers.get(), 0);
        // Ejected again soon after coming back: it waits longer before the next probe.
        h.failed("w0");
        assert!(h.failed("w0"));
        assert_eq!(h.workers.lock()["w0"].ejected, Some(BACKOFF_MIN * 2));
    }

    #[test]
    fn deadlines_follow_the_observed_p99_within_bounds() {
        let h = health();
        let timeout = Duration::from_secs(60);
        // Before enough samples: the default.
        assert_eq!(h.hedge_delay(), DEFAULT_P99);
        for i in 0..200u64 {
            h.answered("w", Duration::from_micros(500 + i));
        }
        assert!(h.p99() < Duration::from_millis(1), "{:?}", h.p99());
        assert_eq!(h.hedge_delay(), MIN_HEDGE);
        assert_eq!(h.first_answer_deadline(timeout), MIN_DEADLINE);
        for _ in 0..WINDOW {
            h.answered("w", Duration::from_millis(400));
        }
        assert_eq!(h.hedge_delay(), Duration::from_millis(400));
        assert_eq!(
            h.first_answer_deadline(timeout),
            Duration::from_millis(3200)
        );
        assert_eq!(
            h.first_answer_deadline(Duration::from_secs(2)),
            Duration::from_secs(2),
            "never past the configured timeout"
        );
    }

    #[test]
    fn a_worker_with_calls_waiting_and_no_answer_is_suspect() {
        let h = health();
        let a = h.waiting("w0");
        assert!(!h.is_suspect("w0"), "not yet");
        std::thread::sleep(h.suspect_after() + Duration::from_millis(20));
        assert!(h.is_suspect("w0"), "quiet for too long with a call waiting");
        // An answer to any call clears it.
        h.answered("w0", Duration::from_millis(1));
        assert!(!h.is_suspect("w0"));
        drop(a);
        std::thread::sleep(h.suspect_after() + Duration::from_millis(20));
        assert!(!h.is_suspect("w0"), "nothing waits: nothing to suspect");
        // A call that ended (answered or failed) no longer waits.
        h.waiting("w1").end();
        std::thread::sleep(h.suspect_after() + Duration::from_millis(20));
        assert!(!h.is_suspect("w1"));
    }

    #[test]
    fn hedges_are_limited_to_about_one_read_in_ten() {
        let h = health();
        let mut hedged = 0;
        for _ in 0..1000 {
            h.earn();
            if h.take_hedge() {
                hedged += 1;
            }
        }
        // The burst, then a tenth of the reads.
        assert!((105..=112).contains(&hedged), "{hedged}");
    }
}
