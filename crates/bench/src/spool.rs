//! The two spool backends side by side in one run: spooled ingest at saturation, and how long a
//! notification takes from Apple's acknowledgement to the destination (ack-to-destination), measured in
//! this process: the destination stand-in here records when each numbered body arrives, the load here
//! when each was acknowledged.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use crate::{Proc, SpoolKind, free_port, load, procs, sidecar_config, wait_port, wait_ready};

/// A destination that notes when each body (by its `"n"`) arrived.
struct Arrivals {
    port: u16,
    at: Arc<Mutex<HashMap<u64, Instant>>>,
}

impl Arrivals {
    async fn start() -> Arrivals {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.expect("bind destination");
        let port = listener.local_addr().expect("address").port();
        let at: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
        let seen = at.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let _ = stream.set_nodelay(true);
                let seen = seen.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            if let Some(n) = number(&body) {
                                seen.lock().unwrap_or_else(|p| p.into_inner()).entry(n).or_insert_with(Instant::now);
                            }
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"{}"))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Arrivals { port, at }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }
}

fn number(body: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(body).ok()?;
    let start = text.find("\"n\":")? + 4;
    text[start..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// `count` numbered notifications at `rate`/s with `ack: spooled`: the time from each 200 to its arrival
/// at the destination, p50 and p99 in ms.
async fn ack_to_destination(sidecar: &Path, dir: &Path, spool: &SpoolKind, count: u64, rate: u64) -> Value {
    let destination = Arrivals::start().await;
    let (port, admin) = (free_port(), free_port());
    let extra = format!(
        "ack: spooled\ndestinations:\n  - {{name: revenuecat, url: \"{}\", concurrency: 16}}\n",
        destination.url()
    );
    let config = sidecar_config(dir, port, admin, &extra, spool);
    let mut process = Proc::spawn(
        "sidecar",
        sidecar,
        &["--config".into(), config.display().to_string()],
        &[("STORERELAY_LOG", "warn".into())],
    );
    wait_ready(&format!("http://127.0.0.1:{admin}/readyz"), Duration::from_secs(30)).await;
    let url = format!("http://127.0.0.1:{port}/apple/notifications");
    let client = reqwest::Client::builder().no_proxy().build().unwrap_or_default();
    let started = tokio::time::Instant::now();
    let mut posts = Vec::new();
    for n in 0..count {
        tokio::time::sleep_until(started + Duration::from_secs_f64(n as f64 / rate as f64)).await;
        let (client, url) = (client.clone(), url.clone());
        posts.push(tokio::spawn(async move {
            let body = format!("{{\"signedPayload\":\"bench\",\"n\":{n}}}");
            let ok = client.post(&url).body(body).send().await.is_ok_and(|r| r.status().is_success());
            ok.then(Instant::now)
        }));
    }
    let mut acked: HashMap<u64, Instant> = HashMap::new();
    for (n, post) in posts.into_iter().enumerate() {
        if let Ok(Some(at)) = post.await {
            acked.insert(n as u64, at);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && destination.at.lock().map(|m| m.len()).unwrap_or(0) < acked.len() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    process.terminate();
    let arrived = destination.at.lock().map(|m| m.clone()).unwrap_or_default();
    let mut latencies: Vec<Duration> =
        acked.iter().filter_map(|(n, ack)| arrived.get(n).map(|at| at.saturating_duration_since(*ack))).collect();
    latencies.sort();
    let percentile = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len().max(1)) - 1)
            .map(|d| d.as_secs_f64() * 1000.0)
    };
    json!({
        "notifications": count,
        "acknowledged": acked.len(),
        "arrived": latencies.len(),
        "p50_ms": percentile(0.50),
        "p99_ms": percentile(0.99),
    })
}

/// Spooled ingest (`sync: full`, or PostgreSQL with `synchronous_commit=on`) and ack-to-destination
/// latency for each backend that can run here.
pub async fn compare(
    sidecar: &Path,
    dir: &Path,
    small_body: &Path,
    saturation: Duration,
    postgres_url: Option<&str>,
    quick: bool,
) -> Value {
    let mut backends = vec![("sqlite", SpoolKind::Sqlite("full"))];
    match postgres_url {
        Some(url) => backends.push(("postgres", SpoolKind::Postgres(url.to_string()))),
        None => eprintln!("bench: PostgreSQL is not installed; its rows are skipped"),
    }
    let mut out = json!({"postgres": if postgres_url.is_some() { "measured" } else { "not installed" }});
    for (name, spool) in backends {
        eprintln!("bench: spool backend {name}");
        let (port, admin) = (free_port(), free_port());
        let config = sidecar_config(dir, port, admin, "ack: spooled\n", &spool);
        let mut process = Proc::spawn(
            "sidecar",
            sidecar,
            &["--config".into(), config.display().to_string()],
            &[("STORERELAY_LOG", "warn".into())],
        );
        wait_port(port, Duration::from_secs(30)).await;
        let url = format!("http://127.0.0.1:{port}/apple/notifications");
        let cpu_before = procs::tree_cpu_seconds(process.pid());
        let ingest = load::wrk(&url, small_body, saturation, process.pid()).await;
        let cpu = procs::tree_cpu_seconds(process.pid()) - cpu_before;
        process.terminate();
        out[name] = json!({
            "spooled_ingest_rps": ingest.rps,
            "spooled_ingest_errors": ingest.errors,
            "sidecar_cpu_seconds_per_10k": if ingest.requests > 0 { cpu / ingest.requests as f64 * 10_000.0 } else { 0.0 },
            "ack_to_destination": ack_to_destination(sidecar, dir, &spool, if quick { 1_000 } else { 4_000 }, 200).await,
        });
    }
    out
}
