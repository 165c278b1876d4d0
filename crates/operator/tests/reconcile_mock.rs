//! Reconcile against a mocked API (tower-test): the ConfigMap, the reference checks, status, Events
//! and workload restarts, asserted on the requests the controller makes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Client;
use kube::client::Body;
use kube::core::PartialObjectMeta;
use kube::runtime::{reflector, watcher};
use serde_json::{Value, json};
use storerelay_operator::NotificationRoute;
use storerelay_operator::controller::{Context, reconcile};
use storerelay_operator::events::{Recorder, Reporter};
use storerelay_operator::inject::{InjectOptions, injection};
use storerelay_operator::metrics::Metrics;

#[derive(Debug, Clone)]
struct Call {
    method: Method,
    path: String,
    body: Value,
}

/// Answers every request with `answer(method, path, body)` and records it.
fn mock_client(
    answer: impl Fn(&Method, &str, &Value) -> (StatusCode, Value) + Send + Sync + 'static,
) -> (Client, Arc<Mutex<Vec<Call>>>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let recorded = calls.clone();
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let path = parts.uri.path().to_string();
            let (status, reply) = answer(&parts.method, &path, &body);
            recorded.lock().unwrap().push(Call { method: parts.method.clone(), path, body });
            let response =
                Response::builder().status(status).body(Body::from(serde_json::to_vec(&reply).unwrap())).unwrap();
            send.send_response(response);
        }
    });
    (Client::new(service, "default"), calls)
}

fn not_found() -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
    )
}

/// Answers reads from `objects` and writes with what the API server would store: the route with its
/// new status for status patches, the written object otherwise.
fn api(
    objects: BTreeMap<String, Value>,
    route: &NotificationRoute,
) -> impl Fn(&Method, &str, &Value) -> (StatusCode, Value) + Send + Sync + 'static {
    let route = serde_json::to_value(route).unwrap();
    move |method, path, body| match *method {
        Method::GET => objects.get(path).cloned().map_or_else(not_found, |o| (StatusCode::OK, o)),
        Method::PATCH if path.ends_with("/status") => {
            let mut stored = route.clone();
            stored["status"] = body["status"].clone();
            (StatusCode::OK, stored)
        }
        _ => {
            let mut echo = body.clone();
            if echo.get("metadata").is_none() {
                echo["metadata"] = json!({"name": "x", "namespace": "shop"});
            }
            (StatusCode::OK, echo)
        }
    }
}

fn route(extra: &str) -> NotificationRoute {
    serde_yaml::from_str(&format!(
        r#"
apiVersion: storerelay.dev/v1alpha1
kind: NotificationRoute
metadata: {{name: payments, namespace: shop, uid: 5f1c, generation: 4}}
spec:
  selector: {{matchLabels: {{app: payments}}}}
  upstream: {{port: 8080}}
  destinations:
    - name: revenuecat
      urlFrom: {{secretKeyRef: {{name: revenuecat, key: url}}}}
{extra}
"#
    ))
    .unwrap()
}

fn pod(name: &str, annotation: Option<String>) -> PartialObjectMeta<Pod> {
    PartialObjectMeta {
        types: None,
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("shop".into()),
            labels: Some(BTreeMap::from([
                ("app".into(), "payments".into()),
                ("pod-template-hash".into(), "7d9f".into()),
            ])),
            annotations: annotation.map(|a| BTreeMap::from([("storerelay.dev/injected".to_string(), a)])),
            owner_references: Some(vec![OwnerReference {
                kind: "ReplicaSet".into(),
                name: "payments-7d9f".into(),
                controller: Some(true),
                ..Default::default()
            }]),
            ..Default::default()
        },
        _phantom: Default::default(),
    }
}

fn context(
    client: Client,
    route: &NotificationRoute,
    pods: Vec<PartialObjectMeta<Pod>>,
    check_secrets: bool,
    restarts: bool,
    leader: bool,
) -> Arc<Context> {
    let (pod_store, mut pod_writer) = reflector::store();
    for pod in pods {
        pod_writer.apply_watcher_event(&watcher::Event::Apply(pod));
    }
    let (route_store, mut route_writer) = reflector::store();
    route_writer.apply_watcher_event(&watcher::Event::Apply(route.clone()));
    let (_, leading) = tokio::sync::watch::channel(leader);
    Arc::new(Context {
        client: client.clone(),
        pods: pod_store,
        routes: route_store,
        recorder: Recorder::new(client, Reporter { controller: "storerelay-operator".into(), instance: "test".into() }),
        options: InjectOptions::default(),
        check_secrets,
        restarts_allowed: restarts,
        leader: leading,
        metrics: Arc::new(Metrics::default()),
        restarts: Default::default(),
    })
}

const STATUS: &str = "/apis/storerelay.dev/v1alpha1/namespaces/shop/notificationroutes/payments/status";

/// The condition of `kind` in the status the controller wrote (its first status patch).
fn written_condition(calls: &[Call], kind: &str) -> Value {
    let status = &find(calls, Method::PATCH, STATUS)[0].body["status"];
    status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == kind).cloned().unwrap()
}

fn find<'a>(calls: &'a [Call], method: Method, path: &str) -> Vec<&'a Call> {
    calls.iter().filter(|c| c.method == method && c.path == path).collect()
}

#[tokio::test]
async fn renders_the_config_map_counts_pods_and_writes_status_and_events() {
    let route = route("");
    let revision = injection(&route, &InjectOptions::default()).revision;
    let objects = BTreeMap::from([(
        "/api/v1/namespaces/shop/secrets/revenuecat".to_string(),
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "revenuecat", "namespace": "shop"}, "data": {"url": "aHR0cHM6Ly9leGFtcGxlLmludmFsaWQv"}}),
    )]);
    let (client, calls) = mock_client(api(objects, &route));
    let pods =
        vec![pod("a", Some(format!("payments@{revision}"))), pod("b", Some("payments@old".into())), pod("c", None)];
    let ctx = context(client, &route, pods, true, false, true);
    reconcile(Arc::new(route.clone()), ctx.clone()).await.unwrap();
    let calls = calls.lock().unwrap().clone();

    let config_map = find(&calls, Method::PATCH, "/api/v1/namespaces/shop/configmaps/payments-storerelay");
    assert_eq!(config_map.len(), 1, "{calls:#?}");
    let body = &config_map[0].body;
    assert_eq!(body["metadata"]["ownerReferences"][0]["uid"], "5f1c");
    assert_eq!(body["metadata"]["ownerReferences"][0]["controller"], true);
    let rendered = body["data"]["config.yaml"].as_str().unwrap();
    assert!(rendered.contains("urlFile: /etc/storerelay/secrets/revenuecat/url"), "{rendered}");
    storerelay_config::parse(rendered, std::path::Path::new("rendered"))
        .expect("the sidecar accepts what the operator renders");

    assert_eq!(find(&calls, Method::GET, "/api/v1/namespaces/shop/secrets/revenuecat").len(), 1, "get, never list");

    let status =
        find(&calls, Method::PATCH, "/apis/storerelay.dev/v1alpha1/namespaces/shop/notificationroutes/payments/status");
    assert_eq!(status.len(), 1);
    let status = &status[0].body["status"];
    assert_eq!(
        (status["matched"].clone(), status["injected"].clone(), status["outdated"].clone(), status["missing"].clone()),
        (json!(3), json!(2), json!(1), json!(1))
    );
    assert_eq!(status["observedGeneration"], 4);
    assert_eq!(status["revision"], revision.as_str());
    assert_eq!(status["workloadsToRestart"], json!(["Deployment/payments"]));
    let condition =
        |kind: &str| status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == kind).cloned().unwrap();
    assert_eq!(condition("Ready")["status"], "False");
    assert_eq!(condition("Ready")["reason"], "PodsMissingSidecar");
    assert!(condition("Ready")["message"].as_str().unwrap().contains("restart Deployment/payments"));
    assert_eq!(condition("SecretsResolved")["status"], "True");
    assert_eq!(condition("SelectorConflict")["status"], "False");
    // Three pods, each with its own SQLite spool: said, with what to do.
    assert_eq!(condition("SpoolShared")["status"], "False");
    assert_eq!(condition("SpoolShared")["reason"], "PodLocalSpoolWithReplicas");
    assert!(condition("SpoolShared")["message"].as_str().unwrap().contains("spec.spool.postgres"));

    let events = find(&calls, Method::POST, "/apis/events.k8s.io/v1/namespaces/shop/events");
    assert_eq!(events.len(), 5, "one Event per new condition");
    assert!(events.iter().any(|e| e.body["reason"] == "PodLocalSpoolWithReplicas" && e.body["type"] == "Warning"));
    assert!(events.iter().any(|e| e.body["reason"] == "PodsMissingSidecar" && e.body["type"] == "Warning"));
    assert!(
        find(&calls, Method::PATCH, "/apis/apps/v1/namespaces/shop/deployments/payments").is_empty(),
        "Manual policy restarts nothing"
    );
    assert_eq!(ctx.metrics.reconciliations("ok"), 1);
}

#[tokio::test]
async fn restart_workloads_patches_the_deployment_once() {
    let route = route("  rollout: {policy: RestartWorkloads}");
    let (client, calls) = mock_client(api(BTreeMap::new(), &route));
    let ctx = context(client, &route, vec![pod("c", None)], false, true, true);
    reconcile(Arc::new(route.clone()), ctx.clone()).await.unwrap();
    reconcile(Arc::new(route.clone()), ctx.clone()).await.unwrap();
    let calls = calls.lock().unwrap().clone();
    let restarts = find(&calls, Method::PATCH, "/apis/apps/v1/namespaces/shop/deployments/payments");
    assert_eq!(restarts.len(), 1, "rate-limited: the second reconcile does not restart again");
    assert!(restarts[0].body["spec"]["template"]["metadata"]["annotations"]["storerelay.dev/restartedAt"].is_string());
    assert!(
        find(&calls, Method::GET, "/api/v1/namespaces/shop/secrets/revenuecat").is_empty(),
        "no Secret reads without rbac.checkSecrets"
    );
    let secrets = written_condition(&calls, "SecretsResolved");
    assert_eq!((secrets["status"].clone(), secrets["reason"].clone()), (json!("Unknown"), json!("NotChecked")));
    assert_eq!(ctx.metrics.workload_restarts("Deployment"), 1);
}

#[tokio::test]
async fn a_missing_secret_is_reported_and_an_invalid_spec_renders_nothing() {
    let mut route = route("");
    route.spec.destinations[0].timeout = Some("whenever".into());
    let (client, calls) = mock_client(api(BTreeMap::new(), &route));
    let ctx = context(client, &route, vec![], true, false, true);
    reconcile(Arc::new(route.clone()), ctx).await.unwrap();
    let calls = calls.lock().unwrap().clone();
    assert!(find(&calls, Method::PATCH, "/api/v1/namespaces/shop/configmaps/payments-storerelay").is_empty());
    let by_type = |kind: &str| written_condition(&calls, kind);
    assert_eq!(by_type("Ready")["reason"], "InvalidSpec");
    assert!(by_type("Ready")["message"].as_str().unwrap().contains("spec.destinations[0].timeout"));
    assert_eq!(by_type("Degraded")["status"], "True");
    assert_eq!(by_type("SecretsResolved")["status"], "False");
    assert!(by_type("SecretsResolved")["message"].as_str().unwrap().contains("Secret revenuecat/url"));
}

#[tokio::test]
async fn a_follower_makes_no_call() {
    let route = route("");
    let (client, calls) = mock_client(api(BTreeMap::new(), &route));
    let ctx = context(client, &route, vec![], true, true, false);
    reconcile(Arc::new(route), ctx).await.unwrap();
    assert!(calls.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_restart_that_failed_is_tried_again_and_not_counted() {
    let route = route("  rollout: {policy: RestartWorkloads}");
    let deployment = "/apis/apps/v1/namespaces/shop/deployments/payments";
    let fail_first = Arc::new(Mutex::new(true));
    let normal = api(BTreeMap::new(), &route);
    let failing = fail_first.clone();
    let (client, calls) = mock_client(move |method, path, body| {
        if *method == Method::PATCH && path == deployment && std::mem::replace(&mut *failing.lock().unwrap(), false) {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 500, "message": "etcd timeout"}),
            );
        }
        normal(method, path, body)
    });
    let ctx = context(client, &route, vec![pod("c", None)], false, true, true);
    assert!(reconcile(Arc::new(route.clone()), ctx.clone()).await.is_err(), "the failed patch is an error");
    assert_eq!(ctx.metrics.workload_restarts("Deployment"), 0, "a failed patch is no restart");
    reconcile(Arc::new(route.clone()), ctx.clone()).await.unwrap();
    let calls = calls.lock().unwrap().clone();
    assert_eq!(find(&calls, Method::PATCH, deployment).len(), 2, "tried again at once, not 10 minutes later");
    assert_eq!(ctx.metrics.workload_restarts("Deployment"), 1);
    let event = find(&calls, Method::POST, "/apis/events.k8s.io/v1/namespaces/shop/events")
        .into_iter()
        .find(|e| e.body["reason"] == "RestartedWorkload")
        .expect("an Event for the restart");
    assert!(event.body["note"].as_str().unwrap().contains("no sooner than 10m"), "{}", event.body);
}
