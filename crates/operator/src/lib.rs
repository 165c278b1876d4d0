//! storerelay-operator: injects the storerelay sidecar into the pods a `NotificationRoute` selects,
//! renders its config, and reports status.

pub mod certs;
pub mod controller;
pub mod crd;
pub mod ctl;
pub mod events;
pub mod inject;
pub mod leader;
pub mod manifests;
pub mod metrics;
pub mod render;
pub mod restarts;
pub mod route_index;
pub mod run;
pub mod select;
pub mod serve;
pub mod status;
pub mod webhook;
pub mod webhook_config;
pub mod yaml11;

pub use crd::{NotificationRoute, NotificationRouteSpec, NotificationRouteStatus};

/// The CRD as YAML, exactly as `storerelayctl crd` prints it and the chart ships it.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    yaml11::to_string(&serde_json::to_value(NotificationRoute::crd()).unwrap_or_default())
}
