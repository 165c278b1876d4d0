//! The operator's metrics.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use storerelay_metrics::{CounterVec, DEFAULT_BUCKETS, FAST_BUCKETS, HistogramVec, render_gauge};

pub struct Metrics {
    /// Admission decisions: injected, unchanged, conflict, denied, invalid.
    pub admissions: CounterVec,
    admission_duration: HistogramVec,
    /// Reconciliations by result: ok, error.
    pub reconciliations: CounterVec,
    reconcile_duration: HistogramVec,
    /// Workload restarts requested by `rollout.policy: RestartWorkloads`, by kind.
    pub workload_restarts: CounterVec,
    /// Webhook configuration patches (caBundle, namespaceSelector).
    pub webhook_patches: CounterVec,
    pub leader: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            admissions: CounterVec::new(
                "storerelay_operator_admissions_total",
                "Pod admission decisions by result.",
                &["result"],
            ),
            admission_duration: HistogramVec::new(
                "storerelay_operator_admission_duration_seconds",
                "Time to decide on one AdmissionReview.",
                "path",
                FAST_BUCKETS,
            ),
            reconciliations: CounterVec::new(
                "storerelay_operator_reconciliations_total",
                "Route reconciliations by result.",
                &["result"],
            ),
            reconcile_duration: HistogramVec::new(
                "storerelay_operator_reconcile_duration_seconds",
                "Time of one reconciliation.",
                "controller",
                DEFAULT_BUCKETS,
            ),
            workload_restarts: CounterVec::new(
                "storerelay_operator_workload_restarts_total",
                "Workload restarts requested to pick up the sidecar, by kind.",
                &["kind"],
            ),
            webhook_patches: CounterVec::new(
                "storerelay_operator_webhook_patches_total",
                "Patches of the MutatingWebhookConfiguration, by field.",
                &["field"],
            ),
            leader: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    pub fn observe_admission(&self, took: Duration) {
        self.admission_duration.observe("/mutate", took);
    }

    pub fn observe_reconcile(&self, took: Duration) {
        self.reconcile_duration.observe("notificationroute", took);
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(2048);
        self.admissions.render(&mut out);
        self.admission_duration.render(&mut out);
        self.reconciliations.render(&mut out);
        self.reconcile_duration.render(&mut out);
        self.workload_restarts.render(&mut out);
        self.webhook_patches.render(&mut out);
        render_gauge(
            &mut out,
            "storerelay_operator_leader",
            "1 while this replica holds the lease and writes.",
            &[(vec![], f64::from(u8::from(self.leader.load(Ordering::Relaxed))))],
        );
        out
    }
}
