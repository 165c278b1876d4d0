//! The mutating admission webhook for pods (CREATE).
//!
//! The decision is a pure function of the pod and the routes in the controller's reflector cache: no
//! API call sits on the admission path, so a slow API server never slows pod creation. One route
//! selects the pod: patch. None: unchanged. Several: unchanged, with a warning (and an Event).

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use kube::core::{DynamicObject, ObjectMeta};
use kube::runtime::reflector::Store;

use crate::crd::NotificationRoute;
use crate::inject::{self, InjectOptions, Outcome};
use crate::metrics::Metrics;
use crate::select::routes_for;

/// What the webhook decided about one pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// No route selects the pod, or it opted out, or it has the sidecar already.
    Unchanged(&'static str),
    Patch {
        route: String,
        patch: json_patch::Patch,
    },
    /// Two or more routes select the pod: nothing is injected.
    Conflict {
        routes: Vec<String>,
    },
    Deny(String),
}

/// Decides for a pod in `namespace` given every known route.
pub fn decide<'a>(
    pod: &Pod,
    namespace: &str,
    routes: impl IntoIterator<Item = &'a NotificationRoute>,
    options: &InjectOptions,
) -> Decision {
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let selected = routes_for(routes, namespace, &labels);
    let route = match selected.as_slice() {
        [] => return Decision::Unchanged("no route selects the pod"),
        [route] => *route,
        several => {
            return Decision::Conflict { routes: several.iter().filter_map(|r| r.metadata.name.clone()).collect() };
        }
    };
    // The route's status says why (InvalidSpec); the app's pod is not held up for it.
    if inject::image_refusal(route, options).is_some() {
        return Decision::Unchanged("the route names a sidecar image this installation does not allow");
    }
    // The route's ConfigMap name is taken by a ConfigMap the operator did not write: mounting it would
    // hand the sidecar someone else's config.
    if crate::status::config_map_not_ours(route) {
        return Decision::Unchanged("the route's ConfigMap belongs to someone else (see the route's Ready condition)");
    }
    let injection = inject::injection(route, options);
    let mut patched = pod.clone();
    let mut meta: ObjectMeta = std::mem::take(&mut patched.metadata);
    let Some(spec) = patched.spec.as_mut() else { return Decision::Unchanged("the pod has no spec") };
    match inject::inject(&mut meta, spec, &injection) {
        Ok(Outcome::Injected) => {
            patched.metadata = meta;
            let before = serde_json::to_value(pod).unwrap_or_default();
            let after = serde_json::to_value(&patched).unwrap_or_default();
            Decision::Patch { route: injection.route, patch: json_patch::diff(&before, &after) }
        }
        Ok(Outcome::AlreadyInjected) => Decision::Unchanged("the sidecar is already there"),
        Ok(Outcome::OptedOut) => Decision::Unchanged("the pod opted out (storerelay.dev/inject: \"false\")"),
        Err(error) => Decision::Deny(error.to_string()),
    }
}

/// The AdmissionResponse for a decision.
pub fn respond(request: &AdmissionRequest<Pod>, decision: &Decision) -> AdmissionResponse {
    let response = AdmissionResponse::from(request);
    match decision {
        Decision::Unchanged(_) => response,
        Decision::Patch { patch, .. } => match response.clone().with_patch(patch.clone()) {
            Ok(patched) => patched,
            // Cannot happen for a patch we built; admitting unchanged is the safe fallback.
            Err(_) => response,
        },
        Decision::Conflict { routes } => {
            let mut response = response;
            response.warnings = Some(vec![format!(
                "storerelay: NotificationRoutes {} all select this pod; none was injected (SelectorConflict)",
                routes.join(", ")
            )]);
            response
        }
        Decision::Deny(message) => response.deny(format!("storerelay: {message}")),
    }
}

pub struct WebhookState {
    pub routes: Store<NotificationRoute>,
    pub options: InjectOptions,
    pub metrics: Arc<Metrics>,
    /// Reports selector conflicts as Events on the routes involved (not for dry-run requests). Bounded
    /// ([`CONFLICT_REPORTS`] in the operator): whoever may create pods can make conflicts, so reports
    /// beyond it are dropped and counted rather than queued without limit.
    pub conflicts: Option<tokio::sync::mpsc::Sender<ConflictReport>>,
}

/// Conflict reports waiting to become Events at most; the route's `SelectorConflict` condition says
/// the same from the pod cache, so a dropped report loses only an Event.
pub const CONFLICT_REPORTS: usize = 64;

/// A pod that two or more routes select, for the controller to turn into Events.
#[derive(Debug, Clone)]
pub struct ConflictReport {
    pub namespace: String,
    pub pod: String,
    pub routes: Vec<String>,
}

pub fn router(state: Arc<WebhookState>) -> Router {
    Router::new().route("/mutate", post(mutate)).with_state(state)
}

async fn mutate(State(state): State<Arc<WebhookState>>, body: axum::body::Bytes) -> Response {
    let started = Instant::now();
    let review: AdmissionReview<Pod> = match serde_json::from_slice(&body) {
        Ok(review) => review,
        Err(error) => {
            state.metrics.count_admission("invalid");
            return (StatusCode::BAD_REQUEST, format!("not an AdmissionReview: {error}")).into_response();
        }
    };
    let request: AdmissionRequest<Pod> = match review.try_into() {
        Ok(request) => request,
        Err(_) => {
            state.metrics.count_admission("invalid");
            let review = AdmissionResponse::invalid("no request in the AdmissionReview").into_review();
            return axum::Json(review).into_response();
        }
    };
    let namespace = request.namespace.clone().unwrap_or_default();
    let decision = match &request.object {
        Some(pod) => {
            let routes = state.routes.state();
            decide(pod, &namespace, routes.iter().map(|r| r.as_ref()), &state.options)
        }
        None => Decision::Unchanged("no object"),
    };
    let pod_name = request
        .object
        .as_ref()
        .and_then(|p| p.metadata.name.clone().or_else(|| p.metadata.generate_name.clone().map(|g| format!("{g}*"))))
        .unwrap_or_default();
    let label = match &decision {
        Decision::Unchanged(_) => "unchanged",
        Decision::Patch { .. } => "injected",
        Decision::Conflict { .. } => "conflict",
        Decision::Deny(_) => "denied",
    };
    state.metrics.count_admission(label);
    state.metrics.observe_admission(started.elapsed());
    match &decision {
        Decision::Patch { route, .. } => {
            tracing::info!(namespace, pod = %pod_name, route, dry_run = request.dry_run, "injected")
        }
        Decision::Conflict { routes } => {
            tracing::warn!(namespace, pod = %pod_name, ?routes, "several routes select the pod; not injected");
            if let (false, Some(conflicts)) = (request.dry_run, &state.conflicts) {
                let report = ConflictReport { namespace: namespace.clone(), pod: pod_name, routes: routes.clone() };
                if conflicts.try_send(report).is_err() {
                    state.metrics.count_conflict_report_dropped();
                }
            }
        }
        Decision::Deny(message) => tracing::warn!(namespace, pod = %pod_name, message, "denied"),
        Decision::Unchanged(reason) => tracing::debug!(namespace, pod = %pod_name, reason, "unchanged"),
    }
    let review: AdmissionReview<DynamicObject> = respond(&request, &decision).into_review();
    axum::Json(base64_patch(review)).into_response()
}

/// The AdmissionReview as JSON with `response.patch` as a base64 string: how Kubernetes' Go types
/// encode `[]byte` (kube serialises the bytes as an array of numbers).
fn base64_patch(review: AdmissionReview<DynamicObject>) -> serde_json::Value {
    use base64::Engine;
    let mut value = serde_json::to_value(review).unwrap_or_default();
    if let Some(patch) = value.pointer_mut("/response/patch") {
        if let Some(bytes) =
            patch.as_array().map(|a| a.iter().filter_map(|b| b.as_u64().map(|b| b as u8)).collect::<Vec<u8>>())
        {
            *patch = serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
        }
    }
    value
}
