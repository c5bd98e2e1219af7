"""Gang admission and the pod template passthrough (issue 15 parts 1 and 4) on the real control
plane (v1.20, no kubelet, no Kueue, no gang scheduler).

The operator runs as its own release of the chart with gang scheduling (Coscheduling, Volcano),
PodDisruptionBudgets and every pod reference enabled, so with exactly the RBAC and settings the
chart gives it then. The scheduler-plugins and Volcano PodGroup CRDs are applied as they are
(tests/data/scheduling, copies of shared/scheduling). Neither scheduler nor Kueue runs here: the tests show what the operator's
side of each contract puts on the apiserver (PodGroups it accepts, the pods' labels,
annotations and schedulerName, the retriable-in-group mark), not that a gang is admitted.
The PodDisruptionBudget is enforced for real: the controller-manager's disruption controller
counts the workers and the Eviction API refuses to evict one.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from support.chart import operator_command, render
from support.scheduling import install_pod_group_crds
from test_operator_cluster import GC_TIMEOUT, Cluster, Operator, cpu_finetune, install_crd_and_chart_rbac, wait_for

pytestmark = pytest.mark.cluster

RELEASE = "ft-scheduling"
CHART_VALUES = {
    "gangScheduling": {"coscheduling": {"enabled": True}, "volcano": {"enabled": True}},
    "podDisruptionBudget": {"enabled": True},
    "allowedPodReferences": ["configMapKeyRef", "secretKeyRef", "serviceAccountName"],
}
COSCHEDULING = "podgroups.scheduling.x-k8s.io"
VOLCANO = "podgroups.scheduling.volcano.sh"
RUNTIME_CLASS = "finetune-test-runc"


def settings_for(values: dict[str, Any]) -> dict[str, str]:
    """The operator settings the chart's Deployment passes with these values."""
    _, env = operator_command(render(values, RELEASE))
    return {k: v for k, v in env.items() if k.startswith("FINETUNE_OPERATOR_")}


@pytest.fixture(scope="module")
def scheduling_kubeconfig(control_plane):
    install_pod_group_crds(control_plane)
    kubeconfig = install_crd_and_chart_rbac(control_plane, values=CHART_VALUES, release=RELEASE)
    control_plane.apply([
        {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": "training-high"},
         "value": 1000},
        # The RuntimeClass admission plugin refuses pods naming a RuntimeClass that does not exist.
        {"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": RUNTIME_CLASS},
         "handler": "runc"},
    ])
    return kubeconfig


@pytest.fixture
def cluster(control_plane, namespace) -> Cluster:
    return Cluster(control_plane, namespace)


@pytest.fixture
def start_operator(scheduling_kubeconfig, namespace, tmp_path):
    """start_operator(settings) runs the operator with these settings (stopped after the test)."""
    started = []

    def start(settings: dict[str, str]) -> Operator:
        op = Operator(scheduling_kubeconfig, namespace, tmp_path / f"operator-{len(started)}.log", env=settings)
        op.start()
        started.append(op)
        return op

    yield start
    for op in started:
        op.stop()
        print(f"--- operator log ({op.log_path}) ---\n{op.log_tail()}")


@pytest.fixture
def operator(start_operator) -> Operator:
    return start_operator(settings_for(CHART_VALUES))


def get_json(cluster: Cluster, *args: str) -> dict[str, Any] | None:
    proc = cluster.cp.kubectl("-n", cluster.ns, "get", *args, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def selected_pods(cluster: Cluster, selector: str) -> list[str]:
    """The pods the apiserver itself selects with this label selector."""
    return sorted(p["metadata"]["name"] for p in get_json(cluster, "pods", "-l", selector)["items"])


def assert_owned_by(obj: dict[str, Any], finetune: dict[str, Any]) -> None:
    [owner] = obj["metadata"]["ownerReferences"]
    assert owner["kind"] == "FineTune" and owner["uid"] == finetune["metadata"]["uid"] and owner["controller"]


def delete_and_wait_for_collection(cluster: Cluster, name: str, *resources: str) -> None:
    cluster.cp.kubectl("-n", cluster.ns, "delete", "ft", name, "--wait=false")
    for resource in resources:
        wait_for(lambda: get_json(cluster, resource, name) is None, f"garbage collection of {resource} {name}",
                 timeout=GC_TIMEOUT)


def gang_finetune(name: str, gang: dict[str, Any], **scheduling: Any) -> dict[str, Any]:
    body = cpu_finetune(name, resources={"requests": {"cpu": "1500m", "memory": "1Gi"}, "limits": {"memory": "3Gi"}})
    body["spec"]["scheduling"] = {"gang": gang, **scheduling}
    return body


# --- the reference CRDs ------------------------------------------------------------------------------

def test_the_pod_group_crds_are_served_with_their_schemas(scheduling_kubeconfig, cluster):
    def dry_run(group: str, spec: dict[str, Any]):
        body = {"apiVersion": group, "kind": "PodGroup", "metadata": {"name": "probe"}, "spec": spec}
        return cluster.cp.kubectl("-n", cluster.ns, "apply", "--dry-run=server", "-f", "-",
                                  input=json.dumps(body), check=False)

    assert dry_run("scheduling.x-k8s.io/v1alpha1", {"minMember": 2}).returncode == 0
    refused = dry_run("scheduling.x-k8s.io/v1alpha1", {"minMember": 0})
    assert refused.returncode != 0 and "spec.minMember" in refused.stderr
    assert dry_run("scheduling.volcano.sh/v1beta1", {"minMember": 2, "queue": "research"}).returncode == 0
    refused = dry_run("scheduling.volcano.sh/v1beta1", {"minMember": 2, "queue": "Not_A_Queue"})
    assert refused.returncode != 0 and "spec.queue" in refused.stderr


# --- gang admission ----------------------------------------------------------------------------------

def test_coscheduling_pod_group_is_accepted_owned_and_selects_the_workers(cluster, operator):
    cluster.apply(gang_finetune("cosched", {"policy": "Coscheduling", "scheduleTimeoutSeconds": 60}))
    pods = cluster.wait_pods("cosched", 2)
    group = wait_for(lambda: get_json(cluster, COSCHEDULING, "cosched"), "the coscheduling PodGroup")
    finetune = cluster.finetune("cosched")
    assert_owned_by(group, finetune)
    # The whole gang: minMember = workers, each pod's requests twice.
    assert group["spec"] == {"minMember": 2, "minResources": {"cpu": "3000m", "memory": "2Gi"},
                             "scheduleTimeoutSeconds": 60}
    for pod in pods:
        assert pod["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] == "cosched"
        assert pod["spec"]["schedulerName"] == "scheduler-plugins-scheduler"
    assert selected_pods(cluster, "scheduling.x-k8s.io/pod-group=cosched") == ["cosched-worker-0", "cosched-worker-1"]
    delete_and_wait_for_collection(cluster, "cosched", COSCHEDULING)


def test_volcano_pod_group_is_accepted_owned_and_annotated_on_the_workers(cluster, operator):
    cluster.apply(gang_finetune("vc", {"policy": "Volcano", "queue": "research"}, priorityClassName="training-high"))
    pods = cluster.wait_pods("vc", 2)
    group = wait_for(lambda: get_json(cluster, VOLCANO, "vc"), "the Volcano PodGroup")
    assert_owned_by(group, cluster.finetune("vc"))
    assert group["spec"] == {"minMember": 2, "minResources": {"cpu": "3000m", "memory": "2Gi"},
                             "queue": "research", "priorityClassName": "training-high"}
    for pod in pods:
        assert pod["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == "vc"
        assert pod["spec"]["schedulerName"] == "volcano"
        assert pod["spec"]["priorityClassName"] == "training-high"
    delete_and_wait_for_collection(cluster, "vc", VOLCANO)


def kueue_group(pod: dict[str, Any]) -> tuple[str | None, str | None, str | None]:
    meta = pod["metadata"]
    return (meta["labels"].get("kueue.x-k8s.io/queue-name"), meta["labels"].get("kueue.x-k8s.io/pod-group-name"),
            (meta.get("annotations") or {}).get("kueue.x-k8s.io/pod-group-total-count"))


def test_kueue_pod_group_survives_restarts_and_a_final_failure_releases_it(cluster, operator):
    cluster.apply(cpu_finetune("queued", backoffLimit=2, scheduling={"queueName": "team-a"}))
    pods = cluster.wait_pods("queued", 2)
    assert [kueue_group(p) for p in pods] == [("team-a", "queued", "2")] * 2
    # A retryable failure: the replacement pods join the same group.
    cluster.set_all(pods, "Running")
    cluster.wait_phase("queued", "Running")
    cluster.cp.set_pod_status(cluster.ns, "queued-worker-1", "Failed", exit_code=137)
    pods = cluster.wait_pods("queued", 2, attempt=1)
    assert [kueue_group(p) for p in pods] == [("team-a", "queued", "2")] * 2
    assert not [p for p in pods if "kueue.x-k8s.io/retriable-in-group" in (p["metadata"].get("annotations") or {})]
    # Every pod of the group deleted at once, as Kueue preempts: whatever the operator counts it
    # as, the pods it creates next are in the group again.
    cluster.set_all(pods, "Running")
    cluster.wait_phase("queued", "Running")
    deleted = {p["metadata"]["uid"] for p in pods}
    cluster.cp.kubectl("-n", cluster.ns, "delete", "pods", "-l", "kueue.x-k8s.io/pod-group-name=queued",
                       "--wait=false")
    pods = wait_for(lambda: (live := cluster.live_pods("queued")) and len(live) == 2
                    and not {p["metadata"]["uid"] for p in live} & deleted and live, "the group's pods recreated")
    assert [kueue_group(p) for p in pods] == [("team-a", "queued", "2")] * 2
    # A permanent failure ends the run: every pod of the group says it is not retriable, so Kueue
    # finishes the Workload and frees the quota.
    cluster.set_all(pods[:1], "Running")
    cluster.cp.set_pod_status(cluster.ns, pods[1]["metadata"]["name"], "Failed", exit_code=1)
    cluster.wait_phase("queued", "Failed")
    marked = wait_for(lambda: [p for p in cluster.live_pods("queued")
                               if (p["metadata"].get("annotations") or {}).get("kueue.x-k8s.io/retriable-in-group")
                               == "false"], "retriable-in-group on the pods")
    assert sorted(p["metadata"]["name"] for p in marked) == ["queued-worker-0", "queued-worker-1"]


# --- the pod template passthrough ---------------------------------------------------------------------

def test_pod_template_fields_reach_the_workers(cluster, operator):
    cluster.cp.kubectl("-n", cluster.ns, "create", "serviceaccount", "trainer")
    body = cpu_finetune("templated", scheduling={"queueName": "team-a"}, pod={
        "labels": {"cost-center": "cv-42", "app.kubernetes.io/part-of": "vision"},
        "annotations": {"policy.example.com/tier": "batch"},
        "env": [{"name": "HF_HUB_OFFLINE", "value": "1"},
                {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "key"}}},
                {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode", "optional": True}}}],
        "imagePullSecrets": [{"name": "regcred"}],
        "serviceAccountName": "trainer",
        "runtimeClassName": RUNTIME_CLASS,
        "terminationGracePeriodSeconds": 300,
    })
    cluster.apply(body)
    pods = cluster.wait_pods("templated", 2)
    assert selected_pods(cluster, "cost-center=cv-42") == ["templated-worker-0", "templated-worker-1"]
    for index, pod in enumerate(pods):
        meta, spec = pod["metadata"], pod["spec"]
        assert meta["labels"]["app.kubernetes.io/part-of"] == "vision"
        assert meta["labels"]["finetune.dev/worker-index"] == str(index)
        # (1.20's apiserver adds the seccomp annotations of the pod's seccompProfile.)
        assert meta["annotations"].items() >= {"policy.example.com/tier": "batch",
                                               "kueue.x-k8s.io/pod-group-total-count": "2"}.items()
        env = spec["containers"][0]["env"]
        assert env[2:] == body["spec"]["pod"]["env"]
        assert spec["imagePullSecrets"] == [{"name": "regcred"}]
        assert spec["serviceAccountName"] == "trainer"
        assert "automountServiceAccountToken" not in spec  # the ServiceAccount's own setting decides
        assert spec["runtimeClassName"] == RUNTIME_CLASS
        assert spec["terminationGracePeriodSeconds"] == 300


def test_what_the_chart_does_not_allow_fails_without_pods(cluster, start_operator):
    start_operator(settings_for({}))  # the chart's defaults: no references, no PodGroups, no budgets
    body = cpu_finetune("refused", pod={
        "labels": {"finetune.dev/name": "someone-else", "kueue.x-k8s.io/queue-name": "free-quota"},
        "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "operator-token", "key": "token"}}}],
        "serviceAccountName": "admin",
    }, podDisruptionBudget={"enabled": True})
    body["spec"]["scheduling"] = {"gang": {"policy": "Coscheduling"}}
    cluster.apply(body)
    cluster.wait_phase("refused", "Failed")
    failed = cluster.condition("refused", "Failed")
    assert failed["reason"] == "ValidationFailed"
    for text in ("spec.pod.labels key 'finetune.dev/name' is reserved",
                 "spec.pod.labels key 'kueue.x-k8s.io/queue-name' is reserved",
                 "spec.pod.env[0] (TOKEN).valueFrom: secretKeyRef 'operator-token' is not allowed on this cluster",
                 "spec.pod.serviceAccountName: ServiceAccount 'admin' is not allowed on this cluster",
                 "spec.scheduling.gang.policy Coscheduling: PodGroups for Coscheduling are not enabled",
                 "spec.podDisruptionBudget: PodDisruptionBudgets are not enabled on this cluster"):
        assert text in failed["message"], text
    assert not cluster.pods("refused") and get_json(cluster, COSCHEDULING, "refused") is None


def test_the_apiserver_refuses_a_malformed_pod_template(scheduling_kubeconfig, cluster):
    for pod, field in (({"labels": {"team": "not a value"}}, "spec.pod.labels.team"),
                       ({"env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]},
                        "spec.pod.env.valueFrom"),
                       ({"terminationGracePeriodSeconds": 0}, "spec.pod.terminationGracePeriodSeconds")):
        proc = cluster.cp.kubectl("-n", cluster.ns, "apply", "--dry-run=server", "-f", "-",
                                  input=json.dumps(cpu_finetune("malformed", pod=pod)), check=False)
        assert proc.returncode != 0 and field in proc.stderr, (pod, proc.stderr)
    proc = cluster.cp.kubectl("-n", cluster.ns, "apply", "--dry-run=server", "-f", "-", check=False,
                              input=json.dumps(cpu_finetune("malformed", scheduling={"gang": {"policy": "Gang"}})))
    assert proc.returncode != 0 and 'spec.scheduling.gang.policy: Unsupported value: "Gang"' in proc.stderr


def test_pod_disruption_budget_makes_an_eviction_wait(cluster, operator):
    cluster.apply(cpu_finetune("guarded", podDisruptionBudget={"enabled": True}))
    pods = cluster.wait_pods("guarded", 2)
    # Kubernetes 1.20 serves policy/v1beta1 only: the operator fell back to it.
    budget = wait_for(lambda: get_json(cluster, "poddisruptionbudgets", "guarded"), "the PodDisruptionBudget")
    assert_owned_by(budget, cluster.finetune("guarded"))
    assert budget["spec"]["minAvailable"] == 2
    selector = ",".join(f"{k}={v}" for k, v in sorted(budget["spec"]["selector"]["matchLabels"].items()))
    assert selected_pods(cluster, selector) == ["guarded-worker-0", "guarded-worker-1"]
    cluster.set_all(pods, "Running")
    # The disruption controller counts both workers healthy and allows no disruption.
    status = wait_for(lambda: (s := get_json(cluster, "poddisruptionbudgets", "guarded").get("status") or {})
                      .get("currentHealthy") == 2 and s, "the budget's status")
    assert status["disruptionsAllowed"] == 0 and status["expectedPods"] == 2
    eviction = {"apiVersion": "policy/v1beta1", "kind": "Eviction",
                "metadata": {"name": "guarded-worker-0", "namespace": cluster.ns}}
    proc = cluster.cp.kubectl("create", "--raw", f"/api/v1/namespaces/{cluster.ns}/pods/guarded-worker-0/eviction",
                              "-f", "-", input=json.dumps(eviction), check=False)
    assert proc.returncode != 0 and "disruption budget" in proc.stderr, proc.stderr
    assert [p["metadata"]["name"] for p in cluster.live_pods("guarded")] == ["guarded-worker-0", "guarded-worker-1"]
    delete_and_wait_for_collection(cluster, "guarded", "poddisruptionbudgets")
