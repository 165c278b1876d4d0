//! A stand-in for Apple's App Store Server API on loopback: it checks every request's JWT the way Apple
//! documents it (ES256 over the test key's public half, `kid`, `iss`, `aud`, `bid`, at most 60 minutes
//! between `iat` and `exp`, `iat` not in the future), serves notification history 20 to a page with
//! `paginationToken`, filters `onlyFailures`, and answers `429` with `Retry-After` on cue.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use app_store_server_library::crypto::CryptoProvider;
use app_store_server_library::crypto::jws;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;

/// Apple's page size for notification history.
pub const PAGE_SIZE: usize = 20;

/// The In-App Purchase key the stand-in trusts, and the `.p8` the sidecar signs with.
pub struct ApiKey {
    pub key_id: String,
    pub issuer_id: String,
    pub bundle_id: String,
    /// PKCS#8 PEM, as App Store Connect hands out.
    pub p8: String,
    public_der: Vec<u8>,
}

impl ApiKey {
    pub fn generate() -> ApiKey {
        let key = rcgen::KeyPair::generate().expect("P-256 key");
        ApiKey {
            key_id: "2X9R4HXF34".into(),
            issuer_id: "57246542-96fe-1a63-e053-0824d011072a".into(),
            bundle_id: "com.example.app".into(),
            p8: key.serialize_pem(),
            public_der: rcgen::PublicKeyData::subject_public_key_info(&key),
        }
    }
}

/// A notification as Apple's history lists it.
#[derive(Clone)]
pub struct Sent {
    pub signed_payload: String,
    pub signed_date_ms: i64,
    /// `sendAttemptResult`s, oldest first; any but `SUCCESS` makes it a failure for `onlyFailures`.
    pub attempts: Vec<&'static str>,
}

/// Signs a TEST notification with this UUID, as Apple would.
pub type Signer = Arc<dyn Fn(&str) -> String + Send + Sync>;

/// A test notification Apple was asked for: what it sent and how sending went.
#[derive(Clone)]
struct TestSend {
    signed_payload: String,
    attempts: Vec<String>,
}

#[derive(Default)]
struct Script {
    /// Where test notifications are sent, and how they are signed.
    test_target: Option<(String, Signer)>,
    /// Report this `sendAttemptResult` instead of sending (a TLS problem, say).
    forced_result: Option<&'static str>,
    tests: std::collections::HashMap<String, TestSend>,
    history: Vec<Sent>,
    /// Answer this many next requests with 429 and this `Retry-After`.
    rate_limited: Option<(u32, String)>,
    /// What was asked: (path and query, status answered).
    requests: Vec<(String, u16)>,
    /// Why the last refused token was refused.
    refusals: Vec<String>,
}

#[derive(Clone)]
struct Shared {
    key_id: String,
    issuer_id: String,
    bundle_id: String,
    public_der: Vec<u8>,
    script: Arc<Mutex<Script>>,
}

pub struct AppStoreApi {
    pub addr: SocketAddr,
    shared: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl AppStoreApi {
    pub async fn start(key: &ApiKey) -> AppStoreApi {
        let shared = Shared {
            key_id: key.key_id.clone(),
            issuer_id: key.issuer_id.clone(),
            bundle_id: key.bundle_id.clone(),
            public_der: key.public_der.clone(),
            script: Arc::default(),
        };
        let router = Router::new()
            .route("/inApps/v1/notifications/history", post(history))
            .route("/inApps/v1/notifications/test", post(request_test))
            .route("/inApps/v1/notifications/test/{token}", axum::routing::get(test_status))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        AppStoreApi { addr, shared, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_history(&self, history: Vec<Sent>) {
        self.shared.script.lock().unwrap().history = history;
    }

    pub fn rate_limit(&self, requests: u32, retry_after: &str) {
        self.shared.script.lock().unwrap().rate_limited = Some((requests, retry_after.to_string()));
    }

    /// Test notifications go to `url`, signed by `sign`.
    pub fn send_tests_to(&self, url: String, sign: Signer) {
        self.shared.script.lock().unwrap().test_target = Some((url, sign));
    }

    /// Report `result` for the next test notifications instead of sending them (`None`: send).
    pub fn force_send_result(&self, result: Option<&'static str>) {
        self.shared.script.lock().unwrap().forced_result = result;
    }

    pub fn requests(&self) -> Vec<(String, u16)> {
        self.shared.script.lock().unwrap().requests.clone()
    }

    pub fn refusals(&self) -> Vec<String> {
        self.shared.script.lock().unwrap().refusals.clone()
    }
}

impl Drop for AppStoreApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Page {
    pagination_token: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct HistoryRequest {
    start_date: i64,
    end_date: i64,
    only_failures: Option<bool>,
}

async fn history(
    State(shared): State<Shared>,
    Query(page): Query<Page>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let path = format!(
        "/inApps/v1/notifications/history{}",
        page.pagination_token.as_ref().map_or(String::new(), |t| format!("?paginationToken={t}"))
    );
    let answer = answer_history(&shared, &page, &headers, &body);
    let status = answer.status().as_u16();
    shared.script.lock().unwrap().requests.push((path, status));
    answer
}

fn answer_history(shared: &Shared, page: &Page, headers: &HeaderMap, body: &[u8]) -> Response {
    let mut script = shared.script.lock().unwrap();
    if let Some((left, retry_after)) = script.rate_limited.take() {
        if left > 1 {
            script.rate_limited = Some((left - 1, retry_after.clone()));
        }
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", retry_after)],
            r#"{"errorCode":4290000,"errorMessage":"Rate limit exceeded."}"#,
        )
            .into_response();
    }
    if let Err(why) = check_token(shared, headers) {
        script.refusals.push(why);
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let Ok(request) = serde_json::from_slice::<HistoryRequest>(body) else {
        return (StatusCode::BAD_REQUEST, r#"{"errorCode":4000000,"errorMessage":"Invalid request."}"#).into_response();
    };
    let matching: Vec<&Sent> = script
        .history
        .iter()
        .filter(|s| s.signed_date_ms >= request.start_date && s.signed_date_ms <= request.end_date)
        .filter(|s| request.only_failures != Some(true) || s.attempts.iter().any(|a| *a != "SUCCESS"))
        .collect();
    let start: usize = page.pagination_token.as_deref().and_then(|t| t.parse().ok()).unwrap_or(0);
    let end = (start + PAGE_SIZE).min(matching.len());
    let items: Vec<serde_json::Value> = matching[start.min(end)..end]
        .iter()
        .map(|s| {
            let attempts: Vec<serde_json::Value> = s
                .attempts
                .iter()
                .enumerate()
                .map(|(i, result)| {
                    serde_json::json!({"attemptDate": s.signed_date_ms + i as i64 * 3_600_000, "sendAttemptResult": result})
                })
                .collect();
            serde_json::json!({"signedPayload": s.signed_payload, "sendAttempts": attempts})
        })
        .collect();
    let has_more = end < matching.len();
    let mut response = serde_json::json!({"notificationHistory": items, "hasMore": has_more});
    if has_more {
        response["paginationToken"] = serde_json::json!(end.to_string());
    }
    (StatusCode::OK, [("content-type", "application/json")], response.to_string()).into_response()
}

async fn request_test(State(shared): State<Shared>, headers: HeaderMap) -> Response {
    let path = "/inApps/v1/notifications/test".to_string();
    let (target, forced) = {
        let mut script = shared.script.lock().unwrap();
        if let Err(why) = check_token(&shared, &headers) {
            script.refusals.push(why);
            script.requests.push((path, 401));
            return StatusCode::UNAUTHORIZED.into_response();
        }
        script.requests.push((path, 200));
        (script.test_target.clone(), script.forced_result)
    };
    let Some((url, sign)) = target else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "no test target").into_response();
    };
    let count = shared.script.lock().unwrap().tests.len();
    let token = format!("test-token-{count}");
    let uuid = format!("7e3fb20b-4cdb-47cc-936d-{count:012}");
    let signed_payload = sign(&uuid);
    shared
        .script
        .lock()
        .unwrap()
        .tests
        .insert(token.clone(), TestSend { signed_payload: signed_payload.clone(), attempts: Vec::new() });
    // Apple sends it a moment later and records how that went.
    let script = shared.script.clone();
    let sent_token = token.clone();
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let result = match forced {
            Some(result) => result.to_string(),
            None => {
                let body = serde_json::json!({ "signedPayload": signed_payload }).to_string();
                match reqwest::Client::new()
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                {
                    Ok(response) if response.status().is_success() => "SUCCESS".into(),
                    Ok(_) => "UNSUCCESSFUL_HTTP_RESPONSE_CODE".into(),
                    Err(_) => "NO_RESPONSE".into(),
                }
            }
        };
        if let Some(test) = script.lock().unwrap().tests.get_mut(&sent_token) {
            test.attempts.push(result);
        }
    });
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        serde_json::json!({"testNotificationToken": token}).to_string(),
    )
        .into_response()
}

async fn test_status(
    State(shared): State<Shared>,
    axum::extract::Path(token): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    let mut script = shared.script.lock().unwrap();
    let path = format!("/inApps/v1/notifications/test/{token}");
    if let Err(why) = check_token(&shared, &headers) {
        script.refusals.push(why);
        script.requests.push((path, 401));
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let Some(test) = script.tests.get(&token).cloned() else {
        script.requests.push((path, 404));
        return (StatusCode::NOT_FOUND, r#"{"errorCode":4040008,"errorMessage":"Test notification not found."}"#)
            .into_response();
    };
    script.requests.push((path, 200));
    let attempts: Vec<serde_json::Value> = test
        .attempts
        .iter()
        .map(|result| serde_json::json!({"attemptDate": 1_700_000_000_000_i64, "sendAttemptResult": result}))
        .collect();
    let body = serde_json::json!({"signedPayload": test.signed_payload, "sendAttempts": attempts});
    (StatusCode::OK, [("content-type", "application/json")], body.to_string()).into_response()
}

/// Apple's checks of the bearer token.
fn check_token(shared: &Shared, headers: &HeaderMap) -> Result<(), String> {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or("no bearer token")?;
    let header: serde_json::Value = serde_json::from_slice(
        &jws::b64url_decode(jws::split(token).map_err(|e| e.to_string())?[0]).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    if header["alg"] != "ES256" || header["kid"] != shared.key_id.as_str() {
        return Err(format!("header {header}"));
    }
    let claims: serde_json::Value = jws::decode_payload(token).map_err(|e| e.to_string())?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let (iat, exp) = (claims["iat"].as_i64().unwrap_or(i64::MAX), claims["exp"].as_i64().unwrap_or(0));
    if claims["iss"] != shared.issuer_id.as_str()
        || claims["aud"] != "appstoreconnect-v1"
        || claims["bid"] != shared.bundle_id.as_str()
        || exp - iat > 3600
        || exp <= iat
        || iat > now + 5
        || exp < now
    {
        return Err(format!("claims {claims}"));
    }
    let signature: [u8; 64] = jws::decode_signature_bytes(token)
        .map_err(|e| e.to_string())?
        .try_into()
        .map_err(|_| "signature is not 64 bytes".to_string())?;
    let input = jws::signing_input(token).map_err(|e| e.to_string())?;
    let provider = CryptoProvider::default_provider();
    let key = provider.p256_signing.public_key(&shared.public_der).map_err(|e| e.to_string())?;
    key.is_valid_signature(&signature, input.as_bytes()).map_err(|_| "bad signature".to_string())
}
