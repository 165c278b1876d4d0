//! The operator's metrics, registered in one place.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use storerelay_runtime::metrics::{encode, fast_histogram, register, request_histogram};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Result {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Field {
    pub field: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Path {
    path: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Controller {
    controller: &'static str,
}

pub struct Metrics {
    registry: Registry,
    /// Admission decisions: injected, unchanged, conflict, denied, invalid.
    pub admissions: Family<Result, Counter>,
    admission_duration: Family<Path, Histogram, fn() -> Histogram>,
    /// Reconciliations by result: ok, error.
    pub reconciliations: Family<Result, Counter>,
    reconcile_duration: Family<Controller, Histogram, fn() -> Histogram>,
    /// Workload restarts requested by `rollout.policy: RestartWorkloads`, by kind.
    pub workload_restarts: Family<Kind, Counter>,
    /// Webhook configuration patches (caBundle, namespaceSelector).
    pub webhook_patches: Family<Field, Counter>,
    /// Selector-conflict reports dropped because the queue for Events was full.
    conflict_reports_dropped: Counter,
    /// 1 while this replica holds the lease.
    leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        Metrics {
            admissions: register(
                &mut registry,
                "storerelay_operator_admissions",
                "Pod admission decisions by result",
                Family::default(),
            ),
            admission_duration: register(
                &mut registry,
                "storerelay_operator_admission_duration_seconds",
                "Time to decide on one AdmissionReview",
                Family::new_with_constructor(fast_histogram as fn() -> Histogram),
            ),
            reconciliations: register(
                &mut registry,
                "storerelay_operator_reconciliations",
                "Route reconciliations by result",
                Family::default(),
            ),
            reconcile_duration: register(
                &mut registry,
                "storerelay_operator_reconcile_duration_seconds",
                "Time of one reconciliation",
                Family::new_with_constructor(request_histogram as fn() -> Histogram),
            ),
            workload_restarts: register(
                &mut registry,
                "storerelay_operator_workload_restarts",
                "Workload restarts requested to pick up the sidecar, by kind",
                Family::default(),
            ),
            webhook_patches: register(
                &mut registry,
                "storerelay_operator_webhook_patches",
                "Patches of the MutatingWebhookConfiguration, by field",
                Family::default(),
            ),
            conflict_reports_dropped: register(
                &mut registry,
                "storerelay_operator_conflict_reports_dropped",
                "Selector-conflict reports not turned into Events because too many were waiting",
                Counter::default(),
            ),
            leader: register(
                &mut registry,
                "storerelay_operator_leader",
                "1 while this replica holds the lease and writes",
                Gauge::default(),
            ),
            registry,
        }
    }
}

impl Metrics {
    pub fn count_admission(&self, result: &'static str) {
        self.admissions.get_or_create(&Result { result }).inc();
    }

    /// How many admissions ended with `result` so far.
    pub fn admissions(&self, result: &'static str) -> u64 {
        self.admissions.get_or_create(&Result { result }).get()
    }

    pub fn observe_admission(&self, took: Duration) {
        self.admission_duration.get_or_create(&Path { path: "/mutate" }).observe(took.as_secs_f64());
    }

    pub fn count_reconciliation(&self, result: &'static str) {
        self.reconciliations.get_or_create(&Result { result }).inc();
    }

    pub fn reconciliations(&self, result: &'static str) -> u64 {
        self.reconciliations.get_or_create(&Result { result }).get()
    }

    pub fn observe_reconcile(&self, took: Duration) {
        self.reconcile_duration
            .get_or_create(&Controller { controller: "notificationroute" })
            .observe(took.as_secs_f64());
    }

    pub fn count_workload_restart(&self, kind: &'static str) {
        self.workload_restarts.get_or_create(&Kind { kind }).inc();
    }

    pub fn workload_restarts(&self, kind: &'static str) -> u64 {
        self.workload_restarts.get_or_create(&Kind { kind }).get()
    }

    pub fn count_webhook_patch(&self, field: &'static str) {
        self.webhook_patches.get_or_create(&Field { field }).inc();
    }

    pub fn count_conflict_report_dropped(&self) {
        self.conflict_reports_dropped.inc();
    }

    pub fn conflict_reports_dropped(&self) -> u64 {
        self.conflict_reports_dropped.get()
    }

    pub fn set_leader(&self, leads: bool) {
        self.leader.set(i64::from(leads));
    }

    pub fn render(&self) -> String {
        encode(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_renders_with_its_labels() {
        let metrics = Metrics::default();
        metrics.count_admission("injected");
        metrics.observe_admission(Duration::from_micros(700));
        metrics.count_workload_restart("Deployment");
        metrics.set_leader(true);
        let text = metrics.render();
        for line in [
            "storerelay_operator_admissions_total{result=\"injected\"} 1",
            "storerelay_operator_admission_duration_seconds_count{path=\"/mutate\"} 1",
            "storerelay_operator_workload_restarts_total{kind=\"Deployment\"} 1",
            "storerelay_operator_leader 1",
            "# HELP storerelay_operator_leader 1 while this replica holds the lease and writes.",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
    }
}
