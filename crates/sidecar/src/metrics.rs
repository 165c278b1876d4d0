//! The sidecar's metrics, in one place. Label values are destination names, status codes and fixed
//! reason words: never URLs or header values.

use std::collections::BTreeMap;

pub use storerelay_metrics::{CounterVec, DEFAULT_BUCKETS, HistogramVec, render_gauge};

use crate::spool::DestinationStats;

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
                DEFAULT_BUCKETS,
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
            let series: Vec<(Vec<(&str, &str)>, f64)> = by_destination
                .iter()
                .map(|(destination, stats)| {
                    (vec![("destination", *destination)], stats.map_or(0.0, |s| value(s, snapshot.now_ms)))
                })
                .collect();
            render_gauge(&mut out, name, help, &series);
        }
        render_gauge(
            &mut out,
            "storerelay_spool_bytes",
            "Notification bytes held in the spool.",
            &[(vec![], snapshot.stored_bytes as f64)],
        );
        render_gauge(
            &mut out,
            "storerelay_spool_max_bytes",
            "The spool's limit (spool.maxBytes).",
            &[(vec![], snapshot.max_bytes as f64)],
        );
        render_gauge(
            &mut out,
            "storerelay_ready",
            "1 while the sidecar accepts notifications.",
            &[(vec![], f64::from(u8::from(snapshot.ready)))],
        );
        out
    }
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
        metrics.delivery_duration.observe("revenuecat", std::time::Duration::from_millis(20));
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
