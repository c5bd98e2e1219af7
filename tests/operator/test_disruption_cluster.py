"""Disruption is not failure, on the real control plane (v1.20, no kubelet).

Worker pods that someone other than the operator takes away restart the run from its
checkpoint, counted in status.disruptions and never against backoffLimit: a preemption by the
real kube-scheduler (a small tainted Node, a higher-priority pod), the Eviction API, and the
Node's removal (the pod garbage collector deletes pods bound to a Node that is gone). On 1.20
nothing marks such a pod (the DisruptionTarget condition arrives in 1.26), so what the operator
goes by is that it did not delete the pod itself. A crash still counts against backoffLimit.
"""

from __future__ import annotations

import json

import pytest
from test_operator_cluster import Cluster, Operator, cpu_finetune, install_crd_and_chart_rbac, wait_for

# The pod garbage collector waits 40 s before it deletes the pods of a Node that is gone.
POD_GC_TIMEOUT = 120.0
TAINT_KEY = "finetune.dev/disruption-test"


@pytest.fixture
def cluster(control_plane, namespace) -> Cluster:
    return Cluster(control_plane, namespace)


@pytest.fixture
def operator(control_plane, namespace, tmp_path):
    op = Operator(install_crd_and_chart_rbac(control_plane), namespace, tmp_path / "operator.log")
    op.start()
    yield op
    op.stop()
    print(f"--- operator log ---\n{op.log_tail()}")  # shown when the test failed


# Where this test's pods go: Nodes only they tolerate, so the session's other tests never land there.
PLACEMENT = {"nodeSelector": {TAINT_KEY: "yes"},
             "tolerations": [{"key": TAINT_KEY, "operator": "Equal", "value": "yes", "effect": "NoSchedule"}]}


def add_node(c: Cluster, name: str) -> None:
    """Room for one attempt: 2 CPUs, the workers ask for 1 each."""
    c.cp.register_node(name, cpu="2", labels={TAINT_KEY: "yes"},
                       taints=[{"key": TAINT_KEY, "value": "yes", "effect": "NoSchedule"}])


def disruptions(c: Cluster, name: str, count: int) -> dict:
    return wait_for(lambda: (s := c.status(name)).get("disruptions") == count and s,
                    f"{name}: disruption {count} recorded")


def bound_pods(c: Cluster, name: str, attempt: int) -> list[dict]:
    """The attempt's two pods, once the scheduler has bound them (to either test node)."""
    c.wait_pods(name, 2, attempt=attempt)

    def bound() -> list[dict] | None:
        pods = c.live_pods(name)
        return pods if all(p["spec"].get("nodeName") for p in pods) else None

    try:
        return wait_for(bound, f"{name}'s attempt-{attempt} pods bound")
    except AssertionError as e:
        seen = [(p["metadata"]["name"], p["spec"].get("nodeName"), p["status"].get("conditions")) for p in c.pods(name)]
        others = c.cp.kubectl("get", "pods", "-A", "-o", "wide").stdout
        raise AssertionError(f"{e}; pods: {seen}\n{others}") from None


def test_preemption_eviction_and_node_loss_are_disruptions_and_a_crash_is_a_restart(cluster, operator):
    first, second = "disruption-node-1", "disruption-node-2"
    add_node(cluster, first)
    try:
        # backoffLimit 1: any of the three disruptions counted as a restart would fail the run.
        # (emptyDir volumes: the scheduler would wait for the sample's claims to exist.)
        body = cpu_finetune("victim", backoffLimit=1, scheduling=PLACEMENT)
        body["spec"]["dataset"]["volume"] = {"emptyDir": {}}
        body["spec"]["output"]["volume"] = {"emptyDir": {}}
        cluster.apply(body)
        pods = bound_pods(cluster, "victim", 0)
        cluster.set_all(pods, "Running")
        cluster.wait_phase("victim", "Running")

        # 1. The real kube-scheduler preempts both workers (1 CPU each) for a 2-CPU pod of higher priority.
        cluster.cp.kubectl("apply", "-f", "-", input=json.dumps({
            "apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
            "metadata": {"name": "disruption-test-urgent"}, "value": 100000}))
        cluster.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "urgent"}, "spec": {
            "priorityClassName": "disruption-test-urgent", **PLACEMENT,
            "containers": [{"name": "c", "image": "urgent:1", "resources": {"requests": {"cpu": "2"}}}]}})
        status = disruptions(cluster, "victim", 1)
        assert status["restarts"] == 0 and status["phase"] == "Restarting", status
        restarting = cluster.condition("victim", "Restarting")
        assert restarting["reason"] == "Disrupted" and "not counted against backoffLimit" in restarting["message"]
        assert "Disrupted" in cluster.events("victim")
        victims = [p for p in cluster.pods("victim") if p["metadata"].get("deletionTimestamp")]
        assert victims, "the scheduler deleted no worker"
        # Like a kubelet, finish the graceful deletions; the urgent pod takes a node, the next
        # attempt's pods wait until a second node comes (and the two may swap nodes).
        cluster.cp.reap_terminating_pods(cluster.ns)
        cluster.wait_pods("victim", 2, attempt=1)
        add_node(cluster, second)
        pods = bound_pods(cluster, "victim", 1)
        cluster.set_all(pods, "Running")
        cluster.wait_phase("victim", "Running")

        # 2. The Eviction API (no PodDisruptionBudget here, so it is granted).
        eviction = {"apiVersion": "policy/v1beta1", "kind": "Eviction",
                    "metadata": {"name": "victim-worker-1", "namespace": cluster.ns}}
        cluster.cp.kubectl("create", "--raw", f"/api/v1/namespaces/{cluster.ns}/pods/victim-worker-1/eviction",
                           "-f", "-", input=json.dumps(eviction))
        status = disruptions(cluster, "victim", 2)
        assert status["restarts"] == 0, status
        cluster.cp.reap_terminating_pods(cluster.ns)
        pods = bound_pods(cluster, "victim", 2)
        node = pods[0]["spec"]["nodeName"]  # (the urgent pod has the other one)
        assert pods[1]["spec"]["nodeName"] == node
        cluster.set_all(pods, "Running")
        cluster.wait_phase("victim", "Running")

        # 3. The Node goes (no node-lifecycle controller here): the pod garbage collector deletes its pods.
        cluster.cp.kubectl("delete", "node", node, "--wait=false")
        status = wait_for(lambda: (s := cluster.status("victim")).get("disruptions") == 3 and s,
                          "the node's removal recorded as a disruption", timeout=POD_GC_TIMEOUT)
        assert status["restarts"] == 0 and status["phase"] == "Restarting", status

        # A crash of the next attempt still counts against backoffLimit.
        pods = cluster.wait_pods("victim", 2, attempt=3)
        cluster.set_all(pods, "Running")
        cluster.wait_phase("victim", "Running")
        cluster.cp.set_pod_status(cluster.ns, "victim-worker-0", "Failed", exit_code=137, reason="OOMKilled")
        status = wait_for(lambda: (s := cluster.status("victim")).get("restarts") == 1 and s, "the crash counted")
        assert status["disruptions"] == 3 and status["phase"] == "Restarting", status
        assert operator.metrics().count("finetune_operator_disruptions_total 3.0") == 1
    finally:
        for node in (first, second):
            cluster.cp.kubectl("delete", "node", node, "--ignore-not-found", "--wait=false", check=False)
