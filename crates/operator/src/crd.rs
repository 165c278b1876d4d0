//! The `NotificationRoute` resource: which pods get the sidecar, and how it is configured.
//!
//! What the schema can check it checks (ports, required fields, CEL rules for unique destination names
//! and exactly one of `url`/`urlFrom`), so `kubectl apply` refuses a broken route at once; the rest
//! (secrets, rendered config) is checked in reconcile and reported as conditions.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};
use storerelay_config::{
    AckMode, ApiEnvironment, DestinationMatch, Environment, GapFillScope, SyncMode, UnknownBodies, VerifyMode,
};

pub const GROUP: &str = "storerelay.dev";

#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "storerelay.dev",
    version = "v1alpha1",
    kind = "NotificationRoute",
    plural = "notificationroutes",
    shortname = "nroute",
    namespaced,
    status = "NotificationRouteStatus",
    doc = "Mirrors App Store server notifications received by the selected pods to destinations such as RevenueCat.",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Matched","type":"integer","jsonPath":".status.matched"}"#,
    printcolumn = r#"{"name":"Injected","type":"integer","jsonPath":".status.injected"}"#,
    printcolumn = r#"{"name":"Outdated","type":"integer","jsonPath":".status.outdated"}"#,
    printcolumn = r#"{"name":"Missing","type":"integer","jsonPath":".status.missing"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(
    cel,
    validation = Rule::new("self.destinations.all(d, self.destinations.exists_one(e, e.name == d.name))").message("destination names must be unique"),
    validation = Rule::new("!has(self.upstream) || self.upstream.port != self.listen.port").message("upstream.port must differ from listen.port"),
    validation = Rule::new("self.listen.port != self.listen.adminPort").message("listen.port must differ from listen.adminPort")
)]
#[serde(rename_all = "camelCase")]
pub struct NotificationRouteSpec {
    /// Pods in the route's namespace that get the sidecar.
    #[x_kube(validation = Rule::new("(has(self.matchLabels) && size(self.matchLabels) > 0) || (has(self.matchExpressions) && size(self.matchExpressions) > 0)").message("selector must not be empty: it would match every pod in the namespace"))]
    pub selector: LabelSelector,
    /// The app's port in the pod. Omitted: the sidecar answers Apple itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamSpec>,
    #[serde(default)]
    pub listen: ListenSpec,
    /// upstream | spooled | delivered. Default: upstream with an upstream, else spooled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack: Option<AckMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifySpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unknown_bodies: Option<UnknownBodies>,
    #[x_kube(validation = Rule::new("size(self) > 0").message("at least one destination"))]
    #[schemars(length(max = 16))]
    pub destinations: Vec<DestinationSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spool: Option<SpoolSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<SidecarSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutSpec>,
    /// Apple's App Store Server API, for gap-fill and the self test.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_store_server_api: Option<AppStoreServerApiSpec>,
    /// Replays from Apple's notification history what never reached the spool (needs
    /// appStoreServerApi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gap_fill: Option<GapFillSpec>,
    /// Asks Apple for a test notification on an interval and follows it to every destination (needs
    /// appStoreServerApi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_test: Option<SelfTestSpec>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AppStoreServerApiSpec {
    /// The In-App Purchase key's id (App Store Connect, Users and Access, Integrations).
    #[schemars(regex(pattern = "^[A-Za-z0-9]{1,64}$"))]
    pub key_id: String,
    /// The issuer id shown above the keys.
    #[schemars(regex(pattern = "^[0-9a-fA-F-]{1,64}$"))]
    pub issuer_id: String,
    #[schemars(length(min = 1, max = 255))]
    pub bundle_id: String,
    pub environment: ApiEnvironment,
    /// A Secret key holding the key's .p8 file.
    pub key_from: SecretSource,
    /// Another base URL instead of Apple's host (an egress proxy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub timeout: Option<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GapFillSpec {
    /// Default 15m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub interval: Option<String>,
    /// Default 72h; at most Apple's history (180 days, 30 in Sandbox).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub lookback: Option<String>,
    /// failures (default) or all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<GapFillScope>,
    /// Without spool.postgres: the selected workload runs exactly one pod (each pod's own spool would
    /// otherwise get what the others have).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub only_replica: Option<bool>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SelfTestSpec {
    /// Default 24h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub interval: Option<String>,
    /// Without spool.postgres: the selected workload runs exactly one pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub only_replica: Option<bool>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamSpec {
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Duration such as 5s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub timeout: Option<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ListenSpec {
    /// The port Apple's notifications reach (point the Service here).
    #[serde(default = "default_listen_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Health and metrics.
    #[serde(default = "default_admin_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub admin_port: i32,
    #[serde(default = "default_paths")]
    #[schemars(length(min = 1, max = 16))]
    pub paths: Vec<String>,
}

impl Default for ListenSpec {
    fn default() -> Self {
        ListenSpec { port: default_listen_port(), admin_port: default_admin_port(), paths: default_paths() }
    }
}

fn default_listen_port() -> i32 {
    8089
}
fn default_admin_port() -> i32 {
    9089
}
fn default_paths() -> Vec<String> {
    vec!["/apple/notifications".to_string()]
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VerifySpec {
    #[serde(default)]
    pub mode: VerifyMode,
    /// Apple Root CA - G3 (DER or PEM), from a ConfigMap or a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apple_root: Option<KeySource>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bundle_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub app_apple_ids: Vec<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub environments: Vec<Environment>,
    /// The app's shared secret for V1 notifications.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v1_password_from: Option<SecretSource>,
}

/// A key of a ConfigMap or of a Secret in the route's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.configMapKeyRef) != has(self.secretKeyRef)").message("set exactly one of configMapKeyRef and secretKeyRef"))]
pub struct KeySource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_key_ref: Option<KeyRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<KeyRef>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretSource {
    pub secret_key_ref: KeyRef,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(cel, validation = Rule::new("has(self.url) != has(self.urlFrom)").message("set exactly one of url and urlFrom"))]
pub struct DestinationSpec {
    /// Lowercase letters, digits and '-'; used in metrics and volume names.
    #[schemars(length(min = 1, max = 40), regex(pattern = "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$"))]
    pub name: String,
    /// For endpoints without a secret in the URL. RevenueCat's carries one: use urlFrom.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_from: Option<SecretSource>,
    /// A Secret key holding a YAML or JSON map of extra headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers_from: Option<SecretSource>,
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub filter: Option<DestinationMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub concurrency: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RetrySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub initial_backoff: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub max_backoff: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub max_age: Option<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SpoolSpec {
    /// The spool's emptyDir size, e.g. 256Mi. The sidecar keeps its data to three quarters of it, so
    /// SQLite's journal never pushes the pod past the limit (which would get it evicted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(Ki|Mi|Gi|Ti)?$"))]
    pub size_limit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncMode>,
    /// One queue in PostgreSQL shared by every selected pod, instead of a SQLite file in each pod's
    /// emptyDir: a deleted pod loses nothing, and Apple's retries reaching another pod are not
    /// mirrored twice. The queue is named `<namespace>/<route>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PostgresSpoolSpec>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PostgresSpoolSpec {
    /// A Secret key holding `postgres://user:password@host:5432/db?sslmode=verify-full`.
    pub url_from: SecretSource,
    /// The schema for the spool's tables (created if missing). Default: storerelay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^[a-z_][a-z0-9_]{0,62}$"))]
    pub schema: Option<String>,
    /// PEM CA certificates the server's certificate must chain to (sslmode=verify-ca/verify-full).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_certificate_from: Option<KeySource>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SidecarSpec {
    /// Overrides the operator's default sidecar image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    #[serde(default)]
    pub policy: RolloutPolicy,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RolloutPolicy {
    /// Report which workloads need a restart; change nothing.
    #[default]
    Manual,
    /// Restart owning Deployments, StatefulSets and DaemonSets (never bare Pods or Jobs).
    RestartWorkloads,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NotificationRouteStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Hash of the injection-time fields; pods annotated with another one are outdated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// The ConfigMap holding the rendered sidecar config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<String>,
    #[serde(default)]
    pub matched: i32,
    #[serde(default)]
    pub injected: i32,
    #[serde(default)]
    pub outdated: i32,
    #[serde(default)]
    pub missing: i32,
    /// Workloads whose pods are outdated or missing the sidecar (to restart with policy Manual).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads_to_restart: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Labels of a selector as a map, for the common matchLabels-only case in tests and tools.
pub fn match_labels(labels: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()),
        match_expressions: None,
    }
}
