"""The chart grants exactly what the operator uses (issue 14).

The operator runs as the chart starts it (the Deployment's args and env, its ServiceAccount's
token, its RBAC with networkPolicy on) on a control plane with the apiserver's audit log on for
that ServiceAccount, through a scenario: create, run, a pod failure and restart, suspend and
resume, success and TTL, a permanent failure (the other worker stopped), a model ConfigMap, a
quota refusal, a deletion, gang PodGroups (Coscheduling, Volcano) and a PodDisruptionBudget. Then the (verb, API group, resource, subresource) set it used is
compared with what the rendered chart grants: every request was allowed, every use is granted,
and every grant was used or is listed in NOT_EXERCISED with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
from support import REPO, free_port, load_module, wait_for
from support.chart import CHART, OPERATOR_NAMESPACE, install_crd_and_chart_rbac, operator_command, render
from support.scheduling import install_pod_group_crds
from test_operator_cluster import Cluster, cpu_finetune

pytestmark = pytest.mark.cluster

OPERATOR_GROUP = f"system:serviceaccounts:{OPERATOR_NAMESPACE}"
VALUES = {"networkPolicy": {"enabled": True},
          "gangScheduling": {"coscheduling": {"enabled": True}, "volcano": {"enabled": True}},
          "podDisruptionBudget": {"enabled": True}}
Use = tuple[str, str, str, str]  # (verb, API group, resource, subresource)

# Granted, and needed, but not reached by this scenario.
NOT_EXERCISED: dict[Use, str] = {
    ("get", "finetune.dev", "finetunes", ""):
        "read only after a write was refused because the operator's copy was stale: a race this "
        "scenario cannot force (test_operator_scale_cluster forces it by calling reconcile directly)",
}


def granted(objects: list[dict[str, Any]]) -> set[Use]:
    uses: set[Use] = set()
    for role in (o for o in objects if o["kind"] in ("ClusterRole", "Role")):
        for rule in role.get("rules") or []:
            for group in rule.get("apiGroups") or [""]:
                for resource in rule.get("resources") or []:
                    plural, _, sub = resource.partition("/")
                    uses |= {(verb, group, plural, sub) for verb in rule["verbs"]}
    return uses


def used(cp, user: str) -> tuple[set[Use], list[dict[str, Any]]]:
    uses, forbidden = set(), []
    for event in cp.audit_events(user):
        ref = event.get("objectRef")
        if not ref:  # discovery (/api, /apis, /version): allowed to every authenticated user
            continue
        if (event.get("annotations") or {}).get("authorization.k8s.io/decision") == "forbid":
            forbidden.append(event)
        uses.add((event["verb"], ref.get("apiGroup", ""), ref["resource"], ref.get("subresource", "")))
    return uses, forbidden


@pytest.fixture(scope="module")
def audited_cp(control_plane) -> Iterator[Any]:
    """A control plane of its own, with the audit log on (``control_plane`` only so that
    conftest builds the binaries when this test runs alone)."""
    # The module conftest loaded (its name), so the session's teardown knows this one too.
    cp_module = load_module("finetune_tests_control_plane", REPO / "tests" / "cluster" / "control_plane.py")
    cp = cp_module.ControlPlane(audit_groups=(OPERATOR_GROUP,))
    cp.start()
    yield cp
    cp.stop()


@pytest.fixture(scope="module")
def chart_operator(audited_cp, tmp_path_factory) -> Iterator[subprocess.Popen]:
    kubeconfig = install_crd_and_chart_rbac(audited_cp, values=VALUES, namespace_flag=False)  # the chart's args
    install_pod_group_crds(audited_cp)
    audited_cp.kubectl("apply", "-f", str(CHART / "crds" / "kopf.dev_peerings.yaml"))  # as Helm installs crds/
    args, env = operator_command(render(VALUES))
    log = tmp_path_factory.mktemp("rbac") / "operator.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "finetune_operator.main", *args, f"--liveness=http://127.0.0.1:{free_port()}/healthz"],
        env={**os.environ, **env, "KUBECONFIG": str(kubeconfig), "FINETUNE_OPERATOR_METRICS_PORT": str(free_port()),
             "FINETUNE_OPERATOR_RECONCILE_INTERVAL": "1"},
        stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=REPO)
    yield proc
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"--- operator log ({log}) ---\n{Path(log).read_text(errors='replace')[-6000:]}")


def namespaced(cp, name: str) -> Cluster:
    cp.kubectl("create", "namespace", name)
    return Cluster(cp, name)


def run_scenario(cp) -> None:
    cluster = namespaced(cp, "scenario")
    # Create, run, a retryable failure and restart, suspend/resume, success, TTL.
    cluster.apply(cpu_finetune("life", ttlSecondsAfterFinished=1))
    cluster.set_all(cluster.wait_pods("life", 2), "Running")
    cluster.wait_phase("life", "Running")
    cluster.cp.set_pod_status(cluster.ns, "life-worker-1", "Failed", exit_code=137)
    cluster.set_all(cluster.wait_pods("life", 2, attempt=1), "Running")
    cluster.wait_phase("life", "Running")
    for suspend, phase in ((True, "Suspended"), (False, "Pending")):
        cp.kubectl("-n", cluster.ns, "patch", "ft", "life", "--type=merge", "-p", json.dumps({"spec": {"suspend": suspend}}))
        cluster.wait_phase("life", phase)
    cluster.set_all(cluster.wait_pods("life", 2, attempt=2), "Succeeded")  # (the resume: attempt 2)
    wait_for(lambda: cluster.finetune("life") is None, "the TTL to delete the FineTune")
    # A permanent failure: the worker still running is stopped (its pod kept for the logs).
    cluster.apply(cpu_finetune("broken"))
    pods = cluster.wait_pods("broken", 2)
    cluster.set_all(pods[:1], "Running")
    cluster.cp.set_pod_status(cluster.ns, "broken-worker-1", "Failed", exit_code=1)
    cluster.wait_phase("broken", "Failed")
    wait_for(lambda: cluster.live_pods("broken")[0]["spec"].get("activeDeadlineSeconds"), "the running worker stopped")
    # A model config from a ConfigMap (read to validate the spec; this one does not exist).
    with_config = cpu_finetune("configured")
    with_config["spec"]["model"]["config"] = {"configMapName": "models", "key": "model.yaml"}
    cluster.apply(with_config)
    cluster.wait_phase("configured", "Failed")
    # Deleted by its owner while Pending.
    cluster.apply(cpu_finetune("gone"))
    cluster.wait_pods("gone", 2)
    cp.kubectl("-n", cluster.ns, "delete", "ft", "gone")
    # Gang PodGroups for both schedulers, and a PodDisruptionBudget (policy/v1 first, then v1beta1 on 1.20).
    for name, policy in (("cosched", "Coscheduling"), ("volcano", "Volcano")):
        cluster.apply(cpu_finetune(name, scheduling={"gang": {"policy": policy}}, podDisruptionBudget={"enabled": True}))
        cluster.wait_pods(name, 2)
    wait_for(lambda: cp.kubectl("-n", cluster.ns, "get", "poddisruptionbudgets", "volcano", check=False).returncode == 0,
             "the PodDisruptionBudget")
    # A quota refusal.
    quota = namespaced(cp, "quota")
    cp.apply({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "pods"},
              "spec": {"hard": {"pods": "1"}}}, namespace=quota.ns)
    wait_for(lambda: cp.get_json("resourcequota", "pods", namespace=quota.ns).get("status", {}).get("hard"),
             "the quota to be counted")
    quota.apply(cpu_finetune("quota"))
    wait_for(lambda: quota.condition("quota", "QuotaExceeded").get("status") == "True", "QuotaExceeded")


def test_the_chart_grants_exactly_what_the_operator_uses(audited_cp, chart_operator):
    run_scenario(audited_cp)
    assert chart_operator.poll() is None, "the operator exited"
    # A watch is audited when it ends: stop the operator (its shutdown is part of the scenario).
    chart_operator.terminate()
    chart_operator.wait(timeout=30)
    objects = render(VALUES)
    account = next(o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount")
    user = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{account}"
    wait_for(lambda: ("watch", "finetune.dev", "finetunes", "") in used(audited_cp, user)[0],
             "the audit events of the operator's watches")
    uses, forbidden = used(audited_cp, user)
    assert not forbidden, [(e["verb"], e["requestURI"]) for e in forbidden]
    grants = granted([o for o in objects if o["kind"] in ("ClusterRole", "Role")])
    not_granted = sorted(uses - grants)
    assert not not_granted, f"used but not granted: {not_granted}"
    unused = sorted(grants - uses - set(NOT_EXERCISED))
    assert not unused, f"granted but never used: {unused}"
    assert set(NOT_EXERCISED) <= grants
