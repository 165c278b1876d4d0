//! `make demo`: runs the real sidecar binary with `examples/demo.yaml` against two local stand-in
//! destinations (the first fails once, to show a retry), posts a V1 and a V2 notification, prints what
//! each destination received and the spool's stats, then stops the sidecar with SIGTERM.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

const CONFIG: &str = "examples/demo.yaml";
const INGEST: &str = "http://127.0.0.1:18089/apple/notifications";
const ADMIN: &str = "http://127.0.0.1:19089";

#[derive(Default)]
struct Recorder {
    requests: Vec<(u16, Bytes)>,
    fail_first: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    match demo().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("demo failed: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn demo() -> Result<(), String> {
    let binary = sidecar_binary()?;
    let spool_dir = Path::new("target/demo");
    let _ = std::fs::remove_dir_all(spool_dir);
    std::fs::create_dir_all(spool_dir).map_err(|e| format!("{}: {e}", spool_dir.display()))?;

    let revenuecat = stand_in(([127, 0, 0, 1], 18090).into(), true).await?;
    let analytics = stand_in(([127, 0, 0, 1], 18091).into(), false).await?;

    println!("==> storerelay-sidecar check --config {CONFIG}");
    let check = Command::new(&binary).args(["check", "--config", CONFIG]).output().map_err(|e| e.to_string())?;
    print!("{}", String::from_utf8_lossy(&check.stdout));
    if !check.status.success() {
        return Err(String::from_utf8_lossy(&check.stderr).into_owned());
    }

    println!("\n==> starting the sidecar (logs in target/demo/sidecar.log)");
    let log = std::fs::File::create("target/demo/sidecar.log").map_err(|e| e.to_string())?;
    let mut child = Command::new(&binary)
        .args(["--config", CONFIG])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    let http =
        reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(10)).build().map_err(|e| e.to_string())?;
    let result = exercise(&http, &binary, &revenuecat, &analytics).await;

    println!("\n==> SIGTERM: the sidecar drains and exits");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().map_err(|e| e.to_string())?;
    println!("sidecar exited with {status}");
    result?;
    if !status.success() {
        return Err("the sidecar did not exit cleanly".into());
    }
    Ok(())
}

async fn exercise(
    http: &reqwest::Client,
    binary: &Path,
    revenuecat: &Arc<Mutex<Recorder>>,
    analytics: &Arc<Mutex<Recorder>>,
) -> Result<(), String> {
    wait_ready(http).await?;
    let v1 = br#"{"notification_type":"DID_RENEW","environment":"Sandbox","password":"demo-shared-secret","bid":"com.example.app","unified_receipt":{"status":0,"latest_receipt_info":[{"product_id":"pro.monthly"}]}}"#.to_vec();
    let v2 = match std::fs::read_to_string("../shared/fixtures/apple/signed/testNotification") {
        Ok(jws) => format!("{{\"signedPayload\":\"{}\"}}", jws.trim()).into_bytes(),
        Err(_) => {
            br#"{"signedPayload":"eyJhbGciOiJFUzI1NiJ9.eyJub3RpZmljYXRpb25UeXBlIjoiVEVTVCJ9.c2lnbmF0dXJl"}"#.to_vec()
        }
    };
    let sent = [("V1", v1), ("V2", v2)];
    for (kind, body) in &sent {
        let response = http
            .post(INGEST)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .map_err(|e| e.to_string())?;
        println!("POST {kind} notification ({} bytes) -> {}", body.len(), response.status());
    }

    let deadline = Instant::now() + Duration::from_secs(15);
    while (revenuecat.lock().map_or(0, |r| r.requests.len()) < 3
        || analytics.lock().map_or(0, |r| r.requests.len()) < 2)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (name, recorder) in [("revenuecat", revenuecat), ("analytics", analytics)] {
        println!("\n==> what {name} received");
        let recorder = recorder.lock().map_err(|_| "recorder poisoned")?;
        for (i, (answer, body)) in recorder.requests.iter().enumerate() {
            let identical = sent
                .iter()
                .find(|(_, b)| b[..] == body[..])
                .map_or("NOT IDENTICAL to anything sent".to_string(), |(kind, _)| {
                    format!("byte-identical to the {kind} notification")
                });
            println!("  request {}: {} bytes, answered {answer}: {identical}", i + 1, body.len());
        }
    }

    println!("\n==> storerelay-sidecar spool stats");
    let stats = Command::new(binary)
        .args(["spool", "--spool", "target/demo/spool.db", "stats"])
        .output()
        .map_err(|e| e.to_string())?;
    print!("{}", String::from_utf8_lossy(&stats.stdout));

    println!("\n==> metrics (excerpt)");
    let metrics = http
        .get(format!("{ADMIN}/metrics"))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .text()
        .await
        .map_err(|e| e.to_string())?;
    for line in metrics.lines().filter(|l| {
        l.starts_with("storerelay_notifications_received_total")
            || l.starts_with("storerelay_deliveries_total")
            || l.starts_with("storerelay_spool_pending")
    }) {
        println!("  {line}");
    }
    let delivered_everywhere = revenuecat.lock().map_or(0, |r| r.requests.iter().filter(|(a, _)| *a == 200).count())
        == 2
        && analytics.lock().map_or(0, |r| r.requests.len()) == 2;
    if !delivered_everywhere {
        return Err("not every notification reached every destination".into());
    }
    Ok(())
}

async fn wait_ready(http: &reqwest::Client) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if http.get(format!("{ADMIN}/readyz")).send().await.is_ok_and(|r| r.status() == 200) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err("the sidecar did not become ready; see target/demo/sidecar.log".into())
}

/// The sidecar binary built beside this example (target/<profile>/storerelay-sidecar).
fn sidecar_binary() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let profile_dir = exe.parent().and_then(Path::parent).ok_or("cannot locate the target directory")?;
    let binary = profile_dir.join("storerelay-sidecar");
    if binary.exists() { Ok(binary) } else { Err(format!("{} not built; run `make demo`", binary.display())) }
}

async fn stand_in(addr: SocketAddr, fail_first: bool) -> Result<Arc<Mutex<Recorder>>, String> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let recorder = Arc::new(Mutex::new(Recorder { fail_first, ..Default::default() }));
    let shared = recorder.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let recorder = shared.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| record(recorder.clone(), request));
                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    Ok(recorder)
}

async fn record(
    recorder: Arc<Mutex<Recorder>>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let status = match recorder.lock() {
        Ok(mut recorder) => {
            let status = if std::mem::take(&mut recorder.fail_first) { 503 } else { 200 };
            recorder.requests.push((status, body));
            status
        }
        Err(_) => 500,
    };
    let mut response = Response::new(Full::new(Bytes::from_static(b"{}")));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    Ok(response)
}
