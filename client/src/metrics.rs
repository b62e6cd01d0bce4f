//! The reader's metrics; registered under the `lakecache_fuse` prefix.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OriginLabel {
    /// `memory`, `disk` or `source` as the worker reported, or `direct` for reads that bypassed
    /// every worker.
    pub origin: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabel {
    /// `blocks` (the block transport), `grpc`, or `local` (a worker in this process).
    pub transport: &'static str,
}

#[derive(Debug, Default)]
pub struct ReaderMetrics {
    /// Blocks workers answered, by how they came.
    pub worker_reads: Family<TransportLabel, Counter>,
    pub blocks: Family<OriginLabel, Counter>,
    pub bytes: Family<OriginLabel, Counter>,
    /// Worker calls that failed and moved to the next owner.
    pub failovers: Counter,
    pub read_errors: Counter,
    pub prefetched_blocks: Counter,
    /// Bytes held by prefetched blocks.
    pub prefetch_bytes: Gauge,
    /// Opens served from a complete node-local copy (see `local_cache`).
    pub local_opens: Counter,
    /// Of those, opens handed to the kernel (FUSE passthrough).
    pub passthrough_opens: Counter,
    /// Directory listings asked of workers (or the source); cached listings don't count.
    pub listings: Counter,
    /// Block reads also asked of the next owner because the first had not answered yet.
    pub hedges: Counter,
    /// Of those, reads where the hedge's answer came first.
    pub hedge_wins: Counter,
    /// Workers ejected for not answering, and brought back after answering a probe.
    pub ejections: Counter,
    pub readmissions: Counter,
    /// Workers ejected now.
    pub ejected_workers: Gauge,
}

impl ReaderMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register("blocks", "Blocks read, by origin", self.blocks.clone());
        r.register("bytes", "Bytes read, by origin", self.bytes.clone());
        r.register(
            "worker_block_reads",
            "Blocks workers answered, by transport (blocks, grpc, local)",
            self.worker_reads.clone(),
        );
        r.register(
            "failovers",
            "Worker calls that failed over",
            self.failovers.clone(),
        );
        r.register("read_errors", "Reads that failed", self.read_errors.clone());
        r.register(
            "prefetched_blocks",
            "Blocks fetched ahead",
            self.prefetched_blocks.clone(),
        );
        r.register(
            "prefetch_bytes",
            "Bytes held by prefetch",
            self.prefetch_bytes.clone(),
        );
        r.register(
            "local_opens",
            "Opens served from a complete node-local copy",
            self.local_opens.clone(),
        );
        r.register(
            "passthrough_opens",
            "Opens handed to the kernel with FUSE passthrough",
            self.passthrough_opens.clone(),
        );
        r.register(
            "listings",
            "Directory listings asked of workers or the source",
            self.listings.clone(),
        );
        r.register(
            "hedges",
            "Block reads also asked of the next owner after the hedge delay",
            self.hedges.clone(),
        );
        r.register(
            "hedge_wins",
            "Hedged block reads the hedge answered first",
            self.hedge_wins.clone(),
        );
        r.register(
            "worker_ejections",
            "Workers ejected after consecutive failures",
            self.ejections.clone(),
        );
        r.register(
            "worker_readmissions",
            "Ejected workers brought back after answering a probe",
            self.readmissions.clone(),
        );
        r.register(
            "ejected_workers",
            "Workers ejected now",
            self.ejected_workers.clone(),
        );
    }

    /// Hits over all blocks read (memory and disk against everything).
    pub fn hit_ratio(&self) -> f64 {
        let get = |o: &str| {
            self.blocks
                .get_or_create(&OriginLabel { origin: o.into() })
                .get()
        };
        let hits = get("memory") + get("disk");
        let all = hits + get("source") + get("direct");
        if all == 0 {
            0.0
        } else {
            hits as f64 / all as f64
        }
    }
}
