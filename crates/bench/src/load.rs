//! Load: wrk for saturation (C, so the generator steals as little CPU as possible from the target on a
//! shared machine), and an open-loop fixed-rate generator of our own for latency, which measures each
//! request from the time it was due so a stalled target cannot hide its queueing delay.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

pub struct Saturation {
    pub rps: f64,
    pub requests: u64,
    pub errors: u64,
    pub peak_rss_kib: u64,
}

/// wrk with one thread and 32 connections POSTing `body_file` for `duration`; samples the target's RSS.
pub async fn wrk(url: &str, body_file: &Path, duration: Duration, target_pid: u32) -> Saturation {
    let script = body_file.with_extension("lua");
    let lua = format!(
        "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\nlocal f = io.open(\"{}\", \"rb\")\nwrk.body = f:read(\"*a\")\nf:close()\n",
        body_file.display()
    );
    std::fs::write(&script, lua).expect("wrk script");
    let child = tokio::process::Command::new("wrk")
        .args(["-t1", "-c32", &format!("-d{}s", duration.as_secs().max(1)), "-s"])
        .arg(&script)
        .arg(url)
        .output();
    let sampler = async {
        let mut peak = 0;
        let until = Instant::now() + duration;
        while Instant::now() < until {
            peak = peak.max(crate::procs::tree_rss_kib(target_pid));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        peak
    };
    let (output, peak_rss_kib) = tokio::join!(child, sampler);
    let text = output.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    let number = |prefix: &str| {
        text.lines().find_map(|l| {
            l.trim().strip_prefix(prefix).and_then(|rest| rest.split_whitespace().next()?.parse::<f64>().ok())
        })
    };
    let requests = text
        .lines()
        .find_map(|l| {
            l.trim()
                .split(" requests in ")
                .next()
                .filter(|_| l.contains(" requests in "))
                .and_then(|n| n.trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    let errors = text
        .lines()
        .filter(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
        .flat_map(|l| l.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse::<u64>().ok()).collect::<Vec<_>>())
        .sum();
    Saturation { rps: number("Requests/sec:").unwrap_or(0.0), requests, errors, peak_rss_kib }
}

pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub errors: u64,
    pub rps: f64,
    /// How late the generator itself sent (p99), which the latencies include.
    pub sent_late_p99_ms: f64,
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index].as_secs_f64() * 1000.0
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().pool_max_idle_per_host(512).build().unwrap_or_default()
}

/// Requests [`fixed_rate`] sends before the measured ones.
pub const WARM_UP: u64 = 8;

/// `rate` requests per second for `duration`, each timed from when it was due.
pub async fn fixed_rate(url: &str, body: &[u8], rate: u32, duration: Duration) -> Latency {
    fixed_rate_with(&client(), url, body, rate, duration).await
}

/// [`fixed_rate`] with a client of the caller's (HTTPS with its own roots, say).
pub async fn fixed_rate_with(
    client: &reqwest::Client,
    url: &str,
    body: &[u8],
    rate: u32,
    duration: Duration,
) -> Latency {
    let body = bytes::Bytes::copy_from_slice(body);
    // Warm the connection pool so the first requests do not pay for connecting.
    for _ in 0..WARM_UP {
        let _ = client.post(url).body(body.clone()).send().await;
    }
    let total = (rate as u64 * duration.as_secs()).max(1);
    let in_flight = Arc::new(Semaphore::new(2048));
    let started = Instant::now();
    let mut due_times = pace(rate, total);
    let mut tasks = Vec::with_capacity(total as usize);
    while let Some(due) = due_times.recv().await {
        let permit = in_flight.clone().acquire_owned().await;
        let (client, url, body) = (client.clone(), url.to_string(), body.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let sent_late = due.elapsed();
            let ok = client.post(&url).body(body).send().await.is_ok_and(|r| r.status().is_success());
            (due.elapsed(), sent_late, ok)
        }));
    }
    let mut latencies = Vec::with_capacity(tasks.len());
    let mut sent_late = Vec::with_capacity(tasks.len());
    let mut errors = 0;
    for task in tasks {
        match task.await {
            Ok((took, late, true)) => {
                latencies.push(took);
                sent_late.push(late);
            }
            _ => errors += 1,
        }
    }
    sent_late.sort();
    let mut latency = summarize(latencies, errors, total as f64 / started.elapsed().as_secs_f64());
    latency.sent_late_p99_ms = percentile(&sent_late, 0.99);
    latency
}

/// The instants `total` requests are due at, `rate` a second, each delivered when it comes.
///
/// Paced by a thread of its own rather than `tokio::time::sleep_until`: tokio's timer wheel ticks in
/// whole milliseconds and an idle runtime's timers fire late by p50 1.5 ms, p99 2.0 ms at 500/s on
/// this machine. An open-loop generator times each request from when it was due, so that lateness was
/// charged to the target; on the webhook row it was as large as the goal. `thread::sleep` (a
/// high-resolution timer) was late by p50 0.09 ms, p99 0.18 ms in the same measurement. Whatever
/// lateness remains is still charged to the target and reported as `sent_late_p99_ms`.
fn pace(rate: u32, total: u64) -> tokio::sync::mpsc::UnboundedReceiver<Instant> {
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    std::thread::spawn(move || {
        let started = Instant::now();
        for i in 0..total {
            let due = started + interval.mul_f64(i as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if sender.send(due).is_err() {
                return;
            }
        }
    });
    receiver
}

fn summarize(mut latencies: Vec<Duration>, errors: u64, rps: f64) -> Latency {
    latencies.sort();
    Latency {
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        p999_ms: percentile(&latencies, 0.999),
        errors,
        rps,
        sent_late_p99_ms: 0.0,
    }
}

/// `count` requests, `concurrency` at a time; returns how many succeeded.
pub async fn closed_loop(url: &str, body: &[u8], count: usize, concurrency: usize) -> usize {
    let result = closed_loop_with(&client(), url, body, count, concurrency).await;
    count - result.errors as usize
}

pub async fn closed_loop_with(
    client: &reqwest::Client,
    url: &str,
    body: &[u8],
    count: usize,
    concurrency: usize,
) -> Latency {
    let body = bytes::Bytes::copy_from_slice(body);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (client, url, body, next) = (client.clone(), url.to_string(), body.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < count {
                let sent = Instant::now();
                match client.post(&url).body(body.clone()).send().await {
                    Ok(response) if response.status().is_success() => {
                        let _ = response.bytes().await;
                        latencies.push(sent.elapsed());
                    }
                    _ => errors += 1,
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::with_capacity(count);
    let mut errors = 0;
    for worker in workers {
        if let Ok((mut l, e)) = worker.await {
            latencies.append(&mut l);
            errors += e;
        }
    }
    summarize(latencies, errors, count as f64 / started.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pace_hands_out_every_due_instant_in_order_and_never_early() {
        let mut due_times = pace(1_000, 50);
        let mut received = Vec::new();
        while let Some(due) = due_times.recv().await {
            assert!(Instant::now() >= due, "request {} was handed out before it was due", received.len());
            received.push(due);
        }
        assert_eq!(received.len(), 50);
        for pair in received.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(gap.abs_diff(Duration::from_millis(1)) < Duration::from_micros(1), "gap {gap:?} at 1,000/s");
        }
    }
}
