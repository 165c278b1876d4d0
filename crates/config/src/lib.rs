//! The storerelay sidecar's configuration file.
//!
//! One set of types serves both sides of the contract: the sidecar reads its file with [`load`], and the
//! operator renders a ConfigMap from the same [`SidecarConfig`], so the operator can never emit a file the
//! sidecar would refuse. Everything here is pure apart from reading the one file; secret files named by
//! `urlFile` / `headersFile` are read by the sidecar at run time, not here.

mod apple;
mod apple_api;
mod postgres;
mod units;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use apple::{
    DedupeConfig, DestinationMatch, Environment, NotificationVersion, RouteFacts, UnknownBodies, VerifyConfig,
    VerifyMode,
};
pub use apple_api::{ApiEnvironment, AppStoreServerApi, GapFill, GapFillScope, SelfTest};
pub use postgres::{
    PostgresSpool, PostgresTarget, PostgresUrlProblem, TlsMode, default_postgres_max_connections,
    default_postgres_schema, default_postgres_timeout, parse_postgres_url,
};
pub use units::{ByteSize, Duration};

/// The whole file. Keys are camelCase; unknown keys are errors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SidecarConfig {
    /// Where Apple's POSTs arrive.
    #[serde(default = "defaults::listen")]
    #[cfg_attr(feature = "schema", schemars(with = "String"))]
    pub listen: SocketAddr,
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    #[serde(default = "defaults::admin")]
    #[cfg_attr(feature = "schema", schemars(with = "String"))]
    pub admin: SocketAddr,
    /// Request paths that accept notifications (POST only). Other paths get 404, other methods 405.
    #[serde(default = "defaults::paths")]
    pub paths: Vec<String>,
    /// The app container. Absent: the sidecar answers Apple itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<Upstream>,
    /// When Apple gets its answer. Default: `upstream` when an upstream is set, else `spooled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack: Option<AckMode>,
    /// How long `ack: delivered` waits for every destination before answering 503.
    #[serde(default = "defaults::ack_timeout")]
    pub ack_timeout: Duration,
    #[serde(default)]
    pub spool: SpoolConfig,
    #[serde(default)]
    pub limits: Limits,
    /// After SIGTERM: how long delivery may go on once the listener has closed.
    #[serde(default = "defaults::shutdown_grace_period")]
    pub shutdown_grace_period: Duration,
    /// Signature, app and environment checks on every notification.
    #[serde(default, skip_serializing_if = "VerifyConfig::is_default")]
    pub verify: VerifyConfig,
    /// JSON that is neither a V1 nor a V2 notification: `forward` (default) or `reject` (400).
    #[serde(default)]
    pub unknown_bodies: UnknownBodies,
    /// Apple's retries of a notification are passed to the app but queued only once per destination.
    #[serde(default)]
    pub dedupe: DedupeConfig,
    /// Where every notification is mirrored to, each independently.
    #[serde(default)]
    pub destinations: Vec<Destination>,
    /// Apple's App Store Server API, for `storerelay-sidecar apple ...` (notification history).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_store_server_api: Option<AppStoreServerApi>,
    /// Replay from Apple's history what never reached the spool, on an interval (needs
    /// `appStoreServerApi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gap_fill: Option<GapFill>,
    /// Ask Apple for a test notification on an interval and follow it (needs `appStoreServerApi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_test: Option<SelfTest>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Upstream {
    /// Base URL of the app, `http://127.0.0.1:8080`; the request's path and query are appended.
    pub url: String,
    #[serde(default = "defaults::upstream_timeout")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum AckMode {
    /// Apple gets the app's answer (the body is spooled first).
    Upstream,
    /// Apple gets 200 `{}` as soon as the body is durable.
    Spooled,
    /// Apple gets 200 once every destination answered 2xx within `ackTimeout`, else 503.
    Delivered,
}

impl fmt::Display for AckMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AckMode::Upstream => "upstream",
            AckMode::Spooled => "spooled",
            AckMode::Delivered => "delivered",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpoolConfig {
    /// `sqlite` (a file beside the sidecar: one replica) or `postgres` (one queue shared by every
    /// replica of the route: nothing is lost when a pod is deleted, Apple's retries are de-duplicated
    /// across replicas).
    #[serde(default)]
    pub backend: SpoolBackendKind,
    /// The SQLite file (`backend: sqlite`). Its folder must be writable (WAL and journal files live beside it).
    #[serde(default = "defaults::spool_path")]
    pub path: PathBuf,
    /// Notification bytes the spool may hold; past it new notifications get 503 and nothing is dropped.
    #[serde(default = "defaults::spool_max_bytes")]
    pub max_bytes: ByteSize,
    /// `full` fsyncs every commit (group commit keeps that cheap); `normal` may lose the last commits on
    /// power loss, never on a process crash.
    #[serde(default)]
    pub sync: SyncMode,
    /// How long delivered notifications are kept (for `spool list` and redelivery) before pruning.
    #[serde(default = "defaults::retain_delivered")]
    pub retain_delivered: Duration,
    /// How long work that can no longer finish is kept, counted from receipt: deliveries given up on
    /// (dead, for `spool dead` and `spool redeliver --dead`), and deliveries to a destination no
    /// longer in the config (which resume if it comes back meanwhile). Then they are dropped and
    /// counted, so such rows cannot fill the spool for good.
    #[serde(default = "defaults::retain_unfinishable")]
    pub retain_dead: Duration,
    /// The shared database (`backend: postgres`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PostgresSpool>,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            path: defaults::spool_path(),
            max_bytes: defaults::spool_max_bytes(),
            sync: SyncMode::Full,
            retain_delivered: defaults::retain_delivered(),
            retain_dead: defaults::retain_unfinishable(),
            backend: SpoolBackendKind::Sqlite,
            postgres: None,
        }
    }
}

/// Where the spool lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum SpoolBackendKind {
    #[default]
    Sqlite,
    Postgres,
}

impl fmt::Display for SpoolBackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SpoolBackendKind::Sqlite => "sqlite",
            SpoolBackendKind::Postgres => "postgres",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum SyncMode {
    #[default]
    Full,
    Normal,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// Larger bodies get 413; nothing past the limit is read.
    #[serde(default = "defaults::max_body_bytes")]
    pub max_body_bytes: ByteSize,
    /// A connection whose request headers are not complete in this time is closed.
    #[serde(default = "defaults::header_timeout")]
    pub header_timeout: Duration,
    /// A request whose body is not complete in this time gets 408 and the connection is closed.
    #[serde(default = "defaults::body_timeout")]
    pub body_timeout: Duration,
    /// Requests handled at once; more get 503 with `Retry-After`.
    #[serde(default = "defaults::max_concurrent_requests")]
    pub max_concurrent_requests: u32,
    /// Body bytes held by all requests being handled, together; a request whose body would pass it gets
    /// 503 with `Retry-After`. Bounds the sidecar's memory (about three times this at worst) whatever
    /// arrives on its public port, so the default fits the injected 64 Mi limit with room to spare.
    #[serde(default = "defaults::max_buffered_bytes")]
    pub max_buffered_bytes: ByteSize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: defaults::max_body_bytes(),
            header_timeout: defaults::header_timeout(),
            body_timeout: defaults::body_timeout(),
            max_concurrent_requests: defaults::max_concurrent_requests(),
            max_buffered_bytes: defaults::max_buffered_bytes(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Destination {
    /// Lowercase letters, digits and `-`; used in metrics, logs and spool tools.
    pub name: String,
    /// The URL notifications are POSTed to. It usually carries a token: prefer `urlFile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// A file holding the URL (a mounted Secret); re-read when it changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_file: Option<PathBuf>,
    /// Extra request headers. Their values are treated as secrets.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// A YAML or JSON map of extra headers (a mounted Secret), merged over `headers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers_file: Option<PathBuf>,
    /// Total time for one delivery attempt.
    #[serde(default = "defaults::destination_timeout")]
    pub timeout: Duration,
    /// Deliveries in flight to this destination at once.
    #[serde(default = "defaults::concurrency")]
    pub concurrency: u32,
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Which notifications this destination gets; empty: all.
    #[serde(default, rename = "match", skip_serializing_if = "DestinationMatch::is_empty")]
    pub filter: DestinationMatch,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryPolicy {
    #[serde(default = "defaults::initial_backoff")]
    pub initial_backoff: Duration,
    #[serde(default = "defaults::max_backoff")]
    pub max_backoff: Duration,
    /// Past this age (since the notification was received) a delivery is dead.
    #[serde(default = "defaults::max_age")]
    pub max_age: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial_backoff: defaults::initial_backoff(),
            max_backoff: defaults::max_backoff(),
            max_age: defaults::max_age(),
        }
    }
}

/// The documented defaults, one function each because serde's `default =` wants a path.
pub mod defaults {
    use super::*;

    pub fn listen() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 8089))
    }
    pub fn admin() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 9089))
    }
    pub fn paths() -> Vec<String> {
        vec!["/apple/notifications".to_string()]
    }
    pub fn upstream_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn ack_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn spool_path() -> PathBuf {
        PathBuf::from("/var/lib/storerelay/spool.db")
    }
    pub fn spool_max_bytes() -> ByteSize {
        ByteSize::mebibytes(256)
    }
    pub fn retain_delivered() -> Duration {
        Duration::from_secs(168 * 3600)
    }
    pub fn retain_unfinishable() -> Duration {
        Duration::from_secs(168 * 3600)
    }
    pub fn max_body_bytes() -> ByteSize {
        ByteSize::mebibytes(1)
    }
    pub fn header_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn body_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn max_concurrent_requests() -> u32 {
        256
    }
    pub fn max_buffered_bytes() -> ByteSize {
        ByteSize::mebibytes(8)
    }
    pub fn shutdown_grace_period() -> Duration {
        Duration::from_secs(20)
    }
    pub fn destination_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn concurrency() -> u32 {
        4
    }
    pub fn initial_backoff() -> Duration {
        Duration::from_secs(1)
    }
    pub fn max_backoff() -> Duration {
        Duration::from_secs(600)
    }
    pub fn max_age() -> Duration {
        Duration::from_secs(168 * 3600)
    }
}

impl SidecarConfig {
    /// The ack mode in force once the default is applied.
    pub fn effective_ack(&self) -> AckMode {
        self.ack.unwrap_or(if self.upstream.is_some() { AckMode::Upstream } else { AckMode::Spooled })
    }

    /// From when (unix ms) a duplicate key still counts, at `now_ms`; `None` with `dedupe.window: 0s`.
    pub fn dedupe_since(&self, now_ms: i64) -> Option<i64> {
        let window = self.dedupe.window.get();
        (!window.is_zero()).then(|| now_ms - window.as_millis() as i64)
    }

    /// The config as `check` prints it: defaults filled in, secrets replaced.
    pub fn redacted(&self) -> SidecarConfig {
        let mut copy = self.clone();
        copy.ack = Some(self.effective_ack());
        for destination in &mut copy.destinations {
            if let Some(url) = &destination.url {
                destination.url = Some(format!("{}/<redacted>", redact_url(url)));
            }
            for value in destination.headers.values_mut() {
                *value = "<redacted>".to_string();
            }
        }
        if let Some(url) = copy.spool.postgres.as_mut().and_then(|p| p.url.as_mut()) {
            // A password is refused by `problems`; this keeps one out of printed output regardless.
            if let Ok(mut parsed) = url::Url::parse(url) {
                if parsed.password().is_some() && parsed.set_password(Some("<redacted>")).is_ok() {
                    *url = parsed.to_string();
                }
            }
        }
        if copy.verify.v1_password.is_some() {
            copy.verify.v1_password = Some("<redacted>".to_string());
        }
        copy
    }

    /// Every file the sidecar reads besides the config file itself (watched for changes).
    pub fn secret_files(&self) -> Vec<&Path> {
        self.destinations
            .iter()
            .flat_map(|d| [d.url_file.as_deref(), d.headers_file.as_deref()])
            .flatten()
            .chain(self.verify.v1_password_file.as_deref())
            .chain(self.verify.root_certificates.iter().map(PathBuf::as_path))
            .chain(
                self.spool
                    .postgres
                    .iter()
                    .flat_map(|p| [p.url_file.as_deref(), p.root_certificate_file.as_deref()])
                    .flatten(),
            )
            .chain(self.app_store_server_api.iter().map(|api| api.private_key_file.as_path()))
            .collect()
    }

    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).unwrap_or_else(|e| format!("# cannot print config: {e}\n"))
    }

    /// Every problem with the values, each naming its key. Empty when the config is usable.
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut problem = |key: String, message: String| out.push(Problem { key, message });

        if self.listen == self.admin {
            problem("admin".into(), format!("must differ from `listen` ({})", self.listen));
        }
        if self.paths.is_empty() {
            problem("paths".into(), "needs at least one path".into());
        }
        let mut seen_paths = BTreeSet::new();
        for (i, path) in self.paths.iter().enumerate() {
            if !path.starts_with('/') || path.contains(['?', '#', ' ']) {
                problem(
                    format!("paths[{i}]"),
                    format!("`{path}` must be a path starting with `/`, without query or spaces"),
                );
            } else if !seen_paths.insert(path) {
                problem(format!("paths[{i}]"), format!("`{path}` is listed twice"));
            }
        }
        if let Some(upstream) = &self.upstream {
            if let Err(url_problem) = check_http_url(&upstream.url, false) {
                problem("upstream.url".into(), url_problem.to_string());
            }
            if upstream.timeout.is_zero() {
                problem("upstream.timeout".into(), "must be more than 0s".into());
            }
        }
        match (self.ack, &self.upstream) {
            (Some(AckMode::Upstream), None) => {
                problem("ack".into(), "`upstream` needs an `upstream:` section (the app that answers Apple)".into())
            }
            (Some(AckMode::Spooled), Some(_)) => problem(
                "ack".into(),
                "`spooled` answers Apple without the app; remove `upstream:` or use `ack: upstream`".into(),
            ),
            _ => {}
        }
        if self.effective_ack() == AckMode::Delivered && self.ack_timeout.is_zero() {
            problem("ackTimeout".into(), "must be more than 0s with `ack: delivered`".into());
        }
        if self.spool.path.as_os_str().is_empty() {
            problem("spool.path".into(), "must not be empty".into());
        }
        match (self.spool.backend, &self.spool.postgres) {
            (SpoolBackendKind::Postgres, None) => {
                problem("spool.postgres".into(), "is needed with `backend: postgres` (url or urlFile, queue)".into())
            }
            (SpoolBackendKind::Sqlite, Some(_)) => problem(
                "spool.postgres".into(),
                "is only used with `backend: postgres`; set the backend or remove this section".into(),
            ),
            _ => {}
        }
        if self.spool.max_bytes.get() < self.limits.max_body_bytes.get().saturating_add(SPOOL_OWN_BYTES) {
            problem(
                "spool.maxBytes".into(),
                format!(
                    "{} leaves no room for a body of limits.maxBodyBytes ({}) beside the spool's own 64Ki",
                    self.spool.max_bytes, self.limits.max_body_bytes
                ),
            );
        }
        if self.limits.max_body_bytes.get() == 0 {
            problem("limits.maxBodyBytes".into(), "must be more than 0".into());
        }
        for (key, value) in
            [("limits.headerTimeout", self.limits.header_timeout), ("limits.bodyTimeout", self.limits.body_timeout)]
        {
            if value.is_zero() {
                problem(key.into(), "must be more than 0s".into());
            }
        }
        if self.limits.max_concurrent_requests == 0 {
            problem("limits.maxConcurrentRequests".into(), "must be at least 1".into());
        }
        if self.limits.max_buffered_bytes < self.limits.max_body_bytes {
            problem(
                "limits.maxBufferedBytes".into(),
                format!(
                    "{} is smaller than limits.maxBodyBytes ({}): a body of the largest size could never be taken",
                    self.limits.max_buffered_bytes, self.limits.max_body_bytes
                ),
            );
        }
        let mut seen_names = BTreeSet::new();
        for (i, destination) in self.destinations.iter().enumerate() {
            let key = |field: &str| format!("destinations[{i}].{field}");
            if !is_dns_label(&destination.name) {
                problem(key("name"), format!("`{}` must be 1-63 lowercase letters, digits or `-`", destination.name));
            } else if !seen_names.insert(&destination.name) {
                problem(key("name"), format!("`{}` is used by two destinations", destination.name));
            }
            match (&destination.url, &destination.url_file) {
                (Some(url), None) => {
                    if let Err(url_problem) = check_http_url(url, true) {
                        problem(key("url"), url_problem.to_string());
                    }
                }
                (None, Some(_)) => {}
                (Some(_), Some(_)) => problem(key("url"), "set either `url` or `urlFile`, not both".into()),
                (None, None) => problem(key("url"), "set `url` or `urlFile`".into()),
            }
            for name in destination.headers.keys() {
                if !is_header_name(name) {
                    problem(key(&format!("headers.{name}")), "is not a valid HTTP header name".into());
                } else if is_fixed_header(name) {
                    problem(key(&format!("headers.{name}")), FIXED_HEADER_PROBLEM.into());
                }
            }
            if destination.timeout.is_zero() {
                problem(key("timeout"), "must be more than 0s".into());
            }
            if !(1..=1024).contains(&destination.concurrency) {
                problem(key("concurrency"), "must be between 1 and 1024".into());
            }
            let retry = &destination.retry;
            if retry.initial_backoff.is_zero() {
                problem(key("retry.initialBackoff"), "must be more than 0s".into());
            }
            if retry.max_backoff < retry.initial_backoff {
                problem(
                    key("retry.maxBackoff"),
                    format!("{} is shorter than initialBackoff ({})", retry.max_backoff, retry.initial_backoff),
                );
            }
            if retry.max_age.is_zero() {
                problem(key("retry.maxAge"), "must be more than 0s".into());
            }
        }
        self.verify.problems(&mut out);
        if let Some(postgres) = &self.spool.postgres {
            postgres.problems(&mut out);
        }
        if let Some(api) = &self.app_store_server_api {
            api.problems(&mut out);
        }
        if let Some(gap_fill) = &self.gap_fill {
            let sqlite = self.spool.backend == SpoolBackendKind::Sqlite;
            gap_fill.problems(self.app_store_server_api.as_ref(), self.dedupe.window, sqlite, &mut out);
        }
        if let Some(self_test) = &self.self_test {
            let sqlite = self.spool.backend == SpoolBackendKind::Sqlite;
            self_test.problems(self.app_store_server_api.as_ref(), sqlite, &mut out);
        }
        out
    }
}

/// A URL cut to `scheme://host[:port]`: what may appear in logs, metrics and errors. Destination URLs
/// carry tokens in their path or query; only the host is safe to show.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(parsed) => match (parsed.host_str(), parsed.port()) {
            (Some(host), Some(port)) => format!("{}://{host}:{port}", parsed.scheme()),
            (Some(host), None) => format!("{}://{host}", parsed.scheme()),
            (None, _) => format!("{}:", parsed.scheme()),
        },
        Err(_) => "<invalid url>".to_string(),
    }
}

/// What is wrong with a URL, said without echoing it (it may hold a token). Reads after "the URL".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlProblem {
    #[error("is not a valid URL ({0})")]
    Invalid(url::ParseError),
    /// The sidecar is built without Unicode host names (IDNA tables: ~0.15 MiB of binary).
    #[error("has a host name that is not ASCII; write it in its ASCII form (punycode, `xn--...`)")]
    NonAsciiHost,
    #[error("scheme `{0}` is not http or https")]
    Scheme(String),
    #[error("has no host")]
    NoHost,
    #[error("must not carry user:password (use headers for credentials)")]
    UserInfo,
    #[error("must not have a query or fragment (the request's own is appended)")]
    QueryOrFragment,
}

/// Checks an http(s) URL without ever echoing it (it may hold a token).
pub fn check_http_url(url: &str, allow_query: bool) -> Result<(), UrlProblem> {
    let parsed = url::Url::parse(url.trim()).map_err(|error| match error {
        url::ParseError::IdnaError if !url.is_ascii() => UrlProblem::NonAsciiHost,
        error => UrlProblem::Invalid(error),
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(UrlProblem::Scheme(parsed.scheme().to_string()));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(UrlProblem::NoHost);
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(UrlProblem::UserInfo);
    }
    if !allow_query && (parsed.query().is_some() || parsed.fragment().is_some()) {
        return Err(UrlProblem::QueryOrFragment);
    }
    Ok(())
}

fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// The memory limit the operator gives an injected sidecar unless the route sets its own resources.
/// The sidecar's defaults (`limits.maxBufferedBytes`, destination `concurrency`) are sized to stay
/// under it whatever arrives on the public port; a test holds the release binary to it.
pub const SIDECAR_MEMORY_LIMIT_MIB: u64 = 64;

/// The spool volume (`emptyDir` sizeLimit) the operator gives a route that does not set one.
pub const DEFAULT_SPOOL_SIZE_LIMIT: &str = "256Mi";

/// The `spool.maxBytes` for a volume of `size_limit`: three quarters. `maxBytes` bounds the database
/// and any damaged copy set aside; the rest of the volume is for what passes it for a moment (the WAL:
/// SQLite's 4 MiB checkpoint interval plus one write batch of at most 1/16 of `maxBytes`) and the
/// filesystem's own overhead. Past its sizeLimit the kubelet evicts the pod and deletes the spool.
pub fn spool_max_bytes_within(size_limit: ByteSize) -> ByteSize {
    ByteSize(size_limit.get() / 4 * 3)
}

/// Room an empty spool's own pages take (schema, indexes), counted in `spool.maxBytes`, with margin.
pub const SPOOL_OWN_BYTES: u64 = 64 << 10;

/// Request headers storerelay sets itself on every delivery (the body is Apple's JSON, sent as is);
/// a destination's `headers` or `headersFile` may not replace them.
pub const FIXED_HEADERS: &[&str] = &["content-type", "content-length", "host", "user-agent", "transfer-encoding"];

pub const FIXED_HEADER_PROBLEM: &str =
    "storerelay sets this header itself (Content-Type, Content-Length, Host, User-Agent, Transfer-Encoding)";

/// Whether `name` is one of [`FIXED_HEADERS`], in any case.
pub fn is_fixed_header(name: &str) -> bool {
    FIXED_HEADERS.iter().any(|fixed| fixed.eq_ignore_ascii_case(name))
}

/// RFC 9110 token characters.
pub fn is_header_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// One thing wrong with a value, and the key that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` {}", self.key, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read { file: PathBuf, source: std::io::Error },
    #[error("{file}: key `{key}`: {message}")]
    Parse { file: PathBuf, key: String, message: String },
    #[error("{file}: {}", problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid { file: PathBuf, problems: Vec<Problem> },
}

/// Parses and validates config text; `file` is only used to name it in errors.
pub fn parse(text: &str, file: &Path) -> Result<SidecarConfig, ConfigError> {
    // An empty file is a config of defaults, not a YAML error.
    let text = if text.trim().is_empty() { "{}" } else { text };
    let deserializer = serde_yaml::Deserializer::from_str(text);
    let config: SidecarConfig = serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let key = match err.path().to_string() {
            path if path == "." => "(top level)".to_string(),
            path => path,
        };
        // serde_yaml prefixes its own, shorter path; the key above already says where.
        let inner = err.inner().to_string();
        let message = match inner.split_once(": ") {
            Some((prefix, rest)) if key.starts_with(prefix) => rest.to_string(),
            _ => inner,
        };
        ConfigError::Parse { file: file.to_path_buf(), key, message }
    })?;
    let problems = config.problems();
    if problems.is_empty() { Ok(config) } else { Err(ConfigError::Invalid { file: file.to_path_buf(), problems }) }
}

/// Reads, parses and validates the config file.
pub fn load(file: &Path) -> Result<SidecarConfig, ConfigError> {
    let text =
        std::fs::read_to_string(file).map_err(|source| ConfigError::Read { file: file.to_path_buf(), source })?;
    parse(&text, file)
}

/// The JSON Schema of the config file as committed in `schema.json` (what `storerelay-sidecar schema`
/// prints). The schema is generated from these types by [`json_schema`] (feature `schema`, which the
/// sidecar's binary does without: the generator's code is a tenth of a megabyte it never needs at run
/// time); a test keeps the file equal to it.
pub const JSON_SCHEMA: &str = include_str!("../schema.json");

/// The JSON Schema of the config file, generated from the types (for editors and the operator's docs).
#[cfg(feature = "schema")]
pub fn json_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(SidecarConfig)).unwrap_or_default()
}

#[cfg(test)]
mod tests;
