"""The Helm chart and the plain manifests, checked with the real helm and Kubernetes' own schemas."""

import base64
import os
import pathlib
import re
import subprocess

import kubernetes_validate
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "storerelay"
HELM = os.environ["HELM"]
STORERELAYCTL = os.environ["STORERELAYCTL"]
RELEASE, NAMESPACE = "storerelay", "storerelay"
# The minor versions the operator supports (k8s-openapi's oldest feature, v1_33, and later).
KUBERNETES_VERSIONS = ["1.33.0", "1.34.0", "1.35.0", "1.36.0", "1.37.0"]
# Kinds defined by CRDs, which the Kubernetes schemas do not describe.
CUSTOM_KINDS = {"NotificationRoute", "Certificate", "Issuer", "ServiceMonitor", "PrometheusRule"}

MATRIX = {
    "defaults": [],
    "cert-manager": ["--set", "webhook.certificates.mode=certManager"],
    "fail-closed": ["--set", "webhook.failurePolicy=Fail"],
    "one-replica": ["--set", "replicaCount=1"],
    "monitoring": [
        "--set", "serviceMonitor.enabled=true", "--set", "networkPolicy.enabled=true",
        "--set", "prometheusRule.enabled=true",
    ],
    "permissions": ["--set", "rbac.checkSecrets=true", "--set", "rbac.restartWorkloads=true"],
    "route-namespaces": ["--set", "rbac.routeNamespaces={shop,payments}"],
    "digest": ["--set", "image.digest=sha256:" + "a" * 64],
}


def helm(*args, check=True):
    return subprocess.run([HELM, *args], capture_output=True, text=True, check=check)


def render(*args):
    out = helm("template", RELEASE, str(CHART), "-n", NAMESPACE, *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def of_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.parametrize("name", MATRIX)
def test_lint_strict(name):
    result = helm("lint", "--strict", str(CHART), *MATRIX[name], check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", MATRIX)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_rendered_objects_validate_strictly(name, version):
    docs = render(*MATRIX[name])
    assert docs
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_crd_validates_and_the_examples_use_only_its_fields():
    crd = yaml.safe_load((ROOT / "deploy/crds/notificationroutes.storerelay.dev.yaml").read_text())
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(crd, version, strict=True)


def test_typos_in_values_fail():
    for bad in (["--set", "replicaCont=3"], ["--set", "webhook.failurePolicy=Sometimes"], ["--set", "rbac.checkSecret=true"]):
        result = helm("template", RELEASE, str(CHART), *bad, check=False)
        assert result.returncode != 0, bad


def rules_for(docs, resource):
    return [
        rule
        for role in of_kind(docs, "ClusterRole") + of_kind(docs, "Role")
        for rule in role["rules"]
        if resource in rule["resources"]
    ]


def test_no_cluster_wide_secret_access_by_default():
    docs = render()
    for role in of_kind(docs, "ClusterRole"):
        for rule in role["rules"]:
            assert "secrets" not in rule["resources"], role["metadata"]["name"]
    # In its own namespace: only its certificate Secret by name (plus create, which cannot be scoped).
    role = of_kind(docs, "Role")[0]
    assert role["metadata"]["namespace"] == NAMESPACE
    for rule in role["rules"]:
        if "secrets" in rule["resources"] and rule["verbs"] != ["create"]:
            assert rule["resourceNames"] == ["storerelay-webhook-tls"]
    assert not [r for r in rules_for(docs, "deployments")], "no workload patching by default"


def test_check_secrets_grants_get_only():
    docs = render("--set", "rbac.checkSecrets=true")
    secret_rules = [r for role in of_kind(docs, "ClusterRole") for r in role["rules"] if "secrets" in r["resources"]]
    assert secret_rules == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]
    workloads = render("--set", "rbac.restartWorkloads=true")
    (rule,) = rules_for(workloads, "deployments")
    assert rule["verbs"] == ["patch"]
    deployment = of_kind(workloads, "Deployment")[0]
    assert "--allow-workload-restarts" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]


def test_configmaps_are_never_listed_and_can_be_confined_to_route_namespaces():
    (rule,) = rules_for(render(), "configmaps")
    assert sorted(rule["verbs"]) == ["create", "get", "patch"], "never list, watch or update"
    confined = render("--set", "rbac.routeNamespaces={shop,payments}")
    for role in of_kind(confined, "ClusterRole"):
        assert not [r for r in role["rules"] if "configmaps" in r["resources"]], role["metadata"]["name"]
    roles = [r for r in of_kind(confined, "Role") if any("configmaps" in rule["resources"] for rule in r["rules"])]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["payments", "shop"]
    bindings = [b for b in of_kind(confined, "RoleBinding") if b["roleRef"]["name"] == "storerelay-routes"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["payments", "shop"]
    assert all(b["subjects"][0]["namespace"] == NAMESPACE for b in bindings)
    bad = helm("template", RELEASE, str(CHART), "--set", "rbac.routeNamespaces={Not_A_Namespace}", check=False)
    assert bad.returncode != 0


def test_routes_may_name_only_the_allowed_sidecar_images():
    (deployment,) = of_kind(render(), "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not [a for a in args if a.startswith("--allowed-sidecar-image")], "none by default"
    (deployment,) = of_kind(render("--set", "sidecarImage.allowedOverrides={registry.example/sidecar:1}"), "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--allowed-sidecar-image=registry.example/sidecar:1" in args


def test_webhook_configuration():
    docs = render()
    (config,) = of_kind(docs, "MutatingWebhookConfiguration")
    (webhook,) = config["webhooks"]
    assert webhook["rules"] == [
        {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"], "scope": "Namespaced"}
    ]
    assert webhook["sideEffects"] == "NoneOnDryRun"
    assert webhook["reinvocationPolicy"] == "IfNeeded"
    assert webhook["timeoutSeconds"] == 5
    assert webhook["failurePolicy"] == "Ignore"
    # Until the operator narrows it to the namespaces with routes, the webhook sees no namespace: a
    # broad selector would send every pod creation in the cluster through it (and, while the operator
    # is not up, make each wait for the timeout). The value is the operator's own "no routes" marker.
    (expression,) = webhook["namespaceSelector"]["matchExpressions"]
    assert expression == {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["storerelay-no-routes"]}
    assert "caBundle" not in webhook["clientConfig"], "the operator patches it in operator mode"
    # Its RBAC may patch exactly this configuration.
    (rule,) = rules_for(docs, "mutatingwebhookconfigurations")
    assert rule["resourceNames"] == [config["metadata"]["name"]]

    cert_manager = render("--set", "webhook.certificates.mode=certManager")
    (config,) = of_kind(cert_manager, "MutatingWebhookConfiguration")
    assert config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == f"{NAMESPACE}/storerelay-webhook-tls"
    assert {d["kind"] for d in cert_manager} >= {"Issuer", "Certificate"}
    args = of_kind(cert_manager, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--tls-cert-file=/etc/storerelay/webhook-tls/tls.crt" in args


def restricted_violations(pod_spec, where):
    """Pod Security Standards, "restricted" profile."""
    problems = []
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(field):
            problems.append(f"{where}: {field}")
    allowed_volumes = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
    for volume in pod_spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= allowed_volumes:
            problems.append(f"{where}: volume {volume['name']} uses {kinds - allowed_volumes}")
    pod_context = pod_spec.get("securityContext", {})
    for container in pod_spec.get("initContainers", []) + pod_spec.get("containers", []):
        name = f"{where}/{container['name']}"
        context = container.get("securityContext", {})
        if context.get("privileged"):
            problems.append(f"{name}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation must be false")
        if not context.get("runAsNonRoot", pod_context.get("runAsNonRoot")):
            problems.append(f"{name}: runAsNonRoot")
        if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
            problems.append(f"{name}: runAsUser 0")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            problems.append(f"{name}: capabilities must drop ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds capabilities")
        seccomp = context.get("seccompProfile", pod_context.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile")
        for port in container.get("ports", []):
            if port.get("hostPort"):
                problems.append(f"{name}: hostPort")
    return problems


def pod_specs(docs):
    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind == "Pod":
            yield f"Pod/{name}", doc["spec"]
        elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            yield f"{kind}/{name}", doc["spec"]["template"]["spec"]
        elif kind == "CronJob":
            yield f"{kind}/{name}", doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]


@pytest.mark.parametrize("name", MATRIX)
def test_every_chart_pod_is_restricted(name):
    docs = render(*MATRIX[name])
    specs = list(pod_specs(docs))
    assert specs
    for where, spec in specs:
        assert restricted_violations(spec, where) == []


def test_an_injected_example_pod_is_restricted():
    route = ROOT / "deploy/examples/revenuecat-proxy.yaml"
    # storerelayctl takes the route file alone.
    route_doc = [d for d in yaml.safe_load_all(route.read_text()) if d and d["kind"] == "NotificationRoute"][0]
    route_file = ROOT / ".cache" / "example-route.yaml"
    route_file.parent.mkdir(exist_ok=True)
    route_file.write_text(yaml.safe_dump(route_doc))
    out = subprocess.run(
        [STORERELAYCTL, "inject", "--route", str(route_file), "-f", str(ROOT / "deploy/examples/sample-app.yaml")],
        capture_output=True, text=True, check=True,
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    (deployment,) = of_kind(docs, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["initContainers"]] == ["storerelay"]
    assert restricted_violations(spec, "Deployment/payments") == []
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(deployment, version, strict=True)


def test_examples_are_valid_routes():
    for path in sorted((ROOT / "deploy/examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            if doc["kind"] == "NotificationRoute":
                route_file = ROOT / ".cache" / f"check-{path.stem}.yaml"
                route_file.write_text(yaml.safe_dump(doc))
                result = subprocess.run([STORERELAYCTL, "render-config", "--route", str(route_file)], capture_output=True, text=True)
                assert result.returncode == 0, f"{path.name}: {result.stderr}"
            else:
                for version in KUBERNETES_VERSIONS:
                    kubernetes_validate.validate(doc, version, strict=True)


def test_committed_manifests_equal_the_chart_with_defaults():
    rendered = helm("template", RELEASE, str(CHART), "-n", NAMESPACE, "--include-crds").stdout
    committed = (ROOT / "deploy/storerelay.yaml").read_text()
    assert committed == rendered, "deploy/storerelay.yaml is stale: run `make manifests`"


def leaf_paths(values, prefix=""):
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from leaf_paths(value, path + ".")
        else:
            yield path


def test_the_chart_readme_documents_every_value():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()

    def documented(path):
        # A free-form value (such as `resources`) is documented as a whole.
        parts = path.split(".")
        return any(f"`{'.'.join(parts[:n])}`" in readme for n in range(1, len(parts) + 1))

    missing = [p for p in leaf_paths(values) if not documented(p)]
    assert missing == [], f"undocumented values: {missing}"


def test_pdb_only_with_more_than_one_replica():
    assert of_kind(render(), "PodDisruptionBudget")
    assert not of_kind(render("--set", "replicaCount=1"), "PodDisruptionBudget")


def test_apple_root_is_rendered_into_each_namespace_byte_for_byte(tmp_path):
    fixture = ROOT.parent / "shared/fixtures/apple/AppleRootCA-G3.cer"
    certificate = tmp_path / "root.cer"
    certificate.write_bytes(fixture.read_bytes() if fixture.exists() else bytes(range(256)) * 4)
    docs = render("--set-file", f"appleRoot.certificate={certificate}", "--set", "appleRoot.namespaces={shop,billing}")
    maps = of_kind(docs, "ConfigMap")
    assert sorted(m["metadata"]["namespace"] for m in maps) == sorted(["billing", NAMESPACE, "shop"])
    for config_map in maps:
        assert base64.b64decode(config_map["binaryData"]["AppleRootCA-G3.cer"]) == certificate.read_bytes()
    assert not of_kind(render(), "ConfigMap"), "nothing without a certificate: the chart embeds none"


def test_notes_name_the_next_three_commands():
    result = helm("install", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=client")
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "create secret generic revenuecat" in notes
    assert "apply -f route.yaml" in notes
    assert "get nroute" in notes


def test_prometheus_rule_alerts_only_on_metrics_the_sidecar_exports():
    assert not of_kind(render(), "PrometheusRule"), "off by default"
    (rule,) = of_kind(render("--set", "prometheusRule.enabled=true", "--set", "prometheusRule.selfTestStaleSeconds=3600"), "PrometheusRule")
    rules = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    assert {r["alert"] for r in rules} >= {"StorerelaySelfTestStale", "StorerelayGapFillRecovering", "StorerelayAppleApiErrors"}
    exported = (ROOT / "crates/sidecar/src/metrics.rs").read_text()
    for r in rules:
        for name in re.findall(r"storerelay_[a-z_]+", r["expr"]):
            family = re.sub(r"_total$", "", name)
            assert f'"{family}"' in exported, f"{r['alert']} uses {name}, which the sidecar does not export"
        assert "{{ $labels." in r["annotations"]["summary"] or "$labels" not in r["annotations"]["summary"]
    stale = next(r for r in rules if r["alert"] == "StorerelaySelfTestStale")
    assert stale["expr"].endswith("> 3600")
