//! The integration tier: a real etcd and kube-apiserver (built from pinned sources by
//! tests/kube-bin/build.sh), the chart installed with the real helm, and the operator running as a
//! process with the chart ServiceAccount's permissions (impersonated). There is no kubelet or
//! scheduler, so pods stay Pending: what the API server stores is what is checked.
//!
//! One test runs the scenarios below in order on one server, since starting it costs more than all of
//! them; each builds on what the ones before it left (the chart installed, the operator running, the
//! `payments` route) and is reported by name, so a failure says which one.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::FutureExt;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use storerelay_operator::NotificationRoute;
use storerelay_testenv::{Cluster, binaries, free_port};

const RELEASE: &str = "sr";
const OPERATOR_NAMESPACE: &str = "storerelay";
const FULLNAME: &str = "sr-storerelay";

async fn wait_until<F, Fut, T>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn helm() -> PathBuf {
    let out = Command::new(root().join("tests/tools/install-helm.sh")).stderr(Stdio::inherit()).output().unwrap();
    assert!(out.status.success(), "install-helm.sh failed");
    root().join(String::from_utf8(out.stdout).unwrap().trim())
}

fn run_helm(helm: &Path, cluster: &Cluster, args: &[&str]) -> String {
    let out =
        Command::new(helm).args(args).arg(format!("--kubeconfig={}", cluster.kubeconfig.display())).output().unwrap();
    assert!(
        out.status.success(),
        "helm {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The operator binary as a process, with a kubeconfig that impersonates the chart's ServiceAccount.
struct Operator {
    child: Child,
    admin: String,
    log: PathBuf,
}

impl Operator {
    fn start(kubeconfig: &Path, webhook_port: u16, log: PathBuf) -> Operator {
        let admin_port = free_port();
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_storerelay-operator"))
            .args([
                &format!("--namespace={OPERATOR_NAMESPACE}"),
                "--pod-name=operator-test-0",
                &format!("--webhook-addr=127.0.0.1:{webhook_port}"),
                &format!("--admin-addr=127.0.0.1:{admin_port}"),
                "--cert-ip=127.0.0.1",
                &format!("--lease-name={FULLNAME}"),
                &format!("--webhook-configuration={FULLNAME}"),
                &format!("--webhook-service={FULLNAME}-webhook"),
                &format!("--webhook-secret={FULLNAME}-webhook-tls"),
                "--sidecar-image=storerelay/storerelay-sidecar:test",
                "--check-secrets",
            ])
            .env("KUBECONFIG", kubeconfig)
            .env("STORERELAY_LOG", std::env::var("STORERELAY_TEST_OPERATOR_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Operator { child, admin: format!("http://127.0.0.1:{admin_port}"), log }
    }

    async fn wait_ready(&mut self) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if client.get(format!("{}/readyz", self.admin)).send().await.is_ok_and(|r| r.status().is_success()) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("operator exited ({status}):\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
            }
            if Instant::now() > deadline {
                let body = match client.get(format!("{}/readyz", self.admin)).send().await {
                    Ok(response) => response.text().await.unwrap_or_default(),
                    Err(error) => error.to_string(),
                };
                panic!("operator not ready ({body}):\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("--- operator ---\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
        }
    }
}

fn route(name: &str, selector: Value, extra: Value) -> NotificationRoute {
    let mut value = json!({
        "apiVersion": "storerelay.dev/v1alpha1",
        "kind": "NotificationRoute",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {
            "selector": {"matchLabels": selector},
            "upstream": {"port": 8080},
            "destinations": [{"name": "revenuecat", "urlFrom": {"secretKeyRef": {"name": "revenuecat", "key": "url"}}}]
        }
    });
    if let (Some(spec), Some(extra)) = (value["spec"].as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            spec.insert(k.clone(), v.clone());
        }
    }
    serde_json::from_value(value).unwrap()
}

fn pod(name: &str, namespace: &str, labels: Value, annotations: Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "example/app:1", "ports": [{"containerPort": 8080}]}]}
    }))
    .unwrap()
}

fn sidecars(pod: &Pod) -> usize {
    pod.spec.as_ref().map_or(0, |s| s.init_containers.iter().flatten().filter(|c| c.name == "storerelay").count())
}

async fn route_status(
    routes: &Api<NotificationRoute>,
    name: &str,
) -> Option<storerelay_operator::NotificationRouteStatus> {
    routes.get(name).await.ok().and_then(|r| r.status)
}

fn condition(status: &storerelay_operator::NotificationRouteStatus, kind: &str) -> (String, String) {
    status.conditions.iter().find(|c| c.type_ == kind).map(|c| (c.status.clone(), c.reason.clone())).unwrap_or_default()
}

/// What the scenarios share: the cluster, clients for the objects they look at, and the operator.
struct World {
    cluster: Cluster,
    admin: Client,
    helm: PathBuf,
    routes: Api<NotificationRoute>,
    shop_pods: Api<Pod>,
    config_maps: Api<ConfigMap>,
    secrets: Api<Secret>,
    configurations: Api<MutatingWebhookConfiguration>,
    webhook_port: u16,
    /// A kubeconfig that impersonates the chart's ServiceAccount.
    impersonating: PathBuf,
    operator: Option<Operator>,
}

impl World {
    async fn start_operator(&mut self, log: &str) {
        let mut operator = Operator::start(&self.impersonating, self.webhook_port, self.cluster.dir.path().join(log));
        operator.wait_ready().await;
        self.operator = Some(operator);
    }

    fn stop_operator(&mut self) {
        if let Some(mut operator) = self.operator.take() {
            operator.stop();
        }
    }
}

async fn run_scenario(name: &str, body: impl Future<Output = ()>) {
    let started = Instant::now();
    match AssertUnwindSafe(body).catch_unwind().await {
        Ok(()) => eprintln!("scenario {name}: ok ({:.1?})", started.elapsed()),
        Err(panic) => {
            eprintln!("scenario {name}: FAILED after {:.1?}", started.elapsed());
            std::panic::resume_unwind(panic)
        }
    }
}

/// Runs each named scenario function in order on one world.
macro_rules! scenarios {
    ($world:ident: $($scenario:ident),+ $(,)?) => {
        $( run_scenario(stringify!($scenario), $scenario(&mut $world)).await; )+
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn against_a_real_kube_apiserver() {
    let Some(bin) = binaries() else { return };
    let started = Instant::now();
    let cluster = tokio::task::spawn_blocking(move || Cluster::start(&bin)).await.unwrap();
    eprintln!("kube-apiserver ready in {:?}", started.elapsed());
    let admin = cluster.client().await;
    for namespace in [OPERATOR_NAMESPACE, "shop", "other"] {
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": namespace}})).unwrap();
        Api::<Namespace>::all(admin.clone()).create(&PostParams::default(), &ns).await.unwrap();
    }
    let impersonating = cluster.dir.path().join("operator.kubeconfig");
    let mut world = World {
        helm: helm(),
        routes: Api::namespaced(admin.clone(), "shop"),
        shop_pods: Api::namespaced(admin.clone(), "shop"),
        config_maps: Api::namespaced(admin.clone(), "shop"),
        secrets: Api::namespaced(admin.clone(), "shop"),
        configurations: Api::all(admin.clone()),
        webhook_port: free_port(),
        impersonating,
        operator: None,
        admin,
        cluster,
    };
    scenarios!(world:
        helm_install_brings_the_crd,
        the_api_server_enforces_the_schema_and_cel_rules,
        the_operator_runs_with_the_charts_permissions,
        pods_are_injected_through_the_admission_chain,
        two_routes_selecting_a_pod_are_a_conflict,
        with_the_operator_down_pods_are_admitted_and_counted_missing,
        status_config_map_and_events_follow_the_cluster,
        a_config_map_the_operator_did_not_create_is_never_taken_over,
        base_permissions_read_no_secret_outside_the_operators_namespace,
        storerelayctl_check_reports_what_a_user_sees,
        helm_uninstall_removes_what_it_installed,
    );
    eprintln!("kube-apiserver tier finished in {:?}", started.elapsed());
}

/// The chart installs (its crds/ brings the CRD).
async fn helm_install_brings_the_crd(w: &mut World) {
    let chart = root().join("charts/storerelay");
    let install =
        ["install", RELEASE, chart.to_str().unwrap(), "-n", OPERATOR_NAMESPACE, "--set", "rbac.checkSecrets=true"];
    run_helm(&w.helm, &w.cluster, &install);
    let crds: Api<CustomResourceDefinition> = Api::all(w.admin.clone());
    wait_until("the CRD to be established", Duration::from_secs(30), || async {
        let crd = crds.get("notificationroutes.storerelay.dev").await.ok()?;
        crd.status?.conditions?.iter().any(|c| c.type_ == "Established" && c.status == "True").then_some(())
    })
    .await;
}

async fn the_api_server_enforces_the_schema_and_cel_rules(w: &mut World) {
    for (bad, message) in [
        (
            json!({"selector": {"matchLabels": {"a": "b"}}, "destinations": [{"name": "x", "url": "https://x.invalid/"}, {"name": "x", "url": "https://y.invalid/"}]}),
            "destination names must be unique",
        ),
        (
            json!({"selector": {"matchLabels": {"a": "b"}}, "destinations": [{"name": "x", "url": "https://x.invalid/", "urlFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}),
            "exactly one of url and urlFrom",
        ),
        (
            json!({"selector": {}, "destinations": [{"name": "x", "url": "https://x.invalid/"}]}),
            "selector must not be empty",
        ),
        (
            json!({"selector": {"matchLabels": {"a": "b"}}, "upstream": {"port": 70000}, "destinations": [{"name": "x", "url": "https://x.invalid/"}]}),
            "70000",
        ),
    ] {
        let object: NotificationRoute = serde_json::from_value(json!({"apiVersion": "storerelay.dev/v1alpha1", "kind": "NotificationRoute", "metadata": {"name": "bad"}, "spec": bad})).unwrap();
        let error = w.routes.create(&PostParams::default(), &object).await.expect_err("an invalid route is refused");
        assert!(error.to_string().contains(message), "{error}");
    }
}

/// The operator runs as a process with the chart ServiceAccount's permissions (impersonated) and
/// takes over the webhook configuration.
async fn the_operator_runs_with_the_charts_permissions(w: &mut World) {
    // The chart's webhook calls a Service, which needs kube-proxy: point it at the operator process.
    let url = json!([{"op": "replace", "path": "/webhooks/0/clientConfig", "value": {"url": format!("https://127.0.0.1:{}/mutate", w.webhook_port)}}]);
    w.configurations
        .patch(FULLNAME, &PatchParams::default(), &Patch::<()>::Json(serde_json::from_value(url).unwrap()))
        .await
        .unwrap();
    let text = std::fs::read_to_string(&w.cluster.kubeconfig)
        .unwrap()
        .replace("  user:\n", &format!("  user:\n    as: system:serviceaccount:{OPERATOR_NAMESPACE}:{FULLNAME}\n"));
    std::fs::write(&w.impersonating, text).unwrap();
    w.start_operator("operator.log").await;
    let configurations = &w.configurations;
    wait_until("the operator to patch the caBundle", Duration::from_secs(60), || async {
        let configuration = configurations.get(FULLNAME).await.ok()?;
        configuration.webhooks?.first()?.client_config.ca_bundle.is_some().then_some(())
    })
    .await;
}

async fn pods_are_injected_through_the_admission_chain(w: &mut World) {
    let (routes, configurations, config_maps, shop_pods) = (&w.routes, &w.configurations, &w.config_maps, &w.shop_pods);
    routes.create(&PostParams::default(), &route("payments", json!({"app": "payments"}), json!({}))).await.unwrap();
    let valid = routes.get("payments").await.unwrap();
    assert_eq!(valid.spec.listen.port, 8089, "defaults are applied and the route round-trips");
    wait_until("the namespaceSelector to name shop", Duration::from_secs(60), || async {
        let configuration = configurations.get(FULLNAME).await.ok()?;
        let selector = configuration.webhooks?.first()?.namespace_selector.clone()?;
        let values = selector.match_expressions?.first()?.values.clone()?;
        (values == ["shop"]).then_some(())
    })
    .await;
    wait_until("the rendered ConfigMap", Duration::from_secs(30), || async {
        config_maps.get_opt("payments-storerelay").await.ok()?
    })
    .await;

    let other_pods: Api<Pod> = Api::namespaced(w.admin.clone(), "other");
    let created = shop_pods
        .create(&PostParams::default(), &pod("payments-1", "shop", json!({"app": "payments"}), json!({})))
        .await
        .unwrap();
    assert_eq!(sidecars(&created), 1, "the stored pod has the sidecar exactly once");
    assert!(created.metadata.annotations.unwrap()["storerelay.dev/injected"].starts_with("payments@"));
    let cart = shop_pods
        .create(&PostParams::default(), &pod("cart-1", "shop", json!({"app": "cart"}), json!({})))
        .await
        .unwrap();
    assert_eq!(sidecars(&cart), 0);
    let elsewhere = other_pods
        .create(&PostParams::default(), &pod("payments-1", "other", json!({"app": "payments"}), json!({})))
        .await
        .unwrap();
    assert_eq!(sidecars(&elsewhere), 0, "another namespace is unchanged");
    let opted_out = shop_pods
        .create(
            &PostParams::default(),
            &pod("payments-debug", "shop", json!({"app": "payments"}), json!({"storerelay.dev/inject": "false"})),
        )
        .await
        .unwrap();
    assert_eq!(sidecars(&opted_out), 0);
    let dry = shop_pods
        .create(
            &PostParams { dry_run: true, ..Default::default() },
            &pod("payments-dry", "shop", json!({"app": "payments"}), json!({})),
        )
        .await
        .unwrap();
    assert_eq!(sidecars(&dry), 1, "dry runs are injected too (sideEffects NoneOnDryRun)");
}

async fn two_routes_selecting_a_pod_are_a_conflict(w: &mut World) {
    let (routes, shop_pods) = (&w.routes, &w.shop_pods);
    routes.create(&PostParams::default(), &route("web", json!({"tier": "web"}), json!({}))).await.unwrap();
    wait_until("the second route in the webhook's cache", Duration::from_secs(30), || async {
        let probe = shop_pods
            .create(
                &PostParams { dry_run: true, ..Default::default() },
                &pod("probe", "shop", json!({"tier": "web"}), json!({})),
            )
            .await
            .ok()?;
        (sidecars(&probe) == 1).then_some(())
    })
    .await;
    let both = shop_pods
        .create(
            &PostParams::default(),
            &pod("payments-web", "shop", json!({"app": "payments", "tier": "web"}), json!({})),
        )
        .await
        .unwrap();
    assert_eq!(sidecars(&both), 0, "two routes select it: nothing is injected");
    let status = wait_until("SelectorConflict on the route", Duration::from_secs(60), || async {
        let status = route_status(routes, "payments").await?;
        (condition(&status, "SelectorConflict").0 == "True").then_some(status)
    })
    .await;
    assert_eq!(condition(&status, "Ready"), ("False".to_string(), "SelectorConflict".to_string()));
    routes.delete("web", &DeleteParams::default()).await.unwrap();
    shop_pods.delete("payments-web", &DeleteParams::default()).await.unwrap();
}

/// With the operator down, pods are admitted unchanged (failurePolicy Ignore) and later counted.
async fn with_the_operator_down_pods_are_admitted_and_counted_missing(w: &mut World) {
    w.stop_operator();
    let unchanged = w
        .shop_pods
        .create(&PostParams::default(), &pod("payments-2", "shop", json!({"app": "payments"}), json!({})))
        .await
        .unwrap();
    assert_eq!(sidecars(&unchanged), 0);
    w.start_operator("operator-2.log").await;
    let routes = &w.routes;
    let status = wait_until("the missing pod to be counted", Duration::from_secs(90), || async {
        let status = route_status(routes, "payments").await?;
        (status.missing == 1 && status.matched == 2).then_some(status)
    })
    .await;
    assert_eq!(status.injected, 1);
    assert_eq!(condition(&status, "Ready"), ("False".to_string(), "PodsMissingSidecar".to_string()));
    assert!(status.workloads_to_restart.contains(&"Pod/payments-2".to_string()), "{:?}", status.workloads_to_restart);
}

/// Printer columns, the ConfigMap following the spec, Events, SecretsResolved following the Secret.
async fn status_config_map_and_events_follow_the_cluster(w: &mut World) {
    let (routes, config_maps, secrets) = (&w.routes, &w.config_maps, &w.secrets);
    let table = w.cluster.kubectl(&["get", "nroute", "-n", "shop"], None);
    if table.status.success() {
        let header = String::from_utf8_lossy(&table.stdout).lines().next().unwrap_or_default().to_string();
        for column in ["READY", "MATCHED", "INJECTED", "OUTDATED", "MISSING", "AGE"] {
            assert!(header.contains(column), "{header}");
        }
    }
    let status = route_status(routes, "payments").await.expect("the route has a status");
    assert_eq!(condition(&status, "SecretsResolved"), ("False".to_string(), "Missing".to_string()));
    let secret: Secret = serde_json::from_value(
        json!({"metadata": {"name": "revenuecat"}, "stringData": {"url": "https://api.example.invalid/hook/TOKEN"}}),
    )
    .unwrap();
    secrets.create(&PostParams::default(), &secret).await.unwrap();
    wait_until("SecretsResolved True", Duration::from_secs(60), || async {
        let status = route_status(routes, "payments").await?;
        (condition(&status, "SecretsResolved").0 == "True").then_some(())
    })
    .await;
    let change = json!({"spec": {"destinations": [{"name": "revenuecat", "urlFrom": {"secretKeyRef": {"name": "revenuecat", "key": "url"}}, "timeout": "3s"}]}});
    routes.patch("payments", &PatchParams::default(), &Patch::Merge(change)).await.unwrap();
    wait_until("the ConfigMap to follow the spec", Duration::from_secs(60), || async {
        let config_map = config_maps.get("payments-storerelay").await.ok()?;
        config_map.data?.get("config.yaml")?.contains("timeout: 3s").then_some(())
    })
    .await;
    secrets.delete("revenuecat", &DeleteParams::default()).await.unwrap();
    wait_until("SecretsResolved False again", Duration::from_secs(90), || async {
        let status = route_status(routes, "payments").await?;
        (condition(&status, "SecretsResolved").0 == "False").then_some(())
    })
    .await;
    let events: Api<Event> = Api::namespaced(w.admin.clone(), "shop");
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("payments"))
        .filter_map(|e| e.reason)
        .collect();
    for reason in ["PodsMissingSidecar", "SelectorConflict", "Found", "Missing"] {
        assert!(reasons.iter().any(|r| r == reason), "no {reason} event in {reasons:?}");
    }
}

/// A ConfigMap under a route's ConfigMap name that someone else made is left alone, the route says so,
/// and pods are not injected to mount it; once it is gone, the operator writes its own.
async fn a_config_map_the_operator_did_not_create_is_never_taken_over(w: &mut World) {
    let (routes, config_maps, shop_pods) = (&w.routes, &w.config_maps, &w.shop_pods);
    let theirs: ConfigMap = serde_json::from_value(
        json!({"metadata": {"name": "squatted-storerelay"}, "data": {"config.yaml": "someone else's"}}),
    )
    .unwrap();
    config_maps.create(&PostParams::default(), &theirs).await.unwrap();
    routes.create(&PostParams::default(), &route("squatted", json!({"app": "squatted"}), json!({}))).await.unwrap();
    let status = wait_until("Ready=False ConfigMapNotOwned", Duration::from_secs(60), || async {
        let status = route_status(routes, "squatted").await?;
        (condition(&status, "Ready").1 == "ConfigMapNotOwned").then_some(status)
    })
    .await;
    assert_eq!(condition(&status, "Degraded"), ("True".to_string(), "ConfigMapNotOwned".to_string()));
    assert_eq!(status.config_map, None);
    let untouched = config_maps.get("squatted-storerelay").await.unwrap();
    assert_eq!(untouched.data.unwrap()["config.yaml"], "someone else's");
    assert!(untouched.metadata.owner_references.is_none() && untouched.metadata.labels.is_none());
    wait_until("the webhook to leave the route's pods alone", Duration::from_secs(30), || async {
        let probe = shop_pods
            .create(
                &PostParams { dry_run: true, ..Default::default() },
                &pod("squatted-probe", "shop", json!({"app": "squatted"}), json!({})),
            )
            .await
            .ok()?;
        (sidecars(&probe) == 0).then_some(())
    })
    .await;

    config_maps.delete("squatted-storerelay", &DeleteParams::default()).await.unwrap();
    let ours = wait_until("the operator's own ConfigMap", Duration::from_secs(60), || async {
        let config_map = config_maps.get_opt("squatted-storerelay").await.ok()??;
        config_map.metadata.owner_references.is_some().then_some(config_map)
    })
    .await;
    assert!(ours.data.unwrap()["config.yaml"].contains("revenuecat"));
    routes.delete("squatted", &DeleteParams::default()).await.unwrap();
}

/// Without the rbac.checkSecrets binding, the chart's permissions read no Secret outside the
/// operator's namespace.
async fn base_permissions_read_no_secret_outside_the_operators_namespace(w: &mut World) {
    let bindings: Api<k8s_openapi::api::rbac::v1::ClusterRoleBinding> = Api::all(w.admin.clone());
    bindings.delete(&format!("{FULLNAME}-check-secrets"), &DeleteParams::default()).await.unwrap();
    let as_operator = {
        let kubeconfig = kube::config::Kubeconfig::read_from(&w.impersonating).unwrap();
        Client::try_from(kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.unwrap()).unwrap()
    };
    let app_secret: Secret =
        serde_json::from_value(json!({"metadata": {"name": "app"}, "stringData": {"k": "v"}})).unwrap();
    w.secrets.create(&PostParams::default(), &app_secret).await.unwrap();
    let forbidden =
        Api::<Secret>::namespaced(as_operator.clone(), "shop").get("app").await.expect_err("no Secret access");
    assert!(forbidden.to_string().contains("forbidden"), "{forbidden}");
    let own = Api::<Secret>::namespaced(as_operator.clone(), OPERATOR_NAMESPACE)
        .get(&format!("{FULLNAME}-webhook-tls"))
        .await;
    assert!(own.is_ok(), "its own certificate Secret is readable: {own:?}");
    // ConfigMaps are read by name only: listing (kube-system's, say) is refused.
    let listing = Api::<ConfigMap>::namespaced(as_operator, "kube-system").list(&ListParams::default()).await;
    assert!(listing.is_err_and(|e| e.to_string().contains("forbidden")), "ConfigMaps cannot be listed");
}

async fn storerelayctl_check_reports_what_a_user_sees(w: &mut World) {
    let check = Command::new(env!("CARGO_BIN_EXE_storerelayctl"))
        .args([
            "check",
            &format!("--namespace={OPERATOR_NAMESPACE}"),
            &format!("--webhook-configuration={FULLNAME}"),
            &format!("--webhook-secret={FULLNAME}-webhook-tls"),
        ])
        .env("KUBECONFIG", &w.cluster.kubeconfig)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(report.contains("[ok] CRD notificationroutes.storerelay.dev established"), "{report}");
    assert!(report.contains("[ok] webhook caBundle matches the operator's CA"), "{report}");
    assert!(report.contains("[ok] serving certificate valid for"), "{report}");
    assert!(report.contains("[FAIL] route shop/payments: matched 2 injected 1"), "{report}");
    assert_eq!(check.status.code(), Some(1), "a route that is not Ready fails the check");
}

async fn helm_uninstall_removes_what_it_installed(w: &mut World) {
    w.stop_operator();
    run_helm(&w.helm, &w.cluster, &["uninstall", RELEASE, "-n", OPERATOR_NAMESPACE]);
    assert!(w.configurations.get_opt(FULLNAME).await.unwrap().is_none());
    let roles: Api<k8s_openapi::api::rbac::v1::ClusterRole> = Api::all(w.admin.clone());
    assert!(roles.get_opt(FULLNAME).await.unwrap().is_none());
}
