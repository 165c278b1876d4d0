//! `appStoreServerApi`: how the sidecar calls Apple's App Store Server API (notification history, test
//! notifications). The private key stays in its file: the config names the file, never the key.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{Duration, Problem, check_http_url};

/// The App Store Server API credentials and where to reach it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppStoreServerApi {
    /// The in-app purchase key's id, from App Store Connect (Users and Access, Integrations).
    pub key_id: String,
    /// The issuer id shown above the keys in App Store Connect.
    pub issuer_id: String,
    /// The app whose notifications are asked for.
    pub bundle_id: String,
    /// The key's `.p8` file (a mounted Secret). Read when a request is signed; never printed.
    pub private_key_file: PathBuf,
    /// `Production` or `Sandbox`: which of Apple's hosts, and which history.
    pub environment: ApiEnvironment,
    /// Another base URL instead of Apple's host for `environment` (an egress proxy, a test server); the
    /// API's paths are appended to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// Total time for one request.
    #[serde(default = "default_timeout")]
    pub timeout: Duration,
}

/// The environments the App Store Server API serves (Xcode and local testing have none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum ApiEnvironment {
    Production,
    Sandbox,
}

impl ApiEnvironment {
    /// How far back Apple keeps notification history: 180 days in production, 30 in the sandbox.
    pub fn history_retention(self) -> std::time::Duration {
        let days = match self {
            ApiEnvironment::Production => 180,
            ApiEnvironment::Sandbox => 30,
        };
        std::time::Duration::from_secs(days * 24 * 3600)
    }
}

impl fmt::Display for ApiEnvironment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ApiEnvironment::Production => "Production",
            ApiEnvironment::Sandbox => "Sandbox",
        })
    }
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

impl AppStoreServerApi {
    pub(crate) fn problems(&self, out: &mut Vec<Problem>) {
        let mut problem = |key: &str, message: String| {
            out.push(Problem { key: format!("appStoreServerApi.{key}"), message });
        };
        // Key ids are ten upper-case letters and digits; issuer ids are UUIDs. Only the shape is checked
        // here (a wrong value is Apple's 401, reported when it happens).
        if self.key_id.is_empty() || !self.key_id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            problem("keyId", "must be the key's id from App Store Connect (letters and digits)".into());
        }
        if self.issuer_id.is_empty() || !self.issuer_id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
            problem("issuerId", "must be the issuer id from App Store Connect (a UUID)".into());
        }
        if self.bundle_id.trim().is_empty() {
            problem("bundleId", "must not be empty".into());
        }
        if self.private_key_file.as_os_str().is_empty() {
            problem("privateKeyFile", "must name the key's .p8 file".into());
        }
        if let Some(url) = &self.base_url {
            if let Err(url_problem) = check_http_url(url, false) {
                problem("baseUrl", url_problem.to_string());
            }
        }
        if self.timeout.is_zero() {
            problem("timeout", "must be more than 0s".into());
        }
    }
}

/// `gapFill`: on an interval, ask Apple's history for the notifications of the last `lookback` and
/// replay those the spool does not have through the normal path (verification, spool, the app, every
/// destination).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GapFill {
    #[serde(default = "default_gap_fill_interval")]
    pub interval: Duration,
    /// How far back each run looks; at most Apple's history (180 days, 30 in the sandbox) and at most
    /// `dedupe.window` (older notifications would look missing and be replayed again).
    #[serde(default = "default_gap_fill_lookback")]
    pub lookback: Duration,
    #[serde(default)]
    pub scope: GapFillScope,
    /// With the SQLite spool: this sidecar is the only replica of its route. Each replica keeps its own
    /// spool, so a second one would replay into its own everything the first one has.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub only_replica: bool,
}

/// Which of Apple's notifications a gap-fill run considers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum GapFillScope {
    /// Those Apple failed to send (`onlyFailures`), including those it is still retrying.
    #[default]
    Failures,
    /// Every notification in the window: also those Apple sent that were lost after (a pod-local
    /// spool deleted with its pod).
    All,
}

fn default_gap_fill_interval() -> Duration {
    Duration::from_secs(15 * 60)
}

fn default_gap_fill_lookback() -> Duration {
    Duration::from_secs(72 * 3600)
}

impl GapFill {
    /// `api`: the config's `appStoreServerApi`; `dedupe_window`: `dedupe.window`; `sqlite`: whether the
    /// spool is the pod's own.
    pub(crate) fn problems(
        &self,
        api: Option<&AppStoreServerApi>,
        dedupe_window: Duration,
        sqlite: bool,
        out: &mut Vec<Problem>,
    ) {
        let mut problem = |key: &str, message: String| {
            out.push(Problem {
                key: if key.is_empty() { "gapFill".into() } else { format!("gapFill.{key}") },
                message,
            });
        };
        match api {
            None => problem("", "needs `appStoreServerApi` (the key it reads Apple's history with)".into()),
            Some(api) if self.lookback.get() > api.environment.history_retention() => problem(
                "lookback",
                format!(
                    "{} is longer than the {} days of history Apple keeps in {}",
                    self.lookback,
                    api.environment.history_retention().as_secs() / 86_400,
                    api.environment
                ),
            ),
            Some(_) => {}
        }
        if self.interval.is_zero() {
            problem("interval", "must be more than 0s".into());
        }
        if self.lookback.is_zero() {
            problem("lookback", "must be more than 0s".into());
        }
        if dedupe_window.is_zero() {
            problem("", "needs `dedupe.window` (replays are recognised by their notificationUUID)".into());
        } else if self.lookback > dedupe_window {
            problem(
                "lookback",
                format!(
                    "{} is longer than dedupe.window ({dedupe_window}): older notifications would look missing and be replayed again",
                    self.lookback
                ),
            );
        }
        if sqlite && !self.only_replica {
            problem(
                "onlyReplica",
                "with the SQLite spool each replica keeps its own spool, so each would replay into its own what the others have: use spool.backend: postgres, or set onlyReplica: true if this route runs exactly one pod".into(),
            );
        }
    }
}

/// `selfTest`: on an interval, ask Apple for a test notification and follow it to every destination
/// (`storerelay-sidecar apple test`), exporting the time of the last success.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SelfTest {
    #[serde(default = "default_self_test_interval")]
    pub interval: Duration,
    /// How long one test may take, from the request to the last destination.
    #[serde(default = "default_self_test_timeout")]
    pub timeout: Duration,
    /// With the SQLite spool: this sidecar is the only replica of its route (Apple's test notification
    /// may reach any replica, and only that one's spool would have it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub only_replica: bool,
}

fn default_self_test_interval() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn default_self_test_timeout() -> Duration {
    Duration::from_secs(120)
}

impl SelfTest {
    pub(crate) fn problems(&self, api: Option<&AppStoreServerApi>, sqlite: bool, out: &mut Vec<Problem>) {
        let mut problem = |key: &str, message: String| {
            out.push(Problem {
                key: if key.is_empty() { "selfTest".into() } else { format!("selfTest.{key}") },
                message,
            });
        };
        if api.is_none() {
            problem("", "needs `appStoreServerApi` (the key it asks Apple for a test notification with)".into());
        }
        if self.interval.is_zero() {
            problem("interval", "must be more than 0s".into());
        }
        if self.timeout.is_zero() {
            problem("timeout", "must be more than 0s".into());
        }
        if sqlite && !self.only_replica {
            problem(
                "onlyReplica",
                "with the SQLite spool Apple's test notification reaches one replica and only its own spool has it, so the others would report failures: use spool.backend: postgres, or set onlyReplica: true if this route runs exactly one pod".into(),
            );
        }
    }
}
