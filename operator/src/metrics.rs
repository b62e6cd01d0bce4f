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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunResultLabel {
    pub result: String,
}

/// How a preload run ended: the `result` label of `preload_runs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunResult {
    Succeeded,
    Failed,
}

impl RunResult {
    pub const ALL: [RunResult; 2] = [RunResult::Succeeded, RunResult::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            RunResult::Succeeded => "succeeded",
            RunResult::Failed => "failed",
        }
    }

    fn label(self) -> RunResultLabel {
        RunResultLabel {
            result: self.as_str().into(),
        }
    }
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
    /// Preload runs that reached a final phase, by result (`succeeded`, `failed`).
    pub preload_runs: Family<RunResultLabel, Counter>,
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
            preload_runs: {
                // Both results exported from the start, at 0: a series born at 1 has no earlier
                // sample, so `increase` would miss the first failed run.
                let f: Family<RunResultLabel, Counter> = Default::default();
                for r in RunResult::ALL {
                    let _ = f.get_or_create(&r.label());
                }
                f
            },
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
        r.register(
            "preload_runs",
            "Preload runs that reached a final phase, by result",
            self.preload_runs.clone(),
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

    /// Counts a preload run that reached its final phase. Called once per run, by the task that
    /// wrote that phase (see `preload::follow`).
    pub fn preload_run(&self, result: RunResult) {
        self.preload_runs.get_or_create(&result.label()).inc();
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

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    fn scrape(m: &OperatorMetrics) -> String {
        let mut r = Registry::with_prefix("lakecache_operator");
        m.register(&mut r);
        let mut out = String::new();
        encode(&mut out, &r).unwrap();
        out
    }

    #[test]
    fn preload_runs_are_counted_by_result_from_zero() {
        let m = OperatorMetrics::default();
        let text = scrape(&m);
        assert!(
            text.contains("# TYPE lakecache_operator_preload_runs counter"),
            "{text}"
        );
        for result in ["succeeded", "failed"] {
            let line = format!("lakecache_operator_preload_runs_total{{result=\"{result}\"}} 0\n");
            assert!(text.contains(&line), "{line:?} not in {text}");
        }
        m.preload_run(RunResult::Failed);
        m.preload_run(RunResult::Failed);
        m.preload_run(RunResult::Succeeded);
        let text = scrape(&m);
        assert!(
            text.contains("lakecache_operator_preload_runs_total{result=\"failed\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("lakecache_operator_preload_runs_total{result=\"succeeded\"} 1\n"),
            "{text}"
        );
    }
}
