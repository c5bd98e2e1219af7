"""Multi-tenant isolation (issue 14) without a cluster: the volume allowlist, paths that stay in
their volume, hyperparameters checked before any pod, the per-FineTune NetworkPolicy and the
chart values that switch them. The real control plane's side is in test_isolation_cluster.py."""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
from pathlib import Path
from typing import Any, Iterator

import helm_python as helm  # dev extra: helm-python-sdk
import pytest
import yaml

from finetune_operator import manifests as m
from finetune_operator import reconcile, validation

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "finetune.dev_finetunes.yaml"
CHART_DIR = REPO / "charts" / "finetune-operator"
SAMPLE = REPO / "crds" / "samples" / "finetune-cpu-smoke.yaml"
NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
ALLOWED_TEXT = "persistentVolumeClaim, configMap, emptyDir, csi, ephemeral"
OPERATOR_PEERS = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ml-platform"}},
                   "podSelector": {"matchLabels": {"app.kubernetes.io/name": "finetune-operator",
                                                   "app.kubernetes.io/instance": "ft"}}}]


def spec(**changes: Any) -> dict[str, Any]:
    """The CPU sample's spec (valid as shipped), with top-level changes."""
    body = yaml.safe_load(SAMPLE.read_text())["spec"]
    body.update(changes)
    return body


def with_volume(field: str, source: Any) -> dict[str, Any]:
    body = spec()
    section = body.setdefault(field, {"architecture": "yolov5n"} if field == "model" else {})
    section["volume"] = source
    return body


def finetune(body: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": m.API_VERSION, "kind": m.KIND, "spec": body, "status": {},
            "metadata": {"name": "cpu-smoke", "namespace": "team-a", "uid": "uid-1", "generation": 1}}


def schema_properties(node: Any, path: str = "spec") -> Iterator[tuple[str, Any]]:
    for key, child in (node.get("properties") or {}).items():
        yield f"{path}.{key}", child
        yield from schema_properties(child, f"{path}.{key}")


def crd_spec_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


# --- volumes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["dataset", "model", "output"])
@pytest.mark.parametrize("source", [{"hostPath": {"path": "/"}}, {"secret": {"secretName": "db"}},
                                    {"projected": {"sources": [{"serviceAccountToken": {"path": "t"}}]}}],
                         ids=["hostPath", "secret", "projected"])
def test_volume_types_outside_the_allowlist_fail_naming_field_and_allowed_types(field, source):
    problems = validation.validate_spec("cpu-smoke", with_volume(field, source))
    (kind,) = source
    assert problems == [f"spec.{field}.volume: volume type {kind!r} is not allowed on this cluster (allowed: "
                        f"{ALLOWED_TEXT}); use one of those, or ask the platform team to allow it "
                        "(the chart's allowedVolumeTypes)"]


@pytest.mark.parametrize("source, expected", [
    ({"persistentVolumeClaim": {"claimName": "a"}, "hostPath": {"path": "/"}},
     "spec.dataset.volume sets 2 volume types (hostPath, persistentVolumeClaim); set exactly one of " + ALLOWED_TEXT),
    ({}, "spec.dataset.volume sets 0 volume types (none); set exactly one of " + ALLOWED_TEXT),
    ({"name": "output"}, f"spec.dataset.volume: 'name' is not a Kubernetes volume type; use one of {ALLOWED_TEXT}"),
    ({"persistentVolumeClaims": {"claimName": "a"}},
     f"spec.dataset.volume: 'persistentVolumeClaims' is not a Kubernetes volume type; use one of {ALLOWED_TEXT}"),
    ("data", "spec.dataset.volume must be a volume source object such as {persistentVolumeClaim: {claimName: data}}; fix it"),
    ({"emptyDir": "big"}, "spec.dataset.volume.emptyDir must be an object (e.g. {}), not 'big'; fix it"),
], ids=["two-types", "no-type", "name-smuggled", "unknown-type", "not-an-object", "source-not-an-object"])
def test_malformed_volume_sources_are_refused(source, expected):
    assert validation.validate_spec("cpu-smoke", with_volume("dataset", source)) == [expected]


def test_every_allowed_type_passes_and_a_platform_team_can_widen_the_list():
    for kind in validation.DEFAULT_ALLOWED_VOLUME_TYPES:
        assert validation.volume_problems(with_volume("model", {kind: {}}), validation.DEFAULT_ALLOWED_VOLUME_TYPES) == []
    host_path = with_volume("dataset", {"hostPath": {"path": "/datasets"}})
    assert validation.validate_spec("cpu-smoke", host_path)
    widened = validation.parse_allowed_volume_types("persistentVolumeClaim, hostPath")
    assert widened == ("persistentVolumeClaim", "hostPath")
    assert validation.validate_spec("cpu-smoke", host_path, allowed_volume_types=widened) == []
    # The narrower list now refuses what the default allowed.
    assert validation.validate_spec("cpu-smoke", with_volume("model", {"emptyDir": {}}), allowed_volume_types=widened)


def test_allowlist_setting_defaults_and_refuses_typos():
    assert validation.parse_allowed_volume_types("") == validation.DEFAULT_ALLOWED_VOLUME_TYPES
    assert validation.parse_allowed_volume_types(" nfs,nfs , csi") == ("nfs", "csi")
    with pytest.raises(ValueError, match="unknown volume type.*hostpath"):
        validation.parse_allowed_volume_types("persistentVolumeClaim,hostpath")


def test_every_volume_field_of_the_crd_is_checked():
    """A new volume-carrying field in the CRD must be added to manifests.USER_VOLUME_FIELDS."""
    in_schema = {path for path, node in schema_properties(crd_spec_schema())
                 if path.rsplit(".", 1)[1] in ("volume", "volumes") or "VolumeSource" in str(node.get("description"))}
    assert in_schema == {f"spec.{field}.volume" for field in m.USER_VOLUME_FIELDS}


def test_every_pod_volume_is_checked_or_built_by_the_operator():
    body = spec(model={"config": {"configMapName": "models", "key": "tiny.yaml"}, "weights": "w.pt",
                       "volume": {"persistentVolumeClaim": {"claimName": "weights"}}})
    checked = m.user_volume_sources(body)
    assert set(checked) == {"spec.dataset.volume", "spec.model.volume", "spec.output.volume"}
    pod = m.build_worker_pod("cpu-smoke", "team-a", body, 0, finetune(body))
    from_spec = [{k: v for k, v in vol.items() if k != "name"} for vol in pod["spec"]["volumes"]
                 if vol["name"] in ("dataset", "weights", "output")]
    assert sorted(map(json.dumps, from_spec)) == sorted(map(json.dumps, checked.values()))
    # The rest is the operator's own: the model ConfigMap it names and memory for /dev/shm.
    rest = {vol["name"]: vol for vol in pod["spec"]["volumes"] if vol["name"] not in ("dataset", "weights", "output")}
    assert set(rest) == {"model-config", "dshm"}
    assert rest["model-config"]["configMap"]["name"] == "models" and rest["dshm"]["emptyDir"] == {"medium": "Memory"}


# --- paths -----------------------------------------------------------------------------------------

PATH_FIELDS = ["spec.dataset.config", "spec.model.weights", "spec.output.path"]
TRAVERSALS = ["..", "../x", "a/..", "a/../b", "../../tmp/x", "a//../b", "./.."]
INSIDE = ["x", "a/b.yaml", "a/..b", "..b/c", "...", ".hidden/x", "a/./b", ".", "a/", "a//b", "v1..2/w.pt"]


def path_pattern(field: str) -> str:
    node = crd_spec_schema()
    for key in field.split(".")[1:]:
        node = node["properties"][key]
    return node["pattern"]


def set_path(field: str, value: str) -> dict[str, Any]:
    body = spec(model={"architecture": "yolov5n", "volume": {"persistentVolumeClaim": {"claimName": "w"}}})
    *parents, last = field.split(".")[1:]
    node = body
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    if field == "spec.model.config.key":
        node["configMapName"] = "models"
    return body


@pytest.mark.parametrize("field", PATH_FIELDS)
def test_crd_pattern_and_operator_agree_on_what_leaves_the_volume(field):
    pattern = path_pattern(field)
    for path in TRAVERSALS + ["/etc/passwd", "/"]:
        assert not re.fullmatch(pattern, path), f"the CRD accepts {field}={path!r}"
        assert validation.path_problems(set_path(field, path)), f"the operator accepts {field}={path!r}"
    for path in INSIDE:
        assert re.fullmatch(pattern, path), f"the CRD refuses {field}={path!r}"
        assert validation.path_problems(set_path(field, path)) == [], f"the operator refuses {field}={path!r}"


@pytest.mark.parametrize("field, mount", [("spec.dataset.config", "/data"), ("spec.model.weights", "/weights"),
                                          ("spec.output.path", "/output"), ("spec.model.config.key", "/config")])
def test_validate_spec_names_the_traversing_field(field, mount):
    body = set_path(field, "..")
    expected = (f"{field} '..' must not contain a '..' segment: it would point outside the volume mounted "
                f"at {mount}; use a path inside the volume")
    assert expected in validation.validate_spec("cpu-smoke", body, model_cfg={})
    absolute = validation.validate_spec("cpu-smoke", set_path(field, "/etc/x"), model_cfg={})
    assert f"{field} '/etc/x' must be relative to the volume mounted at {mount}; remove the leading '/'" in absolute


def test_model_config_key_pattern_refuses_dot_names_kubernetes_refuses():
    pattern = path_pattern("spec.model.config.key")
    for key in (".", "..", "..yaml", "a/b.yaml", "../x"):
        assert not re.fullmatch(pattern, key), key
    for key in ("tiny.yaml", ".hidden.yaml", "a..b", "-x_1.yml"):
        assert re.fullmatch(pattern, key), key


# --- hyperparameters -------------------------------------------------------------------------------

def test_unknown_and_out_of_range_hyperparameters_fail_before_any_pod():
    body = spec(training={**spec()["training"], "hyperparameters": {"nbs": 0, "mosiac": 1.0}})
    problems = validation.validate_spec("cpu-smoke", body)
    assert any(p.startswith("spec.training.hyperparameters.nbs: nbs (") and "must be a number >= 1, got 0" in p
               for p in problems), problems
    assert any(p.startswith("spec.training.hyperparameters.mosiac: unknown hyperparameter 'mosiac'")
               and p.endswith("remove or rename it") for p in problems), problems
    plan = reconcile.plan(finetune(body), [], False, NOW, lambda: problems,
                          network_policy_metrics_from=OPERATOR_PEERS)
    assert plan.validation_failed and not plan.create_pods
    assert plan.create_service is None and plan.create_network_policy is None


# --- NetworkPolicy ---------------------------------------------------------------------------------

def test_network_policy_isolates_the_runs_pods_and_opens_only_metrics():
    policy = m.build_network_policy("cpu-smoke", "team-a", finetune(spec()), OPERATOR_PEERS)
    assert policy["apiVersion"] == "networking.k8s.io/v1" and policy["kind"] == "NetworkPolicy"
    assert policy["metadata"]["ownerReferences"] == [m.owner_reference(finetune(spec()))]
    assert policy["metadata"]["namespace"] == "team-a"
    selector = policy["spec"]["podSelector"]["matchLabels"]
    for index in range(2):
        assert selector.items() <= m.pod_labels("cpu-smoke", index, 3, spec()).items()
    assert not selector.items() <= m.pod_labels("other", 0, 0, spec()).items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]  # egress stays open (DNS, storage)
    peers, metrics = policy["spec"]["ingress"]
    assert peers == {"from": [{"podSelector": {"matchLabels": selector}}]}  # no ports: every port
    assert metrics == {"from": OPERATOR_PEERS, "ports": [{"protocol": "TCP", "port": m.METRICS_PORT}]}
    # No scraper configured: only the run's own pods get in.
    assert m.build_network_policy("cpu-smoke", "team-a", finetune(spec()), [])["spec"]["ingress"] == [peers]


def test_plan_creates_the_network_policy_with_the_service_only_when_enabled():
    body = finetune(spec())
    enabled = reconcile.plan(body, [], False, NOW, lambda: [], network_policy_metrics_from=OPERATOR_PEERS)
    assert enabled.create_network_policy == m.build_network_policy("cpu-smoke", "team-a", body, OPERATOR_PEERS)
    assert enabled.create_service and len(enabled.create_pods) == 2
    assert reconcile.plan(body, [], False, NOW, lambda: []).create_network_policy is None
    # Service there: both were created (the policy first), nothing to do.
    assert reconcile.plan(body, [], True, NOW, lambda: [], network_policy_metrics_from=OPERATOR_PEERS
                          ).create_network_policy is None


def test_network_policy_peers_setting_is_checked():
    assert m.parse_network_policy_peers("") == []
    assert m.parse_network_policy_peers(json.dumps(OPERATOR_PEERS)) == OPERATOR_PEERS
    for bad in ("{", '{"podSelector": {}}', '[{"ports": [9400]}]', "[{}]", '["x"]'):
        with pytest.raises(ValueError, match="metrics peers"):
            m.parse_network_policy_peers(bad)


# --- chart -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def render(chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    rendered = chart.render(values, name="ft", namespace="ml-platform", is_install=True)
    return [doc for path, text in rendered.items() if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text) if doc]


def operator_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    return {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}


def network_policy_grants(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [rule for o in objects if o["kind"] in ("Role", "ClusterRole") for rule in o["rules"]
            if "networkpolicies" in rule["resources"]]


def test_chart_default_allowlist_is_the_operators(chart):
    assert tuple(chart.values["allowedVolumeTypes"]) == validation.DEFAULT_ALLOWED_VOLUME_TYPES
    env = operator_env(render(chart, {}))
    assert validation.parse_allowed_volume_types(env["FINETUNE_OPERATOR_ALLOWED_VOLUME_TYPES"]) == \
        validation.DEFAULT_ALLOWED_VOLUME_TYPES
    widened = operator_env(render(chart, {"allowedVolumeTypes": ["persistentVolumeClaim", "nfs"]}))
    assert widened["FINETUNE_OPERATOR_ALLOWED_VOLUME_TYPES"] == "persistentVolumeClaim,nfs"
    with pytest.raises(Exception, match="allowedVolumeTypes must list at least one volume type"):
        render(chart, {"allowedVolumeTypes": []})


def test_network_policy_is_off_by_default_with_no_grant(chart):
    assert chart.values["networkPolicy"]["enabled"] is False
    for values in ({}, {"watchNamespaces": ["team-a"]}):
        objects = render(chart, values)
        assert not network_policy_grants(objects)
        assert "FINETUNE_OPERATOR_NETWORK_POLICY" not in operator_env(objects)


@pytest.mark.parametrize("values", [{}, {"watchNamespaces": ["team-a", "team-b"]}], ids=["cluster", "namespaced"])
def test_network_policy_on_grants_create_only_and_passes_the_peers(chart, values):
    monitoring = {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    objects = render(chart, {**values, "networkPolicy": {"enabled": True, "prometheusNamespaceSelector": monitoring}})
    grants = network_policy_grants(objects)
    assert grants and all(rule == {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"],
                                   "verbs": ["create"]} for rule in grants)
    assert len(grants) == (2 if values else 1)  # one per watched namespace's Role, or the ClusterRole
    env = operator_env(objects)
    assert env["FINETUNE_OPERATOR_NETWORK_POLICY"] == "true"
    peers = m.parse_network_policy_peers(env["FINETUNE_OPERATOR_NETWORK_POLICY_METRICS_FROM"])
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    operator_pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert peers == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ml-platform"}},
                      "podSelector": {"matchLabels": deployment["spec"]["selector"]["matchLabels"]}},
                     {"namespaceSelector": monitoring}]
    assert peers[0]["podSelector"]["matchLabels"].items() <= operator_pod_labels.items()


def test_network_policy_operator_namespace_selector_can_be_replaced(chart):
    own = {"matchLabels": {"platform.example/operators": "true"}}
    env = operator_env(render(chart, {"networkPolicy": {"enabled": True, "operatorNamespaceSelector": own}}))
    [peer] = m.parse_network_policy_peers(env["FINETUNE_OPERATOR_NETWORK_POLICY_METRICS_FROM"])
    assert peer["namespaceSelector"] == own


def test_network_policy_with_pod_monitor_needs_the_prometheus_selector(chart):
    with pytest.raises(Exception, match="needs networkPolicy.prometheusNamespaceSelector"):
        render(chart, {"networkPolicy": {"enabled": True}, "podMonitor": {"enabled": True}})
    lint_values = {"networkPolicy": {"enabled": True, "prometheusNamespaceSelector": {"matchLabels": {"a": "b"}}},
                   "podMonitor": {"enabled": True}}
    report = helm.lint(CHART_DIR, copy.deepcopy(lint_values), strict=True, namespace="ml-platform",
                       kube_version="v1.20.2")
    assert report["errors"] == [] and [msg for msg in report["messages"] if msg["severity"] >= 2] == []
