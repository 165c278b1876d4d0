//! Golden files: a route and manifests in, the injected manifests out. `UPDATE_GOLDEN=1 cargo test`
//! rewrites `expected.yaml`; review the diff like any other code change.

use std::path::PathBuf;

use storerelay_operator::NotificationRoute;
use storerelay_operator::inject::{InjectOptions, injection};
use storerelay_operator::manifests::{inject_documents, uninject_documents};

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name)
}

fn setup() -> (NotificationRoute, storerelay_operator::inject::Injection, String) {
    let route: NotificationRoute =
        serde_yaml::from_str(&std::fs::read_to_string(golden("route.yaml")).unwrap()).unwrap();
    let options = InjectOptions { image: "storerelay/storerelay-sidecar:test".into(), ..InjectOptions::default() };
    let injection = injection(&route, &options);
    (route, injection, std::fs::read_to_string(golden("input.yaml")).unwrap())
}

#[test]
fn injected_manifests_match_the_golden_file() {
    let (route, injection, input) = setup();
    let output = inject_documents(&input, &route, &injection).unwrap();
    let expected_path = golden("expected.yaml");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&expected_path, &output).unwrap();
    }
    let expected = std::fs::read_to_string(&expected_path).unwrap();
    assert_eq!(output, expected, "rerun with UPDATE_GOLDEN=1 and review the diff if the change is intended");
}

#[test]
fn injecting_twice_changes_nothing_and_uninject_reverses_it() {
    let (route, injection, input) = setup();
    let once = inject_documents(&input, &route, &injection).unwrap();
    let twice = inject_documents(&once, &route, &injection).unwrap();
    assert_eq!(once, twice);
    let back = uninject_documents(&once, &route, &injection).unwrap();
    // The original, as this tool prints YAML.
    let normalized = uninject_documents(&input, &route, &injection).unwrap();
    assert_eq!(back, normalized);
    assert!(!back.contains("storerelay-sidecar"));
}

#[test]
fn only_selected_templates_in_the_routes_namespace_change() {
    let (route, injection, input) = setup();
    let output = inject_documents(&input, &route, &injection).unwrap();
    let documents: Vec<serde_json::Value> =
        serde_yaml::Deserializer::from_str(&output).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect();
    let has_sidecar = |v: &serde_json::Value| v.to_string().contains("\"name\":\"storerelay\"");
    let summary: Vec<(String, bool)> = documents
        .iter()
        .map(|d| {
            (
                format!("{}/{}", d["kind"].as_str().unwrap(), d["metadata"]["namespace"].as_str().unwrap_or("-")),
                has_sidecar(d),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("Deployment/shop".to_string(), true),
            ("Service/shop".to_string(), false),
            ("StatefulSet/shop".to_string(), false),
            ("CronJob/-".to_string(), true),
            ("Pod/-".to_string(), false),
            ("Deployment/other".to_string(), false),
        ]
    );
    // A field this tool does not know is kept.
    assert_eq!(documents[0]["spec"]["template"]["spec"]["containers"][0]["futureField"], "kept as is");
    // The user's init container stays first; the sidecar comes after it.
    let init = documents[0]["spec"]["template"]["spec"]["initContainers"].as_array().unwrap();
    assert_eq!(init.iter().map(|c| c["name"].as_str().unwrap()).collect::<Vec<_>>(), ["migrate", "storerelay"]);
}
