//! The mutating admission webhook for pods (CREATE).
//!
//! The decision is a pure function of the pod and the routes in the operator's route index: no API
//! call sits on the admission path, so a slow API server never slows pod creation. One route selects
//! the pod: patch. None: unchanged. Several: unchanged, with a warning (and an Event).

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};

use crate::inject::{Outcome, Patched};
use crate::metrics::Metrics;
use crate::route_index::{IndexedRoute, RouteIndex};

/// What the webhook decided about one pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// No route selects the pod, or it opted out, or it has the sidecar already.
    Unchanged(&'static str),
    Patch {
        route: String,
        /// The JSON patch, serialised.
        patch: Vec<u8>,
    },
    /// Two or more routes select the pod: nothing is injected.
    Conflict {
        routes: Vec<String>,
    },
    Deny(String),
}

/// Decides for a pod given the routes that select it (from [`RouteIndex::selecting`]).
pub fn decide(pod: &Pod, selecting: &[Arc<IndexedRoute>]) -> Decision {
    let route = match selecting {
        [] => return Decision::Unchanged("no route selects the pod"),
        [route] => route,
        several => return Decision::Conflict { routes: several.iter().map(|r| r.name.clone()).collect() },
    };
    // The route's status says why; the app's pod is not held up for it.
    let prepared = match &route.admission {
        Ok(prepared) => prepared,
        Err(reason) => return Decision::Unchanged(reason),
    };
    let Some(spec) = pod.spec.as_ref() else { return Decision::Unchanged("the pod has no spec") };
    match prepared.patch(&pod.metadata, spec) {
        Ok(Patched::Patch(patch)) => Decision::Patch { route: route.name.clone(), patch },
        Ok(Patched::Unchanged(Outcome::OptedOut)) => {
            Decision::Unchanged("the pod opted out (storerelay.dev/inject: \"false\")")
        }
        Ok(Patched::Unchanged(_)) => Decision::Unchanged("the sidecar is already there"),
        Err(error) => Decision::Deny(error.to_string()),
    }
}

/// The AdmissionResponse for a decision, but for the patch, which [`ReviewResponse`] carries.
pub fn respond(request: &AdmissionRequest<Pod>, decision: &Decision) -> AdmissionResponse {
    let response = AdmissionResponse::from(request);
    match decision {
        Decision::Unchanged(_) | Decision::Patch { .. } => response,
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
    pub routes: Arc<RouteIndex>,
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
            static NO_LABELS: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
            let labels = pod.metadata.labels.as_ref().unwrap_or(&NO_LABELS);
            decide(pod, &state.routes.selecting(&namespace, labels))
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
    let patch = match &decision {
        Decision::Patch { patch, .. } => Some(patch.as_slice()),
        _ => None,
    };
    axum::Json(ReviewResponse::new(respond(&request, &decision), patch)).into_response()
}

/// An AdmissionReview response as Kubernetes reads it: `response.patch` base64, which is how its Go
/// types encode `[]byte` (kube's `AdmissionResponse` serialises the bytes as an array of numbers).
#[derive(serde::Serialize)]
struct ReviewResponse {
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    kind: &'static str,
    response: ResponseWithPatch,
}

#[derive(serde::Serialize)]
struct ResponseWithPatch {
    #[serde(flatten)]
    response: AdmissionResponse,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<String>,
    #[serde(rename = "patchType", skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
}

impl ReviewResponse {
    fn new(response: AdmissionResponse, patch: Option<&[u8]>) -> ReviewResponse {
        use base64::Engine;
        let patch = patch.map(|bytes| base64::engine::general_purpose::STANDARD.encode(bytes));
        let patch_type = patch.as_ref().map(|_| "JSONPatch");
        ReviewResponse {
            api_version: "admission.k8s.io/v1",
            kind: "AdmissionReview",
            response: ResponseWithPatch { response, patch, patch_type },
        }
    }
}
