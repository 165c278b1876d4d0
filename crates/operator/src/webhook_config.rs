//! Keeps the webhook reachable and narrow: the serving certificate (made, stored in a Secret, rotated
//! well before expiry, loaded by every replica) and, on the MutatingWebhookConfiguration, the
//! `caBundle` and a `namespaceSelector` limited to namespaces that have routes, re-patched on drift.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::reflector::Store;
use kube::{Client, ResourceExt};
use serde_json::json;
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::certs::{self, CertAction, CertBundle, CertResolver};
use crate::crd::NotificationRoute;
use crate::metrics::Metrics;

const NAMESPACE_LABEL: &str = "kubernetes.io/metadata.name";
/// Matches no namespace: what the selector holds while no route exists (an empty `In` is invalid).
const NO_NAMESPACE: &str = "storerelay-no-routes";
const EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub enum CertMode {
    /// The operator makes, stores, rotates and publishes the certificate.
    Operator,
    /// Certificates come from files (cert-manager or another issuer); nothing is patched.
    Files { cert: PathBuf, key: PathBuf },
}

#[derive(Debug, Clone)]
pub struct WebhookSettings {
    pub namespace: String,
    pub secret_name: String,
    pub service_name: String,
    pub configuration_name: String,
    pub mode: CertMode,
    /// Extra names and addresses for the certificate (tests that call the webhook by IP).
    pub extra_dns_names: Vec<String>,
    pub extra_ips: Vec<IpAddr>,
}

impl WebhookSettings {
    pub fn dns_names(&self) -> Vec<String> {
        let (service, namespace) = (&self.service_name, &self.namespace);
        let mut names = vec![
            format!("{service}.{namespace}.svc"),
            format!("{service}.{namespace}.svc.cluster.local"),
            format!("{service}.{namespace}"),
            service.clone(),
        ];
        names.extend(self.extra_dns_names.iter().cloned());
        names
    }
}

/// The namespaces the webhook should see: those with routes, never the operator's own nor kube-system.
pub fn namespace_selector(route_namespaces: &BTreeSet<String>, own_namespace: &str) -> LabelSelector {
    let mut values: Vec<String> = route_namespaces
        .iter()
        .filter(|n| n.as_str() != own_namespace && n.as_str() != "kube-system")
        .cloned()
        .collect();
    if values.is_empty() {
        values.push(NO_NAMESPACE.into());
    }
    LabelSelector {
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: NAMESPACE_LABEL.into(),
            operator: "In".into(),
            values: Some(values),
        }]),
        match_labels: None,
    }
}

pub fn bundle_from_secret(secret: &Secret) -> Option<CertBundle> {
    let data = secret.data.as_ref()?;
    let text = |key: &str| data.get(key).and_then(|b| String::from_utf8(b.0.clone()).ok());
    let annotation = |key: &str| secret.annotations().get(key).and_then(|v| v.parse::<i64>().ok());
    Some(CertBundle {
        ca_cert_pem: text("ca.crt")?,
        ca_key_pem: text("ca.key")?,
        cert_pem: text("tls.crt")?,
        key_pem: text("tls.key")?,
        ca_not_after: annotation("storerelay.dev/ca-not-after")?,
        not_after: annotation("storerelay.dev/not-after")?,
    })
}

pub fn secret_from_bundle(name: &str, namespace: &str, bundle: &CertBundle) -> Secret {
    let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
    Secret {
        metadata: kube::core::ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            annotations: Some(BTreeMap::from([
                ("storerelay.dev/ca-not-after".to_string(), bundle.ca_not_after.to_string()),
                ("storerelay.dev/not-after".to_string(), bundle.not_after.to_string()),
            ])),
            labels: Some(BTreeMap::from([(
                crate::controller::MANAGED_BY.0.to_string(),
                crate::controller::MANAGED_BY.1.to_string(),
            )])),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            ("ca.crt".to_string(), bytes(&bundle.ca_cert_pem)),
            ("ca.key".to_string(), bytes(&bundle.ca_key_pem)),
            ("tls.crt".to_string(), bytes(&bundle.cert_pem)),
            ("tls.key".to_string(), bytes(&bundle.key_pem)),
        ])),
        ..Default::default()
    }
}

/// Runs forever: every replica loads the current certificate; the leader also creates or rotates it
/// and patches the webhook configuration when it drifts.
pub async fn manage(
    client: Client,
    settings: WebhookSettings,
    resolver: Arc<CertResolver>,
    routes: Store<NotificationRoute>,
    mut leader: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
) {
    loop {
        let leads = *leader.borrow();
        if let Err(error) = step(&client, &settings, &resolver, &routes, leads, &metrics).await {
            tracing::warn!(%error, "webhook certificate or configuration");
        }
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = leader.changed() => {}
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Cert(#[from] certs::CertError),
}

async fn step(
    client: &Client,
    settings: &WebhookSettings,
    resolver: &CertResolver,
    routes: &Store<NotificationRoute>,
    leader: bool,
    metrics: &Metrics,
) -> Result<(), ManageError> {
    let bundle = match &settings.mode {
        CertMode::Files { cert, key } => {
            if resolver.load_files(cert, key)? {
                tracing::info!(cert = %cert.display(), "webhook certificate loaded");
            }
            None
        }
        CertMode::Operator => {
            let secrets: Api<Secret> = Api::namespaced(client.clone(), &settings.namespace);
            let stored = secrets.get_opt(&settings.secret_name).await?;
            let mut bundle = stored.as_ref().and_then(bundle_from_secret);
            if leader {
                let now = OffsetDateTime::now_utc();
                let replacement = match certs::plan(bundle.as_ref(), now) {
                    CertAction::Keep => None,
                    CertAction::Renew => {
                        bundle.as_ref().map(|b| certs::renew(b, &settings.dns_names(), &settings.extra_ips, now))
                    }
                    CertAction::Regenerate => Some(certs::generate(&settings.dns_names(), &settings.extra_ips, now)),
                };
                if let Some(fresh) = replacement {
                    let fresh = fresh?;
                    let mut secret = secret_from_bundle(&settings.secret_name, &settings.namespace, &fresh);
                    match &stored {
                        Some(existing) => {
                            secret.metadata.resource_version = existing.metadata.resource_version.clone();
                            secrets.replace(&settings.secret_name, &PostParams::default(), &secret).await?;
                        }
                        None => {
                            secrets.create(&PostParams::default(), &secret).await?;
                        }
                    }
                    tracing::info!(not_after = fresh.not_after, "webhook serving certificate issued");
                    bundle = Some(fresh);
                }
            }
            if let Some(current) = &bundle {
                if resolver.load(&current.cert_pem, &current.key_pem)? {
                    tracing::info!("webhook certificate loaded");
                }
            }
            bundle
        }
    };
    if leader {
        let namespaces: BTreeSet<String> = routes.state().iter().filter_map(|r| r.namespace()).collect();
        patch_configuration(
            client,
            settings,
            bundle.as_ref(),
            &namespace_selector(&namespaces, &settings.namespace),
            metrics,
        )
        .await?;
    }
    Ok(())
}

/// Patches `caBundle` (operator mode) and `namespaceSelector` of every webhook in the configuration
/// where they differ, guarded by the resourceVersion it read.
async fn patch_configuration(
    client: &Client,
    settings: &WebhookSettings,
    bundle: Option<&CertBundle>,
    selector: &LabelSelector,
    metrics: &Metrics,
) -> Result<(), kube::Error> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let Some(configuration) = api.get_opt(&settings.configuration_name).await? else {
        tracing::warn!(name = %settings.configuration_name, "MutatingWebhookConfiguration not found; pods are not injected");
        return Ok(());
    };
    let mut operations =
        vec![json!({"op": "test", "path": "/metadata/resourceVersion", "value": configuration.resource_version()})];
    let mut fields = Vec::new();
    for (index, webhook) in configuration.webhooks.iter().flatten().enumerate() {
        if let Some(bundle) = bundle {
            let wanted = ByteString(bundle.ca_cert_pem.as_bytes().to_vec());
            if webhook.client_config.ca_bundle.as_ref() != Some(&wanted) {
                operations.push(
                    json!({"op": "add", "path": format!("/webhooks/{index}/clientConfig/caBundle"), "value": wanted}),
                );
                fields.push("caBundle");
            }
        }
        if webhook.namespace_selector.as_ref() != Some(selector) {
            operations
                .push(json!({"op": "add", "path": format!("/webhooks/{index}/namespaceSelector"), "value": selector}));
            fields.push("namespaceSelector");
        }
    }
    if fields.is_empty() {
        return Ok(());
    }
    let patch: json_patch::Patch = serde_json::from_value(json!(operations)).map_err(kube::Error::SerdeError)?;
    let params = PatchParams { field_manager: Some(crate::controller::FIELD_MANAGER.into()), ..Default::default() };
    api.patch(&settings.configuration_name, &params, &Patch::<()>::Json(patch)).await?;
    for field in fields.iter().copied() {
        metrics.count_webhook_patch(field);
    }
    tracing::info!(?fields, "patched the MutatingWebhookConfiguration");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_starts_with_the_same_no_routes_selector() {
        let template = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../charts/storerelay/templates/mutatingwebhookconfiguration.yaml"
        ))
        .unwrap();
        let selector = namespace_selector(&BTreeSet::new(), "storerelay");
        let values = selector.match_expressions.unwrap()[0].values.clone().unwrap();
        assert_eq!(values, [NO_NAMESPACE]);
        assert!(template.contains(&format!("operator: In\n          values: [\"{NO_NAMESPACE}\"]")), "{template}");
    }

    #[test]
    fn the_selector_lists_route_namespaces_but_never_our_own_or_kube_system() {
        let namespaces: BTreeSet<String> =
            ["shop", "storerelay", "kube-system", "billing"].iter().map(|s| s.to_string()).collect();
        let selector = namespace_selector(&namespaces, "storerelay");
        let expression = &selector.match_expressions.unwrap()[0];
        assert_eq!(expression.key, "kubernetes.io/metadata.name");
        assert_eq!(expression.values.as_deref(), Some(&["billing".to_string(), "shop".to_string()][..]));
        let none = namespace_selector(&BTreeSet::new(), "storerelay");
        assert_eq!(none.match_expressions.unwrap()[0].values.as_deref(), Some(&[NO_NAMESPACE.to_string()][..]));
    }

    #[test]
    fn bundles_round_trip_through_secrets() {
        let bundle = certs::generate(&["x".into()], &[], OffsetDateTime::now_utc()).unwrap();
        let secret = secret_from_bundle("storerelay-webhook-tls", "storerelay", &bundle);
        assert_eq!(bundle_from_secret(&secret), Some(bundle));
    }
}
