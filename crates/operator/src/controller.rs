//! The route controller: reconcile renders the ConfigMap, checks references, counts pods, restarts
//! workloads when asked, and writes status and Events; `error_policy` retries with a delay. Only the
//! leader writes: other replicas keep their caches warm (the webhook reads them) and requeue.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Pod, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;

use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::watch;

use crate::crd::{NotificationRoute, NotificationRouteStatus, RolloutPolicy};
use crate::events::{Event, EventType, Recorder};
use crate::inject::{self, InjectOptions, RESTARTED_AT_ANNOTATION};
use crate::metrics::Metrics;
use crate::render::{CONFIG_KEY, config_map_name, render_yaml};
use crate::restarts::RestartSchedule;
use crate::status::{self, ConfigMapProblem, Facts, RestartableKind, SecretsCheck, Workload};

pub const FIELD_MANAGER: &str = "storerelay-operator";
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "storerelay-operator");
/// Status is refreshed this often even when nothing triggers a reconcile: Secrets are not watched (the
/// operator may only `get` them), so this is how a created or deleted Secret shows in SecretsResolved.
const RESYNC: Duration = Duration::from_secs(60);
/// Sooner while something is wrong, so a fix shows quickly.
const RESYNC_DEGRADED: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("the route has no namespace")]
    NoNamespace,
}

/// What reconcile needs, shared by every reconciliation.
pub struct Context {
    pub client: Client,
    pub pods: Store<PartialObjectMeta<Pod>>,
    pub routes: Store<NotificationRoute>,
    pub recorder: Recorder,
    pub options: InjectOptions,
    /// Whether the operator may `get` Secrets (chart value rbac.checkSecrets).
    pub check_secrets: bool,
    /// Whether the operator may patch workloads (chart value rbac.restartWorkloads).
    pub restarts_allowed: bool,
    pub leader: watch::Receiver<bool>,
    pub metrics: Arc<Metrics>,
    /// Workload restarts so far, for `rollout.policy: RestartWorkloads`'s backoff.
    pub restarts: Mutex<RestartSchedule>,
}

pub async fn reconcile(route: Arc<NotificationRoute>, ctx: Arc<Context>) -> Result<Action, Error> {
    if !*ctx.leader.borrow() {
        return Ok(Action::requeue(Duration::from_secs(15)));
    }
    let started = Instant::now();
    let result = reconcile_route(&route, &ctx).await;
    ctx.metrics.observe_reconcile(started.elapsed());
    ctx.metrics.count_reconciliation(if result.is_ok() { "ok" } else { "error" });
    result
}

pub fn error_policy(route: Arc<NotificationRoute>, error: &Error, _: Arc<Context>) -> Action {
    tracing::warn!(route = %route.name_any(), namespace = ?route.namespace(), %error, "reconcile failed; retrying in 30s");
    Action::requeue(Duration::from_secs(30))
}

async fn reconcile_route(route: &NotificationRoute, ctx: &Context) -> Result<Action, Error> {
    let namespace = route.namespace().ok_or(Error::NoNamespace)?;
    let name = route.name_any();

    let rendered = render_yaml(route);
    let config_map_problem = match &rendered {
        Ok(yaml) => apply_config_map(ctx, route, &namespace, yaml).await?,
        Err(_) => None,
    };
    let render_error =
        rendered.as_ref().err().map(|e| e.to_string()).or_else(|| inject::image_refusal(route, &ctx.options));
    let secrets = check_references(ctx, route, &namespace).await?;

    let injection = inject::injection(route, &ctx.options);
    let all_routes = ctx.routes.state();
    let route_refs: Vec<&NotificationRoute> = all_routes.iter().map(|r| r.as_ref()).collect();
    let pods = ctx.pods.state();
    let counts = status::count_pods(route, &injection.revision, pods.iter().map(|p| p.as_ref()), &route_refs);

    let policy = route.spec.rollout.as_ref().map(|r| r.policy).unwrap_or_default();
    if policy == RolloutPolicy::RestartWorkloads && ctx.restarts_allowed {
        let needed: BTreeSet<String> =
            counts.workloads.iter().filter(|w| w.restartable().is_some()).map(|w| format!("{namespace}/{w}")).collect();
        ctx.restarts.lock().unwrap_or_else(|p| p.into_inner()).keep_only(&namespace, &needed);
        for workload in counts.workloads.iter().filter(|w| w.restartable().is_some()) {
            restart(ctx, route, &namespace, workload).await?;
        }
    }

    let old_conditions = route.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
    let mut conditions = status::conditions(&Facts {
        generation: route.metadata.generation,
        render_error: render_error.as_deref(),
        config_map: config_map_problem.as_ref(),
        secrets: &secrets,
        counts: &counts,
        policy,
        restarts_allowed: ctx.restarts_allowed,
        shared_spool: route.spec.spool.as_ref().is_some_and(|s| s.postgres.is_some()),
    });
    status::carry_transition_times(&mut conditions, &old_conditions);
    let new_status = NotificationRouteStatus {
        observed_generation: route.metadata.generation,
        revision: Some(injection.revision.clone()),
        config_map: (rendered.is_ok() && config_map_problem.is_none()).then(|| config_map_name(&name)),
        matched: counts.matched,
        injected: counts.injected,
        outdated: counts.outdated,
        missing: counts.missing,
        workloads_to_restart: counts.workloads.iter().map(ToString::to_string).collect(),
        conditions: conditions.clone(),
    };
    if route.status.as_ref() != Some(&new_status) {
        let api: Api<NotificationRoute> = Api::namespaced(ctx.client.clone(), &namespace);
        let patch = json!({"apiVersion": "storerelay.dev/v1alpha1", "kind": "NotificationRoute", "status": new_status});
        api.patch_status(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(patch)).await?;
    }
    for condition in status::changed(&conditions, &old_conditions) {
        let event = Event {
            type_: if status::is_warning(condition) { EventType::Warning } else { EventType::Normal },
            reason: condition.reason.clone(),
            note: Some(format!("{}={}: {}", condition.type_, condition.status, condition.message)),
            action: "Reconcile".into(),
            secondary: None,
        };
        publish(ctx, route, event).await;
    }
    let degraded =
        render_error.is_some() || config_map_problem.is_some() || matches!(secrets, SecretsCheck::Missing(_));
    Ok(Action::requeue(if degraded { RESYNC_DEGRADED } else { RESYNC }))
}

async fn publish(ctx: &Context, route: &NotificationRoute, event: Event) {
    let reference: ObjectReference = route.object_ref(&());
    if let Err(error) = ctx.recorder.publish(&event, &reference).await {
        tracing::warn!(%error, route = %route.name_any(), "cannot publish event");
    }
}

/// Writes the route's ConfigMap, unless a ConfigMap of its name exists that the operator did not
/// create for this route (it is never taken over: it may be anyone's), or the operator may not write
/// ConfigMaps in the namespace. Either is returned as the problem to report in the route's status.
async fn apply_config_map(
    ctx: &Context,
    route: &NotificationRoute,
    namespace: &str,
    yaml: &str,
) -> Result<Option<ConfigMapProblem>, Error> {
    let name = config_map_name(&route.name_any());
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    let existing = match api.get_opt(&name).await {
        Ok(existing) => existing,
        Err(error) if is_forbidden(&error) => return Ok(Some(forbidden(namespace, &name))),
        Err(error) => return Err(error.into()),
    };
    if existing.is_some_and(|existing| !created_for(&existing, route)) {
        return Ok(Some(ConfigMapProblem::NotOurs(format!(
            "ConfigMap {namespace}/{name} exists and was not created by storerelay for this route; it is not taken over and no pod is injected to mount it: delete or rename it"
        ))));
    }
    let config_map = ConfigMap {
        metadata: kube::core::ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([
                (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
                ("storerelay.dev/route".to_string(), route.name_any()),
            ])),
            owner_references: route.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(CONFIG_KEY.to_string(), yaml.to_string())])),
        ..Default::default()
    };
    let mut value = serde_json::to_value(&config_map).unwrap_or_default();
    value["apiVersion"] = json!("v1");
    value["kind"] = json!("ConfigMap");
    // Forced: the ConfigMap is ours (checked above), and an edit by hand is drift to undo.
    match api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(value)).await {
        Ok(_) => Ok(None),
        Err(error) if is_forbidden(&error) => Ok(Some(forbidden(namespace, &name))),
        Err(error) => Err(error.into()),
    }
}

/// Whether the operator created `config_map` for `route`: our label and `route` as its controller.
fn created_for(config_map: &ConfigMap, route: &NotificationRoute) -> bool {
    let labelled = config_map.labels().get(MANAGED_BY.0).is_some_and(|v| v == MANAGED_BY.1);
    let uid = route.uid();
    let owned =
        config_map.owner_references().iter().any(|o| o.controller == Some(true) && Some(&o.uid) == uid.as_ref());
    labelled && owned
}

fn is_forbidden(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 403)
}

fn forbidden(namespace: &str, name: &str) -> ConfigMapProblem {
    ConfigMapProblem::Forbidden(format!(
        "the operator may not write ConfigMap {namespace}/{name}: add {namespace} to the chart value rbac.routeNamespaces"
    ))
}

/// Checks that every Secret key and the Apple root ConfigMap key the route names exist.
async fn check_references(ctx: &Context, route: &NotificationRoute, namespace: &str) -> Result<SecretsCheck, Error> {
    let mut missing = Vec::new();
    let mut secret_refs = Vec::new();
    for destination in &route.spec.destinations {
        secret_refs
            .extend(destination.url_from.iter().chain(&destination.headers_from).map(|s| s.secret_key_ref.clone()));
    }
    let shared_spool = route.spec.spool.as_ref().and_then(|s| s.postgres.as_ref());
    if let Some(postgres) = shared_spool {
        secret_refs.push(postgres.url_from.secret_key_ref.clone());
        secret_refs.extend(postgres.root_certificate_from.iter().filter_map(|r| r.secret_key_ref.clone()));
    }
    if let Some(api) = &route.spec.app_store_server_api {
        secret_refs.push(api.key_from.secret_key_ref.clone());
    }
    if let Some(verify) = &route.spec.verify {
        secret_refs.extend(verify.v1_password_from.iter().map(|s| s.secret_key_ref.clone()));
        if let Some(root) = &verify.apple_root {
            secret_refs.extend(root.secret_key_ref.clone());
            if let Some(reference) = &root.config_map_key_ref {
                let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
                let has_key = match api.get_opt(&reference.name).await {
                    Err(error) if is_forbidden(&error) => false,
                    found => found?.is_some_and(|cm| {
                        cm.data.is_some_and(|d| d.contains_key(&reference.key))
                            || cm.binary_data.is_some_and(|d| d.contains_key(&reference.key))
                    }),
                };
                if !has_key {
                    missing.push(format!("ConfigMap {}/{}", reference.name, reference.key));
                }
            }
        }
    }
    if !ctx.check_secrets {
        return Ok(if missing.is_empty() { SecretsCheck::NotChecked } else { SecretsCheck::Missing(missing) });
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    secret_refs.sort();
    secret_refs.dedup();
    for reference in secret_refs {
        // `get` only: the operator is never granted list or watch on Secrets.
        let found = api.get_opt(&reference.name).await?;
        if !found.is_some_and(|s| s.data.is_some_and(|d| d.contains_key(&reference.key))) {
            missing.push(format!("Secret {}/{}", reference.name, reference.key));
        }
    }
    Ok(if missing.is_empty() { SecretsCheck::Resolved } else { SecretsCheck::Missing(missing) })
}

/// What `kubectl rollout restart` does: a new annotation on the pod template, with a backoff per
/// workload ([`RestartSchedule`]).
async fn restart(ctx: &Context, route: &NotificationRoute, namespace: &str, workload: &Workload) -> Result<(), Error> {
    let Some(kind) = workload.restartable() else { return Ok(()) };
    let key = format!("{namespace}/{workload}");
    if !ctx.restarts.lock().unwrap_or_else(|p| p.into_inner()).may_restart(&key, Instant::now()) {
        return Ok(());
    }
    let patch = json!({"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT_ANNOTATION: Timestamp::now().to_string()}}}}});
    let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    let client = ctx.client.clone();
    match kind {
        RestartableKind::Deployment => {
            Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(client, namespace)
                .patch(&workload.name, &params, &Patch::Merge(&patch))
                .await?;
        }
        RestartableKind::StatefulSet => {
            Api::<k8s_openapi::api::apps::v1::StatefulSet>::namespaced(client, namespace)
                .patch(&workload.name, &params, &Patch::Merge(&patch))
                .await?;
        }
        RestartableKind::DaemonSet => {
            Api::<k8s_openapi::api::apps::v1::DaemonSet>::namespaced(client, namespace)
                .patch(&workload.name, &params, &Patch::Merge(&patch))
                .await?;
        }
    }
    // Counted only once the patch went through: a failed one is tried again at the next reconcile.
    let times = ctx.restarts.lock().unwrap_or_else(|p| p.into_inner()).restarted(&key, Instant::now());
    let next = humantime::format_duration(RestartSchedule::interval(times));
    ctx.metrics.count_workload_restart(kind.as_str());
    tracing::info!(route = %route.name_any(), namespace, %workload, times, %next, "restarted workload to pick up the sidecar");
    let event = Event {
        type_: EventType::Normal,
        reason: "RestartedWorkload".into(),
        note: Some(format!(
            "restarted {workload} so its pods get the current sidecar (restart {times} in a row; the next one no sooner than {next})"
        )),
        action: "Restart".into(),
        secondary: None,
    };
    publish(ctx, route, event).await;
    Ok(())
}

/// Events for pods that two routes select, reported by the webhook.
pub async fn report_conflicts(
    ctx: Arc<Context>,
    mut reports: tokio::sync::mpsc::Receiver<crate::webhook::ConflictReport>,
) {
    while let Some(report) = reports.recv().await {
        for route in ctx.routes.state().iter().filter(|r| {
            r.namespace().as_deref() == Some(report.namespace.as_str()) && report.routes.contains(&r.name_any())
        }) {
            let event = Event {
                type_: EventType::Warning,
                reason: "SelectorConflict".into(),
                note: Some(format!(
                    "pod {} is selected by routes {}: not injected",
                    report.pod,
                    report.routes.join(", ")
                )),
                action: "Admit".into(),
                secondary: None,
            };
            publish(&ctx, route, event).await;
        }
    }
}
