//! `/healthz` (the process answers), `/readyz` (config loaded, spool open, listener bound, not draining)
//! and `/metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::watch;

use crate::clock::now_ms;
use crate::config::RuntimeConfig;
use crate::ingest::BodyBudget;
use crate::metrics::{Metrics, Snapshot};
use crate::spool::{Spool, SpoolBackend};

pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub spool: Spool,
    pub body_budget: Arc<BodyBudget>,
    pub config: watch::Receiver<Arc<RuntimeConfig>>,
    /// True once both listeners are bound; false again from SIGTERM on.
    pub ready: Arc<AtomicBool>,
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<Arc<AdminState>>) -> Response {
    if !state.ready.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "not ready: starting or draining\n").into_response();
    }
    // A stalled destination does not stop Apple's notifications from being stored, so it does not make
    // the pod unready (that would cut the app off too); it is reported here and in the metrics.
    let problems = state.config.borrow().problems();
    let mut body = String::from("ready\n");
    for problem in problems {
        body.push_str(&format!("degraded: {problem}\n"));
    }
    (StatusCode::OK, body).into_response()
}

async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    let stats = state.spool.stats().await.unwrap_or_default();
    let configured = state.config.borrow().destination_names();
    let max_bytes = state.config.borrow().file.spool.max_bytes.get();
    let text = state.metrics.render(&Snapshot {
        now_ms: now_ms(),
        spool: &stats,
        configured_destinations: &configured,
        stored_bytes: state.spool.stored_bytes(),
        max_bytes,
        buffered_bytes: state.body_budget.in_use(),
        max_buffered_bytes: state.body_budget.max(),
        ready: state.ready.load(Ordering::SeqCst),
    });
    ([(header::CONTENT_TYPE, storerelay_runtime::metrics::CONTENT_TYPE)], text).into_response()
}
