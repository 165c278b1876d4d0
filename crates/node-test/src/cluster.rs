//! Small kube-rs helpers for the scenarios: apply YAML, wait for pods and rollouts, read a route's status,
//! talk to a pod's sidecar and app over the pod network.

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::Scope;
use std::future::Future;
use std::time::{Duration, Instant};

pub const MANAGER: &str = "storerelay-node-test";

/// Polls `check` every 500 ms until it returns `Some`, or fails after `within` with the last error.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + within;
    let mut last = String::from("not yet");
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(error) => last = format!("{error:#}"),
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {within:?} ({last})");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Server-side applies every document of a multi-document YAML text.
pub async fn apply(client: &kube::Client, yaml: &str) -> Result<()> {
    for document in yaml.split("\n---\n").filter(|d| !d.trim().is_empty()) {
        let object: DynamicObject = serde_yaml::from_str(document).context("parse a manifest")?;
        let types = object.types.clone().ok_or_else(|| anyhow!("a manifest without apiVersion/kind"))?;
        let gvk = GroupVersionKind::try_from(&types)?;
        let (resource, capabilities) = kube::discovery::pinned_kind(client, &gvk).await?;
        let name = object.metadata.name.clone().ok_or_else(|| anyhow!("a manifest without a name"))?;
        let api: Api<DynamicObject> = match (capabilities.scope, &object.metadata.namespace) {
            (Scope::Namespaced, Some(namespace)) => Api::namespaced_with(client.clone(), namespace, &resource),
            (Scope::Namespaced, None) => bail!("{} {name} needs a namespace", gvk.kind),
            (Scope::Cluster, _) => Api::all_with(client.clone(), &resource),
        };
        api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&object))
            .await
            .with_context(|| format!("apply {} {name}", gvk.kind))?;
    }
    Ok(())
}

/// A merge patch of a NotificationRoute.
pub async fn patch_route(client: &kube::Client, namespace: &str, name: &str, patch: serde_json::Value) -> Result<()> {
    routes(client, namespace).patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

pub fn routes(client: &kube::Client, namespace: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("storerelay.dev", "v1alpha1", "NotificationRoute");
    Api::namespaced_with(client.clone(), namespace, &kube::api::ApiResource::from_gvk(&gvk))
}

pub async fn route_status(client: &kube::Client, namespace: &str, name: &str) -> Result<serde_json::Value> {
    Ok(routes(client, namespace).get(name).await?.data["status"].clone())
}

/// The status of a route's condition `kind` (`True`, `False`, `Unknown`), if it has one.
pub fn condition(status: &serde_json::Value, kind: &str) -> Option<String> {
    status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .and_then(|c| c["status"].as_str().map(str::to_string))
}

pub async fn pods(client: &kube::Client, namespace: &str, selector: &str) -> Result<Vec<Pod>> {
    Ok(Api::<Pod>::namespaced(client.clone(), namespace).list(&ListParams::default().labels(selector)).await?.items)
}

pub fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

pub fn pod_ip(pod: &Pod) -> Result<String> {
    pod.status.as_ref().and_then(|s| s.pod_ip.clone()).ok_or_else(|| anyhow!("pod {} has no IP", name(pod)))
}

pub fn name(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

/// Waits until the selector matches exactly `count` pods, all Ready and none terminating.
pub async fn ready_pods(
    client: &kube::Client,
    namespace: &str,
    selector: &str,
    count: usize,
    within: Duration,
) -> Result<Vec<Pod>> {
    eventually(&format!("{count} Ready pods {selector} in {namespace}"), within, || async {
        let pods = pods(client, namespace, selector).await?;
        let ready = pods.iter().filter(|p| is_ready(p)).count();
        if pods.len() == count && ready == count {
            return Ok(Some(pods));
        }
        Err(anyhow!("{} pods, {ready} Ready: {}", pods.len(), describe(&pods)))
    })
    .await
}

/// One line per pod: phase and each container's state, for failure messages.
pub fn describe(pods: &[Pod]) -> String {
    pods.iter()
        .map(|pod| {
            let status = pod.status.clone().unwrap_or_default();
            let containers: Vec<String> = status
                .init_container_statuses
                .iter()
                .flatten()
                .chain(status.container_statuses.iter().flatten())
                .map(|c| {
                    let state = serde_json::to_string(&c.state).unwrap_or_default();
                    format!("{}(ready={}, restarts={}, {state})", c.name, c.ready, c.restart_count)
                })
                .collect();
            format!(
                "{} {} {}",
                name(pod),
                status.phase.unwrap_or_default(),
                if containers.is_empty() {
                    serde_json::to_string(&status.conditions).unwrap_or_default()
                } else {
                    containers.join(" ")
                }
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// What `kubectl rollout restart` does: a new pod-template annotation.
pub async fn restart_deployment(client: &kube::Client, namespace: &str, name: &str) -> Result<()> {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let patch = serde_json::json!({"spec": {"template": {"metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": now}}}}});
    Api::<Deployment>::namespaced(client.clone(), namespace)
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// Waits until the Deployment's rollout is complete: every replica updated and available, no old pod
/// left (not even terminating); returns its pods.
pub async fn rollout_complete(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    selector: &str,
    within: Duration,
) -> Result<Vec<Pod>> {
    let deployments = Api::<Deployment>::namespaced(client.clone(), namespace);
    eventually(&format!("the rollout of {namespace}/{name}"), within, || async {
        let deployment = deployments.get(name).await?;
        let wanted = deployment.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let status = deployment.status.clone().unwrap_or_default();
        let generation = deployment.metadata.generation.unwrap_or(0);
        let done = status.observed_generation.unwrap_or(0) >= generation
            && status.updated_replicas == Some(wanted)
            && status.available_replicas == Some(wanted)
            && status.replicas == Some(wanted);
        let pods = pods(client, namespace, selector).await?;
        if done && pods.len() == wanted as usize && pods.iter().all(is_ready) {
            return Ok(Some(pods));
        }
        Err(anyhow!("status {:?}; pods: {}", status, describe(&pods)))
    })
    .await
}

/// One sample of a Prometheus text page: the value of the first line starting with `series` (the metric
/// name with its labels, e.g. `storerelay_deliveries_total{destination="x",outcome="delivered"}`).
pub fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

pub async fn get_text(http: &reqwest::Client, url: &str) -> Result<String> {
    let response = http.get(url).send().await.with_context(|| format!("GET {url}"))?;
    let status = response.status();
    let text = response.text().await?;
    if !status.is_success() {
        bail!("GET {url}: {status}: {text}");
    }
    Ok(text)
}
