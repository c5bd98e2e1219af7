"""Unit tests of the operator's pure parts: manifests, validation, status, scraping, the state
machine and the operator metrics. No cluster, no kopf runtime, no torch."""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import sys

import pytest
from prometheus_client import CollectorRegistry, Gauge, generate_latest, start_http_server

from finetune_operator import manifests as m
from finetune_operator import metrics as operator_metrics
from finetune_operator import reconcile, scrape, validation
from finetune_operator import status as st
from finetune_operator.main import Options

from pathlib import Path

import yaml

SAMPLES_DIR = Path(__file__).resolve().parents[2] / "crds" / "samples"
SAMPLE_FILES = {
    "freeze-backbone-1gpu": "finetune-freeze-backbone-1gpu.yaml",
    "2x4gpu": "finetune-2x4gpu.yaml",
    "cpu-smoke": "finetune-cpu-smoke.yaml",
}


def load_sample(key: str) -> dict:
    return yaml.safe_load((SAMPLES_DIR / SAMPLE_FILES[key]).read_text())


def finetune_body(sample: dict, namespace: str = "ml", uid: str = "uid-1", generation: int = 1) -> dict:
    """A sample as the apiserver returns it (namespace, uid, generation, empty status)."""
    body = copy.deepcopy(sample)
    body["metadata"].update(namespace=namespace, uid=uid, generation=generation)
    body["status"] = {}
    return body

NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)


def pods_for(key: str) -> list[dict]:
    """The pods the operator's first reconcile of a sample creates."""
    return reconcile.plan(finetune_body(load_sample(key)), [], False, NOW, lambda: []).create_pods


def command_after(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


# --- manifests -------------------------------------------------------------------------------------

def test_operator_does_not_import_torch():
    import finetune_operator.main  # noqa: F401  (imports handlers, runtime, validation, ...)
    assert "torch" not in sys.modules or "finetune_operator" not in getattr(sys.modules["torch"], "__file__", "")


def test_every_sample_pod_is_restricted_owned_and_labelled(sample_key):
    sample = load_sample(sample_key)
    name = sample["metadata"]["name"]
    pods = pods_for(sample_key)
    assert [p["metadata"]["name"] for p in pods] == [f"{name}-worker-{i}" for i in range(sample["spec"]["workers"])]
    for index, pod in enumerate(pods):
        meta, spec = pod["metadata"], pod["spec"]
        assert meta["namespace"] == "ml"
        assert meta["labels"] | {} == {
            **meta["labels"],
            "app.kubernetes.io/name": "finetune-trainer", "app.kubernetes.io/instance": name,
            "app.kubernetes.io/component": "worker", "app.kubernetes.io/managed-by": "finetune-operator",
            "finetune.dev/name": name, "finetune.dev/worker-index": str(index), "finetune.dev/attempt": "0",
        }
        assert meta["ownerReferences"] == [{"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTune", "name": name,
                                            "uid": "uid-1", "controller": True, "blockOwnerDeletion": True}]
        assert spec["hostname"] == f"{name}-worker-{index}" and spec["subdomain"] == name
        assert spec["restartPolicy"] == "Never"
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000,
                                           "fsGroup": 1000, "seccompProfile": {"type": "RuntimeDefault"}}
        (container,) = spec["containers"]
        assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                                "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
        assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
        assert {"name": "FINETUNE_NAME", "value": name} in container["env"]
        assert {"name": "PYTHONUNBUFFERED", "value": "1"} in container["env"]
        assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in container["ports"]
        assert container["image"] == m.DEFAULT_TRAINER_IMAGE
        command = container["command"]
        assert command[:6] == ["finetune-launch", f"--nnodes={sample['spec']['workers']}",
                               f"--nproc-per-node={max(sample['spec']['gpusPerWorker'], 1)}",
                               f"--node-rank={index}", f"--master-addr={name}-worker-0.{name}",
                               "--master-port=29500"]
        assert command[6:9] == ["-m", "finetune.cli", "train"]
        assert command_after(command, "--data") == f"/data/{sample['spec']['dataset']['config']}"
        assert command_after(command, "--out") == f"/output/{sample['spec']['output']['path']}"
        assert command_after(command, "--name") == name
        assert command_after(command, "--metrics-port") == "9400"
        assert command_after(command, "--log-format") == "json"
        assert "--resume=auto" in command
        mounts = {v["mountPath"]: v for v in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert mounts["/data"]["readOnly"] is True and mounts["/output"]["name"] == "output"
        assert volumes["dataset"]["persistentVolumeClaim"] == sample["spec"]["dataset"]["volume"]["persistentVolumeClaim"]
        assert volumes["output"]["persistentVolumeClaim"] == sample["spec"]["output"]["volume"]["persistentVolumeClaim"]
        assert volumes["dshm"] == {"name": "dshm", "emptyDir": {"medium": "Memory"}}
        assert mounts["/dev/shm"]["name"] == "dshm"


def test_one_gpu_backbone_sample_command_and_resources():
    (pod,) = pods_for("freeze-backbone-1gpu")
    container = pod["spec"]["containers"][0]
    # TrainConfig.to_argv writes every set field, so the trainer's default schedule is explicit.
    assert container["command"][9:] == [
        "--data", "/data/traffic-signs/data.yaml", "--model", "yolov5s", "--weights", "/weights/yolov5s.pt",
        "--freeze", "backbone", "--freeze-bn", "true", "--epochs", "50", "--batch", "32", "--imgsz", "640",
        "--optimizer", "SGD", "--lr0", "0.005", "--lr-schedule", "cosine", "--patience", "10", "--amp", "auto",
        "--cache", "ram",
        "--seed", "0", "--device", "cuda", "--out", "/output/yolov5s-traffic-signs", "--name", "yolov5s-traffic-signs",
        "--resume=auto", "--metrics-port", "9400", "--metrics-linger", "20", "--log-format", "json",
    ]
    assert container["resources"] == {"limits": {"memory": "24Gi", "nvidia.com/gpu": 1},
                                      "requests": {"cpu": "4", "memory": "16Gi"}}
    mounts = {v["mountPath"]: v for v in container["volumeMounts"]}
    assert mounts["/weights"] == {"name": "weights", "mountPath": "/weights", "readOnly": True}
    assert "kueue.x-k8s.io/queue-name" not in pod["metadata"]["labels"]


def test_two_by_four_gpu_sample_ranks_scheduling_and_hyperparameters():
    pods = pods_for("2x4gpu")
    assert len(pods) == 2
    for rank, pod in enumerate(pods):
        command = pod["spec"]["containers"][0]["command"]
        assert f"--node-rank={rank}" in command and "--nproc-per-node=4" in command and "--nnodes=2" in command
        assert "--master-addr=yolov5m-retail-2x4gpu-worker-0.yolov5m-retail-2x4gpu" in command
        assert command_after(command, "--freeze") == "all-but-detect"
        assert command_after(command, "--lr0") == "0.001"  # learningRate "1e-3", as the number the trainer reads
        assert command_after(command, "--lr-schedule") == "cosine"
        assert command_after(command, "--workers") == "8"
        hyps = [command[i + 1] for i, a in enumerate(command) if a == "--hyp"]
        assert hyps == ["fliplr=0.0", "weight_decay=0.001"]
        resources = pod["spec"]["containers"][0]["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == 4
        assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-training"
        spec = pod["spec"]
        assert spec["priorityClassName"] == "training-high"
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert "podAntiAffinity" in spec["affinity"]
        assert pod["spec"]["containers"][0]["imagePullPolicy"] == "IfNotPresent"


def test_cpu_smoke_sample_has_no_gpu_and_one_process_per_pod():
    pods = pods_for("cpu-smoke")
    assert len(pods) == 2
    for pod in pods:
        container = pod["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in json.dumps(container["resources"])
        assert "--nproc-per-node=1" in container["command"]
        assert command_after(container["command"], "--device") == "cpu"
        assert command_after(container["command"], "--amp") == "off"
        assert "--weights" not in container["command"]
        assert "/weights" not in {v["mountPath"] for v in container["volumeMounts"]}


def test_service_is_headless_with_rendezvous_and_metrics_ports():
    sample = load_sample("2x4gpu")
    service = m.build_service("yolov5m-retail-2x4gpu", "ml", finetune_body(sample))
    assert service["metadata"]["name"] == "yolov5m-retail-2x4gpu"
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"finetune.dev/name": "yolov5m-retail-2x4gpu",
                                           "app.kubernetes.io/component": "worker"}
    assert {(p["name"], p["port"]) for p in service["spec"]["ports"]} == {("rendezvous", 29500), ("metrics", 9400)}
    assert service["metadata"]["ownerReferences"][0]["controller"] is True
    # The selector matches the pods.
    pod = pods_for("2x4gpu")[0]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()


def test_custom_model_config_is_mounted_from_the_configmap():
    sample = load_sample("cpu-smoke")
    sample["spec"]["model"] = {"config": {"configMapName": "my-models", "key": "tiny.yaml"}}
    pod = m.build_worker_pod("cpu-smoke", "ml", sample["spec"], 0, finetune_body(sample))
    container = pod["spec"]["containers"][0]
    assert command_after(container["command"], "--model") == "/config/tiny.yaml"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["model-config"]["configMap"] == {"name": "my-models", "items": [{"key": "tiny.yaml", "path": "tiny.yaml"}]}
    assert {"name": "model-config", "mountPath": "/config", "readOnly": True} in container["volumeMounts"]


def test_image_comes_from_spec_then_operator_setting(monkeypatch):
    sample = load_sample("cpu-smoke")
    monkeypatch.setenv("FINETUNE_TRAINER_IMAGE", "registry.local/trainer:dev")
    options = Options.from_environment(os.environ)  # the one place the environment is read

    def image(spec: dict, default: str | None) -> str:
        return m.build_worker_pod("a", "ml", spec, 0, finetune_body(sample), 0, default)["spec"]["containers"][0]["image"]

    assert image(sample["spec"], options.trainer_image) == "registry.local/trainer:dev"
    assert image(sample["spec"], None) == m.DEFAULT_TRAINER_IMAGE  # manifests never read the environment
    sample["spec"]["image"] = "mine:1"
    assert image(sample["spec"], options.trainer_image) == "mine:1"


def test_defaults_and_spec_hash_ignore_mutable_fields():
    spec = {"model": {"architecture": "yolov5n"}, "dataset": {"config": "d.yaml", "volume": {"emptyDir": {}}}}
    full = m.with_defaults(spec)
    assert full["workers"] == 1 and full["gpusPerWorker"] == 1 and full["training"]["batchSize"] == 16
    assert m.spec_hash(spec) == m.spec_hash({**spec, "suspend": True, "backoffLimit": 9})
    assert m.spec_hash(spec) != m.spec_hash({**spec, "freeze": 3})


# --- validation --------------------------------------------------------------------------------------

def test_valid_samples_have_no_problems(sample_key):
    sample = load_sample(sample_key)
    assert validation.validate_spec(sample["metadata"]["name"], sample["spec"]) == []


def test_freeze_too_deep_names_the_limit_and_presets():
    sample = load_sample("freeze-backbone-1gpu")
    sample["spec"]["freeze"] = 30
    (problem,) = validation.validate_spec("yolov5s-traffic-signs", sample["spec"])
    assert "spec.freeze 30 is too deep for yolov5s" in problem
    assert "25 modules" in problem and "at most 25" in problem
    assert "'backbone' (= 10)" in problem and "'all-but-detect' (= 24)" in problem


def test_indivisible_batch_suggests_multiples():
    sample = load_sample("2x4gpu")
    sample["spec"]["training"]["batchSize"] = 100
    (problem,) = validation.validate_spec("x", sample["spec"])
    assert "spec.training.batchSize 100 is not divisible by the 8 training processes" in problem
    assert "workers 2 x gpusPerWorker 4" in problem and "96 or 104" in problem


def test_missing_output_is_required_when_restarts_are_possible():
    sample = load_sample("cpu-smoke")
    del sample["spec"]["output"]
    assert validation.validate_spec("cpu-smoke", sample["spec"]) == []  # backoffLimit 0: nothing resumes
    sample["spec"]["backoffLimit"] = 2
    (problem,) = validation.validate_spec("cpu-smoke", sample["spec"])
    assert "spec.output (volume and path) is required because restarts (backoffLimit 2)" in problem
    assert "spec.backoffLimit: 0" in problem


def test_other_spec_problems_are_named():
    sample = load_sample("freeze-backbone-1gpu")
    spec = sample["spec"]
    spec["training"]["learningRate"] = "fast"
    spec["training"]["hyperparameters"] = {"mosaic": {"a": 1}}
    del spec["model"]["volume"]
    problems = validation.validate_spec("9-starts-with-a-digit", spec)
    text = "\n".join(problems)
    assert "DNS-1035" in text
    assert "spec.training.learningRate 'fast' must be a positive number" in text
    assert "spec.training.hyperparameters.mosaic" in text
    assert "spec.model.weights 'yolov5s.pt' needs spec.model.volume" in text
    assert "too long" in "\n".join(validation.validate_name("a" * 60, spec))


def test_custom_model_configmap_missing_key_and_freeze():
    from finetune.models import config as model_config
    sample = load_sample("cpu-smoke")
    sample["spec"]["model"] = {"config": {"configMapName": "models", "key": "tiny.yaml"}}
    cfg, problem = validation.parse_model_configmap(None, sample["spec"], "ml")
    assert cfg is None and "ConfigMap 'models' not found in namespace 'ml'" in problem
    cfg, problem = validation.parse_model_configmap({"data": {"other.yaml": "x"}}, sample["spec"], "ml")
    assert "has no key 'tiny.yaml' (keys: other.yaml)" in problem
    text = (model_config.CONFIG_DIR / "yolov5n.yaml").read_text()
    cfg, problem = validation.parse_model_configmap({"data": {"tiny.yaml": text}}, sample["spec"], "ml")
    assert problem is None
    assert validation.validate_spec("cpu-smoke", sample["spec"], cfg) == []
    sample["spec"]["freeze"] = 26
    (problem,) = validation.validate_spec("cpu-smoke", sample["spec"], cfg)
    assert "custom model in ConfigMap 'models'" in problem and "at most 25" in problem


# --- status helpers ----------------------------------------------------------------------------------

def test_conditions_keep_transition_time_until_status_changes():
    later = NOW + dt.timedelta(minutes=5)
    conditions = st.set_condition([], "Running", True, "A", "a", NOW)
    conditions = st.set_condition(conditions, "Running", True, "B", "b", later)
    assert conditions == [{"type": "Running", "status": "True", "reason": "B", "message": "b",
                           "lastTransitionTime": "2026-01-02T03:04:05Z"}]
    conditions = st.set_condition(conditions, "Running", False, "C", "c", later)
    assert conditions[0]["lastTransitionTime"] == "2026-01-02T03:09:05Z"


def test_enter_phase_sets_one_activity_condition():
    status = st.enter_phase({}, "Running", "WorkersRunning", "up", NOW)
    status = st.enter_phase(status, "Restarting", "RetryableFailure", "137", NOW)
    by_type = {c["type"]: c["status"] for c in status["conditions"]}
    assert status["phase"] == "Restarting" and by_type == {"Running": "False", "Restarting": "True"}
    status = st.enter_phase(status, "Succeeded", "Completed", "done", NOW)
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Running": "False", "Restarting": "False", "Succeeded": "True"}


@pytest.mark.parametrize("code, kind", [(0, "succeeded"), (1, "permanent"), (2, "permanent"), (126, "permanent"),
                                        (127, "permanent"), (128, "retryable"), (130, "retryable"),
                                        (134, "retryable"), (137, "retryable"), (139, "retryable"),
                                        (143, "retryable"), (255, "retryable")])
def test_exit_code_classification_defaults_to_kubeflows_exit_code_policy(code, kind):
    assert st.classify_exit_code(code) == kind


def test_failure_policy_rules_match_in_order_and_fall_back_to_the_default():
    policy = {"rules": [
        {"action": "Ignore", "onExitCodes": {"operator": "In", "values": [143]}},
        {"action": "FailFineTune", "onExitCodes": {"operator": "In", "values": [139, 143]}},
        {"action": "Restart", "onExitCodes": {"operator": "In", "values": [3]}},
    ]}
    assert st.classify_exit_code(143, policy) == "disruption"  # the first match wins
    assert st.classify_exit_code(139, policy) == "permanent"
    assert st.classify_exit_code(3, policy) == "retryable"
    assert st.classify_exit_code(137, policy) == "retryable" and st.classify_exit_code(1, policy) == "permanent"
    only_137 = {"rules": [{"action": "FailFineTune", "onExitCodes": {"operator": "NotIn", "values": [137]}}]}
    assert st.classify_exit_code(137, only_137) == "retryable" and st.classify_exit_code(134, only_137) == "permanent"
    assert st.classify_pod(_pod(code=3), policy).retryable
    assert st.classify_pod(_pod(code=143), policy).cause == "disruption"


def _pod(name="ft-worker-0", phase="Failed", code=None, reason=None, message=None, pod_reason=None):
    status = {"phase": phase}
    if pod_reason:
        status["reason"] = pod_reason
    if code is not None:
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": {
            "exitCode": code, "reason": reason or "Error", **({"message": message} if message else {})}}}]
    return {"metadata": {"name": name}, "status": status}


def test_pod_classification_and_messages():
    permanent = st.classify_pod(_pod(code=2, message="Traceback\nerror: data.yaml not found\n"))
    assert (permanent.state, permanent.retryable) == ("failed", False)
    assert permanent.describe() == "worker pod ft-worker-0 failed with exit code 2: error: data.yaml not found"
    killed = st.classify_pod(_pod(code=137, reason="OOMKilled"))
    assert killed.retryable and killed.describe() == "worker pod ft-worker-0 failed with exit code 137 (SIGKILL), reason OOMKilled"
    assert st.classify_pod(_pod(pod_reason="Evicted")).cause == "disruption"
    assert st.classify_pod(_pod(code=1, pod_reason="Evicted")).cause == "disruption"
    assert st.classify_pod(_pod(code=137, pod_reason="DeadlineExceeded")).cause == "retryable"
    assert st.classify_pod(_pod(pod_reason="")).cause == "retryable"  # never ran: infrastructure
    assert not st.classify_pod(_pod(pod_reason="SomethingPermanent")).retryable
    # Kubernetes >= 1.26 says why it failed the pod.
    targeted = _pod(code=143)
    targeted["status"]["conditions"] = [{"type": "DisruptionTarget", "status": "True",
                                         "reason": "PreemptionByScheduler", "message": "preempted by ml/urgent"}]
    outcome = st.classify_pod(targeted)
    assert outcome.cause == "disruption" and outcome.reason == "PreemptionByScheduler"
    assert st.classify_pod(_pod(phase="Running")).state == "running"
    assert st.classify_pod(_pod(phase="Succeeded")).state == "succeeded"
    pending = {"metadata": {"name": "p"}, "status": {"phase": "Pending", "containerStatuses": [
        {"name": "trainer", "state": {"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}}}]}}
    assert st.classify_pod(pending).detail == "ImagePullBackOff: no such image"


def test_human_readable_fields():
    assert st.human_bytes(3_325_549_363) == "3.1Gi"
    assert st.human_bytes(512) == "512"
    assert st.human_bytes(1536) == "1.5Ki"
    assert st.progress(3, 50) == "3/50" and st.progress(None, 50) == "0/50"


# --- scraping ----------------------------------------------------------------------------------------

def trainer_registry(name="ft") -> CollectorRegistry:
    """The trainer's metric names and labels (docs/trainer-contract.md), in a real registry."""
    registry = CollectorRegistry()

    def gauge(metric, extra=()):
        return Gauge(metric, metric, ("finetune", "rank", *extra), registry=registry)

    for metric, value in (("finetune_epoch", 3), ("finetune_epochs_total", 50), ("finetune_map50", 0.61),
                          ("finetune_map50_95", 0.42), ("finetune_precision", 0.7), ("finetune_recall", 0.55),
                          ("finetune_images_per_second", 812.5)):
        gauge(metric).labels(finetune=name, rank="0").set(value)
    loss = gauge("finetune_train_loss", ("component",))
    for component, value in (("box", 0.05), ("obj", 0.03), ("cls", 0.01)):
        loss.labels(finetune=name, rank="0", component=component).set(value)
    peak = gauge("finetune_gpu_memory_peak_bytes")
    peak.labels(finetune=name, rank="0").set(3_000_000_000)
    peak.labels(finetune=name, rank="1").set(3_325_549_363)
    return registry


def test_parse_metrics_from_a_real_registry():
    text = generate_latest(trainer_registry()).decode()
    values = scrape.parse_metrics(text, "ft").as_status()
    assert values == {"epoch": 3, "epochs": 50, "map50": 0.61, "map50_95": 0.42, "precision": 0.7,
                      "recall": 0.55, "imagesPerSecond": 812.5, "gpuMemoryPeakBytes": 3_325_549_363,
                      "trainLoss": pytest.approx(0.09)}
    assert scrape.parse_metrics(text, "another-run").values == {}
    status = st.apply_trainer_metrics({"epochs": 50}, values)
    assert status["progress"] == "3/50" and status["gpuMemory"] == "3.1Gi"
    assert status["bestMetrics"] == {"epoch": 3, "map50": 0.61, "map50_95": 0.42, "precision": 0.7, "recall": 0.55}
    worse = st.apply_trainer_metrics(status, {**values, "epoch": 4, "map50_95": 0.40})
    assert worse["metrics"]["map50_95"] == 0.40 and worse["bestMetrics"]["epoch"] == 3


def test_scrape_over_http_and_failure_is_none():
    server, thread = start_http_server(0, addr="127.0.0.1", registry=trainer_registry())
    try:
        url = scrape.metrics_url({"status": {"podIP": "127.0.0.1"}}, server.server_port)
        assert scrape.scrape(url, "ft").values["map50"] == 0.61
    finally:
        server.shutdown()
    assert scrape.scrape(url, "ft", timeout=0.5) is None
    assert scrape.metrics_url({"status": {}}, 9400) is None


# --- the state machine ---------------------------------------------------------------------------------

def cpu_body(**kwargs) -> dict:
    sample = load_sample("cpu-smoke")
    sample["spec"]["backoffLimit"] = 2
    sample["spec"]["activeDeadlineSeconds"] = 600
    return finetune_body(sample, **kwargs)


def started(body: dict) -> dict:
    """The body after the first reconcile (its status applied)."""
    first = reconcile.plan(body, [], False, NOW, lambda: [])
    body = copy.deepcopy(body)
    body["status"] = {k: v for k, v in first.status.items() if v is not None}
    return body, first


def with_status(pods: list[dict], *states) -> list[dict]:
    result = []
    for pod, state in zip(pods, states):
        pod = copy.deepcopy(pod)
        pod["metadata"]["uid"] = f"pod-{pod['metadata']['name']}"
        phase, code = state if isinstance(state, tuple) else (state, None)
        pod["status"] = _pod(phase=phase, code=code)["status"]
        result.append(pod)
    return result


def test_create_validates_records_spec_and_makes_service_and_pods():
    body, first = started(cpu_body())
    assert first.create_service["spec"]["clusterIP"] == "None"
    assert [p["metadata"]["name"] for p in first.create_pods] == ["cpu-smoke-worker-0", "cpu-smoke-worker-1"]
    assert first.status["appliedSpec"] == m.immutable_spec(body["spec"])
    assert first.status["phase"] == "Pending" and first.status["restarts"] == 0
    assert first.status["progress"] == "0/2" and first.status["startTime"] == "2026-01-02T03:04:05Z"
    assert st.condition_is_true(first.status["conditions"], "Created")
    assert first.counters == ["created"] and first.events[0].reason == "Created"
    # The pods it creates are counted as active already, so their arrival needs no status write.
    assert first.status["workers"] == {"active": 2, "succeeded": 0, "failed": 0}
    # Reconciling again with the pods present changes nothing.
    again = reconcile.plan(body, with_status(first.create_pods, "Pending", "Pending"), True, NOW, lambda: [])
    assert not again.create_pods and not again.delete_pods and not again.events
    assert reconcile.status_patch(body["status"], again.status) == {}
    assert again.status["message"] == "waiting for worker pod(s) to start: cpu-smoke-worker-0, cpu-smoke-worker-1"


def test_the_applied_spec_is_read_from_the_status_not_from_an_annotation_the_author_can_edit():
    body, first = started(cpu_body())
    # The author writes a "spec" of their own into the old annotation (hostPath, say): ignored.
    forged = {**first.status["appliedSpec"], "volumes": [{"name": "host", "hostPath": {"path": "/"}}]}
    body["metadata"]["annotations"] = {m.ANNOTATION_APPLIED_SPEC: json.dumps(forged)}
    assert reconcile.applied_spec(body) == m.immutable_spec(cpu_body()["spec"])
    # ... and on a FineTune that has not started, it does not stand in for validation.
    fresh = cpu_body()
    fresh["metadata"]["annotations"] = {m.ANNOTATION_APPLIED_SPEC: json.dumps(forged)}
    assert reconcile.applied_spec(fresh) is None
    assert reconcile.plan(fresh, [], False, NOW, lambda: ["bad volume"]).validation_failed
    # A run an earlier operator started (annotation, and a status saying it started) carries on,
    # its applied spec moved into the status with the next write.
    legacy = cpu_body()
    legacy["metadata"]["annotations"] = {m.ANNOTATION_APPLIED_SPEC: json.dumps(m.immutable_spec(legacy["spec"]))}
    legacy["status"] = {k: v for k, v in first.status.items() if k != "appliedSpec"}
    p = reconcile.plan(legacy, [], True, NOW, lambda: ["not validated again"])
    assert p.status["appliedSpec"] == m.immutable_spec(legacy["spec"]) and not p.validation_failed


def test_validation_failure_then_fixed_spec_starts():
    body = cpu_body()
    p = reconcile.plan(body, [], False, NOW, lambda: ["spec.freeze 30 is too deep"])
    assert p.validation_failed and p.status["phase"] == "Failed"
    assert p.status["message"] == "invalid spec: spec.freeze 30 is too deep"
    assert not p.create_pods and "appliedSpec" not in p.status and p.counters == ["failed"]
    body["status"] = p.status
    assert not reconcile.plan(body, [], False, NOW, lambda: []).create_pods  # same generation: stays failed
    body["metadata"]["generation"] = 2
    fixed = reconcile.plan(body, [], False, NOW, lambda: [])
    assert fixed.status["phase"] == "Pending" and len(fixed.create_pods) == 2


def test_running_succeeded_and_scrape_target():
    body, first = started(cpu_body())
    running = reconcile.plan(body, with_status(first.create_pods, "Running", "Running"), True, NOW, lambda: [])
    assert running.status["phase"] == "Running" and running.scrape_pod["metadata"]["name"] == "cpu-smoke-worker-0"
    body["status"] = running.status
    done = reconcile.plan(body, with_status(first.create_pods, "Succeeded", "Succeeded"), True, NOW, lambda: [])
    assert done.status["phase"] == "Succeeded" and done.status["checkpoint"] == "/output/cpu-smoke/best.pt"
    assert done.status["completionTime"] == "2026-01-02T03:04:05Z" and done.counters == ["succeeded"]


def test_retryable_failure_restarts_then_backoff_limit_fails():
    body, first = started(cpu_body())
    pods = with_status(first.create_pods, ("Failed", 137), "Running")
    restart = reconcile.plan(body, pods, True, NOW, lambda: [])
    assert restart.status["phase"] == "Restarting" and restart.status["restarts"] == 1
    assert sorted(n for n, _ in restart.delete_pods) == ["cpu-smoke-worker-0", "cpu-smoke-worker-1"]
    assert "exit code 137 (SIGKILL)" in restart.status["message"] and "restart 1 of backoffLimit 2" in restart.status["message"]
    assert restart.counters == ["restarts"] and not restart.create_pods
    body["status"] = restart.status
    # Old-attempt pods still there (operator crashed before deleting): deleted, not counted again.
    again = reconcile.plan(body, pods, True, NOW, lambda: [])
    assert again.status["restarts"] == 1 and len(again.delete_pods) == 2 and not again.create_pods
    # Once they are gone, attempt-1 pods are created.
    recreate = reconcile.plan(body, [], True, NOW, lambda: [])
    assert [p["metadata"]["labels"]["finetune.dev/attempt"] for p in recreate.create_pods] == ["1", "1"]
    body["status"]["restarts"] = body["status"]["attempt"] = 2
    pods = with_status(reconcile.plan(body, [], True, NOW, lambda: []).create_pods, ("Failed", 143), "Running")
    assert [p["metadata"]["labels"]["finetune.dev/attempt"] for p in pods] == ["2", "2"]
    exhausted = reconcile.plan(body, pods, True, NOW, lambda: [])
    assert exhausted.status["phase"] == "Failed"
    assert st.get_condition(exhausted.status["conditions"], "Failed")["reason"] == "BackoffLimitExceeded"
    assert "backoffLimit 2 reached" in exhausted.status["message"]
    assert exhausted.stop_pods == ["cpu-smoke-worker-1"] and not exhausted.delete_pods


def test_permanent_failure_keeps_pods_and_names_the_pod():
    body, first = started(cpu_body())
    pods = with_status(first.create_pods, "Running", ("Failed", 2))
    failed = reconcile.plan(body, pods, True, NOW, lambda: [])
    assert failed.status["phase"] == "Failed"
    assert "worker pod cpu-smoke-worker-1 failed with exit code 2" in failed.status["message"]
    assert "kubectl logs cpu-smoke-worker-1" in failed.status["message"]
    assert not failed.delete_pods and failed.stop_pods == ["cpu-smoke-worker-0"]


def test_suspend_resume_deadline_and_ttl():
    body, first = started(cpu_body())
    pods = with_status(first.create_pods, "Running", "Running")
    body["spec"]["suspend"] = True
    suspended = reconcile.plan(body, pods, True, NOW, lambda: [])
    assert suspended.status["phase"] == "Suspended" and len(suspended.delete_pods) == 2
    assert suspended.status["startTime"] is None
    body["status"] = {k: v for k, v in suspended.status.items() if v is not None}
    body["spec"]["suspend"] = False
    resumed = reconcile.plan(body, [], True, NOW, lambda: [])
    assert resumed.status["phase"] == "Pending" and len(resumed.create_pods) == 2
    assert not st.condition_is_true(resumed.status["conditions"], "Suspended")
    body["status"] = resumed.status
    late = NOW + dt.timedelta(seconds=601)
    expired = reconcile.plan(body, pods, True, late, lambda: [])
    assert expired.status["phase"] == "Failed" and len(expired.delete_pods) == 2
    assert st.get_condition(expired.status["conditions"], "Failed")["reason"] == "DeadlineExceeded"
    body["status"] = expired.status
    assert not reconcile.plan(body, [], True, late + dt.timedelta(seconds=3599), lambda: []).delete_finetune
    assert reconcile.plan(body, [], True, late + dt.timedelta(seconds=3600), lambda: []).delete_finetune


def test_immutable_spec_change_is_rejected_and_not_applied():
    body, first = started(cpu_body())
    body["spec"]["freeze"] = 5
    body["spec"]["backoffLimit"] = 7  # mutable: fine
    body["metadata"]["generation"] = 2
    p = reconcile.plan(body, [], True, NOW, lambda: [])
    condition = st.get_condition(p.status["conditions"], "SpecChangeRejected")
    assert condition["status"] == "True" and "spec.freeze cannot change" in condition["message"]
    assert "generation 1" in condition["message"]
    assert all(m.trainer_arguments("cpu-smoke", body["spec"])[0] for _ in [0])
    assert all(c["command"][c["command"].index("--freeze") + 1] == "3"
               for pod in p.create_pods for c in pod["spec"]["containers"])
    assert p.events[0].reason == "SpecChangeRejected"
    body["status"] = p.status
    body["spec"]["freeze"] = 3
    reverted = reconcile.plan(body, [], True, NOW, lambda: [])
    assert not st.condition_is_true(reverted.status["conditions"], "SpecChangeRejected")


def test_vanished_worker_of_a_started_run_restarts_everything():
    body, first = started(cpu_body())
    body["status"] = reconcile.plan(body, with_status(first.create_pods, "Running", "Running"), True, NOW,
                                    lambda: []).status
    assert body["status"]["phase"] == "Running"
    pods = with_status(first.create_pods[:1], "Running")
    p = reconcile.plan(body, pods, True, NOW, lambda: [])
    assert p.status["phase"] == "Restarting" and "cpu-smoke-worker-1 was disrupted (Deleted" in p.status["message"]
    assert p.status["restarts"] == 0 and p.status["disruptions"] == 1 and p.status["attempt"] == 1
    assert p.counters == ["disruptions"] and [e.reason for e in p.events] == ["Disrupted"]
    assert p.again  # nothing left to wait for: the next attempt's pods come from a plan right after


def running(body: dict, first) -> list[dict]:
    """The first attempt's pods, both Running, and the body as that made it (phase Running)."""
    pods = with_status(first.create_pods, "Running", "Running")
    body["status"] = reconcile.plan(body, pods, True, NOW, lambda: []).status
    assert body["status"]["phase"] == "Running"
    return pods


def terminated(pod: dict, code: int, finished: dt.datetime, pod_reason: str | None = None) -> dict:
    pod = copy.deepcopy(pod)
    pod["status"] = {"phase": "Failed", **({"reason": pod_reason} if pod_reason else {}),
                     "containerStatuses": [{"name": "trainer", "state": {"terminated": {
                         "exitCode": code, "reason": "Error", "finishedAt": st.timestamp(finished)}}}]}
    return pod


def deleting(pod: dict, deleted: dt.datetime, grace: int = 60) -> dict:
    pod = copy.deepcopy(pod)
    pod["metadata"]["deletionTimestamp"] = st.timestamp(deleted + dt.timedelta(seconds=grace))
    pod["metadata"]["deletionGracePeriodSeconds"] = grace
    return pod


def test_a_worker_deleted_by_someone_else_is_a_disruption_not_a_restart():
    body, first = started(cpu_body())
    pods = running(body, first)
    preempted = [deleting(pods[0], NOW), pods[1]]  # the scheduler deleted it (1.20 marks nothing)
    p = reconcile.plan(body, preempted, True, NOW, lambda: [])
    assert p.status["phase"] == "Restarting" and p.status["disruptions"] == 1 and p.status["restarts"] == 0
    assert p.status["attempt"] == 1 and sorted(n for n, _ in p.delete_pods) == ["cpu-smoke-worker-1"]
    condition = st.get_condition(p.status["conditions"], "Restarting")
    assert condition["reason"] == "Disrupted" and "not counted against backoffLimit" in condition["message"]
    body["status"] = p.status
    # The new attempt waits for the old pods, then starts with the next attempt's label.
    waiting = reconcile.plan(body, [deleting(pods[0], NOW)], True, NOW, lambda: [])
    assert not waiting.create_pods and waiting.status["disruptions"] == 1
    fresh = reconcile.plan(body, [], True, NOW, lambda: [])
    assert [pod["metadata"]["labels"]["finetune.dev/attempt"] for pod in fresh.create_pods] == ["1", "1"]
    # maxDisruptions bounds them.
    body["spec"]["maxDisruptions"] = 1
    pods = with_status(fresh.create_pods, "Running", "Running")
    body["status"] = {**body["status"], **reconcile.plan(body, pods, True, NOW, lambda: []).status}
    ended = reconcile.plan(body, [pods[0], deleting(pods[1], NOW)], True, NOW, lambda: [])
    assert ended.status["phase"] == "Failed" and ended.status["disruptions"] == 1
    assert st.get_condition(ended.status["conditions"], "Failed")["reason"] == "DisruptionLimitExceeded"


def test_the_first_failure_classifies_the_attempt():
    later = NOW + dt.timedelta(seconds=3)
    for first_pod, second_pod, cause in [
        ((137, NOW), (1, later), "restart"),          # the peer exits 1 because worker 0 was OOM-killed
        ((1, NOW), (137, NOW), "restart"),            # same second: the retryable cause wins
        ((1, NOW), (137, later), "fail"),             # the program's own verdict came first
        ((134, NOW), (1, later), "restart"),          # SIGABRT from the NCCL watchdog
    ]:
        body, first = started(cpu_body())
        pods = running(body, first)
        failed = [terminated(pods[0], *first_pod), terminated(pods[1], *second_pod)]
        p = reconcile.plan(body, failed, True, NOW, lambda: [])
        expected = "Restarting" if cause == "restart" else "Failed"
        assert p.status["phase"] == expected, (first_pod, second_pod, p.status["message"])
    # A deletion by someone else, then the peer's exit 1 (it lost its rendezvous): a disruption.
    body, first = started(cpu_body())
    pods = running(body, first)
    p = reconcile.plan(body, [deleting(pods[0], NOW), terminated(pods[1], 1, later)], True, NOW, lambda: [])
    assert p.status["phase"] == "Restarting" and p.status["disruptions"] == 1 and p.status["restarts"] == 0
    # ... and once the deleted pod is gone without a trace, still a disruption.
    p = reconcile.plan(body, [terminated(pods[1], 1, later)], True, NOW, lambda: [])
    assert p.status["disruptions"] == 1 and p.status["restarts"] == 0
    # The kubelet evicting a pod (node pressure) is a disruption too.
    p = reconcile.plan(body, [terminated(pods[0], 137, NOW, pod_reason="Evicted"), pods[1]], True, NOW, lambda: [])
    assert p.status["disruptions"] == 1 and p.status["restarts"] == 0


def test_failure_policy_from_the_spec_decides_exit_codes():
    body = cpu_body()
    body["spec"]["failurePolicy"] = {"rules": [
        {"action": "FailFineTune", "onExitCodes": {"operator": "In", "values": [137]}},
        {"action": "Restart", "onExitCodes": {"operator": "In", "values": [3]}}]}
    body, first = started(body)
    pods = running(body, first)
    assert reconcile.plan(body, [terminated(pods[0], 137, NOW), pods[1]], True, NOW, lambda: []).status["phase"] == "Failed"
    restarted = reconcile.plan(body, [terminated(pods[0], 3, NOW), pods[1]], True, NOW, lambda: [])
    assert restarted.status["phase"] == "Restarting" and restarted.status["restarts"] == 1


def test_resume_is_a_new_attempt_so_the_suspended_pods_are_not_disruptions():
    body, first = started(cpu_body())
    pods = running(body, first)
    body["spec"]["suspend"] = True
    body["status"] = reconcile.plan(body, pods, True, NOW, lambda: []).status
    body["spec"]["suspend"] = False
    still_going = [deleting(pod, NOW) for pod in pods]  # the suspension's deletions, in their grace period
    resumed = reconcile.plan(body, still_going, True, NOW, lambda: [])
    assert resumed.status["phase"] == "Pending" and resumed.status["disruptions"] == 0
    assert resumed.status["attempt"] == 1 and not resumed.create_pods
    body["status"] = resumed.status
    assert reconcile.plan(body, still_going, True, NOW, lambda: []).status["disruptions"] == 0


def test_a_run_started_before_attempts_were_counted_keeps_its_pods():
    body, first = started(cpu_body())
    pods = running(body, first)
    legacy = {k: v for k, v in body["status"].items() if k not in ("attempt", "disruptions")}
    legacy["restarts"] = 0
    body["status"] = legacy
    p = reconcile.plan(body, pods, True, NOW, lambda: [])
    assert not p.delete_pods and not p.create_pods and p.status["phase"] == "Running"


def test_partly_created_worker_set_is_completed_not_restarted():
    """Pod 1 was refused (quota, webhook) or never POSTed (the operator died in between) while
    pod 0 already runs: the set never ran as a whole, so nothing vanished."""
    body, first = started(cpu_body())
    pods = with_status(first.create_pods[:1], "Running")
    p = reconcile.plan(body, pods, True, NOW, lambda: [])
    assert p.status["phase"] == "Pending" and p.status["restarts"] == 0 and "restarts" not in p.counters
    assert [pod["metadata"]["name"] for pod in p.create_pods] == ["cpu-smoke-worker-1"]
    assert not p.delete_pods


# --- operator metrics ------------------------------------------------------------------------------------

def test_operator_metrics_survive_until_forgotten():
    registry = CollectorRegistry()
    om = operator_metrics.OperatorMetrics(registry)
    om.observe("ml", "ft", {"phase": "Running", "metrics": {"map50": 0.5, "map50_95": 0.3, "gpuMemoryPeakBytes": 10},
                            "bestMetrics": {"map50": 0.6, "map50_95": 0.35}})
    om.count_transition("created")
    with om.time_handler("timer"):
        pass
    get = registry.get_sample_value
    assert get("finetune_operator_finetunes", {"phase": "Running"}) == 1
    assert get("finetune_operator_best_map50_95", {"namespace": "ml", "finetune": "ft"}) == 0.35
    assert get("finetune_operator_gpu_memory_peak_bytes", {"namespace": "ml", "finetune": "ft"}) == 10
    assert get("finetune_operator_created_total") == 1
    assert get("finetune_operator_reconcile_duration_seconds_count", {"handler": "timer"}) == 1
    om.forget("ml", "ft")
    assert get("finetune_operator_map50", {"namespace": "ml", "finetune": "ft"}) is None
    assert get("finetune_operator_finetunes", {"phase": "Running"}) == 0


def test_command_line_defaults_to_all_namespaces_with_liveness():
    from finetune_operator import main
    args = main.parse_args([])
    assert args.namespace == [] and not args.standalone and args.liveness == "http://0.0.0.0:8081/healthz"
    args = main.parse_args(["--namespace", "a", "-n", "b", "--standalone", "--metrics-port", "0"])
    assert args.namespace == ["a", "b"] and args.standalone and args.metrics_port == 0
    with pytest.raises(SystemExit):
        main.parse_args(["--all-namespaces", "--namespace", "a"])


def test_failure_detail_is_the_trainers_error_line_not_the_launchers_summary():
    from finetune_operator.status import _last_line

    log = ("epoch 1/3 ...\n[rank 1] error: --hyp foo: unknown hyperparameter; known: box, cls\n"
           "finetune.launch: a worker failed with exit code 2\n")
    assert _last_line(log) == "[rank 1] error: --hyp foo: unknown hyperparameter; known: box, cls"
    assert _last_line("just a crash\n") == "just a crash"
    assert _last_line(None) == ""


def _crd_defaults(schema: dict, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    """Every ``default:`` under a schema, by path (an empty-object default only makes room for
    the defaults inside it)."""
    found: dict[tuple[str, ...], object] = {}
    for key, prop in (schema.get("properties") or {}).items():
        if "default" in prop and prop["default"] != {}:
            found[path + (key,)] = prop["default"]
        found.update(_crd_defaults(prop, path + (key,)))
    return found


def _leaves(value: object, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    if not isinstance(value, dict):
        return {path: value}
    return {leaf: v for key, item in value.items() for leaf, v in _leaves(item, path + (key,)).items()}


def test_operator_defaults_are_the_crds_defaults():
    """with_defaults (applied once per reconcile) fills in exactly what the apiserver would."""
    crd = yaml.safe_load((Path(__file__).resolve().parents[2] / "crds" / "finetune.dev_finetunes.yaml").read_text())
    (version,) = crd["spec"]["versions"]
    spec_schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert _leaves(m.with_defaults({})) == _crd_defaults(spec_schema)
