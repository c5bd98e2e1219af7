"""Multi-tenant isolation (issue 14) on the real control plane (v1.20, no kubelet, no CNI).

The operator runs as in test_operator_cluster.py, but as its own release of the chart with
``networkPolicy.enabled`` (so with exactly the RBAC the chart grants then) and with the
settings the chart's Deployment passes. Nothing enforces NetworkPolicy here: the tests show
that the apiserver accepts the objects, that they are owned by the FineTune and go with it, and
which pods and namespaces their selectors select, not that traffic is blocked.
"""

from __future__ import annotations

import json
from typing import Any

import helm_python as helm
import pytest
import yaml
from support.chart import CHART
from test_operator_cluster import (GC_TIMEOUT, OPERATOR_NAMESPACE, Cluster, Operator, cpu_finetune,
                                   install_crd_and_chart_rbac, wait_for)

pytestmark = pytest.mark.cluster

RELEASE = "ft-isolation"
MONITORING = {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
CHART_VALUES = {"networkPolicy": {"enabled": True, "prometheusNamespaceSelector": MONITORING}}
SETTINGS = ("FINETUNE_OPERATOR_ALLOWED_VOLUME_TYPES", "FINETUNE_OPERATOR_NETWORK_POLICY",
            "FINETUNE_OPERATOR_NETWORK_POLICY_METRICS_FROM")
ALLOWED_TEXT = "persistentVolumeClaim, configMap, emptyDir, csi, ephemeral"


@pytest.fixture(scope="module")
def isolation_kubeconfig(control_plane):
    return install_crd_and_chart_rbac(control_plane, values=CHART_VALUES, release=RELEASE)


def chart_settings_for(values: dict[str, Any]) -> dict[str, str]:
    """The isolation settings the chart's Deployment gives the operator with these values."""
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name=RELEASE, namespace=OPERATOR_NAMESPACE, is_install=True)
    [deployment] = [doc for path, text in rendered.items() if not path.endswith("NOTES.txt")
                    for doc in yaml.safe_load_all(text) if doc and doc["kind"] == "Deployment"]
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    return {key: env[key] for key in SETTINGS}


@pytest.fixture(scope="module")
def chart_settings() -> dict[str, str]:
    return chart_settings_for(CHART_VALUES)


@pytest.fixture
def cluster(control_plane, namespace) -> Cluster:
    return Cluster(control_plane, namespace)


@pytest.fixture
def start_operator(isolation_kubeconfig, namespace, tmp_path, monkeypatch):
    """start_operator(settings) runs the operator with these environment settings (stopped after the test)."""
    started = []

    def start(settings: dict[str, str]) -> Operator:
        for key, value in settings.items():
            monkeypatch.setenv(key, value)  # Operator.start passes its environment on
        op = Operator(isolation_kubeconfig, namespace, tmp_path / f"operator-{len(started)}.log")
        op.start()
        started.append(op)
        return op

    yield start
    for op in started:
        op.stop()
        print(f"--- operator log ({op.log_path}) ---\n{op.log_tail()}")


@pytest.fixture
def operator(start_operator, chart_settings) -> Operator:
    return start_operator(chart_settings)


def get_json(cluster: Cluster, *args: str) -> dict[str, Any] | None:
    proc = cluster.cp.kubectl("-n", cluster.ns, "get", *args, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def selected_pods(cluster: Cluster, match_labels: dict[str, str]) -> list[str]:
    """The pods the apiserver itself selects with these labels."""
    selector = ",".join(f"{k}={v}" for k, v in sorted(match_labels.items()))
    return sorted(p["metadata"]["name"] for p in get_json(cluster, "pods", "-l", selector)["items"])


def assert_failed_without_pods(cluster: Cluster, name: str) -> str:
    cluster.wait_phase(name, "Failed")
    failed = cluster.condition(name, "Failed")
    assert failed["reason"] == "ValidationFailed"
    assert not cluster.pods(name)
    assert get_json(cluster, "service", name) is None and get_json(cluster, "networkpolicy", name) is None
    return failed["message"]


# --- the schema ------------------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["dataset.config", "model.weights", "output.path"])
def test_apiserver_refuses_paths_that_leave_their_volume(isolation_kubeconfig, cluster, field):
    def body(value: str) -> dict[str, Any]:
        finetune = cpu_finetune("paths")
        finetune["spec"]["model"]["volume"] = {"persistentVolumeClaim": {"claimName": "weights"}}
        section, key = field.split(".")
        finetune["spec"][section][key] = value
        return finetune

    for value in ("../../tmp/x", "runs/../../x", ".."):
        proc = cluster.cp.kubectl("-n", cluster.ns, "apply", "--dry-run=server", "-f", "-",
                                  input=json.dumps(body(value)), check=False)
        assert proc.returncode != 0, f"spec.{field}={value!r} was accepted"
        assert f'spec.{field}: Invalid value: "{value}"' in proc.stderr and "should match" in proc.stderr
    for value in ("runs/..hidden/x", "v1..2/w.pt", ".cache/x"):
        cluster.cp.kubectl("-n", cluster.ns, "apply", "--dry-run=server", "-f", "-", input=json.dumps(body(value)))


def test_apiserver_refuses_a_model_config_key_that_is_dot_dot(isolation_kubeconfig, cluster):
    finetune = cpu_finetune("key")
    finetune["spec"]["model"] = {"config": {"configMapName": "models", "key": ".."}}
    proc = cluster.cp.kubectl("-n", cluster.ns, "apply", "--dry-run=server", "-f", "-",
                              input=json.dumps(finetune), check=False)
    assert proc.returncode != 0 and 'spec.model.config.key: Invalid value: ".."' in proc.stderr


# --- the operator ----------------------------------------------------------------------------------

def test_volume_types_outside_the_allowlist_fail_without_pods(cluster, operator):
    finetune = cpu_finetune("hostile")
    finetune["spec"]["dataset"]["volume"] = {"hostPath": {"path": "/"}}
    finetune["spec"]["model"].update(weights="w.pt", volume={"secret": {"secretName": "operator-token"}})
    finetune["spec"]["output"]["volume"] = {"projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}}
    cluster.apply(finetune)  # the schema lets any one volume source through; the operator decides
    message = assert_failed_without_pods(cluster, "hostile")
    for field, kind in (("dataset", "hostPath"), ("model", "secret"), ("output", "projected")):
        assert (f"spec.{field}.volume: volume type '{kind}' is not allowed on this cluster "
                f"(allowed: {ALLOWED_TEXT})") in message
    assert cluster.status("hostile")["message"].startswith("invalid spec: ")
    assert "ValidationFailed" in wait_for(lambda: cluster.events("hostile"), "a warning event")


def test_hyperparameters_out_of_range_or_unknown_fail_without_pods(cluster, operator):
    finetune = cpu_finetune("hyp")
    finetune["spec"]["training"]["hyperparameters"] = {"nbs": 0, "mosiac": 1.0}
    cluster.apply(finetune)
    message = assert_failed_without_pods(cluster, "hyp")
    assert "spec.training.hyperparameters.nbs: nbs (nominal batch size" in message
    assert "must be a number >= 1, got 0; fix the value" in message
    assert "spec.training.hyperparameters.mosiac: unknown hyperparameter 'mosiac' (known: " in message
    assert "remove or rename it" in message


def test_network_policy_is_accepted_owned_selects_the_run_and_goes_with_it(cluster, operator, chart_settings):
    cluster.apply(cpu_finetune("isolated"))
    cluster.apply(cpu_finetune("neighbour", workers=1))
    cluster.wait_pods("isolated", 2)
    cluster.wait_pods("neighbour", 1)
    finetune = cluster.finetune("isolated")
    policy = get_json(cluster, "networkpolicy", "isolated")
    assert policy, "no NetworkPolicy next to the Service"
    [owner] = policy["metadata"]["ownerReferences"]
    assert owner["uid"] == finetune["metadata"]["uid"] and owner["kind"] == "FineTune" and owner["controller"]
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    run_pods = ["isolated-worker-0", "isolated-worker-1"]
    assert selected_pods(cluster, spec["podSelector"]["matchLabels"]) == run_pods
    peers, metrics = spec["ingress"]
    # Every port between the run's own pods: no `ports` in that rule.
    assert "ports" not in peers
    [peer] = peers["from"]
    assert selected_pods(cluster, peer["podSelector"]["matchLabels"]) == run_pods
    # The metrics port from the operator pod of the chart's namespace and from Prometheus' namespaces.
    assert metrics["ports"] == [{"protocol": "TCP", "port": 9400}]
    assert metrics["from"] == json.loads(chart_settings["FINETUNE_OPERATOR_NETWORK_POLICY_METRICS_FROM"])
    operator_peer, prometheus_peer = metrics["from"]
    assert prometheus_peer == {"namespaceSelector": MONITORING}
    assert operator_peer["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == RELEASE
    # On 1.20 no namespace carries kubernetes.io/metadata.name until someone labels it (README).
    ns_selector = ",".join(f"{k}={v}" for k, v in operator_peer["namespaceSelector"]["matchLabels"].items())
    selected = lambda: [n["metadata"]["name"] for n in cluster.cp.get_json("namespaces", "-l", ns_selector)["items"]]  # noqa: E731
    assert selected() == []
    cluster.cp.kubectl("label", "namespace", OPERATOR_NAMESPACE,
                       f"kubernetes.io/metadata.name={OPERATOR_NAMESPACE}", "--overwrite")
    assert selected() == [OPERATOR_NAMESPACE]
    # The neighbour has its own policy, selecting only its own pod.
    neighbour = get_json(cluster, "networkpolicy", "neighbour")
    assert selected_pods(cluster, neighbour["spec"]["podSelector"]["matchLabels"]) == ["neighbour-worker-0"]
    # Deleting the FineTune takes the policy with it (garbage collection through the owner reference).
    cluster.cp.kubectl("-n", cluster.ns, "delete", "ft", "isolated", "--wait=false")
    wait_for(lambda: get_json(cluster, "networkpolicy", "isolated") is None,
             "garbage collection of the NetworkPolicy", timeout=GC_TIMEOUT)
    assert get_json(cluster, "networkpolicy", "neighbour")


def test_an_unknown_allowed_volume_type_stops_the_operator(start_operator, chart_settings):
    op = start_operator({**chart_settings, "FINETUNE_OPERATOR_ALLOWED_VOLUME_TYPES": "persistentVolumeClaim,hostpath"})
    wait_for(lambda: op.proc.poll() is not None, "the operator to exit")
    assert op.proc.returncode != 0
    assert "invalid operator setting: unknown volume type(s) hostpath" in op.log_path.read_text()


def test_a_widened_allowlist_admits_the_type(cluster, start_operator):
    start_operator(chart_settings_for({**CHART_VALUES, "allowedVolumeTypes": ["persistentVolumeClaim", "hostPath"]}))
    finetune = cpu_finetune("widened", workers=1)
    finetune["spec"]["dataset"]["volume"] = {"hostPath": {"path": "/srv/datasets"}}
    cluster.apply(finetune)
    [pod] = cluster.wait_pods("widened", 1)
    assert {"name": "dataset", "hostPath": {"path": "/srv/datasets", "type": ""}} in pod["spec"]["volumes"]
