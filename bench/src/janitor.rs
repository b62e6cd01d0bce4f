//! Cleanup that happens whatever way the run ends.
//!
//! The benchmark changes the machine: it adds a network namespace, a veth pair with `tbf`
//! qdiscs, tmpfs and FUSE mounts, and child processes. Each change registers its undo with the
//! [`Janitor`] the moment it is made, and gets a [`Guard`] that runs the undo when dropped:
//! the normal path and every error path (`?` and panics unwind through the guards). SIGINT and
//! SIGTERM run every undo still registered, newest first, and exit. A run killed with SIGKILL
//! leaves its changes behind; the next run sweeps them ([`crate::net::sweep_stale`]).
//!
//! Undos must be idempotent and bounded in time: they kill with a deadline, unmount lazily,
//! and ignore "already gone".

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

// parking_lot's mutex does not poison: an undo must run even after a panic elsewhere.
use parking_lot::Mutex;

type Undo = Box<dyn FnOnce() + Send>;

#[derive(Default)]
pub struct Janitor {
    undos: Mutex<Vec<(u64, String, Undo)>>,
    next: AtomicU64,
    /// Held through a whole [`Janitor::run_all`], so a second caller returns only once the
    /// machine is clean.
    draining: Mutex<()>,
    /// Set by `run_all`: a change registered afterwards is undone at once.
    closing: AtomicBool,
    /// Set when a signal started the cleanup (that thread exits the process).
    interrupted: AtomicBool,
    /// Undos under way through [`Guard`]s, which `run_all` waits for.
    busy: AtomicUsize,
}

impl Janitor {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Registers `undo`; it runs when the returned guard drops, or at a signal.
    pub fn register(
        self: &Arc<Self>,
        what: impl Into<String>,
        undo: impl FnOnce() + Send + 'static,
    ) -> Guard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.undos.lock().push((id, what.into(), Box::new(undo)));
        if self.closing.load(Ordering::SeqCst) {
            // Made while the run is being torn down (a signal raced with the main thread).
            self.run_one(id);
        }
        Guard {
            janitor: self.clone(),
            id,
        }
    }

    /// Whether a signal is tearing the run down.
    pub fn interrupted(&self) -> bool {
        self.interrupted.load(Ordering::SeqCst)
    }

    fn run_one(&self, id: u64) {
        // Counted before the undo leaves the list, so `run_all` cannot miss it.
        self.busy.fetch_add(1, Ordering::SeqCst);
        let undo = {
            let mut undos = self.undos.lock();
            undos
                .iter()
                .position(|u| u.0 == id)
                .map(|i| undos.remove(i))
        };
        if let Some((_, _, f)) = undo {
            f();
        }
        self.busy.fetch_sub(1, Ordering::SeqCst);
    }

    /// Runs every registered undo, newest first.
    pub fn run_all(&self) {
        self.closing.store(true, Ordering::SeqCst);
        let _draining = self.draining.lock();
        loop {
            let next = self.undos.lock().pop();
            let Some((_, what, f)) = next else { break };
            eprintln!("lakecache-bench: cleaning up {what}");
            f();
        }
        // Undos another thread took from the list may still be running (the main thread's
        // guards drop as a signal tears the run down): the machine is clean once they end.
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.busy.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// On SIGINT or SIGTERM: clean up everything and exit (130 / 143).
    pub fn on_signals(self: &Arc<Self>) -> anyhow::Result<()> {
        let janitor = self.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                rt.block_on(async {
                    use tokio::signal::unix::{SignalKind, signal};
                    let (Ok(mut int), Ok(mut term)) = (
                        signal(SignalKind::interrupt()),
                        signal(SignalKind::terminate()),
                    ) else {
                        return;
                    };
                    let code = tokio::select! {
                        _ = int.recv() => 130,
                        _ = term.recv() => 143,
                    };
                    eprintln!("lakecache-bench: interrupted; cleaning up");
                    janitor.interrupted.store(true, Ordering::SeqCst);
                    janitor.run_all();
                    std::process::exit(code);
                });
            })?;
        Ok(())
    }
}

/// Runs its undo when dropped.
#[must_use = "dropping the guard undoes the change at once"]
pub struct Guard {
    janitor: Arc<Janitor>,
    id: u64,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.janitor.run_one(self.id);
    }
}

/// Bounds one workload: past its deadline, everything is cleaned up (which kills the system
/// under test, failing any read still hanging on its mount) and the run exits with status 3.
pub struct Watchdog {
    _disarm: std::sync::mpsc::Sender<()>,
}

impl Watchdog {
    pub fn arm(janitor: &Arc<Janitor>, what: &str, timeout: std::time::Duration) -> Watchdog {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let janitor = janitor.clone();
        let what = what.to_string();
        let _ = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(timeout) {
                    eprintln!(
                        "lakecache-bench: {what} did not finish within {timeout:?}; stopping"
                    );
                    janitor.run_all();
                    std::process::exit(3);
                }
            });
        Watchdog { _disarm: tx }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn guards_undo_once_and_run_all_goes_newest_first() {
        let j = Janitor::new();
        let order = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicUsize::new(0));
        let g1 = {
            let (o, c) = (order.clone(), count.clone());
            j.register("one", move || {
                o.lock().push(1);
                c.fetch_add(1, Ordering::SeqCst);
            })
        };
        let _g2 = {
            let o = order.clone();
            j.register("two", move || o.lock().push(2))
        };
        let _g3 = {
            let o = order.clone();
            j.register("three", move || o.lock().push(3))
        };
        drop(g1);
        assert_eq!(count.load(Ordering::SeqCst), 1);
        j.run_all();
        assert_eq!(*order.lock(), vec![1, 3, 2]);
        // The remaining guards drop without running anything again; a change made after the
        // teardown started is undone at once.
        let o = order.clone();
        let _late = j.register("late", move || o.lock().push(4));
        assert_eq!(*order.lock(), vec![1, 3, 2, 4]);
    }
}
