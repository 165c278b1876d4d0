//! `storerelayctl inject` / `uninject`: the webhook's injection applied offline to manifests, for
//! GitOps. Pods and the pod templates of workloads are changed by a JSON patch computed with the same
//! pure functions the webhook uses, so fields this tool does not know survive untouched.

use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use serde::Deserialize;
use serde_json::Value;

use crate::crd::NotificationRoute;
use crate::inject::{self, InjectError, Injection};
use crate::select::selects;

/// Where a kind keeps its pod template, as a JSON pointer.
fn template_pointer(kind: &str) -> Option<&'static str> {
    match kind {
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        "Pod" => Some(""),
        _ => None,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("document {index}: {message}")]
    Document { index: usize, message: String },
    #[error("document {index} ({kind} {name}): {source}")]
    Inject { index: usize, kind: String, name: String, source: InjectError },
}

enum Change {
    Inject,
    Uninject,
}

/// Injects `route` into every Pod and pod template it selects; other documents pass through.
pub fn inject_documents(
    input: &str,
    route: &NotificationRoute,
    injection: &Injection,
) -> Result<String, ManifestError> {
    transform(input, route, injection, Change::Inject)
}

/// Removes the sidecar from every Pod and pod template in the input.
pub fn uninject_documents(
    input: &str,
    route: &NotificationRoute,
    injection: &Injection,
) -> Result<String, ManifestError> {
    transform(input, route, injection, Change::Uninject)
}

fn transform(
    input: &str,
    route: &NotificationRoute,
    injection: &Injection,
    change: Change,
) -> Result<String, ManifestError> {
    let mut out = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(input).enumerate() {
        let value = Value::deserialize(document)
            .map_err(|e| ManifestError::Document { index, message: format!("not YAML: {e}") })?;
        if value.is_null() {
            continue;
        }
        let changed = match &change {
            Change::Inject => inject_one(index, value, route, injection)?,
            Change::Uninject => uninject_one(index, value)?,
        };
        let text =
            serde_yaml::to_string(&changed).map_err(|e| ManifestError::Document { index, message: e.to_string() })?;
        out.push(text);
    }
    Ok(out.join("---\n"))
}

fn kind_and_name(value: &Value) -> (String, String) {
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or_default().to_string();
    let name = value.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default().to_string();
    (kind, name)
}

/// The pod template inside a document, as typed metadata and spec.
fn read_template(index: usize, value: &Value, pointer: &str) -> Result<Option<PodTemplateSpec>, ManifestError> {
    let Some(template) = value.pointer(pointer) else { return Ok(None) };
    let bad = |e: serde_json::Error| ManifestError::Document { index, message: format!("pod spec: {e}") };
    if pointer.is_empty() {
        let pod: Pod = serde_json::from_value(template.clone()).map_err(bad)?;
        return Ok(Some(PodTemplateSpec { metadata: Some(pod.metadata), spec: pod.spec }));
    }
    serde_json::from_value(template.clone()).map(Some).map_err(bad)
}

/// Applies the difference between two typed templates to the original document at `pointer`.
fn apply_difference(
    index: usize,
    mut value: Value,
    pointer: &str,
    before: &PodTemplateSpec,
    after: &PodTemplateSpec,
) -> Result<Value, ManifestError> {
    let as_value = |t: &PodTemplateSpec| serde_json::to_value(t).unwrap_or_default();
    let patch = json_patch::diff(&as_value(before), &as_value(after));
    let Some(target) = value.pointer_mut(pointer) else { return Ok(value) };
    json_patch::patch(target, &patch).map_err(|e| ManifestError::Document { index, message: format!("patch: {e}") })?;
    Ok(value)
}

fn inject_one(
    index: usize,
    value: Value,
    route: &NotificationRoute,
    injection: &Injection,
) -> Result<Value, ManifestError> {
    let (kind, name) = kind_and_name(&value);
    let Some(pointer) = template_pointer(&kind) else { return Ok(value) };
    let Some(before) = read_template(index, &value, pointer)? else { return Ok(value) };
    let labels = before.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap_or_default();
    // Manifests often leave the namespace to `kubectl apply -n`: then the route's namespace is assumed.
    let route_namespace = route.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let namespace = value.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or(&route_namespace);
    let mut scoped = route.clone();
    scoped.metadata.namespace = Some(route_namespace.clone());
    if !selects(&scoped, namespace, &labels) {
        return Ok(value);
    }
    let mut after = before.clone();
    let mut meta = after.metadata.take().unwrap_or_default();
    let Some(spec) = after.spec.as_mut() else { return Ok(value) };
    inject::inject(&mut meta, spec, injection).map_err(|source| ManifestError::Inject { index, kind, name, source })?;
    after.metadata = Some(meta);
    apply_difference(index, value, pointer, &before, &after)
}

fn uninject_one(index: usize, value: Value) -> Result<Value, ManifestError> {
    let (kind, _) = kind_and_name(&value);
    let Some(pointer) = template_pointer(&kind) else { return Ok(value) };
    let Some(before) = read_template(index, &value, pointer)? else { return Ok(value) };
    let mut after = before.clone();
    let mut meta = after.metadata.take().unwrap_or_default();
    let Some(spec) = after.spec.as_mut() else { return Ok(value) };
    inject::uninject(&mut meta, spec);
    after.metadata = Some(meta);
    apply_difference(index, value, pointer, &before, &after)
}
