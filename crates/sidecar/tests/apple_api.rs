//! `storerelay-sidecar apple history` against a stand-in App Store Server API that checks every JWT the
//! way Apple does: pagination, `onlyFailures`, which notifications the spool lacks, `429` with
//! `Retry-After`, and clear errors for bad credentials, none of which ever print the key or a token.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::app_store_api::{ApiKey, AppStoreApi, PAGE_SIZE, Sent};
use support::apple::{Chain, ChainOptions, body, payload, sign_jws};
use support::{Sidecar, StandIn, binary};

const MINUTE_MS: i64 = 60_000;

struct Setup {
    chain: Chain,
    key: ApiKey,
    api: AppStoreApi,
    dir: tempfile::TempDir,
}

impl Setup {
    async fn new() -> Setup {
        let key = ApiKey::generate();
        let api = AppStoreApi::start(&key).await;
        let dir = tempfile::tempdir().unwrap();
        let chain = Chain::generate(ChainOptions::default());
        std::fs::write(dir.path().join("root.der"), &chain.root).unwrap();
        std::fs::write(dir.path().join("SubscriptionKey.p8"), &key.p8).unwrap();
        Setup { chain, key, api, dir }
    }

    fn key_file(&self) -> PathBuf {
        self.dir.path().join("SubscriptionKey.p8")
    }

    /// The sidecar's config lines for verification and the API, with `key_id` and `key_file` as given.
    fn config(&self, key_id: &str, key_file: &Path) -> String {
        format!(
            "verify: {{mode: enforce, rootCertificates: [{}], bundleIds: [com.example.app]}}\n\
             appStoreServerApi:\n  keyId: {key_id}\n  issuerId: {}\n  bundleId: {}\n  privateKeyFile: {}\n  environment: Production\n  baseUrl: {}\n  timeout: 5s\n",
            self.dir.path().join("root.der").display(),
            self.key.issuer_id,
            self.key.bundle_id,
            key_file.display(),
            self.api.url()
        )
    }

    /// A V2 notification signed by the test chain, as Apple would have sent it `minutes_ago`.
    fn signed(&self, uuid: &str, minutes_ago: i64) -> (String, i64) {
        let signed_date = storerelay_sidecar::clock::now_ms() - minutes_ago * MINUTE_MS;
        let jws = sign_jws(
            &self.chain.x5c(),
            &payload(uuid, "Production", "com.example.app", signed_date),
            &self.chain.leaf_key,
        );
        (jws, signed_date)
    }
}

impl Setup {
    /// `total` notifications Apple sent a minute apart (all in its history, oldest first); the first
    /// `reached` of them reached `replicas`, in turn.
    async fn sent_to(&self, replicas: &[Sidecar], total: usize, reached: usize) -> Vec<Sent> {
        let mut history = Vec::new();
        for i in 0..total {
            let (jws, signed_date_ms) = self.signed(&uuid(i), (total - i) as i64);
            if i < reached {
                assert_eq!(replicas[i % replicas.len()].post(body(&jws)).await.status(), 200);
            }
            history.push(Sent { signed_payload: jws, signed_date_ms, attempts: vec!["SUCCESS"] });
        }
        history
    }
}

/// Runs the sidecar binary with `args` and the config, off the runtime the stand-ins answer on.
async fn command(config: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let mut command = std::process::Command::new(binary());
    command.arg("--config").arg(config).args(args);
    let output = tokio::task::spawn_blocking(move || command.output()).await.unwrap().expect("run the sidecar binary");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn uuid(i: usize) -> String {
    format!("00000000-0000-4000-8000-{i:012}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_lists_what_apple_sent_and_marks_what_the_spool_lacks() {
    let s = Setup::new().await;
    let sidecar = Sidecar::start(&s.config(&s.key.key_id, &s.key_file()), "").await;

    // 50 notifications over the last hours; Apple's sends of every fifth one failed and never reached us.
    let mut history = Vec::new();
    let mut missed = Vec::new();
    for i in 0..50 {
        let (jws, signed_date_ms) = s.signed(&uuid(i), 300 - i as i64);
        let reached_us = i % 5 != 0;
        if reached_us {
            assert_eq!(sidecar.post(body(&jws)).await.status(), 200);
        } else {
            missed.push(uuid(i));
        }
        let attempts = if reached_us { vec!["SUCCESS"] } else { vec!["TIMED_OUT", "TLS_ISSUE"] };
        history.push(Sent { signed_payload: jws, signed_date_ms, attempts });
    }
    // Outside the window asked for: not listed.
    let (old, old_date) = s.signed("old-one", 80 * 60);
    history.push(Sent { signed_payload: old, signed_date_ms: old_date, attempts: vec!["SUCCESS"] });
    s.api.set_history(history);

    let (code, out, err) = command(&sidecar.config_path, &["apple", "--json", "history", "--since", "72h"]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    let listed: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let notifications = listed["notifications"].as_array().expect("notifications");
    assert_eq!(notifications.len(), 50, "{out}");
    let lacking: Vec<&str> = notifications
        .iter()
        .filter(|n| n["inSpool"] == false)
        .map(|n| n["notificationUuid"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(lacking, missed.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(notifications.iter().all(|n| n["verification"] == "passes"), "{out}");
    let failed = notifications.iter().find(|n| n["inSpool"] == false).unwrap();
    assert_eq!(failed["sendAttempts"][1]["sendAttemptResult"], "TLS_ISSUE");
    assert_eq!(failed["notificationType"], "DID_RENEW");
    let pages: Vec<String> = s.api.requests().into_iter().map(|(path, _)| path).collect();
    assert_eq!(pages.len(), 50_usize.div_ceil(PAGE_SIZE), "one request per page of 20: {pages:?}");
    assert_eq!(pages[1], "/inApps/v1/notifications/history?paginationToken=20");

    let (code, out, err) =
        command(&sidecar.config_path, &["apple", "history", "--since", "72h", "--only-failures"]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("10 notifications; 10 not in the spool"), "{out}");
    assert_eq!(out.matches("MISSING").count(), 10, "{out}");
    assert!(out.contains("TIMED_OUT, TLS_ISSUE"), "{out}");

    // A window older than Apple keeps is refused before asking.
    let (code, _, err) = command(&sidecar.config_path, &["apple", "history", "--since", "4400h"]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("180 days"), "{err}");
    assert!(s.api.refusals().is_empty(), "every token was accepted: {:?}", s.api.refusals());
    assert_no_secrets(&s, &[&out, &err, &sidecar.log()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_are_waited_out_and_bad_credentials_are_named() {
    let s = Setup::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    let spool = dir.path().join("spool.db");
    let write = |key_id: &str, key_file: &Path| {
        std::fs::write(&config, format!("spool: {{path: {}}}\n{}", spool.display(), s.config(key_id, key_file)))
            .unwrap();
    };
    let (jws, signed_date_ms) = s.signed(&uuid(1), 10);
    s.api.set_history(vec![Sent { signed_payload: jws, signed_date_ms, attempts: vec!["SUCCESS"] }]);
    write(&s.key.key_id, &s.key_file());

    // Two 429s with `Retry-After: 1`: waited out, then the answer.
    s.api.rate_limit(2, "1");
    let started = Instant::now();
    let (code, out, err) = command(&config, &["apple", "history", "--since", "1h"]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(started.elapsed() >= Duration::from_secs(2), "each Retry-After was waited out");
    let statuses: Vec<u16> = s.api.requests().into_iter().map(|(_, status)| status).collect();
    assert_eq!(statuses, [429, 429, 200]);
    assert!(out.contains("1 notifications"), "{out}");
    assert!(out.contains("unknown"), "no spool file here, so the spool cannot tell: {out}");

    // A Retry-After past what is waited out is the answer, with what to do.
    s.api.rate_limit(1, "3600");
    let (code, _, err) = command(&config, &["apple", "history", "--since", "1h"]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("HTTP 429") && err.contains("Apple's error 4290000") && err.contains("rate limited"), "{err}");

    // A key id Apple does not know: 401, named.
    write("WRONGKEY01", &s.key_file());
    let (code, _, err) = command(&config, &["apple", "history", "--since", "1h"]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("HTTP 401") && err.contains("keyId"), "{err}");
    assert!(s.api.refusals().last().is_some_and(|why| why.contains("WRONGKEY01")), "{:?}", s.api.refusals());

    // A .p8 that is not a key, and one that is missing: the file and the key are named, never the content.
    let bad = dir.path().join("bad.p8");
    std::fs::write(&bad, "-----BEGIN PRIVATE KEY-----\nTk9UIEEgS0VZ\n-----END PRIVATE KEY-----\n").unwrap();
    write(&s.key.key_id, &bad);
    let (code, _, err) = command(&config, &["apple", "history", "--since", "1h"]).await;
    assert_eq!(code, Some(1), "an error, not a crash: {err}");
    assert!(err.contains("appStoreServerApi.privateKeyFile") && err.contains("bad.p8"), "{err}");
    assert!(!err.contains("Tk9UIEEgS0VZ"), "{err}");
    let (code, _, err) = command(&config, &["check"]).await;
    assert_eq!(code, Some(1), "check reads the key as a run would");
    assert!(err.contains("appStoreServerApi.privateKeyFile") && !err.contains("Tk9UIEEgS0VZ"), "{err}");
    write(&s.key.key_id, &dir.path().join("absent.p8"));
    let (code, _, err) = command(&config, &["apple", "history", "--since", "1h"]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("absent.p8") && err.contains("cannot read"), "{err}");

    // Without the section, the command says what it needs.
    std::fs::write(&config, format!("spool: {{path: {}}}\n", spool.display())).unwrap();
    let (code, _, err) = command(&config, &["apple", "history", "--since", "1h"]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("appStoreServerApi"), "{err}");

    // `check` shows the section without the key.
    write(&s.key.key_id, &s.key_file());
    let (code, out, err) = command(&config, &["check"]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("privateKeyFile"), "{out}");
    assert_no_secrets(&s, &[&out, &err]);
}

/// Neither the key nor any part of a signed token appears in `texts`.
fn assert_no_secrets(s: &Setup, texts: &[&str]) {
    let key_body: Vec<&str> = s.key.p8.lines().filter(|l| !l.starts_with("-----")).collect();
    for text in texts {
        for line in &key_body {
            assert!(!text.contains(line), "the key appears in: {text}");
        }
        assert!(
            !text.contains("Bearer") && !text.contains("eyJhbGciOiJFUzI1NiIsImtpZCI6"),
            "a token appears in: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_asks_the_shared_queue_which_notifications_it_has() {
    let Some(bin) = storerelay_testenv::postgres::binaries() else { return };
    let pg = storerelay_testenv::postgres::Postgres::start(&bin);
    let s = Setup::new().await;
    let spool = format!("backend: postgres\npostgres:\n  url: \"{}\"\n  queue: shop/payments", pg.url());
    let replicas = [
        Sidecar::start(&s.config(&s.key.key_id, &s.key_file()), &spool).await,
        Sidecar::start(&s.config(&s.key.key_id, &s.key_file()), &spool).await,
    ];
    // Two reach one replica, two the other, two nobody.
    let history = s.sent_to(&replicas, 6, 4).await;
    s.api.set_history(history);
    let (code, out, err) = command(&replicas[0].config_path, &["apple", "--json", "history", "--since", "2h"]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    let listed: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let in_spool: Vec<bool> =
        listed["notifications"].as_array().unwrap().iter().map(|n| n["inSpool"].as_bool().unwrap()).collect();
    assert_eq!(in_spool, [true, true, true, true, false, false], "{out}");
}

/// How many times each body arrived at `stand_in`.
fn arrivals(stand_in: &StandIn) -> HashMap<Vec<u8>, usize> {
    let mut counts = HashMap::new();
    for body in stand_in.bodies() {
        *counts.entry(body.to_vec()).or_insert(0) += 1;
    }
    counts
}

async fn wait_for_distinct(stand_in: &StandIn, count: usize, within: Duration) {
    let deadline = Instant::now() + within;
    while arrivals(stand_in).len() < count {
        assert!(Instant::now() < deadline, "{} of {count} distinct bodies within {within:?}", arrivals(stand_in).len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_recovers_exactly_what_the_spool_lacks_through_the_normal_path() {
    let s = Setup::new().await;
    let app = StandIn::start().await;
    let revenuecat = StandIn::start().await;
    let extra = format!(
        "upstream: {{url: {}}}\ndestinations:\n  - {{name: revenuecat, url: \"{}\"}}\n{}",
        app.url(""),
        revenuecat.url("/hook"),
        s.config(&s.key.key_id, &s.key_file())
    );
    let sidecar = Sidecar::start(&extra, "").await;
    let mut history = Vec::new();
    let mut never_sent = Vec::new();
    for i in 0..50 {
        let (jws, signed_date_ms) = s.signed(&uuid(i), 600 - 10 * i as i64);
        if i % 5 == 3 {
            never_sent.push(body(&jws));
        } else {
            assert_eq!(sidecar.post(body(&jws)).await.status(), 200);
        }
        history.push(Sent { signed_payload: jws, signed_date_ms, attempts: vec!["UNSUCCESSFUL_HTTP_RESPONSE_CODE"] });
    }
    s.api.set_history(history.clone());
    wait_for_distinct(&revenuecat, 40, Duration::from_secs(10)).await;

    let (code, out, err) = command(&sidecar.config_path, &["apple", "replay", "--since", "72h", "--dry-run"]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.starts_with("10 of 50 notifications"), "{out}");
    assert_eq!(out.matches("would be replayed").count(), 10, "{out}");
    assert_eq!(app.received().len(), 40, "a dry run replays nothing");

    let (code, out, err) = command(&sidecar.config_path, &["apple", "replay", "--since", "72h"]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("10 replayed"), "{out}");
    // The app got exactly the ten, marked; the destination byte-identical copies, each once.
    let replayed: Vec<_> = app.received().into_iter().skip(40).collect();
    assert_eq!(replayed.iter().map(|r| r.body.to_vec()).collect::<Vec<_>>(), never_sent);
    assert!(replayed.iter().all(|r| r.header("x-storerelay-replay") == Some("history")));
    wait_for_distinct(&revenuecat, 50, Duration::from_secs(10)).await;
    let copies = arrivals(&revenuecat);
    assert!(never_sent.iter().all(|b| copies.get(b) == Some(&1)), "each replayed body once, byte for byte");

    let (code, out, err) = command(&sidecar.config_path, &["apple", "replay", "--since", "72h"]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.starts_with("0 of 50 notifications"), "a second run replays nothing: {out}");
    assert_eq!(app.received().len(), 50);
    assert_no_secrets(&s, &[&out, &err, &sidecar.log()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gap_fill_on_two_replicas_of_the_shared_queue_recovers_each_notification_once() {
    let Some(bin) = storerelay_testenv::postgres::binaries() else { return };
    let pg = storerelay_testenv::postgres::Postgres::start(&bin);
    let s = Setup::new().await;
    let app = StandIn::start().await;
    let revenuecat = StandIn::start().await;
    let spool = format!("backend: postgres\npostgres:\n  url: \"{}\"\n  queue: shop/payments", pg.url());
    let extra = format!(
        "upstream: {{url: {}}}\ndestinations:\n  - {{name: revenuecat, url: \"{}\"}}\n{}gapFill: {{interval: 1s, lookback: 6h, scope: all}}\n",
        app.url(""),
        revenuecat.url("/hook"),
        s.config(&s.key.key_id, &s.key_file())
    );
    let replicas = [Sidecar::start(&extra, &spool).await, Sidecar::start(&extra, &spool).await];
    // Apple reached the replicas with 12 of 20; the history is published once they are stored, so the
    // first runs (5 s after start) find exactly the other 8 missing.
    let history = s.sent_to(&replicas, 20, 12).await;
    s.api.set_history(history);
    wait_for_distinct(&revenuecat, 20, Duration::from_secs(30)).await;
    // A few more intervals on both replicas: nothing more may arrive.
    for replica in &replicas {
        replica.wait_metric("storerelay_gap_fill_runs_total{result=\"success\"}", 2.0, Duration::from_secs(20)).await;
    }
    assert!(arrivals(&revenuecat).values().all(|n| *n == 1), "each notification once at the destination");
    let at_app = arrivals(&app);
    assert_eq!(at_app.len(), 20);
    assert!(at_app.values().all(|n| *n == 1), "each notification once at the app: {:?}", at_app.values());
    assert_eq!(app.received().iter().filter(|r| r.header("x-storerelay-replay").is_some()).count(), 8);
    let mut recovered = 0.0;
    for replica in &replicas {
        recovered += replica.metric("storerelay_gap_fill_recovered_total").await;
        let history_requests = replica
            .metric("storerelay_apple_api_requests_total{endpoint=\"notification_history\",status=\"200\"}")
            .await;
        assert!(history_requests >= 1.0, "{}", replica.metrics().await);
    }
    assert_eq!(recovered, 8.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_of_a_queue_holds_gap_fill_at_a_time_and_a_dead_holder_lets_go() {
    use storerelay_sidecar::spool::Spool;
    let Some(bin) = storerelay_testenv::postgres::binaries() else { return };
    let pg = storerelay_testenv::postgres::Postgres::start(&bin);
    let settings: storerelay_config::SpoolConfig =
        serde_yaml::from_str(&format!("backend: postgres\npostgres: {{url: \"{}\", queue: shop/payments}}", pg.url()))
            .unwrap();
    let (first, _) = Spool::open(&settings).await.unwrap();
    let (second, _) = Spool::open(&settings).await.unwrap();
    let held = first.exclusive("gap-fill").await.unwrap();
    assert!(held.is_some());
    assert!(second.exclusive("gap-fill").await.unwrap().is_none(), "taken by the first replica");
    assert!(second.exclusive("self-test").await.unwrap().is_some(), "another task is another lock");
    let other_queue: storerelay_config::SpoolConfig =
        serde_yaml::from_str(&format!("backend: postgres\npostgres: {{url: \"{}\", queue: shop/other}}", pg.url()))
            .unwrap();
    let (other, _) = Spool::open(&other_queue).await.unwrap();
    assert!(other.exclusive("gap-fill").await.unwrap().is_some(), "another queue is another lock");
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    while second.exclusive("gap-fill").await.unwrap().is_none() {
        assert!(Instant::now() < deadline, "the lock outlived its session");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TEST notification as Apple signs it.
fn test_payload(uuid: &str) -> String {
    serde_json::json!({
        "notificationType": "TEST",
        "notificationUUID": uuid,
        "version": "2.0",
        "signedDate": storerelay_sidecar::clock::now_ms(),
        "data": {"environment": "Production", "bundleId": "com.example.app", "appAppleId": 1234}
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apple_test_follows_apples_test_notification_to_each_destination_and_names_what_failed() {
    let s = Setup::new().await;
    let app = StandIn::start().await;
    let revenuecat = StandIn::start().await;
    let renewals = StandIn::start().await;
    let extra = format!(
        "upstream: {{url: {}}}\ndestinations:\n  - {{name: revenuecat, url: \"{}\"}}\n  - {{name: renewals, url: \"{}\", match: {{notificationTypes: [DID_RENEW]}}}}\n{}",
        app.url(""),
        revenuecat.url("/hook"),
        renewals.url("/hook"),
        s.config(&s.key.key_id, &s.key_file())
    );
    let sidecar = Sidecar::start(&extra, "").await;
    let (header, key) = (s.chain.x5c(), s.chain.leaf_key.clone());
    s.api.send_tests_to(
        sidecar.ingest_url("/apple/notifications"),
        std::sync::Arc::new(move |uuid: &str| sign_jws(&header, &test_payload(uuid), &key)),
    );

    let (code, out, err) = command(&sidecar.config_path, &["apple", "test", "--timeout", "30s"]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.iter().all(|l| l.starts_with("ok ")), "{out}");
    assert!(out.contains("sendAttemptResult SUCCESS"), "{out}");
    assert!(out.contains("TEST 7e3fb20b-4cdb-47cc-936d-000000000000"), "{out}");
    assert!(out.contains("destination revenuecat") && out.contains("delivered after 1 attempt(s)"), "{out}");
    assert!(!out.contains("renewals"), "its match does not admit TEST notifications: {out}");
    assert_eq!(revenuecat.received().len(), 1);
    assert!(renewals.received().is_empty());

    // The app refuses: the sidecar passes its 503 on, and Apple reports that.
    app.set_default(support::Behavior::Status(503));
    let (code, out, err) = command(&sidecar.config_path, &["apple", "test", "--timeout", "30s"]).await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("FAIL Apple -> us") && err.contains("UNSUCCESSFUL_HTTP_RESPONSE_CODE"), "{err}");
    assert!(err.contains("status other than 2xx"), "{err}");

    // Apple cannot complete TLS with our URL.
    app.set_default(support::Behavior::Status(200));
    s.api.force_send_result(Some("TLS_ISSUE"));
    let (code, out, err) = command(&sidecar.config_path, &["apple", "test", "--timeout", "30s"]).await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("sendAttemptResult TLS_ISSUE") && err.contains("certificate chain"), "{err}");
    assert!(err.ends_with("the self test failed\n"), "{err}");
    assert!(s.api.refusals().is_empty(), "{:?}", s.api.refusals());
    assert_no_secrets(&s, &[&out, &err, &sidecar.log()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_periodic_self_test_exports_its_last_success_and_apples_verdict() {
    let s = Setup::new().await;
    let revenuecat = StandIn::start().await;
    let extra = format!(
        "destinations:\n  - {{name: revenuecat, url: \"{}\"}}\n{}selfTest: {{interval: 1s, timeout: 20s, onlyReplica: true}}\n",
        revenuecat.url("/hook"),
        s.config(&s.key.key_id, &s.key_file())
    );
    let sidecar = Sidecar::start(&extra, "").await;
    let (header, key) = (s.chain.x5c(), s.chain.leaf_key.clone());
    s.api.send_tests_to(
        sidecar.ingest_url("/apple/notifications"),
        std::sync::Arc::new(move |uuid: &str| sign_jws(&header, &test_payload(uuid), &key)),
    );
    sidecar.wait_metric("storerelay_self_test_runs_total{result=\"success\"}", 1.0, Duration::from_secs(30)).await;
    assert!(sidecar.metric("storerelay_self_test_last_success_timestamp_seconds").await > 1.7e9);
    assert_eq!(sidecar.metric("storerelay_apple_send_attempt{result=\"SUCCESS\"}").await, 1.0);

    s.api.force_send_result(Some("TLS_ISSUE"));
    sidecar.wait_metric("storerelay_self_test_runs_total{result=\"failure\"}", 1.0, Duration::from_secs(30)).await;
    assert_eq!(sidecar.metric("storerelay_apple_send_attempt{result=\"TLS_ISSUE\"}").await, 1.0);
    assert_eq!(sidecar.metric("storerelay_apple_send_attempt{result=\"SUCCESS\"}").await, 0.0);
    let log = sidecar.log();
    assert!(log.contains("self test failed") && log.contains("certificate chain"), "{log}");
    let requests =
        sidecar.metric("storerelay_apple_api_requests_total{endpoint=\"test_notification\",status=\"200\"}").await;
    assert!(requests >= 2.0, "{}", sidecar.metrics().await);
    assert_no_secrets(&s, &[&log, &sidecar.metrics().await]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_in_a_running_sidecar_are_counted_and_logged_and_it_keeps_running() {
    let s = Setup::new().await;
    let gap_fill = "gapFill: {interval: 1s, lookback: 1h, onlyReplica: true}\n";
    let wrong_key = Sidecar::start(&format!("{}{gap_fill}", s.config("WRONGKEY01", &s.key_file())), "").await;
    wrong_key.wait_metric("storerelay_gap_fill_runs_total{result=\"error\"}", 1.0, Duration::from_secs(30)).await;
    let unauthorized = "storerelay_apple_api_requests_total{endpoint=\"notification_history\",status=\"401\"}";
    assert!(wrong_key.metric(unauthorized).await >= 1.0);
    assert!(wrong_key.log().contains("HTTP 401") && wrong_key.log().contains("keyId"), "{}", wrong_key.log());

    let bad = s.dir.path().join("bad.p8");
    std::fs::write(&bad, "not a key").unwrap();
    let bad_key = Sidecar::start(&format!("{}{gap_fill}", s.config(&s.key.key_id, &bad)), "").await;
    bad_key.wait_metric("storerelay_gap_fill_runs_total{result=\"error\"}", 1.0, Duration::from_secs(30)).await;
    assert!(bad_key.log().contains("appStoreServerApi.privateKeyFile"), "{}", bad_key.log());
    let (jws, _) = s.signed(&uuid(1), 1);
    assert_eq!(bad_key.post(body(&jws)).await.status(), 200, "still taking notifications");
    assert_no_secrets(&s, &[&wrong_key.log(), &bad_key.log(), &wrong_key.metrics().await]);
}
