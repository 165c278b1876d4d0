//! The webhook's view of the routes: grouped by namespace, each with its selector parsed and its
//! injection (its revision and its JSON) prepared once per change of the route.
//!
//! Admission is on the path of every pod creation in the cluster. Deciding from the reflector's store
//! meant copying all of its routes (1,000 `Arc`s) and, for the one that matched, rebuilding the
//! injection and hashing it on every review. Here a review looks only at its own namespace's routes,
//! and the work that depends on the route alone is done when the route changes.
//!
//! Kept up to date from the same watch events as the reflector's store (see `run`), with the same
//! `Init` / `InitApply` / `InitDone` buffering, so a relist swaps the whole index at once.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use kube::core::{Selector, SelectorExt};
use kube::runtime::watcher;

use crate::crd::NotificationRoute;
use crate::inject::{self, InjectOptions, PreparedInjection};

/// One route as the webhook needs it.
#[derive(Debug)]
pub struct IndexedRoute {
    pub name: String,
    /// `None` when the selector cannot be read or is empty: the route selects nothing.
    selector: Option<Selector>,
    /// What selected pods get, or why they get nothing (the route's status says why at length).
    pub admission: Result<PreparedInjection, &'static str>,
}

impl IndexedRoute {
    pub fn new(route: &NotificationRoute, options: &InjectOptions) -> IndexedRoute {
        let admission = if inject::image_refusal(route, options).is_some() {
            Err("the route names a sidecar image this installation does not allow")
        } else if crate::status::config_map_not_ours(route) {
            // Mounting it would hand the sidecar someone else's config.
            Err("the route's ConfigMap belongs to someone else (see the route's Ready condition)")
        } else {
            Ok(PreparedInjection::new(&inject::injection(route, options)))
        };
        IndexedRoute {
            name: route.metadata.name.clone().unwrap_or_default(),
            selector: crate::select::pod_selector(route),
            admission,
        }
    }

    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.as_ref().is_some_and(|selector| selector.matches(labels))
    }
}

/// Routes by namespace, then by name (so the routes selecting a pod come out in a stable order).
type ByNamespace = HashMap<String, BTreeMap<String, Arc<IndexedRoute>>>;

pub struct RouteIndex {
    options: InjectOptions,
    state: RwLock<State>,
}

#[derive(Default)]
struct State {
    routes: ByNamespace,
    /// Filled between `Init` and `InitDone` of a (re)list, then swapped in.
    relisting: Option<ByNamespace>,
}

impl RouteIndex {
    pub fn new(options: InjectOptions) -> RouteIndex {
        RouteIndex { options, state: RwLock::new(State::default()) }
    }

    /// Applies one event of the routes' watch, as the reflector's writer does.
    pub fn apply_watcher_event(&self, event: &watcher::Event<NotificationRoute>) {
        // Prepared before taking the lock: reviews never wait for a hash or a serialisation.
        let prepared = match event {
            watcher::Event::Apply(route) | watcher::Event::InitApply(route) => {
                Some(Arc::new(IndexedRoute::new(route, &self.options)))
            }
            _ => None,
        };
        let mut state = self.state.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        match (event, prepared) {
            (watcher::Event::Apply(route), Some(indexed)) => insert(&mut state.routes, route, indexed),
            (watcher::Event::InitApply(route), Some(indexed)) => {
                insert(state.relisting.get_or_insert_with(ByNamespace::default), route, indexed)
            }
            (watcher::Event::Delete(route), _) => {
                let namespace = route.metadata.namespace.as_deref().unwrap_or_default();
                let name = route.metadata.name.as_deref().unwrap_or_default();
                if let Some(routes) = state.routes.get_mut(namespace) {
                    routes.remove(name);
                    if routes.is_empty() {
                        state.routes.remove(namespace);
                    }
                }
            }
            (watcher::Event::Init, _) => state.relisting = Some(ByNamespace::default()),
            (watcher::Event::InitDone, _) => state.routes = state.relisting.take().unwrap_or_default(),
            _ => {}
        }
    }

    /// The routes in `namespace` that select a pod with these labels, by name.
    pub fn selecting(&self, namespace: &str, labels: &BTreeMap<String, String>) -> Vec<Arc<IndexedRoute>> {
        let state = self.state.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        state
            .routes
            .get(namespace)
            .map(|routes| routes.values().filter(|route| route.selects(labels)).cloned().collect())
            .unwrap_or_default()
    }

    /// How many routes the index holds.
    pub fn len(&self) -> usize {
        let state = self.state.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        state.routes.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn insert(routes: &mut ByNamespace, route: &NotificationRoute, indexed: Arc<IndexedRoute>) {
    let namespace = route.metadata.namespace.clone().unwrap_or_default();
    routes.entry(namespace).or_default().insert(indexed.name.clone(), indexed);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, namespace: &str, app: &str) -> NotificationRoute {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "storerelay.dev/v1alpha1", "kind": "NotificationRoute",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"selector": {"matchLabels": {"app": app}}, "destinations": [{"name": "d", "url": "https://d.invalid/"}]}
        }))
        .unwrap()
    }

    fn labels(app: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("app".to_string(), app.to_string())])
    }

    fn names(routes: &[Arc<IndexedRoute>]) -> Vec<&str> {
        routes.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn selects_within_the_namespace_by_name_and_follows_changes_and_deletes() {
        let index = RouteIndex::new(InjectOptions::default());
        for r in [route("b", "shop", "pay"), route("a", "shop", "pay"), route("c", "other", "pay")] {
            index.apply_watcher_event(&watcher::Event::Apply(r));
        }
        assert_eq!(names(&index.selecting("shop", &labels("pay"))), ["a", "b"]);
        assert_eq!(names(&index.selecting("other", &labels("pay"))), ["c"]);
        assert!(index.selecting("shop", &labels("cart")).is_empty());
        assert!(index.selecting("nowhere", &labels("pay")).is_empty());

        index.apply_watcher_event(&watcher::Event::Apply(route("b", "shop", "cart")));
        assert_eq!(names(&index.selecting("shop", &labels("pay"))), ["a"]);
        assert_eq!(names(&index.selecting("shop", &labels("cart"))), ["b"]);
        index.apply_watcher_event(&watcher::Event::Delete(route("a", "shop", "pay")));
        assert!(index.selecting("shop", &labels("pay")).is_empty());
        assert_eq!(index.len(), 2);
    }

    #[test]
    fn a_relist_replaces_everything_at_once_when_it_is_done() {
        let index = RouteIndex::new(InjectOptions::default());
        index.apply_watcher_event(&watcher::Event::Apply(route("gone", "shop", "pay")));
        index.apply_watcher_event(&watcher::Event::Init);
        index.apply_watcher_event(&watcher::Event::InitApply(route("new", "shop", "pay")));
        assert_eq!(names(&index.selecting("shop", &labels("pay"))), ["gone"], "the old view until InitDone");
        index.apply_watcher_event(&watcher::Event::InitDone);
        assert_eq!(names(&index.selecting("shop", &labels("pay"))), ["new"]);
    }

    #[test]
    fn the_injection_is_prepared_once_with_the_same_revision_as_the_pure_one() {
        let options = InjectOptions::default();
        let payments = route("payments", "shop", "pay");
        let indexed = IndexedRoute::new(&payments, &options);
        let prepared = indexed.admission.as_ref().expect("injectable");
        let pure = inject::injection(&payments, &options);
        assert_eq!((&prepared.route, &prepared.revision), (&pure.route, &pure.revision));

        let mut foreign = payments.clone();
        foreign.spec.sidecar = Some(serde_json::from_value(serde_json::json!({"image": "evil/miner:1"})).unwrap());
        assert!(IndexedRoute::new(&foreign, &options).admission.is_err());
        let mut empty = payments;
        empty.spec.selector = Default::default();
        assert!(!IndexedRoute::new(&empty, &options).selects(&labels("pay")), "an empty selector selects nothing");
    }
}
