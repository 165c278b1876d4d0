//! storerelayctl's commands. Offline: a route file rendered to its sidecar config, or its injection
//! applied to manifests (through [`crate::manifests`]). Online, `check`: is storerelay healthy in this
//! cluster? The CRD is served, the webhook configuration trusts the certificate the operator serves,
//! and each route's status in a line.

use std::fmt::Write;
use std::io::Read;
use std::path::{Path, PathBuf};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

use crate::crd::NotificationRoute;
use crate::inject::{ImagePolicy, InjectOptions, injection};
use crate::manifests::{ManifestError, inject_documents, uninject_documents};
use crate::render::{RenderError, render_yaml};
use crate::webhook_config::bundle_from_secret;

/// Why an offline command failed: the file at fault, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: not a NotificationRoute: {source}", path.display())]
    NotARoute { path: PathBuf, source: serde_yaml::Error },
    #[error("{}: holds {found} NotificationRoutes; pass a file with exactly one", path.display())]
    RouteCount { path: PathBuf, found: usize },
    #[error("{}: {source}", path.display())]
    Render { path: PathBuf, source: RenderError },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

/// The one NotificationRoute in a file, which may hold other documents too (the examples put the
/// Secret it names beside it). A file of one document is read as a route whatever its `kind`, so a
/// route without one gets the field-by-field error.
pub fn read_route(path: &Path) -> Result<NotificationRoute, OfflineError> {
    use serde::Deserialize;
    let text = std::fs::read_to_string(path).map_err(|source| OfflineError::Read { path: path.into(), source })?;
    let not_a_route = |source| OfflineError::NotARoute { path: path.into(), source };
    let mut kinds = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value = serde_yaml::Value::deserialize(document).map_err(not_a_route)?;
        kinds.push(value.get("kind").and_then(serde_yaml::Value::as_str).map(str::to_owned));
    }
    let routes: Vec<usize> = kinds
        .iter()
        .enumerate()
        .filter(|(_, kind)| kind.as_deref() == Some("NotificationRoute"))
        .map(|(i, _)| i)
        .collect();
    let index = match (kinds.len(), routes.as_slice()) {
        (1, _) => 0,
        (_, [one]) => *one,
        (_, found) => return Err(OfflineError::RouteCount { path: path.into(), found: found.len() }),
    };
    // Parsed from its own document again, so an error names the key and line in the file.
    let document = serde_yaml::Deserializer::from_str(&text)
        .nth(index)
        .ok_or(OfflineError::RouteCount { path: path.into(), found: 0 })?;
    NotificationRoute::deserialize(document).map_err(not_a_route)
}

/// `render-config`: the sidecar config a route file renders to.
pub fn render_config(route_path: &Path) -> Result<String, OfflineError> {
    let route = read_route(route_path)?;
    render_yaml(&route).map_err(|source| OfflineError::Render { path: route_path.into(), source })
}

/// Manifests from a file, or from standard input when `file` is `-`.
pub fn read_manifests(file: &str) -> Result<String, OfflineError> {
    if file == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|source| OfflineError::Read { path: "standard input".into(), source })?;
        return Ok(text);
    }
    std::fs::read_to_string(file).map_err(|source| OfflineError::Read { path: file.into(), source })
}

/// `inject` (or `uninject`): the route's sidecar added to (removed from) every selected Pod and pod
/// template in `manifests`.
pub fn rewrite_manifests(
    route_path: &Path,
    manifests: &str,
    image: Option<&str>,
    inject: bool,
) -> Result<String, OfflineError> {
    let route = read_route(route_path)?;
    // Whoever runs storerelayctl writes the manifests anyway: no image is refused offline.
    let mut options = InjectOptions { image_policy: ImagePolicy::Any, ..InjectOptions::default() };
    if let Some(image) = image {
        options.image = image.to_string();
    }
    let injection = injection(&route, &options);
    let rewritten = if inject {
        inject_documents(manifests, &route, &injection)
    } else {
        uninject_documents(manifests, &route, &injection)
    };
    Ok(rewritten?)
}

pub struct CheckTarget {
    pub namespace: String,
    pub configuration_name: String,
    pub secret_name: String,
}

/// Returns the report and whether everything passed.
pub async fn check(client: Client, target: &CheckTarget) -> Result<(String, bool), kube::Error> {
    let mut out = String::new();
    let mut ok = true;
    let mut line = |passed: bool, text: String| {
        ok &= passed;
        let _ = writeln!(out, "[{}] {text}", if passed { "ok" } else { "FAIL" });
    };

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    match crds.get_opt("notificationroutes.storerelay.dev").await? {
        Some(crd) => {
            let established = crd
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            line(
                established,
                format!(
                    "CRD notificationroutes.storerelay.dev {}",
                    if established { "established" } else { "not established" }
                ),
            );
        }
        None => line(
            false,
            "CRD notificationroutes.storerelay.dev is not installed (storerelayctl crd | kubectl apply -f -)".into(),
        ),
    }

    let configurations: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &target.namespace);
    let configuration = configurations.get_opt(&target.configuration_name).await?;
    let bundle = secrets.get_opt(&target.secret_name).await.ok().flatten().as_ref().and_then(bundle_from_secret);
    match (&configuration, &bundle) {
        (None, _) => line(false, format!("MutatingWebhookConfiguration {} not found", target.configuration_name)),
        (Some(configuration), Some(bundle)) => {
            let wanted = bundle.ca_cert_pem.as_bytes();
            let matches = configuration
                .webhooks
                .iter()
                .flatten()
                .all(|w| w.client_config.ca_bundle.as_ref().is_some_and(|b| b.0 == wanted));
            line(
                matches,
                format!("webhook caBundle {} the operator's CA", if matches { "matches" } else { "does not match" }),
            );
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            let days = (bundle.not_after - now) / 86_400;
            line(
                bundle.not_after > now,
                format!("serving certificate valid for {days} more days (rotated 30 days before expiry)"),
            );
        }
        (Some(configuration), None) => {
            let has_bundle = configuration.webhooks.iter().flatten().all(|w| w.client_config.ca_bundle.is_some());
            line(
                has_bundle,
                format!(
                    "no operator-managed certificate in {}/{} (cert-manager mode?); caBundle {}",
                    target.namespace,
                    target.secret_name,
                    if has_bundle { "present" } else { "missing" }
                ),
            );
        }
    }

    let routes: Api<NotificationRoute> = Api::all(client);
    for route in routes.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default() {
        let status = route.status.clone().unwrap_or_default();
        let ready = status.conditions.iter().find(|c| c.type_ == "Ready");
        let passed = ready.is_some_and(|c| c.status == "True");
        line(
            passed,
            format!(
                "route {}/{}: matched {} injected {} outdated {} missing {}{}",
                route.namespace().unwrap_or_default(),
                route.name_any(),
                status.matched,
                status.injected,
                status.outdated,
                status.missing,
                ready.map(|c| format!(" — {}: {}", c.reason, c.message)).unwrap_or_else(|| " — no status yet".into())
            ),
        );
    }
    Ok((out, ok))
}
