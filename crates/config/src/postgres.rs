//! `spool.postgres`: the shared spool's database, and the one reading of its URL that both `check` and
//! the sidecar's connection use.
//!
//! The URL is a libpq-style `postgres://user@host:port/db?sslmode=...`. A password in it is refused: the
//! config file is a ConfigMap, readable by far more people than a Secret, so the URL with its password
//! goes in a Secret file (`urlFile`). Messages here never echo the URL.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{Duration, Problem};

/// The shared spool's database.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PostgresSpool {
    /// `postgres://user@host:5432/db?sslmode=verify-full`, without a password (use `urlFile` for one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// A file holding the URL, password included (a mounted Secret). Read at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_file: Option<PathBuf>,
    /// PEM CA certificates the server's certificate must chain to (`sslmode=verify-ca|verify-full`).
    /// Absent: the Mozilla roots built into the sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_certificate_file: Option<PathBuf>,
    /// The schema holding the spool's tables; created if missing.
    #[serde(default = "default_postgres_schema")]
    pub schema: String,
    /// This route's queue: rows of different queues never mix. The operator sets `<namespace>/<route>`.
    pub queue: String,
    /// Connections each sidecar opens: one listens for new rows, one claims deliveries and records
    /// outcomes, the rest store notifications.
    #[serde(default = "default_postgres_max_connections")]
    pub max_connections: u32,
    /// How long storing a notification may wait for the database before Apple gets 503 (it retries).
    #[serde(default = "default_postgres_timeout")]
    pub timeout: Duration,
}

pub fn default_postgres_schema() -> String {
    "storerelay".to_string()
}
pub fn default_postgres_max_connections() -> u32 {
    4
}
pub fn default_postgres_timeout() -> Duration {
    Duration::from_secs(5)
}

/// How the connection is protected, from the URL's `sslmode`. libpq's `allow` and `prefer` are
/// refused: they fall back to plain text without a word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// `sslmode=disable`: plain TCP (a database on the pod's own network only).
    Disable,
    /// `sslmode=require`: TLS, certificate not checked (libpq's meaning).
    Require,
    /// `sslmode=verify-ca`: TLS, the certificate must chain to a trusted root.
    VerifyCa,
    /// `sslmode=verify-full` (the default when the URL has none): as `verify-ca`, and it must name the host.
    VerifyFull,
}

/// A checked URL: the rest of it for the driver, and the TLS mode taken out of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresTarget {
    /// The URL without `sslmode` (the driver does not know the `verify-*` modes).
    pub url: String,
    pub tls: TlsMode,
    pub host: String,
}

/// What is wrong with a PostgreSQL URL, said without echoing it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PostgresUrlProblem {
    #[error("is not a valid URL ({0})")]
    Invalid(url::ParseError),
    #[error("scheme `{0}` is not postgres or postgresql")]
    Scheme(String),
    #[error("has no host")]
    NoHost,
    #[error("must not carry a password: put the whole URL in a Secret and point `urlFile` at it")]
    Password,
    #[error("sslmode `{0}` may fall back to plain text; use disable, require, verify-ca or verify-full")]
    InsecureFallback(String),
    #[error("sslmode `{0}` is not one of disable, require, verify-ca, verify-full")]
    SslMode(String),
}

/// Checks a URL and takes its TLS mode out. `allow_password` is for the text of `urlFile`.
pub fn parse_postgres_url(text: &str, allow_password: bool) -> Result<PostgresTarget, PostgresUrlProblem> {
    let mut parsed = url::Url::parse(text.trim()).map_err(PostgresUrlProblem::Invalid)?;
    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        return Err(PostgresUrlProblem::Scheme(parsed.scheme().to_string()));
    }
    let host = parsed.host_str().filter(|h| !h.is_empty()).ok_or(PostgresUrlProblem::NoHost)?.to_string();
    if !allow_password && parsed.password().is_some() {
        return Err(PostgresUrlProblem::Password);
    }
    let mut tls = TlsMode::VerifyFull;
    let mut rest: Vec<(String, String)> = Vec::new();
    for (key, value) in parsed.query_pairs() {
        if key == "sslmode" {
            tls = match value.as_ref() {
                "disable" => TlsMode::Disable,
                "require" => TlsMode::Require,
                "verify-ca" => TlsMode::VerifyCa,
                "verify-full" => TlsMode::VerifyFull,
                "allow" | "prefer" => return Err(PostgresUrlProblem::InsecureFallback(value.into_owned())),
                other => return Err(PostgresUrlProblem::SslMode(other.to_string())),
            };
        } else {
            rest.push((key.into_owned(), value.into_owned()));
        }
    }
    if rest.is_empty() {
        parsed.set_query(None);
    } else {
        parsed.query_pairs_mut().clear().extend_pairs(rest);
    }
    Ok(PostgresTarget { url: parsed.to_string(), tls, host })
}

/// Lowercase letters, digits and `_`, not starting with a digit: used unquoted in SQL.
fn is_schema_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl PostgresSpool {
    pub(crate) fn problems(&self, out: &mut Vec<Problem>) {
        let mut problem =
            |key: &str, message: String| out.push(Problem { key: format!("spool.postgres.{key}"), message });
        match (&self.url, &self.url_file) {
            (Some(url), None) => {
                if let Err(url_problem) = parse_postgres_url(url, false) {
                    problem("url", url_problem.to_string());
                }
            }
            (None, Some(_)) => {}
            (Some(_), Some(_)) => problem("url", "set either `url` or `urlFile`, not both".into()),
            (None, None) => problem("url", "set `url` or `urlFile`".into()),
        }
        if !is_schema_name(&self.schema) {
            problem(
                "schema",
                format!("`{}` must be 1-63 lowercase letters, digits or `_`, not starting with a digit", self.schema),
            );
        }
        if self.queue.is_empty()
            || self.queue.len() > 253
            || !self.queue.bytes().all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b))
        {
            problem("queue", format!("`{}` must be 1-253 letters, digits, `.`, `_`, `/` or `-`", self.queue));
        }
        if !(3..=64).contains(&self.max_connections) {
            problem(
                "maxConnections",
                "must be between 3 and 64 (one listens, one claims deliveries, one or more store)".into(),
            );
        }
        if self.timeout.is_zero() {
            problem("timeout", "must be more than 0s".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tls_mode_is_taken_out_of_the_url_and_insecure_fallbacks_are_refused() {
        let target =
            parse_postgres_url("postgres://relay@db:5432/app?sslmode=disable&application_name=x", false).unwrap();
        assert_eq!(target.tls, TlsMode::Disable);
        assert_eq!(target.url, "postgres://relay@db:5432/app?application_name=x");
        assert_eq!(target.host, "db");
        let default = parse_postgres_url("postgresql://relay@db/app", false).unwrap();
        assert_eq!((default.tls, default.url.as_str()), (TlsMode::VerifyFull, "postgresql://relay@db/app"));
        assert_eq!(
            parse_postgres_url("postgres://db/app?sslmode=prefer", false),
            Err(PostgresUrlProblem::InsecureFallback("prefer".into()))
        );
        assert!(matches!(
            parse_postgres_url("postgres://db/app?sslmode=on", false),
            Err(PostgresUrlProblem::SslMode(_))
        ));
        assert!(matches!(parse_postgres_url("mysql://db/app", false), Err(PostgresUrlProblem::Scheme(_))));
    }

    #[test]
    fn a_password_is_refused_in_the_config_and_never_echoed() {
        let problem = parse_postgres_url("postgres://relay:hunter2@db/app", false).unwrap_err();
        assert_eq!(problem, PostgresUrlProblem::Password);
        assert!(!problem.to_string().contains("hunter2"));
        assert!(parse_postgres_url("postgres://relay:hunter2@db/app", true).is_ok(), "a urlFile may hold one");
    }
}
