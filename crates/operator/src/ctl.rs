//! `storerelayctl check`: is storerelay healthy in this cluster? The CRD is served, the webhook
//! configuration trusts the certificate the operator serves, and each route's status in a line.

use std::fmt::Write;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

use crate::crd::NotificationRoute;
use crate::webhook_config::bundle_from_secret;

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
