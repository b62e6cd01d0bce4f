//! The operator's metrics, under the `lakecache_operator` prefix.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    pub controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub controller: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub controller: String,
    pub reason: String,
}

#[derive(Debug)]
pub struct OperatorMetrics {
    /// Reconciles by controller and result (`ok`, `error`).
    pub reconciles: Family<ResultLabels, Counter>,
    /// Reconcile errors by controller and reason.
    pub errors: Family<ReasonLabels, Counter>,
    /// Problems found in users' objects (invalid specs, missing Secrets), by reason.
    pub problems: Family<ReasonLabels, Counter>,
    pub duration: Family<ControllerLabel, Histogram>,
    /// Whether this replica holds the leader lease.
    pub leader: Gauge,
}

impl Default for OperatorMetrics {
    fn default() -> Self {
        Self {
            reconciles: Default::default(),
            errors: Default::default(),
            problems: Default::default(),
            duration: Family::new_with_constructor(|| {
                // 1 ms … ~32 s
                Histogram::new(exponential_buckets(0.001, 2.0, 16))
            }),
            leader: Default::default(),
        }
    }
}

impl OperatorMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "reconciles",
            "Reconciles by controller and result",
            self.reconciles.clone(),
        );
        r.register(
            "reconcile_errors",
            "Reconcile errors by controller and reason",
            self.errors.clone(),
        );
        r.register(
            "object_problems",
            "Problems found in users' objects, by controller and reason",
            self.problems.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Time to reconcile one object",
            self.duration.clone(),
        );
        r.register(
            "leader",
            "1 while this replica holds the leader lease",
            self.leader.clone(),
        );
    }

    pub fn reconciled(&self, controller: &str, took: Duration, error: Option<&str>) {
        self.reconciles
            .get_or_create(&ResultLabels {
                controller: controller.into(),
                result: if error.is_some() { "error" } else { "ok" }.into(),
            })
            .inc();
        if let Some(reason) = error {
            self.errors
                .get_or_create(&ReasonLabels {
                    controller: controller.into(),
                    reason: reason.into(),
                })
                .inc();
        }
        self.duration
            .get_or_create(&ControllerLabel {
                controller: controller.into(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn problem(&self, controller: &str, reason: &str) {
        self.problems
            .get_or_create(&ReasonLabels {
                controller: controller.into(),
                reason: reason.into(),
            })
            .inc();
    }
}
