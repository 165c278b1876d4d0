//! `storerelay-sidecar apple history` against a stand-in App Store Server API that checks every JWT the
//! way Apple does: pagination, `onlyFailures`, which notifications the spool lacks, `429` with
//! `Retry-After`, and clear errors for bad credentials, none of which ever print the key or a token.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::app_store_api::{ApiKey, AppStoreApi, PAGE_SIZE, Sent};
use support::apple::{Chain, ChainOptions, body, payload, sign_jws};
use support::{Sidecar, binary};

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
    let mut history = Vec::new();
    for i in 0..6 {
        let (jws, signed_date_ms) = s.signed(&uuid(i), 60 - i as i64);
        // Two reach one replica, two the other, two nobody.
        if i < 4 {
            assert_eq!(replicas[i % 2].post(body(&jws)).await.status(), 200);
        }
        history.push(Sent { signed_payload: jws, signed_date_ms, attempts: vec!["SUCCESS"] });
    }
    s.api.set_history(history);
    let (code, out, err) = command(&replicas[0].config_path, &["apple", "--json", "history", "--since", "2h"]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    let listed: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let in_spool: Vec<bool> =
        listed["notifications"].as_array().unwrap().iter().map(|n| n["inSpool"].as_bool().unwrap()).collect();
    assert_eq!(in_spool, [true, true, true, true, false, false], "{out}");
}
