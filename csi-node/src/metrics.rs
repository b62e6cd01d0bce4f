//! The plugin's metrics, registered under the `lakecache_csi` prefix.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub method: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Debug)]
pub struct CsiMetrics {
    /// CSI calls by method and gRPC code.
    pub calls: Family<CallLabels, Counter>,
    pub call_duration: Family<MethodLabel, Histogram>,
    /// Repairs by kind: `fuse` (a new FUSE server) or `target` (a published path bound again).
    pub repairs: Family<KindLabel, Counter>,
}

impl Default for CsiMetrics {
    fn default() -> Self {
        Self {
            calls: Default::default(),
            call_duration: Family::new_with_constructor(|| {
                // 1 ms … ~65 s
                Histogram::new(exponential_buckets(0.001, 2.0, 17))
            }),
            repairs: Default::default(),
        }
    }
}

impl CsiMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register("calls", "CSI calls by method and code", self.calls.clone());
        r.register(
            "call_duration_seconds",
            "Time to answer a CSI call",
            self.call_duration.clone(),
        );
        r.register(
            "repairs",
            "Broken mounts repaired, by kind (fuse, target)",
            self.repairs.clone(),
        );
    }

    pub fn observe(&self, method: &str, code: tonic::Code, took: Duration) {
        self.calls
            .get_or_create(&CallLabels {
                method: method.into(),
                code: format!("{code:?}"),
            })
            .inc();
        self.call_duration
            .get_or_create(&MethodLabel {
                method: method.into(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn repair(&self, kind: &str) {
        self.repairs
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc();
    }
}
