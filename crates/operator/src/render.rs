//! A route's sidecar config, rendered through the sidecar's own config types and validated by the same
//! rules the sidecar applies, so the operator can never emit a file the sidecar refuses.
//!
//! Secrets are never copied into the config: it names files, and [`crate::inject`] mounts the Secrets
//! there, so a rotated Secret reaches running pods without a restart.

use std::net::SocketAddr;
use std::path::PathBuf;

use storerelay_config::{
    AppStoreServerApi, ByteSize, DedupeConfig, Destination, Duration, GapFill, Limits, PostgresSpool, Problem,
    RetryPolicy, SelfTest, SidecarConfig, SpoolBackendKind, SpoolConfig, Upstream, VerifyConfig, defaults,
};

use crate::crd::{NotificationRoute, NotificationRouteSpec};

/// Where the pieces live inside the sidecar container.
pub const CONFIG_DIR: &str = "/etc/storerelay/config";
pub const CONFIG_KEY: &str = "config.yaml";
pub const SPOOL_DIR: &str = "/var/lib/storerelay";
pub const APPLE_ROOT_DIR: &str = "/etc/storerelay/apple";
pub const APPLE_ROOT_FILE: &str = "root.cer";
pub const V1_PASSWORD_DIR: &str = "/etc/storerelay/secrets/v1";
pub const V1_PASSWORD_FILE: &str = "password";
pub use storerelay_config::DEFAULT_SPOOL_SIZE_LIMIT as DEFAULT_SPOOL_SIZE;

/// The shared spool's URL (a Secret) and CA certificates, each a volume of its own.
pub const POSTGRES_DIR: &str = "/etc/storerelay/spool-db";
pub const POSTGRES_URL_FILE: &str = "url";
pub const POSTGRES_CA_DIR: &str = "/etc/storerelay/spool-db-ca";
pub const POSTGRES_CA_FILE: &str = "ca.crt";
pub const APPLE_API_DIR: &str = "/etc/storerelay/secrets/apple-api";
pub const APPLE_API_KEY_FILE: &str = "SubscriptionKey.p8";

pub fn destination_secret_dir(destination: &str) -> String {
    format!("/etc/storerelay/secrets/{destination}")
}

/// The ConfigMap holding a route's rendered config.
pub fn config_map_name(route_name: &str) -> String {
    format!("{route_name}-storerelay")
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct RenderError {
    pub problems: Vec<Problem>,
}

fn duration(value: &Option<String>, key: &str, fallback: Duration, problems: &mut Vec<Problem>) -> Duration {
    match value.as_deref().map(str::parse::<Duration>) {
        None => fallback,
        Some(Ok(parsed)) => parsed,
        Some(Err(message)) => {
            problems.push(Problem { key: key.to_string(), message });
            fallback
        }
    }
}

/// The emptyDir size for the spool, and the share of it the sidecar may fill.
pub fn spool_size(spec: &NotificationRouteSpec) -> Result<(String, ByteSize), Problem> {
    let text = spec.spool.as_ref().and_then(|s| s.size_limit.clone()).unwrap_or_else(|| DEFAULT_SPOOL_SIZE.into());
    let size: ByteSize = text.parse().map_err(|message| Problem { key: "spec.spool.sizeLimit".into(), message })?;
    Ok((text, storerelay_config::spool_max_bytes_within(size)))
}

pub fn render(route: &NotificationRoute) -> Result<SidecarConfig, RenderError> {
    let spec = &route.spec;
    let mut problems = Vec::new();
    let port = |p: i32| u16::try_from(p).unwrap_or(0);
    let upstream = spec.upstream.as_ref().map(|u| Upstream {
        url: format!("http://127.0.0.1:{}", u.port),
        timeout: duration(&u.timeout, "spec.upstream.timeout", defaults::upstream_timeout(), &mut problems),
    });
    let max_bytes = match spool_size(spec) {
        Ok((_, max)) => max,
        Err(problem) => {
            problems.push(problem);
            defaults::spool_max_bytes()
        }
    };
    let verify = spec.verify.as_ref().map_or_else(VerifyConfig::default, |v| VerifyConfig {
        mode: v.mode,
        root_certificates: v
            .apple_root
            .as_ref()
            .map(|_| vec![PathBuf::from(APPLE_ROOT_DIR).join(APPLE_ROOT_FILE)])
            .unwrap_or_default(),
        bundle_ids: v.bundle_ids.clone(),
        app_apple_ids: v.app_apple_ids.clone(),
        environments: v.environments.clone(),
        v1_password: None,
        v1_password_file: v.v1_password_from.as_ref().map(|_| PathBuf::from(V1_PASSWORD_DIR).join(V1_PASSWORD_FILE)),
    });
    let shared = spec.spool.as_ref().and_then(|s| s.postgres.as_ref()).map(|p| PostgresSpool {
        url: None,
        url_file: Some(PathBuf::from(POSTGRES_DIR).join(POSTGRES_URL_FILE)),
        root_certificate_file: p
            .root_certificate_from
            .as_ref()
            .map(|_| PathBuf::from(POSTGRES_CA_DIR).join(POSTGRES_CA_FILE)),
        schema: p.schema.clone().unwrap_or_else(storerelay_config::default_postgres_schema),
        queue: queue_name(route),
        max_connections: storerelay_config::default_postgres_max_connections(),
        timeout: storerelay_config::default_postgres_timeout(),
    });
    let destinations = spec
        .destinations
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let key = |field: &str| format!("spec.destinations[{i}].{field}");
            let dir = PathBuf::from(destination_secret_dir(&d.name));
            let retry = d.retry.clone().unwrap_or_default();
            Destination {
                name: d.name.clone(),
                url: d.url.clone(),
                url_file: d.url_from.as_ref().map(|_| dir.join("url")),
                headers: Default::default(),
                headers_file: d.headers_from.as_ref().map(|_| dir.join("headers")),
                timeout: duration(&d.timeout, &key("timeout"), defaults::destination_timeout(), &mut problems),
                concurrency: d.concurrency.unwrap_or_else(defaults::concurrency),
                retry: RetryPolicy {
                    initial_backoff: duration(
                        &retry.initial_backoff,
                        &key("retry.initialBackoff"),
                        defaults::initial_backoff(),
                        &mut problems,
                    ),
                    max_backoff: duration(
                        &retry.max_backoff,
                        &key("retry.maxBackoff"),
                        defaults::max_backoff(),
                        &mut problems,
                    ),
                    max_age: duration(&retry.max_age, &key("retry.maxAge"), defaults::max_age(), &mut problems),
                },
                filter: d.filter.clone().unwrap_or_default(),
            }
        })
        .collect();
    let config = SidecarConfig {
        listen: SocketAddr::from(([0, 0, 0, 0], port(spec.listen.port))),
        admin: SocketAddr::from(([0, 0, 0, 0], port(spec.listen.admin_port))),
        paths: spec.listen.paths.clone(),
        upstream,
        ack: spec.ack,
        ack_timeout: defaults::ack_timeout(),
        spool: SpoolConfig {
            path: PathBuf::from(SPOOL_DIR).join("spool.db"),
            max_bytes,
            sync: spec.spool.as_ref().and_then(|s| s.sync).unwrap_or_default(),
            retain_delivered: defaults::retain_delivered(),
            retain_dead: defaults::retain_unfinishable(),
            backend: if shared.is_some() { SpoolBackendKind::Postgres } else { SpoolBackendKind::Sqlite },
            postgres: shared,
        },
        limits: Limits::default(),
        shutdown_grace_period: defaults::shutdown_grace_period(),
        verify,
        unknown_bodies: spec.unknown_bodies.unwrap_or_default(),
        dedupe: DedupeConfig::default(),
        destinations,
        app_store_server_api: spec.app_store_server_api.as_ref().map(|api| AppStoreServerApi {
            key_id: api.key_id.clone(),
            issuer_id: api.issuer_id.clone(),
            bundle_id: api.bundle_id.clone(),
            private_key_file: PathBuf::from(APPLE_API_DIR).join(APPLE_API_KEY_FILE),
            environment: api.environment,
            base_url: api.base_url.clone(),
            timeout: duration(&api.timeout, "spec.appStoreServerApi.timeout", Duration::from_secs(10), &mut problems),
        }),
        gap_fill: spec.gap_fill.as_ref().map(|g| GapFill {
            interval: duration(&g.interval, "spec.gapFill.interval", Duration::from_secs(15 * 60), &mut problems),
            lookback: duration(&g.lookback, "spec.gapFill.lookback", Duration::from_secs(72 * 3600), &mut problems),
            scope: g.scope.unwrap_or_default(),
            only_replica: g.only_replica.unwrap_or(false),
        }),
        self_test: spec.self_test.as_ref().map(|t| SelfTest {
            interval: duration(&t.interval, "spec.selfTest.interval", Duration::from_secs(24 * 3600), &mut problems),
            timeout: Duration::from_secs(120),
            only_replica: t.only_replica.unwrap_or(false),
        }),
    };
    // The sidecar's own validation, with its keys mapped back to the route's where they differ.
    problems.extend(config.problems().into_iter().map(|p| Problem { key: route_key(&p.key), message: p.message }));
    if problems.is_empty() { Ok(config) } else { Err(RenderError { problems }) }
}

/// The shared spool's queue for `route`: `<namespace>/<name>`, so routes sharing a database never mix.
pub fn queue_name(route: &NotificationRoute) -> String {
    format!(
        "{}/{}",
        route.metadata.namespace.as_deref().unwrap_or("default"),
        route.metadata.name.as_deref().unwrap_or_default()
    )
}

fn route_key(sidecar_key: &str) -> String {
    match sidecar_key {
        "admin" => "spec.listen.adminPort".into(),
        "listen" => "spec.listen.port".into(),
        key if key.starts_with("paths") => format!("spec.listen.{key}"),
        key if key.starts_with("upstream") => "spec.upstream.port".into(),
        key if key.starts_with("verify.rootCertificates") => "spec.verify.appleRoot".into(),
        "appStoreServerApi.privateKeyFile" => "spec.appStoreServerApi.keyFrom".into(),
        key => format!("spec.{key}"),
    }
}

/// The rendered file as it goes into the ConfigMap.
pub fn render_yaml(route: &NotificationRoute) -> Result<String, RenderError> {
    let config = render(route)?;
    Ok(format!(
        "# Rendered by storerelay-operator from NotificationRoute {}/{}. Edit the route, not this file.\n{}",
        route.metadata.namespace.as_deref().unwrap_or("default"),
        route.metadata.name.as_deref().unwrap_or(""),
        config.to_yaml()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn route(yaml: &str) -> NotificationRoute {
        serde_yaml::from_str(yaml).unwrap()
    }

    const ROUTE: &str = r#"
apiVersion: storerelay.dev/v1alpha1
kind: NotificationRoute
metadata: {name: payments, namespace: shop}
spec:
  selector: {matchLabels: {app: payments}}
  upstream: {port: 8080, timeout: 3s}
  verify:
    mode: enforce
    appleRoot: {configMapKeyRef: {name: apple-root-ca, key: AppleRootCA-G3.cer}}
    bundleIds: [com.example.app]
    v1PasswordFrom: {secretKeyRef: {name: app, key: v1-password}}
  destinations:
    - name: revenuecat
      urlFrom: {secretKeyRef: {name: revenuecat, key: url}}
      headersFrom: {secretKeyRef: {name: revenuecat, key: headers}}
      match: {environments: [Production]}
      retry: {maxAge: 72h}
    - name: analytics
      url: https://analytics.example.com/apple
  spool: {sizeLimit: 128Mi, sync: normal}
"#;

    #[test]
    fn renders_files_not_secrets_and_the_sidecar_accepts_it() {
        let route = route(ROUTE);
        let yaml = render_yaml(&route).unwrap();
        let parsed = storerelay_config::parse(&yaml, Path::new("rendered.yaml")).unwrap();
        assert_eq!(parsed.upstream.unwrap().url, "http://127.0.0.1:8080");
        assert_eq!(
            parsed.destinations[0].url_file.as_deref(),
            Some(Path::new("/etc/storerelay/secrets/revenuecat/url"))
        );
        assert_eq!(
            parsed.destinations[0].headers_file.as_deref(),
            Some(Path::new("/etc/storerelay/secrets/revenuecat/headers"))
        );
        assert_eq!(parsed.destinations[0].retry.max_age, Duration::from_secs(72 * 3600));
        assert_eq!(parsed.destinations[1].url.as_deref(), Some("https://analytics.example.com/apple"));
        assert_eq!(parsed.verify.root_certificates, vec![PathBuf::from("/etc/storerelay/apple/root.cer")]);
        assert_eq!(parsed.verify.v1_password_file.as_deref(), Some(Path::new("/etc/storerelay/secrets/v1/password")));
        assert_eq!(parsed.spool.max_bytes, ByteSize(96 << 20), "three quarters of the 128Mi emptyDir");
        assert_eq!(parsed.spool.sync, storerelay_config::SyncMode::Normal);
    }

    #[test]
    fn a_shared_spool_is_rendered_as_the_routes_queue_with_its_secret_mounted() {
        let mut route = route(ROUTE);
        route.spec.spool = Some(serde_yaml::from_str(
            "postgres: {urlFrom: {secretKeyRef: {name: spool-db, key: url}}, rootCertificateFrom: {configMapKeyRef: {name: db-ca, key: ca.crt}}}",
        )
        .unwrap());
        let yaml = render_yaml(&route).unwrap();
        let parsed = storerelay_config::parse(&yaml, Path::new("rendered.yaml")).unwrap();
        assert_eq!(parsed.spool.backend, SpoolBackendKind::Postgres);
        let postgres = parsed.spool.postgres.unwrap();
        assert_eq!(postgres.queue, "shop/payments");
        assert_eq!(postgres.url, None, "the URL stays in its Secret");
        assert_eq!(postgres.url_file.as_deref(), Some(Path::new("/etc/storerelay/spool-db/url")));
        assert_eq!(postgres.root_certificate_file.as_deref(), Some(Path::new("/etc/storerelay/spool-db-ca/ca.crt")));
        assert_eq!(postgres.schema, "storerelay");

        let injection = crate::inject::injection(&route, &crate::inject::InjectOptions::default());
        let volume = |name: &str| injection.volumes.iter().find(|v| v.name == name).cloned();
        let url = volume("storerelay-spool-db").expect("the URL Secret is mounted");
        let secret = url.secret.unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("spool-db"));
        assert_eq!(secret.items.unwrap()[0].path, POSTGRES_URL_FILE);
        let ca = volume("storerelay-spool-db-ca").expect("the CA ConfigMap is mounted");
        assert_eq!(ca.config_map.unwrap().name, "db-ca");
        let mounts = injection.container.volume_mounts.unwrap_or_default();
        assert!(mounts.iter().any(|m| m.name == "storerelay-spool-db" && m.mount_path == POSTGRES_DIR));
    }

    #[test]
    fn problems_name_the_routes_keys() {
        let mut route = route(ROUTE);
        route.spec.verify.as_mut().unwrap().apple_root = None;
        route.spec.destinations[1].timeout = Some("soon".into());
        route.spec.listen.admin_port = route.spec.listen.port;
        let err = render(&route).unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"spec.destinations[1].timeout"), "{keys:?}");
        assert!(keys.contains(&"spec.verify.appleRoot"), "{keys:?}");
        assert!(keys.contains(&"spec.listen.adminPort"), "{keys:?}");
    }

    #[test]
    fn apples_api_gap_fill_and_self_test_are_rendered_with_the_key_mounted_not_copied() {
        let mut route = route(ROUTE);
        route.spec.spool =
            Some(serde_yaml::from_str("postgres: {urlFrom: {secretKeyRef: {name: spool-db, key: url}}}").unwrap());
        route.spec.app_store_server_api = Some(
            serde_yaml::from_str(
                "{keyId: 2X9R4HXF34, issuerId: 57246542-96fe-1a63-e053-0824d011072a, bundleId: com.example.app, environment: Production, keyFrom: {secretKeyRef: {name: apple-api, key: SubscriptionKey_2X9R4HXF34.p8}}}",
            )
            .unwrap(),
        );
        route.spec.gap_fill = Some(serde_yaml::from_str("{interval: 10m, scope: all}").unwrap());
        route.spec.self_test = Some(serde_yaml::from_str("{interval: 12h}").unwrap());
        let yaml = render_yaml(&route).unwrap();
        let parsed = storerelay_config::parse(&yaml, Path::new("rendered.yaml")).unwrap();
        let api = parsed.app_store_server_api.unwrap();
        assert_eq!(api.private_key_file, PathBuf::from("/etc/storerelay/secrets/apple-api/SubscriptionKey.p8"));
        assert_eq!(api.key_id, "2X9R4HXF34");
        let gap_fill = parsed.gap_fill.unwrap();
        assert_eq!((gap_fill.interval, gap_fill.lookback), (Duration::from_secs(600), Duration::from_secs(72 * 3600)));
        assert_eq!(gap_fill.scope, storerelay_config::GapFillScope::All);
        assert_eq!(parsed.self_test.unwrap().interval, Duration::from_secs(12 * 3600));

        let injection = crate::inject::injection(&route, &crate::inject::InjectOptions::default());
        let key = injection.volumes.iter().find(|v| v.name == "storerelay-apple-api").expect("the key is mounted");
        let secret = key.secret.clone().unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("apple-api"));
        assert_eq!(secret.items.unwrap()[0].path, APPLE_API_KEY_FILE);
        let mounts = injection.container.volume_mounts.unwrap();
        assert!(mounts.iter().any(|m| m.name == "storerelay-apple-api" && m.mount_path == APPLE_API_DIR));

        // Without the shared spool, gap-fill needs onlyReplica: the sidecar's own rule, named on the route.
        route.spec.spool = None;
        let problems = render(&route).unwrap_err().problems;
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"spec.gapFill.onlyReplica") && keys.contains(&"spec.selfTest.onlyReplica"), "{keys:?}");
        route.spec.gap_fill.as_mut().unwrap().only_replica = Some(true);
        route.spec.self_test.as_mut().unwrap().only_replica = Some(true);
        assert!(render(&route).is_ok());
    }
}
