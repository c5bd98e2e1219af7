"""The chart as the tests and benchmarks install it: its CRDs, its RBAC and a token for its
ServiceAccount, and the operator container's args and env from its Deployment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from . import REPO, wait_for

CRD = REPO / "crds" / "finetune.dev_finetunes.yaml"
CHART = REPO / "charts" / "finetune-operator"
OPERATOR_NAMESPACE = "finetune-system"
RELEASE = "ft-test"
RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


def render(values: dict[str, Any] | None = None, release: str = RELEASE) -> list[dict[str, Any]]:
    """The chart's objects (helm_python), as installed in OPERATOR_NAMESPACE under ``release``."""
    import helm_python as helm  # dev extra: helm-python-sdk
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values or {}, name=release, namespace=OPERATOR_NAMESPACE, is_install=True)
    return [doc for path, text in rendered.items() if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text) if doc]


def service_account_user(objects: list[dict[str, Any]]) -> str:
    account = next(o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount")
    return f"system:serviceaccount:{OPERATOR_NAMESPACE}:{account}"


def operator_command(objects: list[dict[str, Any]]) -> tuple[list[str], dict[str, str]]:
    """The operator container's args and env; fieldRef values filled in as the kubelet would."""
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container.get("env") or [] if "value" in e}
    env.update(POD_ID="finetune-operator-test", POD_NAMESPACE=OPERATOR_NAMESPACE)
    return list(container.get("args") or []), env


def install_crd_and_chart_rbac(cp, token_duration: str = "1h", values: dict[str, Any] | None = None,
                               release: str = RELEASE, namespace_flag: bool = True) -> Path:
    """CRD installed; the chart's ServiceAccount + (Cluster)Role(Binding)s; a token kubeconfig for it.

    ``namespace_flag``: the operator will run with ``--namespace`` (the tests' operators, one
    namespace each) under the chart's cluster-mode RBAC, which grants no namespace reads because
    the chart runs it with ``--all-namespaces``; kopf reads namespaces for ``--namespace`` (and
    retries a refusal for a minute), so a test-only ClusterRole adds list/watch on them."""
    cp.kubectl("apply", "-f", str(CRD))
    # Not `kubectl wait`: it fails at once while the new CRD has no conditions yet.
    wait_for(lambda: any(c["type"] == "Established" and c["status"] == "True"
                         for c in cp.get_json("crd", "finetunes.finetune.dev").get("status", {}).get("conditions") or []),
             "the FineTune CRD to be established", timeout=60)
    cp.kubectl("create", "namespace", OPERATOR_NAMESPACE, check=False)
    objects = [o for o in render(values, release) if o["kind"] in RBAC_KINDS]
    assert {o["kind"] for o in objects} >= {"ServiceAccount", "ClusterRole", "ClusterRoleBinding"}
    if namespace_flag:
        objects += namespace_reads(release, next(o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount"))
    cp.apply(objects, namespace=OPERATOR_NAMESPACE)
    account = next(o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount")
    return cp.kubeconfig_for_token(cp.create_token(OPERATOR_NAMESPACE, account, duration=token_duration),
                                   name="finetune-operator")



def namespace_reads(release: str, account: str) -> list[dict[str, Any]]:
    """The test-only grant of install_crd_and_chart_rbac(namespace_flag=True)."""
    name = f"{release}-test-namespace-reads"
    return [{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name},
             "rules": [{"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]}]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
             "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": OPERATOR_NAMESPACE}]}]
