//! Prometheus metrics in the text exposition format.
//!
//! A handful of labelled counters and one histogram do not justify a metrics framework; this keeps the
//! binary small and the names in one place. Label values are destination names, status codes and fixed
//! reason words: never URLs or header values.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use crate::spool::DestinationStats;

/// A counter family keyed by its label values.
pub struct CounterVec {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    values: Mutex<BTreeMap<Vec<String>, u64>>,
}

impl CounterVec {
    const fn new(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Self {
        CounterVec { name, help, labels, values: Mutex::new(BTreeMap::new()) }
    }

    pub fn inc(&self, label_values: &[&str]) {
        self.add(label_values, 1);
    }

    pub fn add(&self, label_values: &[&str], n: u64) {
        let key = label_values.iter().map(|v| v.to_string()).collect();
        let mut values = self.values.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *values.entry(key).or_insert(0) += n;
    }

    pub fn get(&self, label_values: &[&str]) -> u64 {
        let key: Vec<String> = label_values.iter().map(|v| v.to_string()).collect();
        let values = self.values.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        values.get(&key).copied().unwrap_or(0)
    }

    fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}\n# TYPE {} counter", self.name, self.help, self.name);
        let values = self.values.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for (label_values, value) in values.iter() {
            let _ = writeln!(out, "{}{} {value}", self.name, labels(self.labels, label_values));
        }
    }
}

const BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

pub struct HistogramVec {
    name: &'static str,
    help: &'static str,
    label: &'static str,
    values: Mutex<BTreeMap<String, Histogram>>,
}

impl HistogramVec {
    const fn new(name: &'static str, help: &'static str, label: &'static str) -> Self {
        HistogramVec { name, help, label, values: Mutex::new(BTreeMap::new()) }
    }

    pub fn observe(&self, label_value: &str, took: Duration) {
        let seconds = took.as_secs_f64();
        let mut values = self.values.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let histogram = values.entry(label_value.to_string()).or_default();
        for (bucket, count) in BUCKETS.iter().zip(histogram.counts.iter_mut()) {
            if seconds <= *bucket {
                *count += 1;
            }
        }
        histogram.count += 1;
        histogram.sum += seconds;
    }

    fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}\n# TYPE {} histogram", self.name, self.help, self.name);
        let values = self.values.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for (label_value, h) in values.iter() {
            let label = format!("{}=\"{}\"", self.label, escape(label_value));
            for (bucket, count) in BUCKETS.iter().zip(h.counts.iter()) {
                let _ = writeln!(out, "{}_bucket{{{label},le=\"{bucket}\"}} {count}", self.name);
            }
            let _ = writeln!(out, "{}_bucket{{{label},le=\"+Inf\"}} {}", self.name, h.count);
            let _ = writeln!(out, "{}_sum{{{label}}} {}", self.name, h.sum);
            let _ = writeln!(out, "{}_count{{{label}}} {}", self.name, h.count);
        }
    }
}

/// Every metric the sidecar exports, except the spool gauges, which are read from the spool at scrape.
pub struct Metrics {
    pub received: CounterVec,
    pub duplicates: CounterVec,
    pub unrouted: CounterVec,
    pub unknown_bodies: CounterVec,
    pub rejected: CounterVec,
    pub deliveries: CounterVec,
    pub delivery_duration: HistogramVec,
    pub upstream_responses: CounterVec,
    pub config_reloads: CounterVec,
    pub secret_file_errors: CounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            received: CounterVec::new(
                "storerelay_notifications_received_total",
                "Notifications durably stored (or recognised as a stored one's repeat), by version, environment and type.",
                &["version", "environment", "type"],
            ),
            duplicates: CounterVec::new(
                "storerelay_duplicates_total",
                "Repeats of a notification already in the spool (not queued again).",
                &["version"],
            ),
            unrouted: CounterVec::new(
                "storerelay_notifications_unrouted_total",
                "Notifications that matched no destination (acknowledged, mirrored nowhere).",
                &[],
            ),
            unknown_bodies: CounterVec::new(
                "storerelay_notifications_unknown_shape_total",
                "JSON bodies that were neither V1 nor V2, forwarded (unknownBodies: forward).",
                &[],
            ),
            rejected: CounterVec::new(
                "storerelay_notifications_rejected_total",
                "Notifications not accepted, by reason.",
                &["reason"],
            ),
            deliveries: CounterVec::new(
                "storerelay_deliveries_total",
                "Delivery attempts by destination and outcome (delivered, retried, dead).",
                &["destination", "outcome"],
            ),
            delivery_duration: HistogramVec::new(
                "storerelay_delivery_duration_seconds",
                "Time of each delivery attempt.",
                "destination",
            ),
            upstream_responses: CounterVec::new(
                "storerelay_upstream_responses_total",
                "Answers from the app container by status code (or unreachable, timeout).",
                &["code"],
            ),
            config_reloads: CounterVec::new(
                "storerelay_config_reloads_total",
                "Config reloads by result (success, error).",
                &["result"],
            ),
            secret_file_errors: CounterVec::new(
                "storerelay_secret_file_errors_total",
                "Failed reads of a destination's urlFile or headersFile.",
                &["destination"],
            ),
        }
    }
}

/// Reads one gauge's value from a destination's spool counts at a given time (unix ms).
type GaugeOf = fn(&DestinationStats, i64) -> f64;

/// Facts read at scrape time.
pub struct Snapshot<'a> {
    pub now_ms: i64,
    pub spool: &'a [DestinationStats],
    pub configured_destinations: &'a [String],
    pub stored_bytes: u64,
    pub max_bytes: u64,
    pub ready: bool,
}

impl Metrics {
    pub fn render(&self, snapshot: &Snapshot<'_>) -> String {
        let mut out = String::with_capacity(4096);
        for family in [&self.received, &self.duplicates, &self.unrouted, &self.unknown_bodies, &self.rejected] {
            family.render(&mut out);
        }
        self.deliveries.render(&mut out);
        self.delivery_duration.render(&mut out);
        self.upstream_responses.render(&mut out);
        self.config_reloads.render(&mut out);
        self.secret_file_errors.render(&mut out);

        // Every configured destination shows up, even before its first notification.
        let mut by_destination: BTreeMap<&str, Option<&DestinationStats>> =
            snapshot.configured_destinations.iter().map(|d| (d.as_str(), None)).collect();
        for stats in snapshot.spool {
            by_destination.insert(&stats.destination, Some(stats));
        }
        let gauges: [(&str, &str, GaugeOf); 3] = [
            ("storerelay_spool_pending", "Deliveries waiting in the spool.", |s, _| s.pending as f64),
            (
                "storerelay_spool_dead",
                "Deliveries given up on (see `spool dead`, `spool redeliver --dead`).",
                |s, _| s.dead as f64,
            ),
            ("storerelay_spool_oldest_pending_seconds", "Age of the oldest notification still pending.", |s, now| {
                s.oldest_pending_received_at.map_or(0.0, |t| (now - t).max(0) as f64 / 1000.0)
            }),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (destination, stats) in &by_destination {
                let v = stats.map_or(0.0, |s| value(s, snapshot.now_ms));
                let _ = writeln!(out, "{name}{{destination=\"{}\"}} {v}", escape(destination));
            }
        }
        let _ = writeln!(
            out,
            "# HELP storerelay_spool_bytes Notification bytes held in the spool.\n# TYPE storerelay_spool_bytes gauge\nstorerelay_spool_bytes {}",
            snapshot.stored_bytes
        );
        let _ = writeln!(
            out,
            "# HELP storerelay_spool_max_bytes The spool's limit (spool.maxBytes).\n# TYPE storerelay_spool_max_bytes gauge\nstorerelay_spool_max_bytes {}",
            snapshot.max_bytes
        );
        let _ = writeln!(
            out,
            "# HELP storerelay_ready 1 while the sidecar accepts notifications.\n# TYPE storerelay_ready gauge\nstorerelay_ready {}",
            u8::from(snapshot.ready)
        );
        out
    }
}

fn labels(names: &[&str], values: &[String]) -> String {
    if names.is_empty() {
        return String::new();
    }
    let pairs: Vec<String> = names.iter().zip(values).map(|(n, v)| format!("{n}=\"{}\"", escape(v))).collect();
    format!("{{{}}}", pairs.join(","))
}

fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_spool_gauges() {
        let metrics = Metrics::default();
        metrics.received.add(&["v2", "Sandbox", "DID_RENEW"], 3);
        metrics.unrouted.inc(&[]);
        metrics.deliveries.inc(&["revenuecat", "delivered"]);
        metrics.deliveries.inc(&["revenuecat", "delivered"]);
        metrics.rejected.inc(&["too_large"]);
        metrics.delivery_duration.observe("revenuecat", Duration::from_millis(20));
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
            ready: true,
        });
        for line in [
            "storerelay_notifications_received_total{version=\"v2\",environment=\"Sandbox\",type=\"DID_RENEW\"} 3",
            "storerelay_notifications_unrouted_total 1",
            "storerelay_deliveries_total{destination=\"revenuecat\",outcome=\"delivered\"} 2",
            "storerelay_notifications_rejected_total{reason=\"too_large\"} 1",
            "storerelay_delivery_duration_seconds_bucket{destination=\"revenuecat\",le=\"0.01\"} 0",
            "storerelay_delivery_duration_seconds_bucket{destination=\"revenuecat\",le=\"0.025\"} 1",
            "storerelay_delivery_duration_seconds_count{destination=\"revenuecat\"} 1",
            "storerelay_spool_pending{destination=\"revenuecat\"} 5",
            "storerelay_spool_pending{destination=\"other\"} 0",
            "storerelay_spool_oldest_pending_seconds{destination=\"revenuecat\"} 10",
            "storerelay_spool_dead{destination=\"revenuecat\"} 1",
            "storerelay_ready 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
    }
}
