//! Wires the operator together: caches, leader election, the controller, the webhook server, the
//! certificate manager, and the admin endpoints.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::{Controller, WatchStreamExt, reflector, watcher};
use kube::{Client, ResourceExt};
use storerelay_runtime::CancellationToken;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::certs::{CertResolver, server_config};
use crate::controller::{self, Context};
use crate::crd::NotificationRoute;
use crate::events::{Recorder, Reporter};
use crate::inject::InjectOptions;
use crate::metrics::Metrics;
use crate::route_index::RouteIndex;
use crate::webhook::{self, WebhookState};
use crate::webhook_config::{self, WebhookSettings};

/// Routes reconciled at once. Unbounded (kube's default), a thousand routes reconcile together and the
/// client opens a connection to the API server for each request in flight, each with its TLS and
/// HTTP buffers: about 130 MiB that stayed allocated, measured with 1,000 routes (docs/benchmarks.md).
const RECONCILE_CONCURRENCY: u16 = 16;

#[derive(Debug, Clone)]
pub struct Settings {
    pub webhook_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// This pod's name: the leader-election identity and the Events' reporting instance.
    pub identity: String,
    pub lease_name: String,
    pub inject: InjectOptions,
    pub check_secrets: bool,
    pub restarts_allowed: bool,
    pub webhook: WebhookSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot reach the Kubernetes API: {0}")]
    Client(#[from] kube::Error),
    #[error("cannot listen on {address} ({what}): {source}")]
    Bind { what: &'static str, address: SocketAddr, source: std::io::Error },
}

struct Health {
    metrics: Arc<Metrics>,
    /// Set by each cache's feed when its first list is complete. Not `Store::wait_until_ready`: the
    /// controller waits on the routes' store too, and kube 5 wakes only one of two tasks waiting on
    /// the same store (found when the controller began sharing it: readiness never came).
    routes_synced: Arc<AtomicBool>,
    pods_synced: Arc<AtomicBool>,
    resolver: Arc<CertResolver>,
}

pub async fn run(settings: Settings) -> Result<(), RunError> {
    let client = Client::try_default().await?;
    run_with_client(client, settings).await
}

pub async fn run_with_client(client: Client, settings: Settings) -> Result<(), RunError> {
    let metrics = Arc::new(Metrics::default());
    let resolver = Arc::new(CertResolver::default());
    let (leading_tx, leading) = watch::channel(false);
    // Cancelled once the controller has stopped (SIGTERM): the listeners close and finish open requests.
    let stop = CancellationToken::new();

    let bind = |what: &'static str, address: SocketAddr| async move {
        TcpListener::bind(address).await.map_err(|source| RunError::Bind { what, address, source })
    };
    let webhook_listener = bind("webhook", settings.webhook_addr).await?;
    let admin_listener = bind("admin", settings.admin_addr).await?;

    tokio::spawn(crate::leader::run(
        client.clone(),
        settings.webhook.namespace.clone(),
        settings.lease_name.clone(),
        settings.identity.clone(),
        leading_tx,
        metrics.clone(),
    ));

    // Every route, without managed fields: status reads it for selector conflicts, and the webhook
    // decides from an index of it by namespace, fed by the same events. Each cache is polled by its own
    // task, so the webhook and readiness never depend on the controller.
    let (routes, routes_writer) = reflector::store::<NotificationRoute>();
    let route_index = Arc::new(RouteIndex::new(settings.inject.clone()));
    let (routes_synced, pods_synced) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    // The controller reconciles from this same watch and store: `Controller::new` would keep a second
    // copy of every route, managed fields and all (about 5 MiB of 1,000 routes, measured with massif).
    let (route_changed, route_changes) = tokio::sync::mpsc::unbounded_channel();
    let route_feed = watcher(Api::<NotificationRoute>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(|route| route.managed_fields_mut().clear())
        .reflect(routes_writer)
        .inspect_ok({
            let route_index = route_index.clone();
            move |event| {
                route_index.apply_watcher_event(event);
                if let watcher::Event::Apply(route) | watcher::Event::InitApply(route) = event {
                    let _ = route_changed.send(route.clone());
                }
            }
        });
    tokio::spawn(drain(route_feed, "route watch", routes_synced.clone(), None));
    let route_changes = futures::stream::unfold(route_changes, |mut changes| async move {
        changes.recv().await.map(|route| (Ok::<_, watcher::Error>(route), changes))
    });
    // Pods, metadata only: labels, annotations and owners are all the status needs. Each change asks
    // the controller to recount every route.
    let (pods, pods_writer) = reflector::store();
    // Pages of 100: a page arrives whole, managed fields and all, before it is trimmed; smaller pages
    // leave fewer and smaller holes among what is kept.
    let pod_feed =
        watcher(Api::<PartialObjectMeta<Pod>>::all(client.clone()), watcher::Config::default().page_size(100))
            .default_backoff()
            .modify(forget_what_status_does_not_read)
            .reflect(pods_writer);
    let (pod_changed, pod_changes) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(drain(pod_feed, "pod watch", pods_synced.clone(), Some(pod_changed)));
    let pod_changes =
        futures::stream::unfold(pod_changes, |mut changes| async move { changes.recv().await.map(|()| ((), changes)) });

    let leadership = became_leader(leading.clone());
    // The routes' ConfigMaps are not watched: that takes list and watch on ConfigMaps in every namespace,
    // and the resync (a minute) already puts back one that was edited or deleted.
    let controller = Controller::for_stream(route_changes, routes.clone())
        .reconcile_all_on(pod_changes)
        .reconcile_all_on(leadership)
        .with_config(
            kube::runtime::controller::Config::default()
                .debounce(std::time::Duration::from_secs(1))
                .concurrency(RECONCILE_CONCURRENCY),
        );

    let recorder = Recorder::new(
        client.clone(),
        Reporter { controller: "storerelay-operator".into(), instance: settings.identity.clone() },
    );
    let context = Arc::new(Context {
        client: client.clone(),
        pods: pods.clone(),
        routes: routes.clone(),
        recorder,
        options: settings.inject.clone(),
        check_secrets: settings.check_secrets,
        restarts_allowed: settings.restarts_allowed,
        leader: leading.clone(),
        metrics: metrics.clone(),
        restarts: Mutex::new(Default::default()),
    });

    let (conflicts_tx, conflicts_rx) = tokio::sync::mpsc::channel(webhook::CONFLICT_REPORTS);
    tokio::spawn(controller::report_conflicts(context.clone(), conflicts_rx));
    let webhook_state =
        Arc::new(WebhookState { routes: route_index, metrics: metrics.clone(), conflicts: Some(conflicts_tx) });
    let webhook_server = tokio::spawn(crate::serve::serve_tls(
        webhook_listener,
        webhook::router(webhook_state),
        server_config(resolver.clone()),
        stop.clone(),
    ));
    tokio::spawn(webhook_config::manage(
        client.clone(),
        settings.webhook.clone(),
        resolver.clone(),
        routes.clone(),
        leading.clone(),
        metrics.clone(),
    ));

    let health = Arc::new(Health { metrics: metrics.clone(), routes_synced, pods_synced, resolver });
    let admin = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(serve_metrics))
        .with_state(health.clone());
    let admin_options =
        storerelay_runtime::http::ServeOptions { grace: std::time::Duration::from_secs(1), ..crate::serve::OPTIONS };
    let admin_server =
        tokio::spawn(storerelay_runtime::http::serve(admin_listener, admin, admin_options, stop.clone()));
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        webhook = %settings.webhook_addr,
        admin = %settings.admin_addr,
        identity = %settings.identity,
        "storerelay-operator started"
    );
    controller
        .shutdown_on_signal()
        .run(controller::reconcile, controller::error_policy, context)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::warn!(%error, "controller");
            }
        })
        .await;
    stop.cancel();
    let _ = tokio::join!(webhook_server, admin_server);
    tracing::info!("storerelay-operator stopped");
    Ok(())
}

/// glibc gives each thread that allocates under contention an arena of its own, up to eight per core,
/// and memory freed in one arena is not reused by another: with every pod and route cached, the
/// operator's RSS grew with the node's core count for no throughput (it is I/O bound). Two arenas:
/// 58 -> 52 MiB steady with 1,000 routes and 10,000 pods on two cores (docs/performance.md); more
/// on bigger nodes. `MALLOC_ARENA_MAX` in the environment still wins, as glibc reads it first.
/// Call before the runtime starts its threads.
pub fn limit_malloc_arenas() {
    const ARENAS: libc::c_int = 2;
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; called before the runtime's threads allocate.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, ARENAS);
        }
    }
}

/// Polls a reflected watch stream forever, logging errors, marking the cache synced after its first
/// list and reporting changed objects.
async fn drain<K>(
    feed: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    what: &'static str,
    synced: Arc<AtomicBool>,
    changed: Option<tokio::sync::mpsc::UnboundedSender<()>>,
) {
    futures::pin_mut!(feed);
    while let Some(event) = feed.next().await {
        if matches!(event, Ok(watcher::Event::InitDone)) && !synced.swap(true, Ordering::SeqCst) {
            tracing::info!("{what}: cache synced");
        }
        match event {
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone) => {
                if let Some(changed) = &changed {
                    let _ = changed.send(());
                }
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "{what}"),
        }
    }
}

/// A stream that yields whenever this replica becomes leader, to reconcile everything at once.
fn became_leader(leading: watch::Receiver<bool>) -> impl futures::Stream<Item = ()> + Send + 'static {
    futures::stream::unfold(leading, |mut leading| async move {
        loop {
            leading.changed().await.ok()?;
            if *leading.borrow() {
                return Some(((), leading));
            }
        }
    })
}

/// Every pod in the cluster is cached, so only what status reads is kept: name, namespace, labels,
/// deletion, the controller owner's kind and name, and storerelay's own annotations. Managed fields
/// (often the largest part of a pod's metadata), other annotations (kubectl's copy of the last applied
/// manifest among them), uid, resource version and the rest are dropped before the pod is stored.
/// The watch keeps its resource version from the events themselves, before this runs.
fn forget_what_status_does_not_read(pod: &mut PartialObjectMeta<Pod>) {
    use crate::inject::{INJECT_ANNOTATION, INJECTED_ANNOTATION};
    let meta = &mut pod.metadata;
    let kept = kube::core::ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        labels: meta.labels.take(),
        deletion_timestamp: meta.deletion_timestamp.take(),
        annotations: meta
            .annotations
            .take()
            .map(|mut all| {
                all.retain(|key, _| key == INJECTED_ANNOTATION || key == INJECT_ANNOTATION);
                all
            })
            .filter(|ours| !ours.is_empty()),
        owner_references: meta.owner_references.take().and_then(|owners| {
            let controller = owners.into_iter().find(|o| o.controller == Some(true))?;
            Some(vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                kind: controller.kind,
                name: controller.name,
                controller: Some(true),
                ..Default::default()
            }])
        }),
        ..Default::default()
    };
    *meta = kept;
    pod.types = None;
}

async fn serve_metrics(State(health): State<Arc<Health>>) -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, storerelay_runtime::metrics::CONTENT_TYPE)], health.metrics.render())
}

async fn readyz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let synced = health.routes_synced.load(Ordering::SeqCst) && health.pods_synced.load(Ordering::SeqCst);
    let certificate = health.resolver.is_loaded();
    match (synced, certificate) {
        (true, true) => (StatusCode::OK, "ready\n".to_string()),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: caches synced={synced}, serving certificate loaded={certificate}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_pods_keep_what_status_reads_and_drop_the_rest() {
        let mut pod: PartialObjectMeta<Pod> = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "app-1", "namespace": "shop", "labels": {"app": "payments"},
                "uid": "5f0c", "resourceVersion": "42", "deletionTimestamp": "2026-12-02T10:00:00Z",
                "annotations": {
                    "team": "payments",
                    crate::inject::INJECTED_ANNOTATION: "payments@0a1b2c3d4e",
                    crate::inject::INJECT_ANNOTATION: "false",
                    "kubectl.kubernetes.io/last-applied-configuration": "{\"a\":\"large\"}"
                },
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "Node", "name": "n", "uid": "n"},
                    {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "app-5d9", "uid": "u", "controller": true}
                ],
                "managedFields": [{"manager": "kubectl", "operation": "Update", "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {}}}]
            }
        }))
        .unwrap();
        forget_what_status_does_not_read(&mut pod);
        assert!(pod.managed_fields().is_empty());
        assert_eq!((pod.uid(), pod.resource_version()), (None, None));
        let annotations = pod.annotations();
        assert_eq!(annotations.len(), 2, "{annotations:?}");
        assert!(annotations.contains_key(crate::inject::INJECTED_ANNOTATION));
        assert!(annotations.contains_key(crate::inject::INJECT_ANNOTATION));
        assert_eq!(pod.labels().get("app").map(String::as_str), Some("payments"));
        assert!(pod.metadata.deletion_timestamp.is_some(), "terminating pods are not counted");
        let owner = pod.owner_references();
        assert_eq!(owner.len(), 1);
        assert_eq!((owner[0].kind.as_str(), owner[0].name.as_str()), ("ReplicaSet", "app-5d9"));
        assert_eq!(crate::status::workload_of(&pod.metadata).to_string(), "ReplicaSet/app-5d9");
    }
}
