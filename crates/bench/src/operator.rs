//! The operator's costs: admission latency of the webhook, and the operator process's memory with many
//! routes and pods in its caches, against a real kube-apiserver (crates/testenv) with the chart installed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, ListParams, PostParams};
use serde_json::{Value, json};
use storerelay_operator::NotificationRoute;
use storerelay_testenv::Cluster;

use crate::{Proc, free_port, load, procs, wait_ready};

/// Routes are spread over this many namespaces, as in a cluster with many teams.
const NAMESPACES: usize = 50;
/// Objects created at once while filling the API server.
const CREATE_CONCURRENCY: usize = 32;

/// Admission latency of the webhook over HTTPS with 50 concurrent AdmissionReviews, in rounds (one
/// slow moment of a shared machine moved a single run's p99 from ~2.5 to 7 ms).
pub async fn webhook(reviews: usize) -> Value {
    use kube::runtime::watcher;
    use storerelay_operator::certs::{CertResolver, generate, server_config};
    use storerelay_operator::inject::InjectOptions;
    use storerelay_operator::metrics::Metrics;
    use storerelay_operator::route_index::RouteIndex;
    use storerelay_operator::webhook::{WebhookState, router};

    let index = Arc::new(RouteIndex::new(InjectOptions::default()));
    for i in 0..1000 {
        index.apply_watcher_event(&watcher::Event::Apply(route(i)));
    }
    let bundle = generate(&["localhost".into()], &["127.0.0.1".parse().expect("ip")], time::OffsetDateTime::now_utc())
        .expect("cert");
    let resolver = Arc::new(CertResolver::default());
    resolver.load(&bundle.cert_pem, &bundle.key_pem).expect("load");
    let state = Arc::new(WebhookState { routes: index, metrics: Arc::new(Metrics::default()), conflicts: None });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    // Never cancelled: the server lives as long as the benchmark process.
    let stop = storerelay_runtime::CancellationToken::new();
    tokio::spawn(storerelay_operator::serve::serve_tls(listener, router(state), server_config(resolver), stop));
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(bundle.ca_cert_pem.as_bytes()).expect("ca"))
        .no_proxy()
        .build()
        .expect("client");
    let body = serde_json::to_vec(&admission_review()).expect("json");
    let url = format!("https://127.0.0.1:{}/mutate", addr.port());
    let mut rounds = Vec::new();
    for _ in 0..WEBHOOK_ROUNDS {
        rounds.push(load::closed_loop_with(&client, &url, &body, reviews, 50).await);
    }
    let (p50, _, _) = of_rounds(&rounds, |l| l.p50_ms);
    let (p99, p99_min, p99_max) = of_rounds(&rounds, |l| l.p99_ms);
    let (rps, _, _) = of_rounds(&rounds, |l| l.rps);
    let errors: u64 = rounds.iter().map(|l| l.errors).sum();
    json!({"routes": 1000, "reviews": reviews, "concurrency": 50, "rounds": WEBHOOK_ROUNDS, "p50_ms": p50, "p99_ms": p99,
           "p99_range_ms": [p99_min, p99_max], "errors": errors, "rps": rps})
}

/// One measure over rounds: the median (as the proxy rows take it), the lowest and the highest.
fn of_rounds(rounds: &[load::Latency], measure: fn(&load::Latency) -> f64) -> (f64, f64, f64) {
    let mut values: Vec<f64> = rounds.iter().map(measure).collect();
    values.sort_by(f64::total_cmp);
    match (crate::median(&values), values.first(), values.last()) {
        (Some(median), Some(&min), Some(&max)) => (median, min, max),
        _ => (0.0, 0.0, 0.0),
    }
}

/// The operator process's webhook at a fixed rate (open loop: each review timed from when it was due,
/// so a slow answer cannot slow the load down and hide itself), over HTTPS with the CA the operator
/// published in its MutatingWebhookConfiguration, while its caches hold every route and pod.
async fn webhook_open_loop(client: &kube::Client, port: u16, rate: u32, duration: Duration) -> Value {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    let configurations: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let started = Instant::now();
    let ca = loop {
        let configuration = configurations.get("sr-storerelay").await.expect("the chart's webhook configuration");
        let bundle = configuration.webhooks.iter().flatten().find_map(|w| w.client_config.ca_bundle.clone());
        if let Some(bundle) = bundle.filter(|b| !b.0.is_empty()) {
            break bundle.0;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the operator never published its caBundle");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let https = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("the caBundle is PEM"))
        .no_proxy()
        .build()
        .expect("client");
    let body = serde_json::to_vec(&admission_review()).expect("json");
    let url = format!("https://127.0.0.1:{port}/mutate");
    // Rounds, reported as the median and the range, as the proxy rows are: one slow second of a shared
    // machine moves a single run's p99 by more than the differences worth seeing.
    let mut rounds = Vec::new();
    for _ in 0..WEBHOOK_ROUNDS {
        rounds.push(load::fixed_rate_with(&https, &url, &body, rate, duration).await);
    }
    let (p50, _, _) = of_rounds(&rounds, |l| l.p50_ms);
    let (p99, p99_min, p99_max) = of_rounds(&rounds, |l| l.p99_ms);
    let (p999, _, _) = of_rounds(&rounds, |l| l.p999_ms);
    let (sent_late, _, _) = of_rounds(&rounds, |l| l.sent_late_p99_ms);
    let errors: u64 = rounds.iter().map(|l| l.errors).sum();
    json!({"rate": rate, "seconds": duration.as_secs(), "rounds": WEBHOOK_ROUNDS, "p50_ms": p50, "p99_ms": p99,
           "p99_range_ms": [p99_min, p99_max], "p999_ms": p999, "sent_late_p99_ms": sent_late, "errors": errors})
}

/// Rounds of each webhook measurement (closed loop, and the operator's at a fixed rate).
const WEBHOOK_ROUNDS: usize = 3;

/// A pod of route 7's app, as the API server sends it for admission.
fn admission_review() -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "resource": {"group": "", "version": "v1", "resource": "pods"},
                    "namespace": "ns-7", "operation": "CREATE", "userInfo": {"username": "bench"},
                    "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "app-", "labels": {"app": "app-7"}},
                               "spec": {"containers": [{"name": "app", "image": "example/app:1", "ports": [{"containerPort": 8080}]}]}}}
    })
}

/// Route `i`: in namespace `ns-(i mod 50)`, selecting `app: app-i`, mirroring to RevenueCat by Secret.
fn route(i: usize) -> NotificationRoute {
    serde_json::from_value(json!({
        "apiVersion": "storerelay.dev/v1alpha1", "kind": "NotificationRoute",
        "metadata": {"name": format!("route-{i}"), "namespace": format!("ns-{}", i % NAMESPACES)},
        "spec": {
            "selector": {"matchLabels": {"app": format!("app-{i}")}},
            "upstream": {"port": 8080},
            "destinations": [{"name": "revenuecat", "urlFrom": {"secretKeyRef": {"name": "revenuecat", "key": "url"}}}]
        }
    }))
    .expect("route")
}

/// A pod of route `i`'s app, as its Deployment would have made it (without the sidecar: it was created
/// before the operator ran, so the operator counts it as missing, as after an install on a live cluster).
fn pod(i: usize, replica: usize) -> Pod {
    serde_json::from_value(json!({
        "metadata": {
            "name": format!("app-{i}-{replica}"), "namespace": format!("ns-{}", i % NAMESPACES),
            "labels": {"app": format!("app-{i}"), "pod-template-hash": "5d9f7c6b8"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("app-{i}-5d9f7c6b8"), "uid": "00000000-0000-0000-0000-000000000001", "controller": true}]
        },
        "spec": {"containers": [{"name": "app", "image": "example/app:1", "ports": [{"containerPort": 8080}],
                                 "env": [{"name": "MODE", "value": "production"}],
                                 "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}]}
    }))
    .expect("pod")
}

/// Creates `count` objects with at most CREATE_CONCURRENCY in flight; returns how long it took.
async fn create_all<K, F>(client: &kube::Client, count: usize, make: F) -> Duration
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
    F: Fn(usize) -> K,
{
    let started = Instant::now();
    stream::iter((0..count).map(|n| {
        let object = make(n);
        let api: Api<K> = Api::namespaced(client.clone(), object.meta().namespace.as_deref().unwrap_or("default"));
        async move { api.create(&PostParams::default(), &object).await.map(|_| ()) }
    }))
    .buffer_unordered(CREATE_CONCURRENCY)
    .try_collect::<()>()
    .await
    .expect("create objects in the API server");
    started.elapsed()
}

fn run_checked(program: &Path, args: &[&str]) -> String {
    let output = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    assert!(
        output.status.success(),
        "{} {args:?}: {}{}",
        program.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// The operator as a process with the chart's settings, talking to `cluster` with admin credentials.
fn start_operator(binary: &Path, cluster: &Cluster, admin_port: u16, webhook_port: u16) -> Proc {
    let args: Vec<String> = [
        "--namespace=storerelay",
        "--pod-name=storerelay-bench-0",
        &format!("--webhook-addr=127.0.0.1:{webhook_port}"),
        &format!("--admin-addr=127.0.0.1:{admin_port}"),
        "--cert-ip=127.0.0.1",
        "--lease-name=sr-storerelay",
        "--webhook-configuration=sr-storerelay",
        "--webhook-service=sr-storerelay-webhook",
        "--webhook-secret=sr-storerelay-webhook-tls",
        "--sidecar-image=storerelay/storerelay-sidecar:bench",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    Proc::spawn(
        "operator",
        binary,
        &args,
        &[("KUBECONFIG", cluster.kubeconfig.display().to_string()), ("STORERELAY_LOG", "warn".into())],
    )
}

/// Waits until every route's status reflects its spec; returns how long that took.
async fn wait_reconciled(client: &kube::Client, routes: usize, within: Duration) -> Duration {
    let started = Instant::now();
    let api: Api<NotificationRoute> = Api::all(client.clone());
    loop {
        let list = api.list(&ListParams::default()).await.expect("list routes");
        let done = list
            .items
            .iter()
            .filter(|r| {
                r.status.as_ref().and_then(|s| s.observed_generation).is_some()
                    && r.status.as_ref().is_some_and(|s| s.matched > 0)
            })
            .count();
        if done >= routes {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "{done} of {routes} routes reconciled within {within:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Operator RSS empty and with `routes` routes and `pods` pods in its caches, against a real API server
/// with the chart installed. Skipped (with the reason) where the API server cannot be built.
pub async fn memory(
    operator: &Path,
    routes: usize,
    pods: usize,
    reviews_per_second: u32,
    webhook_for: Duration,
) -> Value {
    let Some(bin) = storerelay_testenv::binaries() else {
        return json!({"skipped": "kube-apiserver not built (needs Go)"});
    };
    let helm = PathBuf::from(run_checked(Path::new("tests/tools/install-helm.sh"), &[]));
    let cluster = tokio::task::spawn_blocking(move || Cluster::start(&bin)).await.expect("start the API server");
    let client = cluster.client().await;
    let kubeconfig = format!("--kubeconfig={}", cluster.kubeconfig.display());
    run_checked(&helm, &["install", "sr", "charts/storerelay", "-n", "storerelay", "--create-namespace", &kubeconfig]);
    for n in 0..NAMESPACES {
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": format!("ns-{n}")}})).expect("ns");
        Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.expect("namespace");
    }

    let settle = Duration::from_secs(5);
    let admin_port = free_port();
    let mut empty = start_operator(operator, &cluster, admin_port, free_port());
    wait_ready(&format!("http://127.0.0.1:{admin_port}/readyz"), Duration::from_secs(60)).await;
    tokio::time::sleep(settle).await;
    let rss_empty = procs::tree_rss_kib(empty.pid());
    empty.terminate();

    eprintln!("bench: creating {routes} routes and {pods} pods in the API server");
    let routes_took = create_all(&client, routes, route).await;
    let per_route = pods.div_ceil(routes.max(1));
    let pods_took = create_all(&client, pods, |n| pod(n / per_route, n % per_route)).await;
    eprintln!("bench: created in {:.1}s and {:.1}s", routes_took.as_secs_f64(), pods_took.as_secs_f64());

    let (admin_port, webhook_port) = (free_port(), free_port());
    let mut full = start_operator(operator, &cluster, admin_port, webhook_port);
    let ready = wait_ready(&format!("http://127.0.0.1:{admin_port}/readyz"), Duration::from_secs(120)).await;
    let rss_ready = procs::tree_rss_kib(full.pid());
    let reconciled = ready + wait_reconciled(&client, routes, Duration::from_secs(600)).await;
    tokio::time::sleep(settle).await;
    let rss_steady = procs::tree_rss_kib(full.pid());
    let rss_peak = procs::peak_rss_kib(full.pid());
    let webhook = webhook_open_loop(&client, webhook_port, reviews_per_second, webhook_for).await;
    let rss_after_webhook = procs::tree_rss_kib(full.pid());
    full.terminate();
    json!({
        "webhook_open_loop": webhook, "rss_after_webhook_kib": rss_after_webhook,
        "routes": routes, "pods": pods,
        "rss_empty_kib": rss_empty, "rss_ready_kib": rss_ready, "rss_steady_kib": rss_steady, "rss_peak_kib": rss_peak,
        "ready_ms": ready.as_secs_f64() * 1000.0, "all_reconciled_ms": reconciled.as_secs_f64() * 1000.0,
    })
}
