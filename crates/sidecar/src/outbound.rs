//! Outbound HTTP: to the app (proxy mode), to each destination, to the App Store Server API and to
//! the sidecar's own listener (gap-fill replays).
//!
//! This is hyper's pooled HTTP/1 client used directly. reqwest, used before, parsed the URL again from
//! text and wrapped the request, the response and the future on every call: at saturation that was
//! about 6 µs of the main thread's ~42 µs per notification and as much of delivery's ~25 µs
//! (docs/performance.md, "Outbound HTTP on hyper"). Here a URL becomes an [`http::Uri`] once, when the
//! config is read, and a request only clones its parts.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, InvalidUri, PathAndQuery, Scheme};
use http::{Request, Uri, response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// The client for one target (the app, or one destination), with its own connection pool.
pub type Client = hyper_util::client::legacy::Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// How long an unused connection is kept (what the clients had with reqwest).
const POOL_IDLE: Duration = Duration::from_secs(90);

/// A client for `http` and `https` URLs: TLS checked against the built-in Mozilla roots (as reqwest's
/// `rustls-tls` did), HTTP/1.1, no proxy, and no redirects followed: a 3xx is an answer like any other.
pub fn client(connect_timeout: Duration, max_idle_per_host: usize) -> Result<Client, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(connect_timeout));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(tcp);
    Ok(hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE)
        .pool_max_idle_per_host(max_idle_per_host)
        .build(connector))
}

/// Why an exchange got no complete answer. The text never holds the URL (it may carry a token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// No complete answer within the timeout.
    Timeout,
    /// No connection, or it broke while sending or reading: the kind and innermost cause, e.g.
    /// `connect error: Connection refused (os error 111)`.
    Failed(String),
}

impl Failure {
    fn of(error: &(dyn std::error::Error + 'static), connect: bool) -> Failure {
        let kind = if connect { "connect error" } else { "request error" };
        let mut source = error;
        while let Some(next) = source.source() {
            source = next;
        }
        let cause = source.to_string();
        Failure::Failed(if cause.contains("://") { kind.to_string() } else { format!("{kind}: {cause}") })
    }

    pub fn describe(&self) -> &str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Failed(text) => text,
        }
    }
}

/// Sends `request` and waits for the answer's head, within `timeout`.
pub async fn send(
    client: &Client,
    request: Request<Full<Bytes>>,
    timeout: Duration,
) -> Result<http::Response<Incoming>, Failure> {
    match tokio::time::timeout(timeout, client.request(request)).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(error)) => Err(Failure::of(&error, error.is_connect())),
        Err(_) => Err(Failure::Timeout),
    }
}

/// Sends `request` and reads the whole answer, all within `timeout`.
pub async fn exchange(
    client: &Client,
    request: Request<Full<Bytes>>,
    timeout: Duration,
) -> Result<(response::Parts, Bytes), Failure> {
    let deadline = tokio::time::Instant::now() + timeout;
    let (parts, body) = send(client, request, timeout).await?.into_parts();
    match tokio::time::timeout_at(deadline, body.collect()).await {
        Ok(Ok(body)) => Ok((parts, body.to_bytes())),
        Ok(Err(error)) => Err(Failure::of(&error, false)),
        Err(_) => Err(Failure::Timeout),
    }
}

/// A destination's URL as a request target. Its fragment, which is never sent, is left out.
pub fn destination_uri(url: &url::Url) -> Result<Uri, InvalidUri> {
    Uri::try_from(&url[..url::Position::AfterQuery])
}

/// Why `upstream.url` cannot be a request target. Never holds the URL.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("not a valid URL ({0})")]
    Url(#[from] url::ParseError),
    #[error("not a valid URI ({0})")]
    Invalid(#[from] InvalidUri),
    #[error("no scheme or host")]
    NotAbsolute,
}

/// The app's URL (`upstream.url`), split once into what each request's URI is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppTarget {
    scheme: Scheme,
    authority: Authority,
    /// The URL's path without its trailing `/`, put before each request's path; usually empty.
    prefix: String,
}

impl AppTarget {
    /// `url` is a checked `upstream.url`: http(s), a host, no query or fragment. It is normalized as
    /// a URL first (a space or a non-ASCII character in the path percent-encoded), as reqwest did.
    pub fn parse(url: &str) -> Result<AppTarget, TargetError> {
        let url = url::Url::parse(url.trim())?;
        let parts = Uri::try_from(&url[..url::Position::AfterPath])?.into_parts();
        let (Some(scheme), Some(authority)) = (parts.scheme, parts.authority) else {
            return Err(TargetError::NotAbsolute);
        };
        let prefix = parts.path_and_query.as_ref().map_or("", |p| p.path()).trim_end_matches('/').to_string();
        Ok(AppTarget { scheme, authority, prefix })
    }

    /// Where a request the sidecar received for `path_and_query` goes: the app's URL with the
    /// request's path and query after its own path.
    pub fn uri(&self, path_and_query: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
        let path_and_query = match (path_and_query, self.prefix.is_empty()) {
            (Some(received), true) => received.clone(),
            (None, true) => PathAndQuery::from_static("/"),
            (received, false) => {
                let received = received.map_or("/", PathAndQuery::as_str);
                PathAndQuery::try_from(format!("{}{received}", self.prefix))?
            }
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str, path_and_query: &str) -> String {
        let received = PathAndQuery::try_from(path_and_query).unwrap();
        AppTarget::parse(url).unwrap().uri(Some(&received)).unwrap().to_string()
    }

    #[test]
    fn the_request_path_and_query_follow_the_app_url_and_its_path() {
        assert_eq!(target("http://127.0.0.1:8080", "/apple/v2?x=1"), "http://127.0.0.1:8080/apple/v2?x=1");
        assert_eq!(target("http://127.0.0.1:8080/", "/apple/v2"), "http://127.0.0.1:8080/apple/v2");
        assert_eq!(target("https://app.internal/base/", "/apple/v2?x=1"), "https://app.internal/base/apple/v2?x=1");
        assert_eq!(target(" http://app:81/base ", "/n"), "http://app:81/base/n");
        assert_eq!(target("http://app/a b/", "/n"), "http://app/a%20b/n", "normalized as reqwest did");
        let app = AppTarget::parse("http://app:8080/base").unwrap();
        assert_eq!(app.uri(None).unwrap().to_string(), "http://app:8080/base/");
        assert_eq!(AppTarget::parse("http://app:8080").unwrap().uri(None).unwrap().to_string(), "http://app:8080/");
    }

    #[test]
    fn a_url_without_scheme_or_host_is_refused_without_echoing_it() {
        for url in ["/just/a/path", "app:8080", "not a url", "mailto:ops@example.test"] {
            let error = AppTarget::parse(url).map(|_| ()).unwrap_err().to_string();
            assert!(!error.contains(url), "{error}");
        }
    }

    #[test]
    fn a_destination_keeps_its_query_and_drops_its_fragment() {
        let url = url::Url::parse("https://api.example.test/v1/hook?token=s3cret#frag").unwrap();
        assert_eq!(destination_uri(&url).unwrap().to_string(), "https://api.example.test/v1/hook?token=s3cret");
    }

    #[test]
    fn a_failure_names_its_innermost_cause_but_never_a_url() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        assert_eq!(Failure::of(&refused, true).describe(), "connect error: Connection refused");
        let leaky = std::io::Error::other("cannot reach https://api.example.test/hook?token=s3cret");
        assert_eq!(Failure::of(&leaky, false).describe(), "request error");
        assert_eq!(Failure::Timeout.describe(), "timeout");
    }
}
