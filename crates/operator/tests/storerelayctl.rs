//! storerelayctl as a user runs it.

use std::io::Write;
use std::process::{Command, Stdio};

fn ctl(args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_storerelayctl"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn inject_reads_stdin_and_twice_is_once() {
    let input = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/input.yaml")).unwrap();
    let once = ctl(&["inject", "--route", "tests/golden/route.yaml"], &input);
    assert!(once.status.success(), "{}", String::from_utf8_lossy(&once.stderr));
    let once = String::from_utf8(once.stdout).unwrap();
    assert!(once.contains("storerelay.dev/injected: payments@"));
    let twice = ctl(&["inject", "--route", "tests/golden/route.yaml", "-f", "-"], &once);
    assert_eq!(String::from_utf8(twice.stdout).unwrap(), once);
    let back = ctl(&["uninject", "--route", "tests/golden/route.yaml"], &once);
    assert!(!String::from_utf8(back.stdout).unwrap().contains("storerelay.dev/injected"));
}

#[test]
fn errors_name_the_file() {
    let missing = ctl(&["render-config", "--route", "tests/golden/nope.yaml"], "");
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("tests/golden/nope.yaml"));
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("route.yaml");
    std::fs::write(
        &bad,
        "apiVersion: storerelay.dev/v1alpha1\nkind: NotificationRoute\nmetadata: {name: r, namespace: n}\nspec:\n  selector: {matchLabels: {a: b}}\n  destinations: [{name: d, url: 'https://d.invalid/', retry: {maxAge: forever}}]\n",
    )
    .unwrap();
    let out = ctl(&["render-config", "--route", bad.to_str().unwrap()], "");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("spec.destinations[0].retry.maxAge"), "{out:?}");
    let port_clash = ctl(
        &["inject", "--route", "tests/golden/route.yaml"],
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: shop, labels: {app: payments}}\nspec: {containers: [{name: a, image: i, ports: [{containerPort: 9089}]}]}\n",
    );
    assert_eq!(port_clash.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&port_clash.stderr).contains("port 9089"));
}

#[test]
fn the_route_is_taken_out_of_a_file_that_holds_other_documents_too() {
    // The example puts the Secret the route names before the route, as a user would apply them.
    let app =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/examples/sample-app.yaml")).unwrap();
    let out = ctl(&["inject", "--route", "../../deploy/examples/revenuecat-proxy.yaml"], &app);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8(out.stdout).unwrap().contains("storerelay.dev/injected: payments@"));
    let rendered = ctl(&["render-config", "--route", "../../deploy/examples/revenuecat-proxy.yaml"], "");
    assert!(rendered.status.success(), "{}", String::from_utf8_lossy(&rendered.stderr));

    let dir = tempfile::tempdir().unwrap();
    let secret_only = dir.path().join("secret.yaml");
    std::fs::write(&secret_only, "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n").unwrap();
    let none = ctl(&["render-config", "--route", secret_only.to_str().unwrap()], "");
    assert_eq!(none.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&none.stderr).contains("holds 0 NotificationRoutes"), "{none:?}");
    let route = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/route.yaml")).unwrap();
    let two = dir.path().join("two.yaml");
    std::fs::write(&two, format!("{route}\n---\n{route}")).unwrap();
    let both = ctl(&["render-config", "--route", two.to_str().unwrap()], "");
    assert!(String::from_utf8_lossy(&both.stderr).contains("holds 2 NotificationRoutes"), "{both:?}");
}

#[test]
fn crd_prints_the_crd() {
    let out = ctl(&["crd"], "");
    assert!(String::from_utf8(out.stdout).unwrap().contains("\"name\": \"notificationroutes.storerelay.dev\""));
}
