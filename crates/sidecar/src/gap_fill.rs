//! Gap-fill: what Apple's notification history holds and the spool does not (every pod down past
//! Apple's retries, a pod-local spool deleted with its pod, a notification Apple gave up on) is
//! replayed through the sidecar's own front door, so it takes the normal path: verification, the spool,
//! the app (marked with [`REPLAY_HEADER`]), every destination. A replay is recognised by its
//! `notificationUUID`, the same duplicate key as Apple's own retries, so nothing is stored twice.
//!
//! `storerelay-sidecar apple replay` does one run by hand; with `gapFill` in the config the sidecar
//! runs [`run`] on its interval, one replica of a shared queue at a time.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use storerelay_config::{GapFillScope, SidecarConfig};
use storerelay_runtime::CancellationToken;
use tokio::sync::watch;

use crate::apple_api::{AppleApi, HistoryItem};
use crate::config::RuntimeConfig;
use crate::metrics::Metrics;
use crate::outbound;
use crate::spool::{Spool, SpoolBackend};

/// Marks a replayed notification for the app: `history`. Destinations get the body alone, as always.
pub const REPLAY_HEADER: &str = "x-storerelay-replay";

/// The duplicate keys of `items`: what the spool is asked about.
pub fn keys(items: &[HistoryItem]) -> Vec<String> {
    items.iter().map(|item| item.notification.dedupe_key.clone()).collect()
}

/// The items whose keys the spool has not seen, each once, oldest first as Apple lists them.
pub fn missing<'a>(items: &'a [HistoryItem], seen: &HashSet<String>) -> Vec<&'a HistoryItem> {
    let mut taken = HashSet::new();
    items
        .iter()
        .filter(|item| !seen.contains(&item.notification.dedupe_key))
        .filter(|item| taken.insert(item.notification.dedupe_key.as_str()))
        .collect()
}

/// Where a replay is posted: the sidecar's own listener (on loopback when it listens on every
/// address) and its first notification path.
pub fn replay_url(listen: SocketAddr, config: &SidecarConfig) -> String {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let path = config.paths.first().map_or("/", String::as_str);
    format!("http://{}{path}", SocketAddr::new(ip, listen.port()))
}

/// Posts replays to the sidecar's own listener ([`replay_url`]), allowing each the app's time to answer
/// and `ackTimeout`.
pub struct Replayer {
    http: outbound::Client,
    uri: http::Uri,
    timeout: Duration,
}

impl Replayer {
    pub fn new(listen: SocketAddr, config: &SidecarConfig) -> Result<Replayer, String> {
        let app_timeout = config.upstream.as_ref().map_or(Duration::from_secs(5), |u| u.timeout.get());
        let http =
            outbound::client(Duration::from_secs(2), 1).map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        // Our own address and a checked path: not a secret, and only unusable for a path that is no URI.
        let uri = http::Uri::try_from(replay_url(listen, config))
            .map_err(|e| format!("the notification path cannot be posted to: {e}"))?;
        Ok(Replayer { http, uri, timeout: app_timeout + config.ack_timeout.get() + Duration::from_secs(5) })
    }

    /// Posts Apple's body, byte for byte, to the sidecar's front door.
    pub async fn replay(&self, item: &HistoryItem) -> Replayed {
        let mut request = http::Request::new(Full::new(Bytes::from(item.body.clone())));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = self.uri.clone();
        let headers = request.headers_mut();
        headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
        headers.insert(REPLAY_HEADER, http::HeaderValue::from_static("history"));
        match outbound::exchange(&self.http, request, self.timeout).await {
            Ok((answer, _)) => Replayed::Answered(answer.status.as_u16()),
            Err(failure) => Replayed::Failed(failure.describe().to_string()),
        }
    }
}

/// How one replay went: the sidecar's answer (2xx: stored, and accepted by the app in proxy mode), or
/// why there was none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replayed {
    Answered(u16),
    Failed(String),
}

impl Replayed {
    pub fn stored(&self) -> bool {
        matches!(self, Replayed::Answered(status) if (200..300).contains(status))
    }
}

impl std::fmt::Display for Replayed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Replayed::Answered(status) if (200..300).contains(status) => write!(f, "replayed ({status})"),
            Replayed::Answered(status) => write!(f, "not replayed: the sidecar answered {status}"),
            Replayed::Failed(why) => write!(f, "not replayed: {why}"),
        }
    }
}

/// What one gap-fill run found and did.
#[derive(Debug, Default)]
pub struct RunReport {
    pub listed: usize,
    pub missing: usize,
    pub recovered: usize,
    pub failed: usize,
}

/// Runs gap-fill on `gapFill.interval` until `stop`: the first run soon after start (a restart is when
/// a gap is most likely), then one per interval. The config in force is read at each run, so a reload
/// changes the next run (and removing `gapFill` pauses it).
pub async fn run(
    config: watch::Receiver<Arc<RuntimeConfig>>,
    spool: Spool,
    listen: SocketAddr,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut wait = Duration::from_secs(5);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let file = config.borrow().file.clone();
        let Some(gap_fill) = file.gap_fill.clone() else {
            wait = Duration::from_secs(60);
            continue;
        };
        wait = gap_fill.interval.get();
        match run_once(&file, &spool, listen, &metrics).await {
            Ok(Some(report)) => {
                metrics.count_gap_fill("success", report.recovered);
                if report.missing > 0 {
                    tracing::warn!(
                        listed = report.listed,
                        missing = report.missing,
                        recovered = report.recovered,
                        failed = report.failed,
                        "gap-fill: replayed notifications from Apple's history that the spool lacked"
                    );
                } else {
                    tracing::info!(
                        listed = report.listed,
                        "gap-fill: the spool has every notification in Apple's history"
                    );
                }
            }
            Ok(None) => {
                metrics.count_gap_fill("skipped", 0);
                tracing::debug!("gap-fill: another replica of the queue is running it");
            }
            Err(error) => {
                metrics.count_gap_fill("error", 0);
                tracing::error!(%error, "gap-fill run failed; trying again next interval");
            }
        }
    }
}

/// One run, if this replica may run it now (`None`: another replica of the shared queue is).
pub async fn run_once(
    file: &SidecarConfig,
    spool: &Spool,
    listen: SocketAddr,
    metrics: &Metrics,
) -> Result<Option<RunReport>, String> {
    let (Some(settings), Some(gap_fill)) = (&file.app_store_server_api, &file.gap_fill) else {
        return Err("needs appStoreServerApi and gapFill".into());
    };
    let Some(_exclusive) = spool.exclusive("gap-fill").await.map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let api = AppleApi::new(settings, metrics).map_err(|e| e.to_string())?;
    let now = SystemTime::now();
    let since = now.checked_sub(gap_fill.lookback.get()).unwrap_or(UNIX_EPOCH);
    let items = api.history(since, now, gap_fill.scope == GapFillScope::Failures).await.map_err(|e| e.to_string())?;
    // gapFill is refused without dedupe (see its config rules), so there is always a window.
    let window_start = file.dedupe_since(crate::clock::now_ms()).unwrap_or(i64::MIN);
    let seen = spool.seen(keys(&items), window_start).await.map_err(|e| e.to_string())?;
    let missing = missing(&items, &seen);
    let replayer = Replayer::new(listen, file)?;
    let mut report = RunReport { listed: items.len(), missing: missing.len(), ..RunReport::default() };
    for item in missing {
        let outcome = replayer.replay(item).await;
        tracing::info!(uuid = item.notification.uuid.as_deref(), r#type = item.notification.notification_type.as_deref(),
            outcome = %outcome, "gap-fill: replay");
        if outcome.stored() {
            report.recovered += 1;
        } else {
            report.failed += 1;
        }
    }
    Ok(Some(report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apple::Notification;

    fn item(key: &str) -> HistoryItem {
        HistoryItem {
            body: Vec::new(),
            notification: Notification { dedupe_key: key.into(), ..Default::default() },
            attempts: Vec::new(),
        }
    }

    #[test]
    fn only_what_the_spool_has_not_seen_is_replayed_each_once_in_apples_order() {
        let items = [item("v2:a"), item("v2:b"), item("v2:c"), item("v2:b"), item("v2:d")];
        let seen: HashSet<String> = ["v2:a".to_string(), "v2:d".to_string()].into();
        let keys: Vec<&str> = missing(&items, &seen).iter().map(|i| i.notification.dedupe_key.as_str()).collect();
        assert_eq!(keys, ["v2:b", "v2:c"]);
        assert!(missing(&items, &super::keys(&items).into_iter().collect()).is_empty());
    }

    #[test]
    fn replays_go_to_the_sidecars_own_listener() {
        let config: SidecarConfig = serde_yaml::from_str("paths: [/apple/v2, /apple/v1]").unwrap();
        assert_eq!(replay_url("0.0.0.0:8089".parse().unwrap(), &config), "http://127.0.0.1:8089/apple/v2");
        assert_eq!(replay_url("[::]:8089".parse().unwrap(), &config), "http://[::1]:8089/apple/v2");
        assert_eq!(replay_url("10.1.2.3:9000".parse().unwrap(), &config), "http://10.1.2.3:9000/apple/v2");
    }

    #[test]
    fn only_an_answer_in_the_2xx_range_counts_as_recovered() {
        assert!(Replayed::Answered(200).stored());
        assert!(!Replayed::Answered(503).stored());
        assert!(!Replayed::Failed("connection refused".into()).stored());
        assert_eq!(Replayed::Answered(401).to_string(), "not replayed: the sidecar answered 401");
    }
}
