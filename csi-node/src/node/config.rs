//! The plugin's settings, and the memory check that a new volume's FUSE server fits beside the
//! others in the mounter's container.

use std::path::PathBuf;
use std::time::Duration;

use lakecache_client::local_cache::QUEUE_BYTES;
use lakecache_client::prefetch::READ_RESERVE;
use lakecache_client::reader::LISTING_ENTRY_BYTES;

use crate::volume::Caps;

/// Plugin settings.
#[derive(Debug, Clone)]
pub struct PluginConfig {
    pub node_id: String,
    /// Read-ahead budget of a mount, unless its volume context sets one.
    pub prefetch_budget: u64,
    pub fuse_threads: usize,
    /// Where FUSE servers keep node-local whole-file copies (a subdirectory per volume), and
    /// how much per volume unless its volume context says otherwise; `None` or 0 turns them off.
    pub local_cache_dir: Option<PathBuf>,
    pub local_cache_size: u64,
    /// How long a FUSE server may wait for a first worker.
    pub startup_timeout: Duration,
    /// How long a call to the mounter may take.
    pub mounter_timeout: Duration,
    /// The most a volume may ask for (`prefetchBudget`, `localCacheSize`).
    pub caps: Caps,
    /// The mounter container's memory limit, which every FUSE server shares; 0 when unknown
    /// (no check).
    pub mounter_memory: u64,
    /// Memory of one FUSE server beyond its prefetch budget (its read reserve, copy queue,
    /// listings, the process itself), counted against `mounter_memory` for every staged
    /// volume; see [`fuse_server_overhead`].
    pub fuse_server_overhead: u64,
    /// Entries of directory listings each FUSE server keeps.
    pub listing_budget: usize,
    /// Whether FUSE servers read blocks over the block transport (gRPC otherwise).
    pub block_transport: bool,
    /// How long a filesystem call of a CSI handler may take (a look at the mounted cache, a
    /// bind mount): a mount whose workers hang must not hold the handler for minutes.
    pub fs_timeout: Duration,
}

/// Entries of listings a FUSE server keeps by default: ~50 MB (at [`LISTING_ENTRY_BYTES`]), a
/// tenth of what `lakecache local` keeps. A directory larger than the budget is still listed
/// once and kept alone while it is walked.
pub const DEFAULT_LISTING_BUDGET: usize = 200_000;

/// What a FUSE server's own process takes beyond its buffers and listings: the binary, the
/// runtime and its threads, the FUSE threads' request buffers, the inode table, the worker
/// connections. An allowance, not a measured bound.
pub const FUSE_PROCESS_BYTES: u64 = 32 << 20;

/// The memory of one FUSE server beyond its prefetch budget, when `--fuse-server-overhead` is
/// not given: its read reserve ([`READ_RESERVE`], 64 MiB), its queue of blocks for node-local
/// copies ([`QUEUE_BYTES`], 32 MiB), its listings at [`LISTING_ENTRY_BYTES`] an entry, and
/// [`FUSE_PROCESS_BYTES`]: 177 MiB with the default listing budget.
///
/// Not covered: each read call in flight holds its block beyond the reserve when the block is
/// larger than what the reserve has left (block size × calls in flight: FUSE threads ×
/// the kernel's read-ahead requests), and the HTTP/2 windows of worker connections.
pub fn fuse_server_overhead(listing_budget: usize) -> u64 {
    READ_RESERVE
        + QUEUE_BYTES
        + (listing_budget as u64).saturating_mul(LISTING_ENTRY_BYTES)
        + FUSE_PROCESS_BYTES
}

impl PluginConfig {
    /// What one FUSE server with `budget` takes of the mounter's memory.
    fn fuse_server_memory(&self, budget: u64) -> u64 {
        budget.saturating_add(self.fuse_server_overhead)
    }
}

/// Whether the mounter's memory limit holds one more FUSE server of `budget` beside `staged`
/// (the budgets of the other staged volumes); the error says which value to raise.
pub fn check_mounter_memory(
    cfg: &PluginConfig,
    volume_id: &str,
    budget: u64,
    staged: &[u64],
) -> Result<(), String> {
    if cfg.mounter_memory == 0 {
        return Ok(());
    }
    let others: u64 = staged.iter().map(|b| cfg.fuse_server_memory(*b)).sum();
    let need = others.saturating_add(cfg.fuse_server_memory(budget));
    if need <= cfg.mounter_memory {
        return Ok(());
    }
    let b = bytesize::ByteSize;
    Err(format!(
        "volume {volume_id} needs {} of the mounter's memory (prefetchBudget {} plus {} per FUSE \
         server), and the {} volumes staged on this node already take {}: that is more than the \
         mounter's memory limit {}. Raise csi.mounter.resources.limits.memory, lower the \
         volume's prefetchBudget (or csi.prefetchBudget), or run the pod on another node",
        b(cfg.fuse_server_memory(budget)),
        b(budget),
        b(cfg.fuse_server_overhead),
        staged.len(),
        b(others),
        b(cfg.mounter_memory)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::testkit::config;

    #[test]
    fn the_default_overhead_covers_the_reserve_the_copy_queue_and_the_listings() {
        const MIB: u64 = 1 << 20;
        let o = fuse_server_overhead(DEFAULT_LISTING_BUDGET);
        assert_eq!(o, 64 * MIB + 32 * MIB + 200_000 * 256 + 32 * MIB);
        assert_eq!(o / MIB, 176, "about 177 MiB");
        assert!(fuse_server_overhead(2_000_000) > 550 * MIB);
    }

    #[test]
    fn the_mounters_memory_holds_the_staged_budgets_and_an_overhead_each() {
        const MIB: u64 = 1 << 20;
        let cfg = config(100 * MIB, 10 * MIB);
        check_mounter_memory(&cfg, "v", 90 * MIB, &[]).unwrap();
        check_mounter_memory(&cfg, "v", 20 * MIB, &[60 * MIB]).unwrap();
        let e = check_mounter_memory(&cfg, "v", 21 * MIB, &[60 * MIB]).unwrap_err();
        assert!(e.contains("csi.mounter.resources.limits.memory"), "{e}");
        assert!(e.contains("prefetchBudget"), "{e}");
        // The overhead counts for every server, even with no budget.
        let e = check_mounter_memory(&cfg, "v", 0, &[0; 10]).unwrap_err();
        assert!(e.contains("10 volumes"), "{e}");
        // Unknown limit: no check.
        check_mounter_memory(&config(0, MIB), "v", u64::MAX / 2, &[u64::MAX / 2]).unwrap();
    }
}
