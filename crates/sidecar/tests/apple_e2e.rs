//! Apple semantics through the running binary: verification, duplicates, routing, and secrets.

mod support;

use std::time::Duration;

use support::apple::{Chain, ChainOptions, body, payload, sign_jws};
use support::{Sidecar, StandIn, client};

fn now_ms() -> i64 {
    storerelay_sidecar::clock::now_ms()
}

struct Setup {
    chain: Chain,
    root_file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let chain = Chain::generate(ChainOptions::default());
    let root_file = dir.path().join("root.der");
    std::fs::write(&root_file, &chain.root).unwrap();
    Setup { chain, root_file, _dir: dir }
}

impl Setup {
    fn notification(&self, uuid: &str, environment: &str) -> Vec<u8> {
        body(&sign_jws(
            &self.chain.x5c(),
            &payload(uuid, environment, "com.example.app", now_ms()),
            &self.chain.leaf_key,
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_mode_turns_forgeries_away_before_the_app_and_the_destinations() {
    let s = setup();
    let app = StandIn::start().await;
    let rc = StandIn::start().await;
    let sidecar = Sidecar::start(
        &format!(
            "upstream: {{url: {}}}\nverify:\n  mode: enforce\n  rootCertificates: [{}]\n  bundleIds: [com.example.app]\ndestinations:\n  - {{name: rc, url: \"{}\"}}\n",
            app.url(""),
            s.root_file.display(),
            rc.url("/")
        ),
        "",
    )
    .await;

    let genuine = s.notification("uuid-genuine", "Production");
    assert_eq!(sidecar.post(genuine.clone()).await.status(), 200);

    let forger = Chain::generate(ChainOptions::default());
    let forged = body(&sign_jws(
        &forger.x5c(),
        &payload("uuid-forged", "Production", "com.example.app", now_ms()),
        &forger.leaf_key,
    ));
    let response = sidecar.post(forged).await;
    assert_eq!(response.status(), 401);
    assert_eq!(response.text().await.unwrap(), r#"{"error":"verification failed","reason":"chain"}"#);

    let other_app =
        body(&sign_jws(&s.chain.x5c(), &payload("uuid-other", "Production", "com.other", now_ms()), &s.chain.leaf_key));
    assert_eq!(sidecar.post(other_app).await.status(), 401);
    let v1 = br#"{"notification_type":"DID_RENEW","environment":"PROD","bid":"com.example.app","password":"guess"}"#;
    assert_eq!(sidecar.post(v1.to_vec()).await.status(), 401, "V1 without a configured v1Password is rejected");
    assert_eq!(sidecar.post(b"{\"hello\":1}".to_vec()).await.status(), 401, "unknown shapes cannot be verified");
    assert_eq!(sidecar.post(b"not json".to_vec()).await.status(), 400);

    rc.wait_for(1, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rc.bodies(), vec![bytes::Bytes::from(genuine.clone())], "only the genuine notification is mirrored");
    assert_eq!(app.bodies(), vec![bytes::Bytes::from(genuine)], "only the genuine notification reaches the app");
    assert_eq!(sidecar.metric("storerelay_notifications_rejected_total{reason=\"chain\"}").await, 1.0);
    assert_eq!(sidecar.metric("storerelay_notifications_rejected_total{reason=\"app_identity\"}").await, 1.0);
    assert_eq!(sidecar.metric("storerelay_notifications_rejected_total{reason=\"v1_password\"}").await, 1.0);
    assert_eq!(sidecar.metric("storerelay_notifications_rejected_total{reason=\"malformed\"}").await, 1.0);
    assert_eq!(sidecar.metric("storerelay_notifications_rejected_total{reason=\"not_json\"}").await, 1.0);
    assert_eq!(
        sidecar
            .metric(
                "storerelay_notifications_received_total{version=\"v2\",environment=\"Production\",type=\"DID_RENEW\"}"
            )
            .await,
        1.0
    );
    assert!(sidecar.log().contains("none of verify.rootCertificates is Apple Root CA - G3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_mode_accepts_and_counts_failures() {
    let s = setup();
    let rc = StandIn::start().await;
    let sidecar = Sidecar::start(
        &format!(
            "verify: {{mode: log, rootCertificates: [{}]}}\ndestinations:\n  - {{name: rc, url: \"{}\"}}\n",
            s.root_file.display(),
            rc.url("/")
        ),
        "",
    )
    .await;
    let forger = Chain::generate(ChainOptions::default());
    let forged = body(&sign_jws(&forger.x5c(), &payload("u", "Sandbox", "b", now_ms()), &forger.leaf_key));
    assert_eq!(sidecar.post(forged).await.status(), 200);
    rc.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(sidecar.metric("storerelay_notifications_rejected_total{reason=\"chain\"}").await, 1.0);
    assert!(sidecar.log().contains("failed verification; accepted"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apples_retry_reaches_the_app_again_but_each_destination_once() {
    let s = setup();
    let app = StandIn::start().await;
    let rc = StandIn::start().await;
    let sidecar = Sidecar::start(
        &format!("upstream: {{url: {}}}\ndestinations:\n  - {{name: rc, url: \"{}\"}}\n", app.url(""), rc.url("/")),
        "",
    )
    .await;
    let first = s.notification("uuid-retried", "Production");
    // Apple's retry carries the same notificationUUID (a re-signed JWS is different bytes).
    let retry = s.notification("uuid-retried", "Production");
    assert_eq!(sidecar.post(first.clone()).await.status(), 200);
    rc.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(sidecar.post(retry).await.status(), 200);
    let v1 = br#"{"notification_type":"DID_RENEW","environment":"Sandbox","bid":"b","password":"p"}"#.to_vec();
    sidecar.post(v1.clone()).await;
    sidecar.post(v1.clone()).await;
    app.wait_for(4, Duration::from_secs(5)).await;
    rc.wait_for(2, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rc.bodies(), vec![bytes::Bytes::from(first), bytes::Bytes::from(v1)], "each notification once");
    assert_eq!(sidecar.metric("storerelay_duplicates_total{version=\"v2\"}").await, 1.0);
    assert_eq!(sidecar.metric("storerelay_duplicates_total{version=\"v1\"}").await, 1.0);
    assert!(sidecar.log().contains("\"duplicate\":true"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_go_only_where_their_environment_and_type_match() {
    let s = setup();
    let sandbox = StandIn::start().await;
    let production = StandIn::start().await;
    let everything = StandIn::start().await;
    let refunds = StandIn::start().await;
    let sidecar = Sidecar::start(
        &format!(
            "destinations:\n  - {{name: sandbox, url: \"{}\", match: {{environments: [Sandbox]}}}}\n  - {{name: production, url: \"{}\", match: {{environments: [Production], versions: [v2]}}}}\n  - {{name: everything, url: \"{}\"}}\n  - {{name: refunds, url: \"{}\", match: {{notificationTypes: [REFUND]}}}}\n",
            sandbox.url("/"),
            production.url("/"),
            everything.url("/"),
            refunds.url("/")
        ),
        "",
    )
    .await;
    let in_sandbox = s.notification("uuid-sb", "Sandbox");
    let in_production = s.notification("uuid-prod", "Production");
    let unknown = b"{\"something\":\"else\"}".to_vec();
    for body in [&in_sandbox, &in_production, &unknown] {
        assert_eq!(sidecar.post(body.clone()).await.status(), 200);
    }
    everything.wait_for(3, Duration::from_secs(5)).await;
    sandbox.wait_for(1, Duration::from_secs(5)).await;
    production.wait_for(1, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sandbox.bodies(), vec![bytes::Bytes::from(in_sandbox)]);
    assert_eq!(production.bodies(), vec![bytes::Bytes::from(in_production)]);
    assert!(refunds.received().is_empty());
    assert_eq!(sidecar.metric("storerelay_notifications_unknown_shape_total").await, 1.0);
    assert_eq!(
        sidecar
            .metric(
                "storerelay_notifications_received_total{version=\"unknown\",environment=\"unknown\",type=\"unknown\"}"
            )
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_notifications_are_acknowledged_and_counted_and_unknown_bodies_can_be_refused() {
    let s = setup();
    let production = StandIn::start().await;
    let sidecar = Sidecar::start(
        &format!("unknownBodies: reject\ndestinations:\n  - {{name: production, url: \"{}\", match: {{environments: [Production]}}}}\n", production.url("/")),
        "",
    )
    .await;
    assert_eq!(sidecar.post(s.notification("u1", "Sandbox")).await.status(), 200);
    assert_eq!(sidecar.metric("storerelay_notifications_unrouted_total").await, 1.0);
    assert_eq!(sidecar.post(b"{\"x\":1}".to_vec()).await.status(), 400);
    assert_eq!(sidecar.metric("storerelay_notifications_rejected_total{reason=\"unknown_body\"}").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_appears_in_logs_metrics_errors_or_tool_output() {
    const V1_PASSWORD: &str = "v1-SHARED-SECRET-5b8e";
    const URL_TOKEN: &str = "URL-TOKEN-9f3a";
    const HEADER_VALUE: &str = "HEADER-SECRET-77c1";
    let rc = StandIn::start().await;
    rc.script([support::Behavior::Status(500), support::Behavior::Status(404)]);
    let dir = tempfile::tempdir().unwrap();
    let url_file = dir.path().join("url");
    std::fs::write(&url_file, rc.url(&format!("/hooks/{URL_TOKEN}?key={URL_TOKEN}"))).unwrap();
    let password_file = dir.path().join("v1password");
    std::fs::write(&password_file, format!("{V1_PASSWORD}\n")).unwrap();
    let chain = Chain::generate(ChainOptions::default());
    let root = dir.path().join("root.der");
    std::fs::write(&root, &chain.root).unwrap();
    let extra = format!(
        "verify: {{mode: enforce, rootCertificates: [{}], v1PasswordFile: {}}}\ndestinations:\n  - name: rc\n    urlFile: {}\n    headers: {{Authorization: \"Bearer {HEADER_VALUE}\"}}\n    retry: {{initialBackoff: 100ms, maxBackoff: 200ms}}\n",
        root.display(),
        password_file.display(),
        url_file.display()
    );
    let sidecar = Sidecar::start(&extra, "").await;

    let good_v1 =
        format!(r#"{{"notification_type":"DID_RENEW","environment":"PROD","bid":"b","password":"{V1_PASSWORD}"}}"#);
    let bad_v1 =
        format!(r#"{{"notification_type":"DID_RENEW","environment":"PROD","bid":"b","password":"{V1_PASSWORD}x"}}"#);
    assert_eq!(sidecar.post(good_v1.clone()).await.status(), 200);
    let refused = sidecar.post(bad_v1).await;
    assert_eq!(refused.status(), 401);
    let refusal = refused.text().await.unwrap();
    let got = rc.wait_for(2, Duration::from_secs(10)).await;
    assert_eq!(got[0].header("authorization"), Some(format!("Bearer {HEADER_VALUE}").as_str()));
    sidecar
        .wait_metric("storerelay_deliveries_total{destination=\"rc\",outcome=\"dead\"}", 1.0, Duration::from_secs(5))
        .await;

    let check = std::process::Command::new(support::binary())
        .args(["check", "--config"])
        .arg(&sidecar.config_path)
        .output()
        .unwrap();
    let inspect = {
        use std::io::Write;
        let mut child = std::process::Command::new(support::binary())
            .args(["inspect", "--config"])
            .arg(&sidecar.config_path)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(good_v1.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    assert!(String::from_utf8_lossy(&inspect.stdout).contains("verification: passes"), "{inspect:?}");
    let listing = sidecar.spool_tool(&["list"]);
    let everything = [
        sidecar.log(),
        sidecar.metrics().await,
        refusal,
        String::from_utf8_lossy(&check.stdout).into_owned(),
        String::from_utf8_lossy(&check.stderr).into_owned(),
        String::from_utf8_lossy(&inspect.stdout).into_owned(),
        String::from_utf8_lossy(&listing.stdout).into_owned(),
        client().get(format!("http://{}/readyz", sidecar.admin)).send().await.unwrap().text().await.unwrap(),
    ]
    .join("\n");
    assert!(everything.contains("\"message\":\"delivery\""), "the log was captured");
    for secret in [V1_PASSWORD, URL_TOKEN, HEADER_VALUE] {
        assert!(!everything.contains(secret), "{secret} leaked:\n{everything}");
    }
}

/// Findings 5 and 6 of the hardening review: a verification secret or root that is not mounted (yet)
/// is our problem, not Apple's. The sidecar starts, says so, and answers 503 (Apple retries) instead
/// of 401 (Apple may give up) until the file appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_verification_files_answer_503_until_they_appear() {
    const V1_PASSWORD: &str = "v1-secret-42";
    let s = setup();
    let rc = StandIn::start().await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("apple-root").join("AppleRootCA-G3.cer");
    let password = dir.path().join("v1-password").join("password");
    let sidecar = Sidecar::start(
        &format!(
            "verify: {{mode: enforce, rootCertificates: [{}], v1PasswordFile: {}}}\ndestinations:\n  - {{name: rc, url: \"{}\"}}\n",
            root.display(),
            password.display(),
            rc.url("/")
        ),
        "",
    )
    .await;
    let readyz = || async {
        let response = client().get(format!("http://{}/readyz", sidecar.admin)).send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    };
    let (status, text) = readyz().await;
    assert_eq!(status, 200, "the pod stays ready: the app path must keep working");
    assert!(text.contains("degraded: verify") && text.contains("AppleRootCA-G3.cer"), "{text}");
    assert!(text.contains("v1PasswordFile"), "{text}");

    let v1 =
        format!(r#"{{"notification_type":"DID_RENEW","environment":"PROD","bid":"b","password":"{V1_PASSWORD}"}}"#);
    let v2 = s.notification("uuid-before-root", "Production");
    for body in [v1.clone().into_bytes(), v2.clone()] {
        let answer = sidecar.post(body).await;
        assert_eq!(answer.status(), 503, "a missing file of ours is never a 4xx");
        assert!(answer.headers().contains_key("retry-after"));
    }
    assert_eq!(sidecar.metric("storerelay_notifications_rejected_total{reason=\"verify_unavailable\"}").await, 2.0);
    assert!(sidecar.log().contains("verification files are missing"), "{}", sidecar.log());

    // The Secret and the ConfigMap arrive: the reload takes them and the same notifications pass.
    std::fs::create_dir_all(password.parent().unwrap()).unwrap();
    std::fs::write(&password, V1_PASSWORD).unwrap();
    std::fs::create_dir_all(root.parent().unwrap()).unwrap();
    std::fs::copy(&s.root_file, &root).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while readyz().await.1.contains("degraded") {
        assert!(std::time::Instant::now() < deadline, "the files were not picked up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(sidecar.post(v1.into_bytes()).await.status(), 200);
    assert_eq!(sidecar.post(v2).await.status(), 200);
    rc.wait_for(2, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_log_mode_a_missing_root_is_a_warning_and_notifications_flow() {
    let s = setup();
    let rc = StandIn::start().await;
    let missing = s.root_file.with_file_name("not-mounted.cer");
    let sidecar = Sidecar::start(
        &format!(
            "verify: {{mode: log, rootCertificates: [{}]}}\ndestinations:\n  - {{name: rc, url: \"{}\"}}\n",
            missing.display(),
            rc.url("/")
        ),
        "",
    )
    .await;
    assert_eq!(sidecar.post(s.notification("uuid-log", "Production")).await.status(), 200);
    rc.wait_for(1, Duration::from_secs(10)).await;
    assert!(sidecar.log().contains("verification files are missing"), "{}", sidecar.log());
}
