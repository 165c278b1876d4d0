//! AdmissionReviews over real HTTPS to the running webhook server.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;
use serde_json::{Value, json};
use storerelay_operator::NotificationRoute;
use storerelay_operator::certs::{CertResolver, generate, server_config};
use storerelay_operator::inject::{self, InjectOptions};
use storerelay_operator::metrics::Metrics;
use storerelay_operator::route_index::RouteIndex;
use storerelay_operator::webhook::{WebhookState, router};

fn route(name: &str, labels: &str) -> NotificationRoute {
    serde_yaml::from_str(&format!(
        "apiVersion: storerelay.dev/v1alpha1\nkind: NotificationRoute\nmetadata: {{name: {name}, namespace: shop, uid: uid-{name}}}\nspec:\n  selector: {{matchLabels: {labels}}}\n  upstream: {{port: 8080}}\n  destinations: [{{name: revenuecat, urlFrom: {{secretKeyRef: {{name: revenuecat, key: url}}}}}}]\n"
    ))
    .unwrap()
}

fn pod(labels: Value, ports: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "payments-7d9f-", "namespace": "shop", "labels": labels},
        "spec": {"containers": [{"name": "app", "image": "example/app:1", "ports": ports}]}
    })
}

fn review(pod: Value, dry_run: bool) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "0f1e2d3c", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop", "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod, "dryRun": dry_run
        }
    })
}

struct Server {
    url: String,
    client: reqwest::Client,
    metrics: Arc<Metrics>,
    /// Stops the server when the test's `Server` goes.
    _stop: tokio_util::sync::DropGuard,
}

async fn start(routes: Vec<NotificationRoute>) -> Server {
    start_with(routes, None).await
}

async fn start_with(
    routes: Vec<NotificationRoute>,
    conflicts: Option<tokio::sync::mpsc::Sender<storerelay_operator::webhook::ConflictReport>>,
) -> Server {
    let index = Arc::new(RouteIndex::new(InjectOptions::default()));
    for route in routes {
        index.apply_watcher_event(&watcher::Event::Apply(route));
    }
    let bundle =
        generate(&["localhost".into()], &["127.0.0.1".parse().unwrap()], time::OffsetDateTime::now_utc()).unwrap();
    let resolver = Arc::new(CertResolver::default());
    resolver.load(&bundle.cert_pem, &bundle.key_pem).unwrap();
    let metrics = Arc::new(Metrics::default());
    let state = Arc::new(WebhookState { routes: index, metrics: metrics.clone(), conflicts });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = storerelay_runtime::CancellationToken::new();
    tokio::spawn(storerelay_operator::serve::serve_tls(listener, router(state), server_config(resolver), stop.clone()));
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(bundle.ca_cert_pem.as_bytes()).unwrap())
        .no_proxy()
        .build()
        .unwrap();
    Server { url: format!("https://127.0.0.1:{}/mutate", addr.port()), client, metrics, _stop: stop.drop_guard() }
}

async fn admit(server: &Server, review: Value) -> Value {
    let response = server.client.post(&server.url).json(&review).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.json::<Value>().await.unwrap()["response"].clone()
}

fn decode_patch(response: &Value) -> json_patch::Patch {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD.decode(response["patch"].as_str().unwrap()).unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test]
async fn a_selected_pod_gets_a_patch_equal_to_the_pure_injection() {
    let payments = route("payments", "{app: payments}");
    let server = start(vec![payments.clone(), route("cart", "{app: cart}")]).await;
    let original = pod(json!({"app": "payments"}), json!([{"containerPort": 8080}]));
    let response = admit(&server, review(original.clone(), false)).await;
    assert_eq!(response["uid"], "0f1e2d3c");
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");

    let mut patched = original.clone();
    json_patch::patch(&mut patched, &decode_patch(&response)).unwrap();
    let mut expected: Pod = serde_json::from_value(original).unwrap();
    let injection = inject::injection(&payments, &InjectOptions::default());
    let spec = expected.spec.as_mut().unwrap();
    inject::inject(&mut expected.metadata, spec, &injection).unwrap();
    assert_eq!(patched, serde_json::to_value(&expected).unwrap(), "the patch applied to the pod is the pure injection");

    // Re-invocation with the injected pod changes nothing.
    let again = admit(&server, review(patched, false)).await;
    assert_eq!(again["allowed"], true);
    assert!(again.get("patch").is_none());
    assert_eq!(server.metrics.admissions("injected"), 1);
    assert_eq!(server.metrics.admissions("unchanged"), 1);
}

#[tokio::test]
async fn unselected_opted_out_conflicting_and_colliding_pods() {
    let server = start(vec![route("payments", "{app: payments}"), route("all-web", "{tier: web}")]).await;

    let unselected = admit(&server, review(pod(json!({"app": "cart"}), json!([])), false)).await;
    assert_eq!((unselected["allowed"].clone(), unselected.get("patch")), (json!(true), None));

    let mut opted_out = pod(json!({"app": "payments"}), json!([]));
    opted_out["metadata"]["annotations"] = json!({"storerelay.dev/inject": "false"});
    let response = admit(&server, review(opted_out, false)).await;
    assert!(response.get("patch").is_none());

    let both = admit(&server, review(pod(json!({"app": "payments", "tier": "web"}), json!([])), true)).await;
    assert_eq!(both["allowed"], true);
    assert!(both.get("patch").is_none());
    let warning = both["warnings"][0].as_str().unwrap();
    assert!(warning.contains("all-web, payments") && warning.contains("SelectorConflict"), "{warning}");

    let colliding =
        admit(&server, review(pod(json!({"app": "payments"}), json!([{"containerPort": 8089}])), false)).await;
    assert_eq!(colliding["allowed"], false);
    let message = colliding["status"]["message"].as_str().unwrap();
    assert!(message.contains("port 8089") && message.contains("NotificationRoute payments"), "{message}");
}

#[tokio::test]
async fn garbage_is_a_400_not_a_crash() {
    let server = start(vec![]).await;
    let response = server.client.post(&server.url).body("not json").send().await.unwrap();
    assert_eq!(response.status(), 400);
}

#[tokio::test]
async fn conflicts_are_reported_for_events_except_on_dry_run() {
    let (reports, mut received) = tokio::sync::mpsc::channel(8);
    let server =
        start_with(vec![route("payments", "{app: payments}"), route("all-web", "{tier: web}")], Some(reports)).await;
    let both = pod(json!({"app": "payments", "tier": "web"}), json!([]));
    admit(&server, review(both.clone(), true)).await;
    assert!(received.try_recv().is_err(), "a dry run emits nothing");
    admit(&server, review(both, false)).await;
    let report = received.try_recv().expect("a conflict report for the Events");
    assert_eq!(report.routes, ["all-web", "payments"]);
    assert_eq!((report.namespace.as_str(), report.pod.as_str()), ("shop", "payments-7d9f-*"));
}

#[tokio::test]
async fn conflict_reports_beyond_the_bound_are_dropped_and_counted() {
    // Anyone who may create pods can make conflicts: the reports waiting for Events are bounded.
    let (reports, mut received) = tokio::sync::mpsc::channel(1);
    let server =
        start_with(vec![route("payments", "{app: payments}"), route("all-web", "{tier: web}")], Some(reports)).await;
    let both = pod(json!({"app": "payments", "tier": "web"}), json!([]));
    for _ in 0..3 {
        admit(&server, review(both.clone(), false)).await;
    }
    assert!(received.try_recv().is_ok(), "the first report is kept");
    assert!(received.try_recv().is_err(), "the others were not queued");
    assert_eq!(server.metrics.conflict_reports_dropped(), 2);
    assert_eq!(server.metrics.admissions("conflict"), 3, "every admission is still answered and counted");
}
