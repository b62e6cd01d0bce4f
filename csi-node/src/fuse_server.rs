//! One FUSE server: serves one volume's mount until it is told to stop.
//!
//! The mounter starts one per staged volume (`lakecache-csi-node fuse-server --config …`). It
//! prints one status line on stdout, `ready` once the mount serves or `error: …` when it cannot,
//! then logs to stderr.
//!
//! Started with `--successor`, it takes over the mount's FUSE connection, given on its standard
//! input, instead of mounting ([`crate::handoff`]): it gets ready to serve (workers, token,
//! local copies) first, then asks a running predecessor to hand over, takes the serve lock,
//! replays the journal and serves; reads in flight meanwhile wait in the kernel.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use lakecache_client::fuse::{self, MountConfig};
use lakecache_client::handoff::{self as journal, ServeLock};
use lakecache_client::metrics::ReaderMetrics;
use lakecache_client::{
    FsConfig, FsCore, LocalFileCache, Member, Membership, Reader, ReaderConfig,
};
use lakecache_proto::lakecache::v1::InfoRequest;

use crate::handoff;
use crate::mounts;
use crate::volume::{FuseServerConfig, WorkerSpec};

/// The line the mounter waits for.
pub const READY: &str = "ready";

fn members(workers: &[WorkerSpec]) -> Vec<Member> {
    workers
        .iter()
        .map(|w| Member {
            id: w.id.clone(),
            endpoint: w.endpoint.clone(),
        })
        .collect()
}

/// How often the FUSE server looks at its token file for a new token.
pub const TOKEN_POLL: Duration = Duration::from_secs(1);

/// The deadline of one read or listing, failovers and token refusals included. When the
/// workers roll to a new token before kubelet publishes the volume again with it, every worker
/// refuses this server's tokens until that publish: kubelet republishes `requiresRepublish`
/// volumes on its pod sync, about every 60–90 s (`--sync-frequency`, 1 m, plus jitter), and
/// this server takes the new token within [`TOKEN_POLL`]. Reads meanwhile ask again every
/// second at most and at once on a new token, so they wait up to ~92 s and succeed; 120 s
/// leaves room, and a read still refused then fails with EIO.
pub const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// The token in a token file, without surrounding whitespace (as workers read theirs). An empty
/// file is refused: it must never mean "no authentication".
pub fn read_token_file(path: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the token file {}", path.display()))?;
    let token = text.trim();
    anyhow::ensure!(
        !token.is_empty(),
        "the token file {} is empty: the stage (or publish) secret's \"token\" key must hold the data-plane token",
        path.display()
    );
    Ok(token.to_string())
}

/// Follows the token file: a changed token replaces the one every worker call carries (the
/// plugin rewrites the file when kubelet publishes the volume with a rotated token). A file
/// that cannot be read, or is empty, keeps the current token and is logged (without it).
fn follow_token_file(path: PathBuf, membership: Arc<Membership>, mut current: String) {
    membership.expect_rotation();
    tokio::spawn(async move {
        // Bounded by the process's life; one read of a small file per poll.
        loop {
            tokio::time::sleep(TOKEN_POLL).await;
            let p = path.clone();
            let read = tokio::task::spawn_blocking(move || read_token_file(&p)).await;
            match read {
                Ok(Ok(t)) if t != current => match membership.set_token(&t) {
                    Ok(_) => {
                        tracing::info!(file = %path.display(), "the data-plane token changed; using the new one");
                        current = t;
                    }
                    Err(e) => {
                        tracing::error!(file = %path.display(), error = %e, "ignoring the new token")
                    }
                },
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %format!("{e:#}"), "keeping the current token")
                }
                Err(e) => tracing::error!(error = %e, "reading the token file failed"),
            }
        }
    });
}

/// Asks the workers, in turn, for their block size until one answers or `timeout` passes. For
/// an inline volume (`inline`), errors name no address and carry no worker's message: a tenant
/// reads them in its pod's events.
///
/// A worker that refuses the token is passed over like one that does not answer: during a
/// rotation the workers restart with the new token one by one, and a FUSE server (re)started
/// meanwhile holds one of the two tokens, which some workers still (or already) refuse. Only a
/// pass in which every worker refused it ends the wait early: the token is then wrong for all.
async fn first_answer(
    membership: &Membership,
    timeout: Duration,
    inline: bool,
) -> anyhow::Result<u64> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no workers are published yet");
    let mut refusals = 0usize;
    // Bounded by the deadline; each pass asks every worker once.
    while Instant::now() < deadline {
        let conns = membership.snapshot();
        let mut refused: Vec<&str> = Vec::new();
        for conn in conns.iter() {
            let mut client = conn.client.clone();
            let left = deadline.saturating_duration_since(Instant::now());
            let call = client.info(InfoRequest {});
            match tokio::time::timeout(left.min(Duration::from_secs(3)), call).await {
                Ok(Ok(info)) => return Ok(info.into_inner().block_size),
                Ok(Err(s)) if s.code() == tonic::Code::Unauthenticated => {
                    refused.push(&conn.member.id);
                    last = if inline {
                        format!("worker {} refused the data-plane token", conn.member.id)
                    } else {
                        format!(
                            "worker {} at {} refused the data-plane token ({})",
                            conn.member.id,
                            conn.member.endpoint,
                            s.message()
                        )
                    };
                }
                Ok(Err(_)) | Err(_) if inline => {
                    last = format!("worker {} did not answer", conn.member.id)
                }
                Ok(Err(s)) => {
                    last = format!(
                        "worker {} at {}: {}",
                        conn.member.id,
                        conn.member.endpoint,
                        s.message()
                    )
                }
                Err(_) => {
                    last = format!(
                        "worker {} at {}: no answer",
                        conn.member.id, conn.member.endpoint
                    )
                }
            }
        }
        if !conns.is_empty() && refused.len() == conns.len() {
            anyhow::bail!(
                "every worker ({}: {}) refused the data-plane token: check the token in the \
                 Secret named by the PV's nodeStageSecretRef",
                refused.len(),
                refused.join(", ")
            );
        }
        refusals = refusals.max(refused.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let refused = if refusals > 0 {
        format!("; up to {refusals} refused the data-plane token")
    } else {
        String::new()
    };
    anyhow::bail!(
        "no cache worker answered within {}{refused}; last: {last}",
        humantime::format_duration(timeout)
    )
}

/// How long a read waits when no worker answers: the workers' StatefulSet rolls them one by
/// one (an upgrade), and each comes back at a new address, which this server learns from the
/// CacheNamespace's status a moment later; reads wait for that instead of failing.
pub const WORKER_WAIT: Duration = Duration::from_secs(60);

/// How long a successor waits for its predecessor to let go of the volume.
const TAKEOVER_WAIT: Duration = Duration::from_secs(10);

/// Mounts (or, given `successor`, takes over the connection) and serves until SIGTERM, or
/// until the mount goes. `dir` is the volume's directory (its journal and control socket).
/// Writes the status line to `status`, and the reader's metrics to `metrics` every few seconds
/// (see [`crate::fuse_metrics`]).
pub async fn run(
    cfg: FuseServerConfig,
    dir: &Path,
    successor: Option<(OwnedFd, u64)>,
    status: &mut dyn Write,
    metrics: Option<PathBuf>,
) -> anyhow::Result<()> {
    let result = mount(&cfg, dir, successor).await;
    let (mount, _lock) = match result {
        Ok((m, lock, reader_metrics)) => {
            if let Some(path) = metrics {
                crate::fuse_metrics::publish(reader_metrics, path);
            }
            writeln!(status, "{READY}")?;
            status.flush()?;
            (m, lock)
        }
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            let _ = writeln!(status, "error: {msg}");
            let _ = status.flush();
            return Err(e);
        }
    };
    tracing::info!(volume = %cfg.volume_id, path = %cfg.mount_path.display(), version = crate::VERSION, "serving");
    let ended = async {
        // Bounded by the mount's life; one look a second.
        while !mount.is_finished() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    tokio::select! {
        _ = lakecache_telemetry::shutdown_signal() => {}
        _ = ended => {
            tracing::info!(volume = %cfg.volume_id, "the mount is gone; stopping");
            return Ok(());
        }
    }
    let path = mount.mountpoint.clone();
    let unmounted = tokio::task::spawn_blocking(move || mount.unmount()).await?;
    if let Err(e) = unmounted {
        tracing::warn!(error = %e, "unmount failed; detaching");
        mounts::detach(&path)?;
    }
    tracing::info!(volume = %cfg.volume_id, "stopped");
    Ok(())
}

async fn mount(
    cfg: &FuseServerConfig,
    dir: &Path,
    successor: Option<(OwnedFd, u64)>,
) -> anyhow::Result<(fuse::Mount, ServeLock, Arc<ReaderMetrics>)> {
    let token = match &cfg.token_file {
        Some(path) => Some(read_token_file(path)?),
        None => cfg.token.clone(),
    };
    let membership = Arc::new(
        Membership::new(token.as_deref(), Duration::from_secs(2))
            .context("the data-plane token")?,
    );
    membership.set_block_transport(cfg.block_transport);
    membership.wait_for_workers(WORKER_WAIT);
    if let (Some(path), Some(token)) = (&cfg.token_file, token) {
        follow_token_file(path.clone(), membership.clone(), token);
    }
    match &cfg.workers {
        Some(w) => membership.set(members(w))?,
        None => crate::kube_members::follow(&cfg.namespace, &cfg.name, membership.clone())
            .await
            .with_context(|| {
                format!(
                    "following the workers of CacheNamespace {}/{}",
                    cfg.namespace, cfg.name
                )
            })?,
    }
    let block_size = first_answer(&membership, cfg.startup_timeout, cfg.inline).await?;
    anyhow::ensure!(
        block_size.is_power_of_two(),
        "the workers reported block size {block_size}, which is not a power of two"
    );
    let reader_cfg = ReaderConfig {
        block_size,
        worker_timeout: Duration::from_secs(60),
        read_timeout: READ_TIMEOUT,
        metadata_ttl: cfg.metadata_ttl,
        direct_fallback: false,
    };
    let mut reader = Reader::new(reader_cfg, membership, None);
    if let Some(entries) = cfg.listing_budget {
        reader = reader.with_listing_budget(entries);
    }
    let reader = Arc::new(reader);
    let metrics = reader.metrics.clone();
    let fs = FsConfig {
        attr_ttl: cfg.metadata_ttl.unwrap_or(Duration::from_secs(3600)),
        keep_cache: cfg.metadata_ttl.is_none(),
        prefetch_budget: cfg.prefetch_budget,
        ..FsConfig::default()
    };
    let mut core = FsCore::new(reader, fs);
    if let Some(dir) = cfg
        .local_cache_dir
        .as_ref()
        .filter(|_| cfg.local_cache_size > 0)
    {
        let cache = LocalFileCache::open(dir, cfg.local_cache_size)
            .with_context(|| format!("opening the local copies in {}", dir.display()))?;
        core = core.with_local_cache(cache);
    }
    let mc = MountConfig {
        allow_other: true,
        threads: cfg.fuse_threads.max(1),
        fs_name: format!("lakecache:{}/{}", cfg.namespace, cfg.name),
        passthrough: true,
        handoff: true,
    };
    if let Some((device, id)) = successor {
        return take_over(cfg, dir, core, device, id, mc, metrics).await;
    }
    let lock = wait_for_lock(dir, Duration::from_secs(2)).await?;
    let core = Arc::new(
        core.journal_in(dir)
            .with_context(|| format!("starting the FUSE state journal in {}", dir.display()))?,
    );
    // A dead server leaves "transport endpoint is not connected" behind: detach it first.
    if let mounts::Health::Broken(why) = mounts::health(&cfg.mount_path) {
        tracing::info!(path = %cfg.mount_path.display(), %why, "detaching a broken mount");
        mounts::detach(&cfg.mount_path)?;
    }
    std::fs::create_dir_all(&cfg.mount_path)
        .with_context(|| format!("creating {}", cfg.mount_path.display()))?;
    let handle = tokio::runtime::Handle::current();
    let path = cfg.mount_path.clone();
    let served = core.clone();
    let m = tokio::task::spawn_blocking(move || fuse::mount(served, &path, &mc, handle))
        .await?
        .with_context(|| format!("mounting FUSE at {}", cfg.mount_path.display()))?;
    if core.kernel_init().is_some_and(|k| fuse::can_hand_over(&k)) {
        serve_ctl(dir, &m).await?;
    } else {
        // Nobody keeps the connection, so it ends with this process, as before hand-off.
        tracing::warn!(volume = %cfg.volume_id, "the kernel cannot send unanswered FUSE requests again (FUSE_NOTIFY_RESEND needs Linux 6.9): a restart of this FUSE server breaks its mount and the files open on it");
    }
    Ok((m, lock, metrics))
}

/// Serves the control socket, naming the connection by the mount's device number.
async fn serve_ctl(dir: &Path, m: &fuse::Mount) -> anyhow::Result<()> {
    let id = mounts::device_of(&m.mountpoint)
        .with_context(|| format!("reading the mount table for {}", m.mountpoint.display()))?
        .with_context(|| format!("{} is not mounted", m.mountpoint.display()))?;
    handoff::serve_ctl(dir, m.device(), id, m.freezer())
        .with_context(|| format!("serving {}", dir.join(handoff::CTL).display()))
}

async fn wait_for_lock(dir: &Path, wait: Duration) -> anyhow::Result<ServeLock> {
    let d = dir.to_path_buf();
    tokio::task::spawn_blocking(move || ServeLock::acquire(&d, wait))
        .await?
        .with_context(|| format!("taking the serve lock in {}", dir.display()))
}

/// Serves the connection `device` of a mount that a predecessor served: asks it to hand over
/// if it still runs, waits for it to let go, replays its journal and serves.
async fn take_over(
    cfg: &FuseServerConfig,
    dir: &Path,
    core: FsCore,
    device: OwnedFd,
    id: u64,
    mc: MountConfig,
    metrics: Arc<ReaderMetrics>,
) -> anyhow::Result<(fuse::Mount, ServeLock, Arc<ReaderMetrics>)> {
    // The connection given must be the one mounted here: one kept from an earlier mount at
    // this path (mounted anew since) would be served with this mount's journal.
    let mounted = mounts::device_of(&cfg.mount_path)
        .with_context(|| format!("reading the mount table for {}", cfg.mount_path.display()))?;
    anyhow::ensure!(
        mounted == Some(id),
        "the FUSE connection given ({id}) is not the one mounted at {} ({mounted:?}); not taking over",
        cfg.mount_path.display()
    );
    let started = Instant::now();
    let mark = handoff::HandoverMark::new(dir);
    let d = dir.to_path_buf();
    let asked = tokio::task::spawn_blocking(move || handoff::request_handover(&d))
        .await?
        .context("asking the running FUSE server to hand over")?;
    let lock = wait_for_lock(dir, TAKEOVER_WAIT).await?;
    let frozen_for = started.elapsed();
    let d = dir.to_path_buf();
    let saved = tokio::task::spawn_blocking(move || journal::load(&d))
        .await?
        .with_context(|| format!("reading the FUSE state journal in {}", dir.display()))?;
    let (nodes, handles) = (saved.nodes.len(), saved.handles.len());
    let core = Arc::new(
        core.restore(saved)
            .journal_in(dir)
            .with_context(|| format!("starting the FUSE state journal in {}", dir.display()))?,
    );
    let handle = tokio::runtime::Handle::current();
    let path = cfg.mount_path.clone();
    let m = tokio::task::spawn_blocking(move || fuse::resume(core, device, &path, &mc, handle))
        .await?
        .with_context(|| {
            format!(
                "serving the FUSE connection of {}",
                cfg.mount_path.display()
            )
        })?;
    serve_ctl(dir, &m).await?;
    drop(mark);
    tracing::info!(
        volume = %cfg.volume_id,
        predecessor = if asked { "handed over" } else { "gone" },
        inodes = nodes,
        open_files = handles,
        waited_ms = frozen_for.as_millis() as u64,
        took_ms = started.elapsed().as_millis() as u64,
        "took over the FUSE connection"
    );
    Ok((m, lock, metrics))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_is_trimmed_and_an_empty_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, "s3cr3t\n").unwrap();
        assert_eq!(read_token_file(&p).unwrap(), "s3cr3t");
        for blank in ["", " \n"] {
            std::fs::write(&p, blank).unwrap();
            let e = format!("{:#}", read_token_file(&p).unwrap_err());
            assert!(e.contains("is empty"), "{e}");
        }
        assert!(read_token_file(&dir.path().join("missing")).is_err());
    }
}
