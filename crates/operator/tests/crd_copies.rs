//! The CRD committed for Helm and for plain manifests is exactly what the Rust types generate.

use std::path::PathBuf;

#[test]
fn committed_crds_equal_the_generated_one() {
    let generated = storerelay_operator::crd_yaml();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    for copy in [
        "deploy/crds/notificationroutes.storerelay.dev.yaml",
        "charts/storerelay/crds/notificationroutes.storerelay.dev.yaml",
    ] {
        let committed = std::fs::read_to_string(root.join(copy)).unwrap_or_else(|e| panic!("{copy}: {e}"));
        assert!(committed == generated, "{copy} is stale: run `make crds` (storerelayctl crd > {copy})");
    }
}

#[test]
fn the_crd_carries_the_printer_columns_and_cel_rules() {
    let crd: serde_json::Value = serde_yaml::from_str(&storerelay_operator::crd_yaml()).unwrap();
    let version = &crd["spec"]["versions"][0];
    let columns: Vec<&str> =
        version["additionalPrinterColumns"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(columns, ["Ready", "Matched", "Injected", "Outdated", "Missing", "Age"]);
    assert_eq!(crd["spec"]["names"]["shortNames"][0], "nroute");
    assert!(version["subresources"]["status"].is_object());
    let text = serde_json::to_string(&crd).unwrap();
    for rule in [
        "has(self.url) != has(self.urlFrom)",
        "exists_one(e, e.name == d.name)",
        "self.listen.port != self.listen.adminPort",
    ] {
        assert!(text.contains(rule), "missing CEL rule {rule}");
    }
}
