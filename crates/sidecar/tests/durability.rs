//! Nothing acknowledged is lost: crashes, a full spool, a corrupt spool, and shutdown.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::{Behavior, Sidecar, StandIn, assert_file_sound, client, v2_body};
use tokio::sync::Semaphore;

fn destination(name: &str, url: &str) -> String {
    format!(
        "  - name: {name}\n    url: {url}\n    concurrency: 8\n    retry: {{initialBackoff: 100ms, maxBackoff: 500ms, maxAge: 1h}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_no_acknowledged_notification() {
    let rc = StandIn::start().await;
    let mut sidecar = Sidecar::start(&format!("destinations:\n{}", destination("rc", &rc.url("/"))), "").await;

    // 1,200 notifications from 64 concurrent senders; the sidecar is killed part-way through. Every
    // other one is V2-sized (20 KB), so commits store their bodies both inline and in the body log.
    let url = sidecar.ingest_url("/apple/notifications");
    let http = client();
    let limit = Arc::new(Semaphore::new(64));
    let acked = Arc::new(AtomicUsize::new(0));
    let mut senders = Vec::new();
    for n in 0..1_200usize {
        let (http, url, limit, acked) = (http.clone(), url.clone(), limit.clone(), acked.clone());
        senders.push(tokio::spawn(async move {
            let _permit = limit.acquire().await.unwrap();
            let padding = if n % 2 == 1 { "A".repeat(20_000) } else { String::new() };
            let body = format!("{{\"signedPayload\":\"kill9-{n:05}{padding}\"}}");
            match http.post(&url).body(body.clone()).send().await {
                Ok(response) if response.status() == 200 => {
                    acked.fetch_add(1, Ordering::SeqCst);
                    Some(body)
                }
                _ => None,
            }
        }));
    }
    // Let a few hundred be acknowledged, then kill -9 with the rest in flight.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while acked.load(Ordering::SeqCst) < 300 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    sidecar.kill9();
    let mut acknowledged = HashSet::new();
    for sender in senders {
        if let Some(body) = sender.await.unwrap() {
            acknowledged.insert(body);
        }
    }
    assert!(acknowledged.len() >= 300, "only {} acknowledged before the kill", acknowledged.len());
    assert!(acknowledged.len() < 1_200, "the kill came too late to test anything");
    assert_file_sound(&sidecar.spool_path());
    let segments = std::fs::read_dir(sidecar.spool_path().parent().unwrap())
        .unwrap()
        .filter(|e| e.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().contains(".db-body-")))
        .count();
    assert!(segments > 0, "no commit was large enough to use the body log");

    sidecar.spawn();
    sidecar.wait_ready(Duration::from_secs(20)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let delivered: HashSet<String> = rc.bodies().iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect();
        let missing = acknowledged.difference(&delivered).count();
        if missing == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{missing} acknowledged notifications never delivered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_file_sound(&sidecar.spool_path());
    let stats = sidecar.spool_tool(&["stats"]);
    assert!(stats.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_answers_503_and_keeps_what_it_has() {
    let rc = StandIn::start().await;
    rc.set_default(Behavior::Status(503));
    let sidecar = Sidecar::start(
        &format!("limits: {{maxBodyBytes: 20Ki}}\ndestinations:\n{}", destination("rc", &rc.url("/"))),
        // An empty spool's own pages take 24 KiB and each 16 KiB body a little over 16 KiB: room for 3.
        "maxBytes: 84Ki",
    )
    .await;
    // Different bodies, so none is a repeat of another.
    let body = |n: usize| format!("{{\"signedPayload\":\"{n}{}\"}}", "x".repeat(16 * 1024)).into_bytes();
    let mut statuses = Vec::new();
    for n in 0..6 {
        statuses.push(sidecar.post(body(n)).await.status().as_u16());
    }
    assert_eq!(statuses, vec![200, 200, 200, 503, 503, 503]);
    assert!(sidecar.metric("storerelay_spool_bytes").await <= 84.0 * 1024.0);
    let full = sidecar.post(body(6)).await;
    assert_eq!(full.headers()["retry-after"], "1");
    assert_eq!(sidecar.metric("storerelay_notifications_rejected_total{reason=\"spool_full\"}").await, 4.0);
    // Once the destination recovers the backlog drains and new notifications are accepted again.
    rc.set_default(Behavior::Status(200));
    sidecar
        .wait_metric(
            "storerelay_deliveries_total{destination=\"rc\",outcome=\"delivered\"}",
            3.0,
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(sidecar.post(body(7)).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_spool_is_set_aside_and_service_continues() {
    let rc = StandIn::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut sidecar =
        Sidecar::prepare(dir.path().to_path_buf(), &format!("destinations:\n{}", destination("rc", &rc.url("/"))), "");
    std::fs::write(sidecar.spool_path(), b"this is not a sqlite database, it is garbage".repeat(200)).unwrap();
    sidecar.spawn();
    sidecar.wait_ready(Duration::from_secs(20)).await;
    assert_eq!(sidecar.post(v2_body(1)).await.status(), 200);
    rc.wait_for(1, Duration::from_secs(5)).await;
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("spool.db.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "the corrupt file is kept aside for recovery");
    assert!(sidecar.log().contains("SPOOL WAS CORRUPT"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_taking_requests_and_drains_deliveries() {
    let rc = StandIn::start().await;
    rc.set_default(Behavior::Delay(Duration::from_millis(300)));
    let mut sidecar = Sidecar::start(
        &format!(
            "shutdownGracePeriod: 10s\ndestinations:\n  - name: rc\n    url: {}\n    concurrency: 2\n",
            rc.url("/")
        ),
        "",
    )
    .await;
    for n in 0..10 {
        assert_eq!(sidecar.post(v2_body(n)).await.status(), 200);
    }
    sidecar.signal(libc::SIGTERM);
    let code = sidecar.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(code, Some(0));
    // Ten deliveries at 300 ms, two at a time, needed about 1.5 s: all of them finished before exit.
    assert_eq!(rc.received().len(), 10);
    assert!(sidecar.log().contains("storerelay-sidecar stopped"));
    assert!(
        client().post(sidecar.ingest_url("/apple/notifications")).body("{}").send().await.is_err(),
        "no new connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_leaves_undeliverable_work_in_the_spool_for_the_next_start() {
    let rc = StandIn::start().await;
    rc.set_default(Behavior::Status(503));
    let mut sidecar = Sidecar::start(
        &format!("shutdownGracePeriod: 2s\ndestinations:\n  - name: rc\n    url: {}\n    retry: {{initialBackoff: 5s, maxBackoff: 10s}}\n", rc.url("/")),
        "",
    )
    .await;
    sidecar.post(v2_body(1)).await;
    rc.wait_for(1, Duration::from_secs(5)).await;
    let started = std::time::Instant::now();
    sidecar.signal(libc::SIGTERM);
    assert_eq!(sidecar.wait_exit(Duration::from_secs(10)).await, Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "nothing was due within the grace period, so no reason to wait"
    );
    let stats = sidecar.spool_tool(&["--json", "stats"]);
    let value: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(value["destinations"][0]["pending"], 1);
}
