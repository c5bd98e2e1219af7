"""The real operator process against a real control plane (v1.20, no kubelet).

The operator runs as a subprocess (``python -m finetune_operator.main``) with a kubeconfig
for a ServiceAccount token bound to the chart's RBAC, watching only the test's namespace.
Tests play the kubelet with ``control_plane.set_pod_status`` and watch the FineTune move
through its phases. Timers run every second (FINETUNE_OPERATOR_RECONCILE_INTERVAL=1).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from support import REPO, free_port, wait_for  # noqa: F401 (wait_for: also for tests/e2e)
from support.chart import OPERATOR_NAMESPACE, RELEASE, install_crd_and_chart_rbac  # noqa: F401 (e2e, demo)

SAMPLES_DIR = REPO / "crds" / "samples"
TIMEOUT = 30.0
# The garbage collector learns about new CRDs by re-discovery every 30s; right after the CRD is
# installed it may take that long before it deletes a FineTune's dependents.
GC_TIMEOUT = 75.0


# --- helpers ----------------------------------------------------------------------------------------

def sample(name: str) -> dict[str, Any]:
    return yaml.safe_load((SAMPLES_DIR / name).read_text())


def cpu_finetune(name: str, **spec_changes: Any) -> dict[str, Any]:
    """The CPU smoke sample, renamed, with changes (workers, backoffLimit, ...)."""
    body = sample("finetune-cpu-smoke.yaml")
    body["metadata"] = {"name": name}
    body["spec"]["backoffLimit"] = 2
    body["spec"].pop("activeDeadlineSeconds", None)
    body["spec"].pop("ttlSecondsAfterFinished", None)
    body["spec"].update(spec_changes)
    return body


class Cluster:
    """The control plane plus FineTune-specific reads, bound to one namespace."""

    def __init__(self, cp, namespace: str):
        self.cp, self.ns = cp, namespace

    def apply(self, body: dict) -> None:
        self.cp.kubectl("-n", self.ns, "apply", "-f", "-", input=json.dumps(body))

    def finetune(self, name: str) -> dict[str, Any] | None:
        proc = self.cp.kubectl("-n", self.ns, "get", "ft", name, "-o", "json", check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def status(self, name: str) -> dict[str, Any]:
        return (self.finetune(name) or {}).get("status") or {}

    def pods(self, name: str) -> list[dict[str, Any]]:
        out = self.cp.kubectl("-n", self.ns, "get", "pods", "-l", f"finetune.dev/name={name}", "-o", "json")
        return sorted(json.loads(out.stdout)["items"], key=lambda p: p["metadata"]["name"])

    def live_pods(self, name: str) -> list[dict[str, Any]]:
        return [p for p in self.pods(name) if not p["metadata"].get("deletionTimestamp")]

    def wait_phase(self, name: str, phase: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        return wait_for(lambda: (s := self.status(name)).get("phase") == phase and s, f"{name} phase {phase}",
                        timeout=timeout)

    def wait_pods(self, name: str, count: int, attempt: int = 0) -> list[dict[str, Any]]:
        def ready():
            pods = self.live_pods(name)
            ok = len(pods) == count and all(p["metadata"]["labels"]["finetune.dev/attempt"] == str(attempt)
                                            for p in pods)
            return ok and pods
        return wait_for(ready, f"{count} pods of {name} (attempt {attempt})")

    def set_all(self, pods: list[dict], phase: str, **kwargs: Any) -> None:
        for pod in pods:
            self.cp.set_pod_status(self.ns, pod["metadata"]["name"], phase, **kwargs)

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        return next((c for c in self.status(name).get("conditions") or [] if c["type"] == type_), {})

    def events(self, name: str) -> list[str]:
        out = self.cp.kubectl("-n", self.ns, "get", "events", "--field-selector",
                              f"involvedObject.name={name},involvedObject.kind=FineTune", "-o", "json")
        return [e["reason"] for e in json.loads(out.stdout)["items"]]


class Operator:
    """The operator as a subprocess; start/stop/kill like a Deployment's pod would."""

    def __init__(self, kubeconfig: Path, namespace: str, log_path: Path, env: dict[str, str] | None = None):
        self.kubeconfig, self.namespace, self.log_path = kubeconfig, namespace, log_path
        self.extra_env = env or {}
        self.metrics_port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "FINETUNE_OPERATOR_RECONCILE_INTERVAL": "1",
            "FINETUNE_OPERATOR_SCRAPE_TIMEOUT": "0.2",
            "FINETUNE_OPERATOR_METRICS_PORT": str(self.metrics_port),
            "FINETUNE_TRAINER_IMAGE": "trainer.test/finetune:dev",
            **self.extra_env,
        }
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "finetune_operator.main", "--namespace", self.namespace, "--standalone",
             "--liveness", f"http://127.0.0.1:{free_port()}/healthz", "--verbose"],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


# --- fixtures -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def operator_kubeconfig(control_plane) -> Path:
    kubeconfig = install_crd_and_chart_rbac(control_plane)
    # The 2x4gpu sample asks for this PriorityClass; the Priority admission plugin insists on it.
    control_plane.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
        "metadata": {"name": "training-high"}, "value": 1000}))
    return kubeconfig


@pytest.fixture
def cluster(control_plane, namespace) -> Cluster:
    return Cluster(control_plane, namespace)


@pytest.fixture
def operator(operator_kubeconfig, namespace, tmp_path, request):
    op = Operator(operator_kubeconfig, namespace, tmp_path / "operator.log")
    op.start()
    yield op
    op.stop()
    # Shown by pytest only when the test failed.
    print(f"--- operator log ({op.log_path}) ---\n{op.log_tail()}")


# --- tests ------------------------------------------------------------------------------------------

def test_samples_get_a_headless_service_and_one_pod_per_worker(cluster, operator):
    expected = {"finetune-freeze-backbone-1gpu.yaml": 1, "finetune-2x4gpu.yaml": 2, "finetune-cpu-smoke.yaml": 2}
    for file in expected:
        cluster.apply(sample(file))
    for file, workers in expected.items():
        body = sample(file)
        name = body["metadata"]["name"]
        pods = cluster.wait_pods(name, workers)
        finetune = cluster.finetune(name)
        for index, pod in enumerate(pods):
            assert pod["metadata"]["name"] == f"{name}-worker-{index}"
            assert pod["metadata"]["ownerReferences"][0]["uid"] == finetune["metadata"]["uid"]
            assert pod["spec"]["hostname"] == f"{name}-worker-{index}" and pod["spec"]["subdomain"] == name
            container = pod["spec"]["containers"][0]
            assert container["image"] == "trainer.test/finetune:dev"
            assert f"--node-rank={index}" in container["command"]
            gpus = body["spec"]["gpusPerWorker"]
            assert container["resources"].get("limits", {}).get("nvidia.com/gpu") == (str(gpus) if gpus else None)
        service = json.loads(cluster.cp.kubectl("-n", cluster.ns, "get", "service", name, "-o", "json").stdout)
        assert service["spec"]["clusterIP"] == "None"
        assert {p["port"] for p in service["spec"]["ports"]} == {29500, 9400}
        status = cluster.wait_phase(name, "Pending")
        assert cluster.condition(name, "Created")["status"] == "True"
        assert status["progress"] == f"0/{body['spec']['training']['epochs']}"
        assert status["observedGeneration"] == finetune["metadata"]["generation"]
    assert cluster.live_pods("yolov5m-retail-2x4gpu")[0]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-training"


def test_running_restart_on_137_then_succeeded(cluster, operator):
    cluster.apply(cpu_finetune("life"))
    pods = cluster.wait_pods("life", 2)
    cluster.set_all(pods, "Running")
    status = cluster.wait_phase("life", "Running")
    assert status["workers"] == {"active": 2, "succeeded": 0, "failed": 0}
    cluster.cp.set_pod_status(cluster.ns, "life-worker-0", "Failed", exit_code=137, reason="OOMKilled")
    status = cluster.wait_phase("life", "Restarting")
    assert status["restarts"] == 1 and "exit code 137" in status["message"]
    new_pods = cluster.wait_pods("life", 2, attempt=1)
    assert {p["metadata"]["uid"] for p in new_pods}.isdisjoint({p["metadata"]["uid"] for p in pods})
    cluster.set_all(new_pods, "Running")
    cluster.wait_phase("life", "Running")
    cluster.set_all(new_pods, "Succeeded")
    status = cluster.wait_phase("life", "Succeeded")
    assert status["checkpoint"] == "/output/cpu-smoke/best.pt" and status["completionTime"]
    assert status["restarts"] == 1
    assert cluster.condition("life", "Succeeded")["status"] == "True"
    assert cluster.condition("life", "Restarting")["status"] == "False"
    assert len(cluster.live_pods("life")) == 2  # finished pods stay, like a Job's
    expected_events = {"Created", "Running", "Restarting", "Completed"}
    try:
        wait_for(lambda: expected_events <= set(cluster.events("life")), "events for each transition", timeout=10)
    except AssertionError:
        raise AssertionError(f"events: {cluster.events('life')}") from None
    text = operator.metrics()
    assert 'finetune_operator_finetunes{phase="Succeeded"} 1.0' in text
    assert "finetune_operator_restarts_total 1.0" in text and "finetune_operator_succeeded_total 1.0" in text


def test_permanent_exit_code_fails_and_keeps_pods(cluster, operator):
    cluster.apply(cpu_finetune("perm"))
    pods = cluster.wait_pods("perm", 2)
    cluster.set_all(pods, "Running")
    cluster.wait_phase("perm", "Running")
    cluster.cp.set_pod_status(cluster.ns, "perm-worker-1", "Failed", exit_code=2,
                              message="Traceback...\nerror: /data/data.yaml not found; check spec.dataset.config")
    status = cluster.wait_phase("perm", "Failed")
    assert "worker pod perm-worker-1 failed with exit code 2" in status["message"]
    assert "error: /data/data.yaml not found" in status["message"]
    failed = cluster.condition("perm", "Failed")
    assert failed["status"] == "True" and failed["reason"] == "WorkerFailed"
    time.sleep(2)  # a few more reconciles: nothing is restarted or deleted
    kept = cluster.live_pods("perm")
    assert [p["metadata"]["uid"] for p in kept] == [p["metadata"]["uid"] for p in pods]
    # The still-running rank is stopped through its deadline (the kubelet kills it), not deleted.
    assert kept[0]["spec"].get("activeDeadlineSeconds") == 1
    assert cluster.status("perm")["restarts"] == 0


def test_backoff_limit_exhaustion_fails(cluster, operator):
    cluster.apply(cpu_finetune("backoff", workers=1, backoffLimit=1))
    pods = cluster.wait_pods("backoff", 1)
    cluster.cp.set_pod_status(cluster.ns, "backoff-worker-0", "Failed", exit_code=143)
    cluster.wait_phase("backoff", "Restarting")
    cluster.wait_pods("backoff", 1, attempt=1)
    # The kubelet evicting the pod is the node's doing: a disruption, not counted as a restart.
    cluster.cp.set_pod_status(cluster.ns, "backoff-worker-0", "Failed", reason="Evicted",
                              message="The node was low on resource: memory.")
    status = wait_for(lambda: (s := cluster.status("backoff")).get("disruptions") == 1 and s, "the eviction counted")
    assert status["restarts"] == 1 and "Evicted" in status["message"], status
    cluster.wait_pods("backoff", 1, attempt=2)
    cluster.cp.set_pod_status(cluster.ns, "backoff-worker-0", "Failed", exit_code=137, reason="OOMKilled")
    status = cluster.wait_phase("backoff", "Failed")
    assert cluster.condition("backoff", "Failed")["reason"] == "BackoffLimitExceeded"
    assert "backoffLimit 1 reached after 1 restart(s)" in status["message"] and "OOMKilled" in status["message"]
    assert status["restarts"] == 1 and status["disruptions"] == 1 and len(cluster.live_pods("backoff")) == 1
    assert pods  # the first attempt's pod was replaced, the last one is kept


def test_suspend_and_resume(cluster, operator):
    cluster.apply(cpu_finetune("pause"))
    pods = cluster.wait_pods("pause", 2)
    cluster.set_all(pods, "Running")
    cluster.wait_phase("pause", "Running")
    cluster.cp.kubectl("-n", cluster.ns, "patch", "ft", "pause", "--type=merge", "-p", '{"spec":{"suspend":true}}')
    status = cluster.wait_phase("pause", "Suspended")
    wait_for(lambda: not cluster.pods("pause"), "pods deleted while suspended")
    assert cluster.condition("pause", "Suspended")["status"] == "True" and "startTime" not in status
    cluster.cp.kubectl("-n", cluster.ns, "patch", "ft", "pause", "--type=merge", "-p", '{"spec":{"suspend":false}}')
    pods = cluster.wait_pods("pause", 2, attempt=1)  # a resume is a new attempt, not a restart
    cluster.set_all(pods, "Running")
    status = cluster.wait_phase("pause", "Running")
    assert status["restarts"] == 0 and status["disruptions"] == 0 and status["attempt"] == 1
    assert cluster.condition("pause", "Suspended")["status"] == "False"


def test_deleting_the_finetune_removes_pods_and_service(cluster, operator):
    cluster.apply(cpu_finetune("gone"))
    cluster.wait_pods("gone", 2)
    cluster.wait_phase("gone", "Pending")
    # Nothing to stop for a Pending FineTune (no clock daemon), so no finalizer holds it.
    assert "finetune.dev/finalizer" not in (cluster.finetune("gone")["metadata"].get("finalizers") or [])
    cluster.cp.kubectl("-n", cluster.ns, "delete", "ft", "gone", "--wait=false")
    wait_for(lambda: cluster.finetune("gone") is None, "the FineTune to be deleted")
    wait_for(lambda: not cluster.pods("gone"), "garbage collection of the pods", timeout=GC_TIMEOUT)
    wait_for(lambda: cluster.cp.kubectl("-n", cluster.ns, "get", "service", "gone", check=False).returncode != 0,
             "garbage collection of the service", timeout=GC_TIMEOUT)


def test_active_deadline_fails_and_deletes_pods(cluster, operator):
    cluster.apply(cpu_finetune("deadline", activeDeadlineSeconds=3))
    pods = cluster.wait_pods("deadline", 2)
    cluster.set_all(pods, "Running")
    status = cluster.wait_phase("deadline", "Failed", timeout=20)
    assert cluster.condition("deadline", "Failed")["reason"] == "DeadlineExceeded"
    assert "activeDeadlineSeconds (3s)" in status["message"]
    wait_for(lambda: not cluster.live_pods("deadline"), "pods deleted after the deadline")


def test_ttl_after_finished_deletes_the_finetune(cluster, operator):
    cluster.apply(cpu_finetune("ttl", workers=1, ttlSecondsAfterFinished=2))
    pods = cluster.wait_pods("ttl", 1)
    cluster.set_all(pods, "Succeeded")
    cluster.wait_phase("ttl", "Succeeded")
    wait_for(lambda: cluster.finetune("ttl") is None, "ttlSecondsAfterFinished to delete the FineTune", timeout=20)
    wait_for(lambda: not cluster.pods("ttl"), "garbage collection of the pods", timeout=GC_TIMEOUT)


def test_freeze_too_deep_fails_validation_without_pods(cluster, operator):
    cluster.apply(cpu_finetune("deep", freeze=30))
    status = cluster.wait_phase("deep", "Failed")
    failed = cluster.condition("deep", "Failed")
    assert failed["reason"] == "ValidationFailed"
    assert "spec.freeze 30 is too deep for yolov5n, which has 25 modules" in failed["message"]
    assert "at most 25" in status["message"]
    assert not cluster.pods("deep")
    assert "ValidationFailed" in wait_for(lambda: cluster.events("deep"), "a warning event")
    # Fixing the spec starts the run.
    cluster.cp.kubectl("-n", cluster.ns, "patch", "ft", "deep", "--type=merge", "-p", '{"spec":{"freeze":"backbone"}}')
    cluster.wait_pods("deep", 2)
    cluster.wait_phase("deep", "Pending")


def test_immutable_spec_change_is_rejected(cluster, operator):
    cluster.apply(cpu_finetune("frozen"))
    pods = cluster.wait_pods("frozen", 2)
    cluster.cp.kubectl("-n", cluster.ns, "patch", "ft", "frozen", "--type=merge",
                       "-p", '{"spec":{"freeze":5,"training":{"epochs":9},"backoffLimit":4}}')
    condition = wait_for(lambda: (c := cluster.condition("frozen", "SpecChangeRejected")).get("status") == "True" and c,
                         "SpecChangeRejected")
    assert "spec.freeze, spec.training cannot change" in condition["message"]
    assert [p["metadata"]["uid"] for p in cluster.live_pods("frozen")] == [p["metadata"]["uid"] for p in pods]
    command = cluster.live_pods("frozen")[0]["spec"]["containers"][0]["command"]
    assert command[command.index("--freeze") + 1] == "3"
    status = cluster.status("frozen")
    assert status["appliedGeneration"] == 1 and status["observedGeneration"] == 2
    cluster.cp.kubectl("-n", cluster.ns, "patch", "ft", "frozen", "--type=merge",
                       "-p", '{"spec":{"freeze":3,"training":{"epochs":2}}}')
    wait_for(lambda: cluster.condition("frozen", "SpecChangeRejected").get("status") == "False", "the condition to clear")


def test_operator_restarts_create_no_duplicates(cluster, operator):
    body = cpu_finetune("crash", workers=3)
    body["spec"]["training"]["batchSize"] = 9
    cluster.apply(body)
    # Kill the operator as soon as the first pod exists: mid-way through creating the workers.
    wait_for(lambda: cluster.pods("crash"), "the first pod", interval=0.05)
    operator.stop(signal.SIGKILL)
    operator.start()
    pods = cluster.wait_pods("crash", 3)
    time.sleep(2)
    assert [p["metadata"]["uid"] for p in cluster.pods("crash")] == [p["metadata"]["uid"] for p in pods]
    # Kill it again right after a retryable failure: the restart is counted exactly once.
    cluster.set_all(pods, "Running")
    cluster.wait_phase("crash", "Running")
    cluster.cp.set_pod_status(cluster.ns, "crash-worker-2", "Failed", exit_code=137)
    wait_for(lambda: cluster.status("crash").get("restarts") == 1, "the restart to be recorded", interval=0.05)
    operator.stop(signal.SIGKILL)
    operator.start()
    new_pods = cluster.wait_pods("crash", 3, attempt=1)
    time.sleep(2)
    assert cluster.status("crash")["restarts"] == 1
    assert [p["metadata"]["uid"] for p in cluster.pods("crash")] == [p["metadata"]["uid"] for p in new_pods]
    cluster.set_all(new_pods, "Running")
    cluster.wait_phase("crash", "Running")


def test_trainer_metrics_flow_into_status_and_operator_metrics(cluster, operator):
    """A fake rank 0 serves the contract's metrics on 127.0.0.1:9400; the pod's IP points there."""
    from prometheus_client import CollectorRegistry, Gauge, start_http_server
    registry = CollectorRegistry()
    for metric, value in (("finetune_epoch", 3), ("finetune_epochs_total", 50), ("finetune_map50", 0.61),
                          ("finetune_map50_95", 0.42), ("finetune_precision", 0.7), ("finetune_recall", 0.55),
                          ("finetune_images_per_second", 812.5), ("finetune_gpu_memory_peak_bytes", 3_325_549_363)):
        Gauge(metric, metric, ["finetune", "rank"], registry=registry).labels(finetune="scraped", rank="0").set(value)
    # Port 9400 is the trainer contract's; nothing else in the suite binds it (tests run serially).
    server, _ = start_http_server(9400, addr="127.0.0.1", registry=registry)
    try:
        cluster.apply(cpu_finetune("scraped", workers=1))
        (pod,) = cluster.wait_pods("scraped", 1)
        cluster.set_all([pod], "Running")
        cluster.cp.kubectl("-n", cluster.ns, "patch", "pod", "scraped-worker-0", "--subresource=status", "--type=merge",
                           "-p", json.dumps({"status": {"podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}]}}))
        status = wait_for(lambda: (s := cluster.status("scraped")).get("progress") == "3/50" and s, "scraped progress")
        assert status["gpuMemory"] == "3.1Gi" and status["epoch"] == 3 and status["epochs"] == 50
        assert status["metrics"]["map50"] == 0.61 and status["metrics"]["imagesPerSecond"] == 812.5
        assert status["bestMetrics"]["map50_95"] == 0.42
        row = cluster.cp.kubectl("-n", cluster.ns, "get", "ft", "scraped", "--no-headers").stdout.split()
        assert row[1:6] == ["Running", "3/50", "0.61", "0.42", "3.1Gi"]
        labels = f'finetune="scraped",namespace="{cluster.ns}"'
        assert f"finetune_operator_map50{{{labels}}} 0.61" in operator.metrics()
    finally:
        server.shutdown()
    # The trainer is gone; the operator's series stay until the FineTune is deleted.
    cluster.set_all([pod], "Succeeded")
    cluster.wait_phase("scraped", "Succeeded")
    assert f"finetune_operator_best_map50_95{{{labels}}} 0.42" in operator.metrics()
    cluster.cp.kubectl("-n", cluster.ns, "delete", "ft", "scraped")
    wait_for(lambda: "finetune_operator_best_map50_95{" + labels not in operator.metrics(), "series removal")
