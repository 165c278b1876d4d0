//! The sidecar's metrics, registered in one place. Label values are destination names, status codes
//! and fixed reason words: never URLs or header values.
//!
//! Counters and the histogram are updated where things happen; the spool gauges are read from the
//! spool when Prometheus scrapes, so they are never stale.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use storerelay_runtime::metrics::{encode, register, request_histogram};

use crate::apple::Notification;
use crate::spool::DestinationStats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Received {
    pub version: &'static str,
    pub environment: &'static str,
    pub r#type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Version {
    pub version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Attempt {
    pub destination: String,
    /// delivered, retried or dead.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Destination {
    pub destination: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Code {
    /// An HTTP status code, or unreachable / timeout.
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Result {
    /// success or error.
    pub result: &'static str,
}

/// A request to Apple's App Store Server API.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiRequest {
    pub endpoint: &'static str,
    /// Apple's HTTP status, or `error` when no answer came.
    pub status: String,
}

/// Apple's `sendAttemptResult`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SendAttempt {
    pub result: String,
}

type SecondsGauge = Gauge<f64, AtomicU64>;

/// Every metric the sidecar exports.
pub struct Metrics {
    registry: Registry,
    pub received: Family<Received, Counter>,
    pub duplicates: Family<Version, Counter>,
    pub unrouted: Counter,
    pub unknown_bodies: Counter,
    pub rejected: Family<Reason, Counter>,
    pub deliveries: Family<Attempt, Counter>,
    pub delivery_duration: Family<Destination, Histogram, fn() -> Histogram>,
    pub upstream_responses: Family<Code, Counter>,
    pub config_reloads: Family<Result, Counter>,
    pub secret_file_errors: Family<Destination, Counter>,
    outcome_write_failures: Family<Destination, Counter>,
    due_queries: Family<Destination, Counter>,
    spool_expired: Family<Reason, Counter>,
    spool_left_behind: Family<Destination, Counter>,
    pub apple_api_requests: Family<ApiRequest, Counter>,
    gap_fill_runs: Family<Result, Counter>,
    gap_fill_recovered: Counter,
    self_test_runs: Family<Result, Counter>,
    self_test_last_success: SecondsGauge,
    apple_send_attempt: Family<SendAttempt, Gauge>,
    /// The result `apple_send_attempt` shows as 1 now.
    last_send_attempt: Mutex<Option<String>>,
    spool_pending: Family<Destination, Gauge>,
    spool_dead: Family<Destination, Gauge>,
    spool_oldest_pending: Family<Destination, SecondsGauge>,
    spool_bytes: Gauge,
    spool_max_bytes: Gauge,
    buffered_bytes: Gauge,
    max_buffered_bytes: Gauge,
    ready: Gauge,
    /// One scrape at a time: each clears and refills the spool gauges before encoding.
    scrape: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        Metrics {
            received: register(
                &mut registry,
                "storerelay_notifications_received",
                "Notifications durably stored (or recognised as a stored one's repeat), by version, environment and type",
                Family::default(),
            ),
            duplicates: register(
                &mut registry,
                "storerelay_duplicates",
                "Repeats of a notification already in the spool (not queued again)",
                Family::default(),
            ),
            unrouted: register(
                &mut registry,
                "storerelay_notifications_unrouted",
                "Notifications that matched no destination (acknowledged, mirrored nowhere)",
                Counter::default(),
            ),
            unknown_bodies: register(
                &mut registry,
                "storerelay_notifications_unknown_shape",
                "JSON bodies that were neither V1 nor V2, forwarded (unknownBodies: forward)",
                Counter::default(),
            ),
            rejected: register(
                &mut registry,
                "storerelay_notifications_rejected",
                "Notifications not accepted, by reason",
                Family::default(),
            ),
            deliveries: register(
                &mut registry,
                "storerelay_deliveries",
                "Delivery attempts by destination and outcome (delivered, retried, dead)",
                Family::default(),
            ),
            delivery_duration: register(
                &mut registry,
                "storerelay_delivery_duration_seconds",
                "Time of each delivery attempt",
                Family::new_with_constructor(request_histogram as fn() -> Histogram),
            ),
            upstream_responses: register(
                &mut registry,
                "storerelay_upstream_responses",
                "Answers from the app container by status code (or unreachable, timeout)",
                Family::default(),
            ),
            config_reloads: register(
                &mut registry,
                "storerelay_config_reloads",
                "Config reloads by result (success, error)",
                Family::default(),
            ),
            secret_file_errors: register(
                &mut registry,
                "storerelay_secret_file_errors",
                "Failed reads of a destination's urlFile or headersFile",
                Family::default(),
            ),
            outcome_write_failures: register(
                &mut registry,
                "storerelay_outcome_write_failures",
                "Delivery outcomes that could not be written to the spool (tried again with backoff)",
                Family::default(),
            ),
            due_queries: register(
                &mut registry,
                "storerelay_due_queries",
                "Due queries a destination's dispatcher made in the spool (backlogs, retries, rows not handed over)",
                Family::default(),
            ),
            spool_expired: register(
                &mut registry,
                "storerelay_spool_expired",
                "Deliveries dropped past retainDead, by reason (dead, unknown_destination)",
                Family::default(),
            ),
            spool_left_behind: register(
                &mut registry,
                "storerelay_spool_left_behind",
                "Deliveries still pending in this pod's own (SQLite) spool when the sidecar stopped: lost if the pod is deleted",
                Family::default(),
            ),
            apple_api_requests: register(
                &mut registry,
                "storerelay_apple_api_requests",
                "Requests to Apple's App Store Server API by endpoint and status (error: no answer)",
                Family::default(),
            ),
            gap_fill_runs: register(
                &mut registry,
                "storerelay_gap_fill_runs",
                "Gap-fill runs by result (success, error, skipped: another replica was running it)",
                Family::default(),
            ),
            gap_fill_recovered: register(
                &mut registry,
                "storerelay_gap_fill_recovered",
                "Notifications in Apple's history the spool lacked, replayed and stored by gap-fill",
                Counter::default(),
            ),
            self_test_runs: register(
                &mut registry,
                "storerelay_self_test_runs",
                "Self tests by result (success, failure: a hop failed, skipped: another replica ran it)",
                Family::default(),
            ),
            self_test_last_success: register(
                &mut registry,
                "storerelay_self_test_last_success_timestamp_seconds",
                "When a self test last passed every hop (unix seconds; 0: not since start): alert when it is older than two intervals",
                SecondsGauge::default(),
            ),
            apple_send_attempt: register(
                &mut registry,
                "storerelay_apple_send_attempt",
                "1 for Apple's result of its last attempt to send the self test's notification to us",
                Family::default(),
            ),
            last_send_attempt: Mutex::new(None),
            spool_pending: register(
                &mut registry,
                "storerelay_spool_pending",
                "Deliveries waiting in the spool",
                Family::default(),
            ),
            spool_dead: register(
                &mut registry,
                "storerelay_spool_dead",
                "Deliveries given up on (see `spool dead`, `spool redeliver --dead`)",
                Family::default(),
            ),
            spool_oldest_pending: register(
                &mut registry,
                "storerelay_spool_oldest_pending_seconds",
                "Age of the oldest notification still pending",
                Family::default(),
            ),
            spool_bytes: register(
                &mut registry,
                "storerelay_spool_bytes",
                "Notification bytes held in the spool",
                Gauge::default(),
            ),
            spool_max_bytes: register(
                &mut registry,
                "storerelay_spool_max_bytes",
                "The spool's limit (spool.maxBytes)",
                Gauge::default(),
            ),
            buffered_bytes: register(
                &mut registry,
                "storerelay_ingest_buffered_bytes",
                "Body bytes held by requests being received (limits.maxBufferedBytes bounds it)",
                Gauge::default(),
            ),
            max_buffered_bytes: register(
                &mut registry,
                "storerelay_ingest_max_buffered_bytes",
                "The limit on body bytes held by requests being received (limits.maxBufferedBytes)",
                Gauge::default(),
            ),
            ready: register(
                &mut registry,
                "storerelay_ready",
                "1 while the sidecar accepts notifications",
                Gauge::default(),
            ),
            scrape: Mutex::new(()),
            registry,
        }
    }
}

/// Facts read at scrape time.
pub struct Snapshot<'a> {
    pub now_ms: i64,
    pub spool: &'a [DestinationStats],
    pub configured_destinations: &'a [String],
    pub stored_bytes: u64,
    pub max_bytes: u64,
    pub buffered_bytes: u64,
    pub max_buffered_bytes: u64,
    pub ready: bool,
}

impl Metrics {
    pub fn count_received(&self, notification: &Notification, duplicate: bool) {
        let version = notification.version_label();
        let labels = Received {
            version,
            environment: notification.environment_label(),
            r#type: notification.type_label().to_string(),
        };
        self.received.get_or_create(&labels).inc();
        if duplicate {
            self.duplicates.get_or_create(&Version { version }).inc();
        }
    }

    pub fn reject(&self, reason: &'static str) {
        self.rejected.get_or_create(&Reason { reason }).inc();
    }

    pub fn count_delivery(&self, destination: &str, outcome: &'static str) {
        self.deliveries.get_or_create(&Attempt { destination: destination.to_string(), outcome }).inc();
    }

    pub fn observe_delivery(&self, destination: &str, took: Duration) {
        self.delivery_duration
            .get_or_create(&Destination { destination: destination.to_string() })
            .observe(took.as_secs_f64());
    }

    pub fn count_upstream(&self, code: &str) {
        self.upstream_responses.get_or_create(&Code { code: code.to_string() }).inc();
    }

    pub fn count_reload(&self, result: &'static str) {
        self.config_reloads.get_or_create(&Result { result }).inc();
    }

    pub fn count_secret_error(&self, destination: &str) {
        self.secret_file_errors.get_or_create(&Destination { destination: destination.to_string() }).inc();
    }

    pub fn count_expired(&self, reason: &'static str, deliveries: usize) {
        if deliveries > 0 {
            self.spool_expired.get_or_create(&Reason { reason }).inc_by(deliveries as u64);
        }
    }

    /// Pending deliveries a stopping sidecar leaves in its pod-local spool.
    pub fn count_left_behind(&self, destination: &str, deliveries: u64) {
        self.spool_left_behind.get_or_create(&Destination { destination: destination.to_string() }).inc_by(deliveries);
    }

    pub fn count_gap_fill(&self, result: &'static str, recovered: usize) {
        self.gap_fill_runs.get_or_create(&Result { result }).inc();
        self.gap_fill_recovered.inc_by(recovered as u64);
    }

    /// A self test's outcome; `send_attempt_result` is Apple's verdict on reaching us, when it gave one.
    pub fn count_self_test(&self, result: &'static str, send_attempt_result: Option<&str>) {
        self.self_test_runs.get_or_create(&Result { result }).inc();
        if result == "success" {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            self.self_test_last_success.set(now.as_secs_f64());
        }
        if let Some(current) = send_attempt_result {
            let mut last = self.last_send_attempt.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(previous) = last.replace(current.to_string()) {
                self.apple_send_attempt.get_or_create(&SendAttempt { result: previous }).set(0);
            }
            self.apple_send_attempt.get_or_create(&SendAttempt { result: current.to_string() }).set(1);
        }
    }

    pub fn count_due_query(&self, destination: &str) {
        self.due_queries.get_or_create(&Destination { destination: destination.to_string() }).inc();
    }

    pub fn count_outcome_write_failure(&self, destination: &str) {
        self.outcome_write_failures.get_or_create(&Destination { destination: destination.to_string() }).inc();
    }

    /// Every family, with the spool gauges set from `snapshot`.
    pub fn render(&self, snapshot: &Snapshot<'_>) -> String {
        let _one_scrape = self.scrape.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Every configured destination shows up, even before its first notification; a removed one
        // disappears once its rows are gone.
        for family in [&self.spool_pending, &self.spool_dead] {
            family.clear();
        }
        self.spool_oldest_pending.clear();
        for name in snapshot.configured_destinations {
            let label = Destination { destination: name.clone() };
            self.spool_pending.get_or_create(&label).set(0);
            self.spool_dead.get_or_create(&label).set(0);
            self.spool_oldest_pending.get_or_create(&label).set(0.0);
        }
        for stats in snapshot.spool {
            let label = Destination { destination: stats.destination.clone() };
            self.spool_pending.get_or_create(&label).set(saturating_i64(stats.pending));
            self.spool_dead.get_or_create(&label).set(saturating_i64(stats.dead));
            let age = stats.oldest_pending_received_at.map_or(0.0, |t| (snapshot.now_ms - t).max(0) as f64 / 1000.0);
            self.spool_oldest_pending.get_or_create(&label).set(age);
        }
        self.spool_bytes.set(saturating_i64(snapshot.stored_bytes));
        self.spool_max_bytes.set(saturating_i64(snapshot.max_bytes));
        self.buffered_bytes.set(saturating_i64(snapshot.buffered_bytes));
        self.max_buffered_bytes.set(saturating_i64(snapshot.max_buffered_bytes));
        self.ready.set(i64::from(snapshot.ready));
        encode(&self.registry)
    }
}

fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_spool_gauges() {
        let metrics = Metrics::default();
        let renewal = crate::apple::decode(br#"{"notification_type":"DID_RENEW","environment":"Sandbox"}"#).unwrap();
        for _ in 0..3 {
            metrics.count_received(&renewal, false);
        }
        metrics.unrouted.inc();
        metrics.count_delivery("revenuecat", "delivered");
        metrics.count_delivery("revenuecat", "delivered");
        metrics.reject("too_large");
        metrics.observe_delivery("revenuecat", Duration::from_millis(20));
        let stats = [DestinationStats {
            destination: "revenuecat".into(),
            pending: 5,
            delivered: 2,
            dead: 1,
            oldest_pending_received_at: Some(1_000),
        }];
        let configured = ["revenuecat".to_string(), "other".to_string()];
        let text = metrics.render(&Snapshot {
            now_ms: 11_000,
            spool: &stats,
            configured_destinations: &configured,
            stored_bytes: 10,
            max_bytes: 100,
            buffered_bytes: 7,
            max_buffered_bytes: 8,
            ready: true,
        });
        for line in [
            "storerelay_notifications_received_total{version=\"v1\",environment=\"Sandbox\",type=\"DID_RENEW\"} 3",
            "storerelay_notifications_unrouted_total 1",
            "storerelay_deliveries_total{destination=\"revenuecat\",outcome=\"delivered\"} 2",
            "storerelay_notifications_rejected_total{reason=\"too_large\"} 1",
            "storerelay_delivery_duration_seconds_bucket{le=\"0.01\",destination=\"revenuecat\"} 0",
            "storerelay_delivery_duration_seconds_bucket{le=\"0.025\",destination=\"revenuecat\"} 1",
            "storerelay_delivery_duration_seconds_count{destination=\"revenuecat\"} 1",
            "storerelay_spool_pending{destination=\"revenuecat\"} 5",
            "storerelay_spool_pending{destination=\"other\"} 0",
            "storerelay_spool_oldest_pending_seconds{destination=\"revenuecat\"} 10.0",
            "storerelay_spool_dead{destination=\"revenuecat\"} 1",
            "storerelay_spool_bytes 10",
            "storerelay_ingest_buffered_bytes 7",
            "storerelay_ready 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
        assert!(text.contains("# HELP storerelay_deliveries Delivery attempts by destination and outcome (delivered, retried, dead).\n"), "{text}");
    }
}
