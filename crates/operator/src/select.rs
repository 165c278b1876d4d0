//! Which routes select a pod: same namespace, and the route's label selector matches the pod's labels.

use std::collections::BTreeMap;

use kube::core::{Selector, SelectorExt};

use crate::crd::NotificationRoute;

/// Whether `route` selects a pod with these labels in `namespace`. A selector that cannot be read
/// selects nothing (the schema forbids empty selectors, and an unreadable one must not match all).
pub fn selects(route: &NotificationRoute, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
    if route.metadata.namespace.as_deref() != Some(namespace) {
        return false;
    }
    pod_selector(route).is_some_and(|selector| selector.matches(labels))
}

/// The route's label selector, parsed; `None` when it cannot be read or is empty (it selects nothing).
/// Parse it once when matching one route against many pods.
pub fn pod_selector(route: &NotificationRoute) -> Option<Selector> {
    Selector::try_from(route.spec.selector.clone()).ok().filter(|selector| !selector.selects_all())
}

/// The routes among `routes` that select the pod, by name for a stable order.
pub fn routes_for<'a, R>(routes: R, namespace: &str, labels: &BTreeMap<String, String>) -> Vec<&'a NotificationRoute>
where
    R: IntoIterator<Item = &'a NotificationRoute>,
{
    let mut selected: Vec<&NotificationRoute> = routes.into_iter().filter(|r| selects(r, namespace, labels)).collect();
    selected.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    selected
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::match_labels;

    fn route(
        name: &str,
        namespace: &str,
        selector: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    ) -> NotificationRoute {
        let mut route: NotificationRoute = serde_yaml::from_str(
            "apiVersion: storerelay.dev/v1alpha1\nkind: NotificationRoute\nmetadata: {name: x}\nspec:\n  selector: {matchLabels: {a: b}}\n  destinations: [{name: d, url: 'https://d.invalid/'}]\n",
        )
        .unwrap();
        route.metadata.name = Some(name.into());
        route.metadata.namespace = Some(namespace.into());
        route.spec.selector = selector;
        route
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn matches_labels_and_expressions_in_the_same_namespace_only() {
        let payments = route("payments", "shop", match_labels(&[("app", "payments")]));
        assert!(selects(&payments, "shop", &labels(&[("app", "payments"), ("tier", "web")])));
        assert!(!selects(&payments, "other", &labels(&[("app", "payments")])));
        assert!(!selects(&payments, "shop", &labels(&[("app", "cart")])));

        let expressions: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector =
            serde_yaml::from_str("matchExpressions: [{key: app, operator: In, values: [payments, billing]}]").unwrap();
        let either = route("either", "shop", expressions);
        assert!(selects(&either, "shop", &labels(&[("app", "billing")])));
        let empty = route("empty", "shop", Default::default());
        assert!(!selects(&empty, "shop", &labels(&[("app", "payments")])), "an empty selector selects nothing");

        let routes = [either.clone(), payments.clone()];
        let found = routes_for(routes.iter(), "shop", &labels(&[("app", "payments")]));
        assert_eq!(
            found.iter().map(|r| r.metadata.name.as_deref().unwrap()).collect::<Vec<_>>(),
            ["either", "payments"]
        );
    }
}
