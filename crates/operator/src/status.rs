//! A route's status from what the caches hold: pod counts, the workloads to restart, and conditions.
//! Pure functions, so every rule is tested without an API server.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::core::{PartialObjectMeta, SelectorExt};

use crate::crd::{NotificationRoute, RolloutPolicy};
use crate::inject::{injected_as, opted_out};
use crate::select::{pod_selector, routes_for};

pub const READY: &str = "Ready";
pub const DEGRADED: &str = "Degraded";
pub const SECRETS_RESOLVED: &str = "SecretsResolved";
pub const SELECTOR_CONFLICT: &str = "SelectorConflict";
pub const SPOOL_SHARED: &str = "SpoolShared";
/// The `SpoolShared` reason that deserves a warning: several pods, each with its own SQLite spool.
const POD_LOCAL_WITH_REPLICAS: &str = "PodLocalSpoolWithReplicas";

/// A workload that owns pods, as `Kind/name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Workload {
    pub kind: String,
    pub name: String,
}

impl Workload {
    /// The kind to restart it as, if it is one that `RestartWorkloads` restarts.
    pub fn restartable(&self) -> Option<RestartableKind> {
        RestartableKind::of(&self.kind)
    }
}

/// The workloads `rollout.policy: RestartWorkloads` restarts: those that recreate their pods from a
/// template on a template change. Bare Pods, ReplicaSets and Jobs never are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartableKind {
    Deployment,
    StatefulSet,
    DaemonSet,
}

impl RestartableKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RestartableKind::Deployment => "Deployment",
            RestartableKind::StatefulSet => "StatefulSet",
            RestartableKind::DaemonSet => "DaemonSet",
        }
    }

    pub fn of(kind: &str) -> Option<RestartableKind> {
        match kind {
            "Deployment" => Some(RestartableKind::Deployment),
            "StatefulSet" => Some(RestartableKind::StatefulSet),
            "DaemonSet" => Some(RestartableKind::DaemonSet),
            _ => None,
        }
    }
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

/// The workload a pod belongs to, from its controller owner reference. A ReplicaSet's pods belong to
/// its Deployment, whose name is the ReplicaSet's without the `pod-template-hash` suffix.
pub fn workload_of(meta: &ObjectMeta) -> Workload {
    let owner = meta.owner_references.iter().flatten().find(|o| o.controller == Some(true));
    match owner {
        Some(owner) if owner.kind == "ReplicaSet" => {
            let hash = meta.labels.as_ref().and_then(|l| l.get("pod-template-hash"));
            match hash.and_then(|h| owner.name.strip_suffix(&format!("-{h}"))) {
                Some(deployment) => Workload { kind: "Deployment".into(), name: deployment.into() },
                None => Workload { kind: "ReplicaSet".into(), name: owner.name.clone() },
            }
        }
        Some(owner) => Workload { kind: owner.kind.clone(), name: owner.name.clone() },
        None => Workload { kind: "Pod".into(), name: meta.name.clone().unwrap_or_default() },
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodCounts {
    /// Pods the route selects (opted-out and terminating pods excluded).
    pub matched: i32,
    /// Of those, carrying this route's sidecar (any revision).
    pub injected: i32,
    /// Injected with an older revision.
    pub outdated: i32,
    /// Selected by this route alone but without the sidecar.
    pub missing: i32,
    /// Pods that other routes select too (nothing is injected into them).
    pub conflicts: Vec<String>,
    /// Workloads with outdated or missing pods.
    pub workloads: BTreeSet<Workload>,
}

pub fn count_pods<'a>(
    route: &NotificationRoute,
    revision: &str,
    pods: impl IntoIterator<Item = &'a PartialObjectMeta<Pod>>,
    routes: &[&NotificationRoute],
) -> PodCounts {
    // Runs for every route against every cached pod: nothing here may allocate per pod it skips.
    static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();
    let route_name = route.metadata.name.clone().unwrap_or_default();
    let namespace = route.metadata.namespace.clone().unwrap_or_default();
    let mut counts = PodCounts::default();
    let Some(selector) = pod_selector(route) else {
        return counts;
    };
    for pod in pods {
        let meta = &pod.metadata;
        let labels = meta.labels.as_ref().unwrap_or(&NO_LABELS);
        if meta.namespace.as_deref() != Some(namespace.as_str())
            || meta.deletion_timestamp.is_some()
            || !selector.matches(labels)
        {
            continue;
        }
        if opted_out(meta) {
            continue;
        }
        counts.matched += 1;
        match injected_as(meta) {
            Some((injected_route, injected_revision)) if injected_route == route_name => {
                counts.injected += 1;
                if injected_revision != revision {
                    counts.outdated += 1;
                    counts.workloads.insert(workload_of(meta));
                }
            }
            Some(_) => {}
            None if routes_for(routes.iter().copied(), &namespace, labels).len() > 1 => {
                counts.conflicts.push(meta.name.clone().unwrap_or_default());
            }
            None => {
                counts.missing += 1;
                counts.workloads.insert(workload_of(meta));
            }
        }
    }
    counts.conflicts.sort();
    counts
}

/// What the secret check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretsCheck {
    Resolved,
    Missing(Vec<String>),
    /// The operator may not read Secrets.
    NotChecked,
}

/// Why the route's ConfigMap (`<route>-storerelay`) was not written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigMapProblem {
    /// A ConfigMap of that name exists that the operator did not create for this route: it is never
    /// taken over, and pods are not injected to mount it.
    NotOurs(String),
    /// The operator may not write ConfigMaps in the route's namespace (chart value rbac.routeNamespaces).
    Forbidden(String),
}

/// The Ready reason of a route whose ConfigMap name is taken by someone else's ConfigMap.
pub const CONFIG_MAP_NOT_OWNED: &str = "ConfigMapNotOwned";

impl ConfigMapProblem {
    pub fn reason(&self) -> &'static str {
        match self {
            ConfigMapProblem::NotOurs(_) => CONFIG_MAP_NOT_OWNED,
            ConfigMapProblem::Forbidden(_) => "ConfigMapForbidden",
        }
    }

    pub fn message(&self) -> &str {
        match self {
            ConfigMapProblem::NotOurs(message) | ConfigMapProblem::Forbidden(message) => message,
        }
    }
}

/// Whether the route's last status says its ConfigMap name belongs to someone else's ConfigMap.
pub fn config_map_not_ours(route: &NotificationRoute) -> bool {
    route
        .status
        .as_ref()
        .is_some_and(|status| status.conditions.iter().any(|c| c.type_ == READY && c.reason == CONFIG_MAP_NOT_OWNED))
}

/// Everything the conditions are derived from.
pub struct Facts<'a> {
    pub generation: Option<i64>,
    pub render_error: Option<&'a str>,
    pub config_map: Option<&'a ConfigMapProblem>,
    pub secrets: &'a SecretsCheck,
    pub counts: &'a PodCounts,
    pub policy: RolloutPolicy,
    /// Whether the operator may restart workloads (a chart value); without it RestartWorkloads acts as Manual.
    pub restarts_allowed: bool,
    /// Whether the route's spool is the shared PostgreSQL queue (`spec.spool.postgres`).
    pub shared_spool: bool,
}

fn condition(type_: &str, status: bool, reason: &str, message: String, generation: Option<i64>) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: Time(Timestamp::now()),
    }
}

pub fn conditions(facts: &Facts<'_>) -> Vec<Condition> {
    let g = facts.generation;
    let counts = facts.counts;
    let workloads: Vec<String> = counts.workloads.iter().map(ToString::to_string).collect();
    // What keeps the route's config from the pods: its spec, or its ConfigMap.
    let blocked = facts
        .render_error
        .map(|error| ("InvalidSpec", error.to_string()))
        .or_else(|| facts.config_map.map(|problem| (problem.reason(), problem.message().to_string())));
    let ready = match &blocked {
        Some((reason, message)) => condition(READY, false, reason, message.clone(), g),
        None if !counts.conflicts.is_empty() => condition(
            READY,
            false,
            "SelectorConflict",
            format!("pods selected by other routes too, none injected: {}", counts.conflicts.join(", ")),
            g,
        ),
        None if counts.missing > 0 || counts.outdated > 0 => {
            let automatic = facts.policy == RolloutPolicy::RestartWorkloads && facts.restarts_allowed;
            let what = format!("{} pods missing the sidecar, {} outdated", counts.missing, counts.outdated);
            let message = if automatic {
                format!("{what}; restarting {}", workloads.join(", "))
            } else if facts.policy == RolloutPolicy::RestartWorkloads {
                format!(
                    "{what}; the operator may not restart workloads (chart value rbac.restartWorkloads), restart {}",
                    workloads.join(", ")
                )
            } else {
                format!("{what}; restart {}", workloads.join(", "))
            };
            let reason = if counts.missing > 0 { "PodsMissingSidecar" } else { "PodsOutdated" };
            condition(READY, false, reason, message, g)
        }
        None => condition(
            READY,
            true,
            "Injected",
            format!(
                "config rendered; {} of {} selected pods carry the current sidecar",
                counts.injected, counts.matched
            ),
            g,
        ),
    };
    let degraded = match (blocked, facts.secrets) {
        (Some((reason, message)), _) => condition(DEGRADED, true, reason, message, g),
        (None, SecretsCheck::Missing(missing)) => {
            condition(DEGRADED, true, "SecretsMissing", format!("missing: {}", missing.join(", ")), g)
        }
        _ => condition(DEGRADED, false, "AsExpected", "no problem found".into(), g),
    };
    let secrets = match facts.secrets {
        SecretsCheck::Resolved => condition(SECRETS_RESOLVED, true, "Found", "every referenced Secret key and ConfigMap key exists".into(), g),
        SecretsCheck::Missing(missing) => condition(SECRETS_RESOLVED, false, "Missing", format!("missing: {}", missing.join(", ")), g),
        SecretsCheck::NotChecked => Condition {
            status: "Unknown".into(),
            ..condition(
                SECRETS_RESOLVED,
                false,
                "NotChecked",
                "the operator may not read Secrets (chart value rbac.checkSecrets grants get); the sidecar reports missing files in its log, metrics and /readyz".into(),
                g,
            )
        },
    };
    let conflict = if counts.conflicts.is_empty() {
        condition(SELECTOR_CONFLICT, false, "NoConflict", "no selected pod is selected by another route".into(), g)
    } else {
        condition(
            SELECTOR_CONFLICT,
            true,
            "SelectorConflict",
            format!("also selected by another route: {}", counts.conflicts.join(", ")),
            g,
        )
    };
    vec![ready, degraded, secrets, conflict, spool_shared(facts.shared_spool, counts.matched, g)]
}

/// Whether what the pods acknowledge survives their deletion, and Apple's retries are recognised on
/// every pod: only with the shared queue.
fn spool_shared(shared: bool, pods: i32, g: Option<i64>) -> Condition {
    const FIX: &str = "set spec.spool.postgres to share one queue (docs/operator.md, \"Choosing a spool\")";
    if shared {
        return condition(
            SPOOL_SHARED,
            true,
            "Postgres",
            "every selected pod uses the shared PostgreSQL queue: a deleted pod's pending notifications are delivered by the others".into(),
            g,
        );
    }
    if pods > 1 {
        return condition(
            SPOOL_SHARED,
            false,
            POD_LOCAL_WITH_REPLICAS,
            format!(
                "{pods} selected pods each keep their own SQLite spool: Apple's retries that reach another pod are mirrored again (not de-duplicated), and a deleted pod's undelivered notifications are lost with it; {FIX}"
            ),
            g,
        );
    }
    condition(
        SPOOL_SHARED,
        false,
        "PodLocalSpool",
        format!(
            "the spool is a SQLite file in the pod's emptyDir: what is pending when the pod is deleted is lost; {FIX}"
        ),
        g,
    )
}

/// Keeps `lastTransitionTime` of conditions whose status did not change, as Kubernetes expects.
pub fn carry_transition_times(new: &mut [Condition], old: &[Condition]) {
    for condition in new {
        if let Some(previous) = old.iter().find(|o| o.type_ == condition.type_ && o.status == condition.status) {
            condition.last_transition_time = previous.last_transition_time.clone();
        }
    }
}

/// Conditions whose status or reason changed: each becomes an Event.
pub fn changed<'a>(new: &'a [Condition], old: &[Condition]) -> Vec<&'a Condition> {
    new.iter()
        .filter(|c| !old.iter().any(|o| o.type_ == c.type_ && o.status == c.status && o.reason == c.reason))
        .collect()
}

/// Whether a condition in this state deserves a Warning event rather than a Normal one.
pub fn is_warning(condition: &Condition) -> bool {
    matches!(
        (condition.type_.as_str(), condition.status.as_str()),
        (READY, "False") | (DEGRADED, "True") | (SECRETS_RESOLVED, "False") | (SELECTOR_CONFLICT, "True")
    ) || (condition.type_ == SPOOL_SHARED && condition.reason == POD_LOCAL_WITH_REPLICAS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    use std::collections::BTreeMap;

    fn route(name: &str, app: &str) -> NotificationRoute {
        serde_yaml::from_str(&format!(
            "apiVersion: storerelay.dev/v1alpha1\nkind: NotificationRoute\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{app: {app}}}}}\n  destinations: [{{name: d, url: 'https://d.invalid/'}}]\n"
        ))
        .unwrap()
    }

    fn pod(
        name: &str,
        labels: &[(&str, &str)],
        annotation: Option<&str>,
        owner: Option<(&str, &str)>,
    ) -> PartialObjectMeta<Pod> {
        let mut labels: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        labels.insert("pod-template-hash".into(), "7d9f".into());
        PartialObjectMeta {
            types: None,
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                labels: Some(labels),
                annotations: annotation
                    .map(|a| BTreeMap::from([("storerelay.dev/injected".to_string(), a.to_string())])),
                owner_references: owner.map(|(kind, name)| {
                    vec![OwnerReference {
                        kind: kind.into(),
                        name: name.into(),
                        controller: Some(true),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            },
            _phantom: Default::default(),
        }
    }

    #[test]
    fn counts_injected_outdated_missing_and_conflicts() {
        let payments = route("payments", "payments");
        let web = route("web", "web");
        let pods = vec![
            pod("a", &[("app", "payments")], Some("payments@rev2"), Some(("ReplicaSet", "payments-7d9f"))),
            pod("b", &[("app", "payments")], Some("payments@rev1"), Some(("ReplicaSet", "payments-7d9f"))),
            pod("c", &[("app", "payments")], None, Some(("StatefulSet", "ledger"))),
            pod("d", &[("app", "cart")], None, None),
        ];
        let counts = count_pods(&payments, "rev2", &pods, &[&payments, &web]);
        assert_eq!((counts.matched, counts.injected, counts.outdated, counts.missing), (3, 2, 1, 1));
        let workloads: Vec<String> = counts.workloads.iter().map(ToString::to_string).collect();
        assert_eq!(workloads, ["Deployment/payments", "StatefulSet/ledger"]);

        let mut both = pod("e", &[("app", "payments")], None, None);
        both.metadata.labels.as_mut().unwrap().insert("app".into(), "payments".into());
        let overlapping = route("overlap", "payments");
        let counts = count_pods(&payments, "rev2", &[both], &[&payments, &overlapping]);
        assert_eq!((counts.matched, counts.missing, counts.conflicts.clone()), (1, 0, vec!["e".to_string()]));
    }

    #[test]
    fn workloads_are_found_from_owner_references() {
        let deployment = pod("p", &[], None, Some(("ReplicaSet", "payments-7d9f")));
        assert_eq!(workload_of(&deployment.metadata).to_string(), "Deployment/payments");
        assert_eq!(workload_of(&deployment.metadata).restartable(), Some(RestartableKind::Deployment));
        let job = pod("p", &[], None, Some(("Job", "nightly")));
        assert_eq!(workload_of(&job.metadata).restartable(), None);
        let bare = pod("bare", &[], None, None);
        assert_eq!(workload_of(&bare.metadata).to_string(), "Pod/bare");
    }

    #[test]
    fn conditions_say_what_to_do() {
        let mut counts = PodCounts { matched: 2, injected: 1, missing: 1, ..Default::default() };
        counts.workloads.insert(Workload { kind: "Deployment".into(), name: "payments".into() });
        let facts = Facts {
            generation: Some(3),
            render_error: None,
            config_map: None,
            secrets: &SecretsCheck::NotChecked,
            counts: &counts,
            policy: RolloutPolicy::Manual,
            restarts_allowed: false,
            shared_spool: false,
        };
        let conditions = conditions(&facts);
        let ready = &conditions[0];
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "PodsMissingSidecar"));
        assert!(ready.message.contains("restart Deployment/payments"), "{}", ready.message);
        assert_eq!(ready.observed_generation, Some(3));
        assert_eq!(conditions[2].status, "Unknown");
        assert!(is_warning(ready));

        let healthy = PodCounts { matched: 2, injected: 2, ..Default::default() };
        let facts = Facts { counts: &healthy, secrets: &SecretsCheck::Resolved, ..facts };
        let next = self::conditions(&facts);
        assert_eq!(next[0].status, "True");
        let events = changed(&next, &conditions);
        assert_eq!(events.iter().map(|c| c.type_.as_str()).collect::<Vec<_>>(), [READY, SECRETS_RESOLVED]);
        assert!(changed(&next, &next).is_empty());

        // Someone else's ConfigMap under the route's name: not ready, degraded, and said so.
        let taken = ConfigMapProblem::NotOurs("ConfigMap shop/payments-storerelay exists and is not ours".into());
        let facts = Facts { config_map: Some(&taken), ..facts };
        let blocked = self::conditions(&facts);
        assert_eq!((blocked[0].status.as_str(), blocked[0].reason.as_str()), ("False", CONFIG_MAP_NOT_OWNED));
        assert_eq!((blocked[1].status.as_str(), blocked[1].reason.as_str()), ("True", CONFIG_MAP_NOT_OWNED));
        assert!(blocked[0].message.contains("is not ours"));
        let mut route = NotificationRoute::new(
            "payments",
            serde_json::from_value(serde_json::json!({
                "selector": {"matchLabels": {"app": "payments"}},
                "destinations": [{"name": "rc", "url": "https://example.invalid/"}]
            }))
            .unwrap(),
        );
        assert!(!config_map_not_ours(&route));
        route.status = Some(crate::crd::NotificationRouteStatus { conditions: blocked, ..Default::default() });
        assert!(config_map_not_ours(&route));
    }

    #[test]
    fn several_pods_on_pod_local_spools_are_warned_about_and_a_shared_queue_is_not() {
        let spool = |shared: bool, matched: i32| {
            let counts = PodCounts { matched, injected: matched, ..Default::default() };
            let facts = Facts {
                generation: Some(1),
                render_error: None,
                config_map: None,
                secrets: &SecretsCheck::Resolved,
                counts: &counts,
                policy: RolloutPolicy::Manual,
                restarts_allowed: false,
                shared_spool: shared,
            };
            conditions(&facts).into_iter().find(|c| c.type_ == SPOOL_SHARED).unwrap()
        };
        let replicas = spool(false, 3);
        assert_eq!((replicas.status.as_str(), replicas.reason.as_str()), ("False", "PodLocalSpoolWithReplicas"));
        assert!(replicas.message.contains("3 selected pods") && replicas.message.contains("not de-duplicated"));
        assert!(replicas.message.contains("spec.spool.postgres"), "says what to do: {}", replicas.message);
        assert!(is_warning(&replicas));
        let single = spool(false, 1);
        assert_eq!((single.status.as_str(), single.reason.as_str()), ("False", "PodLocalSpool"));
        assert!(!is_warning(&single), "one pod on SQLite is the documented default, not a warning");
        let shared = spool(true, 3);
        assert_eq!((shared.status.as_str(), shared.reason.as_str()), ("True", "Postgres"));
        assert!(!is_warning(&shared));
    }
}
