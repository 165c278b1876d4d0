//! The config in force: the file's values plus each destination's secrets, read from its `urlFile` /
//! `headersFile`, and the reload loop that follows changes to any of those files.
//!
//! Kubernetes updates mounted ConfigMaps and Secrets by swapping a symlink, which file-change
//! notifications report unreliably; comparing the files' contents on a short interval sees every swap.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use storerelay_config::{ConfigError, RetryPolicy, SidecarConfig, VerifyMode, check_http_url, redact_url};
use tokio::sync::watch;

use crate::apple::Notification;
use crate::metrics::Metrics;
use crate::outbound::{self, AppTarget};
use crate::verify::Verifier;

/// Why a destination's secrets cannot be used. Never contains the URL or a header value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read {}: {kind}", path.display())]
    Unreadable { path: PathBuf, kind: std::io::ErrorKind },
    #[error("no url")]
    NoUrl,
    #[error("urlFile {}: the URL {problem}", file.display())]
    UrlFile { file: PathBuf, problem: storerelay_config::UrlProblem },
    #[error("url: {0}")]
    Url(url::ParseError),
    /// The `http` crate's reason, as text: its error type is neither `Clone` nor `Eq`.
    #[error("url: not usable as a request target ({0})")]
    Uri(String),
    #[error("headersFile {}: not a YAML or JSON map of header names to strings", file.display())]
    HeadersFile { file: PathBuf },
    #[error("header `{0}`: invalid name")]
    HeaderName(String),
    #[error("header `{0}`: invalid value")]
    HeaderValue(String),
    #[error("header `{0}`: {problem}", problem = storerelay_config::FIXED_HEADER_PROBLEM)]
    FixedHeader(String),
}

/// A destination ready to be delivered to.
#[derive(Debug, Clone)]
pub struct ResolvedDestination {
    pub name: String,
    /// `None` while its `urlFile` cannot be read: its deliveries wait in the spool.
    pub uri: Option<http::Uri>,
    /// `scheme://host[:port]`: the only form of the URL that is ever shown.
    pub display: String,
    pub headers: HeaderMap,
    pub timeout: Duration,
    pub concurrency: usize,
    pub retry: RetryPolicy,
    /// Why the destination cannot be delivered to, if it cannot (never contains a secret).
    pub problem: Option<String>,
}

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub file: SidecarConfig,
    pub destinations: Vec<Arc<ResolvedDestination>>,
    pub verifier: Arc<Verifier>,
    /// Where proxy mode sends requests: `upstream.url` as a request target; `None` without an
    /// upstream, or if its URL cannot be one (then each request is answered 503, and the start says why).
    pub app: Option<AppTarget>,
    /// The V1 shared secret in force (from `v1Password` or `v1PasswordFile`).
    v1_password: Option<String>,
    /// Why `v1PasswordFile` could not be read, if it could not.
    v1_password_problem: Option<String>,
}

impl RuntimeConfig {
    pub fn destination(&self, name: &str) -> Option<&Arc<ResolvedDestination>> {
        self.destinations.iter().find(|d| d.name == name)
    }

    pub fn destination_names(&self) -> Vec<String> {
        self.destinations.iter().map(|d| d.name.clone()).collect()
    }

    /// The destinations whose `match` takes this notification.
    pub fn destinations_for(&self, notification: &Notification) -> Vec<String> {
        let facts = notification.route_facts();
        self.file.destinations.iter().filter(|d| d.filter.matches(&facts)).map(|d| d.name.clone()).collect()
    }

    /// Problems that leave the sidecar working but a destination stalled (or V1 verification failing).
    pub fn problems(&self) -> Vec<String> {
        self.destinations
            .iter()
            .filter_map(|d| d.problem.as_ref().map(|p| format!("destination {}: {p}", d.name)))
            .chain(self.v1_password_problem.as_ref().map(|p| format!("verify: {p}")))
            .chain(self.verifier.missing().into_iter().map(|p| format!("verify: {p}")))
            .collect()
    }
}

/// Resolves every destination's secrets. A destination whose secret files fail keeps the values it had
/// in `previous`, so a half-written Secret never stops delivery that was working.
/// Verification files (root certificates, `v1PasswordFile`) are handled the same way; one that was
/// never read leaves the notifications that need it answered 503 in `enforce` mode (see
/// [`Verifier::new`]), never a start failure: the operator mounts them `optional`, and a sidecar that
/// does not start keeps the app's pod from starting too.
pub fn resolve(file: SidecarConfig, previous: Option<&RuntimeConfig>, metrics: &Metrics) -> RuntimeConfig {
    let (v1_password, v1_password_problem) = match (&file.verify.v1_password, &file.verify.v1_password_file) {
        (Some(password), _) => (Some(password.clone()), None),
        (None, Some(path)) => match read_secret(path) {
            Ok(text) => (Some(text.trim_end_matches(['\n', '\r']).to_string()), None),
            Err(problem) => {
                tracing::error!(%problem, "verify.v1PasswordFile unreadable");
                let kept = previous.and_then(|p| p.v1_password.clone());
                (kept, Some(format!("v1PasswordFile: {problem}")))
            }
        },
        (None, None) => (None, None),
    };
    let verifier = Arc::new(Verifier::new(&file.verify, v1_password.clone(), previous.map(|p| p.verifier.as_ref())));
    if verifier.mode != VerifyMode::Off && verifier.lacks_material() {
        let missing = verifier.missing().into_iter().chain(v1_password_problem.clone()).collect::<Vec<_>>();
        if verifier.mode == VerifyMode::Enforce {
            tracing::error!(
                ?missing,
                "verification files are missing: notifications that need them are answered 503 (Apple retries) until they appear"
            );
        } else {
            tracing::warn!(
                ?missing,
                "verification files are missing: notifications that need them are accepted unverified (verify.mode: log)"
            );
        }
    }
    let destinations = file
        .destinations
        .iter()
        .map(|d| {
            let earlier = previous.and_then(|p| p.destination(&d.name));
            let resolved = resolve_destination(d);
            let (uri, display, headers, problem) = match resolved {
                Ok((url, uri, headers)) => (Some(uri), redact_url(url.as_str()), headers, None),
                Err(problem) => {
                    metrics.count_secret_error(&d.name);
                    tracing::error!(destination = %d.name, problem = %problem, "destination secrets unusable; its deliveries wait in the spool");
                    match earlier.filter(|e| e.uri.is_some()) {
                        Some(e) => (e.uri.clone(), e.display.clone(), e.headers.clone(), Some(format!("{problem} (using the previous values)"))),
                        None => (None, "<unresolved>".to_string(), HeaderMap::new(), Some(problem.to_string())),
                    }
                }
            };
            Arc::new(ResolvedDestination {
                name: d.name.clone(),
                uri,
                display,
                headers,
                timeout: d.timeout.get(),
                concurrency: d.concurrency as usize,
                retry: d.retry,
                problem,
            })
        })
        .collect();
    let app = file.upstream.as_ref().and_then(|upstream| match AppTarget::parse(&upstream.url) {
        Ok(app) => Some(app),
        Err(problem) => {
            tracing::error!(%problem, "upstream.url cannot be a request target; notifications are answered 503");
            None
        }
    });
    RuntimeConfig { file, destinations, verifier, app, v1_password, v1_password_problem }
}

fn resolve_destination(d: &storerelay_config::Destination) -> Result<(url::Url, http::Uri, HeaderMap), SecretError> {
    let url_text = match (&d.url, &d.url_file) {
        (Some(url), _) => url.clone(),
        (None, Some(file)) => read_secret(file)?.trim().to_string(),
        (None, None) => return Err(SecretError::NoUrl),
    };
    if let Some(file) = &d.url_file {
        check_http_url(&url_text, true).map_err(|problem| SecretError::UrlFile { file: file.clone(), problem })?;
    }
    let url = url::Url::parse(&url_text).map_err(SecretError::Url)?;
    let uri = outbound::destination_uri(&url).map_err(|e| SecretError::Uri(e.to_string()))?;

    let mut pairs: BTreeMap<String, String> = d.headers.clone();
    if let Some(file) = &d.headers_file {
        let text = read_secret(file)?;
        let from_file: BTreeMap<String, String> =
            serde_yaml::from_str(&text).map_err(|_| SecretError::HeadersFile { file: file.clone() })?;
        pairs.extend(from_file);
    }
    let mut headers = HeaderMap::new();
    for (name, value) in pairs {
        if storerelay_config::is_fixed_header(&name) {
            return Err(SecretError::FixedHeader(name));
        }
        let header_name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| SecretError::HeaderName(name.clone()))?;
        let mut header_value = HeaderValue::from_str(&value).map_err(|_| SecretError::HeaderValue(name.clone()))?;
        header_value.set_sensitive(true);
        headers.insert(header_name, header_value);
    }
    Ok((url, uri, headers))
}

fn read_secret(path: &Path) -> Result<String, SecretError> {
    std::fs::read_to_string(path).map_err(|e| SecretError::Unreadable { path: path.to_path_buf(), kind: e.kind() })
}

/// Settings bound when the process starts; a change to them waits for a restart.
fn restart_only_changes(old: &SidecarConfig, new: &SidecarConfig) -> Vec<&'static str> {
    let mut keys = Vec::new();
    if old.listen != new.listen {
        keys.push("listen");
    }
    if old.admin != new.admin {
        keys.push("admin");
    }
    if old.spool.path != new.spool.path {
        keys.push("spool.path");
    }
    if old.spool.sync != new.spool.sync {
        keys.push("spool.sync");
    }
    if old.limits.header_timeout != new.limits.header_timeout {
        keys.push("limits.headerTimeout");
    }
    if old.limits.max_concurrent_requests != new.limits.max_concurrent_requests {
        keys.push("limits.maxConcurrentRequests");
    }
    if old.limits.max_buffered_bytes != new.limits.max_buffered_bytes {
        keys.push("limits.maxBufferedBytes");
    }
    keys
}

/// What the config file and its secret files held when they were read, to notice any change cheaply.
/// Each part is taken *before* the files it covers are read, so an edit that lands while they are
/// being read shows up as a change on the next look instead of being taken as already seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    config: u64,
    secrets: u64,
}

impl Fingerprint {
    /// Taken before loading `path`; completed with [`Fingerprint::with_secrets_of`] before its secret
    /// files are read.
    pub fn of_config(path: &Path) -> Fingerprint {
        Fingerprint { config: hash_files(&[path.to_path_buf()]), secrets: 0 }
    }

    pub fn with_secrets_of(self, config: &SidecarConfig) -> Fingerprint {
        self.with_secrets(&owned_secret_files(config))
    }

    fn with_secrets(self, files: &[PathBuf]) -> Fingerprint {
        Fingerprint { secrets: hash_files(files), ..self }
    }
}

fn hash_files(files: &[PathBuf]) -> u64 {
    let mut hasher = DefaultHasher::new();
    for file in files {
        match std::fs::read(file) {
            Ok(bytes) => bytes.hash(&mut hasher),
            Err(e) => e.kind().hash(&mut hasher),
        }
    }
    hasher.finish()
}

fn owned_secret_files(config: &SidecarConfig) -> Vec<PathBuf> {
    config.secret_files().into_iter().map(Path::to_path_buf).collect()
}

/// Follows the config file and its secret files, publishing each valid change. An invalid change is
/// logged, counted and ignored: the config in force stays. `seen` is the fingerprint of what the
/// config in force was read from.
pub async fn follow(
    path: PathBuf,
    interval: Duration,
    current: watch::Sender<Arc<RuntimeConfig>>,
    metrics: Arc<Metrics>,
    mut seen: Fingerprint,
) {
    let mut secret_files = owned_secret_files(&current.borrow().file);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let now_seen = Fingerprint::of_config(&path).with_secrets(&secret_files);
        if now_seen == seen {
            continue;
        }
        seen = now_seen;
        match storerelay_config::load(&path) {
            Ok(mut file) => {
                let previous = current.borrow().clone();
                let pending_restart = restart_only_changes(&previous.file, &file);
                if !pending_restart.is_empty() {
                    tracing::warn!(keys = ?pending_restart, "these settings change only when the sidecar restarts; the running values stay in force");
                    keep_running_values(&previous.file, &mut file);
                }
                // The secret files this config names, fingerprinted before `resolve` reads them.
                secret_files = owned_secret_files(&file);
                seen = seen.with_secrets(&secret_files);
                let next = resolve(file, Some(&previous), &metrics);
                tracing::info!(destinations = ?next.destination_names(), ack = %next.file.effective_ack(), "config reloaded");
                metrics.count_reload("success");
                current.send_replace(Arc::new(next));
            }
            Err(error) => {
                let error: ConfigError = error;
                tracing::error!(error = %error, "config reload refused; the previous config stays in force");
                metrics.count_reload("error");
            }
        }
    }
}

fn keep_running_values(running: &SidecarConfig, new: &mut SidecarConfig) {
    new.listen = running.listen;
    new.admin = running.admin;
    new.spool.path = running.spool.path.clone();
    new.spool.sync = running.spool.sync;
    new.limits.header_timeout = running.limits.header_timeout;
    new.limits.max_concurrent_requests = running.limits.max_concurrent_requests;
    new.limits.max_buffered_bytes = running.limits.max_buffered_bytes;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> SidecarConfig {
        storerelay_config::parse(text, Path::new("test.yaml")).unwrap()
    }

    #[test]
    fn secrets_come_from_files_and_merge_headers() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("url"), "https://hooks.example.invalid/v1/TOKEN\n").unwrap();
        std::fs::write(dir.path().join("headers"), "{\"Authorization\": \"Bearer s3cret\"}").unwrap();
        let config = parse(&format!(
            "destinations:\n  - name: rc\n    urlFile: {0}/url\n    headersFile: {0}/headers\n    headers: {{X-Source: storerelay}}\n",
            dir.path().display()
        ));
        let resolved = resolve(config, None, &Metrics::default());
        let rc = &resolved.destinations[0];
        assert_eq!(rc.uri.as_ref().unwrap().to_string(), "https://hooks.example.invalid/v1/TOKEN");
        assert_eq!(rc.display, "https://hooks.example.invalid");
        assert_eq!(rc.headers["authorization"], "Bearer s3cret");
        assert_eq!(rc.headers["x-source"], "storerelay");
        assert!(rc.problem.is_none());
    }

    #[test]
    fn a_headers_file_cannot_replace_the_fixed_headers() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("headers"), "{\"content-type\": \"text/plain\"}").unwrap();
        let config = parse(&format!(
            "destinations:\n  - {{name: rc, url: 'https://a.example.invalid/', headersFile: {}/headers}}\n",
            dir.path().display()
        ));
        let resolved = resolve(config, None, &Metrics::default());
        let problem = resolved.destinations[0].problem.clone().expect("a problem");
        assert!(problem.contains("content-type") && problem.contains("storerelay sets"), "{problem}");
        assert!(resolved.destinations[0].uri.is_none(), "not delivered with a changed Content-Type");
    }

    #[test]
    fn a_missing_secret_is_a_problem_without_the_secret() {
        let metrics = Metrics::default();
        let dir = tempfile::tempdir().unwrap();
        let url_file = dir.path().join("url");
        let config = parse(&format!("destinations:\n  - {{name: rc, urlFile: {}}}\n", url_file.display()));
        let resolved = resolve(config.clone(), None, &metrics);
        let problem = resolved.destinations[0].problem.clone().unwrap();
        assert!(problem.contains("cannot read") && problem.contains("url"), "{problem}");
        assert!(resolved.destinations[0].uri.is_none());
        assert_eq!(
            metrics.secret_file_errors.get_or_create(&crate::metrics::Destination { destination: "rc".into() }).get(),
            1
        );

        // Once readable it resolves; if it breaks again, the last good URL stays in use.
        std::fs::write(&url_file, "https://a.example.invalid/SECRET").unwrap();
        let good = resolve(config.clone(), Some(&resolved), &metrics);
        assert!(good.destinations[0].problem.is_none());
        std::fs::write(&url_file, "not a url SECRET").unwrap();
        let kept = resolve(config, Some(&good), &metrics);
        let problem = kept.destinations[0].problem.clone().unwrap();
        assert!(!problem.contains("SECRET"), "{problem}");
        assert_eq!(kept.destinations[0].uri.as_ref().unwrap().to_string(), "https://a.example.invalid/SECRET");
    }

    #[tokio::test]
    async fn an_edit_made_while_the_config_was_being_read_is_picked_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, "destinations: [{name: a, url: 'https://a.example.invalid/'}]\n").unwrap();
        // What `run` does: fingerprint, then read...
        let seen = Fingerprint::of_config(&path);
        let file = storerelay_config::load(&path).unwrap();
        let seen = seen.with_secrets_of(&file);
        let metrics = Arc::new(Metrics::default());
        let (current, mut changes) = watch::channel(Arc::new(resolve(file, None, &metrics)));
        // ...and the file changes right after it was read, before the reload loop starts.
        std::fs::write(&path, "destinations: [{name: a, url: 'https://a.example.invalid/'}, {name: b, url: 'https://b.example.invalid/'}]\n").unwrap();
        let follower = tokio::spawn(follow(path.clone(), Duration::from_millis(20), current, metrics.clone(), seen));
        let reloaded = tokio::time::timeout(Duration::from_secs(5), changes.changed()).await;
        follower.abort();
        assert!(reloaded.is_ok(), "the edit was taken as already seen");
        assert_eq!(changes.borrow().destination_names(), ["a", "b"]);
    }

    #[test]
    fn restart_only_keys_are_named() {
        let old = parse("listen: 127.0.0.1:1\n");
        let new = parse("listen: 127.0.0.1:2\nspool: {sync: normal}\n");
        assert_eq!(restart_only_changes(&old, &new), vec!["listen", "spool.sync"]);
    }
}
