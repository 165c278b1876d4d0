//! The CRD's CEL rules, evaluated locally with kube's CEL support (the real API server tier checks
//! them again against kube-apiserver).

use serde_json::{Value, json};
use storerelay_operator::crd::{DestinationSpec, NotificationRouteSpec};

fn spec(destinations: Value) -> Value {
    json!({
        "selector": {"matchLabels": {"app": "payments"}},
        "listen": {"port": 8089, "adminPort": 9089, "paths": ["/apple/notifications"]},
        "destinations": destinations
    })
}

fn messages(result: Result<(), impl std::fmt::Debug>) -> String {
    match result {
        Ok(()) => String::new(),
        Err(errors) => format!("{errors:?}"),
    }
}

#[test]
fn a_valid_spec_passes() {
    let valid = spec(json!([{"name": "revenuecat", "urlFrom": {"secretKeyRef": {"name": "rc", "key": "url"}}}]));
    assert_eq!(messages(NotificationRouteSpec::validate_cel(&valid, None)), "");
}

#[test]
fn destination_names_must_be_unique() {
    let twice = spec(json!([{"name": "a", "url": "https://a.invalid/"}, {"name": "a", "url": "https://b.invalid/"}]));
    assert!(messages(NotificationRouteSpec::validate_cel(&twice, None)).contains("destination names must be unique"));
}

#[test]
fn ports_must_not_collide() {
    let mut same = spec(json!([{"name": "a", "url": "https://a.invalid/"}]));
    same["upstream"] = json!({"port": 8089});
    assert!(
        messages(NotificationRouteSpec::validate_cel(&same, None))
            .contains("upstream.port must differ from listen.port")
    );
    let mut admin = spec(json!([{"name": "a", "url": "https://a.invalid/"}]));
    admin["listen"]["adminPort"] = json!(8089);
    assert!(messages(NotificationRouteSpec::validate_cel(&admin, None)).contains("listen.adminPort"));
}

#[test]
fn exactly_one_of_url_and_url_from() {
    let both =
        json!({"name": "a", "url": "https://a.invalid/", "urlFrom": {"secretKeyRef": {"name": "s", "key": "k"}}});
    assert!(messages(DestinationSpec::validate_cel(&both, None)).contains("exactly one of url and urlFrom"));
    let neither = json!({"name": "a"});
    assert!(messages(DestinationSpec::validate_cel(&neither, None)).contains("exactly one of url and urlFrom"));
    let one = json!({"name": "a", "url": "https://a.invalid/"});
    assert_eq!(messages(DestinationSpec::validate_cel(&one, None)), "");
}

#[test]
fn an_empty_selector_is_refused() {
    let mut empty = spec(json!([{"name": "a", "url": "https://a.invalid/"}]));
    empty["selector"] = json!({});
    assert!(messages(NotificationRouteSpec::validate_cel(&empty, None)).contains("selector must not be empty"));
    let mut no_destinations = spec(json!([]));
    no_destinations["selector"] = json!({"matchExpressions": [{"key": "app", "operator": "Exists"}]});
    assert!(messages(NotificationRouteSpec::validate_cel(&no_destinations, None)).contains("at least one destination"));
}
