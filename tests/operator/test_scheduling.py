"""Gang admission (spec.scheduling.gang) and the pod template passthrough (spec.pod,
spec.podDisruptionBudget), issue 15 parts 1 and 4: the pure manifests, the validation, and the
plan's hooks (PodGroup/PDB with the Service, retriable-in-group when a Kueue run fails for good).
No cluster; test_scheduling_cluster.py runs the same on the real control plane."""

from __future__ import annotations

import copy

import pytest

from finetune_operator import manifests as m
from finetune_operator import reconcile, validation
from finetune_operator.kube import Kube, KubeError
from finetune_operator.main import Options, platform_settings
from test_manifests import NOW, finetune_body, load_sample

ALL_ON = m.PlatformSettings(allowed_pod_references=frozenset(m.POD_REFERENCES),
                            scheduler_names={m.GANG_COSCHEDULING: "scheduler-plugins-scheduler",
                                             m.GANG_VOLCANO: "volcano"},
                            pod_disruption_budgets=True)


def cpu_spec(**changes) -> dict:
    spec = copy.deepcopy(load_sample("cpu-smoke")["spec"])
    spec.update(changes)
    return spec


def gang(policy: str | None = None, **fields) -> dict:
    return {"gang": {**({"policy": policy} if policy else {}), **fields}}


def pods(spec: dict, attempt: int = 0, settings: m.PlatformSettings | None = ALL_ON) -> list[dict]:
    owner = {"metadata": {"name": "run", "uid": "uid-1"}}
    return [m.build_worker_pod("run", "ml", spec, i, owner, attempt, settings=settings)
            for i in range(int(m.with_defaults(spec)["workers"]))]


def problems(spec: dict, settings: m.PlatformSettings = m.PlatformSettings()) -> list[str]:
    return validation.validate_spec("run", spec, settings=settings)


# --- gang admission: manifests -----------------------------------------------------------------------

def test_policy_defaults_to_kueue_with_a_queue_else_none():
    assert m.gang_policy(cpu_spec()) == m.GANG_NONE
    assert m.gang_policy(cpu_spec(scheduling={"queueName": "q"})) == m.GANG_KUEUE
    assert m.gang_policy(cpu_spec(scheduling={"queueName": "q", **gang("None")})) == m.GANG_NONE


def test_kueue_pod_group_label_and_count_on_every_worker_of_every_attempt():
    spec = cpu_spec(workers=3, batchSize=6, scheduling={"queueName": "team-a"})
    for attempt in (0, 1, 5):  # a restart's (or a preemption's) replacement pods join the same group
        for pod in pods(spec, attempt):
            labels, annotations = pod["metadata"]["labels"], pod["metadata"]["annotations"]
            assert labels["kueue.x-k8s.io/queue-name"] == "team-a"
            assert labels["kueue.x-k8s.io/pod-group-name"] == "run"
            assert annotations == {"kueue.x-k8s.io/pod-group-total-count": "3"}
            assert labels["finetune.dev/attempt"] == str(attempt)
            assert "schedulerName" not in pod["spec"]
    assert m.build_run_objects("run", "ml", spec, {"metadata": {"name": "run", "uid": "u"}}) == []


def test_policy_none_is_todays_behaviour():
    for pod in pods(cpu_spec(scheduling={"queueName": "q", **gang("None")})):
        assert "annotations" not in pod["metadata"]
        assert not {k for k in pod["metadata"]["labels"] if "pod-group" in k or "group-name" in k}
        assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "q"


def test_coscheduling_pod_group_label_scheduler_and_whole_gang_resources():
    spec = cpu_spec(resources={"requests": {"cpu": "1500m", "memory": "3Gi"}, "limits": {"memory": "4Gi"}},
                    scheduling={**gang("Coscheduling", scheduleTimeoutSeconds=120)})
    owner = {"metadata": {"name": "run", "uid": "uid-1"}}
    group = m.build_pod_group("run", "ml", spec, owner)
    assert group == {
        "apiVersion": "scheduling.x-k8s.io/v1alpha1", "kind": "PodGroup",
        "metadata": {"name": "run", "namespace": "ml", "labels": m.common_labels("run"),
                     "ownerReferences": [m.owner_reference(owner)]},
        # Two workers: the requests doubled; memory's request (not its limit) is what is reserved.
        "spec": {"minMember": 2, "minResources": {"cpu": "3000m", "memory": "6Gi"}, "scheduleTimeoutSeconds": 120},
    }
    for pod in pods(spec):
        assert pod["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] == "run"
        assert "annotations" not in pod["metadata"]
        assert pod["spec"]["schedulerName"] == "scheduler-plugins-scheduler"
    # The FineTune's own schedulerName wins over the chart's.
    named = cpu_spec(scheduling={**gang("Coscheduling"), "schedulerName": "gang-scheduler"})
    assert {p["spec"]["schedulerName"] for p in pods(named)} == {"gang-scheduler"}


def test_volcano_pod_group_annotation_queue_priority_and_gpus():
    spec = copy.deepcopy(load_sample("2x4gpu")["spec"])
    spec["scheduling"].pop("queueName")
    spec["scheduling"]["gang"] = {"policy": "Volcano", "queue": "research"}
    group = m.build_pod_group("run", "ml", spec, {"metadata": {"name": "run", "uid": "u"}})
    assert group["apiVersion"] == "scheduling.volcano.sh/v1beta1" and group["kind"] == "PodGroup"
    # A limit without a request counts as the request (nvidia.com/gpu: 4 per pod, 2 pods).
    assert group["spec"] == {"minMember": 2, "queue": "research", "priorityClassName": "training-high",
                             "minResources": {"cpu": "64", "memory": "128Gi", "nvidia.com/gpu": "8"}}
    for pod in pods(spec):
        assert pod["metadata"]["annotations"] == {"scheduling.k8s.io/group-name": "run"}
        assert pod["spec"]["schedulerName"] == "volcano"
        assert "kueue.x-k8s.io/queue-name" not in pod["metadata"]["labels"]


@pytest.mark.parametrize("quantity, factor, product", [
    ("64Gi", 2, "128Gi"), ("500m", 3, "1500m"), ("1.5", 2, "3"), (4, 8, "32"), ("100", 2, "200"),
    ("1e3", 2, "2000"), ("0.5Gi", 2, "1Gi"), ("2k", 128, "256k"),
])
def test_quantities_multiply_in_their_own_unit(quantity, factor, product):
    assert m.multiply_quantity(quantity, factor) == product


def test_two_by_four_gpu_sample_is_one_kueue_group():
    pods_ = reconcile.plan(finetune_body(load_sample("2x4gpu")), [], False, NOW, lambda: []).create_pods
    assert len(pods_) == 2
    for pod in pods_:
        assert pod["metadata"]["labels"]["kueue.x-k8s.io/pod-group-name"] == "yolov5m-retail-2x4gpu"
        assert pod["metadata"]["annotations"]["kueue.x-k8s.io/pod-group-total-count"] == "2"


# --- gang admission: validation -----------------------------------------------------------------------

def test_gang_policies_need_their_queue_or_the_charts_scheduler():
    assert problems(cpu_spec(scheduling={"queueName": "q"})) == []
    [kueue] = problems(cpu_spec(scheduling=gang("Kueue")))
    assert "spec.scheduling.gang.policy Kueue needs spec.scheduling.queueName" in kueue
    for policy in ("Coscheduling", "Volcano"):
        [off] = problems(cpu_spec(scheduling=gang(policy)))
        assert f"PodGroups for {policy} are not enabled on this cluster" in off
        assert f"gangScheduling.{policy.lower()}.enabled" in off
        assert problems(cpu_spec(scheduling=gang(policy)), ALL_ON) == []
        [both] = problems(cpu_spec(scheduling={"queueName": "q", **gang(policy)}), ALL_ON)
        assert "remove queueName, or use policy Kueue" in both
    [misplaced] = problems(cpu_spec(scheduling={"queueName": "q", **gang(queue="research")}), ALL_ON)
    assert misplaced.startswith("spec.scheduling.gang.queue applies to policy Volcano only (this one is Kueue)")


def test_a_pod_group_api_the_cluster_does_not_serve_fails_validation():
    class Discovery:
        def __init__(self, served):
            self.served, self.asked = served, []

        def get_or_none(self, path):
            self.asked.append(path)
            return {"kind": "APIResourceList"} if path in self.served else None

    finetune = {"metadata": {"name": "run", "namespace": "ml"}, "spec": cpu_spec(scheduling=gang("Volcano"))}
    missing = Discovery(served=())
    [problem] = reconcile.validate_in_cluster(missing, finetune, settings=ALL_ON)
    assert missing.asked == ["/apis/scheduling.volcano.sh/v1beta1"]
    assert problem == ("spec.scheduling.gang.policy Volcano: this cluster serves no scheduling.volcano.sh/v1beta1 "
                       "PodGroups; ask the platform team to install Volcano (its PodGroup CRD), or use another gang "
                       "policy")
    assert reconcile.validate_in_cluster(Discovery(served=missing.asked), finetune, settings=ALL_ON) == []
    # Other policies ask nothing.
    plain = Discovery(served=())
    finetune["spec"] = cpu_spec(scheduling={"queueName": "q"})
    assert reconcile.validate_in_cluster(plain, finetune, settings=ALL_ON) == [] and plain.asked == []


# --- the plan: PodGroup/PDB with the Service, retriable-in-group on a final failure -------------------

def body_with(**spec_changes) -> dict:
    body = finetune_body(load_sample("cpu-smoke"))
    body["metadata"]["name"] = "run"
    body["spec"].update(spec_changes)
    return body


def test_pod_group_and_budget_come_with_the_service_only():
    body = body_with(scheduling=gang("Coscheduling"), podDisruptionBudget={"enabled": True})
    first = reconcile.plan(body, [], False, NOW, lambda: [], settings=ALL_ON)
    assert [o["kind"] for o in first.create_objects] == ["PodGroup", "PodDisruptionBudget"]
    pdb = first.create_objects[1]
    assert pdb["apiVersion"] == "policy/v1" and pdb["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert pdb["spec"] == {"minAvailable": 2, "selector": {"matchLabels": m.selector_labels("run")}}
    assert {p["spec"]["schedulerName"] for p in first.create_pods} == {"scheduler-plugins-scheduler"}
    body["status"] = first.status
    assert reconcile.plan(body, first.create_pods, True, NOW, lambda: [], settings=ALL_ON).create_objects == []
    assert reconcile.plan(body_with(), [], False, NOW, lambda: []).create_objects == []


def failed_pods(created: list[dict], code: int) -> list[dict]:
    result = []
    for i, pod in enumerate(copy.deepcopy(created)):
        pod["metadata"]["uid"] = f"pod-{i}"
        state = {"terminated": {"exitCode": code, "reason": "Error"}} if i == 1 else {"running": {}}
        pod["status"] = {"phase": "Failed" if i == 1 else "Running",
                         "containerStatuses": [{"name": "trainer", "state": state}]}
        result.append(pod)
    return result


def test_a_kueue_run_that_fails_for_good_marks_its_pods_not_retriable():
    body = body_with(scheduling={"queueName": "q"}, backoffLimit=1)
    first = reconcile.plan(body, [], False, NOW, lambda: [])
    body["status"] = {**first.status, "phase": "Running"}
    # A retryable failure restarts in the same group: nothing released.
    restart = reconcile.plan(body, failed_pods(first.create_pods, 137), True, NOW, lambda: [])
    assert restart.status["phase"] == "Restarting" and restart.release_pods == []
    # A permanent one ends the run: Kueue is told, on every pod of the group.
    final = reconcile.plan(body, failed_pods(first.create_pods, 1), True, NOW, lambda: [])
    assert final.status["phase"] == "Failed" and final.release_pods == ["run-worker-0", "run-worker-1"]
    # Without Kueue there is nothing to release; and a finished run is not released twice.
    plain = body_with(backoffLimit=1)
    plain["status"] = {**reconcile.plan(plain, [], False, NOW, lambda: []).status, "phase": "Running"}
    assert reconcile.plan(plain, failed_pods(first.create_pods, 1), True, NOW, lambda: []).release_pods == []
    body["status"] = final.status
    assert reconcile.plan(body, failed_pods(first.create_pods, 1), True, NOW, lambda: []).release_pods == []


class RecordingKube(Kube):
    """The calls _execute makes, in order (Kube's own create_object on top of a recorded create)."""

    def __init__(self, missing_versions=()):
        self.calls, self.missing_versions = [], set(missing_versions)
        self._served_versions = {}

    def patch_finetune(self, namespace, name, patch, status=False, resource_version=None):
        self.calls.append(("patch_finetune", status))
        return {"metadata": {"namespace": namespace, "name": name, "resourceVersion": "2"}, "status": patch.get("status")}

    def patch_pod(self, namespace, name, patch):
        self.calls.append(("patch_pod", name, patch))

    def delete(self, namespace, plural, name, uid=None):
        self.calls.append(("delete", plural, name))

    def create(self, namespace, plural, body):
        if body["apiVersion"] in self.missing_versions:
            self.calls.append(("404", plural, body["apiVersion"]))
            raise KubeError(404, "NotFound", "the server could not find the requested resource")
        self.calls.append(("create", plural, body.get("apiVersion"), body["metadata"]["name"]))
        return body


def test_execute_creates_the_objects_before_the_service_and_falls_back_to_policy_v1beta1():
    body = body_with(scheduling=gang("Volcano"), podDisruptionBudget={"enabled": True})
    body["metadata"]["resourceVersion"] = "1"
    first = reconcile.plan(body, [], False, NOW, lambda: [], settings=ALL_ON)
    kube = RecordingKube(missing_versions={"policy/v1"})  # Kubernetes 1.20
    reconcile._execute(kube, body, first, None, None)
    creates = [c for c in kube.calls if c[0] in ("create", "404")]
    assert creates == [("create", "podgroups", "scheduling.volcano.sh/v1beta1", "run"),
                       ("404", "poddisruptionbudgets", "policy/v1"),
                       ("create", "poddisruptionbudgets", "policy/v1beta1", "run"),
                       ("create", "services", "v1", "run"),
                       ("create", "pods", "v1", "run-worker-0"), ("create", "pods", "v1", "run-worker-1")]
    # The served version is remembered: no second 404.
    kube.calls.clear()
    kube.create_object("ml", first.create_objects[1])
    assert kube.calls == [("create", "poddisruptionbudgets", "policy/v1beta1", "run")]


def test_execute_marks_the_group_before_deleting_or_stopping_pods():
    body = body_with(scheduling={"queueName": "q"}, activeDeadlineSeconds=60)
    first = reconcile.plan(body, [], False, NOW, lambda: [])
    body["status"] = {**first.status, "phase": "Running", "startTime": "2026-01-01T00:00:00Z"}
    body["metadata"]["resourceVersion"] = "1"
    running = failed_pods(first.create_pods, 0)
    for pod in running:
        pod["status"] = {"phase": "Running", "containerStatuses": [{"name": "trainer", "state": {"running": {}}}]}
    deadline = reconcile.plan(body, running, True, NOW, lambda: [])
    assert deadline.status["phase"] == "Failed" and deadline.release_pods == ["run-worker-0", "run-worker-1"]
    kube = RecordingKube()
    reconcile._execute(kube, body, deadline, None, None)
    acts = [c[:2] for c in kube.calls if c[0] in ("patch_pod", "delete")]
    assert acts == [("patch_pod", "run-worker-0"), ("patch_pod", "run-worker-1"),
                    ("delete", "pods"), ("delete", "pods")]
    patches = [c[2] for c in kube.calls if c[0] == "patch_pod"]
    assert patches == [{"metadata": {"annotations": {"kueue.x-k8s.io/retriable-in-group": "false"}}}] * 2


# --- the pod template passthrough ---------------------------------------------------------------------

def test_pod_template_fields_reach_every_worker():
    template = {
        "labels": {"cost-center": "cv-42", "team.example.com/owner": "vision"},
        "annotations": {"policy.example.com/tier": "batch", "note": "anything: goes here"},
        "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}, {"name": "EMPTY"},
                {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "key"}}},
                {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode", "optional": True}}}],
        "imagePullSecrets": [{"name": "regcred"}],
        "serviceAccountName": "trainer",
        "runtimeClassName": "nvidia",
        "terminationGracePeriodSeconds": 300,
    }
    spec = cpu_spec(pod=template, scheduling={"queueName": "q"})
    assert problems(spec, ALL_ON) == []
    for index, pod in enumerate(pods(spec)):
        meta, pod_spec = pod["metadata"], pod["spec"]
        assert meta["labels"]["cost-center"] == "cv-42" and meta["labels"]["team.example.com/owner"] == "vision"
        assert meta["labels"]["finetune.dev/worker-index"] == str(index)
        assert meta["annotations"] == {"policy.example.com/tier": "batch", "note": "anything: goes here",
                                       "kueue.x-k8s.io/pod-group-total-count": "2"}
        env = pod_spec["containers"][0]["env"]
        assert env[:2] == [{"name": "FINETUNE_NAME", "value": "run"}, {"name": "PYTHONUNBUFFERED", "value": "1"}]
        assert env[2:] == [{"name": "HF_HUB_OFFLINE", "value": "1"}, {"name": "EMPTY", "value": ""},
                           {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "key"}}},
                           {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode",
                                                                              "optional": True}}}]
        assert pod_spec["imagePullSecrets"] == [{"name": "regcred"}]
        assert pod_spec["serviceAccountName"] == "trainer"
        # The ServiceAccount's own automountServiceAccountToken decides.
        assert "automountServiceAccountToken" not in pod_spec
        assert pod_spec["runtimeClassName"] == "nvidia"
        assert pod_spec["terminationGracePeriodSeconds"] == 300


def test_defaults_mount_no_token_and_keep_a_minute_of_grace():
    [pod, _] = pods(cpu_spec())
    assert pod["spec"]["automountServiceAccountToken"] is False and "serviceAccountName" not in pod["spec"]
    assert pod["spec"]["terminationGracePeriodSeconds"] == 60
    assert "annotations" not in pod["metadata"]


@pytest.mark.parametrize("key", [
    "finetune.dev/name", "finetune.dev/anything", "app.kubernetes.io/name", "app.kubernetes.io/instance",
    "app.kubernetes.io/component", "app.kubernetes.io/managed-by", "kueue.x-k8s.io/queue-name",
    "kueue.x-k8s.io/pod-group-name", "kueue.x-k8s.io/retriable-in-group", "scheduling.x-k8s.io/pod-group",
    "scheduling.k8s.io/group-name", "scheduling.volcano.sh/queue-name",
])
def test_reserved_keys_are_refused_in_labels_and_annotations(key):
    for field in ("labels", "annotations"):
        [problem] = problems(cpu_spec(pod={field: {key: "x"}}), ALL_ON)
        assert problem.startswith(f"spec.pod.{field} key {key!r} is reserved: the operator sets it")


def test_ordinary_keys_are_fine_and_malformed_ones_named():
    assert problems(cpu_spec(pod={"labels": {"app.kubernetes.io/part-of": "vision", "team": "a"}})) == []
    [bad_key] = problems(cpu_spec(pod={"labels": {"Bad/Prefix/key": "x"}}))
    assert bad_key.startswith("spec.pod.labels key 'Bad/Prefix/key' is not a valid key")
    [bad_value] = problems(cpu_spec(pod={"labels": {"team": "not a value"}}))
    assert bad_value.startswith("spec.pod.labels.team: 'not a value' is not a label value")


def test_references_only_where_the_chart_allows_them():
    spec = cpu_spec(pod={"env": [{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "db", "key": "pw"}}},
                                 {"name": "CFG", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}],
                         "serviceAccountName": "admin"})
    secret, configmap, account = problems(spec)
    assert secret == ("spec.pod.env[0] (KEY).valueFrom: secretKeyRef 'db' is not allowed on this cluster (allowed "
                      "pod references: none); use a plain value, or ask the platform team to allow secretKeyRef (the "
                      "chart's allowedPodReferences)")
    assert configmap.startswith("spec.pod.env[1] (CFG).valueFrom: configMapKeyRef 'c' is not allowed")
    assert account.startswith("spec.pod.serviceAccountName: ServiceAccount 'admin' is not allowed on this cluster")
    assert "remove it, or ask the platform team to allow serviceAccountName" in account
    only_config = m.PlatformSettings(allowed_pod_references=frozenset({"configMapKeyRef"}))
    assert [p.split(":")[0] for p in problems(spec, only_config)] == ["spec.pod.env[0] (KEY).valueFrom",
                                                                       "spec.pod.serviceAccountName"]
    assert problems(spec, ALL_ON) == []


def test_env_names_the_operator_sets_or_twice_are_refused():
    spec = cpu_spec(pod={"env": [{"name": "FINETUNE_NAME", "value": "x"}, {"name": "A", "value": "1"},
                                 {"name": "A", "value": "2"},
                                 {"name": "B", "value": "1", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}]})
    assert problems(spec, ALL_ON) == [
        "spec.pod.env[0] (FINETUNE_NAME): the operator sets FINETUNE_NAME itself; remove it",
        "spec.pod.env[2] (A): A is set twice; keep one",
        "spec.pod.env[3] (B) sets both value and valueFrom; keep one",
    ]


def test_a_budget_needs_the_chart():
    [off] = problems(cpu_spec(podDisruptionBudget={"enabled": True}))
    assert off.startswith("spec.podDisruptionBudget: PodDisruptionBudgets are not enabled on this cluster")
    assert problems(cpu_spec(podDisruptionBudget={"enabled": True}), ALL_ON) == []
    assert problems(cpu_spec(podDisruptionBudget={"enabled": False})) == []


def test_operator_settings_from_the_charts_environment():
    settings = platform_settings(Options.from_environment({
        "FINETUNE_OPERATOR_ALLOWED_POD_REFERENCES": "secretKeyRef, serviceAccountName",
        "FINETUNE_OPERATOR_VOLCANO_SCHEDULER": "volcano",
        "FINETUNE_OPERATOR_POD_DISRUPTION_BUDGETS": "true",
    }))
    assert settings == m.PlatformSettings(allowed_pod_references=frozenset({"secretKeyRef", "serviceAccountName"}),
                                          scheduler_names={"Volcano": "volcano"}, pod_disruption_budgets=True)
    assert platform_settings(Options()) == m.PlatformSettings()
    with pytest.raises(ValueError, match="unknown pod reference.s. hostPath in the allowed pod references"):
        platform_settings(Options(allowed_pod_references="secretKeyRef,hostPath"))
