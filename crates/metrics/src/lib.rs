//! Prometheus metrics in the text exposition format, for the sidecar and the operator.
//!
//! A handful of labelled counters and histograms do not justify a metrics framework; this keeps both
//! binaries small and dependency-free here. Label values must never carry secrets: callers pass
//! destination names, status codes and fixed reason words.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Buckets for request-scale latencies, in seconds.
pub const DEFAULT_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Buckets for sub-millisecond to tens-of-milliseconds work, in seconds.
pub const FAST_BUCKETS: &[f64] = &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5];

/// A counter family keyed by its label values.
pub struct CounterVec {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    values: Mutex<BTreeMap<Vec<String>, u64>>,
}

impl CounterVec {
    pub const fn new(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Self {
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

    pub fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}\n# TYPE {} counter", self.name, self.help, self.name);
        let values = self.values.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for (label_values, value) in values.iter() {
            let _ = writeln!(out, "{}{} {value}", self.name, labels(self.labels, label_values));
        }
    }
}

#[derive(Clone)]
struct Histogram {
    counts: Vec<u64>,
    count: u64,
    sum: f64,
}

/// A histogram family with one label.
pub struct HistogramVec {
    name: &'static str,
    help: &'static str,
    label: &'static str,
    buckets: &'static [f64],
    values: Mutex<BTreeMap<String, Histogram>>,
}

impl HistogramVec {
    pub const fn new(name: &'static str, help: &'static str, label: &'static str, buckets: &'static [f64]) -> Self {
        HistogramVec { name, help, label, buckets, values: Mutex::new(BTreeMap::new()) }
    }

    pub fn observe(&self, label_value: &str, took: Duration) {
        let seconds = took.as_secs_f64();
        let mut values = self.values.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let histogram = values.entry(label_value.to_string()).or_insert_with(|| Histogram {
            counts: vec![0; self.buckets.len()],
            count: 0,
            sum: 0.0,
        });
        for (bucket, count) in self.buckets.iter().zip(histogram.counts.iter_mut()) {
            if seconds <= *bucket {
                *count += 1;
            }
        }
        histogram.count += 1;
        histogram.sum += seconds;
    }

    pub fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}\n# TYPE {} histogram", self.name, self.help, self.name);
        let values = self.values.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for (label_value, h) in values.iter() {
            let label = format!("{}=\"{}\"", self.label, escape(label_value));
            for (bucket, count) in self.buckets.iter().zip(h.counts.iter()) {
                let _ = writeln!(out, "{}_bucket{{{label},le=\"{bucket}\"}} {count}", self.name);
            }
            let _ = writeln!(out, "{}_bucket{{{label},le=\"+Inf\"}} {}", self.name, h.count);
            let _ = writeln!(out, "{}_sum{{{label}}} {}", self.name, h.sum);
            let _ = writeln!(out, "{}_count{{{label}}} {}", self.name, h.count);
        }
    }
}

/// Writes one gauge family: `(label pairs, value)` per series.
pub fn render_gauge(out: &mut String, name: &str, help: &str, series: &[(Vec<(&str, &str)>, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    for (pairs, value) in series {
        let rendered: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
        let labels = if rendered.is_empty() { String::new() } else { format!("{{{}}}", rendered.join(",")) };
        let _ = writeln!(out, "{name}{labels} {value}");
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
    fn counters_histograms_and_gauges_render() {
        let counter = CounterVec::new("c_total", "A counter.", &["kind"]);
        counter.inc(&["a\"b"]);
        counter.add(&["x"], 2);
        let unlabelled = CounterVec::new("u_total", "Unlabelled.", &[]);
        unlabelled.inc(&[]);
        let histogram = HistogramVec::new("h_seconds", "A histogram.", "path", FAST_BUCKETS);
        histogram.observe("/m", Duration::from_micros(700));
        let mut out = String::new();
        counter.render(&mut out);
        unlabelled.render(&mut out);
        histogram.render(&mut out);
        render_gauge(&mut out, "g", "A gauge.", &[(vec![("d", "x")], 1.5), (vec![], 2.0)]);
        for line in [
            "c_total{kind=\"a\\\"b\"} 1",
            "c_total{kind=\"x\"} 2",
            "u_total 1",
            "h_seconds_bucket{path=\"/m\",le=\"0.0005\"} 0",
            "h_seconds_bucket{path=\"/m\",le=\"0.001\"} 1",
            "h_seconds_count{path=\"/m\"} 1",
            "g{d=\"x\"} 1.5",
            "g 2",
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line}\n{out}");
        }
        assert_eq!(counter.get(&["x"]), 2);
    }
}
