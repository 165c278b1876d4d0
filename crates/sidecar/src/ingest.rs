//! Receiving: Apple's POST is stored byte-exact in the spool before anything is acknowledged, and,
//! in proxy mode, passed to the app whose answer goes back to Apple.
//!
//! Every refusal is a status Apple retries (5xx) unless the request itself is wrong (404, 405, 413):
//! a 4xx for a transient problem could make Apple give up on a notification.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use storerelay_config::{AckMode, Limits, UnknownBodies, VerifyMode};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::apple::{self, Notification};
use crate::clock::now_ms;
use crate::config::RuntimeConfig;
use crate::delivery::Waiters;
use crate::metrics::Metrics;
use crate::outbound::{self, AppTarget};
use crate::spool::{DeliveryCounts, NewNotification, Spool, SpoolBackend};
use crate::verify::Reason;

/// What the ingest handler needs.
pub struct IngestState {
    pub spool: Spool,
    pub metrics: Arc<Metrics>,
    pub config: watch::Receiver<Arc<RuntimeConfig>>,
    pub waiters: Arc<Waiters>,
    /// Requests being handled; sized by `limits.maxConcurrentRequests`.
    pub permits: Arc<Semaphore>,
    /// Body bytes held by requests being handled (`limits.maxBufferedBytes`).
    pub body_budget: Arc<BodyBudget>,
    /// The client for the app container: no redirects, no proxy, timeouts per request.
    pub upstream: outbound::Client,
}

pub fn router(state: Arc<IngestState>) -> Router {
    Router::new().fallback(receive).with_state(state)
}

pub fn upstream_client() -> Result<outbound::Client, rustls::Error> {
    outbound::client(Duration::from_secs(2), usize::MAX)
}

fn json(status: StatusCode, body: &'static str) -> Response {
    (status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response()
}

fn refuse(metrics: &Metrics, reason: &'static str, status: StatusCode, body: &'static str) -> Response {
    metrics.reject(reason);
    let mut response = json(status, body);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

async fn receive(State(state): State<Arc<IngestState>>, request: Request) -> Response {
    let config = state.config.borrow().clone();
    let path = request.uri().path().to_string();
    if !config.file.paths.contains(&path) {
        return json(StatusCode::NOT_FOUND, r#"{"error":"not found"}"#);
    }
    if request.method() != Method::POST {
        let mut response = json(StatusCode::METHOD_NOT_ALLOWED, r#"{"error":"method not allowed"}"#);
        response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
        return response;
    }
    let Ok(_permit) = state.permits.clone().try_acquire_owned() else {
        return refuse(&state.metrics, "overloaded", StatusCode::SERVICE_UNAVAILABLE, r#"{"error":"busy, retry"}"#);
    };
    let (parts, body) = request.into_parts();
    let buffered = match read_body(&state.metrics, &config.file.limits, &state.body_budget, &parts.headers, body).await
    {
        Ok(buffered) => buffered,
        Err(refusal) => return refusal,
    };
    let body = buffered.bytes.clone();
    let notification = match admit(&state.metrics, &config, &body) {
        Ok(notification) => notification,
        Err(refusal) => return refusal,
    };

    let ack = config.file.effective_ack();
    let destinations = config.destinations_for(&notification);
    if destinations.is_empty() {
        state.metrics.unrouted.inc();
    }
    let store = state.spool.insert(NewNotification {
        path: path.clone(),
        body: body.clone(),
        destinations: destinations.clone(),
        dedupe: config.file.dedupe_since(now_ms()).map(|since| (notification.dedupe_key.clone(), since)),
    });
    let (stored, app_answer) = match &config.file.upstream {
        Some(upstream) => {
            let forward = forward(&state, config.app.as_ref(), upstream.timeout.get(), &parts, body.clone());
            let (stored, answer) = tokio::join!(store, forward);
            (stored, Some(answer))
        }
        None => (store.await, None),
    };

    let stored = match stored {
        Ok(stored) => stored,
        Err(error) => {
            // Not durable, so not acknowledged: Apple retries and the app's copy (if any) is a duplicate
            // it already has to tolerate, since Apple retries on its own too.
            tracing::error!(path = %path, bytes = body.len(), %error, "notification not stored; answering 503");
            let message = if error.is_full() {
                r#"{"error":"spool full, retry"}"#
            } else {
                r#"{"error":"spool unavailable, retry"}"#
            };
            return refuse(&state.metrics, error.reason(), StatusCode::SERVICE_UNAVAILABLE, message);
        }
    };
    state.metrics.count_received(&notification, stored.duplicate);

    // Stored (and passed on): the spool and the app have their copies, so this request's share of the
    // buffer budget goes back before a possibly long wait for delivery.
    let bytes = body.len();
    drop((body, buffered));
    let app_status = app_answer.as_ref().map(Response::status);
    let mut decision = acknowledgement(ack, app_status, None);
    if decision == Ack::AwaitDelivery {
        let delivered = wait_for_delivery(&state, stored.notification_id, config.file.ack_timeout.get()).await;
        decision = acknowledgement(ack, app_status, Some(delivered));
    }
    let response = match (decision, app_answer) {
        (Ack::AppAnswer, Some(answer)) => answer,
        (Ack::NotDelivered, _) => {
            let mut response = json(StatusCode::SERVICE_UNAVAILABLE, r#"{"error":"not yet delivered, retry"}"#);
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            response
        }
        _ => json(StatusCode::OK, "{}"),
    };
    tracing::info!(
        notification = stored.notification_id,
        duplicate = stored.duplicate,
        path = %path,
        bytes,
        version = notification.version_label(),
        r#type = notification.notification_type.as_deref(),
        subtype = notification.subtype.as_deref(),
        uuid = notification.uuid.as_deref(),
        environment = notification.environment_label(),
        bundle = notification.bundle_id.as_deref(),
        destinations = ?destinations,
        ack = %ack,
        status = response.status().as_u16(),
        "notification received"
    );
    response
}

/// What Apple is answered for a stored notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// The app's own answer, passed through.
    AppAnswer,
    /// 200 `{}` from the sidecar.
    Stored,
    /// `ack: delivered` and it is not known yet whether every destination has it: wait (up to
    /// `ackTimeout`), then decide again with the result.
    AwaitDelivery,
    /// 503 with `Retry-After`: not delivered in time, or a destination gave up on it.
    NotDelivered,
}

/// The acknowledgement rules, as a pure function of the ack mode, the app's status (proxy mode) and,
/// for `ack: delivered`, whether every destination got it. Called only once the body is stored: a
/// body the spool did not take is a 503 whatever the app said, so Apple's retry brings it again.
pub fn acknowledgement(ack: AckMode, app_status: Option<StatusCode>, delivered: Option<bool>) -> Ack {
    match (ack, app_status) {
        (AckMode::Upstream, Some(_)) => Ack::AppAnswer,
        // The app refused: its answer stands, whatever the destinations do.
        (AckMode::Delivered, Some(status)) if !status.is_success() => Ack::AppAnswer,
        (AckMode::Delivered, app_status) => match delivered {
            None => Ack::AwaitDelivery,
            Some(false) => Ack::NotDelivered,
            Some(true) if app_status.is_some() => Ack::AppAnswer,
            Some(true) => Ack::Stored,
        },
        (AckMode::Spooled, _) | (AckMode::Upstream, None) => Ack::Stored,
    }
}

/// A body read in full, and its share of `limits.maxBufferedBytes`, given back when this is dropped.
pub struct BufferedBody {
    pub bytes: Bytes,
    _share: BudgetShare,
}

/// Reads the body within `maxBodyBytes`, `bodyTimeout` and what is left of `maxBufferedBytes`, never
/// buffering past a limit. The declared length is reserved before the first byte is read (Apple always
/// sends one); a body without one reserves as its chunks arrive.
async fn read_body(
    metrics: &Metrics,
    limits: &Limits,
    budget: &BodyBudget,
    headers: &HeaderMap,
    body: Body,
) -> Result<BufferedBody, Response> {
    let max_body = limits.max_body_bytes.get();
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max_body) {
        return Err(too_large(metrics));
    }
    let mut share = BudgetShare::default();
    let declared = declared.map_or(0, |n| n as usize);
    if !share.grow_to(budget, declared) {
        return Err(buffers_full(metrics));
    }
    let read = async {
        let mut bytes = BytesMut::with_capacity(declared);
        let mut body = body;
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.map(|frame| frame.into_data()) else {
                return Err(refuse(metrics, "body_error", StatusCode::BAD_REQUEST, r#"{"error":"incomplete body"}"#));
            };
            let Ok(data) = data else { continue }; // trailers
            let total = bytes.len() + data.len();
            if total as u64 > max_body {
                return Err(too_large(metrics));
            }
            if !share.grow_to(budget, total) {
                return Err(buffers_full(metrics));
            }
            bytes.extend_from_slice(&data);
        }
        Ok(bytes.freeze())
    };
    match tokio::time::timeout(limits.body_timeout.get(), read).await {
        Ok(Ok(bytes)) => Ok(BufferedBody { bytes, _share: share }),
        Ok(Err(refusal)) => Err(refusal),
        Err(_) => {
            let mut response =
                refuse(metrics, "body_timeout", StatusCode::REQUEST_TIMEOUT, r#"{"error":"body too slow"}"#);
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            Err(response)
        }
    }
}

/// `limits.maxBufferedBytes`: the body bytes all requests being handled may hold together, one
/// semaphore permit per byte, so what a request holds is given back however it ends.
pub struct BodyBudget {
    bytes: Arc<Semaphore>,
    max: usize,
}

impl BodyBudget {
    pub fn new(max_bytes: u64) -> BodyBudget {
        let max = usize::try_from(max_bytes).unwrap_or(usize::MAX).min(Semaphore::MAX_PERMITS);
        BodyBudget { bytes: Arc::new(Semaphore::new(max)), max }
    }

    /// Bytes held by requests now.
    pub fn in_use(&self) -> u64 {
        self.max.saturating_sub(self.bytes.available_permits()) as u64
    }

    pub fn max(&self) -> u64 {
        self.max as u64
    }
}

/// The bytes of the budget one request holds, grown as its body arrives.
#[derive(Default)]
struct BudgetShare {
    permit: Option<OwnedSemaphorePermit>,
}

impl BudgetShare {
    /// Holds at least `bytes` of the budget; `false` when the budget does not have them now.
    fn grow_to(&mut self, budget: &BodyBudget, bytes: usize) -> bool {
        let held = self.permit.as_ref().map_or(0, OwnedSemaphorePermit::num_permits);
        if bytes <= held {
            return true;
        }
        let Ok(more) = u32::try_from(bytes - held) else { return false };
        match budget.bytes.clone().try_acquire_many_owned(more) {
            Ok(more) => {
                match &mut self.permit {
                    Some(permit) => permit.merge(more),
                    None => self.permit = Some(more),
                }
                true
            }
            Err(_) => false,
        }
    }
}

fn buffers_full(metrics: &Metrics) -> Response {
    let mut response = refuse(metrics, "buffers_full", StatusCode::SERVICE_UNAVAILABLE, r#"{"error":"busy, retry"}"#);
    // Whatever of the body is unread stays unread, so the connection cannot be reused.
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Decodes and verifies a body. In `enforce` mode a failure is a 401 and the notification goes nowhere;
/// in `log` mode it is logged and counted and goes on.
// A handler step's refusal is the response itself; boxing it would only add an allocation per refusal.
#[allow(clippy::result_large_err)]
fn admit(metrics: &Metrics, config: &RuntimeConfig, body: &[u8]) -> Result<Notification, Response> {
    let notification = match apple::decode(body) {
        Ok(notification) => notification,
        Err(_) => return Err(refuse(metrics, "not_json", StatusCode::BAD_REQUEST, r#"{"error":"body is not JSON"}"#)),
    };
    let mode = config.verifier.mode;
    if notification.version.is_none() && mode != VerifyMode::Enforce {
        if config.file.unknown_bodies == UnknownBodies::Reject {
            return Err(refuse(
                metrics,
                "unknown_body",
                StatusCode::BAD_REQUEST,
                r#"{"error":"not an App Store notification"}"#,
            ));
        }
        metrics.unknown_bodies.inc();
        return Ok(notification);
    }
    if mode == VerifyMode::Off {
        return Ok(notification);
    }
    match config.verifier.check(&notification, body) {
        Ok(()) => Ok(notification),
        // Our own files are missing: not the sender's fault, so never a 4xx. Apple retries the 503.
        Err(Reason::Unavailable) if mode == VerifyMode::Enforce => {
            tracing::error!(
                version = notification.version_label(),
                uuid = notification.uuid.as_deref(),
                problems = ?config.problems(),
                "notification not verifiable: verification files are missing; answering 503"
            );
            Err(refuse(
                metrics,
                Reason::Unavailable.as_str(),
                StatusCode::SERVICE_UNAVAILABLE,
                r#"{"error":"verification unavailable, retry"}"#,
            ))
        }
        Err(reason) => {
            metrics.reject(reason.as_str());
            let enforce = mode == VerifyMode::Enforce;
            tracing::warn!(
                reason = reason.as_str(),
                version = notification.version_label(),
                uuid = notification.uuid.as_deref(),
                bundle = notification.bundle_id.as_deref(),
                mode = if enforce { "enforce" } else { "log" },
                "notification failed verification; {}",
                if enforce { "answering 401" } else { "accepted" }
            );
            if !enforce {
                return Ok(notification);
            }
            let body = format!(r#"{{"error":"verification failed","reason":"{}"}}"#, reason.as_str());
            Err((StatusCode::UNAUTHORIZED, [(header::CONTENT_TYPE, "application/json")], body).into_response())
        }
    }
}

fn too_large(metrics: &Metrics) -> Response {
    let mut response = refuse(metrics, "too_large", StatusCode::PAYLOAD_TOO_LARGE, r#"{"error":"body too large"}"#);
    // The rest of the body is never read, so the connection cannot be reused.
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Waits until every destination has the notification (true), or one gave up on it or the time ran
/// out (false). Delivery goes on in the background either way.
async fn wait_for_delivery(state: &IngestState, notification_id: i64, within: Duration) -> bool {
    let notify = state.waiters.register(notification_id);
    let deadline = tokio::time::Instant::now() + within;
    let outcome = loop {
        let finished = notify.notified();
        tokio::pin!(finished);
        finished.as_mut().enable();
        match state.spool.delivery_counts(notification_id).await {
            Ok(DeliveryCounts { pending: 0, dead: 0, .. }) => break true,
            Ok(DeliveryCounts { dead, .. }) if dead > 0 => break false,
            Ok(_) => {}
            Err(_) => break false,
        }
        if tokio::time::timeout_at(deadline, finished).await.is_err() {
            break false;
        }
    };
    state.waiters.release(notification_id);
    outcome
}

/// Hop-by-hop headers (RFC 9110 section 7.6.1) and those the client recomputes.
fn is_end_to_end(name: &HeaderName) -> bool {
    !matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

/// Passes the request to the app and its answer back. The app unreachable or too slow is a 503, never
/// a 4xx.
async fn forward(
    state: &IngestState,
    app: Option<&AppTarget>,
    timeout: Duration,
    received: &axum::http::request::Parts,
    body: Bytes,
) -> Response {
    let unavailable = |code: &'static str| {
        state.metrics.count_upstream(code);
        tracing::warn!(upstream = code, "app did not answer; answering 503");
        json(StatusCode::SERVICE_UNAVAILABLE, r#"{"error":"app unavailable, retry"}"#)
    };
    let Some(uri) = app.and_then(|app| app.uri(received.uri.path_and_query()).ok()) else {
        return unavailable("unreachable");
    };
    let mut request = axum::http::Request::new(Full::new(body));
    *request.method_mut() = received.method.clone();
    *request.uri_mut() = uri;
    let headers = request.headers_mut();
    for (name, value) in received.headers.iter().filter(|(name, _)| is_end_to_end(name)) {
        headers.append(name.clone(), value.clone());
    }
    let (answer, bytes) = match outbound::exchange(&state.upstream, request, timeout).await {
        Ok(answer) => answer,
        Err(outbound::Failure::Timeout) => return unavailable("timeout"),
        // Refused, reset, or an answer cut short: Apple's retry brings the notification again.
        Err(outbound::Failure::Failed(_)) => return unavailable("unreachable"),
    };
    state.metrics.count_upstream(answer.status.as_str());
    let mut response = Response::new(Body::from(bytes));
    *response.status_mut() = answer.status;
    let headers = response.headers_mut();
    for (name, value) in answer.headers.iter().filter(|(name, _)| is_end_to_end(name)) {
        headers.append(name.clone(), value.clone());
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: Option<StatusCode> = Some(StatusCode::OK);
    const REFUSED: Option<StatusCode> = Some(StatusCode::BAD_REQUEST);
    const DOWN: Option<StatusCode> = Some(StatusCode::SERVICE_UNAVAILABLE);

    #[test]
    fn upstream_and_spooled_answer_without_waiting() {
        for app in [OK, REFUSED, DOWN] {
            assert_eq!(acknowledgement(AckMode::Upstream, app, None), Ack::AppAnswer, "{app:?}");
            assert_eq!(acknowledgement(AckMode::Spooled, app, None), Ack::Stored, "{app:?}");
        }
        assert_eq!(acknowledgement(AckMode::Spooled, None, None), Ack::Stored);
        assert_eq!(acknowledgement(AckMode::Upstream, None, None), Ack::Stored);
    }

    #[test]
    fn delivered_waits_unless_the_app_refused() {
        assert_eq!(acknowledgement(AckMode::Delivered, REFUSED, None), Ack::AppAnswer);
        assert_eq!(acknowledgement(AckMode::Delivered, DOWN, None), Ack::AppAnswer);
        assert_eq!(acknowledgement(AckMode::Delivered, OK, None), Ack::AwaitDelivery);
        assert_eq!(acknowledgement(AckMode::Delivered, None, None), Ack::AwaitDelivery);
    }

    #[test]
    fn delivered_answers_from_the_outcome() {
        assert_eq!(acknowledgement(AckMode::Delivered, OK, Some(true)), Ack::AppAnswer);
        assert_eq!(acknowledgement(AckMode::Delivered, None, Some(true)), Ack::Stored);
        assert_eq!(acknowledgement(AckMode::Delivered, OK, Some(false)), Ack::NotDelivered);
        assert_eq!(acknowledgement(AckMode::Delivered, None, Some(false)), Ack::NotDelivered);
    }
}
