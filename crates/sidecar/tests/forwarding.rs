//! Proxy and mirror: what Apple, the app and each destination see.

mod support;

use std::time::Duration;

use support::{Behavior, Sidecar, StandIn, client, v1_body, v2_body};

fn destination(name: &str, url: &str) -> String {
    format!("  - name: {name}\n    url: {url}\n    retry: {{initialBackoff: 100ms, maxBackoff: 1s, maxAge: 1h}}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_mode_passes_the_request_and_mirrors_bytes_unchanged() {
    let app = StandIn::start().await;
    app.set_response_body(b"{\"from\":\"app\"}");
    let revenuecat = StandIn::start().await;
    let other = StandIn::start().await;
    let sidecar = Sidecar::start(
        &format!(
            "upstream: {{url: {}}}\ndestinations:\n{}{}",
            app.url(""),
            destination("revenuecat", &revenuecat.url("/hook/TOKEN123")),
            destination("other", &other.url("/in"))
        ),
        "",
    )
    .await;

    let bodies = [v1_body(1), v2_body(2), v1_body(3), v2_body(4)];
    for body in &bodies {
        let response = client()
            .post(sidecar.ingest_url("/apple/notifications?env=prod"))
            .header("content-type", "application/json; charset=utf-8")
            .header("x-apple-request-id", "abc")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-app"], "stand-in", "the app's headers come back");
        assert_eq!(response.text().await.unwrap(), "{\"from\":\"app\"}", "the app's body comes back");
    }

    let at_app = app.wait_for(bodies.len(), Duration::from_secs(10)).await;
    for (seen, sent) in at_app.iter().zip(&bodies) {
        assert_eq!(&seen.body[..], &sent[..]);
        assert_eq!(seen.method, "POST");
        assert_eq!(seen.path_and_query, "/apple/notifications?env=prod");
        assert_eq!(seen.header("x-apple-request-id"), Some("abc"));
        assert_eq!(seen.header("content-type"), Some("application/json; charset=utf-8"));
    }
    for stand_in in [&revenuecat, &other] {
        let got = stand_in.wait_for(bodies.len(), Duration::from_secs(10)).await;
        let mut got_bodies: Vec<_> = got.iter().map(|r| r.body.to_vec()).collect();
        let mut sent: Vec<_> = bodies.iter().map(|b| b.to_vec()).collect();
        got_bodies.sort();
        sent.sort();
        assert_eq!(got_bodies, sent, "every destination gets every body byte for byte");
        for request in &got {
            assert_eq!(request.method, "POST");
            assert_eq!(request.header("content-type"), Some("application/json"));
            assert!(request.header("user-agent").unwrap().starts_with("storerelay/"));
        }
    }
    assert_eq!(revenuecat.received()[0].path_and_query, "/hook/TOKEN123");

    sidecar
        .wait_metric(
            "storerelay_deliveries_total{destination=\"revenuecat\",outcome=\"delivered\"}",
            4.0,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(sidecar.metric_sum("storerelay_notifications_received_total").await, 4.0);
    assert_eq!(sidecar.metric("storerelay_upstream_responses_total{code=\"200\"}").await, 4.0);

    // One log line per notification and per delivery; the destination's path token never appears.
    let log = sidecar.log();
    assert_eq!(log.lines().filter(|l| l.contains("\"notification received\"")).count(), 4, "{log}");
    assert!(log.lines().filter(|l| l.contains("\"message\":\"delivery\"")).count() >= 8, "{log}");
    assert!(!log.contains("TOKEN123"), "destination URL leaked into the log:\n{log}");
    assert!(!log.contains("shared-SECRET"), "body content leaked into the log");
    assert!(!sidecar.metrics().await.contains("TOKEN123"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apps_errors_pass_through_and_an_absent_app_is_a_503() {
    let app = StandIn::start().await;
    let revenuecat = StandIn::start().await;
    let sidecar = Sidecar::start(
        &format!(
            "upstream: {{url: {}, timeout: 500ms}}\ndestinations:\n{}",
            app.url(""),
            destination("rc", &revenuecat.url("/"))
        ),
        "",
    )
    .await;
    app.script([Behavior::Status(500), Behavior::Status(400), Behavior::Hang]);
    assert_eq!(sidecar.post(v2_body(1)).await.status(), 500);
    assert_eq!(sidecar.post(v2_body(2)).await.status(), 400);
    assert_eq!(sidecar.post(v2_body(3)).await.status(), 503, "a hung app is a 503, never a 4xx");
    app.stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(sidecar.post(v2_body(4)).await.status(), 503, "an unreachable app is a 503");
    // Stored anyway: the mirror gets all four (Apple will retry, and the copies are identical).
    revenuecat.wait_for(4, Duration::from_secs(10)).await;
    assert_eq!(sidecar.metric("storerelay_upstream_responses_total{code=\"timeout\"}").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spooled_mode_answers_once_durable_and_routes_only_configured_paths() {
    let revenuecat = StandIn::start().await;
    revenuecat.set_default(Behavior::Hang);
    let sidecar = Sidecar::start(
        &format!(
            "paths: [/apple/notifications, /apple/sandbox]\ndestinations:\n{}",
            destination("rc", &revenuecat.url("/"))
        ),
        "",
    )
    .await;
    let response = sidecar.post(v1_body(1)).await;
    assert_eq!(response.status(), 200, "acknowledged although the destination hangs");
    assert_eq!(response.text().await.unwrap(), "{}");
    let sandbox = client().post(sidecar.ingest_url("/apple/sandbox")).body("{}").send().await.unwrap();
    assert_eq!(sandbox.status(), 200);

    let missing = client().post(sidecar.ingest_url("/other")).body("{}").send().await.unwrap();
    assert_eq!(missing.status(), 404);
    let get = client().get(sidecar.ingest_url("/apple/notifications")).send().await.unwrap();
    assert_eq!(get.status(), 405);
    assert_eq!(get.headers()["allow"], "POST");
    assert_eq!(sidecar.metric_sum("storerelay_notifications_received_total").await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_mode_waits_for_every_destination() {
    let first = StandIn::start().await;
    let second = StandIn::start().await;
    let sidecar = Sidecar::start(
        &format!(
            "ack: delivered\nackTimeout: 1500ms\ndestinations:\n{}{}",
            destination("first", &first.url("/")),
            destination("second", &second.url("/"))
        ),
        "",
    )
    .await;
    let response = sidecar.post(v2_body(1)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(first.received().len(), 1, "answered only after delivery");
    assert_eq!(second.received().len(), 1, "answered only after delivery");

    second.set_default(Behavior::Status(503));
    let response = sidecar.post(v2_body(2)).await;
    assert_eq!(response.status(), 503, "not delivered everywhere within ackTimeout");
    second.set_default(Behavior::Status(404));
    let response = sidecar.post(v2_body(3)).await;
    assert_eq!(response.status(), 503, "a dead delivery is not an ack");
}
