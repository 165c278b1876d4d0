//! The scenarios of the real-node tier, in order; each builds on the state the previous one left (the
//! chart installed, the route and Deployment in place). Each returns a short line for the summary.

use crate::World;
use crate::cluster::{
    apply, condition, describe, eventually, get_text, name, patch_route, pod_ip, pods, ready_pods, restart_deployment,
    rollout_complete, route_status, sample,
};
use anyhow::{Context, Result, anyhow, bail, ensure};
use futures::{AsyncBufReadExt, StreamExt, TryStreamExt};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, LogParams, WatchEvent, WatchParams};
use std::time::{Duration, Instant};

pub const NAMESPACE: &str = "shop";
pub const ROUTE: &str = "payments";
const DEPLOYMENT: &str = "payments";
const SELECTOR: &str = "app=payments";
const SIDECAR: &str = "storerelay";
const APP: &str = "app";
const LISTEN_PORT: u16 = 8089;
const ADMIN_PORT: u16 = 9089;
const APP_PORT: u16 = 8080;
const GRACE_SECONDS: i64 = 45;
const DELIVERED: &str = r#"storerelay_deliveries_total{destination="revenuecat",outcome="delivered"}"#;
const RELOADED: &str = r#"storerelay_config_reloads_total{result="success"}"#;
const LEFT_BEHIND: &str = "deliveries pending in this pod's own spool";

/// Scenario 1. `helm install` of the chart with the locally built images; the operator runs as the chart's
/// pods.
pub async fn helm_install(w: &World) -> Result<String> {
    let (operator_repository, operator_tag) = split_image(&w.options.operator_image)?;
    let (sidecar_repository, sidecar_tag) = split_image(&w.options.sidecar_image)?;
    let sets = [
        format!("image.repository={operator_repository}"),
        format!("image.tag={operator_tag}"),
        "image.pullPolicy=Never".into(),
        format!("sidecarImage.repository={sidecar_repository}"),
        format!("sidecarImage.tag={sidecar_tag}"),
        "sidecarImage.pullPolicy=Never".into(),
        // Pods in route namespaces wait for the webhook instead of starting without the sidecar.
        "webhook.failurePolicy=Fail".into(),
        "rbac.restartWorkloads=true".into(),
    ];
    let mut command = std::process::Command::new(&w.options.helm);
    command
        .args(["install", "storerelay"])
        .arg(&w.options.chart)
        .args(["--namespace", "storerelay", "--create-namespace", "--wait", "--timeout", "4m"])
        .arg(format!("--kubeconfig={}", w.cluster.kubeconfig.display()));
    for set in &sets {
        command.args(["--set", set]);
    }
    let output = tokio::task::spawn_blocking(move || command.output()).await??;
    ensure!(
        output.status.success(),
        "helm install failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let operators = rollout_complete(
        &w.client,
        "storerelay",
        "storerelay",
        "app.kubernetes.io/name=storerelay",
        Duration::from_secs(60),
    )
    .await?;
    // The operator publishes its CA into the webhook configuration it got from the chart.
    let webhooks = Api::<MutatingWebhookConfiguration>::all(w.client.clone());
    eventually("the webhook's caBundle", Duration::from_secs(60), || async {
        let configurations = webhooks.list(&Default::default()).await?;
        let published = configurations
            .items
            .iter()
            .flat_map(|c| c.webhooks.iter().flatten())
            .any(|hook| hook.client_config.ca_bundle.as_ref().is_some_and(|b| !b.0.is_empty()));
        Ok(published.then_some(()))
    })
    .await?;
    Ok(format!("operator running as {} pods of the chart; webhook CA published", operators.len()))
}

/// Scenario 2. A restricted namespace, a route and a two-replica Deployment: the sidecar injected as a native
/// sidecar, started before the app, probes passing, pods Ready.
pub async fn deploy_app(w: &World) -> Result<String> {
    let url = w.destination.url(w.options.node_ip, "/v1/first");
    apply(
        &w.client,
        &format!(
            r#"apiVersion: v1
kind: Namespace
metadata:
  name: {NAMESPACE}
  labels:
    pod-security.kubernetes.io/enforce: restricted
---
apiVersion: v1
kind: Secret
metadata: {{name: revenuecat, namespace: {NAMESPACE}}}
stringData: {{url: "{url}"}}
---
apiVersion: storerelay.dev/v1alpha1
kind: NotificationRoute
metadata: {{name: {ROUTE}, namespace: {NAMESPACE}}}
spec:
  selector: {{matchLabels: {{app: payments}}}}
  upstream: {{port: {APP_PORT}, timeout: 5s}}
  ack: upstream
  destinations:
    - name: revenuecat
      urlFrom: {{secretKeyRef: {{name: revenuecat, key: url}}}}
      timeout: 2s
      retry: {{initialBackoff: 200ms, maxBackoff: 1s}}
  rollout: {{policy: Manual}}
"#
        ),
    )
    .await?;
    // Pods created before the webhook selects the namespace would start without the sidecar.
    let webhooks = Api::<MutatingWebhookConfiguration>::all(w.client.clone());
    eventually("the webhook selecting the route's namespace", Duration::from_secs(60), || async {
        let configurations = webhooks.list(&Default::default()).await?;
        let selects = configurations
            .items
            .iter()
            .flat_map(|c| c.webhooks.iter().flatten())
            .any(|hook| serde_json::to_string(&hook.namespace_selector).unwrap_or_default().contains(NAMESPACE));
        Ok(selects.then_some(()))
    })
    .await?;
    apply(&w.client, &deployment_yaml(&w.options.app_image)).await?;
    let pods = ready_pods(&w.client, NAMESPACE, SELECTOR, 2, Duration::from_secs(180)).await?;
    for pod in &pods {
        let spec = pod.spec.as_ref().ok_or_else(|| anyhow!("pod without spec"))?;
        let sidecar = spec
            .init_containers
            .iter()
            .flatten()
            .find(|c| c.name == SIDECAR)
            .ok_or_else(|| anyhow!("pod {} has no {SIDECAR} init container", name(pod)))?;
        ensure!(sidecar.restart_policy.as_deref() == Some("Always"), "the sidecar is not a native sidecar");
        let status = pod.status.clone().unwrap_or_default();
        let sidecar_status = status
            .init_container_statuses
            .iter()
            .flatten()
            .find(|c| c.name == SIDECAR)
            .ok_or_else(|| anyhow!("no sidecar status"))?;
        ensure!(sidecar_status.ready && sidecar_status.started == Some(true), "sidecar not started and ready");
        ensure!(sidecar_status.restart_count == 0, "the sidecar restarted: {}", describe(&pods));
        let app_status = status
            .container_statuses
            .iter()
            .flatten()
            .find(|c| c.name == APP)
            .ok_or_else(|| anyhow!("no app status"))?;
        let started = |s: &k8s_openapi::api::core::v1::ContainerStatus| {
            s.state.as_ref().and_then(|s| s.running.as_ref()).and_then(|r| r.started_at.clone()).map(|t| t.0)
        };
        let (sidecar_started, app_started) = (started(sidecar_status), started(app_status));
        ensure!(
            sidecar_started.is_some() && sidecar_started <= app_started,
            "the sidecar started at {sidecar_started:?}, the app at {app_started:?}"
        );
    }
    Ok("2 pods Ready in a restricted namespace; native sidecar started first in each".to_string())
}

/// Scenario 3. V1 and V2 notifications to each pod: the app gets them, the destination byte-identical copies,
/// the sidecars count them delivered, the route counts 2 matched and 2 injected.
pub async fn notifications(w: &World) -> Result<String> {
    let pods = ready_pods(&w.client, NAMESPACE, SELECTOR, 2, Duration::from_secs(30)).await?;
    let mut sent = Vec::new();
    for (index, pod) in pods.iter().enumerate() {
        let ip = pod_ip(pod)?;
        let bodies = [v1_body(&format!("pod{index}")), v2_body(&format!("00000000-0000-4000-8000-00000000000{index}"))];
        for body in &bodies {
            post(w, &ip, body.clone()).await?;
        }
        let received = get_text(&w.http, &format!("http://{ip}:{APP_PORT}/received")).await?;
        for body in &bodies {
            ensure!(received.contains(&hex(body)), "the app in {} did not get a notification", name(pod));
        }
        sent.extend(bodies);
    }
    let destination = w.destination.clone();
    eventually("byte-identical copies at the destination", Duration::from_secs(30), || {
        let got = destination.bodies("/v1/first");
        let sent = &sent;
        async move {
            let missing = sent.iter().filter(|b| !got.contains(b)).count();
            ensure!(missing == 0, "{missing} of {} not received (got {})", sent.len(), got.len());
            Ok(Some(()))
        }
    })
    .await?;
    let extra = w.destination.bodies("/v1/first").len() - sent.len();
    ensure!(extra == 0, "{extra} copies more than sent");
    for pod in &pods {
        let ip = pod_ip(pod)?;
        let page = get_text(&w.http, &format!("http://{ip}:{ADMIN_PORT}/metrics")).await?;
        ensure!(sample(&page, DELIVERED) == Some(2.0), "pod {} does not count 2 delivered", name(pod));
        ensure!(
            sample(&page, r#"storerelay_spool_pending{destination="revenuecat"}"#) == Some(0.0),
            "pod {} has pending deliveries",
            name(pod)
        );
    }
    let status = eventually("route status Matched 2, Injected 2", Duration::from_secs(60), || async {
        let status = route_status(&w.client, NAMESPACE, ROUTE).await?;
        Ok((status["matched"] == 2 && status["injected"] == 2).then_some(status))
    })
    .await?;
    Ok(format!(
        "{} notifications: app and destination byte-identical; Matched {}, Injected {}",
        sent.len(),
        status["matched"],
        status["injected"]
    ))
}

/// Scenario 4. A rotated destination Secret reaches the running pods (the next notification goes to the new
/// URL); new retry settings reach them through the ConfigMap and the sidecar reloads; no restart.
pub async fn rotation(w: &World) -> Result<String> {
    let before = ready_pods(&w.client, NAMESPACE, SELECTOR, 2, Duration::from_secs(30)).await?;
    let started = Instant::now();
    let url = w.destination.url(w.options.node_ip, "/v1/second");
    apply(&w.client, &format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: revenuecat, namespace: {NAMESPACE}}}\nstringData: {{url: \"{url}\"}}\n"
    ))
    .await?;
    let mut sequence = 0;
    for pod in &before {
        let ip = pod_ip(pod)?;
        let destination = w.destination.clone();
        eventually(&format!("{} delivering to the rotated URL", name(pod)), Duration::from_secs(120), || {
            sequence += 1;
            let body = v1_body(&format!("rotation-{}-{sequence}", name(pod)));
            let (destination, ip) = (destination.clone(), ip.clone());
            async move {
                post(w, &ip, body.clone()).await?;
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok(destination.bodies("/v1/second").contains(&body).then_some(()))
            }
        })
        .await?;
    }
    let rotated = started.elapsed();

    let reloads_before = reloads(w, &before).await?;
    patch_route(
        &w.client,
        NAMESPACE,
        ROUTE,
        serde_json::json!({"spec": {"destinations": [{
            "name": "revenuecat",
            "urlFrom": {"secretKeyRef": {"name": "revenuecat", "key": "url"}},
            "timeout": "2s",
            "retry": {"initialBackoff": "300ms", "maxBackoff": "2s"},
        }]}}),
    )
    .await?;
    let started = Instant::now();
    eventually("every sidecar reloading the new retry settings", Duration::from_secs(120), || async {
        let now = reloads(w, &before).await?;
        Ok(now.iter().zip(&reloads_before).all(|(now, before)| now > before).then_some(()))
    })
    .await?;
    let reloaded = started.elapsed();
    let after = ready_pods(&w.client, NAMESPACE, SELECTOR, 2, Duration::from_secs(30)).await?;
    let names = |pods: &[Pod]| pods.iter().map(name).collect::<Vec<_>>();
    ensure!(names(&before) == names(&after), "pods were replaced: {:?} -> {:?}", names(&before), names(&after));
    for pod in &after {
        let restarts: i32 = pod
            .status
            .iter()
            .flat_map(|s| s.init_container_statuses.iter().flatten().chain(s.container_statuses.iter().flatten()))
            .map(|c| c.restart_count)
            .sum();
        ensure!(restarts == 0, "pod {} restarted a container", name(pod));
    }
    Ok(format!(
        "Secret rotation live in {:.0}s, retry settings reloaded in {:.0}s, no restart",
        rotated.as_secs_f64(),
        reloaded.as_secs_f64()
    ))
}

async fn reloads(w: &World, pods: &[Pod]) -> Result<Vec<f64>> {
    let mut counts = Vec::new();
    for pod in pods {
        let page = get_text(&w.http, &format!("http://{}:{ADMIN_PORT}/metrics", pod_ip(pod)?)).await?;
        counts.push(sample(&page, RELOADED).unwrap_or(0.0));
    }
    Ok(counts)
}

/// Scenario 5. A backlog of 200 across a rollout: with the shared PostgreSQL spool every one is delivered by
/// the new pods; with the SQLite spool each old pod says what it left behind (and it is not delivered).
pub async fn backlog_across_rollout(w: &World) -> Result<String> {
    let database = format!("postgres://storerelay@{}:{}/postgres?sslmode=disable", w.options.node_ip, w.postgres.port);
    apply(&w.client, &format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: spool-db, namespace: {NAMESPACE}}}\nstringData: {{url: \"{database}\"}}\n"
    ))
    .await?;
    // Manual rollout policy: the spool is an injection-time field, the pods restart when we say so.
    change_and_restart(
        w,
        serde_json::json!({"spec": {"spool": {"postgres": {"urlFrom": {"secretKeyRef": {"name": "spool-db", "key": "url"}}}}}}),
    )
    .await?;
    let status = route_status(&w.client, NAMESPACE, ROUTE).await?;
    ensure!(condition(&status, "SpoolShared").as_deref() == Some("True"), "SpoolShared is not True: {status}");

    let started = Instant::now();
    let shared = post_backlog(w, "pg").await?;
    restart_and_wait(w).await?;
    w.destination.set_down(false);
    let destination = w.destination.clone();
    eventually("all 200 delivered after the rollout", Duration::from_secs(120), || {
        let got = destination.all_bodies();
        let shared = &shared;
        async move {
            let missing = shared.iter().filter(|b| !got.contains(b)).count();
            ensure!(missing == 0, "{missing} of {} not delivered yet", shared.len());
            Ok(Some(()))
        }
    })
    .await?;
    let got = w.destination.all_bodies();
    let duplicates = shared.iter().map(|b| got.iter().filter(|g| *g == b).count().saturating_sub(1)).sum::<usize>();
    let postgres_took = started.elapsed();

    // Back to each pod's own SQLite file.
    change_and_restart(w, serde_json::json!({"spec": {"spool": null}})).await?;
    let local = post_backlog(w, "sqlite").await?;
    let old = pods(&w.client, NAMESPACE, SELECTOR).await?;
    let mut logs = Vec::new();
    for pod in &old {
        let api = Api::<Pod>::namespaced(w.client.clone(), NAMESPACE);
        let params = LogParams { container: Some(SIDECAR.into()), follow: true, ..Default::default() };
        let stream = api.log_stream(&name(pod), &params).await?;
        logs.push(tokio::spawn(async move { stream.lines().try_collect::<Vec<String>>().await }));
    }
    restart_and_wait(w).await?;
    let mut left_behind = 0u64;
    for (pod, log) in old.iter().zip(logs) {
        let lines = tokio::time::timeout(Duration::from_secs(30), log)
            .await
            .with_context(|| format!("the sidecar log of {} did not end", name(pod)))???;
        let line = lines
            .iter()
            .find(|l| l.contains(LEFT_BEHIND))
            .ok_or_else(|| anyhow!("{} stopped without the left-behind line:\n{}", name(pod), lines.join("\n")))?;
        let record: serde_json::Value = serde_json::from_str(line).context("the left-behind line is JSON")?;
        let pending = record["fields"]["pending"].as_u64().or_else(|| record["pending"].as_u64()).unwrap_or(0);
        ensure!(line.contains("revenuecat="), "the line names no destination: {line}");
        left_behind += pending;
    }
    ensure!(
        left_behind == local.len() as u64,
        "the old pods reported {left_behind} left behind, {} were pending",
        local.len()
    );
    w.destination.set_down(false);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let got = w.destination.all_bodies();
    let recovered = local.iter().filter(|b| got.contains(b)).count();
    ensure!(recovered == 0, "{recovered} of a deleted pod's SQLite backlog arrived; the docs say it is lost");
    Ok(format!(
        "PostgreSQL: 200/200 delivered after the rollout ({duplicates} duplicates, {:.0}s); SQLite: old pods logged {left_behind} left behind",
        postgres_took.as_secs_f64()
    ))
}

/// Changes an injection-time field of the route and restarts the Deployment the way a user following the
/// docs would: once the route's status shows the operator saw the change. Every new pod must carry the new
/// revision.
async fn change_and_restart(w: &World, patch: serde_json::Value) -> Result<()> {
    patch_route(&w.client, NAMESPACE, ROUTE, patch).await?;
    let generation = crate::cluster::routes(&w.client, NAMESPACE).get(ROUTE).await?.metadata.generation;
    let revision = eventually("the operator observing the route change", Duration::from_secs(60), || async {
        let status = route_status(&w.client, NAMESPACE, ROUTE).await?;
        let observed = status["observedGeneration"].as_i64();
        Ok((observed.is_some() && observed >= generation)
            .then(|| status["revision"].as_str().unwrap_or_default().to_string()))
    })
    .await?;
    // Every operator replica's webhook answers from its own watch of the routes; give them a moment.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pods = restart_and_wait(w).await?;
    for pod in &pods {
        let injected = pod.metadata.annotations.as_ref().and_then(|a| a.get("storerelay.dev/injected")).cloned();
        ensure!(
            injected.as_deref().is_some_and(|v| v.ends_with(&format!("@{revision}"))),
            "pod {} carries {injected:?}, not the route's revision {revision}",
            name(pod)
        );
    }
    Ok(())
}

async fn restart_and_wait(w: &World) -> Result<Vec<Pod>> {
    restart_deployment(&w.client, NAMESPACE, DEPLOYMENT).await?;
    rollout_complete(&w.client, NAMESPACE, DEPLOYMENT, SELECTOR, Duration::from_secs(240)).await
}

/// The destination down, 200 notifications split over the pods, each stored (200) and pending.
async fn post_backlog(w: &World, tag: &str) -> Result<Vec<Vec<u8>>> {
    w.destination.set_down(true);
    let pods = ready_pods(&w.client, NAMESPACE, SELECTOR, 2, Duration::from_secs(30)).await?;
    let ips = pods.iter().map(pod_ip).collect::<Result<Vec<_>>>()?;
    let bodies: Vec<Vec<u8>> = (0..200).map(|i| v2_body(&format!("{tag}-backlog-{i:03}"))).collect();
    let results = futures::stream::iter(bodies.iter().enumerate())
        .map(|(i, body)| post(w, &ips[i % ips.len()], body.clone()))
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    results.into_iter().collect::<Result<Vec<_>>>()?;
    Ok(bodies)
}

/// Scenario 6. A deleted pod: the app gets SIGTERM first, the sidecar outlives it, both exit 0 within the
/// grace period.
pub async fn pod_deletion(w: &World) -> Result<String> {
    let pods = ready_pods(&w.client, NAMESPACE, SELECTOR, 2, Duration::from_secs(30)).await?;
    let victim = name(&pods[0]);
    let api = Api::<Pod>::namespaced(w.client.clone(), NAMESPACE);
    let version = api.get(&victim).await?.metadata.resource_version.unwrap_or_default();
    let params = WatchParams::default().fields(&format!("metadata.name={victim}")).timeout(120);
    let mut events = api.watch(&params, &version).await?.boxed();
    let started = Instant::now();
    api.delete(&victim, &DeleteParams::default()).await?;
    let mut last = None;
    while let Some(event) = tokio::time::timeout(Duration::from_secs(120), events.try_next()).await?? {
        match event {
            WatchEvent::Modified(pod) => last = Some(pod),
            WatchEvent::Deleted(pod) => {
                last = Some(pod);
                break;
            }
            WatchEvent::Error(error) => bail!("watch: {error:?}"),
            _ => {}
        }
    }
    let took = started.elapsed();
    let pod = last.ok_or_else(|| anyhow!("no update of {victim} seen"))?;
    let status = pod.status.clone().unwrap_or_default();
    let terminated = |name: &str| {
        status
            .init_container_statuses
            .iter()
            .flatten()
            .chain(status.container_statuses.iter().flatten())
            .find(|c| c.name == name)
            .and_then(|c| c.state.as_ref()?.terminated.clone())
    };
    let app = terminated(APP)
        .ok_or_else(|| anyhow!("the app's termination was not reported: {}", describe(std::slice::from_ref(&pod))))?;
    let sidecar = terminated(SIDECAR).ok_or_else(|| {
        anyhow!("the sidecar's termination was not reported: {}", describe(std::slice::from_ref(&pod)))
    })?;
    ensure!(app.exit_code == 0, "the app exited {} (3: the sidecar was gone before the app finished)", app.exit_code);
    ensure!(sidecar.exit_code == 0, "the sidecar exited {}", sidecar.exit_code);
    let (app_done, sidecar_done) = (app.finished_at.map(|t| t.0), sidecar.finished_at.map(|t| t.0));
    ensure!(
        app_done.is_some() && app_done <= sidecar_done,
        "the app finished at {app_done:?}, the sidecar at {sidecar_done:?}"
    );
    ensure!(
        took < Duration::from_secs(GRACE_SECONDS as u64),
        "termination took {took:?}, over the {GRACE_SECONDS}s grace"
    );
    ready_pods(&w.client, NAMESPACE, SELECTOR, 2, Duration::from_secs(120)).await?;
    Ok(format!("app then sidecar, both exit 0, gone in {:.1}s (grace {GRACE_SECONDS}s)", took.as_secs_f64()))
}

/// Scenario 7. `rollout.policy: RestartWorkloads`: an injection-time change restarts the Deployment; the new
/// pods carry the new revision and `Outdated` returns to 0.
pub async fn restart_workloads(w: &World) -> Result<String> {
    let before = route_status(&w.client, NAMESPACE, ROUTE).await?["revision"].clone();
    let started = Instant::now();
    patch_route(
        &w.client,
        NAMESPACE,
        ROUTE,
        serde_json::json!({"spec": {
            "rollout": {"policy": "RestartWorkloads"},
            "sidecar": {"resources": {"requests": {"cpu": "15m", "memory": "24Mi"}, "limits": {"memory": "96Mi"}}},
        }}),
    )
    .await?;
    let revision = eventually("a new route revision", Duration::from_secs(60), || async {
        let status = route_status(&w.client, NAMESPACE, ROUTE).await?;
        let revision = status["revision"].clone();
        Ok((revision.is_string() && revision != before).then(|| revision.as_str().unwrap_or_default().to_string()))
    })
    .await?;
    let deployments = Api::<Deployment>::namespaced(w.client.clone(), NAMESPACE);
    eventually("the operator restarting the Deployment", Duration::from_secs(60), || async {
        let deployment = deployments.get(DEPLOYMENT).await?;
        let annotations =
            deployment.spec.and_then(|s| s.template.metadata).and_then(|m| m.annotations).unwrap_or_default();
        Ok(annotations.contains_key("storerelay.dev/restartedAt").then_some(()))
    })
    .await?;
    let pods = rollout_complete(&w.client, NAMESPACE, DEPLOYMENT, SELECTOR, Duration::from_secs(240)).await?;
    for pod in &pods {
        let injected = pod.metadata.annotations.as_ref().and_then(|a| a.get("storerelay.dev/injected")).cloned();
        ensure!(
            injected.as_deref().is_some_and(|v| v.ends_with(&format!("@{revision}"))),
            "pod {} carries {injected:?}, not revision {revision}",
            name(pod)
        );
    }
    let status = eventually("Outdated back to 0", Duration::from_secs(60), || async {
        let status = route_status(&w.client, NAMESPACE, ROUTE).await?;
        Ok((status["outdated"] == 0 && status["injected"] == 2).then_some(status))
    })
    .await?;
    Ok(format!(
        "restarted by the operator; 2 pods at revision {revision}, Outdated {} after {:.0}s",
        status["outdated"],
        started.elapsed().as_secs_f64()
    ))
}

fn deployment_yaml(image: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: {DEPLOYMENT}, namespace: {NAMESPACE}}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: payments}}}}
  template:
    metadata: {{labels: {{app: payments}}}}
    spec:
      automountServiceAccountToken: false
      terminationGracePeriodSeconds: {GRACE_SECONDS}
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        runAsGroup: 65532
        seccompProfile: {{type: RuntimeDefault}}
      containers:
        - name: {APP}
          image: {image}
          imagePullPolicy: Never
          ports: [{{containerPort: {APP_PORT}}}]
          readinessProbe: {{httpGet: {{path: /healthz, port: {APP_PORT}}}, periodSeconds: 2}}
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities: {{drop: [ALL]}}
"#
    )
}

async fn post(w: &World, ip: &str, body: Vec<u8>) -> Result<()> {
    let url = format!("http://{ip}:{LISTEN_PORT}/apple/notifications");
    let response = w
        .http
        .post(&url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = response.status();
    ensure!(status.is_success(), "POST {url}: {status}: {}", response.text().await.unwrap_or_default());
    Ok(())
}

/// A V1 body with the spacing and escapes a re-serializer would change.
fn v1_body(tag: &str) -> Vec<u8> {
    format!(
        "{{ \"notification_type\" : \"DID_RENEW\",\"environment\":\"Sandbox\", \"password\":\"shared-SECRET\",\n  \"bid\":\"com.example.app\",\"note\":\"caf\u{e9} \\u00e9 \\/ {tag}\" }}"
    )
    .into_bytes()
}

/// A V2-shaped body with its own `notificationUUID` (the route does not verify signatures).
fn v2_body(uuid: &str) -> Vec<u8> {
    use base64::Engine;
    let encode = |text: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text.as_bytes());
    let header = encode(r#"{"alg":"ES256"}"#);
    let payload = encode(&format!(
        r#"{{"notificationType":"DID_RENEW","notificationUUID":"{uuid}","data":{{"bundleId":"com.example.app","environment":"Sandbox"}}}}"#
    ));
    format!(r#"{{"signedPayload":"{header}.{payload}.c2lnbmF0dXJl"}}"#).into_bytes()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `registry/name:tag` into (`registry/name`, `tag`).
fn split_image(image: &str) -> Result<(String, String)> {
    let (repository, tag) = image.rsplit_once(':').ok_or_else(|| anyhow!("image {image} has no tag"))?;
    Ok((repository.to_string(), tag.to_string()))
}

/// What to look at when a scenario failed: the route's status, each pod's containers and the end of its
/// sidecar's log, and the shared queue's deliveries by state.
pub async fn diagnostics(w: &World) -> String {
    let mut out = String::from("--- diagnostics ---\n");
    if let Ok(status) = route_status(&w.client, NAMESPACE, ROUTE).await {
        out.push_str(&format!("route status: {status}\n"));
    }
    let api = Api::<Pod>::namespaced(w.client.clone(), NAMESPACE);
    for pod in pods(&w.client, NAMESPACE, SELECTOR).await.unwrap_or_default() {
        out.push_str(&format!("{}\n", describe(std::slice::from_ref(&pod))));
        let params = LogParams { container: Some(SIDECAR.into()), tail_lines: Some(40), ..Default::default() };
        match api.logs(&name(&pod), &params).await {
            Ok(log) => out.push_str(&log),
            Err(error) => out.push_str(&format!("(no log: {error})\n")),
        }
    }
    out.push_str(&w.postgres.psql(
        "SELECT queue, destination, state, count(*), max(attempts), min(next_attempt_at), max(lease_until) \
         FROM storerelay.deliveries GROUP BY 1, 2, 3",
    ));
    out
}
