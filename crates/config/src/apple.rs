//! The config keys that make the sidecar understand Apple's notifications: signature verification,
//! duplicate suppression, unknown bodies, and per-destination routing.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{Duration, Problem};

/// Apple's environments, as V2 notifications name them (V1's `PROD` is `Production`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum Environment {
    Production,
    Sandbox,
    Xcode,
    LocalTesting,
}

impl Environment {
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Production => "Production",
            Environment::Sandbox => "Sandbox",
            Environment::Xcode => "Xcode",
            Environment::LocalTesting => "LocalTesting",
        }
    }

    /// Reads V2's and V1's spellings.
    pub fn parse(text: &str) -> Option<Environment> {
        match text {
            "Production" | "PROD" => Some(Environment::Production),
            "Sandbox" => Some(Environment::Sandbox),
            "Xcode" => Some(Environment::Xcode),
            "LocalTesting" => Some(Environment::LocalTesting),
            _ => None,
        }
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The notification format: V1 (plain JSON, deprecated but still sent) or V2 (`signedPayload`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum NotificationVersion {
    V1,
    V2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum VerifyMode {
    /// Nothing is checked.
    #[default]
    Off,
    /// Failures are logged and counted; the notification is accepted.
    Log,
    /// Failures get 401 and go nowhere.
    Enforce,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VerifyConfig {
    #[serde(default)]
    pub mode: VerifyMode,
    /// Trusted roots, DER or PEM files: Apple Root CA - G3 in production.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub root_certificates: Vec<PathBuf>,
    /// Only these apps' notifications pass (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bundle_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub app_apple_ids: Vec<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub environments: Vec<Environment>,
    /// The app's shared secret, which V1 bodies carry as `password`. Prefer `v1PasswordFile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v1_password: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v1_password_file: Option<PathBuf>,
}

impl VerifyConfig {
    pub fn is_default(&self) -> bool {
        *self == VerifyConfig::default()
    }

    pub(crate) fn problems(&self, out: &mut Vec<Problem>) {
        if self.mode == VerifyMode::Enforce && self.root_certificates.is_empty() {
            out.push(Problem {
                key: "verify.rootCertificates".into(),
                message: "`mode: enforce` needs at least one root certificate (mount Apple Root CA - G3, \
                          SHA-256 63343abfb89a6a03ebb57e9b3f5fa7be7c4f5c756f3017b3a8c488c3653e9179)"
                    .into(),
            });
        }
        if self.v1_password.is_some() && self.v1_password_file.is_some() {
            out.push(Problem {
                key: "verify.v1Password".into(),
                message: "set either `v1Password` or `v1PasswordFile`, not both".into(),
            });
        }
        if self.v1_password.as_deref() == Some("") {
            out.push(Problem { key: "verify.v1Password".into(), message: "must not be empty".into() });
        }
    }
}

/// What to do with a JSON body that is neither a V1 nor a V2 notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum UnknownBodies {
    /// Store and mirror it like any other (to destinations without a `match`).
    #[default]
    Forward,
    /// Answer 400.
    Reject,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DedupeConfig {
    /// How long a notification's key (V2 `notificationUUID`, V1 body SHA-256) is remembered. Longer
    /// than Apple's ~157 h retry span by default; `0s` turns suppression off.
    #[serde(default = "default_dedupe_window")]
    pub window: Duration,
}

impl Default for DedupeConfig {
    fn default() -> Self {
        DedupeConfig { window: default_dedupe_window() }
    }
}

fn default_dedupe_window() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

/// Which notifications a destination gets. Every list that is set must contain the notification's
/// value; empty lists match everything.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationMatch {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub environments: Vec<Environment>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bundle_ids: Vec<String>,
    /// Apple's `notificationType` (V2) or `notification_type` (V1) values, e.g. `DID_RENEW`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notification_types: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subtypes: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub versions: Vec<NotificationVersion>,
}

/// What routing looks at in a notification.
#[derive(Debug, Clone, Copy, Default)]
pub struct RouteFacts<'a> {
    pub version: Option<NotificationVersion>,
    pub environment: Option<Environment>,
    pub bundle_id: Option<&'a str>,
    pub notification_type: Option<&'a str>,
    pub subtype: Option<&'a str>,
}

impl DestinationMatch {
    pub fn is_empty(&self) -> bool {
        *self == DestinationMatch::default()
    }

    /// Whether a notification with these facts goes to the destination. A list that is set never
    /// matches a notification that lacks the value (an unknown body only reaches unfiltered ones).
    pub fn matches(&self, facts: &RouteFacts<'_>) -> bool {
        fn allowed<T: PartialEq>(list: &[T], value: Option<T>) -> bool {
            list.is_empty() || value.is_some_and(|v| list.contains(&v))
        }
        fn allowed_text(list: &[String], value: Option<&str>) -> bool {
            list.is_empty() || value.is_some_and(|v| list.iter().any(|item| item == v))
        }
        allowed(&self.environments, facts.environment)
            && allowed(&self.versions, facts.version)
            && allowed_text(&self.bundle_ids, facts.bundle_id)
            && allowed_text(&self.notification_types, facts.notification_type)
            && allowed_text(&self.subtypes, facts.subtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_match_takes_everything_and_lists_filter() {
        let sandbox = RouteFacts {
            version: Some(NotificationVersion::V2),
            environment: Some(Environment::Sandbox),
            bundle_id: Some("com.example"),
            notification_type: Some("DID_RENEW"),
            subtype: None,
        };
        assert!(DestinationMatch::default().matches(&sandbox));
        assert!(DestinationMatch::default().matches(&RouteFacts::default()));
        let production_only = DestinationMatch { environments: vec![Environment::Production], ..Default::default() };
        assert!(!production_only.matches(&sandbox));
        let renewals = DestinationMatch {
            notification_types: vec!["DID_RENEW".into(), "SUBSCRIBED".into()],
            ..Default::default()
        };
        assert!(renewals.matches(&sandbox));
        let with_subtype = DestinationMatch { subtypes: vec!["INITIAL_BUY".into()], ..Default::default() };
        assert!(!with_subtype.matches(&sandbox), "a set list never matches a missing value");
        let v1_only = DestinationMatch { versions: vec![NotificationVersion::V1], ..Default::default() };
        assert!(!v1_only.matches(&sandbox));
        assert!(!production_only.matches(&RouteFacts::default()), "unknown bodies reach only unfiltered destinations");
    }

    #[test]
    fn environments_read_both_spellings() {
        assert_eq!(Environment::parse("PROD"), Some(Environment::Production));
        assert_eq!(Environment::parse("Production"), Some(Environment::Production));
        assert_eq!(Environment::parse("Sandbox"), Some(Environment::Sandbox));
        assert_eq!(Environment::parse("prod"), None);
    }
}
