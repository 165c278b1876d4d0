//! The shared spool against a real PostgreSQL server: several sidecar processes on one queue, killed,
//! deleted, and the database itself stopped mid-stream. Nothing acknowledged may be lost, and each
//! destination gets each notification once.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use storerelay_testenv::postgres::{self, Postgres};
use support::{Behavior, Sidecar, StandIn};

fn server() -> Option<Postgres> {
    postgres::binaries().map(|bin| Postgres::start(&bin))
}

/// The `spool:` keys of a sidecar on `queue`.
fn shared_spool(pg: &Postgres, queue: &str) -> String {
    format!(
        "backend: postgres\npostgres:\n  url: \"{}\"\n  queue: {queue}\n  maxConnections: 4\n  timeout: 2s",
        pg.url()
    )
}

fn destination(name: &str, to: &StandIn) -> String {
    format!(
        "  - name: {name}\n    url: {}\n    timeout: 2s\n    concurrency: 8\n    retry: {{initialBackoff: 100ms, maxBackoff: 500ms}}\n",
        to.url("/hook")
    )
}

/// A V2-shaped notification with its own `notificationUUID` (unsigned: these sidecars do not verify).
fn v2(uuid: &str) -> Vec<u8> {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"ES256"}"#);
    let payload = URL_SAFE_NO_PAD.encode(
        format!(
            r#"{{"notificationType":"DID_RENEW","notificationUUID":"{uuid}","data":{{"bundleId":"com.example.app"}}}}"#
        )
        .as_bytes(),
    );
    format!(r#"{{"signedPayload":"{header}.{payload}.c2lnbmF0dXJl"}}"#).into_bytes()
}

/// How many times each body arrived.
fn counts(bodies: &[bytes::Bytes]) -> HashMap<bytes::Bytes, usize> {
    let mut seen = HashMap::new();
    for body in bodies {
        *seen.entry(body.clone()).or_insert(0) += 1;
    }
    seen
}

async fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_queue_each_notification_once_however_many_replicas_apple_reaches() {
    let Some(pg) = server() else { return };
    let app = StandIn::start().await;
    let revenuecat = StandIn::start().await;
    let extra = format!("upstream:\n  url: http://{}\ndestinations:\n{}", app.addr, destination("rc", &revenuecat));
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(Arc::new(Sidecar::start(&extra, &shared_spool(&pg, "shop/payments")).await));
    }
    const NOTIFICATIONS: usize = 3_000;
    let limit = Arc::new(tokio::sync::Semaphore::new(48));
    let mut posts = Vec::new();
    for n in 0..NOTIFICATIONS {
        // Apple's first attempt and its retry reach two different replicas, at the same moment.
        let (first, second) = (replicas[n % 3].clone(), replicas[(n + 1) % 3].clone());
        let permit = limit.clone().acquire_owned().await.unwrap();
        posts.push(tokio::spawn(async move {
            let body = v2(&format!("uuid-{n}"));
            let (a, b) = tokio::join!(first.post(body.clone()), second.post(body));
            drop(permit);
            (a.status().as_u16(), b.status().as_u16())
        }));
    }
    for post in posts {
        assert_eq!(post.await.unwrap(), (200, 200));
    }
    revenuecat.wait_for(NOTIFICATIONS, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let delivered = counts(&revenuecat.bodies());
    assert_eq!(delivered.len(), NOTIFICATIONS, "every notification reached the destination");
    let twice: Vec<_> = delivered.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "{} notifications were delivered more than once", twice.len());
    assert_eq!(app.received().len(), 2 * NOTIFICATIONS, "the app still gets every request");
    let duplicates: f64 = {
        let mut sum = 0.0;
        for replica in &replicas {
            sum += replica.metric_sum("storerelay_duplicates_total").await;
        }
        sum
    };
    assert_eq!(duplicates, NOTIFICATIONS as f64, "one of each pair was recognised as a repeat");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_replica_loses_nothing_and_the_tools_see_the_shared_queue() {
    let Some(pg) = server() else { return };
    let revenuecat = StandIn::start().await;
    let address = revenuecat.addr;
    revenuecat.stop();
    let extra = format!("destinations:\n{}", destination("rc", &revenuecat));
    let spool = shared_spool(&pg, "shop/payments");
    let mut doomed = Sidecar::start(&extra, &spool).await;
    let survivor = Sidecar::start(&extra, &spool).await;
    let mut acknowledged = Vec::new();
    for n in 0..200 {
        let body = v2(&format!("deleted-{n}"));
        let replica = if n % 2 == 0 { &doomed } else { &survivor };
        assert_eq!(replica.post(body.clone()).await.status(), 200);
        acknowledged.push(bytes::Bytes::from(body));
    }
    // The pod is deleted: its process killed and its disk gone.
    doomed.kill9();
    std::fs::remove_dir_all(&doomed.dir).unwrap();

    let stats = survivor.spool_tool(&["--json", "stats"]);
    assert!(stats.status.success(), "{}", String::from_utf8_lossy(&stats.stderr));
    let value: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(value["notifications"], 200, "the tools read the shared queue: {value}");
    assert_eq!(value["destinations"][0]["pending"], 200);

    let revenuecat = StandIn::start_on(address).await;
    revenuecat.wait_for(200, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let delivered = counts(&revenuecat.bodies());
    for body in &acknowledged {
        assert_eq!(delivered.get(body), Some(&1), "an acknowledged notification was lost or sent twice");
    }
    wait_until("every delivery recorded", Duration::from_secs(10), || {
        let stats = survivor.spool_tool(&["--json", "stats"]);
        let value: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap_or_default();
        value["destinations"][0]["delivered"] == 200
    })
    .await;
    let list = survivor.spool_tool(&["list", "--state", "delivered", "--limit", "5"]);
    assert_eq!(String::from_utf8_lossy(&list.stdout).lines().count(), 6, "a header and five rows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_killed_mid_attempt_leaves_a_lease_that_another_takes_over() {
    let Some(pg) = server() else { return };
    let revenuecat = StandIn::start().await;
    revenuecat.set_default(Behavior::Hang);
    let extra = format!("destinations:\n{}", destination("rc", &revenuecat));
    let spool = shared_spool(&pg, "q");
    let mut first = Sidecar::start(&extra, &spool).await;
    let mut bodies = Vec::new();
    for n in 0..8 {
        let body = v2(&format!("lease-{n}"));
        assert_eq!(first.post(body.clone()).await.status(), 200);
        bodies.push(bytes::Bytes::from(body));
    }
    // Every one is being attempted (and hangs) when the replica dies.
    revenuecat.wait_for(8, Duration::from_secs(10)).await;
    first.kill9();
    let killed_at = revenuecat.received().len();
    revenuecat.set_default(Behavior::Status(200));
    let second = Sidecar::start(&extra, &spool).await;
    revenuecat.wait_for(killed_at + 8, Duration::from_secs(30)).await;
    let after: Vec<bytes::Bytes> = revenuecat.received()[killed_at..].iter().map(|r| r.body.clone()).collect();
    let taken_over = counts(&after);
    for body in &bodies {
        assert!(taken_over.contains_key(body), "a delivery claimed by the killed replica was never taken over");
    }
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_database_down_notifications_get_503_and_every_acknowledged_one_is_delivered() {
    let Some(mut pg) = server() else { return };
    let revenuecat = StandIn::start().await;
    let extra = format!("destinations:\n{}", destination("rc", &revenuecat));
    let sidecar = Arc::new(Sidecar::start(&extra, &shared_spool(&pg, "q")).await);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut posters = Vec::new();
    for worker in 0..4 {
        let (sidecar, stop) = (sidecar.clone(), stop.clone());
        posters.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let body = v2(&format!("outage-{worker}-{n}"));
                let response = sidecar.post(body.clone()).await;
                let retry_after = response.headers().get("retry-after").is_some();
                answers.push((response.status().as_u16(), retry_after, bytes::Bytes::from(body)));
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            answers
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    pg.stop();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    pg.resume();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut answers = Vec::new();
    for poster in posters {
        answers.extend(poster.await.unwrap());
    }
    let acknowledged: Vec<&bytes::Bytes> = answers.iter().filter(|(s, _, _)| *s == 200).map(|(_, _, b)| b).collect();
    let refused: Vec<_> = answers.iter().filter(|(s, _, _)| *s != 200).collect();
    assert!(!refused.is_empty(), "the outage was not noticed");
    for (status, retry_after, _) in &refused {
        assert!(*status == 503 && *retry_after, "a refusal must be 503 with Retry-After, not {status}");
    }
    assert!(
        sidecar.metric("storerelay_notifications_rejected_total{reason=\"spool_unavailable\"}").await > 0.0,
        "the outage is counted"
    );
    wait_until("every acknowledged notification delivered", Duration::from_secs(60), || {
        let delivered = counts(&revenuecat.bodies());
        acknowledged.iter().all(|body| delivered.contains_key(*body))
    })
    .await;
    assert!(sidecar.log().contains("not stored; answering 503"), "the log says why");
    eprintln!("{} acknowledged, {} refused during the outage", acknowledged.len(), refused.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_replicas_starting_at_once_migrate_the_schema_once() {
    let Some(pg) = server() else { return };
    let revenuecat = StandIn::start().await;
    let extra = format!("destinations:\n{}", destination("rc", &revenuecat));
    let dirs: Vec<tempfile::TempDir> = (0..10).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut replicas: Vec<Sidecar> =
        dirs.iter().map(|dir| Sidecar::prepare(dir.path().to_path_buf(), &extra, &shared_spool(&pg, "q"))).collect();
    for replica in &mut replicas {
        replica.spawn();
    }
    for replica in &replicas {
        replica.wait_ready(Duration::from_secs(30)).await;
    }
    assert_eq!(pg.psql("SELECT count(*), max(version) FROM storerelay.schema_migrations"), "1|1");
    let migrated = replicas.iter().filter(|r| r.log().contains("applied a spool schema migration")).count();
    assert_eq!(migrated, 1, "exactly one replica applies the migration");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queues_in_one_database_never_see_each_others_rows() {
    let Some(pg) = server() else { return };
    let (first_destination, second_destination) = (StandIn::start().await, StandIn::start().await);
    let first = Sidecar::start(
        &format!("destinations:\n{}", destination("rc", &first_destination)),
        &shared_spool(&pg, "shop/payments"),
    )
    .await;
    let second = Sidecar::start(
        &format!("destinations:\n{}", destination("rc", &second_destination)),
        &shared_spool(&pg, "blog/subs"),
    )
    .await;
    for n in 0..20 {
        assert_eq!(first.post(v2(&format!("first-{n}"))).await.status(), 200);
    }
    // The same notification in both queues is a repeat in neither: duplicate keys are per queue.
    assert_eq!(first.post(v2("both")).await.status(), 200);
    assert_eq!(second.post(v2("both")).await.status(), 200);
    first_destination.wait_for(21, Duration::from_secs(20)).await;
    second_destination.wait_for(1, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(second_destination.bodies(), vec![bytes::Bytes::from(v2("both"))]);
    assert_eq!(first_destination.received().len(), 21);
    let stats = second.spool_tool(&["--json", "stats"]);
    let value: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(value["notifications"], 1, "{value}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_sidecar_that_stops_with_work_pending_says_what_it_leaves_behind() {
    let unreachable = StandIn::start().await;
    unreachable.stop();
    let extra = format!("shutdownGracePeriod: 1s\ndestinations:\n{}", destination("rc", &unreachable));
    let mut sidecar = Sidecar::start(&extra, "").await;
    for n in 0..3 {
        assert_eq!(sidecar.post(v2(&format!("left-{n}"))).await.status(), 200);
    }
    sidecar.signal(libc::SIGTERM);
    assert_eq!(sidecar.wait_exit(Duration::from_secs(10)).await, Some(0));
    let log = sidecar.log();
    let line =
        log.lines().find(|l| l.contains("LOST if it is deleted")).unwrap_or_else(|| panic!("no warning:\n{log}"));
    assert!(line.contains(r#""by_destination":"rc=3""#) && line.contains(r#""pending":3"#), "{line}");
}

/// A CA and a server certificate for `localhost` and 127.0.0.1 it signed: (CA PEM, chain PEM, key PEM).
fn tls_chain() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (ca.pem(), server.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_reaches_the_database_over_tls_and_refuses_a_certificate_of_another_ca() {
    let Some(mut pg) = server() else { return };
    let (ca, chain, key) = tls_chain();
    pg.enable_tls(&chain, &key);
    let revenuecat = StandIn::start().await;
    let start = |ca_pem: String| {
        let dir = tempfile::tempdir().unwrap();
        // The password only ever lives in the Secret file (trust authentication ignores it here).
        let url = format!("postgres://storerelay:pw-NEVER-PRINTED@localhost:{}/postgres?sslmode=verify-full", pg.port);
        std::fs::write(dir.path().join("url"), url).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca_pem).unwrap();
        let spool = format!(
            "backend: postgres\npostgres:\n  urlFile: {}\n  rootCertificateFile: {}\n  queue: tls\n  maxConnections: 3",
            dir.path().join("url").display(),
            dir.path().join("ca.pem").display()
        );
        let sidecar = Sidecar::prepare(
            dir.path().to_path_buf(),
            &format!("destinations:\n{}", destination("rc", &revenuecat)),
            &spool,
        );
        (dir, sidecar)
    };
    let (_dir, mut trusted) = start(ca);
    trusted.spawn();
    trusted.wait_ready(Duration::from_secs(20)).await;
    assert_eq!(trusted.post(v2("over-tls")).await.status(), 200);
    revenuecat.wait_for(1, Duration::from_secs(20)).await;
    let encrypted = pg.psql(
        "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'storerelay-sidecar'",
    );
    assert_eq!(encrypted, "t", "every spool connection is TLS");

    let (other_ca, _, _) = tls_chain();
    let (_other_dir, mut untrusted) = start(other_ca);
    untrusted.spawn();
    assert_ne!(untrusted.wait_exit(Duration::from_secs(20)).await, Some(0), "a server the CA did not sign is refused");
    let log = untrusted.log();
    assert!(log.to_lowercase().contains("certificate"), "the refusal says why: {log}");
    for output in [trusted.log(), log] {
        assert!(!output.contains("pw-NEVER-PRINTED"), "the URL's password leaked: {output}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_of_the_shared_queue_are_seen_and_redelivered_from_any_replica() {
    let Some(pg) = server() else { return };
    let revenuecat = StandIn::start().await;
    revenuecat.set_default(Behavior::Status(400));
    let extra = format!("destinations:\n{}", destination("rc", &revenuecat));
    let spool = shared_spool(&pg, "shop/payments");
    let (first, second) = (Sidecar::start(&extra, &spool).await, Sidecar::start(&extra, &spool).await);
    for n in 0..4 {
        assert_eq!(first.post(v2(&format!("dead-{n}"))).await.status(), 200);
    }
    wait_until("four dead letters", Duration::from_secs(20), || {
        let dead = second.spool_tool(&["--json", "dead"]);
        String::from_utf8_lossy(&dead.stdout).lines().count() == 4
    })
    .await;
    // Seen from the other replica, with why, and counted in its gauges too.
    let dead = String::from_utf8(second.spool_tool(&["dead"]).stdout).unwrap();
    assert!(dead.contains("HTTP 400"), "{dead}");
    assert_eq!(second.metric("storerelay_spool_dead{destination=\"rc\"}").await, 4.0);

    revenuecat.set_default(Behavior::Status(200));
    let redeliver = second.spool_tool(&["redeliver", "--destination", "rc", "--dead"]);
    assert!(String::from_utf8_lossy(&redeliver.stdout).starts_with("4 deliveries"), "{redeliver:?}");
    wait_until("redelivered", Duration::from_secs(20), || {
        revenuecat.received().iter().filter(|r| r.body.starts_with(b"{\"signedPayload\"")).count() >= 8
    })
    .await;
    wait_until("recorded as delivered", Duration::from_secs(10), || {
        let stats = second.spool_tool(&["--json", "stats"]);
        let value: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap_or_default();
        value["destinations"][0]["delivered"] == 4 && value["destinations"][0]["dead"] == 0
    })
    .await;
    let purge = first.spool_tool(&["purge"]);
    assert!(String::from_utf8_lossy(&purge.stdout).starts_with("4 delivered deliveries purged"), "{purge:?}");
    let stats = first.spool_tool(&["--json", "stats"]);
    let value: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(value["notifications"], 0, "nothing left to keep: {value}");
}
