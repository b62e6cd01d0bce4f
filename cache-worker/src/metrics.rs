//! The worker's metrics, defined once; registered under the `lakecache_worker` prefix.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabel {
    pub tier: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: String,
}

fn latency() -> Histogram {
    // 100 µs … ~13 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// Every metric of a worker.
#[derive(Debug)]
pub struct WorkerMetrics {
    /// Block requests served from a tier (`memory`, `disk`).
    pub hits: Family<TierLabel, Counter>,
    /// Block requests that had to go to the source.
    pub misses: Counter,
    /// Bytes sent to readers, by where they came from (`memory`, `disk`, `source`).
    pub bytes_served: Family<TierLabel, Counter>,
    /// Of those, bytes the block transport handed to the kernel from Memory tier files
    /// (`sendfile`), never copied in the worker.
    pub bytes_sendfile: Counter,
    /// Block transport connections open now.
    pub block_connections: Gauge,
    pub source_requests: Counter,
    pub source_bytes: Counter,
    pub source_errors: Counter,
    /// Misses that joined a source request already under way for the same block.
    pub coalesced: Counter,
    pub evictions: Family<TierLabel, Counter>,
    pub demotions: Family<TierLabel, Counter>,
    pub promotions: Counter,
    /// Blocks not admitted because they were colder than what they would push out.
    pub rejections: Counter,
    pub corrupt_blocks: Counter,
    /// Block files that could not be written into a tier (a full or failing filesystem), by the
    /// tier written to. Each such block was evicted, so it is a miss next time.
    pub tier_write_errors: Family<TierLabel, Counter>,
    pub tier_used_bytes: Family<TierLabel, Gauge>,
    pub tier_capacity_bytes: Family<TierLabel, Gauge>,
    pub tier_blocks: Family<TierLabel, Gauge>,
    /// Time to get a block, by where it came from.
    pub block_latency: Family<TierLabel, Histogram>,
    pub source_latency: Histogram,
    /// Metadata requests by operation (`stat`, `list`) that were answered from the cache.
    pub metadata_hits: Family<OpLabel, Counter>,
    pub metadata_misses: Family<OpLabel, Counter>,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self {
            hits: Default::default(),
            misses: Default::default(),
            bytes_served: Default::default(),
            bytes_sendfile: Default::default(),
            block_connections: Default::default(),
            source_requests: Default::default(),
            source_bytes: Default::default(),
            source_errors: Default::default(),
            coalesced: Default::default(),
            evictions: Default::default(),
            demotions: Default::default(),
            promotions: Default::default(),
            rejections: Default::default(),
            corrupt_blocks: Default::default(),
            tier_write_errors: Default::default(),
            tier_used_bytes: Default::default(),
            tier_capacity_bytes: Default::default(),
            tier_blocks: Default::default(),
            block_latency: Family::new_with_constructor(latency),
            source_latency: latency(),
            metadata_hits: Default::default(),
            metadata_misses: Default::default(),
        }
    }
}

impl WorkerMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "block_hits",
            "Block requests served from a cache tier",
            self.hits.clone(),
        );
        r.register(
            "block_misses",
            "Block requests that went to the source",
            self.misses.clone(),
        );
        r.register(
            "served_bytes",
            "Bytes sent to readers by origin",
            self.bytes_served.clone(),
        );
        r.register(
            "sendfile_bytes",
            "Bytes sent to readers from Memory tier files with sendfile, without a copy",
            self.bytes_sendfile.clone(),
        );
        r.register(
            "block_connections",
            "Block transport connections open",
            self.block_connections.clone(),
        );
        r.register(
            "source_requests",
            "Requests made to the source",
            self.source_requests.clone(),
        );
        r.register(
            "source_bytes",
            "Bytes read from the source",
            self.source_bytes.clone(),
        );
        r.register(
            "source_errors",
            "Failed source requests",
            self.source_errors.clone(),
        );
        r.register(
            "coalesced_misses",
            "Misses that joined a request in flight",
            self.coalesced.clone(),
        );
        r.register(
            "evictions",
            "Blocks evicted from the last tier",
            self.evictions.clone(),
        );
        r.register(
            "demotions",
            "Blocks moved to the next tier",
            self.demotions.clone(),
        );
        r.register(
            "promotions",
            "Blocks moved up to the first tier",
            self.promotions.clone(),
        );
        r.register(
            "admission_rejections",
            "Blocks not admitted",
            self.rejections.clone(),
        );
        r.register(
            "corrupt_blocks",
            "Blocks that failed their checksum",
            self.corrupt_blocks.clone(),
        );
        r.register(
            "tier_write_errors",
            "Block files that could not be written into a tier; the block was evicted",
            self.tier_write_errors.clone(),
        );
        r.register(
            "tier_used_bytes",
            "Bytes held per tier",
            self.tier_used_bytes.clone(),
        );
        r.register(
            "tier_capacity_bytes",
            "Capacity per tier",
            self.tier_capacity_bytes.clone(),
        );
        r.register(
            "tier_blocks",
            "Blocks held per tier",
            self.tier_blocks.clone(),
        );
        r.register(
            "block_seconds",
            "Time to get a block by origin",
            self.block_latency.clone(),
        );
        r.register(
            "source_seconds",
            "Time of one source read",
            self.source_latency.clone(),
        );
        r.register(
            "metadata_hits",
            "Metadata requests answered from cache",
            self.metadata_hits.clone(),
        );
        r.register(
            "metadata_misses",
            "Metadata requests sent to the source",
            self.metadata_misses.clone(),
        );
    }

    pub fn tier(&self, tier: &str) -> TierLabel {
        TierLabel {
            tier: tier.to_string(),
        }
    }
}
