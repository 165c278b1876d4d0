//! What injecting a route into a pod means: the sidecar container and its volumes, and the pure
//! functions that add them to (or remove them from) a pod spec. The webhook, `storerelayctl inject`
//! and the tests all go through here, so there is one definition of an injected pod.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, HTTPGetAction, KeyToPath,
    PodSpec, Probe, ProjectedVolumeSource, ResourceRequirements, SeccompProfile, SecretProjection, SecretVolumeSource,
    SecurityContext, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::crd::{KeyRef, KeySource, NotificationRoute, NotificationRouteSpec};
use crate::render::{
    APPLE_API_DIR, APPLE_API_KEY_FILE, APPLE_ROOT_DIR, APPLE_ROOT_FILE, CONFIG_DIR, CONFIG_KEY, POSTGRES_CA_DIR,
    POSTGRES_CA_FILE, POSTGRES_DIR, POSTGRES_URL_FILE, SPOOL_DIR, V1_PASSWORD_DIR, V1_PASSWORD_FILE, config_map_name,
    destination_secret_dir, spool_size,
};

pub const CONTAINER_NAME: &str = "storerelay";
/// `<route>@<revision>` on every injected pod.
pub const INJECTED_ANNOTATION: &str = "storerelay.dev/injected";
/// `"false"` opts a pod out.
pub const INJECT_ANNOTATION: &str = "storerelay.dev/inject";
/// Set on a workload's pod template to roll it (what `kubectl rollout restart` does).
pub const RESTARTED_AT_ANNOTATION: &str = "storerelay.dev/restartedAt";
const VOLUME_PREFIX: &str = "storerelay-";
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
const SIDECAR_UID: i64 = 65532;

/// Operator-wide settings for injection.
#[derive(Debug, Clone)]
pub struct InjectOptions {
    pub image: String,
    pub image_pull_policy: Option<String>,
    /// Which `spec.sidecar.image` a route may name instead of `image`.
    pub image_policy: ImagePolicy,
}

impl Default for InjectOptions {
    fn default() -> Self {
        InjectOptions {
            image: format!("storerelay/storerelay-sidecar:{}", env!("CARGO_PKG_VERSION")),
            image_pull_policy: None,
            image_policy: ImagePolicy::default(),
        }
    }
}

/// A route's author chooses what runs in every pod it selects, with the Secrets it names mounted: a
/// cluster that lets many people write routes pins the images they may choose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImagePolicy {
    /// Any image (storerelayctl, whose user writes the manifests anyway).
    Any,
    /// Only these, besides the operator's own sidecar image. Empty by default: no other image.
    Only(Vec<String>),
}

impl Default for ImagePolicy {
    fn default() -> Self {
        ImagePolicy::Only(Vec::new())
    }
}

/// Why a route's `spec.sidecar.image` is not injected here, if it is not.
pub fn image_refusal(route: &NotificationRoute, options: &InjectOptions) -> Option<String> {
    let image = route.spec.sidecar.as_ref()?.image.as_deref()?;
    let allowed = match &options.image_policy {
        ImagePolicy::Any => true,
        ImagePolicy::Only(images) => image == options.image || images.iter().any(|i| i == image),
    };
    (!allowed).then(|| {
        format!(
            "spec.sidecar.image `{image}` is not allowed by this installation (chart value sidecarImage.allowedOverrides); \
             remove it to use the operator's sidecar image"
        )
    })
}

/// Everything a route adds to a pod, and its revision (a hash of all of it).
#[derive(Debug, Clone, PartialEq)]
pub struct Injection {
    pub route: String,
    pub revision: String,
    pub container: Container,
    pub volumes: Vec<Volume>,
}

impl Injection {
    pub fn annotation_value(&self) -> String {
        format!("{}@{}", self.route, self.revision)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    /// The sidecar is there already (re-invocation, or a pod created from an injected template).
    AlreadyInjected,
    OptedOut,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    #[error(
        "port {port} of container {container} collides with the storerelay sidecar of NotificationRoute {route}; change the route's listen.port or listen.adminPort"
    )]
    PortCollision { port: i32, container: String, route: String },
    #[error(
        "volume {volume} already exists in the pod; NotificationRoute {route} needs that name for the storerelay sidecar"
    )]
    VolumeCollision { volume: String, route: String },
    #[error("cannot write the JSON patch: {0}")]
    Patch(String),
}

fn secret_volume(name: String, reference: &KeyRef, path: &str) -> Volume {
    Volume {
        name,
        secret: Some(SecretVolumeSource {
            secret_name: Some(reference.name.clone()),
            items: Some(vec![KeyToPath { key: reference.key.clone(), path: path.to_string(), mode: None }]),
            // A missing Secret must not keep the app from starting: the sidecar reports it instead.
            optional: Some(true),
            default_mode: Some(0o444),
        }),
        ..Default::default()
    }
}

/// A volume with one file from a ConfigMap or Secret key, optional like [`secret_volume`].
fn key_source_volume(name: String, source: &KeySource, path: &str) -> Volume {
    match (&source.config_map_key_ref, &source.secret_key_ref) {
        (Some(reference), _) => Volume {
            name,
            config_map: Some(ConfigMapVolumeSource {
                name: reference.name.clone(),
                items: Some(vec![KeyToPath { key: reference.key.clone(), path: path.into(), mode: None }]),
                optional: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        },
        (None, Some(reference)) => secret_volume(name, reference, path),
        (None, None) => Volume { name, ..Default::default() },
    }
}

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount { name: name.to_string(), mount_path: path.to_string(), read_only: Some(true), ..Default::default() }
}

fn quantity(text: &str) -> Quantity {
    Quantity(text.to_string())
}

/// The sidecar container and volumes for `route`.
pub fn injection(route: &NotificationRoute, options: &InjectOptions) -> Injection {
    let route_name = route.metadata.name.clone().unwrap_or_default();
    let spec = &route.spec;
    let mut storage = Storage::default();
    storage.add_config(&route_name);
    storage.add_spool(spec);
    storage.add_verify_files(spec);
    storage.add_destination_secrets(spec);
    storage.add_shared_spool(spec);
    storage.add_apple_api_key(spec);
    storage.add_no_token();

    let sidecar = spec.sidecar.clone().unwrap_or_default();
    let admin_port = spec.listen.admin_port;
    let container = Container {
        name: CONTAINER_NAME.into(),
        image: Some(sidecar.image.unwrap_or_else(|| options.image.clone())),
        image_pull_policy: sidecar.image_pull_policy.or_else(|| options.image_pull_policy.clone()),
        args: Some(vec!["--config".into(), format!("{CONFIG_DIR}/{CONFIG_KEY}")]),
        // A native sidecar: starts before the app, stops after it, restarts on its own.
        restart_policy: Some("Always".into()),
        ports: Some(ports(spec.listen.port, admin_port)),
        startup_probe: Some(admin_probe(admin_port, "/readyz", 1, 60)),
        readiness_probe: Some(admin_probe(admin_port, "/readyz", 5, 3)),
        liveness_probe: Some(admin_probe(admin_port, "/healthz", 10, 3)),
        resources: Some(sidecar.resources.unwrap_or_else(default_resources)),
        security_context: Some(restricted_security_context()),
        volume_mounts: Some(storage.mounts),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    };
    let revision = revision(&container, &storage.volumes);
    Injection { route: route_name, revision, container, volumes: storage.volumes }
}

/// The volumes the sidecar needs and where it mounts each.
#[derive(Default)]
struct Storage {
    volumes: Vec<Volume>,
    mounts: Vec<VolumeMount>,
}

impl Storage {
    fn add(&mut self, volume: Volume, mount: VolumeMount) {
        self.volumes.push(volume);
        self.mounts.push(mount);
    }

    /// The rendered config, from the route's ConfigMap.
    fn add_config(&mut self, route_name: &str) {
        let name = format!("{VOLUME_PREFIX}config");
        let volume = Volume {
            name: name.clone(),
            config_map: Some(ConfigMapVolumeSource { name: config_map_name(route_name), ..Default::default() }),
            ..Default::default()
        };
        self.add(volume, mount(&name, CONFIG_DIR));
    }

    /// The spool: an `emptyDir` sized from `spool.maxBytes`, the one writable mount.
    fn add_spool(&mut self, spec: &NotificationRouteSpec) {
        let name = format!("{VOLUME_PREFIX}spool");
        let size_limit =
            spool_size(spec).map(|(text, _)| text).unwrap_or_else(|_| crate::render::DEFAULT_SPOOL_SIZE.into());
        let volume = Volume {
            name: name.clone(),
            empty_dir: Some(EmptyDirVolumeSource { size_limit: Some(quantity(&size_limit)), medium: None }),
            ..Default::default()
        };
        self.add(volume, VolumeMount { name, mount_path: SPOOL_DIR.into(), ..Default::default() });
    }

    /// Apple's root certificate and the V1 shared secret, when the route verifies with them.
    fn add_verify_files(&mut self, spec: &NotificationRouteSpec) {
        let Some(verify) = &spec.verify else { return };
        if let Some(root) = &verify.apple_root {
            let name = format!("{VOLUME_PREFIX}apple-root");
            let volume = key_source_volume(name.clone(), root, APPLE_ROOT_FILE);
            self.add(volume, mount(&name, APPLE_ROOT_DIR));
        }
        if let Some(source) = &verify.v1_password_from {
            let name = format!("{VOLUME_PREFIX}v1-password");
            self.add(
                secret_volume(name.clone(), &source.secret_key_ref, V1_PASSWORD_FILE),
                mount(&name, V1_PASSWORD_DIR),
            );
        }
    }

    /// The shared spool's URL Secret and CA certificates, when the route uses PostgreSQL.
    fn add_shared_spool(&mut self, spec: &NotificationRouteSpec) {
        let Some(postgres) = spec.spool.as_ref().and_then(|s| s.postgres.as_ref()) else { return };
        let name = format!("{VOLUME_PREFIX}spool-db");
        self.add(
            secret_volume(name.clone(), &postgres.url_from.secret_key_ref, POSTGRES_URL_FILE),
            mount(&name, POSTGRES_DIR),
        );
        if let Some(root) = &postgres.root_certificate_from {
            let name = format!("{VOLUME_PREFIX}spool-db-ca");
            self.add(key_source_volume(name.clone(), root, POSTGRES_CA_FILE), mount(&name, POSTGRES_CA_DIR));
        }
    }

    /// The App Store Server API key (.p8), when the route calls Apple's API.
    fn add_apple_api_key(&mut self, spec: &NotificationRouteSpec) {
        let Some(api) = &spec.app_store_server_api else { return };
        let name = format!("{VOLUME_PREFIX}apple-api");
        self.add(
            secret_volume(name.clone(), &api.key_from.secret_key_ref, APPLE_API_KEY_FILE),
            mount(&name, APPLE_API_DIR),
        );
    }

    /// One projected volume per destination with Secret references: its files stay current when a
    /// Secret rotates (a subPath mount would not).
    fn add_destination_secrets(&mut self, spec: &NotificationRouteSpec) {
        for destination in &spec.destinations {
            let sources: Vec<VolumeProjection> =
                [(&destination.url_from, "url"), (&destination.headers_from, "headers")]
                    .into_iter()
                    .filter_map(|(source, file)| {
                        let reference = &source.as_ref()?.secret_key_ref;
                        Some(VolumeProjection {
                            secret: Some(SecretProjection {
                                name: reference.name.clone(),
                                items: Some(vec![KeyToPath {
                                    key: reference.key.clone(),
                                    path: file.into(),
                                    mode: None,
                                }]),
                                optional: Some(true),
                            }),
                            ..Default::default()
                        })
                    })
                    .collect();
            if sources.is_empty() {
                continue;
            }
            let name = format!("{VOLUME_PREFIX}dest-{}", destination.name);
            let volume = Volume {
                name: name.clone(),
                projected: Some(ProjectedVolumeSource { sources: Some(sources), default_mode: Some(0o444) }),
                ..Default::default()
            };
            self.add(volume, mount(&name, &destination_secret_dir(&destination.name)));
        }
    }

    /// The sidecar talks to no Kubernetes API: an empty folder where the token would be keeps it out.
    fn add_no_token(&mut self) {
        let name = format!("{VOLUME_PREFIX}no-token");
        let volume = Volume {
            name: name.clone(),
            empty_dir: Some(EmptyDirVolumeSource { medium: Some("Memory".into()), size_limit: Some(quantity("1Ki")) }),
            ..Default::default()
        };
        self.add(volume, mount(&name, SERVICE_ACCOUNT_DIR));
    }
}

fn ports(port: i32, admin_port: i32) -> Vec<ContainerPort> {
    let tcp = |name: &str, container_port| ContainerPort {
        name: Some(name.into()),
        container_port,
        protocol: Some("TCP".into()),
        ..Default::default()
    };
    vec![tcp("storerelay", port), tcp("storerelay-adm", admin_port)]
}

/// An HTTP probe of the admin port.
fn admin_probe(admin_port: i32, path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(admin_port),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(1),
        ..Default::default()
    }
}

/// Unless the route says otherwise: a small request, and a memory limit with room for bursts.
fn default_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([("cpu".into(), quantity("10m")), ("memory".into(), quantity("32Mi"))])),
        limits: Some(BTreeMap::from([(
            "memory".into(),
            quantity(&format!("{}Mi", storerelay_config::SIDECAR_MEMORY_LIMIT_MIB)),
        )])),
        ..Default::default()
    }
}

/// What the `restricted` Pod Security Standard asks for, with a read-only root.
fn restricted_security_context() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(SIDECAR_UID),
        run_as_group: Some(SIDECAR_UID),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
        ..Default::default()
    }
}

/// A short hash of everything injected: a change means pods made before it are outdated.
fn revision(container: &Container, volumes: &[Volume]) -> String {
    let bytes = serde_json::to_vec(&(container, volumes)).unwrap_or_default();
    Sha256::digest(&bytes).iter().take(5).map(|b| format!("{b:02x}")).collect()
}

pub fn is_injected(spec: &PodSpec) -> bool {
    spec.init_containers.iter().flatten().chain(&spec.containers).any(|c| c.name == CONTAINER_NAME)
}

pub fn opted_out(meta: &ObjectMeta) -> bool {
    meta.annotations.as_ref().and_then(|a| a.get(INJECT_ANNOTATION)).is_some_and(|v| v == "false")
}

/// Why a pod gets nothing (`Ok(Some)`), or the error that keeps the sidecar out; `Ok(None)`: inject.
fn precheck<'a>(
    meta: &ObjectMeta,
    spec: &PodSpec,
    route: &str,
    our_ports: &[i32],
    mut our_volumes: impl Iterator<Item = &'a str>,
) -> Result<Option<Outcome>, InjectError> {
    if opted_out(meta) {
        return Ok(Some(Outcome::OptedOut));
    }
    if is_injected(spec) {
        return Ok(Some(Outcome::AlreadyInjected));
    }
    for container in spec.containers.iter().chain(spec.init_containers.iter().flatten()) {
        for port in container.ports.iter().flatten() {
            if our_ports.contains(&port.container_port) {
                return Err(InjectError::PortCollision {
                    port: port.container_port,
                    container: container.name.clone(),
                    route: route.to_string(),
                });
            }
        }
    }
    let existing: Vec<&str> = spec.volumes.iter().flatten().map(|v| v.name.as_str()).collect();
    if let Some(volume) = our_volumes.find(|name| existing.contains(name)) {
        return Err(InjectError::VolumeCollision { volume: volume.to_string(), route: route.to_string() });
    }
    Ok(None)
}

fn container_ports(container: &Container) -> Vec<i32> {
    container.ports.iter().flatten().map(|p| p.container_port).collect()
}

/// Adds the sidecar to a pod (or pod template). Leaves opted-out and already injected pods alone.
pub fn inject(meta: &mut ObjectMeta, spec: &mut PodSpec, injection: &Injection) -> Result<Outcome, InjectError> {
    let (ports, volumes) = (container_ports(&injection.container), injection.volumes.iter().map(|v| v.name.as_str()));
    if let Some(outcome) = precheck(meta, spec, &injection.route, &ports, volumes)? {
        return Ok(outcome);
    }
    spec.init_containers.get_or_insert_with(Vec::new).push(injection.container.clone());
    spec.volumes.get_or_insert_with(Vec::new).extend(injection.volumes.iter().cloned());
    meta.annotations.get_or_insert_with(BTreeMap::new).insert(INJECTED_ANNOTATION.into(), injection.annotation_value());
    Ok(Outcome::Injected)
}

/// An injection made ready for the webhook once per change of its route: the container and volumes as
/// JSON text, so a review writes its patch by copying them instead of serialising the pod twice and
/// diffing. Text, not `serde_json::Value` trees or the `Container` itself: with a thousand routes those
/// took about 40 KiB each (measured: 44 MiB more operator RSS), the text about 3 KiB.
#[derive(Debug, Clone)]
pub struct PreparedInjection {
    pub route: String,
    pub revision: String,
    /// `<route>@<revision>`, as [`Injection::annotation_value`] makes it.
    annotation: String,
    ports: Vec<i32>,
    volume_names: Vec<String>,
    container: Box<RawValue>,
    volumes: Vec<Box<RawValue>>,
}

/// What the webhook does to one pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Patched {
    /// A JSON patch (RFC 6902), serialised.
    Patch(Vec<u8>),
    Unchanged(Outcome),
}

/// One `add` operation of a JSON patch.
#[derive(serde::Serialize)]
struct Add<'a> {
    op: &'static str,
    path: &'static str,
    value: Value<'a>,
}

/// What an operation adds; prepared JSON is copied as it is.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum Value<'a> {
    Json(&'a RawValue),
    List(&'a [Box<RawValue>]),
    Text(&'a str),
    Map(BTreeMap<&'a str, &'a str>),
}

fn add<'a>(path: &'static str, value: Value<'a>) -> Add<'a> {
    Add { op: "add", path, value }
}

fn to_raw<T: serde::Serialize>(value: &T) -> Box<RawValue> {
    serde_json::value::to_raw_value(value).unwrap_or_default()
}

impl PreparedInjection {
    pub fn new(injection: &Injection) -> PreparedInjection {
        PreparedInjection {
            route: injection.route.clone(),
            revision: injection.revision.clone(),
            annotation: injection.annotation_value(),
            ports: container_ports(&injection.container),
            volume_names: injection.volumes.iter().map(|v| v.name.clone()).collect(),
            container: to_raw(&injection.container),
            volumes: injection.volumes.iter().map(to_raw).collect(),
        }
    }

    /// The JSON patch that does to this pod what [`inject`] does: the sidecar appended to the init
    /// containers, its volumes appended, the injected annotation added.
    pub fn patch(&self, meta: &ObjectMeta, spec: &PodSpec) -> Result<Patched, InjectError> {
        let volumes = self.volume_names.iter().map(String::as_str);
        if let Some(outcome) = precheck(meta, spec, &self.route, &self.ports, volumes)? {
            return Ok(Patched::Unchanged(outcome));
        }
        let annotation = &self.annotation;
        // An absent list or map is created whole; an existing one is added to (`-` appends), never
        // replaced. `~1` is the `/` of the annotation's key in a JSON pointer.
        let mut ops = Vec::with_capacity(self.volumes.len() + 2);
        ops.push(match spec.init_containers {
            Some(_) => add("/spec/initContainers/-", Value::Json(&self.container)),
            None => add("/spec/initContainers", Value::List(std::slice::from_ref(&self.container))),
        });
        match spec.volumes {
            Some(_) => ops.extend(self.volumes.iter().map(|v| add("/spec/volumes/-", Value::Json(v)))),
            None => ops.push(add("/spec/volumes", Value::List(&self.volumes))),
        }
        ops.push(match meta.annotations {
            Some(_) => add("/metadata/annotations/storerelay.dev~1injected", Value::Text(annotation)),
            None => {
                add("/metadata/annotations", Value::Map(BTreeMap::from([(INJECTED_ANNOTATION, annotation.as_str())])))
            }
        });
        serde_json::to_vec(&ops).map(Patched::Patch).map_err(|e| InjectError::Patch(e.to_string()))
    }
}

/// Removes what [`inject`] added. Returns whether anything changed.
pub fn uninject(meta: &mut ObjectMeta, spec: &mut PodSpec) -> bool {
    let mut ours: Vec<String> = Vec::new();
    let mut changed = false;
    if let Some(init) = &mut spec.init_containers {
        if let Some(index) = init.iter().position(|c| c.name == CONTAINER_NAME) {
            let sidecar = init.remove(index);
            ours.extend(sidecar.volume_mounts.into_iter().flatten().map(|m| m.name));
            changed = true;
        }
        if init.is_empty() {
            spec.init_containers = None;
        }
    }
    if let Some(volumes) = &mut spec.volumes {
        volumes.retain(|v| !ours.contains(&v.name));
        if volumes.is_empty() {
            spec.volumes = None;
        }
    }
    if let Some(annotations) = &mut meta.annotations {
        changed |= annotations.remove(INJECTED_ANNOTATION).is_some();
        if annotations.is_empty() {
            meta.annotations = None;
        }
    }
    changed
}

/// The route and revision an injected pod carries.
pub fn injected_as(meta: &ObjectMeta) -> Option<(String, String)> {
    let value = meta.annotations.as_ref()?.get(INJECTED_ANNOTATION)?;
    let (route, revision) = value.split_once('@')?;
    Some((route.to_string(), revision.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_may_name_only_an_allowed_sidecar_image() {
        let mut route: NotificationRoute = serde_yaml::from_str(
            "apiVersion: storerelay.dev/v1alpha1\nkind: NotificationRoute\nmetadata: {name: r, namespace: shop}\nspec:\n  selector: {matchLabels: {a: b}}\n  destinations: [{name: d, url: 'https://d.invalid/'}]\n",
        )
        .unwrap();
        let strict = InjectOptions::default();
        assert_eq!(image_refusal(&route, &strict), None, "no override: the operator's image");
        route.spec.sidecar = Some(serde_json::from_value(serde_json::json!({"image": "evil/miner:1"})).unwrap());
        let refusal = image_refusal(&route, &strict).expect("refused");
        assert!(refusal.contains("evil/miner:1") && refusal.contains("sidecarImage.allowedOverrides"), "{refusal}");
        let pinned = InjectOptions { image_policy: ImagePolicy::Only(vec!["evil/miner:1".into()]), ..strict.clone() };
        assert_eq!(image_refusal(&route, &pinned), None);
        let own = serde_json::from_value(serde_json::json!({"image": strict.image.clone()})).unwrap();
        route.spec.sidecar = Some(own);
        assert_eq!(image_refusal(&route, &strict), None, "naming the operator's own image is fine");
        route.spec.sidecar = Some(serde_json::from_value(serde_json::json!({"image": "x/y:z"})).unwrap());
        assert_eq!(image_refusal(&route, &InjectOptions { image_policy: ImagePolicy::Any, ..strict }), None);
    }
    use k8s_openapi::api::core::v1::Pod;

    fn route() -> NotificationRoute {
        serde_yaml::from_str(
            r#"
apiVersion: storerelay.dev/v1alpha1
kind: NotificationRoute
metadata: {name: payments, namespace: shop}
spec:
  selector: {matchLabels: {app: payments}}
  upstream: {port: 8080}
  destinations:
    - name: revenuecat
      urlFrom: {secretKeyRef: {name: revenuecat, key: url}}
"#,
        )
        .unwrap()
    }

    fn pod() -> Pod {
        serde_yaml::from_str(
            r#"
apiVersion: v1
kind: Pod
metadata: {name: p, labels: {app: payments}}
spec:
  containers:
    - name: app
      image: example/app
      ports: [{containerPort: 8080}]
"#,
        )
        .unwrap()
    }

    #[test]
    fn injects_a_native_sidecar_once() {
        let injection = injection(&route(), &InjectOptions::default());
        let mut pod = pod();
        let spec = pod.spec.as_mut().unwrap();
        assert_eq!(inject(&mut pod.metadata, spec, &injection), Ok(Outcome::Injected));
        let sidecar = &spec.init_containers.as_ref().unwrap()[0];
        assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
        assert_eq!(sidecar.security_context.as_ref().unwrap().run_as_user, Some(65532));
        let annotation = &pod.metadata.annotations.as_ref().unwrap()[INJECTED_ANNOTATION];
        assert_eq!(annotation, &format!("payments@{}", injection.revision));
        let once = pod.clone();
        let spec = pod.spec.as_mut().unwrap();
        assert_eq!(inject(&mut pod.metadata, spec, &injection), Ok(Outcome::AlreadyInjected));
        assert_eq!(pod, once);
    }

    #[test]
    fn the_prepared_patch_does_what_inject_does_to_every_shape_of_pod() {
        let injection = injection(&route(), &InjectOptions::default());
        let prepared = PreparedInjection::new(&injection);
        let existing_volume = Volume { name: "data".into(), ..Default::default() };
        let existing_init =
            Container { name: "migrate".into(), image: Some("example/migrate".into()), ..Default::default() };
        // Lists and the annotation map absent, empty and present.
        for (annotations, init, volumes) in [
            (None, None, None),
            (Some(BTreeMap::new()), Some(vec![]), Some(vec![])),
            (
                Some(BTreeMap::from([("team".to_string(), "pay/ments~1".to_string())])),
                Some(vec![existing_init.clone()]),
                Some(vec![existing_volume.clone()]),
            ),
        ] {
            let mut original = pod();
            original.metadata.annotations = annotations;
            let spec = original.spec.as_mut().unwrap();
            spec.init_containers = init;
            spec.volumes = volumes;

            let mut injected = original.clone();
            let spec = injected.spec.as_mut().unwrap();
            assert_eq!(inject(&mut injected.metadata, spec, &injection), Ok(Outcome::Injected));

            let Ok(Patched::Patch(patch)) = prepared.patch(&original.metadata, original.spec.as_ref().unwrap()) else {
                panic!("expected a patch")
            };
            let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
            let mut patched = serde_json::to_value(&original).unwrap();
            json_patch::patch(&mut patched, &patch).unwrap();
            assert_eq!(patched, serde_json::to_value(&injected).unwrap());
        }
        let spec = pod().spec.unwrap();
        let mut opted_out = pod().metadata;
        opted_out.annotations = Some(BTreeMap::from([(INJECT_ANNOTATION.to_string(), "false".to_string())]));
        assert_eq!(prepared.patch(&opted_out, &spec), Ok(Patched::Unchanged(Outcome::OptedOut)));
        let mut colliding = spec.clone();
        colliding.volumes = Some(vec![Volume { name: injection.volumes[0].name.clone(), ..Default::default() }]);
        assert!(matches!(prepared.patch(&pod().metadata, &colliding), Err(InjectError::VolumeCollision { .. })));
    }

    #[test]
    fn uninject_restores_the_original() {
        let injection = injection(&route(), &InjectOptions::default());
        let original = pod();
        let mut pod = original.clone();
        let spec = pod.spec.as_mut().unwrap();
        inject(&mut pod.metadata, spec, &injection).unwrap();
        let spec = pod.spec.as_mut().unwrap();
        assert!(uninject(&mut pod.metadata, spec));
        assert_eq!(pod, original);
    }

    #[test]
    fn opt_out_and_collisions() {
        let injection = injection(&route(), &InjectOptions::default());
        let mut pod = pod();
        pod.metadata.annotations = Some(BTreeMap::from([(INJECT_ANNOTATION.to_string(), "false".to_string())]));
        let spec = pod.spec.as_mut().unwrap();
        assert_eq!(inject(&mut pod.metadata, spec, &injection), Ok(Outcome::OptedOut));

        let mut pod = self::pod();
        pod.spec.as_mut().unwrap().containers[0]
            .ports
            .as_mut()
            .unwrap()
            .push(ContainerPort { container_port: 9089, ..Default::default() });
        let spec = pod.spec.as_mut().unwrap();
        let err = inject(&mut pod.metadata, spec, &injection).unwrap_err();
        assert_eq!(err, InjectError::PortCollision { port: 9089, container: "app".into(), route: "payments".into() });
        assert!(err.to_string().contains("port 9089") && err.to_string().contains("NotificationRoute payments"));
    }

    #[test]
    fn the_revision_follows_injection_time_fields_only() {
        let base = injection(&route(), &InjectOptions::default());
        let mut changed = route();
        changed.spec.sidecar = Some(crate::crd::SidecarSpec { image: Some("other:1".into()), ..Default::default() });
        assert_ne!(injection(&changed, &InjectOptions::default()).revision, base.revision);
        let mut live = route();
        live.spec.destinations[0].timeout = Some("3s".into());
        assert_eq!(injection(&live, &InjectOptions::default()).revision, base.revision, "a live setting");
    }
}
