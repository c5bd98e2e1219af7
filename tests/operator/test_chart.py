"""The Helm chart, rendered and linted by Helm's own Go library (helm-python-sdk), no cluster.

Checks what a reviewer would: it lints, every mode renders to valid objects of the expected
kinds, RBAC is least-privilege, the Deployment is a single restricted-PSS replica, the CRD copy
is current, every value is documented, and the dashboard and alert rules only use metrics that
the operator and trainer really export.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

import helm_python as helm  # dev extra: helm-python-sdk

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "charts" / "finetune-operator"
RELEASE = "ft"
RELEASE_NAMESPACE = "ml-platform"
KUBE_VERSION = "v1.20.2"  # the project's test control plane (tests/cluster)

# Metric names of docs/trainer-contract.md (trainer, rank 0) and of the operator.
TRAINER_METRICS = {
    "finetune_epoch", "finetune_epochs_total", "finetune_map50", "finetune_map50_95",
    "finetune_precision", "finetune_recall", "finetune_train_loss", "finetune_images_per_second",
    "finetune_frozen_parameters", "finetune_trainable_parameters",
    "finetune_gpu_memory_allocated_bytes", "finetune_gpu_memory_reserved_bytes",
    "finetune_gpu_memory_peak_bytes", "finetune_gpu_utilization_ratio", "finetune_cpu_memory_peak_bytes",
}
OPERATOR_METRICS = {
    "finetune_operator_finetunes", "finetune_operator_created_total",
    "finetune_operator_succeeded_total", "finetune_operator_failed_total",
    "finetune_operator_restarts_total",
    "finetune_operator_reconcile_duration_seconds_bucket",
    "finetune_operator_reconcile_duration_seconds_sum",
    "finetune_operator_reconcile_duration_seconds_count",
    "finetune_operator_map50", "finetune_operator_map50_95",
    "finetune_operator_best_map50", "finetune_operator_best_map50_95",
    "finetune_operator_gpu_memory_peak_bytes",
}
KNOWN_METRICS = TRAINER_METRICS | OPERATOR_METRICS

ALL_OPTIONAL = {
    "serviceMonitor": {"enabled": True},
    "podMonitor": {"enabled": True},
    "grafanaDashboard": {"enabled": True},
    "prometheusRule": {"enabled": True},
    "peering": {"enabled": True},
}
NAMESPACED = {"rbac": {"namespaced": True}}
WATCHED = {"watchNamespaces": ["team-a", "team-b"]}
SCHEDULING = {"gangScheduling": {"coscheduling": {"enabled": True}, "volcano": {"enabled": True}},
              "podDisruptionBudget": {"enabled": True}}

# Every verb the operator may hold per (apiGroup, resource); anything else is a finding. The
# same grants are checked against what the operator really uses (the apiserver's audit log) in
# test_rbac_audit_cluster.py.
ALLOWED_VERBS = {
    # get: a re-read after a write refused as stale; delete: spec.ttlSecondsAfterFinished.
    ("finetune.dev", "finetunes"): {"get", "list", "watch", "delete"},
    ("finetune.dev", "finetunes/status"): {"patch"},
    ("", "pods"): {"list", "watch", "create", "delete", "patch"},
    ("", "services"): {"create"},
    ("", "configmaps"): {"get"},
    ("", "events"): {"create"},
    ("networking.k8s.io", "networkpolicies"): {"create"},
    # gangScheduling.<scheduler>.enabled, podDisruptionBudget.enabled: one object per FineTune.
    ("scheduling.x-k8s.io", "podgroups"): {"create"},
    ("scheduling.volcano.sh", "podgroups"): {"create"},
    ("policy", "poddisruptionbudgets"): {"create"},
    ("kopf.dev", "kopfpeerings"): {"list", "watch", "patch"},
    ("kopf.dev", "clusterkopfpeerings"): {"list", "watch", "patch"},
    # kopf matches its --namespace patterns (--all-namespaces does not; see test_rbac_audit_cluster).
    ("", "namespaces"): {"list", "watch"},
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
}


def merge(*parts: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = value
    return out


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def render(chart, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """All objects of a release, each document parsed as YAML (which must succeed)."""
    manifests = chart.render(values or {}, name=RELEASE, namespace=RELEASE_NAMESPACE, is_install=True)
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc is None:
                continue
            assert isinstance(doc, dict), path
            assert doc.get("apiVersion") and doc.get("kind"), f"{path}: {doc}"
            assert doc["metadata"].get("name"), f"{path}: object without a name"
            objects.append(doc)
    return objects


def kinds(objects: list[dict[str, Any]]) -> list[str]:
    return sorted(obj["kind"] for obj in objects)


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matches = [obj for obj in objects if obj["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, got {len(matches)}"
    return matches[0]


def metric_names(expr: str) -> set[str]:
    """Metric-like identifiers in a PromQL expression (ours all start with finetune_)."""
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return set(re.findall(r"\bfinetune_[a-zA-Z0-9_:]*", without_strings))


def assert_balanced(expr: str) -> None:
    stack = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for char in re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr):
        if char in "([{":
            stack.append(char)
        elif char in pairs:
            assert stack and stack.pop() == pairs[char], f"unbalanced brackets in {expr!r}"
    assert not stack, f"unbalanced brackets in {expr!r}"


# --- lint ---------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [{}, ALL_OPTIONAL, merge(ALL_OPTIONAL, NAMESPACED), merge(ALL_OPTIONAL, WATCHED),
                                    merge(ALL_OPTIONAL, SCHEDULING, {"allowedPodReferences": ["secretKeyRef"]})],
                         ids=["defaults", "all-optional", "namespaced", "watch-namespaces", "scheduling"])
def test_helm_lint_strict_passes(values):
    report = helm.lint(CHART_DIR, values, strict=True, namespace=RELEASE_NAMESPACE, kube_version=KUBE_VERSION)
    assert report["errors"] == []
    # Severity 1 is informational ("icon is recommended"); warnings and errors fail.
    findings = [m for m in report["messages"] if m["severity"] >= 2]
    assert findings == []


def test_chart_metadata(chart):
    meta = chart.metadata
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "finetune-operator"
    assert meta["appVersion"] == "0.1.0"


# --- rendering ----------------------------------------------------------------------------

def test_default_render_has_only_the_core_objects(chart):
    assert kinds(render(chart)) == sorted(
        ["ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "ServiceAccount"]
    )


def test_every_optional_part_renders(chart):
    objects = render(chart, ALL_OPTIONAL)
    assert kinds(objects) == sorted([
        "ClusterKopfPeering", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "Deployment",
        "PodMonitor", "PrometheusRule", "Service", "ServiceAccount", "ServiceMonitor",
    ])


def test_namespaced_mode_uses_roles_in_watched_namespaces(chart):
    objects = render(chart, merge(ALL_OPTIONAL, WATCHED))
    roles = [obj for obj in objects if obj["kind"] == "Role"]
    assert sorted(role["metadata"]["namespace"] for role in roles) == ["team-a", "team-b"]
    for role in roles:
        assert any("finetunes" in rule["resources"] for rule in role["rules"])
    bindings = [obj for obj in objects if obj["kind"] == "RoleBinding"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"] == [{
            "kind": "ServiceAccount", "name": f"{RELEASE}-finetune-operator", "namespace": RELEASE_NAMESPACE,
        }]
    # The only cluster-wide grant is kopf's read-only scanning of CRDs and namespaces.
    for cluster_role in (obj for obj in objects if obj["kind"] == "ClusterRole"):
        resources = {res for rule in cluster_role["rules"] for res in rule["resources"]}
        assert resources == {"customresourcedefinitions", "namespaces"}
        assert {verb for rule in cluster_role["rules"] for verb in rule["verbs"]} == {"list", "watch"}
    args = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == ["--namespace=team-a", "--namespace=team-b"]
    assert sorted(obj["metadata"]["namespace"] for obj in objects if obj["kind"] == "KopfPeering") == ["team-a", "team-b"]
    assert not [obj for obj in objects if obj["kind"] == "ClusterKopfPeering"]
    assert one(objects, "PodMonitor")["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


def test_rbac_namespaced_without_list_watches_release_namespace(chart):
    objects = render(chart, NAMESPACED)
    assert [obj["metadata"]["namespace"] for obj in objects if obj["kind"] == "Role"] == [RELEASE_NAMESPACE]
    args = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == [f"--namespace={RELEASE_NAMESPACE}"]


def test_cluster_mode_watches_all_namespaces(chart):
    objects = render(chart)
    args = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == ["--all-namespaces"]
    assert not [obj for obj in objects if obj["kind"] in ("Role", "RoleBinding")]
    # --all-namespaces never reads namespaces (test_rbac_audit_cluster shows what it does read).
    assert not [rule for obj in objects if obj["kind"] == "ClusterRole" for rule in obj["rules"]
                if "namespaces" in rule["resources"]]
    binding = one(objects, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": f"{RELEASE}-finetune-operator"}


@pytest.mark.parametrize("values", [{}, NAMESPACED, WATCHED, SCHEDULING, merge(SCHEDULING, WATCHED)],
                         ids=["cluster", "namespaced", "watch-namespaces", "scheduling", "scheduling-namespaced"])
def test_rbac_is_least_privilege(chart, values):
    objects = render(chart, values)
    rules = [rule for obj in objects if obj["kind"] in ("Role", "ClusterRole") for rule in obj["rules"]]
    assert rules
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert "nonResourceURLs" not in rule and "resourceNames" not in rule
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"wildcard {field} in {rule}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert (group, resource) in ALLOWED_VERBS, f"unexpected grant on {group or 'core'}/{resource}"
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    for key, verbs in granted.items():
        assert verbs <= ALLOWED_VERBS[key], f"{key}: {verbs - ALLOWED_VERBS[key]} not needed"
    # What the operator cannot work without.
    for key in [("finetune.dev", "finetunes"), ("finetune.dev", "finetunes/status"), ("", "pods"),
                ("", "services"), ("", "events"), ("apiextensions.k8s.io", "customresourcedefinitions")]:
        assert granted.get(key) == ALLOWED_VERBS[key], key


def grants_of(objects: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(group, resource) for obj in objects if obj["kind"] in ("Role", "ClusterRole")
            for rule in obj["rules"] for group in rule["apiGroups"] for resource in rule["resources"]}


def operator_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    container = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return {item["name"]: item.get("value") for item in container["env"]}


PLATFORM_SETTINGS = ("FINETUNE_OPERATOR_ALLOWED_POD_REFERENCES", "FINETUNE_OPERATOR_COSCHEDULING_SCHEDULER",
                     "FINETUNE_OPERATOR_VOLCANO_SCHEDULER", "FINETUNE_OPERATOR_POD_DISRUPTION_BUDGETS")
SCHEDULING_GRANTS = {("scheduling.x-k8s.io", "podgroups"), ("scheduling.volcano.sh", "podgroups"),
                     ("policy", "poddisruptionbudgets")}


def test_pod_groups_budgets_and_references_only_when_enabled(chart):
    defaults = render(chart)
    assert not grants_of(defaults) & SCHEDULING_GRANTS
    assert not set(operator_env(defaults)) & set(PLATFORM_SETTINGS)
    for values, grant, setting, value in (
        ({"gangScheduling": {"coscheduling": {"enabled": True}}}, ("scheduling.x-k8s.io", "podgroups"),
         "FINETUNE_OPERATOR_COSCHEDULING_SCHEDULER", "scheduler-plugins-scheduler"),
        ({"gangScheduling": {"volcano": {"enabled": True, "schedulerName": "vc"}}}, ("scheduling.volcano.sh", "podgroups"),
         "FINETUNE_OPERATOR_VOLCANO_SCHEDULER", "vc"),
        ({"podDisruptionBudget": {"enabled": True}}, ("policy", "poddisruptionbudgets"),
         "FINETUNE_OPERATOR_POD_DISRUPTION_BUDGETS", "true"),
    ):
        for mode in ({}, WATCHED):
            objects = render(chart, merge(values, mode))
            assert grants_of(objects) & SCHEDULING_GRANTS == {grant}, values
            assert {k: v for k, v in operator_env(objects).items() if k in PLATFORM_SETTINGS} == {setting: value}
    references = operator_env(render(chart, {"allowedPodReferences": ["secretKeyRef", "serviceAccountName"]}))
    assert references["FINETUNE_OPERATOR_ALLOWED_POD_REFERENCES"] == "secretKeyRef,serviceAccountName"
    # Referencing a Secret or a ServiceAccount is the platform team's decision: off by default.
    assert chart.values["allowedPodReferences"] == []
    for part in (chart.values["gangScheduling"]["coscheduling"], chart.values["gangScheduling"]["volcano"],
                 chart.values["podDisruptionBudget"]):
        assert part["enabled"] is False


def test_rbac_rules_are_commented():
    """Each rule says why it exists (a `#` line right above it)."""
    source = (CHART_DIR / "templates" / "_helpers.tpl").read_text() + (CHART_DIR / "templates" / "rbac.yaml").read_text()
    lines = source.splitlines()
    rule_starts = [i for i, line in enumerate(lines) if line.strip().startswith("- apiGroups:")]
    assert len(rule_starts) >= 10  # the scan found the rules (11 in the templates)
    for i in rule_starts:
        assert lines[i - 1].strip().startswith("#"), f"rule without a comment: {lines[i]}"


def test_deployment_is_one_restricted_replica(chart):
    deployment = one(render(chart, {"trainer": {"image": "registry.example/trainer:1.2.3"}}), "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert pod["serviceAccountName"] == f"{RELEASE}-finetune-operator"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    [container] = pod["containers"]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert "add" not in security["capabilities"]
    assert security["readOnlyRootFilesystem"] is True
    assert not security.get("privileged")
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http-metrics": 8080, "health": 8081}
    probe = container["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz" and ports[probe["port"]] == 8081
    env = {item["name"]: item for item in container["env"]}
    assert env["FINETUNE_TRAINER_IMAGE"]["value"] == "registry.example/trainer:1.2.3"
    assert container["image"] == "ghcr.io/finetune-operator/operator:0.1.0"


def test_default_trainer_image_follows_app_version(chart):
    container = one(render(chart), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["FINETUNE_TRAINER_IMAGE"] == "ghcr.io/finetune-operator/trainer:0.1.0"


def test_metrics_service_targets_the_operator(chart):
    objects = render(chart)
    service = one(objects, "Service")
    deployment = one(objects, "Deployment")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    [port] = service["spec"]["ports"]
    assert port["port"] == 8080 and port["targetPort"] == "http-metrics"


def test_service_monitor_selects_the_metrics_service(chart):
    objects = render(chart, ALL_OPTIONAL)
    monitor = one(objects, "ServiceMonitor")
    service = one(objects, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [RELEASE_NAMESPACE]}
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http-metrics"
    # The alert FineTuneOperatorDown keys on job="finetune-operator".
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "finetune-operator"


def test_pod_monitor_scrapes_rank_zero_of_trainer_pods(chart):
    monitor = one(render(chart, ALL_OPTIONAL), "PodMonitor")
    assert monitor["spec"]["selector"] == {"matchLabels": {
        "app.kubernetes.io/managed-by": "finetune-operator",
        "app.kubernetes.io/component": "worker",
        "finetune.dev/worker-index": "0",
    }}
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    relabel = {r["targetLabel"]: r["sourceLabels"] for r in endpoint["relabelings"]}
    assert relabel["finetune"] == ["__meta_kubernetes_pod_label_finetune_dev_name"]
    assert relabel["namespace"] == ["__meta_kubernetes_namespace"]
    assert relabel["pod"] == ["__meta_kubernetes_pod_name"]


def test_monitor_labels_reach_prometheus_selectors(chart):
    selector = {"release": "kube-prometheus-stack"}
    values = merge(ALL_OPTIONAL, {part: {"labels": selector} for part in ("serviceMonitor", "podMonitor", "prometheusRule")})
    for obj in render(chart, values):
        if obj["kind"] in ("ServiceMonitor", "PodMonitor", "PrometheusRule"):
            assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack"


# --- CRDs ---------------------------------------------------------------------------------

def test_chart_crd_is_identical_to_the_source_of_truth():
    source = REPO / "crds" / "finetune.dev_finetunes.yaml"
    copy = CHART_DIR / "crds" / "finetune.dev_finetunes.yaml"
    assert source.is_file(), "crds/finetune.dev_finetunes.yaml is missing"
    assert copy.is_file(), "copy crds/finetune.dev_finetunes.yaml into charts/finetune-operator/crds/"
    assert copy.read_bytes() == source.read_bytes(), "chart CRD is stale: copy crds/finetune.dev_finetunes.yaml again"


def test_chart_ships_the_crds(chart):
    crds = {}
    for crd in chart.crds:
        for doc in yaml.safe_load_all(crd["data"] if isinstance(crd["data"], str) else bytes(crd["data"]).decode()):
            if doc:
                assert doc["kind"] == "CustomResourceDefinition"
                crds[doc["metadata"]["name"]] = doc
    assert {"finetunes.finetune.dev", "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"} <= set(crds)
    assert crds["kopfpeerings.kopf.dev"]["spec"]["scope"] == "Namespaced"
    assert crds["clusterkopfpeerings.kopf.dev"]["spec"]["scope"] == "Cluster"


# --- values.yaml --------------------------------------------------------------------------

def test_every_value_is_commented():
    """Each key in values.yaml has a comment on the line above it (or on the same line)."""
    lines = (CHART_DIR / "values.yaml").read_text().splitlines()
    key_line = re.compile(r"^\s*(?:- )?[A-Za-z0-9_.\-\"']+\s*:(?:\s|$)")
    uncommented = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or not key_line.match(line):
            continue
        previous = lines[i - 1].strip() if i else ""
        if not previous.startswith("#") and " #" not in line:
            uncommented.append(f"{i + 1}: {line}")
    assert uncommented == []
    # And the file is what Helm reads as defaults.
    assert yaml.safe_load((CHART_DIR / "values.yaml").read_text())["trainer"] == {"image": ""}


def test_optional_parts_are_off_by_default(chart):
    for part in ("serviceMonitor", "podMonitor", "grafanaDashboard", "prometheusRule", "peering"):
        assert chart.values[part]["enabled"] is False, part


# --- dashboard ----------------------------------------------------------------------------

def dashboard() -> dict[str, Any]:
    return json.loads((CHART_DIR / "dashboards" / "finetune.json").read_text())


def test_dashboard_variables():
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"namespace", "finetune"} <= set(variables)


def test_dashboard_panels_query_only_known_metrics():
    panels = [p for p in dashboard()["panels"] if p["type"] != "row"]
    assert len(panels) >= 10
    assert len({p["id"] for p in dashboard()["panels"]}) == len(dashboard()["panels"])
    used: set[str] = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            assert expr.strip(), panel["title"]
            assert_balanced(expr)
            names = metric_names(expr)
            assert names, f"{panel['title']}: no metric in {expr!r}"
            assert names <= KNOWN_METRICS, f"{panel['title']}: unknown {names - KNOWN_METRICS}"
            # Only the dashboard's own variables, which a test harness can substitute.
            assert set(re.findall(r"\$\{?(\w+)", expr)) <= {"namespace", "finetune", "__rate_interval", "__interval", "__range"}, expr
            used |= names
    required = {
        "finetune_map50", "finetune_map50_95", "finetune_train_loss", "finetune_images_per_second",
        "finetune_gpu_memory_peak_bytes", "finetune_cpu_memory_peak_bytes", "finetune_frozen_parameters",
        "finetune_trainable_parameters", "finetune_epoch", "finetune_epochs_total",
        "finetune_operator_finetunes", "finetune_operator_restarts_total", "finetune_operator_best_map50_95",
    }
    assert required <= used, required - used


def test_dashboard_configmap_holds_the_json(chart):
    configmap = one(render(chart, ALL_OPTIONAL), "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["finetune.json"]) == dashboard()


# --- alert rules --------------------------------------------------------------------------

def rule_file() -> dict[str, Any]:
    return yaml.safe_load((CHART_DIR / "rules" / "finetune-alerts.yaml").read_text())


def test_rule_file_is_a_prometheus_rule_file():
    rules = [rule for group in rule_file()["groups"] for rule in group["rules"]]
    names = {rule["alert"] for rule in rules}
    assert {"FineTuneOperatorDown", "FineTuneFailed", "FineTuneRestartingRepeatedly", "FineTuneMetricsAbsent",
            "FineTuneNoProgress", "FineTuneMapRegressed"} <= names
    assert len(names) == len(rules)
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"]
        assert_balanced(rule["expr"])
        assert metric_names(rule["expr"]) <= KNOWN_METRICS, rule["alert"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]


def test_prometheus_rule_embeds_the_rule_file(chart):
    rendered = one(render(chart, ALL_OPTIONAL), "PrometheusRule")
    assert rendered["spec"] == rule_file()


def test_prometheus_rule_adds_routing_labels(chart):
    values = merge(ALL_OPTIONAL, {"prometheusRule": {"additionalRuleLabels": {"team": "ml-platform"}}})
    rendered = one(render(chart, values), "PrometheusRule")
    for group in rendered["spec"]["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["team"] == "ml-platform"
            assert rule["labels"]["severity"]  # the rule's own labels survive
