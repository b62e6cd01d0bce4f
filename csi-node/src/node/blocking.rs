//! Every file and mount call of a handler runs on the blocking pool under a deadline; a call
//! past it answers `Unavailable` while its thread runs on, holding the volume lock of the
//! operation that started it.

use std::sync::Weak;
use std::time::Duration;

use super::{Busy, NodeError};

tokio::task_local! {
    /// The volume lock taken last by the operation running on this task (a CSI call, a repair
    /// pass), if it still holds it. A blocking call started under it keeps the lock until its
    /// thread ends: past the deadline the handler answers and lets go of its guard, but the
    /// thread (a bind mount, an unmount, a state write) runs on, and a retry must get `Aborted`
    /// rather than run beside it.
    pub(super) static HELD: parking_lot::Mutex<Weak<Busy>>;
}

/// Runs `f` on the blocking pool, for at most `deadline`; past it the call is `Unavailable`
/// (the thread finishes on its own, holding the volume lock of the operation that started it,
/// see [`HELD`]). Every file and mount call of a handler that changes something goes through
/// here, so that none holds a thread of the gRPC runtime; looks into a cache mount go through
/// [`Plugin::look`], which holds no volume lock.
pub(super) async fn blocking<T: Send + 'static>(
    what: &str,
    deadline: Duration,
    f: impl FnOnce() -> Result<T, NodeError> + Send + 'static,
) -> Result<T, NodeError> {
    let held = HELD.try_with(|h| h.lock().upgrade()).ok().flatten();
    blocking_holding(what, deadline, held, f).await
}

/// Runs `f` on the blocking pool within `deadline`; `held` (a lock guard) is dropped when the
/// thread ends, not when the caller gives up on it.
pub(super) async fn blocking_holding<T: Send + 'static, G: Send + 'static>(
    what: &str,
    deadline: Duration,
    held: Option<G>,
    f: impl FnOnce() -> Result<T, NodeError> + Send + 'static,
) -> Result<T, NodeError> {
    let f = move || {
        let r = f();
        drop(held);
        r
    };
    match tokio::time::timeout(deadline, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(NodeError::Internal(format!("{what}: {e}"))),
        Err(_) => Err(NodeError::Unavailable(format!(
            "{what} did not finish within {}; the cache mount or its workers are slow, retry",
            humantime::format_duration(deadline)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tonic::Code;

    use super::*;

    #[tokio::test]
    async fn a_blocking_call_past_its_deadline_is_unavailable_and_frees_the_handler() {
        let started = Instant::now();
        let e = blocking(
            "looking at the cache mount",
            Duration::from_millis(100),
            || {
                std::thread::sleep(Duration::from_secs(2));
                Ok(())
            },
        )
        .await
        .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(e.code(), Code::Unavailable);
        assert!(e.message().contains("looking at the cache mount"), "{e:?}");
        assert_eq!(
            blocking("x", Duration::from_secs(1), || Ok(7))
                .await
                .unwrap(),
            7
        );
    }
}
