//! Retries, dead deliveries, outages and config reloads, against stand-in destinations.

mod support;

use std::time::Duration;

use support::{Behavior, Sidecar, StandIn, v2_body};

fn destination(name: &str, url: &str, retry: &str) -> String {
    format!("  - name: {name}\n    url: {url}\n    timeout: 1s\n    retry: {retry}\n")
}

const FAST: &str = "{initialBackoff: 200ms, maxBackoff: 1s, maxAge: 1h}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_until_delivered() {
    let rc = StandIn::start().await;
    rc.script([Behavior::Status(500), Behavior::Reset, Behavior::Hang, Behavior::Status(503)]);
    let sidecar = Sidecar::start(&format!("destinations:\n{}", destination("rc", &rc.url("/"), FAST)), "").await;
    let body = v2_body(7);
    assert_eq!(sidecar.post(body.clone()).await.status(), 200);
    let got = rc.wait_for(5, Duration::from_secs(20)).await;
    assert!(got.iter().all(|r| r.body[..] == body[..]), "every retry sends the same bytes");
    sidecar
        .wait_metric(
            "storerelay_deliveries_total{destination=\"rc\",outcome=\"delivered\"}",
            1.0,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(sidecar.metric("storerelay_deliveries_total{destination=\"rc\",outcome=\"retried\"}").await, 4.0);
    // Backoff: no retry came sooner than initialBackoff after the previous answer.
    for pair in got.windows(2) {
        assert!(pair[1].at.duration_since(pair[0].at) >= Duration::from_millis(190), "retried too soon");
    }
    assert_eq!(sidecar.metric("storerelay_spool_pending{destination=\"rc\"}").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    let rc = StandIn::start().await;
    rc.script([Behavior::RetryAfter(429, "2".into())]);
    let retry = "{initialBackoff: 200ms, maxBackoff: 3s, maxAge: 1h}";
    let sidecar = Sidecar::start(&format!("destinations:\n{}", destination("rc", &rc.url("/"), retry)), "").await;
    sidecar.post(v2_body(1)).await;
    let got = rc.wait_for(2, Duration::from_secs(10)).await;
    let gap = got[1].at.duration_since(got[0].at);
    assert!(gap >= Duration::from_millis(1_900), "Retry-After: 2 but retried after {gap:?}");
    assert!(gap < Duration::from_secs(3), "Retry-After: 2 but retried after {gap:?}");
    // And an HTTP date, capped by maxBackoff (3s) although it asks for an hour.
    let later = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(3600));
    rc.script([Behavior::RetryAfter(503, later)]);
    sidecar.post(v2_body(2)).await;
    let got = rc.wait_for(4, Duration::from_secs(10)).await;
    let gap = got[3].at.duration_since(got[2].at);
    assert!(
        gap >= Duration::from_millis(2_900) && gap < Duration::from_secs(5),
        "maxBackoff caps Retry-After, got {gap:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4xx_or_redirect_is_dead_at_once_and_can_be_redelivered() {
    let rc = StandIn::start().await;
    rc.script([Behavior::Status(400), Behavior::Status(302)]);
    let sidecar = Sidecar::start(&format!("destinations:\n{}", destination("rc", &rc.url("/"), FAST)), "").await;
    sidecar.post(v2_body(1)).await;
    sidecar.post(v2_body(2)).await;
    sidecar
        .wait_metric("storerelay_deliveries_total{destination=\"rc\",outcome=\"dead\"}", 2.0, Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(rc.received().len(), 2, "dead deliveries are not retried");
    assert_eq!(sidecar.metric("storerelay_spool_dead{destination=\"rc\"}").await, 2.0);

    let dead = sidecar.spool_tool(&["dead"]);
    let listing = String::from_utf8_lossy(&dead.stdout);
    assert!(listing.contains("HTTP 400") && listing.contains("HTTP 302"), "{listing}");
    // A misspelt destination would create rows nothing delivers: refused, and nothing is scheduled.
    let typo = sidecar.spool_tool(&["redeliver", "--destination", "rcc", "--dead"]);
    let refusal = String::from_utf8_lossy(&typo.stderr);
    assert!(!typo.status.success() && refusal.contains("`rcc` is not in") && refusal.contains("--force"), "{typo:?}");
    let redeliver = sidecar.spool_tool(&["redeliver", "--destination", "rc", "--dead"]);
    assert!(redeliver.status.success(), "{redeliver:?}");
    rc.wait_for(4, Duration::from_secs(10)).await;
    sidecar
        .wait_metric(
            "storerelay_deliveries_total{destination=\"rc\",outcome=\"delivered\"}",
            2.0,
            Duration::from_secs(5),
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_down_for_a_while_gets_everything_and_does_not_hold_up_others() {
    let port = support::free_port();
    let down_url = format!("http://127.0.0.1:{port}/hook");
    let healthy = StandIn::start().await;
    let sidecar = Sidecar::start(
        &format!(
            "destinations:\n{}{}",
            destination("down", &down_url, "{initialBackoff: 100ms, maxBackoff: 500ms, maxAge: 1h}"),
            destination("healthy", &healthy.url("/"), FAST)
        ),
        "",
    )
    .await;
    let bodies: Vec<Vec<u8>> = (0..50).map(v2_body).collect();
    for body in &bodies {
        assert_eq!(sidecar.post(body.clone()).await.status(), 200);
    }
    healthy.wait_for(50, Duration::from_secs(10)).await;
    sidecar.wait_metric("storerelay_spool_pending{destination=\"down\"}", 50.0, Duration::from_secs(5)).await;
    assert!(sidecar.metric("storerelay_spool_oldest_pending_seconds{destination=\"down\"}").await >= 0.0);

    let recovered = StandIn::start_on(([127, 0, 0, 1], port).into()).await;
    let got = recovered.wait_for(50, Duration::from_secs(20)).await;
    let mut got: Vec<Vec<u8>> = got.into_iter().map(|r| r.body.to_vec()).collect();
    got.sort();
    got.dedup();
    let mut sent = bodies.clone();
    sent.sort();
    assert_eq!(got, sent);
    sidecar
        .wait_metric(
            "storerelay_deliveries_total{destination=\"down\",outcome=\"delivered\"}",
            50.0,
            Duration::from_secs(10),
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_a_destination_and_a_bad_reload_keeps_the_old_config() {
    let first = StandIn::start().await;
    let second = StandIn::start().await;
    let one = format!("destinations:\n{}", destination("first", &first.url("/"), FAST));
    let sidecar = Sidecar::start(&one, "").await;
    sidecar.post(v2_body(1)).await;
    first.wait_for(1, Duration::from_secs(5)).await;

    let headers_file = sidecar.dir.join("second-headers.yaml");
    std::fs::write(&headers_file, "Authorization: Bearer HEADER-SECRET\n").unwrap();
    let two =
        format!("{one}{}    headersFile: {}\n", destination("second", &second.url("/"), FAST), headers_file.display());
    sidecar.write_config(&two, "");
    sidecar.wait_metric("storerelay_config_reloads_total{result=\"success\"}", 1.0, Duration::from_secs(10)).await;
    sidecar.post(v2_body(2)).await;
    let got = second.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(&got[0].body[..], &v2_body(2)[..]);
    assert_eq!(got[0].header("authorization"), Some("Bearer HEADER-SECRET"));
    first.wait_for(2, Duration::from_secs(5)).await;

    sidecar.write_raw_config(&format!("{}\ndestinations: [{{name: Bad Name}}]\n", sidecar.config_text("", "")));
    sidecar.wait_metric("storerelay_config_reloads_total{result=\"error\"}", 1.0, Duration::from_secs(10)).await;
    sidecar.post(v2_body(3)).await;
    first.wait_for(3, Duration::from_secs(5)).await;
    second.wait_for(2, Duration::from_secs(5)).await;
    let log = sidecar.log();
    assert!(log.contains("config reload refused"), "{log}");
    assert!(!log.contains("HEADER-SECRET"), "a header value leaked into the log");
}

/// The shell that runs the sidecar with its spool on a 4 MiB tmpfs of its own (a user and mount
/// namespace, so no privilege is needed), and fills or frees that filesystem when the test drops a
/// `fill` or `free` file in `control`.
const SMALL_DISK: &str = r#"
set -e
mount -t tmpfs -o size=4m tmpfs "$DISK"
"$@" &
sidecar=$!
trap 'kill -TERM $sidecar; wait $sidecar' TERM
while kill -0 $sidecar 2>/dev/null; do
  if [ -e "$CONTROL/fill" ] && [ ! -e "$CONTROL/filled" ]; then
    dd if=/dev/zero of="$DISK/filler" bs=4k 2>/dev/null || true
    touch "$CONTROL/filled"
  fi
  if [ -e "$CONTROL/free" ] && [ ! -e "$CONTROL/freed" ]; then
    rm -f "$DISK/filler"
    touch "$CONTROL/freed"
  fi
  sleep 0.05
done
"#;

/// Finding 4 of the hardening review: when the outcome of an attempt cannot be written (a full disk,
/// a lock timeout), the destination must not be called again and again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_that_cannot_be_written_is_retried_with_backoff_not_resent() {
    let rc = StandIn::start().await;
    rc.set_default(Behavior::Status(503));
    let tmp = tempfile::tempdir().unwrap();
    let (disk, control) = (tmp.path().join("disk"), tmp.path().join("control"));
    std::fs::create_dir_all(&disk).unwrap();
    std::fs::create_dir_all(&control).unwrap();
    let mut sidecar = Sidecar::prepare(tmp.path().to_path_buf(), "", "");
    let retry = "{initialBackoff: 200ms, maxBackoff: 400ms, maxAge: 1h}";
    let text = sidecar.config_text(&format!("destinations:\n{}", destination("rc", &rc.url("/"), retry)), "");
    let text = text.replace(&sidecar.spool_path().display().to_string(), &disk.join("spool.db").display().to_string());
    sidecar.write_raw_config(&text);
    let script = format!("DISK='{}'; CONTROL='{}'; {SMALL_DISK}", disk.display(), control.display());
    sidecar.spawn_wrapped(&["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", &script, "sh"]);
    sidecar.wait_ready(Duration::from_secs(20)).await;

    assert_eq!(sidecar.post(v2_body(1)).await.status(), 200);
    rc.wait_for(2, Duration::from_secs(10)).await;
    let wait_for = |name: &'static str| {
        let path = control.join(name);
        async move {
            for _ in 0..200 {
                if path.exists() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            panic!("the wrapper did not report {name}");
        }
    };
    std::fs::write(control.join("fill"), "").unwrap();
    wait_for("filled").await;
    tokio::time::sleep(Duration::from_secs(1)).await; // let an attempt under way finish
    let before = rc.received().len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = rc.received().len() - before;
    assert!(during <= 1, "{during} POSTs in 3 s while no outcome could be written:\n{}", sidecar.log());
    assert!(sidecar.log().contains("cannot record delivery outcome"), "{}", sidecar.log());

    // Space again: the outcome is written, delivery goes on and completes.
    std::fs::write(control.join("free"), "").unwrap();
    wait_for("freed").await;
    rc.set_default(Behavior::Status(200));
    sidecar
        .wait_metric(
            "storerelay_deliveries_total{destination=\"rc\",outcome=\"delivered\"}",
            1.0,
            Duration::from_secs(15),
        )
        .await;
    assert!(sidecar.metric("storerelay_outcome_write_failures_total{destination=\"rc\"}").await >= 1.0);
}

/// Rows reach a dispatcher two ways, handed over as they are committed and read back by due queries
/// (when the hand-off is full, for repeats, for a backlog). Under concurrent load with both in play,
/// each destination gets each notification once: none twice, none left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_each_destination_gets_each_notification_exactly_once() {
    let quick = StandIn::start().await;
    let slow = StandIn::start().await;
    slow.set_default(Behavior::Delay(Duration::from_millis(3)));
    // One slot: a hand-off of four rows that overflows under this load, so due queries do part of it.
    let sidecar = Sidecar::start(
        &format!(
            "destinations:\n{}    concurrency: 1\n{}    concurrency: 8\n",
            destination("quick", &quick.url("/"), FAST),
            destination("slow", &slow.url("/"), FAST)
        ),
        "",
    )
    .await;
    let bodies: Vec<Vec<u8>> = (0..300).map(v2_body).collect();
    // Every tenth notification is sent twice, as Apple does when an answer is late.
    let posts: Vec<Vec<u8>> = bodies.iter().chain(bodies.iter().step_by(10)).cloned().collect();
    let sidecar = std::sync::Arc::new(sidecar);
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in posts.chunks(posts.len().div_ceil(24)) {
        let (sidecar, chunk) = (sidecar.clone(), chunk.to_vec());
        tasks.spawn(async move {
            for body in chunk {
                assert_eq!(sidecar.post(body).await.status(), 200);
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let mut sent = bodies.clone();
    sent.sort();
    for stand_in in [&quick, &slow] {
        stand_in.wait_for(bodies.len(), Duration::from_secs(30)).await;
    }
    // Time for a second copy to arrive, were one on its way.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (name, stand_in) in [("quick", &quick), ("slow", &slow)] {
        let mut got: Vec<Vec<u8>> = stand_in.bodies().into_iter().map(|b| b.to_vec()).collect();
        got.sort();
        assert_eq!(got.len(), sent.len(), "{name}: {} requests for {} notifications", got.len(), sent.len());
        assert!(got == sent, "{name}: not the notifications sent, once each");
        assert_eq!(sidecar.metric(&format!("storerelay_spool_pending{{destination=\"{name}\"}}")).await, 0.0);
    }
}

/// A backlog is read from the spool a batch at a time: each due query also fetches the rows for the
/// next `concurrency` slots to free, instead of one query per finished attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_read_from_the_spool_a_batch_at_a_time() {
    let slow = StandIn::start().await;
    slow.set_default(Behavior::Delay(Duration::from_millis(25)));
    let sidecar = Sidecar::start(
        &format!("destinations:\n{}    concurrency: 2\n", destination("slow", &slow.url("/"), FAST)),
        "",
    )
    .await;
    let count = 48;
    for body in (0..count).map(v2_body) {
        assert_eq!(sidecar.post(body).await.status(), 200);
    }
    let got = slow.wait_for(count, Duration::from_secs(20)).await;
    assert_eq!(got.len(), count, "each notification once");
    let queries = sidecar.metric("storerelay_due_queries_total{destination=\"slow\"}").await;
    // Measured: one query per finished attempt made 45; fetching ahead for the next two slots, 16-17.
    assert!(queries <= (count / 2) as f64, "{queries} due queries for a backlog of {count} at concurrency 2");
    assert!(queries >= 1.0, "the backlog was read from the spool at least once");
}

/// The threads a running sidecar has, by name, from `/proc`.
fn thread_names(pid: i32) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("read /proc/PID/task")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect();
    names.sort();
    names
}

/// Deliveries run on a thread of their own beside ingest's, whatever the CPU count: a fixed set of
/// threads, and no work-stealing runtime waking idle workers (see `delivery::start`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_runs_on_a_fixed_set_of_threads_with_deliveries_on_their_own() {
    let rc = StandIn::start().await;
    let sidecar = Sidecar::start(&format!("destinations:\n{}", destination("rc", &rc.url("/"), FAST)), "").await;
    for n in 0..5 {
        assert_eq!(sidecar.post(v2_body(300 + n)).await.status(), 200);
    }
    rc.wait_for(5, Duration::from_secs(10)).await;

    let names = thread_names(sidecar.pid());
    for expected in ["delivery", "spool-writer", "spool-checkpoin"] {
        assert_eq!(names.iter().filter(|n| *n == expected).count(), 1, "one `{expected}` thread: {names:?}");
    }
    assert!(!names.iter().any(|n| n.starts_with("tokio-rt-worker")), "no work-stealing workers: {names:?}");
    // The main thread, the three above, and tokio's blocking pool only for DNS lookups (none here).
    assert_eq!(names.len(), 4, "{names:?}");
}
