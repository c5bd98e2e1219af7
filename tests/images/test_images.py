"""The built images, run as a cluster would run them: runc, numeric non-root user,
read-only root filesystem, no capabilities, RuntimeDefault seccomp.

* The checks of `make images` (size budget, one libcudart, no kopf/torch in the wrong image,
  model YAMLs installed, entrypoints runnable as the image's USER).
* The trainer trains one epoch on CPU with the dataset read-only and only /output and a tmpfs
  /tmp writable, in a network namespace with nothing but loopback; `finetune val` reads the
  checkpoint back in a second container.
* The operator image reconciles a FineTune on the real control plane, authenticated only by
  the chart ServiceAccount's token mounted where a pod has it.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from support import free_port, load_module
from support.chart import OPERATOR_NAMESPACE, install_crd_and_chart_rbac

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["operator", "trainer"])
def test_image_checks(images, name, request):
    ref = request.getfixturevalue(f"{name}_image")
    assert images.check(name, ref) == []


def test_image_user_and_entrypoints_are_what_pods_expect(images, trainer_image, operator_image):
    trainer, operator = images.image_config(trainer_image), images.image_config(operator_image)
    # The operator's pods set runAsUser 1000 for trainers and the chart 10001 for the operator.
    assert trainer["User"] == "1000:1000" and operator["User"] == "10001:10001"
    assert trainer["Entrypoint"][0] == "finetune-launch" and operator["Entrypoint"] == ["finetune-operator"]


@pytest.fixture
def dataset(tmp_path):
    from finetune.data.synth import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", classes=["circle", "square"], n_train=8, n_val=4,
                                  imgsz=64, seed=1)
    # The container's user (1000) only reads it; it is mounted read-only anyway.
    for path in [tmp_path / "data", *(tmp_path / "data").rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return data.parent


def run_trainer(images, ref, args, dataset: Path, output: Path, entrypoint: bool) -> subprocess.CompletedProcess:
    config = images.image_config(ref)
    command = [*config["Entrypoint"], *args] if entrypoint else args
    spec = images.oci_spec(
        images.rootfs(ref), command, uid=1000, gid=1000, cwd=config["WorkingDir"],
        env=images.image_env(ref, {"HOME": "/home/trainer", "OMP_NUM_THREADS": "1"}),
        readonly_root=True, tmpfs=["/tmp"], caps=[],
        binds=[(str(dataset), "/data", True), (str(output), "/output", False)])
    with images.NetNS() as netns:
        spec["linux"]["namespaces"].append({"type": "network", "path": netns.path})
        return images.runc_run(spec, timeout=600)


def test_trainer_trains_and_validates_in_a_locked_down_container(images, trainer_image, dataset, tmp_path):
    output = tmp_path / "output"
    output.mkdir()
    os.chown(output, 1000, 1000)
    # The image's ENTRYPOINT (finetune-launch --standalone ... finetune.cli train), as `docker run IMAGE ...`.
    done = run_trainer(images, trainer_image, ["--data", "/data/data.yaml", "--model", "yolov5n", "--epochs", "1",
                                               "--batch", "4", "--imgsz", "64", "--workers", "0", "--device", "cpu",
                                               "--out", "/output/run"], dataset, output, entrypoint=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    run = output / "run"
    for name in ("last.pt", "best.pt", "results.csv"):
        assert (run / name).is_file(), f"{name} missing; wrote {sorted(p.name for p in run.iterdir())}"
        assert (run / name).stat().st_uid == 1000  # written by the image's user, not root
    rows = list(csv.DictReader((run / "results.csv").open()))
    assert len(rows) == 1
    done = run_trainer(images, trainer_image, ["finetune", "val", "--data", "/data/data.yaml", "--weights",
                                               "/output/run/best.pt", "--imgsz", "64", "--workers", "0"],
                       dataset, output, entrypoint=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    metrics = json.loads(done.stdout)
    trained = json.loads((run / "metrics.json").read_text())["best"]
    assert metrics["map50_95"] == pytest.approx(trained["map50_95"], abs=1e-6)


def test_trainer_cannot_write_its_dataset_or_root(images, trainer_image, dataset, tmp_path):
    output = tmp_path / "output"
    output.mkdir()
    probe = ("import pathlib\n"
             "for p in ('/data/x', '/opt/venv/x', '/home/trainer/x', '/tmp/x', '/output/x'):\n"
             "    try:\n        pathlib.Path(p).write_text('x'); print(p, 'writable')\n"
             "    except OSError as e:\n        print(p, 'refused', e.errno)\n")
    done = run_trainer(images, trainer_image, ["python", "-c", probe], dataset, output, entrypoint=False)
    assert done.returncode == 0, done.stderr
    result = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert result["/tmp/x"] == "writable"
    for path in ("/data/x", "/opt/venv/x", "/home/trainer/x"):
        assert result[path].startswith("refused"), (path, result[path])
    # /output is root's here (not chowned): uid 1000 without capabilities cannot write it.
    assert result["/output/x"].startswith("refused")


# --- the operator image against the real control plane -----------------------------------------

def test_operator_image_reconciles_a_finetune(images, operator_image, control_plane, namespace, tmp_path):
    op_tests = load_module("finetune_tests_operator_cluster", REPO / "tests" / "operator" / "test_operator_cluster.py")
    token_kubeconfig = install_crd_and_chart_rbac(control_plane)
    token = _token_from_kubeconfig(token_kubeconfig)
    # Where a pod has them: the kubelet mounts the ServiceAccount token, the cluster CA and the namespace.
    secrets = tmp_path / "serviceaccount"
    secrets.mkdir()
    (secrets / "token").write_text(token)
    shutil.copy(control_plane.ca_file, secrets / "ca.crt")
    (secrets / "namespace").write_text(OPERATOR_NAMESPACE)
    for path in [secrets, *secrets.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    host, port = control_plane.server.removeprefix("https://").rsplit(":", 1)
    metrics_port = free_port()
    config = images.image_config(operator_image)
    spec = images.oci_spec(
        images.rootfs(operator_image),
        [*config["Entrypoint"], "--namespace", namespace, "--standalone",
         "--liveness", f"http://127.0.0.1:{free_port()}/healthz", "--verbose"],
        uid=10001, gid=10001, cwd=config["WorkingDir"],
        env=images.image_env(operator_image, {
            "KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port,
            "FINETUNE_OPERATOR_RECONCILE_INTERVAL": "1", "FINETUNE_OPERATOR_METRICS_PORT": str(metrics_port),
            "FINETUNE_TRAINER_IMAGE": "trainer.test/finetune:dev"}),
        readonly_root=True, tmpfs=["/tmp"], caps=[],
        binds=[(str(secrets), "/var/run/secrets/kubernetes.io/serviceaccount", True)])
    # Host network, as a pod on a node reaches the apiserver; no KUBECONFIG: in-cluster login only.
    log_path = tmp_path / "operator.log"
    bundle = tmp_path / "bundle"
    container_id = f"finetune-op-{uuid.uuid4().hex[:8]}"
    with log_path.open("w") as log:
        proc = subprocess.Popen(images.runc_command(spec, bundle, container_id), stdout=log,
                                stderr=subprocess.STDOUT)
    cluster = op_tests.Cluster(control_plane, namespace)
    try:
        cluster.apply(op_tests.cpu_finetune("from-image"))
        pods = _wait(lambda: len(cluster.live_pods("from-image")) == 2 and cluster.live_pods("from-image"),
                     "the operator's 2 worker pods", proc, log_path)
        assert pods[0]["spec"]["containers"][0]["image"] == "trainer.test/finetune:dev"
        cluster.set_all(pods, "Running")
        _wait(lambda: cluster.status("from-image").get("phase") == "Running", "phase Running", proc, log_path)
        cluster.set_all(pods, "Succeeded")
        status = _wait(lambda: (s := cluster.status("from-image")).get("phase") == "Succeeded" and s,
                       "phase Succeeded", proc, log_path)
        assert status["workers"]["succeeded"] == 2
        assert proc.poll() is None, "the operator exited"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            subprocess.run(["runc", "--root", str(images.RUNC_ROOT), "kill", container_id, "KILL"], check=False)
            proc.wait(timeout=10)
        subprocess.run(["runc", "--root", str(images.RUNC_ROOT), "delete", "--force", container_id], check=False)
        print(f"--- operator container log ---\n{log_path.read_text(errors='replace')[-6000:]}")


def _token_from_kubeconfig(path: Path) -> str:
    import yaml

    config = yaml.safe_load(path.read_text())
    return config["users"][0]["user"]["token"]


def _wait(condition, what: str, proc: subprocess.Popen, log_path: Path, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    raise AssertionError(f"waiting for {what}: operator exit {proc.poll()}; log:\n"
                         + log_path.read_text(errors="replace")[-4000:])
