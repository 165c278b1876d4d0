//! storerelay-operator: injects the storerelay sidecar into the pods a `NotificationRoute` selects,
//! renders its config, and reports status.

pub mod certs;
pub mod crd;
pub mod inject;
pub mod manifests;
pub mod metrics;
pub mod render;
pub mod select;
pub mod serve;
pub mod webhook;

pub use crd::{NotificationRoute, NotificationRouteSpec, NotificationRouteStatus};

/// The CRD as YAML, exactly as `storerelayctl crd` prints it and the chart ships it.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&NotificationRoute::crd()).unwrap_or_default()
}
