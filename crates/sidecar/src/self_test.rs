//! The self test: Apple's *Request a Test Notification*, followed hop by hop: did Apple reach us (its
//! `sendAttemptResult`), did the spool store it, did each destination whose `match` admits it get it.
//! A TLS or ingress mistake makes Apple retry for days and then give up without anyone noticing; this
//! notices within minutes. `storerelay-sidecar apple test` runs it once; with `selfTest` the sidecar
//! runs it on its interval and exports the time of the last success.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use storerelay_runtime::CancellationToken;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::apple::Notification;
use crate::apple_api::{AppleApi, HistoryItem, send_attempt_advice};
use crate::config::RuntimeConfig;
use crate::metrics::Metrics;
use crate::spool::{DeliveryState, DeliveryStatus, Spool, SpoolBackend};

/// How often Apple and the spool are asked again while a hop is not done.
const POLL: Duration = Duration::from_secs(1);

/// Where the test notification's deliveries are looked up: the sidecar's spool, or the tools' view of it.
pub trait Lookup {
    /// The deliveries of the notification stored under `key`, or `None` while it is not stored.
    fn deliveries_of(&self, key: &str) -> impl Future<Output = Result<Option<Vec<DeliveryStatus>>, String>> + Send;
}

/// One hop of the test and how it went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// The hops in order; the test passed when every one did. `send_attempt_result` is Apple's verdict on
/// reaching us, when it gave one.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub hops: Vec<Hop>,
    pub send_attempt_result: Option<String>,
}

impl Report {
    pub fn passed(&self) -> bool {
        !self.hops.is_empty() && self.hops.iter().all(|hop| hop.ok)
    }

    fn hop(&mut self, name: impl Into<String>, ok: bool, detail: impl Into<String>) {
        self.hops.push(Hop { name: name.into(), ok, detail: detail.into() });
    }

    /// One line per hop, as `apple test` prints them.
    pub fn lines(&self) -> String {
        self.hops
            .iter()
            .map(|hop| format!("{:<4} {:<32} {}\n", if hop.ok { "ok" } else { "FAIL" }, hop.name, hop.detail))
            .collect()
    }
}

/// Runs the test within `timeout`. `destinations` says which destinations a notification goes to (their
/// `match`).
pub async fn run(
    api: &AppleApi,
    lookup: &impl Lookup,
    destinations: impl Fn(&Notification) -> Vec<String>,
    timeout: Duration,
) -> Report {
    let deadline = Instant::now() + timeout;
    let mut report = Report::default();
    let token = match api.request_test_notification().await {
        Ok(token) => token,
        Err(error) => {
            report.hop("Apple: test notification", false, error.to_string());
            return report;
        }
    };
    report.hop("Apple: test notification", true, "requested");

    // Apple's send attempt.
    let item: HistoryItem = loop {
        match api.test_notification_status(&token).await {
            Ok(status) => {
                if let Some(item) = status.item.filter(|item| !item.attempts.is_empty()) {
                    break item;
                }
            }
            // Apple answers 404 until the test notification has been sent.
            Err(crate::apple_api::ApiError::Refused { status: 404, .. }) => {}
            Err(error) => {
                report.hop("Apple -> us", false, error.to_string());
                return report;
            }
        }
        if Instant::now() >= deadline {
            report.hop("Apple -> us", false, format!("Apple reported no send attempt within {timeout:?}"));
            return report;
        }
        tokio::time::sleep(POLL).await;
    };
    let result = item.attempts.last().map(|a| a.send_attempt_result.clone()).unwrap_or_default();
    report.send_attempt_result = Some(result.clone());
    match send_attempt_advice(&result) {
        None => report.hop("Apple -> us", true, format!("sendAttemptResult {result}")),
        Some(advice) => {
            report.hop("Apple -> us", false, format!("sendAttemptResult {result}: {advice}"));
            return report;
        }
    }

    // Stored, then each destination.
    let notification = &item.notification;
    let uuid = notification.uuid.clone().unwrap_or_else(|| "-".to_string());
    let expected = destinations(notification);
    let key = notification.dedupe_key.clone();
    let mut last = None;
    loop {
        match lookup.deliveries_of(&key).await {
            Ok(Some(deliveries)) => {
                let done = expected
                    .iter()
                    .all(|name| deliveries.iter().any(|d| &d.destination == name && d.state != DeliveryState::Pending));
                last = Some(deliveries);
                if done {
                    break;
                }
            }
            Ok(None) => {}
            Err(error) => {
                report.hop("stored", false, error);
                return report;
            }
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    let Some(deliveries) = last else {
        report.hop(
            "stored",
            false,
            format!(
                "TEST {uuid} is not in the spool although Apple reached us: check the sidecar's log (verification? another route's URL?)"
            ),
        );
        return report;
    };
    report.hop("stored", true, format!("TEST {uuid}"));
    for name in expected {
        let hop = format!("destination {name}");
        match deliveries.iter().find(|d| d.destination == name) {
            Some(d) if d.state == DeliveryState::Delivered => {
                report.hop(hop, true, format!("delivered after {} attempt(s)", d.attempts))
            }
            Some(d) => report.hop(
                hop,
                false,
                format!(
                    "{} after {} attempt(s){}",
                    d.state,
                    d.attempts,
                    d.last_error.as_deref().map_or(String::new(), |e| format!(": {e}"))
                ),
            ),
            None => report.hop(hop, false, "not queued: its match admits the notification, the spool has no delivery"),
        }
    }
    report
}

/// The sidecar's own spool, from duplicate keys first seen since `since`.
struct SpoolLookup {
    spool: Spool,
    since: i64,
}

impl Lookup for SpoolLookup {
    async fn deliveries_of(&self, key: &str) -> Result<Option<Vec<DeliveryStatus>>, String> {
        self.spool.deliveries_of_key(key.to_string(), self.since).await.map_err(|e| e.to_string())
    }
}

/// Runs the self test on `selfTest.interval` until `stop`, one replica of a shared queue at a time. Each
/// run reads the config in force.
pub async fn run_periodically(
    config: watch::Receiver<Arc<RuntimeConfig>>,
    spool: Spool,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    // The first soon after start (a minute, or the interval if shorter): a broken ingress shows at once.
    let interval = config.borrow().file.self_test.as_ref().map(|t| t.interval.get());
    let mut wait = interval.map_or(Duration::from_secs(60), |i| i.min(Duration::from_secs(60)));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let runtime = config.borrow().clone();
        let (Some(settings), Some(self_test)) = (&runtime.file.app_store_server_api, &runtime.file.self_test) else {
            wait = Duration::from_secs(60);
            continue;
        };
        wait = self_test.interval.get();
        let exclusive = match spool.exclusive("self-test").await {
            Ok(Some(exclusive)) => exclusive,
            Ok(None) => {
                metrics.count_self_test("skipped", None);
                continue;
            }
            Err(error) => {
                metrics.count_self_test("failure", None);
                tracing::error!(%error, "self test: cannot take its turn on the spool");
                continue;
            }
        };
        let api = match AppleApi::new(settings, &metrics) {
            Ok(api) => api,
            Err(error) => {
                metrics.count_self_test("failure", None);
                tracing::error!(%error, "self test cannot run");
                continue;
            }
        };
        let since = runtime.file.dedupe_since(crate::clock::now_ms()).unwrap_or(i64::MAX);
        let lookup = SpoolLookup { spool: spool.clone(), since };
        let report = run(&api, &lookup, |n| runtime.destinations_for(n), self_test.timeout.get()).await;
        drop(exclusive);
        let result = if report.passed() { "success" } else { "failure" };
        metrics.count_self_test(result, report.send_attempt_result.as_deref());
        for hop in &report.hops {
            if hop.ok {
                tracing::info!(hop = %hop.name, detail = %hop.detail, "self test");
            } else {
                tracing::error!(hop = %hop.name, detail = %hop.detail, "self test failed");
            }
        }
    }
}
