//! Apple's App Store Server API: the notification history, so what Apple sent can be set against what
//! the spool holds.
//!
//! `app-store-server-library` builds each request and signs its ES256 JWT with the in-app purchase key;
//! [`HttpTransport`] sends it on the sidecar's own HTTP client (one TLS stack), to `baseUrl` when one is set,
//! paced to Apple's rate limits, waiting out a `429`'s `Retry-After`. The key and the tokens never
//! appear in an error, a log line or printed output: errors say which request, Apple's status and code,
//! and what to check.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use app_store_server_library::api_client::transport::{Transport, TransportError};
use app_store_server_library::app_store_server_api_client::{AppStoreServerApiClient, AppStoreServerApiClientError};
use app_store_server_library::crypto::CryptoProvider;
use app_store_server_library::models::app_store_environment::Environment as LibraryEnvironment;
use app_store_server_library::models::notification_history_request::NotificationHistoryRequest;
use app_store_server_library::models::send_attempt_item::SendAttemptItem;
use bytes::Bytes;
use http_body_util::Full;
use storerelay_config::{ApiEnvironment, AppStoreServerApi};
use tokio::sync::Mutex;
use tokio::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::apple::{self, Notification};
use crate::metrics::{ApiRequest, Metrics};
use crate::outbound;
use crate::retry::parse_retry_after;

/// The most history pages one listing reads (20 notifications each): a bound, not a limit Apple sets.
const MAX_HISTORY_PAGES: usize = 10_000;
/// How often a request answered `429` is sent again before the `429` is the answer.
const MAX_RATE_LIMITED_RETRIES: u32 = 5;
/// The longest `Retry-After` waited out; a longer one is reported instead.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Why a call to Apple's API failed. Never carries the key, a token, or a response body.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("appStoreServerApi.privateKeyFile {}: cannot read it: {kind}", path.display())]
    KeyUnreadable { path: PathBuf, kind: std::io::ErrorKind },
    #[error(
        "appStoreServerApi.privateKeyFile {}: not an App Store Connect key (a PKCS#8 P-256 private key in PEM, the .p8 file as downloaded)",
        path.display()
    )]
    KeyInvalid { path: PathBuf },
    #[error("App Store Server API, {endpoint}: HTTP {status}{}: {advice}", code.map_or(String::new(), |c| format!(" (Apple's error {c})")))]
    Refused { endpoint: Endpoint, status: u16, code: Option<i64>, advice: &'static str },
    #[error("App Store Server API, {endpoint}: {message}")]
    Transport { endpoint: Endpoint, message: String },
    #[error("App Store Server API, {endpoint}: more than {MAX_HISTORY_PAGES} pages; narrow the window")]
    TooManyPages { endpoint: Endpoint },
}

impl ApiError {
    /// Apple's HTTP status, or `error` when no answer came: the `status` label of the request metric.
    pub fn status_label(&self) -> String {
        match self {
            ApiError::Refused { status, .. } => status.to_string(),
            _ => "error".to_string(),
        }
    }
}

/// The API's endpoints, as metrics and errors name them. Each has its own rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    NotificationHistory,
    TestNotification,
    Other,
}

impl Endpoint {
    /// Which endpoint a request path is.
    pub fn of_path(path: &str) -> Endpoint {
        if path.starts_with("/inApps/v1/notifications/history") {
            Endpoint::NotificationHistory
        } else if path.starts_with("/inApps/v1/notifications/test") {
            Endpoint::TestNotification
        } else {
            Endpoint::Other
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::NotificationHistory => "notification_history",
            Endpoint::TestNotification => "test_notification",
            Endpoint::Other => "other",
        }
    }

    /// The least time between two requests to this endpoint: Apple allows 50 history and 1 test request
    /// a second in production, a tenth of that in the sandbox.
    pub fn spacing(self, environment: ApiEnvironment) -> Duration {
        let per_second: f64 = match self {
            Endpoint::NotificationHistory | Endpoint::Other => 50.0,
            Endpoint::TestNotification => 1.0,
        };
        let per_second = if environment == ApiEnvironment::Sandbox { per_second / 10.0 } else { per_second };
        Duration::from_secs_f64(1.0 / per_second)
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to check when Apple refuses a request with `status`.
pub fn advice(status: u16) -> &'static str {
    match status {
        401 => {
            "Apple refused the credentials: check keyId and issuerId, that privateKeyFile is that key's .p8, \
             and that the key is an In-App Purchase key"
        }
        403 => "the key may not call this endpoint for this app: check bundleId and the key's access",
        404 => "nothing found: check bundleId and environment (Production or Sandbox)",
        429 => "rate limited by Apple past the retries: try again later, or less often",
        400 => "Apple rejected the request (a window past Apple's history retention, or a bad token)",
        500..=599 => "Apple's side failed; it is retried on the next run",
        _ => "unexpected answer",
    }
}

/// One delivery attempt Apple reports for a notification.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SendAttempt {
    /// Unix milliseconds.
    pub attempt_date: Option<i64>,
    /// Apple's `sendAttemptResult`, e.g. `SUCCESS`, `TIMED_OUT`, `TLS_ISSUE`.
    pub send_attempt_result: String,
}

impl SendAttempt {
    fn from_item(item: &SendAttemptItem) -> SendAttempt {
        let result = item.send_attempt_result.as_ref().map_or_else(
            || "UNKNOWN".to_string(),
            |r| serde_json::to_value(r).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(),
        );
        SendAttempt { attempt_date: item.attempt_date.map(|d| d.timestamp_millis()), send_attempt_result: result }
    }
}

/// A notification in Apple's history: the body Apple sent (`{"signedPayload": ...}`, as a live POST
/// carries it), what it decodes to, and Apple's attempts to send it.
#[derive(Debug, Clone)]
pub struct HistoryItem {
    pub body: Vec<u8>,
    pub notification: Notification,
    pub attempts: Vec<SendAttempt>,
}

impl HistoryItem {
    /// Apple's `signedPayload` as the body of a live POST, decoded, with Apple's attempts.
    fn new(signed_payload: String, attempts: Option<&[SendAttemptItem]>) -> HistoryItem {
        let body = serde_json::json!({ "signedPayload": signed_payload }).to_string().into_bytes();
        let notification = apple::decode(&body).unwrap_or_default();
        let attempts = attempts.unwrap_or_default().iter().map(SendAttempt::from_item).collect();
        HistoryItem { body, notification, attempts }
    }
}

/// A client of the App Store Server API for one key and app.
pub struct AppleApi {
    client: AppStoreServerApiClient<HttpTransport>,
    environment: ApiEnvironment,
}

impl AppleApi {
    /// Reads and checks the key (so a bad file is reported now, naming the key, not at the first
    /// request) and builds the client.
    pub fn new(config: &AppStoreServerApi, metrics: &Metrics) -> Result<AppleApi, ApiError> {
        let path = config.private_key_file.clone();
        let key = std::fs::read(&path).map_err(|e| ApiError::KeyUnreadable { path: path.clone(), kind: e.kind() })?;
        let pem = std::str::from_utf8(&key).map_err(|_| ApiError::KeyInvalid { path: path.clone() })?;
        if CryptoProvider::default_provider().p256_signing.private_key(pem).is_err() {
            return Err(ApiError::KeyInvalid { path });
        }
        let transport = HttpTransport::new(config, metrics.apple_api_requests.clone())?;
        let environment = match config.environment {
            ApiEnvironment::Production => LibraryEnvironment::Production,
            ApiEnvironment::Sandbox => LibraryEnvironment::Sandbox,
        };
        let client = AppStoreServerApiClient::new(
            key,
            &config.key_id,
            &config.issuer_id,
            &config.bundle_id,
            environment,
            transport,
        )
        .map_err(|e| ApiError::Transport { endpoint: Endpoint::Other, message: e.to_string() })?;
        Ok(AppleApi { client, environment: config.environment })
    }

    pub fn environment(&self) -> ApiEnvironment {
        self.environment
    }

    /// Every notification Apple sent (or tried to) between `since` and `until`, oldest page first;
    /// with `only_failures`, only those whose sends failed (Apple may still be retrying them).
    pub async fn history(
        &self,
        since: SystemTime,
        until: SystemTime,
        only_failures: bool,
    ) -> Result<Vec<HistoryItem>, ApiError> {
        let endpoint = Endpoint::NotificationHistory;
        let request = NotificationHistoryRequest {
            start_date: since.into(),
            end_date: until.into(),
            notification_type: None,
            notification_subtype: None,
            transaction_id: None,
            only_failures: only_failures.then_some(true),
        };
        let mut items = Vec::new();
        let mut token = String::new();
        for _ in 0..MAX_HISTORY_PAGES {
            let page =
                self.client.get_notification_history(&token, &request).await.map_err(|e| refused(endpoint, &e))?;
            for entry in page.notification_history.unwrap_or_default() {
                if let Some(signed_payload) = entry.signed_payload {
                    items.push(HistoryItem::new(signed_payload, entry.send_attempts.as_deref()));
                }
            }
            match page.pagination_token.filter(|t| !t.is_empty() && page.has_more == Some(true)) {
                Some(next) => token = next,
                None => return Ok(items),
            }
        }
        Err(ApiError::TooManyPages { endpoint })
    }
}

/// What Apple reports of a test notification it was asked to send.
#[derive(Debug, Clone)]
pub struct TestNotificationStatus {
    /// The TEST notification, as Apple sent it; `None` before Apple has one.
    pub item: Option<HistoryItem>,
}

impl AppleApi {
    /// Asks Apple to send a TEST notification to the app's notification URL; returns the token to ask
    /// after it with.
    pub async fn request_test_notification(&self) -> Result<String, ApiError> {
        let endpoint = Endpoint::TestNotification;
        let answer = self.client.request_test_notification().await.map_err(|e| refused(endpoint, &e))?;
        answer.test_notification_token.filter(|t| !t.is_empty()).ok_or_else(|| ApiError::Transport {
            endpoint,
            message: "Apple answered without a test notification token".into(),
        })
    }

    /// Apple's record of the test notification `token` names: the notification and its send attempts
    /// (none yet while Apple has not tried).
    pub async fn test_notification_status(&self, token: &str) -> Result<TestNotificationStatus, ApiError> {
        let endpoint = Endpoint::TestNotification;
        let answer = self.client.get_test_notification_status(token).await.map_err(|e| refused(endpoint, &e))?;
        let item = answer.signed_payload.map(|payload| HistoryItem::new(payload, answer.send_attempts.as_deref()));
        Ok(TestNotificationStatus { item })
    }
}

/// What to check when Apple's attempt to send a notification ended with `result` (its
/// `sendAttemptResult`); `None` for `SUCCESS`.
pub fn send_attempt_advice(result: &str) -> Option<&'static str> {
    Some(match result {
        "SUCCESS" => return None,
        "TIMED_OUT" => {
            "Apple gave up waiting for our answer: check upstream.timeout and the app's speed (or use ack: spooled), and any ingress or load-balancer timeout in front of the sidecar"
        }
        "TLS_ISSUE" => {
            "Apple could not complete TLS with the notification URL: check that the ingress serves a complete, trusted, unexpired certificate chain for that host, over TLS 1.2 or later"
        }
        "CIRCULAR_REDIRECT" => "the notification URL redirects in a loop: give Apple the final URL",
        "NO_RESPONSE" => {
            "Apple got no response: check that the URL's host resolves publicly and that the ingress routes to the sidecar's port"
        }
        "SOCKET_ISSUE" => {
            "Apple could not connect: check DNS, firewalls and that the ingress is reachable from the internet"
        }
        "UNSUPPORTED_CHARSET" => "our answer's charset is one Apple does not support: answer in UTF-8",
        "INVALID_RESPONSE" => "Apple could not read our answer: check the app's response (or use ack: spooled)",
        "PREMATURE_CLOSE" => {
            "the connection closed before the answer was complete: check proxy timeouts and body-size limits in front of the sidecar"
        }
        "UNSUCCESSFUL_HTTP_RESPONSE_CODE" => {
            "we answered with a status other than 2xx: check the sidecar's log for this notification (verification, spool unavailable) and the app's answer"
        }
        _ => "Apple reports another failure: check the ingress and the sidecar's log",
    })
}

/// An error of the library as ours. Apple's refusals carry a status (and, with a JSON error body, a
/// code); failures on the way carry a message the library or [`HttpTransport`] wrote (a network error
/// without its URL, a timeout, a response that is not JSON), never a token.
fn refused(endpoint: Endpoint, error: &AppStoreServerApiClientError) -> ApiError {
    match (error.raw_code(), error.message()) {
        (None, Some(message)) => ApiError::Transport { endpoint, message: message.to_string() },
        (code, _) => ApiError::Refused { endpoint, status: error.status(), code, advice: advice(error.status()) },
    }
}

/// Sends the library's requests with the sidecar's own client ([`outbound`]).
pub struct HttpTransport {
    http: outbound::Client,
    /// For each request, from the first byte sent to the last byte of the answer.
    timeout: Duration,
    /// `baseUrl` without a trailing `/`, replacing Apple's host; `None`: the library's URL as built.
    base_url: Option<String>,
    environment: ApiEnvironment,
    /// When each endpoint may next be called.
    next_slot: Mutex<std::collections::HashMap<Endpoint, Instant>>,
    requests: Family<ApiRequest, Counter>,
}

impl HttpTransport {
    /// Counts each request in `requests` by endpoint and status.
    pub fn new(config: &AppStoreServerApi, requests: Family<ApiRequest, Counter>) -> Result<HttpTransport, ApiError> {
        let timeout = config.timeout.get();
        let http = outbound::client(timeout.min(Duration::from_secs(5)), 1)
            .map_err(|e| ApiError::Transport { endpoint: Endpoint::Other, message: e.to_string() })?;
        Ok(HttpTransport {
            http,
            timeout,
            base_url: config.base_url.as_deref().map(|u| u.trim_end_matches('/').to_string()),
            environment: config.environment,
            next_slot: Mutex::default(),
            requests,
        })
    }

    fn count(&self, endpoint: Endpoint, status: &str) {
        self.requests.get_or_create(&ApiRequest { endpoint: endpoint.as_str(), status: status.to_string() }).inc();
    }

    /// Waits until `endpoint` may be called again, and books the next slot.
    async fn pace(&self, endpoint: Endpoint) {
        let start = {
            let mut slots = self.next_slot.lock().await;
            let now = Instant::now();
            let start = slots.get(&endpoint).copied().unwrap_or(now).max(now);
            slots.insert(endpoint, start + endpoint.spacing(self.environment));
            start
        };
        tokio::time::sleep_until(start).await;
    }
}

impl Transport for HttpTransport {
    async fn send(&self, request: http::Request<Vec<u8>>) -> Result<http::Response<Vec<u8>>, TransportError> {
        let (parts, body) = request.into_parts();
        let endpoint = Endpoint::of_path(parts.uri.path());
        let uri = match &self.base_url {
            None => parts.uri.clone(),
            // `baseUrl` is checked at load; the message holds the parser's reason, not the URL.
            Some(base) => {
                let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                http::Uri::try_from(format!("{base}{path_and_query}"))
                    .map_err(|e| TransportError::NetworkError(format!("not a valid request URI: {e}")))?
            }
        };
        let body = Bytes::from(body);
        let mut rate_limited = 0;
        loop {
            self.pace(endpoint).await;
            let mut request = http::Request::new(Full::new(body.clone()));
            *request.method_mut() = parts.method.clone();
            *request.uri_mut() = uri.clone();
            *request.headers_mut() = parts.headers.clone();
            let (answer, bytes) = outbound::exchange(&self.http, request, self.timeout)
                .await
                .inspect(|(answer, _)| self.count(endpoint, answer.status.as_str()))
                .map_err(|failure| {
                    self.count(endpoint, "error");
                    match failure {
                        outbound::Failure::Timeout => TransportError::Timeout,
                        failure => TransportError::NetworkError(failure.describe().to_string()),
                    }
                })?;
            if answer.status == http::StatusCode::TOO_MANY_REQUESTS && rate_limited < MAX_RATE_LIMITED_RETRIES {
                let wait = answer
                    .headers
                    .get(http::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, SystemTime::now()))
                    .unwrap_or(Duration::from_secs(1 << rate_limited));
                if wait <= MAX_RETRY_AFTER {
                    rate_limited += 1;
                    tracing::warn!(endpoint = endpoint.as_str(), wait = ?wait, "App Store Server API rate limit: waiting as Apple asks");
                    tokio::time::sleep(wait).await;
                    continue;
                }
            }
            return Ok(http::Response::from_parts(answer, bytes.to_vec()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_told_apart_by_path_and_paced_to_apples_limits() {
        assert_eq!(Endpoint::of_path("/inApps/v1/notifications/history"), Endpoint::NotificationHistory);
        assert_eq!(Endpoint::of_path("/inApps/v1/notifications/test/abc"), Endpoint::TestNotification);
        assert_eq!(Endpoint::of_path("/inApps/v1/notifications/test"), Endpoint::TestNotification);
        assert_eq!(Endpoint::of_path("/inApps/v1/history/1"), Endpoint::Other);
        assert_eq!(Endpoint::NotificationHistory.spacing(ApiEnvironment::Production), Duration::from_millis(20));
        assert_eq!(Endpoint::NotificationHistory.spacing(ApiEnvironment::Sandbox), Duration::from_millis(200));
        assert_eq!(Endpoint::TestNotification.spacing(ApiEnvironment::Production), Duration::from_secs(1));
        assert_eq!(Endpoint::TestNotification.spacing(ApiEnvironment::Sandbox), Duration::from_secs(10));
    }

    #[test]
    fn every_failed_send_attempt_says_what_to_check() {
        assert_eq!(send_attempt_advice("SUCCESS"), None);
        for result in ["TIMED_OUT", "TLS_ISSUE", "NO_RESPONSE", "UNSUCCESSFUL_HTTP_RESPONSE_CODE", "SOMETHING_NEW"] {
            assert!(send_attempt_advice(result).is_some_and(|a| a.contains("check")), "{result}");
        }
        assert!(send_attempt_advice("TLS_ISSUE").unwrap().contains("certificate"));
    }

    #[test]
    fn refusals_name_the_status_and_what_to_check_never_a_body() {
        let error =
            ApiError::Refused { endpoint: Endpoint::NotificationHistory, status: 401, code: None, advice: advice(401) };
        let text = error.to_string();
        assert!(text.contains("notification_history") && text.contains("HTTP 401") && text.contains("keyId"), "{text}");
        assert_eq!(error.status_label(), "401");
    }
}
